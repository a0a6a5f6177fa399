-- gw.refunds.send when the WeChat Pay client refuses the call itself,
-- before anything is sent (invalid_params: a field its own checks refuse).
-- Nothing reached WeChat, so the refund is failed ("rejected"), not
-- "unknown": an unknown refund counts against the payment and is sent
-- again on every round of the refund checks, refused the same way each
-- time, for ever.
local json = require "paygate.json"
local server = require "paygate.testing.server"
local errors = require "paygate.wechatpay.errors"
local gwcore = dofile("examples/gateway/spec/core_support.lua")

package.path = "examples/gateway/?.lua;" .. package.path
local model = require "gw.model"
local notify = require "gw.notify"

describe("gateway refund the client refuses before sending", function()
  local dir, db, calls
  local wx = {
    parse_notification = function(_, req) return json.decode(req.body) end,
    refund = function()
      calls = calls + 1
      return nil, errors.invalid_params("reason", "must be at most 80"
                                        .. " characters")
    end,
  }

  setup(function()
    dir = server.tmpdir()
    db = gwcore.inproc("sqlite:" .. dir .. "/gw.db", { [gwcore.MCHID] = wx })
  end)

  teardown(function()
    db:close()
    server.rmdir(dir)
  end)

  it("is failed (rejected), not unknown", function()
    local id = gwcore.payment(db, "paying", 100)
    local req = { params = { mchid = gwcore.MCHID },
                  body = json.encode(gwcore.paid_event(id .. "_1")),
                  header = function() return nil end }
    assert.equal(204, (notify.handler(req)))
    local rid = model.new_refund_id()
    local now = model.now()
    assert(model.refunds:create(db, { id = rid, payment_id = id,
      out_refund_no = rid, out_trade_no = id .. "_1", kind = "merchant",
      amount = 40, created_at = now, updated_at = now }))
    calls = 0
    local row, how = require("gw.refunds").send(rid)
    assert.equal(1, calls)
    assert.equal("rejected", how)
    assert.equal("failed", row.state)
  end)
end)
