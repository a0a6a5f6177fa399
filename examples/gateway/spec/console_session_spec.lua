-- examples/gateway: the console's sessions against a change of the token.
-- An operator who learns that the console token leaked writes a new one
-- and reloads the gateway (HUP, `paygate reload`). A session logged in
-- with the old token must end there: the shared dictionary the sessions
-- live in outlives a reload, so without a tie to the token a session an
-- attacker made with the leaked token would last its whole session_ttl
-- (up to a day) after the rotation meant to shut them out.
--
-- And the console's key (the HMAC key of every CSRF token) against a full
-- shared dictionary: the dictionary is LRU, and anyone who reaches the
-- gateway adds entries to it (each client address that sends a wrong
-- token, or none, to /admin/* or the login gets a throttling count), so
-- an attacker with many addresses (an IPv6 /64) evicts the key of a
-- console nobody is looking at. The console must not stay broken.
local testing = require "paygate.testing"
local html = require "paygate.html"
local core = dofile("examples/gateway/spec/core_support.lua")
local ffi = require "ffi"

for _, decl in ipairs({
  "int socket(int domain, int type, int protocol);",
  "int bind(int fd, const void *addr, unsigned int len);",
  "int connect(int fd, const void *addr, unsigned int len);",
  "long write(int fd, const void *buf, unsigned long n);",
  "long read(int fd, void *buf, unsigned long n);",
  "int close(int fd);",
  "struct spec_sockaddr_in { uint16_t family; uint8_t port[2];"
    .. " uint8_t addr[4]; uint8_t zero[8]; };",
}) do pcall(ffi.cdef, decl) end
local C = ffi.C

-- One GET from the loopback address 127.a.b.c (Linux answers for all of
-- 127/8): the status line's code.
local function get_from(a, b, c, port, path)
  local fd = C.socket(2, 1, 0)                 -- AF_INET, SOCK_STREAM
  assert(fd >= 0, "socket")
  local sa = ffi.new("struct spec_sockaddr_in")
  sa.family = 2
  sa.addr[0], sa.addr[1], sa.addr[2], sa.addr[3] = 127, a, b, c
  local ok = C.bind(fd, sa, ffi.sizeof(sa)) == 0
  sa.addr[1], sa.addr[2], sa.addr[3] = 0, 0, 1
  sa.port[0], sa.port[1] = math.floor(port / 256), port % 256
  ok = ok and C.connect(fd, sa, ffi.sizeof(sa)) == 0
  local status
  if ok then
    local req = "GET " .. path .. " HTTP/1.1\r\nHost: 127.0.0.1\r\n"
      .. "Connection: close\r\n\r\n"
    C.write(fd, req, #req)
    local buf = ffi.new("char[64]")
    local n = C.read(fd, buf, 64)
    status = n > 0 and tonumber(ffi.string(buf, n):match("^HTTP/1%.1 (%d+)"))
  end
  C.close(fd)
  return assert(status, "no answer from 127." .. a .. "." .. b .. "." .. c)
end

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

describe("gateway console key", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    local db_url
    local srv = testing.start_app{ app = "examples/gateway", workers = 2,
      config = function(srv)
        local tok = srv.dir .. "/admin.token"
        core.write(tok, "admin-token-0123456789abcdef\n")
        local c = core.config(sim, srv, {
          admin_token_file = tok, console = { access = "loopback" },
          reconcile = { enabled = false } })
        -- a small dictionary, so a few hundred addresses fill it
        c.shared = { paygate = "256k" }
        db_url = c.gateway.db
        return c
      end }
    gw = core.gateway(srv, db_url)
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  local function metric(name)
    local res = assert(gw.srv:admin_get("/metrics"))
    return assert(tonumber(res.body:match("\n" .. name
      .. '{dict="paygate"} (%d+)')), name)
  end

  it("is not evicted by a flood of wrong tokens from many addresses",
     function()
    assert.equal(200, get(gw, "/console").status)   -- the key, just used
    -- each address that sends a wrong token (or none) opens a throttling
    -- window in the shared dictionary. Unbounded, a flood from enough
    -- addresses filled it and evicted what the workers keep there: the
    -- console key (every page then answered 500), the sessions, the
    -- degradation switch. Now the windows open at once are bounded (an
    -- eighth of the dictionary): past it a new address is refused (503),
    -- and nothing is evicted. (The key is also put back when evicted by
    -- other pressure: gw/console.lua.)
    local evicted = metric("paygate_shared_evictions_total")
    local i, status = 0, 403
    while status == 403 do
      i = i + 1
      assert(i < 5000, "no address refused after " .. i)
      -- an /admin/* call without the token: counted for its address
      status = get_from(1 + math.floor(i / 65536) % 250,
        math.floor(i / 256) % 256, 1 + i % 254, gw.srv.port,
        "/admin/degrade")
    end
    assert.equal(503, status)
    assert.is_true(i > 64, "refused at address " .. i)
    assert.equal(evicted, metric("paygate_shared_evictions_total"))
    -- the console still answers, and its levers still take its tokens
    -- (whichever worker makes the form and whichever checks it)
    for _ = 1, 4 do
      local page = get(gw, "/console")
      assert.equal(200, page.status, page.body)
      local csrf = assert(page.body:match('name="csrf" value="(%x+)"'))
      local res = gw.srv:request{ method = "POST", path = "/console/degrade",
        body = form({ on = "0", csrf = csrf }), headers = {
          ["Content-Type"] = "application/x-www-form-urlencoded" } }
      assert.equal(303, res.status, res.body)
    end
  end)
end)
