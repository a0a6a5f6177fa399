-- spec/support/simnotify.lua: the simulator and a notification receiver
-- on free loopback ports, and a merchant client made only of
-- paygate.crypto primitives and facts of the protocol (not the
-- simulator's code, not paygate.wechatpay).
local paygate = require "paygate"
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local server = require "support.server"
local proc = require "support.proc"

local _M = {}

local FIX = "spec/fixtures/wechatpay/"
_M.MCHID = "1900007291"
_M.APPID = "wxd678efh567hg6787"
_M.APIV3 = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb"
_M.SERIAL = "5F1C72E2A8931B72A2E13AF8DEE92471EB397115"

local function abs(p)
  if p:sub(1, 1) == "/" then return p end
  return io.popen("pwd"):read("*l") .. "/" .. p
end
_M.abs = abs
_M.KEY_PATH = abs(FIX .. "a1_merchant_key.pem")
_M.PUB_PATH = abs(FIX .. "a1_pub.pem")

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local merchant_key, sm2_key

_M.SM2 = "WECHATPAY2-SM2-WITH-SM3"
_M.SM2_KEY_PATH = abs(FIX .. "a10a_sm2_key.pem")
-- (A.10b itself expired in 2023: a fresh one on the same key and serial)
_M.SM2_CERT_PATH = nil
_M.SM2_SERIAL = "54E7F59ED8DF4570CFB14780EA8152D45A675EE6"

--- sim = start{ state_dir, workers, time_scale, answer_timeout, sm = true,
---              extra = "lua fields", merchant_extra = "the merchant's" }
function _M.start(o)
  o = o or {}
  local state = o.state_dir or server.tmpdir()
  if o.sm and not _M.SM2_CERT_PATH then
    _M.SM2_CERT_PATH = require("support.simclient").sm2_merchant_cert()
  end
  local verifier = o.sm and ("merchant_certificate = %q"):format(
                     _M.SM2_CERT_PATH)
                   or ("merchant_public_key = %q, merchant_serial = %q")
                     :format(_M.PUB_PATH, _M.SERIAL)
  local conf = ("return { state_dir = %q, time_scale = %s, "
    .. "answer_timeout = %s, merchants = { { mchid = %q, apiv3_key = %q, "
    .. "appids = { %q }, %s%s } }%s%s }"):format(state,
    tostring(o.time_scale or 1), tostring(o.answer_timeout or 5), _M.MCHID,
    _M.APIV3, _M.APPID, verifier,
    o.merchant_extra and (", " .. o.merchant_extra) or "",
    o.sm and (", sign_type = %q"):format(_M.SM2) or "",
    o.extra and (", " .. o.extra) or "")
  local s = server.start{ app = "examples/simulator", config = conf,
                          workers = o.workers or 1 }
  s.state_dir = state
  s.conf = conf
  s.sm = o.sm
  s.base = "http://127.0.0.1:" .. s.port
  return s
end

--- receiver = receiver(): the recording app of spec/support/notify_receiver
function _M.receiver()
  local r = server.start{ app = "spec/support/notify_receiver" }
  r.base = "http://127.0.0.1:" .. r.port
  return r
end

function _M.notify_url(r, box) return r.base .. "/notify/" .. box end

local function call(url, method, body)
  local res, err = paygate.http.request{ method = method, url = url,
    body = body and json.encode(body) or nil, timeout = 10,
    headers = { ["Content-Type"] = "application/json" } }
  assert(res, tostring(err))
  return res.status, json.decode(res.body) or res.body, res
end
_M.call = call

--- status, doc = answer(r, box, { statuses =, status =, delay =, hold = })
-- hold = true: the box's answers wait for release(r, box)
function _M.answer(r, box, t)
  t.box = box
  local st = call(r.base .. "/_ctl/answer", "POST", t)
  assert(st == 200)
end

function _M.release(r, box)
  local st = call(r.base .. "/_ctl/release", "POST", { box = box })
  assert(st == 200)
end

function _M.received(r, box)
  local st, doc = call(r.base .. "/_ctl/received?box=" .. box, "GET")
  assert(st == 200)
  return doc
end

function _M.ctl(sim, method, path, body)
  return call(sim.base .. path, method, body)
end

--- res = signed(sim, method, target, body): a merchant request, signed
-- as the protocol says: METHOD \n TARGET \n TS \n NONCE \n BODY \n
function _M.signed(sim, method, target, body)
  local key, schema, serial
  if sim.sm then
    sm2_key = sm2_key or assert(crypto.private_key(read(_M.SM2_KEY_PATH)))
    key, schema, serial = sm2_key, _M.SM2, _M.SM2_SERIAL
  else
    merchant_key = merchant_key
                   or assert(crypto.private_key(read(_M.KEY_PATH)))
    key, schema, serial = merchant_key, "WECHATPAY2-SHA256-RSA2048",
                          _M.SERIAL
  end
  local ts, nonce = tostring(os.time()), crypto.random_nonce(32)
  local msg = method .. "\n" .. target .. "\n" .. ts .. "\n" .. nonce .. "\n"
              .. (body or "") .. "\n"
  local sig = assert(crypto.sign_base64(key, msg, schema))
  local auth = ('%s mchid="%s",nonce_str="%s",timestamp="%s",serial_no="%s",'
    .. 'signature="%s"'):format(schema, _M.MCHID, nonce, ts, serial, sig)
  local res, err = paygate.http.request{ method = method,
    url = sim.base .. target, body = body, timeout = 10, headers = {
      Authorization = auth, Accept = "application/json",
      ["User-Agent"] = "simnotify-spec",
      ["Content-Type"] = body and "application/json" or nil } }
  assert(res, tostring(err))
  return res
end

--- an order made with NATIVE prepay and paid through the control API
function _M.prepay(sim, no, notify_url, total)
  local body = json.encode({ appid = _M.APPID, mchid = _M.MCHID,
    description = "spec order " .. no, out_trade_no = no,
    notify_url = notify_url, amount = { total = total or 1,
                                        currency = "CNY" } })
  local res = _M.signed(sim, "POST", "/v3/pay/transactions/native", body)
  assert(res.status == 200, "prepay: " .. res.status .. " " .. res.body)
  return json.decode(res.body)
end

function _M.pay(sim, no)
  local st, doc = _M.ctl(sim, "POST", "/sim/transactions/" .. no .. "/pay",
                         {})
  assert(st == 200, "pay: " .. tostring(st) .. " " .. json.encode(doc))
  return doc
end

function _M.refund(sim, no, rno, amount, total, notify_url)
  local body = json.encode({ out_trade_no = no, out_refund_no = rno,
    notify_url = notify_url, amount = { refund = amount, total = total,
                                        currency = "CNY" } })
  local res = _M.signed(sim, "POST", "/v3/refund/domestic/refunds", body)
  assert(res.status == 200, "refund: " .. res.status .. " " .. res.body)
  return json.decode(res.body)
end

function _M.settle(sim, rno, status)
  local st, doc = _M.ctl(sim, "POST", "/sim/refunds/" .. rno .. "/settle",
                         { status = status })
  assert(st == 200, "settle: " .. tostring(st) .. " " .. json.encode(doc))
  return doc
end

--- list = notifications(sim[, query string])
function _M.notifications(sim, qs)
  local st, doc = _M.ctl(sim, "GET", "/sim/notifications"
                         .. (qs and ("?" .. qs) or ""))
  assert(st == 200, "notifications: " .. tostring(st))
  return doc
end

--- certs = platform_certs(sim): serial -> certificate handle
function _M.platform_certs(sim)
  local st, doc = _M.ctl(sim, "GET", "/sim/platform-certificates")
  assert(st == 200)
  local out = {}
  for _, c in ipairs(doc) do
    out[c.serial_no] = assert(crypto.certificate(c.certificate))
  end
  return out
end

--- ok, why = verify(certs, rec[, alg]): a received notification's
--- signature; certs maps a serial (or PUB_KEY_ID_...) to a key
function _M.verify(certs, rec, alg)
  local h = rec.headers
  local cert = certs[h["wechatpay-serial"]]
  if not cert then return nil, "unknown serial" end
  if math.abs(os.time() - tonumber(h["wechatpay-timestamp"])) >= 300 then
    return nil, "stale"
  end
  local ok = crypto.verify_base64(cert, h["wechatpay-timestamp"] .. "\n"
    .. h["wechatpay-nonce"] .. "\n" .. rec.body .. "\n",
    h["wechatpay-signature"], alg)
  if not ok then return nil, "bad signature" end
  return true
end

--- doc, plain = decrypt(rec): the envelope and its decrypted resource
--- (AES-256-GCM with the APIv3 key; SM4-GCM with SM3(key)[1..16])
function _M.decrypt(rec)
  local doc = assert(json.decode(rec.body))
  local r = doc.resource
  local key = r.algorithm == "AEAD_SM4_GCM" and crypto.sm4_key(_M.APIV3)
              or _M.APIV3
  local plain = assert(crypto.aead_decrypt(r.algorithm, key,
    r.nonce, r.associated_data, assert(crypto.base64_decode(r.ciphertext))))
  return doc, assert(json.decode(plain))
end

_M.wait_until = proc.wait_until

return _M
