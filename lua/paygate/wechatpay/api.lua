-- paygate.wechatpay.api: the WeChat Pay v3 calls a merchant needs. Every
-- function here is mixed into the client (wechatpay.client), so each is
-- called as wx:name(...).
--
-- Each call checks its parameters before any network I/O: a missing or
-- mistyped field is nil, err with err.kind "invalid_params" and err.field
-- naming it. Then it reaches WeChat through wx:request() (signed request,
-- verified response, retries where safe) and returns
--   data, meta    data: the response JSON with WeChat's own field names
--                 ({} for a 204); meta = { http_status, headers, request_id }
-- or nil, err (errors.lua: err.kind, err.code, err.status, err.request_id,
-- err.retryable, err.detail).
--
-- Partner (service provider) mode -- a client configured with sp_mchid --
-- uses the partner paths and bodies: sp_appid / sp_mchid are filled in
-- from the config, each call takes sub_mchid in p (or as the argument after
-- the id for the id-only calls).
--
-- Retries: GETs are idempotent; so are the POSTs that carry an
-- out_trade_no / out_refund_no (prepay, close, refund): WeChat answers a
-- repeat with the same parameters as the first without acting twice, so a
-- timeout after sending can be retried with the same body bytes. Not the
-- abnormal refund: once applied the refund is no longer ABNORMAL and a
-- repeat is refused, so a lost answer is unknown_outcome (query_refund).

local core = require "paygate.core"
local crypto = require "paygate.crypto"
local transport = require "paygate.wechatpay.transport"
local validate = require "paygate.wechatpay.validate"
local payparams = require "paygate.wechatpay.payparams"
local bill = require "paygate.wechatpay.bill"
local civil = require "paygate.civil"
local printable = require("paygate.wechatpay.errors").printable

local type, pairs, ipairs, tostring, error, select =
      type, pairs, ipairs, tostring, error, select
local format, gsub, byte, lower, find =
      string.format, string.gsub, string.byte, string.lower, string.find

local check, fail, plain = validate.check, validate.fail, validate.plain

-- the transport's encoder: the same bytes wx:request would send for a table
local json_encode = transport.encode

local _M = {}

-- config accessors --------------------------------------------------------

-- self.conf is config.check()'s result: mchid is the signing merchant (the
-- service provider's sp_mchid when partner is true); appid / sp_appid, when
-- the configuration carries them, are the defaults for prepay bodies.
local function conf(self) return self.conf end
local function is_partner(self) return conf(self).partner == true end

-- the merchant's private key handle (parsed once by the client)
local function merchant_key(self) return conf(self).signer.key end

-- shared field rules --------------------------------------------------------

local OUT_TRADE_NO = { min = 6, max = 32, pattern = "^[%w_%-|*]+$",
                       what = "6-32 characters of [0-9A-Za-z_-|*]" }
local OUT_REFUND_NO = { min = 1, max = 64, pattern = "^[%w_%-|*@]+$",
                        what = "1-64 characters of [0-9A-Za-z_-|*@]" }
local ID = { min = 1, max = 64, pattern = "^[%w_%-]+$",
             what = "1-64 characters of [0-9A-Za-z_-]" }
local MCHID = { min = 1, max = 32, pattern = "^%d+$", what = "digits" }
local APPID = { min = 1, max = 32, pattern = "^[%w_%-]+$",
                what = "an appid (letters, digits, _ and -)" }
-- https, or http to a loopback host (the simulator's rule: a local spec's
-- receiver), by the same loopback test base_url uses.
-- (validate.notify_url: the simulator's check too)
local NOTIFY_URL = { min = 1,
  test = function(v) return validate.notify_url(v) ~= nil end,
  what = "an https URL of at most 255 bytes without user info, query or"
         .. " fragment (http only to a loopback host: 127.x.x.x,"
         .. " localhost, [::1])" }
local IP = { min = 1, max = 45, test = validate.ip_address,
             what = "an IPv4 or IPv6 address (203.0.113.7, 2001:db8::1)" }
-- (civil.epoch: the simulator reads time_expire with it too)
local RFC3339 = {
  test = function(v) return civil.epoch(v) ~= nil end,
  what = "an RFC 3339 time such as 2026-06-08T10:34:56+08:00" }
local CURRENCY = { pattern = "^%u%u%u$", what = "a currency code (CNY)" }
-- (a day of the calendar: the simulator refuses 2026-02-30 too)
local DATE = { test = function(v) return civil.date(v) ~= nil end,
               what = "a date YYYY-MM-DD" }

local function rule(path, t, base, extra)
  local r = { path, t }
  if base then for k, v in pairs(base) do r[k] = v end end
  if extra then for k, v in pairs(extra) do r[k] = v end end
  return r
end
local REQ = { required = true }

-- The body fields shared by every prepay (direct and partner).
local PREPAY_COMMON = {
  rule("description", "string", { min = 1, max = 127 }, REQ),
  rule("out_trade_no", "string", OUT_TRADE_NO, REQ),
  rule("time_expire", "string", RFC3339),
  rule("attach", "string", { max = 128 }),
  rule("notify_url", "string", NOTIFY_URL, REQ),
  rule("goods_tag", "string", { max = 32 }),
  rule("support_fapiao", "bool"),
  rule("limit_pay", "array"),
  rule("limit_pay[]", "string", { min = 1, max = 32 }),
  rule("amount", "object", nil, REQ),
  rule("amount.total", "int", { min = 1 }, REQ),
  rule("amount.currency", "string", CURRENCY),
  rule("detail", "object"),
  rule("detail.cost_price", "int", { min = 0 }),
  rule("detail.invoice_id", "string", { max = 32 }),
  rule("detail.goods_detail", "array", { min = 1 }),
  rule("detail.goods_detail[].merchant_goods_id", "string",
       { min = 1, max = 32 }, REQ),
  rule("detail.goods_detail[].wechatpay_goods_id", "string", { max = 32 }),
  rule("detail.goods_detail[].goods_name", "string", { max = 256 }),
  rule("detail.goods_detail[].quantity", "int", { min = 1 }, REQ),
  rule("detail.goods_detail[].unit_price", "int", { min = 0 }, REQ),
  rule("scene_info", "object"),
  rule("scene_info.payer_client_ip", "string", IP, REQ),
  rule("scene_info.device_id", "string", { max = 32 }),
  rule("scene_info.store_info", "object"),
  rule("scene_info.store_info.id", "string", { min = 1, max = 32 }, REQ),
  rule("scene_info.store_info.name", "string", { max = 256 }),
  rule("scene_info.store_info.area_code", "string", { max = 32 }),
  rule("scene_info.store_info.address", "string", { max = 512 }),
  rule("scene_info.h5_info", "object"),
  rule("scene_info.h5_info.type", "string",
       { enum = { "iOS", "Android", "Wap" } }, REQ),
  rule("scene_info.h5_info.app_name", "string", { max = 64 }),
  rule("scene_info.h5_info.app_url", "string", { max = 512 }),
  rule("scene_info.h5_info.bundle_id", "string", { max = 256 }),
  rule("scene_info.h5_info.package_name", "string", { max = 256 }),
  rule("settle_info", "object"),
  rule("settle_info.profit_sharing", "bool"),
}

local DIRECT_IDS = {
  rule("appid", "string", APPID, REQ),
  rule("mchid", "string", MCHID, REQ),
}
local SUB_MCHID = { rule("sub_mchid", "string", MCHID, REQ) }
local PARTNER_IDS = {
  rule("sp_appid", "string", APPID, REQ),
  rule("sp_mchid", "string", MCHID, REQ),
  rule("sub_appid", "string", APPID),
  rule("sub_mchid", "string", MCHID, REQ),
}

-- Extra rules per trade type and mode.
local PREPAY_EXTRA = {
  direct = {
    jsapi = { rule("payer", "object", nil, REQ),
              rule("payer.openid", "string", { min = 1, max = 128 }, REQ) },
    h5 = { rule("scene_info", "object", nil, REQ),
           rule("scene_info.h5_info", "object", nil, REQ) },
  },
  partner = {
    jsapi = { rule("payer", "object", nil, REQ),
              rule("payer.sp_openid", "string", { min = 1, max = 128 }),
              rule("payer.sub_openid", "string", { min = 1, max = 128 }) },
    h5 = { rule("scene_info", "object", nil, REQ),
           rule("scene_info.h5_info", "object", nil, REQ) },
  },
}

local PREPAY_ANSWER = { jsapi = "prepay_id", app = "prepay_id",
                        h5 = "h5_url", native = "code_url" }

-- helpers -----------------------------------------------------------------

local function pct(c) return format("%%%02X", byte(c)) end

-- Percent-encodes a path segment: all but unreserved characters, sub-delims,
-- ":" and "@" (of the ids admitted above, only "|" changes).
local function esc(s)
  return (gsub(s, "[^%w%-%._~!$&'()*+,;=:@]", pct))
end

-- Percent-encodes a query value: all but unreserved characters.
local function esc_query(s)
  return (gsub(s, "[^%w%-%._~]", pct))
end

local function copy(p)
  local t = {}
  for k, v in pairs(p) do t[k] = v end
  return t
end

local function check_p(call, p)
  if type(p) ~= "table" then
    error("wechatpay." .. call .. ": p must be a table", 3)
  end
end

-- level: the caller's stack level for the error (default: the caller of
-- the function calling check_opts)
local function check_opts(call, o, level)
  if o ~= nil and type(o) ~= "table" then
    error("wechatpay." .. call .. ": opts must be a table", level or 3)
  end
end

-- Fills a config-given id into the body: the caller may repeat it, but not
-- contradict it.
-- allowed: for an appid, the set the client may name (config.check's
-- appids: the default and the appids / sp_appids listed), or nil.
local function fill(call, body, key, value, allowed)
  local v = body[key]
  if v == nil then
    body[key] = value
    return true
  end
  if allowed then
    if allowed[v] then return true end
    local names = {}
    for a in pairs(allowed) do names[#names + 1] = a end
    table.sort(names)
    -- ("or omitted" only where omitting it fills the default in)
    return fail(call, key, "must be one of the client's " .. key .. "s ("
                .. table.concat(names, ", ") .. ")"
                .. (value ~= nil and " or omitted" or "") .. "; to pay "
                .. "under another, add it to the client's " .. key .. "s")
  end
  if value ~= nil and v ~= value then
    return fail(call, key, "must be the client's " .. key .. " (" .. value
                .. ") or omitted" .. (key:find("appid", 1, true)
                and "; to pay under another too, list it in the client's "
                    .. key .. "s" or ""))
  end
  return true
end

local function meta(res)
  return { http_status = res.status, headers = res.headers,
           request_id = res.request_id }
end

-- One call through wx:request. expect: a field the 2xx answer must carry.
local function call(self, name, method, path, body, o, expect)
  local ropts = { idempotent = o.idempotent, deadline = o.deadline,
                  timeout = o.timeout, wechatpay_serial = o.wechatpay_serial,
                  max_attempts = o.max_attempts }
  local res, err = self:request(method, path, body, ropts)
  if not res then return nil, err end
  local data = res.json
  if res.status == 204 or (data == nil and (res.body == nil
                                            or res.body == "")) then
    data = {}
  end
  if type(data) ~= "table" then
    return nil, core.error("malformed", name .. ": the answer is not a "
                           .. "JSON object", { status = res.status,
                           request_id = res.request_id, retryable = false })
  end
  if expect and type(data[expect]) ~= "string" then
    return nil, core.error("malformed", name .. ": the answer has no "
                           .. expect, { status = res.status,
                           request_id = res.request_id, retryable = false })
  end
  return data, meta(res)
end

local function encode(name, body)
  local ok, err = plain(name, body)
  if not ok then return nil, err end
  local done, s = pcall(json_encode, body)
  if not done then return fail(name, "p", tostring(s)) end
  return s
end

-- (id, sub_mchid, opts) or (id, opts) for the id-only calls; depth: how
-- many frames below the public call id_args runs (1: called by it).
-- returns: true, sub_mchid, opts; or nil, err.
local function id_args(call_name, self, sub, o, depth)
  if type(sub) == "table" and o == nil then sub, o = nil, sub end
  check_opts(call_name, o, 3 + (depth or 1))
  if is_partner(self) then
    local ok, err = check(call_name, { sub_mchid = sub }, SUB_MCHID)
    if not ok then return nil, err end
  elseif sub ~= nil then
    return fail(call_name, "sub_mchid", "is for partner mode (a client "
                .. "configured with sp_mchid)")
  end
  return true, sub, o or {}
end

local function check_id(call_name, field, v, r)
  return check(call_name, { [field] = v }, { rule(field, "string", r, REQ) })
end

-- prepay --------------------------------------------------------------------

-- Checks p and builds the prepay request: returns path, body bytes; or
-- nil, err.
local function build_prepay(self, kind, p)
  local name = kind .. "_prepay"
  local c = conf(self)
  local body = copy(p)
  local mode = is_partner(self) and "partner" or "direct"
  local ok, err
  -- the other mode's ids would be sent as they are and refused by WeChat
  for _, k in ipairs(mode == "partner" and { "mchid", "appid" }
                     or { "sp_mchid", "sp_appid", "sub_mchid", "sub_appid" })
  do
    if body[k] ~= nil then
      return fail(name, k, mode == "partner"
        and "is for a direct merchant: in partner mode give sp_appid "
            .. "(sp_mchid is the client's) and sub_mchid"
        or "is for partner mode (a client configured with sp_mchid)")
    end
  end
  -- payer (openid; sp_openid / sub_openid in partner mode) is in the JSAPI
  -- prepay's body alone: WeChat refuses it on the other trade types as a
  -- field the API does not define (PARAM_ERROR), so it is said here
  if kind ~= "jsapi" and body.payer ~= nil then
    return fail(name, "payer", "is for a JSAPI prepay only (the payer's "
                .. "openid inside WeChat): leave it out of a " .. kind
                .. " prepay")
  end
  if mode == "partner" then
    ok, err = fill(name, body, "sp_mchid", c.mchid)
    if ok then ok, err = fill(name, body, "sp_appid", c.sp_appid,
                                    c.appids) end
    if ok then ok, err = check(name, body, PARTNER_IDS) end
  else
    ok, err = fill(name, body, "mchid", c.mchid)
    if ok then ok, err = fill(name, body, "appid", c.appid, c.appids) end
    if ok then ok, err = check(name, body, DIRECT_IDS) end
  end
  if not ok then return nil, err end
  ok, err = check(name, body, PREPAY_COMMON)
  if not ok then return nil, err end
  local extra = PREPAY_EXTRA[mode][kind]
  if extra then
    ok, err = check(name, body, extra)
    if not ok then return nil, err end
  end
  if mode == "partner" and kind == "jsapi" then
    local payer = body.payer
    if payer.sp_openid == nil and payer.sub_openid == nil then
      return fail(name, "payer", "must hold one of sp_openid, sub_openid")
    end
    if payer.sp_openid ~= nil and payer.sub_openid ~= nil then
      -- (WeChat refuses the two together: say that, not "one of")
      return fail(name, "payer", "must hold sp_openid or sub_openid, not"
                  .. " both: WeChat Pay refuses an order naming both")
    end
    if payer.sub_openid and body.sub_appid == nil then
      return fail(name, "sub_appid", "is required with payer.sub_openid")
    end
  end
  local s
  s, err = encode(name, body)
  if not s then return nil, err end
  local path = mode == "partner" and "/v3/pay/partner/transactions/" .. kind
               or "/v3/pay/transactions/" .. kind
  return path, s
end

local function prepay(self, kind, p, o)
  local name = kind .. "_prepay"
  check_p(name, p)
  check_opts(name, o)
  local path, body = build_prepay(self, kind, p)
  if not path then return nil, body end
  o = o and copy(o) or {}
  o.idempotent = true           -- same out_trade_no, same bytes
  return call(self, name, "POST", path, body, o, PREPAY_ANSWER[kind])
end

--- syntax: method, path, body = wx:prepay_request(kind, p)
-- kind: "jsapi" | "app" | "h5" | "native". The request wx:KIND_prepay(p)
-- would send -- checked and encoded, the body bytes exactly -- without
-- sending it (to inspect, log or measure). returns nil, err like the call.
-- Does not yield.
function _M.prepay_request(self, kind, p)
  if not PREPAY_ANSWER[kind] then
    error("wechatpay.prepay_request: kind must be jsapi, app, h5 or native",
          2)
  end
  check_p("prepay_request", p)
  local path, body = build_prepay(self, kind, p)
  if not path then return nil, body end
  return "POST", path, body
end

--- syntax: data, meta = wx:jsapi_prepay(p[, opts])
-- p: the prepay body with WeChat's field names (description, out_trade_no,
-- notify_url, amount = { total }, payer = { openid }, ...); appid and
-- mchid (sp_appid / sp_mchid) default to the client's.
-- opts: deadline, timeout (seconds).
-- returns: data = { prepay_id }, meta; or nil, err.
-- yields: for the HTTP exchange.
function _M.jsapi_prepay(self, p, o) return prepay(self, "jsapi", p, o) end

--- syntax: data, meta = wx:app_prepay(p[, opts])  -- data.prepay_id
function _M.app_prepay(self, p, o) return prepay(self, "app", p, o) end

--- syntax: data, meta = wx:h5_prepay(p[, opts])  -- data.h5_url
-- p.scene_info = { payer_client_ip, h5_info = { type } } is required.
function _M.h5_prepay(self, p, o) return prepay(self, "h5", p, o) end

--- syntax: data, meta = wx:native_prepay(p[, opts])  -- data.code_url
function _M.native_prepay(self, p, o) return prepay(self, "native", p, o) end

-- query and close -------------------------------------------------------------

local function query(self, name, segment, field, r, id, sub, o)
  local ok, err = check_id(name, field, id, r)
  if not ok then return nil, err end
  ok, sub, o = id_args(name, self, sub, o, 2)
  if not ok then return nil, sub end
  local c = conf(self)
  local path
  if is_partner(self) then
    path = "/v3/pay/partner/transactions/" .. segment .. esc(id)
           .. "?sp_mchid=" .. c.mchid .. "&sub_mchid=" .. sub
  else
    path = "/v3/pay/transactions/" .. segment .. esc(id) .. "?mchid="
           .. c.mchid
  end
  o = copy(o)
  o.idempotent = true
  return call(self, name, "GET", path, nil, o)
end

--- syntax: data, meta = wx:query_by_transaction_id(id[, sub_mchid][, opts])
-- returns: data = the Transaction (trade_state, amount, payer, ...), meta.
function _M.query_by_transaction_id(self, id, sub, o)
  return query(self, "query_by_transaction_id", "id/", "transaction_id",
               ID, id, sub, o)
end

--- syntax: data, meta = wx:query_by_out_trade_no(no[, sub_mchid][, opts])
function _M.query_by_out_trade_no(self, no, sub, o)
  return query(self, "query_by_out_trade_no", "out-trade-no/",
               "out_trade_no", OUT_TRADE_NO, no, sub, o)
end

--- syntax: data, meta = wx:close(out_trade_no[, sub_mchid][, opts])
-- returns: {} (WeChat answers 204; closing a closed order succeeds again),
-- meta; or nil, err (e.g. kind order_paid: refund it instead).
-- wx:close() with no argument at all stops the client (wx:stop()); a nil
-- out_trade_no is invalid_params like any other.
function _M.close(self, ...)
  if select("#", ...) == 0 then return self:stop() end
  local no, sub, o = ...
  local name = "close"
  local ok, err = check_id(name, "out_trade_no", no, OUT_TRADE_NO)
  if not ok then return nil, err end
  ok, sub, o = id_args(name, self, sub, o)
  if not ok then return nil, sub end
  local c = conf(self)
  local path, body
  if is_partner(self) then
    path = "/v3/pay/partner/transactions/out-trade-no/" .. esc(no) .. "/close"
    body = json_encode({ sp_mchid = c.mchid, sub_mchid = sub })
  else
    path = "/v3/pay/transactions/out-trade-no/" .. esc(no) .. "/close"
    body = json_encode({ mchid = c.mchid })
  end
  o = copy(o)
  o.idempotent = true
  return call(self, name, "POST", path, body, o)
end

-- refunds -------------------------------------------------------------------

local REFUND = {
  rule("out_refund_no", "string", OUT_REFUND_NO, REQ),
  rule("transaction_id", "string", ID),
  rule("out_trade_no", "string", OUT_TRADE_NO),
  rule("reason", "string", { max = 80 }),
  rule("notify_url", "string", NOTIFY_URL),
  rule("funds_account", "string", { min = 1, max = 32 }),
  rule("amount", "object", nil, REQ),
  rule("amount.refund", "int", { min = 1 }, REQ),
  rule("amount.total", "int", { min = 1 }, REQ),
  rule("amount.currency", "string", CURRENCY, REQ),
  rule("amount.from", "array"),
  rule("amount.from[].account", "string",
       { enum = { "AVAILABLE", "UNAVAILABLE" } }, REQ),
  rule("amount.from[].amount", "int", { min = 1 }, REQ),
  rule("goods_detail", "array", { min = 1 }),
  rule("goods_detail[].merchant_goods_id", "string", { min = 1, max = 32 },
       REQ),
  rule("goods_detail[].wechatpay_goods_id", "string", { max = 32 }),
  rule("goods_detail[].goods_name", "string", { max = 256 }),
  rule("goods_detail[].unit_price", "int", { min = 0 }, REQ),
  rule("goods_detail[].refund_amount", "int", { min = 0 }, REQ),
  rule("goods_detail[].refund_quantity", "int", { min = 1 }, REQ),
}

local function partner_sub(name, self, body)
  if is_partner(self) then return check(name, body, SUB_MCHID) end
  if body.sub_mchid ~= nil then
    return fail(name, "sub_mchid", "is for partner mode (a client "
                .. "configured with sp_mchid)")
  end
  return true
end

--- syntax: data, meta = wx:refund(p[, opts])
-- p: out_refund_no, transaction_id or out_trade_no, amount = { refund,
-- total, currency }, reason, notify_url, ... (sub_mchid in partner mode).
-- returns: data = the Refund (data.status is the refund's: PROCESSING,
-- SUCCESS, ...), meta. Repeating it with the same out_refund_no is safe.
function _M.refund(self, p, o)
  local name = "refund"
  check_p(name, p)
  check_opts(name, o)
  local ok, err = partner_sub(name, self, p)
  if not ok then return nil, err end
  ok, err = check(name, p, REFUND)
  if not ok then return nil, err end
  if (p.transaction_id == nil) == (p.out_trade_no == nil) then
    return fail(name, "transaction_id", "give one of transaction_id, "
                .. "out_trade_no")
  end
  if p.amount.refund > p.amount.total then
    return fail(name, "amount.refund", "must not exceed amount.total")
  end
  local s
  s, err = encode(name, p)
  if not s then return nil, err end
  o = o and copy(o) or {}
  o.idempotent = true           -- same out_refund_no: never refunded twice
  return call(self, name, "POST", "/v3/refund/domestic/refunds", s, o,
              "out_refund_no")
end

--- syntax: data, meta = wx:query_refund(out_refund_no[, sub_mchid][, opts])
function _M.query_refund(self, no, sub, o)
  local name = "query_refund"
  local ok, err = check_id(name, "out_refund_no", no, OUT_REFUND_NO)
  if not ok then return nil, err end
  ok, sub, o = id_args(name, self, sub, o)
  if not ok then return nil, sub end
  local path = "/v3/refund/domestic/refunds/" .. esc(no)
  if sub then path = path .. "?sub_mchid=" .. sub end
  o = copy(o)
  o.idempotent = true
  return call(self, name, "GET", path, nil, o)
end

local ABNORMAL = {
  rule("refund_id", "string", ID, REQ),
  rule("out_refund_no", "string", OUT_REFUND_NO, REQ),
  rule("type", "string", { enum = { "USER_BANK_CARD",
                                    "MERCHANT_BANK_CARD" } }, REQ),
  rule("bank_type", "string", { min = 1, max = 32 }),
  rule("bank_account", "string", { min = 1, max = 64 }),
  rule("real_name", "string", { min = 1, max = 64 }),
}
local ABNORMAL_USER = {
  rule("bank_type", "string", nil, REQ),
  rule("bank_account", "string", nil, REQ),
  rule("real_name", "string", nil, REQ),
}

--- syntax: data, meta = wx:abnormal_refund(p[, opts])
-- Sends a refund that ended ABNORMAL (the user's card was closed...) to a
-- bank card: p = { refund_id, out_refund_no, type = "USER_BANK_CARD" |
-- "MERCHANT_BANK_CARD", bank_type, bank_account, real_name } (the last
-- three required for USER_BANK_CARD; sub_mchid in partner mode).
-- bank_account and real_name are given in clear: they are encrypted here
-- with WeChat Pay's newest key (wx:encrypt_sensitive), and the request's
-- Wechatpay-Serial names that key.
-- returns: data = the Refund, meta.
function _M.abnormal_refund(self, p, o)
  local name = "abnormal_refund"
  check_p(name, p)
  check_opts(name, o)
  local ok, err = partner_sub(name, self, p)
  if not ok then return nil, err end
  ok, err = check(name, p, ABNORMAL)
  if not ok then return nil, err end
  if p.type == "USER_BANK_CARD" then
    ok, err = check(name, p, ABNORMAL_USER)
    if not ok then return nil, err end
  end
  local body = {}
  for _, k in ipairs({ "out_refund_no", "type", "bank_type", "sub_mchid" }) do
    body[k] = p[k]
  end
  local serial
  -- both fields under one key; a rotation between the two would give two
  -- serials, so try again once
  for _ = 1, 2 do
    local s1, s2
    if p.bank_account then
      body.bank_account, s1 = self:encrypt_sensitive(p.bank_account)
      if not body.bank_account then return nil, s1 end
    end
    if p.real_name then
      body.real_name, s2 = self:encrypt_sensitive(p.real_name)
      if not body.real_name then return nil, s2 end
    end
    serial = s1 or s2
    if s1 == nil or s2 == nil or s1 == s2 then break end
    serial = nil
  end
  if (p.bank_account or p.real_name) and serial == nil then
    return nil, core.error("unknown_serial", name .. ": WeChat Pay's key "
                           .. "changed while encrypting; try again")
  end
  local s
  s, err = encode(name, body)
  if not s then return nil, err end
  o = o and copy(o) or {}
  o.wechatpay_serial = serial
  return call(self, name, "POST", "/v3/refund/domestic/refunds/"
              .. esc(p.refund_id) .. "/apply-abnormal-refund", s, o)
end

-- bills -----------------------------------------------------------------------

local TRADE_BILL = {
  rule("bill_date", "string", DATE, REQ),
  rule("bill_type", "string", { enum = { "ALL", "SUCCESS", "REFUND",
        "RECHARGE_REFUND", "ALL_SPECIAL", "SUC_SPECIAL", "REF_SPECIAL" } }),
  rule("tar_type", "string", { enum = { "GZIP" } }),
  rule("sub_mchid", "string", MCHID),
}
local FUND_BILL = {
  rule("bill_date", "string", DATE, REQ),
  rule("account_type", "string",
       { enum = { "BASIC", "OPERATION", "FEES" } }),
  rule("tar_type", "string", { enum = { "GZIP" } }),
}

local function bill_request(self, name, path, schema, keys, p, o)
  check_p(name, p)
  check_opts(name, o)
  local ok, err = check(name, p, schema)
  if not ok then return nil, err end
  if p.sub_mchid ~= nil and not is_partner(self) then
    return fail(name, "sub_mchid", "is for partner mode (a client "
                .. "configured with sp_mchid)")
  end
  for k in pairs(p) do
    local known = false
    for _, kk in ipairs(keys) do known = known or kk == k end
    if not known then
      return fail(name, tostring(k), "is not a parameter of this call")
    end
  end
  local q = {}
  for _, k in ipairs(keys) do
    if p[k] ~= nil then q[#q + 1] = k .. "=" .. esc_query(p[k]) end
  end
  o = o and copy(o) or {}
  o.idempotent = true
  return call(self, name, "GET", path .. "?" .. table.concat(q, "&"), nil, o,
              "download_url")
end

--- syntax: data, meta = wx:trade_bill(p[, opts])
-- p = { bill_date = "2026-06-11", bill_type = "ALL", tar_type = "GZIP",
-- sub_mchid (partner mode, optional) }.
-- returns: data = { download_url, hash_type, hash_value } for
-- wx:download_bill; or nil, err with kind statement_creating (not ready
-- yet: ask again later) or no_statement_exist (no trades that day).
function _M.trade_bill(self, p, o)
  return bill_request(self, "trade_bill", "/v3/bill/tradebill", TRADE_BILL,
                      { "bill_date", "sub_mchid", "bill_type", "tar_type" },
                      p, o)
end

--- syntax: data, meta = wx:fund_flow_bill(p[, opts])
-- p = { bill_date, account_type = "BASIC" | "OPERATION" | "FEES",
-- tar_type = "GZIP" }; answers and errors as wx:trade_bill.
function _M.fund_flow_bill(self, p, o)
  return bill_request(self, "fund_flow_bill", "/v3/bill/fundflowbill",
                      FUND_BILL, { "bill_date", "account_type", "tar_type" },
                      p, o)
end

local BILL_DEADLINE, BILL_TIMEOUT, BILL_IDLE = 3600, 1800, 30

--- syntax: info, meta = wx:download_bill(bill, file_path[, opts])
-- bill: what wx:trade_bill / wx:fund_flow_bill returned. Downloads the file
-- (a signed GET of download_url's path and query, against the client's
-- base URL; WeChat does not sign the answer), streaming it to file_path --
-- gunzipped when it is gzip -- and checks the SHA-1 of the content against
-- bill.hash_value. The bill is never held in memory whole.
-- opts: deadline (default 3600 s), timeout (one attempt, default 1800 s),
-- idle_timeout (s moving less than a byte a second: the attempt fails
-- as a timeout; default 30), max_bytes (default 8 GiB of content), on_progress (fn(received)
-- -> anything but false / nil, err to go on: called after each chunk
-- written, in the caller's coroutine, may yield; e.g. a lease's
-- keepalive, so that a download longer than the lease keeps it). A large
-- bill takes as long as it flows: the client's timeout and deadline
-- (10 s, 30 s, for API calls) would cut it off every day.
-- returns: info = { path, bytes, received, gzip, sha1 }, meta; or nil, err
-- (hash_mismatch, malformed, too_large, io, or a transport error; the
-- error on_progress returned when it stopped the download), with nothing
-- left at file_path.
function _M.download_bill(self, b, path, o)
  local name = "download_bill"
  if type(b) ~= "table" then
    error("wechatpay.download_bill: bill must be a table", 2)
  end
  if type(path) ~= "string" or path == "" then
    error("wechatpay.download_bill: file_path must be a non-empty string", 2)
  end
  check_opts(name, o)
  o = o or {}
  local ok, err = check(name, b, {
    rule("download_url", "string", { min = 1, max = 2048 }, REQ),
    rule("hash_type", "string", nil, REQ),
  })
  if not ok then return nil, err end
  -- SHA1 is the one hash_type WeChat Pay documents for bills. Whether an
  -- SM (national-crypto) merchant's bills come hashed otherwise (SM3,
  -- say) is unconfirmed: such a bill is refused here, before anything is
  -- downloaded, naming the hash_type that came (and before its hash_value
  -- is judged as a SHA-1's, which would blame the wrong field).
  -- docs/wechatpay.md, Bills.
  if b.hash_type:upper() ~= "SHA1" then
    return fail(name, "hash_type", "must be SHA1, the one hash type this"
      .. " client checks a bill with (got \"" .. printable(b.hash_type, 32)
      .. "\")")
  end
  ok, err = check(name, b, {
    rule("hash_value", "string", { pattern = "^%x+$", min = 40, max = 40,
                                   what = "40 hex digits (SHA-1)" }, REQ),
  })
  if not ok then return nil, err end
  local target = b.download_url:match("^https?://[^/?#]+(/.*)$")
                 or b.download_url:match("^/.*$")
  if not target or not find(target, "^/v3/billdownload/")
     or find(target, "[%s#]") then
    return fail(name, "download_url", "must be a WeChat Pay "
                .. "/v3/billdownload/ URL")
  end
  local progress = o.on_progress
  if progress ~= nil and type(progress) ~= "function" then
    error("wechatpay.download_bill: opts.on_progress must be a function", 2)
  end
  local w, stopped
  w, err = bill.writer(path, { max_bytes = o.max_bytes })
  if not w then return nil, err end
  local res, rerr = self:request("GET", target, nil, {
    idempotent = true, unsigned = true,
    deadline = o.deadline or BILL_DEADLINE,
    headers = { Accept = "*/*" },     -- a file, not JSON
    timeout = o.timeout or BILL_TIMEOUT,
    idle_timeout = o.idle_timeout or BILL_IDLE,
    max_attempts = o.max_attempts,
    sink = function(chunk)
      local ok, ferr = w:feed(chunk)
      if not ok or not progress then return ok, ferr end
      local go, perr = progress(w.received)
      if go == false or (go == nil and perr ~= nil) then
        stopped = perr or core.error("aborted", "download_bill: on_progress"
                                     .. " stopped the download")
        return false, stopped
      end
      return true
    end,
  })
  if not res then
    w:abort()
    if w.err then return nil, w.err end
    if stopped then return nil, stopped end
    return nil, rerr
  end
  local info
  info, err = w:finish(b.hash_value)
  if not info then return nil, err end
  return info, meta(res)
end

-- media upload ----------------------------------------------------------

local MEDIA_PATHS = {
  ["/v3/merchant/media/upload"] = true,          -- images (JPG, BMP, PNG)
  ["/v3/merchant/media/video_upload"] = true,    -- videos
}
local MEDIA_TYPES = { jpg = "image/jpeg", jpeg = "image/jpeg",
                      png = "image/png", bmp = "image/bmp" }

--- syntax: data, meta = wx:upload_media(filename, content[, opts])
-- Uploads an image (or a video: opts.path = "/v3/merchant/media/
-- video_upload") as multipart/form-data: a "meta" part, the JSON
-- { filename, sha256 } (sha256 of content, hex), then a "file" part with
-- the bytes. The signature covers the meta JSON only, as WeChat checks it.
-- filename: 1-128 printable characters without quotes or slashes, ending
-- in the file's extension; content: the file's bytes (not empty).
-- opts: path, content_type (default from the extension), deadline,
-- timeout, max_attempts. returns: { media_id }, meta, or nil, err. yields.
function _M.upload_media(self, filename, content, o)
  check_opts("upload_media", o)
  o = o or {}
  local path = o.path or "/v3/merchant/media/upload"
  if not MEDIA_PATHS[path] then
    return fail("upload_media", "path", "must be one of the media upload "
                .. "paths (/v3/merchant/media/upload, "
                .. "/v3/merchant/media/video_upload)")
  end
  if type(filename) ~= "string" or filename == "" or #filename > 128
     or filename:find("[%c\"/\\]") or not filename:find("%.%w+$") then
    return fail("upload_media", "filename", "must be 1-128 characters "
                .. "without quotes, slashes or control characters, with "
                .. "an extension")
  end
  if type(content) ~= "string" or content == "" then
    return fail("upload_media", "content", "must be the file's bytes")
  end
  local ctype = o.content_type
                or MEDIA_TYPES[lower(filename:match("%.(%w+)$"))]
                or "application/octet-stream"
  if type(ctype) ~= "string" or ctype:find("[%c\"]") then
    return fail("upload_media", "content_type", "must be a MIME type")
  end
  local meta_json = json_encode({ filename = filename,
    sha256 = crypto.hex(crypto.digest("sha256", content)) })
  -- a boundary the content cannot hold (checked, not assumed)
  local boundary
  repeat
    boundary = "paygate-" .. crypto.random_nonce(24)
  until not find(content, boundary, 1, true)
  local body = "--" .. boundary .. "\r\n"
    .. "Content-Disposition: form-data; name=\"meta\"\r\n"
    .. "Content-Type: application/json\r\n\r\n" .. meta_json .. "\r\n"
    .. "--" .. boundary .. "\r\n"
    .. "Content-Disposition: form-data; name=\"file\"; filename=\""
    .. filename .. "\"\r\nContent-Type: " .. ctype .. "\r\n\r\n" .. content
    .. "\r\n--" .. boundary .. "--\r\n"
  local res, err = self:request("POST", path, body, {
    signed_body = meta_json, deadline = o.deadline, timeout = o.timeout,
    max_attempts = o.max_attempts,
    -- the same file again gets the same media: safe to repeat
    idempotent = true,
    headers = { ["Content-Type"] = "multipart/form-data; boundary="
                .. boundary } })
  if not res then return nil, err end
  local data = res.json
  if type(data) ~= "table" or type(data.media_id) ~= "string" then
    return nil, core.error("malformed", "upload_media: the answer has no "
                           .. "media_id", { status = res.status,
                           request_id = res.request_id, retryable = false })
  end
  return data, meta(res)
end

-- pay-sign parameters ---------------------------------------------------

--- syntax: t, err = wx:jsapi_pay_params(appid, prepay_id[, opts])
-- The parameters for WeixinJSBridge / wx.requestPayment after a JSAPI or
-- mini-program prepay: { appId, timeStamp, nonceStr, package, signType,
-- paySign }, signed with the merchant key. appid is the one that ordered
-- (in partner mode: sub_appid when the payer was a sub_openid, else
-- sp_appid). opts: timestamp, nonce (fixed values, for tests).
-- A direct merchant's nil appid is the configured appid, which the prepay
-- filled in too; a service provider's must be given (sp_appid or
-- sub_appid: which one ordered is not known here).
-- returns: the table, or nil, err (invalid_params). Does not yield.
function _M.jsapi_pay_params(self, appid, prepay_id, o)
  check_opts("jsapi_pay_params", o)
  if appid == nil and not is_partner(self) then appid = conf(self).appid end
  return payparams.jsapi(merchant_key(self), appid, prepay_id, o)
end

--- syntax: t, err = wx:app_pay_params(appid, prepay_id[, sub_mchid][, opts])
-- The parameters for the App SDK: { appid, partnerid, prepayid, package =
-- "Sign=WXPay", noncestr, timestamp, sign }. partnerid is the mchid; in
-- partner mode pass sub_mchid, which is what partnerid then carries.
function _M.app_pay_params(self, appid, prepay_id, sub, o)
  if type(sub) == "table" and o == nil then sub, o = nil, sub end
  check_opts("app_pay_params", o)
  local partnerid
  if is_partner(self) then
    local ok, err = check("app_pay_params", { sub_mchid = sub }, SUB_MCHID)
    if not ok then return nil, err end
    partnerid = sub
  else
    if sub ~= nil then
      return fail("app_pay_params", "sub_mchid", "is for partner mode")
    end
    partnerid = conf(self).mchid
    if appid == nil then appid = conf(self).appid end
  end
  return payparams.app(merchant_key(self), partnerid, appid, prepay_id, o)
end

return _M
