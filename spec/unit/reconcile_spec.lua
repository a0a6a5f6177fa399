-- paygate.reconcile without WeChat: the backoff schedule, the mapping of
-- WeChat's states to fsm events, the runner (lease, errors of one item,
-- fencing) and apply on SQLite, the refund limit, and the bill's pieces
-- (fen parsing, the Beijing date, the diff, CSV escaping, the atomic file).
-- The calls to the simulator: spec/integration/reconcile_spec.lua.
local core = require "paygate.core"
local sql = require "paygate.sql"
local lease = require "paygate.lease"
local fsm = require "paygate.fsm"
local audit = require "paygate.audit"
local reconcile = require "paygate.reconcile"
local bill = require "paygate.reconcile.bill"
local json = require "paygate.json"
local servers = require "spec.support.servers"

local tmp = servers.mktemp()
local n = 0

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

local function new_db()
  n = n + 1
  local db = assert(sql.open("sqlite:" .. tmp .. "/r" .. n .. ".db"))
  assert(db:exec_script([[CREATE TABLE payments (id TEXT PRIMARY KEY,
    state TEXT NOT NULL, version INTEGER NOT NULL, amount INTEGER,
    transaction_id TEXT, payer_total INTEGER, next_check_at REAL,
    checks INTEGER NOT NULL DEFAULT 0, out_trade_no TEXT)]]))
  return db
end

local pg_srv
local engines = { sqlite = new_db }
if servers.have_postgres() then
  engines.postgres = function()
    pg_srv = pg_srv or servers.postgres()
    local db = assert(sql.open(pg_srv.url))
    assert(db:exec_script("DROP TABLE IF EXISTS payments;"
      .. " DROP TABLE IF EXISTS paygate_audit;"
      .. " DROP TABLE IF EXISTS paygate_audit_heads;"
      .. " DROP TABLE IF EXISTS paygate_leases;"
      .. [[CREATE TABLE payments (id TEXT PRIMARY KEY,
      state TEXT NOT NULL, version INTEGER NOT NULL, amount INTEGER,
      transaction_id TEXT, payer_total INTEGER, next_check_at REAL,
      checks INTEGER NOT NULL DEFAULT 0, out_trade_no TEXT)]]))
    return db
  end
end

local function seq(...)
  local vals, i = { ... }, 0
  return function()
    i = i + 1
    return vals[i]
  end
end

describe("reconcile.schedule", function()
  it("refuses bad options (misuse raises)", function()
    assert.has_error(function() reconcile.schedule{ first = 0 } end)
    assert.has_error(function() reconcile.schedule{ factor = 0.5 } end)
    assert.has_error(function() reconcile.schedule{ ceiling = -1 } end)
    assert.has_error(function() reconcile.schedule{ retry = 0 } end)
    assert.has_error(function() reconcile.schedule{ jitter = "some" } end)
    assert.has_error(function() reconcile.schedule{ random = 1 } end)
    assert.has_error(function() reconcile.schedule(5) end)
  end)

  it("grows by factor from first up to the ceiling, without jitter",
     function()
    local s = reconcile.schedule{ first = 10, factor = 3, ceiling = 500,
                                  jitter = "none" }
    assert.same({ 10, 30, 90, 270, 500, 500 },
      { s:delay(1), s:delay(2), s:delay(3), s:delay(4), s:delay(5),
        s:delay(6) })
    assert.equal(500, s:delay(100000))            -- no overflow to inf
    assert.equal(10, s:delay(0))                  -- n < 1 is the first
    assert.equal(1000 + 30, s:next(1000, 2))
  end)

  it("full jitter is uniform in [0, d) from the injected random", function()
    local s = reconcile.schedule{ first = 10, factor = 2, ceiling = 60,
                                  random = seq(0, 0.5, 0.999, 0.25) }
    assert.equal(0, s:delay(1))
    assert.equal(10, s:delay(2))                  -- 0.5 * 20
    assert.near(39.96, s:delay(3), 1e-9)          -- 0.999 * 40
    assert.equal(15, s:delay(9))                  -- 0.25 * 60 (ceiling)
  end)

  it("equal jitter stays in [d/2, d)", function()
    local s = reconcile.schedule{ first = 8, jitter = "equal",
                                  random = seq(0, 0.5) }
    assert.equal(4, s:delay(1))
    assert.equal(12, s:delay(2))                  -- 8 + 0.5 * 8
  end)

  it("a random() out of [0, 1) counts as 0", function()
    local s = reconcile.schedule{ first = 8, random = function() return 7 end }
    assert.equal(0, s:delay(1))
  end)

  -- A check WeChat did not answer is no check: tried again within `retry`
  -- (60 s) however many checks the row had, after the open breaker's
  -- cool-down. Before there was no such wait: the app counted the failure
  -- (checks + 1) and the wait doubled up to the ceiling (1 h).
  it("retry_delay: at most retry (or the step, when shorter), after"
     .. " err.retry_after, jittered", function()
    local s = reconcile.schedule{ first = 30, factor = 2, ceiling = 3600,
                                  jitter = "none" }
    assert.equal(60, s.retry)
    assert.equal(30, s:retry_delay(1))            -- the first step is less
    assert.equal(60, s:retry_delay(12))           -- not 3600
    assert.equal(60, s:retry_delay(12, { kind = "timeout" }))
    -- the breaker's cool-down left first
    assert.equal(7.5 + 60, s:retry_delay(12, { kind = "circuit_open",
                                                retry_after = 7.5 }))
    -- a Retry-After past the ceiling waits the ceiling, not longer
    assert.equal(3600 + 60, s:retry_delay(12, { kind = "frequency_limited",
                                                 retry_after = 86400 }))
    assert.equal(60, s:retry_delay(12, { retry_after = -5 }))
    local j = reconcile.schedule{ first = 30, ceiling = 3600, retry = 20,
                                  random = seq(0.5, 0.25) }
    assert.equal(10, j:retry_delay(9))            -- 0.5 * 20
    assert.equal(2 + 5, j:retry_delay(9, { retry_after = 2 }))
  end)
end)

describe("reconcile.unanswered", function()
  it("is true when WeChat could not be asked or did not answer, false for"
     .. " an answer", function()
    for _, k in ipairs({ "circuit_open", "degraded", "connect", "dns", "tls",
                         "closed", "timeout", "unknown_outcome",
                         "system_error", "frequency_limited" }) do
      assert.is_true(reconcile.unanswered({ kind = k }), k)
    end
    assert.is_true(reconcile.unanswered({ kind = "http_error", status = 502,
                                          retryable = true }))
    assert.is_true(reconcile.unanswered({ kind = "other", status = 429 }))
    for _, e in ipairs({
        { kind = "not_found", status = 404 },     -- ORDER_NOT_EXIST
        { kind = "param_error", status = 500, retryable = false },
        { kind = "invalid_request", status = 400 },
        { kind = "bad_response" },                -- an unknown trade_state
        { kind = "bad_signature" },
        { kind = "fenced" }, { kind = "internal" }, "text" }) do
      assert.is_false(reconcile.unanswered(e), require("cjson").encode(e))
    end
    assert.is_false(reconcile.unanswered(nil))
  end)
end)

describe("reconcile.payment_event / refund_event", function()
  it("maps trade_state by local state", function()
    local e = reconcile.payment_event
    assert.equal("succeeded", e("paying", "SUCCESS"))
    assert.equal("succeeded", e("unknown", "SUCCESS"))
    assert.equal("succeeded", e("closed", "SUCCESS"))  -- money after close
    assert.is_nil(e("paid", "SUCCESS"))
    assert.equal("succeeded", e("paying", "REFUND"))   -- paid, then refunded
    assert.is_nil(e("refunded", "REFUND"))
    assert.equal("still_open", e("unknown", "NOTPAY"))
    assert.equal("still_open", e("unknown", "USERPAYING"))
    assert.is_nil(e("paying", "NOTPAY"))
    assert.equal("closed", e("paying", "CLOSED"))
    assert.equal("closed", e("unknown", "CLOSED"))
    assert.is_nil(e("paid", "CLOSED"))
    assert.equal("failed", e("paying", "PAYERROR"))
    assert.is_nil(e("paying", "WHATEVER"))
    -- every event it names is declared from that state
    local m = fsm.new(fsm.payment, { store = fsm.sql_store{ table = "x" } })
    for _, st in ipairs({ "created", "paying", "unknown", "closed", "failed",
                          "paid", "partially_refunded", "refunded" }) do
      for _, ts in ipairs({ "SUCCESS", "REFUND", "NOTPAY", "USERPAYING",
                            "CLOSED", "PAYERROR", "REVOKED", "ACCEPT" }) do
        local ev = e(st, ts)
        if ev then
          assert.is_truthy(m:can(st, ev), st .. " " .. ts)
        end
      end
    end
  end)

  it("maps refund status by local state", function()
    local e = reconcile.refund_event
    assert.equal("accepted", e("created", "PROCESSING"))
    assert.equal("accepted", e("unknown", "PROCESSING"))
    assert.is_nil(e("processing", "PROCESSING"))
    assert.equal("succeeded", e("processing", "SUCCESS"))
    assert.equal("succeeded", e("abnormal", "SUCCESS"))
    assert.equal("closed", e("processing", "CLOSED"))
    assert.equal("abnormal", e("processing", "ABNORMAL"))
    assert.is_nil(e("abnormal", "ABNORMAL"))
    assert.is_nil(e("succeeded", "SUCCESS"))
    local m = fsm.new(fsm.refund, { store = fsm.sql_store{ table = "x" } })
    for _, st in ipairs({ "created", "unknown", "processing", "abnormal",
                          "succeeded", "closed", "failed" }) do
      for _, rs in ipairs({ "PROCESSING", "SUCCESS", "CLOSED", "ABNORMAL" }) do
        local ev = e(st, rs)
        if ev then
          assert.is_truthy(m:can(st, ev), st .. " " .. rs)
        end
      end
    end
  end)
end)

describe("reconcile.answered_at", function()
  it("is WeChat's clock at its answer: the signed Wechatpay-Timestamp",
     function()
    assert.equal(1796625528, reconcile.answered_at({ headers = {
      ["wechatpay-timestamp"] = "1796625528" } }))
    for _, m in ipairs({ nil, {}, { headers = {} }, { headers = {
      ["wechatpay-timestamp"] = "soon" } }, { headers = {
      ["wechatpay-timestamp"] = "inf" } } }) do
      assert.is_nil(reconcile.answered_at(m))
    end
  end)

  it("comes with check_payment's and check_refund's action", function()
    local meta = { headers = { ["wechatpay-timestamp"] = "1796625528" } }
    local a = assert(reconcile.check_payment({
      query_by_out_trade_no = function(_, no)
        return { out_trade_no = no, trade_state = "NOTPAY" }, meta
      end }, { id = "P", state = "paying", out_trade_no = "T0001" }))
    assert.equal(1796625528, a.answered_at)
    a = assert(reconcile.check_refund({
      query_refund = function(_, no)
        return { out_refund_no = no, status = "PROCESSING" }, meta
      end }, { id = "R", state = "processing", out_refund_no = "R0001" }))
    assert.equal(1796625528, a.answered_at)
  end)
end)

describe("reconcile.check_payment with a stand-in client", function()
  -- A table with the two methods: the real calls are in the integration
  -- spec; here the decisions around them.
  local function client(txn, qerr, calls)
    return {
      query_by_out_trade_no = function(_, no, sub)
        calls[#calls + 1] = { "query", no, sub }
        if qerr then return nil, core.error(qerr, "x") end
        -- (an answer names its order, as WeChat's does)
        if txn and txn.out_trade_no == nil then txn.out_trade_no = no end
        return txn
      end,
      close = function(_, no, sub)
        calls[#calls + 1] = { "close", no, sub }
        return {}
      end,
    }
  end

  it("refuses a bad item (misuse raises)", function()
    assert.has_error(function() reconcile.check_payment({}, { id = "P" }) end)
    assert.has_error(function() reconcile.check_payment(nil, {
      id = "P", out_trade_no = "T0001" }) end)
  end)

  it("an amount WeChat disagrees with is an alarm, not a transition",
     function()
    local calls = {}
    local a = assert(reconcile.check_payment(client({ trade_state = "SUCCESS",
      amount = { total = 90 }, transaction_id = "42" }, nil, calls),
      { id = "P", state = "paying", out_trade_no = "T0001", amount = 100 }))
    assert.equal("amount_mismatch", a.alarm)
    assert.is_nil(a.event)
    assert.same({ expected = 100, got = 90 },
                { expected = a.evidence.expected, got = a.evidence.got })
  end)

  it("closes an expired NOTPAY at WeChat (partner: sub_mchid) first",
     function()
    local calls = {}
    local a = assert(reconcile.check_payment(client({ trade_state = "NOTPAY" },
      nil, calls), { id = "P", state = "paying", out_trade_no = "T0001",
      sub_mchid = "1900000109", expires_at = 100 }, { now = 101 }))
    assert.same({ { "query", "T0001", "1900000109" },
                  { "close", "T0001", "1900000109" } }, calls)
    assert.equal("closed", a.event)
    assert.is_true(a.closed_by_us)
    -- not yet expired: nothing, no close
    calls = {}
    a = assert(reconcile.check_payment(client({ trade_state = "NOTPAY" }, nil,
      calls), { id = "P", state = "paying", out_trade_no = "T0001",
      expires_at = 100 }, { now = 99 }))
    assert.is_nil(a.event)
    assert.equal(1, #calls)
  end)

  it("paid as it expired: a close refused ORDER_PAID is asked again at once"
     .. " and the payment applied", function()
    local calls, queries, still = {}, 0, false
    local wx = {
      query_by_out_trade_no = function(_, no, sub)
        calls[#calls + 1] = { "query", no, sub }
        queries = queries + 1
        if queries == 1 or still then
          return { trade_state = "NOTPAY", out_trade_no = no }
        end
        return { trade_state = "SUCCESS", transaction_id = "4200000001",
                 out_trade_no = no, amount = { total = 100,
                                               payer_total = 100 } }
      end,
      close = function(_, no, sub)
        calls[#calls + 1] = { "close", no, sub }
        return nil, core.error("order_paid", "订单已支付")
      end,
    }
    local a = assert(reconcile.check_payment(wx, { id = "P",
      state = "paying", out_trade_no = "T0001", amount = 100,
      expires_at = 100 }, { now = 101 }))
    assert.same({ { "query", "T0001" }, { "close", "T0001" },
                  { "query", "T0001" } }, calls)
    assert.same({ "SUCCESS", "succeeded", "4200000001" },
                { a.remote, a.event, a.set.transaction_id })
    assert.is_nil(a.closed_by_us)
    assert.equal("order_paid", a.evidence.close)
    -- the second answer not yet SUCCESS (WeChat's views apart): the
    -- close's error, for the next check
    still, calls = true, {}
    local none, err = reconcile.check_payment(wx, { id = "P",
      state = "paying", out_trade_no = "T0001", expires_at = 100 },
      { now = 101 })
    assert.is_nil(none)
    assert.equal("order_paid", err.kind)
  end)

  it("an order WeChat does not know: closed past expiry, nothing before",
     function()
    local calls = {}
    local a = assert(reconcile.check_payment(client(nil, "not_found", calls),
      { id = "P", state = "unknown", out_trade_no = "T0001",
        expires_at = 100 }, { now = 200 }))
    assert.equal("closed", a.event)
    a = assert(reconcile.check_payment(client(nil, "not_found", calls),
      { id = "P", state = "unknown", out_trade_no = "T0001",
        expires_at = 100 }, { now = 50 }))
    assert.equal("ORDER_NOT_EXIST", a.remote)
    assert.is_nil(a.event)
    -- another error is returned as it is
    local none, err = reconcile.check_payment(client(nil, "timeout", calls),
      { id = "P", state = "unknown", out_trade_no = "T0001" })
    assert.is_nil(none)
    assert.equal("timeout", err.kind)
  end)

  it("an answer about another order (or none) is a retryable bad_response,"
     .. " nothing applied", function()
    for _, other in ipairs({ "T0002", false }) do
      local a, err = reconcile.check_payment(client({ trade_state = "SUCCESS",
        out_trade_no = other or nil, transaction_id = "42",
        amount = { total = 100 } }, nil, {}), { id = "P", state = "paying",
        out_trade_no = "T0001", amount = 100 })
      if not other then
        -- (the fake client fills a missing one in: send it as absent)
        a, err = reconcile.check_payment({ query_by_out_trade_no = function()
          return { trade_state = "SUCCESS", transaction_id = "42",
                   amount = { total = 100 } } end }, { id = "P",
          state = "paying", out_trade_no = "T0001", amount = 100 })
      end
      assert.is_nil(a)
      assert.equal("bad_response", err.kind)
      assert.is_true(err.retryable)
      assert.matches("names order " .. (other or "nil") .. ", not T0001",
                     err.message, 1, true)
    end
    local r, err = reconcile.check_refund({ query_refund = function()
      return { status = "SUCCESS", out_refund_no = "R2", refund_id = "5" }
    end }, { id = "F", state = "processing", out_refund_no = "R1" })
    assert.is_nil(r)
    assert.equal("bad_response", err.kind)
    assert.matches("names refund R2, not R1", err.message, 1, true)
  end)

  it("an unexpected trade_state is a retryable bad_response", function()
    local a, err = reconcile.check_payment(client({ trade_state = "<x>" }, nil,
      {}), { id = "P", state = "paying", out_trade_no = "T0001" })
    assert.is_nil(a)
    assert.equal("bad_response", err.kind)
    assert.is_true(err.retryable)
  end)
end)

for engine, open_db in pairs(engines) do
  describe("reconcile.apply on " .. engine, function()
    local db, m

    before_each(function()
      db = open_db()
      m = fsm.new(fsm.payment, { store = fsm.sql_store{ table = "payments" } })
      assert(m:create(db, { id = "P1", amount = 100 }))
      assert(m:apply(db, "P1", "opened"))
    end)

    it("applies the event with its columns and evidence, in one transaction"
       .. " with the app's schedule", function()
      local scheduled
      local res = assert(reconcile.apply(db, m, {
        kind = "payment", id = "P1", remote = "SUCCESS", event = "succeeded",
        set = { transaction_id = "4200" },
        evidence = { trade_state = "SUCCESS" }
      }, { schedule = function(tx, action, tres)
        scheduled = tres and tres.to
        return tx:exec("UPDATE payments SET checks = checks + 1 WHERE id = $1",
                       { action.id })
      end }))
      assert.is_true(res.applied)
      assert.equal("paid", scheduled)
      local row = m:get(db, "P1")
      assert.same({ "paid", "4200", 1 },
                  { row.state, row.transaction_id, row.checks })
      local entries = audit.entries(db, "payment:P1")
      assert.equal("reconcile", entries[#entries].cause)
      assert.matches("SUCCESS", entries[#entries].evidence)
    end)

    it("a row moved meanwhile (notification first) is skipped, not illegal",
       function()
      assert(m:apply(db, "P1", "succeeded"))
      local before = fsm.stats().illegal_transitions_total
      local res = assert(reconcile.apply(db, m, { kind = "payment", id = "P1",
        remote = "SUCCESS", event = "succeeded" }))
      assert.is_false(res.applied)
      assert.is_true(res.skipped)
      assert.equal(before, fsm.stats().illegal_transitions_total)
    end)

    it("an answer about an attempt the row has left is skipped", function()
      -- the batch read P1 on attempt P1_1; it moved to P1_2 meanwhile
      assert(db:exec("UPDATE payments SET out_trade_no = 'P1_2' WHERE"
                     .. " id = 'P1'"))
      local closed = { kind = "payment", id = "P1", remote = "CLOSED",
                       event = "closed", out_trade_no = "P1_1" }
      local res = assert(reconcile.apply(db, m, closed))
      assert.is_false(res.applied)
      assert.is_true(res.skipped)
      assert.equal("paying", m:get(db, "P1").state)
      -- opts.current decides when given
      res = assert(reconcile.apply(db, m, closed, {
        current = function(row, a) return row.id == a.id end }))
      assert.is_true(res.applied)
      assert.equal("closed", m:get(db, "P1").state)
    end)

    it("an answer about the row's own attempt applies", function()
      assert(db:exec("UPDATE payments SET out_trade_no = 'P1_1' WHERE"
                     .. " id = 'P1'"))
      local res = assert(reconcile.apply(db, m, { kind = "payment",
        id = "P1", remote = "CLOSED", event = "closed",
        out_trade_no = "P1_1" }))
      assert.is_true(res.applied)
      assert.equal("closed", m:get(db, "P1").state)
    end)

    it("a stale fencing token commits nothing", function()
      local l1 = assert(lease.acquire(db, "reconcile:x", 0.05))
      core.sleep(0.1)
      assert(lease.acquire(db, "reconcile:x", 30))            -- a newer holder
      local res, err = reconcile.apply(db, m, { kind = "payment", id = "P1",
        remote = "SUCCESS", event = "succeeded" }, { fence = function(tx)
          return lease.check(tx, "reconcile:x", l1.token) end })
      assert.is_nil(res)
      assert.equal("fenced", err.kind)
      assert.equal("paying", m:get(db, "P1").state)
    end)

    it("a refused schedule write rolls the transition back", function()
      local res, err = reconcile.apply(db, m, { kind = "payment", id = "P1",
        remote = "SUCCESS", event = "succeeded" }, { schedule = function()
          return nil, core.error("boom", "no") end })
      assert.is_nil(res)
      assert.equal("boom", err.kind)
      assert.equal("paying", m:get(db, "P1").state)
    end)
  end)
end

describe("reconcile.runner", function()
  it("refuses bad options (misuse raises)", function()
    local db = new_db()
    assert.has_error(function() reconcile.runner(db, { due = print,
      check = print }) end)
    assert.has_error(function() reconcile.runner(db, { name = "x",
      check = print }) end)
    assert.has_error(function() reconcile.runner(db, { name = "x",
      due = print, check = print, batch = 1.5 }) end)
    -- past 1e8 s the runner's first sleep raised and ended its task
    assert.has_error(function() reconcile.runner(db, { name = "x",
      due = print, check = print, interval = 2e8 }) end,
      "reconcile.runner: opts.interval must be at most 1e8")
    -- a misspelt option ran at the default, unsaid
    assert.has_error(function() reconcile.runner(db, { name = "x",
      due = print, check = print, intervall = 1 }) end,
      "reconcile.runner: unknown option opts.intervall")
  end)

  it("checks due items in a batch; one failing or raising item is"
     .. " rescheduled and the rest go on", function()
    local db = new_db()
    local seen, resched, asked = {}, {}, nil
    local r = reconcile.runner(db, { name = "u1", batch = 5,
      due = function(now, limit)
        asked = limit
        return { "a", "boom", "b", "raise", "c" }
      end,
      check = function(item, ctx)
        assert(ctx.token and ctx.fence)
        if item == "boom" then return nil, core.error("timeout", "slow") end
        if item == "raise" then error("bug in check") end
        seen[#seen + 1] = item
        return true
      end,
      reschedule = function(item, err) resched[item] = err.kind end })
    assert.equal(5, r:step())
    assert.equal(5, asked)
    assert.same({ "a", "b", "c" }, seen)
    assert.same({ boom = "timeout", raise = "internal" }, resched)
    assert.same({ 5, 3, 2 }, { r.stats.items, r.stats.ok, r.stats.errors })
    r:stop()
  end)

  it("a check not done yet (false, why) is rescheduled, counted as"
     .. " waiting and not logged as a failure", function()
    local paygate = require "paygate"
    local db = new_db()
    local resched, warned = {}, {}
    local r = reconcile.runner(db, { name = "w1", batch = 3,
      due = function() return { "made", "not_made", "broken" } end,
      check = function(item)
        if item == "not_made" then
          return false, core.error("statement_creating", "not made yet")
        elseif item == "broken" then
          return nil, core.error("timeout", "slow")
        end
        return true
      end,
      reschedule = function(item, err) resched[item] = err.kind end })
    local warn = paygate.log.warn
    paygate.log.warn = function(msg, fields)
      warned[#warned + 1] = msg .. " " .. tostring(fields and fields.error)
    end
    local ok, n = pcall(r.step, r)
    paygate.log.warn = warn
    r:stop()
    assert(ok, tostring(n))
    assert.equal(3, n)
    assert.same({ not_made = "statement_creating", broken = "timeout" },
                resched)
    assert.same({ 3, 1, 1, 1 }, { r.stats.items, r.stats.ok,
                                  r.stats.waiting, r.stats.errors })
    assert.same({ "reconcile: check failed timeout: slow" }, warned)
  end)

  it("a refusal hold answers seconds for holds its group: the item left"
     .. " due, the group's others skipped untouched, the rest go on; due"
     .. " is told the groups held until the hold is over", function()
    local db = new_db()
    local clock = 1000
    local checked, resched, held_seen = {}, {}, {}
    local items = { { "A", 1 }, { "A", 2 }, { "B", 1 }, { "A", 3 },
                    { "B", 2 }, { "-", 1 } }
    local r = reconcile.runner(db, { name = "h1", batch = 6,
      now = function() return clock end,
      due = function(_, _, held)
        held_seen[#held_seen + 1] = table.concat(held or { "nil" }, ",")
        return items
      end,
      group = function(item)
        if item[1] ~= "-" then return item[1] end
      end,
      hold = function(item, err)
        if err.kind == "circuit_open" then return err.retry_after end
      end,
      check = function(item)
        checked[#checked + 1] = item[1] .. item[2]
        if item[1] == "A" then
          return false, core.error("circuit_open", "open",
                                   { retry_after = 5 })
        end
        if item[1] == "B" and item[2] == 2 then
          return false, core.error("statement_creating", "not yet")
        end
        return true
      end,
      reschedule = function(item, err)
        resched[#resched + 1] = item[1] .. item[2] .. ":" .. err.kind
      end })
    -- A1 refused and held (not rescheduled, not counted as checked), A2
    -- and A3 skipped; B's go on (B2's not-done rescheduled: no hold
    -- answered); an item of no group too
    assert.equal(3, r:step())
    assert.same({ "A1", "B1", "B2", "-1" }, checked)
    assert.same({ "B2:statement_creating" }, resched)
    assert.same({ 1, 2, 2 }, { r.stats.held, r.stats.skipped,
                               r.stats.waiting })
    assert.same({ "" }, held_seen)
    -- within the hold: due is told A is held; A's items are skipped even
    -- if due hands them back
    checked = {}
    clock = clock + 4
    assert.equal(3, r:step())
    assert.same({ "", "A" }, held_seen)
    assert.same({ "B1", "B2", "-1" }, checked)
    assert.equal(5, r.stats.skipped)
    -- the hold over: A's first item is asked again (the probe)
    checked = {}
    clock = clock + 1
    r:step()
    assert.same({ "", "A", "" }, held_seen)
    assert.same("A1", checked[1])
    r:stop()
    -- group and hold go together
    assert.has_error(function() reconcile.runner(db, { name = "x",
      due = print, check = print, group = print }) end,
      "reconcile.runner: opts.group and opts.hold go together")
  end)

  it("a round whose check was refused and held does not start the next at"
     .. " once, even a full batch of a zero hold (no spin)", function()
    local db = new_db()
    local rounds, asked = 0, 0
    local r = reconcile.runner(db, { name = "h2", batch = 2,
      interval = 0.2,
      due = function()
        rounds = rounds + 1
        return { "a", "b" }
      end,
      group = function(item) return item end,
      hold = function() return 0 end,
      check = function()
        asked = asked + 1
        return false, core.error("circuit_open", "open")
      end })
    -- a full batch, every check refused: the next round after interval,
    -- not at once
    local t0 = core.mono()
    r:start()
    local deadline = t0 + 10
    while rounds < 3 and core.mono() < deadline do core.sleep(0.01) end
    local took = core.mono() - t0
    r:stop()
    assert.is_true(rounds >= 3, rounds .. " rounds")
    assert.is_true(took >= 0.35, "3 rounds in " .. took .. " s")
    assert.is_true(asked <= 2 * rounds, asked .. " checks in " .. rounds
                   .. " rounds")
  end)

  it("a store that keeps refusing the lease is logged once a minute, not"
     .. " every round (a full disk: every runner of every worker, every"
     .. " 5 s)", function()
    local paygate = require "paygate"
    local db = new_db()
    local function mk()
      return reconcile.runner(db, { name = "quiet", due = function()
        return {} end, check = function() return true end })
    end
    local r0 = mk()
    assert.equal(0, r0:step())          -- the leases' table
    r0:stop()
    local function refuse(why)
      assert(db:exec("DROP TRIGGER IF EXISTS refuse"))
      assert(db:exec("CREATE TRIGGER refuse BEFORE UPDATE ON paygate_leases"
                     .. " BEGIN SELECT RAISE(ABORT, '" .. why .. "'); END"))
    end
    refuse("the disk is full")
    local lines = {}
    local warn = paygate.log.warn
    paygate.log.warn = function(msg, fields)
      if msg == "reconcile: lease" then lines[#lines + 1] = fields end
    end
    local r = mk()
    local ok, err = pcall(function()
      for _ = 1, 5 do assert.equal(0, r:step()) end
      refuse("an I/O error")            -- another cause: said at once
      for _ = 1, 3 do assert.equal(0, r:step()) end
    end)
    paygate.log.warn = warn
    r:stop()
    assert(ok, tostring(err))
    assert.equal(2, #lines, #lines .. " lines for 8 rounds")
    assert.matches("the disk is full", lines[1].error, 1, true)
    assert.matches("an I/O error", lines[2].error, 1, true)
    assert.equal(4, lines[2].repeated)  -- the first cause's rounds unsaid
  end)

  it("one runner at a time per name: the second waits for the lease",
     function()
    local db = new_db()
    local count = 0
    local function mk()
      return reconcile.runner(db, { name = "one", due = function()
        return { 1 } end, check = function() count = count + 1; return true
        end })
    end
    local a, b = mk(), mk()
    assert.equal(1, a:step())
    local nb, err = b:step()
    assert.equal(0, nb)
    assert.equal("held", err.kind)
    a:stop()                                   -- releases
    assert.equal(1, b:step())
    assert.equal(2, count)
    b:stop()
  end)

  it("yields between items: another task runs during a batch", function()
    local db = new_db()
    local ticks, during = 0, {}
    local r = reconcile.runner(db, { name = "y", due = function()
      return { 1, 2, 3 } end, check = function(i)
      during[i] = ticks
      return true
    end })
    local done = false
    local t = core.spawn(function()
      while not done do ticks = ticks + 1; core.sleep(0) end
    end)
    r:step()
    done = true
    t:wait()
    assert.is_true(during[3] > during[1])
    r:stop()
  end)

  it("measures each check; a lease_ttl function sets the lease's ttl",
     function()
    local db = new_db()
    local measured, asked = {}, 0
    local r = reconcile.runner(db, { name = "m",
      lease_ttl = function() asked = asked + 1; return 7 end,
      measure = function(s) measured[#measured + 1] = s end,
      due = function() return { 1, 2 } end,
      check = function() core.sleep(0.02); return true end })
    assert.equal(2, r:step())
    assert.equal(2, #measured)
    assert.is_true(measured[1] >= 0.015 and measured[1] < 5, "measured "
                   .. tostring(measured[1]) .. ", " .. tostring(measured[2]))
    assert.is_true(asked >= 1)
    assert.equal(7, r.lease.ttl)
    r:stop()
    -- a function that fails keeps the default
    r = reconcile.runner(db, { name = "m2", lease_ttl = function()
      error("no") end, due = function() return {} end,
      check = function() return true end })
    r:step()
    assert.equal(60, r.lease.ttl)
    r:stop()
  end)

  it("start runs rounds until stop", function()
    local db = new_db()
    local rounds = 0
    local r = reconcile.runner(db, { name = "s", interval = 0.01,
      due = function() rounds = rounds + 1; return {} end,
      check = function() return true end })
    r:start()
    local deadline = core.time() + 5
    while rounds < 3 and core.time() < deadline do core.sleep(0.01) end
    r:stop()
    assert.is_true(rounds >= 3)
  end)
end)

describe("reconcile.refund_limit", function()
  local refunds = { { amount = 30, state = "succeeded" },
                    { amount = 20, state = "processing" },
                    { amount = 40, state = "failed" },
                    { amount = 25, state = "closed" } }

  it("counts refunds not failed or closed", function()
    assert.equal(50, reconcile.refundable(100, refunds))
    assert.equal(0, reconcile.refund_limit(100, refunds, 50))
  end)

  it("refuses an amount above what is left", function()
    local ok, err = reconcile.refund_limit(100, refunds, 51)
    assert.is_nil(ok)
    assert.equal("refund_exceeds_paid", err.kind)
    assert.same({ 50, 51 }, { err.refundable, err.requested })
    assert.equal("refund_exceeds_paid: refund: 51 fen is above the 50 fen"
                 .. " still refundable", tostring(err))
  end)

  it("reads the states in any case (WeChat's CLOSED as it came)", function()
    local upper = { { amount = 30, state = "SUCCESS" },
                    { amount = 40, state = "FAILED" },
                    { amount = 25, state = "CLOSED" } }
    assert.equal(70, reconcile.refundable(100, upper))
    assert.equal(0, reconcile.refund_limit(100, upper, 70))
  end)

  it("refuses a 51st refund of one order (WeChat takes 50)", function()
    local list = {}
    for i = 1, 49 do list[i] = { amount = 1, state = "succeeded" } end
    list[50] = { amount = 1, state = "failed" }     -- refused: not counted
    assert.equal(950, reconcile.refund_limit(1000, list, 1))
    list[51] = { amount = 1, state = "closed" }     -- taken: counted
    local ok, err = reconcile.refund_limit(1000, list, 1)
    assert.is_nil(ok)
    assert.equal("refund_limit", err.kind)
    assert.same({ 50, 951 }, { err.refunds, err.refundable })
    assert.matches("at most 50", tostring(err))
  end)

  it("refuses amounts that are not whole positive fen", function()
    for _, a in ipairs({ 0, -1, 1.5, 0 / 0, "10" }) do
      local ok, err = reconcile.refund_limit(100, {}, a)
      assert.is_nil(ok)
      assert.equal("invalid_amount", err.kind)
    end
    local ok, err = reconcile.refundable(100, { { amount = 1.5 } })
    assert.is_nil(ok)
    assert.equal("invalid_amount", err.kind)
  end)
end)

describe("bill.parse_fen", function()
  it("reads yuan text into exact fen", function()
    local cases = { ["0.10"] = 10, ["0.01"] = 1, ["1"] = 100, ["1.5"] = 150,
                    ["12.34"] = 1234, ["0.74000"] = 74, ["007.00"] = 700,
                    ["0.29"] = 29, ["1.13"] = 113, ["4.35"] = 435,
                    ["9999999999999.99"] = 999999999999999,
                    ["0"] = 0 }
    for s, want in pairs(cases) do
      assert.equal(want, bill.parse_fen(s), s)
    end
    -- the float trap: 0.29 * 100 = 28.999999999999996 and 4.35 * 100 =
    -- 434.99999999999994, which truncate to the wrong fen
    assert.is_true(math.floor(4.35 * 100) ~= 435)
  end)

  it("refuses anything else", function()
    for _, s in ipairs({ "", "-1.00", "+1", "1,000.00", " 1.00", "1.00 ",
                         "1e3", ".5", "5.", "0.001", "1.234",
                         "99999999999999.00", "0x10", "１.00", "nan" }) do
      local v, err = bill.parse_fen(s)
      assert.is_nil(v, s)
      assert.equal("bad_amount", err.kind)
    end
    assert.equal("bad_amount", select(2, bill.parse_fen(nil)).kind)
  end)
end)

describe("bill.bill_date / day_start", function()
  it("is the Beijing date before now's", function()
    -- 2026-11-29T16:00:00Z is 2026-11-30 00:00 in Beijing
    local t = bill.day_start("2026-11-30")
    assert.equal("2026-11-29", bill.bill_date(t))
    assert.equal("2026-11-28", bill.bill_date(t - 1))
    -- (now taken once: two reads a second apart made the zone's offset
    -- a second off)
    local now = os.time()
    assert.equal(os.time{ year = 2026, month = 11, day = 29, hour = 16,
                          isdst = false } - (now - os.time(
                          os.date("!*t", now))), t)
    assert.equal("2024-02-29", bill.bill_date(bill.day_start("2024-03-01")))
  end)
end)

describe("bill.diff", function()
  local remote = {
    payments = {
      T1 = { amount = 100, state = "SUCCESS" },
      T2 = { amount = 200, state = "SUCCESS" },   -- local 199
      T3 = { amount = 300, state = "SUCCESS" },   -- not local
      T5 = { amount = 500, state = "SUCCESS" },   -- local closed
    },
    refunds = {
      R1 = { out_trade_no = "T1", amount = 50, state = "SUCCESS" },
      R2 = { out_trade_no = "T1", amount = 10, state = "SUCCESS" }, -- 11
    },
  }
  local rows = {
    { out_trade_no = "T1", amount = 100, state = "partially_refunded" },
    { out_trade_no = "T2", amount = 199, state = "paid" },
    { out_trade_no = "T4", amount = 400, state = "paid" },      -- not remote
    { out_trade_no = "T5", amount = 500, state = "closed" },
    { out_trade_no = "T6", amount = 600, state = "paying" },    -- not paid
    { out_trade_no = "T1", out_refund_no = "R1", amount = 50,
      state = "succeeded" },
    { out_trade_no = "T1", out_refund_no = "R2", amount = 11,
      state = "succeeded" },
    { out_trade_no = "T1", out_refund_no = "R3", amount = 5,
      state = "succeeded" },                                    -- not remote
  }

  it("finds every kind, sorted, and nothing for matching rows", function()
    local out = bill.diff(remote, rows)
    local got = {}
    for _, m in ipairs(out) do
      got[#got + 1] = m.kind .. " " .. m.out_trade_no .. " "
                      .. tostring(m.out_refund_no)
    end
    assert.same({ "missing_local T3 nil", "missing_remote T1 R3",
                  "missing_remote T4 nil", "amount T1 R2", "amount T2 nil",
                  "state T5 nil" }, got)
    assert.equal(199, out[5]["local"].amount)
    assert.equal(200, out[5].remote.amount)
    assert.is_nil(out[1]["local"])
  end)

  it("a refund WeChat's bill lists PROCESSING is no mismatch while it is"
     .. " processing here too (nor a lost one: it is missing here)",
     function()
    local r = { payments = {}, refunds = {
      R7 = { out_trade_no = "T7", amount = 70, state = "PROCESSING" },
      R8 = { out_trade_no = "T8", amount = 80, state = "PROCESSING" },
      R9 = { out_trade_no = "T9", amount = 90, state = "PROCESSING" } } }
    local out = bill.diff(r, {
      { out_trade_no = "T7", out_refund_no = "R7", amount = 70,
        state = "processing" },
      { out_trade_no = "T8", out_refund_no = "R8", amount = 80,
        state = "failed" } })
    local got = {}
    for _, m in ipairs(out) do
      got[#got + 1] = m.kind .. " " .. tostring(m.out_refund_no)
    end
    assert.same({ "missing_local R9", "state R8" }, got)
    -- a processing refund of another amount is still an amount mismatch
    out = bill.diff(r, { { out_trade_no = "T7", out_refund_no = "R7",
                           amount = 71, state = "processing" } })
    assert.equal("amount", out[#out].kind)
  end)

  it("an empty day: every locally paid row is missing remotely", function()
    local out = bill.diff({ payments = {}, refunds = {} }, {
      { out_trade_no = "T4", amount = 400, state = "paid" } })
    assert.equal(1, #out)
    assert.equal("missing_remote", out[1].kind)
  end)
end)

describe("bill.csv", function()
  it("quotes and defuses hostile values", function()
    local text = bill.csv("2026-11-29", {
      { kind = "state", out_trade_no = '=HYPERLINK("http://x","a,b")',
        ["local"] = { state = "+cmd|' /C calc'!A0", amount = 5 },
        remote = { state = "line1\r\nline2", amount = 6 } },
      { kind = "missing_local", out_trade_no = "@SUM(1)",
        remote = { state = "-2+3", amount = 0 } },
      { kind = "amount", out_trade_no = "\tT", out_refund_no = 'q"q' },
    })
    local lines = {}
    for l in text:gmatch("(.-)\r\n") do lines[#lines + 1] = l end
    assert.equal("bill_date,kind,out_trade_no,out_refund_no,local_state,"
                 .. "local_amount,remote_state,remote_amount,sub_mchid",
                 lines[1])
    assert.equal('2026-11-29,state,"\'=HYPERLINK(""http://x"",""a,b"")",,'
                 .. "'+cmd|' /C calc'!A0,5,\"line1", lines[2])
    assert.equal('line2",6,', lines[3])            -- inside the quotes
    assert.equal("2026-11-29,missing_local,'@SUM(1),,,,'-2+3,0,", lines[4])
    assert.equal("2026-11-29,amount,'\tT,\"q\"\"q\",,,,,", lines[5])
    assert.equal("", bill.csv_field(nil))
    assert.equal("12", bill.csv_field(12))
  end)

  it("reads back what it writes: quotes, commas, CR LF inside a field;"
     .. " at most limit rows", function()
    local path = tmp .. "/read.csv"
    assert(bill.write_atomic(path, bill.csv("2026-11-29", {
      { kind = "state", out_trade_no = 'a,"b"', ["local"] = { state =
        "x\r\ny", amount = 5 }, remote = { state = "SUCCESS", amount = 6 } },
      { kind = "amount", out_trade_no = "T2" },
      { kind = "amount", out_trade_no = "T3" } })))
    local head, rows, more = bill.read_csv(path, 2)
    assert.equal("bill_date", head[1])
    assert.equal(9, #head)
    assert.equal(2, #rows)
    assert.is_true(more)               -- T3 was not read: said
    local _, all, more3 = bill.read_csv(path, 3)
    assert.equal(3, #all)
    assert.is_false(more3)
    assert.is_false(select(3, bill.read_csv(path, 10)))
    assert.same({ "2026-11-29", "state", 'a,"b"', "", "x\r\ny", "5",
                  "SUCCESS", "6", "" }, rows[1])
    assert.equal("T2", rows[2][3])
    assert.is_nil(bill.read_csv(tmp .. "/no-such.csv", 2))
  end)

  it("writes atomically: the file appears whole, no part left", function()
    local path = tmp .. "/report.csv"
    assert(bill.write_atomic(path, "a,b\r\n"))
    assert(bill.write_atomic(path, "c,d\r\n"))
    local f = assert(io.open(path, "rb"))
    assert.equal("c,d\r\n", f:read("*a"))
    f:close()
    for _, name in ipairs(core.listdir(tmp)) do
      assert.is_nil(name:find(".part-", 1, true), name)
    end
    local ok, err = bill.write_atomic(tmp .. "/no/such/dir/x.csv", "x")
    assert.is_nil(ok)
    assert.equal("io", err.kind)
  end)
end)

-- a trade bill's header line, as WeChat writes it
local TRADE_HEAD = "交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,"
  .. "商户订单号,用户标识,交易类型,交易状态,付款银行,货币种类,应结订单金额,"
  .. "代金券金额,微信退款单号,商户退款单号,退款金额,充值券退款金额,退款类型,"
  .. "退款状态,商品名称,商户数据包,手续费,费率,订单金额,申请退款金额,费率备注"

-- bill.records of text, written to tmp/name first
local function bill_of(text, name)
  local path = tmp .. "/" .. name
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
  return bill.records(path)
end

-- a client whose trade bill of any day is text
local function bill_wx(text)
  return {
    trade_bill = function() return { download_url = "x" } end,
    download_bill = function(_, _, path)
      local f = assert(io.open(path, "wb"))
      f:write(text)
      f:close()
      return { path = path }
    end,
  }
end

describe("bill.records", function()
  it("reads a trade bill into fen by out_trade_no and out_refund_no",
     function()
    local path = tmp .. "/bill.csv"
    local f = assert(io.open(path, "wb"))
    f:write("交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,商户订单号,"
      .. "用户标识,交易类型,交易状态,付款银行,货币种类,应结订单金额,代金券金额,"
      .. "微信退款单号,商户退款单号,退款金额,充值券退款金额,退款类型,退款状态,"
      .. "商品名称,商户数据包,手续费,费率,订单金额,申请退款金额,费率备注\r\n")
    f:write("`2026-11-29 10:00:00,`wx1,`1900,`0,`,`4200001,`T1,`o1,`NATIVE,"
      .. "`SUCCESS,`OTHERS,`CNY,`0.29,`0.00,`0,`0,`0.00,`0.00,`,`,`a,b,`,"
      .. "`0.00000,`0.60%,`0.29,`0.00,`\r\n")
    f:write("`2026-11-29 11:00:00,`wx1,`1900,`0,`,`4200001,`T1,`o1,`NATIVE,"
      .. "`REFUND,`OTHERS,`CNY,`0.00,`0.00,`5000001,`R1,`0.10,`0.00,"
      .. "`ORIGINAL,`SUCCESS,`a,`,`0.00000,`0.60%,`0.00,`0.10,`\r\n")
    f:write("总交易单数,应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,"
      .. "订单总金额,申请退款总金额\r\n`2,`0.29,`0.10,`0.00,`0.00000,`0.29,"
      .. "`0.10\r\n")
    f:close()
    local r = assert(bill.records(path))
    assert.same({ out_trade_no = "T1", amount = 29, state = "SUCCESS",
                  transaction_id = "4200001" }, r.payments.T1)
    assert.same({ out_refund_no = "R1", out_trade_no = "T1", amount = 10,
                  state = "SUCCESS", refund_id = "5000001" }, r.refunds.R1)
    assert.equal(2, r.lines)
  end)

  it("a service provider's bill: each line's sub-merchant, in the report's"
     .. " sub_mchid column", function()
    -- (was: the report had no such column: a provider's missing_local
    -- line, an order of one of its sub-merchants unknown here, did not say
    -- whose, and the order is asked about under its sub_mchid)
    local path = tmp .. "/partner-bill.csv"
    local f = assert(io.open(path, "wb"))
    f:write(TRADE_HEAD .. "\r\n")
    f:write("`2026-11-29 10:00:00,`wx1,`1900,`1600000001,`,`4200001,`T1,`o1,"
      .. "`NATIVE,`SUCCESS,`OTHERS,`CNY,`0.29,`0.00,`0,`0,`0.00,`0.00,`,`,"
      .. "`a,`,`0.00000,`0.60%,`0.29,`0.00,`\r\n")
    f:write("`2026-11-29 11:00:00,`wx1,`1900,`1600000002,`,`4200002,`T2,`o1,"
      .. "`NATIVE,`REFUND,`OTHERS,`CNY,`0.00,`0.00,`5000001,`R2,`0.10,"
      .. "`0.00,`ORIGINAL,`SUCCESS,`a,`,`0.00000,`0.60%,`0.00,`0.10,`\r\n")
    f:write("总交易单数,应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,"
      .. "订单总金额,申请退款总金额\r\n`2,`0.29,`0.10,`0.00,`0.00000,`0.29,"
      .. "`0.10\r\n")
    f:close()
    local r = assert(bill.records(path))
    -- (keyed by sub-merchant and number: bill.key)
    assert.equal("1600000001/T1", bill.key("1600000001", "T1"))
    assert.equal("1600000001", r.payments["1600000001/T1"].sub_mchid)
    assert.equal("1600000002", r.refunds["1600000002/R2"].sub_mchid)
    -- and a local row the bill lacks, by its own sub_mchid
    local out = bill.diff(r, { { out_trade_no = "T3", amount = 5,
      state = "paid", sub_mchid = "1600000003" } })
    local lines = {}
    for l in bill.csv("2026-11-29", out):gmatch("(.-)\r\n") do
      lines[#lines + 1] = l
    end
    assert.equal("sub_mchid", lines[1]:match("([^,]+)$"))
    assert.same({
      "2026-11-29,missing_local,T1,,,,SUCCESS,29,1600000001",
      "2026-11-29,missing_local,T2,R2,,,SUCCESS,10,1600000002",
      "2026-11-29,missing_remote,T3,,paid,5,,,1600000003",
    }, { lines[2], lines[3], lines[4] })
    assert.equal("1600000001", bill.finding(out[1]).sub_mchid)
  end)

  it("a service provider's bill: two sub-merchants' orders and refunds of"
     .. " one number are each matched to their own sub-merchant's row",
     function()
    -- (was: matched by number alone, the second line of a number was a
    -- duplicate_line, or compared with the other sub-merchant's row: an
    -- amount or state mismatch of a payment that agreed, and the other's
    -- order never said missing)
    local path = tmp .. "/partner-same-number.csv"
    local f = assert(io.open(path, "wb"))
    f:write(TRADE_HEAD .. "\r\n")
    -- sub-merchant 1600000002's first (another system's order T1), then
    -- 1600000001's T1, then each one's refund R1
    f:write("`2026-11-29 09:00:00,`wx1,`1900,`1600000002,`,`4200002,`T1,"
      .. "`o2,`NATIVE,`SUCCESS,`OTHERS,`CNY,`0.41,`0.00,`0,`0,`0.00,`0.00,"
      .. "`,`,`a,`,`0.00000,`0.60%,`0.41,`0.00,`\r\n")
    f:write("`2026-11-29 10:00:00,`wx1,`1900,`1600000001,`,`4200001,`T1,"
      .. "`o1,`NATIVE,`SUCCESS,`OTHERS,`CNY,`0.40,`0.00,`0,`0,`0.00,`0.00,"
      .. "`,`,`a,`,`0.00000,`0.60%,`0.40,`0.00,`\r\n")
    f:write("`2026-11-29 11:00:00,`wx1,`1900,`1600000002,`,`4200002,`T1,"
      .. "`o2,`NATIVE,`REFUND,`OTHERS,`CNY,`0.00,`0.00,`5000002,`R1,`0.05,"
      .. "`0.00,`ORIGINAL,`SUCCESS,`a,`,`0.00000,`0.60%,`0.00,`0.05,`\r\n")
    f:write("`2026-11-29 12:00:00,`wx1,`1900,`1600000001,`,`4200001,`T1,"
      .. "`o1,`NATIVE,`REFUND,`OTHERS,`CNY,`0.00,`0.00,`5000001,`R1,`0.10,"
      .. "`0.00,`ORIGINAL,`SUCCESS,`a,`,`0.00000,`0.60%,`0.00,`0.10,`\r\n")
    f:close()
    local r = assert(bill.records(path))
    assert.equal(4, r.lines)
    assert.same({}, r.duplicates)
    assert.equal(40, r.payments["1600000001/T1"].amount)
    assert.equal(41, r.payments["1600000002/T1"].amount)
    assert.equal("T1", r.payments["1600000002/T1"].out_trade_no)
    assert.equal("R1", r.refunds["1600000002/R1"].out_refund_no)
    -- the app's rows: 1600000001's order and refund, each agreeing
    local mine = {
      { out_trade_no = "T1", amount = 40, state = "partially_refunded",
        sub_mchid = "1600000001" },
      { out_trade_no = "T1", out_refund_no = "R1", amount = 10,
        state = "succeeded", sub_mchid = "1600000001" } }
    local got = {}
    for _, m in ipairs(bill.diff(r, mine)) do
      local x = bill.finding(m)
      got[#got + 1] = table.concat({ x.kind, x.out_trade_no,
        tostring(x.out_refund_no), tostring(x.remote_amount),
        tostring(x.sub_mchid) }, " ")
    end
    -- 1600000002's lines are no order of the app's: missing here, under
    -- that sub-merchant; 1600000001's agree
    assert.same({ "missing_local T1 nil 41 1600000002",
                  "missing_local T1 R1 5 1600000002" }, got)
    -- a row of the other sub-merchant, local only: missing remotely
    local out = bill.diff(r, { mine[1], mine[2], { out_trade_no = "T9",
      amount = 9, state = "paid", sub_mchid = "1600000002" } })
    assert.equal("missing_remote", out[#out].kind)
    assert.equal("1600000002", bill.finding(out[#out]).sub_mchid)
    -- an app whose rows do not say their sub-merchant: matched by number
    -- alone, as before (a direct merchant's bill has no sub-merchant)
    local d = assert(bill_of(TRADE_HEAD .. "\r\n"
      .. "`2026-11-29 10:00:00,`wx1,`1900,`1600000003,`,`4200005,`T5,`o1,"
      .. "`NATIVE,`SUCCESS,`OTHERS,`CNY,`0.29,`0.00,`0,`0,`0.00,`0.00,`,`,"
      .. "`a,`,`0.00000,`0.60%,`0.29,`0.00,`\r\n"
      .. "`2026-11-29 11:00:00,`wx1,`1900,`1600000003,`,`4200005,`T5,`o1,"
      .. "`NATIVE,`REFUND,`OTHERS,`CNY,`0.00,`0.00,`5000005,`R5,`0.10,"
      .. "`0.00,`ORIGINAL,`SUCCESS,`a,`,`0.00000,`0.60%,`0.00,`0.10,`\r\n",
      "partner-no-sub.csv"))
    assert.same({}, bill.diff(d, {
      { out_trade_no = "T5", amount = 29, state = "partially_refunded" },
      { out_trade_no = "T5", out_refund_no = "R5", amount = 10,
        state = "succeeded" } }))
  end)

  it("a big bill is read and diffed in pieces: other tasks run meanwhile",
     function()
    local path = tmp .. "/big.csv"
    local f = assert(io.open(path, "wb"))
    f:write("商户订单号,交易状态,订单金额\r\n")
    local rows = {}
    for i = 1, 20000 do
      f:write(("`T%06d,`SUCCESS,`%d.%02d\r\n"):format(i, i % 1000, i % 100))
      rows[i] = { out_trade_no = ("T%06d"):format(i), state = "paid",
                  amount = (i % 1000) * 100 + i % 100 }
    end
    f:close()
    rows[7].amount = 1                             -- one differs
    local ticks, done = 0, false
    local t = core.spawn(function()
      while not done do ticks = ticks + 1; core.sleep(0) end
    end)
    local r = assert(bill.records(path))
    local after_read = ticks
    local out = bill.diff(r, rows)
    done = true
    t:wait()
    assert.equal(20000, r.lines)
    assert.is_true(after_read >= 5, "yields while reading")
    assert.is_true(ticks > after_read + 5, "yields while comparing")
    assert.equal(1, #out)
    assert.same({ "amount", "T000007" }, { out[1].kind, out[1].out_trade_no })
  end)

  it("a day's refund of an earlier day's payment, with a coupon: no"
     .. " mismatch", function()
    -- today: T2 paid; a refund R1 of T1, paid on an earlier day (so not in
    -- this bill), 0.10 asked for, 0.08 of it money (a coupon's 0.02 not)
    local text = TRADE_HEAD .. "\r\n"
      .. "`2026-11-29 10:00:00,`wx1,`1900,`0,`,`4200002,`T2,`o1,`NATIVE,"
      .. "`SUCCESS,`OTHERS,`CNY,`0.29,`0.00,`0,`0,`0.00,`0.00,`,`,`a,`,"
      .. "`0.00000,`0.60%,`0.29,`0.00,`\r\n"
      .. "`2026-11-29 11:00:00,`wx1,`1900,`0,`,`4200001,`T1,`o1,`NATIVE,"
      .. "`REFUND,`OTHERS,`CNY,`0.00,`0.00,`5000001,`R1,`0.08,`0.00,"
      .. "`ORIGINAL,`SUCCESS,`a,`,`0.00000,`0.60%,`0.00,`0.10,`\r\n"
    local wx = bill_wx(text)
    local db = new_db()
    local dir = tmp .. "/daily"
    os.execute("mkdir -p " .. dir)
    local asked
    local report = assert(bill.daily{ wx = wx, db = db, dir = dir,
      date = "2026-11-29", local_rows = function(_, numbers)
        asked = numbers
        -- as the gateway's: the day's paid payments, every payment the
        -- bill names (T1 is paid here too), the day's refunds
        local rows = { { out_trade_no = "T2", amount = 29, state = "paid" },
                       { out_trade_no = "T1", out_refund_no = "R1",
                         amount = 10, state = "succeeded" } }
        for _, no in ipairs(numbers) do
          if no ~= "T2" then
            rows[#rows + 1] = { out_trade_no = no, amount = 50,
                                state = "paid" }
          end
        end
        return rows
      end })
    assert.same({ "T2" }, asked)
    assert.same({}, report.mismatches)
    db:close()
  end)

  it("each finding is in the day's audit entry, not only its count",
     function()
    local text = TRADE_HEAD .. "\r\n"
      .. "`2026-11-29 10:00:00,`wx1,`1900,`0,`,`4200002,`T2,`o1,`NATIVE,"
      .. "`SUCCESS,`OTHERS,`CNY,`0.29,`0.00,`0,`0,`0.00,`0.00,`,`,`a,`,"
      .. "`0.00000,`0.60%,`0.29,`0.00,`\r\n"
      .. "`2026-11-29 10:01:00,`wx1,`1900,`0,`,`4200003,`T3,`o1,`NATIVE,"
      .. "`SUCCESS,`OTHERS,`CNY,`0.30,`0.00,`0,`0,`0.00,`0.00,`,`,`a,`,"
      .. "`0.00000,`0.60%,`0.30,`0.00,`\r\n"
    local wx = bill_wx(text)
    local db = new_db()
    local dir = tmp .. "/findings"
    os.execute("mkdir -p " .. dir)
    local report = assert(bill.daily{ wx = wx, db = db, dir = dir,
      date = "2026-11-29", local_rows = function()
        return { { out_trade_no = "T2", amount = 28, state = "paid" },
                 { out_trade_no = "T4", amount = 40, state = "paid" } }
      end })
    assert.equal(3, report.counts.total)
    local e = audit.entries(db, "reconcile:2026-11-29")
    local ev = json.decode(e[#e].evidence)
    -- as the CSV has them: kind, numbers, local and remote state and amount
    assert.same({
      { kind = "missing_local", out_trade_no = "T3", remote_state = "SUCCESS",
        remote_amount = 30 },
      { kind = "missing_remote", out_trade_no = "T4", local_state = "paid",
        local_amount = 40 },
      { kind = "amount", out_trade_no = "T2", local_state = "paid",
        local_amount = 28, remote_state = "SUCCESS", remote_amount = 29 },
    }, ev.findings)
    assert.is_nil(ev.findings_omitted)
    -- a day with more than the entry holds: the first ones, and how many
    -- more the CSV (its sha256 in the entry) has
    local rows = {}
    for i = 1, bill.AUDIT_FINDINGS + 5 do
      rows[i] = { out_trade_no = string.format("L%05d", i), amount = 1,
                  state = "paid" }
    end
    assert(bill.daily{ wx = wx, db = db, dir = dir, date = "2026-11-29",
                       local_rows = function() return rows end })
    e = audit.entries(db, "reconcile:2026-11-29")
    ev = json.decode(e[#e].evidence)
    assert.equal(bill.AUDIT_FINDINGS, #ev.findings)
    assert.equal(7, ev.findings_omitted)     -- T2 and T3 too
    db:close()
  end)

  -- 500 findings with refund numbers as long as WeChat allows (64) pass
  -- an entry's evidence cap (audit.MAX_EVIDENCE): the entry lists as many
  -- as fit AUDIT_FINDINGS_BYTES and counts the rest, so the day's audit
  -- entry is still written
  it("a day's findings are held within an audit entry's evidence cap",
     function()
    local wx = bill_wx(TRADE_HEAD .. "\r\n")
    local db = new_db()
    local dir = tmp .. "/findings_cap"
    os.execute("mkdir -p " .. dir)
    local rows = {}
    for i = 1, bill.AUDIT_FINDINGS do
      rows[i] = { out_trade_no = string.format("T%031d", i),
                  out_refund_no = string.format("R%063d", i),
                  amount = 1234567890, state = "succeeded" }
    end
    local report = assert(bill.daily{ wx = wx, db = db, dir = dir,
      date = "2026-11-28", local_rows = function() return rows end })
    assert.equal(bill.AUDIT_FINDINGS, report.counts.total)
    local e = audit.entries(db, "reconcile:2026-11-28")
    assert.truthy(#e[#e].evidence <= audit.MAX_EVIDENCE)
    local ev = json.decode(e[#e].evidence)
    assert.truthy(#ev.findings > 100 and #ev.findings < bill.AUDIT_FINDINGS)
    assert.equal(bill.AUDIT_FINDINGS - #ev.findings, ev.findings_omitted)
    assert.equal(report.mismatches[1].out_refund_no,
                 ev.findings[1].out_refund_no)
    assert.equal(report.mismatches[#ev.findings].out_refund_no,
                 ev.findings[#ev.findings].out_refund_no)
    db:close()
  end)

  it("a description holding \",`\" does not shift the amounts; a line cut"
     .. " short is refused", function()
    local path = tmp .. "/shifted.csv"
    local f = assert(io.open(path, "wb"))
    -- 商品名称 "tea,`0.60%,`9.99" (a merchant's description), attach "x"
    f:write(TRADE_HEAD .. "\r\n"
      .. "`2026-11-29 10:00:00,`wx1,`1900,`0,`,`4200003,`T3,`o1,`NATIVE,"
      .. "`SUCCESS,`OTHERS,`CNY,`0.30,`0.00,`0,`0,`0.00,`0.00,`,`,"
      .. "`tea,`0.60%,`9.99,`x,`0.00000,`0.60%,`0.31,`0.00,`\r\n")
    f:close()
    local r = assert(bill.records(path))
    assert.same({ out_trade_no = "T3", amount = 31, state = "SUCCESS",
                  transaction_id = "4200003" }, r.payments.T3)
    local rows = {}
    for kind, row in require("paygate.wechatpay.bill").rows(path) do
      if kind == "record" then rows[#rows + 1] = row end
    end
    assert.is_true(rows[1].realigned)
    assert.equal("tea,`0.60%,`9.99", rows[1]["商品名称"])
    assert.equal("x", rows[1]["商户数据包"])
    assert.equal("0.60%", rows[1]["费率"])
    -- cut short: refused, not read from the wrong columns
    f = assert(io.open(path, "wb"))
    f:write(TRADE_HEAD .. "\r\n"
      .. "`2026-11-29 10:00:00,`wx1,`1900,`0,`,`4200003,`T3,`o1,`NATIVE,"
      .. "`SUCCESS,`OTHERS,`CNY,`0.30,`0.00\r\n")
    f:close()
    local none, err = bill.records(path)
    assert.is_nil(none)
    assert.equal("bad_bill", err.kind)
    assert.matches("line 1 has 14 fields, its header 27", err.message, 1,
                   true)
  end)

  it("a record broken across lines is a bad bill naming the line, not the"
     .. " start of the summary", function()
    local function line(no, last)
      return "`2026-11-29 10:00:00,`wx1,`1900,`0,`,`42" .. no .. ",`" .. no
        .. ",`o1,`NATIVE,`SUCCESS,`OTHERS,`CNY,`0.29,`0.00,`0,`0,`0.00,"
        .. "`0.00,`,`,`tea,`,`0.00000,`0.60%,`0.29,`0.00,`" .. (last or "")
        .. "\r\n"
    end
    local SUMMARY = "总交易单数,应结订单总金额,退款总金额,充值券退款总金额,"
      .. "手续费总金额,订单总金额,申请退款金额\r\n`3,`0.87,`0.00,`0.00,"
      .. "`0.00000,`0.87,`0.00\r\n"
    local function records(text) return bill_of(text, "broken.csv") end
    -- the whole bill reads
    local r = assert(records(TRADE_HEAD .. "\r\n" .. line("T1") .. line("T2")
                             .. line("T3") .. SUMMARY))
    assert.equal(3, r.lines)
    local cases = {
      -- a line break in the last field (费率备注) of T1: the rest of it
      -- looked like the summary header, and T2, T3 like its rows
      { line("T1", "a\nb") .. line("T2") .. line("T3") .. SUMMARY, 4,
        "a summary row of 27 fields under a summary header (line 3) of 1" },
      -- the same in the last record: the rest, then the summary header
      { line("T1") .. line("T2") .. line("T3", "a\nb") .. SUMMARY, 6,
        "a third header line (the summary's was line 5)" },
      -- the same, the file ending there
      { line("T1") .. line("T2") .. line("T3", "a\nb"), 5,
        "a header line with no row under it" },
    }
    for i, c in ipairs(cases) do
      local none, err = records(TRADE_HEAD .. "\r\n" .. c[1])
      assert.is_nil(none, "case " .. i)
      assert.equal("bad_bill", err.kind, "case " .. i)
      assert.equal(c[2], err.file_line, "case " .. i)
      assert.matches("bill: line " .. c[2] .. ": " .. c[3], err.message, 1,
                     true)
      assert.matches("a record broken across lines", err.message, 1, true)
    end
    -- in the description (商品名称): T2 cut short, then the rest of it
    local text = line("T1") .. line("T2"):gsub("`tea", "`te\na")
    local none, err = records(TRADE_HEAD .. "\r\n" .. text .. line("T3")
                              .. SUMMARY)
    assert.is_nil(none)
    assert.same({ "bad_bill", 2, 3 }, { err.kind, err.line, err.file_line })
    assert.matches("bill: line 2 has 21 fields, its header 27 (line 3 of"
                   .. " the file)", err.message, 1, true)
    -- and read by bill.rows alone, the rest of it is no header
    local path = tmp .. "/broken.csv"
    local kinds = {}
    for kind, row in require("paygate.wechatpay.bill").rows(path) do
      kinds[#kinds + 1] = kind
      if kind == "malformed" then
        assert.equal(4, row.line)
        assert.matches("^line 4: a line not starting with a backtick holds"
                       .. " one: a record broken", row.message)
      end
    end
    assert.same({ "record", "record", "malformed" }, kinds)
  end)

  it("a second line with the same number is a duplicate_line mismatch,"
     .. " not dropped", function()
    local path = tmp .. "/dup.csv"
    local f = assert(io.open(path, "wb"))
    f:write("商户订单号,交易状态,订单金额,微信订单号,商户退款单号,"
      .. "申请退款金额,退款状态\r\n"
      .. "`T1,`SUCCESS,`0.29,`4201,`0,`0.00,`\r\n"
      .. "`T1,`SUCCESS,`0.30,`4202,`0,`0.00,`\r\n"      -- differs
      .. "`T2,`SUCCESS,`0.50,`4203,`0,`0.00,`\r\n"
      .. "`T2,`SUCCESS,`0.50,`4203,`0,`0.00,`\r\n"      -- identical
      .. "`T1,`REFUND,`0.00,`4201,`R1,`0.10,`SUCCESS\r\n"
      .. "`T1,`REFUND,`0.00,`4201,`R1,`0.20,`SUCCESS\r\n")
    f:close()
    local r = assert(bill.records(path))
    assert.equal(6, r.lines)
    -- the first line of a number is the one compared
    assert.same({ out_trade_no = "T1", amount = 29, state = "SUCCESS",
                  transaction_id = "4201" }, r.payments.T1)
    assert.equal(10, r.refunds.R1.amount)
    assert.equal(3, #r.duplicates)
    local out = bill.diff(r, {
      { out_trade_no = "T1", amount = 29, state = "paid" },
      { out_trade_no = "T2", amount = 50, state = "paid" },
      { out_trade_no = "T1", out_refund_no = "R1", amount = 10,
        state = "succeeded" } })
    -- the kept lines agree with the local rows; each later line is its
    -- own mismatch, with the line it repeats
    assert.equal(3, #out)
    for _, m in ipairs(out) do assert.equal("duplicate_line", m.kind) end
    assert.same({ "T1", "T1", "T2" }, { out[1].out_trade_no,
                out[2].out_trade_no, out[3].out_trade_no })
    local pay = out[1].out_refund_no and out[2] or out[1]
    local ref = out[1].out_refund_no and out[1] or out[2]
    assert.same({ 30, "4202" }, { pay.remote.amount,
                                  pay.remote.transaction_id })
    assert.same({ 29, "4201" }, { pay.first.amount,
                                  pay.first.transaction_id })
    assert.equal("R1", ref.out_refund_no)
    assert.same({ 20, 10 }, { ref.remote.amount, ref.first.amount })
    assert.same(out[3].first, out[3].remote)       -- reported all the same
    assert.is_nil(out[1]["local"])
    -- in the report
    local text = bill.csv("2026-11-29", out)
    assert.matches("2026-11-29,duplicate_line,T1,,,,SUCCESS,30,\r\n", text,
                   1, true)
  end)

  it("a summary that counts other than the records read is a bad bill",
     function()
    local HEAD = "商户订单号,交易状态,订单金额\r\n"
    local SUM = "总交易单数,应结订单总金额,退款总金额,充值券退款总金额,"
      .. "手续费总金额,订单总金额,申请退款总金额\r\n"
    local function records(text) return bill_of(text, "count.csv") end
    local body = "`T1,`SUCCESS,`0.29\r\n`T2,`SUCCESS,`0.30\r\n"
    local r = assert(records(HEAD .. body .. SUM
                             .. "`2,`0.59,`0.00,`0.00,`0.00,`0.59,`0.00\r\n"))
    assert.equal(2, r.lines)
    -- a line lost in between (the summary says 3)
    local none, err = records(HEAD .. body .. SUM
      .. "`3,`0.88,`0.00,`0.00,`0.00,`0.88,`0.00\r\n")
    assert.is_nil(none)
    assert.equal("bad_bill", err.kind)
    assert.matches("the summary counts 3 records, the file holds 2",
                   err.message, 1, true)
    assert.equal(5, err.file_line)
    none, err = records(HEAD .. body .. SUM
      .. "`two,`0.59,`0.00,`0.00,`0.00,`0.59,`0.00\r\n")
    assert.is_nil(none)
    assert.equal("bad_bill", err.kind)
    assert.matches("总交易单数 is not a count", err.message, 1, true)
  end)

  it("refuses a bill with a bad amount", function()
    local path = tmp .. "/bad.csv"
    local f = assert(io.open(path, "wb"))
    f:write("商户订单号,交易状态,订单金额\r\n`T1,`SUCCESS,`1e2\r\n")
    f:close()
    local r, err = bill.records(path)
    assert.is_nil(r)
    assert.equal("bad_amount", err.kind)
    assert.equal(1, err.line)
    -- the message (what the log and the console show) names the column
    -- and the line
    assert.equal("bad_amount: bill: amount \"1e2\" is not a yuan amount"
                 .. " (订单金额 of record 1, line 2 of the file)",
                 tostring(err))
    -- a refund line's, a few records down
    f = assert(io.open(path, "wb"))
    f:write("\239\187\191商户订单号,交易状态,订单金额,商户退款单号,申请退款金额"
            .. "\r\n`T1,`SUCCESS,`1.00,`0,`0.00\r\n\r\n`T1,`REFUND,`0.00,`R1,"
            .. "`1,000.00\r\n")
    f:close()
    r, err = bill.records(path)
    assert.is_nil(r)
    assert.equal("bad_amount", err.kind)
    assert.same({ 2, 4, "申请退款金额" }, { err.line, err.file_line,
                                            err.column })
    assert.matches("(申请退款金额 of record 2, line 4 of the file)", tostring(err),
                   1, true)
    -- a bill without an amount column at all says so
    f = assert(io.open(path, "wb"))
    f:write("商户订单号,交易状态,金额\r\n`T1,`SUCCESS,`1.00\r\n")
    f:close()
    r, err = bill.records(path)
    assert.is_nil(r)
    assert.equal("bad_amount: bill: no amount: the header has no 订单金额 or"
                 .. " 应结订单金额 of record 1, line 2 of the file",
                 tostring(err))
  end)

  it("a bill refused, or a reading stopped by on_wait, leaves its file"
     .. " closed", function()
    local ffi = require "ffi"
    pcall(ffi.cdef, "long readlink(const char *path, char *buf,"
          .. " size_t size);")
    local function fds_on(path)
      local n, buf = 0, ffi.new("char[4096]")
      for _, fd in ipairs(core.listdir("/proc/self/fd") or {}) do
        local len = ffi.C.readlink("/proc/self/fd/" .. fd, buf, 4095)
        if len > 0 and ffi.string(buf, len) == path then n = n + 1 end
      end
      return n
    end
    local path = tmp .. "/closed.csv"
    local function records(text, on_wait)
      local f = assert(io.open(path, "wb"))
      f:write(text)
      f:close()
      return bill.records(path, on_wait)
    end
    collectgarbage("stop")
    finally(function() collectgarbage("restart") end)
    local head = "商户订单号,交易状态,订单金额\r\n"
    local many = {}
    for i = 1, 2001 do many[i] = "`T" .. i .. ",`SUCCESS,`1.00\r\n" end
    for i, case in ipairs({
      { head .. "`T1,`SUCCESS,`1e2\r\n", "bad_amount" },
      { head .. "`T1,`SUCCESS\r\n", "bad_bill" },
      { head .. "`,`SUCCESS,`1.00\r\n", "bad_bill" },
      { head .. "`T1,`SUCCESS,`1.00\r\n总交易单数,总金额\r\n`2,`1.00\r\n",
        "bad_bill" },
      { head .. table.concat(many), "lost", function()
        return nil, core.error("lost", "the lease was lost")
      end },
    }) do
      local r, err = records(case[1], case[3])
      assert.is_nil(r, "case " .. i)
      assert.equal(case[2], err.kind, "case " .. i)
      assert.equal(0, fds_on(path), "case " .. i .. ": the file is open")
    end
    os.remove(path)
  end)

  it("a refused bill is kept beside where it was (the day's last one), the"
     .. " error naming it; a bill read is removed", function()
    local dir = tmp .. "/refused"
    os.execute("mkdir -p " .. dir)
    local function read(path)
      local f = assert(io.open(path, "rb"))
      local text = f:read("*a")
      f:close()
      return text
    end
    local function run(text, name)
      return bill.daily{ wx = bill_wx(text), db = new_db(), dir = dir,
        date = "2026-11-29", name = name,
        local_rows = function() return {} end }
    end
    local kept = dir .. "/tradebill-2026-11-29-m1.csv.refused"
    local bad = "商户订单号,交易状态,订单金额\r\n`T1,`SUCCESS,`1e2\r\n"
    local r, err = run(bad, "m1")
    assert.is_nil(r)
    assert.equal("bad_amount", err.kind)
    assert.equal(kept, err.bill)
    assert.matches("the bill is kept in " .. kept, tostring(err), 1, true)
    assert.equal(bad, read(kept))
    -- another refusal of the day takes its place: one kept a day
    local broken = "商户订单号,交易状态,订单金额\r\n`T1,`SUCCESS\r\n"
    r, err = run(broken, "m1")
    assert.is_nil(r)
    assert.equal("bad_bill", err.kind)
    assert.equal(broken, read(kept))
    local names = core.listdir(dir)
    table.sort(names)
    assert.same({ "tradebill-2026-11-29-m1.csv.refused" }, names)
    -- a bill read fine: removed, as before (the refused one stays)
    assert(run("商户订单号,交易状态,订单金额\r\n`T1,`SUCCESS,`1.00\r\n",
               "m1"))
    names = core.listdir(dir)
    table.sort(names)
    assert.same({ "reconcile-2026-11-29-m1.csv",
                  "tradebill-2026-11-29-m1.csv.refused" }, names)
  end)
end)

describe("bill.write_atomic", function()
  it("writes the report its owner's alone (0600), whatever the umask, and"
     .. " replaces it whole", function()
    -- was: io.open under the process's umask: 0644 under a service's 022,
    -- every local user could read the day's order numbers and amounts
    local path = tmp .. "/reconcile-2026-11-30.csv"
    local ok, w, werr = servers.under_umask(18, bill.write_atomic, path,
                                            "a,b\r\n")
    assert(ok, w)
    assert(w, werr)
    assert.equal("600", servers.file_mode(path))
    assert(bill.write_atomic(path, "c,d\r\n"))
    local f = assert(io.open(path, "rb"))
    assert.equal("c,d\r\n", f:read("*a"))
    f:close()
    for _, name in ipairs(core.listdir(tmp)) do
      assert.is_nil(name:find(".part", 1, true), name)
    end
    -- a folder that is not there: a classified io error naming the path
    local bad, err = bill.write_atomic(tmp .. "/no/such/r.csv", "x")
    assert.is_nil(bad)
    assert.equal("io", err.kind)
    assert.matches("reconcile: ", err.message, 1, true)
    assert.matches("/no/such/r.csv", err.message, 1, true)
  end)
end)
