-- The admin levers (/admin/*) against a browser on the gateway's host
-- (a cross-site form, a DNS-rebound page) and against token guessing
-- (throttled with the console's logins). Each case failed before its fix.
local testing = require "paygate.testing"
local audit = require "paygate.audit"
local outbox = require "paygate.outbox"
local core = dofile("examples/gateway/spec/core_support.lua")
local days = require "support.days"
local T0 = os.time()    -- when this file started (days.audit)

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

  -- the admin levers' audit entries (subject admin:<the UTC day>) of
  -- every day since this file started: a run across 00:00 UTC finds an
  -- entry on either side
  local function admin_entries(g)
    return days.audit(g.db, "admin", T0)
  end

  it("each lever that changes something is audited, the caller as actor",
     function()
    local res = gw.srv:request{ method = "POST", path = "/admin/degrade",
                                json = { on = true } }
    assert.equal(200, res.status, res.body)
    assert.is_true(degraded())
    local e = admin_entries(gw)
    local on, off = e[#e - 1], e[#e]         -- degraded() switched it off
    assert.equal("admin.degrade", on.what)
    assert.equal("on", on.ref)
    assert.equal("admin:loopback", on.actor)
    assert.equal("off", off.ref)
    assert.is_true(math.abs(on.at / 1000 - os.time()) < 60)
    assert.matches("127.0.0.1", tostring(on.evidence), 1, true)
    -- a replay that changed something (an event by id); one that changed
    -- nothing writes nothing
    gw:create{}
    local ev
    testing.wait_until(function()
      ev = (outbox.list(gw.db, { state = "delivered", limit = 1 }) or {})[1]
      return ev ~= nil
    end, 10, "a delivered outbox event")
    local before = #admin_entries(gw)
    res = gw.srv:request{ method = "POST", path = "/admin/outbox/replay",
                          json = { id = ev.id } }
    assert.equal(200, res.status, res.body)
    assert.equal(1, res.json.replayed)
    e = admin_entries(gw)
    assert.equal(before + 1, #e)
    assert.equal("admin.replay", e[#e].what)
    assert.equal(tostring(ev.id), e[#e].ref)
    assert.equal("admin:loopback", e[#e].actor)
    -- (no such event: 404, nothing replayed, nothing audited)
    res = gw.srv:request{ method = "POST", path = "/admin/outbox/replay",
                          json = { id = 999999999 } }
    assert.equal(404, res.status, res.body)
    assert.equal("not_found", res.json.error)
    assert.equal(before + 1, #admin_entries(gw))
    for _, d in ipairs(days.since(T0, days.UTC)) do
      assert.is_true(audit.verify(gw.db, "admin:" .. d))
    end
  end)

  it("the degradation switch flips when its audit entry cannot be"
     .. " written (the store failing is an outage it is for)", function()
    assert(gw.db:exec("ALTER TABLE paygate_audit RENAME TO"
                      .. " paygate_audit_away"))
    local ok, err = pcall(function()
      local res = gw.srv:request{ method = "POST", path = "/admin/degrade",
                                  json = { on = true } }
      assert.equal(200, res.status, res.body)
      assert.is_true(res.json.on)
      assert.is_false(res.json.audited)
      assert.is_nil(res.body:find("paygate_audit", 1, true), res.body)
      assert.is_true(degraded())
    end)
    assert(gw.db:exec("ALTER TABLE paygate_audit_away RENAME TO"
                      .. " paygate_audit"))
    assert(ok, err)
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

    it("a lever pulled with the token is audited as admin:token", function()
      local dir = os.tmpname()
      os.remove(dir)
      os.execute("mkdir -p " .. dir)
      core.write(dir .. "/admin.token", TOKEN .. "\n")
      local g2 = core.start(sim, { gateway = {
        admin_token_file = dir .. "/admin.token",
        reconcile = { enabled = false } } })
      local res = g2.srv:request{ method = "POST", path = "/admin/degrade",
        json = { on = false },
        headers = { Authorization = "Bearer " .. TOKEN } }
      local e = admin_entries(g2)
      g2:stop()
      assert.equal(200, res.status, res.body)
      assert.equal("admin.degrade", e[#e].what)
      assert.equal("admin:token", e[#e].actor)
    end)
  end)
end)

