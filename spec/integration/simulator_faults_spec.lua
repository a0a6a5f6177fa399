-- The simulator's faults for the client's error kinds no other fault
-- provokes: an answer (or a notification) signed by a platform
-- certificate past its notAfter (cert_expired), a 2xx whose body is not
-- the API's (malformed; bad_response from /v3/certificates), and an
-- answer past the client's body limit (body_too_large).
-- Each through a real paygate.wechatpay client over loopback.
local sn = require "support.simnotify"
local crypto = require "paygate.crypto"
local core = require "paygate.core"
local wechatpay = require "paygate.wechatpay"

local function order_no()
  return "FLT" .. crypto.random_nonce(16)
end

local function client(sim)
  return assert(wechatpay.client({ mchid = sn.MCHID, appid = sn.APPID,
    merchant_private_key = sn.KEY_PATH, merchant_serial = sn.SERIAL,
    apiv3_key = sn.APIV3, base_url = sim.base, timeout = 5, deadline = 10,
    backup_url = false }))
end

local function fault(sim, spec)
  local st, doc = sn.ctl(sim, "POST", "/sim/faults", spec)
  assert(st == 200, "fault: " .. tostring(st) .. " "
         .. tostring(type(doc) == "table" and doc.message or doc))
  return doc
end

local function held(wx, serial)
  for _, s in ipairs(wx:certificate_status().serials) do
    if s == serial then return true end
  end
  return false
end

describe("simulator faults for the client's other error kinds", function()
  local sim, recv, wx
  setup(function()
    sim = sn.start{ time_scale = 1000, answer_timeout = 1 }
    recv = sn.receiver()
    wx = client(sim)
  end)
  teardown(function()
    if wx then wx:stop() end
    if sim then sim:stop() end
    if recv then recv:stop() end
  end)
  after_each(function()
    sn.ctl(sim, "DELETE", "/sim/faults")
  end)

  it("expired_certificate: answers signed by a certificate the client took "
     .. "while valid, past its notAfter, are cert_expired", function()
    local no = order_no()
    sn.prepay(sim, no, sn.notify_url(recv, "exp"))
    local f = fault(sim, { endpoint = "query", kind = "expired_certificate",
                           expires_in = 3, count = 2 })
    assert.matches("^%x+$", f.serial)
    assert.is_true(f.not_after > core.time(), "not_after " .. f.not_after)
    -- listed while valid: the client downloads it for the unknown serial
    local d, err = wx:query_by_out_trade_no(no)
    assert.truthy(d, tostring(err))
    assert.equal("NOTPAY", d.trade_state)
    assert.is_true(held(wx, f.serial), "the fault's certificate is held")
    sn.wait_until(function() return core.time() > f.not_after + 0.5 end, 10,
                  "the fault's certificate to expire")
    d, err = wx:query_by_out_trade_no(no)
    assert.is_nil(d)
    assert.equal("cert_expired", err.kind, tostring(err))
    assert.equal(f.serial, err.serial)
    -- count = 2: the next answer is signed as usual again
    d, err = wx:query_by_out_trade_no(no)
    assert.truthy(d, tostring(err))
    -- gone from the list once expired
    local listed = sn.platform_certs(sim)
    assert.is_nil(listed[f.serial])
  end)

  it("expired_certificate on notify: the notification is signed by it, "
     .. "and does not verify as cert_expired", function()
    local f = fault(sim, { endpoint = "notify", kind = "expired_certificate",
                           expires_in = 3, count = 1 })
    assert.truthy(wx:refresh_certificates())
    assert.is_true(held(wx, f.serial))
    sn.wait_until(function() return core.time() > f.not_after + 0.5 end, 10,
                  "the fault's certificate to expire")
    local no = order_no()
    sn.prepay(sim, no, sn.notify_url(recv, "expn"))
    sn.pay(sim, no)
    local got
    sn.wait_until(function()
      got = sn.received(recv, "expn")
      return #got >= 1
    end, 20, "the payment notification")
    local rec = got[1]
    assert.equal(f.serial, rec.headers["wechatpay-serial"])
    local ev, err = wx:parse_notification(rec, { replay = false })
    assert.is_nil(ev)
    assert.equal("cert_expired", err.kind, tostring(err))
  end)

  it("bad_body: a signed 2xx whose body is not the API's JSON is malformed; "
     .. "from /v3/certificates it is bad_response", function()
    local no = order_no()
    sn.prepay(sim, no, sn.notify_url(recv, "bad"))
    local f = fault(sim, { endpoint = "query", kind = "bad_body", count = 1 })
    assert.truthy(f.body:find("<html>", 1, true))
    local d, err = wx:query_by_out_trade_no(no)
    assert.is_nil(d)
    assert.equal("malformed", err.kind, tostring(err))
    assert.equal(200, err.status)
    -- a 204 answer (close) becomes a 200 with the body
    fault(sim, { endpoint = "close", kind = "bad_body", body = "OK",
                 count = 1 })
    d, err = wx:close(no)
    assert.is_nil(d)
    assert.equal("malformed", err.kind, tostring(err))
    -- a body that is JSON, but not the certificates' shape
    fault(sim, { endpoint = "certificates", kind = "bad_body",
                 body = '{"data":"none"}', count = 1 })
    d, err = wx:refresh_certificates()
    assert.is_nil(d)
    assert.equal("bad_response", err.kind, tostring(err))
    -- the count is spent: answers are whole again
    assert.truthy(wx:refresh_certificates())
    assert.truthy(wx:query_by_out_trade_no(no))
  end)

  it("oversize_body: an answer padded past the client's 16 MiB is "
     .. "body_too_large; padded within it, it still reads", function()
    local no = order_no()
    sn.prepay(sim, no, sn.notify_url(recv, "big"))
    local f = fault(sim, { endpoint = "query", kind = "oversize_body",
                           count = 1 })
    assert.equal(16 * 1024 * 1024 + 1, f.bytes)
    local d, err = wx:query_by_out_trade_no(no)
    assert.is_nil(d)
    assert.equal("body_too_large", err.kind, tostring(err))
    -- the padding is JSON whitespace under the signature: a size the client
    -- takes reads as the answer itself
    fault(sim, { endpoint = "query", kind = "oversize_body",
                 bytes = 100000, count = 1 })
    d, err = wx:query_by_out_trade_no(no)
    assert.truthy(d, tostring(err))
    assert.equal(no, d.out_trade_no)
  end)

  it("refuses what the new kinds cannot do", function()
    local cases = {
      { { endpoint = "query", kind = "expired_certificate",
          expires_in = -1 }, "expires_in" },
      { { endpoint = "billdownload", kind = "expired_certificate" },
        "answers unsigned" },
      { { endpoint = "notify", kind = "bad_body" },
        "not a notification fault" },
      { { endpoint = "notify", kind = "oversize_body" },
        "not a notification fault" },
      { { endpoint = "query", kind = "bad_body", body = 7 }, "body" },
      { { endpoint = "query", kind = "oversize_body", bytes = 0 }, "bytes" },
      { { endpoint = "query", kind = "oversize_body", bytes = 1e12 },
        "bytes" },
      { { endpoint = "query", kind = "oversize_body", byts = 9 },
        "unknown key byts" },
    }
    for _, c in ipairs(cases) do
      local st, doc = sn.ctl(sim, "POST", "/sim/faults", c[1])
      assert.equal(400, st, c[2])
      assert.truthy(tostring(doc.message):find(c[2], 1, true),
                    tostring(doc.message))
    end
    local _, list = sn.ctl(sim, "GET", "/sim/faults")
    assert.same({}, list)
  end)
end)

describe("the expired_certificate fault under the SM variant", function()
  local sim
  setup(function() sim = sn.start{ sm = true } end)
  teardown(function() if sim then sim:stop() end end)

  it("makes an SM2 certificate of its dates, listed while valid", function()
    local x509 = require "paygate.x509"
    local f = fault(sim, { endpoint = "query", kind = "expired_certificate",
                           expires_in = 600, count = 1 })
    local _, list = sn.ctl(sim, "GET", "/sim/platform-certificates")
    local pem
    for _, c in ipairs(list) do
      if c.serial_no == f.serial then pem = c.certificate end
    end
    assert.truthy(pem, "the fault's certificate is listed")
    local cert = assert(x509.load(pem))
    assert.equal("SM2", cert:key_type())
    assert.equal(f.not_after, cert:not_after())
    assert.is_true(cert:not_before() <= core.time())
    assert.is_true(math.abs(cert:not_after() - core.time() - 600) <= 5)
    -- an answer signed by it verifies under its key (SM2 with SM3)
    local no = order_no()
    sn.prepay(sim, no, "http://127.0.0.1:9/n")
    local res = sn.signed(sim, "GET", "/v3/pay/transactions/out-trade-no/"
                          .. no .. "?mchid=" .. sn.MCHID)
    assert.equal(200, res.status, res.body)
    assert.equal(f.serial, res.headers["wechatpay-serial"])
    assert.is_true(crypto.verify_base64(cert, res.headers["wechatpay-timestamp"]
      .. "\n" .. res.headers["wechatpay-nonce"] .. "\n" .. res.body .. "\n",
      res.headers["wechatpay-signature"], sn.SM2))
  end)
end)
