-- paygate.fsm and paygate.audit as plans for db:atomic: the transition
-- decided on a row read beforehand, its statements (version-guarded
-- UPDATE, audit head move + entry) and the caller's (dedupe, outbox) as one
-- job, retried from fresh state on a conflict. SQLite and PostgreSQL.
local fsm = require "paygate.fsm"
local audit = require "paygate.audit"
local outbox = require "paygate.outbox"
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
CREATE TABLE seen (k TEXT PRIMARY KEY);
CREATE TABLE events (id TEXT NOT NULL, what TEXT NOT NULL)]]

local stores = servers.stores(tmp, TABLES, "payments, seen, events,"
  .. " paygate_audit, paygate_audit_heads", { pool = 8 })

local wait_until = require("paygate.testing").wait_until

local function state_of(db, id)
  return assert(db:query("SELECT state, version, refunded FROM payments"
    .. " WHERE id = $1", { id }))[1]
end

for _, engine in ipairs({ "sqlite", "postgres" }) do
  local open = stores[engine]
  if open then
    describe("fsm plans on " .. engine, function()
      local db, m

      before_each(function()
        db = open()
        m = fsm.new(fsm.payment, { store = fsm.sql_store{ table = "payments" } })
        assert(m:create(db, { id = "P1", amount = 100 }))
      end)

      after_each(function()
        db:close()
      end)

      it("m:plan decides on the row read and writes nothing", function()
        local plan = assert(m:plan(db, "P1", "opened", { cause = "t" }))
        assert.equal("created", plan.from)
        assert.equal("paying", plan.to)
        assert.equal(2, plan.version)
        assert.equal("paying", plan.row.state)
        assert.equal(3, #plan.statements)
        assert.equal(fsm.VERSION_STMT, plan.statements[1].name)
        assert.equal(1, plan.statements[1].expect)
        assert.equal(audit.HEAD_STMT, plan.statements[2].name)
        assert.equal(audit.ENTRY_STMT, plan.statements[3].name)
        assert.equal(2, plan.audit.seq)
        assert.equal("created", state_of(db, "P1").state)
        -- and the statements commit it, the chain holding
        assert(db:atomic(plan.statements))
        assert.same({ state = "paying", version = 2, refunded = 0 },
                    state_of(db, "P1"))
        local ok, rep = audit.verify(db, "payment:P1")
        assert.is_true(ok, rep.message)
        assert.equal(2, rep.entries)
      end)

      it("m:apply_atomic applies with the caller's statements, all or none", function()
        local function add(key)
          return function(plan)
            return {
              { "INSERT INTO seen (k) VALUES ($1)", { key }, expect = 1,
                name = "dedupe" },
              { "INSERT INTO events (id, what) VALUES ($1, $2)",
                { plan.id, "payment." .. plan.to } },
            }
          end
        end
        local res = assert(m:apply_atomic(db, "P1", "succeeded", {
          cause = "notification", evidence = { notification_id = "N1" },
          set = { transaction_id = "42" }, add = add("N1") }))
        assert.equal("paid", res.to)
        assert.equal(5, #res.results)
        assert.same({ state = "paid", version = 2, refunded = 0 },
                    state_of(db, "P1"))
        assert.equal("42", assert(m:get(db, "P1")).transaction_id)
        -- a duplicate: its dedupe insert conflicts, nothing of it is kept
        local _, err = m:apply_atomic(db, "P1", "refunded_partially", {
          set = { refunded = 10 }, add = add("N1") })
        assert.equal("conflict", err.kind)
        assert.equal("dedupe", err.name)
        assert.equal(4, err.index)
        assert.same({ state = "paid", version = 2, refunded = 0 },
                    state_of(db, "P1"))
        assert.equal(1, #assert(db:query("SELECT * FROM events")))
        local ok, rep = audit.verify(db, "payment:P1")
        assert.is_true(ok, rep.message)
        assert.equal(2, rep.entries)
      end)

      it("refuses an illegal transition and writes nothing", function()
        local _, err = m:apply_atomic(db, "P1", "refunded_fully")
        assert.equal("illegal_transition", err.kind)
        _, err = m:apply_atomic(db, "nope", "opened")
        assert.equal("not_found", err.kind)
        assert.same({ state = "created", version = 1, refunded = 0 },
                    state_of(db, "P1"))
      end)

      it("a stale row or chain is a conflict of the job; apply_atomic retries from fresh state", function()
        local row = assert(m:get(db, "P1"))
        local head = assert(audit.head(db, "payment:P1"))
        local stale = assert(m:plan(db, "P1", "opened", { row = row, head = head }))
        assert(m:apply_atomic(db, "P1", "closed"))
        local _, err = db:atomic(stale.statements)
        assert.equal("conflict", err.kind)
        assert.equal(fsm.VERSION_STMT, err.name)
        -- a chain moved by someone else (an audit append outside the fsm)
        row = assert(m:get(db, "P1"))
        head = assert(audit.head(db, "payment:P1"))
        local plan = assert(m:plan(db, "P1", "succeeded", { row = row, head = head }))
        assert(audit.append(db, "payment:P1", { what = "note" }))
        _, err = db:atomic(plan.statements)
        assert.equal("conflict", err.kind)
        assert.equal(audit.HEAD_STMT, err.name)
        assert.equal("closed", state_of(db, "P1").state)
        -- opts.row / opts.head given stale: the first attempt conflicts,
        -- the next one reads again and applies
        local res = assert(m:apply_atomic(db, "P1", "succeeded", { row = row, head = head }))
        assert.equal("closed", res.from)
        assert.equal(3, res.version)
        local ok, rep = audit.verify(db, "payment:P1")
        assert.is_true(ok, rep.message)
        assert.equal(4, rep.entries)     -- created, closed, note, succeeded
      end)

      it("concurrent writers on one row: every one applied once, in a chain that verifies", function()
        assert(m:apply_atomic(db, "P1", "succeeded"))
        local before = fsm.stats().stale_versions_total
        local tasks, k = {}, 12
        for i = 1, k do
          tasks[i] = paygate.spawn(function()
            return m:apply_atomic(db, "P1", "refunded_partially", {
              set = function(row) return { refunded = row.refunded + 1 } end,
              attempts = 100,
              add = function(plan)
                return { { "INSERT INTO seen (k) VALUES ($1)", { "r" .. i },
                           expect = 1 } }
              end })
          end)
        end
        for i = 1, k do
          wait_until(function() return tasks[i]:finished() end, 30, "writer " .. i)
          assert(tasks[i]:wait())
        end
        assert.same({ state = "partially_refunded", version = 2 + k,
                      refunded = k }, state_of(db, "P1"))
        assert.equal(k, #assert(db:query("SELECT k FROM seen")))
        local ok, rep = audit.verify(db, "payment:P1")
        assert.is_true(ok, rep.message)
        assert.equal(2 + k, rep.entries)
        -- they read the same row: most had to read again
        assert.truthy(fsm.stats().stale_versions_total > before)
      end)

      it("hooks add statements to the plan; a hook using ctx.tx raises", function()
        local hm = fsm.new(fsm.payment, {
          store = fsm.sql_store{ table = "payments" },
          enter = { paying = function(ctx)
            ctx.statements[#ctx.statements + 1] = {
              "INSERT INTO events (id, what) VALUES ($1, 'hook')", { ctx.id } }
          end } })
        local plan = assert(hm:plan(db, "P1", "opened"))
        assert.equal(4, #plan.statements)
        assert(db:atomic(plan.statements))
        assert.equal("hook", assert(db:query("SELECT what FROM events"))[1].what)
        local bad = fsm.new(fsm.payment, {
          store = fsm.sql_store{ table = "payments" },
          enter = { closed = function(ctx) ctx.tx:exec("SELECT 1") end } })
        assert.has_error(function() bad:plan(db, "P1", "closed") end)
      end)

      it("fsm.atomic: build's error, nothing to write, retry_on", function()
        local _, err = fsm.atomic(db, function()
          return nil, paygate.error("nope", "no")
        end)
        assert.equal("nope", err.kind)
        local res, v = fsm.atomic(db, function() return {}, "dup" end)
        assert.same({}, res)
        assert.equal("dup", v)
        local calls = 0
        res, v = fsm.atomic(db, function(attempt)
          calls = calls + 1
          local k = attempt == 1 and "x" or "y"
          return { { "INSERT INTO seen (k) VALUES ($1)", { k }, expect = 1,
                     name = "mine" } }, k
        end, { retry_on = { "mine" } })
        assert.equal(1, calls)
        assert.equal("x", v)
        calls = 0
        res, v = fsm.atomic(db, function(attempt)
          calls = calls + 1
          local k = attempt == 1 and "x" or "y"
          return { { "INSERT INTO seen (k) VALUES ($1)", { k }, expect = 1,
                     name = "mine" } }, k
        end, { retry_on = { "mine" } })
        assert.equal(2, calls)
        assert.equal("y", v)
        -- not named: no retry
        _, err = fsm.atomic(db, function()
          return { { "INSERT INTO seen (k) VALUES ('x')", nil, expect = 1 } }
        end)
        assert.equal("conflict", err.kind)
        assert.has_error(function() fsm.atomic(db, function() return 5 end) end)
        assert.has_error(function() fsm.atomic({}, function() end) end)
      end)

      it("outbox.statement enqueues with the transition, or not at all", function()
        assert(outbox.setup(db))
        local res = assert(m:apply_atomic(db, "P1", "opened", {
          add = function(plan)
            return { outbox.statement(db, { subject = plan.id,
              type = "payment.paying", payload = { id = plan.id } }) }
          end }))
        assert.truthy(res.results[4].last_id)
        local _, err = m:apply_atomic(db, "P1", "closed", {
          add = function(plan)
            return { outbox.statement(db, { subject = plan.id,
                       type = "payment.closed" }),
                     { "SELECT 1 AS x WHERE 1 = 0", nil, expect = 1,
                       name = "never" } }
          end })
        assert.equal("never", err.name)
        local rows = assert(db:query("SELECT type, payload FROM paygate_outbox"))
        assert.equal(1, #rows)
        assert.equal("payment.paying", rows[1].type)
        assert.equal('{"id":"P1"}', rows[1].payload)
        assert.has_error(function() outbox.statement({}, { subject = "x", type = "t" }) end)
        assert.has_error(function() outbox.statement(db, { subject = "", type = "t" }) end)
      end)

      it("audit.plan checks its arguments", function()
        assert.has_error(function() audit.plan("", { what = "x" }, false) end,
                         "audit.plan: subject must be a non-empty string")
        assert.has_error(function() audit.plan("s", { what = "x" }, {}) end)
        local e, stmts = audit.plan("s", { what = "x", at = 5 }, false)
        assert.equal(1, e.seq)
        assert.equal(audit.GENESIS, e.prev_hash)
        assert.equal(audit.hash(e), e.hash)
        assert.equal(2, #stmts)
        assert(audit.ensure_schema(db))
        -- a month nobody made ahead (1970 here): db:atomic cannot create its
        -- partition on PostgreSQL; audit.prepare does (fsm.atomic calls it)
        assert(audit.prepare(db, stmts))
        assert(db:atomic(stmts))
        assert.is_true((audit.verify(db, "s")))
        -- the same plan again: the first head's insert finds it taken
        local _, err = db:atomic(stmts)
        assert.equal("conflict", err.kind)
        assert.equal(audit.HEAD_STMT, err.name)
      end)
    end)
  end
end
