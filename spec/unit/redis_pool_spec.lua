-- paygate.redis's connections: commands are spread over `pool` of them,
-- and a blocking command (BLPOP, XREAD BLOCK, ...) runs on a connection
-- of its own, so that it neither holds up other coroutines' commands
-- nor reads as a timeout when it blocks longer than `timeout`.
local redis = require "paygate.redis"
local rcore = require "paygate.redis.core"
local paygate = require "paygate"
local servers = require "spec.support.servers"
local proc = require "spec.support.proc"
local slow_http = require "spec.support.slow_http"

-- a field of INFO clients, asked on admin (a client of its own)
local function info_clients(admin, field)
  local info = assert(admin:call("INFO", "clients"))
  return tonumber(info:match(field .. ":(%d+)"))
end

-- each of cmds through r:call raises at the caller's line, naming itself
local function call_raises(r, cmds)
  for _, cmd in ipairs(cmds) do
    local ok, err = pcall(function() r:call(unpack(cmd)) end)
    assert.is_false(ok, cmd[1])
    assert.truthy(tostring(err):find("redis_pool_spec.lua:", 1, true), err)
    assert.truthy(tostring(err):find("client:call: " .. cmd[1]:upper(), 1,
                                     true), err)
  end
end

describe("paygate.redis connections", function()
  local srv, admin

  -- the connections the server sees besides admin's
  local function clients()
    return info_clients(admin, "connected_clients") - 1
  end

  local function blocked()
    return info_clients(admin, "blocked_clients")
  end

  before_each(function()
    srv = servers.redis()
    admin = assert(redis.connect(srv.url, { pool = 1 }))
  end)

  after_each(function()
    admin:close()
    servers.stop_all()
  end)

  teardown(function()
    proc.stop_all()
  end)

  describe("pool", function()
    it("spreads concurrent commands over pool connections, no more",
       function()
      local r = assert(redis.connect(srv.url, { pool = 3 }))
      local function burst()
        local tasks = {}
        for i = 1, 20 do
          tasks[i] = paygate.spawn(function()
            return r:call("SET", "p" .. i, i)
          end)
        end
        for i = 1, 20 do
          assert.equal("OK", tasks[i]:wait())
        end
      end
      -- a slot opens its connection when its turn comes (one attempt at a
      -- time until the server answered it)
      servers.wait_for(function()
        burst()
        return clients() == 3
      end, 10, "3 connections")
      burst()
      assert.equal(3, clients())
      r:close()
      servers.wait_for(function() return clients() == 0 end, 10,
                       "the connections to close")
    end)

    it("a concurrent burst against a server that closes every connection"
       .. " makes one connect, not one per slot", function()
      local dir = servers.mktemp()
      local port = servers.free_port()
      local log = dir .. "/closing.log"
      proc.spawn({ "python3", "spec/support/closing_listener.py",
                   tostring(port), log }, { watchdog = true })
      servers.wait_for(function()
        return slow_http.lines(log)[1] == "ready"
      end, 10, "the closing listener")
      local h = rcore.new("127.0.0.1", port, { pool = 4 })
      local tasks = {}
      for i = 1, 40 do
        tasks[i] = paygate.spawn(function() return h:call("PING") end)
      end
      for i = 1, 40 do
        local v, err = tasks[i]:wait()
        assert.is_nil(v)
        assert.equal("unavailable", err.kind)
      end
      local accepts = #slow_http.lines(log) - 1
      assert.truthy(accepts >= 1 and accepts <= 2, accepts .. " connects")
      h:close()
      servers.sh("rm -rf " .. dir)
    end)
  end)

  describe("blocking commands", function()
    it("a GET from another coroutine answers while a BLPOP blocks",
       function()
      -- one connection: before, the GET queued behind the BLPOP on it
      local r = assert(redis.connect(srv.url, { pool = 1 }))
      assert(r:call("SET", "k", "v"))
      local popped = false
      local t = paygate.spawn(function()
        local v, err = r:call("BLPOP", "q", 10)
        popped = true
        return v, err
      end)
      servers.wait_for(function() return blocked() == 1 end, 10,
                       "the BLPOP to block")
      assert.equal("v", r:call("GET", "k"))
      assert.is_false(popped)
      assert.equal(1, admin:call("LPUSH", "q", "x"))
      local v, err = t:wait()
      assert.same({ "q", "x" }, v, tostring(err))
      r:close()
    end)

    it("a block longer than timeout is no timeout", function()
      local r = assert(redis.connect(srv.url, { pool = 1, timeout = 1 }))
      local function past_timeout()
        -- the reply timeout's window (1 s, checked every 0.1 s) passes
        -- while the command blocks
        local t0 = paygate.now()
        servers.wait_for(function() return paygate.now() - t0 > 2 end, 10,
                         "the timeout's window to pass")
      end

      local t = paygate.spawn(function() return r:call("blpop", "q", 10) end)
      servers.wait_for(function() return blocked() == 1 end, 10,
                       "the BLPOP to block")
      past_timeout()
      assert.equal(1, admin:call("LPUSH", "q", "x"))
      local v, err = t:wait()
      assert.same({ "q", "x" }, v, tostring(err))

      assert(r:call("XADD", "s", "*", "f", "1"))
      t = paygate.spawn(function()
        return r:call("XREAD", "COUNT", 1, "BLOCK", 10000, "STREAMS", "s",
                      "$")
      end)
      servers.wait_for(function() return blocked() == 1 end, 10,
                       "the XREAD to block")
      past_timeout()
      local id = assert(admin:call("XADD", "s", "*", "f", "2"))
      v, err = t:wait()
      assert.is_table(v, tostring(err))
      assert.equal("s", v[1][1])
      assert.equal(id, v[1][2][1][1])
      assert.same({ "f", "2" }, v[1][2][1][2])
      r:close()
    end)

    it("runs on a connection of its own, closed after its reply",
       function()
      local r = assert(redis.connect(srv.url, { pool = 1 }))
      assert.equal("PONG", r:call("PING"))
      assert.equal(1, clients())
      local t = paygate.spawn(function() return r:call("BLPOP", "q", 10) end)
      servers.wait_for(function() return blocked() == 1 end, 10,
                       "the BLPOP to block")
      assert.equal(2, clients())
      assert.equal(1, admin:call("LPUSH", "q", "x"))
      assert.same({ "q", "x" }, t:wait())
      servers.wait_for(function() return clients() == 1 end, 10,
                       "the BLPOP's connection to close")
      -- a block that ends without a value: closed too
      assert.equal(redis.null, r:call("BRPOP", "q", 0.05))
      servers.wait_for(function() return clients() == 1 end, 10,
                       "the BRPOP's connection to close")
      r:close()
    end)

    it("at most max_blocking at once: one more fails busy at once, and the"
       .. " server sees no more connections", function()
      local r = assert(redis.connect(srv.url, { pool = 1, max_blocking = 2 }))
      assert.equal("PONG", r:call("PING"))
      assert.equal(1, clients())
      -- three coroutines BLPOP an empty list at once
      local results, tasks = {}, {}
      for i = 1, 3 do
        tasks[i] = paygate.spawn(function()
          local v, err = r:call("BLPOP", "q", 10)
          results[i] = { v = v, err = err }
        end)
      end
      local refused
      servers.wait_for(function()
        for i = 1, 3 do
          if results[i] then
            refused = i
          end
        end
        return refused ~= nil
      end, 5, "a BLPOP to be refused")
      local err = results[refused].err
      assert.is_nil(results[refused].v)
      assert.equal("busy", err.kind)
      assert.is_true(err.retryable)
      assert.truthy(err.message:find("BLPOP refused", 1, true), err.message)
      assert.truthy(err.message:find("(max_blocking = 2,", 1, true),
                    err.message)
      servers.wait_for(function() return blocked() == 2 end, 10,
                       "the other two to block")
      local done = 0
      for i = 1, 3 do
        done = done + (results[i] and 1 or 0)
      end
      assert.equal(1, done)
      -- the pool's connection and two of their own, not a third
      assert.equal(3, clients())
      local list = assert(admin:call("CLIENT", "LIST"))
      local _, blpops = list:gsub("cmd=blpop", "")
      assert.equal(2, blpops, list)
      -- the client serves other commands meanwhile
      assert.equal("PONG", r:call("PING"))
      -- the two blocked ones take the values pushed
      assert.equal(2, admin:call("RPUSH", "q", "a", "b"))
      local got = {}
      for i = 1, 3 do
        tasks[i]:wait()
        if i ~= refused then
          assert.is_table(results[i].v, tostring(results[i].err))
          got[#got + 1] = results[i].v[2]
        end
      end
      table.sort(got)
      assert.same({ "a", "b" }, got)
      -- their connections closed, the slots are free again
      servers.wait_for(function() return clients() == 1 end, 10,
                       "the BLPOPs' connections to close")
      local t = paygate.spawn(function() return r:call("BLPOP", "q", 10) end)
      servers.wait_for(function() return blocked() == 1 end, 10,
                       "a BLPOP to block again")
      assert.equal(1, admin:call("LPUSH", "q", "c"))
      assert.same({ "q", "c" }, t:wait())
      r:close()
      -- from the URL too; a blocking XREAD counts as well
      r = assert(redis.connect(srv.url .. "?max_blocking=1&pool=1"))
      t = paygate.spawn(function() return r:call("BRPOP", "q", 10) end)
      servers.wait_for(function() return blocked() == 1 end, 10,
                       "the BRPOP to block")
      local v
      v, err = r:call("XREAD", "BLOCK", 10000, "STREAMS", "s", "$")
      assert.is_nil(v)
      assert.equal("busy", err.kind)
      assert.truthy(err.message:find("(max_blocking = 1,", 1, true),
                    err.message)
      assert.equal(1, admin:call("LPUSH", "q", "d"))
      assert.same({ "q", "d" }, t:wait())
      r:close()
    end)

    it("a move to another address fails a blocked command unavailable",
       function()
      local other = servers.redis()
      local h = rcore.new("127.0.0.1", srv.port, { pool = 1 })
      local t = paygate.spawn(function()
        return h:call_blocking(math.huge, "BLPOP", "q", 0)
      end)
      servers.wait_for(function() return blocked() == 1 end, 10,
                       "the BLPOP to block")
      h:set_addr("127.0.0.1", other.port)
      local v, err = t:wait()
      assert.is_nil(v)
      assert.equal("unavailable", err.kind)
      servers.wait_for(function() return clients() == 0 end, 10,
                       "the BLPOP's connection to close")
      assert.equal("PONG", h:call("PING"))
      h:close()
    end)

    it("in a pipeline raises: a pipeline shares its connection", function()
      local r = assert(redis.connect(srv.url, { timeout = 2 }))
      for _, cmd in ipairs({ { "BLPOP", "q", 1 }, { "bzpopmin", "z", 1 },
                             { "BLMPOP", 1, 1, "q", "LEFT" },
                             { "XREAD", "BLOCK", 100, "STREAMS", "s", "$" },
                             { "XREADGROUP", "GROUP", "g", "c", "BLOCK", 0,
                               "STREAMS", "s", ">" } }) do
        local ok, err = pcall(function()
          r:pipeline({ { "SET", "a", 1 }, cmd })
        end)
        assert.is_false(ok, cmd[1])
        assert.truthy(tostring(err):find("redis_pool_spec.lua:", 1, true),
                      err)
        assert.truthy(tostring(err):find("client:pipeline: cmds[2] ("
                      .. cmd[1]:upper() .. ") blocks", 1, true), err)
      end
      -- nothing was sent
      assert.equal(redis.null, r:call("GET", "a"))
      -- without BLOCK, XREAD answers at once
      assert(r:call("XADD", "s", "*", "f", "1"))
      local res = assert(r:pipeline({ { "XREAD", "COUNT", 1, "STREAMS",
                                        "s", "0" } }))
      assert.equal("s", res[1][1][1])
      -- WAIT counts the pipeline's writes: allowed, shorter than timeout
      res = assert(r:pipeline({ { "SET", "a", 1 }, { "WAIT", 0, 100 } }))
      assert.same({ "OK", 0 }, res)
      for _, ms in ipairs({ 0, 2000 }) do
        assert.has_error(function()
          r:pipeline({ { "SET", "a", 1 }, { "WAIT", 0, ms } })
        end)
      end
      r:close()
    end)

    it("WAIT, pub/sub and MONITOR through call raise", function()
      local r = assert(redis.connect(srv.url))
      call_raises(r, { { "WAIT", 0, 100 }, { "waitaof", 1, 0, 100 },
                       { "SUBSCRIBE", "ch" }, { "psubscribe", "c*" },
                       { "MONITOR" } })
      local ok = pcall(function() r:pipeline({ { "SUBSCRIBE", "ch" } }) end)
      assert.is_false(ok)
      -- the client serves on
      assert.equal("PONG", r:call("PING"))
      r:close()
    end)

    it("commands that change the shared connection raise; a transaction"
       .. " goes in one pipeline", function()
      local r = assert(redis.connect(srv.url))
      call_raises(r, { { "SELECT", 1 }, { "auth", "pw" }, { "HELLO", 3 },
                       { "QUIT" }, { "RESET" }, { "client", "reply", "off" },
                       { "MULTI" }, { "exec" }, { "WATCH", "k" } })
      for _, cmd in ipairs({ { "SELECT", 1 }, { "CLIENT", "REPLY", "SKIP" },
                             { "HELLO", 3 } }) do
        local ok, err = pcall(function()
          r:pipeline({ { "PING" }, cmd })
        end)
        assert.is_false(ok, cmd[1])
        assert.truthy(tostring(err):find("client:pipeline: cmds[2]", 1, true),
                      err)
      end
      -- nothing was sent: db 0 still, replies still in step
      assert.equal("OK", r:call("SET", "where", "db0"))
      local res = assert(r:pipeline({ { "MULTI" }, { "INCR", "tx" },
                                      { "INCR", "tx" }, { "EXEC" } }))
      assert.same({ 1, 2 }, res[4])
      assert.equal("db0", r:call("GET", "where"))
      assert.equal("PONG", r:call("PING"))
      assert.equal("OK", r:call("CLIENT", "SETNAME", "still-fine"))
      r:close()
    end)
  end)
end)
