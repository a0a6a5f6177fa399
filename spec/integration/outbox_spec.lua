-- paygate.outbox end to end: a `paygate run --workers 2` app whose two
-- dispatchers share one database (SQLite, then PostgreSQL) deliver signed
-- webhooks to a receiver app that verifies each signature and counts
-- deliveries by event id: every event once per attempt sequence, in order
-- per subject; dead letters replayed with the shipped exec script.
local paygate = require "paygate"
local json = require "paygate.json"
local outbox = require "paygate.outbox"
local server = require "support.server"
local servers = require "spec.support.servers"
local proc = require "spec.support.proc"

local BIN = os.getenv("PAYGATE_BIN") or "build/paygate"
local SECRET = "whsec_spec_4f1c2a"
local FAIL_EVERY = 7

local tmp = servers.mktemp()
local receiver

teardown(function()
  if receiver then receiver:stop() end
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

local function get_json(s, path)
  local res = assert(s:request(path))
  assert.equal(200, res.status, res.body)
  return json.decode(res.body)
end

local function post_json(s, path, body)
  local res = assert(s:request{ method = "POST", path = path,
                                body = json.encode(body),
                                headers = { ["Content-Type"] =
                                            "application/json" } })
  return res.status, json.decode(res.body)
end

local function wait_until(cond, secs, what)
  return proc.wait_until(cond, secs, what)
end

local function start_receiver()
  if not receiver then
    receiver = server.start{ app = "spec/support/outbox_receiver",
      workers = 1, config = string.format(
        "return { secret = %q, fail_first_every = %d }", SECRET,
        FAIL_EVERY) }
  end
  return receiver
end

-- Runs the exec script; returns its exit code and output.
local function outbox_cli(url, ...)
  local out = tmp .. "/cli.out"
  os.remove(out)                    -- the log is appended to: one run's
  local argv = { BIN, "exec", "scripts/outbox.lua", url, ... }
  local p = proc.spawn(argv, { log = out })
  local rc = p:wait(30)
  return rc, proc.read(out)
end

describe("outbox.verify_webhook at a receiver over HTTP", function()
  it("accepts a signed body and refuses a tampered or stale one",
     function()
    local r = start_receiver()
    local body = '{"id":900001,"type":"t","subject":"manual","data":{}}'
    local function send(b, header)
      local res = assert(r:request{ method = "POST", path = "/hook",
        body = b, headers = { ["Paygate-Signature"] = header,
                              ["Paygate-Event-Id"] = "900001" } })
      return res.status, json.decode(res.body)
    end
    assert.equal(204, (send(body, outbox.sign_webhook(SECRET, body))))
    local st, b = send(body:gsub("manual", "other"),
                       outbox.sign_webhook(SECRET, body))
    assert.equal(400, st)
    assert.equal("bad_signature", b.error)
    st, b = send(body, outbox.sign_webhook(SECRET, body,
                                           paygate.now() - 400))
    assert.equal(400, st)
    assert.equal("stale_timestamp", b.error)
    st, b = send(body, nil)
    assert.equal(400, st)
    assert.equal("bad_header", b.error)
  end)
end)

local engines = {
  sqlite = function()
    return "sqlite:" .. tmp .. "/outbox.db"
  end,
}
if servers.have_postgres() then
  engines.postgres = function()
    local srv = servers.postgres()
    return srv.url
  end
end

for engine, new_url in pairs(engines) do
  describe("paygate.outbox with two workers on " .. engine, function()
    local app, url

    before_each(function()
      local r = start_receiver()
      if not app then
        url = new_url()
        app = server.start{ app = "spec/support/outbox_app", workers = 2,
          config = string.format("return { db = %q, hook_url = %q,"
            .. " secret = %q }", url, r:url("/hook"), SECRET) }
      end
    end)

    teardown(function()
      if app then app:stop() end
      -- event ids start at 1 on each engine: a fresh receiver for each
      if receiver then receiver:stop() end
      receiver = nil
    end)

    it("delivers every event exactly once per attempt sequence, in order"
       .. " per subject, signed", function()
      -- a dispatcher takes free shards up to its cap (4 of 8), then
      -- probes for more and gives those back after lease_ttl (20 s): the
      -- worker that runs first on a loaded machine may hold all 8 until
      -- then. The events go in once both workers hold a shard; every
      -- shard has subjects, so both have work.
      wait_until(function()
        local busy = 0
        for _, n in ipairs(get_json(app, "/held").held) do
          if n > 0 then busy = busy + 1 end
        end
        return busy >= 2
      end, 40, "both workers holding a shard")
      local covered = {}
      for k = 0, 11 do
        covered[outbox.shard_of(engine .. "_pay_" .. k) % 8] = true
      end
      for p = 0, 7 do assert.truthy(covered[p], "shard " .. p) end
      local before = get_json(receiver, "/_ctl/stats")
      local all = {}
      -- enqueued in batches while the dispatchers run
      for batch = 1, 6 do
        local events = {}
        for i = 1, 20 do
          local k = (batch * 20 + i) % 12
          events[i] = { subject = engine .. "_pay_" .. k,
                        type = "payment.paid",
                        payload = { batch = batch, i = i } }
        end
        local st, b = post_json(app, "/enqueue", { events = events })
        assert.equal(201, st, json.encode(b))
        for _, id in ipairs(b.ids) do
          all[#all + 1] = id
        end
      end
      assert.equal(120, #all)
      local stats
      wait_until(function()
        stats = get_json(receiver, "/_ctl/stats")
        for _, id in ipairs(all) do
          if not stats.ok[tostring(id)] then return false end
        end
        return true
      end, 60, "all 120 events delivered")
      local forced = 0
      for _, id in ipairs(all) do
        local k = tostring(id)
        assert.equal(1, stats.ok[k], "event " .. k .. " delivered "
                     .. tostring(stats.ok[k]) .. " times")
        local want = id % FAIL_EVERY == 0 and 2 or 1
        if want == 2 then forced = forced + 1 end
        assert.equal(want, stats.attempts[k], "attempts of event " .. k)
      end
      assert.truthy(forced >= 10)
      -- in order per subject, and both workers took part
      local last, workers = {}, {}
      local mine = {}
      for _, id in ipairs(all) do mine[id] = true end
      for _, o in ipairs(stats.order) do
        if mine[o.id] then
          assert.truthy((last[o.subject] or 0) < o.id,
                        o.subject .. ": " .. o.id .. " after "
                        .. tostring(last[o.subject]))
          last[o.subject] = o.id
          workers[o.worker] = (workers[o.worker] or 0) + 1
        end
      end
      local n = 0
      for _ in pairs(workers) do n = n + 1 end
      assert.equal(2, n, json.encode(workers))
      assert.same(before.refused, stats.refused)
    end)

    it("dead-letters a rejected event and replays it with the exec script",
       function()
      local subject = engine .. "_rejected"
      local st = post_json(receiver, "/_ctl/reject",
                           { subjects = { subject } })
      assert.equal(200, st)
      local _, b = post_json(app, "/enqueue", { events = {
        { subject = subject, type = "payment.paid", payload = { n = 1 } },
      } })
      local dead_id = b.ids[1]
      local rc, out
      wait_until(function()
        rc, out = outbox_cli(url, "list", "--state", "dead", "--subject",
                             subject)
        return rc == 0 and out:find('"id":' .. dead_id, 1, true) ~= nil
      end, 30, "the dead letter")
      local row = json.decode(out:match("[^\n]+"))
      assert.equal("dead", row.state)
      assert.equal(1, row.attempts)       -- 400: not retried
      -- the status and the receiver's reason (its answer's body)
      assert.truthy(row.last_error:find('answered 400: {"error":"rejected"}',
                                        1, true), row.last_error)
      assert.equal(post_json(receiver, "/_ctl/reject", { subjects = {} }),
                   200)
      rc, out = outbox_cli(url, "replay", "--dead", "--subject", subject)
      assert.equal(0, rc, out)
      assert.truthy(out:find("replayed 1", 1, true), out)
      wait_until(function()
        local s = get_json(receiver, "/_ctl/stats")
        return s.ok[tostring(dead_id)] == 1
      end, 30, "the replayed event")
      rc, out = outbox_cli(url, "bogus")
      assert.equal(2, rc, out)
      -- nothing to list: said on stderr, stdout stays JSON lines
      rc, out = outbox_cli(url, "list", "--subject", "no_such_subject")
      assert.equal(0, rc, out)
      assert.matches("no events match", out, 1, true)
      if engine == "sqlite" then
        local typo = tmp .. "/no-such.db"
        rc, out = outbox_cli("sqlite:" .. typo, "list")
        assert.equal(2, rc, out)
        assert.matches("no database file", out, 1, true)
        assert.is_nil(io.open(typo))
      end
    end)
  end)
end
