-- paygate.civil: calendar arithmetic in UTC, without the local time zone
-- (os.time reads a date as local time).
--
--   civil.days(2026, 11, 30)   -- days from 1970-01-01 (may be < 0)
--   civil.date("2026-11-30")   -- the same, or nil for no such date
--   civil.epoch("2026-06-08T10:34:56+08:00")   -- its epoch seconds
--   civil.http_date("Mon, 07 Dec 2026 06:38:48 GMT")   -- the same for
--                                 -- an HTTP Date header (IMF-fixdate)
--   civil.http_date_text(1796625528)   -- and back: "Mon, 07 Dec 2026 ..."

local floor = math.floor

local _M = {}

--- syntax: n = civil.days(y, m[, d])
-- returns: the days from 1970-01-01 to y-m-d (d default 1) in the
-- proleptic Gregorian calendar; times 86400 it is that midnight's epoch
-- seconds in UTC.
function _M.days(y, m, d)
  if m <= 2 then
    y = y - 1
  end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = floor((153 * mp + 2) / 5) + (d or 1) - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- 1 when y-mo-d is a day of the calendar (month 1-12, day within it)
local function valid(y, mo, d)
  return mo >= 1 and mo <= 12 and d >= 1
         and d <= _M.days(mo == 12 and y + 1 or y, mo % 12 + 1) - _M.days(y, mo)
end

--- syntax: n = civil.date(s)
-- s: a calendar date "YYYY-MM-DD". returns: its days from 1970-01-01, or
-- nil when s is not one (month 13, the 30th of February...).
function _M.date(s)
  if type(s) ~= "string" then
    return nil
  end
  local y, mo, d = s:match("^(%d%d%d%d)%-(%d%d)%-(%d%d)$")
  if not y then
    return nil
  end
  y, mo, d = tonumber(y), tonumber(mo), tonumber(d)
  if not valid(y, mo, d) then
    return nil
  end
  return _M.days(y, mo, d)
end

--- syntax: t = civil.epoch(s)
-- s: an RFC 3339 time ("2026-06-08T10:34:56+08:00", "...Z", a fraction
-- allowed and dropped). returns: its epoch seconds (UTC), or nil when s
-- is not such a time.
function _M.epoch(s)
  if type(s) ~= "string" or #s > 40 then
    return nil
  end
  local y, mo, d, h, mi, sec, rest = s:match(
    "^(%d%d%d%d)%-(%d%d)%-(%d%d)[Tt](%d%d):(%d%d):(%d%d)(.*)$")
  if not y then
    return nil
  end
  y, mo, d = tonumber(y), tonumber(mo), tonumber(d)
  h, mi, sec = tonumber(h), tonumber(mi), tonumber(sec)
  if not valid(y, mo, d) or h > 23 or mi > 59 or sec > 60 then
    return nil                      -- (the 31st of a 30-day month too)
  end
  rest = rest:gsub("^%.%d+", "")
  local off = 0
  if rest ~= "Z" and rest ~= "z" then
    local sign, oh, om = rest:match("^([%+%-])(%d%d):(%d%d)$")
    if not sign then
      return nil
    end
    if tonumber(oh) > 23 or tonumber(om) > 59 then
      return nil
    end
    off = (tonumber(oh) * 60 + tonumber(om)) * 60
    if sign == "-" then
      off = -off
    end
  end
  return _M.days(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec - off
end

local MONTHS = { Jan = 1, Feb = 2, Mar = 3, Apr = 4, May = 5, Jun = 6,
                 Jul = 7, Aug = 8, Sep = 9, Oct = 10, Nov = 11, Dec = 12 }

--- syntax: t = civil.http_date(s)
-- s: an HTTP date in the form servers send (RFC 9110's IMF-fixdate, "Mon,
-- 07 Dec 2026 06:38:48 GMT"; the weekday is not checked). returns: its
-- epoch seconds, or nil when s is not one. A server's Date header gives
-- its clock to the second (paygate doctor's clock check, the WeChat Pay
-- client's errors that blame the clock).
function _M.http_date(s)
  if type(s) ~= "string" or #s > 40 then
    return nil
  end
  local d, mon, y, h, mi, sec = s:match(
    "^%a%a%a, (%d%d?) (%a%a%a) (%d%d%d%d) (%d%d):(%d%d):(%d%d) GMT$")
  local mo = mon and MONTHS[mon]
  if not mo then
    return nil
  end
  y, d = tonumber(y), tonumber(d)
  h, mi, sec = tonumber(h), tonumber(mi), tonumber(sec)
  if not valid(y, mo, d) or h > 23 or mi > 59 or sec > 60 then
    return nil
  end
  return _M.days(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec
end

local MONTH_NAMES = { "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug",
                      "Sep", "Oct", "Nov", "Dec" }
local WEEKDAYS = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat" }

--- syntax: s = civil.http_date_text(t)
-- t: epoch seconds (a fraction is dropped). returns: t as an HTTP Date
-- header writes it (IMF-fixdate, "Mon, 07 Dec 2026 06:38:48 GMT"), in
-- English whatever the locale (os.date's "!*t" fields are numbers): what
-- civil.http_date reads back.
function _M.http_date_text(t)
  local c = os.date("!*t", floor(t))
  return ("%s, %02d %s %04d %02d:%02d:%02d GMT"):format(WEEKDAYS[c.wday],
    c.day, MONTH_NAMES[c.month], c.year, c.hour, c.min, c.sec)
end

return _M
