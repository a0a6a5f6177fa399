-- sim/notify.lua: the simulator's callback notifications.
--
-- notify.enqueue(tx, n) runs inside the transaction that changes an order
-- or a refund, so a notification exists exactly when its change does:
--   n = { mchid, notify_url, event_type, summary,
--         original_type = "transaction" | "refund", resource = table }
-- notify.start(ctx) runs once per worker. Every worker competes for one
-- lease (paygate.lease on the simulator's SQLite); the holder is the only
-- deliverer, and it claims each attempt in a transaction fenced by its
-- lease token before it sends it, so two workers never send the same
-- attempt. Pending deliveries live in SQLite: a restart loses none.
--
-- Delivery (WeChat's rules): POST to notify_url with the signed headers
-- and the resource encrypted with the merchant's APIv3 key; delivered on
-- 200 or 204 only; anything else, or no answer within answer_timeout,
-- is retried after 15s/15s/30s/3m/10m/20m/30m/30m/30m/60m/3h/3h/3h/6h/6h
-- (divided by time_scale), then given up. A retry keeps the notification
-- id and body and gets a fresh timestamp, nonce and signature.
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local json = require "sim.json"
local http = require "paygate.http"
local lease = require "paygate.lease"
local faults = require "sim.faults"
local clock = require "sim.clock"

local type, tostring, ipairs, pcall = type, tostring, ipairs, pcall
local floor, max, min = math.floor, math.max, math.min

local _M = {}

-- Seconds between attempts: after attempt k fails, wait SCHEDULE[k].
_M.SCHEDULE = { 15, 15, 30, 180, 600, 1200, 1800, 1800, 1800, 3600,
                10800, 10800, 10800, 21600, 21600 }
_M.MAX_ATTEMPTS = #_M.SCHEDULE + 1          -- the first + 15 retries

_M.LEASE_KEY = "sim.notify.deliverer"
local LEASE_TTL = 3            -- s; a stopped holder is replaced after it
local RENEW_EVERY = 1          -- s
local POLL = 0.1               -- s; longest sleep of the holder's loop
local MAX_IN_FLIGHT = 64       -- concurrent deliveries
local BATCH = 32               -- rows claimed per look
local HOLD_MAX = 60            -- s an out-of-order notification waits at most
local DUP_DELAY = 1            -- s (scaled) before a duplicate delivery
local GRACE = 2                -- s past answer_timeout an attempt is owned

-- Notification faults (sim/faults.lua), taken for each notification when
-- it is enqueued, from the endpoint "notify":
--   never_sent       stored as dropped, never POSTed
--   duplicate        delivered once more (`times`, default 1) after it
--                    succeeded: the same id with a fresh signature
--   out_of_order     held until a later notification of the same
--                    merchant was delivered (at most HOLD_MAX seconds)
--   bad_signature    (signtest = true: WECHATPAY/SIGNTEST/...),
--   stale_timestamp, unknown_serial, expired_certificate: the first
--                    attempt carries it; the retries are signed correctly
_M.ENDPOINT = "notify"

local function beijing(t)
  return os.date("!%Y-%m-%dT%H:%M:%S+08:00", floor(t) + 8 * 3600)
end
_M.beijing = beijing

local function uuid()
  local h = crypto.hex(crypto.random_bytes(16))
  return h:sub(1, 8) .. "-" .. h:sub(9, 12) .. "-" .. h:sub(13, 16) .. "-"
         .. h:sub(17, 20) .. "-" .. h:sub(21, 32)
end

local function scale(ctx)
  local s = tonumber(ctx.config.time_scale) or 1
  if s <= 0 then s = 1 end
  return s
end

local function answer_timeout(ctx)
  return tonumber(ctx.config.answer_timeout) or 5
end

-- The notification faults that apply to the next notification: a
-- delivery fault and a signature fault (each consumes one firing).
local SIGNATURE_FAULTS = { bad_signature = true, stale_timestamp = true,
                           unknown_serial = true, expired_certificate = true }
local function take_faults()
  local got = {}
  local f = faults.take(_M.ENDPOINT, "notify")
  if f then got[#got + 1] = f end
  f = faults.take(_M.ENDPOINT, "after", SIGNATURE_FAULTS)
  if f then got[#got + 1] = f end
  return got
end

--- syntax: ok, err = notify.enqueue(tx, n)
-- Inside the caller's db:transaction (see the header for n).
-- returns: true (n.id is set to the notification id), or nil, err (the
-- insert's: the caller's transaction then rolls back).
function _M.enqueue(tx, n)
  if type(n) ~= "table" or type(n.mchid) ~= "string"
     or type(n.notify_url) ~= "string" or type(n.event_type) ~= "string"
     or type(n.resource) ~= "table" then
    error("notify.enqueue: n must be { mchid, notify_url, event_type, "
          .. "summary, original_type, resource }", 2)
  end
  -- now: the host's, the delivery schedule's (next_at, created_at,
  -- done_at); the create_time WeChat writes is on its own clock (sim.clock)
  local now = core.time()
  local id = uuid()
  local state, next_at = "pending", now
  local applied, dups, sig = {}, 0, nil
  for _, f in ipairs(take_faults()) do
    local kind = f.kind
    if kind == "bad_signature" and f.signtest then kind = "signtest" end
    applied[#applied + 1] = kind
    if kind ~= "never_sent" and kind ~= "out_of_order"
       and kind ~= "duplicate" then
      sig = json.encode(f)
    end
    if kind == "never_sent" then
      state = "dropped"
    elseif kind == "out_of_order" then
      if state ~= "dropped" then state = "held" end
      next_at = now + HOLD_MAX
    elseif kind == "duplicate" then
      dups = dups + (tonumber(f.times) or 1)
    end
  end
  local original = n.original_type or (n.event_type:match("^REFUND")
                                       and "refund" or "transaction")
  local plain = assert(json.encode(n.resource))
  local res, err = tx:exec("INSERT INTO sim_notifications (id, mchid, "
    .. "notify_url, event_type, summary, original_type, resource, "
    .. "create_time, created_at, state, next_at, duplicates, sig_fault, "
    .. "faults, done_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, "
    .. "$11, $12, $13, $14, $15)",
    { n = 15, id, n.mchid, n.notify_url, n.event_type,
      n.summary or "", original, plain, beijing(clock.now(now)), now, state,
      next_at, dups, sig or core.null,
      #applied > 0 and json.encode(applied) or core.null,
      state == "dropped" and now or core.null })
  if not res then return nil, err end
  n.id = id
  return true
end

-- sim/faults.lua learns the delivery kinds (the signature kinds are the
-- ones responses use; asked for on endpoint "notify" they apply here).
do
  faults.define("never_sent", "notify", function() return true end)
  faults.define("out_of_order", "notify", function() return true end)
  faults.define("duplicate", "notify", function(f)
    local t = f.times
    if t == nil then f.times = 1; return true end
    if type(t) ~= "number" or t < 1 or t > 10 or t ~= math.floor(t) then
      return nil, "times must be an integer from 1 to 10"
    end
    return true
  end, { "times" })
end

-- Body and headers of one attempt -------------------------------------

local function merchant(ctx, mchid)
  return ctx.config.by_mchid and ctx.config.by_mchid[mchid]
end

-- The envelope, encrypted once per notification (stored at its first
-- attempt: a retry sends the same body, also after a restart).
local function envelope(ctx, row)
  local m = merchant(ctx, row.mchid)
  if not m then
    return nil, "no merchant " .. row.mchid .. " in the configuration"
  end
  local ok, r = pcall(ctx.identity.encrypt_resource, m, row.resource,
                      row.original_type, row.original_type)
  if not ok then return nil, tostring(r) end
  -- the keys in the order WeChat sends them
  local e = json.encode
  return '{"id":' .. e(row.id) .. ',"create_time":' .. e(row.create_time)
    .. ',"resource_type":"encrypt-resource","event_type":'
    .. e(row.event_type) .. ',"summary":' .. e(row.summary)
    .. ',"resource":{"original_type":' .. e(r.original_type)
    .. ',"algorithm":' .. e(r.algorithm)
    .. ',"ciphertext":' .. e(r.ciphertext)
    .. ',"associated_data":' .. e(r.associated_data)
    .. ',"nonce":' .. e(r.nonce) .. '}}'
end

-- Signed headers for body (sim.identity picks the key as for a response
-- to this merchant); fault (a sim.faults signature fault or nil) spoils
-- them the way it spoils a response.
local function headers(ctx, row, body, fault)
  local ok, h = pcall(ctx.identity.sign_headers, body,
                      { merchant = merchant(ctx, row.mchid), fault = fault,
                        notification = true })
  if not ok then return nil, h end
  h["Content-Type"] = "application/json"
  h["Request-ID"] = ctx.api.request_id(0)
  h["User-Agent"] = "paygate-simulator"
  return h
end

-- The deliverer ----------------------------------------------------------

local D = {}
D.__index = D
_M.Deliverer = D                -- for specs: setmetatable({ ctx, db,
                                -- lease, in_flight = 0 }, Deliverer)

local function log_warn(msg, fields)
  core.log(2, msg, json.encode(fields or {}))
end

-- Claims row's next attempt (fenced by the lease): returns the attempt
-- number, or nil when the row moved on or the lease was lost.
function D:claim(row)
  local ctx, l = self.ctx, self.lease
  local now = core.time()
  if not l then return nil, "no lease" end
  row.token = l.token             -- finish() is fenced by the same token
  return self.db:transaction(function(tx)
    local ok, err = lease.check(tx, _M.LEASE_KEY, l.token)
    if not ok then return nil, err end
    local rows = assert(tx:query("SELECT attempts, state, next_at, "
      .. "duplicates, sig_fault, body FROM sim_notifications WHERE id = $1",
      { row.id }))
    local cur = rows[1]
    local owes = cur and cur.state == "delivered" and cur.duplicates > 0
    if not cur or (cur.state ~= "pending" and cur.state ~= "held"
                   and not owes)
       or cur.attempts ~= row.attempts or cur.next_at > now then
      return false
    end
    local n = cur.attempts + 1
    local fk = cur.sig_fault and json.decode(cur.sig_fault)
    local fault_kind = type(fk) == "table" and (fk.signtest and "signtest"
                                               or fk.kind) or nil
    -- an attempt after one that was answered 200/204: a duplicate
    local prior = assert(tx:query("SELECT COUNT(*) AS c FROM "
      .. "sim_notification_attempts WHERE notification_id = $1 AND status "
      .. "IN (200, 204)", { row.id }))
    local dup = prior[1].c > 0 and 1 or 0
    -- the body is made once: every attempt sends the same bytes
    local body, berr = cur.body, nil
    if not body then body, berr = envelope(ctx, row) end
    -- a delivered one stays delivered while its duplicates go out
    assert(tx:exec("UPDATE sim_notifications SET attempts = $2, state = "
      .. "CASE WHEN state = 'delivered' THEN 'delivered' ELSE 'pending' END,"
      .. " next_at = $3, sig_fault = NULL, body = $4 WHERE id = $1",
      { n = 4, row.id, n, now + answer_timeout(ctx) + GRACE,
        body or core.null }))
    row.body, row.body_error = body, berr
    assert(tx:exec("INSERT INTO sim_notification_attempts (notification_id,"
      .. " n, at, error, fault, duplicate, worker) VALUES ($1, $2, $3, $4, "
      .. "$5, $6, $7)",
      { n = 7, row.id, n, now, core.null, fault_kind or core.null, dup,
        core.pid() }))
    return n, cur.sig_fault or false, cur.duplicates
  end)
end

-- Records attempt n's outcome and schedules what follows -- fenced by the
-- lease token the attempt was claimed under: a deliverer that lost the
-- lease meanwhile records nothing (the row stays pending; the new holder
-- sends it again once the attempt's time is up).
function D:finish(row, n, rec, dups)
  local ctx = self.ctx
  local now = core.time()
  local ok = rec.status == 200 or rec.status == 204
  local ok2, err = self.db:transaction(function(tx)
    local fenced, ferr = lease.check(tx, _M.LEASE_KEY, row.token)
    if not fenced then return nil, ferr end
    assert(tx:exec("UPDATE sim_notification_attempts SET status = $3, "
      .. "error = $4, latency = $5, timestamp = $6, nonce = $7, serial = $8"
      .. " WHERE notification_id = $1 AND n = $2",
      { n = 8, row.id, n, rec.status or core.null, rec.error or core.null,
        rec.latency or core.null, rec.timestamp or core.null,
        rec.nonce or core.null, rec.serial or core.null }))
    local cur = assert(tx:query("SELECT state, done_at FROM "
      .. "sim_notifications WHERE id = $1", { row.id }))[1]
    local state, next_at, done_at = "pending", nil, core.null
    local new_dups = dups
    if cur and cur.state == "delivered" then
      -- a duplicate went out (whatever its answer: it is not retried);
      -- the notification stays delivered, the next duplicate follows
      state, done_at = "delivered", cur.done_at
      new_dups = max(dups - 1, 0)
      next_at = now + DUP_DELAY / scale(ctx)
    elseif ok then
      -- delivered; the duplicates owed (if any) follow DUP_DELAY apart
      state, next_at, done_at = "delivered", now + DUP_DELAY / scale(ctx),
                                now
    elseif n >= _M.MAX_ATTEMPTS then
      state, next_at, done_at = "failed", now, now
    else
      next_at = now + _M.SCHEDULE[n] / scale(ctx)
    end
    -- only if nobody claimed it since (a lease lost mid-attempt)
    assert(tx:exec("UPDATE sim_notifications SET state = $3, next_at = $4,"
      .. " done_at = $5, duplicates = $6 WHERE id = $1 AND attempts = $2",
      { n = 6, row.id, n, state, next_at, done_at, new_dups }))
    if ok then
      -- an out-of-order notification goes after a later one succeeded
      assert(tx:exec("UPDATE sim_notifications SET state = 'pending', "
        .. "next_at = $3 WHERE state = 'held' AND mchid = $1 AND seq < $2",
        { row.mchid, row.seq, now }))
    end
    return true
  end)
  if not ok2 then
    log_warn("notify: cannot record an attempt", { id = row.id,
             error = tostring(err) })
  end
end

function D:deliver(row, n, fault, dups)
  local ctx = self.ctx
  local rec = {}
  local body, eerr = row.body, row.body_error
  local h
  if body then
    local herr
    h, herr = headers(ctx, row, body, fault and json.decode(fault) or nil)
    if not h then eerr = "signing failed: " .. tostring(herr) end
  end
  if not body or not h then
    rec.error = "not sent: " .. tostring(eerr)
  else
    rec.timestamp, rec.nonce = h["Wechatpay-Timestamp"], h["Wechatpay-Nonce"]
    rec.serial = h["Wechatpay-Serial"]
    local t0 = core.mono()
    -- WeChat judges by the status alone: the answer's body (a framework's
    -- HTML page, of any size) is read and dropped, never held
    local res, err = http.request{ method = "POST", url = row.notify_url,
      headers = h, body = body, timeout = answer_timeout(ctx),
      connect_timeout = min(answer_timeout(ctx), 5),
      ca_file = ctx.config.notify_ca_file,   -- nil: the system store
      sink = function() end }
    rec.latency = core.mono() - t0
    if res then
      rec.status = res.status
    else
      rec.error = type(err) == "table" and (err.kind .. ": "
                  .. tostring(err.message)) or tostring(err)
    end
  end
  self:finish(row, n, rec, dups)
end

function D:spawn_delivery(row, n, fault, dups)
  self.in_flight = self.in_flight + 1
  core.spawn(function()
    local ok, err = pcall(self.deliver, self, row, n, fault, dups)
    self.in_flight = self.in_flight - 1
    if not ok then
      log_warn("notify: delivery failed", { id = row.id,
               error = tostring(err) })
    end
  end)
end

-- One look for due rows; returns seconds until the next may be due.
function D:tick()
  local now = core.time()
  if self.in_flight < MAX_IN_FLIGHT then
    local rows = assert(self.db:query("SELECT seq, id, mchid, notify_url, "
      .. "event_type, summary, original_type, resource, create_time, "
      .. "attempts FROM sim_notifications WHERE (state IN ('pending', "
      .. "'held') OR (state = 'delivered' AND duplicates > 0)) AND next_at "
      .. "<= $1 ORDER BY next_at, seq LIMIT $2",
      { now, min(BATCH, MAX_IN_FLIGHT - self.in_flight) }))
    for _, row in ipairs(rows) do
      local n, fault, dups = self:claim(row)
      if n == nil then return nil, fault end          -- the lease is lost
      if n then self:spawn_delivery(row, n, fault, dups) end
    end
    if #rows > 0 then return 0 end
  end
  local rows = assert(self.db:query("SELECT MIN(next_at) AS t FROM "
    .. "sim_notifications WHERE state IN ('pending', 'held') OR (state = "
    .. "'delivered' AND duplicates > 0)"))
  local t = rows[1] and rows[1].t
  if not t then return POLL end
  return max(0.002, min(POLL, t - core.time()))
end

-- Runs while this worker holds the lease.
function D:hold()
  local renewed = core.mono()
  while true do
    if core.mono() - renewed >= RENEW_EVERY then
      local ok, err = lease.renew(self.db, self.lease)
      if not ok then return nil, err end
      renewed = core.mono()
    end
    local wait, err = self:tick()
    if not wait then return nil, err end
    if wait > 0 then core.sleep(wait) end
  end
end

function D:run()
  while true do
    local l, err = lease.acquire(self.db, _M.LEASE_KEY, LEASE_TTL)
    if l then
      self.lease = l
      local ok, herr = pcall(self.hold, self)
      if not ok then
        log_warn("notify: deliverer stopped", { error = tostring(herr) })
      end
      self.lease = nil
      core.sleep(0.05)
    else
      local t = (type(err) == "table" and err.ttl) or 0.5
      core.sleep(max(0.05, min(t, 0.5)))
    end
  end
end

--- syntax: notify.start(ctx) -- once per worker; spawns the deliverer
-- ctx: { db, config, identity, faults }
function _M.start(ctx)
  _M.ctx = ctx
  local d = setmetatable({ ctx = ctx, db = ctx.db, in_flight = 0 }, D)
  _M.deliverer = d
  core.spawn(function()
    while true do
      local ok, err = pcall(d.run, d)
      log_warn("notify: deliverer loop restarted", { error = tostring(
               ok and "returned" or err) })
      core.sleep(0.5)
    end
  end)
  return d
end

--- syntax: notify.routes(ctx) -- the control routes (sim/control_notify)
function _M.routes(ctx)
  require("sim.control_notify").routes(ctx)
end

-- Read back ---------------------------------------------------------------

--- syntax: list = notify.list(db, filter)
-- filter: { mchid (the merchant's, or a partner order's sub-merchant's),
-- event_type, out_trade_no, out_refund_no, id, state }
-- returns: notifications in enqueue order, each with its attempts.
function _M.list(db, f)
  f = f or {}
  local where, params = {}, {}
  for _, k in ipairs({ "mchid", "event_type", "id", "state" }) do
    if type(f[k]) == "string" then
      params[#params + 1] = f[k]
      local p = "$" .. #params
      if k == "mchid" then
        -- a partner order's notification is its service provider's (the
        -- provider's key encrypts it); the sub-merchant names it too, as
        -- the control API's ?mchid= does
        where[#where + 1] = "(mchid = " .. p .. " OR json_extract("
          .. "resource, '$.sub_mchid') = " .. p .. ")"
      else
        where[#where + 1] = k .. " = " .. p
      end
    end
  end
  local sql = "SELECT seq, id, mchid, notify_url, event_type, summary, "
    .. "original_type, resource, create_time, created_at, state, attempts, "
    .. "next_at, faults, done_at FROM sim_notifications"
    .. (#where > 0 and " WHERE " .. table.concat(where, " AND ") or "")
    .. " ORDER BY seq"
  local rows, err = db:query(sql, params)
  if not rows then return nil, err end
  local out, by_id = {}, {}
  for _, r in ipairs(rows) do
    local res = json.decode(r.resource) or {}
    if (not f.out_trade_no or res.out_trade_no == f.out_trade_no)
       and (not f.out_refund_no or res.out_refund_no == f.out_refund_no) then
      local n = {
        id = r.id, mchid = r.mchid, notify_url = r.notify_url,
        event_type = r.event_type, summary = r.summary,
        original_type = r.original_type, resource = res,
        create_time = r.create_time, created_at = r.created_at,
        state = r.state, faults = r.faults and json.decode(r.faults) or {},
        next_at = (r.state == "pending" or r.state == "held") and r.next_at
                  or nil,
        done_at = r.done_at, attempts = {},
        out_trade_no = res.out_trade_no, out_refund_no = res.out_refund_no,
      }
      out[#out + 1] = n
      by_id[r.id] = n
      -- its last attempt is still owned by the deliverer until next_at
      n._last, n._owned_until = r.attempts, r.next_at
    end
  end
  if #out > 0 then
    -- the attempts of what is listed (all of them when nothing filters)
    local sqla = "SELECT notification_id, n, at, status, error, latency, "
      .. "timestamp, nonce, serial, fault, duplicate, worker FROM "
      .. "sim_notification_attempts"
    local ids = {}
    if #where > 0 or f.out_trade_no or f.out_refund_no then
      if #out <= 200 then
        local marks = {}
        for i, n in ipairs(out) do
          ids[i] = n.id
          marks[i] = "$" .. i
        end
        sqla = sqla .. " WHERE notification_id IN ("
               .. table.concat(marks, ", ") .. ")"
      end
    end
    local arows = db:query(sqla .. " ORDER BY notification_id, n",
                           #ids > 0 and ids or nil) or {}
    for _, a in ipairs(arows) do
      local n = by_id[a.notification_id]
      if n then
        local e = a.error
        if a.status == nil and e == nil then
          -- the two reads are not one snapshot: an attempt newer than
          -- the row read above was claimed in between, so it is in flight
          e = (a.n > n._last or (a.n == n._last
                                 and core.time() < n._owned_until))
              and "in_flight: no answer yet"
              or "interrupted: the simulator stopped before the answer"
        end
        n.attempts[#n.attempts + 1] = {
          n = a.n, at = a.at, status = a.status, error = e,
          latency = a.latency, timestamp = a.timestamp, nonce = a.nonce,
          serial = a.serial, fault = a.fault, duplicate = a.duplicate == 1,
          worker = a.worker,
        }
      end
    end
  end
  for _, n in ipairs(out) do n._last, n._owned_until = nil, nil end
  return out
end

-- An empty table encodes as {}, and the resource read back from its
-- stored text has lost the [] it was sent with: these fields are arrays
-- (the list's own, and those of a Transaction or Refund resource).
local ARRAYS = { attempts = true, faults = true, promotion_detail = true,
                 goods_detail = true, from = true }

--- syntax: s = notify.encode(list) -- the JSON of notify.list's result
function _M.encode(list)
  if #list == 0 then return "[]" end
  local s = assert(json.encode(list))
  return (s:gsub('"([%w_]+)":{}', function(k)
    if ARRAYS[k] then return '"' .. k .. '":[]' end
  end))
end

return _M
