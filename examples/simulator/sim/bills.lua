-- sim/bills.lua: trade and fund-flow bills, made from the simulator's own
-- orders and refunds in WeChat Pay's CSV layout.
--
--   GET /v3/bill/tradebill?bill_date=&bill_type=&tar_type=[&sub_mchid=]
--   GET /v3/bill/fundflowbill?bill_date=&account_type=&tar_type=
--     -> 200 { hash_type = "SHA1", hash_value, download_url } (signed)
--   GET /v3/billdownload/file?token=...  -> the file, unsigned
--
-- A bill covers one Beijing day (UTC+8) of WeChat's clock (sim.clock:
-- clock_offset moves it, as it moves the success_time it is made of). It
-- can be asked for from bill_ready_after seconds (default 10 h: 10:00 the
-- next morning) after the day's end, STATEMENT_CREATING before; a day
-- without records is NO_STATEMENT_EXIST. POST /sim/bills/close
-- { bill_date } makes a day's bills ready at once, from what the day
-- holds so far (later records of that day are in no bill). The file is
-- the same on every download: it is made again from the records up to
-- the day's cutoff, and its SHA-1 is checked against the one the token
-- was issued with.
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local zlib = require "paygate.zlib"
local json = require "cjson.safe"
local config = require "sim.config"
local orders = require "sim.orders"
local civil = require "paygate.civil"
local clock = require "sim.clock"

local type, tostring, ipairs = type, tostring, ipairs
local floor, fmt, concat = math.floor, string.format, table.concat

local _M = {}

local BEIJING = 8 * 3600
local DAY = 86400
_M.FEE_PER_MILLE = 6               -- the fee: 0.60 %, rounded to the fen
_M.RATE = "0.60%"
_M.KEEP_DAYS = 92                  -- about 3 months of bills

_M.TRADE_HEADER = "交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,"
  .. "商户订单号,用户标识,交易类型,交易状态,付款银行,货币种类,应结订单金额,"
  .. "代金券金额,微信退款单号,商户退款单号,退款金额,充值券退款金额,退款类型,"
  .. "退款状态,商品名称,商户数据包,手续费,费率,订单金额,申请退款金额,费率备注"
_M.TRADE_SUMMARY = "总交易单数,应结订单总金额,退款总金额,充值券退款总金额,"
  .. "手续费总金额,订单总金额,申请退款总金额"
_M.FUND_HEADER = "记账时间,微信支付业务单号,资金流水单号,业务名称,业务类型,"
  .. "收支类型,收支金额(元),账户结余(元),资金变更提交申请人,备注,业务凭证号"
_M.FUND_SUMMARY = "资金流水总笔数,收入笔数,收入金额,支出笔数,支出金额"

-- bill_type -> which rows: payments (p) and refunds (r)
local BILL_TYPES = {
  ALL = { p = true, r = true }, SUCCESS = { p = true },
  REFUND = { r = true }, ALL_SPECIAL = { p = true, r = true },
  SUC_SPECIAL = { p = true }, REF_SPECIAL = { r = true },
  RECHARGE_REFUND = {},          -- not modelled: never has records
}
local ACCOUNT_TYPES = { BASIC = true, OPERATION = true, FEES = true }

-- Dates --------------------------------------------------------------------

--- syntax: start, err = bills.day_start(date) -- "YYYY-MM-DD" (Beijing)
-- returns: the epoch second the Beijing day starts, or nil, why.
function _M.day_start(date)
  if type(date) ~= "string" then return nil, "bill_date is required" end
  if not date:match("^%d%d%d%d%-%d%d%-%d%d$") then
    return nil, "bill_date must be YYYY-MM-DD"
  end
  -- 2025-02-30 and the like (civil.date: the client's check too)
  local days = civil.date(date)
  if not days then return nil, "bill_date is not a calendar date" end
  return days * DAY - BEIJING
end

local function beijing_time(t)
  return os.date("!%Y-%m-%d %H:%M:%S", floor(t) + BEIJING)
end

function _M.today(now)
  return os.date("!%Y-%m-%d", floor(now) + BEIJING)
end

--- syntax: yes = bills.kept(start, now)
-- Whether the bills of the Beijing day starting at `start` can be
-- downloaded at `now`: they are kept KEEP_DAYS after the day ends.
function _M.kept(start, now)
  return start + DAY >= now - _M.KEEP_DAYS * DAY
end

-- Amounts --------------------------------------------------------------------

local function yuan(fen)
  local sign = fen < 0 and "-" or ""
  if fen < 0 then fen = -fen end
  return fmt("%s%d.%02d", sign, floor(fen / 100), fen % 100)
end
_M.yuan = yuan

local function fee_of(total)
  return floor((total * _M.FEE_PER_MILLE + 500) / 1000)
end
_M.fee_of = fee_of

-- A line: every field prefixed with a backtick, CRLF.
local function line(fields)
  local out = {}
  for i, f in ipairs(fields) do
    out[i] = "`" .. (tostring(f):gsub("[\r\n]", " "))
  end
  return concat(out, ",") .. "\r\n"
end

-- Records ------------------------------------------------------------------

-- Who the bill is for: a direct merchant's own orders; a service
-- provider's sub-merchants' orders (one sub-merchant with sub_mchid).
local function scope(who)
  if who.partner then
    if who.sub_mchid then
      return "o.sp_mchid = $1 AND o.owner = $4", { who.mchid, nil, nil,
                                                   who.sub_mchid }
    end
    return "o.sp_mchid = $1", { who.mchid }
  end
  return "o.owner = $1 AND o.sp_mchid IS NULL", { who.mchid }
end

local function payments(db, who, from, to)
  local where, p = scope(who)
  p[2], p[3], p.n = from, to, who.sub_mchid and 4 or 3
  return db:query("SELECT o.owner, o.sp_mchid, o.appid, o.sub_appid, "
    .. "o.out_trade_no, o.trade_type, o.transaction_id, o.description, "
    .. "o.attach, o.total, o.currency, o.openid, o.sub_openid, o.bank_type,"
    .. " o.payer_total, o.success_at, o.request FROM sim_orders o WHERE "
    .. where
    .. " AND o.success_at IS NOT NULL AND o.success_at >= $2 AND "
    .. "o.success_at < $3 ORDER BY o.success_at, o.id", p)
end

local function refunds(db, who, from, to)
  local where, p = scope(who)
  p[2], p[3], p.n = from, to, who.sub_mchid and 4 or 3
  return db:query("SELECT o.owner, o.sp_mchid, o.appid, o.sub_appid, "
    .. "o.out_trade_no, o.trade_type, o.transaction_id, o.description, "
    .. "o.attach, o.total, o.currency, o.openid, o.sub_openid, o.bank_type,"
    .. " o.payer_total, o.request, r.refund_id, r.out_refund_no, r.refund,"
    .. " r.payer_refund, r.success_at "
    .. "FROM sim_refunds r JOIN sim_orders o ON o.id = r.order_id WHERE "
    .. where .. " AND r.status = 'SUCCESS' AND r.success_at >= $2 AND "
    .. "r.success_at < $3 ORDER BY r.success_at, r.id", p)
end

local function device_id(o)
  local req = o.request and json.decode(o.request)
  local s = type(req) == "table" and req.scene_info
  return type(s) == "table" and type(s.device_id) == "string"
         and s.device_id or ""
end

-- Discounts ------------------------------------------------------------------

-- An order paid for less than its total has one promotion
-- (orders.promotion): a recharge coupon (type CASH; COUPON in WeChat's
-- older naming), which is settled as cash, so 应结订单金额 stays the total
-- and 退款金额 the refund, as the API's settlement_total and
-- settlement_refund do. 代金券金额 is what the order's promotions came to;
-- 充值券退款金额 what a refund takes back of its recharge coupons (the
-- refund answer's discount_refund, the promotion's refund_amount).
local RECHARGE = { CASH = true, COUPON = true }

local function coupon_amount(o)
  local p = orders.promotion(o)
  return p and p.amount or 0
end

-- r: a refund row with its order's fields (payer_total, total)
local function recharge_refund(r)
  local p = orders.promotion(r)
  if not (p and RECHARGE[p.type]) then return 0 end
  return r.refund - orders.payer_refund(r, r)
end

-- Trade bill ---------------------------------------------------------------

--- syntax: csv = bills.trade_csv(pays, refs, which)
-- pays, refs: rows of sim_orders / sim_refunds (with their order's
-- fields), which: BILL_TYPES entry. returns the CSV text, or nil when it
-- holds no record.
function _M.trade_csv(pays, refs, which)
  local rows = {}
  if which.p then
    for _, o in ipairs(pays) do
      rows[#rows + 1] = { t = o.success_at, o = o }
    end
  end
  if which.r then
    for _, r in ipairs(refs) do
      rows[#rows + 1] = { t = r.success_at, o = r, refund = true }
    end
  end
  if #rows == 0 then return nil end
  table.sort(rows, function(a, b) return a.t < b.t end)
  local out = { _M.TRADE_HEADER, "\r\n" }
  local settle, refund_sum, fees, order_sum, applied = 0, 0, 0, 0, 0
  local recharge_sum = 0
  for _, row in ipairs(rows) do
    local o = row.o
    local mch = o.sp_mchid or o.owner
    local sub = o.sp_mchid and o.owner or "0"
    local openid = o.sub_openid or o.openid or ""
    local common = { beijing_time(row.t), o.appid, mch, sub, device_id(o),
                     o.transaction_id or "", o.out_trade_no, openid,
                     o.trade_type }
    if row.refund then
      local recharge = recharge_refund(o)
      refund_sum = refund_sum + o.refund
      applied = applied + o.refund
      recharge_sum = recharge_sum + recharge
      local f = { "REFUND", o.bank_type or "OTHERS", o.currency or "CNY",
                  "0.00", "0.00", o.refund_id, o.out_refund_no,
                  yuan(o.refund), yuan(recharge), "ORIGINAL", "SUCCESS",
                  o.description, o.attach or "", "0.00000", _M.RATE, "0.00",
                  yuan(o.refund), "" }
      for _, v in ipairs(f) do common[#common + 1] = v end
    else
      local fee = fee_of(o.total)
      settle = settle + o.total
      fees = fees + fee
      order_sum = order_sum + o.total
      local f = { "SUCCESS", o.bank_type or "OTHERS", o.currency or "CNY",
                  yuan(o.total), yuan(coupon_amount(o)), "0", "0", "0.00",
                  "0.00", "", "",
                  o.description, o.attach or "", yuan(fee) .. "000", _M.RATE,
                  yuan(o.total), "0.00", "" }
      for _, v in ipairs(f) do common[#common + 1] = v end
    end
    out[#out + 1] = line(common)
  end
  out[#out + 1] = _M.TRADE_SUMMARY .. "\r\n"
  out[#out + 1] = line({ #rows, yuan(settle), yuan(refund_sum),
                         yuan(recharge_sum),
                         yuan(fees), yuan(order_sum), yuan(applied) })
  return concat(out)
end

-- Fund-flow bill (the basic account) -----------------------------------------

local function flow_id(kind, id)
  return crypto.hex(crypto.digest("sha1", kind .. ":" .. id)):sub(1, 28)
end

-- The account's movements, in time order: payments in, their fees and the
-- refunds out.
local function flows(pays, refs)
  local list = {}
  for _, o in ipairs(pays) do
    list[#list + 1] = { t = o.success_at, amount = o.total, o = o,
                        name = "交易", type = "交易", id = o.transaction_id }
    local fee = fee_of(o.total)
    if fee > 0 then
      list[#list + 1] = { t = o.success_at, amount = -fee, o = o,
                          name = "交易", type = "扣除交易手续费",
                          id = o.transaction_id, fee = true }
    end
  end
  for _, r in ipairs(refs) do
    list[#list + 1] = { t = r.success_at, amount = -r.refund, o = r,
                        name = "退款", type = "退款", id = r.refund_id,
                        refund = true }
  end
  -- in time order; at the same second a payment, then its fee, then a
  -- refund
  local function rank(f) return f.refund and 2 or (f.fee and 1 or 0) end
  table.sort(list, function(a, b)
    if a.t ~= b.t then return a.t < b.t end
    return rank(a) < rank(b)
  end)
  return list
end

--- syntax: csv = bills.fund_csv(before, pays, refs)
-- before: the balance (fen) at the day's start. returns the CSV text, or
-- nil when the day has no movement.
function _M.fund_csv(before, pays, refs)
  local list = flows(pays, refs)
  if #list == 0 then return nil end
  local out = { _M.FUND_HEADER, "\r\n" }
  local balance, nin, sin, nout, sout = before, 0, 0, 0, 0
  for _, f in ipairs(list) do
    balance = balance + f.amount
    local o = f.o
    local mch = o.sp_mchid or o.owner
    local remark, voucher, who = "", o.out_trade_no, "system"
    if f.refund then
      remark = "退款总金额" .. yuan(o.refund) .. "元;含手续费0.00元"
      voucher, who = o.out_refund_no, mch .. "API"
    end
    if f.amount >= 0 then
      nin, sin = nin + 1, sin + f.amount
    else
      nout, sout = nout + 1, sout - f.amount
    end
    out[#out + 1] = line({ beijing_time(f.t), f.id or "",
                           flow_id(f.type, f.id or ""), f.name, f.type,
                           f.amount >= 0 and "收入" or "支出",
                           yuan(f.amount >= 0 and f.amount or -f.amount),
                           yuan(balance), who, remark, voucher })
  end
  out[#out + 1] = _M.FUND_SUMMARY .. "\r\n"
  out[#out + 1] = line({ #list, nin, yuan(sin), nout, yuan(sout) })
  return concat(out)
end

-- Making a bill ------------------------------------------------------------

-- The cutoff of a day's bills: the day's end, or when it was closed early;
-- nil when the bill is not ready at `now`.
local function cutoff(ctx, date, start, now)
  local rows, err = ctx.db:query("SELECT cutoff FROM sim_bill_days WHERE "
                                 .. "bill_date = $1", { date })
  if not rows then return nil, err end
  if rows[1] then return rows[1].cutoff end
  if now >= start + DAY + (ctx.config.bill_ready_after or 36000) then
    return start + DAY
  end
  return false
end

--- syntax: csv, err = bills.make(ctx, spec)
-- spec: { kind = "trade" | "fundflow", mchid, partner, sub_mchid,
-- bill_date, bill_type, cutoff }. returns the CSV (nil without records),
-- or nil, err.
function _M.make(ctx, s)
  local start = assert(_M.day_start(s.bill_date))
  local to = s.cutoff
  if to > start + DAY then to = start + DAY end
  local who = { mchid = s.mchid, partner = s.partner,
                sub_mchid = s.sub_mchid }
  if s.kind == "fundflow" then
    if s.bill_type ~= "BASIC" then return nil end
    who = { mchid = s.mchid }            -- its own account only
  end
  local pays, err = payments(ctx.db, who, start, to)
  if not pays then return nil, err end
  local refs
  refs, err = refunds(ctx.db, who, start, to)
  if not refs then return nil, err end
  if s.kind == "trade" then
    return _M.trade_csv(pays, refs, BILL_TYPES[s.bill_type])
  end
  -- the balance before the day: everything earlier
  local bp, br
  bp, err = payments(ctx.db, who, 0, start)
  if not bp then return nil, err end
  br, err = refunds(ctx.db, who, 0, start)
  if not br then return nil, err end
  local before = 0
  for _, f in ipairs(flows(bp, br)) do before = before + f.amount end
  return _M.fund_csv(before, pays, refs)
end

-- Handlers ---------------------------------------------------------------

-- Error answers go through sim.api (unsigned, WeChat's shape).
local API

local function bad(code, message, field, value)
  if code == "PARAM_ERROR" and field then
    return nil, API.param_error(field, message, value, "query")
  end
  return nil, API.err(400, code, message)
end

local function system_error(err)
  return nil, API.err(500, "SYSTEM_ERROR", "系统繁忙,请稍后重试: "
                      .. tostring(err))
end

local function host_url(req)
  local host = req.headers.host or "127.0.0.1"
  local scheme = req.scheme == "https" and "https" or "http"
  return scheme .. "://" .. host
end

-- ask(ctx, req, m, kind): GET tradebill / fundflowbill for merchant m.
function _M.ask(ctx, req, m, kind)
  local q = req:query()
  if type(q.bill_date) ~= "string" then
    return bad("PARAM_ERROR", "bill_date is required", "bill_date")
  end
  local now = clock.now()
  local start, why = _M.day_start(q.bill_date)
  if not start then
    return bad("PARAM_ERROR", why, "bill_date", API.shown(q.bill_date, 32))
  end
  local bill_type
  if kind == "trade" then
    bill_type = q.bill_type or "ALL"
    if not BILL_TYPES[bill_type] then
      return bad("PARAM_ERROR", "bill_type must be one of ALL, SUCCESS, "
                 .. "REFUND, RECHARGE_REFUND, ALL_SPECIAL, SUC_SPECIAL, "
                 .. "REF_SPECIAL", "bill_type")
    end
  else
    bill_type = q.account_type or "BASIC"
    if not ACCOUNT_TYPES[bill_type] then
      return bad("PARAM_ERROR", "account_type must be BASIC, OPERATION or "
                 .. "FEES", "account_type")
    end
  end
  if q.tar_type ~= nil and q.tar_type ~= "GZIP" then
    return bad("PARAM_ERROR", "tar_type must be GZIP (or absent)",
               "tar_type")
  end
  local partner = next(m.sub or {}) ~= nil
  local sub = q.sub_mchid
  if sub ~= nil then
    if kind ~= "trade" or not (m.sub and m.sub[sub]) then
      return bad("PARAM_ERROR", "sub_mchid " .. API.shown(sub, 32)
                 .. " is not a sub-merchant of " .. m.mchid, "sub_mchid")
    end
  end
  if q.bill_date > _M.today(now) then
    return bad("PARAM_ERROR", "bill_date is in the future", "bill_date")
  end
  if not _M.kept(start, now) then
    return bad("PARAM_ERROR", "bills are kept for 3 months", "bill_date")
  end
  local cut, err = cutoff(ctx, q.bill_date, start, now)
  if cut == nil then return system_error(err) end
  if cut == false then
    return bad("STATEMENT_CREATING", "账单生成中")
  end
  local spec = { kind = kind, mchid = m.mchid, partner = partner,
                 sub_mchid = sub, bill_date = q.bill_date,
                 bill_type = bill_type, cutoff = cut }
  local csv
  csv, err = _M.make(ctx, spec)
  if not csv then
    if err then return system_error(err) end
    return bad("NO_STATEMENT_EXIST", "请求的账单文件不存在")
  end
  local sha1 = crypto.hex(crypto.digest("sha1", csv))
  local token = crypto.random_nonce(64)
  local gzip = q.tar_type == "GZIP"
  local res
  res, err = ctx.db:exec("INSERT INTO sim_bill_tokens (token, mchid, "
    .. "sub_mchid, kind, bill_date, bill_type, gzip, cutoff, sha1, "
    .. "expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    { n = 10, token, m.mchid, sub or core.null, kind, q.bill_date,
      bill_type, gzip and 1 or 0, cut, sha1,
      now + (ctx.config.bill_url_ttl or 30) })
  if not res then return system_error(err) end
  return 200, { hash_type = "SHA1", hash_value = sha1,
                download_url = host_url(req) .. "/v3/billdownload/file?token="
                               .. token .. (gzip and "&tartype=gzip" or "") }
end

-- download(ctx, req, m): the file; unsigned. returns status, body,
-- headers.
function _M.download(ctx, req, m)
  local token = req:query().token
  local function gone()
    return nil, API.err(404, "RESOURCE_NOT_EXISTS",
                        "账单文件不存在或下载链接已过期")
  end
  if type(token) ~= "string" or #token ~= 64 then return gone() end
  local rows, err = ctx.db:query("SELECT * FROM sim_bill_tokens WHERE "
                                 .. "token = $1", { token })
  if not rows then return system_error(err) end
  local t = rows[1]
  if not t or t.mchid ~= m.mchid or t.expires_at <= clock.now() then
    return gone()
  end
  local csv
  csv, err = _M.make(ctx, { kind = t.kind, mchid = t.mchid,
                            partner = next(m.sub or {}) ~= nil,
                            sub_mchid = t.sub_mchid, bill_date = t.bill_date,
                            bill_type = t.bill_type, cutoff = t.cutoff })
  if not csv or crypto.hex(crypto.digest("sha1", csv)) ~= t.sha1 then
    return system_error("the bill changed since its download_url was "
                        .. "issued: " .. tostring(err))
  end
  if t.gzip == 1 then
    return 200, zlib.gzip(csv), { ["Content-Type"] = "application/x-gzip" }
  end
  return 200, csv, { ["Content-Type"] = "text/csv; charset=utf-8" }
end

--- syntax: cutoff, err, status = bills.close(ctx, bill_date)
-- Makes the day's bills ready now (control API): records of that day up
-- to now. A day closed already keeps its first cutoff. On failure,
-- status says whose: 400 (the date) or 500 (the store).
function _M.close(ctx, date)
  local start, why = _M.day_start(date)
  if not start then return nil, why, 400 end
  local now = clock.now()
  if start > now then return nil, "bill_date is in the future", 400 end
  local cut = now < start + DAY and now or start + DAY
  local res, err = ctx.db:exec("INSERT INTO sim_bill_days (bill_date, "
    .. "cutoff) VALUES ($1, $2) ON CONFLICT (bill_date) DO NOTHING",
    { date, cut })
  if not res then return nil, tostring(err), 500 end
  local rows, qerr = ctx.db:query("SELECT cutoff FROM sim_bill_days WHERE "
                                  .. "bill_date = $1", { date })
  if not rows then return nil, tostring(qerr), 500 end
  return rows[1] and rows[1].cutoff or cut
end

--- syntax: bills.routes(ctx) -- the /v3 bill routes, through ctx.api
function _M.routes(ctx)
  API = ctx.api
  API.route("GET", "/v3/bill/tradebill", "tradebill", function(req, c)
    return _M.ask(ctx, req, c.m, "trade")
  end)
  API.route("GET", "/v3/bill/fundflowbill", "fundflowbill", function(req, c)
    return _M.ask(ctx, req, c.m, "fundflow")
  end)
  API.route("GET", "/v3/billdownload/file", "billdownload", function(req, c)
    return _M.download(ctx, req, c.m)
  end, { raw = true })
end

-- Configuration keys (sim.config) --------------------------------------

config.define("bill_ready_after", config.number_check(0, false), 36000)
config.define("bill_url_ttl", config.number_check(0, true), 30)

return _M
