-- paygate.wechatpay.clock: this host's clock against WeChat Pay's, read
-- from every answer to our own calls that verified. Its Wechatpay-Timestamp
-- is WeChat's clock when it signed, and signed: the skew is known before
-- it reaches the 300 s window (verify.WINDOW) past which WeChat refuses
-- our requests (401 SIGN_ERROR) and we refuse its answers and
-- notifications (stale_timestamp).
--
-- Per client (one merchant): wx.clock_last (s, this host minus WeChat:
-- positive, this host ahead) and wx.clock_last_at (when, this host's
-- clock), the latest answer's; /metrics shows it as
-- paygate_wechatpay_clock_skew_seconds{mchid}, and from WARN seconds off a
-- warning is logged, once an hour per merchant (per instance with the
-- client's shared dict). Notifications are not read: their timestamp is
-- WeChat's send time, and a retry may carry an old one.
local verify = require "paygate.wechatpay.verify"
local config = require "paygate.wechatpay.config"

local type, pcall = type, pcall

local _M = {}

-- |skew| from which a warning is logged and paygate doctor warns: well
-- inside the 300 s window, early enough to fix NTP before it breaks
_M.WARN = 60
-- seconds between two warnings for one merchant
_M.WARN_EVERY = 3600

local gauge
local function the_gauge()
  if gauge == nil then
    local ok, metrics = pcall(require, "paygate.metrics")
    gauge = ok and type(metrics) == "table"
      and metrics.gauge("paygate_wechatpay_clock_skew_seconds",
        "This host's clock minus WeChat Pay's (positive: ahead), from the "
        .. "Wechatpay-Timestamp of the latest verified answer.")
      or false
  end
  return gauge or nil
end

local function warn(wx, skew, now)
  -- (once per instance an interval: config.once_an_interval)
  if not config.once_an_interval(wx, "warn", "clock_warned", _M.WARN_EVERY,
                                 now) then
    return
  end
  local c = wx.conf
  local s = math.floor((skew < 0 and -skew or skew) + 0.5)
  config.logger(c).warn(("wechatpay: this host's clock is %d s %s "
    .. "WeChat Pay's (the Wechatpay-Timestamp of its signed answers): sync "
    .. "it (NTP); at %d s off WeChat refuses every request (401 "
    .. "SIGN_ERROR) and this side refuses WeChat's answers and "
    .. "notifications as stale (stale_timestamp)"):format(s,
    skew > 0 and "ahead of" or "behind", verify.WINDOW),
    { mchid = c.mchid, clock_skew = math.floor(skew * 10 + 0.5) / 10,
      threshold = _M.WARN })
end

--- syntax: clock.observe(wx, ts, now, mono)
-- Records the skew of one verified answer: ts its Wechatpay-Timestamp
-- (whole seconds: WeChat's clock was within [ts, ts + 1) when it signed,
-- so the middle is taken), now this host's clock when it arrived, mono
-- core.mono() then. The answer's transit is in it (milliseconds,
-- usually). A reading older (by mono) than the one recorded is dropped:
-- an answer whose verification waited for a certificate download is
-- recorded after the download's own, newer, reading, and replaced it.
-- Never yields.
function _M.observe(wx, ts, now, mono)
  if wx.clock_last_mono and mono < wx.clock_last_mono then return end
  local skew = now - ts - 0.5
  wx.clock_last, wx.clock_last_at, wx.clock_last_mono = skew, now, mono
  local g = the_gauge()
  if g then
    local labels = wx.clock_labels
    if not labels then
      labels = { mchid = wx.conf.mchid }
      wx.clock_labels = labels
    end
    g:set(skew, labels)
  end
  if skew >= _M.WARN or -skew >= _M.WARN then warn(wx, skew, now) end
end

--- syntax: skew, at = clock.skew(wx) -- the latest, or nil (none yet)
function _M.skew(wx)
  if type(wx.clock_last) ~= "number" then return nil end
  return wx.clock_last, wx.clock_last_at
end

return _M
