-- gw.notify_atomic in-process on a real SQLite store: the common payment
-- notification as one db:atomic job -- the same rows as gw.notify's
-- transaction writes, duplicates by id and by business key, every other
-- case handed back to the transaction, and concurrent deliveries applied
-- exactly once.
local paygate = require "paygate"
local audit = require "paygate.audit"
local json = require "paygate.json"
local server = require "paygate.testing.server"
local testing = require "paygate.testing"
local gwcore = dofile("examples/gateway/spec/core_support.lua")

package.path = "examples/gateway/?.lua;" .. package.path
local model = require "gw.model"
local notify = require "gw.notify"
local notify_atomic = require "gw.notify_atomic"

describe("gateway notify_atomic", function()
  local dir, db

  local function payment(state, amount)
    return gwcore.payment(db, state, amount)
  end
  local paid_event = gwcore.paid_event

  local function wait_all(tasks)
    testing.wait_until(function()
      for _, t in ipairs(tasks) do
        if not t:finished() then return false end
      end
      return true
    end, 20, "the tasks")
  end

  setup(function()
    dir = server.tmpdir()
    db = gwcore.inproc("sqlite:" .. dir .. "/gw.db")
  end)

  teardown(function()
    db:close()
    server.rmdir(dir)
  end)

  it("applies a payment as the transaction does: same rows, audit, event", function()
    local a, b = payment("paying"), payment("paying")
    -- both attempts carry a channel switch's close mark (POST attempts
    -- sets it before closing the old attempt): paid, it goes, as
    -- gw.apply takes it off
    for _, id in ipairs({ a, b }) do
      assert(db:exec("UPDATE gw_attempts SET close_check_at = 1 WHERE"
                     .. " payment_id = $1", { id }))
    end
    assert.equal("applied", notify_atomic.process(db, "1900000001",
                                                   paid_event(a .. "_1")))
    assert.equal("applied", (notify.process("1900000001",
                                            paid_event(b .. "_1"))))
    local pa = assert(model.payment(db, a))
    local pb = assert(model.payment(db, b))
    for _, k in ipairs({ "state", "version", "late", "payer_total",
                         "refunded" }) do
      assert.equal(pb[k], pa[k], k)
    end
    assert.equal("paid", pa.state)
    assert.equal("42" .. a .. "_1", pa.transaction_id)
    assert.equal(a .. "_1", pa.paid_out_trade_no)
    assert.truthy(pa.notified_at)
    for _, id in ipairs({ a, b }) do
      local at = assert(db:query("SELECT state, transaction_id,"
        .. " close_check_at FROM gw_attempts WHERE payment_id = $1",
        { id }))[1]
      assert.same({ state = "paid", transaction_id = "42" .. id .. "_1" }, at)
    end
    for _, id in ipairs({ a, b }) do
      local n = assert(db:query("SELECT outcome FROM gw_notifications WHERE"
                                .. " id = $1", { "EV-" .. id .. "_1" }))[1]
      assert.equal("applied", n.outcome)
      local e = assert(db:query("SELECT notification_id FROM"
        .. " gw_notification_effects WHERE key = $1",
        { "pay|1900000001|" .. id .. "_1|SUCCESS" }))[1]
      assert.equal("EV-" .. id .. "_1", e.notification_id)
      local ok, rep = audit.verify(db, "payment:" .. id)
      assert.is_true(ok, rep.message)
      assert.equal(3, rep.entries)
    end
    local ea = audit.entries(db, "payment:" .. a)[3]
    local eb = audit.entries(db, "payment:" .. b)[3]
    assert.equal(eb.what, ea.what)
    assert.equal(eb.cause, ea.cause)
    assert.same(json.decode(eb.evidence).source, json.decode(ea.evidence).source)
    local ev = assert(db:query("SELECT subject, type, payload FROM paygate_outbox"
      .. " WHERE subject IN ($1, $2) ORDER BY subject", { a, b }))
    assert.equal(2, #ev)
    local by = {}
    for _, r in ipairs(ev) do by[r.subject] = json.decode(r.payload) end
    assert.equal("payment.paid", by[a].type)
    assert.equal("paid", by[a].payment.state)
    assert.equal(by[b].payment.version, by[a].payment.version)
  end)

  it("a duplicate by id or by business key changes nothing", function()
    local a = payment("paying")
    local ev = paid_event(a .. "_1")
    assert.equal("applied", notify_atomic.process(db, "1900000001", ev))
    local v = assert(model.payment(db, a)).version
    assert.equal("duplicate", notify_atomic.process(db, "1900000001", ev))
    local other = paid_event(a .. "_1", 100, "EV-other-" .. a)
    assert.equal("duplicate", notify_atomic.process(db, "1900000001", other))
    assert.equal(v, assert(model.payment(db, a)).version)
    assert.equal("duplicate", assert(db:query("SELECT outcome FROM"
      .. " gw_notifications WHERE id = $1", { other.id }))[1].outcome)
    local ok, rep = audit.verify(db, "payment:" .. a)
    assert.is_true(ok)
    assert.equal(3, rep.entries)
    assert.equal(1, #assert(db:query("SELECT id FROM paygate_outbox WHERE"
                                     .. " subject = $1", { a })))
  end)

  -- The race branch: the key or the id is claimed by another writer
  -- between this path's read and its write (a claim made here, in the
  -- one db:atomic call the job makes, just before it runs). The job fails
  -- on that statement and writes nothing; the notification is recorded
  -- as a duplicate; a query's claim (not another notification's) makes it
  -- a late one, said in one line.
  local function claimed_before_write(claim)
    local real = db.atomic
    db.atomic = function(self, ...)
      db.atomic = nil                    -- the handle's own method again
      claim()
      return real(self, ...)
    end
  end
  local function said(fn)
    local log = require("paygate").log
    local info, lines = log.info, {}
    log.info = function(msg, fields)
      lines[#lines + 1] = { msg = msg, fields = fields }
      return info(msg, fields)
    end
    local ok, a, b = pcall(fn)
    log.info = info
    assert(ok, a)
    return a, b, lines
  end
  local function late_lines(lines)
    local n = 0
    for _, l in ipairs(lines) do
      if l.msg:find("after a query", 1, true) then n = n + 1 end
    end
    return n
  end

  it("a key claimed between the read and the write: a duplicate, nothing"
     .. " written; late when a query claimed it", function()
    for _, who in ipairs({ "notification", "query" }) do
      local a = payment("paying")
      local no = a .. "_1"
      local ev = paid_event(no)
      local key = require("gw.apply").payment_key(ev.resource)
      local v = assert(model.payment(db, a)).version
      claimed_before_write(function()
        assert(db:exec("INSERT INTO gw_notification_effects (key,"
          .. " notification_id, applied_at) VALUES ($1, $2, $3)", { key,
          who == "query" and ("query:" .. no) or ("EV-first-" .. a),
          model.now() }))
      end)
      local outcome, err, lines = said(function()
        return notify_atomic.process(db, "1900000001", ev)
      end)
      assert.is_nil(err)
      assert.equal("duplicate", outcome)
      assert.is_nil(rawget(db, "atomic"))
      local p = assert(model.payment(db, a))
      assert.equal("paying", p.state)            -- nothing of the job
      assert.equal(v, p.version)
      assert.equal("open", assert(db:query("SELECT state FROM gw_attempts"
        .. " WHERE out_trade_no = $1", { no }))[1].state)
      assert.equal(0, #assert(db:query("SELECT id FROM paygate_outbox"
        .. " WHERE subject = $1", { a })))
      assert.equal("duplicate", assert(db:query("SELECT outcome FROM"
        .. " gw_notifications WHERE id = $1", { ev.id }))[1].outcome)
      assert.equal(who == "query" and 1 or 0, late_lines(lines), who)
    end
  end)

  it("its id recorded between the read and the write: a duplicate, nothing"
     .. " written", function()
    local a = payment("paying")
    local ev = paid_event(a .. "_1")
    local v = assert(model.payment(db, a)).version
    claimed_before_write(function()
      assert(db:exec("INSERT INTO gw_notifications (id, event_type,"
        .. " business_key, received_at, outcome) VALUES ($1, $2, $3, $4,"
        .. " 'applied')", { ev.id, ev.event_type, "other", model.now() }))
    end)
    assert.equal("duplicate", notify_atomic.process(db, "1900000001", ev))
    local p = assert(model.payment(db, a))
    assert.equal("paying", p.state)
    assert.equal(v, p.version)
    assert.equal(0, #assert(db:query("SELECT key FROM"
      .. " gw_notification_effects WHERE notification_id = $1", { ev.id })))
  end)

  it("hands every other case back to the transaction", function()
    local a = payment("paying", 200)
    assert.is_false(notify_atomic.process(db, "1900000001",
                                          paid_event(a .. "_1", 100)))   -- amount
    assert.is_false(notify_atomic.process(db, "1900000001",
                                          paid_event("nope_1")))         -- unknown
    local ev = paid_event(a .. "_1", 200)
    ev.event_type = "REFUND.SUCCESS"
    assert.is_false(notify_atomic.process(db, "1900000001", ev))
    ev = paid_event(a .. "_1", 200)
    ev.resource.trade_state = "CLOSED"
    assert.is_false(notify_atomic.process(db, "1900000001", ev))
    ev = paid_event(a .. "_1", 200)
    ev.resource.sp_mchid, ev.resource.sub_mchid = "1900000001", "1900000002"
    assert.is_false(notify_atomic.process(db, "1900000001", ev))
    assert(db:exec("UPDATE gw_attempts SET state = 'closed' WHERE"
                   .. " payment_id = $1", { a }))
    assert.is_false(notify_atomic.process(db, "1900000001",
                                          paid_event(a .. "_1", 200)))  -- late
    assert.equal("paying", assert(model.payment(db, a)).state)
    assert.equal(0, #assert(db:query("SELECT id FROM gw_notifications WHERE"
      .. " business_key LIKE $1", { "%" .. a .. "%" })))
  end)

  it("statements: the job process would run, for tools; false when it"
     .. " would not run one", function()
    -- (the caller's part; process does it, an earlier case may not have)
    assert(require("paygate.outbox").setup(db))
    assert(audit.ensure_schema(db))
    local a = payment("paying")
    local stmts = assert(notify_atomic.statements(db, "1900000001",
                                                  paid_event(a .. "_1")))
    -- reading made no change; the job applies the payment once
    assert.equal("paying", assert(model.payment(db, a)).state)
    assert.matches("^INSERT INTO gw_notifications", stmts[1][1])
    assert(db:atomic(stmts))
    local p = assert(model.payment(db, a))
    assert.equal("paid", p.state)
    assert.equal("42" .. a .. "_1", p.transaction_id)
    assert.equal(1, #assert(db:query("SELECT id FROM paygate_outbox WHERE"
                                     .. " subject = $1", { a })))
    assert.is_true(audit.verify(db, "payment:" .. a))
    -- run again, its guards refuse it whole: nothing written twice
    local ok, err = db:atomic(stmts)
    assert.is_nil(ok)
    assert.equal("conflict", err.kind)
    assert.equal(1, #assert(db:query("SELECT id FROM paygate_outbox WHERE"
                                     .. " subject = $1", { a })))
    assert.equal(1, #assert(db:query("SELECT id FROM gw_notifications"
      .. " WHERE business_key LIKE $1", { "%" .. a .. "%" })))
    assert.is_true(audit.verify(db, "payment:" .. a))
    -- paid now, a different case, an unknown order: no job
    assert.is_false(notify_atomic.statements(db, "1900000001",
                                             paid_event(a .. "_1", 100, "EV-2")))
    local ev = paid_event(a .. "_1")
    ev.event_type = "REFUND.SUCCESS"
    assert.is_false(notify_atomic.statements(db, "1900000001", ev))
    assert.is_false(notify_atomic.statements(db, "1900000001",
                                             paid_event("nope_1")))
  end)

  it("concurrent deliveries: each payment applied exactly once", function()
    local ids, tasks, outcomes = {}, {}, {}
    for i = 1, 10 do
      ids[i] = payment("paying")
    end
    for i = 1, 10 do
      for k = 1, 3 do                -- the same id three times, and
        local ev = paid_event(ids[i] .. "_1")
        if k == 3 then ev.id = "EV-again-" .. ids[i] end  -- another id
        tasks[#tasks + 1] = paygate.spawn(function()
          local o, err = notify_atomic.process(db, "1900000001", ev)
          assert(o, "outcome " .. tostring(o) .. " " .. tostring(err))
          outcomes[o] = (outcomes[o] or 0) + 1
          return true
        end)
      end
    end
    wait_all(tasks)
    for _, t in ipairs(tasks) do assert(t:wait()) end
    assert.equal(10, outcomes.applied)
    assert.equal(20, outcomes.duplicate)
    for i = 1, 10 do
      local p = assert(model.payment(db, ids[i]))
      assert.equal("paid", p.state)
      assert.equal(3, p.version)
      local ok, rep = audit.verify(db, "payment:" .. ids[i])
      assert.is_true(ok)
      assert.equal(3, rep.entries)
      assert.equal(1, #assert(db:query("SELECT id FROM paygate_outbox WHERE"
                                       .. " subject = $1", { ids[i] })))
    end
  end)
end)
