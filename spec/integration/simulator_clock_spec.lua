-- The simulator's clock_offset (a WeChat whose clock is off from ours):
-- every /v3 answer's Date header reads WeChat's clock, as its
-- Wechatpay-Timestamp does. Before, the Date was the runtime's (the
-- host's clock) while the timestamp was shifted: real WeChat's two come
-- from one clock, and a client or paygate doctor reading the Date saw a
-- WeChat in step that its signed timestamp put 90 s ahead. The control
-- API under /sim/ is no WeChat answer: its Date stays the host's.
-- WeChat has one clock for all it judges and writes: an order's
-- time_expire, success_time, create_time, a refund's times, the bills'
-- day. Before, those were on the host's clock: a time_expire 60 s ahead
-- of a client 90 s behind WeChat was taken, an order expired 90 s late,
-- and success_time read the host's time beside a timestamp 90 s ahead.
local sc = require "support.simclient"
local days = require "support.days"
local civil = require "paygate.civil"
local crypto = require "paygate.crypto"
local paygate = require "paygate"
local testing = require "paygate.testing"

local OFFSET = 90

local srv, c, keys, base

setup(function()
  -- time_expire_min = 0: an order can expire within the spec's seconds
  srv, base, c = sc.start(1, "clock_offset = " .. OFFSET .. ", "
                          .. "time_expire_min = 0,")
  keys = c:platform_keys()
end)

teardown(function() if srv then srv:stop() end end)

-- epoch second t as RFC 3339 in Beijing time, as a client writes it
local function rfc3339(t)
  return os.date("!%Y-%m-%dT%H:%M:%S+08:00", math.floor(t) + 8 * 3600)
end

-- the answer's Date, as epoch seconds (one Date header: two would read
-- as none)
local function date_of(res)
  local t = civil.http_date(res.headers["date"])
  assert(t, "no single Date header: " .. tostring(res.headers["date"]))
  return t
end

-- t within a second or two of WeChat's clock, read around the answer
local function wechat_now(t, before, after)
  assert.is_true(t >= before + OFFSET - 1 and t <= after + OFFSET + 1,
    ("Date %d is %d s off the host's clock, not %d"):format(t,
      t - after, OFFSET))
end

describe("simulator: clock_offset", function()
  it("puts the Date of a signed answer on WeChat's clock, the second its"
     .. " Wechatpay-Timestamp names", function()
    local before = os.time()
    local res = c:call("GET", "/v3/certificates", nil,
                       { ts = tostring(os.time() + OFFSET) })
    sc.assert_signed(res, keys)
    local t = date_of(res)
    wechat_now(t, before, os.time())
    assert.equal(tonumber(res.headers["wechatpay-timestamp"]), t)
  end)

  it("puts the Date of an error answer on WeChat's clock", function()
    local before = os.time()
    local res = c:query("clk-missing-0001")
    sc.assert_err(res, 404, "ORDER_NOT_EXIST")
    wechat_now(date_of(res), before, os.time())
    -- a timestamp refused: the Date says by how much the client is off
    res = c:call("GET", "/v3/certificates", nil,
                 { ts = tostring(os.time() - 400 + OFFSET) })
    sc.assert_err(res, 401, "SIGN_ERROR", "timestamp")
    wechat_now(date_of(res), before, os.time())
    -- a path the API does not have
    res = c:call("GET", "/v3/no/such/path")
    sc.assert_err(res, 404, "NOT_FOUND")
    wechat_now(date_of(res), before, os.time())
    -- a method the runtime refuses for a served path (its own 405 had
    -- the host's Date)
    res = c:call("TRACE", "/v3/certificates")
    sc.assert_err(res, 405, "METHOD_NOT_ALLOWED")
    wechat_now(date_of(res), before, os.time())
  end)

  it("leaves the control API's Date on the host's clock", function()
    local before = os.time()
    local res = assert(paygate.http.request{ url = base
      .. "/sim/public-key", timeout = 5 })
    assert.equal(200, res.status)
    local t = date_of(res)
    assert.is_true(t >= before - 1 and t <= os.time() + 1, tostring(t))
  end)
end)

describe("simulator: clock_offset moves every time WeChat judges or writes",
         function()
  -- an RFC 3339 time within a second or two of WeChat's clock
  local function on_wechat_clock(text, before, after, what)
    local t = civil.epoch(text)
    assert(t, what .. ": no RFC 3339 time: " .. tostring(text))
    assert.is_true(t >= before + OFFSET - 1 and t <= after + OFFSET + 1,
      ("%s %s is %d s off the host's clock, not %d"):format(what, text,
        t - after, OFFSET))
  end

  it("refuses a time_expire 60 s ahead of the host's clock: WeChat's is"
     .. " past it", function()
    local res = c:prepay("clk-exp-past-01",
                         { time_expire = rfc3339(os.time() + 60) })
    sc.assert_err(res, 400, "PARAM_ERROR", "/time_expire")
    assert.matches("晚于当前时间", res.json.message, 1, true)
    -- ahead of WeChat's clock: taken
    res = c:prepay("clk-exp-ahead-1",
                   { time_expire = rfc3339(os.time() + OFFSET + 60) })
    sc.assert_signed(res, keys)
  end)

  it("closes an order once its time_expire passes on WeChat's clock, not"
     .. " the host's", function()
    local no = "clk-exp-soon-01"
    -- 2 s ahead of WeChat's clock: the host's reaches it 90 s later
    local at = os.time() + OFFSET + 2
    sc.assert_signed(c:prepay(no, { time_expire = rfc3339(at) }), keys)
    local seen
    testing.wait_until(function()
      local res = c:query(no)
      seen = res.json and res.json.trade_state
      return seen == "CLOSED", res.body
    end, 10, "the order closed by its time_expire")
    -- a payment now finds it closed
    local res = c:pay(no)
    assert.equal(409, res.status, res.body)
    assert.equal("ORDER_CLOSED", res.json.code)
  end)

  it("writes success_time and the notification's create_time on WeChat's"
     .. " clock", function()
    local no = "clk-paid-00001"
    sc.assert_signed(c:prepay(no), keys)
    local before = os.time()
    local res = c:pay(no)
    local after = os.time()
    assert.equal(200, res.status, res.body)
    on_wechat_clock(res.json.success_time, before, after, "success_time")
    local q = c:query(no)
    sc.assert_signed(q, keys)
    assert.equal(res.json.success_time, q.json.success_time)
    local list = sc.control(base, "GET", "/sim/notifications?out_trade_no="
                            .. no).json
    assert.equal(1, #list)
    on_wechat_clock(list[1].create_time, before, after, "create_time")
    assert.equal(res.json.success_time, list[1].resource.success_time)
  end)

  it("writes a refund's create_time and success_time on WeChat's clock",
     function()
    local no = "clk-refunded-01"
    sc.assert_signed(c:prepay(no), keys)
    assert.equal(200, c:pay(no).status)
    local before = os.time()
    local res = c:refund({ out_trade_no = no, out_refund_no = "clk-rf-01",
      amount = { refund = 100, total = 100, currency = "CNY" } })
    sc.assert_signed(res, keys)
    on_wechat_clock(res.json.create_time, before, os.time(), "create_time")
    before = os.time()
    res = sc.control(base, "POST", "/sim/refunds/clk-rf-01/settle",
                     { status = "SUCCESS" })
    assert.equal(200, res.status, res.body)
    on_wechat_clock(res.json.success_time, before, os.time(),
                    "success_time")
  end)
end)

-- The expired_certificate fault's certificate is WeChat's: it expires
-- expires_in seconds after the fault on WeChat's clock, and WeChat lists
-- it while its own clock says it is valid. Before, it was dated and judged
-- on the host's clock: WeChat 90 s ahead signed its answers with a
-- certificate its own clock (the answer's Wechatpay-Timestamp) had seen
-- expire 60 s before, and /v3/certificates listed it all the same.
describe("simulator: clock_offset and the expired_certificate fault",
         function()
  after_each(function() sc.control(base, "DELETE", "/sim/faults") end)

  it("dates its certificate on WeChat's clock: the answers it signs are"
     .. " within its validity", function()
    local before = os.time()
    local f = sc.control(base, "POST", "/sim/faults", { endpoint =
      "certificates", kind = "expired_certificate", expires_in = 30,
      count = 1 })
    local after = os.time()
    assert.equal(200, f.status, f.body)
    f = f.json
    assert.is_true(f.not_after >= before + OFFSET + 30 - 1
                   and f.not_after <= after + OFFSET + 30 + 1,
      ("not_after %d is %d s off the host's clock, not %d"):format(
        f.not_after, f.not_after - after, OFFSET + 30))
    local res = c:call("GET", "/v3/certificates")
    assert.equal(200, res.status, res.body)
    assert.equal(f.serial, res.headers["wechatpay-serial"])
    local ts = tonumber(res.headers["wechatpay-timestamp"])
    assert.is_true(ts < f.not_after, ("signed at %d, past its notAfter %d")
                                     :format(ts, f.not_after))
    local listed
    for _, d in ipairs(res.json.data) do
      if d.serial_no == f.serial then listed = d end
    end
    assert.truthy(listed, "the fault's certificate is listed")
    assert.equal(f.not_after, civil.epoch(listed.expire_time))
    -- valid from the start on the host's clock too (a client behind
    -- WeChat's takes it)
    assert.is_true(civil.epoch(listed.effective_time) <= before)
  end)
end)

-- A WeChat a day ahead: its Beijing day is the host's tomorrow, the day
-- its payments are made on and its bills are of.
describe("simulator: clock_offset of a day", function()
  local DAY = 86400
  local dsrv, dbase, dc

  setup(function()
    dsrv, dbase = sc.start(1, "clock_offset = " .. DAY .. ",")
    -- the direct merchant: the first is a service provider, whose bill
    -- holds its sub-merchants' orders
    dc = sc.new{ base = dbase, mchid = sc.MCHID2, serial = sc.SERIAL2,
      key = assert(crypto.private_key(sc.read(sc.FIX
                                              .. "a1_merchant_key.pem"))) }
  end)
  teardown(function() if dsrv then dsrv:stop() end end)

  -- a request signed on WeChat's clock (the host's is a day off)
  local function call(method, target, body)
    return dc:call(method, target, body, { ts = tostring(os.time() + DAY) })
  end

  it("pays on WeChat's day and makes that day's bill", function()
    -- (made again, under a new number, when a midnight passed meanwhile)
    local date, no, paid = days.within(days.BEIJING + DAY, function()
      local n = "clk-day-" .. crypto.random_nonce(12)
      assert.equal(200, call("POST", "/v3/pay/transactions/jsapi",
                             sc.prepay_body(n, { mchid = sc.MCHID2 }))
                         .status)
      local res = dc:pay(n)
      assert.equal(200, res.status, res.body)
      return n, res.json
    end)
    -- the host's tomorrow, in Beijing
    assert.equal(date, paid.success_time:sub(1, 10))
    local res = sc.control(dbase, "POST", "/sim/bills/close",
                           { bill_date = date })
    assert.equal(200, res.status, res.body)
    res = call("GET", "/v3/bill/tradebill?bill_date=" .. date)
    assert.equal(200, res.status, res.body)
    local file = call("GET",
                      res.json.download_url:match("^https?://[^/]+(/.*)$"))
    assert.equal(200, file.status, file.body)
    assert.truthy(file.body:find(no, 1, true), file.body)
  end)
end)
