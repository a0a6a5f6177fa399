local civil = require "paygate.civil"

describe("paygate.civil.days", function()
  it("counts days from 1970-01-01 in UTC, across leap days and eras",
     function()
    -- reference values from an independent calendar library
    local cases = {
      { 1970, 1, 1, 0 }, { 1969, 12, 31, -1 }, { 2000, 2, 29, 11016 },
      { 2000, 3, 1, 11017 }, { 1900, 3, 1, -25508 },
      { 2024, 2, 29, 19782 }, { 2026, 11, 30, 20787 },
      { 9999, 12, 31, 2932896 },
    }
    for _, c in ipairs(cases) do
      assert.equal(c[4], civil.days(c[1], c[2], c[3]),
                   table.concat(c, "-", 1, 3))
    end
  end)

  it("takes the first of the month when the day is left out", function()
    assert.equal(civil.days(2026, 12, 1), civil.days(2026, 12))
    assert.equal(os.time({ year = 2026, month = 12, day = 1, hour = 0 })
                 - os.time({ year = 1970, month = 1, day = 1, hour = 0 }),
                 civil.days(2026, 12) * 86400)
  end)
end)
