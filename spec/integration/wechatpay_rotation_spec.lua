-- An APIv3 key rotation half done, seen by the client's certificate
-- downloads: an app's client given a new APIv3 key with the simulator's
-- (WeChat's) as previous decrypts the certificates only with the previous
-- key; each download counts in
-- paygate_wechatpay_previous_apiv3_key_used_total{source="certificates"}
-- and one warning is logged for the instance, naming the key by its
-- position, never its bytes. Was: nothing counted or said.
local testing = require "paygate.testing"

local APP = [[
local paygate = require "paygate"
local wechatpay = require "paygate.wechatpay"
local wx = assert(wechatpay.client(paygate.config_copy().wechatpay))
paygate.route("POST", "/refresh", function()
  local ok, err = wx:refresh_certificates()
  if not ok then return 502, { error = tostring(err) } end
  return 200, { ok = true }
end)]]

local WARNING = "decrypted only with a previous APIv3 key"

teardown(function() testing.stop_all() end)

describe("certificates decrypted only with a previous APIv3 key", function()
  it("are counted per download and warned of once", function()
    local sim = testing.simulator()
    local new = testing.apiv3_key()
    local app = testing.start_app{ source = APP, workers = 2,
      config = { wechatpay = sim:client_config(nil, { apiv3_key = new,
        previous_apiv3_keys = { sim.merchant.apiv3_key } }) } }
    local function count()
      local body = assert(app:admin_get("/metrics")).body
      return tonumber(body:match(
        'paygate_wechatpay_previous_apiv3_key_used_total{mchid="'
        .. sim.merchant.mchid .. '",source="certificates"} (%d+)\n'))
    end
    local res = app:request{ method = "POST", path = "/refresh" }
    assert.equal(200, res.status, res.body)
    local before = testing.wait_until(function()
      local n = count()
      return n and n >= 1 and n
    end, 10, "the download counted")
    res = app:request{ method = "POST", path = "/refresh" }
    assert.equal(200, res.status, res.body)
    testing.wait_until(function() return count() == before + 1 end, 10,
                       "the second download counted")
    local found = {}
    for line in (app:logs() or ""):gmatch("[^\n]+") do
      if line:find(WARNING, 1, true) then found[#found + 1] = line end
    end
    assert.equal(1, #found, table.concat(found, "\n"))
    assert.matches("the platform certificates WeChat sent decrypted only"
      .. " with a previous APIv3 key (previous_apiv3_keys[1]), not with the"
      .. " current one (apiv3_key)", found[1], 1, true)
    assert.matches('"source":"certificates"', found[1], 1, true)
    local all = app:logs() or ""
    assert.is_nil(all:find(new, 1, true))
    assert.is_nil(all:find(sim.merchant.apiv3_key, 1, true))
  end)
end)
