-- spec/support/servers.lua: a server whose port was taken between the
-- pick and its start (another process bound it) is started again on a
-- fresh port, and the server answering is ours.
local servers = require "spec.support.servers"
local sql = require "paygate.sql"
local redis = require "paygate.redis"

describe("servers: a taken port", function()
  local taker
  local pick = servers.pick_port

  setup(function()
    if servers.have_redis() then taker = servers.redis() end
  end)
  teardown(function()
    servers.pick_port = pick
    servers.stop_all()
  end)

  -- the first pick is the taker's port, then free ones
  local function take_first()
    local first = true
    servers.pick_port = function()
      if first then
        first = false
        return taker.port
      end
      return pick()
    end
  end

  it("PostgreSQL: started on another port", function()
    if not taker or not servers.have_postgres() then
      pending("redis-server and PostgreSQL needed")
      return
    end
    take_first()
    local pg = servers.postgres()
    assert.are_not.equal(taker.port, pg.port)
    local db = assert(sql.open(pg.url))
    assert.equal(1, assert(db:query("SELECT 1 AS one"))[1].one)
    db:close()
  end)

  it("Redis: started on another port, not fooled by the taker's PONG",
     function()
    if not taker then
      pending("redis-server needed")
      return
    end
    take_first()
    local r = servers.redis()
    assert.are_not.equal(taker.port, r.port)
    local c = assert(redis.connect(r.url))
    local dir = assert(c:call("CONFIG", "GET", "dir"))
    assert.equal(r.dir, dir[2])
    c:close()
  end)
end)
