-- Shared set-up of the core specs: the simulator, the gateway on it, and
-- a signed merchant API client.
local testing = require "paygate.testing"
local sql = require "paygate.sql"
local apikey = require "paygate.apikey"
local json = require "paygate.json"
local crypto = require "paygate.crypto"
local luassert = require "luassert"

local _M = {}

local write = testing.write

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

--- syntax: core.write(path, data), s = core.read(path) -- whole files
_M.write, _M.read = write, read

--- syntax: m = core.merchant_config(sim, srv[, merchant])
-- The simulator merchant's config.merchants entry (sim.merchant unless
-- given) with its APIv3 key in the file srv.dir/apiv3.key.
function _M.merchant_config(sim, srv, merchant)
  merchant = merchant or sim.merchant
  local key_file = srv.dir .. "/apiv3.key"
  write(key_file, merchant.apiv3_key .. "\n")
  local m = sim:client_config(merchant, { apiv3_key = false })
  m.apiv3_key_file = key_file
  return m
end

--- syntax: conf = core.config(sim, srv[, gateway_over[, merchant_over]])
function _M.config(sim, srv, over, mover, merchant)
  local m = _M.merchant_config(sim, srv, merchant)
  for k, v in pairs(mover or {}) do m[k] = v end
  local g = { db = "sqlite:" .. srv.dir .. "/gw.db",
              public_url = srv:url(""),
              dispatcher = { interval = 0.05 } }
  for k, v in pairs(over or {}) do g[k] = v end
  if g.db == false then g.db = nil end
  return { gateway = g, merchants = { m } }
end

----------------------------------------------------- the config check

--- syntax: code, out = core.run_config(dir, conf[, listen])
-- Runs the gateway with conf (written to a file in dir); returns its exit
-- status and output.
function _M.run_config(dir, conf, listen)
  local server = require "paygate.testing.server"
  local free_port = require("paygate.core").free_port
  local file = dir .. "/conf-" .. free_port() .. ".lua"
  write(file, "return " .. server.lua_source(conf) .. "\n")
  return testing.proc.run({ server.bin(), "run", "examples/gateway",
    "--listen", listen or ("127.0.0.1:" .. free_port()),
    "--admin", "127.0.0.1:" .. free_port(), "--config", file },
    { timeout = 30 })
end

--- syntax: lines = core.config_lines(out) -- its "gateway: ..." lines
function _M.config_lines(out)
  local lines = {}
  for line in out:gmatch("[^\n]+") do
    if line:match("^gateway: ") then lines[#lines + 1] = line end
  end
  return lines
end

--- syntax: out = core.expect_refused(dir, conf, want[, listen])
-- Asserts the gateway refuses conf: exit status 2 and one "gateway: "
-- line, containing want. returns: the output.
function _M.expect_refused(dir, conf, want, listen)
  local code, out = _M.run_config(dir, conf, listen)
  luassert.equal(2, code, out)
  local lines = _M.config_lines(out)
  luassert.equal(1, #lines, out)
  luassert.matches(want, lines[1], 1, true)
  return out
end

--------------------------------------------------- a webhook receiver

-- Checks each delivery's Paygate-Signature against the secret below (401 if
-- it does not verify) and answers /hook with the status last POSTed to
-- /mode (204 at first); keeps the events it answered 204.
--   GET /got: the kept events' bodies, a JSON array, in arrival order.
local RECEIVER = [[
local paygate = require "paygate"
local outbox = require "paygate.outbox"
local d = require("paygate.shared").get_dict("paygate")
paygate.route("POST", "/mode", function(req)
  d:set("mode", tonumber(req.body))
  return 204
end)
paygate.route("POST", "/hook", function(req)
  local ok = outbox.verify_webhook("whsec-spec-0123456789abcdefghijklmn",
                                   req:header("Paygate-Signature"), req.body)
  if not ok then return 401 end
  local mode = d:get("mode") or 204
  if mode == 204 then
    local n = d:incr("n", 1, 0)
    d:set("ev:" .. n, req.body)
  end
  return mode
end)
paygate.route("GET", "/got", function()
  local out = {}
  for i = 1, d:get("n") or 0 do out[i] = d:get("ev:" .. i) end
  return 200, "[" .. table.concat(out, ",") .. "]"
end)
]]

--- syntax: rcv = core.receiver()
-- The receiver above (a testing.start_app server) and its secret in the
-- file rcv.secret_file, for a gateway.webhooks entry.
function _M.receiver()
  local rcv = testing.start_app{ source = RECEIVER }
  rcv.secret_file = rcv.dir .. "/wh.secret"
  write(rcv.secret_file, "whsec-spec-0123456789abcdefghijklmn\n")
  return rcv
end

--- syntax: srv, db_url = core.start_srv(sim, o)
-- The gateway's server alone (o as core.start's; port: the one to listen
-- on) and its store's URL.
function _M.start_srv(sim, o)
  local db_url
  local srv = testing.start_app{ app = o.app or "examples/gateway",
    port = o.port, workers = o.workers,
    args = { "--log-level", o.log_level or "info" },
    bin = o.bin,
    config = function(srv)
      local c = _M.config(sim, srv, o.gateway, o.merchant,
                          o.partner and sim.partner)
      if o.db then c.gateway.db = o.db(srv) end
      db_url = c.gateway.db
      return c
    end }
  return srv, db_url
end

--- syntax: gw = core.gateway(srv, db_url)
-- A running gateway server as a gw: its store (opened at db_url) and an
-- API key made there for the app "shop1".
function _M.gateway(srv, db_url)
  local gw = { srv = srv, db_url = db_url, app_id = "shop1" }
  gw.db = assert(sql.open(db_url))
  local k = assert(apikey.create(gw.db, gw.app_id))
  gw.key_id, gw.secret = k.key_id, k.secret
  return setmetatable(gw, { __index = _M })
end

--- syntax: gw = core.start(sim[, o]) -- o: gateway, merchant (overrides),
-- db (a function(srv) -> url), workers, log_level ("info"), partner (the simulator's service
-- provider as the merchant), app (another copy of the app's folder), bin
-- (the paygate to run it with: a wrapper, e.g. core.shifted_bin's)
function _M.start(sim, o)
  return _M.gateway(_M.start_srv(sim, o or {}))
end

--- syntax: bin = core.shifted_bin(seconds)
-- A paygate whose wall clock runs `seconds` ahead (negative: behind) of
-- this host's, and so of the simulator's: a script in a fresh folder that
-- runs the spec's paygate under spec/support/clock_shift.c (built here
-- with cc), for core.start's bin. nil when cc is missing.
function _M.shifted_bin(seconds)
  local server = require "paygate.testing.server"
  if os.execute("command -v cc >/dev/null 2>&1") ~= 0 then return nil end
  local dir = testing.tmpdir()
  local shim = dir .. "/clock_shift.so"
  assert(os.execute("cc -shared -fPIC -O1 -o '" .. shim
                    .. "' spec/support/clock_shift.c -ldl") == 0,
         "cannot build spec/support/clock_shift.c")
  local p = assert(io.popen("realpath '" .. server.bin() .. "'"))
  local real = p:read("*l")
  p:close()
  -- (a sanitizer build wants its runtime first of the preloads: told not
  -- to check, as the shim only wraps the clock's functions)
  local asan = os.getenv("ASAN_OPTIONS")
  local bin = dir .. "/paygate"
  write(bin, "#!/bin/sh\nCLOCK_SHIFT=" .. math.floor(seconds)
        .. " LD_PRELOAD='" .. shim .. "' ASAN_OPTIONS='"
        .. (asan and asan .. ":" or "") .. "verify_asan_link_order=0'"
        .. " exec '" .. real .. "' \"$@\"\n")
  assert(os.execute("chmod 700 '" .. bin .. "'") == 0)
  return bin
end

--- syntax: sim, gw = core.start_loopback()
-- A simulator (time_scale 100) and the gateway on it as scripts/run sets
-- it up: the console in loopback mode, no admin token; reconcile off.
function _M.start_loopback()
  local sim = testing.simulator{ time_scale = 100 }
  return sim, _M.start(sim, { gateway = {
    console = { access = "loopback" },
    reconcile = { enabled = false } } })
end

--- syntax: res = gw:call(method, path[, body[, headers]])
-- Signed with the app's key; a table body is JSON; POSTs get a fresh
-- Idempotency-Key unless headers name one.
function _M.call(gw, method, path, body, headers)
  if type(body) == "table" then body = json.encode(body) end
  body = body or ""
  local ik
  if method == "POST" then ik = crypto.random_nonce(24) end
  for k, v in pairs(headers or {}) do
    if k:lower() == "idempotency-key" then ik = v or nil end
  end
  local h = apikey.sign{ app_id = gw.app_id, key_id = gw.key_id,
                         secret = gw.secret, method = method, path = path,
                         body = body, idempotency_key = ik }
  h["Content-Type"] = "application/json"
  for k, v in pairs(headers or {}) do
    if k:lower() ~= "idempotency-key" then h[k] = v or nil end
  end
  return gw.srv:request{ method = method, path = path, body = body,
                         headers = h }
end

-- the message of a failed status assertion: a 5xx answer brings the
-- gateway log's last lines (what failed inside is there, not in the body)
local function failed(gw, what, res)
  local msg = what .. ": " .. res.status .. " " .. res.body
  if res.status >= 500 then
    local lines = {}
    for l in (gw.srv:logs() or ""):gmatch("[^\n]+") do
      lines[#lines + 1] = l
      if #lines > 40 then table.remove(lines, 1) end
    end
    msg = msg .. "\n-- the gateway's log, last lines:\n"
      .. table.concat(lines, "\n")
  end
  return msg
end

--- syntax: payment, pay = gw:create(o) -- 201 asserted
function _M.create(gw, o)
  local body = { order_id = o.order_id or ("o-" .. crypto.random_nonce(10)),
                 channel = o.channel or "native", amount = o.amount or 100,
                 description = o.description or "core spec" }
  for k, v in pairs(o) do body[k] = v end
  local res = gw:call("POST", "/v1/payments", body)
  if res.status ~= 201 then error(failed(gw, "create", res), 2) end
  return res.json.payment, res.json.pay
end

function _M.get(gw, id, q)
  local res = gw:call("GET", "/v1/payments/" .. id .. (q or ""))
  if res.status ~= 200 then error(failed(gw, "get", res), 2) end
  return res.json
end

--- syntax: p = gw:wait_state(id, state[, timeout])
function _M.wait_state(gw, id, state, timeout)
  local p
  testing.wait_until(function()
    p = gw:get(id)
    return p.state == state
  end, timeout or 30, "payment " .. id .. " to be " .. state)
  return p
end

--- syntax: statuses = gw:concurrent_refunds(id, n, amount)
-- n refund POSTs of `amount` at once; returns { [status] = count }.
function _M.concurrent_refunds(gw, id, n, amount)
  local core = require "paygate.core"
  local counts, done = {}, 0
  for _ = 1, n do
    core.spawn(function()
      local res = gw:call("POST", "/v1/payments/" .. id .. "/refunds",
                          { amount = amount })
      counts[res.status] = (counts[res.status] or 0) + 1
      done = done + 1
    end)
  end
  testing.wait_until(function() return done == n end, 30, "the refunds")
  return counts
end

function _M.stop(gw)
  if gw.db then gw.db:close() end
end

----------------------------------------------- the app's modules in-process

_M.MCHID = "1900000001"

--- syntax: db, ctx = core.inproc(url[, wx])
-- For specs that call the app's modules without a server: the gateway's
-- store at url (migrated, with the audit schema) and the context
-- gw.payments, gw.refunds and gw.notify were initialised on, for merchant
-- core.MCHID. wx: the WeChat Pay clients by mchid ({} when not given).
function _M.inproc(url, wx)
  package.path = "examples/gateway/?.lua;" .. package.path
  local migrate = require "paygate.migrate"
  local audit = require "paygate.audit"
  local db = assert(sql.open(url))
  assert(migrate.run(db, "examples/gateway/migrations"))
  assert(audit.ensure_schema(db))
  local ctx = { db = db, wx = wx or {},
    by_mchid = { [_M.MCHID] = { mchid = _M.MCHID } },
    gateway = { on_late_payment = "refund", public_url = "http://x" },
    degraded = function() return false end,
    notify_url = function(m) return "http://127.0.0.1/n/" .. m end }
  local refunds = require "gw.refunds"
  require("gw.payments").init(ctx)
  refunds.init(ctx)
  require("gw.notify").init(ctx)
  ctx.refunds = refunds
  return db, ctx
end

--- syntax: id = core.payment(db, state[, amount])
-- A payment row of merchant core.MCHID with its first attempt (open),
-- out_trade_no id .. "_1"; state "created" or "paying".
function _M.payment(db, state, amount)
  local model = require "gw.model"
  local now = model.now()
  local id = model.new_payment_id()
  assert(model.payments:create(db, {
    id = id, app_id = "a", order_id = id, mchid = _M.MCHID,
    appid = "wx1", channel = "native", amount = amount or 100,
    currency = "CNY", description = "d", out_trade_no = id .. "_1",
    attempt = 1, refunded = 0, expires_at = now + 60, created_at = now,
    updated_at = now, checks = 0 }))
  assert(db:exec("INSERT INTO gw_attempts (out_trade_no, payment_id, n,"
    .. " channel, state, created_at) VALUES ($1, $2, 1, 'native', 'open',"
    .. " $3)", { id .. "_1", id, now }))
  if state == "paying" then
    assert(model.payments:apply(db, id, "opened"))
  end
  return id
end

--- syntax: ev = core.paid_event(out_trade_no[, total[, id]])
-- A parsed TRANSACTION.SUCCESS notification (id "EV-" .. out_trade_no).
function _M.paid_event(no, total, eid)
  return { id = eid or ("EV-" .. no), event_type = "TRANSACTION.SUCCESS",
           resource = { mchid = _M.MCHID, out_trade_no = no,
                        trade_state = "SUCCESS", transaction_id = "42" .. no,
                        amount = { total = total or 100, payer_total = 100,
                                   currency = "CNY" } } }
end

return _M
