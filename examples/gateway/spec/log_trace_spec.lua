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
      -- one type per field across lines: `id` is a string everywhere (was
      -- a number on the outbox's lines, a string on the notification's:
      -- a log store that types a field by its first value, Elasticsearch's
      -- dynamic mapping, then drops the lines of the other type)
      if r.id ~= nil then
        assert.is_string(r.id, "id in " .. json.encode(r))
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

-- was: only the server's own error answers (a 500, a 504) named the
-- request id, in their body; an answer of the gateway's -- a create's
-- 201, a notification's 204, a 401 -- carried none, so a client (or
-- WeChat's support) could not quote the id that finds its log lines.
describe("gateway request ids", function()
  local S = require "examples.gateway.spec.support"
  local env

  setup(function() env = S.start() end)
  teardown(S.stop)

  local function access_line(rid)
    return testing.wait_until(function()
      for line in env.gw:logs():gmatch("[^\n]+") do
        local rec = json.decode(line)
        if rec and rec.msg == "access" and rec.request_id == rid then
          return rec
        end
      end
    end, 10, "the access line of request " .. rid)
  end

  -- (a field sent twice would come joined, "a, b": never hex alone)
  local function rid_of(res)
    return res.headers["x-request-id"]
  end

  it("every answer of the merchant API carries X-Request-Id, its log"
     .. " lines' request_id", function()
    local res = env:api("POST", "/v1/payments", { order_id = S.order_id(),
      channel = "native", amount = 100, description = "rid" })
    assert.equal(201, res.status, res.body)
    local rid = rid_of(res)
    assert.is_string(rid, "X-Request-Id on a 201")
    assert.matches("^%x+$", rid)
    local line = access_line(rid)
    assert.equal("POST", line.method)
    assert.equal("/v1/payments", line.path)
    assert.equal(201, line.status)
    -- a refusal of the gateway's own (no signature)
    local refused = env:api("GET", "/v1/payments/" .. res.json.payment.id,
                            nil, { sign = false })
    assert.equal(401, refused.status, refused.body)
    assert.equal(401, access_line(assert(rid_of(refused))).status)
    -- the client's id, when it is safe (8..39 of letters, digits, - _ .)
    local mine = "client-rid-0001"
    local got = env:api("GET", "/v1/payments/" .. res.json.payment.id, nil,
                        { headers = { ["X-Request-Id"] = mine } })
    assert.equal(200, got.status, got.body)
    assert.equal(mine, rid_of(got))
    assert.equal(200, access_line(mine).status)
  end)

  it("takes no unsafe X-Request-Id from the client: makes its own",
     function()
    for _, bad in ipairs{ "short", ("x"):rep(40), "has space 123",
                          "semi;colon-123", "quote\"d-12345" } do
      local res = env:api("GET", "/v1/payments/pay_none", nil,
                          { headers = { ["X-Request-Id"] = bad } })
      assert.equal(404, res.status, res.body)
      local rid = rid_of(res)
      assert.is_string(rid, bad)
      assert.not_equal(bad, rid)
      assert.matches("^%x+$", rid)
    end
  end)

  it("the notification route's answers carry it, applied or refused",
     function()
    local p = env:create{}.payment
    local res = env:post_paid(p)
    assert.equal(204, res.status, res.body)
    local rid = assert(rid_of(res), "X-Request-Id on the 204")
    assert.equal("/wechatpay/notify/" .. env.m.mchid, access_line(rid).path)
    -- the notification applied, logged under the same id
    testing.wait_until(function()
      for line in env.gw:logs():gmatch("[^\n]+") do
        local rec = json.decode(line)
        if rec and rec.msg == "gateway: notification applied"
           and rec.request_id == rid then
          return true
        end
      end
    end, 10, "the notification applied under request " .. rid)
    local bad = env:post_notify("{}", { ["Content-Type"] = "application/json" })
    assert.is_true(bad.status >= 400, bad.body)
    assert.is_string(rid_of(bad), "X-Request-Id on a refusal")
  end)
end)
