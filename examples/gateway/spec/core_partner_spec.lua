-- examples/gateway with a service provider (sp_mchid) and a sub-merchant:
-- the partner prepay, and the notification deduped by (sp/sub,
-- out_trade_no, trade_state).
local testing = require "paygate.testing"
local crypto = require "paygate.crypto"
local days = require "support.days"
local core = dofile("examples/gateway/spec/core_support.lua")

describe("gateway for a service provider", function()
  local sim, gw

  setup(function()
    -- (two sub-merchants: the second's orders beside the first's)
    sim = testing.simulator{ time_scale = 100, partner = 2 }
    gw = core.start(sim, { partner = true,
      gateway = { console = { access = "loopback" } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  -- the order as WeChat holds it (asked as the provider)
  local function wechat_order(no)
    local wx = sim:client(sim.partner)
    local t = assert(wx:query_by_out_trade_no(no, sim.partner.sub_mchid))
    wx:stop()
    return t
  end

  -- the JSAPI pay parameters verify over appid with the provider's key
  local function assert_pay_sign(pay, appid)
    assert.equal(appid, pay.appId)
    local f = assert(io.open(sim.partner.public_key, "rb"))
    local pub = assert(crypto.public_key(f:read("*a")))
    f:close()
    assert.is_true(crypto.verify_base64(pub, appid .. "\n" .. pay.timeStamp
      .. "\n" .. pay.nonceStr .. "\n" .. pay.package .. "\n", pay.paySign,
      "sha256-rsa"))
  end

  it("needs the sub_mchid", function()
    local res = gw:call("POST", "/v1/payments", { order_id = "sp-0",
      channel = "native", amount = 1, description = "x" })
    assert.equal(400, res.status)
    assert.truthy(res.json.fields.sub_mchid)
  end)

  it("refuses a sub_mchid past 32 digits before storing anything",
     function()
    -- was: the WeChat Pay client's own check refused it after the
    -- payment was stored: 502 wechat_error (invalid_params), the payment
    -- left created under that sub_mchid, so the create corrected was
    -- 409 payment_exists for good (never moved to another sub_mchid)
    for i, sub in ipairs{ string.rep("1", 33), string.rep("9", 5000) } do
      local oid = "sp-long-" .. i
      local res = gw:call("POST", "/v1/payments", { order_id = oid,
        channel = "native", amount = 1, description = "x", sub_mchid = sub })
      assert.equal(400, res.status, res.body)
      assert.equal("invalid_request", res.json.error)
      assert.truthy(res.json.fields.sub_mchid, res.body)
      assert.equal(0, #assert(gw.db:query("SELECT id FROM gw_payments"
        .. " WHERE order_id = $1", { oid })))
      local p = gw:create{ order_id = oid, amount = 1,
                           sub_mchid = sim.partner.sub_mchid }
      assert.equal(sim.partner.sub_mchid, p.sub_mchid)
    end
  end)

  it("pays a sub-merchant's order once", function()
    local p = gw:create{ sub_mchid = sim.partner.sub_mchid, amount = 66 }
    assert.equal(sim.partner.sub_mchid, p.sub_mchid)
    sim:fault{ endpoint = "notify", kind = "duplicate", count = 1 }
    sim:pay(p.out_trade_no, sim.partner.sub_mchid)
    local d = sim:wait_notification(p.out_trade_no, { attempts = 2 })
    assert.equal(204, d.attempts[2].status)
    local got = gw:wait_state(p.id, "paid")
    assert.equal(3, got.version)
    local rows = assert(gw.db:query("SELECT key FROM"
      .. " gw_notification_effects WHERE key LIKE $1",
      { "%|" .. p.out_trade_no .. "|%" }))
    assert.equal(1, #rows)
    assert.equal("pay|" .. sim.partner.mchid .. "/" .. sim.partner.sub_mchid
                 .. "|" .. p.out_trade_no .. "|SUCCESS", rows[1].key)
    local r = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                      { amount = 66 })
    assert.equal(201, r.status, r.body)
    sim:settle(r.json.out_refund_no)
    sim:wait_notification{ out_refund_no = r.json.out_refund_no }
    gw:wait_state(p.id, "refunded")
    -- the refund names the sub-merchant as its payment does: the create's
    -- answer, GET /v1/refunds/{id}, the list, the payment's refunds (was:
    -- no mchid, no sub_mchid: whose money it was took the payment)
    local list = gw:call("GET", "/v1/payments/" .. p.id .. "/refunds")
    local one = gw:call("GET", "/v1/refunds/" .. r.json.id)
    for _, x in ipairs{ r.json, list.json.refunds[1], one.json,
                        gw:get(p.id).refunds[1] } do
      assert.equal(sim.partner.mchid, x.mchid)
      assert.equal(sim.partner.sub_mchid, x.sub_mchid)
    end
    -- the console's payment page lists them, found by the sp/sub key
    local page = gw.srv:request{ path = "/console/payments/" .. p.id }
    assert.equal(200, page.status)
    local received = assert(page.body:match("<h2>Notifications received"
      .. " %(verified%)</h2>(.-)</section>"))
    assert.matches("<td>" .. rows[1].key .. "</td>", received, 1, true)
    assert.matches("<td>refund|" .. r.json.out_refund_no .. "|SUCCESS</td>",
                   received, 1, true)
  end)
  it("refuses a resumed create for another sub-merchant, so it is never"
     .. " paid to the first", function()
    -- was: a create whose prepay WeChat refused (an unknown sub_mchid)
    -- stays created; the create sent again for the right sub_mchid
    -- resumed it with the first one kept, so its prepay was refused
    -- again, and the order could never be paid to the right one
    local oid = "sp-typo-" .. require("paygate.crypto").random_nonce(6)
    local typo = "1999999999"
    local res = gw:call("POST", "/v1/payments", { order_id = oid,
      channel = "native", amount = 5, description = "x", sub_mchid = typo })
    assert.equal(502, res.status, res.body)
    local rows = assert(gw.db:query("SELECT id, state, sub_mchid FROM"
      .. " gw_payments WHERE order_id = $1", { oid }))
    assert.equal("created", rows[1].state)
    res = gw:call("POST", "/v1/payments", { order_id = oid,
      channel = "native", amount = 5, description = "x",
      sub_mchid = sim.partner.sub_mchid })
    assert.equal(409, res.status, res.body)
    assert.equal("payment_exists", res.json.error, res.body)
    assert.matches("sub_mchid", res.json.message, 1, true)
    assert.equal(typo, res.json.payment.sub_mchid)
    rows = assert(gw.db:query("SELECT state, sub_mchid, attempt FROM"
      .. " gw_payments WHERE order_id = $1", { oid }))
    assert.equal(1, #rows)
    assert.same({ "created", typo, 1 },
                { rows[1].state, rows[1].sub_mchid, rows[1].attempt })
    -- the same sub-merchant resumes it as before
    res = gw:call("POST", "/v1/payments", { order_id = oid,
      channel = "native", amount = 5, description = "x", sub_mchid = typo })
    assert.equal(502, res.status, res.body)
    assert.equal(2, assert(gw.db:query("SELECT attempt FROM gw_payments"
      .. " WHERE order_id = $1", { oid }))[1].attempt)
  end)

  it("refuses a sub_mchid that is the provider's own mchid, before"
     .. " storing anything", function()
    -- was: sent to WeChat, which refused it: 502 wechat_error, the
    -- payment left created under that sub_mchid
    local oid = "sp-self-" .. crypto.random_nonce(6)
    local res = gw:call("POST", "/v1/payments", { order_id = oid,
      channel = "native", amount = 1, description = "x",
      sub_mchid = sim.partner.mchid })
    assert.equal(400, res.status, res.body)
    assert.matches("provider", res.json.fields.sub_mchid, 1, true)
    assert.equal(0, #assert(gw.db:query("SELECT id FROM gw_payments"
      .. " WHERE order_id = $1", { oid })))
  end)

  it("pays a JSAPI payment under the sub-merchant's own appid: the payer"
     .. " is its sub_openid, the pay parameters are signed for it",
     function()
    -- was: 400 {"sub_appid": "unknown field"}, and a JSAPI payer's openid
    -- always went to WeChat as sp_openid (the provider's appid)
    local sub_appid = sim.partner.sub_appid
    local openid = "oSub_" .. crypto.random_nonce(20)
    local p, pay = gw:create{ channel = "jsapi", amount = 30,
      sub_mchid = sim.partner.sub_mchid, sub_appid = sub_appid,
      payer = { openid = openid } }
    assert.equal(sub_appid, p.sub_appid)
    assert_pay_sign(pay, sub_appid)
    sim:pay(p.out_trade_no, sim.partner.sub_mchid)
    sim:wait_notification(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    local t = wechat_order(p.out_trade_no)
    assert.equal(sim.partner.appid, t.sp_appid)
    assert.equal(sub_appid, t.sub_appid)
    assert.same({ sub_openid = openid }, t.payer)
    local got = gw:get(p.id)
    assert.equal(sub_appid, got.sub_appid)
    assert.equal(sub_appid, got.attempts[1].sub_appid)
    local rows = assert(gw.db:query("SELECT a.sub_appid AS a, p.sub_appid"
      .. " AS p FROM gw_attempts a JOIN gw_payments p ON p.id ="
      .. " a.payment_id WHERE p.id = $1", { p.id }))
    assert.same({ a = sub_appid, p = sub_appid }, rows[1])
    local r = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                      { amount = 30 })
    assert.equal(201, r.status, r.body)
    sim:settle(r.json.out_refund_no)
    sim:wait_notification{ out_refund_no = r.json.out_refund_no }
    gw:wait_state(p.id, "refunded")
  end)

  it("without sub_appid, a JSAPI payer is the provider appid's sp_openid",
     function()
    local openid = "oSp_" .. crypto.random_nonce(20)
    local p, pay = gw:create{ channel = "jsapi", amount = 2,
      sub_mchid = sim.partner.sub_mchid, payer = { openid = openid } }
    assert.is_nil(p.sub_appid)
    assert_pay_sign(pay, sim.partner.appid)
    sim:pay(p.out_trade_no, sim.partner.sub_mchid)
    gw:wait_state(p.id, "paid")
    local t = wechat_order(p.out_trade_no)
    assert.is_nil(t.sub_appid)
    assert.same({ sp_openid = openid }, t.payer)
  end)

  it("a JSAPI payer named sp_openid beside sub_appid goes to WeChat as"
     .. " sp_openid, the pay parameters signed for sp_appid", function()
    -- was: 400 {"payer.sp_openid": "unknown field"}; the payer's openid
    -- went as sub_openid whenever sub_appid was given, so a payer known
    -- only under the provider's appid could not pay a payment naming
    -- the sub-merchant's own appid, which WeChat allows
    local sub_appid = sim.partner.sub_appid
    local openid = "oSpSub_" .. crypto.random_nonce(20)
    local p, pay = gw:create{ channel = "jsapi", amount = 9,
      sub_mchid = sim.partner.sub_mchid, sub_appid = sub_appid,
      payer = { sp_openid = openid } }
    assert.equal(sub_appid, p.sub_appid)
    assert_pay_sign(pay, sim.partner.appid)
    sim:pay(p.out_trade_no, sim.partner.sub_mchid)
    gw:wait_state(p.id, "paid")
    local t = wechat_order(p.out_trade_no)
    assert.equal(sim.partner.appid, t.sp_appid)
    assert.equal(sub_appid, t.sub_appid)
    assert.same({ sp_openid = openid }, t.payer)
    assert.equal(sub_appid, gw:get(p.id).attempts[1].sub_appid)
    -- sub_openid named: as openid with sub_appid, signed for sub_appid;
    -- then a switch naming sp_openid: signed for sp_appid, sub_appid kept
    local sub_openid = "oSubX_" .. crypto.random_nonce(20)
    p, pay = gw:create{ channel = "jsapi", amount = 10,
      sub_mchid = sim.partner.sub_mchid, sub_appid = sub_appid,
      payer = { sub_openid = sub_openid } }
    assert_pay_sign(pay, sub_appid)
    local res = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
      { channel = "jsapi", payer = { sp_openid = openid } })
    assert.equal(201, res.status, res.body)
    assert_pay_sign(res.json.pay, sim.partner.appid)
    assert.equal(sub_appid, res.json.payment.sub_appid)
    sim:pay(res.json.payment.out_trade_no, sim.partner.sub_mchid)
    gw:wait_state(p.id, "paid")
    t = wechat_order(res.json.payment.out_trade_no)
    assert.equal(sub_appid, t.sub_appid)
    assert.same({ sp_openid = openid }, t.payer)
  end)

  it("refuses a payer named twice, a sub_openid without sub_appid and a"
     .. " bad sp_openid or sub_openid, before storing anything", function()
    local sub = sim.partner.sub_mchid
    local cases = {
      { { sp_openid = "oA", openid = "oB" }, nil, "payer", "one of" },
      { { sp_openid = "oA", sub_openid = "oB" }, sim.partner.sub_appid,
        "payer", "one of" },
      { { sub_openid = "oA" }, nil, "payer.sub_openid", "sub_appid" },
      { { sp_openid = "" }, nil, "payer.sp_openid", "printable ASCII" },
      { { sp_openid = 5 }, nil, "payer.sp_openid", "printable ASCII" },
      { { sp_openid = ("x"):rep(129) }, nil, "payer.sp_openid",
        "printable ASCII" },
      { { sub_openid = "o p" }, sim.partner.sub_appid, "payer.sub_openid",
        "printable ASCII" },
      { { sub_openid = "o\195\169" }, sim.partner.sub_appid, "payer.sub_openid",
        "printable ASCII" },
    }
    for i, c in ipairs(cases) do
      local oid = "sp-payer-" .. i .. "-" .. crypto.random_nonce(6)
      local res = gw:call("POST", "/v1/payments", { order_id = oid,
        channel = "jsapi", amount = 1, description = "x", sub_mchid = sub,
        sub_appid = c[2], payer = c[1] })
      assert.equal(400, res.status, res.body)
      assert.equal("invalid_request", res.json.error, res.body)
      assert.matches(c[4], res.json.fields[c[3]] or "", 1, true, res.body)
      assert.equal(0, #assert(gw.db:query("SELECT id FROM gw_payments"
        .. " WHERE order_id = $1", { oid })))
    end
    -- a switch of a payment without sub_appid: sub_openid refused, the
    -- attempt left as it was
    local p = gw:create{ amount = 1, sub_mchid = sub }
    local res = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
      { channel = "jsapi", payer = { sub_openid = "oA" } })
    assert.equal(400, res.status, res.body)
    assert.matches("sub_appid", res.json.fields["payer.sub_openid"], 1, true)
    assert.equal(1, #gw:get(p.id).attempts)
  end)

  it("keeps sub_appid through a channel switch, and signs the App"
     .. " parameters for it", function()
    local sub_appid = sim.partner.sub_appid
    local p = gw:create{ channel = "native", amount = 3,
      sub_mchid = sim.partner.sub_mchid, sub_appid = sub_appid }
    local openid = "oSw_" .. crypto.random_nonce(20)
    local res = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
      { channel = "jsapi", payer = { openid = openid } })
    assert.equal(201, res.status, res.body)
    assert.equal(sub_appid, res.json.payment.sub_appid)
    assert_pay_sign(res.json.pay, sub_appid)
    res = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                  { channel = "app" })
    assert.equal(201, res.status, res.body)
    assert.equal(sub_appid, res.json.pay.appid)
    assert.equal(sim.partner.sub_mchid, res.json.pay.partnerid)
    local got = gw:get(p.id)
    assert.equal(3, #got.attempts)
    for _, a in ipairs(got.attempts) do
      assert.equal(sub_appid, a.sub_appid)
    end
    sim:pay(res.json.payment.out_trade_no, sim.partner.sub_mchid)
    gw:wait_state(p.id, "paid")
    assert.equal(sub_appid, wechat_order(res.json.payment.out_trade_no)
                              .sub_appid)
  end)

  it("a sub_appid not bound to the sub-merchant: WeChat's refusal, and the"
     .. " create corrected resumes the payment under the right one",
     function()
    local oid = "sp-subapp-" .. crypto.random_nonce(6)
    local body = { order_id = oid, channel = "jsapi", amount = 4,
      description = "x", sub_mchid = sim.partner.sub_mchid,
      sub_appid = "wx00000000000000ff", payer = { openid = "oX" } }
    local res = gw:call("POST", "/v1/payments", body)
    assert.equal(502, res.status, res.body)
    assert.equal("APPID_MCHID_NOT_MATCH", res.json.wechat_code, res.body)
    body.sub_appid = sim.partner.sub_appid
    res = gw:call("POST", "/v1/payments", body)
    assert.equal(201, res.status, res.body)
    assert.equal(2, res.json.payment.attempt)
    assert.equal(sim.partner.sub_appid, res.json.payment.sub_appid)
    assert_pay_sign(res.json.pay, sim.partner.sub_appid)
    local got = gw:get(res.json.payment.id)
    assert.equal("wx00000000000000ff", got.attempts[1].sub_appid)
    assert.equal(sim.partner.sub_appid, got.attempts[2].sub_appid)
    -- the console's payment page shows the ids the payment JSON has
    -- (was: merchant alone), and each attempt's sub_appid
    local page = gw.srv:request{ path = "/console/payments/" .. got.id }
    assert.equal(200, page.status)
    local sec = assert(page.body:match("<section>(.-)</section>"))
    assert.matches("<tr><td>merchant</td><td>" .. sim.partner.mchid
      .. "</td></tr><tr><td>sub_mchid</td><td>" .. sim.partner.sub_mchid
      .. "</td></tr><tr><td>appid</td><td>" .. sim.partner.appid
      .. "</td></tr><tr><td>sub_appid</td><td>" .. sim.partner.sub_appid
      .. "</td></tr>", sec, 1, true)
    local att = assert(page.body:match("<h2>Attempts</h2>(.-)</section>"))
    assert.matches("<th>sub_appid</th>", att, 1, true)
    for _, a in ipairs(got.attempts) do
      assert.matches("<td>" .. a.out_trade_no .. "</td><td>jsapi</td><td>"
        .. a.state .. "</td><td></td><td>" .. a.sub_appid .. "</td>", att,
        1, true)
    end
  end)

  it("names the sub-merchant in the alarm lines of its late payment and"
     .. " of the automatic refund WeChat refused", function()
    -- (was: the provider's mchid alone, or no merchant at all in the
    -- refused refund's line: the money is the sub-merchant's, and so is
    -- the merchant platform a person returns it in)
    local sub = sim.partner.sub_mchid
    local p = gw:create{ sub_mchid = sub, amount = 45 }
    -- WeChat's close answers ORDER_NOT_EXIST once: closed here, payable
    -- there (the race in which money arrives after a close)
    sim:fault{ endpoint = "close", kind = "error", status = 404,
               code = "ORDER_NOT_EXIST", count = 1 }
    assert.equal(200, gw:call("POST", "/v1/payments/" .. p.id
                              .. "/close").status)
    sim:fault{ endpoint = "refund", kind = "error", status = 403,
               code = "NOT_ENOUGH", count = 1 }
    sim:pay_and_wait(p.out_trade_no, { mchid = sub })
    gw:wait_state(p.id, "paid")
    testing.wait_until(function()
      local r = gw:get(p.id).refunds[1]
      return r and r.state == "failed"
    end, 10, "the automatic refund refused")
    local function line_of(start)
      local found
      testing.wait_until(function()
        for l in (gw.srv:logs() or ""):gmatch("[^\n]+") do
          if l:find(start, 1, true) and l:find(p.id, 1, true) then
            found = l
          end
        end
        return found
      end, 10, start)
      return found
    end
    for _, start in ipairs{ "gateway: payment on a closed or superseded"
                            .. " attempt",
                            "gateway: WeChat Pay refused an automatic"
                            .. " refund" } do
      local l = line_of(start)
      assert.matches('"mchid":"' .. sim.partner.mchid .. '"', l, 1, true)
      assert.matches('"sub_mchid":"' .. sub .. '"', l, 1, true)
    end
  end)

  it("the console's list of payments and its abnormal refunds name each"
     .. " one's sub-merchant", function()
    -- (was: the list had no merchant column, and the overview's abnormal
    -- refunds the provider's mchid: which sub-merchant owes the payer,
    -- and under which sub_mchid the application is made, took opening
    -- each payment)
    local sub = sim.partner.sub_mchid
    local who = sim.partner.mchid .. "/" .. sub
    local p = gw:create{ sub_mchid = sub, amount = 30 }
    sim:pay_and_wait(p.out_trade_no, { mchid = sub })
    gw:wait_state(p.id, "paid")
    local r = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                      { amount = 30 })
    assert.equal(201, r.status, r.body)
    sim:settle(r.json.out_refund_no, "ABNORMAL", sub)
    sim:wait_notification{ out_refund_no = r.json.out_refund_no,
                           event_type = "REFUND.ABNORMAL" }
    testing.wait_until(function()
      return gw:get(p.id).refunds[1].state == "abnormal"
    end, 10, "the refund abnormal")
    for _, path in ipairs{ "/console/payments",
                           "/console/payments?q=" .. p.out_trade_no } do
      local list = gw.srv:request{ path = path }
      assert.equal(200, list.status, list.body)
      assert.matches("<th>merchant</th>", list.body, 1, true)
      assert.matches('">' .. p.id .. "</a></td><td>" .. who .. "</td><td>"
                     .. p.out_trade_no .. "</td>", list.body, 1, true)
    end
    local body = gw.srv:request{ path = "/console" }.body
    local box = assert(body:match("<h2>Abnormal refunds[^<]*</h2>(.-)"
                                  .. "</section>"))
    assert.matches("<td>" .. r.json.out_refund_no .. "</td><td>%d+</td><td>"
                   .. who:gsub("%p", "%%%0") .. "</td>", box)
  end)

  it("the day's bill report names the sub-merchant of each mismatch",
     function()
    -- (was: no such column: a provider's bill holds every sub-merchant's
    -- orders, and a line of it did not say whose)
    package.path = "examples/gateway/?.lua;" .. package.path
    local gwr = require "gw.reconcile"
    local bill = require "paygate.reconcile.bill"
    local sub = sim.partner.sub_mchid
    -- made within one Beijing day, the bill's (made again in the new
    -- day when a midnight passed meanwhile)
    local today, p = days.within(days.BEIJING, function()
      local p = gw:create{ sub_mchid = sub, amount = 77 }
      sim:pay_and_wait(p.out_trade_no, { mchid = sub })
      gw:wait_state(p.id, "paid")
      return p
    end)
    sim:close_bills(today)
    -- the gateway's rows say whose they are
    local mine
    for _, r in ipairs(assert(gwr.local_rows(gw.db, sim.partner.mchid,
                                             today, {}))) do
      if r.out_trade_no == p.out_trade_no then mine = r end
    end
    assert.equal(sub, assert(mine).sub_mchid)
    -- an amount off here: the report's line names the sub-merchant
    assert(gw.db:exec("UPDATE gw_payments SET amount = amount + 1 WHERE"
                      .. " id = $1", { p.id }))
    local wx = sim:client(sim.partner)
    local ok, report = pcall(bill.daily, { wx = wx, db = gw.db,
      dir = testing.tmpdir(), date = today, name = "partner",
      local_rows = function(date, numbers, refund_numbers)
        return gwr.local_rows(gw.db, sim.partner.mchid, date, numbers,
                              refund_numbers)
      end })
    wx:stop()
    assert(gw.db:exec("UPDATE gw_payments SET amount = amount - 1 WHERE"
                      .. " id = $1", { p.id }))
    assert(ok, report)
    assert(report, "no report")
    local csv = testing.read(report.path)
    assert.matches(",sub_mchid\r\n", csv, 1, true)
    assert.matches(",amount," .. p.out_trade_no .. ",,paid,78,SUCCESS,77,"
                   .. sub .. "\r\n", csv, 1, true)
  end)

  it("refuses a malformed sub_appid before storing anything", function()
    for i, v in ipairs{ "", string.rep("w", 33), "wx 1", 7 } do
      local oid = "sp-badapp-" .. i
      local res = gw:call("POST", "/v1/payments", { order_id = oid,
        channel = "native", amount = 1, description = "x",
        sub_mchid = sim.partner.sub_mchid, sub_appid = v })
      assert.equal(400, res.status, res.body)
      assert.truthy(res.json.fields.sub_appid, res.body)
      assert.equal(0, #assert(gw.db:query("SELECT id FROM gw_payments"
        .. " WHERE order_id = $1", { oid })))
    end
  end)

  -- An order of sub-merchant b made at WeChat outside the gateway (another
  -- system of the provider's), under the number no of a payment of the
  -- gateway's for another sub-merchant (WeChat scopes out_trade_no per
  -- merchant), its notification sent to the gateway's route; paid
  local function other_sub_order(no, sub, total)
    local wx = sim:client(sim.partner)
    local ok, err = wx:native_prepay{ sp_appid = sim.partner.appid,
      sub_mchid = sub, description = "another system's", out_trade_no = no,
      notify_url = gw.srv:url("/wechatpay/notify/" .. sim.partner.mchid),
      amount = { total = total, currency = "CNY" } }
    wx:stop()
    assert(ok, tostring(err))
    sim:pay(no, sub)
  end

  local function metric(pattern)
    local res = gw.srv:admin_get("/metrics")
    local body = res and res.status == 200 and res.body or ""
    return tonumber(body:match(pattern)) or 0
  end

  it("refuses a payment notification of another sub-merchant's order of"
     .. " the same number: counted, and listed by the console", function()
    -- (was: a warn line and a 500 only: nothing on /metrics to alert on,
    -- nothing on the console, while WeChat sent it again for a day)
    local a, b = sim.partner.sub_mchids[1], sim.partner.sub_mchids[2]
    local p = gw:create{ sub_mchid = a, amount = 40 }
    local refused = '\npaygate_gateway_notifications_refused_total{merchant="'
      .. sim.partner.mchid .. '",kind="merchant_mismatch"} (%d+)\n'
    local before = metric(refused)
    other_sub_order(p.out_trade_no, b, 41)
    testing.wait_until(function() return metric(refused) > before end, 10,
                       "the refusal counted")
    local rows
    testing.wait_until(function()
      rows = assert(gw.db:query("SELECT * FROM gw_notifications_refused"
        .. " WHERE out_trade_no = $1", { p.out_trade_no }))
      return rows[1] ~= nil
    end, 10, "the refusal recorded")
    local r = rows[1]
    assert.equal("merchant_mismatch", r.kind)
    assert.equal(sim.partner.mchid, r.mchid)
    assert.equal(1, tonumber(r.authentic))
    assert.equal("TRANSACTION.SUCCESS", r.event_type)
    assert.matches(sim.partner.mchid .. "/" .. a .. "'s, not "
                   .. sim.partner.mchid .. "/" .. b .. "'s", r.reason, 1, true)
    -- nothing applied: the gateway's payment is still being paid
    assert.equal("paying", gw:get(p.id).state)
    assert.equal(0, #assert(gw.db:query("SELECT id FROM gw_notifications"
      .. " WHERE id = $1", { r.notification_id })))
    -- the console: the overview's refused notifications, the payment's
    local body = gw.srv:request{ path = "/console" }.body
    local box = assert(body:match("<h2>Notifications refused[^<]*</h2>(.-)"
                                  .. "</section>"))
    assert.matches("<td>merchant_mismatch</td>", box, 1, true)
    assert.matches("yes: " .. p.out_trade_no, box, 1, true)
    body = gw.srv:request{ path = "/console/payments/" .. p.id }.body
    box = assert(body:match("<h2>Notifications refused</h2>(.-)</section>"))
    assert.matches("<td>" .. r.notification_id .. "</td><td>"
      .. "TRANSACTION.SUCCESS</td><td>merchant_mismatch</td>", box, 1, true)
  end)

  it("the console's list of payments lists one sub-merchant's, page after"
     .. " page", function()
    -- (was: no such filter, sub_mchid= was ignored: a provider's list
    -- mixed every sub-merchant's payments, and one sub-merchant's took
    -- opening them all)
    local a, b = sim.partner.sub_mchids[1], sim.partner.sub_mchids[2]
    local pa = gw:create{ sub_mchid = a, amount = 5 }
    local bs = {}
    for i = 1, 52 do bs[i] = gw:create{ sub_mchid = b, amount = i }.id end
    local function ids_of(body)
      local out = {}
      for id in body:gmatch('<a href="/console/payments/(pay_%w+)">') do
        out[#out + 1] = id
      end
      return out
    end
    local page = gw.srv:request{ path = "/console/payments?sub_mchid=" .. b }
    assert.equal(200, page.status, page.body)
    assert.matches("Sub-merchant " .. b, page.body, 1, true)
    assert.matches('name="sub_mchid" value="' .. b .. '"', page.body, 1,
                   true)
    local seen = {}
    for _, id in ipairs(ids_of(page.body)) do seen[id] = true end
    local older = page.body:match('<a href="(/console/payments%?after=[^"]+)">')
    assert.truthy(older, "an Older link")
    older = older:gsub("&amp;", "&")
    assert.matches("&sub_mchid=" .. b, older, 1, true)
    page = gw.srv:request{ path = older }
    assert.equal(200, page.status, page.body)
    for _, id in ipairs(ids_of(page.body)) do
      assert.is_nil(seen[id], "a payment on two pages")
      seen[id] = true
    end
    for _, id in ipairs(bs) do assert.is_true(seen[id], id) end
    assert.is_nil(seen[pa.id])
    -- with a state, and with a search: the sub-merchant's only
    local mine = {}
    for _, id in ipairs(bs) do mine[id] = true end
    page = gw.srv:request{ path = "/console/payments?state=paying&sub_mchid="
                                  .. b }
    local got = ids_of(page.body)
    assert.equal(50, #got)
    for _, id in ipairs(got) do assert.is_true(mine[id], id) end
    page = gw.srv:request{ path = "/console/payments?state=paid&sub_mchid="
                                  .. b }
    assert.same({}, ids_of(page.body))
    page = gw.srv:request{ path = "/console/payments?q=" .. pa.id
                                  .. "&sub_mchid=" .. b }
    assert.same({}, ids_of(page.body))
    page = gw.srv:request{ path = "/console/payments?q=" .. pa.id
                                  .. "&sub_mchid=" }
    assert.same({ pa.id }, ids_of(page.body))
    -- anything but 1 to 32 digits: the console's 400
    -- (not UTF-8: refused as any such query is)
    for _, v in ipairs{ "x", ("1"):rep(33), "1%200", "-1", "%FF" } do
      page = gw.srv:request{ path = "/console/payments?sub_mchid=" .. v }
      assert.equal(400, page.status, v)
      if v ~= "%FF" then assert.matches("sub_mchid", page.body, 1, true) end
    end
  end)
end)

-- the same on PostgreSQL: sub_appid written with the payment and each
-- attempt (create, a resumed create, a switch), then paid and refunded
local servers = require "spec.support.servers"
if not servers.have_postgres() then
  describe("gateway for a service provider on PostgreSQL", function()
    pending("PostgreSQL is not installed")
  end)
  return
end

describe("gateway for a service provider on PostgreSQL", function()
  local sim, gw

  setup(function()
    local pg = servers.postgres()
    sim = testing.simulator{ time_scale = 100, partner = true }
    gw = core.start(sim, { partner = true,
                           db = function() return pg.url end })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
    servers.stop_all()
  end)

  it("pays under a sub_appid corrected on a resumed create, after a"
     .. " switch", function()
    local sub_appid = sim.partner.sub_appid
    local body = { order_id = "pg-sub-" .. crypto.random_nonce(6),
      channel = "native", amount = 8, description = "x",
      sub_mchid = sim.partner.sub_mchid, sub_appid = "wx00000000000000ff" }
    local res = gw:call("POST", "/v1/payments", body)
    assert.equal(502, res.status, res.body)
    body.sub_appid = sub_appid
    res = gw:call("POST", "/v1/payments", body)
    assert.equal(201, res.status, res.body)
    local p = res.json.payment
    assert.equal(sub_appid, p.sub_appid)
    local openid = "oPg_" .. crypto.random_nonce(20)
    res = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
      { channel = "jsapi", payer = { openid = openid } })
    assert.equal(201, res.status, res.body)
    assert.equal(sub_appid, res.json.pay.appId)
    local no = res.json.payment.out_trade_no
    sim:pay(no, sim.partner.sub_mchid)
    gw:wait_state(p.id, "paid")
    local got = gw:get(p.id)
    assert.equal(sub_appid, got.sub_appid)
    local list = {}
    for i, a in ipairs(got.attempts) do list[i] = a.sub_appid end
    assert.same({ "wx00000000000000ff", sub_appid, sub_appid }, list)
    local wx = sim:client(sim.partner)
    local t = assert(wx:query_by_out_trade_no(no, sim.partner.sub_mchid))
    wx:stop()
    assert.same({ sub_openid = openid }, t.payer)
    local r = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                      { amount = 8 })
    assert.equal(201, r.status, r.body)
    sim:settle(r.json.out_refund_no)
    gw:wait_state(p.id, "refunded")
  end)
end)
