-- gw.console.check: the `gateway.console` section of the config.
--
--   console = {
--     access = "token",        -- or "loopback": loopback clients only, no
--                              -- login (the default when no token is set)
--     token_file = "/etc/gw/console.token",  -- or token_env; default: the
--                              -- gateway's admin token
--     session_ttl = 3600,      -- seconds a login lasts (1 .. 86400)
--     login_failures = 10,     -- wrong tokens one client address may try
--     login_window = 300,      -- in this many seconds (then 429)
--   }
--
-- Without the section there is no /console.
local type = type

local _M = {}

local KEYS = { access = true, token = true, token_file = true,
               token_env = true, session_ttl = true, login_failures = true,
               login_window = true }

-- n (default when nil) if a whole number in lo .. hi, else nil
local function whole(n, default, lo, hi)
  if n == nil then n = default end
  if type(n) ~= "number" or n % 1 ~= 0 or n < lo or n > hi then return nil end
  return n
end

--- syntax: conf, why = check.check(t, admin_token, secret)
-- secret: gw.config's reader of <base>_file / <base>_env.
-- returns: false (no console), a table { access, token, session_ttl,
-- login_failures, login_window }, or
-- nil and the one-line reason "config.gateway.console...: why".
function _M.check(t, admin_token, secret)
  local where = "gateway.console"
  if t == nil or t == false then return false end
  if type(t) ~= "table" then
    return nil, "config." .. where .. ": must be a table"
  end
  for k in pairs(t) do
    if not KEYS[k] then
      return nil, "config." .. where .. "." .. tostring(k) .. ": unknown key"
                  .. require("paygate.suggest").hint(k, KEYS)
    end
  end
  if t.token ~= nil then
    return nil, "config." .. where .. ".token: the token may not be written"
      .. " in the config; give token_file or token_env"
  end
  local token, why = secret(t, "token", where .. ".")
  if token == false then return nil, "config." .. why end
  token = token or admin_token
  local access = t.access
  if access == nil then access = token and "token" or "loopback" end
  if access ~= "token" and access ~= "loopback" then
    return nil, "config." .. where .. ".access: must be \"token\" or"
      .. " \"loopback\""
  end
  if access == "token" and not token then
    return nil, "config." .. where .. ".access: \"token\" needs token_file,"
      .. " token_env or gateway.admin_token_file / _env"
  end
  if access == "token" and #token < 16 then
    -- name where the short token came from
    local from = t.token_env ~= nil and (where .. ".token_env")
      or t.token_file ~= nil and (where .. ".token_file")
      or "gateway.admin_token"
    return nil, "config." .. from .. ": the token must be at least 16"
      .. " characters"
  end
  local ttl = whole(t.session_ttl, 3600, 1, 86400)
  if not ttl then
    return nil, "config." .. where .. ".session_ttl: must be whole seconds,"
      .. " 1 .. 86400"
  end
  local failures = whole(t.login_failures, 10, 1, 1000)
  if not failures then
    return nil, "config." .. where .. ".login_failures: must be a whole"
      .. " number, 1 .. 1000 (wrong tokens one address may try per"
      .. " login_window)"
  end
  local window = whole(t.login_window, 300, 1, 86400)
  if not window then
    return nil, "config." .. where .. ".login_window: must be whole seconds,"
      .. " 1 .. 86400"
  end
  return { access = access, token = access == "token" and token or nil,
           session_ttl = ttl, login_failures = failures,
           login_window = window }
end

return _M
