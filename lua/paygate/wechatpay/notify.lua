-- paygate.wechatpay.notify: parses a WeChat Pay callback notification:
-- headers, timestamp window, serial, signature over the raw body, replay,
-- decryption of the resource, JSON.
--
-- A replay is the same (nonce, timestamp, signature) accepted once already
-- within the timestamp window, on any worker of the instance (paygate.shared).
-- A genuine WeChat retry carries the same notification id with a new nonce
-- and signature: it is not a replay and parses normally; deduplicating by
-- id and state is the application's durable job.
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local json = require "paygate.json"  -- hardened decoder, same null
local certs = require "paygate.wechatpay.certs"
local resource = require "paygate.wechatpay.resource"
local rotation = require "paygate.wechatpay.rotation"
local verify = require "paygate.wechatpay.verify"

local type, pcall, tostring, ipairs = type, pcall, tostring, ipairs
local null = json.null
local decode = json.decode

-- Whether JSON text s is an array: its first byte past JSON's blanks is
-- "[" (byte by byte: a pattern find would stop the JIT on this path).
local byte, sub = string.byte, string.sub
local function starts_array(s)
  for i = 1, #s do
    local b = byte(s, i)
    if b == 91 then return true end                   -- [
    if b ~= 32 and b ~= 9 and b ~= 10 and b ~= 13 then return false end
  end
  return false
end

local _M = {}

-- A replay key outlives the window a little (clock steps, slow handlers).
-- The window is judged on the notification's own timestamp: one stamped
-- ahead of our clock stays fresh until timestamp + 300 s, so its record
-- lives that much longer (up to 630 s), never less than REPLAY_TTL.
_M.REPLAY_TTL = 330

local function replay_ttl(ts, now)
  local ahead = (tonumber(ts) or 0) - now
  if ahead > 0 then return _M.REPLAY_TTL + ahead end
  return _M.REPLAY_TTL
end
_M.replay_ttl = replay_ttl

local function fail(kind, msg)
  return nil, core.error(kind, msg)
end

local function str(v)
  if type(v) == "string" then return v end
  return nil
end

-- The decrypted resource of a payment or refund notification: the fields
-- an application reads, checked for type where present (the whole
-- notification is signed by WeChat, but a handler must never bind a table
-- as an id or store "lots" as an amount). Other products' resources pass
-- unchecked.
local STRINGS = { "mchid", "appid", "sp_mchid", "sub_mchid", "sp_appid",
  "sub_appid", "out_trade_no", "transaction_id", "trade_type", "trade_state",
  "trade_state_desc", "bank_type", "attach", "success_time", "out_refund_no",
  "refund_id", "refund_status", "user_received_account" }
local AMOUNT_INTS = { "total", "payer_total", "refund", "payer_refund" }
local AMOUNT_STRINGS = { "currency", "payer_currency" }

local function what(v)
  local t = type(v)
  if t == "table" then return "an object or array" end
  return "a " .. t
end

-- nil, err for the first of keys in t given and not a string
local function strings(t, keys, prefix)
  for _, k in ipairs(keys) do
    local v = t[k]
    if v ~= nil and v ~= null and type(v) ~= "string" then
      return fail("malformed", "resource field " .. prefix .. k .. " must be"
                  .. " a string (got " .. what(v) .. ")")
    end
  end
  return true
end

local function checked(r, event_type)
  -- (prefixes compared as substrings: a pattern find ends the JIT's trace)
  if sub(event_type, 1, 12) ~= "TRANSACTION." and sub(event_type, 1, 7)
     ~= "REFUND." then
    return true
  end
  local ok, err = strings(r, STRINGS, "")
  if not ok then return nil, err end
  local a = r.amount
  if a ~= nil and a ~= null then
    if type(a) ~= "table" then
      return fail("malformed", "resource field amount must be an object (got "
                  .. what(a) .. ")")
    end
    for _, k in ipairs(AMOUNT_INTS) do
      local v = a[k]
      if v ~= nil and v ~= null and (type(v) ~= "number" or v ~= v
         or v < 0 or v >= 2 ^ 53 or v % 1 ~= 0) then
        return fail("malformed", "resource field amount." .. k .. " must be"
                    .. " a whole number of fen, 0 or more")
      end
    end
    ok, err = strings(a, AMOUNT_STRINGS, "amount.")
    if not ok then return nil, err end
  end
  local payer = r.payer
  if payer ~= nil and payer ~= null and type(payer) ~= "table" then
    return fail("malformed", "resource field payer must be an object (got "
                .. what(payer) .. ")")
  end
  return true
end

local function parse(wx, req, opts)
  if type(req) ~= "table" and type(req) ~= "userdata" then
    return fail("malformed", "not a request")
  end
  -- the server's request answers each header from its head (req:header):
  -- no req.headers table is built for the five a notification needs
  local headers, body = req, req.body
  if type(req) == "table" then
    headers = req.headers
    if type(headers) ~= "table" then
      return fail("malformed", "no headers")
    end
  end
  if type(body) ~= "string" or body == "" then
    return fail("malformed", "empty body")
  end
  -- (untrusted: a notification's headers come from whoever POSTs)
  local h, err = certs.verify(wx, headers, body, opts and opts.now, true)
  if not h then
    if err.retry_in then
      -- no download ran (the rate limit): a later try may find the key
      err.message = err.message .. "; WeChat retries the notification"
    end
    return nil, err
  end
  local doc = decode(body)
  if type(doc) ~= "table" then
    return fail("malformed", "body is not a JSON object")
  end
  -- the id is what a retry repeats and an application deduplicates by;
  -- the event type says what the resource is
  if type(doc.id) ~= "string" or doc.id == "" then
    return fail("malformed", "the notification has no id (a string)")
  end
  if type(doc.event_type) ~= "string" or doc.event_type == "" then
    return fail("malformed", "the notification has no event_type (a string)")
  end
  local r = doc.resource
  if type(r) ~= "table" then
    return fail("malformed", "no resource object in the notification")
  end
  local plain, used
  plain, err, used = resource.decrypt(r, wx.conf.apiv3_keys,
                                      wx.conf.key_names)
  if not plain then return nil, err end
  -- an array is a table too, [] an empty one: its fields would all read
  -- absent, and a handler would fail on it instead of the parse. Told by
  -- its first byte, before it is decoded.
  local resource = not starts_array(plain) and decode(plain)
  if type(resource) ~= "table" then
    return fail("malformed", "decrypted resource is not a JSON object")
  end
  local cok, cerr = checked(resource, doc.event_type)
  if not cok then return nil, cerr end
  if not (opts and opts.replay == false) then
    local dict = wx.replay_dict
    if not dict then
      return fail("replay_check_unavailable", "no paygate.shared dict "
        .. tostring(wx.replay_dict_name) .. " to record notifications in; "
        .. "configure it or pass { replay = false }")
    end
    local key = "wechatpay:n:" .. h.nonce .. ":" .. h.timestamp .. ":"
                .. crypto.digest("sha1", h.signature)
    -- safe_add never evicts a live record to make room: a record pushed
    -- out early would let its replay through. A full dict answers
    -- no_memory instead, and the notification is refused (WeChat sends
    -- it again later), never accepted unchecked.
    local ok, aerr = dict:safe_add(key, true, replay_ttl(h.timestamp,
                                   opts and opts.now or core.time()))
    if ok == false then
      return fail("replayed", "this notification (same nonce, timestamp "
                  .. "and signature) was already accepted")
    elseif not ok then
      return nil, core.error("replay_check_unavailable", "cannot record "
        .. "the notification in paygate.shared dict "
        .. tostring(wx.replay_dict_name) .. " (" .. tostring(aerr)
        .. "): refused unchecked; size the dict for the window "
        .. "(docs/wechatpay.md)", { retryable = true })
    end
  end
  -- signed by WeChat, encrypted under a previous key: WeChat is not on
  -- the current one yet (counted, said once an hour; rotation.lua)
  if used > 1 then rotation.observe(wx, "notification", used) end
  return {
    id = str(doc.id), event_type = str(doc.event_type),
    create_time = str(doc.create_time), summary = str(doc.summary),
    resource_type = str(doc.resource_type),
    original_type = str(r.original_type),
    resource = resource, serial = h.serial,
  }
end

--- syntax: event, err = notify.parse_notification(wx, req[, opts])
-- opts: replay = false skips the replay check; now = epoch seconds to
-- judge the timestamp by (tools, known-answer tests). Never raises: any
-- failure is nil, err (a Lua error inside: kind internal).
function _M.parse_notification(wx, req, opts)
  local ok, ev, err = pcall(parse, wx, req, opts)
  if not ok then
    -- parse checks what it reads before using it: a raise is a fault of
    -- this side (kind internal: a gateway answers it 500), not of the input
    return nil, core.error("internal", "notification: "
                           .. tostring(ev):sub(1, 200))
  end
  if ev == nil and err ~= nil then
    err.message = "notification: " .. err.message
  end
  if ev ~= nil and ev.resource == null then ev.resource = nil end
  return ev, err
end

-- a header's value as text fit for a record: printable ASCII, bounded
local function hval(headers, name)
  local v = verify.header(headers, name)
  if type(v) ~= "string" then return nil end
  return (v:sub(1, 128):gsub("[^\32-\126]", "?"))
end

-- a claimed identifier: short, and only the characters WeChat uses
local function ident(v)
  if type(v) ~= "string" or v == "" or #v > 64
     or v:find("[^%w_%-%.|*@]") then
    return nil
  end
  return v
end

--- syntax: facts = notify.facts(wx, req)
-- What can be learnt from a notification, typically one that
-- parse_notification refused, for a record of why it was refused:
--   serial, timestamp (its headers, as printable text), id, event_type
--   (the body's claims: unauthenticated), and, when the resource decrypts
--   under one of the APIv3 keys (then whoever sent it holds that key),
--   authentic = true with the out_trade_no, out_refund_no,
--   transaction_id, trade_state, refund_status it names. Nothing of the
--   decrypted resource is kept but those fields. Never raises; no replay
--   record is made; the signature is not checked (that is what failed).
function _M.facts(wx, req)
  local f = { authentic = false }
  local ok = pcall(function()
    -- the same source of headers as parse: the request itself when it
    -- is the server's, so the record shows what parse judged
    local headers = type(req) == "userdata" and req or req.headers
    if type(headers) == "table" or type(headers) == "userdata" then
      f.serial = hval(headers, "wechatpay-serial")
      f.timestamp = hval(headers, "wechatpay-timestamp")
    end
    local body = req.body
    if type(body) ~= "string" or body == "" or #body > 1048576 then return end
    local doc = decode(body)
    if type(doc) ~= "table" then return end
    f.id, f.event_type = ident(doc.id), ident(doc.event_type)
    if type(doc.resource) ~= "table" then return end
    local plain = resource.decrypt(doc.resource, wx.conf.apiv3_keys)
    local r = plain and decode(plain)
    if type(r) ~= "table" then return end
    f.authentic = true
    for _, k in ipairs({ "out_trade_no", "out_refund_no", "transaction_id",
                         "trade_state", "refund_status" }) do
      f[k] = ident(r[k])
    end
  end)
  if not ok then f.authentic = false end
  return f
end

return _M
