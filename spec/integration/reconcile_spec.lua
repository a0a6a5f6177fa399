-- paygate.reconcile against the WeChat Pay simulator (paygate.testing):
-- a payment whose notification is never sent ends paid through the query;
-- an `unknown` is resolved; an expired unpaid payment is closed through
-- the close API; a refund goes PROCESSING -> SUCCESS by query; ABNORMAL is
-- surfaced; the daily trade bill: STATEMENT_CREATING then ready,
-- NO_STATEMENT_EXIST as an empty day, and a day with trades diffed against
-- local rows (one missing, one amount mismatch) -> CSV + audit entry.
--
-- The "app" here is a few lines over SQLite and paygate.fsm, wired the way
-- a gateway wires the library: due() selects rows by next_check_at, the
-- check applies what WeChat says through the machine, fenced by the
-- runner's lease, and reschedules in the same transaction.
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local sql = require "paygate.sql"
local fsm = require "paygate.fsm"
local audit = require "paygate.audit"
local testing = require "paygate.testing"
local reconcile = require "paygate.reconcile"
local bill = require "paygate.reconcile.bill"
local days = require "support.days"

-- nobody listens there: the notifications that are sent fail (and are
-- retried on WeChat's schedule); the specs never rely on them
local NOWHERE = "http://127.0.0.1:9/notify"

local sim, wx, db, dir, payments, refunds, sched

local function beijing_date(t)
  return os.date("!%Y-%m-%d", math.floor(t) + 8 * 3600)
end

setup(function()
  -- a day's bills are made only when a spec closes it (sim:close_bills)
  sim = testing.simulator{ config = { bill_ready_after = 10 * 86400 } }
  wx = sim:client()
  dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p '" .. dir .. "'"))
  db = assert(sql.open("sqlite:" .. dir .. "/app.db"))
  assert(db:exec_script([[
    CREATE TABLE payments (id TEXT PRIMARY KEY, state TEXT NOT NULL,
      version INTEGER NOT NULL, out_trade_no TEXT NOT NULL,
      amount INTEGER NOT NULL, transaction_id TEXT, payer_total INTEGER,
      expires_at REAL, next_check_at REAL, checks INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE refunds (id TEXT PRIMARY KEY, state TEXT NOT NULL,
      version INTEGER NOT NULL, payment_id TEXT NOT NULL,
      out_refund_no TEXT NOT NULL, amount INTEGER NOT NULL, refund_id TEXT,
      next_check_at REAL, checks INTEGER NOT NULL DEFAULT 0);]]))
  payments = fsm.new(fsm.payment, { store = fsm.sql_store{
    table = "payments" } })
  refunds = fsm.new(fsm.refund, { store = fsm.sql_store{ table = "refunds" },
    subject = function(_, row) return "payment:" .. row.payment_id end })
  sched = reconcile.schedule{ first = 30, factor = 2, ceiling = 3600,
                              random = function() return 0.5 end }
end)

teardown(function()
  testing.stop_all()
  if dir then os.execute("rm -rf '" .. dir .. "'") end
end)

-- the app's side: what is due, how a check is applied and rescheduled
local function reschedule_sql(tbl)
  return function(tx, action)
    local row = assert(tx:query("SELECT checks FROM " .. tbl
                                .. " WHERE id = $1", { action.id }))[1]
    return tx:exec("UPDATE " .. tbl .. " SET checks = checks + 1,"
      .. " next_check_at = $2 WHERE id = $1",
      { action.id, sched:next(core.time(), row.checks + 1) })
  end
end

local abnormal_seen = {}

local function payment_runner()
  return reconcile.runner(db, { name = "payments", batch = 10,
    due = function(now, limit)
      return db:query("SELECT * FROM payments WHERE state IN ('created',"
        .. " 'paying', 'unknown') AND next_check_at <= $1 ORDER BY"
        .. " next_check_at LIMIT $2", { now, limit })
    end,
    check = function(row, ctx)
      local action, err = reconcile.check_payment(wx, row)
      if not action then return nil, err end
      return reconcile.apply(db, payments, action, { fence = ctx.fence,
        schedule = reschedule_sql("payments") })
    end,
    reschedule = function(row)
      db:exec("UPDATE payments SET next_check_at = $2 WHERE id = $1",
              { row.id, core.time() + 60 })
    end })
end

local function refund_runner()
  return reconcile.runner(db, { name = "refunds", batch = 10,
    due = function(now, limit)
      return db:query("SELECT * FROM refunds WHERE state IN ('created',"
        .. " 'processing', 'unknown') AND next_check_at <= $1 ORDER BY"
        .. " next_check_at LIMIT $2", { now, limit })
    end,
    check = function(row, ctx)
      local action, err = reconcile.check_refund(wx, row)
      if not action then return nil, err end
      if action.abnormal then abnormal_seen[row.id] = action.refund end
      return reconcile.apply(db, refunds, action, { fence = ctx.fence,
        schedule = reschedule_sql("refunds") })
    end })
end

local function local_payment(state, o)
  o = o or {}
  local no = o.out_trade_no or testing.out_trade_no("RC")
  local id = "pay_" .. crypto.random_nonce(10)
  assert(payments:create(db, { id = id, out_trade_no = no,
    amount = o.amount or 100, expires_at = o.expires_at
    or core.time() + 3600, next_check_at = core.time() - 1 }))
  if state == "paying" then
    assert(payments:apply(db, id, "opened"))
  elseif state == "unknown" then
    assert(payments:apply(db, id, "outcome_unknown"))
  end
  return id, no
end

local function state_of(id) return payments:get(db, id).state end

local function step_until(r, pred, what)
  testing.wait_until(function()
    r:step()
    return pred()
  end, 10, what)
end

describe("payment checks", function()
  local r

  before_each(function() r = payment_runner() end)
  after_each(function() r:stop() end)

  it("a payment whose notification was never sent ends paid by query",
     function()
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
    local no = sim:order{ notify_url = NOWHERE, total = 100 }
    local id = local_payment("paying", { out_trade_no = no })
    sim:pay(no)
    testing.wait_until(function()
      local n = sim:notifications{ out_trade_no = no }[1]
      return n and n.state == "dropped"
    end, 10, "the notification dropped")
    step_until(r, function() return state_of(id) == "paid" end, "paid")
    local row = payments:get(db, id)
    assert.matches("^%d+$", row.transaction_id)
    assert.equal(100, row.payer_total)
    local e = audit.entries(db, "payment:" .. id)
    assert.equal("reconcile", e[#e].cause)
    assert.matches('"trade_state":"SUCCESS"', e[#e].evidence)
    assert.equal("dropped", sim:notifications{ out_trade_no = no }[1].state)
  end)

  it("an unknown is resolved: paid at WeChat -> paid; not paid -> paying,"
     .. " rescheduled", function()
    local no1 = sim:order{ notify_url = NOWHERE, total = 100 }
    local no2 = sim:order{ notify_url = NOWHERE, total = 100 }
    local id1 = local_payment("unknown", { out_trade_no = no1 })
    local id2 = local_payment("unknown", { out_trade_no = no2 })
    sim:pay(no1)
    step_until(r, function()
      return state_of(id1) == "paid" and state_of(id2) == "paying"
    end, "both resolved")
    local row = payments:get(db, id2)
    assert.is_true(row.checks >= 1)
    assert.is_true(row.next_check_at > core.time() + 10)   -- 0.5 * 30 s on
  end)

  it("an expired unpaid payment is closed through the close API",
     function()
    local no = sim:order{ notify_url = NOWHERE, total = 100 }
    local id = local_payment("paying", { out_trade_no = no,
                                         expires_at = core.time() - 1 })
    local closed_before = reconcile.stats().closed_by_us
    step_until(r, function() return state_of(id) == "closed" end, "closed")
    assert.equal("CLOSED", assert(wx:query_by_out_trade_no(no)).trade_state)
    assert.equal(closed_before + 1, reconcile.stats().closed_by_us)
    local saw_close = false
    for _, q in ipairs(sim:requests()) do
      if q.endpoint == "close" and q.target:find(no, 1, true) then
        saw_close = q.status == 204
      end
    end
    assert.is_true(saw_close)
  end)

  it("PAYERROR fails the payment; a query error leaves it for later",
     function()
    local no = sim:order{ notify_url = NOWHERE, total = 100 }
    local id = local_payment("paying", { out_trade_no = no })
    sim:fail(no)
    sim:fault{ endpoint = "query", kind = "error",
               status = 400, code = "INVALID_REQUEST", count = 1 }
    r:step()
    assert.equal("paying", state_of(id))
    assert.is_true(payments:get(db, id).next_check_at > core.time() + 30)
    db:exec("UPDATE payments SET next_check_at = 0 WHERE id = $1", { id })
    step_until(r, function() return state_of(id) == "failed" end, "failed")
  end)
end)

describe("refund checks", function()
  local r, pid, no

  setup(function()
    no = sim:order{ notify_url = NOWHERE, total = 100 }
    pid = local_payment("paying", { out_trade_no = no })
    sim:pay(no)
    assert(payments:apply(db, pid, "succeeded"))
  end)

  before_each(function() r = refund_runner() end)
  after_each(function() r:stop() end)

  local function local_refund(amount)
    local rno = "RF" .. crypto.random_nonce(12)
    local rr = assert(wx:refund{ out_trade_no = no, out_refund_no = rno,
      amount = { refund = amount, total = 100, currency = "CNY" } })
    assert.equal("PROCESSING", rr.status)
    local id = "ref_" .. crypto.random_nonce(10)
    assert(refunds:create(db, { id = id, payment_id = pid,
      out_refund_no = rno, amount = amount, next_check_at = 0 }))
    assert(refunds:apply(db, id, "accepted"))
    return id, rno
  end

  it("PROCESSING stays and is rescheduled; SUCCESS by query", function()
    local id, rno = local_refund(30)
    assert.equal(1, r:step())
    local row = refunds:get(db, id)
    assert.same({ "processing", 1 }, { row.state, row.checks })
    assert.is_true(row.next_check_at > core.time() + 10)
    assert.equal(0, r:step())                    -- not due again yet
    sim:settle(rno, "SUCCESS")
    db:exec("UPDATE refunds SET next_check_at = 0 WHERE id = $1", { id })
    step_until(r, function()
      return refunds:get(db, id).state == "succeeded"
    end, "succeeded")
    assert.matches("^%d+$", refunds:get(db, id).refund_id)
  end)

  it("ABNORMAL is surfaced: applied, flagged with WeChat's refund, counted",
     function()
    local id, rno = local_refund(20)
    sim:settle(rno, "ABNORMAL")
    local before = reconcile.stats().abnormal
    step_until(r, function()
      return refunds:get(db, id).state == "abnormal"
    end, "abnormal")
    assert.equal(before + 1, reconcile.stats().abnormal)
    assert.equal(rno, abnormal_seen[id].out_refund_no)
    assert.matches("^%d+$", abnormal_seen[id].refund_id)   -- for the API
  end)

  it("the refund limit follows the local refunds", function()
    local rows = db:query("SELECT amount, state FROM refunds WHERE"
                          .. " payment_id = $1", { pid })
    local left = assert(reconcile.refundable(100, rows))
    assert.equal(50, left)                       -- 100 - 30 - 20
    local ok, err = reconcile.refund_limit(100, rows, 51)
    assert.is_nil(ok)
    assert.equal("refund_exceeds_paid", err.kind)
  end)
end)

describe("the daily trade bill", function()
  local today, nos

  setup(function()
    -- paid within one Beijing day, the bill's (paid again in the new day
    -- when a midnight passed meanwhile)
    today = days.within(days.BEIJING, function()
      nos = {}
      for i, total in ipairs({ 110, 29, 435 }) do
        nos[i] = sim:order{ notify_url = NOWHERE, total = total }
        sim:pay(nos[i])
      end
    end)
  end)

  local function local_rows(date, numbers)
    -- two of the three (the third is missing locally), one amount wrong
    return {
      { out_trade_no = nos[1], amount = 110, state = "paid" },
      { out_trade_no = nos[2], amount = 30, state = "paid" },
    }, numbers
  end

  it("retries STATEMENT_CREATING, then diffs the ready day: CSV, audit,"
     .. " gauge", function()
    local asked, waits = {}, 0
    local report = assert(bill.daily{
      wx = wx, db = db, dir = dir, date = today,
      local_rows = function(date, numbers)
        asked = numbers
        return local_rows(date, numbers)
      end,
      retry = { attempts = 3, first = 0.01 },
      sleep = function(s)
        waits = waits + 1
        assert.is_true(s <= 0.01)
        sim:close_bills(today)            -- the bill is made meanwhile
      end })
    assert.equal(1, waits)
    assert.is_false(report.empty)
    -- the remote numbers are handed to local_rows (this spec's earlier
    -- payments are in today's bill too)
    for _, no in ipairs(nos) do
      assert.is_truthy(table.concat(asked, " "):find(no, 1, true))
    end
    local mine = {}
    for _, m in ipairs(report.mismatches) do
      for i, no in ipairs(nos) do
        if m.out_trade_no == no then mine[i] = m end
      end
    end
    assert.is_nil(mine[1])
    assert.equal("amount", mine[2].kind)
    assert.same({ 30, 29 }, { mine[2]["local"].amount, mine[2].remote.amount })
    assert.equal("missing_local", mine[3].kind)
    assert.equal(435, mine[3].remote.amount)
    -- the CSV: atomically in dir, its sha256 in the audit entry
    local f = assert(io.open(report.path, "rb"))
    local text = f:read("*a")
    f:close()
    assert.equal(crypto.hex(crypto.digest("sha256", text)), report.sha256)
    assert.is_truthy(text:find("," .. nos[3] .. ",,,,SUCCESS,435,\r\n", 1,
                               true))     -- (no sub_mchid: a direct merchant)
    assert.is_truthy(text:find(",amount," .. nos[2] .. ",,paid,30,SUCCESS,29",
                               1, true))
    local e = audit.entries(db, "reconcile:" .. today)
    assert.equal(1, #e)
    assert.equal("reconcile.bill", e[1].what)
    assert.matches('"sha256":"' .. report.sha256 .. '"', e[1].evidence)
    assert.is_true(audit.verify(db, "reconcile:" .. today))
    assert.equal(report.counts.total, #report.mismatches)
    for _, name in ipairs(core.listdir(dir)) do
      assert.is_nil(name:find(".part-", 1, true))
      assert.is_nil(name:find("tradebill", 1, true))  -- the download removed
    end
  end)

  it("keeps the lease through the download: on_wait is called as it"
     .. " flows, and its failure (the lease lost) ends it", function()
    -- today's bill is made (the case above): no STATEMENT_CREATING wait,
    -- so every call is the download's or the reading's
    local calls = 0
    local report = assert(bill.daily{
      wx = wx, db = db, dir = dir, date = today, local_rows = local_rows,
      on_wait = function()
        calls = calls + 1
        return true
      end })
    assert.is_true(calls >= 1)
    assert.is_false(report.empty)
    local before = #audit.entries(db, "reconcile:" .. today)
    local r, err = bill.daily{
      wx = wx, db = db, dir = dir, date = today, local_rows = local_rows,
      on_wait = function()
        return nil, core.error("lost", "lease bill was lost")
      end }
    assert.is_nil(r)
    assert.equal("lost", err.kind)
    assert.equal(before, #audit.entries(db, "reconcile:" .. today))
    for _, name in ipairs(core.listdir(dir)) do
      assert.is_nil(name:find(".part-", 1, true))
      assert.is_nil(name:find("tradebill", 1, true))
    end
  end)

  it("max_bytes bounds the download (a gzip bomb): a bill larger is"
     .. " too_large, nothing written", function()
    sim:close_bills(today)
    local before = #audit.entries(db, "reconcile:" .. today)
    local r, err = bill.daily{ wx = wx, db = db, dir = dir, date = today,
      local_rows = local_rows, retry = { attempts = 1 }, max_bytes = 64 }
    assert.is_nil(r)
    assert.equal("too_large", err.kind)
    assert.matches("max_bytes (64)", err.message, 1, true)
    assert.equal(before, #audit.entries(db, "reconcile:" .. today))
    for _, name in ipairs(core.listdir(dir)) do
      assert.is_nil(name:find("tradebill", 1, true))
    end
    r, err = bill.fetch(wx, today, { path = dir .. "/x.csv", max_bytes = 64,
                                     retry = { attempts = 1 } })
    assert.is_nil(r)
    assert.equal("too_large", err.kind)
    -- under the cap, it is read as ever
    assert(bill.fetch(wx, today, { path = dir .. "/x.csv",
                                   max_bytes = 1024 * 1024 }))
    os.remove(dir .. "/x.csv")
    -- misuse raises
    assert.has_error(function()
      bill.daily{ wx = wx, db = db, dir = dir, date = today,
                  local_rows = local_rows, max_bytes = "64" }
    end, "bill.daily: opts.max_bytes must be a positive whole number of"
         .. " bytes")
    assert.has_error(function()
      bill.fetch(wx, today, { path = dir .. "/x.csv", max_bytes = 0 })
    end, "bill.fetch: opts.max_bytes must be a positive whole number of"
         .. " bytes")
  end)

  it("gives up on STATEMENT_CREATING after the bounded attempts", function()
    -- bills are made 10 days after a day ends here, so yesterday is still
    -- being made
    local waits = 0
    local r, err = bill.fetch(wx, beijing_date(core.time() - 86400), {
      path = dir .. "/x.csv", retry = { attempts = 3, first = 0.01 },
      sleep = function() waits = waits + 1 end })
    assert.is_nil(r)
    assert.equal("statement_creating", err.kind)
    assert.is_true(err.retryable)
    assert.equal(2, waits)
  end)

  it("keeps the lease through a STATEMENT_CREATING pause longer than it:"
     .. " on_wait at least every second of the pause", function()
    -- (the pause is 5 s, no jitter; a lease of, say, 2 s held by the
    -- runner's keepalive must be renewed within it)
    local slept, calls, gaps = 0, {}, {}
    local r, err = bill.fetch(wx, beijing_date(core.time() - 86400), {
      path = dir .. "/x.csv",
      retry = { attempts = 2, first = 5, jitter = "none" },
      sleep = function(s) slept = slept + s end,
      on_wait = function()
        calls[#calls + 1] = slept
        return true
      end })
    assert.is_nil(r)
    assert.equal("statement_creating", err.kind)
    assert.equal(5, slept)
    -- the sleep between one call of on_wait and the next (or the pause's
    -- end)
    calls[#calls + 1] = slept
    for i = 2, #calls do gaps[#gaps + 1] = calls[i] - calls[i - 1] end
    for _, g in ipairs(gaps) do
      assert.is_true(g <= 1, "a sleep of " .. g .. " s without"
                     .. " on_wait")
    end
    -- and a lost lease ends the pause at once
    local n = 0
    r, err = bill.fetch(wx, beijing_date(core.time() - 86400), {
      path = dir .. "/x.csv",
      retry = { attempts = 2, first = 5, jitter = "none" },
      sleep = function(s) slept = slept + s end,
      on_wait = function()
        n = n + 1
        if n == 2 then return nil, core.error("lost", "lease lost") end
        return true
      end })
    assert.is_nil(r)
    assert.equal("lost", err.kind)
    assert.equal(2, n)
  end)

  it("NO_STATEMENT_EXIST is an empty day: local paid rows are missing"
     .. " remotely", function()
    local day = beijing_date(core.time() - 3 * 86400)
    sim:close_bills(day)
    local report = assert(bill.daily{ wx = wx, db = db, dir = dir,
      date = day, local_rows = function()
        return { { out_trade_no = "LOCALONLY1", amount = 5, state = "paid" } }
      end, retry = { attempts = 1 } })
    assert.is_true(report.empty)
    assert.equal(1, #report.mismatches)
    assert.equal("missing_remote", report.mismatches[1].kind)
    local e = audit.entries(db, "reconcile:" .. day)
    assert.matches('"empty":true', e[1].evidence)
  end)
end)
