-- examples/gateway: its counters on /metrics (fsm transitions, illegal
-- transitions, alarms) are paygate.metrics counters: one series each,
-- summed over the workers, with no per-worker label, and kept when a
-- worker is restarted.
local testing = require "paygate.testing"
local gwcore = dofile("examples/gateway/spec/core_support.lua")

describe("gateway metrics", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = gwcore.start(sim, { workers = 2 })
  end)

  teardown(function()
    if gw then gw.srv:stop() gw:stop() end
    testing.stop_all()
  end)

  local function metrics()
    local res = gw.srv:admin_get("/metrics")
    return res and res.status == 200 and res.body or ""
  end

  local function transitions()
    return tonumber(metrics():match(
      '\npaygate_gateway_fsm_transitions_total{machine="payment"} (%d+)\n'))
  end

  it("keeps the counts of a restarted worker, with no pid label", function()
    for i = 1, 3 do
      gw:create{ order_id = "m-" .. i }
    end
    -- each create: created (no transition), then paying
    local before = testing.wait_until(function()
      local n = transitions()
      return n and n >= 3 and n
    end, 15, "the transitions counted")
    local text = metrics()
    assert.not_matches('paygate_gateway_[%w_]*{[^}]*worker=', text)
    assert.matches("# TYPE paygate_gateway_fsm_transitions_total counter",
                   text, 1, true)
    assert.matches('\npaygate_gateway_fsm_illegal_transitions_total{machine='
                   .. '"refund"} %d+\n', text)
    -- each worker killed in turn (one of them counted the creates): the
    -- master restarts it, the counts stay
    local old = gw.srv:workers()
    assert.equal(2, #old)
    for _, victim in ipairs(old) do
      gw.srv:kill_worker(victim)
      assert.equal(before, transitions())
    end
    gw:create{ order_id = "m-4" }
    testing.wait_until(function()
      local n = transitions()
      return n and n >= before + 1
    end, 15, "the new worker's transitions added")
  end)
end)
