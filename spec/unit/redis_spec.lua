-- paygate.redis against a real redis-server on loopback.
local redis = require "paygate.redis"
local paygate = require "paygate"
local servers = require "spec.support.servers"

describe("paygate.redis", function()
  local srv, r

  setup(function()
    srv = servers.redis()
    r = assert(redis.connect(srv.url))
  end)

  teardown(function()
    if r then
      r:close()
    end
    servers.stop_all()
  end)

  describe("connect", function()
    it("fails with unavailable when nothing listens", function()
      local c, err = redis.connect("redis://127.0.0.1:1")
      assert.is_nil(c)
      assert.equal("unavailable", err.kind)
      assert.is_true(err.retryable)
    end)

    it("raises on a mistyped option, naming it", function()
      for name, v in pairs({ password = {}, pool = "x", timeout = 0,
                             connect_timeout = "1", db = -1,
                             max_blocking = 0, max_reply = -1 }) do
        local ok, err = pcall(redis.connect, srv.url, { [name] = v })
        assert.is_false(ok, name)
        assert.truthy(tostring(err):find("redis.connect: opts." .. name
                                         .. " must be", 1, true), err)
      end
      -- a bound under a value's own cost would refuse every reply
      local ok, err = pcall(redis.connect, srv.url, { max_reply = 55 })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("opts.max_reply must be 0 (the"
                                       .. " default", 1, true), err)
      assert(redis.connect(srv.url, { max_reply = 1024 })):close()
      ok, err = pcall(redis.connect, srv.url, { passwd = "x" })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("unknown option opts.passwd", 1,
                                       true), err)
      ok, err = pcall(redis.connect, srv.url .. "?pool=many")
      assert.is_false(ok)
      assert.truthy(tostring(err):find("opts.pool must be", 1, true), err)
      -- a lease's WAIT would outlast the reply timeout, dropping the
      -- connection under it and every command pipelined behind
      ok, err = pcall(redis.connect, srv.url, { timeout = 1,
                                                lease_wait = 1 })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("opts.lease_wait (1 s) must be"
        .. " shorter than opts.timeout (1 s)", 1, true), err)
      -- the default follows a short timeout
      local c = assert(redis.connect(srv.url, { timeout = 0.4 }))
      assert.equal(0.2, c.lease_wait)
      c:close()
    end)

    it("takes lease_unsafe from the URL as a boolean, and raises on"
       .. " another value", function()
      local u = assert(redis.connect(srv.url .. "?lease_unsafe=true"))
      assert.is_true(u.lease_unsafe)
      u:close()
      local ok, err = pcall(redis.connect, srv.url .. "?lease_unsafe=yes")
      assert.is_false(ok)
      assert.truthy(tostring(err):find("opts.lease_unsafe must be a"
                                       .. " boolean", 1, true), err)
      ok, err = pcall(redis.connect, srv.url, { lease_unsafe = 1 })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("opts.lease_unsafe", 1, true), err)
    end)

    it("raises a bad lease option at the caller's line", function()
      for _, o in ipairs({ { lease_replicas = 1.5 }, { lease_replicas = -1 },
                           { lease_unsafe = 1 } }) do
        local ok, err = pcall(function()
          redis.connect("redis://127.0.0.1:1", o)
        end)
        assert.is_false(ok)
        assert.truthy(tostring(err):find("redis_spec.lua:", 1, true), err)
      end
    end)

    it("raises on a url that is not redis://", function()
      assert.has_error(function() redis.connect("http://x") end)
      -- TLS was asked for: refuse rather than talk plain text
      assert.has_error(function() redis.connect("rediss://127.0.0.1:6379") end)
    end)
  end)

  describe("call", function()
    it("classifies error replies", function()
      local res, err = r:call("NOSUCHCOMMAND")
      assert.is_nil(res)
      assert.equal("syntax", err.kind)
      assert(r:call("SET", "str", "x"))
      res, err = r:call("LPUSH", "str", "y")
      assert.is_nil(res)
      assert.equal("constraint", err.kind)
      assert.equal("WRONGTYPE", err.code)
    end)

    it("maps replies to Lua values", function()
      assert.equal("OK", r:call("SET", "k", 42))
      assert.equal("42", r:call("GET", "k"))
      assert.equal(43, r:call("INCR", "k"))
      assert.equal(redis.null, r:call("GET", "missing"))
      assert(r:call("DEL", "l"))
      assert.equal(2, r:call("RPUSH", "l", "a", "b"))
      assert.same({ "a", "b" }, r:call("LRANGE", "l", 0, -1))
    end)

    it("sends integral numbers with every digit", function()
      -- tostring() would give "1.2345678901235e+14".
      assert(r:call("SET", "bigint", 123456789012345))
      assert.equal("123456789012345", r:call("GET", "bigint"))
      assert(r:call("SET", "bigint", 2^53))
      assert.equal("9007199254740992", r:call("GET", "bigint"))
      assert.equal(2^53, r:call("INCRBY", "bigint", 0))
      local res = assert(r:pipeline({ { "SET", "bigint", -100000000000001 },
                                      { "GET", "bigint" } }))
      assert.equal("-100000000000001", res[2])
      assert(r:call("SET", "real", 0.5))
      assert.equal("0.5", r:call("GET", "real"))
    end)

    it("returns integer replies past 2^53 exactly, as decimal strings", function()
      assert(r:call("SET", "i64", "9007199254740992"))
      assert.equal(2^53, r:call("INCRBY", "i64", 0))
      assert.equal("9007199254740993", r:call("INCR", "i64"))
      assert(r:call("SET", "i64", "-9223372036854775807"))
      assert.equal("-9223372036854775808", r:call("DECR", "i64"))
      local res = assert(r:pipeline({ { "SET", "i64", "9223372036854775806" },
                                      { "INCR", "i64" } }))
      assert.equal("9223372036854775807", res[2])
      assert.equal(-2^53, r:call("DECRBY", "neg", 2^53))
    end)

    it("keeps binary-safe values", function()
      local v = "a\0b\r\n\255"
      assert(r:call("SET", "bin", v))
      assert.equal(v, r:call("GET", "bin"))
    end)

    it("refuses a reply past max_reply, and serves on", function()
      local big = string.rep("v", 2097152)
      assert.equal("OK", r:call("SET", "max_reply", big))
      assert.equal(big, r:call("GET", "max_reply"))   -- within 64 MiB
      local args = { "RPUSH", "max_reply_list" }
      for i = 1, 1000 do
        args[#args + 1] = string.rep("x", 60) .. i
      end
      assert(r:pipeline({ { "DEL", "max_reply_list" }, args, args }))
      -- 0: the default
      local c = assert(redis.connect(srv.url, { max_reply = 0 }))
      assert.equal(big, c:call("GET", "max_reply"))
      c:close()
      c = assert(redis.connect(srv.url .. "?max_reply=65536",
                               { pool = 1 }))
      for _, case in ipairs({
        { { "GET", "max_reply" }, "a bulk string of 2097152 bytes, past"
                                  .. " max_reply (65536 bytes)" },
        -- its elements are counted on its header (56 bytes each), and
        -- then their strings (1000 of some 60 bytes)
        { { "LRANGE", "max_reply_list", 0, -1 }, "an array of 2000"
                                  .. " elements, past max_reply (65536 bytes)" },
        { { "LRANGE", "max_reply_list", 0, 999 }, "a reply past max_reply"
                                  .. " (65536 bytes)" },
      }) do
        local res, err = c:call(table.unpack(case[1]))
        assert.is_nil(res, case[2])
        assert.equal("unavailable", err.kind, case[2])
        assert.equal("redis: Protocol error: " .. case[2], err.message)
        assert.equal("PONG", c:call("PING"))
      end
      assert.equal(100, #c:call("LRANGE", "max_reply_list", 0, 99))
      c:close()
    end)

    -- A refusal on a connection's first reply counted as a failed
    -- connect: the client backed off, and every command failed "not
    -- connected: next attempt in ..." for up to 2 s, though the server
    -- answered (only our bound refused what it said).
    it("backs off for no reply past max_reply, even a connection's first",
       function()
      assert.equal("OK", r:call("SET", "max_reply_first",
                                string.rep("v", 4096)))
      local c = assert(redis.connect(srv.url, { pool = 1,
                                                max_reply = 1024 }))
      for i = 1, 3 do
        -- the second one is the first reply on the connection it opens
        local res, err = c:call("GET", "max_reply_first")
        assert.is_nil(res, i)
        assert.equal("redis: Protocol error: a bulk string of 4096 bytes,"
                     .. " past max_reply (1024 bytes)", err.message, i)
      end
      -- served at once, on a new connection
      assert.equal("PONG", c:call("PING"))
      assert.equal(4096, #r:call("GET", "max_reply_first"))
      c:close()
    end)

    it("serves 100 concurrent coroutines", function()
      local tasks = {}
      for i = 1, 100 do
        tasks[i] = paygate.spawn(function()
          assert(r:call("SET", "c" .. i, i))
          return r:call("GET", "c" .. i)
        end)
      end
      for i = 1, 100 do
        assert.equal(tostring(i), tasks[i]:wait())
      end
    end)
  end)

  describe("pipeline", function()
    it("returns one slot per command, errors in their slot", function()
      assert(r:call("DEL", "p"))
      local res = assert(r:pipeline({
        { "SET", "p", 1 }, { "INCR", "p" }, { "LPUSH", "p", "x" },
        { "GET", "p" },
      }))
      assert.equal(4, #res)
      assert.equal("OK", res[1])
      assert.equal(2, res[2])
      assert.is_true(redis.is_error(res[3]))
      assert.equal("constraint", res[3].kind)
      assert.equal("2", res[4])
    end)

    it("raises on a malformed command list", function()
      assert.has_error(function() r:pipeline({ "GET" }) end)
    end)

    it("raises on a bad argument before sending any command", function()
      -- one connection: the GET below is answered after anything sent
      local one = assert(redis.connect(srv.url, { pool = 1 }))
      assert(one:call("DEL", "half"))
      assert.has_error(function()
        one:pipeline({ { "SET", "half", "1" }, { "SET", "x", {} } })
      end)
      assert.equal(redis.null, one:call("GET", "half"))
      -- and the client still answers pipelines
      assert.same({ "OK", "1" }, one:pipeline({ { "SET", "half", "1" },
                                                { "GET", "half" } }))
      one:close()
    end)
  end)

  -- A command from a coroutine that cannot yield (inside string.gsub's
  -- callback, table.sort's comparator) used to be sent before the yield
  -- was refused: it ran while the caller was told that the call raised.
  it("sends nothing for a caller that cannot yield", function()
    -- one connection: the GET below is answered after anything sent
    local one = assert(redis.connect(srv.url, { pool = 1 }))
    assert(one:call("DEL", "ny1", "ny2"))
    for _, fn in ipairs({
      function() one:call("SET", "ny1", "1") end,
      function() one:pipeline({ { "SET", "ny2", "1" } }) end,
    }) do
      local ok, err = pcall(string.gsub, "x", "x", fn)
      assert.is_false(ok)
      assert.matches("yield", tostring(err))
    end
    assert.same({ redis.null, redis.null }, one:pipeline({ { "GET", "ny1" },
                                                           { "GET", "ny2" } }))
    one:close()
  end)

  describe("close", function()
    it("fails pending commands with closed, waking them after close returns", function()
      local one = assert(redis.connect(srv.url, { pool = 1 }))
      local woke = false
      local waiter = paygate.spawn(function()
        local v, err = one:call("BLPOP", "never-pushed", 5)
        woke = true
        return v, err
      end)
      paygate.sleep(0.05)               -- let the BLPOP reach the server
      one:close()
      -- not resumed from inside close(): that would run it inside us
      assert.is_false(woke)
      local v, err = waiter:wait()
      assert.is_nil(v)
      assert.is_truthy(({ closed = true, unavailable = true })[err.kind], err.kind)
      assert.has_error(function() one:call("PING") end)
    end)
  end)

  describe("set_addr", function()
    -- a connection retired while still connecting: its connect finishing
    -- (or failing: hiredis then frees it) before the retired one is freed
    -- on the next loop turn must not touch the slot or free it twice
    it("moves while connections are still being made, and serves on", function()
      local rcore = require "paygate.redis.core"
      local port = tonumber(srv.url:match(":(%d+)"))
      local closed = servers.free_port()
      local h = rcore.new("127.0.0.1", port, { pool = 1, timeout = 2,
                                               connect_timeout = 2 })
      for i = 1, 200 do
        local from = i % 2 == 0 and closed or port
        h:set_addr("127.0.0.1", from)
        local t = paygate.spawn(function() return h:call("PING") end)
        h:set_addr("127.0.0.1", port)       -- retires the new connection
        local v, err = t:wait()
        assert(v == "PONG" or (err and err.kind == "unavailable"),
               tostring(v) .. " " .. tostring(err))
        assert.equal("PONG", h:call("PING"))
      end
      h:close()
    end)

    -- what a Sentinel failover does: the old master kills its clients
    -- (CLIENT KILL) just as the client moves; hiredis frees a context the
    -- server closed, so the retired one must not be freed again
    it("moves off a connection the server has just closed", function()
      local rcore = require "paygate.redis.core"
      local port = tonumber(srv.url:match(":(%d+)"))
      local h = rcore.new("127.0.0.1", port, { pool = 1 })
      for _ = 1, 20 do
        local id = assert(h:call("CLIENT", "ID"))
        -- blocking: the loop does not see the close before set_addr
        local out = servers.read_cmd("redis-cli -p " .. port
                                     .. " CLIENT KILL ID " .. id)
        assert.truthy(out:match("1"), out)
        h:set_addr("127.0.0.1", port)
        assert.equal("PONG", h:call("PING"))
      end
      h:close()
    end)
  end)

  describe("script", function()
    it("runs by EVALSHA and reloads after SCRIPT FLUSH", function()
      local incr = r:script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
      assert(r:call("DEL", "n"))
      assert.equal(5, incr({ "n" }, { 5 }))
      assert.equal(1, r:call("SCRIPT", "EXISTS", incr.sha)[1])
      assert.equal(10, incr({ "n" }, { 5 }))
      assert(r:call("SCRIPT", "FLUSH"))
      assert.equal(0, r:call("SCRIPT", "EXISTS", incr.sha)[1])
      assert.equal(15, incr({ "n" }, { 5 }))
      assert.equal(1, r:call("SCRIPT", "EXISTS", incr.sha)[1])
    end)

    it("reports a script error", function()
      local bad = r:script("return redis.call('NOPE')")
      local res, err = bad({}, {})
      assert.is_nil(res)
      assert.truthy(err.message:find("NOPE", 1, true) or err.message:find("Unknown", 1, true))
    end)
  end)

  describe("timeout", function()
    it("fails a command that gets no reply within the timeout", function()
      local c = assert(redis.connect(srv.url, { timeout = 0.2, pool = 1 }))
      local port = tonumber(srv.url:match(":(%d+)"))
      -- the server holds writes back (a blocking command would not do:
      -- it gets its block time on top of the timeout)
      assert.truthy(servers.read_cmd("redis-cli -p " .. port
                    .. " CLIENT PAUSE 10000 WRITE"):match("OK"))
      local t0 = paygate.now()
      local res, err = c:call("SET", "paused", "x")
      servers.read_cmd("redis-cli -p " .. port .. " CLIENT UNPAUSE")
      assert.is_nil(res)
      -- a write that was sent: the server may run it later
      assert.equal("unknown_outcome", err.kind)
      assert.is_false(err.retryable)
      assert.equal("timeout", err.cause)
      assert.truthy(err.message:find("^redis: no reply within 0.2 s %(the"
                                     .. " command was sent: it may have"
                                     .. " been applied"), err.message)
      assert.truthy(paygate.now() - t0 < 5)
      -- a read held back the same way is a plain timeout (retryable)
      assert.truthy(servers.read_cmd("redis-cli -p " .. port
                    .. " CLIENT PAUSE 10000 ALL"):match("OK"))
      res, err = c:call("GET", "paused")
      servers.read_cmd("redis-cli -p " .. port .. " CLIENT UNPAUSE")
      assert.is_nil(res)
      assert.equal("timeout", err.kind)
      assert.is_true(err.retryable)
      assert.equal("redis: no reply within 0.2 s", err.message)
      -- and the client reconnects for the next command
      assert.equal("PONG", c:call("PING"))
      c:close()
    end)
  end)

  describe("close", function()
    it("is safe to call twice; later calls raise", function()
      local c = assert(redis.connect(srv.url))
      c:close()
      c:close()
      assert.has_error(function() c:call("PING") end)
    end)
  end)
end)
