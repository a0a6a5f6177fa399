-- paygate.audit on PostgreSQL: the trail is partitioned by month on `at`;
-- chains span partitions and still verify; tampering in an old partition
-- is found; concurrent appends into a month without a partition create it
-- once; an unpartitioned table made by an older version keeps working.
local paygate = require "paygate"
local sql = require "paygate.sql"
local audit = require "paygate.audit"
local servers = require "spec.support.servers"

if not servers.have_postgres() then
  describe("paygate.audit partitions", function()
    pending("PostgreSQL is not installed")
  end)
  return
end

local pg_srv = servers.postgres()
teardown(function() servers.stop_all() end)

-- epoch ms of a UTC date
local function ms(y, m, d, h)
  return (os.time({ year = y, month = m, day = d, hour = h or 12 })
          - os.time({ year = 1970, month = 1, day = 1, hour = 0 })) * 1000
end
-- os.time is local time on both sides, so the offset cancels unless the
-- zone has DST; the specs' dates are mid-month, mid-day: far from edges.

local function fresh()
  local db = assert(sql.open(pg_srv.url, { pool = 8 }))
  assert(db:exec_script([[DROP TABLE IF EXISTS paygate_audit CASCADE;
    DROP TABLE IF EXISTS paygate_audit_heads]]))
  db:close()
  return assert(sql.open(pg_srv.url, { pool = 8 }))  -- no cached layout
end

local function parts(db)
  local rows = assert(db:query("SELECT tableoid::regclass::text AS part,"
    .. " count(*)::int AS n FROM paygate_audit GROUP BY 1 ORDER BY 1"))
  local out = {}
  for _, r in ipairs(rows) do
    out[r.part] = r.n
  end
  return out
end

local function exists(db, name)
  return assert(db:query("SELECT (to_regclass($1) IS NOT NULL)::int AS e",
                         { name }))[1].e == 1
end

describe("paygate.audit partitioned by month on PostgreSQL", function()
  local db
  before_each(function() db = fresh() end)
  after_each(function() db:close() end)

  -- payment:X: seq 1..3 in October 2026, 4..5 in November
  local function two_months()
    for i = 1, 5 do
      assert(audit.append(db, "payment:X", {
        what = "step", to = "s" .. i,
        at = i <= 3 and ms(2026, 10, 10 + i) or ms(2026, 11, 10 + i) }))
    end
  end

  it("puts entries of two months into two partitions; the chain verifies",
     function()
    two_months()
    assert.equal("partitioned", audit.layout(db))
    assert.same({ paygate_audit_202610 = 3, paygate_audit_202611 = 2 },
                parts(db))
    assert.is_true(exists(db, "paygate_audit_202612"))   -- made ahead
    local ok, rep = audit.verify(db, "payment:X")
    assert.is_true(ok, rep and rep.message)
    assert.equal(5, rep.entries)
    local all_ok, sum = audit.verify_all(db)
    assert.is_true(all_ok)
    assert.equal(5, sum.entries)
    -- the primary key holds the partition key, as PostgreSQL requires
    local pk = assert(db:query("SELECT pg_get_constraintdef(oid) AS d FROM"
      .. " pg_constraint WHERE conrelid = 'paygate_audit'::regclass AND"
      .. " contype = 'p'"))[1].d
    assert.equal("PRIMARY KEY (subject, seq, at)", pk)
  end)

  it("finds a row edited in an old partition", function()
    two_months()
    assert(db:exec("UPDATE paygate_audit_202610 SET cause = 'forged' WHERE"
                   .. " subject = 'payment:X' AND seq = 2"))
    local ok, rep = audit.verify(db, "payment:X")
    assert.is_false(ok)
    assert.equal("edited", rep.reason)
    assert.equal(2, rep.seq)
  end)

  it("finds a row deleted from an old partition", function()
    two_months()
    assert(db:exec("DELETE FROM paygate_audit_202610 WHERE seq = 3"))
    local ok, rep = audit.verify(db, "payment:X")
    assert.is_false(ok)
    assert.equal("missing", rep.reason)
    assert.equal(3, rep.seq)
  end)

  it("finds a second row with a seq, put into another month's partition"
     .. " (the key cannot refuse it there)", function()
    two_months()
    local e = assert(audit.entries(db, "payment:X"))
    local forged = { subject = "payment:X", seq = 2, what = "step",
                     to = "refunded", at = ms(2026, 11, 20),
                     prev_hash = e[1].hash }
    forged.hash = audit.hash(forged)
    assert(db:exec("INSERT INTO paygate_audit (subject, seq, what, to_state,"
      .. " at, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7)",
      { forged.subject, 2, forged.what, forged.to, forged.at,
        forged.prev_hash, forged.hash }))
    local ok, rep = audit.verify(db, "payment:X")
    assert.is_false(ok)
    assert.equal("bad_seq", rep.reason)
  end)

  -- 1,000 entries (verify's and verify_all's page) of payment:B in
  -- October 2026, and a second seq 1,000 in `month`, hash and link right:
  -- the pages must not end between the two
  for _, month in ipairs({ 11, 9 }) do
    it("finds a second row with the last seq of a page, put into month "
       .. month, function()
      -- (the partitions of September to November)
      assert(audit.append(db, "payment:P", { what = "a", at = ms(2026, 9, 1) }))
      assert(audit.append(db, "payment:P", { what = "b",
                                             at = ms(2026, 10, 1) }))
      local prev, at0 = audit.GENESIS, ms(2026, 10, 10)
      local head
      assert(db:transaction(function(tx)
        for seq = 1, 1000 do
          local e = { subject = "payment:B", seq = seq, what = "step",
                      at = at0 + seq, prev_hash = prev }
          e.hash = audit.hash(e)
          assert(tx:exec("INSERT INTO paygate_audit (subject, seq, what, at,"
            .. " prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6)",
            { e.subject, e.seq, e.what, e.at, e.prev_hash, e.hash }))
          if seq == 999 then head = e.hash end
          prev = e.hash
        end
        assert(tx:exec("INSERT INTO paygate_audit_heads (subject, seq, hash)"
          .. " VALUES ('payment:B', 1000, $1)", { prev }))
      end))
      assert.is_true((audit.verify(db, "payment:B")))
      assert.is_true((audit.verify_all(db)))
      local forged = { subject = "payment:B", seq = 1000, what = "refund",
                       at = ms(2026, month, 20), prev_hash = head }
      forged.hash = audit.hash(forged)
      assert(db:exec("INSERT INTO paygate_audit (subject, seq, what, at,"
        .. " prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6)",
        { forged.subject, forged.seq, forged.what, forged.at,
          forged.prev_hash, forged.hash }))
      local ok, rep = audit.verify(db, "payment:B")
      assert.is_false(ok)
      assert.equal(1000, rep.seq)
      local all_ok, sum = audit.verify_all(db)
      assert.is_false(all_ok)
      assert.equal(1, #sum.broken)
      assert.equal(1000, sum.broken[1].seq)
    end)
  end

  it("concurrent appends into a month without a partition create it once"
     .. " and never share a seq", function()
    local other = assert(sql.open(pg_srv.url, { pool = 8 }))
    local at = ms(2031, 5, 15)
    assert.is_false(exists(db, "paygate_audit_203105"))
    local tasks = {}
    for i = 1, 20 do
      local h = i % 2 == 0 and db or other
      tasks[i] = paygate.spawn(function()
        return audit.append(h, "payment:C", { what = "step " .. i,
                                              at = at + i })
      end)
    end
    local seqs = {}
    for i = 1, 20 do
      local e, err = tasks[i]:wait()
      assert(e, tostring(err))
      assert.is_nil(seqs[e.seq])
      seqs[e.seq] = true
    end
    for s = 1, 20 do
      assert.is_true(seqs[s])
    end
    assert.equal(20, parts(db).paygate_audit_203105)
    assert.is_true(exists(db, "paygate_audit_203106"))
    assert.is_true((audit.verify(db, "payment:C")))
    other:close()
  end)

  it("audit.prepare makes the months of planned entries before db:atomic",
     function()
    assert(audit.ensure_schema(db))
    local at = ms(2032, 3, 15)
    assert.is_false(exists(db, "paygate_audit_203203"))
    local head = false
    for i = 1, 3 do
      local e, stmts = audit.plan("payment:A", { what = "step " .. i,
                                                 at = at + i }, head)
      assert(audit.prepare(db, stmts))
      assert(db:atomic(stmts))
      head = { seq = e.seq, hash = e.hash }
    end
    assert.equal(3, parts(db).paygate_audit_203203)
    assert.is_true(exists(db, "paygate_audit_203204"))   -- made ahead
    assert.is_true((audit.verify(db, "payment:A")))
    -- a handle that knows the month (prepared, or an append saw it)
    -- needs no query: the next month's entries find theirs made ahead
    local e, stmts = audit.plan("payment:A", { what = "step 4",
                                               at = ms(2032, 4, 15) }, head)
    assert(audit.prepare(db, stmts))
    assert(db:atomic(stmts))
    assert.equal(1, parts(db).paygate_audit_203204)
    assert.equal(4, e.seq)
  end)

  it("create_partitions makes this month and the next ones", function()
    -- (the month taken before and after: a run across a month's end
    -- made either)
    local t0 = os.date("!*t")
    local names = assert(audit.create_partitions(db, { ahead = 3 }))
    assert.equal(4, #names)
    local t = os.date("!*t")
    assert.is_truthy(names[1] == string.format("paygate_audit_%04d%02d",
                                               t0.year, t0.month)
                     or names[1] == string.format("paygate_audit_%04d%02d",
                                                  t.year, t.month), names[1])
    for _, name in ipairs(names) do
      assert.is_true(exists(db, name))
    end
  end)

  it("leaves an unpartitioned table of an older version working", function()
    assert(db:exec_script([[CREATE TABLE paygate_audit (
      subject TEXT COLLATE "C" NOT NULL, seq BIGINT NOT NULL,
      what TEXT NOT NULL, ref TEXT, from_state TEXT, to_state TEXT,
      cause TEXT, actor TEXT, at BIGINT NOT NULL, evidence TEXT,
      prev_hash TEXT NOT NULL, hash TEXT NOT NULL,
      PRIMARY KEY (subject, seq));
      CREATE TABLE paygate_audit_heads (
      subject TEXT COLLATE "C" PRIMARY KEY, seq BIGINT NOT NULL,
      hash TEXT NOT NULL)]]))
    two_months()
    assert.equal("plain", audit.layout(db))
    assert.same({ paygate_audit = 5 }, parts(db))
    assert.is_true((audit.verify(db, "payment:X")))
    assert.same({}, assert(audit.create_partitions(db)))
    -- the migration: the old table becomes the partition of the past
    -- (its month taken before it, as the migration takes it)
    local t = os.date("!*t")
    assert.equal("migrated", assert(audit.partition_legacy(db)))
    assert.equal("partitioned", audit.layout(db))
    assert.same({ paygate_audit_legacy = 5 }, parts(db))
    assert.is_true((audit.verify(db, "payment:X")))
    -- the chain goes on into a month after the migration
    local ny, nm = t.year, t.month + 1
    if nm == 13 then ny, nm = ny + 1, 1 end
    assert(audit.append(db, "payment:X", { what = "step",
                                           at = ms(ny, nm, 15) }))
    local p = parts(db)
    assert.equal(5, p.paygate_audit_legacy)
    assert.equal(1, p[string.format("paygate_audit_%04d%02d", ny, nm)])
    assert.is_true((audit.verify(db, "payment:X")))
    -- this month's entries still go to the old table (its range ends at
    -- the start of next month)
    assert(audit.append(db, "payment:Y", { what = "now" }))
    if os.date("!*t").month == t.month then
      assert.equal(6, parts(db).paygate_audit_legacy)
    else      -- (the month ended meanwhile: in the one or the other)
      local q = parts(db)
      assert.equal(7, q.paygate_audit_legacy
                      + (q[string.format("paygate_audit_%04d%02d", ny, nm)]
                         or 0))
    end
    assert.equal("partitioned", assert(audit.partition_legacy(db)))
  end)
end)
