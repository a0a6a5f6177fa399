-- bench/crypto.lua -- ops/s of paygate.crypto through the Lua binding, one
-- core. Run by bench/crypto inside the runtime (paygate exec); prints one
-- "name ops_per_s" line per measurement.
--   usage: paygate exec bench/crypto.lua [SECONDS]
local crypto = require "paygate.crypto"
local keyring = require "paygate.keyring"

local secs = tonumber(arg and arg[1]) or 3
local FIX = "spec/fixtures/wechatpay/"

local function read(name)
  local f = assert(io.open(FIX .. name, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

-- Calls fn in batches until secs of CPU time pass; returns ops/s.
local function measure(fn)
  for _ = 1, 20 do fn() end            -- warm up (contexts, JIT)
  local n, batch = 0, 16
  local t0 = os.clock()
  local t = t0
  while t - t0 < secs do
    for _ = 1, batch do fn() end
    n = n + batch
    t = os.clock()
  end
  return n / (t - t0)
end

-- The keys are parsed once, here; the loops below only sign / verify.
local rsa = assert(crypto.private_key(read("a5_platform_key.pem")))
local rsa_pub = assert(crypto.public_key(read("a7_platform_pubkey.pem")))
local sm2 = assert(crypto.private_key(read("a10a_sm2_key.pem")))
local sm2_cert = assert(crypto.certificate(read("a10b_sm2_cert.pem")))
keyring.put("BENCH_RSA", rsa_pub)

local msg = "1722850421\nd824f2e086d3c1df967785d13fcd22ef\n"
  .. '{"code_url":"weixin://wxpay/bizpayurl?pr=JyC91EIz1"}\n'
local rsa_sig = assert(crypto.sign(rsa, msg, "sha256-rsa"))
local sm2_sig = assert(crypto.sign(sm2, msg, "sm2-sm3"))
local sign, verify, dec = crypto.sign, crypto.verify, crypto.aead_decrypt
local kverify = keyring.verify

local key = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb"
local ct = assert(crypto.aead_encrypt("AEAD_AES_256_GCM", key, "0123456789ab",
  "transaction", crypto.random_bytes(1024)))
local sm4key = crypto.sm4_key(key)
local ct4 = assert(crypto.aead_encrypt("AEAD_SM4_GCM", sm4key, "0123456789ab",
  "transaction", crypto.random_bytes(1024)))

local results = {
  { "rsa2048_sign", function() sign(rsa, msg, "sha256-rsa") end },
  { "rsa2048_verify", function() assert(verify(rsa_pub, msg, rsa_sig, "sha256-rsa")) end },
  { "rsa2048_verify_keyring", function() assert(kverify("BENCH_RSA", msg, rsa_sig)) end },
  { "sm2_sign", function() sign(sm2, msg, "sm2-sm3") end },
  { "sm2_verify", function() assert(verify(sm2_cert, msg, sm2_sig, "sm2-sm3")) end },
  { "aes256gcm_decrypt_1k", function() assert(dec("AEAD_AES_256_GCM", key, "0123456789ab", "transaction", ct)) end },
  { "sm4gcm_decrypt_1k", function() assert(dec("AEAD_SM4_GCM", sm4key, "0123456789ab", "transaction", ct4)) end },
}
for _, r in ipairs(results) do
  io.write(("%s %.1f\n"):format(r[1], measure(r[2])))
  io.flush()
end
keyring.remove("BENCH_RSA")
