-- paygate.fsm: declared state machines over a business table on
-- paygate.sql, with guards, enter/leave hooks, optimistic concurrency
-- (a version per row) and an audit entry (paygate.audit) per transition,
-- written in the same transaction.
--
--   local fsm = require "paygate.fsm"
--   local payments = fsm.new(fsm.payment, {
--     store = fsm.sql_store{ table = "payments" },   -- id, state, version
--     enter = { paid = function(ctx) ... ctx.tx:exec(...) end },
--   })
--   assert(payments:create(db, { id = "P1", amount = 100 }))
--   local res, err = payments:apply(db, "P1", "succeeded", {
--     cause = "notification", actor = "wechatpay",
--     evidence = { notification_id = "EV-1" },
--     set = { transaction_id = "4200..." } })
--   -- res = { id, from, to, event, version, row, audit }
--   -- inside the caller's own transaction (dedupe + transition + outbox):
--   db:transaction(function(tx)
--     local res, err = payments:transition(tx, "P1", "succeeded", opts)
--     if not res then return nil, err end     -- rolls everything back
--     ...
--   end)
--   -- or as one write job (db:atomic: on SQLite it joins the group
--   -- commit), decided on the row read beforehand, retried on conflict:
--   local res, err = payments:apply_atomic(db, "P1", "succeeded", {
--     add = function(plan) return { dedupe_stmt, outbox_stmt } end })
--
-- Failures: nil, err (core.error) with kind "not_found" (no such row),
-- "bad_row" (its version is not an integer), "illegal_transition" (no
-- declared transition from the row's state for that event: refused,
-- logged, counted, never applied), "guard_failed"
-- (declared, but every guard said no; err.reason), "stale_version"
-- (retryable: another writer moved the row first; apply() retries from
-- fresh state), the audit's "conflict", a hook's own error, or the
-- store's kinds. Misuse (a bad definition, wrong argument types) raises.

local core = require "paygate.core"
local sql = require "paygate.sql"
local audit = require "paygate.audit"

local type, pairs, ipairs, tostring, error, getmetatable, setmetatable,
      select, unpack, concat, sort, random, min =
      type, pairs, ipairs, tostring, error, getmetatable, setmetatable,
      select, unpack, table.concat, table.sort, math.random, math.min
-- LuaJIT's table.new(narray, nhash): a table made at the size it will
-- have, where one grown key by key is rehashed at every power of two
local new_tab = require "table.new"

local _M = { _VERSION = "0.1.0" }

local DEFAULT_ATTEMPTS = 10

local function log()
  return require("paygate").log
end

------------------------------------------------------------- counters

-- In-process counters (one set per worker process; fsm.stats() and
-- fsm.prometheus() read them). Series key: machine "\0" from "\0" event.
local counters = {
  transitions = {}, illegal = {}, guard_refused = {}, stale = {},
}

-- Illegal transitions are also on /metrics, summed over the workers, by
-- machine name (a machine is declared in code: a bounded set).
local illegal_total = require("paygate.metrics").counter(
  "paygate_fsm_illegal_transitions_total", "Transitions refused: not "
  .. "declared from the current state.", { "machine" }, { max_series = 32 })

local function count(which, machine, from, event)
  local key = machine .. "\0" .. tostring(from) .. "\0" .. tostring(event)
  local t = counters[which]
  t[key] = (t[key] or 0) + 1
  if which == "illegal" then illegal_total:inc({ machine }) end
end

local function series(t)
  local out, total = {}, 0
  for key, n in pairs(t) do
    local machine, from, event = key:match("^(.-)%z(.-)%z(.*)$")
    out[#out + 1] = { machine = machine, from = from, event = event,
                      count = n }
    total = total + n
  end
  sort(out, function(a, b)
    return a.machine .. "\0" .. a.from .. "\0" .. a.event
           < b.machine .. "\0" .. b.from .. "\0" .. b.event
  end)
  return out, total
end

--- syntax: st = fsm.stats()
-- returns: { transitions_total, illegal_transitions_total,
-- guard_refusals_total, stale_versions_total, and per series:
-- transitions, illegal_transitions, guard_refusals, stale_versions =
-- { { machine, from, event, count }, ... } }. Counts are this process's
-- (each worker counts its own).
function _M.stats()
  local st = {}
  for name, t in pairs({ transitions = counters.transitions,
                         illegal_transitions = counters.illegal,
                         guard_refusals = counters.guard_refused,
                         stale_versions = counters.stale }) do
    local list, total = series(t)
    st[name] = list
    st[name .. "_total"] = total
  end
  return st
end

local function label(s)
  return (tostring(s):gsub("[\\\"\n]", { ["\\"] = "\\\\", ['"'] = '\\"',
                                         ["\n"] = "\\n" }))
end

--- syntax: text = fsm.prometheus()
-- returns: the counters in Prometheus text format
-- (paygate_fsm_illegal_transitions_total{machine,from,event} ...), for an
-- app's own /metrics route.
function _M.prometheus()
  local st, out = _M.stats(), {}
  for _, m in ipairs({
    { "transitions", "paygate_fsm_transitions_total",
      "State transitions applied." },
    { "illegal_transitions", "paygate_fsm_illegal_transitions_total",
      "Transitions refused: not declared from the current state." },
    { "guard_refusals", "paygate_fsm_guard_refusals_total",
      "Declared transitions refused by a guard." },
    { "stale_versions", "paygate_fsm_stale_versions_total",
      "Writes that found the row moved on (optimistic concurrency)." },
  }) do
    out[#out + 1] = "# HELP " .. m[2] .. " " .. m[3]
    out[#out + 1] = "# TYPE " .. m[2] .. " counter"
    for _, s in ipairs(st[m[1]]) do
      out[#out + 1] = ('%s{machine="%s",from="%s",event="%s"} %d'):format(
        m[2], label(s.machine), label(s.from), label(s.event), s.count)
    end
  end
  return concat(out, "\n") .. "\n"
end

---------------------------------------------------- ready-made machines

--- fsm.payment: a payment (one WeChat Pay order).
-- created: stored, nothing sent yet; paying: the prepay call succeeded,
-- the customer may pay; unknown: a call's outcome is not known (timeout
-- after sending, an unverified response): a query resolves it. A success
-- reported by WeChat is applied from any state before paid -- money taken
-- after a close (or on a failed attempt) is never dropped.
_M.payment = {
  name = "payment",
  initial = "created",
  states = { "created", "paying", "paid", "partially_refunded", "refunded",
             "closed", "failed", "unknown" },
  transitions = {
    { event = "opened", from = "created", to = "paying" },
    { event = "outcome_unknown", from = { "created", "paying" },
      to = "unknown" },
    { event = "still_open", from = "unknown", to = "paying" },
    { event = "succeeded",
      from = { "created", "paying", "unknown", "closed", "failed" },
      to = "paid" },
    { event = "closed", from = { "created", "paying", "unknown" },
      to = "closed" },
    { event = "failed", from = { "created", "paying", "unknown" },
      to = "failed" },
    { event = "refunded_partially", from = { "paid", "partially_refunded" },
      to = "partially_refunded" },
    { event = "refunded_fully", from = { "paid", "partially_refunded" },
      to = "refunded" },
  },
}

--- fsm.refund: one refund of a payment (WeChat's refund statuses).
-- created: stored, not sent; processing: accepted by WeChat; unknown: the
-- refund call's outcome is not known; abnormal: WeChat could not pay it
-- back (REFUND.ABNORMAL: handled through the abnormal-refund API).
_M.refund = {
  name = "refund",
  initial = "created",
  states = { "created", "processing", "succeeded", "closed", "abnormal",
             "failed", "unknown" },
  transitions = {
    { event = "accepted", from = { "created", "unknown" },
      to = "processing" },
    { event = "rejected", from = { "created", "unknown" }, to = "failed" },
    { event = "outcome_unknown", from = "created", to = "unknown" },
    { event = "succeeded",
      from = { "created", "processing", "unknown", "abnormal" },
      to = "succeeded" },
    { event = "closed",
      from = { "created", "processing", "unknown", "abnormal" },
      to = "closed" },
    { event = "abnormal", from = { "created", "processing", "unknown" },
      to = "abnormal" },
  },
}

------------------------------------------------------------ SQL store

local function check_ident(fname, what, s, dotted)
  local pat = dotted and "^[%a_][%w_]*%.?[%w_]*$" or "^[%a_][%w_]*$"
  if type(s) ~= "string" or not s:match(pat) or s:sub(-1) == "." then
    error(fname .. ": " .. what .. " must be an SQL identifier", 3)
  end
end

local Store = {}
Store.__index = Store

--- syntax: store = fsm.sql_store{ table = "payments"[, id = "id",
--   state = "state", version = "version"] }
-- A store over a table the caller owns: the machine reads a row by id
-- (every column), moves its state with UPDATE ... WHERE id = ? AND
-- version = ?, and inserts new rows. Names are SQL identifiers (checked),
-- values are always bound.
-- Any table with the same methods is a store too:
--   store:load(q, id) -> row (with row[store.state_col],
--     row[store.version_col]) | false (no such row) | nil, err
--   store:save(tx, id, version, to, set) -> true | false (stale) | nil, err
--   store:insert(tx, row) -> true | nil, err
function _M.sql_store(o)
  if type(o) ~= "table" then
    error("fsm.sql_store: opts must be a table", 2)
  end
  check_ident("fsm.sql_store", "opts.table", o.table, true)
  local s = setmetatable({ table = o.table, id_col = o.id or "id",
                           state_col = o.state or "state",
                           version_col = o.version or "version" }, Store)
  check_ident("fsm.sql_store", "opts.id", s.id_col)
  check_ident("fsm.sql_store", "opts.state", s.state_col)
  check_ident("fsm.sql_store", "opts.version", s.version_col)
  s.select = "SELECT * FROM " .. s.table .. " WHERE " .. s.id_col .. " = $1"
  return s
end

function Store:load(q, id)
  local rows, err = q:query(self.select, { id })
  if not rows then
    return nil, err
  end
  return rows[1] or false
end

-- A table's keys in order. Made at its size (grown key by key, a set's
-- list is resized four times); a short list is put in order here, by
-- insertion, which the JIT compiles: table.sort is C that it does not,
-- calling back through Lua's C API for every comparison.
local SORT_HERE = 16            -- keys sorted by insertion (then table.sort)
local function sorted_keys(t)
  local n = 0
  for _ in pairs(t) do
    n = n + 1
  end
  local keys = new_tab(n, 0)
  n = 0
  for k in pairs(t) do
    n = n + 1
    keys[n] = k
  end
  if n > SORT_HERE then
    sort(keys)
    return keys
  end
  for i = 2, n do
    local k, j = keys[i], i - 1
    while j > 0 and k < keys[j] do
      keys[j + 1] = keys[j]
      j = j - 1
    end
    keys[j + 1] = k
  end
  return keys
end

-- The UPDATE's text for the sorted keys of set, checked and made once per
-- list of keys (the same keys give the same text and the same verdict):
-- kept in a tree of the keys in order, so no key can stand for another.
local SAVE_TEXTS_MAX = 64      -- texts kept per store (then started over)
local TEXT = {}                -- a node's text (a key no caller has)

local function save_text(self, keys)
  local node = self.save_texts
  for i = 1, #keys do
    if not node then
      break
    end
    node = node[keys[i]]
  end
  local text = node and node[TEXT]
  if text then
    return text
  end
  local sets = { self.state_col .. " = $1", self.version_col .. " = $2" }
  for i, k in ipairs(keys) do
    check_ident("fsm: opts.set", "a key", k)
    if k == self.state_col or k == self.version_col or k == self.id_col then
      error("fsm: opts.set may not change " .. k .. " (the machine's)", 0)
    end
    sets[#sets + 1] = k .. " = $" .. (i + 2)
  end
  local n = #keys + 2
  text = "UPDATE " .. self.table .. " SET " .. concat(sets, ", ")
    .. " WHERE " .. self.id_col .. " = $" .. (n + 1) .. " AND "
    .. self.version_col .. " = $" .. (n + 2)
  if not self.save_texts or self.save_texts_n >= SAVE_TEXTS_MAX then
    self.save_texts, self.save_texts_n = {}, 0
  end
  node = self.save_texts
  for i = 1, #keys do
    local nx = node[keys[i]]
    if not nx then
      nx = {}
      node[keys[i]] = nx
    end
    node = nx
  end
  node[TEXT] = text
  self.save_texts_n = self.save_texts_n + 1
  return text
end

-- The UPDATE that moves row id from version to version + 1 (state to, and
-- the columns of set): { sql, params }.
function Store:save_stmt(id, version, to, set)
  local keys = sorted_keys(set)
  local text = save_text(self, keys)
  local n = #keys
  local params = new_tab(n + 4, 1)           -- (and params.n)
  params[1], params[2] = to, version + 1
  for i = 1, n do
    params[i + 2] = set[keys[i]]
  end
  n = n + 2
  params[n + 1], params[n + 2], params.n = id, version, n + 2
  -- (with room for the expect and name m:plan gives it)
  local st = new_tab(2, 2)
  st[1], st[2] = text, params
  return st
end

function Store:save(tx, id, version, to, set)
  local st = self:save_stmt(id, version, to, set)
  local res, err = tx:exec(st[1], st[2])
  if not res then
    return nil, err
  end
  return res.changes == 1
end

function Store:insert(tx, row)
  local keys, marks, params = sorted_keys(row), {}, {}
  for i, k in ipairs(keys) do
    check_ident("fsm: create", "a column name", k)
    marks[i] = "$" .. i
    params[i] = row[k]
  end
  params.n = #keys
  local res, err = tx:exec("INSERT INTO " .. self.table .. " ("
    .. concat(keys, ", ") .. ") VALUES (" .. concat(marks, ", ") .. ")",
    params)
  if not res then
    return nil, err
  end
  return true
end

------------------------------------------------------------- machines

local Machine = {}
Machine.__index = Machine

local function as_list(v)
  if type(v) == "table" then
    return v
  end
  return { v }
end

local function check_fn(fname, what, f)
  if type(f) ~= "function" then
    error(fname .. ": " .. what .. " must be a function", 3)
  end
end

-- hooks: { [state] = fn | { fn, ... } }, from the definition then opts.
local function add_hooks(fname, m, kind, src)
  if src == nil then
    return
  end
  if type(src) ~= "table" then
    error(fname .. ": " .. kind .. " must be a table of state -> hook", 3)
  end
  for state, fns in pairs(src) do
    if not m.is_state[state] then
      error(fname .. ": " .. kind .. "." .. tostring(state)
            .. " is not a state", 3)
    end
    local list = m[kind][state] or {}
    m[kind][state] = list
    for _, f in ipairs(as_list(fns)) do
      check_fn(fname, kind .. "." .. state, f)
      list[#list + 1] = f
    end
  end
end

local function add_guards(fname, m, src)
  if src == nil then
    return
  end
  if type(src) ~= "table" then
    error(fname .. ": guards must be a table of event -> guard", 3)
  end
  for event, fns in pairs(src) do
    if not m.is_event[event] then
      error(fname .. ": guards." .. tostring(event) .. " is not an event", 3)
    end
    local list = m.guards[event] or {}
    m.guards[event] = list
    for _, f in ipairs(as_list(fns)) do
      check_fn(fname, "guards." .. event, f)
      list[#list + 1] = f
    end
  end
end

--- syntax: m = fsm.new(def[, opts])
-- def: { name, initial, states = { ... }, transitions = { { from =
--   state | { states }, to = state, event = name?, guard = fn? }, ... },
--   guards = { [event] = fn | { fn... } }, enter = { [state] = fn | {..} },
--   leave = { ... } }.
-- opts: { store (see fsm.sql_store; needed to read and write rows),
--   subject = function(id, row) -> audit subject (default name .. ":" ..
--   id), guards, enter, leave (added after the definition's), attempts
--   (apply's bound, default 10) }.
-- Several transitions may share an event and a from state: the first whose
-- guards pass is taken. A transition without an event is addressed by its
-- target: m:transition(tx, id, { to = "paid" }).
-- Guards: fn(ctx) -> true, or false/nil[, reason]. Hooks: fn(ctx) -> any,
-- or nil, err (rolls the transition back; so does raising). Both run in
-- the transaction (ctx.tx) and must have no effect outside it: a stale
-- version runs them again. Order: guards, the row's UPDATE, leave hooks
-- of the old state, the audit entry, enter hooks of the new state.
-- ctx = { tx, machine, id, row (before), from, to, event, set, cause,
--   actor, evidence, data (opts.data) }.
function _M.new(def, opts)
  local fname = "fsm.new"
  if type(def) ~= "table" then
    error(fname .. ": def must be a table", 2)
  end
  opts = opts or {}
  if type(opts) ~= "table" then
    error(fname .. ": opts must be a table", 2)
  end
  if type(def.name) ~= "string" or def.name == "" then
    error(fname .. ": def.name must be a non-empty string", 2)
  end
  if type(def.states) ~= "table" or #def.states == 0 then
    error(fname .. ": def.states must be a list of state names", 2)
  end
  local m = setmetatable({ name = def.name, states = {}, is_state = {},
                           is_event = {}, by_event = {}, by_target = {},
                           transitions = {}, guards = {}, enter = {},
                           leave = {} }, Machine)
  for i, s in ipairs(def.states) do
    if type(s) ~= "string" or s == "" or m.is_state[s] then
      error(fname .. ": def.states[" .. i .. "] must be a new state name",
            2)
    end
    m.is_state[s] = true
    m.states[i] = s
  end
  if not m.is_state[def.initial] then
    error(fname .. ": def.initial must be one of def.states", 2)
  end
  m.initial = def.initial
  if type(def.transitions) ~= "table" then
    error(fname .. ": def.transitions must be a list", 2)
  end
  for i, t in ipairs(def.transitions) do
    local where = "def.transitions[" .. i .. "]"
    if type(t) ~= "table" or not m.is_state[t.to] then
      error(fname .. ": " .. where .. ".to must be a state", 2)
    end
    if t.event ~= nil and (type(t.event) ~= "string" or t.event == "") then
      error(fname .. ": " .. where .. ".event must be a string", 2)
    end
    if t.guard ~= nil and type(t.guard) ~= "function" then
      error(fname .. ": " .. where .. ".guard must be a function", 2)
    end
    local froms = as_list(t.from)
    if #froms == 0 then
      error(fname .. ": " .. where .. ".from must name a state", 2)
    end
    for _, from in ipairs(froms) do
      if not m.is_state[from] then
        error(fname .. ": " .. where .. ".from: " .. tostring(from)
              .. " is not a state", 2)
      end
      local tr = { from = from, to = t.to, event = t.event,
                   guard = t.guard }
      m.transitions[#m.transitions + 1] = tr
      local key = t.event and (from .. "\0" .. t.event)
                  or (from .. "\0\0" .. t.to)
      local index = t.event and m.by_event or m.by_target
      local list = index[key] or {}
      index[key] = list
      list[#list + 1] = tr
    end
    if t.event then
      m.is_event[t.event] = true
    end
  end
  add_guards(fname, m, def.guards)
  add_guards(fname, m, opts.guards)
  add_hooks(fname, m, "enter", def.enter)
  add_hooks(fname, m, "leave", def.leave)
  add_hooks(fname, m, "enter", opts.enter)
  add_hooks(fname, m, "leave", opts.leave)
  if opts.store ~= nil and (type(opts.store) ~= "table"
     or type(opts.store.load) ~= "function"
     or type(opts.store.save) ~= "function") then
    error(fname .. ": opts.store must be a store (fsm.sql_store{...})", 2)
  end
  m.store = opts.store
  if opts.subject ~= nil then
    check_fn(fname, "opts.subject", opts.subject)
  end
  m.subject = opts.subject or function(id)
    return def.name .. ":" .. tostring(id)
  end
  m.attempts = opts.attempts or DEFAULT_ATTEMPTS
  if type(m.attempts) ~= "number" or m.attempts < 1
     or m.attempts % 1 ~= 0 then
    error(fname .. ": opts.attempts must be an integer >= 1", 2)
  end
  return m
end

--- syntax: to = m:can(from, event)
-- returns: the target of the first transition declared for (from, event)
-- -- guards not run -- or nil.
function Machine:can(from, event)
  local list = self.by_event[tostring(from) .. "\0" .. tostring(event)]
  return list and list[1].to or nil
end

--- syntax: events = m:events(from)
-- returns: the events declared from state `from`, sorted.
function Machine:events(from)
  local seen, out = {}, {}
  for _, t in ipairs(self.transitions) do
    if t.from == from and t.event and not seen[t.event] then
      seen[t.event] = true
      out[#out + 1] = t.event
    end
  end
  sort(out)
  return out
end

local function check_machine(fname, m)
  if getmetatable(m) ~= Machine then
    error(fname .. ": call it as m:" .. fname:match("[%w_]+$") .. "(...)",
          3)
  end
  if not m.store then
    error(fname .. ": the machine has no store (fsm.new(def, { store = "
          .. "... }))", 3)
  end
end

local function check_id(fname, id)
  if type(id) ~= "string" and type(id) ~= "number" then
    error(fname .. ": id must be a string or a number", 3)
  end
end

local function check_opts(fname, opts)
  if opts ~= nil and type(opts) ~= "table" then
    error(fname .. ": opts must be a table", 3)
  end
  return opts or {}
end

local function fail(kind, message, fields)
  fields = fields or {}
  fields.retryable = kind == "stale_version"
  return nil, core.error(kind, message, fields)
end

-- Runs a list of hooks (or guards' twin): nil, err stops.
local function run_hooks(list, ctx)
  if not list then
    return true
  end
  for _, f in ipairs(list) do
    local ok, err = f(ctx)
    if ok == nil and err ~= nil then
      return nil, err
    end
  end
  return true
end

local function guards_pass(m, t, ctx)
  if t.guard then
    local ok, why = t.guard(ctx)
    if not ok then
      return false, why or "guard of " .. t.from .. " -> " .. t.to
    end
  end
  local list = t.event and m.guards[t.event]
  if list then
    for _, g in ipairs(list) do
      local ok, why = g(ctx)
      if not ok then
        return false, why or "guard of " .. t.event
      end
    end
  end
  return true
end

local function what_of(how)
  if type(how) == "table" then
    return "->" .. tostring(how.to)
  end
  return how
end

-- What an illegal transition's message adds: a name the machine does not
-- declare at all (a misspelt event or state in the caller's code: no row
-- can ever take it), with the one it looks like; else what the machine
-- takes from that state.
local function illegal_why(m, from, event, target)
  local known, what, name = m.is_event, "event", event
  if not event then
    known, what, name = m.is_state, "state", target
  end
  if not known[name] then
    local list = {}
    for k in pairs(known) do list[#list + 1] = k end
    sort(list)
    return ": " .. name .. " is no " .. what .. " of machine " .. m.name
      .. "; its " .. what .. "s: " .. concat(list, ", ")
      .. require("paygate.suggest").hint(name, known)
  end
  if event then
    local list = m:events(from)
    return " (events from " .. tostring(from) .. ": "
      .. (#list > 0 and concat(list, ", ") or "none") .. ")"
  end
  return ""
end

-- The decision of a transition of row (read by the caller; false when
-- there is none): which declared transition, its guards run. fname names
-- the public function for raises (at its caller: level 3 from there).
-- returns: ctx (with ctx.version, ctx.version_col, ctx.state_col), or
-- nil, err (not_found, bad_row, illegal_transition, stale_version,
-- guard_failed).
local function decide(self, fname, q, id, how, opts, row)
  local store, name = self.store, self.name
  if not row then
    return fail("not_found", name .. " " .. tostring(id) .. " not found",
                { id = id })
  end
  local state_col = store.state_col or "state"
  local version_col = store.version_col or "version"
  local from, version = row[state_col], row[version_col]
  if type(version) ~= "number" or version % 1 ~= 0 then
    return fail("bad_row", name .. " " .. tostring(id) .. ": column "
      .. version_col .. " holds no integer version", { id = id })
  end
  if type(how) == "function" then
    how = how(row)
  end
  local event, target
  if type(how) == "string" then
    event = how
  elseif type(how) == "table" and type(how.to) == "string" then
    target = how.to
  else
    error(fname .. ": how must be an event name, { to = state } or a"
          .. " function returning one", 3)
  end
  local candidates = event and self.by_event[tostring(from) .. "\0" .. event]
                     or self.by_target[tostring(from) .. "\0\0"
                                       .. tostring(target)]
  if not candidates then
    count("illegal", name, from, what_of(how))
    log().warn("fsm: illegal transition refused", { machine = name,
      id = id, from = from, event = event, to = target,
      cause = opts.cause })
    return fail("illegal_transition", name .. " " .. tostring(id) .. ": "
      .. (event and ("no " .. event .. " from " .. tostring(from))
          or (tostring(from) .. " -> " .. target .. " is not declared"))
      .. illegal_why(self, from, event, target),
      { id = id, from = from, event = event, to = target })
  end
  if opts.version ~= nil and opts.version ~= version then
    count("stale", name, from, what_of(how))
    return fail("stale_version", name .. " " .. tostring(id)
      .. " is at version " .. tostring(version) .. ", not "
      .. tostring(opts.version), { id = id, version = version,
      expected = opts.version })
  end
  local set = opts.set
  if type(set) == "function" then
    set = set(row)
  end
  set = set or {}
  if type(set) ~= "table" then
    error(fname .. ": opts.set must be a table or a function returning"
          .. " one", 3)
  end
  local ctx = { tx = q, machine = name, id = id, row = row, from = from,
                event = event, set = set, cause = opts.cause,
                actor = opts.actor, evidence = opts.evidence,
                data = opts.data }
  local chosen, reasons = nil, nil    -- (reasons: made for a refusal)
  for _, t in ipairs(candidates) do
    ctx.to = t.to
    local ok, why = guards_pass(self, t, ctx)
    if ok then
      chosen = t
      break
    end
    reasons = reasons or {}
    reasons[#reasons + 1] = tostring(why)
  end
  if not chosen then
    reasons = reasons or {}
    -- reason: the last candidate's (the most general one, declared last)
    local reason = reasons[#reasons]
    count("guard_refused", name, from, what_of(how))
    return fail("guard_failed", name .. " " .. tostring(id) .. ": "
      .. concat(reasons, "; "), { id = id, from = from, event = event,
      to = ctx.to, reason = reason, reasons = reasons })
  end
  ctx.to = chosen.to
  ctx.version, ctx.state_col, ctx.version_col =
    version, state_col, version_col
  ctx.how = how
  return ctx
end

-- The row after the transition ctx.
local function row_after(ctx)
  -- made at its size (a row has a few dozen columns: grown key by key,
  -- it would be rehashed five or six times)
  local n = 2
  for _ in pairs(ctx.row) do
    n = n + 1
  end
  for _ in pairs(ctx.set) do
    n = n + 1
  end
  local after = new_tab(0, n)
  for k, v in pairs(ctx.row) do
    after[k] = v
  end
  for k, v in pairs(ctx.set) do
    after[k] = v
  end
  after[ctx.state_col], after[ctx.version_col] = ctx.to, ctx.version + 1
  return after
end

--- syntax: res, err = m:transition(tx, id, how[, opts])
-- Moves row `id` inside the caller's transaction (tx, in db:transaction).
-- how: an event name; { to = state } for a transition declared without
-- one; or function(row) -> either of those, picked from the row read.
-- opts: { cause, actor (strings), evidence (table), set (columns to write
-- with the state: a table or function(row) -> table), version (the
-- version the caller expects: stale_version if the row moved), row (the
-- row already read: its version is checked by the UPDATE), data (for
-- guards and hooks), at (epoch ms for the audit entry) }.
-- returns: { id, from, to, event, version (new), row (after), audit
-- (the entry) }, or nil, err: the caller must then return nil, err from
-- its transaction function, so that nothing of it commits.
-- yields: until the statements ran
function Machine:transition(tx, id, how, opts)
  check_machine("m:transition", self)
  if getmetatable(tx) ~= sql.TX then
    error("m:transition: tx must be a paygate.sql transaction", 2)
  end
  check_id("m:transition", id)
  opts = check_opts("m:transition", opts)
  local store, name = self.store, self.name
  local row, err = opts.row
  if not row then
    row, err = store:load(tx, id)
    if row == nil then
      return nil, err
    end
  end
  local ctx
  ctx, err = decide(self, "m:transition", tx, id, how, opts, row)
  if not ctx then
    return nil, err
  end
  local from, to, version, event, set = ctx.from, ctx.to, ctx.version,
                                        ctx.event, ctx.set
  how = ctx.how
  local saved
  saved, err = store:save(tx, id, version, to, set)
  if saved == nil then
    return nil, err
  end
  if not saved then
    count("stale", name, from, what_of(how))
    return fail("stale_version", name .. " " .. tostring(id)
      .. " moved on from version " .. tostring(version),
      { id = id, version = version })
  end
  local ok
  ok, err = run_hooks(self.leave[from], ctx)
  if not ok then
    return nil, err
  end
  local entry
  entry, err = audit.append(tx, self.subject(id, row), {
    what = name .. "." .. (event or ("->" .. to)), ref = tostring(id),
    from = from, to = to, cause = opts.cause, actor = opts.actor,
    evidence = opts.evidence, at = opts.at })
  if not entry then
    return nil, err
  end
  ok, err = run_hooks(self.enter[to], ctx)
  if not ok then
    return nil, err
  end
  count("transitions", name, from, what_of(how))
  return { id = id, from = from, to = to, event = event,
           version = version + 1, row = row_after(ctx), audit = entry }
end

local function pack(...)
  return { n = select("#", ...), ... }
end

-- stale_version, or the audit chain's head moving past its own retries:
-- both mean "someone else wrote first; read again".
local function is_stale(err)
  return type(err) == "table"
         and (err.kind == "stale_version" or err.kind == "conflict")
end

-- A random pause, growing with the attempt (at most ~75 ms): the writers
-- that collided do not all come back together.
local function pause(attempt)
  core.sleep(min(0.05, 0.001 * attempt) * (0.5 + random()))
end

--- syntax: ... = fsm.retry(db, fn[, opts])
-- Runs db:transaction(fn) and, while it fails with stale_version (or the
-- audit's conflict), runs it again (fn reads fresh state each time) after
-- a short random pause, at most opts.attempts times in all (default 10).
-- opts.retries and opts.query_timeout go to db:transaction (its own
-- retries of a serialization failure or a busy database, default the
-- db's): a hot row's writers under REPEATABLE READ want more of them.
-- fn must have no effect outside its transaction.
-- returns: what db:transaction returns (the last attempt's failure when
-- every attempt was stale).
-- yields: until committed
function _M.retry(db, fn, opts)
  if getmetatable(db) ~= sql.DB then
    error("fsm.retry: db must be a paygate.sql db", 2)
  end
  if type(fn) ~= "function" then
    error("fsm.retry: fn must be a function", 2)
  end
  local attempts = opts and opts.attempts or DEFAULT_ATTEMPTS
  local tx_opts
  if opts and (opts.retries ~= nil or opts.query_timeout ~= nil) then
    tx_opts = { retries = opts.retries, query_timeout = opts.query_timeout }
  end
  local res
  for attempt = 1, attempts do
    res = pack(db:transaction(fn, tx_opts))
    if res[1] ~= nil or not is_stale(res[2]) or attempt == attempts then
      break
    end
    pause(attempt)
  end
  return unpack(res, 1, res.n)
end

--- syntax: res, err = m:apply(db, id, how[, opts])
-- m:transition in its own transaction, retried from fresh state on
-- stale_version (at most opts.attempts or the machine's attempts). The
-- row is read before the transaction opens (optimistic: the UPDATE checks
-- its version), so the writer is held only for the writes.
-- returns, yields: as m:transition (committed and durable on success)
function Machine:apply(db, id, how, opts)
  check_machine("m:apply", self)
  if getmetatable(db) ~= sql.DB then
    error("m:apply: db must be a paygate.sql db", 2)
  end
  check_id("m:apply", id)
  opts = check_opts("m:apply", opts)
  local ok, err = audit.ensure_schema(db)
  if not ok then
    return nil, err
  end
  local attempt_opts = {}
  for k, v in pairs(opts) do
    attempt_opts[k] = v
  end
  local function attempt(tx)
    return self:transition(tx, id, how, attempt_opts)
  end
  local attempts = opts.attempts or self.attempts
  local res
  for i = 1, attempts do
    -- read before the transaction: on PostgreSQL a read on db from
    -- inside one would wait for a second pool connection
    local row, lerr = self.store:load(db, id)
    if row == nil then
      return nil, lerr
    end
    attempt_opts.row = row or nil
    res = pack(db:transaction(attempt))
    if res[1] ~= nil or not is_stale(res[2]) or i == attempts then
      break
    end
    if opts.version ~= nil and res[2].kind == "stale_version" then
      -- the row is not at the version the caller expects, and no fresh
      -- read brings it back there: say so at once (as m:apply_atomic
      -- does), not after every attempt, each counted as a stale version
      break
    end
    pause(i)
  end
  return unpack(res, 1, res.n)
end

------------------------------------------------------ atomic plans

-- The name of a plan's version-guarded UPDATE (err.name of its conflict).
_M.VERSION_STMT = "fsm.version"

-- Statements whose conflict means "another writer moved the row or its
-- audit chain first": fsm.atomic reads again and retries on them.
local RETRY_NAMES = { [_M.VERSION_STMT] = true, [audit.HEAD_STMT] = true,
                      [audit.ENTRY_STMT] = true }

--- syntax: plan, err = m:plan(q, id, how[, opts])
-- The transition as statements for db:atomic, decided on the row read
-- beforehand: no transaction is open while it is decided, and the writer
-- runs the statements as one job of its group commit.
-- q (a db or tx) reads what opts does not give: the row (opts.row) and
-- the audit chain's head (opts.head: audit.head()'s answer). opts as
-- m:transition's (cause, actor, evidence, set, version, data, at).
-- Guards run as in m:transition. Hooks run with ctx.tx = nil and
-- ctx.statements, the plan's list: a hook adds its writes there
-- (a hook written for m:transition, using ctx.tx, raises).
-- returns: plan = { id, from, to, event, version (new), row (after),
-- audit (the entry), statements = { version-guarded UPDATE (expect 1,
-- name fsm.VERSION_STMT), audit head move and entry insert
-- (audit.plan), hooks' } }; append your own (a dedupe insert with
-- expect = 1, an outbox insert) and run them with db:atomic or
-- fsm.atomic. Or nil, err as m:transition (not_found, bad_row,
-- illegal_transition, guard_failed, stale_version, the store's kinds).
-- yields: while it reads
function Machine:plan(q, id, how, opts)
  check_machine("m:plan", self)
  local mt = getmetatable(q)
  if mt ~= sql.DB and mt ~= sql.TX then
    error("m:plan: q must be a paygate.sql db or tx", 2)
  end
  check_id("m:plan", id)
  opts = check_opts("m:plan", opts)
  local store = self.store
  if type(store.save_stmt) ~= "function" then
    error("m:plan: the store has no save_stmt method", 2)
  end
  local row, err = opts.row
  if row == nil then
    row, err = store:load(q, id)
    if row == nil then
      return nil, err
    end
  end
  local ctx
  ctx, err = decide(self, "m:plan", nil, id, how, opts, row)
  if not ctx then
    return nil, err
  end
  local subject = self.subject(id, row)
  local head = opts.head
  if head == nil then
    head, err = audit.head(q, subject)
    if head == nil then
      return nil, err
    end
  end
  local st = store:save_stmt(id, ctx.version, ctx.to, ctx.set)
  st.expect, st.name = 1, _M.VERSION_STMT
  -- (room for it and the audit's two)
  local stmts = new_tab(3, 0)
  stmts[1] = st
  ctx.statements = stmts
  local ok
  ok, err = run_hooks(self.leave[ctx.from], ctx)
  if not ok then
    return nil, err
  end
  local entry, astmts = audit.plan(subject, {
    what = self.name .. "." .. (ctx.event or ("->" .. ctx.to)),
    ref = tostring(id), from = ctx.from, to = ctx.to, cause = opts.cause,
    actor = opts.actor, evidence = opts.evidence, at = opts.at }, head)
  if not entry then
    return nil, astmts
  end
  for _, a in ipairs(astmts) do
    stmts[#stmts + 1] = a
  end
  ok, err = run_hooks(self.enter[ctx.to], ctx)
  if not ok then
    return nil, err
  end
  return { id = id, machine = self.name, from = ctx.from, to = ctx.to,
           event = ctx.event, version = ctx.version + 1,
           row = row_after(ctx), audit = entry, statements = stmts,
           how = ctx.how }
end

local function is_retry_conflict(err, extra)
  return type(err) == "table" and err.kind == "conflict"
    and err.name ~= nil and (RETRY_NAMES[err.name]
                             or (extra ~= nil and extra[err.name]))
end

--- syntax: m:applied(plan)
-- Counts the plan's transition (fsm.stats, fsm.prometheus) once its
-- statements committed: m:apply_atomic does it itself; call it after
-- your own db:atomic / fsm.atomic of a plan.
function Machine:applied(plan)
  if getmetatable(self) ~= Machine then
    error("m:applied: call it as m:applied(plan)", 2)
  end
  if type(plan) ~= "table" or plan.machine ~= self.name then
    error("m:applied: plan must be a plan of this machine (m:plan)", 2)
  end
  count("transitions", self.name, plan.from, what_of(plan.how))
end

--- syntax: results, value = fsm.atomic(db, build[, opts[, ...]])
-- fsm.retry for plans: build(attempt, ...) reads what it needs and returns
-- stmts[, value] (stmts for db:atomic; {} for nothing to write) or nil,
-- err. The statements run with db:atomic; when they fail with a conflict
-- on a plan's own statement (the row's version, the audit chain: another
-- writer came first) or on a statement named in opts.retry_on (a list of
-- names), build runs again -- reading fresh state -- after a short random
-- pause, at most opts.attempts times in all (default 10).
-- returns: db:atomic's results and build's value; or nil, err (build's
-- error, or the last db:atomic error).
-- yields: until committed
function _M.atomic(db, build, opts, ...)
  if getmetatable(db) ~= sql.DB then
    error("fsm.atomic: db must be a paygate.sql db", 2)
  end
  if type(build) ~= "function" then
    error("fsm.atomic: build must be a function", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("fsm.atomic: opts must be a table", 2)
  end
  local attempts = opts and opts.attempts or DEFAULT_ATTEMPTS
  local extra
  if opts and opts.retry_on then
    extra = {}
    for _, name in ipairs(opts.retry_on) do
      extra[name] = true
    end
  end
  local err
  for attempt = 1, attempts do
    local stmts, value = build(attempt, ...)
    if stmts == nil then
      return nil, value
    end
    if type(stmts) ~= "table" then
      error("fsm.atomic: build must return a list of statements or nil,"
            .. " err", 2)
    end
    if #stmts == 0 then
      return {}, value
    end
    local results, perr = audit.prepare(db, stmts)
    if not results then
      return nil, perr
    end
    results, err = db:atomic(stmts)
    if results then
      return results, value
    end
    if not is_retry_conflict(err, extra) or attempt == attempts then
      break
    end
    pause(attempt)
  end
  return nil, err
end

--- syntax: res, err = m:apply_atomic(db, id, how[, opts])
-- m:apply through a plan: reads the row and the audit head, decides,
-- and hands the statements to the writer as one db:atomic job (on SQLite
-- it joins the group commit instead of holding the writer like a
-- transaction). On a conflict of the version or the audit chain it reads
-- again and retries (opts.attempts, or the machine's). opts as m:apply's,
-- plus add = function(plan) -> { stmt, ... } | nil, err: statements of
-- the caller that commit with the transition or not at all (a dedupe
-- insert with expect = 1, an outbox insert); and retry_on (names of
-- added statements whose conflict also means "read again").
-- returns: the plan (as m:plan's) with results = db:atomic's; or nil,
-- err: a stale version that outlasted the attempts is stale_version
-- (err.cause: the conflict); an added statement's conflict as it is.
-- yields: until committed and durable
function Machine:apply_atomic(db, id, how, opts)
  check_machine("m:apply_atomic", self)
  if getmetatable(db) ~= sql.DB then
    error("m:apply_atomic: db must be a paygate.sql db", 2)
  end
  check_id("m:apply_atomic", id)
  opts = check_opts("m:apply_atomic", opts)
  if opts.add ~= nil and type(opts.add) ~= "function" then
    error("m:apply_atomic: opts.add must be a function", 2)
  end
  local ok, err = audit.ensure_schema(db)
  if not ok then
    return nil, err
  end
  local popts = {}
  for k, v in pairs(opts) do
    popts[k] = v
  end
  local last
  local results, plan = _M.atomic(db, function(attempt)
    if attempt > 1 then
      -- the previous attempt met a newer row or chain: read again
      popts.row, popts.head = nil, nil
      count("stale", self.name, last.from, what_of(last.how))
    end
    local p, perr = self:plan(db, id, how, popts)
    if not p then
      return nil, perr
    end
    last = p
    if opts.add then
      local extra, aerr = opts.add(p)
      if extra == nil and aerr ~= nil then
        return nil, aerr
      end
      for _, st in ipairs(extra or {}) do
        p.statements[#p.statements + 1] = st
      end
    end
    return p.statements, p
  end, { attempts = opts.attempts or self.attempts,
         retry_on = opts.retry_on })
  if not results then
    err = plan
    if type(err) == "table" and err.kind == "conflict"
       and err.name == _M.VERSION_STMT then
      count("stale", self.name, last.from, what_of(last.how))
      return fail("stale_version", self.name .. " " .. tostring(id)
        .. " moved on from version " .. tostring(last.version - 1),
        { id = id, version = last.version - 1, cause = err })
    end
    return nil, err
  end
  self:applied(plan)
  plan.results = results
  return plan
end

--- syntax: row, err = m:get(q, id)
-- returns: the row (every column), or false when there is none.
-- yields: until read
function Machine:get(q, id)
  check_machine("m:get", self)
  check_id("m:get", id)
  return self.store:load(q, id)
end

--- syntax: res, err = m:create(tx_or_db, row[, opts])
-- Inserts row (its columns; state and version are set: the initial state
-- and 1) and appends the first audit entry (what = name .. ".created",
-- to = initial). Enter hooks of the initial state run. opts: cause,
-- actor, evidence, data, at, as for transition.
-- returns: { id, to, version = 1, row, audit }
-- yields: until written (with a db: committed and durable)
function Machine:create(q, row, opts)
  check_machine("m:create", self)
  local mt = getmetatable(q)
  if mt ~= sql.DB and mt ~= sql.TX then
    error("m:create: q must be a paygate.sql db or tx", 2)
  end
  if type(row) ~= "table" then
    error("m:create: row must be a table", 2)
  end
  opts = check_opts("m:create", opts)
  local store = self.store
  if type(store.insert) ~= "function" then
    error("m:create: the store has no insert method", 2)
  end
  local id_col = store.id_col or "id"
  local id = row[id_col]
  if type(id) ~= "string" and type(id) ~= "number" then
    error("m:create: row." .. id_col .. " must be a string or a number", 2)
  end
  local r = {}
  for k, v in pairs(row) do
    r[k] = v
  end
  r[store.state_col or "state"] = self.initial
  r[store.version_col or "version"] = 1
  local function run(tx)
    local ok, err = store:insert(tx, r)
    if not ok then
      return nil, err
    end
    local entry
    entry, err = audit.append(tx, self.subject(id, r), {
      what = self.name .. ".created", ref = tostring(id),
      to = self.initial, cause = opts.cause, actor = opts.actor,
      evidence = opts.evidence, at = opts.at })
    if not entry then
      return nil, err
    end
    local ctx = { tx = tx, machine = self.name, id = id, row = r,
                  to = self.initial, set = {}, cause = opts.cause,
                  actor = opts.actor, evidence = opts.evidence,
                  data = opts.data }
    ok, err = run_hooks(self.enter[self.initial], ctx)
    if not ok then
      return nil, err
    end
    return { id = id, to = self.initial, version = 1, row = r,
             audit = entry }
  end
  if mt == sql.TX then
    return run(q)
  end
  local ok, err = audit.ensure_schema(q)
  if not ok then
    return nil, err
  end
  return q:transaction(run)
end

_M.Machine = Machine

return _M
