-- paygate.json: the one JSON module of the runtime.
--
--   local json = require "paygate.json"
--   local text = json.encode({ id = 1, items = json.empty_array })
--   local v, err = json.decode(text)      -- err.kind == "invalid_json"
--   local v, err = json.decode(text, { unique_keys = true })
--
-- decode is paygate's own strict decoder (paygate.json.core.decode): RFC
-- 8259 and nothing else -- numbers only in JSON's grammar (no Infinity,
-- NaN, hex, "+1", "01", "1."), within a double's range (1e999 is refused,
-- not made inf), no raw control characters in strings, no trailing commas
-- or text after the value, nesting at most 1000; null is json.null (==
-- cjson.null); \u escapes become UTF-8 (a lone surrogate is refused).
-- A string's other bytes are kept as they are: they are not checked as
-- UTF-8 (nor were they by cjson); the encoder writes bad UTF-8 as U+FFFD.
-- A key given twice in one object keeps its last value, unless
-- unique_keys is set: then the text is refused, naming the key. Readers
-- disagree on which value wins (some keep the first), so a text from
-- outside that one system checks and another acts on must say one thing:
-- req:json() and req:decode_json() decode request bodies so.
-- An object's tables are sized after the last object decoded with the
-- same first key, so pairs() may walk two decodes of one text in
-- different orders: rely on keys, never on their order (json.encode
-- writes a table's keys in pairs() order).
local core = require "paygate.core"
local jcore = require "paygate.json.core"
local type, error = type, error
local jdecode = jcore.decode

local _M = {
  null = core.null,             -- == cjson.null: JSON null both ways
  empty_array = jcore.empty_array,
}

--- syntax: text = json.encode(value)
-- returns: the JSON text. Raises on functions, userdata, cycles, NaN,
-- +-inf, sparse arrays and nesting deeper than 1000 (the message names
-- the path, e.g. "at value.items[2].price").
_M.encode = jcore.encode

--- syntax: v, err = json.decode(text[, opts])
-- opts.unique_keys: refuse an object with a key given twice.
-- returns: the value (json.null for null), or nil, err (kind
-- "invalid_json", the message says what and at which byte).
function _M.decode(text, opts)
  if type(text) ~= "string" then
    error("paygate.json.decode: text must be a string", 2)
  end
  local unique = false
  if opts ~= nil then
    if type(opts) ~= "table" then
      error("paygate.json.decode: opts must be a table", 2)
    end
    -- (a slip would leave the check asked for unmade without a word)
    for k in pairs(opts) do
      if k ~= "unique_keys" then
        error("paygate.json.decode: unknown option opts." .. tostring(k)
              .. " (the one option is opts.unique_keys)", 2)
      end
    end
    unique = opts.unique_keys
    if unique == nil then
      unique = false
    elseif type(unique) ~= "boolean" then
      error("paygate.json.decode: opts.unique_keys must be a boolean", 2)
    end
  end
  local v, err = jdecode(text, unique)
  if v == nil then
    return nil, core.error("invalid_json", err)
  end
  return v
end

return _M
