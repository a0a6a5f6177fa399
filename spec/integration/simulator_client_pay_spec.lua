-- The simulator as the payer's WeChat client (POST /sim/pay,
-- sim:pay_with): it takes exactly what a front end passes WeChat's client
-- -- the JSAPI call's parameters, the App SDK's, a code_url, an h5_url --
-- checks each as WeChat does and pays the order; what WeChat would refuse
-- is refused naming the field, and the order stays unpaid. Was: only
-- POST /sim/transactions/{no}/pay, which pays any open order by its
-- out_trade_no, so nothing checked the parameters a front end hands
-- WeChat, nor that a prepay_id and a code_url work for 2 hours and an
-- h5_url for 5 minutes.
local core = require "paygate.core"
local testing = require "paygate.testing"

local NOTIFY = "http://127.0.0.1:9/notify"    -- nobody: attempts fail

-- an order of kind at sim for merchant m (sim.partner: for its
-- sub-merchant); o: payer_as (partner JSAPI: "sp_openid" default or
-- "sub_openid"), sub_appid, appid, no. returns: no, data, wx
local function order(sim, kind, o)
  o = o or {}
  local m = o.merchant or sim.merchant
  sim.spec_clients = sim.spec_clients or {}
  local wx = sim.spec_clients[m]
  if not wx then
    wx = sim:client(m)
    sim.spec_clients[m] = wx
  end
  local partner = m == sim.partner
  local no = o.no or testing.out_trade_no("cp")
  local p = { description = "client pay", out_trade_no = no,
              notify_url = NOTIFY, amount = { total = 7 } }
  if partner then
    p.sub_mchid, p.sub_appid = m.sub_mchid, o.sub_appid
    if o.appid then p.sp_appid = o.appid end
  elseif o.appid then
    p.appid = o.appid
  end
  if kind == "jsapi" then
    p.payer = { [partner and (o.payer_as or "sp_openid") or "openid"]
                = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o" }
  elseif kind == "h5" then
    p.scene_info = { payer_client_ip = "203.0.113.7",
                     h5_info = { type = "Wap" } }
  end
  local data = assert(wx[kind .. "_prepay"](wx, p))
  return no, data, wx
end

local function state(sim, no, m)
  m = m or sim.merchant
  local wx = sim.spec_clients[m]
  local t = assert(wx:query_by_out_trade_no(no, m.sub_mchid))
  return t.trade_state
end

-- a refusal: status, code and the field named; the order left unpaid
local function refused(sim, params, status, code, field, no, m)
  local e = sim:pay_with(params, { status = status })
  assert.equal(code, e.code, e.message)
  assert.equal(field, e.field, e.message)
  assert.is_string(e.message)
  if no then assert.equal("NOTPAY", state(sim, no, m)) end
  return e
end

local function copy(t, over)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  for k, v in pairs(over or {}) do
    if v == false then c[k] = nil else c[k] = v end
  end
  return c
end

describe("simulator: the payer's client pays what the front end hands it",
         function()
  local sim, other

  setup(function()
    sim = testing.simulator{ partner = true, merchants = {
      testing.merchant{ appids = { "wxa1a1a1a1a1a1a1a1", "wxb2b2b2b2b2b2b2b2" }
      } } }
    other = testing.merchant()           -- a key the simulator never saw
  end)
  teardown(function()
    for _, wx in pairs(sim and sim.spec_clients or {}) do wx:stop() end
    testing.stop_all()
  end)

  it("pays a JSAPI order with wx:jsapi_pay_params' parameters: the"
     .. " Transaction, and its notification", function()
    local no, d, wx = order(sim, "jsapi")
    local params = assert(wx:jsapi_pay_params(nil, d.prepay_id))
    local t = sim:pay_with(params)
    assert.equal("SUCCESS", t.trade_state)
    assert.equal(no, t.out_trade_no)
    assert.equal("JSAPI", t.trade_type)
    assert.equal("oUpF8uMuAJO_M2pxb1Q9zNjWeS6o", t.payer.openid)
    assert.equal("SUCCESS", state(sim, no))
    local n = sim:notifications{ out_trade_no = no }
    assert.equal(1, #n)
    assert.equal("TRANSACTION.SUCCESS", n[1].event_type)
    -- the payer cannot pay it twice
    refused(sim, params, 409, "ORDER_PAID", nil)
  end)

  it("pays an App order with wx:app_pay_params' parameters", function()
    local no, d, wx = order(sim, "app")
    local params = assert(wx:app_pay_params(nil, d.prepay_id))
    local t = sim:pay_with(params, { wait = 1 })
    assert.equal("SUCCESS", t.trade_state)
    assert.equal("APP", t.trade_type)
    assert.equal("SUCCESS", state(sim, no))
  end)

  it("pays a native order through its code_url, an H5 one through its"
     .. " h5_url (a redirect_url appended)", function()
    local no, d = order(sim, "native")
    assert.equal("SUCCESS", sim:pay_with{ code_url = d.code_url }.trade_state)
    assert.equal("SUCCESS", state(sim, no))
    local no2, d2 = order(sim, "h5")
    local t = sim:pay_with{ h5_url = d2.h5_url
      .. "&redirect_url=https%3A%2F%2Fshop.example%2Fdone" }
    assert.equal("SUCCESS", t.trade_state)
    assert.equal("MWEB", t.trade_type)
    assert.equal("SUCCESS", state(sim, no2))
  end)

  it("refuses what is not a front end's parameters, naming the field",
     function()
    local no, d, wx = order(sim, "jsapi")
    local j = assert(wx:jsapi_pay_params(nil, d.prepay_id))
    refused(sim, {}, 400, "PARAM_ERROR", nil)
    refused(sim, copy(j, { paySign = false }), 400, "PARAM_ERROR",
            "paySign", no)
    refused(sim, copy(j, { timeStamp = tonumber(j.timeStamp) }), 400,
            "PARAM_ERROR", "timeStamp", no)
    refused(sim, copy(j, { timeStamp = "1700000000.5" }), 400,
            "PARAM_ERROR", "timeStamp", no)
    refused(sim, copy(j, { nonceStr = ("n"):rep(33) }), 400, "PARAM_ERROR",
            "nonceStr", no)
    refused(sim, copy(j, { package = d.prepay_id }), 400, "PARAM_ERROR",
            "package", no)
    refused(sim, copy(j, { signType = "HMAC-SHA256" }), 400, "PARAM_ERROR",
            "signType", no)
    local e = refused(sim, copy(j, { appid = j.appId }), 400,
                      "PARAM_ERROR", "appid", no)
    assert.matches("did you mean appId", e.message, 1, true)
    -- the App SDK's names, not the Go SDK's JSON ones
    local no2, d2 = order(sim, "app")
    local a = assert(wx:app_pay_params(nil, d2.prepay_id))
    e = refused(sim, copy(a, { prepayid = false, prepayId = a.prepayid }),
                400, "PARAM_ERROR", "prepayId", no2)
    assert.matches("did you mean prepayid", e.message, 1, true)
    refused(sim, copy(a, { package = "prepay_id=" .. a.prepayid }), 400,
            "PARAM_ERROR", "package", no2)
    refused(sim, copy(a, { timestamp = tonumber(a.timestamp) }), 400,
            "PARAM_ERROR", "timestamp", no2)
  end)

  it("refuses a prepay never handed out (404), and one of another trade"
     .. " type", function()
    local _, _, wx = order(sim, "native")
    local j = assert(wx:jsapi_pay_params(nil, "wx2614000000" .. ("0"):rep(20)))
    refused(sim, j, 404, "RESOURCE_NOT_EXISTS", "package")
    refused(sim, { code_url = "weixin://wxpay/bizpayurl?pr=nobody123" }, 404,
            "RESOURCE_NOT_EXISTS", "code_url")
    refused(sim, { h5_url = "https://wx.tenpay.com/cgi-bin/mmpayweb-bin/"
      .. "checkmweb?prepay_id=wx1&package=1" }, 404, "RESOURCE_NOT_EXISTS",
      "h5_url")
    -- an App prepay's id in the JSAPI call, correctly signed
    local no, d = order(sim, "app")
    refused(sim, assert(wx:jsapi_pay_params(nil, d.prepay_id)), 400,
            "INVALID_REQUEST", "package", no)
    -- an H5 order's URL given as a code_url
    local no2, d2 = order(sim, "h5")
    refused(sim, { code_url = d2.h5_url }, 400, "INVALID_REQUEST",
            "code_url", no2)
  end)

  it("refuses an appid not the merchant's, and an appid of the merchant"
     .. " that did not order", function()
    local no, d, wx = order(sim, "jsapi")       -- under wxa1...
    refused(sim, assert(wx:jsapi_pay_params("wxforeign0000000", d.prepay_id)),
            400, "APPID_MCHID_NOT_MATCH", "appId", no)
    refused(sim, assert(wx:jsapi_pay_params("wxb2b2b2b2b2b2b2b2",
            d.prepay_id)), 400, "INVALID_REQUEST", "appId", no)
    local no2, d2 = order(sim, "app", { appid = "wxb2b2b2b2b2b2b2b2" })
    refused(sim, assert(wx:app_pay_params("wxa1a1a1a1a1a1a1a1",
            d2.prepay_id)), 400, "INVALID_REQUEST", "appid", no2)
    assert.equal("SUCCESS", sim:pay_with(assert(wx:app_pay_params(
      "wxb2b2b2b2b2b2b2b2", d2.prepay_id))).trade_state)
  end)

  it("refuses a partnerid that is not the order's merchant", function()
    local no, d, wx = order(sim, "app")
    local a = assert(wx:app_pay_params(nil, d.prepay_id))
    refused(sim, copy(a, { partnerid = "1900000001" }), 400,
            "INVALID_REQUEST", "partnerid", no)
  end)

  it("refuses a signature that does not verify with the merchant's"
     .. " certificate", function()
    local no, d, wx = order(sim, "jsapi")
    local j = assert(wx:jsapi_pay_params(nil, d.prepay_id))
    -- signed by a key that is not the merchant's
    local stranger = require("paygate.wechatpay.payparams")
    local key = assert(require("paygate.crypto").private_key(
      testing.read(other.private_key)))
    local forged = assert(stranger.jsapi(key, j.appId, d.prepay_id))
    local e = refused(sim, forged, 401, "SIGN_ERROR", "paySign", no)
    assert.matches("appId\\ntimeStamp\\nnonceStr\\npackage\\n", e.message,
                   1, true)
    assert.equal(j.appId .. "\n" .. forged.timeStamp .. "\n"
      .. forged.nonceStr .. "\n" .. forged.package .. "\n", e.sign_message)
    -- a parameter changed after signing
    refused(sim, copy(j, { nonceStr = j.nonceStr:sub(2) .. "x" }), 401,
            "SIGN_ERROR", "paySign", no)
    refused(sim, copy(j, { paySign = "not base64!" }), 401, "SIGN_ERROR",
            "paySign", no)
    local no2, d2 = order(sim, "app")
    local a = assert(wx:app_pay_params(nil, d2.prepay_id))
    refused(sim, copy(a, { timestamp = tostring(tonumber(a.timestamp) + 1) }),
            401, "SIGN_ERROR", "sign", no2)
    assert.equal("SUCCESS", sim:pay_with(j).trade_state)
  end)

  it("a service provider's order: paid under sp_appid, or sub_appid for a"
     .. " sub_openid payer; an App's partnerid is the sub_mchid", function()
    local P = sim.partner
    local no, d, wx = order(sim, "jsapi", { merchant = P })
    refused(sim, assert(wx:jsapi_pay_params(P.sub_appid, d.prepay_id)), 400,
            "INVALID_REQUEST", "appId", no, P)
    assert.equal("SUCCESS", sim:pay_with(assert(wx:jsapi_pay_params(
      P.appid, d.prepay_id))).trade_state)
    no, d = order(sim, "jsapi", { merchant = P, payer_as = "sub_openid",
                                  sub_appid = P.sub_appid })
    refused(sim, assert(wx:jsapi_pay_params(P.appid, d.prepay_id)), 400,
            "INVALID_REQUEST", "appId", no, P)
    assert.equal("SUCCESS", sim:pay_with(assert(wx:jsapi_pay_params(
      P.sub_appid, d.prepay_id))).trade_state)
    no, d = order(sim, "app", { merchant = P, sub_appid = P.sub_appid })
    local a = assert(wx:app_pay_params(P.sub_appid, d.prepay_id,
                                       P.sub_mchid))
    assert.equal(P.sub_mchid, a.partnerid)
    refused(sim, copy(a, { partnerid = P.mchid }), 400, "INVALID_REQUEST",
            "partnerid", no, P)
    assert.equal("SUCCESS", sim:pay_with(a).trade_state)
    assert.equal("SUCCESS", state(sim, no, P))
  end)

  it("sim:pay_with raises on a refusal it was not told to expect, and on"
     .. " an unknown option", function()
    local ok, err = pcall(sim.pay_with, sim, { code_url = "weixin://x" })
    assert.is_false(ok)
    assert.matches("404", tostring(err))
    assert.has_error(function() sim:pay_with({}, { stauts = 400 }) end)
  end)
end)

describe("simulator: what a prepay handed out expires", function()
  local sim
  local TTL, H5_TTL = 6, 1

  setup(function()
    sim = testing.simulator{ config = { prepay_ttl = TTL,
                                        h5_url_ttl = H5_TTL } }
  end)
  teardown(function()
    for _, wx in pairs(sim and sim.spec_clients or {}) do wx:stop() end
    testing.stop_all()
  end)

  -- until the clock is past t + s (the simulator stamped what it handed
  -- out before its answer came, so before t)
  local function past(t, s)
    testing.wait_until(function() return core.time() >= t + s + 0.01 end,
                       s + 10, "the clock past " .. s .. " s")
  end

  it("an h5_url after h5_url_ttl, a prepay_id and a code_url after"
     .. " prepay_ttl; a new prepay hands out a fresh one", function()
    local nj, dj, wx = order(sim, "jsapi", { no = testing.out_trade_no("ej") })
    local na, da = order(sim, "app")
    local nn, dn = order(sim, "native")
    local nh, dh = order(sim, "h5")
    local t0 = core.time()
    local j = assert(wx:jsapi_pay_params(nil, dj.prepay_id))
    local a = assert(wx:app_pay_params(nil, da.prepay_id))
    past(t0, H5_TTL)
    local e = refused(sim, { h5_url = dh.h5_url }, 400, "PREPAY_EXPIRED",
                      "h5_url", nh)
    assert.matches("h5_url_ttl", e.message, 1, true)
    -- the code_url made with it still works (prepay_ttl)
    assert.equal("SUCCESS", sim:pay_with{ code_url = dn.code_url }
                              .trade_state)
    past(t0, TTL)
    refused(sim, j, 400, "PREPAY_EXPIRED", "package", nj)
    refused(sim, a, 400, "PREPAY_EXPIRED", "prepayid", na)
    -- the same prepay again: a fresh prepay_id, which pays
    local _, dj2 = order(sim, "jsapi", { no = nj })
    assert.are_not.equal(dj.prepay_id, dj2.prepay_id)
    refused(sim, j, 400, "PREPAY_EXPIRED", "package", nj)
    assert.equal("SUCCESS", sim:pay_with(assert(wx:jsapi_pay_params(nil,
      dj2.prepay_id))).trade_state)
    -- the back office's pay by out_trade_no checks no link
    sim:pay(na)
    assert.equal("SUCCESS", state(sim, na))
  end)
end)

-- WeChat answers a native prepay made again with a new code_url, and the
-- old one becomes invalid. Was: every code_url handed out paid until
-- prepay_ttl, so a spec could pay one its own re-entry had replaced.
describe("simulator: a native prepay made again", function()
  local sim

  setup(function() sim = testing.simulator() end)
  teardown(function()
    for _, wx in pairs(sim and sim.spec_clients or {}) do wx:stop() end
    testing.stop_all()
  end)

  it("hands out a new code_url, and the earlier one pays no more",
     function()
    local no, d1 = order(sim, "native")
    local _, d2 = order(sim, "native", { no = no })
    assert.are_not.equal(d1.code_url, d2.code_url)
    local e = refused(sim, { code_url = d1.code_url }, 400, "PREPAY_EXPIRED",
                      "code_url", no)
    assert.matches("later prepay of order " .. no, e.message, 1, true)
    assert.equal("SUCCESS", sim:pay_with{ code_url = d2.code_url }
                              .trade_state)
    -- (a prepay_id, on the other hand: whether WeChat keeps an earlier
    -- one is not known; it pays until prepay_ttl)
    local nj, j1 = order(sim, "jsapi")
    local _, j2, wx = order(sim, "jsapi", { no = nj })
    assert.are_not.equal(j1.prepay_id, j2.prepay_id)
    assert.equal("SUCCESS", sim:pay_with(assert(wx:jsapi_pay_params(nil,
      j1.prepay_id))).trade_state)
  end)
end)

describe("simulator: the payer's client, national-crypto variant", function()
  local sim

  setup(function() sim = testing.simulator{ sign_type = testing.SM2 } end)
  teardown(function()
    for _, wx in pairs(sim and sim.spec_clients or {}) do wx:stop() end
    testing.stop_all()
  end)

  it("takes signType SM2 and an SM2 paySign; RSA is refused", function()
    local no, d, wx = order(sim, "jsapi")
    local j = assert(wx:jsapi_pay_params(nil, d.prepay_id))
    assert.equal("SM2", j.signType)
    refused(sim, copy(j, { signType = "RSA" }), 400, "PARAM_ERROR",
            "signType", no)
    assert.equal("SUCCESS", sim:pay_with(j).trade_state)
    local no2, d2 = order(sim, "app")
    assert.equal("SUCCESS", sim:pay_with(assert(wx:app_pay_params(nil,
      d2.prepay_id))).trade_state)
    assert.equal("SUCCESS", state(sim, no2))
  end)
end)
