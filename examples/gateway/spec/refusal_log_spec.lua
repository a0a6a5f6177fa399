-- examples/gateway: a flood of refusals anyone can cause -- forged
-- notifications, requests with a bad API key, console logins refused -- is
-- a bounded number of
-- log lines (gateway.refusal_log: the first `lines` of each merchant and
-- kind, each reason, in a window, for all workers together), then one line
-- per window saying how many were not logged; the counters on /metrics
-- count every one.
local testing = require "paygate.testing"
local json = require "paygate.json"
local gwcore = dofile("examples/gateway/spec/core_support.lua")

local LINES, WINDOW, N = 3, 4, 40

describe("gateway refusal lines", function()
  local server = require "paygate.testing.server"
  local sim, gw, dir

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    dir = server.tmpdir()
    local f = assert(io.open(dir .. "/console.token", "w"))
    f:write("console-token-0123456789\n")
    f:close()
    gw = gwcore.start(sim, { workers = 2, gateway = {
      refusal_log = { lines = LINES, window = WINDOW },
      console = { token_file = dir .. "/console.token" } } })
  end)

  teardown(function()
    if gw then gw.srv:stop() gw:stop() end
    testing.stop_all()
    if dir then server.rmdir(dir) end
  end)

  local function metric(pattern)
    local res = gw.srv:admin_get("/metrics")
    local text = res and res.status == 200 and res.body or ""
    return tonumber(text:match(pattern)) or 0
  end

  -- the log's lines of msg: full ones, and the summaries (their
  -- suppressed summed)
  local function lines(msg)
    local full, summaries, suppressed = {}, {}, 0
    for line in (gw.srv:logs() or ""):gmatch("[^\n]+") do
      local rec = json.decode(line)
      if type(rec) == "table" and rec.msg == msg then
        full[#full + 1] = rec
      elseif type(rec) == "table"
             and rec.msg == msg .. ": more lines like it not logged" then
        summaries[#summaries + 1] = rec
        suppressed = suppressed + rec.suppressed
      end
    end
    return full, summaries, suppressed
  end

  -- the windows (of WINDOW s, as the gateway counts them) fn's requests
  -- were sent in: waits for one to begin first, so that they usually
  -- fall in one
  local function burst(fn)
    local now = require("paygate").update_time
    local w0 = math.floor(now() / WINDOW)
    testing.wait_until(function()
      return math.floor(now() / WINDOW) > w0
    end, WINDOW + 2, "a window to begin")
    local first = math.floor(now() / WINDOW)
    for i = 1, N do fn(i) end
    return math.floor(now() / WINDOW) - first + 1
  end

  it("a burst of forged notifications: LINES lines, then one saying how"
     .. " many more; every one counted", function()
    -- was: one warn line (~600 bytes) per forged notification, without
    -- limit: at log level warn a flood filled the disk
    local mchid = sim.merchant.mchid
    local kind
    local windows = burst(function()
      local res = gw.srv:request{ method = "POST",
        path = "/wechatpay/notify/" .. mchid, body = '{"id":"forged"}',
        headers = { ["Content-Type"] = "application/json" } }
      assert.equal(401, res.status, res.body)
      kind = json.decode(res.body).message
    end)
    local full, summaries, suppressed
    testing.wait_until(function()
      full, summaries, suppressed = lines("gateway: notification refused")
      return #full + suppressed == N
    end, WINDOW * windows + 5, "the summary line")
    assert.is_true(#full <= LINES * windows, #full .. " lines")
    assert.is_true(#summaries >= 1 and #summaries <= windows)
    for _, rec in ipairs(full) do
      assert.equal(mchid, rec.mchid)
      assert.equal(kind, rec.kind)
      assert.is_string(rec.reason)
    end
    local s = summaries[1]
    assert.equal("warn", s.level)
    assert.equal(mchid, s.mchid)
    assert.equal(kind, s.kind)
    assert.equal(WINDOW, s.window)
    assert.equal(LINES, s.lines)
    if windows == 1 then
      assert.equal(LINES, #full)
      assert.equal(N - LINES, s.suppressed)
    end
    -- the counter counts each one, logged or not
    assert.equal(N, metric('\npaygate_gateway_notifications_refused_total{'
      .. 'merchant="' .. mchid .. '",kind="' .. kind .. '"} (%d+)\n'))
  end)

  it("a burst of requests with a bad API key: LINES lines, then one saying"
     .. " how many more; every one counted", function()
    -- was: one "apikey: request refused" warn line per 401, without limit
    local before = metric('\npaygate_apikey_refusals_total{reason='
                          .. '"bad_signature"} (%d+)\n')
    local windows = burst(function(i)
      -- signed with another secret: bad_signature
      local path = "/v1/payments/pay_" .. i
      local res = gw.srv:request{ method = "GET", path = path,
        headers = { Authorization = require("paygate.apikey").sign{
          app_id = gw.app_id, key_id = gw.key_id, secret = "sk_wrong",
          method = "GET", path = path, body = "" }.Authorization } }
      assert.equal(401, res.status, res.body)
      assert.equal("bad_signature", json.decode(res.body).error)
    end)
    local full, summaries, suppressed
    testing.wait_until(function()
      full, summaries, suppressed = lines("apikey: request refused")
      return #full + suppressed == N
    end, WINDOW * windows + 5, "the summary line")
    assert.is_true(#full <= LINES * windows, #full .. " lines")
    assert.is_true(#summaries >= 1 and #summaries <= windows)
    local s = summaries[1]
    assert.equal("warn", s.level)
    assert.equal("bad_signature", s.reason)
    if windows == 1 then
      assert.equal(LINES, #full)
      assert.equal(N - LINES, s.suppressed)
    end
    -- the caller's own values are no key: each forged key id is not a
    -- line of its own
    assert.is_nil(s.key_id)
    assert.equal(before + N, metric('\npaygate_apikey_refusals_total{reason='
                                    .. '"bad_signature"} (%d+)\n'))
  end)

  -- a console login refused: its log lines (full ones, summaries,
  -- suppressed) once N + extra are accounted for, within the windows
  local function login_lines(msg, n, windows)
    local full, summaries, suppressed
    testing.wait_until(function()
      full, summaries, suppressed = lines(msg)
      return #full + suppressed == n
    end, WINDOW * windows + 5, "the summary line of " .. msg)
    assert.is_true(#full <= LINES * windows, #full .. " lines of " .. msg)
    assert.is_true(#summaries >= 1 and #summaries <= windows)
    assert.equal("warn", summaries[1].level)
    for _, rec in ipairs(full) do assert.is_string(rec.remote) end
    return full, summaries
  end

  it("a burst of console logins without the form's login token: LINES"
     .. " lines, then one saying how many more", function()
    -- was: one warn line per POST /console/login, without limit, from
    -- anyone who reaches the gateway (no cookie needed)
    local windows = burst(function(i)
      local res = gw.srv:request{ method = "POST", path = "/console/login",
        body = "token=guess-" .. i .. "&csrf=x", headers = {
          ["Content-Type"] = "application/x-www-form-urlencoded" } }
      assert.equal(403, res.status, res.body)
    end)
    login_lines("gateway: console login refused: the form's login token"
                .. " is missing or wrong", N, windows)
  end)

  it("a burst of wrong console tokens: LINES lines of the wrong ones, then"
     .. " LINES of the throttled ones, each with its summary", function()
    -- the form's cookie and login token, as a browser has them
    local page = gw.srv:request{ method = "GET", path = "/console/login" }
    assert.equal(200, page.status, page.body)
    local cookie = assert(page.headers["set-cookie"]:match("^(pgc_login=%w+);"))
    local csrf = assert(page.body:match('name="csrf" value="(%x+)"'))
    local FAILURES = 10                       -- console.login_failures
    local windows = burst(function(i)
      local res = gw.srv:request{ method = "POST", path = "/console/login",
        body = "token=guess-" .. i .. "&csrf=" .. csrf, headers = {
          ["Content-Type"] = "application/x-www-form-urlencoded",
          Cookie = cookie } }
      assert.equal(i <= FAILURES and 403 or 429, res.status, res.body)
    end)
    login_lines("gateway: console login refused: wrong token", FAILURES,
                windows)
    login_lines("gateway: console login throttled", N - FAILURES, windows)
  end)
end)
