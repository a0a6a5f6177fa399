-- paygate.wechatpay.transport: executes one signed request against
-- WeChat Pay v3 — headers, signing, the backup domain, retries with
-- exponential backoff and full jitter inside a deadline, response
-- verification, and the classification of what could not be settled.
--
-- wx:request(method, path_with_query, body, opts)
--   method           "GET", "POST", "PUT", "PATCH", "DELETE"
--   path_with_query  "/v3/...[?query]", already percent-encoded: it is
--                    signed and sent exactly as given ('#', bytes outside
--                    ASCII, control bytes and "."/".." segments, which
--                    the HTTP client would change, are invalid_params)
--   body             nil (no body), a string (sent and signed byte for
--                    byte) or a table (encoded to JSON once; those bytes
--                    are signed and sent)
--   opts (all optional):
--     idempotent       true when repeating the call is safe: GETs (the
--                      default for GET/HEAD), and POSTs that carry the same
--                      out_trade_no / out_refund_no. Only then is a request
--                      that may have reached WeChat retried (after a 5xx,
--                      SYSTEM_ERROR, FREQUENCY_LIMITED, a timeout...).
--                      Without it only failures before the request left
--                      (connect, dns; err.sent == false) are retried, and
--                      a timeout after sending is `unknown_outcome`. With
--                      it, a POST out of retries after such a failure is
--                      `unknown_outcome` too, with retryable = true.
--     deadline         seconds for the whole call, retries included
--                      (default conf.deadline, 30); inside a request
--                      handler never past the handler's own deadline
--                      less _M.HANDLER_MARGIN (see below)
--     timeout          seconds for one attempt (default conf.timeout, 10;
--                      never past the deadline)
--     idle_timeout     seconds under a byte a second after which an attempt
--                      fails as a timeout, whatever is left of timeout
--                      (for a large file: a long timeout that still ends
--                      soon when the transfer stalls); default none
--     unsigned         true for raw file downloads WeChat does not sign
--                      (/v3/billdownload/file): no response signature
--                      check (the caller checks the file's hash)
--     sink             function(chunk) receiving a 2xx body chunk by chunk
--                      instead of res.body (for files; needs unsigned =
--                      true); res.body and res.json are then nil. An error
--                      body never reaches the sink (it makes the error;
--                      past 64 KiB the transfer stops, the error made of
--                      what came).
--                      No retry once part of the body reached the sink.
--     wechatpay_serial string: send this Wechatpay-Serial (e.g. the serial
--                      returned by wx:encrypt_sensitive()); default: the
--                      public key id in public-key/migration mode, else the
--                      newest platform certificate serial when known;
--                      false: none
--     headers          extra request headers (table name -> string)
--     max_attempts     cap on attempts (default 4)
--     signed_body      string: what the signature covers instead of the
--                      body (a multipart upload: its meta JSON; see
--                      docs/wechatpay.md, wx:upload_media)
--
-- returns res = { status, headers, body, json, request_id, attempts }
--   status      HTTP status (2xx only; anything else is an error)
--   headers     response headers, names lower-case
--   body        the raw response body (nil with sink)
--   json        the decoded body when it is JSON, else nil
--   request_id  WeChat's Request-ID header, or nil
--   attempts    how many attempts the call took (retries included)
-- or nil, err: see errors.lua (err.kind, err.code, err.status,
--   err.request_id, err.retryable, err.detail).
local core = require "paygate.core"
local http = require "paygate.http"
local json = require "paygate.json"  -- hardened decoder, same null
local errors = require "paygate.wechatpay.errors"
local sign = require "paygate.wechatpay.sign"
local upstream = require "paygate.wechatpay.upstream"
local clock = require "paygate.wechatpay.clock"

local type, tostring, pairs, error = type, tostring, pairs, error
local min, max, random = math.min, math.max, math.random

local _M = {}

-- JSON for request bodies: paygate.json writes integers exactly and does
-- not escape "/" (notify_url stays readable, as every WeChat Pay SDK sends
-- it; the bytes are signed as sent either way). It raises on a value JSON
-- cannot hold (a function, NaN, a sparse array), which callers pcall.
_M.encode = json.encode

-- seconds a call made in a request handler leaves the handler before its
-- deadline (req:set_deadline, limits.request_timeout): to record what the
-- call's outcome was and answer
_M.HANDLER_MARGIN = 2

local USER_AGENT
local function user_agent()
  if not USER_AGENT then
    local ok, paygate = pcall(require, "paygate")
    USER_AGENT = "paygate/" .. (ok and paygate.version or "0")
                 .. " (wechatpay; LuaJIT)"
  end
  return USER_AGENT
end

-- Backoff: full jitter, base 0.2 s doubling, capped at 5 s.
local BASE, CAP = 0.2, 5
function _M.backoff(attempt)
  return random() * min(CAP, BASE * 2 ^ (attempt - 1))
end

local SAFE_METHODS = { GET = true, HEAD = true }

-- bytes of a streamed (sink) call's error body kept for its error
local ERRBODY_MAX = 65536

-- kinds of a response error worth repeating (the request was refused
-- without effect, or WeChat asks for the same request again)
local RETRY_ALWAYS = { frequency_limited = true }
local RETRY_IDEMPOTENT = { system_error = true }

-- Did a transport error happen before the request left? err.sent from
-- paygate.http when it says; otherwise only failures to resolve or
-- connect are known to be unsent.
local function unsent(err)
  if err.sent ~= nil then return err.sent == false end
  return err.kind == "dns" or err.kind == "connect"
end

-- Where an attempt's timeout came from, as its error says it.
local TIMEOUT_FROM = {
  adaptive = "adaptive: p95 x 1.8 + 0.2 s of this endpoint's recent answers"
    .. ", within timeout_floor .. timeout_ceiling",
  configured = "the configured timeout",
  call = "the call's own timeout",
  deadline = "what was left of the call's deadline",
}

-- What the last failure was, for the operator: the transport's own words
-- (curl's "Operation timed out after 1000 milliseconds", "Connection
-- reset by peer"; for a timeout, the timeout the attempt had and where it
-- came from, added in the loop), and how many attempts the call made.
-- Without them "timeout after the request may have been received" could
-- not be told from WeChat answering slower than an adaptive timeout
-- learnt on a fast day, nor a reset from a slow answer.
local function failure_detail(what, err, attempts)
  local m = tostring(err.message or "")
  if m:sub(1, #what + 2) == what .. ": " then m = m:sub(#what + 3) end
  local parts = { m }
  if attempts then
    parts[#parts + 1] = attempts .. (attempts == 1 and " attempt"
                                     or " attempts")
  end
  return table.concat(parts, "; ")
end

-- The error for a call that failed at the transport level after the
-- request may have reached WeChat (err.sent not false): WeChat may have
-- acted. retryable: whether repeating it is safe (an idempotent call: the
-- same out_trade_no / out_refund_no, the same bytes).
local function outcome_unknown(what, err, retryable, attempts)
  return errors.wrap("unknown_outcome", what .. ": " .. tostring(err.kind)
    .. " after the request may have been received ("
    .. failure_detail(what, err, attempts) .. "); query to learn the "
    .. "outcome" .. (retryable and " (repeating it with the same "
    .. "out_trade_no / out_refund_no is safe)" or ""), err,
    { retryable = retryable and true or false, attempts = attempts })
end

local function decode_json(res)
  local body = res.body
  if type(body) ~= "string" or body == "" then return nil end
  local c = body:byte(1)
  if c ~= 123 and c ~= 91 then                         -- { or [
    -- else after a UTF-8 BOM or JSON whitespace only
    local at = body:find("^\239\187\191") and 4 or 1
    at = body:find("[^ \t\r\n]", at)
    c = at and body:byte(at)
    if c ~= 123 and c ~= 91 then return nil end
    return json.decode(at == 1 and body or body:sub(at))
  end
  return json.decode(body)
end

-- An attempt that tells the breaker the endpoint is unwell: no answer,
-- a 5xx or a 429 (rerr: the error of a non-2xx answer). A 5xx whose code
-- says the request itself is wrong (500 OPENID_MISMATCH: not retryable)
-- is an answer, as a 4xx is: the merchant's mistake, not WeChat's trouble.
local function failed_attempt(res, rerr)
  if res == nil then return true end
  if res.status == 429 then return true end
  return res.status >= 500 and not (rerr and rerr.retryable == false)
end

local call, tell

--- syntax: res, err = transport.request(wx, method, path, body, opts)
-- See the top of this file. Counted once in paygate_wechatpay_calls_total,
-- and timed in paygate_wechatpay_call_duration_seconds when an attempt
-- was made (upstream.lua). yields.
function _M.request(wx, method, path, body, opts)
  if type(method) ~= "string" or not method:match("^[A-Z]+$") then
    error("wx:request: method must be an upper-case HTTP method", 3)
  end
  if type(path) ~= "string" or path:sub(1, 4) ~= "/v3/"
     or path:find("[%s%z]") then
    error("wx:request: path must start with /v3/ (no spaces)", 3)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("wx:request: opts must be a table", 3)
  end
  local ep, what = upstream.endpoint(method, path)
  local started = core.mono()
  local stat = { attempts = 0 }           -- attempts made (sent or tried)
  local res, err = call(wx, method, path, body, opts or {}, ep, what, stat)
  if res then
    res.attempts = stat.attempts
  elseif core.is_error(err) and err.attempts == nil then
    err.attempts = stat.attempts
  end
  upstream.count(ep, res, err, stat.attempts > 0
                               and core.mono() - started or nil)
  if wx.conf.on_call then tell(wx, method, path, body, res, err, started) end
  return res, err
end

-- conf.on_call(call): one record per finished wx:request, for a caller
-- that keeps a history of its calls (the reference gateway shows them per
-- payment). The hook runs in the caller's coroutine after the answer; an
-- error in it is logged and does not change the call's outcome.
tell = function(wx, method, path, body, res, err, started)
  local rec = {
    method = method, path = path:match("^[^?]*"),
    body = type(body) == "string" and body or nil,
    seconds = core.mono() - started,
    status = res and res.status or (core.is_error(err) and err.status)
             or nil,
    request_id = res and res.request_id
                 or (core.is_error(err) and err.request_id) or nil,
    attempts = res and res.attempts
               or (core.is_error(err) and err.attempts) or nil,
  }
  if type(body) == "table" then rec.body = _M.encode(body) end
  if res then
    rec.outcome = "ok"
  elseif core.is_error(err) then
    rec.outcome, rec.code = err.kind, err.code
  else
    rec.outcome = "error"
  end
  local ok, herr = pcall(wx.conf.on_call, rec)
  if not ok then
    require("paygate.wechatpay.config").logger(wx.conf).error(
      "wechatpay: on_call raised", {
      error = tostring(herr):sub(1, 300) })
  end
end

-- The call itself (misuse raises at level 4: the caller of wx:request);
-- ep and what: upstream.endpoint's names of it.
call = function(wx, method, path, body, opts, ep, what, stat)
  -- what the HTTP client would change before sending (so the signature
  -- would cover another target): a fragment, bytes it percent-encodes,
  -- dot segments it removes
  if path:find("[#\128-\255%c]") then
    return nil, errors.invalid_params("path", "must be ASCII without '#' or "
      .. "control characters (percent-encode them; it is signed and sent "
      .. "exactly as given)")
  end
  if (path:match("^[^?]*") .. "/"):find("/%.%.?/") then
    return nil, errors.invalid_params("path", "must not hold a \".\" or "
      .. "\"..\" segment (it would be sent without it)")
  end
  if type(body) == "table" then
    body = _M.encode(body)
  elseif body ~= nil and type(body) ~= "string" then
    error("wx:request: body must be a string or a table", 4)
  end
  if opts.signed_body ~= nil and type(opts.signed_body) ~= "string" then
    error("wx:request: opts.signed_body must be a string", 4)
  end
  local c = wx.conf
  local idempotent = opts.idempotent
  if idempotent == nil then idempotent = SAFE_METHODS[method] or false end
  local started = core.mono()
  -- inside a request handler, the call ends HANDLER_MARGIN s before the
  -- handler's own deadline: past that the client got 504 and the handler
  -- was cancelled mid-call, so it never recorded what it knew (a payment
  -- left `created`, not `unknown`; the merchant client's default deadline
  -- and the server's request_timeout are both 30 s)
  local budget = opts.deadline or c.deadline
  local left = core.time_left()
  local capped = left ~= nil and left - _M.HANDLER_MARGIN < budget
  if capped then budget = max(0, left - _M.HANDLER_MARGIN) end
  local deadline = started + budget
  local max_attempts = opts.max_attempts or c.max_attempts
  local headers = {
    ["Accept"] = "application/json",
    ["User-Agent"] = user_agent(),
    ["Content-Type"] = "application/json",
  }
  for k, v in pairs(opts.headers or {}) do headers[k] = v end
  local serial = opts.wechatpay_serial
  if serial == nil then serial = wx:request_serial() end
  if serial then headers["Wechatpay-Serial"] = serial end
  -- with a sink, only a 2xx body goes to it: an error body is kept
  -- (bounded) for the error's code and message
  local sink, delivered = opts.sink, false
  local wrapped, on_headers, status_seen, headers_seen, errbuf, errlen, errcut
  if sink ~= nil then
    if type(sink) ~= "function" then
      error("wx:request: opts.sink must be a function", 4)
    end
    if not (opts.unsigned or opts._no_verify) then
      error("wx:request: opts.sink needs opts.unsigned (a streamed body "
            .. "cannot be signature-checked)", 4)
    end
    on_headers = function(status, hdrs)
      status_seen, headers_seen, errbuf, errlen = status, hdrs, {}, 0
      return true
    end
    -- an error body is kept up to ERRBODY_MAX bytes; past that the
    -- transfer stops there and the error is made of what came (an
    -- endless error body was read, and thrown away, until the download's
    -- timeout: 1800 s)
    wrapped = function(chunk)
      if status_seen >= 200 and status_seen < 300 then
        delivered = true
        return sink(chunk)
      end
      local room = ERRBODY_MAX - errlen
      errbuf[#errbuf + 1] = #chunk > room and chunk:sub(1, room) or chunk
      errlen = errlen + min(#chunk, room)
      if errlen >= ERRBODY_MAX then
        errcut = true
        return false
      end
      return true
    end
  end
  -- the degradation switch: fail fast, touch nothing
  if wx.updict:get(upstream.DEGRADED_KEY) == true then
    return nil, upstream.degraded_error(what)
  end
  local base = c.base_url
  local on_backup = false
  local attempt = 0
  local last, reached
  local carried                 -- the breaker's word, kept for the backup
  while true do
    attempt = attempt + 1
    local remaining = deadline - core.mono()
    if remaining <= 0 then
      if carried then upstream.release(wx, ep) end   -- a probe not sent
      break
    end
    local allowed, probe, retry_after
    if carried ~= nil then
      -- the attempt goes on on the backup domain: the breaker already let
      -- it through (as the probe, when it was one)
      allowed, probe, carried = true, carried, nil
    else
      allowed, probe, retry_after = upstream.allow(wx, ep)
    end
    if not allowed then
      if last == nil then
        return nil, upstream.circuit_open_error(what, retry_after, ep)
      end
      break                     -- opened by this call's own failures
    end
    local auth, serr = sign.sign_request(c.signer, method, path,
                                         opts.signed_body or body)
    if not auth then
      if probe then upstream.release(wx, ep) end     -- nothing was tried
      return nil, errors.wrap("sign_error", "cannot sign the request: "
                              .. tostring(serr), serr)
    end
    headers["Authorization"] = auth
    stat.attempts = attempt
    local sent_at = core.mono()
    local own, own_from = upstream.timeout(wx, ep)
    -- resend = false: the HTTP client never sends these bytes a second
    -- time by itself (its retry when a reused connection dies before the
    -- answer). WeChat may have acted on the first copy, and refuses the
    -- copy's nonce as a replay (401 SIGN_ERROR): a POST would look
    -- refused though it was applied. The lost answer comes back here as
    -- kind closed, err.sent = true; retries are made here, signed anew.
    errcut = false
    local res, err = http.request{
      method = method, url = base .. path, headers = headers, body = body,
      timeout = min(opts.timeout or own, remaining),
      connect_timeout = min(5, remaining), ca_file = c.ca_file,
      idle_timeout = opts.idle_timeout,
      sink = wrapped, on_headers = on_headers, resend = false,
    }
    if not res and errcut then
      -- an error answer whose body was cut at ERRBODY_MAX: an answer
      res, err = { status = status_seen, headers = headers_seen or {} }, nil
    end
    -- latency: answers, and timeouts at the endpoint's own timeout (a
    -- slow endpoint's timeout grows; a shorter opts.timeout or the
    -- deadline's rest says nothing about the endpoint, nor does a timeout
    -- before the request was sent: a connect or TLS handshake that did
    -- not finish is no answer time)
    if res or (core.is_error(err) and err.kind == "timeout"
               and err.sent ~= false and opts.timeout == nil
               and own <= remaining) then
      upstream.observe(wx, ep, core.mono() - sent_at)
    end
    if res and sink and (res.status < 200 or res.status >= 300) then
      res.body = table.concat(errbuf)
    end
    local rerr = res and (res.status < 200 or res.status >= 300)
                 and errors.from_response(what, res) or nil
    -- the breaker: an abort is this side's (a sink that stopped). The
    -- primary domain not reached, with the backup yet to try, is no
    -- failure of the endpoint: the attempt goes on on the backup, whose
    -- result is recorded (a primary that cannot be reached would else
    -- open the breaker while the backup answers every call, and a probe
    -- would never get to the backup)
    if not res and core.is_error(err) and c.backup_url and not on_backup
       and unsent(err) and not delivered then
      carried = probe
    else
      upstream.record(wx, ep, failed_attempt(res, rerr)
                      and not (core.is_error(err) and err.kind == "aborted"),
                      probe)
    end
    if not res and core.is_error(err) then
      err.message = what .. ": " .. tostring(err.message)
      reached = reached or not unsent(err)
      if err.kind == "timeout" and err.sent ~= false then
        -- the timeout the attempt had, and whose it was
        local t = opts.timeout or own
        local from = t > remaining and "deadline"
                     or (opts.timeout and "call" or own_from)
        err.attempt_timeout, err.timeout_source = min(t, remaining), from
        err.message = err.message .. string.format(" (the attempt's"
          .. " timeout was %.3g s: %s)", err.attempt_timeout,
          TIMEOUT_FROM[from])
      end
    end
    local retry, wait = false, nil
    if not res then
      if unsent(err) and not delivered then
        last = err
        if c.backup_url and not on_backup then
          -- the primary failed before the request left: the backup domain
          base, on_backup = c.backup_url, true
          attempt = attempt - 1            -- the switch is not a retry
          retry = "now"
        elseif err.retryable == false then
          if reached and not SAFE_METHODS[method] then
            return nil, outcome_unknown(what, err, idempotent, attempt)
          end
          return nil, err                  -- e.g. a certificate refused
        else
          retry = true
        end
      elseif idempotent and err.retryable and not delivered then
        last, retry = err, true
      elseif delivered or SAFE_METHODS[method] then
        return nil, err
      else
        -- it may have reached WeChat and acted: the caller settles it by
        -- a query (a non-idempotent call is never repeated blindly)
        return nil, outcome_unknown(what, err, idempotent, attempt)
      end
    elseif res.status >= 200 and res.status < 300 then
      res.request_id = res.headers and res.headers["request-id"]
      if not (opts.unsigned or opts._no_verify) then
        -- when the answer came: verifying may wait for a certificate
        -- download (an unknown serial), whose own reading is newer
        local at, at_mono = core.time(), core.mono()
        local ok, verr = wx:verify_response(res.headers or {}, res.body or "")
        if ok then
          clock.observe(wx, ok.ts, at, at_mono)  -- WeChat's clock, signed
        else
          if SAFE_METHODS[method] then
            verr.message = what .. ": response " .. verr.message
            verr.status, verr.request_id = res.status, res.request_id
            return nil, verr
          end
          return nil, errors.wrap("unverified_response", what .. ": "
            .. res.status .. " whose signature does not verify ("
            .. tostring(verr) .. "): WeChat may have acted; query to "
            .. "learn the outcome", verr,
            { status = res.status, request_id = res.request_id,
              body = res.body, retryable = false })
        end
      end
      if not sink then res.json = decode_json(res) end
      return res
    else
      local e = rerr
      last = e
      -- a 5xx (SYSTEM_ERROR) was received by WeChat, which may have acted
      -- on it: if a later attempt fails before it is sent, the call's
      -- outcome is still unknown, not "never sent"
      if res.status >= 500 or e.kind == "system_error" then
        reached = true
      end
      if RETRY_ALWAYS[e.kind] or (idempotent and RETRY_IDEMPOTENT[e.kind])
      then
        retry = not delivered
        wait = e.retry_after      -- the retry waits at least that long
      end
      if not retry and not idempotent and res.status >= 500
         and e.retryable then
        -- WeChat received it and may have acted: a call that is not
        -- idempotent (an abnormal refund) must not be repeated blindly
        e.retryable = false
        e.message = e.message .. " (WeChat may have acted on it and the "
          .. "call is not idempotent: query the outcome before repeating)"
      end
      if not retry then return nil, e end
    end
    if attempt >= max_attempts then break end
    if retry ~= "now" then
      local pause = _M.backoff(attempt)
      -- a Retry-After past the deadline ends the retries at once
      if wait and wait > pause then pause = wait end
      if core.mono() + pause >= deadline then break end
      core.sleep(pause)
    end
  end
  if last == nil then
    return nil, errors.new("timeout", what .. ": deadline of "
      .. (capped and string.format("%.3g s (what the request handler's own"
          .. " deadline left)", budget)
          or (opts.deadline or c.deadline) .. " s")
      .. " passed before an attempt: nothing was sent",
      { retryable = true, sent = false })
  end
  if not core.is_error(last) then return nil, last end
  if reached and not SAFE_METHODS[method]
     and (last.status == nil or RETRY_ALWAYS[last.kind]) then
    -- retries ran out, and one attempt at least may have reached WeChat:
    -- the last failed without an answer, or was refused (429) without a
    -- word on what the earlier one did
    return nil, outcome_unknown(what, last, idempotent, stat.attempts)
  end
  return nil, last
end

return _M
