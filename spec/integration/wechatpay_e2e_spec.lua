-- paygate.wechatpay end to end against the WeChat Pay simulator
-- (examples/simulator), started by paygate.testing: every API call, in
-- both verifier modes (platform certificates; the public key) and the SM
-- variant, and the notifications of each reaching an app that parses them
-- with the same client.
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local testing = require "paygate.testing"
local bill = require "paygate.wechatpay.bill"
local days = require "support.days"

-- An app receiving notifications with paygate.wechatpay: it keeps each
-- parsed event in a shared dict, by out_refund_no or out_trade_no.
local RECEIVER = [[
local paygate = require "paygate"
local json = require "cjson.safe"
local shared = require "paygate.shared"
local wechatpay = require "paygate.wechatpay"
local wx = assert(wechatpay.client(paygate.config_copy().wechatpay))
local events = shared.get_dict("events")
paygate.route("POST", "/notify", function(req)
  local ev, err = wx:parse_notification(req)
  if not ev then return wechatpay.notify_fail(err.kind) end
  local r = ev.resource
  events:set(r.out_refund_no or r.out_trade_no, json.encode({
    id = ev.id, event_type = ev.event_type, serial = ev.serial,
    resource = r }))
  return wechatpay.notify_ack()
end)
paygate.route("GET", "/events/:key", function(req)
  local v = events:get(req.params.key)
  if not v then return 404, { error = "none" } end
  return 200, v, { ["Content-Type"] = "application/json" }
end)
]]

local function beijing_date(t)
  return os.date("!%Y-%m-%d", (t or os.time()) + 8 * 3600)
end

local function suite(label, sim_opts)
  describe(label, function()
    local sim, app, wx, m, dir

    setup(function()
      sim = testing.simulator(sim_opts)
      m = sim.merchant
      app = testing.start_app{ source = RECEIVER, config = {
        wechatpay = sim:client_config(), shared = { events = "1m" } } }
      wx = sim:client()
      dir = testing.tmpdir()
    end)

    teardown(function()
      if wx then wx:stop() end
      testing.stop_all()
      testing.server.rmdir(dir)
    end)

    local function event(key)
      local res
      testing.wait_until(function()
        res = app:request("/events/" .. key)
        return res.status == 200
      end, 15, "the notification of " .. key)
      return res.json
    end

    local function base(no, extra)
      local p = { appid = m.appid, description = "e2e 测试",
                  out_trade_no = no, notify_url = app:url("/notify"),
                  amount = { total = 100, currency = "CNY" } }
      for k, v in pairs(extra or {}) do p[k] = v end
      return p
    end

    it("verifies with the key of its mode", function()
      local st = wx:certificate_status()
      if sim.verifier_mode == "public_key" then
        assert.equal("public_key", st.mode)
        assert.matches("^PUB_KEY_ID_", st.public_key_id)
        assert.equal(0, #st.serials)
      elseif sim.verifier_mode == "both" then
        assert.equal("migration", st.mode)
        assert.matches("^PUB_KEY_ID_", st.public_key_id)
        assert.is_true(#st.serials >= 1)
      else
        assert.equal("certificate", st.mode)
        assert.is_true(#st.serials >= 1)
      end
    end)

    it("answers not_found for an order it never saw", function()
      local data, err = wx:query_by_out_trade_no(testing.out_trade_no())
      assert.is_nil(data)
      assert.equal("not_found", err.kind)
    end)

    it("makes each of the four prepays", function()
      local d = assert(wx:native_prepay(base(testing.out_trade_no())))
      assert.matches("^weixin://", d.code_url)
      d = assert(wx:jsapi_prepay(base(testing.out_trade_no(),
        { payer = { openid = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o" } })))
      assert.is_string(d.prepay_id)
      d = assert(wx:app_prepay(base(testing.out_trade_no())))
      assert.is_string(d.prepay_id)
      d = assert(wx:h5_prepay(base(testing.out_trade_no(), {
        scene_info = { payer_client_ip = "127.0.0.1",
                       h5_info = { type = "Wap" } } })))
      assert.matches("^https://", d.h5_url)
    end)

    it("answers a repeated prepay alike and refuses a changed one",
       function()
      local no = testing.out_trade_no()
      assert(wx:native_prepay(base(no)))
      assert(wx:native_prepay(base(no)))
      local data, err = wx:native_prepay(base(no, {
        amount = { total = 101, currency = "CNY" } }))
      assert.is_nil(data)
      assert.equal("invalid_request", err.kind)
    end)

    it("makes pay parameters the merchant's public key verifies", function()
      local no = testing.out_trade_no()
      local d = assert(wx:jsapi_prepay(base(no,
        { payer = { openid = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o" } })))
      local pub = assert(crypto.public_key(testing.read(m.public_key)))
      local alg = sim.sign_type
      local p = assert(wx:jsapi_pay_params(m.appid, d.prepay_id))
      assert.equal("prepay_id=" .. d.prepay_id, p.package)
      assert.is_true(crypto.verify_base64(pub, p.appId .. "\n" .. p.timeStamp
        .. "\n" .. p.nonceStr .. "\n" .. p.package .. "\n", p.paySign, alg))
      local a = assert(wx:app_pay_params(m.appid, d.prepay_id))
      assert.is_true(crypto.verify_base64(pub, a.appid .. "\n" .. a.timestamp
        .. "\n" .. a.noncestr .. "\n" .. a.prepayid .. "\n", a.sign, alg))
    end)

    it("pays, queries by both ids and notifies the app", function()
      local no = testing.out_trade_no()
      assert(wx:native_prepay(base(no)))
      local q = assert(wx:query_by_out_trade_no(no))
      assert.equal("NOTPAY", q.trade_state)
      sim:pay(no)
      local ev = event(no)
      assert.equal("TRANSACTION.SUCCESS", ev.event_type)
      if sim.verifier_mode == "public_key" then
        assert.matches("^PUB_KEY_ID_", ev.serial)
      elseif sim.verifier_mode == "platform_certificates" then
        assert.not_matches("^PUB_KEY_ID_", ev.serial)
      end
      assert.equal("SUCCESS", ev.resource.trade_state)
      assert.equal(100, ev.resource.amount.total)
      q = assert(wx:query_by_out_trade_no(no))
      assert.equal("SUCCESS", q.trade_state)
      assert.equal(ev.resource.transaction_id, q.transaction_id)
      local t = assert(wx:query_by_transaction_id(q.transaction_id))
      assert.equal(no, t.out_trade_no)
    end)

    if sim_opts.verifier_mode == "both" then
      it("verifies notifications signed by either key in migration",
         function()
        -- the simulator alternates them, as WeChat moves notifications to
        -- the public key over days
        local public, cert = 0, 0
        for _ = 1, 4 do         -- 2 suffice; others' deliveries may interleave
          if public > 0 and cert > 0 then break end
          local no = testing.out_trade_no()
          assert(wx:native_prepay(base(no)))
          sim:pay(no)
          local ev = event(no)
          assert.equal("SUCCESS", ev.resource.trade_state)
          if ev.serial:match("^PUB_KEY_ID_") then public = public + 1
          else cert = cert + 1 end
        end
        assert.is_true(public > 0 and cert > 0, public .. " signed by the"
                       .. " public key, " .. cert .. " by the certificate")
      end)
    end

    it("closes an unpaid order and refuses to close a paid one", function()
      local no = testing.out_trade_no()
      assert(wx:native_prepay(base(no)))
      assert.same({}, assert(wx:close(no)))
      assert.equal("CLOSED", assert(wx:query_by_out_trade_no(no)).trade_state)
      local paid = testing.out_trade_no()
      assert(wx:native_prepay(base(paid)))
      sim:pay(paid)
      local ok, err = wx:close(paid)
      assert.is_nil(ok)
      assert.equal("order_paid", err.kind)
    end)

    it("leaves a failed payment PAYERROR", function()
      local no = testing.out_trade_no()
      assert(wx:native_prepay(base(no)))
      sim:fail(no)
      assert.equal("PAYERROR",
                   assert(wx:query_by_out_trade_no(no)).trade_state)
    end)

    it("refunds in parts, settles, queries and notifies", function()
      local no = testing.out_trade_no()
      assert(wx:native_prepay(base(no)))
      sim:pay(no)
      local rno = "R" .. crypto.random_nonce(20)
      local r = assert(wx:refund{ out_trade_no = no, out_refund_no = rno,
        notify_url = app:url("/notify"),
        amount = { refund = 40, total = 100, currency = "CNY" } })
      assert.equal("PROCESSING", r.status)
      -- the same out_refund_no again: the same refund
      local again = assert(wx:refund{ out_trade_no = no, out_refund_no = rno,
        notify_url = app:url("/notify"),
        amount = { refund = 40, total = 100, currency = "CNY" } })
      assert.equal(r.refund_id, again.refund_id)
      assert.equal("PROCESSING", assert(wx:query_refund(rno)).status)
      sim:settle(rno, "SUCCESS")
      assert.equal("SUCCESS", assert(wx:query_refund(rno)).status)
      local ev = event(rno)
      assert.equal("REFUND.SUCCESS", ev.event_type)
      assert.equal(40, ev.resource.amount.refund)
      assert.equal("REFUND", assert(wx:query_by_out_trade_no(no)).trade_state)
      -- more than is left: refused
      local data, err = wx:refund{ out_trade_no = no,
        out_refund_no = "R" .. crypto.random_nonce(20),
        amount = { refund = 61, total = 100, currency = "CNY" } }
      assert.is_nil(data)
      assert.equal("invalid_request", err.kind)
      -- what is left: accepted
      assert(wx:refund{ transaction_id = ev.resource.transaction_id,
        out_refund_no = "R" .. crypto.random_nonce(20),
        amount = { refund = 60, total = 100, currency = "CNY" } })
      assert.equal("not_found", select(2, wx:query_refund("R"
        .. crypto.random_nonce(20))).kind)
    end)

    it("sends an ABNORMAL refund to a bank card", function()
      local function abnormal()
        local no = testing.out_trade_no()
        assert(wx:native_prepay(base(no)))
        sim:pay(no)
        local rno = "R" .. crypto.random_nonce(20)
        local r = assert(wx:refund{ out_trade_no = no, out_refund_no = rno,
          amount = { refund = 100, total = 100, currency = "CNY" } })
        sim:settle(rno, "ABNORMAL")
        assert.equal("ABNORMAL", assert(wx:query_refund(rno)).status)
        return r.refund_id, rno
      end
      local id, rno = abnormal()
      local a = assert(wx:abnormal_refund{ refund_id = id, out_refund_no = rno,
                                           type = "MERCHANT_BANK_CARD" })
      assert.equal(rno, a.out_refund_no)
      id, rno = abnormal()
      local p = { refund_id = id, out_refund_no = rno, type = "USER_BANK_CARD",
                  bank_type = "ICBC_DEBIT", bank_account = "6222021234567890123",
                  real_name = "张三" }
      -- the card's fields are encrypted (RSA-OAEP, or SM2 in the SM
      -- variant) and the simulator decrypts them with its key
      a = assert(wx:abnormal_refund(p))
      assert.equal(rno, a.out_refund_no)
      -- its answer lost after WeChat acted: not retried (a repeat is
      -- refused, the refund is no longer ABNORMAL), unknown_outcome, and
      -- the query tells
      id, rno = abnormal()
      sim:fault{ endpoint = "abnormal_refund", kind = "reset", count = 1,
                 after = true }
      local r, err = wx:abnormal_refund{ refund_id = id, out_refund_no = rno,
                                         type = "MERCHANT_BANK_CARD" }
      assert.is_nil(r)
      assert.equal("unknown_outcome", err.kind)
      assert.equal("PROCESSING", assert(wx:query_refund(rno)).status)
    end)

    it("gives bills and downloads them with their hash checked", function()
      -- paid within one Beijing day, the bill's (paid again in the new
      -- day when a midnight passed meanwhile)
      local y, no = days.within(days.BEIJING, function()
        local no = testing.out_trade_no()
        assert(wx:native_prepay(base(no)))
        sim:pay(no)
        return no
      end)
      -- the bill of a day is made the next day: that day's is not ready
      -- (nor, just after a midnight, yesterday's)
      local b, err = wx:trade_bill{ bill_date = y }
      assert.is_nil(b)
      assert.equal("statement_creating", err.kind)
      -- a day without trades
      b, err = wx:trade_bill{ bill_date = beijing_date(os.time() - 20 * 86400) }
      assert.is_nil(b)
      assert.equal("no_statement_exist", err.kind)
      -- once the day is closed (WeChat: about 10:00 the next day)
      local old = no
      sim:close_bills(y)
      for _, gz in ipairs({ false, true }) do
        b = assert(wx:trade_bill{ bill_date = y, bill_type = "ALL",
                                  tar_type = gz and "GZIP" or nil })
        assert.equal("SHA1", b.hash_type)
        local path = dir .. "/trade-" .. tostring(gz) .. ".csv"
        local info = assert(wx:download_bill(b, path))
        assert.equal(gz, info.gzip == true)
        local found
        for kind, row in bill.rows(info.path) do
          if kind == "record" and row["商户订单号"] == old then found = row end
        end
        assert.is_table(found)
        assert.equal("SUCCESS", found["交易状态"])
        assert.equal("1.00", found["应结订单金额"])
      end
      b = assert(wx:fund_flow_bill{ bill_date = y, account_type = "BASIC" })
      local info = assert(wx:download_bill(b, dir .. "/fund.csv"))
      assert.is_true(info.bytes > 0)
    end)
  end)
end

suite("with platform certificates", {})
suite("with the WeChat Pay public key", { verifier_mode = "public_key" })
suite("in migration mode (both)", { verifier_mode = "both" })
suite("in the SM variant", { sign_type = testing.SM2 })
