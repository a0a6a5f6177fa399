-- spec/support/days.lua: calendar days for specs that may run across a
-- midnight. A spec that takes "today" once and compares it with a date
-- the product took at another moment fails when a day ends in between:
-- Beijing's at 16:00 UTC (the bills, reconcile:<date>), UTC's at 00:00
-- (the console's and admin levers' audit subjects, console:<date>).
-- These take the day from what the product recorded, or every day a
-- stretch of the run touched.
local floor = math.floor

local _M = {}

_M.UTC, _M.BEIJING = 0, 8 * 3600

--- syntax: d = days.date(t[, offset])
-- "YYYY-MM-DD" of epoch second t at offset seconds east of UTC (default
-- 0: UTC's day; days.BEIJING: Beijing's).
function _M.date(t, offset)
  return os.date("!%Y-%m-%d", floor(t) + (offset or 0))
end

--- syntax: list = days.since(t0[, offset])
-- The dates from the day of t0 (epoch s, taken before the stretch of the
-- run in question) to today, at offset: one date, or two when a midnight
-- passed since t0 (more for a run of days).
function _M.since(t0, offset)
  local out, t, now = {}, floor(t0), os.time()
  local last = _M.date(now, offset)
  repeat
    out[#out + 1] = _M.date(t, offset)
    t = t + 86400
  until out[#out] == last or t > now + 86400
  return out
end

--- syntax: d, ... = days.within(offset, fn, ...)
-- Runs fn(...) and returns the day (at offset) it ran within and fn's
-- results: records fn made (payments, refunds) are all that day's. When a
-- midnight passed while it ran, fn runs once more, all in the new day (a
-- day is longer than any spec's stretch) -- also when fn raised then: a
-- failure the midnight may have caused (a day left without the records,
-- a job's window moved on) is not the spec's verdict. fn raising within
-- one day, or in the new one, raises that error.
function _M.within(offset, fn, ...)
  for _ = 1, 2 do
    local d = _M.date(os.time(), offset)
    local r = { n = 0 }
    local function keep(ok, ...)
      r.ok, r.n = ok, select("#", ...)
      for i = 1, r.n do r[i] = select(i, ...) end
    end
    keep(pcall(fn, ...))
    if _M.date(os.time(), offset) == d then
      if not r.ok then error(r[1], 0) end
      return d, unpack(r, 1, r.n)
    end
  end
  error("days.within: two midnights passed while fn ran twice", 2)
end

--- syntax: list = days.audit(q, prefix, t0)
-- The audit entries of the daily subjects prefix .. ":" .. date (e.g.
-- "console", "admin": UTC days, as the gateway names them) of every UTC
-- day since t0, oldest first: what was appended since t0 is in it
-- whichever side of a midnight it landed on.
function _M.audit(q, prefix, t0)
  local audit = require "paygate.audit"
  local out = {}
  for _, d in ipairs(_M.since(t0, _M.UTC)) do
    local e = assert(audit.entries(q, prefix .. ":" .. d))
    for _, x in ipairs(e) do out[#out + 1] = x end
  end
  return out
end

return _M
