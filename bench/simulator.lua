-- bench/simulator.lua: the Lua half of bench/simulator, run with
-- `paygate exec bench/simulator.lua MODE ...`:
--   setup DIR              a merchant with fresh keys (DIR/merchant.lua) and
--                          the simulator's config (DIR/sim.conf)
--   order DIR URL          creates the order the benchmark queries, through
--                          paygate.wechatpay (DIR/order.txt: out_trade_no,
--                          DIR/body.txt: one signed query answer's body)
--   gen DIR FILE N [PART]  N distinct signed GETs of that order, one per
--                          line: target TAB Authorization (fresh timestamps:
--                          the simulator refuses them after 5 minutes)
--   sign DIR SECS          crypto.sign per second, in process, of what the
--                          simulator signs for one answer (timestamp, nonce,
--                          the body) with an RSA-2048 key like its own
--   keys DIR               prints the merchant's public key file, private
--                          key file and serial (for simulator_floor.c)
local crypto = require "paygate.crypto"
local testing = require "paygate.testing"
local sign = require "paygate.wechatpay.sign"

local mode = arg[1]

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local function write(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

local function merchant(dir)
  return assert(loadfile(dir .. "/merchant.lua"))()
end

-- Calls fn in batches until secs of CPU time pass; returns ops/s.
local function measure(secs, fn)
  for _ = 1, 50 do fn() end              -- warm up (contexts, JIT)
  local n, batch = 0, 16
  local t0 = os.clock()
  local t = t0
  while t - t0 < secs do
    for _ = 1, batch do fn() end
    n = n + batch
    t = os.clock()
  end
  return n / (t - t0)
end

if mode == "setup" then
  local dir = arg[2]
  local m = testing.merchant{ dir = dir }
  write(dir .. "/merchant.lua", "return " .. testing.lua_source(m) .. "\n")
  os.execute("mkdir -p " .. dir .. "/state")
  write(dir .. "/sim.conf", "return " .. testing.lua_source{
    merchants = { { mchid = m.mchid, merchant_certificate = m.certificate,
                    apiv3_key = m.apiv3_key, appids = m.appids } },
    state_dir = dir .. "/state",
  } .. "\n")

elseif mode == "order" then
  local dir, url = arg[2], arg[3]
  local m = merchant(dir)
  local wechatpay = require "paygate.wechatpay"
  local wx = assert(wechatpay.client{
    mchid = m.mchid, merchant_private_key = m.private_key,
    merchant_certificate = m.certificate, apiv3_key = m.apiv3_key,
    base_url = url, backup_url = false })
  local no = testing.out_trade_no("BENCH")
  assert(wx:native_prepay{ appid = m.appid, description = "bench order",
    out_trade_no = no, notify_url = "https://127.0.0.1/notify",
    amount = { total = 100 } })
  local _, meta = assert(wx:query_by_out_trade_no(no))
  local res = assert(wx:request("GET", "/v3/pay/transactions/out-trade-no/"
                                .. no .. "?mchid=" .. m.mchid))
  write(dir .. "/order.txt", no)
  write(dir .. "/body.txt", res.body)
  wx:stop()
  assert(meta)

elseif mode == "gen" then
  local dir, file, n = arg[2], arg[3], tonumber(arg[4])
  local m = merchant(dir)
  local no = read(dir .. "/order.txt")
  local target = "/v3/pay/transactions/out-trade-no/" .. no .. "?mchid="
                 .. m.mchid
  local signer = { key = assert(crypto.private_key(read(m.private_key))),
                   schema = "WECHATPAY2-SHA256-RSA2048", mchid = m.mchid,
                   serial = m.serial }
  local out = assert(io.open(file, "wb"))
  for _ = 1, n do
    out:write(target, "\t", assert(sign.sign_request(signer, "GET", target,
                                                     "")), "\n")
  end
  out:close()

elseif mode == "sign" then
  local dir, secs = arg[2], tonumber(arg[3]) or 3
  local m = merchant(dir)
  local key = assert(crypto.private_key(read(m.private_key)))
  local body = read(dir .. "/body.txt")
  local ts = tostring(os.time())
  local rate = measure(secs, function()
    assert(crypto.sign_base64(key, ts .. "\n" .. crypto.random_nonce(32)
                              .. "\n" .. body .. "\n"))
  end)
  print(("sign %.0f"):format(rate))

elseif mode == "keys" then
  local m = merchant(arg[2])
  print(m.public_key .. " " .. m.private_key .. " " .. m.serial)

else
  io.stderr:write("usage: paygate exec bench/simulator.lua "
                  .. "setup|order|gen|sign|keys ...\n")
  os.exit(2)
end
