-- sim.clock: WeChat's clock, the one clock the simulator judges and writes
-- by as WeChat: the host's plus config.clock_offset (a test aid, 0 by
-- default: a WeChat whose clock is off from this host's). It dates the
-- Wechatpay-Timestamp and the Date of /v3 answers, judges a request's
-- timestamp, a merchant certificate's expiry, an order's time_expire,
-- what a prepay handed out (prepay_ttl) and a refund's year, writes
-- success_time, create_time, close and refund times and a notification's
-- create_time, names the bills' Beijing day, judges whether a platform
-- certificate has expired and dates the expired_certificate fault's. The
-- host's own time (core.time()) stays for what is the simulator's and not
-- WeChat's: the notification schedule, the request log, the dates of the
-- platform certificates it makes (openssl starts them on the host's
-- clock) and which one signs.
local core = require "paygate.core"

local _M = {}

-- seconds WeChat's clock runs ahead of the host's (config.clock_offset;
-- set once at the start, before any request)
_M.offset = 0

--- syntax: clock.init(cfg) -- takes cfg.clock_offset (the checked config)
function _M.init(cfg)
  _M.offset = cfg.clock_offset or 0
end

--- syntax: t = clock.now([host_t])
-- returns: WeChat's time (epoch seconds, with the fraction) at the host's
-- time host_t (default: now).
function _M.now(host_t)
  return (host_t or core.time()) + _M.offset
end

return _M
