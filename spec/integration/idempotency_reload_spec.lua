-- paygate.idempotency's default lease after a reload. A reload re-reads
-- paygate.config, but the server keeps enforcing the
-- limits.request_timeout it started with. The lease (request timeout +
-- 10 s) must follow the timeout the server enforces: taken from the
-- re-read config, a reload lowering it left runs the old, longer time to
-- finish under a lease that ran out first, and a retry of their key took
-- over a live run and ran the request a second time beside it.
local core = require "paygate.core"
local json = require "paygate.json"
local proc = require "paygate.testing.proc"
local server = require "paygate.testing.server"

-- GET /lease?k=KEY: begins a record for KEY and answers the lease it got;
-- GET /sleep?s=N: answers after N seconds (or the server's 504)
local APP = [[
local paygate = require "paygate"
local sql = require "paygate.sql"
local idem = require "paygate.idempotency"
local db = assert(sql.open(paygate.config.spec.db))
paygate.route("GET", "/lease", function(req)
  local k = req:query().k
  assert(idem.begin(db, "a", k, "f"))
  local r = assert(db:query("SELECT lease_until - created_at AS lease FROM"
    .. " paygate_idempotency WHERE idem_key = $1", { k }))
  return 200, { lease = r[1].lease, generation = paygate.runtime.generation,
                request_timeout = paygate.config.limits.request_timeout }
end)
paygate.route("GET", "/sleep", function(req)
  paygate.sleep(tonumber(req:query().s))
  return 200, "slept"
end)
]]

describe("idempotency after a reload", function()
  local s
  teardown(function() if s then s:stop() end end)

  it("keeps the lease of the request timeout the server enforces",
     function()
    local dir = server.tmpdir()
    local function conf(rt)
      return ("return { limits = { request_timeout = %d }, spec = {"
              .. " db = %q } }"):format(rt, "sqlite:" .. dir .. "/i.db")
    end
    s = server.start{ source = APP, config = conf(20) }
    local n = 0
    local function lease()
      n = n + 1
      local res = assert(s:request{ path = "/lease?k=k" .. n })
      assert.equal(200, res.status, res.body)
      return json.decode(res.body)
    end
    local before = lease()
    assert.equal(30, math.floor(before.lease + 0.5))
    -- the file now says 3 s; the server goes on with 20 s
    local f = assert(io.open(s.config_file, "w"))
    f:write(conf(3))
    f:close()
    s:signal(proc.SIGHUP)
    local after
    proc.wait_until(function()
      after = lease()
      return after.generation == 2
    end, 30, "the reload")
    assert.equal(3, after.request_timeout)
    local t0 = core.mono()
    local res = assert(s:request{ path = "/sleep?s=4", timeout = 30 })
    assert.equal(200, res.status, res.body)
    assert.is_true(core.mono() - t0 > 3.5)   -- past the 3 s of the file
    -- so a run may still go on for 20 s: its lease is 30 s, not 13 s
    assert.equal(30, math.floor(after.lease + 0.5))
  end)
end)
