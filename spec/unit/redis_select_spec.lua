-- paygate.redis with a db (redis://host:port/N, opts.db): a new
-- connection sends SELECT N before any of the caller's commands run on
-- it. When the server refuses the SELECT (N past its `databases`, or
-- SELECT renamed away), the commands waiting for that connection are
-- never sent: they fail "redis: SELECT N refused: <the server's answer>",
-- kind config, not retryable -- as a refused AUTH. Before, they were
-- pipelined behind the SELECT, ran on db 0 and answered as successes: a
-- SET meant for db 5 wrote db 0 and returned OK.
local core = require "paygate.core"
local redis = require "paygate.redis"
local rcore = require "paygate.redis.core"
local servers = require "spec.support.servers"

local function refused(err, n)
  assert.is_table(err)
  assert.equal("config", err.kind, tostring(err))
  assert.is_false(err.retryable)
  assert.matches("^redis: SELECT " .. n .. " refused: ", err.message)
end

describe("paygate.redis with a db", function()
  local srv, db0

  setup(function()
    srv = servers.redis({ databases = 4 })
  end)

  teardown(function()
    if db0 then db0:close() end
    servers.stop_all()
  end)

  before_each(function()
    db0 = db0 or assert(redis.connect(srv.url, { pool = 1 }))
    assert.equal("OK", db0:call("FLUSHALL"))
  end)

  local function in_db0(k)
    return db0:call("EXISTS", k) == 1
  end

  it("a db past the server's: connect fails config, SELECT refused",
     function()
    local t0 = core.mono()
    local c, err = redis.connect(srv.url .. "/5")
    assert.is_nil(c)
    refused(err, 5)
    assert.matches("out of range", err.message, 1, true)
    assert.is_true(core.mono() - t0 < 1)
  end)

  it("a command behind the refused SELECT is not run on db 0", function()
    local h = rcore.new("127.0.0.1", srv.port, { db = 5, pool = 1 })
    finally(function() h:close() end)
    local v, err = h:call("SET", "sel:k", "v")
    assert.is_nil(v)
    refused(err, 5)
    assert.is_false(in_db0("sel:k"))
    -- while the client waits before its next attempt: the same verdict
    v, err = h:call("SET", "sel:k2", "v")
    assert.is_nil(v)
    assert.equal("config", err.kind, tostring(err))
    assert.is_false(err.retryable)
    assert.matches("SELECT 5 refused", err.message, 1, true)
    -- past the wait: a pipeline behind the next refused SELECT, each
    -- slot with it, none run
    core.sleep(0.5)
    local res = assert(h:pipeline({ { "SET", "sel:p", "v" },
                                    { "INCR", "sel:n" } }))
    for i = 1, 2 do
      assert.is_true(redis.is_error(res[i]), tostring(res[i]))
      refused(res[i], 5)
    end
    assert.is_false(in_db0("sel:p"))
    assert.is_false(in_db0("sel:n"))
    assert.is_false(in_db0("sel:k2"))
  end)

  it("concurrent callers behind one refused SELECT: none run", function()
    local h = rcore.new("127.0.0.1", srv.port, { db = 9, pool = 2 })
    finally(function() h:close() end)
    local errs, n = {}, 0
    for i = 1, 5 do
      core.spawn(function()
        local v, err = h:call("SET", "sel:c" .. i, "v")
        errs[i] = v == nil and err or v
        n = n + 1
      end)
    end
    servers.wait_for(function() return n == 5 end, 5, "the callers")
    for i = 1, 5 do
      assert.is_table(errs[i], tostring(errs[i]))
      assert.equal("config", errs[i].kind, tostring(errs[i]))
      assert.is_false(in_db0("sel:c" .. i))
    end
  end)

  it("commands held behind an unanswered SELECT: timeout, or unavailable"
     .. " when the address changes; the client then works", function()
    local h = rcore.new("127.0.0.1", srv.port, { db = 2, pool = 1,
                                                  timeout = 0.3 })
    finally(function() h:close() end)
    assert.equal("OK", db0:call("CLIENT", "PAUSE", 600, "ALL"))
    local v, err = h:call("SET", "sel:t", "v")
    assert.is_nil(v)
    assert.equal("timeout", err.kind, tostring(err))
    -- held on a new connection, whose address set_addr then leaves
    core.sleep(0.25)                     -- past the backoff
    local res, n = nil, 0
    core.spawn(function()
      res = { h:call("SET", "sel:u", "v") }
      n = n + 1
    end)
    h:set_addr("127.0.0.1", srv.port)
    servers.wait_for(function() return n == 1 end, 5, "the caller")
    assert.is_nil(res[1])
    assert.equal("unavailable", res[2].kind, tostring(res[2]))
    servers.wait_for(function()
      return h:call("SET", "sel:w", "v") == "OK"
    end, 5, "the pause's end")
    assert.is_false(in_db0("sel:w"))
    assert.equal(1, h:call("EXISTS", "sel:w"))
  end)

  it("a db the server has: commands and blocking commands use it",
     function()
    local c = assert(redis.connect(srv.url .. "/3"))
    finally(function() c:close() end)
    assert.equal("OK", c:call("SET", "sel:in3", "v"))
    assert.is_false(in_db0("sel:in3"))
    local res = assert(c:pipeline({ { "GET", "sel:in3" }, { "DBSIZE" } }))
    assert.equal("v", res[1])
    assert.equal(1, res[2])
    -- a blocking command's own connection selects the db too
    assert.equal(1, c:call("RPUSH", "sel:list", "x"))
    local got = assert(c:call("BLPOP", "sel:list", 1))
    assert.equal("x", got[2])
    assert.equal(0, db0:call("DBSIZE"))
  end)
end)

describe("paygate.redis with a db, SELECT disabled", function()
  local srv

  setup(function()
    srv = servers.redis({ rename = { SELECT = "" } })
  end)

  teardown(function()
    servers.stop_all()
  end)

  it("the refusal fails the commands, which never run", function()
    local c, err = redis.connect(srv.url .. "/2")
    assert.is_nil(c)
    refused(err, 2)
    local h = rcore.new("127.0.0.1", srv.port, { db = 2, pool = 1 })
    finally(function() h:close() end)
    local v
    v, err = h:call("SET", "sel:k", "v")
    assert.is_nil(v)
    refused(err, 2)
    local db0 = assert(redis.connect(srv.url, { pool = 1 }))
    finally(function() db0:close() end)
    assert.equal(0, db0:call("EXISTS", "sel:k"))
  end)
end)
