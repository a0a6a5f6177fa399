-- paygate.audit: an append-only audit trail on paygate.sql (SQLite and
-- PostgreSQL), hash-chained per subject (one chain per payment).
--
--   local e, err = audit.append(tx_or_db, "payment:P1", {
--     what = "payment.succeeded", from = "paying", to = "paid",
--     cause = "notification", actor = "wechatpay",
--     evidence = { notification_id = "EV-1" } })
--   -- e = { subject, seq, hash, prev_hash, at, ... }
--   -- as statements for db:atomic, on the head read beforehand:
--   local e, stmts = audit.plan("payment:P1", { what = ... },
--                               audit.head(db, "payment:P1"))
--   local ok, broken = audit.verify(db, "payment:P1")
--   local ok, summary = audit.verify_all(db)
--
-- Each entry holds: subject, seq (1, 2, ... per subject), what, ref (the
-- object inside the subject, e.g. a refund's id), from, to, cause, actor,
-- at (UTC epoch ms), evidence (canonical JSON: keys sorted), prev_hash
-- and hash = hex SHA-256 over a canonical serialization of all of them
-- (see canonical()); the first entry's prev_hash is GENESIS. A head row
-- per subject (paygate_audit_heads) holds the last seq and hash, so a
-- deleted last entry is detected too.
--
-- Chains are per subject: appends to different subjects never wait for
-- each other. Two appends to one subject race on the head row: the head
-- moves only with UPDATE ... WHERE seq = <the seq read> (or an INSERT of
-- the first head, which the primary key lets only one writer do), and
-- the entry's primary key (subject, seq) refuses a second entry with the
-- same seq, so one of them fails that step and reads the head again.
--
-- What it proves: a row edited, inserted, deleted or renumbered without
-- recomputing every later hash and the head is found by verify. Not
-- found: the last entries deleted with the head set back to the new last
-- entry's seq and hash (nothing to compute), a chain deleted whole with
-- its head, and anything recomputed by someone who can rewrite the
-- tables: to detect those, keep audit.head() values somewhere else (an
-- anchor) and compare.
--
-- Failures: nil, err (core.error) with the store's kinds (unavailable,
-- timeout, ...), "conflict" (retryable: the head kept moving under us) or
-- "too_large" (an evidence over MAX_EVIDENCE bytes: nothing written).
-- Misuse raises.

local core = require "paygate.core"
local crypto = require "paygate.crypto"
local json = require "paygate.json"
local sql = require "paygate.sql"
local civil = require "paygate.civil"

local type, pairs, ipairs, tostring, error, getmetatable, floor, sort,
      concat = type, pairs, ipairs, tostring, error, getmetatable,
      math.floor, table.sort, table.concat
-- LuaJIT's table.new(narray, nhash): a table made at the size it will
-- have, where one grown key by key is rehashed at every power of two
local new_tab = require "table.new"

local _M = { _VERSION = "0.1.0" }

_M.GENESIS = string.rep("0", 64)
local GENESIS = _M.GENESIS
local FORMAT = "paygate.audit.v1"
local APPEND_ATTEMPTS = 16
local PAGE = 1000
local ROUNDS = 100                -- verify: reads of a chain that moves on
local MAX_AT = 253402300799999     -- 9999-12-31T23:59:59.999Z (partitions)
-- An entry's evidence, as stored, is at most this many bytes: verify and
-- verify_all read PAGE rows at a time, so with it a page is bounded
-- (64 MiB at the very worst, 1,000 entries all at the cap; had there been
-- no cap, one page could be any size). Evidence is identifiers and short
-- facts: the gateway's own are under 1 KiB; the largest in paygate, a
-- reconciled day's findings, keeps itself within it (reconcile/bill.lua).
local MAX_EVIDENCE = 65536
_M.MAX_EVIDENCE = MAX_EVIDENCE

------------------------------------------------------------- schema

local SCHEMA = {
  sqlite = [[
CREATE TABLE IF NOT EXISTS paygate_audit (
  subject TEXT NOT NULL, seq INTEGER NOT NULL, what TEXT NOT NULL,
  ref TEXT, from_state TEXT, to_state TEXT, cause TEXT, actor TEXT,
  at INTEGER NOT NULL, evidence TEXT, prev_hash TEXT NOT NULL,
  hash TEXT NOT NULL, PRIMARY KEY (subject, seq));
CREATE TABLE IF NOT EXISTS paygate_audit_heads (
  subject TEXT PRIMARY KEY, seq INTEGER NOT NULL, hash TEXT NOT NULL)]],
  -- COLLATE "C": verify_all merges two streams ordered by subject, and
  -- compares subjects byte by byte, as SQLite's BINARY does.
  -- Partitioned by month on `at` (epoch ms). A primary key of a
  -- partitioned table must hold the partition key, so (subject, seq)
  -- alone cannot be unique across partitions: the head row (one per
  -- subject, unpartitioned) is what gives each seq to one writer, in the
  -- same transaction as the entry (see append_tx), and verify reports a
  -- second row with a seq (bad_seq).
  postgres = [[
CREATE TABLE IF NOT EXISTS paygate_audit (
  subject TEXT COLLATE "C" NOT NULL, seq BIGINT NOT NULL,
  what TEXT NOT NULL, ref TEXT, from_state TEXT, to_state TEXT,
  cause TEXT, actor TEXT, at BIGINT NOT NULL, evidence TEXT,
  prev_hash TEXT NOT NULL, hash TEXT NOT NULL,
  PRIMARY KEY (subject, seq, at)) PARTITION BY RANGE (at);
CREATE TABLE IF NOT EXISTS paygate_audit_heads (
  subject TEXT COLLATE "C" PRIMARY KEY, seq BIGINT NOT NULL,
  hash TEXT NOT NULL)]],
}

-- q: a db or a tx -> both tables are there (true), not (false), or nil, err
local function both_tables(q)
  for _, name in ipairs({ "paygate_audit", "paygate_audit_heads" }) do
    local yes, err = q:has_table(name)
    if not yes then
      return yes, err
    end
  end
  return true
end

local ready = setmetatable({}, { __mode = "k" })     -- db -> true
local created_in = setmetatable({}, { __mode = "k" }) -- tx -> true

------------------------------------------- PostgreSQL: monthly partitions

-- layout[db]: "partitioned" (made by this version) or "plain" (a table
-- made by an older paygate: it keeps working, unpartitioned; see
-- docs/fsm.md for the migration). months[db][yyyymm]: a partition known
-- to exist (committed). made_in[tx][yyyymm]: created by that transaction
-- (it may still roll back, so the handle does not remember it).
local layout = setmetatable({}, { __mode = "k" })
local months = setmetatable({}, { __mode = "k" })
local made_in = setmetatable({}, { __mode = "k" })
local PARTITION_LOCK = 7217003

local function month_of(at_ms)
  local t = os.date("!*t", floor(at_ms / 1000))
  return t.year, t.month
end

local function next_month(y, m)
  if m == 12 then
    return y + 1, 1
  end
  return y, m + 1
end

local function partition_name(y, m)
  return string.format("paygate_audit_%04d%02d", y, m)
end

local function detect_layout(q, db, quiet)
  if layout[db] then
    return layout[db]
  end
  local rows, err = q:query("SELECT c.relkind::text AS kind FROM pg_class c"
    .. " WHERE c.oid = to_regclass('paygate_audit')")
  if not rows then
    return nil, err
  end
  if not rows[1] then
    return "absent"
  end
  local l = rows[1].kind == "p" and "partitioned" or "plain"
  if l == "plain" and not quiet then
    core.log(1, "audit: paygate_audit is an unpartitioned table (made by an"
      .. " older paygate): it keeps working as it is; docs/fsm.md shows how"
      .. " to move it to monthly partitions", nil)
  end
  layout[db] = l
  return l
end

-- Makes sure the partition of month y-m exists, inside tx (creating it
-- under an advisory lock held until tx ends, so concurrent creators wait
-- and then find it).
local function ensure_month(tx, y, m)
  local db = tx.db
  local key = y * 100 + m
  local known = months[db]
  if not known then
    known = {}
    months[db] = known
  end
  local made = made_in[tx]
  if known[key] or (made and made[key]) then
    return true
  end
  local name = partition_name(y, m)
  local yes, err = tx:has_table(name)
  if yes == nil then
    return nil, err
  end
  if yes then
    known[key] = true
    return true
  end
  local _, lerr = tx:exec("SELECT pg_advisory_xact_lock(" .. PARTITION_LOCK
                          .. ")")
  if lerr then
    return nil, lerr
  end
  local ny, nm = next_month(y, m)
  local from = civil.days(y, m) * 86400000
  local to = civil.days(ny, nm) * 86400000
  local _, cerr = tx:exec(string.format("CREATE TABLE IF NOT EXISTS %s"
    .. " PARTITION OF paygate_audit FOR VALUES FROM (%d) TO (%d)", name,
    from, to))
  if cerr and cerr.code ~= "42P17" then    -- 42P17: another partition
    return nil, cerr                       -- already covers the month
  end
  if not made then
    made = {}
    made_in[tx] = made
  end
  made[key] = true
  return true
end

-- The partition of at's month and of the month after it (created ahead,
-- so the first entries of a month rarely wait for a CREATE).
local function ensure_partitions(tx, at)
  local l, err = detect_layout(tx, tx.db)
  if not l then
    return nil, err
  end
  if l ~= "partitioned" then
    return true
  end
  local y, m = month_of(at)
  local ok, perr = ensure_month(tx, y, m)
  if not ok then
    return nil, perr
  end
  return ensure_month(tx, next_month(y, m))
end

local function create(tx)
  if tx.engine == "postgres" then
    -- CREATE TABLE IF NOT EXISTS races between sessions in PostgreSQL.
    local _, lerr = tx:exec("SELECT pg_advisory_xact_lock(7217002)")
    if lerr then
      return nil, lerr
    end
    local ok, err = tx:exec_script(SCHEMA.postgres)
    if not ok then
      return nil, err
    end
    return ensure_partitions(tx, floor(core.time() * 1000))
  end
  return tx:exec_script(SCHEMA[tx.engine])
end

--- syntax: ok, err = audit.ensure_schema(db)
-- Creates the tables once per db handle (idempotent, safe to race).
-- yields: until committed
function _M.ensure_schema(db)
  if getmetatable(db) ~= sql.DB then
    error("audit.ensure_schema: db must be a paygate.sql db", 2)
  end
  if ready[db] then
    return true
  end
  local ok, err = db:transaction(create)
  if not ok then
    return nil, err
  end
  ready[db] = true
  return true
end

--- syntax: layout, err = audit.layout(q)
-- returns: "partitioned" (PostgreSQL, monthly partitions), "plain" (an
-- unpartitioned PostgreSQL table made by an older paygate), "absent" (no
-- table yet) or "sqlite".
-- yields: one query (PostgreSQL, once per handle)
function _M.layout(q)
  local mt = getmetatable(q)
  if mt ~= sql.DB and mt ~= sql.TX then
    error("audit.layout: q must be a paygate.sql db or tx", 2)
  end
  if q.engine ~= "postgres" then
    return "sqlite"
  end
  return detect_layout(q, mt == sql.TX and q.db or q)
end

--- syntax: names, err = audit.create_partitions(db[, { ahead = 2 }])
-- PostgreSQL, partitioned layout: makes sure the partitions of this month
-- and of the `ahead` months after it exist, in a transaction of their
-- own (appends create their month and the next on demand; calling this
-- from a daily timer keeps that CREATE out of the business
-- transactions). returns: the partition names ({} on SQLite or the plain
-- layout). yields: one transaction
function _M.create_partitions(db, opts)
  if getmetatable(db) ~= sql.DB then
    error("audit.create_partitions: db must be a paygate.sql db", 2)
  end
  local ahead = opts and opts.ahead or 2
  if type(ahead) ~= "number" or ahead < 0 or ahead % 1 ~= 0 or ahead > 120
  then
    error("audit.create_partitions: opts.ahead must be an integer in"
          .. " 0..120", 2)
  end
  local ok, err = _M.ensure_schema(db)
  if not ok then
    return nil, err
  end
  if db.engine ~= "postgres" then
    return {}
  end
  return db:transaction(function(tx)
    local l, lerr = detect_layout(tx, db)
    if not l then
      return nil, lerr
    end
    local names = {}
    if l ~= "partitioned" then
      return names
    end
    local y, m = month_of(floor(core.time() * 1000))
    for _ = 0, ahead do
      local cok, cerr = ensure_month(tx, y, m)
      if not cok then
        return nil, cerr
      end
      names[#names + 1] = partition_name(y, m)
      y, m = next_month(y, m)
    end
    return names
  end)
end

--- syntax: res, err = audit.partition_legacy(db)
-- PostgreSQL: turns an unpartitioned paygate_audit (an older version's)
-- into the partitioned layout, in one transaction: the old table becomes
-- the partition of everything before next month (its rows stay where
-- they are), partitions from next month on are made. It holds an
-- exclusive lock on the table while it checks the old rows once: stop
-- the instances first (a running one keeps its handle's idea of the
-- layout until it restarts).
-- returns: "migrated", "partitioned" (nothing to do), "sqlite"
-- yields: one transaction
function _M.partition_legacy(db)
  if getmetatable(db) ~= sql.DB then
    error("audit.partition_legacy: db must be a paygate.sql db", 2)
  end
  if db.engine ~= "postgres" then
    return "sqlite"
  end
  local ok, err = _M.ensure_schema(db)
  if not ok then
    return nil, err
  end
  layout[db] = nil
  local res, terr = db:transaction(function(tx)
    local _, lerr = tx:exec("LOCK TABLE paygate_audit IN ACCESS EXCLUSIVE"
                            .. " MODE")
    if lerr then
      return nil, lerr
    end
    local l, derr = detect_layout(tx, db, true)
    if not l then
      return nil, derr
    end
    layout[db] = nil
    if l == "partitioned" then
      return "partitioned"
    end
    local y, m = next_month(month_of(floor(core.time() * 1000)))
    local bound = civil.days(y, m) * 86400000
    local steps = {
      "ALTER TABLE paygate_audit RENAME TO paygate_audit_legacy",
      "ALTER TABLE paygate_audit_legacy ADD CONSTRAINT"
        .. " paygate_audit_legacy_range CHECK (at < " .. bound .. ")",
    }
    local pk, perr = tx:query("SELECT conname FROM pg_constraint WHERE"
      .. " conrelid = 'paygate_audit'::regclass AND contype = 'p'")
    if not pk then
      return nil, perr
    end
    -- A partition's primary key must be the parent's: (subject, seq) is
    -- replaced by (subject, seq, at) (the heads keep seqs unique).
    table.insert(steps, 2, "ALTER TABLE paygate_audit_legacy "
      .. (pk[1] and "DROP CONSTRAINT " .. string.format("%q", pk[1].conname)
          .. ", " or "")
      .. "ADD CONSTRAINT paygate_audit_legacy_pkey PRIMARY KEY (subject,"
      .. " seq, at)")
    steps[#steps + 1] = SCHEMA.postgres:match("^(.-%);)")
    steps[#steps + 1] = "ALTER TABLE paygate_audit ATTACH PARTITION"
      .. " paygate_audit_legacy FOR VALUES FROM (MINVALUE) TO (" .. bound
      .. ")"
    for _, stmt in ipairs(steps) do
      local _, serr = tx:exec(stmt)
      if serr then
        return nil, serr
      end
    end
    for _ = 1, 2 do
      local cok, cerr = ensure_month(tx, y, m)
      if not cok then
        return nil, cerr
      end
      y, m = next_month(y, m)
    end
    return "migrated"
  end)
  layout[db], months[db] = nil, nil
  if res then
    core.log(1, "audit: paygate_audit is " .. (res == "migrated"
      and "now partitioned by month (the old table is the partition"
          .. " paygate_audit_legacy)" or "already partitioned"), nil)
  end
  return res, terr
end

-- Inside a caller's transaction: db:transaction cannot nest, so the tables
-- are made in the caller's tx when missing (undone with it on rollback,
-- which is why only a table found existing marks the handle ready).
local function ensure_in_tx(tx)
  local db = tx.db
  if ready[db] or created_in[tx] then
    return true
  end
  local yes, err = both_tables(tx)
  if yes == nil then
    return nil, err
  end
  if yes then
    ready[db] = true
    return true
  end
  local ok, cerr = create(tx)
  if not ok then
    return nil, cerr
  end
  created_in[tx] = true
  return true
end

-- q: a db or a tx (inside a transaction the query must go through the tx:
-- on PostgreSQL a read on db would wait for a second pool connection).
local function tables_exist(q)
  local db = getmetatable(q) == sql.TX and q.db or q
  if ready[db] then
    return true
  end
  return both_tables(q)
end

---------------------------------------------------- canonical form

-- A key's JSON text, kept: evidence keys are a program's few names
-- (gw.notify_atomic's seven), encoded again for every entry otherwise.
-- Bounded, as evidence may carry keys from outside.
local key_json, key_json_n = {}, 0
local function encode_key(k)
  local s = key_json[k]
  if s == nil then
    s = json.encode(k)
    if key_json_n < 1000 and #k <= 64 then
      key_json[k] = s
      key_json_n = key_json_n + 1
    end
  end
  return s
end

-- Canonical JSON: object keys sorted (byte order), integers exact, no
-- spaces. Only what json.encode accepts is accepted.
local function canon_json(v, out, depth)
  if depth > 100 then
    error("audit: evidence nests too deep", 0)
  end
  local t = type(v)
  if v == json.empty_array then
    out[#out + 1] = "[]"
    return
  end
  if t == "table" and v ~= json.null then
    -- (room for evidence's usual few keys: see canonical_json)
    local n, keys, is_array = 0, new_tab(8, 0), true
    for k in pairs(v) do
      n = n + 1
      keys[n] = k
      if type(k) ~= "number" then
        is_array = false
      end
    end
    if n > 0 and is_array then
      for i = 1, n do
        if v[i] == nil then
          is_array = false
          break
        end
      end
    end
    if n > 0 and is_array then
      out[#out + 1] = "["
      for i = 1, n do
        if i > 1 then
          out[#out + 1] = ","
        end
        canon_json(v[i], out, depth + 1)
      end
      out[#out + 1] = "]"
      return
    end
    for i = 1, n do
      if type(keys[i]) ~= "string" then
        error("audit: evidence keys must be strings (or 1..n)", 0)
      end
    end
    sort(keys)
    out[#out + 1] = "{"
    for i = 1, n do
      if i > 1 then
        out[#out + 1] = ","
      end
      out[#out + 1] = key_json[keys[i]] or encode_key(keys[i])
      out[#out + 1] = ":"
      canon_json(v[keys[i]], out, depth + 1)
    end
    out[#out + 1] = "}"
    return
  end
  out[#out + 1] = json.encode(v)
end

--- syntax: s = audit.canonical_json(v)
-- returns: v as JSON with sorted keys (the text stored as evidence).
function _M.canonical_json(v)
  -- room for an object of ten keys with plain values ("{", and a key's
  -- ",", name and ":" and value): what evidence mostly is; a bigger one
  -- grows as any table does
  local out = new_tab(41, 0)
  canon_json(v, out, 0)
  return concat(out)
end

-- The fields, in hash order. Text fields are length-prefixed ("s5:hello"),
-- an absent one is "n", integers are "i" .. decimal: no two entries share
-- a serialization.
local FIELDS = { "subject", "seq", "what", "ref", "from", "to", "cause",
                 "actor", "at", "evidence", "prev_hash" }
local INTEGER = { seq = true, at = true }

local function field(v, integer)
  if v == nil or v == sql.null then
    return "n"
  end
  if integer then
    if type(v) == "number" then
      if v % 1 ~= 0 then
        -- never written (append takes integers only): a row edited to a
        -- fraction must not hash as the integer %d would truncate it to
        return "r" .. string.format("%.17g", v)
      end
      return "i" .. string.format("%d", v)
    end
    return "i" .. tostring(v)         -- past 2^53: the store's exact digits
  end
  v = tostring(v)
  return "s" .. #v .. ":" .. v
end

--- syntax: s = audit.canonical(entry)
-- returns: the bytes the entry's hash covers.
function _M.canonical(e)
  local parts = new_tab(#FIELDS + 1, 0)
  parts[1] = FORMAT
  for i = 1, #FIELDS do
    local name = FIELDS[i]
    parts[i + 1] = field(e[name], INTEGER[name])
  end
  return concat(parts, "\n")
end

--- syntax: hex = audit.hash(entry)
-- returns: lower-case hex SHA-256 of audit.canonical(entry).
function _M.hash(e)
  return crypto.hex(crypto.digest("sha256", _M.canonical(e)))
end
local hash = _M.hash

-------------------------------------------------------------- append

-- level: of the public function's caller, seen from check_text's caller
-- (default 2: check_text called by the public function itself).
local function check_text(fname, name, v, required, level)
  if v == nil and not required then
    return
  end
  if type(v) ~= "string" or (required and v == "") then
    error(fname .. ": " .. name .. " must be a"
          .. (required and " non-empty" or "") .. " string",
          (level or 2) + 1)
  end
end

local COLS = "subject, seq, what, ref, from_state, to_state, cause, actor,"
  .. " at, evidence, prev_hash, hash"
local INSERT = "INSERT INTO paygate_audit (" .. COLS .. ") VALUES ($1, $2,"
  .. " $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"

local function append_tx(tx, subject, e)
  local ok, serr = ensure_in_tx(tx)
  if not ok then
    return nil, serr
  end
  if tx.engine == "postgres" then
    ok, serr = ensure_partitions(tx, e.at)
    if not ok then
      return nil, serr
    end
  end
  for _ = 1, APPEND_ATTEMPTS do
    local rows, err = tx:query("SELECT seq, hash FROM paygate_audit_heads"
      .. " WHERE subject = $1", { subject })
    if not rows then
      return nil, err
    end
    local head = rows[1]
    local entry = {
      subject = subject, seq = head and head.seq + 1 or 1, what = e.what,
      ref = e.ref, from = e.from, to = e.to, cause = e.cause,
      actor = e.actor, at = e.at, evidence = e.evidence,
      prev_hash = head and head.hash or GENESIS,
    }
    entry.hash = hash(entry)
    -- Move the head first: whoever moves it owns the seq.
    local res
    if head then
      res, err = tx:exec("UPDATE paygate_audit_heads SET seq = $2,"
        .. " hash = $3 WHERE subject = $1 AND seq = $4",
        { subject, entry.seq, entry.hash, head.seq })
    else
      res, err = tx:exec("INSERT INTO paygate_audit_heads (subject, seq,"
        .. " hash) VALUES ($1, $2, $3) ON CONFLICT (subject) DO NOTHING",
        { subject, entry.seq, entry.hash })
    end
    if not res then
      return nil, err
    end
    if res.changes == 1 then
      res, err = tx:exec(INSERT, { n = 12, subject, entry.seq, entry.what,
        entry.ref, entry.from, entry.to, entry.cause, entry.actor, entry.at,
        entry.evidence, entry.prev_hash, entry.hash })
      if not res then
        return nil, err
      end
      return entry
    end
    -- someone else appended since we read the head: read it again
  end
  return nil, core.error("conflict", "audit append: the chain of "
    .. subject .. " kept moving", { retryable = true, subject = subject })
end

-- e's optional text fields, and their names in errors (made once here,
-- not for every entry)
local OPTIONAL_TEXT = { "ref", "from", "to", "cause", "actor" }
local OPTIONAL_NAME = {}
for _, k in ipairs(OPTIONAL_TEXT) do
  OPTIONAL_NAME[k] = "e." .. k
end

--- syntax: entry, err = audit.append(tx_or_db, subject, e)
-- e: { what (string, required), ref, from, to, cause, actor (strings),
--      at (epoch ms; default now), evidence (a table, stored as canonical
--      JSON, or a JSON string stored as given) }.
-- Given a tx (inside db:transaction), the entry commits or rolls back
-- with it; given a db, it runs in its own transaction.
-- returns: the entry { subject, seq, hash, prev_hash, at, evidence, ... },
--          or nil, err: the store's kinds, "conflict", or "too_large"
--          (evidence over audit.MAX_EVIDENCE bytes as stored: not written)
-- yields: until written (with a db: committed and durable)
-- Checks e (raising at the caller of the public function fname) and
-- returns the entry's fields: at defaulted, evidence as canonical JSON
-- (or nil, err "too_large").
local function entry_of(fname, subject, e)
  check_text(fname, "subject", subject, true, 3)
  if type(e) ~= "table" then
    error(fname .. ": e must be a table", 3)
  end
  check_text(fname, "e.what", e.what, true, 3)
  for i = 1, #OPTIONAL_TEXT do
    local k = OPTIONAL_TEXT[i]
    check_text(fname, OPTIONAL_NAME[k], e[k], false, 3)
  end
  local at = e.at
  if at == nil then
    at = floor(core.time() * 1000)
  elseif type(at) ~= "number" or at % 1 ~= 0 or at < 0
         or at > MAX_AT then
    error(fname .. ": e.at must be an integer of epoch ms (up to the"
          .. " year 9999)", 3)
  end
  local evidence = e.evidence
  if type(evidence) == "table" then
    local ok, s = pcall(_M.canonical_json, evidence)
    if not ok then
      error(fname .. ": e.evidence: " .. tostring(s), 3)
    end
    evidence = s
  elseif evidence ~= nil and type(evidence) ~= "string" then
    error(fname .. ": e.evidence must be a table or a JSON string", 3)
  end
  -- Returned, not raised: evidence holds data from outside (WeChat's
  -- fields, error texts), so its size is an outcome of the input, which
  -- the caller's transaction rolls back on like any other failure.
  if evidence and #evidence > MAX_EVIDENCE then
    return nil, core.error("too_large", fname .. ": e.evidence is "
      .. #evidence .. " bytes of JSON, over the " .. MAX_EVIDENCE
      .. " an entry holds (keep identifiers and short facts in it)",
      { retryable = false, size = #evidence, limit = MAX_EVIDENCE })
  end
  return { what = e.what, ref = e.ref, from = e.from, to = e.to,
           cause = e.cause, actor = e.actor, at = at, evidence = evidence }
end

function _M.append(q, subject, e)
  local mt = getmetatable(q)
  if mt ~= sql.DB and mt ~= sql.TX then
    error("audit.append: q must be a paygate.sql db or tx", 2)
  end
  local entry, eerr = entry_of("audit.append", subject, e)
  if not entry then
    return nil, eerr
  end
  if mt == sql.TX then
    return append_tx(q, subject, entry)
  end
  local ok, err = _M.ensure_schema(q)
  if not ok then
    return nil, err
  end
  return q:transaction(function(tx)
    return append_tx(tx, subject, entry)
  end)
end

---------------------------------------------------------------- plan

-- The statements' names, which a conflict error carries (err.name).
_M.HEAD_STMT = "audit.head"
_M.ENTRY_STMT = "audit.entry"

--- syntax: entry, stmts = audit.plan(subject, e, head)
-- The append of e as statements for db:atomic (the tables must exist:
-- audit.ensure_schema(db) once). head is the subject's head read
-- beforehand: audit.head(q, subject)'s answer ({ seq, hash }, or false
-- for a subject without entries). The statements move the head only
-- from the seq read (expect = 1: an UPDATE ... WHERE seq = <read>, or the
-- first head's insert) and insert the entry under the primary key
-- (subject, seq): if another writer appended in between, the job fails
-- with kind "conflict" (err.name "audit.head" or "audit.entry") and
-- nothing of it is kept; read the head again and plan again.
-- returns: the entry (as audit.append's), and the statements; or nil, err
--          ("too_large": the evidence is over audit.MAX_EVIDENCE bytes)
function _M.plan(subject, e, head)
  local entry, eerr = entry_of("audit.plan", subject, e)
  if head ~= false and (type(head) ~= "table" or type(head.hash) ~= "string"
     or type(head.seq) ~= "number") then
    error("audit.plan: head must be audit.head()'s { seq, hash } or false",
          2)
  end
  if not entry then
    return nil, eerr
  end
  entry.subject = subject
  entry.seq = head and head.seq + 1 or 1
  entry.prev_hash = head and head.hash or GENESIS
  entry.hash = hash(entry)
  local move
  if head then
    move = { "UPDATE paygate_audit_heads SET seq = $2, hash = $3 WHERE"
      .. " subject = $1 AND seq = $4",
      { subject, entry.seq, entry.hash, head.seq },
      expect = 1, name = _M.HEAD_STMT }
  else
    move = { "INSERT INTO paygate_audit_heads (subject, seq, hash) VALUES"
      .. " ($1, $2, $3) ON CONFLICT (subject) DO NOTHING",
      { subject, entry.seq, entry.hash }, expect = 1, name = _M.HEAD_STMT }
  end
  return entry, {
    move,
    { INSERT, { n = 12, subject, entry.seq, entry.what, entry.ref,
      entry.from, entry.to, entry.cause, entry.actor, entry.at,
      entry.evidence, entry.prev_hash, entry.hash }, expect = 1,
      name = _M.ENTRY_STMT, audit_at = entry.at },
  }
end

-- audit.prepare's PostgreSQL side (apart: its closure would keep the
-- JIT from compiling audit.prepare on SQLite).
local function prepare_pg(db, stmts)
  for i = 1, #stmts do
    local at = stmts[i].audit_at
    if at and layout[db] ~= "plain" then
      local y, m = month_of(at)
      local known = months[db]
      if not (known and known[y * 100 + m]) then
        local ok, err = _M.ensure_schema(db)
        if not ok then
          return nil, err
        end
        ok, err = db:transaction(function(tx)
          return ensure_partitions(tx, at)
        end)
        if not ok then
          return nil, err
        end
        if layout[db] == "partitioned" then
          -- committed: this month's partition and the next one's exist
          known = months[db] or {}
          months[db] = known
          local ny, nm = next_month(y, m)
          known[y * 100 + m], known[ny * 100 + nm] = true, true
        end
      end
    end
  end
  return true
end

--- syntax: ok, err = audit.prepare(db, stmts)
-- Before db:atomic runs statements that came from audit.plan: on
-- PostgreSQL with the partitioned layout, makes sure the partitions of the
-- entries' months exist (an append in a transaction creates them itself;
-- a db:atomic job cannot, so without this the first entry of a month
-- nobody created ahead would fail). Known per handle and month (the
-- months cache appends fill too): after the first time, no query. A
-- no-op on SQLite and on the plain layout.
-- yields: one transaction the first time a month is seen
function _M.prepare(db, stmts)
  if db.engine ~= "postgres" then
    return true
  end
  return prepare_pg(db, stmts)
end

---------------------------------------------------------------- read

local SELECT = "SELECT subject, seq, what, ref, from_state, to_state, cause,"
  .. " actor, at, evidence, prev_hash, hash FROM paygate_audit"

local function to_entry(r)
  return { subject = r.subject, seq = r.seq, what = r.what, ref = r.ref,
           from = r.from_state, to = r.to_state, cause = r.cause,
           actor = r.actor, at = r.at, evidence = r.evidence,
           prev_hash = r.prev_hash, hash = r.hash }
end

local function check_q(fname, q)
  local mt = getmetatable(q)
  if mt ~= sql.DB and mt ~= sql.TX then
    error(fname .. ": q must be a paygate.sql db or tx", 3)
  end
end

--- syntax: entries, err = audit.entries(q, subject)
-- returns: the subject's entries in seq order (evidence as stored: JSON
-- text), {} when it has none.
-- yields: until read
function _M.entries(q, subject)
  check_q("audit.entries", q)
  check_text("audit.entries", "subject", subject, true)
  local exists, err = tables_exist(q)
  if not exists then
    return err and nil or {}, err
  end
  local rows
  rows, err = q:query(SELECT .. " WHERE subject = $1 ORDER BY seq",
                      { subject })
  if not rows then
    return nil, err
  end
  for i = 1, #rows do
    rows[i] = to_entry(rows[i])
  end
  return rows
end

--- syntax: head, err = audit.head(q, subject)
-- returns: { seq, hash } of the subject's last entry, or false when the
-- subject has none. Keep these elsewhere to anchor the chains.
-- yields: until read
function _M.head(q, subject)
  check_q("audit.head", q)
  check_text("audit.head", "subject", subject, true)
  local exists, err = tables_exist(q)
  if not exists then
    if err then
      return nil, err
    end
    return false
  end
  local rows
  rows, err = q:query("SELECT seq, hash FROM paygate_audit_heads WHERE"
    .. " subject = $1", { subject })
  if not rows then
    return nil, err
  end
  return rows[1] or false
end

-------------------------------------------------------------- verify

-- A checker is fed one subject's rows in seq order, then its head; it
-- keeps the first break found.
local function checker(subject)
  return { subject = subject, expect = 1, prev = GENESIS, entries = 0 }
end

local function broken(c, seq, reason, message)
  if not c.broken then
    c.broken = { subject = c.subject, seq = seq, reason = reason,
                 message = message }
  end
end

local function feed(c, r)
  c.entries = c.entries + 1
  c.tail = r                      -- the last row read (verify_all's renames)
  if c.broken then
    return
  end
  local e = to_entry(r)
  if e.seq ~= c.expect then
    if type(e.seq) == "number" and e.seq > c.expect then
      broken(c, c.expect, "missing", "seq " .. c.expect
        .. (e.seq - 1 > c.expect and ".." .. (e.seq - 1) or "")
        .. " missing (deleted)")
    else
      broken(c, e.seq, "bad_seq", "unexpected seq " .. tostring(e.seq)
        .. " where " .. c.expect .. " belongs (inserted)")
    end
    return
  end
  if e.prev_hash ~= c.prev then
    broken(c, e.seq, "broken_link", "prev_hash of seq " .. e.seq
      .. " is not the hash of seq " .. (e.seq - 1)
      .. " (a row before it edited, inserted or deleted)")
    return
  end
  if hash(e) ~= e.hash then
    broken(c, e.seq, "edited", "seq " .. e.seq
      .. " does not match its hash (edited or renumbered)")
    return
  end
  c.expect = e.seq + 1
  c.prev = e.hash
end

local function finish(c, head)
  if c.broken then
    return c.broken
  end
  local last = c.expect - 1
  if not head then
    broken(c, last, "head_missing", "no head row for " .. last
      .. " entries (head deleted)")
  elseif type(head.seq) ~= "number" or head.seq % 1 ~= 0 then
    broken(c, last, "head_mismatch", "the head's seq "
      .. string.format("%q", tostring(head.seq)) .. " is no integer (head"
      .. " edited)")
  elseif head.seq ~= last then
    if head.seq > last then
      broken(c, last + 1, "missing", "seq " .. (last + 1)
        .. (head.seq > last + 1 and ".." .. head.seq or "")
        .. " missing (deleted): the head is at seq " .. head.seq)
    else
      broken(c, head.seq + 1, "bad_seq", "seq " .. (head.seq + 1) .. ".."
        .. last .. " beyond the head at seq " .. tostring(head.seq)
        .. " (inserted)")
    end
  elseif head.hash ~= c.prev then
    broken(c, last, "head_mismatch", "the head's hash is not seq " .. last
      .. "'s (head or last entry edited)")
  end
  return c.broken
end

--- syntax: ok, report = audit.verify(q, subject)
-- returns: true, { subject, entries = n } when the chain holds; false,
-- { subject, seq, reason, message, entries } at its first break (reason:
-- "edited", "missing", "bad_seq", "broken_link", "head_missing",
-- "head_mismatch"); nil, err when the store fails.
-- The entries and the head are read by separate queries, so an append
-- committing between them shows a head past the entries read: they are
-- read on from there, until a round finds no entry the head read before
-- it names (then they are missing), at most ROUNDS rounds.
-- yields: until read
function _M.verify(q, subject)
  check_q("audit.verify", q)
  check_text("audit.verify", "subject", subject, true)
  local exists, err = tables_exist(q)
  if not exists then
    if err then
      return nil, err
    end
    -- (tables = false: no audit trail at all, as verify_all says it)
    return true, { subject = subject, entries = 0, tables = false }
  end
  local c, last, head = checker(subject), nil, nil
  for round = 1, ROUNDS do
    local got = 0
    while true do
      local rows
      if last then
        -- (seq, at): on PostgreSQL a second row with a seq can be in
        -- another month (see SCHEMA); a page must not end between them
        rows, err = q:query(SELECT .. " WHERE subject = $1 AND (seq, at) >"
          .. " ($2, $3) ORDER BY seq, at LIMIT " .. PAGE,
          { subject, last.seq, last.at })
      else
        rows, err = q:query(SELECT .. " WHERE subject = $1 ORDER BY seq, at"
          .. " LIMIT " .. PAGE, { subject })
      end
      if not rows then
        return nil, err
      end
      for i = 1, #rows do
        feed(c, rows[i])
      end
      got = got + #rows
      last = rows[#rows] or last
      if #rows < PAGE then
        break
      end
    end
    head, err = _M.head(q, subject)
    if head == nil then
      return nil, err
    end
    -- the head is past the entries read, and the last round read some:
    -- appends may have committed in between
    if not (head and (round == 1 or got > 0) and type(head.seq) == "number"
            and head.seq > (last and tonumber(last.seq) or 0)) then
      break
    end
  end
  if c.entries == 0 and not head then
    return true, { subject = subject, entries = 0 }
  end
  local b = finish(c, head)
  if b then
    b.entries = c.entries
    return false, b
  end
  return true, { subject = subject, entries = c.entries }
end

-- A cursor over a query ordered by subject (and seq), fetched in pages
-- with keyset pagination.
local function cursor(q, first_sql, next_sql, key)
  local cur = { rows = {}, i = 1, done = false }
  local started = false
  function cur.peek()
    if cur.i > #cur.rows and not cur.done then
      local rows, err
      if not started then
        rows, err = q:query(first_sql)
        started = true
      else
        rows, err = q:query(next_sql, key(cur.rows[#cur.rows]))
      end
      if not rows then
        error(err, 0)
      end
      cur.rows, cur.i = rows, 1
      cur.done = #rows < PAGE
    end
    return cur.rows[cur.i]
  end
  function cur.next()
    local r = cur.peek()
    cur.i = cur.i + 1
    return r
  end
  return cur
end

-- A chain renamed: its entries under one subject and its head under
-- another (an UPDATE of the subject in one of the two tables) showed as
-- two broken chains, one under each name: entries without a head, and a
-- head without entries. The two are one chain when the head's seq and
-- hash are those of the last entry (a SHA-256: no coincidence), and the
-- entries verify under one of the two names: that is the chain's own
-- name (it is in every entry's hash). Only such pairs are merged; any
-- other break keeps its own report.
--
-- headless: { { report, tail }, ... } -- entries, no head
-- lone: { { report, head }, ... } -- a head, no entries
-- returns: the merged reports ({ subject, seq, reason = "renamed",
-- renamed = the other name, message, entries }), the reports replaced
-- (a set), or nil, err when the store fails.
local function by_hash(halves, field)
  local t = {}
  for _, x in ipairs(halves) do
    local h = x[field].hash
    t[h] = t[h] == nil and x or false     -- false: more than one
  end
  return t
end

local function pair_renames(q, headless, lone)
  local merged, replaced = {}, {}
  local tails, heads = by_hash(headless, "tail"), by_hash(lone, "head")
  for h, a in pairs(tails) do
    local b = heads[h]
    if a and b and b.head.seq == a.tail.seq then
      local rep
      if a.report.reason == "head_missing" then
        -- the entries hold under their own name: the head was moved
        rep = { subject = a.report.subject, seq = a.report.seq,
          reason = "renamed", renamed = b.report.subject,
          message = "its head row is under the subject "
            .. b.report.subject .. " (renamed)" }
      else
        -- do the entries hold under the head's name? they were moved
        local rows, err = _M.entries(q, a.report.subject)
        if not rows then
          return nil, err
        end
        local c = checker(b.report.subject)
        for i = 1, #rows do
          rows[i].subject = b.report.subject
          rows[i].from_state, rows[i].to_state = rows[i].from, rows[i].to
          feed(c, rows[i])
        end
        if #rows > 0 and not finish(c, b.head) then
          rep = { subject = b.report.subject, seq = 1, reason = "renamed",
            renamed = a.report.subject,
            message = "its entries are under the subject "
              .. a.report.subject .. " (renamed)" }
        end
      end
      if rep then
        rep.entries = a.report.entries
        merged[#merged + 1] = rep
        replaced[a.report], replaced[b.report] = true, true
      end
    end
  end
  return merged, replaced
end

--- syntax: ok, summary = audit.verify_all(q[, opts])
-- Walks every chain once (two ordered streams merged: entries and heads).
-- returns: ok (true when every chain holds), { subjects = n, entries = n,
-- broken = { report, ... } } (reports as audit.verify's, in subject
-- order); nil, err when the store fails. opts.on_broken(report) is
-- called for each broken chain as it is found. A chain whose head or
-- entries were moved to another subject is one report under the
-- chain's own name (reason "renamed", report.renamed the other name),
-- given once the walk has ended, and one subject in the count.
-- yields: until read
function _M.verify_all(q, opts)
  check_q("audit.verify_all", q)
  if opts ~= nil and type(opts) ~= "table" then
    error("audit.verify_all: opts must be a table", 2)
  end
  local on_broken = opts and opts.on_broken
  local exists, err = tables_exist(q)
  if not exists then
    if err then
      return nil, err
    end
    return true, { subjects = 0, entries = 0, broken = {}, tables = false }
  end
  local summary = { subjects = 0, entries = 0, broken = {}, tables = true }
  local headless, lone, deferred = {}, {}, {}
  -- (subject, seq, at): a page must not end between two rows with one
  -- seq (PostgreSQL, see verify)
  local entries = cursor(q,
    SELECT .. " ORDER BY subject, seq, at LIMIT " .. PAGE,
    SELECT .. " WHERE (subject, seq, at) > ($1, $2, $3) ORDER BY subject,"
      .. " seq, at LIMIT " .. PAGE,
    function(r) return { r.subject, r.seq, r.at } end)
  local heads = cursor(q,
    "SELECT subject, seq, hash FROM paygate_audit_heads ORDER BY subject"
      .. " LIMIT " .. PAGE,
    "SELECT subject, seq, hash FROM paygate_audit_heads WHERE subject > $1"
      .. " ORDER BY subject LIMIT " .. PAGE,
    function(r) return { r.subject } end)
  local ok, perr = pcall(function()
    while true do
      local e, h = entries.peek(), heads.peek()
      if not e and not h then
        break
      end
      -- byte order, as the C/BINARY collation orders them
      local subject = (not h or (e and e.subject < h.subject)) and e.subject
                      or h.subject
      local c = checker(subject)
      while true do
        e = entries.peek()
        if not e or e.subject ~= subject then
          break
        end
        feed(c, entries.next())
      end
      local head = h and h.subject == subject and heads.next() or nil
      summary.subjects = summary.subjects + 1
      local b, n = finish(c, head), c.entries
      if b then
        -- the chain's entries and its head were read at different times:
        -- appends in between look like a break, verify reads it again
        local vok, rep = _M.verify(q, subject)
        if vok == nil then
          error(rep, 0)
        end
        b, n = not vok and rep or nil, rep.entries
      end
      summary.entries = summary.entries + n
      if b then
        summary.broken[#summary.broken + 1] = b
        -- half of a renamed chain, perhaps: told once the walk has ended
        if n > 0 and not head and c.tail and (b.reason == "head_missing"
           or (b.reason == "edited" and b.seq == 1)) then
          headless[#headless + 1] = { report = b, tail = c.tail }
        elseif n == 0 and head and b.reason == "missing" then
          lone[#lone + 1] = { report = b, head = head }
        elseif on_broken then
          on_broken(b)
        end
      end
    end
  end)
  if not ok then
    if core.is_error(perr) then
      return nil, perr
    end
    error(perr, 0)
  end
  local merged, replaced = pair_renames(q, headless, lone)
  if not merged then
    return nil, replaced
  end
  local list = {}
  for _, b in ipairs(summary.broken) do
    if not replaced[b] then
      list[#list + 1] = b
    end
  end
  for _, b in ipairs(merged) do
    list[#list + 1] = b
  end
  sort(list, function(x, y) return x.subject < y.subject end)
  summary.broken = list
  summary.subjects = summary.subjects - #merged
  if on_broken then
    -- the halves that were no rename, then the renames
    for _, t in ipairs({ headless, lone }) do
      for _, half in ipairs(t) do
        if not replaced[half.report] then
          deferred[#deferred + 1] = half.report
        end
      end
    end
    for _, b in ipairs(merged) do
      deferred[#deferred + 1] = b
    end
    sort(deferred, function(x, y) return x.subject < y.subject end)
    for _, b in ipairs(deferred) do
      on_broken(b)
    end
  end
  return #summary.broken == 0, summary
end

return _M
