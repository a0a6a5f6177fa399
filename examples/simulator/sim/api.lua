-- sim.api: what every /v3 route of the simulator shares: the request is
-- recorded (GET /sim/requests), injected faults are applied, the
-- Authorization header is checked as WeChat Pay checks it, and the answer
-- is written the WeChat Pay way: 2xx signed (204 too), errors unsigned
-- with { code, message[, detail] }, a Request-ID on both.
--
--   api.route("GET", "/v3/pay/transactions/out-trade-no/:no", "query",
--     function(req, c)        -- c: { m, serial, body, query, params, now }
--       (c.now: WeChat's clock, sim.clock, what a handler judges and writes)
--       return 200, { ... }   -- or nil, api.err(404, "ORDER_NOT_EXIST", ..)
--     end)
local paygate = require "paygate"
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local utf8 = require "paygate.utf8"
local validate = require "paygate.wechatpay.validate"
local sign = require "paygate.wechatpay.sign"
local json = require "sim.json"
local faults = require "sim.faults"
local config = require "sim.config"
local identity = require "sim.identity"
local clock = require "sim.clock"
local rfc3339 = require("sim.certificates").rfc3339
local http_date_text = require("paygate.civil").http_date_text

local type, tostring, tonumber, setmetatable, pairs =
      type, tostring, tonumber, setmetatable, pairs

local _M = {}

local S = { cfg = nil, dict = nil }
local nonce_room, nonce_full

-- How many requests GET /sim/requests keeps (the most recent).
_M.KEEP_REQUESTS = 1000
-- SIGN_ERROR's detail echoes at most this much of the signing string it
-- rebuilt (the real server truncates too; its limit is not known).
_M.ECHO_BYTES = 1024

-- Request-ID suffixes (the internal code after the last "-"), where the
-- meaning is known; 0 on success. By code, and (the names that are no
-- code) for the answers WeChat's handbook gives a code of their own, set
-- as e.suffix where they are made: REENTRY 请求重入时，参数与首次请求时不一致,
-- EXTRA 参数中含有非法的额外参数, OPENID JSAPI支付必须传openid,
-- NO_RELATION 受理关系不存在, PAID_AGAIN 该订单已支付 (a prepay of a paid
-- order; ORDER_PAID's own is 订单已支付, the close's).
local SUFFIX = {
  ORDER_NOT_EXIST = "268512771", FREQUENCY_LIMITED = "268447840",
  PARAM_ERROR = "268435461", ORDER_PAID = "268449538",
  SIGN_ERROR = "268443699", APPID_MCHID_NOT_MATCH = "268445527",
  REENTRY = "268498688", EXTRA = "270924358", OPENID = "268501013",
  NO_RELATION = "268443701", PAID_AGAIN = "268498689",
}

local err_mt = { __tostring = function(e)
  return e.status .. " " .. e.code .. ": " .. e.message
end }

--- syntax: e = api.err(status, code, message[, detail])
-- An error answer (unsigned): status, { code, message[, detail] }.
function _M.err(status, code, message, detail)
  return setmetatable({ status = status, code = code, message = message,
                        detail = detail }, err_mt)
end
local err = _M.err

--- syntax: s = api.kind(v) -- what a JSON value is, for a message
-- "an object", "an array" ("an empty object or array": the decoder
-- cannot tell {} from []), "a string", "a number", "a boolean", "null".
function _M.kind(v)
  local t = type(v)
  if t == "table" then
    if next(v) == nil then return "an empty object or array" end
    return validate.is_array(v) and "an array" or "an object"
  end
  if v == json.null then return "null" end
  return t == "number" and "a number" or t == "boolean" and "a boolean"
         or "a string"
end

--- syntax: s = api.shown(v[, max]) -- a request value as an answer echoes it
-- A string as valid UTF-8 (a bad byte written as U+FFFD), cut to max
-- characters when given; a number or a boolean as JSON writes it; null,
-- an object or an array by what it is (never a table's address).
function _M.shown(v, max)
  local t = type(v)
  if t == "nil" then return nil end
  if t == "number" or t == "boolean" then return tostring(v) end
  if t ~= "string" then return v == json.null and "null" or _M.kind(v) end
  local n = utf8.len(v)
  if n and (not max or n <= max) then return v end
  local out, i, len, chars = {}, 1, #v, 0
  while i <= len and (not max or chars < max) do
    local k = utf8.char_len(v, i)
    out[#out + 1] = k and v:sub(i, i + k - 1) or "\239\191\189"
    i, chars = i + (k or 1), chars + 1
  end
  return table.concat(out)
end
local shown = _M.shown

--- syntax: e = api.param_error(field, issue[, value[, location]])
-- 400 PARAM_ERROR naming the field as a JSON pointer ("/amount/total");
-- value, the one refused, is echoed as api.shown writes it.
function _M.param_error(field, issue, value, location)
  local path = field:sub(1, 1) == "/" and field or "/" .. field
  return err(400, "PARAM_ERROR", "输入源“/" .. (location or "body")
    .. path .. "”映射到值字段“" .. field .. "”校验失败：" .. issue,
    { field = field, value = shown(value), issue = issue,
      location = location or "body" })
end

--- syntax: e = api.invalid(field, message[, issue[, location]])
-- 400 INVALID_REQUEST naming the field; location "body" unless given
-- ("query" for a query parameter).
function _M.invalid(field, message, issue, location)
  return err(400, "INVALID_REQUEST", message,
             { field = field, issue = issue or message,
               location = location or "body" })
end

--- syntax: s = api.request_id([suffix]) -- a Request-ID: 42 upper-case
-- hex digits, "-", suffix (an internal code; 0, success, by default).
-- Every Request-ID the simulator sends (answers, notifications) is made
-- here.
local function request_id(suffix)
  return crypto.hex(crypto.random_bytes(21)):upper() .. "-" .. (suffix or 0)
end
_M.request_id = request_id

-- GET /sim/requests: a ring in the shared dict, so every worker's
-- requests are listed.
local function record(entry)
  local d = S.dict
  local n = d:incr("sim:req:n", 1, 0)
  entry.seq = n
  d:set("sim:req:" .. n, json.encode(entry), 3600)
  if n > _M.KEEP_REQUESTS then d:delete("sim:req:" .. (n - _M.KEEP_REQUESTS)) end
end

--- syntax: list = api.requests([since]) -- recorded requests, oldest first
function _M.requests(since)
  local d = S.dict
  local n = d:get("sim:req:n") or 0
  local first = math.max(1, n - _M.KEEP_REQUESTS + 1, (since or 0) + 1)
  local out = {}
  for i = first, n do
    local s = d:get("sim:req:" .. i)
    if s then out[#out + 1] = json.decode(s) end
  end
  return out
end

function _M.clear_requests()
  local d = S.dict
  local n = d:get("sim:req:n") or 0
  for i = math.max(1, n - _M.KEEP_REQUESTS + 1), n do
    d:delete("sim:req:" .. i)
  end
end

-- The nonces of the replay check share the "paygate" dictionary with the
-- simulator's own state (faults and their counts, the request log); at a
-- high request rate they would fill it. They take at most NONCE_SHARE of
-- it: past that a request's nonce is not recorded (its replay would pass;
-- said in the log once a minute, with the size to configure), and the
-- rest of the dictionary stays for that state, which is then never
-- evicted. Checked every NONCE_EVERY requests (d:stats()).
_M.NONCE_SHARE = 0.75
local NONCE_EVERY = 64
local nonce = { n = 0, room = true, said = -math.huge }

nonce_room = function()
  nonce.n = nonce.n + 1
  if nonce.n >= NONCE_EVERY then
    nonce.n = 0
    local st = S.dict:stats()
    nonce.room = st.used < st.capacity * _M.NONCE_SHARE
  end
  if not nonce.room then nonce_full() end
  return nonce.room
end

nonce_full = function()
  nonce.room = false
  local now = core.mono()
  if now - nonce.said >= 60 then
    nonce.said = now
    paygate.log.warn("simulator: the replay check records no more nonces:"
      .. " the shared dictionary \"paygate\" is full enough; a replayed"
      .. " request would pass. Configure shared = { paygate = \"64m\" }"
      .. " (about 150 bytes per request within twice timestamp_window)",
      { capacity = S.dict:stats().capacity })
  end
end

-- A request header's value, read from the head without building
-- req.headers; a header sent twice reads as req.headers has it (the
-- values joined by ", ": an Authorization twice then fails its parse).
local function header(req, name)
  if type(req) == "table" then
    return req.headers[name]          -- { headers, body }
  end
  local v, n = req:header(name)
  if n and n > 1 then return req.headers[name] end
  return v
end
_M.header = header

local function sign_error(message, detail)
  return err(401, "SIGN_ERROR", message, detail)
end

--- syntax: parts, why = api.multipart(req)
-- A multipart/form-data body (a media upload): { name = { headers, data,
-- filename } } for each part, or nil and why it is not one. Hostile
-- input: a missing or odd boundary, no closing delimiter, a part without
-- Content-Disposition name, a name twice -- each refused.
function _M.multipart(req)
  local ct = header(req, "content-type")
  if type(ct) ~= "string" or not ct:lower():find("^multipart/form%-data") then
    return nil, "Content-Type is not multipart/form-data"
  end
  local b = ct:match(';%s*[Bb][Oo][Uu][Nn][Dd][Aa][Rr][Yy]="([^"]+)"')
            or ct:match(";%s*[Bb][Oo][Uu][Nn][Dd][Aa][Rr][Yy]=([^;%s]+)")
  if not b or #b > 70 then return nil, "no boundary (1-70 characters)" end
  local body, delim = req.body or "", "--" .. b
  local pos = body:find(delim, 1, true)
  if pos ~= 1 then return nil, "the body does not start with the boundary" end
  local parts, n = {}, 0
  pos = #delim + 1
  while true do
    if body:sub(pos, pos + 1) == "--" then break end      -- the end
    if body:sub(pos, pos + 1) ~= "\r\n" then
      return nil, "a boundary line not ended by CRLF"
    end
    local head_end = body:find("\r\n\r\n", pos + 2, true)
    if not head_end then return nil, "a part without the end of its head" end
    local head = body:sub(pos + 2, head_end - 1)
    local nxt = body:find("\r\n" .. delim, head_end + 4, true)
    if not nxt then return nil, "no closing boundary" end
    local hs = {}
    for line in (head .. "\r\n"):gmatch("(.-)\r\n") do
      local k, v = line:match("^([%w%-]+):%s*(.-)%s*$")
      if not k then return nil, "a bad part header line" end
      hs[k:lower()] = v
    end
    local cd = hs["content-disposition"] or ""
    local name = cd:match('^form%-data;.-%f[%w]name="([^"]*)"')
    if not name then return nil, "a part without a form-data name" end
    if parts[name] then return nil, "part " .. name .. " twice" end
    n = n + 1
    if n > 8 then return nil, "too many parts" end
    parts[name] = { headers = hs, data = body:sub(head_end + 4, nxt - 1),
                    filename = cd:match('filename="([^"]*)"') }
    pos = nxt + 2 + #delim
  end
  return parts
end

--- syntax: m, e = api.authenticate(req, target[, signed_body])
-- Checks the Authorization header (over signed_body when given: a
-- multipart upload's meta JSON). returns: the configured merchant (the
-- Authorization's mchid), or nil, e (an api.err).
function _M.authenticate(req, target, signed_body)
  local auth = header(req, "authorization")
  if type(auth) ~= "string" or auth == "" then
    return nil, sign_error("Http头缺少Authorization", { field =
      "Authorization", location = "header", issue = "missing" })
  end
  local a, why = sign.parse_authorization(auth)
  if not a then
    return nil, sign_error("Http头Authorization值格式错误，请参考《微信支付商户"
      .. "REST API签名规则》", { field = "Authorization", location = "header",
      issue = why })
  end
  if a.schema ~= S.cfg.sign_type then
    return nil, sign_error("Http头Authorization中的认证类型有误，应为"
      .. S.cfg.sign_type, { field = "schema", location = "authorization",
      value = shown(a.schema, 64) })
  end
  local m = S.cfg.by_mchid[a.mchid]
  if not m then
    return nil, sign_error("Http头Authorization中的mchid有误：商户号不存在",
      { field = "mchid", location = "authorization",
        value = shown(a.mchid, 64) })
  end
  -- WeChat's answer says the timestamp may "not exceed" 5 minutes (不得
  -- 超过): 300 s itself passes here; the client refuses at 300 s (the
  -- SDKs' >=), the stricter side, so the two never disagree in its favour.
  -- Judged in whole seconds, as the timestamp is: with the clock's
  -- fraction a request of exactly 300 s was refused but in the first
  -- instant of a second
  local ts = a.timestamp:match("^[1-9]%d*$") and tonumber(a.timestamp)
  local now = clock.now()                           -- WeChat's clock
  if not ts or #a.timestamp > 12
     or math.abs(math.floor(now) - ts) > S.cfg.timestamp_window then
    return nil, sign_error("Http头Authorization中的timestamp与发起请求的时间"
      .. "不得超过5分钟", { field = "timestamp", location = "authorization",
      value = shown(a.timestamp, 32) })
  end
  if a.nonce_str == "" or #a.nonce_str > 64 then
    return nil, sign_error("Http头Authorization中的nonce_str有误",
      { field = "nonce_str", location = "authorization" })
  end
  local key = m.keys[config.serial_key(a.serial_no)]
  if not key then
    return nil, sign_error("商户证书序列号有误。请使用签名私钥匹配的证书序列号",
      { field = "serial_no", location = "authorization",
        value = shown(a.serial_no, 64) })
  end
  local msg = sign.request_message(req.method, target, a.timestamp,
                                   a.nonce_str, signed_body or req.body)
  local ok = crypto.verify_base64(key, msg, a.signature, S.cfg.sign_type)
  if not ok then
    return nil, sign_error("错误的签名，验签失败", {
      detail = { issue = "sign not match" }, field = "signature",
      location = "authorization",
      sign_information = { method = req.method,
        sign_message_length = #msg,
        truncated_sign_message = msg:sub(1, _M.ECHO_BYTES),
        url = target } })
  end
  -- (after the signature: a request that does not prove the key learns
  -- nothing of the certificate, its end date included)
  local expired = m.not_after[config.serial_key(a.serial_no)]
  if expired and expired <= now
     and not S.cfg.accept_expired_merchant_certificates then
    local at = rfc3339(expired)
    return nil, sign_error("商户API证书已过期：证书序列号" .. a.serial_no
      .. "的有效期至" .. at .. "。请更换有效的商户API证书",
      { field = "serial_no", location = "authorization",
        value = shown(a.serial_no, 64),
        issue = "merchant certificate expired at " .. at })
  end
  if S.cfg.replay_check then
    local k = "sim:nonce:" .. m.mchid .. ":" .. a.nonce_str
    local ok
    if nonce_room() then
      -- never evicting: an evicted entry could be the simulator's own
      -- state (a fault, its count) as well as an older nonce
      ok = S.dict:safe_add(k, true, 2 * S.cfg.timestamp_window + 10)
      if ok == nil then nonce_full() end
    else
      ok = S.dict:get(k) == nil      -- a recorded one is still refused
    end
    if ok == false then
      return nil, sign_error("Http头Authorization中的nonce_str重复：请求已处理过",
        { field = "nonce_str", location = "authorization" })
    end
  end
  return m
end

-- The Date header of a /v3 answer: WeChat's clock (sim.clock, at the
-- host's time now, default core.time()), as the Wechatpay-Timestamp it
-- signs is; WeChat's Date and timestamp come from one clock (the
-- runtime's Date would be the host's). nil at clock_offset 0: the
-- runtime's own Date (made once a second) is then WeChat's clock too.
local function date(now)
  if clock.offset == 0 then
    return nil
  end
  return http_date_text(clock.now(now))
end

local function error_answer(e, rid_suffix)
  local body = { code = e.code, message = e.message }
  if e.detail ~= nil then body.detail = e.detail end
  return e.status, json.encode(body), {
    ["Content-Type"] = "application/json; charset=utf-8",
    ["Request-ID"] = request_id(rid_suffix or SUFFIX[e.code] or "268435456"),
    ["Date"] = date(),
  }
end

-- A handler's failure that is no api.err (it raised, or returned nil and
-- another error): 500 SYSTEM_ERROR, WeChat's answer when its own side
-- fails, and the failure in the log with the Request-ID answered.
-- returns: status, body, headers
local function internal(endpoint, why)
  local status, body, headers = error_answer(err(500, "SYSTEM_ERROR",
                                                 "系统繁忙,请稍后重试"))
  paygate.log.error("simulator: internal failure: " .. tostring(why),
    { endpoint = endpoint, wechat_request_id = headers["Request-ID"] })
  return status, body, headers
end

-- xpcall's handler: the error with where it was raised
local function traceback(e)
  return debug.traceback(core.error_string(e), 2)
end

--- syntax: api.route(method, pattern, endpoint, fn[, opts])
-- fn(req, c) -> status, body (a table sent as JSON, a string as it is, or
-- nil for none)[, headers]; or nil, api.err(...). opts.raw: the success
-- answer is sent unsigned (bill files); opts.json = false: a POST body is
-- not decoded.
function _M.route(method, pattern, endpoint, fn, opts)
  opts = opts or {}
  faults.endpoint(endpoint, opts.raw)
  paygate.route(method, pattern, function(req)
    -- the signature is over the target as sent (dot-segments and all;
    -- an absolute-form target's path and query)
    local target = req.target
    if target:byte(1) ~= 47 then               -- not "/": absolute-form
      target = target:gsub("^%a[%w+.-]*://[^/?]*", "")
    end
    local entry = { time = core.time(), method = req.method, target = target,
                    endpoint = endpoint, worker = core.pid() }
    -- (protected: a handler that raises -- a bug, the state database
    -- failing -- is WeChat's 500 SYSTEM_ERROR with a Request-ID, not the
    -- runtime's {"error": "internal"}; logged once, with its traceback)
    local ok, status, body, headers = xpcall(_M.handle, traceback, req,
      target, endpoint, fn, opts, entry)
    if not ok then
      entry.code = "SYSTEM_ERROR"
      status, body, headers = internal(endpoint, status)
    end
    entry.status = status
    record(entry)
    return status, body, headers
  end)
end

-- The answer faults that change the body, before it is signed: the
-- signature covers what is sent, so the client gets past verification to
-- the body, and shows what it makes of an answer that verifies but is not
-- what the API returns. A 204 has no body, so one given a body becomes a
-- 200.
-- returns: status, body
local function spoil_body(f, status, body)
  if f.kind == "bad_body" then
    return status == 204 and 200 or status, f.body
  end
  if f.kind == "oversize_body" and #body < f.bytes then
    -- JSON whitespace after the answer: only its size is wrong
    return status == 204 and 200 or status,
           body .. (" "):rep(f.bytes - #body)
  end
  return status, body
end

local LATENCY = { latency = true, hold = true }
local NOT_LATENCY = { error = true, reset = true }
local WORK_TIME = 30        -- s the work after a latency fault may take

function _M.handle(req, target, endpoint, fn, opts, entry)
  -- a latency fault delays (a hold: until released, at most its seconds),
  -- then an error or reset fault may still apply.
  -- The work after the delay is done, as WeChat does it after a slow
  -- answer, however long the delay: the request's deadline (the server's
  -- limits.request_timeout, 30 s by default) is moved past it, or a
  -- delay near that timeout would cancel the handler before the work
  -- depending on which timer fires first
  local fault = faults.take(endpoint, "before", LATENCY)
  if fault then
    req:set_deadline(fault.seconds + WORK_TIME)
    if fault.kind == "hold" then
      entry.hold_fault = fault.id
      entry.hold_ended = faults.hold(fault)
    else
      entry.latency_fault = fault.id
      paygate.sleep(fault.seconds)
    end
  end
  fault = faults.take(endpoint, "before", NOT_LATENCY)
  if fault and fault.kind == "reset" then
    entry.fault = fault.id
    entry.code = "CONNECTION_RESET"
    req:drop()
    return nil
  end
  if fault and fault.kind == "error" then
    entry.fault = fault.id
    entry.code = fault.code
    return error_answer(err(fault.status, fault.code, fault.message))
  end
  if not req:header("accept") or not req:header("user-agent") then
    entry.code = "INVALID_REQUEST"
    return error_answer(err(400, "INVALID_REQUEST",
                            "Http头缺少Accept或User-Agent"))
  end
  local parts
  if opts.multipart then
    local why
    parts, why = _M.multipart(req)
    if not parts or not parts.meta then
      entry.code = "PARAM_ERROR"
      return error_answer(err(400, "PARAM_ERROR", "请求体不是合法的"
        .. "multipart/form-data：" .. (why or "no meta part"),
        { location = "body", issue = why or "no meta part" }))
    end
  end
  local m, e = _M.authenticate(req, target, parts and parts.meta.data)
  if not m then
    entry.code = e.code
    entry.issue = e.message
    return error_answer(e)
  end
  entry.mchid = m.mchid
  local c = { m = m, serial = header(req, "wechatpay-serial"),
              query = req:query(),
              params = req.params, now = clock.now(), req = req,
              parts = parts }
  if req.method == "POST" and opts.json ~= false and not opts.multipart then
    local doc, why = json.object(req.body)
    if not doc then
      entry.code = "PARAM_ERROR"
      return error_answer(err(400, "PARAM_ERROR", "请求体不是合法的JSON对象",
        { location = "body", issue = why:match("^[^:]*") }))
    end
    c.body = doc
  end
  local status, body, extra = fn(req, c)
  if status == nil then
    e = body
    if getmetatable(e) ~= err_mt then
      entry.code = "SYSTEM_ERROR"
      return internal(endpoint, core.error_string(body))
    end
    entry.code = e.code
    return error_answer(e, e.suffix)
  end
  local after = faults.take(endpoint, "after")
  if after and after.kind == "reset" then
    entry.fault = after.id
    entry.code = "CONNECTION_RESET"
    req:drop()
    return nil
  end
  if after and after.kind == "error" then
    entry.fault = after.id
    entry.code = after.code
    return error_answer(err(after.status, after.code, after.message))
  end
  if type(body) == "table" then body = json.encode(body) end
  body = body or ""
  if after then status, body = spoil_body(after, status, body) end
  local out = extra or {}
  local now = core.time()
  out["Date"] = date(now)
  if opts.raw then
    out["Request-ID"] = request_id(0)
    if after then entry.fault = after.id end
    return status, body, out
  end
  local sh = identity.sign_headers(body, { merchant = m,
    request_serial = c.serial, fault = after, now = now })
  for k, v in pairs(sh) do out[k] = v end
  if body ~= "" and not out["Content-Type"] then
    out["Content-Type"] = "application/json; charset=utf-8"
  end
  out["Request-ID"] = request_id(0)
  if after then entry.fault = after.id end
  return status, body, out
end

-- The codes of the runtime's own refusals under /v3, by status: a path
-- no route serves (404), a method its path has no route for (405, any
-- method: TRACE, a made-up one), a path parameter the runtime refuses
-- before any handler (400 bad_path: a dot-segment or a NUL once
-- percent-decoded). Each is this simulator's choice (WeChat's answers to
-- them are not known), in the shape of its other errors.
local REFUSED = {
  [404] = { "NOT_FOUND", "请求的资源不存在" },
  [405] = { "METHOD_NOT_ALLOWED", "请求方法不被允许：" },
  [400] = { "PARAM_ERROR", "请求路径中的参数不合法" },
}

--- syntax: api.refusals() -- once, at the start
-- An after hook: an answer under /v3 that the simulator did not make (it
-- has no Request-ID: the runtime's own 404, 405 and bad_path 400, whose
-- body is { error, message }) is answered in WeChat's error shape with a
-- Request-ID and WeChat's Date, unsigned; the runtime's Allow of a 405
-- stays. Refusals made before the app is reached (a body over
-- limits.body_bytes, a head too large or malformed, a timeout) never
-- come here: docs/simulator.md lists them.
function _M.refusals()
  paygate.after(function(req, res)
    local st, h = res.status, res.headers
    if type(st) ~= "number" or st < 400 or h["Request-ID"] ~= nil then
      return
    end
    local p = req.path
    if p ~= "/v3" and p:sub(1, 4) ~= "/v3/" then return end
    local r = REFUSED[st]
    local e
    if st == 405 then
      e = err(405, r[1], r[2] .. shown(req.method, 32))
    elseif r then
      local why = type(res.body) == "string" and json.decode(res.body)
      e = err(st, r[1], r[2], st == 400 and { location = "uri_template",
        issue = type(why) == "table" and shown(why.message, 200) or nil }
        or nil)
    else
      e = err(st, st >= 500 and "SYSTEM_ERROR" or "INVALID_REQUEST",
              st >= 500 and "系统繁忙,请稍后重试" or "请求被拒绝")
    end
    local status, body, headers = error_answer(e)
    for k, v in pairs(headers) do h[k] = v end
    res.status, res.body = status, body
  end)
end

--- syntax: api.init(cfg) -- once per worker, before routes serve
function _M.init(cfg)
  S.cfg = cfg
  S.dict = require("paygate.shared").get_dict("paygate")
end

_M.SUFFIX = SUFFIX

return _M
