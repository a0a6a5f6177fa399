-- The simulator's bill making (examples/simulator/sim/bills.lua) as pure
-- functions: Beijing days, amounts in yuan, fees, the CSV lines.
package.path = "examples/simulator/?.lua;" .. package.path
local bills = require "sim.bills"
local billcsv = require "paygate.wechatpay.bill"

local function order(t, total, no, extra)
  local o = { success_at = t, total = total, out_trade_no = no,
              owner = "1900007291", appid = "wxd678efh567hg6787",
              transaction_id = "42" .. no, trade_type = "NATIVE",
              description = "a, b", openid = "oX", currency = "CNY" }
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

describe("bills.day_start", function()
  it("refuses what is not a calendar date", function()
    for _, d in ipairs({ "2026-02-29", "2026-13-01", "2026-00-10",
                         "2026-04-31", "2026-4-01", "20260401", "",
                         "2026-04-01x" }) do
      assert.is_nil((bills.day_start(d)), d)
    end
    assert.is_nil((bills.day_start(nil)))
  end)
  it("is midnight in Beijing (16:00 UTC the day before)", function()
    assert.equal(os.time({ year = 2026, month = 11, day = 29, hour = 16,
                           min = 0, sec = 0, isdst = false })
                 - (os.time({ year = 1970, month = 1, day = 1, hour = 0 })),
                 bills.day_start("2026-11-30"))
    assert.equal(bills.day_start("2024-03-01") - 86400,
                 bills.day_start("2024-02-29"))
    assert.equal("2026-11-30", bills.today(bills.day_start("2026-11-30")))
    assert.equal("2026-11-30", bills.today(bills.day_start("2026-12-01")
                                           - 1))
  end)
end)

describe("amounts", function()
  it("are yuan with two decimals; the fee is 0.60 % rounded", function()
    assert.equal("0.01", bills.yuan(1))
    assert.equal("123.45", bills.yuan(12345))
    assert.equal("-0.05", bills.yuan(-5))
    assert.equal("0.00", bills.yuan(0))
    assert.equal(0, bills.fee_of(1))
    assert.equal(0, bills.fee_of(83))     -- 0.498 fen
    assert.equal(1, bills.fee_of(84))     -- 0.504 fen
    assert.equal(74, bills.fee_of(12345))
  end)
end)

describe("bills.trade_csv", function()
  it("has no bill without records", function()
    assert.is_nil(bills.trade_csv({}, {}, { p = true, r = true }))
    assert.is_nil(bills.trade_csv({ order(1e9, 1, "A1") }, {},
                                  { r = true }))
  end)
  it("writes WeChat's layout, readable by paygate.wechatpay.bill",
     function()
    local t = bills.day_start("2026-11-30") + 3600
    local csv = bills.trade_csv({ order(t, 250, "A1"),
                                  order(t + 5, 12345, "A2") },
      { order(t + 9, 12345, "A2", { refund = 100, refund_id = "503",
                                    out_refund_no = "R1" }) },
      { p = true, r = true })
    local path = os.tmpname()
    local f = assert(io.open(path, "wb"))
    f:write(csv)
    f:close()
    local recs, sum = {}, nil
    for kind, row in billcsv.rows(path) do
      if kind == "record" then recs[#recs + 1] = row else sum = row end
    end
    os.remove(path)
    assert.equal(3, #recs)
    assert.equal("2026-11-30 01:00:00", recs[1]["交易时间"])
    assert.equal("a, b", recs[1]["商品名称"])     -- a comma stays inside
    assert.equal("2.50", recs[1]["应结订单金额"])
    assert.equal("0.02000", recs[1]["手续费"])
    assert.equal("REFUND", recs[3]["交易状态"])
    assert.equal("1.00", recs[3]["退款金额"])
    assert.equal("R1", recs[3]["商户退款单号"])
    assert.equal("3", sum["总交易单数"])
    assert.equal("125.95", sum["应结订单总金额"])
    assert.equal("0.76", sum["手续费总金额"])
    assert.is_nil(csv:gsub("\r\n", ""):find("[\r\n]"))
  end)
  it("shows an order's recharge coupon: 代金券金额, 充值券退款金额 and its "
     .. "total, 应结 amounts unchanged", function()
    local t = bills.day_start("2026-11-30") + 3600
    local paid = { payer_total = 800 }                 -- 10.00 paid 8.00
    local function refund(at, amount, rno, payer)
      return order(at, 1000, "D1", { payer_total = 800, refund = amount,
        refund_id = "50" .. rno, out_refund_no = rno, payer_refund = payer })
    end
    local csv = bills.trade_csv({ order(t, 1000, "D1", paid) },
      { refund(t + 1, 333, "R1", 266),
        -- a row made before payer_refund was kept: its own share,
        -- ⌊100 × 0.8⌋ = 80
        refund(t + 2, 100, "R2", nil) }, { p = true, r = true })
    local l = {}
    for line in csv:gmatch("(.-)\r\n") do l[#l + 1] = billcsv.split(line) end
    assert.equal(6, #l)
    assert.same({ "10.00", "2.00" }, { l[2][13], l[2][14] })  -- 应结, 代金券
    assert.equal("10.00", l[2][25])
    assert.same({ "0.00", "3.33", "0.67", "3.33" },
                { l[3][14], l[3][17], l[3][18], l[3][26] })
    assert.same({ "1.00", "0.20" }, { l[4][17], l[4][18] })
    assert.same({ "3", "10.00", "4.33", "0.87", "0.06", "10.00", "4.33" },
                l[6])
  end)
end)

describe("bills.fund_csv", function()
  it("carries the balance from before the day", function()
    local t = bills.day_start("2026-11-30")
    local csv = bills.fund_csv(1000, { order(t, 250, "A1") },
      { order(t, 250, "A1", { refund = 50, refund_id = "503",
                              out_refund_no = "R1" }) })
    local lines = {}
    for l in csv:gmatch("(.-)\r\n") do lines[#lines + 1] = l end
    -- header, payment, fee, refund (this order at the same second), summary
    assert.equal(6, #lines)
    assert.equal("交易", billcsv.split(lines[2])[5])
    assert.equal("12.50", billcsv.split(lines[2])[8])
    assert.equal("扣除交易手续费", billcsv.split(lines[3])[5])
    assert.equal("12.48", billcsv.split(lines[3])[8])
    assert.equal("退款", billcsv.split(lines[4])[5])
    assert.equal("11.98", billcsv.split(lines[4])[8])
    assert.same({ "3", "1", "2.50", "2", "0.52" }, billcsv.split(lines[6]))
    assert.is_nil(bills.fund_csv(0, {}, {}))
  end)
end)
