-- gw.config: the gateway's configuration, checked at start.
--
--   local cfg, why = config.check(paygate.config_copy(), runtime)
--   -- why: "config.gateway.db: ..." -- one line, never a secret
--
-- Secrets never come from the config text: the APIv3 key from a file
-- (apiv3_key_file) or an environment variable (apiv3_key_env), the
-- merchant's private key as a path, webhook secrets and the admin token
-- likewise. A secret pasted into the config is refused with a reason
-- that does not repeat it.
local core = require "paygate.core"
local sql = require "paygate.sql"
local addr = require "paygate.addr"
local validate = require "paygate.wechatpay.validate"
local errors = require "paygate.wechatpay.errors"
local wxconfig = require "paygate.wechatpay.config"
local suggest = require "paygate.suggest"
local log = require("paygate").log

local type, pairs, ipairs, tostring, tonumber = type, pairs, ipairs,
      tostring, tonumber

local _M = {}

local GATEWAY_KEYS = {
  db = true, redis = true, public_url = true, payment_ttl = true,
  on_late_payment = true, degraded = true, admin_token_file = true,
  admin_token_env = true, webhooks = true, redis_stream = true,
  redis_password_file = true, redis_password_env = true,
  reconcile = true, retention = true, dev_app = true, dispatcher = true,
  console = true, hooks_timeout = true, capture_dir = true,
  refusal_log = true,
}

-- Keys of a merchant the gateway reads itself; the rest go to
-- paygate.wechatpay.client as they are.
local OWN_MERCHANT_KEYS = {
  apiv3_key_file = true, apiv3_key_env = true,
  previous_apiv3_key_files = true,
}

local DEFAULT_DB = "sqlite:var/gateway.db"

local function fail(key, reason)
  return nil, "config." .. key .. ": " .. reason
end

-- The file a *_file key names: the runtime's reader of a config's secret
-- files (paygate.wechatpay.config.read_secret, which `paygate doctor`
-- reads this config with too): a folder, a FIFO or a device, an empty
-- file or one past 1 MiB is refused there; the reason never repeats the
-- value (it may be the secret itself, pasted where its path belongs).
-- returns: the bytes, surrounding whitespace dropped, or nil, reason.
local read_secret = wxconfig.read_secret

-- A secret named by <base>_file or <base>_env in table t.
-- returns: the value, or nil (neither given), or false, reason.
-- (fkey, ekey: the keys' own names when they are not base_file and
-- base_env, e.g. a header value's { file = ... } or { env = ... })
local function secret(t, base, where, fkey, ekey)
  fkey, ekey = fkey or (base .. "_file"), ekey or (base .. "_env")
  local file, env = t[fkey], t[ekey]
  if file ~= nil and env ~= nil then
    return false, where .. fkey .. ": give " .. fkey .. " or "
      .. ekey .. ", not both"
  end
  if file ~= nil then
    if type(file) ~= "string" or file == "" then
      return false, where .. fkey .. ": must be a file path"
    end
    local v, err = read_secret(file, where .. fkey)
    if not v then return false, where .. fkey .. ": " .. err end
    if v == "" then
      return false, where .. fkey .. ": the file is empty"
    end
    return v
  end
  if env ~= nil then
    if type(env) ~= "string" or not env:match("^[%a_][%w_]*$") then
      return false, where .. ekey .. ": must name an environment variable"
    end
    -- surrounding whitespace dropped, as a file's (a variable filled from
    -- a file, a Kubernetes secret, keeps the file's newline)
    local v = os.getenv(env)
    local s = v and v:gsub("^%s+", ""):gsub("%s+$", "")
    if s == nil or s == "" then
      -- named only when it looks like a variable's name: the secret itself
      -- may have been written here
      return false, where .. ekey .. ": the environment variable "
        .. (require("paygate.redact").name(env) or "it names")
        .. (v == nil and " is not set" or " is empty")
    end
    return s
  end
  return nil
end

-- (paygate.addr: the one answer of the gateway, the simulator and the
-- WeChat Pay client; an IPv4 client on a [::] listener is loopback too)
local is_loopback_host = addr.loopback_host
_M.is_loopback_host = is_loopback_host

--- syntax: ok = config.is_loopback_addr("127.0.0.1:5000")
_M.is_loopback_addr = addr.loopback_addr

--- syntax: yes = config.proxied(req)
-- true when a request says a proxy relayed it (Forwarded, X-Forwarded-For,
-- X-Real-IP): behind a reverse proxy on this host every visitor comes
-- from loopback, so what trusts a loopback address (the console's and the
-- admin routes' loopback mode, dev_app) refuses such a request.
function _M.proxied(req)
  return req:header("forwarded") ~= nil
         or req:header("x-forwarded-for") ~= nil
         or req:header("x-real-ip") ~= nil
end

--- syntax: ok, why = config.can_make(dir)
-- Whether config.mkdir_p(dir) can make dir, making nothing: dir, or the
-- nearest of its parents that is there, is a folder. (What mkdir(2) alone
-- can tell -- a folder not writable, a full disk -- mkdir_p says when the
-- gateway starts.) returns: true, or nil, "cannot create the folder <dir>:
-- Not a directory[ (making <parent>)]", as core.mkdir_p words it.
local function can_make(dir)
  local p, below = dir, nil
  while core.file_type(p) == nil do
    local up = p:match("^(.*[^/])/+[^/]+/*$")
    if not up then
      -- a name at the top: the working directory's, or the root's
      up = p:sub(1, 1) == "/" and "/" or "."
      if up == p then return true end
    end
    below, p = p, up
  end
  if core.file_type(p) == "directory" then return true end
  return nil, "cannot create the folder " .. dir .. ": Not a directory"
    .. ((below and below ~= dir) and (" (making " .. below .. ")") or "")
end
_M.can_make = can_make

--- syntax: ok, why = config.mkdir_p(dir[, mode])
-- Creates the folders of dir (core.mkdir_p: mkdir(2), never a shell --
-- the path comes from the config; mode default 0755, an existing one is
-- fine): the default SQLite store under var/ (app.lua, once the config is
-- checked: a start refused for its config makes nothing), the bill
-- reports, the credentials cache (0700). returns: true when dir exists,
-- else nil, "cannot create the folder <dir>: <why>". config.dry_run =
-- true (paygate doctor): check only (can_make), create nothing -- the
-- folders are made when the gateway starts.
local function mkdir_p(dir, mode)
  if _M.dry_run then return can_make(dir) end
  local ok, err = core.mkdir_p(dir, mode)
  if not ok then return nil, err.message end
  return true
end
_M.mkdir_p = mkdir_p

--- syntax: dir = config.db_dir(db)
-- The folder of an SQLite store's file ("sqlite:var/gw.db" -> "var"), nil
-- for one in the working directory or a PostgreSQL URL.
function _M.db_dir(db)
  local path = sql.sqlite_path(db)
  local dir = path and path:match("^(.*)/[^/]*$")
  if dir == "" then return nil end
  return dir
end

local function check_db(g)
  local db = g.db
  if db == nil then db = DEFAULT_DB end
  if type(db) ~= "string" then
    return fail("gateway.db", "must be \"sqlite:PATH\" or a postgres:// URL")
  end
  if db:match("^sqlite3?:") then
    local path = sql.sqlite_path(db)
    if not path then return fail("gateway.db", "sqlite: needs a path") end
    -- (made by app.lua once the whole config is checked)
    local dir = _M.db_dir(db)
    if dir then
      local ok, why = can_make(dir)
      if not ok then return fail("gateway.db", why) end
    end
  elseif not (db:match("^postgres://") or db:match("^postgresql://")) then
    -- sql.open's two schemes: postgress:// passed here and raised there
    return fail("gateway.db", "must be \"sqlite:PATH\" or a postgres:// URL")
  end
  return db
end

--- syntax: dir = config.bill_dir(gateway)
-- Where the daily bill reconciliation writes its reports:
-- gateway.reconcile.bill_dir, else a folder "reconcile" beside an SQLite
-- store (var/gateway.db -> var/reconcile); nil with PostgreSQL (the
-- instances may run anywhere: the folder must be named).
function _M.bill_dir(g)
  local rc = type(g) == "table" and g.reconcile
  if type(rc) == "table" and type(rc.bill_dir) == "string" then
    return rc.bill_dir
  end
  local path = sql.sqlite_path(type(g) == "table" and g.db or nil)
  if not path then return nil end
  return (path:match("^(.*)/[^/]*$") or ".") .. "/reconcile"
end

--- syntax: dir = config.capture_dir(gateway)
-- Where refused notifications are captured for paygate verify:
-- gateway.capture_dir, else a folder "refused" beside an SQLite store;
-- nil with PostgreSQL unless named, or when capture_dir is false.
function _M.capture_dir(g)
  local c = type(g) == "table" and g.capture_dir
  if c == false then return nil end
  if type(c) == "string" then return c end
  local path = sql.sqlite_path(type(g) == "table" and g.db or nil)
  if not path then return nil end
  return (path:match("^(.*)/[^/]*$") or ".") .. "/refused"
end

-- A folder the gateway writes into (key: its config key) that names
-- something else, a file: no restart mends it, and every write there (a
-- bill run, a capture) would fail, said only in the log. Refused at start.
-- One not there yet is made when first used (one that cannot be is said
-- then, and the gateway goes on: the reports and captures are no reason to
-- stop payments).
local function not_a_folder(key, dir)
  local kind = dir and core.file_type(dir)
  if kind and kind ~= "directory" then
    return fail(key, dir .. " is a " .. (kind == "file" and "file"
                or "special file") .. ", not a folder")
  end
  return nil
end

local function check_url(key, v, loopback_http)
  if type(v) ~= "string" then return fail(key, "must be a URL string") end
  -- an [IPv6] host first: "[^/:]+" would take "[" of http://[::1]:8080
  local scheme, host = v:match("^(https?)://(%[[^%]]+%])")
  if not scheme then
    scheme, host = v:match("^(https?)://([^/:]+)")
  end
  if not scheme then return fail(key, "must start with http:// or https://") end
  -- user info: a password in the config (and in every log line naming
  -- the URL), and "http://localhost:80@elsewhere/" passes for loopback
  if v:match("^https?://([^/]*)"):find("@", 1, true) then
    return fail(key, "must have no user info (user:password@)")
  end
  if v:find("[%s?#]") then
    return fail(key, "must have no query, fragment or spaces")
  end
  if scheme == "http" and loopback_http and not is_loopback_host(host) then
    return fail(key, "http:// is allowed for a loopback host only; use"
                .. " https://")
  end
  return v
end

--- syntax: set = config.merchant_appids(m)
-- The appids a payment of merchant entry m may name, as a set: its appid
-- (sp_appid for a service provider) and its appids (sp_appids) list, the
-- ones its WeChat Pay client sends (a merchant paying under an official
-- account's appid and an App's). nil when it gives neither: any appid is
-- then sent as given. The list itself is the client's to check (a
-- non-empty list of appids: a bad one stops the start naming
-- merchants[i].appids); here its strings are taken, nothing refused.
function _M.merchant_appids(m)
  local key = m.sp_mchid ~= nil and "sp_appid" or "appid"
  local set
  if type(m[key]) == "string" then set = { [m[key]] = true } end
  local list = m[key .. "s"]
  if type(list) == "table" then
    for _, v in ipairs(list) do
      if type(v) == "string" then
        set = set or {}
        set[v] = true
      end
    end
  end
  return set
end

local function check_merchant(m, i, seen)
  local where = "merchants[" .. i .. "]."
  if type(m) ~= "table" then
    return fail("merchants[" .. i .. "]", "must be a table")
  end
  -- a key neither the gateway's nor the client's, with the one of either
  -- it is a slip from: the client's own check knows only its keys, and a
  -- previous_apiv3_key_files misspelt got no suggestion
  for k in pairs(m) do
    if not OWN_MERCHANT_KEYS[k] and not wxconfig.KNOWN[k] then
      local known = {}
      for n in pairs(OWN_MERCHANT_KEYS) do known[n] = true end
      for n in pairs(wxconfig.KNOWN) do known[n] = true end
      return fail(where .. tostring(k):sub(1, 64), "unknown key"
                  .. suggest.hint(k, known))
    end
  end
  if m.apiv3_key ~= nil then
    return fail(where .. "apiv3_key", "the APIv3 key may not be written in"
      .. " the config; give apiv3_key_file or apiv3_key_env")
  end
  if m.previous_apiv3_keys ~= nil then
    return fail(where .. "previous_apiv3_keys", "keys may not be written in"
      .. " the config; give previous_apiv3_key_files")
  end
  if m.key_names ~= nil then
    -- the client's, for names like these: the gateway gives its own
    return fail(where .. "key_names", "unknown key: the gateway names this"
      .. " entry's keys itself (apiv3_key_file, previous_apiv3_key_files)")
  end
  local pk = m.merchant_private_key
  if type(pk) ~= "string" or pk == "" then
    return fail(where .. "merchant_private_key", "must be the path of"
      .. " apiclient_key.pem")
  end
  if pk:find("-----BEGIN", 1, true) or pk:find("\n", 1, true) then
    return fail(where .. "merchant_private_key", "must be a file path; the"
      .. " key's PEM text may not be written in the config")
  end
  local id = m.mchid or m.sp_mchid
  if type(id) ~= "string" or not id:match("^%d+$") then
    return fail(where .. (m.sp_mchid and "sp_mchid" or "mchid"),
                "must be the merchant id (digits, as a string)")
  end
  if m.mchid ~= nil and m.sp_mchid ~= nil then
    return fail(where .. "sp_mchid", "give mchid or sp_mchid, not both")
  end
  if seen[id] then
    return fail(where .. "mchid", "merchant " .. id .. " is listed twice")
  end
  seen[id] = true
  local key, why = secret(m, "apiv3_key", where)
  if key == false then return nil, "config." .. why end
  if key == nil then
    return fail(where .. "apiv3_key_file", "give apiv3_key_file or"
      .. " apiv3_key_env (the 32-character APIv3 key)")
  end
  if #key ~= 32 then
    return fail(where .. (m.apiv3_key_file and "apiv3_key_file"
                          or "apiv3_key_env"),
                "must hold the 32-character APIv3 key (it holds " .. #key
                .. " characters)")
  end
  local client = {}
  for k, v in pairs(m) do
    if not OWN_MERCHANT_KEYS[k] then client[k] = v end
  end
  client.apiv3_key = key
  -- the client's messages name the keys of this entry (a wrong APIv3 key
  -- named apiv3_key, which this config refuses)
  client.key_names = { apiv3_key = where .. (m.apiv3_key_file ~= nil
                                             and "apiv3_key_file"
                                             or "apiv3_key_env"),
                       previous_apiv3_keys = where
                         .. "previous_apiv3_key_files",
                       state_dir = where .. "state_dir" }
  if m.previous_apiv3_key_files ~= nil then
    local files = m.previous_apiv3_key_files
    local n = 0
    if type(files) == "table" then
      for _ in pairs(files) do n = n + 1 end
    end
    -- a list: { old = PATH } or { [2] = PATH } would be no key at all,
    -- and the notifications under the old key refused
    if type(files) ~= "table" or n ~= #files then
      return fail(where .. "previous_apiv3_key_files", "must be a list of"
        .. " file paths")
    end
    local keys = {}
    for j, path in ipairs(files) do
      local k = where .. "previous_apiv3_key_files[" .. j .. "]"
      -- (not "type(path) == 'string' and read_secret(path)": an and keeps
      -- one value, and every reason read "must be a file path")
      if type(path) ~= "string" then return fail(k, "must be a file path") end
      local v, err = read_secret(path, k)
      if not v then return fail(k, err) end
      -- named here, by the key the config gives (the client's own check
      -- would name previous_apiv3_keys, which the config may not hold)
      if #v ~= 32 then
        return fail(where .. "previous_apiv3_key_files[" .. j .. "]",
                    "must hold a 32-character APIv3 key (it holds " .. #v
                    .. " characters)")
      end
      keys[j] = v
    end
    client.previous_apiv3_keys = keys
  end
  return { mchid = id, partner = m.sp_mchid ~= nil, client = client,
           appid = m.appid or m.sp_appid, appids = _M.merchant_appids(m) }
end

-- nil, reason for the first key of t not in keys (a typo would leave a
-- default in place without a word: a stream never trimmed)
local function only(t, keys, where)
  for k in pairs(t) do
    if type(k) ~= "string" or not keys[k] then
      return fail(where .. tostring(k):sub(1, 64), "unknown key"
                  .. suggest.hint(k, keys))
    end
  end
  return true
end

local WEBHOOK_SECRET_MIN = 32      -- bytes, without surrounding whitespace
local WEBHOOK_KEYS = { url = true, secret = true, secret_file = true,
  secret_env = true, previous_secret_file = true,
  previous_secret_env = true, types = true, name = true, timeout = true,
  headers = true, ca_file = true }

-- A webhook's extra headers, by paygate.outbox's rule (header_problem),
-- named with the config's key; the ones the webhook sets itself are
-- paygate.outbox's to refuse. A value is a string, or { file = PATH } /
-- { env = NAME } for a receiver's token kept out of the config text (read
-- as a secret is: surrounding whitespace dropped, never shown).
-- returns: the headers with every value a string, or nil, err
local function check_headers(h, where)
  if type(h) ~= "table" then
    return fail(where .. "headers", "must be a table of name = value")
  end
  local out = {}
  for k, v in pairs(h) do
    local from_secret = false
    if type(v) == "table" and type(k) == "string" then
      local hw = where .. "headers." .. k .. "."
      for key in pairs(v) do
        if key ~= "file" and key ~= "env" then
          return fail(hw .. tostring(key):sub(1, 32), "unknown key (a"
            .. " header's value is a string, { file = PATH } or"
            .. " { env = NAME })")
        end
      end
      local s, why = secret(v, "", hw, "file", "env")
      if s == false then return nil, "config." .. why end
      if s == nil then
        return fail(where .. "headers." .. k, "give file or env")
      end
      v, from_secret = s, true
    end
    local bad = require("paygate.outbox").header_problem(k, v)
    if bad == "name" then
      return fail(where .. "headers", "names must be HTTP header names")
    elseif bad == "value" then
      -- (what a file or variable held is never shown)
      return fail(where .. "headers." .. k, from_secret and "the value"
        .. " read holds control characters (one line, please)"
        or "must be a string without control characters")
    end
    out[k] = v
  end
  return out
end

local function check_webhooks(list)
  if list == nil then return {} end
  local n = 0
  if type(list) == "table" then
    for _ in pairs(list) do n = n + 1 end
  end
  -- a list: { url = ... } without its brackets would be no webhook at all,
  -- and the events marked delivered
  if type(list) ~= "table" or n ~= #list then
    return fail("gateway.webhooks", "must be a list of { url, secret_file"
      .. " | secret_env } (one webhook is webhooks = { { url = ... } })")
  end
  local out = {}
  local known = require("gw.events").KNOWN
  -- the other sinks' names (gw.events): hooks, and redis (the stream)
  local names = { hooks = true, redis = true }
  for i, w in ipairs(list) do
    local where = "gateway.webhooks[" .. i .. "]."
    if type(w) ~= "table" then
      return fail("gateway.webhooks[" .. i .. "]", "must be a table")
    end
    local kok, kerr = only(w, WEBHOOK_KEYS, where)
    if not kok then return nil, kerr end
    if w.secret ~= nil then
      return fail(where .. "secret", "the secret may not be written in the"
        .. " config; give secret_file or secret_env")
    end
    local ok, err = check_url(where .. "url", w.url, false)
    if not ok then return nil, err end
    local s, why = secret(w, "secret", where)
    if s == false then return nil, "config." .. why end
    if s == nil then
      return fail(where .. "secret_file", "give secret_file or secret_env")
    end
    -- the HMAC-SHA256 key of every delivery: a short one is guessed (its
    -- length only is told, never the secret)
    local function short(v, base)
      if #v < WEBHOOK_SECRET_MIN then
        return fail(where .. base .. (w[base .. "_env"] ~= nil and "_env"
                                      or "_file"), "the secret is " .. #v
          .. " bytes; it must be at least " .. WEBHOOK_SECRET_MIN
          .. " (e.g. head -c 32 /dev/urandom | base64 > FILE)")
      end
    end
    local _, serr = short(s, "secret")
    if serr then return nil, serr end
    -- a rotation from the sender's side: the old secret signs beside the
    -- new one (two v1 entries), so each receiver moves to the new secret
    -- when it is ready; dropped once they all have
    local prev, pwhy = secret(w, "previous_secret", where)
    if prev == false then return nil, "config." .. pwhy end
    if prev ~= nil then
      _, serr = short(prev, "previous_secret")
      if serr then return nil, serr end
      s = { s, prev }
    end
    if w.types ~= nil then
      if type(w.types) ~= "table" then
        return fail(where .. "types", "must be a list of event types")
      end
      for j, t in ipairs(w.types) do
        if not known[t] then
          return fail(where .. "types[" .. j .. "]", "unknown event type "
            .. tostring(t):sub(1, 64) .. " (see docs/gateway.md, Events)")
        end
      end
    end
    local name = w.name or ("webhook" .. i)
    if type(name) ~= "string" or not name:match("^[%w_.-]+$")
       or #name > 64 then
      return fail(where .. "name", "must be letters, digits, _ . -")
    end
    if names[name] then
      return fail(where .. "name", name .. " names another sink already"
        .. " (webhook names must differ, and not be hooks or redis)")
    end
    names[name] = true
    if w.timeout ~= nil and (type(w.timeout) ~= "number"
                             or not (w.timeout > 0) or w.timeout > 300) then
      return fail(where .. "timeout", "must be seconds, more than 0 and at"
        .. " most 300")
    end
    local headers = nil
    if w.headers ~= nil then
      local herr
      headers, herr = check_headers(w.headers, where)
      if not headers then return nil, herr end
    end
    if w.ca_file ~= nil then
      -- read, not only opened: a folder opens, and so does a file of no
      -- certificate, then every delivery failed on TLS until dead (the
      -- client's check of its own ca_file); why it was refused is
      -- said in the client's words (pem_file's why never holds the path
      -- nor a byte of the file; nil when it read and holds no PEM)
      local ok, why = false, nil
      if type(w.ca_file) == "string" then
        ok, why = wxconfig.pem_file(w.ca_file)
      end
      if not ok then
        return fail(where .. "ca_file", "must name a readable file of CA"
          .. " certificates (PEM)" .. (why and " (" .. why .. ")" or ""))
      end
    end
    local sink = { url = w.url, secret = s, types = w.types, name = name,
                   timeout = w.timeout, headers = headers,
                   ca_file = w.ca_file, unnamed = w.name == nil or nil }
    -- what paygate.outbox itself refuses (a header it sets), said here
    local wok, werr = pcall(require("paygate.outbox").webhook, sink)
    if not wok then
      return fail(where:sub(1, -2),
                  (tostring(werr):gsub("^[^:]*:%d+: ", "")))
    end
    out[i] = sink
  end
  return out
end

--- syntax: msg, fields = config.unnamed_webhooks(gateway)
-- The start's warn line when there are several webhooks and some have no
-- name (nil otherwise). An unnamed one is known by its place (webhookN),
-- and the outbox records with each pending or dead event the names of
-- the sinks that have it: removing or reordering entries gives one
-- webhook's name to another, and an event the old one had is never sent
-- to the new one. (Not refused: a config that ran yesterday must still
-- start; the danger is in the next edit of the list.)
function _M.unnamed_webhooks(g)
  local hooks, which, first = g.webhooks or {}, {}, nil
  for i, w in ipairs(hooks) do
    if w.unnamed then
      which[#which + 1] = "gateway.webhooks[" .. i .. "] (" .. w.name .. ")"
      first = first or w.name
    end
  end
  if #hooks < 2 or first == nil then return nil end
  return "gateway: " .. table.concat(which, ", ") .. (#which > 1
    and " have" or " has") .. " no name: a webhook without one is known by"
    .. " its place, and the outbox records by name which webhooks have an"
    .. " event, so removing or reordering entries hands one webhook's"
    .. " events to another, which then never gets them; give each a name"
    .. " (name = \"" .. first .. "\" keeps what is recorded)",
    { unnamed = #which, webhooks = #hooks }
end

-- gateway.dispatcher: paygate.outbox dispatcher options (docs/outbox.md),
-- checked here so a bad one is a config error, not a worker's crash. The
-- gateway sets sinks and prune itself.
-- returns: the table (or nil: none given), or false, reason.
local function check_dispatcher(d, retention)
  local function bad(key, reason)
    local _, why = fail(key, reason)
    return false, why
  end
  if d == nil then return nil end
  if type(d) ~= "table" then
    return bad("gateway.dispatcher", "must be a table of outbox"
      .. " dispatcher options")
  end
  local defaults = require("paygate.outbox").DEFAULTS
  for k, v in pairs(d) do
    local where = "gateway.dispatcher." .. tostring(k)
    if k == "name" then
      local _, why = require("paygate.outbox").check_name(v)
      if why then
        return bad(where, why)
      end
    elseif retention and (k == "keep_days" or k == "prune_batch"
                          or k == "prune_interval") then
      -- the dispatcher prunes only with retention = false (app.lua):
      -- else retention's outbox_days, batch and interval rule, and this
      -- would be ignored
      local theirs = k == "keep_days" and "outbox_days"
                     or k == "prune_batch" and "batch" or "interval"
      return bad(where, "delivered events are pruned by gateway.retention"
        .. " (its " .. theirs .. ") while it is on; set that, or"
        .. " retention = false")
    elseif defaults[k] ~= nil or k == "max_partitions" then
      if type(v) ~= "number" or not (v > 0) or v == math.huge then
        return bad(where, "must be a positive number")
      end
      if (k == "partitions" or k == "max_partitions") and v % 1 ~= 0 then
        return bad(where, "must be a whole number")
      end
    else
      local known = { name = true, max_partitions = true }
      for dk in pairs(defaults) do known[dk] = true end
      local hint = suggest.hint(k, known)
      return bad(where, hint ~= "" and "unknown key" .. hint
        or "unknown key (the outbox dispatcher's options: docs/outbox.md)")
    end
  end
  return d
end

-- The config's sections the gateway reads at the top level; the runtime
-- reads its own keys there and leaves the rest to the app, so a slip in
-- one of these ("gatway") would start the gateway on every default: no
-- admin token, no webhooks, an SQLite store in the working directory.
local SECTIONS = { gateway = true, merchants = true, credentials = true }

-- The section name is one slip from (but is not): the same but for case
-- or '-' for '_', or one edit away (two for a name of 8 characters or
-- more: paygate.suggest's distance).
local function near_section(name)
  if SECTIONS[name] or #name > 64 then return nil end
  local norm = name:lower():gsub("%-", "_")
  if SECTIONS[norm] then return norm end
  return suggest.nearest(norm, SECTIONS, #norm >= 8 and 2 or 1)
end

--- syntax: cfg, why = config.check(conf[, runtime])
-- conf: the whole config file's table; runtime: paygate.runtime (its
-- listen address is checked against dev_app).
-- returns: { gateway = {...} with defaults, merchants = { { mchid,
-- partner, client (a paygate.wechatpay config, secrets read) }... },
-- by_mchid }, or nil and the one-line reason "config.<key>: <why>".
function _M.check(conf, runtime)
  runtime = runtime or {}
  for k in pairs(conf) do
    local section = type(k) == "string" and near_section(k)
    if section then
      return fail(k, "unknown key (did you mean " .. section .. "?)")
    end
  end
  local g = conf.gateway
  if g == nil then g = {} end
  if type(g) ~= "table" then return fail("gateway", "must be a table") end
  for k in pairs(g) do
    if not GATEWAY_KEYS[k] then
      -- the key it is a slip from, as the runtime's limits and a
      -- merchant's client keys say
      return fail("gateway." .. tostring(k), "unknown key"
                  .. suggest.hint(k, GATEWAY_KEYS))
    end
  end
  local out = { reconcile = g.reconcile, retention = g.retention }
  if g.capture_dir ~= nil and g.capture_dir ~= false
     and (type(g.capture_dir) ~= "string" or g.capture_dir == "") then
    return fail("gateway.capture_dir", "must be a folder's path, or false")
  end
  out.capture_dir = _M.capture_dir(g)
  -- paygate.retention's policy (docs/retention.md); false: no pruning by
  -- retention (the outbox dispatcher then prunes its delivered rows)
  if g.retention ~= nil and g.retention ~= false then
    local ok, why = require("paygate.retention").check(g.retention)
    if not ok then return fail("gateway.retention", why) end
  end
  -- gw.reconcile's options: its start refuses a bad one in each worker;
  -- checked here too, so that paygate doctor refuses what the gateway would
  -- (a plain require: a module that does not load is an error to see,
  -- not a check to skip)
  if g.reconcile ~= nil then
    local ok, why = require("gw.reconcile").check_conf(g.reconcile)
    if not ok then return nil, "config." .. why end
  end
  local db, err = check_db(g)
  if not db then return nil, err end
  out.db = db
  -- (the defaults are beside an SQLite store: after check_db; the bill's
  -- folder is checked whether the job runs or not, the console's lever
  -- runs it too)
  local _, ferr = not_a_folder("gateway.reconcile.bill_dir", _M.bill_dir(g))
  if not ferr then
    _, ferr = not_a_folder("gateway.capture_dir", out.capture_dir)
  end
  if ferr then return nil, ferr end

  -- its password, kept out of the URL (from a file or a variable)
  local rpw, rwhy = secret(g, "redis_password", "gateway.")
  if rpw == false then return nil, "config." .. rwhy end
  if rpw ~= nil and g.redis == nil then
    return fail("gateway.redis_password_" .. (g.redis_password_file
      and "file" or "env"), "needs gateway.redis")
  end
  out.redis_opts = rpw and { password = rpw } or nil
  if g.redis ~= nil then
    local ok, why = require("paygate.redis").check_url(g.redis)
    if not ok then
      return fail("gateway.redis", "must be a redis:// or redis-sentinel://"
        .. " URL paygate.redis takes ("
        .. require("paygate.redact").url(why) .. ")")
    end
  end
  out.redis = g.redis

  local listen = runtime.listen or "127.0.0.1:8080"
  if g.public_url ~= nil then
    local ok, uerr = check_url("gateway.public_url", g.public_url, true)
    if not ok then return nil, uerr end
    out.public_url = g.public_url:gsub("/+$", "")
  else
    local host, port = listen:match("^(.*):(%d+)$")
    if host == "0.0.0.0" or host == "" or host == nil then
      host = "127.0.0.1"
    elseif host == "[::]" then
      host = "[::1]"      -- the IPv6 wildcard is no address to send to
    end
    out.public_url = "http://" .. host .. ":" .. (port or "8080")
  end

  local ttl = g.payment_ttl
  if ttl == nil then ttl = 7200 end
  -- at least 120: WeChat has been reported to refuse a time_expire less
  -- than a minute ahead (PARAM_ERROR); the second minute is a margin for
  -- clock skew and the prepay's own latency
  if type(ttl) ~= "number" or ttl % 1 ~= 0 or ttl < 120
     or ttl > 7 * 86400 then
    return fail("gateway.payment_ttl", "must be whole seconds, 120 .. 604800")
  end
  out.payment_ttl = ttl

  local ht = g.hooks_timeout
  if ht == nil then ht = 10 end
  if type(ht) ~= "number" or not (ht > 0) or ht > 86400 then
    return fail("gateway.hooks_timeout", "must be seconds, more than 0 and"
                .. " at most 86400")
  end
  out.hooks_timeout = ht

  -- the refusals anyone can cause (a forged notification, a bad API
  -- key, a console login refused): the first `lines` of each merchant and kind (each reason) in a
  -- window logged, then one line saying how many more (paygate.log.limiter)
  local rl = g.refusal_log
  if rl == nil then rl = {} end
  if rl ~= false then
    if type(rl) ~= "table" then
      return fail("gateway.refusal_log", "must be a table { lines = ...,"
                  .. " window = ... }, or false")
    end
    local kok, kerr = only(rl, { lines = true, window = true },
                           "gateway.refusal_log.")
    if not kok then return nil, kerr end
    -- the limits (and defaults) are the limiter's own
    local o, why, key = log.limiter_opts(rl)
    if not o then return fail("gateway.refusal_log." .. key, why) end
    rl = o
  end
  out.refusal_log = rl

  local late = g.on_late_payment
  if late == nil then late = "refund" end
  if late ~= "refund" and late ~= "alarm" then
    return fail("gateway.on_late_payment", "must be \"refund\" or \"alarm\"")
  end
  out.on_late_payment = late

  if g.degraded ~= nil and type(g.degraded) ~= "boolean" then
    return fail("gateway.degraded", "must be true or false")
  end
  out.degraded = g.degraded == true

  local token, why = secret(g, "admin_token", "gateway.")
  if token == false then return nil, "config." .. why end
  -- (it guards /admin/* from every address the gateway listens on, and
  -- guesses are throttled per address only: as long as the console's)
  if token and #token < 16 then
    return fail(g.admin_token_env ~= nil and "gateway.admin_token_env"
                or "gateway.admin_token_file", "the token must be at least"
                .. " 16 characters")
  end
  out.admin_token = token
  out.console, why = require("gw.console.check").check(g.console, token,
                                                        secret)
  if out.console == nil then return nil, why end

  local hooks
  hooks, err = check_webhooks(g.webhooks)
  if not hooks then return nil, err end
  out.webhooks = hooks

  if g.redis_stream ~= nil then
    local rs = g.redis_stream
    if type(rs) ~= "table" then
      return fail("gateway.redis_stream", "must be a table { stream = ... }")
    end
    local kok, kerr = only(rs, { stream = true, maxlen = true },
                           "gateway.redis_stream.")
    if not kok then return nil, kerr end
    if not out.redis then
      return fail("gateway.redis_stream", "needs gateway.redis")
    end
    if rs.stream ~= nil and (type(rs.stream) ~= "string" or rs.stream == "")
    then
      return fail("gateway.redis_stream.stream", "must be a stream name")
    end
    if rs.maxlen ~= nil and (type(rs.maxlen) ~= "number" or rs.maxlen < 1
                             or rs.maxlen % 1 ~= 0 or rs.maxlen == math.huge)
    then
      return fail("gateway.redis_stream.maxlen", "must be a whole number of"
        .. " entries, at least 1")
    end
    out.redis_stream = { stream = rs.stream or "paygate:events",
                         maxlen = rs.maxlen }
  end

  local dispatcher
  dispatcher, err = check_dispatcher(g.dispatcher, g.retention ~= false)
  if dispatcher == false then return nil, err end
  out.dispatcher = dispatcher

  if g.dev_app ~= nil then
    if type(g.dev_app) ~= "string" or not g.dev_app:match("^[%w_.-]+$")
       or #g.dev_app > 64 then
      return fail("gateway.dev_app", "must be an app id (letters, digits,"
        .. " _ . -)")
    end
    if not _M.is_loopback_addr(listen) then
      return fail("gateway.dev_app", "unsigned dev access needs every listen"
        .. " address on loopback (listening on " .. listen .. ")")
    end
    out.dev_app = g.dev_app
  end

  local ms = conf.merchants
  if ms ~= nil and type(ms) ~= "table" then
    return fail("merchants", "must be a list of merchants ({ { mchid = "
                .. "..., ... } }), not a " .. type(ms))
  end
  if type(ms) ~= "table" or ms[1] == nil then
    -- started without --config, there is no config at all: say how to
    -- give one rather than what the empty one lacks
    if runtime.mode == "worker" and runtime.config_file == nil then
      return fail("merchants", "must list at least one merchant, and no"
        .. " config file was given: paygate run examples/gateway --config"
        .. " FILE (docs/gateway.md, Configuration; scripts/run writes one)")
    end
    return fail("merchants", "must list at least one merchant")
  end
  local merchants, by_mchid, seen = {}, {}, {}
  for i, m in ipairs(ms) do
    local mm, merr = require("gw.credentials").check_merchant(
      conf, m, i, seen, check_merchant)
    if not mm then return nil, merr end
    mm.index = i
    merchants[i] = mm
    by_mchid[mm.mchid] = mm
    -- each prepay's and refund's notify_url, checked as the client checks
    -- it before sending (else every one of them fails invalid_params)
    local url = out.public_url .. "/wechatpay/notify/" .. mm.mchid
    if not validate.notify_url(url) then
      if g.public_url == nil then
        return fail("gateway.public_url", "is required when --listen ("
          .. listen .. ") is not a loopback address: WeChat Pay takes"
          .. " https:// notify URLs (" .. url .. ")")
      end
      -- (a control character shown as ?, not sent to the terminal)
      return fail("gateway.public_url", "makes the notify_url "
        .. errors.printable(url, 300)
        .. ", which WeChat Pay refuses (at most 255 bytes, no control"
        .. " characters)")
    end
  end
  return { gateway = out, merchants = merchants, by_mchid = by_mchid }
end

return _M
