-- The gateway's pay parameters, handed as they are to the payer's WeChat
-- client (the simulator's POST /sim/pay: sim:pay_with), pay the payment:
-- what the gateway hands a front end for jsapi and app is what WeChat's
-- client checks (the appid that ordered, the package, the partnerid, the
-- signType, the paySign over the documented signing string). Was: the
-- specs only paid by out_trade_no (sim:pay), which takes any open order,
-- so nothing offline proved a front end could pay with what it got.
--   build/paygate exec "$(command -v busted)" --helper=spec/helpers.lua \
--     examples/gateway/spec/e2e_client_pay_spec.lua
local S = require "examples.gateway.spec.support"
local testing = require "paygate.testing"
local crypto = require "paygate.crypto"
local core = dofile("examples/gateway/spec/core_support.lua")

local OPENID = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"

describe("gateway pay parameters paid by the payer's client", function()
  local env

  setup(function() env = S.start() end)
  teardown(S.stop)

  it("jsapi: the pay object, as handed out, pays the payment", function()
    local b = env:create{ channel = "jsapi", payer = { openid = OPENID } }
    local t = env.sim:pay_with(b.pay)
    assert.equal("SUCCESS", t.trade_state)
    assert.equal(b.payment.out_trade_no, t.out_trade_no)
    assert.equal("paid", env:wait_state(b.payment.id, "paid").state)
  end)

  it("app: the pay object, as handed out, pays the payment", function()
    local b = env:create{ channel = "app" }
    assert.equal("SUCCESS", env.sim:pay_with(b.pay).trade_state)
    assert.equal("paid", env:wait_state(b.payment.id, "paid").state)
  end)

  it("the pay read back (GET) pays; a superseded attempt's pay is refused",
     function()
    local b = env:create{ channel = "jsapi", payer = { openid = OPENID } }
    local res = env:api("POST", "/v1/payments/" .. b.payment.id
      .. "/attempts", { channel = "app" })
    assert.equal(201, res.status, res.body)
    -- the first attempt was closed at WeChat: its pay no longer pays
    local e = env.sim:pay_with(b.pay, { status = 409 })
    assert.equal("ORDER_CLOSED", e.code)
    local got = env:get(b.payment.id)
    local pay
    for _, a in ipairs(got.attempts) do
      if a.state == "open" then pay = a.pay end
    end
    assert.is_table(pay, "the open attempt's pay")
    assert.same(res.json.pay, pay)
    assert.equal("SUCCESS", env.sim:pay_with(pay).trade_state)
    assert.equal("paid", env:wait_state(b.payment.id, "paid").state)
  end)
end)

describe("a service provider's gateway pay parameters paid by the payer's"
         .. " client", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100, partner = true }
    gw = core.start(sim, { partner = true })
  end)
  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  local P
  before_each(function() P = sim.partner end)

  local function pays(p, pay)
    assert.equal("SUCCESS", sim:pay_with(pay).trade_state)
    gw:wait_state(p.id, "paid")
  end

  it("jsapi under sp_appid (sp_openid), and under sub_appid (sub_openid)",
     function()
    local p, pay = gw:create{ channel = "jsapi", amount = 3,
      sub_mchid = P.sub_mchid, payer = { openid = "oSp_"
      .. crypto.random_nonce(20) } }
    assert.equal(P.appid, pay.appId)
    pays(p, pay)
    p, pay = gw:create{ channel = "jsapi", amount = 4,
      sub_mchid = P.sub_mchid, sub_appid = P.sub_appid,
      payer = { openid = "oSub_" .. crypto.random_nonce(20) } }
    assert.equal(P.sub_appid, pay.appId)
    pays(p, pay)
    -- sp_openid beside sub_appid: paid under sp_appid
    p, pay = gw:create{ channel = "jsapi", amount = 5,
      sub_mchid = P.sub_mchid, sub_appid = P.sub_appid,
      payer = { sp_openid = "oSpS_" .. crypto.random_nonce(20) } }
    assert.equal(P.appid, pay.appId)
    pays(p, pay)
  end)

  it("app: partnerid the sub_mchid, under sub_appid when given", function()
    local p, pay = gw:create{ channel = "app", amount = 6,
      sub_mchid = P.sub_mchid }
    assert.equal(P.sub_mchid, pay.partnerid)
    pays(p, pay)
    p, pay = gw:create{ channel = "app", amount = 7,
      sub_mchid = P.sub_mchid, sub_appid = P.sub_appid }
    assert.equal(P.sub_appid, pay.appid)
    pays(p, pay)
  end)
end)
