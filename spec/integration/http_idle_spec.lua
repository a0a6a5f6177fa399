-- At the connection cap, idle keep-alive connections must not lock new
-- clients out: the oldest idle one is closed to admit a new client at
-- once; a connection in a request is never closed for this; counted on
-- /metrics.
local server = require "support.server"
local rawtcp = require "support.rawtcp"
local core = require "paygate.core"
local proc = require "support.proc"

local APP = [[
local paygate = require "paygate"
paygate.route("GET", "/", function() return 200, "hi" end)
paygate.route("GET", "/slow", function()
  paygate.sleep(1.5)
  return 200, "slow done"
end)
]]

local CAP = 20

local function get(c, path)
  assert(c:send("GET " .. path .. " HTTP/1.1\r\nHost: x\r\n\r\n"))
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
    -- one connection in a request that takes 1.5 s, CAP - 1 idle after one
    -- request each (oldest first)
    local busy = assert(rawtcp.connect(s.port, 5))
    get(busy, "/slow")
    local idle = {}
    for i = 1, CAP - 1 do
      local c = assert(rawtcp.connect(s.port, 5))
      get(c, "/")
      assert.matches("^HTTP/1.1 200", c:recv_some())
      idle[i] = c
    end
    -- three new clients, each answered within a second
    local fresh = {}
    for i = 1, 3 do
      local c = assert(rawtcp.connect(s.port, 5))
      local t0 = core.mono()
      c:send("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
      local out = c:recv_some()
      local took = core.mono() - t0
      assert.matches("^HTTP/1.1 200", out)
      assert.is_true(took < 1, "new client " .. i .. " waited " .. took
                     .. " s")
      fresh[i] = c
    end
    -- the one in a request was not dropped
    assert.matches("^HTTP/1.1 200.*slow done$", busy:recv_some())
    -- the three oldest idle ones were closed; the newest still serves
    for i = 1, 3 do
      idle[i]:send("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
      assert.equal("", idle[i]:recv_all(), "idle connection " .. i)
    end
    get(idle[CAP - 1], "/")
    assert.matches("^HTTP/1.1 200", idle[CAP - 1]:recv_some())
    -- counted
    proc.wait_until(function()
      local res = s:admin_get("/metrics")
      local n = res and res.body:match(
        "\npaygate_connections_reclaimed_total (%d+)\n")
      return n and tonumber(n) >= 3
    end, 5, "reclaimed connections on /metrics")
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
    proc.wait_until(function()
      local res = s:admin_get("/metrics")
      local n = res and res.body:match(
        "\npaygate_connections_lingered_total (%d+)\n")
      return n and tonumber(n) >= CAP2
    end, 5, "lingering connections on /metrics")
    for i = 1, 2 do
      local c = assert(rawtcp.connect(s.port, 5))
      local t0 = core.mono()
      get(c, "/")
      local out = c:recv_some()
      local took = core.mono() - t0
      assert.matches("^HTTP/1.1 200", out)
      assert.is_true(took < 1, "new client " .. i .. " waited " .. took
                     .. " s")
      c:close()
    end
    for _, c in ipairs(lingering) do c:close() end
  end)
end)
