-- A client's log_level (and the runtime's --log-level) filters its lines;
-- a line filtered out is not said, so it must not count as said: the
-- marks that say a line once per instance (a platform certificate added,
-- the hourly previous-APIv3-key warning) are set only by a line logged.
-- Was: a client at "warn" (the test kit's) downloading first set the
-- "added" marks of lines it never printed, and a client of the same
-- merchant at info, downloading the same certificates, then said nothing.
local testing = require "paygate.testing"

-- /refresh?level=L: a client at log_level L ("runtime": none, the
-- runtime's level alone) made once, downloading the platform certificates
local APP = [[
local paygate = require "paygate"
local wechatpay = require "paygate.wechatpay"
local clients = {}
paygate.route("POST", "/refresh", function(req)
  local level = req:query().level
  local wx = clients[level]
  if not wx then
    local conf = paygate.config_copy().wechatpay
    conf.log_level = level ~= "runtime" and level or nil
    local err
    wx, err = wechatpay.client(conf)
    if not wx then return 500, { error = tostring(err) } end
    clients[level] = wx
  end
  local ok, err = wx:refresh_certificates()
  if not ok then return 502, { error = tostring(err) } end
  return 200, { ok = true }
end)]]

teardown(function() testing.stop_all() end)

local function lines(app, text)
  local found = {}
  for line in (app:logs() or ""):gmatch("[^\n]+") do
    if line:find(text, 1, true) then found[#found + 1] = line end
  end
  return found
end

local function refresh(app, level)
  local res = app:request{ method = "POST",
                           path = "/refresh?level=" .. level }
  assert.equal(200, res.status, res.body)
end

describe("a line a client's log_level filters out", function()
  it("does not count as said: a certificate added is said by the next "
     .. "client that logs it", function()
    local sim = testing.simulator()
    local app = testing.start_app{ source = APP,
      args = { "--log-level", "info" },
      config = { wechatpay = sim:client_config(nil,
        { download_certificates = "manual" }) } }
    local serial = sim:platform_certificates()[1].serial_no
    local said = "platform certificate " .. serial .. " added"
    refresh(app, "warn")             -- downloads them; says nothing
    assert.same({}, lines(app, said))
    refresh(app, "runtime")          -- downloads them again: new to it
    testing.wait_until(function() return #lines(app, said) == 1 end, 10,
                       "the info-level client's line")
    refresh(app, "info")             -- said already for the instance
    assert.equal(1, #lines(app, said))
  end)

  it("does not count as said: the previous-key warning of a client at "
     .. "error is said by one at warn", function()
    local sim = testing.simulator()
    local app = testing.start_app{ source = APP,
      config = { wechatpay = sim:client_config(nil,
        { download_certificates = "manual", apiv3_key = testing.apiv3_key(),
          previous_apiv3_keys = { sim.merchant.apiv3_key } }) } }
    local warning = "decrypted only with a previous APIv3 key"
    refresh(app, "error")
    assert.same({}, lines(app, warning))
    refresh(app, "warn")
    testing.wait_until(function() return #lines(app, warning) == 1 end, 10,
                       "the warn-level client's warning")
  end)
end)
