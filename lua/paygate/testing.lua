-- paygate.testing: a kit for specs of paygate apps (run them with
-- `paygate exec busted`). It starts the WeChat Pay simulator
-- (examples/simulator) and the app under test on free loopback ports,
-- makes merchants with fresh test keys, builds paygate.wechatpay clients
-- pointed at the simulator, creates orders, pays them as a payer would and
-- waits for the notifications to reach the app. Every process it starts
-- is stopped (and reaped) by testing.stop_all() (call it in teardown), at
-- the latest when the busted run ends, and by a watchdog if the spec run
-- itself dies; its folders go with them (PAYGATE_TEST_KEEP keeps them).
--
--   local testing = require "paygate.testing"
--   local sim = testing.simulator()
--   local app = testing.start_app{ app = "myapp",
--     config = { wechatpay = sim:client_config() } }
--   local no = sim:order{ notify_url = app:url("/wechatpay/notify") }
--   local n = sim:pay_and_wait(no)          -- delivered: 200 or 204
--
-- See docs/testing.md.
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local http = require "paygate.http"
local proc = require "paygate.testing.proc"
local server = require "paygate.testing.server"

-- a value in a message: JSON as paygate writes it (no "\/" for "/")
local function shown(v)
  local ok, s = pcall(require("paygate.json").encode, v)
  return ok and s or tostring(v)
end

local type, error, ipairs, pairs, tostring, setmetatable, assert, pcall =
      type, error, ipairs, pairs, tostring, setmetatable, assert, pcall

local _M = {
  proc = proc, server = server,
  spawn = proc.spawn, wait_until = proc.wait_until, read = proc.read,
  write = proc.write,
  tmpdir = server.tmpdir, lua_source = server.lua_source,
  free_port = function() return core.free_port() end,
}

local RSA_TYPE = "WECHATPAY2-SHA256-RSA2048"
local SM2_TYPE = "WECHATPAY2-SM2-WITH-SM3"
local SM2_ID = "1234567812345678"

local started = {}       -- servers started by the kit, for stop_all()
local dirs = {}          -- key directories made by the kit
local sims = {}          -- simulators started, whose kit clients stop_all ends

-- helpers ----------------------------------------------------------------

local function digits(n)
  local b = crypto.random_bytes(n)
  local t = {}
  for i = 1, n do t[i] = tostring(b:byte(i) % 10) end
  return table.concat(t)
end

local function kit_dir()
  local d = server.tmpdir()
  dirs[#dirs + 1] = d
  return d
end

local write = proc.write

-- raises at its caller's caller (merchant_keys's), an openssl that
-- cannot start too (proc.run's error: through pcall, it names no line)
local function openssl(args, what)
  local argv = { "openssl" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local ok, code, out = pcall(proc.run, argv, { timeout = 60 })
  if not ok then out = tostring(code) end
  if code ~= 0 then
    error("testing: openssl failed making " .. what .. ": " .. out, 3)
  end
  return out
end

--- syntax: key = testing.apiv3_key() -- 32 random characters
function _M.apiv3_key() return crypto.random_nonce(32) end

--- syntax: no = testing.out_trade_no([prefix]) -- a fresh, valid one
function _M.out_trade_no(prefix)
  return (prefix or "T") .. crypto.random_nonce(20)
end

--- syntax: keys = testing.merchant_keys([{ mchid, sm2, dir, days }])
-- yields: runs the openssl command line (RSA-2048, or SM2 with sm2 = true).
-- returns: { private_key = path (PKCS#8 PEM), certificate = path (self-
-- signed, CN = mchid, valid `days`, default 365: paygate.wechatpay warns
-- at start of a merchant_certificate ending within 30 days), public_key =
-- path, serial
-- (40 upper-case hex digits, random) }. Test keys only: made per run.
function _M.merchant_keys(o)
  o = o or {}
  local dir = o.dir or kit_dir()
  local mchid = o.mchid or "1900000000"
  local tag = (o.name or mchid) .. "-" .. crypto.random_nonce(6)
  local k = { private_key = dir .. "/" .. tag .. "_key.pem",
              certificate = dir .. "/" .. tag .. "_cert.pem",
              public_key = dir .. "/" .. tag .. "_pub.pem" }
  -- a positive 160-bit serial printed as exactly 40 hex digits
  local b = crypto.random_bytes(20)
  k.serial = ("%X"):format(1 + b:byte(1) % 7) .. crypto.hex(b):sub(2):upper()
  local subj = "/C=CN/O=paygate test merchant/CN=" .. mchid
  local days = tostring(o.days or 365)
  if o.sm2 then
    openssl({ "genpkey", "-algorithm", "SM2", "-out", k.private_key },
            "an SM2 key")
    openssl({ "req", "-x509", "-new", "-key", k.private_key, "-sm3",
              "-sigopt", "distid:" .. SM2_ID, "-days", days, "-subj", subj,
              "-set_serial", "0x" .. k.serial, "-out", k.certificate,
              "-addext", "basicConstraints=critical,CA:FALSE" },
            "an SM2 certificate")
  else
    openssl({ "req", "-x509", "-newkey", "rsa:2048", "-nodes",
              "-keyout", k.private_key, "-out", k.certificate,
              "-days", days, "-subj", subj, "-set_serial", "0x" .. k.serial,
              "-addext", "basicConstraints=critical,CA:FALSE" },
            "an RSA key and certificate")
  end
  openssl({ "pkey", "-in", k.private_key, "-pubout", "-out", k.public_key },
          "the public key")
  return k
end

--- syntax: m = testing.merchant([{ mchid, appids, sm2, dir }])
-- yields: makes its keys (testing.merchant_keys).
-- returns: { mchid, appid, appids, apiv3_key, private_key, certificate,
-- public_key, serial, sm2 }: what the simulator's config and a client
-- need.
function _M.merchant(o)
  o = o or {}
  local m = { mchid = o.mchid or ("19" .. digits(8)), sm2 = o.sm2 or false }
  m.appids = o.appids or { "wx" .. crypto.hex(crypto.random_bytes(8)) }
  m.appid = m.appids[1]
  m.apiv3_key = o.apiv3_key or _M.apiv3_key()
  local k = proc.call_at(2, _M.merchant_keys,
                         { mchid = m.mchid, sm2 = m.sm2, dir = o.dir })
  for kk, v in pairs(k) do m[kk] = v end
  return m
end

-- A misspelt option (time_scal, confg) would be ignored and keep its
-- default, and the spec would fail far from the typo: raise naming it,
-- and the options there are.
local function check_options(fn, o, known)
  if o == nil then return end
  if type(o) ~= "table" then error(fn .. ": o must be a table", 3) end
  for k in pairs(o) do
    if not known[k] then
      local names = {}
      for n in pairs(known) do names[#names + 1] = n end
      table.sort(names)
      error(fn .. ": unknown option o." .. tostring(k) .. " (known: "
            .. table.concat(names, ", ") .. ")", 3)
    end
  end
end

local APP_OPTIONS = { app = true, source = true, config = true,
  workers = true, args = true, port = true, wait = true, timeout = true,
  scheme = true, ca_file = true, bin = true, watchdog = true }

-- The kit's errors name the line that called the kit, the spec's: a
-- public function raises at its caller (error(msg, 2); 3 from a helper of
-- it). One kit function calling another would have them name its own
-- line; it calls it through proc.call_at instead, which raises them again
-- at its own caller's level.
-- server.start's errors, raised again at level (counted from start's
-- caller, as error's), name the spec's line: start_app's caller, or
-- testing.simulator's (it named this file's line: "testing.lua:316: timed
-- out waiting for paygate to serve ...").
local function start(o, level)
  local srv = proc.call_at(level + 1, server.start, o)
  started[#started + 1] = srv
  return srv
end

--- syntax: srv = testing.start_app(o)
-- Starts `paygate run o.app` on a free loopback port (o as for
-- paygate.testing.server.start: app | source, config (a table, or a
-- function(srv) returning one: srv.port and srv:url(path) are known),
-- workers, args, port, wait, timeout, scheme, ca_file, bin; another key
-- raises). A relative app is taken from the current directory; one with
-- no app.lua raises, naming that directory.
-- yields: until it serves with every worker (GET /healthz on its admin
-- port).
-- returns: srv (srv:url(path), srv:request{...}, srv:logs(), srv:reload(),
-- srv:stop()).
function _M.start_app(o)
  check_options("testing.start_app", o, APP_OPTIONS)
  local srv = start(o, 2)   -- (no tail call: it would drop this frame)
  return srv
end

--- syntax: testing.stop_all()
-- yields: stops every app and simulator the kit started (TERM to all at
-- once, then KILL to one still running 10 s later), and removes their
-- directories and the keys it made. Safe to call twice; call it in
-- teardown.
function _M.stop_all()
  for i = #sims, 1, -1 do
    for m, wx in pairs(sims[i].kit_clients or {}) do
      wx:stop()
      sims[i].kit_clients[m] = nil
    end
    sims[i] = nil
  end
  -- our idle keep-alive connections closed first: each server drains at
  -- once instead of giving them a second for one last request
  -- (paygate.http.close_idle; nothing when a request is under way)
  http.close_idle()
  -- TERM to every server at once, then each waited for (and KILLed past
  -- 10 s) in turn: a server draining for another's idle connection (the
  -- simulator's, kept alive to the app it notifies) need not wait the
  -- drain's second for it, since that one is stopping too
  for i = #started, 1, -1 do
    pcall(started[i].proc.kill, started[i].proc)
  end
  for i = #started, 1, -1 do
    local srv = started[i]
    started[i] = nil
    pcall(srv.stop, srv, 10)
  end
  proc.stop_all(5)
  for i = #dirs, 1, -1 do
    server.rmdir(dirs[i])
    dirs[i] = nil
  end
end

-- the simulator ------------------------------------------------------------

local Sim = {}
Sim.__index = Sim

local function simulator_dir()
  local env = os.getenv("PAYGATE_SIMULATOR")
  if env and env ~= "" then return env end
  -- this file is lua/paygate/testing.lua; the simulator ships beside it
  local src = debug.getinfo(1, "S").source
  local here = src:sub(1, 1) == "@" and src:sub(2):match("^(.*)/[^/]+$")
  if here then
    local cand = here .. "/../../examples/simulator"
    if io.open(cand .. "/app.lua") then return cand end
  end
  return "examples/simulator"
end

local function sim_merchant_conf(m)
  local c = { mchid = m.mchid, apiv3_key = m.apiv3_key, appids = m.appids }
  if m.certificates then
    c.merchant_certificates = m.certificates
  else
    c.merchant_certificate = m.certificate
  end
  if m.sub_mchid then
    c.sub_merchants = { { mchid = m.sub_mchid, appids = { m.sub_appid } } }
    -- more sub-merchants (partner = n), each with an appid of its own
    for i = 2, #(m.sub_mchids or {}) do
      c.sub_merchants[i] = { mchid = m.sub_mchids[i],
        appids = { "wx" .. crypto.hex(crypto.random_bytes(8)) } }
    end
  end
  return c
end

-- The simulator's limits.body_bytes unless o.config gives one: a media
-- upload of a file at the simulator's own limit (5 MiB, sim/media.lua)
-- is more than the runtime's default (5 MiB) once the multipart is
-- around it, and would get the runtime's 413 instead of the simulator's
-- answer; 64 KiB more holds the meta part and the part heads.
_M.SIMULATOR_BODY_BYTES = 5 * 1024 * 1024 + 64 * 1024

local SIM_OPTIONS = { merchants = true, partner = true,
  verifier_mode = true, sign_type = true, time_scale = true,
  answer_timeout = true, config = true, app = true, workers = true,
  log_level = true, timeout = true }

--- syntax: sim = testing.simulator([o])
-- o: merchants (a list of testing.merchant() tables, or a number: how many
-- to make; default 1), partner (true: also a service provider with one
-- sub-merchant: sim.partner, sim.partner.sub_mchid; a number n: with n
-- sub-merchants, sim.partner.sub_mchids, the first of them sub_mchid),
-- verifier_mode
-- ("platform_certificates" default, "public_key", "both"), sign_type (RSA
-- default; WECHATPAY2-SM2-WITH-SM3 makes SM2 merchant keys), time_scale
-- (default 1), answer_timeout, config (more simulator config keys), app
-- (the simulator's directory: $PAYGATE_SIMULATOR or examples/simulator),
-- workers, log_level ("warn"), timeout (s to wait for it to serve, as
-- start_app's: 15); another key raises.
-- yields: makes keys, starts the simulator and waits until it serves.
-- returns: sim: sim.url, sim.merchant (the first), sim.merchants, and the
-- methods below.
function _M.simulator(o)
  check_options("testing.simulator", o, SIM_OPTIONS)
  o = o or {}
  local sm2 = o.sign_type == SM2_TYPE
  local merchants = o.merchants
  -- (testing.merchant's errors raised at this function's caller)
  local function merchant()
    local m = proc.call_at(3, _M.merchant, { sm2 = sm2 })
    return m
  end
  if merchants == nil or type(merchants) == "number" then
    local n = merchants or 1
    merchants = {}
    for i = 1, n do merchants[i] = merchant() end
  end
  local partner
  if o.partner then
    local n = o.partner == true and 1 or o.partner
    if type(n) ~= "number" or n < 1 or n % 1 ~= 0 then
      error("testing.simulator: o.partner must be true or a number of"
            .. " sub-merchants", 2)
    end
    partner = merchant()
    partner.sub_mchids = {}
    for i = 1, n do
      local sub
      repeat
        sub = "16" .. digits(8)
        local taken = false
        for j = 1, i - 1 do taken = taken or partner.sub_mchids[j] == sub end
      until not taken
      partner.sub_mchids[i] = sub
    end
    partner.sub_mchid = partner.sub_mchids[1]
    partner.sub_appid = "wx" .. crypto.hex(crypto.random_bytes(8))
  end
  local sim = setmetatable({ merchants = merchants, merchant = merchants[1],
                             partner = partner,
                             sign_type = o.sign_type or RSA_TYPE,
                             verifier_mode = o.verifier_mode
                               or "platform_certificates" }, Sim)
  local list = {}
  for i, m in ipairs(merchants) do list[i] = sim_merchant_conf(m) end
  if partner then
    list[#list + 1] = sim_merchant_conf(partner)
  end
  sim.srv = start({
    app = o.app or simulator_dir(), workers = o.workers or 1,
    args = { "--log-level", o.log_level or "warn" }, timeout = o.timeout,
    config = function(srv)
      local c = { merchants = list, state_dir = srv.dir .. "/state",
                  time_scale = o.time_scale or 1,
                  verifier_mode = sim.verifier_mode,
                  sign_type = sim.sign_type }
      if o.answer_timeout then c.answer_timeout = o.answer_timeout end
      for k, v in pairs(o.config or {}) do c[k] = v end
      if c.limits == nil or type(c.limits) == "table" then
        -- (a copy: o.config's table stays as given)
        local limits = { body_bytes = _M.SIMULATOR_BODY_BYTES }
        for k, v in pairs(c.limits or {}) do limits[k] = v end
        c.limits = limits
      end
      sim.time_scale = c.time_scale
      assert(core.mkdir_p(c.state_dir))
      return c
    end,
  }, 2)
  sims[#sims + 1] = sim
  sim.url = sim.srv:url("")
  sim.dir = sim.srv.dir
  return sim
end

--- syntax: data = sim:control(method, path[, body[, want_status]])
-- A call to the simulator's /sim/ control API. Raises unless the answer
-- has want_status (default any 2xx).
-- returns: the decoded JSON answer ({} for an empty one) and res.
-- The call behind sim:control: raises (at the caller's caller) unless
-- accept(status) says the answer is one the caller takes.
local function control_call(sim, method, path, body, accept)
  local res, err = sim.srv:request{ method = method, path = path,
                                    json = body, timeout = 10 }
  if not res then
    error("simulator " .. method .. " " .. path .. ": " .. tostring(err), 3)
  end
  if not accept(res.status) then
    error("simulator " .. method .. " " .. path .. ": " .. res.status
          .. " " .. tostring(res.body), 3)
  end
  return res.json or {}, res
end

local function is_2xx(status) return status >= 200 and status < 300 end

function Sim:control(method, path, body, want)
  -- (not a tail call: the error's level names this method's caller)
  local data, res = control_call(self, method, path, body, want
    and function(status) return status == want end or is_2xx)
  return data, res
end

local function q(mchid) return mchid and ("?mchid=" .. mchid) or "" end

--- syntax: sim:pay(out_trade_no[, mchid]) -- the payer pays it
function Sim:pay(no, mchid)
  return self:control("POST", "/sim/transactions/" .. no .. "/pay"
                      .. q(mchid))
end

local PAY_WITH_OPTIONS = { status = true, wait = true }

--- syntax: t, res = sim:pay_with(params[, opts])
-- The payer's WeChat client pays with what a front end hands it
-- (POST /sim/pay): the JSAPI call's parameters (wx:jsapi_pay_params, a
-- gateway's jsapi pay), the App SDK's (wx:app_pay_params), { code_url }
-- or { h5_url }, checked as WeChat checks them (the prepay they name and
-- its age, the appid and merchant, the signature) before the order is
-- paid as sim:pay pays it. opts: status (the status expected, e.g. 400
-- to see a refusal; default any 2xx: another raises with the answer),
-- wait (seconds: answer once the notification's first delivery was
-- answered, ?wait=); another key raises.
-- returns: the Transaction (or the refusal: { code, message, field }) and
-- the response.
function Sim:pay_with(params, opts)
  check_options("sim:pay_with", opts, PAY_WITH_OPTIONS)
  if type(params) ~= "table" then
    error("sim:pay_with: params must be a table", 2)
  end
  local want = opts and opts.status
  local wait = opts and opts.wait
  local data, res = control_call(self, "POST", "/sim/pay"
    .. (wait and ("?wait=" .. tostring(wait)) or ""), params, want
    and function(status) return status == want end or is_2xx)
  return data, res
end

--- syntax: sim:fail(out_trade_no[, mchid]) -- PAYERROR, no notification
function Sim:fail(no, mchid)
  return self:control("POST", "/sim/transactions/" .. no .. "/fail"
                      .. q(mchid))
end

--- syntax: sim:settle(out_refund_no[, status]) -- SUCCESS (default),
-- ABNORMAL or CLOSED
function Sim:settle(no, status, mchid)
  -- (control_call itself: its error's level names this method's caller,
  -- the spec's line, as through sim:control's tail calls)
  local data, res = control_call(self, "POST", "/sim/refunds/" .. no
    .. "/settle" .. q(mchid), { status = status or "SUCCESS" }, is_2xx)
  -- a wait for its notification that finds none says the refund settled
  self.settled = self.settled or {}
  self.settled[no] = true
  return data, res
end

--- syntax: refund = sim:refund_outside(out_trade_no[, body[, mchid]])
-- A refund of a paid order made in WeChat's merchant platform, not
-- through the app: body { amount (default what is left), out_refund_no
-- (default one the platform makes), reason, notify_url (where its
-- notification goes once settled: a refund notification URL set in the
-- platform) }. PROCESSING: sim:settle it.
function Sim:refund_outside(no, body, mchid)
  local data, res = control_call(self, "POST", "/sim/transactions/" .. no
    .. "/refund" .. q(mchid), body or {}, is_2xx)
  return data, res
end

--- syntax: sim:rotate([body]) -- rotate the platform certificate
function Sim:rotate(body)
  return self:control("POST", "/sim/certificates/rotate", body or {})
end

--- syntax: list = sim:platform_certificates()
function Sim:platform_certificates()
  return self:control("GET", "/sim/platform-certificates")
end

--- syntax: t = sim:public_key() -- { id, pem }
function Sim:public_key()
  return self:control("GET", "/sim/public-key")
end

--- syntax: sim:fault(spec) / sim:clear_faults()
function Sim:fault(spec) return self:control("POST", "/sim/faults", spec) end
function Sim:clear_faults() return self:control("DELETE", "/sim/faults") end

-- A hold the spec releases (the simulator's "hold" fault): a window that
-- stays open until the spec has done what it must do while the call is
-- at WeChat, however slow the machine, and costs nothing once it has.
local Hold = {}
Hold.__index = Hold

local HOLD_OPTIONS = { count = true, seconds = true }

--- syntax: h = sim:hold(endpoint[, { count = 1, seconds = 60 }])
-- Holds the next count (default 1) requests to endpoint until
-- h:release() (or sim:clear_faults()), at most seconds each (the
-- simulator's cap: a hold a spec forgot ends by itself); another option
-- raises. returns: h (h.id, h.fault: the fault as set).
function Sim:hold(endpoint, o)
  check_options("sim:hold", o, HOLD_OPTIONS)
  o = o or {}
  -- (control_call itself: its error names this method's caller)
  local f = control_call(self, "POST", "/sim/faults", { endpoint = endpoint,
    kind = "hold", count = o.count or 1, seconds = o.seconds }, is_2xx)
  return setmetatable({ sim = self, id = f.id, fault = f }, Hold)
end

-- the fault as GET /sim/faults lists it now (held, fired, released), or
-- nil when it was cleared; raises as sim:control does, naming no line
-- (through pcall: wait_held raises it again at its caller's)
local function hold_state(h)
  local ok, list = pcall(h.sim.control, h.sim, "GET", "/sim/faults")
  if not ok then error(list, 0) end
  for _, f in ipairs(list) do
    if f.id == h.id then return f end
  end
end

--- syntax: h:wait_held([n[, timeout]])
-- yields: until n requests (default 1) are held now, at most timeout
-- seconds (default 10).
-- returns: the fault as listed then; raises at the deadline with how many
-- are held and were taken, or at once when the hold was released or
-- cleared (nothing more will be held).
function Hold:wait_held(n, timeout)
  n = n or 1
  local f
  -- (its errors, and wait_until's, raised at this method's caller's)
  proc.call_at(2, proc.wait_until, function()
    f = hold_state(self)
    if not f then
      error("sim:hold: fault " .. self.id .. " was cleared: it holds"
            .. " nothing", 0)
    end
    if f.released then
      error("sim:hold: fault " .. self.id .. " was released: it holds"
            .. " nothing", 0)
    end
    return f.held >= n, ("%d held of %d wanted, %d taken in all; each"
      .. " is held at most %s s"):format(f.held, n, f.fired or 0,
      tostring(f.seconds))
  end, timeout or 10, "requests to " .. self.fault.endpoint
                      .. " held by fault " .. self.id)
  return f
end

--- syntax: f = h:release() -- the held requests go on, none more is held
-- returns: the fault as listed then (f.held: those not yet gone); nil
-- when the faults were cleared meanwhile (which let them go already), so
-- a spec may release in a `finally` whatever its body did
local function released_or_gone(status)
  return status == 200 or status == 404
end

function Hold:release()
  local f, res = control_call(self.sim, "POST", "/sim/faults/" .. self.id
                              .. "/release", nil, released_or_gone)
  if res.status == 404 then return nil end
  return f
end

--- syntax: list = sim:requests() -- the requests the simulator received
function Sim:requests()
  -- (control_call itself: its error names this method's caller)
  local t = control_call(self, "GET", "/sim/requests", nil, is_2xx)
  return t.requests or t
end

local function esc(v)
  return (tostring(v):gsub("[^%w%-_.~]", function(c)
    return ("%%%02X"):format(c:byte())
  end))
end

--- syntax: list = sim:notifications([filter])
-- filter: { out_trade_no, out_refund_no, event_type, mchid, id, state }.
-- returns: the deliveries (oldest first), each with its attempts.
function Sim:notifications(f)
  local q = {}
  for _, k in ipairs({ "out_trade_no", "out_refund_no", "event_type",
                       "mchid", "id", "state" }) do
    if f and f[k] then q[#q + 1] = k .. "=" .. esc(f[k]) end
  end
  -- (control_call itself: its error names this method's caller)
  local t = control_call(self, "GET", "/sim/notifications"
    .. (#q > 0 and "?" .. table.concat(q, "&") or ""), nil, is_2xx)
  return t.notifications or t
end

--- syntax: sim:close_bills(bill_date) -- that day's bills are ready now
function Sim:close_bills(date)
  return self:control("POST", "/sim/bills/close", { bill_date = date })
end

-- what a delivery is about, whatever the record's exact shape
local function about(d)
  local r = d.resource or d.payload or {}
  return d.out_trade_no or r.out_trade_no, d.out_refund_no or r.out_refund_no
end

local SEEN_MAX = 3          -- deliveries a failed wait shows
local SEEN_ATTEMPTS = 4     -- the last attempts shown of each
local SEEN_BYTES = 1000     -- of each delivery shown
local LABELS_MAX = 24       -- answers listed

-- What a failed wait shows of the deliveries it saw: the first
-- SEEN_MAX, each without its resource (the plaintext transaction), with
-- its last SEEN_ATTEMPTS attempts (n, when, the answer or the error) and
-- at most SEEN_BYTES; how many others matched. Whole, every delivery with
-- its up to 16 attempts ran to pages.
local function seen_shown(seen)
  local out = {}
  for i = 1, math.min(#seen, SEEN_MAX) do
    local d, c = seen[i], {}
    for k, v in pairs(d) do
      if k ~= "resource" and k ~= "payload" and k ~= "attempts" then
        c[k] = v
      end
    end
    local as = type(d.attempts) == "table" and d.attempts or {}
    c.attempts = {}
    for j = math.max(1, #as - SEEN_ATTEMPTS + 1), #as do
      local a = as[j]
      c.attempts[#c.attempts + 1] = type(a) ~= "table" and a
        or { n = a.n, at = a.at, status = a.status, error = a.error,
             fault = a.fault, duplicate = a.duplicate }
    end
    if #as > SEEN_ATTEMPTS then
      c.attempts_not_shown = #as - SEEN_ATTEMPTS
    end
    local one = shown(c)
    if #one > SEEN_BYTES then
      one = one:sub(1, SEEN_BYTES) .. "...(cut)"
    end
    out[i] = one
  end
  return "[" .. table.concat(out, ",") .. "]"
    .. (#seen > SEEN_MAX and " (" .. (#seen - SEEN_MAX)
        .. " more matching deliveries not shown)" or "")
end

local function delivered(d)
  if d.delivered ~= nil then return d.delivered == true end
  for _, a in ipairs(d.attempts or {}) do
    if a.status == 200 or a.status == 204 then return true end
  end
  return false
end

-- what a match may name: the simulator's filters
local WAIT_OPTIONS = { timeout = true, attempts = true, event_type = true,
                       mchid = true }

local MATCH_KEYS = { out_trade_no = true, out_refund_no = true,
                     event_type = true, mchid = true, id = true,
                     state = true }

--- syntax: d = sim:wait_notification(match[, { timeout, attempts, event_type
---         }])
-- match: an out_trade_no, or { out_trade_no = , out_refund_no = ,
-- event_type = , id = , mchid = , state = } (the simulator's filters: one
-- at least; another key raises) (opts.event_type is match's event_type, when match has
-- none: a refund's REFUND.* notification carries its order's
-- out_trade_no too). Waits (default 15 s) until a matching delivery was
-- acknowledged (200/204), or, with opts.attempts = n, until it has n
-- answered attempts (an answer or an error each), whatever the answers.
-- yields: polls GET /sim/notifications.
-- returns: the delivery (d.attempts, d.last = the last attempt); raises at
-- the deadline with what was seen.
function Sim:wait_notification(match, opts)
  check_options("sim:wait_notification", opts, WAIT_OPTIONS)
  opts = opts or {}
  if type(match) == "string" then match = { out_trade_no = match } end
  -- a key it does not know, or no key at all (a nil value), would match
  -- any delivery: the payment's would pass a wait for a refund's
  if type(match) ~= "table" then
    error("sim:wait_notification: match must be an out_trade_no or a"
          .. " table, not " .. type(match), 2)
  end
  for k in pairs(match) do
    if not MATCH_KEYS[k] then
      error("sim:wait_notification: unknown key match." .. tostring(k)
            .. " (known: event_type, id, mchid, out_refund_no,"
            .. " out_trade_no, state)", 2)
    end
  end
  if next(match) == nil and opts.event_type == nil then
    error("sim:wait_notification: match names nothing (no out_trade_no,"
          .. " out_refund_no, event_type, id...: a nil value?): it would"
          .. " take any delivery", 2)
  end
  if opts.event_type ~= nil and opts.event_type ~= match.event_type then
    if match.event_type ~= nil then
      error("sim:wait_notification: match.event_type and opts.event_type "
            .. "differ", 2)
    end
    local m = { event_type = opts.event_type }
    for k, v in pairs(match) do m[k] = v end
    match = m
  end
  local seen, failed
  local function find()
    seen = {}
    -- (through pcall: its error names no line; raised again below)
    local ok, list = pcall(self.notifications, self, match)
    if not ok then
      failed = list
      error(list, 0)
    end
    for _, d in ipairs(list) do
      local no, rno = about(d)
      if (not match.out_trade_no or match.out_trade_no == no)
         and (not match.out_refund_no or match.out_refund_no == rno)
         and (not match.event_type or match.event_type == d.event_type) then
        seen[#seen + 1] = d
        local ok
        if opts.attempts then
          -- n attempts, each answered (or failed): one still waiting for
          -- its answer has no status yet
          local as = d.attempts or {}
          ok = #as >= opts.attempts
          for i = 1, opts.attempts do
            local a = as[i]
            if not a or (a.status == nil and (a.error == nil
               or tostring(a.error):find("^in_flight"))) then
              ok = false
            end
          end
        else ok = delivered(d) end
        if ok then
          d.last = (d.attempts or {})[#(d.attempts or {})]
          return d
        end
      end
    end
  end
  local timeout = opts.timeout or 15
  local ok, d = pcall(proc.wait_until, find, timeout, "a notification")
  if ok then return d end
  -- the simulator refused or never answered: that, not a wait that saw
  -- nothing in timeout s
  if failed then error(failed, 2) end
  -- a retry not due yet: WeChat's schedule (15 s, 15 s, 30 s, ...) is
  -- longer than the wait unless the simulator runs with a time_scale
  -- (with one already set, only a longer wait helps)
  local hint = ""
  for _, sd in ipairs(seen or {}) do
    if sd.state == "pending" and type(sd.next_at) == "number" then
      local scale = tonumber(self.time_scale) or 1
      hint = ("; its next attempt is due in %.1f s (WeChat's retry"
        .. " schedule%s): %s"):format(sd.next_at - core.time(),
        scale ~= 1 and (", divided by the simulator's time_scale "
                        .. scale) or "",
        scale ~= 1 and "pass a longer opts.timeout"
          or "start the simulator with a time_scale, e.g."
             .. " testing.simulator{ time_scale = 100 }, or pass"
             .. " opts.timeout")
      break
    end
  end
  -- waiting for an acknowledgement, what the app answered comes first:
  -- every attempt refused is the app's doing, and a longer wait would
  -- only see more refusals
  local answered = ""
  if not opts.attempts then
    local labels, all_status, same = {}, true, true
    for _, sd in ipairs(seen or {}) do
      for _, a in ipairs(sd.attempts or {}) do
        local l
        if a.status ~= nil then l = tostring(a.status)
        elseif a.error and not tostring(a.error):find("^in_flight") then
          l = tostring(a.error):match("^[%w_]+") or "error"
          all_status = false
        end
        if l then
          if labels[1] and labels[1] ~= l then same = false end
          labels[#labels + 1] = l
        end
      end
    end
    if #labels > 0 then
      local what
      if same and all_status then
        what = "the app answered " .. labels[1] .. " to every attempt ("
          .. #labels .. ")"
      elseif same then
        what = "the app gave no answer (" .. labels[1]
          .. ") to every attempt (" .. #labels .. ")"
      else
        what = "the app's answers to its " .. #labels .. " attempts: "
          .. table.concat(labels, ", ", 1, math.min(#labels, LABELS_MAX))
          .. (#labels > LABELS_MAX and ", ..." or "")
      end
      -- the log of the app the kit started at notify_url: why it failed
      local log
      if all_status then
        for _, sd in ipairs(seen or {}) do
          local port = tonumber(tostring(sd.notify_url or ""):match(
            "^https?://127%.0%.0%.1:(%d+)/"))
          for _, srv in ipairs(started) do
            if port and srv.port == port and srv ~= self.srv then
              log = server.tail(srv:logs()):gsub("%s+$", "")
            end
          end
          if log then break end
        end
      end
      local unrouted = same and (labels[1] == "404" or labels[1] == "405")
      -- an auth hook answers before the handler runs, and logs nothing
      local refused = "its notify handler refused or failed the"
        .. " notification"
      if same and (labels[1] == "401" or labels[1] == "403") then
        refused = "its notify handler refused the notification, or a"
          .. " paygate.before hook did before the handler ran (an auth"
          .. " check: WeChat signs its notifications and sends no"
          .. " credentials of yours, so keep the notify route out of it)"
      end
      answered = "; " .. what .. (unrouted
        and ": no route of the app takes a POST to notify_url's path:"
            .. " check that notify_url is srv:url(path) of the path its"
            .. " paygate.route(\"POST\", path, ...) declares"
        or all_status and log
        and ": " .. refused .. ";"
            .. " why is in the app's log (srv:logs()), whose end is:\n"
            .. log .. "\n"
        or all_status
        and ": " .. refused .. ";"
            .. " why is in the app's log (srv:logs(); in the spec,"
            .. " finally(function() print(app:logs()) end) inside the it)"
        or ": check that the app runs and that notify_url is its"
           .. " srv:url(path)")
    end
  end
  -- none matched at all: say what makes one (a refund made without a
  -- notify_url is never notified, a payment only once paid)
  local none = ""
  if not seen or #seen == 0 then
    local rno = match.out_refund_no
    if rno and self.settled and self.settled[rno] then
      none = "; the simulator made no notification for refund " .. rno
        .. ", which sim:settle settled: a refund is notified only when it"
        .. " was made with a notify_url (wx:refund{ ..., notify_url ="
        .. " app:url(path) }) or its merchant has a refund_notify_url in"
        .. " the simulator's config"
    elseif rno or tostring(match.event_type or ""):find("^REFUND%.") then
      none = "; the simulator made no notification matching it: a refund"
        .. " is notified once it settles (sim:settle(out_refund_no), or the"
        .. " simulator's refund_settle_after), and only when it was made"
        .. " with a notify_url or its merchant has a refund_notify_url"
    elseif match.out_trade_no then
      none = "; the simulator made no notification matching it: a payment"
        .. " is notified once the payer pays (sim:pay(out_trade_no) or"
        .. " sim:pay_and_wait; sim:fail sends none), for an order placed"
        .. " at this simulator (sim.url)"
    else
      none = "; the simulator made no notification matching it"
    end
  end
  error("testing: no " .. (opts.attempts and (opts.attempts .. " attempts")
        or "acknowledged delivery") .. " of a notification matching "
        .. shown(match) .. " in " .. timeout .. " s" .. answered .. hint
        .. none .. "; seen: " .. seen_shown(seen or {}), 2)
end

--- syntax: d = sim:pay_and_wait(out_trade_no[, opts])
-- Pays the order and waits for its TRANSACTION.SUCCESS delivery to be
-- acknowledged (opts as for wait_notification).
function Sim:pay_and_wait(no, opts)
  check_options("sim:pay_and_wait", opts, WAIT_OPTIONS)
  proc.call_at(2, self.pay, self, no, opts and opts.mchid)
  local m = { out_trade_no = no, event_type = "TRANSACTION.SUCCESS" }
  -- (a tail call: wait_notification's error names this method's caller)
  return self:wait_notification(m, opts)
end

--- syntax: conf = sim:client_config([merchant[, over]])
-- yields: in public-key and migration mode, reads the simulator's public
-- key (and in migration mode its platform certificates).
-- returns: a paygate.wechatpay configuration (a plain table, for
-- wechatpay.client or an app's config file) for merchant (default
-- sim.merchant; sim.partner for partner mode), pointed at the simulator.
-- over: keys to add or replace (false removes one).
function Sim:client_config(m, over)
  m = m or self.merchant
  local c = { merchant_private_key = m.private_key,
              merchant_certificate = m.certificate,
              apiv3_key = m.apiv3_key, base_url = self.url,
              backup_url = false, timeout = 5, deadline = 15 }
  -- the merchant's appid is the client's default for prepay calls; its
  -- other appids (the simulator takes them all) are the client's appids,
  -- so that a prepay naming one is not refused before it is sent
  local others
  if #(m.appids or {}) > 1 then
    others = {}
    for i = 2, #m.appids do others[#others + 1] = m.appids[i] end
  end
  if m == self.partner then
    c.sp_mchid, c.sp_appid, c.sp_appids = m.mchid, m.appid, others
  else
    c.mchid, c.appid, c.appids = m.mchid, m.appid, others
  end
  if self.sign_type ~= RSA_TYPE then c.sign_type = self.sign_type end
  -- (control_call itself: its error names this method's caller)
  if self.verifier_mode ~= "platform_certificates" then
    local pk = control_call(self, "GET", "/sim/public-key", nil, is_2xx)
    c.public_key, c.public_key_id = pk.pem, pk.id
  end
  if self.verifier_mode == "public_key" then
    c.download_certificates = false
  elseif self.verifier_mode == "both" then
    -- migration: both keys held from the start (the client downloads and
    -- refreshes the certificates too)
    local pems = {}
    for i, cert in ipairs(control_call(self, "GET",
                                       "/sim/platform-certificates", nil,
                                       is_2xx)) do
      pems[i] = cert.certificate
    end
    c.platform_certificates = pems
  end
  for k, v in pairs(over or {}) do
    if v == false and k ~= "backup_url" then c[k] = nil else c[k] = v end
  end
  return c
end

--- syntax: wx = sim:client([merchant[, over]])
-- returns: a paygate.wechatpay client for it (raises if it cannot be made),
-- at log_level "warn" unless over names one: its info lines (a platform
-- certificate added) would show on the spec's stderr, as if the app's.
function Sim:client(m, over)
  local wechatpay = require "paygate.wechatpay"
  local conf = proc.call_at(2, self.client_config, self, m, over)
  if over == nil or over.log_level == nil then conf.log_level = "warn" end
  local wx, err = wechatpay.client(conf)
  if not wx then error("testing: wechatpay.client: " .. tostring(err), 2) end
  return wx
end

local ORDER_OPTIONS = { notify_url = true, total = true,
  out_trade_no = true, description = true, appid = true, attach = true,
  merchant = true, client = true }

--- syntax: out_trade_no, data = sim:order(p)
-- Creates a native-payment order through a paygate.wechatpay client (the
-- kit's own for p.merchant, default sim.merchant, unless p.client; for
-- sim.partner, a partner order for its sub-merchant). p:
-- notify_url (required), total (fen, default 1), out_trade_no,
-- description, appid, attach, merchant, client.
-- yields: for the call.
-- returns: the out_trade_no and WeChat's answer ({ code_url }); raises on
-- an error.
function Sim:order(p)
  if type(p) ~= "table" or type(p.notify_url) ~= "string" then
    error("sim:order: p.notify_url is required", 2)
  end
  check_options("sim:order", p, ORDER_OPTIONS)
  local m = p.merchant or self.merchant
  local wx = p.client
  if not wx then
    self.kit_clients = self.kit_clients or {}
    wx = self.kit_clients[m]
    if not wx then
      wx = proc.call_at(2, self.client, self, m)
      self.kit_clients[m] = wx
    end
  end
  local no = p.out_trade_no or _M.out_trade_no()
  -- sim.partner orders as a service provider, for its sub-merchant
  local partner = m == self.partner
  local appid = p.appid or m.appid
  local data, err = wx:native_prepay{
    appid = not partner and appid or nil,
    sp_appid = partner and appid or nil,
    sub_mchid = partner and m.sub_mchid or nil,
    description = p.description or "test order",
    out_trade_no = no, notify_url = p.notify_url, attach = p.attach,
    amount = { total = p.total or 1, currency = "CNY" } }
  if not data then error("sim:order: " .. tostring(err), 2) end
  return no, data
end

--- syntax: sim:stop() -- stops the simulator (and its kit client)
function Sim:stop()
  for m, wx in pairs(self.kit_clients or {}) do
    wx:stop()
    self.kit_clients[m] = nil
  end
  for i, s in ipairs(started) do
    if s == self.srv then table.remove(started, i) break end
  end
  return self.srv:stop()
end

_M.RSA = RSA_TYPE
_M.SM2 = SM2_TYPE

return _M
