-- examples/gateway with 50 merchants (one simulator merchant's keys under
-- 50 mchids): a worker holds 512 counter series in all, and the counters
-- alerted on are per merchant. The series pre-set at 0 at start are the
-- same first 16 merchants' in every family, and a merchant past them gets
-- its own series with its first count. Before: each family pre-set as
-- many merchants as its cap held (settled_without_notification_total 25,
-- notification_after_query_total 50, notifications_refused_total 16),
-- so a payment of merchant #50 settled without its notification was
-- counted in the family's _overflow series, for good.
local testing = require "paygate.testing"
local gwcore = dofile("examples/gateway/spec/core_support.lua")

local N = 50

describe("gateway metrics with 50 merchants", function()
  local sim, gw, ms

  setup(function()
    ms = { testing.merchant{ mchid = "1900000001" } }
    for i = 2, N do
      local m = {}
      for k, v in pairs(ms[1]) do m[k] = v end
      m.mchid = ("19%08d"):format(i)
      m.appids = { ("wx%016x"):format(i) }
      m.appid = m.appids[1]
      ms[i] = m
    end
    sim = testing.simulator{ time_scale = 100, merchants = ms }
    local srv = testing.start_app{ app = "examples/gateway",
      config = function(srv)
        local c = gwcore.config(sim, srv, { reconcile = {
          enabled = false, check_after = 1, bill = false } })
        for i = 2, N do
          local m = sim:client_config(ms[i], { apiv3_key = false })
          m.apiv3_key_file = c.merchants[1].apiv3_key_file
          c.merchants[i] = m
        end
        return c
      end }
    gw = gwcore.gateway(srv, "sqlite:" .. srv.dir .. "/gw.db")
  end)

  teardown(function()
    if gw then gw.srv:stop() gw:stop() end
    testing.stop_all()
  end)

  local function metrics()
    return assert(gw.srv:admin_get("/metrics")).body
  end

  -- the series of merchant m in family name: { [labels] = value }
  local function series(text, name, mchid)
    local out = {}
    for labels, v in text:gmatch("\n" .. name .. '{merchant="' .. mchid
                                 .. '",([^}]*)} (%S+)') do
      out[labels] = tonumber(v)
    end
    return out
  end

  local FAMILIES = { paygate_gateway_settled_without_notification_total = 4,
                     paygate_gateway_notification_after_query_total = 2,
                     paygate_gateway_notifications_refused_total = 11 }

  it("pre-sets the same first 16 merchants in every family", function()
    local text = metrics()
    for i, m in ipairs(ms) do
      for name, n in pairs(FAMILIES) do
        local got = 0
        for _ in pairs(series(text, name, m.mchid)) do got = got + 1 end
        assert.equal(i <= 16 and n or 0, got,
                     name .. " of merchant #" .. i)
      end
    end
  end)

  it("counts merchant #50's payment settled without its notification"
     .. " under its own labels", function()
    local m = ms[N]
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
    local p = gw:create{ mchid = m.mchid, amount = 150 }
    assert.equal(m.mchid, p.mchid)
    sim:pay(p.out_trade_no)
    local wx = sim:client(m)
    local txn = assert(wx:query_by_out_trade_no(p.out_trade_no))
    wx:stop()
    local st = require("paygate.civil").epoch(txn.success_time)
    testing.wait_until(function() return os.time() >= st + 2 end, 10,
                       "check_after past the payment")
    assert.equal("paid", gw:get(p.id, "?refresh=1").state)
    local text = metrics()
    assert.same(1, series(text,
      "paygate_gateway_settled_without_notification_total",
      m.mchid)['kind="payment",source="refresh"'])
    assert.falsy(text:match(
      '\npaygate_gateway_settled_without_notification_total{merchant='
      .. '"_overflow"[^}]*} [1-9]'))
  end)
end)
