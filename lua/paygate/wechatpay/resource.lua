-- paygate.wechatpay.resource: the encrypted resource WeChat Pay puts in
-- notifications and in /v3/certificates:
--   { algorithm = "AEAD_AES_256_GCM" | "AEAD_SM4_GCM", nonce = "...",
--     associated_data = "...", ciphertext = base64(ct .. tag16) }
-- One implementation of both directions: the client decrypts with it
-- (notify.lua, certs.lua), the simulator encrypts with it.
--
-- Keys: the APIv3 key (32 ASCII characters) is the AES-256 key as it is;
-- for AEAD_SM4_GCM the key is the first 16 bytes of SM3(APIv3 key). The
-- nonce's bytes are the GCM IV (WeChat Pay sends 12 characters; crypto
-- takes 1 to 128), associated_data the AAD.
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local errors = require "paygate.wechatpay.errors"

local type, tostring, ipairs, error = type, tostring, ipairs, error
local printable = errors.printable

local _M = {}

-- A field's value for a message: a string shown (printable, bounded),
-- anything else by its JSON type (never a Lua "table: 0x..." address)
local JSON_TYPE = { table = "an object or array", number = "a number",
                    boolean = "a boolean" }
function _M.shown(v, max)
  if type(v) == "string" then return printable(v, max) end
  if v == nil or v == json.null then return "(none)" end
  return "(" .. (JSON_TYPE[type(v)] or type(v)) .. ")"
end

_M.AES = "AEAD_AES_256_GCM"
_M.SM4 = "AEAD_SM4_GCM"

-- SM4 keys derived from APIv3 keys: one SM3 per key and process. The
-- derived key is as secret as the APIv3 key; it stays in this table.
local sm4_keys = {}

--- syntax: key = resource.key(algorithm, apiv3_key)
-- returns: the AEAD key for algorithm (the APIv3 key, or its SM4 key).
function _M.key(alg, apiv3_key)
  if alg ~= _M.SM4 then return apiv3_key end
  local k = sm4_keys[apiv3_key]
  if not k then
    k = crypto.sm4_key(apiv3_key)
    sm4_keys[apiv3_key] = k
  end
  return k
end

--- syntax: r, err = resource.encrypt(apiv3_key, plaintext, aad[, opts])
-- opts: algorithm (default AEAD_AES_256_GCM), nonce (default 12 random
-- [0-9A-Za-z]), original_type (copied into r when given).
-- returns: { algorithm, ciphertext, associated_data, nonce
-- [, original_type] }, or nil, err (crypto's: bad_key, bad_nonce, ...).
function _M.encrypt(apiv3_key, plaintext, aad, opts)
  if type(apiv3_key) ~= "string" then
    error("resource.encrypt: apiv3_key must be a string", 2)
  end
  if type(plaintext) ~= "string" then
    error("resource.encrypt: plaintext must be a string", 2)
  end
  opts = opts or {}
  local alg = opts.algorithm or _M.AES
  if alg ~= _M.AES and alg ~= _M.SM4 then
    error("resource.encrypt: algorithm must be " .. _M.AES .. " or "
          .. _M.SM4, 2)
  end
  local nonce = opts.nonce or crypto.random_nonce(12)
  aad = aad or ""
  local ct, err = crypto.aead_encrypt(alg, _M.key(alg, apiv3_key), nonce,
                                      aad, plaintext)
  if not ct then return nil, err end
  return { original_type = opts.original_type, algorithm = alg,
           ciphertext = crypto.base64_encode(ct), associated_data = aad,
           nonce = nonce }
end

--- syntax: plain, err = resource.decrypt(r, apiv3_keys[, names])
-- r: the resource table as received (hostile); apiv3_keys: an array of
-- APIv3 keys, tried in order (the current one first, then previous ones).
-- names: how the keys' owner names them, for the wrong-key message
-- ({ apiv3_key, previous_apiv3_keys }: a client's key_names, as
-- paygate.wechatpay.config checks it; default the client's own keys;
-- previous_apiv3_keys false: the owner has none to name).
-- returns: the plaintext, nil and the position in apiv3_keys of the key
-- that decrypted it (1: the current one; more: a previous one, which
-- paygate.wechatpay.rotation tells of), or nil, err (malformed,
-- decrypt_failed).
function _M.decrypt(r, apiv3_keys, names)
  if type(r) ~= "table" then
    return nil, core.error("malformed", "encrypted resource is not an object")
  end
  local alg, nonce, aad, ct64 = r.algorithm, r.nonce, r.associated_data,
                                r.ciphertext
  if alg ~= _M.AES and alg ~= _M.SM4 then
    return nil, core.error("malformed", "unknown algorithm "
                           .. _M.shown(alg, 40))
  end
  if type(nonce) ~= "string" or nonce == "" or #nonce > 128 then
    local why = "missing"
    if type(nonce) == "string" then
      if nonce ~= "" then why = "longer than 128 bytes" end
    elseif nonce ~= nil and nonce ~= json.null then
      why = "is not a string " .. _M.shown(nonce)
    end
    return nil, core.error("malformed", "resource nonce " .. why)
  end
  if aad == nil or aad == json.null then aad = "" end
  if type(aad) ~= "string" then
    return nil, core.error("malformed", "associated_data is not a string")
  end
  if type(ct64) ~= "string" then
    return nil, core.error("malformed", "ciphertext is not a string")
  end
  local ct = crypto.base64_decode(ct64)
  if not ct then
    return nil, core.error("malformed", "ciphertext is not valid base64")
  end
  if #ct < 16 then
    return nil, core.error("decrypt_failed", "ciphertext shorter than its "
                           .. "16-byte tag: truncated")
  end
  local last
  for i, k in ipairs(apiv3_keys) do
    local plain, err = crypto.aead_decrypt(alg, _M.key(alg, k), nonce, aad,
                                           ct)
    if plain then return plain, nil, i end
    last = err
    if err.kind ~= "decrypt_failed" then break end
  end
  if last == nil or last.kind == "decrypt_failed" then
    local prev = names and names.previous_apiv3_keys
    if prev == nil then prev = "previous_apiv3_keys" end
    return nil, core.error("decrypt_failed", "cannot decrypt the resource: "
      .. "wrong APIv3 key (" .. (names and names.apiv3_key or "apiv3_key")
      .. (prev and ", " .. prev or "")
      .. ") or altered ciphertext, nonce or associated_data")
  end
  return nil, core.error("decrypt_failed", "cannot decrypt the resource: "
                         .. tostring(last))
end

return _M
