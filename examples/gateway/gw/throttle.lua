-- gw.throttle: wrong secrets per client address (an IPv6 client's /64:
-- host_of), counted together by every worker (the shared dictionary) for
-- the console's login and the admin token alike: an address may try
-- `limit` wrong secrets per window of `window` seconds, the window
-- starting at its first counted try;
-- after that every try, the right secret too, is refused until the window
-- ends. A try is counted BEFORE the secret is compared and given back
-- when it was right, so concurrent tries on several workers can never
-- compare more than `limit` wrong secrets per window.
local core = require "paygate.core"
local shared = require "paygate.shared"

local format, max, ceil, floor = string.format, math.max, math.ceil,
                                  math.floor
local tostring, tonumber, ipairs = tostring, tonumber, ipairs

local _M = {}

-- <host> (the window's start), <host>|<start> (the tries counted)
local K_FAIL = "gw:console:lf:"
-- <period>: the windows opened in that period (window seconds long)
local K_OPENED = "gw:console:lo:"

-- The addresses that may have a window open at once: an eighth of the
-- dictionary at most (two entries of ~300 bytes together per address).
-- Anyone who reaches the gateway opens windows, one per address it sends
-- from (an IPv6 client one per /64: host_of), and the dictionary is LRU:
-- unbounded, they would push out what the workers keep there -- the
-- degradation switch, the console's key and sessions, notification
-- replay records.
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

-- An IPv6 address's /64 as "a:b:c:d::/64" (its first four groups), or
-- nil when h is not an IPv6 address written out; an IPv4 one mapped into
-- IPv6 (a v4 client through a [::] listener) as the IPv4 address.
local function v6_net(h)
  local v4 = h:lower():match("^::ffff:(%d+%.%d+%.%d+%.%d+)$")
  if v4 then return v4 end
  if not h:find(":", 1, true) or h:find("[^%x:%.]") then return nil end
  -- a dotted IPv4 tail is the last two groups
  local lead, a, b, c, d = h:match("^(.*:)(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if lead then
    h = lead .. ("%x:%x"):format(tonumber(a) * 256 + tonumber(b),
                                 tonumber(c) * 256 + tonumber(d))
  end
  local function groups(s)
    local t = {}
    for g in s:gmatch("[^:]+") do t[#t + 1] = g end
    return t
  end
  local g
  local head, tail = h:match("^(.-)::(.*)$")
  if head then
    if tail:find("::", 1, true) then return nil end
    local hs, ts = groups(head), groups(tail)
    g = hs
    for _ = 1, 8 - #hs - #ts do g[#g + 1] = "0" end
    for _, x in ipairs(ts) do g[#g + 1] = x end
  else
    g = groups(h)
  end
  if #g ~= 8 then return nil end
  for i = 1, 4 do
    local n = #g[i] <= 4 and tonumber(g[i], 16)
    if not n then return nil end
    g[i] = ("%x"):format(n)
  end
  return g[1] .. ":" .. g[2] .. ":" .. g[3] .. ":" .. g[4] .. "::/64"
end

--- syntax: host = throttle.host_of(req.remote_addr)
-- who is counted: the client's address without its port ("192.0.2.7:5000"
-- -> "192.0.2.7"), an IPv6 client by its /64 ("[2001:db8:1:2::9]:5000" ->
-- "2001:db8:1:2::/64"): one subscriber is given a /64 and may send each
-- try from another of its 2^64 addresses, which counted one by one
-- multiplied its tries and, opening a window each, filled the bound
-- (max_hosts) that then refused every new address, the operator's too
function _M.host_of(addr)
  addr = tostring(addr)
  local host = addr:match("^%[([^%]]*)%]:%d+$") or addr:match("^([^:]*):%d+$")
               or addr
  return v6_net(host) or host
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
