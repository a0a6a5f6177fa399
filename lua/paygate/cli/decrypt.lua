-- paygate decrypt: decrypts a notification's resource (or any
-- encrypt_certificate / resource object) with the APIv3 key and prints
-- the plaintext; a failure names the cause.
local common = require "paygate.cli.common"
local crypto = require "paygate.crypto"
local json = require "cjson.safe"

local type, tostring = type, tostring

local usage = [[
usage: paygate decrypt --apiv3-key-file FILE (--resource FILE |
                       --notification FILE) [--json]

Decrypts a WeChat Pay resource { algorithm, nonce, associated_data,
ciphertext } (AEAD_AES_256_GCM, or AEAD_SM4_GCM) with the APIv3 key and
prints the plaintext. --notification takes a whole callback body and
decrypts its "resource". The nonce is used as given, whatever its length.
When it fails, the cause is named: a key that is not 32 bytes (a hex or
base64 encoding of one, a trailing newline), a tag that does not match
(the wrong key, e.g. the APIv2 key, or an altered ciphertext), an
unknown algorithm.

exit: 0 decrypted, 1 not decrypted (the cause printed), 2 usage or
unreadable input.
]]

local SPEC = {
  ["--apiv3-key-file"] = "value", ["--resource"] = "value",
  ["--notification"] = "value", ["--json"] = "flag",
}

local ALGS = { AEAD_AES_256_GCM = true, AEAD_SM4_GCM = true }

local function main(args)
  local o = common.parse(args, SPEC)
  if not o["--apiv3-key-file"] then
    common.usage_error("--apiv3-key-file is required")
  end
  if (o["--resource"] == nil) == (o["--notification"] == nil) then
    common.usage_error("give one of --resource FILE, --notification FILE")
  end
  local out = common.output(o["--json"])
  local key = common.read_secret(o["--apiv3-key-file"], "--apiv3-key-file")
  local path = o["--resource"] or o["--notification"]
  local doc = json.decode(common.read(path, "input"))
  if type(doc) ~= "table" then
    common.usage_error("%s is not a JSON object", path)
  end
  local r = o["--notification"] and doc.resource or doc
  if o["--notification"] and type(r) ~= "table" then
    out:fail("malformed", "the notification has no resource object", nil,
             "pass the callback body as received")
    return 1
  end
  if r.encrypt_certificate then r = r.encrypt_certificate end

  -- the key
  local cause, fix = common.apiv3_key_problem(key)
  if cause then
    out:fail("apiv3_key_length", cause, nil, fix)
    return 1
  end

  -- the resource
  local alg = r.algorithm
  if not ALGS[alg] then
    out:fail("unknown_algorithm", "algorithm " .. tostring(alg) .. " is not "
             .. "AEAD_AES_256_GCM or AEAD_SM4_GCM", nil,
             "pass the resource object from a v3 notification (APIv2's "
             .. "req_info uses AES-256-ECB with the MD5 of the APIv2 key)")
    return 1
  end
  if type(r.nonce) ~= "string" or r.nonce == "" or #r.nonce > 128 then
    out:fail("malformed", "the nonce is missing or longer than 128 bytes",
             nil, "pass the resource as received")
    return 1
  end
  if type(r.ciphertext) ~= "string" then
    out:fail("malformed", "no ciphertext", nil, "pass the resource as "
             .. "received")
    return 1
  end
  local ct = crypto.base64_decode(r.ciphertext)
  if not ct then
    out:fail("malformed", "the ciphertext is not valid base64 (line "
             .. "breaks, spaces, URL-safe characters?)", nil,
             "pass the ciphertext exactly as received")
    return 1
  end
  if #ct < 16 then
    out:fail("truncated", "the ciphertext is " .. #ct .. " bytes, shorter "
             .. "than its 16-byte tag", nil, "pass it whole")
    return 1
  end
  local aad = r.associated_data
  if aad == json.null or aad == nil then aad = "" end
  local k = alg == "AEAD_SM4_GCM" and crypto.sm4_key(key) or key
  local plain, err = crypto.aead_decrypt(alg, k, r.nonce, tostring(aad), ct)
  if not plain then
    if err.kind == "decrypt_failed" then
      out:fail("tag_mismatch", "the authentication tag does not match",
               "wrong APIv3 key — the APIv2 key is also 32 characters, "
               .. "check which one you copied — or an altered ciphertext, "
               .. "nonce or associated_data (" .. #r.nonce .. "-byte nonce, "
               .. "associated_data \"" .. tostring(aad) .. "\")",
               "set the current APIv3 key (merchant platform, API security);"
               .. " after a change the old key decrypts what was already "
               .. "sent for a day (previous_apiv3_keys)")
    else
      out:fail(err.kind, tostring(err.message), nil, nil)
    end
    return 1
  end
  if out.json then
    out:result{ status = "ok", kind = "plaintext", cause = "decrypted "
                .. #plain .. " bytes with " .. alg, plaintext = plain }
  else
    io.stdout:write(plain, plain:sub(-1) == "\n" and "" or "\n")
  end
  return 0
end

return common.run("decrypt", usage, main, { ... })
