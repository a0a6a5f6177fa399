-- paygate.wechatpay's outbound side against hostile answers on loopback
-- (spec/support/wxserver and raw servers): what an audit found.
local core = require "paygate.core"
local wxtest = require "support.wxtest"

local P1 = wxtest.P1
local dir, keys, srv

local function client(over) return wxtest.client(srv, keys, over) end

setup(function() dir, keys, srv = wxtest.serve() end)
teardown(function() wxtest.stop(srv, dir) end)
before_each(function() wxtest.fresh(srv, P1) end)

describe("an attempt with less than a millisecond left", function()
  it("still times out (a timeout that rounds to 0 ms is no timeout to "
     .. "libcurl)", function()
    local wx = client()
    wxtest.queue(srv, "GET", "/v3/slow", { { delay = 3, body = "{}" } })
    local t0 = core.mono()
    local _, err = wx:request("GET", "/v3/slow", nil,
                              { timeout = 0.0004, max_attempts = 1 })
    local took = core.mono() - t0
    wx:stop()
    assert.is_nil(_)
    assert.equal("timeout", err.kind, tostring(err))
    assert.is_true(took < 1.5, ("took %.2f s"):format(took))
  end)
end)
