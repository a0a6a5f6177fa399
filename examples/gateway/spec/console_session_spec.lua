-- examples/gateway: the console's sessions against a change of the token.
-- An operator who learns that the console token leaked writes a new one
-- and reloads the gateway (HUP, `paygate reload`). A session logged in
-- with the old token must end there: the shared dictionary the sessions
-- live in outlives a reload, so without a tie to the token a session an
-- attacker made with the leaked token would last its whole session_ttl
-- (up to a day) after the rotation meant to shut them out.
local testing = require "paygate.testing"
local html = require "paygate.html"
local core = dofile("examples/gateway/spec/core_support.lua")

local OLD = "console-token-old-0123456789"
local NEW = "console-token-new-9876543210"

local function form(t)
  local out = {}
  for k, v in pairs(t) do
    out[#out + 1] = html.url_encode(k) .. "=" .. html.url_encode(v)
  end
  return table.concat(out, "&")
end

local function get(gw, path, cookie)
  return gw.srv:request{ path = path,
                         headers = cookie and { Cookie = cookie } or nil }
end

-- logs in with token: the session cookie ("pgc_session=..."), or nil and
-- the login's answer
local function login(gw, token)
  local res = get(gw, "/console/login")
  assert.equal(200, res.status, res.body)
  local lc = assert(res.headers["set-cookie"]:match("^(pgc_login=%w+);"))
  local csrf = assert(res.body:match('name="csrf" value="(%x+)"'))
  res = gw.srv:request{ method = "POST", path = "/console/login",
    body = form({ token = token, csrf = csrf }), headers = {
      ["Content-Type"] = "application/x-www-form-urlencoded", Cookie = lc } }
  if res.status ~= 303 then return nil, res end
  return assert(res.headers["set-cookie"]:match("^(pgc_session=%w+);"))
end

-- How many reloads the master has finished, and the last one's outcome
local function reloads(srv)
  local text = testing.proc.read(srv.dir .. "/paygate.pid.reload")
  local n, what = text:match("^(%d+) (%S+)")
  return tonumber(n) or 0, what, text
end

describe("gateway console sessions", function()
  local sim, gw, tok

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    local dir = testing.tmpdir()
    tok = dir .. "/console.token"
    core.write(tok, OLD .. "\n")
    gw = core.start(sim, { gateway = {
      console = { token_file = tok, session_ttl = 3600 },
      reconcile = { enabled = false } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  it("end when the token is changed and the gateway reloaded", function()
    local cookie = assert(login(gw, OLD))
    assert.equal(200, get(gw, "/console", cookie).status)
    core.write(tok, NEW .. "\n")
    local srv = gw.srv
    local before = reloads(srv)
    srv:signal(testing.proc.SIGHUP)
    testing.wait_until(function() return reloads(srv) > before end, 60,
                       "the reload")
    local _, what, text = reloads(srv)
    assert.equal("ok", what, text)
    -- the new workers take the new token only
    testing.wait_until(function() return login(gw, NEW) ~= nil end, 30,
                       "the new token to log in")
    local _, refused = login(gw, OLD)
    assert.equal(403, refused.status)
    -- and the session the old token opened is over
    local res = get(gw, "/console", cookie)
    assert.equal(303, res.status, res.body)
    assert.equal("/console/login", res.headers["location"])
  end)

  it("made with the same token live on across a reload", function()
    local token = NEW
    local cookie = assert(login(gw, token))
    local srv = gw.srv
    local before = reloads(srv)
    srv:signal(testing.proc.SIGHUP)
    testing.wait_until(function() return reloads(srv) > before end, 60,
                       "the reload")
    assert.equal("ok", select(2, reloads(srv)))
    assert.equal(200, get(gw, "/console", cookie).status)
  end)
end)
