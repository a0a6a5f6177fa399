-- examples/gateway: POST /v1/refunds/{id}/abnormal -- an abnormal refund
-- (WeChat could not pay the money back where it came from) sent to a bank
-- card through WeChat's abnormal-refund API (gw.refunds_abnormal), against
-- the simulator: the application reaches WeChat (the card number and name
-- encrypted, never in clear), is recorded in the refund's audit trail
-- without them, and the refund settles when WeChat says how it ended.
-- Was: no route at all; an agent had to use WeChat's merchant platform,
-- and the gateway learnt of it by its checks only.
local S = require "examples.gateway.spec.support"
local testing = require "paygate.testing"
local audit = require "paygate.audit"

describe("gateway: abnormal refunds sent to a bank card", function()
  local env

  setup(function() env = S.start() end)
  teardown(S.stop)

  local ACCOUNT, NAME = "6222020200112233445", "张三丰"

  local function abnormal_refund(amount)
    local p = env:paid_payment{ amount = 100 }
    local r = S.expect(env:refund(p.id, amount or 40), 201, "refund")
    env.sim:settle(r.out_refund_no, "ABNORMAL")
    return env:wait_refund(r.id, "abnormal"), p
  end

  local function apply(id, body, o)
    return env:api("POST", "/v1/refunds/" .. id .. "/abnormal", body, o)
  end

  it("sends the payer's card to WeChat encrypted, records the application"
     .. " without it, and settles when WeChat says", function()
    local r = abnormal_refund()
    local res = apply(r.id, { type = "USER_BANK_CARD", bank_type = "ICBC_DEBIT",
                              bank_account = ACCOUNT, real_name = NAME })
    local t = S.expect(res, 202, "apply")
    assert.equal(r.id, t.id)
    assert.equal("abnormal", t.state)    -- until WeChat says how it ended
    assert.equal("USER_BANK_CARD", t.application.type)
    assert.equal("PROCESSING", t.application.status)
    -- WeChat got it, by its refund_id, with both fields encrypted (the
    -- simulator takes only fields that decrypt under its key, with the
    -- Wechatpay-Serial naming that key: the 202 says they did)
    local sent
    for _, q in ipairs(env.sim:requests()) do
      if tostring(q.target):find("/v3/refund/domestic/refunds/"
                               .. r.refund_id .. "/apply-abnormal-refund", 1,
                               true) then
        sent = q
      end
    end
    assert.truthy(sent, "no apply-abnormal-refund request at WeChat")
    assert.equal(200, sent.status)
    -- the audit entry: who, how, WeChat's answer -- no card, no name
    local e = audit.entries(env.db, "refund:" .. r.id)
    local applied
    for _, x in ipairs(e) do
      if x.what == "refund.abnormal_applied" then applied = x end
    end
    assert.truthy(applied, "no refund.abnormal_applied entry")
    assert.equal("app:shop", applied.actor)
    assert.matches('"type":"USER_BANK_CARD"', applied.evidence, 1, true)
    assert.matches('"bank_type":"ICBC_DEBIT"', applied.evidence, 1, true)
    assert.is_nil(applied.evidence:find(ACCOUNT, 1, true))
    assert.is_nil(applied.evidence:find(NAME, 1, true))
    assert.is_true(audit.verify(env.db, "refund:" .. r.id))
    -- nor in the gateway's log
    testing.wait_until(function()
      return env.gw:logs():find("abnormal refund sent to a bank card", 1,
                                true)
    end, 5, "the application's line")
    assert.is_nil(env.gw:logs():find(ACCOUNT, 1, true))
    assert.is_nil(env.gw:logs():find(NAME, 1, true))
    -- WeChat pays it to the card: the refund succeeds
    env.sim:settle(r.out_refund_no, "SUCCESS")
    env:wait_refund(r.id, "succeeded")
  end)

  it("the merchant's own account takes no card; a bad body is 400 without"
     .. " quoting the card", function()
    local r = abnormal_refund(10)
    local bad = apply(r.id, { type = "USER_BANK_CARD", bank_type = "ICBC_DEBIT",
                              bank_account = "62 22-" .. ACCOUNT,
                              real_name = NAME })
    assert.equal(400, bad.status, bad.body)
    assert.truthy(bad.json.fields.bank_account)
    assert.is_nil(bad.body:find(ACCOUNT, 1, true))
    bad = apply(r.id, { type = "USER_BANK_CARD", bank_type = "ICBC_DEBIT" })
    assert.equal(400, bad.status)
    assert.truthy(bad.json.fields.bank_account)
    assert.truthy(bad.json.fields.real_name)
    bad = apply(r.id, { type = "MERCHANT_BANK_CARD", bank_account = ACCOUNT })
    assert.equal(400, bad.status)
    assert.truthy(bad.json.fields.bank_account)
    bad = apply(r.id, { type = "CASH" })
    assert.equal(400, bad.status)
    assert.truthy(bad.json.fields.type)
    bad = apply(r.id, { type = "MERCHANT_BANK_CARD", note = "x" })
    assert.equal("unknown field", bad.json.fields.note)
    local t = S.expect(apply(r.id, { type = "MERCHANT_BANK_CARD" }), 202,
                       "merchant card")
    assert.equal("MERCHANT_BANK_CARD", t.application.type)
    env.sim:settle(r.out_refund_no, "SUCCESS")
    env:wait_refund(r.id, "succeeded")
  end)

  it("refuses a refund that is not abnormal (409), another app's (404),"
     .. " and replays a repeat under its Idempotency-Key", function()
    local p = env:paid_payment{ amount = 50 }
    local r = S.expect(env:refund(p.id, 5), 201, "refund")
    local res = apply(r.id, { type = "MERCHANT_BANK_CARD" })
    assert.equal(409, res.status, res.body)
    assert.equal("refund_not_abnormal", res.json.error)
    assert.equal(404, apply("ref_nope", { type = "MERCHANT_BANK_CARD" }).status)
    local other = assert(require("paygate.apikey").create(env.db, "other"))
    local ab = abnormal_refund(20)
    res = apply(ab.id, { type = "MERCHANT_BANK_CARD" },
                { app_id = other.app_id, key_id = other.key_id,
                  secret = other.secret })
    assert.equal(404, res.status, res.body)
    -- one application, answered twice under one key
    local first = apply(ab.id, { type = "MERCHANT_BANK_CARD" }, { key = "ab-1" })
    assert.equal(202, first.status, first.body)
    local again = apply(ab.id, { type = "MERCHANT_BANK_CARD" }, { key = "ab-1" })
    assert.equal(202, again.status)
    assert.equal(first.body, again.body)
    local n = 0
    for _, q in ipairs(env.sim:requests()) do
      if tostring(q.target):find(ab.refund_id .. "/apply-abnormal-refund", 1,
                               true) then
        n = n + 1
      end
    end
    assert.equal(1, n)
    -- WeChat refuses a second application (the refund is not abnormal
    -- there any more): 502 with WeChat's words, the refund as it is
    res = apply(ab.id, { type = "MERCHANT_BANK_CARD" })
    assert.equal(502, res.status, res.body)
    assert.equal("wechat_error", res.json.error)
    assert.equal(ab.id, res.json.refund.id)
  end)
end)
