-- paygate.html: a small escaping template helper for server-rendered pages.
--
--   local html = require "paygate.html"
--   local page = html.render("<p title='{{t}}'>{{body}}</p>{{{list}}}", {
--     t = order.description, body = order.description,
--     list = html.raw(trusted_fragment) })
--
-- Every {{name}} value is HTML-escaped (& < > " ' `), so it is safe in
-- element text and inside a quoted attribute. A value made by html.raw()
-- (or returned by html.render / html.join) is inserted as it is: it is
-- already markup. {{{name}}} is refused: trust is carried by the value,
-- not by the template.
local type, tostring, setmetatable, getmetatable, error, concat =
      type, tostring, setmetatable, getmetatable, error, table.concat

local _M = {}

local RAW = { __tostring = function(r) return r[1] end }
RAW.__concat = function(a, b)
  return setmetatable({ _M.escape(a) .. _M.escape(b) }, RAW)
end
_M.RAW = RAW

--- syntax: r = html.raw(s) -- trusted markup, inserted unescaped
function _M.raw(s)
  if type(s) ~= "string" then
    error("html.raw: s must be a string", 2)
  end
  return setmetatable({ s }, RAW)
end

--- syntax: yes = html.is_raw(v)
function _M.is_raw(v)
  return getmetatable(v) == RAW
end

local ESC = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;",
              ['"'] = "&quot;", ["'"] = "&#39;", ["`"] = "&#96;" }

--- syntax: s = html.escape(v)
-- v: a string, number, boolean, nil (""), or a raw value (as it is).
-- Invalid UTF-8 is kept as bytes; NUL bytes become U+FFFD.
function _M.escape(v)
  if v == nil then return "" end
  if getmetatable(v) == RAW then return v[1] end
  local t = type(v)
  if t ~= "string" then
    if t == "number" or t == "boolean" then return tostring(v) end
    error("html.escape: cannot show a " .. t, 2)
  end
  return (v:gsub("[&<>\"'`]", ESC):gsub("%z", "\239\191\189"))
end

--- syntax: r = html.render(template, vars)
-- {{name}} (letters, digits, _ and dots for nested tables) is replaced by
-- html.escape(vars.name). A missing name raises: a typo is a bug.
-- returns: a raw value (markup), for nesting in other templates
function _M.render(template, vars)
  if type(template) ~= "string" then
    error("html.render: template must be a string", 2)
  end
  if type(vars) ~= "table" then
    error("html.render: vars must be a table", 2)
  end
  if template:find("{{{", 1, true) then
    error("html.render: {{{...}}} is not supported; pass html.raw(...)", 2)
  end
  local out = template:gsub("{{%s*([%w_.]+)%s*}}", function(name)
    local v = vars
    for part in name:gmatch("[^.]+") do
      if type(v) ~= "table" or getmetatable(v) == RAW then
        v = nil
        break
      end
      v = v[part]
    end
    if v == nil then
      -- a value left out on purpose is given as html.NONE
      error("html.render: no value for {{" .. name .. "}}", 4)
    end
    local ok, s = pcall(_M.escape, v)
    if not ok then
      error("html.render: {{" .. name .. "}}: cannot show a " .. type(v), 4)
    end
    return s
  end)
  return setmetatable({ out }, RAW)
end

--- html.NONE: an empty value for render (nil would be taken for a typo)
_M.NONE = setmetatable({ "" }, RAW)

--- syntax: r = html.join(list[, sep]) -- each item escaped unless raw
function _M.join(list, sep)
  local out = {}
  for i = 1, #list do out[i] = _M.escape(list[i]) end
  return setmetatable({ concat(out, sep and _M.escape(sep) or "") }, RAW)
end

--- syntax: s = html.url_encode(v) -- for a query value or path segment
function _M.url_encode(v)
  return (tostring(v):gsub("[^%w%-%._~]", function(c)
    return ("%%%02X"):format(c:byte())
  end))
end

local function unescape(s)
  s = s:gsub("+", " ")
  return (s:gsub("%%(%x%x)", function(h)
    return string.char(tonumber(h, 16))
  end))
end

--- syntax: t = html.decode_form(body)
-- An application/x-www-form-urlencoded body as a table (a repeated name
-- keeps the last value). Bounded: at most 100 fields.
function _M.decode_form(body)
  local t, n = {}, 0
  for pair in tostring(body or ""):gmatch("[^&]+") do
    n = n + 1
    if n > 100 then break end
    local k, v = pair:match("^([^=]*)=?(.*)$")
    if k ~= "" then t[unescape(k)] = unescape(v) end
  end
  return t
end

return _M
