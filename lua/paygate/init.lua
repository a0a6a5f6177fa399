-- paygate: the API a handler author sees.
--
--   local paygate = require "paygate"
--   paygate.route("GET", "/orders/:id", function(req)
--     return 200, { id = req.params.id }
--   end)
--
-- Conventions: functions that can fail return value or nil, err (err has
-- kind, message, retryable); misuse raises; I/O yields the coroutine.

local core = require "paygate.core"

-- The level of C primitives these modules call (the binary's core.api,
-- GW_LUA_API in src/core/lpaygate.c; raised with it). A binary built from
-- an older checkout than these modules (the checkout updated under a
-- running paygate, then a reload or a worker restart) is refused here,
-- saying so, instead of failing at the first primitive it lacks.
local API = 2
if (tonumber(core.api) or 0) < API then
  local here = debug.getinfo(1, "S").source:match("^@(.*)/paygate/init%.lua$")
  -- (what to do first: a reload's outcome keeps the first 255 bytes)
  error("paygate: these Lua modules need a newer paygate binary: build it"
        .. " again (cmake --build build) and restart paygate; a reload keeps"
        .. " the running binary (primitives level " .. API .. ", the binary"
        .. " gives " .. (tonumber(core.api) or 0) .. "; modules in "
        .. tostring(here or "lua/") .. ")", 0)
end

local json = require "paygate.json"
local router = require "paygate.router"

local type, pairs, error, tostring, setmetatable, select =
      type, pairs, error, tostring, setmetatable, select

local _M = { version = "0.1.0" }

local error_mt = core.error_mt()

--- syntax: err = paygate.error(kind, message[, fields])
-- returns: an error table with the shared metatable (tostring "kind: msg");
-- fields (a table) becomes the error, so extra fields stay.
_M.error = core.error

--- syntax: ok = paygate.is_error(v)
-- returns: true when v is a paygate error (made by paygate.error or
-- returned as err by any paygate module).
_M.is_error = core.is_error

--- syntax: paygate.abort(status, kind, message)
-- Ends the request now with status (400..599) and a JSON error body
-- { error = kind, message = message }. Raises: code after it does not
-- run, and a db:transaction() it is inside rolls back and lets it through.
function _M.abort(status, kind, message)
  if type(status) ~= "number" or status < 400 or status > 599
     or status % 1 ~= 0 then
    error("paygate.abort: status must be an integer 400..599", 2)
  end
  if kind ~= nil and type(kind) ~= "string" then
    error("paygate.abort: kind must be a string", 2)
  end
  if message ~= nil and type(message) ~= "string" then
    error("paygate.abort: message must be a string", 2)
  end
  error(core.error(kind or "error", message or "",
                   { status = status, abort = true }), 0)
end

-- scheduling primitives (C) -------------------------------------------

_M.sleep = core.sleep          -- paygate.sleep(seconds): yields
_M.spawn = core.spawn          -- task = paygate.spawn(fn, ...)
_M.event = core.event          -- ev = paygate.event(): ev:wait(t), ev:set()
_M.now = core.now              -- cached seconds since the epoch
_M.time_left = core.time_left  -- s to the handler's deadline, or nil
_M.update_time = core.update_time
-- ok, err = paygate.write_file(path, data[, mode]): whole or not at all
_M.write_file = core.write_file
-- ok, err = paygate.mkdir_p(dir[, mode]): a folder and its parents, no shell
_M.mkdir_p = core.mkdir_p
-- ok, err = paygate.chmod(path, mode): a mode set, a symbolic link refused
_M.chmod = core.chmod
-- s, err = paygate.read_file(path, name[, max]): a small file whole; err
-- names name (the config key), never the path or a byte of the file
_M.read_file = core.read_file

_M.timer = {}

--- syntax: handle = paygate.timer.at(delay, fn, ...)
-- Runs fn(...) in its own coroutine after delay seconds.
-- returns: a task; handle:cancel() stops it before it runs.
function _M.timer.at(delay, fn, ...)
  -- (NaN and inf passed a test of < 0: the task then died in core.sleep,
  -- logged, and the timer never ran)
  if not core.is_seconds(delay, true) then
    error("paygate.timer.at: delay must be a number of seconds, 0 .. 1e8",
          2)
  end
  if type(fn) ~= "function" then error("paygate.timer.at: fn must be a function", 2) end
  return core.spawn(function(...)
    core.sleep(delay)
    return fn(...)
  end, ...)
end

-- A tick's error as its text ("kind: message" for an error table) with
-- where it was raised, as a task's failure is logged
local function tick_failed(err)
  return debug.traceback(core.error_string(err), 2)
end

--- syntax: handle = paygate.timer.every(interval, fn, ...)
-- Runs fn(...) every interval seconds, never two at once; an error in fn
-- is logged and the next tick still runs. handle:cancel() stops it.
function _M.timer.every(interval, fn, ...)
  if not core.is_seconds(interval) then
    error("paygate.timer.every: interval must be a number of seconds,"
          .. " > 0 and at most 1e8", 2)
  end
  if type(fn) ~= "function" then
    error("paygate.timer.every: fn must be a function", 2)
  end
  local n, args = select("#", ...), { ... }
  return core.spawn(function()
    while true do
      core.sleep(interval)
      local ok, err = xpcall(fn, tick_failed, unpack(args, 1, n))
      if not ok then
        _M.log.error("timer.every: tick failed", { error = err })
      end
    end
  end)
end

-- stopping --------------------------------------------------------------

local stop_fns = {}

--- syntax: paygate.on_stop(fn)
-- fn() runs when the worker stops gracefully (TERM/INT, a reload, the
-- master stopping), after its last request was answered and before it
-- exits: release leases, flush, say goodbye. The functions run one after
-- another in one coroutine (they may yield), the last given first; an
-- error in one is logged and the next still runs. All of them together
-- get 5 s; the worker then exits anyway. Not under `paygate exec`, and
-- not when the worker is killed.
function _M.on_stop(fn)
  if type(fn) ~= "function" then
    error("paygate.on_stop: fn must be a function", 2)
  end
  stop_fns[#stop_fns + 1] = fn
end

-- Called by the worker (C) on a graceful stop.
function _M._stop()
  for i = #stop_fns, 1, -1 do
    local fn = stop_fns[i]
    stop_fns[i] = nil
    local ok, err = pcall(fn)
    if not ok then
      _M.log.error("on_stop: a stop function failed",
                   { error = core.error_string(err) })
    end
  end
end

-- logging ---------------------------------------------------------------

local log = {}
_M.log = log

-- Fields JSON cannot hold whole (a function, a handle, inf, a sparse
-- array, a cycle; an error table's metatable is fine) are logged piece by
-- piece, each that still fails as its text: a field is never dropped.
local function encodes(v)
  return (pcall(json.encode, v))
end

-- v as JSON can hold it: a table that does not encode is copied key by
-- key (keys as text), each value made so in turn, down to what fails; a
-- table met again (a cycle) or nested past 64 levels, and a value JSON has
-- no form for, become their text. (A table that failed was shown as
-- "(error object is a table value)": every field in it lost.)
local function loggable(v, seen, depth)
  local t = type(v)
  if t == "table" then
    if encodes(v) then return v end
    if seen[v] then return "(a cycle)" end
    if depth >= 64 then return "(nested too deep)" end
    seen[v] = true
    local safe = {}
    for k, x in pairs(v) do
      safe[type(k) == "string" and k or tostring(k)] =
        loggable(x, seen, depth + 1)
    end
    seen[v] = nil
    return safe
  elseif t == "string" or t == "boolean" then
    return v
  elseif t == "number" and v == v and v ~= math.huge and v ~= -math.huge then
    return v
  end
  return tostring(v)
end

-- A line holds 16 KiB (log.c), half of it for the fields: fields whose
-- JSON is longer than FIELDS_MAX have their long strings cut (a body, a
-- dump), each to cap bytes and "...(N bytes more)", cap made smaller
-- until they fit, so every key stays (the whole fields were dropped).
local FIELDS_MAX = 8000

local function shorten(v, cap)
  local t = type(v)
  if t == "string" then
    if #v > cap then
      return v:sub(1, cap) .. "...(" .. (#v - cap) .. " bytes more)"
    end
    return v
  elseif t == "table" then
    local out = {}
    for k, x in pairs(v) do out[k] = shorten(x, cap) end
    return setmetatable(out, getmetatable(v))
  end
  return v
end

-- The line's own keys (log.c): a field of one of these names is logged
-- as field_<name> (a WeChat error logged as the fields brought its own
-- request_id: two in one line, parsers keep the last, and the line no
-- longer matched its request's access line).
local OWN_KEYS = { "ts", "level", "pid", "request_id", "msg" }

local function own_keys_apart(fields)
  for _, k in ipairs(OWN_KEYS) do
    if rawget(fields, k) ~= nil then
      local t = {}
      for key, v in pairs(fields) do t[key] = v end
      for _, own in ipairs(OWN_KEYS) do
        if t[own] ~= nil then
          t["field_" .. own], t[own] = t[own], nil
        end
      end
      return t
    end
  end
  return fields
end

local function encode_fields(fields)
  fields = own_keys_apart(fields)
  local ok, f = pcall(json.encode, fields)
  if not ok then
    fields = loggable(fields, {}, 0)    -- no cycle left to walk
    f = json.encode(fields)
  end
  local cap = 1024
  while #f > FIELDS_MAX and cap >= 16 do
    f = json.encode(shorten(fields, cap))
    cap = cap / 4
  end
  return f
end

-- The message's text: a paygate error (or a table with kind or message)
-- as "kind: message", another table as its JSON, never "table: 0x...".
local function message_text(msg)
  if type(msg) ~= "table" then return tostring(msg) end
  local mt = getmetatable(msg)
  if (type(mt) == "table" and mt.__tostring) or rawget(msg, "kind") ~= nil
     or rawget(msg, "message") ~= nil then
    return core.error_string(msg)
  end
  return json.encode(loggable(msg, {}, 0))
end

local function emit(level, msg, fields)
  if not core.log_enabled(level) then return end
  local f
  if fields ~= nil then
    if type(fields) ~= "table" then
      error("paygate.log: fields must be a table", 3)
    end
    f = encode_fields(fields)
  end
  core.log(level, message_text(msg), f)
end

--- syntax: paygate.log.info(msg[, fields]) (also debug, warn, error)
-- One JSON line with ts, level, pid, request_id, msg and fields.
function log.debug(msg, fields) emit(0, msg, fields) end
function log.info(msg, fields) emit(1, msg, fields) end
function log.warn(msg, fields) emit(2, msg, fields) end
function log.error(msg, fields) emit(3, msg, fields) end

-- lines that anyone can cause, bounded ------------------------------------

-- A line each request from outside can cause (a refusal: a forged
-- notification, a bad API key) is one line per request, and a flood of
-- them fills the disk even at log level warn (access lines dropped). A
-- limiter logs the first `lines` of each key in a window in full, counts
-- the rest, and says how many it did not log in one line once the window
-- is over. The counts are in the "paygate" shared dictionary, so the
-- bound holds for the server, not per worker (per worker when there is no
-- dictionary, or a key past its 250 bytes).

local LIMIT_LEVELS = { debug = 0, info = 1, warn = 2, error = 3 }
local LIMIT_PREFIX = "paygate.log.limit|"

local limit_dict
local function limit_shared()
  if limit_dict == nil then
    local ok, d = pcall(function()
      return require("paygate.shared").get_dict("paygate")
    end)
    limit_dict = ok and d or false
  end
  return limit_dict
end

-- the key's fields as text, in a stable order: "kind=x|mchid=y"
local function limit_key_text(key)
  local parts = {}
  for k, v in pairs(key) do
    parts[#parts + 1] = tostring(k) .. "=" .. tostring(v)
  end
  table.sort(parts)
  return table.concat(parts, "|")
end

local limiter = {}
limiter.__index = limiter

-- n: the how-manyth line of key in window w (all workers, or this one)
local function limit_count(lim, ktext, w)
  local k = LIMIT_PREFIX .. lim.msg .. "|" .. ktext .. "|" .. w
  local d = limit_shared()
  if d and #k <= 250 then
    -- (kept past the window's end: the summary reads it then)
    local n = d:incr(k, 1, 0, lim.window * 2 + 60)
    if n then return n, k end
  end
  local own = lim.own
  if own.w ~= w then
    -- windows before the last are summarised already
    own.w, own.prev, own.now = w, own.w == w - 1 and own.now or nil, {}
  end
  own.now[ktext] = (own.now[ktext] or 0) + 1
  return own.now[ktext], nil
end

-- how many lines of key window w counted so far
local function limit_total(lim, ktext, w, k)
  local d = limit_shared()
  if k and d then return tonumber(d:get(k)) or 0 end
  local own = lim.own
  local t = (own.w == w and own.now) or (own.w == w + 1 and own.prev)
  return t and t[ktext] or 0
end

-- The summary of key's window w: its lines past lim.lines, if any.
local function limit_summary(lim, s)
  if s.done then return end
  s.done = true
  lim.pending[s] = nil
  local n = limit_total(lim, s.ktext, s.w, s.k) - lim.lines
  if n <= 0 then return end
  local f = {}
  for k, v in pairs(s.key) do f[k] = v end
  f.suppressed, f.window, f.lines = n, lim.window, lim.lines
  log[s.level](lim.msg .. ": more lines like it not logged", f)
end

-- A graceful stop says what each pending summary has counted so far (the
-- window's end would come after the worker is gone).
local limiters_stopping
local function limit_on_stop(lim)
  if limiters_stopping == nil then
    limiters_stopping = {}
    _M.on_stop(function()
      for l in pairs(limiters_stopping) do
        for s in pairs(l.pending) do limit_summary(l, s) end
      end
    end)
  end
  limiters_stopping[lim] = true
end

-- A line logged: key's and fields' fields in one table, made only for a
-- line logged (never for the lines of a flood held back)
local function limit_logged(lim, level, key, fields)
  local line = {}
  for k, v in pairs(fields or {}) do line[k] = v end
  for k, v in pairs(key) do line[k] = v end
  log[level](lim.msg, line)
  return true
end

local function limit_log(lim, level, key, fields)
  if type(key) ~= "table" then
    error("paygate.log.limiter: key must be a table of fields", 3)
  end
  if fields ~= nil and type(fields) ~= "table" then
    error("paygate.log: fields must be a table", 3)
  end
  if not core.log_enabled(LIMIT_LEVELS[level]) then return false end
  if lim.off then return limit_logged(lim, level, key, fields) end
  local now = core.now()
  local w = math.floor(now / lim.window)
  local ktext = limit_key_text(key)
  local n, k = limit_count(lim, ktext, w)
  if n <= lim.lines then return limit_logged(lim, level, key, fields) end
  if n == lim.lines + 1 then
    -- the first not logged (once for all workers): this worker says how
    -- many there were once the window is over
    local s = { key = key, ktext = ktext, w = w, k = k, level = level }
    lim.pending[s] = true
    limit_on_stop(lim)
    _M.timer.at(math.max(0, (w + 1) * lim.window - now) + 0.1,
                limit_summary, lim, s)
  end
  return false
end

for level in pairs(LIMIT_LEVELS) do
  limiter[level] = function(lim, key, fields)
    return limit_log(lim, level, key, fields)
  end
end

--- syntax: o, why, key = paygate.log.limiter_opts(opts)
-- The check of a limiter's opts (a table), for a config that takes them
-- (gateway.refusal_log) to refuse at start what paygate.log.limiter would
-- raise on, with the same limits. Other keys are not looked at.
-- returns: { lines = ..., window = ... } with the defaults (10, 60) put
-- in; or nil, why ("must be a whole number, 1 .. 1000000") and the key at
-- fault ("lines" or "window")
function log.limiter_opts(opts)
  local lines, window = opts.lines or 10, opts.window or 60
  if type(lines) ~= "number" or lines % 1 ~= 0 or lines < 1
     or lines > 1e6 then
    return nil, "must be a whole number, 1 .. 1000000", "lines"
  end
  if not core.is_seconds(window) or window < 1 or window > 86400 then
    return nil, "must be seconds, 1 .. 86400", "window"
  end
  return { lines = lines, window = window }
end

--- syntax: lim = paygate.log.limiter(msg[, opts])
-- For a line that each request from outside can cause: lim:warn(key[,
-- fields]) (also debug, info, error) logs msg with key's and fields'
-- fields, the first opts.lines (default 10) of each key in a window of
-- opts.window seconds (default 60; windows start at multiples of it) in
-- full, for all workers together; past that it counts them, and after the
-- window one line says how many were not logged: msg .. ": more lines
-- like it not logged", with key's fields, suppressed (the count), window
-- and lines. key: the fields that tell the lines apart (a merchant, a
-- kind, a reason), each value from a small set (never a value the
-- request chose: every new key gets its own lines). opts false: every
-- line logged.
-- returns: the limiter; lim:warn(...) returns true when the line was
-- logged, false when not (over the limit, or below the log level)
function log.limiter(msg, opts)
  if type(msg) ~= "string" or msg == "" then
    error("paygate.log.limiter: msg must be a non-empty string", 2)
  end
  local lim = setmetatable({ msg = msg, own = {}, pending = {} }, limiter)
  if opts == false then
    lim.off = true
    return lim
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("paygate.log.limiter: opts must be a table or false", 2)
  end
  local o, why, key = log.limiter_opts(opts or {})
  if not o then
    error("paygate.log.limiter: opts." .. key .. " " .. why, 2)
  end
  lim.lines, lim.window = o.lines, o.window
  return lim
end

-- HTTP client -----------------------------------------------------------

_M.http = require "paygate.http"

-- config ----------------------------------------------------------------

-- A table met again (a config that refers to itself, or holds one table
-- at two places) gets the proxy or copy already made (seen), so a cycle
-- is not a stack overflow and one table stays one.
local function freeze(t, path, seen)
  if seen[t] then return seen[t] end
  local proxy = setmetatable({}, {
    __index = t,
    __newindex = function(_, k)
      error("config is read-only (" .. path .. "." .. tostring(k) .. ")", 2)
    end,
    __pairs = function() return pairs(t) end,
    __len = function() return #t end,
  })
  seen[t] = proxy
  for k, v in pairs(t) do
    if type(v) == "table" then
      t[k] = freeze(v, path .. "." .. tostring(k), seen)
    end
  end
  return proxy
end

do
  local rt = package.loaded["paygate.runtime"] or { mode = "exec" }
  _M.runtime = rt
  --- paygate.app_dir: the app's folder, absolute (under `paygate exec`,
  -- the script's folder), for migrations, templates and keys:
  -- migrate.run(db, paygate.app_dir .. "/migrations")
  _M.app_dir = rt.app_dir
  local conf = {}
  if rt.config_file then
    local chunk, err = loadfile(rt.config_file)
    if not chunk then
      error("config: " .. require("paygate.redact").load_error(err))
    end
    conf = chunk()
  end
  local function copy(t, seen)
    if seen[t] then return seen[t] end
    local c = {}
    seen[t] = c
    for k, v in pairs(t) do
      c[k] = type(v) == "table" and copy(v, seen) or v
    end
    return c
  end
  local original = copy(conf, {})
  _M.config = freeze(conf, "config", {})
  --- syntax: t = paygate.config_copy()
  -- returns: a fresh, writable deep copy of the config, e.g. to iterate:
  -- LuaJIT's pairs() does not see through the read-only paygate.config.
  function _M.config_copy() return copy(original, {}) end
end

-- routing and the request -------------------------------------------------

local routes = router.new()
local before, after = {}, {}

--- syntax: paygate.route(method, path, fn)
-- path may hold parameters: "/orders/:id" gives req.params.id. fn(req)
-- returns status, body[, headers]; a table body is sent as JSON.
function _M.route(method, path, fn)
  if type(method) ~= "string" or not method:match("^[A-Z]+$") then
    error("paygate.route: method must be an upper-case HTTP method", 2)
  end
  if type(path) ~= "string" or path:sub(1, 1) ~= "/" then
    error("paygate.route: path must start with /", 2)
  end
  if type(fn) ~= "function" then error("paygate.route: fn must be a function", 2) end
  routes:add(method, path, fn)
end

--- syntax: paygate.before(fn) -- fn(req) runs before every handler; if it
-- returns a status, that response is sent and the handler is skipped;
-- `return nil, err` is a 500 (err logged), never a pass.
function _M.before(fn)
  if type(fn) ~= "function" then error("paygate.before: fn must be a function", 2) end
  before[#before + 1] = fn
end

--- syntax: paygate.after(fn) -- fn(req, res) runs after every handler;
-- res = { status, body, headers } may be changed in place.
function _M.after(fn)
  if type(fn) ~= "function" then error("paygate.after: fn must be a function", 2) end
  after[#after + 1] = fn
end

-- request methods (req:json(), req:query(), ...) ---------------------------

local req_methods = {}

-- request bodies: a key given twice is refused (paygate.json)
local BODY_JSON = { unique_keys = true }

--- syntax: value = req:json()
-- returns: the decoded body. Invalid JSON (or an object with a key given
-- twice) ends the request with 400.
function req_methods.json(req)
  local body = req.body
  local v, err = json.decode(body or "", BODY_JSON)
  if v == nil then
    _M.abort(400, "invalid_json", "request body is not valid JSON: "
             .. err.message:sub(1, 120))
  end
  return v
end

local function hex_char(h) return string.char(tonumber(h, 16)) end
-- (no closure made per call, and no work where there is nothing to undo:
-- the query's parse stays compiled by the JIT)
local function unescape(s)
  if s:find("+", 1, true) then s = s:gsub("+", " ") end
  if not s:find("%", 1, true) then return s end
  return (s:gsub("%%(%x%x)", hex_char))
end

--- syntax: value, err = req:decode_json()
-- returns: the decoded body, or nil and an error (kind "invalid_json";
-- an object with a key given twice too) -- for routes that answer bad
-- input in their own format instead of the automatic 400 of req:json()
-- (WeChat notifications answer FAIL bodies).
function req_methods.decode_json(req)
  local body = req.body
  local v, err = json.decode(body or "", BODY_JSON)
  if v == nil then
    return nil, _M.error("invalid_json", "request body is not valid JSON: "
                         .. err.message:sub(1, 120))
  end
  return v
end

--- syntax: args, counts = req:query()
-- returns: the query string decoded into a table (repeats give the last),
-- and how many times each name came (decoded: a=1&%61=2 is a twice), for
-- a route whose answer must not hang on which of two values came last.
function req_methods.query(req)
  local t, n = {}, {}
  for pair in req.query_string:gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    if k ~= "" then
      k = unescape(k)
      t[k], n[k] = unescape(v), (n[k] or 0) + 1
    end
  end
  return t, n
end

-- req.params when the route has none: shared, read-only, empty
req_methods.params = setmetatable({}, {
  __newindex = function() error("req.params is read-only", 2) end })

local request_core = require "paygate.request.core"
request_core.request_methods(req_methods)
local set_route = request_core.set_route

local JSON_CT = "application/json"

-- A before hook or a handler that answered `nil, err` (the convention of
-- every module's calls) instead of a status: raised as a handler error,
-- so the log says what err was (kind: message) and the client gets a
-- 500. A before hook's err would otherwise let the request through to
-- the handler (an auth hook failing open), a handler's was dropped for
-- "no valid status".
local function returned_error(who, err)
  error(who .. " returned nil, err instead of a status: "
        .. core.error_string(err), 0)
end

-- A body sent as JSON: a table, or json.empty_array / json.null (not
-- tables: `return 200, json.empty_array` for an empty list was a 500)
local EMPTY_ARRAY, NULL = json.empty_array, json.null
local function json_body(body)
  return type(body) == "table" or body == EMPTY_ARRAY or body == NULL
end

local function finish(req, status, body, headers, pattern)
  local ctype
  if json_body(body) then
    local ok, s = pcall(json.encode, body)
    if not ok then error("response body: " .. tostring(s), 0) end
    body, ctype = s, JSON_CT
  end
  if after[1] then
    -- (a table even when the answer had no headers: a hook that sets
    -- one must not have to make it first)
    local res = { status = status, body = body, headers = headers or {} }
    for i = 1, #after do after[i](req, res) end
    status, body, headers = res.status, res.body, res.headers
    if json_body(body) then body, ctype = json.encode(body), JSON_CT end
  end
  return status, body, headers, pattern, ctype
end

-- Called by the C server for every request, in the request's coroutine.
function _M._dispatch(req, method, path)
  local fn, pattern, params, allowed, bad = routes:find(method, path)
  if not fn and method == "HEAD" then
    -- HEAD is served by the GET route unless the app routed HEAD itself
    -- (RFC 9110 9.3.2); the server sends the head without the body
    local gfn, gpattern, gparams, _, gbad = routes:find("GET", path)
    if gfn then
      fn, pattern, params, allowed = gfn, gpattern, gparams, nil
    elseif gbad then
      pattern, bad = gpattern, gbad
    end
  end
  -- counted under it however the request ends (an error, abort, deadline)
  if pattern then set_route(req, pattern) end
  if bad then
    -- a parameter that could walk an app out of its folder (router.lua)
    return finish(req, 400, { error = "bad_path", message = bad }, nil,
                  pattern)
  end
  -- (the list is sorted and ", "-joined; an app's own HEAD route is in
  -- it already, and is not listed twice)
  if allowed and method ~= "HEAD" then
    local l = ", " .. allowed .. ","
    if l:find(", GET,", 1, true) and not l:find(", HEAD,", 1, true) then
      allowed = allowed .. ", HEAD"
    end
  end
  if params then req.params = params end
  for i = 1, #before do
    local s, b, h = before[i](req)
    if s then return finish(req, s, b, h, pattern) end
    if b ~= nil then returned_error("a before hook", b) end
  end
  if not fn then
    if allowed then
      return finish(req, 405, { error = "method_not_allowed",
                                message = "allowed: " .. allowed },
                    { Allow = allowed }, pattern)
    end
    return finish(req, 404, { error = "not_found",
                              message = "no route for " .. method .. " "
                                        .. path:sub(1, 200) })
  end
  local status, body, headers = fn(req)
  if status == nil and body ~= nil then returned_error("the handler", body) end
  return finish(req, status, body, headers, pattern)
end

return _M
