-- paygate.wechatpay.rotation: an APIv3 key rotation half done, seen at
-- run time. A client given previous_apiv3_keys decrypts what WeChat sends
-- with the current key, then each previous one (resource.lua): everything
-- works while WeChat still encrypts with the old key, until the operator
-- takes the previous key out and every notification and certificate
-- download fails (decrypt_failed). So a resource that decrypted only with a
-- previous key, once its message verified (WeChat sent it), is
--   counted: paygate_wechatpay_previous_apiv3_key_used_total{mchid,source}
--   (source "notification": one per notification; "certificates": one per
--   /v3/certificates download), and
--   said: one warning per merchant an hour (per instance with the client's
--   shared dict), naming the key by the owner's name for it and its
--   position (key_names), never its bytes.
-- Nothing is done when the current key decrypts (the common path: the
-- caller compares an index).
local config = require "paygate.wechatpay.config"

local type, pcall, tostring, ipairs = type, pcall, tostring, ipairs

local _M = {}

-- seconds between two warnings for one merchant
_M.WARN_EVERY = 3600
-- the sources counted
_M.SOURCES = { "notification", "certificates" }

local counter
local function the_counter()
  if counter == nil then
    local ok, metrics = pcall(require, "paygate.metrics")
    counter = ok and type(metrics) == "table"
      and metrics.counter("paygate_wechatpay_previous_apiv3_key_used_total",
        "Notifications and certificate downloads decrypted only with a "
        .. "previous APIv3 key (WeChat still on the old key).",
        { "mchid", "source" }, { max_series = 256 })
      or false
  end
  return counter or nil
end

--- syntax: rotation.preset(mchid)
-- The merchant's series at 0 (each source), for an owner that has its
-- counters alerted on from the start (increase() sees no first count).
function _M.preset(mchid)
  local c = the_counter()
  if not c then return end
  for _, source in ipairs(_M.SOURCES) do
    c:inc({ mchid = tostring(mchid), source = source }, 0)
  end
end

-- The previous key at position i of the client's apiv3_keys (2: the first
-- previous one) as its owner names it: NAME[j], or "previous APIv3 key j"
-- for an owner that names none.
local function key_name(c, i)
  local names = c.key_names or {}
  local prev = names.previous_apiv3_keys
  if type(prev) == "string" then
    return prev .. "[" .. (i - 1) .. "]"
  end
  return "previous APIv3 key " .. (i - 1)
end
_M.key_name = key_name

local function warn(wx, source, i, now)
  -- (once per instance an interval: config.once_an_interval)
  if not config.once_an_interval(wx, "warn",
                                 "prev_apiv3_key_warned", _M.WARN_EVERY,
                                 now) then
    return
  end
  local c = wx.conf
  local names = c.key_names or {}
  local name = key_name(c, i)
  config.logger(c).warn("wechatpay: "
    .. (source == "certificates" and "the platform certificates WeChat "
        .. "sent" or "a notification") .. " decrypted only with a previous "
    .. "APIv3 key (" .. name .. "), not with the current one ("
    .. tostring(names.apiv3_key or "apiv3_key") .. "): WeChat still "
    .. "encrypts with the old key; set the new one in the merchant platform"
    .. " (API security) before removing the previous one (removed now, "
    .. "every notification and certificate download fails: decrypt_failed)",
    { mchid = c.mchid, source = source, key = name })
end

--- syntax: rotation.observe(wx, source, i)
-- A resource of source ("notification", "certificates") that decrypted
-- with wx.conf.apiv3_keys[i], i > 1 (a previous key), in a message that
-- verified: counted, and said (once an hour per merchant). Never yields.
function _M.observe(wx, source, i)
  local c = the_counter()
  if c then
    c:inc({ mchid = tostring(wx.conf.mchid), source = source })
  end
  warn(wx, source, i, require("paygate.core").time())
end

return _M
