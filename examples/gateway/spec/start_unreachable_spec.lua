-- examples/gateway: an unreachable PostgreSQL or Redis at start is tried
-- again for a while (gw.boot), then one line naming it (no password, no
-- stack trace) and exit status 1; one that comes up meanwhile is used.
-- One that refuses the password is not tried again: the line comes at
-- once.
local testing = require "paygate.testing"
local core = require "paygate.core"
local servers = require "spec.support.servers"
local gwcore = dofile("examples/gateway/spec/core_support.lua")

describe("gateway start with its stores unreachable", function()
  local sim

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
  end)

  teardown(function()
    testing.stop_all()
    servers.stop_all()
  end)

  -- (the waits below for a start to log or to serve are 30 s, as
  -- support.lua gives a gateway's start: one under ASan on a loaded
  -- machine can take several seconds; nothing is spent when it is quick)
  local function start(over, workers)
    return testing.start_app{ app = "examples/gateway", wait = false,
      workers = workers,
      config = function(srv) return gwcore.config(sim, srv, over) end }
  end

  local function lines(text, prefix)
    local n = 0
    for line in text:gmatch("[^\n]+") do
      if line:sub(1, #prefix) == prefix then n = n + 1 end
    end
    return n
  end

  it("PostgreSQL: one line naming it, exit 1", function()
    local port = core.free_port()
    local srv = start({ db = "postgres://gw:secretpw@127.0.0.1:" .. port
                             .. "/gw" }, 2)
    local t0 = core.mono()
    local code = srv.proc:wait(40)
    local logs = srv:logs()
    assert.equal(1, code, logs)
    assert.is_true(core.mono() - t0 >= 5, "gave up at once")
    assert.equal(1, lines(logs, "gateway: cannot reach the store"), logs)
    assert.matches("gateway: cannot reach the store postgres://gw@127.0.0.1:"
                   .. port .. "/gw: ", logs, 1, true)
    assert.matches("Connection refused", logs, 1, true)
    assert.not_matches("secretpw", logs, 1, true)
    assert.not_matches("traceback", logs, 1, true)
    srv:stop()
  end)

  -- a start that stops at once: exit 1, one line starting want, no
  -- retry, neither password anywhere
  local function refused_at_once(srv, want, passwords)
    local t0 = core.mono()
    local code = srv.proc:wait(40)
    local took = core.mono() - t0
    local logs = srv:logs()
    assert.equal(1, code, logs)
    -- (a start under ASan on a loaded machine takes seconds; a retried
    -- one would take the whole wait and log "trying again", checked next)
    assert.is_true(took < 8, "took " .. took .. " s: " .. logs)
    assert.not_matches("trying again", logs, 1, true)
    assert.equal(1, lines(logs, "gateway: cannot reach"), logs)
    assert.matches(want, logs, 1, true)
    for _, pw in ipairs(passwords) do
      assert.not_matches(pw, logs, 1, true)
    end
    assert.not_matches("traceback", logs, 1, true)
    srv:stop()
  end

  it("PostgreSQL refusing the password: one line at once, no retries",
     function()
    if not servers.have_postgres() then
      pending("postgres not installed")
      return
    end
    local pg = servers.postgres({ password = "right-pw-61aa" })
    local srv = start({ db = "postgres://postgres:wrong-pw-07bd@127.0.0.1:"
                             .. pg.port .. "/postgres" }, 2)
    -- the line says what to do, as doctor does (it ended with libpq's
    -- words)
    refused_at_once(srv, "gateway: cannot reach the store"
      .. " postgres://postgres@127.0.0.1:" .. pg.port .. "/postgres:"
      .. " postgres: connect: connection to server at \"127.0.0.1\", port "
      .. pg.port .. " failed: FATAL:  28P01: password authentication failed"
      .. " for user \"postgres\"; fix: the server refused the password the"
      .. " URL in gateway.db gives for its user: fix it there",
      { "wrong-pw-07bd", "right-pw-61aa" })
    -- no password at all (the service's PGPASSFILE not set): where libpq
    -- looks for one, and that it is the gateway's environment that counts
    local home = os.getenv("HOME")
    local f = home and io.open(home .. "/.pgpass")
    if f then f:close() end
    if os.getenv("PGPASSWORD") or os.getenv("PGPASSFILE") or f then
      return      -- (this environment gives libpq a password)
    end
    srv = start({ db = "postgres://postgres@127.0.0.1:" .. pg.port
                       .. "/postgres" }, 2)
    refused_at_once(srv, "fe_sendauth: no password supplied; fix: the server"
      .. " asks for a password and none was given: libpq reads it from"
      .. " PGPASSFILE (default ~/.pgpass of the user running the gateway,"
      .. " mode 0600, lines host:port:database:user:password) or PGPASSWORD,"
      .. " in the gateway's own environment", { "right-pw-61aa" })
  end)

  it("Redis refusing the password: one line at once, naming the refusal",
     function()
    local rs = servers.redis({ requirepass = "right-pw-c2d4" })
    local srv = start({ redis = "redis://:wrong-pw-93ef@127.0.0.1:"
                                .. rs.port })
    refused_at_once(srv, "gateway: cannot reach redis redis://127.0.0.1:"
      .. rs.port .. ": redis: AUTH refused: WRONGPASS ",
      { "wrong-pw-93ef", "right-pw-c2d4" })
  end)

  it("Redis: waits for it to come up, and serves", function()
    local rs = servers.redis()
    rs.stop()
    local srv = start({ redis = rs.url })
    testing.wait_until(function()
      return srv:logs():find("cannot reach redis; trying again", 1, true)
    end, 30, "a retry logged")
    rs.start()
    testing.wait_until(function()
      local res = srv:admin_get("/healthz")
      return res and res.status == 200
    end, 30, "the gateway to serve")
    assert.is_nil(srv.proc:poll())
    srv:stop()
  end)

  it("Redis with a password from a file, kept out of the URL", function()
    local rs = servers.redis({ requirepass = "spec-redis-pw" })
    local pwfile = os.tmpname()
    local f = assert(io.open(pwfile, "w"))
    f:write("spec-redis-pw\n")
    f:close()
    local url = "redis://127.0.0.1:" .. rs.port
    local srv = start({ redis = url, redis_password_file = pwfile })
    testing.wait_until(function()
      local res = srv:admin_get("/healthz")
      return res and res.status == 200
    end, 30, "the gateway to serve")
    assert.is_nil(srv:logs():find("NOAUTH", 1, true))
    srv:stop()
    -- the wrong one: refused at once, one line, the password not in it
    f = assert(io.open(pwfile, "w"))
    f:write("not-it\n")
    f:close()
    srv = start({ redis = url, redis_password_file = pwfile })
    local code = srv.proc:wait(40)
    local logs = srv:logs()
    os.remove(pwfile)
    assert.is_true(code ~= 0, logs)
    assert.matches("gateway: cannot reach redis redis://127.0.0.1:", logs, 1,
                   true)
    assert.matches("WRONGPASS", logs, 1, true)
    assert.not_matches("not-it", logs, 1, true)
    srv:stop()
  end)

  it("Redis that stays down: one line naming it, exit 1", function()
    local port = core.free_port()
    -- a password holding "/" and "@" (paygate.redis reads the user info
    -- up to the last "@"): none of it printed
    local srv = start({ redis = "redis://:se/cr@etpw@127.0.0.1:" .. port })
    local code = srv.proc:wait(40)
    local logs = srv:logs()
    assert.equal(1, code, logs)
    assert.equal(1, lines(logs, "gateway: cannot reach redis"), logs)
    assert.matches("gateway: cannot reach redis redis://127.0.0.1:" .. port
                   .. ": ", logs, 1, true)
    assert.not_matches("cr@etpw", logs, 1, true)
    assert.not_matches("etpw", logs, 1, true)
    assert.not_matches("traceback", logs, 1, true)
    srv:stop()
  end)
end)
