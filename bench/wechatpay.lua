-- bench/wechatpay.lua -- the in-process half of bench/wechatpay, run inside
-- the runtime (paygate exec), one core.
--   paygate exec bench/wechatpay.lua inproc [SECONDS]
--     prints "name ops_per_s" lines:
--       parse_notification   wx:parse_notification(n, { replay = false })
--       raw_notification     the same notification's crypto through
--                            paygate.crypto alone: signature verify + base64
--                            decode + AES-256-GCM decrypt
--       build_sign           wx:prepay_request (check + JSON body) and the
--                            request's Authorization (sign.sign_request)
--       sign                 crypto.sign of a same-sized message alone
--       call_bookkeeping     what wx:request adds per call and attempt
--                            for upstream.lua (endpoint name, degradation
--                            switch, breaker check and record in the
--                            shared dict, timeout, latency sample, the
--                            calls counter), a successful one-attempt GET
--       counter_inc          one paygate.metrics counter inc (3 labels)
--     and after each pair "NAME_ratio r": the median over ABBA quads of
--     the first one's time per call / the second's
--   paygate exec bench/wechatpay.lua gen FILE N
--     writes N freshly signed, distinct notifications to FILE, one per
--     line: timestamp TAB nonce TAB signature TAB serial TAB body (read by
--     bench/wechatpay_wrk.lua). They verify for 5 minutes.
--   paygate exec bench/wechatpay.lua conf
--     prints the client configuration the receivers use (Lua / JSON)
-- The notification is made here with the test platform key (the WeChat
-- side), not with the client's code.
local crypto = require "paygate.crypto"
local json = require "cjson"

local FIX = "spec/fixtures/wechatpay/"
local PUB_ID = "PUB_KEY_ID_0114232020260101000000000001"
local APIV3 = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb"

local _M = { FIX = FIX, PUB_ID = PUB_ID, APIV3 = APIV3 }

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local platform_key = assert(crypto.private_key(read(FIX
                                               .. "a5_platform_key.pem")))

-- A TRANSACTION.SUCCESS notification as WeChat sends it (resource
-- encrypted under the APIv3 key, body signed with the platform key).
local function notification(i)
  local txn = json.encode({
    mchid = "1900000001", appid = "wx2421b1c4370ec43b",
    out_trade_no = ("PG%022d"):format(i),
    transaction_id = ("42000000%020d"):format(i),
    trade_type = "JSAPI", trade_state = "SUCCESS", trade_state_desc = "支付成功",
    bank_type = "CMC", attach = "", success_time = "2026-11-29T10:34:56+08:00",
    payer = { openid = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o" },
    amount = { total = 100, payer_total = 100, currency = "CNY",
               payer_currency = "CNY" },
  })
  local nonce = crypto.random_nonce(12)
  local ct = assert(crypto.aead_encrypt("AEAD_AES_256_GCM", APIV3, nonce,
                                        "transaction", txn))
  local body = json.encode({
    id = "EV-" .. crypto.random_nonce(20), create_time =
    "2026-11-29T10:34:57+08:00", resource_type = "encrypt-resource",
    event_type = "TRANSACTION.SUCCESS", summary = "支付成功",
    resource = { original_type = "transaction", algorithm = "AEAD_AES_256_GCM",
                 ciphertext = crypto.base64_encode(ct),
                 associated_data = "transaction", nonce = nonce },
  })
  local ts = tostring(os.time())
  local hn = crypto.random_nonce(32)
  local sig = assert(crypto.sign_base64(platform_key, ts .. "\n" .. hn .. "\n"
                                        .. body .. "\n", "sha256-rsa"))
  return { ts = ts, nonce = hn, signature = sig, serial = PUB_ID, body = body }
end
_M.notification = notification

function _M.client_conf(base_url)
  return {
    mchid = "1900000001", merchant_private_key = FIX .. "a1_merchant_key.pem",
    merchant_serial = "1DDE55AD98ED71D6EDD4A4A16996DE7B47773A8C",
    apiv3_key = APIV3, public_key = FIX .. "a7_platform_pubkey.pem",
    public_key_id = PUB_ID, base_url = base_url or "http://127.0.0.1:9",
    backup_url = false,
  }
end

-- Times fa and fb in short blocks (about 20 ms of CPU each, whole
-- batches of 8 calls) in the order A B B A, until 2 * secs of CPU time
-- pass: each block runs with warm caches, and a load that comes and goes
-- on a shared machine, or a drift in its speed, hits both alike (ABBA
-- cancels a steady drift within a quad). returns: the ops/s of each over
-- all blocks, and the median over the quads of fa's time per call /
-- fb's (the figure the targets are judged by: one slow stretch moves a
-- median less than a sum).
local function measure_pair(secs, fa, fb)
  for _ = 1, 200 do fa(); fb() end      -- warm up (contexts, JIT)
  local function block(fn)
    local n, t0 = 0, os.clock()
    local t = t0
    while t - t0 < 0.02 do
      for _ = 1, 8 do fn() end
      n = n + 8
      t = os.clock()
    end
    return n, t - t0
  end
  local na, ta, nb, tb = 0, 0, 0, 0
  local ratios = {}
  while ta + tb < 2 * secs do
    local n1, t1 = block(fa)
    local n2, t2 = block(fb)
    local n3, t3 = block(fb)
    local n4, t4 = block(fa)
    na, ta = na + n1 + n4, ta + t1 + t4
    nb, tb = nb + n2 + n3, tb + t2 + t3
    ratios[#ratios + 1] = ((t1 + t4) / (n1 + n4)) / ((t2 + t3) / (n2 + n3))
  end
  table.sort(ratios)
  local m = #ratios
  local med = m % 2 == 1 and ratios[(m + 1) / 2]
              or (ratios[m / 2] + ratios[m / 2 + 1]) / 2
  return na / ta, nb / tb, med
end

local function inproc(secs)
  local wechatpay = require "paygate.wechatpay"
  local sign = require "paygate.wechatpay.sign"
  local wx = assert(wechatpay.client(_M.client_conf()))
  local n = notification(1)
  local req = { headers = {
    ["wechatpay-timestamp"] = n.ts, ["wechatpay-nonce"] = n.nonce,
    ["wechatpay-signature"] = n.signature, ["wechatpay-serial"] = n.serial,
    ["content-type"] = "application/json" }, body = n.body }
  local nopts = { replay = false }
  assert(wx:parse_notification(req, nopts))
  local pub = assert(crypto.public_key(read(FIX .. "a7_platform_pubkey.pem")))
  local doc = json.decode(n.body).resource
  local verify_b64, b64d, dec = crypto.verify_base64, crypto.base64_decode,
                                crypto.aead_decrypt
  local function raw()
    assert(verify_b64(pub, n.ts .. "\n" .. n.nonce .. "\n" .. n.body .. "\n",
                      n.signature))
    assert(dec("AEAD_AES_256_GCM", APIV3, doc.nonce, doc.associated_data,
               b64d(doc.ciphertext)))
  end
  raw()
  local p = {
    appid = "wx2421b1c4370ec43b", description = "Image形象店-深圳腾大-QQ公仔",
    out_trade_no = "1217752501201407033233368018",
    notify_url = "https://www.weixin.qq.com/wxpay/pay.php",
    amount = { total = 100, currency = "CNY" },
    payer = { openid = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o" },
  }
  local signer = wx.conf.signer
  local m, path, body = assert(wx:prepay_request("jsapi", p))
  local msg = m .. "\n" .. path .. "\n" .. os.time() .. "\n"
              .. crypto.random_nonce(32) .. "\n" .. body .. "\n"
  local csign, key = crypto.sign, signer.key
  local results = {
    { "parse_notification", function()
        assert(wx:parse_notification(req, nopts)) end },
    { "raw_notification", raw },
    { "build_sign", function()
        local mm, pp, bb = wx:prepay_request("jsapi", p)
        assert(sign.sign_request(signer, mm, pp, bb))
      end },
    { "sign", function() assert(csign(key, msg)) end },
  }
  local upstream = require "paygate.wechatpay.upstream"
  local qpath = "/v3/pay/transactions/out-trade-no/"
                .. "1217752501201407033233368018?mchid=1900000001"
  local ok_res = { status = 200 }
  local labels = { "GET /v3/pay/transactions/out-trade-no/{}", "ok", "" }
  results[#results + 1] = { "call_bookkeeping", function()
    local ep = upstream.endpoint("GET", qpath)
    assert(wx.updict:get(upstream.DEGRADED_KEY) ~= true)
    local allowed, probe = upstream.allow(wx, ep)
    assert(allowed and upstream.timeout(wx, ep) > 0)
    upstream.observe(wx, ep, 0.05)
    upstream.record(wx, ep, false, probe)
    upstream.count(ep, ok_res)
  end }
  results[#results + 1] = { "counter_inc", function()
    upstream.calls:inc(labels)
  end }
  -- each pair (the call, its baseline) is timed in alternating batches,
  -- so a load that comes and goes on a shared machine hits both alike
  for i = 1, #results, 2 do
    local a, b, r = measure_pair(secs, results[i][2], results[i + 1][2])
    io.write(("%s %.1f\n%s %.1f\n%s_ratio %.4f\n"):format(results[i][1],
      a, results[i + 1][1], b, results[i][1], r))
    io.flush()
  end
  wx:stop()
end

local function gen(file, count)
  local f = assert(io.open(file, "wb"))
  for i = 1, count do
    local n = notification(i)
    f:write(n.ts, "\t", n.nonce, "\t", n.signature, "\t", n.serial, "\t",
            n.body, "\n")
  end
  f:close()
end

-- only when run as the script (not when bench/wechatpay_app requires it)
local mode = type(arg) == "table" and type(arg[0]) == "string"
             and arg[0]:find("wechatpay%.lua$") and arg[1] or nil
if mode == "inproc" then
  inproc(tonumber(arg[2]) or 3)
elseif mode == "gen" then
  gen(assert(arg[2], "gen FILE N"), tonumber(arg[3]) or 1)
elseif mode ~= nil then
  error("usage: bench/wechatpay.lua inproc [SECONDS] | gen FILE N")
end

return _M
