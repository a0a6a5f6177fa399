-- paygate doctor makes one signed call through paygate.wechatpay against
-- the simulator (a real HTTP server speaking the protocol): it passes for
-- a merchant WeChat knows, and names what is wrong when WeChat refuses the
-- signature (a certificate it does not hold for the mchid), when the
-- APIv3 key does not decrypt the certificates, when the public key does
-- not verify the answer (migration mode), and when the host fails.
local testing = require "paygate.testing"
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local server = require "support.server"
local proc = require "support.proc"

local dir

local function literal(v)
  if type(v) == "table" then
    local parts = {}
    for k, x in pairs(v) do
      parts[#parts + 1] = (type(k) == "number" and "[%d] = %s"
                           or "[%q] = %s"):format(k, literal(x))
    end
    return "{ " .. table.concat(parts, ", ") .. " }"
  elseif type(v) == "string" then
    return ("%q"):format(v)
  end
  return tostring(v)
end

local function doctor(wc)
  local path = dir .. "/conf." .. crypto.random_nonce(8) .. ".lua"
  local f = assert(io.open(path, "w"))
  f:write("return { wechatpay = ", literal(wc), " }\n")
  f:close()
  local log = path .. ".out"
  local p = proc.spawn({ PAYGATE_BIN, "doctor", "--json", "--config", path },
                       { log = log })
  local code = p:wait(60)
  if code == nil then p:kill(proc.SIGKILL); p:wait(2) end
  local out = proc.read(log)
  local r = {}
  for line in out:gmatch("[^\n]+") do
    if line:sub(1, 1) == "{" then
      local x = json.decode(line)
      if x and x.kind then r[x.kind] = r[x.kind] or x end
    end
  end
  assert(r.signed_call, "no signed_call check:\n" .. out)
  return r.signed_call, out, code, r
end

setup(function() dir = server.tmpdir() end)
teardown(function()
  testing.stop_all()
  os.execute("rm -rf " .. dir)
end)

describe("paygate doctor's signed call (platform certificate mode)", function()
  local sim
  setup(function() sim = testing.simulator() end)

  it("passes for the merchant WeChat knows", function()
    local r, out = doctor(sim:client_config())
    assert.equal("ok", r.status, out)
    assert.matches("accepted the signature", r.cause, 1, true)
    assert.matches("decrypted with the APIv3 key", r.cause, 1, true)
    -- and it printed no secret
    assert.is_nil(out:find(sim.merchant.apiv3_key, 1, true))
  end)

  it("fails when WeChat does not hold the merchant's certificate", function()
    local other = testing.merchant_keys{ mchid = sim.merchant.mchid }
    local r, out, code = doctor(sim:client_config(nil, {
      merchant_private_key = other.private_key,
      merchant_certificate = other.certificate }))
    assert.equal(1, code, out)
    assert.equal("fail", r.status, out)
    assert.matches("refused the request's signature", r.cause, 1, true)
    assert.matches("merchant_serial", r.fix, 1, true)
    assert.matches("must name the API certificate WeChat holds", r.fix, 1,
                   true)
  end)

  -- paygate certs --download's reading of WeChat's detail.field, shared
  it("a SIGN_ERROR's fix names what WeChat blamed", function()
    local serial = crypto.certificate(proc.read(sim.merchant.certificate))
                   :serial()
    -- the right serial signed with another key: the signature
    local other = testing.merchant_keys{ mchid = sim.merchant.mchid }
    local r, out, code = doctor(sim:client_config(nil, {
      merchant_private_key = other.private_key,
      merchant_certificate = false, merchant_serial = serial }))
    assert.equal(1, code, out)
    assert.matches("SIGN_ERROR", r.cause, 1, true)
    assert.matches("merchant_private_key is not the key of the "
                   .. "certificate merchant_serial names", r.fix, 1, true)
    assert.is_nil(r.fix:find("check mchid", 1, true), r.fix)
    -- a merchant id WeChat does not know
    r, out, code = doctor(sim:client_config(nil, { mchid = "1234567",
      merchant_certificate = false, merchant_serial = serial }))
    assert.equal(1, code, out)
    assert.matches("SIGN_ERROR", r.cause, 1, true)
    assert.matches("WeChat does not know this merchant id: check mchid",
                   r.fix, 1, true)
    assert.is_nil(r.fix:find("merchant_serial", 1, true), r.fix)
  end)

  it("a SIGN_ERROR for the signature type names sign_type", function()
    -- an SM merchant's keys against a WeChat that expects RSA (or the
    -- reverse): WeChat refuses the scheme before the mchid and the serial
    local sm = testing.merchant_keys{ sm2 = true, mchid = sim.merchant.mchid }
    local r, out, code = doctor(sim:client_config(nil, {
      merchant_private_key = sm.private_key,
      merchant_certificate = sm.certificate,
      sign_type = "WECHATPAY2-SM2-WITH-SM3" }))
    assert.equal(1, code, out)
    assert.equal("fail", r.status, out)
    assert.matches("SIGN_ERROR", r.cause, 1, true)
    assert.matches("sign_type", r.fix, 1, true)
    assert.matches("WeChat expects WECHATPAY2-SHA256-RSA2048", r.fix, 1,
                   true)
    assert.is_nil(r.fix:find("merchant_serial", 1, true), r.fix)
    assert.is_nil(r.fix:find("check mchid", 1, true), r.fix)
  end)

  it("fails when the APIv3 key is wrong", function()
    local key = testing.apiv3_key()
    local r, out, code = doctor(sim:client_config(nil, { apiv3_key = key }))
    assert.equal(1, code, out)
    assert.equal("fail", r.status, out)
    assert.matches("APIv3 key does not decrypt", r.cause, 1, true)
    assert.is_nil(out:find(key, 1, true))
  end)

  it("a wrong APIv3 key: the fix names the keys of the config checked",
     function()
    local key = testing.apiv3_key()
    -- a client config: its own keys
    local r, out = doctor(sim:client_config(nil, { apiv3_key = key }))
    assert.matches("set apiv3_key to", r.fix, 1, true)
    -- the gateway's config: apiv3_key is refused there; its keys are
    -- apiv3_key_file (or _env) and previous_apiv3_key_files
    local wc = sim:client_config()
    local kf = dir .. "/wrong." .. crypto.random_nonce(6) .. ".key"
    local f = assert(io.open(kf, "w"))
    f:write(key, "\n")
    f:close()
    local gw = dir .. "/gw." .. crypto.random_nonce(6) .. ".lua"
    f = assert(io.open(gw, "w"))
    f:write("return { gateway = ", literal{ db = "sqlite:" .. dir
      .. "/gw.db", public_url = "http://127.0.0.1:9" }, ", merchants = { ",
      literal{ mchid = wc.mchid, appid = wc.appid,
        merchant_private_key = wc.merchant_private_key,
        merchant_certificate = wc.merchant_certificate,
        apiv3_key_file = kf, base_url = wc.base_url }, " } }\n")
    f:close()
    local p = proc.spawn({ PAYGATE_BIN, "doctor", "--json", "--config", gw },
                         { log = gw .. ".out" })
    local code = p:wait(60)
    out = proc.read(gw .. ".out")
    assert.equal(1, code, out)
    local all = {}
    for line in out:gmatch("[^\n]+") do
      local x = json.decode(line)
      if x and x.kind then all[x.kind] = all[x.kind] or x end
    end
    r = all.signed_call
    assert.equal("fail", r and r.status, out)
    assert.matches("APIv3 key does not decrypt", r.cause, 1, true)
    assert.matches("merchants[1].apiv3_key_file", r.fix, 1, true)
    assert.matches("merchants[1].previous_apiv3_key_files", r.fix, 1, true)
    for _, x in ipairs({ r.cause, r.fix, all.apiv3_key.cause }) do
      assert.is_nil(x:find("apiv3_key,", 1, true), x)
      assert.is_nil(x:find("apiv3_key ", 1, true), x)
      assert.is_nil(x:find("previous_apiv3_keys", 1, true), x)
    end
    assert.matches("merchants[1].apiv3_key_file", all.apiv3_key.cause, 1,
                   true)
    assert.is_nil(out:find(key, 1, true))
  end)

  -- An APIv3 key rotation begun on this side only: the new key configured,
  -- the old one kept as previous, WeChat still on the old one. Everything
  -- works, but only through the previous key, which the operator removes a
  -- day later: doctor must say so rather than pass.
  it("warns when the certificates decrypt only with a previous APIv3 key",
     function()
    local new = testing.apiv3_key()
    local r, out, code = doctor(sim:client_config(nil, { apiv3_key = new,
      previous_apiv3_keys = { sim.merchant.apiv3_key } }))
    assert.equal(0, code, out)
    assert.equal("warn", r.status, out)
    assert.matches("decrypt only with a previous APIv3 key "
                   .. "(wechatpay.previous_apiv3_keys)", r.cause, 1, true)
    assert.matches("WeChat still encrypts with the old key", r.cause, 1,
                   true)
    assert.matches("merchant platform", r.fix, 1, true)
    assert.is_nil(out:find(new, 1, true))
    assert.is_nil(out:find(sim.merchant.apiv3_key, 1, true))
    -- WeChat on the new key, the old one kept as previous: ok
    r, out, code = doctor(sim:client_config(nil, {
      previous_apiv3_keys = { new } }))
    assert.equal(0, code, out)
    assert.equal("ok", r.status, out)
    assert.matches("decrypted with the APIv3 key", r.cause, 1, true)
    -- neither key WeChat's: the failure names both keys, as before
    r, out, code = doctor(sim:client_config(nil, { apiv3_key = new,
      previous_apiv3_keys = { testing.apiv3_key() } }))
    assert.equal(1, code, out)
    assert.equal("fail", r.status, out)
    assert.matches("APIv3 key does not decrypt", r.cause, 1, true)
  end)

  it("fails when the host answers 503", function()
    sim:fault{ endpoint = "certificates", kind = "error", status = 503,
               code = "SYSTEM_ERROR" }
    local ok, r, out, code = pcall(doctor, sim:client_config())
    sim:clear_faults()
    assert(ok, r)
    assert.equal(1, code, out)
    assert.equal("fail", r.status, out)
    assert.matches("did not serve a signed call", r.cause, 1, true)
    assert.matches("503", r.cause, 1, true)
  end)
end)

-- The gateway downloads its platform certificates (none configured):
-- cert_expiry covers the ones WeChat sends, as it covers configured ones.
describe("paygate doctor's cert_expiry of the downloaded platform "
         .. "certificates", function()
  -- a simulator whose platform certificate (serial) ends in 2 days
  local function expiring_simulator(name, serial)
    local key, cert = dir .. "/" .. name .. ".key", dir .. "/" .. name
                      .. ".pem"
    assert(os.execute(("openssl req -x509 -newkey rsa:2048 -nodes -days 2 "
      .. "-subj '/C=CN/O=Tenpay.com/CN=Tenpay.com sign' -set_serial "
      .. "0x%s -keyout %s -out %s >/dev/null 2>&1"):format(serial, key,
      cert)) == 0)
    return testing.simulator{ config = {
      platform_private_key = key, platform_certificate = cert } }, cert
  end

  -- doctor's cert_expiry line of the platform certificate (a warning)
  local function platform_expiry(wc)
    local _, out, code = doctor(wc)
    assert.equal(0, code, out)
    local found
    for line in out:gmatch("[^\n]+") do
      local x = json.decode(line)
      if x and x.kind == "cert_expiry"
         and x.cause:find("platform certificate", 1, true) then
        found = x
      end
    end
    assert(found, "no cert_expiry of the platform certificate:\n" .. out)
    assert.equal("warn", found.status, out)
    return found
  end

  it("warns of the one WeChat sends expiring within 30 days", function()
    local sim = expiring_simulator("plat2d",
                                   "5F1C72E2A8931B72A2E13AF8DEE92471EB397115")
    local wc = sim:client_config()
    assert.is_nil(wc.platform_certificates)
    local found = platform_expiry(wc)
    assert.matches("5F1C72E2A8931B72A2E13AF8DEE92471EB397115 expires in 1 "
                   .. "day", found.cause, 1, true)
    assert.matches("paygate certs --download", found.fix, 1, true)
    assert.matches("paygate.wechatpay downloads it", found.fix, 1, true)
    sim:stop()
  end)

  -- with download_certificates = false or "manual" the client does not
  -- fetch it every 12 h: the fix says how it gets there
  it("says what to do when the client does not download it", function()
    local sim, cert = expiring_simulator("plat2m",
      "5F1C72E2A8931B72A2E13AF8DEE92471EB397116")
    for _, case in ipairs{
      { false, { cert }, "with download_certificates = false nothing "
                         .. "downloads it" },
      { "manual", nil, 'with download_certificates = "manual" it is '
                       .. "downloaded only on an unknown serial" } } do
      local wc = sim:client_config()
      wc.download_certificates, wc.platform_certificates = case[1], case[2]
      local found = platform_expiry(wc)
      assert.matches(case[3], found.fix, 1, true)
      assert.matches("fetch it with paygate certs --download and add it to "
                     .. "platform_certificates", found.fix, 1, true)
      assert.not_matches("paygate.wechatpay downloads it", found.fix, 1, true)
    end
    sim:stop()
  end)
end)

describe("paygate doctor's signed call (public key)", function()
  it("fails in migration mode when the public key is not WeChat's",
     function()
    local sim = testing.simulator{ verifier_mode = "both" }
    local r, out = doctor(sim:client_config())
    assert.equal("ok", r.status, out)
    local wrong = proc.read(testing.merchant_keys().public_key)
    local code
    r, out, code = doctor(sim:client_config(nil, { public_key = wrong }))
    assert.equal(1, code, out)
    assert.equal("fail", r.status, out)
    assert.matches("does not verify", r.cause, 1, true)
    assert.matches("public_key", r.fix, 1, true)
    -- the merchant's own public key there: named as such, before any call
    local all
    r, out, code, all = doctor(sim:client_config(nil, {
      public_key = proc.read(sim.merchant.public_key) }))
    assert.equal(1, code, out)
    assert.equal("fail", all.public_key and all.public_key.status, out)
    assert.matches("merchant's own public key", all.public_key.cause, 1, true)
  end)

  it("a public_key_id that is not the key's: names public_key_id and the id"
     .. " WeChat gives it, not public_key", function()
    -- was: "fix: public_key must be the WeChat Pay public key shown beside
    -- public_key_id", sending the operator to replace a key that was
    -- right; paygate verify on the gateway's capture named the id
    local sim = testing.simulator{ verifier_mode = "both" }
    local conf = sim:client_config()
    local real = conf.public_key_id
    local wrong = real:sub(1, -3) .. (real:sub(-2) == "00" and "01" or "00")
    local r, out, code = doctor(sim:client_config(nil,
                                                  { public_key_id = wrong }))
    assert.equal(1, code, out)
    assert.equal("fail", r.status, out)
    assert.matches("public_key_id " .. wrong, r.cause, 1, true)
    assert.matches("verifies with the configured public_key", r.cause, 1,
                   true)
    assert.matches("set public_key_id to " .. real, r.fix, 1, true)
    assert.is_nil(r.fix:find("public_key must be", 1, true), r.fix)
    sim:stop()
  end)

  it("in public-key mode, checks the signature and says what it cannot",
     function()
    local sim = testing.simulator{ verifier_mode = "public_key" }
    local r, out = doctor(sim:client_config())
    assert.equal("ok", r.status, out)
    assert.matches("404 RESOURCE_NOT_EXISTS", r.cause, 1, true)
    assert.matches("checked by the first signed answer", r.detail, 1, true)
    local other = testing.merchant_keys{ mchid = sim.merchant.mchid }
    r, out = doctor(sim:client_config(nil, {
      merchant_private_key = other.private_key,
      merchant_certificate = other.certificate }))
    assert.equal("fail", r.status, out)
    assert.matches("refused the request's signature", r.cause, 1, true)
    -- a 404 that is not WeChat's RESOURCE_NOT_EXISTS (a proxy, another
    -- host) proves nothing
    sim:fault{ endpoint = "certificates", kind = "error", status = 404,
               code = "NOT_FOUND" }
    local ok, r2, out2 = pcall(doctor, sim:client_config())
    sim:clear_faults()
    assert(ok, r2)
    assert.equal("fail", r2.status, out2)
  end)

  it("in migration mode, a 404 RESOURCE_NOT_EXISTS: the certificates were"
     .. " voided, the public key verifies: a warning to clean the config",
     function()
    local sim = testing.simulator{ verifier_mode = "public_key" }
    local r, out, code = doctor(sim:client_config(nil, {
      download_certificates = true }))
    assert.equal(0, code, out)
    assert.equal("warn", r.status, out)
    assert.matches("accepted the signature", r.cause, 1, true)
    assert.matches("voided", r.detail, 1, true)
    assert.matches("remove platform_certificates and download_certificates",
                   r.fix, 1, true)
    assert.is_nil(r.fix:find("configure public_key", 1, true), r.fix)
  end)
end)
