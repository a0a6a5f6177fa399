-- sim.json: JSON as WeChat Pay reads and writes it, on the runtime's own
-- codec (paygate.json.core). decode is strict RFC 8259: hex, NaN,
-- Infinity, "+1" and trailing text are not JSON, as they are not to
-- WeChat (lua-cjson took them). encode writes "/" unescaped (code_url
-- reads "weixin://..."), and a string that is not valid UTF-8 with
-- U+FFFD for each bad byte: whatever a request held, an answer that
-- echoes it is valid UTF-8 JSON.
local jcore = require "paygate.json.core"

local type, find = type, string.find

local _M = { null = require("paygate.core").null, encode = jcore.encode }

--- syntax: v, err = json.decode(text) -- nil, err for what is not JSON
function _M.decode(text)
  if type(text) ~= "string" then return nil, "no text" end
  return jcore.decode(text)
end

--- syntax: t, why = json.object(text)
-- A request body that must be a JSON object: the table, or nil and why
-- ("not JSON: ...", "got a JSON array", ...). An array
-- decodes to a table too: the text's first character tells them apart.
local GOT = { table = "got a JSON array", string = "got a JSON string",
              number = "got a JSON number", boolean = "got a JSON boolean" }
function _M.object(text)
  local v, err = _M.decode(text)
  if v == nil then return nil, "not JSON: " .. tostring(err) end
  if type(v) ~= "table" or not find(text, "^[ \t\r\n]*{") then
    return nil, GOT[type(v)] or "got JSON null"
  end
  return v
end

return _M
