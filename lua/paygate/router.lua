-- paygate.router: method + path to handler. Static paths are one table
-- lookup; paths with parameters ("/orders/:id", "/files/*rest") are
-- matched segment by segment: more static segments first, then longer
-- patterns, then a parameter before a rest of the same depth.

local type, error, pairs, concat, sort = type, error, pairs, table.concat,
                                          table.sort

local _M = {}
local mt = { __index = _M }

function _M.new()
  return setmetatable({ static = {}, dynamic = {}, methods = {} }, mt)
end

-- The segments between slashes, empty ones kept: "//a", "/a//b" and
-- "/a/" are not "/a" or "/a/b" to the router, as they are not to a
-- static route or to a before hook guarding a prefix of req.path (merging
-- them would let "//v1/x/1" reach "/v1/x/:id" past a hook on "/v1/").
local function split(path)
  local segs, n = {}, 0
  local from = path:byte(1) == 47 and 2 or 1          -- past a leading "/"
  while true do
    local stop = path:find("/", from, true)
    n = n + 1
    segs[n] = path:sub(from, (stop or 0) - 1)
    if not stop then return segs end
    from = stop + 1
  end
end

--- syntax: router:add(method, path, fn)
-- Raises when the same method and path are registered twice.
function _M:add(method, path, fn)
  self.methods[path] = self.methods[path] or {}
  if not path:find("[:*]") then
    local t = self.static[method] or {}
    self.static[method] = t
    if t[path] then error("route: " .. method .. " " .. path .. " twice", 3) end
    t[path] = fn
  else
    local segs = split(path)
    local spec = { fn = fn, pattern = path, segs = {}, names = {} }
    for i, seg in ipairs(segs) do
      local c = seg:sub(1, 1)
      if c == ":" or c == "*" then
        local name = seg:sub(2)
        if not name:match("^[%a_][%w_]*$") then
          error("route: bad parameter name in " .. path, 3)
        end
        if c == "*" and i ~= #segs then
          error("route: *" .. name .. " must be the last segment", 3)
        end
        -- (the later one's value would replace the earlier's in params)
        for j = 1, i - 1 do
          if spec.names[j] == name then
            error("route: parameter " .. name .. " twice in " .. path, 3)
          end
        end
        spec.segs[i] = c
        spec.names[i] = name
      else
        spec.segs[i] = seg
      end
    end
    local list = self.dynamic[method] or {}
    self.dynamic[method] = list
    local static = 0
    for _, s in ipairs(spec.segs) do
      if s ~= ":" and s ~= "*" then static = static + 1 end
    end
    spec.static, spec.rest = static, spec.segs[#spec.segs] == "*"
    for _, other in ipairs(list) do
      if other.pattern == path then
        error("route: " .. method .. " " .. path .. " twice", 3)
      end
      -- the same segments with other names: whichever sorts first would
      -- take every request, the other never called
      local same = #other.segs == #spec.segs
      for j = 1, same and #spec.segs or 0 do
        if other.segs[j] ~= spec.segs[j] then same = false break end
      end
      if same then
        error("route: " .. method .. " " .. path .. " matches what "
              .. method .. " " .. other.pattern .. " does", 3)
      end
    end
    list[#list + 1] = spec
    -- more static segments first, then longer, then a parameter before a
    -- rest (/c/:id before /c/*rest; sort left such ties in any order),
    -- then by pattern, so the order never depends on registration
    sort(list, function(a, b)
      if a.static ~= b.static then return a.static > b.static end
      if #a.segs ~= #b.segs then return #a.segs > #b.segs end
      if a.rest ~= b.rest then return b.rest end
      return a.pattern < b.pattern
    end)
  end
  self.methods[path][method] = true
end

local function match(spec, segs)
  local n = #spec.segs
  local params
  for i = 1, n do
    local want, got = spec.segs[i], segs[i]
    if want == "*" then
      params = params or {}
      params[spec.names[i]] = concat(segs, "/", i)
      return params
    end
    if got == nil then return nil end
    if want == ":" then
      if got == "" then return nil end      -- a parameter is never empty
      params = params or {}
      params[spec.names[i]] = got
    elseif want ~= got then
      return nil
    end
  end
  if #segs ~= n then return nil end
  return params or {}
end

local function hex_char(h)
  return string.char(tonumber(h, 16))
end

-- (no closure made per call, and none of the work without a '%': the
-- request path stays compiled by the JIT)
local function unescape(s)
  if not s:find("%", 1, true) then return s end
  return (s:gsub("%%(%x%x)", hex_char))
end

-- A decoded parameter that an app mapping it to a file could be walked
-- out of its folder with: a "." or ".." piece between slashes or
-- backslashes once %2F / %5C are decoded (the server resolved the path's
-- own dot-segments before; an encoded slash is data to it, not a
-- separator), a NUL (C file APIs stop at it: "a.key%00.png"), or a
-- leading slash or backslash (a path join takes it as absolute).
local function unsafe(v)
  if v:find("\0", 1, true) then return "a NUL byte" end
  local c = v:byte(1)
  if c == 47 or c == 92 then
    -- "/files//etc/passwd" or "/files/%2Fetc": a rest that a path join
    -- would take as absolute
    return "an absolute path"
  end
  if not v:find(".", 1, true) then return nil end
  local from = 1
  while true do
    local stop = v:find("[/\\]", from)
    local piece = v:sub(from, (stop or 0) - 1)
    if piece == "." or piece == ".." then return "a dot-segment" end
    if not stop then return nil end
    from = stop + 1
  end
end

--- syntax: fn, pattern, params, allowed, bad = router:find(method, path)
-- fn nil: no route; allowed then lists the methods the path has (405).
-- A path that does not start with "/" ("*") matches no route.
-- bad (fn nil too): the route matched, but a parameter, once
-- percent-decoded, holds a dot-segment or a NUL, or starts with a slash
-- or backslash: the request is refused (400), never handed to the route.
function _M:find(method, path)
  -- every route's path starts with "/": a target that is no path (the
  -- asterisk-form "*" of OPTIONS) matches none, not even "/:x" or "/*x"
  if path:byte(1) ~= 47 then return nil end
  local t = self.static[method]
  local fn = t and t[path]
  if fn then return fn, path end
  local list = self.dynamic[method]
  local segs
  if list then
    segs = split(path)
    for i = 1, #list do
      local spec = list[i]
      local params = match(spec, segs)
      if params then
        for k, v in pairs(params) do
          local d = unescape(v)
          -- (a raw backslash too: the target may carry one as it is; and
          -- a rest starting with "/": an empty segment after its prefix)
          if d ~= v or v:find("\\", 1, true) or v:byte(1) == 47 then
            local why = unsafe(d)
            if why then
              return nil, spec.pattern, nil, nil, "parameter " .. k
                     .. " holds " .. why .. " once percent-decoded"
            end
          end
          params[k] = d
        end
        return spec.fn, spec.pattern, params
      end
    end
  end
  -- does another method have this path? (405 rather than 404) Each
  -- method once, though a fixed and a pattern route of it both match
  -- ("Allow: GET, GET" before)
  local allowed, seen = {}, {}
  for m, st in pairs(self.static) do
    if m ~= method and st[path] then
      allowed[#allowed + 1] = m
      seen[m] = true
    end
  end
  segs = segs or split(path)
  for m, l in pairs(self.dynamic) do
    if m ~= method and not seen[m] then
      for i = 1, #l do
        if match(l[i], segs) then allowed[#allowed + 1] = m break end
      end
    end
  end
  if #allowed > 0 then
    sort(allowed)
    return nil, nil, nil, concat(allowed, ", ")
  end
  return nil
end

return _M
