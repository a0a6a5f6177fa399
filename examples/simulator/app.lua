-- examples/simulator: an offline WeChat Pay API v3 server for tests, demos
-- and chaos. Run:
--   paygate run examples/simulator --listen 127.0.0.1:9000 --config sim.lua
-- docs/simulator.md describes the config, every endpoint and the control
-- API under /sim/.
local paygate = require "paygate"
local sql = require "paygate.sql"
local migrate = require "paygate.migrate"
local config = require "sim.config"
local clock = require "sim.clock"
local identity = require "sim.identity"
local faults = require "sim.faults"
local api = require "sim.api"
local notify = require "sim.notify"
local bills = require "sim.bills"
local orders = require "sim.orders"
local control = require "sim.control"

-- A bad configuration is one line on stderr and exit status 2: every
-- worker finds it, only the first to claim the shared key writes it (the
-- others wait until it is written: the master kills the rest once one
-- has exited), and the master adds nothing to a worker's exit 2.
local K_FATAL = "sim:config_error"
local function fatal(msg)
  local d = require("paygate.shared").get_dict("paygate")
  if d:add(K_FATAL, 1, 10) then
    io.stderr:write("simulator: " .. msg .. "\n")  -- one write: one line
    io.stderr:flush()
    d:set(K_FATAL, 2, 10)
  else
    local core = require "paygate.core"
    local deadline = core.mono() + 2
    while d:get(K_FATAL) ~= 2 and core.mono() < deadline do
      core.sleep(0.01)
    end
  end
  os.exit(2)
end

local cfg, why = config.check(paygate.config_copy())
if not cfg then fatal(why) end
clock.init(cfg)                   -- WeChat's clock: clock_offset

do
  local ok, why = require("sim.exec").mkdir_p(cfg.state_dir)
  if not ok then
    fatal("config.state_dir: cannot create " .. cfg.state_dir .. " (" .. why
          .. ")")
  end
end
local db, err = sql.open("sqlite:" .. cfg.state_dir .. "/simulator.db")
if not db then error("simulator: state database: " .. tostring(err)) end
assert(migrate.run(db, paygate.app_dir .. "/migrations"))

local ok
ok, err = identity.init(db, cfg)
if not ok then
  if tostring(err):match("^config%.") then fatal(err) end
  error("simulator: " .. tostring(err))
end

api.init(cfg)

-- A configured merchant certificate past its notAfter: said at the start
-- (once, by the first worker to get here), as its requests are refused
-- (or, with accept_expired_merchant_certificates, accepted all the same):
-- judged on WeChat's clock, as the requests are (sim.api).
do
  local d = require("paygate.shared").get_dict("paygate")
  local now = clock.now()
  local rfc3339 = require("sim.certificates").rfc3339
  for _, m in ipairs(cfg.merchants) do
    for k, na in pairs(m.not_after) do
      if na <= now and d:add("sim:expired_warned:" .. m.mchid .. ":" .. k,
                             true, 60) then
        paygate.log.warn("simulator: merchant " .. m.mchid .. "'s "
          .. "certificate " .. k .. " expired at " .. rfc3339(na) .. "; "
          .. (cfg.accept_expired_merchant_certificates
              and "its requests are accepted "
                  .. "(accept_expired_merchant_certificates)"
              or "its requests are refused (401 SIGN_ERROR)"),
          { mchid = m.mchid, serial = k })
      end
    end
  end
end
-- No platform certificate valid now (a configured one past its notAfter,
-- or a state_dir kept too long): /v3/certificates lists none and clients
-- refuse the answers it signs. Said at the start, once.
do
  local now = require("paygate.core").time()
  local cur = identity.current(now)
  if cur and cur.not_after <= now and require("paygate.shared")
       .get_dict("paygate"):add("sim:platform_expired_warned", true, 60) then
    paygate.log.warn("simulator: no platform certificate is valid now: "
      .. cur.serial .. " expired at "
      .. require("sim.certificates").rfc3339(cur.not_after)
      .. "; /v3/certificates lists none and certificate-mode clients refuse"
      .. " the answers it signs: rotate it (POST /sim/certificates/rotate)"
      .. " or configure a valid platform_certificate",
      { serial = cur.serial })
  end
end
local ctx = { db = db, config = cfg, identity = identity, faults = faults,
              api = api }
orders.init(ctx)
orders.routes(ctx)
bills.routes(ctx)
require("sim.media").routes(ctx)
api.refusals()                    -- the runtime's /v3 404, 405, 400 bad_path
if cfg.control then
  control.routes(ctx)
  if notify.routes then notify.routes(ctx) end
end

paygate.spawn(function()
  notify.start(ctx)
end)
orders.start(ctx)
