-- bench/workers.lua -- the driver and the report of bench/workers (read its
-- top).
--   paygate exec bench/workers.lua run DEV_DIR GW_PORT SIM_PORT ADMIN_PORT
--                                  SECONDS AT_ONCE LABEL WORKERS LOAD
--     drives one scripts/run pair; prints its figures as one line of JSON
--   paygate exec bench/workers.lua report FILE
--     those lines: a row per run, then for each worker count the medians
--     (of failures: the sums) of the reference's runs and of this one's,
--     and this / reference
local paygate = require "paygate"
local core = require "paygate.core"
local json = require "cjson.safe"
local apikey = require "paygate.apikey"
local sql = require "paygate.sql"

-- a run's figures: name, width, format, value, "sum" or the median
local COLS = {
  { "created/s", 9, "%9.1f", "create_per_s" },
  { "p50 ms", 6, "%6.0f", "create_p50" },
  { "p99 ms", 6, "%6.0f", "create_p99" },
  { "max ms", 6, "%6.0f", "create_max" },
  { "pay p99", 7, "%7.0f", "pay_p99" },
  { "pay max", 7, "%7.0f", "pay_max" },
  { "notified/s", 10, "%10.1f", "notified_per_s" },
  { "failed", 6, "%6d", "failed", "sum" },
  { "busy", 5, "%5d", "busy", "sum" },
  { "not paid", 8, "%8d", "not_paid", "sum" },
  { "cpu ms/op", 9, "%9.1f", "cpu_ms_per_op" },
}

local function median(t)
  if #t == 0 then return 0 end
  table.sort(t)
  return (t[math.floor((#t + 1) / 2)] + t[math.ceil((#t + 1) / 2)]) / 2
end

local function report(file)
  local runs = {}
  for line in assert(io.open(file)):lines() do
    local r = json.decode(line)
    if r then runs[#runs + 1] = r end
  end
  local head = ("%-10s %7s %5s"):format("run", "workers", "load")
  for _, c in ipairs(COLS) do
    head = head .. (" %" .. c[2] .. "s"):format(c[1])
  end
  print()
  print(head)
  local groups, order = {}, {}
  for _, r in ipairs(runs) do
    local row = ("%-10s %7d %5s"):format(r.label, r.workers, r.load_before)
    for _, c in ipairs(COLS) do row = row .. " " .. c[3]:format(r[c[4]]) end
    print(row)
    local g = r.label:match("/(%d+)$")
    if not groups[g] then
      groups[g] = { ref = {}, this = {} }
      order[#order + 1] = g
    end
    table.insert(groups[g][r.label:match("^ref") and "ref" or "this"], r)
  end
  for i, r in ipairs(runs) do
    for _, e in ipairs(r.errors or {}) do
      print(("  run %d (%s): %s"):format(i, r.label, e))
    end
  end
  print()
  print(("%-12s %10s %10s %8s"):format("", "reference", "this",
                                       "this/ref"))
  for _, g in ipairs(order) do
    print(g .. " workers (" .. #groups[g].ref .. " and "
          .. #groups[g].this .. " runs)")
    for _, c in ipairs(COLS) do
      local v = {}
      for _, side in ipairs({ "ref", "this" }) do
        local xs, sum = {}, 0
        for _, r in ipairs(groups[g][side]) do
          xs[#xs + 1] = r[c[4]]
          sum = sum + r[c[4]]
        end
        v[side] = c[5] == "sum" and sum or median(xs)
      end
      print(("  %-10s %10.1f %10.1f %8s"):format(c[1], v.ref, v.this,
        v.ref ~= 0 and ("%.2f"):format(v.this / v.ref) or "-"))
    end
  end
end


local mode = arg[1]
if mode == "report" then return report(arg[2]) end
assert(mode == "run", "usage: see bench/workers")
local dir, gw_port, sim_port, admin_port = arg[2], arg[3], arg[4], arg[5]
local secs, ncreate = tonumber(arg[6]), tonumber(arg[7])
local label, workers, load_before = arg[8], tonumber(arg[9]), arg[10]
local npay = ncreate
assert(dir and secs and ncreate and workers, "usage: see bench/workers")
local GW = "http://127.0.0.1:" .. gw_port
local SIM = "http://127.0.0.1:" .. sim_port
local ADMIN = "http://127.0.0.1:" .. admin_port

local function read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

-- ready: both serve, and scripts/run has made the API key
local key
local deadline = core.mono() + 90
while true do
  local a = paygate.http.request{ url = ADMIN .. "/healthz", timeout = 2 }
  local s = paygate.http.request{ url = SIM .. "/sim/public-key", timeout = 2 }
  key = json.decode(read(dir .. "/apikey.json") or "")
  if a and a.status == 200 and s and s.status == 200 and key then break end
  assert(core.mono() < deadline, "the pair did not start: see " .. dir)
  paygate.sleep(0.2)
end

local function metric(body, pat)
  local n = 0
  for v in body:gmatch(pat) do n = n + tonumber(v) end
  return n
end
local function busy_metric()
  local res = paygate.http.request{ url = ADMIN .. "/metrics", timeout = 5 }
  if not res then return -1 end
  return metric(res.body,
    'paygate_store_errors_total{[^}]*kind="busy"[^}]*} (%d+)')
end

-- the gateway's workers: CPU seconds (user + system) of the master's children
local function gw_cpu()
  local master = (read(dir .. "/gateway.pid") or ""):match("%d+")
  local p = io.popen("pgrep -P " .. master)
  local t = 0
  for pid in p:read("*a"):gmatch("%d+") do
    local st = read("/proc/" .. pid .. "/stat") or ""
    local rest = st:match("%) (.*)")
    if rest then
      local f = {}
      for w in rest:gmatch("%S+") do f[#f + 1] = w end
      t = t + (tonumber(f[12]) + tonumber(f[13])) / 100
    end
  end
  p:close()
  return t
end

local function signed(method, path, body, idem)
  local h = apikey.sign{ app_id = key.app_id, key_id = key.key_id,
                         secret = key.secret, method = method, path = path,
                         body = body, idempotency_key = idem }
  h["Content-Type"] = "application/json"
  return h
end

local st = { created = 0, create_status = {}, create_lat = {},
             paid = 0, pay_status = {}, notified = {}, pay_lat = {},
             notified_in_window = 0, errors = {} }
local function bump(t, k) t[k] = (t[k] or 0) + 1 end
local function err(what)
  if #st.errors < 12 then st.errors[#st.errors + 1] = what end
end

local queue, qh, qt = {}, 1, 0
local paid_ids = {}
local run = ("%d"):format(os.time())

local t0 = core.mono()
local stop_at = t0 + secs
local busy0, cpu0 = busy_metric(), gw_cpu()

local tasks = {}
for w = 1, ncreate do
  tasks[#tasks + 1] = paygate.spawn(function()
    local n = 0
    while core.mono() < stop_at do
      n = n + 1
      local id = ("ld-%s-%d-%d"):format(run, w, n)
      local body = json.encode{ order_id = id, channel = "native",
                                amount = 100 + n % 50, description = "load" }
      local t = core.mono()
      local res, e = paygate.http.request{ method = "POST",
        url = GW .. "/v1/payments", body = body, timeout = 30,
        headers = signed("POST", "/v1/payments", body, id) }
      st.create_lat[#st.create_lat + 1] = core.mono() - t
      if not res then
        bump(st.create_status, "error"); err("create: " .. tostring(e))
      else
        bump(st.create_status, tostring(res.status))
        if res.status == 201 then
          st.created = st.created + 1
          local p = json.decode(res.body).payment
          qt = qt + 1
          queue[qt] = { id = p.id, otn = p.out_trade_no }
        else
          err("create " .. res.status .. ": " .. res.body:sub(1, 200))
        end
      end
    end
  end)
end
local payers = {}
for _ = 1, npay do
  payers[#payers + 1] = paygate.spawn(function()
    while true do
      -- (the payments left when the run ends stay unpaid: the run is
      -- SECONDS of both kinds of traffic at once, not a drain after it)
      if core.mono() >= stop_at then return end
      if qh > qt then
        paygate.sleep(0.002)
      else
        local o = queue[qh]
        queue[qh] = nil
        qh = qh + 1
        local t = core.mono()
        local res, e = paygate.http.request{ method = "POST",
          url = SIM .. "/sim/transactions/" .. o.otn .. "/pay?wait=10",
          timeout = 30 }
        st.pay_lat[#st.pay_lat + 1] = core.mono() - t
        if not res then
          bump(st.pay_status, "error"); err("pay: " .. tostring(e))
        else
          bump(st.pay_status, tostring(res.status))
          if res.status == 200 then
            st.paid = st.paid + 1
            paid_ids[#paid_ids + 1] = o.id
            local n = res.headers["x-sim-notified"] or "none"
            bump(st.notified, n)
            if n == "204" and core.mono() <= stop_at then
              st.notified_in_window = st.notified_in_window + 1
            end
          else
            err("pay " .. res.status .. ": " .. res.body:sub(1, 200))
          end
        end
      end
    end
  end)
end
for _, t in ipairs(tasks) do t:wait() end
for _, t in ipairs(payers) do t:wait() end
local t_load = core.mono() - t0
local cpu1 = gw_cpu()

-- every notification delivered (or the wait ends: bounded)
local pending
deadline = core.mono() + 60
repeat
  local res = paygate.http.request{ url = SIM
    .. "/sim/notifications?state=pending", timeout = 30 }
  pending = res and res.status == 200 and #(json.decode(res.body) or {}) or -1
  if pending ~= 0 then paygate.sleep(0.5) end
until pending == 0 or core.mono() > deadline

-- every attempt's answer
local res = assert(paygate.http.request{ url = SIM .. "/sim/notifications",
                                         timeout = 60 })
local notes = assert(json.decode(res.body))
local att = { total = 0, ok = 0, fail = {} }
local states = {}
for _, n in ipairs(notes) do
  bump(states, n.state)
  for _, a in ipairs(n.attempts or {}) do
    att.total = att.total + 1
    if a.status == 200 or a.status == 204 then
      att.ok = att.ok + 1
    else
      bump(att.fail, tostring(a.status or a.error))
    end
  end
end

-- every paid order `paid` in the gateway (its store, read beside it)
local db = assert(sql.open("sqlite:" .. dir .. "/gateway.db"))
local rows = assert(db:query("SELECT id, state FROM gw_payments"))
local state_of = {}
for _, r in ipairs(rows) do state_of[r.id] = r.state end
db:close()
local not_paid, not_paid_states = 0, {}
for _, id in ipairs(paid_ids) do
  if state_of[id] ~= "paid" then
    not_paid = not_paid + 1
    bump(not_paid_states, tostring(state_of[id]))
  end
end

local function pct(t, p)
  if #t == 0 then return 0 end
  table.sort(t)
  return t[math.max(1, math.ceil(#t * p))] * 1000
end

-- the gateway's log: "busy" errors, 5xx answers, notifications not 2xx
local logs = { busy = 0, gw_5xx = 0, notify_not_2xx = 0, warns = 0 }
for line in (io.open(dir .. "/gateway.log") or io.open("/dev/null")):lines()
do
  local e = json.decode(line)
  if type(e) == "table" then
    if line:find("busy: ", 1, true)
       or line:find("database is locked", 1, true) then
      logs.busy = logs.busy + 1
    end
    if e.level == "warn" or e.level == "error" then
      logs.warns = logs.warns + 1
    end
    if e.msg == "access" and type(e.status) == "number" then
      if e.status >= 500 then logs.gw_5xx = logs.gw_5xx + 1 end
      if tostring(e.path):find("^/wechatpay/notify") and e.status >= 300
      then
        logs.notify_not_2xx = logs.notify_not_2xx + 1
      end
    end
  end
end

local bad_creates = 0
for k, v in pairs(st.create_status) do
  if k ~= "201" then bad_creates = bad_creates + v end
end
local bad_pays = 0
for k, v in pairs(st.pay_status) do
  if k ~= "200" then bad_pays = bad_pays + v end
end
local attempts_failed = att.total - att.ok
local busy_count = busy_metric()
busy_count = busy_count >= 0 and busy_count - busy0 or 0
print(json.encode{
  label = label, workers = workers, load_before = load_before,
  secs = secs, at_once = ncreate, created = st.created,
  create_status = st.create_status, create_per_s = st.created / secs,
  create_p50 = pct(st.create_lat, 0.5), create_p99 = pct(st.create_lat, 0.99),
  create_max = pct(st.create_lat, 1),
  paid = st.paid, pay_status = st.pay_status, notified = st.notified,
  pay_p50 = pct(st.pay_lat, 0.5), pay_p99 = pct(st.pay_lat, 0.99),
  pay_max = pct(st.pay_lat, 1),
  notified_per_s = st.notified_in_window / secs,
  pending_after = pending, notification_states = states,
  attempts = att.total, attempts_failed = att.fail,
  -- a create not 201, a pay not 200, a notification's attempt not
  -- answered 2xx in time (answered late too), a notification still
  -- pending after the wait
  failed = bad_creates + bad_pays + attempts_failed + math.max(pending, 0),
  busy = math.max(busy_count, logs.busy), log = logs,
  not_paid = not_paid, not_paid_states = not_paid_states,
  -- the gateway's CPU per create or notification applied
  cpu_ms_per_op = st.created + st.paid > 0
    and (cpu1 - cpu0) * 1000 / (st.created + st.paid) or 0,
  errors = st.errors,
})
