-- The admin levers (/admin/*) against a browser on the gateway's host
-- (a cross-site form, a DNS-rebound page) and against token guessing
-- (throttled with the console's logins). Each case failed before its fix.
local testing = require "paygate.testing"
local core = dofile("examples/gateway/spec/core_support.lua")

describe("gateway admin routes", function()
  local sim, gw

  setup(function() sim, gw = core.start_loopback() end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  -- whether the switch is on; if it is, it is put back off for the others
  local function degraded()
    local on = gw.srv:request("/admin/degrade").json.on
    if on then
      gw.srv:request{ method = "POST", path = "/admin/degrade",
                      json = { on = false } }
    end
    return on
  end

  it("a cross-site text/plain form cannot flip the switch via"
     .. " /admin/degrade", function()
    -- <form method=post enctype=text/plain action=http://127.0.0.1:8080/
    --  admin/degrade><input name='{"on":true,"x":"' value='"}'></form>
    -- sent by the operator's browser from any web page
    local res = gw.srv:request{ method = "POST", path = "/admin/degrade",
      body = '{"on":true,"x":"="}',
      headers = { ["Content-Type"] = "text/plain",
                  Origin = "https://evil.example",
                  ["Sec-Fetch-Site"] = "cross-site" } }
    local on = degraded()
    assert.equal(403, res.status, res.body)
    assert.is_false(on)
  end)

  it("a cross-site text/plain form cannot replay every dead letter"
     .. " via /admin/outbox/replay", function()
    local res = gw.srv:request{ method = "POST",
      path = "/admin/outbox/replay", body = '{"dead":true,"x":"="}',
      headers = { ["Content-Type"] = "text/plain",
                  Origin = "https://evil.example" } }
    assert.equal(403, res.status, res.body)
  end)

  it("a DNS-rebound page (Host: evil.example) cannot use /admin/*",
     function()
    local evil = "evil.example:" .. gw.srv.port
    local res = gw.srv:request{ path = "/admin/degrade",
                                headers = { Host = evil } }
    assert.equal(403, res.status, res.body)
    res = gw.srv:request{ method = "POST", path = "/admin/degrade",
      json = { on = true }, headers = { Host = evil,
                                        Origin = "http://" .. evil } }
    local on = degraded()
    assert.equal(403, res.status, res.body)
    assert.is_false(on)
  end)

  it("a loopback caller refused for one of its headers is told which",
     function()
    -- curl from the gateway's own host is a loopback caller: a 403 that
    -- only says "loopback callers, or the admin token" leaves it stuck
    local res = gw.srv:request{ method = "POST", path = "/admin/degrade",
      json = { on = true }, headers = { Origin = "https://evil.example" } }
    assert.equal(403, res.status, res.body)
    assert.equal("forbidden", res.json.error)
    assert.matches("browser page from elsewhere", res.json.message, 1, true)
    assert.matches("Origin", res.json.message, 1, true)
    res = gw.srv:request{ path = "/admin/degrade",
      headers = { ["X-Forwarded-For"] = "203.0.113.7" } }
    assert.equal(403, res.status, res.body)
    assert.matches("a proxy relayed", res.json.message, 1, true)
    assert.matches("admin token", res.json.message, 1, true)
    assert.is_false(degraded())
  end)

  describe("with an admin token (the console's default token)", function()
    local gt
    local TOKEN = "admin-token-0123456789abcdef"
    setup(function()
      local dir = os.tmpname()
      os.remove(dir)
      os.execute("mkdir -p " .. dir)
      core.write(dir .. "/admin.token", TOKEN .. "\n")
      gt = core.start(sim, { gateway = {
        admin_token_file = dir .. "/admin.token",
        console = { login_failures = 2, login_window = 300 },
        reconcile = { enabled = false } } })
    end)
    teardown(function() if gt then gt:stop() end end)

    it("guesses of the console token at /admin/* are throttled like"
       .. " the console login", function()
      -- the console's login: 2 wrong tokens, then 429 for this address
      local lf = gt.srv:request("/console/login")
      local cookie = lf.headers["set-cookie"]:match("^(pgc_login=%w+);")
      local csrf = lf.body:match('name="csrf" value="(%x+)"')
      local last
      for i = 1, 3 do
        last = gt.srv:request{ method = "POST", path = "/console/login",
          body = "csrf=" .. csrf .. "&token=wrong-guess-" .. i,
          headers = { Cookie = cookie, ["Content-Type"] =
                      "application/x-www-form-urlencoded" } }
      end
      assert.equal(429, last.status)
      -- the same secret, guessed at /admin/degrade from the same address:
      -- never throttled, and it tells a right guess from a wrong one
      local statuses = {}
      for i = 1, 20 do
        local r = gt.srv:request{ path = "/admin/degrade", headers = {
          Authorization = "Bearer wrong-guess-admin-" .. i } }
        statuses[r.status] = (statuses[r.status] or 0) + 1
      end
      local right = gt.srv:request{ path = "/admin/degrade", headers = {
        Authorization = "Bearer " .. TOKEN } }
      assert.is_nil(statuses[403] and statuses[403] > 2 and statuses[403],
                    "20 wrong guesses answered 403, none throttled")
      assert.not_equal(200, right.status,
                       "the right guess confirmed while the login is locked")
    end)
  end)
end)

