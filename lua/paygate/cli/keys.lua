-- paygate.cli.keys: loads the certificates and keys the diagnostic
-- commands are given (files or directories of PEM) and tells which is
-- which: the merchant's own API certificate, a WeChat Pay platform
-- certificate, a CA, the WeChat Pay public key.
local crypto = require "paygate.crypto"
local x509 = require "paygate.x509"
local common = require "paygate.cli.common"

local ipairs, pcall, type = ipairs, pcall, type

local _M = {}

--- syntax: role = keys.role(cert)
-- "CA" (a CA certificate), "merchant" (subject CN = a merchant id, as
-- WeChat issues apiclient_cert.pem), "platform" (WeChat's: subject
-- O=Tenpay.com, CN=Tenpay.com sign), "other" (anything else: a TLS
-- server certificate, a platform certificate made by hand). A CA:TRUE
-- certificate whose CN is wholly a merchant id is "merchant": a test
-- merchant's certificate made with `openssl req -x509` is flagged CA:TRUE
-- by its default config, and no CA is named by a merchant id.
function _M.role(cert)
  local subject = cert:subject()
  if cert:is_ca() then
    -- (the subject is RFC 2253 text, ", " between its parts; a comma in
    -- a value is escaped)
    return ((", " .. subject .. ","):find(", CN=%d+,") and "merchant"
            or "CA")
  end
  if subject:match("CN ?= ?%d+%f[^%d]") then return "merchant" end
  if subject:find("Tenpay.com", 1, true) then return "platform" end
  return "other"
end

-- The PEM labels of what load reads: a file whose blocks are of these
-- and none loads is broken, not a file without keys.
local LABELS = {
  ["CERTIFICATE"] = true, ["PUBLIC KEY"] = true, ["RSA PUBLIC KEY"] = true,
  ["PRIVATE KEY"] = true, ["RSA PRIVATE KEY"] = true,
  ["EC PRIVATE KEY"] = true,
}
local function loadable_label(data)
  for label in data:gmatch("%-%-%-%-%-BEGIN ([%u%d ]+)%-%-%-%-%-") do
    if LABELS[label] then return true end
  end
  return false
end

-- the fix for a key (or a certificate's key) of a type WeChat Pay does
-- not use: the file is whole, re-copying it changes nothing
_M.UNSUPPORTED_FIX = "use the key or certificate WeChat Pay issued: "
  .. "apiclient_key.pem, the platform certificate or pub_key.pem are RSA "
  .. "(SM2 in the SM variant)"

--- syntax: list = keys.load(path[, id[, option]])
-- Every PEM object in the file (or each file of the directory):
-- { kind = "certificate" | "public_key" | "private_key", cert | key,
--   file, id }, and { kind = "encrypted_private_key", form, file } for a
-- private key under a passphrase (no key: paygate does not decrypt it,
-- and the caller must say so rather than skip the file as no key), and
-- { kind = "unreadable", file, why, unsupported } for a file that holds a
-- PEM block of which nothing loads (cut short, a damaged body: why is the
-- loader's reason, which names it; unsupported: true for a whole key of
-- a type WeChat Pay does not use, EC say), so that no caller passes it
-- over as a file
-- without keys. A public key's id is `id`, or else the file name when it
-- is PUB_KEY_ID_... (a --keyring directory names them so). Raises a usage
-- error for a path that cannot be read (naming option, the command-line
-- option that gave it); skips what is not a key.
function _M.load(path, id, option)
  local files, why = common.files(path)
  if not files then
    common.input_error("cannot read %s%s: %s", option and (option .. " ")
                       or "", common.shown(path), why)
  end
  local out = {}
  for _, file in ipairs(files) do
    local data = common.read(file, "file")
    local found = false
    local lerr              -- the first loader's reason, when none loads
    if data:find("BEGIN CERTIFICATE", 1, true) then
      local chain, cerr = x509.chain(data)
      lerr = lerr or cerr
      for _, cert in ipairs(chain or {}) do
        out[#out + 1] = { kind = "certificate", cert = cert, file = file,
                          id = cert:serial() }
        found = true
      end
    end
    if not found and (data:find("BEGIN PUBLIC KEY", 1, true)
                      or data:find("BEGIN RSA PUBLIC KEY", 1, true)) then
      local key, kerr = crypto.public_key(data)
      lerr = lerr or kerr
      if key then
        local name = file:match("([^/]+)$"):gsub("%.[%w]+$", "")
        out[#out + 1] = { kind = "public_key", key = key, file = file,
          id = id or (name:match("^PUB_KEY_ID_%w+$") and name) }
        found = true
      end
    end
    local encrypted = not found and common.encrypted_key_form(data)
    if encrypted then
      -- told apart before any load is tried: nothing asks for a passphrase
      out[#out + 1] = { kind = "encrypted_private_key", form = encrypted,
                        file = file }
      found = true
    end
    if not found and data:find("PRIVATE KEY", 1, true) then
      local ok, key, kerr = pcall(crypto.private_key, data)
      if ok and key then
        out[#out + 1] = { kind = "private_key", key = key, file = file }
        found = true
      else
        lerr = lerr or (ok and kerr or nil)
      end
    end
    if not found and #files == 1 then
      -- DER, or something else: try the loaders in turn
      local cert = x509.load(data)
      if cert then
        out[#out + 1] = { kind = "certificate", cert = cert, file = file,
                          id = cert:serial() }
        found = true
      else
        local key = crypto.public_key(data)
        if key then
          out[#out + 1] = { kind = "public_key", key = key, file = file,
                            id = id }
          found = true
        end
      end
    end
    if not found and loadable_label(data) then
      -- a block of a kind read here that does not load: said, never
      -- skipped as no key (the loaders' messages name the cause, never
      -- the file's bytes); other blocks (a CSR, a CRL) pass over
      local ltype = type(lerr) == "table" and lerr.kind
      lerr = type(lerr) == "table" and lerr.message or lerr
      out[#out + 1] = { kind = "unreadable", file = file,
        unsupported = ltype == "unsupported_key_type" or nil,
        why = type(lerr) == "string" and lerr:gsub("^load [%w ]+: ", "")
              or "its PEM block does not load" }
    end
  end
  return out
end

return _M
