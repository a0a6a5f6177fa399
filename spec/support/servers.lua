-- spec/support/servers.lua: real Redis and PostgreSQL servers on loopback
-- for specs, each in its own temporary directory on a free port.
--
--   local servers = require "spec.support.servers"
--   local r = servers.redis()        -- { port, url, dir, stop(), start() }
--   local pg = servers.postgres()    -- { port, url, dir, stop(), start() }
--   local db = servers.postgres_db() -- { url, name, port, dir }: a fresh
--                                    -- database on the run's shared server
--   servers.redis{ requirepass = "pw" }   -- AUTH required; url has it
--   servers.postgres{ password = "pw" }   -- password auth on 127.0.0.1
--                                          -- (scram-sha-256); url has it
--   servers.stop_all()               -- in teardown()
--   servers.redis_cli(port, "PING")  -- redis-cli's output and errors
--
-- Readiness is waited for with a deadline (redis-cli PING, pg_ctl -w):
-- never a fixed sleep. The port is picked free, but another process may
-- take it before the server binds it: a first start whose server could
-- not bind (its log says so, the process is gone) is retried on a fresh
-- port, START_TRIES times at most. A restart (srv.start() again) keeps
-- its port. PostgreSQL refuses to run as root, so as root the
-- cluster belongs to the `postgres` user (runuser); otherwise to us.
--
-- These helpers block the loop while a server starts or stops (os.execute);
-- that is fine in specs, never in the runtime.
--
-- Both servers run daemonized, outside the spec run's process group: each
-- running server has a guard (paygate.testing.proc.guard) that stops it
-- and removes its folder once the spec run is gone, however it ended (a
-- SIGKILL, a CI's timeout killing its whole group), and that a stop here
-- cancels (srv.guard: nil while it is stopped).

-- One module whichever name required it ("spec.support.servers", or
-- "support.servers" through spec/helpers.lua's path): one list of the
-- servers to stop, one shared PostgreSQL server per run.
for _, name in ipairs({ "spec.support.servers", "support.servers" }) do
  if type(package.loaded[name]) == "table" then
    return package.loaded[name]
  end
end

local kit = require "paygate.testing.server"
local proc = require "paygate.testing.proc"

local _M = {}

local PG_BIN = os.getenv("PG_BIN") or "/usr/lib/postgresql/15/bin"

local started = {}

local function sh(cmd)
  local ok, how, code = os.execute(cmd)
  if type(ok) == "number" then           -- Lua 5.1 / LuaJIT without 5.2 compat
    return ok == 0
  end
  return ok == true and how == "exit" and code == 0
end

local function read_cmd(cmd)
  local f = io.popen(cmd)
  local out = f:read("*a")
  f:close()
  return out
end

local function now()
  local ok, paygate = pcall(require, "paygate")
  if ok and type(paygate) == "table" and paygate.now then
    return paygate.now()
  end
  return os.time()
end

local function pause(s)
  local ok, paygate = pcall(require, "paygate")
  if ok and type(paygate) == "table" and paygate.sleep then
    paygate.sleep(s)
  else
    sh("sleep " .. s)
  end
end

-- Waits until check() is true, polling every 20 ms, for at most `secs`.
-- returns: what check() returned
function _M.wait_for(check, secs, what)
  local deadline = now() + secs
  while now() < deadline do
    local v = check()
    if v then
      return v
    end
    pause(0.02)
  end
  error("timed out after " .. secs .. " s waiting for " .. (what or "it"), 2)
end

local function is_root()
  return read_cmd("id -u"):match("^0") ~= nil
end

-- syntax: servers.guard(srv, pid[, signal[, dir]])
-- Once this process is gone, however it ended, srv's server (pid, from its
-- pid file) is ended (signal, default TERM; KILL after 10 s) and dir
-- (default srv.dir, a kit folder) removed; servers.unguard(srv) once it
-- was stopped here. srv.guard is the guard.
function _M.unguard(srv)
  if srv.guard then
    srv.guard:cancel()
    srv.guard = nil
  end
end

function _M.guard(srv, pid, signal, dir)
  _M.unguard(srv)
  srv.guard = proc.guard(pid, { signal = signal, rmdir = dir or srv.dir })
end

-- A fresh private folder, $TMPDIR/paygate-spec.XXXXXX (/tmp without
-- TMPDIR), the test kit's: removed when the busted run ends, passed,
-- failed or raised (or is killed), whether or not the spec removed it.
local function mktemp(owner)
  local dir = kit.tmpdir("spec")
  if owner then
    assert(sh("chown " .. owner .. " " .. dir), "chown " .. dir)
  end
  return dir
end

-- A port nothing listens on now, below the kernel's ephemeral range (a
-- server restarted on its port mid-test must not find it taken by an
-- outbound socket; a client reconnecting to a stopped server can even
-- connect to itself), never one this process was given lately: the
-- runtime's core.free_port, the one picker of every spec.
local function free_port()
  return require("paygate.core").free_port()
end

-- redis-cli against our server on port (with its password, through the
-- environment: not on the command line)
local function redis_cli(port, password)
  return (password and "REDISCLI_AUTH='" .. password .. "' " or "")
    .. "redis-cli -h 127.0.0.1 -p " .. port
end

local function redis_ping(port, password)
  return read_cmd(redis_cli(port, password)
                  .. " PING 2>/dev/null"):match("PONG") ~= nil
end

-- syntax: out = servers.redis_cli(port, args): redis-cli's output, its
-- errors included (so an assertion's message shows them)
function _M.redis_cli(port, args)
  return read_cmd(redis_cli(port) .. " " .. args .. " 2>&1")
end

local START_TRIES = 5

-- the port a new server is started on (a spec may replace it to test
-- the retry on a taken port)
_M.pick_port = free_port

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then
    return ""
  end
  local s = f:read("*a")
  f:close()
  return s or ""
end

-- Did a server fail to start because its port was taken? (its log)
local function bind_failed(log)
  local s = read_file(log)
  return s:find("Address already in use", 1, true) ~= nil
end

-- Starts a server the first time: start_once() returns true, or nil and
-- whether the port was taken; on a taken port a fresh one is tried.
local function first_start(srv, start_once, set_port)
  for try = 1, START_TRIES do
    local ok, taken = start_once()
    if ok then
      return
    end
    if not taken or try == START_TRIES then
      error(srv.kind .. " did not start on port " .. srv.port
            .. (taken and " (taken; " .. try .. " ports tried)" or "")
            .. ", see " .. srv.dir, 2)
    end
    set_port(_M.pick_port())
  end
end

-- syntax: srv = servers.redis([{ appendfsync = "always",
--                                 requirepass = "pw", databases = 4,
--                                 rename = { SELECT = "" } }])
-- requirepass: clients must AUTH with it (srv.password; srv.url has it)
-- databases: how many dbs the server has (redis' default 16)
-- rename: commands renamed ("" disables them), as rename-command
function _M.redis(opts)
  opts = opts or {}
  local srv = { dir = mktemp(), kind = "redis", password = opts.requirepass }
  assert(srv.password == nil or srv.password:match("^[%w_-]+$"),
         "servers.redis: requirepass must be letters, digits, _ or -")
  local function set_port(port)
    srv.port = port
    srv.url = "redis://" .. (srv.password and ":" .. srv.password .. "@"
                             or "") .. "127.0.0.1:" .. port
  end
  set_port(_M.pick_port())
  srv.pidfile = srv.dir .. "/redis.pid"
  local log = srv.dir .. "/redis.log"

  local function pid_alive()
    local pid = read_file(srv.pidfile):match("%d+")
    return pid ~= nil and proc.running(pid)
  end

  -- true once our server answers on the port (a PONG from another
  -- process that took the port is not ours: its dir differs); nil, taken
  -- when it could not bind
  local function start_once()
    os.remove(log)
    os.remove(srv.pidfile)
    local args = {
      "redis-server", "--port", srv.port, "--bind", "127.0.0.1",
      "--dir", srv.dir, "--save", "''", "--daemonize", "yes",
      "--pidfile", srv.pidfile, "--logfile", srv.dir .. "/redis.log",
    }
    if opts.appendfsync then
      args[#args + 1] = "--appendonly yes --appendfsync " .. opts.appendfsync
    else
      args[#args + 1] = "--appendonly no"
    end
    if srv.password then
      args[#args + 1] = "--requirepass " .. srv.password
    end
    if opts.databases then
      args[#args + 1] = "--databases " .. math.floor(opts.databases)
    end
    for cmd, to in pairs(opts.rename or {}) do
      assert(cmd:match("^%w+$") and to:match("^[%w_-]*$"),
             "servers.redis: rename wants command names")
      args[#args + 1] = "--rename-command " .. cmd .. " '" .. to .. "'"
    end
    if not sh(table.concat(args, " ")) then
      return nil, false
    end
    local ours, taken
    _M.wait_for(function()
      if bind_failed(log) then
        taken = true
        return true
      end
      if redis_ping(srv.port, srv.password) then
        ours = read_cmd(redis_cli(srv.port, srv.password)
          .. " CONFIG GET dir 2>/dev/null"):find(srv.dir, 1, true) ~= nil
        taken = not ours
        return true
      end
      return false
    end, 10, "redis on port " .. srv.port)
    if taken then
      -- ours may still be exiting: make sure it is gone
      if pid_alive() then
        sh("kill " .. read_file(srv.pidfile):match("%d+"))
      end
      return nil, true
    end
    return ours and pid_alive(), false
  end

  function srv.start()
    if srv.started_once then
      local ok, taken = start_once()
      assert(ok, "redis did not start again on port " .. srv.port
             .. (taken and " (taken)" or ""))
    else
      first_start(srv, start_once, set_port)
      srv.started_once = true
    end
    srv.running = true
    _M.guard(srv, read_file(srv.pidfile):match("%d+"))
  end

  function srv.stop()
    if not srv.running then
      return
    end
    local f = io.open(srv.pidfile)
    local pid = f and f:read("*l")
    if f then
      f:close()
    end
    if pid then
      sh("kill " .. pid)
      -- (30 s: a Redis asked to stop on a loaded machine -- the suite's
      -- own parallel files -- was seen taking over 10 s, zombies aside)
      _M.wait_for(function() return not proc.running(pid) end, 30,
                  "redis to exit")
    end
    _M.unguard(srv)
    srv.running = false
  end

  function srv.cleanup()
    srv.stop()
    kit.rmdir(srv.dir)
  end

  srv.start()
  started[#started + 1] = srv
  return srv
end

-- syntax: srv = servers.postgres([{ password = "pw" }])
-- A fresh cluster (trust auth on 127.0.0.1), database "postgres". With
-- password: connections over TCP authenticate with it (scram-sha-256;
-- srv.password, and srv.url has it); the socket in srv.dir stays trust.
local function new_postgres(opts)
  opts = opts or {}
  local root = is_root()
  local owner = root and "postgres" or nil
  local as = root and "runuser -u postgres -- " or ""
  local srv = { dir = mktemp(owner), kind = "postgres",
                password = opts.password }
  assert(srv.password == nil or srv.password:match("^[%w_-]+$"),
         "servers.postgres: password must be letters, digits, _ or -")
  local function set_port(port)
    srv.port = port
    srv.url = "postgres://postgres" .. (srv.password and ":" .. srv.password
      or "") .. "@127.0.0.1:" .. port .. "/postgres"
  end
  set_port(_M.pick_port())
  srv.data = srv.dir .. "/data"
  local log = srv.dir .. "/pg.log"

  local auth = " -A trust"
  if srv.password then
    local pwfile = srv.dir .. "/pwfile"
    local f = assert(io.open(pwfile, "w"))
    f:write(srv.password, "\n")
    f:close()
    if owner then
      assert(sh("chown " .. owner .. " " .. pwfile), "chown " .. pwfile)
    end
    auth = " --auth-local=trust --auth-host=scram-sha-256 --pwfile="
      .. pwfile
  end
  assert(sh(as .. PG_BIN .. "/initdb -D " .. srv.data
            .. auth .. " -U postgres --no-sync -E UTF8 >"
            .. (root and "/dev/null" or srv.dir .. "/initdb.log") .. " 2>&1"),
         "initdb failed (as root it runs as the postgres user)")

  -- true, or nil and whether the port was taken (pg_ctl -w fails when
  -- the postmaster exits; its log says why)
  local function start_once()
    local before = #read_file(log)
    local o = "-p " .. srv.port .. " -k " .. srv.dir
      .. " -c listen_addresses=127.0.0.1 -c fsync=on"
      .. " -c synchronous_commit=on -c max_connections=50"
    if sh(as .. PG_BIN .. "/pg_ctl -D " .. srv.data .. " -l "
          .. log .. " -o '" .. o .. "' -w -t 30 start"
          .. " >/dev/null 2>&1") then
      return true
    end
    local tail = read_file(log):sub(before + 1)
    return nil, tail:find("Address already in use", 1, true) ~= nil
  end

  function srv.start()
    if srv.started_once then
      local ok, taken = start_once()
      assert(ok, "pg_ctl start failed" .. (taken and " (port "
             .. srv.port .. " taken)" or "") .. ", see " .. log)
    else
      first_start(srv, start_once, set_port)
      srv.started_once = true
    end
    srv.running = true
    srv.pid = read_file(srv.data .. "/postmaster.pid"):match("^%d+")
    -- QUIT: an immediate shutdown, what pg_ctl stop -m immediate sends
    -- (pg_ctl itself, as root, would need runuser in the guard)
    _M.guard(srv, srv.pid, "QUIT")
  end

  function srv.stop(mode)
    if not srv.running then
      return
    end
    if not sh(as .. PG_BIN .. "/pg_ctl -D " .. srv.data .. " -m "
              .. (mode or "fast") .. " -w -t 30 stop >/dev/null 2>&1")
       and srv.pid and proc.running(srv.pid) then
      -- pg_ctl needs the data folder: at the end of a run whose kit
      -- removed its folders first (the shared server, stopped there, in
      -- a run that loaded this file after its first simulator), the
      -- postmaster itself is told, as pg_ctl would (QUIT: immediate,
      -- INT: fast, TERM: smart)
      local sig = ({ immediate = "QUIT", fast = "INT", smart = "TERM" })
                  [mode or "fast"] or "INT"
      sh("kill -" .. sig .. " " .. srv.pid)
      _M.wait_for(function() return not proc.running(srv.pid) end, 30,
                  "postgres " .. srv.pid .. " to exit")
    end
    _M.unguard(srv)
    srv.running = false
  end

  function srv.cleanup()
    srv.stop("immediate")
    kit.rmdir(srv.dir)
  end

  srv.start()
  return srv
end

function _M.postgres(opts)
  local srv = new_postgres(opts)
  started[#started + 1] = srv
  return srv
end

-- The run's shared PostgreSQL server (servers.postgres_db), and the
-- databases made on it since the last servers.stop_all().
local shared_pg
local shared_dbs = {}
local shared_n = 0

-- psql on the shared server, through its socket (trust: as root too):
-- a command, or a list run one after another (each in a transaction of
-- its own), up to the first failure
local function shared_psql(commands)
  if type(commands) == "string" then commands = { commands } end
  return sh(PG_BIN .. "/psql -X -q -v ON_ERROR_STOP=1 -h " .. shared_pg.dir
            .. " -p " .. shared_pg.port .. " -U postgres -d postgres -c '"
            .. table.concat(commands, "' -c '") .. "' >>" .. shared_pg.dir
            .. "/psql.log 2>&1")
end

-- syntax: db = servers.postgres_db()
-- A fresh, empty database on this run's shared PostgreSQL server (trust
-- auth on 127.0.0.1; started on the first call): db = { url, name,
-- port, dir (the server's folder) }. For a describe block that wants a
-- store of its own and does nothing to the server itself: a cluster's initdb, start and stop take
-- 1.5 s, 3 s and more on a loaded machine, a database 0.1 s.
-- servers.stop_all() (a teardown) drops the databases made so far,
-- their sessions closed (WITH (FORCE)), and leaves the server running
-- for the next describe block; the end of the busted run stops it (one
-- busted run is one spec file under ctest: nothing is shared between
-- the files ctest runs at once). A spec that stops, restarts or kills
-- its server, or wants a password, starts its own: servers.postgres().
function _M.postgres_db()
  if not (shared_pg and shared_pg.running) then
    shared_pg = new_postgres()
  end
  shared_n = shared_n + 1
  local name = "spec_" .. shared_n
  assert(shared_psql("CREATE DATABASE " .. name),
         "CREATE DATABASE " .. name .. " failed, see " .. shared_pg.dir
         .. "/psql.log")
  shared_dbs[#shared_dbs + 1] = name
  return { name = name, port = shared_pg.port, dir = shared_pg.dir,
           url = "postgres://postgres@127.0.0.1:" .. shared_pg.port
                 .. "/" .. name }
end

-- Are the server programs installed? (specs skip an engine when not)
function _M.have_redis()
  return sh("command -v redis-server >/dev/null 2>&1")
end

function _M.have_postgres()
  return sh("test -x " .. PG_BIN .. "/initdb")
end

-- syntax: servers.stop_all()
-- Stops every server started here (and removes its folder), and drops
-- the databases servers.postgres_db() made; the shared server they were
-- on runs on until the end of the run.
function _M.stop_all()
  for i = #started, 1, -1 do
    started[i].cleanup()
    started[i] = nil
  end
  -- connections refused first: a pool of a spec's (or of an app not
  -- stopped yet) that reconnects at once to a database being dropped
  -- held each drop up 1-3 s
  local cmds = {}
  for i = #shared_dbs, 1, -1 do
    cmds[#cmds + 1] = "ALTER DATABASE " .. shared_dbs[i]
      .. " ALLOW_CONNECTIONS false"
    cmds[#cmds + 1] = "DROP DATABASE " .. shared_dbs[i] .. " WITH (FORCE)"
    shared_dbs[i] = nil
  end
  if #cmds > 0 then
    -- (a failure is left: the server goes at the run's end anyway)
    shared_psql(cmds)
  end
end

-- A spec that only stopped its server, or failed before its teardown,
-- would leave the server running and its folder behind: the end of the
-- busted run stops what is left, the shared server too. Registered now,
-- before any folder of ours is made, so it runs before the kit removes
-- its folders (a server's pid file is in its folder).
proc.at_run_end(function()
  for i = #shared_dbs, 1, -1 do shared_dbs[i] = nil end
  _M.stop_all()
  if shared_pg then
    shared_pg.cleanup()
    shared_pg = nil
  end
end)

-- syntax: stores = servers.stores(dir, schema[, drop[, pg_opts]])
-- A fresh store per call on each engine installed, keyed by engine:
-- stores.sqlite() opens a new database file in dir; stores.postgres()
-- (only when PostgreSQL is installed) opens a database of the run's
-- shared server (servers.postgres_db(), one per stores(); pg_opts:
-- sql.open's) after dropping the tables listed in drop ("a, b"). schema,
-- an SQL script or one per engine, is run on each.
function _M.stores(dir, schema, drop, pg_opts)
  local sql = require "paygate.sql"
  local n, pg = 0, nil
  local function ready(db, engine)
    assert(db:exec_script(type(schema) == "table" and schema[engine]
                          or schema))
    return db
  end
  local stores = {
    sqlite = function()
      n = n + 1
      return ready(assert(sql.open("sqlite:" .. dir .. "/s" .. n .. ".db")),
                   "sqlite")
    end,
  }
  if _M.have_postgres() then
    stores.postgres = function()
      pg = pg or _M.postgres_db()
      local db = assert(sql.open(pg.url, pg_opts))
      if drop then
        assert(db:exec_script("DROP TABLE IF EXISTS " .. drop))
      end
      return ready(db, "postgres")
    end
  end
  return stores
end

-- syntax: stores.redis = servers.redis_store()
-- A fresh store per call, as stores() gives: a connection to one Redis
-- server (started on the first call), emptied (FLUSHALL).
function _M.redis_store()
  local srv
  return function()
    srv = srv or _M.redis()
    local c = assert(require("paygate.redis").connect(srv.url))
    assert(c:call("FLUSHALL"))
    return c
  end
end

-- syntax: ids = servers.acked_ids(out)
-- The ids a killed ack_writer printed to the file out: its complete
-- lines only. SIGKILL can cut a write() to a regular file short (the
-- kernel checks for a fatal signal between the pages it copies, so a
-- write that straddles a page boundary may stop at it), and the writer
-- may die between an id and its newline: a last line without its
-- newline may be a truncated id, which is no acknowledgement at all.
function _M.acked_ids(out)
  local t = {}
  local f = io.open(out, "rb")
  if f then
    for l in f:read("*a"):gmatch("([^\n]*)\n") do
      if l ~= "ready" then t[#t + 1] = l end
    end
    f:close()
  end
  return t
end

-- syntax: acked = servers.kill_writer(url, out[, mode])
-- Starts spec/support/ack_writer.lua on url (mode "atomic": db:atomic
-- jobs), kills it with SIGKILL at a random moment after its first
-- acknowledgements (its stdout goes to the file out), returns the
-- acknowledged ids.
function _M.kill_writer(url, out, mode)
  local bin = os.getenv("PAYGATE_BIN") or "build/paygate"
  local pid = read_cmd("sh -c '" .. bin .. " exec spec/support/ack_writer.lua "
    .. url .. " " .. (mode or "") .. " >" .. out .. " 2>" .. out
    .. ".err & echo $!'"):match("%d+")
  assert(pid, "writer did not start")
  -- guarded: a spec that fails (or a run killed) before the SIGKILL below
  -- leaves no writer running
  local g = proc.guard(pid, { signal = "TERM", grace = 1 })
  local ok, err = pcall(_M.wait_for, function()
    return #_M.acked_ids(out) > 5
  end, 20, "the writer's first acknowledgements")
  if ok then pause(math.random() * 0.3) end
  sh("kill -9 " .. pid)
  _M.wait_for(function() return not proc.running(pid) end, 10,
              "writer exit")
  if g then g:cancel() end
  if not ok then error(err, 0) end
  return _M.acked_ids(out)
end

-- A fresh temporary directory (removed by the caller, or at the run's end).
--- syntax: list = servers.code_blocks(text, lang)
-- The bodies of a Markdown page's fenced blocks of lang ("lua"), in
-- order: what a docs spec runs as the page gives it.
function _M.code_blocks(text, lang)
  local out = {}
  for body in text:gmatch("```" .. lang .. "\n(.-)```") do
    out[#out + 1] = body
  end
  return out
end

--- syntax: m = servers.file_mode(path) -- "600", "644", ...
function _M.file_mode(path)
  return (read_cmd("stat -c %a '" .. path .. "'"):gsub("%s+$", ""))
end

--- syntax: ... = servers.under_umask(mask, fn, ...)
-- fn(...) run with the process's umask set to mask (e.g. 18: 022, a
-- service's), the umask put back after it, however fn ends; returns
-- pcall's results.
function _M.under_umask(mask, fn, ...)
  local ffi = require "ffi"
  pcall(ffi.cdef, "unsigned int umask(unsigned int mask);")
  local function pack(...) return { n = select("#", ...), ... } end
  local was = ffi.C.umask(mask)
  local res = pack(pcall(fn, ...))
  ffi.C.umask(was)
  return unpack(res, 1, res.n)
end

_M.mktemp = mktemp
_M.free_port = free_port
_M.sh = sh
_M.is_root = is_root
_M.read_cmd = read_cmd
_M.now = now

return _M
