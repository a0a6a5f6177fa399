-- bench/soak.lua -- the driver and the watch of bench/soak (read its top).
--   paygate exec bench/soak.lua DEV_DIR GW_PORT SIM_PORT ADMIN_PORT SECONDS
--                               FLOWS_AT_ONCE
local paygate = require "paygate"
local json = require "paygate.json"
local core = require "paygate.core"

local dir, gw_port, sim_port, admin_port, secs, conc =
  arg[1], arg[2], arg[3], arg[4], arg[5], arg[6]
secs, conc = tonumber(secs), tonumber(conc)
assert(dir and conc, "usage: see bench/soak")
local GW = "http://127.0.0.1:" .. gw_port
local SIM = "http://127.0.0.1:" .. sim_port
local ADMIN = "http://127.0.0.1:" .. admin_port
local INTERVAL = tonumber(os.getenv("SOAK_INTERVAL")) or 30

local function read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

local function cmd(c)
  local p = io.popen(c)
  local s = p:read("*a")
  p:close()
  return s
end

-- the server ready: the admin listener's /healthz answers (the first run
-- makes the dev merchant, which takes a few seconds)
local deadline = core.mono() + 90
while true do
  local res = paygate.http.request{ url = ADMIN .. "/healthz", timeout = 2 }
  local sim = paygate.http.request{ url = SIM .. "/sim/public-key",
                                    timeout = 2 }
  if res and res.status == 200 and sim and sim.status == 200 then break end
  if core.mono() > deadline then
    io.stderr:write("bench/soak: the gateway did not start (see "
                    .. dir .. "/gateway.log)\n")
    os.exit(1)
  end
  paygate.sleep(0.2)
end

-- each server's worker: the child of the master its pid file names
local function worker(name)
  local master = (read(dir .. "/" .. name .. ".pid") or ""):match("%d+")
  local child = master and cmd("pgrep -P " .. master):match("%d+")
  return assert(child, "no worker for " .. name)
end
local procs = { { "gateway", worker("gateway") },
                { "simulator", worker("simulator") } }

-- KiB resident: all of it, and the process's own memory (RssAnon: the
-- heaps; not the libraries' pages nor the shared dictionaries, which grow
-- until their configured size is in use)
local function rss_kib(pid)
  local s = read("/proc/" .. pid .. "/status") or ""
  return tonumber(s:match("VmRSS:%s*(%d+)")) or 0,
         tonumber(s:match("RssAnon:%s*(%d+)")) or 0
end
local function fds(pid)
  return tonumber(cmd("ls /proc/" .. pid .. "/fd 2>/dev/null | wc -l")) or 0
end
local function lua_heap()
  local res = paygate.http.request{ url = ADMIN .. "/metrics", timeout = 5 }
  local v = res and res.body:match("\npaygate_lua_memory_bytes{[^}]*} (%d+)")
  return v and tonumber(v) or 0
end
local function store_mib()
  return (tonumber(cmd("du -sk " .. dir .. " | cut -f1")) or 0) / 1024
end

local stats = { flows = 0, refunds = 0, errors = 0 }
local shown = {}
local function failed(what)
  stats.errors = stats.errors + 1
  if #shown < 10 then shown[#shown + 1] = what end
end

local function call(method, url, body, headers)
  headers = headers or {}
  headers["Content-Type"] = "application/json"
  local res, err = paygate.http.request{ method = method, url = url,
    body = body and json.encode(body) or nil, headers = headers,
    timeout = 30 }
  if not res then return nil, tostring(err) end
  return res
end

local function flow(w, n)
  local id = ("soak-%d-%d-%d"):format(os.time(), w, n)
  local create = { order_id = id, channel = "native", amount = 100 + n % 50,
                   description = "soak" }
  local res, err = call("POST", GW .. "/v1/payments", create,
                        { ["Idempotency-Key"] = id })
  if not res or res.status ~= 201 then
    return failed("create: " .. (err or res.status .. " " .. res.body))
  end
  local p = json.decode(res.body).payment
  res, err = call("POST", SIM .. "/sim/transactions/" .. p.out_trade_no
                  .. "/pay?wait=5")
  if not res or res.status ~= 200
     or res.headers["x-sim-notified"] ~= "204" then
    return failed("pay: " .. (err or res.status .. " "
                  .. tostring(res.headers["x-sim-notified"])))
  end
  res, err = call("GET", GW .. "/v1/payments/" .. p.id)
  if not res or res.status ~= 200 or json.decode(res.body).state ~= "paid"
  then
    return failed("get: " .. (err or res.status .. " " .. res.body))
  end
  res, err = call("POST", GW .. "/v1/payments", create,
                  { ["Idempotency-Key"] = id })
  if not res or res.status ~= 201
     or res.headers["idempotent-replayed"] ~= "true" then
    return failed("replay: " .. (err or tostring(res.status)))
  end
  if n % 4 == 0 then
    res, err = call("POST", GW .. "/v1/payments/" .. p.id .. "/refunds",
                    { amount = 30, reason = "soak" },
                    { ["Idempotency-Key"] = id .. "-r" })
    if not res or res.status ~= 201 then
      return failed("refund: " .. (err or res.status .. " " .. res.body))
    end
    local r = json.decode(res.body)
    res, err = call("POST", SIM .. "/sim/refunds/" .. r.out_refund_no
                    .. "/settle?wait=5", { status = "SUCCESS" })
    if not res or res.status ~= 200 then
      return failed("settle: " .. (err or res.status .. " " .. res.body))
    end
    stats.refunds = stats.refunds + 1
  end
  stats.flows = stats.flows + 1
end

local samples = {}
local function sample(t)
  local s = { t = t, heap = lua_heap(), store = store_mib() }
  local line = ("%5.0f s  flows %6d  errors %d"):format(t, stats.flows,
                                                          stats.errors)
  for _, p in ipairs(procs) do
    local all, own = rss_kib(p[2])
    s[p[1]] = own
    line = line .. ("  %s rss %.1f MiB (own %.1f) fds %d"):format(p[1],
      all / 1024, own / 1024, fds(p[2]))
  end
  line = line .. ("  lua heap %.1f MiB  store %.0f MiB"):format(
    s.heap / 1048576, s.store)
  print(line)
  io.stdout:flush()
  samples[#samples + 1] = s
end

local t0 = core.mono()
local stop_at = t0 + secs
local tasks = {}
for w = 1, conc do
  tasks[w] = paygate.spawn(function()
    local n = 0
    while core.mono() < stop_at do
      n = n + 1
      flow(w, n)
    end
  end)
end
sample(0)
repeat
  paygate.sleep(math.max(0, math.min(INTERVAL, stop_at - core.mono())))
  sample(core.mono() - t0)
until core.mono() >= stop_at - 0.5
for _, t in ipairs(tasks) do t:wait() end

print()
print(("flows %d (%d with a refund) in %.0f s, %.1f/s; errors %d")
      :format(stats.flows, stats.refunds, core.mono() - t0,
              stats.flows / (core.mono() - t0), stats.errors))
for _, e in ipairs(shown) do print("  error: " .. e) end
local first, mid, last = samples[1], samples[math.floor(#samples / 2) + 1],
                         samples[#samples]
for _, p in ipairs(procs) do
  local k = p[1]
  print(("%-9s own RSS %.1f -> %.1f -> %.1f MiB: %+.1f MiB in the first"
         .. " half, %+.1f in the second"):format(k, first[k] / 1024,
         mid[k] / 1024,
         last[k] / 1024, (mid[k] - first[k]) / 1024,
         (last[k] - mid[k]) / 1024))
end
if stats.errors > 0 then os.exit(1) end
