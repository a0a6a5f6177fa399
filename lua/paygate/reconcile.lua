-- paygate.reconcile: the lost-notification fallback and the daily bill.
-- Generic: it knows no table of the app. The app passes functions (which
-- rows are due, how to reschedule one, which local rows a day holds) and
-- its paygate.fsm machines; this module decides what WeChat's answers
-- mean and applies it through the machine, fenced by a paygate.lease.
--
--   local s = reconcile.schedule{ first = 30, factor = 2, ceiling = 3600 }
--   s:next(now, checks)                 -- when to look again
--   s:retry_delay(checks + 1, err)      -- WeChat did not answer
--                                       -- (reconcile.unanswered(err)):
--                                       -- again soon, checks unchanged
--
--   local r = reconcile.runner(db, { name = "payments",
--     due = function(now, limit) return rows end,
--     check = function(row, ctx) ... end,       -- ctx.fence(tx)
--     reschedule = function(row, err, ctx) ... end,
--     group = function(row) return row.mchid end,    -- optional: a
--     hold = function(row, err) return secs end })   -- refusal holds
--                                                    -- its group
--   r:start()                                    -- or r:step() in specs
--
--   local action = reconcile.check_payment(wx, row)  -- what WeChat says
--   reconcile.apply(db, payments, action, { fence = ctx.fence,
--     schedule = function(tx, action, res) ... end })
--
--   reconcile.refund_limit(paid, refunds, amount)  -- nil, refund_exceeds_paid
--                                                  -- or refund_limit (50)
--   reconcile.daily_bill{ ... }                    -- paygate.reconcile.bill
--
-- Failures: nil, err (core.error). Misuse raises at the caller.

local core = require "paygate.core"
local lease = require "paygate.lease"
local fsm = require "paygate.fsm"
local bill = require "paygate.reconcile.bill"

local type, pairs, ipairs, tostring, error, setmetatable, pcall, next =
      type, pairs, ipairs, tostring, error, setmetatable, pcall, next
local floor, min, max, huge = math.floor, math.min, math.max, math.huge

local _M = { _VERSION = "0.1.0" }

local function log()
  local ok, paygate = pcall(require, "paygate")
  return ok and paygate.log or nil
end

local function warn(msg, fields)
  local l = log()
  if l then
    l.warn(msg, fields)
  end
end

local function fail(kind, message, fields)
  fields = fields or {}
  if fields.retryable == nil then
    fields.retryable = false
  end
  return nil, core.error(kind, message, fields)
end

------------------------------------------------------------- counters

-- Per worker process, like paygate.fsm's (reconcile.stats()).
local counters = {
  checks = 0, applied = 0, unchanged = 0, errors = 0, closed_by_us = 0,
  abnormal = 0, alarms = 0, skipped = 0,
}

local function count(k, n)
  counters[k] = counters[k] + (n or 1)
end

-- syntax: t = reconcile.stats()
-- returns: a copy of this process's counters: checks, applied, unchanged,
-- errors, closed_by_us, abnormal, alarms, skipped (state moved meanwhile)
function _M.stats()
  local t = {}
  for k, v in pairs(counters) do
    t[k] = v
  end
  return t
end

------------------------------------------------------------- schedule

local Schedule = {}
Schedule.__index = Schedule

local JITTER = { full = true, equal = true, none = true }

local function positive(fname, o, k, default)
  local v = o[k]
  if v == nil then
    return default
  end
  if type(v) ~= "number" or not (v > 0) or v == huge then
    error(fname .. ": opts." .. k .. " must be a positive number", 3)
  end
  return v
end

-- syntax: s = reconcile.schedule([opts])
-- opts: first (s, 30: the ceiling of the first delay), factor (2), ceiling
-- (s, 3600: no delay above it), retry (s, 60: the ceiling of the wait
-- after a try WeChat did not answer, s:retry_delay), jitter ("full":
-- uniform in [0, d); "equal": [d/2, d); "none": d), random (function ->
-- [0, 1), default math.random; inject one for specs).
-- Delay of check n (n = 1, 2, ...): d = min(ceiling, first * factor^(n-1)),
-- then the jitter.
function _M.schedule(opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("reconcile.schedule: opts must be a table", 2)
  end
  opts = opts or {}
  local s = setmetatable({
    first = positive("reconcile.schedule", opts, "first", 30),
    factor = positive("reconcile.schedule", opts, "factor", 2),
    ceiling = positive("reconcile.schedule", opts, "ceiling", 3600),
    retry = positive("reconcile.schedule", opts, "retry", 60),
    jitter = opts.jitter or "full",
    random = opts.random or math.random,
  }, Schedule)
  if s.factor < 1 then
    error("reconcile.schedule: opts.factor must be at least 1", 2)
  end
  if not JITTER[s.jitter] then
    error("reconcile.schedule: opts.jitter must be full, equal or none", 2)
  end
  if type(s.random) ~= "function" then
    error("reconcile.schedule: opts.random must be a function", 2)
  end
  return s
end

-- syntax: d = s:ceiling_of(n) -- the delay before jitter for check n
function Schedule:ceiling_of(n)
  if type(n) ~= "number" or n ~= n then
    error("schedule:delay: n must be a number", 3)
  end
  n = max(1, floor(n))
  -- factor^(n-1) overflows to inf for huge n: min() keeps the ceiling
  return min(self.ceiling, self.first * self.factor ^ (n - 1))
end

local function jittered(self, d)
  if self.jitter == "none" then
    return d
  end
  local r = self.random()
  if type(r) ~= "number" or r < 0 or r >= 1 then
    r = 0
  end
  if self.jitter == "equal" then
    return d / 2 + r * d / 2
  end
  return r * d
end

-- syntax: seconds = s:delay(n)
-- The delay before check n (n counts the checks already made + 1).
function Schedule:delay(n)
  return jittered(self, self:ceiling_of(n))
end

-- syntax: seconds = s:retry_delay(n[, err])
-- The wait before check n is tried again after a try that WeChat did not
-- answer (reconcile.unanswered(err): its circuit breaker open, no
-- connection, a timeout, a 5xx, a 429): such a try is no check, so n
-- stays what it was and the wait does not grow with an outage. It is
-- min(retry, s:ceiling_of(n)) jittered as delay is, after err.retry_after
-- when the error has one (an open breaker's cool-down left, a
-- Retry-After; at most ceiling): once WeChat answers again, a row is
-- asked within about retry seconds, the breaker's half-open probe first.
function Schedule:retry_delay(n, err)
  local wait = type(err) == "table" and err.retry_after
  if type(wait) ~= "number" or not (wait > 0) then
    wait = 0
  end
  return min(wait, self.ceiling)
         + jittered(self, min(self.retry, self:ceiling_of(n)))
end

-- syntax: t = s:next(now, n) -- now + s:delay(n)
function Schedule:next(now, n)
  if type(now) ~= "number" then
    error("schedule:next: now must be a number", 2)
  end
  return now + self:delay(n)
end

-- What a failed try's error says of WeChat's answer: none. The request
-- was not sent (the circuit breaker open, the degradation switch on, no
-- connection, DNS, TLS) or no answer came (a timeout, a connection lost
-- after sending, an unknown outcome), or WeChat failed it without a word
-- on the order (a 5xx, SYSTEM_ERROR, a 429 FREQUENCY_LIMITED). An answer
-- (NOTPAY, ORDER_NOT_EXIST, a 4xx refusal, a body that does not verify)
-- is none of these.
local UNANSWERED = { circuit_open = true, degraded = true, connect = true,
  dns = true, tls = true, closed = true, timeout = true,
  unknown_outcome = true, system_error = true, frequency_limited = true }

-- syntax: yes = reconcile.unanswered(err)
-- Whether a check failed because WeChat could not be asked or did not
-- answer (see UNANSWERED above; also any status of 500 and up, or 429,
-- not marked retryable = false). Such a try is no check: the app retries
-- it after s:retry_delay(n, err), its count of checks unchanged.
function _M.unanswered(err)
  if type(err) ~= "table" then
    return false
  end
  if UNANSWERED[err.kind] then
    return true
  end
  local st = err.status
  return type(st) == "number" and (st >= 500 or st == 429)
         and err.retryable ~= false
end

--------------------------------------------------------------- runner

local Runner = {}
Runner.__index = Runner

local RUNNER_DEFAULTS = {
  batch = 20,        -- items per round
  interval = 5,      -- s between rounds that found nothing (or no lease)
  lease_ttl = 60,    -- s; must exceed the longest single check
}
-- every option runner() takes
local RUNNER_OPTS = { name = true, due = true, check = true,
  reschedule = true, measure = true, now = true, batch = true,
  interval = true, lease_ttl = true, group = true, hold = true }

-- syntax: r = reconcile.runner(store, opts)
-- store: a paygate.sql db or paygate.redis client for the lease.
-- opts: name (lease key "reconcile:<name>"), due = fn(now, limit) ->
--   items | nil, err; check = fn(item, ctx) -> result | nil, err;
--   reschedule = fn(item, err, ctx) (called after a failed or raising
--   check, so the item is not due again at once); batch, interval,
--   lease_ttl (s, or a function returning s, asked at each acquire and
--   renewal: e.g. derived from measured check durations); measure =
--   fn(seconds) (each check's duration); now (fn -> s, default core.time)
--   for specs; group = fn(item) -> key | nil and hold = fn(item, err) ->
--   seconds | nil (both or neither): a check not done yet (false, err)
--   for which hold answers a number holds the item's group that long
--   (see Runner:step).
-- ctx = { key, token, lease, fence = fn(tx) -> true | nil, err
--   (lease.check inside the caller's transaction), keepalive = fn() ->
--   true | nil, err (renews the lease when half spent) }.
-- Between items the runner yields (core.sleep(0)), so a batch never
-- holds the loop; a lost lease ends the round.
function _M.runner(store, opts)
  if type(opts) ~= "table" then
    error("reconcile.runner: opts must be a table", 2)
  end
  if type(store) ~= "table" and type(store) ~= "userdata" then
    error("reconcile.runner: store must be a paygate.sql db or a"
          .. " paygate.redis client", 2)
  end
  if type(opts.name) ~= "string" or opts.name == "" then
    error("reconcile.runner: opts.name must be a non-empty string", 2)
  end
  -- a misspelt option (intervall) would run at the default unsaid: as
  -- the outbox's dispatcher and retention do, an unknown one raises
  for k in pairs(opts) do
    if RUNNER_OPTS[k] == nil then
      error("reconcile.runner: unknown option opts." .. tostring(k), 2)
    end
  end
  for _, k in ipairs({ "due", "check" }) do
    if type(opts[k]) ~= "function" then
      error("reconcile.runner: opts." .. k .. " must be a function", 2)
    end
  end
  for _, k in ipairs({ "reschedule", "measure", "group", "hold" }) do
    if opts[k] ~= nil and type(opts[k]) ~= "function" then
      error("reconcile.runner: opts." .. k .. " must be a function", 2)
    end
  end
  if (opts.group == nil) ~= (opts.hold == nil) then
    error("reconcile.runner: opts.group and opts.hold go together", 2)
  end
  local ttl_fn = opts.lease_ttl
  if type(ttl_fn) == "function" then
    opts = setmetatable({ lease_ttl = false }, { __index = opts })
  else
    ttl_fn = nil
  end
  local r = setmetatable({
    store = store, name = opts.name, key = "reconcile:" .. opts.name,
    due = opts.due, check = opts.check, reschedule = opts.reschedule,
    measure = opts.measure, ttl_fn = ttl_fn, now = opts.now or core.time,
    group = opts.group, hold_for = opts.hold, held = {},
    stats = { rounds = 0, items = 0, ok = 0, waiting = 0, errors = 0,
              lease_busy = 0, lost = 0, held = 0, skipped = 0 },
  }, Runner)
  for k, v in pairs(RUNNER_DEFAULTS) do
    if k == "lease_ttl" and ttl_fn then
      r[k] = v
    else
      r[k] = positive("reconcile.runner", opts, k, v)
      if not core.is_seconds(r[k]) then
        -- the longest sleep the runtime takes: past it the runner's task
        -- would end on its first wait
        error("reconcile.runner: opts." .. k .. " must be at most 1e8", 2)
      end
    end
  end
  if r.batch % 1 ~= 0 then
    error("reconcile.runner: opts.batch must be a positive integer", 2)
  end
  return r
end

-- The lease's ttl: the configured number, or what opts.lease_ttl() says
-- now (e.g. derived from measured check durations); a bad answer keeps
-- the last good one.
function Runner:ttl()
  if self.ttl_fn then
    local ok, t = pcall(self.ttl_fn)
    if ok and type(t) == "number" and t > 0 and t < huge then
      self.lease_ttl = t
    end
  end
  return self.lease_ttl
end

-- A store that refuses the lease (a full disk, a read-only standby) does
-- so round after round, in every runner of every worker: its error is
-- logged once, then again only when it changes or LEASE_WARN_EVERY s
-- later, with how many rounds failed unsaid meanwhile (`repeated`).
local LEASE_WARN_EVERY = 60
local function lease_warn(self, err)
  local text, now = tostring(err), core.mono()
  local u = self.unsaid
  if u and u.text == text and now - u.at < LEASE_WARN_EVERY then
    u.n = u.n + 1
    return
  end
  warn("reconcile: lease", { name = self.name, error = text,
                             repeated = u and u.n > 0 and u.n or nil })
  self.unsaid = { text = text, at = now, n = 0 }
end

function Runner:hold()
  local l = self.lease
  if l and lease.remaining(l) > self.lease_ttl / 2 then
    return l
  end
  local ttl = self:ttl()
  if l then
    local ok, err = lease.renew(self.store, l, ttl)
    if ok then
      return l
    end
    self.lease = nil
    self.stats.lost = self.stats.lost + 1
    if err.kind ~= "lost" then
      warn("reconcile: lease renew", { name = self.name,
                                       error = tostring(err) })
    end
  end
  local nl, err = lease.acquire(self.store, self.key, ttl)
  if not nl then
    if err.kind == "held" then
      self.stats.lease_busy = self.stats.lease_busy + 1
    else
      lease_warn(self, err)
    end
    return nil, err
  end
  self.lease = nl
  self.unsaid = nil
  return nl
end

local function context(self, l)
  local key, token, store = self.key, l.token, self.store
  return {
    key = key, token = token, lease = l, runner = self,
    fence = function(tx)
      return lease.check(tx, key, token)
    end,
    keepalive = function()
      if self.lease ~= l then
        return fail("lost", "lease " .. key .. " was lost")
      end
      local held, err = self:hold()
      if held ~= l then
        return nil, err or core.error("lost", "lease " .. key
                                      .. " was lost")
      end
      return true
    end,
    store = store,
  }
end

-- reschedule(item, err, ctx), if given; a raise there is logged
local function reschedule(self, item, err, ctx)
  if self.reschedule then
    local rok, rerr = pcall(self.reschedule, item, err, ctx)
    if not rok then
      warn("reconcile: reschedule failed", { name = self.name,
                                             error = tostring(rerr) })
    end
  end
end

-- The groups held now (a list, for due), the expired ones dropped
local function held_groups(self, now)
  local list = {}
  for g, till in pairs(self.held) do
    if till <= now then
      self.held[g] = nil
    else
      list[#list + 1] = g
    end
  end
  table.sort(list, function(a, b) return tostring(a) < tostring(b) end)
  return list
end

-- The item's group when the runner has groups (nil: none, or group
-- raised)
local function group_of(self, item)
  if not self.group then return nil end
  local ok, g = pcall(self.group, item)
  if ok then return g end
  return nil
end

-- syntax: n, err = r:step()
-- One round: take (or keep) the lease, ask due(now, batch, held), check
-- each item in turn. A check that fails or raises is logged and counted,
-- and reschedule(item, err, ctx) is called; the round goes on. A check
-- that returns false, why is not done yet and nothing failed (a bill
-- WeChat has not made yet): counted as waiting, not logged (the check
-- says what it needs to), and rescheduled the same way -- unless hold
-- (item, why) answers seconds (WeChat's circuit breaker refused the
-- item's query, nothing sent): then the item's group is held that long
-- (at least the rest of the round), the item is left as it is (no
-- reschedule: still due, the first asked once the hold is over), and
-- the round skips the group's other items, untouched (stats.skipped);
-- due's third argument lists the groups held, for it to leave out.
-- returns: the number of items checked, the ones refused and held or
-- skipped left out: a round with a hold is never "full", so start waits
-- its interval after it (0 without the lease: nil, err)
-- yields
function Runner:step()
  self.stats.rounds = self.stats.rounds + 1
  local l, lerr = self:hold()
  if not l then
    return 0, lerr
  end
  local now = self.now()
  local ok, items, derr = pcall(self.due, now, self.batch,
                                self.group and held_groups(self, now) or nil)
  if not ok or not items then
    self.stats.errors = self.stats.errors + 1
    warn("reconcile: due", { name = self.name,
                             error = tostring(ok and derr or items) })
    return 0, ok and derr or core.error("internal", tostring(items))
  end
  local ctx = context(self, l)
  local n = 0
  local held, this_round = self.held, {}
  for _, item in ipairs(items) do
    if self.stopping or self.lease ~= l then
      break
    end
    local g = group_of(self, item)
    if g ~= nil and (this_round[g] or (held[g] and held[g] > self.now()))
    then
      self.stats.skipped = self.stats.skipped + 1
      goto continue
    end
    n = n + 1
    self.stats.items = self.stats.items + 1
    local t0 = core.mono()
    local pok, res, err = pcall(self.check, item, ctx)
    if self.measure then
      pcall(self.measure, core.mono() - t0)
    end
    local secs
    if pok and res == false and g ~= nil then
      local hok, h = pcall(self.hold_for, item, err)
      if hok and type(h) == "number" and h == h then
        secs = min(max(h, 0), 1e8)
      end
    end
    if secs then
      -- held: the item left due, the group's others skipped
      n = n - 1
      self.stats.waiting = self.stats.waiting + 1
      self.stats.held = self.stats.held + 1
      held[g] = self.now() + secs
      this_round[g] = true
    elseif pok and res == false then
      self.stats.waiting = self.stats.waiting + 1
      reschedule(self, item, err, ctx)
    elseif pok and res ~= nil then
      self.stats.ok = self.stats.ok + 1
    else
      err = pok and err or core.error("internal", tostring(res))
      self.stats.errors = self.stats.errors + 1
      count("errors")
      warn("reconcile: check failed", { name = self.name,
                                        error = tostring(err) })
      reschedule(self, item, err, ctx)
    end
    -- let requests run between items; renew when half the lease is spent
    core.sleep(0)
    if lease.remaining(l) < self.lease_ttl / 2 then
      ctx.keepalive()
    end
    ::continue::
  end
  return n
end

-- syntax: r = r:start()
-- Rounds in a task until r:stop(): the next at once after a full batch
-- (of checks: a round with a hold is none), after `interval` seconds
-- otherwise.
function Runner:start()
  if self.task then
    return self
  end
  self.stopping = false
  self.task = core.spawn(function()
    while not self.stopping do
      local ok, n = pcall(self.step, self)
      if not ok then
        self.stats.errors = self.stats.errors + 1
        warn("reconcile: round failed", { name = self.name,
                                          error = tostring(n) })
        n = 0
      end
      if not self.stopping and (n or 0) < self.batch then
        core.sleep(self.interval)
      end
    end
  end)
  return self
end

-- syntax: r:stop() -- ends the task and releases the lease
-- yields: one statement
function Runner:stop()
  self.stopping = true
  if self.task then
    pcall(self.task.cancel, self.task)
    self.task = nil
  end
  local l = self.lease
  self.lease = nil
  if l then
    lease.release(self.store, l)
  end
end

------------------------------------------------------ payment checks

-- trade_state -> the event it means, by local state. A state missing from
-- a row means: nothing to apply from there.
local OPEN = { created = true, paying = true, unknown = true }
local PAID = { paid = true, partially_refunded = true, refunded = true }

-- syntax: event = reconcile.payment_event(local_state, trade_state)
-- returns: the fsm.payment event WeChat's trade_state means for a row in
-- local_state, or nil (nothing to apply: still open, or already there).
--   SUCCESS, REFUND (paid, then refunded)  -> succeeded (unless paid)
--   NOTPAY, USERPAYING, ACCEPT             -> still_open from unknown
--   CLOSED, REVOKED                        -> closed from an open state
--   PAYERROR                               -> failed from an open state
function _M.payment_event(state, trade_state)
  if trade_state == "SUCCESS" or trade_state == "REFUND" then
    if PAID[state] then
      return nil
    end
    return "succeeded"
  elseif trade_state == "NOTPAY" or trade_state == "USERPAYING"
         or trade_state == "ACCEPT" then
    return state == "unknown" and "still_open" or nil
  elseif trade_state == "CLOSED" or trade_state == "REVOKED" then
    return OPEN[state] and "closed" or nil
  elseif trade_state == "PAYERROR" then
    return OPEN[state] and "failed" or nil
  end
  return nil
end

local KNOWN_TRADE = {
  SUCCESS = true, REFUND = true, NOTPAY = true, USERPAYING = true,
  ACCEPT = true, CLOSED = true, REVOKED = true, PAYERROR = true,
}

local function client_for(fname, wx, item)
  if type(wx) == "function" then
    wx = wx(item)
  end
  if wx == nil or (type(wx) ~= "table" and type(wx) ~= "userdata") then
    error(fname .. ": wx must be a paygate.wechatpay client or a function"
          .. " of the item returning one", 3)
  end
  return wx
end

local function check_item(fname, item, key)
  if type(item) ~= "table" then
    error(fname .. ": item must be a table", 3)
  end
  if type(item.id) ~= "string" and type(item.id) ~= "number" then
    error(fname .. ": item.id must be a string or number", 3)
  end
  if type(item[key]) ~= "string" then
    error(fname .. ": item." .. key .. " must be a string", 3)
  end
end

local function sub_mchid(item)
  local s = item.sub_mchid
  if s == nil or s == core.null or s == "" then
    return nil
  end
  return s
end

-- The error of a query answer naming another order (refund) than the one
-- asked about: a retryable bad_response, nothing applied (what: "payment"
-- or "refund", the item's kind; names: "order" or "refund").
local function answer_about_other(what, id, names, got, want)
  return fail("bad_response", "reconcile: " .. what .. " " .. tostring(id)
              .. ": WeChat's answer names " .. names .. " "
              .. tostring(got):sub(1, 64) .. ", not " .. want,
              { retryable = true })
end

-- syntax: t = reconcile.answered_at(meta)
-- meta: a WeChat Pay call's second value on success. returns: WeChat's
-- clock when it answered (the answer's signed Wechatpay-Timestamp, epoch
-- s), or nil when meta has none. How long after WeChat's success_time a
-- query found a payment is measured on it: both ends on WeChat's clock,
-- whatever this host's is.
function _M.answered_at(meta)
  local h = type(meta) == "table" and meta.headers
  local t = type(h) == "table" and tonumber(h["wechatpay-timestamp"])
  return t and t == t and t ~= math.huge and t ~= -math.huge and t or nil
end

-- syntax: action, err = reconcile.check_payment(wx, item[, opts])
-- item: { id, state, out_trade_no, sub_mchid?, amount? (fen: compared
--   with WeChat's total), expires_at? (epoch s) }; wx: a client or fn(item)
-- opts: now (s, default core.time()), close_expired (default true)
-- Queries WeChat (wx:query_by_out_trade_no, with sub_mchid in partner
-- mode). An open payment still NOTPAY past expires_at is closed through
-- wx:close first and then means `closed`; a close refused ORDER_PAID
-- (paid in between) is followed by a second query at once, whose SUCCESS
-- is the action. An order WeChat does not know
-- (ORDER_NOT_EXIST, remote = "ORDER_NOT_EXIST") means nothing before its
-- expiry (asked too early) and `closed` after it: nobody can pay it.
-- returns: action = { kind = "payment", id, out_trade_no, state (local),
--   remote (trade_state), answered_at (WeChat's clock at its answer, or
--   nil: reconcile.answered_at), event (or nil: nothing to apply), closed_by_us,
--   alarm ("amount_mismatch": WeChat's total differs; no event), set
--   (transaction_id, payer_total), evidence, transaction (WeChat's) }
--   or nil, err (the query's or the close's error: reschedule)
-- yields: one or two WeChat calls
function _M.check_payment(wx, item, opts)
  check_item("reconcile.check_payment", item, "out_trade_no")
  wx = client_for("reconcile.check_payment", wx, item)
  opts = opts or {}
  local now = opts.now or core.time()
  local sub = sub_mchid(item)
  count("checks")
  local txn, err = wx:query_by_out_trade_no(item.out_trade_no, sub)
  local expired = type(item.expires_at) == "number"
                  and now >= item.expires_at
  local action = { kind = "payment", id = item.id, state = item.state,
                   out_trade_no = item.out_trade_no,
                   evidence = { out_trade_no = item.out_trade_no,
                                sub_mchid = sub } }
  if not txn then
    if err.kind == "not_found" then
      -- never created at WeChat, or a moment ago: nothing to apply yet;
      -- past its expiry nobody can pay it any more
      action.remote = "ORDER_NOT_EXIST"
      action.evidence.trade_state = "ORDER_NOT_EXIST"
      if expired and OPEN[item.state] then
        action.event = "closed"
      end
      return action
    end
    return nil, err
  end
  -- (on success the second value is the answer's meta)
  action.answered_at = _M.answered_at(err)
  -- the answer is about the order asked for (signed, yet an outside
  -- input: one about another order would be applied to this payment)
  if txn.out_trade_no ~= item.out_trade_no then
    return answer_about_other("payment", item.id, "order", txn.out_trade_no,
                              item.out_trade_no)
  end
  local ts = txn.trade_state
  if not KNOWN_TRADE[ts] then
    return fail("bad_response", "reconcile: payment " .. tostring(item.id)
                .. ": unexpected trade_state " .. tostring(ts),
                { retryable = true })
  end
  action.remote, action.transaction = ts, txn
  action.evidence.trade_state = ts
  action.evidence.transaction_id = txn.transaction_id
  if ts == "NOTPAY" and expired and OPEN[item.state]
     and opts.close_expired ~= false then
    local ok, cerr = wx:close(item.out_trade_no, sub)
    if not ok and cerr.kind == "order_paid" then
      -- paid in the moment between the query and the close (the payer
      -- paying as it expired): asked again now and applied in this
      -- check, not left to the next one on the backoff (up to its
      -- ceiling later, the notification perhaps lost). An answer still
      -- not paid (WeChat's views apart a moment) is the close's error.
      local again, qerr = wx:query_by_out_trade_no(item.out_trade_no, sub)
      if not again then
        return nil, qerr
      end
      if again.out_trade_no ~= item.out_trade_no then
        return answer_about_other("payment", item.id, "order",
                                  again.out_trade_no, item.out_trade_no)
      end
      if again.trade_state ~= "SUCCESS" and again.trade_state ~= "REFUND" then
        return nil, cerr
      end
      txn, ts = again, again.trade_state
      action.answered_at = _M.answered_at(qerr)
      action.remote, action.transaction = ts, txn
      action.evidence.trade_state = ts
      action.evidence.transaction_id = txn.transaction_id
      action.evidence.close = "order_paid"
    elseif not ok then
      return nil, cerr
    else
      count("closed_by_us")
      action.closed_by_us = true
      action.remote = "CLOSED"
      action.evidence.trade_state = "CLOSED"
      action.evidence.closed_by = "reconcile"
    end
  end
  if ts == "SUCCESS" or ts == "REFUND" then
    local total = type(txn.amount) == "table" and txn.amount.total
    if type(item.amount) == "number" and total ~= item.amount then
      count("alarms")
      action.alarm = "amount_mismatch"
      action.evidence.expected = item.amount
      action.evidence.got = total
      return action
    end
    action.set = { transaction_id = txn.transaction_id,
                   payer_total = type(txn.amount) == "table"
                                 and txn.amount.payer_total or nil }
  end
  action.event = _M.payment_event(item.state, action.remote)
  return action
end

------------------------------------------------------- refund checks

local REFUND_DONE = { succeeded = true, closed = true, failed = true }

-- syntax: event = reconcile.refund_event(local_state, status)
-- returns: the fsm.refund event WeChat's refund status means for a row
-- in local_state, or nil (nothing to apply).
--   PROCESSING -> accepted from created / unknown
--   SUCCESS -> succeeded; CLOSED -> closed; ABNORMAL -> abnormal
function _M.refund_event(state, status)
  if REFUND_DONE[state] then
    return nil
  end
  if status == "PROCESSING" then
    return (state == "created" or state == "unknown") and "accepted" or nil
  elseif status == "SUCCESS" then
    return "succeeded"
  elseif status == "CLOSED" then
    return "closed"
  elseif status == "ABNORMAL" then
    return state ~= "abnormal" and "abnormal" or nil
  end
  return nil
end

local KNOWN_REFUND = { PROCESSING = true, SUCCESS = true, CLOSED = true,
                       ABNORMAL = true }

-- syntax: action, err = reconcile.check_refund(wx, item)
-- item: { id, state, out_refund_no, sub_mchid? }; wx: a client or fn(item)
-- returns: action = { kind = "refund", id, out_refund_no, state, remote
--   (status), event (or nil: PROCESSING stays), abnormal (true when
--   WeChat says ABNORMAL: for the abnormal-refund API), refund (WeChat's),
--   answered_at (as check_payment's), set (refund_id), evidence } or nil,
--   err
-- yields: one WeChat call
function _M.check_refund(wx, item)
  check_item("reconcile.check_refund", item, "out_refund_no")
  wx = client_for("reconcile.check_refund", wx, item)
  count("checks")
  local r, err = wx:query_refund(item.out_refund_no, sub_mchid(item))
  if not r then
    return nil, err
  end
  if r.out_refund_no ~= item.out_refund_no then
    return answer_about_other("refund", item.id, "refund", r.out_refund_no,
                              item.out_refund_no)
  end
  local status = r.status
  if not KNOWN_REFUND[status] then
    return fail("bad_response", "reconcile: refund " .. tostring(item.id)
                .. ": unexpected status " .. tostring(status),
                { retryable = true })
  end
  local action = { kind = "refund", id = item.id, state = item.state,
                   out_refund_no = item.out_refund_no, remote = status,
                   refund = r, set = { refund_id = r.refund_id },
                   evidence = { out_refund_no = item.out_refund_no,
                                refund_id = r.refund_id, status = status },
                   answered_at = _M.answered_at(err) }
  action.event = _M.refund_event(item.state, status)
  if status == "ABNORMAL" then
    action.abnormal = true
    count("abnormal")
  end
  return action
end

---------------------------------------------------------------- apply

local function map_event(action, state)
  if action.alarm then
    return nil
  end
  if action.remote == "ORDER_NOT_EXIST" then
    return action.event and OPEN[state] and "closed" or nil
  end
  if action.kind == "refund" then
    return _M.refund_event(state, action.remote)
  end
  return _M.payment_event(state, action.remote)
end

-- Whether the answer in action still concerns row, read in the
-- transaction: opts.current(row, action) when given; else the row's
-- out_trade_no (a payment) or out_refund_no (a refund), when it has that
-- column, must be the one that was asked about. (A payment may have
-- moved on to a new attempt since the batch was read: an answer about the
-- old one -- CLOSED, ORDER_NOT_EXIST -- must not close the new one.)
local function is_current(row, action, current, tx)
  if current then
    return current(row, action, tx) and true or false
  end
  local col = action.kind == "refund" and "out_refund_no" or "out_trade_no"
  local have, asked = row[col], action[col]
  return have == nil or asked == nil or have == asked
end

-- syntax: res, err = reconcile.apply(db, machine, action[, opts])
-- Applies a check's action through the app's fsm machine in one
-- transaction (fsm.retry: retried from fresh state on stale_version):
-- opts.fence(tx) first (the runner's ctx.fence: a lease lost meanwhile
-- commits nothing), then the event as re-derived from the row read in the
-- transaction (a notification that moved it meanwhile wins: no event,
-- nothing illegal), then opts.within(tx, action, tres) and
-- opts.schedule(tx, action, tres) (the app's extra writes, e.g. its
-- next_check_at). opts.set = fn(row, action) -> columns (default
-- action.set); cause ("reconcile"), actor ("reconcile"); current =
-- fn(row, action, tx) -> boolean: whether the answer still concerns the row
-- (default: the row's out_trade_no / out_refund_no, when it has that
-- column, is the one asked about; when not, no event: skipped).
-- returns: { applied = bool, event, transition (fsm's result or nil),
--   skipped (true when the row had moved on) } or nil, err
-- yields: until committed
function _M.apply(db, machine, action, opts)
  if type(machine) ~= "table" or type(machine.transition) ~= "function" then
    error("reconcile.apply: machine must be a paygate.fsm machine", 2)
  end
  if type(action) ~= "table" or (action.kind ~= "payment"
                                 and action.kind ~= "refund") then
    error("reconcile.apply: action must come from check_payment or"
          .. " check_refund", 2)
  end
  opts = opts or {}
  if type(opts) ~= "table" then
    error("reconcile.apply: opts must be a table", 2)
  end
  for _, k in ipairs({ "fence", "within", "schedule", "set", "current" }) do
    if opts[k] ~= nil and type(opts[k]) ~= "function" then
      error("reconcile.apply: opts." .. k .. " must be a function", 2)
    end
  end
  local out
  local res, err = fsm.retry(db, function(tx)
    out = { applied = false }
    if opts.fence then
      local ok, ferr = opts.fence(tx)
      if not ok then
        return nil, ferr
      end
    end
    local row, gerr = machine:get(tx, action.id)
    if row == nil then
      return nil, gerr
    end
    if not row then
      return fail("not_found", "reconcile: " .. action.kind .. " "
                  .. tostring(action.id) .. " not found")
    end
    local state = row[machine.store.state_col or "state"]
    local event
    local current = is_current(row, action, opts.current, tx)
    if current then
      event = map_event(action, state)
    end
    out.event = event
    if not current or (action.event and event ~= action.event) then
      out.skipped = true
    end
    if event then
      local set = action.set
      if opts.set then
        set = opts.set(row, action)
      end
      local tres, terr = machine:transition(tx, action.id, event, {
        row = row, cause = opts.cause or "reconcile",
        actor = opts.actor or "reconcile", evidence = action.evidence,
        set = set and next(set) and set or nil,
        data = { action = action } })
      if not tres then
        return nil, terr
      end
      out.applied, out.transition = true, tres
    end
    if opts.within then
      local ok, werr = opts.within(tx, action, out.transition)
      if not ok then
        return nil, werr
      end
    end
    if opts.schedule then
      local ok, serr = opts.schedule(tx, action, out.transition)
      if not ok then
        return nil, serr
      end
    end
    return out
  end)
  if not res then
    return nil, err
  end
  if out.applied then
    count("applied")
  else
    count("unchanged")
  end
  if out.skipped then
    count("skipped")
  end
  return out
end

---------------------------------------------------------- refund limit

local NOT_COUNTED = { failed = true, closed = true }

-- a refund's state as the limit reads it: in any case (an app's table may
-- keep WeChat's CLOSED as it came; a FAILED of its own)
local function state_of(r)
  local s = r.state
  return type(s) == "string" and s:lower() or s
end

local function fen(fname, v, what)
  if type(v) ~= "number" or v % 1 ~= 0 or v < 0 or v > 2 ^ 53 then
    return nil, core.error("invalid_amount", fname .. ": " .. what
                           .. " must be a non-negative integer (fen)")
  end
  return v
end

-- syntax: left, err = reconcile.refundable(paid, refunds)
-- paid: the amount paid (fen); refunds: { { amount, state }, ... }.
-- returns: paid minus the refunds not failed / closed (in any case: CLOSED
-- too) (never below 0), or nil, err (invalid_amount)
function _M.refundable(paid, refunds)
  local p, err = fen("reconcile.refundable", paid, "paid")
  if not p then
    return nil, err
  end
  if type(refunds) ~= "table" then
    error("reconcile.refundable: refunds must be a table", 2)
  end
  local used = 0
  for i, r in ipairs(refunds) do
    if type(r) ~= "table" then
      error("reconcile.refundable: refunds[" .. i .. "] must be a table", 2)
    end
    if not NOT_COUNTED[state_of(r)] then
      local a, aerr = fen("reconcile.refundable", r.amount,
                          "refunds[" .. i .. "].amount")
      if not a then
        return nil, aerr
      end
      used = used + a
    end
  end
  return max(0, p - used)
end

-- WeChat Pay takes at most this many refunds of one order
_M.MAX_REFUNDS = 50

-- WeChat Pay takes a refund only within a year of the payment. How it
-- counts the year is not documented: 366 days is a year by any count (a
-- leap day included), so a refund this long after the payment's
-- success_time is one WeChat certainly refuses (seconds)
_M.REFUND_WINDOW = 366 * 86400

-- syntax: left, err = reconcile.refund_limit(paid, refunds, amount)
-- returns: what stays refundable after `amount` (fen), or nil, err:
-- invalid_amount (not a positive integer), refund_exceeds_paid (amount
-- above what is left: err.refundable, err.requested), refund_limit (the
-- order has MAX_REFUNDS refunds already, counting all but the failed
-- ones -- those WeChat refused -- : err.refunds, err.refundable)
function _M.refund_limit(paid, refunds, amount)
  local left, err = _M.refundable(paid, refunds)
  if not left then
    return nil, err
  end
  if type(amount) ~= "number" or amount % 1 ~= 0 or amount < 1
     or amount > 2 ^ 53 then
    return fail("invalid_amount", "refund: amount must be a positive"
                .. " integer (fen)")
  end
  if amount > left then
    return fail("refund_exceeds_paid", "refund: " .. amount .. " fen is"
                .. " above the " .. left .. " fen still refundable",
                { refundable = left, requested = amount })
  end
  local n = 0
  for _, r in ipairs(refunds) do
    if state_of(r) ~= "failed" then n = n + 1 end
  end
  if n >= _M.MAX_REFUNDS then
    return fail("refund_limit", "refund: the order has " .. n .. " refunds,"
                .. " and WeChat Pay takes at most " .. _M.MAX_REFUNDS
                .. " of one order", { refunds = n, refundable = left })
  end
  return left - amount
end

----------------------------------------------------------------- bills

_M.bill = bill
_M.parse_fen = bill.parse_fen
_M.bill_date = bill.bill_date
_M.fetch_bill = bill.fetch
_M.diff = bill.diff
_M.csv = bill.csv
_M.daily_bill = bill.daily

return _M
