-- paygate.outbox: a transactional outbox. Events are written in the
-- caller's transaction (so they exist iff the state change committed) and
-- delivered afterwards, at least once, in order per subject, to sinks:
-- HTTP webhooks (signed), Redis Streams (XADD) and in-process Lua hooks.
--
--   db:transaction(function(tx)
--     assert(tx:exec("UPDATE payments SET state = 'paid' ..."))
--     assert(outbox.enqueue(tx, { subject = payment_id,
--                                 type = "payment.paid",
--                                 payload = { id = payment_id } }))
--   end)
--
--   outbox.dispatcher(db, { sinks = {
--     outbox.webhook{ url = "https://merchant/hooks", secret = s },
--     outbox.redis_stream{ url = "redis://127.0.0.1:6379",
--                          stream = "paygate:events" },
--     outbox.hooks{ ["payment.paid"] = function(event) ... end },
--   } }):start()
--
-- Ordering: an event is the head of its subject when no earlier event of
-- the subject is still pending; only heads are delivered. A failed head is
-- retried with exponential backoff and full jitter, and dead-lettered after
-- max_attempts (or at once on an error with retryable == false); only then
-- does the subject's next event go.
--
-- Exclusion: subjects hash into `partitions` shards; a dispatcher delivers
-- a shard's events only while it holds the shard's paygate.lease, and
-- records an outcome only in a transaction that checks the lease's fencing
-- token (lease.check). A dispatcher whose lease expired mid-delivery cannot
-- mark the row: its outcome is dropped, and the newer holder delivers again
-- (at least once; receivers dedupe by event id).
--
-- Failures: nil, err (core.error). Misuse raises at the caller.

local core = require "paygate.core"
local crypto = require "paygate.crypto"
local json = require "paygate.json"
local sql = require "paygate.sql"
local lease = require "paygate.lease"
local utf8_clean = require("paygate.utf8").clean
local split_query = require("paygate.redact").split_query

-- What the dead letter of a sink's not-retryable error says to do: the
-- easiest trap of a hook (paygate.error's retryable is false unless said)
local NOT_RETRYABLE_HINT = "a sink's error with retryable = false"
  .. " (paygate.error's default) dead-letters the event at once; for a"
  .. " failure worth retrying return paygate.error(kind, message,"
  .. " { retryable = true }) or nil, \"text\"; once fixed, replay the"
  .. " event (outbox.replay)"

local _M = { _VERSION = "0.1.0" }

local floor, min, max = math.floor, math.min, math.max
local concat = table.concat
local byte = string.byte

local DEFAULTS = {
  name = "default",         -- lease namespace: one per independent outbox
  partitions = 8,           -- shards; every dispatcher of a db must agree
  max_partitions = nil,     -- shards taken eagerly (nil: all); see below
  batch = 50,               -- heads fetched per shard per round
  concurrency = 16,         -- deliveries in flight per dispatcher
  interval = 1,             -- s between rounds that found nothing to do
  lease_ttl = 30,           -- s; the shard leases' ttl until deliveries
                            -- were measured, and its floor after
  lease_ttl_max = 600,      -- s; the measured ttl's ceiling
  max_attempts = 20,        -- attempts before a dead letter
  backoff_base = 1,         -- s; delay before attempt n+1 is up to
  backoff_cap = 3600,       -- s;   min(cap, base * 2^(n-1))
  keep_days = 7,            -- delivered rows are deleted after this
  prune_batch = 500,        -- rows per DELETE
  prune_interval = 300,     -- s between prune passes
  backlog_interval = 15,    -- s between reads of the backlog gauges
}
-- the dispatcher's options and their defaults (read-only: an app's config
-- check names the keys it accepts)
_M.DEFAULTS = DEFAULTS

-- The longest dispatcher name: the name is part of the series its
-- delivery times are measured under ("outbox:<name>:delivery",
-- lease.measure: at most 200 bytes, no '|'). A name past it made every
-- round raise, so nothing was ever delivered.
local NAME_MAX = 200 - #"outbox:" - #":delivery"

-- syntax: ok, reason = outbox.check_name(name)
-- Whether name can be a dispatcher's opts.name (an app's config check
-- refuses a bad one before any worker starts); reason: "must be ...".
function _M.check_name(name)
  if type(name) ~= "string" or name == "" or name:find("|", 1, true)
     or #name > NAME_MAX then
    return nil, "must be a non-empty string without '|' (at most "
                .. NAME_MAX .. " bytes)"
  end
  return true
end

------------------------------------------------------------- schema

local SQLITE_SCHEMA = [[
CREATE TABLE IF NOT EXISTS paygate_outbox (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  subject TEXT NOT NULL, type TEXT NOT NULL, payload TEXT NOT NULL,
  shard INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
  attempts INTEGER NOT NULL DEFAULT 0,
  next_at DOUBLE PRECISION NOT NULL, created_at DOUBLE PRECISION NOT NULL,
  delivered_at DOUBLE PRECISION, sinks_done TEXT NOT NULL DEFAULT '',
  last_error TEXT, prior_attempts INTEGER NOT NULL DEFAULT 0);
]]

local PG_SCHEMA = [[
CREATE TABLE IF NOT EXISTS paygate_outbox (
  id BIGSERIAL PRIMARY KEY,
  subject TEXT NOT NULL, type TEXT NOT NULL, payload TEXT NOT NULL,
  shard INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
  attempts INTEGER NOT NULL DEFAULT 0,
  next_at DOUBLE PRECISION NOT NULL, created_at DOUBLE PRECISION NOT NULL,
  delivered_at DOUBLE PRECISION, sinks_done TEXT NOT NULL DEFAULT '',
  last_error TEXT, prior_attempts INTEGER NOT NULL DEFAULT 0);
]]

-- Partial indexes (both engines): pending rows by subject for the head
-- test, pending rows in id order for the scan, delivered rows by age for
-- pruning, dead rows for replay.
local INDEXES = [[
CREATE INDEX IF NOT EXISTS paygate_outbox_subject ON paygate_outbox
  (subject, id) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS paygate_outbox_pending ON paygate_outbox
  (id) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS paygate_outbox_delivered ON paygate_outbox
  (delivered_at) WHERE state = 'delivered';
CREATE INDEX IF NOT EXISTS paygate_outbox_dead ON paygate_outbox
  (id) WHERE state = 'dead';
]]

local ready = setmetatable({}, { __mode = "k" })

-- prior_attempts (the attempts made before the event's last replay, which
-- set attempts back to 0: a delivery's `attempt` is prior_attempts +
-- attempts + 1, so a replayed event never goes out as a first delivery)
-- came after the table: a table an older paygate made gets it in place,
-- by outbox.setup and the dispatcher only (a read, a replay or a prune
-- never alters the table: a role that may only read lists an old one).
-- (NOT NULL DEFAULT 0: that paygate's INSERT still works, during a rolling
-- upgrade too; its rows had no replay counted.)
local HAS_PRIOR = {
  sqlite = "SELECT 1 AS x FROM pragma_table_info('paygate_outbox')"
    .. " WHERE name = 'prior_attempts'",
  postgres = "SELECT 1 AS x FROM pg_attribute WHERE attrelid ="
    .. " to_regclass('paygate_outbox') AND attname = 'prior_attempts'"
    .. " AND NOT attisdropped",
}

-- On PostgreSQL the ALTER takes an ACCESS EXCLUSIVE lock: it waits behind
-- any open transaction that touched the table, and every enqueue (the
-- notification path) would queue behind the waiting ALTER. So the
-- schema's own transaction waits for a lock at most this long, and a
-- lock it did not get defers the column: the table works without it
-- (a replay then starts the count over, as before the column), and the
-- dispatcher tries again UPGRADE_RETRY s later.
local LOCK_TIMEOUT = "SET LOCAL lock_timeout = '1s'"
local UPGRADE_RETRY = 30

-- db -> true: the table is there, the column not yet (its ALTER waited
-- past the lock timeout); setup and enqueue do not try again, the
-- dispatcher does
local deferred = setmetatable({}, { __mode = "k" })

local function has_prior(q)
  local rows, err = q:query(HAS_PRIOR[q.engine == "postgres" and "postgres"
                                      or "sqlite"])
  if not rows then
    return nil, err
  end
  return rows[1] ~= nil
end

-- alter: add prior_attempts to a table that lacks it (only in a
-- transaction of the schema's own: never under an enqueue's)
local function create_in(tx, alter)
  local _, err
  if tx.engine == "postgres" then
    -- CREATE ... IF NOT EXISTS races between sessions in PostgreSQL.
    _, err = tx:exec("SELECT pg_advisory_xact_lock(7217002)")
    if err then
      return nil, err
    end
    _, err = tx:exec_script(PG_SCHEMA .. INDEXES)
  else
    _, err = tx:exec_script(SQLITE_SCHEMA .. INDEXES)
  end
  if err then
    return nil, err
  end
  if not alter then
    return true
  end
  local has, herr = has_prior(tx)
  if has == nil then
    return nil, herr
  end
  if not has then
    local _, aerr = tx:exec("ALTER TABLE paygate_outbox ADD COLUMN"
                            .. " prior_attempts INTEGER NOT NULL DEFAULT 0")
    if aerr then
      aerr.message = "outbox: adding the prior_attempts column to"
        .. " paygate_outbox: " .. tostring(aerr.message)
      return nil, aerr
    end
  end
  return true
end

local function schema_tx(tx)
  if tx.engine == "postgres" then
    local _, err = tx:exec(LOCK_TIMEOUT)
    if err then
      return nil, err
    end
  end
  return create_in(tx, true)
end

local function log_at(level, msg, fields)
  local ok, paygate = pcall(require, "paygate")
  if ok and paygate.log then
    paygate.log[level](msg, fields)
  end
end

-- The table, its indexes and prior_attempts, once per handle. A lock the
-- schema's transaction could not get in time (55P03; 40P01, a deadlock)
-- on a table that is there defers the column: true (the table works
-- without it; deferred[db] set, said once in the log). Once deferred,
-- only `retry` tries again.
-- returns: true, or nil, err
local function ensure_schema(db, retry)
  if ready[db] or (deferred[db] and not retry) then
    return true
  end
  -- (PostgreSQL: one attempt; db:transaction's retries of a busy store
  -- would wait for the lock again and again)
  local ok, err = db:transaction(schema_tx, db.engine == "postgres"
                                            and { retries = 1 } or nil)
  if ok then
    if deferred[db] then
      log_at("info", "outbox: paygate_outbox has its prior_attempts column"
             .. " now")
    end
    deferred[db] = nil
    ready[db] = true
    return true
  end
  local code = type(err) == "table" and err.code
  if code ~= "55P03" and code ~= "40P01" then
    return nil, err
  end
  -- the table may be there, with the column or without it (someone else
  -- held the lock: another session's upgrade, a long transaction)
  local has, herr = has_prior(db)
  if has == nil then
    return nil, herr
  end
  if has then
    deferred[db] = nil
    ready[db] = true
    return true
  end
  local there, terr = db:has_table("paygate_outbox")
  if not there then
    return nil, there == nil and terr or err
  end
  if not deferred[db] then
    log_at("warn", "outbox: paygate_outbox made by an older paygate lacks"
      .. " the prior_attempts column, and another transaction held the"
      .. " table past the lock timeout: deferred, the dispatcher tries"
      .. " again (meanwhile a replay counts the attempts from 1 again)",
      { error = tostring(err) })
  end
  deferred[db] = true
  return true
end

-- The schema as a read, a replay or a prune needs it: whether the table
-- has prior_attempts. The table is made when missing (with the column),
-- never altered. returns: true or false, or nil, err
local function prior_of(db)
  if ready[db] then
    return true
  end
  local has, err = has_prior(db)
  if has == nil then
    return nil, err
  end
  if has then
    ready[db] = true
    return true
  end
  local there, terr = db:has_table("paygate_outbox")
  if there == nil then
    return nil, terr
  end
  if there then
    return false
  end
  local ok, cerr = db:transaction(create_in)
  if not ok then
    return nil, cerr
  end
  has, err = has_prior(db)
  if has then
    ready[db] = true
  end
  return has, err
end

local function check_db(fname, db)
  if getmetatable(db) ~= sql.DB then
    error(fname .. ": db must be a paygate.sql db", 3)
  end
end

-- syntax: ok, err = outbox.setup(db)
-- Creates the table and its indexes unless they exist, and adds
-- prior_attempts to a table an older paygate made (once per handle;
-- enqueue and the dispatcher call it too). PostgreSQL: a lock on the
-- table not had within 1 s defers the column (true; the dispatcher tries
-- again), so an upgrade never holds up the enqueues.
-- yields: one transaction, the first time
function _M.setup(db)
  check_db("outbox.setup", db)
  return ensure_schema(db)
end

------------------------------------------------------------ enqueue

-- A stable 31-bit hash of the subject (exact in doubles: h * 31 + 255 stays
-- below 2^37), so every process maps a subject to the same shard.
local function shard_of(subject)
  local h = 0
  for i = 1, #subject do
    h = (h * 31 + subject:byte(i)) % 2147483647
  end
  return h
end
_M.shard_of = shard_of

-- The enqueue's INSERT, per engine, for a pending event or a settled one
-- (outbox.enqueue's event.settled: no sink takes it, so it is written
-- delivered: kept, listed and replayable like any delivered event, and
-- never a dispatcher's work; $6 is its delivered_at).
-- PostgreSQL hands out BIGSERIAL ids at INSERT, not at COMMIT: two
-- transactions enqueueing for one subject could commit in the other order,
-- and the dispatcher would see (and deliver) the later id first. A
-- transaction-scoped advisory lock per subject, taken before the id is
-- drawn, makes a subject's ids follow its commits.
local function insert_text(pg, settled)
  local cols = "subject, type, payload, shard, next_at, created_at"
    .. (settled and ", state, delivered_at" or "")
  if not pg then
    return "INSERT INTO paygate_outbox (" .. cols .. ") VALUES ($1, $2,"
      .. " $3, $4, $5, $5" .. (settled and ", 'delivered', $6" or "") .. ")"
  end
  return "INSERT INTO paygate_outbox (" .. cols .. ") SELECT $1::text,"
    .. " $2::text, $3::text, $4::integer, $5::double precision,"
    .. " $5::double precision"
    .. (settled and ", 'delivered', $6::double precision" or "")
    .. " FROM (SELECT pg_advisory_xact_lock(7217003, hashtext($1::text)))"
    .. " l RETURNING id"
end
local INSERT = {
  sqlite = { [false] = insert_text(false, false),
             [true] = insert_text(false, true) },
  postgres = { [false] = insert_text(true, false),
               [true] = insert_text(true, true) },
}

local function insert_sql(engine, settled)
  return INSERT[engine == "postgres" and "postgres" or "sqlite"][
    settled == true]
end

local made_in = setmetatable({}, { __mode = "k" })

-- The schema from inside the caller's transaction. A table that exists
-- and was not made by this transaction existed before it: it stays,
-- whatever this transaction does, so the handle is ready. One made here
-- may still be rolled back with the caller's work.
local function schema_in(tx)
  local yes, err = tx:has_table("paygate_outbox")
  if yes == nil then
    return nil, err
  end
  if yes then
    if not made_in[tx] then
      -- (one an older paygate made lacks prior_attempts: the INSERT does
      -- not need it, and setup or the dispatcher adds it, in a
      -- transaction of their own, not under the caller's)
      local has, herr = has_prior(tx)
      if has == nil then
        return nil, herr
      end
      if has then
        ready[tx.db] = true
      end
    end
    return true
  end
  local _, cerr = create_in(tx)
  if cerr then
    return nil, cerr
  end
  made_in[tx] = true
  return true
end

-- The INSERT's params of event (checked; misuse raises at the caller of
-- the public function fname): subject, type, payload JSON, shard, at.
local function params_of(fname, event)
  if type(event) ~= "table" then
    error(fname .. ": event must be a table", 3)
  end
  local subject, etype = event.subject or event.stream, event.type
  if type(subject) ~= "string" or subject == "" then
    error(fname .. ": event.subject must be a non-empty string", 3)
  end
  if type(etype) ~= "string" or etype == "" then
    error(fname .. ": event.type must be a non-empty string", 3)
  end
  -- (it goes out in the webhook's Paygate-Event-Type header: a CR, LF,
  -- space or other byte no header value may hold would fail every
  -- delivery until the event is dead-lettered)
  if #etype > 200 or etype:find("[^\33-\126]") then
    error(fname .. ": event.type must be at most 200 visible ASCII"
          .. " characters (no space or control byte)", 3)
  end
  local payload = event.payload
  if payload == nil then
    payload = {}
  elseif type(payload) ~= "table" then
    error(fname .. ": event.payload must be a table", 3)
  end
  local at = event.at
  if at ~= nil and type(at) ~= "number" then
    error(fname .. ": event.at must be a number (seconds)", 3)
  end
  if event.settled ~= nil and type(event.settled) ~= "boolean" then
    error(fname .. ": event.settled must be a boolean", 3)
  end
  local ok, text = pcall(json.encode, payload)
  if not ok then
    error(fname .. ": event.payload: " .. tostring(text), 3)
  end
  local now = core.time()
  if event.settled then
    return { subject, etype, text, shard_of(subject), at or now, now }
  end
  return { subject, etype, text, shard_of(subject), at or now }
end

-- syntax: id, err = outbox.enqueue(tx, event)
-- event: { subject = "pay_1" (ordering key), type = "payment.paid",
--          payload = table (JSON), at = seconds (optional: not before),
--          settled = true (optional: no sink takes this type -- see
--          d:wants -- so it is written delivered at once: kept, listed,
--          pruned and replayable, never dispatched) }
-- returns: the event id (grows with every enqueue; never reused), or nil,
--          err (the store's kinds). Rolled back with the caller's
--          transaction.
-- yields: one statement (the first time per handle, the schema too)
function _M.enqueue(tx, event)
  if getmetatable(tx) ~= sql.TX then
    error("outbox.enqueue: tx must be the tx of a db:transaction", 2)
  end
  local params = params_of("outbox.enqueue", event)
  if not ready[tx.db] and not deferred[tx.db] then
    local _, serr = schema_in(tx)
    if serr then
      return nil, serr
    end
  end
  local res, err = tx:exec(insert_sql(tx.engine, event.settled), params)
  if not res then
    return nil, err
  end
  return res.last_id
end

-- syntax: stmt = outbox.statement(db, event)
-- outbox.enqueue as a statement for db:atomic ({ sql, params, name =
-- "outbox" }; the table must exist: outbox.setup(db) once). event as
-- enqueue's. The event id is the statement's result's last_id.
function _M.statement(db, event)
  local mt = getmetatable(db)
  if mt ~= sql.DB and mt ~= sql.TX then
    error("outbox.statement: db must be a paygate.sql db", 2)
  end
  local params = params_of("outbox.statement", event)
  return { insert_sql(db.engine, event.settled), params, name = "outbox" }
end

------------------------------------------------------------ backoff

-- syntax: delay = outbox.backoff(attempt [, base, cap, random])
-- Full jitter: a uniform delay in [0, min(cap, base * 2^(attempt-1))).
-- random() returns a number in [0, 1) (default math.random).
function _M.backoff(attempt, base, cap, random)
  base = base or DEFAULTS.backoff_base
  cap = cap or DEFAULTS.backoff_cap
  local ceiling = min(cap, base * 2 ^ max(0, attempt - 1))
  return (random or math.random)() * ceiling
end

---------------------------------------------------------------- sinks

local function hex_hmac(secret, t, body)
  return crypto.hex(crypto.hmac("sha256", secret, t .. "." .. body))
end

-- A webhook's secret: a non-empty string, or a non-empty array of them
-- (a rotation: the new one and the old). returns: a new array (the
-- caller's table may change later), or nil.
local function secret_list(secret)
  local given = type(secret) == "table" and secret or { secret }
  if #given == 0 then return nil end
  local list = {}
  for i = 1, #given do
    if type(given[i]) ~= "string" or given[i] == "" then return nil end
    list[i] = given[i]
  end
  return list
end

-- syntax: header = outbox.sign_webhook(secret, body [, t])
-- secret: the shared secret, or an array of them (a rotation: one v1 each,
--         so a receiver holding any one of them verifies)
-- returns: "t=<unix seconds>,v1=<hex HMAC-SHA256(secret, t .. "." ..
--          body)>[,v1=...]", the value of the Paygate-Signature header
function _M.sign_webhook(secret, body, t)
  local secrets = secret_list(secret)
  if not secrets then
    error("outbox.sign_webhook: secret must be a non-empty string or an"
          .. " array of them", 2)
  end
  if type(body) ~= "string" then
    error("outbox.sign_webhook: body must be a string", 2)
  end
  t = floor(t or core.time())
  local out = { "t=" .. t }
  for i = 1, #secrets do
    out[i + 1] = "v1=" .. hex_hmac(secrets[i], t, body)
  end
  return concat(out, ",")
end

local function bad(kind, message)
  return nil, core.error(kind, "verify webhook: " .. message,
                         { retryable = false })
end

-- syntax: ok, err = outbox.verify_webhook(secret, header, body [, opts])
-- secret: the shared secret, or an array of them (rotation: any matches)
-- header: the Paygate-Signature value; body: the raw request body
-- opts: tolerance (s, default 300), now (s, default the clock)
-- returns: true, or nil, err with kind bad_header, bad_signature or
--          stale_timestamp (err.retryable false)
function _M.verify_webhook(secret, header, body, opts)
  local secrets = type(secret) == "table" and secret or { secret }
  if #secrets == 0 then
    error("outbox.verify_webhook: secret must be a string or an array of"
          .. " strings", 2)
  end
  for _, s in ipairs(secrets) do
    if type(s) ~= "string" or s == "" then
      error("outbox.verify_webhook: secret must be a non-empty string", 2)
    end
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("outbox.verify_webhook: opts must be a table", 2)
  end
  opts = opts or {}
  if type(header) ~= "string" or #header > 4096 then
    return bad("bad_header", "missing or oversized signature header")
  end
  if type(body) ~= "string" then
    return bad("bad_header", "no body")
  end
  -- t is signed as sent (t_text): a sender's "t=0170..." is not the same
  -- signed text as "t=170...", and one timestamp only (which of two would
  -- be the signed one is a guess a receiver in another language may make
  -- the other way)
  local t, t_text, sigs = nil, nil, {}
  for part in header:gmatch("[^,]+") do
    local k, v = part:match("^%s*([%w]+)=([^%s]*)%s*$")
    if k == "t" then
      if t then return bad("bad_header", "more than one timestamp") end
      -- 12 digits at most (seconds since 1970 have 10 until 2286): no
      -- sender writes more; docs/gateway.md's Python receiver agrees
      t = v:match("^%d+$") and tonumber(v) or nil
      if not t or #v > 12 then
        return bad("bad_header", "bad timestamp")
      end
      t_text = v
    elseif k == "v1" and v:match("^%x+$") and #v == 64 then
      sigs[#sigs + 1] = v:lower()
    end
  end
  if not t then
    return bad("bad_header", "no timestamp")
  end
  if #sigs == 0 then
    return bad("bad_header", "no v1 signature")
  end
  local matched = false
  for _, s in ipairs(secrets) do
    local want = hex_hmac(s, t_text, body)
    for _, got in ipairs(sigs) do
      if crypto.constant_time_equal(want, got) then
        matched = true
      end
    end
  end
  if not matched then
    return bad("bad_signature", "no signature matches the body")
  end
  local now = opts.now or core.time()
  local tolerance = opts.tolerance or 300
  if math.abs(now - t) > tolerance then
    return bad("stale_timestamp", "timestamp outside the tolerance of "
               .. tolerance .. " s")
  end
  return true
end

-- The webhook body: the envelope built around the stored payload text (no
-- re-encoding).
local function webhook_body(event)
  return '{"id":' .. string.format("%d", event.id)
    .. ',"type":' .. json.encode(event.type)
    .. ',"subject":' .. json.encode(event.subject)
    .. ',"created_at":' .. string.format("%.3f", event.created_at)
    .. ',"attempt":' .. event.attempt
    .. ',"data":' .. event.payload_json .. '}'
end
_M.webhook_body = webhook_body

local REASON_MAX = 200     -- bytes of a refusing webhook's answer kept
local OK_BODY_MAX = 65536  -- bytes of an accepting answer read (then dropped)
-- Status codes after which trying again may help. 401 and 403 refuse the
-- sender's credentials, not the event: a receiver whose secret (or token,
-- allow-list) is not yet the sender's, mid-rotation. Dead-lettered at
-- once, every event of that window went dead at its first attempt and the
-- next event of each subject overtook it; retried, the fix delivers them
-- in order.
local RETRY_STATUS = { [401] = true, [403] = true, [408] = true,
                       [409] = true, [425] = true, [429] = true }

local function check_sink_opts(fname, opts)
  if type(opts) ~= "table" then
    error(fname .. ": opts must be a table", 3)
  end
  if opts.name ~= nil and (type(opts.name) ~= "string" or opts.name == ""
                           or opts.name:find(",", 1, true)) then
    error(fname .. ": opts.name must be a non-empty string without ','", 3)
  end
  if opts.types ~= nil and type(opts.types) ~= "table" then
    error(fname .. ": opts.types must be an array of event types", 3)
  end
end

local function type_filter(types)
  if not types then
    return nil
  end
  local set = {}
  for _, t in ipairs(types) do
    set[t] = true
  end
  return set
end

-- syntax: bad = outbox.header_problem(name, value)
-- What is wrong with an extra header a webhook is given: "name" (not an
-- HTTP token), "value" (not a string, or holding a control character: a
-- CR or LF would start another header), or nil. (An app's config check
-- asks the same question, to name its own key.)
function _M.header_problem(name, value)
  if type(name) ~= "string" or not name:match("^[%w!#$%%&'*+.^_`|~-]+$")
  then
    return "name"
  end
  if type(value) ~= "string" or value:find("[%c\127]") then
    return "value"
  end
  return nil
end

-- What the line of a sink's failed attempt (log_failed) says of the
-- sinks made here, beside the event: a webhook's host, a hook (hook_of:
-- event type -> the function). Kept out of the sink's table, which an
-- app may build itself (a field of its own there is never logged).
local sink_about = setmetatable({}, { __mode = "k" })
local function about(sink, t)
  sink_about[sink] = t
  return sink
end

-- A webhook URL's host (and port) as a log line may show it: the
-- authority (up to the first "/", "?" or "#", as the HTTP client reads
-- it) without its user info (up to its last "@"); the path, the query
-- and the fragment go. nil when an "@" stands past the authority ahead
-- of the query (paygate.redact's split_query): a password holding "/",
-- "?" or "#" (user:pa/ss@host, which the authority would show in part)
-- cannot be told from a path holding "@" (host/a@token, whose token what
-- follows the last "@" would show).
local function url_host(url)
  local main = split_query(url:match("^%a+://(.*)$") or "")
  local authority, rest = main:match("^([^/?#]*)(.*)$")
  if rest:find("@", 1, true) then return nil end
  return (authority:match("([^@]*)$"))
end

-- syntax: sink = outbox.webhook(opts)
-- opts: url, secret (or an array of them: each signs, for a rotation),
--       name ("webhook"), timeout (s, 10), headers (extra),
--       types (array: only these event types), ca_file, resolve
-- POSTs the JSON envelope { id, type, subject, created_at, attempt, data }
-- with Paygate-Signature (see sign_webhook), Paygate-Event-Id and
-- Paygate-Event-Type. 2xx is delivered; 5xx, 401, 403, 408, 409, 425, 429
-- and transport failures are retried; any other status dead-letters at
-- once.
function _M.webhook(opts)
  check_sink_opts("outbox.webhook", opts)
  -- (a host, and no blank or control byte: the HTTP client raises on a
  -- URL that does not parse at each delivery, and every event would fail
  -- until dead-lettered)
  if type(opts.url) ~= "string" or not opts.url:match("^[Hh][Tt][Tt][Pp][Ss]?://[^/?#:]")
     or opts.url:find("[%s%c\127]") then
    error("outbox.webhook: opts.url must be an http(s) URL", 2)
  end
  -- (an array: a rotation, every one of them signs each delivery)
  local secret = secret_list(opts.secret)
  if not secret then
    error("outbox.webhook: opts.secret must be a non-empty string or an"
          .. " array of them", 2)
  end
  local http = require "paygate.http"
  -- (the host alone, for the line of a failed attempt: no user info, no
  -- path or query, where a credential may sit)
  local host = url_host(opts.url)
  -- (the scheme in lower case: the HTTP client takes http:// and https://
  -- alone, and HTTPS:// would raise at every delivery)
  local url = opts.url:gsub("^%a+", string.lower, 1)
  local timeout = opts.timeout or 10
  -- (checked here: the HTTP client refuses anything else at each
  -- delivery, and every event would fail until dead-lettered)
  if type(timeout) ~= "number" or not (timeout > 0 and timeout <= 86400)
  then
    error("outbox.webhook: opts.timeout must be a number of seconds, more"
          .. " than 0 and at most 86400", 2)
  end
  local extra = opts.headers or {}
  if type(extra) ~= "table" then
    error("outbox.webhook: opts.headers must be a table of name = value", 2)
  end
  for k, v in pairs(extra) do
    if type(k) ~= "string" or type(v) ~= "string" then
      error("outbox.webhook: opts.headers must map names to strings", 2)
    end
    -- (checked here, not at the first delivery: the HTTP client refuses
    -- them there, and every event would fail until dead-lettered)
    local bad = _M.header_problem(k, v)
    if bad == "name" then
      error("outbox.webhook: opts.headers: " .. ("%q"):format(k:sub(1, 64))
            .. " is not an HTTP header name", 2)
    elseif bad == "value" then
      error("outbox.webhook: opts.headers." .. k .. " must be a string"
            .. " without control characters (CR, LF, NUL...)", 2)
    end
    -- the ones the webhook sets itself: a second one in other letters
    -- would go out beside ours
    local lk = k:lower()
    if lk == "content-type" or lk == "paygate-signature"
       or lk == "paygate-event-id" or lk == "paygate-event-type" then
      error("outbox.webhook: opts.headers." .. k .. " is set by the"
            .. " webhook itself", 2)
    end
  end
  local function deliver(event)
    local body = webhook_body(event)
    local headers = {}
    for k, v in pairs(extra) do
      headers[k] = v
    end
    headers["Content-Type"] = "application/json"
    headers["Paygate-Signature"] = _M.sign_webhook(secret, body)
    headers["Paygate-Event-Id"] = string.format("%d", event.id)
    headers["Paygate-Event-Type"] = event.type
    -- The status is the answer. A 2xx's body is read only so that the
    -- connection can serve again (up to OK_BODY_MAX, then dropped), and a
    -- transfer that fails after a 2xx status -- a body that drips past
    -- the timeout, a reset -- is still delivered. Of another status's
    -- body only the first REASON_MAX bytes are read (a refusal's reason,
    -- for last_error and the log): a large one cannot fail a delivery.
    local head, kept, status, read = {}, 0, nil, 0
    local res, err = http.request{ method = "POST", url = url, body = body,
                                   headers = headers, timeout = timeout,
                                   ca_file = opts.ca_file,
                                   resolve = opts.resolve,
                                   on_headers = function(st)
                                     status = st
                                   end,
                                   sink = function(chunk)
                                     read = read + #chunk
                                     if status >= 200 and status < 300 then
                                       if read > OK_BODY_MAX then
                                         return false
                                       end
                                       return
                                     end
                                     if kept < REASON_MAX then
                                       local piece = chunk:sub(1,
                                         REASON_MAX - kept)
                                       head[#head + 1] = piece
                                       kept = kept + #piece
                                     end
                                     if kept >= REASON_MAX then
                                       return false
                                     end
                                   end }
    if not res and status then
      res = { status = status }        -- the answer came; its body did not
    end
    if not res then
      return nil, core.error("webhook_failed", "webhook: " .. tostring(err),
                             { retryable = true, cause = err.kind })
    end
    local s = res.status
    if s >= 200 and s < 300 then
      return true
    end
    -- the receiver's words, as printable text (its body is not ours to
    -- trust), trimmed first: a body's closing newline is no '?'
    local why = concat(head):gsub("^%s+", ""):gsub("%s+$", "")
                            :gsub("[^\32-\126]", "?")
    return nil, core.error("webhook_status", "webhook: answered " .. s
                           .. (why ~= "" and (": " .. why) or ""),
                           { status = s,
                             retryable = s >= 500 or RETRY_STATUS[s]
                                         or false })
  end
  return about({ name = opts.name or "webhook", deliver = deliver,
                  types = type_filter(opts.types) }, { host = host })
end

-- The error kinds of paygate.redis that no retry of an XADD fixes: the
-- key is no stream (constraint: WRONGTYPE), or the command itself is
-- refused (syntax). Every other failure is a state of the server -- down,
-- restarting, failing over, slow, busy, out of memory (OOM, which
-- paygate.redis calls not retryable: a retry at once meets the same full
-- server), short of the replicas min-replicas-to-write asks for
-- (NOREPLICAS), unable to persist (MISCONF) -- and is retried with the
-- dispatcher's backoff. Dead-lettering there would drop every event of
-- every subject for as long as it lasts, and let the later ones of a
-- subject go before them.
local REDIS_FATAL = { constraint = true, syntax = true }

-- syntax: sink = outbox.redis_stream(opts)
-- opts: client (a paygate.redis client) or url (connected on first use, in
--       the delivering worker, with redis.connect's options in connect:
--       { password = ... } for one kept out of the URL), stream (name, or
--       function(event) -> name;
--       default "paygate:events"), maxlen (approximate trim, optional),
--       name ("redis"), types
-- Each event is one entry: id, type, subject, created_at, payload (JSON).
-- A retry after a lost reply can add an entry twice: consumers dedupe by
-- the id field. Redis down, busy, slow, full or short of replicas is
-- retried; a command error (WRONGTYPE) dead-letters the event (see
-- REDIS_FATAL).
function _M.redis_stream(opts)
  check_sink_opts("outbox.redis_stream", opts)
  local redis = require "paygate.redis"
  if opts.client == nil and type(opts.url) ~= "string" then
    error("outbox.redis_stream: opts.client or opts.url is required", 2)
  end
  local stream = opts.stream or "paygate:events"
  if type(stream) ~= "string" and type(stream) ~= "function" then
    error("outbox.redis_stream: opts.stream must be a string or a function",
          2)
  end
  -- (NaN and inf passed a test of < 1: Redis refused every XADD, "value
  -- is not an integer", and each event was retried until dead)
  if opts.maxlen ~= nil and (type(opts.maxlen) ~= "number"
                             or not (opts.maxlen >= 1
                                     and opts.maxlen < 2 ^ 53)) then
    error("outbox.redis_stream: opts.maxlen must be a positive number", 2)
  end
  local client = opts.client
  -- Every failure but REDIS_FATAL's is retried, whether a command or the
  -- first connect met it: a password Redis refuses (config) at the
  -- connect of a new worker dead-lettered every event it tried, while the
  -- same refusal on a later command was retried.
  local function retryable(err)
    if type(err) == "table" and not REDIS_FATAL[err.kind]
       and err.retryable ~= true then
      -- a copy: paygate.redis may hand one error to several callers
      return core.error(err.kind, err.message,
                        { code = err.code, retryable = true })
    end
    return err
  end
  local function deliver(event)
    if not client then
      local c, err = redis.connect(opts.url, opts.connect)
      if not c then
        return nil, retryable(err)
      end
      client = c
    end
    local name = stream
    if type(stream) == "function" then
      name = stream(event)
      -- anything but a name shifted XADD's arguments: Redis refused it
      -- ("Invalid stream ID") and the event went dead with an error that
      -- did not point at the app's function. Retried: a fixed function
      -- (a reload) delivers it.
      if type(name) ~= "string" or name == "" then
        return nil, core.error("invalid_stream", "outbox.redis_stream: the"
          .. " stream function returned " .. (type(name) == "string"
          and "an empty string" or "a " .. type(name)) .. " for event "
          .. tostring(event.id) .. " (want a stream name)",
          { retryable = true })
      end
    end
    local args = { "XADD", name }
    if opts.maxlen then
      args[#args + 1] = "MAXLEN"
      args[#args + 1] = "~"
      args[#args + 1] = floor(opts.maxlen)
    end
    -- attempt: this delivery's number, a replay's counting on (as the
    -- webhook's); a consumer tells a redelivery from a first one by it
    for _, v in ipairs({ "*", "id", string.format("%d", event.id), "type",
                         event.type, "subject", event.subject, "created_at",
                         string.format("%.3f", event.created_at), "attempt",
                         string.format("%d", event.attempt or 1), "payload",
                         event.payload_json }) do
      args[#args + 1] = v
    end
    local res, err = client:call(unpack(args))
    if not res then
      return nil, retryable(err)
    end
    return true
  end
  return { name = opts.name or "redis", deliver = deliver,
           types = type_filter(opts.types) }
end

local HOOK_TIMEOUT = 10   -- s; a hook's (and a plain function sink's) limit

local function pack(...)
  return { n = select("#", ...), ... }
end

-- A sink's timeout: nil, or seconds that ev:wait accepts.
local function bad_timeout(t)
  return t ~= nil and not core.is_seconds(t)
end

-- An error as last_error's text: at most 500 bytes, valid UTF-8 without
-- control characters but tab and newline (PostgreSQL refuses invalid
-- UTF-8 and NUL in TEXT, and a cut must not split a character); anything
-- else becomes '?' (paygate.utf8.clean).
local function err_text(e)
  -- (a sink's error whose __tostring raises, or gives no string, must
  -- still fail its attempt: raised here, the round would end without the
  -- outcome, and the row would be tried again at once, with no backoff)
  local ok, s = pcall(tostring, e)
  if not ok or type(s) ~= "string" then
    return "(an error that cannot be shown)"
  end
  return (utf8_clean(s, 500, true))
end

-- A hook's results as the dispatcher reads them. `return nil, err` whose
-- err is nil (a misspelt or unset variable: `return nil, er`) is a
-- failure with no error, not a success: it was read as done, and the
-- event was lost without a word. Its error names the hook's function by
-- where it is defined (its return cannot be located).
-- A bare `return false` is a failure too, and its last_error names the
-- hook the same way (was: "returned false", no hook named).
-- A frame's or a function's file as its author names it (debug.getinfo's
-- "S" info: a chunk loaded from a file is "@path").
local function source_of(info)
  return info.source:sub(1, 1) == "@" and info.source:sub(2)
         or info.short_src
end

local function hook_where(fn)
  local info = debug.getinfo(fn, "S")
  return source_of(info) .. ":" .. tostring(info.linedefined)
end

local function hook_result(fn, event, ...)
  local r, e = ...
  if r == nil and e == nil and select("#", ...) >= 2 then
    return nil, core.error("no_error", "the hook for " .. event.type
      .. " (" .. hook_where(fn) .. ") returned"
      .. " nil and a nil error: an error value that is nil (a misspelt or"
      .. " unset variable in return nil, err?); retried",
      { retryable = true })
  end
  if r == false and e == nil then
    return false, core.error("hook_failed", "the hook for " .. event.type
      .. " (" .. hook_where(fn) .. ") returned false; retried",
      { retryable = true })
  end
  return ...
end

-- syntax: sink = outbox.hooks(map [, opts])
-- map: event type -> function(event) ("*" matches any type). A hook fails
-- by returning false or nil, err (nil, nil too: a nil err), or by
-- raising; returning nothing counts as done. Events with no hook are done
-- at once.
-- opts: name ("hooks"), timeout (s, 10): a hook still running then is
-- cancelled where it waits, and the attempt fails (kind timeout, retried).
--   outbox.hooks{ ["payment.paid"] = on_paid,
--                 ["refund.succeeded"] = on_refunded }
function _M.hooks(map, opts)
  if type(map) ~= "table" then
    error("outbox.hooks: map must be a table of event type -> function", 2)
  end
  for k, v in pairs(map) do
    if type(k) ~= "string" or type(v) ~= "function" then
      error("outbox.hooks: map must be a table of event type -> function",
            2)
    end
  end
  opts = opts or {}
  check_sink_opts("outbox.hooks", opts)
  local timeout = opts.timeout or HOOK_TIMEOUT
  if bad_timeout(timeout) then
    error("outbox.hooks: opts.timeout must be a positive number of seconds"
          .. " (at most 1e8)", 2)
  end
  local name = opts.name or "hooks"
  local function deliver(event)
    local fn = map[event.type] or map["*"]
    if not fn then
      return true
    end
    return hook_result(fn, event, fn(event))
  end
  -- (for the dispatcher: a type without a hook is done at once, no task)
  local function hooked(etype)
    return (map[etype] or map["*"]) ~= nil
  end
  -- (for the line of a failed attempt: the hook that failed)
  local function hook_of(etype)
    return map[etype] or map["*"]
  end
  return about({ name = name, deliver = deliver, timeout = timeout,
                  hooked = hooked }, { hook_of = hook_of })
end

----------------------------------------------------------- dispatcher

local Dispatcher = {}
Dispatcher.__index = Dispatcher
_M.Dispatcher = Dispatcher

local function normalize_sinks(sinks)
  if type(sinks) ~= "table" or #sinks == 0 then
    error("outbox.dispatcher: opts.sinks must be a non-empty array", 3)
  end
  local out, names = {}, {}
  for i, s in ipairs(sinks) do
    if type(s) == "function" then
      -- (a hook: its failed attempts are logged naming it, as a hooks
      -- sink's are)
      local fn = s
      s = about({ name = "sink" .. i, deliver = fn, timeout = HOOK_TIMEOUT },
                { hook_of = function() return fn end })
    end
    if type(s) ~= "table" or type(s.deliver) ~= "function"
       or type(s.name) ~= "string" or s.name == ""
       or s.name:find(",", 1, true) then
      error("outbox.dispatcher: opts.sinks[" .. i .. "] must be a function"
            .. " or a { name, deliver } table", 3)
    end
    if bad_timeout(s.timeout) then
      error("outbox.dispatcher: opts.sinks[" .. i .. "].timeout must be a"
            .. " positive number of seconds (at most 1e8)", 3)
    end
    if names[s.name] then
      error("outbox.dispatcher: two sinks are named " .. s.name, 3)
    end
    names[s.name] = true
    out[i] = s
  end
  return out
end

-- syntax: d = outbox.dispatcher(db, opts)
-- opts: sinks (required), and any of DEFAULTS above; now (function ->
--       seconds: due times, delivered_at, pruning; leases keep the real
--       clock) and random (function -> [0, 1)) for tests; prune = false
--       leaves pruning to paygate.retention (retention.outbox)
-- returns: a dispatcher; d:start() runs it in its own task, d:step() runs
--          one round (returns the number of events attempted), d:stop()
--          stops it and releases its leases, d.stats counts outcomes.
function _M.dispatcher(db, opts)
  check_db("outbox.dispatcher", db)
  if type(opts) ~= "table" then
    error("outbox.dispatcher: opts must be a table", 2)
  end
  local d = { db = db, sinks = normalize_sinks(opts.sinks), leases = {},
              owner = lease.owner(), sink_tasks = {},
              probe_at = {}, queued = {}, recording = false,
              now = opts.now or core.time, random = opts.random
                or math.random, next_prune = 0,
              stats = { delivered = 0, failed = 0, dead = 0, fenced = 0,
                        rounds = 0, pruned = 0, errors = 0 } }
  for k, v in pairs(DEFAULTS) do
    local o = opts[k]
    if o == nil then
      d[k] = v
    elseif k == "name" then
      local _, why = _M.check_name(o)
      if why then
        error("outbox.dispatcher: opts.name " .. why, 2)
      end
      d[k] = o
    else
      -- (at most 1e8: the longest sleep the runtime takes; past it the
      -- dispatcher's task would end on its first wait)
      if not core.is_seconds(o) then
        error("outbox.dispatcher: opts." .. k .. " must be a positive"
              .. " number (at most 1e8)", 2)
      end
      d[k] = o
    end
  end
  for k in pairs(opts) do
    if DEFAULTS[k] == nil and k ~= "sinks" and k ~= "now" and k ~= "random"
       and k ~= "max_partitions" and k ~= "prune" then
      error("outbox.dispatcher: unknown option opts." .. k, 2)
    end
  end
  local mp = opts.max_partitions
  if mp ~= nil and (type(mp) ~= "number" or mp < 1 or mp % 1 ~= 0) then
    error("outbox.dispatcher: opts.max_partitions must be a positive"
          .. " integer", 2)
  end
  if d.partitions % 1 ~= 0 then
    error("outbox.dispatcher: opts.partitions must be a positive integer", 2)
  end
  d.max_partitions = mp or d.partitions
  if opts.prune ~= nil and type(opts.prune) ~= "boolean" then
    error("outbox.dispatcher: opts.prune must be a boolean", 2)
  end
  d.prune = opts.prune ~= false    -- false: paygate.retention prunes
  return setmetatable(d, Dispatcher)
end

local function log_warn(msg, fields)
  log_at("warn", msg, fields)
end

local function lease_key(self, p)
  return "outbox:" .. self.name .. ":" .. self.partitions .. ":" .. p
end

local function prune_key(self)
  return "outbox:" .. self.name .. ":prune"
end

local function shuffled(n, random)
  local t = {}
  for i = 1, n do
    t[i] = i - 1
  end
  for i = n, 2, -1 do
    local j = floor(random() * i) + 1
    t[i], t[j] = t[j], t[i]
  end
  return t
end

-- Renews held leases past half their life and drops lost ones. Takes
-- free shards up to max_partitions every round; past that cap it probes a
-- shard at most every PROBE_ROUNDS intervals, so a shard whose holder died
-- (or that nobody under the cap wants) is still served. A shard held past
-- the cap is given back after lease_ttl, so a dispatcher under its cap
-- (one that started later) picks it up within a round.
local PROBE_ROUNDS = 3

-- The shard leases' ttl, measured (paygate.lease): a delivery starts
-- with at least half of it left (deliver_row renews past half), so it is
-- twice p99.9 x 1.5 of the recent deliveries' durations (sinks + commit,
-- recorded across this host's workers), within lease_ttl ..
-- lease_ttl_max; lease_ttl until 20 deliveries were measured.
local function measured_name(self)
  return "outbox:" .. self.name .. ":delivery"
end

function Dispatcher:lease_ttl_now()
  return (lease.ttl_for(measured_name(self), {
    floor = self.lease_ttl, initial = self.lease_ttl,
    ceiling = max(self.lease_ttl, self.lease_ttl_max), margin = 3 }))
end

local function renew(self, l)
  local ttl = self:lease_ttl_now()
  local ok, err = lease.renew(self.db, l, ttl)
  if ok then
    l.ttl = ttl
  end
  return ok, err
end

-- returns: true when taken; false, err when the store failed (a shard
-- someone else holds is no failure: false)
local function take(self, p, now)
  local l, err = lease.acquire(self.db, lease_key(self, p),
                               self:lease_ttl_now(), { owner = self.owner })
  if l then
    l.since = now
    self.leases[p] = l
    return true
  elseif err.kind ~= "held" then
    self.stats.errors = self.stats.errors + 1
    return false, err
  end
  return false
end

-- paygate_outbox_shards{outbox, pid}: the shards each worker's dispatcher
-- holds now (set every round, removed by d:stop()), so an operator sees
-- how the shards spread over the instances and workers.
local shards_gauge
local function shards_metric()
  if shards_gauge == nil then
    local ok, m = pcall(require, "paygate.metrics")
    shards_gauge = ok and type(m) == "table" and m.gauge(
      "paygate_outbox_shards", "Outbox shards this worker's dispatcher "
      .. "holds the lease of, per outbox.") or false
  end
  return shards_gauge or nil
end

-- (pcall: a gauge raises on labels over its limit -- a very long outbox
-- name -- and a metric must never stop deliveries)
local function publish_shards(self, held)
  local g = shards_metric()
  if g then
    local labels = { outbox = self.name, pid = tostring(core.pid()) }
    if held == nil then
      pcall(g.remove, g, labels)
    else
      pcall(g.set, g, held, labels)
    end
  end
end

-- paygate_outbox_events_total{outbox, outcome}: the outcomes of the
-- deliveries, summed over the workers: delivered, failed (to be retried),
-- dead, fenced (dropped: the lease moved on) and unrecorded (dropped: the
-- store failed), so an operator can alert on dead letters and on a store
-- that refuses the outcomes without reading the log.
local events_counter
local function events_metric()
  if events_counter == nil then
    local ok, m = pcall(require, "paygate.metrics")
    local cok, c
    if ok and type(m) == "table" and m.counter then
      cok, c = pcall(m.counter, "paygate_outbox_events_total",
        "Outbox deliveries by outcome: delivered, failed (retried later),"
        .. " dead, fenced, unrecorded (the store failed).",
        { "outbox", "outcome" }, { max_series = 64 })
    end
    events_counter = cok and c or false
  end
  return events_counter or nil
end

-- every outcome of a dispatcher's outbox has a series from its start, at
-- 0: one that appeared with its first count (the first dead letter) shows
-- Prometheus no increase, and an alert on it did not fire
local OUTCOMES = { "delivered", "failed", "dead", "fenced", "unrecorded" }
local function init_outcomes(self)
  local c = events_metric()
  if c then
    for _, outcome in ipairs(OUTCOMES) do
      pcall(c.inc, c, { outbox = self.name, outcome = outcome }, 0)
    end
  end
end

local function count_outcome(self, outcome)
  local c = events_metric()
  if c then
    pcall(c.inc, c, { outbox = self.name, outcome = outcome })
  end
end

-- Renews the held leases when half spent (every one with probe: after
-- an outcome the store failed to write, whether it takes writes again),
-- drops those found lost, and takes free partitions. returns: the first
-- renewal's error other than "lost", or nil.
local function refresh_leases(self, probe)
  local now = core.mono()            -- since, probe_at: durations
  local held, failed = 0, nil
  for p, l in pairs(self.leases) do
    if l.extra and now - l.since > self.lease_ttl then
      self.leases[p] = nil
      self.probe_at[p] = now + PROBE_ROUNDS * self.interval
      lease.release(self.db, l)
    elseif probe or lease.remaining(l) < l.ttl / 2 then
      local ok, err = renew(self, l)
      if not ok and err.kind == "lost" then
        self.leases[p] = nil
      elseif not ok then
        failed = failed or err
      end
    end
    if self.leases[p] then
      held = held + 1
    end
  end
  -- (a store that fails fails every shard alike: one line a round, not
  -- one per shard)
  local take_err, take_failed = nil, 0
  for _, p in ipairs(shuffled(self.partitions, self.random)) do
    if not self.leases[p] then
      if held < self.max_partitions then
        local ok, err = take(self, p, now)
        if ok then
          held = held + 1
        elseif err then
          take_err, take_failed = take_err or err, take_failed + 1
        end
      else
        local at = self.probe_at[p]
        if not at then
          self.probe_at[p] = now + PROBE_ROUNDS * self.interval
        elseif now >= at then
          self.probe_at[p] = now + PROBE_ROUNDS * self.interval
          local ok, err = take(self, p, now)
          if ok then
            self.leases[p].extra = true
            held = held + 1
          elseif err then
            take_err, take_failed = take_err or err, take_failed + 1
          end
        end
      end
    end
  end
  if take_err then
    log_warn("outbox: lease", { error = tostring(take_err),
                                shards = take_failed })
  end
  publish_shards(self, held)
  return failed
end

-- (each [true] reads prior_attempts, [false] a 0 in its place: a table
-- whose column is deferred)
local PRIOR = { [true] = "prior_attempts", [false] = "0 AS prior_attempts" }

local HEADS, HEADS_ALL = {}, {}
for has, col in pairs(PRIOR) do
  HEADS[has] = "SELECT id, subject, type, payload, attempts, " .. col .. ","
    .. " created_at, sinks_done FROM paygate_outbox o WHERE state ="
    .. " 'pending' AND shard % $1 = $2 AND next_at <= $3 AND NOT EXISTS"
    .. " (SELECT 1 FROM paygate_outbox e WHERE e.state = 'pending'"
    .. " AND e.subject = o.subject AND e.id < o.id) ORDER BY id LIMIT $4"
  -- The heads of every shard at once (a dispatcher holding all of them):
  -- one scan of the pending rows instead of one per shard, each of which
  -- read past the other shards' rows; the rows are split by shard after.
  HEADS_ALL[has] = "SELECT id, subject, type, payload, attempts, " .. col
    .. ", created_at, sinks_done, shard FROM paygate_outbox o"
    .. " WHERE state = 'pending'"
    .. " AND next_at <= $1 AND NOT EXISTS (SELECT 1"
    .. " FROM paygate_outbox e WHERE e.state = 'pending'"
    .. " AND e.subject = o.subject AND e.id < o.id) ORDER BY id LIMIT $2"
end

local MARK_DONE = "UPDATE paygate_outbox SET state = 'delivered',"
  .. " delivered_at = $2, attempts = attempts + 1, sinks_done = $3,"
  .. " last_error = NULL WHERE id = $1 AND state = 'pending'"

local MARK_FAIL = "UPDATE paygate_outbox SET state = $2, next_at = $3,"
  .. " attempts = attempts + 1, sinks_done = $4, last_error = $5"
  .. " WHERE id = $1 AND state = 'pending'"

local function split_set(s)
  local set = {}
  for name in (s or ""):gmatch("[^,]+") do
    set[name] = true
  end
  return set
end

local function join_set(set)
  local t = {}
  for name in pairs(set) do
    t[#t + 1] = name
  end
  table.sort(t)
  return concat(t, ",")
end

-- The outcomes of deliveries are recorded in batches. A delivery queues
-- its outcome and, unless another task is already recording, records
-- everything queued: one write job (db:atomic) per JOB_MAX statements,
-- whatever the shards, each shard's marks behind the lease.guard of its
-- fencing token, so a round of N deliveries costs a few jobs (on SQLite
-- they join the group commit) instead of N transactions, or one per shard.
-- A guard that fails (a newer token was issued: the shard moved on) fails
-- the job; that shard's outcomes are then dropped (fenced) and the rest
-- written again; so is an outcome whose own statement failed.
-- A recorder keeps going until the queue is empty, so when a round's
-- deliveries have returned, all their outcomes are recorded (the next
-- round's heads must not include a delivered row).
local function record_done(self, g, ok, err, fenced)
  local stats = self.stats
  local name = measured_name(self)
  local p, token = g.p, g.token
  local now = core.mono()
  for _, o in ipairs(g) do
    lease.measure(name, now - o.started)
    count_outcome(self, ok and o.outcome
                        or (fenced and "fenced" or "unrecorded"))
    if ok then
      stats[o.outcome] = stats[o.outcome] + 1
      if o.outcome == "dead" then
        -- (subject: the payment, so an operator finds what the event was
        -- about; sinks: the ones it did not reach, which a replay sends
        -- it to)
        -- (id a string, as every log line's id is: one type per field)
        log_warn("outbox: dead letter", { id = tostring(o.row.id),
                                          type = o.row.type,
                                          subject = o.row.subject,
                                          sinks = o.owed,
                                          error = concat(o.errs, "; "),
                                          reason = o.why,
                                          hint = o.why == "not_retryable"
                                            and NOT_RETRYABLE_HINT or nil,
                                          attempts = o.attempts,
                                          max_attempts = self.max_attempts })
      end
    else
      if fenced then
        stats.fenced = stats.fenced + 1
      else
        stats.errors = stats.errors + 1
        self.unrecorded = true        -- the next round probes first
      end
      log_warn("outbox: outcome not recorded", { id = tostring(o.row.id),
        error = fenced and ("fenced: lease " .. lease_key(self, p)
                            .. ": token " .. tostring(token)
                            .. " is no longer the newest")
                or tostring(err) })
    end
  end
  if fenced and self.leases[p] == g[1].l then
    self.leases[p] = nil
  end
end

-- Statements per recording job (db:atomic takes up to 1000): a pass
-- with more outcomes is written in several jobs, and a shard with more
-- than fit in one is split, each part behind its own guard.
local JOB_MAX = 500

-- Writes one job of parts (each { p, token, outcome... }). A guard that
-- fails drops its part (fenced, or the store's error on it); a mark that
-- fails (err.index names it) drops that outcome alone; the rest is
-- written again. A failure of the whole job fails every part.
local function record_job(self, parts)
  local db = self.db
  while parts[1] ~= nil do
    local stmts, first = {}, {}
    for pi, part in ipairs(parts) do
      first[pi] = #stmts + 1               -- the index of its guard
      stmts[#stmts + 1] = lease.guard(db, lease_key(self, part.p),
                                      part.token)
      for _, o in ipairs(part) do
        stmts[#stmts + 1] = o.mark
      end
    end
    local ok, err = db:atomic(stmts)
    if ok then
      for _, part in ipairs(parts) do record_done(self, part, true) end
      return
    end
    local index = type(err) == "table" and err.index or nil
    local pi_bad
    if type(index) == "number" then
      for pi = #parts, 1, -1 do
        if first[pi] <= index then
          pi_bad = pi
          break
        end
      end
    end
    if not pi_bad then
      for _, part in ipairs(parts) do record_done(self, part, false, err) end
      return
    end
    local part = parts[pi_bad]
    if index == first[pi_bad] then
      record_done(self, part, false, err, lease.fenced(err))
      table.remove(parts, pi_bad)
    else
      local o = table.remove(part, index - first[pi_bad])
      record_done(self, { p = part.p, token = part.token, o }, false, err)
      if part[1] == nil then
        table.remove(parts, pi_bad)
      end
    end
  end
end

local function record_groups(self, order)
  local parts, part = {}, nil
  for _, g in ipairs(order) do
    part = nil
    for _, o in ipairs(g) do
      if not part or #part >= JOB_MAX - 1 then
        part = { p = g.p, token = g.token }
        parts[#parts + 1] = part
      end
      part[#part + 1] = o
    end
  end
  local i = 1
  while i <= #parts do
    local job, n = {}, 0
    while i <= #parts and n + #parts[i] + 1 <= JOB_MAX do
      job[#job + 1] = parts[i]
      n = n + #parts[i] + 1
      i = i + 1
    end
    record_job(self, job)
  end
end

local function record_queued(self)
  if self.recording then
    return
  end
  self.recording = true
  while self.queued[1] ~= nil do
    local q = self.queued
    self.queued = {}
    local groups, order = {}, {}
    for _, o in ipairs(q) do
      local k = o.p .. ":" .. tostring(o.token)
      local g = groups[k]
      if not g then
        g = { p = o.p, token = o.token }
        groups[k] = g
        order[#order + 1] = g
      end
      g[#g + 1] = o
    end
    record_groups(self, order)
  end
  self.recording = false
end

-- One warn line per attempt a sink failed by returning its failure
-- (false, or nil, err: a webhook's refusing status or transport error, a
-- Redis error, a hook's own failure) -- a sink that raises or times out
-- has its own line -- the same for every sink: the sink, the event, the
-- attempt and the error's text (as last_error keeps it); a hook's also
-- names the hook (where it is defined), a webhook's its URL's host, and
-- an error with a status (a webhook's answer) that status. Bounded per
-- sink (and hook) by paygate.log.limiter (10 a minute, then a count): a
-- receiver down for a whole backlog must not flood the log. (Was: a line
-- for a hook's failure only; a webhook answering 500 or refused, a Redis
-- stream down, had none, only last_error and the failed count, until the
-- event was dead-lettered, hours later.)
local failed_log
local function log_failed(sink, event, err)
  if failed_log == nil then
    local ok, paygate = pcall(require, "paygate")
    failed_log = ok and paygate.log and paygate.log.limiter(
      "outbox: a sink failed (the attempt failed)") or false
  end
  if not failed_log then
    return
  end
  local about_it = sink_about[sink] or {}
  local key = { sink = sink.name }
  local fn = about_it.hook_of and about_it.hook_of(event.type)
  if fn then
    key.hook = hook_where(fn)
  end
  -- (a webhook's refusal: its status; read raw, as an app's error table
  -- may hold anything)
  local status = type(err) == "table" and rawget(err, "status") or nil
  failed_log:warn(key, { id = tostring(event.id), type = event.type,
    subject = event.subject, attempt = event.attempt,
    error = err_text(err), host = about_it.host,
    status = type(status) == "number" and status or nil })
end

-- A sink's results as deliver_logged returns them: a failure it returned
-- (as deliver_row reads one) is logged first.
local function failure_logged(sink, event, ok, r, e, ...)
  if ok and (r == false or (r == nil and e ~= nil)) then
    log_failed(sink, event, e or "returned false")
  end
  return ok, r, e, ...
end

-- sink.deliver(event) as pcall runs it; one that raises (a bug in a
-- hook, or a hook raising to be retried) is logged where it raised, with
-- its traceback: the attempt fails and is retried like any failure, and
-- last_error keeps the message only. (Was: no line at all until the
-- event was dead-lettered, hours later, and the stack nowhere.) One that
-- returns its failure is logged by log_failed.
local function deliver_logged(sink, event)
  return failure_logged(sink, event, xpcall(sink.deliver, function(e)
    log_at("warn", "outbox: sink " .. sink.name .. " raised (the attempt"
      .. " failed; retried with backoff)", { id = tostring(event.id),
      type = event.type, subject = event.subject, attempt = event.attempt,
      sink = sink.name, error = debug.traceback(err_text(e), 2) })
    return e
  end, event))
end

-- This file's folder (".../lua/paygate/"): frames under it are the
-- library's, not the app's.
local LIB_DIR = debug.getinfo(1, "S").source:match("^@(.*/)") or ""

-- Where a suspended coroutine waits, as the app wrote it: the innermost
-- frame that is Lua and not paygate's own (a hook waiting in
-- paygate.http.request is at its own line, not inside http.lua), else the
-- innermost Lua frame; nil when it has none.
local function waiting_at(co)
  local first
  for level = 0, 100 do
    local info = debug.getinfo(co, level, "Sl")
    if not info then break end
    if info.what ~= "C" and info.currentline and info.currentline > 0 then
      local src = source_of(info)
      local at = src .. ":" .. info.currentline
      first = first or at
      if LIB_DIR == "" or src:sub(1, #LIB_DIR) ~= LIB_DIR then
        return at
      end
    end
  end
  return first
end

-- Runs sink.deliver(event) as pcall would (deliver_logged). With
-- sink.timeout (a hook's), in a task of its own: still running after that
-- many seconds, the task is cancelled where it waits (d:stop() cancels it
-- too) and the attempt fails with kind timeout, so a hung hook costs one
-- attempt, not the round and the shard's lease. Each such attempt is
-- logged with where the hook waited (its traceback), and last_error names
-- that line: the dead letter's "timeout" alone did not say which call
-- hung. A deliver that returned without ever waiting, after more than its
-- timeout, cannot have been cancelled: it held the worker's loop all that
-- time, which is logged too (it succeeded or failed as it returned).
local function call_sink(self, sink, event)
  -- (a hooks sink with no hook for this type: its deliver returns true
  -- at once, so it cannot time out and needs no task of its own)
  if not sink.timeout or (sink.hooked and not sink.hooked(event.type)) then
    return deliver_logged(sink, event)
  end
  local res, co
  local done = core.event()
  local started = core.mono()
  local task = core.spawn(function()
    co = coroutine.running()
    res = pack(deliver_logged(sink, event))
    done:set()
  end)
  if res then
    local took = core.mono() - started
    if took > sink.timeout then
      log_at("warn", "outbox: sink " .. sink.name .. " ran "
        .. ("%.1f"):format(took) .. " s without yielding, past its "
        .. sink.timeout .. " s timeout: it blocked the worker all that"
        .. " time (a busy loop, or a call that blocks instead of waiting)",
        { id = tostring(event.id), type = event.type,
          subject = event.subject,
          attempt = event.attempt, sink = sink.name,
          seconds = floor(took * 1000 + 0.5) / 1000 })
    end
    return unpack(res, 1, res.n)
  end
  self.sink_tasks[task] = true
  done:wait(sink.timeout)
  self.sink_tasks[task] = nil
  if res then
    return unpack(res, 1, res.n)
  end
  local at, tb = co and waiting_at(co), co and debug.traceback(co)
  co = nil
  pcall(task.cancel, task)
  log_at("warn", "outbox: sink " .. sink.name .. " timed out (no answer"
    .. " within " .. sink.timeout .. " s; cancelled where it waited"
    .. (at and ", " .. at or "") .. "; retried with backoff)",
    { id = tostring(event.id), type = event.type, subject = event.subject,
      attempt = event.attempt, sink = sink.name, waiting_at = at,
      error = tb })
  return true, nil, core.error("timeout", "no answer within "
                               .. sink.timeout .. " s (cancelled"
                               .. (at and " at " .. at or "") .. ")",
                               { retryable = true })
end

-- syntax: yes = d:wants(type)
-- Whether a sink of this dispatcher delivers events of this type: false
-- when every sink leaves it out (a webhook's or stream's `types`, a hooks
-- sink without a hook for it). An event enqueued with settled = not
-- d:wants(type) costs no dispatch round, no delivery and no mark.
-- (Every dispatcher of the outbox should have the same sinks: any of them
-- may deliver any shard.)
function Dispatcher:wants(etype)
  if type(etype) ~= "string" then
    error("outbox: d:wants(type): type must be a string", 2)
  end
  for _, sink in ipairs(self.sinks) do
    if (not sink.types or sink.types[etype])
       and not (sink.hooked and not sink.hooked(etype)) then
      return true
    end
  end
  return false
end

-- Delivers one head to every sink that has not had it yet and records
-- the outcome under the shard's fencing token. The lease is renewed here
-- too once half of it is gone (a round of slow sinks can outlast it).
local function deliver_row(self, row, p, l)
  -- Not enough lease left for a delivery to finish: leave it to the next
  -- round (after a renewal) rather than race a new holder.
  if lease.remaining(l) < l.ttl / 2 and not l.renewing then
    l.renewing = true
    local ok, err = renew(self, l)
    if not ok and err.kind == "lost" and self.leases[p] == l then
      self.leases[p] = nil
    end
    l.renewing = false
  end
  if self.leases[p] ~= l or lease.remaining(l) < l.ttl / 4 then
    return false
  end
  local started = core.mono()
  local payload, jerr = json.decode(row.payload)
  local event = { id = row.id, subject = row.subject, type = row.type,
                  payload = payload, payload_json = row.payload,
                  created_at = row.created_at,
                  -- every delivery of the event counts, a replay's too
                  attempt = row.prior_attempts + row.attempts + 1 }
  local done = split_set(row.sinks_done)
  local errs, fatal = {}, false
  if payload == nil then
    errs[1] = "payload: " .. tostring(jerr)
    fatal = true
  else
    for _, sink in ipairs(self.sinks) do
      if not done[sink.name]
         and (not sink.types or sink.types[event.type]) then
        local ok, r, e = call_sink(self, sink, event)
        if ok and r ~= false and not (r == nil and e ~= nil) then
          done[sink.name] = true
        else
          local cause = ok and (e or "returned false") or r
          errs[#errs + 1] = sink.name .. ": " .. err_text(cause)
          if type(cause) == "table" and cause.retryable == false then
            fatal = true
          end
        end
      end
    end
  end
  local outcome, mark, why, owed
  local now = self.now()
  if #errs == 0 then
    outcome = "delivered"
    mark = { MARK_DONE, { row.id, now, join_set(done) } }
  else
    local attempts = row.attempts + 1
    local state, next_at = "pending", now
    if fatal or attempts >= self.max_attempts then
      state, outcome = "dead", "dead"
      -- the dead letter's line says which: a sink's error with retryable
      -- = false (paygate.error's default) dead-letters at the first
      -- attempt, which read like a dispatcher that never retried
      why = payload == nil and "bad_payload"
            or fatal and "not_retryable" or "max_attempts"
      local left = {}
      for _, sink in ipairs(self.sinks) do
        if not done[sink.name]
           and (not sink.types or sink.types[event.type]) then
          left[#left + 1] = sink.name
        end
      end
      owed = concat(left, ",")
    else
      outcome = "failed"
      next_at = now + _M.backoff(attempts, self.backoff_base,
                                 self.backoff_cap, self.random)
    end
    mark = { MARK_FAIL, { row.id, state, next_at, join_set(done),
                          concat(errs, "; ") } }
  end
  local q = self.queued
  q[#q + 1] = { row = row, p = p, l = l, token = l.token, mark = mark,
                outcome = outcome, errs = errs, started = started,
                attempts = row.attempts + 1, why = why, owed = owed }
  record_queued(self)
  return true
end

-- The backlog in one statement, each part over a partial index: the
-- pending rows (paygate_outbox_pending, counted from the index alone),
-- the oldest of them (its first entry: ids grow with created_at, and a
-- replayed event keeps its id and its created_at) and the dead ones
-- (paygate_outbox_dead).
local BACKLOG = "SELECT (SELECT COUNT(*) FROM paygate_outbox WHERE state ="
  .. " 'pending') AS pending, (SELECT created_at FROM paygate_outbox"
  .. " WHERE state = 'pending' ORDER BY id LIMIT 1) AS oldest_at,"
  .. " (SELECT COUNT(*) FROM paygate_outbox WHERE state = 'dead') AS dead"

-- syntax: b, err = outbox.backlog(db)
-- returns: { pending = events not delivered yet (due, or waiting for a
--          retry), oldest_at = the created_at of the oldest of them (nil:
--          none), dead = dead letters not replayed }
-- yields: one query
function _M.backlog(db)
  check_db("outbox.backlog", db)
  local rows, err = db:query(BACKLOG)
  if not rows then
    return nil, err
  end
  local r = rows[1] or {}
  return { pending = tonumber(r.pending) or 0,
           oldest_at = tonumber(r.oldest_at), dead = tonumber(r.dead) or 0 }
end

-- paygate_outbox_pending_events{outbox}, ..._oldest_pending_age_seconds
-- and paygate_outbox_dead_events: the table's backlog, read by every
-- dispatcher each backlog_interval. The table is one for all the workers
-- (and instances) of a store, so each reads the same numbers: a gauge
-- with no pid label, shown once with the value of the worker that set
-- it last (never summed over the workers, which would count each event
-- once per worker).
local backlog_gauges
local function backlog_metrics()
  if backlog_gauges == nil then
    local ok, m = pcall(require, "paygate.metrics")
    backlog_gauges = ok and type(m) == "table" and {
      pending = m.gauge("paygate_outbox_pending_events", "Outbox events"
        .. " not delivered yet (due, or waiting for a retry), per outbox."),
      age = m.gauge("paygate_outbox_oldest_pending_age_seconds", "Seconds"
        .. " since the oldest undelivered outbox event was enqueued (0:"
        .. " none), per outbox."),
      dead = m.gauge("paygate_outbox_dead_events", "Outbox events"
        .. " dead-lettered and not replayed, per outbox."),
    } or false
  end
  return backlog_gauges or nil
end

-- Reads the backlog and sets the gauges (a read that fails leaves them
-- as they were: the store's failure is paygate_store_errors_total's to
-- say). stop: removes them (d:stop()). pcall: a metric must never
-- stop deliveries.
local function publish_backlog(self, stop)
  local g = backlog_metrics()
  if not g then
    return
  end
  local labels = { outbox = self.name }
  if stop then
    for _, gauge in pairs(g) do
      pcall(gauge.remove, gauge, labels)
    end
    return
  end
  local b = _M.backlog(self.db)
  if b then
    local age = b.oldest_at and max(0, self.now() - b.oldest_at) or 0
    pcall(g.pending.set, g.pending, b.pending, labels)
    pcall(g.age.set, g.age, age, labels)
    pcall(g.dead.set, g.dead, b.dead, labels)
  end
end

-- syntax: n = d:step()
-- One round: leases, then the due heads of every held shard, delivered
-- with at most `concurrency` in flight; prunes when due. Returns the
-- number of heads attempted (not one left for a later round because its
-- shard's lease had too little time left).
-- yields
function Dispatcher:step()
  -- (prior_attempts deferred: tried again every UPGRADE_RETRY s)
  if not ready[self.db] and (not deferred[self.db]
                             or self.now() >= (self.upgrade_at or 0)) then
    local ok, err = ensure_schema(self.db, true)
    if not ok then
      self.stats.errors = self.stats.errors + 1
      return 0, err
    end
    if not ready[self.db] then
      self.upgrade_at = self.now() + UPGRADE_RETRY
    end
  end
  local prior = ready[self.db] == true
  self.stats.rounds = self.stats.rounds + 1
  -- (a round that raised may have left the recorder's flag set; what it
  -- queued is recorded with this round's)
  self.recording = false
  -- An outcome the store failed to write (disk full, a read-only standby,
  -- a lock held elsewhere) left its event pending and due: delivered
  -- again while the store still refuses writes, each delivery was one
  -- more duplicate for the receivers, its outcome lost the same way
  -- (every round, up to every 10 s, for as long as the lease lasted). So
  -- after one, rounds deliver nothing until a write goes through: every
  -- held lease is renewed (a fenced write each, due soon anyway) as the
  -- probe. The failed round counts as an error: start()'s pause keeps
  -- doubling.
  local werr = refresh_leases(self, self.unrecorded)
  if self.unrecorded then
    if werr then
      self.stats.errors = self.stats.errors + 1
      log_warn("outbox: the store refuses writes: deliveries paused until"
               .. " it takes them", { error = tostring(werr) })
      return 0, werr
    end
    self.unrecorded = false
  end
  local now = self.now()
  local held = 0
  for _ in pairs(self.leases) do
    held = held + 1
  end
  -- each held shard's heads, at most `batch` of them, in id order
  -- (and the lease they were read under)
  local heads, order = {}, {}
  local function add(p, rows, l)
    if not heads[p] then order[#order + 1] = p end
    heads[p] = { rows = rows, l = l }
  end
  local head_err, head_failed = nil, 0
  local function shard_heads(p, l)
    local rows, qerr = self.db:query(HEADS[prior], { self.partitions, p,
                                                     now, self.batch })
    if not rows then
      self.stats.errors = self.stats.errors + 1
      head_err, head_failed = head_err or qerr, head_failed + 1
      return
    end
    if rows[1] ~= nil then add(p, rows, l) end
  end
  if held > 1 and held == self.partitions then
    -- every shard: one query, at most `batch` heads kept per shard (the
    -- first ones in id order, as the query of that shard alone returns)
    local limit = self.batch * held
    local rows, qerr = self.db:query(HEADS_ALL[prior], { now, limit })
    if not rows then
      self.stats.errors = self.stats.errors + 1
      log_warn("outbox: heads", { error = tostring(qerr) })
    else
      local per = {}
      for _, row in ipairs(rows) do
        local p = tonumber(row.shard) % self.partitions
        local l = self.leases[p]
        if l then
          local got = per[p] or {}
          if #got < self.batch then
            row.shard = nil
            got[#got + 1] = row
            if not per[p] then add(p, got, l) end
            per[p] = got
          end
        end
      end
      -- A full answer was cut at `limit`: the older heads of one shard
      -- (a backlog) may fill it, and a shard with fewer than `batch` in
      -- it may have more past the cut -- or have been left out, round
      -- after round, until the backlog was worked down. Those shards'
      -- heads are read on their own (the query of each, as when not
      -- every shard is held).
      if #rows >= limit then
        for p, l in pairs(self.leases) do
          if #(per[p] or {}) < self.batch then shard_heads(p, l) end
        end
      end
    end
  else
    for p, l in pairs(self.leases) do
      shard_heads(p, l)
    end
  end
  if head_err then
    log_warn("outbox: heads", { error = tostring(head_err),
                                shards = head_failed })
  end
  -- The work, the shards in turn (one head of each, then the next of
  -- each...): with `concurrency` deliveries in flight, a shard's head
  -- starts in the round's first wave, not after a whole batch of
  -- another's to a slow sink. (Heads are of distinct subjects: their
  -- order is no subject's order.)
  local work, k, any = {}, 0, true
  while any do
    k, any = k + 1, false
    for _, p in ipairs(order) do
      local h = heads[p]
      local row = h.rows[k]
      if row then
        any = true
        work[#work + 1] = { row, p, h.l }
      end
    end
  end
  local i, n, attempted = 0, #work, 0
  local function worker()
    while i < n do
      i = i + 1
      local w = work[i]
      if deliver_row(self, w[1], w[2], w[3]) then
        attempted = attempted + 1
      end
    end
  end
  local tasks = {}
  self.workers = tasks
  for k = 1, min(self.concurrency, n) do
    tasks[k] = core.spawn(worker)
  end
  -- While deliveries are in flight the held leases are kept alive: a
  -- delivery (every sink in turn) may take longer than the half lease it
  -- may start with, and a lease must not expire under it (another
  -- dispatcher would deliver the same event at the same time). Not past
  -- lease_ttl_max, though: a sink that hangs (one without a timeout) must
  -- not hold its shards forever; the leases then lapse and another
  -- dispatcher takes over (the hung outcome is fenced).
  local round_over, keeping = false, false
  local round_start = core.mono()
  local keep_for = max(self.lease_ttl, self.lease_ttl_max)
  local keeper = n > 0 and core.spawn(function()
    while not round_over and core.mono() - round_start < keep_for do
      core.sleep(self.lease_ttl / 8)
      keeping = true
      for p, l in pairs(self.leases) do
        if round_over then break end
        if lease.remaining(l) < l.ttl / 2 and not l.renewing then
          l.renewing = true
          local rok, rerr = renew(self, l)
          l.renewing = false
          if not rok and rerr.kind == "lost" and self.leases[p] == l then
            self.leases[p] = nil
          end
        end
      end
      keeping = false
    end
  end)
  if keeper then tasks[#tasks + 1] = keeper end   -- d:stop() cancels it
  for _, t in ipairs(tasks) do
    if t ~= keeper then t:wait() end
  end
  round_over = true
  if keeper then
    if keeping then
      keeper:wait()                   -- a renewal in flight: let it end
    else
      pcall(keeper.cancel, keeper)    -- asleep: not worth waiting for
    end
  end
  record_queued(self)          -- what a raised round left, if anything
  self.workers = nil
  if self.prune and now >= self.next_prune then
    self.next_prune = now + self.prune_interval
    local pl = lease.acquire(self.db, prune_key(self), self.lease_ttl,
                             { owner = self.owner })
    if pl then
      local pruned = _M.prune(self.db, { keep_days = self.keep_days,
                                         batch = self.prune_batch,
                                         now = now })
      self.stats.pruned = self.stats.pruned + (pruned or 0)
      lease.release(self.db, pl)
    end
  end
  return attempted
end

-- The wait after the k-th round in a row in which the store failed:
-- interval, doubling, up to ERROR_PAUSE_MAX s (or interval when longer).
local ERROR_PAUSE_MAX = 10
local function error_pause(self, k)
  return min(self.interval * 2 ^ min(k - 1, 30),
             max(self.interval, ERROR_PAUSE_MAX))
end

-- syntax: d = d:start()
-- Runs rounds in a task until d:stop(): again at once after a round that
-- had work, after `interval` seconds otherwise.
function Dispatcher:start()
  if self.task then
    return self
  end
  self.stopping = false
  init_outcomes(self)
  -- the backlog gauges, once the first round made the table, then every
  -- backlog_interval (apart from the rounds: a round waiting on a slow
  -- sink must not stop them, they matter most then)
  self.backlog_task = core.spawn(function()
    while not self.stopping do
      local ready_now = self.stats.rounds > 0
      if ready_now then
        publish_backlog(self)
      end
      core.sleep(ready_now and self.backlog_interval
                 or min(self.interval, self.backlog_interval))
    end
  end)
  self.task = core.spawn(function()
    local failing = 0       -- rounds in a row in which the store failed
    while not self.stopping do
      local errors = self.stats.errors
      local ok, n = pcall(self.step, self)
      if not ok then
        self.stats.errors = self.stats.errors + 1
        log_warn("outbox: round failed", { error = tostring(n) })
        n = 0
      end
      -- A round whose outcomes (or leases, or heads) the store failed
      -- is no round of work: its events are still pending and due, so
      -- going again at once delivered them again and again, thousands of
      -- times a second, for as long as the store refused writes (disk
      -- full, a read-only standby). It waits, interval doubling with
      -- each such round in a row, up to ERROR_PAUSE_MAX.
      if self.stats.errors > errors then
        failing = failing + 1
      else
        failing = 0
      end
      if not self.stopping and (n == 0 or failing > 0) then
        core.sleep(failing > 0 and error_pause(self, failing)
                   or self.interval)
      end
    end
  end)
  return self
end

-- syntax: d:stop()
-- Stops the task and its deliveries (one in flight is abandoned: its row
-- stays pending) and releases the leases.
-- yields: one transaction (lease.release_owner)
function Dispatcher:stop()
  self.stopping = true
  -- pcall: a sink may call d:stop(), and a task cannot cancel itself
  if self.task then
    pcall(self.task.cancel, self.task)
    self.task = nil
  end
  if self.backlog_task then
    pcall(self.backlog_task.cancel, self.backlog_task)
    self.backlog_task = nil
  end
  for _, t in ipairs(self.workers or {}) do
    pcall(t.cancel, t)
  end
  self.workers = nil
  for t in pairs(self.sink_tasks) do     -- hooks the workers waited for
    pcall(t.cancel, t)
  end
  self.sink_tasks = {}
  -- By owner, not by the leases in self.leases: a task cancelled while an
  -- acquisition's commit was in flight never saw the lease it was granted
  -- (on SQLite the writer runs that commit before this statement).
  local keys = { prune_key(self) }
  for p = 0, self.partitions - 1 do
    keys[#keys + 1] = lease_key(self, p)
  end
  self.leases = {}
  local _, err = lease.release_owner(self.db, self.owner, keys)
  if err then
    log_warn("outbox: releasing the leases", { error = tostring(err) })
  end
  publish_shards(self, nil)
  publish_backlog(self, true)
end

------------------------------------------------- prune, replay, list

-- The condition is repeated outside the subquery: on PostgreSQL a row
-- replayed (set pending) while the DELETE waited for its lock is checked
-- again on its new version and kept.
local PRUNE = "DELETE FROM paygate_outbox WHERE id IN (SELECT id FROM"
  .. " paygate_outbox WHERE state = 'delivered' AND delivered_at < $1"
  .. " ORDER BY delivered_at LIMIT $2) AND state = 'delivered' AND"
  .. " delivered_at < $1"

-- syntax: n, err = outbox.prune(db [, opts])
-- Deletes delivered rows older than keep_days (default 7) in batches of
-- `batch` (500), at most `max_batches` (20) per call, yielding between.
-- returns: the number of rows deleted
function _M.prune(db, opts)
  check_db("outbox.prune", db)
  opts = opts or {}
  local ok, err = prior_of(db)
  if ok == nil then
    return nil, err
  end
  local before = (opts.now or core.time())
                 - (opts.keep_days or DEFAULTS.keep_days) * 86400
  local batch = opts.batch or DEFAULTS.prune_batch
  local total = 0
  for _ = 1, opts.max_batches or 20 do
    local res, derr = db:exec(PRUNE, { before, batch })
    if not res then
      return nil, derr
    end
    total = total + res.changes
    if res.changes < batch then
      break
    end
    core.sleep(0)
  end
  return total
end

-- Builds a WHERE clause from a filter: id, subject, type, state.
local function where(filter, default_state)
  local conds, params = {}, {}
  local function add(cond, v)
    params[#params + 1] = v
    conds[#conds + 1] = cond:gsub("%?", "$" .. #params)
  end
  if filter.id ~= nil then
    add("id = ?", filter.id)
  end
  if filter.subject ~= nil then
    add("subject = ?", filter.subject)
  end
  if filter.type ~= nil then
    add("type = ?", filter.type)
  end
  local state = filter.state or default_state
  if state ~= nil and state ~= "any" then
    add("state = ?", state)
  end
  if #conds == 0 then
    return "", params
  end
  return " WHERE " .. concat(conds, " AND "), params
end

local STATES = { pending = true, delivered = true, dead = true, any = true }

local function check_filter(fname, filter)
  if type(filter) ~= "table" then
    error(fname .. ": filter must be an event id or a table", 3)
  end
  for k, v in pairs(filter) do
    if k == "id" or k == "limit" then
      if type(v) ~= "number" then
        error(fname .. ": filter." .. k .. " must be a number", 3)
      end
    elseif k == "subject" or k == "type" or k == "state" then
      if type(v) ~= "string" then
        error(fname .. ": filter." .. k .. " must be a string", 3)
      end
      -- a misspelt state ("Dead", "daed") matched nothing: an operator
      -- looking for dead letters was told there were none
      if k == "state" and not STATES[v] then
        error(fname .. ": filter.state must be pending, delivered, dead or"
              .. " any (got " .. string.format("%q", v:sub(1, 40)) .. ")", 3)
      end
    else
      error(fname .. ": unknown filter key " .. tostring(k), 3)
    end
  end
end

-- syntax: n, err = outbox.replay(db, id | filter)
-- Sets the chosen events pending again with a fresh attempt count (for
-- max_attempts; the attempts made so far are added to prior_attempts, so
-- the deliveries' `attempt` goes on counting: a receiver tells a replay
-- from a first delivery), due now. An id picks that event whatever its
-- state (a pending one is left alone); a filter { subject, type, state } picks dead letters unless
-- state says "delivered" or "any". A replayed delivered event goes to
-- every sink again; a replayed dead letter only to the sinks it had not
-- reached. It is the head of its subject again: later pending events of
-- the subject wait for it. It never alters the table: on one an older
-- paygate made, whose prior_attempts is not added yet, the count starts
-- over.
-- returns: the number of events replayed
function _M.replay(db, filter)
  check_db("outbox.replay", db)
  if type(filter) == "number" then
    filter = { id = filter, state = "any" }
  end
  check_filter("outbox.replay", filter)
  local prior, err = prior_of(db)
  if prior == nil then
    return nil, err
  end
  local w, params = where(filter, "dead")
  local n = #params
  params[n + 1] = core.time()
  local stmt = "UPDATE paygate_outbox SET sinks_done = CASE WHEN state ="
    .. " 'delivered' THEN '' ELSE sinks_done END, state = 'pending',"
    .. (prior and " prior_attempts = prior_attempts + attempts," or "")
    .. " attempts = 0,"
    .. " next_at = $" .. (n + 1) .. ", last_error = NULL,"
    .. " delivered_at = NULL"
    .. (w == "" and " WHERE" or w .. " AND") .. " state <> 'pending'"
  local res, uerr = db:exec(stmt, params)
  if not res then
    return nil, uerr
  end
  return res.changes
end

-- syntax: rows, err = outbox.list(db [, filter])
-- filter: { id, subject, type, state ("any" by default), limit (100) }
-- returns: rows { id, subject, type, payload (JSON text), state, attempts
--          (since the last replay), prior_attempts (before it), next_at,
--          created_at, delivered_at, sinks_done, last_error }
--          in id order (prior_attempts 0 on a table an older paygate made
--          and nothing upgraded yet: a read never alters the table)
function _M.list(db, filter)
  check_db("outbox.list", db)
  filter = filter or {}
  check_filter("outbox.list", filter)
  local prior, err = prior_of(db)
  if prior == nil then
    return nil, err
  end
  local w, params = where(filter, "any")
  params[#params + 1] = filter.limit or 100
  return db:query("SELECT id, subject, type, payload, state, attempts, "
    .. PRIOR[prior] .. ", next_at, created_at, delivered_at, sinks_done,"
    .. " last_error FROM"
    .. " paygate_outbox" .. w .. " ORDER BY id LIMIT $" .. #params, params)
end

return _M
