-- paygate.wechatpay end to end against the simulator: partner mode (a
-- service provider ordering for its sub-merchant), and the rotation of
-- WeChat's platform certificate seen by the client without a failed
-- request, for answers and for notifications.
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local testing = require "paygate.testing"
local x509 = require "paygate.x509"

local function amount(n) return { total = n, currency = "CNY" } end

describe("partner mode", function()
  local sim, wx, sp, sub

  setup(function()
    sim = testing.simulator{ partner = true }
    sp = sim.partner
    sub = sp.sub_mchid
    wx = sim:client(sp)
  end)

  teardown(function()
    if wx then wx:stop() end
    testing.stop_all()
  end)

  local function order(extra)
    local p = { sp_appid = sp.appid, sub_mchid = sub,
                description = "partner e2e", out_trade_no = testing.out_trade_no(),
                notify_url = "https://127.0.0.1/notify", amount = amount(100) }
    for k, v in pairs(extra or {}) do p[k] = v end
    return p
  end

  it("makes prepays for the sub-merchant", function()
    local p = order()
    local d = assert(wx:native_prepay(p))
    assert.matches("^weixin://", d.code_url)
    d = assert(wx:jsapi_prepay(order{ payer = { sp_openid = "oUpF8uMuAJO" } }))
    assert.is_string(d.prepay_id)
    d = assert(wx:jsapi_prepay(order{ sub_appid = sp.sub_appid,
                                     payer = { sub_openid = "oUpF8uMuAJO" } }))
    assert.is_string(d.prepay_id)
    d = assert(wx:app_prepay(order()))
    assert.is_string(d.prepay_id)
    d = assert(wx:h5_prepay(order{ scene_info = {
      payer_client_ip = "127.0.0.1", h5_info = { type = "iOS" } } }))
    assert.matches("^https://", d.h5_url)
  end)

  it("queries, pays, closes and refunds by sub_mchid", function()
    local p = order()
    assert(wx:native_prepay(p))
    local q = assert(wx:query_by_out_trade_no(p.out_trade_no, sub))
    assert.equal("NOTPAY", q.trade_state)
    assert.equal(sub, q.sub_mchid)
    assert.equal(sp.mchid, q.sp_mchid)
    sim:pay(p.out_trade_no, sub)
    q = assert(wx:query_by_out_trade_no(p.out_trade_no, sub))
    assert.equal("SUCCESS", q.trade_state)
    local t = assert(wx:query_by_transaction_id(q.transaction_id, sub))
    assert.equal(p.out_trade_no, t.out_trade_no)
    local rno = "R" .. crypto.random_nonce(20)
    local r = assert(wx:refund{ sub_mchid = sub,
      out_trade_no = p.out_trade_no, out_refund_no = rno,
      amount = { refund = 30, total = 100, currency = "CNY" } })
    assert.equal("PROCESSING", r.status)
    assert.equal("PROCESSING", assert(wx:query_refund(rno, sub)).status)
    sim:settle(rno, "SUCCESS", sub)
    assert.equal("SUCCESS", assert(wx:query_refund(rno, sub)).status)

    local c = order()
    assert(wx:native_prepay(c))
    assert.same({}, assert(wx:close(c.out_trade_no, sub)))
    assert.equal("CLOSED",
      assert(wx:query_by_out_trade_no(c.out_trade_no, sub)).trade_state)
  end)

  it("refuses a sub-merchant that is not the service provider's", function()
    local data, err = wx:native_prepay(order{ sub_mchid = "1999999999" })
    assert.is_nil(data)
    assert.is_truthy(err.status == 400 or err.status == 403)
  end)
end)

describe("a platform certificate rotation", function()
  local sim, wx

  setup(function()
    sim = testing.simulator()
  end)

  teardown(function()
    if wx then wx:stop() end
    testing.stop_all()
  end)

  it("is taken up by the client without a failed request", function()
    wx = sim:client(nil, { refresh_interval = 1 })
    local m = sim.merchant
    local no = testing.out_trade_no()
    assert(wx:native_prepay{ appid = m.appid, description = "rotation",
      out_trade_no = no, notify_url = "https://127.0.0.1/n",
      amount = amount(1) })
    local old = wx:certificate_status().newest
    local serials, failures, calls = {}, {}, 0
    local running = true
    -- queries without a pause, all through the rotation
    local task = core.spawn(function()
      while running do
        local res, err = wx:request("GET", "/v3/pay/transactions/out-trade-no/"
                                    .. no .. "?mchid=" .. m.mchid)
        calls = calls + 1
        if res then
          local s = res.headers["wechatpay-serial"]
          serials[s] = (serials[s] or 0) + 1
        else
          failures[#failures + 1] = tostring(err)
        end
        core.sleep(0.01)
      end
    end)
    -- the client takes the certificate that ends last as the newest: rotate
    -- in a later second than the current one was made, so the new one
    -- ends later (as WeChat's do; one made in the same second would tie)
    local made = 0
    for _, c in ipairs(sim:platform_certificates()) do
      local nb = x509.load(c.certificate):info().not_before
      if nb > made then made = nb end
    end
    testing.wait_until(function() return os.time() > made end, 5,
                       "a second after the current certificate was made")
    local rot = sim:rotate{ delay = 1 }
    local new = rot.serial_no
    assert.are_not.equal(old, new)
    -- WeChat lists the new certificate before it signs with it; the
    -- client's refresh (every refresh_interval: 1 s here) takes it in
    -- beside the old one, and from then on names it in Wechatpay-Serial
    testing.wait_until(function() return serials[new] end, 20,
                       "an answer signed with the new certificate")
    running = false
    task:wait()
    assert.same({}, failures)
    assert.is_true(serials[old] > 0)
    local st = wx:certificate_status()
    assert.equal(new, st.newest)
    local held = {}
    for _, s in ipairs(st.serials) do held[s] = true end
    assert.is_true(held[old] and held[new])
  end)

  it("reaches an app's notify handler without a failed delivery", function()
    local app = testing.start_app{ source = [[
local paygate = require "paygate"
local wechatpay = require "paygate.wechatpay"
local wx = assert(wechatpay.client(paygate.config_copy().wechatpay))
paygate.route("POST", "/notify", function(req)
  local ev, err = wx:parse_notification(req)
  if not ev then return wechatpay.notify_fail(err.kind) end
  return wechatpay.notify_ack()
end)]], config = { wechatpay = sim:client_config() } }
    -- the app holds the current certificate only, and refreshes twice a day
    local before = {}
    for _, c in ipairs(sim:platform_certificates()) do
      before[c.serial_no] = true
    end
    local rot = sim:rotate{ delay = 1 }
    testing.wait_until(function() return core.time() >= rot.use_from end, 10,
                       "the new certificate's use_from")
    local no = sim:order{ notify_url = app:url("/notify") }
    local d = sim:pay_and_wait(no)
    assert.equal(1, #d.attempts)               -- the first attempt got 204
    assert.equal(rot.serial_no, d.attempts[1].serial)
    assert.is_nil(before[rot.serial_no])
  end)
end)

describe("a platform certificate rotation in the log", function()
  local sim

  setup(function()
    sim = testing.simulator()
  end)

  teardown(function()
    testing.stop_all()
  end)

  it("says a new certificate once per instance, with its dates, and a"
     .. " download that works again after failures", function()
    local app = testing.start_app{ workers = 2,
      args = { "--log-level", "info" }, source = [[
local paygate = require "paygate"
local wechatpay = require "paygate.wechatpay"
local wx = assert(wechatpay.client(paygate.config_copy().wechatpay))
paygate.route("GET", "/", function() return 200, "ok" end)]],
      config = { wechatpay = sim:client_config(nil,
                                               { refresh_interval = 1 }) } }
    local function lines(text)
      local found = {}
      for line in (app:logs() or ""):gmatch("[^\n]+") do
        if line:find(text, 1, true) then found[#found + 1] = line end
      end
      return found
    end
    local function downloads()
      local n = 0
      for _, r in ipairs(sim:requests()) do
        if r.endpoint == "certificates" then n = n + 1 end
      end
      return n
    end
    -- the start's download (one for both workers) says what it brought
    testing.wait_until(function() return #lines(" added (valid from ") > 0
                       end, 10, "the first set said")
    local rot = sim:rotate{ delay = 3600 }     -- listed, not yet used
    local info = x509.load(rot.certificate):info()
    local said = "platform certificate " .. rot.serial_no .. " added"
    testing.wait_until(function() return #lines(said) > 0 end, 10,
                       "the rotated-in certificate said")
    local line = lines(said)[1]
    local function utc(t) return os.date("!%Y-%m-%dT%H:%M:%SZ", t) end
    assert.matches("(valid from " .. utc(info.not_before) .. " to "
                   .. utc(info.not_after) .. "), "
                   .. #sim:platform_certificates() .. " in the ring",
                   line, 1, true)
    assert.matches(sim.merchant.mchid, line, 1, true)
    -- the downloads that follow (both workers' timers) hold it already
    local n = downloads()
    testing.wait_until(function() return downloads() >= n + 4 end, 20,
                       "four more downloads")
    assert.equal(1, #lines(said), table.concat(lines(said), "\n"))
    -- WeChat refuses two downloads (each logged), then answers again
    assert.same({}, lines("downloaded again"))
    sim:fault{ endpoint = "certificates", kind = "error", status = 403,
               code = "NO_AUTH", count = 2 }
    testing.wait_until(function() return #lines("downloaded again") > 0 end,
                       20, "the recovery said")
    local back = lines("downloaded again")
    assert.equal(1, #back, table.concat(back, "\n"))
    assert.matches("platform certificates downloaded again after 2"
                   .. " failures", back[1], 1, true)
    assert.matches('"level":"info"', back[1], 1, true)
    assert.is_true(#lines("platform certificate refresh failed") > 0)
  end)
end)
