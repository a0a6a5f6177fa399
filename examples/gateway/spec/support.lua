-- examples/gateway/spec/support.lua: what the gateway's end-to-end specs
-- share. It starts the WeChat Pay simulator (with a platform key the spec
-- holds, so it can sign notifications of its own), a webhook receiver
-- and the gateway (examples/gateway) on loopback, makes an API key for
-- the app "shop", and gives signed merchant-API calls, crafted
-- notifications and waits on conditions with deadlines.
--
--   local S = require "examples.gateway.spec.support"
--   local env = S.start{ db = "sqlite" }          -- or "postgres"
--   local res = env:api("POST", "/v1/payments", { order_id = "o1", ... })
--   teardown(S.stop)
--
-- Written against the contract (docs/gateway.md), not the app's code.
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local http = require "paygate.http"
local apikey = require "paygate.apikey"
local sql = require "paygate.sql"
local resource = require "paygate.wechatpay.resource"
local testing = require "paygate.testing"
local gwcore = dofile("examples/gateway/spec/core_support.lua")

local S = {}
S.testing = testing
S.wait_until = testing.wait_until

local APP = "examples/gateway"

local write, read = gwcore.write, gwcore.read
S.write, S.read = write, read

local function digits(n)
  local b = crypto.random_bytes(n)
  local t = {}
  for i = 1, n do t[i] = tostring(b:byte(i) % 10) end
  return table.concat(t)
end
S.digits = digits

function S.order_id(prefix)
  return (prefix or "o") .. "-" .. crypto.random_nonce(12)
end

------------------------------------------------------ the webhook receiver

-- A merchant's event endpoint: verifies every delivery's
-- Paygate-Signature (paygate.outbox.verify_webhook) and keeps what came.
--   POST /hook                 204 | 400 {error} (bad signature, rejected)
--                              | 500 (failing on purpose)
--   POST /_ctl/mode {reject = {subject = true}, fail_first = bool}
--   GET  /_ctl/events          {events = [{id, type, subject, data,
--                               attempt, tenant (X-Tenant), body (as it
--                               came), headers (its Paygate-* and
--                               Content-Type, lower-case names)}],
--                               attempts = {[id] = n}, refused = {kind = n}}
-- Everything in memory: one worker.
S.RECEIVER = [[
local paygate = require "paygate"
local json = require "paygate.json"
local outbox = require "paygate.outbox"
local secret = paygate.config.secret
local reject, fail_first = {}, false
local events, attempts, refused = {}, {}, {}
paygate.route("POST", "/hook", function(req)
  local ok, err = outbox.verify_webhook(secret,
    req:header("Paygate-Signature"), req.body)
  if not ok then
    refused[err.kind] = (refused[err.kind] or 0) + 1
    return 400, { error = err.kind }
  end
  local e = json.decode(req.body)
  local id = tostring(e.id)
  attempts[id] = (attempts[id] or 0) + 1
  if reject[e.subject] then return 400, { error = "rejected" } end
  if fail_first and attempts[id] == 1 then
    return 500, { error = "first attempt fails" }
  end
  local h = {}
  for k, v in pairs(req.headers) do
    if k:sub(1, 8) == "paygate-" or k == "content-type" then h[k] = v end
  end
  events[#events + 1] = { id = e.id, type = e.type, subject = e.subject,
                          data = e.data, attempt = e.attempt,
                          tenant = req:header("X-Tenant"),
                          body = req.body, headers = h }
  return 204
end)
paygate.route("POST", "/_ctl/mode", function(req)
  local m = req:json()
  reject = m.reject or {}
  fail_first = m.fail_first == true
  return 200, { ok = true }
end)
paygate.route("GET", "/_ctl/events", function()
  return 200, { events = #events > 0 and events or json.empty_array,
                attempts = attempts, refused = refused }
end)
]]

--------------------------------------------------------------- start-up

local Env = {}
Env.__index = Env

S.RSA = "WECHATPAY2-SHA256-RSA2048"

-- the describe block's PostgreSQL database (a fresh one per S.stop, on
-- the run's one server: servers.postgres_db)
local pg_db
local envs = {}           -- started, for S.stop to close their handles

-- S.default_db: the store of an env whose o.db is nil ("sqlite" when nil);
-- the *_postgres_spec files set it to "postgres" and run a SQLite spec
-- file as it is (the same cases on both stores).
S.default_db = nil

-- syntax: env = S.start([o])
-- o: db ("sqlite" default, or "postgres": a database of the spec run's
-- PostgreSQL server, spec/support/servers.lua's postgres_db, shared by
-- the envs started until S.stop, which drops it), gateway (more
-- config.gateway keys), merchant (more config.merchants[1] keys:
-- { deadline = 5 } for a WeChat that never answers, the kit's being
-- 15 s), admin_token (written to a file named by
-- admin_token_file), time_scale (the simulator's), workers, appids (the
-- simulator merchant's appids, the first its default: a list of two
-- makes a merchant paying under two apps; default one made up),
-- merchants (2: a second simulator merchant, env.m2, configured as
-- config.merchants[2] with its APIv3 key in its own file), sign_type
-- (testing.SM2: the national-crypto variant, the simulator's and every
-- merchant's, SM2 keys; env.sm is then true and crafted notifications
-- are SM2-signed and SM4-encrypted).
-- yields: makes keys, starts simulator, receiver and gateway.
function S.start(o)
  o = o or {}
  if o.db == nil then o.db = S.default_db end
  local env = setmetatable({}, Env)
  env.sign_type = o.sign_type or S.RSA
  env.sm = env.sign_type == testing.SM2
  -- the platform key is ours, so specs can sign notifications
  env.platform = testing.merchant_keys{ mchid = "platform", sm2 = env.sm }
  env.platform_key = assert(crypto.private_key(read(env.platform.private_key)))
  env.sim = testing.simulator{
    time_scale = o.time_scale or 100, sign_type = o.sign_type,
    merchants = o.appids and { testing.merchant{ appids = o.appids,
                                                 sm2 = env.sm } }
                or o.merchants,
    config = { platform_private_key = env.platform.private_key,
               platform_certificate = env.platform.certificate },
  }
  env.m = env.sim.merchant
  env.m2 = env.sim.merchants[2]
  env.hook_secret = "whsec_" .. crypto.random_nonce(32)
  env.hook = testing.start_app{ source = S.RECEIVER,
                                config = { secret = env.hook_secret } }
  if o.db == "postgres" then
    if not pg_db then
      pg_db = require("spec.support.servers").postgres_db()
    end
    env.db_url = pg_db.url
  end
  env.gw = testing.start_app{ app = APP, workers = o.workers,
    timeout = o.start_timeout or 30,
    config = function(srv)
      env.dir = srv.dir
      env.db_url = env.db_url or ("sqlite:" .. srv.dir .. "/gateway.db")
      write(srv.dir .. "/hook.secret", env.hook_secret)
      local m = gwcore.merchant_config(env.sim, srv)
      for k, v in pairs(o.merchant or {}) do m[k] = v end
      local g = { db = env.db_url, public_url = srv:url(""),
                  payment_ttl = 7200, on_late_payment = "refund",
                  webhooks = { { url = env.hook:url("/hook"),
                                 secret_file = srv.dir .. "/hook.secret",
                                 headers = { ["X-Tenant"] = "spec" },
                                 types = o.webhook_types } } }
      if o.admin_token then
        write(srv.dir .. "/admin.token", o.admin_token)
        g.admin_token_file = srv.dir .. "/admin.token"
      end
      for k, v in pairs(o.gateway or {}) do g[k] = v end
      local ms = { m }
      if env.m2 then
        local key = srv.dir .. "/apiv3-2.key"
        write(key, env.m2.apiv3_key .. "\n")
        ms[2] = env.sim:client_config(env.m2, { apiv3_key = false })
        ms[2].apiv3_key_file = key
      end
      return { gateway = g, merchants = ms }
    end }
  -- an API key for the app "shop", made in the gateway's store the way
  -- docs/gateway.md says (paygate.apikey's table)
  local db = assert(sql.open(env.db_url))
  env.db = db
  env.key = assert(apikey.create(db, "shop"))
  envs[#envs + 1] = env
  return env
end

-- syntax: S.stop() -- for teardown: every process, directory and handle
function S.stop()
  for i = #envs, 1, -1 do
    pcall(envs[i].db.close, envs[i].db)
    envs[i] = nil
  end
  testing.stop_all()
  if pg_db then
    require("spec.support.servers").stop_all()   -- drops it
    pg_db = nil
  end
end

------------------------------------------------------- the merchant API

-- syntax: res = env:api(method, path[, body[, o]])
-- body: a table (JSON-encoded) or a string (sent as is). o: key (the
-- Idempotency-Key; a fresh one for a POST unless false), headers,
-- sign = false (unsigned), secret / app_id / key_id / timestamp (to sign
-- otherwise), timeout.
-- returns: res (status, headers, body, json); raises if no answer.
function Env:api(method, path, body, o)
  o = o or {}
  if type(body) == "table" then body = json.encode(body) end
  local headers = {}
  if body then headers["Content-Type"] = "application/json" end
  local ik
  if method == "POST" and o.key ~= false then
    ik = o.key or ("k-" .. crypto.random_nonce(16))
    headers["Idempotency-Key"] = ik
  end
  if o.sign ~= false then
    local h = apikey.sign{ app_id = o.app_id or self.key.app_id,
                           key_id = o.key_id or self.key.key_id,
                           secret = o.secret or self.key.secret,
                           method = method, path = path, body = body or "",
                           timestamp = o.timestamp, idempotency_key = ik }
    headers.Authorization = h.Authorization
  end
  for k, v in pairs(o.headers or {}) do headers[k] = v end
  local res, err = http.request{ method = method, url = self.gw:url(path),
                                 body = body, headers = headers,
                                 timeout = o.timeout or 20 }
  if not res then error(method .. " " .. path .. ": " .. tostring(err), 2) end
  if res.body and res.body ~= "" then res.json = json.decode(res.body) end
  return res
end

local function expect(res, status, what)
  if res.status ~= status then
    error((what or "request") .. ": want " .. status .. ", got "
          .. res.status .. " " .. tostring(res.body), 3)
  end
  return res.json
end
S.expect = expect

-- syntax: body = env:create(o) -- POST /v1/payments, expects 201
-- o: the request's fields; defaults: order_id fresh, channel native,
-- amount 100, description.
function Env:create(o)
  o = o or {}
  local b = { order_id = o.order_id or S.order_id(), channel = "native",
              amount = 100, description = "e2e order" }
  for k, v in pairs(o) do b[k] = v end
  return expect(self:api("POST", "/v1/payments", b), 201, "create")
end

function Env:get(id, refresh)
  return expect(self:api("GET", "/v1/payments/" .. id
                         .. (refresh and "?refresh=1" or "")), 200, "get")
end

function Env:refund(id, amount, reason)
  return self:api("POST", "/v1/payments/" .. id .. "/refunds",
                  { amount = amount, reason = reason })
end

-- syntax: p = env:wait_state(id, state[, timeout]) -- polls GET
function Env:wait_state(id, state, timeout)
  local last
  local ok, err = pcall(testing.wait_until, function()
    last = self:api("GET", "/v1/payments/" .. id)
    return last.json and last.json.state == state
  end, timeout or 15, "payment " .. id .. " " .. state)
  if not ok then
    error(tostring(err) .. "; last: " .. tostring(last and last.body), 2)
  end
  return last.json
end

function Env:wait_refund(rid, state, timeout)
  local last
  local ok, err = pcall(testing.wait_until, function()
    last = self:api("GET", "/v1/refunds/" .. rid)
    return last.json and last.json.state == state
  end, timeout or 15, "refund " .. rid .. " " .. state)
  if not ok then
    error(tostring(err) .. "; last: " .. tostring(last and last.body), 2)
  end
  return last.json
end

-- create, pay at the simulator, wait until the gateway says paid
function Env:paid_payment(o)
  local body = self:create(o)
  local p = body.payment
  self.sim:pay_and_wait(p.out_trade_no)
  return self:wait_state(p.id, "paid"), body
end

------------------------------------------------------------------ admin

function Env:admin(method, path, body, headers)
  local h = { ["Content-Type"] = "application/json" }
  for k, v in pairs(headers or {}) do h[k] = v end
  local res, err = http.request{ method = method, url = self.gw:url(path),
    body = body and json.encode(body) or nil, headers = h, timeout = 10 }
  if not res then error(method .. " " .. path .. ": " .. tostring(err), 2) end
  if res.body and res.body ~= "" then res.json = json.decode(res.body) end
  return res
end

------------------------------------------------------------------ events

function Env:hook_mode(m)
  local res = assert(self.hook:request{ path = "/_ctl/mode", json = m })
  assert(res.status == 200, res.body)
end

function Env:hook_state()
  local res = assert(self.hook:request("/_ctl/events"))
  return res.json
end

-- syntax: list = env:events([subject[, type]]) -- delivered events
function Env:events(subject, etype)
  local out = {}
  for _, e in ipairs(self:hook_state().events) do
    if (not subject or e.subject == subject)
       and (not etype or e.type == etype) then
      out[#out + 1] = e
    end
  end
  return out
end

-- syntax: e = env:wait_event(subject, type[, timeout]) -- the first one
function Env:wait_event(subject, etype, timeout)
  local found
  local ok, err = pcall(testing.wait_until, function()
    found = self:events(subject, etype)[1]
    return found
  end, timeout or 15, "event " .. etype .. " of " .. tostring(subject))
  if not ok then
    error(tostring(err) .. "; received: "
          .. tostring(json.encode(self:hook_state())), 2)
  end
  return found
end

-- syntax: types = env:outbox_types(subject) -- the events enqueued for a
-- payment, in order (paygate.outbox's table in the gateway's store)
function Env:outbox_types(subject)
  local rows = assert(self.db:query("SELECT type FROM paygate_outbox"
    .. " WHERE subject = $1 ORDER BY id", { subject }))
  local t = {}
  for i, r in ipairs(rows) do t[i] = r.type end
  return t
end

function Env:count_events(subject, etype)
  local n = 0
  for _, t in ipairs(self:outbox_types(subject)) do
    if t == etype then n = n + 1 end
  end
  return n
end

---------------------------------------------------- crafted notifications

-- A transaction as WeChat sends it for a paid order (fields overridable).
function Env:transaction(p, over)
  local t = {
    appid = self.m.appid, mchid = self.m.mchid,
    out_trade_no = p.out_trade_no,
    transaction_id = "4200" .. digits(24),
    trade_type = "NATIVE", trade_state = "SUCCESS",
    trade_state_desc = "支付成功", bank_type = "OTHERS", attach = "",
    success_time = os.date("!%Y-%m-%dT%H:%M:%S+00:00"),
    payer = { openid = "o" .. crypto.random_nonce(27) },
    amount = { total = p.amount, payer_total = p.amount,
               currency = "CNY", payer_currency = "CNY" },
  }
  for k, v in pairs(over or {}) do t[k] = v end
  return t
end

-- syntax: body, headers = env:notification(event_type, plain[, o])
-- The envelope WeChat POSTs: `plain` (a table) encrypted with the
-- merchant's APIv3 key (AES-256-GCM, SM4-GCM in the SM variant), signed
-- with the simulator's platform key (ours).
-- o: id (default a fresh one), serial, original_type, and
-- env:notify_headers' options.
function Env:notification(event_type, plain, o)
  o = o or {}
  local otype = o.original_type
    or (event_type:match("^REFUND") and "refund" or "transaction")
  local r = assert(resource.encrypt(self.m.apiv3_key, json.encode(plain),
    otype, { original_type = otype,
             algorithm = self.sm and resource.SM4 or resource.AES }))
  local body = json.encode({
    id = o.id or crypto.random_nonce(8) .. "-" .. crypto.random_nonce(8),
    create_time = os.date("!%Y-%m-%dT%H:%M:%S+00:00"),
    resource_type = "encrypt-resource", event_type = event_type,
    summary = "支付成功", resource = r })
  return body, self:notify_headers(body, o)
end

-- syntax: headers = env:notify_headers(body[, o])
-- WeChat's headers of a notification of body, signed with the platform
-- key in the env's variant (SM2 with SM3 and Wechatpay-Signature-Type in
-- the SM variant). o: timestamp, serial, key (another private key to sign
-- with), sign_type (the algorithm it signs with; default the env's),
-- signature_type (the Wechatpay-Signature-Type sent: default sign_type's
-- in the SM variant, none in the RSA one; false: none).
function Env:notify_headers(body, o)
  o = o or {}
  local ts = tostring(o.timestamp or math.floor(core.time()))
  local nonce = crypto.random_nonce(32)
  local alg = o.sign_type or self.sign_type
  local sig = assert(crypto.sign_base64(o.key or self.platform_key,
    ts .. "\n" .. nonce .. "\n" .. body .. "\n", alg))
  local stype = o.signature_type
  if stype == nil and self.sm then stype = alg end
  return { ["Content-Type"] = "application/json",
           ["Wechatpay-Timestamp"] = ts, ["Wechatpay-Nonce"] = nonce,
           ["Wechatpay-Signature"] = sig,
           ["Wechatpay-Signature-Type"] = stype or nil,
           ["Wechatpay-Serial"] = o.serial or self.platform.serial,
           ["Request-ID"] = "08" .. digits(20) }
end

-- syntax: res = env:post_notify(body, headers[, mchid])
function Env:post_notify(body, headers, mchid)
  local res, err = http.request{ method = "POST",
    url = self.gw:url("/wechatpay/notify/" .. (mchid or self.m.mchid)),
    body = body, headers = headers, timeout = 10 }
  if not res then error("notify: " .. tostring(err), 2) end
  if res.body and res.body ~= "" then res.json = json.decode(res.body) end
  return res
end

-- syntax: res = env:post_paid(p[, mchid]) -- WeChat's paid notification
-- of p (env:transaction(p)), crafted and posted as post_notify does
function Env:post_paid(p, mchid)
  local body, h = self:notification("TRANSACTION.SUCCESS", self:transaction(p))
  return self:post_notify(body, h, mchid)
end

-- syntax: S.reload_with(env, edit)
-- The gateway's config file as first written, with the Lua statements
-- edit applied to its table c ("c.merchants[1].appids = nil"; "" for the
-- file as written); then srv:reload(), which waits until the reload is
-- done and the old workers are gone (a draining one still answers the
-- kept-alive connection of the spec).
function S.reload_with(env, edit)
  local luassert = require "luassert"
  local srv = env.gw
  env.original_config = env.original_config
                        or testing.proc.read(srv.config_file)
  testing.write(srv.config_file, "local c = (function() "
    .. env.original_config .. " end)()\n" .. edit .. "\nreturn c\n")
  local ok, out = srv:reload()
  luassert.is_true(ok, out)
end

function S.ok2xx(status) return status >= 200 and status < 300 end

return S
