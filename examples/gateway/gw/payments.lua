-- gw.payments: the merchant API of payments -- create, attempts, get
-- (?refresh=1), close. Every state change goes through paygate.fsm (an
-- audited, versioned transition) and enqueues its events in the same
-- transaction; every POST runs under paygate.idempotency (app.lua), and
-- stores its answer in the transaction of its last effects.
local paygate = require "paygate"
local audit = require "paygate.audit"
local fsm = require "paygate.fsm"
local json = require "paygate.json"
local validate = require "paygate.wechatpay.validate"
local model = require "gw.model"
local events = require "gw.events"
local apply = require "gw.apply"
local reconcile = require "paygate.reconcile"
local metrics = require "paygate.metrics"
local suggest = require "paygate.suggest"

local type, tostring, ipairs, pairs, floor = type, tostring, ipairs, pairs,
      math.floor

local _M = {}

local P = model.payments
local ctx                           -- set by init()

local CHANNELS = { native = true, h5 = true, jsapi = true, app = true }
local H5_TYPES = { iOS = true, Android = true, Wap = true }
local MAX_AMOUNT = 10000000000      -- fen
_M.MAX_AMOUNT = MAX_AMOUNT

function _M.init(c) ctx = c end

-- answers -------------------------------------------------------------------

local function err_body(kind, message, extra)
  local b = { error = kind, message = message }
  for k, v in pairs(extra or {}) do b[k] = v end
  return b
end
_M.err_body = err_body

--- syntax: text = payments.unknown_words(err)
-- The 504 timeout's message for a WeChat call whose outcome is unknown
-- (err: kind timeout or unknown_outcome), payments' and refunds' alike: a
-- lost connection (cause closed: a reset, a close after sending) is no
-- slow answer, and is said as what it was; another cause (the last retry
-- could not connect, or was refused 429, after an earlier attempt may
-- have arrived) is neither, and is said as no answer on the request.
-- Each with the client's words for the failure (the attempt's timeout
-- and whose it was, the attempts made).
function _M.unknown_words(err)
  local cause = err.kind == "unknown_outcome" and err.cause_kind or nil
  local words
  if cause == nil or cause == "timeout" then
    words = "WeChat Pay did not answer in time ("
  elseif cause == "closed" then
    words = "the connection to WeChat Pay was lost before its answer, the"
            .. " outcome is unknown ("
  else
    -- (was: "the connection ... was lost" for these too, which it was not)
    words = "WeChat Pay gave no answer on the request (an earlier attempt"
            .. " may have reached it), the outcome is unknown ("
  end
  return words .. tostring(err) .. ")"
end

--- syntax: status, body[, headers] = payments.wx_failure(err[, extra])
-- A failed WeChat call as the merchant API answers it; extra: more
-- fields of the body (the payment as it now is).
function _M.wx_failure(err, extra)
  local kind = type(err) == "table" and err.kind or "error"
  if kind == "timeout" or kind == "unknown_outcome" then
    -- (the kind and status kept: the outcome is as unknown either way)
    return 504, err_body("timeout", _M.unknown_words(err), extra)
  end
  if kind == "degraded" then
    return 503, err_body("degraded", "calls to WeChat Pay are switched off"
                         .. " for now (" .. tostring(err) .. ")", extra)
  end
  if kind == "circuit_open" then
    -- not the switch: WeChat failed most recent calls of this endpoint,
    -- and its breaker sends nothing until a probe may go (retry_after)
    local wait = math.max(1, math.ceil(tonumber(err.retry_after) or 1))
    return 503, err_body("degraded", "WeChat Pay is failing: most recent"
                         .. " calls to this endpoint failed, so its circuit"
                         .. " breaker sends nothing for now; retry in "
                         .. wait .. " s (" .. tostring(err) .. ")", extra),
           { ["Retry-After"] = tostring(wait) }
  end
  local b = err_body("wechat_error", "WeChat Pay: " .. tostring(err),
                     { wechat_kind = kind, wechat_code = err.code })
  for k, v in pairs(extra or {}) do b[k] = v end
  return 502, b
end

-- Kinds of a failed POST that WeChat may have acted on: the request may
-- have arrived (a timeout or a lost connection after sending, an answer
-- whose signature did not verify, WeChat's own 5xx). Everything else was
-- refused before it acted (a 4xx, 429) or never left (connect, DNS,
-- degraded, circuit_open, invalid_params).
local MAYBE_SENT = { unknown_outcome = true, unverified_response = true,
                     system_error = true }

--- syntax: yes = payments.maybe_sent(err)
function _M.maybe_sent(err)
  if type(err) ~= "table" then return false end
  if MAYBE_SENT[err.kind] then return true end
  if err.kind == "http_error" then
    return type(err.status) == "number" and err.status >= 500
  end
  return err.sent == true and err.status == nil
end

local function degraded()
  return 503, err_body("degraded", "the gateway is degraded: calls that"
                       .. " need WeChat Pay are refused for now; retry later"
                       .. " with the same Idempotency-Key")
end
_M.degraded = degraded

local function not_found(what)
  return 404, err_body("not_found", what .. " not found")
end
_M.not_found = not_found

-- input ---------------------------------------------------------------------

--- syntax: n = payments.text_len(s)
-- returns: the number of characters of s when it is UTF-8 text WeChat
-- takes (characters of 1 to 3 bytes, no control characters but tab and
-- newline), or nil.
local function text_len(s)
  local n = validate.utf8_len(s)
  if not n or s:find("[%z\1-\8\11-\31\127\240-\244]") then
    return nil                      -- not UTF-8, a control, a 4-byte one
  end
  return n
end
_M.text_len = text_len

local function utf8_len(s)
  return text_len(s) or math.huge
end

local function is_int(v, lo, hi)
  return type(v) == "number" and v % 1 == 0 and v >= lo and v <= hi
end

local function set_of(list)
  local set = {}
  for _, k in ipairs(list) do set[k] = true end
  return set
end

-- The fields of each body: any other is refused (400 naming it), so a
-- typo ("expire_in", "amout") does not silently leave a default in place.
local CREATE_FIELDS = set_of{ "order_id", "channel", "amount", "currency",
  "description", "payer", "client_ip", "h5_type", "expires_in", "attach",
  "mchid", "sub_mchid", "sub_appid", "appid" }
-- s a payment must have left for a new attempt (its time_expire: WeChat
-- is reported to want one at least 60 s ahead; 30 s of margin)
local ATTEMPT_MIN_LEFT = 90
local ATTEMPT_FIELDS = set_of{ "channel", "payer", "client_ip", "h5_type" }
-- a payer's openid: openid (under the appid the payment is made under),
-- or, for a service provider, the field WeChat's partner prepay names:
-- sp_openid (under sp_appid) or sub_openid (under sub_appid); one of them
local PAYER_KEYS = { "openid", "sp_openid", "sub_openid" }
local PAYER_FIELDS = set_of(PAYER_KEYS)
local NO_FIELDS = {}

--- syntax: payments.unknown_fields(b, known, bad[, prefix])
-- Adds "unknown field" to bad for each field of the object b that is not
-- in the set known; prefix: the path of b in the body ("payer."). At most
-- MAX_UNKNOWN are named per call (per object: the body and its payer name
-- 20 together), each by its first 64 bytes: a body of 5 MB of
-- short unknown keys was answered with 21 MB naming each, after seconds
-- of the worker's time sorting and joining them.
local MAX_UNKNOWN = 10
local function unknown_fields(b, known, bad, prefix)
  local n = 0
  for k in pairs(b) do
    if not known[k] then
      n = n + 1
      if n > MAX_UNKNOWN then return end
      local name = tostring(k)
      if #name > 64 then name = name:sub(1, 64) .. "..." end
      bad[(prefix or "") .. name] = "unknown field"
    end
  end
end
_M.unknown_fields = unknown_fields

-- Checks the channel-specific fields of a body into out; adds reasons to
-- bad (field -> reason).
-- (an openid is ASCII: a control or other bytes would go to WeChat, or
-- fail its client's check after the payment was stored)
local function is_openid(v)
  return type(v) == "string" and v ~= "" and #v <= 128
         and not v:find("[^\33-\126]")
end

-- The channel and its fields. A field of another channel is not used,
-- but is checked all the same when given: a body one client sends for
-- every channel must not carry junk through unseen.
local function given(v) return v ~= nil and v ~= json.null end

-- (an empty JSON array decodes to an empty table too, marked with a
-- metatable so that it encodes back as []; an object has none)
local function is_object(v)
  return type(v) == "table" and getmetatable(v) == nil
end

local function check_channel(b, out, bad)
  if given(b.payer) and not is_object(b.payer) then
    bad.payer = "must be an object ({\"openid\": ...})"
  elseif type(b.payer) == "table" then
    unknown_fields(b.payer, PAYER_FIELDS, bad, "payer.")
    local named = {}
    for _, k in ipairs(PAYER_KEYS) do
      if given(b.payer[k]) then
        named[#named + 1] = k
        if not is_openid(b.payer[k]) then
          bad["payer." .. k] = "must be 1..128 printable ASCII characters"
        end
      end
    end
    if #named > 1 then
      bad.payer = "names the payer once: one of openid, sp_openid and"
        .. " sub_openid (got " .. table.concat(named, " and ") .. ")"
    elseif named[1] then
      out.payer_as = named[1]
    end
  end
  if given(b.client_ip) and not validate.ip_address(b.client_ip) then
    bad.client_ip = "must be an IP address (IPv4 as 203.0.113.7, or IPv6)"
  end
  if given(b.h5_type) and not H5_TYPES[b.h5_type] then
    bad.h5_type = "must be iOS, Android or Wap"
  end
  if not CHANNELS[b.channel] then
    bad.channel = "must be native, h5, jsapi or app"
    return
  end
  out.channel = b.channel
  if b.channel == "jsapi" then
    if not out.payer_as then
      -- (a payer named twice is told so, not that it names none)
      if not (bad.payer and is_object(b.payer)) then
        bad["payer.openid"] = "a jsapi payment needs the payer's openid"
          .. " (1..128 printable ASCII characters; a service provider's"
          .. " payment may name sp_openid or sub_openid instead)"
      end
    elseif not bad["payer." .. out.payer_as] then
      out.openid = b.payer[out.payer_as]
    end
  end
  if b.channel == "h5" then
    if not validate.ip_address(b.client_ip) then
      bad.client_ip = "an h5 payment needs the payer's IP address (IPv4"
        .. " as 203.0.113.7, or IPv6)"
    else
      out.client_ip = b.client_ip
    end
    out.h5_type = given(b.h5_type) and b.h5_type or "Wap"
  end
end

-- The payer fields that depend on the merchant: sp_openid and sub_openid
-- are a service provider's (a direct merchant's WeChat Pay client refuses
-- them), and a sub_openid is the payer's under sub_appid, which the
-- payment must name (WeChat refuses it without). o: check_channel's out;
-- partner: the merchant is a service provider; sub_appid: the payment's.
-- Checked for every channel, as the payer is.
local function check_payer_of(o, partner, sub_appid, bad)
  local as = o.payer_as
  if as == nil or as == "openid" or bad["payer." .. as] then return end
  if not partner then
    bad["payer." .. as] = "only for a service provider's merchant (a"
      .. " partner prepay's payer); a direct merchant's payer is openid"
  elseif as == "sub_openid" and not sub_appid then
    bad["payer.sub_openid"] = "needs sub_appid: a sub_openid is the"
      .. " payer's openid under the sub-merchant's own appid; under the"
      .. " provider's, name it sp_openid"
  end
end

local function bad_request(bad)
  local names = {}
  for k in pairs(bad) do names[#names + 1] = k end
  table.sort(names)
  local parts = {}
  for i, k in ipairs(names) do parts[i] = k .. ": " .. bad[k] end
  return 400, err_body("invalid_request", table.concat(parts, "; "),
                       { fields = bad })
end
_M.bad_request = bad_request

local function body_of(req)
  local b, err = req:decode_json()
  if b == nil then
    return nil, 400, err_body("invalid_json", err.message)
  end
  -- ([] decodes to an empty table too: only the text tells it from {})
  if type(b) ~= "table" or b[1] ~= nil or req.body:find("^%s*%[") then
    return nil, 400, err_body("invalid_request", "the body must be a JSON"
                              .. " object")
  end
  return b
end
_M.body_of = body_of

-- The config key that lists the other appids merchant record m may pay
-- under: what a refusal of an appid tells the operator to edit.
local function appids_key(m)
  return "config.merchants[" .. m.index .. "]."
         .. (m.partner and "sp_appids" or "appids")
end

-- what an appid or sub_appid that validate.appid refuses is told
local BAD_APPID = "must be an appid (1 to 32 letters, digits, _ and -)"

local function check_create(b)
  local bad, out = {}, {}
  unknown_fields(b, CREATE_FIELDS, bad)
  if type(b.order_id) ~= "string" or b.order_id == "" or #b.order_id > 64
     or not b.order_id:match("^[%w%-_.:|*@]+$") then
    bad.order_id = "must be 1..64 of letters, digits and - _ . : | * @"
  end
  out.order_id = b.order_id
  check_channel(b, out, bad)
  if not is_int(b.amount, 1, MAX_AMOUNT) then
    bad.amount = "must be a whole number of fen, 1 .. " .. MAX_AMOUNT
  end
  out.amount = b.amount
  -- (not `or`: false would pass for no currency)
  out.currency = b.currency
  if out.currency == nil then out.currency = "CNY" end
  if out.currency ~= "CNY" then bad.currency = "must be CNY" end
  if type(b.description) ~= "string" or b.description == ""
     or utf8_len(b.description) > 127 then
    bad.description = "must be 1..127 characters of UTF-8 text (no emoji,"
      .. " no control characters)"
  end
  out.description = b.description
  if b.attach ~= nil and (type(b.attach) ~= "string"
                          or utf8_len(b.attach) > 128) then
    bad.attach = "must be at most 128 characters of UTF-8 text (no emoji,"
      .. " no control characters)"
  end
  out.attach = b.attach
  -- at least 120 (as gateway.payment_ttl): WeChat has been reported to
  -- refuse a time_expire less than a minute ahead
  if b.expires_in ~= nil and not is_int(b.expires_in, 120, 7 * 86400) then
    bad.expires_in = "must be whole seconds, 120 .. 604800"
  end
  out.expires_in = b.expires_in or ctx.gateway.payment_ttl
  local m = ctx.default_merchant
  if b.mchid ~= nil then
    m = type(b.mchid) == "string" and ctx.by_mchid[b.mchid]
    if not m then bad.mchid = "is not a merchant of this gateway" end
  end
  out.merchant = m
  if m and m.partner then
    -- (1 to 32 digits, as the WeChat Pay client takes it: one it refused
    -- only after the payment was stored under it, for good)
    if type(b.sub_mchid) ~= "string" or #b.sub_mchid > 32
       or not b.sub_mchid:match("^%d+$") then
      bad.sub_mchid = "a service provider's payment names its sub_mchid"
        .. " (1 to 32 digits)"
    elseif b.sub_mchid == m.mchid then
      -- (WeChat refuses it, a 502 once the payment was stored under it)
      bad.sub_mchid = "is the service provider's own mchid (sp_mchid):"
        .. " name the sub-merchant the payment is for"
    end
    out.sub_mchid = b.sub_mchid
    -- the sub-merchant's own appid (its mini program, official account or
    -- App), checked as the WeChat Pay client checks it (one it refused
    -- would be refused after the payment was stored). Whether it is bound
    -- to the sub-merchant only WeChat knows: APPID_MCHID_NOT_MATCH, a 502
    -- that leaves the payment created, so the create corrected resumes it
    if b.sub_appid ~= nil and not validate.appid(b.sub_appid) then
      bad.sub_appid = BAD_APPID
    end
    out.sub_appid = b.sub_appid
  elseif b.sub_mchid ~= nil then
    bad.sub_mchid = "only for a service provider's merchant"
  end
  if b.sub_appid ~= nil and m and not m.partner then
    bad.sub_appid = "only for a service provider's merchant (a"
      .. " sub-merchant's own appid); a direct merchant names another of"
      .. " its appids with appid"
  end
  -- (checked as sub_appid is, and as the WeChat Pay client checks it:
  -- was type and length only, so an appid of a merchant that lists none
  -- (any appid sent as given) such as "wx 1" was stored with the payment,
  -- then refused by the client at the prepay, a 502 for good; and one
  -- not in the merchant's list was told to be another appid)
  if b.appid ~= nil and not validate.appid(b.appid) then
    bad.appid = BAD_APPID
  elseif b.appid ~= nil and m and m.appids and not m.appids[b.appid] then
    -- the merchant's WeChat Pay client sends its appid and the appids it
    -- lists only (it would refuse the prepay once the payment is stored:
    -- a 502 for what is the caller's slip, or the operator's); another
    -- is allowed in the merchant's entry
    local names = {}
    for a in pairs(m.appids) do names[#names + 1] = a end
    table.sort(names)
    local list = appids_key(m)
    -- ("or omitted" only where omitting it fills the default in)
    local omit = m.appid and " or omitted" or ""
    bad.appid = #names == 1
      and "must be the merchant's appid (" .. names[1] .. ")" .. omit
          .. "; to pay under another too, list it in " .. list
      or "must be one of the merchant's appids (" .. table.concat(names,
          ", ") .. ")" .. omit .. "; to pay under another, add it to " .. list
  end
  if m then check_payer_of(out, m.partner, out.sub_appid, bad) end
  out.appid = b.appid or (m and m.appid)
  if m and not out.appid then
    bad.appid = "the merchant has no appid configured: give one"
  end
  if next(bad) then return nil, bad end
  return out
end

-- WeChat --------------------------------------------------------------------

local function rfc3339_beijing(t)
  return os.date("!%Y-%m-%dT%H:%M:%S+08:00", t + 8 * 3600)
end

local function client_of(p)
  return ctx.wx[p.mchid]
end

-- A payment whose merchant was taken out of config.merchants since (and
-- the gateway reloaded) has no WeChat Pay client: nothing it needs from
-- WeChat can be done (was: the call raised on the missing client, a 500,
-- and a switch left its attempt marked as closing). Its local state stays
-- readable; each call that needs WeChat is refused before it touches
-- anything, and counted on /metrics per merchant, so an operator sees
-- what still needs the merchant configured.
local unconfigured_counter

--- syntax: err = payments.merchant_not_configured(p[, what])
-- returns: nil when payment (or refund row) p's merchant is configured,
-- else a paygate error of kind merchant_not_configured naming the mchid
-- and the config key (counted). what: the row's name (default "payment").
function _M.merchant_not_configured(p, what)
  if ctx.wx[p.mchid] then return nil end
  unconfigured_counter = unconfigured_counter or metrics.counter(
    "paygate_gateway_merchant_not_configured_total",
    "Calls to WeChat Pay not made (merchant API refusals, checks skipped)"
    .. " for payments of a merchant no longer in config.merchants.",
    { "merchant" })
  unconfigured_counter:inc({ merchant = tostring(p.mchid) })
  return paygate.error("merchant_not_configured", ("%s %s is under"
    .. " merchant %s, which is no longer in config.merchants: WeChat Pay"
    .. " cannot be called for it. Add the merchant to config.merchants again"
    .. " (and reload) to close, switch or refund it; its state can still be"
    .. " read"):format(what or "payment", tostring(p.id), tostring(p.mchid)))
end

-- The merchant API's answer when payment p's merchant is not configured
-- (409, nothing touched; not kept for the Idempotency-Key: the merchant
-- configured again, the same request runs), else nil.
function _M.unconfigured(p)
  local err = _M.merchant_not_configured(p)
  if not err then return nil end
  return 409, err_body("merchant_not_configured", err.message,
                       { mchid = p.mchid, payment = model.payment_json(p) })
end

local function sub_of(p)
  return model.opt(p.sub_mchid)
end

-- The prepay of attempt `no` for payment row p with the channel's fields
-- in o. returns: pay (what the payer's side needs), or nil, err.
local function prepay(p, no, o)
  local wx = client_of(p)
  local partner = ctx.by_mchid[p.mchid].partner
  local req = { description = p.description, out_trade_no = no,
                notify_url = ctx.notify_url(p.mchid),
                amount = { total = p.amount, currency = p.currency },
                time_expire = rfc3339_beijing(p.expires_at) }
  local sub_appid = model.opt(p.sub_appid)
  if partner then
    req.sp_appid, req.sub_mchid, req.sub_appid = p.appid, sub_of(p),
                                                 sub_appid
  else
    req.appid = p.appid
  end
  if model.opt(p.attach) then req.attach = p.attach end
  local ch = o.channel
  -- the field the payer goes as: a partner prepay's payer is sp_openid
  -- or sub_openid, as named; an openid is the payer's under one appid:
  -- under the sub-merchant's own (sub_appid given) it is that appid's,
  -- sub_openid
  local payer_as = not partner and "openid"
                   or o.payer_as ~= "openid" and o.payer_as
                   or sub_appid and "sub_openid" or "sp_openid"
  if ch == "jsapi" then
    req.payer = { [payer_as] = o.openid }
  elseif ch == "h5" then
    req.scene_info = { payer_client_ip = o.client_ip,
                       h5_info = { type = o.h5_type or "Wap" } }
  end
  local data, err = wx[ch .. "_prepay"](wx, req)
  if not data then return nil, err end
  if ch == "native" then return { code_url = data.code_url } end
  if ch == "h5" then return { h5_url = data.h5_url } end
  -- signed for the appid that ordered, the one whose page, mini program
  -- or App opens the payment: the sub-merchant's own when given (WeChat
  -- refuses a paySign made for another); for a JSAPI payer, sub_appid
  -- only when the payer went as its sub_openid: an sp_openid is the
  -- payer's under sp_appid, whose page opens the payment
  local appid = sub_appid or p.appid
  local params
  if ch == "jsapi" then
    if payer_as ~= "sub_openid" then appid = p.appid end
    params, err = wx:jsapi_pay_params(appid, data.prepay_id)
  else
    params, err = wx:app_pay_params(appid, data.prepay_id, sub_of(p))
  end
  if not params then return nil, err end
  return params
end

-- Closes at WeChat attempt `no` of payment p, which another attempt
-- replaced while its prepay was on the way (nobody must pay it). A close
-- that fails leaves it open at WeChat: the transaction that superseded or
-- closed it here set its close_check_at, so the payment checks close it
-- later (money taken on it meanwhile is a late payment, handled as such).
local function close_superseded(p, no)
  local ok, err = client_of(p):close(no, sub_of(p))
  if not ok and err.kind == "order_paid" then
    -- paid before the close: not left open, a payment to apply (its
    -- notification, or the attempt's check, applies it as late)
    paygate.log.warn("gateway: a superseded attempt was paid before its"
      .. " close; its notification or the payment checks apply it as a late"
      .. " payment", { out_trade_no = no })
    return
  elseif not ok and err.kind ~= "not_found" then
    paygate.log.warn("gateway: closing a superseded attempt failed; the"
      .. " payment checks close it later", { out_trade_no = no,
      kind = err.kind, reason = tostring(err.message) })
    return
  end
  -- (its prepay has answered: an order WeChat does not know is never made)
  local cok, cerr = model.close_confirmed(ctx.db, no)
  if not cok then
    paygate.log.warn("gateway: cannot record a superseded attempt closed;"
      .. " the payment checks close it again", { out_trade_no = no,
                                                 error = tostring(cerr) })
  end
end

-- The attempt's prepay recorded and the payment opened (created ->
-- paying), the answer stored with them. An attempt superseded while its
-- prepay was on the way (a create of the same order_id under another
-- Idempotency-Key resumed the payment) is not handed out: it is closed
-- at WeChat and the answer is 409 conflict. So is one of a payment that
-- ended meanwhile (closed while the prepay was on the way: 409
-- invalid_state).
local function opened(p, no, pay, ik, status, actor)
  local a, b, c = fsm.retry(ctx.db, function(tx)
    local row, err = model.payment(tx, p.id)
    if not row then return nil, err end
    if row.out_trade_no ~= no then
      return { superseded = row }
    end
    if row.state ~= "created" and row.state ~= "paying"
       and row.state ~= "unknown" then
      -- the payment ended while the prepay was on the way (a close that
      -- found this attempt not yet made at WeChat): nothing to hand out
      return { ended = row }
    end
    -- the attempt written only while still open: on PostgreSQL (READ
    -- COMMITTED) a resumed create or a switch can commit between the read
    -- above and this write (it supersedes the attempt, without moving the
    -- payment's version), and the transition below would then open the
    -- payment with this attempt's code handed out. Once written, the
    -- attempt is held until the commit: whoever supersedes it waits.
    local ok
    ok, err = tx:exec("UPDATE gw_attempts SET prepay = $2 WHERE"
                      .. " out_trade_no = $1 AND state = 'open'",
                      { no, json.encode(pay) })
    if not ok then return nil, err end
    if ok.changes ~= 1 then
      row, err = model.payment(tx, p.id)   -- as it is now
      if not row then return nil, err end
      if row.out_trade_no ~= no then return { superseded = row } end
      return { ended = row }
    end
    -- created -> paying; unknown (an earlier prepay's outcome was not
    -- known, and the resumed create settled it) -> paying
    local event = row.state == "created" and "opened"
                  or row.state == "unknown" and "still_open"
    if event then
      local res
      res, err = P:transition(tx, p.id, event, {
        row = row, cause = "prepay", actor = actor,
        evidence = { out_trade_no = no }, set = { updated_at = model.time() } })
      if not res then return nil, err end
      row = res.row
      ok, err = events.emit(tx, "payment.paying", row)
      if not ok then return nil, err end
    end
    -- when the pay stops working: from the attempt's row, as a GET of
    -- the payment's attempts says it
    local at
    at, err = tx:query("SELECT channel, created_at FROM gw_attempts WHERE"
                       .. " out_trade_no = $1", { no })
    if not at then return nil, err end
    return ik:respond(tx, status, { payment = model.payment_json(row),
      pay = pay, pay_expires_at = model.pay_expires_at(at[1].channel,
                                    at[1].created_at, row.expires_at) })
  end)
  if type(a) == "table" and a.superseded then
    close_superseded(p, no)
    return 409, err_body("conflict", "the payment moved to another attempt"
      .. " while this one was being made (a request for the same payment"
      .. " at the same time)", { payment = model.payment_json(a.superseded) })
  end
  if type(a) == "table" and a.ended then
    -- (not the attempt the payment was paid through: its notification
    -- came before the prepay's answer. WeChat refuses to close a paid
    -- order, and the payment checks have nothing to do about it)
    if model.opt(a.ended.paid_out_trade_no) ~= no then
      close_superseded(p, no)
    end
    local st = a.ended.state
    return 409, err_body((st == "paid" or st == "partially_refunded"
                          or st == "refunded") and "payment_paid"
                         or "invalid_state", "payment " .. p.id .. " became "
      .. st .. " while this attempt was being made (a close or a payment"
      .. " at the same time)", { payment = model.payment_json(a.ended) })
  end
  return a, b, c
end

-- A prepay that may have reached WeChat (maybe_sent): the payment's
-- outcome is not known (created / paying -> unknown, payment.unknown);
-- reconciliation, or a resumed create, settles it by a query.
-- returns: the payment row as it now is (or nil: the store failed, logged)
local function outcome_unknown(p, no, werr, actor)
  local row, err = fsm.retry(ctx.db, function(tx)
    -- (PostgreSQL: the attempt locked first. A resumed create supersedes
    -- it and moves the payment to its new attempt without changing the
    -- payment's version: read unlocked, the payment could be read on this
    -- attempt before that commit and moved to unknown after it. Locked,
    -- the read below waits for the resume and sees it: model.lock_attempt)
    local locked, lerr = model.lock_attempt(tx, no)
    if not locked then return nil, lerr end
    local cur, terr = model.payment(tx, p.id)
    if not cur then return nil, terr end
    if not P:can(cur.state, "outcome_unknown")
       or cur.out_trade_no ~= no then
      -- moved on meanwhile (paid, closed), or to another attempt (a create
      -- of the same order_id resumed it): the unknown one is not current
      return cur
    end
    local res
    res, terr = P:transition(tx, p.id, "outcome_unknown", {
      row = cur, cause = "prepay", actor = actor,
      evidence = { out_trade_no = no, kind = werr.kind, code = werr.code,
                   request_id = werr.request_id },
      set = { updated_at = model.time() } })
    if not res then return nil, terr end
    local ok
    ok, terr = events.emit(tx, "payment.unknown", res.row)
    if not ok then return nil, terr end
    return res.row
  end)
  if not row then
    paygate.log.error("gateway: cannot record an unknown prepay outcome",
                      { payment = p.id, error = tostring(err) })
    return nil
  end
  return row
end

-- The answer to a failed prepay of attempt `no`.
local function prepay_failed(p, no, err, actor)
  local unknown = _M.maybe_sent(err)
  -- reason: why (the client's message, which quotes no secret: "configure
  -- public_key and public_key_id", "not the configured public_key_id ...",
  -- WeChat's code and message); the kind alone left the operator reading
  -- the log unable to tell, when only the 502 body had it
  paygate.log.warn("gateway: prepay failed", { payment = p.id,
                   kind = err.kind, reason = tostring(err.message),
                   outcome = unknown and "unknown" or "not_sent" })
  local extra
  if unknown then
    local row = outcome_unknown(p, no, err, actor)
    if row then extra = { payment = model.payment_json(row) } end
    if row and row.out_trade_no ~= no then close_superseded(p, no) end
  end
  return _M.wx_failure(err, extra)
end

local function actor_of(req)
  return "app:" .. tostring(req.app_id)
end

-- (sub_appid: the one its order at WeChat is made under, nil for none)
local function insert_attempt(tx, p, n, channel, now, sub_appid)
  return tx:exec("INSERT INTO gw_attempts (out_trade_no, payment_id, n,"
    .. " channel, state, created_at, sub_appid) VALUES ($1, $2, $3, $4,"
    .. " 'open', $5, $6)",
    { model.out_trade_no(p.id, n), p.id, n, channel, now,
      sub_appid or json.null, n = 6 })
end

-- (PostgreSQL: a transaction that moves a payment off or onto an attempt,
-- or decides on what a read of it says, locks the attempt's row first,
-- then reads the payment: model.lock_attempt says why)
local lock_attempt = model.lock_attempt

local function load_own(req, q)
  local p, err = model.payment(q or ctx.db, req.params.id)
  if p == nil then return nil, err end
  if not p or p.app_id ~= req.app_id then return false end
  return p
end
_M.load_own = load_own

-- the answer when the store failed: its kind only (the store's own
-- message, SQL and all, goes to the log, not to the client)
local function store_failed(err)
  paygate.log.error("gateway: store failed", { error = tostring(err) })
  return 503, err_body("unavailable", "the store failed; retry ("
                       .. tostring(err and err.kind) .. ")")
end
_M.store_failed = store_failed

-- POST /v1/payments ---------------------------------------------------------

-- A create of an order whose payment is `unknown` (its last prepay may
-- have reached WeChat): asks WeChat about that attempt first.
-- returns: nothing when the attempt holds no money and is closed (or was
-- never made), so the create resumes with a new attempt; else the answer
-- (the payment paid or being paid: applied, 409; WeChat not reachable:
-- 5xx, the payment stays unknown)
local function settle_unknown(old)
  local wx = client_of(old)
  local txn, qerr = wx:query_by_out_trade_no(old.out_trade_no, sub_of(old))
  local ts = txn and txn.trade_state
  if not txn and qerr.kind ~= "not_found" then
    return _M.wx_failure(qerr, { payment = model.payment_json(old) })
  end
  if ts == "NOTPAY" then
    -- made, never handed out: closed, so nobody can pay it later
    local ok, cerr = wx:close(old.out_trade_no, sub_of(old))
    if not ok and cerr.kind ~= "not_found" then
      if cerr.kind ~= "order_paid" then
        return _M.wx_failure(cerr, { payment = model.payment_json(old) })
      end
      ts = "SUCCESS"
    end
  end
  if ts == nil or ts == "NOTPAY" or ts == "CLOSED" or ts == "REVOKED"
     or ts == "PAYERROR" then
    paygate.log.info("gateway: unknown prepay settled; create resumed",
                     { payment = old.id, out_trade_no = old.out_trade_no,
                       trade_state = ts or "ORDER_NOT_EXIST" })
    return nil
  end
  -- paid (or being paid): what WeChat says is applied, the create refused
  local ok, rerr = _M.refresh(old)
  if not ok then
    return _M.wx_failure(rerr, { payment = model.payment_json(old) })
  end
  local now_p = model.payment(ctx.db, old.id) or old
  return 409, err_body("payment_exists", "a payment with this order_id"
    .. " exists", { payment = model.payment_json(now_p) })
end

function _M.create(req, ik)
  local b, st, eb = body_of(req)
  if not b then return st, eb end
  local o, bad = check_create(b)
  if not o then return bad_request(bad) end
  if ctx.degraded() then return degraded() end
  local now = model.time()
  local actor = actor_of(req)
  -- a payment that handed nothing out yet (its prepay failed) is resumed
  -- with a new attempt: `created` (the prepay certainly did not reach
  -- WeChat) at once, `unknown` (it may have) once a query settled the
  -- attempt (settle_unknown); any other is a conflict
  local settled                     -- the unknown attempt settled
  local p, err
  for _ = 1, 2 do
    p, err = fsm.retry(ctx.db, function(tx)
      local rows, qerr = tx:query("SELECT * FROM gw_payments WHERE app_id ="
        .. " $1 AND order_id = $2", { req.app_id, o.order_id })
      if not rows then return nil, qerr end
      local old = rows[1]
      if old then
        if old.mchid ~= o.merchant.mchid
           or model.opt(old.sub_mchid) ~= o.sub_mchid then
          -- never resumed under another merchant: its attempts are that
          -- merchant's at WeChat (closed, checked, notified there). Was:
          -- resumed with the first merchant kept, so a create corrected
          -- after WeChat refused a wrong sub_mchid was refused again,
          -- for good
          return { other_merchant = old }
        end
        if old.state == "unknown" and old.out_trade_no ~= settled then
          return { unknown = old }
        end
        if old.state ~= "created" and old.state ~= "unknown" then
          return { exists = old }
        end
        local n = old.attempt + 1
        local res
        -- (closed at WeChat, if made there, by the request that made it, or
        -- by settle_unknown; the payment checks make sure: close_check_at)
        res, qerr = tx:exec("UPDATE gw_attempts SET state = 'superseded',"
          .. " closed_at = $2, close_check_at = $3 WHERE payment_id = $1"
          .. " AND state = 'open'",
          { old.id, now, model.close_check_at(ctx, old.mchid) })
        if not res then return nil, qerr end
        -- (sub_appid too: a create corrected after WeChat refused one not
        -- bound to the sub-merchant resumes the payment under the right one)
        res, qerr = tx:exec("UPDATE gw_payments SET channel = $2, amount = $3,"
          .. " currency = $4, description = $5, attach = $6, appid = $7,"
          .. " out_trade_no = $8, attempt = $9, expires_at = $10, updated_at"
          .. " = $11, sub_appid = $14 WHERE id = $1 AND state = $13 AND"
          .. " attempt = $12",
          { old.id, o.channel, o.amount, o.currency, o.description,
            o.attach or json.null, o.appid,
            model.out_trade_no(old.id, n), n, floor(now) + o.expires_in, now,
            old.attempt, old.state, o.sub_appid or json.null, n = 14 })
        if not res then return nil, qerr end
        if res.changes ~= 1 then
          return nil, paygate.error("stale_version", "payment moved",
                                    { retryable = true })
        end
        res, qerr = insert_attempt(tx, old, n, o.channel, now, o.sub_appid)
        if not res then return nil, qerr end
        local ok
        ok, qerr = audit.append(tx, "payment:" .. old.id, {
          what = "payment.attempt", ref = model.out_trade_no(old.id, n),
          from = old.state, to = old.state, cause = "resume", actor = actor,
          evidence = { channel = o.channel, attempt = n,
                       settled = settled } })
        if not ok then return nil, qerr end
        return model.payment(tx, old.id)
      end
      local id = model.new_payment_id()
      local row = {
        id = id, app_id = req.app_id, order_id = o.order_id,
        mchid = o.merchant.mchid, sub_mchid = o.sub_mchid or json.null,
        sub_appid = o.sub_appid or json.null,
        appid = o.appid, channel = o.channel, amount = o.amount,
        currency = o.currency, description = o.description,
        attach = o.attach or json.null,
        out_trade_no = model.out_trade_no(id, 1), attempt = 1, refunded = 0,
        expires_at = floor(now) + o.expires_in, created_at = now,
        updated_at = now,
        checks = 0 }
      local res
      res, qerr = P:create(tx, row, { cause = "create", actor = actor,
        evidence = { order_id = o.order_id, amount = o.amount,
                     channel = o.channel } })
      if not res then return nil, qerr end
      local ok
      ok, qerr = insert_attempt(tx, res.row, 1, o.channel, now, o.sub_appid)
      if not ok then return nil, qerr end
      return model.payment(tx, id)
    end)
    if not (p and p.unknown) then break end
    if settled then
      -- settled, yet unknown again with another attempt: a concurrent
      -- create resumed it
      return 409, err_body("conflict", "the payment was resumed at the"
        .. " same time", { payment = model.payment_json(p.unknown) })
    end
    local s1, s2, s3 = settle_unknown(p.unknown)
    if s1 then return s1, s2, s3 end
    settled = p.unknown.out_trade_no
  end
  if not p then
    if type(err) == "table" and err.kind == "constraint" then
      return 409, err_body("payment_exists", "a payment with this order_id"
                           .. " exists")
    end
    return store_failed(err)
  end
  if p.exists then
    return 409, err_body("payment_exists", "a payment with this order_id"
      .. " exists", { payment = model.payment_json(p.exists) })
  end
  if p.other_merchant then
    local old = p.other_merchant
    local sub = model.opt(old.sub_mchid)
    return 409, err_body("payment_exists", "a payment with this order_id"
      .. " exists for merchant " .. old.mchid .. (sub and (" sub_mchid "
      .. sub) or "") .. ": it is never moved to another mchid or"
      .. " sub_mchid; create the payment under a new order_id",
      { payment = model.payment_json(old) })
  end
  local pay
  pay, err = prepay(p, p.out_trade_no, o)
  if not pay then return prepay_failed(p, p.out_trade_no, err, actor) end
  local s1, s2, s3 = opened(p, p.out_trade_no, pay, ik, 201, actor)
  if s1 == nil then return store_failed(s2) end
  return s1, s2, s3
end

-- POST /v1/payments/:id/attempts --------------------------------------------

local OPEN = { created = true, paying = true, unknown = true }

local function state_conflict(p)
  local kind = (p.state == "paid" or p.state == "partially_refunded"
                or p.state == "refunded") and "payment_paid"
               or "invalid_state"
  return 409, err_body(kind, "payment " .. p.id .. " is " .. p.state,
                       { payment = model.payment_json(p) })
end

-- Closes the payment's current attempt at WeChat (one never made counts
-- as closed). returns: nothing when closed (and true as the second value
-- when WeChat closed it; when it did not know it, its prepay may still be
-- on the way), else the answer: 409 payment_paid (paid_message) when it
-- was paid, or the failed call's.
local PAID = { SUCCESS = true, REFUND = true }

local function close_current(p, paid_message)
  local wx, sub = client_of(p), sub_of(p)
  local ok, cerr = wx:close(p.out_trade_no, sub)
  if ok then return nil, true end
  if cerr.kind == "not_found" then return nil, false end
  if cerr.kind == "order_paid" then
    return 409, err_body("payment_paid", paid_message)
  end
  if _M.maybe_sent(cerr) then
    -- the close may have been made and its answer lost (a timeout after
    -- sending, WeChat's 5xx, an answer that did not verify): asked once.
    -- CLOSED is this close done -- answering 5xx instead left the attempt
    -- the payment's, and the next check, reading CLOSED, closed the
    -- payment the merchant had asked to switch to another channel
    local txn = wx:query_by_out_trade_no(p.out_trade_no, sub)
    local ts = type(txn) == "table" and txn.trade_state
    if ts == "CLOSED" then return nil, true end
    if PAID[ts] then
      return 409, err_body("payment_paid", paid_message)
    end
  end
  return _M.wx_failure(cerr)
end

function _M.new_attempt(req, ik)
  local b, st, eb = body_of(req)
  if not b then return st, eb end
  local o, bad = {}, {}
  unknown_fields(b, ATTEMPT_FIELDS, bad)
  check_channel(b, o, bad)
  if next(bad) then return bad_request(bad) end
  local p, err = load_own(req)
  if p == nil then return store_failed(err) end
  if not p then return not_found("payment") end
  -- (a service provider's payment is the one with a sub_mchid: known
  -- even when its merchant was taken out of the config since)
  check_payer_of(o, model.opt(p.sub_mchid) ~= nil, model.opt(p.sub_appid),
                 bad)
  if next(bad) then return bad_request(bad) end
  if not OPEN[p.state] then return state_conflict(p) end
  local now = model.time()
  if p.expires_at <= now then
    return 409, err_body("payment_expired", "payment " .. p.id
                         .. " expired; create a new one")
  end
  -- the new attempt's time_expire is the payment's: WeChat is reported
  -- to refuse one less than a minute ahead (a margin for clocks and the
  -- trip on top)
  if p.expires_at - now < ATTEMPT_MIN_LEFT then
    return 409, err_body("payment_expired", ("payment %s expires in %d s:"
      .. " too soon for a new attempt (WeChat wants its time_expire at"
      .. " least a minute ahead); create a new one"):format(p.id,
      floor(p.expires_at - now)))
  end
  -- every attempt of a payment is made under its appid: one its merchant
  -- no longer lists (taken out of the config since) is refused by the
  -- merchant's WeChat Pay client. Checked before anything is touched: the
  -- prepay refused after the close below left the payer's code closed at
  -- WeChat for nothing, and answered 502 wechat_error (invalid_params)
  local us, ub = _M.unconfigured(p)
  if us then return us, ub end
  local m = ctx.by_mchid[p.mchid]
  if m and m.appids and not m.appids[p.appid] then
    return 409, err_body("appid_not_configured", ("payment %s is under"
      .. " appid %s, which merchant %s no longer lists: every attempt of a"
      .. " payment is made under its appid. List %s in %s (and reload), or"
      .. " create a new payment under a new order_id; the current attempt"
      .. " stays as it is"):format(p.id, p.appid, p.mchid, p.appid,
      appids_key(m)), { appid = p.appid, payment = model.payment_json(p) })
  end
  if ctx.degraded() then return degraded() end
  -- the attempt marked as being closed for this switch first, if the
  -- payment is still open on it: a payment check or ?refresh=1 that reads
  -- CLOSED for it before the switch is recorded takes that for this close,
  -- not for the payment's end (model.switching)
  local mres, merr = ctx.db:exec("UPDATE gw_attempts SET close_check_at ="
    .. " $2 WHERE out_trade_no = $1 AND state = 'open' AND EXISTS (SELECT 1"
    .. " FROM gw_payments WHERE id = $3 AND attempt = $4 AND state IN"
    .. " ('created', 'paying', 'unknown'))", { p.out_trade_no,
    model.close_check_at(ctx, p.mchid), p.id, p.attempt })
  if not mres then return store_failed(merr) end
  if mres.changes ~= 1 then
    local now_p = model.payment(ctx.db, p.id) or p
    if not OPEN[now_p.state] then return state_conflict(now_p) end
    return 409, err_body("conflict", "another attempt was opened at the"
                         .. " same time")
  end
  -- close the previous attempt at WeChat first: a payer holding its
  -- code must not be able to pay it once another is out
  local cs, cb, ch = close_current(p, "the previous attempt was paid; its"
                                   .. " notification applies it")
  if cs then
    -- no switch: the attempt stays the payment's (a crash before this
    -- leaves the mark to the payment checks, which drop it)
    local ok, uerr = model.unmark_switch(ctx.db, p.out_trade_no)
    if not ok then
      paygate.log.warn("gateway: cannot unmark an attempt after a failed"
        .. " switch; the payment checks do", { out_trade_no = p.out_trade_no,
                                               error = tostring(uerr) })
    end
    return cs, cb, ch
  end
  local confirmed = cb and p.out_trade_no or ""
  local actor = actor_of(req)
  local n = p.attempt + 1
  local no = model.out_trade_no(p.id, n)
  local row
  row, err = fsm.retry(ctx.db, function(tx)
    -- (the attempt first, as a close or a refresh takes it: lock_attempt)
    local res, qerr = lock_attempt(tx, p.out_trade_no)
    if not res then return nil, qerr end
    res, qerr = tx:exec("UPDATE gw_payments SET channel = $2,"
      .. " out_trade_no = $3, attempt = $4, updated_at = $5 WHERE id = $1 AND"
      .. " attempt = $6 AND state IN ('created', 'paying', 'unknown')",
      { p.id, o.channel, no, n, now, p.attempt })
    if not res then return nil, qerr end
    if res.changes ~= 1 then
      -- (before any attempt is touched: the open one is another
      -- request's now)
      return { conflict = true }
    end
    -- the one WeChat closed above is done; any other (not known at WeChat
    -- yet: a prepay on its way) is left to the payment checks
    res, qerr = tx:exec("UPDATE gw_attempts SET state = 'superseded',"
      .. " closed_at = $2, close_check_at = CASE WHEN out_trade_no = $3"
      .. " THEN NULL ELSE CAST($4 AS BIGINT) END WHERE payment_id = $1 AND"
      .. " state = 'open'",
      { p.id, now, confirmed, model.close_check_at(ctx, p.mchid) })
    if not res then return nil, qerr end
    -- (under the payment's sub_appid: a switch keeps the appids)
    res, qerr = insert_attempt(tx, p, n, o.channel, now,
                               model.opt(p.sub_appid))
    if not res then return nil, qerr end
    local ok
    ok, qerr = audit.append(tx, "payment:" .. p.id, {
      what = "payment.attempt", ref = no, from = p.state, to = p.state,
      cause = "new_attempt", actor = actor,
      evidence = { channel = o.channel, attempt = n,
                   closed = p.out_trade_no } })
    if not ok then return nil, qerr end
    return model.payment(tx, p.id)
  end)
  if not row then
    if type(err) == "table" and err.kind == "constraint" then
      return 409, err_body("conflict", "another attempt was opened at the"
                           .. " same time")
    end
    return store_failed(err)
  end
  if row.conflict then
    local now_p = model.payment(ctx.db, p.id) or p
    if not OPEN[now_p.state] then return state_conflict(now_p) end
    return 409, err_body("conflict", "another attempt was opened at the"
                         .. " same time")
  end
  local pay
  pay, err = prepay(row, no, o)
  if not pay then return prepay_failed(row, no, err, actor) end
  local s1, s2, s3 = opened(row, no, pay, ik, 201, actor)
  if s1 == nil then return store_failed(s2) end
  return s1, s2, s3
end

-- POST /v1/payments/:id/close -----------------------------------------------

function _M.close(req, ik)
  if req.body and req.body:find("%S") then
    -- a close takes no fields: no body, or {}
    local b, st, eb = body_of(req)
    if not b then return st, eb end
    local bad = {}
    unknown_fields(b, NO_FIELDS, bad)
    if next(bad) then return bad_request(bad) end
  end
  local p, err = load_own(req)
  if p == nil then return store_failed(err) end
  if not p then return not_found("payment") end
  if p.state == "closed" then
    return 200, model.payment_json(p)
  end
  if not OPEN[p.state] then return state_conflict(p) end
  local us, ub = _M.unconfigured(p)
  if us then return us, ub end
  if ctx.degraded() then return degraded() end
  local cs, cb, ch = close_current(p, "the payment was paid; its"
                                   .. " notification applies it")
  if cs then return cs, cb, ch end
  local confirmed = cb and p.out_trade_no or nil
  local now = model.time()
  local a, b, c = fsm.retry(ctx.db, function(tx)
    -- (the attempt WeChat closed locked first: a switch committed after
    -- the payment's read below would otherwise go unseen, and this close
    -- close the payment and the switch's new attempt: lock_attempt)
    local cur, qerr = lock_attempt(tx, p.out_trade_no)
    if not cur then return nil, qerr end
    cur, qerr = model.payment(tx, p.id)
    if not cur then return nil, qerr end
    if cur.attempt ~= p.attempt and OPEN[cur.state] then
      -- a new attempt was opened while WeChat closed the one read above:
      -- it is open at WeChat, so this close does not cover it
      return { conflict = true }
    end
    if not OPEN[cur.state] then
      -- it moved on while WeChat closed the attempt (a late payment on a
      -- superseded attempt made it paid): nothing to close. Answered
      -- without trying the transition, which the machine would refuse
      -- and count as illegal (the alert meant for real bugs)
      return ik:respond(tx, state_conflict(cur))
    end
    local res, terr = P:transition(tx, p.id, "closed", {
      cause = "close", actor = actor_of(req), row = cur,
      evidence = { out_trade_no = p.out_trade_no },
      set = { updated_at = now } })
    if not res then return nil, terr end
    local x
    x, terr = model.close_attempts(ctx, tx, cur, now, confirmed)
    if not x then return nil, terr end
    x, terr = events.emit(tx, "payment.closed", res.row)
    if not x then return nil, terr end
    return ik:respond(tx, 200, model.payment_json(res.row))
  end)
  if a == nil then return store_failed(b) end
  if type(a) == "table" and a.conflict then
    -- kept for this Idempotency-Key like any 409: closing the new
    -- attempt is a new request, with a new key
    return 409, err_body("conflict", "another attempt was opened while"
                         .. " closing; close again with a new"
                         .. " Idempotency-Key")
  end
  return a, b, c
end

-- GET /v1/payments/:id ------------------------------------------------------

--- syntax: outcome, err = payments.refresh(p)
-- Asks WeChat about the payment's current attempt (and its refunds still
-- under way) and applies the answers through the machines, as the payment
-- checks (gw.reconcile) would: an order WeChat does not know
-- (ORDER_NOT_EXIST) means nothing before the payment's expiry (its prepay
-- may be on the way) and closes an open payment after it (nobody can pay
-- it any more); an open payment WeChat has NOTPAY past its expiry is
-- closed at WeChat first (then CLOSED), and a close refused ORDER_PAID
-- (paid in between) is followed by a second query, whose SUCCESS is
-- applied.
-- returns: true and WeChat's trade_state of the attempt
-- ("ORDER_NOT_EXIST" when WeChat has no such order), or nil, err (WeChat
-- could not be asked: stale data).
function _M.refresh(p)
  -- (its merchant taken out of the config: nothing can be asked, the
  -- caller answers the local state)
  local merr = _M.merchant_not_configured(p)
  if merr then return nil, merr end
  -- WeChat asked as the payment checks ask it (one implementation: the
  -- query, the answer's order checked, an expired NOTPAY closed there and
  -- ORDER_PAID asked again); what it answers is applied below
  local check, err = reconcile.check_payment(client_of(p), p,
                                             { now = model.time() })
  if not check then return nil, err end
  local ts, txn = check.remote, check.transaction
  local closed_by_us = check.closed_by_us
  if ts == "ORDER_NOT_EXIST" and not check.event then
    return true, ts       -- before its expiry: nothing (its prepay may come)
  end
  local after
  local ok, aerr = fsm.retry(ctx.db, function(tx)
    if ts == "SUCCESS" or ts == "REFUND" then
      local outcome, list = apply.payment(ctx, tx, {
        resource = txn, source = "query", via = "refresh",
        actor = "gateway:query", answered_at = check.answered_at })
      if not outcome then return nil, list end
      after = list
      return true
    end
    -- (the attempt asked about locked first: a switch committed between
    -- the payment's read below and the switching() one would otherwise
    -- pass both, and the answer about the old attempt close or fail the
    -- payment on its new one: lock_attempt)
    local row, rerr = lock_attempt(tx, p.out_trade_no)
    if not row then return nil, rerr end
    row, rerr = model.payment(tx, p.id)
    if not row then return nil, rerr end
    if row.out_trade_no ~= p.out_trade_no then
      -- moved to a new attempt meanwhile: the answer is about the old one
      -- (CLOSED: the new attempt's request closed it), not this one
      return true
    end
    if (ts == "CLOSED" or ts == "ORDER_NOT_EXIST")
       and model.switching(tx, p.out_trade_no) then
      -- a new attempt's request closed it and has not recorded the
      -- switch yet: the payment goes on with that attempt
      return true
    end
    local event
    if ts == "CLOSED" and OPEN[row.state] then
      event = "closed"
    elseif ts == "ORDER_NOT_EXIST" and OPEN[row.state]
           and model.time() >= (tonumber(row.expires_at) or math.huge) then
      -- never made at WeChat, and past its expiry: closed, as the
      -- payment checks close it
      event = "closed"
    elseif ts == "PAYERROR" and OPEN[row.state] then
      event = "failed"
    elseif (ts == "NOTPAY" or ts == "USERPAYING") and row.state == "unknown"
    then
      event = "still_open"
    end
    if not event then return true end
    local res
    res, rerr = P:transition(tx, p.id, event, { row = row, cause = "query",
      actor = "gateway:query", evidence = { trade_state = ts,
      out_trade_no = p.out_trade_no, closed_by = closed_by_us
      and "gateway:query" or nil }, set = { updated_at = model.time() } })
    if not res then return nil, rerr end
    if event == "still_open" then
      -- unknown -> paying: its event, like every transition's (a merchant
      -- told payment.unknown learns the attempt is open after all)
      local x
      x, rerr = events.emit(tx, "payment.paying", res.row)
      if not x then return nil, rerr end
    end
    if event == "closed" or event == "failed" then
      local x
      -- CLOSED: WeChat closed this attempt; PAYERROR: the payer may still
      -- pay it, so the payment checks close it at WeChat
      x, rerr = model.close_attempts(ctx, tx, row, model.time(),
                                     event == "closed" and p.out_trade_no)
      if not x then return nil, rerr end
      x, rerr = events.emit(tx, "payment." .. event, res.row)
      if not x then return nil, rerr end
    end
    return true
  end)
  if not ok then return nil, aerr end
  if after then _M.after(after) end
  if ts == "ORDER_NOT_EXIST" then return true, ts end   -- (never paid)
  if ctx.refunds and ctx.refunds.refresh_open then
    local rok, rerr = ctx.refunds.refresh_open(p)
    if not rok then return nil, rerr end
  end
  return true, ts
end

--- syntax: payments.after(list) -- work that waits for a commit
-- { refund = id }: send that refund; { close = out_trade_no, mchid,
-- sub_mchid }: close a superseded attempt at WeChat. Runs in its own task.
function _M.after(list)
  if not list or not list[1] then return end
  paygate.spawn(function()
    for _, w in ipairs(list) do
      if ctx.degraded() then
        -- no call while degraded: a refund stays created (the refund
        -- checks send it once the switch is off); a superseded attempt
        -- left open at WeChat is closed by the payment checks once the
        -- switch is off (its close_check_at; money taken on it meanwhile
        -- is a late payment, handled as such)
        paygate.log.warn("gateway: degraded: work after a commit left for"
          .. " later", { refund = w.refund, close = w.close })
        break
      end
      if w.refund then
        local ok, err = pcall(ctx.refunds.send, w.refund)
        if not ok then
          paygate.log.error("gateway: late refund failed",
                            { refund = w.refund, error = tostring(err) })
        end
      elseif w.close and not ctx.wx[w.mchid] then
        -- (its merchant taken out of the config: the payment checks skip
        -- it too, until the merchant is configured again)
        paygate.log.warn("gateway: a superseded attempt of a merchant no"
          .. " longer configured left open at WeChat", { out_trade_no =
          w.close, mchid = w.mchid })
      elseif w.close then
        local wx = ctx.wx[w.mchid]
        local ok, err = wx:close(w.close, w.sub_mchid)
        if ok then
          ok, err = model.close_confirmed(ctx.db, w.close)
        end
        -- (not_found: maybe its prepay is still on the way; the payment
        -- checks ask again once it is over)
        if not ok and err.kind == "order_paid" then
          paygate.log.warn("gateway: a superseded attempt was paid before"
            .. " its close; its notification or the payment checks apply"
            .. " it as a late payment", { out_trade_no = w.close })
        elseif not ok and err.kind ~= "not_found" then
          paygate.log.warn("gateway: closing a superseded attempt failed;"
            .. " the payment checks close it later",
            { out_trade_no = w.close, kind = err.kind,
              reason = tostring(err.message) })
        end
      end
    end
  end)
end

--- syntax: asked, status, body = payments.refresh_asked(req)
-- The ?refresh of a GET (the payment's, the refunds'): true for
-- refresh=1, false without it, else nil and the 400 to answer, which
-- also names each other parameter (they take no other).
local QUERY_PARAMS = { refresh = true }
function _M.refresh_asked(req)
  -- (refresh=yes, =true or =0 would otherwise answer local state with no
  -- word that nothing was asked; so would a misspelt ?refersh=1)
  local q, given = req:query()
  local bad = {}
  unknown_fields(q, QUERY_PARAMS, bad)
  for k in pairs(bad) do
    bad[k] = "unknown parameter" .. suggest.hint(k, QUERY_PARAMS)
  end
  -- (given twice, the last would count: refresh=0&refresh=1 asking WeChat
  -- and refresh=1&refresh=0 refused)
  if (given.refresh or 0) > 1 then
    bad.refresh = "given more than once"
  elseif q.refresh ~= nil and q.refresh ~= "1" then
    bad.refresh = "must be 1 (or left out)"
  end
  if next(bad) then return nil, bad_request(bad) end
  return q.refresh == "1"
end

function _M.get(req)
  local refresh, st, eb = _M.refresh_asked(req)
  if refresh == nil then return st, eb end
  local p, err = load_own(req)
  if p == nil then return store_failed(err) end
  if not p then return not_found("payment") end
  -- degraded: the local state, marked stale (nothing asks WeChat, and the
  -- reconciliation runners that catch up lost notifications are paused)
  local stale = ctx.degraded() or nil
  if refresh and not stale then
    local ok, rerr = _M.refresh(p)
    if not ok then
      paygate.log.warn("gateway: refresh failed; answering local state",
                       { payment = p.id, kind = rerr and rerr.kind,
                         reason = rerr and tostring(rerr.message) })
      stale = true
    end
    p = model.payment(ctx.db, p.id) or p
  end
  local attempts, refunds
  attempts, err = model.attempts(ctx.db, p.id)
  if not attempts then return store_failed(err) end
  refunds, err = model.refunds_of(ctx.db, p.id)
  if not refunds then return store_failed(err) end
  local t = model.payment_json(p, attempts, refunds)
  if stale then t.stale = true end
  return 200, t
end

return _M
