-- paygate.idempotency on SQLite and PostgreSQL: begin/complete/release,
-- replay byte for byte, 422 on another body, 409 while running, a lease
-- that runs out, expiry and pruning, two handles racing one key, and the
-- route wrapper (with its response stored in the handler's transaction).
local paygate = require "paygate"
local core = require "paygate.core"
local sql = require "paygate.sql"
local json = require "paygate.json"
local idem = require "paygate.idempotency"
local servers = require "spec.support.servers"

local tmp = servers.mktemp()
local pg_srv
local n = 0

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

-- Each engine: open(name) gives a handle on a store fresh for the test
-- (two calls with the same name: two handles on one store).
local engines = {
  sqlite = function()
    n = n + 1
    local path = tmp .. "/i" .. n .. ".db"
    return function()
      return assert(sql.open("sqlite:" .. path))
    end
  end,
}
if servers.have_postgres() then
  engines.postgres = function()
    pg_srv = pg_srv or servers.postgres()
    local db = assert(sql.open(pg_srv.url))
    assert(db:exec_script("DROP TABLE IF EXISTS paygate_idempotency;"
      .. " DROP TABLE IF EXISTS effects"))
    db:close()
    return function()
      return assert(sql.open(pg_srv.url))
    end
  end
end

-- A request the wrapper can read, as the server's req would be.
-- (a header given as a list is repeated: header() is its first value)
local function fake_req(o)
  local headers = {}
  for k, v in pairs(o.headers or {}) do headers[k:lower()] = v end
  return {
    method = o.method or "POST", path = o.path or "/payments",
    query_string = o.query or "", body = o.body or "", app_id = o.app_id,
    header = function(_, name)
      local v = headers[name:lower()]
      if type(v) == "table" then return v[1] end
      return v
    end,
    header_count = function(_, name)
      local v = headers[name:lower()]
      return type(v) == "table" and #v or (v and 1 or 0)
    end,
  }
end

describe("idempotency.check_key", function()
  it("refuses empty, too long and non-printable keys", function()
    assert.same({ false, "missing" }, { idem.check_key(nil) })
    assert.same({ false, "empty" }, { idem.check_key("") })
    assert.same({ false, "too_long" }, { idem.check_key(("k"):rep(256)) })
    assert.same({ false, "not_printable" }, { idem.check_key("a\tb") })
    assert.same({ false, "not_printable" }, { idem.check_key("a\0b") })
    assert.same({ false, "not_printable" }, { idem.check_key("caf\195\169") })
    assert.is_true(idem.check_key(("k"):rep(255)))
    assert.is_true(idem.check_key("order 42/attempt-1 ~!"))
  end)
end)

describe("idempotency.fingerprint", function()
  it("covers method, path and body", function()
    local a = idem.fingerprint("POST", "/p", "{}")
    assert.equal(64, #a)
    assert.not_equal(a, idem.fingerprint("PUT", "/p", "{}"))
    assert.not_equal(a, idem.fingerprint("POST", "/p?x=1", "{}"))
    assert.not_equal(a, idem.fingerprint("POST", "/p", "{ }"))
    assert.equal(a, idem.fingerprint("POST", "/p", "{}"))
  end)
end)

describe("idempotency misuse", function()
  it("raises naming the function and argument", function()
    assert.error_matches(function() idem.begin({}, "a", "k", "f") end,
                         "idempotency.begin: store must be")
    local db = engines.sqlite()()
    assert.error_matches(function() idem.begin(db, "a", "", "f") end,
                         "idempotency.begin: key is not valid %(empty%)")
    assert.error_matches(function()
      idem.begin(db, "a", "k", "f", { lease = -1 })
    end, "opts.lease must be a positive number")
    assert.error_matches(function() idem.complete(db, {}, 200, "") end,
                         "idempotency.complete: h must be a handle")
    db:close()
  end)

  -- A record past its ttl is as if absent: with a ttl at or below the
  -- lease, a repeat arriving after the ttl ran the request a second time
  -- while the first run still held its lease (was: accepted silently).
  it("refuses a ttl not longer than the lease, at the call", function()
    local db = engines.sqlite()()
    assert.error_matches(function()
      idem.begin(db, "a", "k", "f", { ttl = 5, lease = 10 })
    end, "idempotency.begin: opts.ttl %(5 s%) must be longer than the"
         .. " lease %(10 s%)")
    assert.error_matches(function()
      idem.begin(db, "a", "k", "f", { ttl = 10, lease = 10 })
    end, "opts.ttl %(10 s%) must be longer than the lease")
    -- the default lease (request timeout + 10 s) counts too
    assert.error_matches(function()
      idem.begin(db, "a", "k", "f", { ttl = 20 })
    end, "opts.ttl %(20 s%) must be longer than the lease %(%d+ s, the"
         .. " default: limits.request_timeout %+ 10%)")
    local ok_h = function() return 200, "" end
    assert.error_matches(function()
      idem.wrap(db, ok_h, { ttl = 30, lease = 60 })
    end, "idempotency.wrap: opts.ttl %(30 s%) must be longer than the"
         .. " lease %(60 s%)")
    -- a ttl longer than the lease is fine
    assert.is_function(idem.wrap(db, ok_h, { ttl = 61, lease = 60 }))
    local h = assert(idem.begin(db, "a", "k", "f", { ttl = 2, lease = 1 }))
    assert.equal("new", h.state)
    -- the default ttl (24 h) outlives a lease of a day or more: lease + 24 h
    assert.is_function(idem.wrap(db, ok_h, { lease = 86400 }))
    assert(idem.begin(db, "a", "long", "f", { lease = 90000 }))
    local r = assert(db:query("SELECT lease_until - created_at AS lease,"
      .. " expires_at - created_at AS ttl FROM paygate_idempotency WHERE"
      .. " idem_key = 'long'"))[1]
    assert.same({ 90000, 90000 + idem.DEFAULT_TTL },
                { math.floor(r.lease + 0.5), math.floor(r.ttl + 0.5) })
    db:close()
  end)
end)

for name, engine in pairs(engines) do
  describe("idempotency on " .. name, function()
    local open, db
    before_each(function()
      open = engine()
      db = open()
    end)
    after_each(function() db:close() end)

    it("replays a stored response byte for byte", function()
      local fp = idem.fingerprint("POST", "/payments", "{\"a\":1}")
      local h = assert(idem.begin(db, "app1", "k1", fp))
      assert.equal("new", h.state)
      local body = "bin\0ary \255\254 \"json\"\n" .. ("x"):rep(5000)
      local r = assert(idem.complete(db, h, 201, body,
                                     { ["X-Request-Id"] = "r1", Bad = {} }))
      assert.equal(body, r.body)
      for _ = 1, 2 do
        local again = assert(idem.begin(db, "app1", "k1", fp))
        assert.equal("done", again.state)
        assert.equal(201, again.response.status)
        assert.equal(body, again.response.body)
        assert.same({ ["X-Request-Id"] = "r1" }, again.response.headers)
      end
      -- another caller's key of the same name is another record
      assert.equal("new", assert(idem.begin(db, "app2", "k1", fp)).state)
    end)

    it("replays header values byte for byte, bytes outside UTF-8 too",
       function()
      -- HTTP lets a header value carry bytes 0x80..0xFF (a GBK file name
      -- in Content-Disposition, say), and the server sends them as given
      local headers = {
        ["Content-Disposition"] = "attachment; filename=\"\180\243.csv\"",
        ["X-Raw"] = "\255\254 \1 \127 \"q\" \\",
        ["X-Utf8"] = "\229\143\176", ["X-N"] = 42, ["X-Empty"] = "" }
      local h = assert(idem.begin(db, "a", "kh", "f"))
      local r = assert(idem.complete(db, h, 200, "ok", headers))
      local want = { ["Content-Disposition"] = headers["Content-Disposition"],
                     ["X-Raw"] = headers["X-Raw"], ["X-Utf8"] = "\229\143\176",
                     ["X-N"] = "42", ["X-Empty"] = "" }
      assert.same(want, r.headers)
      local again = assert(idem.begin(db, "a", "kh", "f"))
      assert.equal("done", again.state)
      assert.same(want, again.response.headers)
      -- a record stored in the earlier form (a JSON object) still replays
      assert(db:exec("UPDATE paygate_idempotency SET headers = $1 WHERE"
                     .. " idem_key = 'kh'", { '{"X-Old":"v 1"}' }))
      again = assert(idem.begin(db, "a", "kh", "f"))
      assert.same({ ["X-Old"] = "v 1" }, again.response.headers)
    end)

    it("stores a table body as the JSON it is sent as", function()
      local h = assert(idem.begin(db, "a", "k", "f"))
      local r = assert(idem.complete(db, h, 200, { id = "p1", n = 2 }))
      assert.equal("application/json", r.headers["Content-Type"])
      local again = assert(idem.begin(db, "a", "k", "f"))
      assert.equal(r.body, again.response.body)
      assert.same({ id = "p1", n = 2 }, json.decode(again.response.body))
    end)

    it("refuses the same key with another fingerprint (conflict)", function()
      local h = assert(idem.begin(db, "a", "k", "f1"))
      local _, err = idem.begin(db, "a", "k", "f2")
      assert.equal("conflict", err.kind)
      assert(idem.complete(db, h, 200, "ok"))
      _, err = idem.begin(db, "a", "k", "f2")
      assert.equal("conflict", err.kind)
      assert.is_false(err.retryable)
    end)

    it("answers in_flight while the first run holds its lease", function()
      local h = assert(idem.begin(db, "a", "k", "f", { lease = 30 }))
      local _, err = idem.begin(db, "a", "k", "f")
      assert.equal("in_flight", err.kind)
      assert.is_true(err.retryable)
      assert.is_true(err.retry_after > 29 and err.retry_after <= 30)
      assert(idem.complete(db, h, 202, "done"))
      assert.equal("done", assert(idem.begin(db, "a", "k", "f")).state)
    end)

    it("counts replays, conflicts and in-flight refusals on /metrics",
       function()
      local c = require("paygate.metrics").counter(
        "paygate_idempotency_total", "", { "outcome" })
      local function n(o) return c:get({ o }) end
      local b = { n("started"), n("replayed"), n("conflict"), n("in_flight") }
      local h = assert(idem.begin(db, "a", "k", "f", { lease = 30 }))
      assert.equal("in_flight", select(2, idem.begin(db, "a", "k", "f")).kind)
      assert.equal("conflict", select(2, idem.begin(db, "a", "k", "g")).kind)
      assert(idem.complete(db, h, 200, "ok"))
      assert.equal("done", assert(idem.begin(db, "a", "k", "f")).state)
      assert.same({ b[1] + 1, b[2] + 1, b[3] + 1, b[4] + 1 },
                  { n("started"), n("replayed"), n("conflict"),
                    n("in_flight") })
    end)

    it("release() lets a repeat run again at once", function()
      local h = assert(idem.begin(db, "a", "k", "f", { lease = 30 }))
      assert.is_true(idem.release(db, h))
      local h2 = assert(idem.begin(db, "a", "k", "f2"))
      assert.equal("new", h2.state)
      assert.is_false(h2.taken_over)
    end)

    it("takes over a run whose lease ran out; the old run is fenced",
       function()
      assert(db:exec("CREATE TABLE effects (k TEXT NOT NULL)"))
      local old = assert(idem.begin(db, "a", "k", "f", { lease = 0.05 }))
      local t0 = core.time()
      while core.time() < t0 + 0.06 do paygate.sleep(0.01) end
      local new = assert(idem.begin(db, "a", "k", "f", { lease = 30 }))
      assert.equal("new", new.state)
      assert.is_true(new.taken_over)
      -- the old run finishes late, in its own transaction: refused, and
      -- its effect rolls back with it
      local ok, err = db:transaction(function(tx)
        assert(tx:exec("INSERT INTO effects (k) VALUES ('old')"))
        return idem.complete(tx, old, 201, "old")
      end)
      assert.is_nil(ok)
      assert.equal("lost", err.kind)
      local rows = assert(db:query("SELECT k FROM effects"))
      assert.equal(0, #rows)
      assert(idem.complete(db, new, 201, "new"))
      local again = assert(idem.begin(db, "a", "k", "f"))
      assert.equal("new", again.response.body)
      _, err = idem.complete(db, old, 201, "old")
      assert.equal("lost", err.kind)
    end)

    it("keeps a record taken over near its expiry for the new run's lease",
       function()
      -- a run that died late in its record's life: lease over, the record
      -- due to expire in 0.3 s
      local old = assert(idem.begin(db, "a", "k", "f",
                                    { ttl = 100, lease = 50 }))
      local now = core.time()
      assert(db:exec("UPDATE paygate_idempotency SET lease_until = $1,"
        .. " expires_at = $2 WHERE idem_key = 'k'", { now - 1, now + 0.3 }))
      local new = assert(idem.begin(db, "a", "k", "f",
                                    { ttl = 100, lease = 50 }))
      assert.is_true(new.taken_over)
      local row = assert(db:query("SELECT lease_until, expires_at FROM"
        .. " paygate_idempotency WHERE idem_key = 'k'"))[1]
      assert.is_true(row.expires_at > row.lease_until)
      -- past the old expiry, while the new run holds its lease: a repeat
      -- is refused (it ran the request again beside the new run), and
      -- prune() keeps the record
      while core.time() < now + 0.35 do paygate.sleep(0.01) end
      local again, err = idem.begin(db, "a", "k", "f")
      assert.is_nil(again)
      assert.equal("in_flight", err.kind)
      assert.equal(0, idem.prune(db))
      assert(idem.complete(db, new, 201, "new"))
      assert.equal("lost", select(2, idem.complete(db, old, 201, "x")).kind)
      assert.equal("new", assert(idem.begin(db, "a", "k", "f")).response.body)
    end)

    it("forgets records past their ttl; prune() removes them in batches",
       function()
      for i = 1, 7 do
        local h = assert(idem.begin(db, "a", "k" .. i, "f",
                                         { ttl = 0.05, lease = 0.01 }))
        assert(idem.complete(db, h, 200, "r" .. i))
      end
      local keep = assert(idem.begin(db, "a", "keep", "f"))
      assert(idem.complete(db, keep, 200, "kept"))
      local t0 = core.time()
      while core.time() < t0 + 0.06 do paygate.sleep(0.01) end
      -- an expired record is as if absent, even with another body (its
      -- new record lives 1 s: the replay just below must come within its
      -- ttl even on a slow run, e.g. under ASan)
      local h = assert(idem.begin(db, "a", "k1", "other",
                                     { ttl = 1, lease = 0.5 }))
      assert.equal("new", h.state)
      assert.is_false(h.taken_over)
      assert(idem.complete(db, h, 200, "fresh"))
      assert.equal("fresh",
                   assert(idem.begin(db, "a", "k1", "other")).response.body)
      t0 = core.time()
      while core.time() < t0 + 1.05 do paygate.sleep(0.01) end
      assert.equal(3, idem.prune(db, { batch = 3 }))
      assert.equal(3, idem.prune(db, { batch = 3 }))
      assert.equal(1, idem.prune(db, { batch = 3 }))
      assert.equal(0, idem.prune(db, { batch = 3 }))
      local rows = assert(db:query(
        "SELECT idem_key FROM paygate_idempotency"))
      assert.same({ { idem_key = "keep" } }, rows)
    end)

    it("pruner() empties expired records batch after batch", function()
      for i = 1, 5 do
        local h = assert(idem.begin(db, "a", "p" .. i, "f",
                                         { ttl = 0.01, lease = 0.005 }))
        assert(idem.complete(db, h, 200, "x"))
      end
      local task = idem.pruner(db, { interval = 0.05, batch = 2 })
      local t0 = core.time()
      local left
      repeat
        paygate.sleep(0.02)
        left = #assert(db:query("SELECT idem_key FROM paygate_idempotency"))
      until left == 0 or core.time() > t0 + 10
      task:cancel()
      assert.equal(0, left)
    end)

    it("pruner() refuses a bad interval, pause or batch at the call", function()
      -- (the task's first tick raised, and nothing was pruned again)
      for _, o in ipairs({ { interval = 0 / 0 }, { interval = 1e9 },
                           { pause = 0 / 0 }, { pause = -1 },
                           { batch = 0 }, { batch = 2.5 }, { batch = "9" } }) do
        local k = next(o)
        local ok, err = pcall(idem.pruner, db, o)
        assert.is_false(ok, k .. " " .. tostring(o[k]))
        assert.matches("idempotency.pruner: opts." .. k .. " must be", err,
                       1, true)
      end
    end)

    it("lets exactly one of many racers on two handles run", function()
      local db2 = open()
      for round = 1, 5 do
        local tasks = {}
        for i = 1, 16 do
          local d = i % 2 == 0 and db or db2
          tasks[i] = paygate.spawn(function()
            return idem.begin(d, "a", "race" .. round, "f", { lease = 30 })
          end)
        end
        local new, busy = 0, 0
        for i = 1, 16 do
          local h, err = tasks[i]:wait()
          if h then
            assert.equal("new", h.state)
            new = new + 1
          else
            assert.equal("in_flight", err.kind)
            busy = busy + 1
          end
        end
        assert.equal(1, new)
        assert.equal(15, busy)
      end
      db2:close()
    end)

    describe("wrap", function()
      local function handler_counting(calls)
        return function(req)
          calls.n = calls.n + 1
          return 201, { id = "p" .. calls.n, body = req.body },
                 { ["X-Run"] = tostring(calls.n) }
        end
      end

      it("answers 400 for a missing or bad key", function()
        local calls = { n = 0 }
        local fn = idem.wrap(db, handler_counting(calls))
        local s, b = fn(fake_req{})
        assert.equal(400, s)
        assert.equal("missing_idempotency_key", json.decode(b).error)
        for _, k in ipairs({ "", ("x"):rep(256), "a\1b" }) do
          s, b = fn(fake_req{ headers = { ["Idempotency-Key"] = k } })
          assert.equal(400, s)
          assert.equal("invalid_idempotency_key", json.decode(b).error)
        end
        -- given twice (unsigned: paygate.apikey refuses a signed one)
        s, b = fn(fake_req{ headers = { ["Idempotency-Key"] = { "a", "b" } } })
        assert.equal(400, s)
        assert.equal("invalid_idempotency_key", json.decode(b).error)
        assert.matches("more than once", json.decode(b).message, 1, true)
        assert.equal(0, calls.n)
      end)

      it("runs once, replays, and refuses another body with 422", function()
        local calls = { n = 0 }
        local fn = idem.wrap(db, handler_counting(calls))
        local hdr = { ["Idempotency-Key"] = "w1" }
        local s1, b1, h1 = fn(fake_req{ headers = hdr, body = "{\"a\":1}",
                                        app_id = "shop" })
        assert.equal(201, s1)
        assert.is_nil(h1["Idempotent-Replayed"])
        local s2, b2, h2 = fn(fake_req{ headers = hdr, body = "{\"a\":1}",
                                        app_id = "shop" })
        assert.equal(201, s2)
        assert.equal(b1, b2)
        assert.equal("1", h2["X-Run"])
        assert.equal("true", h2["Idempotent-Replayed"])
        assert.equal(1, calls.n)
        local s3, b3 = fn(fake_req{ headers = hdr, body = "{\"a\":2}",
                                    app_id = "shop" })
        assert.equal(422, s3)
        assert.equal("idempotency_key_reused", json.decode(b3).error)
        -- the caller is told what to do about it
        assert.matches("a retry must send the first request's exact bytes"
          .. " (then it gets its answer), another operation a new key",
          json.decode(b3).message, 1, true)
        -- the same key from another app is its own request
        assert.equal(201, (fn(fake_req{ headers = hdr, body = "{\"a\":2}",
                                        app_id = "other" })))
        assert.equal(2, calls.n)
      end)

      it("stores the response in the handler's transaction", function()
        assert(db:exec("CREATE TABLE effects (k TEXT NOT NULL)"))
        local calls = 0
        local fn = idem.wrap(db, function(req, ik)
          calls = calls + 1
          return db:transaction(function(tx)
            assert(tx:exec("INSERT INTO effects (k) VALUES ($1)",
                           { req.body }))
            return ik:respond(tx, 201, { saved = req.body })
          end)
        end)
        local hdr = { ["Idempotency-Key"] = "tx1" }
        local s1, b1 = fn(fake_req{ headers = hdr, body = "e1" })
        local s2, b2 = fn(fake_req{ headers = hdr, body = "e1" })
        assert.equal(201, s1)
        assert.equal(201, s2)
        assert.equal(b1, b2)
        assert.equal(1, calls)
        assert.equal(1, #assert(db:query("SELECT k FROM effects")))
      end)

      it("sends the answer ik:respond committed even when the handler then"
         .. " fails (not a 503 'not applied')", function()
        assert(db:exec("CREATE TABLE effects (k TEXT NOT NULL)"))
        local fn = idem.wrap(db, function(req, ik)
          assert(db:transaction(function(tx)
            assert(tx:exec("INSERT INTO effects (k) VALUES ($1)",
                           { req.body }))
            return ik:respond(tx, 201, { saved = req.body })
          end))
          -- a later step fails: the effects and the answer are committed
          return nil, paygate.error("unavailable", "audit store down")
        end)
        local hdr = { ["Idempotency-Key"] = "tx2" }
        local s1, b1 = fn(fake_req{ headers = hdr, body = "e2" })
        assert.equal(201, s1)
        local s2, b2 = fn(fake_req{ headers = hdr, body = "e2" })
        assert.equal(201, s2)
        assert.equal(b1, b2)
        assert.equal(1, #assert(db:query("SELECT k FROM effects")))
      end)

      it("runs requests without a key unprotected when not required",
         function()
        local calls = 0
        local fn = idem.wrap(db, function(req, ik)
          calls = calls + 1
          return db:transaction(function(tx)
            return ik:respond(tx, 200, { n = calls })
          end)
        end, { required = false })
        local s1, b1, h1 = fn(fake_req{})
        local s2, b2 = fn(fake_req{})
        assert.equal(200, s1)
        assert.equal(200, s2)
        assert.equal('{"n":1}', b1)
        assert.equal('{"n":2}', b2)
        assert.equal("application/json", h1["Content-Type"])
        -- with a key, it is protected
        local hdr = { ["Idempotency-Key"] = "opt" }
        local s3, b3 = fn(fake_req{ headers = hdr })
        local _, b4 = fn(fake_req{ headers = hdr })
        assert.equal(200, s3)
        assert.equal(b3, b4)
        assert.equal(3, calls)
      end)

      it("releases the key when the handler fails or raises", function()
        local mode = "raise"
        local fn = idem.wrap(db, function()
          if mode == "raise" then error("boom") end
          if mode == "nil" then
            return nil, paygate.error("unavailable", "x")
          end
          if mode == "unknown" then
            return nil, paygate.error("unknown_outcome", "commit lost")
          end
          if mode == "502" then return 502, { error = "upstream" } end
          return 200, "ok"
        end)
        local hdr = { ["Idempotency-Key"] = "r1" }
        assert.error_matches(function() fn(fake_req{ headers = hdr }) end,
                             "boom")
        mode = "nil"
        local s0, b0 = fn(fake_req{ headers = hdr })
        assert.equal(503, s0)
        assert.matches("was not applied", b0, 1, true)
        -- a write whose answer was lost is not said to be "not applied":
        -- the caller must retry with the same key
        mode = "unknown"
        s0, b0 = fn(fake_req{ headers = hdr })
        assert.equal(503, s0)
        local doc = require("cjson").decode(b0)
        assert.equal("unknown_outcome", doc.error)
        assert.matches("may have been applied", doc.message, 1, true)
        assert.matches("same Idempotency-Key", doc.message, 1, true)
        mode = "502"
        assert.equal(502, (fn(fake_req{ headers = hdr })))
        mode = "ok"
        local s, b = fn(fake_req{ headers = hdr })
        assert.equal(200, s)
        assert.equal("ok", b)
        mode = "raise"
        s, b = fn(fake_req{ headers = hdr })   -- replayed, not run
        assert.equal(200, s)
        assert.equal("ok", b)
      end)

      it("passes keep the handler's body: one it refuses releases the key,"
         .. " and the same request runs again", function()
        -- (the gateway leaves a 409 appid_not_configured or
        -- merchant_not_configured unkept this way: the config fixed, the
        -- same request under the same key runs)
        local calls, seen, fixed = 0, {}, false
        local fn = idem.wrap(db, function()
          calls = calls + 1
          return 409, { error = fixed and "conflict" or "not_configured",
                        run = calls }
        end, { keep = function(status, body)
          seen[#seen + 1] = { status, body }
          return not (type(body) == "table"
                      and body.error == "not_configured")
        end })
        local hdr = { ["Idempotency-Key"] = "kb1" }
        local s, b, h = fn(fake_req{ headers = hdr, body = "{}" })
        assert.equal(409, s)
        assert.equal(1, json.decode(b).run)
        -- the body as the handler returned it (a table), not its JSON
        assert.same({ 409, { error = "not_configured", run = 1 } }, seen[1])
        -- not stored: the same key and body run again, unreplayed
        s, b, h = fn(fake_req{ headers = hdr, body = "{}" })
        assert.equal(409, s)
        assert.equal(2, json.decode(b).run)
        assert.is_nil(h and h["Idempotent-Replayed"])
        -- a body keep takes is stored, and replayed without a run
        fixed = true
        s, b = fn(fake_req{ headers = hdr, body = "{}" })
        assert.equal(3, json.decode(b).run)
        local s2, b2, h2 = fn(fake_req{ headers = hdr, body = "{}" })
        assert.equal(s, s2)
        assert.equal(b, b2)
        assert.equal("true", h2["Idempotent-Replayed"])
        assert.equal(3, calls)
      end)

      it("answers a run whose record was taken over 409 with Retry-After",
         function()
        -- before: this 409 had no Retry-After, which docs/idempotency.md
        -- and the gateway's openapi.json promise on every
        -- idempotency_in_flight
        local fp = idem.fingerprint("POST", "/payments", "")
        local fn = idem.wrap(db, function(_, ik)
          local t0 = core.time()
          while core.time() < t0 + 0.06 do paygate.sleep(0.01) end
          -- the lease ran out: a retry of the key took the record over
          local other = assert(idem.begin(db, "", "lost-1", fp,
                                          { lease = 30 }))
          assert.is_true(other.taken_over)
          return db:transaction(function(tx)
            return ik:respond(tx, 201, "late")
          end)
        end, { lease = 0.05 })
        local s, b, h = fn(fake_req{ headers = { ["Idempotency-Key"] =
                                                   "lost-1" } })
        assert.equal(409, s)
        assert.equal("idempotency_in_flight", json.decode(b).error)
        assert.matches("send it again after Retry-After seconds",
                       json.decode(b).message, 1, true)
        assert.equal("application/json", h["Content-Type"])
        assert.equal("1", h["Retry-After"])
      end)

      it("stores no response the server could not send (bad header,"
         .. " 1xx status): it raises and releases the key", function()
        local answer
        local fn = idem.wrap(db, function() return answer() end)
        local bad = {
          function() return 200, "ok", { ["X-Note"] = "a\r\nSet-Cookie: x" } end,
          function() return 200, "ok", { ["X Note"] = "a" } end,
          function() return 200, "ok", { ["X-Big"] = ("v"):rep(5000) } end,
          function() return 103, "" end,
        }
        local hdr = { ["Idempotency-Key"] = "bad-response" }
        for _, f in ipairs(bad) do
          answer = f
          assert.error_matches(function() fn(fake_req{ headers = hdr }) end,
            "idempotency: handler")
          -- released: the next request with the key runs again
        end
        -- and the same through ik:respond in the handler's transaction
        local fn2 = idem.wrap(db, function(_, ik)
          return db:transaction(function(tx)
            return ik:respond(tx, 200, "ok", { ["X-Note"] = "a\nb" })
          end)
        end)
        assert.error_matches(function() fn2(fake_req{ headers = hdr }) end,
          "idempotency: handler")
        answer = function() return 200, "fine", { ["X-Note"] = "ok" } end
        local s, b, h = fn(fake_req{ headers = hdr })
        assert.equal(200, s)
        assert.equal("fine", b)
        assert.equal("ok", h["X-Note"])
        assert.is_nil(h["Idempotent-Replayed"])
      end)
    end)
  end)
end

describe("idempotency.wrap when the store fails", function()
  it("answers 503 and logs the store's error (the answer names only its"
     .. " kind)", function()
    local db = assert(sql.open("sqlite:" .. tmp .. "/down.db"))
    local runs = 0
    local fn = idem.wrap(db, function()
      runs = runs + 1
      return 201, "made"
    end)
    assert.equal(201, (fn(fake_req{ headers = { ["Idempotency-Key"] = "k0" } })))
    -- from now on the store refuses the key's record, as a full disk does
    assert(db:exec("CREATE TRIGGER down BEFORE INSERT ON paygate_idempotency"
                   .. " BEGIN SELECT RAISE(ABORT, 'the disk is full'); END"))
    local lines = {}
    local log = core.log
    core.log = function(level, msg, fields)
      lines[#lines + 1] = { level = level, msg = msg, fields = fields }
    end
    local ok, s, b = pcall(fn, fake_req{ app_id = "shop",
                                         headers = { ["Idempotency-Key"] = "k1" } })
    core.log = log
    db:close()
    assert(ok, tostring(s))
    assert.equal(503, s)
    assert.equal("unavailable", json.decode(b).error)
    assert.is_nil(b:find("disk", 1, true), b)
    assert.equal(1, runs)
    assert.equal(1, #lines, "log lines: " .. #lines)
    assert.equal(3, lines[1].level)
    assert.matches("idempotency: the store failed", lines[1].msg, 1, true)
    local f = json.decode(lines[1].fields)
    assert.matches("the disk is full", f.error, 1, true)
    assert.equal("shop", f.scope)
  end)
end)

describe("idempotency.wrap when the store fails to release a key",
         function()
  it("logs it once at warn: the key stays in flight until its lease ends",
     function()
    -- before: the failed release was ignored without a word; a retry got
    -- 409 idempotency_in_flight until the lease ended (40 s by default)
    -- and no line said why
    local db = assert(sql.open("sqlite:" .. tmp .. "/norelease.db"))
    local fn = idem.wrap(db, function() return 502, "upstream" end)
    assert.equal(502, (fn(fake_req{ headers = { ["Idempotency-Key"] =
                                                  "k0" } })))
    -- from now on the store refuses to delete a record
    assert(db:exec("CREATE TRIGGER down BEFORE DELETE ON"
                   .. " paygate_idempotency BEGIN SELECT RAISE(ABORT,"
                   .. " 'the disk is gone'); END"))
    local lines = {}
    local log = core.log
    core.log = function(level, msg, fields)
      lines[#lines + 1] = { level = level, msg = msg, fields = fields }
    end
    local ok, s, b = pcall(fn, fake_req{ app_id = "shop",
      headers = { ["Idempotency-Key"] = "k1" } })
    core.log = log
    assert(ok, tostring(s))
    assert.equal(502, s)              -- the handler's answer, still sent
    assert.equal("upstream", b)
    local rows = assert(db:query("SELECT state FROM paygate_idempotency"
                                 .. " WHERE idem_key = 'k1'"))
    db:close()
    assert.same({ { state = "running" } }, rows)
    assert.equal(1, #lines, "log lines: " .. #lines)
    assert.equal(2, lines[1].level)
    assert.matches("idempotency: the key could not be released",
                   lines[1].msg, 1, true)
    local f = json.decode(lines[1].fields)
    assert.matches("the disk is gone", f.error, 1, true)
    assert.equal("shop", f.scope)
    assert.equal("k1", f.key)
  end)
end)

-- prune() on PostgreSQL against a begin() that takes an expired record
-- over and commits while the prune's DELETE waits for the row: the record
-- now belongs to a running request and must stay. READ COMMITTED rechecks
-- only the DELETE's own WHERE on the new row version; without the expiry
-- repeated there, the taken-over record was deleted, and a repeat of the
-- request ran it again beside the first run.
if servers.have_postgres() then
  describe("idempotency.prune on PostgreSQL", function()
    it("keeps a record taken over while the prune waited for it",
       function()
      local open = engines.postgres()
      local db, other, watch = open(), open(), open()
      local h = assert(idem.begin(db, "a", "k", "f"))
      assert(idem.complete(db, h, 201, "old"))
      assert(idem.prune(other, { now = 0 }))   -- its schema check ran
      local now = core.time()
      assert(db:exec("UPDATE paygate_idempotency SET expires_at = $1",
                     { now - 60 }))
      local pruning
      local takeover = paygate.spawn(function()
        return db:transaction(function(tx)
          -- what begin() does to an expired record, held open until the
          -- prune waits for the row
          assert(tx:exec("UPDATE paygate_idempotency SET state ="
            .. " 'running', token = 't', lease_until = $1, status = NULL,"
            .. " body = NULL, created_at = $2, expires_at = $3 WHERE"
            .. " scope = 'a' AND idem_key = 'k'",
            { now + 30, now, now + 86400 }))
          pruning = paygate.spawn(function()
            return idem.prune(other, { now = now })
          end)
          servers.wait_for(function()
            local rows = assert(watch:query("SELECT count(*)::int AS n FROM"
              .. " pg_stat_activity WHERE wait_event_type = 'Lock' AND"
              .. " query LIKE 'DELETE FROM paygate_idempotency%'"))
            return rows[1].n == 1
          end, 10, "the prune to wait for the row lock")
          return true
        end)
      end)
      assert(takeover:wait())
      assert.equal(0, assert(pruning:wait()))
      local rows = assert(db:query("SELECT state FROM paygate_idempotency"
                                   .. " WHERE idem_key = 'k'"))
      assert.same({ { state = "running" } }, rows)
      db:close(); other:close(); watch:close()
    end)
  end)
end
