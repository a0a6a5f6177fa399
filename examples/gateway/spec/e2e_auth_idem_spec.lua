-- The gateway's API keys and Idempotency-Key, end to end: refusals are
-- 401 with a reason; a repeated POST replays its answer byte for byte, a
-- reused key with another body is 422, a repeat while the first runs 409.
local S = require "examples.gateway.spec.support"
local core = require "paygate.core"
local apikey = require "paygate.apikey"
local crypto = require "paygate.crypto"
local http = require "paygate.http"

describe("gateway API keys", function()
  local env

  setup(function() env = S.start() end)
  teardown(S.stop)

  local function body()
    return { order_id = S.order_id(), channel = "native", amount = 100,
             description = "auth" }
  end

  it("a signed request passes", function()
    assert.equal(201, env:api("POST", "/v1/payments", body()).status)
  end)

  it("no signature: 401 missing_signature", function()
    local res = env:api("POST", "/v1/payments", body(), { sign = false })
    assert.equal(401, res.status)
    assert.equal("missing_signature", res.json.error)
    res = env:api("GET", "/v1/payments/pay_x", nil, { sign = false })
    assert.equal(401, res.status)
  end)

  it("a malformed header: 401 malformed_signature", function()
    local res = env:api("GET", "/v1/payments/pay_x", nil, { sign = false,
      headers = { Authorization = apikey.SCHEME .. ' app_id="shop"' } })
    assert.equal(401, res.status)
    assert.equal("malformed_signature", res.json.error)
    -- a signature that is not 64 hex digits is the header's format at
    -- fault, from a key the gateway knows too
    local h = apikey.sign{ app_id = env.key.app_id, key_id = env.key.key_id,
      secret = env.key.secret, method = "GET", path = "/v1/payments/pay_x" }
    res = env:api("GET", "/v1/payments/pay_x", nil, { sign = false,
      headers = { Authorization = h.Authorization:gsub('signature="%x+"',
                                                       'signature="abc"') } })
    assert.equal(401, res.status)
    assert.equal("malformed_signature", res.json.error)
  end)

  it("a wrong secret, or a changed body: 401 bad_signature", function()
    local res = env:api("GET", "/v1/payments/pay_x", nil,
                        { secret = "sk_wrong" })
    assert.equal(401, res.status)
    assert.equal("bad_signature", res.json.error)
    -- signed over one body, sent with another
    local b = body()
    local h = apikey.sign{ app_id = env.key.app_id, key_id = env.key.key_id,
      secret = env.key.secret, method = "POST", path = "/v1/payments",
      body = require("cjson").encode(b), idempotency_key = "k-body" }
    b.amount = 1
    local sent = require("cjson").encode(b)
    res = env:api("POST", "/v1/payments", sent, { sign = false, key = "k-body",
      headers = { Authorization = h.Authorization } })
    assert.equal(401, res.status)
    assert.equal("bad_signature", res.json.error)
    -- the answer shows what the gateway signed over (the body it read),
    -- for the caller to compare; never the signature or a key
    local ts = h.Authorization:match('timestamp="(%d+)"')
    assert.equal("POST\n/v1/payments\n" .. ts .. "\nk-body\n" .. sent,
                 res.json.string_to_sign)
    assert.equal(crypto.hex(crypto.digest("sha256", sent)),
                 res.json.body_sha256)
    local sig = h.Authorization:match('signature="(%x+)"')
    for _, sec in ipairs({ sig, env.key.secret,
        crypto.hex(apikey.signing_key(env.key.secret)) }) do
      assert.is_nil(res.body:find(sec, 1, true), sec)
    end
  end)

  it("a signed request sent again under another Idempotency-Key: 401, it"
     .. " does not run again", function()
    local b = body()
    local raw = require("cjson").encode(b)
    local h = apikey.sign{ app_id = env.key.app_id, key_id = env.key.key_id,
      secret = env.key.secret, method = "POST", path = "/v1/payments",
      body = raw, idempotency_key = "k-first" }
    local res = env:api("POST", "/v1/payments", raw, { sign = false,
      key = "k-first", headers = { Authorization = h.Authorization } })
    assert.equal(201, res.status, res.body)
    -- the same bytes and Authorization: the first answer, replayed
    local again = env:api("POST", "/v1/payments", raw, { sign = false,
      key = "k-first", headers = { Authorization = h.Authorization } })
    assert.equal(201, again.status)
    assert.equal(res.body, again.body)
    -- captured and sent under another key (or none): refused
    for _, k in ipairs{ "k-second", false } do
      local other = env:api("POST", "/v1/payments", raw, { sign = false,
        key = k, headers = { Authorization = h.Authorization } })
      assert.equal(401, other.status, other.body)
      assert.equal("bad_signature", other.json.error)
    end
  end)

  it("an old timestamp: 401 stale_timestamp", function()
    local res = env:api("GET", "/v1/payments/pay_x", nil,
                        { timestamp = math.floor(core.time()) - 301 })
    assert.equal(401, res.status)
    assert.equal("stale_timestamp", res.json.error)
  end)

  it("an unknown key or app: 401 unknown_app; a revoked key: 401"
     .. " revoked_key, saying so", function()
    local res = env:api("GET", "/v1/payments/pay_x", nil,
                        { key_id = "ak_nosuchkey" })
    assert.equal(401, res.status)
    assert.equal("unknown_app", res.json.error)
    res = env:api("GET", "/v1/payments/pay_x", nil, { app_id = "intruder" })
    assert.equal(401, res.status)
    assert.equal("unknown_app", res.json.error)
    local k = assert(apikey.create(env.db, "shop"))
    local o = { key_id = k.key_id, secret = k.secret }
    assert.equal(404, env:api("GET", "/v1/payments/pay_x", nil, o).status)
    assert.is_true(apikey.revoke(env.db, k.key_id))
    -- a worker trusts a looked-up key for a few seconds (apikey's cache)
    local res
    S.wait_until(function()
      res = env:api("GET", "/v1/payments/pay_x", nil, o)
      return res.status == 401
    end, 15, "the revoked key refused")
    assert.equal("revoked_key", res.json.error)
    assert.matches("key " .. k.key_id .. " of app shop was revoked at ",
                   res.json.message, 1, true)
  end)

  it("the notification route and /openapi.json need no key", function()
    local res = env:api("GET", "/openapi.json", nil, { sign = false })
    assert.equal(200, res.status)
    res = env:post_notify("{}", { ["Content-Type"] = "application/json" })
    -- refused by the notification's own check (WeChat's FAIL body and
    -- scheme: no signature headers), not by the API keys (their 401 has
    -- an error field and the PAYGATE-HMAC-SHA256 scheme)
    assert.equal("FAIL", res.json.code, res.body)
    assert.equal("malformed", res.json.message)
    assert.matches("^WECHATPAY2%-", res.headers["www-authenticate"])
  end)
end)

describe("gateway idempotency", function()
  local env

  setup(function() env = S.start() end)
  teardown(S.stop)
  after_each(function() env.sim:clear_faults() end)

  local function body()
    return { order_id = S.order_id(), channel = "native", amount = 100,
             description = "idem" }
  end

  it("a POST needs an Idempotency-Key", function()
    local res = env:api("POST", "/v1/payments", body(), { key = false })
    assert.equal(400, res.status, res.body)
  end)

  it("a repeat replays the first answer byte for byte, doing nothing again",
     function()
    local b = body()
    local first = env:api("POST", "/v1/payments", b, { key = "create-1" })
    assert.equal(201, first.status, first.body)
    local prepays = 0
    for _, r in ipairs(env.sim:requests()) do
      if r.endpoint == "prepay" then prepays = prepays + 1 end
    end
    local again = env:api("POST", "/v1/payments", b, { key = "create-1" })
    assert.equal(201, again.status)
    assert.equal(first.body, again.body)
    assert.equal("true", again.headers["idempotent-replayed"])
    local after = 0
    for _, r in ipairs(env.sim:requests()) do
      if r.endpoint == "prepay" then after = after + 1 end
    end
    assert.equal(prepays, after)
    -- an error answer that ran is replayed too
    local p = first.json.payment
    local r1 = env:api("POST", "/v1/payments/" .. p.id .. "/refunds",
                       { amount = 1 }, { key = "refund-early" })
    assert.equal(409, r1.status)
    local r2 = env:api("POST", "/v1/payments/" .. p.id .. "/refunds",
                       { amount = 1 }, { key = "refund-early" })
    assert.equal(r1.status, r2.status)
    assert.equal(r1.body, r2.body)
  end)

  it("the same key with another body: 422", function()
    local b = body()
    assert.equal(201, env:api("POST", "/v1/payments", b,
                              { key = "create-2" }).status)
    b.amount = 101
    local res = env:api("POST", "/v1/payments", b, { key = "create-2" })
    assert.equal(422, res.status, res.body)
    assert.equal("idempotency_key_reused", res.json.error)
  end)

  it("keys are per app: another app's same key is its own", function()
    local other = assert(apikey.create(env.db, "other_app"))
    local b = body()
    assert.equal(201, env:api("POST", "/v1/payments", b,
                              { key = "shared-key" }).status)
    b.order_id = S.order_id()
    local res = env:api("POST", "/v1/payments", b, { key = "shared-key",
      app_id = other.app_id, key_id = other.key_id, secret = other.secret })
    assert.equal(201, res.status, res.body)
  end)

  it("a repeat while the first still runs: 409, then the replay",
     function()
    -- WeChat holds the prepay until the repeat has been answered: the
    -- first request is in flight for as long as the spec needs
    local h = env.sim:hold("prepay")
    local b = body()
    local first
    core.spawn(function()
      first = env:api("POST", "/v1/payments", b, { key = "slow-1" })
    end)
    -- the simulator holds the prepay: the gateway began it
    h:wait_held()
    local second = env:api("POST", "/v1/payments", b, { key = "slow-1" })
    assert.equal(409, second.status, second.body)
    assert.equal("idempotency_in_flight", second.json.error)
    assert.matches("^%d+$", second.headers["retry-after"] or "")
    h:release()
    S.wait_until(function() return first ~= nil end, 15, "the first answer")
    assert.equal(201, first.status, first.body)
    local third = env:api("POST", "/v1/payments", b, { key = "slow-1" })
    assert.equal(first.body, third.body)
  end)
end)
