-- A worker whose store lookup waits 2 s on DNS keeps serving everything
-- else: no request of a hello route made while that lookup is pending
-- waits for it (each well under the lookup's 2 s). The worker finds the
-- responder through the config's `resolver` setting.
local core = require "paygate.core"
local server = require "support.server"
local dnsserver = require "spec.support.dnsserver"
local servers = require "spec.support.servers"

local APP = [[
local paygate = require "paygate"
local sql = require "paygate.sql"

paygate.route("GET", "/hello", function()
  return 200, "hello"
end)

paygate.route("GET", "/slow", function()
  local t0 = paygate.update_time()
  local db, err = sql.open(%q, { connect_timeout = 8 })
  if not db then
    return 500, tostring(err)
  end
  local rows = assert(db:query("SELECT 1 AS one"))
  db:close()
  return 200, { one = rows[1].one, took = paygate.update_time() - t0 }
end)
]]

describe("a slow DNS answer on one worker", function()
  local d, s

  setup(function()
    if not servers.have_postgres() then
      return
    end
    d = dnsserver.start({
      { "slowdb.test", "A", 60, "127.0.0.1", delay = 2 },
    })
    local pg = servers.postgres()
    s = server.start{
      source = APP:format("postgres://postgres@slowdb.test:" .. pg.port
                          .. "/postgres"),
      workers = 1,
      config = { resolver = d.addr },
    }
  end)

  teardown(function()
    if s then
      s:stop()
    end
    if d then
      d:stop()
    end
    servers.stop_all()
  end)

  it("does not delay a hello route on the same worker",
     function()
    if not s then
      pending("postgres not installed")
      return
    end
    assert.equal(200, assert(s:request("/hello")).status)   -- warm up
    local slow
    core.spawn(function()
      slow = { s:request({ path = "/slow", timeout = 15 }) }
    end)
    -- until the query of /slow was seen by the responder, the handler
    -- has not reached the lookup yet
    local deadline = core.mono() + 10
    while d:queries("slowdb.test") == 0 do
      assert.is_true(core.mono() < deadline, "no lookup of slowdb.test")
      core.sleep(0.005)
    end
    local lat = {}
    while not slow do
      local t0 = core.mono()
      local res = assert(s:request("/hello"))
      lat[#lat + 1] = core.mono() - t0
      assert.equal(200, res.status)
      assert.is_true(core.mono() < deadline + 10, "/slow never answered")
    end
    local res = assert(slow[1], tostring(slow[2]))
    assert.equal(200, res.status, res.body)
    assert.equal(1, res.json.one)
    assert.is_true(res.json.took >= 1.9, res.json.took)
    -- enough samples across the 2 s the lookup took
    assert.is_true(#lat >= 100, #lat)
    table.sort(lat)
    local p99 = lat[math.ceil(#lat * 0.99)]
    print(string.format("\n  hello during a 2 s lookup: %d requests,"
                        .. " p50 %.2f ms, p99 %.2f ms, max %.2f ms", #lat,
                        lat[math.ceil(#lat * 0.5)] * 1000, p99 * 1000,
                        lat[#lat] * 1000))
    -- blocked, the loop would hold every /hello until the 2 s answer: one
    -- of them would take about that long. Not blocked, each takes what the
    -- machine gives it (p99 under 1 ms here when idle; a latency target
    -- belongs to a benchmark, and ASan at ctest -j4 made it 12.7 ms)
    assert.is_true(lat[#lat] < 1.0, "max " .. lat[#lat])
  end)

  it("a resolver that is not IP:PORT stops the start, named", function()
    local ok, err = pcall(server.start, {
      source = "require('paygate').route('GET', '/', function()"
               .. " return 200, 'x' end)",
      workers = 1, config = { resolver = "dns.example:53" } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("resolver must be", 1, true),
                  tostring(err))
  end)
end)
