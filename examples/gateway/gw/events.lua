-- gw.events: the gateway's events through paygate.outbox. emit() is
-- called inside the transaction of each state change, so an event exists
-- exactly when its change committed; start() runs the dispatcher (every
-- worker; leases decide who delivers what) with the sinks from the
-- config: signed webhooks, a Redis stream, and the hooks in gw/hooks.lua.
local paygate = require "paygate"
local outbox = require "paygate.outbox"
local model = require "gw.model"

local pairs, ipairs, type = pairs, ipairs, type

local _M = {}

-- hooks.lua's on_<name> shorthands
local SHORT = {
  on_paid = "payment.paid", on_refunded = "refund.succeeded",
  on_closed = "payment.closed", on_failed = "payment.failed",
  on_late_paid = "payment.late_paid",
  on_refund_abnormal = "refund.abnormal",
  on_alarm = { "alarm.amount_mismatch", "alarm.merchant_mismatch",
               "alarm.order_mismatch", "alarm.refunded_elsewhere" },
}

-- Every event type the gateway emits (docs/gateway.md, Events): what a
-- webhook's `types` may name, and openapi.json's EventType enum (a
-- receiver generated from the contract knows these; openapi_spec checks
-- the two lists are the same).
_M.TYPES = {
  "payment.paying", "payment.paid", "payment.closed", "payment.failed",
  "payment.unknown", "payment.partially_refunded", "payment.refunded",
  "refund.succeeded", "refund.abnormal", "refund.closed", "refund.failed",
  "payment.late_paid", "alarm.amount_mismatch", "alarm.merchant_mismatch",
  "alarm.order_mismatch", "alarm.refunded_elsewhere",
}
-- the same as a set (read only: the config's and the admin's checks)
_M.KNOWN = {}
for _, t in ipairs(_M.TYPES) do _M.KNOWN[t] = true end

-- type -> whether a sink of this worker's dispatcher takes it (d:wants),
-- asked once per type; reset by start()
local wanted = {}

local function settled(etype)
  local d = _M.dispatcher
  if not d then return false end       -- no dispatcher here (a tool): pending
  local w = wanted[etype]
  if w == nil then
    w = d:wants(etype)
    wanted[etype] = w
  end
  return not w
end

--- syntax: event = events.event(type, payment_row[, refund_row[, extra]])
-- The outbox event { subject, type, payload = { type, payment, refund?,
-- at, ... extra } } of a change: for outbox.enqueue, or outbox.statement
-- in a db:atomic job (gw.notify_atomic). A type no sink takes (no webhook
-- or stream for it, no hook in gw/hooks.lua) is recorded delivered at
-- once (outbox's settled): listed and replayable, never dispatched.
function _M.event(etype, payment, refund, extra)
  local payload = { type = etype, payment = model.payment_json(payment),
                    at = paygate.now() }
  if refund then payload.refund = model.refund_json(refund, payment) end
  if extra then
    for k, v in pairs(extra) do payload[k] = v end
  end
  return { subject = payment.id, type = etype, payload = payload,
           settled = settled(etype) }
end

-- paygate_gateway_events_total{type}: the events emitted, by type, once
-- their change committed (whether a sink takes the type or not), so
-- /metrics says how many refunds succeeded, ended abnormal (money owed
-- to a payer until a person applies for it), closed or failed, ...
local counter
local function counter_of()
  if not counter then
    counter = require("paygate.metrics").counter(
      "paygate_gateway_events_total", "Events the gateway emitted (a"
      .. " state change committed: payment.paid, refund.abnormal, ...),"
      .. " by type.", { "type" })
    for _, t in ipairs(_M.TYPES) do counter:inc({ type = t }, 0) end
  end
  return counter
end

--- syntax: events.count(type) -- one event of type emitted (committed)
function _M.count(etype)
  counter_of():inc({ type = etype })
end

--- syntax: id, err = events.emit(tx, type, payment_row[, refund_row[, extra]])
-- Enqueues events.event(...) for the payment's subject (delivered in
-- order per payment), counted once tx commits.
function _M.emit(tx, etype, payment, refund, extra)
  local id, err = outbox.enqueue(tx, _M.event(etype, payment, refund, extra))
  if id then tx:on_commit(function() _M.count(etype) end) end
  return id, err
end

--- syntax: sinks = events.sinks(gateway_cfg[, hooks])
function _M.sinks(g, hooks)
  local sinks = {}
  for _, w in ipairs(g.webhooks or {}) do
    sinks[#sinks + 1] = outbox.webhook{ url = w.url, secret = w.secret,
                                        name = w.name, types = w.types,
                                        timeout = w.timeout,
                                        headers = w.headers,
                                        ca_file = w.ca_file }
  end
  if g.redis_stream then
    sinks[#sinks + 1] = outbox.redis_stream{ url = g.redis,
      connect = g.redis_opts,
      stream = g.redis_stream.stream, maxlen = g.redis_stream.maxlen }
  end
  local map = {}
  for k, fn in pairs(hooks or {}) do
    if type(fn) == "function" then
      local t = SHORT[k] or k
      for _, name in ipairs(type(t) == "table" and t or { t }) do
        map[name] = fn
      end
    end
  end
  sinks[#sinks + 1] = outbox.hooks(map, { timeout = g.hooks_timeout })
  return sinks
end

--- syntax: hooks, why = events.load_hooks()
-- gw/hooks.lua's table, or nil and why it does not load (an error in it,
-- a module that returns no table, a function under a name that is no
-- event type, "*" or on_<name> shorthand, or such a name that holds no
-- function; other values, a module's constants, may stay). The gateway
-- refuses to start then: running without its hooks would count every
-- event as done for the hooks sink (no hook for its type), so fixing
-- hooks.lua later would never bring those events to it.
function _M.load_hooks()
  local ok, hooks = pcall(require, "gw.hooks")
  if not ok then
    return nil, "gw/hooks.lua does not load: " .. tostring(hooks)
  end
  if type(hooks) ~= "table" then
    return nil, "gw/hooks.lua must return a table of hooks (got "
                .. type(hooks) .. ": a missing 'return _M'?)"
  end
  -- a misspelt name (on_payed) is a hook that never runs while the hooks
  -- sink counts its events as done, as a webhook's misspelt type is
  local known = { ["*"] = true }
  for t in pairs(_M.KNOWN) do known[t] = true end
  for k, v in pairs(hooks) do
    local name = tostring(k)
    if type(k) ~= "string" or not (SHORT[k] or known[k]) then
      if type(v) == "function" then
        local shorts = {}
        for s in pairs(SHORT) do shorts[#shorts + 1] = s end
        table.sort(shorts)
        return nil, "gw/hooks.lua: " .. name .. " is neither an event type"
          .. " nor one of " .. table.concat(shorts, ", ")
      end
    elseif type(v) ~= "function" then
      return nil, "gw/hooks.lua: " .. name .. " must be a function (got "
                  .. type(v) .. ")"
    end
  end
  return hooks
end

--- syntax: d = events.start(db, gateway_cfg[, over])
-- Starts the dispatcher (a task), stopped by the worker's graceful stop,
-- and returns it. over: options that win
-- over gateway.dispatcher's (prune = false: paygate.retention prunes).
-- Raises when gw/hooks.lua does not load (events.load_hooks).
function _M.start(db, g, over)
  local hooks, why = _M.load_hooks()
  if not hooks then
    error("gateway: " .. why, 2)
  end
  local opts = { sinks = _M.sinks(g, hooks), name = "gateway" }
  for k, v in pairs(g.dispatcher or {}) do opts[k] = v end
  for k, v in pairs(over or {}) do opts[k] = v end
  counter_of()                  -- every type on /metrics, from 0
  local d = outbox.dispatcher(db, opts)
  d:start()
  _M.dispatcher = d
  wanted = {}
  -- a graceful stop (restart, reload) hands the shard leases over at once:
  -- the next workers deliver without waiting for them to expire
  paygate.on_stop(function() d:stop() end)
  return d
end

return _M
