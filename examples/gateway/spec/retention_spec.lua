-- examples/gateway: paygate.retention wired into the app (gateway.retention,
-- docs/retention.md): the notification dedupe tables are pruned after 25 h
-- (WeChat retries for 24 h 4 min), expired idempotency records and old
-- delivered outbox rows go; younger rows stay; the outbox dispatcher does
-- not prune on its own (retention does); a policy the library refuses is
-- a one-line config error.
local testing = require "paygate.testing"
local http = require "paygate.http"
local core = dofile("examples/gateway/spec/core_support.lua")

local H, D = 3600, 86400

local function count(db, sql, args)
  return tonumber(assert(db:query(sql, args))[1].n)
end

describe("gateway retention", function()
  local sim, gw, opts

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    local url = "sqlite:" .. testing.tmpdir() .. "/gw.db"
    opts = { db = function() return url end, gateway = {
      reconcile = { enabled = false },
      -- delivered outbox rows kept 30 days here; a dispatcher that
      -- pruned as well would drop them after its own 7 at its first
      -- round (its prune options are refused while retention is on: the
      -- spec restarts the gateway on the rows instead)
      dispatcher = { interval = 0.05 },
      -- (no pass before the restart below: the rows are the second
      -- gateway's to prune and count)
      retention = { outbox_days = 30, delay = 3600, interval = 0.5 },
    } }
    gw = core.start(sim, opts)
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  it("prunes what is past its policy, keeps the rest", function()
    local db = gw.db
    gw:create{ amount = 1 }     -- a POST: the idempotency table exists
    local now = os.time()
    local function note(id, age)
      assert(db:exec("INSERT INTO gw_notifications (id, event_type,"
        .. " business_key, received_at, outcome) VALUES ($1,"
        .. " 'TRANSACTION.SUCCESS', $2, $3, 'applied')",
        { id, "pay|x|" .. id .. "|SUCCESS", now - age }))
      assert(db:exec("INSERT INTO gw_notification_effects (key,"
        .. " notification_id, applied_at) VALUES ($1, $2, $3)",
        { "pay|x|" .. id .. "|SUCCESS", id, now - age }))
    end
    note("old-1", 26 * H)
    note("old-2", 3 * D)
    note("young-1", 24 * H + 10 * 60)   -- inside the retry window + margin
    note("young-2", 60)
    local function outbox(subject, age)
      assert(db:exec("INSERT INTO paygate_outbox (subject, type, payload,"
        .. " shard, state, next_at, created_at, delivered_at) VALUES ($1,"
        .. " 'spec.retention', '{}', 0, 'delivered', $2, $2, $2)",
        { subject, now - age }))
    end
    outbox("ret-old", 40 * D)
    outbox("ret-young", 10 * D)
    local function idem(key, expires_in)
      assert(db:exec("INSERT INTO paygate_idempotency (scope, idem_key,"
        .. " fingerprint, state, status, created_at, expires_at) VALUES"
        .. " ('spec', $1, 'f', 'done', 200, $2, $3)",
        { key, now - D, now + expires_in }))
    end
    idem("ret-expired", -60)
    idem("ret-live", H)
    -- refused notifications: 30 days, but 3 for those that did not
    -- decrypt (anyone can send them: a flood must not fill the disk)
    local function refused(id, age, authentic)
      assert(db:exec("INSERT INTO gw_notifications_refused (received_at,"
        .. " mchid, kind, reason, notification_id, authentic) VALUES ($1,"
        .. " 'm', 'bad_signature', 'spec', $2, $3)",
        { now - age, id, authentic }))
    end
    refused("forged-old", 4 * D, 0)
    refused("forged-young", 2 * D, 0)
    refused("real-young", 10 * D, 1)
    refused("real-old", 31 * D, 1)
    -- a gateway started on these rows: its dispatcher's first round
    -- would prune ret-young at once, if it pruned
    -- a new SQLite file is said, once (workers and all); a start on the
    -- same file is not (a deleted one, or a volume not mounted, would
    -- otherwise pass for a first start)
    local _, said = gw.srv:logs():gsub("made a new, empty SQLite database",
                                       "")
    assert.equal(1, said)
    gw.srv:stop()
    gw:stop()
    opts.gateway.retention.delay = 0.5
    gw = core.start(sim, opts)
    db = gw.db
    assert.is_nil(gw.srv:logs():find("made a new, empty SQLite database", 1,
                                     true))

    testing.wait_until(function()
      return count(db, "SELECT COUNT(*) AS n FROM gw_notifications WHERE"
                   .. " id LIKE 'old-%'") == 0
        and count(db, "SELECT COUNT(*) AS n FROM gw_notification_effects"
                  .. " WHERE notification_id LIKE 'old-%'") == 0
        and count(db, "SELECT COUNT(*) AS n FROM paygate_outbox WHERE"
                  .. " subject = 'ret-old'") == 0
        and count(db, "SELECT COUNT(*) AS n FROM paygate_idempotency WHERE"
                  .. " idem_key = 'ret-expired'") == 0
        and count(db, "SELECT COUNT(*) AS n FROM gw_notifications_refused"
                  .. " WHERE notification_id LIKE '%-old'") == 0
    end, 20, "the old rows pruned")
    local left = {}
    for _, r in ipairs(assert(db:query("SELECT notification_id FROM"
        .. " gw_notifications_refused ORDER BY notification_id"))) do
      left[#left + 1] = r.notification_id
    end
    assert.same({ "forged-young", "real-young" }, left)
    -- a pass ran: the young rows are still there
    assert.equal(2, count(db, "SELECT COUNT(*) AS n FROM gw_notifications"
                          .. " WHERE id LIKE 'young-%'"))
    assert.equal(2, count(db, "SELECT COUNT(*) AS n FROM"
      .. " gw_notification_effects WHERE notification_id LIKE 'young-%'"))
    assert.equal(1, count(db, "SELECT COUNT(*) AS n FROM paygate_outbox"
                          .. " WHERE subject = 'ret-young'"))
    assert.equal(1, count(db, "SELECT COUNT(*) AS n FROM paygate_idempotency"
                          .. " WHERE idem_key = 'ret-live'"))
    -- counted on /metrics per job: each job's gauge is set once its
    -- DELETE returned, a moment after the rows are gone for other readers
    -- (the notification jobs come after the idempotency and outbox ones)
    local m
    testing.wait_until(function()
      m = assert(http.request{ url = "http://127.0.0.1:" .. gw.srv.admin
                               .. "/metrics" })
      return m.body:find('paygate_retention_pruned_rows{job='
          .. '"gw_notifications"} 2', 1, true)
        and m.body:find('paygate_retention_pruned_rows{job='
          .. '"gw_notification_effects"} 2', 1, true)
    end, 20, "the pruned rows counted on /metrics")
    assert.matches('paygate_retention_pruned_rows{job="gw_notifications"} 2',
                   m.body, 1, true)
    assert.matches('paygate_retention_pruned_rows{job='
                   .. '"gw_notification_effects"} 2', m.body, 1, true)
  end)
end)

describe("gateway retention config", function()
  local sim

  setup(function() sim = testing.simulator() end)
  teardown(testing.stop_all)

  it("a policy shorter than WeChat's retries is one line and exit 2",
     function()
    local server = require "paygate.testing.server"
    local dir = server.tmpdir()
    for _, c in ipairs({
      { { notification_hours = 24 }, "gateway: config.gateway.retention:"
        .. " notification_hours must be a number above 24.07" },
      { { nope = 1 }, "gateway: config.gateway.retention: unknown retention"
        .. " option nope" },
    }) do
      local conf = core.config(sim, { dir = dir, url = function()
        return "http://127.0.0.1:9" end }, { retention = c[1] })
      core.expect_refused(dir, conf, c[2])
    end
    server.rmdir(dir)
  end)
end)
