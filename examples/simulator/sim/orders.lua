-- sim.orders: the payment and refund endpoints, with their state in SQLite.
--
-- Orders: NOTPAY -> SUCCESS (paid, POST /sim/transactions/{no}/pay) |
-- PAYERROR (/fail) | CLOSED (close, or time_expire passed); SUCCESS ->
-- REFUND once a refund is made. An order past its time_expire is closed
-- when it is next looked at (query, close, prepay, pay).
-- Refunds: PROCESSING -> SUCCESS | ABNORMAL | CLOSED (POST
-- /sim/refunds/{no}/settle, or by themselves refund_settle_after seconds
-- after creation); ABNORMAL -> PROCESSING (apply-abnormal-refund).
-- A payment that succeeds and a refund that settles enqueue their
-- notification (sim.notify) in the transaction that makes the change.
-- Every time here is WeChat's (sim.clock: the host's plus clock_offset):
-- time_expire is judged on it, success_time, create_time and close times
-- are written on it, as one clock does all of it at WeChat.
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local validate = require "paygate.wechatpay.validate"
local json = require "sim.json"
local notify = require "sim.notify"
local certificates = require "sim.certificates"
local clock = require "sim.clock"

local type, tostring, tonumber, ipairs, pairs, math_floor =
      type, tostring, tonumber, ipairs, pairs, math.floor

local _M = {}

local S = {}          -- ctx: db, config, identity, api

local rfc3339 = certificates.rfc3339

local DESC = {
  SUCCESS = "支付成功", REFUND = "转入退款", NOTPAY = "订单未支付",
  CLOSED = "订单已关闭", PAYERROR = "支付失败，请重新下单支付",
}
local TYPES = { jsapi = "JSAPI", app = "APP", h5 = "MWEB", native = "NATIVE" }
local MAX_REFUNDS = 50
-- a refund this long after the payment is refused: a year by any count
-- (paygate.reconcile's, the gateway's check too)
local REFUND_WINDOW = require("paygate.reconcile").REFUND_WINDOW
local EMPTY = {}                 -- read only
local EMPTY_ARRAY = require("paygate.json.core").empty_array  -- encodes []

local function api() return S.api end

-- helpers -----------------------------------------------------------------

-- Is s UTF-8 of 1- to 3-byte characters (WeChat refuses 4-byte ones such
-- as emoji), with no overlong form and no surrogate? (paygate.utf8's: the
-- client refuses the same strings before sending them)
local utf8_bmp_at = require("paygate.utf8").bmp
local function utf8_bmp(s)
  return (utf8_bmp_at(s))
end
_M.utf8_bmp = utf8_bmp

local function utf8_len(s)
  local _, n = s:gsub("[^\128-\191]", "")
  return n
end

-- Canonical JSON (keys sorted at every level): the re-entry comparison.
local function canon(v)
  local t = type(v)
  if t ~= "table" then return json.encode(v) end
  local n = #v
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  if n > 0 and #keys == n then
    local parts = {}
    for i = 1, n do parts[i] = canon(v[i]) end
    return "[" .. table.concat(parts, ",") .. "]"
  end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  local parts = {}
  for _, k in ipairs(keys) do
    parts[#parts + 1] = json.encode(tostring(k)) .. ":" .. canon(v[k])
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

local function digest(v)
  return crypto.hex(crypto.digest("sha256", canon(v)))
end

local function random_digits(n)
  local b = crypto.random_bytes(n)
  return (b:gsub(".", function(c) return tostring(c:byte() % 10) end))
end

local function beijing_stamp(now)
  return os.date("!%Y%m%d%H%M%S", math_floor(now) + 8 * 3600)
end

-- 2026-01-02T03:04:05+08:00 (or Z, or fractions) to epoch seconds: the
-- client's reading (it checks time_expire with it before sending).
local parse_time = require("paygate.civil").epoch
_M.parse_time = parse_time

local loopback_host = require("paygate.addr").loopback_host

-- notify_url: validate.notify_url (the client's check before sending),
-- and not the simulator itself (a loopback URL on the port this request
-- came in on: its /sim/ API would take the notification for a command).
local URL_WHY = { length = "应为不超过255字节的URL",
                  scheme = "应为https://开头的URL", query = "不能携带参数" }
local function check_url(u, c)
  local scheme, host, port = validate.notify_url(u)
  if not scheme then
    -- (validate says "length" for a space or a control character too: a
    -- short URL with one is told what is wrong with it)
    if host == "length" and type(u) == "string" and #u <= 255 then
      return nil, "不能含有空格或控制字符"
    end
    return nil, URL_WHY[host]
  end
  if loopback_host(host) and c and c.req then
    local own = (c.req.local_addr or ""):match(":(%d+)$")
    if port == "" then port = scheme == "https" and "443" or "80" end
    -- as numbers: "09000" is port 9000 to the client that connects
    if own and tonumber(own) == tonumber(port) then
      return nil, "不能指向模拟器自身"
    end
  end
  return true
end
_M.check_url = check_url

local function str(body, key, max, required, field, min)
  local v = body[key]
  field = field or ("/" .. key)
  if v == nil then
    if required then
      return nil, api().param_error(field, "此字段为必填项")
    end
    return true
  end
  if type(v) ~= "string" then
    return nil, api().param_error(field, "应为字符串", v)
  end
  if not utf8_bmp(v) then
    return nil, api().param_error(field,
      "应为UTF-8编码的字符串，且不含4字节字符（如emoji）")
  end
  local n = utf8_len(v)
  if n > max or n < (min or (required and 1 or 0)) then
    return nil, api().param_error(field, "长度应在" .. (min or 1) .. "到" .. max
                                  .. "之间", v)
  end
  return true
end

local function int(v, field, min)
  if type(v) ~= "number" or v ~= math_floor(v) or v < min or v > 1e12 then
    return nil, api().param_error(field, "应为不小于" .. min .. "的整数", v)
  end
  return true
end

-- e, its Request-ID ending in api.SUFFIX[name]: an answer WeChat gives
-- a code of its own, not its error code's
local function with_suffix(e, name)
  e.suffix = api().SUFFIX[name]
  return e
end

-- A key the API does not define, at field
local function extra(field)
  return with_suffix(api().param_error(field, "参数中含有非法的额外参数"),
                     "EXTRA")
end

local function only_keys(body, allowed)
  for k in pairs(body) do
    if not allowed[k] then
      return nil, extra("/" .. tostring(k))
    end
  end
  return true
end

local function set_of(list)
  local t = {}
  for _, k in ipairs(list) do t[k] = true end
  return t
end

-- A JSON object is a table that is not a non-empty array ({} and []
-- decode alike).
local function is_object(v)
  return type(v) == "table" and (next(v) == nil or not validate.is_array(v))
end

-- The checks of a nested object's fields: check(t, key, field) -> true,
-- or nil, e (a PARAM_ERROR naming field): a string of min..max
-- characters, an integer >= min, a boolean, one of values.
local REQ = true
local function a_string(min, max, required)
  return function(t, k, field) return str(t, k, max, required, field, min) end
end
local function an_int(min, required)
  return function(t, k, field)
    if t[k] == nil then
      if not required then return true end
      return nil, api().param_error(field, "此字段为必填项")
    end
    return int(t[k], field, min)
  end
end
local function a_bool(t, k, field)
  if t[k] == nil or type(t[k]) == "boolean" then return true end
  return nil, api().param_error(field, "应为布尔值", t[k])
end
local function one_of(values, required)
  local set = {}
  for _, v in ipairs(values) do set[v] = true end
  local issue = "应为" .. table.concat(values, "或")
  return function(t, k, field)
    local v = t[k]
    if v == nil and not required then return true end
    if v == nil then return nil, api().param_error(field, "此字段为必填项") end
    if type(v) ~= "string" or not set[v] then
      return nil, api().param_error(field, issue, v)
    end
    return true
  end
end
local KNOWN = false             -- a key the endpoint's own code checks

local function sorted_keys(t)
  local l = {}
  for k in pairs(t) do l[#l + 1] = k end
  table.sort(l)
  return l
end

-- The objects nested in a request body, with every key WeChat defines
-- for them: an unknown key in one is refused as one at the top level is,
-- naming its path ("/amount/foo"; an array item by its index from 0,
-- "/detail/goods_detail/0/foo"). A client that misspells a nested key
-- (amount.totl) would otherwise pass here and fail only in production.
-- Then each field's type (a string, an integer, ...), and the object or
-- array a shape says a value is: an array of objects has at least one
-- item, each an object.
-- shape: { fields = { key = check or KNOWN }, children = { key = the
-- shape of its value } } or, for an array of objects, { items = shape }.
local function obj(fields, children)
  return { fields = fields, names = sorted_keys(fields),
           children = children or EMPTY,
           child_names = sorted_keys(children or EMPTY) }
end
local function items(shape) return { items = shape } end

local function goods(extra)
  local t = { merchant_goods_id = a_string(1, 32, REQ),
              wechatpay_goods_id = a_string(nil, 32),
              goods_name = a_string(nil, 256),
              unit_price = an_int(0, REQ) }
  for k, v in pairs(extra) do t[k] = v end
  return obj(t)
end

local NESTED_COMMON = {
  amount = obj({ total = KNOWN, currency = KNOWN }),
  detail = obj({ cost_price = an_int(0), invoice_id = a_string(nil, 32),
                 goods_detail = KNOWN }, {
    goods_detail = items(goods({ quantity = an_int(1, REQ) })) }),
  scene_info = obj({ payer_client_ip = KNOWN, device_id = a_string(nil, 32),
                     store_info = KNOWN, h5_info = KNOWN }, {
    store_info = obj({ id = a_string(1, 32, REQ),
                       name = a_string(nil, 256),
                       area_code = a_string(nil, 32),
                       address = a_string(nil, 512) }),
    h5_info = obj({ type = one_of({ "iOS", "Android", "Wap" }),
                    app_name = a_string(nil, 64), app_url = a_string(nil, 512),
                    bundle_id = a_string(nil, 256),
                    package_name = a_string(nil, 256) }) }),
  settle_info = obj({ profit_sharing = a_bool }),
}
-- payer differs by mode: a direct merchant's payer is openid; a service
-- provider's, sp_openid or sub_openid. PREPAY_NESTED[partner]
local function with_payer(payer)
  local t = { payer = payer }
  for k, v in pairs(NESTED_COMMON) do t[k] = v end
  return t
end
local PREPAY_NESTED = {
  [false] = with_payer(obj({ openid = a_string(1, 128) })),
  [true] = with_payer(obj({ sp_openid = a_string(1, 128),
                            sub_openid = a_string(1, 128) })) }

local REFUND_NESTED = {
  amount = obj({ refund = KNOWN, from = KNOWN, total = KNOWN,
                 currency = KNOWN }, {
    from = items(obj({ account = one_of({ "AVAILABLE", "UNAVAILABLE" }, REQ),
                       amount = an_int(1, REQ) })) }),
  goods_detail = items(goods({ refund_amount = an_int(0, REQ),
                               refund_quantity = an_int(1, REQ) })),
}

-- v against shape, below path: the first unknown key (in sorted order:
-- the same request always names the same field), else the first field
-- of the wrong type or missing, in the same order.
local function nested(v, shape, path)
  local a = api()
  if shape.items then
    if type(v) ~= "table" or not validate.is_array(v) then
      return nil, a.param_error(path, "应为数组", v)
    end
    if v[1] == nil then
      return nil, a.param_error(path, "应为至少含1项的数组", v)
    end
    for i = 1, #v do
      local ok, e = nested(v[i], shape.items, path .. "/" .. (i - 1))
      if not ok then return nil, e end
    end
    return true
  end
  if not is_object(v) then return nil, a.param_error(path, "应为对象", v) end
  local bad
  for k in pairs(v) do
    local name = tostring(k)
    if shape.fields[k] == nil and (bad == nil or name < bad) then
      bad = name
    end
  end
  if bad then
    return nil, extra(path .. "/" .. bad)
  end
  for _, k in ipairs(shape.names) do
    local check = shape.fields[k]
    if check then
      local ok, e = check(v, k, path .. "/" .. k)
      if not ok then return nil, e end
    end
  end
  for _, k in ipairs(shape.child_names) do
    if v[k] ~= nil then
      local ok, e = nested(v[k], shape.children[k], path .. "/" .. k)
      if not ok then return nil, e end
    end
  end
  return true
end

-- Every nested object or array of body that a shape of nested (a table
-- key -> shape) names, in sorted order.
local NESTED_NAMES = setmetatable({}, { __mode = "k" })
local function nested_objects(body, shapes)
  local names = NESTED_NAMES[shapes]
  if not names then
    names = sorted_keys(shapes)
    NESTED_NAMES[shapes] = names
  end
  for _, k in ipairs(names) do
    if body[k] ~= nil then
      local ok, e = nested(body[k], shapes[k], "/" .. k)
      if not ok then return nil, e end
    end
  end
  return true
end

local PREPAY_COMMON = { "description", "out_trade_no", "time_expire",
  "attach", "notify_url", "goods_tag", "support_fapiao", "limit_pay",
  "amount", "payer", "detail", "scene_info", "settle_info" }
local DIRECT_KEYS = set_of(PREPAY_COMMON)
DIRECT_KEYS.appid, DIRECT_KEYS.mchid = true, true
local PARTNER_KEYS = set_of(PREPAY_COMMON)
for _, k in ipairs({ "sp_appid", "sp_mchid", "sub_appid", "sub_mchid" }) do
  PARTNER_KEYS[k] = true
end
-- payer (who pays, by openid inside WeChat) is in the JSAPI prepay's body
-- alone: on a native, H5 or App prepay it is a key the API does not
-- define, refused as any other. PREPAY_KEYS[partner][jsapi]
local function without(set, key)
  local t = {}
  for k in pairs(set) do t[k] = k ~= key or nil end
  return t
end
local PREPAY_KEYS = {
  [false] = { [true] = DIRECT_KEYS, [false] = without(DIRECT_KEYS, "payer") },
  [true] = { [true] = PARTNER_KEYS, [false] = without(PARTNER_KEYS, "payer") },
}

-- The caller may act for mchid: itself, or as service provider for
-- sub_mchid. returns: owner (the merchant that owns the orders), or nil, e.
-- A field as detail.field names it: a body field as a JSON pointer, a
-- query parameter by its name. where: "body" (nil) or "query".
local function field_at(where, name)
  return (where == "query" and "" or "/") .. name
end

-- (no closure made per call: a function created here, on every order
-- query, kept the JIT from compiling the query path)
local function owner_for(c, mchid, sub_mchid, where)
  where = where or "body"
  local m = c.m
  if sub_mchid ~= nil then
    if mchid ~= m.mchid then
      return nil, api().invalid(field_at(where, "sp_mchid"),
        "sp_mchid与Authorization中的商户号不一致", nil, where)
    end
    if type(sub_mchid) ~= "string" or not m.sub[sub_mchid] then
      return nil, with_suffix(api().invalid(field_at(where, "sub_mchid"),
                                            "受理关系不存在", nil, where),
                              "NO_RELATION")
    end
    return sub_mchid
  end
  if mchid ~= m.mchid then
    return nil, api().invalid(field_at(where, "mchid"),
      "mchid与Authorization中的商户号不一致", nil, where)
  end
  return m.mchid
end

-- prepay ------------------------------------------------------------------

local function check_prepay(c, body, trade_type, partner)
  local a = api()
  local ok, e = only_keys(body,
    PREPAY_KEYS[partner and true or false][trade_type == "JSAPI"])
  if not ok then return nil, e end
  ok, e = nested_objects(body, PREPAY_NESTED[partner and true or false])
  if not ok then return nil, e end
  local appid_key = partner and "sp_appid" or "appid"
  local mchid_key = partner and "sp_mchid" or "mchid"
  for _, f in ipairs({ { appid_key, 32 }, { mchid_key, 32 },
                       { "description", 127 }, { "notify_url", 255 } }) do
    ok, e = str(body, f[1], f[2], true)
    if not ok then return nil, e end
  end
  if partner then
    ok, e = str(body, "sub_mchid", 32, true)
    if not ok then return nil, e end
    ok, e = str(body, "sub_appid", 32, false)
    if not ok then return nil, e end
  end
  local no = body.out_trade_no
  if no == nil then return nil, a.param_error("/out_trade_no", "此字段为必填项") end
  if type(no) ~= "string" or #no < 6 or #no > 32
     or not no:match("^[%w_%-|*]+$") then
    return nil, a.param_error("/out_trade_no",
      "应为6到32位的数字、大小写字母、_-|*", no)
  end
  if type(body.amount) ~= "table" then
    return nil, a.param_error("/amount", "此字段为必填项")
  end
  ok, e = int(body.amount.total, "/amount/total", 1)
  if not ok then return nil, e end
  if body.amount.currency ~= nil and body.amount.currency ~= "CNY" then
    return nil, a.param_error("/amount/currency", "Currency code is invalid",
                              body.amount.currency)
  end
  ok, e = check_url(body.notify_url, c)
  if not ok then return nil, a.param_error("/notify_url", e, body.notify_url) end
  for _, f in ipairs({ { "attach", 128 }, { "goods_tag", 32 } }) do
    ok, e = str(body, f[1], f[2], false)
    if not ok then return nil, e end
  end
  ok, e = a_bool(body, "support_fapiao", "/support_fapiao")
  if not ok then return nil, e end
  local limit = body.limit_pay
  if limit ~= nil then
    if type(limit) ~= "table" or not validate.is_array(limit)
       or limit[1] == nil then
      return nil, a.param_error("/limit_pay", "应为至少含1项的数组", limit)
    end
    for i = 1, #limit do
      ok, e = str(limit, i, 32, true, "/limit_pay/" .. (i - 1))
      if not ok then return nil, e end
    end
  end
  local expire
  if body.time_expire ~= nil then
    expire = parse_time(body.time_expire)
    if not expire then
      return nil, a.param_error("/time_expire", "应为RFC3339格式的时间，如"
        .. "2018-06-08T10:34:56+08:00", body.time_expire)
    end
    if expire <= c.now then
      return nil, a.param_error("/time_expire", "订单失效时间应晚于当前时间",
                                body.time_expire)
    end
    -- at least time_expire_min ahead: WeChat has been reported to refuse
    -- one less than a minute ahead (a community report)
    local min = S.config.time_expire_min
    if min > 0 and expire - c.now < min then
      local secs = min % 1 == 0 and ("%.0f"):format(min) or ("%g"):format(min)
      return nil, a.param_error("/time_expire", "订单失效时间应至少晚于当前"
        .. "时间" .. secs .. "秒", body.time_expire)
    end
  end
  if body.payer ~= nil and type(body.payer) ~= "table" then
    return nil, a.param_error("/payer", "应为对象")
  end
  local payer = body.payer or {}
  if trade_type == "JSAPI" then
    if partner then
      if payer.sp_openid == nil and payer.sub_openid == nil then
        return nil, a.param_error("/payer/sp_openid",
          "JSAPI支付必须传sp_openid或sub_openid")
      end
      if payer.sub_openid ~= nil and body.sub_appid == nil then
        return nil, a.param_error("/sub_appid", "传sub_openid时必须传sub_appid")
      end
    elseif type(payer.openid) ~= "string" or payer.openid == ""
           or #payer.openid > 128 then
      return nil, with_suffix(a.param_error("/payer/openid",
        "JSAPI支付必须传openid"), "OPENID")
    end
  end
  local scene = body.scene_info
  if scene ~= nil then
    if type(scene) ~= "table" or type(scene.payer_client_ip) ~= "string"
       or scene.payer_client_ip == "" then
      return nil, a.param_error("/scene_info/payer_client_ip", "此字段为必填项")
    end
    if not validate.ip_address(scene.payer_client_ip) then
      return nil, a.param_error("/scene_info/payer_client_ip",
                                "IP地址格式不正确", a.shown(scene.payer_client_ip, 64))
    end
  end
  if trade_type == "MWEB" then
    local h5 = type(scene) == "table" and scene.h5_info
    if type(h5) ~= "table" then
      return nil, a.param_error("/scene_info/h5_info", "H5支付必须传h5_info")
    end
    if h5.type ~= "iOS" and h5.type ~= "Android" and h5.type ~= "Wap" then
      return nil, a.param_error("/scene_info/h5_info/type",
        "应为iOS、Android或Wap", h5.type)
    end
  end
  -- who, and the appids they may use
  local owner
  owner, e = owner_for(c, body[mchid_key], partner and body.sub_mchid or nil)
  if not owner then return nil, e end
  if not c.m.appids[body[appid_key]] then
    return nil, a.err(400, "APPID_MCHID_NOT_MATCH", "appid和mch_id不匹配",
      { field = "/" .. appid_key, location = "body" })
  end
  if partner and body.sub_appid ~= nil
     and not c.m.sub[owner].appids[body.sub_appid] then
    return nil, a.err(400, "APPID_MCHID_NOT_MATCH", "sub_appid和sub_mchid不匹配",
      { field = "/sub_appid", location = "body" })
  end
  return owner, expire
end

local function new_prepay(trade_type, now)
  local id = "wx" .. beijing_stamp(now)
             .. crypto.hex(crypto.random_bytes(11))
  if trade_type == "MWEB" then
    return id, { h5_url = "https://wx.tenpay.com/cgi-bin/mmpayweb-bin/"
      .. "checkmweb?prepay_id=" .. id .. "&package=" .. random_digits(10) }
  elseif trade_type == "NATIVE" then
    return id, { code_url = "weixin://wxpay/bizpayurl?pr="
                            .. crypto.random_nonce(9) }
  end
  return id, { prepay_id = id }
end

-- What a prepay handed out, kept for the payer's client (sim.payer): its
-- prepay_id, and the code_url or h5_url when it answered one.
local function record_link(tx, order_id, prepay_id, answer, now)
  assert(tx:exec("INSERT INTO sim_pay_links (order_id, prepay_id, url, "
    .. "created_at) VALUES ($1, $2, $3, $4)", { n = 4, order_id, prepay_id,
    answer.code_url or answer.h5_url, now }))
end

-- Closes an order whose time_expire passed (inside tx). returns the row.
local function expire(tx, o, now)
  if (o.trade_state == "NOTPAY" or o.trade_state == "PAYERROR")
     and o.time_expire and o.time_expire <= now then
    assert(tx:exec("UPDATE sim_orders SET trade_state = 'CLOSED', "
      .. "closed_at = $1 WHERE id = $2 AND trade_state = $3",
      { o.time_expire, o.id, o.trade_state }))
    o.trade_state = "CLOSED"
    o.closed_at = o.time_expire
  end
  return o
end

local function prepay(req, c, trade_type, partner)
  local a = api()
  local body = c.body
  local owner, expire_at = check_prepay(c, body, trade_type, partner)
  if not owner then return nil, expire_at end
  local appid = partner and body.sp_appid or body.appid
  local hash = digest(body)
  local payer = type(body.payer) == "table" and body.payer or {}
  return S.db:transaction(function(tx)
    local rows = assert(tx:query("SELECT * FROM sim_orders WHERE owner = $1 "
      .. "AND out_trade_no = $2", { owner, body.out_trade_no }))
    local o = rows[1]
    local id, answer = new_prepay(trade_type, c.now)
    if o then
      o = expire(tx, o, c.now)
      if o.appid ~= appid or o.trade_type ~= trade_type
         or (o.sp_mchid or "") ~= (partner and c.m.mchid or "") then
        return nil, a.err(403, "OUT_TRADE_NO_USED", "商户订单号重复",
                          { field = "/out_trade_no", location = "body" })
      end
      if o.trade_state == "SUCCESS" or o.trade_state == "REFUND" then
        return nil, with_suffix(a.err(400, "ORDER_PAID", "该订单已支付"),
                                "PAID_AGAIN")
      end
      if o.trade_state == "CLOSED" then
        return nil, a.err(400, "ORDER_CLOSED", "订单已关闭")
      end
      if o.params_hash ~= hash then
        return nil, with_suffix(a.invalid("/out_trade_no",
          "请求重入时，参数与首次请求时不一致"), "REENTRY")
      end
      assert(tx:exec("UPDATE sim_orders SET prepay_id = $1 WHERE id = $2",
                     { id, o.id }))
      record_link(tx, o.id, id, answer, c.now)
      return 200, answer
    end
    local ins = assert(tx:exec("INSERT INTO sim_orders (owner, sp_mchid, "
      .. "appid, sub_appid, out_trade_no, trade_type, trade_state, prepay_id, "
      .. "description, attach, notify_url, total, currency, openid, "
      .. "sub_openid, time_expire, params_hash, request, created_at) VALUES "
      .. "($1, $2, $3, $4, $5, $6, 'NOTPAY', $7, $8, $9, $10, $11, $12, $13, "
      .. "$14, $15, $16, $17, $18)", { n = 18,
        owner, partner and c.m.mchid or nil, appid, body.sub_appid,
        body.out_trade_no, trade_type, id, body.description, body.attach,
        body.notify_url, body.amount.total, body.amount.currency or "CNY",
        partner and payer.sp_openid or payer.openid, payer.sub_openid,
        expire_at, hash, c.req.body, c.now }))
    record_link(tx, ins.last_id, id, answer, c.now)
    return 200, answer
  end)
end

-- the Transaction object ------------------------------------------------------

--- syntax: p = orders.promotion(o)
-- The discount of an order paid for less than its total (the control
-- API's payer_total): one promotion, a whole-order (GLOBAL) recharge
-- coupon (CASH, so the amounts to settle stay the total's) the merchant
-- funded, of total - payer_total. nil for an order paid in full or not
-- paid. Its ids are the simulator's own, made from the transaction_id.
function _M.promotion(o)
  local paid = o.payer_total or o.total
  if not o.transaction_id or paid >= o.total then return nil end
  local amount = o.total - paid
  return { coupon_id = o.transaction_id:sub(-10), name = "模拟器优惠",
           scope = "GLOBAL", type = "CASH", amount = amount,
           stock_id = o.transaction_id:sub(-8), wechatpay_contribute = 0,
           merchant_contribute = amount, other_contribute = 0,
           currency = o.currency or "CNY" }
end

--- syntax: t = orders.transaction(o) -- the query answer for an order row
function _M.transaction(o)
  -- the stored request is decoded only when it may hold what the answer
  -- echoes (scene_info.device_id; a key can also be spelt with \u escapes)
  local r = o.request
  local req = r and (r:find("scene_info", 1, true) or r:find("\\u", 1, true))
              and json.decode(r) or EMPTY
  local paid = o.trade_state == "SUCCESS" or o.trade_state == "REFUND"
  -- an unpaid order's answer, as WeChat gives it, carries amount.total and
  -- payer_currency but no amount.currency, and no attach at all (not even
  -- ""): a client must not count on either before payment
  local notpay = o.trade_state == "NOTPAY"
  local t = {
    out_trade_no = o.out_trade_no,
    trade_state = o.trade_state,
    trade_state_desc = DESC[o.trade_state],
    amount = { total = o.total, currency = not notpay and o.currency or nil,
               payer_currency = o.currency },
  }
  if o.sp_mchid then
    t.sp_appid, t.sp_mchid, t.sub_mchid = o.appid, o.sp_mchid, o.owner
    t.sub_appid = o.sub_appid
  else
    t.appid, t.mchid = o.appid, o.owner
  end
  if not notpay then t.attach = o.attach or "" end
  if o.transaction_id then t.transaction_id = o.transaction_id end
  if paid or o.trade_state == "PAYERROR" then
    t.trade_type = o.trade_type
    t.bank_type = o.bank_type or "OTHERS"
    -- payer only with an openid to show: an order that failed before
    -- anyone was known (a NATIVE or H5 order, PAYERROR) has none, and an
    -- empty payer {} is no shape WeChat sends (optional fields are left
    -- out, not sent empty)
    if o.sp_mchid and (o.openid or o.sub_openid) then
      t.payer = { sp_openid = o.openid, sub_openid = o.sub_openid }
    elseif not o.sp_mchid and o.openid then
      t.payer = { openid = o.openid }
    end
  end
  if paid then
    t.success_time = rfc3339(o.success_at)
    t.amount.payer_total = o.payer_total or o.total
  end
  -- promotion_detail: present in every state, as in WeChat's answers (a
  -- real NOTPAY one carries "promotion_detail": []); the discount of an
  -- order paid for less than its total is its one promotion
  local p = paid and _M.promotion(o)
  t.promotion_detail = p and { p } or EMPTY_ARRAY
  -- scene_info: the prepay's device_id; an unpaid order's answer carries
  -- it in any case, "" when none was given (a real NOTPAY answer holds
  -- "scene_info": {"device_id": ""}). Other states: only one given.
  local device = type(req.scene_info) == "table"
                 and req.scene_info.device_id or nil
  if device or notpay then
    t.scene_info = { device_id = device or "" }
  end
  return t
end

-- An order is found by who placed it: its owner and its service provider
-- (sp nil: a direct order). A provider does not see the sub-merchant's
-- direct orders or another provider's (a sub-merchant that changed
-- provider, or became a direct merchant, across restarts on one state),
-- nor does a direct merchant see orders placed for it by a provider.
local FIND_ORDER = {
  transaction_id = "SELECT * FROM sim_orders WHERE owner = $1 AND "
                   .. "sp_mchid IS $2 AND transaction_id = $3",
  out_trade_no = "SELECT * FROM sim_orders WHERE owner = $1 AND "
                 .. "sp_mchid IS $2 AND out_trade_no = $3",
}

local function find_order(tx, owner, sp, by, value)
  local rows = assert(tx:query(FIND_ORDER[by] or FIND_ORDER.out_trade_no,
                               { n = 3, owner, sp, value }))
  return rows[1]
end

-- an order whose time_expire passed is closed when it is next looked at
-- (a function of its own: a closure in query() would keep the JIT from
-- compiling the query path)
local function query_expired(owner, sp, by, key, now)
  return S.db:transaction(function(tx)
    local cur = find_order(tx, owner, sp, by, key)
    return 200, _M.transaction(expire(tx, cur, now))
  end)
end

-- GET .../id/{transaction_id} and .../out-trade-no/{out_trade_no}
local function query(req, c, by, partner)
  local a = api()
  local q = c.query
  local owner, e
  if partner then
    if q.sp_mchid == nil or q.sub_mchid == nil then
      local f = q.sp_mchid == nil and "sp_mchid" or "sub_mchid"
      return nil, a.param_error(f, "此字段为必填项", nil, "query")
    end
    owner, e = owner_for(c, q.sp_mchid, q.sub_mchid, "query")
  else
    if q.mchid == nil then
      return nil, a.err(400, "PARAM_ERROR", "输入源“/uri_template/mchid”映射到"
        .. "字段“直连商户号”必填性规则校验失败，此字段为必填项",
        { field = "mchid", location = "query", issue = "此字段为必填项" })
    end
    owner, e = owner_for(c, q.mchid, nil, "query")
  end
  if not owner then return nil, e end
  local key = c.params.id
  local sp = partner and c.m.mchid or nil
  -- a read (reader thread); a write transaction only to close an order
  -- whose time_expire passed
  local o = find_order(S.db, owner, sp, by, key)
  if not o then return nil, a.err(404, "ORDER_NOT_EXIST", "订单不存在") end
  if (o.trade_state == "NOTPAY" or o.trade_state == "PAYERROR")
     and o.time_expire and o.time_expire <= c.now then
    return query_expired(owner, sp, by, key, c.now)
  end
  return 200, _M.transaction(o)
end

-- POST .../out-trade-no/{out_trade_no}/close
local function close(req, c, partner)
  local a = api()
  local b = c.body
  local ok, e = only_keys(b, partner and set_of({ "sp_mchid", "sub_mchid" })
                          or set_of({ "mchid" }))
  if not ok then return nil, e end
  ok, e = str(b, partner and "sp_mchid" or "mchid", 32, true)
  if not ok then return nil, e end
  if partner then
    ok, e = str(b, "sub_mchid", 32, true)
    if not ok then return nil, e end
  end
  local owner
  owner, e = owner_for(c, partner and b.sp_mchid or b.mchid,
                       partner and b.sub_mchid or nil)
  if not owner then return nil, e end
  local no = c.params.id
  return S.db:transaction(function(tx)
    local o = find_order(tx, owner, partner and c.m.mchid or nil,
                         "out_trade_no", no)
    if not o then return nil, a.err(404, "ORDER_NOT_EXIST", "订单不存在") end
    o = expire(tx, o, c.now)
    if o.trade_state == "SUCCESS" or o.trade_state == "REFUND" then
      return nil, a.err(400, "ORDER_PAID", "订单已支付")
    end
    if o.trade_state ~= "CLOSED" then
      assert(tx:exec("UPDATE sim_orders SET trade_state = 'CLOSED', "
        .. "closed_at = $1 WHERE id = $2", { c.now, o.id }))
    end
    return 204, nil
  end)
end

-- refunds -------------------------------------------------------------------

local REFUND_KEYS = set_of({ "sub_mchid", "transaction_id", "out_trade_no",
  "out_refund_no", "reason", "notify_url", "funds_account", "amount",
  "goods_detail" })

-- What the payer paid of the first x fen of an order's total: all of it
-- when the payer paid the total; of an order paid with a discount (the
-- control API's payer_total below the total), its share, rounded down.
local function payer_share(x, o)
  local paid = o.payer_total or o.total
  if paid >= o.total then return x end
  return math_floor(x * paid / o.total)
end

-- The part of a refund the payer gets back (amount.payer_refund), fixed
-- when the refund is made (new_payer_refund): the payer's share of what
-- the order's refunds (not CLOSED) come to with it, less what those
-- refunds give the payer back already. Refunds that take back the whole
-- total give back exactly payer_total, never more, a refund closed among
-- them or not. The rest is the discount's (discount_refund). A row made
-- before the column was kept: its own share, rounded down.
local function payer_refund(f, o)
  return f.payer_refund or payer_share(f.refund, o)
end
_M.payer_refund = payer_refund

-- payer_refund of a new refund of `refund` fen of order o (inside tx,
-- before the refund's row is written).
local function new_payer_refund(tx, o, refund)
  local paid = o.payer_total or o.total
  if paid >= o.total then return refund end
  local given = 0
  for _, f in ipairs(assert(tx:query("SELECT refund, payer_refund FROM "
      .. "sim_refunds WHERE order_id = $1 AND status <> 'CLOSED'",
      { o.id }))) do
    given = given + payer_refund(f, o)
  end
  local p = payer_share(o.refunded + refund, o) - given
  return p < 0 and 0 or p > refund and refund or p
end

-- promotion_detail of a refund: [] for an order paid in full; for one
-- paid with a discount, the one promotion that discount stands for
-- (orders.promotion), with what this refund takes back of it.
local function refund_promotions(f, o)
  local p = _M.promotion(o)
  if not p then return EMPTY_ARRAY end
  return { { promotion_id = p.coupon_id, scope = p.scope, type = p.type,
             amount = p.amount,
             refund_amount = f.refund - payer_refund(f, o) } }
end

--- syntax: r = orders.refund_object(f, o) -- a refund row as the API shows it
-- amount.from echoes the request's (the stored JSON text, or a table on
-- the row being made), [] when it had none.
function _M.refund_object(f, o)
  local from = f.amount_from
  if type(from) == "string" then from = json.decode(from) end
  local payer = payer_refund(f, o)
  local r = {
    refund_id = f.refund_id, out_refund_no = f.out_refund_no,
    transaction_id = o.transaction_id, out_trade_no = o.out_trade_no,
    channel = "ORIGINAL", user_received_account = "支付用户零钱",
    create_time = rfc3339(f.created_at), status = f.status,
    funds_account = f.funds_account or "UNSETTLED",
    amount = { total = f.total, refund = f.refund,
               from = type(from) == "table" and from or EMPTY_ARRAY,
               payer_total = o.payer_total or o.total, payer_refund = payer,
               settlement_total = o.total, settlement_refund = f.refund,
               discount_refund = f.refund - payer, refund_fee = 0,
               currency = f.currency },
    promotion_detail = refund_promotions(f, o),
  }
  if f.success_at then r.success_time = rfc3339(f.success_at) end
  return r
end

-- The resource of a refund notification: the fields WeChat's refund
-- notification carries (no amount.from, no promotion_detail there).
local function refund_resource(f, o)
  local r = {
    out_trade_no = o.out_trade_no, transaction_id = o.transaction_id,
    out_refund_no = f.out_refund_no, refund_id = f.refund_id,
    refund_status = f.status, user_received_account = "支付用户零钱",
    amount = { total = f.total, refund = f.refund,
               payer_total = o.payer_total or o.total,
               payer_refund = payer_refund(f, o) },
  }
  if o.sp_mchid then r.sp_mchid, r.sub_mchid = o.sp_mchid, o.owner
  else r.mchid = o.owner end
  if f.status == "SUCCESS" then r.success_time = rfc3339(f.success_at) end
  return r
end

-- where: "body" (the default) or "query", where sub_mchid came from
local function refund_owner(c, sub, where)
  if sub == nil then return c.m.mchid end
  if type(sub) ~= "string" or not c.m.sub[sub] then
    return nil, with_suffix(api().invalid(field_at(where, "sub_mchid"),
      "受理关系不存在", nil, where or "body"), "NO_RELATION")
  end
  return sub
end

-- Makes refund f of order o (inside tx, its checks passed: paid, within
-- a year, at most what is left, fewer than 50 refunds), PROCESSING, and
-- moves the order to REFUND. f: owner, sp_mchid, out_refund_no, refund
-- (fen), reason, notify_url, funds_account, amount_from (JSON text),
-- params_hash. The refund API's and the control API's (a refund made in
-- the merchant platform) alike. returns: f, completed as a refund row.
-- Why order o (its expiry applied) takes no refund of amount now, as
-- WeChat judges one whoever asks (the refund API, the merchant platform):
-- "unpaid", "too_old" (past REFUND_WINDOW after the payment), "exceeds"
-- (more than is left), "too_many" (MAX_REFUNDS made), or nil.
local function refund_refusal(tx, o, amount, now)
  if o.trade_state ~= "SUCCESS" and o.trade_state ~= "REFUND" then
    return "unpaid"
  end
  if o.success_at and now - o.success_at > REFUND_WINDOW then
    return "too_old"
  end
  if amount > o.total - o.refunded then return "exceeds" end
  local n = assert(tx:query("SELECT COUNT(*) AS n FROM sim_refunds WHERE "
                            .. "order_id = $1", { o.id }))[1].n
  if n >= MAX_REFUNDS then return "too_many" end
  return nil
end

local function insert_refund(tx, o, f, now)
  local settle = S.config.refund_settle_after
  f.order_id, f.status, f.total, f.currency = o.id, "PROCESSING", o.total,
                                               "CNY"
  f.refund_id = "50" .. beijing_stamp(now):sub(1, 8) .. random_digits(20)
  f.payer_refund = new_payer_refund(tx, o, f.refund)
  f.created_at = now
  f.settle_after = settle and (now + settle) or nil
  assert(tx:exec("INSERT INTO sim_refunds (owner, sp_mchid, order_id, "
    .. "refund_id, out_refund_no, status, refund, total, currency, reason, "
    .. "notify_url, funds_account, params_hash, created_at, settle_after, "
    .. "amount_from, payer_refund) VALUES ($1, $2, $3, $4, $5, "
    .. "'PROCESSING', $6, $7, 'CNY', $8, $9, $10, $11, $12, $13, $14, $15)",
    { n = 15, f.owner, f.sp_mchid, o.id, f.refund_id, f.out_refund_no,
      f.refund, f.total, f.reason, f.notify_url, f.funds_account,
      f.params_hash, now, f.settle_after, f.amount_from, f.payer_refund }))
  assert(tx:exec("UPDATE sim_orders SET refunded = refunded + $1, "
    .. "trade_state = 'REFUND' WHERE id = $2", { f.refund, o.id }))
  o.refunded = o.refunded + f.refund
  o.trade_state = "REFUND"
  return f
end

local function create_refund(req, c)
  local a = api()
  local b = c.body
  local ok, e = only_keys(b, REFUND_KEYS)
  if not ok then return nil, e end
  ok, e = nested_objects(b, REFUND_NESTED)
  if not ok then return nil, e end
  local no = b.out_refund_no
  if no == nil then return nil, a.param_error("/out_refund_no", "此字段为必填项") end
  if type(no) ~= "string" or #no > 64 or not no:match("^[%w_%-|*@]+$") then
    return nil, a.param_error("/out_refund_no",
      "应为1到64位的数字、大小写字母、_-|*@", no)
  end
  if b.transaction_id == nil and b.out_trade_no == nil then
    return nil, a.param_error("/transaction_id",
      "transaction_id和out_trade_no必须二选一")
  end
  -- an id given is not empty: "" was looked up and answered 404 订单不存在
  -- (a transaction_id "" beside the order's out_trade_no as well)
  for _, f in ipairs({ { "transaction_id", 32, 1 }, { "out_trade_no", 32, 1 },
                       { "reason", 80 } }) do
    ok, e = str(b, f[1], f[2], false, nil, f[3])
    if not ok then return nil, e end
  end
  if b.notify_url ~= nil then
    -- a string of UTF-8 first, as a prepay's: check_url alone took any
    -- bytes (and called a number "longer than 255 bytes")
    ok, e = str(b, "notify_url", 255, false)
    if not ok then return nil, e end
    ok, e = check_url(b.notify_url, c)
    if not ok then return nil, a.param_error("/notify_url", e, b.notify_url) end
  end
  if b.funds_account ~= nil and b.funds_account ~= "AVAILABLE" then
    return nil, a.param_error("/funds_account", "应为AVAILABLE",
                              b.funds_account)
  end
  if type(b.amount) ~= "table" then
    return nil, a.param_error("/amount", "此字段为必填项")
  end
  ok, e = int(b.amount.refund, "/amount/refund", 1)
  if not ok then return nil, e end
  ok, e = int(b.amount.total, "/amount/total", 1)
  if not ok then return nil, e end
  if b.amount.currency ~= "CNY" then
    return nil, a.param_error("/amount/currency", "Currency code is invalid",
                              b.amount.currency)
  end
  -- amount.from (its items' shape checked above): WeChat's refund API
  -- wants the accounts' amounts to add up to the refund, each account
  -- named once, and refuses it otherwise
  if b.amount.from ~= nil then
    local sum, seen = 0, {}
    for i, item in ipairs(b.amount.from) do
      if seen[item.account] then
        return nil, a.param_error("/amount/from/" .. (i - 1) .. "/account",
          "出资账户类型不能重复", item.account)
      end
      seen[item.account] = true
      sum = sum + item.amount
    end
    if sum ~= b.amount.refund then
      return nil, a.param_error("/amount/from",
        "各账户出资金额之和应等于退款金额：" .. string.format("%.0f",
        b.amount.refund), string.format("%.0f", sum))
    end
  end
  local owner
  owner, e = refund_owner(c, b.sub_mchid)
  if not owner then return nil, e end
  local sp = b.sub_mchid and c.m.mchid or nil
  local hash = digest(b)
  return S.db:transaction(function(tx)
    local rows = assert(tx:query("SELECT * FROM sim_refunds WHERE owner = $1 "
      .. "AND out_refund_no = $2", { owner, no }))
    local f = rows[1]
    if f and f.sp_mchid ~= sp then
      -- the merchant's out_refund_no, taken by a refund someone else made
      return nil, a.invalid("/out_refund_no", "商户退款单号已被使用")
    end
    if f then
      if f.params_hash ~= hash then
        return nil, with_suffix(a.invalid("/out_refund_no",
          "请求重入时，参数与首次请求时不一致"), "REENTRY")
      end
      local o = assert(tx:query("SELECT * FROM sim_orders WHERE id = $1",
                                { f.order_id }))[1]
      return 200, _M.refund_object(f, o)
    end
    local o = b.transaction_id
      and find_order(tx, owner, sp, "transaction_id", b.transaction_id)
      or (b.transaction_id == nil
          and find_order(tx, owner, sp, "out_trade_no", b.out_trade_no))
    if not o then
      return nil, a.err(404, "RESOURCE_NOT_EXISTS", "订单不存在")
    end
    -- both ids given: they must name this one order. Taking the first and
    -- ignoring the other would refund an order the caller may not have
    -- meant (a copy-paste of another order's out_trade_no). WeChat's
    -- answer is not known: the simulator's choice (docs/simulator.md)
    if b.transaction_id ~= nil and b.out_trade_no ~= nil
       and b.out_trade_no ~= o.out_trade_no then
      return nil, a.invalid("/out_trade_no", "transaction_id和out_trade_no"
        .. "对应的不是同一笔订单")
    end
    o = expire(tx, o, c.now)
    -- (WeChat takes a refund within a year of the payment only)
    local why = refund_refusal(tx, o, b.amount.refund, c.now)
    if why == "unpaid" then
      return nil, a.invalid("/out_trade_no", "订单未支付，不能退款")
    elseif why == "too_old" then
      return nil, a.invalid("/out_trade_no", "交易时间超过一年的订单无法退款")
    end
    if b.amount.total ~= o.total then
      return nil, a.invalid("/amount/total",
        "退款请求中的原订单金额与订单金额不一致")
    end
    if why == "exceeds" then
      return nil, a.invalid("/amount/refund", "申请退款金额超过订单可退金额")
    elseif why == "too_many" then
      return nil, a.invalid("/out_trade_no", "退款次数超过限制")
    end
    -- a refund asked without a notify_url is notified at the merchant's
    -- platform setting (the Authorization's merchant), when it has one
    f = insert_refund(tx, o, { owner = owner, sp_mchid = sp,
      out_refund_no = no, refund = b.amount.refund, reason = b.reason,
      notify_url = b.notify_url or c.m.refund_notify_url,
      funds_account = b.funds_account,
      amount_from = b.amount.from and json.encode(b.amount.from),
      params_hash = hash }, c.now)
    return 200, _M.refund_object(f, o)
  end)
end

local function query_refund(req, c)
  local a = api()
  local owner, e = refund_owner(c, c.query.sub_mchid, "query")
  if not owner then return nil, e end
  local sp = c.query.sub_mchid and c.m.mchid or nil
  local rows = assert(S.db:query("SELECT * FROM sim_refunds WHERE owner = $1 "
    .. "AND sp_mchid IS $2 AND out_refund_no = $3",
    { n = 3, owner, sp, c.params.id }))
  local f = rows[1]
  if not f then return nil, a.err(404, "RESOURCE_NOT_EXISTS", "退款单不存在") end
  local o = assert(S.db:query("SELECT * FROM sim_orders WHERE id = $1",
                              { f.order_id }))[1]
  return 200, _M.refund_object(f, o)
end

local SUMMARY = { SUCCESS = "退款成功", ABNORMAL = "退款异常",
                  CLOSED = "退款关闭" }

-- Moves a PROCESSING refund to status (inside tx) and enqueues its
-- notification. returns: the refund row, its order and the
-- notification's id (nil without a notify_url), or nil, why.
local function settle_in(tx, f, status, now)
  local res = assert(tx:exec("UPDATE sim_refunds SET status = $1, "
    .. "success_at = $2 WHERE id = $3 AND status = 'PROCESSING'",
    { status, status == "SUCCESS" and now or core.null, f.id }))
  if res.changes ~= 1 then return nil, "not PROCESSING" end
  f.status = status
  f.success_at = status == "SUCCESS" and now or nil
  if status == "CLOSED" then
    assert(tx:exec("UPDATE sim_orders SET refunded = refunded - $1 WHERE "
                   .. "id = $2", { f.refund, f.order_id }))
  end
  local o = assert(tx:query("SELECT * FROM sim_orders WHERE id = $1",
                            { f.order_id }))[1]
  local note
  if f.notify_url then
    note = {
      mchid = o.sp_mchid or o.owner, sub_mchid = o.sp_mchid and o.owner,
      notify_url = f.notify_url, event_type = "REFUND." .. status,
      summary = SUMMARY[status], resource_type = "encrypt-resource",
      original_type = "refund", resource = refund_resource(f, o),
      out_trade_no = o.out_trade_no, out_refund_no = f.out_refund_no }
    local ok, err = notify.enqueue(tx, note)
    if not ok then return nil, err end
  end
  return f, o, note and note.id
end

--- syntax: r, id = orders.settle(out_refund_no, status[, mchid])
-- The control API's settle: PROCESSING -> SUCCESS | ABNORMAL | CLOSED.
-- returns: the refund object and its notification's id (nil when the
-- refund has no notify_url), or nil, { status, code, message }.
function _M.settle(no, status, mchid)
  return S.db:transaction(function(tx)
    local rows
    if mchid then
      rows = assert(tx:query("SELECT * FROM sim_refunds WHERE "
        .. "out_refund_no = $1 AND (owner = $2 OR sp_mchid = $2)",
        { no, mchid }))
    else
      rows = assert(tx:query("SELECT * FROM sim_refunds WHERE "
                             .. "out_refund_no = $1", { no }))
    end
    if not rows[1] then
      return nil, { status = 404, code = "RESOURCE_NOT_EXISTS",
                    message = "no refund " .. no }
    end
    if rows[2] then
      return nil, { status = 409, code = "AMBIGUOUS", message = "two "
        .. "merchants have refund " .. no .. ": add ?mchid=" }
    end
    local f = rows[1]
    if f.status ~= "PROCESSING" then
      return nil, { status = 409, code = "REFUND_" .. f.status, message =
        "refund " .. no .. " is " .. f.status .. ", not PROCESSING" }
    end
    local o, id
    f, o, id = settle_in(tx, f, status, clock.now())
    if not f then
      return nil, { status = 409, code = "CONFLICT", message = tostring(o) }
    end
    return _M.refund_object(f, o), id
  end)
end

local ABNORMAL_KEYS = set_of({ "sub_mchid", "out_refund_no", "type",
  "bank_type", "bank_account", "real_name" })

local function abnormal_refund(req, c)
  local a = api()
  local b = c.body
  local ok, e = only_keys(b, ABNORMAL_KEYS)
  if not ok then return nil, e end
  ok, e = str(b, "out_refund_no", 64, true)
  if not ok then return nil, e end
  if b.type ~= "USER_BANK_CARD" and b.type ~= "MERCHANT_BANK_CARD" then
    return nil, a.param_error("/type", "应为USER_BANK_CARD或MERCHANT_BANK_CARD",
                              b.type)
  end
  if b.type == "USER_BANK_CARD" then
    for _, k in ipairs({ "bank_type", "bank_account", "real_name" }) do
      ok, e = str(b, k, 1024, true)
      if not ok then return nil, e end
    end
    -- bank_account and real_name are encrypted with our key: the request
    -- must name it
    local serial = c.serial
    if serial == nil then
      return nil, a.err(400, "PARAM_ERROR", "HTTP header缺少微信支付平台证书"
        .. "序列号(Wechatpay-Serial)", { field = "Wechatpay-Serial",
        location = "header" })
    end
    local known, k = S.identity.known_serial(serial, c.m.verifier_mode)
    if not known then
      return nil, a.err(400, "PARAM_ERROR", "平台证书序列号Wechatpay-Serial错误",
        { field = "Wechatpay-Serial", location = "header" })
    end
    -- the fields must decrypt with the key Wechatpay-Serial names:
    -- RSA-OAEP, or SM2 in the SM variant
    local decrypt = S.config.sm and crypto.sm2_decrypt or crypto.oaep_decrypt
    for _, f in ipairs({ "bank_account", "real_name" }) do
      local ct = type(b[f]) == "string" and crypto.base64_decode(b[f])
      local plain = ct and decrypt(k.key, ct)
      if not plain then
        return nil, a.param_error("/" .. f, "解密失败：应以Wechatpay-Serial"
          .. "指定的公钥用" .. (S.config.sm and "SM2" or "RSA-OAEP") .. "加密")
      end
    end
  end
  local owner
  owner, e = refund_owner(c, b.sub_mchid)
  if not owner then return nil, e end
  local sp = b.sub_mchid and c.m.mchid or nil
  return S.db:transaction(function(tx)
    local f = assert(tx:query("SELECT * FROM sim_refunds WHERE owner = $1 "
      .. "AND sp_mchid IS $2 AND refund_id = $3",
      { n = 3, owner, sp, c.params.id }))[1]
    if not f or f.out_refund_no ~= b.out_refund_no then
      return nil, a.err(404, "RESOURCE_NOT_EXISTS", "退款单不存在")
    end
    if f.status ~= "ABNORMAL" then
      return nil, a.invalid("/out_refund_no", "退款单状态不是退款异常，"
                            .. "不能发起异常退款")
    end
    local settle = S.config.refund_settle_after
    f.status = "PROCESSING"
    f.settle_after = settle and (c.now + settle) or nil
    assert(tx:exec("UPDATE sim_refunds SET status = 'PROCESSING', "
      .. "settle_after = $1, abnormal_applied = abnormal_applied + 1 "
      .. "WHERE id = $2", { f.settle_after or core.null, f.id }))
    local o = assert(tx:query("SELECT * FROM sim_orders WHERE id = $1",
                              { f.order_id }))[1]
    return 200, _M.refund_object(f, o)
  end)
end

-- the payer (control API) -------------------------------------------------

local function find_for_control(tx, no, mchid)
  local rows
  if mchid then
    rows = assert(tx:query("SELECT * FROM sim_orders WHERE out_trade_no = $1 "
      .. "AND (owner = $2 OR sp_mchid = $2)", { no, mchid }))
  else
    rows = assert(tx:query("SELECT * FROM sim_orders WHERE out_trade_no = $1",
                           { no }))
  end
  if not rows[1] then
    return nil, { status = 404, code = "ORDER_NOT_EXIST",
                  message = "no order " .. no }
  end
  if rows[2] then
    return nil, { status = 409, code = "AMBIGUOUS", message = "two merchants "
      .. "have order " .. no .. ": add ?mchid=" }
  end
  return rows[1]
end

--- syntax: t, err = orders.pay(out_trade_no, opts)
-- The payer pays: NOTPAY (or PAYERROR) -> SUCCESS, and the
-- TRANSACTION.SUCCESS notification is enqueued with it. opts: mchid,
-- payer_total, bank_type, openid, success_at (when the payer paid, epoch
-- seconds: now when absent; never before the order was made: 400
-- PARAM_ERROR naming success_time and the create time), created_at (when
-- the order was made, epoch seconds, earlier than its prepay: an order
-- made long ago), order_id (the order by its row id instead, as the
-- payer's client found it: sim.payer; out_trade_no is then only named in
-- messages). returns the Transaction, or nil, { status, code, message }.
function _M.pay(no, opts)
  return S.db:transaction(function(tx)
    -- the success time is taken once the transaction holds the database:
    -- taken before, while another worker wrote, a day closed in between
    -- (POST /sim/bills/close) would get a cutoff after it and a bill
    -- without it, then the payment would commit and the bill change
    local now = clock.now()
    local o, err
    if opts.order_id then
      o = assert(tx:query("SELECT * FROM sim_orders WHERE id = $1",
                          { opts.order_id }))[1]
      if not o then
        return nil, { status = 404, code = "ORDER_NOT_EXIST",
                      message = "no order " .. tostring(no) }
      end
    else
      o, err = find_for_control(tx, no, opts.mchid)
      if not o then return nil, err end
    end
    o = expire(tx, o, now)
    if o.trade_state == "SUCCESS" or o.trade_state == "REFUND" then
      return nil, { status = 409, code = "ORDER_PAID", message = "order "
                    .. no .. " is paid already" }
    end
    if o.trade_state == "CLOSED" then
      return nil, { status = 409, code = "ORDER_CLOSED", message = "order "
                    .. no .. " is closed" }
    end
    -- the payer pays the total or less (discounts), never more
    if opts.payer_total and opts.payer_total > o.total then
      return nil, { status = 400, code = "PARAM_ERROR", message =
        "payer_total " .. string.format("%.0f", opts.payer_total)
        .. " exceeds the order's total " .. o.total }
    end
    -- paid no earlier than made (in whole seconds, as success_time is
    -- given: the same second is taken), as at WeChat
    local made = opts.created_at or o.created_at
    local paid = opts.success_at or now
    if opts.success_at and paid < math.floor(made) then
      return nil, { status = 400, code = "PARAM_ERROR", message =
        "success_time " .. rfc3339(paid) .. " is before the order's create"
        .. " time " .. rfc3339(made) .. ": an order is paid after it is"
        .. " made (give create_time too, for an order made long ago)" }
    end
    if opts.created_at and opts.created_at < o.created_at then
      o.created_at = opts.created_at
    end
    o.transaction_id = "4200" .. beijing_stamp(paid):sub(1, 8)
                       .. random_digits(16)
    o.trade_state, o.success_at = "SUCCESS", paid
    o.payer_total = opts.payer_total or o.total
    o.bank_type = opts.bank_type or "OTHERS"
    if opts.openid then o.openid = opts.openid end
    if not o.openid and not o.sub_openid then
      o.openid = "o" .. crypto.random_nonce(27)
    end
    assert(tx:exec("UPDATE sim_orders SET trade_state = 'SUCCESS', "
      .. "transaction_id = $1, success_at = $2, payer_total = $3, "
      .. "bank_type = $4, openid = $5, created_at = $6 WHERE id = $7",
      { n = 7, o.transaction_id, paid, o.payer_total, o.bank_type, o.openid,
        o.created_at, o.id }))
    local t = _M.transaction(o)
    local note = {
      mchid = o.sp_mchid or o.owner, sub_mchid = o.sp_mchid and o.owner,
      notify_url = o.notify_url, event_type = "TRANSACTION.SUCCESS",
      summary = "支付成功", resource_type = "encrypt-resource",
      original_type = "transaction", resource = t,
      out_trade_no = o.out_trade_no }
    local ok, nerr = notify.enqueue(tx, note)
    if not ok then
      return nil, { status = 500, code = "SYSTEM_ERROR",
                    message = "notify.enqueue: " .. tostring(nerr) }
    end
    return t, note.id              -- the notification's id (same on retries)
  end)
end

--- syntax: t, err = orders.fail(out_trade_no, opts) -- NOTPAY -> PAYERROR
function _M.fail(no, opts)
  local now = clock.now()
  return S.db:transaction(function(tx)
    local o, err = find_for_control(tx, no, opts.mchid)
    if not o then return nil, err end
    o = expire(tx, o, now)
    if o.trade_state ~= "NOTPAY" then
      return nil, { status = 409, code = "ORDER_" .. o.trade_state,
        message = "order " .. no .. " is " .. o.trade_state .. ", not NOTPAY" }
    end
    o.trade_state = "PAYERROR"
    o.bank_type = opts.bank_type or "OTHERS"
    assert(tx:exec("UPDATE sim_orders SET trade_state = 'PAYERROR', "
      .. "bank_type = $1 WHERE id = $2", { o.bank_type, o.id }))
    return _M.transaction(o)
  end)
end

--- syntax: r, err = orders.refund_outside(out_trade_no, opts)
-- A refund made in the merchant platform (by hand, or by another system
-- of the merchant): the order's money goes back without the merchant's
-- API client asking, so the merchant's own records do not have it.
-- PROCESSING, as a refund API call makes it (settle it with
-- orders.settle); notified, once it settles, at the merchant's
-- refund_notify_url when it has one, or at opts.notify_url. opts: mchid
-- (which merchant's order, as for pay), amount (fen; default what is left
-- to refund), out_refund_no (default one the platform makes, "MP" and 30
-- digits), reason, notify_url. returns: the Refund object, or nil, { status, code, message }.
function _M.refund_outside(no, opts)
  return S.db:transaction(function(tx)
    local now = clock.now()
    local o, err = find_for_control(tx, no, opts.mchid)
    if not o then return nil, err end
    o = expire(tx, o, now)
    local left = o.total - o.refunded
    local amount = opts.amount or left
    local why = refund_refusal(tx, o, amount, now)
    if why == "unpaid" then
      return nil, { status = 409, code = "ORDER_" .. o.trade_state,
        message = "order " .. no .. " is " .. o.trade_state .. ", not paid" }
    elseif why == "too_old" then
      return nil, { status = 409, code = "INVALID_REQUEST", message = "order "
        .. no .. " was paid more than a year ago" }
    elseif why == "exceeds" or amount < 1 then
      return nil, { status = 409, code = "NOT_ENOUGH", message = "order "
        .. no .. " has " .. left .. " fen left to refund, not "
        .. string.format("%.0f", amount) }
    elseif why == "too_many" then
      return nil, { status = 409, code = "REFUND_LIMIT", message = "order "
        .. no .. " has " .. MAX_REFUNDS .. " refunds" }
    end
    local rno = opts.out_refund_no
                or ("MP" .. beijing_stamp(now):sub(1, 14) .. random_digits(16))
    if assert(tx:query("SELECT 1 AS x FROM sim_refunds WHERE owner = $1 AND"
        .. " out_refund_no = $2", { o.owner, rno }))[1] then
      return nil, { status = 409, code = "OUT_REFUND_NO_USED", message =
        "refund " .. rno .. " exists already" }
    end
    local m = S.config.by_mchid[o.sp_mchid or o.owner]
    local f = insert_refund(tx, o, { owner = o.owner, sp_mchid = o.sp_mchid,
      out_refund_no = rno, refund = amount, reason = opts.reason,
      notify_url = opts.notify_url or (m and m.refund_notify_url),
      params_hash = digest({ out_trade_no = no, out_refund_no = rno,
        amount = { refund = amount, total = o.total, currency = "CNY" },
        reason = opts.reason, merchant_platform = true }) }, now)
    return _M.refund_object(f, o)
  end)
end

-- routes --------------------------------------------------------------------

function _M.init(ctx)
  S.db, S.config, S.identity, S.api = ctx.db, ctx.config, ctx.identity,
                                       ctx.api
end

function _M.routes(ctx)
  local route = ctx.api.route
  certificates.routes(ctx)
  for seg, tt in pairs(TYPES) do
    route("POST", "/v3/pay/transactions/" .. seg, "prepay", function(req, c)
      return prepay(req, c, tt, false)
    end)
    route("POST", "/v3/pay/partner/transactions/" .. seg, "prepay",
      function(req, c) return prepay(req, c, tt, true) end)
  end
  route("GET", "/v3/pay/transactions/id/:id", "query", function(req, c)
    return query(req, c, "transaction_id", false)
  end)
  route("GET", "/v3/pay/transactions/out-trade-no/:id", "query",
    function(req, c) return query(req, c, "out_trade_no", false) end)
  route("GET", "/v3/pay/partner/transactions/id/:id", "query",
    function(req, c) return query(req, c, "transaction_id", true) end)
  route("GET", "/v3/pay/partner/transactions/out-trade-no/:id", "query",
    function(req, c) return query(req, c, "out_trade_no", true) end)
  route("POST", "/v3/pay/transactions/out-trade-no/:id/close", "close",
    function(req, c) return close(req, c, false) end)
  route("POST", "/v3/pay/partner/transactions/out-trade-no/:id/close",
    "close", function(req, c) return close(req, c, true) end)
  route("POST", "/v3/refund/domestic/refunds", "refund", create_refund)
  route("GET", "/v3/refund/domestic/refunds/:id", "refund_query",
        query_refund)
  route("POST", "/v3/refund/domestic/refunds/:id/apply-abnormal-refund",
        "abnormal_refund", abnormal_refund)
end

--- syntax: orders.start(ctx)
-- With refund_settle_after, a task per worker settles refunds whose time
-- came (SUCCESS); the conditional update lets one worker win each.
function _M.start(ctx)
  local after = ctx.config.refund_settle_after
  if not after then return end
  local tick = math.max(0.05, math.min(1, after / 4))
  core.spawn(function()
    while true do
      core.sleep(tick)
      local ok, err = pcall(function()
        local rows = assert(S.db:query("SELECT * FROM sim_refunds WHERE "
          .. "status = 'PROCESSING' AND settle_after <= $1 LIMIT 50",
          { clock.now() }))
        for _, f in ipairs(rows) do
          S.db:transaction(function(tx)
            -- (its success time taken inside the transaction, as a
            -- payment's: see orders.pay)
            local r = settle_in(tx, f, "SUCCESS", clock.now())
            return r and true or false
          end)
        end
      end)
      if not ok then
        require("paygate").log.warn("simulator: refund settling failed",
                                    { error = tostring(err) })
      end
    end
  end)
end

return _M
