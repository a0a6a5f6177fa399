-- paygate.wechatpay.upstream: how calls to WeChat degrade instead of
-- collapse. transport.lua asks it, around each call and each attempt:
--
--   endpoint      a bounded name for a call: "GET /v3/pay/transactions/
--                 out-trade-no/{}" (every path segment that is not a word
--                 of WeChat's API is "{}"; no id, no query)
--   degradation   one switch per shared dict (paygate.shared), seen by
--                 every worker: on, every call fails fast with kind
--                 `degraded` without touching the network
--   timeouts      per endpoint and per worker: the attempt timeout is
--                 p95 x 1.8 + 0.2 s of the last latency_window answers,
--                 within [timeout_floor, timeout_ceiling], once
--                 timeout_samples answers were seen (the configured
--                 `timeout` until then), recomputed every
--                 max(5, latency_window / 10) answers
--   breaker       per endpoint and merchant, in the client's shared dict
--                 (every worker of the instance shares it): closed ->
--                 open when, over the sliding breaker_window, at least
--                 breaker_min_calls attempts were made and the failed
--                 share reached breaker_failure_ratio; open fails fast
--                 (kind `circuit_open`, retryable, err.retry_after) for
--                 breaker_open_for seconds; then one attempt (the probe,
--                 any worker's) goes through: success closes, failure
--                 opens again. A failure is an attempt without an answer
--                 (timeout, connect, reset...), a 5xx or a 429.
--   counting      paygate_wechatpay_calls_total{endpoint,outcome,kind} on
--                 /metrics, one per call (retries are inside one call),
--                 and paygate_wechatpay_call_duration_seconds{endpoint},
--                 the time of each call that made an attempt
local core = require "paygate.core"
local metrics = require "paygate.metrics"
local errors = require "paygate.wechatpay.errors"
local config = require "paygate.wechatpay.config"

local type, tostring, tonumber, floor, ceil, min, max, sort =
      type, tostring, tonumber, math.floor, math.ceil, math.min, math.max,
      table.sort

local _M = {}

local DEGRADED_KEY = "paygate.wechatpay.degraded"
_M.DEGRADED_KEY = DEGRADED_KEY
local RECOMPUTE = 5              -- answers between two p95 computations,
                                 -- at least; latency_window / 10 at most
local MAX_SEGMENTS = 8           -- of an endpoint name

------------------------------------------------------------ endpoints

-- The words of WeChat Pay v3 paths; any other segment is an id ("{}").
local WORDS = {}
for w in ([[v3 pay partner transactions native h5 jsapi app out-trade-no
  id close refund domestic refunds abnormal-refunds apply bill tradebill
  fundflowbill sub-merchant-fundflowbill billdownload file certificates
  combine-transactions profitsharing orders return-orders unfreeze
  amounts merchant-service complaints-v2 marketing favor coupons
  stocks users callbacks notifications payscore serviceorder complete
  cancel modify sync-order merchant fund withdraw applyment applyments
  ecommerce subsidies media upload image video capital banks
  search-banks-by-bank-account personal-banking corporate-banking
  provinces cities branches transfer batches batch-id out-batch-no
  details detail-id out-detail-no bills bill-receipt elecsign
  transfer-bills out-bill-no new-tax-control-fapiao fapiao-applications
  goldplan apply-abnormal-refund video_upload ]]):gmatch("%S+") do
  WORDS[w] = true
end

-- Segments after which the next one is always an id, even when it
-- happens to spell a word ("/refunds/refund").
local ID_AFTER = {}
for w in ([[out-trade-no id refunds out-refund-no out-batch-no batch-id
  out-detail-no detail-id out-bill-no orders return-orders
  serviceorder applyments stocks complaints-v2]]):gmatch("%S+") do
  ID_AFTER[w] = true
end

local ep_cache, ep_cached = {}, 0

--- syntax: name, what = upstream.endpoint(method, path)
-- returns: "METHOD /v3/word/{}/word" (query dropped, ids as {}, at most
-- MAX_SEGMENTS segments, then "/..."): a bounded set of names; and what,
-- "METHOD /v3/the/path" (the query dropped: the call's name in errors).
function _M.endpoint(method, path)
  local p = path:match("^[^?]*")
  local key = method .. " " .. p
  local name = ep_cache[key]
  if name then return name, key end
  local out, n, prev = { method, " " }, 0, nil
  for seg in p:gmatch("[^/]+") do
    n = n + 1
    if n > MAX_SEGMENTS then
      out[#out + 1] = "/..."
      break
    end
    out[#out + 1] = "/"
    local word = WORDS[seg] and not (prev and ID_AFTER[prev])
    out[#out + 1] = word and seg or "{}"
    prev = word and seg or nil
  end
  name = table.concat(out)
  -- the cache keys hold ids: bounded, dropped when full
  if ep_cached >= 512 then ep_cache, ep_cached = {}, 0 end
  ep_cache[key], ep_cached = name, ep_cached + 1
  return name, key
end

------------------------------------------------------------ counting

local calls = metrics.counter("paygate_wechatpay_calls_total",
  "Calls to WeChat Pay by endpoint, outcome and error kind (retries "
  .. "inside one call count once).", { "endpoint", "outcome", "kind" },
  { max_series = 256 })
_M.calls = calls

-- Bounds for a call's seconds: 10 ms (a local answer) to 30 s (the
-- default deadline; its attempts' timeouts 10 s).
_M.DURATION_BUCKETS = { 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                        20, 30 }
local durations = metrics.histogram("paygate_wechatpay_call_duration_seconds",
  "Time of calls to WeChat Pay that made an attempt, by endpoint (retries "
  .. "and their waits included).", { "endpoint" },
  { buckets = _M.DURATION_BUCKETS, max_series = 40 })
_M.durations = durations

local KNOWN = {}
for _, k in ipairs(errors.KINDS) do KNOWN[k] = true end

-- transport kinds that mean "no answer from WeChat"
local UNAVAILABLE = { connect = true, dns = true, closed = true,
                      aborted = true }
local OWN = { timeout = true, tls = true, circuit_open = true,
              degraded = true, unknown_outcome = true,
              unverified_response = true, invalid_params = true,
              body_too_large = true, header_too_large = true }

-- Outcomes that judge another failure: their kind label is that
-- failure's (err.cause_kind: a timeout or a connection lost after
-- sending, a signature that did not verify), which the outcome alone hid.
local VERDICT = { unknown_outcome = true, unverified_response = true }

--- syntax: outcome, kind = upstream.outcome(res, err)
-- returns: the labels of a call's result: outcome ok, http_4xx,
-- http_5xx, timeout, unavailable (connect, dns, reset), tls,
-- circuit_open, degraded, unknown_outcome, unverified_response,
-- invalid_params, body_too_large, header_too_large or error; kind:
-- err.kind when it is one of errors.KINDS (else "other"), "" for ok;
-- for unknown_outcome and unverified_response, the kind of the failure
-- that left the outcome unknown (err.cause_kind: timeout, closed, ...;
-- one of errors.KINDS, else "other"; the outcome's own without one).
function _M.outcome(res, err)
  if res then return "ok", "" end
  local kind = type(err) == "table" and err.kind or nil
  local k = KNOWN[kind] and kind or "other"
  local status = type(err) == "table" and err.status or nil
  if type(status) == "number" and status >= 400 and kind ~= "unknown_outcome"
     and kind ~= "unverified_response" then
    return status >= 500 and "http_5xx" or "http_4xx", k
  end
  if UNAVAILABLE[kind] then return "unavailable", k end
  if VERDICT[kind] and err.cause_kind ~= nil then
    return kind, KNOWN[err.cause_kind] and err.cause_kind or "other"
  end
  if OWN[kind] then return kind, k end
  return "error", k
end

-- one labels table for every call: inc reads it at once (no yield)
local labels = {}

local ep_labels = {}

--- syntax: upstream.count(endpoint, res, err[, seconds]) -- one call's
-- result; seconds: its time, when it made an attempt (a call refused
-- before trying -- degraded, circuit_open, invalid_params -- has none)
function _M.count(endpoint, res, err, seconds)
  local outcome, kind = _M.outcome(res, err)
  labels[1], labels[2], labels[3] = endpoint, outcome, kind
  calls:inc(labels)
  if seconds then
    ep_labels[1] = endpoint
    durations:observe(seconds, ep_labels)
  end
end

--------------------------------------------------------- degradation

local function dict_of(v)
  if type(v) == "string" or v == nil then
    local certs = require "paygate.wechatpay.certs"
    local d, why = certs.shared_dict(v or "paygate")
    if not d then error("wechatpay.degrade: " .. tostring(why), 3) end
    return d
  end
  return v
end

--- syntax: upstream.set_degraded(on[, dict]) -- dict: a shared dict or
-- its name (default "paygate"); every client on that dict, every worker
function _M.set_degraded(on, dict)
  if type(on) ~= "boolean" then
    error("wechatpay.degrade: on must be a boolean", 3)
  end
  local d = dict_of(dict)
  local ok, err = d:set(DEGRADED_KEY, on)
  if not ok then return nil, err end
  return true
end

--- syntax: on = upstream.degraded(dict_or_name)
function _M.degraded(dict)
  local d = dict_of(dict)
  return d:get(DEGRADED_KEY) == true
end

-- A client's start value: written unless a value is there already (a
-- worker that starts later must not undo the admin's switch).
function _M.init(wx)
  local c = wx.conf
  wx.upstream = { eps = {}, keys = {} }
  if not wx.dict then
    -- no shared dict: this worker's own state (documented)
    local t = {}
    wx.updict = {
      get = function(_, k)
        local e = t[k]
        if e and e[2] and e[2] <= core.mono() then t[k] = nil; return nil end
        return e and e[1]
      end,
      set = function(_, k, v, ttl)
        t[k] = v ~= nil and { v, ttl and ttl > 0 and core.mono() + ttl }
               or nil
        return true
      end,
      add = function(self, k, v, ttl)
        if self:get(k) ~= nil then return nil, "exists" end
        return self:set(k, v, ttl)
      end,
      incr = function(self, k, by, init, ttl)
        local v = self:get(k)
        if v == nil then
          if init == nil then return nil, "not found" end
          self:set(k, init + by, ttl)
          return init + by
        end
        t[k][1] = v + by
        return v + by
      end,
      delete = function(_, k) t[k] = nil; return true end,
    }
  else
    wx.updict = wx.dict
  end
  if c.degraded ~= nil then wx.updict:add(DEGRADED_KEY, c.degraded) end
end

------------------------------------------------------------ timeouts

local function ep_state(wx, ep)
  local s = wx.upstream.eps[ep]
  if not s then
    s = { ring = {}, sorted = {}, n = 0, i = 0, since = 0, timeout = nil,
          p95 = nil }
    wx.upstream.eps[ep] = s
  end
  return s
end

--- syntax: t = upstream.adaptive_timeout(p95, floor, ceiling)
function _M.adaptive_timeout(p95, lo, hi)
  return min(hi, max(lo, p95 * 1.8 + 0.2))
end

local function recompute(wx, s)
  local c = wx.conf
  local n = s.n
  -- a copy to sort, kept between computations (n only grows: every slot
  -- is written again)
  local a = s.sorted
  for i = 1, n do a[i] = s.ring[i] end
  sort(a)
  s.p95 = a[max(1, ceil(n * 0.95))]
  s.timeout = _M.adaptive_timeout(s.p95, c.timeout_floor, c.timeout_ceiling)
  s.since = 0
end

--- syntax: upstream.observe(wx, ep, seconds) -- an attempt's answer time
function _M.observe(wx, ep, seconds)
  local c = wx.conf
  local s = ep_state(wx, ep)
  local cap = c.latency_window
  s.i = s.i % cap + 1
  s.ring[s.i] = seconds
  if s.n < cap then s.n = s.n + 1 end
  s.since = s.since + 1
  if s.n >= c.timeout_samples
     and (s.timeout == nil or s.since >= max(RECOMPUTE, floor(cap / 10))) then
    recompute(wx, s)
  end
end

--- syntax: t, source = upstream.timeout(wx, ep)
-- returns: the seconds for the next attempt, and where they come from:
-- "adaptive" (the endpoint's recent answers) or "configured" (`timeout`)
function _M.timeout(wx, ep)
  local c = wx.conf
  if not c.adaptive_timeout then return c.timeout, "configured" end
  local s = wx.upstream.eps[ep]
  if s and s.timeout then return s.timeout, "adaptive" end
  return c.timeout, "configured"
end

------------------------------------------------------------ breaker

-- The breaker's dict keys of endpoint ep, made once per client and
-- endpoint (not per attempt): k (the prefix), s (state), at (opened at),
-- p (the probe), and the counters' keys of bucket b (c, f), remade when
-- the bucket changes.
-- The endpoints with a breaker, listed in the dict, so status() names
-- every breaker of the instance, not only those of endpoints the asking
-- worker called: one key, "<prefix>cb:eps", holds them ("\n" before and
-- after each name). The dict is LRU and nothing reads the key on a call:
-- it may be evicted. So an endpoint is checked in it, and added again
-- when missing, not only when a worker first meets it but each time a
-- worker's attempt starts a new bucket of its breaker's counts (once per
-- breaker_window per endpoint, no dict write on other calls) and when its
-- breaker opens. (Two workers adding at the same moment may lose one
-- name; its next check adds it again.)
local REGISTRY_MAX = 16384       -- bytes of names: some 300 endpoints

local function register(wx, ep)
  local d = wx.updict
  local key = (wx.key_prefix or "wechatpay:") .. "cb:eps"
  local list = d:get(key)
  if type(list) ~= "string" then list = "\n" end
  if not list:find("\n" .. ep .. "\n", 1, true)
     and #list + #ep < REGISTRY_MAX then
    d:set(key, list .. ep .. "\n")
  end
end

local function bkeys(wx, ep)
  local ks = wx.upstream.keys[ep]
  if not ks then
    local k = (wx.key_prefix or "wechatpay:") .. "cb:" .. ep .. ":"
    ks = { k = k, s = k .. "s", at = k .. "at", p = k .. "p" }
    wx.upstream.keys[ep] = ks
    register(wx, ep)
  end
  return ks
end

local function bucket_keys(ks, b)
  if ks.b ~= b then
    ks.b, ks.c, ks.f = b, ks.k .. "c" .. b, ks.k .. "f" .. b
  end
  return ks.c, ks.f
end

local function window_counts(d, k, c, now)
  local w = c.breaker_window
  local b = floor(now / w)
  local frac = now / w - b
  local calls_now = d:get(k .. "c" .. b) or 0
  local fails_now = d:get(k .. "f" .. b) or 0
  local calls_prev = d:get(k .. "c" .. (b - 1)) or 0
  local fails_prev = d:get(k .. "f" .. (b - 1)) or 0
  -- the sliding window: all of this bucket, the part of the last one
  -- still inside it
  return calls_now + calls_prev * (1 - frac),
         fails_now + fails_prev * (1 - frac), b
end

--- syntax: ok, probe, retry_after = upstream.allow(wx, ep)
-- ok false: fail fast (retry_after seconds until a probe may go).
function _M.allow(wx, ep)
  local c = wx.conf
  if not c.breaker then return true end
  local d = wx.updict
  local ks = bkeys(wx, ep)
  local st = d:get(ks.s)
  if st == nil then return true end
  local now = core.mono()
  local wait = (d:get(ks.at) or 0) + c.breaker_open_for - now
  if wait > 0 then return false, false, wait end
  -- the cool-down is over: one probe at a time (its key expires if the
  -- worker holding it dies)
  if d:add(ks.p, true, c.timeout_ceiling + c.breaker_open_for) then
    d:set(ks.s, "half_open")
    return true, true
  end
  return false, false, min(1, c.breaker_open_for)   -- a probe is out
end

local function open(wx, ep, ks, d, now)
  d:set(ks.at, now)
  d:set(ks.s, "open")
  d:delete(ks.p)
  register(wx, ep)               -- (listed while open, evicted or not)
  config.logger(wx.conf).warn("wechatpay: circuit opened", { endpoint = ep,
    mchid = wx.conf.mchid, open_for = wx.conf.breaker_open_for })
end

--- syntax: upstream.record(wx, ep, failed, probe) -- an attempt's result
function _M.record(wx, ep, failed, probe)
  local c = wx.conf
  if not c.breaker then return end
  local d = wx.updict
  local ks = bkeys(wx, ep)
  local now = core.mono()
  if probe then
    if failed then
      open(wx, ep, ks, d, now)
    else
      local k, b = ks.k, floor(now / c.breaker_window)
      for _, x in ipairs({ "s", "at", "p", "c" .. b, "f" .. b,
                           "c" .. (b - 1), "f" .. (b - 1) }) do
        d:delete(k .. x)
      end
      config.logger(wx.conf).info("wechatpay: circuit closed", {
        endpoint = ep, mchid = wx.conf.mchid })
    end
    return
  end
  local ck, fk = bucket_keys(ks, floor(now / c.breaker_window))
  local ttl = 2 * c.breaker_window + 1
  if d:incr(ck, 1, 0, ttl) == 1 then
    register(wx, ep)             -- a new bucket: still listed?
  end
  if not failed then return end
  d:incr(fk, 1, 0, ttl)
  local n, f = window_counts(d, ks.k, c, now)
  if n >= c.breaker_min_calls and f / n >= c.breaker_failure_ratio
     and d:get(ks.s) == nil then
    open(wx, ep, ks, d, now)
  end
end

--- syntax: upstream.release(wx, ep) -- a probe that was never sent
-- gives its turn back
function _M.release(wx, ep)
  wx.updict:delete(bkeys(wx, ep).p)
end

--- syntax: err = upstream.circuit_open_error(what, retry_after[, ep])
-- err.endpoint: ep, the endpoint whose breaker refused the call (e.g.
-- for the reconciliation to hold that merchant's queries, not its other
-- calls)
function _M.circuit_open_error(what, retry_after, ep)
  return errors.new("circuit_open", what .. ": circuit open (too many "
    .. "recent failures at this endpoint); not sent", {
      retryable = true, retry_after = retry_after, endpoint = ep })
end

--- syntax: err = upstream.degraded_error(what)
function _M.degraded_error(what)
  return errors.new("degraded", what .. ": calls to WeChat Pay are "
    .. "switched off (degraded mode); not sent", { retryable = true })
end

-- The endpoints with a breaker: every one any worker's client on the
-- dict registered, and those this worker called (a set).
local function known_endpoints(wx)
  local d = wx.updict
  local eps = {}
  for ep in pairs(wx.upstream.eps) do eps[ep] = true end
  local list = d:get((wx.key_prefix or "wechatpay:") .. "cb:eps")
  if type(list) == "string" then
    for ep in list:gmatch("[^\n]+") do eps[ep] = true end
  end
  return eps
end

-- One breaker as the instance shares it: { breaker, calls, failures,
-- retry_after (open only) }.
local function breaker_of(wx, ep, now)
  local c = wx.conf
  local d = wx.updict
  local ks = bkeys(wx, ep)
  local n, f = window_counts(d, ks.k, c, now)
  local st = d:get(ks.s) or "closed"
  -- (the previous bucket weighed by its overlap: one decimal)
  local e = { breaker = st, calls = floor(n * 10 + 0.5) / 10,
              failures = floor(f * 10 + 0.5) / 10 }
  if st == "open" then
    local left = (d:get(ks.at) or 0) + c.breaker_open_for - now
    e.retry_after = max(0, floor(left * 10 + 0.5) / 10)
  end
  return e
end

--- syntax: bs = upstream.breakers(wx)
-- returns: { [endpoint] = { breaker = "closed" | "open" | "half_open",
-- retry_after, calls, failures } }: the instance's breakers (every
-- endpoint any client on the shared dict called), read from the dict
-- only (no latency work: cheap enough to read every second)
function _M.breakers(wx)
  local now = core.mono()
  local out = {}
  for ep in pairs(known_endpoints(wx)) do
    out[ep] = breaker_of(wx, ep, now)
  end
  return out
end

--- syntax: st = upstream.status(wx)
-- returns: { degraded, endpoints = { [endpoint] = { timeout,
-- timeout_source = "adaptive" | "configured", p95, samples, breaker =
-- "closed" | "open" | "half_open", retry_after, calls, failures } } }:
-- this worker's latency view (endpoints it called), the instance's
-- breaker view (every endpoint any worker called: upstream.breakers).
-- retry_after: for an open breaker, the seconds until a call may go
-- through as its probe (0: the next call is the probe).
function _M.status(wx)
  local c = wx.conf
  local d = wx.updict
  local out = { degraded = d:get(DEGRADED_KEY) == true, endpoints = {} }
  local now = core.mono()
  for ep in pairs(known_endpoints(wx)) do
    local s = wx.upstream.eps[ep]
    if s and s.since > 0 and s.n >= c.timeout_samples then
      recompute(wx, s)
    end
    local e = breaker_of(wx, ep, now)
    local t, source = _M.timeout(wx, ep)
    e.timeout, e.timeout_source = t, source
    e.p95, e.samples = s and s.p95, s and s.n or 0
    out.endpoints[ep] = e
  end
  return out
end

return _M
