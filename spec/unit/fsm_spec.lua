-- paygate.fsm on SQLite and PostgreSQL: every legal and illegal
-- transition of the payment and refund machines, guards, hooks, versions
-- (stale writes, retries under concurrency) and the audit entry written in
-- the same transaction.
local fsm = require "paygate.fsm"
local audit = require "paygate.audit"
local paygate = require "paygate"
local servers = require "spec.support.servers"

local tmp = servers.mktemp()

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

local TABLES = [[
CREATE TABLE payments (id TEXT PRIMARY KEY, state TEXT NOT NULL,
  version INTEGER NOT NULL, amount INTEGER NOT NULL,
  refunded INTEGER NOT NULL DEFAULT 0, transaction_id TEXT);
CREATE TABLE refunds (id TEXT PRIMARY KEY, payment_id TEXT NOT NULL,
  state TEXT NOT NULL, version INTEGER NOT NULL, amount INTEGER NOT NULL);
CREATE TABLE orders (order_no TEXT PRIMARY KEY, status TEXT NOT NULL,
  rev INTEGER NOT NULL);
CREATE TABLE hook_log (what TEXT NOT NULL)]]

local stores = servers.stores(tmp, TABLES, "payments, refunds, orders,"
  .. " hook_log, paygate_audit, paygate_audit_heads", { pool = 8 })

-- The declared machines, written out here so that a change to either
-- definition shows up as a failing spec.
local PAYMENT = {
  created = { opened = "paying", outcome_unknown = "unknown",
              succeeded = "paid", closed = "closed", failed = "failed" },
  paying = { outcome_unknown = "unknown", succeeded = "paid",
             closed = "closed", failed = "failed" },
  unknown = { still_open = "paying", succeeded = "paid", closed = "closed",
              failed = "failed" },
  closed = { succeeded = "paid" },
  failed = { succeeded = "paid" },
  paid = { refunded_partially = "partially_refunded",
           refunded_fully = "refunded" },
  partially_refunded = { refunded_partially = "partially_refunded",
                         refunded_fully = "refunded" },
  refunded = {},
}
local PAYMENT_EVENTS = { "opened", "outcome_unknown", "still_open",
  "succeeded", "closed", "failed", "refunded_partially", "refunded_fully" }

local REFUND = {
  created = { accepted = "processing", rejected = "failed",
              outcome_unknown = "unknown", succeeded = "succeeded",
              closed = "closed", abnormal = "abnormal" },
  unknown = { accepted = "processing", rejected = "failed",
              succeeded = "succeeded", closed = "closed",
              abnormal = "abnormal" },
  processing = { succeeded = "succeeded", closed = "closed",
                 abnormal = "abnormal" },
  abnormal = { succeeded = "succeeded", closed = "closed" },
  succeeded = {}, closed = {}, failed = {},
}
local REFUND_EVENTS = { "accepted", "rejected", "outcome_unknown",
  "succeeded", "closed", "abnormal" }

local function keys(t)
  local out = {}
  for k in pairs(t) do out[#out + 1] = k end
  table.sort(out)
  return out
end

describe("fsm.new", function()
  it("raises for a definition that names unknown states or events", function()
    assert.has_error(function() fsm.new("x") end,
                     "fsm.new: def must be a table")
    assert.has_error(function()
      fsm.new({ name = "m", states = { "a" }, initial = "b",
                transitions = {} })
    end, "fsm.new: def.initial must be one of def.states")
    assert.has_error(function()
      fsm.new({ name = "m", states = { "a", "a" }, initial = "a",
                transitions = {} })
    end, "fsm.new: def.states[2] must be a new state name")
    assert.has_error(function()
      fsm.new({ name = "m", states = { "a" }, initial = "a",
                transitions = { { from = "a", to = "z", event = "e" } } })
    end, "fsm.new: def.transitions[1].to must be a state")
    assert.has_error(function()
      fsm.new({ name = "m", states = { "a" }, initial = "a",
                transitions = { { from = { "a", "q" }, to = "a" } } })
    end, "fsm.new: def.transitions[1].from: q is not a state")
    assert.has_error(function()
      fsm.new(fsm.payment, { guards = { nope = function() end } })
    end, "fsm.new: guards.nope is not an event")
    assert.has_error(function()
      fsm.new(fsm.payment, { enter = { nope = function() end } })
    end, "fsm.new: enter.nope is not a state")
    assert.has_error(function()
      fsm.new(fsm.payment, { store = {} })
    end, "fsm.new: opts.store must be a store (fsm.sql_store{...})")
  end)

  it("refuses identifiers that are not SQL names", function()
    assert.has_error(function()
      fsm.sql_store{ table = "payments; DROP TABLE x" }
    end, "fsm.sql_store: opts.table must be an SQL identifier")
    assert.has_error(function()
      fsm.sql_store{ table = "payments", state = "state--" }
    end, "fsm.sql_store: opts.state must be an SQL identifier")
    assert.truthy(fsm.sql_store{ table = "public.payments" })
  end)

  it("answers what is declared, without a store", function()
    local m = fsm.new(fsm.payment)
    assert.equal("paid", m:can("closed", "succeeded"))
    assert.is_nil(m:can("refunded", "succeeded"))
    assert.same(keys(PAYMENT.paid), m:events("paid"))
    assert.has_error(function() m:apply(nil, "x", "opened") end)
  end)
end)

describe("a store's save_stmt", function()
  -- the columns of set go in byte order of their names, each with its
  -- value: a short set is put in order by fsm itself, a long one by
  -- table.sort; both are checked against an order made here
  local function check(n)
    local set, names = {}, {}
    for i = 1, n do
      -- (c1 before c10 before c2: byte order, prefixes first)
      local name = ("c%d"):format(i) .. ("_"):rep(i % 3)
      set[name] = "v" .. name
      names[#names + 1] = name
    end
    table.sort(names)
    local st = fsm.sql_store{ table = "t" }:save_stmt("X1", 4, "paid", set)
    local cols = { "state = $1", "version = $2" }
    for i, name in ipairs(names) do
      cols[#cols + 1] = name .. " = $" .. (i + 2)
    end
    assert.equal("UPDATE t SET " .. table.concat(cols, ", ")
      .. " WHERE id = $" .. (n + 3) .. " AND version = $" .. (n + 4),
      st[1])
    local params = { "paid", 5 }
    for _, name in ipairs(names) do params[#params + 1] = "v" .. name end
    params[#params + 1], params[#params + 2] = "X1", 4
    params.n = n + 4
    assert.same(params, st[2])
  end

  it("puts the columns of set in name order, few or many", function()
    for n = 0, 40 do check(n) end
  end)
end)

describe("an illegal transition", function()
  it("is logged as one warn line naming machine, id, from and event",
     function()
    local proc = require "support.proc"
    local script, log = tmp .. "/illegal.lua", tmp .. "/illegal.out"
    local f = assert(io.open(script, "w"))
    f:write([[
local sql = require "paygate.sql"
local fsm = require "paygate.fsm"
local db = assert(sql.open("sqlite:]] .. tmp .. [[/illegal.db"))
assert(db:exec_script("CREATE TABLE payments (id TEXT PRIMARY KEY,"
  .. " state TEXT NOT NULL, version INTEGER NOT NULL)"))
local m = fsm.new(fsm.payment, { store = fsm.sql_store{ table = "payments" } })
assert(db:exec("INSERT INTO payments VALUES ('L1', 'refunded', 1)"))
local c = require("paygate.metrics").counter(
  "paygate_fsm_illegal_transitions_total", "", { "machine" })
local res, err = m:apply(db, "L1", "succeeded", { cause = "notification" })
if c:get({ machine = "payment" }) ~= 1 then return 2 end
return (res == nil and err.kind == "illegal_transition") and 0 or 1
]])
    f:close()
    local p = proc.spawn({ PAYGATE_BIN, "exec", script }, { log = log })
    local code = p:wait(30)
    local out = proc.read(log)
    assert.equal(0, code, out)
    local line = out:match("[^\n]*fsm: illegal transition refused[^\n]*")
    assert.is_string(line, out)
    local rec = require("paygate.json").decode(line)
    assert.same({ "warn", "payment", "L1", "refunded", "succeeded",
                  "notification" }, { rec.level, rec.machine, rec.id,
                  rec.from, rec.event, rec.cause })
  end)
end)

for engine, new_db in pairs(stores) do
  describe("paygate.fsm on " .. engine, function()
    local db, payments, refunds

    before_each(function()
      db = new_db()
      payments = fsm.new(fsm.payment,
                         { store = fsm.sql_store{ table = "payments" } })
      refunds = fsm.new(fsm.refund, {
        store = fsm.sql_store{ table = "refunds" },
        -- a refund's entries go into its payment's chain
        subject = function(_, row) return "payment:" .. row.payment_id end,
      })
    end)
    after_each(function() db:close() end)

    local function row_of(tbl, id)
      return assert(db:query("SELECT * FROM " .. tbl .. " WHERE id = $1",
                             { id }))[1]
    end

    local function put(tbl, id, state)
      if tbl == "payments" then
        assert(db:exec("INSERT INTO payments (id, state, version, amount)"
          .. " VALUES ($1, $2, 7, 100)", { id, state }))
      else
        assert(db:exec("INSERT INTO refunds (id, payment_id, state, version,"
          .. " amount) VALUES ($1, $2, $3, 7, 10)", { id, "P-" .. id, state }))
      end
    end

    for _, case in ipairs({
      { "payment", PAYMENT, PAYMENT_EVENTS, "payments" },
      { "refund", REFUND, REFUND_EVENTS, "refunds" },
    }) do
      local name, matrix, events, tbl = case[1], case[2], case[3], case[4]

      it("applies every legal " .. name .. " transition, versioned and"
         .. " audited", function()
        local m = name == "payment" and payments or refunds
        assert.same(keys(matrix), (function()
          local s = {}
          for _, st in ipairs(fsm[name].states) do s[#s + 1] = st end
          table.sort(s)
          return s
        end)())
        local applied = 0
        for _, from in ipairs(keys(matrix)) do
          for _, event in ipairs(keys(matrix[from])) do
            local id = from .. "/" .. event
            put(tbl, id, from)
            local res = assert(m:apply(db, id, event, {
              cause = "spec", actor = "tester", evidence = { n = 1 } }))
            local to = matrix[from][event]
            assert.equal(to, res.to)
            assert.equal(from, res.from)
            assert.equal(8, res.version)
            local row = row_of(tbl, id)
            assert.equal(to, row.state)
            assert.equal(8, row.version)
            local subject = name == "payment" and "payment:" .. id
                            or "payment:P-" .. id
            local entries = assert(audit.entries(db, subject))
            assert.equal(1, #entries)
            assert.same({ name .. "." .. event, id, from, to, "spec",
                          "tester", '{"n":1}' },
                        { entries[1].what, entries[1].ref, entries[1].from,
                          entries[1].to, entries[1].cause, entries[1].actor,
                          entries[1].evidence })
            assert.equal(entries[1].hash, res.audit.hash)
            applied = applied + 1
          end
        end
        assert.truthy(applied >= 15)
        assert.truthy((audit.verify_all(db)))
      end)

      it("refuses every illegal " .. name .. " transition: counted, never"
         .. " applied", function()
        local m = name == "payment" and payments or refunds
        local before = fsm.stats().illegal_transitions_total
        local refused = 0
        for _, from in ipairs(keys(matrix)) do
          for _, event in ipairs(events) do
            if not matrix[from][event] then
              local id = from .. "/" .. event
              put(tbl, id, from)
              local res, err = m:apply(db, id, event, { cause = "spec" })
              assert.is_nil(res)
              assert.equal("illegal_transition", err.kind)
              assert.equal(from, err.from)
              assert.equal(event, err.event)
              assert.is_false(err.retryable)
              local row = row_of(tbl, id)
              assert.equal(from, row.state)
              assert.equal(7, row.version)
              refused = refused + 1
            end
          end
        end
        assert.equal(before + refused, fsm.stats().illegal_transitions_total)
        -- nothing was audited for a refusal
        local ok, summary = audit.verify_all(db)
        assert.is_true(ok)
        assert.equal(0, summary.entries)
      end)
    end

    it("refuses refunded -> paid and reports it in fsm.prometheus()", function()
      put("payments", "R1", "refunded")
      local res, err = payments:apply(db, "R1", "succeeded")
      assert.is_nil(res)
      assert.equal("illegal_transition", err.kind)
      assert.matches("no succeeded from refunded", tostring(err))
      assert.matches('paygate_fsm_illegal_transitions_total{machine="payment"'
        .. ',from="refunded",event="succeeded"} %d+', fsm.prometheus())
    end)

    it("says when the event or state is none of the machine's, and what it takes",
       function()
      put("payments", "R2", "paying")
      -- a misspelt event: no row could ever take it
      local res, err = payments:apply(db, "R2", "succeded")
      assert.is_nil(res)
      assert.equal("illegal_transition", err.kind)
      assert.matches("no succeded from paying: succeded is no event of"
        .. " machine payment; its events: closed, failed, opened,"
        .. " outcome_unknown, refunded_fully, refunded_partially,"
        .. " still_open, succeeded (did you mean succeeded?)",
        tostring(err), 1, true)
      res, err = payments:apply(db, "R2", { to = "piad" })
      assert.is_nil(res)
      assert.matches("piad is no state of machine payment; its states: ",
                     tostring(err), 1, true)
      assert.matches("(did you mean paid?)", tostring(err), 1, true)
      -- a declared event from the wrong state: what that state takes
      res, err = payments:apply(db, "R2", "refunded_fully")
      assert.is_nil(res)
      assert.matches("no refunded_fully from paying (events from paying:"
        .. " closed, failed, outcome_unknown, succeeded)", tostring(err), 1,
        true)
    end)

    it("fails not_found for a missing row", function()
      local res, err = payments:apply(db, "nope", "opened")
      assert.is_nil(res)
      assert.equal("not_found", err.kind)
    end)

    it("creates a row in the initial state with its first audit entry",
       function()
      local entered = {}
      local m = fsm.new(fsm.payment, {
        store = fsm.sql_store{ table = "payments" },
        enter = { created = function(ctx) entered[#entered + 1] = ctx.id end },
      })
      local res = assert(m:create(db, { id = "C1", amount = 250 },
                                  { actor = "merchant" }))
      assert.equal(1, res.version)
      assert.same({ "C1" }, entered)
      local row = row_of("payments", "C1")
      assert.same({ "created", 1, 250 }, { row.state, row.version, row.amount })
      local e = assert(audit.entries(db, "payment:C1"))
      assert.same({ "payment.created", "created", "merchant" },
                  { e[1].what, e[1].to, e[1].actor })
      assert.is_nil(e[1].from)
      -- a second create of the same id fails and leaves no entry behind
      local again, err = m:create(db, { id = "C1", amount = 1 })
      assert.is_nil(again)
      assert.equal("constraint", err.kind)
      assert.equal(1, #assert(audit.entries(db, "payment:C1")))
    end)

    -- the audit entry's evidence is held to audit.MAX_EVIDENCE: the
    -- transition fails with it, as a plan does, and nothing moves
    it("fails too_large for evidence over audit.MAX_EVIDENCE, row and chain"
       .. " untouched", function()
      put("payments", "E1", "created")
      local big = { blob = string.rep("x", audit.MAX_EVIDENCE) }
      local res, err = payments:apply(db, "E1", "opened", { evidence = big })
      assert.is_nil(res)
      assert.equal("too_large", err.kind)
      local plan
      plan, err = payments:plan(db, "E1", "opened", { evidence = big })
      assert.is_nil(plan)
      assert.equal("too_large", err.kind)
      local row = row_of("payments", "E1")
      assert.same({ "created", 7 }, { row.state, row.version })
      assert.same({}, assert(audit.entries(db, "payment:E1")))
      -- the same transition with evidence of a sane size goes through
      assert(payments:apply(db, "E1", "opened", { evidence = { n = 1 } }))
      assert.equal("paying", row_of("payments", "E1").state)
    end)

    it("uses the caller's column names and an eventless transition", function()
      local m = fsm.new({
        name = "order", initial = "new", states = { "new", "done" },
        transitions = { { from = "new", to = "done" } },
      }, { store = fsm.sql_store{ table = "orders", id = "order_no",
                                  state = "status", version = "rev" } })
      assert(m:create(db, { order_no = "O1" }))
      local res = assert(m:apply(db, "O1", { to = "done" }))
      assert.same({ "new", "done", 2 }, { res.from, res.to, res.version })
      local row = assert(db:query("SELECT * FROM orders"))[1]
      assert.same({ order_no = "O1", status = "done", rev = 2 }, row)
      local _, err = m:apply(db, "O1", { to = "new" })
      assert.equal("illegal_transition", err.kind)
      assert.equal("order.->done",
                   assert(audit.entries(db, "order:O1"))[2].what)
    end)

    it("works on a store made of callbacks; a row without an integer"
       .. " version is bad_row", function()
      local saves = {}
      local store = {
        state_col = "status", version_col = "rev",
        load = function(_, q, id)
          local rows, err = q:query("SELECT status, rev FROM orders WHERE"
            .. " order_no = $1", { id })
          if not rows then return nil, err end
          return rows[1] or false
        end,
        save = function(_, tx, id, version, to, set)
          saves[#saves + 1] = { id, version, to, set.note }
          local res, err = tx:exec("UPDATE orders SET status = $1, rev = $2"
            .. " WHERE order_no = $3 AND rev = $4", { to, version + 1, id,
            version })
          if not res then return nil, err end
          return res.changes == 1
        end,
      }
      local m = fsm.new({ name = "o", initial = "a", states = { "a", "b" },
                          transitions = { { from = "a", to = "b",
                                            event = "go" } } },
                        { store = store })
      assert(db:exec("INSERT INTO orders (order_no, status, rev) VALUES"
        .. " ('X1', 'a', 3)"))
      local res = assert(m:apply(db, "X1", "go", { set = { note = "n" } }))
      assert.same({ "a", "b", 4 }, { res.from, res.to, res.version })
      assert.same({ { "X1", 3, "b", "n" } }, saves)
      store.load = function() return { status = "a", rev = "3" } end
      local _, err = m:apply(db, "X1", "go")
      assert.equal("bad_row", err.kind)
      assert.equal(1, #saves)
    end)

    it("runs guards: the first passing candidate wins, else guard_failed",
       function()
      local m = fsm.new({
        name = "pay", initial = "paid",
        states = { "paid", "partial", "refunded" },
        transitions = {
          { from = { "paid", "partial" }, to = "refunded", event = "refund",
            guard = function(ctx)
              return ctx.set.refunded == ctx.row.amount, "not the whole"
            end },
          { from = { "paid", "partial" }, to = "partial", event = "refund" },
        },
        guards = { refund = function(ctx)
          if ctx.set.refunded > ctx.row.amount then
            return false, "refunds above the amount"
          end
          return true
        end },
      }, { store = fsm.sql_store{ table = "payments" } })
      put("payments", "G1", "paid")
      local set = function(amt)
        return function(row) return { refunded = row.refunded + amt } end
      end
      assert.equal("partial",
                   assert(m:apply(db, "G1", "refund", { set = set(40) })).to)
      local res, err = m:apply(db, "G1", "refund", { set = set(61) })
      assert.is_nil(res)
      assert.equal("guard_failed", err.kind)
      assert.equal("refunds above the amount", err.reason)
      assert.same({ "not the whole", "refunds above the amount" },
                  err.reasons)
      assert.same({ "partial", 40, 8 }, (function()
        local r = row_of("payments", "G1")
        return { r.state, r.refunded, r.version }
      end)())
      assert.equal("refunded",
                   assert(m:apply(db, "G1", "refund", { set = set(60) })).to)
      assert.equal(100, row_of("payments", "G1").refunded)
    end)

    it("runs leave and enter hooks in the transaction; a failing hook rolls"
       .. " everything back", function()
      local calls = {}
      local fail_enter = false
      local m = fsm.new(fsm.payment, {
        store = fsm.sql_store{ table = "payments" },
        leave = { paying = function(ctx)
          calls[#calls + 1] = "leave " .. ctx.from .. " -> " .. ctx.to
          assert(ctx.tx:exec("INSERT INTO hook_log (what) VALUES ($1)",
                             { "left " .. ctx.id }))
        end },
        enter = { paid = {
          function(ctx)
            calls[#calls + 1] = "enter " .. ctx.to .. " " .. ctx.data.note
            assert(ctx.tx:exec("INSERT INTO hook_log (what) VALUES ($1)",
                               { "paid " .. ctx.id }))
          end,
          function()
            if fail_enter then
              return nil, paygate.error("hook_failed", "no outbox")
            end
          end,
        } },
      })
      put("payments", "H1", "paying")
      fail_enter = true
      local res, err = m:apply(db, "H1", "succeeded",
                               { data = { note = "n1" } })
      assert.is_nil(res)
      assert.equal("hook_failed", err.kind)
      assert.equal("paying", row_of("payments", "H1").state)
      assert.same({}, assert(db:query("SELECT * FROM hook_log")))
      assert.same({}, assert(audit.entries(db, "payment:H1")))
      fail_enter = false
      calls = {}
      assert(m:apply(db, "H1", "succeeded", { data = { note = "n2" },
                                              set = { transaction_id = "T" } }))
      assert.same({ "leave paying -> paid", "enter paid n2" }, calls)
      assert.same({ { what = "left H1" }, { what = "paid H1" } },
                  assert(db:query("SELECT what FROM hook_log ORDER BY what")))
      assert.equal("T", row_of("payments", "H1").transaction_id)
    end)

    it("fails stale_version when the row moved since it was read", function()
      put("payments", "S1", "paying")
      local before = fsm.stats().stale_versions_total
      local old = assert(payments:get(db, "S1"))
      assert(payments:apply(db, "S1", "outcome_unknown"))
      -- a write based on the old read: refused, nothing applied
      local res, err = db:transaction(function(tx)
        return payments:transition(tx, "S1", "succeeded", { row = old })
      end)
      assert.is_nil(res)
      assert.equal("stale_version", err.kind)
      assert.is_true(err.retryable)
      -- an expected version that is not the row's
      res, err = db:transaction(function(tx)
        return payments:transition(tx, "S1", "succeeded", { version = 7 })
      end)
      assert.is_nil(res)
      assert.equal("stale_version", err.kind)
      assert.equal(before + 2, fsm.stats().stale_versions_total)
      local row = row_of("payments", "S1")
      assert.same({ "unknown", 8 }, { row.state, row.version })
      assert.equal(1, #assert(audit.entries(db, "payment:S1")))
    end)

    it("apply with an expected version the row is not at fails at once",
       function()
      put("payments", "S2", "paying")
      local before = fsm.stats().stale_versions_total
      local res, err = payments:apply(db, "S2", "succeeded", { version = 3 })
      assert.is_nil(res)
      assert.equal("stale_version", err.kind)
      -- one refusal, not one per attempt (a fresh read cannot help)
      assert.equal(before + 1, fsm.stats().stale_versions_total)
      assert.equal("paying", row_of("payments", "S2").state)
      -- the version it is at still applies
      local v = row_of("payments", "S2").version
      assert(payments:apply(db, "S2", "succeeded", { version = v }))
      assert.equal("paid", row_of("payments", "S2").state)
    end)

    it("retries a stale transaction a bounded number of times", function()
      local calls = 0
      local res, err = fsm.retry(db, function()
        calls = calls + 1
        return nil, paygate.error("stale_version", "moved")
      end, { attempts = 3 })
      assert.is_nil(res)
      assert.equal("stale_version", err.kind)
      assert.equal(3, calls)
      calls = 0
      res = fsm.retry(db, function()
        calls = calls + 1
        if calls == 1 then return nil, paygate.error("stale_version", "x") end
        if calls == 2 then return nil, paygate.error("conflict", "head") end
        return "done"
      end)
      assert.equal("done", res)
      assert.equal(3, calls)
      -- other failures are not retried
      calls = 0
      res, err = fsm.retry(db, function()
        calls = calls + 1
        return nil, paygate.error("constraint", "dup")
      end)
      assert.equal("constraint", err.kind)
      assert.equal(1, calls)
    end)

    it("loses no transition and applies none twice under concurrency",
       function()
      -- 20 writers refund 5 fen each of a 100 fen payment at once; each
      -- picks its event from the state it read (partial or full)
      put("payments", "K1", "paid")
      local stale_before = fsm.stats().stale_versions_total
      local tasks = {}
      for i = 1, 20 do
        tasks[i] = paygate.spawn(function()
          return payments:apply(db, "K1", function(row)
            return row.refunded + 5 == row.amount and "refunded_fully"
                   or "refunded_partially"
          end, { set = function(row) return { refunded = row.refunded + 5 } end,
                 cause = "refund " .. i, attempts = 200 })
        end)
      end
      local full = 0
      for i = 1, 20 do
        local res, err = tasks[i]:wait()
        assert.is_nil(err)
        if res.to == "refunded" then full = full + 1 end
      end
      assert.equal(1, full)
      local row = row_of("payments", "K1")
      assert.same({ "refunded", 100, 27 },
                  { row.state, row.refunded, row.version })
      local entries = assert(audit.entries(db, "payment:K1"))
      assert.equal(20, #entries)
      local causes = {}
      for i, e in ipairs(entries) do
        causes[e.cause] = true
        if i > 1 then assert.equal(entries[i - 1].to, e.from) end
      end
      for i = 1, 20 do assert.is_true(causes["refund " .. i]) end
      assert.is_true((audit.verify(db, "payment:K1")))
      print(("\n  %s: 20 concurrent writers on one row: %d stale retries")
        :format(engine, fsm.stats().stale_versions_total - stale_before))
    end)

    it("applies a duplicated event once when many writers race", function()
      put("payments", "D1", "paying")
      local tasks = {}
      for i = 1, 10 do
        tasks[i] = paygate.spawn(function()
          return payments:apply(db, "D1", "succeeded", { attempts = 50 })
        end)
      end
      local won, refused = 0, 0
      for i = 1, 10 do
        local res, err = tasks[i]:wait()
        if res then
          won = won + 1
        else
          assert.equal("illegal_transition", err.kind)
          refused = refused + 1
        end
      end
      assert.same({ 1, 9 }, { won, refused })
      assert.equal(1, #assert(audit.entries(db, "payment:D1")))
      assert.equal(8, row_of("payments", "D1").version)
    end)

    it("puts refund transitions into the payment's chain", function()
      assert(payments:create(db, { id = "P9", amount = 100 }))
      assert(db:transaction(function(tx)
        assert(payments:transition(tx, "P9", "opened"))
        assert(payments:transition(tx, "P9", "succeeded"))
        assert(refunds:create(tx, { id = "RF1", payment_id = "P9",
                                    amount = 30 }))
        return true
      end))
      assert(refunds:apply(db, "RF1", "accepted"))
      assert(refunds:apply(db, "RF1", "succeeded"))
      assert(payments:apply(db, "P9", "refunded_partially",
                            { set = { refunded = 30 } }))
      local whats = {}
      for _, e in ipairs(assert(audit.entries(db, "payment:P9"))) do
        whats[#whats + 1] = e.what .. " " .. e.ref
      end
      assert.same({ "payment.created P9", "payment.opened P9",
                    "payment.succeeded P9", "refund.created RF1",
                    "refund.accepted RF1", "refund.succeeded RF1",
                    "payment.refunded_partially P9" }, whats)
      assert.is_true((audit.verify(db, "payment:P9")))
    end)

    it("makes the audit tables inside a caller's transaction, undone with it",
       function()
      put("payments", "T1", "created")
      local res, err = db:transaction(function(tx)
        assert(payments:transition(tx, "T1", "opened"))
        return nil, paygate.error("changed_mind", "roll back")
      end)
      assert.is_nil(res)
      assert.equal("changed_mind", err.kind)
      assert.equal("created", row_of("payments", "T1").state)
      assert(db:transaction(function(tx)
        return payments:transition(tx, "T1", "opened")
      end))
      assert.equal(1, #assert(audit.entries(db, "payment:T1")))
    end)
  end)
end
