-- examples/gateway on a store put back from a backup (paygate restore):
-- it says at its start that it knows nothing done after the copy, and
-- which days' bills to reconcile to find the payments and refunds made
-- since (the bill job reaches back bill_days only); a store never
-- restored says nothing of the kind.
local testing = require "paygate.testing"
local gwcore = dofile("examples/gateway/spec/core_support.lua")

local BIN = os.getenv("PAYGATE_BIN") or "build/paygate"

describe("gateway on a restored store", function()
  local sim, dir

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    dir = testing.tmpdir()
  end)

  teardown(function()
    testing.stop_all()
    if dir then testing.server.rmdir(dir) end
  end)

  local url
  local function start()
    return gwcore.start(sim, {
      db = function() url = "sqlite:" .. dir .. "/gw.db" return url end,
      gateway = { reconcile = { enabled = false },
                  console = { access = "loopback" } } })
  end

  local MSG = "gateway: this store was restored from a backup"

  local function restored_line(gw)
    for l in (gw.srv:logs() or ""):gmatch("[^\n]+") do
      if l:find(MSG, 1, true) then return l end
    end
  end

  it("says it was restored, since when, and which days to reconcile",
     function()
    local gw = start()
    local p = gw:create{ order_id = "before-copy" }
    assert.equal(0, (testing.proc.run({ BIN, "backup", url,
                                         dir .. "/copy.db" })))
    gw:create{ order_id = "after-copy" }        -- lost with the machine
    assert.is_nil(restored_line(gw))           -- never restored: silent
    assert.is_nil(gw.srv:request{ path = "/console" }.body:find(
      "Restored store", 1, true))
    gw:stop()
    assert.equal(0, gw.srv:stop(15, true))

    local code, out = testing.proc.run({ BIN, "restore", dir .. "/copy.db",
                                         url, "--force" })
    assert.equal(0, code, out)

    gw = start()
    local line
    testing.wait_until(function()
      line = restored_line(gw)
      return line
    end, 10, "the restored store's warning")
    local e = require("paygate.json").decode(line)
    assert.equal("warn", e.level)
    local today = require("paygate.reconcile.bill").bill_date(
      require("paygate.core").time() + 86400)
    assert.same({ today }, e.days)
    assert.matches("run the bill reconciliation of " .. today, e.msg, 1, true)
    assert.is_number(e.copy_newest)
    assert.is_number(e.restored_at)
    -- the console's overview says it too, first, each day linking to its
    -- reconciliation (before: the log only)
    local home = gw.srv:request{ path = "/console" }.body
    local box = home:match("<h2>Restored store</h2>(.-)</section>")
    assert.truthy(box, home)
    assert.matches("knows nothing done%s+after %d%d%d%d%-", box)
    assert.matches('href="/console/reconcile?date=' .. today .. '"', box, 1,
                   true)
    assert.truthy(home:find("<h2>Restored store</h2>", 1, true)
                  < home:find("<h2>Payments, last 24 h</h2>", 1, true))
    -- the copy's payment is there, the later one is not
    assert.equal(p.id, gw:get(p.id).id)
    local n = gw.db:query("SELECT count(*) AS n FROM gw_payments")[1].n
    assert.equal(1, n)
    gw:stop()
  end)
end)
