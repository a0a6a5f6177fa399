-- spec/support/sentinel.lua: a Redis master, one replica and three
-- Sentinels on loopback, for the failover specs.
--
--   local sentinel = require "spec.support.sentinel"
--   local g = sentinel.start()   -- g.master, g.replica: { port, start(),
--                                --   kill() }; g.sentinels: ports
--   g.url                        -- redis-sentinel://.../mymaster
--   g.master_port()              -- what the Sentinels say now
--   g.cleanup()
--   sentinel.available()         -- false: redis-sentinel not installed
--
-- Sentinels call the master down after 1 s without an answer and fail
-- over at once (quorum 2). Readiness is waited for with deadlines.
local servers = require "spec.support.servers"
local proc = require "paygate.testing.proc"

local _M = {}

local sh, read_cmd = servers.sh, servers.read_cmd

local function cli(port, cmd)
  return read_cmd("redis-cli -h 127.0.0.1 -p " .. port .. " " .. cmd
                  .. " 2>/dev/null")
end

local function pid_of(file)
  local f = io.open(file)
  local pid = f and f:read("*l")
  if f then
    f:close()
  end
  return pid
end

-- A redis-server (or sentinel, when conf is given) daemon in dir. While
-- it runs, a guard stops it (and removes dir) once the spec run is gone,
-- however it ended (servers.guard).
local function daemon(dir, name, port, args)
  local d = { port = port, pidfile = dir .. "/" .. name .. ".pid",
              dir = dir }

  function d.start()
    assert(sh(args() .. " --daemonize yes --pidfile " .. d.pidfile
              .. " --logfile " .. dir .. "/" .. name .. ".log"),
           name .. " did not start")
    servers.wait_for(function()
      return cli(port, "PING"):match("PONG") ~= nil
    end, 10, name .. " on port " .. port)
    d.running = true
    servers.guard(d, pid_of(d.pidfile))
  end

  -- SIGKILL: no goodbye to replicas or Sentinels
  function d.kill()
    local pid = pid_of(d.pidfile)
    if pid and d.running then
      sh("kill -9 " .. pid)
      servers.wait_for(function()
        return not proc.running(pid)
      end, 10, name .. " to exit")
    end
    os.remove(d.pidfile)
    servers.unguard(d)
    d.running = false
  end

  return d
end

-- A free port not in the set (which it joins).
-- redis-server and redis-sentinel both installed? (specs skip when not)
function _M.available()
  return servers.redis and sh("command -v redis-sentinel >/dev/null 2>&1")
end

function _M.free_port_except(ports)
  local p
  repeat
    p = servers.free_port()
  until not ports[p]
  ports[p] = true
  return p
end

function _M.start()
  local dir = servers.mktemp()
  local g = { dir = dir, name = "mymaster", sentinels = {}, extra = {} }
  local ports = {}
  local function port()
    return _M.free_port_except(ports)
  end
  local mport, rport = port(), port()
  local base = "redis-server --bind 127.0.0.1 --dir " .. dir
    .. " --save '' --appendonly no --repl-diskless-sync-delay 0"

  g.master = daemon(dir, "master", mport, function()
    return base .. " --port " .. mport .. " --dbfilename m.rdb"
  end)
  g.replica = daemon(dir, "replica", rport, function()
    return base .. " --port " .. rport .. " --dbfilename r.rdb"
      .. " --replicaof 127.0.0.1 " .. mport
  end)
  g.master.start()
  g.replica.start()
  servers.wait_for(function()
    return cli(mport, "INFO replication"):match("state=online")
  end, 20, "the replica to sync")

  local list = {}
  for i = 1, 3 do
    local sp = port()
    local conf = dir .. "/sentinel" .. i .. ".conf"
    local f = assert(io.open(conf, "w"))
    f:write(table.concat({
      "port " .. sp, "bind 127.0.0.1", "dir " .. dir,
      "sentinel monitor mymaster 127.0.0.1 " .. mport .. " 2",
      "sentinel down-after-milliseconds mymaster 1000",
      "sentinel failover-timeout mymaster 10000",
      "sentinel parallel-syncs mymaster 1", "" }, "\n"))
    f:close()
    local s = daemon(dir, "sentinel" .. i, sp, function()
      return "redis-sentinel " .. conf
    end)
    s.start()
    g.sentinels[i] = s
    list[#list + 1] = "127.0.0.1:" .. sp
  end
  g.url = "redis-sentinel://" .. table.concat(list, ",") .. "/mymaster"

  -- every Sentinel knows the replica and the other Sentinels
  servers.wait_for(function()
    for _, s in ipairs(g.sentinels) do
      local info = cli(s.port, "SENTINEL master mymaster")
      local n = info:match("num%-other%-sentinels\n(%d+)")
      local r = info:match("num%-slaves\n(%d+)")
      if n ~= "2" or r ~= "1" then
        return false
      end
    end
    return true
  end, 20, "the Sentinels to see each other and the replica")

  -- Sentinel 1 sees the master's replica as one it would pick for a
  -- failover (sentinelSelectSlave's tests): flagged only "slave",
  -- reporting that role and the current master, linked, its link not
  -- down, its INFO and PING answers fresh, priority not zero.
  function g.wait_replica_ok(secs)
    servers.wait_for(function()
      local mp = g.master_port()
      local out = cli(g.sentinels[1].port, "SENTINEL replicas mymaster")
      local lines, cur = {}, nil
      for line in (out .. "\n"):gmatch("(.-)\n") do
        lines[#lines + 1] = line    -- empty values kept: pairs stay aligned
      end
      local function good(r)
        return r.flags == "slave" and r["role-reported"] == "slave"
          and r["master-link-status"] == "ok"
          and tostring(r["master-port"]) == tostring(mp)
          and tonumber(r["master-link-down-time"] or "") == 0
          and (tonumber(r["info-refresh"] or "") or 1e9) < 5000
          and (tonumber(r["last-ok-ping-reply"] or "") or 1e9) < 2000
          and tonumber(r["slave-priority"] or "0") ~= 0
      end
      -- key and value lines; "name" opens each replica's
      for i = 1, #lines - 1, 2 do
        local k, v = lines[i], lines[i + 1]
        if k == "name" then
          if cur and good(cur) then
            return true
          end
          cur = {}
        end
        if cur then
          cur[k] = v
        end
      end
      return cur ~= nil and good(cur)
    end, secs or 30, "Sentinel 1 to see a replica it would promote")
  end

  -- The last lines of a Sentinel's log (for a failure message).
  function g.log_tail(i, n)
    local f = io.open(dir .. "/sentinel" .. (i or 1) .. ".log")
    local lines = {}
    for line in (f and f:read("*a") or ""):gmatch("[^\n]+") do
      lines[#lines + 1] = line
    end
    if f then
      f:close()
    end
    return table.concat(lines, "\n", math.max(1, #lines - (n or 20) + 1))
  end

  -- A Sentinel outside the group that names, as "mymaster", a server
  -- whose ROLE is replica (of a port nobody listens on), with the given
  -- config epoch: what a stale or misconfigured Sentinel answers. It
  -- hears no hello messages from the group (they do not know that
  -- server), so it stays wrong. port: a free port reserved beforehand.
  function g.stale_sentinel(port, epoch)
    local name = "stale" .. port
    local rp = _M.free_port_except(ports)
    local repl = daemon(dir, name .. "r", rp, function()
      return base .. " --port " .. rp .. " --dbfilename " .. name
        .. ".rdb --replicaof 127.0.0.1 " .. _M.free_port_except(ports)
    end)
    repl.start()
    local conf = dir .. "/" .. name .. ".conf"
    local f = assert(io.open(conf, "w"))
    f:write(table.concat({
      "port " .. port, "bind 127.0.0.1", "dir " .. dir,
      "sentinel monitor mymaster 127.0.0.1 " .. rp .. " 1",
      "sentinel down-after-milliseconds mymaster 600000",
      "sentinel config-epoch mymaster " .. epoch,
      "sentinel current-epoch " .. epoch, "" }, "\n"))
    f:close()
    local s = daemon(dir, name, port, function()
      return "redis-sentinel " .. conf
    end)
    s.start()
    s.replica = repl
    g.extra[#g.extra + 1] = s
    function s.stop()
      s.kill()
      repl.kill()
    end
    return s
  end

  -- A redis-server outside the group: plain (a master of nothing), or
  -- with replica = true a replica of a port nobody listens on (its ROLE
  -- says slave until it is told REPLICAOF NO ONE). Stopped by cleanup.
  function g.server(replica)
    local sp = port()
    local name = "extra" .. sp
    local d = daemon(dir, name, sp, function()
      return base .. " --port " .. sp .. " --dbfilename " .. name .. ".rdb"
        .. (replica and (" --replicaof 127.0.0.1 "
                         .. _M.free_port_except(ports)) or "")
    end)
    d.start()
    d.stop = d.kill
    g.extra[#g.extra + 1] = d
    return d
  end

  -- Port reserved for a Sentinel started later (g.stale_sentinel).
  function g.reserve_port()
    return port()
  end

  function g.master_port()
    local out = cli(g.sentinels[1].port,
                    "SENTINEL get-master-addr-by-name mymaster")
    return tonumber(out:match("\n(%d+)"))
  end

  function g.cleanup()
    for _, s in ipairs(g.extra) do
      s.stop()
    end
    for _, s in ipairs(g.sentinels) do
      s.kill()
    end
    g.replica.kill()
    g.master.kill()
    sh("rm -rf " .. dir)
  end

  return g
end

return _M
