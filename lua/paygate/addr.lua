-- paygate.addr: is a host, or a peer's address, this machine's loopback?
-- One answer for every check that trusts the local machine: the gateway's
-- admin and console loopback mode and dev_app, the simulator's control
-- API, and the http:// URLs allowed only to a loopback host.
--
--   local addr = require "paygate.addr"
--   addr.loopback_host("[::1]")                     --> true
--   addr.loopback_addr(req.remote_addr)             --> "127.0.0.1:5000": true
--
-- Loopback: the name localhost, 127.0.0.0/8, ::1, and an IPv4 loopback
-- address mapped into IPv6 (::ffff:127.0.0.1: what a listener on [::]
-- reports for a client that connected to 127.0.0.1).
--
-- A loopback peer is not always someone on this machine acting on
-- purpose: a browser on it runs pages from anywhere. browser_elsewhere
-- tells such a page apart, for whatever trusts a loopback address.
local type, tonumber, tostring = type, tonumber, tostring

local _M = {}

-- The first part is the text "127": a resolver reads a leading zero as
-- octal (0127.0.0.1 is 87.0.0.1), so tonumber's 127 would not do.
local function v4_loopback(h)
  local b, c, d = h:match("^127%.(%d+)%.(%d+)%.(%d+)$")
  if not b then return false end
  return tonumber(b) <= 255 and tonumber(c) <= 255 and tonumber(d) <= 255
end

--- syntax: yes = addr.loopback_host(host)
-- host: a name, an IPv4 address, or an IPv6 address with or without its
-- brackets (as in a URL). Anything else, or not a string: false.
function _M.loopback_host(h)
  if type(h) ~= "string" then return false end
  h = h:lower()
  h = h:match("^%[(.*)%]$") or h
  if h == "localhost" or h == "::1" or h == "0:0:0:0:0:0:0:1" then
    return true
  end
  return v4_loopback(h:match("^::ffff:(.+)$") or h)
end

--- syntax: yes = addr.loopback_addr(a)
-- a: a peer's or a listener's address as the server gives it
-- (req.remote_addr): "IPv4:port", "[IPv6]:port", or a host alone.
function _M.loopback_addr(a)
  if type(a) ~= "string" then return false end
  local host = a:match("^(%[[^%]]*%]):%d+$") or a:match("^([^:]*):%d+$")
               or a
  return _M.loopback_host(host)
end

--- syntax: yes = addr.browser_elsewhere(req)
-- Whether a request on a loopback connection is a browser page from
-- another site rather than a local program: a Host that is not a
-- loopback name (a page whose own name was rebound to 127.0.0.1: DNS
-- rebinding), or an Origin or Sec-Fetch-Site naming another site (a
-- cross-site form or fetch; a text/plain form body can be JSON). curl and
-- scripts send neither Origin nor Sec-Fetch-Site. The one check behind
-- the gateway's admin routes and dev_app, and the simulator's control API.
function _M.browser_elsewhere(req)
  local host = req:header("host")
  if host ~= nil and not _M.loopback_addr(tostring(host):lower()) then
    return true
  end
  local origin = req:header("origin")
  if origin ~= nil and origin ~= "http://" .. tostring(host)
     and origin ~= "https://" .. tostring(host) then
    return true
  end
  local site = req:header("sec-fetch-site")
  return site ~= nil and site ~= "same-origin" and site ~= "none"
end

return _M
