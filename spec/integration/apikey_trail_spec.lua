-- paygate.apikey's trail behind a real `paygate run`, on SQLite and
-- PostgreSQL: a signed request records its key's last use (in the worker,
-- once a minute: the stored time does not move for the requests after
-- it), and key changes are audit entries, one per revoke when two race.
local sql = require "paygate.sql"
local json = require "paygate.json"
local core = require "paygate.core"
local audit = require "paygate.audit"
local apikey = require "paygate.apikey"
local server = require "support.server"
local servers = require "spec.support.servers"

local pg_srv

teardown(function()
  servers.stop_all()
end)

local APP = [[
local paygate = require "paygate"
local sql = require "paygate.sql"
local apikey = require "paygate.apikey"

local db = assert(sql.open(paygate.config.spec.db))
paygate.before(apikey.before_hook(db, { prefix = "/v1/" }))
paygate.route("GET", "/v1/ping", function(req)
  return 200, { app_id = req.app_id }
end)
paygate.route("GET", "/stats", function()
  return 200, apikey.stats()
end)
]]

local engines = {
  sqlite = function(dir) return "sqlite:" .. dir .. "/gw.db" end,
}
if servers.have_postgres() then
  engines.postgres = function()
    pg_srv = pg_srv or servers.postgres()
    return pg_srv.url
  end
end

for name, engine in pairs(engines) do
  describe("apikey's trail over HTTP on " .. name, function()
    local srv, db, url, dir

    setup(function()
      dir = servers.mktemp()
      url = engine(dir)
      db = assert(sql.open(url))
      srv = server.start{ source = APP, workers = 1, config = string.format(
        "return { spec = { db = %q } }", url) }
    end)
    teardown(function()
      if srv then srv:stop() end
      db:close()
      servers.sh("rm -rf " .. dir)
    end)

    local function get(k)
      local h = apikey.sign{ app_id = k.app_id, key_id = k.key_id,
                             secret = k.secret, method = "GET",
                             path = "/v1/ping" }
      local res = assert(srv:request{ method = "GET", path = "/v1/ping",
                                      headers = h })
      assert.equal(200, res.status, res.body)
      return res
    end

    local function last_used(k)
      for _, r in ipairs(assert(apikey.list(db, k.app_id))) do
        if r.key_id == k.key_id then return r.last_used_at end
      end
    end

    it("records a key's last use once, not per request", function()
      local k = assert(apikey.create(db, "shop1"))
      local t0 = core.time()
      get(k)
      servers.wait_for(function() return last_used(k) end, 10,
                       "last_used_at")
      local at = last_used(k)
      assert.is_true(at >= math.floor(t0) - 1 and at <= core.time() + 1)
      for _ = 1, 20 do get(k) end
      -- the worker started one write: the first use
      local st = json.decode(assert(srv:request{ path = "/stats" }).body)
      assert.equal(1, st.uses_recorded)
      assert.equal(0, st.uses_failed)
      assert.equal(at, last_used(k))
    end)

    it("audits create and revoke; of two revokes at once one wins",
       function()
      local k = assert(apikey.create(db, "shop2", { actor = "spec" }))
      local db2 = assert(sql.open(url))
      local got, tasks = {}, {}
      for i, h in ipairs({ db, db2 }) do
        tasks[i] = core.spawn(function()
          got[i] = { apikey.revoke(h, k.key_id, { actor = "spec" .. i }) }
        end)
      end
      for _, t in ipairs(tasks) do t:wait() end
      db2:close()
      local wins = 0
      for _, g in ipairs(got) do
        if g[1] == true then
          wins = wins + 1
        else
          assert.same({ false, "revoked" }, { g[1], g[2] })
          assert.is_number(g[3])
        end
      end
      assert.equal(1, wins)
      local es = assert(audit.entries(db, "apikey:shop2"))
      assert.equal(2, #es)
      assert.same({ "apikey.created", "apikey.revoked" },
                  { es[1].what, es[2].what })
      assert.same({ k.key_id, k.key_id }, { es[1].ref, es[2].ref })
      assert.is_true((audit.verify(db, "apikey:shop2")))
      -- the revoked key is refused once the worker's cache (5 s) is over
      servers.wait_for(function()
        local h = apikey.sign{ app_id = k.app_id, key_id = k.key_id,
                               secret = k.secret, method = "GET",
                               path = "/v1/ping" }
        local res = srv:request{ method = "GET", path = "/v1/ping",
                                 headers = h }
        return res and res.status == 401
               and json.decode(res.body).error == "revoked_key"
      end, 15, "401 revoked_key")
    end)
  end)
end
