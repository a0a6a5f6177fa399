-- scripts/dev.lua: the set-up half of scripts/run, run with
--   build/paygate exec scripts/dev.lua DIR SIM_URL GATEWAY_URL
-- Makes the dev merchant once under DIR (keys by paygate.testing's key
-- maker, an APIv3 key: test keys for the simulator only, reused on later
-- runs), then (every run, since the ports may change) writes DIR/sim.lua
-- and DIR/gateway.lua: the simulator and the gateway on loopback, SQLite
-- under DIR, the gateway's unsigned-loopback dev app "dev".
--   build/paygate exec scripts/dev.lua DIR --apikey
-- prints the dev app's API key when it makes it (once, kept in
-- DIR/apikey.json), for trying signed requests, else "kept"; run it once
-- the gateway has started.
local core = require "paygate.core"
local testing = require "paygate.testing"
local json = require "cjson.safe"

local dir, sim_url, gw_url = arg[1], arg[2], arg[3]
if not dir or not sim_url then
  io.stderr:write("usage: paygate exec scripts/dev.lua DIR SIM_URL GATEWAY_URL"
                  .. "\n       paygate exec scripts/dev.lua DIR --apikey\n")
  os.exit(2)
end

local function read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

-- written whole or not at all; secrets readable by the owner only (from
-- the file's creation: never a moment readable by others)
local function write(path, data, private)
  assert(require("paygate").write_file(path, data, private and 384 or 420))
end

local function q(s) return string.format("%q", s) end

if sim_url == "--apikey" then
  local path = dir .. "/apikey.json"
  local k = json.decode(read(path) or "")
  if k then
    print("kept")        -- printed when made; not again on every start
    os.exit(0)
  end
  local apikey = require "paygate.apikey"
  local sql = require "paygate.sql"
  local db = assert(sql.open("sqlite:" .. dir .. "/gateway.db"))
  k = assert(apikey.create(db, "dev", { actor = "scripts/dev" }))
  db:close()
  write(path, json.encode(k), true)
  print(k.app_id .. " " .. k.key_id .. " " .. k.secret)
  os.exit(0)
end

assert(core.mkdir_p(dir .. "/keys"))
assert(core.mkdir_p(dir .. "/sim-state"))

-- the merchant: made once, reused after (its keys, mchid, appid)
local mpath = dir .. "/merchant.json"
local m = json.decode(read(mpath) or "")
if not (m and read(m.private_key or "") and read(m.certificate or "")) then
  -- a certificate valid for 10 years: the merchant is made once and kept
  m = testing.merchant_keys{ mchid = "1900000001", dir = dir .. "/keys",
                             days = 3650 }
  m.mchid = "1900000001"
  m.appid = "wx" .. require("paygate.crypto").hex(
    require("paygate.crypto").random_bytes(8))
  m.appids = { m.appid }
  write(dir .. "/apiv3.key", testing.apiv3_key(), true)
  write(mpath, json.encode(m), true)
end
local apiv3 = assert(read(dir .. "/apiv3.key"), "dev: " .. dir
                     .. "/apiv3.key is missing: remove " .. mpath)

write(dir .. "/sim.lua", "-- written by scripts/run (scripts/dev.lua)\n"
  .. "return {\n"
  .. "  merchants = { { mchid = " .. q(m.mchid) .. ",\n"
  .. "                  merchant_certificate = " .. q(m.certificate) .. ",\n"
  .. "                  apiv3_key = " .. q(apiv3) .. ",\n"
  .. "                  appids = { " .. q(m.appid) .. " } } },\n"
  .. "  state_dir = " .. q(dir .. "/sim-state") .. ",\n"
  .. "  -- a media upload of a file at the simulator's 5 MiB limit, in its\n"
  .. "  -- multipart, is past the runtime's default (5 MiB)\n"
  .. "  limits = { body_bytes = " .. testing.SIMULATOR_BODY_BYTES .. " },\n"
  .. "}\n", true)

write(dir .. "/gateway.lua", "-- written by scripts/run (scripts/dev.lua) at"
  .. " every run: put your own settings in gateway.local.lua beside it\n"
  .. "local conf = {\n"
  .. "  workers = 1,        -- one for a local run (gateway.local.lua may say"
  .. " more)\n"
  .. "  gateway = {\n"
  .. "    db = " .. q("sqlite:" .. dir .. "/gateway.db") .. ",\n"
  .. "    public_url = " .. q(gw_url) .. ",\n"
  .. "    dev_app = \"dev\",   -- unsigned /v1/ requests from loopback act as"
  .. " app \"dev\"\n"
  .. "    console = { access = \"loopback\" },  -- /console (docs/console.md)\n"
  .. "  },\n"
  .. "  merchants = { {\n"
  .. "    mchid = " .. q(m.mchid) .. ", appid = " .. q(m.appid) .. ",\n"
  .. "    merchant_private_key = " .. q(m.private_key) .. ",\n"
  .. "    merchant_certificate = " .. q(m.certificate) .. ",\n"
  .. "    apiv3_key_file = " .. q(dir .. "/apiv3.key") .. ",\n"
  .. "    base_url = " .. q(sim_url) .. ",\n"
  .. "  } },\n"
  .. "  shared = { wechatpay_replay = \"1m\" },  -- the replay cache's own\n"
  .. "}\n"
  .. "-- gateway.local.lua (yours; scripts/run never writes it) returns a\n"
  .. "-- table merged into this one: its gateway keys into gateway, its\n"
  .. "-- other keys over the top level, e.g.\n"
  .. "--   return { gateway = { dispatcher = { max_attempts = 1 } } }\n"
  .. "local path = " .. q(dir .. "/gateway.local.lua") .. "\n"
  .. "local f = io.open(path)\n"
  .. "if f then\n"
  .. "  f:close()\n"
  .. "  local mine = assert(loadfile(path))()\n"
  .. "  assert(type(mine) == \"table\", path .. \" must return a table\")\n"
  .. "  for k, v in pairs(mine) do\n"
  .. "    if k == \"gateway\" then\n"
  .. "      assert(type(v) == \"table\", path .. \": gateway must be a"
  .. " table\")\n"
  .. "      for gk, gv in pairs(v) do conf.gateway[gk] = gv end\n"
  .. "    else\n"
  .. "      conf[k] = v\n"
  .. "    end\n"
  .. "  end\n"
  .. "end\n"
  .. "return conf\n")
