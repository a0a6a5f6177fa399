-- sim.faults: faults injected per endpoint and per count, for chaos tests.
--
--   POST /sim/faults   { "endpoint": "prepay", "kind": "error",
--                        "status": 500, "code": "SYSTEM_ERROR",
--                        "count": 2 }            -> { "id": 3, ... }
--   DELETE /sim/faults                           -> removes every fault
--   POST /sim/faults/{id}/release                -> lets a hold's requests go
--
-- The registry lives in the instance's shared dict (paygate.shared
-- "paygate"), so a fault set through one worker applies on every worker,
-- and a fault with a count fires exactly count times across them (an
-- atomic incr per firing). Each fault is a key of its own under an id
-- from an atomic counter (no list read, changed and written back: two
-- workers adding at once would lose one); clearing raises a floor under
-- which ids are gone. Faults do not survive a restart.
--
-- faults.take(endpoint[, phase]) -> the fault to apply now, or nil. Every
-- /v3 route calls it once per request ("before" phase: latency, error,
-- "after" phase: what mangles a response already produced),
-- simB's deliverer calls it with its notification endpoint names.
--
-- A fault: { id, endpoint, kind, count (nil: every time), phase, and the
-- kind's fields }. Kinds (docs/simulator.md lists them with examples):
--   latency          before: sleep `seconds`, then answer normally
--   hold             before: wait until the fault is released (or
--                    cleared), at most `seconds` (60), then answer
--                    normally: a window a spec closes itself, seeing the
--                    request held (`held` in the list) instead of
--                    guessing how long it needs
--   error            before: answer `status` (500) with `code`
--                    (SYSTEM_ERROR) and `message`, doing nothing; with
--                    after = true: do the work (the order IS created),
--                    then answer the error instead of the result
--   bad_signature    after: the response carries a signature that does
--                    not verify (signtest = true: WECHATPAY/SIGNTEST/...)
--   stale_timestamp  after: signed correctly over a timestamp `skew`
--                    (600) seconds in the past
--   unknown_serial   after: signed correctly, Wechatpay-Serial names a
--                    key the client cannot know
--   reset            before: the connection is reset (req:drop()), nothing
--                    done; with after = true: the work is done first
--   expired_certificate  after: signed with a platform certificate of its
--                    own whose notAfter is `expires_in` (2) s after the
--                    fault was set (sim/identity.lua defines it)
--   bad_body         after: the 2xx carries `body` (an HTML page) instead
--                    of the API's JSON, signed over it
--   oversize_body    after: the answer padded with JSON whitespace to
--                    `bytes` (past the client's 16 MiB), signed over it
--
-- The endpoint of a fault must be a registered name (faults.endpoint(),
-- called by api.route for every /v3 route), "*", or "notify"; the
-- notification-only kinds (phase "notify") only go to "notify", and
-- latency, hold, error, reset and the kinds that change an answer
-- (bad_body, oversize_body) never to "notify". "*" is every /v3 endpoint, not
-- "notify". The signature kinds act on a signed answer only: "*"
-- passes over an endpoint whose answers are unsigned (the bill file), and
-- they cannot be set on one.
-- Other modules may add kinds (faults.define); simB adds the
-- notification ones.
local core = require "paygate.core"
local json = require "cjson.safe"

local type, tostring, pairs, ipairs, error = type, tostring, pairs, ipairs,
                                              error

local _M = {}

local DICT = "paygate"
local K_GEN, K_ID, K_FLOOR = "sim:faults:gen", "sim:faults:id",
                             "sim:faults:floor"
local function def_key(id) return "sim:faults:def:" .. id end
-- a hold's state, beside its definition: requests it holds now, and
-- whether it was released
local function held_key(id) return "sim:fault:held:" .. id end
local function released_key(id) return "sim:fault:released:" .. id end

-- kind -> { phase = "before" | "after" | "notify" | ..., check = fn }
-- An error fault's message when none is given: WeChat's words where the
-- protocol notes record them (SYSTEM_ERROR's from a real answer; the
-- others from the Request-ID code table)
local DEFAULT_MESSAGE = {
  SYSTEM_ERROR = "系统繁忙,请稍后重试",
  FREQUENCY_LIMITED = "请求频率超过限制",
}

local KINDS = {}

-- An error fault's code when none is given, by its status (see "error")
local STATUS_CODE = { [401] = "SIGN_ERROR", [403] = "NO_AUTH",
  [404] = "ORDER_NOT_EXIST", [429] = "FREQUENCY_LIMITED",
  [502] = "SERVICE_UNAVAILABLE", [503] = "SERVICE_UNAVAILABLE" }

--- syntax: faults.define(kind, phase, check[, fields])
-- check(f) validates the fault table given to POST /sim/faults (it may
-- fill defaults) and returns true or nil, why. phase is the default phase
-- ("before", "after", or a name the taker uses). fields: the keys the kind
-- takes beside endpoint, kind and count; any other key is refused (a typo
-- such as "cout" would leave a fault that fires on every request).
function _M.define(kind, phase, check, fields)
  if type(kind) ~= "string" or type(phase) ~= "string"
     or type(check) ~= "function" then
    error("faults.define: kind, phase must be strings, check a function", 2)
  end
  if KINDS[kind] then error("faults.define: kind " .. kind .. " exists", 2) end
  local known = { endpoint = true, kind = true, count = true }
  for _, k in ipairs(fields or {}) do known[k] = true end
  KINDS[kind] = { phase = phase, check = check, known = known }
end

local function num(f, k, default, min, max)
  local v = f[k]
  if v == nil then f[k] = default; return true end
  if type(v) ~= "number" or v ~= v or v < min or v > max then
    return nil, k .. " must be a number from " .. min .. " to " .. max
  end
  return true
end

_M.define("latency", "before", function(f)
  return num(f, "seconds", 1, 0, 600)
end, { "seconds" })
-- (the cap is what ends a hold a spec forgot to release, or one whose
-- spec died: long enough for a loaded machine, short enough that a run
-- is not left hanging)
_M.define("hold", "before", function(f)
  local ok, why = num(f, "seconds", 60, 0, 600)
  if not ok then return nil, why end
  return true
end, { "seconds" })
_M.define("error", "before", function(f)
  local ok, why = num(f, "status", 500, 400, 599)
  if not ok then return nil, why end
  if f.status ~= math.floor(f.status) then return nil, "status: integer" end
  if f.code ~= nil and (type(f.code) ~= "string" or #f.code > 64) then
    return nil, "code must be a string"
  end
  if f.message ~= nil and (type(f.message) ~= "string" or #f.message > 256)
  then
    return nil, "message must be a string"
  end
  if f.after ~= nil and type(f.after) ~= "boolean" then
    return nil, "after must be a boolean"
  end
  -- WeChat's codes by status: 401 SIGN_ERROR (the only code a 401
  -- carries), 403 NO_AUTH, 404 ORDER_NOT_EXIST (its table of statuses),
  -- 429 FREQUENCY_LIMITED, 502/503 SERVICE_UNAVAILABLE, another 5xx
  -- SYSTEM_ERROR, another 4xx INVALID_REQUEST
  f.code = f.code or STATUS_CODE[f.status]
           or (f.status >= 500 and "SYSTEM_ERROR") or "INVALID_REQUEST"
  f.message = f.message or DEFAULT_MESSAGE[f.code] or "injected fault"
  if f.after == true then f.phase = "after" end
  return true
end, { "status", "code", "message", "after" })
_M.define("bad_signature", "after", function(f)
  if f.signtest ~= nil and type(f.signtest) ~= "boolean" then
    return nil, "signtest must be a boolean"
  end
  return true
end, { "signtest" })
_M.define("stale_timestamp", "after", function(f)
  return num(f, "skew", 600, -86400 * 365, 86400 * 365)
end, { "skew" })
_M.define("unknown_serial", "after", function() return true end)
-- What a proxy, a captive portal or a misrouted base_url answers with a
-- 200: a page, not the API's JSON
local BAD_BODY = "<html><head><title>200 OK</title></head><body>OK</body>"
                 .. "</html>"
_M.define("bad_body", "after", function(f)
  if f.body == nil then f.body = BAD_BODY; return true end
  if type(f.body) ~= "string" or #f.body > 65536 then
    return nil, "body must be a string of at most 65536 bytes"
  end
  return true
end, { "body" })
-- The default is one byte past paygate.wechatpay's limit (16 MiB of
-- body: docs/wechatpay.md); the ceiling keeps a worker's answer within
-- what it can hold. (No fault makes a head past the client's 256 KiB: the
-- runtime sends at most 4 KiB of a handler's header lines.)
_M.define("oversize_body", "after", function(f)
  local ok, why = num(f, "bytes", 16 * 1024 * 1024 + 1, 1, 64 * 1024 * 1024)
  if not ok then return nil, why end
  if f.bytes ~= math.floor(f.bytes) then return nil, "bytes: integer" end
  return true
end, { "bytes" })
_M.define("reset", "before", function(f)
  if f.after ~= nil and type(f.after) ~= "boolean" then
    return nil, "after must be a boolean"
  end
  if f.after == true then f.phase = "after" end
  return true
end, { "after" })

local NOTIFY = "notify"
local ENDPOINTS = { ["*"] = true, [NOTIFY] = true }
-- (the answer kinds change a /v3 answer; a notification's body is what
-- the merchant verifies and decrypts, and its size is the receiver's)
local REQUEST_ONLY = { latency = true, hold = true, error = true,
                       reset = true, bad_body = true, oversize_body = true }
local SIGNATURE = { bad_signature = true, stale_timestamp = true,
                    unknown_serial = true, expired_certificate = true }
local UNSIGNED = {}             -- endpoints whose success is not signed

--- syntax: faults.endpoint(name[, unsigned]) -- a name faults may be set
-- on; unsigned = true: its answers carry no signature to spoil
function _M.endpoint(name, unsigned)
  if type(name) ~= "string" or name == "" then
    error("faults.endpoint: name must be a non-empty string", 2)
  end
  ENDPOINTS[name] = true
  if unsigned then UNSIGNED[name] = true end
end

local function endpoint_names()
  local names = {}
  for n in pairs(ENDPOINTS) do names[#names + 1] = '"' .. n .. '"' end
  table.sort(names)
  return table.concat(names, ", ")
end

-- (the handle looked up once: get_dict gives the same one every time,
-- and take() runs up to three times a request)
local dict_handle
local function dict()
  if not dict_handle then
    dict_handle = require("paygate.shared").get_dict(DICT)
  end
  return dict_handle
end

-- per worker: the list as last read and its generation
local cache = { gen = -1, list = {} }

-- (the generation is read before the faults: an add that lands while
-- they are read moves it, and the next call reads them again)
local function list()
  local d = dict()
  local gen = d:get(K_GEN) or 0
  if gen ~= cache.gen then
    local l = {}
    for id = (d:get(K_FLOOR) or 0) + 1, d:get(K_ID) or 0 do
      local f = json.decode(d:get(def_key(id)) or "null")
      if type(f) == "table" then l[#l + 1] = f end
    end
    cache.list = l
    cache.gen = gen
  end
  return cache.list, d
end

--- syntax: f, err = faults.add(spec)
-- spec: the decoded POST /sim/faults body. returns the stored fault (with
-- its id) or nil, why (a bad spec).
function _M.add(spec)
  if type(spec) ~= "table" then return nil, "body must be a JSON object" end
  if not ENDPOINTS[spec.endpoint] then
    return nil, "endpoint must be one of " .. endpoint_names()
  end
  local k = KINDS[spec.kind]
  if not k then
    local names = {}
    for n in pairs(KINDS) do names[#names + 1] = n end
    table.sort(names)
    return nil, "kind must be one of " .. table.concat(names, ", ")
  end
  if k.phase == NOTIFY and spec.endpoint ~= NOTIFY then
    return nil, "kind " .. spec.kind .. " is for endpoint \"notify\""
  end
  if REQUEST_ONLY[spec.kind] and spec.endpoint == NOTIFY then
    return nil, "kind " .. spec.kind .. " is not a notification fault"
  end
  if SIGNATURE[spec.kind] and UNSIGNED[spec.endpoint] then
    return nil, "kind " .. spec.kind .. " spoils a signature: endpoint "
                .. spec.endpoint .. " answers unsigned"
  end
  for key in pairs(spec) do
    if not k.known[key] then
      return nil, "unknown key " .. (type(key) == "string"
        and key:sub(1, 32):gsub("[^%w_]", "?") or "?") .. " for kind "
        .. spec.kind
    end
  end
  if spec.count ~= nil and (type(spec.count) ~= "number" or spec.count < 1
     or spec.count ~= math.floor(spec.count) or spec.count > 1e9) then
    return nil, "count must be a positive integer (absent: every time)"
  end
  local f = {}
  for key, v in pairs(spec) do f[key] = v end
  f.phase = k.phase
  local ok, why = k.check(f)
  if not ok then return nil, why end
  local d = dict()
  local id, ierr = d:incr(K_ID, 1, 0)
  if not id then return nil, "cannot number the fault: " .. tostring(ierr) end
  f.id = id
  local ok, serr = d:set(def_key(id), json.encode(f))
  d:incr(K_GEN, 1, 0)
  if not ok then
    return nil, "cannot store the fault: " .. tostring(type(serr) == "table"
      and serr.message or serr)
  end
  return f
end

--- syntax: faults.clear() -- removes every fault
function _M.clear()
  local d = dict()
  local floor, top = d:get(K_FLOOR) or 0, d:get(K_ID) or 0
  if top > floor then
    d:set(K_FLOOR, top)
    -- (a hold's held requests see its definition gone and go; its held
    -- count is theirs to bring back to 0 as they leave)
    for id = floor + 1, top do
      d:delete(def_key(id))
      d:delete(released_key(id))
    end
  end
  d:incr(K_GEN, 1, 0)
end

--- syntax: l = faults.list() -- every fault with fired = times it fired
function _M.list()
  local l, d = list()
  local out = {}
  for i, f in ipairs(l) do
    local c = {}
    for k, v in pairs(f) do c[k] = v end
    -- (two workers may pass the count's check at once: the fault fires
    -- count times, the counter may say one more)
    c.fired = d:get("sim:fault:" .. f.id) or 0
    if f.count and c.fired > f.count then c.fired = f.count end
    if f.kind == "hold" then
      c.held = math.max(0, d:get(held_key(f.id)) or 0)
      c.released = d:get(released_key(f.id)) ~= nil
    end
    out[i] = c
  end
  return out
end

--- syntax: f = faults.take(endpoint[, phase[, kinds]])
-- returns: the first fault for endpoint (or "*": not for "notify", nor a
-- signature kind for an unsigned endpoint) in phase (default "before"),
-- of one of kinds (a set; absent: any) when given, that has firings
-- left, counting this one, or nil.
function _M.take(endpoint, phase, kinds)
  phase = phase or "before"
  local l, d = list()
  if l[1] == nil then return nil end
  local unsigned = UNSIGNED[endpoint]
  for _, f in ipairs(l) do
    if f.phase == phase and (f.endpoint == endpoint
                             or (f.endpoint == "*" and endpoint ~= NOTIFY))
       and (kinds == nil or kinds[f.kind])
       and not (unsigned and SIGNATURE[f.kind])
       -- (a hold released is spent: what comes after it goes through)
       and not (f.kind == "hold" and d:get(released_key(f.id))) then
      local key = "sim:fault:" .. f.id
      if not f.count then
        d:incr(key, 1, 0)
        return f
      end
      if (d:get(key) or 0) < f.count then
        local n = d:incr(key, 1, 0)
        if n and n <= f.count then return f end
      end
    end
  end
  return nil
end

--- syntax: f, status, why = faults.release(id)
-- Releases a hold: the requests it holds, on any worker, go on within a
-- poll (HOLD_POLL), and it holds no more. Releasing one already released
-- does nothing. returns: the fault as list() shows it, or nil, 404 (no
-- such fault: never set, or cleared) or 400 (not a hold), why.
function _M.release(id)
  local d = dict()
  local f = json.decode(d:get(def_key(id)) or "null")
  if type(f) ~= "table" then
    return nil, 404, "no fault " .. id .. " (never set, or cleared)"
  end
  if f.kind ~= "hold" then
    return nil, 400, "fault " .. id .. " is a " .. tostring(f.kind)
                     .. " fault: only a hold is released"
  end
  local ok, err = d:set(released_key(id), 1)
  if not ok then
    return nil, 500, "cannot release the fault: " .. tostring(
      type(err) == "table" and err.message or err)
  end
  for _, c in ipairs(_M.list()) do
    if c.id == id then return c end
  end
  return nil, 404, "no fault " .. id .. " (cleared meanwhile)"
end

-- How often a held request looks whether it was let go: a release is
-- seen within this (on any worker: the flag is in the shared dict), and
-- the read is one dict lookup, so a held request costs next to nothing
local HOLD_POLL = 0.01

--- syntax: how = faults.hold(f) -- f: a hold fault take() gave
-- yields: until f is released ("released"), cleared ("cleared"), or its
-- seconds have passed ("cap"); counted in f's held meanwhile.
-- returns: how the hold ended.
function _M.hold(f)
  local d = dict()
  local deadline = core.mono() + f.seconds
  d:incr(held_key(f.id), 1, 0)
  -- (protected: whatever ends the wait, the count comes back down, or a
  -- spec waiting on it would see a request held that has gone. A worker
  -- killed meanwhile never brings it down: the fault's held stays one
  -- too high for each request it held, until the fault is cleared;
  -- docs/simulator.md says so)
  local ok, how = pcall(function()
    while true do
      if d:get(released_key(f.id)) then return "released" end
      if not d:get(def_key(f.id)) then return "cleared" end
      local left = deadline - core.mono()
      if left <= 0 then return "cap" end
      core.sleep(left < HOLD_POLL and left or HOLD_POLL)
    end
  end)
  d:incr(held_key(f.id), -1, 0)
  if not ok then error(how, 0) end
  return how
end

_M.now = core.now

return _M
