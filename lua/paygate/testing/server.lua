-- paygate.testing.server: start `paygate run APP` on free loopback ports
-- from a spec and talk to it over real HTTP.
local ffi = require "ffi"
local core = require "paygate.core"
local http = require "paygate.http"
local json = require "paygate.json"   -- the app's own: integers exact, [] kept, "/" unescaped
local proc = require "paygate.testing.proc"

ffi.cdef [[
long readlink(const char *path, char *buf, size_t size);
]]

local type, error, ipairs, pairs, tostring, setmetatable, assert, tonumber =
      type, error, ipairs, pairs, tostring, setmetatable, assert, tonumber

local _M = {}
local Server = {}
Server.__index = Server

--- syntax: path = server.bin()
-- returns: the paygate binary to start: $PAYGATE_BIN, else the one running
-- this spec (/proc/self/exe).
function _M.bin()
  local env = os.getenv("PAYGATE_BIN")
  if env and env ~= "" then return env end
  local buf = ffi.new("char[4096]")
  local n = ffi.C.readlink("/proc/self/exe", buf, 4095)
  if n > 0 then return ffi.string(buf, n) end
  return "paygate"
end

local sh_quote = proc.sh_quote

-- Every directory tmpdir() made in this process, removed at the end of
-- the busted run (a spec that forgot its own, or failed before removing
-- it, leaves nothing behind: keys and databases included).
local made = {}

--- syntax: server.rmdir(dir)
-- Removes a directory tmpdir() made, or a path inside one (another path
-- is left alone: proc.is_kit_path); nothing with PAYGATE_TEST_KEEP set
-- (proc.keep()).
function _M.rmdir(dir)
  if proc.is_kit_path(dir) and not proc.keep() then
    os.execute("rm -rf " .. sh_quote(dir))
  end
end

--- syntax: n = server.cleanup() -- removes every tmpdir() still there
function _M.cleanup()
  local n = 0
  for i = #made, 1, -1 do
    if proc.exists(made[i] .. "/.") then
      _M.rmdir(made[i])
      n = n + 1
    end
    made[i] = nil
  end
  return n
end

-- the end of the busted run, once every process is stopped: the folders
-- go, or, kept, are listed (stderr: a TAP or JSON output stays whole)
local function run_end()
  if not proc.keep() then return _M.cleanup() end
  local kept = {}
  for i = 1, #made do
    if proc.exists(made[i] .. "/.") then kept[#kept + 1] = made[i] end
    made[i] = nil
  end
  if #kept > 0 then
    io.stderr:write(("paygate.testing: PAYGATE_TEST_KEEP is set: kept the"
      .. " %d folder(s) of this run (logs: paygate.log in an app's;"
      .. " remove them when done):\n  %s\n"):format(#kept,
      table.concat(kept, "\n  ")))
  end
end

--- syntax: dir = server.tmpdir([name])
-- returns: a fresh private directory, $TMPDIR/paygate-NAME.XXXXXX (/tmp
-- without TMPDIR; NAME "test" unless given: letters, digits, _ or -);
-- raises when it cannot be made.
function _M.tmpdir(name)
  if name ~= nil and (type(name) ~= "string"
                      or not name:match("^[%w_-]+$")) then
    error("tmpdir: name must be letters, digits, _ or -", 2)
  end
  local d = proc.make_temp_dir(name or "test")
  made[#made + 1] = d
  proc.at_run_end(run_end)
  -- and when the run is killed before its end: by a shell outliving it
  proc.remove_when_gone(d)
  return d
end

-- Lua source for a value (strings, numbers, booleans, tables of them),
-- keys sorted so the output is stable.
local function lua_source(v, indent)
  indent = indent or ""
  local t = type(v)
  if t == "string" then return ("%q"):format(v) end
  if t == "number" or t == "boolean" then return tostring(v) end
  if t ~= "table" then error("lua_source: cannot write a " .. t, 3) end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b)
    if type(a) == type(b) then return a < b end
    return type(a) == "number"
  end)
  local inner = indent .. "  "
  local parts = {}
  for _, k in ipairs(keys) do
    local key
    if type(k) == "number" then
      key = "[" .. k .. "] = "
    elseif k:match("^[%a_][%w_]*$") then
      key = k .. " = "
    else
      key = "[" .. ("%q"):format(k) .. "] = "
    end
    parts[#parts + 1] = inner .. key .. lua_source(v[k], inner)
  end
  if #parts == 0 then return "{}" end
  return "{\n" .. table.concat(parts, ",\n") .. "\n" .. indent .. "}"
end
_M.lua_source = lua_source

local PORT_TRIES = 5
local LOG_SHOWN = 8192   -- the end of the log a start's failure shows

-- Starts one `paygate run` in dir on freshly picked ports (o.port, when
-- given, for the main listener); returns the server, not yet waited on.
local function spawn(o, dir, app)
  local port = o.port or core.free_port()
  local admin = core.free_port()
  while admin == port do admin = core.free_port() end
  local s = setmetatable({ dir = dir, app = app, port = port, admin = admin,
                           bin = o.bin or _M.bin(),
                           pid_file = dir .. "/paygate.pid",
                           scheme = o.scheme or "http",
                           log = dir .. "/paygate.log",
                           ca_file = o.ca_file }, Server)
  local argv = { s.bin, "run", app,
                 "--listen", "127.0.0.1:" .. port,
                 "--admin", "127.0.0.1:" .. admin,
                 "--workers", tostring(o.workers or 1),
                 "--pid-file", s.pid_file }
  local config = o.config
  if type(config) == "function" then config = config(s) end
  if type(config) == "table" then
    config = "return " .. lua_source(config) .. "\n"
  end
  if config then
    s.config_file = dir .. "/config.lua"
    local f = assert(io.open(s.config_file, "w"))
    f:write(config)
    f:close()
    argv[#argv + 1] = "--config"
    argv[#argv + 1] = s.config_file
  end
  for _, a in ipairs(o.args or {}) do argv[#argv + 1] = a end
  s.proc = proc.spawn(argv, { log = s.log, watchdog = o.watchdog ~= false,
                              watchdog_rmdir = dir })
  s.pid = s.proc.pid
  return s
end

-- The worker count `paygate run` gets from o: the last --workers N (or
-- --workers=N) in o.args, which comes after the kit's own, else o.workers.
local function workers_of(o)
  local n = tonumber(o.workers) or 1
  local args = o.args or {}
  for i, a in ipairs(args) do
    if a == "--workers" then
      n = tonumber(args[i + 1]) or n
    elseif type(a) == "string" and a:sub(1, 10) == "--workers=" then
      n = tonumber(a:sub(11)) or n
    end
  end
  return n
end

--- syntax: srv = server.start(o)
-- o: app (a directory) or source (app.lua's text); config (a table, a
-- function(srv) returning one — srv.port and srv:url() are known by then —
-- or Lua source); workers (1); args (more CLI arguments, not the
-- kit's own --listen, --admin, --pid-file: raises); port; scheme
-- ("http"); ca_file; wait (default true: until /healthz answers 200 with
-- every worker serving -- o.workers, or a --workers in o.args, the last
-- one given, as `paygate run` reads them); timeout (15 s for it); bin.
-- yields: until the server serves, with every worker.
-- returns: the server; raises with its log if it exits or never serves.
function _M.start(o)
  if type(o) ~= "table" or (o.app == nil and o.source == nil) then
    error("testing.start_app: give app (a directory) or source", 2)
  end
  if o.source == nil and type(o.app) ~= "string" then
    error("testing.start_app: app must be a folder's path (got a "
          .. type(o.app) .. ")", 2)
  end
  if o.source == nil and not proc.exists(o.app .. "/app.lua") then
    -- (paygate run says "APP/app.lua not found", and a relative APP is
    -- taken from the current directory -- busted's, not the spec file's
    -- folder -- which it does not name)
    local rel = o.app:sub(1, 1) ~= "/"
    local here = rel and proc.cwd()
    error("testing.start_app: " .. o.app .. "/app.lua not found"
          .. (rel and ": o.app is taken from the current directory, "
              .. tostring(here) .. " (run busted from the folder that "
              .. "holds it, or give an absolute path)"
              or " (an app is a folder with an app.lua)"), 2)
  end
  -- the kit's own flags: a later one in o.args would win, and the kit
  -- then waits on an admin port nobody serves (until its timeout, over a
  -- log that says serving), or srv:url() names a port nobody listens on
  for _, a in ipairs(o.args or {}) do
    local flag = type(a) == "string" and a:match("^%-%-[%w-]+")
    if flag == "--listen" or flag == "--admin" or flag == "--pid-file" then
      error("testing.start_app: o.args gives " .. flag .. ", which the kit"
            .. " sets itself: --listen (o.port for its port), --admin (it"
            .. " waits on /healthz there) and --pid-file (srv:reload());"
            .. " leave it out", 2)
    end
  end
  local dir = _M.tmpdir()
  local app = o.app
  if o.source then
    app = dir .. "/app"
    assert(core.mkdir_p(app))
    local f = assert(io.open(app .. "/app.lua", "w"))
    f:write(o.source)
    f:close()
  end
  -- The ports are free when picked, but another process may bind one
  -- before the server does: then the server exits at once with "cannot
  -- listen on ...: Address already in use", and a port this function
  -- picked is picked again, PORT_TRIES times at most.
  for try = 1, PORT_TRIES do
    local s = spawn(o, dir, app)
    if o.wait == false then return s end
    local want, seen = workers_of(o), nil
    local ok, err = pcall(proc.wait_until, function()
      if s.proc:poll() then return true end
      local res = http.request{
        url = "http://127.0.0.1:" .. s.admin .. "/healthz", timeout = 1 }
      -- ours (the master's pid): another server could hold the port; and
      -- every worker serving, not the first one only: one still loading
      -- would read an app.lua the spec rewrites next (to reload it) and
      -- load the new code in the old generation
      local h = res and res.status == 200 and json.decode(res.body)
      if type(h) ~= "table" or h.pid ~= s.pid then return false end
      seen = h.workers
      return h.workers == want
    end, o.timeout or 15, "paygate to serve " .. app)
    if s.proc:poll() then
      local code = s.proc.status
      local logs = s:logs()
      local taken = tonumber(logs:match(
        "cannot listen on 127%.0%.0%.1:(%d+): Address already in use"))
      if try < PORT_TRIES and taken
         and (taken == s.admin or (taken == s.port and not o.port)) then
        os.remove(s.log)
      else
        _M.rmdir(dir)
        error("paygate run " .. app .. " exited early (" .. code .. "):\n"
              .. _M.tail(logs, LOG_SHOWN), 2)
      end
    elseif not ok then
      local logs = s:logs()
      s:stop()
      -- serving, but not with every worker (one that fails to load is
      -- restarted again and again)
      local short = seen and (" (%s of %d workers serving)"):format(
        tostring(seen), want) or ""
      error(tostring(err) .. short .. ":\n" .. _M.tail(logs, LOG_SHOWN), 2)
    else
      return s
    end
  end
end

--- syntax: url = srv:url([path]) -- "http://127.0.0.1:PORT" .. path
function Server:url(path)
  return self.scheme .. "://127.0.0.1:" .. self.port .. (path or "/")
end

--- syntax: res, err = srv:request(o)
-- o: a path, or { method, path, body, json, headers, timeout, ca_file,
-- client_cert, client_key }; json (a table) is encoded as the body with
-- Content-Type application/json.
-- yields: for the exchange.
-- returns: paygate.http's res with res.json (the decoded body, when it
-- is JSON), or nil, err.
function Server:request(o)
  if type(o) == "string" then o = { path = o } end
  local body, headers = o.body, o.headers
  if o.json ~= nil then
    body = json.encode(o.json)
    headers = headers or {}
    if not headers["Content-Type"] then
      local h = { ["Content-Type"] = "application/json" }
      for k, v in pairs(headers) do h[k] = v end
      headers = h
    end
  end
  local res, err = http.request{
    method = o.method or (body and "POST" or "GET"), url = self:url(o.path),
    body = body, headers = headers, timeout = o.timeout or 10,
    ca_file = o.ca_file or self.ca_file, client_cert = o.client_cert,
    client_key = o.client_key }
  if res and res.body and res.body ~= "" then
    res.json = json.decode(res.body)
  end
  return res, err
end

--- syntax: res, err = srv:admin_get(path) -- from the admin listener
function Server:admin_get(path)
  return http.request{
    url = "http://127.0.0.1:" .. self.admin .. path, timeout = 5 }
end

--- syntax: text = srv:logs() -- what the server wrote so far
function Server:logs() return proc.read(self.log) end

--- syntax: text = server.tail(text[, n]) -- its last n bytes (default
-- 4096), from a line's start, saying how many were left out before: a
-- log shown in a failure message, bounded
function _M.tail(text, n)
  n = n or 4096
  if #text <= n then return text end
  local t = text:sub(-n)
  t = t:match("^[^\n]*\n(.+)$") or t
  return ("(%d bytes before left out)\n"):format(#text - #t) .. t
end

--- syntax: srv:signal(sig) -- send a signal to the master
function Server:signal(sig) proc.kill_pid(self.pid, sig) end

--- syntax: pids = srv:workers() -- the master's worker processes now
-- (pids, ascending): to kill one and see the master replace it
function Server:workers() return proc.children(self.pid) end

--- syntax: ok, outcome = srv:reload([timeout])
-- yields: `paygate reload --pid-file` on this server (the app's code and
-- its config file read again, as an operator's reload does), up to
-- timeout s (60) for the outcome; when the new code serves, also until
-- the old generation's workers have exited, so that no request of the
-- spec (a kept-alive connection) is answered by the old code after it.
-- returns: true and the outcome line ("paygate reload: done, generation
-- 2"), or nil and what `paygate reload` printed ("paygate reload:
-- refused: ... gw/hooks.lua:7: unexpected symbol near 'local'"): the old
-- code serves on. Raises when the old workers outlive the timeout.
function Server:reload(timeout)
  timeout = timeout or 60
  if type(timeout) ~= "number" or not (timeout > 0) then
    error("srv:reload: timeout must be seconds, more than 0", 2)
  end
  local deadline = core.mono() + timeout
  local old = self:workers()
  local code, out = proc.run({ self.bin, "reload", "--pid-file",
                               self.pid_file, "--timeout", tostring(timeout) },
                             { timeout = timeout + 10 })
  out = (out or ""):gsub("%s+$", "")
  if code ~= 0 then
    return nil, out ~= "" and out
                or "paygate reload: exit " .. tostring(code)
  end
  -- (wait_until's error raised at this method's caller's, the spec's)
  proc.call_at(2, proc.wait_until, function()
    local now = {}
    for _, pid in ipairs(self:workers()) do now[pid] = true end
    local left = {}
    for _, pid in ipairs(old) do
      if now[pid] then left[#left + 1] = pid end
    end
    return #left == 0, "old workers still running: "
                       .. table.concat(left, ", ")
  end, math.max(deadline - core.mono(), 1),
  "the old workers to exit after the reload")
  return true, out
end

--- syntax: pids = srv:kill_worker(pid[, timeout])
-- yields: SIGKILL to worker pid, then waits (timeout, default 15 s) until
-- the master has replaced it: as many workers as before, pid not among
-- them. returns: the workers' pids then.
function Server:kill_worker(pid, timeout)
  local n = #self:workers()
  proc.kill_pid(pid, proc.SIGKILL)
  -- (a tail call: wait_until's error names this method's caller)
  return proc.wait_until(function()
    local now = self:workers()
    local seen = "workers " .. table.concat(now, ", ")
    if #now ~= n then return false, seen end
    for _, p in ipairs(now) do
      if p == pid then return false, seen end
    end
    return now
  end, timeout or 15, "worker " .. pid .. " replaced")
end

--- syntax: code = srv:stop([timeout[, keep_dir]])
-- yields: TERM, wait for the exit (KILL after timeout, default 15 s), then
-- removes its directory (kept with keep_dir until the busted run ends:
-- tmpdir's cleanup removes it then).
-- returns: the exit code.
function Server:stop(timeout, keep_dir)
  local code = self.proc:stop(timeout)
  if not keep_dir then _M.rmdir(self.dir) end
  return code
end

return _M
