-- The simulator's bills: the CSV layout made from its own records, gzip,
-- the SHA-1 of the uncompressed file, STATEMENT_CREATING before a day is
-- over, NO_STATEMENT_EXIST for a day without records, the download
-- token's expiry; and paygate.wechatpay's trade_bill / download_bill
-- against it.
local paygate = require "paygate"
local crypto = require "paygate.crypto"
local zlib = require "paygate.zlib"
local json = require "cjson.safe"
local wechatpay = require "paygate.wechatpay"
local bill = require "paygate.wechatpay.bill"
local server = require "support.server"
local sn = require "support.simnotify"
local days = require "support.days"

local TRADE_HEADER = "交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,"
  .. "商户订单号,用户标识,交易类型,交易状态,付款银行,货币种类,应结订单金额,"
  .. "代金券金额,微信退款单号,商户退款单号,退款金额,充值券退款金额,退款类型,"
  .. "退款状态,商品名称,商户数据包,手续费,费率,订单金额,申请退款金额,费率备注"
local TRADE_SUMMARY = "总交易单数,应结订单总金额,退款总金额,充值券退款总金额,"
  .. "手续费总金额,订单总金额,申请退款总金额"
local FUND_HEADER = "记账时间,微信支付业务单号,资金流水单号,业务名称,业务类型,"
  .. "收支类型,收支金额(元),账户结余(元),资金变更提交申请人,备注,业务凭证号"
local FUND_SUMMARY = "资金流水总笔数,收入笔数,收入金额,支出笔数,支出金额"

local TTL = 5
local sim, certs, today, nos, recv, tmp

local function beijing_date(t)
  return os.date("!%Y-%m-%d", math.floor(t) + 8 * 3600)
end

local function get(target)
  local res = sn.signed(sim, "GET", target)
  return res.status, json.decode(res.body), res
end

-- a signed 2xx answer: verified with the simulator's platform certificate
local function verified(res)
  local h = res.headers
  local cert = certs[h["wechatpay-serial"]]
  assert.truthy(cert, "a platform certificate serial")
  assert.truthy(crypto.verify_base64(cert, h["wechatpay-timestamp"] .. "\n"
    .. h["wechatpay-nonce"] .. "\n" .. res.body .. "\n",
    h["wechatpay-signature"]))
end

local function download(url)
  local target = url:match("^https?://[^/]+(/.*)$") or url
  local res = sn.signed(sim, "GET", target)
  return res
end

-- the lines of a CSV, each checked to end in CRLF
local function lines(text)
  assert.equal("\r\n", text:sub(-2))
  assert.is_nil(text:gsub("\r\n", ""):find("[\r\n]"), "a bare CR or LF")
  local out = {}
  for l in text:gmatch("(.-)\r\n") do out[#out + 1] = l end
  return out
end

local function fields(l)
  return (bill.split(l))
end

setup(function()
  tmp = server.tmpdir()
  recv = sn.receiver()
  sim = sn.start{ extra = "bill_url_ttl = " .. TTL }
  certs = sn.platform_certs(sim)
  -- the records within one Beijing day, the bill's (made again in the
  -- new day when a midnight passed meanwhile)
  today = days.within(days.BEIJING, function()
    nos = {}
    local url = sn.notify_url(recv, "bills")
    for i, total in ipairs({ 1, 250, 12345 }) do
      nos[i] = "BILL" .. crypto.random_nonce(12)
      sn.prepay(sim, nos[i], url, total)
      sn.pay(sim, nos[i])
    end
    -- neither a failed nor an unpaid order is in a bill
    local failed, unpaid = "BILLF" .. crypto.random_nonce(8),
                           "BILLU" .. crypto.random_nonce(8)
    sn.prepay(sim, failed, url, 7)
    assert.equal(200, (sn.ctl(sim, "POST", "/sim/transactions/" .. failed
                                 .. "/fail", {})))
    sn.prepay(sim, unpaid, url, 9)
    sn.refund(sim, nos[3], "RBILL" .. nos[3]:sub(5), 100, 12345, url)
    sn.settle(sim, "RBILL" .. nos[3]:sub(5), "SUCCESS")
  end)
end)

teardown(function()
  if sim then sim:stop() end
  if recv then recv:stop() end
  if tmp then os.execute("rm -rf " .. tmp) end
end)

describe("simulator bills", function()
  it("today's bill before the day is over: 400 STATEMENT_CREATING, unsigned",
     function()
    local st, doc, res = get("/v3/bill/tradebill?bill_date=" .. today)
    assert.equal(400, st)
    assert.equal("STATEMENT_CREATING", doc.code)
    assert.is_nil(res.headers["wechatpay-signature"])
  end)

  it("a past day without trades: NO_STATEMENT_EXIST; bad dates: PARAM_ERROR",
     function()
    local past = beijing_date(os.time() - 5 * 86400)
    local st, doc = get("/v3/bill/tradebill?bill_date=" .. past)
    assert.equal(400, st)
    assert.equal("NO_STATEMENT_EXIST", doc.code)
    st, doc = get("/v3/bill/fundflowbill?bill_date=" .. past)
    assert.equal(400, st)
    assert.equal("NO_STATEMENT_EXIST", doc.code)
    for _, d in ipairs({ beijing_date(os.time() + 3 * 86400), "2026-02-30",
                         "20261101", "" }) do
      st, doc = get("/v3/bill/tradebill?bill_date=" .. d)
      assert.equal(400, st)
      assert.equal("PARAM_ERROR", doc.code)
      assert.equal("bill_date", doc.detail.field)
    end
    st, doc = get("/v3/bill/tradebill?bill_date=" .. past .. "&bill_type=X")
    assert.equal("PARAM_ERROR", doc.code)
    assert.equal("bill_type", doc.detail.field)
    st, doc = get("/v3/bill/tradebill?bill_date=" .. past .. "&tar_type=ZIP")
    assert.equal("tar_type", doc.detail.field)
  end)

  describe("once the day is closed", function()
    setup(function()
      local st, doc = sn.ctl(sim, "POST", "/sim/bills/close",
                             { bill_date = today })
      assert.equal(200, st, json.encode(doc))
    end)

    it("the trade bill: WeChat's CSV layout, amounts in yuan, SHA-1",
       function()
      local st, doc, res = get("/v3/bill/tradebill?bill_date=" .. today
                               .. "&bill_type=ALL")
      assert.equal(200, st, res.body)
      verified(res)
      assert.equal("SHA1", doc.hash_type)
      assert.truthy(doc.download_url:match("/v3/billdownload/file%?token="))
      local file = download(doc.download_url)
      assert.equal(200, file.status)
      assert.is_nil(file.headers["wechatpay-signature"])
      assert.equal(doc.hash_value, crypto.hex(crypto.digest("sha1",
                                                            file.body)))
      local l = lines(file.body)
      assert.equal(TRADE_HEADER, l[1])
      assert.equal(7, #l)    -- header, 3 payments, 1 refund, summary (2)
      local by_no, refunds = {}, 0
      for i = 2, 5 do
        assert.equal("`", l[i]:sub(1, 1))
        local f = fields(l[i])
        assert.equal(27, #f)
        assert.truthy(f[1]:match("^" .. today:gsub("%-", "%%-")
                                 .. " %d%d:%d%d:%d%d$"), f[1])
        assert.equal(sn.APPID, f[2])
        assert.equal(sn.MCHID, f[3])
        if f[10] == "REFUND" then
          refunds = refunds + 1
          assert.equal(nos[3], f[7])
          assert.equal("1.00", f[17])
          assert.equal("ORIGINAL", f[19])
          assert.equal("SUCCESS", f[20])
          assert.equal("1.00", f[26])
        else
          assert.equal("SUCCESS", f[10])
          by_no[f[7]] = f
        end
      end
      assert.equal(1, refunds)
      assert.equal("0.01", by_no[nos[1]][13])
      assert.equal("2.50", by_no[nos[2]][13])
      assert.equal("123.45", by_no[nos[3]][13])
      assert.equal("123.45", by_no[nos[3]][25])
      assert.equal("0.74000", by_no[nos[3]][23])
      assert.equal("0.60%", by_no[nos[3]][24])
      assert.equal(TRADE_SUMMARY, l[#l - 1])
      assert.same({ "4", "125.96", "1.00", "0.00", "0.76", "125.96", "1.00" },
                  fields(l[#l]))
    end)

    it("bill_type SUCCESS and REFUND hold their rows only", function()
      for bt, want in pairs({ SUCCESS = 3, REFUND = 1 }) do
        local st, doc = get("/v3/bill/tradebill?bill_date=" .. today
                            .. "&bill_type=" .. bt)
        assert.equal(200, st)
        local l = lines(download(doc.download_url).body)
        assert.equal(want + 3, #l)
        assert.equal(tostring(want), fields(l[#l])[1])
      end
    end)

    it("tar_type=GZIP: a gzip file whose content has the SHA-1", function()
      local _, plain = get("/v3/bill/tradebill?bill_date=" .. today)
      local st, doc = get("/v3/bill/tradebill?bill_date=" .. today
                          .. "&tar_type=GZIP")
      assert.equal(200, st)
      assert.equal(plain.hash_value, doc.hash_value)
      local file = download(doc.download_url)
      assert.equal(200, file.status)
      assert.equal("\31\139", file.body:sub(1, 2))
      local z = zlib.inflate()
      local a = assert(z:write(file.body))
      local b = assert(z:finish())
      local text = a .. b
      assert.equal(doc.hash_value, crypto.hex(crypto.digest("sha1", text)))
      assert.equal(TRADE_HEADER, lines(text)[1])
    end)

    it("the fund-flow bill: payments in, fees and the refund out", function()
      local st, doc, res = get("/v3/bill/fundflowbill?bill_date=" .. today
                               .. "&account_type=BASIC")
      assert.equal(200, st, res.body)
      verified(res)
      local file = download(doc.download_url)
      assert.equal(doc.hash_value, crypto.hex(crypto.digest("sha1",
                                                            file.body)))
      local l = lines(file.body)
      assert.equal(FUND_HEADER, l[1])
      assert.equal(FUND_SUMMARY, l[#l - 1])
      -- 3 payments, 2 fees (0.01 yuan has none), 1 refund
      assert.same({ "6", "3", "125.96", "3", "1.76" }, fields(l[#l]))
      local last = fields(l[#l - 2])
      assert.equal(11, #last)
      assert.equal("124.20", last[8])       -- the balance after all six
      st, doc = get("/v3/bill/fundflowbill?bill_date=" .. today
                    .. "&account_type=OPERATION")
      assert.equal(400, st)
      assert.equal("NO_STATEMENT_EXIST", doc.code)
    end)

    it("a download_url expires after bill_url_ttl: 404 RESOURCE_NOT_EXISTS",
       function()
      local issued = paygate.update_time()
      local st, doc = get("/v3/bill/tradebill?bill_date=" .. today)
      assert.equal(200, st)
      sn.wait_until(function() return paygate.update_time() > issued + TTL + 0.5
                    end, TTL + 5, "the token's lifetime to pass")
      local file = download(doc.download_url)
      assert.equal(404, file.status)
      assert.equal("RESOURCE_NOT_EXISTS", json.decode(file.body).code)
      -- an unknown token too
      file = download("/v3/billdownload/file?token=" .. ("x"):rep(64))
      assert.equal(404, file.status)
    end)

    it("paygate.wechatpay: trade_bill + download_bill", function()
      local wx = assert(wechatpay.client({ mchid = sn.MCHID,
        merchant_private_key = sn.KEY_PATH, merchant_serial = sn.SERIAL,
        apiv3_key = sn.APIV3, base_url = sim.base, timeout = 5,
        deadline = 10 }))
      local b, err = wx:trade_bill({ bill_date = today, bill_type = "ALL",
                                     tar_type = "GZIP" })
      assert.truthy(b, tostring(err))
      local info, derr = wx:download_bill(b, tmp .. "/trade.csv")
      assert.truthy(info, tostring(derr))
      assert.is_true(info.gzip)
      local records, summary = 0, nil
      for kind, row in bill.rows(info.path) do
        if kind == "record" then
          records = records + 1
          assert.truthy(row["商户订单号"]:match("^BILL"))
        else
          summary = row
        end
      end
      assert.equal(4, records)
      assert.equal("125.96", summary["应结订单总金额"])
      local f
      f, err = wx:fund_flow_bill({ bill_date = today })
      assert.truthy(f, tostring(err))
      info, derr = wx:download_bill(f, tmp .. "/fund.csv")
      assert.truthy(info, tostring(derr))
      assert.is_false(info.gzip)
      local none
      none, err = wx:trade_bill({ bill_date = beijing_date(os.time()
                                                           - 5 * 86400) })
      assert.is_nil(none)
      assert.equal("no_statement_exist", err.kind)
      wx:stop()
    end)

    -- last: the payment below adds to today's records
    it("a signature fault on \"*\" waits for a signed API answer: the "
       .. "bill file and a notification pass it by", function()
      local function verifies(res)
        local h = res.headers
        local cert = certs[h["wechatpay-serial"]]
        return cert ~= nil and crypto.verify_base64(cert,
          h["wechatpay-timestamp"] .. "\n" .. h["wechatpay-nonce"] .. "\n"
          .. res.body .. "\n", h["wechatpay-signature"]) == true
      end
      local function fault()
        local st, doc = sn.ctl(sim, "POST", "/sim/faults", { endpoint = "*",
                               kind = "bad_signature", count = 1 })
        assert.equal(200, st, json.encode(doc))
      end
      local ok, e = pcall(function()
        -- the bill file (never signed) leaves it to the next answer
        local st, doc = get("/v3/bill/tradebill?bill_date=" .. today)
        assert.equal(200, st)
        fault()
        local file = download(doc.download_url)
        assert.equal(200, file.status)
        local res = sn.signed(sim, "GET", "/v3/certificates")
        assert.equal(200, res.status)
        assert.is_false(verifies(res), "the answer after the bill file")
        assert.is_true(verifies(sn.signed(sim, "GET", "/v3/certificates")))
        -- a notification (a fault on "notify" spoils those) too
        local box = "sigfault" .. crypto.random_nonce(6)
        local no = "SIGF" .. crypto.random_nonce(12)
        sn.prepay(sim, no, sn.notify_url(recv, box), 3)
        fault()
        sn.pay(sim, no)
        local got
        sn.wait_until(function()
          got = sn.received(recv, box)
          return #got >= 1
        end, 20, "the notification of " .. no)
        assert.truthy(sn.verify(certs, got[1]))
        res = sn.signed(sim, "GET", "/v3/certificates")
        assert.is_false(verifies(res), "the answer after the notification")
        -- where it cannot act, it cannot be set
        st, doc = sn.ctl(sim, "POST", "/sim/faults", {
          endpoint = "billdownload", kind = "unknown_serial" })
        assert.equal(400, st)
        assert.matches("unsigned", doc.message)
      end)
      sn.ctl(sim, "DELETE", "/sim/faults")
      assert(ok, e)
    end)
  end)
end)

describe("simulator bills with two workers", function()
  -- a payment took its success time before its transaction waited for
  -- the database (the other worker writing): a day closed in between had
  -- a cutoff after that time, the bill asked at once lacked the payment,
  -- and once it committed the download was made again with it: 500 "the
  -- bill changed since its download_url was issued"
  it("a day closed while payments commit: the download keeps its SHA-1",
     function()
    for round = 1, 6 do
      -- each round's day, its payments and its bill within one Beijing
      -- day: a midnight right after the day is taken leaves that day
      -- without trades (NO_STATEMENT_EXIST); the round then runs again,
      -- all in the new day
      days.within(days.BEIJING, function()
        local s = sn.start{ workers = 2 }
        local ok, e = pcall(function()
          local day = beijing_date(os.time())
          local pool = {}
          local prep, left = {}, 160
          for t = 1, 16 do
            prep[t] = paygate.spawn(function()
              while left > 0 do
                left = left - 1
                local no = "BW" .. crypto.random_nonce(12)
                sn.prepay(s, no, "https://merchant.example/n", 1)
                pool[#pool + 1] = no
              end
            end)
          end
          for _, t in ipairs(prep) do t:wait() end
          local paid, tasks = 0, {}
          for t = 1, 24 do
            tasks[t] = paygate.spawn(function()
              while #pool > 0 do
                sn.pay(s, table.remove(pool))
                paid = paid + 1
              end
            end)
          end
          sn.wait_until(function() return paid >= 20 end, 10, "20 payments")
          local st, doc = sn.ctl(s, "POST", "/sim/bills/close",
                                 { bill_date = day })
          assert.equal(200, st, json.encode(doc))
          local res = sn.signed(s, "GET", "/v3/bill/tradebill?bill_date="
                                .. day)
          assert.equal(200, res.status, res.body)
          local asked = json.decode(res.body)
          for _, t in ipairs(tasks) do
            -- (a payment that failed says why, not only that one did)
            local done, werr = t:wait()
            assert(done ~= nil or werr == nil, tostring(werr))
          end
          assert.is_true(#pool == 0 and paid == 160, "every order paid")
          local file = sn.signed(s, "GET",
            asked.download_url:match("^https?://[^/]+(/.*)$"))
          assert.equal(200, file.status,
                       "round " .. round .. ": " .. file.body)
          assert.equal(asked.hash_value,
                       crypto.hex(crypto.digest("sha1", file.body)))
        end)
        s:stop()
        assert(ok, e)
      end)
    end
  end)
end)
