-- Reloads under load: while the simulator delivers a stream of payment
-- notifications and the merchant API is called without pause, the gateway
-- is reloaded (HUP) again and again. Every notification attempt and every
-- API call is answered (none fails, none is cut), every payment is paid
-- exactly once (one transition to paid, one effect, one payment.paid
-- event, audit chains valid) and every event reaches the webhook receiver.
local testing = require "paygate.testing"
local core = require "paygate.core"
local audit = require "paygate.audit"
local cluster = dofile("examples/gateway/spec/cluster_support.lua")

-- Stops the gateway and the servers, and removes the folders made.
local function cleanup(gw, ...)
  if gw then
    if gw.srv then gw.srv:stop() end
    gw:stop()
  end
  testing.stop_all()
  for i = 1, select("#", ...) do
    local d = select(i, ...)
    if d then testing.server.rmdir(d) end
  end
end

local N = 40
local RELOADS = 6

-- How many reloads the master has finished (PID_FILE.reload's counter),
-- and the last outcome's word ("ok", "refused:", "started").
local function reloads(srv)
  local text = testing.proc.read(srv.dir .. "/paygate.pid.reload")
  local n, what = text:match("^(%d+) (%S+)")
  return tonumber(n) or 0, what, text
end

describe("gateway reloaded under load", function()
  local sim, rcv, gw, dir

  setup(function()
    sim = testing.simulator{ time_scale = 1000 }
    rcv = cluster.receiver()
    dir = testing.tmpdir()
    gw = cluster.gateway(sim, { db = "sqlite:" .. dir .. "/gw.db",
      gateway = {
        webhooks = { { url = rcv.url, secret_file = rcv.secret_file,
                       timeout = 1 } },
        reconcile = { enabled = false },
        dispatcher = { interval = 0.05, lease_ttl = 3, backoff_base = 0.05,
                       backoff_cap = 0.5 } } })
    gw:start()
  end)

  teardown(function() cleanup(gw, dir) end)

  it("answers every request and applies every notification once", function()
    local ids, nos = {}, {}
    for i = 1, N do
      local p = gw:create{ amount = 500 + i }
      ids[i], nos[i] = p.id, p.out_trade_no
    end
    local stream_done = false
    core.spawn(function()
      for _, no in ipairs(nos) do
        sim:pay(no)
        core.sleep(0.03)
      end
      stream_done = true
    end)
    -- merchant API calls all along: reads and creations
    local api_failures, api_calls, api_done = {}, 0, false
    for k = 1, 3 do
      core.spawn(function()
        local i = 0
        while not api_done do
          i = i + 1
          local res, err
          if k == 3 then
            res, err = gw:call("POST", "/v1/payments", { order_id = "r-"
              .. k .. "-" .. i, channel = "native", amount = 7,
              description = "reload spec" })
          else
            res, err = gw:call("GET", "/v1/payments/" .. ids[i % N + 1])
          end
          api_calls = api_calls + 1
          local want = k == 3 and 201 or 200
          if not res or res.status ~= want then
            api_failures[#api_failures + 1] = res and (res.status .. " "
              .. res.body) or tostring(err)
          end
        end
      end)
    end
    local srv = gw.srv
    for r = 1, RELOADS do
      srv:signal(testing.proc.SIGHUP)
      testing.wait_until(function() return reloads(srv) >= r end, 60,
                         "reload " .. r)
      local _, what, text = reloads(srv)
      assert(what == "ok", "reload " .. r .. ": " .. text)
      core.sleep(0.2)           -- the next one while requests flow
    end
    testing.wait_until(function() return stream_done end, 30,
                       "the payment stream")
    local list
    testing.wait_until(function()
      list = sim:notifications{ event_type = "TRANSACTION.SUCCESS" }
      local n = 0
      for _, d in ipairs(list) do
        if d.state == "delivered" then n = n + 1 end
      end
      return n >= N
    end, 60, "every notification acknowledged")
    api_done = true
    testing.wait_until(function() return api_calls > 0 end, 5, "API calls")
    -- no notification attempt failed: a reload is no outage
    local failed = {}
    for _, d in ipairs(list) do
      for _, a in ipairs(d.attempts) do
        if a.status ~= 200 and a.status ~= 204 then
          failed[#failed + 1] = d.out_trade_no .. ": " .. tostring(a.status)
            .. " " .. tostring(a.error)
        end
      end
    end
    assert.same({}, failed)
    assert.same({}, api_failures)
    cluster.assert_paid_once(gw.db, ids)
    local ok, rep = audit.verify_all(gw.db)
    assert(ok, "audit.verify_all: " .. tostring(rep and rep.message))
    local rows = cluster.wait_outbox_drained(gw.db, 30)
    local by_type = {}
    for _, r in ipairs(rows) do
      by_type[r.subject .. " " .. r.type] =
        (by_type[r.subject .. " " .. r.type] or 0) + 1
    end
    for k, n in pairs(by_type) do
      assert(n == 1, k .. ": " .. n .. " events")
    end
    local st = rcv.stats()
    for _, r in ipairs(rows) do
      assert((st.ok[tostring(r.id)] or 0) >= 1, "event " .. r.id
             .. " never accepted by the receiver")
    end
    print(("%d reloads; %d API calls; %d events"):format(RELOADS, api_calls,
                                                         #rows))
  end)
end)

-- A reload that meets a gw/hooks.lua the gateway refuses keeps the old
-- workers serving and says why in the log, every time: the shared
-- dictionary that makes one line of the workers' failures outlives the
-- reload, and a claim left by the previous refusal silenced the next one.
describe("gateway reload refused", function()
  local sim, gw, dir, app

  setup(function()
    sim = testing.simulator{ time_scale = 1000 }
    dir = testing.tmpdir()
    app = cluster.app_copy()
    gw = cluster.gateway(sim, { app = app, db = "sqlite:" .. dir
      .. "/gw.db", gateway = { reconcile = { enabled = false } } })
    gw:start()
  end)

  teardown(function() cleanup(gw, dir, app) end)

  local function metric(name)
    local res = assert(gw.srv:admin_get("/metrics"))
    return tonumber(res.body:match("\n" .. name .. " (%d+)"))
  end

  it("says why each time, keeps serving, then takes the fixed code",
     function()
    local srv = gw.srv
    local p = gw:create{ amount = 9 }
    local good = testing.proc.read(app .. "/gw/hooks.lua")
    testing.write(app .. "/gw/hooks.lua",
                  "return { on_payed = function() end }\n")
    local failures = metric("paygate_reload_failures_total")
    for r = 1, 3 do
      srv:signal(testing.proc.SIGHUP)
      testing.wait_until(function() return reloads(srv) >= r end, 60,
                         "reload " .. r)
      local _, what, text = reloads(srv)
      assert.equal("refused:", what, text)
      -- the reason reaches the master, so `paygate reload` prints it
      assert.matches("gw/hooks.lua: on_payed is neither", text, 1, true)
      local lines = 0
      -- (its own line; the master's JSON line quotes it too)
      for _ in srv:logs():gmatch("\ngateway: gw/hooks%.lua: on_payed is"
                                 .. " neither") do
        lines = lines + 1
      end
      assert.equal(r, lines, "refused reload " .. r .. " says why once")
      assert.equal(p.id, gw:get(p.id).id)      -- the old code serves
    end
    assert.equal(failures + 3, metric("paygate_reload_failures_total"))
    testing.write(app .. "/gw/hooks.lua", good)
    srv:signal(testing.proc.SIGHUP)
    testing.wait_until(function() return reloads(srv) >= 4 end, 60,
                       "the good reload")
    local _, what, text = reloads(srv)
    assert.equal("ok", what, text)
    assert.equal(p.id, gw:get(p.id).id)
  end)
end)
