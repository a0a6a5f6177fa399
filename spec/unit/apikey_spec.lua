-- paygate.apikey: keys stored as derived keys, the client signer, each
-- 401 reason, the 300 s window's edges, constant-time comparison, and
-- no secret in any log line or error.
local paygate = require "paygate"
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local sql = require "paygate.sql"
local json = require "paygate.json"
local testing = require "paygate.testing"
local apikey = require "paygate.apikey"
local servers = require "spec.support.servers"

local tmp = servers.mktemp()
local n = 0

teardown(function() servers.sh("rm -rf " .. tmp) end)

local function fresh_db()
  n = n + 1
  return assert(sql.open("sqlite:" .. tmp .. "/k" .. n .. ".db"))
end

local function fake_req(o)
  local headers = {}
  for k, v in pairs(o.headers or {}) do headers[k:lower()] = v end
  local path = o.path or "/v1/payments"
  return {
    method = o.method or "POST", path = path,
    target = path .. ((o.query or "") ~= "" and "?" .. o.query or ""),
    query_string = o.query or "", body = o.body or "",
    header = function(_, name) return headers[name:lower()] end,
  }
end

local T = 1764500000          -- the server's clock in these tests

local function clock(t) return function() return t end end

describe("apikey.create", function()
  it("returns the secret once and stores only a derived key", function()
    local db = fresh_db()
    local k = assert(apikey.create(db, "shop1"))
    assert.matches("^ak_%w+$", k.key_id)
    assert.matches("^sk_%w+$", k.secret)
    assert.equal("shop1", k.app_id)
    local rows = assert(db:query("SELECT * FROM paygate_api_keys"))
    assert.equal(1, #rows)
    for col, v in pairs(rows[1]) do
      assert.is_nil(tostring(v):find(k.secret, 1, true), col)
      assert.is_nil(tostring(v):find(k.secret:sub(4), 1, true), col)
    end
    assert.equal(crypto.hex(apikey.signing_key(k.secret)),
                 rows[1].verifier)
    -- listing shows no verifier
    local list = assert(apikey.list(db, "shop1"))
    assert.equal(1, #list)
    assert.is_nil(list[1].verifier)
    assert.equal(k.key_id, list[1].key_id)
    db:close()
  end)

  it("raises on a bad app id", function()
    local db = fresh_db()
    assert.error_matches(function() apikey.create(db, "a b") end,
                         "apikey.create: app_id must be")
    assert.error_matches(function() apikey.create({}, "a") end,
                         "apikey.create: db must be a paygate.sql db")
    db:close()
  end)
end)

describe("apikey.create and apikey.revoke: the audit trail", function()
  local audit = require "paygate.audit"

  it("raises on bad opts", function()
    local db = fresh_db()
    assert.error_matches(function() apikey.create(db, "a", "x") end,
                         "apikey.create: opts must be a table")
    assert.error_matches(function()
      apikey.revoke(db, "ak_x", { actor = "a\nb" })
    end, "apikey.revoke: opts.actor must be 1..200 characters")
    db:close()
  end)

  it("records each key made and revoked, with its actor, never a secret;"
     .. " the chain verifies", function()
    local db = fresh_db()
    local k1 = assert(apikey.create(db, "shop1", { actor = "cli:alice" }))
    local k2 = assert(apikey.create(db, "shop1"))
    assert.is_true(apikey.revoke(db, k1.key_id, { actor = "cli:bob" }))
    -- nothing active to revoke: no entry
    assert.is_false(apikey.revoke(db, k1.key_id, { actor = "cli:bob" }))
    assert.is_false(apikey.revoke(db, "ak_unknown"))
    local es = assert(audit.entries(db, "apikey:shop1"))
    assert.equal(3, #es)
    assert.same({ "apikey.created", k1.key_id, "cli:alice" },
                { es[1].what, es[1].ref, es[1].actor })
    assert.same({ "apikey.created", k2.key_id },
                { es[2].what, es[2].ref })
    assert.is_nil(es[2].actor)
    assert.same({ "apikey.revoked", k1.key_id, "cli:bob" },
                { es[3].what, es[3].ref, es[3].actor })
    assert.same({ app_id = "shop1", key_id = k1.key_id },
                json.decode(es[3].evidence))
    local rows = assert(db:query("SELECT * FROM paygate_audit"))
    local all = json.encode(rows)
    for _, k in ipairs({ k1, k2 }) do
      assert.is_nil(all:find(k.secret:sub(4), 1, true))
      assert.is_nil(all:find(crypto.hex(apikey.signing_key(k.secret)), 1,
                             true))
    end
    assert.is_true((audit.verify(db, "apikey:shop1")))
    db:close()
  end)

  it("of two revokes at once, one wins (one entry); the other is told the"
     .. " key was revoked already, and when", function()
    local db = fresh_db()
    -- a second handle on the same store: another process, as a second
    -- `paygate apikey revoke` would be
    local db2 = assert(sql.open("sqlite:" .. tmp .. "/k" .. n .. ".db"))
    local k = assert(apikey.create(db, "shop1"))
    local got = {}
    local tasks = {}
    for i, h in ipairs({ db, db2, db }) do
      tasks[i] = core.spawn(function()
        got[i] = { apikey.revoke(h, k.key_id, { actor = "cli:r" .. i }) }
      end)
    end
    for _, t in ipairs(tasks) do t:wait() end
    local won, lost = 0, 0
    local revoked_at = tonumber(assert(db:query("SELECT revoked_at FROM"
      .. " paygate_api_keys WHERE key_id = $1", { k.key_id }))[1].revoked_at)
    for _, g in ipairs(got) do
      if g[1] == true then
        won = won + 1
      else
        lost = lost + 1
        assert.same({ false, "revoked", revoked_at }, g)
      end
    end
    assert.same({ 1, 2 }, { won, lost })
    local es = assert(audit.entries(db, "apikey:shop1"))
    assert.same({ "apikey.created", "apikey.revoked" },
                { es[1].what, es[2] and es[2].what })
    assert.is_nil(es[3])
    assert.is_true((audit.verify(db, "apikey:shop1")))
    -- a key id the store never held is told apart
    assert.same({ false, "unknown" }, { apikey.revoke(db, "ak_unknown") })
    db2:close()
    db:close()
  end)

  it("makes no key when its entry cannot be written", function()
    local db = fresh_db()
    assert(apikey.create(db, "shop1"))
    -- the trail's table gone (a store that refuses the write): the key's
    -- insert rolls back with it
    assert(db:exec("DROP TABLE paygate_audit"))
    local k, err = apikey.create(db, "shop1")
    assert.is_nil(k)
    assert.truthy(err)
    assert.equal(1, #assert(apikey.list(db, "shop1")))
    db:close()
  end)
end)

describe("apikey: a key's last use", function()
  it("is written once a minute per key and worker, not per request, and"
     .. " listed", function()
    local db = fresh_db()
    local k = assert(apikey.create(db, "shop1"))
    local idle = assert(apikey.create(db, "shop1"))
    local function use(t, mono)
      local app = apikey.verify(db, { method = "GET", path = "/v1/x",
        authorization = apikey.sign{ app_id = "shop1", key_id = k.key_id,
          secret = k.secret, method = "GET", path = "/v1/x",
          timestamp = t }.Authorization },
        { now = clock(t), mono = clock(mono) })
      assert.equal("shop1", app)
    end
    local function last_used(key_id, want)
      local deadline = core.mono() + 10
      while true do
        for _, r in ipairs(assert(apikey.list(db, "shop1"))) do
          if r.key_id == key_id and r.last_used_at == want then
            return r
          end
        end
        assert(core.mono() < deadline, "last_used_at never became "
               .. tostring(want))
        core.sleep(0.01)
      end
    end
    local before = apikey.stats().uses_recorded
    use(T, 1000)
    last_used(k.key_id, T)
    -- within the minute: no write (the store's own count: after the
    -- two uses, one write of ours reaches it, so none of theirs is queued)
    local writes = db:stats().writes
    use(T + 10, 1010)
    use(T + 59, 1059)
    assert(db:exec("CREATE TABLE barrier (x INTEGER)"))
    assert.equal(writes + 1, db:stats().writes)
    assert.equal(before + 1, apikey.stats().uses_recorded)
    last_used(k.key_id, T)
    -- a minute on: one more
    use(T + 61, 1061)
    assert.equal(before + 2, apikey.stats().uses_recorded)
    last_used(k.key_id, T + 61)
    -- a refused request is no use
    local _, err = apikey.verify(db, { method = "GET", path = "/v1/x",
      authorization = apikey.sign{ app_id = "shop1", key_id = idle.key_id,
        secret = "sk_wrong", method = "GET", path = "/v1/x",
        timestamp = T }.Authorization }, { now = clock(T),
        mono = clock(2000) })
    assert.equal("bad_signature", err.kind)
    assert.equal(before + 2, apikey.stats().uses_recorded)
    local rows = assert(apikey.list(db, "shop1"))
    for _, r in ipairs(rows) do
      if r.key_id == idle.key_id then assert.is_nil(r.last_used_at) end
    end
    db:close()
  end)
end)

describe("apikey: a key's last use that cannot be written", function()
  it("is logged at most once a minute per worker, whatever the keys, and"
     .. " the requests are accepted", function()
    local db = fresh_db()
    local keys = {}
    for i = 1, 3 do keys[i] = assert(apikey.create(db, "shop1")) end
    assert(apikey.list(db, "shop1"))
    -- a store that refuses the write (read-only, full): the table gone
    assert(db:exec("DROP TABLE paygate_api_key_uses"))
    local lines = {}
    local warn = paygate.log.warn
    paygate.log.warn = function(msg, fields)
      if msg == "apikey: cannot record a key's last use" then
        lines[#lines + 1] = fields
      end
    end
    finally(function() paygate.log.warn = warn end)
    local function use(k, t, mono)
      assert.equal("shop1", (apikey.verify(db, { method = "GET",
        path = "/v1/x", authorization = apikey.sign{ app_id = "shop1",
          key_id = k.key_id, secret = k.secret, method = "GET",
          path = "/v1/x", timestamp = t }.Authorization },
        { now = clock(t), mono = clock(mono) })))
    end
    local failed = apikey.stats().uses_failed or 0
    -- (a mono of this spec's own, past the other cases' marks)
    local M = 500000
    local function failures(want)
      testing.wait_until(function()
        return (apikey.stats().uses_failed or 0) >= failed + want
               or #lines >= want
      end, 10, want .. " failed writes")
    end
    for i, k in ipairs(keys) do use(k, T, M + i) end
    failures(3)
    assert.equal(1, #lines)
    assert.matches("^ak_", lines[1].key_id)
    assert.matches("paygate_api_key_uses", lines[1].error)
    assert.is_nil(lines[1].not_logged)
    -- a minute after that line: the next failure is logged, saying how
    -- many were not
    use(keys[1], T + 70, M + 70)
    failures(4)
    assert.equal(2, #lines)
    assert.equal(2, lines[2].not_logged)
    db:close()
  end)
end)

describe("apikey.parse", function()
  it("classifies headers", function()
    assert.same({ nil, "missing_signature" }, { apikey.parse(nil) })
    assert.same({ nil, "missing_signature" }, { apikey.parse("") })
    assert.same({ nil, "missing_signature" }, { apikey.parse("Bearer abc") })
    for _, h in ipairs({
      "PAYGATE-HMAC-SHA256",
      'PAYGATE-HMAC-SHA256 app_id="a",key_id="k",timestamp="1"',
      'PAYGATE-HMAC-SHA256 app_id="a",key_id="k",timestamp="x",signature="s"',
      'PAYGATE-HMAC-SHA256 app_id="a",app_id="a",key_id="k",timestamp="1"',
      'PAYGATE-HMAC-SHA256 app_id="a" key_id="k",timestamp="1",signature="s"',
      'PAYGATE-HMAC-SHA256 app_id="a",key_id="k",timestamp="1",'
        .. 'signature="s",x="y"',
      'PAYGATE-HMAC-SHA256 ' .. ("x"):rep(2000),
      -- a signature that is not 64 hex digits: short, long, not hex,
      -- empty, base64 of the 32 bytes
      'PAYGATE-HMAC-SHA256 app_id="a",key_id="k",timestamp="1",'
        .. 'signature="abc"',
      'PAYGATE-HMAC-SHA256 app_id="a",key_id="k",timestamp="1",'
        .. 'signature="' .. ("a"):rep(63) .. '"',
      'PAYGATE-HMAC-SHA256 app_id="a",key_id="k",timestamp="1",'
        .. 'signature="' .. ("a"):rep(65) .. '"',
      'PAYGATE-HMAC-SHA256 app_id="a",key_id="k",timestamp="1",'
        .. 'signature="' .. ("a"):rep(63) .. 'g"',
      'PAYGATE-HMAC-SHA256 app_id="a",key_id="k",timestamp="1",'
        .. 'signature=""',
      'PAYGATE-HMAC-SHA256 app_id="a",key_id="k",timestamp="1",'
        .. 'signature="' .. crypto.base64_encode(("\171"):rep(32)) .. '"',
    }) do
      local f, reason = apikey.parse(h)
      assert.same({ nil, "malformed_signature" }, { f, reason }, h)
    end
    local sig = ("0123456789abcdef"):rep(4)
    local f = assert(apikey.parse('PAYGATE-HMAC-SHA256 app_id="a", '
      .. 'key_id="k",timestamp="12",signature="' .. sig .. '"'))
    assert.same({ app_id = "a", key_id = "k", timestamp = "12",
                  signature = sig }, f)
    -- the scheme in any case (RFC 9110: a case-insensitive token)
    for _, scheme in ipairs({ "paygate-hmac-sha256", "Paygate-Hmac-Sha256" }) do
      assert.same(f, apikey.parse(scheme .. ' app_id="a",key_id="k",'
        .. 'timestamp="12",signature="' .. sig .. '"'), scheme)
    end
    -- hex in upper case is a signature too
    assert.equal(sig:upper(), assert(apikey.parse('PAYGATE-HMAC-SHA256 '
      .. 'app_id="a",key_id="k",timestamp="12",signature="' .. sig:upper()
      .. '"')).signature)
  end)

  it("says which part of a malformed header is wrong", function()
    -- was: one message for every malformed header ("not in the
    -- documented format"): a caller signing with milliseconds, an
    -- unquoted value or a base64 signature had to guess which
    local sig = ("0123456789abcdef"):rep(4)
    local function h(fields)
      return "PAYGATE-HMAC-SHA256 " .. fields
    end
    local ok = 'app_id="a",key_id="k",timestamp="1764500000",signature="'
               .. sig .. '"'
    for _, c in ipairs({
      { "PAYGATE-HMAC-SHA256", "no fields after the scheme" },
      { h(("x"):rep(1100)), "over 1024 bytes" },
      { h(ok:gsub('"k"', "k")), 'expected name="value" (the value in'
          .. ' double quotes) at byte 12 after the scheme' },
      { h(ok .. ',region="cn"'), "unknown field region (the fields are"
          .. " app_id, key_id, timestamp and signature)" },
      { h('app_id="a",' .. ok), "field app_id given twice" },
      { h(ok:gsub('",key_id', '" key_id')),
        "fields must be separated by commas" },
      { h(ok:gsub('key_id="k",', "")), "field key_id is missing" },
      { h(ok:gsub('"1764500000"', '"1764500000.25"')),
        "timestamp must be whole seconds since 1970, digits only" },
      { h(ok:gsub('"1764500000"', '"1764500000123"')), "timestamp has 13"
          .. " digits: give whole seconds since 1970 (10 digits), not"
          .. " milliseconds" },
      { h(ok:gsub(sig, sig:sub(1, 40))), "signature must be the"
          .. " HMAC-SHA256 as 64 hex digits, not 40 of them" },
      { h(ok:gsub(sig, crypto.base64_encode(("\171"):rep(32)))),
        "signature must be the HMAC-SHA256 as 64 hex digits, not base64" },
    }) do
      local f, reason, detail = apikey.parse(c[1])
      assert.is_nil(f, c[1])
      assert.equal("malformed_signature", reason, c[1])
      assert.is_string(detail, c[1])
      assert.matches(c[2], detail, 1, true)
    end
    assert.is_table(apikey.parse(h(ok)))
  end)
end)

describe("apikey.verify and before_hook", function()
  local db, key, hook, logged
  local saved = {}

  setup(function()
    db = fresh_db()
    key = assert(apikey.create(db, "shop1"))
    -- capture every log line the hook makes, as it would be written
    for _, lvl in ipairs({ "debug", "info", "warn", "error" }) do
      saved[lvl] = paygate.log[lvl]
      paygate.log[lvl] = function(msg, fields)
        logged[#logged + 1] = msg .. " " .. json.encode(fields or {})
        return saved[lvl](msg, fields)
      end
    end
  end)
  teardown(function()
    for lvl, f in pairs(saved) do paygate.log[lvl] = f end
    db:close()
  end)
  before_each(function() logged = {} end)

  local function signed(o)
    local hdr = apikey.sign{
      app_id = o.app_id or key.app_id, key_id = o.key_id or key.key_id,
      secret = o.secret or key.secret, method = o.sign_method or "POST",
      path = o.sign_path or "/v1/payments?x=1",
      body = o.sign_body or "{\"total\":100}", timestamp = o.ts or T,
      idempotency_key = o.sign_ik }
    if o.ik ~= nil then hdr["Idempotency-Key"] = o.ik or nil end
    return fake_req{ headers = hdr, query = "x=1", body = "{\"total\":100}" }
  end

  -- (every line logged: these cases look at each refusal's line; the
  -- bound on them is a case of its own below)
  local function run(req, now)
    local h = apikey.before_hook(db, { now = clock(now or T),
                                       log_limit = false })
    local s, body, headers = h(req)
    return s, body, headers, req
  end

  it("accepts a good signature and sets req.app_id", function()
    local s, _, _, req = run(signed{})
    assert.is_nil(s)
    assert.equal("shop1", req.app_id)
    s, _, _, req = run(signed{ sign_ik = "k-1" })
    assert.is_nil(s)
    assert.equal("shop1", req.app_id)
  end)

  it("skips requests outside its prefix", function()
    local h = apikey.before_hook(db, { prefix = "/v1/" })
    assert.is_nil(h(fake_req{ path = "/wechatpay/notify/1" }))
    local s = h(fake_req{ path = "/v1/payments" })
    assert.equal(401, s)
  end)

  local cases = {
    { "missing_signature", function() return fake_req{} end },
    { "missing_signature", function()
        return fake_req{ headers = { Authorization = "Bearer x" } } end },
    { "malformed_signature", function()
        return fake_req{ headers = {
          Authorization = "PAYGATE-HMAC-SHA256 nonsense" } } end },
    -- a signature that is not 64 hex digits, from a known key: the
    -- header's format, not the key, is at fault
    { "malformed_signature", function()
        local req = signed{}
        local a = req:header("authorization")
                    :gsub('signature="%x+"', 'signature="abc"')
        return fake_req{ headers = { Authorization = a },
                         query = "x=1", body = req.body } end },
    { "unknown_app", function() return signed{ key_id = "ak_nope" } end },
    { "unknown_app", function() return signed{ app_id = "shop2" } end },
    { "stale_timestamp", function() return signed{ ts = T - 301 } end },
    { "stale_timestamp", function() return signed{ ts = T + 301 } end },
    { "bad_signature", function() return signed{ secret = "sk_wrong" } end },
    { "bad_signature", function() return signed{ sign_body = "{}" } end },
    { "bad_signature", function()
        return signed{ sign_path = "/v1/payments" } end },
    { "bad_signature", function()
        return signed{ sign_path = "/v1/payments?x=2" } end },
    { "bad_signature", function() return signed{ sign_method = "PUT" } end },
    -- the Idempotency-Key is signed: a captured request sent again under
    -- another key, or with one added or dropped, does not verify
    { "bad_signature", function()
        return signed{ sign_ik = "k-1", ik = "k-2" } end },
    { "bad_signature", function() return signed{ ik = "k-2" } end },
    { "bad_signature", function()
        return signed{ sign_ik = "k-1", ik = false } end },
  }
  for i, c in ipairs(cases) do
    it("answers 401 " .. c[1] .. " (case " .. i .. "), counted", function()
      local before = apikey.stats()[c[1]]
      local before_all = apikey.stats("all")[c[1]]
      local counter = require("paygate.metrics").counter(
        "paygate_apikey_refusals_total", "", { "reason" })
      local before_metric = counter:get({ c[1] })
      local s, body, headers = run(c[2]())
      assert.equal(401, s)
      assert.equal(c[1], body.error)
      assert.is_string(body.message)
      assert.equal("PAYGATE-HMAC-SHA256", headers["WWW-Authenticate"])
      assert.equal(before + 1, apikey.stats()[c[1]])
      assert.equal(before_all + 1, apikey.stats("all")[c[1]])
      assert.equal(before_metric + 1, counter:get({ reason = c[1] }))
      assert.equal(1, #logged)
      assert.matches(c[1], logged[1], 1, true)
    end)
  end

  it("bounds its lines per reason (opts.log_limit), counting every"
     .. " refusal", function()
    -- was: one warn line per 401, without limit: anyone can send
    -- requests with a bad key, and at log level warn a flood filled the
    -- disk
    local h = apikey.before_hook(db, { now = clock(T),
      log_limit = { lines = 2, window = 1 } })
    local before = apikey.stats()
    local w0 = math.floor(paygate.update_time())
    testing.wait_until(function()
      return math.floor(paygate.update_time()) > w0
    end, 3, "a window to begin")
    for _ = 1, 12 do
      assert.equal(401, (h(signed{ secret = "sk_wrong" })))
    end
    -- key ids of the caller's choosing: one reason, not a line each
    for i = 1, 5 do
      assert.equal(401, (h(signed{ key_id = "ak_flood" .. i })))
    end
    local full, summaries = {}, {}
    testing.wait_until(function()
      full, summaries = {}, {}
      for _, l in ipairs(logged) do
        local msg, f = l:match("^(.-) ({.*})$")
        f = json.decode(f)
        if msg == "apikey: request refused" then
          full[#full + 1] = f
        elseif msg == "apikey: request refused: more lines like it not"
                      .. " logged" then
          summaries[f.reason] = f
        end
      end
      return summaries.bad_signature and summaries.unknown_app
    end, 5, "the summary lines")
    -- two of each reason in full
    assert.equal(4, #full)
    local n = {}
    for _, f in ipairs(full) do n[f.reason] = (n[f.reason] or 0) + 1 end
    assert.same({ bad_signature = 2, unknown_app = 2 }, n)
    assert.equal(10, summaries.bad_signature.suppressed)
    assert.equal(3, summaries.unknown_app.suppressed)
    assert.is_nil(summaries.unknown_app.key_id)
    -- counted all the same
    assert.equal(before.bad_signature + 12, apikey.stats().bad_signature)
    assert.equal(before.unknown_app + 5, apikey.stats().unknown_app)
    -- a log_limit it cannot use is refused, in its terms
    assert.has_error(function()
      apikey.before_hook(db, { log_limit = { lines = 0 } })
    end, "apikey.before_hook: opts.log_limit.lines must be a whole number,"
         .. " 1 .. 1000000")
    assert.has_error(function()
      apikey.before_hook(db, { log_limit = "off" })
    end, "apikey.before_hook: opts.log_limit must be a table or false")
  end)

  it("a bad_signature answer carries the string signed over and the body's"
     .. " SHA-256, never the secret, a key or a signature", function()
    -- signed over another path and key than sent: the answer shows what
    -- the server signed, for the caller to compare with its own
    local req = signed{ sign_path = "/v1/payments", sign_ik = "k-1",
                        ik = "k-2" }
    local s, body = run(req)
    assert.equal(401, s)
    assert.equal("bad_signature", body.error)
    assert.equal("POST\n/v1/payments?x=1\n" .. T .. "\nk-2\n{\"total\":100}",
                 body.string_to_sign)
    assert.equal(apikey.message("POST", "/v1/payments?x=1", T,
                                req.body, "k-2"), body.string_to_sign)
    assert.equal(crypto.hex(crypto.digest("sha256", req.body)),
                 body.body_sha256)
    assert.matches("string_to_sign", body.message, 1, true)
    local text = json.encode(body)
    local sent = req:header("authorization"):match('signature="(%x+)"')
    local want = crypto.hex(crypto.hmac("sha256",
      apikey.signing_key(key.secret), body.string_to_sign))
    for _, sec in ipairs({ key.secret, key.secret:sub(4), sent, want,
        crypto.hex(apikey.signing_key(key.secret)) }) do
      assert.is_nil(text:find(sec, 1, true), sec)
    end
    -- nor is the body (the caller's data) logged
    assert.equal(1, #logged)
    assert.is_nil(logged[1]:find("total", 1, true), logged[1])
    -- a body past 8 KiB: its digest only, not sent back
    local big = ("x"):rep(8193)
    local hdr = apikey.sign{ app_id = key.app_id, key_id = key.key_id,
      secret = "sk_wrong", method = "POST", path = "/v1/payments",
      body = big, timestamp = T }
    s, body = run(fake_req{ headers = hdr, body = big })
    assert.equal(401, s)
    assert.equal("bad_signature", body.error)
    assert.is_nil(body.string_to_sign)
    assert.equal(crypto.hex(crypto.digest("sha256", big)), body.body_sha256)
    -- other refusals carry neither
    s, body = run(signed{ ts = T - 1000 })
    assert.equal("stale_timestamp", body.error)
    assert.is_nil(body.string_to_sign)
    assert.is_nil(body.body_sha256)
  end)

  it("a malformed_signature answer names the format and what is wrong",
     function()
    -- a timestamp in milliseconds (JavaScript's Date.now())
    local req = signed{}
    local a = req:header("authorization")
                :gsub('timestamp="(%d+)"', 'timestamp="%1000"')
    local s, body = run(fake_req{ headers = { Authorization = a },
                                  query = "x=1", body = req.body })
    assert.equal(401, s)
    assert.equal("malformed_signature", body.error)
    assert.equal('the Authorization header is not in the documented format'
      .. ' (PAYGATE-HMAC-SHA256 app_id="...",key_id="...",timestamp="...",'
      .. 'signature="..."): timestamp has 13 digits: give whole seconds'
      .. ' since 1970 (10 digits), not milliseconds', body.message)
  end)

  it("a stale_timestamp answer says by how much, which way, and the"
     .. " server's clock", function()
    -- was: "timestamp is more than 300 s away from the server's clock",
    -- the same for a client 6 minutes behind and one a day ahead
    local s, body = run(signed{ ts = T - 400 })
    assert.equal(401, s)
    assert.equal("stale_timestamp", body.error)
    assert.equal("timestamp " .. (T - 400) .. " is 400 s behind the"
      .. " server's clock (" .. T .. "); it must be within 300 s:"
      .. " synchronise the client's clock (NTP) and sign each request as"
      .. " it is sent", body.message)
    s, body = run(signed{ ts = T + 86400 }, T + 0.5)
    assert.equal(401, s)
    assert.matches("^timestamp " .. (T + 86400) .. " is 86400 s ahead of"
      .. " the server's clock %(" .. T .. "%)", body.message)
    -- the server's clock has a fraction: a whole-second timestamp 400 s
    -- behind its second is said to be 400, not 401
    s, body = run(signed{ ts = T - 400 }, T + 0.3)
    assert.matches(" is 400 s behind ", body.message, 1, true)
    -- 300.5 s off is refused, and not said to be 300
    s, body = run(signed{ ts = T - 300 }, T + 0.5)
    assert.equal(401, s)
    assert.matches(" is 301 s behind ", body.message, 1, true)
  end)

  it("a bad_signature message says what to check when string_to_sign"
     .. " matches: the key", function()
    -- was: only "compare string_to_sign ... with what your client
    -- signed", which matches exactly when the key is what is wrong (the
    -- secret used as the HMAC key, or the signing key's hex text)
    for _, secret in ipairs({ "sk_wrong",
        crypto.hex(apikey.signing_key(key.secret)) }) do
      local s, body = run(signed{ secret = secret })
      assert.equal(401, s)
      assert.equal("bad_signature", body.error)
      assert.matches("; if they are the same, the key is wrong: sign with"
        .. ' HMAC-SHA256(secret, "paygate-apikey-v1") as 32 raw bytes (not'
        .. " its hex text) of this key_id's secret", body.message, 1, true)
      assert.is_nil(body.message:find(key.secret, 1, true))
    end
  end)

  it("accepts timestamps 299 and 300 s off, not 301", function()
    for _, d in ipairs({ -300, -299, 0, 299, 300 }) do
      assert.is_nil((run(signed{ ts = T + d })), d)
    end
    for _, d in ipairs({ -301, 301, -100000 }) do
      assert.equal(401, (run(signed{ ts = T + d })), d)
    end
    -- a fractional clock: 300.5 s away is outside
    assert.equal(401, (run(signed{ ts = T - 300 }, T + 0.5)))
    assert.is_nil((run(signed{ ts = T - 300 }, T)))
  end)

  it("compares the signature with crypto.constant_time_equal", function()
    local s = spy.on(crypto, "constant_time_equal")
    local req = signed{}
    local given = req:header("authorization"):match('signature="(%x+)"')
    assert.is_nil((run(req)))
    assert.spy(s).was_called(1)
    assert.spy(s).was_called_with(given, given)
    run(signed{ sign_body = "other" })
    assert.spy(s).was_called(2)
    crypto.constant_time_equal:revert()
  end)

  it("asks the store about an unknown key id once per cache_ttl",
     function()
    local n = 0
    local query = db.query
    db.query = function(self, ...) n = n + 1 return query(self, ...) end
    finally(function() db.query = nil end)
    local h = apikey.before_hook(db, { now = clock(T), mono = clock(100) })
    for _ = 1, 5 do
      local s, body = h(signed{ key_id = "ak_forged1" })
      assert.equal(401, s)
      assert.equal("unknown_app", body.error)
    end
    assert.equal(1, n)
    -- after cache_ttl (5 s), asked again
    h = apikey.before_hook(db, { now = clock(T + 6), mono = clock(106) })
    assert.equal(401, (h(signed{ key_id = "ak_forged1", ts = T + 6 })))
    assert.equal(2, n)
    -- many forged ids: each asked once, the memory bounded
    for i = 1, 5000 do
      h(signed{ key_id = "ak_many" .. i, ts = T + 6 })
    end
    assert.equal(5002, n)
    -- a key id named like the memory's own fields does not upset it
    for _, id in ipairs{ "n", "ids", "n", "ak_other", "ak_other" } do
      h(signed{ key_id = id, ts = T + 6 })
    end
    assert.equal(5002 + 3, n)
  end)

  it("refuses a revoked key at once", function()
    local k2 = assert(apikey.create(db, "shop1"))
    local req = fake_req{ headers = apikey.sign{ app_id = "shop1",
      key_id = k2.key_id, secret = k2.secret, method = "GET",
      path = "/v1/x", timestamp = T }, method = "GET", path = "/v1/x" }
    assert.is_nil((run(req)))
    assert.is_true(apikey.revoke(db, k2.key_id))
    assert.is_false(apikey.revoke(db, k2.key_id))
    local s, body = run(req)
    assert.equal(401, s)
    -- said as revoked, with when: not as ids that were never valid
    assert.equal("revoked_key", body.error)
    assert.matches("key " .. k2.key_id .. " of app shop1 was revoked at"
      .. " %d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ: sign with one of the"
      .. " app's current keys", body.message)
    -- another app naming that key id learns nothing of it
    req = fake_req{ headers = apikey.sign{ app_id = "shop2",
      key_id = k2.key_id, secret = k2.secret, method = "GET",
      path = "/v1/x", timestamp = T }, method = "GET", path = "/v1/x" }
    s, body = run(req)
    assert.equal(401, s)
    assert.equal("unknown_app", body.error)
  end)

  it("counts cache_ttl on the monotonic clock: a key revoked elsewhere is"
     .. " refused within it though the wall clock stepped back", function()
    local k3 = assert(apikey.create(db, "shop1"))
    local function req(ts)
      return fake_req{ headers = apikey.sign{ app_id = "shop1",
        key_id = k3.key_id, secret = k3.secret, method = "GET",
        path = "/v1/x", timestamp = ts }, method = "GET", path = "/v1/x" }
    end
    -- cached at wall T, monotonic 500
    local h = apikey.before_hook(db, { now = clock(T), mono = clock(500) })
    assert.is_nil((h(req(T))))
    -- revoked by another worker or `paygate apikey revoke`: this worker's
    -- cache is not told
    assert(db:exec("UPDATE paygate_api_keys SET revoked_at = $2 WHERE"
                   .. " key_id = $1", { k3.key_id, T }))
    -- 6 s later the wall clock reads 4 min earlier (NTP stepped it back)
    h = apikey.before_hook(db, { now = clock(T - 234), mono = clock(506) })
    local s, body = h(req(T - 234))
    assert.equal(401, s)
    assert.equal("revoked_key", body.error)
  end)

  -- The Python client docs/gateway.md gives merchants to copy: what it
  -- sends must verify, its POST and its GET with a query alike. Run with
  -- urlopen replaced by a recorder (no gateway needed).
  local have_python = os.execute("command -v python3 >/dev/null 2>&1")
  have_python = have_python == 0 or have_python == true
  ;(have_python and it or pending)("the Python client in docs/gateway.md"
     .. " signs requests that verify", function()
    local f = assert(io.open("docs/gateway.md", "rb"))
    local doc = f:read("*a")
    f:close()
    local snippet = assert(doc:match("```python\n(# a client in Python 3,"
                                     .. ".-)```"), "the Python client")
    local dir = servers.mktemp()
    servers.sh("mkdir -p " .. dir .. "/var/dev")
    local kf = assert(io.open(dir .. "/var/dev/apikey.json", "wb"))
    kf:write(json.encode({ app_id = key.app_id, key_id = key.key_id,
                           secret = key.secret }))
    kf:close()
    local pf = assert(io.open(dir .. "/run.py", "wb"))
    pf:write([[
import io, json, urllib.request
sent = []
class Answer(io.BytesIO):
    status = 200
    def __enter__(self): return self
    def __exit__(self, *a): pass
def record(req, timeout=None):
    sent.append({"method": req.get_method(), "url": req.full_url,
                 "headers": dict(req.header_items()),
                 "body": (req.data or b"").decode()})
    return Answer(json.dumps({"payment": {"id": "pay_x"}, "state": "paying",
                              "attempts": []}).encode())
urllib.request.urlopen = record
]], snippet, [[

print("SENT " + json.dumps(sent))
]])
    pf:close()
    local p = assert(io.popen("cd " .. dir .. " && python3 run.py 2>&1"))
    local out = p:read("*a")
    p:close()
    servers.sh("rm -rf " .. dir)
    local sent = json.decode((assert(out:match("SENT (%[.*%])"), out)))
    assert.equal(2, #sent)
    assert.equal("POST", sent[1].method)
    assert.equal("GET", sent[2].method)
    for _, r in ipairs(sent) do
      local path = r.url:gsub("^https?://[^/]+", "")
      local h = {}
      for k, v in pairs(r.headers) do h[k:lower()] = v end
      local app_id, err = apikey.verify(db, { method = r.method,
        path = path, body = r.body, authorization = h.authorization,
        idempotency_key = h["idempotency-key"] })
      assert.equal(key.app_id, app_id, tostring(err))
    end
    assert.equal("/v1/payments/pay_x?refresh=1",
                 (sent[2].url:gsub("^https?://[^/]+", "")))
    assert.truthy(sent[1].headers["Idempotency-key"])
  end)

  it("never puts a secret, key or signature in a log line or error",
     function()
    local reqs = { signed{}, signed{ secret = "sk_wrong" },
                   signed{ ts = T - 1000 }, signed{ key_id = "ak_x" } }
    local texts = {}
    for _, req in ipairs(reqs) do
      local _, body = run(req)
      if body then texts[#texts + 1] = json.encode(body) end
      local _, err = apikey.verify(db, { method = "POST",
        path = "/v1/payments?x=1", body = req.body,
        authorization = req:header("authorization") }, { now = clock(T) })
      if err then
        texts[#texts + 1] = tostring(err)
        texts[#texts + 1] = json.encode(err)
      end
      texts[#texts + 1] = req:header("authorization")
                            :match('signature="(%x+)"')
    end
    assert.is_true(#logged >= 3)
    local secrets = { key.secret, key.secret:sub(4),
                      crypto.hex(apikey.signing_key(key.secret)) }
    for _, r in ipairs(reqs) do
      secrets[#secrets + 1] = r:header("authorization")
                                :match('signature="(%x+)"')
    end
    local all = table.concat(logged, "\n")
    for _, sec in ipairs(secrets) do
      assert.is_nil(all:find(sec, 1, true))
    end
    for i = 1, #texts - 1 do
      if not texts[i]:match("^%x+$") then
        for _, sec in ipairs(secrets) do
          assert.is_nil(texts[i]:find(sec, 1, true), texts[i])
        end
      end
    end
  end)

  it("answers 503 (not 401) when the key store fails", function()
    local db2 = fresh_db()
    assert(apikey.create(db2, "shop1"))
    local h = apikey.before_hook(db2, { now = clock(T) })
    assert(db2:exec("DROP TABLE paygate_api_keys"))
    local s, body = h(signed{})
    assert.equal(503, s)
    assert.equal("unavailable", body.error)
    db2:close()
  end)
end)

describe("apikey.sign", function()
  it("signs METHOD\\nPATH\\nTIMESTAMP\\nIDEMPOTENCY_KEY\\nBODY with the"
     .. " derived key", function()
    local sk = apikey.signing_key("sk_test")
    local want = crypto.hex(crypto.hmac("sha256", sk,
                                        "POST\n/p?a=1\n1700000000\n\n{}"))
    local h = apikey.sign{ app_id = "a", key_id = "k", secret = "sk_test",
                           method = "POST", path = "/p?a=1", body = "{}",
                           timestamp = 1700000000 }
    assert.equal('PAYGATE-HMAC-SHA256 app_id="a",key_id="k",'
                 .. 'timestamp="1700000000",signature="' .. want .. '"',
                 h.Authorization)
    local h2 = apikey.sign{ app_id = "a", key_id = "k", signing_key = sk,
                            method = "POST", path = "/p?a=1", body = "{}",
                            timestamp = 1700000000 }
    assert.equal(h.Authorization, h2.Authorization)
    assert.is_nil(h["Idempotency-Key"])
    -- with an Idempotency-Key: signed, and returned as the header
    local h3 = apikey.sign{ app_id = "a", key_id = "k", signing_key = sk,
                            method = "POST", path = "/p?a=1", body = "{}",
                            timestamp = 1700000000, idempotency_key = "o-1" }
    assert.equal("o-1", h3["Idempotency-Key"])
    assert.equal(crypto.hex(crypto.hmac("sha256", sk,
                   "POST\n/p?a=1\n1700000000\no-1\n{}")),
                 h3.Authorization:match('signature="(%x+)"'))
    assert.has_error(function()
      apikey.sign{ app_id = "a", key_id = "k", signing_key = sk,
                   method = "POST", path = "/", idempotency_key = "a\nb" }
    end)
    -- HTTP drops a header value's outer spaces: a key with them would be
    -- signed as sent and checked without them (an opaque bad_signature)
    for _, ik in ipairs({ " o-1", "o-1 ", "\to-1" }) do
      assert.has_error(function()
        apikey.sign{ app_id = "a", key_id = "k", signing_key = sk,
                     method = "POST", path = "/", idempotency_key = ik }
      end, "apikey.sign: idempotency_key must be a string without CR or LF"
           .. " and without leading or trailing spaces or tabs")
    end
    local now = math.floor(core.time())
    local ts = tonumber(apikey.sign{ app_id = "a", key_id = "k",
      secret = "s", method = "GET", path = "/" }.Authorization
      :match('timestamp="(%d+)"'))
    assert.is_true(math.abs(ts - now) <= 1)
  end)
end)

describe("paygate apikey (command)", function()
  local proc = require "support.proc"

  local function run_cmd(args)
    n = n + 1
    local out = tmp .. "/cmd" .. n .. ".out"
    local argv = { PAYGATE_BIN, "apikey" }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    local p = proc.spawn(argv, { log = out })
    local code = p:wait(30)
    return code, proc.read(out)
  end

  it("creates a key whose printed secret signs, lists it, revokes it",
     function()
    local url = "sqlite:" .. tmp .. "/cmd.db"
    assert(sql.open(url)):close()          -- the gateway's store exists
    local code, out = run_cmd({ "create", "--db", url, "--app", "shop9",
                                "--json" })
    assert.equal(0, code, out)
    local k = json.decode(out)
    assert.equal("shop9", k.app_id)
    local db = assert(sql.open(url))
    local req = fake_req{ headers = apikey.sign{ app_id = "shop9",
      key_id = k.key_id, secret = k.secret, method = "POST",
      path = "/v1/payments", body = "{}", timestamp = T }, body = "{}" }
    assert.is_nil((apikey.before_hook(db, { now = clock(T) })(req)))
    assert.equal("shop9", req.app_id)
    code, out = run_cmd({ "list", "--db", url })
    assert.equal(0, code)
    assert.matches(k.key_id, out, 1, true)
    assert.is_nil(out:find(k.secret, 1, true))
    -- its last use, once written (the hook above was a use at T)
    local used = os.date("!last used %Y-%m-%dT%H:%M:%SZ", T)
    servers.wait_for(function()
      code, out = run_cmd({ "list", "--db", url })
      return out:find(used, 1, true)
    end, 10, used)
    code, out = run_cmd({ "list", "--db", url, "--json" })
    assert.equal(T, json.decode(out).last_used_at)
    code = run_cmd({ "revoke", "--db", url, "--key", k.key_id })
    assert.equal(0, code)
    -- both changes in the audit trail, by the user who ran the command,
    -- and the trail verifies
    local audit = require "paygate.audit"
    local es = assert(audit.entries(db, "apikey:shop9"))
    assert.same({ "apikey.created", "apikey.revoked" },
                { es[1].what, es[2].what })
    assert.same({ k.key_id, k.key_id }, { es[1].ref, es[2].ref })
    assert.matches("^cli", es[1].actor)
    assert.equal(es[1].actor, es[2].actor)
    n = n + 1
    local vout = tmp .. "/cmd" .. n .. ".out"
    local p = proc.spawn({ PAYGATE_BIN, "audit", "verify", url, "--subject",
                           "apikey:shop9" }, { log = vout })
    assert.equal(0, p:wait(30), proc.read(vout))
    assert.matches("1 chains, 2 entries, 0 broken", proc.read(vout), 1, true)
    -- a second revoke (or one that lost a race) is told what happened
    code, out = run_cmd({ "revoke", "--db", url, "--key", k.key_id })
    assert.equal(1, code)
    assert.matches("paygate apikey: key " .. k.key_id .. " was revoked"
                   .. " already, at 20%d%d%-", out)
    code, out = run_cmd({ "revoke", "--db", url, "--key", "ak_nope" })
    assert.equal(1, code)
    assert.matches("paygate apikey: no key ak_nope in this store", out, 1,
                   true)
    code, out = run_cmd({ "create", "--db", url })
    assert.equal(2, code)
    assert.matches("create needs --app APP", out, 1, true)
    code, out = run_cmd({ "create", "--db", url, "--app", "bad app" })
    assert.equal(2, code)
    assert.matches("--app must be", out, 1, true)
    db:close()
  end)

  it("refuses a SQLite path with no database (a typo), making no file",
     function()
    local path = tmp .. "/gatway.db"
    for _, args in ipairs({ { "create", "--db", "sqlite:" .. path, "--app",
                              "shop2" }, { "list", "--db", "sqlite:" .. path },
                            { "revoke", "--db", "sqlite://" .. path,
                              "--key", "k" } }) do
      local code, out = run_cmd(args)
      assert.equal(2, code, out)
      assert.matches("no database file " .. path, out, 1, true)
      assert.is_nil(io.open(path))
    end
  end)
end)
