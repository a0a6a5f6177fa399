-- paygate sign: the signing string of a WeChat Pay v3 request, every "\n"
-- made visible, and the Authorization header, built by
-- paygate.wechatpay.sign (the one the client uses).
local common = require "paygate.cli.common"
local crypto = require "paygate.crypto"
local sign = require "paygate.wechatpay.sign"

local usage = [[
usage: paygate sign --method M --url PATH_WITH_QUERY [--body FILE]
                    --mchid ID --serial SERIAL --key KEY.pem
                    [--timestamp T --nonce N] [--sm2] [--json]

Prints the string a WeChat Pay v3 request signs (METHOD, URL, TIMESTAMP,
NONCE and BODY, each followed by a newline, shown as \n) and the
Authorization header to send. Compare it byte for byte with what your
code signs. --url is the path and query exactly as sent (no scheme, no
host). --body FILE is the body exactly as sent (no body: GET). Without
--timestamp and --nonce the current time and a random nonce are used.
The variant is the key's, as for paygate certs --download: an SM2 key (an
SM merchant's) signs WECHATPAY2-SM2-WITH-SM3, an RSA key
WECHATPAY2-SHA256-RSA2048. --sm2 is still taken, and with an RSA key is
refused.

--json prints one JSON object per result line instead of text (status,
kind, cause, detail, fix and the result's own fields), for scripts.

exit: 0 signed (warnings allowed), 1 a check failed, 2 usage or unreadable
input.
]]

local SPEC = {
  ["--method"] = "value", ["--url"] = "value", ["--body"] = "value",
  ["--mchid"] = "value", ["--serial"] = "value", ["--key"] = "value",
  ["--timestamp"] = "value", ["--nonce"] = "value", ["--sm2"] = "flag",
  ["--json"] = "flag",
}

local function main(args)
  local o = common.parse_options(args, SPEC)
  for _, k in ipairs({ "--method", "--url", "--mchid", "--serial", "--key" }) do
    if not o[k] then common.usage_error("%s is required", k) end
  end
  local out = common.output(o["--json"])
  local method, url = o["--method"], o["--url"]
  local body = o["--body"] and common.read(o["--body"], "body file") or ""
  local key = common.private_key_file(o["--key"], "--key")
  -- the variant is the key's (an SM2 key is an SM merchant's), as for
  -- paygate certs --download: an SM2 key without --sm2 was refused, with
  -- "add --sm2" as the fix, where the key already said it
  local schema = key:type() == "SM2" and sign.SM2 or sign.RSA
  local ts = o["--timestamp"] or tostring(os.time())
  local nonce = o["--nonce"] or crypto.random_nonce(32)
  local failed = false

  -- a line break would add a line to the signing string, a '"' end the
  -- header's quoted value: neither can be what the merchant's code sends
  if not method:match("^[%a]+$") then
    common.usage_error("--method must be a method name (GET, POST, PUT, "
                       .. "PATCH, DELETE)")
  end
  if nonce == "" or nonce:find('[^\33-\126]') or nonce:find('"', 1, true)
  then
    common.usage_error("--nonce must be printable ASCII without spaces or "
                       .. "'\"' (the SDKs send 32 characters of [0-9A-Za-z])")
  end
  if url:find("[%z\1-\31\127]") then
    common.usage_error("--url holds a line break or another control "
                       .. "character: give the path and query as sent")
  end

  -- the slips that make WeChat answer 401 SIGN_ERROR
  if method ~= method:upper() then
    out:warn("method", "method " .. method .. " is not upper case",
             "WeChat signs and compares the method in upper case",
             "sign and send " .. method:upper())
    method = method:upper()
  end
  if url:match("^%a+://") then
    failed = true
    out:fail("url", "--url holds a scheme and host",
             "the signed URL is the path and query only, e.g. "
             .. "/v3/pay/transactions/jsapi",
             "drop " .. url:match("^%a+://[^/]*"))
  elseif url:sub(1, 1) ~= "/" then
    failed = true
    out:fail("url", "--url does not start with /", nil,
             "sign the absolute path as sent, query included")
  end
  local unsafe = "[^%w%-%._~:/%?#%[%]@!%$&'%(%)%*%+,;=%%]"
  if url:find(unsafe) then
    local encoded = url:gsub(unsafe, function(c)
      return ("%%%02X"):format(c:byte())
    end)
    out:warn("url", "the URL holds characters that are sent percent-"
             .. "encoded", "WeChat verifies the URL as it arrives: sign "
             .. "exactly the encoded form you send",
             "percent-encode the URL (UTF-8) before signing, then sign "
             .. "and send that: " .. encoded)
  end
  if method == "GET" and body ~= "" then
    out:warn("body", "a GET with a body", "GET requests are sent and "
             .. "signed with an empty body", "drop --body")
  end
  if body:sub(1, 3) == "\239\187\191" then
    out:warn("body", "the body starts with a UTF-8 BOM", nil,
             "send and sign the JSON without the BOM")
  end
  if body:sub(-1) == "\n" then
    out:warn("body", "the body file ends with a newline",
             "that newline is part of the signed body: the signing string "
             .. "ends with two; sign exactly the bytes you send",
             "strip the newline from the file if your code does not send it")
  end
  if not o["--serial"]:match("^%x+$") then
    failed = true
    out:fail("serial", "--serial is not hex",
             "it must be the merchant API certificate's serial",
             "openssl x509 -in apiclient_cert.pem -noout -serial")
  end
  if not o["--mchid"]:match("^%d+$") then
    failed = true
    out:fail("mchid", "--mchid is not digits", nil, "use the merchant id")
  end
  if not ts:match("^%d+$") then
    common.usage_error("--timestamp must be epoch seconds")
  end
  -- epoch seconds are 10 digits from 2001 to 2286: WeChat refuses any
  -- other (401 SIGN_ERROR naming the timestamp), whatever the signature
  local unit = ({ [13] = "milliseconds", [16] = "microseconds",
                  [19] = "nanoseconds" })[#ts]
  if unit then
    -- Date.now(), System.currentTimeMillis(), time.Now().UnixNano()
    failed = true
    out:fail("timestamp", "--timestamp " .. ts .. " has " .. #ts
             .. " digits: " .. unit .. ", where WeChat takes epoch seconds",
             "WeChat answers 401 SIGN_ERROR (timestamp) to a timestamp "
             .. "more than 5 minutes from its clock",
             "send and sign epoch seconds (10 digits: "
             .. ts:sub(1, 10) .. "), in the Authorization header's "
             .. "timestamp and the signing string alike")
  elseif #ts ~= 10 or ts:sub(1, 1) == "0" then
    -- an uptime, a counter, a date's digits: no time WeChat's clock is at
    failed = true
    out:fail("timestamp", "--timestamp " .. ts .. " has "
             .. (#ts ~= 10 and #ts .. " digits" or "a leading 0")
             .. ": not epoch seconds, which are 10 digits (now "
             .. os.time() .. ")",
             "WeChat answers 401 SIGN_ERROR (timestamp) to a timestamp "
             .. "more than 5 minutes from its clock",
             "send and sign the current epoch seconds (10 digits), in the "
             .. "Authorization header's timestamp and the signing string "
             .. "alike")
  end
  -- --sm2 (kept for the scripts that pass it) against an RSA key: the
  -- two contradict, and which one is wrong only the user knows
  if o["--sm2"] and schema ~= sign.SM2 then
    out:fail("key", "--sm2 asks for " .. sign.SM2 .. ", which needs an SM2"
             .. " key, and the key is " .. key:type(), nil, "drop --sm2 to"
             .. " sign " .. sign.RSA .. " with this key, or give the SM"
             .. " merchant's SM2 key")
    return 1
  end
  local msg = sign.request_message(method, url, ts, nonce, body)
  local header, err = sign.sign_request({ key = key, schema = schema,
    mchid = o["--mchid"], serial = o["--serial"]:upper() }, method, url,
    body, ts, nonce)
  if not header then
    out:fail("sign", "cannot sign: " .. tostring(err), nil, nil)
    return 1
  end
  if out.json then
    out:result{ status = failed and "fail" or "ok", kind = "signature",
                cause = "signed with " .. schema,
                signing_string = msg, authorization = header }
  else
    out:text("signing string (" .. #msg
             .. " bytes; each \\n is one newline):\n")
    out:text(common.visible(msg))
    out:text("\nAuthorization: " .. header .. "\n")
    out:text("(key " .. key:type() .. "-" .. key:bits() .. ", SHA256:"
             .. key:fingerprint():sub(1, 16) .. "...)\n")
  end
  return failed and 1 or out:code()
end

return common.run("sign", usage, main, { ... })
