-- gw.upstream: what the gateway knows of WeChat's health, in one place
-- for GET /admin/upstream, the console's overview and /metrics:
--   status(ctx)   -> { degraded, worker, merchants = { [mchid] =
--                    { [endpoint] = { breaker, retry_after, calls,
--                    failures, timeout, timeout_source, p95, samples } } } }
--                    (GET /admin/upstream's answer)
--   not_closed(st) -> the breakers of a status that are not closed, as a
--                    list { mchid, endpoint, breaker, retry_after, calls,
--                    failures }, sorted (the console's table)
--   publish(ctx)  -> in a worker: the gauges, every second
--     paygate_gateway_degraded                 1 while the switch is on
--     paygate_gateway_circuit_breaker_state{merchant,endpoint}
--                                              upstream.state: 0 closed,
--                                              1 open, 2 half-open
--     Each worker sets them from the shared dict (the switch, the
--     breakers), so /metrics shows them whichever worker set them last
--     and whether or not a worker died or was reloaded meanwhile. No
--     write to the shared dict: reads only, once a second, off the
--     request path.
local paygate = require "paygate"
local core = require "paygate.core"

local pairs, ipairs, sort = pairs, ipairs, table.sort

local _M = {}

--- syntax: st = upstream.status(ctx)
function _M.status(ctx)
  local merchants = {}
  for mchid, client in pairs(ctx.wx) do
    merchants[mchid] = client:upstream_status().endpoints
  end
  return { degraded = ctx.degraded(), worker = core.pid(),
           merchants = merchants }
end

local function sorted(list)
  sort(list, function(a, b)
    if a.mchid ~= b.mchid then return a.mchid < b.mchid end
    return a.endpoint < b.endpoint
  end)
  return list
end

--- syntax: list, total = upstream.not_closed(st)
-- returns: the breakers of st (upstream.status) that are not closed,
-- sorted by merchant and endpoint; and how many breakers st holds
function _M.not_closed(st)
  local out, total = {}, 0
  for mchid, eps in pairs(st.merchants) do
    for ep, e in pairs(eps) do
      total = total + 1
      if e.breaker ~= "closed" then
        out[#out + 1] = { mchid = mchid, endpoint = ep, breaker = e.breaker,
                          retry_after = e.retry_after, calls = e.calls,
                          failures = e.failures }
      end
    end
  end
  return sorted(out), total
end

_M.STATE = { closed = 0, open = 1, half_open = 2 }

--- syntax: n = upstream.state(e)
-- e: a breaker of upstream.status (or wx:breakers()).
-- returns: 0 closed, 1 open, 2 half-open: a probe is out, or the
-- cool-down is over (an open breaker with retry_after 0, as GET
-- /admin/upstream says it: the next call goes through as the probe).
-- The breaker stays "open" in the shared dict until a call probes; an
-- alert on 1 kept firing after WeChat recovered, with no call refused.
function _M.state(e)
  if e.breaker == "open" and e.retry_after == 0 then
    return _M.STATE.half_open
  end
  return _M.STATE[e.breaker] or _M.STATE.open
end

-- A worker holds 128 gauge series for every gauge of the app (the bill
-- reconciliation's, the certificates'...): this one takes at most
-- MAX_BREAKERS of them, the breakers that are not closed first.
_M.MAX_BREAKERS = 48

--- syntax: upstream.publish(ctx) -- in a worker, once
function _M.publish(ctx)
  local metrics = require "paygate.metrics"
  local degraded = metrics.gauge("paygate_gateway_degraded",
    "1 while the degradation switch is on (calls to WeChat Pay refused).")
  local breaker = metrics.gauge("paygate_gateway_circuit_breaker_state",
    "A WeChat Pay endpoint's circuit breaker: 0 closed, 1 open, "
    .. "2 half_open.")
  local shown, cut_said = {}, false   -- "mchid endpoint" -> labels
  local function refresh()
    degraded:set(ctx.degraded() and 1 or 0)
    local list = {}
    for mchid, client in pairs(ctx.wx) do
      for ep, e in pairs(client:breakers()) do
        list[#list + 1] = { mchid = mchid, endpoint = ep,
                            state = _M.state(e) }
      end
    end
    sort(list, function(a, b)
      if (a.state == 0) ~= (b.state == 0) then return a.state ~= 0 end
      if a.mchid ~= b.mchid then return a.mchid < b.mchid end
      return a.endpoint < b.endpoint
    end)
    local now = {}
    for i, b in ipairs(list) do
      if i > _M.MAX_BREAKERS then
        if not cut_said then
          cut_said = true
          paygate.log.warn("gateway: paygate_gateway_circuit_breaker_state"
            .. " shows " .. _M.MAX_BREAKERS .. " breakers; closed ones past"
            .. " them are left out (said once)", { breakers = #list })
        end
        break
      end
      local key = b.mchid .. " " .. b.endpoint
      local labels = shown[key] or { merchant = b.mchid,
                                     endpoint = b.endpoint }
      breaker:set(b.state, labels)
      now[key] = labels
    end
    for key, labels in pairs(shown) do
      if not now[key] then breaker:remove(labels) end
    end
    shown = now
  end
  refresh()
  paygate.timer.every(1, refresh)
end

return _M
