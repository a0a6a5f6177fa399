-- paygate decrypt: decrypts a notification's resource (or any
-- encrypt_certificate / resource object) with the APIv3 key and prints
-- the plaintext; a failure names the cause.
local common = require "paygate.cli.common"
local resource = require "paygate.wechatpay.resource"
local json = require "cjson.safe"

local type, tostring = type, tostring

local usage = [[
usage: paygate decrypt --apiv3-key-file FILE (--resource FILE |
                       --notification FILE) [--json]

Decrypts a WeChat Pay resource { algorithm, nonce, associated_data,
ciphertext } (AEAD_AES_256_GCM, or AEAD_SM4_GCM) with the APIv3 key and
prints the plaintext. --notification takes a whole callback body and
decrypts its "resource". The nonce is used as given, whatever its length.
The key file is read as the gateway reads apiv3_key_file: the whitespace
around the key (its trailing newline) is dropped. When it fails, the
cause is named: a key that is not 32 bytes (a hex or base64 encoding of
one), a tag that does not match
(the wrong key, e.g. the APIv2 key, or an altered ciphertext), an
associated_data or algorithm changed on the way (the key decrypts the
resource with the one WeChat used), an unknown algorithm.

  --json   one JSON object per line instead of text. Decrypted: status
           "ok", kind "plaintext", cause, and plaintext (a JSON string;
           bytes that are not UTF-8 become U+FFFD: for the raw bytes
           leave --json out). Not decrypted: status "fail", kind
           (apiv3_key_length, tag_mismatch, associated_data,
           algorithm, unknown_algorithm, malformed, truncated), cause,
           detail, fix.

exit: 0 decrypted, 1 not decrypted (the cause printed), 2 usage or
unreadable input.
]]

local SPEC = {
  ["--apiv3-key-file"] = "value", ["--resource"] = "value",
  ["--notification"] = "value", ["--json"] = "flag",
}

local function main(args)
  local o = common.parse_options(args, SPEC)
  if not o["--apiv3-key-file"] then
    common.usage_error("--apiv3-key-file is required")
  end
  if (o["--resource"] == nil) == (o["--notification"] == nil) then
    common.usage_error("give one of --resource FILE, --notification FILE")
  end
  local out = common.output(o["--json"])
  local key = common.read_apiv3_key_file(o["--apiv3-key-file"],
                                          "--apiv3-key-file")
  out:secret(key)
  local path = o["--resource"] or o["--notification"]
  local doc = json.decode(common.read(path, "input"))
  if type(doc) ~= "table" then
    common.usage_error("%s is not a JSON object", path)
  end
  local r = doc
  if o["--notification"] then
    r = doc.resource
    if type(r) ~= "table" then
      out:fail("malformed", "the notification has no resource object",
               doc.algorithm and "it looks like a resource itself: use "
               .. "--resource" or nil, doc.algorithm and "paygate decrypt "
               .. "--resource " .. path or "pass the callback body as "
               .. "received")
      return 1
    end
  elseif r.algorithm == nil and type(r.resource) == "table" then
    out:fail("malformed", "this is a whole notification, not a resource",
             "its encrypted part is the \"resource\" member",
             "paygate decrypt --notification " .. path)
    return 1
  end
  if type(r.encrypt_certificate) == "table" then r = r.encrypt_certificate end

  -- the key
  local cause, fix = common.apiv3_key_problem(key)
  if cause then
    out:fail("apiv3_key_length", cause, nil, fix)
    return 1
  end

  -- the resource, decrypted as the client does
  local alg = r.algorithm
  local plain, err = resource.decrypt(r, { key })
  if not plain then
    if alg == nil then
      -- not a resource at all: no algorithm to name
      out:fail("malformed", "the object has no algorithm: it is not a "
               .. "resource { algorithm, nonce, associated_data, "
               .. "ciphertext }", type(r.data) == "table" and "it looks "
               .. "like a /v3/certificates answer: each of its data[i] "
               .. "holds one in encrypt_certificate" or nil,
               "pass a notification's resource, or an encrypt_certificate"
               .. " of /v3/certificates (or the whole callback body with "
               .. "--notification)")
    elseif alg ~= resource.AES and alg ~= resource.SM4 then
      out:fail("unknown_algorithm", "algorithm " .. resource.shown(alg, 40)
               .. " is not "
               .. resource.AES .. " or " .. resource.SM4, nil,
               "pass the resource object from a v3 notification (APIv2's "
               .. "req_info uses AES-256-ECB with the MD5 of the APIv2 key)")
    elseif err.kind == "malformed" then
      out:fail("malformed", tostring(err.message), nil,
               "pass the resource exactly as received")
    elseif tostring(err.message):find("truncated", 1, true) then
      out:fail("truncated", tostring(err.message), nil, "pass it whole")
    elseif not tostring(err.message):find("wrong APIv3 key", 1, true) then
      out:fail(err.kind, tostring(err.message), nil,
               "pass the resource exactly as received")
    else
      local aad = r.associated_data
      if aad == json.null or aad == nil then aad = "" end
      -- the key is right when it decrypts the resource under another
      -- associated_data (the ones WeChat uses) or the other algorithm:
      -- the resource was altered on the way, not the key
      local function with(alg2, aad2)
        local t = {}
        for k, v in pairs(r) do t[k] = v end
        t.algorithm, t.associated_data = alg2, aad2
        return resource.decrypt(t, { key }) ~= nil
      end
      local other = alg == resource.AES and resource.SM4 or resource.AES
      local tried, seen = {}, { [aad] = true }
      for _, a in ipairs({ r.original_type, "transaction", "refund",
                           "certificate", "" }) do
        if type(a) == "string" and not seen[a] then
          seen[a] = true
          tried[#tried + 1] = a
        end
      end
      for _, a in ipairs(tried) do
        if with(alg, a) then
          out:fail("associated_data", (r.associated_data == nil
                   and "associated_data is missing" or "associated_data "
                   .. "is \"" .. tostring(aad):sub(1, 80) .. "\"")
                   .. ", but the resource "
                   .. "was encrypted with \"" .. a .. "\"",
                   "the APIv3 key is right: associated_data is "
                   .. "authenticated with the ciphertext, and was changed "
                   .. "after WeChat sent it (payments: \"transaction\", "
                   .. "refunds: \"refund\", certificates: \"certificate\")",
                   "pass the resource exactly as received")
          return 1
        end
      end
      if with(other, aad) then
        out:fail("algorithm", "algorithm is " .. alg .. ", but the "
                 .. "resource was encrypted with " .. other, "the APIv3 "
                 .. "key is right: the algorithm field was changed after "
                 .. "WeChat sent it", "pass the resource exactly as "
                 .. "received")
        return 1
      end
      out:fail("tag_mismatch", "the authentication tag does not match",
               "wrong APIv3 key — the APIv2 key is also 32 characters, "
               .. "check which one you copied — or an altered ciphertext, "
               .. "nonce or associated_data (" .. #r.nonce .. "-byte nonce, "
               .. "associated_data \"" .. tostring(aad):sub(1, 80) .. "\")",
               -- (the key came through this command's option: named so,
               -- not as a config names its keys -- the client's
               -- key_names, the gateway's files -- which decrypt never saw)
               "give --apiv3-key-file the file of the APIv3 key set in the "
               .. "merchant platform (API security); a notification "
               .. "encrypted before that key was changed decrypts only with "
               .. "the old one: give --apiv3-key-file the old key's file "
               .. "(and keep the old key configured as a previous APIv3 key "
               .. "while such notifications may still arrive)")
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
