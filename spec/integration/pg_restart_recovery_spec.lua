-- PostgreSQL restarted under several pools (as the gateway's workers each
-- hold one): some busy, some idle across the restart. Whatever the pools
-- saw meanwhile -- refused connects, 57P03 (shutting down, starting up),
-- sessions ended by the shutdown (57P01), connects that got no answer
-- within connect_timeout because the postmaster was stopped (SIGSTOP, as
-- a starved machine looks) while it shut down or right after it was
-- ready -- every pool serves again within connect_timeout + down_for of
-- the server answering, and none stays down.
local core = require "paygate.core"
local sql = require "paygate.sql"
local servers = require "spec.support.servers"
local proc = require "spec.support.proc"

local wait_for = servers.wait_for
local PG_BIN = os.getenv("PG_BIN") or "/usr/lib/postgresql/15/bin"

local sh, read = servers.sh, proc.read

describe("PostgreSQL restarted under several pools", function()
  local pg

  setup(function()
    if servers.have_postgres() then
      pg = servers.postgres()
    end
  end)

  teardown(function()
    servers.stop_all()
  end)

  it("every pool, busy or idle, serves again once the server answers",
     function()
    if not pg then
      pending("postgres not installed")
      return
    end
    local as = servers.is_root() and "runuser -u postgres -- " or ""
    local CONNECT_TIMEOUT, DOWN_FOR = 1, 0.5
    local pools, state = {}, {}
    local BUSY, N = 3, 5                 -- pools 1..3 busy, 4..5 idle
    for i = 1, N do
      pools[i] = assert(sql.open(pg.url, { pool = 4,
        connect_timeout = CONNECT_TIMEOUT, down_for = DOWN_FOR }))
      state[i] = { ok = 0, last_ok = core.mono() }
    end
    finally(function()
      for i = 1, N do pools[i]:close() end
    end)
    local function query(i, sql_text)
      local r, err = pools[i]:query(sql_text)
      if r then
        state[i].ok = state[i].ok + 1
        state[i].last_ok = core.mono()
      else
        state[i].err = tostring(err)
      end
      return r
    end
    -- an idle pool: four connections opened, then left alone
    local function fill(i)
      local n = 0
      for _ = 1, 4 do
        core.spawn(function()
          query(i, "SELECT pg_sleep(0.05)")
          n = n + 1
        end)
      end
      wait_for(function() return n == 4 end, 20, "pool " .. i .. " filled")
    end
    local stop = false
    for i = 1, BUSY do
      for _ = 1, 3 do
        core.spawn(function()
          while not stop do
            query(i, "SELECT 1 AS x")
            core.sleep(0.005)
          end
        end)
      end
    end
    finally(function() stop = true end)

    -- pg_ctl in the background: the pools' loop runs meanwhile. Its end
    -- is a mark holding a word, as proc.read gives "" (true) for a missing
    -- file too: a wait for an empty mark's read() went on at once, so the
    -- start ran while the stop still did, failed, and the server stayed
    -- down (every pool "still failing")
    local mark = pg.dir .. "/pg_ctl.done"
    local function pg_ctl(args)
      os.remove(mark)
      assert(sh("(" .. as .. PG_BIN .. "/pg_ctl -D " .. pg.data .. " "
                .. args .. " >/dev/null 2>&1; echo done >" .. mark .. ") &"))
    end
    local function pg_ctl_done(what)
      wait_for(function() return read(mark) == "done\n" end, 60, what)
    end
    local function postmaster()
      return wait_for(function()
        return read(pg.data .. "/postmaster.pid"):match("^(%d+)")
      end, 30, "postmaster.pid")
    end
    -- the postmaster stopped for longer than connect_timeout: connects
    -- made meanwhile get no answer and time out
    local function freeze(pid)
      assert(sh("kill -STOP " .. pid))
      core.sleep(CONNECT_TIMEOUT + 0.5)
      assert(sh("kill -CONT " .. pid))
    end
    local opts = "-p " .. pg.port .. " -k " .. pg.dir
      .. " -c listen_addresses=127.0.0.1 -c max_connections=50"

    for _, mode in ipairs{ "plain", "frozen after start", "frozen in stop",
                           "frozen after start", "plain" } do
      for i = BUSY + 1, N do fill(i) end
      local pm = postmaster()
      pg_ctl("-m fast -w -t 30 stop")
      if mode == "frozen in stop" then
        freeze(pm)
      end
      pg_ctl_done("the stop (" .. mode .. ")")
      pg_ctl("-l " .. pg.dir .. "/pg.log -o '" .. opts .. "' -w -t 30 start")
      -- the idle pools' first statements since the stop: while the server
      -- starts up (and, frozen, gives no answer), until one is served
      local t1, t0 = core.mono(), math.huge
      for i = BUSY + 1, N do
        core.spawn(function()
          while state[i].last_ok < t0 and core.mono() - t1 < 60 do
            if not query(i, "SELECT 1 AS x") then
              core.sleep(0.01)
            end
          end
        end)
      end
      pg_ctl_done("the start (" .. mode .. ")")
      if mode == "frozen after start" then
        freeze(postmaster())
      end
      -- the server answers from here on
      t0 = core.mono()
      local ok = pcall(wait_for, function()
        for i = 1, N do
          if state[i].last_ok < t0 then return false end
        end
        return true
      end, 10, "every pool to serve")
      local report = {}
      for i = 1, N do
        report[i] = ("pool %d: %s"):format(i, state[i].last_ok < t0
          and ("still failing: " .. tostring(state[i].err))
          or ("served after %.2f s"):format(state[i].last_ok - t0))
      end
      assert(ok, mode .. ": " .. table.concat(report, "; "))
      -- each within connect_timeout + down_for (and a margin for a
      -- loaded machine) of the server answering
      for i = 1, N do
        assert(state[i].last_ok - t0 < CONNECT_TIMEOUT + DOWN_FOR + 3,
               mode .. ": " .. report[i])
      end
    end
  end)
end)
