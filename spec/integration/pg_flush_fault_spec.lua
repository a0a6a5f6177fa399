-- PostgreSQL: the flush at the end of a statement's send fails. libpq's
-- PQflush() returns -1 when, the send being partial, its read finds the
-- server gone (EOF, a reset): it has closed the socket then, which leaves
-- the event loop's set, so no event ever comes for the connection. The
-- statement queued on it once waited for query_timeout and failed as a
-- silent server (kind timeout, "no reply within"), marking the server's
-- other connections silent. It fails at once now, as on any lost
-- connection: a write unknown_outcome, a read unavailable.
--
-- The failure is made at that exact flush by spec/support/pq_flush_fault.c
-- (preloaded in a child process, spec/support/flush_fault_child.lua),
-- through libpq's own code: the socket has a full send buffer and a peer
-- that hung up, and libpq's PQflush() reads EOF and drops the connection.
local servers = require "spec.support.servers"
local proc = require "spec.support.proc"

local sh = servers.sh

describe("PostgreSQL: the last flush of a send fails", function()
  local pg, dir, shim

  setup(function()
    if not servers.have_postgres()
       or not sh("command -v cc >/dev/null 2>&1"
                 .. " && command -v pg_config >/dev/null 2>&1")
    then
      return
    end
    dir = servers.mktemp()
    shim = dir .. "/pq_flush_fault.so"
    assert(sh("cc -shared -fPIC -O1 -I\"$(pg_config --includedir)\" -o "
              .. shim .. " spec/support/pq_flush_fault.c -ldl"),
           "cannot build spec/support/pq_flush_fault.c")
    pg = servers.postgres()
  end)

  teardown(function()
    servers.stop_all()
    if dir then
      sh("rm -rf " .. dir)
    end
  end)

  it("fails the statement at once, not after query_timeout", function()
    if not pg then
      pending("postgres, cc or pg_config not installed")
      return
    end
    local trigger = dir .. "/trigger"
    -- (a sanitizer build wants its runtime first of the preloads: told
    -- not to check, as the shim only wraps two libpq functions)
    local asan = os.getenv("ASAN_OPTIONS")
    local code, out = proc.run({ "env", "LC_ALL=C", "LD_PRELOAD=" .. shim,
      "ASAN_OPTIONS=" .. (asan and asan .. ":" or "")
        .. "verify_asan_link_order=0",
      "PQ_FLUSH_FAULT=" .. trigger, PAYGATE_BIN, "exec",
      "spec/support/flush_fault_child.lua", pg.url, trigger },
      { timeout = 60 })
    assert.equal(0, code, out)
    local lines = {}
    for what, kind, secs, fired, msg in
        out:gmatch("([%a_]+) (%S+) ([%d.]+) (%S+) ([^\n]*)\n") do
      lines[what] = { kind = kind, secs = tonumber(secs), fired = fired,
                      msg = msg }
    end
    -- query_timeout is 5 s: well under it, no reply was waited for
    local function failed_fast(what, kind)
      local l = lines[what]
      assert(l, what .. ": no result in " .. out)
      assert.equal("fired", l.fired, "the fault was not injected: " .. out)
      assert.equal(kind, l.kind, out)
      assert(l.secs < 2, what .. " failed after " .. l.secs .. " s: " .. out)
      assert.is_nil(l.msg:find("no reply within", 1, true), out)
      -- with libpq's own reason, not only "connection lost"
      assert.matches("connection lost: server closed "
                     .. "the connection unexpectedly", l.msg)
    end
    failed_fast("write", "unknown_outcome")
    failed_fast("read", "unavailable")
    -- after a statement the server refused: the connection's reason,
    -- not that statement's error
    failed_fast("after_error", "unavailable")
    assert.is_nil(lines.after_error.msg:find("division", 1, true), out)
    -- the pool reconnects and serves
    assert.matches("after ok\n", out, 1, true)
  end)
end)
