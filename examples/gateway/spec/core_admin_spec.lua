-- examples/gateway: the degradation switch (every worker sees it), admin
-- access (loopback, or the token), webhook events with dead letters and
-- replay, the in-process hooks, dev_app.
local testing = require "paygate.testing"
local http = require "paygate.http"
local json = require "paygate.json"
local servers = require "spec.support.servers"
local core = dofile("examples/gateway/spec/core_support.lua")

describe("gateway admin and events", function()
  local sim, gw, rcv, gw_token

  local function admin(g, method, path, body, headers)
    return g.srv:request{ method = method, path = path,
                          body = body and json.encode(body) or nil,
                          headers = headers }
  end

  local function received()
    return json.decode(rcv:request("/got").body)
  end

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    rcv = core.receiver()
    gw = core.start(sim, { workers = 2, gateway = {
      webhooks = { { url = rcv:url("/hook"), secret_file = rcv.secret_file } },
      dispatcher = { interval = 0.05, max_attempts = 1 },
      dev_app = "dev" } })
    local tok = rcv.dir .. "/admin.token"
    local f = assert(io.open(tok, "wb"))
    f:write("admintok-0123456789\n")
    f:close()
    gw_token = core.start(sim, { gateway = { admin_token_file = tok } })
  end)

  teardown(function()
    if gw then gw:stop() end
    if gw_token then gw_token:stop() end
    testing.stop_all()
    servers.stop_all()
  end)

  it("switches degradation for every worker", function()
    local mchid = sim.merchant.mchid
    assert.same({ on = false, clients = { [mchid] = false } },
                admin(gw, "GET", "/admin/degrade").json)
    local p = gw:create{}
    assert.same({ on = true, clients = { [mchid] = true } },
                admin(gw, "POST", "/admin/degrade", { on = true }).json)
    -- two workers: each of several requests sees the switch
    for _ = 1, 6 do
      local res = gw:call("POST", "/v1/payments", { order_id = "deg-x",
        channel = "native", amount = 1, description = "d" })
      assert.equal(503, res.status)
      assert.equal("degraded", res.json.error)
      local got = gw:get(p.id, "?refresh=1")
      assert.is_true(got.stale)
      assert.equal("paying", got.state)
    end
    admin(gw, "POST", "/admin/degrade", { on = false })
    local got = gw:get(p.id, "?refresh=1")
    assert.is_nil(got.stale)
    gw:create{ order_id = "deg-x" }
  end)

  it("refuses admin bodies it cannot act on exactly, saying why",
     function()
    finally(function()                  -- whatever the outcome: off
      gw.srv:request{ method = "POST", path = "/admin/degrade",
                      body = '{"on":false}' }
    end)
    local function refused(path, body, want)
      local res = gw.srv:request{ method = "POST", path = path, body = body }
      assert.equal(400, res.status, path .. " " .. body .. ": " .. res.body)
      assert.equal(want or "invalid_request", res.json.error, res.body)
      return res
    end
    -- was: 200, the switch flipped and the unknown key dropped (a caller
    -- sending {"on": true, "ttl": 60} got a switch that stays on)
    local res = refused("/admin/degrade", '{"on":true,"ttl":60}')
    assert.matches("ttl", res.json.message, 1, true)
    assert.is_false(gw.srv:request("/admin/degrade").json.on)
    -- was: the usage text ('send {"on": true} or ...') for a body that
    -- said just that, twice; now what the JSON reader found
    res = refused("/admin/degrade", '{"on":true,"on":false}', "invalid_json")
    assert.matches('duplicate key "on"', res.json.message, 1, true)
    res = refused("/admin/outbox/replay", '{"id":1,"id":2}', "invalid_json")
    assert.matches('duplicate key "id"', res.json.message, 1, true)
    refused("/admin/degrade", "{", "invalid_json")
    assert.is_false(gw.srv:request("/admin/degrade").json.on)
    -- was: 200 {"replayed":0}: ids past 2^53 are not exact in JSON
    -- numbers (9007199254740993 reads as ...992: another event)
    for _, id in ipairs{ "1e300", "9007199254740993", "9007199254740992" } do
      refused("/admin/outbox/replay", '{"id":' .. id .. '}')
    end
    -- the largest id is taken (no 400); no event has it: 404, saying so
    -- (was: 200 {"replayed":0}, as for an event still pending)
    res = gw.srv:request{ method = "POST", path = "/admin/outbox/replay",
                          body = '{"id":9007199254740991}' }
    assert.equal(404, res.status, res.body)
    assert.same({ error = "not_found", message = "outbox event"
      .. " 9007199254740991 not found (never enqueued, or delivered and"
      .. " pruned since)" }, res.json)
    res = gw.srv:request{ method = "POST", path = "/admin/outbox/replay",
                          body = '{"id":999999}' }
    assert.equal(404, res.status, res.body)
    -- was: 200 {"replayed":0} for a misspelt type: "nothing dead of that
    -- type" to an operator whose dead letters were all still there
    res = refused("/admin/outbox/replay",
                  '{"dead":true,"type":"payment.payed"}')
    assert.equal("type: payment.payed is no event type of the gateway (did"
                 .. " you mean payment.paid?)", res.json.message)
    assert.equal(200, gw.srv:request{ method = "POST",
      path = "/admin/outbox/replay",
      body = '{"dead":true,"type":"payment.paid"}' }.status)
  end)

  it("needs the token when one is configured", function()
    assert.equal(403, admin(gw_token, "GET", "/admin/degrade").status)
    assert.equal(403, admin(gw_token, "GET", "/admin/degrade", nil,
      { Authorization = "Bearer admintok-12" }).status)
    local res = admin(gw_token, "GET", "/admin/degrade", nil,
                      { Authorization = "Bearer admintok-0123456789" })
    assert.equal(200, res.status)
    -- the scheme is case-insensitive (RFC 9110, 11.1); another is refused
    for _, scheme in ipairs{ "BEARER", "bearer", "BeArEr" } do
      assert.equal(200, admin(gw_token, "GET", "/admin/degrade", nil,
        { Authorization = scheme .. " admintok-0123456789" }).status, scheme)
    end
    assert.equal(403, admin(gw_token, "GET", "/admin/degrade", nil,
      { Authorization = "Basic admintok-0123456789" }).status)
  end)

  it("delivers events to a signed webhook, dead-letters, replays",
     function()
    local p = gw:create{ amount = 42 }
    testing.wait_until(function()
      for _, e in ipairs(received()) do
        if e.type == "payment.paying" and e.subject == p.id then
          return true
        end
      end
    end, 10, "payment.paying at the webhook")
    rcv:request{ method = "POST", path = "/mode", body = "400" }
    sim:pay_and_wait(p.out_trade_no)
    testing.wait_until(function()
      local rows = assert(gw.db:query("SELECT state FROM paygate_outbox"
        .. " WHERE subject = $1 AND type = 'payment.paid'", { p.id }))
      return rows[1] and rows[1].state == "dead"
    end, 10, "payment.paid dead-lettered")
    rcv:request{ method = "POST", path = "/mode", body = "204" }
    local res = admin(gw, "POST", "/admin/outbox/replay", { dead = true })
    assert.equal(200, res.status, res.body)
    assert.is_true(res.json.replayed >= 1)
    local paid
    testing.wait_until(function()
      for _, e in ipairs(received()) do
        if e.type == "payment.paid" and e.subject == p.id then
          assert.equal("paid", e.data.payment.state)
          assert.equal(42, e.data.payment.amount)
          paid = e
          return true
        end
      end
    end, 10, "payment.paid at the webhook after the replay")
    -- the replay is the event's second delivery, and says so (was: 1,
    -- as a first delivery)
    assert.equal(2, paid.attempt)
    -- an event that exists, pending or delivered, is no 404
    res = admin(gw, "POST", "/admin/outbox/replay", { id = paid.id })
    assert.equal(200, res.status, res.body)
  end)

  it("says once at start that several webhooks without a name are known"
     .. " by their place", function()
    -- was: nothing; removing or reordering entries renamed webhook2 to
    -- webhook1, and the events the old webhook1 had were never sent to it
    local hook = { url = rcv:url("/hook"), secret_file = rcv.secret_file }
    local g3 = core.start(sim, { workers = 2, gateway = { webhooks = {
      { url = hook.url, secret_file = hook.secret_file, name = "erp" },
      hook, hook } } })
    local want = "gateway: gateway.webhooks[2] (webhook2),"
      .. " gateway.webhooks[3] (webhook3) have no name: a webhook without"
      .. " one is known by its place, and the outbox records by name which"
      .. " webhooks have an event, so removing or reordering entries hands"
      .. " one webhook's events to another, which then never gets them;"
      .. " give each a name (name = \"webhook2\" keeps what is recorded)"
    -- the log's lines (JSON) whose msg is want
    local function said(logs)
      local n = 0
      for line in logs:gmatch("[^\n]+") do
        local ok, t = pcall(json.decode, line)
        if ok and type(t) == "table" and t.msg == want then
          n = n + 1
          assert.same({ 2, 3 }, { t.unnamed, t.webhooks })
        end
      end
      return n
    end
    local ok, err = pcall(testing.wait_until, function()
      return said(g3.srv:logs()) > 0
    end, 10, "the unnamed webhooks' line")
    local logs = g3.srv:logs()
    g3:stop()
    assert(ok, tostring(err) .. "\n" .. logs)
    assert.equal(1, said(logs))               -- two workers, one line
    -- one webhook alone (this spec's gateway) is not warned about
    assert.is_nil(gw.srv:logs():find("no name: a webhook without", 1, true))
  end)

  if servers.have_redis() then
    it("adds events to a Redis stream when configured", function()
      local rd = servers.redis()
      local ok, err = pcall(function()
        local g2 = core.start(sim, { gateway = { redis = rd.url,
          redis_stream = { stream = "gw:spec" } } })
        local p = g2:create{ amount = 8 }
        local redis = require "paygate.redis"
        local r = assert(redis.connect(rd.url))
        testing.wait_until(function()
          local entries = assert(r:call("XRANGE", "gw:spec", "-", "+"))
          for _, e in ipairs(entries) do
            local f = {}
            for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
            if f.subject == p.id and f.type == "payment.paying" then
              assert.equal(p.id, json.decode(f.payload).payment.id)
              return true
            end
          end
        end, 10, "payment.paying in the stream")
        g2:stop()
      end)
      rd.stop()
      assert(ok, err)
    end)
  end

  -- A copy of the app (a folder of its own) whose gw/hooks.lua is source.
  local function app_with_hooks(source)
    local dir = testing.tmpdir()
    os.execute("cp -r examples/gateway/app.lua examples/gateway/gw"
               .. " examples/gateway/migrations '" .. dir .. "/'")
    local f = assert(io.open(dir .. "/gw/hooks.lua", "wb"))
    f:write(source)
    f:close()
    return dir
  end

  -- Waits until the hooks' log in dir holds want; returns the log.
  local function hooks_log(dir, want, secs, what)
    local log = ""
    testing.wait_until(function()
      local h = io.open(dir .. "/hooks.log", "rb")
      log = h and h:read("*a") or ""
      if h then h:close() end
      return log:find(want, 1, true)
    end, secs, what)
    return log
  end

  it("runs the in-process hooks of gw/hooks.lua", function()
    -- a copy of the app whose hooks.lua records what it is given
    local dir = app_with_hooks([=[
local paygate = require "paygate"
local _M = {}
local function record(kind, event)
  local f = assert(io.open(paygate.app_dir .. "/hooks.log", "ab"))
  f:write(kind, " ", event.type, " ", event.payload.payment.id, "\n")
  f:close()
end
function _M.on_paid(event) record("on_paid", event) end
_M["payment.paying"] = function(event) record("any", event) end
return _M
]=])
    local g2 = core.start(sim, { app = dir })
    local p = g2:create{ amount = 9 }
    sim:pay_and_wait(p.out_trade_no)
    local log = hooks_log(dir, "on_paid payment.paid " .. p.id, 10,
                          "the on_paid hook")
    assert.truthy(log:find("any payment.paying " .. p.id, 1, true))
    g2:stop()
    require("paygate.testing.server").rmdir(dir)
  end)

  it("cancels a hook still running after gateway.hooks_timeout and"
     .. " delivers the event again", function()
    -- the first call never returns on its own; the second records
    local dir = app_with_hooks([=[
local paygate = require "paygate"
local _M = {}
local function log(line)
  local f = assert(io.open(paygate.app_dir .. "/hooks.log", "ab"))
  f:write(line, "\n")
  f:close()
end
local calls = 0
function _M.on_paid(event)
  calls = calls + 1
  if calls == 1 then
    log("hang " .. event.payload.payment.id)
    paygate.sleep(3600)
    log("woke")                 -- never: the hook is cancelled
  end
  log("done " .. event.payload.payment.id)
end
return _M
]=])
    local g2 = core.start(sim, { app = dir, gateway = { hooks_timeout = 0.5,
      dispatcher = { backoff_base = 0.05, backoff_cap = 0.1 } } })
    local p = g2:create{ amount = 8 }
    sim:pay_and_wait(p.out_trade_no)
    local log = hooks_log(dir, "done " .. p.id, 15, "the hook's second call")
    assert.truthy(log:find("hang " .. p.id, 1, true))
    assert.is_nil(log:find("woke", 1, true))
    -- the hook wrote "done" before it returned: its delivery is
    -- recorded a moment later
    local rows
    testing.wait_until(function()
      rows = assert(g2.db:query("SELECT state, attempts, last_error FROM"
        .. " paygate_outbox WHERE subject = $1 AND type = 'payment.paid'",
        { p.id }))
      return rows[1] and rows[1].state == "delivered"
    end, 10, "the event recorded delivered")
    assert.equal(2, rows[1].attempts)
    g2:stop()
    require("paygate.testing.server").rmdir(dir)
  end)

  it("lets unsigned loopback requests act as dev_app", function()
    local res = gw.srv:request{ method = "POST", path = "/v1/payments",
      body = json.encode{ order_id = "dev-1", channel = "native",
                          amount = 3, description = "dev" },
      headers = { ["Idempotency-Key"] = "dev-k1",
                  ["Content-Type"] = "application/json" } }
    assert.equal(201, res.status, res.body)
    local rows = assert(gw.db:query("SELECT app_id FROM gw_payments WHERE"
      .. " id = $1", { res.json.payment.id }))
    assert.equal("dev", rows[1].app_id)
    -- a bad signature is still refused
    local bad = gw.srv:request{ path = "/v1/payments/x", headers = {
      Authorization = 'PAYGATE-HMAC-SHA256 app_id="x",key_id="y",'
                      .. 'timestamp="1",signature="00"' } }
    assert.equal(401, bad.status)
    -- without dev_app, unsigned is refused
    assert.equal(401, gw_token.srv:request("/v1/payments/x").status)
    -- a browser page from elsewhere is no loopback client of ours: a
    -- cross-site form (a text/plain body can be JSON), a rebound name
    for _, h in ipairs({
      { ["Content-Type"] = "text/plain", Origin = "https://evil.example" },
      { ["Content-Type"] = "text/plain", ["Sec-Fetch-Site"] = "cross-site" },
      { ["Content-Type"] = "application/json",
        Host = "evil.example:" .. gw.srv.port },
      -- relayed by a reverse proxy on this host: any visitor
      { ["Content-Type"] = "application/json",
        ["X-Forwarded-For"] = "203.0.113.9" } }) do
      h["Idempotency-Key"] = "dev-csrf"
      res = gw.srv:request{ method = "POST", path = "/v1/payments",
        body = json.encode{ order_id = "dev-csrf", channel = "native",
                            amount = 3, description = "csrf" }, headers = h }
      assert.equal(401, res.status, res.body)
    end
  end)
end)
