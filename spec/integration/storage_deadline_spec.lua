-- A request deadline (504) abandons a handler in the middle of
-- db:transaction: the writer (SQLite) or the reserved connection
-- (PostgreSQL, pool of 1) must come back at once, rolled back, for the
-- next request -- although no Lua code of the abandoned handler runs.
local json = require "cjson"
local server = require "support.server"
local servers = require "spec.support.servers"

local APP = [[
local paygate = require "paygate"
local sql = require "paygate.sql"
local db

paygate.route("GET", "/init", function()
  db = assert(sql.open(%q, { pool = 1, tx_timeout = 30000 }))
  assert(db:exec_script("DROP TABLE IF EXISTS dl; CREATE TABLE dl (v TEXT)"))
  return 200, "ok"
end)

paygate.route("GET", "/hold", function(req)
  req:set_deadline(0.2)
  db:transaction(function(tx)
    assert(tx:exec("INSERT INTO dl (v) VALUES ($1)", { "hold" }))
    paygate.sleep(30)
  end)
  return 200, "late"                   -- never: the handler is cancelled
end)

paygate.route("GET", "/write", function()
  local t0 = paygate.update_time()
  assert(db:exec("INSERT INTO dl (v) VALUES ($1)", { "w" }))
  local elapsed = paygate.update_time() - t0
  local rows = assert(db:query("SELECT count(*) AS c FROM dl WHERE v = $1",
                               { "hold" }))
  return 200, { elapsed = elapsed, held = rows[1].c }
end)
]]

local engines = { "sqlite" }
if servers.have_postgres() then
  engines[#engines + 1] = "postgres"
end

local tmp = servers.mktemp()

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

for _, engine in ipairs(engines) do
  describe("request deadline inside db:transaction on " .. engine, function()
    local s

    setup(function()
      local url = "sqlite:" .. tmp .. "/deadline.db"
      if engine == "postgres" then
        url = servers.postgres().url
      end
      s = server.start{ source = APP:format(url), workers = 1 }
      local res = assert(s:request("/init"))
      assert.equal(200, res.status, res.body)
    end)

    teardown(function()
      if s then
        assert.equal(0, s:stop())
      end
    end)

    it("rolls back and frees the writer or connection at once", function()
      for _ = 1, 3 do
        local res = assert(s:request{ path = "/hold", timeout = 3 })
        assert.equal(504, res.status)
      end
      local res = assert(s:request{ path = "/write", timeout = 10 })
      assert.equal(200, res.status, res.body)
      local out = json.decode(res.body)
      -- at once, not once tx_timeout (30 s) rolled the abandoned one
      -- back: room for a loaded machine
      assert.truthy(out.elapsed < 5, "write waited " .. out.elapsed .. " s")
      assert.equal(0, out.held)
    end)
  end)
end
