-- At the connection cap, idle keep-alive connections, and new ones that
-- have sent nothing, must not lock new clients out: the oldest idle one
-- is closed to admit a new client at once; a connection in a request is
-- never closed for this; counted on /metrics.
local server = require "support.server"
local rawtcp = require "support.rawtcp"
local core = require "paygate.core"
local paygate = require "paygate"
local proc = require "support.proc"

local APP = [[
local paygate = require "paygate"
paygate.route("GET", "/", function() return 200, "hi" end)
paygate.route("POST", "/up", function(req) return 200, "got " .. #req.body end)
-- in a request until the test creates the file ?go= names (30 s at most)
paygate.route("GET", "/slow", function(req)
  local go, t0 = req:query().go, paygate.update_time()
  while paygate.update_time() - t0 < 30 do
    local f = io.open(go)
    if f then f:close() break end
    paygate.sleep(0.01)
  end
  return 200, "slow done"
end)
-- holds the worker's loop 1.5 s without yielding (a worker that falls
-- behind: a long synchronous step, a starved CPU), once the file ?at=
-- names says it began; then waits in its request as /slow does
paygate.route("GET", "/block", function(req)
  local q, core = req:query(), require "paygate.core"
  io.open(q.at, "w"):close()
  local t0 = core.mono()
  while core.mono() - t0 < 1.5 do end
  while core.mono() - t0 < 30 do
    local f = io.open(q.go)
    if f then f:close() break end
    paygate.sleep(0.01)
  end
  return 200, "block done"
end)
]]

local CAP = 20

local function get(c, path)
  assert(c:send("GET " .. path .. " HTTP/1.1\r\nHost: x\r\n\r\n"))
end

-- /slow holds its request until go(s) (was 1.5 s: on a loaded machine it
-- could end, the connection then idle and closed first, before the new
-- clients came)
local function slow_path(s)
  return "/slow?go=" .. s.dir .. "/go"
end

local function go(s)
  io.open(s.dir .. "/go", "w"):close()
end

-- waits (5 s at most) until /metrics counts at least n connections
-- `what` (reclaimed, lingered; reclaimed by reason: idle or slow_head)
local function wait_counted(s, what, n, reason)
  local series = "\npaygate_connections_" .. what .. "_total"
                 .. (what == "reclaimed" and ('{reason="' .. (reason or "idle")
                                               .. '"}') or "")
  proc.wait_until(function()
    local res = s:admin_get("/metrics")
    local at = res and res.body:find(series .. " ", 1, true)
    local got = at and res.body:match("^ (%d+)\n", at + #series)
    return got and tonumber(got) >= n
  end, 5, what .. " connections on /metrics")
end

describe("idle keep-alive connections at the connection cap", function()
  local s

  setup(function()
    s = server.start{ source = APP, workers = 1,
      config = ([[return { limits = { connections = %d,
        keepalive_timeout = 20 } }]]):format(CAP) }
  end)

  teardown(function()
    if s then assert.equal(0, s:stop()) end
  end)

  it("closes the oldest idle ones to admit new clients at once", function()
    -- one connection in a request (until go), CAP - 1 idle after one
    -- request each (oldest first)
    local busy = assert(rawtcp.connect(s.port, 5))
    get(busy, slow_path(s))
    local idle = {}
    for i = 1, CAP - 1 do
      local c = assert(rawtcp.connect(s.port, 5))
      get(c, "/")
      assert.matches("^HTTP/1.1 200", c:recv_some())
      idle[i] = c
    end
    -- three new clients, each answered at once: not once an idle one
    -- ends its keepalive_timeout (20 s; the receive gives up at 5 s);
    -- room for a loaded machine
    local fresh = {}
    for i = 1, 3 do
      local c = assert(rawtcp.connect(s.port, 5))
      local t0 = core.mono()
      c:send("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
      local out = c:recv_some()
      local took = core.mono() - t0
      assert.matches("^HTTP/1.1 200", out)
      assert.is_true(took < 4, "new client " .. i .. " waited " .. took
                     .. " s")
      fresh[i] = c
    end
    -- the one in a request was not dropped
    go(s)
    assert.matches("^HTTP/1.1 200.*slow done$", busy:recv_some())
    -- the three oldest idle ones were closed; the newest still serves
    for i = 1, 3 do
      idle[i]:send("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
      assert.equal("", idle[i]:recv_all(), "idle connection " .. i)
    end
    get(idle[CAP - 1], "/")
    assert.matches("^HTTP/1.1 200", idle[CAP - 1]:recv_some())
    -- counted
    wait_counted(s, "reclaimed", 3)
    busy:close()
    for _, c in ipairs(idle) do c:close() end
    for _, c in ipairs(fresh) do c:close() end
  end)
end)

describe("lingering closes at the connection cap", function()
  local s
  local CAP2 = 5

  setup(function()
    s = server.start{ source = APP, workers = 1,
      config = ([[return { limits = { connections = %d } }]]):format(CAP2) }
  end)

  teardown(function()
    if s then assert.equal(0, s:stop()) end
  end)

  it("go first to admit new clients, before the linger ends", function()
    -- CAP2 clients each pipeline a request behind one that asks to close:
    -- the server answers, shuts its side and lingers (reading what they
    -- still send, for 2 s after their last byte) while they stay open
    local lingering = {}
    for i = 1, CAP2 do
      local c = assert(rawtcp.connect(s.port, 5))
      assert(c:send("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                    .. "GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
      local out, how = c:recv_all()
      assert.matches("^HTTP/1.1 200", out)
      assert.equal("eof", how)
      lingering[i] = c
    end
    wait_counted(s, "lingered", CAP2)
    -- a byte from each restarts its linger's 2 s now, so they are all
    -- still lingering when the new clients come, however long the setup
    -- above took on a loaded machine
    for _, c in ipairs(lingering) do assert(c:send("x")) end
    for i = 1, 2 do
      local c = assert(rawtcp.connect(s.port, 5))
      local t0 = core.mono()
      get(c, "/")
      local out = c:recv_some()
      local took = core.mono() - t0
      assert.matches("^HTTP/1.1 200", out)
      -- (the linger ends 2 s after the client's last byte: too close to
      -- tell by the clock on a loaded machine; the reclaimed count below
      -- tells that a lingering close was cut short for it, not ended by
      -- its timer)
      assert.is_true(took < 3, "new client " .. i .. " waited " .. took
                     .. " s")
      c:close()
    end
    -- a lingering close reclaimed for the first new client (the second
    -- takes the place the first left; ended by LINGER_IDLE instead, they
    -- would count none)
    wait_counted(s, "reclaimed", 1)
    for _, c in ipairs(lingering) do c:close() end
  end)
end)

-- A client that connects and sends nothing is no more in a request than
-- an idle keep-alive one: at the cap the oldest such connection goes too
-- (as nginx reuses them), or a handful of silent clients reconnecting
-- every header_timeout would lock everyone out. On TLS: silent before
-- its ClientHello. Only once silent for a grace of 1 s: the client of a
-- connection just accepted may be sending its first bytes.
describe("silent new connections at the connection cap", function()
  local pki = require "support.pki"
  local CAP3 = 5
  local dir, p

  local function new_client_answered(port, tls)
    local t0 = core.mono()
    local out
    if tls then
      local _, o = proc.run({ "sh", "-c", ("printf 'GET / HTTP/1.1\\r\\n"
        .. "Host: x\\r\\nConnection: close\\r\\n\\r\\n' | openssl s_client"
        .. " -connect 127.0.0.1:%d -quiet 2>/dev/null"):format(port) },
        { timeout = 20 })
      out = o or ""
    else
      local c = assert(rawtcp.connect(port, 20))
      get(c, "/")
      out = c:recv_some() or ""
      c:close()
    end
    return out, core.mono() - t0
  end

  setup(function()
    dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir))
    p = pki.make(dir)
  end)

  teardown(function()
    if dir then os.execute("rm -rf " .. dir) end
  end)

  -- a TLS connection that has sent part of its ClientHello is in its
  -- handshake (OpenSSL's state says nothing until the whole message is
  -- in): kept, while a silent one beside it goes
  it("keep a TLS connection whose ClientHello has begun", function()
    local s = server.start{ source = APP, workers = 1, scheme = "https",
      ca_file = p.ca, config = ([[return { limits = { connections = 2,
        header_timeout = 15 }, tls = { cert = %q, key = %q } }]])
        :format(p.server_cert, p.server_key) }
    local ok, err = pcall(function()
      local begun = assert(rawtcp.connect(s.port, 0.5))
      assert(begun:send("\22\3\1\0\200"))   -- a record header, then
      local silent = assert(rawtcp.connect(s.port, 0.5))
      local out, took = new_client_answered(s.port, true)
      assert.matches("HTTP/1.1 200", out)
      -- the silent one's 1 s grace, not header_timeout (15 s)
      assert.is_true(took < 8, "the new client waited " .. took .. " s")
      local _, how = silent:recv_all()
      assert.equal("eof", how, "the silent connection")
      _, how = begun:recv_all()
      assert.equal("timeout", how, "the one whose ClientHello began")
      begun:close()
      silent:close()
    end)
    assert.equal(0, s:stop())
    assert(ok, err)
  end)

  for _, tls in ipairs{ false, true } do
    it("are closed, oldest first, to admit new clients at once ("
       .. (tls and "https" or "http") .. ")", function()
      local s = server.start{ source = APP, workers = 1,
        scheme = tls and "https" or "http", ca_file = tls and p.ca or nil,
        config = ([[return { limits = { connections = %d,
          header_timeout = 15 }%s }]]):format(CAP3, tls and
          (", tls = { cert = %q, key = %q }"):format(p.server_cert,
                                                     p.server_key) or "") }
      local ok, err = pcall(function()
        -- one in a request until go (plain: a raw socket can ask
        -- on plain HTTP only), the rest connected and silent, oldest
        -- first (a short receive timeout: the newest is checked to stay)
        local busy
        if not tls then
          busy = assert(rawtcp.connect(s.port, 5))
          get(busy, slow_path(s))
        end
        local silent = {}
        local function add_silent()
          silent[#silent + 1] = assert(rawtcp.connect(s.port, 0.5))
        end
        for _ = 1, CAP3 - (busy and 1 or 0) do add_silent() end
        -- the first new client waits until the oldest silent one has
        -- been silent FRESH_GRACE (1 s: a client just connected may be
        -- sending its first bytes), not header_timeout (15 s); the
        -- second finds the next one silent long enough
        for i = 1, 2 do
          local out, took = new_client_answered(s.port, tls)
          assert.matches("HTTP/1.1 200", out)
          if i == 1 then
            assert.is_true(took >= 0.5, "a silent connection was closed"
                           .. " within its grace (" .. took .. " s)")
          end
          -- the first: the grace, not header_timeout (15 s), room for
          -- a loaded machine; the second: at once
          assert.is_true(took < (i == 1 and 8 or 1), "new client " .. i
                         .. " waited " .. took .. " s")
          add_silent()          -- the cap is full again, newest last
        end
        if busy then
          go(s)
          assert.matches("^HTTP/1.1 200.*slow done$", busy:recv_some())
          busy:close()
        end
        -- the two oldest silent ones were closed, the newest is open
        for i = 1, 2 do
          local out, how = silent[i]:recv_all()
          assert.equal("", out)
          assert.equal("eof", how, "silent connection " .. i)
        end
        local _, how = silent[#silent]:recv_all()
        assert.equal("timeout", how, "the newest silent connection")
        wait_counted(s, "reclaimed", 2)
        for _, c in ipairs(silent) do c:close() end
      end)
      assert.equal(0, s:stop())
      assert(ok, err)
    end)
  end
end)

-- Clients that each keep a request head coming a few bytes at a time
-- (well inside header_timeout) held every place at the cap until
-- header_timeout, and reconnected: everyone else was refused. At the cap
-- the connection that has been reading its head longest, a second at
-- least, now makes room (408) for a new client; one whose request is
-- parsed (its body arriving, its handler running) never does.
describe("heads trickled at the connection cap", function()
  local CAP4 = 8
  local HEAD = "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: "
  local s

  before_each(function()
    s = server.start{ source = APP, workers = 1,
      config = ([[return { limits = { connections = %d,
        header_timeout = 30, body_timeout = 30 } }]]):format(CAP4) }
  end)

  after_each(function()
    if s then assert.equal(0, s:stop()) end
    s = nil
  end)

  -- n connections, oldest first, each with a head begun
  local function tricklers(n)
    local t = {}
    for i = 1, n do
      -- (a short receive timeout: those that stay are checked to)
      t[i] = assert(rawtcp.connect(s.port, 0.3))
      assert(t[i]:send(HEAD))
    end
    return t
  end

  -- a genuine request on a new connection, its answer awaited (10 s at
  -- most: header_timeout and body_timeout are 30) while every trickler sends a byte of its
  -- head every 0.4 s; returns the answer and when it came (mono)
  local function genuine(t, send)
    local c = assert(rawtcp.connect(s.port, 0.2))
    assert(c:send(send or "GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    local out, deadline, next_byte = "", core.mono() + 10, 0
    while out == "" and core.mono() < deadline do
      if core.mono() >= next_byte then
        for _, tc in ipairs(t) do tc:send("a") end  -- (may be closed)
        next_byte = core.mono() + 0.4
      end
      out = c:recv_some()
    end
    local at = core.mono()
    c:close()
    return out, at
  end

  it("a new client takes the place of the oldest, once 1 s old", function()
    local t0 = core.mono()
    local t = tricklers(CAP4)
    local out, at = genuine(t)
    assert.matches("^HTTP/1.1 200", out)
    -- the oldest was kept its second (from before its connect: the
    -- server's accept came later)
    assert.is_true(at - t0 >= 1.0, "a head was cut after " .. (at - t0)
                   .. " s")
    -- the oldest was answered 408 and closed; the others still wait
    local old, how = t[1]:recv_all()
    assert.matches("^HTTP/1.1 408 .*request head too slow at the "
                   .. "connection cap %(limits.connections%)", old)
    assert.is_true(how == "eof" or how == "reset", how)
    for i = 2, CAP4 do
      local _, h = t[i]:recv_all()
      assert.equal("timeout", h, "trickler " .. i)
    end
    wait_counted(s, "reclaimed", 1, "slow_head")
    wait_counted(s, "reclaimed", 0, "idle")
    for _, c in ipairs(t) do c:close() end
  end)

  it("never takes one whose request is handled or body arriving", function()
    local busy = assert(rawtcp.connect(s.port, 5))
    get(busy, slow_path(s))
    local up = assert(rawtcp.connect(s.port, 5))
    assert(up:send("POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 20"
                   .. "\r\n\r\n0123"))
    -- the oldest two: if either went, the head that goes is not the one
    -- reading its head longest
    local t = tricklers(CAP4 - 2)
    local out = genuine(t)
    assert.matches("^HTTP/1.1 200", out)
    assert.matches("^HTTP/1.1 408", t[1]:recv_all())
    -- the cap full again (the new client has gone), and a second new
    -- client: the next oldest head goes, not the newest
    t[#t + 1] = assert(rawtcp.connect(s.port, 0.3))
    assert(t[#t]:send(HEAD))
    out = genuine(t)
    assert.matches("^HTTP/1.1 200", out)
    assert.matches("^HTTP/1.1 408", t[2]:recv_all())
    -- the body arrives and is answered, the handler too
    assert(up:send("456789abcdefghij"))
    assert.matches("^HTTP/1.1 200.*got 20$", up:recv_some())
    go(s)
    assert.matches("^HTTP/1.1 200.*slow done$", busy:recv_some())
    wait_counted(s, "reclaimed", 2, "slow_head")
    local _, how = t[#t]:recv_all()
    assert.equal("timeout", how, "the newest trickler")
    busy:close()
    up:close()
    for _, c in ipairs(t) do c:close() end
  end)
end)

-- Idle connections go first at the cap, a silent new one too once its
-- second of grace is over; a head only when no connection is idle. A
-- head begun a little before a silent connection came reached its own
-- second first, and went in its place.
describe("a head begun before a silent connection at the cap", function()
  it("stays; the silent one goes once its grace is over", function()
    local s = server.start{ source = APP, workers = 1,
      config = [[return { limits = { connections = 2,
        header_timeout = 15 } }]] }
    finally(function() s:stop() end)
    local begun = assert(rawtcp.connect(s.port, 0.5))
    assert(begun:send("GET / HTTP/1.1\r\nHost: x\r\n"))
    -- the silent one comes 0.3 s later (the head's second ends first)
    local t0 = core.mono()
    while core.mono() - t0 < 0.3 do paygate.sleep(0.02) end
    local silent = assert(rawtcp.connect(s.port, 0.5))
    local c = assert(rawtcp.connect(s.port, 10))
    get(c, "/")
    assert.matches("^HTTP/1.1 200", c:recv_some())
    local out, how = silent:recv_all()
    assert.equal("eof", how, "the silent connection: " .. out)
    out, how = begun:recv_all()
    assert.equal("timeout", how, "the head begun: " .. out)
    -- and it is still served
    assert(begun:send("\r\n"))
    assert.matches("^HTTP/1.1 200", begun:recv_some())
    for _, conn in ipairs{ begun, silent, c } do conn:close() end
    wait_counted(s, "reclaimed", 1, "idle")
    assert.matches('\npaygate_connections_reclaimed_total{reason="slow_head"}'
                   .. " 0\n", s:admin_get("/metrics").body)
  end)
end)

-- A head that waits whole in the socket, unread because the worker fell
-- behind (its loop held past HEAD_GRACE), is not a slow client: the
-- server is. At the cap it is read and answered, not cut with a 408.
describe("heads the worker has not read yet at the connection cap", function()
  it("are not taken for slow ones", function()
    local s = server.start{ source = APP, workers = 1,
      config = [[return { limits = { connections = 3,
        header_timeout = 30 } }]] }
    finally(function() go(s); s:stop() end)
    -- b and c connect first and stay silent; a's answer says the worker
    -- has accepted all three
    local b = assert(rawtcp.connect(s.port, 10))
    local c = assert(rawtcp.connect(s.port, 10))
    local a = assert(rawtcp.connect(s.port, 10))
    get(a, "/")
    assert.matches("^HTTP/1.1 200", a:recv_some())
    -- a holds the worker's loop; meanwhile a new client comes (at the
    -- cap: a place is wanted) and b and c send their whole heads
    local at = s.dir .. "/blocking"
    get(a, "/block?at=" .. at .. "&go=" .. s.dir .. "/go")
    proc.wait_until(function() return proc.exists(at) end, 10,
                    "the worker's loop held")
    local d = assert(rawtcp.connect(s.port, 10))
    get(b, "/")
    get(c, "/")
    -- both are answered: neither was cut as a slow head
    for name, conn in pairs{ b = b, c = c } do
      local out = conn:recv_some()
      assert.matches("^HTTP/1.1 200", out, nil, name .. ": " .. out
                     .. "\n" .. s:logs())
    end
    -- and the new client is admitted once they are idle (in b's or c's
    -- place), not after keepalive_timeout
    get(d, "/")
    local out = d:recv_some()
    assert.matches("^HTTP/1.1 200", out, nil, "d: " .. out)
    for _, conn in ipairs{ a, b, c, d } do conn:close() end
    wait_counted(s, "reclaimed", 1, "idle")
    assert.matches('\npaygate_connections_reclaimed_total{reason="slow_head"}'
                   .. " 0\n", s:admin_get("/metrics").body)
    assert.is_nil(s:logs():find("request head too slow", 1, true))
  end)
end)
