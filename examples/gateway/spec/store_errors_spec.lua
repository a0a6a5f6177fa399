-- A failed store query answers the merchant API with 503 "unavailable"
-- and the error's kind only: the store's own message (SQL, table names,
-- a server's text) goes to the log, never to the client.
local sql = require "paygate.sql"
local migrate = require "paygate.migrate"
local server = require "paygate.testing.server"

package.path = "examples/gateway/?.lua;" .. package.path
local payments = require "gw.payments"
local refunds = require "gw.refunds"

describe("gateway store errors", function()
  local dir, db

  setup(function()
    dir = server.tmpdir()
    db = assert(sql.open("sqlite:" .. dir .. "/gw.db"))
    assert(migrate.run(db, "examples/gateway/migrations"))
    local ctx = { db = db, wx = {}, by_mchid = {}, gateway = {},
                  degraded = function() return false end }
    payments.init(ctx)
    refunds.init(ctx)
    -- every query of the tables below now fails in the store
    assert(db:exec("ALTER TABLE gw_refunds RENAME TO gw_refunds_gone"))
    assert(db:exec("ALTER TABLE gw_payments RENAME TO gw_payments_gone"))
  end)

  teardown(function()
    db:close()
    server.rmdir(dir)
  end)

  local function req(id)
    return { params = { id = id }, app_id = "a",
             query = function() return {}, {} end }
  end

  local function assert_opaque(status, body)
    assert.equal(503, status)
    assert.equal("unavailable", body.error)
    assert.matches("^the store failed; retry %(", body.message)
    assert.is_nil(body.message:find("gw_", 1, true), body.message)
    assert.is_nil(body.message:find("table", 1, true), body.message)
  end

  it("GET /v1/refunds/:id", function()
    assert_opaque(refunds.get(req("ref_1")))
  end)

  it("GET /v1/payments/:id/refunds", function()
    assert_opaque(refunds.list(req("pay_1")))
  end)

  it("GET /v1/payments/:id", function()
    assert_opaque(payments.get(req("pay_1")))
  end)
end)
