-- Errors of paygate.sql, paygate.redis, paygate.lease and paygate.migrate:
--  * misuse (a wrong argument type) raises a message that names the public
--    function and the argument, positioned at the caller (this file), not
--    inside lua/paygate/;
--  * an expected failure is the one error shape (core.error): tostring
--    gives "kind: message".
-- The calls in the tables below are statements, not `return f()`: a tail
-- call would take this file's frame off the stack.
local core = require "paygate.core"
local sql = require "paygate.sql"
local redis = require "paygate.redis"
local lease = require "paygate.lease"
local migrate = require "paygate.migrate"
local servers = require "spec.support.servers"

local tmp = servers.mktemp()
local redis_srv

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

local HERE = "store_errors_spec%.lua:%d+: "

local function pack(...)
  return { n = select("#", ...), ... }
end

local function escape(s)
  return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0"))
end

-- Runs each case's fn; it must raise "<this file>:<line>: <prefix>...".
local function check_cases(cases)
  for _, c in ipairs(cases) do
    local ok, msg = pcall(c[2])
    assert.is_false(ok, c[1] .. " did not raise")
    assert.is_string(msg, c[1] .. " raised a " .. type(msg))
    assert.truthy(msg:find("^[^\n]*" .. HERE .. escape(c[3])),
                  c[1] .. ": got " .. msg)
    -- the message names the caller's line, not the library's (a raise
    -- inside db:transaction carries its traceback after the message, as
    -- a traceback lists every frame: the message line is what is judged)
    local line = msg:match("^[^\n]*")
    assert.is_nil(line:find("lua/paygate/", 1, true), c[1] .. ": " .. msg)
  end
end

describe("paygate.sql misuse", function()
  local db, url

  setup(function()
    url = "sqlite:" .. tmp .. "/e.db"
    db = assert(sql.open(url))
    assert(db:exec_script("CREATE TABLE t (v TEXT)"))
  end)
  teardown(function() db:close() end)

  -- (option values are checked by the engines: see sql_spec)
  it("sql.open checks its arguments", function()
    check_cases({
      { "url", function() sql.open(1) end, "sql.open: url must be a string" },
      -- the type it got: a config's db key unset (was: no word of nil)
      { "url nil", function() sql.open(nil) end, "sql.open: url must be a"
        .. " string (sqlite:PATH or postgres://...), got nil" },
      { "opts", function() sql.open(url, "text") end,
        "sql.open: opts must be a table" },
      { "scheme", function() sql.open("mysql://x/y") end,
        "sql.open: unknown url scheme" },
      { "path", function() sql.open("sqlite:") end,
        "sql.open: sqlite url needs a path" },
    })
  end)

  it("db methods check self, sql and params", function()
    check_cases({
      { "query sql", function() db:query(1) end,
        "db:query: sql must be a string" },
      { "query params", function() db:query("SELECT 1", "x") end,
        "db:query: params must be a table" },
      { "query param", function() db:query("SELECT $1", { {} }) end,
        "db:query: params[1] cannot be bound (a table" },
      { "query param n", function()
          db:query("SELECT $1, $2, $3", { n = 3, 1, nil, print })
        end, "db:query: params[3] cannot be bound (a function" },
      { "query self", function() db.query("SELECT 1") end,
        "db:query: call it as db:query(...)" },
      { "exec sql", function() db:exec(nil) end,
        "db:exec: sql must be a string" },
      { "exec params", function() db:exec("DELETE FROM t", 5) end,
        "db:exec: params must be a table" },
      { "exec self", function() db.exec({}, "DELETE FROM t") end,
        "db:exec: call it as db:exec(...)" },
      { "exec_script", function() db:exec_script({}) end,
        "db:exec_script: sql must be a string" },
      { "transaction fn", function() db:transaction("x") end,
        "db:transaction: fn must be a function" },
      { "transaction opts", function() db:transaction(print, 3) end,
        "db:transaction: opts must be a table" },
      { "transaction retries", function()
          db:transaction(print, { retries = 1.5 })
        end, "db:transaction: opts.retries must be an integer >= 1" },
      { "transaction query_timeout", function()
          db:transaction(print, { query_timeout = 0 })
        end, "db:transaction: opts.query_timeout must be a number > 0" },
      { "transaction self", function() db.transaction(print) end,
        "db:transaction: call it as db:transaction(...)" },
      { "stats self", function() db.stats() end,
        "db:stats: call it as db:stats(...)" },
      { "close self", function() db.close() end,
        "db:close: call it as db:close()" },
    })
  end)

  it("tx methods check their arguments inside a transaction", function()
    local function in_tx(body)
      return function() db:transaction(body) end
    end
    check_cases({
      { "tx:query", in_tx(function(tx) tx:query(false) end),
        "tx:query: sql must be a string" },
      { "tx:query params", in_tx(function(tx) tx:query("SELECT 1", 1) end),
        "tx:query: params must be a table" },
      { "tx:exec", in_tx(function(tx) tx:exec("SELECT $1", { {} }) end),
        "tx:exec: params[1] cannot be bound" },
      { "tx:exec self", in_tx(function(tx) tx.exec("SELECT 1") end),
        "tx:exec: call it as tx:exec(...)" },
      { "tx:exec_script", in_tx(function(tx) tx:exec_script(1) end),
        "tx:exec_script: sql must be a string" },
      { "tx:transaction", in_tx(function(tx) tx:transaction(print) end),
        "tx:transaction: nested transactions are not supported" },
    })
  end)

  it("a closed db raises naming the method", function()
    local d = assert(sql.open("sqlite:" .. tmp .. "/closed.db"))
    d:close()
    d:close()                            -- safe twice
    check_cases({
      { "closed query", function() d:query("SELECT 1") end,
        "db:query: db is closed" },
      { "closed exec", function() d:exec("SELECT 1") end,
        "db:exec: db is closed" },
      { "closed transaction", function() d:transaction(print) end,
        "db:transaction: db is closed" },
    })
  end)

  it("failures print as kind: message", function()
    local rows, err = db:query("SELECT * FROM nope")
    assert.is_nil(rows)
    assert.is_true(core.is_error(err))
    assert.equal("syntax: ", tostring(err):sub(1, 8))
  end)

  it("a SQLite file that cannot be opened is named, with its folder's fault",
     function()
    -- SQLite alone says "unable to open database file": which, and why?
    local cases = {
      { tmp .. "/nodir/x.db", "its folder " .. tmp .. "/nodir: No such file"
        .. " or directory (sql.open makes the file, not the folder)" },
      { tmp .. "/e.db/x.db", "its folder " .. tmp .. "/e.db: Not a"
        .. " directory" },
    }
    for _, c in ipairs(cases) do
      local db2, err = sql.open("sqlite:" .. c[1])
      assert.is_nil(db2)
      assert.is_true(core.is_error(err))
      assert.equal("unavailable", err.kind)
      assert.matches("unable to open database file " .. c[1] .. ": "
                     .. c[2], err.message, 1, true)
    end
  end)

  it("a malformed postgres url's error does not quote its password",
     function()
    -- libpq's parse error quotes the bad token, here the password
    local db2, err = sql.open("postgresql://u:s3cr%zzet@127.0.0.1/db")
    assert.is_nil(db2)
    assert.is_true(core.is_error(err))
    assert.matches("bad connection string", err.message, 1, true)
    assert.is_nil(tostring(err):find("s3cr", 1, true), tostring(err))
  end)

  it("db:transaction rolls back on return nil, err whatever err is",
     function()
    local ok, terr = db:transaction(function(tx)
      assert(tx:exec("INSERT INTO t (v) VALUES ('kept?')"))
      return nil, "plain"
    end)
    assert.is_nil(ok)
    assert.equal("plain", terr)
    assert.equal(0, db:query("SELECT count(*) AS c FROM t WHERE v = 'kept?'")
                 [1].c)
    -- return nil alone commits
    local r = pack(db:transaction(function(tx)
      assert(tx:exec("INSERT INTO t (v) VALUES ('kept')"))
      return nil
    end))
    assert.same({ n = 1 }, r)
    assert.equal(1, db:query("SELECT count(*) AS c FROM t WHERE v = 'kept'")
                 [1].c)
  end)

  it("sql.null and sql.now are paygate.core's", function()
    assert.same(sql.null, core.null)
    assert.equal(core.now, sql.now)
  end)
end)

describe("paygate.lease and paygate.migrate misuse", function()
  local db, l

  setup(function()
    db = assert(sql.open("sqlite:" .. tmp .. "/lm.db"))
    l = assert(lease.acquire(db, "k", 5))
  end)
  teardown(function() db:close() end)

  it("lease functions check their arguments", function()
    check_cases({
      { "acquire store", function() lease.acquire("db", "k", 5) end,
        "lease.acquire: store must be a paygate.sql db or a paygate.redis" },
      { "acquire key", function() lease.acquire(db, "", 5) end,
        "lease.acquire: key must be a non-empty string" },
      { "acquire ttl", function() lease.acquire(db, "k", "5") end,
        "lease.acquire: ttl must be a positive number of seconds" },
      { "acquire ttl 0", function() lease.acquire(db, "k", 0) end,
        "lease.acquire: ttl must be a positive number of seconds" },
      { "acquire opts", function() lease.acquire(db, "k", 5, "me") end,
        "lease.acquire: opts must be a table" },
      { "acquire owner", function()
          lease.acquire(db, "k", 5, { owner = 1 })
        end,
        "lease.acquire: opts.owner must be a non-empty string" },
      { "renew store", function() lease.renew(nil, l) end,
        "lease.renew: store must be" },
      { "renew l", function() lease.renew(db, "k") end,
        "lease.renew: l must be a lease returned by lease.acquire" },
      { "renew ttl", function() lease.renew(db, l, -1) end,
        "lease.renew: ttl must be a positive number of seconds" },
      { "release l", function() lease.release(db, {}) end,
        "lease.release: l must be a lease" },
      { "check tx", function() lease.check(db, "k", 1) end,
        "lease.check: tx must be the tx of a db:transaction" },
      { "check key", function()
          db:transaction(function(tx) lease.check(tx, 5, 1) end)
        end, "lease.check: key must be a non-empty string" },
      { "check token", function()
          db:transaction(function(tx) lease.check(tx, "k", {}) end)
        end, "lease.check: token must be a non-negative integer" },
      { "fenced_call client", function()
          lease.fenced_call(db, "k", 1, "GET", "x")
        end, "lease.fenced_call: client must be a paygate.redis client" },
    })
  end)

  it("migrate functions check their arguments", function()
    local dup = tmp .. "/dup"
    servers.sh("mkdir -p " .. dup .. "/sqlite && touch " .. dup
               .. "/sqlite/001_a.sql " .. dup .. "/sqlite/01_b.sql")
    check_cases({
      { "run db", function() migrate.run("db", "m") end,
        "migrate.run: db must be a paygate.sql db" },
      { "run dir", function() migrate.run(db, 5) end,
        "migrate.run: dir must be a string" },
      { "run dup", function() migrate.run(db, dup) end,
        "migrate.run: two migrations with version 1" },
      { "list dir", function() migrate.list(nil, "sqlite") end,
        "migrate.list: dir must be a string" },
      { "list engine", function() migrate.list("m", db) end,
        "migrate.list: engine must be a string" },
      { "list dup", function() migrate.list(dup, "sqlite") end,
        "migrate.list: two migrations with version 1" },
    })
  end)

  it("failures print as kind: message", function()
    local res, err = migrate.run(db, tmp .. "/none")
    assert.is_nil(res)
    assert.is_true(core.is_error(err))
    assert.truthy(tostring(err):find("^unavailable: migrate: "),
                  tostring(err))
    -- .sql files put in the folder itself: the message says where they go
    local flat = tmp .. "/flat"
    assert(os.execute("mkdir -p " .. flat) == 0)
    local f = assert(io.open(flat .. "/001_init.sql", "w"))
    f:write("CREATE TABLE t (x INTEGER);\n")
    f:close()
    res, err = migrate.run(db, flat)
    assert.is_nil(res)
    assert.truthy(tostring(err):find("put each engine's in its own folder, "
      .. flat .. "/sqlite/NNN_name.sql", 1, true), tostring(err))
    local l2, herr = lease.acquire(db, "k", 5)
    assert.is_nil(l2)
    assert.is_true(core.is_error(herr))
    assert.truthy(tostring(herr):find("^held: lease k is held"))
    assert.is_true(herr.retryable)
  end)
end)

if servers.have_redis() then
  describe("paygate.redis misuse", function()
    local c, fn

    setup(function()
      redis_srv = servers.redis()
      c = assert(redis.connect(redis_srv.url))
      fn = c:script("return 1")
    end)
    teardown(function() c:close() end)

    it("redis.connect checks its arguments", function()
      check_cases({
        { "url", function() redis.connect(6379) end,
          "redis.connect: url must be a string (redis://...), got number" },
        { "scheme", function() redis.connect("http://127.0.0.1") end,
          "redis.connect: url must start with redis://" },
        { "tls", function() redis.connect("rediss://127.0.0.1") end,
          "redis.connect: rediss:// (TLS) is not supported" },
        { "opts", function() redis.connect(redis_srv.url, 2) end,
          "redis.connect: opts must be a table" },
        { "db", function() redis.connect("redis://127.0.0.1/zero") end,
          "redis.connect: url must be redis://[password@]host[:port][/db]" },
      })
    end)

    it("a numeric password in the url is a password, not misuse", function()
      local ok, c3 = pcall(redis.connect, redis_srv.url .. "?password=1234")
      assert.is_true(ok, tostring(c3))
      if c3 then
        c3:close()
      end
    end)

    it("client methods and scripts check their arguments", function()
      check_cases({
        { "call cmd", function() c:call(1) end,
          "client:call: cmd must be a string" },
        { "call arg", function() c:call("SET", "k", {}) end,
          "client:call: argument 2 must be a string, number or boolean" },
        { "call self", function() c.call("GET", "k") end,
          "client:call: call it as client:call(...)" },
        { "pipeline", function() c:pipeline("GET k") end,
          "client:pipeline: cmds must be an array of commands" },
        { "pipeline cmd", function() c:pipeline({ "GET" }) end,
          "client:pipeline: cmds[1] must be an array starting with the" },
        { "pipeline arg", function()
            c:pipeline({ { "GET", "a" }, { "SET", "k", print } })
          end, "client:pipeline: cmds[2][3] must be a string, number or" },
        { "script", function() c:script(1) end,
          "client:script: src must be a string" },
        { "script keys", function() fn("k") end,
          "script: keys must be an array" },
        { "script args", function() fn({ "k" }, { {} }) end,
          "script: args[1] must be a string, number or boolean" },
        { "close self", function() c.close() end,
          "client:close: call it as client:close()" },
        { "fenced_call cmd", function() lease.fenced_call(c, "k", 1, 7) end,
          "lease.fenced_call: cmd must be a string" },
        { "fenced_call arg", function()
            lease.fenced_call(c, "k", 1, "SET", "x", {})
          end, "lease.fenced_call: argument 2 must be a string, number or" },
      })
    end)

    it("a closed client raises naming the method", function()
      local c2 = assert(redis.connect(redis_srv.url))
      local f2 = c2:script("return 2")
      c2:close()
      check_cases({
        { "closed call", function() c2:call("PING") end,
          "client:call: client is closed" },
        { "closed script", function() f2({}, {}) end,
          "script: client is closed" },
      })
    end)

    it("failures print as kind: message", function()
      assert(c:call("SET", "str", "v"))
      local res, err = c:call("LPUSH", "str", "x")
      assert.is_nil(res)
      assert.is_true(redis.is_error(err))
      assert.truthy(tostring(err):find("^constraint: "), tostring(err))
      local slots = assert(c:pipeline({ { "GET", "str" }, { "INCR", "str" } }))
      assert.equal("v", slots[1])
      assert.is_false(redis.is_error(slots[1]))
      assert.is_true(redis.is_error(slots[2]))
      assert.is_false(redis.is_error({ kind = "x", message = "y" }))
    end)
  end)
end
