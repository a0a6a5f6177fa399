-- paygate.wechatpay.certs: the keys WeChat Pay signs with, in one key ring
-- per client (two merchants in one worker never share verifiers).
--
-- Modes (config.lua decides): "certificate" — platform certificates from
-- /v3/certificates (and/or the configuration); "public_key" — the WeChat
-- Pay public key and its PUB_KEY_ID_..., no download at all; "migration"
-- — both, either serial verifies.
--
-- Downloaded certificates are decrypted with the APIv3 key (the AEAD tag
-- is what authenticates them), date-checked (chain-checked only against a
-- CA the merchant configures as platform_ca: WeChat names none), the
-- response signature is checked with the set just decrypted plus the keys
-- already held, and they join the ring beside older ones: during a
-- rotation both verify until the old one expires. The last good set is
-- written to state_dir (temporary file + rename) so a restart while WeChat
-- is unreachable still verifies.
--
-- Downloads are single-flight within a worker and, through the
-- paygate.shared dict, across the workers of an instance; downloads
-- caused by an unknown serial are rate-limited (download_min_interval), so
-- a storm of unknown serials cannot hammer WeChat.
local core = require "paygate.core"
local x509 = require "paygate.x509"
local keyring = require "paygate.keyring"
local json = require "paygate.json"  -- hardened decoder, same null
local errors = require "paygate.wechatpay.errors"
local verify = require "paygate.wechatpay.verify"
local resource = require "paygate.wechatpay.resource"
local clock = require "paygate.wechatpay.clock"
local rotation = require "paygate.wechatpay.rotation"
local config = require "paygate.wechatpay.config"

local type, tostring, ipairs, pairs, pcall, next =
      type, tostring, ipairs, pairs, pcall, next
local printable = errors.printable

local _M = {}

local acceptable          -- defined below

-- the client's log (its log_level applied)
local function log(wx)
  return config.logger(wx.conf)
end

-- The instance-wide dict (paygate.shared) named name, or nil, reason
-- when the runtime has none by that name (then single-flight and rate
-- limits are per worker, and the replay check cannot run).
function _M.shared_dict(name)
  local ok, shared = pcall(require, "paygate.shared")
  if not ok or type(shared) ~= "table" then
    return nil, "no paygate.shared module"
  end
  local d
  ok, d = pcall(shared.get_dict, name)
  if not ok then return nil, tostring(d) end
  return d
end

--- syntax: same = certs.same_serial(a, b)
-- Whether two hex serials name the same number: case and leading zeros
-- aside (Go writes two digits per byte, "0A1E...", as OpenSSL does; Java's
-- BigInteger drops the zero, "A1E..."; the key ring looks both up alike).
function _M.same_serial(a, b)
  return (a:upper():gsub("^0+(.)", "%1")) == (b:upper():gsub("^0+(.)", "%1"))
end

-- A copy of an error that more than one caller is given (a download's,
-- every waiter's; the configuration error, every verification's): callers
-- add to err.message (the notification parser, the transport), and on one
-- shared table each addition would stay for every later caller -- the
-- message growing by a prefix a call, without bound.
local function copy_error(e)
  if type(e) ~= "table" then return e end
  local t = {}
  for k, v in pairs(e) do t[k] = v end
  return core.error(e.kind, e.message, t)
end

local function is_pub_id(serial)
  return serial:sub(1, 11) == "PUB_KEY_ID_"
end
_M.is_pub_id = is_pub_id

--- syntax: _M.init(wx) -- fills wx.ring from the configuration and state_dir
function _M.init(wx)
  local c = wx.conf
  local ring = keyring.new()
  wx.ring = ring
  wx.certs = {}          -- serial -> certificate handle (platform)
  for _, cert in ipairs(c.platform_certs) do
    if cert:not_after() > core.time() then
      ring:put(nil, cert)
      wx.certs[cert:serial()] = cert
    end
  end
  if c.public_key then ring:put(c.public_key_id, c.public_key) end
  wx.dl = { gen = 0, busy = false, last = nil, last_err = nil,
            done = core.event() }
  wx.key_prefix = "wechatpay:" .. c.mchid .. ":"
  -- the certificate set shared between workers is per variant too: an RSA
  -- and an SM client of one mchid each need their own key type's set
  wx.certs_prefix = wx.key_prefix .. (c.sm and "sm:" or "")
  wx.dict = _M.shared_dict(c.shared_dict)
  -- the replay cache's dict: replay_dict, else a "wechatpay_replay" dict
  -- when the runtime has one, else shared_dict
  if c.replay_dict then
    wx.replay_dict_name = c.replay_dict
    wx.replay_dict = _M.shared_dict(c.replay_dict)
  else
    local rd = _M.shared_dict("wechatpay_replay")
    if rd and rd ~= wx.dict then
      wx.replay_dict_name, wx.replay_dict = "wechatpay_replay", rd
    else
      wx.replay_dict_name, wx.replay_dict = c.shared_dict, wx.dict
    end
  end
  -- public-key mode verifies with the public key alone: the certificates
  -- a certificate or migration mode client saved there before (voided at
  -- the migration's end) would verify beside it, and count down on
  -- /metrics, where a fresh instance with an empty state_dir refuses them
  if c.state_dir and c.mode ~= "public_key" then _M.load_state(wx) end
end

-- one file per mchid and variant (an RSA and an SM client of one mchid
-- must not replace each other's); the RSA name is the older one, kept.
-- rsa_name: that name whatever the variant (where an SM set once was)
local function state_path(wx, rsa_name)
  return wx.conf.state_dir .. "/wechatpay-" .. wx.conf.mchid
         .. ((wx.conf.sm and not rsa_name) and "-sm" or "")
         .. "-platform-certificates.pem"
end
_M.state_path = state_path

-- Adds certificate handles to the ring (beside older ones) and drops
-- expired entries. returns: the number added, and those certificates.
local function adopt(wx, list, now)
  local added, new = 0, {}
  for _, cert in ipairs(list) do
    if cert:not_after() > now then
      local serial = cert:serial()
      if not wx.certs[serial] then
        added = added + 1
        new[#new + 1] = cert
      end
      wx.ring:put(nil, cert)
      wx.certs[serial] = cert
    end
  end
  for serial, cert in pairs(wx.certs) do
    if cert:not_after() <= now then
      wx.ring:remove(serial)
      wx.certs[serial] = nil
    end
  end
  return added, new
end

local function utc(t) return os.date("!%Y-%m-%dT%H:%M:%SZ", t) end

--- syntax: n = certs.load_state(wx) -- the certificates last saved
function _M.load_state(wx)
  local f = io.open(state_path(wx), "rb")
  if not f and wx.conf.sm then
    -- an SM client's set was once saved under the RSA name: read there
    -- until the next save writes its own file (acceptable() below keeps
    -- the SM2 certificates only)
    f = io.open(state_path(wx, true), "rb")
  end
  if not f then return 0 end
  local pem = f:read("*a")
  f:close()
  local chain = pem and pem ~= "" and x509.chain(pem)
  if not chain then
    log(wx).warn("wechatpay: unreadable certificate state file, ignored",
               { path = state_path(wx) })
    return 0
  end
  local now, ok = core.time(), {}
  for _, cert in ipairs(chain) do
    if acceptable(wx, cert, now) then ok[#ok + 1] = cert end
  end
  return adopt(wx, ok, now)
end

--- syntax: ok, err = certs.save_state(wx)
-- Writes every platform certificate held to state_dir, atomically.
function _M.save_state(wx)
  local dir = wx.conf.state_dir
  if not dir then return true end
  local parts = {}
  for _, cert in pairs(wx.certs) do parts[#parts + 1] = cert:pem() end
  table.sort(parts)
  local path = state_path(wx)
  -- whole or not at all, and durable: a failed write (a full disk) must
  -- not leave an empty file where the last good set was -- a restart
  -- with WeChat unreachable verifies with it
  local data = table.concat(parts)
  local ok, err = core.write_file(path, data, 420)      -- 0644
  if not ok then
    -- the folder first made (by mkdir(2): no shell), then again
    local made, merr = core.mkdir_p(dir)
    if not made then return nil, merr end
    ok, err = core.write_file(path, data, 420)
  end
  if not ok then return nil, err end
  return true
end

-- Decrypts one AEAD-encrypted resource ({ algorithm, nonce,
-- associated_data, ciphertext }) with the current, then the previous
-- APIv3 keys (paygate.wechatpay.resource). returns: plaintext, nil and
-- the position of the key that decrypted it (1: the current one), or nil,
-- err (malformed, decrypt_failed).
function _M.decrypt(wx, r)
  return resource.decrypt(r, wx.conf.apiv3_keys, wx.conf.key_names)
end

-- Whether a platform certificate may join this client's ring: the key type
-- of the configured variant, not expired, and chained to platform_ca when
-- one is configured. returns: true; or false and, for a chain failure, a
-- reason; a wrong type or an expired one is skipped: false, nil, what it
-- is (for the warning of a download that brought nothing usable).
acceptable = function(wx, cert, now)
  local want = wx.conf.sm and "SM2" or "RSA"
  if cert:key_type() ~= want then
    return false, nil, "key type " .. tostring(cert:key_type())
  end
  if cert:not_after() <= now then
    return false, nil, "expired"
  end
  if wx.conf.platform_ca then
    local ok, verr = x509.verify_chain(cert,
      { roots = wx.conf.platform_ca, at = now })
    if not ok then
      return false, cert:serial() .. " does not chain to platform_ca ("
                    .. tostring(verr and verr.kind) .. ")"
    end
  end
  return true
end

-- A Wechatpay-Serial naming a public key id other than the configured one
-- (h: parsed headers). When the configured public_key verifies the
-- signature all the same, the key is right and the id given with it is
-- not (a typo, an id copied from elsewhere): said with the id WeChat gives
-- that key, so the fix is public_key_id, not the key. It stays refused:
-- the header is not signed, so it may also have been altered on the way,
-- and only an id of WeChat's form (PUB_KEY_ID_ and digits) is offered as
-- the fix -- and only where the headers came from WeChat over the
-- client's own TLS connection (an answer, a download): a notification's
-- come from whoever POSTs, and a replayed WeChat message with a header of
-- the sender's choosing would have its id offered to the operator as the
-- fix (untrusted: the message then sends to paygate doctor, whose signed
-- call asks WeChat itself). returns: the words to add to the
-- unknown_serial message, and that id when the key verified (never for
-- untrusted headers).
local function other_pub_id(wx, h, body, now, untrusted)
  local c = wx.conf
  local more = ": not the configured public_key_id " .. c.public_key_id
  if not h.serial:match("^PUB_KEY_ID_%d+$") then return more end
  local t = {}
  for k, v in pairs(h) do t[k] = v end
  t.serial = c.public_key_id
  if not verify.signature(t, body, wx.ring, c.signer.schema, now) then
    return more
  end
  if untrusted then
    return more .. ", yet the signature verifies with the configured "
      .. "public_key: the key is right and its id is likely not (or the "
      .. "Wechatpay-Serial header was altered on the way): paygate doctor"
      .. "'s signed call names the id WeChat gives the key"
  end
  return more .. ", yet the signature verifies with the configured "
    .. "public_key: the key is right and its id is not (or the "
    .. "Wechatpay-Serial header was altered on the way): set public_key_id "
    .. "to " .. h.serial .. ", the id shown beside the key in the merchant "
    .. "platform (API security)", h.serial
end

-- Decrypts and checks the certificates of a /v3/certificates body.
-- returns: an array of certificate handles, the ones skipped and, when
-- one decrypted only with a previous APIv3 key, that key's position in
-- apiv3_keys; or nil, err.
local function decode_download(wx, body, now)
  local doc = json.decode(body)
  if type(doc) ~= "table" or type(doc.data) ~= "table" then
    return nil, core.error("bad_response", "/v3/certificates: no data array")
  end
  local out, skipped, prev = {}, {}, nil
  for i, item in ipairs(doc.data) do
    if type(item) ~= "table" then
      return nil, core.error("bad_response", "/v3/certificates: entry " .. i
                             .. " is not an object")
    end
    local pem, err, used = _M.decrypt(wx, item.encrypt_certificate)
    if not pem then
      return nil, core.error(err.kind, "/v3/certificates entry " .. i .. ": "
                             .. err.message)
    end
    if used > 1 then prev = used end
    local cert, cerr = x509.load(pem)
    if not cert then
      return nil, core.error("bad_response", "/v3/certificates entry " .. i
        .. ": not a certificate (" .. tostring(cerr and cerr.kind) .. ")")
    end
    if type(item.serial_no) == "string"
       and not _M.same_serial(item.serial_no, cert:serial()) then
      return nil, core.error("bad_response", "/v3/certificates entry " .. i
        .. ": serial_no " .. printable(item.serial_no, 64)
        .. " differs from the certificate's " .. cert:serial())
    end
    local ok, why, what = acceptable(wx, cert, now)
    if ok then
      out[#out + 1] = cert
    elseif why then
      return nil, core.error("bad_response", "/v3/certificates: " .. why)
    else
      skipped[#skipped + 1] = cert:serial() .. " (" .. what .. ")"
    end
  end
  return out, skipped, prev
end

-- One download: request, decrypt, check, verify the response with the new
-- set plus the keys held, adopt, save. returns: number added, or nil, err.
local function download(wx)
  local transport = require "paygate.wechatpay.transport"
  local path = "/v3/certificates"
  if wx.conf.sm then path = path .. "?algorithm_type=SM2" end
  local res, err = transport.request(wx, "GET", path, nil,
    { _no_verify = true, deadline = wx.conf.timeout,
      -- in certificate mode name no serial: one WeChat no longer accepts
      -- must not stop us fetching the current ones
      wechatpay_serial = wx.conf.mode == "certificate" and false or nil })
  if not res then
    if err.status == 404 and err.code == "RESOURCE_NOT_EXISTS"
       and wx.conf.public_key then
      -- migration mode: the public key is configured already; the
      -- certificates were voided (the migration's last step)
      return nil, core.error("invalid_config", "WeChat Pay has no platform "
        .. "certificate for merchant " .. wx.conf.mchid .. " any more (404 "
        .. "RESOURCE_NOT_EXISTS: voided in the merchant platform?); the "
        .. "WeChat Pay public key " .. wx.conf.public_key_id .. " verifies "
        .. "alone: remove platform_certificates and download_certificates "
        .. "(public-key mode)",
        { key = "download_certificates", status = 404, code = err.code,
          request_id = err.request_id })
    end
    if err.status == 404 and err.code == "RESOURCE_NOT_EXISTS" then
      return nil, core.error("invalid_config", "WeChat Pay has no platform "
        .. "certificate for merchant " .. wx.conf.mchid .. " (404 "
        .. "RESOURCE_NOT_EXISTS): it uses the WeChat Pay public key; "
        .. "configure public_key and public_key_id",
        { key = "public_key", status = 404, code = err.code,
          request_id = err.request_id })
    end
    return nil, err
  end
  local now, now_mono = core.time(), core.mono()
  local list, skipped, prev = decode_download(wx, res.body, now)
  if not list then return nil, skipped end
  if #list == 0 and #skipped > 0 then
    -- nothing this client can use: said now, not only as an
    -- unknown_serial on the next answer signed with one of them
    log(wx).warn("wechatpay: /v3/certificates brought no certificate this "
      .. "client can use (sign_type " .. tostring(wx.conf.signer.schema)
      .. " needs " .. (wx.conf.sm and "SM2" or "RSA") .. " keys, valid "
      .. "now): skipped " .. table.concat(skipped, ", ", 1,
                                          math.min(#skipped, 8)),
      { mchid = wx.conf.mchid })
  end
  -- the response must be signed by a key in the new set or one held
  local probe = keyring.new()
  for _, cert in ipairs(list) do probe:put(nil, cert) end
  for serial, cert in pairs(wx.certs) do
    if not probe:get(serial) then
      probe:put(nil, cert)
    end
  end
  if wx.conf.public_key then
    probe:put(wx.conf.public_key_id, wx.conf.public_key)
  end
  local h
  h, err = verify.check(res.headers, res.body, probe, now, wx.conf.signer.schema)
  probe:close()
  if not h then
    local ph = err.kind == "unknown_serial" and wx.conf.public_key
               and verify.parse_headers(res.headers)
    local more, id = "", nil
    if ph and is_pub_id(ph.serial) then
      more, id = other_pub_id(wx, ph, res.body, now)
    end
    return nil, core.error(err.kind, "/v3/certificates response: "
                           .. err.message .. more,
                           { serial = err.serial, wechat_public_key_id = id,
                             skew = err.skew })
  end
  clock.observe(wx, h.ts, now, now_mono)  -- verified: WeChat's clock
  -- verified, and encrypted under a previous APIv3 key: WeChat is not on
  -- the current one yet (counted, said once an hour; rotation.lua)
  if prev then rotation.observe(wx, "certificates", prev) end
  local added, new = adopt(wx, list, now)
  -- WeChat's rotation seen as it happens: one line per certificate new to
  -- the ring, said by the download that brought it. Once per instance
  -- with paygate.shared (a mark per serial, kept until the certificate
  -- ends): a worker whose timer came too late to take another's set
  -- downloads it again, and would say it again; else once per worker. A
  -- fresh start says its first set this way too. No mark while the line
  -- is filtered out (config.logs): a line not said does not count as said
  if added > 0 and config.logs(wx.conf, "info") then
    local held = 0
    for _ in pairs(wx.certs) do held = held + 1 end
    for _, cert in ipairs(new) do
      local serial = cert:serial()
      if not wx.dict or wx.dict:add(wx.certs_prefix .. "added:" .. serial,
                                    true, cert:not_after() - now) then
        log(wx).info("wechatpay: platform certificate " .. serial
          .. " added (valid from " .. utc(cert:not_before()) .. " to "
          .. utc(cert:not_after()) .. "), " .. held .. " in the ring",
          { mchid = wx.conf.mchid })
      end
    end
  end
  local ok, serr = _M.save_state(wx)
  if not ok then
    -- which merchant, and the config key to fix (the owner's name for it:
    -- merchants[N].state_dir in the gateway); paygate doctor checks it
    local c = wx.conf
    log(wx).warn("wechatpay: cannot save the platform certificates of "
      .. "merchant " .. c.mchid .. " in " .. c.key_names.state_dir .. " ("
      .. tostring(c.state_dir) .. "): a restart while WeChat Pay is "
      .. "unreachable will not find them", { mchid = c.mchid,
      why = tostring(serr.message) })
  end
  _M.report(wx, now)
  return added
end

--- syntax: t = certs.status(wx[, now])
-- returns: { serials = {...}, newest, days_left } — days_left on the
-- newest valid platform certificate, nil with none (public key: no expiry).
function _M.status(wx, now)
  now = now or core.time()
  local newest, serials = nil, {}
  for serial, cert in pairs(wx.certs) do
    serials[#serials + 1] = serial
    if cert:not_before() <= now and cert:not_after() > now
       and (not newest or cert:not_after() > newest:not_after()) then
      newest = cert
    end
  end
  table.sort(serials)
  return { serials = serials, newest = newest and newest:serial(),
           days_left = newest and (newest:not_after() - now) / 86400,
           public_key_id = wx.conf.public_key_id, mode = wx.conf.mode }
end

-- The /metrics gauge of the days left (nil when the runtime has no
-- paygate.metrics, e.g. an embedding without the process layer).
local days_gauge
local function gauge()
  if days_gauge == nil then
    local ok, metrics = pcall(require, "paygate.metrics")
    days_gauge = ok and type(metrics) == "table"
      and metrics.gauge("paygate_wechatpay_certificate_days_left",
        "Days left on the newest valid WeChat Pay platform certificate.")
      or false
  end
  return days_gauge or nil
end

-- The merchant's own API certificate's days left (the certificate this
-- client signs with, when it was given as a certificate: a serial alone
-- says no end), beside the platform one's: renewed by the merchant in the
-- merchant platform, and WeChat refuses requests signed under it once it
-- ends (401 SIGN_ERROR). nil without paygate.metrics.
local merchant_gauge
local function mgauge()
  if merchant_gauge == nil then
    local ok, metrics = pcall(require, "paygate.metrics")
    merchant_gauge = ok and type(metrics) == "table"
      and metrics.gauge("paygate_wechatpay_merchant_certificate_days_left",
        "Days left on the merchant API certificate a WeChat Pay client"
        .. " signs with.")
      or false
  end
  return merchant_gauge or nil
end

-- Sets the merchant certificate's series (the one of a serial no longer
-- signing, after a swap of credentials, is removed).
local function report_merchant(wx, now)
  local g = mgauge()
  local c = wx.conf
  if not g then return end
  local na, serial = c.merchant_not_after, c.merchant_serial
  if wx.mgauge_serial and wx.mgauge_serial ~= serial then
    g:remove({ mchid = c.mchid, serial = wx.mgauge_serial })
    wx.mgauge_serial = nil
  end
  if type(na) == "number" and na ~= 0 and type(serial) == "string" then
    if g:set((na - now) / 86400, { mchid = c.mchid, serial = serial }) then
      wx.mgauge_serial = serial
    end
  end
end

-- A warning is logged from this many days before the newest expires.
_M.WARN_DAYS = 30

--- syntax: st = certs.report(wx[, now])
-- Publishes paygate_wechatpay_certificate_days_left{mchid, serial} for
-- the newest valid platform certificate (the series of a serial no longer
-- newest is removed; none in public-key mode: that key does not expire)
-- and logs a warning from WARN_DAYS days before it expires.
function _M.report(wx, now)
  local st = _M.status(wx, now)
  report_merchant(wx, now or core.time())
  wx.reported = st.newest      -- import reports again when this changes
  local g = gauge()
  if g then
    local mchid = wx.conf.mchid
    if wx.gauge_serial and wx.gauge_serial ~= st.newest then
      g:remove({ mchid = mchid, serial = wx.gauge_serial })
      wx.gauge_serial = nil
    end
    if st.newest then
      local ok, err = g:set(st.days_left, { mchid = mchid,
                                            serial = st.newest })
      if ok then
        wx.gauge_serial = st.newest
      elseif not wx.gauge_warned and config.logs(wx.conf, "warn") then
        wx.gauge_warned = true
        log(wx).warn("wechatpay: cannot publish the certificate metric",
                   { mchid = mchid, error = tostring(err) })
      end
    end
  end
  if st.days_left and st.days_left < _M.WARN_DAYS then
    log(wx).warn("wechatpay: the newest platform certificate expires soon",
               { mchid = wx.conf.mchid, serial = st.newest,
                 days_left = math.floor(st.days_left) })
  end
  return st
end

-- How often the gauge is recomputed between downloads (seconds).
_M.REPORT_INTERVAL = 3600

-- Serialises the held certificates for other workers (shared dict).
local function export(wx)
  local parts = {}
  for _, cert in pairs(wx.certs) do parts[#parts + 1] = cert:pem() end
  return table.concat(parts)
end

-- Takes the set another worker downloaded, checked as this client checks
-- its own downloads, and publishes the gauge when the newest certificate
-- is not the one this worker shows: the workers of a reload (or one
-- restarted) take the set the old ones downloaded, and the old workers'
-- series leave with them, so without this /metrics had no series until
-- the hourly report. A set taken again unchanged (a rate-limited unknown
-- serial) publishes nothing, nor logs the expiry warning again.
local function import(wx, pem)
  local chain = type(pem) == "string" and pem ~= "" and x509.chain(pem)
  if not chain then return end
  local now, ok = core.time(), {}
  for _, cert in ipairs(chain) do
    if acceptable(wx, cert, now) then ok[#ok + 1] = cert end
  end
  adopt(wx, ok, now)
  if _M.status(wx, now).newest ~= wx.reported then _M.report(wx, now) end
end

-- Waits until cond() holds, for a condition another *process* changes
-- (the download lock in paygate.shared): nothing can signal across
-- workers, so this polls, from 5 ms doubling to 200 ms (a download takes
-- a round trip to WeChat; a late look costs at most 200 ms). Bounded;
-- returns whether cond() held.
local function wait_for(cond, seconds)
  local deadline = core.mono() + seconds
  local step = 0.005
  while not cond() do
    local left = deadline - core.mono()
    if left <= 0 then return false end
    core.sleep(step < left and step or left)
    step = step * 2
    if step > 0.2 then step = 0.2 end
  end
  return true
end

--- syntax: ok, err = certs.refresh(wx, reason[, wait])
-- reason: "unknown_serial" (rate-limited), "start", "timer", "manual". At
-- most one download per worker at a time: it runs in a task of its own (so
-- a caller whose request is abandoned cannot leave it half done) and every
-- caller meanwhile waits for its result on a core.event (no polling); with
-- paygate.shared, at most one per instance (other workers take its result
-- from the dict). wait: seconds to wait at most (default 2 timeouts + 10);
-- after it the caller gets timeout and the download goes on.
function _M.refresh(wx, reason, wait)
  if not wx.conf.download then
    -- reached by wx:refresh_certificates alone (the start, the timer and
    -- an unknown serial do not ask for a download the client does not
    -- make): the client's configuration forbids it, no serial was unknown
    local c = wx.conf
    return nil, core.error("invalid_config", "wx:refresh_certificates: "
      .. (c.mode == "public_key" and "a public-key mode client downloads "
          .. "no certificates: the WeChat Pay public key verifies WeChat, "
          .. "and it is configured, not downloaded (give "
          .. "download_certificates = true for migration mode)"
          or "download_certificates is false: the client verifies with "
          .. "the keys configured only (give \"manual\" to download on "
          .. "this call and on an unknown serial)"),
      { key = "download_certificates", retryable = false })
  end
  local dl = wx.dl
  local gen = dl.gen          -- before the spawn: the task may finish in it
  if not dl.busy then
    dl.busy = true
    core.spawn(function()
      local ok, a, b = pcall(_M.refresh_locked, wx, reason)
      if not ok then
        a, b = nil, core.error("internal", "certificate refresh: "
                               .. tostring(a))
      end
      dl.last, dl.last_err = a, b
      dl.gen = dl.gen + 1
      dl.busy = false
      dl.done:set()           -- the waiters resume on the next loop turn
    end)
  end
  -- in this worker: sleep on the event until the task says it is done
  local deadline = core.mono() + (wait or (2 * wx.conf.timeout + 10))
  while dl.gen == gen do
    local left = deadline - core.mono()
    if left <= 0 or not dl.done:wait(left) then
      return nil, core.error("timeout", "certificate download still "
                             .. "running")
    end
  end
  return dl.last, copy_error(dl.last_err)
end

local function dl_recent(wx, now)
  return wx.dl.at and now - wx.dl.at < wx.conf.download_min_interval
end

-- The refusal of a download the rate limit stops: no download ran. It
-- says when the last one (for an unknown serial) was and when the next
-- may run -- certs.verify told it as "even after downloading", though
-- nothing was downloaded -- and why that download failed, when it did
-- (else a wrong APIv3 key, told once, was lost on every later answer).
-- ago: seconds since that download. err.rate_limited, err.retry_in (s).
local function rate_limited(wx, last, ago)
  local min = wx.conf.download_min_interval
  ago = math.max(0, math.min(ago or 0, min))
  local next_in = math.max(1, math.ceil(min - ago))
  return nil, core.error("unknown_serial", "the platform certificates were"
    .. " not downloaded again: the last download for an unknown serial was "
    .. math.floor(ago) .. " s ago, the next is allowed in " .. next_in
    .. " s (download_min_interval " .. min .. " s)"
    .. (type(last) == "string" and ("; that download failed: " .. last)
        or ""), { rate_limited = true, retry_in = next_in })
end

-- The failure mark a worker's failed download leaves in the shared dict:
-- the error's fields as JSON (its kind, message, and the key, status,
-- code and retryable a waiting worker rebuilds it with: an invalid_config
-- names the config key to fix). No secret is in a download's error.
local function failure_mark(err)
  if type(err) ~= "table" then         -- (download gives core.error's)
    err = { kind = "internal", message = tostring(err) }
  end
  return json.encode({ kind = err.kind,
    message = printable(tostring(err.message), 300), key = err.key,
    status = err.status, code = err.code, retryable = err.retryable })
end

-- The mark read back: the error's fields, or nil (none). A mark of text,
-- "kind: message" (what a worker of the version before left: the shared
-- dict outlives a reload), gives those two.
local function failure_of(mark)
  if type(mark) ~= "string" then return nil end
  local ok, e = pcall(json.decode, mark)
  if ok and type(e) == "table" and type(e.kind) == "string" then return e end
  local kind, msg = mark:match("^([%w_]+): (.*)$")
  return { kind = kind or "download_failed", message = msg or mark }
end

-- The failure's one-line text, as a refusal of the rate limit quotes it
local function failure_text(e)
  return e and (e.kind .. ": " .. tostring(e.message)) or nil
end

-- Waits for the download another worker of the instance runs (its lock
-- held), then takes its set: true, or that download's failure when it
-- failed (a success deletes the mark), named as another worker's.
local function await_other(wx, dict, K)
  wait_for(function() return not dict:get(K .. "lock") end,
           wx.conf.timeout + 5)
  import(wx, dict:get(K .. "set"))
  local e = failure_of(dict:get(K .. "failed"))
  if e then
    -- the error as that worker had it, named as its
    return nil, core.error(e.kind, tostring(e.message)
      .. " (another worker's download)", { key = e.key, status = e.status,
      code = e.code, retryable = e.retryable })
  end
  return true
end

function _M.refresh_locked(wx, reason)
  local c = wx.conf
  local dict = wx.dict
  local K = wx.certs_prefix
  local now = core.mono()
  local locked = false
  if reason == "unknown_serial" then
    if dict then
      -- the lock first, then the rate mark: a worker that finds the mark
      -- then always finds the lock of the download it stands for, if that
      -- still runs (the other order left a moment with the mark set and
      -- no lock yet, and that worker took the old set as the result)
      if not dict:add(K .. "lock", core.pid(), c.timeout + 5) then
        -- a download runs: take its result, and its failure when it
        -- failed, for certs.verify to say so, not "even after
        -- downloading"
        return await_other(wx, dict, K)
      end
      -- (its value: when, for the refusals' "N s ago")
      if not dict:add(K .. "rate", core.time(), c.download_min_interval)
      then
        -- another download ran recently: its set is the result
        dict:delete(K .. "lock")
        import(wx, dict:get(K .. "set"))
        local at = dict:get(K .. "rate")
        return rate_limited(wx, failure_text(failure_of(dict:get(K
                                                  .. "failed"))),
                            type(at) == "number" and core.time() - at)
      end
      locked = true
    elseif dl_recent(wx, now) then
      return rate_limited(wx, wx.dl.failed, now - wx.dl.at)
    end
  end
  if dict and reason ~= "unknown_serial" and reason ~= "manual" then
    -- another worker of this instance downloaded recently: take its set
    local at = dict:get(K .. "at")
    if type(at) == "number" and core.time() - at < c.refresh_interval / 2
       and dict:get(K .. "set") then
      import(wx, dict:get(K .. "set"))
      return true
    end
  end
  if dict and not locked then
    if not dict:add(K .. "lock", core.pid(), c.timeout + 5) then
      -- (its failure too: a refresh asked for -- wx:refresh_certificates,
      -- paygate doctor -- said success of a download that had failed)
      return await_other(wx, dict, K)
    end
  end
  if reason == "unknown_serial" then wx.dl.at = now end
  local added, err = download(wx)
  -- why it failed, for the downloads the rate limit refuses meanwhile
  local failed = not added and printable(tostring(err), 300) or nil
  wx.dl.failed = failed
  -- failed downloads counted (across the instance's workers with
  -- paygate.shared) until one succeeds, which says so: each failure is
  -- logged ("download failed; retrying"), and without this line the
  -- recovery was not
  local failures
  if dict then
    if added then
      failures = dict:get(K .. "failures")
      dict:delete(K .. "failures")
    else
      dict:incr(K .. "failures", 1, 0)
    end
  elseif added then
    failures, wx.dl.failures = wx.dl.failures, nil
  else
    wx.dl.failures = (wx.dl.failures or 0) + 1
  end
  if type(failures) == "number" and failures > 0 then
    log(wx).info("wechatpay: platform certificates downloaded again after "
      .. failures .. (failures == 1 and " failure" or " failures"),
      { mchid = c.mchid })
  end
  if dict then
    if added then
      dict:set(K .. "set", export(wx))
      dict:set(K .. "at", core.time())
      dict:delete(K .. "failed")
    else
      dict:set(K .. "failed", failure_mark(err), c.download_min_interval)
    end
    dict:delete(K .. "lock")
  end
  if not added then return nil, err end
  return true
end

--- syntax: h, err = certs.verify(wx, headers, body[, now[, untrusted]])
-- verify.check, plus one certificate download when the serial is unknown
-- and could be a platform certificate. now: the clock to judge by
-- (default the current time; tools and known-answer tests pass another).
-- untrusted: the headers may come from anyone (a notification), not from
-- WeChat over our own connection (an answer): no id they name is offered
-- as a fix.
function _M.verify(wx, headers, body, now, untrusted)
  local c = wx.conf
  now = now or core.time()
  local h, err = verify.parse_headers(headers)
  if not h then return nil, err end
  if type(body) ~= "string" then
    return nil, core.error("malformed", "body is not a string")
  end
  local ok
  ok, err = verify.fresh(h.ts, now)
  if not ok then return nil, err end
  if wx.config_error then return nil, copy_error(wx.config_error) end
  ok, err = verify.signature(h, body, wx.ring, c.signer.schema, now)
  if ok then return h end
  if err.kind ~= "unknown_serial" then return nil, err end
  if is_pub_id(h.serial) then
    if not c.public_key then
      err.message = err.message .. ": a WeChat Pay public key id, and no "
        .. "public_key is configured: configure public_key and public_key_id"
    else
      local more, id = other_pub_id(wx, h, body, now, untrusted)
      err.message = err.message .. more
      err.wechat_public_key_id = id
    end
    return nil, err
  end
  if not c.download then
    err.message = err.message .. ": a platform certificate serial, and "
      .. (c.mode == "public_key" and "only the WeChat Pay public key is "
          .. "configured: add platform_certificates (migration mode)"
          or "certificate download is off: add it to platform_certificates")
    return nil, err
  end
  local rok, rerr = _M.refresh(wx, "unknown_serial")
  if not rok and rerr and rerr.kind == "invalid_config" then
    return nil, rerr
  end
  ok, err = verify.signature(h, body, wx.ring, c.signer.schema, now)
  if ok then return h end
  if err.kind == "unknown_serial" and rerr and rerr.kind == "timeout" then
    -- the download that could have brought the key did not finish in
    -- time: a slow network, not a key this merchant lacks
    return nil, core.error("timeout", err.message .. ": the platform"
      .. " certificate download did not finish in time (" .. tostring(rerr)
      .. ")", { serial = h.serial, cause = rerr.kind, retryable = true })
  end
  if err.kind == "unknown_serial" then
    -- what became of the download, as it was: "even after downloading"
    -- only when one ran and brought no key for this serial
    if rerr and rerr.rate_limited then
      err.message = err.message .. ": " .. rerr.message
      err.retry_in = rerr.retry_in
    elseif rerr then
      err.message = err.message .. ": the platform certificate download "
        .. "failed (" .. tostring(rerr) .. ")"
    else
      err.message = err.message .. " even after downloading the platform "
        .. "certificates"
    end
  end
  return nil, err
end

--- syntax: certs.start(wx)
-- The hourly recompute of the certificate gauge (in every mode that holds
-- or downloads certificates, "manual" too) and, unless downloads are off
-- or "manual", the first download (waited for, at most startup_timeout
-- seconds, when no certificate is held yet and we can wait; it goes on in
-- the background past that) and the jittered periodic refresh. A failure is
-- logged and retried, never fatal, except 404 RESOURCE_NOT_EXISTS seen
-- within startup_timeout: returned as invalid_config (later, it is logged
-- and every verification answers it).
function _M.start(wx)
  local c = wx.conf
  _M.report(wx)
  if next(wx.certs) ~= nil or c.download
     or (type(c.merchant_not_after) == "number" and c.merchant_not_after ~= 0)
  then
    -- the days left shrink between downloads: recompute them hourly (in
    -- "manual" mode too: no download runs by itself there, so without it
    -- the gauge would move only on wx:refresh_certificates(); and in
    -- public-key mode for the merchant certificate's own gauge)
    wx.reporter = core.spawn(function()
      while true do
        core.sleep(_M.REPORT_INTERVAL)
        _M.report(wx)
      end
    end)
  end
  if not c.download or c.download_manual then return true end
  local held = next(wx.certs) ~= nil     -- from the config or state_dir
  if not held and core.in_coroutine() then
    -- a blackholed WeChat must not hold a worker's start for a whole
    -- timeout: wait startup_timeout, then let the download finish alone
    local ok, err = _M.refresh(wx, "start", c.startup_timeout)
    if not ok and err.kind == "invalid_config" and c.mode == "certificate"
    then
      return nil, err
    end
    if not ok and err.kind == "timeout" and wx.dl.busy then
      log(wx).warn("wechatpay: platform certificate download not done within "
                 .. "startup_timeout; it goes on in the background",
                 { mchid = c.mchid, startup_timeout = c.startup_timeout })
    elseif not ok then
      log(wx).warn("wechatpay: platform certificate download failed; retrying "
                 .. "in the background", { mchid = c.mchid, error = tostring(err) })
    end
  end
  wx.refresher = core.spawn(function()
    local backoff = 5
    if held then
      -- certificates held from the configuration or state_dir: newer ones
      -- (rotated in while this process was down) are looked for now, in
      -- the background, not a refresh_interval later
      local ok, err = _M.refresh(wx, "start")
      if not ok then
        log(wx).warn("wechatpay: platform certificate download failed",
                   { mchid = c.mchid, error = tostring(err) })
      end
    elseif next(wx.certs) == nil then
      -- nothing held yet: retry soon, doubling, until one works
      while next(wx.certs) == nil do
        core.sleep(backoff * (0.5 + math.random()))
        local ok, err = _M.refresh(wx, "start")
        if not ok then
          if err.kind == "invalid_config" then
            log(wx).error("wechatpay: " .. err.message, { mchid = c.mchid })
            if c.mode == "certificate" then wx.config_error = err end
            return
          end
          log(wx).warn("wechatpay: platform certificate download failed",
                     { mchid = c.mchid, error = tostring(err) })
          backoff = math.min(backoff * 2, c.refresh_interval)
        end
      end
    end
    while true do
      core.sleep(c.refresh_interval * (0.9 + 0.2 * math.random()))
      local ok, err = _M.refresh(wx, "timer")
      if not ok then
        log(wx).warn("wechatpay: platform certificate refresh failed",
                   { mchid = c.mchid, error = tostring(err) })
      end
    end
  end)
  return true
end

return _M
