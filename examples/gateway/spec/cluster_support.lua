-- Shared set-up of the multi-instance, model_cluster and chaos specs: a
-- copy of the app whose gw/hooks.lua records which instance delivered
-- each event, the webhook receiver (spec/support/outbox_receiver), the
-- notification tee (spec/notify_tee), and the checks they make on the
-- store and the sinks: one transition to paid per payment, audit chains
-- that verify, events delivered (once per sink).
local testing = require "paygate.testing"
local audit = require "paygate.audit"
local json = require "paygate.json"
local crypto = require "paygate.crypto"
local core = dofile("examples/gateway/spec/core_support.lua")

local _M = { core = core }

local write = core.write
local read = testing.proc.read         -- "" while the file is missing

--- syntax: dir, hooks_log = cluster.app_copy()
-- A copy of examples/gateway whose hooks.lua appends, for every event it
-- is given, "<event id> <listen address> <pid>" to hooks_log: the
-- in-process sink shows which instance's dispatcher delivered what.
function _M.app_copy()
  local dir = testing.tmpdir()
  os.execute("cp -r examples/gateway/app.lua examples/gateway/gw"
             .. " examples/gateway/migrations '" .. dir .. "/'")
  local hooks_log = dir .. "/hooks.log"
  write(dir .. "/gw/hooks.lua", ([[
local paygate = require "paygate"
local ffi = require "ffi"
pcall(ffi.cdef, "int getpid(void);")
local LOG = %q
return {
  ["*"] = function(event)
    local f = assert(io.open(LOG, "a"))
    f:write(string.format("%%d %%s %%d\n", event.id,
            tostring(paygate.runtime.listen), ffi.C.getpid()))
    f:close()
  end,
}
]]):format(hooks_log))
  return dir, hooks_log
end

--- syntax: t = cluster.hook_runs(hooks_log)
-- returns: { by_event = { [id] = n }, by_instance = { [listen] = n },
-- by_worker = { [pid] = n } }
function _M.hook_runs(path)
  local t = { by_event = {}, by_instance = {}, by_worker = {} }
  for id, listen, pid in read(path):gmatch("(%d+) (%S+) (%d+)\n") do
    id = tonumber(id)
    t.by_event[id] = (t.by_event[id] or 0) + 1
    t.by_instance[listen] = (t.by_instance[listen] or 0) + 1
    t.by_worker[pid] = (t.by_worker[pid] or 0) + 1
  end
  return t
end

--- syntax: rcv = cluster.receiver([fail_first_every])
-- The webhook receiver (one worker) and a webhook secret in a file:
-- rcv.srv, rcv.url, rcv.secret_file, rcv:stats().
function _M.receiver(every)
  local secret = crypto.random_nonce(32)
  local srv = testing.start_app{ app = "spec/support/outbox_receiver",
    config = { secret = secret, fail_first_every = every or 0 } }
  local secret_file = srv.dir .. "/webhook.secret"
  write(secret_file, secret .. "\n")
  local rcv = { srv = srv, url = srv:url("/hook"), secret_file = secret_file }
  function rcv.stats()
    local res = assert(srv:request("/_ctl/stats"))
    assert(res.status == 200, "receiver stats: " .. res.status)
    return res.json
  end
  return rcv
end

--- syntax: tee = cluster.tee() -- tee.url, tee:targets(list[, o]),
-- tee:log(); o: seed, copy (notify_tee's seeded choice)
function _M.tee()
  local srv = testing.start_app{ app = "examples/gateway/spec/notify_tee" }
  local tee = { srv = srv, url = srv:url("") }
  function tee.targets(list, o)
    local b = { targets = list }
    for k, v in pairs(o or {}) do b[k] = v end
    local res = assert(srv:request{ method = "POST", path = "/_ctl/targets",
                                    json = b })
    assert(res.status == 200, "tee targets: " .. res.status)
  end
  function tee.log()
    local res = assert(srv:request("/_ctl/log"))
    assert(res.status == 200, "tee log: " .. res.status)
    return res.json
  end
  return tee
end

local function count_by(rows, key)
  local t = {}
  for _, r in ipairs(rows) do
    t[r[key]] = (t[r[key]] or 0) + 1
  end
  return t
end

--- syntax: cluster.assert_paid_once(db, ids)
-- Every payment of ids is paid, with one audit entry to paid, its chain
-- verifying, one applied effect (gw_notification_effects) and one
-- payment.paid event.
function _M.assert_paid_once(db, ids)
  local paid = count_by(assert(db:query("SELECT subject FROM paygate_audit"
    .. " WHERE to_state = 'paid'")), "subject")
  local evs = count_by(assert(db:query("SELECT subject FROM paygate_outbox"
    .. " WHERE type = 'payment.paid'")), "subject")
  for _, id in ipairs(ids) do
    local rows = assert(db:query("SELECT state, version, out_trade_no FROM"
                                 .. " gw_payments WHERE id = $1", { id }))
    assert(rows[1], "no payment " .. id)
    assert(rows[1].state == "paid", id .. " is " .. tostring(rows[1].state))
    assert(rows[1].version == 3, id .. " has version " .. rows[1].version
           .. " (created, paying, paid: 3)")
    assert(paid["payment:" .. id] == 1, id .. ": "
           .. tostring(paid["payment:" .. id]) .. " audit entries to paid")
    assert(evs[id] == 1, id .. ": " .. tostring(evs[id])
           .. " payment.paid events")
    local effects = assert(db:query("SELECT key FROM gw_notification_effects"
      .. " WHERE key LIKE $1", { "pay|%|" .. rows[1].out_trade_no .. "|%" }))
    assert(#effects == 1, id .. ": " .. #effects .. " effects")
    local ok, rep = audit.verify(db, "payment:" .. id)
    assert(ok, id .. ": audit chain: " .. tostring(rep and rep.message
                                                  or json.encode(rep)))
  end
end

--- syntax: rows = cluster.wait_outbox_drained(db, timeout)
-- Waits until no event is pending; none may be dead. returns: every row.
function _M.wait_outbox_drained(db, timeout)
  testing.wait_until(function()
    local rows = assert(db:query("SELECT count(*) AS n FROM paygate_outbox"
                                 .. " WHERE state <> 'delivered'"))
    return tonumber(rows[1].n) == 0
  end, timeout or 20, "every outbox event delivered")
  return assert(db:query("SELECT id, subject, type, state FROM"
                         .. " paygate_outbox ORDER BY id"))
end

--- syntax: cluster.wait_shards(gws, timeout)
-- The first instance's dispatchers take every free shard (past their cap
-- too) before the second starts, and give the extra ones back after
-- lease_ttl: waits until each instance of gws holds shards, or events
-- sent sooner could all be dispatched by the first (its /metrics:
-- paygate_outbox_shards per worker).
function _M.wait_shards(gws, timeout)
  testing.wait_until(function()
    for _, gw in ipairs(gws) do
      local res = gw.srv:admin_get("/metrics")
      local held = 0
      for n in (res.status == 200 and res.body or ""):gmatch(
          "\npaygate_outbox_shards{[^}]*} (%d+)") do
        held = held + tonumber(n)
      end
      if held == 0 then return false end
    end
    return true
  end, timeout, "both instances' dispatchers to hold outbox shards")
end

--- syntax: retried, workers, instances = cluster.check_sinks(rows, o)
-- Each event of rows (outbox rows: id) accepted once by the webhook
-- receiver o.rcv, run once by the hooks logging to o.hooks_log, and, with
-- o.redis (a URL), once in the Redis stream o.stream (its length: #rows).
-- returns: how many events the webhook sink retried, in how many workers
-- and how many instances the hooks ran.
function _M.check_sinks(rows, o)
  local luassert = require "luassert"
  -- the webhook receiver: each event accepted once, some maybe after a
  -- refused first attempt
  local st = o.rcv.stats()
  local retried = 0
  for _, r in ipairs(rows) do
    local k = tostring(r.id)
    assert(st.ok[k] == 1, "event " .. k .. " accepted "
           .. tostring(st.ok[k]) .. " times by the webhook receiver")
    if st.attempts[k] > 1 then retried = retried + 1 end
  end
  -- the Redis stream: each event id once
  if o.redis then
    local c = assert(require("paygate.redis").connect(o.redis))
    luassert.equal(#rows, tonumber(assert(c:call("XLEN", o.stream))))
    local entries = assert(c:call("XRANGE", o.stream, "-", "+"))
    local seen = {}
    for _, e in ipairs(entries) do
      local f = e[2]
      for j = 1, #f, 2 do
        if f[j] == "id" then
          assert(not seen[f[j + 1]], "event " .. f[j + 1] .. " twice in"
                 .. " the stream")
          seen[f[j + 1]] = true
        end
      end
    end
    for _, r in ipairs(rows) do
      assert(seen[tostring(r.id)], "event " .. r.id .. " not in the stream")
    end
    c:close()
  end
  -- the in-process hooks: each event once
  local runs = _M.hook_runs(o.hooks_log)
  for _, r in ipairs(rows) do
    assert(runs.by_event[r.id] == 1, "event " .. r.id .. " hooked "
           .. tostring(runs.by_event[r.id]) .. " times")
  end
  local instances, workers = 0, 0
  for _ in pairs(runs.by_instance) do instances = instances + 1 end
  for _ in pairs(runs.by_worker) do workers = workers + 1 end
  return retried, workers, instances
end

--- syntax: gw = cluster.gateway(sim, o)
-- A gateway that can be killed and started again on the same port (the
-- notify_url the simulator keeps calling). o: db (URL; required: it must
-- outlive one process's folder), gateway (overrides), workers (2).
-- gw:start(), gw:kill9() (SIGKILL to the master and every worker at
-- once, then waits until all are gone), and core_support's gw:call,
-- gw:create, gw:get, gw:wait_state.
local proc = testing.proc
local sql = require "paygate.sql"
local apikey = require "paygate.apikey"
local ffi = require "ffi"
pcall(ffi.cdef, "int kill(int pid, int sig);")

local Gw = setmetatable({}, { __index = core })
local Gw_mt = { __index = Gw }

function _M.gateway(sim, o)
  local gw = setmetatable({ sim = sim, o = o, port = testing.free_port(),
                            app_id = "shop1", db_url = o.db, starts = 0 },
                          Gw_mt)
  gw.db = assert(sql.open(o.db))
  return gw
end

function Gw:start()
  local o = self.o
  self.srv = core.start_srv(self.sim, { app = o.app, port = self.port,
    workers = o.workers or 2, gateway = o.gateway,
    db = function() return o.db end })
  self.starts = self.starts + 1
  if not self.key_id then
    local k = assert(apikey.create(self.db, self.app_id))
    self.key_id, self.secret = k.key_id, k.secret
  end
  return self
end

-- The state letter of pid in /proc (R, S, T, Z, ...), or nil when gone.
local function state(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return nil end
  local st = f:read("*a")
  f:close()
  return st:match("^%d+ %b() (%a)")
end

local function alive(pid)
  if ffi.C.kill(pid, 0) ~= 0 then return false end
  local s = state(pid)
  return s ~= nil and s ~= "Z"              -- a zombie is gone
end

local function stopped(pid)
  local s = state(pid)
  return s == nil or s == "T" or s == "t" or s == "Z"
end

--- syntax: n = cluster.kill9(srv) -- SIGKILL to a server started by
-- testing.start_app: its master and every worker at once; waits until
-- all are gone, removes its folder. returns: how many were killed.
function _M.kill9(srv)
  -- SIGSTOP first, so that the master forks no worker between the list of
  -- its children and the kill (a worker forked then would outlive it and
  -- keep the port)
  local pids = { srv.pid }
  -- (each wait is on a condition, 30 s: an ASan process, its shadow
  -- memory unmapped by the kernel, can take seconds to be gone on a
  -- loaded machine; nothing is spent when it is quick)
  ffi.C.kill(srv.pid, 19)                   -- SIGSTOP
  proc.wait_until(function() return stopped(srv.pid) end, 30,
                  "the master to stop")
  for _, pid in ipairs(srv:workers()) do pids[#pids + 1] = pid end
  for i = #pids, 1, -1 do ffi.C.kill(pids[i], 9) end
  assert(srv.proc:wait(30), "the master did not die")
  proc.wait_until(function()
    for _, pid in ipairs(pids) do
      if alive(pid) then return false end
    end
    return true
  end, 30, "the killed workers to be gone")
  testing.server.rmdir(srv.dir)
  return #pids
end

--- syntax: n = gw:kill9() -- cluster.kill9 of the running gateway
function Gw:kill9()
  return _M.kill9(self.srv)
end

--- syntax: c = cluster.cluster(); c.start{ stream =, tee = }; c.stop()
-- Two gateway instances (two workers each) on one PostgreSQL and Redis,
-- beside the simulator (time_scale 100): reconciliation off (the
-- notifications alone must do it), events to a webhook receiver that
-- refuses every 3rd event's first attempt, the Redis stream `stream` and
-- the hooks; notifications through the tee (`tee`: its options; round
-- robin without them), and every dispatcher holding shards (`reconcile`:
-- the gateway's reconcile table instead; `merchant`: options of its
-- merchant, as core.start takes them). c.start
-- fills c = { pg, rd, sim, rcv, tee, app_dir, hooks_log, gws } as it
-- goes, so c.stop() (a spec's teardown) stops what a failed start began.
function _M.cluster()
  local servers = require "spec.support.servers"
  local c = {}
  function c.start(o)
    c.pg = servers.postgres()
    c.rd = servers.redis()
    c.sim = testing.simulator{ time_scale = 100 }
    c.rcv = _M.receiver(3)        -- every 3rd event's first attempt: 500
    c.tee = _M.tee()
    c.app_dir, c.hooks_log = _M.app_copy()
    local gateway = {
      public_url = c.tee.url, redis = c.rd.url,
      redis_stream = { stream = o.stream },
      webhooks = { { url = c.rcv.url, secret_file = c.rcv.secret_file,
                     timeout = 2 } },
      -- notifications alone must do it, unless told
      reconcile = o.reconcile or { enabled = false },
      -- 8 shards over 4 dispatchers: every dispatcher holds some (the
      -- lease outlives a webhook's timeout)
      dispatcher = { interval = 0.05, max_partitions = 2, lease_ttl = 5,
                     backoff_base = 0.05, backoff_cap = 0.2 },
    }
    c.gws = {}
    for i = 1, 2 do
      c.gws[i] = core.start(c.sim, { app = c.app_dir, workers = 2,
        db = function() return c.pg.url .. "?pool=6" end,
        gateway = gateway, merchant = o.merchant })
    end
    c.tee.targets({ c.gws[1].srv:url(""), c.gws[2].srv:url("") }, o.tee)
    _M.wait_shards(c.gws, 20)
    return c
  end
  function c.stop()
    for _, gw in ipairs(c.gws or {}) do gw:stop() end
    testing.stop_all()
    if c.app_dir then testing.server.rmdir(c.app_dir) end
    servers.stop_all()
  end
  return c
end

return _M
