-- A WeChat call that outlasts the request handler's own deadline: the
-- merchant client's default deadline (30 s) and the server's
-- limits.request_timeout (30 s) were the same, and the call started after
-- the handler's clock, so with WeChat silent the server's deadline fired
-- first: 504 deadline_exceeded (in neither the docs nor openapi.json),
-- the handler cancelled mid-call, the payment left `created` instead of
-- `unknown`. A call in a handler now ends HANDLER_MARGIN s before the
-- handler's deadline: the documented 504 timeout, the payment unknown.
local testing = require "paygate.testing"
local core = dofile("examples/gateway/spec/core_support.lua")

describe("gateway: a WeChat call longer than the request's deadline",
         function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    local db_url
    local srv = testing.start_app{ app = "examples/gateway",
      args = { "--log-level", "info" },
      config = function(s)
        local c = core.config(sim, s, { reconcile = { enabled = false } })
        -- (the merchant client keeps its default deadline, 30 s)
        c.limits = { request_timeout = 6 }
        db_url = c.gateway.db
        return c
      end }
    gw = core.gateway(srv, db_url)
  end)

  teardown(function()
    sim:clear_faults()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  it("answers the documented 504 timeout before the handler's deadline,"
     .. " the payment unknown", function()
    -- WeChat silent: every attempt (and its retries) held at the
    -- simulator until the teardown's clear_faults lets them go (was a
    -- 20 s latency, which the simulator was still sleeping at its stop:
    -- the teardown waited for it, ~9 s)
    sim:hold("prepay", { count = 20, seconds = 120 })
    local t0 = require("paygate.core").mono()
    local res = gw:call("POST", "/v1/payments", { order_id = "dl-"
      .. require("paygate.crypto").random_nonce(8), channel = "native",
      amount = 101, description = "deadline" })
    local took = require("paygate.core").mono() - t0
    assert.equal(504, res.status, res.body)
    assert.equal("timeout", res.json and res.json.error, res.body)
    -- ended by the call's own deadline (6 - 2 s), not the server's (6 s)
    assert(took < 5.8, ("answered after %.2f s"):format(took))
    local rows = assert(gw.db:query("SELECT state FROM gw_payments WHERE"
      .. " order_id = $1", { res.json.order_id or "" }))
    if not rows[1] then
      rows = assert(gw.db:query("SELECT state FROM gw_payments ORDER BY"
                                .. " created_at DESC LIMIT 1"))
    end
    assert.equal("unknown", rows[1].state)
  end)
end)
