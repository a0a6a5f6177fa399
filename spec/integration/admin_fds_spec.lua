-- Admin connections are the master's alone: a worker forked while one is
-- open (a start, a restart, a reload) must not keep it. It did: the
-- master closed its end (the reply written, or its 5 s timeout) and the
-- client saw no EOF for as long as that worker lived, which held the
-- socket too.
local server = require "support.server"
local proc = require "paygate.testing.proc"
local rawtcp = require "support.rawtcp"

describe("an admin connection open while a worker is forked", function()
  it("is closed when the master closes it", function()
    local s = server.start{ source = [[
local paygate = require "paygate"
paygate.route("GET", "/version", function() return 200, "v1" end)
]], workers = 1 }
    finally(function() s:stop() end)
    -- one idle, one mid-request: both open when generation 2 forks
    local idle = assert(rawtcp.connect(s.admin, 10))
    local half = assert(rawtcp.connect(s.admin, 10))
    assert(half:send("GET /healthz HTTP/1.1\r\n"))
    -- the master has accepted both and read the half request
    proc.wait_until(function()
      return require("support.tcpq").all_read(s.admin, 2)
    end, 10, "the master to take both connections")
    s:signal(proc.SIGHUP)
    proc.wait_until(function()
      return s:logs():find("generation 2 serving", 1, true) ~= nil
    end, 15, "the reload")
    -- the master times both out after 5 s of silence and closes them
    local _, how = idle:recv_all()
    assert.equal("eof", how)
    assert(half:send("\r\n"))
    local _, how2 = half:recv_all()
    assert.is_true(how2 == "eof" or how2 == "reset", how2)
    idle:close()
    half:close()
  end)
end)

-- A client that sends its request head one byte every second never
-- finished it, and the read timeout (5 s of silence) started again at
-- each byte: the connection was held for as long as the client liked.
-- 64 such clients (the admin listener's limit) took every slot, and
-- /healthz and /metrics went unanswered until they stopped.
describe("an admin client that trickles its request head", function()
  it("is closed 5 s after it connected, bytes or not", function()
    local core = require "paygate.core"
    local s = server.start{ source = [[
local paygate = require "paygate"
paygate.route("GET", "/version", function() return 200, "v1" end)
]], workers = 1 }
    finally(function() s:stop() end)
    local c = assert(rawtcp.connect(s.admin, 1))
    finally(function() c:close() end)
    local t0 = core.mono()
    assert(c:send("GET /healthz HTTP/1.1\r\n"))
    local how
    while core.mono() - t0 < 15 do
      -- a byte a second, each well inside the 5 s of silence allowed
      if not c:send("X") then how = "send failed" break end
      local _, h = c:recv_all()     -- (waits 1 s: the receive timeout)
      if h ~= "timeout" then how = h break end
    end
    local took = core.mono() - t0
    assert.is_truthy(how == "eof" or how == "reset" or how == "send failed",
                     "still open after " .. took .. " s")
    assert.is_true(took < 8, "closed after " .. took .. " s")
    -- and the listener answers the next client
    local h = assert(s:admin_get("/healthz"))
    assert.equal(200, h.status)
  end)
end)

-- The admin listener is read-only: it answered every method 200 (a POST
-- /metrics read as a scrape), and a HEAD got the body too.
describe("the admin listener's methods", function()
  it("answers GET and HEAD (no body), 405 to the rest", function()
    local s = server.start{ source = [[
local paygate = require "paygate"
paygate.route("GET", "/version", function() return 200, "v1" end)
]], workers = 1 }
    finally(function() s:stop() end)
    local function raw(method, path)
      local c = assert(rawtcp.connect(s.admin, 5))
      assert(c:send(method .. " " .. path .. " HTTP/1.1\r\nHost: x\r\n\r\n"))
      local got = c:recv_all()
      c:close()
      return got
    end
    local get = raw("GET", "/healthz")
    assert.matches("^HTTP/1.1 200 OK\r\n", get)
    local n = tonumber(get:match("Content%-Length: (%d+)"))
    assert.is_true(n > 0)
    assert.equal(n, #get - get:find("\r\n\r\n", 1, true) - 3)
    local head = raw("HEAD", "/healthz")
    assert.matches("^HTTP/1.1 200 OK\r\n", head)
    assert.equal(tostring(n), head:match("Content%-Length: (%d+)"))
    assert.equal(#head, head:find("\r\n\r\n", 1, true) + 3)   -- no body
    for _, m in ipairs({ "POST", "DELETE", "PUT" }) do
      local r = raw(m, "/metrics")
      assert.matches("^HTTP/1.1 405 Method Not Allowed\r\n", r)
      assert.matches("Allow: GET, HEAD\r\n", r, 1, true)
    end
  end)
end)
