-- sim.control: the control API under /sim/ (off with control = false):
-- act as the payer and as WeChat's back office, read back what happened,
-- inject faults. Requests need no signature; they are accepted from
-- loopback addresses only, never from a browser page of another site
-- (paygate.addr.browser_elsewhere), and, with control_listen =
-- "IP:PORT", only on connections made to that local address (the
-- runtime has one listener:
-- this picks one of its addresses when it listens on a wildcard; it
-- opens no port of its own). docs/simulator.md lists every route.
local paygate = require "paygate"
local config = require "sim.config"
local json = require "sim.json"
local utf8 = require "paygate.utf8"
local faults = require "sim.faults"
local identity = require "sim.identity"
local certificates = require "sim.certificates"
local orders = require "sim.orders"
local payer = require "sim.payer"
local bills = require "sim.bills"
local clock = require "sim.clock"
local civil = require "paygate.civil"

local _M = {}

local function answer(status, body)
  local s = type(body) == "string" and body or json.encode(body)
  return status, s, { ["Content-Type"] = "application/json; charset=utf-8" }
end
_M.answer = answer

local loopback = require("paygate.addr").loopback_addr
local browser_elsewhere = require("paygate.addr").browser_elsewhere
local mono = require("paygate.core").mono

-- "[::ffff:1.2.3.4]:p" (a v4 client on a dual-stack socket) -> "1.2.3.4:p"
local function plain_addr(a)
  if type(a) ~= "string" then return a end
  local v4, port = a:match("^%[::ffff:([%d%.]+)%]:(%d+)$")
  if v4 then return v4 .. ":" .. port end
  return a
end

config.define("control_listen", function(v)
  if type(v) ~= "string" or not (v:match("^%d+%.%d+%.%d+%.%d+:%d+$")
                                 or v:match("^%[[%x:%.]+%]:%d+$")) then
    return nil, 'must be "IP:PORT", an address the listener serves '
                .. '(such as "127.0.0.1:9000")'
  end
  return v
end)

local S = { listen = nil }         -- control_listen, once routes() ran

--- syntax: control.route(method, pattern, fn) -- fn(req) -> status, body
function _M.route(method, pattern, fn)
  paygate.route(method, pattern, function(req)
    if S.listen and plain_addr(req.local_addr) ~= S.listen then
      return answer(404, { code = "NOT_FOUND",
        message = "the control API is not served on this address" })
    end
    if not loopback(req.remote_addr) then
      return answer(403, { code = "FORBIDDEN",
                           message = "the control API answers loopback only" })
    end
    -- a browser on this machine is a loopback client too: a page from
    -- another site (a form, a fetch, a name rebound to 127.0.0.1) must not
    -- pay orders, rotate keys or inject faults
    if browser_elsewhere(req) then
      return answer(403, { code = "FORBIDDEN", message = "the control API"
        .. " refuses a browser page from elsewhere: a Host that is not a"
        .. " loopback name, or an Origin or Sec-Fetch-Site of another site"
        .. " (use curl or a script)" })
    end
    return fn(req)
  end)
end

--- syntax: b, why = control.body_of(req)
-- A control request's body: a JSON object ({} when there is none), or
-- nil and why (not JSON, or JSON but not an object: an array too).
local function body_of(req)
  if req.body == nil or req.body == "" then return {} end
  local v, why = json.object(req.body)
  if not v then return nil, "body must be a JSON object (" .. why .. ")" end
  return v
end
_M.body_of = body_of

-- A string field of a control body: absent, or 1 to 128 bytes of UTF-8
-- (the order's answers and its notification carry it). returns: why
-- not, or nil.
local function bad_string(b, k)
  local v = b[k]
  if v ~= nil and (type(v) ~= "string" or v == "" or #v > 128
                   or not utf8.len(v)) then
    return k .. " must be a UTF-8 string of 1 to 128 bytes"
  end
end

-- ?wait=SECONDS of a control call that makes a notification: nil when
-- absent, or the seconds, or nil, why.
local function wait_of(q)
  local wait = q.wait
  if wait == nil then return nil end
  -- decimal seconds only: tonumber also reads "nan" (every comparison is
  -- false for it: it passed the range below and the wait had no end),
  -- "0x10" and " 5 "
  wait = type(wait) == "string" and #wait <= 16
         and wait:find("^%d+%.?%d*$") and tonumber(wait)
  if not wait or wait <= 0 or wait > 30 then
    return nil, "wait must be a number of seconds in (0, 30]"
  end
  return wait
end

function _M.routes(ctx)
  S.listen = ctx.config.control_listen
  local api = ctx.api
  local route = _M.route

  -- The answer to a control call that enqueued notification id. With
  -- wait (?wait=SECONDS), it comes once the notification's first delivery
  -- was answered by the merchant (or failed: no answer, refused
  -- connection), or when the wait ends: a demo or a script can read the
  -- merchant's state right after (X-Sim-Notified says which: the
  -- merchant's status, "error", or "waiting"; "none" when the call made
  -- no notification).
  local function answer_notified(obj, id, wait)
    if not wait then return answer(200, obj) end
    local seen = id and "waiting" or "none"
    local deadline = mono() + wait   -- a wall-clock step must not stretch it
    local notify = require "sim.notify"
    while id do
      local list = notify.list(ctx.db, { id = id })
      for _, a in ipairs(list and list[1] and list[1].attempts or {}) do
        if type(a.status) == "number" then
          seen = tostring(a.status)
          break
        elseif type(a.error) == "string"
               and not a.error:match("^in_flight")
               and not a.error:match("^interrupted") then
          seen = "error"
          break
        end
      end
      if seen ~= "waiting" or mono() >= deadline then break end
      paygate.sleep(0.01)
    end
    local st, body, h = answer(200, obj)
    h["X-Sim-Notified"] = seen
    return st, body, h
  end

  local function bad(why)
    return answer(400, { code = "PARAM_ERROR", message = why })
  end

  -- the payer pays: NOTPAY -> SUCCESS (+ TRANSACTION.SUCCESS notification)
  route("POST", "/sim/transactions/:no/pay", function(req)
    local b, why = body_of(req)
    if not b then return bad(why) end
    if b.payer_total ~= nil and (type(b.payer_total) ~= "number"
       or b.payer_total < 0 or b.payer_total ~= math.floor(b.payer_total))
    then
      return bad("payer_total must be an integer >= 0, at most the "
                 .. "order's total")
    end
    for _, k in ipairs({ "bank_type", "openid" }) do
      why = bad_string(b, k)
      if why then return bad(why) end
    end
    -- success_time: an order paid long ago (a refund more than a year
    -- after its payment is refused). Only a day whose bills can no longer
    -- be downloaded: a bill made already never changes. No earlier than
    -- the order was made (orders.pay), which create_time moves back: an
    -- order made long ago too, as WeChat never pays an order before it
    -- exists
    local paid_at, made_at
    if b.success_time ~= nil then
      paid_at = type(b.success_time) == "string"
                and civil.epoch(b.success_time)
      if not paid_at or bills.kept(bills.day_start(bills.today(paid_at)),
                                   clock.now()) then
        return bad("success_time must be an RFC 3339 time on a day whose"
                   .. " bills are no longer kept (more than "
                   .. bills.KEEP_DAYS .. " days back)")
      end
    end
    if b.create_time ~= nil then
      made_at = type(b.create_time) == "string"
                and civil.epoch(b.create_time)
      if not made_at then
        return bad("create_time must be an RFC 3339 time")
      elseif not paid_at then
        return bad("create_time is for an order made and paid long ago:"
                   .. " give success_time too")
      end
    end
    local q = req:query()
    local wait, werr = wait_of(q)
    if werr then return bad(werr) end
    local t, err = orders.pay(req.params.no, {
      mchid = q.mchid, payer_total = b.payer_total,
      bank_type = b.bank_type, openid = b.openid, success_at = paid_at,
      created_at = made_at })
    if not t then return answer(err.status or 500, err) end
    return answer_notified(t, err, wait)
  end)

  -- the payer's WeChat client pays through what the front end handed it
  -- (the JSAPI call's or the App SDK's parameters, a code_url, an
  -- h5_url), checked as WeChat checks them (sim.payer); the same effects
  -- as the pay above
  route("POST", "/sim/pay", function(req)
    local b, why = body_of(req)
    if not b then return bad(why) end
    local wait, werr = wait_of(req:query())
    if werr then return bad(werr) end
    local t, err = payer.pay(ctx, b)
    if not t then return answer(err.status or 500, err) end
    return answer_notified(t, err, wait)
  end)

  -- the payment fails: NOTPAY -> PAYERROR (WeChat sends no notification)
  route("POST", "/sim/transactions/:no/fail", function(req)
    local b, why = body_of(req)
    if not b then return bad(why) end
    why = bad_string(b, "bank_type")
    if why then return bad(why) end
    local t, err = orders.fail(req.params.no, {
      mchid = req:query().mchid, bank_type = b.bank_type })
    if not t then return answer(err.status or 500, err) end
    return answer(200, t)
  end)

  -- a refund made in the merchant platform, not through the merchant's
  -- API client: PROCESSING, settled as any refund
  route("POST", "/sim/transactions/:no/refund", function(req)
    local b, why = body_of(req)
    if not b then return bad(why) end
    if b.amount ~= nil and (type(b.amount) ~= "number" or b.amount < 1
                            or b.amount ~= math.floor(b.amount)) then
      return bad("amount must be an integer >= 1 (fen)")
    end
    if b.out_refund_no ~= nil and (type(b.out_refund_no) ~= "string"
       or #b.out_refund_no > 64
       or not b.out_refund_no:match("^[%w_%-|*@]+$")) then
      return bad("out_refund_no must be 1 to 64 of [0-9A-Za-z_-|*@]")
    end
    why = bad_string(b, "reason")
    if why then return bad(why) end
    -- where the platform notifies it (the merchant's refund notification
    -- URL, set in the platform; default the merchant's refund_notify_url)
    if b.notify_url ~= nil then
      local ok, nwhy = require("paygate.wechatpay.validate").notify_url(
        b.notify_url)
      if not ok then
        return bad("notify_url must be an https URL (http only on"
                   .. " loopback) without a query (" .. tostring(nwhy) .. ")")
      end
    end
    local r, err = orders.refund_outside(req.params.no, {
      mchid = req:query().mchid, amount = b.amount,
      out_refund_no = b.out_refund_no, reason = b.reason,
      notify_url = b.notify_url })
    if not r then return answer(err.status or 500, err) end
    return answer(200, r)
  end)

  -- the refund settles: PROCESSING -> SUCCESS | ABNORMAL | CLOSED
  route("POST", "/sim/refunds/:no/settle", function(req)
    local b, why = body_of(req)
    if not b then return bad(why) end
    local st = b.status
    if st == nil then st = "SUCCESS" end
    if st ~= "SUCCESS" and st ~= "ABNORMAL" and st ~= "CLOSED" then
      return bad("status must be SUCCESS, ABNORMAL or CLOSED")
    end
    local q = req:query()
    local wait, werr = wait_of(q)
    if werr then return bad(werr) end
    local r, err = orders.settle(req.params.no, st, q.mchid)
    if not r then return answer(err.status or 500, err) end
    return answer_notified(r, err, wait)
  end)

  route("GET", "/sim/platform-certificates", function()
    local out = {}
    for _, c in ipairs(identity.certificates()) do
      out[#out + 1] = { serial_no = c.serial, certificate = c.pem,
        effective_time = certificates.rfc3339(c.not_before),
        expire_time = certificates.rfc3339(c.not_after),
        use_from = c.use_from }
    end
    if out[1] == nil then return answer(200, "[]") end
    return answer(200, out)
  end)

  route("GET", "/sim/public-key", function()
    local p = identity.public_key()
    return answer(200, { id = p.id, pem = p.pem })
  end)

  route("POST", "/sim/certificates/rotate", function(req)
    local b, why = body_of(req)
    if not b then return bad(why) end
    local delay = b.delay
    if delay ~= nil then
      local _, why = config.check_rotation_delay(delay)
      if why then return bad("delay " .. why) end
    end
    local c, err = identity.rotate(delay)
    if not c then
      return answer(500, { code = "SYSTEM_ERROR", message = tostring(err) })
    end
    return answer(200, { serial_no = c.serial, certificate = c.pem,
      effective_time = certificates.rfc3339(c.not_before),
      expire_time = certificates.rfc3339(c.not_after),
      use_from = c.use_from })
  end)

  route("GET", "/sim/requests", function(req)
    local raw = req:query().since
    -- (a seq: digits; anything else would quietly list every request)
    if raw ~= nil and (type(raw) ~= "string" or not raw:match("^%d+$")
                       or #raw > 15) then
      return answer(400, { code = "PARAM_ERROR",
                           message = "since must be a request's seq" })
    end
    local l = api.requests(tonumber(raw))
    if l[1] == nil then return answer(200, "[]") end
    return answer(200, l)
  end)

  route("DELETE", "/sim/requests", function()
    api.clear_requests()
    return 204, ""
  end)

  route("POST", "/sim/faults", function(req)
    local b, why = body_of(req)
    if not b then return bad(why) end
    local f
    f, why = faults.add(b)
    if not f then return bad(why) end
    return answer(200, f)
  end)

  route("GET", "/sim/faults", function()
    local l = faults.list()
    if l[1] == nil then return answer(200, "[]") end
    return answer(200, l)
  end)

  route("DELETE", "/sim/faults", function()
    faults.clear()
    return 204, ""
  end)

  route("POST", "/sim/faults/:id/release", function(req)
    local raw = req.params.id
    -- (a fault's id: digits; anything else names no fault)
    if not raw:match("^%d+$") or #raw > 15 then
      return answer(404, { code = "NOT_FOUND",
                           message = "a fault's id is its number" })
    end
    local b, bwhy = body_of(req)
    if not b then return bad(bwhy) end
    local f, status, why = faults.release(tonumber(raw))
    if not f then
      return answer(status, { code = status == 404 and "NOT_FOUND"
        or status == 400 and "PARAM_ERROR" or "SYSTEM_ERROR",
        message = why })
    end
    return answer(200, f)
  end)
end

return _M
