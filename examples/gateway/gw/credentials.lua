-- gw.credentials: merchants' keys (and the HTTPS listener's certificate)
-- from etcd through paygate.credentials, hot-swapped in every worker.
--
-- The config's top-level `credentials` section has the shape
-- docs/etcd.md gives (etcd, kek_file | kek_env, previous_kek_files,
-- cache_dir, merchants = { [mchid] = prefix }, tls, load_timeout), plus
-- etcd.password_file / etcd.password_env beside etcd.password. A merchant
-- of the `merchants` list whose mchid is in credentials.merchants takes
-- its private key, certificate, APIv3 key and (when the set has one) the
-- WeChat Pay public key from its etcd set, so its entry gives none of
-- them; the other merchants keep their files.
--
--   gw/config.lua: local mm, merr = creds.check_merchant(conf, m, i, seen,
--                                                         check_merchant)
--   app.lua:       require("gw.credentials").start(cfg, wx, fatal)
local paygate = require "paygate"
local credentials = require "paygate.credentials"
local wxconfig = require "paygate.wechatpay.config"
local suggest = require "paygate.suggest"

local type, pairs, ipairs, tostring = type, pairs, ipairs, tostring

local _M = {}

local SECTION_KEYS = {
  etcd = true, kek_file = true, kek_env = true, previous_kek_files = true,
  cache_dir = true, merchants = true, tls = true, load_timeout = true,
}
local ETCD_KEYS = {
  endpoints = true, user = true, password = true, password_file = true,
  password_env = true, timeout = true, ca_file = true, client_cert = true,
  client_key = true,
}
-- what an etcd merchant's entry may not give: the file of its set that
-- holds it instead
local FROM_SET = {
  merchant_private_key = "apiclient_key.pem",
  merchant_certificate = "apiclient_cert.pem",
  merchant_serial = "apiclient_cert.pem",
  apiv3_key = "apiv3_key", apiv3_key_file = "apiv3_key",
  apiv3_key_env = "apiv3_key", previous_apiv3_keys = "apiv3_key",
  previous_apiv3_key_files = "apiv3_key",
  public_key = "wechatpay_public_key.pem",
  public_key_id = "public_key_id",
}

-- the one-line reason "config.credentials[.key]: ..."
local function reason(key, r)
  return "config.credentials" .. (key and ("." .. key) or "") .. ": " .. r
end

local function fail(key, r)
  return nil, reason(key, r)
end

local function readable(path)
  local f = type(path) == "string" and io.open(path, "rb")
  if not f then return false end
  f:close()
  return true
end

-- The etcd password from password, password_file or password_env.
local function password(e)
  local n = (e.password ~= nil and 1 or 0)
            + (e.password_file ~= nil and 1 or 0)
            + (e.password_env ~= nil and 1 or 0)
  if n > 1 then
    return false, "give one of password, password_file, password_env"
  end
  if e.password_file ~= nil then
    if type(e.password_file) ~= "string" then
      return false, "password_file: must be a file path"
    end
    -- (paygate.read_file: a folder, a FIFO, an empty or a huge file
    -- refused; the reason never holds the path, which may be the password)
    local s, err = paygate.read_file(e.password_file, "password_file")
    if not s then
      if err.kind == "empty" or err.kind == "too_large" then
        return false, "password_file: " .. err.reason
      end
      return false, "password_file: cannot read it (" .. err.reason .. ")"
    end
    s = s:gsub("%s+$", "")
    if s == "" then return false, "password_file: the file is empty" end
    return s
  end
  if e.password_env ~= nil then
    local s = type(e.password_env) == "string" and os.getenv(e.password_env)
    if not s or s == "" then
      return false, "password_env: the environment variable "
        .. (credentials.shown_name(e.password_env) or "it names")
        .. " is not set"
    end
    return s
  end
  if e.password ~= nil and type(e.password) ~= "string" then
    return false, "password: must be a string"
  end
  return e.password
end

--- syntax: conf, why = credentials.section(conf)
-- conf: the whole config. returns: nil (no credentials section), or the
-- options paygate.credentials.new takes (secrets read, cache_dir checked:
-- credentials.start makes it),
-- or false and the one-line reason "config.credentials.<key>: ...".
-- Never connects to etcd and never names a secret.
function _M.section(conf)
  local c = conf.credentials
  if c == nil then return nil end
  if type(c) ~= "table" then
    return false, reason(nil, "must be a table")
  end
  for k in pairs(c) do
    if not SECTION_KEYS[k] then
      return false, reason(tostring(k), "unknown key"
                           .. suggest.hint(k, SECTION_KEYS))
    end
  end
  local e = c.etcd
  if type(e) ~= "table" then
    return false, reason("etcd", "must be a table { endpoints,"
      .. " user, password_env, ca_file, ... }")
  end
  for k in pairs(e) do
    if not ETCD_KEYS[k] then
      return false, reason("etcd." .. tostring(k), "unknown key"
                           .. suggest.hint(k, ETCD_KEYS))
    end
  end
  if type(e.endpoints) ~= "table" or e.endpoints[1] == nil then
    return false, reason("etcd.endpoints", "must list the etcd"
      .. " members' https:// URLs")
  end
  for i, u in ipairs(e.endpoints) do
    if type(u) ~= "string" or not u:match("^https://[^/]+") then
      return false, reason("etcd.endpoints[" .. i .. "]", "must be"
        .. " an https:// URL: credentials are secrets, etcd is reached"
        .. " over TLS only")
    end
  end
  if type(e.user) ~= "string" or e.user == "" then
    return false, reason("etcd.user", "must name the etcd user"
      .. " (etcd's authentication is required)")
  end
  local pw, why = password(e)
  if pw == false then
    return false, reason("etcd." .. why:match("^[%w_]+"),
                         (why:gsub("^[%w_]+: ", "")))
  end
  if pw == nil then
    return false, reason("etcd.password_env", "give password_env,"
      .. " password_file or password (etcd's authentication is required)")
  end
  for _, k in ipairs({ "ca_file", "client_cert", "client_key" }) do
    if e[k] ~= nil and not readable(e[k]) then
      -- named only when it can be a path: client_key may hold the key's
      -- PEM text itself, pasted where its file's path belongs
      return false, reason("etcd." .. k, "cannot read "
        .. (credentials.shown_name(e[k]) or "the file it names"))
    end
  end
  if (e.client_cert == nil) ~= (e.client_key == nil) then
    return false, reason("etcd.client_key", "client_cert and"
      .. " client_key go together")
  end
  if type(c.cache_dir) ~= "string" or c.cache_dir == "" then
    return false, reason("cache_dir", "must be a folder for the"
      .. " last good sets (kept sealed)")
  end
  -- (made by credentials.start: a start refused for its config makes
  -- nothing)
  local can, why = require("gw.config").can_make(c.cache_dir)
  if not can then
    return false, reason("cache_dir", why)
  end
  if c.load_timeout ~= nil and (type(c.load_timeout) ~= "number"
                                or c.load_timeout <= 0) then
    return false, reason("load_timeout", "must be seconds > 0")
  end
  local opts = {}
  for k, v in pairs(c) do opts[k] = v end
  opts.etcd = { endpoints = e.endpoints, user = e.user, password = pw,
                timeout = e.timeout, ca_file = e.ca_file,
                client_cert = e.client_cert, client_key = e.client_key }
  -- paygate.credentials' own checks (the KEK, the prefixes); its message
  -- names the key first ("kek_file: ...", "merchants[1900...] must ...")
  local ok, src, err = pcall(credentials.new, opts)
  if not ok then return false, reason(nil, tostring(src)) end
  if not src then
    local msg = tostring(err.message):gsub("^credentials: ", "")
    local key = msg:match("^([%w_]+)")
    if msg:match("^give kek_file") then
      return false, reason("kek_file", msg)
    elseif SECTION_KEYS[key] then
      key = msg:match("^([%w_]+%b[])") or key
      return false, reason(key, (msg:sub(#key + 1):gsub("^:?%s*", "")))
    end
    return false, reason(nil, msg)
  end
  return opts
end

--- syntax: mm, why = credentials.check_merchant(conf, m, i, seen, check)
-- The config check of merchants[i]. With no credentials section, or a
-- merchant its section does not name, it is check(m, i, seen), the
-- gateway's file-based check. A merchant named in
-- credentials.merchants gives no key (they come from etcd); the section
-- itself is checked with the first merchant.
local checked = setmetatable({}, { __mode = "k" })  -- conf -> { section }

function _M.check_merchant(conf, m, i, seen, check)
  -- the section once per config, not once per merchant (it reads the
  -- password and the KEK, and checks the cache folder)
  local c = checked[conf]
  if not c then
    c = { _M.section(conf) }
    checked[conf] = c
  end
  local opts, why = c[1], c[2]
  if opts == false then return nil, why end
  if i == 1 and opts and type(opts.merchants) == "table" then
    -- every merchant of the section is in the merchants list
    local listed = {}
    for _, x in ipairs(conf.merchants) do
      if type(x) == "table" then listed[x.mchid or x.sp_mchid or ""] = true end
    end
    for id in pairs(opts.merchants) do
      if not listed[id] then
        return fail("merchants." .. tostring(id), "no merchant with that id"
          .. " in the merchants list")
      end
    end
  end
  local id = type(m) == "table" and (m.mchid or m.sp_mchid)
  local prefix = opts and type(opts.merchants) == "table"
                 and opts.merchants[id]
  if not prefix then return check(m, i, seen) end
  local where = "config.merchants[" .. i .. "]."
  for k in pairs(m) do
    if FROM_SET[k] then
      return nil, where .. k .. ": comes from etcd (" .. prefix
        .. FROM_SET[k] .. "): remove it from the merchant's entry"
    end
  end
  if seen[id] then
    return nil, where .. "mchid: merchant " .. id .. " is listed twice"
  end
  seen[id] = true
  local client = {}
  for k, v in pairs(m) do client[k] = v end
  -- the client's messages name the set's files, where its keys are (in
  -- the printable bytes a client's key_names takes)
  local shown = prefix:sub(1, 200):gsub("[^\33-\126]", "?")
  client.key_names = { apiv3_key = shown .. "apiv3_key",
                       previous_apiv3_keys = shown .. "previous_apiv3_key",
                       -- (state_dir is the config entry's, not the set's)
                       state_dir = "merchants[" .. i .. "].state_dir" }
  return { mchid = id, partner = m.sp_mchid ~= nil, client = client,
           appid = m.appid or m.sp_appid,
           appids = require("gw.config").merchant_appids(m), etcd = prefix }
end

--- syntax: src = credentials.start(cfg, wx, fatal)
-- In a worker, before the WeChat Pay clients are made: loads every etcd
-- merchant's set (etcd, else the cached set after load_timeout) into its
-- client config, swaps each later set into wx[mchid] (bound lazily: the
-- clients are made after this returns, once app.lua has checked each
-- merchant's client config and opened the store) and into the HTTPS
-- listener when `tls` is given. fatal(msg) ends the start with the
-- one-line reason (a set that cannot be had). The caller starts the
-- watches (src:start()) once the clients are made: a set that came while
-- a client was being made (its certificate download yields) would be
-- written into the config that client had already read, and the client
-- would sign with the older key while the source reported the newer.
-- (The watches begin at the loaded revision: nothing is missed.)
-- returns: the paygate.credentials source, or nil (no section).
function _M.start(cfg, wx, fatal)
  local opts, why = _M.section(paygate.config_copy())
  if opts == false then return fatal(why) end
  if not opts then return nil end
  local made, merr = require("gw.config").mkdir_p(opts.cache_dir,
                                                  448) -- 0700
  if not made then return fatal("config.credentials.cache_dir: " .. merr) end
  local src, err = credentials.new(opts)
  if not src then return fatal("config.credentials: " .. tostring(err)) end
  for _, m in ipairs(cfg.merchants) do
    if m.etcd then
      -- before the load: a set the WeChat Pay client would refuse (one
      -- `validate` lets through, e.g. an SM2 pair for an RSA merchant) is
      -- refused at start as a running worker refuses it, so the load
      -- falls back to the cached set instead of taking (and caching) it
      src:on_change(m.mchid, function(v)
        local client = wx[m.mchid]
        if client then return client:set_credentials(v) end
        -- before the client is made (the load, or a newer set meanwhile):
        -- the client's own check of the merged config, then it takes it
        local conf = {}
        for k, x in pairs(m.client) do conf[k] = x end
        for _, d in pairs(credentials.MERCHANT_FILES) do
          conf[d.field] = v[d.field]
        end
        local ok, cerr = wxconfig.check(conf)
        if not ok then return nil, cerr end
        for _, d in pairs(credentials.MERCHANT_FILES) do
          m.client[d.field] = v[d.field]
        end
        return true
      end)
      local set, lerr = src:load(m.mchid)
      if not set then
        return fatal("config.credentials.merchants." .. m.mchid .. ": "
          .. tostring(lerr.message):gsub("^credentials: ", ""))
      end
      m.client = src:wechatpay_conf(m.mchid, m.client)
    end
  end
  if opts.tls then
    local tls = require "paygate.tls"
    if not tls.enabled() then
      return fatal("config.credentials.tls: the gateway serves plain HTTP"
        .. " (start it with --tls-cert and --tls-key)")
    end
    src:on_change("tls", function(v)
      return tls.set_certificate(v.cert, v.key)
    end)
    local set, lerr = src:load("tls")
    if not set then
      return fatal("config.credentials.tls: "
        .. tostring(lerr.message):gsub("^credentials: ", ""))
    end
  end
  return src
end

return _M
