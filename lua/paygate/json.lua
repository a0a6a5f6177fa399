-- paygate.json: the one JSON module of the runtime.
--
--   local json = require "paygate.json"
--   local text = json.encode({ id = 1, items = json.empty_array })
--   local v, err = json.decode(text)      -- err.kind == "invalid_json"
--
-- decode is lua-cjson hardened for hostile input: only JSON numbers are
-- accepted (no Infinity, NaN, hex, leading "+" or zeros), and a number
-- too large for a double (1e999) is refused instead of becoming inf.
-- encode is paygate's own (paygate.json.core): integers are exact up to
-- 2^63 (cjson rounds to 14 digits), "/" is not escaped, tables whose keys
-- are exactly 1..n are arrays, an empty table is {} (empty_array gives
-- []), and what JSON cannot hold raises naming the path of the value.

local core = require "paygate.core"
local jcore = require "paygate.json.core"
local cjson = require "cjson.safe"

local type, error, tostring = type, error, tostring

local _M = {
  null = core.null,             -- == cjson.null: JSON null both ways
  empty_array = jcore.empty_array,
}

local decoder = cjson.new()
decoder.decode_invalid_numbers(false)
decoder.decode_max_depth(1000)
local cdecode = decoder.decode
local finite = jcore.finite

--- syntax: text = json.encode(value)
-- returns: the JSON text. Raises on functions, userdata, cycles, NaN,
-- +-inf, sparse arrays and nesting deeper than 1000 (the message names
-- the path, e.g. "at value.items[2].price").
_M.encode = jcore.encode

-- true when v (a decoded value) holds no +-inf
function _M.decode(text)
  if type(text) ~= "string" then
    error("paygate.json.decode: text must be a string", 2)
  end
  local v, err = cdecode(text)
  if v == nil then
    return nil, core.error("invalid_json", tostring(err))
  end
  -- a number past a double's range decodes to +-inf: refused (one C walk
  -- over the values, cheaper than a scan of the text)
  if not finite(v) then
    return nil, core.error("invalid_json", "number out of range")
  end
  return v
end

return _M
