-- PostgreSQL refusing the login: a wrong password, no password where one
-- is required, a database that does not exist. Trying again cannot fix
-- any of them, so sql.open fails at once with kind "config", not
-- retryable (docs/storage.md, Error kinds), and the message says why
-- without the password. They were "unavailable", retryable, like a server
-- that is down, and the gateway's start (gw.boot) went on trying them for
-- 10 s. A host that cannot be reached stays retryable.
local core = require "paygate.core"
local sql = require "paygate.sql"
local servers = require "spec.support.servers"

local PASSWORD = "right-pw-8c1f"
local WRONG = "wrong-pw-5d2e"

describe("PostgreSQL refusing the login", function()
  local srv

  setup(function()
    if servers.have_postgres() then
      srv = servers.postgres({ password = PASSWORD })
    end
  end)

  teardown(function()
    servers.stop_all()
  end)

  -- a case that needs the server (pending where PostgreSQL is missing)
  local function it_pg(name, fn)
    it(name, function()
      if not srv then
        pending("postgres not installed")
        return
      end
      fn()
    end)
  end

  local function url(userinfo, db)
    return "postgres://" .. userinfo .. "@127.0.0.1:" .. srv.port .. "/"
      .. (db or "postgres")
  end

  -- sql.open(u) fails at once, kind config, not retryable, its message
  -- holding want and neither password
  local function refused(u, want)
    local t0 = core.mono()
    local db, err = sql.open(u)
    local took = core.mono() - t0
    assert.is_nil(db)
    assert.equal("config", err.kind, tostring(err))
    assert.is_false(err.retryable, tostring(err))
    assert.matches(want, err.message, 1, true)
    assert.not_matches(WRONG, err.message, 1, true)
    assert.not_matches(PASSWORD, err.message, 1, true)
    assert.not_matches("LOCATION", err.message, 1, true)
    assert.is_true(took < 1, "took " .. took .. " s")
    return err
  end

  it_pg("opens with the right password", function()
    local db = assert(sql.open(srv.url))
    assert.same({ { one = 1 } }, assert(db:query("SELECT 1 AS one")))
    db:close()
  end)

  it_pg("a wrong password: config, not retryable, at once", function()
    local err = refused(url("postgres:" .. WRONG),
                        'password authentication failed for user "postgres"')
    assert.matches("^postgres: connect: ", err.message)
    assert.matches("28P01", err.message, 1, true)
  end)

  it_pg("an unknown role: config, not retryable", function()
    refused(url("nobody:" .. WRONG), 'authentication failed for user "nobody"')
  end)

  it_pg("no password where one is required: config, not retryable",
        function()
    refused(url("postgres"), "no password supplied")
  end)

  it_pg("a database that does not exist: config, not retryable", function()
    refused(url("postgres:" .. PASSWORD, "nodb"),
            'database "nodb" does not exist')
  end)

  it_pg("a password changed under an open pool: its calls fail config,"
        .. " also while it is down", function()
    -- the socket in srv.dir stays trust: the admin's way in
    local admin = assert(sql.open("postgres://postgres@/postgres?host="
      .. srv.dir .. "&port=" .. srv.port, { pool = 1 }))
    local db = assert(sql.open(srv.url, { pool = 1, down_for = 5 }))
    finally(function()
      assert(admin:exec("ALTER ROLE postgres PASSWORD '" .. PASSWORD .. "'"))
      db:close()
      admin:close()
    end)
    assert(admin:exec("ALTER ROLE postgres PASSWORD 'changed-pw-0b7a'"))
    assert(admin:query("SELECT pg_terminate_backend(pid)"
      .. " FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
      .. " AND usename = 'postgres' AND backend_type = 'client backend'"))
    -- the first call finds its connection gone (unavailable, retryable);
    -- the next one reconnects and is refused
    local err
    servers.wait_for(function()
      local rows
      rows, err = db:query("SELECT 1 AS one")
      assert.is_nil(rows)
      return err.kind ~= "unavailable"
    end, 5, "a reconnect")
    assert.equal("config", err.kind, tostring(err))
    assert.is_false(err.retryable)
    assert.matches("password authentication failed", err.message, 1, true)
    -- within down_for: at once, without a connect, the same verdict
    local t0 = core.mono()
    local rows, e2 = db:query("SELECT 1 AS one")
    assert.is_nil(rows)
    assert.is_true(core.mono() - t0 < 0.1, "it waited")
    assert.equal("config", e2.kind, tostring(e2))
    assert.is_false(e2.retryable)
    assert.matches("password authentication failed", e2.message, 1, true)
    assert.not_matches(PASSWORD, e2.message, 1, true)
  end)

  it_pg("a host that cannot be reached beside one refusing the login"
        .. " stays retryable", function()
    local db, err = sql.open("postgres://postgres:" .. WRONG .. "@127.0.0.1:"
      .. servers.free_port() .. ",127.0.0.1:" .. srv.port .. "/postgres")
    assert.is_nil(db)
    assert.equal("unavailable", err.kind, tostring(err))
    assert.is_true(err.retryable)
    assert.not_matches(WRONG, err.message, 1, true)
  end)

  it("three hosts that cannot be reached: each one's reason, no hints",
     function()
    local ports = { servers.free_port(), servers.free_port(),
                    servers.free_port() }
    local db, err = sql.open("postgres://postgres@127.0.0.1:" .. ports[1]
      .. ",127.0.0.1:" .. ports[2] .. ",127.0.0.1:" .. ports[3]
      .. "/postgres")
    assert.is_nil(db)
    assert.equal("unavailable", err.kind, tostring(err))
    for _, p in ipairs(ports) do
      assert.matches('"127.0.0.1", port ' .. p .. " failed: Connection"
                     .. " refused", err.message, 1, true)
    end
    assert.not_matches("Is the server running", err.message, 1, true)
  end)
end)
