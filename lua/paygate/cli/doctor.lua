-- paygate doctor: checks a gateway configuration end to end, one line per
-- check (ok / warn / fail, what, the fix). The configuration is a Lua file
-- returning a table (docs/troubleshooting.md describes it):
--   { wechatpay = { ...paygate.wechatpay client configuration... },
--     notify_url = "https://...", notify_ca_file = PEM,
--     notify_route = "/wechatpay/notify/:mchid",  -- its route pattern, as
--                    /metrics labels it (default: notify_url's path)
--     database = "sqlite:PATH" | "postgres://...", redis = "redis://...",
--     limits = { request_timeout = s, ... },   -- as for paygate run
--     metrics_url = "http://127.0.0.1:9090/metrics",
--     leases = { NAME = { ttl = s, route = "POST /path" } },
--     api_crl_file = PEM }
local civil = require "paygate.civil"
local common = require "paygate.cli.common"
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local x509 = require "paygate.x509"
local keys = require "paygate.cli.keys"
local http = require("paygate").http
local wconfig = require "paygate.wechatpay.config"
local verify = require "paygate.wechatpay.verify"
local wclock = require "paygate.wechatpay.clock"
local wsign = require "paygate.wechatpay.sign"
local json = require "cjson.safe"
-- a URL as a message may show it (metrics_url may hold user:password@)
local redact_url = require("paygate.redact").url

local tostring, ipairs, pairs, type, pcall = tostring, ipairs, pairs, type,
                                             pcall
local duration = common.duration

local usage = [[
usage: paygate doctor --config FILE [--merchant MCHID] [--app DIR] [--json]

Checks a gateway configuration end to end and prints one line per check
(ok, warn or FAIL, what was checked, the fix): the merchant key against
its certificate, serial formats, the APIv3 key, the clock against the API
host's Date, the TLS chain to the API host (each failure named: expired,
not yet valid, unknown CA, missing intermediate, hostname mismatch,
revoked, weak or bad signature, wrong usage, self-signed...),
reachability, one signed call (GET /v3/certificates through
paygate.wechatpay: WeChat's verdict on the signature, the APIv3 key
decrypting what it sends (warn when only a previous key does: WeChat is
not on the new one yet), the answer verified), the clock against WeChat's
signed timestamp on that answer (warn from 60 s off), the notify URL
reachable, refusing an unsigned probe and answering within WeChat's 5 s,
the server's timeouts (request, header, body) against that window, the
database and Redis, lease TTLs against the measured processing time,
certificates expiring within 30 days (the merchant's, the platform's,
each one the API host sends, by its subject, even when the chain fails,
and each one the notify URL's host sends once its handshake passes; each
with its serial, days and end date), the client's state_dir (writable:
a probe file written and removed; the certificates it keeps for the
merchant, and how old the file is), the HTTPS listener's certificate and
key (the config's tls section and, in the gateway's, the set
credentials.tls names in etcd: the pair as the listener checks it, its
days left; the key never printed).

FILE is a Lua file returning { wechatpay = {...}, notify_url = ...,
notify_ca_file = ... (the CA of a test notify URL's certificate), database
= ..., redis = ..., limits = {...}, tls = {...}, metrics_url = ..., leases =
{...}, api_crl_file = ... } (see docs/troubleshooting.md), or
the reference gateway's own config ({ gateway = {...}, merchants = {...} },
docs/gateway.md): first the gateway's own check of it (gw/config.lua
of the gateway app: --app DIR, default examples/gateway here, else that
of the checkout this paygate comes from), and each merchant's WeChat Pay
client check: what the gateway would refuse to start with; then
its merchant (the first, or --merchant MCHID) is checked with its APIv3
key file, its notify URL (public_url), its database and Redis, and the
config's limits. A merchant whose keys come from etcd (the credentials
section) is checked with the set the gateway would start with, read by
the gateway's own code: from etcd (the password from the variable or
file the section names), else the cached set (said: the credentials
line); with neither, the check fails. Nothing is written there.

--json prints one JSON object per result line instead of text (status,
kind, cause, detail, fix and the result's own fields), for scripts.

exit: 0 no check failed (warnings allowed), 1 a check failed, 2 usage or
an unreadable configuration.
]]

local SPEC = { ["--config"] = "value", ["--json"] = "flag",
               ["--merchant"] = "value", ["--app"] = "value" }

local WINDOW = 5             -- s WeChat waits for a notification's answer
local DAY = 86400
-- cert_expiry's fix for WeChat's platform certificate: the merchant does
-- not renew it; WeChat lists the next one before it ends. Whether
-- paygate.wechatpay fetches it follows the client's download_certificates
-- (nil/true: at start, every refresh_interval and on an unknown serial;
-- "manual": on an unknown serial only; false: never).
local function platform_fix(wc)
  local dl = wc.download_certificates
  if dl == false or dl == "manual" then
    return "WeChat lists the next platform certificate before this one "
      .. "ends: with download_certificates = "
      .. (dl == false and "false nothing downloads it"
          or '"manual" it is downloaded only on an unknown serial')
      .. "; fetch it with paygate certs --download and add it to "
      .. "platform_certificates, or use the WeChat Pay public key "
      .. "(public_key, public_key_id)"
  end
  return "WeChat lists the next platform certificate before this one "
    .. "ends: paygate.wechatpay downloads it (every 12 h, and on an unknown "
    .. "serial), paygate certs --download fetches it now; if none comes, "
    .. "use the WeChat Pay public key (public_key, public_key_id)"
end

-- x509 chain failure kinds: the cause in words and the fix
local CHAIN = {
  expired = { "a certificate in the chain has expired",
    "the server must install a current certificate; if it looks current, "
    .. "check this host's clock" },
  not_yet_valid = { "a certificate in the chain is not valid yet",
    "check this host's clock (NTP)" },
  unknown_authority = { "the chain ends at a CA this host does not trust",
    "WeChat's API uses a public CA: update the system CA bundle (ca-"
    .. "certificates), or fix wechatpay.ca_file; if a proxy intercepts TLS, "
    .. "trust its CA explicitly" },
  missing_intermediate = { "the server did not send the intermediate "
    .. "certificate, and it is not in the trust store",
    "the server must send its full chain; or add the intermediate to "
    .. "ca_file" },
  self_signed_untrusted = { "the server's certificate is self-signed and "
    .. "not trusted", "a proxy or test server? use the real endpoint, or "
    .. "trust that certificate in ca_file for a simulator" },
  hostname_mismatch = { "the certificate does not cover the host name",
    "check base_url (a typo, an IP address, a proxy answering for another "
    .. "host)" },
  revoked = { "the server's certificate is revoked by its CA's CRL",
    "the server must install a new certificate; do not connect" },
  revocation_unknown = { "no current CRL from the issuer was given",
    "update api_crl_file" },
  bad_signature = { "a signature in the chain does not verify (altered)",
    "the server must install the certificate exactly as its CA issued it, "
    .. "with the intermediate that signed it (a different CA with the same "
    .. "name, or an altered certificate)" },
  weak_signature = { "a certificate in the chain is signed with SHA-1/MD5 "
    .. "or has a key under 112-bit security (RSA-1024)", "the server must "
    .. "install a SHA-256 certificate over an RSA-2048 or EC key; if a "
    .. "proxy re-signs TLS, fix the proxy's certificate" },
  wrong_usage = { "the certificate is not issued for a TLS server",
    "the server must use a serverAuth certificate (extendedKeyUsage "
    .. "serverAuth, keyUsage digitalSignature or keyEncipherment) issued by "
    .. "a CA" },
  path_too_long = { "the chain is longer than its CA allows", "remove "
    .. "the extra intermediate on the server" },
}

local function load_config(path)
  common.read(path, "config")
  local chunk, err = loadfile(path)
  if not chunk then
    common.input_error("cannot load %s: %s", path,
                       require("paygate.redact").load_error(err))
  end
  local ok, conf = pcall(chunk)
  if not ok then common.input_error("%s raised: %s", path, tostring(conf)) end
  if type(conf) ~= "table" then
    common.input_error("%s must return a table", path)
  end
  return conf
end

-- The reference gateway's config ({ gateway, merchants }, examples/gateway)
-- as the checks' shape: the merchant's keys go to paygate.wechatpay as the
-- gateway passes them, its APIv3 key read as the gateway reads it (a file
-- or an environment variable, the whitespace around it dropped), its
-- notify URL the one the gateway gives WeChat. returns: the config, and
-- which merchant of how many.
local GATEWAY_OWN = { apiv3_key_file = true, apiv3_key_env = true,
                      previous_apiv3_key_files = true }
local DEFAULT_GATEWAY_DB = "sqlite:var/gateway.db"

local function from_gateway(conf, pick)
  local list, g = conf.merchants, conf.gateway
  if type(g) ~= "table" then g = {} end
  if type(list) ~= "table" or type(list[1]) ~= "table" then
    common.input_error("the gateway config has no merchants list")
  end
  local m, at
  for i, cand in ipairs(list) do
    local id = type(cand) == "table" and (cand.mchid or cand.sp_mchid)
    if pick == nil or tostring(id) == pick then
      m, at = cand, i
      break
    end
  end
  if not m then
    -- a service provider's sub-merchants are named by each payment, never
    -- listed in the config: doctor checks the provider, whose keys sign
    -- their calls (a sub-merchant's id alone said only "no merchant")
    local sp = {}
    for _, cand in ipairs(list) do
      if type(cand) == "table" and cand.sp_mchid ~= nil then
        sp[#sp + 1] = tostring(cand.sp_mchid)
      end
    end
    if #sp > 0 then
      common.usage_error("no merchant %s in the gateway config: a service "
        .. "provider's sub-merchants are not listed in the config (each "
        .. "payment names its sub_mchid), and the provider's keys sign for "
        .. "them: check it with --merchant %s (sp_mchid %s)", pick, sp[1],
        table.concat(sp, ", "))
    end
    common.usage_error("no merchant %s in the gateway config", pick)
  end
  local id = tostring(m.mchid or m.sp_mchid)
  local wc = {}
  for k, v in pairs(m) do
    if not GATEWAY_OWN[k] then wc[k] = v end
  end
  -- the key files read with the gateway's own reader, in its words (not
  -- common.read_secret, the command line's, which takes a pipe: a FIFO
  -- named in the config held doctor for good, waiting for a writer, where
  -- the gateway refuses it at start). One it refuses is a failed check
  -- (check_keys: apiv3_key), as an unreadable apiclient_key.pem is, and
  -- the other checks run: it stopped doctor with exit 2 and one line.
  local unread = {}
  local function key_file(path, key)
    local v, why, kind = wconfig.read_secret(path, key)
    if not v then
      unread[#unread + 1] = { key = key, why = why, denied = kind == "denied" }
    end
    return v
  end
  local where = "merchants[" .. at .. "]."
  if m.apiv3_key_file ~= nil and (type(m.apiv3_key_file) ~= "string"
                                  or m.apiv3_key_file == "") then
    -- no path at all: the gateway's words, not a missing file's (an empty
    -- one was read as a file named "" and "No such file or directory")
    common.input_error("config.%sapiv3_key_file: must be a file path", where)
  elseif type(m.apiv3_key_file) == "string" then
    wc.apiv3_key = key_file(m.apiv3_key_file, where .. "apiv3_key_file")
  elseif type(m.apiv3_key_env) == "string" then
    wc.apiv3_key = os.getenv(m.apiv3_key_env)
  end
  -- (the keys read go to the client's check without the unread ones,
  -- failed lines of their own: prev_at maps its "entry N" back to the
  -- file's place in the config)
  local prev_at = {}
  if type(m.previous_apiv3_key_files) == "table" then
    local keys = {}
    for j, path in ipairs(m.previous_apiv3_key_files) do
      local k = where .. "previous_apiv3_key_files[" .. j .. "]"
      if type(path) ~= "string" then
        common.input_error("config.%s: must be a file path", k)
      end
      keys[#keys + 1] = key_file(path, k)
      prev_at[#keys] = j
    end
    wc.previous_apiv3_keys = keys
  end
  -- a merchant whose keys the gateway takes from etcd (credentials
  -- section): none of them is in this file
  local cred = conf.credentials
  local etcd = type(cred) == "table" and type(cred.merchants) == "table"
               and cred.merchants[id] or nil
  local out = { from_gateway = true, unread_keys = unread,
                previous_key_at = prev_at,
                wechatpay = wc, database = g.db or DEFAULT_GATEWAY_DB,
                etcd_prefix = etcd,
                redis = g.redis, limits = conf.limits,
                -- doctor's own keys, beside the gateway's at the top level
                -- (the runtime leaves keys it does not know to the app)
                metrics_url = conf.metrics_url, leases = conf.leases,
                api_crl_file = conf.api_crl_file,
                notify_ca_file = conf.notify_ca_file,
                -- where a fix goes: the gateway's keys, not wechatpay.*
                key_prefix = "merchants[" .. at .. "].",
                -- (the APIv3 keys are its own: a file or a variable)
                key_names = { apiv3_key = "merchants[" .. at .. "]."
                  .. (m.apiv3_key_file ~= nil and "apiv3_key_file"
                      or m.apiv3_key_env ~= nil and "apiv3_key_env"
                      -- given inline (the gateway refuses it: see
                      -- gateway_config), named as it is
                      or m.apiv3_key ~= nil and "apiv3_key"
                      or "apiv3_key_file"),
                  previous_apiv3_keys = "merchants[" .. at
                  .. "].previous_apiv3_key_files" } }
  if type(g.public_url) == "string" then
    out.notify_url = g.public_url:gsub("/+$", "") .. "/wechatpay/notify/"
                     .. id
  end
  -- /metrics labels a request by the route it matched, not its path
  out.notify_route = type(conf.notify_route) == "string" and conf.notify_route
                     or "/wechatpay/notify/:mchid"
  return out, id, #list
end

-- The gateway's own check of its config (gw.config.check of the gateway
-- app in dir, default examples/gateway when present): what the gateway
-- would refuse at start, doctor fails too. returns: the checked config
-- (nil when refused), and the app's folder when its gw.config loaded.
-- The checkout this doctor comes from (lua/paygate/cli/doctor.lua in it),
-- or nil: its examples/gateway is the default app from anywhere.
local function checkout()
  local src = debug.getinfo(1, "S").source
  return type(src) == "string"
         and src:match("^@(.+)/lua/paygate/cli/doctor%.lua$") or nil
end

-- The fix for a merchant key of the other variant than sign_type's: the
-- client check's err.key_sign_type is the sign_type that takes the key.
-- sign_type left out by an SM merchant is the usual slip, a wrong key the
-- other: both are named, sign_type first (the fix named the key alone).
-- st, mk: the names of sign_type and merchant_private_key in the config.
local function variant_fix(takes, st, mk)
  if takes == wsign.SM2 then
    return "set " .. st .. ' = "' .. takes .. '" (a merchant of the '
           .. "national-crypto variant), or give " .. mk .. " the "
           .. "merchant's RSA key (apiclient_key.pem)"
  end
  return "leave " .. st .. " out (" .. wsign.RSA .. " is the default: an "
         .. "RSA merchant), or give " .. mk .. " the merchant's SM2 key"
end

local function gateway_check(out, conf, dir)
  local given = dir ~= nil
  dir = dir or "examples/gateway"
  local f = io.open(dir .. "/gw/config.lua", "rb")
  local home = not f and not given and checkout()
  if home then
    dir = home .. "/examples/gateway"           -- run from another folder
    f = io.open(dir .. "/gw/config.lua", "rb")
  end
  if not f then
    if given then
      common.usage_error("--app %s: no gw/config.lua there (the gateway "
                         .. "app's folder)", common.shown(dir))
    end
    out:warn("gateway_config", "the gateway's own check was not run: no "
             .. "gateway app at " .. dir, nil, "give its folder: --app DIR")
    return
  end
  f:close()
  local saved = package.path
  package.path = dir .. "/?.lua;" .. package.path
  local ok, gwc = pcall(require, "gw.config")
  if not ok or type(gwc) ~= "table" or type(gwc.check) ~= "function" then
    package.path = saved
    out:warn("gateway_config", "the gateway's own check did not load: "
             .. tostring(gwc):sub(1, 200), nil, nil)
    return
  end
  -- (the check requires more of the app's modules as it goes; it gets a
  -- copy: what it fills in must not change what the checks below read;
  -- dry_run: it makes none of the folders the gateway makes at start)
  gwc.dry_run = true
  local function copy(v, depth)
    if type(v) ~= "table" or depth > 20 then return v end
    local t = {}
    for k, x in pairs(v) do t[k] = copy(x, depth + 1) end
    return t
  end
  local cok, cfg, err = pcall(gwc.check, copy(conf, 0))
  local fix               -- the failure's own fix, when it has one
  package.path = saved
  if cok and cfg and type(cfg.merchants) == "table" then
    -- then, as the gateway's start does, each merchant's WeChat Pay
    -- client config (its keys loaded, the pair matched; no I/O but the
    -- files): a merchant whose keys come from etcd has none here
    local wcheck = require("paygate.wechatpay.config").check
    for _, m in ipairs(cfg.merchants) do
      if type(m) == "table" and type(m.client) == "table" and not m.etcd then
        local wok, wc, werr = pcall(wcheck, m.client)
        if not wok or not wc then
          local e = wok and werr or nil
          local msg = e and tostring(e.message or e)
                      :gsub("^wechatpay%.[%w_.%[%]]*: ", "")
                      or tostring(wc)
          local at = "merchants[" .. tostring(m.index) .. "]."
          cok, cfg, err = true, nil, "config." .. at
            .. tostring(e and e.key or "?") .. ": " .. msg
          if type(e) == "table" and e.key_sign_type then
            fix = variant_fix(e.key_sign_type, at .. "sign_type",
                              at .. "merchant_private_key")
          end
          break
        end
      end
    end
  end
  -- (the app checked is named: from another folder it is the checkout's)
  local app = common.shown(dir)
  if cok and cfg then
    out:ok("gateway_config", "the gateway (" .. app .. ") accepts its "
           .. "configuration")
    return cfg, dir
  else
    local why = cok and (type(err) == "table" and err.message
                         or tostring(err)) or tostring(cfg)
    out:fail("gateway_config", "the gateway (" .. app .. ") would refuse "
             .. "to start: " .. tostring(why), nil, fix or "fix the key it "
             .. "names (docs/gateway.md lists them)")
  end
  return nil, dir
end

-- The fix for a set etcd did not give, by its error's kind. none: no
-- set at all (else the cached one is in use, and etcd answered).
local function etcd_fix(kind, prefix, none)
  if kind == "auth" then
    return "etcd refused the user or its password: check "
           .. "credentials.etcd.user and the password it is given"
  elseif kind == "permission" then
    return "grant the user read access to the prefix (docs/etcd.md, Users"
           .. " and roles)"
  elseif not none then
    return "publish a valid set: paygate etcd publish validates it first"
  elseif kind == "invalid_credentials" then
    return "publish a valid set: paygate etcd publish validates it first;"
           .. " paygate etcd show --prefix " .. prefix .. " says what the"
           .. " set holds"
  end
  return "check credentials.etcd.endpoints and that etcd runs; paygate etcd"
         .. " show --prefix " .. prefix .. " reads it"
end

-- A set of the credentials section read as the gateway's start reads it
-- (gw/credentials.lua of the app: the section; paygate.credentials: etcd,
-- else the cache, nothing written), and one `credentials` line saying
-- which set that is: from etcd (ok), the cached one (warn when etcd did
-- not answer, fail when it refused), or none (fail). name: the set's
-- name (a merchant's mchid, "tls"); what: the line's words for it;
-- prefix: the set's, as the fixes' `paygate etcd show --prefix` takes it
-- (with --tls after it for the listener's); fields(set): how the line
-- names the set read ("merchant certificate 5A3F..."). returns: the
-- set, where it came from ("etcd" or "cache") and the source (stopped)
-- it was read with, or nil (a failed line said why).
local function etcd_set(out, raw, app, name, what, prefix, fields)
  local gwcred
  if app then
    local saved = package.path
    package.path = app .. "/?.lua;" .. package.path
    local ok, m = pcall(require, "gw.credentials")
    package.path = saved
    gwcred = ok and type(m) == "table" and type(m.section) == "function"
             and m or nil
  end
  if not gwcred then
    out:fail("credentials", what .. " not read: the gateway app's "
             .. "gw/credentials.lua did not load (see gateway_config)", nil,
             "give the gateway app's folder: --app DIR")
    return nil
  end
  local opts, why = gwcred.section(raw)
  if type(opts) == "table" and type(opts.etcd) == "table" then
    out:secret(opts.etcd.password)
  end
  if not opts then
    out:fail("credentials", what .. " not read: " .. tostring(why), nil,
             "fix the key it names (docs/etcd.md)")
    return nil
  end
  opts.write_cache = false
  local src, err = require("paygate.credentials").new(opts)
  if not src then
    out:fail("credentials", what .. " not read: config.credentials: "
             .. tostring(err and err.message or err):gsub("^credentials: ",
             ""), nil, "fix the key it names (docs/etcd.md)")
    return nil
  end
  -- the source's own log lines (serving the cached set, a set refused)
  -- are said by the line below
  local pg = require "paygate"
  local log = pg.log
  local function quiet() end
  pg.log = setmetatable({}, { __index = function() return quiet end })
  local lok, set, lerr = pcall(src.load, src, name)
  pg.log = log
  src:stop()
  if not lok then error(set, 0) end
  if not set then
    local kind = type(lerr) == "table" and lerr.kind
    local msg = tostring(type(lerr) == "table" and lerr.message or lerr)
                :gsub("^credentials: ", ""):gsub("^" .. name .. ": ", "")
    out:fail("credentials", what .. ": " .. msg,
             "the gateway would not start: it needs the set from etcd or "
             .. "its cached copy", etcd_fix(kind, prefix, true))
    return nil
  end
  local from, cause, kind = src:origin(name)
  local which = ("(revision %s, %s)"):format(tostring(set.revision),
                                             fields(set))
  local cached = "the cached set in " .. common.shown(opts.cache_dir)
                 .. " is checked " .. which
  if from == "etcd" then
    out:ok("credentials", what .. ": read from etcd " .. which
           .. ", the envelopes opened with the KEK")
  elseif kind == "unavailable" then
    out:warn("credentials", what .. ": " .. tostring(cause) .. "; "
             .. cached, "as the "
             .. "gateway starts with it: the set in use stays until etcd "
             .. "answers", "check credentials.etcd.endpoints and that etcd "
             .. "runs, then run doctor again to check the set in etcd")
  else
    out:fail("credentials", what .. ": " .. tostring(cause) .. "; "
             .. cached, "the gateway "
             .. "starts with the cached set, and takes no new set until "
             .. "this is fixed", etcd_fix(kind, prefix, false))
  end
  return set, from, src
end

-- A merchant whose keys the gateway takes from etcd (the credentials
-- section, docs/etcd.md): its set read as the gateway's start reads it,
-- by the gateway's own code -- gw/credentials.lua of the app (the
-- section checked, the etcd password read from password / _file / _env,
-- the KEK) and paygate.credentials (etcd, the envelopes opened with the
-- KEK and the set validated, else the cached set in cache_dir) -- and
-- merged into the merchant's client config as the start merges it.
-- Nothing is written: not cache_dir (the gateway's check runs dry), not
-- the cache (the gateway's workers own it; a file or lock left by
-- another user would stop them replacing it). returns: the merged
-- config, or nil when no set can be had (a failed line said why).
local function etcd_keys(out, raw, conf, id, app)
  local prefix = tostring(conf.etcd_prefix)
  local what = "merchant " .. id .. "'s keys (the set at "
               .. common.shown(prefix) .. " in etcd)"
  local set, from, src = etcd_set(out, raw, app, id, what, prefix,
    function(v)
      return "merchant certificate " .. tostring(v.serial)
    end)
  if not set then return nil end
  -- for credentials_in_use: what the running workers use beside it
  conf.etcd_checked = { set = id, revision = tostring(set.revision),
                        from_etcd = from == "etcd" }
  local wc = src:wechatpay_conf(id, conf.wechatpay)
  -- where a fix goes: the set's files, not keys of the config
  local names = {}
  for file, d in pairs(require("paygate.credentials").MERCHANT_FILES) do
    names[d.field] = prefix .. file
  end
  conf.key_names = names
  return wc
end

-- A key or certificate given as PEM text or a file path, the file read as
-- the gateway reads it (paygate.read_file: a folder, a FIFO, a device or a
-- file past 1 MiB is refused unread). The reason never holds the value: a
-- secret may have been pasted where a path belongs. returns: the PEM, or
-- nil, why, "denied" when this user may not read the file.
local function material(v, name)
  if v == nil then return nil end
  if type(v) ~= "string" or v == "" then
    return nil, name .. " must be a file path or PEM text"
  end
  if v:find("-----BEGIN", 1, true) then return v end
  local s, err = core.read_file(v, name)
  if s then return s end
  if err.kind == "empty" or err.kind == "too_large" then
    return nil, name .. ": " .. err.reason
  end
  -- EACCES, EPERM: the path may well be right, this user may not read it
  return nil, name .. " is neither PEM text (-----BEGIN...) nor a "
         .. "readable file (value not shown): " .. err.reason,
         err.kind == "denied" and "denied" or nil
end

-- Every secret of the configuration, never printed: doctor's results are
-- scrubbed of them (a message from another module may quote one).
local function secrets(out, wc)
  out:secret(wc.apiv3_key)
  if type(wc.previous_apiv3_keys) == "table" then
    for _, k in ipairs(wc.previous_apiv3_keys) do out:secret(k) end
  end
  local k = wc.merchant_private_key
  out:secret(k)
  if type(k) == "string" and not k:find("-----BEGIN", 1, true) then
    -- (what read_file refuses is not read, so there is nothing to scrub)
    out:secret((core.read_file(k, "merchant_private_key")))
  end
end

-- The setting a client key is given by: wechatpay.<key> in a client
-- config; in the gateway's, merchants[i].<key>, but the APIv3 keys are
-- apiv3_key_file / apiv3_key_env and previous_apiv3_key_files there.
local function key_name(conf, key, bare)
  local names = conf and conf.key_names
  if names and names[key] then return names[key] end
  if bare then return key end
  return (conf and conf.key_prefix or "wechatpay.") .. key
end

-- Where to put the APIv3 key: the fix's words
local function apiv3_where(conf)
  local name = key_name(conf, "apiv3_key", true)
  if name:find("apiv3_key_env$") then
    return "the variable " .. name .. " names"
  elseif name:find("apiv3_key_file$") then
    return "the file " .. name .. " names"
  elseif conf and conf.etcd_prefix then
    return "the set's " .. name .. " in etcd (paygate etcd publish)"
  end
  return name
end

-- The fix for a key or certificate file this user may not read
local DENIED_FIX = "the file is there, but this user may not read it: run "
  .. "paygate doctor as the user the gateway runs as, or give that user "
  .. "read access (chown the file to it; chmod 600)"

local function check_keys(out, wc, now, expiring, conf)
  -- where the keys are set: wechatpay.* in a client config, merchants[i].*
  -- in the gateway's (which takes paths only, never PEM text)
  local prefix = conf and conf.key_prefix or "wechatpay."
  local gateway = conf and conf.key_prefix ~= nil
  -- key and certificate
  local key, cert
  local pem, why, denied = material(wc.merchant_private_key,
                                    prefix .. "merchant_private_key")
  -- the keys whose file this user may not read: the client's own check
  -- below fails on them too, and its fix is then DENIED_FIX as well
  local denied_keys = { merchant_private_key = denied }
  if not pem then
    -- (absent: material() gives no reason, and the line read "nil")
    out:fail("merchant_key", why or (prefix .. "merchant_private_key is"
             .. " missing"), nil, denied and DENIED_FIX
             or "point it at apiclient_key.pem "
             .. (gateway and "(a path)" or "(a path), or give the PEM with "
                 .. "its BEGIN and END lines"))
  else
    local kerr
    key, kerr = crypto.private_key(pem)
    if not key then
      local kind = tostring(kerr and kerr.kind)
      out:fail("merchant_key", "the merchant private key does not load ("
               .. kind .. ")", nil, wconfig.private_key_hint(pem, kind,
                 prefix .. "merchant_private_key"))
    end
  end
  if wc.merchant_certificate then
    pem, why, denied = material(wc.merchant_certificate,
                                prefix .. "merchant_certificate")
    denied_keys.merchant_certificate = denied
    cert = pem and crypto.certificate(pem)
    if not cert then
      out:fail("merchant_certificate", "merchant_certificate does not load: "
               .. tostring(why or "not a certificate"), nil,
               denied and DENIED_FIX or "point it at apiclient_cert.pem")
    end
  end
  if key and cert then
    if crypto.check_pair(key, cert) then
      out:ok("key_certificate", "the merchant key matches its certificate "
             .. cert:serial())
    else
      out:fail("key_certificate", "the merchant key does not match "
               .. "merchant_certificate " .. cert:serial(),
               "every request would fail with 401 SIGN_ERROR",
               "use apiclient_key.pem and apiclient_cert.pem from the same "
               .. "download (the certificate tool)")
    end
    expiring[#expiring + 1] = { "merchant certificate", cert }
  elseif key then
    out:warn("key_certificate", "no merchant_certificate: the key cannot be "
             .. "checked against merchant_serial", nil,
             "set merchant_certificate = \"apiclient_cert.pem\" (its serial "
             .. "is then read from it)")
  end
  -- WeChat Pay's public key, not the merchant's own (both are "a public
  -- key" in a PEM file: the merchant platform offers both for download)
  local ppem
  if wc.public_key ~= nil then
    local pp, _, pdenied = material(wc.public_key, prefix .. "public_key")
    denied_keys.public_key = pdenied
    ppem = key and pp
  end
  local pub = ppem and crypto.public_key(ppem)
  if pub and crypto.check_pair(key, pub) then
    out:fail("public_key", "public_key is the merchant's own public key "
             .. "(the pair of merchant_private_key), not WeChat Pay's",
             "WeChat signs its answers and notifications with its own key: "
             .. "every answer would fail verification (bad_signature)",
             "put WeChat Pay's public key (pub_key.pem, downloaded beside "
             .. "its PUB_KEY_ID_ in the merchant platform) in public_key")
  end
  -- serial formats
  local serial = wc.merchant_serial
  if serial ~= nil then
    if type(serial) ~= "string" or not serial:match("^%x+$") then
      out:fail("serial_format", "merchant_serial is not hex (value not "
               .. "shown: " .. (type(serial) == "string" and #serial
               .. " characters" or type(serial)) .. ")", "the merchant "
               .. "API certificate's serial is 40 hex digits; an APIv3 key "
               .. "or a PUB_KEY_ID_ pasted here does not fit",
               "openssl x509 -in apiclient_cert.pem -noout -serial")
    elseif cert and serial:upper():gsub("^0+", "")
           ~= cert:serial():gsub("^0+", "") then
      out:fail("serial_format", "merchant_serial " .. serial .. " is not "
               .. "merchant_certificate's serial " .. cert:serial(), nil,
               "use " .. cert:serial())
    elseif #serial ~= 40 then
      out:warn("serial_format", "merchant_serial has " .. #serial .. " hex "
               .. "digits; WeChat's are 40", "a dropped leading zero "
               .. "(BigInteger.toString) or a truncated copy",
               "copy the serial from openssl x509 -noout -serial")
    else
      out:ok("serial_format", "merchant_serial is 40 hex digits")
    end
  end
  if serial == nil and cert then
    if #cert:serial() ~= 40 then
      out:warn("serial_format", "the merchant certificate's serial "
               .. cert:serial() .. " has " .. #cert:serial() .. " hex "
               .. "digits; WeChat-issued ones have 40", "is "
               .. "merchant_certificate the apiclient_cert.pem WeChat issued?",
               "use the certificate from the merchant platform's tool")
    else
      out:ok("serial_format", "merchant serial " .. cert:serial()
             .. " (from merchant_certificate)")
    end
  end
  if wc.public_key_id ~= nil then
    if type(wc.public_key_id) ~= "string"
       or not wc.public_key_id:match("^PUB_KEY_ID_%d+$") then
      out:fail("serial_format", "public_key_id is not PUB_KEY_ID_ and digits",
               nil, "copy the id shown beside the public key")
    else
      out:ok("serial_format", "public_key_id " .. wc.public_key_id)
    end
  end
  -- the APIv3 key
  local cause, fix = common.apiv3_key_problem(wc.apiv3_key)
  local unread_key                  -- the current key's file was not read
  if gateway then
    local name = key_name(conf, "apiv3_key")
    -- the key files the gateway's reader refused (from_gateway), each a
    -- failed line; the current key's stands for its "missing"
    for _, u in ipairs(conf.unread_keys or {}) do
      if u.key == name then cause, unread_key = nil, true end
      out:fail("apiv3_key", "config." .. u.key .. ": " .. u.why, nil,
               u.denied and DENIED_FIX or "point " .. u.key .. " at the"
               .. " file holding the 32-character APIv3 key (merchant"
               .. " platform, API security)")
    end
    local said = cause == nil and wc.apiv3_key == nil
    if cause then
      cause = cause .. " (" .. name .. ")"
      if wc.apiv3_key == nil then
        fix = "give " .. prefix .. "apiv3_key_file (a file holding the 32 "
              .. "characters set in the merchant platform, API security) "
              .. "or " .. prefix .. "apiv3_key_env (a variable holding them)"
      end
    end
    if cause then out:fail("apiv3_key", cause, nil, fix)
    elseif not said then
      out:ok("apiv3_key", "the APIv3 key (" .. name .. ") is 32 bytes")
    end
  elseif cause then out:fail("apiv3_key", cause, nil, fix)
  else out:ok("apiv3_key", "apiv3_key is 32 bytes") end
  -- platform certificates configured: each entry's role first (the
  -- merchant's own certificate put there makes the client blame
  -- merchant_serial)
  local pcs = wc.platform_certificates
  if type(pcs) == "string" then pcs = { pcs } end
  local misplaced = false
  local mserial = type(serial) == "string" and serial:upper():gsub("^0+", "")
                  or cert and cert:serial():gsub("^0+", "")
  for i, v in ipairs(type(pcs) == "table" and pcs or {}) do
    local p, _, pdenied = material(v, prefix .. "platform_certificates")
    denied_keys.platform_certificates = denied_keys.platform_certificates
                                        or pdenied
    local name = "platform_certificates[" .. i .. "]"
                 .. (type(v) == "string" and not v:find("-----BEGIN", 1, true)
                     and " (" .. common.shown(v) .. ")" or "")
    -- the certificates the client uses of this entry: a chain's CA
    -- certificates are its issuers (not used), a lone CA certificate is
    local used = wconfig.platform_certs_of(p and x509.chain(p) or {})
    for _, c in ipairs(used) do
      local role = keys.role(c)
      local mine = role == "merchant"
                   or c:serial():gsub("^0+", "") == mserial
      if mine then
        misplaced = true
        out:fail("platform_certificates", name .. " is the merchant's own "
                 .. "API certificate " .. c:serial() .. " (" .. c:subject()
                 .. ")", "WeChat signs with its platform certificate or "
                 .. "its public key; apiclient_cert.pem identifies you",
                 "put WeChat's platform certificate in " .. name
                 .. " (paygate certs --download), and apiclient_cert.pem in"
                 .. " merchant_certificate")
      elseif role == "CA" then
        -- the client loads it (SDKs' test platform certificates are
        -- CA:TRUE), but WeChat's are not: a root CA put here verifies
        -- nothing
        out:warn("platform_certificates", name .. " is a CA certificate "
                 .. c:serial() .. " (" .. c:subject() .. "): the client "
                 .. "uses it as a platform certificate, but WeChat's "
                 .. "platform certificates are not CA certificates; a CA "
                 .. "issues them and signs no answer", nil, "put the "
                 .. "platform certificate there (paygate certs --download);"
                 .. " WeChat's root CA, to check downloads against, goes in"
                 .. " platform_ca")
      end
      if not mine then
        expiring[#expiring + 1] = { "platform certificate", c,
                                    platform_fix(wc) }
      end
    end
  end
  -- the whole configuration, as the client checks it. Without the APIv3
  -- key (its file not read: a failed apiv3_key above) the rest of it, with
  -- a stand-in key: the client refused the missing key as "must be exactly
  -- 32 bytes", a second failed line blaming a length the key in the file
  -- may well have. Nothing is returned then (the checks that use the
  -- configuration would use the stand-in).
  local checked = wc
  if unread_key then
    checked = {}
    for k, v in pairs(wc) do checked[k] = v end
    checked.apiv3_key = string.rep("0", 32)
  end
  local c, err = wconfig.check(checked)
  if c then
    out:ok("wechatpay_config", "paygate.wechatpay accepts the configuration "
           .. "(" .. c.mode .. " mode)" .. (unread_key and "; the APIv3"
           .. " key not read (see apiv3_key)" or ""))
    if unread_key then return nil end
  else
    local name = key_name(conf, tostring(err.key))
    local msg = tostring(err.message)
    if err.key == "previous_apiv3_keys" and conf and conf.previous_key_at
    then
      -- the entry's place among the config's files, unread ones counted
      msg = msg:gsub("entry (%d+)", function(i)
        return "entry " .. (conf.previous_key_at[tonumber(i)] or i)
      end, 1)
    end
    msg = msg:sub(1, #("wechatpay." .. tostring(err.key)) + 1)
          == "wechatpay." .. tostring(err.key) .. ":"
          and name .. msg:sub(#("wechatpay." .. tostring(err.key)) + 1)
          or (msg:gsub("^wechatpay%.", prefix))
    out:fail("wechatpay_config", msg, nil,
             denied_keys[err.key] and DENIED_FIX
             or misplaced and "fix platform_certificates (see above)"
             or err.key_sign_type and variant_fix(err.key_sign_type,
                  key_name(conf, "sign_type"), name)
             or "fix " .. name)
  end
  return c
end

-- The HTTPS listener's certificate and key, wherever they come from (the
-- runtime's tls section: files; the set credentials.tls names in etcd),
-- checked one way: by the listener's own check (paygate.tls.check, what
-- a swap to them checks: the chain is PEM, the key loads, RSA or ECDSA,
-- and matches the leaf), and the certificate's time left said with the
-- others' (cert_expiry), as the merchant's pair is. l: what (the line's
-- words for the pair), cert and key (PEM text or a file's path),
-- cert_name and key_name (where each is set, for the messages), fix (how
-- to replace the pair). No line holds the key: it is scrubbed from all.
local function check_listener(out, l, expiring)
  local SERVER = "the server would not start with it"
  local cpem, cwhy, cdenied = material(l.cert, l.cert_name)
  local kpem, kwhy, kdenied = material(l.key, l.key_name)
  out:secret(kpem)
  if not cpem or not kpem then
    local name = not cpem and l.cert_name or l.key_name
    out:fail("tls_certificate", l.what .. ": " .. ((not cpem and cwhy)
             or (cpem and kwhy) or (name .. " is missing")), SERVER,
             (not cpem and cdenied or cpem and kdenied) and DENIED_FIX
             or l.fix)
    return
  end
  local cert = crypto.certificate(cpem)
  local ok, err = require("paygate.tls").check(cpem, kpem)
  if ok and cert then
    out:ok("tls_certificate", l.what .. ": the key matches the "
           .. "certificate " .. cert:serial())
  else
    local why = tostring(err and err.message or "not a certificate")
    out:fail("tls_certificate", l.what .. ": " .. (why:find("^the cert")
             and l.cert_name or l.key_name) .. ": " .. why
             .. (cert and why:find("match", 1, true) and (" "
                 .. cert:serial()) or ""), SERVER, l.fix)
  end
  if cert then
    expiring[#expiring + 1] = { l.what, cert, "renew it before then; "
                                .. l.fix }
  end
end

-- The HTTPS listener's certificates doctor can see: the config's tls
-- section (cert and key, ecdsa_cert and ecdsa_key: as paygate run takes
-- them; --tls-cert on its command line is not in the config) and, in the
-- gateway's config, the set credentials.tls names in etcd, read as the
-- gateway's start reads it (etcd_set: from etcd, else the cached set).
local function check_https(out, tls, raw, app, expiring)
  if type(tls) == "table" then
    for _, p in ipairs({ { "cert", "key" },
                         { "ecdsa_cert", "ecdsa_key" } }) do
      if tls[p[1]] ~= nil or tls[p[2]] ~= nil then
        local cn, kn = "tls." .. p[1], "tls." .. p[2]
        check_listener(out, { what = "the HTTPS listener's certificate ("
          .. cn .. ")", cert = tls[p[1]], key = tls[p[2]], cert_name = cn,
          key_name = kn, fix = "give " .. cn .. " and " .. kn .. " the "
          .. "listener's certificate chain and its key (PEM files)" },
          expiring)
      end
    end
  end
  local c = type(raw) == "table" and raw.credentials
  if type(c) ~= "table" or c.tls == nil then return end
  local prefix = tostring(c.tls)
  local shown = common.shown(prefix)
  local what = "the HTTPS listener's certificate (the set at " .. shown
               .. " in etcd)"
  local set = etcd_set(out, raw, app, "tls", what, prefix .. " --tls",
                       function(v)
                         return "certificate " .. tostring(v.serial)
                       end)
  if not set then return end
  check_listener(out, { what = what, cert = set.cert, key = set.key,
    cert_name = shown .. "cert.pem", key_name = shown .. "key.pem",
    fix = "publish the listener's certificate and key: paygate etcd "
          .. "publish --tls --prefix " .. shown .. " --dir DIR" }, expiring)
end

-- Whether host is a host name: letters, digits, dots and hyphens (what
-- goes into fetch_chain's shell command: no metacharacter, no quote).
local function host_name(host)
  return type(host) == "string" and #host <= 253
         and host:match("^[%w][%w%.%-]*$") ~= nil
end

-- The TLS chain the server sends, as PEM, through openssl s_client (the
-- HTTP client does not expose the peer's chain), or nil (none, or host is
-- no host name: an IPv6 literal, or anything a shell could read). io.popen
-- blocks the loop: acceptable here, a one-shot command with nothing else
-- running.
local function fetch_chain(host, port)
  if not host_name(host) or type(port) ~= "number" then return nil end
  local connect = host == "localhost" and "127.0.0.1" or host
  local cmd = ("timeout 10 openssl s_client -connect '%s:%d' -servername "
    .. "'%s' -showcerts </dev/null 2>/dev/null"):format(connect, port, host)
  local p = io.popen(cmd)
  if not p then return nil end
  local s = p:read("*a")
  p:close()
  local pems = {}
  for b in s:gmatch("%-%-%-%-%-BEGIN CERTIFICATE%-%-%-%-%-.-%-%-%-%-%-END "
                    .. "CERTIFICATE%-%-%-%-%-") do
    pems[#pems + 1] = b .. "\n"
  end
  return #pems > 0 and table.concat(pems) or nil
end

local function check_api(out, wc, conf, now, expiring)
  local base = (type(wc.base_url) == "string" and wc.base_url
                or wconfig.DEFAULT_BASE_URL):gsub("/+$", "")
  local scheme, host, port = base:match("^(https?)://([^/:]+):?(%d*)")
  if not host then
    out:fail("api_host", "base_url " .. redact_url(base) .. " is not a URL",
             nil,
             "https://api.mch.weixin.qq.com")
    return
  end
  if not host_name(host) then
    out:fail("api_host", "base_url's host is not a host name", nil,
             "https://api.mch.weixin.qq.com")
    return
  end
  port = tonumber(port) or (scheme == "https" and 443 or 80)
  -- the TLS chain, classified
  if scheme == "https" then
    local pem = fetch_chain(host, port)
    if pem then
      local chain = x509.chain(pem)
      local inter = {}
      for i = 2, #chain do inter[#inter + 1] = chain[i] end
      local crls = conf.api_crl_file and common.read(conf.api_crl_file,
                                                     "CRL file")
      local roots = wc.ca_file and common.read(wc.ca_file, "ca_file")
                    or "system"
      local ok, err = x509.verify_chain(chain[1], { roots = roots,
        intermediates = inter, hostname = host, purpose = "server",
        crls = crls, at = now })
      -- cert_expiry: each certificate the host sends, whether the chain
      -- verifies or not (an expired one fails it, and cert_expiry is where
      -- an operator looks for that one's date)
      for i, c in ipairs(chain) do
        expiring[#expiring + 1] = { ("TLS %s of %s (%s)"):format(i == 1
          and "certificate" or "intermediate", host, c:subject()), c,
          "the server must install its next certificate before then",
          CHAIN.expired[2] }
      end
      if ok then
        out:ok("tls_chain", host .. " sends a valid chain (" .. #chain
               .. " certificate" .. (#chain > 1 and "s" or "") .. ", leaf "
               .. chain[1]:subject() .. ")")
      else
        local c = CHAIN[err.kind] or { "the chain does not verify", nil }
        out:result{ status = "fail", kind = "tls_chain", x509_kind = err.kind,
                    cause = err.kind .. ": " .. c[1], detail = host .. ": "
                    .. tostring(err.message) .. "\nleaf " .. chain[1]:subject()
                    .. ", issuer " .. chain[1]:issuer(), fix = c[2] }
      end
    else
      out:fail("tls_chain", "no TLS handshake with " .. host .. ":" .. port,
               "openssl s_client got no certificate", "see reachability")
    end
  end
  -- reachability and the clock
  local t0 = core.mono()
  local res, err = http.request{ method = "GET", url = base
    .. "/v3/certificates", ca_file = wc.ca_file, timeout = 10,
    connect_timeout = 5 }
  local took = core.mono() - t0
  if not res then
    -- (a refused connection on loopback is a server not started, as the
    -- simulator of scripts/run once stopped: no firewall in between)
    local connect_fix = require("paygate.addr").loopback_host(host)
      and ("nothing listens on %s:%d: start the server base_url names (the"
           .. " simulator: scripts/run, or paygate run examples/simulator),"
           .. " or correct base_url"):format(host, port)
      or ("check the firewall and proxy (outbound TCP %d)"):format(port)
    out:fail("reachability", base .. ": " .. tostring(err), err.kind == "dns"
      and "the name does not resolve" or err.kind == "tls"
      and "the TLS handshake failed (see tls_chain)" or nil,
      err.kind == "dns" and "check DNS / base_url" or err.kind == "connect"
      and connect_fix or nil)
    return
  end
  out:ok("reachability", ("%s answers (HTTP %d in %d ms)"):format(base,
         res.status, took * 1000))
  local t = civil.http_date(res.headers and res.headers["date"])
  if not t then
    out:warn("clock", "the API host sent no Date header: skew not measured")
    return true
  end
  local skew = core.time() - took / 2 - t
  local abs = math.abs(skew)
  local which = skew > 0 and "ahead of" or "behind"
  if abs >= verify.WINDOW then
    out:fail("clock", ("this clock is %s %s the API host's"):format(
             duration(skew), which), "WeChat refuses requests and this side "
             .. "refuses answers 300 s or more off", "sync the clock (NTP)")
    return true, true
  elseif abs >= wclock.WARN then
    out:warn("clock", ("this clock is %s %s the API host's"):format(
             duration(skew), which), "within the 300 s window, but drifting",
             "run NTP")
  else
    out:ok("clock", ("within %d s of the API host's Date"):format(
           math.ceil(abs)))
  end
  return true
end

-- What a failed signed call means, by the client's error kind: the cause
-- in words and the fix. mode: the client's (certificate, migration,
-- public_key).
local function signed_failure(err, mode, conf, sign_type)
  local k = err.kind
  if k == "sign_error" then
    -- what WeChat blamed, as paygate certs --download reads it
    local blame, expected = common.sign_error_blame(err)
    local cause = "WeChat refused the request's signature"
    if blame == "scheme" then
      -- an SM merchant's keys against a WeChat that holds an RSA one for
      -- this mchid, or the reverse: no serial or mchid to check
      return cause, (expected and ("WeChat expects " .. expected
        .. " requests, and ") or "WeChat refused the signature type: ")
        .. key_name(conf, "sign_type") .. " is " .. tostring(sign_type)
        .. ": set it to the variant the merchant signed up for, with that "
        .. "variant's merchant_private_key and merchant_certificate (RSA "
        .. "keys for WECHATPAY2-SHA256-RSA2048, the default; SM2 keys for "
        .. "WECHATPAY2-SM2-WITH-SM3)"
    elseif blame == "mchid" then
      return cause, "WeChat does not know this merchant id: check mchid "
        .. "(the CN of merchant_certificate's subject: paygate certs "
        .. "prints it)"
    elseif blame == "serial" then
      return cause, "merchant_serial (or merchant_certificate) must name "
        .. "the API certificate WeChat holds for this mchid (merchant "
        .. "platform, API security), and merchant_private_key must be its key"
    elseif blame == "timestamp" then
      return cause, "sync this host's clock (NTP): WeChat refuses a "
        .. "timestamp 5 minutes off"
    elseif blame == "signature" then
      return cause, "merchant_private_key is not the key of the certificate "
        .. "merchant_serial names: use apiclient_key.pem and "
        .. "apiclient_cert.pem from the same download (give "
        .. "merchant_certificate: key_certificate checks the pair)"
    end
    return cause, "merchant_serial (or "
      .. "merchant_certificate) must name the API certificate WeChat holds "
      .. "for this mchid (merchant platform, API security), and "
      .. "merchant_private_key must be its key; check mchid too"
  elseif k == "no_auth" or k == "mch_not_exists" then
    return "WeChat does not let this merchant make the call", "check mchid "
      .. "(and sp_mchid for a service provider)"
  elseif k == "decrypt_failed" then
    return "the APIv3 key does not decrypt the certificates WeChat sent",
      conf and conf.key_names and "put the APIv3 key set in the merchant "
      .. "platform (API security) in " .. apiv3_where(conf) .. " (after a "
      .. "change, the old one in " .. key_name(conf, "previous_apiv3_keys")
      .. "); paygate decrypt names why a ciphertext fails"
      or "set apiv3_key to the APIv3 key set in the merchant platform (API "
      .. "security); paygate decrypt names why a ciphertext fails"
  elseif k == "unknown_serial" and err.wechat_public_key_id then
    -- the configured public key verified the answer under another id:
    -- the id is what is wrong, not the key
    return "WeChat's answer does not verify with the keys configured",
      "set public_key_id to " .. err.wechat_public_key_id .. ", the id "
      .. "shown beside the WeChat Pay public key in the merchant platform "
      .. "(API security): public_key is right"
  elseif k == "bad_signature" or k == "unknown_serial" then
    return "WeChat's answer does not verify with the keys configured",
      mode == "certificate" and "platform_certificates must be WeChat's "
      .. "(paygate certs --download)" or "public_key must be the WeChat "
      .. "Pay public key shown beside public_key_id in the merchant "
      .. "platform"
  elseif k == "stale_timestamp" then
    return "WeChat's answer carries a timestamp 300 s or more off this "
      .. "clock", "sync the clock (NTP)"
  elseif k == "invalid_config" then
    return "the configuration does not fit what WeChat has for this "
      .. "merchant", "configure public_key and public_key_id"
  elseif err.retryable or k == "system_error" or k == "timeout"
         or k == "connect" or k == "dns" or k == "tls" then
    return "the API host did not serve a signed call", "retry later; if it "
      .. "lasts, check base_url and the network"
  end
  return "the signed call failed", nil
end

-- One signed call through paygate.wechatpay, as the gateway makes them:
-- GET /v3/certificates. WeChat checks the request's signature (merchant
-- key, serial, mchid); in certificate and migration mode the answer's
-- certificates are decrypted with the APIv3 key and its signature is
-- verified with the configured keys (the public key in migration mode,
-- where the request names its id). In public-key mode WeChat answers 404
-- RESOURCE_NOT_EXISTS, an unsigned error: the signature is checked, the
-- public key and the APIv3 key are not (the first signed answer and the
-- first notification check them).
local function signed_call(out, wc, cfg, clock_bad, dconf, expiring, seen)
  local conf = {}
  for k, v in pairs(wc) do conf[k] = v end
  conf.backup_url, conf.timeout, conf.deadline = false, 10, 20
  conf.max_attempts = 2   -- one retry: a failing host is named, not waited out
  conf.state_dir, conf.shared_dict = nil, nil
  if cfg.mode ~= "public_key" then conf.download_certificates = "manual" end
  if dconf and dconf.key_names then
    -- the client's messages (a wrong APIv3 key) name the keys of the
    -- config checked: the gateway's merchants[i].apiv3_key_file, an etcd
    -- set's file -- the gateway's own client names them so too
    conf.key_names = { apiv3_key = key_name(dconf, "apiv3_key"),
      previous_apiv3_keys = key_name(dconf, "previous_apiv3_keys") }
  end
  -- the client's own log lines (a certificate expiring soon...) are the
  -- other checks' business here: doctor prints its lines only
  local pg = require "paygate"
  local log = pg.log
  local function quiet() end
  pg.log = setmetatable({}, { __index = function() return quiet end })
  -- one signed call with conf's keys. returns: the client made (or nil),
  -- the certificates got (nil on a failure), err
  local function attempt(cf)
    local wx, err = require("paygate.wechatpay").client(cf)
    local n
    if not wx then return nil, nil, err end
    if cfg.mode == "public_key" then
      local res
      res, err = wx:request("GET", "/v3/certificates")
      n = res and 0
    else
      n, err = wx:refresh_certificates()
      if n then
        -- the platform certificates WeChat sends, for cert_expiry: the
        -- gateway downloads them (none configured), and one expiring is
        -- what a merchant must see before answers stop verifying. A
        -- configured one is listed already.
        local listed, got = {}, {}
        for _, e in ipairs(expiring) do listed[e[2]:serial()] = true end
        for serial, c in pairs(wx.certs or {}) do
          if not listed[serial] then got[#got + 1] = c end
        end
        table.sort(got, function(a, b) return a:serial() < b:serial() end)
        for _, c in ipairs(got) do
          expiring[#expiring + 1] = { "platform certificate", c,
                                      platform_fix(wc) }
        end
      end
    end
    -- the skew the client read from the answers that verified, as the
    -- gateway's clients record it (paygate.wechatpay.clock)
    seen.skew, seen.err = wx:clock_skew(), err
    wx:stop()
    return wx, n, err
  end
  -- Previous APIv3 keys (a rotation under way) are left out of the first
  -- call: certificates that decrypt only under one of them say that
  -- WeChat still encrypts with the old key, which "ok" would hide until
  -- the old key is removed and every notification fails.
  local prev = cfg.mode ~= "public_key"
    and type(conf.previous_apiv3_keys) == "table"
    and #conf.previous_apiv3_keys > 0 and conf.previous_apiv3_keys
  if prev then conf.previous_apiv3_keys = nil end
  local wx, n, err = attempt(conf)
  local only_previous = false
  if prev and wx and not n and err and err.kind == "decrypt_failed" then
    conf.previous_apiv3_keys = prev
    wx, n, err = attempt(conf)
    only_previous = n ~= nil
  end
  pg.log = log
  if not wx then
    out:fail("signed_call", tostring(err.message), nil, nil)
    return
  end
  local serial = cfg.merchant_serial
  if only_previous then
    out:warn("signed_call", "GET /v3/certificates signed with serial "
             .. tostring(serial) .. ": WeChat accepted the signature, but "
             .. "the certificates decrypt only with a previous APIv3 key ("
             .. key_name(dconf, "previous_apiv3_keys") .. "), not with "
             .. key_name(dconf, "apiv3_key") .. ": WeChat still encrypts "
             .. "with the old key", "removing the previous key now would "
             .. "fail every certificate download and notification",
             "set the new APIv3 key in the merchant platform (API "
             .. "security), then run doctor again; keep the previous key "
             .. "until it passes, and a day after (notifications under way)")
    return
  end
  if n then
    out:ok("signed_call", "GET /v3/certificates signed with serial "
           .. tostring(serial) .. ": WeChat accepted the signature; "
           .. (cfg.mode == "public_key" and "the answer's signature "
               .. "verified with the public key"
               or "the certificates decrypted with the APIv3 key and the "
               .. "answer's signature verified"))
    return
  end
  if cfg.mode == "public_key" and err.status == 404
     and err.code == "RESOURCE_NOT_EXISTS" then
    out:ok("signed_call", "GET /v3/certificates signed with serial "
           .. tostring(serial) .. ": WeChat accepted the signature (404 "
           .. "RESOURCE_NOT_EXISTS: no platform certificate, as in public-"
           .. "key mode)", "WeChat signs no error answer: the public key "
           .. "and the APIv3 key are checked by the first signed answer "
           .. "and the first notification")
    return
  end
  if cfg.mode == "migration" and err.status == 404
     and err.code == "RESOURCE_NOT_EXISTS" then
    -- the certificates were voided (the migration's last step): the
    -- public key verifies alone; what is left is the config's cleanup
    out:warn("signed_call", "GET /v3/certificates signed with serial "
             .. tostring(serial) .. ": WeChat accepted the signature (404 "
             .. "RESOURCE_NOT_EXISTS: no platform certificate any more)",
             "the platform certificates were voided (the migration's last "
             .. "step): WeChat signs with the public key "
             .. tostring(cfg.public_key_id) .. " alone, which this config "
             .. "has", "remove platform_certificates and "
             .. "download_certificates (public-key mode)")
    return
  end
  local cause, fix = signed_failure(err, cfg.mode, dconf,
    cfg.sm and "WECHATPAY2-SM2-WITH-SM3" or "WECHATPAY2-SHA256-RSA2048")
  if err.kind == "sign_error" and clock_bad
     and common.sign_error_blame(err) ~= "timestamp" then
    -- WeChat refuses a timestamp 5 minutes off as a bad signature
    fix = "sync the clock first (see clock above): WeChat refuses a "
          .. "timestamp 5 minutes off with SIGN_ERROR; then, if it stays, "
          .. fix
  end
  out:fail("signed_call", cause .. ": " .. tostring(err.message),
           err.request_id and "Request-ID " .. err.request_id or nil, fix)
end

-- The clock against WeChat's, from the Wechatpay-Timestamp of the signed
-- call's verified answer (WeChat's clock, signed, where the clock check's
-- Date header is the API host's, unsigned), judged as the gateway's
-- clients judge it: a warning from clock.WARN s, failure at the window
-- (an answer refused as stale: it will fail). Nothing when no answer was
-- signed (public-key mode's 404, a failed call).
local function check_clock_skew(out, skew, err)
  if not skew then
    if err and err.kind == "stale_timestamp" and type(err.skew) == "number"
    then
      out:fail("clock_skew", ("WeChat's signed answer puts this clock %s "
        .. "%s WeChat's"):format(duration(err.skew), err.skew > 0
        and "ahead of" or "behind"), "its Wechatpay-Timestamp is "
        .. verify.WINDOW .. " s or more off: WeChat refuses this side's "
        .. "requests (401 SIGN_ERROR) and this side refuses its answers "
        .. "and notifications (stale_timestamp)", "sync the clock (NTP)")
    end
    return
  end
  local abs = math.abs(skew)
  local text = ("WeChat's signed answer puts this clock %s %s WeChat's "
    .. "(its Wechatpay-Timestamp)"):format(duration(skew), skew > 0
    and "ahead of" or "behind")
  -- (a verified answer is less than the window off)
  if abs >= wclock.WARN then
    out:warn("clock_skew", text, "within the " .. verify.WINDOW .. " s "
      .. "window, but drifting: at " .. verify.WINDOW .. " s WeChat "
      .. "refuses this side's requests (401 SIGN_ERROR) and this side "
      .. "refuses its answers and notifications (stale_timestamp)",
      "sync the clock (NTP)")
  else
    out:ok("clock_skew", ("within %d s of WeChat's clock (the signed "
           .. "answer's Wechatpay-Timestamp)"):format(math.max(1,
           math.ceil(abs))))
  end
end

local function check_signed(out, wc, cfg, clock_bad, dconf, expiring)
  local seen = {}
  signed_call(out, wc, cfg, clock_bad, dconf, expiring, seen)
  check_clock_skew(out, seen.skew, seen.err)
end

-- The request-duration histogram of one route from a /metrics text:
-- returns count, p99 upper bound (s), or nil. When the 99th percentile
-- is past the largest finite bucket (10 s: it is only known to be over
-- it), p99 is that bucket's bound and a third value, true, says so.
local function measured(text, method, route)
  local buckets, count = {}, 0
  for line in text:gmatch("[^\n]+") do
    local labels, v = line:match(
      "^paygate_request_duration_seconds_bucket{(.-)} (%S+)")
    if labels and labels:find('method="' .. method .. '"', 1, true)
       and labels:find('route="' .. route .. '"', 1, true) then
      local le = labels:match('le="([^"]+)"')
      if le == "+Inf" then count = tonumber(v)
      else buckets[#buckets + 1] = { tonumber(le), tonumber(v) } end
    end
  end
  if count == 0 then return nil end
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  for _, b in ipairs(buckets) do
    if b[2] >= count * 0.99 then return count, b[1] end
  end
  if not buckets[1] then return nil end
  return count, buckets[#buckets][1], true
end

-- The route patterns /metrics measures for method that a route given
-- as a path (or a prefix of one) would be labelled by: /notify/:mchid
-- for /notify/1900000001 or /notify. Up to 3, sorted.
local function measured_as(text, method, route)
  local found, seen = {}, {}
  for labels in text:gmatch("paygate_request_duration_seconds_count{(.-)}") do
    local pattern = labels:match('route="([^"]*)"')
    if pattern and labels:find('method="' .. method .. '"', 1, true)
       and pattern ~= route and not seen[pattern] then
      local p, r = {}, {}
      for seg in pattern:gmatch("[^/]+") do p[#p + 1] = seg end
      for seg in route:gmatch("[^/]+") do r[#r + 1] = seg end
      local fits = #p >= #r
      for i = 1, #r do
        if not fits then break end
        fits = p[i] == r[i] or (#p == #r and p[i]:match("^[:*]") ~= nil)
      end
      if fits then
        seen[pattern] = true
        found[#found + 1] = pattern
      end
    end
  end
  table.sort(found)
  while #found > 3 do found[#found] = nil end
  return found
end

-- a 5xx with WeChat's {"code":"FAIL"} body: the handler refusing
-- (wechatpay.notify_fail), not a proxy or a crash
local function fail_body(res)
  local t = json.decode(res.body or "")
  return type(t) == "table" and t.code == "FAIL"
end

-- Whether res is the reference gateway's answer to a notification for a
-- merchant it does not serve (gw/notify.lua: 404, FAIL, unknown merchant)
local function unknown_merchant(res)
  local t = json.decode(res.body or "")
  return type(t) == "table" and t.code == "FAIL"
         and t.message == "unknown merchant"
end

-- What kind of address host is when WeChat cannot reach it ("a loopback
-- address", "a private address"), or nil.
local function local_host(host)
  host = host:lower()
  if require("paygate.addr").loopback_host(host)
     or host:match("%.localhost$") then
    return "a loopback address"
  end
  local a, b = host:match("^(%d+)%.(%d+)%.%d+%.%d+$")
  a, b = tonumber(a), tonumber(b)
  if a == 10 or (a == 172 and b >= 16 and b <= 31)
     or (a == 192 and b == 168) or (a == 169 and b == 254)
     or host:match("^f[cd]%x%x:") or host:match("^fe80:") then
    return "a private address"
  end
  return nil
end

-- A notify URL's TLS failure, classified as tls_chain classifies the API
-- host's: the chain the server sends, verified as WeChat verifies it (a
-- public CA; notify_ca_file for a test server). returns: true when it
-- printed the failure.
local PUBLIC_CA_FIX = "WeChat trusts public CAs only: install a certificate "
  .. "from one (for a test server, notify_ca_file names its CA to doctor)"
local NOTIFY_TLS_FIX = {
  missing_intermediate = "serve the full chain: the certificate file "
    .. "(paygate run's tls.cert) holds the leaf, then the intermediates; "
    .. "openssl s_client -connect HOST:443 -showcerts shows what is sent",
  self_signed_untrusted = PUBLIC_CA_FIX,
  unknown_authority = PUBLIC_CA_FIX,
  expired = "renew the notify server's certificate; if it looks current, "
    .. "check this host's clock",
  hostname_mismatch = "install a certificate that covers the host of "
    .. "notify_url (the gateway's public_url)",
}
-- notify_url as doctor prints it: no password, and no query value (a
-- ?token=... is as secret as a password, and WeChat takes no query)
local function notify_shown(url)
  return (redact_url(url):gsub("([?&][^=&#]*=)[^&#]*", "%1***"))
end

local function notify_tls(out, url, host, port, conf, now)
  local pem = fetch_chain(host, port)
  if not pem then return end
  local chain = x509.chain(pem)
  local inter = {}
  for i = 2, #chain do inter[#inter + 1] = chain[i] end
  local roots = conf.notify_ca_file and common.read(conf.notify_ca_file,
                                                    "notify_ca_file")
                or "system"
  -- an IPv4 literal (an IPv6 one fails the pattern above) is verified
  -- without a host name: the verify's host check matches DNS names only,
  -- and would call every chain served there hostname_mismatch (before its
  -- expiry, say). A chain fault is still named; a certificate that does
  -- not cover the address verifies, and the generic message (curl's) says
  -- it.
  local ip = host:match("^%d+%.%d+%.%d+%.%d+$")
  local ok, err = x509.verify_chain(chain[1], { roots = roots,
    intermediates = inter, hostname = not ip and host or nil,
    purpose = "server", at = now })
  if ok or not err or not err.kind then return end
  local c = CHAIN[err.kind] or { "the chain does not verify", nil }
  local fix = NOTIFY_TLS_FIX[err.kind] or c[2]
  if err.kind == "missing_intermediate" and not conf.notify_ca_file then
    -- the issuer not found may be a root of the operator's own (a test
    -- CA, the simulator's notify_ca_file): doctor cannot tell which
    fix = fix .. "; a certificate of your own CA (a test): give doctor "
      .. "that CA as notify_ca_file"
  end
  out:result{ status = "fail", kind = "notify_url", x509_kind = err.kind,
              cause = notify_shown(url) .. ": TLS " .. err.kind .. ": "
              .. c[1],
              detail = host .. ": " .. tostring(err.message) .. "\nleaf "
              .. chain[1]:subject() .. ", issuer " .. chain[1]:issuer()
              .. "\nWeChat's handshake fails the same way: no notification "
              .. "reaches the handler, and the access log shows none",
              fix = fix }
  return true
end

-- cert_expiry of the notify URL's host: each certificate it sends, listed
-- as the API host's are (check_expiry: warned within 30 days, failed once
-- ended), after a probe whose TLS handshake passed. A handshake that
-- failed is named by notify_tls instead (an expired certificate there with
-- its date, in the chain's verdict): not listed twice. WeChat's handshake
-- fails once the certificate ends, and no notification is delivered. A
-- certificate already listed (the HTTPS listener's own, served at
-- public_url) is named as this host's too, not listed again.
local function notify_certs(expiring, host, port, conf)
  local pem = fetch_chain(host, port)
  if not pem then return end
  local where = port == 443 and host or host .. ":" .. port
  local LOST = "WeChat cannot deliver notifications to " .. where
    .. " once it expires (its TLS handshake fails; each notification is "
    .. "sent again for about a day, then given up)"
  local soon = LOST .. ": renew the certificate on the notify host ("
    .. (conf.from_gateway and "the host of the gateway's public_url"
        or "the host of notify_url") .. ") and install it, with its "
    .. "intermediates, before then"
    .. (conf.notify_ca_file and " (a certificate of your own CA, "
        .. "notify_ca_file: issue the next one from it; WeChat itself "
        .. "trusts public CAs only)" or "")
  local ended = "WeChat's TLS handshake fails on an expired certificate "
    .. "and delivers no notification: renew the certificate on the notify "
    .. "host (an extra expired certificate the server sends: remove it "
    .. "from the chain)"
  local listed = {}                 -- by the other checks, by fingerprint
  for _, e in ipairs(expiring) do listed[e[2]:fingerprint()] = e end
  for i, c in ipairs(x509.chain(pem)) do
    local seen = listed[c:fingerprint()]
    if seen then
      seen[1] = seen[1] .. ", which the notify host " .. where
                .. " sends,"
      seen[3] = LOST .. ": " .. (seen[3] or "renew it before then")
      seen[4] = seen[4] or ended
    else
      expiring[#expiring + 1] = { ("notify_url's TLS %s of %s (%s)")
        :format(i == 1 and "certificate" or "intermediate", where,
                c:subject()), c, soon, ended }
    end
  end
end

local function check_notify(out, conf, metrics, expiring)
  local url = conf.notify_url
  local limits = type(conf.limits) == "table" and conf.limits or {}
  local rt = limits.request_timeout or 30
  if url == nil then
    out:warn("notify_url", "no notify_url in the configuration: not checked")
  elseif type(url) ~= "string" or not url:match("^https?://[^/]+") then
    out:fail("notify_url", "notify_url is not a URL", nil,
             "https://your.host/path (no query)")
  else
    -- shown without a password a URL's user info may hold, nor the
    -- values of its query (?token=...): WeChat takes neither, both
    -- refused below
    local shown = notify_shown(url)
    local userinfo = url:match("^https?://[^/?#]*@")
    local query = url:find("?", 1, true)
    if userinfo then
      out:fail("notify_url", "notify_url " .. shown .. " holds user info"
               .. " (user@ or user:password@); WeChat refuses it", nil,
               "https://your.host/path: no user info, no query")
      -- probed without it: no credentials sent to the notify server
      url = url:gsub("^(https?://)[^/?#]*@", "%1")
      shown = notify_shown(url)
    end
    if query then
      out:fail("notify_url", "notify_url " .. shown .. " has a query "
               .. "string; WeChat refuses it", nil,
               "put what you need in the path")
    end
    if not userinfo and not query and not url:match("^https://") then
      out:warn("notify_url", "notify_url is http://; WeChat delivers only to "
               .. "https://", nil, "serve it over HTTPS with a public CA "
               .. "certificate")
    end
    local host = url:match("^https?://%[([^%]]+)%]")
                 or url:match("^https?://([^/:]+)")
    local private = host and local_host(host)
    if private then
      out:warn("notify_host", ("notify_url's host %s is %s: WeChat cannot "
               .. "reach it"):format(host, private), "fine for the "
               .. "simulator; WeChat delivers only to a public address",
               "in production give the public https:// address"
               .. (conf.from_gateway and " (the gateway's public_url)"
                   or " as notify_url"))
    end
    local t0 = core.mono()
    -- (its User-Agent and body name it: the gateway's refusal line says
    -- it came from doctor, wechatpay.is_doctor_probe)
    local wechatpay = require "paygate.wechatpay"
    local res, err = http.request{ method = "POST", url = url,
      body = wechatpay.DOCTOR_PROBE,
      headers = { ["content-type"] = "application/json",
                  ["user-agent"] = wechatpay.DOCTOR_AGENT
                                   .. require("paygate").version },
      ca_file = conf.notify_ca_file, timeout = WINDOW, connect_timeout = 3 }
    local took = core.mono() - t0
    local plain
    if not res and url:match("^https://") and err.kind ~= "dns"
       and err.kind ~= "connect"
       and not tostring(err):find("certificate", 1, true) then
      -- an https:// URL served by plain HTTP: the handshake gets no answer
      -- (the server waits for a request line) or garbage
      local r2 = http.request{ method = "GET", url = "http://"
        .. url:sub(9), timeout = 2, connect_timeout = 2 }
      plain = r2 ~= nil
    end
    local port = tonumber(url:match("^https://[^/]-:(%d+)")) or 443
    if plain then
      out:fail("notify_url", shown .. " speaks plain HTTP, not TLS: "
               .. "an https:// URL served without TLS", "the TLS handshake "
               .. "got no TLS answer (" .. tostring(err.kind) .. "), while "
               .. "an http:// request to the same host and port is "
               .. "answered", "serve the notify URL with TLS (a public "
               .. "CA certificate) or fix the port (a proxy forwarding "
               .. "443 to the application's plain-HTTP port?)")
    elseif not res and err.kind == "tls" and url:match("^https://")
           and host and notify_tls(out, url, host, port, conf, core.time()) then
      -- named by notify_tls
    elseif not res then
      out:fail("notify_url", err.kind == "timeout" and ("%s did not answer "
               .. "within %d s"):format(shown, WINDOW) or shown .. ": "
               .. tostring(err), "WeChat counts no answer within 5 s as a "
               .. "failure and sends the notification again later",
               err.kind == "timeout" and "answer within 5 s: record the "
               .. "notification durably and do the rest afterwards"
               or private and err.kind == "connect" and (conf.from_gateway
                 and "nothing listens there: start the gateway (paygate "
                     .. "run), or fix the port in its public_url"
                 or "nothing listens there: start the app that serves it "
                    .. "(paygate run APP_DIR), or fix the port in notify_url")
               or "make it reachable from the internet (DNS, firewall, "
               .. "TLS with a public CA)")
    elseif res.status >= 200 and res.status < 300 then
      out:fail("notify_url", ("%s accepted an unsigned probe (HTTP %d)")
               :format(shown, res.status), "a handler that answers success "
               .. "without verifying the signature accepts forged payments",
               "verify every notification (wx:parse_notification) and answer"
               .. " 4xx/5xx when it fails")
    elseif res.status == 404 and unknown_merchant(res) then
      -- the reference gateway's answer for a merchant its running config
      -- does not list: the route is there, the config it runs is older
      -- (the merchant added, the gateway not reloaded or the reload
      -- refused), or public_url reaches another gateway
      out:fail("notify_url", ("%s answered HTTP 404: the gateway there "
               .. "does not serve merchant %s (unknown merchant)"):format(
               shown, url:match("/wechatpay/notify/([^/?#]+)$")
                      or "of this config"), "a gateway answers so for a "
               .. "merchant not in the config it runs: WeChat's "
               .. "notifications of this merchant are refused (and sent "
               .. "again for a day) until it is", "reload the gateway so "
               .. "that it runs this config (paygate reload --pid-file F, "
               .. "or kill -HUP its master; a refused reload leaves the "
               .. "old config serving, its log says why); if it still "
               .. "answers so, " .. (conf.from_gateway and "public_url"
               or "notify_url") .. " reaches another gateway")
    elseif res.status == 404 or res.status == 405 or (res.status >= 300
           and res.status < 400) then
      out:fail("notify_url", ("%s answered HTTP %d: no handler at this "
               .. "path"):format(shown, res.status), res.status >= 300
               and res.status < 400 and "WeChat does not follow redirects"
               or "WeChat's notifications would be refused the same way "
               .. "and never reach a handler", conf.from_gateway
               -- the gateway routes POST /wechatpay/notify/:mchid itself:
               -- what is wrong is where public_url leads
               and "make public_url the address that reaches this gateway:"
               .. " WeChat POSTs to public_url + /wechatpay/notify/MCHID, "
               .. "so a proxy in front must pass that path on to it as is"
               or "route POST " .. (url:match("^https?://[^/]+(/[^?]*)")
               or "/") .. " to the notification handler (or fix "
               .. "notify_url)")
    elseif res.status >= 500 and not fail_body(res) then
      out:fail("notify_url", ("%s answered HTTP %d: %s"):format(shown,
               res.status, (res.status == 502 or res.status == 503
               or res.status == 504) and "a proxy answers, the application "
               .. "behind it does not" or "a server error, not the "
               .. "handler's refusal"), "a handler refusing an unsigned "
               .. "notification answers 4xx (or 5xx with {\"code\":"
               .. "\"FAIL\"} from notify_fail)", "start the application "
               .. "behind the proxy and check its logs")
    elseif res.status ~= 400 and res.status ~= 401 and res.status ~= 403
           and res.status < 500 then
      out:warn("notify_url", ("%s answered HTTP %d to the unsigned probe")
               :format(shown, res.status), "a handler refusing an unsigned "
               .. "notification answers 400, 401 or 403", "check that the "
               .. "path is the notification handler")
    elseif took > WINDOW / 2 then
      out:warn("notify_url", ("%s answered in %.1f s"):format(shown, took),
               "close to WeChat's 5 s", "answer sooner")
    else
      out:ok("notify_url", ("%s answered HTTP %d in %d ms (refused the "
             .. "unsigned probe, as it should)"):format(shown, res.status,
             took * 1000))
    end
    -- the handshake passed: the certificates the host sends, for
    -- cert_expiry (whatever the answer: WeChat's handshake is the same)
    if res and url:match("^https://") and host then
      notify_certs(expiring, host, port, conf)
    end
  end
  -- the server's own timeouts against WeChat's window
  -- paygate run takes numbers only: "30" in quotes stops it at start
  for _, name in ipairs({ "request_timeout", "header_timeout",
                          "body_timeout" }) do
    if limits[name] ~= nil and type(limits[name]) ~= "number" then
      out:fail("server_timeouts", ("limits.%s is a %s, not a number")
               :format(name, type(limits[name])), "paygate run refuses "
               .. "to start with it", ("write limits.%s as a number of "
               .. "seconds, without quotes"):format(name))
    end
  end
  if type(rt) ~= "number" then          -- named above: not judged
  elseif rt <= WINDOW then
    out:warn("server_timeouts", ("request_timeout %g s is within WeChat's "
             .. "%d s window"):format(rt, WINDOW), "a handler still working "
             .. "is cut off, its answer lost, and WeChat sends the "
             .. "notification again: the work is repeated",
             "set limits.request_timeout above 5 s (e.g. 15) so that slow "
             .. "work still completes; handle notifications idempotently")
  else
    out:ok("server_timeouts", ("request_timeout %g s outlasts WeChat's %d s "
           .. "window: late work still completes (WeChat retries; handle "
           .. "it idempotently)"):format(rt, WINDOW))
  end
  -- reading a notification must not be cut off inside WeChat's window
  for _, name in ipairs({ "header_timeout", "body_timeout" }) do
    local v = limits[name] or 10
    if type(v) ~= "number" then         -- named above: not judged
    elseif v <= WINDOW then
      out:warn("server_timeouts", ("%s %g s is within WeChat's %d s "
               .. "window"):format(name, v, WINDOW), "a notification "
               .. "arriving slowly (a slow network, a large body) is cut "
               .. "off before the handler sees it; WeChat counts that as a "
               .. "failure and sends it again", ("set limits.%s above "
               .. "5 s (8 or more; the default is 10)"):format(name))
    else
      out:ok("server_timeouts", ("%s %g s outlasts WeChat's %d s window")
             :format(name, v, WINDOW))
    end
  end
  if conf.metrics_url and url and type(url) == "string" then
    local path = type(conf.notify_route) == "string" and conf.notify_route
                 or url:match("^https?://[^/]+(/[^?]*)") or "/"
    local n, p99, over
    if metrics then n, p99, over = measured(metrics, "POST", path) end
    if not metrics then
      out:warn("notify_latency", ("POST %s: nothing measured yet"):format(
               path), "no answer from " .. redact_url(conf.metrics_url),
               "check metrics_url (the running gateway's admin listener, "
               .. "/metrics) and run doctor again")
    elseif not n then
      local as = measured_as(metrics, "POST", path)
      out:warn("notify_latency", ("POST %s: nothing measured yet (no "
               .. "request on that route in /metrics)"):format(path),
               as[1] and "/metrics labels a route by its pattern, and "
               .. "measures POST " .. table.concat(as, ", POST ") or nil,
               as[1] and ('set notify_route = "%s"'):format(as[1])
               or "run traffic (or the simulator) through that route and "
               .. "run doctor again; a route with a parameter is labelled "
               .. "by its pattern: set notify_route (e.g. /notify/:mchid)")
    else
      if over then
        out:fail("notify_latency", ("POST %s: of %d, more than 1%% took "
                 .. "over %g s to answer (the largest bucket /metrics "
                 .. "measures), not within %d s"):format(path, n, p99,
                 WINDOW), nil, "answer within 5 s: record first, work later")
      elseif p99 >= WINDOW then
        out:fail("notify_latency", ("POST %s: 99%% of %d answered within "
                 .. "%s s, not within %d s"):format(path, n, tostring(p99),
                 WINDOW), nil, "answer within 5 s: record first, work later")
      else
        out:ok("notify_latency", ("POST %s: 99%% of %d answered within %g s")
               :format(path, n, p99))
      end
    end
  end
end

-- The fix of a database that did not open. A PostgreSQL login the server
-- refused for good (paygate.sql's kind config: libpq's message carries
-- the SQLSTATE, or its own "no password supplied") is no server down:
-- say what was refused, naming the config key of the URL (key). doctor
-- runs with the operator's environment, not the service's, so a password
-- libpq did not find there, or found wrong (PGPASSWORD, ~/.pgpass: the
-- URL giving none), may be one the gateway finds right (its PGPASSFILE):
-- the fix says so.
local function database_fix(url, err, key)
  local fix, _, from_env = require("paygate.sql").login_fix(url, err,
                                                            "doctor", key)
  if not fix then
    return "check database (sqlite:PATH or postgres://...) and that the"
           .. " server runs"
  end
  if from_env then
    fix = fix .. "; doctor looked in your environment, not the gateway's:"
          .. " run doctor with the environment the gateway runs with (its"
          .. " service's PGPASSFILE)"
  end
  return fix
end

-- sql.open makes a missing SQLite file: a check must not (doctor run
-- from another directory would make an empty store and call it fine)
local function stores(out, conf)
  local missing = conf.database and common.sqlite_missing(conf.database)
  if missing and missing:sub(1, 1) == "/" then
    out:fail("database", "no database file " .. missing, nil, "check the "
             .. "path (a typo? the gateway makes the file on its first "
             .. "start: has it started with this config?)")
  elseif missing then
    out:fail("database", "no database file " .. missing, "a relative path"
             .. " is taken from the directory doctor runs in", "run doctor"
             .. " where the gateway runs, or give the database's absolute"
             .. " path (the gateway makes the file on its first start)")
  elseif conf.database then
    local sql = require "paygate.sql"
    local ok, db, err = pcall(sql.open, conf.database)
    if ok and db then
      local rows, qerr = db:query("SELECT 1")
      if rows then
        out:ok("database", "the database answers (" .. db.engine .. ")")
      else
        out:fail("database", "the database does not answer: "
                 .. tostring(qerr), nil, "check it is running")
      end
      db:close()
    else
      if not ok then
        -- raised: an option the URL (or opts) gives that paygate.sql
        -- refuses, as the gateway refuses it at start (exit 2); said
        -- without the line of doctor that called it
        out:fail("database", "the database URL is refused: "
                 .. tostring(type(db) == "table" and db.message or db)
                   :gsub("^[^\n]-%.lua:%d+: ", ""):match("^[^\n]*"), nil,
                 "fix that option of database (docs/storage.md lists them)")
      else
        out:fail("database", "cannot open the database: " .. tostring(err),
                 nil, database_fix(conf.database, err, conf.from_gateway
                                   and "gateway.db" or "database"))
      end
    end
  else
    out:warn("database", "no database configured: notifications cannot be "
             .. "recorded durably", nil, "set database")
  end
  if conf.redis and conf.redis_unchecked then
    out:warn("redis", "Redis not checked: " .. conf.redis_unchecked, nil,
             "fix the configuration, then run doctor again")
  elseif conf.redis then
    local redis = require "paygate.redis"
    local ok, c, err = pcall(redis.connect, conf.redis, { timeout = 3,
      connect_timeout = 2, password = conf.redis_password })
    if ok and c then
      out:ok("redis", "Redis answers PING")
      c:close()
    else
      out:fail("redis", "Redis does not answer: " .. tostring(ok and err or c),
               nil, "check redis (redis://HOST:PORT) and that it runs")
    end
  end
end

-- A store's client logs its own warning when the server refuses (the
-- PostgreSQL pool's "pool down" line on stderr): the check's line says it,
-- alone, so the runtime logs errors only meanwhile.
local function check_stores(out, conf)
  local core = require "paygate.core"
  local level = core.log_level(3)
  local ok, err = pcall(stores, out, conf)
  core.log_level(level)
  if not ok then error(err, 0) end
end

-- The set the running gateway's workers use, from metrics_url's
-- paygate_credentials_revision{set=,pid=} (one series per worker),
-- beside the set the credentials line checked: that line says what a
-- start would take (etcd's set, else the cache), not what serves now. A
-- worker that has not applied etcd's set (its watch stuck, the set
-- refused by its client) serves another revision than the one checked.
local function check_in_use(out, conf, metrics)
  local c = conf.etcd_checked
  if not c or not conf.metrics_url then return end
  local url = redact_url(conf.metrics_url)
  if not metrics then
    out:warn("credentials_in_use", "merchant " .. c.set .. ": the set the"
             .. " running gateway uses is not known", "no answer from " .. url,
             "check metrics_url (the running gateway's admin listener, "
             .. "/metrics) and run doctor again")
    return
  end
  local by, n, others = {}, 0, {}
  for labels, v in metrics:gmatch("paygate_credentials_revision{(.-)} (%S+)") do
    if labels:find('set="' .. c.set .. '"', 1, true) then
      local pid = labels:match('pid="([^"]*)"') or "?"
      n = n + 1
      if tonumber(v) ~= tonumber(c.revision) then
        by[v] = by[v] or {}
        table.insert(by[v], pid)
      end
    end
  end
  if n == 0 then
    out:warn("credentials_in_use", "merchant " .. c.set .. ": " .. url
             .. " shows no worker using a set for it", "no "
             .. 'paygate_credentials_revision series with set="' .. c.set
             .. '"' .. ": not this gateway's admin listener, or its workers"
             .. " did not load the set", "check metrics_url")
    return
  end
  local checked = c.from_etcd and "the set in etcd checked above"
                  or "the cached set checked above"
  if not next(by) then
    out:ok("credentials_in_use", ("merchant %s: the running gateway's %d"
           .. " worker%s use%s revision %s, %s"):format(c.set, n,
           n == 1 and "" or "s", n == 1 and "s" or "", c.revision, checked))
    return
  end
  for v, pids in pairs(by) do
    table.sort(pids)
    others[#others + 1] = ("revision %s (worker%s %s)"):format(v,
      #pids == 1 and "" or "s", table.concat(pids, ", "))
  end
  table.sort(others)
  out:warn("credentials_in_use", ("merchant %s: the running gateway serves"
           .. " %s, not revision %s, %s"):format(c.set,
           table.concat(others, "; "), c.revision, checked),
           c.from_etcd and "a worker takes etcd's set within moments of"
           .. " its publish; one still on another has not (its log says"
           .. " why: credentials: set refused, cannot read the set, watch"
           .. " ended)" or "etcd gave no set this doctor could use: the"
           .. " workers keep theirs (see the credentials line)",
           c.from_etcd and "read the workers' credentials log lines;"
           .. " restarting the gateway makes every worker read etcd's set"
           or nil)
end

local function check_leases(out, conf, metrics)
  if type(conf.leases) ~= "table" then return end
  local names = {}
  for name in pairs(conf.leases) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    local l = conf.leases[name]
    local ttl = type(l) == "table" and tonumber(l.ttl)
    local method, route = tostring(type(l) == "table" and l.route or "")
                          :match("^(%u+) (/%S*)$")
    if not ttl or not method then
      out:fail("lease_ttl", "leases." .. tostring(name) .. " needs ttl "
               .. "(seconds) and route (\"POST /path\")", nil, nil)
    elseif not metrics then
      out:warn("lease_ttl", ("lease %s: ttl %g s, nothing measured yet")
               :format(name, ttl), conf.metrics_url and "no answer from "
               .. redact_url(conf.metrics_url) or "no metrics_url configured",
               "run traffic (or the simulator) through the gateway, set "
               .. "metrics_url, and run doctor again")
    else
      local n, p99, over = measured(metrics, method, route)
      if not n then
        local as = measured_as(metrics, method, route)
        out:warn("lease_ttl", ("lease %s: ttl %g s, nothing measured yet "
                 .. "on %s %s"):format(name, ttl, method, route),
                 as[1] and "/metrics labels a route by its pattern, and "
                 .. "measures " .. method .. " " .. table.concat(as, ", "
                 .. method .. " ") or nil,
                 as[1] and ('set leases.%s.route = "%s %s" (the route '
                 .. 'doing its work)'):format(name, method, as[1])
                 or "run traffic through that route and run doctor again")
      elseif over then
        -- only known to be over the bound: no proof when ttl is past it
        local short = ttl <= p99
        out:result{ status = short and "fail" or "warn", kind = "lease_ttl",
          cause = ("lease %s: ttl %g s, and of %d %s %s more than 1%% take "
                   .. "over %g s (the largest bucket /metrics measures)")
                  :format(name, ttl, n, method, route, p99),
          detail = (short and "the lease expires while its holder still "
                    .. "works" or "/metrics cannot tell whether that work "
                    .. "ends within the ttl; if not, the lease expires "
                    .. "while its holder still works")
                   .. ": another worker takes it and the work is done "
                   .. "twice (a double charge)",
          fix = "renew the lease while working, or time the work (it is "
                .. "over " .. p99 .. " s) and set ttl three times above it" }
      elseif ttl <= p99 then
        out:fail("lease_ttl", ("lease %s: ttl %g s, but 99%% of %d %s %s "
                 .. "take up to %s s"):format(name, ttl, n, method, route,
                 tostring(p99)), "the lease expires while its holder still "
                 .. "works: another worker takes it and the work is done "
                 .. "twice (a double charge)", ("set ttl to at least %g s, "
                 .. "or renew the lease while working"):format(p99 * 3))
      elseif ttl < p99 * 3 then
        out:warn("lease_ttl", ("lease %s: ttl %g s against a p99 of %g s")
                 :format(name, ttl, p99), "little margin for a slow store",
                 ("set ttl to %g s or more, or renew"):format(p99 * 3))
      else
        out:ok("lease_ttl", ("lease %s: ttl %g s, 99%% of %d %s %s take "
               .. "under %g s"):format(name, ttl, n, method, route, p99))
      end
    end
  end
end

-- cert_expiry: one line per certificate listed, its days and end date.
-- An entry: { what, certificate, the fix when it ends within 30 days
-- (default: renew it), the fix once it has ended (default: renew or
-- download it) }.
local function check_expiry(out, expiring, now)
  for _, e in ipairs(expiring) do
    local c = e[2]
    local left = (c:not_after() - now) / DAY
    local d = common.days(left * DAY)
    local at = os.date("!%Y-%m-%d %H:%M UTC", c:not_after())
    if left < 0 then
      out:fail("cert_expiry", ("%s %s expired %s ago, on %s"):format(e[1],
               c:serial(), d, at), nil, e[4] or "renew or download it")
    elseif left < 30 then
      out:warn("cert_expiry", ("%s %s expires in %s, on %s"):format(e[1],
               c:serial(), d, at), nil, e[3] or "renew it before then")
    else
      out:ok("cert_expiry", ("%s %s: %s left, until %s"):format(e[1],
             c:serial(), d, at))
    end
  end
end

-- state_dir: where the client keeps the platform certificates it last
-- downloaded, read at start so that a restart while WeChat Pay is
-- unreachable still verifies. Checked as the client uses it: a folder (or
-- one that can be made where it is missing), writable by this user (a
-- probe file written as the client writes, and removed), and what it holds
-- for this merchant: the certificates, those expired, how old the file is
-- (the client rewrites it after each download, so an expired certificate
-- still there, or a file older than two refresh intervals, is a set no
-- longer saved). cfg: the client's checked configuration.
local STATE_FIX = "the gateway's log says why (\"cannot save the platform"
  .. " certificates\", \"platform certificate download failed\"); the next"
  .. " download that works writes it again"

local function check_state_dir(out, cfg, conf, now)
  local dir = cfg.state_dir
  if dir == nil then return end
  local name = key_name(conf, "state_dir")
  local shown = name .. " (" .. dir .. ")"
  if cfg.mode == "public_key" then
    out:ok("state_dir", shown .. ": public-key mode neither reads nor "
           .. "writes it")
    return
  end
  local writable_fix = "run paygate doctor as the user the gateway runs as;"
    .. " give that user write access (chown the folder to it), or point "
    .. name .. " at a folder it can write"
  local function writable(folder)
    local probe = folder:gsub("/+$", "") .. "/.paygate-doctor-"
                  .. crypto.random_nonce(8)
    local ok, err = core.write_file(probe, "", 384)       -- 0600
    if ok then os.remove(probe) end
    return ok, err
  end
  local kind = core.file_type(dir)
  if kind == nil then
    -- not there: the client makes it (mkdir -p) at its first save, which
    -- needs the nearest folder above it to be writable
    local up = dir:gsub("/+$", "")
    local above
    repeat
      up = up:match("^(.*)/[^/]*$")
      if up == "" then up = "/" end
      local k = core.file_type(up or ".")
      if k then above = { path = up or ".", kind = k } end
    until above or not up or up == "/"
    if not above or above.kind ~= "directory" then
      out:fail("state_dir", shown .. " cannot be made: "
               .. (above and (above.path .. " is not a folder")
                   or "no folder above it"), nil,
               "point " .. name .. " at a folder the gateway's user can "
               .. "write")
      return
    end
    local ok, err = writable(above.path)
    if not ok then
      out:fail("state_dir", shown .. " does not exist and cannot be made "
               .. "by this user: " .. tostring(err.message), nil,
               writable_fix)
      return
    end
    if not cfg.download then
      out:ok("state_dir", shown .. " does not exist: nothing is saved "
             .. "there with download_certificates = false")
      return
    end
    out:warn("state_dir", shown .. " does not exist yet: the first "
             .. "certificate download makes it, and until then a restart "
             .. "while WeChat Pay is unreachable has no certificate to "
             .. "verify with", nil, "start the gateway with WeChat Pay "
             .. "reachable; if it does not appear, " .. STATE_FIX)
    return
  elseif kind ~= "directory" then
    out:fail("state_dir", shown .. " is a " .. (kind == "file" and "file"
             or "special file") .. ", not a folder: the certificates "
             .. "cannot be saved", nil, "point " .. name .. " at a folder "
             .. "the gateway's user can write")
    return
  end
  local ok, err = writable(dir)
  if not ok then
    out:fail("state_dir", shown .. " is not writable by this user: "
             .. tostring(err.message), nil, writable_fix)
    return
  end
  -- what it holds for this merchant (the file the client reads)
  local certs = require "paygate.wechatpay.certs"
  local wx = { conf = cfg }
  local path = certs.state_path(wx)
  local pem, rerr = core.read_file(path, "the state file")
  if not pem and rerr.kind == "not_found" and cfg.sm then
    -- (an SM client reads the RSA name when its own is missing)
    path = certs.state_path(wx, true)
    pem, rerr = core.read_file(path, "the state file")
  end
  if not pem then
    if rerr.kind == "not_found" and not cfg.download then
      out:ok("state_dir", shown .. " is writable; nothing is saved there "
             .. "with download_certificates = false")
    elseif rerr.kind == "not_found" then
      out:warn("state_dir", shown .. " is writable and holds no platform "
               .. "certificate of merchant " .. cfg.mchid .. " yet: a "
               .. "restart while WeChat Pay is unreachable has none to "
               .. "verify with", nil, "it is written at each certificate "
               .. "download; if it does not appear once the gateway runs, "
               .. STATE_FIX)
    else
      out:fail("state_dir", path .. " cannot be read: "
               .. tostring(rerr.reason), nil, writable_fix)
    end
    return
  end
  local chain = x509.chain(pem)
  if not chain then
    out:warn("state_dir", path .. " holds no certificate doctor can read:"
             .. " the gateway ignores it at start", nil, "remove it; "
             .. STATE_FIX)
    return
  end
  local _, mtime = core.file_type(path)
  local age = type(mtime) == "number" and math.max(0, now - mtime) or nil
  local held, expired = {}, {}
  for _, c in ipairs(chain) do
    if c:not_after() <= now then
      expired[#expired + 1] = c:serial() .. " ended "
        .. os.date("!%Y-%m-%d", c:not_after())
    else
      held[#held + 1] = c:serial() .. " until "
        .. os.date("!%Y-%m-%d", c:not_after())
    end
  end
  local what = ("%s: %d platform certificate%s of merchant %s (%s)%s"):format(
    shown, #chain, #chain == 1 and "" or "s", cfg.mchid,
    table.concat(held, ", ") .. ((#held > 0 and #expired > 0) and ", "
                                 or "") .. table.concat(expired, ", "),
    age and (", written " .. duration(age) .. " ago") or "")
  -- the client rewrites the file after each download that works (at
  -- start, every refresh_interval): a file much older, or holding an
  -- expired certificate, is not being saved
  local stale = cfg.download and not cfg.download_manual and age
                and age > 2 * cfg.refresh_interval
  if #held == 0 then
    out:fail("state_dir", what .. ": none valid, a restart while WeChat "
             .. "Pay is unreachable has none to verify with", nil,
             STATE_FIX)
  elseif #expired > 0 or stale then
    out:warn("state_dir", what .. ": " .. (#expired > 0 and (#expired
             .. " expired") or "") .. ((#expired > 0 and stale) and "; "
             or "") .. (stale and ("older than two refresh intervals ("
             .. duration(2 * cfg.refresh_interval) .. ")") or "")
             .. ": the gateway's downloads are not saved there, or it has"
             .. " not run since", nil, STATE_FIX)
  else
    out:ok("state_dir", what)
  end
end

-- The top-level keys doctor reads, by the config's shape; a key one slip
-- from one of them is named (notify_ulr = ... otherwise left notify_url
-- "not checked" without a word: the runtime leaves the keys it does not
-- know to the app, so an unknown key alone says nothing).
local function key_set(words)
  local t = {}
  for k in words:gmatch("%S+") do t[k] = true end
  return t
end
local CLIENT_KEYS = key_set([[wechatpay notify_url notify_ca_file
  notify_route database redis limits tls metrics_url leases api_crl_file
  merchants gateway]])
local GATEWAY_KEYS = key_set([[gateway merchants credentials limits tls
  metrics_url leases api_crl_file notify_ca_file notify_route wechatpay]])

local function check_key_names(out, conf, known)
  local names = {}
  for k in pairs(conf) do
    if type(k) == "string" and not known[k] and #k <= 64
       and k:match("^[%w_%-]+$") then
      names[#names + 1] = k
    end
  end
  table.sort(names)
  for _, k in ipairs(names) do
    local near = wconfig.nearest(k, known)
    if near then
      out:warn("config_key", ("%s is not a key doctor reads (did you mean "
               .. "%s?)"):format(k, near), "so " .. near .. " is not checked",
               "rename " .. k .. " to " .. near)
    end
  end
end

local function main(args)
  local o = common.parse_options(args, SPEC)
  if not o["--config"] then
    common.usage_error("--config FILE is required")
  end
  local conf = load_config(o["--config"])
  local out = common.output(o["--json"])
  local gateway_shape = conf.wechatpay == nil and conf.merchants ~= nil
  check_key_names(out, conf, gateway_shape and GATEWAY_KEYS or CLIENT_KEYS)
  -- the runtime's tls section, and the gateway's credentials (tls)
  local https = { tls = conf.tls }
  if gateway_shape then
    local raw, id, n = conf, nil, nil
    conf, id, n = from_gateway(conf, o["--merchant"])
    if type(conf.wechatpay) == "table" then secrets(out, conf.wechatpay) end
    -- Redis's password as the gateway's own check read it (from
    -- redis_password_file / _env: kept out of the URL)
    local gcfg, app = gateway_check(out, raw, o["--app"])
    https.raw, https.app = raw, app
    local ropts = gcfg and gcfg.gateway and gcfg.gateway.redis_opts
    conf.redis_password = ropts and ropts.password
    local g = type(raw.gateway) == "table" and raw.gateway or {}
    if not gcfg and (g.redis_password_file ~= nil
                     or g.redis_password_env ~= nil) then
      -- a check without the password would say NOAUTH of a working Redis
      conf.redis_unchecked = "its password (gateway.redis_password_file /"
        .. " _env) is read by the gateway's configuration check, which"
        .. " failed (above)"
    end
    out:ok("config", ("the gateway's config: merchant %s (%d of them%s)")
           :format(id, n, n > 1 and "; --merchant MCHID picks another" or ""))
    if conf.etcd_prefix then
      -- its keys come from etcd: checked as a file-configured merchant's
      -- once read there (or from the cache), and not at all when neither
      -- gives them (failed: the gateway would not start)
      local wc = etcd_keys(out, raw, conf, id, app)
      if wc then conf.wechatpay = wc else conf.etcd_unread = true end
    end
  elseif o["--merchant"] or o["--app"] then
    common.usage_error("%s is for the gateway's config (merchants)",
                       o["--merchant"] and "--merchant" or "--app")
  end
  local now = core.time()
  local expiring = {}
  local cfg
  local wc = conf.wechatpay
  if type(wc) ~= "table" then
    out:fail("wechatpay_config", "no wechatpay table in the configuration",
             nil, "add wechatpay = { mchid = ..., ... }")
    wc = {}
  elseif conf.etcd_unread then
    -- an etcd merchant whose set could not be had (failed above): no key
    -- to check; the API host is still checked, with the merchant's entry
  else
    secrets(out, wc)
    cfg = check_keys(out, wc, now, expiring, conf)
  end
  local reached, clock_bad = check_api(out, wc, conf, now, expiring)
  if reached and cfg then
    check_signed(out, wc, cfg, clock_bad, conf, expiring)
  end
  if cfg then check_state_dir(out, cfg, conf, now) end
  check_https(out, https.tls, https.raw, https.app, expiring)
  local metrics
  if conf.metrics_url ~= nil and type(conf.metrics_url) ~= "string" then
    out:fail("metrics_url", "metrics_url is a " .. type(conf.metrics_url)
             .. ", not a URL", nil, "give the running gateway's /metrics "
             .. "URL, e.g. \"http://127.0.0.1:9090/metrics\"")
    conf.metrics_url = nil
  end
  if conf.metrics_url then
    local res = http.request{ url = conf.metrics_url, timeout = 5 }
    metrics = res and res.status == 200 and res.body or nil
  end
  check_in_use(out, conf, metrics)
  check_notify(out, conf, metrics, expiring)
  check_stores(out, conf)
  check_leases(out, conf, metrics)
  check_expiry(out, expiring, now)
  return out:code()
end

return common.run("doctor", usage, main, { ... })
