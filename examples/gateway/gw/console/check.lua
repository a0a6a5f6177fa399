-- gw.console.check: the `gateway.console` section of the config.
--
--   console = {
--     access = "token",        -- or "loopback": loopback clients only, no
--                              -- login (the default when no token is set)
--     token_file = "/etc/gw/console.token",  -- or token_env; default: the
--                              -- gateway's admin token
--     session_ttl = 3600,      -- seconds a login lasts (1 .. 86400)
--   }
--
-- Without the section there is no /console.
local type = type

local _M = {}

local KEYS = { access = true, token = true, token_file = true,
               token_env = true, session_ttl = true }

--- syntax: conf, why = check.check(t, admin_token, secret)
-- secret: gw.config's reader of <base>_file / <base>_env.
-- returns: false (no console), a table { access, token, session_ttl }, or
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
    return nil, "config." .. where .. ".token_file: the token must be at"
      .. " least 16 characters"
  end
  local ttl = t.session_ttl
  if ttl == nil then ttl = 3600 end
  if type(ttl) ~= "number" or ttl % 1 ~= 0 or ttl < 1 or ttl > 86400 then
    return nil, "config." .. where .. ".session_ttl: must be whole seconds,"
      .. " 1 .. 86400"
  end
  return { access = access, token = access == "token" and token or nil,
           session_ttl = ttl }
end

return _M
