-- The simulator's trade bills for an order paid with a discount (the
-- control API's payer_total below the total: one recharge coupon, type
-- CASH, of the difference) and a partial refund of it: 代金券金额 on the
-- payment row, 充值券退款金额 on the refund row (the refund's
-- discount_refund), the summary's 充值券退款总金额, in the ALL, SUCCESS and
-- REFUND bills; and the file read back through paygate.wechatpay's
-- download_bill and bill.rows. A day of its own (a simulator of its own),
-- so the plain bills of simulator_bills_spec keep their totals.
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local wechatpay = require "paygate.wechatpay"
local bill = require "paygate.wechatpay.bill"
local server = require "support.server"
local sn = require "support.simnotify"
local days = require "support.days"

-- the columns of a trade bill record (1-based)
local C = { state = 10, settle = 13, coupon = 14, refund_no = 16,
            refund = 17, recharge_refund = 18, fee = 23, total = 25,
            applied = 26 }

local sim, recv, tmp, today
local disc, full, r_disc, r_full, r_open     -- out_trade_no, out_refund_no
local refund_answer                          -- the discounted refund's


local function get(target)
  local res = sn.signed(sim, "GET", target)
  return res.status, json.decode(res.body), res
end

-- the bill of that type, as lines of fields (header lines included)
local function trade_bill(bill_type)
  local st, doc, res = get("/v3/bill/tradebill?bill_date=" .. today
                           .. "&bill_type=" .. bill_type)
  assert.equal(200, st, res.body)
  local target = doc.download_url:match("^https?://[^/]+(/.*)$")
  local file = sn.signed(sim, "GET", target)
  assert.equal(200, file.status, file.body)
  assert.equal(doc.hash_value, crypto.hex(crypto.digest("sha1", file.body)))
  local out = {}
  for l in file.body:gmatch("(.-)\r\n") do out[#out + 1] = (bill.split(l)) end
  return out
end

-- the records of a bill by key: out_trade_no for a payment,
-- out_refund_no for a refund; and its summary row
local function records(l)
  local by = {}
  for i = 2, #l - 2 do
    local f = l[i]
    by[f[C.state] == "REFUND" and f[C.refund_no] or f[7]] = f
  end
  return by, l[#l]
end

setup(function()
  tmp = server.tmpdir()
  recv = sn.receiver()
  sim = sn.start{}
  -- the records within one Beijing day, the bill's (made again in the
  -- new day when a midnight passed meanwhile)
  today = days.within(days.BEIJING, function()
    local url = sn.notify_url(recv, "discount")
    local id = crypto.random_nonce(10)
    disc, full = "DISC" .. id, "FULL" .. id
    r_disc, r_full, r_open = "RDISC" .. id, "RFULL" .. id, "ROPEN" .. id
    -- 100.00 paid 80.00: a 20.00 recharge coupon
    sn.prepay(sim, disc, url, 10000)
    local st, doc = sn.ctl(sim, "POST", "/sim/transactions/" .. disc
                           .. "/pay", { payer_total = 8000 })
    assert.equal(200, st, json.encode(doc))
    sn.prepay(sim, full, url, 500)
    sn.pay(sim, full)
    -- 33.33 of the discounted order back: the payer 26.66 (⌊3333 × 0.8⌋),
    -- the coupon 6.67
    sn.refund(sim, disc, r_disc, 3333, 10000, url)
    refund_answer = sn.settle(sim, r_disc, "SUCCESS")
    sn.refund(sim, full, r_full, 100, 500, url)
    sn.settle(sim, r_full, "SUCCESS")
    -- still PROCESSING when the day is closed: in no bill
    sn.refund(sim, disc, r_open, 1000, 10000, url)
  end)
  local st, doc = sn.ctl(sim, "POST", "/sim/bills/close",
                         { bill_date = today })
  assert.equal(200, st, json.encode(doc))
end)

teardown(function()
  if sim then sim:stop() end
  if recv then recv:stop() end
  if tmp then os.execute("rm -rf " .. tmp) end
end)

describe("simulator trade bill of a discounted order", function()
  it("the refund answer's split is what the bill should show", function()
    local a = refund_answer.amount
    assert.equal(2666, a.payer_refund)
    assert.equal(667, a.discount_refund)
    assert.equal(3333, a.settlement_refund)
    assert.equal(667, refund_answer.promotion_detail[1].refund_amount)
    assert.equal("CASH", refund_answer.promotion_detail[1].type)
  end)

  it("ALL: 代金券金额 on the payment, 充值券退款金额 on the refund, and "
     .. "the summary's 充值券退款总金额", function()
    local l = trade_bill("ALL")
    assert.equal(7, #l)      -- header, 2 payments, 2 refunds, summary (2)
    local by, summary = records(l)
    local p = assert(by[disc], "the discounted payment's row")
    assert.equal("SUCCESS", p[C.state])
    assert.equal("100.00", p[C.total])
    -- a recharge coupon is settled as cash: 应结订单金额 stays the total
    assert.equal("100.00", p[C.settle])
    assert.equal("20.00", p[C.coupon])
    assert.equal("0.00", p[C.recharge_refund])
    assert.equal("0.60000", p[C.fee])
    local f = assert(by[full], "the full payment's row")
    assert.equal("5.00", f[C.settle])
    assert.equal("0.00", f[C.coupon])
    local r = assert(by[r_disc], "the discounted refund's row")
    assert.equal(disc, r[7])
    assert.equal("33.33", r[C.applied])
    assert.equal("33.33", r[C.refund])
    assert.equal("6.67", r[C.recharge_refund])
    assert.equal("0.00", r[C.coupon])
    local rf = assert(by[r_full], "the full order's refund row")
    assert.equal("1.00", rf[C.refund])
    assert.equal("0.00", rf[C.recharge_refund])
    assert.is_nil(by[r_open], "a refund still PROCESSING")
    -- 总交易单数, 应结订单总金额, 退款总金额, 充值券退款总金额, 手续费总金额,
    -- 订单总金额, 申请退款总金额
    assert.same({ "4", "105.00", "34.33", "6.67", "0.63", "105.00",
                  "34.33" }, summary)
  end)

  it("SUCCESS and REFUND carry the same amounts in their rows and "
     .. "summaries", function()
    local by, summary = records(trade_bill("SUCCESS"))
    assert.equal("20.00", by[disc][C.coupon])
    assert.is_nil(by[r_disc])
    assert.same({ "2", "105.00", "0.00", "0.00", "0.63", "105.00", "0.00" },
                summary)
    by, summary = records(trade_bill("REFUND"))
    assert.is_nil(by[disc])
    assert.equal("6.67", by[r_disc][C.recharge_refund])
    assert.equal("0.00", by[r_full][C.recharge_refund])
    assert.same({ "2", "0.00", "34.33", "6.67", "0.00", "0.00", "34.33" },
                summary)
  end)

  it("paygate.wechatpay reads the amounts back (download_bill, "
     .. "bill.rows)", function()
    local wx = assert(wechatpay.client({ mchid = sn.MCHID,
      merchant_private_key = sn.KEY_PATH, merchant_serial = sn.SERIAL,
      apiv3_key = sn.APIV3, base_url = sim.base, timeout = 5,
      deadline = 10 }))
    local b, err = wx:trade_bill({ bill_date = today, bill_type = "ALL",
                                   tar_type = "GZIP" })
    assert.truthy(b, tostring(err))
    local info, derr = wx:download_bill(b, tmp .. "/trade.csv")
    assert.truthy(info, tostring(derr))
    assert.is_true(info.gzip)
    wx:stop()
    local rows, summary = {}, nil
    for kind, row in bill.rows(info.path) do
      assert.not_equal("malformed", kind, row.message)
      if kind == "record" then
        rows[row["交易状态"] == "REFUND" and row["商户退款单号"]
             or row["商户订单号"]] = row
      else
        summary = row
      end
    end
    assert.equal("20.00", rows[disc]["代金券金额"])
    assert.equal("100.00", rows[disc]["应结订单金额"])
    assert.equal("100.00", rows[disc]["订单金额"])
    assert.equal("0.00", rows[full]["代金券金额"])
    assert.equal("6.67", rows[r_disc]["充值券退款金额"])
    assert.equal("33.33", rows[r_disc]["申请退款金额"])
    assert.equal("33.33", rows[r_disc]["退款金额"])
    assert.equal("0.00", rows[r_full]["充值券退款金额"])
    assert.equal("6.67", summary["充值券退款总金额"])
    assert.equal("34.33", summary["退款总金额"])
    assert.equal("105.00", summary["应结订单总金额"])
  end)
end)
