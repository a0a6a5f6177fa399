-- examples/gateway: the reference merchant gateway between a merchant's
-- systems and WeChat Pay API v3.
--
--   paygate run examples/gateway --listen 127.0.0.1:8080 --config gw.lua
--
-- The config (a Lua file) has a `gateway` table and a `merchants` list;
-- docs/gateway.md describes both, the merchant API under /v1/, the
-- notification route, the events and the admin routes.
--
-- Top level (runs once per worker, in a coroutine): the config check,
-- the merchants' keys (etcd sets loaded, each client config checked), the
-- store and its migrations, one paygate.wechatpay client per merchant,
-- the routes, the outbox dispatcher.
local paygate = require "paygate"
local sql = require "paygate.sql"
local wechatpay = require "paygate.wechatpay"
local apikey = require "paygate.apikey"
local idem = require "paygate.idempotency"
local outbox = require "paygate.outbox"
local audit = require "paygate.audit"
local shared = require "paygate.shared"
local config = require "gw.config"
local events = require "gw.events"
local payments = require "gw.payments"
local refunds = require "gw.refunds"
local refunds_abnormal = require "gw.refunds_abnormal"
local notify = require "gw.notify"
local admin = require "gw.admin"

-- A bad configuration is one line on stderr and exit status 2: every
-- worker finds it, only the first to claim the shared key writes it (the
-- others wait until it is written: the master stops the rest once one
-- has exited), and the master adds nothing to a worker's exit 2.
local boot = require "gw.boot"
local function fatal(msg)
  boot.exit("gw:config_error", msg, 2)
end

local cfg, why = config.check(paygate.config_copy(), paygate.runtime)
if not cfg then fatal(why) end
local g = cfg.gateway

-- gw/hooks.lua is the merchant's code beside the config: one that does
-- not load is refused the same way (a reload keeps the old workers)
do
  local hooks, hwhy = events.load_hooks()
  if not hooks then fatal(hwhy) end
end

-- the merchants' keys ------------------------------------------------------

-- Before the store: a start refused for its config (exit 2) makes nothing,
-- not even the empty SQLite file of a first start (the next start, the
-- config fixed, said no more that it made a new database), nor its
-- folder, nor the credentials cache's (gw.config checks them; they are
-- made below). An etcd merchant's keys are its set's (from etcd, else the
-- cached set), merged into its client config here; the watch starts once
-- the clients are made, from the set's revision.
local wx = {}
-- a client config the WeChat Pay client refuses, in the config's terms
local function client_refused(m, cerr)
  local msg = tostring(cerr.message):gsub("^wechatpay%.[%w_.%[%]]*: ", "")
  fatal("config.merchants[" .. m.index .. "]." .. tostring(cerr.key)
        .. ": " .. msg)
end
-- each merchant's client config as wechatpay.client checks it first (its
-- keys loaded, the pair matched: no I/O but the files); what can fail
-- only with WeChat (a certificate download) is the client's, below. The
-- merchants with keys in files first: an etcd merchant's are had only
-- from etcd (or the cache, made for it), below.
local function check_clients(etcd)
  local wxconfig = require "paygate.wechatpay.config"
  for _, m in ipairs(cfg.merchants) do
    if (m.etcd ~= nil) == etcd then
      local ok, cerr = wxconfig.check(m.client)
      if not ok then client_refused(m, cerr) end
    end
  end
end
check_clients(false)
local creds = require("gw.credentials").start(cfg, wx, fatal) -- etcd keys
check_clients(true)

-- the store -----------------------------------------------------------------

-- its folder, checked with the config, made now
do
  local dir = config.db_dir(g.db)
  local made, merr = true, nil
  if dir then made, merr = config.mkdir_p(dir) end
  if not made then fatal("config.gateway.db: " .. merr) end
end
-- unreachable: one line and exit 1, after retrying for a while (gw.boot)
local new_file = sql.sqlite_path(g.db)
if new_file and require("paygate.core").file_type(new_file) ~= nil then
  new_file = nil
end
local db = boot.reach("the store", g.db, function() return sql.open(g.db) end,
                      "gateway.db", function(err)
  -- a PostgreSQL login refused for good: what to do, as doctor says it
  local fix, _, from_env = sql.login_fix(g.db, err, "the gateway",
                                        "gateway.db")
  if from_env then
    fix = fix .. ", in the gateway's own environment (under systemd,"
          .. " Environment=PGPASSFILE=... in its unit)"
  end
  return fix
end)
if new_file and boot.once("new_db") then
  -- (a file deleted, or a volume not mounted, would be taken for a first
  -- start without a word, and every payment before it for unknown)
  paygate.log.warn("gateway: made a new, empty SQLite database: on a first"
    .. " start that is expected; else check the path and that its volume"
    .. " is mounted", { db = new_file })
end
-- A store made by an earlier version (0644 under a umask of 022) is
-- readable by every local user: payers' openids, amounts, the audit
-- trail. Said at each start (the mode is the operator's to change: a
-- backup agent's group may be meant; the others' bits are not).
boot.say_store_mode(sql.sqlite_path(g.db))
do
  boot.migrate(db, paygate.app_dir .. "/migrations")
  -- the libraries' own tables, made now rather than on a first request
  assert(audit.ensure_schema(db))
  assert(outbox.setup(db))
end

-- A store put back from a backup (`paygate restore`) is said at start,
-- with the days still to reconcile (gw.boot.say_restored)
require("gw.boot").say_restored(db)

-- WeChat Pay clients, one per merchant --------------------------------------

local history = require "gw.history"   -- each call kept for the console
history.init{ db = db, capture_dir = g.capture_dir }
for _, m in ipairs(cfg.merchants) do
  m.client.on_call = history.on_call(m.mchid)
  local client, cerr = wechatpay.client(m.client)
  if not client then
    if cerr.kind == "invalid_config" then client_refused(m, cerr) end
    error("gateway: merchant " .. m.mchid .. ": " .. tostring(cerr), 0)
  end
  wx[m.mchid] = client
end
-- (only now: a set that came while a client was made would miss it)
if creds then creds:start() end

-- the degradation switch: in the shared dictionary, so every worker sees
-- what /admin/degrade set (add: a worker starting later keeps it). The
-- WeChat Pay clients' own switch (wx:degrade: every call fails at once
-- with kind degraded, nothing sent) is kept in step with it, so work that
-- does not ask ctx.degraded() sends nothing either.
local D = shared.get_dict("paygate")
if D:add("gw:degraded", g.degraded and 1 or 0) then
  for _, client in pairs(wx) do client:degrade(g.degraded) end
end

local ctx = {
  db = db, cfg = cfg, gateway = g, wx = wx,
  merchants = cfg.merchants, by_mchid = cfg.by_mchid,
  default_merchant = cfg.merchants[1],
}
function ctx.degraded()
  return D:get("gw:degraded") == 1
end
function ctx.set_degraded(on)
  for _, client in pairs(wx) do client:degrade(on) end
  return D:set("gw:degraded", on and 1 or 0)
end
-- gateway.degraded as the config last said it: a reload that changes it
-- sets the switch (an operator may edit the config in an outage and
-- reload); one that leaves it as it was keeps what /admin/degrade set.
-- (Every worker of the generation sees the change: the first to claim it
-- sets the switch and logs it.)
local cfg_now = g.degraded and 1 or 0
if not D:add("gw:degraded_config", cfg_now)
   and D:get("gw:degraded_config") ~= cfg_now
   and boot.once("degraded_config_changed") then
  ctx.set_degraded(g.degraded)
  D:set("gw:degraded_config", cfg_now)
  paygate.log.warn("gateway: gateway.degraded changed in the config: the"
    .. " degradation switch is now " .. (g.degraded and "on" or "off"),
    { degraded = g.degraded })
end
function ctx.notify_url(mchid)
  return g.public_url .. "/wechatpay/notify/" .. mchid
end

-- several webhooks, some known by their place alone: said once per start
-- or reload (every worker checks the config; the first to claim it logs)
do
  local msg, fields = config.unnamed_webhooks(g)
  if msg and paygate.runtime.mode == "worker"
     and boot.once("unnamed_webhooks") then
    paygate.log.warn(msg, fields)
  end
end

if g.dev_app and paygate.runtime.mode == "worker" then
  if D:add("gw:dev_app_warned", 1) then
    paygate.log.warn("gateway: dev_app is set: unsigned /v1/ requests from"
      .. " loopback clients act as app " .. g.dev_app
      .. " (for local trials only)", { app_id = g.dev_app })
  end
end

-- merchant API --------------------------------------------------------------

-- (its 401 lines bounded per reason by gateway.refusal_log)
local auth = apikey.before_hook(db, { prefix = "/v1/",
                                      log_limit = g.refusal_log })
if g.dev_app then
  paygate.before(function(req)
    -- (a browser page from elsewhere -- a rebound name, a cross-site
    -- form -- is no loopback client of ours: it must sign)
    if req.path:sub(1, 4) == "/v1/" and req:header("authorization") == nil
       and config.is_loopback_addr(req.remote_addr)
       and not config.proxied(req)
       and not admin.from_browser_elsewhere(req) then
      req.app_id = g.dev_app
      return nil
    end
    return auth(req)
  end)
else
  paygate.before(auth)
end
-- A POST's body is read as the bytes sent: one with a Content-Encoding
-- (gzip, br, ...) is not the JSON it would be read as, and JSON sent with
-- a coding named could be read either way. 415 once the caller is known,
-- before any handler runs, so no Idempotency-Key keeps it (the request
-- sent again unencoded under the same key runs).
paygate.before(function(req)
  if req.method == "POST" and req.path:sub(1, 4) == "/v1/"
     and req:header("content-encoding") then
    return 415, payments.err_body("unsupported_content_encoding",
      "Content-Encoding is not supported: send the body as plain JSON,"
      .. " with no Content-Encoding header")
  end
end)

payments.init(ctx)
refunds.init(ctx)
refunds_abnormal.init(ctx)
notify.init(ctx)
do   -- the counters alerted on, at 0 from the start (gw.apply, gw.notify)
  local mchids = {}
  for mchid in pairs(wx) do mchids[#mchids + 1] = mchid end
  table.sort(mchids)
  require("gw.apply").init_metrics(mchids)
  notify.init_metrics(mchids)
end
ctx.refunds = refunds
ctx.payments = payments
ctx.fatal = fatal   -- for the plug-ins' config checks (gw.reconcile)

-- A 400 refused the body before anything ran (invalid JSON, a bad or
-- unknown field): it is not kept, so the request corrected can be sent
-- again under the same Idempotency-Key, as after paygate.idempotency's
-- own refusals. Kept, the fix was 422 idempotency_key_reused for 24 h.
-- Nor is a 409 appid_not_configured (a new attempt of a payment under an
-- appid taken out of the config) or merchant_not_configured (a call to
-- WeChat for a payment of a merchant taken out of it): the appid or the
-- merchant configured again, the same request under the same key runs.
local NOT_KEPT = { appid_not_configured = true,
                   merchant_not_configured = true }
local function not_kept(body)
  return type(body) == "table" and NOT_KEPT[body.error] == true
end
local keep = { keep = function(status, body)
  return status < 500 and status ~= 400 and not not_kept(body)
end }
-- Responses committed with their effects are kept whatever their status
-- (a refund refused by WeChat is a fact to replay, not to run again).
local keep_all = { keep = function(status, body)
  return status ~= 503 and status ~= 400 and not not_kept(body)
end }

paygate.route("POST", "/v1/payments", idem.wrap(db, payments.create, keep))
paygate.route("GET", "/v1/payments/:id", payments.get)
paygate.route("POST", "/v1/payments/:id/attempts",
              idem.wrap(db, payments.new_attempt, keep))
paygate.route("POST", "/v1/payments/:id/close",
              idem.wrap(db, payments.close, keep))
paygate.route("POST", "/v1/payments/:id/refunds",
              idem.wrap(db, refunds.create, keep_all))
paygate.route("GET", "/v1/payments/:id/refunds", refunds.list)
paygate.route("GET", "/v1/refunds/:id", refunds.get)
paygate.route("POST", "/v1/refunds/:id/abnormal",
              idem.wrap(db, refunds_abnormal.handler, keep))

-- WeChat's notifications ----------------------------------------------------

paygate.route("POST", "/wechatpay/notify/:mchid", notify.handler)

-- the OpenAPI description ---------------------------------------------------

do
  local f = io.open(paygate.app_dir .. "/openapi.json", "rb")
  local text = f and f:read("*a")
  if f then f:close() end
  paygate.route("GET", "/openapi.json", function()
    if not text then
      return 404, { error = "not_found", message = "no openapi.json" }
    end
    return 200, text, { ["Content-Type"] = "application/json" }
  end)
end

-- admin ---------------------------------------------------------------------

admin.routes(ctx)
require("gw.console").routes(ctx)  -- /console, when gateway.console is set

-- background: the outbox dispatcher -----------------------------------------

if paygate.runtime.mode == "worker" then
  -- retention (docs/retention.md): idempotency records past their ttl,
  -- the notification dedupe tables after 25 h (past WeChat's 24 h 4 min
  -- of retries), delivered outbox rows after 7 days -- in small batches,
  -- one pruner at a time across workers and instances (a lease on Redis
  -- when configured, else on the store). It prunes the outbox, so the
  -- dispatcher does not.
  local prunes = g.retention ~= false
  if prunes then
    local lease_store = db
    if g.redis then
      lease_store = boot.reach("redis", g.redis, function()
        return require("paygate.redis").connect(g.redis, g.redis_opts)
      end, "gateway.redis")
    end
    -- and the console's history (gw.history) after 30 days, unless the
    -- config's own tables say otherwise for them
    local policy, tables, named = {}, {}, {}
    for k, v in pairs(g.retention or {}) do policy[k] = v end
    for _, t in ipairs(policy.tables or {}) do
      tables[#tables + 1] = t
      named[t.table] = true             -- the same table: theirs wins
      if t.name then named[t.name] = true end   -- or the same job name
    end
    for _, t in ipairs(history.RETENTION) do
      if not named[t.table] then tables[#tables + 1] = t end
    end
    policy.tables = tables
    ctx.retention = require("paygate.retention").start(db, policy,
      { lease = lease_store })
    -- a graceful stop (a reload, a restart) ends a pass in flight and
    -- gives its lease back, or the next workers skip passes until its
    -- ttl (up to 900 s)
    local r = ctx.retention
    paygate.on_stop(function() r:stop() end)
  end
  events.start(db, g, { prune = not prunes })
  -- the captures of refused notifications: none past their age
  history.start()
  -- the state machines' counts on /metrics: counters summed over the
  -- workers and kept when one is restarted (gw.model.publish_fsm_counts)
  require("gw.model").publish_fsm_counts()
  -- WeChat's health on /metrics: the switch and each circuit breaker,
  -- from the shared dict every second (gw.upstream.publish)
  require("gw.upstream").publish(ctx)
  -- merchants taken out of config.merchants with payments still open or
  -- refunds under way: said once per generation, and their notifications
  -- (refused 404) logged and counted by gw.notify (ctx.unconfigured)
  paygate.spawn(function()
    local found, uerr = boot.unconfigured(db, cfg.by_mchid)
    if not found then
      paygate.log.warn("gateway: cannot check for open payments of"
        .. " merchants no longer configured", { error = tostring(uerr) })
      return
    end
    ctx.unconfigured = found
    notify.init_unconfigured(found)
    boot.say_unconfigured(found)
  end)
end

-- other helpers' parts (reconciliation) plug in here when present
for _, name in ipairs({ "gw.reconcile" }) do
  local ok, mod = pcall(require, name)
  if ok and type(mod) == "table" and mod.start then
    mod.start(ctx)
  elseif not ok and not tostring(mod):find("module '" .. name
                                           .. "' not found", 1, true) then
    error(mod, 0)
  end
end

-- what a reload changed of the merchants (added, removed, a serial, the
-- public key id, the appids): one line each, once per generation. Last,
-- so that a load refused by anything above says none of it.
boot.say_merchant_changes(cfg, wx)
