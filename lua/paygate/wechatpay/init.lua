-- paygate.wechatpay: the WeChat Pay API v3 client.
--
--   local wechatpay = require "paygate.wechatpay"
--   local wx, err = wechatpay.client(conf)      -- see docs/wechatpay.md
--   local res, err = wx:request("GET", "/v3/certificates")
--   local event, err = wx:parse_notification(req)
--   return wechatpay.notify_ack()               -- 204, ""
--
-- One client per signing merchant (the service provider in partner
-- mode); each has its own key ring.
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local config = require "paygate.wechatpay.config"
local certs = require "paygate.wechatpay.certs"
local transport = require "paygate.wechatpay.transport"
local notify = require "paygate.wechatpay.notify"
local errors = require "paygate.wechatpay.errors"
local api = require "paygate.wechatpay.api"
local upstream = require "paygate.wechatpay.upstream"
local clock = require "paygate.wechatpay.clock"

local type, tostring, setmetatable, pairs, ipairs =
      type, tostring, setmetatable, pairs, ipairs

local _M = { errors = errors }

local methods = {}
local client_mt = { __index = methods }
-- Internal: the clients' method table (every client's __index), kept
-- reachable for inspection (which methods a client has); not an
-- extension point (a function set here becomes a method of every
-- client of the worker), so docs/wechatpay.md does not list it. Nothing
-- outside this file reads it.
_M.methods = methods

-- the config keys that name a paygate.shared dict: the client's field
-- holding it, and a size to suggest
local NAMED_DICTS = { { "shared_dict", "dict", "1m" },
                      { "replay_dict", "replay_dict", "64m" } }

--- syntax: wx, err = wechatpay.client(conf)
-- returns: a client, or nil, err (kind invalid_config, err.key names the
-- configuration key at fault). May yield (the first certificate download,
-- when no platform certificate is held yet: at most startup_timeout
-- seconds, then it goes on in the background); a download failure is not
-- fatal (retried in the background) except 404 RESOURCE_NOT_EXISTS.
-- A merchant_certificate that has expired, or ends within 30 days: a
-- warning at start (the client still loads: the key signs, and whether
-- WeChat still takes the serial is WeChat's to say). It is the
-- merchant's own certificate, renewed in the merchant platform; the
-- platform certificates have their own warning and gauge (certs.lua).
local MERCHANT_WARN_DAYS = 30
local function warn_merchant_expiry(cfg)
  local na = cfg.merchant_not_after
  if type(na) ~= "number" or na == 0 then return end
  local left = na - core.time()
  if left >= MERCHANT_WARN_DAYS * 86400 then return end
  local fields = { mchid = cfg.mchid, serial = cfg.merchant_serial,
                   not_after = os.date("!%Y-%m-%dT%H:%M:%SZ", na) }
  local log = config.logger(cfg)
  if left <= 0 then
    log.warn("wechatpay: the merchant_certificate has expired: WeChat Pay"
      .. " refuses requests signed under it (401 SIGN_ERROR); renew the"
      .. " merchant API certificate in the merchant platform", fields)
  else
    fields.days_left = math.floor(left / 86400 * 10) / 10
    log.warn("wechatpay: the merchant_certificate expires soon: renew the"
      .. " merchant API certificate in the merchant platform", fields)
  end
end

-- The replay cache left on the client's own dictionary (no replay_dict,
-- and no wechatpay_replay dictionary: paygate run makes only the
-- config's): said at start, once per worker and dictionary, for other
-- writers' entries there can evict its records early, and a replay of an
-- evicted notification is then accepted. Nothing said when the owner
-- named that dictionary as replay_dict: a choice.
local replay_said = {}
local function warn_replay_dict(wx)
  local c = wx.conf
  if c.replay_dict or wx.replay_dict == nil or wx.replay_dict ~= wx.dict
     or replay_said[wx.replay_dict_name] or not config.logs(c, "warn") then
    return
  end
  replay_said[wx.replay_dict_name] = true
  config.logger(c).warn("wechatpay: the notification replay cache "
    .. "shares the " .. wx.replay_dict_name .. " dictionary (no "
    .. "wechatpay_replay dictionary is configured): other entries there "
    .. "can evict its records, and a replayed notification whose record "
    .. "was evicted is accepted; give it its own in the config, shared = "
    .. '{ wechatpay_replay = "4m" } (a restart makes it; sizing: '
    .. "docs/wechatpay.md, The replay cache)", { dict = wx.replay_dict_name,
    mchid = c.mchid })
end

function _M.client(conf)
  local cfg, err = config.check(conf)
  if not cfg then return nil, err end
  local wx = setmetatable({ conf = cfg, source = conf }, client_mt)
  certs.init(wx)
  upstream.init(wx)
  -- a dict named in the config must exist (a replay_dict missing would
  -- refuse every notification, replay_check_unavailable, once running)
  for _, d in ipairs(NAMED_DICTS) do
    local key = d[1]
    if conf[key] ~= nil and not wx[d[2]] then
      return nil, errors.new("invalid_config", "wechatpay." .. key .. ": no "
        .. "paygate.shared dict " .. tostring(cfg[key]) .. " (configure "
        .. "shared = { " .. tostring(cfg[key]) .. " = \"" .. d[3] .. "\" })",
        { key = key })
    end
  end
  local ok
  ok, err = certs.start(wx)
  if not ok then
    wx:stop()
    return nil, err
  end
  warn_merchant_expiry(cfg)
  warn_replay_dict(wx)
  return wx
end

--- syntax: res, err = wx:request(method, path_with_query, body[, opts])
-- See transport.lua for opts and the result. yields.
function methods.request(wx, method, path, body, opts)
  return transport.request(wx, method, path, body, opts)
end

--- syntax: event, err = wx:parse_notification(req[, { replay = false }])
-- returns: { id, event_type, create_time, summary, resource_type,
-- original_type, resource = {decrypted, parsed}, serial } or nil, err
-- (bad_signature, stale_timestamp, unknown_serial, replayed,
-- decrypt_failed, malformed; also cert_expired, replay_check_unavailable,
-- invalid_config, timeout: see docs/wechatpay.md). Never raises. May yield (a certificate
-- download for an unknown serial).
function methods.parse_notification(wx, req, opts)
  return notify.parse_notification(wx, req, opts)
end

--- syntax: facts = wx:notification_facts(req)
-- What a notification (typically a refused one) says that is safe to
-- record: headers' serial and timestamp, its claimed id and event_type,
-- and whether its resource decrypts under the APIv3 key (authentic), with
-- the order and refund numbers it names. See notify.facts. Never raises.
function methods.notification_facts(wx, req)
  return notify.facts(wx, req)
end

--- syntax: h, err = wx:verify_response(headers, body)
-- The check every signed response gets (downloads certificates once for
-- an unknown serial: may yield). returns the parsed headers (verify.
-- parse_headers: timestamp, ts, nonce, signature, serial, sig_type), or
-- nil, err. Public: docs/wechatpay.md, Requests and their verification.
function methods.verify_response(wx, headers, body)
  return certs.verify(wx, headers, body)
end

--- syntax: serial = wx:request_serial()
-- The Wechatpay-Serial requests carry: the public key id in public-key
-- and migration mode (WeChat then signs with that key), else the newest
-- platform certificate's serial when one is held (else nil). No I/O.
-- Public: docs/wechatpay.md, Requests and their verification.
function methods.request_serial(wx)
  if wx.conf.public_key_id then return wx.conf.public_key_id end
  return wx.ring:newest()
end

--- syntax: ciphertext_b64, serial = wx:encrypt_sensitive(plaintext)
-- Encrypts a sensitive request field for WeChat (RSA-OAEP with SHA-1
-- under the public key or the newest platform certificate; SM2 with SM3,
-- DER C1C3C2, in the SM variant), base64. Send serial as Wechatpay-Serial (opts.wechatpay_serial).
-- returns: nil, err when no key is held (unknown_serial) or the text is too
-- long for the key (invalid_params).
function methods.encrypt_sensitive(wx, plaintext)
  if type(plaintext) ~= "string" then
    error("wx:encrypt_sensitive: plaintext must be a string", 2)
  end
  local id = wx:request_serial()
  if not id and wx.conf.download then
    certs.refresh(wx, "start")
    id = wx:request_serial()
  end
  if not id then
    return nil, errors.new("unknown_serial", "encrypt_sensitive: no "
      .. "platform certificate or public key held to encrypt for")
  end
  local key, err = wx.ring:get(id)
  if not key then return nil, err end
  local ct
  if wx.conf.sm then
    -- DER SEQUENCE { x, y, C3, C2 } (C1C3C2), as OpenSSL emits it and as
    -- the one SDK with the SM variant (wechatpay-java's) is documented
    -- to send; WeChat's own pages do not spell the format out
    ct, err = crypto.sm2_encrypt(key, plaintext)
  else
    ct, err = crypto.oaep_encrypt(key, plaintext)
  end
  if not ct then
    -- a text too long for the key is the caller's: a kind of the client's
    -- (errors.KINDS), not the crypto layer's too_long
    if type(err) == "table" and err.kind == "too_long" then
      return nil, errors.invalid_params("plaintext", err.message)
    end
    return nil, err
  end
  return crypto.base64_encode(ct), id
end

-- the credential fields a swap replaces (config.check's names)
local CRED_IN = { "merchant_private_key", "merchant_certificate",
                  "merchant_serial", "apiv3_key", "public_key",
                  "public_key_id" }

--- syntax: ok, err = wx:set_credentials(creds)
-- Swaps the merchant's credentials in the running client, e.g. after a
-- rotation published in etcd (paygate.credentials): creds holds
-- merchant_private_key and merchant_certificate (PEM), apiv3_key, and
-- optionally public_key + public_key_id and previous_apiv3_keys, each as
-- wechatpay.client takes them. The whole set is checked first (the key matches the certificate,
-- key types, the APIv3 key's length); on any failure nothing changes and
-- nil, err (invalid_config, err.key) comes back. On success the next
-- signature uses the new key and serial (a request already signed keeps
-- its own), creds.previous_apiv3_keys and the APIv3 keys in use until
-- now (two at most) still decrypt, and a
-- new public key joins the key ring beside the old one. Never yields.
function methods.set_credentials(wx, creds)
  if type(creds) ~= "table" then
    error("wx:set_credentials: creds must be a table", 2)
  end
  local conf = {}
  for k, v in pairs(wx.source) do conf[k] = v end
  for _, k in ipairs(CRED_IN) do conf[k] = creds[k] end
  if conf.merchant_certificate == nil and conf.merchant_serial == nil then
    return nil, errors.new("invalid_config", "wechatpay.merchant_certificate"
      .. ": a credential swap needs the merchant certificate",
      { key = "merchant_certificate" })
  end
  local old = wx.conf
  local prev, seen = {}, { [creds.apiv3_key or ""] = true }
  -- the set's own previous keys (an APIv3 rotation published with the old
  -- key), then the ones in use until now (two at most)
  for _, k in ipairs(type(creds.previous_apiv3_keys) == "table"
                     and creds.previous_apiv3_keys or {}) do
    if not seen[k] then prev[#prev + 1], seen[k] = k, true end
  end
  local kept = 0
  for _, k in ipairs(old.apiv3_keys) do
    if not seen[k] and kept < 2 then
      prev[#prev + 1], seen[k], kept = k, true, kept + 1
    end
  end
  conf.previous_apiv3_keys = prev
  local cfg, err = config.check(conf)
  if not cfg then return nil, err end
  -- no yield from here on: every request sees the old set or the new one
  old.signer = cfg.signer
  old.merchant_serial = cfg.merchant_serial
  old.apiv3_keys = cfg.apiv3_keys
  if cfg.public_key then
    wx.ring:put(cfg.public_key_id, cfg.public_key)
    old.public_key, old.public_key_id = cfg.public_key, cfg.public_key_id
    if old.mode == "certificate" then old.mode = "migration" end
  end
  old.merchant_not_after = cfg.merchant_not_after
  wx.source = conf
  warn_merchant_expiry(cfg)          -- the new certificate, as at start
  return true
end

--- syntax: st = wx:certificate_status()
-- returns: { mode, serials, newest, days_left, public_key_id }
function methods.certificate_status(wx)
  return certs.status(wx)
end

--- syntax: skew, at = wx:clock_skew()
-- This host's clock minus WeChat Pay's, in seconds (positive: this host
-- ahead), read from the Wechatpay-Timestamp of the latest verified
-- answer to this client's calls, and when it was taken (this host's
-- clock); nil before the first. See clock.lua. No I/O.
function methods.clock_skew(wx)
  return clock.skew(wx)
end

--- syntax: ok, err = wx:refresh_certificates()
-- Downloads the platform certificates now (single-flight). yields.
-- returns: true, or nil, err; invalid_config (key download_certificates)
-- from a client that downloads none (public-key mode,
-- download_certificates = false), nothing sent.
function methods.refresh_certificates(wx)
  return certs.refresh(wx, "manual")
end

--- syntax: wx:stop() -- stops the background refresh (wx:close() with no
-- argument does the same; wx:close(out_trade_no) closes an order)
function methods.stop(wx)
  if wx.refresher then
    wx.refresher:cancel()
    wx.refresher = nil
  end
  if wx.reporter then
    wx.reporter:cancel()
    wx.reporter = nil
  end
end

--- syntax: ok, err = wx:degrade(on)
-- The degradation switch (on: true or false), kept in the client's
-- shared dict, so every worker and every client on that dict sees it at
-- its next call. While on, every call fails fast with kind `degraded`
-- (retryable) and nothing is sent. Nothing yields.
function methods.degrade(wx, on)
  if type(on) ~= "boolean" then
    error("wx:degrade: on must be a boolean", 2)
  end
  local ok, err = wx.updict:set(upstream.DEGRADED_KEY, on)
  if not ok then return nil, err end
  return true
end

--- syntax: on = wx:degraded() -- the switch as every worker sees it
function methods.degraded(wx)
  return wx.updict:get(upstream.DEGRADED_KEY) == true
end

--- syntax: st = wx:upstream_status()
-- returns: { degraded, endpoints = { ["GET /v3/..."] = { timeout, p95,
-- samples, breaker, calls, failures } } }: timeouts and latencies as
-- this worker saw them, breakers as the instance shares them.
function methods.upstream_status(wx)
  return upstream.status(wx)
end

--- syntax: bs = wx:breakers()
-- returns: { ["GET /v3/..."] = { breaker, retry_after, calls, failures } }:
-- upstream_status()'s breakers alone, read from the shared dict (no
-- latency work: cheap enough for a gauge refreshed every second)
function methods.breakers(wx)
  return upstream.breakers(wx)
end

--- syntax: ok, err = wechatpay.degrade(on[, dict])
-- The same switch without a client (an admin endpoint): dict is the
-- paygate.shared dict or its name (default "paygate", the clients'
-- default shared_dict). Raises when the dict does not exist.
function _M.degrade(on, dict)
  return upstream.set_degraded(on, dict)
end

--- syntax: on = wechatpay.degraded([dict])
function _M.degraded(dict)
  return upstream.degraded(dict)
end

for name, fn in pairs(api) do
  if methods[name] == nil then methods[name] = fn end
end

-- paygate doctor's unsigned notify probe (lua/paygate/cli/doctor.lua):
-- its body, and its User-Agent ("paygate-doctor/" and the version).
_M.DOCTOR_PROBE = '{"id":"paygate-doctor-probe","event_type":"DOCTOR.PROBE"}'
_M.DOCTOR_AGENT = "paygate-doctor/"

--- syntax: yes = wechatpay.is_doctor_probe(req)
-- Whether a request is paygate doctor's notify probe: told by the whole
-- request (its User-Agent, its fixed body, no Wechatpay-* header), never
-- by a header alone. For the WORDING of a refusal only (a log line that
-- says where it came from): call it on a request parse_notification has
-- refused, and refuse it all the same. Anyone can send those bytes; they
-- carry nothing to accept.
function _M.is_doctor_probe(req)
  if req.body ~= _M.DOCTOR_PROBE then return false end
  local ua = req:header("user-agent")
  if type(ua) ~= "string" or ua:sub(1, #_M.DOCTOR_AGENT) ~= _M.DOCTOR_AGENT
  then
    return false
  end
  for name in pairs(req.headers) do
    if type(name) == "string" and name:sub(1, 10) == "wechatpay-" then
      return false
    end
  end
  return true
end

--- syntax: return wechatpay.notify_ack()
-- returns: 204, "" — what WeChat Pay counts as a received notification.
function _M.notify_ack() return 204, "" end

--- syntax: return wechatpay.notify_fail(message[, status])
-- returns: status (default 500; any 4xx or 5xx), { code = "FAIL",
-- message = message }: WeChat Pay sends the notification again on either.
function _M.notify_fail(message, status)
  if status ~= nil and (type(status) ~= "number" or status < 400
                        or status > 599 or status % 1 ~= 0) then
    error("wechatpay.notify_fail: status must be a 4xx or 5xx code", 2)
  end
  return status or 500, { code = "FAIL",
                          message = tostring(message or "failed") }
end

return _M
