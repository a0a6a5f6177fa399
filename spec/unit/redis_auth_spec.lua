-- paygate.redis against a server that requires a password (requirepass):
-- a refused AUTH is reported as itself -- the server's WRONGPASS -- with
-- kind "config", not retryable, and never the password. The commands
-- waiting for that connection are held until the AUTH answered, and fail
-- with it unsent (before, they went behind the AUTH and the server's
-- NOAUTH to them, which says only that a password is needed, was what
-- redis.connect reported; the WRONGPASS went to the log alone).
local core = require "paygate.core"
local redis = require "paygate.redis"
local servers = require "spec.support.servers"

local PASSWORD = "right-pw-3a9e"
local WRONG = "wrong-pw-71c4"

describe("paygate.redis with a password", function()
  local srv

  setup(function()
    srv = servers.redis({ requirepass = PASSWORD })
  end)

  teardown(function()
    servers.stop_all()
  end)

  local function url(userinfo)
    return "redis://" .. (userinfo and userinfo .. "@" or "") .. "127.0.0.1:"
      .. srv.port
  end

  local function no_password(err)
    assert.not_matches(WRONG, err.message, 1, true)
    assert.not_matches(PASSWORD, err.message, 1, true)
  end

  it("connects with the right password", function()
    local c = assert(redis.connect(srv.url))
    assert.equal("OK", c:call("SET", "k", "v"))
    c:close()
  end)

  it("a wrong password: the AUTH's refusal, config, not retryable",
     function()
    for _, u in ipairs({ url(":" .. WRONG), url("someone:" .. WRONG) }) do
      local t0 = core.mono()
      local c, err = redis.connect(u)
      assert.is_nil(c)
      assert.equal("config", err.kind, tostring(err))
      assert.is_false(err.retryable)
      assert.equal("WRONGPASS", err.code)
      assert.matches("^redis: AUTH refused: WRONGPASS ", err.message)
      assert.not_matches("NOAUTH", err.message, 1, true)
      no_password(err)
      assert.is_true(core.mono() - t0 < 1)
    end
  end)

  it("a password holding ? in the URL: read as the password (not a"
     .. " query), shown by no message", function()
    -- read as host "wrongq" and a query, it failed dns naming the
    -- password's first part, and redact.url showed all of it
    local pw = "wrongq?pw-71c4"
    local u = url(":" .. pw)
    local c, err = redis.connect(u)
    assert.is_nil(c)
    assert.equal("WRONGPASS", err.code, tostring(err))
    assert.not_matches("wrongq", err.message, 1, true)
    local shown = require("paygate.redact").url(u)
    assert.equal("redis://127.0.0.1:" .. srv.port, shown)
  end)

  it("the password as an option: the same", function()
    local c, err = redis.connect(url(), { password = WRONG })
    assert.is_nil(c)
    assert.equal("config", err.kind, tostring(err))
    assert.matches("^redis: AUTH refused: WRONGPASS ", err.message)
    no_password(err)
  end)

  it("no password: NOAUTH, config, not retryable", function()
    local c, err = redis.connect(url())
    assert.is_nil(c)
    assert.equal("config", err.kind, tostring(err))
    assert.is_false(err.retryable)
    assert.equal("NOAUTH", err.code)
  end)

  it("a password changed under a client: its commands fail with the"
     .. " refusal, config, also while it waits to reconnect", function()
    local c = assert(redis.connect(srv.url, { pool = 1 }))
    local admin = assert(redis.connect(srv.url, { pool = 1 }))
    finally(function()
      local a = redis.connect(url(":changed-pw-9d0b"))
      if a then
        a:call("CONFIG", "SET", "requirepass", PASSWORD)
        a:close()
      end
      admin:close()
      c:close()
    end)
    assert.equal("OK", c:call("SET", "k", "v"))
    assert.equal("OK", admin:call("CONFIG", "SET", "requirepass",
                                  "changed-pw-9d0b"))
    -- end c's connection (its id), so that the next command reconnects
    local id = c:call("CLIENT", "ID")
    assert.equal(1, admin:call("CLIENT", "KILL", "ID", id))
    local err
    servers.wait_for(function()
      local v
      v, err = c:call("GET", "k")
      assert.is_nil(v)
      return err.kind ~= "unavailable"
    end, 5, "a reconnect")
    assert.equal("config", err.kind, tostring(err))
    assert.is_false(err.retryable)
    assert.equal("WRONGPASS", err.code)
    assert.matches("^redis: AUTH refused: WRONGPASS ", err.message)
    no_password(err)
    -- while it waits before the next attempt (or in that attempt, on a
    -- slow machine): the same verdict, naming the refusal
    local v, werr = c:call("GET", "k")
    assert.is_nil(v)
    assert.equal("config", werr.kind, tostring(werr))
    assert.is_false(werr.retryable)
    assert.matches("WRONGPASS", werr.message, 1, true)
    no_password(werr)
    -- past the wait (at most 0.2 s after two failed attempts): a
    -- pipeline sent behind the next refused AUTH, each slot with it
    core.sleep(0.5)
    local res = assert(c:pipeline({ { "GET", "k" }, { "PING" } }))
    for i = 1, 2 do
      assert.is_true(redis.is_error(res[i]), tostring(res[i]))
      assert.equal("config", res[i].kind, tostring(res[i]))
      assert.is_false(res[i].retryable)
      assert.matches("^redis: AUTH refused: WRONGPASS ", res[i].message)
      no_password(res[i])
    end
  end)
end)
