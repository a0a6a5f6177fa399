-- paygate.wechatpay when WeChat is slow or down (upstream.lua), against
-- spec/support/wxapi_server on loopback: adaptive timeouts, the circuit
-- breaker (requests counted at the server), the degradation switch seen
-- by another worker, and paygate_wechatpay_calls_total on /metrics.
local core = require "paygate.core"
local metrics = require "paygate.metrics"
local wechatpay = require "paygate.wechatpay"
local upstream = require "paygate.wechatpay.upstream"
local wxapi = require "support.wxapi"
local server = require "support.server"
local proc = require "support.proc"

local MCHID = wxapi.MCHID
local calls = metrics.counter("paygate_wechatpay_calls_total", "",
                              { "endpoint", "outcome", "kind" })

describe("upstream.endpoint", function()
  it("names a call by method and path template: no ids, no query",
     function()
    assert.equal("GET /v3/pay/transactions/out-trade-no/{}",
      upstream.endpoint("GET", "/v3/pay/transactions/out-trade-no/"
                        .. "PG123?mchid=1900000001"))
    assert.equal("POST /v3/pay/transactions/out-trade-no/{}/close",
      upstream.endpoint("POST", "/v3/pay/transactions/out-trade-no/abc/close"))
    assert.equal("GET /v3/refund/domestic/refunds/{}",
      upstream.endpoint("GET", "/v3/refund/domestic/refunds/refund"))
    assert.equal("POST /v3/pay/transactions/native",
      upstream.endpoint("POST", "/v3/pay/transactions/native"))
    -- every path the client calls has a name of its own (its breaker,
    -- its timeout, its line on /metrics)
    assert.equal("POST /v3/refund/domestic/refunds/{}/apply-abnormal-refund",
      upstream.endpoint("POST", "/v3/refund/domestic/refunds/50300/"
                        .. "apply-abnormal-refund"))
    assert.equal("POST /v3/merchant/media/video_upload",
      upstream.endpoint("POST", "/v3/merchant/media/video_upload"))
    -- hostile paths: ids and depth never make new names past a bound
    local names = {}
    for i = 1, 2000 do
      names[upstream.endpoint("GET", "/v3/" .. ("x" .. i .. "/"):rep(i % 20)
                                     .. "?q=" .. i)] = true
    end
    local n = 0
    for name in pairs(names) do
      n = n + 1
      assert.is_true(#name < 60, name)
    end
    assert.is_true(n <= 10, n)
  end)

  it("classifies results into a fixed set of outcomes", function()
    local e = core.error
    assert.same({ "ok", "" }, { upstream.outcome({ status = 200 }) })
    assert.same({ "http_4xx", "not_found" },
      { upstream.outcome(nil, e("not_found", "x", { status = 404 })) })
    assert.same({ "http_5xx", "system_error" },
      { upstream.outcome(nil, e("system_error", "x", { status = 503 })) })
    assert.same({ "timeout", "timeout" },
      { upstream.outcome(nil, e("timeout", "x")) })
    assert.same({ "unavailable", "connect" },
      { upstream.outcome(nil, e("connect", "x")) })
    assert.same({ "unverified_response", "unverified_response" },
      { upstream.outcome(nil, e("unverified_response", "x",
                                { status = 200 })) })
    assert.same({ "error", "other" },
      { upstream.outcome(nil, e("made_up_" .. ("z"):rep(99), "x")) })
    -- an unknown outcome's kind is what left it unknown: a timeout, or a
    -- connection lost after sending (kind="unknown_outcome" said neither)
    assert.same({ "unknown_outcome", "timeout" },
      { upstream.outcome(nil, e("unknown_outcome", "x",
                                { cause_kind = "timeout" })) })
    assert.same({ "unknown_outcome", "closed" },
      { upstream.outcome(nil, e("unknown_outcome", "x",
                                { cause_kind = "closed" })) })
    assert.same({ "unverified_response", "bad_signature" },
      { upstream.outcome(nil, e("unverified_response", "x",
        { status = 200, cause_kind = "bad_signature" })) })
    -- bounded: a cause of no known kind is "other"
    assert.same({ "unknown_outcome", "other" },
      { upstream.outcome(nil, e("unknown_outcome", "x",
                                { cause_kind = "made_up" })) })
    assert.same({ "unknown_outcome", "unknown_outcome" },
      { upstream.outcome(nil, e("unknown_outcome", "x")) })
  end)

  it("computes p95 x 1.8 + 0.2 within the floor and the ceiling",
     function()
    assert.near(0.74, upstream.adaptive_timeout(0.3, 0.1, 10), 1e-9)
    assert.equal(1, upstream.adaptive_timeout(0.01, 1, 10))
    assert.equal(10, upstream.adaptive_timeout(30, 1, 10))
  end)
end)

describe("paygate.wechatpay against a slow or failing WeChat", function()
  local stub
  setup(function() stub = wxapi.start() end)
  teardown(function() if stub then stub:stop() end end)
  before_each(function() stub:reset() end)

  -- each test its own dict: its own breakers and switch
  local n = 0
  local function client(extra)
    n = n + 1
    local conf = { shared_dict = "spec_upstream_" .. n, max_attempts = 1 }
    for k, v in pairs(extra or {}) do conf[k] = v end
    return stub:client(conf)
  end

  local function get(wx, path)
    return wx:request("GET", path .. "?mchid=" .. MCHID)
  end

  it("refuses bad upstream settings (invalid_config naming the key)",
     function()
    for key, v in pairs({ timeout_floor = 0, breaker_failure_ratio = 1.5,
                          breaker_min_calls = 2.5, degraded = "yes",
                          breaker = 1, timeout_samples = 500 }) do
      local _, err = wechatpay.client{ mchid = MCHID, [key] = v,
        merchant_private_key = wxapi.FIX .. "a1_merchant_key.pem",
        merchant_serial = wxapi.SERIAL, apiv3_key = wxapi.APIV3,
        public_key = wxapi.FIX .. "a7_platform_pubkey.pem",
        public_key_id = wxapi.PUB_ID, base_url = "http://127.0.0.1:1" }
      assert.equal("invalid_config", err and err.kind, key)
      assert.equal(key, err.key)
    end
  end)

  it("adapts an endpoint's timeout to slow, then fast answers", function()
    local wx = client{ timeout = 5, timeout_samples = 5, latency_window = 10,
                       timeout_floor = 1, timeout_ceiling = 4,
                       breaker = false }
    local P = "/v3/pay/transactions/id/4200000001"
    local EP = "GET /v3/pay/transactions/id/{}"
    local function status() return wx:upstream_status().endpoints[EP] end
    stub:can("GET", P, 200, { trade_state = "SUCCESS" }, { delay = 0.6,
                                                             times = 5 })
    for i = 1, 4 do assert(get(wx, P)) end
    assert.equal(5, status().timeout)          -- configured: 4 samples only
    assert(get(wx, P))
    local s = status()
    assert.equal(5, s.samples)
    assert.is_true(s.p95 >= 0.6 and s.p95 < 2, s.p95)
    assert.equal(upstream.adaptive_timeout(s.p95, 1, 4), s.timeout)
    assert.is_true(s.timeout >= 1.28, s.timeout)
    -- fast answers push the slow ones out of the window: the floor
    stub:can("GET", P, 200, { trade_state = "SUCCESS" })
    for i = 1, 10 do assert(get(wx, P)) end
    s = status()
    assert.is_true(s.p95 < 0.44, s.p95)       -- 0.44 x 1.8 + 0.2 = 1
    assert.equal(1, s.timeout)
    -- and the adapted timeout is the one used: a 2.5 s answer times out
    stub:reset()
    stub:can("GET", P, 200, { trade_state = "SUCCESS" }, { delay = 2.5 })
    local timeouts = calls:get({ EP, "timeout", "timeout" })
    local _, err = get(wx, P)
    assert.equal("timeout", err.kind)
    assert.equal(timeouts + 1, calls:get({ EP, "timeout", "timeout" }))
    -- that timeout is a sample at 1 s: the p95 of the window, so it grows
    s = status()
    assert.is_true(s.p95 >= 0.95, s.p95)
    assert.equal(upstream.adaptive_timeout(s.p95, 1, 4), s.timeout)
    assert.is_true(s.timeout >= 1.9, s.timeout)
    -- a call's own opts.timeout still wins
    local res = wx:request("GET", P .. "?mchid=" .. MCHID, nil,
                           { timeout = 4 })
    assert.equal(200, res.status)
  end)

  -- A POST cut short by its timeout said only "timeout after the request
  -- may have been received": an operator could not tell WeChat answering
  -- in 1 s from an adaptive timeout of 0.3 s learnt on fast answers, nor
  -- how often the call had tried
  it("an unknown outcome says the attempt's timeout, whose it was, and "
     .. "the attempts", function()
    local wx = client{ timeout = 5, timeout_samples = 5, latency_window = 10,
                       timeout_floor = 0.3, timeout_ceiling = 4,
                       breaker = false, max_attempts = 2 }
    local P = "/v3/pay/transactions/native"
    local EP = "POST " .. P
    local body = '{"mchid":"' .. MCHID .. '"}'
    stub:can("POST", P, 200, { code_url = "weixin://x" })
    for _ = 1, 5 do
      assert(wx:request("POST", P, body, { idempotent = true }))
    end
    local s = wx:upstream_status().endpoints[EP]
    assert.equal("adaptive", s.timeout_source)
    assert.equal(0.3, s.timeout)
    stub:reset()
    stub:can("POST", P, 200, { code_url = "weixin://x" }, { delay = 1 })
    local _, err = wx:request("POST", P, body, { idempotent = true })
    assert.equal("unknown_outcome", err.kind)
    local m = err.message
    assert.truthy(m:find("timed out", 1, true), m)
    assert.truthy(m:find("the attempt's timeout was 0.3 s: adaptive", 1,
                         true), m)
    assert.truthy(m:find("2 attempts", 1, true), m)
    -- a call's own timeout is named as such
    _, err = wx:request("POST", P, body, { timeout = 0.2 })
    assert.equal("unknown_outcome", err.kind)
    assert.truthy(err.message:find("the attempt's timeout was 0.2 s: the"
                                   .. " call's own timeout", 1, true),
                  err.message)
    assert.truthy(err.message:find("1 attempt)", 1, true), err.message)
    wx:stop()
  end)

  it("a timeout before the request was sent (a TLS handshake that never "
     .. "ends) is no latency sample", function()
    -- a listener that never accepts: the kernel completes the TCP
    -- handshake, nobody answers the TLS one
    local ffi = require "ffi"
    pcall(ffi.cdef, [[
      struct hf_sockaddr_in { unsigned short family; unsigned short port;
                              unsigned int addr; char zero[8]; };
      int socket(int domain, int type, int protocol);
      int bind(int fd, const void *addr, unsigned int len);
      int listen(int fd, int backlog);
      int close(int fd);
      unsigned short htons(unsigned short v);
    ]])
    local port = core.free_port()
    local fd = ffi.C.socket(2, 1, 0)
    local a = ffi.new("struct hf_sockaddr_in")
    a.family, a.port, a.addr = 2, ffi.C.htons(port), 0x0100007f
    assert(fd >= 0 and ffi.C.bind(fd, a, ffi.sizeof(a)) == 0
           and ffi.C.listen(fd, 16) == 0, "listen")
    local wx = client{ base_url = "https://127.0.0.1:" .. port,
                       timeout = 0.3, timeout_samples = 3, latency_window = 10,
                       timeout_floor = 0.1, timeout_ceiling = 4,
                       breaker = false }
    local EP = "GET /v3/pay/transactions/id/{}"
    for i = 1, 4 do
      local _, err = get(wx, "/v3/pay/transactions/id/4200000009")
      assert.equal("timeout", err.kind)
      assert.is_false(err.sent)
    end
    ffi.C.close(fd)
    local s = wx:upstream_status().endpoints[EP]
    assert.equal(0, s and s.samples or 0)
    assert.equal(0.3, s and s.timeout or 0.3)
    wx:stop()
  end)

  it("opens the breaker after failures, fails fast without sending, "
     .. "lets one probe through half-open, closes on success", function()
    local wx = client{ breaker_min_calls = 4, breaker_failure_ratio = 0.5,
                       breaker_window = 3600, breaker_open_for = 1.5 }
    local P = "/v3/pay/transactions/out-trade-no/PG1"
    local EP = "GET /v3/pay/transactions/out-trade-no/{}"
    local function state() return wx:upstream_status().endpoints[EP].breaker end
    local function sent() return #stub:requests() end
    local ok0 = calls:get({ EP, "ok", "" })
    local open0 = calls:get({ EP, "circuit_open", "circuit_open" })
    local fail0 = calls:get({ EP, "http_5xx", "system_error" })
    stub:can("GET", P, 500, { code = "SYSTEM_ERROR", message = "busy" })
    -- a 4xx is an answer: it never opens the breaker
    stub:can("GET", "/v3/pay/transactions/out-trade-no/NF", 404,
             { code = "ORDER_NOT_EXIST", message = "no" })
    for i = 1, 6 do
      local _, err = get(wx, "/v3/pay/transactions/out-trade-no/NF")
      assert.equal("not_found", err.kind)
    end
    assert.equal("closed", state())
    for i = 1, 5 do
      local _, err = get(wx, P)
      assert.equal("system_error", err.kind)
    end
    -- 11 attempts, 5 failed: under the ratio yet; the 6th failure opens
    assert.equal("closed", state())
    local _, err = get(wx, P)
    assert.equal("system_error", err.kind)
    assert.equal("open", state())
    local before = sent()
    assert.equal(12, before)
    local t0 = core.mono()
    for i = 1, 5 do
      _, err = get(wx, P)
      assert.equal("circuit_open", err.kind)
      assert.is_true(err.retryable)
      assert.is_true(err.retry_after > 0 and err.retry_after <= 1.5)
    end
    assert.equal(before, sent())              -- nothing reached the server
    assert.equal(open0 + 5, calls:get({ EP, "circuit_open", "circuit_open" }))
    -- half-open: a failing probe opens it again
    core.sleep(math.max(0, 1.5 - (core.mono() - t0)) + 0.05)  -- cool-down
    _, err = get(wx, P)
    assert.equal("system_error", err.kind)
    assert.equal(before + 1, sent())
    assert.equal("open", state())
    _, err = get(wx, P)
    assert.equal("circuit_open", err.kind)
    assert.equal(before + 1, sent())
    -- half-open again: one probe at a time; its success closes
    core.sleep(err.retry_after + 0.05)
    stub:reset()
    stub:can("GET", P, 200, { trade_state = "NOTPAY" }, { delay = 1 })
    local probe = core.spawn(function() return get(wx, P) end)
    proc.wait_until(function() return #stub:requests() == 1 end, 10,
                    "the probe at the server")
    assert.equal("half_open", state())
    _, err = get(wx, P)
    assert.equal("circuit_open", err.kind)    -- while the probe is out
    local res = assert(probe:wait())
    assert.equal(200, res.status)
    assert.equal("closed", state())
    for i = 1, 3 do assert(get(wx, P)) end
    assert.equal(4, #stub:requests())
    assert.equal(ok0 + 4, calls:get({ EP, "ok", "" }))
    assert.equal(fail0 + 7, calls:get({ EP, "http_5xx", "system_error" }))
  end)

  -- upstream_status() listed only the endpoints the asking worker had
  -- called: an operator asking a worker that had not (GET /admin/upstream
  -- lands on any) saw no breaker at all while another worker's calls had
  -- opened it, and nothing said when a probe would go
  it("lists every breaker of the shared dict, whichever client asks, "
     .. "with the seconds until a probe may go", function()
    n = n + 1
    local conf = { shared_dict = "spec_upstream_" .. n, max_attempts = 1,
                   breaker_min_calls = 2, breaker_failure_ratio = 0.5,
                   breaker_window = 3600, breaker_open_for = 30 }
    local a, b = stub:client(conf), stub:client(conf)  -- two workers
    local P = "/v3/pay/transactions/out-trade-no/PG9"
    local EP = "GET /v3/pay/transactions/out-trade-no/{}"
    stub:can("GET", P, 500, { code = "SYSTEM_ERROR", message = "busy" })
    for _ = 1, 3 do get(a, P) end
    assert.equal("open", a:upstream_status().endpoints[EP].breaker)
    local e = b:upstream_status().endpoints[EP]
    assert.truthy(e, "the other client does not list " .. EP)
    assert.equal("open", e.breaker)
    assert.is_true(e.retry_after > 25 and e.retry_after <= 30,
                   tostring(e.retry_after))
    assert.is_true(e.failures >= 2)
    -- b's own view of the timeout: it saw no answer of it
    assert.equal(0, e.samples)
    assert.equal("configured", e.timeout_source)
    a:stop(); b:stop()
  end)

  -- The breakers' registry is in the dict, which is LRU, and no call
  -- reads it: evicted, its endpoints were never listed again (each worker
  -- registered an endpoint once, when it first met it; an evicted counter
  -- restarted the numbering over the first entry)
  it("lists the breakers again after the dict evicted their registry, at "
     .. "the endpoints' next calls", function()
    n = n + 1
    local name = "spec_upstream_" .. n
    -- small, so that other entries evict the registry
    local d = require("paygate.shared").get_dict(name, "128k")
    local conf = { shared_dict = name, max_attempts = 1, breaker_window = 1 }
    local a, b = stub:client(conf), stub:client(conf)  -- two workers
    local EP1 = "GET /v3/pay/transactions/out-trade-no/{}"
    local EP2 = "GET /v3/refund/domestic/refunds/{}"
    local function call_both()
      get(a, "/v3/pay/transactions/out-trade-no/PG7")
      get(a, "/v3/refund/domestic/refunds/RF7")
    end
    local function listed()
      local eps = b:upstream_status().endpoints
      return eps[EP1] ~= nil and eps[EP2] ~= nil
    end
    call_both()
    assert.is_true(listed())
    -- other entries fill the dict: everything older is evicted
    local fill = ("x"):rep(1000)
    for i = 1, 400 do assert(d:set("spec:fill:" .. i, fill)) end
    assert.is_false(listed())
    call_both()
    assert.is_true(listed(), "not listed after the next calls")
    -- the registry alone evicted (the breakers' counts kept, as a
    -- registry nobody reads goes first): listed again within a breaker
    -- window of calls
    d:delete("wechatpay:" .. MCHID .. ":cb:eps")
    assert.is_false(listed())
    proc.wait_until(function() call_both(); return listed() end, 10,
                    "the endpoints listed again")
    a:stop(); b:stop()
  end)

  it("a 500 whose code says the request is wrong (OPENID_MISMATCH) is an "
     .. "answer: it does not open the breaker", function()
    local wx = client{ breaker_min_calls = 4, breaker_failure_ratio = 0.5,
                       breaker_window = 3600, breaker_open_for = 10 }
    local P = "/v3/pay/transactions/id/4200000007"
    local EP = "GET /v3/pay/transactions/id/{}"
    stub:can("GET", P, 500, { code = "OPENID_MISMATCH",
                              message = "openid和appid不匹配" })
    for i = 1, 6 do
      local _, err = get(wx, P)
      assert.equal("param_error", err.kind)
      assert.is_false(err.retryable)
    end
    assert.equal(6, #stub:requests())
    assert.equal("closed", wx:upstream_status().endpoints[EP].breaker)
    assert.equal(0, wx:upstream_status().endpoints[EP].failures)
    wx:stop()
  end)

  it("a primary domain that cannot be reached, with the backup answering, "
     .. "does not open the breaker; a probe goes on to the backup",
     function()
    -- nothing listens on the primary: every call switches to the backup
    -- domain before anything was sent, and the backup answers
    local wx = client{ base_url = "http://127.0.0.1:" .. core.free_port(),
                       backup_url = stub:base_url(), breaker_min_calls = 4,
                       breaker_failure_ratio = 0.5, breaker_window = 3600,
                       breaker_open_for = 1 }
    local P = "/v3/pay/transactions/out-trade-no/PG5"
    local EP = "GET /v3/pay/transactions/out-trade-no/{}"
    local function state() return wx:upstream_status().endpoints[EP].breaker end
    stub:can("GET", P, 200, { trade_state = "NOTPAY" })
    for i = 1, 8 do
      local res, err = get(wx, P)
      assert.is_truthy(res, "call " .. i .. ": " .. tostring(err))
    end
    assert.equal(8, #stub:requests())
    assert.equal("closed", state())
    -- the backup failing too opens it (its 5xx are failures): 8 of 16
    stub:reset()
    stub:can("GET", P, 500, { code = "SYSTEM_ERROR", message = "busy" })
    local err
    for i = 1, 7 do
      _, err = get(wx, P)
      assert.equal("system_error", err.kind)
    end
    assert.equal("closed", state())
    _, err = get(wx, P)
    assert.equal("system_error", err.kind)
    assert.equal("open", state())
    _, err = get(wx, P)
    assert.equal("circuit_open", err.kind)
    -- half-open: the probe cannot reach the primary and goes on to the
    -- backup, whose answer closes the breaker
    core.sleep(err.retry_after + 0.05)
    stub:reset()
    stub:can("GET", P, 200, { trade_state = "NOTPAY" })
    local res
    res, err = get(wx, P)
    assert.is_truthy(res, tostring(err))
    assert.equal("closed", state())
    assert.equal(1, #stub:requests())
    wx:stop()
  end)

  it("degraded: every call fails fast, nothing is sent; off again works",
     function()
    local wx = client()
    local P = "/v3/pay/transactions/out-trade-no/PG2"
    stub:can("GET", P, 200, { trade_state = "NOTPAY" })
    assert.is_false(wx:degraded())
    assert.is_true(wx:degrade(true))
    assert.is_true(wx:degraded())
    local _, err = get(wx, P)
    assert.equal("degraded", err.kind)
    assert.is_true(err.retryable)
    _, err = wx:close("PG20000002")
    assert.equal("degraded", err.kind)
    assert.equal(0, #stub:requests())
    assert.has_error(function() wx:degrade("on") end)
    assert.is_true(wx:degrade(false))
    assert(get(wx, P))
    assert.equal(1, #stub:requests())
  end)

  it("config degraded = true starts on, and does not undo a later switch",
     function()
    local wx = client{ degraded = true }
    local _, err = get(wx, "/v3/pay/transactions/out-trade-no/PG3")
    assert.equal("degraded", err.kind)
    assert(wx:degrade(false))
    -- another client (a worker starting later) on the same dict
    local again = stub:client{ shared_dict = "spec_upstream_" .. n,
                               degraded = true, max_attempts = 1 }
    assert.is_false(again:degraded())
    assert.is_false(wechatpay.degraded("spec_upstream_" .. n))
  end)
end)

describe("the degradation switch and the call counter in a 2-worker app",
         function()
  local stub, s
  local APP = [[
local paygate = require "paygate"
local wechatpay = require "paygate.wechatpay"
local ffi = require "ffi"
pcall(ffi.cdef, "int getpid(void);")
local pid = tostring(ffi.C.getpid())
local conf = paygate.config_copy().spec
local wx
paygate.route("POST", "/degrade/:on", function(req)
  return 200, tostring(wechatpay.degrade(req.params.on == "on"))
end)
-- a POST whose answer takes longer than its timeout: unknown_outcome
paygate.route("POST", "/post", function()
  wx = wx or assert(wechatpay.client(conf))
  local res, err = wx:request("POST", "/v3/pay/transactions/native",
    '{"mchid":"' .. conf.mchid .. '"}', { timeout = 0.2 })
  return 200, pid .. " " .. (res and "ok" or err.kind)
end)
paygate.route("GET", "/call", function()
  wx = wx or assert(wechatpay.client(conf))
  local res, err = wx:request("GET", "/v3/pay/transactions/out-trade-no/"
                              .. "PG9?mchid=" .. conf.mchid)
  return 200, pid .. " " .. (res and "ok" or err.kind)
end)
]]

  setup(function()
    stub = wxapi.start()
    local pwd = assert(io.popen("pwd")):read("*l")
    local F = pwd .. "/" .. wxapi.FIX
    s = server.start{ source = APP, workers = 2, config = { spec = {
      mchid = MCHID, merchant_private_key = F .. "a1_merchant_key.pem",
      merchant_serial = wxapi.SERIAL, apiv3_key = wxapi.APIV3,
      public_key = F .. "a7_platform_pubkey.pem",
      public_key_id = wxapi.PUB_ID, base_url = stub:base_url(),
      backup_url = false, max_attempts = 1 } } }
  end)
  teardown(function()
    if s then s:stop() end
    if stub then stub:stop() end
  end)

  local function call(path, method)
    local res = assert(require("paygate.http").request{
      method = method or "GET", url = s:url(path), timeout = 10,
      headers = { Connection = "close" } })
    assert.equal(200, res.status, res.body)
    return res.body
  end

  it("is seen by every worker, and every call is on /metrics", function()
    stub:can("GET", "/v3/pay/transactions/out-trade-no/PG9", 200,
             { trade_state = "NOTPAY" })
    -- both workers call once while it is off
    local pids, ok_calls, i = {}, 0, 0
    while i < 400 do
      i = i + 1
      local pid, what = call("/call"):match("^(%d+) (%S+)$")
      assert.equal("ok", what)
      ok_calls = ok_calls + 1
      pids[pid] = true
      local n = 0
      for _ in pairs(pids) do n = n + 1 end
      if n == 2 then break end
    end
    local sent = #stub:requests()
    assert.equal(ok_calls, sent)
    assert.equal("true", call("/degrade/on", "POST"))
    local seen, deg = {}, 0
    i = 0
    while i < 400 do
      i = i + 1
      local pid, what = call("/call"):match("^(%d+) (%S+)$")
      assert.equal("degraded", what)
      deg = deg + 1
      seen[pid] = true
      local n = 0
      for _ in pairs(seen) do n = n + 1 end
      if n == 2 and deg >= 4 then break end
    end
    assert.equal(sent, #stub:requests())        -- nothing more was sent
    local body = assert(s:admin_get("/metrics")).body
    assert.matches("# TYPE paygate_wechatpay_calls_total counter\n", body,
                   1, true)
    local ep = 'endpoint="GET /v3/pay/transactions/out-trade-no/{}"'
    assert.is_truthy(body:find("paygate_wechatpay_calls_total{" .. ep
      .. ',outcome="degraded",kind="degraded"} ' .. deg .. "\n", 1, true),
      body)
    assert.is_truthy(body:find("paygate_wechatpay_calls_total{" .. ep
      .. ',outcome="ok",kind=""} ' .. ok_calls .. "\n", 1, true), body)
    assert.equal("true", call("/degrade/off", "POST"))
    assert.equal("ok", call("/call"):match(" (%S+)$"))
  end)

  -- on call: WeChat slow or gone showed as outcome="unknown_outcome",
  -- kind="unknown_outcome" (a timeout? a reset?), and how long calls took
  -- was on no metric
  it("says what left an outcome unknown, and times each call that made"
     .. " an attempt, by endpoint", function()
    local NATIVE = 'endpoint="POST /v3/pay/transactions/native"'
    local QUERY = 'endpoint="GET /v3/pay/transactions/out-trade-no/{}"'
    local function scrape() return assert(s:admin_get("/metrics")).body end
    local function count(body, ep)
      return tonumber(body:match("\npaygate_wechatpay_call_duration_"
        .. "seconds_count{" .. ep:gsub("%p", "%%%0") .. "} (%S+)\n")) or 0
    end
    local before = scrape()
    stub:can("POST", "/v3/pay/transactions/native", 200,
             { code_url = "weixin://x" }, { delay = 1 })
    assert.equal("unknown_outcome", call("/post", "POST"):match(" (%S+)$"))
    local body = scrape()
    assert.is_truthy(body:find("\npaygate_wechatpay_calls_total{" .. NATIVE
      .. ',outcome="unknown_outcome",kind="timeout"} 1\n', 1, true), body)
    assert.is_nil(body:find('kind="unknown_outcome"', 1, true), body)
    assert.is_truthy(body:find("# TYPE paygate_wechatpay_call_duration_"
                               .. "seconds histogram\n", 1, true), body)
    -- the POST's 0.2 s: not under 0.1 s, under 0.25 s (its timeout)
    assert.equal(1, count(body, NATIVE))
    assert.is_truthy(body:find("\npaygate_wechatpay_call_duration_seconds_"
      .. "bucket{" .. NATIVE .. ',le="0.1"} 0\n', 1, true), body)
    assert.is_truthy(body:find("\npaygate_wechatpay_call_duration_seconds_"
      .. "bucket{" .. NATIVE .. ',le="0.25"} 1\n', 1, true), body)
    assert.is_truthy(body:find("\npaygate_wechatpay_call_duration_seconds_"
      .. "bucket{" .. NATIVE .. ',le="30"} 1\n', 1, true), body)
    -- a query answered is timed; one refused by the switch (nothing
    -- tried) is not
    local q0 = count(body, QUERY)
    assert.equal("ok", call("/call"):match(" (%S+)$"))
    assert.equal("true", call("/degrade/on", "POST"))
    assert.equal("degraded", call("/call"):match(" (%S+)$"))
    assert.equal("true", call("/degrade/off", "POST"))
    assert.equal(q0 + 1, count(scrape(), QUERY))
    assert.is_true(q0 >= count(before, QUERY))
  end)
end)
