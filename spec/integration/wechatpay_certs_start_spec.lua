-- paygate.wechatpay's platform certificate download, as docs/wechatpay.md
-- says ("Platform certificates", "Notifications"): certificates held at
-- start are refreshed from the start; a download that times out is
-- timeout; a configuration error answered to every verification is not
-- grown by each caller; the periodic refresh waits refresh_interval ±10 %
-- (the jitter is proven by the waits it asks for); the certificate gauge
-- is recomputed every hour in "manual" mode too, with no download. Each
-- fix's case failed before it.
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local resource = require "paygate.wechatpay.resource"
local proc = require "support.proc"
local wxtest = require "support.wxtest"

local P1, P2 = wxtest.P1, wxtest.P2
local dir, keys, srv

local function downloads()
  return wxtest.count(srv, "GET", "/v3/certificates")
end

local function client(over) return wxtest.client(srv, keys, over) end

-- a notification signed with P2's key (a serial the client does not hold)
local function notification_by_p2()
  local r = assert(resource.encrypt(wxtest.APIV3,
    json.encode({ out_trade_no = "T20261130001", trade_state = "SUCCESS" }),
    "transaction"))
  local body = json.encode({ id = "EV-1", event_type = "TRANSACTION.SUCCESS",
                             resource_type = "encrypt-resource", resource = r })
  local f = assert(io.open(keys.p2_key)); local pem = f:read("*a"); f:close()
  local ts, nonce = tostring(os.time()), crypto.random_nonce(32)
  local sig = crypto.sign_base64(crypto.private_key(pem),
                                 ts .. "\n" .. nonce .. "\n" .. body .. "\n")
  return { headers = { ["wechatpay-timestamp"] = ts,
    ["wechatpay-nonce"] = nonce, ["wechatpay-serial"] = P2,
    ["wechatpay-signature"] = sig }, body = body }
end

setup(function() dir, keys, srv = wxtest.serve() end)
teardown(function() wxtest.stop(srv, dir) end)
before_each(function() wxtest.fresh(srv, P1) end)

describe("certificates held at start", function()
  it("are refreshed by a background download from the start", function()
    -- WeChat already lists the rotated-in P2; the client starts holding P1
    -- only (configured, or from state_dir)
    wxtest.certs(srv, { serials = { P1, P2 } })
    local wx = client{ platform_certificates = { keys.p1_cert } }
    local ok = pcall(proc.wait_until, function() return downloads() > 0 end,
                     5, "a download at start")
    local serials = wx:certificate_status().serials
    wx:stop()
    assert.is_true(ok, "no /v3/certificates request within 5 s of start")
    assert.same({ P1, P2 }, serials)
  end)
end)

describe("a notification whose unknown serial's download times out", function()
  it("is timeout, as documented, not unknown_serial", function()
    local wx = client{ platform_certificates = { keys.p1_cert },
                       download_certificates = "manual", timeout = 0.5 }
    wxtest.certs(srv, { serials = { P1, P2 }, delay = 2 })
    local ev, err = wx:parse_notification(notification_by_p2(),
                                          { replay = false })
    wx:stop()
    assert.is_nil(ev)
    assert.equal("timeout", err.kind, tostring(err))
  end)
end)

describe("a 404 RESOURCE_NOT_EXISTS seen after startup_timeout", function()
  it("answers every verification the same invalid_config, never a message "
     .. "grown by the callers before", function()
    -- the start's download outlasts startup_timeout, then finds the
    -- merchant has only a public key
    wxtest.certs(srv, { status = 404, delay = 0.5 })
    local wx = client{ startup_timeout = 0.1 }
    -- (a verification's own download for the unknown serial answers the
    -- 404 too, then they are rate-limited, unknown_serial, until the
    -- background retry, 2.5 to 7.5 s on, records the configuration error:
    -- then every verification answers it without a download)
    wx:parse_notification(notification_by_p2(), { replay = false })
    proc.wait_until(function()
      local before = downloads()
      local _, err = wx:parse_notification(notification_by_p2(),
                                           { replay = false })
      return err.kind == "invalid_config" and downloads() == before
    end, 15, "the background download's 404")
    local msgs = {}
    for i = 1, 3 do
      local _, err = wx:parse_notification(notification_by_p2(),
                                           { replay = false })
      assert.equal("invalid_config", err.kind)
      msgs[i] = err.message
    end
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}" }, { body = "{}" } })
    local _, e1 = wx:request("GET", "/v3/x")
    local _, e2 = wx:request("GET", "/v3/x")
    wx:stop()
    assert.equal(msgs[1], msgs[3])
    assert.equal(e1.message, e2.message)
    assert.matches("^notification: WeChat Pay has no platform certificate",
                   msgs[1])
  end)
end)

describe("the periodic refresh", function()
  it("waits refresh_interval ±10 % between downloads, each client a draw of"
     .. " its own", function()
    local certs = require "paygate.wechatpay.certs"
    local sleep, random = core.sleep, math.random
    -- the waits the refresh loops ask for (the sleep itself runs as ever):
    -- certs.lua's sleeps of a second or more, the hourly report's left out
    local asked = {}
    core.sleep = function(d, ...)
      if d >= 1 and d ~= certs.REPORT_INTERVAL and debug.getinfo(2, "S")
           .source:find("wechatpay/certs.lua", 1, true) then
        asked[#asked + 1] = d
      end
      return sleep(d, ...)
    end
    local clients = {}
    finally(function()
      core.sleep, math.random = sleep, random
      for _, wx in ipairs(clients) do wx:stop() end
    end)
    local I = 1000
    local function start()
      local n = #asked
      clients[#clients + 1] = client{ platform_certificates = { keys.p1_cert },
                                      refresh_interval = I }
      -- the refresher downloads at start (certificates held), then waits
      proc.wait_until(function() return #asked > n end, 10,
                      "the refresher's wait")
      assert.equal(n + 1, #asked)
      return asked[n + 1]
    end
    -- the band's edges: the draw fixed at its ends (math.random() only;
    -- a call with bounds is left to the real one)
    for _, r in ipairs({ 0, 1 }) do
      math.random = function(...)
        if select("#", ...) == 0 then return r end
        return random(...)
      end
      local d = start()
      math.random = random
      assert.near(I * (0.9 + 0.2 * r), d, 1e-6)
    end
    -- clients started together wait apart, each within the band
    local seen, distinct = {}, 0
    for _ = 1, 6 do
      local d = start()
      assert.is_true(d >= 0.9 * I and d <= 1.1 * I, "waits " .. d .. " s")
      if not seen[d] then distinct = distinct + 1 end
      seen[d] = true
    end
    assert.is_true(distinct > 1, "every client waits the same time")
  end)
end)

describe('download_certificates = "manual"', function()
  it("recomputes the certificate gauge every REPORT_INTERVAL, downloading"
     .. " nothing", function()
    local certs = require "paygate.wechatpay.certs"
    local sleep, report = core.sleep, certs.report
    -- the hourly report's waits are asked for as ever and cut to 10 ms
    -- (the loop waits certs.REPORT_INTERVAL each time), and the reports
    -- of this client are counted
    local waits, reports, wx = 0, 0, nil
    core.sleep = function(d, ...)
      if d == certs.REPORT_INTERVAL and debug.getinfo(2, "S")
           .source:find("wechatpay/certs.lua", 1, true) then
        waits = waits + 1
        return sleep(0.01)
      end
      return sleep(d, ...)
    end
    certs.report = function(w, ...)
      if w == wx then reports = reports + 1 end
      return report(w, ...)
    end
    finally(function()
      core.sleep, certs.report = sleep, report
      if wx then wx:stop() end
    end)
    wx = client{ platform_certificates = { keys.p1_cert },
                 download_certificates = "manual" }
    local before = reports
    local ok = pcall(proc.wait_until, function()
      return reports >= before + 2 end, 5, "two hourly reports")
    assert.is_true(ok, "the gauge was not recomputed after start (" .. waits
                   .. " hourly waits, " .. reports - before .. " reports)")
    assert.equal(0, downloads())
  end)
end)
