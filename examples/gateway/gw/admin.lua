-- gw.admin: /admin/* routes. Loopback callers only, unless an admin
-- token is configured (gateway.admin_token_file / _env): then every
-- caller, loopback included, sends Authorization: Bearer <token>.
--   GET  /admin/degrade            -> { on }
--   POST /admin/degrade {on}       -> { on }   every worker sees it
--   POST /admin/outbox/replay {id | dead = true[, type, subject]}
--                                  -> { replayed = n }
local paygate = require "paygate"
local crypto = require "paygate.crypto"
local outbox = require "paygate.outbox"
local config = require "gw.config"

local type = type

local _M = {}

local function allowed(ctx, req)
  local token = ctx.gateway.admin_token
  if token then
    local h = req:header("authorization") or ""
    local got = h:match("^[Bb]earer%s+(.+)$")
    return got ~= nil and #got == #token
           and crypto.constant_time_equal(got, token)
  end
  return config.is_loopback_addr(req.remote_addr)
end

local function body(req)
  local b = req:decode_json()
  if type(b) ~= "table" then return nil end
  return b
end

--- syntax: admin.guard(ctx, fn) -> a route handler checking the caller
function _M.guard(ctx, fn)
  return function(req)
    if not allowed(ctx, req) then
      return 403, { error = "forbidden", message = "admin routes answer"
        .. " loopback callers, or the admin token" }
    end
    return fn(req)
  end
end

function _M.routes(ctx)
  local guard = function(fn) return _M.guard(ctx, fn) end
  paygate.route("GET", "/admin/degrade", guard(function()
    return 200, { on = ctx.degraded() }
  end))
  paygate.route("POST", "/admin/degrade", guard(function(req)
    local b = body(req)
    if not b or type(b.on) ~= "boolean" then
      return 400, { error = "invalid_request",
                    message = "send {\"on\": true} or {\"on\": false}" }
    end
    ctx.set_degraded(b.on)
    paygate.log.warn("gateway: degradation switched " .. (b.on and "on"
                     or "off"), { remote = req.remote_addr })
    return 200, { on = ctx.degraded() }
  end))
  paygate.route("POST", "/admin/outbox/replay", guard(function(req)
    local b = body(req)
    if not b then
      return 400, { error = "invalid_request", message = "send {\"id\": n}"
                    .. " or {\"dead\": true}" }
    end
    local n, err
    if type(b.id) == "number" and b.id % 1 == 0 and b.id > 0 then
      n, err = outbox.replay(ctx.db, b.id)
    elseif b.dead == true then
      local f = { state = "dead" }
      if type(b.type) == "string" then f.type = b.type end
      if type(b.subject) == "string" then f.subject = b.subject end
      n, err = outbox.replay(ctx.db, f)
    else
      return 400, { error = "invalid_request", message = "send {\"id\": n}"
                    .. " or {\"dead\": true}" }
    end
    if not n then
      return 503, { error = "unavailable", message = tostring(err) }
    end
    return 200, { replayed = n }
  end))
end

return _M
