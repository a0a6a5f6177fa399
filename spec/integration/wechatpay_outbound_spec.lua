-- paygate.wechatpay's outbound side against hostile answers on loopback
-- (spec/support/wxserver and raw servers): what an audit found.
local core = require "paygate.core"
local wxtest = require "support.wxtest"

local P1 = wxtest.P1
local dir, keys, srv

local function client(over) return wxtest.client(srv, keys, over) end

setup(function() dir, keys, srv = wxtest.serve() end)
teardown(function() wxtest.stop(srv, dir) end)
before_each(function() wxtest.fresh(srv, P1) end)

describe("an attempt with less than a millisecond left", function()
  it("still times out (a timeout that rounds to 0 ms is no timeout to "
     .. "libcurl)", function()
    local wx = client()
    wxtest.queue(srv, "GET", "/v3/slow", { { delay = 10, body = "{}" } })
    local t0 = core.mono()
    local _, err = wx:request("GET", "/v3/slow", nil,
                              { timeout = 0.0004, max_attempts = 1 })
    local took = core.mono() - t0
    wx:stop()
    assert.is_nil(_)
    assert.equal("timeout", err.kind, tostring(err))
    -- at once, not the client's timeout (5 s) nor the 10 s answer: room
    -- for a loaded machine
    assert.is_true(took < 3.5, ("took %.2f s"):format(took))
  end)
end)

-- A WeChat as hostile as HTTP allows (spec/support/hostile_http.py picks
-- the answer by the path's last segment): every call ends within bounds,
-- a redirect is not followed, and a POST that may have been received is
-- unknown_outcome, never a plain failure.
describe("a hostile upstream", function()
  local slow_http = require "support.slow_http"
  local port, log, hwx, hostile
  setup(function()
    port, log, hostile = slow_http.hostile(dir)
  end)
  teardown(function() hostile:stop() end)
  before_each(function()
    hwx = client{ base_url = "http://127.0.0.1:" .. port, backup_url = false,
                  platform_certificates = { keys.p1_cert },
                  download_certificates = "manual", breaker = false }
  end)
  after_each(function() hwx:stop() end)

  local function requests(target) return slow_http.count(log, target) end

  local function timed(f)
    local t0 = core.mono()
    local a, b = f()
    return a, b, core.mono() - t0
  end

  it("an error body that never ends is cut at 64 KiB on a streamed "
     .. "download, not read until the timeout", function()
    local got = 0
    local res, err, took = timed(function()
      return hwx:request("GET", "/v3/billdownload/endless500", nil, {
        unsigned = true, timeout = 9, max_attempts = 1,
        sink = function(c) got = got + #c; return true end })
    end)
    assert.is_nil(res)
    assert.equal(0, got)                       -- never the sink's
    assert.equal("system_error", err.kind, tostring(err))
    assert.equal(500, err.status)
    -- 64 KiB of it, not the 9 s timeout: room for a loaded machine
    assert.is_true(took < 4, ("took %.2f s"):format(took))
  end)
  -- last segment, method, opts -> kind, cause_kind, requests made,
  -- seconds at most (each attempt's timeout is 1 s, the call's deadline
  -- 10 s, the client's own timeout 5 s: the bounds leave a loaded
  -- machine room and stay under what a timeout not applied would take)
  local cases = {
    { "redirect", "GET", {}, "http_error", nil, 1, 3 },
    { "redirect", "POST", {}, "http_error", nil, 1, 3 },
    -- no HTTP at all (an SSH banner): not retried, a resend would reach
    -- the same peer of another protocol
    { "garbage", "GET", { max_attempts = 2 }, "closed", nil, 1, 3.5 },
    { "garbage", "POST", {}, "unknown_outcome", "closed", 1, 3 },
    { "hugehead", "GET", {}, "header_too_large", nil, 1, 3 },
    { "hugehead", "POST", {}, "unknown_outcome", "header_too_large", 1, 3 },
    -- (a timeout of 3 s: reading up to the body limit took over 1 s on a
    -- loaded machine once, and the GET's retry made it 2 requests)
    { "endless200", "GET", { timeout = 3 }, "body_too_large", nil, 1, 3.5 },
    { "endless200", "POST", { idempotent = true, timeout = 3 },
      "unknown_outcome", "body_too_large", 1, 3.5 },
    { "hang500", "POST", {}, "unknown_outcome", "timeout", 1, 4 },
    { "silent", "POST", { idempotent = true, max_attempts = 2 },
      "unknown_outcome", "timeout", 2, 6 },
    { "endless500", "GET", { max_attempts = 1 }, "body_too_large", nil, 1,
      3.5 },
  }
  for i, c in ipairs(cases) do
    it(("%s %s: %s"):format(c[2], c[1], c[4]), function()
      local target = "/v3/h" .. i .. "/" .. c[1]
      local o = { timeout = 1, deadline = 10 }
      for k, v in pairs(c[3]) do o[k] = v end
      local res, err, took = timed(function()
        return hwx:request(c[2], target, c[2] == "POST" and "{}" or nil, o)
      end)
      assert.is_nil(res)
      assert.equal(c[4], err.kind, tostring(err))
      assert.equal(c[5], err.cause_kind)
      assert.equal(c[6], requests(target))
      assert.equal(0, requests("/target"))        -- never followed
      assert.is_true(took < c[7], ("took %.2f s"):format(took))
      -- the call and what was wrong, printable, bounded
      assert.matches("^" .. c[2] .. " /v3/h" .. i .. "/", err.message)
      assert.is_true(#err.message < 1024, #err.message)
      assert.is_nil(err.message:find("[%z\1-\31\127]"))
    end)
  end
end)

describe("Retry-After on a 429 or 503", function()
  local json = require "cjson.safe"
  local wx
  before_each(function() wx = client() end)
  after_each(function() wx:stop() end)

  local function count(method, target)
    return wxtest.count(srv, method, target)
  end

  it("longer than the deadline's rest: no retry, err.retry_after says it",
     function()
    local r = {}
    for i = 1, 4 do
      r[i] = { status = 503, body = "", headers = { ["Retry-After"] = "30" } }
    end
    wxtest.queue(srv, "GET", "/v3/ra1", r)
    local t0 = core.mono()
    local _, err = wx:request("GET", "/v3/ra1", nil, { deadline = 10 })
    assert.equal("system_error", err.kind)
    assert.equal(30, err.retry_after)
    assert.equal(1, count("GET", "/v3/ra1"))
    -- at once, not waiting out the 10 s deadline: room for a loaded
    -- machine
    local took = core.mono() - t0
    assert.is_true(took < 4, ("took %.2f s"):format(took))
  end)
  it("within the deadline: the retry waits that long", function()
    wxtest.queue(srv, "POST", "/v3/ra2", {
      { status = 429, body = json.encode{ code = "FREQUENCY_LIMITED",
        message = "m" }, headers = { ["Retry-After"] = "1" } },
      { body = "{}" } })
    local t0 = core.mono()
    assert(wx:request("POST", "/v3/ra2", "{}", { deadline = 5 }))
    local took = core.mono() - t0
    assert.equal(2, count("POST", "/v3/ra2"))
    assert.is_true(took >= 0.95, ("took %.2f s"):format(took))
    assert.is_true(took < 3, ("took %.2f s"):format(took))
  end)
  it("an HTTP-date or garbage is ignored (the backoff applies)", function()
    wxtest.queue(srv, "GET", "/v3/ra3", {
      { status = 503, body = "", headers = { ["Retry-After"] = "soon" } },
      { status = 503, body = "", headers = {
        ["Retry-After"] = "Fri, 31 Dec 2099 23:59:59 GMT" } },
      { body = "{}" } })
    assert(wx:request("GET", "/v3/ra3", nil, { deadline = 5 }))
    assert.equal(3, count("GET", "/v3/ra3"))
  end)
  it("an idempotent POST that timed out, then was told to wait past the "
     .. "deadline, is still unknown_outcome", function()
    wxtest.queue(srv, "POST", "/v3/ra4", { { delay = 1.5, body = "{}" },
      { status = 429, body = json.encode{ code = "FREQUENCY_LIMITED",
        message = "m" }, headers = { ["Retry-After"] = "60" } } })
    local _, err = wx:request("POST", "/v3/ra4", "{}", { idempotent = true,
      timeout = 0.5, deadline = 4 })
    assert.equal("unknown_outcome", err.kind, tostring(err))
    assert.is_true(err.retryable)
    assert.equal(2, count("POST", "/v3/ra4"))
  end)
end)
