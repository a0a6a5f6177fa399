-- Shared set-up of the core specs: the simulator, the gateway on it, and
-- a signed merchant API client.
local testing = require "paygate.testing"
local sql = require "paygate.sql"
local apikey = require "paygate.apikey"
local json = require "paygate.json"
local crypto = require "paygate.crypto"

local _M = {}

local function write(path, data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
end

--- syntax: conf = core.config(sim, srv[, gateway_over[, merchant_over]])
function _M.config(sim, srv, over, mover, merchant)
  merchant = merchant or sim.merchant
  local key_file = srv.dir .. "/apiv3.key"
  write(key_file, merchant.apiv3_key .. "\n")
  local m = sim:client_config(merchant, { apiv3_key = false })
  m.apiv3_key_file = key_file
  for k, v in pairs(mover or {}) do m[k] = v end
  local g = { db = "sqlite:" .. srv.dir .. "/gw.db",
              public_url = srv:url(""),
              dispatcher = { interval = 0.05 } }
  for k, v in pairs(over or {}) do g[k] = v end
  if g.db == false then g.db = nil end
  return { gateway = g, merchants = { m } }
end

--- syntax: gw = core.start(sim[, o]) -- o: gateway, merchant (overrides),
-- db (a function(srv) -> url), workers, partner (the simulator's service
-- provider as the merchant), app (another copy of the app's folder)
function _M.start(sim, o)
  o = o or {}
  local db_url
  local srv = testing.start_app{ app = o.app or "examples/gateway",
    workers = o.workers, args = { "--log-level", "info" },
    config = function(srv)
      local c = _M.config(sim, srv, o.gateway, o.merchant,
                          o.partner and sim.partner)
      if o.db then c.gateway.db = o.db(srv) end
      db_url = c.gateway.db
      return c
    end }
  local gw = { srv = srv, db_url = db_url, app_id = "shop1" }
  gw.db = assert(sql.open(db_url))
  local k = assert(apikey.create(gw.db, gw.app_id))
  gw.key_id, gw.secret = k.key_id, k.secret
  return setmetatable(gw, { __index = _M })
end

--- syntax: res = gw:call(method, path[, body[, headers]])
-- Signed with the app's key; a table body is JSON; POSTs get a fresh
-- Idempotency-Key unless headers name one.
function _M.call(gw, method, path, body, headers)
  if type(body) == "table" then body = json.encode(body) end
  body = body or ""
  local h = apikey.sign{ app_id = gw.app_id, key_id = gw.key_id,
                         secret = gw.secret, method = method, path = path,
                         body = body }
  h["Content-Type"] = "application/json"
  if method == "POST" then
    h["Idempotency-Key"] = crypto.random_nonce(24)
  end
  for k, v in pairs(headers or {}) do h[k] = v or nil end
  return gw.srv:request{ method = method, path = path, body = body,
                         headers = h }
end

--- syntax: payment, pay = gw:create(o) -- 201 asserted
function _M.create(gw, o)
  local body = { order_id = o.order_id or ("o-" .. crypto.random_nonce(10)),
                 channel = o.channel or "native", amount = o.amount or 100,
                 description = o.description or "core spec" }
  for k, v in pairs(o) do body[k] = v end
  local res = gw:call("POST", "/v1/payments", body)
  assert(res.status == 201, "create: " .. res.status .. " " .. res.body)
  return res.json.payment, res.json.pay
end

function _M.get(gw, id, q)
  local res = gw:call("GET", "/v1/payments/" .. id .. (q or ""))
  assert(res.status == 200, "get: " .. res.status .. " " .. res.body)
  return res.json
end

--- syntax: p = gw:wait_state(id, state[, timeout])
function _M.wait_state(gw, id, state, timeout)
  local p
  testing.wait_until(function()
    p = gw:get(id)
    return p.state == state
  end, timeout or 10, "payment " .. id .. " to be " .. state)
  return p
end

--- syntax: statuses = gw:concurrent_refunds(id, n, amount)
-- n refund POSTs of `amount` at once; returns { [status] = count }.
function _M.concurrent_refunds(gw, id, n, amount)
  local core = require "paygate.core"
  local counts, done = {}, 0
  for _ = 1, n do
    core.spawn(function()
      local res = gw:call("POST", "/v1/payments/" .. id .. "/refunds",
                          { amount = amount })
      counts[res.status] = (counts[res.status] or 0) + 1
      done = done + 1
    end)
  end
  testing.wait_until(function() return done == n end, 30, "the refunds")
  return counts
end

function _M.stop(gw)
  if gw.db then gw.db:close() end
end

return _M
