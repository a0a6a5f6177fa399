-- sim.payer: the payer's WeChat client (POST /sim/pay), handed exactly
-- what a front end passes it: the JSAPI call's { appId, timeStamp,
-- nonceStr, package, signType, paySign } (WeixinJSBridge, and
-- wx.requestPayment with the appId it signed), the App SDK's { appid,
-- partnerid, prepayid, package, noncestr, timestamp, sign }, a scanned
-- { code_url } or an opened { h5_url }. It checks them as WeChat's client
-- and server do -- every field's form, the prepay they name and its age,
-- the appid and merchant it was made for, the signature with the
-- merchant's certificate over paygate.wechatpay.sign's signing string --
-- then pays the order as POST /sim/transactions/{no}/pay does
-- (orders.pay: the same Transaction, the same notification).
--
-- A prepay_id and a code_url work for prepay_ttl seconds (WeChat: 2
-- hours), an h5_url for h5_url_ttl (5 minutes), from the prepay that
-- handed them out; time_scale (the notification schedule's) does not
-- apply. A code_url stops working once a later prepay of its order (a
-- re-entry) hands out another, as WeChat's does. Each failure is { status, code, message, field }, field the
-- parameter's name as the front end spells it.
local crypto = require "paygate.crypto"
local sign = require "paygate.wechatpay.sign"
local suggest = require "paygate.suggest"
local config = require "sim.config"
local orders = require "sim.orders"
local clock = require "sim.clock"
local rfc3339 = require("sim.certificates").rfc3339

local type, pairs, ipairs, tostring = type, pairs, ipairs, tostring

local _M = {}

config.define("prepay_ttl", config.number_check(0, true), 7200)
config.define("h5_url_ttl", config.number_check(0, true), 300)

-- What each kind of front end passes, in the order they are checked; the
-- field that names the prepay; the trade type that made it; the lines
-- signed (paygate.wechatpay.payparams signs the same ones).
local KINDS = {
  jsapi = { what = "the JSAPI call (WeixinJSBridge, wx.requestPayment)",
            keys = { "appId", "timeStamp", "nonceStr", "package",
                     "signType", "paySign" },
            appid = "appId", ts = "timeStamp", nonce = "nonceStr",
            sig = "paySign", link = "package", trade_type = "JSAPI" },
  app = { what = "the App SDK",
          keys = { "appid", "partnerid", "prepayid", "package", "noncestr",
                   "timestamp", "sign" },
          appid = "appid", ts = "timestamp", nonce = "noncestr",
          sig = "sign", link = "prepayid", trade_type = "APP" },
  native = { what = "a scanned QR code", keys = { "code_url" },
             link = "code_url", trade_type = "NATIVE" },
  h5 = { what = "a mobile browser", keys = { "h5_url" },
         link = "h5_url", trade_type = "MWEB" },
}
local ORDER = { "jsapi", "app", "native", "h5" }
for _, k in ipairs(ORDER) do
  local set = {}
  for _, f in ipairs(KINDS[k].keys) do set[f] = true end
  KINDS[k].set = set
end

local TRADE = { JSAPI = "a JSAPI", APP = "an App", NATIVE = "a native",
                MWEB = "an H5" }

local function fail(status, code, field, message)
  return nil, { status = status, code = code, field = field,
                message = message }
end

local function bad(field, message)
  return fail(400, "PARAM_ERROR", field, message)
end

-- Which front end b comes from: the kind with the most of its keys in b
-- (none, or a tie: nil).
local function kind_of(b)
  local best, score, tie = nil, 0, false
  for _, k in ipairs(ORDER) do
    local n = 0
    for f in pairs(KINDS[k].set) do
      if b[f] ~= nil then n = n + 1 end
    end
    if n > score then
      best, score, tie = k, n, false
    elseif n == score and n > 0 then
      tie = true
    end
  end
  if tie then return nil end
  return best
end

-- The form of every field. returns: the prepay_id or URL to look up, or
-- nil, err.
local function check_form(b, kind, cfg)
  local K = KINDS[kind]
  local names = {}
  for f in pairs(b) do names[#names + 1] = tostring(f) end
  table.sort(names)
  for _, f in ipairs(names) do
    if not K.set[f] then
      local near = suggest.nearest(f, K.set)
      return bad(f, f .. " is not a parameter of " .. K.what .. " (it takes "
        .. table.concat(K.keys, ", ") .. ")"
        .. (near and ("; did you mean " .. near .. "?") or ""))
    end
  end
  for _, f in ipairs(K.keys) do
    local v = b[f]
    if v == nil then return bad(f, f .. " is required") end
    if type(v) ~= "string" then
      return bad(f, f .. " must be a string"
        .. (f == K.ts and " of digits (Unix seconds as a string, not a"
            .. " number)" or ""))
    end
    if v == "" then return bad(f, f .. " must not be empty") end
  end
  if kind == "native" then return b.code_url end
  if kind == "h5" then
    -- the merchant may append &redirect_url=... (its page, percent-encoded)
    return b.h5_url:match("^(.-)&redirect_url=[^&]*$") or b.h5_url
  end
  if #b[K.appid] > 32 or b[K.appid]:find("[%c%s]") then
    return bad(K.appid, K.appid .. " must be an appid: at most 32"
               .. " characters, no space")
  end
  if not b[K.ts]:find("^%d+$") or #b[K.ts] > 32 then
    return bad(K.ts, K.ts .. " must be a string of digits (Unix seconds)")
  end
  if #b[K.nonce] > 32 or b[K.nonce]:find("[%c%s]") then
    return bad(K.nonce, K.nonce .. " must be at most 32 characters without"
               .. " spaces or control characters")
  end
  if kind == "jsapi" then
    local id = b.package:match("^prepay_id=(%S+)$")
    if not id then
      return bad("package", 'package must be "prepay_id=" and the prepay_id')
    end
    -- the merchant's variant: RSA, or SM2 (paygate.wechatpay.payparams'
    -- value: WeChat's public documents do not give the SM one)
    local want = cfg.sm and "SM2" or "RSA"
    if b.signType ~= want then
      return bad("signType", 'signType must be "' .. want .. '" for a'
        .. " merchant of " .. cfg.sign_type)
    end
    return id
  end
  if b.package ~= "Sign=WXPay" then
    return bad("package", 'package must be "Sign=WXPay" (the App SDK'
               .. " takes the prepay_id in prepayid)")
  end
  if b.prepayid:find("[%c%s]") then
    return bad("prepayid", "prepayid must be a prepay_id")
  end
  return b.prepayid
end

-- The handed-out link that key names (a prepay_id, or a URL), with its
-- order. returns: link, order, or nil.
local function find(db, kind, key)
  local by = (kind == "native" or kind == "h5") and "url" or "prepay_id"
  local l = assert(db:query("SELECT id, order_id, prepay_id, url, created_at"
    .. " FROM sim_pay_links WHERE " .. by .. " = $1 ORDER BY id LIMIT 1",
    { key }))[1]
  if not l then return nil end
  local o = assert(db:query("SELECT * FROM sim_orders WHERE id = $1",
                            { l.order_id }))[1]
  if not o then return nil end
  return l, o
end

-- The appid that ordered, whose page, mini program or App opens the
-- payment: a direct order's appid; a partner order's sub_appid when the
-- payer went as its sub_openid (JSAPI) or when it named one (App), else
-- its sp_appid.
local function ordering_appid(kind, o)
  if not o.sp_mchid then return o.appid end
  if kind == "jsapi" then
    return o.sub_openid and o.sub_appid or o.appid
  end
  return o.sub_appid or o.appid
end

local function check_order(b, kind, o, m, cfg)
  local K = KINDS[kind]
  if o.trade_type ~= K.trade_type then
    return fail(400, "INVALID_REQUEST", K.link, K.link .. " names "
      .. TRADE[o.trade_type] .. " prepay (order " .. o.out_trade_no
      .. "), not " .. TRADE[K.trade_type] .. " one: " .. K.what
      .. " pays only what " .. TRADE[K.trade_type] .. " prepay handed out")
  end
  if not K.appid then return true end
  local appid = b[K.appid]
  local sub = o.sp_mchid and m.sub[o.owner]
  if not m.appids[appid] and not (sub and sub.appids[appid]) then
    return fail(400, "APPID_MCHID_NOT_MATCH", K.appid, "appid和mch_id不匹配: "
      .. appid .. " is not an appid of merchant " .. (o.sp_mchid or o.owner)
      .. (o.sp_mchid and (" or of its sub-merchant " .. o.owner) or ""))
  end
  local want = ordering_appid(kind, o)
  if appid ~= want then
    return fail(400, "INVALID_REQUEST", K.appid, "the prepay was made"
      .. " under appid " .. want .. ", not " .. appid .. ": the payment"
      .. " opens in that appid's page, mini program or App"
      .. (o.sp_mchid and " (a service provider's order: its sub_appid"
          .. " when the payer was named by sub_openid, or for an App"
          .. " prepay that named one; else its sp_appid)" or ""))
  end
  if kind == "app" and b.partnerid ~= o.owner then
    return fail(400, "INVALID_REQUEST", "partnerid", "partnerid must be "
      .. "the merchant the prepay was made for, " .. o.owner
      .. (o.sp_mchid and " (a service provider's order: its sub_mchid)"
          or "") .. ", not " .. b.partnerid)
  end
  local lines = { appid, b[K.ts], b[K.nonce],
                  kind == "jsapi" and b.package or b.prepayid }
  local msg = sign.pay_message(lines)
  for _, key in pairs(m.keys) do
    if crypto.verify_base64(key, msg, b[K.sig], cfg.sign_type) then
      return true
    end
  end
  local e = { status = 401, code = "SIGN_ERROR", field = K.sig,
    message = K.sig .. " does not verify with merchant "
      .. (o.sp_mchid or o.owner) .. "'s certificate over the signing"
      .. " string (" .. table.concat({ K.appid, K.ts, K.nonce }, "\\n")
      .. "\\n"
      .. (kind == "jsapi" and "package" or "prepayid") .. "\\n)",
    sign_message = msg }
  return nil, e
end

--- syntax: t, id = payer.pay(ctx, b)
-- b: the decoded body (a table). returns: the Transaction and its
-- notification's id, or nil, { status, code, message, field }.
function _M.pay(ctx, b)
  local cfg = ctx.config
  local kind = kind_of(b)
  if not kind then
    return bad(nil, "the body must be what a front end passes WeChat's"
      .. " client: the JSAPI call's {appId, timeStamp, nonceStr, package,"
      .. " signType, paySign}, the App SDK's {appid, partnerid, prepayid,"
      .. " package, noncestr, timestamp, sign}, {code_url} or {h5_url}")
  end
  local K = KINDS[kind]
  local key, e = check_form(b, kind, cfg)
  if not key then return nil, e end
  local l, o = find(ctx.db, kind, key)
  if not l then
    return fail(404, "RESOURCE_NOT_EXISTS", K.link, "no prepay handed out "
      .. (K.link == "package" and "prepay_id " or K.link .. " ") .. key)
  end
  local m = cfg.by_mchid[o.sp_mchid or o.owner]
  if not m then
    return fail(404, "RESOURCE_NOT_EXISTS", K.link, "the merchant of order "
      .. o.out_trade_no .. " is no longer configured")
  end
  local ok
  ok, e = check_order(b, kind, o, m, cfg)
  if not ok then return nil, e end
  -- a code_url is the order's newest only: a prepay made again (re-entry)
  -- hands out a new one and the old one no longer pays, as WeChat does
  if kind == "native" then
    local later = assert(ctx.db:query("SELECT created_at FROM sim_pay_links"
      .. " WHERE order_id = $1 AND id > $2 ORDER BY id LIMIT 1",
      { o.id, l.id }))[1]
    if later then
      return fail(400, "PREPAY_EXPIRED", K.link, "code_url " .. key
        .. " was replaced by the code_url of a later prepay of order "
        .. o.out_trade_no .. " (" .. rfc3339(later.created_at) .. "): only"
        .. " the newest code_url pays")
    end
  end
  local now = clock.now()        -- WeChat's, as the link's created_at
  local ttl = o.trade_type == "MWEB" and cfg.h5_url_ttl or cfg.prepay_ttl
  if now >= l.created_at + ttl then
    local what = kind == "native" and "code_url" or kind == "h5" and "h5_url"
                 or "prepay_id"
    return fail(400, "PREPAY_EXPIRED", K.link, what .. " " .. key
      .. " was handed out at " .. rfc3339(l.created_at) .. ": it works for "
      .. ("%g"):format(ttl) .. " s (" .. (kind == "h5" and "h5_url_ttl"
      or "prepay_ttl") .. "); a new prepay hands out a fresh one")
  end
  return orders.pay(o.out_trade_no, { order_id = o.id })
end

return _M
