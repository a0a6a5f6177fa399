-- gw.admin: /admin/* routes. Loopback callers only (and not a browser
-- page from elsewhere: a foreign Host, Origin or Sec-Fetch-Site), unless
-- an admin token is configured (gateway.admin_token_file / _env): then
-- every caller, loopback included, sends Authorization: Bearer <token>,
-- and wrong tokens are throttled per address with the console's logins.
--   GET  /admin/degrade            -> { on, clients = { [mchid] = on } }
--   GET  /admin/upstream           -> { degraded, worker, merchants =
--                                     { [mchid] = { [endpoint] = { breaker,
--                                     retry_after, calls, failures,
--                                     timeout, timeout_source, p95,
--                                     samples } } } }
--   POST /admin/degrade {on}       -> the same; every worker sees it, and
--                                     the WeChat Pay clients' switch flips
--   POST /admin/outbox/replay {id | dead = true[, type, subject]}
--                                  -> { replayed = n }; any other key,
--                                     or a filter that is no string: 400;
--                                     an id no event has: 404 not_found
-- Each lever that changes something writes an audit entry, as the
-- console's do: subject admin:<YYYY-MM-DD> (UTC), actor "admin:token" or
-- "admin:loopback", the caller's address in the evidence.
local paygate = require "paygate"
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local audit = require "paygate.audit"
local outbox = require "paygate.outbox"
local config = require "gw.config"
local throttle = require "gw.throttle"
local upstream = require "gw.upstream"

local type = type

local _M = {}

-- A browser on the gateway's host must not be a way in without the
-- token: a page whose name was rebound to 127.0.0.1 (its Host is not a
-- loopback name), or a cross-site form (a text/plain body can be JSON)
-- whose Origin or Sec-Fetch-Site names another site (paygate.addr).
_M.from_browser_elsewhere = require("paygate.addr").browser_elsewhere

-- Why a caller is refused (the 403's message): a caller on loopback that
-- is refused for one of its headers must learn which, or it is left
-- wondering why "loopback callers only" does not let it in.
local REFUSED = {
  token = "admin routes need Authorization: Bearer <token>, the admin"
    .. " token (gateway.admin_token_file / admin_token_env)",
  not_loopback = "admin routes answer loopback callers only (no admin token"
    .. " is configured)",
  proxied = "admin routes refuse a request a proxy relayed (Forwarded,"
    .. " X-Forwarded-For, X-Real-IP): behind a proxy every caller is on"
    .. " loopback; configure an admin token",
  browser = "admin routes refuse a browser page from elsewhere: a Host that"
    .. " is not a loopback name, or an Origin or Sec-Fetch-Site of another"
    .. " site (use curl or a script, or the console)",
}

-- returns: true; or false and, when the caller's address has tried too
-- many wrong tokens (counted with the console's logins: gw.throttle),
-- the seconds to wait, "unavailable" when a try cannot be counted, or
-- else the reason of the refusal (a key of REFUSED)
local function allowed(ctx, req)
  local token = ctx.gateway.admin_token
  if token then
    local c = type(ctx.gateway.console) == "table" and ctx.gateway.console
              or {}
    local ck, wait = throttle.reserve(throttle.host_of(req.remote_addr),
                                      c.login_failures or 10,
                                      c.login_window or 300)
    if not ck then return false, "unavailable" end
    if wait then return false, wait end
    local h = req:header("authorization") or ""
    -- the scheme is a case-insensitive token (RFC 9110, 11.1)
    local scheme, got = h:match("^(%S+)%s+(.*)$")
    if scheme and scheme:lower() ~= "bearer" then got = nil end
    local ok = got ~= nil and #got == #token
               and crypto.constant_time_equal(got, token)
    if ok then
      throttle.give_back(ck)
      return true
    end
    return false, "token"
  end
  if not config.is_loopback_addr(req.remote_addr) then
    return false, "not_loopback"
  elseif config.proxied(req) then
    return false, "proxied"
  elseif _M.from_browser_elsewhere(req) then
    return false, "browser"
  end
  return true
end

-- returns: the body's object; or nil and, for a body that is not JSON
-- (or has a key twice), the 400 answer saying where, as the merchant
-- API's; nil alone for JSON that is no object (the route's usage)
local function body(req)
  local b, err = req:decode_json()
  if b == nil then
    return nil, { error = "invalid_json", message = err.message }
  end
  if type(b) ~= "table" or b[1] ~= nil or req.body:find("^%s*%[") then
    return nil
  end
  return b
end

-- the largest id a JSON number holds exactly: past it another id is read
local MAX_ID = 2 ^ 53 - 1

--- syntax: admin.guard(ctx, fn) -> a route handler checking the caller
function _M.guard(ctx, fn)
  return function(req)
    local ok, wait = allowed(ctx, req)
    if wait == "unavailable" then
      return 503, { error = "unavailable", message = "the try cannot be"
        .. " counted right now: try again later" }
    elseif type(wait) == "number" then
      return 429, { error = "throttled", message = "too many wrong tokens"
        .. " from your address: try again in " .. wait .. " s" },
        { ["Retry-After"] = tostring(wait) }
    end
    if not ok then
      return 403, { error = "forbidden", message = REFUSED[wait] }
    end
    return fn(req)
  end
end

function _M.routes(ctx)
  local guard = function(fn) return _M.guard(ctx, fn) end
  local function audited(req, what, ref, evidence)
    evidence.remote = req.remote_addr
    return audit.append(ctx.db, "admin:" .. os.date("!%Y-%m-%d",
                                                    math.floor(core.time())), {
      what = what, ref = ref, cause = "admin", evidence = evidence,
      actor = ctx.gateway.admin_token and "admin:token" or "admin:loopback" })
  end
  -- { on, clients = { [mchid] = the WeChat Pay client's own switch } }
  local function state()
    local clients = {}
    for mchid, client in pairs(ctx.wx) do
      clients[mchid] = client:degraded()
    end
    return { on = ctx.degraded(), clients = clients }
  end
  paygate.route("GET", "/admin/degrade", guard(function()
    return 200, state()
  end))
  paygate.route("POST", "/admin/degrade", guard(function(req)
    local b, jerr = body(req)
    if jerr then return 400, jerr end
    local usage = "send {\"on\": true} or {\"on\": false}"
    if not b or type(b.on) ~= "boolean" then
      return 400, { error = "invalid_request", message = usage }
    end
    -- another key is refused, not dropped: {"on": true, "ttl": 60}
    -- must not leave a switch on that its sender thought would end
    for k in pairs(b) do
      if k ~= "on" then
        local name = tostring(k)
        if #name > 64 then name = name:sub(1, 64) .. "..." end
        return 400, { error = "invalid_request", message = "unknown field "
                      .. name .. ": " .. usage }
      end
    end
    -- written before the switch flips. The switch flips all the same
    -- when the entry cannot be written: it is the lever for an outage,
    -- the store's included. The answer and the log say it was not
    -- audited (the store's own message goes to the log only).
    local e, err = audited(req, "admin.degrade", b.on and "on" or "off",
                           { on = b.on })
    ctx.set_degraded(b.on)
    paygate.log.warn("gateway: degradation switched " .. (b.on and "on"
                     or "off"), { remote = req.remote_addr,
                                  audited = e and true or false })
    local out = state()
    if not e then
      paygate.log.error("gateway: the degradation switch's audit entry"
        .. " could not be written", { error = tostring(err) })
      out.audited = false
    end
    return 200, out
  end))
  -- What each merchant's WeChat Pay client sees of WeChat, per endpoint:
  -- the circuit breaker (shared by the workers: every endpoint any of
  -- them called) and the attempt timeout (the answering worker's own:
  -- `worker` is its pid). The log says when a breaker opens and closes;
  -- this says where each one is now.
  paygate.route("GET", "/admin/upstream", guard(function()
    return 200, upstream.status(ctx)
  end))
  paygate.route("POST", "/admin/outbox/replay", guard(function(req)
    local b, jerr = body(req)
    if jerr then return 400, jerr end
    local usage = { error = "invalid_request", message = "send {\"id\": n}"
                    .. " (1 .. 2^53-1) or {\"dead\": true[, \"subject\":"
                    .. " s][, \"type\": t]}" }
    if not b then
      return 400, usage
    end
    -- A filter that cannot be applied is refused, never dropped: a
    -- misspelt key or a subject sent as a number would otherwise widen
    -- the request to every dead letter of every payment.
    for k, v in pairs(b) do
      if (k ~= "id" and k ~= "dead" and k ~= "subject" and k ~= "type")
         or ((k == "subject" or k == "type")
             and (type(v) ~= "string" or v == "" or b.id ~= nil)) then
        return 400, usage
      end
    end
    -- a type the gateway never emits matches nothing: a misspelt one
    -- answered {"replayed": 0}, as if no dead letter of it were there
    if b.type ~= nil then
      local known = require("gw.events").KNOWN
      if not known[b.type] then
        return 400, { error = "invalid_request", message = "type: "
          .. b.type:sub(1, 64):gsub("[^\32-\126]", "?")
          .. " is no event type of the gateway"
          .. require("paygate.suggest").hint(b.type, known) }
      end
    end
    local n, err
    if type(b.id) == "number" and b.id % 1 == 0 and b.id > 0
       and b.id <= MAX_ID and b.dead == nil then
      n, err = outbox.replay(ctx.db, b.id)
    elseif b.dead == true and b.id == nil then
      n, err = outbox.replay(ctx.db, { state = "dead", type = b.type,
                                       subject = b.subject })
    else
      return 400, usage
    end
    if not n then
      return 503, { error = "unavailable", message = tostring(err) }
    end
    -- an id that names no event is said so, as the merchant API's 404:
    -- {"replayed": 0} read as "it is pending already" (a typo, or an
    -- event pruned, looked like one on its way)
    if n == 0 and b.id then
      local rows, lerr = outbox.list(ctx.db, { id = b.id })
      if not rows then
        return 503, { error = "unavailable", message = tostring(lerr) }
      end
      if rows[1] == nil then
        return 404, { error = "not_found", message = ("outbox event %d not"
          .. " found (never enqueued, or delivered and pruned since)")
          :format(b.id) }
      end
    end
    if n > 0 then
      local e, aerr = audited(req, "admin.replay", b.id and ("%d"):format(b.id)
        or "dead", { id = b.id, dead = b.dead, subject = b.subject,
                     type = b.type, replayed = n })
      if not e then
        -- (the store's own message goes to the log, not to the caller)
        paygate.log.error("gateway: the replay's audit entry could not be"
          .. " written", { replayed = n, error = tostring(aerr) })
        return 503, { error = "unavailable", message = "replayed " .. n
          .. " but the audit entry was not written (the store failed; the"
          .. " log has why)" }
      end
    end
    return 200, { replayed = n }
  end))
end

return _M
