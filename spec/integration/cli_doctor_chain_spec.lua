-- paygate doctor and x509.verify_chain: the two chain failures the other
-- doctor specs leave out, produced for real. Wrong usage: a TLS client
-- certificate (extendedKeyUsage clientAuth only) served as the API host's,
-- a key usage without digitalSignature / keyEncipherment, a leaf used as a
-- CA. Bad signature: a byte of the leaf's signature flipped, a leaf
-- re-signed by another key under its intermediate's name (the server
-- sends the real intermediate, which did not sign it).
local x509 = require "paygate.x509"
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local server = require "support.server"
local proc = require "support.proc"
local diagpki = require "support.diagpki"

local dir, pki, notify
local read, write = diagpki.read, diagpki.write

local APP = [[
local paygate = require "paygate"
paygate.route("GET", "/v3/certificates", function()
  return 401, { code = "SIGN_ERROR", message = "unsigned" }
end)
paygate.route("POST", "/notify", function() return 401, { code = "FAIL" } end)
]]

local function run(args)
  local log = dir .. "/out." .. crypto.random_nonce(8)
  local argv = { PAYGATE_BIN }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local p = proc.spawn(argv, { log = log })
  local code = p:wait(60)
  if code == nil then p:kill(proc.SIGKILL); p:wait(2) end
  local out = proc.read(log)
  local results = {}
  for line in out:gmatch("[^\n]+") do
    if line:sub(1, 1) == "{" then
      local r = json.decode(line)
      if r then results[r.kind] = results[r.kind] or r end
    end
  end
  return code, out, results
end

-- a config file against base_url, trusting the test root
local function config(base_url)
  local path = dir .. "/doctor." .. crypto.random_nonce(6) .. ".lua"
  write(path, ("return { wechatpay = { mchid = '1900000001', "
    .. "merchant_private_key = %q, merchant_certificate = %q, "
    .. "apiv3_key = '0123456789abcdefghijABCDEFGHIJkl', base_url = %q, "
    .. "ca_file = %q, platform_certificates = { %q } }, notify_url = %q, "
    .. "database = %q }"):format(pki.merchant_key, pki.merchant, base_url,
    pki.root, pki.platform, notify:url("/notify"),
    "sqlite:" .. dir .. "/doctor.sqlite"))
  return path
end

setup(function()
  dir = server.tmpdir()
  pki = diagpki.make(dir)
  notify = server.start{ source = APP }
end)

teardown(function()
  if notify then notify:stop() end
  os.execute("rm -rf " .. dir)
end)

describe("x509.verify_chain", function()
  local function verify(name, extra)
    local inter = { read(pki.inter) }
    if extra then inter[#inter + 1] = read(extra) end
    return x509.verify_chain(assert(x509.load(read(pki[name]))), {
      roots = { read(pki.root) }, intermediates = inter,
      hostname = "localhost", purpose = "server" })
  end

  it("passes the good leaf", function()
    assert.is_true(verify("good"))
  end)

  local cases = {
    { "clientonly", "wrong_usage", "unsuitable certificate purpose" },
    { "certsignonly", "wrong_usage", "unsuitable certificate purpose" },
    { "byleaf", "wrong_usage", "invalid CA certificate", "good" },
    { "flipped", "bad_signature", "does not verify with its issuer's key" },
    { "forged", "bad_signature", "did not sign it" },
  }
  for _, c in ipairs(cases) do
    it("names the " .. c[1] .. " leaf " .. c[2], function()
      local ok, err = verify(c[1], c[4] and pki[c[4]])
      assert.is_nil(ok)
      assert.equal(c[2], err.kind, tostring(err))
      assert.matches(c[3], err.message, 1, true)
    end)
  end
end)

describe("paygate doctor: the TLS chain to the API host", function()
  local cases = {
    { "a TLS client certificate (clientAuth only)", "clientonly",
      "wrong_usage", "serverAuth" },
    { "a leaf whose signature has a flipped byte", "flipped",
      "bad_signature", "altered" },
    { "a leaf re-signed by another key under the intermediate's name",
      "forged", "bad_signature", "altered" },
  }
  for _, c in ipairs(cases) do
    it("names " .. c[1], function()
      local s = server.start{ source = APP, scheme = "https", args = {
        "--tls-cert", pki[c[2] .. "_chain"],
        "--tls-key", pki[c[2] .. "_key"] } }
      local code, out, r = run({ "doctor", "--json", "--config",
                                 config("https://localhost:" .. s.port) })
      s:stop()
      local tls = r.tls_chain
      assert.truthy(tls, out)
      assert.equal(1, code, out)
      assert.equal("fail", tls.status, out)
      assert.equal(c[3], tls.x509_kind, out)
      assert.matches(c[4], tls.cause .. " " .. tls.fix, 1, true)
      -- the HTTP client refuses the same chain
      assert.equal("fail", r.reachability.status, out)
    end)
  end
end)
