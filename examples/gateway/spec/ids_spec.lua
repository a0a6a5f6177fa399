-- The gateway's payment and refund ids (gw.model): prefix, 9 symbols of
-- the millisecond they were made (base 36), 11 random letters and digits.
-- Ids made later sort after (byte-wise), so the indexes keyed by them grow
-- at their right edge; two made in one millisecond still differ.
package.path = "examples/gateway/?.lua;" .. package.path
local core = require "paygate.core"
local model = require "gw.model"

local B36 = "0123456789abcdefghijklmnopqrstuvwxyz"

-- the millisecond an id's time part says
local function ms_of(id)
  local n = 0
  for i = 5, 13 do
    n = n * 36 + (B36:find(id:sub(i, i), 1, true) - 1)
  end
  return n
end

describe("gateway ids", function()
  it("the time part sorts byte-wise as the number does, across carries",
     function()
    local cases = { 0, 1, 35, 36, 37, 1295, 1296, 36 ^ 8 - 1, 36 ^ 8,
                    1.8e12, 1.8e12 + 1, 36 ^ 9 - 1 }
    for i = 1, 2000 do cases[#cases + 1] = math.random(0, 2 ^ 46) end
    for _, a in ipairs(cases) do
      local ta = model._time_part(a)
      assert.equal(9, #ta)
      assert.equal(a, ms_of("pay_" .. ta))
      for _, b in ipairs({ a + 1, a + 36, a * 2 + 1 }) do
        if b < 36 ^ 9 then
          assert.is_true(ta < model._time_part(b), a .. " < " .. b)
        end
      end
    end
  end)

  it("a payment id: pay_, the millisecond it was made, 11 random symbols",
     function()
    local before = math.floor(core.time() * 1000)
    local id = model.new_payment_id()
    local after = math.floor(core.time() * 1000)
    assert.equal(24, #id)
    -- 9 of the time (base 36, lower case), then 11 random
    assert.matches("^pay_" .. ("[0-9a-z]"):rep(9) .. ("[0-9A-Za-z]"):rep(11)
                   .. "$", id)
    local ms = ms_of(id)
    assert.is_true(ms >= before and ms <= after, id)
    local r = model.new_refund_id()
    assert.matches("^ref_", r)
    assert.equal(24, #r)
    -- an attempt's out_trade_no stays within WeChat's 32 characters
    assert.is_true(#model.out_trade_no(id, 999) <= 32)
  end)

  it("ids made later sort after; many in one millisecond all differ",
     function()
    local seen, n = {}, 0
    local first = model.new_payment_id()
    -- until the clock has moved on by a millisecond (a deadline, not a
    -- sleep): everything made in between is unique
    local deadline = core.time() + 5
    repeat
      local id = model.new_payment_id()
      assert.is_nil(seen[id], "a repeated id " .. id)
      seen[id] = true
      n = n + 1
    until (ms_of(id) > ms_of(first) and n >= 10000) or core.time() > deadline
    local later = model.new_payment_id()
    assert.is_true(ms_of(later) > ms_of(first))
    assert.is_true(first < later, first .. " < " .. later)
  end)
end)
