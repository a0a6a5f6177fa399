-- paygate.retention: tables that grow with traffic stay bounded by policy.
--
--   local retention = require "paygate.retention"
--   local r = retention.start(db, {             -- the policy (config form)
--     outbox_days = 7, notification_hours = 25,
--   }, { lease = redis_client })                 -- the runner's options
--   r:stop()
--
-- A job deletes the rows of one table older than its max age, a small
-- batch per statement (on SQLite one short job on the writer each), with
-- a pause between batches so other writes (the notification path) go
-- between them. A pass runs every job once, under a paygate.lease
-- (lease.run: a ttl measured from earlier passes, renewed while the pass
-- runs), so one instance prunes at a time; the others find it held and
-- skip the pass.
--
-- Built-in jobs reuse the owning library's pruner: idempotency records
-- past their expiry (idempotency.prune), delivered outbox rows
-- (outbox.prune). Generic jobs name a table, a time column, a max age and
-- an optional extra condition. The audit trail is evidence: a job on
-- paygate_audit* raises.
--
-- Counted: rows pruned per job in this worker (retention.stats()), across
-- the instance's workers in the "paygate" shared dictionary, and on
-- /metrics as the gauge paygate_retention_pruned_rows{job}. One log line
-- per pass (info), a warning per failed job.

local core = require "paygate.core"
local sql = require "paygate.sql"
local lease = require "paygate.lease"
local suggest = require "paygate.suggest"

local type, pairs, ipairs, tostring, error, getmetatable, setmetatable =
      type, pairs, ipairs, tostring, error, getmetatable, setmetatable
local floor, max, min = math.floor, math.max, math.min

local _M = { _VERSION = "0.1.0" }

-- WeChat Pay retries a notification 15 times over 24 h 4 min: a dedupe
-- row must outlive that, or a late retry is applied as new.
_M.WECHAT_RETRY_WINDOW = 24 * 3600 + 4 * 60
local HOUR, DAY = 3600, 86400

local DEFAULTS = {
  interval = 300,          -- s between passes
  batch = 500,             -- rows per DELETE
  pause = 0.05,            -- s between two batches
  max_batches = 1000,      -- per job per pass
  delay = 10,              -- s before the first pass after start
}
_M.DEFAULTS = DEFAULTS

-- the config form's policy defaults
local POLICY = {
  idempotency = true,                  -- records past their ttl (24 h)
  outbox_days = 7,                     -- delivered outbox rows
  notification_hours = 25,             -- dedupe rows: 24 h 4 min + margin
  -- the reference gateway's dedupe tables (examples/gateway)
  notifications = {
    { table = "gw_notifications", column = "received_at" },
    { table = "gw_notification_effects", column = "applied_at" },
  },
}
_M.POLICY = POLICY

local RUNNER_KEYS = { interval = true, batch = true, pause = true,
                      max_batches = true, delay = true }
-- retention.new's opts: the runner's numbers, and lease, name and now
local OPTS_KEYS = { lease = true, name = true, now = true }
for k in pairs(RUNNER_KEYS) do OPTS_KEYS[k] = true end

-- per-worker counters
local counts = { passes = 0, held = 0, pruned = 0, statements = 0,
                 errors = 0, jobs = {} }
-- the names of the jobs of this worker's runners: retention.stats()
-- reads their instance totals even when another worker did the pruning
local job_names = {}

-- paygate.log (required when first used)
local function log()
  return require("paygate").log
end

------------------------------------------------------------- metrics

local shared_dict
local function dict()
  if shared_dict == nil then
    local ok, d = pcall(function()
      return require("paygate.shared").get_dict("paygate")
    end)
    shared_dict = ok and d or false
  end
  return shared_dict
end

local pruned_gauge
local function gauge()
  if pruned_gauge == nil then
    local ok, metrics = pcall(require, "paygate.metrics")
    pruned_gauge = ok and type(metrics) == "table"
      and metrics.gauge("paygate_retention_pruned_rows",
        "Rows deleted by paygate.retention since the instance started.")
      or false
  end
  return pruned_gauge or nil
end

local SHARED_PREFIX = "paygate.retention.pruned|"

local function count_pruned(job, n)
  counts.pruned = counts.pruned + n
  counts.jobs[job] = (counts.jobs[job] or 0) + n
  local d = dict()
  local total
  if d then
    total = d:incr(SHARED_PREFIX .. job, n, 0)
  end
  local g = gauge()
  if g and total then
    g:set(total, { job = job })
  end
end

-------------------------------------------------------------- checks

-- Misuse found below a public function is thrown as a marked table; the
-- public function catches it and raises the message at its caller's line.
local MISUSE = {}

local function misuse(msg)
  error(setmetatable({ msg = msg }, MISUSE), 0)
end

-- public(fn): fn with its misuse raised at the caller of the public
-- function (other errors pass through unchanged).
local function public(fn)
  return function(...)
    local res = { pcall(fn, ...) }
    if res[1] then
      return unpack(res, 2, table.maxn(res))
    end
    local e = res[2]
    if getmetatable(e) == MISUSE then
      error(e.msg, 2)
    end
    error(e, 0)
  end
end

local function is_db(v)
  return getmetatable(v) == sql.DB
end

local IDENT = "^[%a_][%w_]*$"

local function check_ident(fname, what, s, qualified)
  if type(s) ~= "string" then
    misuse(fname .. ": " .. what .. " must be a string")
  end
  local parts = {}
  for p in (s .. "."):gmatch("([^.]*)%.") do
    parts[#parts + 1] = p
  end
  if #parts > (qualified and 2 or 1) then
    misuse(fname .. ": " .. what .. " must be an identifier"
           .. (qualified and " (or schema.name)" or ""))
  end
  for _, p in ipairs(parts) do
    if not p:find(IDENT) then
      misuse(fname .. ": " .. what .. " must be an identifier"
             .. (qualified and " (or schema.name)" or ""))
    end
  end
  return parts[#parts]:lower()
end

local function refuse_audit(fname, table_name)
  if table_name:find("^paygate_audit") then
    misuse(fname .. ": " .. table_name .. " holds the audit trail, which is"
          .. " evidence and kept: no retention job may prune it")
  end
end

local function positive(fname, what, v)
  if type(v) ~= "number" or not (v > 0) or v == math.huge then
    misuse(fname .. ": " .. what .. " must be a positive number")
  end
  return v
end

-- The longest a job keeps rows: 100 years. A longer age is a slip (to
-- keep rows, give no job), and a huge one broke the arithmetic: 1e308
-- hours overflowed to inf, 1e300 days made a cutoff of -8.64e304.
local MAX_YEARS = 100
local MAX_AGE = MAX_YEARS * 365 * DAY
_M.MAX_AGE = MAX_AGE

-- v, a positive number of units (seconds, hours, days) of at most
-- MAX_AGE seconds; what names the key, and hint follows the bound
local function age(fname, what, v, unit, hint)
  positive(fname, what, v)
  local most = floor(MAX_AGE / unit)
  if v > most then
    misuse(fname .. ": " .. what .. " must be at most " .. most .. " ("
          .. MAX_YEARS .. " years" .. (hint or "") .. ")")
  end
  return v
end

-- A runner's number (interval, pause, delay, batch, max_batches): also
-- at most 1e8, the longest sleep the runtime takes (core.sleep raises
-- past it, and the task would end on its first wait). pause may be 0:
-- batches back to back (each still a statement of its own).
local function runner_number(fname, what, v)
  if what:match("pause$") then
    if not core.is_seconds(v, true) then
      misuse(fname .. ": " .. what .. " must be a number of seconds,"
            .. " 0 .. 1e8")
    end
    return v
  end
  positive(fname, what, v)
  if not core.is_seconds(v) then
    misuse(fname .. ": " .. what .. " must be at most 1e8")
  end
  return v
end

---------------------------------------------------------------- jobs

-- A job: { name, kind, prune = function(db, batch, now) -> n | nil, err,
--          table (the table to check for existence, generic jobs) }.
-- prune deletes at most batch rows in one statement.

local Job = {}
Job.__index = Job

-- The statement of a generic job, per engine. The condition is repeated
-- outside the subquery: on PostgreSQL a row changed by another
-- transaction after the subquery saw it is checked again (READ COMMITTED
-- re-evaluates the outer WHERE on the new version), so a row that no
-- longer qualifies (an outbox row replayed back to pending, say) stays.
local function delete_sql(engine, job)
  local cond = job.column .. " < $1"
  if job.where then
    cond = cond .. " AND (" .. job.where .. ")"
  end
  local key = job.key
  if engine == "postgres" then
    if not key then
      -- ctid: the row's physical address; = ANY(ARRAY(...)) is a TID scan
      return "DELETE FROM " .. job.table .. " WHERE ctid = ANY(ARRAY("
        .. "SELECT ctid FROM " .. job.table .. " WHERE " .. cond
        .. " LIMIT $2)) AND " .. cond
    end
    if not key:find(",", 1, true) then
      return "DELETE FROM " .. job.table .. " WHERE " .. key
        .. " = ANY(ARRAY(SELECT " .. key .. " FROM " .. job.table
        .. " WHERE " .. cond .. " LIMIT $2)) AND " .. cond
    end
  end
  key = key or "rowid"
  local cols = key:find(",", 1, true) and "(" .. key .. ")" or key
  return "DELETE FROM " .. job.table .. " WHERE " .. cols .. " IN (SELECT "
    .. key .. " FROM " .. job.table .. " WHERE " .. cond .. " LIMIT $2)"
    .. " AND " .. cond
end

function Job:exists(db)
  if not self.table then
    return true
  end
  return db:has_table(self.table)
end

local function table_prune(self, db, batch, now)
  local stmt = self.sql[db.engine]
  if not stmt then
    stmt = delete_sql(db.engine, self)
    self.sql[db.engine] = stmt
  end
  -- whole seconds (or ms): a time column may be an integer one (BIGINT
  -- on PostgreSQL refuses 1796318449.94 as its input); rounded down, the
  -- cut keeps a row at most one unit longer
  local before = now - self.max_age
  if self.unit == "ms" then
    before = floor(before * 1000)
  else
    before = floor(before)
  end
  local res, err = db:exec(stmt, { before, batch })
  if not res then
    return nil, err
  end
  return res.changes
end

-- what a retention.table spec may hold
local TABLE_KEYS = { table = true, column = true, max_age = true,
                     where = true, unit = true, key = true, name = true }

--- syntax: job = retention.table(spec)
-- spec: { table = "name" (or schema.name), column = "time column",
--         max_age = s, name = (default: the table), where = "extra SQL
--         condition" (the app's own text, never input: it is spliced),
--         unit = "s" (epoch seconds, default) | "ms" (epoch ms),
--         key = "primary key column(s)" (default: rowid on SQLite, ctid
--         on PostgreSQL) }
-- returns: a job for retention.start / retention.new. Raises on misuse,
-- and on the audit trail's tables.
local function make_table(spec, fname)
  fname = fname or "retention.table"
  if type(spec) ~= "table" then
    misuse(fname .. ": spec must be a table")
  end
  -- before the other checks: a misspelt required key (colum) is named,
  -- with the key meant, not said to be missing (spec.column)
  for k in pairs(spec) do
    if not TABLE_KEYS[k] then
      misuse(fname .. ": unknown key spec." .. tostring(k)
             .. suggest.hint(k, TABLE_KEYS))
    end
  end
  local tname = check_ident(fname, "spec.table", spec.table, true)
  refuse_audit(fname, tname)
  check_ident(fname, "spec.column", spec.column)
  age(fname, "spec.max_age", spec.max_age, 1, ", in seconds")
  if spec.where ~= nil and (type(spec.where) ~= "string"
                            or spec.where:find(";", 1, true)) then
    misuse(fname .. ": spec.where must be one SQL condition (a string"
          .. " without ';')")
  end
  if spec.unit ~= nil and spec.unit ~= "s" and spec.unit ~= "ms" then
    misuse(fname .. ": spec.unit must be \"s\" or \"ms\"")
  end
  if spec.key ~= nil then
    if type(spec.key) ~= "string" then
      misuse(fname .. ": spec.key must be a string")
    end
    for k in spec.key:gmatch("[^,]+") do
      check_ident(fname, "spec.key", (k:gsub("^%s+", ""):gsub("%s+$", "")))
    end
  end
  if spec.name ~= nil and (type(spec.name) ~= "string" or spec.name == "")
  then
    misuse(fname .. ": spec.name must be a non-empty string")
  end
  return setmetatable({
    name = spec.name or spec.table, kind = "table", table = spec.table,
    column = spec.column, max_age = spec.max_age, where = spec.where,
    unit = spec.unit or "s",
    key = spec.key and spec.key:gsub("%s+", ""), sql = {},
    prune = table_prune }, Job)
end
_M.table = public(function(spec) return make_table(spec) end)

--- syntax: job = retention.notifications([spec])
-- A dedupe table of WeChat Pay notifications: as retention.table, with
-- table "gw_notifications", column "received_at" and max_age 25 h by
-- default. max_age must exceed WeChat's retry window (24 h 4 min).
local function make_notifications(spec)
  spec = spec or {}
  if type(spec) ~= "table" then
    misuse("retention.notifications: spec must be a table")
  end
  local s = {}
  for k, v in pairs(spec) do
    s[k] = v
  end
  s.table = s.table or "gw_notifications"
  s.column = s.column or "received_at"
  s.max_age = s.max_age or POLICY.notification_hours * HOUR
  if type(s.max_age) == "number" and s.max_age <= _M.WECHAT_RETRY_WINDOW
  then
    misuse("retention.notifications: spec.max_age must exceed WeChat's"
          .. " retry window (24 h 4 min = " .. _M.WECHAT_RETRY_WINDOW
          .. " s): a retry arriving after its dedupe row was pruned would be"
          .. " applied again")
  end
  return make_table(s, "retention.notifications")
end
_M.notifications = public(make_notifications)

--- syntax: job = retention.idempotency()
-- paygate.idempotency records past their expiry (their ttl, 24 h by
-- default, is set by idempotency.wrap): idempotency.prune, one batch per
-- statement.
function _M.idempotency()
  local idem = require "paygate.idempotency"
  return setmetatable({ name = "idempotency", kind = "idempotency",
    prune = function(_, db, batch, now)
      return idem.prune(db, { batch = batch, now = now })
    end }, Job)
end

--- syntax: job = retention.outbox([{ keep_days = 7 }])
-- Delivered paygate.outbox rows older than keep_days: outbox.prune, one
-- batch per statement. Pending and dead rows are kept.
local function make_outbox(spec)
  spec = spec or {}
  if type(spec) ~= "table" then
    misuse("retention.outbox: spec must be a table")
  end
  local keep_days = spec.keep_days or POLICY.outbox_days
  age("retention.outbox", "spec.keep_days", keep_days, DAY)
  local outbox = require "paygate.outbox"
  return setmetatable({ name = "outbox", kind = "outbox",
    keep_days = keep_days,
    prune = function(_, db, batch, now)
      return outbox.prune(db, { keep_days = keep_days, batch = batch,
                                max_batches = 1, now = now })
    end }, Job)
end
_M.outbox = public(make_outbox)

-- t holds only t[1] .. t[#t] (one spec where a list belongs holds none
-- of them, and ipairs would make no job of it)
local function is_array(t)
  local n = 0
  for _ in pairs(t) do
    n = n + 1
  end
  return n == #t
end

-- what a dedupe table's entry may hold (its max age is notification_hours)
local NOTE_KEYS = { table = true, column = true, where = true, unit = true,
                    key = true, name = true }

-- The config form (a table without array part) -> jobs, runner options.
local function from_config(fname, conf)
  local jobs, ropts = {}, {}
  for k, v in pairs(conf) do
    if RUNNER_KEYS[k] then
      ropts[k] = v
    elseif k ~= "idempotency" and k ~= "outbox_days"
           and k ~= "notification_hours" and k ~= "notifications"
           and k ~= "tables" then
      local known = { idempotency = true, outbox_days = true,
                      notification_hours = true, notifications = true,
                      tables = true }
      for rk in pairs(RUNNER_KEYS) do known[rk] = true end
      misuse(fname .. ": unknown retention option " .. tostring(k)
             .. suggest.hint(k, known))
    end
  end
  local idem = conf.idempotency
  if idem == nil then
    idem = POLICY.idempotency
  end
  if type(idem) ~= "boolean" then
    misuse(fname .. ": idempotency must be a boolean")
  end
  if idem then
    jobs[#jobs + 1] = _M.idempotency()
  end
  local days = conf.outbox_days
  if days == nil then
    days = POLICY.outbox_days
  end
  if days ~= false then
    if type(days) ~= "number" or not (days > 0) or days == math.huge then
      misuse(fname .. ": outbox_days must be a positive number (or false:"
            .. " keep delivered rows)")
    end
    age(fname, "outbox_days", days, DAY, "; false keeps delivered rows")
    jobs[#jobs + 1] = make_outbox({ keep_days = days })
  end
  local hours = conf.notification_hours
  if hours == nil then
    hours = POLICY.notification_hours
  end
  -- false beside notifications = false says the same thing twice: taken
  -- (a number there is still checked, a typo for when they come back)
  if not (hours == false and conf.notifications == false)
     and (type(hours) ~= "number" or hours * HOUR <= _M.WECHAT_RETRY_WINDOW
          or hours == math.huge) then
    -- (false is not "keep them": that is notifications = false)
    misuse(fname .. ": notification_hours must be a number above 24.07"
          .. " (WeChat retries a notification for 24 h 4 min)"
          .. (hours == false and "; to keep the dedupe rows, set"
              .. " notifications = false" or ""))
  end
  if type(hours) == "number" and not (hours <= MAX_AGE / HOUR) then
    misuse(fname .. ": notification_hours must be at most "
          .. floor(MAX_AGE / HOUR) .. " (" .. MAX_YEARS .. " years; to keep"
          .. " the dedupe rows, set notifications = false)")
  end
  local notes = conf.notifications
  if notes == nil then
    notes = POLICY.notifications
  end
  if notes ~= false then
    if type(notes) ~= "table" or not is_array(notes) then
      misuse(fname .. ": notifications must be an array of { table, column }"
            .. " (or false)")
    end
    for i, n in ipairs(notes) do
      if type(n) ~= "table" then
        misuse(fname .. ": notifications[" .. i .. "] must be a table")
      end
      for k in pairs(n) do
        if not NOTE_KEYS[k] then
          -- a misspelt key: the one meant; else (max_age...) why a
          -- dedupe table takes no such key
          local hint = suggest.hint(k, NOTE_KEYS)
          misuse(fname .. ": notifications[" .. i .. "]: unknown key "
                 .. tostring(k) .. (hint ~= "" and hint
                 or " (a dedupe table's rows are kept notification_hours)"))
        end
      end
      jobs[#jobs + 1] = make_notifications({ table = n.table,
        column = n.column, where = n.where, unit = n.unit, key = n.key,
        name = n.name, max_age = hours * HOUR })
    end
  end
  if conf.tables ~= nil then
    if type(conf.tables) ~= "table" or getmetatable(conf.tables) == Job
       or not is_array(conf.tables) then
      misuse(fname .. ": tables must be an array of retention.table specs")
    end
    for _, t in ipairs(conf.tables) do
      jobs[#jobs + 1] = getmetatable(t) == Job and t
                            or make_table(t, fname)
    end
  end
  return jobs, ropts
end

local function whole_batches(fname, batch, max_batches, prefix)
  if batch % 1 ~= 0 or max_batches % 1 ~= 0 then
    misuse(fname .. ": " .. prefix .. "batch and " .. prefix
          .. "max_batches must be integers")
  end
end

-- every job's name differs (the runner's counters and gauge are by name)
local function unique_names(fname, list)
  local seen = {}
  for _, j in ipairs(list) do
    if seen[j.name] then
      misuse(fname .. ": two jobs are named " .. j.name .. " (set name)")
    end
    seen[j.name] = true
  end
end

--- syntax: ok, err = retention.check(conf)
-- Checks the config form (what gateway.retention holds) without starting
-- anything: true, or nil and a one-line reason.
function _M.check(conf)
  if conf == nil then
    return true
  end
  if type(conf) ~= "table" then
    return nil, "must be a table"
  end
  -- what retention.new refuses in the config form: two jobs of one name,
  -- a runner option that is not positive, a batch count not whole
  local ok, err = pcall(function()
    local jobs, ropts = from_config("retention", conf)
    unique_names("retention", jobs)
    for k, v in pairs(ropts) do
      runner_number("retention", k, v)
    end
    whole_batches("retention", ropts.batch or DEFAULTS.batch,
                  ropts.max_batches or DEFAULTS.max_batches, "")
  end)
  if ok then
    return true
  end
  if getmetatable(err) ~= MISUSE then
    error(err, 0)
  end
  return nil, (err.msg:gsub("^retention: ", ""))
end

-------------------------------------------------------------- runner

local Runner = {}
Runner.__index = Runner

local function normalize_jobs(fname, jobs)
  if type(jobs) ~= "table" then
    misuse(fname .. ": jobs must be an array of jobs or a retention config"
          .. " table")
  end
  local list, ropts
  if jobs[1] == nil and getmetatable(jobs) ~= Job then
    list, ropts = from_config(fname, jobs)
  else
    list, ropts = {}, {}
    for i, j in ipairs(jobs) do
      if getmetatable(j) == Job then
        list[i] = j
      elseif type(j) == "table" then
        list[i] = make_table(j, fname)
      else
        misuse(fname .. ": jobs[" .. i .. "] must be a job or a table"
               .. " spec")
      end
    end
  end
  unique_names(fname, list)
  for _, j in ipairs(list) do
    job_names[j.name] = true
  end
  return list, ropts
end

--- syntax: r = retention.new(db, jobs[, opts])
-- jobs: an array of jobs (retention.table / notifications / idempotency
--       / outbox, or plain retention.table specs), or the config form:
--       { idempotency = true, outbox_days = 7, notification_hours = 25,
--         notifications = { { table, column }, ... }, tables = { spec, ...
--         }, interval, batch, pause, max_batches, delay }
-- opts: interval (300 s), batch (500 rows per statement), pause (0.05 s
--       between batches), max_batches (1000 per job per pass), delay
--       (10 s before the first pass), lease (the store of the lease: a
--       paygate.sql db or paygate.redis client; default db), name
--       ("default": runners sharing a name exclude each other), now (a
--       clock function, for tests)
-- returns: a runner: r:start(), r:stop(), r:run_once(), r.stats
local function new(db, jobs, opts, fname)
  if not is_db(db) then
    misuse(fname .. ": db must be a paygate.sql db")
  end
  if opts ~= nil and type(opts) ~= "table" then
    misuse(fname .. ": opts must be a table")
  end
  opts = opts or {}
  local list, ropts = normalize_jobs(fname, jobs)
  local r = { db = db, jobs = list, stats = { passes = 0, held = 0,
              pruned = 0, statements = 0, errors = 0, jobs = {} },
              missing = {} }
  for k, v in pairs(DEFAULTS) do
    local o = opts[k]
    if o == nil then
      o = ropts[k]
    end
    if o == nil then
      r[k] = v
    else
      r[k] = runner_number(fname, "opts." .. k, o)
    end
  end
  whole_batches(fname, r.batch, r.max_batches, "opts.")
  for k in pairs(opts) do
    if not OPTS_KEYS[k] then
      misuse(fname .. ": unknown option opts." .. tostring(k)
             .. suggest.hint(k, OPTS_KEYS))
    end
  end
  r.lease_store = opts.lease or db
  r.name = opts.name or "default"
  if type(r.name) ~= "string" or r.name == "" or r.name:find("|", 1, true)
  then
    misuse(fname .. ": opts.name must be a non-empty string without"
          .. " '|'")
  end
  if opts.now ~= nil and type(opts.now) ~= "function" then
    misuse(fname .. ": opts.now must be a function")
  end
  r.now = opts.now or core.time
  return setmetatable(r, Runner)
end
_M.new = public(function(db, jobs, opts)
  return new(db, jobs, opts, "retention.new")
end)

-- One job: batches until a short one, max_batches, or the lease is lost.
local function run_job(self, job, h, now)
  local out = { pruned = 0, statements = 0 }
  local exists, eerr = job:exists(self.db)
  if exists == nil then
    out.error = eerr
    return out
  end
  if not exists then
    if not self.missing[job.name] then
      self.missing[job.name] = true
      log().info("retention: table not there (yet): job skipped",
          { job = job.name, table = job.table })
    end
    out.missing = true
    return out
  end
  self.missing[job.name] = nil
  for i = 1, self.max_batches do
    if h and h.lost then
      out.lost = true
      break
    end
    local n, err = job:prune(self.db, self.batch, now)
    out.statements = out.statements + 1
    if not n then
      out.error = err
      break
    end
    out.pruned = out.pruned + n
    if n > 0 then
      count_pruned(job.name, n)
    end
    if n < self.batch or i == self.max_batches then
      break
    end
    core.sleep(self.pause)      -- other writes go between two batches
  end
  return out
end

local function pass(self, h)
  local t0 = core.mono()
  local now = self.now()
  local summary = { pruned = 0, statements = 0, jobs = {}, errors = 0 }
  for _, job in ipairs(self.jobs) do
    local out = run_job(self, job, h, now)
    summary.jobs[job.name] = out
    summary.pruned = summary.pruned + out.pruned
    summary.statements = summary.statements + out.statements
    local js = self.stats.jobs[job.name] or { pruned = 0, statements = 0 }
    self.stats.jobs[job.name] = js
    js.pruned = js.pruned + out.pruned
    js.statements = js.statements + out.statements
    if out.error then
      summary.errors = summary.errors + 1
      log().warn("retention: job failed (retried next pass)",
          { job = job.name, error = tostring(out.error) })
    end
    if out.lost then
      break
    end
  end
  summary.elapsed = core.mono() - t0
  return summary
end

--- syntax: summary, err = r:run_once()
-- One pass: takes the lease (lease.run, adaptive ttl under
-- "retention:<name>"), runs every job, releases.
-- returns: { pruned, statements, errors, elapsed, jobs = { [name] = {
--          pruned, statements, error?, missing? } } }, or nil, err
--          ("held": another instance prunes now; or the store's kinds)
-- yields: for the whole pass
function Runner:run_once()
  local key = "retention:" .. self.name
  local summary, err = lease.run(self.lease_store, key, function(h)
    self.held = h               -- r:stop() gives it back mid-pass
    return pass(self, h)
  end, { adaptive = key, floor = 10, ceiling = 900, initial = 120 })
  self.held = nil
  local st = self.stats
  if not summary then
    if err.kind == "held" then
      st.held = st.held + 1
      counts.held = counts.held + 1
      log().debug("retention: another instance is pruning; pass skipped",
          { name = self.name })
    else
      st.errors = st.errors + 1
      counts.errors = counts.errors + 1
      log().warn("retention: pass not run", { name = self.name,
                                              error = tostring(err) })
    end
    return nil, err
  end
  st.passes = st.passes + 1
  st.pruned = st.pruned + summary.pruned
  st.statements = st.statements + summary.statements
  st.errors = st.errors + summary.errors
  counts.passes = counts.passes + 1
  counts.statements = counts.statements + summary.statements
  counts.errors = counts.errors + summary.errors
  local per_job = {}
  for name, out in pairs(summary.jobs) do
    per_job[name] = out.pruned
  end
  log().info("retention: pass done", { name = self.name,
    pruned = summary.pruned, statements = summary.statements,
    errors = summary.errors, elapsed = summary.elapsed, jobs = per_job })
  return summary
end

--- syntax: r = r:start()
-- Runs a pass after opts.delay, then every interval (with up to 10 %
-- jitter, so instances started together do not collide every time), in
-- its own task until r:stop(). A failed pass is logged; the next runs.
function Runner:start()
  if self.task then
    return self
  end
  self.task = core.spawn(function()
    core.sleep(self.delay)
    while true do
      local ok, err = pcall(self.run_once, self)
      if not ok then
        self.stats.errors = self.stats.errors + 1
        log().error("retention: pass raised", { name = self.name,
                                                error = tostring(err) })
      end
      core.sleep(self.interval * (1 + 0.1 * math.random()))
    end
  end)
  return self
end

--- syntax: r:stop()
-- Stops the task (a statement in flight is abandoned) and releases the
-- lease of a pass it cut off, so another instance's runner need not wait
-- for its ttl: call it from paygate.on_stop.
-- yields: for the release, when a pass was running
function Runner:stop()
  local h = self.held
  self.held = nil
  if self.task then
    pcall(self.task.cancel, self.task)
    self.task = nil
  end
  if h and not h.finished and not h.lost then
    lease.release(self.lease_store, h.lease)
  end
end

--- syntax: r = retention.start(db, jobs[, opts])
-- retention.new(db, jobs, opts):start(): the one call an app makes.
_M.start = public(function(db, jobs, opts)
  return new(db, jobs, opts, "retention.start"):start()
end)

--- syntax: t = retention.stats()
-- returns: this worker's counters: passes, held (skipped: another
-- instance held the lease), pruned, statements, errors, jobs = { [name]
-- = rows }; t.instance = { [name] = rows } across the instance's workers
-- (from the shared dictionary) when there is one, for every job of this
-- worker's runners (pruned here or by another worker).
function _M.stats()
  local t = { passes = counts.passes, held = counts.held,
              pruned = counts.pruned, statements = counts.statements,
              errors = counts.errors, jobs = {} }
  for k, v in pairs(counts.jobs) do
    t.jobs[k] = v
  end
  local d = dict()
  if d then
    t.instance = {}
    for k in pairs(job_names) do
      t.instance[k] = d:get(SHARED_PREFIX .. k)
    end
  end
  return t
end

return _M
