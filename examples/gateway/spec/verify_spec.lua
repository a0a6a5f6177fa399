-- examples/gateway/scripts/verify.lua: the gateway's audit check finds
-- what `paygate audit verify` cannot (a chain deleted whole, a tail cut
-- with its head rewritten), by holding gw_payments / gw_refunds rows
-- against their chains. Edits made straight on a SQLite store.
local sql = require "paygate.sql"
local migrate = require "paygate.migrate"
local audit = require "paygate.audit"
local fsm = require "paygate.fsm"

local BIN = os.getenv("PAYGATE_BIN") or "build/paygate"
local SCRIPT = "examples/gateway/scripts/verify.lua"

local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1; echo \"rc=$?\""))
  local out = p:read("*a")
  p:close()
  local rc = tonumber(out:match("rc=(%d+)%s*$"))
  return rc, (out:gsub("rc=%d+%s*$", ""))
end

describe("gateway verify script", function()
  local dir, url, db
  local P = fsm.new(fsm.payment, {
    store = fsm.sql_store{ table = "gw_payments" } })
  local R = fsm.new(fsm.refund, {
    store = fsm.sql_store{ table = "gw_refunds" } })

  local function payment(id)
    assert(P:create(db, { id = id, app_id = "shop", order_id = "o-" .. id,
      mchid = "1900000001", appid = "wx1", channel = "native",
      amount = 100, currency = "CNY", description = "tea",
      out_trade_no = id .. "_1", attempt = 1, expires_at = 2e9,
      created_at = 1, updated_at = 1 }))
    -- an entry that is no transition (the gateway writes these too)
    assert(audit.append(db, "payment:" .. id, { what = "payment.attempt",
      ref = id .. "_1", from = "created", to = "created" }))
    assert(db:transaction(function(tx)
      assert(P:transition(tx, id, "opened"))
      return assert(P:transition(tx, id, "succeeded"))
    end))
  end

  before_each(function()
    dir = os.tmpname()
    os.remove(dir)
    os.execute("mkdir -p '" .. dir .. "'")
    url = "sqlite:" .. dir .. "/gw.db"
    db = assert(sql.open(url))
    assert(migrate.run(db, "examples/gateway/migrations"))
    assert(audit.ensure_schema(db))
    payment("pay_A")
    payment("pay_B")
    assert(R:create(db, { id = "ref_A", payment_id = "pay_A",
      out_refund_no = "ref_A", out_trade_no = "pay_A_1", kind = "merchant",
      amount = 30, created_at = 1, updated_at = 1 }))
    assert(db:transaction(function(tx)
      return assert(R:transition(tx, "ref_A", "accepted"))
    end))
  end)

  after_each(function()
    if db then db:close() end
    os.execute("rm -rf '" .. dir .. "'")
  end)

  it("passes an untouched store", function()
    local rc, out = sh(BIN .. " exec " .. SCRIPT .. " " .. url)
    assert.equal(0, rc, out)
    assert.matches("2 payments, 1 refunds, 0 findings", out, 1, true)
  end)

  it("finds a payment's chain deleted whole", function()
    assert(db:exec("DELETE FROM paygate_audit WHERE subject = 'payment:pay_A'"))
    assert(db:exec("DELETE FROM paygate_audit_heads WHERE subject ="
                   .. " 'payment:pay_A'"))
    -- the trail alone holds: every remaining chain verifies
    local rc, out = sh(BIN .. " audit verify " .. url)
    assert.equal(0, rc, out)
    rc, out = sh(BIN .. " exec " .. SCRIPT .. " " .. url)
    assert.equal(1, rc, out)
    assert.matches("missing payment:pay_A: no audit chain", out, 1, true)
    assert.not_matches("pay_B", out, 1, true)
  end)

  it("finds a tail cut with its head rewritten", function()
    assert(db:exec("DELETE FROM paygate_audit WHERE subject = 'payment:pay_B'"
                   .. " AND seq = 4"))
    assert(db:exec("UPDATE paygate_audit_heads SET seq = 3, hash = (SELECT"
      .. " hash FROM paygate_audit WHERE subject = 'payment:pay_B' AND"
      .. " seq = 3) WHERE subject = 'payment:pay_B'"))
    local rc, out = sh(BIN .. " audit verify " .. url)
    assert.equal(0, rc, out)
    rc, out = sh(BIN .. " exec " .. SCRIPT .. " " .. url)
    assert.equal(1, rc, out)
    assert.matches("short payment:pay_B: 2 transition entries for version 3",
                   out, 1, true)
  end)

  it("finds a row whose state its chain does not reach", function()
    assert(db:exec("UPDATE gw_payments SET state = 'refunded' WHERE id ="
                   .. " 'pay_B'"))
    local rc, out = sh(BIN .. " exec " .. SCRIPT .. " " .. url)
    assert.equal(1, rc, out)
    assert.matches("state payment:pay_B: the last transition is to paid,"
                   .. " the row is refunded", out, 1, true)
  end)

  it("finds a refund's chain deleted, and a chain whose row is gone",
     function()
    assert(db:exec("DELETE FROM paygate_audit WHERE subject = 'refund:ref_A'"))
    assert(db:exec("DELETE FROM paygate_audit_heads WHERE subject ="
                   .. " 'refund:ref_A'"))
    assert(db:exec("DELETE FROM gw_payments WHERE id = 'pay_B'"))
    local rc, out = sh(BIN .. " exec " .. SCRIPT .. " " .. url)
    assert.equal(1, rc, out)
    assert.matches("missing refund:ref_A", out, 1, true)
    assert.matches("orphan payment:pay_B", out, 1, true)
  end)

  it("reports an edited entry as the trail's own check does", function()
    assert(db:exec("UPDATE paygate_audit SET cause = 'forged' WHERE subject"
                   .. " = 'payment:pay_A' AND seq = 2"))
    local rc, out = sh(BIN .. " exec " .. SCRIPT .. " " .. url)
    assert.equal(1, rc, out)
    assert.matches("broken payment:pay_A: seq 2 edited", out, 1, true)
  end)

  it("reports a chain renamed (its head or its entries moved to another"
     .. " subject) once, under the chain's own name", function()
    -- the head moved
    assert(db:exec("UPDATE paygate_audit_heads SET subject = 'payment:pay_Z'"
                   .. " WHERE subject = 'payment:pay_A'"))
    local rc, out = sh(BIN .. " exec " .. SCRIPT .. " " .. url)
    assert.equal(1, rc, out)
    assert.matches("broken payment:pay_A: seq 4 renamed: its head row is"
      .. " under the subject payment:pay_Z (renamed)\n", out, 1, true)
    assert.not_matches("pay_Z:", out, 1, true)
    assert.matches(", 1 findings\n", out, 1, true)
    rc, out = sh(BIN .. " audit verify " .. url)
    assert.equal(1, rc, out)
    assert.matches("^broken payment:pay_A seq 4 renamed: [^\n]*\n3 chains,"
                   .. " 10 entries, 1 broken\n$", out)
    -- put back; the entries moved instead
    assert(db:exec("UPDATE paygate_audit_heads SET subject = 'payment:pay_A'"
                   .. " WHERE subject = 'payment:pay_Z'"))
    assert(db:exec("UPDATE paygate_audit SET subject = 'payment:pay_Z'"
                   .. " WHERE subject = 'payment:pay_A'"))
    rc, out = sh(BIN .. " exec " .. SCRIPT .. " " .. url)
    assert.equal(1, rc, out)
    assert.matches("broken payment:pay_A: seq 1 renamed: its entries are"
      .. " under the subject payment:pay_Z (renamed)\n", out, 1, true)
    assert.not_matches("pay_Z:", out, 1, true)
    assert.matches(", 1 findings\n", out, 1, true)
  end)

  it("exits 2 on a store it cannot open, said in one line", function()
    local rc, out = sh(BIN .. " exec " .. SCRIPT
                       .. " postgres://nobody@127.0.0.1:1/x")
    assert.equal(2, rc)
    -- (not beside the PostgreSQL pool's own "pool down" log line)
    assert.matches("^verify: cannot open the store: unavailable: [^\n]*\n$",
                   out)
  end)

  it("--help says what it checks (exit 0); an unknown option or URL"
     .. " scheme is a usage error (exit 2, no traceback)", function()
    local rc, out = sh(BIN .. " exec " .. SCRIPT .. " --help")
    assert.equal(0, rc, out)
    assert.matches("audit check", out, 1, true)
    rc, out = sh(BIN .. " exec " .. SCRIPT .. " -x")
    assert.equal(2, rc, out)
    rc, out = sh(BIN .. " exec " .. SCRIPT .. " foo://x")
    assert.equal(2, rc, out)
    assert.is_nil(out:find("traceback", 1, true), out)
  end)
end)
