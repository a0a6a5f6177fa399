-- The WeChat Pay API calls (lua/paygate/wechatpay/api.lua) against
-- spec/support/wxapi_server, a stand-in that checks each request's
-- signature and signs its answers with the test platform key: the exact
-- request the client sent (path, query, JSON body) and what each call
-- returns.
local crypto = require "paygate.crypto"
local wxapi = require "support.wxapi"

local MCHID, SP_MCHID, PUB_ID = wxapi.MCHID, wxapi.SP_MCHID, wxapi.PUB_ID
local APPID = "wx2421b1c4370ec43b"

local function prepay_p(extra)
  local p = { appid = APPID, description = "Image形象店-深圳腾大-QQ公仔",
              out_trade_no = "1217752501201407033233368018",
              notify_url = "https://www.weixin.qq.com/wxpay/pay.php",
              amount = { total = 100, currency = "CNY" } }
  for k, v in pairs(extra or {}) do p[k] = v end
  return p
end

local function refund_p(extra)
  local p = { transaction_id = "1217752501201407033233368018",
              out_refund_no = "1217752501201407033233368019",
              reason = "商品已售完",
              amount = { refund = 50, total = 100, currency = "CNY" } }
  for k, v in pairs(extra or {}) do p[k] = v end
  return p
end

local REFUND_ANSWER = {
  refund_id = "50000000382019052709732678859",
  out_refund_no = "1217752501201407033233368019",
  transaction_id = "1217752501201407033233368018",
  out_trade_no = "1217752501201407033233368018", channel = "ORIGINAL",
  user_received_account = "招商银行信用卡0403", create_time =
  "2026-11-29T10:34:56+08:00", status = "PROCESSING", funds_account =
  "AVAILABLE", amount = { total = 100, refund = 50, payer_total = 100,
  payer_refund = 50, settlement_refund = 50, settlement_total = 100,
  discount_refund = 0, currency = "CNY" } }

describe("wechatpay api", function()
  local stub, wx, pwx

  setup(function()
    stub = wxapi.start()
    wx = stub:client()
    pwx = stub:partner_client()
  end)
  teardown(function()
    wx:close()
    pwx:close()
    stub:stop()
  end)
  before_each(function() stub:reset() end)

  describe("invalid_params, before any network I/O", function()
    local long = ("x"):rep(128)
    local cases = {
      -- { name, call, field }
      { "prepay without description", function()
          local p = prepay_p(); p.description = nil
          return wx:native_prepay(p) end, "description" },
      { "prepay with a numeric description", function()
          return wx:native_prepay(prepay_p{ description = 12 }) end,
        "description" },
      { "prepay description over 127 characters", function()
          return wx:native_prepay(prepay_p{ description = long }) end,
        "description" },
      { "prepay description of 127 Chinese characters is fine, 128 not",
        function()
          return wx:native_prepay(prepay_p{ description = ("商"):rep(128) })
        end, "description" },
      { "prepay description that is not UTF-8", function()
          return wx:native_prepay(prepay_p{ description = "ab\255c" }) end,
        "description" },
      -- WeChat Pay takes 1- to 3-byte UTF-8 characters only: an emoji
      -- (4 bytes) is refused here, as the server would refuse it
      { "prepay description with an emoji", function()
          return wx:native_prepay(prepay_p{
            description = "QQ\240\159\152\128公仔" }) end, "description" },
      { "prepay attach with a 4-byte character", function()
          return wx:native_prepay(prepay_p{ attach = "a\240\160\128\128" })
        end, "attach" },
      { "refund reason with an emoji", function()
          return wx:refund(refund_p{ reason = "\240\159\152\128" }) end,
        "reason" },
      { "prepay out_trade_no too short", function()
          return wx:native_prepay(prepay_p{ out_trade_no = "12345" }) end,
        "out_trade_no" },
      { "prepay out_trade_no with a slash", function()
          return wx:native_prepay(prepay_p{ out_trade_no = "abc/def/g" }) end,
        "out_trade_no" },
      { "prepay without amount", function()
          local p = prepay_p(); p.amount = nil
          return wx:native_prepay(p) end, "amount" },
      { "prepay amount.total zero", function()
          return wx:native_prepay(prepay_p{ amount = { total = 0 } }) end,
        "amount.total" },
      { "prepay amount.total a fraction", function()
          return wx:native_prepay(prepay_p{ amount = { total = 1.5 } }) end,
        "amount.total" },
      { "prepay amount.total a string", function()
          return wx:native_prepay(prepay_p{ amount = { total = "100" } }) end,
        "amount.total" },
      { "prepay amount.currency lower case", function()
          return wx:native_prepay(prepay_p{ amount = { total = 1,
            currency = "cny" } }) end, "amount.currency" },
      { "prepay amount an array", function()
          return wx:native_prepay(prepay_p{ amount = { 1 } }) end,
        "amount" },
      { "prepay notify_url over http", function()
          return wx:native_prepay(prepay_p{
            notify_url = "http://example.com/n" }) end, "notify_url" },
      { "prepay notify_url over http to a host named like loopback",
        function()
          return wx:native_prepay(prepay_p{
            notify_url = "http://127.0.0.1.example.com/n" }) end,
        "notify_url" },
      { "prepay notify_url with a query", function()
          return wx:native_prepay(prepay_p{
            notify_url = "https://example.com/n?a=1" }) end, "notify_url" },
      { "prepay time_expire not RFC 3339", function()
          return wx:native_prepay(prepay_p{ time_expire = "2026-01-01" }) end,
        "time_expire" },
      { "prepay time_expire without an offset", function()
          return wx:native_prepay(prepay_p{
            time_expire = "2026-06-08T10:34:56" }) end, "time_expire" },
      { "prepay time_expire with half an offset", function()
          return wx:native_prepay(prepay_p{
            time_expire = "2026-06-08T10:34:56+08" }) end, "time_expire" },
      { "prepay without appid (none configured)", function()
          local p = prepay_p(); p.appid = nil
          return wx:native_prepay(p) end, "appid" },
      { "prepay with another mchid", function()
          return wx:native_prepay(prepay_p{ mchid = "1900000002" }) end,
        "mchid" },
      { "jsapi prepay without payer", function()
          return wx:jsapi_prepay(prepay_p()) end, "payer" },
      { "jsapi prepay without payer.openid", function()
          return wx:jsapi_prepay(prepay_p{ payer = { sp_openid = "o" } })
        end, "payer.openid" },
      -- payer is in the JSAPI prepay's body alone: WeChat refuses it on
      -- the other trade types as a field the API does not define
      { "native prepay with a payer", function()
          return wx:native_prepay(prepay_p{ payer = { openid = "o" } }) end,
        "payer" },
      { "app prepay with a payer", function()
          return wx:app_prepay(prepay_p{ payer = { openid = "o" } }) end,
        "payer" },
      { "h5 prepay with a payer", function()
          return wx:h5_prepay(prepay_p{ payer = { openid = "o" },
            scene_info = { payer_client_ip = "14.23.150.211",
                           h5_info = { type = "Wap" } } }) end, "payer" },
      { "native prepay with an empty payer", function()
          return wx:native_prepay(prepay_p{ payer = {} }) end, "payer" },
      { "h5 prepay with a payer (prepay_request)", function()
          return wx:prepay_request("h5", prepay_p{ payer = { openid = "o" },
            scene_info = { payer_client_ip = "14.23.150.211",
                           h5_info = { type = "Wap" } } }) end, "payer" },
      { "h5 prepay without scene_info", function()
          return wx:h5_prepay(prepay_p()) end, "scene_info" },
      { "h5 prepay without scene_info.h5_info", function()
          return wx:h5_prepay(prepay_p{ scene_info = {
            payer_client_ip = "14.23.150.211" } }) end, "scene_info.h5_info" },
      { "h5 prepay without payer_client_ip", function()
          return wx:h5_prepay(prepay_p{ scene_info = {
            h5_info = { type = "Wap" } } }) end,
        "scene_info.payer_client_ip" },
      { "h5 prepay with a payer_client_ip that is no IP address", function()
          return wx:h5_prepay(prepay_p{ scene_info = {
            payer_client_ip = "999.1.1.1", h5_info = { type = "Wap" } } })
        end, "scene_info.payer_client_ip" },
      { "h5 prepay with an unknown h5_info.type", function()
          return wx:h5_prepay(prepay_p{ scene_info = {
            payer_client_ip = "1.2.3.4", h5_info = { type = "web" } } }) end,
        "scene_info.h5_info.type" },
      { "prepay goods_detail item without quantity", function()
          return wx:app_prepay(prepay_p{ detail = { goods_detail = {
            { merchant_goods_id = "1", unit_price = 1 },
            { merchant_goods_id = "2", unit_price = 1 } } } }) end,
        "detail.goods_detail[1].quantity" },
      { "prepay goods_detail second item's unit_price", function()
          return wx:app_prepay(prepay_p{ detail = { goods_detail = {
            { merchant_goods_id = "1", unit_price = 1, quantity = 1 },
            { merchant_goods_id = "2", unit_price = -1, quantity = 1 } } } })
        end, "detail.goods_detail[2].unit_price" },
      { "prepay support_fapiao a string", function()
          return wx:native_prepay(prepay_p{ support_fapiao = "yes" }) end,
        "support_fapiao" },
      { "prepay with a function inside", function()
          return wx:native_prepay(prepay_p{ attach = "a",
            extra = { f = print } }) end, "extra.f" },
      { "prepay with a null field", function()
          return wx:native_prepay(prepay_p{
            goods_tag = require("paygate.core").null }) end, "goods_tag" },
      { "prepay with a field name that is not UTF-8", function()
          return wx:native_prepay(prepay_p{ scene_info = {
            payer_client_ip = "1.2.3.4", ["\255"] = 1 } }) end,
        "scene_info" },
      { "prepay with an empty goods_detail", function()
          return wx:native_prepay(prepay_p{ detail = { goods_detail = {} } })
        end, "detail.goods_detail" },
      -- integers are sent exactly up to 2^53 (paygate.json); past it a
      -- Lua number is no longer an exact integer
      { "prepay with an integer past 2^53", function()
          return wx:native_prepay(prepay_p{ extra = { n = 2 ^ 54 } }) end,
        "extra.n" },
      { "partner prepay without sub_mchid", function()
          local p = prepay_p(); p.appid = nil; p.sp_appid = APPID
          return pwx:native_prepay(p) end, "sub_mchid" },
      { "partner prepay without sp_appid", function()
          local p = prepay_p{ sub_mchid = "1900000109" }; p.appid = nil
          return pwx:native_prepay(p) end, "sp_appid" },
      { "partner jsapi prepay with neither openid", function()
          local p = prepay_p{ sub_mchid = "1900000109", sp_appid = APPID,
                              payer = {} }
          p.appid = nil
          return pwx:jsapi_prepay(p) end, "payer" },
      { "partner jsapi prepay sub_openid without sub_appid", function()
          local p = prepay_p{ sub_mchid = "1900000109", sp_appid = APPID,
                              payer = { sub_openid = "oUp" } }
          p.appid = nil
          return pwx:jsapi_prepay(p) end, "sub_appid" },
      { "partner native prepay with payer.sp_openid", function()
          local p = prepay_p{ sub_mchid = "1900000109", sp_appid = APPID,
                              payer = { sp_openid = "oUp" } }
          p.appid = nil
          return pwx:native_prepay(p) end, "payer" },
      { "partner app prepay with payer.sub_openid", function()
          local p = prepay_p{ sub_mchid = "1900000109", sp_appid = APPID,
                              sub_appid = APPID,
                              payer = { sub_openid = "oUp" } }
          p.appid = nil
          return pwx:app_prepay(p) end, "payer" },
      { "direct prepay with sub_mchid", function()
          return wx:native_prepay(prepay_p{ sub_mchid = "1900000109" }) end,
        "sub_mchid" },
      { "partner prepay with mchid", function()
          return pwx:native_prepay(prepay_p{ mchid = SP_MCHID,
            sub_mchid = "1900000109", sp_appid = APPID }) end, "mchid" },
      { "query_by_transaction_id nil", function()
          return wx:query_by_transaction_id(nil) end, "transaction_id" },
      { "query_by_transaction_id a number", function()
          return wx:query_by_transaction_id(4200000001) end,
        "transaction_id" },
      { "query_by_transaction_id with ?", function()
          return wx:query_by_transaction_id("42?mchid=1") end,
        "transaction_id" },
      { "query_by_out_trade_no empty", function()
          return wx:query_by_out_trade_no("") end, "out_trade_no" },
      { "query_by_out_trade_no with sub_mchid, direct mode", function()
          return wx:query_by_out_trade_no("ORDER_0001", "1900000109") end,
        "sub_mchid" },
      { "partner query without sub_mchid", function()
          return pwx:query_by_out_trade_no("ORDER_0001") end, "sub_mchid" },
      { "partner query with letters in sub_mchid", function()
          return pwx:query_by_out_trade_no("ORDER_0001", "19x") end,
        "sub_mchid" },
      { "close with a space", function()
          return wx:close("ORDER 0001") end, "out_trade_no" },
      { "partner close without sub_mchid", function()
          return pwx:close("ORDER_0001") end, "sub_mchid" },
      { "refund with neither order id", function()
          local p = refund_p(); p.transaction_id = nil
          return wx:refund(p) end, "transaction_id" },
      { "refund with both order ids", function()
          return wx:refund(refund_p{ out_trade_no = "ORDER_0001" }) end,
        "transaction_id" },
      { "refund without out_refund_no", function()
          local p = refund_p(); p.out_refund_no = nil
          return wx:refund(p) end, "out_refund_no" },
      { "refund without amount.currency", function()
          return wx:refund(refund_p{ amount = { refund = 1, total = 1 } }) end,
        "amount.currency" },
      { "refund more than the total", function()
          return wx:refund(refund_p{ amount = { refund = 101, total = 100,
            currency = "CNY" } }) end, "amount.refund" },
      { "refund amount.from item with a bad account", function()
          return wx:refund(refund_p{ amount = { refund = 1, total = 1,
            currency = "CNY", from = { { account = "X", amount = 1 } } } })
        end, "amount.from[1].account" },
      { "refund reason over 80 characters", function()
          return wx:refund(refund_p{ reason = ("退"):rep(81) }) end, "reason" },
      { "partner refund without sub_mchid", function()
          return pwx:refund(refund_p()) end, "sub_mchid" },
      { "query_refund with a slash", function()
          return wx:query_refund("a/b") end, "out_refund_no" },
      { "abnormal refund without refund_id", function()
          return wx:abnormal_refund{ out_refund_no = "R1",
            type = "MERCHANT_BANK_CARD" } end, "refund_id" },
      { "abnormal refund with an unknown type", function()
          return wx:abnormal_refund{ refund_id = "5000", out_refund_no = "R1",
            type = "CASH" } end, "type" },
      { "abnormal refund to a user card without bank_account", function()
          return wx:abnormal_refund{ refund_id = "5000", out_refund_no = "R1",
            type = "USER_BANK_CARD", bank_type = "ICBC_DEBIT",
            real_name = "张三" } end, "bank_account" },
      { "trade_bill without bill_date", function()
          return wx:trade_bill{} end, "bill_date" },
      { "trade_bill with a bad date", function()
          return wx:trade_bill{ bill_date = "2026/11/29" } end, "bill_date" },
      { "trade_bill with an unknown bill_type", function()
          return wx:trade_bill{ bill_date = "2026-11-29", bill_type = "X" }
        end, "bill_type" },
      { "trade_bill with tar_type gzip (lower case)", function()
          return wx:trade_bill{ bill_date = "2026-11-29", tar_type = "gzip" }
        end, "tar_type" },
      { "trade_bill with an unknown parameter", function()
          return wx:trade_bill{ bill_date = "2026-11-29", foo = "1" } end,
        "foo" },
      { "trade_bill with sub_mchid, direct mode", function()
          return wx:trade_bill{ bill_date = "2026-11-29",
                                sub_mchid = "1900000109" } end, "sub_mchid" },
      { "fund_flow_bill with an unknown account_type", function()
          return wx:fund_flow_bill{ bill_date = "2026-11-29",
                                    account_type = "ALL" } end,
        "account_type" },
      { "download_bill without hash_value", function()
          return wx:download_bill({ download_url =
            "https://api.mch.weixin.qq.com/v3/billdownload/file?token=t",
            hash_type = "SHA1" }, "/tmp/never") end, "hash_value" },
      { "download_bill with an MD5 hash_type", function()
          return wx:download_bill({ download_url =
            "https://api.mch.weixin.qq.com/v3/billdownload/file?token=t",
            hash_type = "MD5", hash_value = ("0"):rep(40) }, "/tmp/never")
        end, "hash_type" },
      { "download_bill from another path", function()
          return wx:download_bill({ download_url =
            "https://api.mch.weixin.qq.com/v3/pay/transactions/jsapi",
            hash_type = "SHA1", hash_value = ("0"):rep(40) }, "/tmp/never")
        end, "download_url" },
      { "jsapi_pay_params without prepay_id", function()
          return wx:jsapi_pay_params(APPID, nil) end, "prepay_id" },
      { "jsapi_pay_params with a number appid", function()
          return wx:jsapi_pay_params(12, "wx2014") end, "appid" },
      { "app_pay_params with an empty prepay_id", function()
          return wx:app_pay_params(APPID, "") end, "prepay_id" },
      { "partner app_pay_params without sub_mchid", function()
          return pwx:app_pay_params(APPID, "wx2014") end, "sub_mchid" },
    }
    for _, c in ipairs(cases) do
      it(c[1] .. " -> " .. c[3], function()
        local data, err = c[2]()
        assert.is_nil(data)
        assert.equal("invalid_params", err.kind, tostring(err))
        assert.equal(c[3], err.field, tostring(err))
        assert.is_false(err.retryable)
        assert.truthy(tostring(err):find(c[3], 1, true), tostring(err))
      end)
    end

    it("a bill hashed otherwise than SHA1 (e.g. SM3, 64 hex digits) is"
       .. " refused for its hash_type, which the message names", function()
      -- SHA1 is the one hash_type WeChat Pay documents; whether an SM
      -- merchant's bills are hashed otherwise is unconfirmed. Was: the
      -- 64-digit hash_value was refused first, as not a SHA-1's, and the
      -- message never named the hash_type that came
      local data, err = wx:download_bill({ download_url =
        "https://api.mch.weixin.qq.com/v3/billdownload/file?token=t",
        hash_type = "SM3", hash_value = ("ab"):rep(32) }, "/tmp/never")
      assert.is_nil(data)
      assert.equal("invalid_params", err.kind, tostring(err))
      assert.equal("hash_type", err.field, tostring(err))
      assert.matches('"SM3"', tostring(err), 1, true)
      assert.matches("SHA1", tostring(err), 1, true)
    end)

    it("a partner jsapi prepay naming both sp_openid and sub_openid says"
       .. " not both", function()
      -- was: "must hold one of sp_openid, sub_openid", which it did
      local p = prepay_p{ sub_mchid = "1900000109", sp_appid = APPID,
                          sub_appid = APPID,
                          payer = { sp_openid = "o1", sub_openid = "o2" } }
      p.appid = nil
      local data, err = pwx:jsapi_prepay(p)
      assert.is_nil(data)
      assert.equal("invalid_params", err.kind, tostring(err))
      assert.equal("payer", err.field)
      assert.matches("not both", tostring(err), 1, true)
    end)

    it("never raises on hostile values in any field (prepay_request)",
       function()
      local garbage = { 0, -1, 1.5, 0 / 0, 1 / 0, -1 / 0, 2 ^ 60, "", "\255",
        "\0", ("x"):rep(5000), true, false, {}, { 1, 2 }, { a = {} },
        { [1] = 1, x = 2 }, { [3] = 1 }, print, coroutine.create(print),
        require("paygate.core").null, "https://a.b/c?d", "2026-13-45" }
      local paths = {
        { "description" }, { "out_trade_no" }, { "appid" }, { "mchid" },
        { "notify_url" }, { "amount" }, { "amount", "total" },
        { "amount", "currency" }, { "payer" }, { "payer", "openid" },
        { "scene_info" }, { "scene_info", "h5_info" },
        { "scene_info", "h5_info", "type" }, { "detail" },
        { "detail", "goods_detail" }, { "time_expire" }, { "limit_pay" },
        { "settle_info" }, { "settle_info", "profit_sharing" }, { "x" },
      }
      local n = 0
      for _, kind in ipairs({ "jsapi", "app", "h5", "native" }) do
        for _, path in ipairs(paths) do
          for _, g in ipairs(garbage) do
            for _, client in ipairs({ wx, pwx }) do
              local p = prepay_p{ payer = { openid = "o" }, scene_info = {
                payer_client_ip = "1.2.3.4", h5_info = { type = "Wap" } } }
              if client == pwx then
                p.appid, p.sp_appid, p.sub_mchid = nil, APPID, "1900000109"
                p.payer = { sp_openid = "o" }
              end
              -- payer is a JSAPI field: the other kinds refuse it first
              if kind ~= "jsapi" then p.payer = nil end
              local t = p
              for i = 1, #path - 1 do
                if type(t[path[i]]) ~= "table" then t[path[i]] = {} end
                t = t[path[i]]
              end
              t[path[#path]] = g
              local ok, m, err = pcall(client.prepay_request, client, kind, p)
              assert.is_true(ok, tostring(m))
              assert.is_true(m == "POST" or err.kind == "invalid_params",
                             tostring(err))
              n = n + 1
            end
          end
        end
      end
      assert.is_true(n > 3000)
    end)

    it("sent nothing to WeChat for any of them", function()
      for _, c in ipairs(cases) do c[2]() end
      assert.equal(0, #stub:requests())
    end)

    it("raises (misuse) when p is not a table", function()
      assert.has_error(function() wx:native_prepay("x") end,
                       "wechatpay.native_prepay: p must be a table")
      assert.has_error(function() wx:refund(nil) end,
                       "wechatpay.refund: p must be a table")
      assert.has_error(function() wx:query_refund("R1", nil, 5) end)
    end)

    it("accepts 127 Chinese characters in description", function()
      stub:can("POST", "/v3/pay/transactions/native", 200,
               { code_url = "weixin://wxpay/bizpayurl?pr=a" })
      assert.truthy(wx:native_prepay(prepay_p{ description =
                                                 ("商"):rep(127) }))
      for _, t in ipairs({ "2026-06-08T10:34:56+08:00",
                           "2026-06-08T02:34:56Z",
                           "2026-06-08T10:34:56.123-05:30" }) do
        assert.truthy(wx:prepay_request("native", prepay_p{ time_expire = t }))
      end
    end)
  end)

  describe("prepay (direct merchant)", function()
    local kinds = {
      { "jsapi_prepay", "jsapi", { prepay_id =
          "wx201410272009395522657a690389285100" },
        { payer = { openid = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o" } } },
      { "app_prepay", "app", { prepay_id =
          "wx201410272009395522657a690389285100" } },
      { "h5_prepay", "h5", { h5_url = "https://wx.tenpay.com/cgi-bin/"
          .. "mmpayweb-bin/checkmweb?prepay_id=wx20&package=1037687096" },
        { scene_info = { payer_client_ip = "14.23.150.211",
                         h5_info = { type = "Wap" } } } },
      { "native_prepay", "native", { code_url =
          "weixin://wxpay/bizpayurl?pr=p4lpSuKzz" } },
    }
    for _, k in ipairs(kinds) do
      it(k[1] .. " posts to /v3/pay/transactions/" .. k[2]
         .. " and returns WeChat's answer", function()
        stub:can("POST", "/v3/pay/transactions/" .. k[2], 200, k[3])
        local p = prepay_p(k[4])
        local data, meta = wx[k[1]](wx, p)
        assert.is_table(data, tostring(meta))
        assert.same(k[3], data)
        assert.equal(200, meta.http_status)
        assert.matches("^08F0%w+%-0$", meta.request_id)
        assert.equal(meta.request_id, meta.headers["request-id"])
        local r, n = stub:last()
        assert.equal(1, n)
        assert.equal("POST", r.method)
        assert.equal("/v3/pay/transactions/" .. k[2], r.target)
        -- the body: the caller's fields plus mchid, nothing renamed
        local want = prepay_p(k[4])
        want.mchid = MCHID
        assert.same(want, r.json)
        assert.equal("application/json", r.headers["content-type"])
        assert.equal(PUB_ID, r.headers["wechatpay-serial"])
        assert.is_nil(p.mchid)          -- the caller's table is untouched
      end)
    end

    it("takes appid from the configuration when p gives none", function()
      local wx2 = stub:client({ appid = APPID })
      stub:can("POST", "/v3/pay/transactions/native", 200,
               { code_url = "weixin://wxpay/bizpayurl?pr=x" })
      local p = prepay_p()
      p.appid = nil
      local data, err = wx2:native_prepay(p)
      wx2:close()
      assert.is_table(data, tostring(err))
      local r = stub:last()
      assert.equal(APPID, r.json.appid)
      assert.equal(MCHID, r.json.mchid)
    end)

    it("signs pay parameters with the configured appid when given none",
       function()
      -- the prepay took the configured appid: its pay parameters must be
      -- signed with it, not refused
      local wx2 = stub:client({ appid = APPID })
      local j, jerr = wx2:jsapi_pay_params(nil, "wx2014")
      local a, aerr = wx2:app_pay_params(nil, "wx2014")
      wx2:close()
      assert.is_table(j, tostring(jerr))
      assert.equal(APPID, j.appId)
      assert.is_table(a, tostring(aerr))
      assert.equal(APPID, a.appid)
      -- none configured (and a service provider's: sp_appid or sub_appid?):
      -- the appid is required, and the message says so
      for _, c in ipairs({ { wx, "jsapi_pay_params" },
                           { wx, "app_pay_params" },
                           { pwx, "jsapi_pay_params" },
                           { pwx, "app_pay_params", "1900000109" } }) do
        local t2, err = c[1][c[2]](c[1], nil, "wx2014", c[3])
        assert.is_nil(t2)
        assert.equal("appid", err.field)
        assert.equal(c[2] .. ": appid: is required (the appid that ordered)",
                     err.message)
      end
    end)

    it("takes sp_appid from a partner configuration", function()
      local pwx2 = stub:partner_client({ sp_appid = APPID })
      stub:can("POST", "/v3/pay/partner/transactions/native", 200,
               { code_url = "weixin://wxpay/bizpayurl?pr=y" })
      local p = prepay_p({ sub_mchid = "1900000109" })
      p.appid = nil
      local data, err = pwx2:native_prepay(p)
      pwx2:close()
      assert.is_table(data, tostring(err))
      assert.equal(APPID, stub:last().json.sp_appid)
    end)

    it("refuses an appid the client does not list, and says how to allow"
       .. " it; sends one it lists", function()
      local APP = "wxd678efh567hg6787"          -- an App's, beside APPID
      -- only the default configured: another appid is refused, unsent
      local one = stub:client({ appid = APPID })
      local before = #stub:requests()
      local m, err = one:prepay_request("app", prepay_p{ appid = APP })
      assert.is_nil(m)
      assert.equal("invalid_params", err.kind)
      assert.equal("appid", err.field)
      assert.equal("app_prepay: appid: must be the client's appid ("
                   .. APPID .. ") or omitted; to pay under another too, "
                   .. "list it in the client's appids", err.message)
      local data
      data, err = one:app_prepay(prepay_p{ appid = APP })
      one:close()
      assert.is_nil(data)
      assert.equal("appid", err.field)
      assert.equal(before, #stub:requests())
      -- listed: both go out as given, the default still fills a body
      -- naming none; an appid outside the list is refused, naming the list
      local two = stub:client({ appid = APPID, appids = { APP } })
      stub:can("POST", "/v3/pay/transactions/app", 200,
               { prepay_id = "wx201410272009395522657a690389285100" })
      stub:can("POST", "/v3/pay/transactions/native", 200,
               { code_url = "weixin://wxpay/bizpayurl?pr=z" })
      data, err = two:app_prepay(prepay_p{ appid = APP })
      assert.is_table(data, tostring(err))
      assert.equal(APP, stub:last().json.appid)
      local p = prepay_p()
      p.appid = nil
      data, err = two:native_prepay(p)
      assert.is_table(data, tostring(err))
      assert.equal(APPID, stub:last().json.appid)
      local n = #stub:requests()
      data, err = two:native_prepay(prepay_p{ appid = "wx0000000000000000" })
      two:close()
      assert.is_nil(data)
      assert.equal("appid", err.field)
      assert.equal("native_prepay: appid: must be one of the client's appids"
                   .. " (" .. APPID .. ", " .. APP .. ") or omitted; to pay "
                   .. "under another, add it to the client's appids",
                   err.message)
      assert.equal(n, #stub:requests())
      -- with no default appid, omitting it is no way out: not offered
      local nodef = stub:client({ appid = false, appids = { APP } })
      data, err = nodef:native_prepay(prepay_p{ appid = "wx0000000000000000" })
      nodef:close()
      assert.is_nil(data)
      assert.equal("native_prepay: appid: must be one of the client's appids"
                   .. " (" .. APP .. "); to pay under another, add it to the"
                   .. " client's appids", err.message)
      -- a service provider's sp_appids alike
      local pwx2 = stub:partner_client({ sp_appid = APPID,
                                         sp_appids = { APP } })
      stub:can("POST", "/v3/pay/partner/transactions/native", 200,
               { code_url = "weixin://wxpay/bizpayurl?pr=w" })
      p = prepay_p({ sub_mchid = "1900000109", sp_appid = APP })
      p.appid = nil
      data, err = pwx2:native_prepay(p)
      assert.is_table(data, tostring(err))
      assert.equal(APP, stub:last().json.sp_appid)
      p.sp_appid = "wx0000000000000000"
      data, err = pwx2:native_prepay(p)
      pwx2:close()
      assert.is_nil(data)
      assert.equal("sp_appid", err.field)
      assert.matches("add it to the client's sp_appids", err.message, 1, true)
    end)

    it("repeats a prepay after SYSTEM_ERROR with the same bytes "
       .. "(same out_trade_no: idempotent)", function()
      stub:can("POST", "/v3/pay/transactions/app", 500,
               { code = "SYSTEM_ERROR", message = "系统繁忙,请稍后重试" },
               { times = 1 })
      stub:can("POST", "/v3/pay/transactions/app", 200,
               { prepay_id = "wx2" })
      local data, err = wx:app_prepay(prepay_p())
      assert.is_table(data, tostring(err))
      assert.equal("wx2", data.prepay_id)
      local list = stub:requests()
      assert.equal(2, #list)
      assert.equal(list[1].body, list[2].body)
      assert.are_not.equal(list[1].headers.authorization,
                           list[2].headers.authorization)
    end)

    it("repeats a prepay whose answer timed out (it may have reached "
       .. "WeChat: same out_trade_no, same bytes)", function()
      stub:can("POST", "/v3/pay/transactions/native", 200,
               { code_url = "weixin://late" }, { times = 1, delay = 1.5 })
      stub:can("POST", "/v3/pay/transactions/native", 200,
               { code_url = "weixin://again" })
      local data, err = wx:native_prepay(prepay_p(), { timeout = 0.5,
                                                       deadline = 10 })
      assert.is_table(data, tostring(err))
      assert.equal("weixin://again", data.code_url)
      local list = stub:requests()       -- 2 (more if the machine is slow)
      assert.is_true(#list >= 2)
      for i = 2, #list do assert.equal(list[1].body, list[i].body) end
    end)

    it("returns WeChat's error with its kind, code and request id",
       function()
      stub:can("POST", "/v3/pay/transactions/native", 403,
               { code = "OUT_TRADE_NO_USED", message = "商户订单号重复" },
               { headers = { ["Request-ID"] = "08F0ABC-268447843" } })
      local data, err = wx:native_prepay(prepay_p())
      assert.is_nil(data)
      assert.equal("out_trade_no_used", err.kind)
      assert.equal("OUT_TRADE_NO_USED", err.code)
      assert.equal(403, err.status)
      assert.equal("08F0ABC-268447843", err.request_id)
      assert.equal(1, #stub:requests())
    end)

    it("refuses a 200 that lacks the expected field (malformed)",
       function()
      stub:can("POST", "/v3/pay/transactions/native", 200, { other = 1 })
      local data, err = wx:native_prepay(prepay_p())
      assert.is_nil(data)
      assert.equal("malformed", err.kind)
      assert.truthy(err.message:find("code_url", 1, true))
    end)
  end)

  describe("prepay_request", function()
    it("returns the exact request a prepay sends, without sending it",
       function()
      local m, path, body = wx:prepay_request("h5", prepay_p{ scene_info = {
        payer_client_ip = "14.23.150.211", h5_info = { type = "iOS" } } })
      assert.equal("POST", m)
      assert.equal("/v3/pay/transactions/h5", path)
      assert.equal(0, #stub:requests())
      stub:can("POST", "/v3/pay/transactions/h5", 200, { h5_url = "https://x" })
      assert.truthy(wx:h5_prepay(prepay_p{ scene_info = {
        payer_client_ip = "14.23.150.211", h5_info = { type = "iOS" } } }))
      local sent = stub:last().json
      assert.same(sent, require("cjson").decode(body))
    end)

    it("takes an http notify_url for a loopback host only", function()
      for _, url in ipairs({ "http://127.0.0.1:8080/n", "http://localhost/n",
                             "http://[::1]:9/n", "https://example.com/n" }) do
        assert.equal("POST", (wx:prepay_request("native",
                                                prepay_p{ notify_url = url })))
      end
      local m, err = wx:prepay_request("native", prepay_p{
        notify_url = "http://10.0.0.1/n" })
      assert.is_nil(m)
      assert.equal("notify_url", err.field)
    end)

    it("checks like the call, and raises on an unknown kind", function()
      local m, err = wx:prepay_request("native", prepay_p{ amount = {} })
      assert.is_nil(m)
      assert.equal("amount.total", err.field)
      assert.has_error(function() wx:prepay_request("micropay", {}) end)
    end)
  end)

  describe("query and close (direct merchant)", function()
    local TXN = { appid = APPID, mchid = MCHID, out_trade_no =
      "1217752501201407033233368018", transaction_id =
      "1217752501201407033233368018", trade_type = "NATIVE", trade_state =
      "SUCCESS", trade_state_desc = "支付成功", amount = { total = 100,
      payer_total = 100, currency = "CNY", payer_currency = "CNY" } }

    it("query_by_transaction_id GETs /id/{id}?mchid=", function()
      stub:can("GET", "/v3/pay/transactions/id/1217752501201407033233368018",
               200, TXN)
      local data, meta = wx:query_by_transaction_id(
        "1217752501201407033233368018")
      assert.same(TXN, data)
      assert.equal(200, meta.http_status)
      local r = stub:last()
      assert.equal("GET", r.method)
      assert.equal("/v3/pay/transactions/id/1217752501201407033233368018"
                   .. "?mchid=" .. MCHID, r.target)
      assert.equal("", r.body)
    end)

    it("query_by_out_trade_no percent-encodes | in the path", function()
      stub:can("GET", "/v3/pay/transactions/out-trade-no/A%7CB*C-1_2", 200,
               { trade_state = "NOTPAY", out_trade_no = "A|B*C-1_2" })
      local data = assert(wx:query_by_out_trade_no("A|B*C-1_2"))
      assert.equal("NOTPAY", data.trade_state)
      assert.equal("/v3/pay/transactions/out-trade-no/A%7CB*C-1_2?mchid="
                   .. MCHID, stub:last().target)
    end)

    it("an unknown order is not_found", function()
      stub:can("GET", "/v3/pay/transactions/out-trade-no/NOPE_0001", 404,
               { code = "ORDER_NOT_EXIST", message = "订单不存在" })
      local data, err = wx:query_by_out_trade_no("NOPE_0001")
      assert.is_nil(data)
      assert.equal("not_found", err.kind)
      assert.equal("ORDER_NOT_EXIST", err.code)
    end)

    it("close POSTs {mchid} and returns {} for WeChat's signed 204",
       function()
      stub:can("POST", "/v3/pay/transactions/out-trade-no/ORDER_0001/close",
               204, "")
      local data, meta = wx:close("ORDER_0001")
      assert.same({}, data)
      assert.equal(204, meta.http_status)
      local r = stub:last()
      assert.equal("/v3/pay/transactions/out-trade-no/ORDER_0001/close",
                   r.target)
      assert.same({ mchid = MCHID }, r.json)
    end)

    it("close() with no argument stops the client, sending nothing",
       function()
      local wx2 = stub:client()
      wx2:close()
      assert.equal(0, #stub:requests())
      local data, err = wx2:close(nil)
      assert.is_nil(data)
      assert.equal("out_trade_no", err.field)
    end)

    it("close of a paid order is order_paid", function()
      stub:can("POST", "/v3/pay/transactions/out-trade-no/ORDER_0001/close",
               400, { code = "ORDER_PAID", message = "订单已支付" })
      local data, err = wx:close("ORDER_0001")
      assert.is_nil(data)
      assert.equal("order_paid", err.kind)
    end)

    it("close is retried after a 500 (idempotent)", function()
      local path = "/v3/pay/transactions/out-trade-no/ORDER_0002/close"
      stub:can("POST", path, 500, { code = "SYSTEM_ERROR", message = "busy" },
               { times = 1 })
      stub:can("POST", path, 204, "")
      assert.same({}, (wx:close("ORDER_0002")))
      assert.equal(2, #stub:requests())
    end)
  end)

  describe("refunds (direct merchant)", function()
    it("refund POSTs the body as given and returns the Refund", function()
      stub:can("POST", "/v3/refund/domestic/refunds", 200, REFUND_ANSWER)
      local data, meta = wx:refund(refund_p{
        notify_url = "https://weixin.qq.com/refund" })
      assert.same(REFUND_ANSWER, data)
      assert.equal("PROCESSING", data.status)     -- the refund's own status
      assert.equal(200, meta.http_status)
      local r = stub:last()
      assert.equal("/v3/refund/domestic/refunds", r.target)
      assert.same(refund_p{ notify_url = "https://weixin.qq.com/refund" },
                  r.json)
    end)

    it("refund is retried with the same out_refund_no after a 500",
       function()
      stub:can("POST", "/v3/refund/domestic/refunds", 500,
               { code = "SYSTEM_ERROR", message = "busy" }, { times = 1 })
      stub:can("POST", "/v3/refund/domestic/refunds", 200, REFUND_ANSWER)
      assert.truthy(wx:refund(refund_p()))
      local list = stub:requests()
      assert.equal(2, #list)
      assert.equal(list[1].body, list[2].body)
    end)

    it("a refund answer whose signature fails is unverified_response "
       .. "(WeChat may have acted), never success or a plain failure",
       function()
      local good = require("cjson").encode(REFUND_ANSWER)
      stub:can("POST", "/v3/refund/domestic/refunds", 200, good,
               { tamper = good:gsub("PROCESSING", "SUCCESS") })
      local data, err = wx:refund(refund_p())
      assert.is_nil(data)
      assert.equal("unverified_response", err.kind)
      assert.equal(1, #stub:requests())     -- not repeated either
      stub:can("GET", "/v3/refund/domestic/refunds/R1", 200, good,
               { tamper = good .. " " })
      data, err = wx:query_refund("R1")
      assert.is_nil(data)
      assert.equal("bad_signature", err.kind)
    end)

    it("NOT_ENOUGH is not_enough", function()
      stub:can("POST", "/v3/refund/domestic/refunds", 403,
               { code = "NOT_ENOUGH", message = "余额不足" })
      local _, err = wx:refund(refund_p())
      assert.equal("not_enough", err.kind)
      assert.equal(1, #stub:requests())
    end)

    it("query_refund GETs /v3/refund/domestic/refunds/{no}", function()
      stub:can("GET", "/v3/refund/domestic/refunds/R-1@x", 200,
               REFUND_ANSWER)
      local data, meta = wx:query_refund("R-1@x")
      assert.same(REFUND_ANSWER, data)
      assert.equal(200, meta.http_status)
      assert.equal("/v3/refund/domestic/refunds/R-1@x", stub:last().target)
    end)

    it("abnormal_refund encrypts bank_account and real_name for WeChat's "
       .. "key and names it in Wechatpay-Serial", function()
      local path = "/v3/refund/domestic/refunds/50000000382019052709732678859"
                   .. "/apply-abnormal-refund"
      stub:can("POST", path, 200, REFUND_ANSWER)
      local data = assert(wx:abnormal_refund{
        refund_id = "50000000382019052709732678859",
        out_refund_no = "1217752501201407033233368019",
        type = "USER_BANK_CARD", bank_type = "ICBC_DEBIT",
        bank_account = "6222021234567890123", real_name = "张三" })
      assert.equal("PROCESSING", data.status)
      local r = stub:last()
      assert.equal(path, r.target)
      assert.equal(PUB_ID, r.headers["wechatpay-serial"])
      assert.equal("USER_BANK_CARD", r.json.type)
      assert.equal("ICBC_DEBIT", r.json.bank_type)
      -- sent encrypted (base64 of a 256-byte OAEP block), never in clear
      assert.is_nil(r.body:find("6222021234567890123", 1, true))
      assert.equal(256, #crypto.base64_decode(r.json.bank_account))
      assert.same({ bank_account = "6222021234567890123",
                    real_name = "张三" }, r.decrypted)
    end)

    it("abnormal_refund to the merchant's card sends no personal data",
       function()
      local path = "/v3/refund/domestic/refunds/5000/apply-abnormal-refund"
      stub:can("POST", path, 200, REFUND_ANSWER)
      assert.truthy(wx:abnormal_refund{ refund_id = "5000",
        out_refund_no = "R1", type = "MERCHANT_BANK_CARD" })
      assert.same({ out_refund_no = "R1", type = "MERCHANT_BANK_CARD" },
                  stub:last().json)
    end)
  end)

  describe("bills", function()
    local ANSWER = { download_url = "https://api.mch.weixin.qq.com/v3/"
      .. "billdownload/file?token=6XIv5TUPto7pByrTQKhd6kwvyKLG2uY2wMMR8cNXqaA",
      hash_type = "SHA1", hash_value =
      "8823044c286fbd9bf2a8bb1ee8b1a9df7e1f5e31" }

    it("trade_bill GETs /v3/bill/tradebill with the query in order",
       function()
      stub:can("GET", "/v3/bill/tradebill", 200, ANSWER)
      local data, meta = wx:trade_bill{ bill_date = "2026-11-29",
        bill_type = "ALL", tar_type = "GZIP" }
      assert.same(ANSWER, data)
      assert.equal(200, meta.http_status)
      assert.equal("/v3/bill/tradebill?bill_date=2026-11-29&bill_type=ALL"
                   .. "&tar_type=GZIP", stub:last().target)
    end)

    it("fund_flow_bill GETs /v3/bill/fundflowbill", function()
      stub:can("GET", "/v3/bill/fundflowbill", 200, ANSWER)
      assert.same(ANSWER, (wx:fund_flow_bill{ bill_date = "2026-11-29",
        account_type = "OPERATION" }))
      assert.equal("/v3/bill/fundflowbill?bill_date=2026-11-29"
                   .. "&account_type=OPERATION", stub:last().target)
    end)

    it("STATEMENT_CREATING is its own kind (ask again later), not retried "
       .. "at once", function()
      stub:can("GET", "/v3/bill/tradebill", 400,
               { code = "STATEMENT_CREATING", message = "账单生成中" })
      local data, err = wx:trade_bill{ bill_date = "2026-11-29" }
      assert.is_nil(data)
      assert.equal("statement_creating", err.kind)
      assert.is_true(err.retryable)
      assert.equal(1, #stub:requests())
    end)

    it("NO_STATEMENT_EXIST is its own kind", function()
      stub:can("GET", "/v3/bill/fundflowbill", 400,
               { code = "NO_STATEMENT_EXIST", message = "请求的账单文件不存在" })
      local data, err = wx:fund_flow_bill{ bill_date = "2026-11-29" }
      assert.is_nil(data)
      assert.equal("no_statement_exist", err.kind)
      assert.is_false(err.retryable)
    end)
  end)

  describe("partner mode (sp_mchid)", function()
    local SUB = "1900000109"

    it("prepay posts to /v3/pay/partner/transactions/{kind} with "
       .. "sp_mchid, sp_appid and sub_mchid", function()
      stub:can("POST", "/v3/pay/partner/transactions/jsapi", 200,
               { prepay_id = "wx3" })
      local p = prepay_p{ sp_appid = APPID, sub_mchid = SUB,
                          sub_appid = "wx8888888888888888",
                          payer = { sub_openid = "oUpF8uMuAJO" } }
      p.appid = nil
      local data = assert(pwx:jsapi_prepay(p))
      assert.equal("wx3", data.prepay_id)
      local r = stub:last()
      assert.equal("/v3/pay/partner/transactions/jsapi", r.target)
      assert.equal(SP_MCHID, r.json.sp_mchid)
      assert.equal(APPID, r.json.sp_appid)
      assert.equal(SUB, r.json.sub_mchid)
      assert.is_nil(r.json.mchid)
      assert.same({ sub_openid = "oUpF8uMuAJO" }, r.json.payer)
      assert.truthy(r.headers.authorization:find('mchid="' .. SP_MCHID
                                                 .. '"', 1, true))
    end)

    it("native prepay on the partner path", function()
      stub:can("POST", "/v3/pay/partner/transactions/native", 200,
               { code_url = "weixin://wxpay/bizpayurl?pr=x" })
      local p = prepay_p{ sp_appid = APPID, sub_mchid = SUB }
      p.appid = nil
      assert.truthy(pwx:native_prepay(p))
      assert.equal("/v3/pay/partner/transactions/native", stub:last().target)
    end)

    it("queries carry sp_mchid and sub_mchid", function()
      stub:can("GET", "/v3/pay/partner/transactions/id/4200", 200,
               { trade_state = "SUCCESS" })
      stub:can("GET", "/v3/pay/partner/transactions/out-trade-no/ORDER_0001",
               200, { trade_state = "NOTPAY" })
      assert.equal("SUCCESS", pwx:query_by_transaction_id("4200", SUB)
                                 .trade_state)
      assert.equal("/v3/pay/partner/transactions/id/4200?sp_mchid="
                   .. SP_MCHID .. "&sub_mchid=" .. SUB, stub:last().target)
      local data, meta = pwx:query_by_out_trade_no("ORDER_0001", SUB,
                                                   { deadline = 5 })
      assert.equal("NOTPAY", data.trade_state)
      assert.equal(200, meta.http_status)
      assert.equal("/v3/pay/partner/transactions/out-trade-no/ORDER_0001"
                   .. "?sp_mchid=" .. SP_MCHID .. "&sub_mchid=" .. SUB,
                   stub:last().target)
    end)

    it("close posts {sp_mchid, sub_mchid}", function()
      stub:can("POST", "/v3/pay/partner/transactions/out-trade-no/"
               .. "ORDER_0001/close", 204, "")
      assert.same({}, (pwx:close("ORDER_0001", SUB)))
      assert.same({ sp_mchid = SP_MCHID, sub_mchid = SUB },
                  stub:last().json)
    end)

    it("refund carries sub_mchid in the body, query_refund in the query",
       function()
      stub:can("POST", "/v3/refund/domestic/refunds", 200, REFUND_ANSWER)
      stub:can("GET", "/v3/refund/domestic/refunds/R1", 200, REFUND_ANSWER)
      assert.truthy(pwx:refund(refund_p{ sub_mchid = SUB }))
      assert.equal(SUB, stub:last().json.sub_mchid)
      assert.truthy(pwx:query_refund("R1", SUB))
      assert.equal("/v3/refund/domestic/refunds/R1?sub_mchid=" .. SUB,
                   stub:last().target)
    end)

    it("trade_bill carries sub_mchid", function()
      stub:can("GET", "/v3/bill/tradebill", 200, { download_url =
        "https://api.mch.weixin.qq.com/v3/billdownload/file?token=x",
        hash_type = "SHA1", hash_value = ("a"):rep(40) })
      assert.truthy(pwx:trade_bill{ bill_date = "2026-11-29",
                                    sub_mchid = SUB })
      assert.equal("/v3/bill/tradebill?bill_date=2026-11-29&sub_mchid="
                   .. SUB, stub:last().target)
    end)

    it("app_pay_params: partnerid is the sub-merchant", function()
      local t = assert(pwx:app_pay_params(APPID, "wx20", SUB))
      assert.equal(SUB, t.partnerid)
    end)
  end)

  describe("pay-sign parameters", function()
    -- the official known-answer example: key A.1, these inputs
    local TS, NONCE = 1554208460, "593BEC0C930BF1AFEB40B4A08C8FB242"
    local PREPAY = "wx201410272009395522657a690389285100"

    it("jsapi_pay_params matches the documented paySign", function()
      local t = assert(wx:jsapi_pay_params(APPID, PREPAY,
                                           { timestamp = TS, nonce = NONCE }))
      assert.same({
        appId = APPID, timeStamp = "1554208460", nonceStr = NONCE,
        package = "prepay_id=" .. PREPAY, signType = "RSA",
        paySign = "mI35pfNEQV6777ke/1T+LJLQDNTm7yeoUJH+j/adPGhmCCi0PbgkvYQT"
          .. "RcXH0uibcLVtvFLdGLpmoYO9FV6lBBsTAjuhh5YOvQi0e2g3e0yytitiNET9"
          .. "FEuqM0pjnKfRW4K6LIZDdbWJv9KhZUx3DrJa5TL7OJ7VdADVivxVySIlPVKjG"
          .. "wuCXzuXSJes0UcILgWQUMyha5/3nYofuHtS7r+KYyMuxD+oJ9VM1Qdxk4UIG5"
          .. "9CP5Y3wtYIFybyF3bdu1caHTRRX+DLyMXyYA/IrTmiW01c4RPjpHBX5Dk1sZy"
          .. "Y1zVsWNsvMHr2e1NTWtBxKJ+qk5N61J7caYoepHFaxw==",
      }, t)
    end)

    it("app_pay_params matches the documented sign", function()
      local t = assert(wx:app_pay_params(APPID, PREPAY,
                                         { timestamp = TS, nonce = NONCE }))
      assert.same({
        appid = APPID, partnerid = MCHID, prepayid = PREPAY,
        package = "Sign=WXPay", noncestr = NONCE, timestamp = "1554208460",
        sign = "gXx9KhTP6IooKV1SuG3OCGlBIgZbKtubCZvnau6khw1iffvNT28IzLbKmzt"
          .. "q2xA/RCNbZa1XOsoiuVmAEeTZQicWfhv4P+O4oBRIrx0X9f3cnWFkMBU9alTW"
          .. "s0nyQ1N9fcILOTe0f4kxOhVh+/Xhn5hOiUK7Sz3XA1mcpa3R2NCWf/e+0ow/R"
          .. "Df15iTymOHgDrEkT/gedg/3E0iXfDX3mFicSZhrHESZDOTXcl9RzELREBUFzn"
          .. "d/o2NQM99WcL86m23HY0cTy+QGWU4QDmNrbQ9ihmLW71qPb0Cx/d7EQvw/Kyx"
          .. "0A6s64ZQp3hHdcmiRcLnjVXrKCk7LShaCK+lS3Q==",
      }, t)
    end)

    it("an SM2 merchant key signs with SM2-with-SM3", function()
      local payparams = require "paygate.wechatpay.payparams"
      local function pem(name)
        local f = assert(io.open(wxapi.FIX .. name, "rb"))
        local s = f:read("*a")
        f:close()
        return s
      end
      local key = assert(crypto.private_key(pem("a10a_sm2_key.pem")))
      local cert = assert(crypto.certificate(pem("a10b_sm2_cert.pem")))
      local t = assert(payparams.jsapi(key, APPID, PREPAY))
      assert.equal("SM2", t.signType)
      assert.truthy(crypto.verify_base64(cert, APPID .. "\n" .. t.timeStamp
        .. "\n" .. t.nonceStr .. "\nprepay_id=" .. PREPAY .. "\n", t.paySign,
        "sm2-sm3"))
    end)

    it("fresh parameters verify with the merchant's public key", function()
      local f = assert(io.open(wxapi.FIX .. "a1_pub.pem", "rb"))
      local pub = assert(crypto.public_key(f:read("*a")))
      f:close()
      local t = assert(wx:jsapi_pay_params(APPID, PREPAY))
      assert.matches("^%d+$", t.timeStamp)
      assert.equal(32, #t.nonceStr)
      assert.truthy(crypto.verify_base64(pub, APPID .. "\n" .. t.timeStamp
        .. "\n" .. t.nonceStr .. "\nprepay_id=" .. PREPAY .. "\n", t.paySign))
      local a = assert(wx:app_pay_params(APPID, PREPAY))
      assert.truthy(crypto.verify_base64(pub, APPID .. "\n" .. a.timestamp
        .. "\n" .. a.noncestr .. "\n" .. PREPAY .. "\n", a.sign))
      local b = assert(wx:jsapi_pay_params(APPID, PREPAY))
      assert.are_not.equal(t.nonceStr, b.nonceStr)
    end)
  end)
  describe("conf.on_call", function()
    it("is told of each finished call: path without its query, outcome,"
       .. " status, request id, the body sent", function()
      local seen = {}
      local owx = stub:client{ on_call = function(c) seen[#seen + 1] = c end }
      stub:can("POST", "/v3/pay/transactions/native", 200,
               { code_url = "weixin://wxpay/bizpayurl?pr=a" })
      assert.truthy(owx:native_prepay(prepay_p()))
      stub:can("GET", "/v3/pay/transactions/out-trade-no/T-0001", 404,
               { code = "ORDER_NOT_EXIST", message = "no such order" })
      local _, err = owx:query_by_out_trade_no("T-0001")
      assert.equal("ORDER_NOT_EXIST", err.code, tostring(err))
      owx:close()
      assert.equal(2, #seen)
      assert.equal("POST", seen[1].method)
      assert.equal("/v3/pay/transactions/native", seen[1].path)
      assert.equal("ok", seen[1].outcome)
      assert.equal(200, seen[1].status)
      assert.matches('"out_trade_no":"1217752501201407033233368018"',
                     seen[1].body, 1, true)
      assert.truthy(seen[1].seconds >= 0)
      assert.equal("GET", seen[2].method)
      assert.equal("/v3/pay/transactions/out-trade-no/T-0001", seen[2].path)
      assert.equal(err.kind, seen[2].outcome)
      assert.equal("ORDER_NOT_EXIST", seen[2].code)
      assert.equal(404, seen[2].status)
      -- how many attempts each took, success included
      assert.equal(1, seen[1].attempts)
      assert.equal(1, seen[2].attempts)
      -- a query that succeeds on its second attempt says 2
      local owx2 = stub:client{ max_attempts = 3,
                                on_call = function(c) seen[#seen + 1] = c end }
      stub:can("GET", "/v3/pay/transactions/out-trade-no/T-0002", 500,
               { code = "SYSTEM_ERROR", message = "busy" }, { times = 1 })
      stub:can("GET", "/v3/pay/transactions/out-trade-no/T-0002", 200,
               { out_trade_no = "T-0002", trade_state = "NOTPAY" })
      assert.truthy(owx2:query_by_out_trade_no("T-0002"))
      owx2:close()
      assert.equal(3, #seen)
      assert.equal("ok", seen[3].outcome)
      assert.equal(2, seen[3].attempts)
    end)

    it("raising changes nothing of the call; not a function is refused",
       function()
      local owx = stub:client{ on_call = function() error("hook broke") end }
      stub:can("POST", "/v3/pay/transactions/native", 200,
               { code_url = "weixin://wxpay/bizpayurl?pr=b" })
      local data = assert(owx:native_prepay(prepay_p()))
      assert.equal("weixin://wxpay/bizpayurl?pr=b", data.code_url)
      owx:close()
      local wechatpay = require "paygate.wechatpay"
      local conf = { mchid = wxapi.MCHID, on_call = "yes" }
      local c, cerr = wechatpay.client(conf)
      assert.is_nil(c)
      assert.equal("invalid_config", cerr.kind)
    end)
  end)
end)

describe("paygate.wechatpay.validate.ip_address", function()
  local ip_address = require("paygate.wechatpay.validate").ip_address

  it("takes IPv4 and IPv6 addresses as text", function()
    for _, s in ipairs{ "203.0.113.7", "0.0.0.0", "255.255.255.255", "::",
                        "::1", "2001:db8::1", "2001:db8:0:0:0:0:2:1",
                        "::ffff:192.0.2.1", "fe80::", "1:2:3:4:5:6:7:8",
                        "1:2:3:4:5:6:1.2.3.4", "1::8", "::2:3:4:5:6:7:8" } do
      assert.is_true(ip_address(s), s)
    end
  end)

  it("refuses anything else", function()
    for _, s in ipairs{ ":::", "", "1.2.3", "1.2.3.4.5", "256.1.1.1",
                        "01.2.3.4", "1.2.3.-4", "1:2:3:4:5:6:7:8:9",
                        "1::2::3", "12345::", "g::1", "1:2:3:4:5:6:7",
                        "::1.2.3", "1.2.3.4::", "fe80::1%eth0",
                        " 1.2.3.4", "1.2.3.4\n", "1:2:3:4:5:6:7:1.2.3.4",
                        "1::2:3:4:5:6:7:8", ":1:2:3:4:5:6:7",
                        "1:2:3:4:5:6:7:", ("1"):rep(46) } do
      assert.is_false(ip_address(s), s)
    end
    assert.is_false(ip_address(5))
    assert.is_false(ip_address(nil))
  end)
end)
