-- The gateway's migrations applied over a store made by earlier ones:
-- 004 makes the abnormal refunds whose checks had stopped (before abnormal
-- refunds were asked about again) due at once, and leaves the others be.
local sql = require "paygate.sql"
local migrate = require "paygate.migrate"
local servers = require "spec.support.servers"
local json = require "paygate.json"

describe("gateway migrations over an older store", function()
  local dir = servers.mktemp()
  teardown(function() servers.sh("rm -rf " .. dir) end)

  -- A folder holding engine name's migrations older than first ("010"):
  -- what an earlier version had applied.
  local function older(name, first)
    local old = dir .. "/old" .. first
    assert(os.execute("rm -rf " .. old .. " && mkdir -p " .. old .. "/"
                      .. name))
    local ls = assert(io.popen("ls examples/gateway/migrations/" .. name))
    for f in ls:lines() do
      if f < first then
        assert(os.execute("cp examples/gateway/migrations/" .. name .. "/"
                          .. f .. " " .. old .. "/" .. name .. "/"))
      end
    end
    ls:close()
    return old
  end

  it("004: abnormal refunds with no check planned are due now", function()
    local old = older("sqlite", "004")
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

  -- 005 on each engine: the attempts closed or superseded before it, of
  -- payments not expired for more than a day, are due at once
  -- (close_check_at = 0); the others are left alone.
  local engines = { { "sqlite", function()
    return "sqlite:" .. dir .. "/gw005.db"
  end } }
  if servers.have_postgres() then
    engines[2] = { "postgres", function() return servers.postgres_db().url end }
  end
  teardown(function() servers.stop_all() end)

  for _, engine in ipairs(engines) do
    local name = engine[1]
    it("005 on " .. name .. ": closed and superseded attempts of payments"
       .. " not long expired are due now", function()
      local old = older(name, "005")
      local db = assert(sql.open(engine[2]()))
      assert(migrate.run(db, old))
      local now = os.time()
      local function payment(id, expires_at, state)
        assert(db:exec("INSERT INTO gw_payments (id, app_id, order_id,"
          .. " mchid, appid, channel, amount, currency, description, state,"
          .. " version, out_trade_no, attempt, expires_at, created_at,"
          .. " updated_at) VALUES ($1, 'a', $1, '1900', 'wx1', 'native',"
          .. " 100, 'CNY', 'd', $2, 2, $1 || '_3', 3, $3, 0, 0)",
          { id, state, expires_at }))
      end
      local function attempt(pid, n, state)
        assert(db:exec("INSERT INTO gw_attempts (out_trade_no, payment_id,"
          .. " n, channel, state, created_at) VALUES ($1, $2, $3, 'native',"
          .. " $4, 0)", { pid .. "_" .. n, pid, n, state }))
      end
      -- open, closed a minute ago: its attempts may still be payable
      payment("p_fresh", now + 3600, "paying")
      attempt("p_fresh", 1, "closed")
      attempt("p_fresh", 2, "superseded")
      attempt("p_fresh", 3, "open")
      -- expired an hour ago: less than a day, still asked about
      payment("p_recent", now - 3600, "closed")
      attempt("p_recent", 1, "superseded")
      attempt("p_recent", 2, "paid")
      attempt("p_recent", 3, "closed")
      -- expired ten days ago: long over at WeChat
      payment("p_old", now - 10 * 86400, "closed")
      attempt("p_old", 1, "closed")
      attempt("p_old", 2, "superseded")
      attempt("p_old", 3, "closed")
      local applied = assert(migrate.run(db, "examples/gateway/migrations"))
      assert.equal("005_attempt_close.sql", applied[1].name)
      local got = {}
      for _, r in ipairs(assert(db:query("SELECT out_trade_no,"
                          .. " close_check_at, close_checks FROM"
                          .. " gw_attempts"))) do
        local at = r.close_check_at
        if at == json.null then at = nil end
        got[r.out_trade_no] = at and tonumber(at) or "none"
        assert.equal(0, tonumber(r.close_checks))
      end
      assert.same({
        p_fresh_1 = 0, p_fresh_2 = 0, p_fresh_3 = "none",
        p_recent_1 = 0, p_recent_2 = "none", p_recent_3 = 0,
        p_old_1 = "none", p_old_2 = "none", p_old_3 = "none",
      }, got)
      db:close()
    end)
  end
  -- 016 on each engine: the payments' transaction_id index is gone; a
  -- payment whose transaction_id its paid attempt did not carry gets it
  -- copied there; the console's search finds a payment by transaction_id
  -- through the attempts, and reads no table whole
  for _, engine in ipairs(engines) do
    local name = engine[1]
    it("016 on " .. name .. ": the payments' transaction index is gone, a"
       .. " search by transaction_id still finds the payment", function()
      local old = older(name, "016")
      -- (a store of its own: the others' has every migration applied)
      local db = assert(sql.open(name == "sqlite" and "sqlite:" .. dir
                                 .. "/gw016.db" or engine[2]()))
      assert(migrate.run(db, old))
      local function payment(id, state, txn, paid_no)
        assert(db:exec("INSERT INTO gw_payments (id, app_id, order_id,"
          .. " mchid, appid, channel, amount, currency, description, state,"
          .. " version, out_trade_no, attempt, transaction_id,"
          .. " paid_out_trade_no, expires_at, created_at, updated_at)"
          .. " VALUES ($1, 'a', $1, '1900', 'wx1', 'native', 100, 'CNY',"
          .. " 'd', $2, 3, $1 || '_2', 2, $3, $4, 0, 0, 0)",
          { id, state, txn or json.null, paid_no or json.null }))
      end
      local function attempt(pid, n, state, txn)
        assert(db:exec("INSERT INTO gw_attempts (out_trade_no, payment_id,"
          .. " n, channel, state, transaction_id, created_at) VALUES ($1,"
          .. " $2, $3, 'native', $4, $5, 0)",
          { pid .. "_" .. n, pid, n, state, txn or json.null }))
      end
      -- paid on its first attempt, the id on the payment only
      payment("p_old", "paid", "4200000001", "p_old_1")
      attempt("p_old", 1, "paid")
      attempt("p_old", 2, "closed")
      -- paid, the id on both
      payment("p_both", "paid", "4200000002", "p_both_2")
      attempt("p_both", 1, "superseded")
      attempt("p_both", 2, "paid", "4200000002")
      -- paid, no paid attempt named (a hand-made row): its current one
      payment("p_noname", "paid", "4200000003")
      attempt("p_noname", 1, "closed")
      attempt("p_noname", 2, "paid")
      -- not paid
      payment("p_open", "paying")
      attempt("p_open", 1, "superseded")
      attempt("p_open", 2, "open")
      local applied = assert(migrate.run(db, "examples/gateway/migrations"))
      assert.equal("016_drop_payments_transaction.sql", applied[1].name)
      local got = {}
      for _, r in ipairs(assert(db:query("SELECT out_trade_no,"
                                         .. " transaction_id FROM gw_attempts"))) do
        got[r.out_trade_no] = r.transaction_id ~= json.null
                              and r.transaction_id or "none"
      end
      assert.same({ p_old_1 = "4200000001", p_old_2 = "none",
                    p_both_1 = "none", p_both_2 = "4200000002",
                    p_noname_1 = "none", p_noname_2 = "4200000003",
                    p_open_1 = "none", p_open_2 = "none" }, got)
      local rows = assert(db:query(name == "sqlite"
        and "SELECT name FROM sqlite_master WHERE type = 'index'"
        or "SELECT indexname AS name FROM pg_indexes"
           .. " WHERE schemaname = current_schema()"))
      local have = {}
      for _, r in ipairs(rows) do have[r.name] = true end
      assert.is_nil(have.gw_payments_transaction)
      assert.is_true(have.gw_attempts_transaction)
      package.path = "examples/gateway/?.lua;" .. package.path
      local pages = require "gw.console.pages"
      for _, c in ipairs{ { "4200000001", "p_old" }, { "4200000002", "p_both" },
                          { "4200000003", "p_noname" },
                          { "p_open_1", "p_open" }, { "p_both", "p_both" } } do
        local found = assert(db:query(pages.search_sql(c[1])))
        assert.equal(1, #found, c[1])
        assert.equal(c[2], found[1].id)
      end
      if name == "sqlite" then
        -- every term an index's: no SCAN of a table but the order_id
        -- subquery's (gw_payments has no index on order_id alone)
        local text, q, params = {}, pages.search_sql("x")
        for _, r in ipairs(assert(db:query("EXPLAIN QUERY PLAN " .. q,
                                           params))) do
          text[#text + 1] = r.detail
        end
        text = table.concat(text, "\n")
        local scans = 0
        for line in text:gmatch("[^\n]+") do
          if line:find("^SCAN ") then scans = scans + 1 end
        end
        assert.truthy(scans <= 1, text)
        assert.truthy(text:find("gw_attempts_transaction", 1, true), text)
      end
      db:close()
    end)
  end
  -- 006 on each engine: the reconciliation's search for due payments and
  -- refunds is a range scan of a partial index, not a read of every open
  -- row (SQLite is told the index: INDEXED BY fails if it cannot be used)
  for _, engine in ipairs(engines) do
    local name = engine[1]
    it("006 on " .. name .. ": the reconciliation's due queries scan their"
       .. " partial indexes", function()
      package.path = "examples/gateway/?.lua;" .. package.path
      local due = require("gw.reconcile").DUE_SQL[name]
      local db = assert(sql.open(engine[2]()))
      assert(migrate.run(db, "examples/gateway/migrations"))
      local want = { pay = { "gw_payments_due", "gw_payments_unchecked" },
                     ref = { "gw_refunds_due", "gw_refunds_unchecked" } }
      for kind, sqls in pairs(due) do
        for i, q in ipairs(sqls) do
          local plan = {}
          assert(db:transaction(function(tx)
            if name == "postgres" then
              -- (on empty tables a sequential scan is cheapest: forbid it
              -- to see whether the index can serve the query at all)
              assert(tx:exec("SET LOCAL enable_seqscan = off"))
              assert(tx:exec("SET LOCAL enable_bitmapscan = off"))
            end
            local rows = assert(tx:query((name == "sqlite"
              and "EXPLAIN QUERY PLAN " or "EXPLAIN ") .. q, { 1, 20 }))
            for _, r in ipairs(rows) do
              plan[#plan + 1] = r.detail or r["QUERY PLAN"]
            end
            return true
          end))
          local text = table.concat(plan, "\n")
          assert.truthy(text:find(want[kind][i], 1, true), text)
          assert.falsy(text:find("TEMP B-TREE", 1, true), text)
          assert.falsy(text:find("Sort", 1, true), text)
        end
      end
      db:close()
    end)
    -- 008: the console's payment page reads the notifications of each
    -- attempt and refund as a range of gw_notifications_business, not the
    -- whole table (a LIKE '%|<out_trade_no>|%' did, once per number)
    it("008 on " .. name .. ": the payment page's notifications are an"
       .. " index range", function()
      package.path = "examples/gateway/?.lua;" .. package.path
      local q = require("gw.console.pages").NOTES_SQL[name]
      local db = assert(sql.open(engine[2]()))
      assert(migrate.run(db, "examples/gateway/migrations"))
      local plan = {}
      assert(db:transaction(function(tx)
        if name == "postgres" then
          -- (empty tables: forbid the sequential scan, as for 006)
          assert(tx:exec("SET LOCAL enable_seqscan = off"))
          assert(tx:exec("SET LOCAL enable_bitmapscan = off"))
        end
        local rows = assert(tx:query((name == "sqlite"
          and "EXPLAIN QUERY PLAN " or "EXPLAIN ") .. q,
          { "pay|1900|pay_1_1|", "pay|1900|pay_1_1}" }))
        for _, r in ipairs(rows) do
          plan[#plan + 1] = r.detail or r["QUERY PLAN"]
        end
        return true
      end))
      local text = table.concat(plan, "\n")
      assert.truthy(text:find("gw_notifications_business", 1, true), text)
      assert.falsy(text:find("SCAN gw_notifications", 1, true), text)
      assert.falsy(text:find("Seq Scan", 1, true), text)
      db:close()
    end)
    -- 015: the console's list of one sub-merchant's payments, page after
    -- page, is an index range (read newest first), not every payment
    it("015 on " .. name .. ": the console's list of a sub-merchant's"
       .. " payments is an index range", function()
      package.path = "examples/gateway/?.lua;" .. package.path
      local pages = require "gw.console.pages"
      local db = assert(sql.open(engine[2]()))
      assert(migrate.run(db, "examples/gateway/migrations"))
      for _, q in ipairs{ { sub_mchid = "1600000001" },
                          { sub_mchid = "1600000001",
                            after = "1796041000.5~pay_x" } } do
        local text, params = pages.list_sql(q)
        local plan = {}
        assert(db:transaction(function(tx)
          if name == "postgres" then
            -- (empty tables: forbid the sequential scan, as for 006)
            assert(tx:exec("SET LOCAL enable_seqscan = off"))
            assert(tx:exec("SET LOCAL enable_bitmapscan = off"))
          end
          local rows = assert(tx:query((name == "sqlite"
            and "EXPLAIN QUERY PLAN " or "EXPLAIN ") .. text, params))
          for _, r in ipairs(rows) do
            plan[#plan + 1] = r.detail or r["QUERY PLAN"]
          end
          return true
        end))
        local t = table.concat(plan, "\n")
        assert.truthy(t:find("gw_payments_sub_mchid_created", 1, true), t)
        assert.falsy(t:find("TEMP B-TREE", 1, true), t)
        assert.falsy(t:find("Sort", 1, true), t)
      end
      db:close()
    end)
    -- 007: three indexes no query reads (each cost every write moving its
    -- columns) are dropped; those the queries name are kept
    it("007 on " .. name .. ": the unused indexes are gone, the used ones"
       .. " stay", function()
      local db = assert(sql.open(engine[2]()))
      assert(migrate.run(db, "examples/gateway/migrations"))
      local rows = assert(db:query(name == "sqlite"
        and "SELECT name FROM sqlite_master WHERE type = 'index'"
        or "SELECT indexname AS name FROM pg_indexes"
           .. " WHERE schemaname = current_schema()"))
      local have = {}
      for _, r in ipairs(rows) do have[r.name] = true end
      for _, gone in ipairs{ "gw_payments_next_check", "gw_payments_state",
                             "gw_refunds_next_check" } do
        assert.is_nil(have[gone], gone)
      end
      for _, kept in ipairs{ "gw_payments_due", "gw_payments_unchecked",
                             "gw_payments_state_created",
                             "gw_payments_created", "gw_refunds_due" } do
        assert.is_true(have[kept], kept)
      end
      db:close()
    end)
  end
  -- 010 on each engine: a store made before it (its payments and attempts
  -- all under the provider's sp_appid) takes sub_appid, NULL on the rows
  -- it has, and the rows written after it carry one
  for _, engine in ipairs(engines) do
    local name = engine[1]
    it("010 on " .. name .. ": payments and attempts take sub_appid, the"
       .. " older ones NULL", function()
      local old = older(name, "010")
      local url = name == "sqlite" and "sqlite:" .. dir .. "/gw010.db"
                  or engine[2]()
      local db = assert(sql.open(url))
      if name == "postgres" then
        -- (the shared server: the tables the earlier cases made go first)
        assert(db:exec("DROP SCHEMA public CASCADE"))
        assert(db:exec("CREATE SCHEMA public"))
      end
      assert(migrate.run(db, old))
      assert(db:exec("INSERT INTO gw_payments (id, app_id, order_id, mchid,"
        .. " sub_mchid, appid, channel, amount, currency, description, state,"
        .. " version, out_trade_no, attempt, expires_at, created_at,"
        .. " updated_at) VALUES ('pay_o', 'a', 'o', '1900', '1600', 'wx1',"
        .. " 'native', 100, 'CNY', 'd', 'paying', 2, 'pay_o_1', 1, 0, 0, 0)"))
      assert(db:exec("INSERT INTO gw_attempts (out_trade_no, payment_id, n,"
        .. " channel, state, created_at) VALUES ('pay_o_1', 'pay_o', 1,"
        .. " 'native', 'open', 0)"))
      local applied = assert(migrate.run(db, "examples/gateway/migrations"))
      -- (010, and those after it)
      assert.equal("010_sub_appid.sql", applied[1].name)
      local rows = assert(db:query("SELECT COUNT(*) AS n FROM gw_payments p"
        .. " JOIN gw_attempts a ON a.payment_id = p.id WHERE p.sub_appid IS"
        .. " NULL AND a.sub_appid IS NULL"))
      assert.equal(1, tonumber(rows[1].n))
      assert(db:exec("UPDATE gw_payments SET sub_appid = 'wxsub' WHERE id ="
                     .. " 'pay_o'"))
      assert(db:exec("INSERT INTO gw_attempts (out_trade_no, payment_id, n,"
        .. " channel, state, created_at, sub_appid) VALUES ('pay_o_2',"
        .. " 'pay_o', 2, 'jsapi', 'open', 0, 'wxsub')"))
      rows = assert(db:query("SELECT p.sub_appid AS p, a.sub_appid AS a"
        .. " FROM gw_payments p JOIN gw_attempts a ON a.payment_id = p.id"
        .. " WHERE a.n = 2"))
      assert.same({ { p = "wxsub", a = "wxsub" } }, rows)
      db:close()
    end)
  end
  -- 012 on each engine: a store made before it takes
  -- refunded_elsewhere_at, NULL (not flagged) on the payments it has
  for _, engine in ipairs(engines) do
    local name = engine[1]
    it("012 on " .. name .. ": payments take refunded_elsewhere_at, the"
       .. " older ones NULL", function()
      local old = older(name, "012")
      local url = name == "sqlite" and "sqlite:" .. dir .. "/gw012.db"
                  or engine[2]()
      local db = assert(sql.open(url))
      if name == "postgres" then
        assert(db:exec("DROP SCHEMA public CASCADE"))
        assert(db:exec("CREATE SCHEMA public"))
      end
      assert(migrate.run(db, old))
      assert(db:exec("INSERT INTO gw_payments (id, app_id, order_id, mchid,"
        .. " appid, channel, amount, currency, description, state,"
        .. " version, out_trade_no, attempt, expires_at, created_at,"
        .. " updated_at) VALUES ('pay_e', 'a', 'o', '1900', 'wx1',"
        .. " 'native', 100, 'CNY', 'd', 'paid', 3, 'pay_e_1', 1, 0, 0, 0)"))
      local applied = assert(migrate.run(db, "examples/gateway/migrations"))
      assert.equal("012_refunded_elsewhere.sql", applied[1].name)
      local rows = assert(db:query("SELECT refunded_elsewhere_at AS at FROM"
        .. " gw_payments WHERE id = 'pay_e'"))
      assert.equal(1, #rows)
      assert.is_true(rows[1].at == nil or rows[1].at == json.null)
      assert(db:exec("UPDATE gw_payments SET refunded_elsewhere_at = 1.5"
                     .. " WHERE id = 'pay_e'"))
      rows = assert(db:query("SELECT refunded_elsewhere_at AS at FROM"
        .. " gw_payments WHERE id = 'pay_e'"))
      assert.equal(1.5, tonumber(rows[1].at))
      db:close()
    end)
  end
  -- 013 on each engine: a store made before it keeps its refunds (no
  -- reference); after it a reference is held by one refund of a payment
  -- that did not fail or close: a second such row is refused by the
  -- index, one beside a failed or closed one of it, or of another
  -- payment, is not
  for _, engine in ipairs(engines) do
    local name = engine[1]
    it("013 on " .. name .. ": refunds take a reference, unique per payment"
       .. " among those that did not fail or close", function()
      local old = older(name, "013")
      local url = name == "sqlite" and "sqlite:" .. dir .. "/gw013.db"
                  or engine[2]()
      local db = assert(sql.open(url))
      if name == "postgres" then
        assert(db:exec("DROP SCHEMA public CASCADE"))
        assert(db:exec("CREATE SCHEMA public"))
      end
      assert(migrate.run(db, old))
      for _, id in ipairs({ "pay_r", "pay_s" }) do
        assert(db:exec("INSERT INTO gw_payments (id, app_id, order_id,"
          .. " mchid, appid, channel, amount, currency, description, state,"
          .. " version, out_trade_no, attempt, expires_at, created_at,"
          .. " updated_at) VALUES ($1, 'a', $1, '1900', 'wx1', 'native',"
          .. " 100, 'CNY', 'd', 'paid', 3, $1 || '_1', 1, 0, 0, 0)", { id }))
      end
      local function refund(id, pay, state, reference)
        return db:exec("INSERT INTO gw_refunds (id, payment_id,"
          .. " out_refund_no, out_trade_no, kind, amount, state, version,"
          .. " created_at, updated_at, reference) VALUES ($1, $2, $1,"
          .. " $2 || '_1', 'merchant', 10, $3, 1, 0, 0, $4)",
          { id, pay, state, reference or json.null })
      end
      -- (before 013: no reference column)
      assert(db:exec("INSERT INTO gw_refunds (id, payment_id, out_refund_no,"
        .. " out_trade_no, kind, amount, state, version, created_at,"
        .. " updated_at) VALUES ('ref_old', 'pay_r', 'ref_old', 'pay_r_1',"
        .. " 'merchant', 10, 'succeeded', 3, 0, 0)"))
      local applied = assert(migrate.run(db, "examples/gateway/migrations"))
      assert.equal("013_refund_reference.sql", applied[1].name)
      local rows = assert(db:query("SELECT reference FROM gw_refunds"))
      assert.equal(1, #rows)
      assert.is_true(rows[1].reference == nil
                     or rows[1].reference == json.null)
      -- refunds without a reference: as many as there are
      assert(refund("ref_n1", "pay_r", "processing"))
      assert(refund("ref_n2", "pay_r", "processing"))
      -- one that failed and one that closed, then the one that holds it
      assert(refund("ref_f", "pay_r", "failed", "RMA-1"))
      assert(refund("ref_c", "pay_r", "closed", "RMA-1"))
      assert(refund("ref_a", "pay_r", "processing", "RMA-1"))
      local ok, err = refund("ref_b", "pay_r", "created", "RMA-1")
      assert.is_nil(ok)
      assert.equal("constraint", err.kind)
      assert.matches("reference", err.constraint, 1, true)
      -- another payment's refund of RMA-1 is its own
      assert(refund("ref_s", "pay_s", "processing", "RMA-1"))
      db:close()
    end)
  end
  -- 009 (SQLite): a state change of a payment or a refund (the fsm's
  -- version-guarded UPDATE) checks the open-state partial indexes' WHERE
  -- for the old and the new row in place: 006's IN lists made SQLite
  -- build and drop a temporary table for each, every time. The rows the
  -- due queries find are the same.
  it("009 on sqlite: a state change keeps the partial indexes with no"
     .. " temporary table, and the due queries see it", function()
    package.path = "examples/gateway/?.lua;" .. package.path
    local due = require("gw.reconcile").DUE_SQL.sqlite
    local db = assert(sql.open("sqlite:" .. dir .. "/gw009.db"))
    assert(migrate.run(db, "examples/gateway/migrations"))
    for _, q in ipairs{
      "UPDATE gw_payments SET state = $1, version = $2, next_check_at = $3,"
        .. " updated_at = $4 WHERE id = $5 AND version = $6",
      "UPDATE gw_refunds SET state = $1, version = $2, next_check_at = $3,"
        .. " updated_at = $4 WHERE id = $5 AND version = $6" } do
      local ops = {}
      for _, r in ipairs(assert(db:query("EXPLAIN " .. q,
                                         { "x", 1, 1, 1, "x", 1 }))) do
        ops[#ops + 1] = r.opcode
      end
      local text = table.concat(ops, " ")
      assert.truthy(text:find("IdxDelete", 1, true), text)  -- it ran
      assert.falsy(text:find("OpenEphemeral", 1, true), q .. ": " .. text)
    end
    -- an open payment due for a check, and one never checked: each found
    -- by its query while open, neither once paid
    for _, p in ipairs{ { "p_due", 50 }, { "p_new", json.null } } do
      assert(db:exec("INSERT INTO gw_payments (id, app_id, order_id,"
        .. " mchid, appid, channel, amount, currency, description, state,"
        .. " version, out_trade_no, attempt, expires_at, created_at,"
        .. " updated_at, next_check_at) VALUES ($1, 'a', $1, '1900', 'wx1',"
        .. " 'native', 100, 'CNY', 'd', 'paying', 2, $1 || '_1', 1, 0, 10,"
        .. " 10, $2)", { p[1], p[2] }))
    end
    local function found()
      local ids = {}
      for _, q in ipairs(due.pay) do
        for _, r in ipairs(assert(db:query(q, { 100, 20 }))) do
          ids[#ids + 1] = r.id
        end
      end
      table.sort(ids)
      return ids
    end
    assert.same({ "p_due", "p_new" }, found())
    assert(db:exec("UPDATE gw_payments SET state = 'paid', version = 3"
                   .. " WHERE id = 'p_due' AND version = 2"))
    assert.same({ "p_new" }, found())
    assert(db:exec("UPDATE gw_payments SET state = 'unknown', version = 4"
                   .. " WHERE id = 'p_due' AND version = 3"))
    assert.same({ "p_due", "p_new" }, found())
    db:close()
  end)
end)
