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

local format, max, ceil, floor = string.format, math.max, math.ceil,
                                  math.floor

local _M = {}

-- <host> (the window's start), <host>|<start> (the tries counted)
local K_FAIL = "gw:console:lf:"
-- <period>: the windows opened in that period (window seconds long)
local K_OPENED = "gw:console:lo:"

-- The addresses that may have a window open at once: an eighth of the
-- dictionary at most (two entries of ~300 bytes together per address).
-- Anyone who reaches the gateway opens windows, one per address it sends
-- from (an IPv6 /64 has plenty), and the dictionary is LRU: unbounded,
-- they would push out what the workers keep there -- the degradation
-- switch, the console's key and sessions, notification replay records.
-- Past the bound a new address's try cannot be counted, so it is
-- refused (fail closed) until windows end; addresses with a window open
-- go on as before.
local bound                         -- max_hosts, once per worker
local function max_hosts(D)
  if not bound then
    bound = max(64, floor((D:stats().capacity or 0) / 8 / 300))
  end
  return bound
end
_M.max_hosts = max_hosts

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
  if D:get(k) == nil then
    -- a window opens: within the bound (any window still open was opened
    -- in this period or the one before)
    local period = floor(now / window)
    local opened = (D:get(K_OPENED .. period) or 0)
                   + (D:get(K_OPENED .. (period - 1)) or 0)
    if opened >= max_hosts(D) then
      return nil, nil, core.error("unavailable", "too many client "
        .. "addresses are trying secrets (" .. opened .. " windows open):"
        .. " a new address's try cannot be counted now")
    end
    if D:add(k, now, window) then     -- false when another worker's won
      D:incr(K_OPENED .. period, 1, 0, 2 * window)
    end
  end
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
