-- examples/gateway: a notification for an order the gateway does not know
-- is answered FAIL (500: WeChat sends it again for a day), and an
-- operator sees it: counted once per notification id on /metrics, logged
-- once per id at warn however often WeChat retries, naming its likely
-- causes -- never "another instance's, not committed yet": every
-- attempt's row commits before WeChat is asked for its prepay.
local testing = require "paygate.testing"
local http = require "paygate.http"
local json = require "paygate.json"
local core = dofile("examples/gateway/spec/core_support.lua")

describe("gateway: notifications for unknown orders", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim, { workers = 2,
                           gateway = { reconcile = { enabled = false } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  local function metrics()
    return assert(http.request{ url = "http://127.0.0.1:" .. gw.srv.admin
                                .. "/metrics" }).body
  end

  it("answers FAIL, counts it once and warns once per notification id",
     function()
    local url = gw.srv:url("/wechatpay/notify/" .. sim.merchant.mchid)
    local no = sim:order{ notify_url = url, total = 7 }
    sim:pay(no)
    -- WeChat (time-scaled) sends it again and again: four answers at least
    -- (an attempt is listed before its answer: the last one may still be
    -- awaiting it, so answered ones are counted)
    local n
    testing.wait_until(function()
      n = sim:notifications{ out_trade_no = no }[1]
      if not n then return false end
      local answered = 0
      for _, a in ipairs(n.attempts) do
        if a.status ~= nil then answered = answered + 1 end
      end
      return answered >= 4
    end, 30, "four answered deliveries of the notification")
    for i, a in ipairs(n.attempts) do
      if a.status == nil and i == #n.attempts then
        assert.matches("^in_flight", tostring(a.error))
      else
        assert.equal(500, a.status)
      end
    end
    testing.wait_until(function()
      return metrics():find('paygate_gateway_unknown_notifications_total'
                            .. '{kind="payment"} 1', 1, true) ~= nil
    end, 10, "the counter on /metrics")
    local warned = 0
    for line in gw.srv:logs():gmatch("[^\n]+") do
      local rec = json.decode(line)
      if type(rec) == "table" and rec.level == "warn"
         and tostring(rec.msg):find("does not know", 1, true) then
        warned = warned + 1
        assert.equal(n.id, rec.id)
        assert.equal(no, rec.out_trade_no)
        -- the real causes (was: "another instance's, not committed yet?",
        -- which an order of the gateway's never is)
        assert.is_nil(rec.msg:find("not committed yet", 1, true), rec.msg)
        assert.truthy(rec.msg:find("another system made on the same"
                                   .. " merchant number", 1, true), rec.msg)
        assert.truthy(rec.msg:find("restored from", 1, true), rec.msg)
        assert.truthy(rec.msg:find("wrong notify_url", 1, true), rec.msg)
      end
    end
    assert.equal(1, warned)
    -- a second unknown order counts again
    local no2 = sim:order{ notify_url = url, total = 8 }
    sim:pay(no2)
    testing.wait_until(function()
      return metrics():find('paygate_gateway_unknown_notifications_total'
                            .. '{kind="payment"} 2', 1, true) ~= nil
    end, 10, "the second one counted")
    -- a counter (its name says so), kept when the worker that counted is
    -- restarted: each worker killed in turn, the count stays
    assert.matches("# TYPE paygate_gateway_unknown_notifications_total"
                   .. " counter", metrics(), 1, true)
    local old = gw.srv:workers()
    assert.equal(2, #old)
    for _, victim in ipairs(old) do
      gw.srv:kill_worker(victim)
      assert.truthy(metrics():find('paygate_gateway_unknown_notifications'
        .. '_total{kind="payment"} 2', 1, true), "kept after a restart")
    end
  end)
end)
