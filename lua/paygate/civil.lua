-- paygate.civil: calendar arithmetic in UTC, without the local time zone
-- (os.time reads a date as local time).
--
--   civil.days(2026, 11, 30)   -- days from 1970-01-01 (may be < 0)

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

return _M
