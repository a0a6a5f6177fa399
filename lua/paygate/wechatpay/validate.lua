-- paygate.wechatpay.validate: parameter checks for the API calls, run before
-- any network I/O. A failure is nil, err with err.kind "invalid_params",
-- err.field naming the field (dotted path, array items as "[i]") and a
-- message "CALL: FIELD: what is wrong".
--
-- A schema is an array of rules { path, type, ... }:
--   path      "amount.total", "detail.goods_detail[].quantity" ("[]": every
--             item of an array)
--   type      "string" | "int" | "bool" | "object" | "array" | "any"
--   required  true: must be present (nil is missing)
--   min, max  string: length in characters (UTF-8); int: value bounds;
--             array: item count (an array is never empty: cjson would
--             send {} for it)
--   pattern   a Lua pattern the whole string must match (anchor it)
--   enum      { "A", "B" }: the value must be one of them
--   test      function(v) -> truthy when the string is well-formed
--   what      text for a pattern/test failure ("6-32 of [0-9A-Za-z_-|*]")
-- Every string must be valid UTF-8 of 1- to 3-byte characters (WeChat Pay
-- refuses a 4-byte one, such as an emoji).
-- Parents of a nested path must be objects when present; a rule on a child
-- of an absent optional parent is skipped.

local core = require "paygate.core"
local loopback_host = require("paygate.addr").loopback_host

local type, pairs, ipairs, tostring, floor, huge =
      type, pairs, ipairs, tostring, math.floor, math.huge
local find, sub, concat = string.find, string.sub,
      table.concat
local match, byte = string.match, string.byte

local _M = {}

local function fail(call, field, why)
  return nil, core.error("invalid_params", call .. ": " .. field .. ": "
                         .. why, { field = field })
end
_M.fail = fail

-- Number of UTF-8 characters in s, or nil, byte offset when s is not valid
-- UTF-8 (overlong forms, surrogates and values past U+10FFFF included).
local utf8_len = require("paygate.utf8").len
_M.utf8_len = utf8_len

local function is_array(t)
  local n = #t
  local count = 0
  for k in pairs(t) do
    if type(k) ~= "number" or k < 1 or k > n or floor(k) ~= k then
      return false
    end
    count = count + 1
  end
  return count == n
end
_M.is_array = is_array

local function is_int(v)
  return type(v) == "number" and v == v and v ~= huge and v ~= -huge
         and floor(v) == v
end
_M.is_int = is_int

-- An IPv4 address in dotted-quad form (no leading zeros: "010" reads as
-- octal to some parsers), or an IPv6 address (RFC 4291 text: eight groups
-- of 1-4 hex digits, one "::" for a run of zero groups, an IPv4 tail; no
-- zone). What WeChat takes as scene_info.payer_client_ip: the client, the
-- simulator and the gateway judge it by this one function.
local function ipv4(s)
  local a, b, c, d = s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then return false end
  for _, o in ipairs{ a, b, c, d } do
    if #o > 3 or tonumber(o) > 255 or (#o > 1 and o:byte(1) == 48) then
      return false
    end
  end
  return true
end

local function ipv6_groups(part, tail_ok)
  if part == "" then return 0 end
  local n, groups = 0, {}
  for g in (part .. ":"):gmatch("([^:]*):") do groups[#groups + 1] = g end
  for i, g in ipairs(groups) do
    if i == #groups and tail_ok and g:find(".", 1, true) then
      if not ipv4(g) then return nil end
      n = n + 2
    elseif g:match("^%x%x?%x?%x?$") then
      n = n + 1
    else
      return nil
    end
  end
  return n
end

--- syntax: ok = validate.appid(s)
-- true when s is an appid as the client sends it: 1 to 32 letters,
-- digits, _ and - (the config's appids, a prepay's appid and sub_appid).
function _M.appid(s)
  return type(s) == "string" and #s <= 32 and s:match("^[%w_%-]+$") ~= nil
end

--- syntax: ok = validate.ip_address(s)
-- true when s is an IPv4 or IPv6 address as text (see above).
function _M.ip_address(s)
  if type(s) ~= "string" or #s > 45 then return false end
  if ipv4(s) then return true end
  local left, right = s:match("^(.-)::(.*)$")
  if left then
    if right:find("::", 1, true) then return false end
    local l, r = ipv6_groups(left, false), ipv6_groups(right, true)
    return l ~= nil and r ~= nil and l + r <= 7
  end
  return ipv6_groups(s, true) == 8
end

-- Checks one value against one rule; returns nil, err or true.
local function check_value(call, field, v, r)
  local t = r[2]
  if t == "string" then
    if type(v) ~= "string" then return fail(call, field, "must be a string") end
    local n, bad, at = utf8_len(v)
    if not n then
      return fail(call, field, "is not valid UTF-8 (byte " .. bad .. ")")
    end
    -- WeChat Pay takes 1- to 3-byte UTF-8 characters only (it refuses an
    -- emoji with PARAM_ERROR): refused here, before anything is sent
    -- (at: where the measuring pass met the first one)
    if at then
      return fail(call, field, "holds a 4-byte UTF-8 character (byte " .. at
                  .. ", such as an emoji): WeChat Pay takes characters up to"
                  .. " U+FFFF only")
    end
    if r.min and n < r.min then
      if r.min == 1 then return fail(call, field, "must not be empty") end
      return fail(call, field, "must be at least " .. r.min .. " characters")
    end
    if r.max and n > r.max then
      return fail(call, field, "must be at most " .. r.max .. " characters")
    end
    if (r.pattern and not find(v, r.pattern)) or (r.test and not r.test(v))
    then
      return fail(call, field, "must be " .. (r.what or "well-formed"))
    end
    if r.enum then
      for _, e in ipairs(r.enum) do
        if v == e then return true end
      end
      return fail(call, field, "must be one of " .. concat(r.enum, ", "))
    end
  elseif t == "int" then
    if not is_int(v) then return fail(call, field, "must be an integer") end
    if r.min and v < r.min then
      return fail(call, field, "must be >= " .. r.min)
    end
    if r.max and v > r.max then
      return fail(call, field, "must be <= " .. r.max)
    end
  elseif t == "bool" then
    if type(v) ~= "boolean" then
      return fail(call, field, "must be a boolean")
    end
  elseif t == "object" then
    if type(v) ~= "table" or (next(v) ~= nil and is_array(v)) then
      return fail(call, field, "must be an object (a table with named "
                  .. "fields)")
    end
  elseif t == "array" then
    if type(v) ~= "table" or not is_array(v) then
      return fail(call, field, "must be an array")
    end
    if r.min and #v < r.min then
      return fail(call, field, "must have at least " .. r.min
                  .. (r.min == 1 and " item" or " items"))
    end
    if r.max and #v > r.max then
      return fail(call, field, "must have at most " .. r.max .. " items")
    end
    if #v == 0 then
      -- JSON has no empty Lua table: cjson would send {} (an object)
      return fail(call, field, "must not be empty (leave it out)")
    end
  end
  return true
end

-- Splits "a.b[].c" into { "a", "b", "[]", "c" } (cached per path).
local split_cache = {}
local function split(path)
  local parts = split_cache[path]
  if parts then return parts end
  parts = {}
  for seg in path:gmatch("[^%.]+") do
    if sub(seg, -2) == "[]" then
      parts[#parts + 1] = sub(seg, 1, -3)
      parts[#parts + 1] = "[]"
    else
      parts[#parts + 1] = seg
    end
  end
  split_cache[path] = parts
  return parts
end

local function walk(call, r, node, parts, i, prefix)
  local key = parts[i]
  local last = i == #parts
  if key == "[]" then
    -- node is an array (checked by its own rule or below)
    if type(node) ~= "table" or not is_array(node) then
      return fail(call, prefix, "must be an array")
    end
    for j = 1, #node do
      local field = prefix .. "[" .. j .. "]"
      local v = node[j]
      if last then
        if v == nil then
          if r.required then return fail(call, field, "is required") end
        else
          local ok, err = check_value(call, field, v, r)
          if not ok then return nil, err end
        end
      else
        if type(v) ~= "table" then
          return fail(call, field, "must be an object")
        end
        local ok, err = walk(call, r, v, parts, i + 1, field)
        if not ok then return nil, err end
      end
    end
    return true
  end
  local field = prefix == "" and key or prefix .. "." .. key
  local v = node[key]
  if v == nil or v == core.null then
    if v == core.null then
      return fail(call, field, "must be omitted rather than null")
    end
    if last and r.required then return fail(call, field, "is required") end
    -- an absent parent: required children are reported only when the
    -- parent's own rule says it is required (rules are ordered parent first)
    return true
  end
  if last then return check_value(call, field, v, r) end
  if parts[i + 1] ~= "[]" and type(v) ~= "table" then
    return fail(call, field, "must be an object")
  end
  return walk(call, r, v, parts, i + 1, field)
end

--- syntax: scheme, host, port = validate.notify_url(u)
-- The notify_url WeChat takes: https (http only to a loopback host:
-- specs and demos), a host, at most 255 bytes, no spaces or control
-- characters, no user info, no query or fragment. The client checks it
-- before sending and the simulator when it takes it: one answer.
-- returns: the scheme, the host (an IPv6 one without its brackets) and
-- the port ("" when none), or nil and why: "length", "scheme" or "query".
local last_url, last_a, last_b, last_c   -- the last answer: a merchant
                                         -- sends the same URL every time
local function notify_url(u)
  if type(u) ~= "string" or #u > 255 then return nil, "length" end
  -- one scan for what may not be there: spaces and control characters
  -- (said first), then ? and # (no query or fragment)
  local at = find(u, "[%s%c?#]")
  if at then
    local b = byte(u, at)
    if (b ~= 63 and b ~= 35) or find(u, "[%s%c]", at + 1) then
      return nil, "length"
    end
  end
  -- a name or IPv4 host first (the common case: one match), then [IPv6]
  local scheme, host, port = match(u, "^(https?)://([^/:?#@%[]+):?(%d*)")
  if not scheme then
    scheme, host, port = match(u, "^(https?)://%[([^%]/]+)%]:?(%d*)")
  end
  -- user info: an @ before the path
  local a = scheme and find(u, "@", 1, true)
  if not scheme
     or (a and a < (find(u, "/", #scheme + 4, true) or #u + 1))
     or (scheme == "http" and not loopback_host(host)) then
    return nil, "scheme"
  end
  if at then return nil, "query" end
  return scheme, host, port
end

function _M.notify_url(u)
  if u == last_url and u ~= nil then return last_a, last_b, last_c end
  local a, b, c = notify_url(u)
  if type(u) == "string" then last_url, last_a, last_b, last_c = u, a, b, c end
  return a, b, c
end

--- syntax: ok, err = validate.check(call, p, schema)
-- returns: true, or nil, err (kind invalid_params, err.field).
function _M.check(call, p, schema)
  for _, r in ipairs(schema) do
    local ok, err = walk(call, r, p, split(r[1]), 1, "")
    if not ok then return nil, err end
  end
  return true
end

local MAX_EXACT = 2 ^ 53

-- Walks a value before JSON encoding: only strings, finite numbers,
-- booleans, arrays and string-keyed objects; strings valid UTF-8; no null
-- (WeChat wants optional fields omitted); no cycles; depth <= 32.
local function plain(call, v, field, depth, seen)
  local t = type(v)
  if t == "string" then
    local n, bad = utf8_len(v)
    if not n then
      return fail(call, field, "is not valid UTF-8 (byte " .. bad .. ")")
    end
    return true
  elseif t == "number" then
    if v ~= v or v == huge or v == -huge then
      return fail(call, field, "must be a finite number")
    end
    if v >= MAX_EXACT or v <= -MAX_EXACT then
      return fail(call, field, "is too large to send exactly")
    end
    return true
  elseif t == "boolean" then
    return true
  elseif t == "table" then
    if seen[v] then return fail(call, field, "is a cycle") end
    if depth > 32 then return fail(call, field, "is nested too deeply") end
    seen[v] = true
    if next(v) ~= nil and is_array(v) then
      for i = 1, #v do
        local ok, err = plain(call, v[i], field .. "[" .. i .. "]",
                              depth + 1, seen)
        if not ok then return nil, err end
      end
    else
      for k, x in pairs(v) do
        if type(k) ~= "string" then
          return fail(call, field == "" and "p" or field,
                      "has a key that is not a string (" .. tostring(k)
                      .. ") beside named fields")
        end
        if not utf8_len(k) then
          return fail(call, field == "" and "p" or field,
                      "has a field name that is not valid UTF-8")
        end
        local ok, err = plain(call, x, field == "" and k or field .. "." .. k,
                              depth + 1, seen)
        if not ok then return nil, err end
      end
    end
    seen[v] = nil
    return true
  elseif v == core.null then
    return fail(call, field, "must be omitted rather than null")
  end
  return fail(call, field == "" and "p" or field,
              "cannot be sent as JSON (a " .. t .. ")")
end

--- syntax: ok, err = validate.plain(call, value)
-- returns: true when value can be sent as WeChat Pay JSON, else nil, err
-- (kind invalid_params naming the first bad field).
function _M.plain(call, v)
  return plain(call, v, "", 0, {})
end

return _M
