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
local json = require "cjson.safe"
local certs = require "paygate.wechatpay.certs"
local resource = require "paygate.wechatpay.resource"

local type, pcall, tostring = type, pcall, tostring
local null = json.null

local _M = {}

-- A replay key outlives the window a little (clock steps, slow handlers).
_M.REPLAY_TTL = 330

local function fail(kind, msg)
  return nil, core.error(kind, msg)
end

local function str(v)
  if type(v) == "string" then return v end
  return nil
end

local function parse(wx, req, opts)
  if type(req) ~= "table" and type(req) ~= "userdata" then
    return fail("malformed", "not a request")
  end
  local headers, body = req.headers, req.body
  if type(headers) ~= "table" then return fail("malformed", "no headers") end
  if type(body) ~= "string" or body == "" then
    return fail("malformed", "empty body")
  end
  local h, err = certs.verify(wx, headers, body, opts and opts.now)
  if not h then return nil, err end
  local doc = json.decode(body)
  if type(doc) ~= "table" then
    return fail("malformed", "body is not a JSON object")
  end
  local r = doc.resource
  if type(r) ~= "table" then
    return fail("malformed", "no resource object in the notification")
  end
  local plain
  plain, err = resource.decrypt(r, wx.conf.apiv3_keys)
  if not plain then return nil, err end
  local resource = json.decode(plain)
  if type(resource) ~= "table" then
    return fail("malformed", "decrypted resource is not a JSON object")
  end
  if not (opts and opts.replay == false) then
    local dict = wx.dict
    if not dict then
      return fail("replay_check_unavailable", "no paygate.shared dict "
        .. tostring(wx.conf.shared_dict) .. " to record notifications in; "
        .. "configure it or pass { replay = false }")
    end
    local key = "wechatpay:n:" .. h.nonce .. ":" .. h.timestamp .. ":"
                .. crypto.digest("sha1", h.signature)
    local ok = dict:add(key, true, _M.REPLAY_TTL)
    if not ok then
      return fail("replayed", "this notification (same nonce, timestamp "
                  .. "and signature) was already accepted")
    end
  end
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
-- failure is nil, err.
function _M.parse_notification(wx, req, opts)
  local ok, ev, err = pcall(parse, wx, req, opts)
  if not ok then
    return nil, core.error("malformed", "notification: "
                           .. tostring(ev):sub(1, 200))
  end
  if ev == nil and err ~= nil then
    err.message = "notification: " .. err.message
  end
  if ev ~= nil and ev.resource == null then ev.resource = nil end
  return ev, err
end

return _M
