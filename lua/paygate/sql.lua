-- paygate.sql: one SQL API over two engines.
--
--   sqlite:PATH[?opt=v&...]        embedded default (writer thread, group
--                                  commit, reader threads: src/store/lsqlite.c)
--   postgres://user@host:port/db   libpq on the loop (src/store/lpg.c)
--
-- Options come in opts or in the URL's query string (opts wins); the
-- engines check them (src/store/store.c) and raise naming the option.
--
-- Parameters are always bound, never spliced: write $1, $2 ... (both
-- engines) or ? (SQLite only), and pass the values as an array. Use
-- sql.null (or params.n) for a NULL in the middle of the array.
--
-- Every failure returns nil, err (the core.error shape: tostring gives
-- "kind: message") with err.kind one of: constraint (with err.constraint
-- naming it), unavailable, timeout, serialization, busy, syntax, misuse,
-- unknown_outcome (PostgreSQL: a COMMIT, or a write outside a transaction,
-- that may have committed: never run again here), too_large (SQLite: a
-- string or blob over its length limit; PostgreSQL: a program limit,
-- SQLSTATE class 54), closed, error;
-- err.retryable says whether trying again can help.
-- Misuse raises, naming the function and the argument: wrong argument
-- types, a bad option, a value that cannot be bound, a closed db.

local core = require "paygate.core"
local redact = require "paygate.redact"
local utf8_clean = require("paygate.utf8").clean

local _M = { _VERSION = "0.1.0" }

_M.null = core.null                   -- NULL light userdata (== cjson.null)
_M.now = core.now                     -- wall clock, seconds (cached)

local DEFAULT_RETRIES = 5

-- paygate_store_errors_total{engine, kind}: every statement, begin,
-- commit or connect the store failed, summed over the workers, by the
-- kinds that say the store did not serve it (down, unreachable, a disk
-- full or read-only, a lock held past the wait, no answer in time, a
-- commit whose outcome is unknown, a host that does not resolve, a login
-- refused, any other failure of the server's): not the caller's own
-- (constraint, syntax, misuse, serialization, too_large, closed). One
-- signal that the store fails, whatever failed on it: an outbox round, a
-- notification, a merchant call. Each engine's kinds have their series
-- from its first sql.open, at 0 (an increase() alert sees the first).
local STORE_FAILED = { "unavailable", "timeout", "unknown_outcome", "busy",
                       "dns", "config", "error" }
local store_failed = {}
for _, kind in ipairs(STORE_FAILED) do store_failed[kind] = true end

local errors_counter         -- the counter; false: no paygate.metrics
local errors_init = {}       -- engine -> true once its series are made
local function errors_metric(engine)
  if errors_counter == nil then
    local ok, m = pcall(require, "paygate.metrics")
    local cok, c
    if ok and type(m) == "table" and m.counter then
      cok, c = pcall(m.counter, "paygate_store_errors_total",
        "Store operations the store failed (down, unreachable, a full"
        .. " disk, no answer in time), by engine and error kind.",
        { "engine", "kind" }, { max_series = 16 })
    end
    errors_counter = cok and c or false
  end
  local c = errors_counter
  if c and not errors_init[engine] then
    errors_init[engine] = true
    for _, kind in ipairs(STORE_FAILED) do
      pcall(c.inc, c, { engine = engine, kind = kind }, 0)
    end
  end
  return c or nil
end

-- Counts err when its kind says the store failed. (pcall: a metric must
-- never turn a store's answer into a raise.)
local function note(engine, err)
  if type(err) == "table" and store_failed[err.kind] then
    local c = errors_metric(engine)
    if c then
      pcall(c.inc, c, { engine = engine, kind = err.kind })
    end
  end
end

-- The two values of a store call, err counted (note) when it failed.
local function noted(engine, res, err)
  if not res then
    note(engine, err)
  end
  return res, err
end

-- The store's health on /metrics, per handle an app opened, labels
-- engine and store (a SQLite file's name; a PostgreSQL URL's hosts and
-- database, no user, password or options):
--   paygate_store_commits_total            COMMITs (fsyncs) of the writer
--   paygate_store_committed_writes_total   writes they acknowledged
--   paygate_store_commit_duration_seconds  histogram: each COMMIT's time
--   paygate_store_reads_total{where}       inline, or on a reader thread
--   paygate_store_round_trips_total        PostgreSQL: requests answered
-- from db:stats(), the difference since the last round added every second
-- by a task of each worker (paygate run; not paygate exec) and once more
-- on db:close() and a graceful stop. Handles on one file (or database)
-- add to one series; past MAX_STORES of them a worker counts the rest in
-- the _overflow series, so handles opened and closed on new files one
-- after another add no series without bound.
local MAX_STORES = 8
local health                 -- the metrics; false: no paygate.metrics
local health_on              -- true once publishing (a worker, or a spec)
local health_dbs = setmetatable({}, { __mode = "k" })  -- db -> published
local health_task            -- the worker's publishing task

local function health_metrics()
  if health == nil then
    local ok, m = pcall(require, "paygate.metrics")
    health = false
    if ok and type(m) == "table" and m.histogram then
      local by = { "engine", "store" }
      local opts = { max_series = MAX_STORES }
      local mok, t = pcall(function()
        local le = require("paygate.sqlite.core").commit_le
        return {
          commits = m.counter("paygate_store_commits_total",
            "COMMITs of the store's writer (each one fsync), by store.",
            by, opts),
          writes = m.counter("paygate_store_committed_writes_total",
            "Writes the store's COMMITs acknowledged (group commit: many"
            .. " per COMMIT), by store.", by, opts),
          duration = m.histogram("paygate_store_commit_duration_seconds",
            "Time of each COMMIT of the store's writer (its fsync), by"
            .. " store.", by, { buckets = le, max_series = MAX_STORES }),
          reads = m.counter("paygate_store_reads_total",
            "Queries served on the loop (where=inline) or by a reader"
            .. " thread (where=reader), by store.",
            { "engine", "store", "where" },
            { max_series = 2 * MAX_STORES }),
          round_trips = m.counter("paygate_store_round_trips_total",
            "Requests the PostgreSQL server answered (a statement, a"
            .. " script, an atomic job), by store.", by, opts),
        }
      end)
      health = mok and t or false
    end
  end
  return health or nil
end

-- The store label of a URL: a SQLite file's name, or a PostgreSQL URL's
-- hosts and database (no user, password or options), at most 64 bytes
-- cut at a character's end (half a character was a U+FFFD on /metrics),
-- a control character or a byte of no character as "?" (paygate.utf8)
local function store_label(engine, url, path)
  local name
  if engine == "sqlite" then
    name = path:match("([^/]*)$")
  else
    local _, _, hostpath = redact.parts(url)
    name = hostpath or ""
  end
  if name == "" then name = "-" end
  return (utf8_clean(name, 64))
end

-- Adds db's counts since the last round (was) to the metrics; pcall: a
-- metric must never fail a store call, nor raise in db:close().
local function health_add(m, db, was)
  local st = db.h:stats()
  local l = was.labels
  local function add(c, labels, key)
    local d = (st[key] or 0) - (was[key] or 0)
    if d > 0 then
      pcall(c.inc, c, labels, d)
      was[key] = st[key]
    end
  end
  if db.engine == "postgres" then
    add(m.round_trips, l, "round_trips")
    return
  end
  add(m.commits, l, "commits")
  add(m.writes, l, "writes")
  add(m.reads, was.inline, "reads_inline")
  add(m.reads, was.reader, "reads_reader")
  local seen = was.buckets
  local lo = 0
  for i, b in ipairs(st.commit_buckets) do
    local s = seen[i]
    if not s then
      s = { count = 0, seconds = 0 }
      seen[i] = s
    end
    local n = b.count - s.count
    if n > 0 then
      -- n commits of this bucket, observed at their mean (within the
      -- bucket, whose bounds are the histogram's): the sum is theirs
      local v = (b.seconds - s.seconds) / n
      if v > b.le then v = b.le end
      if v <= lo then v = b.le < math.huge and (lo + b.le) / 2 or lo * 2 end
      pcall(m.duration.observe, m.duration, v, l, n)
      s.count, s.seconds = b.count, b.seconds
    end
    lo = b.le
  end
end

local function health_publish()
  local m = health_metrics()
  if not m then return end
  for db, was in pairs(health_dbs) do
    if not db.closed then
      pcall(health_add, m, db, was)
    end
  end
end

-- Starts publishing db: its series at 0 (an increase() alert sees the
-- first), and in a worker the task that publishes every second.
local function health_register(db, url)
  local m = health_on and health_metrics()
  local l = { engine = db.engine,
              store = store_label(db.engine, url, db.path) }
  local was = { labels = l }
  health_dbs[db] = was
  if db.engine == "sqlite" then
    was.inline = { engine = l.engine, store = l.store, where = "inline" }
    was.reader = { engine = l.engine, store = l.store, where = "reader" }
    was.buckets = {}
  end
  if not m then return end
  if db.engine == "postgres" then
    pcall(m.round_trips.inc, m.round_trips, l, 0)
  else
    pcall(m.commits.inc, m.commits, l, 0)
    pcall(m.writes.inc, m.writes, l, 0)
    pcall(m.reads.inc, m.reads, was.inline, 0)
    pcall(m.reads.inc, m.reads, was.reader, 0)
    pcall(m.duration.observe, m.duration, 0, l, 0)
  end
end

-- A worker of paygate run publishes; paygate exec does not (its metrics
-- are its own: nothing shows them)
local function health_start()
  local rt = package.loaded["paygate.runtime"]
  if health_task ~= nil or not rt or rt.mode ~= "worker" then return end
  health_on = true
  health_task = core.spawn(function()
    while true do
      core.sleep(1)
      health_publish()
    end
  end)
  local ok, paygate = pcall(require, "paygate")
  if ok and type(paygate) == "table" and paygate.on_stop then
    paygate.on_stop(health_publish)
  end
end

-- For specs under paygate exec: publish as a worker does (every handle
-- opened from now on gets its series at once), one round now.
function _M._publish_health()
  health_on = true
  health_publish()
end

local DB = {}
local co_running = coroutine.running
-- what check_db refuses inside the store's own transaction (writes)
local WRITES = { ["db:exec"] = true, ["db:exec_script"] = true,
  ["db:transaction"] = true, ["db:atomic"] = true,
  ["db:ensure_schema"] = true }
DB.__index = DB

local TX = {}
TX.__index = TX

local unpack = unpack or table.unpack

local function pack(...)
  return { n = select("#", ...), ... }
end

local function parse_query(qs, opts)
  for k, v in qs:gmatch("([^&=]+)=([^&]*)") do
    if opts[k] == nil then
      opts[k] = tonumber(v) or v
    end
  end
  return opts
end

local function copy(t)
  local c = {}
  for k, v in pairs(t or {}) do
    c[k] = v
  end
  return c
end

-- How many of params are bound: params.n when set, else #params. Raises
-- (at level) on an n that is no count: 1e9 made the driver allocate a
-- value for each (an "unavailable: out of memory"), NaN reached C.
local function param_count(where, params, level)
  local n = params.n
  if n == nil then
    return #params
  end
  if type(n) ~= "number" or not (n >= 0 and n <= 65535) or n % 1 ~= 0 then
    error(where .. ": params.n must be a whole number from 0 to 65535",
          level + 1)
  end
  return n
end

-- The misuse error of a NaN parameter at index i (a number that is none:
-- 0/0, math.huge - math.huge). SQLite binds a NaN as NULL, PostgreSQL
-- keeps it in a float column: refused on both, nothing run. (Found by the
-- loops that check each parameter's type, as they go.)
local function nan_error(where, i)
  return core.error("misuse", (where and where .. ": " or "")
    .. "params[" .. i .. "] is NaN"
    .. " (not a number; SQLite would bind NULL for it): nothing ran")
end

-- Raises at the caller of the public function `fname` (a method: level 3
-- from here) unless sql is a string and params nil or a bindable array.
-- returns: a misuse error for a NaN parameter (see nan_error), else nil.
local function check_stmt(fname, sql, params)
  if type(sql) ~= "string" then
    error(fname .. ": sql must be a string", 3)
  end
  if params == nil then
    return
  end
  if type(params) ~= "table" then
    error(fname .. ": params must be a table", 3)
  end
  local n = param_count(fname, params, 3)
  local nan
  for i = 1, n do
    local v = params[i]
    local t = type(v)
    if t == "table" or t == "function" or t == "thread" then
      error(fname .. ": params[" .. i .. "] cannot be bound (a " .. t
            .. "; want a string, number, boolean or sql.null)", 3)
    end
    if v ~= v and not nan then nan = i end
  end
  if nan then return nan_error(fname, nan) end
end

local function check_db(fname, self)
  if getmetatable(self) ~= DB then
    error(fname .. ": call it as db:" .. fname:match("[^:]*$") .. "(...)", 3)
  end
  if self.closed then
    error(fname .. ": db is closed", 3)
  end
  -- A write through db (not tx) from inside one of its own transactions'
  -- fn: on SQLite the writer serves only that transaction until it ends,
  -- so the write would wait for the COMMIT that waits for it (a hang of
  -- tx_timeout, then the transaction rolled back); on PostgreSQL it runs
  -- outside the transaction, on another connection, and waits on the
  -- transaction's own row locks. Refused at once, naming the way out.
  local open = self.tx_open
  if open and WRITES[fname] and open[co_running() or DB] then
    error(fname .. ": called inside this store's own transaction (the fn"
      .. " of db:transaction): write through the tx it was given"
      .. " (tx:exec; nested transactions are not supported), or after"
      .. " the transaction; " .. (self.engine == "sqlite"
        and "on SQLite it would wait for the transaction's COMMIT, which"
          .. " waits for it" or "through db it would run outside the"
          .. " transaction, on another connection"), 3)
  end
end

local function check_tx(fname, self)
  if getmetatable(self) ~= TX then
    error(fname .. ": call it as tx:" .. fname:match("[^:]*$") .. "(...)", 3)
  end
end

-- nil, err (kind closed) for a statement of a transaction whose store was
-- closed (db:close() during it: rolled back), else nil
local function tx_closed(fname, self)
  if self.db and self.db.closed then
    return core.error("closed", fname .. ": the store was closed during"
                      .. " the transaction: rolled back")
  end
end

-- Runs a committed transaction's tx:on_commit functions, in order; one
-- that raises is logged and the rest still run (the commit stands).
local function run_on_commit(list)
  for i = 1, #list do
    local ok, err = pcall(list[i])
    if not ok then
      local lok, pg = pcall(require, "paygate")
      if lok and pg.log then
        pg.log.error("sql: a tx:on_commit function raised (the transaction"
                     .. " is committed)", { error = tostring(err) })
      end
    end
  end
end

-- A raised value that fn meant as its error: a paygate error, or a table
-- with a string kind (error({ kind = ..., message = ... })).
local function is_error_value(v)
  return core.is_error(v) or (type(v) == "table" and type(v.kind) == "string")
end

local function is_retryable_tx(err)
  return type(err) == "table"
    and (err.kind == "serialization" or err.kind == "busy")
end

-- A sqlite: URL's text after the scheme: the file's path (a leading
-- "//" dropped) and the query string.
local function sqlite_parts(rest)
  local path, qs = rest:match("^([^?]*)%??(.*)$")
  if path:sub(1, 2) == "//" then
    path = path:sub(3)
  end
  return path, qs
end

-- Whether a postgres:// URL gives the password itself (user:password@,
-- or ?password=): libpq then takes no other (PGPASSWORD, PGPASSFILE)
local function url_has_password(url)
  local _, userinfo, _, query = redact.parts(url)
  if userinfo and userinfo:match(":(.+)$") then return true end
  return query ~= nil and query:find("[?&]password=[^&]") ~= nil
end

--- syntax: fix, why, from_env = sql.login_fix(url, err[, who[, key]])
-- What to do about a connect to a postgres:// URL refused for good (kind
-- config: a login the server refused, docs/storage.md "A refused login
-- is config"): one sentence chosen by the SQLSTATE in libpq's message, or
-- by libpq's own "no password supplied" (why "no_password"). who: the
-- program that connected, whose user's ~/.pgpass libpq read (default
-- "paygate"); key: the config key that holds the URL, for the fix to
-- name. from_env: true when the password at fault is the one libpq
-- looked for in who's environment (no_password, and a 28P01 for a URL
-- that gives none), which a caller follows with whose environment counts.
-- nil for another error, or another engine's URL.
function _M.login_fix(url, err, who, key)
  if type(err) ~= "table" or err.kind ~= "config"
     or not tostring(url):match("^postgres") then
    return nil
  end
  who = who or "paygate"
  local msg = tostring(err.message)
  local pw = "PGPASSFILE (default ~/.pgpass of the user running " .. who
             .. ", mode 0600, lines host:port:database:user:password) or"
             .. " PGPASSWORD"
  if msg:find("no password supplied", 1, true) then
    return "the server asks for a password and none was given: libpq reads"
           .. " it from " .. pw, "no_password", true
  end
  local state = msg:match(":  (%w%w%w%w%w): ")
  if state == "28P01" then
    local the_url = key and "the URL in " .. key or "the URL"
    if url_has_password(url) then
      return "the server refused the password " .. the_url .. " gives for"
             .. " its user: fix it there", state
    end
    return "the server refused the password for the URL's user, which "
           .. the_url .. " does not give: fix it where libpq took it from, "
           .. pw, state, true
  elseif state == "3D000" then
    local name = tostring(url):match("^%a+://[^/?#]*/([^/?#]+)")
    return "the server has no database " .. (name or "of the URL's name")
           .. ": fix the URL's database name, or create it (docs/gateway.md,"
           .. " On PostgreSQL)", state
  elseif state == "42501" then
    return "the role may not connect to that database: GRANT CONNECT on it"
           .. " to the role, or make the role its owner", state
  end
  if state and state:sub(1, 2) == "28" then       -- invalid authorization
    return "the server refused the login (no such role, a role that may not"
           .. " log in, or no pg_hba.conf line for this client and"
           .. " authentication): the server's log says which", state
  end
  -- (no SQLSTATE: libpq refused before asking a server, e.g. a service
  -- file that is not there, an option it does not know)
  return "fix what the cause names (the URL, its options, or libpq's"
         .. " environment: PGSERVICEFILE, PGSSLMODE...); no server may have"
         .. " been asked", "libpq"
end

--- syntax: path = sql.sqlite_path(url)
-- The file a sqlite: (or sqlite3:) URL names, as sql.open reads it:
-- without a leading "//" or the ?options. nil for another engine's URL,
-- or no path.
function _M.sqlite_path(url)
  local rest = type(url) == "string" and url:match("^sqlite3?:(.*)$")
  if not rest then return nil end
  local path = sqlite_parts(rest)
  if path == "" then return nil end
  return path
end

-- SQLite's "unable to open database file" names neither the file nor
-- why: say which, and what is wrong with its folder when something is
-- (missing, not a folder, not readable). SQLite makes the file, never
-- the folder.
local function cantopen(err, path)
  if not core.is_error(err) or not tostring(err.message):find(
       "unable to open database file", 1, true) then
    return err
  end
  local dir = path:match("^(.*)/[^/]*$") or "."
  if dir == "" then dir = "/" end
  local why = "check the permissions of the file and its folder"
  local _, lerr = core.listdir(dir)
  if lerr then
    why = "its folder " .. dir .. ": "
      .. tostring(lerr.message):gsub("^listdir .-: ", "")
      .. " (sql.open makes the file, not the folder)"
  end
  err.message = err.message .. " " .. path .. ": " .. why
  return err
end

local function open_sqlite(rest, opts)
  local sqlite_core = require "paygate.sqlite.core"
  local path, qs = sqlite_parts(rest)
  if path == "" then
    error("sql.open: sqlite url needs a path (sqlite:/var/lib/app.db)", 3)
  end
  opts = parse_query(qs, opts)
  local h, oerr = sqlite_core.open(path, opts)
  if not h then
    return nil, cantopen(oerr, path)
  end
  local ok, err = h:connect()
  if not ok then
    h:close()
    return nil, cantopen(err, path)
  end
  return setmetatable({ engine = "sqlite", h = h, path = path,
                        retries = opts.retries or DEFAULT_RETRIES }, DB)
end

-- Our options in a postgres:// URL (they leave it; the rest goes to
-- libpq), and the words a boolean one takes
local PG_URL_OPTS = { pool = true, connect_timeout = true,
  query_timeout = true, retries = true, down_for = true,
  require_sync = true, sync_recheck = true, tx_timeout = true }
local BOOL = { ["true"] = true, ["1"] = true, ["false"] = false,
               ["0"] = false }
-- (for tools that hand the URL to libpq's own programs: pg_dump refuses
-- a parameter it does not know)
_M.PG_URL_OPTS = PG_URL_OPTS

local pg_keywords                -- libpq's connection options (a set)

local function open_pg(url, opts)
  local pg_core = require "paygate.pg.core"
  -- (a password may hold "?": paygate.redact's reading)
  local base, qs = redact.split_query(url)
  qs = qs:sub(2)
  -- Our options leave the URL; the rest (sslmode, ...) goes to libpq.
  local ours = PG_URL_OPTS
  local keep = {}
  for k, v in qs:gmatch("([^&=]+)=([^&]*)") do
    if ours[k] then
      if opts[k] == nil then
        if k == "require_sync" then
          -- true|1 or false|0; another word stays a string, which the
          -- engine refuses naming the option
          if BOOL[v] ~= nil then opts[k] = BOOL[v] else opts[k] = v end
        else
          opts[k] = tonumber(v) or v
        end
      end
    else
      -- a misspelt option named here, before libpq refuses it in words
      -- that cannot be shown (they may quote a value)
      pg_keywords = pg_keywords or pg_core.keywords()
      -- (ssl=true is no keyword: libpq's URL reading takes it, the JDBC
      -- spelling, for sslmode=require, and no other value of it)
      if not pg_keywords[k] and not (k == "ssl" and v == "true") then
        local all = {}
        for name in pairs(pg_keywords) do all[name] = true end
        for name in pairs(ours) do all[name] = true end
        local hint = k == "ssl" and "sslmode? ssl takes true alone"
                     or require("paygate.suggest").nearest(k, all)
        error("sql.open: unknown option " .. k:sub(1, 64):gsub("[^%w_]", "?")
              .. " in the postgres url" .. (hint and (" (did you mean "
              .. hint .. (k == "ssl" and ")" or "?)")) or ""), 3)
      end
      keep[#keep + 1] = k .. "=" .. v
    end
  end
  -- (a value that is no number is left to pg_core.open, which raises
  -- naming the option)
  if type(opts.connect_timeout) == "number" then
    keep[#keep + 1] = "connect_timeout=" .. math.ceil(opts.connect_timeout)
  end
  local conninfo = base
  if #keep > 0 then
    conninfo = base .. "?" .. table.concat(keep, "&")
  end
  local h, oerr = pg_core.open(conninfo, opts)
  if not h then
    return nil, oerr
  end
  local ok, err = h:connect()
  if not ok then
    h:close()
    return nil, err
  end
  return setmetatable({ engine = "postgres", h = h,
                        retries = opts.retries or DEFAULT_RETRIES }, DB)
end

-- syntax: db, err = sql.open(url [, opts])
-- returns: a db handle, or nil, err (err.kind "unavailable" ...)
-- yields: until the first connection is usable
function _M.open(url, opts)
  if type(url) ~= "string" then
    -- its type, never its value; nil is most often a config key unset
    error("sql.open: url must be a string (sqlite:PATH or postgres://...),"
          .. " got " .. type(url), 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("sql.open: opts must be a table", 2)
  end
  opts = copy(opts)
  local scheme, rest = url:match("^(%a[%w+.-]*):(.*)$")
  -- not tail calls: their misuse errors count levels up to our caller
  local db, err, engine
  if scheme == "sqlite" or scheme == "sqlite3" then
    engine = "sqlite"
    db, err = open_sqlite(rest, opts)
  elseif scheme == "postgres" or scheme == "postgresql" then
    engine = "postgres"
    db, err = open_pg(url, opts)
  end
  if engine then
    errors_metric(engine)              -- its series, at 0
    note(engine, err)
    if db then
      health_start()
      health_register(db, url)
    end
    return db, err
  end
  -- (the URL as a message may show it: a typo'd postgress://user:PW@
  -- holds a password)
  error("sql.open: unknown url scheme in " .. redact.url(url)
        .. " (want sqlite:PATH or postgres://...)", 2)
end

-- Transaction control in SQL would leave a pooled PostgreSQL connection
-- inside a transaction that nothing commits (acknowledged writes lost), or
-- end db:transaction()'s early. Both engines refuse it in C with misuse:
-- SQLite with an authorizer, PostgreSQL by asking the server for the
-- connection's transaction status after each statement.

-- syntax: rows, err = db:query(sql [, params])
-- returns: an array of rows (column name -> value; NULL columns absent)
-- yields: until the rows are read (SQLite: a lookup is read inline, on the
-- worker's own read connection, without yielding; a longer query on a
-- reader thread; see docs/storage.md)
function DB:query(sql, params)
  check_db("db:query", self)
  local perr = check_stmt("db:query", sql, params)
  if perr then
    return nil, perr
  end
  return noted(self.engine, self.h:query(sql, params))
end

-- syntax: res, err = db:exec(sql [, params])
-- returns: { changes = n, last_id = id [, rows = RETURNING rows] }, only
--          after the change is durable
-- yields: until committed (SQLite: together with its batch)
function DB:exec(sql, params)
  check_db("db:exec", self)
  local perr = check_stmt("db:exec", sql, params)
  if perr then
    return nil, perr
  end
  return noted(self.engine, self.h:exec(sql, params))
end

-- syntax: ok, err = db:exec_script(sql)
-- returns: true once all statements (no parameters) are committed
-- yields: until committed
function DB:exec_script(sql)
  check_db("db:exec_script", self)
  check_stmt("db:exec_script", sql)
  return noted(self.engine, self.h:script(sql))
end

-- syntax: ... , err = db:transaction(fn [, { retries = n,
--                                           query_timeout = s }])
-- fn(tx) runs with tx:query / tx:exec / tx:exec_script. Rolls back when
-- fn raises or returns nil, err (err not nil) and returns nil, err; commits
-- in every other case, `return nil` and returning nothing included (and
-- returns fn's values, or true when fn returned none). A serialization
-- failure or a busy database retries fn from the start, at most `retries`
-- times. A raised value that is not an error table (a paygate error, or
-- a table with a string kind) is a programmer error (error("..."), a
-- failed assertion): it is raised again after the rollback.
-- query_timeout (PostgreSQL): s a statement of this transaction may go
-- without a reply before it fails timeout, instead of the pool's.
-- yields: until committed and durable
function DB:transaction(fn, opts)
  check_db("db:transaction", self)
  if type(fn) ~= "function" then
    error("db:transaction: fn must be a function", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("db:transaction: opts must be a table", 2)
  end
  local attempts = (opts and opts.retries) or self.retries
  if type(attempts) ~= "number" or attempts < 1 or attempts % 1 ~= 0 then
    error("db:transaction: opts.retries must be an integer >= 1", 2)
  end
  -- PostgreSQL: s the transaction's statements may go without a reply,
  -- instead of the pool's query_timeout (ignored on SQLite)
  local wait = opts and opts.query_timeout
  if wait ~= nil and (type(wait) ~= "number" or not (wait > 0)) then
    error("db:transaction: opts.query_timeout must be a number > 0", 2)
  end
  if self.engine ~= "postgres" then
    wait = nil
  end
  local err
  for attempt = 1, attempts do
    local txid
    txid, err = noted(self.engine, self.h:begin(wait))
    if txid then
      local tx = setmetatable({ h = self.h, id = txid, db = self,
                                engine = self.engine }, TX)
      local co = co_running() or DB     -- (nil: the main thread)
      local open = self.tx_open
      if not open then
        open = setmetatable({}, { __mode = "k" })
        self.tx_open = open
      end
      open[co] = true
      -- (a raised string is raised on below with the traceback of where
      -- it was raised: the request's log line then shows fn's frames, not
      -- only the error() below; was: the stack began at that error())
      local traced
      local res = pack(xpcall(fn, function(e)
        if type(e) == "string"
           and not e:find("\nstack traceback:\n", 1, true) then
          traced = debug.traceback(e, 2)
        end
        return e
      end, tx))
      open[co] = nil
      if self.closed then
        -- db:close() during fn: the store rolled the transaction back (a
        -- commit or rollback now would raise on the closed handle)
        if not res[1] and not is_error_value(res[2]) then
          error(traced or res[2], 0)
        end
        return nil, core.error("closed", "db:transaction: the store was"
          .. " closed during the transaction: rolled back")
      end
      if not res[1] then
        self.h:rollback(txid)
        local raised = res[2]
        if not is_error_value(raised) or raised.abort == true then
          -- a programmer error, or paygate.abort(): raised on, after
          -- the rollback, so the request ends as the caller meant
          error(traced or raised, 0)
        end
        if not core.is_error(raised) then
          -- error({ kind = ..., message = ... }): the one error shape
          raised = core.error(raised.kind, tostring(raised.message or ""),
                              raised)
        end
        err = raised
      elseif res[2] == nil and res[3] ~= nil then
        self.h:rollback(txid)
        err = res[3]
      else
        local ok, cerr = noted(self.engine, self.h:commit(txid))
        if ok then
          tx.committed = true          -- (for what was written through it)
          if tx.on_commit_fns then run_on_commit(tx.on_commit_fns) end
          if res.n == 1 then
            return true
          end
          return unpack(res, 2, res.n)
        end
        err = cerr
      end
    end
    if not is_retryable_tx(err) or attempt == attempts then
      return nil, err
    end
    core.sleep(0.002 * attempt * (0.5 + math.random()))
  end
  return nil, err
end

-- db:atomic -----------------------------------------------------------

local ATOMIC_MAX = 1000

-- Bindable as a parameter: what the C drivers accept (sql.null is the
-- one userdata).
local function bindable(v)
  local t = type(v)
  return t == "nil" or t == "string" or t == "number" or t == "boolean"
    or v == core.null
end

-- Where a misuse of statement i is: made only for an error (the loop
-- below runs for every statement of every job).
local function atomic_where(i)
  return "db:atomic: stmts[" .. i .. "]"
end

-- Checks db:atomic's statements and returns them in the drivers' shape
-- { { sql, params, expect = n }, ... } (names kept beside, for errors),
-- and the index and misuse error of the first with a NaN parameter.
local function check_atomic(stmts)
  if type(stmts) ~= "table" then
    error("db:atomic: stmts must be an array of statements", 3)
  end
  local n = #stmts
  if n < 1 or n > ATOMIC_MAX then
    error("db:atomic: want 1 to " .. ATOMIC_MAX .. " statements (got "
          .. n .. ")", 3)
  end
  local list, names, nan_at, nan_err = {}, {}, nil, nil
  for i = 1, n do
    local s = stmts[i]
    if type(s) ~= "table" then
      error(atomic_where(i) .. " must be a table { sql, params, expect = n }",
            3)
    end
    local text, params = s[1] or s.sql, s[2] or s.params
    if type(text) ~= "string" then
      error(atomic_where(i) .. ": sql must be a string", 3)
    end
    if params ~= nil then
      if type(params) ~= "table" then
        error(atomic_where(i) .. ": params must be a table", 3)
      end
      -- (params.n checked, with the where of its error, when there is one)
      local np = params.n == nil and #params
                 or param_count(atomic_where(i), params, 3)
      for k = 1, np do
        local v = params[k]
        if not bindable(v) then
          error(atomic_where(i) .. ": params[" .. k .. "] cannot be bound"
                .. " (a " .. type(v) .. "; want a string, number, boolean"
                .. " or sql.null)", 3)
        end
        if v ~= v and not nan_at then
          nan_at, nan_err = i, nan_error(nil, k)
        end
      end
    end
    local expect = s.expect
    if expect ~= nil and (type(expect) ~= "number" or expect < 0
                          or expect % 1 ~= 0) then
      error(atomic_where(i) .. ": expect must be a whole number >= 0", 3)
    end
    if s.name ~= nil and type(s.name) ~= "string" then
      error(atomic_where(i) .. ": name must be a string", 3)
    end
    if getmetatable(s) == nil and s[1] == text and s[2] == params then
      -- in the drivers' shape already (what paygate's modules build): the
      -- drivers read [1], [2] and expect, and nothing writes to it
      list[i] = s
    else
      list[i] = { text, params, expect = expect }
    end
    names[i] = s.name
  end
  return list, names, nan_at, nan_err
end

local function is_unique_violation(e)
  return e.kind == "constraint"
    and (e.code == 2067 or e.code == 1555 or e.code == "23505")
end

-- The one error of a failed db:atomic, alike on both engines. index 0:
-- the job as a whole failed (serr is the store's error as it is).
local function atomic_error(list, names, index, serr, got)
  if index == 0 then
    return serr
  end
  local s = list[index]
  local label = "statement " .. index
                .. (names[index] and " (" .. names[index] .. ")" or "")
  local fields = { index = index, name = names[index] }
  if serr == nil then
    fields.reason, fields.expected, fields.got = "expect", s.expect, got
    return core.error("conflict", label .. " affected " .. tostring(got)
      .. " rows, expected " .. s.expect, fields)
  end
  fields.cause, fields.code, fields.constraint =
    serr, serr.code, serr.constraint
  if is_unique_violation(serr) then
    fields.reason = "unique"
    return core.error("conflict", label .. ": " .. tostring(serr.message),
                      fields)
  end
  fields.reason, fields.retryable = serr.kind, serr.retryable
  return core.error(serr.kind, label .. ": " .. tostring(serr.message),
                    fields)
end

-- PostgreSQL: BEGIN and the statements sent back to back on one
-- connection (h:begin_atomic: one round trip for them all), then COMMIT
-- once every statement changed its `expect` rows, else ROLLBACK. The first
-- statement that failed or changed other than `expect` rows decides; the
-- ones after it ran (or failed, the transaction aborted) and are rolled
-- back. A serialization failure or a busy database runs the job again, at
-- most db.retries times, as db:transaction does.
local function atomic_pg(self, list, names)
  local index, serr, got, err
  local attempt, replans = 1, 0
  while true do
    index, serr, got = nil, nil, nil
    local txid, res, ei, e = self.h:begin_atomic(list)
    if txid == false then            -- refused: nothing was sent
      return nil, atomic_error(list, names, res, ei)
    elseif not txid then             -- nothing began
      err = res
      note(self.engine, err)
    else
      for i = 1, #list do
        local r = res[i]
        if r == nil then
          -- ei: the first failed (before it, every one has a result)
          index, serr = ei, e
          note(self.engine, serr)
          break
        end
        local want = list[i].expect
        if want and r.changes ~= want then
          index, got = i, r.changes
          break
        end
      end
      if not index then
        local ok, cerr = noted(self.engine, self.h:commit(txid))
        if ok then
          return res
        end
        err = cerr
      else
        self.h:rollback(txid)
        err = serr or core.error("conflict", "expect")
      end
    end
    if type(err) == "table" and err.code == "0A000" and err.retryable
       and replans < 32 then
      -- a statement prepared before a schema change (its connection
      -- has forgotten them all now): at once, not counted, at most once
      -- per connection of the pool
      replans = replans + 1
    else
      if not is_retryable_tx(err) or attempt >= self.retries then
        break
      end
      core.sleep(0.002 * attempt * (0.5 + math.random()))
      attempt = attempt + 1
    end
  end
  if index then
    return nil, atomic_error(list, names, index, serr, got)
  end
  return nil, err
end

-- syntax: results, err = db:atomic(stmts)
-- stmts: { { sql, params, expect = n, name = "..." }, ... } (or the keys
-- sql = and params =). The statements run in order as one write, all or
-- none: on SQLite as ONE job of the writer's group commit, inside its own
-- savepoint (other jobs of the batch are not affected by its failure); on
-- PostgreSQL in one transaction. expect = n: the statement must change n
-- rows (a read: return n rows), or the job fails.
-- returns: { { changes, last_id [, rows] }, ... } once durable; or nil,
-- err with err.index (1-based; absent when the job failed as a whole),
-- err.name, err.reason: kind "conflict" for a missed expect (reason
-- "expect", err.expected, err.got) or a unique violation (reason
-- "unique", err.constraint); else the statement's own kind (reason = the
-- kind, err.cause = the store's error).
-- yields: until committed and durable
function DB:atomic(stmts)
  check_db("db:atomic", self)
  local list, names, nan_at, nan_err = check_atomic(stmts)
  if nan_at then
    return nil, atomic_error(list, names, nan_at, nan_err)
  end
  if self.engine ~= "sqlite" then
    return atomic_pg(self, list, names)
  end
  local res, index, serr, got
  for attempt = 1, self.retries do
    res, index, serr, got = self.h:atomic(list)
    if res then
      return res
    end
    note(self.engine, serr)
    -- another process held the file past busy_timeout: nothing of the
    -- job ran (its savepoint was rolled back), so it may run again
    if not (index == 0 and is_retryable_tx(serr)) then
      break
    end
    if attempt < self.retries then
      core.sleep(0.002 * attempt * (0.5 + math.random()))
    end
  end
  return nil, atomic_error(list, names, index, serr, got)
end

-- Tables that paygate's own modules (leases, idempotency, the outbox, the
-- audit trail, API keys) create on first use: which ones this handle has
-- made sure of already.
local schemas_ready = setmetatable({}, { __mode = "k" })   -- db -> {name}

-- One PostgreSQL advisory lock for every schema paygate creates: CREATE
-- ... IF NOT EXISTS races between sessions (two creators can both miss
-- the table and one fails on the catalog's unique index).
local SCHEMA_LOCK = 7217002

-- syntax: ok, err = db:ensure_schema(name, create)
-- Runs create(tx) -- CREATE TABLE / INDEX IF NOT EXISTS statements, which
-- must be idempotent -- once per db handle and name, in a transaction of
-- its own (on PostgreSQL under one advisory lock, so concurrent creators
-- take turns). The name is remembered only after a commit.
-- yields: one transaction, the first time
function DB:ensure_schema(name, create)
  check_db("db:ensure_schema", self)
  if type(name) ~= "string" then
    error("db:ensure_schema: name must be a string", 2)
  end
  if type(create) ~= "function" then
    error("db:ensure_schema: create must be a function", 2)
  end
  local done = schemas_ready[self]
  if done and done[name] then
    return true
  end
  local ok, err = self:transaction(function(tx)
    if tx.engine == "postgres" then
      local _, lerr = tx:exec("SELECT pg_advisory_xact_lock($1)",
                              { SCHEMA_LOCK })
      if lerr then
        return nil, lerr
      end
    end
    return create(tx)
  end)
  if not ok then
    return nil, err
  end
  done = schemas_ready[self] or {}
  schemas_ready[self] = done
  done[name] = true
  return true
end

-- syntax: st = db:stats()
-- returns: SQLite: { commits = COMMITs (fsyncs) so far that acknowledged
--          a write (a batch whose writes all failed is none), writes =
--          jobs they acknowledged, reads_inline, reads_moved, reads_reader
--          (queries handed to the reader threads, reads_moved included),
--          commit_seconds (the COMMITs' time, s), commit_seconds_max (the
--          longest), commit_buckets = { { le = s, count, seconds }, ... }
--          (the COMMITs of each bucket of their time, not cumulative; the
--          last le math.huge), cache_bytes (the writer's page cache after
--          its last COMMIT: at most cache_mib) }; PostgreSQL:
--          { round_trips = requests the server answered as one so far }
function DB:stats()
  check_db("db:stats", self)
  if self.h.stats then
    return self.h:stats()
  end
  return {}
end

-- syntax: info, err = db:backup(path [, { replace = true }])
-- SQLite only: a consistent copy of the database, made while it is in
-- use (writes go on meanwhile), at path: one file, in journal mode DELETE
-- (sql.open switches it back to WAL), mode 0600. Copied by a reader
-- thread with SQLite's online backup (the -wal's committed pages
-- included), checked (PRAGMA quick_check) and only then renamed to path
-- from path.tmp: path is never a partial copy. An existing path (or
-- path.tmp) is refused unless replace.
-- returns: { pages, page_size, bytes } of the copy, or nil, err (kind
-- "unavailable": the file cannot be made or written, or the copy fails
-- its check; "busy")
-- yields: until the copy is renamed (seconds for a big store; one reader
-- thread is busy meanwhile)
function DB:backup(path, opts)
  check_db("db:backup", self)
  if self.engine ~= "sqlite" then
    error("db:backup: SQLite only (back up PostgreSQL with pg_dump)", 2)
  end
  if type(path) ~= "string" or path == "" then
    error("db:backup: path must be a file name", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("db:backup: opts must be a table", 2)
  end
  return self.h:backup(path, opts ~= nil and opts.replace == true)
end

-- syntax: yes, err = db:has_table(name)
-- name: a table, or schema.table (on SQLite the table part is looked up).
-- returns: whether the store holds a table of that name (PostgreSQL: a
-- relation, a view too), or nil, err. Reads only: a tool pointed at the
-- wrong database can say so without making anything in it.
-- tx:has_table(name): the same inside a transaction (its own CREATE TABLE
-- seen): the check of the libraries that make their tables on first use.
local HAS_TABLE = {
  sqlite = "SELECT 1 AS x FROM sqlite_master WHERE type = 'table' AND"
    .. " name = $1",
  postgres = "SELECT 1 AS x WHERE to_regclass($1) IS NOT NULL",
}
-- q: the db or the tx the query goes through; fname: for the misuse error
local function has_table(fname, q, name)
  if type(name) ~= "string"
     or not (name:match("^[%a_][%w_]*$")
             or name:match("^[%a_][%w_]*%.[%a_][%w_]*$")) then
    error(fname .. ": name must be a table name", 3)
  end
  if q.engine == "sqlite" then
    name = name:match("([^.]+)$")
  end
  local rows, err = q:query(HAS_TABLE[q.engine], { name })
  if not rows then return nil, err end
  return rows[1] ~= nil
end
function DB:has_table(name)
  check_db("db:has_table", self)
  return has_table("db:has_table", self, name)
end

-- syntax: db:close()  -- safe to call twice; later calls of other methods
-- raise. SQLite: writes already queued still complete; PostgreSQL:
-- pending statements fail with kind "closed".
function DB:close()
  if getmetatable(self) ~= DB then
    error("db:close: call it as db:close()", 2)
  end
  local was, m = health_dbs[self], health_on and health_metrics()
  if was and m and not self.closed then
    pcall(health_add, m, self, was)              -- its last counts
  end
  health_dbs[self] = nil
  self.closed = true
  self.h:close()
end

-- tx:query / tx:exec / tx:exec_script: as the db methods, inside the
-- transaction (see DB:transaction).
function TX:query(sql, params)
  check_tx("tx:query", self)
  local perr = check_stmt("tx:query", sql, params)
    or tx_closed("tx:query", self)
  if perr then
    return nil, perr
  end
  return noted(self.engine, self.h:tx_query(self.id, sql, params))
end

function TX:exec(sql, params)
  check_tx("tx:exec", self)
  local perr = check_stmt("tx:exec", sql, params)
    or tx_closed("tx:exec", self)
  if perr then
    return nil, perr
  end
  return noted(self.engine, self.h:tx_exec(self.id, sql, params))
end

function TX:exec_script(sql)
  check_tx("tx:exec_script", self)
  check_stmt("tx:exec_script", sql)
  local cerr = tx_closed("tx:exec_script", self)
  if cerr then
    return nil, cerr
  end
  return noted(self.engine, self.h:tx_script(self.id, sql))
end

function TX:has_table(name)
  check_tx("tx:has_table", self)
  return has_table("tx:has_table", self, name)
end

-- syntax: tx:on_commit(fn)
-- fn() runs once the transaction has committed (durable), before
-- db:transaction returns; never when it rolls back, and a try that is run
-- again (a busy database, fsm.retry) drops its functions with it: for
-- what must happen once per committed change (a counter, a cache). An fn
-- that raises is logged; the commit stands.
function TX:on_commit(fn)
  check_tx("tx:on_commit", self)
  if type(fn) ~= "function" then
    error("tx:on_commit: fn must be a function", 2)
  end
  if self.committed then
    error("tx:on_commit: the transaction has committed already", 2)
  end
  local l = self.on_commit_fns
  if not l then
    l = {}
    self.on_commit_fns = l
  end
  l[#l + 1] = fn
end

function TX:transaction()
  error("tx:transaction: nested transactions are not supported", 2)
end

_M.DB = DB
_M.TX = TX

return _M
