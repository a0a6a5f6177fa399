-- sim.json: JSON as WeChat Pay writes it. lua-cjson 2.1.0 escapes "/" as
-- "\/" (valid JSON, but not what WeChat sends: code_url reads
-- "weixin://..."); encode undoes that. Every "/" cjson writes is escaped,
-- so replacing each "\/" with "/" is exact (an escaped backslash before a
-- slash comes out as "\\\/" and becomes "\\/").
local cjson = require "cjson.safe"

local _M = { null = cjson.null, decode = cjson.decode }

--- syntax: s = json.encode(v)
function _M.encode(v)
  local s = cjson.encode(v)
  if s and s:find("\\/", 1, true) then s = s:gsub("\\/", "/") end
  return s
end

return _M
