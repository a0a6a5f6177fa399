-- bench/json.lua -- encodes/s of paygate.json.encode against cjson.encode
-- in the same run, on tables shaped like JSON responses. One core.
--   usage: paygate exec bench/json.lua [SECONDS]
-- Prints "name paygate_per_s cjson_per_s ratio" per shape.
local json = require "paygate.json"
local cjson = require "cjson"

local secs = tonumber(arg and arg[1]) or 2

local function measure(fn, v)
  for _ = 1, 2000 do fn(v) end          -- warm up (JIT, buffers)
  local n, batch = 0, 256
  local t0 = os.clock()
  local t = t0
  while t - t0 < secs do
    for _ = 1, batch do fn(v) end
    n = n + batch
    t = os.clock()
  end
  return n / (t - t0)
end

local shapes = {
  { "hello", { message = "hello", ok = true } },
  { "response10", {
    id = 12345, out_trade_no = "ORD20240801000123",
    transaction_id = "4200002345202408011234567890", status = "SUCCESS",
    amount = 100, currency = "CNY", paid = true,
    created_at = 1722850421, description = "Image shop - goods 1",
    payer = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o" } },
  { "nested", {
    code_url = "weixin://wxpay/bizpayurl?pr=JyC91EIz1",
    amount = { total = 100, currency = "CNY", payer_total = 90 },
    items = { { id = 1, name = "a", price = 10.5 },
              { id = 2, name = "b", price = 20.25 } },
    tags = { "x", "y", "z" } } },
}

io.write(string.format("%-12s %12s %12s %6s\n", "shape", "paygate/s",
                       "cjson/s", "ratio"))
for _, s in ipairs(shapes) do
  local name, v = s[1], s[2]
  assert(cjson.decode(json.encode(v)))
  local a = measure(json.encode, v)
  local b = measure(cjson.encode, v)
  io.write(string.format("%-12s %12.0f %12.0f %6.2f\n", name, a, b, a / b))
end
