-- spec/support/pgha.lua: a PostgreSQL primary with a streaming standby
-- (pg_basebackup -R) on loopback, for the failover specs.
--
--   local pgha = require "spec.support.pgha"
--   local c = pgha.start({ sync = true })  -- synchronous standby
--   c.primary.port, c.standby.port, c.url  -- multi-host, read-write
--   c.kill_primary()        -- immediate stop (no shutdown checkpoint)
--   c.promote()             -- the standby becomes the primary
--   c.stop_standby(), c.start_standby()
--   c.freeze_primary()      -- SIGSTOP to every process of the primary:
--   c.thaw_primary()        --   it accepts TCP connections, answers none
--   c.cleanup()
--   pgha.fill(db, 4)        -- four pooled connections open at once
--   pgha.port(db)           -- the port of the server db's next query hits
--   c.replicated("t")       -- waits until table t (empty) is on the standby
--
-- As in servers.lua, the clusters belong to the postgres user when we run
-- as root (initdb refuses root), and these helpers block the loop while a
-- server starts or stops.
local servers = require "spec.support.servers"
local proc = require "spec.support.proc"
local core = require "paygate.core"

local _M = {}

local PG_BIN = os.getenv("PG_BIN") or "/usr/lib/postgresql/15/bin"
local sh, read_cmd = servers.sh, servers.read_cmd

-- A node in dir (a folder in top, the cluster's). While it runs, a guard
-- stops it (QUIT: an immediate shutdown) and removes top once the spec run
-- is gone, however it ended (servers.guard); the last node's guard to end
-- removes top after every node is gone.
local function node(top, dir, as, port)
  local n = { dir = dir, data = dir .. "/data", port = port }

  function n.start()
    local o = "-p " .. port .. " -k " .. dir
      .. " -c listen_addresses=127.0.0.1 -c fsync=on"
    if not sh(as .. PG_BIN .. "/pg_ctl -D " .. n.data .. " -l " .. dir
              .. "/pg.log -o \"" .. o .. "\" -w -t 30 start >/dev/null 2>&1")
    then
      -- the log's last lines in the failure itself: the folder is gone
      -- by the time anyone reads the run's output (a port taken by
      -- another server between its choice and this start, seen once)
      local log = proc.read(dir .. "/pg.log") or ""
      error("pg_ctl start failed on port " .. port .. "; pg.log ends: "
            .. log:sub(-600), 2)
    end
    n.running = true
    servers.guard(n, proc.read(n.data .. "/postmaster.pid"):match("^%d+"),
                  "QUIT", top)
  end

  function n.stop(mode)
    if n.running then
      sh(as .. PG_BIN .. "/pg_ctl -D " .. n.data .. " -m " .. (mode or "fast")
         .. " -w -t 30 stop >/dev/null 2>&1")
      servers.unguard(n)
      n.running = false
    end
  end

  function n.psql(sql)
    return read_cmd(as .. "/usr/bin/psql -X -A -t -h 127.0.0.1 -p " .. port
                    .. " -U postgres -d postgres -c \"" .. sql
                    .. "\" 2>&1"):gsub("%s+$", "")
  end

  return n
end

-- syntax: c = pgha.start({ sync = bool })
function _M.start(opts)
  opts = opts or {}
  local root = read_cmd("id -u"):match("^0") ~= nil
  local owner = root and "postgres" or nil
  local as = root and "runuser -u postgres -- " or ""
  local dir = servers.mktemp(owner)
  local c = {}
  local p1, p2 = servers.free_port(), servers.free_port()
  while p2 == p1 do
    p2 = servers.free_port()
  end
  -- In postgresql.conf, not on the command line: there ALTER SYSTEM
  -- (postgresql.auto.conf) could not override it after a promotion.
  local conf = { "wal_level = replica", "max_wal_senders = 5",
                 "hot_standby = on", "max_connections = 50",
                 "wal_keep_size = '64MB'", "synchronous_commit = on" }
  if opts.sync then
    conf[#conf + 1] = "synchronous_standby_names = '*'"
  end
  assert(sh((root and "runuser -u postgres -- " or "") .. "mkdir -p " .. dir
            .. "/p " .. dir .. "/s"))
  c.primary = node(dir, dir .. "/p", as, p1)
  c.standby = node(dir, dir .. "/s", as, p2)
  assert(sh(as .. PG_BIN .. "/initdb -D " .. c.primary.data
            .. " -A trust -U postgres --no-sync -E UTF8 >/dev/null 2>&1"),
         "initdb failed")
  -- pg_basebackup copies it to the standby (appending keeps its owner)
  local f = assert(io.open(c.primary.data .. "/postgresql.conf", "a"))
  f:write(table.concat(conf, "\n"), "\n")
  f:close()
  c.primary.start()
  assert(sh(as .. PG_BIN .. "/pg_basebackup -h 127.0.0.1 -p " .. p1
            .. " -U postgres -D " .. c.standby.data
            .. " -R -X stream -c fast >" .. "/dev/null 2>&1"),
         "pg_basebackup failed")
  c.standby.start()
  c.url = "postgres://postgres@127.0.0.1:" .. p1 .. ",127.0.0.1:" .. p2
    .. "/postgres?target_session_attrs=read-write"

  -- the standby streams (and, when sync, is the synchronous one)
  servers.wait_for(function()
    local st = c.primary.psql("SELECT sync_state FROM pg_stat_replication")
    return st == (opts.sync and "sync" or "async")
  end, 30, "the standby to stream")

  -- These two yield instead of blocking the loop: the spec's writers
  -- go on meanwhile.
  local function pg_ctl(data, ...)
    local argv = { PG_BIN .. "/pg_ctl", "-D", data, ... }
    if root then
      table.insert(argv, 1, "--")
      table.insert(argv, 1, "postgres")
      table.insert(argv, 1, "-u")
      table.insert(argv, 1, "runuser")
    end
    local code, out = proc.run(argv, { timeout = 40 })
    assert(code == 0, "pg_ctl " .. table.concat({ ... }, " ") .. ": "
           .. tostring(out))
  end

  function c.kill_primary()
    pg_ctl(c.primary.data, "-m", "immediate", "-w", "-t", "30", "stop")
    servers.unguard(c.primary)
    c.primary.running = false
  end

  function c.promote()
    pg_ctl(c.standby.data, "-w", "-t", "30", "promote")
  end

  -- The postmaster and its children (backends, walsender, ...): a host
  -- that hangs, or one cut off by a firewall that drops its packets. The
  -- kernel still completes TCP handshakes on its listening socket.
  local function primary_pids()
    local f = assert(io.open(c.primary.data .. "/postmaster.pid"))
    local pm = assert(f:read("*l"))
    f:close()
    return pm .. " " .. read_cmd("ps -o pid= --ppid " .. pm):gsub("%s+", " ")
  end

  function c.freeze_primary()
    assert(sh("kill -STOP " .. primary_pids()))
    c.primary.frozen = true
  end

  function c.thaw_primary()
    if c.primary.frozen then
      sh("kill -CONT " .. primary_pids())
      c.primary.frozen = false
    end
  end

  function c.stop_standby()
    c.standby.stop("fast")
  end

  function c.start_standby()
    c.standby.start()
  end

  function c.cleanup()
    c.thaw_primary()
    c.standby.stop("immediate")
    c.primary.stop("immediate")
    sh("rm -rf " .. dir)
  end

  function c.replicated(tbl)
    servers.wait_for(function()
      return c.standby.psql("SELECT count(*) FROM " .. tbl) == "0"
    end, 10, "the table on the standby")
  end

  return c
end

-- n queries held at once, so the pool has n connections open (all to
-- the server it finds writable first)
function _M.fill(db, n)
  local done = 0
  for _ = 1, n do
    core.spawn(function()
      assert(db:query("SELECT pg_sleep(0.1)"))
      done = done + 1
    end)
  end
  servers.wait_for(function() return done == n end, 10,
                   n .. " connections")
end

function _M.port(db)
  return tonumber(assert(db:query("SELECT inet_server_port() AS p"))[1].p)
end

return _M
