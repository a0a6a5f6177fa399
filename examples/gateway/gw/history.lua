-- gw.history: what the console shows of a payment beyond its state and
-- audit trail -- the calls the gateway made to WeChat Pay (one row per
-- wx:request, from the clients' on_call hook) and the notifications it
-- refused, with why (gw.notify). Tables: migrations/*/003_history.sql;
-- pruned by retention (gw.history.RETENTION).
--
-- Each row is written by a task of its own after the call or refusal, so
-- recording adds no store round trip to the request. Writes in flight are
-- bounded per worker, and refused notifications are recorded at most
-- REFUSED_PER_SECOND a second per worker (a flood of forged callbacks
-- must not become a flood of writes); what is not recorded is counted in
-- paygate_gateway_history_dropped_total{what}.
local paygate = require "paygate"
local core = require "paygate.core"
local civil = require "paygate.civil"
local json = require "paygate.json"
local metrics = require "paygate.metrics"
local utf8 = require "paygate.utf8"

local type, tostring, pairs, floor = type, tostring, pairs, math.floor

-- What came from outside (WeChat's code and Request-ID, a refusal's
-- message quoting a forged header) as text any store takes: valid UTF-8,
-- no control characters, at most max bytes cut at a character's end
-- (PostgreSQL refuses anything else, and the row would be lost).
local function text(s, max)
  return (utf8.clean(s, max))
end

local _M = {}

_M.MAX_IN_FLIGHT = 256
_M.REFUSED_PER_SECOND = 20

-- retention.table specs (app.lua adds them to gateway.retention's tables).
-- A refused notification whose resource did not decrypt (authentic = 0)
-- may come from anyone who reaches the route: kept 3 days, not 30, so a
-- flood of forged callbacks (REFUSED_PER_SECOND rows a second per worker,
-- some 0.8 GB a day) cannot fill the disk over a month. (A wrong APIv3 key
-- makes WeChat's own notifications such rows too: 3 days to see it.)
_M.RETENTION = {
  { table = "gw_wechat_calls", column = "at", max_age = 30 * 86400 },
  { table = "gw_notifications_refused", column = "received_at",
    max_age = 30 * 86400 },
  { table = "gw_notifications_refused", column = "received_at",
    max_age = 3 * 86400, where = "authentic = 0",
    name = "gw_notifications_refused_forged" },
}

local db, capture_dir
local in_flight = 0
local dropped
local refused_second, refused_count = 0, 0

local tighten_captures                  -- (below)

--- syntax: history.init{ db = db, capture_dir = dir } -- at start
-- Also makes the captures an earlier gateway wrote world-readable its
-- own (tighten_captures), once per instance and folder.
function _M.init(c)
  db, capture_dir = c.db, c.capture_dir
  if not capture_dir then return end
  local ok, d = pcall(function()
    return require("paygate.shared").get_dict("paygate")
  end)
  -- (a key past the dictionary's 250 bytes: each worker does it)
  local err
  if ok and d then
    err = select(2, d:add("gw:captures_tightened:" .. capture_dir, 1))
  end
  if not (err and err.kind == "exists") then
    tighten_captures(capture_dir)
  end
end

-- Refused notifications captured whole (capture_dir), so that one
-- command checks them: paygate verify --headers F.headers --body F.body
-- --certificate F.certs.pem (--sign-type for an SM merchant's). The
-- newest CAPTURE_KEEP are kept (files of other workers and instances
-- too); a body over CAPTURE_MAX is not
-- captured, nor more than CAPTURE_PER_SECOND a second per worker (anyone
-- can send refused notifications: a flood costs one capture a second,
-- and one shows what the rest repeat). Never flushed to the disk: a
-- diagnosis, not a record, and the request waits for them. Nothing
-- secret is in them (the resource stays encrypted; a credential header's
-- value is not kept, CREDENTIALS), but every other header of the request
-- is, what a proxy added too: each file is its owner's alone
-- (0600, made so: never readable by others meanwhile, whatever the
-- umask) and so is a folder made for them (0700; one already there keeps
-- its mode).
_M.CAPTURE_KEEP = 20
-- and none older than the refused notification's own row (RETENTION):
-- a genuine one refused holds a payer's openid and amounts under the
-- APIv3 key, kept no longer than the console's record of it. Pruned at
-- each capture, at start and every CAPTURE_PRUNE_EVERY seconds (a quiet
-- gateway makes no new capture to prune at).
_M.CAPTURE_MAX_AGE = 30 * 86400
_M.CAPTURE_PRUNE_EVERY = 3600
_M.CAPTURE_MAX = 64 * 1024
_M.CAPTURE_PER_SECOND = 1
local captured, capture_second, capture_count = 0, -1, 0
local FILE_MODE, DIR_MODE = 384, 448        -- 0600, 0700
local NO_SYNC = { sync = false }
-- a capture's files: BASE .. each ("refused-TIME-MS-PID-N", N 9 digits)
local CAPTURE_EXTS = { ".headers", ".body", ".certs.pem", ".pub.pem" }
-- headers that carry a credential (a proxy's, a browser's sent astray):
-- named in the capture, their value not kept. WeChat sends none of them,
-- and verify reads none.
local CREDENTIALS = { authorization = true, ["proxy-authorization"] = true,
                      cookie = true }

local function put(path, data)
  local ok, err = core.write_file(path, data, FILE_MODE, NO_SYNC)
  if not ok then return nil, err.message end
  return true
end

local function is_capture(name)
  for _, ext in ipairs(CAPTURE_EXTS) do
    if name:sub(-#ext) == ext
       and name:sub(1, -#ext - 1):match("^refused%-[%w%-]+$") then
      return true
    end
  end
  return false
end

-- A capture's time, from its name (refused-YYYYMMDDTHHMMSS-...: UTC), or
-- nil for a name that holds none.
local function capture_time(base)
  local y, mo, d, h, mi, sec = base:match(
    "^refused%-(%d%d%d%d)(%d%d)(%d%d)T(%d%d)(%d%d)(%d%d)%-")
  if not y then return nil end
  return civil.days(tonumber(y), tonumber(mo), tonumber(d)) * 86400
    + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(sec)
end

-- The newest CAPTURE_KEEP, none older than CAPTURE_MAX_AGE at now (each
-- capture's files: one named only by a suffix is left alone).
local function prune_captures(dir, now)
  local names = core.listdir(dir)
  if not names then return end
  local bases, seen = {}, {}
  for _, n in ipairs(names) do
    if is_capture(n) then
      local b = n:match("^(refused%-[%w%-]+)%.")
      if b and not seen[b] then seen[b] = true; bases[#bases + 1] = b end
    end
  end
  table.sort(bases)                           -- oldest first (the time)
  local cut = now - _M.CAPTURE_MAX_AGE
  for i = 1, #bases do
    local t = capture_time(bases[i])
    if i <= #bases - _M.CAPTURE_KEEP or (t and t < cut) then
      for _, ext in ipairs(CAPTURE_EXTS) do
        os.remove(dir .. "/" .. bases[i] .. ext)
      end
    end
  end
end

-- Captures written before they were made private (plain io.open: 0644
-- in a folder made 0755 under a umask of 022) stayed readable by every
-- local user until CAPTURE_KEEP new ones replaced them: at start each
-- file named as a capture is made 0600, and the folder 0700 when it holds
-- nothing else (the folder made for them; one a capture_dir names that
-- holds other files too keeps its mode). A listing and a chmod a file:
-- at most CAPTURE_KEEP captures of 4 files, and a few over from a flood
-- of workers. A file that cannot be changed (another user's) is said
-- once, in a warn line; the start goes on.
function tighten_captures(dir)
  local names = core.listdir(dir)
  if not names then return end           -- none yet: made 0700 when needed
  local only_captures, failed, n = true, nil, 0
  for _, name in ipairs(names) do
    if is_capture(name) then
      local ok, err = core.chmod(dir .. "/" .. name, FILE_MODE)
      if ok then n = n + 1 else failed = failed or err end
    else
      only_captures = false
    end
  end
  if only_captures and n > 0 then
    local ok, err = core.chmod(dir, DIR_MODE)
    if not ok then failed = failed or err end
  end
  if failed then
    paygate.log.warn("gateway: cannot make the captures of refused"
      .. " notifications private (0600)", { dir = dir,
        error = tostring(failed.message) })
  end
end

--- syntax: history.start() -- in a worker, after init
-- Prunes the captures now and every CAPTURE_PRUNE_EVERY seconds (by age
-- and number, as a capture does): a gateway that stopped receiving
-- refused notifications keeps none past CAPTURE_MAX_AGE.
function _M.start()
  if not capture_dir then return end
  _M.prune_captures()
  paygate.timer.every(_M.CAPTURE_PRUNE_EVERY, _M.prune_captures)
end

--- syntax: history.prune_captures([now]) -- what start does each time
function _M.prune_captures(now)
  if capture_dir then
    prune_captures(capture_dir, now or paygate.update_time())
  end
end

-- The command that says why a client holds no key to verify with: its
-- merchant checked by paygate doctor on this gateway's config and code
-- (doctor's signed call downloads the certificates as the client does,
-- and names what fails: the APIv3 key, the serial, WeChat unreachable).
local function doctor_command(wx)
  local rt = paygate.runtime or {}
  local conf = wx.conf or {}
  return "paygate doctor --config " .. tostring(rt.config_file or "FILE")
    .. " --app " .. tostring(paygate.app_dir) .. " --merchant "
    .. tostring(conf.mchid)
end

--- syntax: cmd[, doctor] = history.capture(wx, req)
-- cmd: the verify command, or nil (not captured); when the capture was
-- made but the client holds no key (no platform certificate, no public
-- key), nil and the doctor command instead.
function _M.capture(wx, req)
  local dir = capture_dir
  local body = req.body
  if not dir or type(body) ~= "string" or #body > _M.CAPTURE_MAX then
    return nil
  end
  local hs = req.headers
  if type(hs) ~= "table" then return nil end
  local now = paygate.update_time()
  if floor(now) ~= capture_second then
    capture_second, capture_count = floor(now), 0
  end
  if capture_count >= _M.CAPTURE_PER_SECOND then return nil end
  capture_count = capture_count + 1
  local lines = {}
  for k, v in pairs(hs) do
    if type(k) == "string" and type(v) == "string" then
      if CREDENTIALS[k] then v = "(not kept)" end
      lines[#lines + 1] = k .. ": " .. v
    end
  end
  table.sort(lines)
  captured = captured + 1
  local base = dir .. "/refused-" .. os.date("!%Y%m%dT%H%M%S", floor(now))
    -- (the counter padded: names sort by time, then by it -- unpadded,
    -- "-10" sorted before "-9" in one millisecond, and the prune kept an
    -- older capture in place of the newest)
    .. ("-%03d-%d-%09d"):format(floor(now * 1000) % 1000, core.pid(),
                                captured)
  local head = table.concat(lines, "\n") .. "\n"
  local ok, err = put(base .. ".headers", head)
  if not ok and core.mkdir_p(dir, DIR_MODE) then
    ok, err = put(base .. ".headers", head)
  end
  if ok then ok, err = put(base .. ".body", body) end
  if not ok then
    paygate.log.warn("gateway: cannot capture a refused notification",
                     { dir = dir, error = tostring(err) })
    return nil
  end
  -- (--at: judged at its receipt, whenever the command is run)
  local cmd = "paygate verify --headers " .. base .. ".headers --body "
    .. base .. ".body --at " .. floor(now)
  -- an SM merchant's client refuses a message not typed SM2 (no
  -- Wechatpay-Signature-Type means RSA): verify judges it as the client
  -- did, where on its own it takes the variant from the key
  if (wx.conf or {}).sm then
    cmd = cmd .. " --sign-type WECHATPAY2-SM2-WITH-SM3"
  end
  local keyed = false                 -- a key named for verify to use
  local pems = {}
  for _, cert in pairs(wx.certs or {}) do pems[#pems + 1] = cert:pem() end
  if #pems > 0 then
    table.sort(pems)
    if put(base .. ".certs.pem", table.concat(pems)) then
      cmd = cmd .. " --certificate " .. base .. ".certs.pem"
      keyed = true
    end
  end
  -- the WeChat Pay public key (public-key and migration mode): the
  -- client holds it loaded, so its PEM is written beside the capture
  local conf = wx.conf or {}
  local pub = conf.public_key
  if pub ~= nil and type(pub) ~= "string" and conf.public_key_id then
    local pem = pub:public_pem()
    if type(pem) == "string" and put(base .. ".pub.pem", pem) then
      cmd = cmd .. " --public-key " .. base .. ".pub.pem --public-key-id "
        .. tostring(conf.public_key_id)
      keyed = true
    end
  end
  prune_captures(dir, now)
  if not keyed then
    -- no key held: certificate mode, and no download has succeeded (a
    -- wrong APIv3 key, a serial WeChat does not hold, WeChat not reached).
    -- paygate verify without a key is a usage error (exit 2); what to fix
    -- is why none is held, which doctor names. The capture stays, for a
    -- verify once the keys are held.
    return nil, doctor_command(wx)
  end
  return cmd
end

local function drop(what)
  dropped = dropped or metrics.counter(
    "paygate_gateway_history_dropped_total", "Calls to WeChat Pay and "
    .. "refused notifications not recorded (over a bound, or the store"
    .. " failed the write).",
    { "what" })
  dropped:inc({ what = what })
end

-- what a row records, as a log line names it
local WHAT = { call = "a call to WeChat Pay",
               refused_notification = "a refused notification" }

-- Writes one row in a task of its own; false when over the bound. A row
-- the store did not take (busy, unavailable, ...) is counted as dropped
-- too, and logged with `facts` (which call or notification: its merchant
-- and numbers, no secret): only the console's history misses it.
local function write(what, sql, params, facts)
  if db == nil or in_flight >= _M.MAX_IN_FLIGHT then
    drop(what)
    return false
  end
  in_flight = in_flight + 1
  paygate.spawn(function()
    local ok, res, err = pcall(db.exec, db, sql, params)
    in_flight = in_flight - 1
    if not (ok and res) then
      drop(what)
      local f = { error = tostring(ok and err or res) }
      for k, v in pairs(facts) do f[k] = v end
      paygate.log.warn("gateway: the console's history did not record "
        .. WHAT[what] .. " (counted in paygate_gateway_history_dropped_"
        .. "total; nothing else is affected)", f)
    end
  end)
  return true
end

-- an order or refund number as WeChat allows them (else not kept)
local function number(v)
  if type(v) ~= "string" or v == "" or #v > 64 or v:find("[^%w_%-|*@]") then
    return nil
  end
  return v
end

--- syntax: out_trade_no, out_refund_no = history.subject(path, body)
-- The order and refund a call is about: from the path
-- (.../out-trade-no/{no}..., /v3/refund/domestic/refunds/{out_refund_no})
-- or from the request body's out_trade_no / out_refund_no.
function _M.subject(path, body)
  local trade = number(path:match("/out%-trade%-no/([^/]+)"))
  local refund = number(path:match("^/v3/refund/domestic/refunds/([^/]+)$"))
  if type(body) == "string" and (body:find("out_trade_no", 1, true)
                                 or body:find("out_refund_no", 1, true)) then
    local doc = json.decode(body)
    if type(doc) == "table" then
      trade = trade or number(doc.out_trade_no)
      refund = refund or number(doc.out_refund_no)
    end
  end
  return trade, refund
end

--- syntax: fn = history.on_call(mchid) -- a wechatpay client's on_call
function _M.on_call(mchid)
  return function(call)
    local trade, refund = _M.subject(call.path, call.body)
    -- one debug line per call, in the caller's coroutine: it carries the
    -- request_id of the request that made it, so the log leads from an
    -- access line to the WeChat call (and its order, as the outbox's
    -- events name it) without the console. No body, no header: no secret.
    -- (WeChat's Request-ID as wechat_request_id: request_id is the line's)
    paygate.log.debug("gateway: wechat pay call", { mchid = mchid,
      method = call.method, path = call.path:sub(1, 256),
      outcome = tostring(call.outcome), status = call.status,
      code = type(call.code) == "string" and text(call.code, 64) or nil,
      wechat_request_id = type(call.request_id) == "string"
        and text(call.request_id, 128) or nil,
      attempts = call.attempts, ms = floor(call.seconds * 1000 + 0.5),
      out_trade_no = trade, out_refund_no = refund })
    write("call", "INSERT INTO gw_wechat_calls (at, mchid, method, path,"
      .. " outcome, status, code, request_id, attempts, ms, out_trade_no,"
      .. " out_refund_no) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,"
      .. " $11, $12)", {
        paygate.update_time(), mchid, call.method, call.path:sub(1, 256),
        tostring(call.outcome), call.status or json.null,
        type(call.code) == "string" and text(call.code, 64) or json.null,
        type(call.request_id) == "string" and text(call.request_id, 128)
          or json.null,
        call.attempts or json.null, floor(call.seconds * 1000 + 0.5),
        trade or json.null, refund or json.null }, {
        mchid = mchid, method = call.method, path = call.path:sub(1, 256),
        out_trade_no = trade, out_refund_no = refund })
  end
end

-- Whether one more refused notification may be recorded this second (at
-- most REFUSED_PER_SECOND a worker: what is over is counted, dropped).
local function refused_allowed(now)
  local second = floor(now)
  if second ~= refused_second then
    refused_second, refused_count = second, 0
  end
  refused_count = refused_count + 1
  if refused_count > _M.REFUSED_PER_SECOND then
    drop("refused_notification")
    return false
  end
  return true
end

-- The row of a refused notification: err's kind and message, and the
-- facts f (wx:notification_facts' shape).
local function record_refused(now, mchid, err, f)
  local null = json.null
  return write("refused_notification", "INSERT INTO"
    .. " gw_notifications_refused (received_at, mchid, kind, reason,"
    .. " serial, timestamp, notification_id, event_type, authentic,"
    .. " out_trade_no, out_refund_no) VALUES ($1, $2, $3, $4, $5, $6, $7,"
    .. " $8, $9, $10, $11)", {
      now, mchid, tostring(err.kind), text(tostring(err.message), 300),
      f.serial or null, f.timestamp or null, f.id or null,
      f.event_type or null, f.authentic and 1 or 0,
      f.out_trade_no or null, f.out_refund_no or null }, {
      mchid = mchid, kind = tostring(err.kind),
      -- (a forged one's numbers are anyone's text: not logged)
      out_trade_no = f.authentic and f.out_trade_no or nil,
      out_refund_no = f.authentic and f.out_refund_no or nil })
end

--- syntax: recorded, verify, doctor = history.refused(wx, mchid, req, err)
-- Records a notification that parse_notification refused: the error's
-- kind and message, and wx:notification_facts(req) (headers, claims and,
-- when its resource decrypts, the order or refund it is about); and
-- captures it whole in capture_dir: verify is the paygate verify command
-- that checks the capture (nil when none was made), doctor the paygate
-- doctor command instead when the client holds no key (history.capture).
function _M.refused(wx, mchid, req, err)
  local now = paygate.update_time()
  if not refused_allowed(now) then return false end
  local verify, doctor = _M.capture(wx, req)
  return record_refused(now, mchid, err, wx:notification_facts(req)),
         verify, doctor
end

--- syntax: recorded = history.refused_event(mchid, req, event, err)
-- Records a notification that verified and decrypted (event: the parsed
-- notification) but was refused before any effect, e.g. a payment's whose
-- resource names another merchant than the payment's (merchant_mismatch):
-- authentic, with its id, type and the order or refund it names, beside
-- the ones that did not verify. Not captured: it verifies, so a capture
-- has nothing to check, and its resource is a payer's data.
function _M.refused_event(mchid, req, event, err)
  local now = paygate.update_time()
  if not refused_allowed(now) then return false end
  local r = type(event.resource) == "table" and event.resource or {}
  local function header(name)
    local v = req.header and req:header(name)
    return type(v) == "string" and text(v, 128) or nil
  end
  return record_refused(now, mchid, err, {
    serial = header("Wechatpay-Serial"),
    timestamp = header("Wechatpay-Timestamp"),
    id = type(event.id) == "string" and text(event.id, 128) or nil,
    event_type = type(event.event_type) == "string"
                 and text(event.event_type, 64) or nil,
    authentic = true, out_trade_no = number(r.out_trade_no),
    out_refund_no = number(r.out_refund_no) })
end

return _M
