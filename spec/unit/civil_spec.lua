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

describe("paygate.civil.epoch", function()
  it("reads RFC 3339 times with an offset, Z, or a fraction", function()
    assert.equal(0, civil.epoch("1970-01-01T08:00:00+08:00"))
    assert.equal(0, civil.epoch("1970-01-01T00:00:00Z"))
    assert.equal(0, civil.epoch("1969-12-31T19:00:00-05:00"))
    assert.equal(1780886096, civil.epoch("2026-06-08T10:34:56+08:00"))
    assert.equal(1780886096, civil.epoch("2026-06-08T02:34:56.123Z"))
    -- the last second of a Beijing day and the first of the next
    assert.equal(civil.days(2026, 3, 1) * 86400 + 16 * 3600 - 1,
                 civil.epoch("2026-03-01T23:59:59+08:00"))
    assert.equal(civil.days(2026, 3, 1) * 86400 + 16 * 3600,
                 civil.epoch("2026-03-02T00:00:00+08:00"))
    -- month lengths: the last day of each is accepted
    assert.equal(civil.days(2028, 2, 29) * 86400,
                 civil.epoch("2028-02-29T00:00:00Z"))
    assert.equal(civil.days(2026, 12, 31) * 86400,
                 civil.epoch("2026-12-31T00:00:00Z"))
  end)

  it("is nil for anything else", function()
    for _, s in ipairs{ "", "2026-06-08", "2026-06-08 10:34:56+08:00",
                        "2026-13-08T10:34:56Z", "2026-06-08T24:00:00Z",
                        "2026-06-08T10:34:56", "2026-06-08T10:34:56+0800",
                        "2026-02-29T00:00:00Z", "2026-04-31T00:00:00Z",
                        "2026-06-08T10:34:56+24:00",
                        "2026-06-08T10:34:56+08:60",
                        ("9"):rep(50), 12, false } do
      assert.is_nil(civil.epoch(s), tostring(s))
    end
  end)
end)

describe("paygate.civil.date", function()
  it("gives a date's days, and nil for what is not a date", function()
    assert.equal(0, civil.date("1970-01-01"))
    assert.equal(civil.days(2026, 11, 30), civil.date("2026-11-30"))
    assert.equal(civil.days(2024, 2, 29), civil.date("2024-02-29"))
    for _, bad in ipairs({ "2026-02-29", "2026-02-30", "2026-04-31",
                           "2026-13-01", "2026-00-10", "2026-01-00",
                           "2026-1-01", "2026-01-01 ", "20260101", "",
                           "2026-01-01T00:00:00Z" }) do
      assert.is_nil(civil.date(bad), bad)
    end
    assert.is_nil(civil.date(nil))
    assert.is_nil(civil.date(20260101))
  end)
end)

describe("paygate.civil.http_date", function()
  it("reads an HTTP Date header (IMF-fixdate) as epoch seconds", function()
    assert.equal(0, civil.http_date("Thu, 01 Jan 1970 00:00:00 GMT"))
    assert.equal(civil.epoch("2026-12-07T06:38:48Z"),
                 civil.http_date("Mon, 07 Dec 2026 06:38:48 GMT"))
    assert.equal(civil.epoch("2028-02-29T23:59:59Z"),
                 civil.http_date("Tue, 29 Feb 2028 23:59:59 GMT"))
  end)

  it("is nil for what is no such date", function()
    for _, s in ipairs({ "Mon, 07 Dec 2026 06:38:48 UTC",
                         "Mon, 07 Foo 2026 06:38:48 GMT",
                         "Mon, 31 Nov 2026 06:38:48 GMT",
                         "Mon, 07 Dec 2026 24:00:00 GMT",
                         "Monday, 07-Dec-26 06:38:48 GMT",
                         "2026-12-07T06:38:48Z", "" }) do
      assert.is_nil(civil.http_date(s), s)
    end
    assert.is_nil(civil.http_date(nil))
    assert.is_nil(civil.http_date(1796625528))
  end)
end)

describe("paygate.civil.http_date_text", function()
  it("writes epoch seconds as an HTTP Date header does, in English",
     function()
    assert.equal("Thu, 01 Jan 1970 00:00:00 GMT", civil.http_date_text(0))
    assert.equal("Mon, 07 Dec 2026 06:38:48 GMT",
                 civil.http_date_text(civil.epoch("2026-12-07T06:38:48Z")))
    assert.equal("Tue, 29 Feb 2028 23:59:59 GMT",
                 civil.http_date_text(civil.epoch("2028-02-29T23:59:59Z")
                                      + 0.75))
    assert.equal("Wed, 31 Dec 1969 23:59:59 GMT", civil.http_date_text(-1))
  end)

  it("is read back by civil.http_date, and agrees with os.date", function()
    for t = -86400 * 800, 86400 * 365 * 80, 86400 * 97 + 3671 do
      local s = civil.http_date_text(t)
      assert.equal(t, civil.http_date(s), s)
      if t >= 0 then
        assert.equal(os.date("!%a, %d %b %Y %H:%M:%S GMT", t), s)
      end
    end
  end)
end)
