-- paygate.audit on SQLite and PostgreSQL: per-subject hash chains, what
-- verify finds (an edited, deleted, inserted or renumbered row, a head
-- edited or deleted), concurrent appenders, and the verify script's exit
-- codes.
local sql = require "paygate.sql"
local audit = require "paygate.audit"
local paygate = require "paygate"
local servers = require "spec.support.servers"
local proc = require "support.proc"

local tmp = servers.mktemp()
local pg_srv
local n = 0

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

-- Each engine: a fresh database per test, and its URL (for a second
-- handle and for the verify script).
local stores = {
  sqlite = function()
    n = n + 1
    local url = "sqlite:" .. tmp .. "/a" .. n .. ".db"
    return assert(sql.open(url)), url
  end,
}
if servers.have_postgres() then
  stores.postgres = function()
    pg_srv = pg_srv or servers.postgres()
    local db = assert(sql.open(pg_srv.url, { pool = 8 }))
    assert(db:exec_script("DROP TABLE IF EXISTS paygate_audit,"
      .. " paygate_audit_heads"))
    return db, pg_srv.url
  end
end

-- paygate exec of the verify script: exit code and output.
local function run_verify(args)
  local log = tmp .. "/verify" .. n .. ".out"
  os.remove(log)
  local argv = { PAYGATE_BIN, "exec", "lua/paygate/cli/audit.lua" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local p = proc.spawn(argv, { log = log })
  local code = p:wait(30)
  if code == nil then
    p:kill(proc.SIGKILL)
    p:wait(2)
  end
  return code, proc.read(log)
end

describe("audit.append", function()
  it("raises for misuse", function()
    assert.has_error(function() audit.append({}, "s", { what = "x" }) end,
                     "audit.append: q must be a paygate.sql db or tx")
    local db = assert(sql.open("sqlite:" .. tmp .. "/misuse.db"))
    assert.has_error(function() audit.append(db, "", { what = "x" }) end,
                     "audit.append: subject must be a non-empty string")
    assert.has_error(function() audit.append(db, "s", {}) end,
                     "audit.append: e.what must be a non-empty string")
    assert.has_error(function()
      audit.append(db, "s", { what = "x", at = 1.5 })
    end, "audit.append: e.at must be an integer of epoch ms (up to the year"
      .. " 9999)")
    assert.has_error(function()     -- a month no partition can be named for
      audit.append(db, "s", { what = "x", at = 253402300800000 })
    end, "audit.append: e.at must be an integer of epoch ms (up to the year"
      .. " 9999)")
    assert.has_error(function()
      audit.append(db, "s", { what = "x", evidence = { [true] = 1 } })
    end)
    db:close()
  end)

  it("serializes every field unambiguously", function()
    local base = { subject = "s", seq = 1, what = "w", at = 5,
                   prev_hash = audit.GENESIS }
    local a = audit.hash(base)
    local variants = {
      { cause = "" }, { cause = "x" }, { actor = "x" }, { from = "x" },
      { to = "x" }, { ref = "x" }, { evidence = "{}" }, { seq = 2 },
      { at = 6 }, { what = "w2" }, { subject = "s2" },
      { prev_hash = string.rep("1", 64) },
    }
    local seen = { [a] = true }
    for _, v in ipairs(variants) do
      local e = {}
      for k, x in pairs(base) do e[k] = x end
      for k, x in pairs(v) do e[k] = x end
      local h = audit.hash(e)
      assert.is_nil(seen[h])
      seen[h] = true
    end
    -- a field's bytes cannot move into its neighbour
    local e1 = { subject = "s", seq = 1, what = "w", cause = "ab",
                 actor = "c", at = 1, prev_hash = audit.GENESIS }
    local e2 = { subject = "s", seq = 1, what = "w", cause = "a",
                 actor = "bc", at = 1, prev_hash = audit.GENESIS }
    assert.are_not.equal(audit.hash(e1), audit.hash(e2))
    assert.equal('{"e":[],"o":{}}', audit.canonical_json({
      o = {}, e = require("paygate.json").empty_array }))
    assert.equal('{"a":[1,2,{"x":null,"y":"\\u0000"}],"b":true}',
                 audit.canonical_json({ b = true, a = { 1, 2,
                   { y = "\0", x = require("paygate.json").null } } }))
  end)

  it("writes evidence's edge values as docs/fsm.md says", function()
    -- keys by byte, nested empties, -0 kept apart from 0
    assert.equal('{"A":{},"a":[{}],"b":0,"b\\u0000":-0}',
                 audit.canonical_json({ a = { {} }, A = {}, b = 0,
                                        ["b\0"] = -0 }))
    -- bytes that are not UTF-8 become U+FFFD: such evidences store alike
    assert.equal(audit.canonical_json({ x = "\255" }),
                 audit.canonical_json({ x = "\254" }))
    assert.equal('{"x":"\\ufffd"}', audit.canonical_json({ x = "\255" }))
    for _, bad in ipairs({ 0 / 0, math.huge, 1LL }) do
      assert.has_error(function() audit.canonical_json({ v = bad }) end)
    end
    -- a string is stored as given: neither checked as JSON nor sorted
    local e, stmts = audit.plan("s", { what = "w", evidence = '{"b":1,"a":' },
                                false)
    assert.equal('{"b":1,"a":', e.evidence)
    assert.equal('{"b":1,"a":', stmts[2][2][10])
  end)

  -- Chains written by earlier releases must keep verifying, and a new
  -- entry must hash as before: these are the bytes of a notification's
  -- entry (gw.notify_atomic's evidence and then some: escapes, UTF-8, a
  -- fraction, 2^53, a small number, an array of every kind of value).
  it("keeps an entry's canonical bytes and hash as written before", function()
    local json = require "paygate.json"
    local evidence = {
      notification_id = "EV-2026-11-29-0001", source = "notification",
      out_trade_no = "pay_b0000000000000001_1",
      transaction_id = "4200000000000000000000000001",
      trade_state = "SUCCESS", attempt_state = "open",
      success_time = "2026-11-29T10:34:56+08:00",
      note = "caf\195\169 \"q\" \\ /\n\t\1\127", amount = 100.25,
      ms = 1795919696.123, neg = -3, big = 2^53, small = 1e-7,
      list = { 1, "two", false, json.null, json.empty_array, {} } }
    local text = '{"amount":100.25,"attempt_state":"open",'
      .. '"big":9007199254740992,"list":[1,"two",false,null,[],{}],'
      .. '"ms":1795919696.123,"neg":-3,'
      .. '"note":"caf\195\169 \\"q\\" \\\\ /\\n\\t\\u0001\\u007f",'
      .. '"notification_id":"EV-2026-11-29-0001",'
      .. '"out_trade_no":"pay_b0000000000000001_1","small":1e-07,'
      .. '"source":"notification",'
      .. '"success_time":"2026-11-29T10:34:56+08:00",'
      .. '"trade_state":"SUCCESS",'
      .. '"transaction_id":"4200000000000000000000000001"}'
    assert.equal(text, audit.canonical_json(evidence))
    local entry, stmts = audit.plan("payment:pay_b0000000000000001", {
      what = "transition", from = "paying", to = "succeeded",
      cause = "paid", actor = "wechatpay", at = 1795919696123,
      evidence = evidence }, { seq = 2, hash = string.rep("ab", 32) })
    assert.equal(text, stmts[2][2][10])
    assert.equal(table.concat({ "paygate.audit.v1",
      "s29:payment:pay_b0000000000000001", "i3", "s10:transition", "n",
      "s6:paying", "s9:succeeded", "s4:paid", "s9:wechatpay",
      "i1795919696123", "s" .. #text .. ":" .. text,
      "s64:" .. string.rep("ab", 32) }, "\n"), audit.canonical(entry))
    assert.equal(401, #text)
    assert.equal("dfba80aad93b72dbaee0595e65c1ca7bb97cb5200f2829cea13750239a8c"
                 .. "87f2", entry.hash)
    -- and what it refuses, with the same words
    for _, case in ipairs({ { 0 / 0, "NaN or infinite number" },
      { -math.huge, "NaN or infinite number" }, { 1LL, "cannot encode a cdata" },
      { print, "cannot encode a function" } }) do
      assert.has_error(function() audit.canonical_json({ v = case[1] }) end,
                       "paygate.json.encode: " .. case[2] .. " at value")
      assert.has_error(function() audit.canonical_json(case[1]) end,
                       "paygate.json.encode: " .. case[2] .. " at value")
    end
    assert.has_error(function() audit.canonical_json({ [true] = 1 }) end,
                     "audit: evidence keys must be strings (or 1..n)")
  end)
end)

for engine, new_db in pairs(stores) do
  describe("paygate.audit on " .. engine, function()
    local db, url

    before_each(function() db, url = new_db() end)
    after_each(function() db:close() end)

    -- a chain of `len` entries for subject
    local function chain(subject, len)
      for i = 1, len do
        assert(audit.append(db, subject, { what = "step", from = "s" .. i - 1,
          to = "s" .. i, cause = "c" .. i, actor = "a",
          evidence = { i = i, note = "n" } }))
      end
    end

    local function verify(subject)
      local ok, rep = audit.verify(db, subject)
      assert.is_not_nil(ok, tostring(rep))
      return ok, rep
    end

    it("appends a chain that verifies: seq, genesis, links, time in ms",
       function()
      local before = math.floor(require("paygate.core").time() * 1000)
      chain("payment:P1", 3)
      local e = assert(audit.entries(db, "payment:P1"))
      assert.equal(3, #e)
      assert.equal(audit.GENESIS, e[1].prev_hash)
      for i = 1, 3 do
        assert.equal(i, e[i].seq)
        assert.equal(audit.hash(e[i]), e[i].hash)
        assert.truthy(e[i].at >= before and e[i].at % 1 == 0)
        assert.equal('{"i":' .. i .. ',"note":"n"}', e[i].evidence)
        if i > 1 then assert.equal(e[i - 1].hash, e[i].prev_hash) end
      end
      assert.same({ seq = 3, hash = e[3].hash },
                  assert(audit.head(db, "payment:P1")))
      local ok, rep = verify("payment:P1")
      assert.is_true(ok)
      assert.equal(3, rep.entries)
      assert.is_false(audit.head(db, "payment:none"))
      assert.is_true((verify("payment:none")))
    end)

    it("commits or rolls back with the caller's transaction", function()
      assert(audit.ensure_schema(db))
      local res, err = db:transaction(function(tx)
        assert(audit.append(tx, "payment:T", { what = "a" }))
        return nil, paygate.error("undo", "roll back")
      end)
      assert.is_nil(res)
      assert.equal("undo", err.kind)
      assert.same({}, assert(audit.entries(db, "payment:T")))
      assert(db:transaction(function(tx)
        assert(audit.append(tx, "payment:T", { what = "a" }))
        assert(audit.append(tx, "payment:T", { what = "b" }))
        return true
      end))
      assert.equal(2, #assert(audit.entries(db, "payment:T")))
      assert.is_true((verify("payment:T")))
    end)

    -- verify and verify_all read 1,000 entries a page: without a cap on
    -- evidence, one page could hold any amount of it (was: any size
    -- written as given)
    it("refuses evidence over audit.MAX_EVIDENCE bytes: too_large,"
       .. " nothing written", function()
      local max = audit.MAX_EVIDENCE
      assert.equal(65536, max)
      -- a table: its canonical JSON is what counts
      local pad = string.rep("x", max - #'{"v":""}')
      local e = assert(audit.append(db, "payment:B", { what = "at_cap",
                                                       evidence = { v = pad } }))
      assert.equal(max, #e.evidence)
      local e2, err = audit.append(db, "payment:B", { what = "over",
        evidence = { v = pad .. "y" } })
      assert.is_nil(e2)
      assert.equal("too_large", err.kind)
      assert.is_false(err.retryable)
      assert.same({ max + 1, max }, { err.size, err.limit })
      assert.matches("audit.append: e.evidence is " .. (max + 1)
                     .. " bytes of JSON, over the " .. max, err.message,
                     1, true)
      -- a string, stored as given, is held to it as well
      e2, err = audit.append(db, "payment:B", { what = "over",
        evidence = '"' .. string.rep("z", max) .. '"' })
      assert.is_nil(e2)
      assert.equal("too_large", err.kind)
      -- in the caller's transaction: the transaction fails with it
      local res
      res, err = db:transaction(function(tx)
        assert(audit.append(tx, "payment:B", { what = "inside" }))
        return audit.append(tx, "payment:B", { what = "over",
          evidence = { v = pad .. "y" } })
      end)
      assert.is_nil(res)
      assert.equal("too_large", err.kind)
      -- plan: no statements
      local stmts
      e2, stmts = audit.plan("payment:B", { what = "over",
        evidence = { v = pad .. "y" } }, assert(audit.head(db, "payment:B")))
      assert.is_nil(e2)
      assert.equal("too_large", stmts.kind)
      assert.matches("^audit.plan: ", stmts.message)
      local all = assert(audit.entries(db, "payment:B"))
      assert.equal(1, #all)
      assert.equal("at_cap", all[1].what)
      assert.is_true((verify("payment:B")))
    end)

    it("reads through the caller's transaction (one pool connection)",
       function()
      chain("payment:X", 2)
      -- a fresh handle: nothing cached about the tables
      local one = assert(sql.open(url, { pool = 1 }))
      local done
      local task = paygate.spawn(function()
        done = { one:transaction(function(tx)
          local ok = assert(audit.verify(tx, "payment:X"))
          local e = assert(audit.entries(tx, "payment:X"))
          local h = assert(audit.head(tx, "payment:X"))
          return ok, #e, h.seq
        end) }
      end)
      local finished = pcall(servers.wait_for, function()
        return done ~= nil
      end, 5, "the transaction")
      if not finished then task:cancel() end
      one:close()
      assert.is_true(finished)
      assert.same({ true, 2, 2 }, done)
    end)

    it("finds an edited row", function()
      chain("payment:E", 4)
      assert(db:exec("UPDATE paygate_audit SET cause = 'other' WHERE"
        .. " subject = 'payment:E' AND seq = 3"))
      local ok, rep = verify("payment:E")
      assert.is_false(ok)
      assert.same({ "payment:E", 3, "edited" },
                  { rep.subject, rep.seq, rep.reason })
    end)

    it("finds an integer field edited to a fraction", function()
      chain("payment:F", 3)
      -- SQLite keeps a REAL in an INTEGER column: at + 0.5 must not hash
      -- as the integer it truncates to (PostgreSQL rounds it into bigint)
      assert(db:exec("UPDATE paygate_audit SET at = at + 0.5 WHERE"
        .. " subject = 'payment:F' AND seq = 2"))
      local ok, rep = verify("payment:F")
      assert.is_false(ok)
      assert.same({ "payment:F", 2, "edited" },
                  { rep.subject, rep.seq, rep.reason })
      local all_ok, summary = audit.verify_all(db)
      assert.is_false(all_ok)
      assert.same({ "payment:F", 2, "edited" }, { summary.broken[1].subject,
        summary.broken[1].seq, summary.broken[1].reason })
    end)

    it("finds an edited row whose hash was recomputed", function()
      chain("payment:E2", 4)
      local e = assert(audit.entries(db, "payment:E2"))[2]
      e.to = "refunded"
      assert(db:exec("UPDATE paygate_audit SET to_state = $1, hash = $2"
        .. " WHERE subject = 'payment:E2' AND seq = 2",
        { e.to, audit.hash(e) }))
      local ok, rep = verify("payment:E2")
      assert.is_false(ok)
      assert.same({ 3, "broken_link" }, { rep.seq, rep.reason })
    end)

    it("finds a deleted row, in the middle and at the end", function()
      chain("payment:D", 5)
      assert(db:exec("DELETE FROM paygate_audit WHERE subject = 'payment:D'"
        .. " AND seq = 2"))
      local ok, rep = verify("payment:D")
      assert.is_false(ok)
      assert.same({ 2, "missing" }, { rep.seq, rep.reason })

      chain("payment:D2", 3)
      assert(db:exec("DELETE FROM paygate_audit WHERE subject = 'payment:D2'"
        .. " AND seq = 3"))
      ok, rep = verify("payment:D2")
      assert.is_false(ok)
      assert.same({ 3, "missing" }, { rep.seq, rep.reason })

      chain("payment:D3", 2)
      assert(db:exec("DELETE FROM paygate_audit WHERE subject = 'payment:D3'"))
      ok, rep = verify("payment:D3")
      assert.is_false(ok)
      assert.same({ 1, "missing" }, { rep.seq, rep.reason })
    end)

    it("finds an inserted row, at the end and in the middle", function()
      chain("payment:I", 3)
      -- a well-formed fourth entry, hash and link right, but no head move
      local last = assert(audit.entries(db, "payment:I"))[3]
      local forged = { subject = "payment:I", seq = 4, what = "step",
                       from = "s3", to = "paid", at = last.at,
                       prev_hash = last.hash }
      forged.hash = audit.hash(forged)
      assert(db:exec("INSERT INTO paygate_audit (subject, seq, what,"
        .. " from_state, to_state, at, prev_hash, hash) VALUES ($1, $2, $3,"
        .. " $4, $5, $6, $7, $8)", { forged.subject, forged.seq, forged.what,
        forged.from, forged.to, forged.at, forged.prev_hash, forged.hash }))
      local ok, rep = verify("payment:I")
      assert.is_false(ok)
      assert.same({ 4, "bad_seq" }, { rep.seq, rep.reason })

      -- in the middle: later rows renumbered to make room
      chain("payment:M", 3)
      assert(db:exec("UPDATE paygate_audit SET seq = seq + 100 WHERE"
        .. " subject = 'payment:M' AND seq >= 2"))
      assert(db:exec("UPDATE paygate_audit SET seq = seq - 99 WHERE"
        .. " subject = 'payment:M' AND seq >= 100"))
      local first = assert(audit.entries(db, "payment:M"))[1]
      local ins = { subject = "payment:M", seq = 2, what = "step",
                    at = first.at, prev_hash = first.hash }
      ins.hash = audit.hash(ins)
      assert(db:exec("INSERT INTO paygate_audit (subject, seq, what, at,"
        .. " prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6)",
        { ins.subject, ins.seq, ins.what, ins.at, ins.prev_hash, ins.hash }))
      ok, rep = verify("payment:M")
      assert.is_false(ok)
      assert.same({ 3, "broken_link" }, { rep.seq, rep.reason })

      -- before the first: seq 0
      chain("payment:Z", 2)
      assert(db:exec("INSERT INTO paygate_audit (subject, seq, what, at,"
        .. " prev_hash, hash) VALUES ('payment:Z', 0, 'step', $1, $2, $2)",
        { first.at, audit.GENESIS }))
      ok, rep = verify("payment:Z")
      assert.is_false(ok)
      assert.same({ 0, "bad_seq" }, { rep.seq, rep.reason })
    end)

    it("finds a reordered seq", function()
      chain("payment:R", 4)
      assert(db:exec("UPDATE paygate_audit SET seq = -2 WHERE subject ="
        .. " 'payment:R' AND seq = 2"))
      assert(db:exec("UPDATE paygate_audit SET seq = 2 WHERE subject ="
        .. " 'payment:R' AND seq = 3"))
      assert(db:exec("UPDATE paygate_audit SET seq = 3 WHERE subject ="
        .. " 'payment:R' AND seq = -2"))
      local ok, rep = verify("payment:R")
      assert.is_false(ok)
      assert.same({ 2, "broken_link" }, { rep.seq, rep.reason })
    end)

    it("finds a head edited or deleted", function()
      chain("payment:H", 2)
      assert(db:exec("UPDATE paygate_audit_heads SET hash = $1 WHERE"
        .. " subject = 'payment:H'", { string.rep("a", 64) }))
      local ok, rep = verify("payment:H")
      assert.is_false(ok)
      assert.same({ 2, "head_mismatch" }, { rep.seq, rep.reason })
      chain("payment:H2", 2)
      assert(db:exec("DELETE FROM paygate_audit_heads WHERE"
        .. " subject = 'payment:H2'"))
      ok, rep = verify("payment:H2")
      assert.is_false(ok)
      assert.equal("head_missing", rep.reason)
      if engine == "sqlite" then
        -- a seq that is no number (SQLite keeps text in an INTEGER
        -- column): reported, not raised
        chain("payment:H3", 2)
        assert(db:exec("UPDATE paygate_audit_heads SET seq = 'x' WHERE"
          .. " subject = 'payment:H3'"))
        ok, rep = verify("payment:H3")
        assert.is_false(ok)
        assert.same({ 2, "head_mismatch" }, { rep.seq, rep.reason })
        -- a fraction: the head edited, not a row missing or inserted
        -- (it read "seq 3..2.5 missing" and "seq 2.5..2 beyond the head")
        for i, bad in ipairs({ 2.5, 1.5 }) do
          chain("payment:H4" .. i, 2)
          assert(db:exec("UPDATE paygate_audit_heads SET seq = $1 WHERE"
            .. " subject = $2", { bad, "payment:H4" .. i }))
          ok, rep = verify("payment:H4" .. i)
          assert.is_false(ok)
          assert.same({ 2, "head_mismatch" }, { rep.seq, rep.reason })
          assert.matches("is no integer", rep.message, 1, true)
        end
        local all_ok, sum = audit.verify_all(db)
        assert.is_false(all_ok)
        assert.equal(5, #sum.broken)
      end
    end)

    it("verify_all reports each broken chain by subject and seq, across"
       .. " pages", function()
      -- 2,600 entries: the 1,000-row pages end inside chains
      assert(audit.ensure_schema(db))
      assert(db:transaction(function(tx)
        for s = 1, 130 do
          for i = 1, 20 do
            assert(audit.append(tx, ("payment:%04d"):format(s),
                                { what = "step " .. i }))
          end
        end
        return true
      end))
      local ok, sum = audit.verify_all(db)
      assert.is_true(ok)
      assert.same({ 130, 2600, 0 },
                  { sum.subjects, sum.entries, #sum.broken })
      assert(db:exec("UPDATE paygate_audit SET what = 'x' WHERE subject ="
        .. " 'payment:0050' AND seq = 7"))
      assert(db:exec("DELETE FROM paygate_audit WHERE subject ="
        .. " 'payment:0051' AND seq = 20"))
      assert(db:exec("DELETE FROM paygate_audit_heads WHERE subject ="
        .. " 'payment:0099'"))
      assert(db:exec("DELETE FROM paygate_audit WHERE subject ="
        .. " 'payment:0130'"))
      local seen = {}
      ok, sum = audit.verify_all(db, { on_broken = function(b)
        seen[#seen + 1] = b.subject
      end })
      assert.is_false(ok)
      local got = {}
      for _, b in ipairs(sum.broken) do
        got[#got + 1] = { b.subject, b.seq, b.reason }
      end
      assert.same({ { "payment:0050", 7, "edited" },
                    { "payment:0051", 20, "missing" },
                    { "payment:0099", 20, "head_missing" },
                    { "payment:0130", 1, "missing" } }, got)
      assert.same({ "payment:0050", "payment:0051", "payment:0099",
                    "payment:0130" }, seen)
      assert.equal(130, sum.subjects)
    end)

    it("verify_all reports a renamed chain (its head or its entries moved"
       .. " to another subject) once, under the chain's own name",
       function()
      assert(audit.ensure_schema(db))
      for _, s in ipairs({ "payment:R1", "payment:R2", "payment:R3" }) do
        for i = 1, 3 do
          assert(audit.append(db, s, { what = "step " .. i }))
        end
      end
      local function broken()
        local seen = {}
        local ok, sum = audit.verify_all(db, { on_broken = function(b)
          seen[#seen + 1] = b.subject
        end })
        assert.is_false(ok)
        local got = {}
        for _, b in ipairs(sum.broken) do
          got[#got + 1] = { b.subject, b.seq, b.reason, b.renamed,
                            b.message, b.entries }
        end
        return got, seen, sum
      end
      -- the head moved (R1's to R9, after R3 in subject order)
      assert(db:exec("UPDATE paygate_audit_heads SET subject = 'payment:R9'"
        .. " WHERE subject = 'payment:R1'"))
      local got, seen, sum = broken()
      assert.same({ { "payment:R1", 3, "renamed", "payment:R9", "its head"
        .. " row is under the subject payment:R9 (renamed)", 3 } }, got)
      assert.same({ "payment:R1" }, seen)
      assert.same({ 3, 9 }, { sum.subjects, sum.entries })
      -- the entries moved instead (R2's to R0, before R1)
      assert(db:exec("UPDATE paygate_audit_heads SET subject = 'payment:R1'"
        .. " WHERE subject = 'payment:R9'"))
      assert(db:exec("UPDATE paygate_audit SET subject = 'payment:R0'"
        .. " WHERE subject = 'payment:R2'"))
      got, seen, sum = broken()
      assert.same({ { "payment:R2", 1, "renamed", "payment:R0", "its"
        .. " entries are under the subject payment:R0 (renamed)", 3 } }, got)
      assert.same({ "payment:R2" }, seen)
      assert.same({ 3, 9 }, { sum.subjects, sum.entries })
      -- moved and edited too: no longer one chain, both names reported
      assert(db:exec("UPDATE paygate_audit SET what = 'x' WHERE subject ="
        .. " 'payment:R0' AND seq = 2"))
      got = broken()
      assert.same({ { "payment:R0", 1, "edited" },
                    { "payment:R2", 1, "missing" } },
                  { { got[1][1], got[1][2], got[1][3] },
                    { got[2][1], got[2][2], got[2][3] } })
    end)

    it("never forks a chain under concurrent appenders", function()
      assert(audit.ensure_schema(db))
      local db2 = assert(sql.open(url))     -- a second handle (pool, writer)
      local tasks = {}
      for i = 1, 40 do
        local h = i % 2 == 0 and db or db2
        tasks[i] = paygate.spawn(function()
          return audit.append(h, "payment:C", { what = "w" .. i })
        end)
      end
      local seqs = {}
      for i = 1, 40 do
        local e, err = tasks[i]:wait()
        assert.is_nil(err)
        assert.is_nil(seqs[e.seq])
        seqs[e.seq] = true
      end
      db2:close()
      local e = assert(audit.entries(db, "payment:C"))
      assert.equal(40, #e)
      local ok, rep = verify("payment:C")
      assert.is_true(ok, rep.message)
      assert.equal(40, rep.entries)
    end)

    it("verify and verify_all hold while appends commit between their"
       .. " reads of the entries and of the heads", function()
      chain("payment:L", 3)
      chain("payment:M", 2)
      -- appends commit right after a read of entries (the next list of
      -- subjects of `plan` each time): the head read next is past it
      local query, plan = sql.DB.query, {}
      sql.DB.query = function(self, text, params)
        local rows, err = query(self, text, params)
        if #plan > 0 and text:find("FROM paygate_audit[^_]") then
          for _, s in ipairs(table.remove(plan, 1)) do
            assert(audit.append(db, s, { what = "late" }))
          end
        end
        return rows, err
      end
      local ok, res, sum
      local done, perr = pcall(function()
        plan = { { "payment:L" }, { "payment:L" } }
        ok, res = audit.verify(db, "payment:L")
        assert.is_true(ok, res and res.message)
        assert.equal(5, res.entries)
        -- after the first page: a chain moves on, a new one begins
        plan = { { "payment:M", "payment:N" } }
        ok, sum = audit.verify_all(db)
      end)
      sql.DB.query = query
      assert(done, perr)
      assert.same({}, plan)
      assert.same({}, sum.broken)
      assert.is_true(ok)
      assert.same({ 3, 9 }, { sum.subjects, sum.entries })
      ok, sum = audit.verify_all(db)
      assert.is_true(ok)
      assert.same({ 3, 9 }, { sum.subjects, sum.entries })
    end)

    it("paygate exec of the verify script exits 0, 1 or 2", function()
      chain("payment:V1", 3)
      chain("payment:V2", 3)
      local code, out = run_verify({ "verify", url })
      assert.equal(0, code, out)
      assert.matches("2 chains, 6 entries, 0 broken", out)
      assert(db:exec("UPDATE paygate_audit SET actor = 'mallory' WHERE"
        .. " subject = 'payment:V2' AND seq = 2"))
      code, out = run_verify({ "verify", url })
      assert.equal(1, code, out)
      assert.matches("broken payment:V2 seq 2 edited: ", out, 1, true)
      assert.matches("2 chains, 6 entries, 1 broken", out)
      code, out = run_verify({ "verify", url, "--subject", "payment:V1" })
      assert.equal(0, code, out)
      code, out = run_verify({ "verify", url, "--json" })
      assert.equal(1, code, out)
      assert.matches('"subject":"payment:V2"', out, 1, true)
      code, out = run_verify({ "verify" })
      assert.equal(2, code, out)
      code, out = run_verify({ "verify", "sqlite:" .. tmp .. "/absent.db" })
      assert.equal(2, code, out)
      assert.matches("no database file", out)
      local f = io.open(tmp .. "/absent.db")
      assert.is_nil(f)
    end)

    it("paygate audit verify --subject on a store with no audit trail "
       .. "exits 2, as without --subject", function()
      -- the wrong database (no paygate_audit table) was "0 chains, 0
      -- entries, 0 broken", exit 0, when a subject was named
      assert(db:exec("CREATE TABLE IF NOT EXISTS other (a INTEGER)"))
      local code, out = run_verify({ "verify", url })
      assert.equal(2, code, out)
      assert.matches("no audit trail in", out, 1, true)
      code, out = run_verify({ "verify", url, "--subject", "payment:V1" })
      assert.equal(2, code, out)
      assert.matches("no audit trail in", out, 1, true)
      code, out = run_verify({ "verify", url, "--subject", "payment:V1",
                               "--json" })
      assert.equal(2, code, out)
      -- with the trail there, a subject without a chain (a typo) is
      -- said, exit 1 (it was "0 chains", exit 0: a check that passed)
      chain("payment:V2", 1)
      code, out = run_verify({ "verify", url, "--subject", "payment:V1" })
      assert.equal(1, code, out)
      assert.matches("0 chains, 0 entries, 0 broken", out, 1, true)
      assert.matches("no chain for subject payment:V1", out, 1, true)
      code, out = run_verify({ "verify", url, "--subject", "payment:V2" })
      assert.equal(0, code, out)
      assert.matches("1 chains, 1 entries, 0 broken", out, 1, true)
    end)
  end)
end

describe("paygate.audit's limits", function()
  local function read(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("*a")
    f:close()
    return (s:gsub("%s+", " "))
  end

  -- No key is involved: a chain cut short with its head set back to the
  -- new last entry (both values already in the table) verifies. The docs
  -- must say so rather than promise that any deleted row is found.
  it("a cut tail with its head moved back verifies, as the docs say",
     function()
    local db = assert(sql.open("sqlite:" .. tmp .. "/limits.db"))
    for i = 1, 3 do
      assert(audit.append(db, "payment:L", { what = "step", to = "s" .. i }))
    end
    assert(db:exec_script([[
DELETE FROM paygate_audit WHERE subject = 'payment:L' AND seq = 3;
UPDATE paygate_audit_heads SET seq = 2, hash = (SELECT hash FROM
  paygate_audit WHERE subject = 'payment:L' AND seq = 2)]]))
    local ok, rep = audit.verify(db, "payment:L")
    assert.same({ true, 2 }, { ok, rep.entries })
    db:close()
    local fsm_md, readme = read("docs/fsm.md"), read("README.md")
    assert.not_matches("finds any row edited", fsm_md, 1, true)
    assert.matches("The last entries deleted, the head moved back", fsm_md,
                   1, true)
    assert.matches("not a chain's last entries deleted with its head moved"
      .. " back", readme, 1, true)
    assert.matches("seen by neither check", read("docs/gateway.md"), 1,
                   true)
  end)
end)
