-- paygate.idempotency: Idempotency-Key for the POSTs of a merchant API,
-- durable on paygate.sql (SQLite and PostgreSQL).
--
--   local idem = require "paygate.idempotency"
--   paygate.route("POST", "/payments", idem.wrap(db, function(req, ik)
--     return db:transaction(function(tx)
--       ... the effects, through tx ...
--       return ik:respond(tx, 201, { id = id })   -- stored in this tx
--     end)
--   end))
--
-- A record is keyed by (scope, key): scope is the caller (the app id the
-- apikey hook put on req.app_id), key the header's value. Its fingerprint
-- is SHA-256 over method, path (with query) and body. A first request
-- inserts the record "running" with a lease (lease_until); the handler
-- runs; its response (status, headers, body bytes) is stored and the
-- record becomes "done". Then:
--   same key, same fingerprint, done     -> the stored response, replayed
--   same key, another fingerprint        -> 422 idempotency_key_reused
--   same key, running, lease not over    -> 409 idempotency_in_flight
--   same key, running, lease over        -> the run is taken over (the
--        worker that held it died, or overran its lease): the handler
--        runs again under a new token; the old run can no longer store
--        its response (complete() checks the token), and when it stores
--        in its own transaction (ik:respond(tx, ...)) that transaction
--        fails, so its effects roll back: one run's effects commit.
--   record past expires_at (ttl, 24 h)   -> as if absent; prune() removes
--        such records in small batches.
--
-- Failures: nil, err (core.error) with kind "conflict" (422), "in_flight"
-- (409; err.retry_after seconds), "lost" (our run was taken over), or the
-- store's own kinds. Misuse raises.

local core = require "paygate.core"
local crypto = require "paygate.crypto"
local json = require "paygate.json"
local sql = require "paygate.sql"

local type, error, pairs, tostring, setmetatable, getmetatable, floor =
      type, error, pairs, tostring, setmetatable, getmetatable, math.floor

local _M = { _VERSION = "0.1.0" }

local DEFAULT_TTL = 24 * 3600      -- s a record is kept
local LEASE_MARGIN = 10            -- s beyond the request timeout
local MAX_KEY = 255                -- bytes
local HEADER = "idempotency-key"

_M.DEFAULT_TTL = DEFAULT_TTL
_M.MAX_KEY = MAX_KEY

-- per-worker counters (idempotency.stats())
local counts = { started = 0, replayed = 0, conflict = 0, in_flight = 0,
                 taken_over = 0, released = 0, bad_key = 0, pruned = 0,
                 store_failed = 0 }

-- the same counts, summed over the workers, on /metrics: one series per
-- name of `counts` (a fixed set)
local counter = require("paygate.metrics").counter(
  "paygate_idempotency_total", "Idempotency-Key outcomes: started, "
  .. "replayed, conflict, in_flight, taken_over, released, bad_key, "
  .. "pruned, store_failed.", { "outcome" }, { max_series = 16 })

-- each name's labels table, made once (not one per request)
local labels = {}
for name in pairs(counts) do
  labels[name] = { name }
end

local function bump(name, n)
  n = n or 1
  counts[name] = counts[name] + n
  if n > 0 then counter:inc(labels[name], n) end
end

local function fail(kind, message, fields)
  fields = fields or {}
  fields.retryable = kind == "in_flight"
  return nil, core.error(kind, message, fields)
end

local function is_db(v)
  return getmetatable(v) == sql.DB
end

local function is_tx(v)
  return getmetatable(v) == sql.TX
end

------------------------------------------------------------------ schema

local SCHEMA = {
  [[CREATE TABLE IF NOT EXISTS paygate_idempotency (
  scope TEXT NOT NULL, idem_key TEXT NOT NULL, fingerprint TEXT NOT NULL,
  state TEXT NOT NULL, token TEXT, lease_until DOUBLE PRECISION,
  status INTEGER, headers TEXT, body TEXT,
  created_at DOUBLE PRECISION NOT NULL,
  expires_at DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (scope, idem_key))]],
  [[CREATE INDEX IF NOT EXISTS paygate_idempotency_expires
  ON paygate_idempotency (expires_at)]],
}

local function ensure_schema(db)
  return db:ensure_schema("paygate_idempotency", function(tx)
    for i = 1, #SCHEMA do
      local _, e = tx:exec(SCHEMA[i])
      if e then
        return nil, e
      end
    end
    return true
  end)
end

--------------------------------------------------------------- helpers

-- syntax: ok, reason = idempotency.check_key(key)
-- returns: true, or false and why (missing, empty, too_long, not_printable)
function _M.check_key(key)
  if key == nil then
    return false, "missing"
  end
  if type(key) ~= "string" then
    return false, "not_printable"
  end
  if key == "" then
    return false, "empty"
  end
  if #key > MAX_KEY then
    return false, "too_long"
  end
  if key:find("[^\32-\126]") then
    return false, "not_printable"
  end
  return true
end

-- syntax: hex = idempotency.fingerprint(method, path, body)
-- returns: lower-case hex SHA-256 over "METHOD\nPATH\nBODY" (method and a
-- request path never hold a line break, so the join is unambiguous)
function _M.fingerprint(method, path, body)
  if type(method) ~= "string" or type(path) ~= "string" then
    error("idempotency.fingerprint: method and path must be strings", 2)
  end
  if body ~= nil and type(body) ~= "string" then
    error("idempotency.fingerprint: body must be a string", 2)
  end
  return crypto.hex(crypto.digest("sha256", method .. "\n" .. path .. "\n"
                                  .. (body or "")))
end

local function check_store(fname, store)
  if not is_db(store) then
    error(fname .. ": store must be a paygate.sql db", 3)
  end
end

local function check_str(fname, name, v)
  if type(v) ~= "string" then
    error(fname .. ": " .. name .. " must be a string", 3)
  end
end

local function check_positive(fname, name, v)
  if v ~= nil and (type(v) ~= "number" or not (v > 0) or v == math.huge)
  then
    error(fname .. ": " .. name .. " must be a positive number of seconds",
          3)
  end
end

-- The request timeout the server enforces (paygate.runtime's, in a
-- worker): a reload re-reads paygate.config, but the server keeps the
-- limits.request_timeout it started with. Read from the config, a reload
-- that lowered it gave runs still allowed the old timeout a lease shorter
-- than that, and a retry took over a live run. (paygate exec: the
-- config's, else 30.)
local function default_lease()
  local ok, paygate = pcall(require, "paygate")
  local t = ok and paygate.runtime and paygate.runtime.request_timeout
  if type(t) ~= "number" or t <= 0 then
    t = ok and paygate.config and paygate.config.limits
        and paygate.config.limits.request_timeout
  end
  if type(t) ~= "number" or t <= 0 then
    t = 30
  end
  return t + LEASE_MARGIN
end

-- A record must outlive its lease: once expires_at passes, begin() treats
-- the record as absent and starts over whatever its state, so a ttl at or
-- below the lease would let a repeat run the request again beside a run
-- still holding its lease (and a done record would have no time left to
-- be replayed). A ttl given so is refused like any other bad option, at
-- the call; the default one is made long enough (ttl_for).
local function check_ttl_lease(fname, ttl, lease)
  if ttl == nil then
    return
  end
  local l = lease or default_lease()
  if ttl <= l then
    error(string.format("%s: opts.ttl (%g s) must be longer than the lease"
      .. " (%g s%s): a record that expires while its run holds the lease"
      .. " would let a repeat run the request again", fname, ttl, l,
      lease and "" or ", the default: limits.request_timeout + "
      .. LEASE_MARGIN), 3)
  end
end

-- The ttl of a record: as given, else 24 h, or the lease plus 24 h for a
-- lease that long (a route, or limits.request_timeout, allowing a day).
local function ttl_for(ttl, lease)
  if ttl then
    return ttl
  end
  if lease >= DEFAULT_TTL then
    return lease + DEFAULT_TTL
  end
  return DEFAULT_TTL
end

-- Headers a replay repeats: string names and values only, names as given.
local function copy_headers(h)
  local out = {}
  if type(h) ~= "table" then
    return out
  end
  for k, v in pairs(h) do
    if type(k) == "string" then
      if type(v) == "number" then
        v = tostring(v)
      end
      if type(v) == "string" then
        out[k] = v
      end
    end
  end
  return out
end

local function has_header(h, name)
  name = name:lower()
  for k in pairs(h) do
    if k:lower() == name then
      return true
    end
  end
  return false
end

-- What the server sends of a handler's headers: names that are tokens,
-- values without CR, LF or NUL, 4 KiB of them in all (less what a replay
-- adds). Anything else it answers 500 -- stored, that 500 would be every
-- replay's answer for the record's lifetime.
local HEADERS_MAX = 4096 - 64

local function check_headers(h)
  local size = 0
  for k, v in pairs(h) do
    if not k:find("^[%w_%-]+$") then
      error("idempotency: handler header name " .. string.format("%q", k)
            .. " is not a token (letters, digits, - and _)", 4)
    end
    if v:find("[\r\n%z]") then
      error("idempotency: handler header " .. k .. " holds a CR, LF or"
            .. " NUL", 4)
    end
    size = size + #k + #v + 4
  end
  if size > HEADERS_MAX then
    error("idempotency: handler headers exceed " .. HEADERS_MAX
          .. " bytes", 4)
  end
end

-- A handler's response made into what goes on the wire and in the store:
-- a table body is JSON-encoded here, once, with its Content-Type.
local function normalize(status, body, headers)
  -- (a 1xx is no final answer: the server does not send one)
  if type(status) ~= "number" or status % 1 ~= 0 or status < 200
     or status > 599 then
    error("idempotency: handler status must be an integer 200..599 (got "
          .. tostring(status) .. ")", 3)
  end
  local h = copy_headers(headers)
  check_headers(h)
  if type(body) == "table" then
    body = json.encode(body)
    if not has_header(h, "Content-Type") then
      h["Content-Type"] = "application/json"
    end
  elseif body == nil then
    body = ""
  elseif type(body) ~= "string" then
    error("idempotency: handler body must be a string or a table", 3)
  end
  return { status = status, body = body, headers = h }
end

------------------------------------------------------------ begin/complete

local SELECT = "SELECT fingerprint, state, token, lease_until, status,"
  .. " headers, body, expires_at FROM paygate_idempotency"
  .. " WHERE scope = $1 AND idem_key = $2"

-- Headers as stored: a JSON list of [base64(name), base64(value)]. HTTP
-- lets a value carry bytes 0x80..0xFF that are not UTF-8 (a GBK file name
-- in Content-Disposition), which the server sends as given but JSON
-- cannot hold: json.encode would make them U+FFFD, and the replay would
-- not repeat the first answer's bytes.
local function encode_headers(h)
  local list = {}
  for k, v in pairs(h) do
    list[#list + 1] = { crypto.base64_encode(k), crypto.base64_encode(v) }
  end
  return json.encode(list)
end

local function decode_headers(text)
  local headers = {}
  local h = text and text ~= "" and json.decode(text)
  if type(h) ~= "table" then
    return headers
  end
  if type(h[1]) ~= "table" then
    -- a record stored before this form (a JSON object of the values
    -- themselves): read as it is until it expires
    for k, v in pairs(h) do
      if type(k) == "string" and type(v) == "string" then
        headers[k] = v
      end
    end
    return headers
  end
  for i = 1, #h do
    local pair = h[i]
    local k = type(pair) == "table" and type(pair[1]) == "string"
              and crypto.base64_decode(pair[1])
    local v = k and type(pair[2]) == "string"
              and crypto.base64_decode(pair[2])
    if not v then
      return nil
    end
    headers[k] = v
  end
  return headers
end

local function decode_response(row)
  local headers = decode_headers(row.headers)
  if not headers then
    return nil, core.error("corrupt", "idempotency: stored headers are"
                           .. " not valid")
  end
  local body = ""
  if row.body and row.body ~= "" then
    body = crypto.base64_decode(row.body)
    if not body then
      return nil, core.error("corrupt", "idempotency: stored body is not"
                             .. " valid base64")
    end
  end
  return { status = row.status, headers = headers, body = body }
end

-- syntax: h, err = idempotency.begin(db, scope, key, fingerprint[, opts])
-- opts: ttl (s the record is kept, default 24 h, or lease + 24 h for a
--       lease that long; longer than the lease, else it raises), lease
--       (s the in-flight marker holds, default limits.request_timeout + 10)
-- returns: { state = "new", scope, key, token, fingerprint, taken_over }
--          (run the request, then complete() or release()), or
--          { state = "done", response = { status, headers, body } }
--          (replay it), or nil, err: "conflict" (another fingerprint),
--          "in_flight" (err.retry_after), store kinds
-- yields: one transaction
function _M.begin(db, scope, key, fingerprint, opts)
  check_store("idempotency.begin", db)
  check_str("idempotency.begin", "scope", scope)
  check_str("idempotency.begin", "key", key)
  check_str("idempotency.begin", "fingerprint", fingerprint)
  if opts ~= nil and type(opts) ~= "table" then
    error("idempotency.begin: opts must be a table", 2)
  end
  opts = opts or {}
  check_positive("idempotency.begin", "opts.ttl", opts.ttl)
  check_positive("idempotency.begin", "opts.lease", opts.lease)
  local ok, why = _M.check_key(key)
  if not ok then
    error("idempotency.begin: key is not valid (" .. why .. ")", 2)
  end
  check_ttl_lease("idempotency.begin", opts.ttl, opts.lease)
  local lease = opts.lease or default_lease()
  local ttl = ttl_for(opts.ttl, lease)
  local sok, serr = ensure_schema(db)
  if not sok then
    return nil, serr
  end
  -- A replay or a conflict needs no write: read first (SQLite: on a read
  -- connection, beside the writer). "done" lasts until expiry, so a
  -- done row read here is still done; a running one may have finished
  -- since, which the transaction below sees.
  local rows, rerr = db:query(SELECT, { scope, key })
  if not rows then
    return nil, rerr
  end
  local seen = rows[1]
  if seen and seen.expires_at > core.time() then
    if seen.fingerprint ~= fingerprint then
      bump("conflict")
      return fail("conflict", "idempotency key " .. key .. " was used for"
                  .. " another request")
    end
    if seen.state == "done" then
      local r, derr = decode_response(seen)
      if not r then
        return nil, derr
      end
      bump("replayed")
      return { state = "done", response = r }
    end
  end
  local token = crypto.random_nonce(24)
  local lock = db.engine == "postgres" and " FOR UPDATE" or ""
  local res, err = db:transaction(function(tx)
    local now = core.time()
    local ins, ierr = tx:exec("INSERT INTO paygate_idempotency (scope,"
      .. " idem_key, fingerprint, state, token, lease_until, created_at,"
      .. " expires_at) VALUES ($1, $2, $3, 'running', $4, $5, $6, $7)"
      .. " ON CONFLICT (scope, idem_key) DO NOTHING",
      { scope, key, fingerprint, token, now + lease, now, now + ttl })
    if not ins then
      return nil, ierr
    end
    if ins.changes == 1 then
      return { state = "new", taken_over = false }
    end
    local rows, qerr = tx:query(SELECT .. lock, { scope, key })
    if not rows then
      return nil, qerr
    end
    local row = rows[1]
    if not row then
      -- deleted between the INSERT and the SELECT (SQLite cannot: one
      -- writer; PostgreSQL: a prune): let the caller's retry insert
      return nil, core.error("busy", "idempotency: record vanished",
                             { retryable = true })
    end
    local expired = row.expires_at <= now
    if not expired and row.fingerprint ~= fingerprint then
      return fail("conflict", "idempotency key " .. key .. " was used for"
                  .. " another request")
    end
    if not expired and row.state == "done" then
      local r, derr = decode_response(row)
      if not r then
        return nil, derr
      end
      return { state = "done", response = r }
    end
    if not expired and (row.lease_until or 0) > now then
      return fail("in_flight", "idempotency key " .. key .. " is in use by"
                  .. " a request still running",
                  { retry_after = row.lease_until - now })
    end
    -- expired, or a run whose lease ran out: start over under our token.
    -- A run taken over keeps its created_at, but its record must outlive
    -- the new lease (as check_ttl_lease makes a new record's): kept to
    -- its old expires_at, a takeover late in the record's life left it to
    -- expire under the new run, and a repeat (or prune) then started the
    -- request again beside it.
    local up, uerr = tx:exec("UPDATE paygate_idempotency SET"
      .. " fingerprint = $3, state = 'running', token = $4,"
      .. " lease_until = $5, status = NULL, headers = NULL, body = NULL,"
      .. " created_at = CASE WHEN $8 = 1 THEN $6 ELSE created_at END,"
      .. " expires_at = CASE WHEN $8 = 1 OR expires_at < $7 THEN $7"
      .. " ELSE expires_at END"
      .. " WHERE scope = $1 AND idem_key = $2",
      { scope, key, fingerprint, token, now + lease, now, now + ttl,
        expired and 1 or 0 })
    if not up then
      return nil, uerr
    end
    return { state = "new", taken_over = not expired }
  end)
  if not res then
    if core.is_error(err) then
      if err.kind == "conflict" then
        bump("conflict")
      elseif err.kind == "in_flight" then
        bump("in_flight")
      end
    end
    return nil, err
  end
  if res.state == "done" then
    bump("replayed")
    return res
  end
  bump("started")
  if res.taken_over then
    bump("taken_over")
    core.log(2, "idempotency: took over a run whose lease ran out",
             json.encode({ scope = scope, key = key }))
  end
  res.scope, res.key, res.token, res.fingerprint = scope, key, token,
                                                   fingerprint
  return res
end

local function check_handle(fname, h)
  if type(h) ~= "table" or h.state ~= "new" or type(h.token) ~= "string"
  then
    error(fname .. ": h must be a handle idempotency.begin returned with"
          .. " state \"new\"", 3)
  end
end

-- syntax: ok, err = idempotency.complete(db_or_tx, h, status, body
--                                        [, headers])
-- Stores the response (a table body is JSON-encoded, as it will be sent)
-- if h still holds the record. With a tx it is part of that transaction:
-- on "lost" the caller's fn returns nil, err and its effects roll back.
-- returns: the stored response { status, headers, body }, or nil, err
--          ("lost": the lease ran out and another run took over)
-- yields: one statement
function _M.complete(store, h, status, body, headers)
  if not is_db(store) and not is_tx(store) then
    error("idempotency.complete: store must be a paygate.sql db or tx", 2)
  end
  check_handle("idempotency.complete", h)
  local r = normalize(status, body, headers)
  local res, err = store:exec("UPDATE paygate_idempotency SET"
    .. " state = 'done', token = NULL, lease_until = NULL, status = $4,"
    .. " headers = $5, body = $6 WHERE scope = $1 AND idem_key = $2"
    .. " AND token = $3",
    { h.scope, h.key, h.token, r.status, encode_headers(r.headers),
      crypto.base64_encode(r.body) })
  if not res then
    return nil, err
  end
  if res.changes ~= 1 then
    return fail("lost", "idempotency key " .. h.key .. ": the run's lease"
                .. " ran out and another run took it over")
  end
  return r
end

-- syntax: ok, err = idempotency.release(db, h)
-- Forgets a run that stored no response (its effects rolled back, or it
-- failed before any), so a repeat runs again at once.
-- returns: true (also when the record had been taken over), or nil, err
-- yields: one statement
function _M.release(db, h)
  check_store("idempotency.release", db)
  check_handle("idempotency.release", h)
  local res, err = db:exec("DELETE FROM paygate_idempotency WHERE"
    .. " scope = $1 AND idem_key = $2 AND token = $3 AND state = 'running'",
    { h.scope, h.key, h.token })
  if not res then
    return nil, err
  end
  bump("released", res.changes)
  return true
end

-- syntax: n, err = idempotency.prune(db[, { batch = 500, now = t }])
-- Deletes at most batch records past their expires_at (one short
-- statement; call it again while it returns batch).
-- returns: the number deleted, or nil, err
-- yields: one statement
function _M.prune(db, opts)
  check_store("idempotency.prune", db)
  if opts ~= nil and type(opts) ~= "table" then
    error("idempotency.prune: opts must be a table", 2)
  end
  opts = opts or {}
  local batch = opts.batch or 500
  if type(batch) ~= "number" or batch < 1 or batch % 1 ~= 0 then
    error("idempotency.prune: opts.batch must be a positive integer", 2)
  end
  local ok, err = ensure_schema(db)
  if not ok then
    return nil, err
  end
  -- (the expiry repeated outside the subquery: on PostgreSQL a record
  -- taken over by begin() while this DELETE waited for its row is checked
  -- again on its new version, and kept)
  local res, perr = db:exec("DELETE FROM paygate_idempotency WHERE"
    .. " (scope, idem_key) IN (SELECT scope, idem_key FROM"
    .. " paygate_idempotency WHERE expires_at <= $1 LIMIT $2)"
    .. " AND expires_at <= $1",
    { opts.now or core.time(), batch })
  if not res then
    return nil, perr
  end
  bump("pruned", res.changes)
  return res.changes
end

-- syntax: task = idempotency.pruner(db[, { interval = 60, batch = 500,
--                                          pause = 0.05 }])
-- A background task: every interval seconds, prune() in batches (a
-- pause between them, so the store's writer is never held long) until a
-- batch comes back short. Failures are logged and retried next tick.
-- Run one per worker or guard it with paygate.lease; deletes are
-- idempotent either way. returns: the task (task:cancel() stops it)
function _M.pruner(db, opts)
  check_store("idempotency.pruner", db)
  opts = opts or {}
  local interval = opts.interval or 60
  local batch, pause = opts.batch or 500, opts.pause or 0.05
  -- checked here, not by the task's first tick: a bad one ended the task
  -- (a raise in core.sleep or prune) and nothing was pruned again
  if not core.is_seconds(interval) then
    error("idempotency.pruner: opts.interval must be a positive number of"
          .. " seconds (at most 1e8)", 2)
  end
  if not core.is_seconds(pause, true) then
    error("idempotency.pruner: opts.pause must be a number of seconds,"
          .. " 0 .. 1e8", 2)
  end
  if type(batch) ~= "number" or batch < 1 or batch % 1 ~= 0 then
    error("idempotency.pruner: opts.batch must be a positive integer", 2)
  end
  return core.spawn(function()
    while true do
      core.sleep(interval)
      repeat
        local n, err = _M.prune(db, { batch = batch })
        if not n then
          core.log(2, "idempotency: prune failed",
                   json.encode({ error = tostring(err) }))
          break
        end
        if n == batch then
          core.sleep(pause)
        end
      until n < batch
    end
  end)
end

-- syntax: t = idempotency.stats()
-- returns: this worker's counters since start (a copy)
function _M.stats()
  local t = {}
  for k, v in pairs(counts) do
    t[k] = v
  end
  return t
end

---------------------------------------------------------------- wrapper

local Run = {}
Run.__index = Run

-- syntax: status, body, headers = ik:respond(tx, status, body[, headers])
-- Inside the handler's own db:transaction: stores the response in that
-- transaction (so it commits with the effects or not at all) and returns
-- what to send. When the record was taken over, it raises a "lost"
-- error, which rolls the transaction back; the wrapper answers 409.
function Run:respond(tx, status, body, headers)
  if not is_tx(tx) then
    error("ik:respond: tx must be the tx of a db:transaction", 2)
  end
  local r, err = _M.complete(tx, self.h, status, body, headers)
  if not r then
    self.lost = err.kind == "lost"
    error(err, 0)
  end
  self.response, self.response_tx = r, tx
  return r.status, r.body, r.headers
end

-- The response ik:respond stored, if the transaction it was stored in
-- committed (else nil: it rolled back with it, or its commit failed, and
-- the record is still running).
local function stored_response(run)
  local tx = run.response_tx
  if tx and tx.committed then
    return run.response
  end
  return nil
end

-- The ik a handler gets for a request without a key (opts.required =
-- false): respond() stores nothing and returns what to send.
local unprotected = {
  respond = function(_, tx, status, body, headers)
    if not is_tx(tx) then
      error("ik:respond: tx must be the tx of a db:transaction", 2)
    end
    local r = normalize(status, body, headers)
    return r.status, r.body, r.headers
  end,
}

local function reply(status, kind, message, headers)
  return status, json.encode({ error = kind, message = message }),
         headers or { ["Content-Type"] = "application/json" }
end

local function request_path(req)
  local qs = req.query_string
  if qs and qs ~= "" then
    return req.path .. "?" .. qs
  end
  return req.path
end

local function sent(r, replayed)
  local h = {}
  for k, v in pairs(r.headers) do
    h[k] = v
  end
  if replayed then
    h["Idempotent-Replayed"] = "true"
  end
  return r.status, r.body, h
end

-- release(db, h) for the wrapper: a failure (the store down) leaves the
-- record running until its lease ends, a retry meanwhile answered 409;
-- said once, at warn, or nothing would say why
local function release_run(db, h)
  local ok, err = _M.release(db, h)
  if not ok then
    core.log(2, "idempotency: the key could not be released (the store"
             .. " failed): a retry gets 409 until the run's lease ends",
             json.encode({ scope = h.scope, key = h.key,
                           error = tostring(err) }))
  end
end

-- syntax: fn = idempotency.wrap(db, handler[, opts])
-- handler(req, ik) returns status, body[, headers] as any handler does;
-- it may store its response in its own transaction with
-- ik:respond(tx, status, body, headers). Otherwise the wrapper stores it
-- when the handler returns, before it is sent. (With required = false
-- and no key, ik:respond stores nothing.)
-- opts: ttl, lease (see begin), scope = function(req) -> string (default
--       req.app_id or ""), required (default true: no key -> 400),
--       keep = function(status, body) -> boolean: which responses to
--       store (default status < 500; another releases the key so a retry
--       runs again); body as the handler returned it
-- returns: a route handler
function _M.wrap(db, handler, opts)
  check_store("idempotency.wrap", db)
  if type(handler) ~= "function" then
    error("idempotency.wrap: handler must be a function", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("idempotency.wrap: opts must be a table", 2)
  end
  opts = opts or {}
  check_positive("idempotency.wrap", "opts.ttl", opts.ttl)
  check_positive("idempotency.wrap", "opts.lease", opts.lease)
  -- (the default lease read now, as begin() will: the configuration is
  -- loaded before the app registers its routes)
  check_ttl_lease("idempotency.wrap", opts.ttl, opts.lease)
  local scope_of = opts.scope or function(req)
    local a = req.app_id
    return type(a) == "string" and a or ""
  end
  local keep = opts.keep or function(status) return status < 500 end
  local required = opts.required ~= false
  local bopts = { ttl = opts.ttl, lease = opts.lease }

  return function(req)
    local key = req:header(HEADER)
    if key == nil and not required then
      return handler(req, unprotected)
    end
    local ok, why = _M.check_key(key)
    if ok and req.header_count and req:header_count(HEADER) > 1 then
      -- which one would be the key? (a proxy may have added one); the
      -- signed requests of paygate.apikey refuse it the same way
      ok, why = false, "given more than once"
    end
    if not ok then
      bump("bad_key")
      if why == "missing" then
        return reply(400, "missing_idempotency_key", "this request needs"
                     .. " an Idempotency-Key header")
      end
      return reply(400, "invalid_idempotency_key", "Idempotency-Key must"
                   .. " be 1.." .. MAX_KEY .. " printable ASCII characters"
                   .. " (" .. why .. ")")
    end
    local scope = scope_of(req)
    if type(scope) ~= "string" then
      error("idempotency.wrap: opts.scope must return a string", 0)
    end
    local fp = _M.fingerprint(req.method, request_path(req), req.body)
    local h, err = _M.begin(db, scope, key, fp, bopts)
    if not h then
      if err.kind == "conflict" then
        return reply(422, "idempotency_key_reused", "this Idempotency-Key"
                     .. " was used with another request (method, path with"
                     .. " query, or body): a retry must send the first"
                     .. " request's exact bytes (then it gets its answer),"
                     .. " another operation a new key")
      elseif err.kind == "in_flight" then
        return reply(409, "idempotency_in_flight", "a request with this"
                     .. " Idempotency-Key is still running: send it again"
                     .. " after Retry-After seconds (at most) for its"
                     .. " answer",
                     { ["Content-Type"] = "application/json",
                       ["Retry-After"] = tostring(
                         math.max(1, floor(err.retry_after + 0.999))) })
      end
      -- the cause goes to the log (the answer names its kind only): a
      -- full disk or a lost database is otherwise nowhere to be seen
      -- but in the access log's 503s
      core.log(3, "idempotency: the store failed; answered 503",
               json.encode({ scope = scope, error = tostring(err) }))
      return reply(503, "unavailable", "idempotency store: "
                   .. tostring(err.kind))
    end
    if h.state == "done" then
      return sent(h.response, true)
    end

    local run = setmetatable({ h = h }, Run)
    -- a raised string is raised on with the traceback of where it was
    -- raised: the request's log line then shows the handler's frames, not
    -- only this error() below (the server adds none to a message that has
    -- one). Was: the stack began here, the handler's call chain lost.
    local traced
    local res = { xpcall(handler, function(e)
      if type(e) == "string"
         and not e:find("\nstack traceback:\n", 1, true) then
        traced = debug.traceback(e, 2)
      end
      return e
    end, req, run) }
    local done = stored_response(run)
    if not res[1] then
      if done == nil and not run.lost then
        release_run(db, h)
      end
      error(traced or res[2], 0)
    end
    local status, body, headers = res[2], res[3], res[4]
    if status == nil and done then
      -- a failure after ik:respond's transaction committed: the effects
      -- and the answer are in, and a retry replays that answer. Sent, not
      -- a 503 saying the request was not applied (a caller believing it
      -- would send the request again under a new key)
      return sent(done, false)
    end
    if status == nil then
      -- the handler failed (its transaction, if any, rolled back, and a
      -- response ik:respond stored in it with it)
      if run.lost then
        -- Retry-After as on every idempotency_in_flight: 1 s, since the
        -- run that took over is the one to ask (a retry replays its answer,
        -- or gets a 409 whose Retry-After is the rest of its lease)
        return reply(409, "idempotency_in_flight", "this run's lease ran"
                     .. " out and another request with this key took over:"
                     .. " send it again after Retry-After seconds for that"
                     .. " run's answer",
                     { ["Content-Type"] = "application/json",
                       ["Retry-After"] = "1" })
      end
      release_run(db, h)
      local kind = core.is_error(body) and body.kind or "error"
      -- unknown_outcome: a write whose answer the store lost may have
      -- committed. Released all the same (a record ik:respond stored in
      -- that transaction is no longer running and stays: the retry
      -- replays it); the caller must retry with THIS key, never a new one
      return reply(503, kind, kind == "unknown_outcome"
        and "the store lost the answer to the request's write: it may have"
            .. " been applied. Retry with the same Idempotency-Key (not a"
            .. " new one)"
        or "the request failed and was not applied; retry it")
    end
    if done then
      -- stored in the handler's committed transaction: send exactly that
      return sent(done, false)
    end
    -- (a response ik:respond stored in a transaction that then rolled back
    -- or failed to commit is not sent: what the handler returned is)
    local nok, r = pcall(normalize, status, body, headers)
    if not nok then
      -- a response the server cannot send: nothing stored, the key free
      release_run(db, h)
      error(r, 0)
    end
    if not keep(r.status, body) then
      release_run(db, h)
      return sent(r, false)
    end
    local stored, serr = _M.complete(db, h, r.status, r.body, r.headers)
    if not stored then
      bump("store_failed")
      core.log(3, "idempotency: the response could not be stored",
               json.encode({ scope = scope, key = key,
                             error = tostring(serr) }))
    end
    return sent(r, false)
  end
end

return _M
