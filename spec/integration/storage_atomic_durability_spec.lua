-- db:atomic under kill -9: every acknowledged job is present after
-- reopening, and no job is ever half there (SQLite, PostgreSQL).
local sql = require "paygate.sql"
local servers = require "spec.support.servers"

local KILLS = tonumber(os.getenv("PAYGATE_KILLS") or "4")

local tmp = servers.mktemp()

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

-- Every acked id in both tables; both tables and the counters agree (a
-- job is all there or not at all, acknowledged or not).
local function check(db, acked)
  local a, b = {}, {}
  for _, r in ipairs(assert(db:query("SELECT id FROM acks"))) do
    a[r.id] = true
  end
  for _, r in ipairs(assert(db:query("SELECT id FROM acks_b"))) do
    b[r.id] = true
  end
  local missing = 0
  for _, id in ipairs(acked) do
    if not (a[id] and b[id]) then
      missing = missing + 1
    end
  end
  assert.equal(0, missing)
  local na = assert(db:query("SELECT count(*) AS n FROM acks"))[1].n
  local half = assert(db:query("SELECT count(*) AS n FROM acks WHERE id NOT IN"
    .. " (SELECT id FROM acks_b)"))[1].n
  local nb = assert(db:query("SELECT count(*) AS n FROM acks_b"))[1].n
  local sum = assert(db:query("SELECT sum(n) AS s FROM counters"))[1].s
  assert.equal(0, half)
  assert.equal(na, nb)
  assert.equal(na, tonumber(sum))
end

describe("db:atomic durability under kill -9", function()
  it("keeps every acknowledged SQLite job, whole", function()
    local url = "sqlite:" .. tmp .. "/atomic.db"
    for k = 1, KILLS do
      local acked = servers.kill_writer(url, tmp .. "/sq" .. k .. ".out",
                                        "atomic")
      assert.truthy(#acked > 0)
      local db = assert(sql.open(url))
      check(db, acked)
      db:close()
    end
  end)

  if servers.have_postgres() then
    it("keeps every acknowledged PostgreSQL job, whole", function()
      local srv = servers.postgres()
      for k = 1, 2 do
        local acked = servers.kill_writer(srv.url,
          tmp .. "/pg" .. k .. ".out", "atomic")
        assert.truthy(#acked > 0)
        local db = assert(sql.open(srv.url))
        check(db, acked)
        db:close()
      end
    end)
  end
end)
