-- spec/support/wxtest.lua: test keys, certificates and a running
-- spec/support/wxserver for the WeChat Pay client's specs.
local paygate = require "paygate"
local json = require "cjson.safe"
local server = require "support.server"

local _M = {}

local FIX = "spec/fixtures/wechatpay/"
_M.APIV3 = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb"
_M.MCHID = "1234567891"
_M.MERCHANT_SERIAL = "5F1C72E2A8931B72A2E13AF8DEE92471EB397115"
_M.P1 = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1"   -- platform cert 1
_M.P2 = "7132D72A03E93CDDF8C03BBD1F37EEDF77A4F1A2"   -- rotated-in cert 2
_M.PUB_ID = "PUB_KEY_ID_0114232134912410000000000000000001"

--- text = fixture(name): a file of spec/fixtures/wechatpay/, whole
function _M.fixture(name)
  local f = assert(io.open(FIX .. name, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local function sh(cmd)
  local ok = os.execute(cmd .. " >/dev/null 2>&1")
  assert(ok == 0 or ok == true, "command failed: " .. cmd)
end

local function abs(p)
  if p:sub(1, 1) == "/" then return p end
  local pwd = io.popen("pwd"):read("*l")
  return pwd .. "/" .. p
end

--- keys = make(dir): platform certificates (fresh, valid for `days`) for
--- the fixture keys: P1 on A.5, P2 on A.8; the public key is A.1's.
function _M.make(dir, days)
  local k = { dir = dir }
  k.merchant_key = abs(FIX .. "a3_merchant_key.pem")
  k.merchant_cert = abs(FIX .. "a4_merchant_cert.pem")
  k.p1_key, k.p2_key = abs(FIX .. "a5_platform_key.pem"),
                       abs(FIX .. "a8_go_key.pem")
  k.pub_key, k.pub_pem = abs(FIX .. "a1_merchant_key.pem"),
                         abs(FIX .. "a1_pub.pem")
  k.p1_cert, k.p2_cert = dir .. "/p1.pem", dir .. "/p2.pem"
  -- the merchant's public half, for the server to check requests
  k.merchant_pub = dir .. "/merchant_pub.pem"
  sh(("openssl pkey -in %s -pubout -out %s"):format(k.merchant_key,
                                                    k.merchant_pub))
  for _, p in ipairs({ { k.p1_key, k.p1_cert, _M.P1 },
                       { k.p2_key, k.p2_cert, _M.P2 } }) do
    sh(("openssl req -x509 -new -key %s -out %s -days %d -set_serial 0x%s "
        .. "-subj '/C=CN/O=Tenpay.com/CN=Tenpay.com sign'")
       :format(p[1], p[2], days or 365, p[3]))
  end
  return k
end

-- The ShangMi variant: the merchant's SM2 key (A.10a) and serial (A.10b),
-- two SM2 platform keys made per run with certificates valid `days`.
_M.SM_MERCHANT_SERIAL = "54E7F59ED8DF4570CFB14780EA8152D45A675EE6"
_M.S1 = "3A1E989910B253E069A11568C91C57CA44568101"
_M.S2 = "3A1E989910B253E069A11568C91C57CA44568102"

--- keys = make_sm(dir[, days])
function _M.make_sm(dir, days)
  local k = { dir = dir, sm = true, merchant_serial = _M.SM_MERCHANT_SERIAL }
  k.merchant_key = abs(FIX .. "a10a_sm2_key.pem")
  k.merchant_pub = dir .. "/sm_merchant_pub.pem"
  sh(("openssl pkey -in %s -pubout -out %s"):format(k.merchant_key,
                                                    k.merchant_pub))
  k.s1_key, k.s2_key = dir .. "/s1.key", dir .. "/s2.key"
  k.s1_cert, k.s2_cert = dir .. "/s1.pem", dir .. "/s2.pem"
  for _, p in ipairs({ { k.s1_key, k.s1_cert, _M.S1, days or 365 },
                       { k.s2_key, k.s2_cert, _M.S2, (days or 365) + 30 } })
  do
    sh(("openssl genpkey -algorithm SM2 -out %s"):format(p[1]))
    sh(("openssl req -x509 -new -key %s -out %s -days %d -set_serial 0x%s "
        .. "-sm3 -sigopt distid:1234567812345678 "
        .. "-subj '/C=CN/O=Tenpay.com/CN=Tenpay.com sign'")
       :format(p[1], p[2], p[4], p[3]))
  end
  k.server_keys = { [_M.S1] = k.s1_key, [_M.S2] = k.s2_key }
  k.server_certs = { [_M.S1] = k.s1_cert, [_M.S2] = k.s2_cert }
  k.default_signer = _M.S1
  return k
end

--- srv = start(keys[, { workers = n, tls = pki }]): the test server,
--- configured (HTTPS with a support.pki set)
function _M.start(k, o)
  o = o or {}
  local conf = {
    mchid = _M.MCHID, merchant_serial = k.merchant_serial or _M.MERCHANT_SERIAL,
    apiv3_key = _M.APIV3, merchant_pub = k.merchant_pub,
    keys = k.server_keys or { [_M.P1] = k.p1_key, [_M.P2] = k.p2_key,
                              [_M.PUB_ID] = k.pub_key },
    certs = k.server_certs or { [_M.P1] = k.p1_cert, [_M.P2] = k.p2_cert },
    default_signer = o.default_signer or k.default_signer or _M.P1,
    sm = k.sm or nil,
  }
  local parts = {}
  local function ser(v)
    if type(v) == "table" then
      local t = {}
      for kk, vv in pairs(v) do
        t[#t + 1] = "[" .. ("%q"):format(kk) .. "]=" .. ser(vv)
      end
      return "{" .. table.concat(t, ",") .. "}"
    end
    if type(v) == "boolean" then return tostring(v) end
    return ("%q"):format(v)
  end
  parts[1] = "return { wxserver = " .. ser(conf) .. " }"
  local args
  if o.tls then        -- { cert, key } from support.pki
    args = { "--tls-cert", o.tls.server_cert, "--tls-key", o.tls.server_key }
  end
  local srv = server.start{ app = "spec/support/wxserver",
                            config = table.concat(parts),
                            workers = o.workers or 1, args = args,
                            scheme = o.tls and "https" or "http",
                            ca_file = o.tls and o.tls.ca }
  srv.base_url = (o.tls and "https" or "http") .. "://127.0.0.1:" .. srv.port
  return srv
end

local function ctl(srv, path, body)
  local res = assert(paygate.http.request{ method = body and "POST" or "GET",
    url = srv.base_url .. path, body = body and json.encode(body) or nil,
    headers = { ["Content-Type"] = "application/json" }, timeout = 5,
    ca_file = srv.ca_file })
  assert(res.status == 200, path .. ": " .. res.status .. " " .. res.body)
  return json.decode(res.body)
end
_M.ctl = ctl

function _M.reset(srv) return ctl(srv, "/_ctl/reset", {}) end
function _M.queue(srv, method, path, responses)
  return ctl(srv, "/_ctl/queue", { method = method, path = path,
                                   responses = responses })
end
function _M.certs(srv, t) return ctl(srv, "/_ctl/certs", t) end
function _M.requests(srv) return ctl(srv, "/_ctl/requests") end

--- dir, keys, srv = serve([make]): in setup(): a temporary directory, the
--- keys made in it (make: _M.make, the default, or _M.make_sm) and the
--- test server started on them
function _M.serve(make)
  local dir = server.tmpdir()
  local keys = (make or _M.make)(dir)
  return dir, keys, _M.start(keys)
end

--- stop(srv, dir): in teardown(): what serve() started and made
function _M.stop(srv, dir)
  if srv then srv:stop() end
  if dir then os.execute("rm -rf " .. dir) end
end

--- fresh(srv, serial): in before_each(): certificate downloads no longer
--- rate-limited (they are instance-wide, through the "paygate" dict), the
--- server reset and listing the one certificate `serial`
function _M.fresh(srv, serial)
  require("paygate.shared").get_dict("paygate"):flush_all()
  _M.reset(srv)
  _M.certs(srv, { serials = { serial } })
end

--- n = count(srv, method, target): the requests the server got for target
--- (method nil: any method)
function _M.count(srv, method, target)
  local n = 0
  for _, r in ipairs(_M.requests(srv)) do
    if (method == nil or r.method == method) and r.target == target then
      n = n + 1
    end
  end
  return n
end

--- wx = client(srv, keys[, over]): a paygate.wechatpay client on
--- client_conf(srv, keys, over); fails the spec if there is none
function _M.client(srv, keys, over)
  local wx, err = require("paygate.wechatpay").client(
    _M.client_conf(srv, keys, over))
  assert(wx, tostring(err))
  return wx
end

-- In over, a key set to NONE is removed from the configuration; false is
-- passed on as false (download_certificates = false, backup_url = false
-- mean something: they were dropped once, and the client then did what
-- the spec had turned off).
_M.NONE = setmetatable({}, { __tostring = function() return "NONE" end })

--- conf = client_conf(srv, keys, over): a client configuration for it
function _M.client_conf(srv, k, over)
  local c = { mchid = _M.MCHID, merchant_private_key = k.merchant_key,
              merchant_serial = k.merchant_serial or _M.MERCHANT_SERIAL,
              apiv3_key = _M.APIV3,
              sign_type = k.sm and "WECHATPAY2-SM2-WITH-SM3" or nil,
              base_url = srv and srv.base_url or "http://127.0.0.1:1",
              timeout = 5, deadline = 10 }
  for kk, v in pairs(over or {}) do
    if v == _M.NONE then c[kk] = nil else c[kk] = v end
  end
  return c
end

return _M
