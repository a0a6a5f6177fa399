-- paygate.wechatpay against spec/support/wxserver, fixes from a review:
-- an idempotent POST that runs out of retries after timeouts is
-- unknown_outcome; a path the HTTP client would rewrite is refused; bodies
-- carry "/" unescaped; downloaded certificates that are expired or whose
-- serial_no lies are not taken; JSON answers with leading whitespace or a
-- BOM decode; transport errors say which call failed.
local core = require "paygate.core"
local wxtest = require "support.wxtest"

local P1, P2 = wxtest.P1, wxtest.P2
-- spec/fixtures/wechatpay/a6_platform_cert.pem: P1's key (A.5), expired
-- in 2025
local EXPIRED = "440024045C4A427599D09BB4E3DE0279F2E813FD"

local dir, keys, srv

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local function count(method, target)
  return wxtest.count(srv, method, target)
end

local function client(over) return wxtest.client(srv, keys, over) end

setup(function()
  dir, keys, srv = wxtest.serve()
  wxtest.ctl(srv, "/_ctl/add_cert", { serial = EXPIRED,
    pem = read("spec/fixtures/wechatpay/a6_platform_cert.pem") })
end)

teardown(function() wxtest.stop(srv, dir) end)

before_each(function() wxtest.fresh(srv, P1) end)

describe("an idempotent POST out of retries after timeouts (S1)", function()
  local function slow(path, n)
    local r = {}
    for i = 1, n do r[i] = { delay = 1.5, body = "{}" } end
    wxtest.queue(srv, "POST", path, r)
  end

  it("wx:request with idempotent is unknown_outcome, retryable", function()
    local wx = client()
    slow("/v3/x", 8)
    local _, err = wx:request("POST", "/v3/x", "{}", { idempotent = true,
                              timeout = 0.5, deadline = 2 })
    wx:stop()
    assert.equal("unknown_outcome", err.kind)
    assert.equal("timeout", err.cause_kind)
    assert.is_true(err.retryable)
    assert.is_true(err.attempts >= 2)               -- it was retried
    assert.is_true(count("POST", "/v3/x") >= 2)
    assert.matches("^POST /v3/x: timeout", err.message)
  end)

  it("a refund whose answers are slow is unknown_outcome", function()
    local wx = client()
    slow("/v3/refund/domestic/refunds", 8)
    local data, err = wx:refund({ out_refund_no = "R20261130001",
      out_trade_no = "T20261130001",
      amount = { refund = 1, total = 1, currency = "CNY" } },
      { timeout = 0.5, deadline = 2 })
    wx:stop()
    assert.is_nil(data)
    assert.equal("unknown_outcome", err.kind)
    assert.equal("timeout", err.cause_kind)
    assert.is_true(err.retryable)
    assert.is_true(count("POST", "/v3/refund/domestic/refunds") >= 2)
  end)

  it("a GET out of retries stays a timeout, naming the call", function()
    local wx = client()
    local r = {}
    for i = 1, 8 do r[i] = { delay = 1.5, body = "{}" } end
    wxtest.queue(srv, "GET", "/v3/slow", r)
    local _, err = wx:request("GET", "/v3/slow?a=1", nil,
                              { timeout = 0.5, deadline = 2 })
    wx:stop()
    assert.equal("timeout", err.kind)
    assert.matches("^timeout: GET /v3/slow: ", tostring(err))
  end)

  it("a transport error names the call", function()
    local wx = client{ base_url = "http://127.0.0.1:" .. core.free_port(),
                       backup_url = false, download_certificates = false,
                       platform_certificates = { keys.p1_cert } }
    local _, err = wx:request("GET", "/v3/y", nil, { deadline = 1 })
    wx:stop()
    assert.equal("connect", err.kind)
    assert.matches("^connect: GET /v3/y: ", tostring(err))
  end)
end)

describe("a path the HTTP client would change is refused (S2)", function()
  local wx
  before_each(function() wx = client() end)
  after_each(function() wx:stop() end)

  for _, path in ipairs({ "/v3/x#frag", "/v3/x?q=1#f", "/v3/中文?q=1",
                          "/v3/x?q=中", "/v3/a/../b", "/v3/a/./b",
                          "/v3/a/..", "/v3/a/.", "/v3/./x", "/v3/x\1",
                          "/v3/x?q=\127" }) do
    it(("%q"):format(path), function()
      local n = #wxtest.requests(srv)
      local res, err = wx:request("GET", path)
      assert.is_nil(res)
      assert.equal("invalid_params", err.kind)
      assert.equal("path", err.field)
      assert.equal(n, #wxtest.requests(srv))          -- nothing sent
    end)
  end

  it("dots that are not segments, and encoded ones, go as given",
     function()
    for _, path in ipairs({ "/v3/a?x=/../y", "/v3/a/%2e%2e/b", "/v3/.a/b.",
                            "/v3/a/...", "/v3/a%23b" }) do
      local res, err = wx:request("GET", path)
      assert.is_table(res, path .. ": " .. tostring(err))
      assert.equal(path, res.json.target)
    end
  end)
end)

describe("request bodies (S5)", function()
  it("go out with '/' unescaped, signed as sent", function()
    local wx = client()
    local res = assert(wx:request("POST", "/v3/echo",
      { notify_url = "https://a.example/wechatpay/notify" }))
    wx:stop()
    assert.equal('{"notify_url":"https://a.example/wechatpay/notify"}',
                 res.json.body)
    local reqs = wxtest.requests(srv)
    assert.equal("ok", reqs[#reqs].auth)
  end)
end)

describe("JSON answers (nit)", function()
  it("decode after leading whitespace or a UTF-8 BOM", function()
    local wx = client()
    wxtest.queue(srv, "GET", "/v3/x", { { body = ' \r\n\t{"a":1}' },
      { body = '\239\187\191{"a":2}' }, { body = '\239\187\191 [3]' } })
    assert.equal(1, assert(wx:request("GET", "/v3/x")).json.a)
    assert.equal(2, assert(wx:request("GET", "/v3/x")).json.a)
    assert.same({ 3 }, assert(wx:request("GET", "/v3/x")).json)
    wx:stop()
  end)
end)

describe("downloaded certificates (S4)", function()
  it("an expired one is skipped; the valid one is taken", function()
    -- platform_ca is P1's own (self-signed) certificate: the expired one
    -- must be dropped for its date before any chain check
    wxtest.certs(srv, { serials = { P1, EXPIRED } })
    local wx = client{ platform_ca = keys.p1_cert }
    assert.same({ P1 }, wx:certificate_status().serials)
    assert(wx:refresh_certificates())
    assert.same({ P1 }, wx:certificate_status().serials)
    wx:stop()
  end)

  it("a download signed only by an expired one is refused", function()
    wxtest.certs(srv, { serials = { EXPIRED }, signer = EXPIRED })
    local wx = client()
    local ok, err = wx:refresh_certificates()
    assert.is_nil(ok)
    assert.equal("unknown_serial", err.kind)
    assert.same({}, wx:certificate_status().serials)
    wx:stop()
  end)

  it("a serial_no that is not the certificate's serial is bad_response",
     function()
    -- P2's certificate, listed under another serial_no
    local liar = "0123456789ABCDEF0123456789ABCDEF01234567"
    wxtest.ctl(srv, "/_ctl/add_cert", { serial = liar,
                                        pem = read(keys.p2_cert) })
    wxtest.certs(srv, { serials = { P1, liar } })
    local wx = client()
    assert.same({}, wx:certificate_status().serials)
    local ok, err = wx:refresh_certificates()
    assert.is_nil(ok)
    assert.equal("bad_response", err.kind)
    assert.matches("serial_no", err.message)
    assert.same({}, wx:certificate_status().serials)
    -- the same certificate under its own serial is taken
    wxtest.certs(srv, { serials = { P1, P2 } })
    assert(wx:refresh_certificates())
    assert.same({ P1, P2 }, wx:certificate_status().serials)
    wx:stop()
  end)
end)
