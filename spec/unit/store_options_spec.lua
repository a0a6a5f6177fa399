-- sql.open type-checks every option on either engine: one options table
-- serves both, so a mistyped option of the other engine raises too
-- instead of passing unnoticed until the app moves to that engine.
local sql = require "paygate.sql"
local servers = require "spec.support.servers"

local tmp = servers.mktemp()

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

-- name -> wrong values (type, fraction, range)
local BAD = {
  retries = { "x", 0, 1.5 },
  readers = { "2", 0, 65 },
  batch_max = { "x", 0, 2.5 },
  busy_timeout = { "5", -1 },
  tx_timeout = { "x", -1, 1.5 },
  synchronous = { "x", 9, -1 },
  checkpoint_pages = { "x", 0, 1.5 },
  cache_mib = { "x", 0, 1.5, 65537 },
  pool = { "x", 0, 1.5, 33, true },
  connect_timeout = { "1", -1, 0 / 0, math.huge },
  query_timeout = { "x", 0, -1, 0 / 0 },
  down_for = { "x", -1, -math.huge },
}

local function raises(url, opts, want)
  local ok, err = pcall(sql.open, url, opts)
  assert.is_false(ok, want)
  err = tostring(err)
  assert.truthy(err:find(want, 1, true), err .. " lacks " .. want)
  -- at the caller's position, not inside paygate
  assert.truthy(err:find("store_options_spec.lua:%d+: "), err)
end

-- n rows into tbl's v, each the SQL expression value of i (1..n)
local function fill(db, tbl, n, value, params)
  assert(db:exec("WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1"
    .. " FROM s WHERE i < " .. n .. ") INSERT INTO " .. tbl .. " (v) SELECT "
    .. value .. " FROM s", params))
end

local function urls()
  local list = { sqlite = "sqlite:" .. tmp .. "/opts.db" }
  if servers.have_postgres() then list.postgres = servers.postgres().url end
  return list
end

describe("sql.open options", function()
  it("raises on every mistyped option on every engine, naming it", function()
    for engine, url in pairs(urls()) do
      for name, values in pairs(BAD) do
        for _, v in ipairs(values) do
          raises(url, { [name] = v }, "sql.open: opts." .. name .. " must be")
        end
      end
      raises(url, { pol = 4 }, "sql.open: unknown option opts.pol")
      if engine == "sqlite" then
        -- 0 turns PostgreSQL's limit off; SQLite's writer has no "off"
        raises(url, { tx_timeout = 0 },
               "sql.open: opts.tx_timeout must be a positive integer")
      else
        assert(sql.open(url, { tx_timeout = 0 })):close()
      end
      -- good values of the other engine's options are accepted
      local db = assert(sql.open(url, { pool = 2, query_timeout = 1,
        connect_timeout = 1, down_for = 0, readers = 1, batch_max = 8,
        busy_timeout = 0, tx_timeout = 100, synchronous = 1, retries = 2 }),
        engine)
      db:close()
    end
  end)

  it("checkpoint_pages: how many WAL pages a commit leaves before it"
     .. " copies them into the database", function()
    local function wal_after(pages)
      local path = tmp .. "/ck" .. pages .. ".db"
      local db = assert(sql.open("sqlite:" .. path .. "?checkpoint_pages="
                                 .. pages))
      assert(db:exec("CREATE TABLE t (v TEXT)"))
      for i = 1, 60 do
        assert(db:exec("INSERT INTO t (v) VALUES ($1)", { ("x"):rep(500)
                                                           .. i }))
      end
      local f = assert(io.open(path .. "-wal", "rb"))
      local size = f:seek("end")
      f:close()
      db:close()
      return size
    end
    -- 60 commits of a page or more each: kept in the log (about 250 KB),
    -- or copied after each commit and the log started over (a few pages)
    local kept, copied = wal_after(100000), wal_after(1)
    assert.truthy(kept > 60 * 4096, kept)
    assert.truthy(copied < 16 * 4096, copied)
  end)

  it("cache_mib: how much of the database the writer keeps in memory",
     function()
    -- 8 MB of rows written: the writer's page cache keeps what it touched
    -- up to cache_mib (32 by default); at 1 it holds about a MiB.
    -- (SQLite's own default, 2000 KiB, would hold about 2 MB.)
    local function cache_after(query)
      local path = tmp .. "/cache" .. query:gsub("%W", "") .. ".db"
      local db = assert(sql.open("sqlite:" .. path .. query))
      assert.equal(0, db:stats().cache_bytes)
      assert(db:exec("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)"))
      local row = ("x"):rep(1000)
      for _ = 1, 8 do
        fill(db, "t", 1000, "$1 || i", { row })
      end
      local bytes = db:stats().cache_bytes
      db:close()
      return bytes
    end
    local default, small = cache_after(""), cache_after("?cache_mib=1")
    assert.truthy(default > 6 * 1024 * 1024, default)
    assert.truthy(small < 1.5 * 1024 * 1024, small)
    assert.truthy(small > 256 * 1024, small)
  end)

  it("checks options given in a sqlite url's query string", function()
    local base = "sqlite:" .. tmp .. "/q.db"
    raises(base .. "?pool=four", nil, "sql.open: opts.pool must be")
    raises(base .. "?query_timeout=x", nil,
           "sql.open: opts.query_timeout must be")
    raises(base .. "?readers=0", nil, "sql.open: opts.readers must be")
    local db = assert(sql.open(base .. "?pool=4&readers=1"))
    db:close()
  end)

  it("checks options given in a postgres url's query string", function()
    if not servers.have_postgres() then
      pending("PostgreSQL is needed")
      return
    end
    local base = servers.postgres().url
    -- before: connect_timeout was rounded up for libpq before it was
    -- checked, so a word raised "bad argument #1 to 'ceil'" from inside
    -- paygate.sql, naming neither the option nor the caller's line
    raises(base .. "?connect_timeout=abc", nil,
           "sql.open: opts.connect_timeout must be")
    raises(base, { connect_timeout = true },
           "sql.open: opts.connect_timeout must be")
    raises(base .. "?pool=four", nil, "sql.open: opts.pool must be")
    raises(base .. "?query_timeout=x", nil,
           "sql.open: opts.query_timeout must be")
    raises(base .. "?tx_timeout=-5", nil, "sql.open: opts.tx_timeout must be")
    local db = assert(sql.open(base .. "?pool=2&connect_timeout=1.5"))
    db:close()
    -- a misspelt option is named, with the one it looks like (libpq's
    -- own refusal quotes it, and quoted text is blanked: it may be a
    -- value); the value is not shown
    for url, want in pairs({
      [base .. "?requre_sync=secretish"] = "sql.open: unknown option"
        .. " requre_sync in the postgres url (did you mean require_sync?)",
      [base .. "?sslmdoe=disable"] = "sql.open: unknown option sslmdoe in"
        .. " the postgres url (did you mean sslmode?)",
      [base .. "?colour=blue"] = "sql.open: unknown option colour in the"
        .. " postgres url" }) do
      local ok, err = pcall(function() local db = sql.open(url); return db end)
      assert.is_false(ok, url)
      err = tostring(err)
      assert.truthy(err:find(want, 1, true), err .. " lacks " .. want)
      assert.truthy(err:find("store_options_spec.lua:%d+: "), err)
      assert.falsy(err:find("secretish", 1, true), err)
    end
    -- libpq's own options go through
    db = assert(sql.open(base .. "?sslmode=disable&application_name=spec"))
    db:close()
    -- and so does ssl=true, the JDBC spelling libpq's URL reading takes
    -- for sslmode=require (no keyword of its own): the server here has
    -- no TLS, so libpq's refusal of the connection is what says it went
    -- through (before: raised 'unknown option ssl')
    local ok, h, err = pcall(sql.open, base .. "?ssl=true")
    assert.is_true(ok, tostring(h))
    if h then
      local _, qerr = h:query("SELECT 1")
      err = qerr
      h:close()
    end
    assert.truthy(tostring(err):find("SSL", 1, true), tostring(err))
    -- another value of ssl libpq refuses: named, with what to write
    local ok2, e2 = pcall(sql.open, base .. "?ssl=1")
    assert.is_false(ok2)
    assert.truthy(tostring(e2):find("sql.open: unknown option ssl in the"
      .. " postgres url (did you mean sslmode?", 1, true), tostring(e2))
  end)

  it("keeps SQLite's savepoint journals in memory (each write job runs in"
     .. " a savepoint; spilled to a temporary file, a notification's job"
     .. " cost ~45 pwrite calls)", function()
    assert.is_true(require("paygate.sqlite.core").subjournal_in_memory)
  end)

  it("commits a SQLite write whose savepoint journal outgrows memory (a"
     .. " bulk UPDATE of a 13 MB table: its journal spills to a temporary"
     .. " file; it failed \"database or disk is full\")", function()
    local db = assert(sql.open("sqlite:" .. tmp .. "/spill.db"))
    assert(db:exec("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)"))
    fill(db, "t", 120000, "hex(randomblob(50))")
    local pages = assert(db:query("SELECT page_count * page_size AS n"
      .. " FROM pragma_page_count(), pragma_page_size()"))[1].n
    assert.is_true(pages > 12e6, "the table is " .. pages .. " bytes")
    local ok, err = db:exec("UPDATE t SET v = lower(v)")
    assert.is_nil(err)
    assert.truthy(ok)
    assert.equal(0, assert(db:query("SELECT count(*) AS n FROM t"
      .. " WHERE v <> lower(v)"))[1].n)
    db:close()
  end)

  it("commits a SQLite write whose TEMP table's journal outgrows memory (a"
     .. " temporary database's journal spills like a savepoint's; it failed"
     .. " \"database or disk is full\")", function()
    local db = assert(sql.open("sqlite:" .. tmp .. "/spill_temp.db"))
    -- a TEMP table lives on the writer's connection: read it with exec
    assert(db:exec("CREATE TEMP TABLE t (k INTEGER PRIMARY KEY, v TEXT)"))
    fill(db, "temp.t", 120000, "hex(randomblob(50))")
    local ok, err = db:exec("UPDATE temp.t SET v = lower(v)")
    assert.is_nil(err)
    assert.equal(120000, ok.changes)
    assert.equal(0, assert(db:exec("SELECT count(*) AS n FROM temp.t"
      .. " WHERE v <> lower(v)")).rows[1].n)
    db:close()
  end)
end)
