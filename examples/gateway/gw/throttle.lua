-- gw.throttle: wrong secrets per client address, counted together by
-- every worker (the shared dictionary) for the console's login and the
-- admin token alike: an address may try `limit` wrong secrets per window
-- of `window` seconds, the window starting at its first counted try;
-- after that every try, the right secret too, is refused until the window
-- ends. A try is counted BEFORE the secret is compared and given back
-- when it was right, so concurrent tries on several workers can never
-- compare more than `limit` wrong secrets per window.
local core = require "paygate.core"
local shared = require "paygate.shared"

local format, max, ceil = string.format, math.max, math.ceil

local _M = {}

-- <host> (the window's start), <host>|<start> (the tries counted)
local K_FAIL = "gw:console:lf:"

--- syntax: host = throttle.host_of(req.remote_addr)
-- the client's address without its port: "[::1]:5000" -> "::1"
function _M.host_of(addr)
  addr = tostring(addr)
  return addr:match("^%[([^%]]*)%]:%d+$") or addr:match("^([^:]*):%d+$")
         or addr
end

--- syntax: ck, wait = throttle.reserve(host, limit, window)
-- Counts a try. returns: ck (give it back with throttle.give_back when
-- the secret was right) and, when the address is over its limit, the
-- seconds to wait; or nil, nil, err when the try cannot be counted.
function _M.reserve(host, limit, window)
  local D = shared.get_dict("paygate")
  -- monotonic (one clock for every process of the host): the wait told
  -- is the window's rest, whatever a wall-clock step did meanwhile
  local now = core.mono()
  local k = K_FAIL .. host
  D:add(k, now, window)               -- false when a window is open: fine
  local start = D:get(k)
  if type(start) ~= "number" then
    start = now
  elseif start > now then
    -- no monotonic time: a wall-clock one left in the shared dictionary
    -- (which outlives a reload) by the code before; the window starts now
    start = now
    D:set(k, now, window)
  end
  local ck = k .. "|" .. format("%.6f", start)
  local n, err = D:incr(ck, 1, 0, window)
  if not n then return nil, nil, err end
  if n > limit then
    return ck, max(1, ceil(start + window - now))
  end
  return ck
end

--- syntax: throttle.give_back(ck) -- a right secret is not counted
function _M.give_back(ck)
  shared.get_dict("paygate"):incr(ck, -1)
end

return _M
