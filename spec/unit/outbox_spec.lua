-- paygate.outbox on SQLite and PostgreSQL (and Redis Streams): enqueue in
-- the caller's transaction, in-order delivery per subject, backoff, dead
-- letters, replay, pruning, fencing, webhook signatures. Dispatchers run
-- round by round (d:step()) on an injected clock: no test sleeps to wait
-- for a retry.
local paygate = require "paygate"
local core = require "paygate.core"
local sql = require "paygate.sql"
local redis = require "paygate.redis"
local lease = require "paygate.lease"
local outbox = require "paygate.outbox"
local json = require "paygate.json"
local servers = require "spec.support.servers"
local kit = require "support.outbox_kit"
local wait_until, enqueue = kit.wait_until, kit.enqueue

local tmp = servers.mktemp()
local pg_srv, redis_srv
local n = 0

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

local stores = {
  sqlite = function()
    n = n + 1
    return assert(sql.open("sqlite:" .. tmp .. "/o" .. n .. ".db"))
  end,
}
if servers.have_postgres() then
  stores.postgres = function()
    pg_srv = pg_srv or servers.postgres()
    local db = assert(sql.open(pg_srv.url))
    assert(db:exec_script("DROP TABLE IF EXISTS paygate_outbox;"
      .. " DROP TABLE IF EXISTS paygate_leases;"
      .. " DROP TABLE IF EXISTS payments;"
      .. " CREATE TABLE payments (id TEXT PRIMARY KEY, state TEXT)"))
    return db
  end
end

-- A clock the test moves by hand, starting a second ahead of the real
-- one (rows are enqueued due "now" by the real clock).
local function new_clock()
  local c = { t = core.time() + 1 }
  function c.now() return c.t end
  function c.advance(s) c.t = c.t + s end
  return c
end

-- A sink that records what it got and fails as told: fail[id] = number of
-- attempts that fail (retryable), or "fatal".
local function recorder(name)
  local r = { got = {}, fail = {}, name = name or "rec" }
  r.sink = { name = r.name, deliver = function(event)
    local f = r.fail[event.id]
    if f == "fatal" then
      return nil, paygate.error("rejected", "no", { retryable = false })
    elseif f and f > 0 then
      r.fail[event.id] = f - 1
      return nil, paygate.error("down", "try later", { retryable = true })
    end
    r.got[#r.got + 1] = event
  end }
  function r.ids()
    local t = {}
    for i, e in ipairs(r.got) do t[i] = e.id end
    return t
  end
  return r
end

local function sorted(t)
  local c = {}
  for i, v in ipairs(t) do c[i] = v end
  table.sort(c)
  return c
end

local function count(t)
  local k = 0
  for _ in pairs(t) do k = k + 1 end
  return k
end

local function row(db, id)
  return assert(outbox.list(db, { id = id }))[1]
end

describe("paygate.outbox misuse", function()
  it("raises at the caller for a bad tx, event or option", function()
    local db = stores.sqlite()
    assert.has_error(function() outbox.enqueue(db, { subject = "s",
                                                     type = "t" }) end,
      "outbox.enqueue: tx must be the tx of a db:transaction")
    db:transaction(function(tx)
      assert.has_error(function() outbox.enqueue(tx, { type = "t" }) end,
        "outbox.enqueue: event.subject must be a non-empty string")
      assert.has_error(function() outbox.enqueue(tx, { subject = "s" }) end,
        "outbox.enqueue: event.type must be a non-empty string")
      for _, bad in ipairs{ "paid\r\nX-Evil: 1", "payment paid",
                            "pay\0ment", "zahlung.\195\182", ("t"):rep(201) } do
        assert.has_error(function()
          outbox.enqueue(tx, { subject = "s", type = bad })
        end, "outbox.enqueue: event.type must be at most 200 visible ASCII"
          .. " characters (no space or control byte)")
      end
      assert.has_error(function()
        outbox.enqueue(tx, { subject = "s", type = "t", payload = "x" })
      end, "outbox.enqueue: event.payload must be a table")
    end)
    assert.has_error(function() outbox.dispatcher(db, { sinks = {} }) end,
      "outbox.dispatcher: opts.sinks must be a non-empty array")
    assert.has_error(function()
      outbox.dispatcher(db, { sinks = { function() end }, batchh = 1 })
    end, "outbox.dispatcher: unknown option opts.batchh")
    assert.has_error(function()
      outbox.dispatcher(db, { sinks = { function() end }, interval = 0 })
    end, "outbox.dispatcher: opts.interval must be a positive number"
         .. " (at most 1e8)")
    -- past 1e8 the task's first sleep raised and the dispatcher was gone
    assert.has_error(function()
      outbox.dispatcher(db, { sinks = { function() end }, interval = 2e8 })
    end, "outbox.dispatcher: opts.interval must be a positive number"
         .. " (at most 1e8)")
    -- the name is part of the name its delivery times are measured under
    -- (paygate.lease: no '|', at most 200 bytes): before, such a name was
    -- taken and every round raised, delivering nothing
    for _, name in ipairs({ "gw|eu", string.rep("o", 185) }) do
      assert.has_error(function()
        outbox.dispatcher(db, { sinks = { function() end }, name = name })
      end, "outbox.dispatcher: opts.name must be a non-empty string"
           .. " without '|' (at most 184 bytes)")
    end
    local long = outbox.dispatcher(db, { sinks = { function() end },
                                         name = string.rep("o", 184) })
    assert.equal(184, #long.name)
    assert.equal(0, long:step())
    long:stop()
    assert.has_error(function() outbox.replay(db, { colour = "x" }) end,
      "outbox.replay: unknown filter key colour")
    -- a misspelt state matched nothing ("no dead letters") before
    for _, st in ipairs({ "Dead", "daed", "" }) do
      assert.has_error(function() outbox.replay(db, { state = st }) end,
        ("outbox.replay: filter.state must be pending, delivered, dead or"
         .. " any (got %q)"):format(st))
      assert.has_error(function() outbox.list(db, { state = st }) end,
        ("outbox.list: filter.state must be pending, delivered, dead or"
         .. " any (got %q)"):format(st))
    end
    for _, st in ipairs({ "pending", "delivered", "dead", "any" }) do
      assert.is_table(assert(outbox.list(db, { state = st })))
    end
    -- refused when made: no scheme, no host, a blank or a control byte
    -- (the HTTP client raises on them at each delivery)
    for _, url in ipairs({ "ftp://x", "http://", "https:///path",
                           "http://x/a b", "http://x/\r\nX: 1",
                           "http://x/\0", "http://:80/h" }) do
      assert.has_error(function() outbox.webhook{ url = url,
                                                  secret = "s" } end,
        "outbox.webhook: opts.url must be an http(s) URL")
    end
    assert.is_table(outbox.webhook{ url = "HTTPS://x.example/h?a=1",
                                    secret = "s" })
    -- and a scheme in capitals goes out: the HTTP client takes http://
    -- and https:// alone, so such a sink raised at every delivery (a
    -- closed port here: a transport failure, not a raise)
    local caps = outbox.webhook{ url = "HTTP://127.0.0.1:1/h", secret = "s",
                                 timeout = 2 }
    local ok, res, derr = pcall(caps.deliver, { id = 1, type = "t",
      subject = "s", created_at = 1, attempt = 1, payload_json = "{}" })
    assert.is_true(ok, tostring(res))
    assert.is_nil(res)
    assert.equal("webhook_failed", derr.kind)
    -- a header the webhook sets itself, in other letters, would go out
    -- twice
    assert.has_error(function() outbox.webhook{ url = "http://x",
      secret = "s", headers = { ["content-type"] = "text/plain" } } end,
      "outbox.webhook: opts.headers.content-type is set by the webhook"
      .. " itself")
    assert.has_error(function() outbox.webhook{ url = "http://x",
      secret = "s", headers = { ["X-N"] = 1 } } end,
      "outbox.webhook: opts.headers must map names to strings")
    -- refused when made, not at every delivery (the HTTP client raises
    -- there: each event would fail until dead-lettered)
    assert.has_error(function() outbox.webhook{ url = "http://x",
      secret = "s", headers = { ["X-T"] = "a\r\nX-Evil: 1" } } end,
      "outbox.webhook: opts.headers.X-T must be a string without control"
      .. " characters (CR, LF, NUL...)")
    assert.has_error(function() outbox.webhook{ url = "http://x",
      secret = "s", headers = { ["X T"] = "a" } } end,
      'outbox.webhook: opts.headers: "X T" is not an HTTP header name')
    outbox.webhook{ url = "http://x", secret = "s",
                    headers = { ["X-Tenant"] = "shop 1; v=2" } }
    for _, t in ipairs({ 0 / 0, math.huge, 0, 86401, "10" }) do
      assert.has_error(function()
        outbox.webhook{ url = "http://x", secret = "s", timeout = t }
      end, "outbox.webhook: opts.timeout must be a number of seconds, more"
        .. " than 0 and at most 86400")
    end
    outbox.webhook{ url = "http://x", secret = "s", timeout = 86400 }
    -- a maxlen Redis cannot take: NaN and inf passed, and every XADD was
    -- refused until the events were dead
    for _, m in ipairs({ 0 / 0, math.huge, 0.5, "100" }) do
      assert.has_error(function()
        outbox.redis_stream{ url = "redis://127.0.0.1:1", maxlen = m }
      end, "outbox.redis_stream: opts.maxlen must be a positive number")
    end
    outbox.redis_stream{ url = "redis://127.0.0.1:1", maxlen = 1000 }
    db:close()
  end)
end)

describe("outbox.verify_webhook", function()
  local body = '{"id":7,"type":"payment.paid","data":{"amount":100}}'
  local secret = "whsec_test_0123456789"

  it("accepts the signature sign_webhook makes", function()
    local h = outbox.sign_webhook(secret, body, 1700000000)
    assert.truthy(h:match("^t=1700000000,v1=%x+$"))
    assert.is_true(outbox.verify_webhook(secret, h, body,
                                         { now = 1700000010 }))
  end)

  it("refuses a tampered body, a wrong secret, a forged signature",
     function()
    local h = outbox.sign_webhook(secret, body, 1700000000)
    local opts = { now = 1700000000 }
    local ok, err = outbox.verify_webhook(secret, h, body:gsub("100", "900"),
                                          opts)
    assert.is_nil(ok)
    assert.equal("bad_signature", err.kind)
    assert.is_false(err.retryable)
    ok, err = outbox.verify_webhook("other", h, body, opts)
    assert.equal("bad_signature", err.kind)
    -- the timestamp is signed too: moving it breaks the signature
    local moved = h:gsub("t=1700000000", "t=1700000001")
    ok, err = outbox.verify_webhook(secret, moved, body, opts)
    assert.equal("bad_signature", err.kind)
    assert.is_nil(ok)
  end)

  it("refuses a stale or future timestamp past the tolerance", function()
    local h = outbox.sign_webhook(secret, body, 1700000000)
    local ok, err = outbox.verify_webhook(secret, h, body,
                                          { now = 1700000301 })
    assert.is_nil(ok)
    assert.equal("stale_timestamp", err.kind)
    ok, err = outbox.verify_webhook(secret, h, body, { now = 1699999000 })
    assert.equal("stale_timestamp", err.kind)
    assert.is_true(outbox.verify_webhook(secret, h, body,
                                         { now = 1700000300 }))
    ok, err = outbox.verify_webhook(secret, h, body,
                                    { now = 1700000100, tolerance = 60 })
    assert.equal("stale_timestamp", err.kind)
  end)

  it("classifies malformed headers as bad_header", function()
    for _, h in ipairs({ "", "v1=abc", "t=abc,v1=" .. ("0"):rep(64),
                         "t=1700000000", "t=1700000000,v1=zz",
                         ("x"):rep(5000) }) do
      local ok, err = outbox.verify_webhook(secret, h, body,
                                            { now = 1700000000 })
      assert.is_nil(ok, h)
      assert.equal("bad_header", err.kind, h)
    end
    local ok, err = outbox.verify_webhook(secret, nil, body)
    assert.is_nil(ok)
    assert.equal("bad_header", err.kind)
    -- two timestamps: which one is signed is not guessed
    local h = outbox.sign_webhook(secret, body, 1700000000)
    ok, err = outbox.verify_webhook(secret, h .. ",t=1700000000", body,
                                    { now = 1700000000 })
    assert.is_nil(ok)
    assert.equal("bad_header", err.kind)
  end)

  it("checks the timestamp as sent: a leading zero is another text",
     function()
    -- HMAC over "0" .. t .. "." .. body: what a receiver that signs the
    -- header's text (as docs/gateway.md's Python one does) accepts
    local crypto = require "paygate.crypto"
    local v1 = crypto.hex(crypto.hmac("sha256", secret,
                                      "01700000000." .. body))
    assert.is_true(outbox.verify_webhook(secret, "t=01700000000,v1=" .. v1,
                                         body, { now = 1700000000 }))
    -- and the signature over "1700000000" does not pass as "01700000000"
    local h = outbox.sign_webhook(secret, body, 1700000000)
    local ok, err = outbox.verify_webhook(secret, h:gsub("t=", "t=0"), body,
                                          { now = 1700000000 })
    assert.is_nil(ok)
    assert.equal("bad_signature", err.kind)
  end)

  it("accepts any of several secrets and several v1 entries (rotation)",
     function()
    local h = outbox.sign_webhook("new", body, 1700000000)
    local h2 = h .. ",v1=" .. ("0"):rep(64)
    assert.is_true(outbox.verify_webhook({ "old", "new" }, h2, body,
                                         { now = 1700000000 }))
  end)

  -- The sender's side of a rotation: a webhook given its new and old
  -- secrets signs with both, so a receiver holding either verifies and
  -- the two sides change their secret when each is ready. Before, a
  -- webhook took one secret: the receiver had to learn the new one first,
  -- and a delivery signed with a secret it did not hold yet was refused.
  it("a webhook given several secrets signs with each (rotation)",
     function()
    local h = outbox.sign_webhook({ "new", "old" }, body, 1700000000)
    assert.truthy(h:match("^t=1700000000,v1=%x+,v1=%x+$"), h)
    for _, s in ipairs({ "new", "old", { "old" }, { "x", "new" } }) do
      assert.is_true(outbox.verify_webhook(s, h, body,
                                           { now = 1700000000 }))
    end
    local _, err = outbox.verify_webhook("other", h, body,
                                         { now = 1700000000 })
    assert.equal("bad_signature", err.kind)
    -- and what the sink sends: its header verifies under either secret
    local sent
    local real = package.loaded["paygate.http"]
    package.loaded["paygate.http"] = { request = function(req)
      sent = req
      req.on_headers(204)
      return { status = 204 }
    end }
    local ok, sink = pcall(outbox.webhook, { url = "http://127.0.0.1:1/h",
                                             secret = { "new", "old" } })
    package.loaded["paygate.http"] = real
    assert.is_true(ok, tostring(sink))
    assert.is_true(sink.deliver({ id = 1, type = "t", subject = "s",
      created_at = 1, attempt = 1, payload_json = "{}" }))
    local sig = sent.headers["Paygate-Signature"]
    assert.is_true(outbox.verify_webhook("old", sig, sent.body))
    assert.is_true(outbox.verify_webhook("new", sig, sent.body))
    for _, bad in ipairs({ {}, { "a", "" }, { "a", 1 } }) do
      assert.has_error(function()
        outbox.webhook{ url = "http://x", secret = bad }
      end, "outbox.webhook: opts.secret must be a non-empty string or an"
        .. " array of them")
      assert.has_error(function() outbox.sign_webhook(bad, body) end,
        "outbox.sign_webhook: secret must be a non-empty string or an"
        .. " array of them")
    end
  end)

  -- The Python receiver docs/gateway.md gives merchants to copy: it must
  -- agree with verify_webhook, and answer a hostile or missing header
  -- with False, never an exception (a 500 from the merchant's receiver).
  -- Before, a non-ASCII digit in t (int() refused what isdigit() took), a
  -- non-ASCII v1 (compare_digest raised) and no header at all raised.
  local have_python = os.execute("command -v python3 >/dev/null 2>&1")
  have_python = have_python == 0 or have_python == true
  ;(have_python and it or pending)("the Python receiver in"
     .. " docs/gateway.md agrees, and never raises on a hostile header",
     function()
    local f = assert(io.open("docs/gateway.md", "rb"))
    local doc = f:read("*a")
    f:close()
    local snippet = assert(doc:match("```python\n(# the same in Python\n"
                                     .. ".-)```"), "the Python snippet")
    local now = math.floor(core.time())
    local crypto = require "paygate.crypto"
    local function crypto_hex_hmac(t)
      return crypto.hex(crypto.hmac("sha256", secret, t .. "." .. body))
    end
    local good = outbox.sign_webhook(secret, body, now)
    local sig = good:match("v1=(%x+)")
    local cases = {
      { good, true },
      { outbox.sign_webhook(secret, body, now - 400), false },  -- stale
      { outbox.sign_webhook("other", body, now), false },
      { "t=" .. now .. "," .. "v1=" .. ("0"):rep(64), false },
      { "t=\194\178,v1=" .. sig, false },          -- t=² (no ASCII digit)
      { "t=" .. now .. ",v1=\195\169", false },     -- v1=é
      { json.null, false },                            -- no header
      { "", false }, { "t=,v1=", false }, { ",,,=,=", false },
      { good .. ",t=" .. now, false },                 -- two timestamps
      { good:gsub("t=", "t=0"), false },               -- t as sent
      { "t=0" .. now .. ",v1=" .. crypto_hex_hmac("0" .. now), true },
      -- 12 digits at most: t=000<now> (13) is refused, though signed
      { "t=00" .. now .. ",v1=" .. crypto_hex_hmac("00" .. now), true },
      { "t=000" .. now .. ",v1=" .. crypto_hex_hmac("000" .. now), false },
    }
    local dir = servers.mktemp()
    local input = {}
    for i, c in ipairs(cases) do input[i] = c[1] end
    local jf = assert(io.open(dir .. "/cases.json", "wb"))
    jf:write(json.encode({ secret = secret, body = body, headers = input }))
    jf:close()
    local pf = assert(io.open(dir .. "/run.py", "wb"))
    pf:write(snippet, [[

import json, sys
cases = json.load(open(sys.argv[1], encoding="utf-8"))
for h in cases["headers"]:
    try:
        print(verify(cases["secret"].encode(), h, cases["body"].encode()))
    except Exception as e:
        print("raised " + type(e).__name__)
# a rotation: a list of secrets, any may match (the first case is good)
s, h, b = cases["secret"].encode(), cases["headers"][0], cases["body"].encode()
print(verify([b"other", s], h, b), verify([b"other"], h, b))
]])
    pf:close()
    local p = assert(io.popen("python3 " .. dir .. "/run.py " .. dir
                              .. "/cases.json 2>&1"))
    local out = p:read("*a")
    p:close()
    servers.sh("rm -rf " .. dir)
    local i = 0
    for line in out:gmatch("[^\n]+") do
      i = i + 1
      if i > #cases then
        assert.equal("True False", line, "a list of secrets")
      else
        assert.equal(tostring(cases[i][2]):gsub("^%l", string.upper), line,
                     "case " .. i .. ": " .. tostring(cases[i][1]))
      end
    end
    assert.equal(#cases + 1, i, out)
    -- and verify_webhook gives each case the same answer
    for k, c in ipairs(cases) do
      local h = c[1] ~= json.null and c[1] or nil
      assert.equal(c[2], outbox.verify_webhook(secret, h, body) == true,
                   "verify_webhook, case " .. k)
    end
  end)
end)

describe("outbox.backoff", function()
  it("is full jitter under min(cap, base * 2^(n-1))", function()
    local top = function() return 0.999999 end
    local half = function() return 0.5 end
    local expected = { 1, 2, 4, 8, 16, 32, 60, 60 }
    for a, ceiling in ipairs(expected) do
      local d = outbox.backoff(a, 1, 60, top)
      assert.truthy(d < ceiling and d > ceiling * 0.999, a .. ": " .. d)
      assert.equal(ceiling / 2, outbox.backoff(a, 1, 60, half))
      assert.equal(0, outbox.backoff(a, 1, 60, function() return 0 end))
    end
    for _ = 1, 200 do
      local d = outbox.backoff(3, 0.5, 100)
      assert.truthy(d >= 0 and d < 2)
    end
  end)
end)

for engine, open in pairs(stores) do
  describe("paygate.outbox on " .. engine, function()
    it("enqueue is rolled back with its transaction", function()
      local db = open()
      local ok, err = db:transaction(function(tx)
        assert(outbox.enqueue(tx, { subject = "pay_1",
                                    type = "payment.paid" }))
        return nil, paygate.error("abort", "changed my mind")
      end)
      assert.is_nil(ok)
      assert.equal("abort", err.kind)
      -- the table made inside that transaction went with it: made again
      local id = enqueue(db, "pay_1", "payment.paid", { amount = 100 })
      ok, err = db:transaction(function(tx)
        assert(outbox.enqueue(tx, { subject = "pay_2", type = "t" }))
        error(paygate.error("abort", "again"))
      end)
      assert.is_nil(ok)
      local rows = assert(outbox.list(db))
      assert.equal(1, #rows)
      assert.equal(id, rows[1].id)
      assert.equal("pending", rows[1].state)
      assert.equal('{"amount":100}', rows[1].payload)
      -- ids grow and are never reused, even after the newest is pruned
      local id2 = enqueue(db, "pay_1", "payment.refunded")
      assert.truthy(id2 > id)
      db:close()
    end)

    -- what the backlog gauges of /metrics are set from (the monitoring
    -- trial: a receiver down piled events up, and nothing said so)
    it("backlog: the events pending, the oldest one's created_at, the dead"
       .. " ones", function()
      local db = open()
      assert(outbox.setup(db))
      assert.same({ pending = 0, dead = 0 }, assert(outbox.backlog(db)))
      local a = enqueue(db, "pay_a", "t")
      local b = enqueue(db, "pay_b", "t")
      enqueue(db, "pay_a", "t2")                 -- behind pay_a's head
      local got = assert(outbox.backlog(db))
      assert.equal(3, got.pending)
      assert.equal(0, got.dead)
      assert.equal(row(db, a).created_at, got.oldest_at)
      -- a's head refused for good, b's retried later: one dead, two left
      local rec = recorder()
      rec.fail[a], rec.fail[b] = "fatal", 1
      local d = outbox.dispatcher(db, { sinks = { rec.sink },
                                        now = new_clock().now })
      assert.equal(2, d:step())
      got = assert(outbox.backlog(db))
      assert.equal(2, got.pending)              -- b (retrying), a's next
      assert.equal(1, got.dead)
      assert.equal(row(db, b).created_at, got.oldest_at)
      -- replayed: pending again, the oldest, with its own created_at
      assert.equal(1, assert(outbox.replay(db, a)))
      got = assert(outbox.backlog(db))
      assert.same({ 3, 0, row(db, a).created_at },
                  { got.pending, got.dead, got.oldest_at })
      d:stop()
      db:close()
    end)

    it("a table an older paygate made gains prior_attempts in place: its"
       .. " events are enqueued, delivered and replayed", function()
      local db = open()
      -- the table as paygate made it before prior_attempts, one event in
      assert(db:exec_script("CREATE TABLE paygate_outbox (id "
        .. (engine == "postgres" and "BIGSERIAL" or "INTEGER") .. " PRIMARY"
        .. " KEY" .. (engine == "postgres" and "" or " AUTOINCREMENT")
        .. ", subject TEXT NOT NULL, type TEXT NOT NULL, payload TEXT NOT"
        .. " NULL, shard INTEGER NOT NULL, state TEXT NOT NULL DEFAULT"
        .. " 'pending', attempts INTEGER NOT NULL DEFAULT 0, next_at DOUBLE"
        .. " PRECISION NOT NULL, created_at DOUBLE PRECISION NOT NULL,"
        .. " delivered_at DOUBLE PRECISION, sinks_done TEXT NOT NULL"
        .. " DEFAULT '', last_error TEXT)"))
      assert(db:exec("INSERT INTO paygate_outbox (subject, type, payload,"
        .. " shard, next_at, created_at, attempts) VALUES ('pay_old', 't',"
        .. " '{}', $1, $2, $2, 2)", { outbox.shard_of("pay_old"),
                                      core.time() }))
      -- an enqueue into it leaves the table as it is (no ALTER under the
      -- caller's transaction)
      local id = enqueue(db, "pay_new", "t")
      assert.is_nil(db:query("SELECT prior_attempts FROM paygate_outbox"))
      assert(outbox.setup(db))
      local rows = assert(outbox.list(db))
      assert.same({ 0, 0 }, { rows[1].prior_attempts,
                              rows[2].prior_attempts })
      local rec = recorder()
      local clock = new_clock()
      local d = outbox.dispatcher(db, { sinks = { rec.sink },
                                        now = clock.now })
      assert.equal(2, d:step())
      local attempt = {}
      for _, e in ipairs(rec.got) do attempt[e.subject] = e.attempt end
      assert.same({ pay_old = 3, pay_new = 1 }, attempt)
      assert.equal(1, assert(outbox.replay(db, id)))
      clock.advance(1)
      assert.equal(1, d:step())
      assert.equal(2, rec.got[3].attempt)
      d:stop()
      db:close()
    end)

    it("records a round's outcomes in a few write jobs, not one each"
       .. " (nor one per shard)", function()
      local db = open()
      local rec = recorder()
      local d = outbox.dispatcher(db, { sinks = { rec.sink },
                                        partitions = 4 })
      assert.equal(0, d:step())       -- tables made, the shards' leases taken
      local ids = {}
      for i = 1, 40 do
        ids[i] = enqueue(db, "pay_batch" .. i, "payment.paid")
      end
      local before = db:stats().writes
      assert.equal(40, d:step())
      local after = db:stats().writes
      assert.equal(40, d.stats.delivered)
      for _, id in ipairs(ids) do
        assert.equal("delivered", row(db, id).state)
      end
      if before then                  -- SQLite counts its write jobs
        -- the first delivery's outcome alone, the other 39 (queued
        -- while it was written) in one job
        assert.is_true(after - before <= 2, (after - before) .. " jobs")
      end
      d:stop()
      db:close()
    end)

    it("delivers in order per subject: a failing head holds back later"
       .. " events of its subject only", function()
      local db = open()
      local clock = new_clock()
      local rec = recorder()
      local d = outbox.dispatcher(db, { sinks = { rec.sink }, now = clock.now,
                                        random = function() return 0.5 end,
                                        backoff_base = 10 })
      local a1 = enqueue(db, "pay_a", "payment.paid")
      local a2 = enqueue(db, "pay_a", "payment.refunded")
      local b1 = enqueue(db, "pay_b", "payment.paid")
      rec.fail[a1] = 2
      assert.equal(2, d:step())           -- heads: a1 (fails), b1
      assert.same({ b1 }, rec.ids())
      assert.equal(1, row(db, a1).attempts)
      assert.equal(0, d:step())           -- a1 not due, a2 waits behind it
      clock.advance(4.9)                  -- backoff: 0.5 * 10 * 2^0 = 5 s
      assert.equal(0, d:step())
      clock.advance(0.2)
      assert.equal(1, d:step())           -- a1 fails again
      assert.same({ b1 }, rec.ids())
      clock.advance(10.1)                 -- 0.5 * 10 * 2^1
      assert.equal(1, d:step())           -- a1 delivered
      assert.equal(1, d:step())           -- then a2
      assert.same({ b1, a1, a2 }, rec.ids())
      local r = row(db, a1)
      assert.equal("delivered", r.state)
      assert.equal(3, r.attempts)
      assert.equal(3, rec.got[2].attempt)
      assert.same({ subject = "pay_a" }, rec.got[2].payload)
      assert.equal(3, d.stats.delivered)
      assert.equal(2, d.stats.failed)
      d:stop()
      db:close()
    end)

    it("records the backoff schedule in next_at", function()
      local db = open()
      local clock = new_clock()
      local d = outbox.dispatcher(db, {
        sinks = { function() return nil, "down" end }, now = clock.now,
        random = function() return 0.5 end, backoff_base = 2,
        backoff_cap = 10, max_attempts = 10 })
      local id = enqueue(db, "pay_s", "payment.paid")
      local want = { 1, 2, 4, 5, 5 }     -- 0.5 * min(10, 2 * 2^(n-1))
      for a, delay in ipairs(want) do
        assert.equal(1, d:step())
        local r = row(db, id)
        assert.equal(a, r.attempts)
        assert.near(clock.t + delay, r.next_at, 1e-6)
        assert.equal("sink1: down", r.last_error)
        clock.advance(delay + 0.01)
      end
      d:stop()
      db:close()
    end)

    it("dead-letters after max_attempts (or at once when not retryable),"
       .. " then lets the subject go on; replay delivers it", function()
      local db = open()
      local clock = new_clock()
      local rec = recorder()
      local d = outbox.dispatcher(db, { sinks = { rec.sink }, now = clock.now,
                                        max_attempts = 3, backoff_base = 1 })
      local a1 = enqueue(db, "pay_a", "payment.paid")
      local a2 = enqueue(db, "pay_a", "payment.refunded")
      local c1 = enqueue(db, "pay_c", "payment.paid")
      rec.fail[a1] = 99
      rec.fail[c1] = "fatal"
      for _ = 1, 3 do
        d:step()
        clock.advance(5)
      end
      assert.same({}, rec.ids())
      assert.equal(1, d:step())           -- a1 is dead: a2 is the head
      assert.equal("dead", row(db, a1).state)
      assert.equal(3, row(db, a1).attempts)
      assert.equal("dead", row(db, c1).state)
      assert.equal(1, row(db, c1).attempts)
      assert.truthy(row(db, c1).last_error:find("rejected", 1, true))
      assert.equal(2, d.stats.dead)
      -- a2 went once a1 was dead
      assert.same({ a2 }, rec.ids())
      -- replay one by id, the rest by filter
      rec.fail[a1], rec.fail[c1] = nil, nil
      assert.equal(1, assert(outbox.replay(db, a1)))
      local r = row(db, a1)
      assert.equal("pending", r.state)
      assert.equal(0, r.attempts)            -- max_attempts afresh
      assert.equal(3, r.prior_attempts)      -- the ones before, kept
      assert.equal(0, assert(outbox.replay(db, a1)))   -- already pending
      assert.equal(1, assert(outbox.replay(db, { subject = "pay_c" })))
      clock.advance(1)
      assert.equal(2, d:step())
      assert.same(sorted({ a2, a1, c1 }), sorted(rec.ids()))
      assert.equal("delivered", row(db, a1).state)
      -- each delivery's attempt counts on across the replay: a receiver
      -- tells a replayed event from a first delivery (was: 1 again)
      local attempt = {}
      for _, e in ipairs(rec.got) do attempt[e.id] = e.attempt end
      assert.same({ [a2] = 1, [a1] = 4, [c1] = 2 }, attempt)
      -- a delivered event is replayed only when asked for by id or state
      assert.equal(0, assert(outbox.replay(db, { subject = "pay_a" })))
      assert.equal(2, assert(outbox.replay(db, { subject = "pay_a",
                                                 state = "delivered" })))
      clock.advance(1)
      assert.equal(1, d:step())
      assert.equal(1, d:step())
      local got = rec.ids()
      assert.same({ a1, a2 }, { got[4], got[5] })
      assert.same({ 5, 2 }, { rec.got[4].attempt, rec.got[5].attempt })
      d:stop()
      db:close()
    end)

    it("says in its dead letter line why: not retryable at the first"
       .. " attempt, or max_attempts reached", function()
      local db = open()
      local clock = new_clock()
      local rec = recorder()
      -- (a second sink that takes everything: not among the line's sinks)
      local d = outbox.dispatcher(db, { sinks = { rec.sink,
                                          { name = "ok", deliver = function()
                                          end } }, now = clock.now,
                                        max_attempts = 2, backoff_base = 1 })
      local a = enqueue(db, "pay_a", "payment.paid")
      local c = enqueue(db, "pay_c", "payment.paid")
      rec.fail[a] = 99
      rec.fail[c] = "fatal"
      local lines = {}
      local warn = paygate.log.warn
      paygate.log.warn = function(msg, fields)
        -- (the id a string, as every log line's id: one type per field)
        if msg == "outbox: dead letter" then
          assert.is_string(fields.id)
          lines[tonumber(fields.id)] = fields
        end
      end
      local ok, err = pcall(function()
        for _ = 1, 2 do
          d:step()
          clock.advance(5)
        end
      end)
      paygate.log.warn = warn
      assert(ok, tostring(err))
      assert.equal("dead", row(db, a).state)
      assert.equal("dead", row(db, c).state)
      assert.same({ "not_retryable", 1, 2 }, { lines[c].reason,
        lines[c].attempts, lines[c].max_attempts })
      -- what to do instead, said where the trap shows (only there)
      assert.matches("{ retryable = true }", lines[c].hint, 1, true)
      assert.is_nil(lines[a].hint)
      assert.truthy(lines[c].error:find("rejected", 1, true))
      assert.same({ "max_attempts", 2, 2 }, { lines[a].reason,
        lines[a].attempts, lines[a].max_attempts })
      -- the payment it was about, and the sink it did not reach, so an
      -- operator goes from the line to the payment (was: neither)
      assert.same({ "pay_a", "payment.paid", "rec" }, { lines[a].subject,
        lines[a].type, lines[a].sinks })
      assert.same({ "pay_c", "rec" }, { lines[c].subject, lines[c].sinks })
      d:stop()
      db:close()
    end)

    it("retries only the sinks that failed; hooks are keyed by type",
       function()
      local db = open()
      local clock = new_clock()
      local rec = recorder("webhook")
      local paid, refunded, raised = {}, {}, 0
      local hooks = outbox.hooks{
        ["payment.paid"] = function(e)
          if raised == 0 then
            raised = 1
            error("hook bug")
          end
          paid[#paid + 1] = e.id
        end,
        ["payment.refunded"] = function(e) refunded[#refunded + 1] = e.id end,
      }
      local d = outbox.dispatcher(db, { sinks = { rec.sink, hooks },
                                        now = clock.now,
                                        random = function() return 0 end })
      local p = enqueue(db, "pay_h", "payment.paid")
      local r = enqueue(db, "pay_h", "payment.refunded")
      local x = enqueue(db, "pay_x", "payment.closed")  -- no hook: fine
      assert.equal(2, d:step())
      assert.same(sorted({ p, x }), sorted(rec.ids()))
      assert.same({}, paid)
      local row1 = row(db, p)
      assert.equal("pending", row1.state)
      assert.equal("webhook", row1.sinks_done)
      assert.truthy(row1.last_error:find("hook bug", 1, true))
      d:step()
      d:step()
      assert.same({ p }, paid)
      assert.same({ r }, refunded)
      assert.same(sorted({ p, x, r }), sorted(rec.ids())) -- p: webhook once
      assert.equal("hooks,webhook", row(db, p).sinks_done)
      d:stop()
      db:close()
    end)

    it("logs a hook that raises with its traceback, once per failed"
       .. " attempt; a hook returning nil, err has no raise line", function()
      local db = open()
      local clock = new_clock()
      -- the raise is two calls deep in the hook, as a bug in a helper is
      local function fulfil_helper(e)
        if e.payload.boom then error("fulfil bug") end
        return nil, paygate.error("busy", "later", { retryable = true })
      end
      local function on_paid(e)
        local r, herr = fulfil_helper(e)
        return r, herr
      end
      local d = outbox.dispatcher(db, { sinks = { outbox.hooks{
                                          ["payment.paid"] = on_paid } },
                                        now = clock.now,
                                        random = function() return 0 end })
      local a = enqueue(db, "pay_r", "payment.paid", { boom = true })
      local b = enqueue(db, "pay_s", "payment.paid")
      local lines = {}
      local warn = paygate.log.warn
      paygate.log.warn = function(msg, fields)
        if tostring(msg):find("^outbox: sink hooks raised") then
          lines[#lines + 1] = fields
        end
      end
      local ok, err = pcall(function()
        d:step()
        clock.advance(5)
        d:step()
      end)
      paygate.log.warn = warn
      assert(ok, tostring(err))
      -- was: nothing in the log (the message alone in last_error)
      assert.equal(2, #lines)           -- a's two attempts; b's none
      assert.same({ tostring(a), "payment.paid", "pay_r", 1, "hooks" },
        { lines[1].id, lines[1].type, lines[1].subject, lines[1].attempt,
          lines[1].sink })
      assert.equal(2, lines[2].attempt)
      local tb = lines[1].error
      assert.truthy(tb:find("fulfil bug", 1, true), tb)
      assert.truthy(tb:find("stack traceback:", 1, true), tb)
      assert.truthy(tb:find("fulfil_helper", 1, true), tb)
      -- the rows as before: pending, the message in last_error
      assert.equal("pending", row(db, a).state)
      assert.truthy(row(db, a).last_error:find("fulfil bug", 1, true))
      assert.equal("pending", row(db, b).state)
      d:stop()
      db:close()
    end)

    it("logs a hook (any sink) that returns its failure, once per failed"
       .. " attempt, bounded by the log limiter", function()
      local db = open()
      local clock = new_clock()
      local function on_paid()
        return nil, paygate.error("busy", "fulfilment later",
                                  { retryable = true })
      end
      local function on_flood() return false end
      local plain = function(e)       -- a plain function sink: a hook too
        if e.subject == "pay_p" then
          return nil, paygate.error("plain_busy", "not now",
                                    { retryable = true })
        end
      end
      -- (the limiter's key is the sink and the hook: a name of its own
      -- per engine, so that each run starts with none of its lines)
      local hname = "hooks_" .. engine
      -- an app's own sink table: logged the same way, and a field of its
      -- own (here a URL with a password) is not
      local rec = recorder("own_" .. engine)
      rec.sink.host = "redis://:own-pw@10.0.0.1"
      local d = outbox.dispatcher(db, { sinks = { outbox.hooks({
                                          ["payment.paid"] = on_paid,
                                          ["payment.flood"] = on_flood },
                                          { name = hname }), plain,
                                          rec.sink },
                                        now = clock.now,
                                        random = function() return 0 end })
      local a = enqueue(db, "pay_p", "payment.paid")
      rec.fail[a] = 1
      local lines = {}
      local warn = paygate.log.warn
      paygate.log.warn = function(msg, fields)
        if msg == "outbox: a sink failed (the attempt failed)" then
          lines[#lines + 1] = fields
        end
      end
      local t0, t1
      local ok, err = pcall(function()
        d:step()
        clock.advance(5)
        d:step()
        -- a flood: every event of a backlog failing at once
        for i = 1, 14 do
          enqueue(db, "pay_f" .. i, "payment.flood")
        end
        clock.advance(60)
        t0 = core.now()
        d:step()
        t1 = core.now()
      end)
      paygate.log.warn = warn
      assert(ok, tostring(err))
      -- was: no line (the error in last_error only, and the failed count)
      local by, flood = {}, 0
      for _, l in ipairs(lines) do
        by[l.sink .. "#" .. l.id .. "#" .. l.attempt] = l
        if l.type == "payment.flood" then
          flood = flood + 1
          assert.equal(hname, l.sink)
          assert.matches("returned false", l.error)
        end
      end
      local h1 = by[hname .. "#" .. tostring(a) .. "#1"]
      assert.truthy(h1, "no line for the hook's first attempt")
      assert.same({ "payment.paid", "pay_p", 1, "busy: fulfilment later" },
        { h1.type, h1.subject, h1.attempt, h1.error })
      -- the hook named by where it is defined (this file, its line)
      assert.matches("outbox_spec%.lua:%d+$", h1.hook)
      assert.truthy(by[hname .. "#" .. tostring(a) .. "#2"])
      local p1 = by["sink2#" .. tostring(a) .. "#1"]
      assert.truthy(p1, "no line for the plain function sink")
      assert.equal("plain_busy: not now", p1.error)
      assert.matches("outbox_spec%.lua:%d+$", p1.hook)
      local r1 = by[rec.name .. "#" .. tostring(a) .. "#1"]
      assert.truthy(r1, "no line for the app's own sink")
      assert.same({ "payment.paid", "pay_p", 1, "down: try later" },
        { r1.type, r1.subject, r1.attempt, r1.error })
      assert.is_nil(r1.host)
      assert.is_nil(r1.hook)
      assert.is_nil(by[rec.name .. "#" .. tostring(a) .. "#2"])
      -- the flood: 14 attempts failed, 10 lines (the limiter's default a
      -- minute) for that hook (more if the step crossed a minute's end)
      if math.floor(t0 / 60) == math.floor(t1 / 60) then
        assert.equal(10, flood)
      else
        assert.is_true(flood >= 10 and flood <= 14, tostring(flood))
      end
      d:stop()
      db:close()
    end)

    it("an event no sink takes (settled) is written delivered: never"
       .. " dispatched, still listed and replayable", function()
      local db = open()
      local clock = new_clock()
      local rec = recorder("webhook")
      rec.sink.types = { ["payment.paid"] = true }
      local hooks = outbox.hooks{ ["refund.succeeded"] = function() end }
      local d = outbox.dispatcher(db, { sinks = { rec.sink, hooks },
                                        now = clock.now })
      -- wants: a webhook's types, a hooks sink's hooked types
      assert.is_true(d:wants("payment.paid"))
      assert.is_true(d:wants("refund.succeeded"))
      assert.is_false(d:wants("payment.closed"))
      assert.is_true(outbox.dispatcher(db, { sinks = { function() end },
        now = clock.now }):wants("payment.closed"))   -- takes every type
      assert.has_error(function() d:wants(7) end)
      assert.has_error(function()
        outbox.statement(db, { subject = "s", type = "t", settled = "yes" })
      end)
      local id = assert(db:transaction(function(tx)
        return outbox.enqueue(tx, { subject = "pay_s", type = "payment.closed",
                                    settled = not d:wants("payment.closed"),
                                    at = clock.t })
      end))
      -- and as a db:atomic statement
      local res = assert(db:atomic({ outbox.statement(db, {
        subject = "pay_t", type = "payment.closed", settled = true }) }))
      local id2 = res[1].last_id
      local r1, r2 = row(db, id), row(db, id2)
      assert.equal("delivered", r1.state)
      assert.equal(0, r1.attempts)
      -- delivered when written (at: its created_at / next_at)
      assert.equal(clock.t, r1.created_at)
      assert.truthy(math.abs(r1.delivered_at - core.time()) < 60)
      assert.equal("", r1.sinks_done)
      assert.equal("delivered", r2.state)
      -- a settled event holds nothing back: the subject's next one goes
      local p = enqueue(db, "pay_s", "payment.paid")
      assert.equal(1, d:step())
      assert.same({ p }, rec.ids())
      -- listed, and replayable to the sinks (here: one now takes it)
      assert.equal(2, #assert(outbox.list(db, { state = "delivered",
                                                 type = "payment.closed" })))
      rec.sink.types["payment.closed"] = true
      assert.equal(1, assert(outbox.replay(db, { id = id, state = "any" })))
      clock.advance(1)
      assert.equal(1, d:step())
      assert.same({ p, id }, rec.ids())
      d:stop()
      db:close()
    end)

    it("prunes delivered rows past keep_days in batches, nothing else",
       function()
      local db = open()
      local clock = new_clock()
      local d = outbox.dispatcher(db, { sinks = { function() end },
                                        now = clock.now })
      for i = 1, 7 do
        enqueue(db, "pay_" .. i, "payment.paid")
      end
      local dead = enqueue(db, "pay_dead", "payment.paid")
      assert(db:exec("UPDATE paygate_outbox SET state = 'dead' WHERE id = $1",
                     { dead }))
      assert.equal(7, d:step())
      local fresh = enqueue(db, "pay_new", "payment.paid")
      assert.equal(0, assert(outbox.prune(db, { keep_days = 1,
                                                now = clock.t + 3600 })))
      local n1 = assert(outbox.prune(db, { keep_days = 1, batch = 3,
                                           max_batches = 1,
                                           now = clock.t + 86401 }))
      assert.equal(3, n1)
      local n2 = assert(outbox.prune(db, { keep_days = 1, batch = 3,
                                           now = clock.t + 86401 }))
      assert.equal(4, n2)
      local left = assert(outbox.list(db))
      assert.equal(2, #left)
      assert.equal(dead, left[1].id)
      assert.equal(fresh, left[2].id)
      d:stop()
      db:close()
    end)

    it("a dispatcher whose lease expired mid-delivery cannot mark the row"
       .. " (fencing); the new holder delivers and records it", function()
      local db = open()
      local release = false
      local entered = false
      local slow = { name = "slow", deliver = function()
        entered = true
        wait_until(function() return release end, 20, "release")
      end }
      local fast = recorder("slow")   -- same sink name: same destination
      -- a's lease must still be live at b's first step below, after a's
      -- acquisition, its read and b's attempt (commits, fsync'd on a
      -- loaded machine), so it is not short: its expiry is played below
      local a = outbox.dispatcher(db, { sinks = { slow }, partitions = 1,
                                        lease_ttl = 5 })
      local b = outbox.dispatcher(db, { sinks = { fast.sink }, partitions = 1,
                                        lease_ttl = 5 })
      local id = enqueue(db, "pay_f", "payment.paid")
      local ta = paygate.spawn(function() return a:step() end)
      wait_until(function() return entered end, 10, "a to start delivering")
      local la = a.leases[0]
      assert.truthy(la)
      -- b cannot take the shard while a's lease is live
      assert.equal(0, b:step())
      -- a's process stalls (its loop runs nothing) past its lease: played
      -- by expiring the lease in the store, since a live dispatcher keeps
      -- its leases alive while it delivers
      assert(db:exec("UPDATE paygate_leases SET expires_at = 0 WHERE name"
                     .. " = $1", { la.key }))
      assert.equal(1, b:step())
      assert.same({ id }, fast.ids())
      release = true
      assert.equal(1, ta:wait())
      assert.equal(1, a.stats.fenced)
      assert.equal(0, a.stats.delivered)
      assert.is_nil(a.leases[0])          -- a dropped the stale lease
      local r = row(db, id)
      assert.equal("delivered", r.state)
      assert.equal(1, r.attempts)          -- b's attempt only
      local ok, err = db:transaction(function(tx)
        return lease.check(tx, la.key, la.token)
      end)
      assert.is_nil(ok)
      assert.equal("fenced", err.kind)
      -- the same check as the first statement of a write job: the stale
      -- token writes nothing, the current one goes through
      local bump = { "UPDATE paygate_outbox SET attempts = attempts + 10"
                     .. " WHERE id = $1", { id } }
      local res, gerr = db:atomic({ lease.guard(db, la.key, la.token), bump })
      assert.is_nil(res)
      assert.is_true(lease.fenced(gerr))
      assert.equal("expect", gerr.reason)
      -- only the guard's row count says fenced: not another conflict
      -- that happens to carry the name
      assert.is_false(lease.fenced({ kind = "conflict", name = "lease",
                                     reason = "unique" }))
      assert.is_false(lease.fenced({ kind = "conflict", name = "other",
                                     reason = "expect" }))
      assert.equal(1, row(db, id).attempts)
      local lb = assert(b.leases[0])
      assert.truthy(db:atomic({ lease.guard(db, lb.key, lb.token), bump }))
      assert.equal(11, row(db, id).attempts)
      b:stop()
      a:stop()
      db:close()
    end)

    it("a dispatcher at its cap still serves the shards nobody holds, and"
       .. " hands them to a later one", function()
      local db = open()
      local rec = recorder()
      local function new()
        return outbox.dispatcher(db, { sinks = { rec.sink }, interval = 0.02,
                                       partitions = 4, max_partitions = 2,
                                       lease_ttl = 0.6 }):start()
      end
      local a = new()
      for i = 1, 12 do
        enqueue(db, "pay_" .. i, "payment.paid")
      end
      wait_until(function() return #rec.got == 12 end, 20, "12 deliveries")
      wait_until(function() return count(a.leases) == 4 end, 20,
                 "a to hold every shard")
      local b = new()
      wait_until(function()
        return count(a.leases) == 2 and count(b.leases) == 2
      end, 20, "two shards each")
      enqueue(db, "pay_late", "payment.paid")
      wait_until(function() return #rec.got == 13 end, 20, "13 deliveries")
      a:stop()
      b:stop()
      db:close()
    end)

    -- A dispatcher holding every shard reads their heads in one query
    -- (the oldest first, batch x shards of them). A backlog of one shard
    -- (1,000 subjects, to a slow sink) filled that read: another shard's
    -- event, newer, was left out of every round until the backlog was
    -- down to batch x shards, however long that took. Each held shard
    -- gets its batch every round, and the round takes the shards in turn.
    it("one dispatcher holding every shard serves each of them every round:"
       .. " a backlog in one does not hold back another's event", function()
      local db = open()
      local got, slow = {}, {}
      local sink = { name = "slow", deliver = function(event)
        if slow[event.subject] then paygate.sleep(0.002) end
        got[#got + 1] = event.subject
      end }
      local d = outbox.dispatcher(db, { sinks = { sink }, partitions = 2,
                                        batch = 5, concurrency = 1 })
      assert.equal(0, d:step())            -- both shards' leases taken
      assert.equal(2, count(d.leases))
      local function subjects(shard, k)
        local t, i = {}, 0
        while #t < k do
          i = i + 1
          local subj = "pay_" .. shard .. "_" .. i
          if outbox.shard_of(subj) % 2 == shard then t[#t + 1] = subj end
        end
        return t
      end
      local backlog = subjects(0, 1000)
      assert(db:transaction(function(tx)
        for _, subj in ipairs(backlog) do
          slow[subj] = true
          assert(outbox.enqueue(tx, { subject = subj, type = "t" }))
        end
        return true
      end))
      local other = subjects(1, 1)[1]
      local id = enqueue(db, other, "payment.paid")
      -- the first round: the backlog's batch, and the other shard's event
      -- second (the shards in turn), not after the backlog
      assert.equal(6, d:step())
      assert.equal(6, #got)
      assert.equal(other, got[2])
      assert.equal("delivered", row(db, id).state)
      -- the backlog goes on, a batch a round, in id order
      assert.equal(5, d:step())
      assert.same({ backlog[6], backlog[7], backlog[8], backlog[9],
                    backlog[10] }, { unpack(got, 7, 11) })
      d:stop()
      db:close()
    end)

    it("stop() abandons a delivery in flight (the row stays pending) and"
       .. " hands the shards over at once", function()
      local db = open()
      local entered = false
      local stuck = { name = "s", deliver = function()
        entered = true
        paygate.sleep(60)
      end }
      local d = outbox.dispatcher(db, { sinks = { stuck }, interval = 0.02,
                                        partitions = 2 }):start()
      local id = enqueue(db, "pay_stop", "payment.paid")
      wait_until(function() return entered end, 10, "the delivery")
      d:stop()
      assert.same({}, d.leases)
      local r = row(db, id)
      assert.equal("pending", r.state)
      assert.equal(0, r.attempts)
      local rec = recorder("s")
      local d2 = outbox.dispatcher(db, { sinks = { rec.sink },
                                         partitions = 2 })
      assert.equal(1, d2:step())           -- no wait for the old leases
      assert.same({ id }, rec.ids())
      d2:stop()
      db:close()
    end)

    it("a hook that never returns fails its attempt after the hook timeout"
       .. " and is cancelled; other events are still delivered", function()
      local db = open()
      local gone, refunded = {}, {}
      local hooks = outbox.hooks({
        ["payment.paid"] = function()
          -- set once this coroutine is abandoned (cancelled) or ends
          local ev = paygate.event()
          ev:set_on_abandon()
          gone[#gone + 1] = ev
          paygate.event():wait()         -- never set: hangs
        end,
        ["payment.refunded"] = function(e) refunded[#refunded + 1] = e.id end,
      }, { timeout = 0.2 })
      local d = outbox.dispatcher(db, { sinks = { hooks }, interval = 0.02,
                                        random = function() return 0 end,
                                        backoff_base = 0.01 }):start()
      local stuck = enqueue(db, "pay_hang", "payment.paid")
      local other = enqueue(db, "pay_ok", "payment.refunded")
      -- the hung attempt counts as failed and is retried (backoff 0 here),
      -- well before lease_ttl_max; the other subject goes on meanwhile
      wait_until(function()
        local r = row(db, stuck)
        return r.attempts >= 2 and #refunded == 1
      end, 10, "the hung hook's attempts to fail and the other delivery")
      local r = row(db, stuck)
      assert.equal("pending", r.state)
      assert.truthy(r.last_error:find("hooks: timeout: no answer within 0.2"
                                      .. " s", 1, true), r.last_error)
      assert.same({ other }, refunded)
      assert.equal("delivered", row(db, other).state)
      -- every hung hook's coroutine was cancelled, not left waiting (the
      -- one of an attempt in flight now by d:stop())
      d:stop()
      assert.truthy(#gone >= 2)
      wait_until(function()
        for _, ev in ipairs(gone) do
          if ev:count() == 0 then return false end
        end
        return true
      end, 5, "the hung hooks to be cancelled")
      assert.has_error(function()
        outbox.hooks({}, { timeout = 0 })
      end)
      db:close()
    end)

    -- `return nil, er` (err misspelt: a nil global) returned nil, nil,
    -- which was read as success: the event was marked delivered, the
    -- hook's work never done, and nothing said so.
    it("a hook returning nil and a nil error fails its attempt (retried),"
       .. " last_error naming the hook's file and line", function()
      local db = open()
      local line = debug.getinfo(1, "l").currentline + 2
      local hooks = outbox.hooks{
        ["payment.paid"] = function()
          local err = "not stored"
          return nil, er                 -- the typo: a nil global
        end,
        ["payment.closed"] = function() end,            -- nothing: done
        ["payment.failed"] = function() return nil end, -- one nil: done
      }
      local d = outbox.dispatcher(db, { sinks = { hooks } })
      local id = enqueue(db, "pay_nilnil", "payment.paid")
      local closed = enqueue(db, "pay_closed", "payment.closed")
      local failed = enqueue(db, "pay_failed", "payment.failed")
      d:step()
      d:stop()
      local r = row(db, id)
      assert.equal("pending", r.state)              -- retried, not lost
      assert.equal(1, r.attempts)
      assert.truthy(r.last_error:find("hooks: no_error: the hook for"
        .. " payment.paid (", 1, true), r.last_error)
      assert.truthy(r.last_error:find("outbox_spec.lua:" .. line
        .. ") returned nil and a nil error", 1, true), r.last_error)
      assert.equal("delivered", row(db, closed).state)
      assert.equal("delivered", row(db, failed).state)
      db:close()
    end)

    it("a hook returning false fails its attempt, last_error naming the"
       .. " hook's file and line", function()
      -- was: last_error "hooks: returned false", no hook named
      local db = open()
      local line = debug.getinfo(1, "l").currentline + 2
      local hooks = outbox.hooks{
        ["payment.paid"] = function()
          return false
        end,
      }
      local d = outbox.dispatcher(db, { sinks = { hooks } })
      local id = enqueue(db, "pay_false", "payment.paid")
      d:step()
      d:stop()
      local r = row(db, id)
      assert.equal("pending", r.state)
      assert.equal(1, r.attempts)
      assert.truthy(r.last_error:find("hooks: hook_failed: the hook for"
        .. " payment.paid (", 1, true), r.last_error)
      assert.truthy(r.last_error:find("outbox_spec.lua:" .. line
        .. ") returned false", 1, true), r.last_error)
      db:close()
    end)

    -- A hook cancelled at its timeout said only "timeout: no answer
    -- within 1 s (cancelled)" (in last_error, and at the dead letter):
    -- nothing told which call of the hook hung. Each such attempt is now
    -- logged with the hook's traceback where it waited, and last_error
    -- names that line.
    it("a hook cancelled at its timeout is logged with where it waited,"
       .. " and last_error names that line", function()
      local db = open()
      local line
      local hooks = outbox.hooks({
        ["payment.paid"] = function()
          line = debug.getinfo(1, "l").currentline + 1
          paygate.event():wait()         -- never set: hangs here
        end,
      }, { timeout = 0.2 })
      local d = outbox.dispatcher(db, { sinks = { hooks }, interval = 0.02,
                                        random = function() return 0 end,
                                        backoff_base = 0.01 })
      local lines = {}
      local warn = paygate.log.warn
      paygate.log.warn = function(msg, fields)
        if tostring(msg):find("^outbox: sink hooks timed out") then
          lines[#lines + 1] = { msg = msg, fields = fields }
        end
        return warn(msg, fields)
      end
      local id = enqueue(db, "pay_hang_at", "payment.paid")
      local ok, err = pcall(function()
        d:start()
        wait_until(function() return row(db, id).attempts >= 1 end, 10,
                   "the hung hook's first attempt to fail")
      end)
      d:stop()
      paygate.log.warn = warn
      assert(ok, tostring(err))
      local at = "outbox_spec.lua:" .. line
      local r = row(db, id)
      assert.truthy(r.last_error:find("hooks: timeout: no answer within 0.2"
        .. " s (cancelled at ", 1, true), r.last_error)
      assert.truthy(r.last_error:find(at .. ")", 1, true), r.last_error)
      assert.truthy(#lines >= 1)
      local f = lines[1].fields
      assert.truthy(lines[1].msg:find(at, 1, true), lines[1].msg)
      assert.same({ tostring(id), "payment.paid", "pay_hang_at", 1, "hooks" },
        { f.id, f.type, f.subject, f.attempt, f.sink })
      assert.truthy(f.waiting_at:find(at .. "$"), f.waiting_at)
      assert.truthy(f.error:find("stack traceback:", 1, true), f.error)
      assert.truthy(f.error:find(at, 1, true), f.error)
      db:close()
    end)

    it("a hook that runs past its timeout without yielding is logged: it"
       .. " held the worker's loop (and cannot be cancelled)", function()
      local db = open()
      local hooks = outbox.hooks({
        ["payment.paid"] = function()
          local t = core.mono() + 0.4
          while core.mono() < t do end   -- never yields
          return true
        end,
      }, { timeout = 0.1 })
      local d = outbox.dispatcher(db, { sinks = { hooks } })
      local lines = {}
      local warn = paygate.log.warn
      paygate.log.warn = function(msg, fields)
        if tostring(msg):find("^outbox: sink hooks ran") then
          lines[#lines + 1] = { msg = msg, fields = fields }
        end
        return warn(msg, fields)
      end
      local id = enqueue(db, "pay_spin", "payment.paid")
      local ok, err = pcall(d.step, d)
      d:stop()
      paygate.log.warn = warn
      assert(ok, tostring(err))
      assert.equal("delivered", row(db, id).state)   -- as it returned
      assert.equal(1, #lines)
      assert.truthy(lines[1].msg:find("without yielding, past its 0.1 s"
        .. " timeout: it blocked the worker", 1, true), lines[1].msg)
      assert.same({ tostring(id), "payment.paid", "pay_spin", "hooks" },
        { lines[1].fields.id, lines[1].fields.type, lines[1].fields.subject,
          lines[1].fields.sink })
      assert.truthy(lines[1].fields.seconds >= 0.4)
      db:close()
    end)

    it("a round larger than one write job may hold is recorded in"
       .. " several", function()
      local db = open()
      local rec = recorder()
      local d = outbox.dispatcher(db, { sinks = { rec.sink },
                                        partitions = 8, batch = 200 })
      assert.equal(0, d:step())
      assert(db:transaction(function(tx)
        for i = 1, 1400 do
          assert(outbox.enqueue(tx, { subject = "pay_big" .. i,
            type = "payment.paid", payload = { i = i } }))
        end
        return true
      end))
      -- the sink never yields: every delivery of the round is queued while
      -- the first outcome is written, then recorded in one pass
      assert.equal(1400, d:step())
      assert.equal(1400, d.stats.delivered)
      assert.equal(0, d.stats.errors)
      assert.equal(1400, #rec.got)
      local n = assert(db:query("SELECT count(*) AS n FROM paygate_outbox"
        .. " WHERE state = 'delivered' AND subject LIKE 'pay_big%'"))[1].n
      assert.equal(1400, tonumber(n))
      assert.equal(0, d:step())       -- nothing delivered twice
      d:stop()
      db:close()
    end)

    it("a failed attempt's error is stored as valid UTF-8 of at most 500"
       .. " bytes", function()
      local db = open()
      local errors = {
        pay_long = string.rep("a", 498) .. "中文",  -- a cut inside 中
        pay_bytes = "x\0y\1z\255\237\160\128中 end",  -- NUL, control,
      }                                    -- stray byte, a surrogate
      local bad = { name = "bad", deliver = function(event)
        return nil, errors[event.subject]
      end }
      local d = outbox.dispatcher(db, { sinks = { bad }, partitions = 2 })
      local long = enqueue(db, "pay_long", "payment.paid")
      local bytes = enqueue(db, "pay_bytes", "payment.paid")
      assert.equal(2, d:step())
      assert.equal(2, d.stats.failed)
      local r = row(db, long)
      assert.equal("pending", r.state)
      assert.equal(1, r.attempts)
      assert.equal("bad: " .. string.rep("a", 498), r.last_error)
      assert.equal("bad: x?y?z????中 end", row(db, bytes).last_error)
      d:stop()
      db:close()
    end)

    it("a sink error that cannot be shown (its __tostring raises or is no"
       .. " string) fails its attempt with backoff all the same", function()
      local db = open()
      local shown = { pay_raise = function() error("no text for you") end,
                      pay_table = function() return {} end }
      local bad = { name = "bad", deliver = function(event)
        return nil, setmetatable({}, { __tostring = shown[event.subject] })
      end }
      local d = outbox.dispatcher(db, { sinks = { bad }, partitions = 2 })
      local ids = { enqueue(db, "pay_raise", "payment.paid"),
                    enqueue(db, "pay_table", "payment.paid") }
      assert.equal(2, d:step())
      assert.equal(2, d.stats.failed)
      for _, id in ipairs(ids) do
        local r = row(db, id)
        assert.equal("pending", r.state)
        assert.equal(1, r.attempts)
        assert.equal("bad: (an error that cannot be shown)", r.last_error)
        assert.is_true(r.next_at > r.created_at)
      end
      d:stop()
      db:close()
    end)

    if engine == "sqlite" then
      it("an outcome whose statement fails is dropped alone; the others of"
         .. " the job are recorded", function()
        local db = open()
        local rec = recorder()
        local d = outbox.dispatcher(db, { sinks = { rec.sink },
                                          partitions = 4 })
        assert.equal(0, d:step())
        local ids = {}
        for i = 1, 20 do
          ids[i] = enqueue(db, "pay_one" .. i, "payment.paid")
        end
        -- the 10th event's row refuses its update
        assert(db:exec_script("CREATE TRIGGER refuse_update BEFORE UPDATE ON"
          .. " paygate_outbox WHEN OLD.id = " .. ids[10] .. " BEGIN"
          .. " SELECT RAISE(ABORT, 'refused'); END"))
        assert.equal(20, d:step())
        assert.equal(19, d.stats.delivered)
        assert.equal(1, d.stats.errors)
        for i, id in ipairs(ids) do
          assert.equal(i == 10 and "pending" or "delivered", row(db, id).state)
        end
        assert(db:exec_script("DROP TRIGGER refuse_update"))
        d:stop()
        db:close()
      end)
    end

    it("outcomes of two shards queued together: the fenced shard's are"
       .. " dropped, the other's kept", function()
      local db = open()
      local rec = recorder()
      local t = core.time() - 60                -- nothing due yet
      local d = outbox.dispatcher(db, { sinks = { rec.sink },
        partitions = 2, now = function() return t end })
      -- two events on each shard
      local by_shard, ids = { [0] = {}, [1] = {} }, {}
      local k = 0
      while #by_shard[0] < 2 or #by_shard[1] < 2 do
        k = k + 1
        local id = enqueue(db, "pay_g" .. k, "payment.paid")
        local sh = assert(db:query("SELECT shard FROM paygate_outbox"
                                   .. " WHERE id = $1", { id }))[1].shard % 2
        if #by_shard[sh] < 2 then
          by_shard[sh][#by_shard[sh] + 1] = id
          ids[#ids + 1] = id
        else
          assert(db:exec("DELETE FROM paygate_outbox WHERE id = $1", { id }))
        end
      end
      assert.equal(0, d:step())                 -- takes the leases
      t = core.time() + 1
      -- hold the writer: the first outcome's job waits behind this
      -- transaction while the other deliveries queue theirs; inside it,
      -- shard 1 moves on (a newer token)
      local go = false
      local holder = paygate.spawn(function()
        return db:transaction(function(tx)
          assert(tx:exec("UPDATE paygate_leases SET token = token + 1"
                         .. " WHERE name = $1", { d.leases[1].key }))
          wait_until(function() return go end, 10, "go")
          return true
        end)
      end)
      local stepper = paygate.spawn(function() return d:step() end)
      wait_until(function() return #rec.got == 4 end, 10, "4 deliveries")
      go = true
      assert(holder:wait())
      assert.equal(4, stepper:wait())
      assert.equal(2, d.stats.delivered)
      assert.equal(2, d.stats.fenced)
      assert.is_nil(d.leases[1])            -- the stale lease dropped
      for _, id in ipairs(by_shard[0]) do
        assert.equal("delivered", row(db, id).state)
      end
      for _, id in ipairs(by_shard[1]) do
        assert.equal("pending", row(db, id).state)
      end
      d:stop()
      db:close()
    end)

    it("stop() releases a lease whose grant a cancelled round never saw",
       function()
      -- The round task is cancelled wherever it waits; when that is an
      -- acquisition's commit, the lease is granted but not in d.leases.
      -- stop() releases by the dispatcher's owner id, so none is left
      -- (before, about 1 stop in 12 left one for its ttl).
      local db = open()
      local sink = { name = "s", deliver = function() end }
      local left = {}
      for i = 1, 100 do
        local d = outbox.dispatcher(db, { sinks = { sink }, name = "st" .. i,
          interval = 0.02, partitions = 32 }):start()
        wait_until(function() return next(d.leases) ~= nil end, 10,
                   "a first lease")
        d:stop()
        local rows = assert(db:query("SELECT name FROM paygate_leases"
          .. " WHERE name LIKE $1 AND expires_at > $2",
          { "outbox:st" .. i .. ":%", core.time() }))
        for _, r in ipairs(rows) do
          left[#left + 1] = r.name
        end
      end
      assert.same({}, left)
      db:close()
    end)

    it("start() runs rounds until stop(); two dispatchers share the shards",
       function()
      local db = open()
      local rec1, rec2 = recorder(), recorder()
      local d1 = outbox.dispatcher(db, { sinks = { rec1.sink },
                                         interval = 0.02, partitions = 4,
                                         max_partitions = 2 }):start()
      local d2 = outbox.dispatcher(db, { sinks = { rec2.sink },
                                         interval = 0.02, partitions = 4,
                                         max_partitions = 2 }):start()
      -- each takes free shards up to its cap (2 of 4) and, past it,
      -- probes for more: the first to run may hold every shard until its
      -- extra ones go back (lease_ttl, 30 s), then the other takes them.
      -- The events are enqueued once both hold a shard, so the split does
      -- not depend on which dispatcher a loaded machine runs first.
      local function held(d)
        local n = 0
        for _ in pairs(d.leases) do n = n + 1 end
        return n
      end
      wait_until(function() return held(d1) > 0 and held(d2) > 0 end, 45,
                 "both dispatchers holding a shard")
      -- the subjects cover every shard: whichever a dispatcher holds has
      -- events to deliver
      local covered = {}
      for k = 0, 9 do
        covered[outbox.shard_of("pay_" .. k) % 4] = true
      end
      for p = 0, 3 do assert.truthy(covered[p], "shard " .. p) end
      local ids = {}
      for i = 1, 40 do
        ids[i] = enqueue(db, "pay_" .. (i % 10), "payment.paid")
      end
      wait_until(function() return #rec1.got + #rec2.got >= 40 end, 20,
                 "40 deliveries")
      assert.truthy(#rec1.got > 0 and #rec2.got > 0,
                    #rec1.got .. " / " .. #rec2.got)
      local seen = {}
      for _, r in ipairs({ rec1, rec2 }) do
        local last = {}
        for _, e in ipairs(r.got) do
          assert.is_nil(seen[e.id], "delivered twice: " .. e.id)
          seen[e.id] = true
          assert.truthy((last[e.subject] or 0) < e.id)
          last[e.subject] = e.id
        end
      end
      d1:stop()
      d2:stop()
      db:close()
    end)
  end)
end

if servers.have_redis() then
  describe("outbox.redis_stream", function()
    it("XADDs each event, in order per subject, with its fields", function()
      redis_srv = redis_srv or servers.redis()
      local c = assert(redis.connect(redis_srv.url))
      local db = stores.sqlite()
      local d = outbox.dispatcher(db, { sinks = {
        outbox.redis_stream{ url = redis_srv.url, stream = "evts",
                             maxlen = 1000 } } })
      local ids = {}
      for i = 1, 5 do
        ids[i] = enqueue(db, "pay_r", "payment.paid", { n = i })
      end
      for _ = 1, 5 do
        d:step()
      end
      local entries = assert(c:call("XRANGE", "evts", "-", "+"))
      assert.equal(5, #entries)
      for i, e in ipairs(entries) do
        local f = {}
        for k = 1, #e[2], 2 do
          f[e[2][k]] = e[2][k + 1]
        end
        assert.equal(tostring(ids[i]), f.id)
        assert.equal("payment.paid", f.type)
        assert.equal("pay_r", f.subject)
        assert.equal("1", f.attempt)
        assert.equal('{"n":' .. i .. '}', f.payload)
      end
      -- a replayed event comes again with its attempt counting on (before:
      -- no attempt field, a redelivery looked like a first delivery)
      assert.equal(1, assert(outbox.replay(db, ids[2])))
      d:step()
      entries = assert(c:call("XRANGE", "evts", "-", "+"))
      assert.equal(6, #entries)
      local f = {}
      for k = 1, #entries[6][2], 2 do
        f[entries[6][2][k]] = entries[6][2][k + 1]
      end
      assert.equal(tostring(ids[2]), f.id)
      assert.equal("2", f.attempt)
      d:stop()
      -- a stream name from the event; a wrong-type key is a command error
      -- that no retry fixes: a dead letter
      assert(c:call("SET", "bad", "x"))
      local d2 = outbox.dispatcher(db, { sinks = {
        outbox.redis_stream{ client = c, name = "r2",
                             stream = function(e) return e.subject end } },
        backoff_base = 0.001 })
      enqueue(db, "bad", "payment.paid")
      local ok_id = enqueue(db, "good", "payment.paid")
      assert.equal(2, d2:step())
      local rows = assert(outbox.list(db, { subject = "bad" }))
      assert.equal("dead", rows[1].state)
      assert.truthy(rows[1].last_error:find("WRONGTYPE", 1, true))
      local good = assert(c:call("XRANGE", "good", "-", "+"))
      assert.equal(1, #good)
      assert.equal(tostring(ok_id), good[1][2][2])
      -- Redis down: retried (pending), delivered once it is back
      redis_srv.stop()
      local down_id = enqueue(db, "later", "payment.paid")
      assert.equal(1, d2:step())
      local r = row(db, down_id)
      assert.equal("pending", r.state)
      assert.equal(1, r.attempts)
      redis_srv.start()
      wait_until(function()
        d2:step()
        return row(db, down_id).state == "delivered"
      end, 20, "delivery after redis came back")
      assert.equal(1, #assert(c:call("XRANGE", "later", "-", "+")))
      d2:stop()
      -- a stream function that answers no name: retried with an error
      -- naming it (it shifted XADD's arguments: "Invalid stream ID", dead)
      local d3 = outbox.dispatcher(db, { sinks = {
        outbox.redis_stream{ client = c, name = "r3", maxlen = 10,
          stream = function(e)
            if e.subject == "noname" then return nil end
            return e.subject
          end } },
        backoff_base = 0.001 })
      local nn = enqueue(db, "noname", "payment.paid")
      assert.equal(1, d3:step())
      local nr = row(db, nn)
      assert.equal("pending", nr.state)
      assert.truthy(nr.last_error:find("the stream function returned a nil"
                                       .. " for event " .. nn, 1, true),
                    nr.last_error)
      d3:stop()
      assert(db:exec("DELETE FROM paygate_outbox WHERE subject = 'noname'"))
      c:close()
      db:close()
    end)

    it("a Redis that cannot take writes for now (OOM, NOREPLICAS) is"
       .. " retried, not dead-lettered", function()
      redis_srv = redis_srv or servers.redis()
      local c = assert(redis.connect(redis_srv.url))
      local db = stores.sqlite()
      local clock = new_clock()
      local d = outbox.dispatcher(db, { now = clock.now,
        random = function() return 0.5 end, sinks = {
          outbox.redis_stream{ client = c, stream = "full" } } })
      -- full (OOM: until consumers trim their streams or the limit is
      -- raised), or short of the replicas min-replicas-to-write asks for
      -- (NOREPLICAS: until one catches up): states of the server, not of
      -- the event, so no reason to drop it
      local cases = {
        { "OOM", { "maxmemory-policy", "noeviction", "maxmemory", "1" },
          { "maxmemory", "0" } },
        { "NOREPLICAS", { "min-replicas-to-write", "1" },
          { "min-replicas-to-write", "0" } },
      }
      local ok, err = pcall(function()
        for i, case in ipairs(cases) do
          assert(c:call("CONFIG", "SET", unpack(case[2])))
          local id = enqueue(db, "pay_full" .. i, "payment.paid")
          assert.equal(1, d:step())
          local r = row(db, id)
          assert.equal("pending", r.state, case[1])
          assert.equal(1, r.attempts)
          assert.truthy(r.last_error:find(case[1], 1, true), r.last_error)
          assert(c:call("CONFIG", "SET", unpack(case[3])))
          clock.advance(1)
          assert.equal(1, d:step())
          assert.equal("delivered", row(db, id).state)
          assert.equal(i, #assert(c:call("XRANGE", "full", "-", "+")))
        end
      end)
      c:call("CONFIG", "SET", "maxmemory", "0")
      c:call("CONFIG", "SET", "min-replicas-to-write", "0")
      d:stop()
      c:close()
      db:close()
      assert(ok, err)
    end)
  end)
end
