-- sim.identity: the keys the simulator signs with, as WeChat Pay's:
-- platform certificates (serial = 40 hex digits) and the WeChat Pay public
-- key (id PUB_KEY_ID_ + 34 digits), RSA-2048 or SM2 by sign_type.
--
-- Keys come from the config (platform_private_key + platform_certificate,
-- public_key_private_key + public_key_id) or are generated on the first
-- start with the openssl command line (a test tool's choice: paygate.crypto
-- does not generate keys) and kept in the database under state_dir, so a
-- restart signs with the same keys. Every worker reads them from there;
-- a rotation (POST /sim/certificates/rotate) adds a certificate whose
-- use_from lies rotation_delay seconds ahead: /v3/certificates serves it
-- at once beside the old one, responses switch to it at use_from.
-- Workers learn of a rotation through a generation counter in the shared
-- dict and re-read the table.
--
-- Which key signs a response (sign_headers), by the merchant's
-- verifier_mode:
--   public_key             the public key, always
--   platform_certificates  the certificate the request's Wechatpay-Serial
--                          names, if it is one of ours and valid; else the
--                          one in use
--   both (migration)       PUB_KEY_ID_... in the request's Wechatpay-Serial
--                          -> the public key; otherwise as above; the
--                          notifications alternate between the public key
--                          and the certificate in use
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local x509 = require "paygate.x509"
local json = require "cjson.safe"
local resource = require "paygate.wechatpay.resource"
local verify = require "paygate.wechatpay.verify"
local exec = require "sim.exec"
local faults = require "sim.faults"
local clock = require "sim.clock"

local type, tostring, ipairs, pairs, error = type, tostring, ipairs, pairs,
                                              error

local _M = {}

local SUBJECT = "/C=CN/O=Tenpay.com/OU=Tenpay.com CA Center/L=ShenZhen"
                .. "/CN=Tenpay.com sign"
local DAYS = 1825                     -- platform certificates: 5 years
local K_GEN = "sim:identity:gen"
local K_NOTIFY_ALT = "sim:identity:notify_alt"  -- migration: which key next

local S = {                           -- per worker
  db = nil, cfg = nil, gen = -1,
  certs = {},                         -- sorted by use_from, then not_before
  by_serial = {},
  pub = nil,                          -- { id, key, pem, pub_pem }
}

-- (the handle looked up once: get_dict gives the same one every time,
-- and each signed answer reads the generation through it)
local dict_handle
local function dict()
  if not dict_handle then
    dict_handle = require("paygate.shared").get_dict("paygate")
  end
  return dict_handle
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

-- 20 random bytes as 40 upper-case hex digits, the first byte 0x10..0x7f
-- (positive, and printed with two digits).
local function new_serial()
  local b = crypto.random_bytes(20)
  local first = 0x10 + b:byte(1) % 0x70
  return (string.char(first) .. b:sub(2)):gsub(".", function(c)
    return ("%02X"):format(c:byte())
  end)
end

local function new_pub_id()
  local b = crypto.random_bytes(34)
  local d = b:gsub(".", function(c) return tostring(c:byte() % 10) end)
  return "PUB_KEY_ID_" .. d
end

local EXTENSIONS = "keyUsage=critical,digitalSignature,nonRepudiation,"
                   .. "keyEncipherment"

-- The certificate of generate() with dates of the second (the expired
-- certificate fault): openssl req -x509 counts whole days from now, openssl
-- ca takes -startdate/-enddate, so the key signs a request for itself
-- (-selfsign) under a throwaway CA config. The policy keeps the subject as
-- it is (preserve, every field of SUBJECT optional).
-- returns: true, or nil, err
local function dated_certificate(dir, kf, cf, algo, serial, from, to)
  local cnf, csr = dir .. "/ca.cnf", dir .. "/req.csr"
  local ok, err = core.write_file(cnf, ("[ca]\ndefault_ca = d\n[d]\n"
    .. "database = %s/index.txt\nnew_certs_dir = %s\nserial = %s/serial\n"
    .. "policy = p\nunique_subject = no\npreserve = yes\ndefault_md = %s\n"
    .. "[p]\ncountryName = optional\norganizationName = optional\n"
    .. "organizationalUnitName = optional\nlocalityName = optional\n"
    .. "commonName = supplied\n[x]\nbasicConstraints = critical,CA:FALSE\n"
    .. "%s\n"):format(dir, dir, dir, algo == "SM2" and "sm3" or "sha256",
                      EXTENSIONS), 384)
  if ok then ok, err = core.write_file(dir .. "/index.txt", "", 384) end
  if ok then
    ok, err = core.write_file(dir .. "/serial", serial .. "\n", 384)
  end
  if not ok then return nil, tostring(err) end
  local req = { "openssl", "req", "-new", "-key", kf, "-subj", SUBJECT,
                "-out", csr, algo == "SM2" and "-sm3" or "-sha256" }
  if algo == "SM2" then
    req[#req + 1] = "-sigopt"
    req[#req + 1] = "distid:1234567812345678"
  end
  ok, err = exec.run(req)
  if not ok then return nil, err end
  local stamp = function(t) return os.date("!%Y%m%d%H%M%SZ", t) end
  local ca = { "openssl", "ca", "-batch", "-notext", "-selfsign", "-config",
               cnf, "-keyfile", kf, "-in", csr, "-startdate", stamp(from),
               "-enddate", stamp(to), "-extensions", "x", "-out", cf }
  if algo == "SM2" then
    for _, a in ipairs({ "-sigopt", "distid:1234567812345678", "-vfyopt",
                         "distid:1234567812345678" }) do
      ca[#ca + 1] = a
    end
  end
  return exec.run(ca)
end

-- Makes a key (and a self-signed certificate when serial is given) with
-- the openssl CLI in a temporary folder under state_dir. dates: { from,
-- to } (epoch seconds) for a certificate of those dates; nil: DAYS from now.
-- returns: key_pem, cert_pem (or nil), or nil, nil, err
local function generate(algo, serial, dates)
  local dir = S.cfg.state_dir .. "/keygen-" .. crypto.random_nonce(12)
  local ok, err = exec.run({ "mkdir", "-p", dir })
  if not ok then return nil, nil, err end
  local kf, cf = dir .. "/key.pem", dir .. "/cert.pem"
  if algo == "SM2" then
    ok, err = exec.run({ "openssl", "genpkey", "-quiet", "-algorithm", "SM2",
                         "-out", kf })
  else
    ok, err = exec.run({ "openssl", "genpkey", "-quiet", "-algorithm", "RSA",
                         "-pkeyopt", "rsa_keygen_bits:2048", "-out", kf })
  end
  if ok and serial and dates then
    ok, err = dated_certificate(dir, kf, cf, algo, serial, dates[1],
                                dates[2])
  elseif ok and serial then
    -- a leaf, like WeChat's own (openssl req -x509 makes a CA by default,
    -- which the diagnosing CLI rightly refuses as an answer's signer)
    local argv = { "openssl", "req", "-x509", "-new", "-key", kf,
                   "-out", cf, "-days", tostring(DAYS), "-subj", SUBJECT,
                   "-set_serial", "0x" .. serial,
                   "-addext", "basicConstraints=critical,CA:FALSE",
                   "-addext", EXTENSIONS }
    if algo == "SM2" then
      argv[#argv + 1] = "-sm3"
      argv[#argv + 1] = "-sigopt"
      argv[#argv + 1] = "distid:1234567812345678"
    else
      argv[#argv + 1] = "-sha256"
    end
    ok, err = exec.run(argv)
  end
  local key_pem = ok and read_file(kf)
  local cert_pem = ok and serial and read_file(cf)
  exec.run({ "rm", "-rf", dir })
  if not ok then return nil, nil, err end
  if not key_pem or (serial and not cert_pem) then
    return nil, nil, "openssl wrote no key into " .. dir
  end
  return key_pem, cert_pem
end

local function algo()
  return S.cfg.sm and "SM2" or "RSA"
end

-- Inserts a row unless one of its kind and algorithm exists (when
-- only_if_none) -- one statement, so concurrent first starts agree.
local function insert(row, only_if_none)
  local sql = "INSERT INTO sim_platform_keys (id, kind, algo, key_pem, "
    .. "cert_pem, not_before, not_after, use_from, created_at) "
    .. "SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9"
  if only_if_none then
    sql = sql .. " WHERE NOT EXISTS (SELECT 1 FROM sim_platform_keys "
          .. "WHERE kind = $2 AND algo = $3)"
  end
  return S.db:exec(sql, { n = 9, row.id, row.kind, row.algo, row.key_pem,
    row.cert_pem or core.null, row.not_before or core.null,
    row.not_after or core.null, row.use_from or 0, core.time() })
end

local function cert_row(key_pem, cert_pem, use_from)
  local key, kerr = crypto.private_key(key_pem)
  if not key then
    return nil, "platform private key: cannot load (" .. tostring(kerr and
                kerr.kind) .. ")"
  end
  local cert, cerr = x509.load(cert_pem)
  if not cert then
    return nil, "platform certificate: cannot load (" .. tostring(cerr and
                cerr.kind) .. ")"
  end
  local ok = crypto.check_pair(key, cert)
  if not ok then
    return nil, "platform_private_key does not match platform_certificate"
  end
  if cert:key_type() ~= algo() then
    return nil, "platform certificate holds an " .. tostring(cert:key_type())
                .. " key; sign_type needs " .. algo()
  end
  return { id = cert:serial(), kind = "certificate", algo = algo(),
           key_pem = key_pem, cert_pem = cert:pem(),
           not_before = cert:not_before(), not_after = cert:not_after(),
           use_from = use_from or 0 }
end

--- syntax: n = identity.load() -- re-reads the keys from the database
function _M.load()
  local rows, err = S.db:query("SELECT id, kind, algo, key_pem, cert_pem, "
    .. "not_before, not_after, use_from FROM sim_platform_keys WHERE algo = $1",
    { algo() })
  if not rows then return nil, err end
  local certs, by = {}, {}
  local pub
  for _, r in ipairs(rows) do
    local key = assert(crypto.private_key(r.key_pem))
    if r.kind == "certificate" then
      local cert = assert(x509.load(r.cert_pem))
      local c = { serial = r.id, key = key, cert = cert, pem = r.cert_pem,
                  not_before = r.not_before, not_after = r.not_after,
                  use_from = r.use_from }
      certs[#certs + 1] = c
      by[r.id] = c
    elseif r.kind == "public_key" then
      pub = { id = r.id, key = key, pem = key:public_pem(),
              public = key:public_key() }
    end
  end
  table.sort(certs, function(a, b)
    if a.use_from ~= b.use_from then return a.use_from < b.use_from end
    return a.not_before < b.not_before
  end)
  S.certs, S.by_serial, S.pub = certs, by, pub
  return #rows
end

-- The generation is taken as seen only once its keys are loaded: until
-- then (load yields) every caller loads again rather than signing with
-- the keys of before, and a failed load is tried again on the next call.
-- (Two loads overlapping: the one that ends last may hold the older rows
-- with the older generation, and the next call loads once more.)
local function fresh()
  local gen = dict():get(K_GEN) or 0
  if gen ~= S.gen and _M.load() then
    S.gen = gen
  end
end

--- syntax: ok, err = identity.init(db, cfg)
-- Makes the keys that are missing (the first start), then loads them.
-- Runs at the app's top level (may yield).
function _M.init(db, cfg)
  S.db, S.cfg = db, cfg
  local ok, err
  if cfg.platform_private_key then
    local row
    row, err = cert_row(cfg.platform_private_key, cfg.platform_certificate, 0)
    if not row then return nil, "config.platform_certificate: " .. err end
    ok, err = S.db:exec("INSERT OR IGNORE INTO sim_platform_keys (id, kind, "
      .. "algo, key_pem, cert_pem, not_before, not_after, use_from, "
      .. "created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8)",
      { row.id, row.kind, row.algo, row.key_pem, row.cert_pem,
        row.not_before, row.not_after, core.time() })
    if not ok then return nil, "state: " .. tostring(err) end
    -- the configured certificate wins over what was there before it (a
    -- generated one, an older configured one and their rotations); the
    -- rotations made on top of it since it was first configured stay
    ok, err = S.db:exec("DELETE FROM sim_platform_keys WHERE kind = "
      .. "'certificate' AND algo = $1 AND id <> $2 AND created_at < "
      .. "(SELECT created_at FROM sim_platform_keys WHERE id = $2)",
      { row.algo, row.id })
    if not ok then return nil, "state: " .. tostring(err) end
  else
    local rows = assert(S.db:query("SELECT 1 AS x FROM sim_platform_keys "
      .. "WHERE kind = 'certificate' AND algo = $1", { algo() }))
    if not rows[1] then
      local serial = new_serial()
      local kp, cp, gerr = generate(algo(), serial)
      if not kp then return nil, "generating the platform key: " .. gerr end
      local row
      row, err = cert_row(kp, cp, 0)
      if not row then return nil, err end
      ok, err = insert(row, true)
      if not ok then return nil, "state: " .. tostring(err) end
    end
  end
  if cfg.public_key_private_key then
    local key, kerr = crypto.private_key(cfg.public_key_private_key)
    if not key then
      return nil, "config.public_key_private_key: cannot load ("
                  .. tostring(kerr and kerr.kind) .. ")"
    end
    if key:type() ~= algo() then
      return nil, "config.public_key_private_key: an " .. key:type()
                  .. " key; sign_type needs " .. algo()
    end
    ok, err = S.db:exec("INSERT OR IGNORE INTO sim_platform_keys (id, kind, "
      .. "algo, key_pem, use_from, created_at) VALUES ($1, 'public_key', $2, "
      .. "$3, 0, $4)", { cfg.public_key_id, algo(),
                         cfg.public_key_private_key, core.time() })
    if not ok then return nil, "state: " .. tostring(err) end
    -- the configured one wins over one generated before
    ok, err = S.db:exec("DELETE FROM sim_platform_keys WHERE kind = "
      .. "'public_key' AND algo = $1 AND id <> $2", { algo(),
                                                     cfg.public_key_id })
    if not ok then return nil, "state: " .. tostring(err) end
  else
    local rows = assert(S.db:query("SELECT 1 AS x FROM sim_platform_keys "
      .. "WHERE kind = 'public_key' AND algo = $1", { algo() }))
    if not rows[1] then
      local kp, _, gerr = generate(algo(), nil)
      if not kp then return nil, "generating the public key: " .. gerr end
      ok, err = insert({ id = cfg.public_key_id or new_pub_id(),
                         kind = "public_key", algo = algo(), key_pem = kp },
                       true)
      if not ok then return nil, "state: " .. tostring(err) end
    end
  end
  -- the rotation counter before the keys: a rotation by another worker
  -- in between then moves it past what is held, and the next use loads
  -- again (read after, this worker would hold the old keys under the new
  -- counter until the next rotation)
  local gen = dict():get(K_GEN) or 0
  ok, err = _M.load()
  if not ok then return nil, "state: " .. tostring(err) end
  S.gen = gen
  return true
end

-- the certificate in use at now, of the keys as last loaded (sign_headers
-- has just refreshed them: one generation read per answer)
local function current(now)
  local cur
  for _, c in ipairs(S.certs) do
    if c.use_from <= now and c.not_after > now then cur = c end
  end
  return cur or S.certs[#S.certs]
end

--- syntax: c = identity.current([now]) -- the certificate in use
function _M.current(now)
  fresh()
  return current(now or core.time())
end

--- syntax: list = identity.certificates([now])
-- Every platform certificate not expired at now (default: WeChat's clock,
-- sim.clock, as WeChat judges its own), in use or coming (oldest
-- first): { serial, key, cert, pem, not_before, not_after, use_from }.
function _M.certificates(now)
  fresh()
  now = now or clock.now()
  local out = {}
  for _, c in ipairs(S.certs) do
    if c.not_after > now then out[#out + 1] = c end
  end
  return out
end

--- syntax: p = identity.public_key() -- { id, key, pem, public }
function _M.public_key()
  fresh()
  return S.pub
end

--- syntax: c, err = identity.rotate([delay])
-- A new platform certificate, served at once, used for responses from
-- now + delay (default: the config's rotation_delay).
-- A new platform certificate of a key and certificate just generated
-- (kp, cp), in use from use_from, stored beside the others; every
-- worker sees it at its next look (the generation counter).
local function add_cert(kp, cp, use_from)
  local row, err = cert_row(kp, cp, use_from)
  if not row then return nil, err end
  local ok
  ok, err = insert(row, false)
  if not ok then return nil, err end
  dict():incr(K_GEN, 1, 0)
  fresh()
  return S.by_serial[row.id]
end

function _M.rotate(delay)
  local serial = new_serial()     -- (one value: generate's third is dates)
  local kp, cp, err = generate(algo(), serial)
  if not kp then return nil, err end
  return add_cert(kp, cp, core.time() + (delay or S.cfg.rotation_delay))
end

--- syntax: c, err = identity.expiring(expires_in)
-- A platform certificate for the expired_certificate fault, valid until
-- expires_in seconds from now on WeChat's clock (sim.clock: it expires
-- when WeChat's clock says so, as the Wechatpay-Timestamp of the answers
-- it signs tells), from a minute before the earlier of WeChat's clock and
-- the host's (valid from the start on both: a client on the host's clock
-- behind WeChat's would otherwise find it not yet valid). It is kept
-- beside the others, so /v3/certificates lists it while it is valid and a
-- client takes it as it takes any of WeChat's. It is never in use (its
-- use_from is its notAfter): only the fault signs with it, so a client
-- that took it holds a certificate that expires under it, which is what
-- its cert_expired is about.
function _M.expiring(expires_in)
  local host = core.time()
  local now = clock.now(host)
  local to = math.ceil(now + expires_in)
  local kp, cp, err = generate(algo(), new_serial(),
                               { math.floor(math.min(now, host)) - 60, to })
  if not kp then return nil, err end
  return add_cert(kp, cp, to)
end

-- The fault's certificate is made when the fault is set (the control
-- route may yield for openssl), so every answer it spoils is signed by
-- the same one, whichever worker signs.
faults.define("expired_certificate", "after", function(f)
  local v = f.expires_in
  if v == nil then v = 2; f.expires_in = v end
  if type(v) ~= "number" or v ~= v or v < 0 or v > 86400 then
    return nil, "expires_in must be a number from 0 to 86400"
  end
  local c, err = _M.expiring(v)
  if not c then
    return nil, "cannot make the certificate: " .. tostring(err)
  end
  f.serial, f.not_after = c.serial, c.not_after
  return true
end, { "expires_in" })

-- The key a response (or a notification) is signed with. returns: id,
-- private key handle
local function choose(mode, request_serial, now, notification)
  if mode == "public_key" or (mode == "both" and type(request_serial)
     == "string" and request_serial:sub(1, 11) == "PUB_KEY_ID_") then
    return S.pub.id, S.pub.key
  end
  if mode == "both" and notification then
    -- in migration WeChat moves notifications to the public key over
    -- days: both are in flight, so here they alternate (a client must
    -- verify either)
    local n = dict():incr(K_NOTIFY_ALT, 1, 0)
    if n and n % 2 == 0 then
      return S.pub.id, S.pub.key
    end
  end
  if type(request_serial) == "string" then
    -- (begun on the host's clock, where openssl starts a fresh one;
    -- not expired on WeChat's, as its list judges it)
    local c = S.by_serial[request_serial:upper()]
    if c and c.not_before <= now and c.not_after > clock.now(now) then
      return c.serial, c.key
    end
  end
  local c = current(now)
  return c.serial, c.key
end

--- syntax: headers = identity.sign_headers(body, opts)
-- opts: merchant (from the config; its verifier_mode), request_serial (the
-- request's Wechatpay-Serial or nil), notification (true for a
-- notification), fault (from sim.faults, after phase:
-- bad_signature, stale_timestamp, unknown_serial, expired_certificate),
-- now (the host's clock, default core.time(): the answer's Date is made
-- from the same reading) and extra headers to merge. returns: the
-- Wechatpay-* headers, exact spellings.
function _M.sign_headers(body, opts)
  fresh()
  local now = opts.now or core.time()
  local mode = opts.merchant and opts.merchant.verifier_mode
               or S.cfg.verifier_mode
  local id, key = choose(mode, opts.request_serial, now, opts.notification)
  local fault = opts.fault
  if fault and fault.kind == "expired_certificate" then
    local c = S.by_serial[fault.serial]
    if c then id, key = c.serial, c.key end
  end
  local ts = math.floor(clock.now(now))             -- WeChat's clock
  if fault and fault.kind == "stale_timestamp" then
    ts = ts - math.floor(fault.skew or 600)
  end
  local nonce = crypto.random_nonce(32)
  local sig = assert(crypto.sign_base64(key, verify.message(tostring(ts),
                     nonce, body or ""), S.cfg.sign_type))
  if fault and fault.kind == "bad_signature" then
    if fault.signtest then
      sig = "WECHATPAY/SIGNTEST/" .. sig:sub(20)
    else
      -- the same length and alphabet, another value
      local c = sig:sub(10, 10)
      sig = sig:sub(1, 9) .. (c == "A" and "B" or "A") .. sig:sub(11)
    end
  elseif fault and fault.kind == "unknown_serial" then
    id = id:sub(1, 11) == "PUB_KEY_ID_" and new_pub_id() or new_serial()
  end
  local h = {
    ["Wechatpay-Timestamp"] = tostring(ts),
    ["Wechatpay-Nonce"] = nonce,
    ["Wechatpay-Signature"] = sig,
    ["Wechatpay-Serial"] = id,
  }
  if S.cfg.sm then h["Wechatpay-Signature-Type"] = S.cfg.sign_type end
  return h
end

--- syntax: r = identity.encrypt_resource(merchant, plaintext, aad[,
--                                         original_type])
-- The resource a notification or /v3/certificates carries: encrypted with
-- the merchant's APIv3 key (AEAD_SM4_GCM under the SM variant), a
-- 12-character nonce.
function _M.encrypt_resource(merchant, plaintext, aad, original_type)
  if type(plaintext) == "table" then plaintext = json.encode(plaintext) end
  return assert(resource.encrypt(merchant.apiv3_key, plaintext, aad, {
    algorithm = S.cfg.sm and resource.SM4 or resource.AES,
    original_type = original_type }))
end

--- syntax: ok, key = identity.known_serial(serial[, mode])
-- Whether a request's Wechatpay-Serial names one of our keys the merchant
-- holds, by its verifier_mode (default both): a platform certificate not
-- expired (not in public_key mode: such a merchant has none, its
-- /v3/certificates is 404), or the public key id (not in
-- platform_certificates mode: that merchant has no public key).
function _M.known_serial(serial, mode)
  fresh()
  if type(serial) ~= "string" then return false end
  if S.pub and serial == S.pub.id then
    if mode == "platform_certificates" then return false end
    return true, S.pub
  end
  if mode == "public_key" then return false end
  local c = S.by_serial[serial:upper()]
  if c and c.not_after > clock.now() then return true, c end
  return false
end

return _M
