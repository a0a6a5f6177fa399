-- paygate verify: checks WeChat Pay's signature on a captured response or
-- notification with paygate.wechatpay.verify (the verifier the client
-- uses) and, when it fails, names the cause by testing the known ones
-- against the inputs.
local common = require "paygate.cli.common"
local keys = require "paygate.cli.keys"
local crypto = require "paygate.crypto"
local keyring = require "paygate.keyring"
local verify = require "paygate.wechatpay.verify"
local wconfig = require "paygate.wechatpay.config"
local json = require "cjson.safe"

local tostring, ipairs, pcall, type = tostring, ipairs, pcall, type
local duration = common.duration

local usage = [[
usage: paygate verify --body FILE (--headers FILE | -H 'Name: value' ...)
                      (--certificate PEM ... | --public-key PEM
                       --public-key-id ID | --keyring DIR) [--at EPOCH]
                      [--sign-type TYPE] [--json]

Verifies WeChat Pay's signature on a captured API response or callback
notification: the Wechatpay-Timestamp (less than 300 s from now, or from
--at), the key Wechatpay-Serial names, and Wechatpay-Signature over
TIMESTAMP\nNONCE\nBODY\n with BODY the raw bytes. When it fails, the
cause is named: a body re-encoded on the way (whitespace, escaped
unicode, a BOM, a final newline, line endings; several at once), a
signature made without the trailing newline, the timestamp outside
the window, a serial not among the keys (a PUB_KEY_ID_ with certificates
only, or the reverse), the merchant's own certificate given in place of
WeChat's, a signature type that does not fit the key (or a message of
the SM2 variant when every key given is RSA, or the reverse), a
WECHATPAY/SIGNTEST/ probe, a captured error answer (unsigned), a
signature whose base64 was damaged (quoted, percent-encoded, + turned
into spaces, wrapped, URL-safe, unpadded). Sorted keys are only
mentioned as a possibility: WeChat's answers often are.

  --body FILE          the body exactly as received (curl -o FILE)
  --headers FILE       `Name: value` lines (curl -D FILE; a request as a
                       server dumps it, from its request line) or a JSON
                       object (values strings, or arrays of one: Go's
                       json.Marshal(r.Header))
  -H 'Name: value'     one header (repeatable)
  --certificate PEM    platform certificate(s) (repeatable; a file may hold
                       several; a directory: each file in it)
  --public-key PEM     the WeChat Pay public key, with --public-key-id
  --keyring DIR        a directory of certificates and PUB_KEY_ID_....pem
                       public keys
  --at EPOCH           judge the timestamp and validity at this time
                       (epoch seconds, 10 digits; milliseconds refused)
  --sign-type TYPE     judge as a client configured for TYPE does (its
                       sign_type: WECHATPAY2-SHA256-RSA2048 or
                       WECHATPAY2-SM2-WITH-SM3): a message whose
                       Wechatpay-Signature-Type (none means
                       WECHATPAY2-SHA256-RSA2048) is not TYPE fails, as
                       paygate.wechatpay refuses it. Without it the type
                       is the message's, else the key's
  --json               one JSON object per result

exit: 0 verified, 1 not verified (the cause printed), 2 usage or
unreadable input.
]]

local SPEC = {
  ["--body"] = "value", ["--headers"] = "value", ["-H"] = "list",
  ["--certificate"] = "list", ["--public-key"] = "value",
  ["--public-key-id"] = "value", ["--keyring"] = "value",
  ["--at"] = "value", ["--sign-type"] = "value", ["--json"] = "flag",
}

-- t when it is a JSON array with at least one element
local function array(t)
  if type(t) ~= "table" or #t == 0 then return nil end
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n == #t and t or nil
end

--- Header files: curl -D output (the last response's block wins: 100
-- Continue and redirects come first), a request as a server dumps it
-- (its request line, its headers; the body after the blank line is
-- not read) or a JSON object (a value may be an array of one: Go's
-- json.Marshal of an http.Header).
local function parse_headers(text, name)
  local h, status = {}, nil
  local first = text:match("^%s*(.)")
  if first == "{" then
    local t = json.decode(text)
    if type(t) ~= "table" then
      common.usage_error("%s is not a JSON object", name)
    end
    for k, v in pairs(t) do
      if type(k) == "string" and array(v) then
        if #v > 1 then
          common.usage_error("%s: header %s has %d values: a header WeChat "
                             .. "sends once was received %d times", name, k,
                             #v, #v)
        end
        v = v[1]
      end
      if type(k) == "string" then
        -- (a header is a string, or a number for a timestamp or status:
        -- null, an array or an object would read "userdata: NULL" or
        -- "table: 0x..." in the diagnosis)
        if type(v) ~= "string" and type(v) ~= "number" then
          common.usage_error("%s: header %s must be a string, not %s",
                             name, k, v == json.null and "null"
                             or type(v) == "table" and "an array or object"
                             or type(v))
        end
        h[k:lower()] = tostring(v)
      end
    end
    return h, tonumber(h[":status"] or h["status"])
  end
  local request, n = false, 0
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do
    n = n + 1
    line = line:gsub("\r$", "")
    if line:match("^HTTP/") then
      h = {}
      status = tonumber(line:match("^HTTP/%S+%s+(%d%d%d)"))
    elseif not next(h) and line:match("^%u+ %S+ HTTP/%d") then
      h, status, request = {}, nil, true     -- a notification as received
    elseif line == "" and request and next(h) then
      break                                  -- its body follows
    elseif line ~= "" then
      local k, v = line:match("^([%w%-_]+):%s*(.-)%s*$")
      if not k then
        -- shown when it reads as a header that lost its colon; a line
        -- without a space may be the APIv3 key or an env file's
        -- NAME=KEY (the wrong file given): not shown. Binary bytes and
        -- control characters are shown as "?"
        if line:find("%S%s+%S") then
          common.usage_error("%s line %d: not a `Name: value` line: %s",
                             name, n, (require("paygate.utf8").clean(line,
                             60)))
        end
        common.usage_error("%s line %d: not a `Name: value` line (%d "
                           .. "bytes without a space, not shown: it may be "
                           .. "a key; is this the headers file?)", name, n,
                           #line)
      end
      h[k:lower()] = v
    end
  end
  return h, status
end

-- The end of the JSON string whose opening quote is at q: the index of
-- its closing quote, or #s when it has none (escapes skipped).
local function string_end(s, q)
  local j = q + 1
  while true do
    local k = s:find('[\\"]', j)
    if not k then return #s end
    if s:byte(k) == 34 then return k end
    j = k + 2                                  -- an escape: two bytes
  end
end

-- Body variants: what a re-encoding did, undone where it can be.
-- (Runs of text are found with string.find, not walked byte by byte: a
-- body of megabytes took seconds and a table of one-byte strings.)
local function minify(s)
  local out, i, n = {}, 1, #s
  while i <= n do
    local q = s:find('"', i, true) or n + 1
    out[#out + 1] = (s:sub(i, q - 1):gsub("%s+", ""))  -- blanks dropped
    if q > n then break end
    local e = string_end(s, q)
    out[#out + 1] = s:sub(q, e)                -- a string as it is
    i = e + 1
  end
  return table.concat(out)
end

local function utf8(cp)
  if cp < 0x80 then return string.char(cp) end
  if cp < 0x800 then
    return string.char(0xC0 + math.floor(cp / 64), 0x80 + cp % 64)
  end
  if cp < 0x10000 then
    return string.char(0xE0 + math.floor(cp / 4096),
                       0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
  end
  return string.char(0xF0 + math.floor(cp / 262144),
                     0x80 + math.floor(cp / 4096) % 64,
                     0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
end

-- \uXXXX (surrogate pairs too) and \/ to the characters themselves; the
-- escapes JSON needs (\", \\, control characters) stay.
local function unescape(s)
  s = s:gsub("\\u([dD][89abAB]%x%x)\\u([dD][c-fC-F]%x%x)", function(hi, lo)
    return utf8(0x10000 + (tonumber(hi, 16) - 0xD800) * 1024
                + (tonumber(lo, 16) - 0xDC00))
  end)
  s = s:gsub("\\u(%x%x%x%x)", function(hex)
    local cp = tonumber(hex, 16)
    if cp < 0x20 or cp == 0x22 or cp == 0x5C then return nil end
    return utf8(cp)
  end)
  return (s:gsub("\\/", "/"))
end

-- Non-ASCII characters to \uXXXX (what Java's and some PHP encoders do).
local function escape(s)
  return (s:gsub("[\192-\247][\128-\191]+", function(c)
    local b, cp = c:byte(1), 0
    if b >= 0xF0 then cp = b - 0xF0 elseif b >= 0xE0 then cp = b - 0xE0
    else cp = b - 0xC0 end
    for i = 2, #c do cp = cp * 64 + (c:byte(i) - 0x80) end
    if cp >= 0x10000 then
      cp = cp - 0x10000
      return ("\\u%04x\\u%04x"):format(0xD800 + math.floor(cp / 1024),
                                       0xDC00 + cp % 1024)
    end
    return ("\\u%04x"):format(cp)
  end))
end

-- The keys of each JSON object in order; true when every object with two
-- or more keys lists them sorted and at least one has three or more.
local function keys_sorted(s)
  local stack, i, sorted, big = {}, 1, true, false
  local last_str
  while true do
    i = s:find('["{}%[%]:]', i)
    if not i then break end
    local c = s:sub(i, i)
    if c == '"' then
      local j = string_end(s, i)
      last_str = s:sub(i + 1, j - 1)
      i = j
    elseif c == "{" or c == "[" then
      stack[#stack + 1] = { obj = c == "{", keys = {} }
    elseif c == "}" or c == "]" then
      local top = table.remove(stack)
      if top and top.obj and #top.keys >= 2 then
        if #top.keys >= 3 then big = true end
        for k = 2, #top.keys do
          if top.keys[k - 1] > top.keys[k] then sorted = false end
        end
      end
    elseif c == ":" then
      local top = stack[#stack]
      if top and top.obj and last_str then
        top.keys[#top.keys + 1] = last_str
      end
    end
    i = i + 1
  end
  return sorted and big
end

-- The signed string as shown (common.visible on one line), at most max
-- bytes of it: a longer one is cut at a character (never inside a UTF-8
-- sequence) and says how many of its bytes were left out.
local TRIED_BYTES = 200
local function shown(s) return (common.visible(s):gsub("\n", "")) end
local function tried_text(msg, max)
  if #msg <= max and #shown(msg) <= max then return shown(msg) end
  -- the longest prefix that fits: each byte shows as one character or
  -- more, so it is at most max bytes (a body of megabytes was shown
  -- whole a score of times to find it)
  local lo, hi = 0, math.min(#msg, max)
  while lo < hi do
    local mid = math.ceil((lo + hi) / 2)
    if #shown(msg:sub(1, mid)) <= max then lo = mid else hi = mid - 1 end
  end
  local b = msg:byte(lo + 1)
  while lo > 0 and b and b >= 0x80 and b < 0xC0 do  -- a continuation byte
    lo = lo - 1
    b = msg:byte(lo + 1)
  end
  return shown(msg:sub(1, lo)) .. "… (" .. (#msg - lo) .. " more bytes)"
end

local function main(args)
  local o = common.parse_options(args, SPEC)
  if not o["--body"] then
    common.usage_error("--body is required")
  end
  if not o["--headers"] and not o["-H"] then
    common.usage_error("give --headers FILE or -H 'Name: value'")
  end
  if (o["--public-key"] == nil) ~= (o["--public-key-id"] == nil) then
    common.usage_error("--public-key and --public-key-id go together")
  end
  if not o["--certificate"] and not o["--public-key"] and not o["--keyring"]
  then
    common.usage_error("give --certificate, --public-key with "
                       .. "--public-key-id, or --keyring")
  end
  local sign_type = o["--sign-type"]
  if sign_type ~= nil and not verify.FAMILY_OF[sign_type] then
    common.usage_error("--sign-type is WECHATPAY2-SHA256-RSA2048 or "
                       .. "WECHATPAY2-SM2-WITH-SM3, not %s", sign_type)
  end
  local body = common.read(o["--body"], "body file")
  local headers, status = {}, nil
  if o["--headers"] then
    headers, status = parse_headers(common.read(o["--headers"],
                                    "headers file"), o["--headers"])
  end
  for _, l in ipairs(o["-H"] or {}) do
    local k, v = l:match("^([%w%-_]+):%s*(.-)%s*$")
    if not k then common.usage_error("-H wants 'Name: value', not %s", l) end
    headers[k:lower()] = v
  end
  local now = common.number(o, "--at")
  if now then
    -- epoch seconds are 10 digits (2001 to 2286); a 13-digit --at is
    -- Date.now()'s milliseconds, judged as seconds "20 million days"
    -- away, and a far value printed as 'now -9223372036854775808'
    local at = o["--at"]
    for _, u in ipairs({ { 13, 1e3, "milliseconds" },
                         { 16, 1e6, "microseconds" },
                         { 19, 1e9, "nanoseconds" } }) do
      if now >= 10 ^ (u[1] - 1) and now < 10 ^ u[1] then
        common.usage_error("--at %s has %d digits: %s, where --at takes "
                           .. "epoch seconds (%d)", at, u[1], u[3],
                           math.floor(now / u[2]))
      end
    end
    if now < 1e9 or now >= 1e10 then
      common.usage_error("--at %s is not epoch seconds, which are 10 digits "
                         .. "(now %d)", at, os.time())
    end
  end
  now = now or os.time()
  local out = common.output(o["--json"])

  -- the keys given
  local given = {}
  for _, p in ipairs(o["--certificate"] or {}) do
    for _, e in ipairs(keys.load(p, nil, "--certificate")) do
      given[#given + 1] = e
    end
  end
  if o["--public-key"] then
    local id = o["--public-key-id"]
    if not id:match("^PUB_KEY_ID_%w+$") then
      common.usage_error("--public-key-id must be PUB_KEY_ID_ and digits, "
                         .. "as shown beside the key")
    end
    local l = keys.load(o["--public-key"], id, "--public-key")
    if #l == 0 or l[1].kind ~= "public_key" then
      if l[1] and l[1].kind == "unreadable" then
        common.usage_error("--public-key %s: %s", common.shown(l[1].file),
                           l[1].why)
      end
      if l[1] and l[1].kind == "certificate" then
        common.usage_error("%s holds a certificate, not a public key: give"
          .. " it with --certificate (a platform certificate), or give"
          .. " --public-key the WeChat Pay public key (pub_key.pem)",
          o["--public-key"])
      end
      common.usage_error("%s holds no public key", o["--public-key"])
    end
    given[#given + 1] = l[1]
  end
  if o["--keyring"] then
    for _, e in ipairs(keys.load(o["--keyring"], nil, "--keyring")) do
      given[#given + 1] = e
    end
  end
  -- a file's certificates are used as the client uses a
  -- platform_certificates entry: its CA certificates are the issuers of
  -- the others (left out), or are used when the file holds nothing else
  local issuer = {}
  do
    local byfile, order = {}, {}
    for _, e in ipairs(given) do
      if e.kind == "certificate" then
        if not byfile[e.file] then
          byfile[e.file] = {}
          order[#order + 1] = e.file
        end
        table.insert(byfile[e.file], e.cert)
      end
    end
    for _, f in ipairs(order) do
      local _, left_out = wconfig.platform_certs_of(byfile[f])
      for _, c in ipairs(left_out) do issuer[c] = true end
    end
  end
  local ring = keyring.new()
  local certs, pubs, merchants, skipped, cas = {}, {}, {}, {}, {}
  local unreadable = {}
  for _, e in ipairs(given) do
    if e.kind == "certificate" then
      local role = keys.role(e.cert)
      if role == "merchant" then
        merchants[#merchants + 1] = e
      end
      if issuer[e.cert] then
        skipped[#skipped + 1] = e.file .. ": certificate " .. e.cert:serial()
          .. " is the CA certificate (CA:TRUE) of the others in the file,"
          .. " which never signs answers"
      elseif pcall(ring.put, ring, nil, e.cert) then
        -- (a merchant certificate flagged CA:TRUE is no CA: keys.role)
        if role == "CA" then cas[#cas + 1] = e end
        certs[#certs + 1] = e
      else
        -- (the key ring takes RSA and SM2 keys only)
        local ok, t = pcall(e.cert.key_type, e.cert)
        skipped[#skipped + 1] = e.file .. ": certificate " .. e.cert:serial()
          .. " cannot be used to verify: its key is "
          .. (ok and t and t .. ", not" or "not") .. " RSA or SM2, the "
          .. "keys WeChat Pay signs with"
      end
    elseif e.kind == "public_key" and e.id then
      ring:put(e.id, e.key)
      pubs[#pubs + 1] = e
    elseif e.kind == "public_key" then
      skipped[#skipped + 1] = e.file .. ": a public key without an id (name "
        .. "it PUB_KEY_ID_....pem in --keyring, or use --public-key with "
        .. "--public-key-id)"
    elseif e.kind == "private_key" or e.kind == "encrypted_private_key" then
      skipped[#skipped + 1] = e.file .. ": a private key, not a certificate "
        .. "(verify needs WeChat's platform certificate or public key)"
    elseif e.kind == "unreadable" then
      skipped[#skipped + 1] = e.file .. ": " .. e.why
      unreadable[#unreadable + 1] = e
    end
  end
  if #certs == 0 and #pubs == 0 then
    common.usage_error("no usable certificate or public key among the "
                       .. "files given%s", #skipped > 0 and ": "
                       .. table.concat(skipped, "; ") or " (no PEM found)")
  end
  -- a broken file beside usable ones: said, as the key it holds may be
  -- the one the answer names
  for _, e in ipairs(unreadable) do
    out:warn("unreadable", e.file .. " was not used: " .. e.why, nil,
             e.unsupported and keys.UNSUPPORTED_FIX or
             "copy the file whole again (a certificate or key is a PEM "
             .. "block from its -----BEGIN line to its -----END line)")
  end

  local h, err = verify.parse_headers(headers)
  if not h and status and status >= 300 then
    out:fail("unsigned_answer", "HTTP " .. status .. ": error answers are "
             .. "unsigned (" .. tostring(err.message) .. ")",
             "WeChat signs 2xx answers and notifications; a 4xx/5xx "
             .. "answer carries code and message, no signature",
             "read the answer's code and message (a 401 SIGN_ERROR is about "
             .. "the request's signature: paygate sign)")
    return 1
  end
  if not h then
    out:fail("headers", tostring(err.message),
             "WeChat signs every 2xx answer and every notification with "
             .. "Wechatpay-Timestamp, -Nonce, -Signature and -Serial",
             "capture the headers as received (curl -D FILE); an error "
             .. "answer (4xx/5xx) is not signed: do not verify it")
    return 1
  end
  local serial = h.serial

  -- the probe
  if h.signature:sub(1, 19) == "WECHATPAY/SIGNTEST/" then
    out:fail("signtest_probe", "Wechatpay-Signature is a WECHATPAY/SIGNTEST/ "
             .. "probe, not a signature",
             "WeChat now and then sends a deliberately invalid signature to "
             .. "check that merchants verify. Failing it is correct.",
             "answer a notification with 4xx/5xx (WeChat sends it again, "
             .. "signed); treat an API answer as failed or query again")
    return 1
  end

  -- the time window
  local skew = now - h.ts
  local fresh_ok = verify.fresh(h.ts, now)
  if not fresh_ok then
    out:fail("stale_timestamp", ("Wechatpay-Timestamp is %s %s the clock "
             .. "(the limit is %d s)"):format(duration(skew),
             skew < 0 and "ahead of" or "behind", verify.WINDOW),
             ("timestamp %d, now %d: %s"):format(h.ts, now, skew < 0
               and "this clock is behind WeChat's, or the message is forged"
               or "a replay of an old message, a capture verified later, "
               .. "or this clock is ahead"),
             skew < 0 and "sync this host's clock (NTP)"
             or "sync the clock (NTP); to check an old capture, pass --at "
                .. h.ts)
  end

  -- the type a client configured for sign_type takes: another one (the
  -- header's, none meaning RSA) is refused before any key is looked up
  -- or signature checked, so this fails as paygate.wechatpay fails it
  -- (the gateway's capture of a refused notification names its
  -- sign_type here), saying whether the signature itself is of the
  -- configured variant
  local declared = h.sig_type or verify.DEFAULT_SIG_TYPE
  if sign_type and declared ~= sign_type then
    local key, kerr = ring:get(serial, now)
    local detail, itself, own
    if key then
      local ktype = key.key_type and key:key_type() or key:type()
      own = verify.SIG_TYPE_OF[ktype] or verify.DEFAULT_SIG_TYPE
      itself = crypto.verify_base64(key, verify.message(h.timestamp,
        h.nonce, body), h.signature, own)
      detail = itself and ("the signature itself verifies with " .. serial
        .. " (" .. ktype .. ", " .. own .. ")" .. (own == sign_type
          and ": the message is of the configured variant and only its "
              .. "type header " .. (h.sig_type and "says otherwise"
                or "is missing") or ""))
        or ("it does not verify as " .. own .. " with " .. serial
            .. " (" .. ktype .. ") either")
    elseif kerr and kerr.kind ~= "unknown_serial" then
      detail = "the key Wechatpay-Serial " .. serial .. " names is not "
        .. "usable (" .. tostring(kerr.kind) .. "), so the signature is "
        .. "not checked either"
    else
      detail = "Wechatpay-Serial " .. serial .. " names none of the keys "
        .. "given: a message of the other variant is signed under that "
        .. "variant's keys"
    end
    local fix
    if itself and own == sign_type and not h.sig_type then
      fix = "capture and pass every Wechatpay-* header (curl -D FILE); "
        .. "if it was missing as received (a capture the gateway wrote "
        .. "holds every header), the sender did not type the message: "
        .. "paygate.wechatpay reads no type as " .. verify.DEFAULT_SIG_TYPE
        .. " and refuses it, as the Java SDK does; report it to WeChat Pay "
        .. "with the notification's id"
    elseif itself and own == sign_type then
      fix = "pass the headers exactly as received: something changed "
        .. "Wechatpay-Signature-Type on the way"
    else
      fix = "sign_type must be the variant the merchant signed up for "
        .. "(WeChat's answers to its requests are of it: paygate doctor "
        .. "checks); a message of the other variant is another merchant's "
        .. "or another set-up's"
    end
    out:fail("signature_type", (h.sig_type and ("Wechatpay-Signature-Type "
      .. "is " .. h.sig_type) or ("no Wechatpay-Signature-Type, which "
      .. "means " .. declared)) .. ", but the client is configured for "
      .. sign_type .. " (--sign-type): it refuses a message of the other "
      .. "variant", detail, fix)
    return 1
  end

  -- the key the serial names
  local is_pub = serial:sub(1, 11) == "PUB_KEY_ID_"
  local kok, kerr = ring:get(serial, now)
  if not kok then
    local k = kerr and kerr.kind
    if k == "cert_expired" or k == "cert_not_yet_valid" then
      -- the key ring finds a serial without its leading zeros too
      local e
      local bare = serial:upper():gsub("^0+", "")
      for _, c in ipairs(certs) do
        if c.cert:serial():gsub("^0+", "") == bare then e = c end
      end
      out:fail(k, "platform certificate " .. serial .. (k == "cert_expired"
               and " expired " .. duration(now - e.cert:not_after()) .. " ago"
               or " is valid only in " .. duration(e.cert:not_before() - now)),
               "valid " .. os.date("!%Y-%m-%d %H:%M", e.cert:not_before())
               .. " to " .. os.date("!%Y-%m-%d %H:%M", e.cert:not_after())
               .. " UTC", k == "cert_expired"
               and "download the current platform certificates (paygate "
                   .. "certs --download) or check the clock"
               or "check the clock")
      return 1
    end
    -- which key would have verified?
    local msg = verify.message(h.timestamp, h.nonce, body)
    local other
    for _, e in ipairs(given) do
      local key = e.cert or e.key
      if e.kind ~= "private_key" and crypto.verify_base64(key, msg,
           h.signature, h.sig_type) then
        other = e
      end
    end
    local cause, detail, fix
    if other then
      cause = "Wechatpay-Serial " .. serial .. " names no key given, but "
              .. "the signature verifies with " .. tostring(other.id)
              .. " (" .. other.file .. ")"
      -- the signature verified over this body with a key given: the body
      -- and the signature are one message's, and only the serial can be
      -- another's -- when the headers were given one by one (-H). A
      -- headers file (curl -D, a capture the gateway wrote beside its
      -- body) holds one message's: the key is given under another name.
      local why = {}
      if o["-H"] then
        why[#why + 1] = "the headers given with -H come from different "
          .. "captures (the Wechatpay-Serial of one message, the signature"
          .. " of another)"
        fix = "capture the headers and body of the same answer"
      end
      if is_pub and other.kind == "public_key" then
        why[#why + 1] = "the public key is right and the id given with it "
          .. "is not: WeChat names it " .. serial
        fix = fix or ("check the id shown beside the key in the merchant "
          .. "platform (API security) and give it: --public-key-id "
          .. serial .. " (in the gateway: public_key_id)")
      elseif not is_pub and other.kind == "certificate" then
        why[#why + 1] = "WeChat's platform certificate " .. serial
          .. " holds the key of " .. tostring(other.id) .. " and is not "
          .. "among those given: a certificate re-issued (rotation)"
        fix = fix or "download the current platform certificates "
          .. "(paygate certs --download)"
      end
      why[#why + 1] = "the Wechatpay-Serial header was altered on the way"
      detail = table.concat(why, "; or ")
      fix = fix or ("give the key WeChat names " .. serial)
    elseif is_pub and #pubs == 0 then
      cause = "signed with the WeChat Pay public key " .. serial
              .. ", but only platform certificates were given"
      detail = "merchants since 2024 (and those migrating) are signed with "
               .. "the public key; its id starts PUB_KEY_ID_"
      fix = "download the public key in the merchant platform (API "
            .. "security) and pass --public-key FILE --public-key-id "
            .. serial .. " (in the gateway: public_key, public_key_id)"
    elseif is_pub then
      cause = "signed with public key " .. serial .. "; the id given is "
              .. tostring(pubs[1].id)
      fix = "use the public key whose id is " .. serial
    elseif #certs == 0 or (#merchants == #certs and #pubs > 0) then
      cause = "signed with platform certificate " .. serial
              .. ", but only a public key was given"
      detail = "a merchant migrating to the public key still gets answers "
               .. "signed with the platform certificate"
      fix = "give the platform certificates too (paygate certs --download;"
            .. " in the gateway keep platform_certificates during the "
            .. "migration)"
    elseif #merchants > 0 then
      local m = merchants[1].cert
      cause = "the certificate given (" .. m:serial() .. ", " .. m:subject()
              .. ") is the merchant's own API certificate, not WeChat's"
      detail = "apiclient_cert.pem identifies you to WeChat; WeChat signs "
               .. "with its platform certificate (Wechatpay-Serial "
               .. serial .. ") or its public key"
      fix = "pass the platform certificate (paygate certs --download) or "
            .. "the WeChat Pay public key"
    else
      local ids = {}
      for _, e in ipairs(certs) do ids[#ids + 1] = e.id end
      for _, e in ipairs(pubs) do ids[#ids + 1] = e.id end
      -- The variant the message is of: its Wechatpay-Signature-Type (none
      -- means RSA) where the signature's size does not say otherwise. When
      -- every key given is of the other one (an SM merchant's notification
      -- checked with an RSA set-up's certificates, or the reverse), that
      -- is the cause: a rotation's fix would fetch the same variant again.
      local declared = verify.FAMILY_OF[h.sig_type or verify.DEFAULT_SIG_TYPE]
      local sized = verify.sig_family(h.signature)
      local family
      if not h.sig_type then
        family = sized or declared
      elseif sized == nil or sized == declared then
        family = declared        -- (nil for a type that is neither)
      end
      local other_types = family ~= nil
      for _, e in ipairs(certs) do
        if e.cert:key_type() == family then other_types = false end
      end
      for _, e in ipairs(pubs) do
        if e.key:type() == family then other_types = false end
      end
      if other_types then
        local sm = family == "SM2"
        local given_type = sm and "RSA" or "SM2"
        local signed_as = h.sig_type or (sm and "with an SM2-sized "
          .. "signature and no Wechatpay-Signature-Type (a verifier then "
          .. "assumes RSA)" or verify.DEFAULT_SIG_TYPE .. " (no "
          .. "Wechatpay-Signature-Type, which means it)")
        out:fail("algorithm", "Wechatpay-Serial " .. serial .. " is not "
          .. "among the keys given, and they are of the other variant: the "
          .. "message is signed " .. signed_as .. ", every key given is "
          .. given_type, "keys given: " .. table.concat(ids, ", ") .. " ("
          .. given_type .. "); a merchant of the national-crypto variant "
          .. "(WECHATPAY2-SM2-WITH-SM3) is answered and notified under "
          .. "WeChat's SM2 platform certificates, an RSA merchant under RSA"
          .. " ones or an RSA public key: these are the other variant's "
          .. "(another merchant's, or an earlier set-up's)", sm
          and ("give the SM2 platform certificates: paygate certs "
               .. "--download with the SM2 merchant key fetches them "
               .. "(/v3/certificates?algorithm_type=SM2)")
          or ("give the RSA platform certificates (paygate certs "
              .. "--download with the RSA merchant key fetches them) or "
              .. "the WeChat Pay public key"))
        return 1
      end
      cause = "Wechatpay-Serial " .. serial .. " is not among the keys given"
      -- (none of them verifies the signature either)
      detail = "keys given: " .. table.concat(ids, ", ") .. "; the "
        .. "platform certificate with that serial is not among them: WeChat"
        .. " rotated its certificates (one newer than those given or "
        .. "downloaded), the files given are another merchant's, or the "
        .. "message is another merchant's"
      for _, e in ipairs(cas) do
        detail = detail .. "; " .. e.id .. " (" .. e.cert:subject()
          .. ") is a CA certificate (CA:TRUE): a CA issues platform "
          .. "certificates and signs no answer (WeChat's own platform "
          .. "certificates are not CA certificates)"
      end
      fix = "download the current platform certificates (paygate certs "
            .. "--download) with this merchant's credentials: WeChat "
            .. "rotates them"
    end
    out:fail("unknown_serial", cause, detail, fix)
    return 1
  end

  -- the signature
  local ok, serr = verify.signature(h, body, ring, nil, now)
  if ok then
    if fresh_ok then
      local kt = kok.key_type and kok:key_type() or kok:type()
      if kt == "SM2" and h.sig_type == nil then
        out:warn("signature_type", "verified with the SM2 key " .. serial
                 .. ", but no Wechatpay-Signature-Type header was given",
                 "without the header a verifier assumes "
                 .. "WECHATPAY2-SHA256-RSA2048: an SM2-signed answer needs "
                 .. "Wechatpay-Signature-Type: WECHATPAY2-SM2-WITH-SM3",
                 "capture and pass every Wechatpay-* header")
        return 0
      end
      -- the key ring finds a serial without its leading zeros, as the
      -- client does: say so, since WeChat writes all 40 digits
      local bare = serial:upper():gsub("^0+", "")
      for _, e in ipairs(certs) do
        if e.id ~= serial:upper() and e.id:gsub("^0+", "") == bare then
          out:warn("serial", "verified with certificate " .. e.id
                   .. ", named by Wechatpay-Serial " .. serial
                   .. " with its leading zero dropped",
                   "a serial printed as a number (Java's BigInteger."
                   .. "toString(16), a spreadsheet) loses its leading "
                   .. "zeros; the gateway finds the certificate either way,"
                   .. " WeChat writes the 40 hex digits",
                   "keep serials as strings of 40 hex digits: " .. e.id)
          return 0
        end
      end
      out:ok("signature", "verified with " .. serial .. " over "
             .. #body .. " body bytes")
      return 0
    end
    out:warn("signature", "the signature itself verifies with " .. serial
             .. ": only the time is wrong")
    return 1
  end
  local ck = serr.cause_kind
  local key = kok
  local ktype = key.key_type and key:key_type() or key:type()
  if ck == "key_type_mismatch" or ck == "unsupported_algorithm" then
    -- the key's own scheme: when the signature verifies under it, the key
    -- is the signer's and only the type header is wrong (its fix is not
    -- another variant's key)
    local own = verify.SIG_TYPE_OF[ktype]
    if own and crypto.verify_base64(key, verify.message(h.timestamp,
         h.nonce, body), h.signature, own) then
      out:fail("algorithm", "Wechatpay-Signature-Type " .. tostring(h.sig_type)
               .. " does not fit " .. serial .. ", an " .. ktype .. " key, "
               .. "and the signature verifies as " .. own .. " with it",
               "the key is the signer's: only the type header is wrong. A "
               .. "client configured for " .. own .. " (sign_type) refuses a "
               .. "message typed " .. tostring(h.sig_type)
               .. ", as paygate.wechatpay does",
               "pass the headers exactly as received: something changed "
               .. "Wechatpay-Signature-Type on the way (or it was typed by "
               .. "hand)")
      return 1
    end
    out:fail("algorithm", "Wechatpay-Signature-Type "
             .. tostring(h.sig_type) .. " does not fit " .. serial
             .. ", an " .. ktype .. " key",
             "WECHATPAY2-SHA256-RSA2048 needs an RSA key, "
             .. "WECHATPAY2-SM2-WITH-SM3 an SM2 key",
             "use the key of the variant the merchant signed up for (the SM "
             .. "variant has its own certificates: /v3/certificates?"
             .. "algorithm_type=SM2)")
    return 1
  end
  local raw = crypto.base64_decode(h.signature)
  if not raw then
    -- which damage: undone one at a time, the first that decodes named
    -- (and whether the signature then verifies)
    local sig = h.signature
    local function padded(v) return v .. ("="):rep(-#v % 4) end
    local damages = {
      { "quoted", "it is in quotes", function(v)
          return v:match('^"(.*)"$') or v:match("^'(.*)'$") end },
      { "percent_encoded", "it was percent-encoded (%2B, %2F, %3D: URL "
        .. "encoding)", function(v)
          return v:find("%%%x%x") and (v:gsub("%%(%x%x)", function(x)
            return string.char(tonumber(x, 16)) end)) end },
      { "plus_as_space", "its + characters became spaces (URL or form "
        .. "decoding turns + into a space)", function(v)
          return v:find(" ", 1, true) and (v:gsub(" ", "+")) end },
      { "line_breaks", "it holds line breaks or spaces (a base64 encoder "
        .. "wrapping its output)", function(v)
          return v:find("%s") and (v:gsub("%s+", "")) end },
      { "url_safe", "it is in the URL-safe base64 alphabet (- and _ for + "
        .. "and /)", function(v)
          return v:find("[-_]") and padded((v:gsub("[-_]", { ["-"] = "+",
            ["_"] = "/" }))) end },
      { "padding", "it lost its = padding", function(v)
          return #v % 4 ~= 0 and not v:find("=", 1, true) and padded(v) end },
    }
    local named, verifies
    for _, d in ipairs(damages) do
      local v = d[3](sig)
      if v and crypto.base64_decode(v) then
        named = d
        verifies = crypto.verify_base64(key, verify.message(h.timestamp,
          h.nonce, body), v, h.sig_type)
        break
      end
    end
    if named then
      out:result{ status = "fail", kind = "signature_encoding",
        what = named[1], cause = "Wechatpay-Signature is not valid base64: "
        .. named[2], detail = verifies and "undone, the signature verifies "
        .. "with " .. serial .. ": only its encoding was damaged on the way"
        or "undone, it decodes but still does not verify with " .. serial
        .. ": the signature was damaged in other ways too, or is not "
        .. "this answer's", fix = "pass the header exactly as received "
        .. "(what decoded, quoted or re-encoded it must leave it as is)" }
      return 1
    end
    out:fail("signature_encoding", "Wechatpay-Signature is not valid base64",
             "it holds characters base64 has not, or was cut short",
             "pass the header exactly as received")
    return 1
  end
  local function try(b, ts_nonce_msg)
    return crypto.verify_base64(key, ts_nonce_msg
      or verify.message(h.timestamp, h.nonce, b), h.signature, h.sig_type)
  end
  local causes = {}
  local bom = "\239\187\191"
  -- the undo steps, applied in this order; the fewest that make the
  -- signature verify are named (a Windows editor adds a BOM and a final
  -- CRLF at once)
  local steps = {
    { "bom", "the body starts with a UTF-8 BOM that WeChat did not send",
      function(b) return b:sub(1, 3) == bom and b:sub(4) end,
      "read the body as bytes: something (an editor, a proxy, a "
      .. "framework decoding text) added the BOM" },
    { "trailing_newline", "the body file ends with a newline WeChat did not "
      .. "send",
      function(b) return b:sub(-1) == "\n" and b:gsub("\r?\n$", "") end,
      "save the body exactly (curl -o FILE); editors add a final newline" },
    { "line_endings", "the body's line endings were changed (LF to CRLF)",
      function(b) local u = b:gsub("\r\n", "\n"); return u ~= b and u end,
      "verify the raw bytes as received" },
    { "whitespace", "the body's whitespace was changed (pretty-printed or "
      .. "re-indented): WeChat signed the compact bytes",
      function(b) local m = minify(b); return m ~= b and m end,
      "verify the raw bytes as received, before any JSON parsing or "
      .. "logging reformat them" },
    { "escaped_unicode", "the body's non-ASCII characters were turned into "
      .. "\\uXXXX escapes (or / into \\/): WeChat sends UTF-8 as is",
      function(b) local u = unescape(b); return u ~= b and u end,
      "verify the raw bytes; do not re-encode the parsed JSON" },
    { "escaped_unicode", "the body's \\uXXXX escapes were decoded to "
      .. "UTF-8: WeChat sent them escaped",
      function(b) local u = escape(b); return u ~= b and u end,
      "verify the raw bytes; do not re-encode the parsed JSON" },
  }
  local function apply(mask)
    local b = body
    for i, st in ipairs(steps) do
      if mask[i] then
        b = st[3](b)
        if not b then return nil end
      end
    end
    return b
  end
  local found
  -- (a body of megabytes -- no API answer or notification is -- is
  -- searched for one re-encoding at a time: each combination re-encodes
  -- it whole, 41 of them took seconds)
  for size = 1, #body > 1048576 and 1 or 3 do
    local function pick(from, mask, n)
      if found then return end
      if n == 0 then
        local b = apply(mask)
        if b and try(b) then
          found = {}
          for k in pairs(mask) do found[k] = true end
        end
        return
      end
      for i = from, #steps do
        if not (i == 6 and mask[5]) then        -- escape after unescape
          mask[i] = true
          pick(i + 1, mask, n - 1)
          mask[i] = nil
        end
      end
    end
    pick(1, {}, size)
    if found then break end
  end
  if found then
    local whats, texts, fixes, seen = {}, {}, {}, {}
    for i, st in ipairs(steps) do
      if found[i] then
        whats[#whats + 1] = st[1]
        texts[#texts + 1] = st[2]
        if not seen[st[4]] then
          seen[st[4]] = true
          fixes[#fixes + 1] = st[4]
        end
      end
    end
    causes[#causes + 1] = { kind = "body_reencoded",
      what = table.concat(whats, "+"), steps = whats,
      cause = table.concat(texts, "; and "),
      fix = table.concat(fixes, "; ") }
  end
  -- the verify string without its final newline
  if #causes == 0 and crypto.verify_base64(key, h.timestamp .. "\n"
       .. h.nonce .. "\n" .. body, h.signature, h.sig_type) then
    causes[#causes + 1] = { kind = "trailing_newline", cause = "the "
      .. "signature was made over TIMESTAMP\\nNONCE\\nBODY without the final "
      .. "\\n", fix = "the signed string ends with a newline after the body "
      .. "(an empty body too: TIMESTAMP\\nNONCE\\n\\n); fix the signer" }
  end
  -- keys in alphabetical order prove nothing (WeChat's own answers often
  -- list them so): a possibility named in the generic cause, not a cause
  local sorted = #causes == 0 and keys_sorted(body)
  if #causes == 0 then
    local bits = key.key_bits and key:key_bits() or key:bits()
    if ktype == "RSA" and #raw ~= bits / 8 then
      -- encoded twice, or hex: not cut short
      local twice = crypto.base64_decode(raw)
      local hex = h.signature:match("^%x+$") and #h.signature == bits / 4
      local enc = twice and #twice == bits / 8 and "base64-encoded twice"
                  or hex and "hex-encoded, not base64"
      causes[#causes + 1] = { kind = "signature_length", cause = "the "
        .. "signature is " .. #raw .. " bytes; one by this RSA-" .. bits
        .. " key is " .. bits / 8 .. (enc and ": it was " .. enc or ""),
        fix = enc and "the signer must send the signature's bytes in "
        .. "base64, once (pass Wechatpay-Signature as received)"
        or "pass Wechatpay-Signature whole, from the same answer" }
    end
  end
  if #causes == 0 and #merchants > 0 then
    causes[#causes + 1] = { kind = "merchant_certificate", cause = "a "
      .. "merchant certificate was given: if it was put in place of "
      .. "WeChat's key under " .. serial .. ", nothing WeChat signs verifies",
      fix = "use WeChat's platform certificate or public key" }
  end
  if #causes == 0 then
    causes[#causes + 1] = { kind = "signature_mismatch", cause = "the "
      .. "signature does not match: the body, the timestamp or the nonce "
      .. "differ from what WeChat signed, or " .. serial .. " is not the "
      .. "key that signed", possible = sorted and "key_order" or nil,
      detail = sorted and "the body's keys are in alphabetical order: "
      .. "WeChat's answers often are, but if the body was decoded and "
      .. "re-encoded (Go's json.Marshal of a map, sort_keys...) the key "
      .. "order WeChat signed is lost" or nil,
      fix = "capture the raw body and headers of one "
      .. "answer; check that nothing between WeChat and you rewrites "
      .. "bodies; for a public key, download it again from the merchant "
      .. "platform" }
  end
  local tried = "signed string tried: " .. tried_text(verify.message(
    h.timestamp, h.nonce, body), TRIED_BYTES)
  for _, c in ipairs(causes) do
    out:result{ status = "fail", kind = c.kind, what = c.what,
                steps = c.steps, possible = c.possible, cause = c.cause,
                fix = c.fix, detail = c.detail and c.detail .. "\n" .. tried
                or tried }
  end
  return 1
end

return common.run("verify", usage, main, { ... })
