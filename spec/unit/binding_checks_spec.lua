-- The C bindings check their objects' types and read their constant keys
-- from per-state memory (gw_testudata, gw_getfield in src/core/lstate.c)
-- instead of interning a name on every call. These specs pin that the
-- shortcuts change nothing a caller can see: the same type errors, the
-- same metamethod semantics, the same rows.
local crypto = require "paygate.crypto"
local sql = require "paygate.sql"
local servers = require "spec.support.servers"

local FIX = "spec/fixtures/wechatpay/"
local read = require("spec.support.simclient").read

local tmp = servers.mktemp()
teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

describe("object types", function()
  local key = assert(crypto.private_key(read(FIX .. "a3_merchant_key.pem")))
  local cert = assert(crypto.certificate(read(FIX .. "a4_merchant_cert.pem")))
  local key_bits = getmetatable(key).__index.bits
  local cert_serial = getmetatable(cert).__index.serial

  it("a method given another object raises Lua's own message", function()
    -- each type seen first the right way, so both are remembered
    assert.equal(2048, key:bits())
    assert.is_string(cert:serial())
    for _ = 1, 3 do            -- and again, from what is remembered
      local ok, err = pcall(key_bits, cert)
      assert.is_false(ok)
      assert.matches("bad argument #1 .*paygate%.crypto%.key expected,"
                     .. " got userdata", err)
      ok, err = pcall(cert_serial, key)
      assert.is_false(ok)
      assert.matches("paygate%.x509%.cert expected, got userdata", err)
      ok, err = pcall(key_bits, {})
      assert.is_false(ok)
      assert.matches("paygate%.crypto%.key expected, got table", err)
      ok, err = pcall(key_bits, nil)
      assert.is_false(ok)
      assert.matches("paygate%.crypto%.key expected, got", err)
      assert.equal(2048, key_bits(key))
    end
  end)

  it("a userdata with a look-alike metatable is refused", function()
    local fake = newproxy(true)
    local mt = getmetatable(fake)
    for k, v in pairs(getmetatable(key)) do
      if k ~= "__gc" then mt[k] = v end   -- (finalizers: the next case)
    end
    local ok, err = pcall(key_bits, fake)
    assert.is_false(ok)
    assert.matches("paygate%.crypto%.key expected", err)
  end)

  it("a finalizer given another userdata ignores it (never raises)",
     function()
    -- every paygate type with a __gc, loaded (SQLite's opens a handle)
    for _, m in ipairs{ "paygate", "paygate.keyring", "paygate.redis",
                        "paygate.http", "paygate.wechatpay",
                        "paygate.pg.core" } do
      require(m)
    end
    local db = assert(sql.open("sqlite:" .. tmp .. "/gc.db"))
    db:close()
    local names = {}
    for k, v in pairs(debug.getregistry()) do
      if type(k) == "string" and k:find("^paygate%.") and type(v) == "table"
         and v.__gc then
        names[#names + 1] = k
      end
    end
    table.sort(names)
    assert.equal("paygate.abandon_guard paygate.crypto.digest"
      .. " paygate.crypto.key paygate.event paygate.file_lock"
      .. " paygate.http_stream paygate.json.encoder paygate.keyring.ring paygate.pg.atomic_build"
      .. " paygate.pg.pool paygate.read_buffer paygate.redis.client"
      .. " paygate.redis.sub"
      .. " paygate.sqlite.atomic_build paygate.sqlite.db"
      .. " paygate.task paygate.x509.cert paygate.zlib_inflate",
      table.concat(names, " "))
    for _, name in ipairs(names) do
      local fake = newproxy(true)
      getmetatable(fake).__gc = debug.getregistry()[name].__gc
      fake = nil                              -- luacheck: ignore
      local ok, err = pcall(collectgarbage, "collect")
      assert.is_true(ok, name .. ": " .. tostring(err))
      ok, err = pcall(collectgarbage, "collect")
      assert.is_true(ok, name .. ": " .. tostring(err))
    end
  end)

  it("where a key or a certificate is taken, both still work", function()
    local pub_cert = assert(crypto.certificate(read(FIX
                                                    .. "a4_merchant_cert.pem")))
    local msg = "message\n"
    local sig = assert(crypto.sign(key, msg))
    assert.is_true(crypto.verify(pub_cert, msg, sig))
    assert.is_true(crypto.verify(key, msg, sig))
    local ok = pcall(crypto.verify, crypto.digest_new("sha256"), msg, sig)
    assert.is_false(ok)
  end)
end)

local engines = { "sqlite" }
if servers.have_postgres() then engines[#engines + 1] = "postgres" end

local function wide(id_type)
  local cols = {}
  for i = 1, 40 do cols[#cols + 1] = ("c%02d TEXT"):format(i) end
  return "CREATE TABLE wide (id " .. id_type .. " PRIMARY KEY, "
         .. table.concat(cols, ", ") .. ")"
end
local stores = servers.stores(tmp, { sqlite = wide("INTEGER"),
                                     postgres = wide("BIGINT") }, "wide")

for _, engine in ipairs(engines) do
  describe("rows and statement keys on " .. engine, function()
    local db
    setup(function() db = stores[engine]() end)
    teardown(function() if db then db:close() end end)

    it("several rows carry every column they have, none they lack",
       function()
      local N = 300
      for i = 1, N do
        local names, holes, params = { "id" }, { "$1" }, { i }
        for c = 1, 40 do
          if (i + c) % 3 ~= 0 then         -- every third column NULL
            names[#names + 1] = ("c%02d"):format(c)
            params[#params + 1] = ("r%d.c%d"):format(i, c)
            holes[#holes + 1] = "$" .. #params
          end
        end
        assert(db:exec("INSERT INTO wide (" .. table.concat(names, ", ")
          .. ") VALUES (" .. table.concat(holes, ", ") .. ")", params))
      end
      for _ = 1, 50 do
        local rows = assert(db:query("SELECT * FROM wide ORDER BY id"))
        assert.equal(N, #rows)
        for i = 1, N, 37 do
          local r = rows[i]
          assert.equal(i, tonumber(r.id))
          for c = 1, 40 do
            local v = r[("c%02d"):format(c)]
            if (i + c) % 3 == 0 then
              assert.is_nil(v)
            else
              assert.equal(("r%d.c%d"):format(i, c), v)
            end
          end
        end
      end
      local one = assert(db:query("SELECT id, c01, c02 FROM wide WHERE"
                                  .. " id = $1", { 2 }))
      assert.same({ { id = 2, c02 = "r2.c2" } }, one)
    end)

    it("a parameter list's n is read as Lua would (metamethods included)",
       function()
      -- n from a metatable: the nil in the middle is bound as NULL
      local params = setmetatable({ [2] = 1 }, { __index = { n = 2 } })
      assert(db:atomic({ { "UPDATE wide SET c03 = $1 WHERE id = $2",
                           params, expect = 1 } }))
      local rows = assert(db:query("SELECT c01, c03 FROM wide WHERE id = 1"))
      assert.same({ { c01 = "r1.c1" } }, rows)
      local r = assert(db:exec("UPDATE wide SET c04 = 'z' WHERE id <= 2"))
      assert.equal(2, r.changes)
    end)

    if engine == "sqlite" then
      it("a statement's expect is read as Lua would (the driver's own"
         .. " atomic: paygate.sql passes it a plain table)", function()
        local stmt = setmetatable({ "UPDATE wide SET c05 = 'e' WHERE id = 1",
                                    {} }, { __index = { expect = 1 } })
        assert(db.h:atomic({ stmt }))
        stmt = setmetatable({ "UPDATE wide SET c05 = 'e' WHERE id = -1",
                              {} }, { __index = { expect = 1 } })
        local res, index, err, got = db.h:atomic({ stmt })
        assert.is_nil(res)
        assert.equal(1, index)
        assert.is_nil(err)
        assert.equal(0, got)
      end)
    else
      it("several rows of no column are several empty rows", function()
        local rows = assert(db:query("SELECT FROM wide WHERE id <= 3"))
        assert.same({ {}, {}, {} }, rows)
      end)
    end
  end)
end

describe("short strings remembered (JSON keys, column names)", function()
  local json = require "paygate.json"

  local function registry_size()
    local n = 0
    for _ in pairs(debug.getregistry()) do n = n + 1 end
    return n
  end

  it("keys that share their slot's hash stay apart", function()
    -- 640 keys for 256 slots, so many share one; of the same length, the
    -- same first and last 8 bytes: only the middle tells them apart
    local keys = {}
    for len = 17, 32 do
      for i = 1, 40 do
        local mid = ("%0" .. (len - 16) .. "d"):format(i)
        keys[#keys + 1] = "AAAAAAAA" .. mid .. "ZZZZZZZZ"
      end
    end
    for round = 1, 3 do
      for i = 1, #keys, 7 do
        local a, b = keys[i], keys[(i * 13 + round) % #keys + 1]
        local doc = json.decode('{"' .. a .. '":1,"' .. b .. '":2}')
        assert.equal(a == b and 2 or 1, doc[a])
        assert.equal(2, doc[b])
        local n = 0
        for k in pairs(doc) do
          n = n + 1
          assert.is_true(k == a or k == b)
        end
        assert.equal(a == b and 1 or 2, n)
      end
    end
  end)

  it("every length and form decodes to its own bytes", function()
    for len = 0, 40 do
      local k = ("k"):rep(len)
      local doc = json.decode('{"' .. k .. '":true,"x' .. k .. '":false}')
      assert.is_true(doc[k])
      assert.is_false(doc["x" .. k])
    end
    -- escapes, NUL and UTF-8 in a key
    local doc = json.decode('{"a\\u0000b":1,"\\"q\\"":2,"\\u4e2d\\u6587":3,'
                            .. '"a\\nb":4}')
    assert.equal(1, doc["a\0b"])
    assert.equal(2, doc['"q"'])
    assert.equal(3, doc["中文"])
    assert.equal(4, doc["a\nb"])
  end)

  it("many distinct keys keep the registry bounded", function()
    for i = 1, 2000 do                  -- fill every slot first
      json.decode('{"warm' .. i .. '":1}')
    end
    collectgarbage()
    local before = registry_size()
    for i = 1, 50000 do
      local k = "key" .. i
      assert.equal(i, json.decode('{"' .. k .. '":' .. i .. '}')[k])
    end
    collectgarbage()
    assert.is_true(registry_size() - before < 50)
  end)
end)
