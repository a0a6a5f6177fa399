-- gw.notify: POST /wechatpay/notify/{mchid}, WeChat's callbacks.
--
-- wx:parse_notification (signature, timestamp, decryption, replay), then
-- ONE transaction: the notification id recorded (a second one is a
-- duplicate: acknowledged, nothing applied again), the business key
-- claimed (gw.apply), the amount checked, the fsm transition with its
-- audit entry, the outbox events. 204 only after the commit; a
-- notification that does not verify is 401, any other failure 500, both
-- with WeChat's FAIL body, so WeChat sends it again.
local paygate = require "paygate"
local fsm = require "paygate.fsm"
local json = require "paygate.json"
local wechatpay = require "paygate.wechatpay"
local rotation = require "paygate.wechatpay.rotation"
local metrics = require "paygate.metrics"
local shared = require "paygate.shared"
local model = require "gw.model"
local apply = require "gw.apply"
local payments = require "gw.payments"
local notify_atomic = require "gw.notify_atomic"
local history = require "gw.history"

local type, tostring, tonumber = type, tostring, tonumber

local _M = {}

local ctx

-- Refusals: anyone who reaches the route can send a notification that is
-- refused, so their lines are bounded (gateway.refusal_log: the first
-- lines of each merchant and kind in a window, for all workers, then one
-- line saying how many more; paygate.log.limiter), and each is counted on
-- /metrics as paygate_gateway_notifications_refused_total{merchant,kind}
-- (merchant: a configured one, kind: parse_notification's, a small set,
-- or merchant_mismatch: a verified payment notification naming another
-- merchant than the payment's).
local refused_log, refused_counter

-- The kinds a configured merchant's notification is refused with, each
-- at 0 from the start (the first one raises an alert on its rate or
-- increase: a series that appears at 1 shows Prometheus none):
-- wx:parse_notification's (docs/wechatpay.md; not replayed, answered
-- apart), and merchant_mismatch. merchant_not_configured is the kind of
-- merchants no longer configured (at 0 once boot.unconfigured found them).
local REFUSED_KINDS = { "bad_signature", "stale_timestamp", "unknown_serial",
  "cert_expired", "malformed", "decrypt_failed", "replay_check_unavailable",
  "invalid_config", "timeout", "internal", "merchant_mismatch" }
-- Up to apply.PRESET_MERCHANTS merchants' (the first by mchid), and room
-- for the label sets the traffic brings (a kind not listed, the merchants
-- no longer configured, those past the first): anyone reaching the route
-- makes these, so their number stays bounded whatever is configured.
local REFUSED_MERCHANTS = apply.PRESET_MERCHANTS
local REFUSED_SERIES = REFUSED_MERCHANTS * #REFUSED_KINDS + 32

-- paygate_gateway_unknown_notifications_total{kind}: see unknown_target
local unknown_counter
local function unknown_metric()
  unknown_counter = unknown_counter or metrics.counter(
    "paygate_gateway_unknown_notifications_total",
    "Notifications (distinct ids) for a payment or refund not known here,"
    .. " answered FAIL.", { "kind" })
  return unknown_counter
end

function _M.init(c)
  ctx = c
  refused_log = paygate.log.limiter("gateway: notification refused",
                                    c.gateway and c.gateway.refusal_log)
  refused_counter = refused_counter or metrics.counter(
    "paygate_gateway_notifications_refused_total",
    "Notifications refused (not verified, malformed, another merchant's"
    .. " payment), each one, logged or not.", { "merchant", "kind" },
    { max_series = REFUSED_SERIES })
  -- at 0 from the start: the first one raises an alert on its increase
  -- (a series that appears at 1 shows Prometheus none)
  for _, kind in ipairs{ "payment", "refund" } do
    unknown_metric():inc({ kind = kind }, 0)
  end
end

--- syntax: notify.init_metrics(mchids) -- at start (mchids: a sorted
-- list): each refusal kind of the first REFUSED_MERCHANTS merchants at 0,
-- and their notifications and certificate downloads decrypted only with a
-- previous APIv3 key (paygate.wechatpay.rotation: a key rotation half
-- done, alerted on before the previous key is taken out)
function _M.init_metrics(mchids)
  for i = 1, math.min(#mchids, REFUSED_MERCHANTS) do
    for _, kind in ipairs(REFUSED_KINDS) do
      refused_counter:inc({ merchant = tostring(mchids[i]), kind = kind }, 0)
    end
    rotation.preset(mchids[i])
  end
end

--- syntax: notify.init_unconfigured(found) -- found: boot.unconfigured's
-- The merchants no longer configured whose notifications are refused
-- (merchant_not_configured): their series at 0, as the others'
function _M.init_unconfigured(found)
  for mchid in pairs(found) do
    refused_counter:inc({ merchant = mchid,
                          kind = "merchant_not_configured" }, 0)
  end
end

local function fail(message)
  return wechatpay.notify_fail(message)
end

-- A notification that does not verify -- a forgery, a probe, junk, or a
-- genuine one this gateway cannot check yet -- is answered 401 with
-- WeChat's FAIL body: WeChat sends a genuine one again on any 4xx or 5xx,
-- and monitoring tells junk apart from failures of ours, which stay 500:
-- the store, the replay record, and a resource that does not decrypt
-- under a signature that verified (WeChat sent it: our APIv3 key is
-- wrong). The 401 names the scheme WeChat signs with (RFC 7235).
local UNVERIFIED = { bad_signature = true, unknown_serial = true,
                     stale_timestamp = true, cert_expired = true,
                     malformed = true }

-- A `replayed` verdict: the same signed request came again. If its
-- notification's effect is committed, acknowledge it (an answer of ours
-- was lost); else WeChat must send it again (a fresh signature).
local function replayed(req)
  local env = json.decode(req.body or "")
  local id = type(env) == "table" and env.id
  if type(id) ~= "string" then return fail("replayed") end
  local rows, err = ctx.db:query("SELECT outcome FROM gw_notifications"
                                 .. " WHERE id = $1", { id })
  if not rows then return fail("store unavailable") end
  if rows[1] then return wechatpay.notify_ack() end
  return fail("replayed")
end

-- A notification for an order (or refund) this gateway does not know is
-- answered FAIL, so WeChat sends it again for a day: a store restored
-- from a backup, or a fix of the config, may still take it. It is never
-- one of the gateway's own not committed yet, on this instance or another
-- on the store: every attempt's row (out_trade_no) commits before WeChat
-- is asked for its prepay -- a create's first attempt, a resumed create's
-- and a switch's alike (gw.payments) -- and each refund's row before its
-- refund is asked. So an out_trade_no WeChat names and the store does not
-- hold was never sent from here (or was, before the backup the store was
-- restored from): another system's order on the merchant number with
-- this gateway's notify URL, or a notify_url pointing here by mistake.
-- An operator must see it. (A refund of an out_refund_no unknown here, of
-- an order it knows, is not one of these: made outside the gateway, its
-- payment is flagged refunded_elsewhere and it is acknowledged,
-- gw.apply.) Counted once per notification id, on /metrics as the
-- counter paygate_gateway_unknown_notifications_total{kind} (summed
-- over the workers, kept when one is restarted), and logged once per id
-- at warn.
local UNKNOWN = { unknown_order = "payment", unknown_refund = "refund" }
local RETRY_WINDOW = 25 * 3600        -- WeChat retries for 24 h 4 min

local function unknown_target(mchid, event, err)
  local kind = UNKNOWN[err.kind]
  local d = shared.get_dict("paygate")
  local first = d:add("gw:unknown_note:" .. tostring(event.id), 1,
                      RETRY_WINDOW)
  if first == false then return end   -- seen already: counted and logged
  d:incr("gw:unknown_notes:" .. kind, 1, 0)
  unknown_metric():inc({ kind = kind })
  local r = type(event.resource) == "table" and event.resource or {}
  paygate.log.warn("gateway: notification for a " .. kind .. " this"
    .. " gateway does not know: answered FAIL (WeChat retries it for a day;"
    .. (kind == "refund" and " a refund, made in the merchant platform, of"
        .. " an order this gateway did not make (another system's on the"
        .. " merchant number)?" or " an order another system made on the"
        .. " same merchant number?")
    .. " made after the backup this store was restored from? a wrong"
    .. " notify_url?)", {
      id = event.id, event_type = event.event_type, mchid = mchid,
      out_trade_no = r.out_trade_no, out_refund_no = r.out_refund_no })
end

--- syntax: n = notify.unknown_count(kind) -- "payment" | "refund": distinct
-- notifications for unknown targets since start (all workers)
function _M.unknown_count(kind)
  return tonumber(shared.get_dict("paygate"):get("gw:unknown_notes:"
                                                 .. kind)) or 0
end

--- syntax: outcome, after = notify.process(mchid, event)
-- The one transaction of a parsed notification (also for tools and
-- benchmarks). returns: outcome ("applied", "duplicate", "alarm",
-- "ignored", "refused") and the work to start after the commit, or nil,
-- err.
function _M.process(mchid, event)
  local r = event.resource
  if type(r) ~= "table" then
    return nil, paygate.error("malformed", "notification without resource")
  end
  -- the common payment notification as one write job (it joins SQLite's
  -- group commit); false: not that case, the transaction below has it
  local fast, ferr = notify_atomic.process(ctx.db, mchid, event)
  if fast then return fast end
  if fast == nil then return nil, ferr end
  local et = tostring(event.event_type)
  local is_refund = et:sub(1, 7) == "REFUND."
  local key
  if is_refund then
    key = "refund|" .. tostring(r.out_refund_no) .. "|"
          .. tostring(r.refund_status)
  else
    key = apply.payment_key(r)
  end
  local after
  local outcome, err = fsm.retry(ctx.db, function(tx)
    -- (a try rolled back and run again: its work after commit -- a late
    -- payment's refund, an attempt to close -- went with it)
    after = nil
    local now = model.now()
    local res, ierr = tx:exec("INSERT INTO gw_notifications (id,"
      .. " event_type, business_key, received_at, outcome) VALUES ($1, $2,"
      .. " $3, $4, 'received') ON CONFLICT (id) DO NOTHING",
      { event.id, et, key, now })
    if not res then return nil, ierr end
    if res.changes == 0 then return "duplicate" end
    local o = { resource = r, mchid = mchid, notification_id = event.id,
                source = "notification", actor = "wechatpay" }
    local out, list
    if is_refund then
      out, list = apply.refund(ctx, tx, o)
    elseif et:sub(1, 12) == "TRANSACTION." then
      out, list = apply.payment(ctx, tx, o)
    else
      out = "ignored"
    end
    if not out then return nil, list end
    after = list
    res, ierr = tx:exec("UPDATE gw_notifications SET outcome = $2 WHERE"
                        .. " id = $1", { event.id, out })
    if not res then return nil, ierr end
    return out
  end)
  if not outcome then return nil, err end
  return outcome, after
end

function _M.handler(req)
  local mchid = req.params.mchid
  local wx = ctx.wx[mchid]
  if not wx then
    -- a merchant taken out of config.merchants with payments or refunds
    -- still open (gw.boot.unconfigured): WeChat may be telling of money
    -- taken, so it is said (bounded) and counted; any other mchid is junk
    -- anyone can send, answered alike without a word
    if ctx.unconfigured and ctx.unconfigured[mchid] then
      refused_counter:inc({ merchant = mchid,
                            kind = "merchant_not_configured" })
      refused_log:warn({ mchid = mchid, kind = "merchant_not_configured" },
        { reason = "merchant " .. mchid .. " is no longer in"
          .. " config.merchants: answered 404 (WeChat retries for a day);"
          .. " add it again and reload to take its notifications" })
    end
    return 404, { code = "FAIL", message = "unknown merchant" }
  end
  local event, err = wx:parse_notification(req)
  if not event then
    if err.kind == "replayed" then return replayed(req) end
    refused_counter:inc({ merchant = mchid, kind = err.kind })
    if wechatpay.is_doctor_probe(req) then
      -- paygate doctor's unsigned probe, refused as any unsigned request
      -- below (the same answer): only its line differs. Said at info and
      -- named, neither recorded nor captured: the console's refused
      -- notifications and the newest captures are kept for WeChat's (a
      -- doctor run left a warning, a row and a capture naming nothing),
      -- and the probe's fixed bytes hold nothing to verify
      refused_log:info({ mchid = mchid, kind = err.kind,
                         probe = "paygate doctor" },
                       { reason = tostring(err.message) })
    else
      -- reason: what was wrong (which header, which check); the message
      -- quotes no secret, and header values only bounded and printable
      -- recorded for the console (why), and captured whole: verify is the
      -- one command that checks the capture; doctor instead when the
      -- client holds no key to check it with (doctor names why)
      local _, verify, doctor = history.refused(wx, mchid, req, err)
      refused_log:warn({ mchid = mchid, kind = err.kind },
                       { reason = tostring(err.message), verify = verify,
                         doctor = doctor })
    end
    if UNVERIFIED[err.kind] then
      local status, body = wechatpay.notify_fail(err.kind, 401)
      return status, body, { ["WWW-Authenticate"] = wx.conf.signer.schema }
    end
    return fail(err.kind)
  end
  local outcome, after = _M.process(mchid, event)
  if not outcome and type(after) == "table" and UNKNOWN[after.kind] then
    unknown_target(mchid, event, after)
    return fail(after.kind)
  end
  -- the order (and refund) it was about, named by the lines below as the
  -- unknown-target line and the WeChat call lines name them
  local r = type(event.resource) == "table" and event.resource or {}
  if not outcome then
    if type(after) == "table" and after.kind == "merchant_mismatch" then
      -- a payment notification whose resource names another merchant (or
      -- sub-merchant) than the payment's, or came through another's
      -- route: refused, nothing applied. Counted with the other refusals
      -- and recorded beside them, so the console's overview and the
      -- payment's page list it (was: this warn line only)
      refused_counter:inc({ merchant = mchid, kind = after.kind })
      history.refused_event(mchid, req, event, after)
    end
    -- and the merchant it names (a merchant_mismatch's message names the
    -- payment's merchant and the notification's, sp/sub for a service
    -- provider's: was the payment id alone)
    paygate.log.warn("gateway: notification not applied", {
      id = event.id, kind = after and after.kind,
      error = tostring(after), event_type = event.event_type,
      mchid = mchid, sp_mchid = r.sp_mchid, sub_mchid = r.sub_mchid,
      out_trade_no = r.out_trade_no, out_refund_no = r.out_refund_no })
    return fail(after and after.kind or "error")
  end
  paygate.log.info("gateway: notification " .. outcome, { id = event.id,
                   event_type = event.event_type, mchid = mchid,
                   out_trade_no = r.out_trade_no,
                   out_refund_no = r.out_refund_no })
  if after then payments.after(after) end
  return wechatpay.notify_ack()
end

return _M
