-- The gateway's migrations applied over a store made by earlier ones:
-- 004 makes the abnormal refunds whose checks had stopped (before abnormal
-- refunds were asked about again) due at once, and leaves the others be.
local sql = require "paygate.sql"
local migrate = require "paygate.migrate"
local servers = require "spec.support.servers"

describe("gateway migrations over an older store", function()
  local dir = servers.mktemp()
  teardown(function() servers.sh("rm -rf " .. dir) end)

  it("004: abnormal refunds with no check planned are due now", function()
    local old = dir .. "/old"
    assert(os.execute("mkdir -p " .. old .. "/sqlite"))
    for _, f in ipairs{ "001_gateway.sql", "002_console.sql",
                        "003_history.sql" } do
      assert(os.execute("cp examples/gateway/migrations/sqlite/" .. f .. " "
                        .. old .. "/sqlite/"))
    end
    local db = assert(sql.open("sqlite:" .. dir .. "/gw.db"))
    assert(migrate.run(db, old))
    assert(db:exec("INSERT INTO gw_payments (id, app_id, order_id, mchid,"
      .. " appid, channel, amount, currency, description, state, version,"
      .. " out_trade_no, attempt, expires_at, created_at, updated_at) VALUES"
      .. " ('pay_1', 'a', 'o1', '1900', 'wx1', 'native', 100, 'CNY', 'd',"
      .. " 'paid', 2, 'pay_1_1', 1, 0, 0, 0)"))
    local function refund(id, state, next_at)
      assert(db:exec("INSERT INTO gw_refunds (id, payment_id, out_refund_no,"
        .. " out_trade_no, kind, amount, state, version, created_at,"
        .. " updated_at, next_check_at, checks) VALUES ($1, 'pay_1', $1,"
        .. " 'pay_1_1', 'merchant', 1, $2, 1, 0, 0, $3, 4)",
        { id, state, next_at or sql.null }))
    end
    refund("r_stopped", "abnormal")
    refund("r_planned", "abnormal", 5000)
    refund("r_done", "succeeded")
    local applied = assert(migrate.run(db, "examples/gateway/migrations"))
    assert.is_true(#applied >= 1)
    local got = {}
    for _, r in ipairs(assert(db:query("SELECT id, next_check_at FROM"
                                       .. " gw_refunds"))) do
      got[r.id] = r.next_check_at
    end
    assert.equal(0, got.r_stopped)
    assert.equal(5000, got.r_planned)
    assert.is_nil(got.r_done)
    db:close()
  end)
end)
