-- examples/gateway: the log as a log store reads it. One JSON object per
-- line with ts, level, pid, msg; a payment traceable from its create's
-- access line (request_id) to the WeChat call it made (out_trade_no) to
-- the notification that paid it and the event that followed (subject, the
-- payment id); no secret in any line, at debug level too.
--
-- was: the WeChat call was in no line (only in the console's history), and
-- "gateway: notification applied" named the notification's id alone: from
-- the log no payment could be followed from its request to its callback.
local testing = require "paygate.testing"
local json = require "paygate.json"
local gwcore = dofile("examples/gateway/spec/core_support.lua")

describe("gateway log lines", function()
  local sim, gw, secret, dir

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    secret = "whsec-trace-" .. require("paygate.crypto").random_nonce(24)
    dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -m 700 " .. dir) == 0)
    local f = assert(io.open(dir .. "/wh.secret", "w"))
    f:write(secret, "\n")
    f:close()
    -- a receiver nobody listens on: every delivery fails, the event dies
    local port = require("paygate.core").free_port()
    gw = gwcore.start(sim, { log_level = "debug", gateway = {
      webhooks = { { name = "erp", secret_file = dir .. "/wh.secret",
                     url = "http://127.0.0.1:" .. port .. "/hook" } },
      dispatcher = { interval = 0.05, max_attempts = 1 } } })
  end)

  teardown(function()
    if gw then gw.srv:stop() gw:stop() end
    testing.stop_all()
    if dir then os.execute("rm -rf " .. dir) end
  end)

  local function lines()
    local out = {}
    for line in gw.srv:logs():gmatch("[^\n]+") do
      local rec = json.decode(line)
      assert.is_table(rec, line)
      out[#out + 1] = rec
    end
    return out
  end

  it("lead from the access line to the WeChat call, the notification"
     .. " and the event", function()
    local p = gw:create{ order_id = "trace-1" }
    sim:pay_and_wait(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    local recs = testing.wait_until(function()
      local recs = lines()
      for _, r in ipairs(recs) do
        if r.msg == "outbox: dead letter" and r.subject == p.id
           and r.type == "payment.paid" then
          return recs
        end
      end
    end, 15, "payment.paid dead-lettered")
    local create_rid
    for _, r in ipairs(recs) do
      for _, k in ipairs{ "ts", "level", "pid", "msg" } do
        assert.is_not_nil(r[k], k .. " in " .. json.encode(r))
      end
      if r.msg == "access" and r.method == "POST" and r.path == "/v1/payments"
         and r.status == 201 then
        create_rid = r.request_id
      end
    end
    assert.is_string(create_rid)
    -- the call the create made, under its request id
    local call
    for _, r in ipairs(recs) do
      if r.msg == "gateway: wechat pay call" and r.request_id == create_rid then
        call = r
      end
    end
    assert.is_table(call, "a WeChat call line with the create's request_id")
    assert.equal(p.out_trade_no, call.out_trade_no)
    assert.equal("POST", call.method)
    assert.equal("ok", call.outcome)
    assert.equal(sim.merchant.mchid, call.mchid)
    -- the notification that paid it names the order
    local applied
    for _, r in ipairs(recs) do
      if r.msg == "gateway: notification applied"
         and r.event_type == "TRANSACTION.SUCCESS" then
        applied = r
      end
    end
    assert.is_table(applied, "the notification's line")
    assert.equal(p.out_trade_no, applied.out_trade_no)
    assert.equal(sim.merchant.mchid, applied.mchid)
    -- (the event's subject is the payment: its out_trade_no's prefix)
    assert.equal(p.id, p.out_trade_no:sub(1, #p.id))
  end)

  it("hold no secret, at debug level", function()
    local text = gw.srv:logs()
    assert.truthy(text:find('"level":"debug"', 1, true))
    for name, s in pairs{ webhook_secret = secret, api_secret = gw.secret,
                          apiv3_key = sim.merchant.apiv3_key } do
      assert.is_nil(text:find(s, 1, true), name)
    end
    assert.is_nil(text:find("PRIVATE KEY", 1, true))
  end)
end)
