-- paygate certs: lists the certificates and keys in files or directories
-- (serial, subject, issuer, validity and days left, key type and bits, and
-- which is which); with --download, fetches WeChat Pay's platform
-- certificates through paygate.wechatpay, verifies and writes them.
local common = require "paygate.cli.common"
local keys = require "paygate.cli.keys"
local core = require "paygate.core"

local tostring, ipairs = tostring, ipairs

local usage = [[
usage: paygate certs PATH... [--json]
       paygate certs --download BASE_URL --mchid ID --key KEY.pem
                     --serial SERIAL --apiv3-key-file FILE --out DIR
                     [--ca-file PEM] [--json]

Lists the certificates and keys in the files and directories given: for
a certificate its serial (the form Wechatpay-Serial carries), subject,
issuer, validity and days left, key type and bits, and its role: merchant
(apiclient_cert.pem, CN = the merchant id), platform (WeChat's,
CN=Tenpay.com sign, which verifies answers), CA, other; public keys (the WeChat Pay public key) and
private keys with their type, bits and fingerprint. A certificate that
has expired fails; one expiring within 30 days warns.

--download fetches /v3/certificates from BASE_URL (https://api.mch.
weixin.qq.com, or the simulator), signed with the merchant key; the
certificates are decrypted with the APIv3 key, their serials checked and
the answer's signature verified (paygate.wechatpay does all of it), then
each is written to DIR/SERIAL.pem and listed. An SM2 key is an SM
merchant's: the request is signed WECHATPAY2-SM2-WITH-SM3 and asks for
the SM2 certificates (?algorithm_type=SM2, decrypted with SM4-GCM).

--json prints one JSON object per result line instead of text (status,
kind, cause, detail, fix and the result's own fields), for scripts. A
certificate's expired is true once past its end; days_left is its whole
days left (0 once expired), expired_days_ago the whole days since then.
A key has expired false and no days_left.

A private key under a passphrase (ENCRYPTED PRIVATE KEY, or Proc-Type:
4,ENCRYPTED) fails when named itself, and is a warning when found in a
directory: paygate reads private keys unencrypted only; the fix line
gives the openssl command that decrypts it.

A file holding a certificate or key block that does not load (cut short,
damaged) fails, naming why, whether named itself or found in a
directory.

exit: 0 all valid, 1 a certificate expired, a file's certificate or key
does not load, a private key named is encrypted or a download failed, 2
usage or unreadable input.
]]

local SPEC = {
  ["--json"] = "flag", ["--download"] = "value", ["--mchid"] = "value",
  ["--key"] = "value", ["--serial"] = "value",
  ["--apiv3-key-file"] = "value", ["--out"] = "value",
  ["--ca-file"] = "value",
}

local DAY = 86400
local function date(t) return os.date("!%Y-%m-%d %H:%M UTC", t) end

local function list_cert(out, e, now)
  local c = e.cert
  local role = keys.role(c)
  local left = (c:not_after() - now) / DAY
  local detail = ("subject %s\nissuer  %s\nvalid   %s to %s (%s)\nkey     "
    .. "%s-%d, file %s"):format(c:subject(), c:issuer(), date(c:not_before()),
    date(c:not_after()), left >= 0 and common.days(left * DAY) .. " left"
    or "expired " .. common.days(left * DAY) .. " ago", c:key_type(),
    c:key_bits(),
    e.file)
  if role == "merchant" and c:is_ca() then
    -- keys.role names it by its subject; the flag is said, and that it
    -- changes nothing (paygate and the simulator use only the serial and
    -- the key), so that no one takes it for a CA or reissues it for that
    detail = detail .. "\nnote    " .. (c:subject() == c:issuer()
      and "self-signed and flagged" or "flagged") .. " CA:TRUE (`openssl "
      .. "req -x509` flags it so by default), which changes nothing: only "
      .. "its serial and key are used" .. (c:subject() == c:issuer()
      and ". WeChat's apiclient_cert.pem is issued by WeChat's CA: a "
          .. "self-signed one is a test merchant's, for the simulator"
      or "")
  end
  local name = role == "other" and "" or role .. " "
  local r = { kind = role == "CA" and "ca" or role == "other"
                     and "certificate" or role .. "_certificate",
              cause = name .. "certificate " .. c:serial(), detail = detail,
              serial = c:serial(), subject = c:subject(),
              issuer = c:issuer(), not_before = c:not_before(),
              not_after = c:not_after(),
              -- whole days, rounded down as the text says them: left,
              -- 0 once expired (and since when, apart)
              expired = left < 0, days_left = math.max(0, math.floor(left)),
              expired_days_ago = left < 0 and math.floor(-left) or nil,
              key_type = c:key_type(), key_bits = c:key_bits(),
              role = role, file = e.file }
  if c:not_before() > now then
    r.status = "fail"
    r.cause = r.cause .. " is not valid yet"
    r.fix = "check the clock; a rotated certificate is used from its start"
  elseif left < 0 then
    r.status = "fail"
    r.cause = r.cause .. " has expired"
    r.fix = role == "platform" and "download the current ones: paygate "
            .. "certs --download" or role == "merchant" and "renew the API "
            .. "certificate in the merchant platform (API security)" or
            "replace it; for a TLS server, install a current certificate"
  elseif left < 30 then
    r.status = "warn"
    r.cause = r.cause .. " expires in " .. common.days(left * DAY)
    r.fix = role == "merchant" and "renew the API certificate in the "
            .. "merchant platform" or role == "CA" and "replace the CA "
            .. "certificate before then" or "download the new platform "
            .. "certificate before then (paygate.wechatpay refreshes them)"
  else
    r.status = "ok"
  end
  out:result(r)
end

local function list_key(out, e)
  local k = e.key
  local what = e.kind == "public_key" and "public key" or "private key"
  out:result{ status = "ok", kind = e.kind, cause = what .. " "
              .. (e.id or "") .. (e.id and " " or "") .. "(" .. k:type()
              .. "-" .. k:bits() .. ")", detail = "SHA256:"
              .. k:fingerprint() .. ", file " .. e.file,
              -- a key does not expire: no days_left
              id = e.id, expired = false, key_type = k:type(),
              key_bits = k:bits(),
              fingerprint = k:fingerprint(), file = e.file,
              role = e.kind == "public_key" and "public key" or
                     "merchant private key" }
end

-- A private key under a passphrase: listed as a failure (paygate cannot
-- use it) with the command that decrypts it. Only the file and the PEM
-- form are told, never a byte of the key.
local FORMS = {
  ["PKCS#8"] = "PEM ENCRYPTED PRIVATE KEY (PKCS#8 with a passphrase)",
  traditional = "PEM PRIVATE KEY with Proc-Type: 4,ENCRYPTED (the older"
    .. " OpenSSL form with a passphrase)",
}

local function list_encrypted(out, e, in_dir)
  local file = common.shown(e.file)
  -- the fix is a command to paste: a path with a space or a quote in it
  -- is given single-quoted
  local quoted = file
  if quoted:find("[^%w%._/%-+,=@]") then
    quoted = "'" .. quoted:gsub("'", "'\\''") .. "'"
  end
  -- named itself, it is a failure; found in a directory listed for its
  -- certificates (a check run by cron on the expiry exit code), a warning
  -- beside them: an encrypted backup there must not fail every run
  out:result{ status = in_dir and "warn" or "fail", kind = "private_key",
              cause = "private key " .. file .. " is encrypted: paygate"
                .. " reads private keys unencrypted only",
              detail = FORMS[e.form] .. ", file " .. file,
              -- (umask first: the decrypted key is never readable by
              -- others, not even until a chmod)
              fix = "decrypt it (openssl asks for the passphrase): (umask"
                .. " 077; openssl pkey -in " .. quoted .. " -out key.pem)"
                .. " and use key.pem (WeChat's apiclient_key.pem is"
                .. " unencrypted as downloaded)",
              encrypted = true, form = e.form, expired = false,
              role = "merchant private key", file = e.file }
end

-- A 401 SIGN_ERROR's fix, after what WeChat blamed (common.sign_error_blame)
local function sign_error_fix(err, schema)
  local blame, expected = common.sign_error_blame(err)
  if blame == "scheme" then
    -- the variant follows --key: an SM2 key signs WECHATPAY2-SM2-WITH-SM3
    return (expected and ("WeChat expects " .. expected .. " requests, "
      .. "and ") or "WeChat refused the signature type: ") .. "--key (an "
      .. (schema == "WECHATPAY2-SM2-WITH-SM3" and "SM2" or "RSA") .. " key) "
      .. "signs " .. schema .. ": give the key and serial of the "
      .. "variant the merchant signed up for (RSA for "
      .. "WECHATPAY2-SHA256-RSA2048, SM2 for WECHATPAY2-SM2-WITH-SM3)"
  elseif blame == "mchid" then
    return "WeChat does not know this merchant id: check --mchid (the CN "
      .. "of apiclient_cert.pem's subject: paygate certs apiclient_cert.pem)"
  elseif blame == "serial" then
    return "check --serial: the serial of the API certificate WeChat holds "
      .. "for this mchid (paygate certs apiclient_cert.pem prints it)"
  elseif blame == "timestamp" then
    return "sync this host's clock (NTP): WeChat refuses a timestamp 5 "
      .. "minutes off"
  elseif blame == "signature" then
    return "--key is not the key of the certificate --serial names: use "
      .. "apiclient_key.pem and apiclient_cert.pem's serial from the same "
      .. "download (paygate doctor checks the pair)"
  end
  return "check --mchid, and --serial against the merchant certificate and "
    .. "the key pair (paygate doctor)"
end

local function download(o, out)
  for _, k in ipairs({ "--mchid", "--key", "--serial", "--apiv3-key-file",
                       "--out" }) do
    if not o[k] then
      common.usage_error("--download needs %s", k)
    end
  end
  local apiv3 = common.read_apiv3_key_file(o["--apiv3-key-file"],
                                          "--apiv3-key-file")
  -- a key that does not load is unusable input (exit 2), named here:
  -- the client would say "cannot load the private key" of no file
  local key, keypem = common.private_key_file(o["--key"], "--key")
  out:secret(apiv3)
  out:secret(keypem)
  -- named by the option given and by what the key is (hex, base64, a PEM
  -- file...), as paygate decrypt names it: the client's own check would
  -- name its config key, wechatpay.apiv3_key, which the user never wrote
  local cause, fix = common.apiv3_key_problem(apiv3)
  if cause then
    out:fail("apiv3_key_length", "--apiv3-key-file: " .. cause, nil, fix)
    return 1
  end
  local wechatpay = require "paygate.wechatpay"
  local sign = require "paygate.wechatpay.sign"
  -- the variant is the key's: an SM2 key is an SM merchant's (its
  -- requests signed WECHATPAY2-SM2-WITH-SM3, ?algorithm_type=SM2, the
  -- certificates in AEAD_SM4_GCM); another type is RSA's, refused by
  -- the client as such when it is not RSA
  local schema = key:type() == "SM2" and sign.SM2 or sign.RSA
  local wx, err = wechatpay.client{
    sign_type = schema,
    mchid = o["--mchid"], merchant_private_key = keypem,
    merchant_serial = o["--serial"], apiv3_key = apiv3,
    base_url = o["--download"], backup_url = false,
    ca_file = o["--ca-file"], timeout = 10, deadline = 20,
    -- one download, the one below: none at start, none in the background
    -- (a failure is this command's answer, not a retry logged after it)
    download_certificates = "manual",
    -- a wrong APIv3 key is named by this command's option (the client's
    -- own names, apiv3_key and previous_apiv3_keys, were never given)
    key_names = { apiv3_key = "--apiv3-key-file",
                  previous_apiv3_keys = false },
  }
  if not wx then
    out:fail("download", tostring(err.message), nil,
             err.key == "apiv3_key" and "check with: paygate decrypt" or nil)
    return 1
  end
  local n
  -- (the client's info line per certificate added would repeat, as a JSON
  -- log line, the listing this command prints: warnings only)
  local level = core.log_level(2)
  n, err = wx:refresh_certificates()
  core.log_level(level)
  if not n and err then
    wx:stop()
    out:fail("download", "/v3/certificates failed: " .. tostring(err),
             err.request_id and "request id " .. err.request_id,
             err.kind == "decrypt_failed" and "the APIv3 key is wrong "
             .. "(paygate decrypt names why)" or err.kind == "sign_error"
             and sign_error_fix(err, schema) or nil)
    return 1
  end
  local made, merr = core.mkdir_p(o["--out"])
  if not made then
    wx:stop()
    common.input_error("--out: %s", merr.message)
  end
  local written = 0
  local now = core.time()
  for serial, cert in pairs(wx.certs) do
    local path = o["--out"] .. "/" .. serial .. ".pem"
    local wok, werr = core.write_file(path, cert:pem(), 420)   -- 0644
    if not wok then
      wx:stop()
      common.input_error("cannot write %s (%s)", path, tostring(werr))
    end
    written = written + 1
    list_cert(out, { cert = cert, file = path }, now)
  end
  wx:stop()
  if written == 0 then
    out:fail("download", "no platform certificate downloaded", nil,
             "the merchant may use the WeChat Pay public key only")
    return 1
  end
  return out:code()
end

local function main(args)
  local o, paths = common.parse(args, SPEC)
  local out = common.output(o["--json"])
  if o["--download"] then return download(o, out) end
  if #paths == 0 then
    common.usage_error("give files or directories")
  end
  local now = core.time()
  local n = 0
  for _, p in ipairs(paths) do
    for _, e in ipairs(keys.load(p)) do
      n = n + 1
      if e.kind == "certificate" then list_cert(out, e, now)
      elseif e.kind == "unreadable" then
        -- a certificate or key cut short: a failure, never passed over
        -- (a directory checked for expiry by cron would miss it)
        out:result{ status = "fail", kind = "unreadable",
                    cause = common.shown(e.file) .. ": " .. e.why,
                    fix = e.unsupported and keys.UNSUPPORTED_FIX
                      or "copy the file whole again (a certificate or key"
                      .. " is a PEM block from its -----BEGIN line to its "
                      .. "-----END line)", file = e.file }
      elseif e.kind == "encrypted_private_key" then
        list_encrypted(out, e, e.file ~= p)
      else list_key(out, e) end
    end
  end
  if n == 0 then
    common.usage_error("no certificate or key found in %s",
                       table.concat(paths, " "))
  end
  return out:code()
end

return common.run("certs", usage, main, { ... })
