-- Platform certificate serials as WeChat Pay may write them: a serial is a
-- number, written in hex. Go writes two digits per byte ("0A1E..."), as
-- OpenSSL and this client do; Java's BigInteger.toString(16) drops the
-- leading zero ("A1E..."). A certificate whose serial starts with a zero
-- digit must be taken from /v3/certificates and must verify whichever way
-- the serial_no and the Wechatpay-Serial header write it.
local wxtest = require "support.wxtest"

local P1 = wxtest.P1
-- a certificate on P1's key (the server signs with it) whose serial's
-- first digit is 0
local Z40 = "0A1E989910B253E069A11568C91C57CA44568101"
local Z39 = Z40:sub(2)

local dir, keys, srv

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local function count(method, target)
  return wxtest.count(srv, method, target)
end

local function client(over) return wxtest.client(srv, keys, over) end

setup(function()
  dir, keys, srv = wxtest.serve()
  local z = dir .. "/z.pem"
  assert(os.execute(("openssl req -x509 -new -key %s -out %s -days 365 "
    .. "-set_serial 0x%s -subj '/C=CN/O=Tenpay.com/CN=Tenpay.com sign' "
    .. ">/dev/null 2>&1"):format(keys.p1_key, z, Z40)))
  keys.z_pem = read(z)
  -- the same certificate, listed under either spelling of its serial
  wxtest.ctl(srv, "/_ctl/add_cert", { serial = Z39, pem = keys.z_pem })
  wxtest.ctl(srv, "/_ctl/add_cert", { serial = Z40, pem = keys.z_pem })
end)

teardown(function() wxtest.stop(srv, dir) end)

before_each(function() wxtest.fresh(srv, P1) end)

describe("a platform certificate serial with a leading zero", function()
  for _, listed in ipairs({ Z39, Z40 }) do
    it("listed as serial_no " .. listed .. " is taken, and answers signed "
       .. "under either spelling verify", function()
      wxtest.certs(srv, { serials = { listed }, signer = listed })
      local wx = client()
      assert(wx:refresh_certificates())
      assert.same({ Z40 }, wx:certificate_status().serials)
      local downloads = count("GET", "/v3/certificates")
      wxtest.queue(srv, "GET", "/v3/x", {
        { body = "{}", sign = { serial = Z39 } },
        { body = "{}", sign = { serial = Z40 } },
        { body = "{}", sign = { serial = Z39:lower() } },
        { body = "{}", sign = { serial = "00" .. Z40 } } })
      for i = 1, 4 do
        local res, err = wx:request("GET", "/v3/x")
        assert(res, i .. ": " .. tostring(err))
      end
      -- known under every spelling: no download for an "unknown" serial
      assert.equal(downloads, count("GET", "/v3/certificates"))
      wx:stop()
    end)
  end
end)
