-- The simulator's clock_offset (a WeChat whose clock is off from ours):
-- every /v3 answer's Date header reads WeChat's clock, as its
-- Wechatpay-Timestamp does. Before, the Date was the runtime's (the
-- host's clock) while the timestamp was shifted: real WeChat's two come
-- from one clock, and a client or paygate doctor reading the Date saw a
-- WeChat in step that its signed timestamp put 90 s ahead. The control
-- API under /sim/ is no WeChat answer: its Date stays the host's.
local sc = require "support.simclient"
local civil = require "paygate.civil"
local paygate = require "paygate"

local OFFSET = 90

local srv, c, keys, base

setup(function()
  srv, base, c = sc.start(1, "clock_offset = " .. OFFSET .. ",")
  keys = c:platform_keys()
end)

teardown(function() if srv then srv:stop() end end)

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
