-- Timeouts that protect a worker without cutting honest clients, and the
-- request deadline cancelling what the handler waits on.
local paygate = require "paygate"
local server = require "support.server"
local rawtcp = require "support.rawtcp"

local APP = [[
local paygate = require "paygate"
local reached = 0
paygate.route("POST", "/notify", function(req)
  paygate.sleep(0.05)            -- the handler waits on something, as they do
  return 200, "got " .. #req.body
end)
paygate.route("GET", "/abandoned", function(req)
  req:set_deadline(0.1)
  paygate.sleep(0.5)
  reached = reached + 1          -- must never run: the coroutine is cancelled
  return 200, "late"
end)
paygate.route("GET", "/reached", function() return 200, tostring(reached) end)
local big = ("b"):rep(512 * 1024)
paygate.route("GET", "/big", function() return 200, big end)
]]

describe("timeouts", function()
  local s
  setup(function()
    s = server.start{ source = APP, workers = 1, config = [[
      return { limits = { header_timeout = 1, body_timeout = 0.5,
                          request_timeout = 1 } }]] }
  end)
  teardown(function() if s then assert.equal(0, s:stop()) end end)

  it("never cut a body that keeps arriving at body_min_rate, however long"
     .. " it takes in total", function()
    local c = assert(rawtcp.connect(s.port, 5))
    local body = ("x"):rep(2400)
    c:send("POST /notify HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" ..
           "Content-Length: " .. #body .. "\r\n\r\n")
    -- 6 pieces, 0.3 s apart: 1.5 s in total, far over both timeouts,
    -- but no gap reaches the 0.5 s body timeout, and 400 bytes each 0.3 s
    -- is over body_min_rate (500 bytes/s by default); request_timeout
    -- (1 s) is the handler's time, which starts once the body is in
    for i = 0, 5 do
      c:send(body:sub(i * 400 + 1, i * 400 + 400))
      if i < 5 then paygate.sleep(0.3) end
    end
    local out = c:recv_all()
    c:close()
    assert.matches("^HTTP/1.1 200", out)
    assert.matches("got 2400$", out)
  end)

  it("close a body that stops arriving with 408 after the gap", function()
    local c = assert(rawtcp.connect(s.port, 5))
    local t0 = paygate.update_time()
    c:send("POST /notify HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    local out = c:recv_all()
    c:close()
    assert.matches("^HTTP/1.1 408", out)
    -- body_timeout (0.5 s), not left open (the receive gives up at 5 s):
    -- room for a loaded machine
    local took = paygate.update_time() - t0
    assert.is_true(took < 4, ("closed after %.2f s"):format(took))
  end)

  it("stop answering a pipelining client that does not read, until it does", function()
    local n = 100                            -- 100 x 512 KiB = 50 MiB of answers
    local c = assert(rawtcp.connect(s.port, 10))
    local req = "GET /big HTTP/1.1\r\nHost: x\r\n\r\n"
    c:send(req:rep(n - 1) .. "GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    local function answered()
      local m = s:admin_get("/metrics")
      return tonumber(m and m.body:match('route="/big",status="200"} (%d+)')) or 0
    end
    -- the kernel's socket buffers take a few MiB; then the worker must stop
    local last, steady = -1, 0
    require("support.proc").wait_until(function()
      local now = answered()
      steady = (now == last) and steady + 1 or 0
      last = now
      return steady >= 5
    end, 20, "the answered count to settle")
    assert.is_true(last < n / 2, last .. " of " .. n .. " answered without reading")
    -- reading everything gets every answer
    local out = c:recv_all()
    c:close()
    local _, got = out:gsub("HTTP/1.1 200 OK", "")
    assert.equal(n, got)
  end)

  it("cancel the handler's pending operation when the deadline passes", function()
    local res = assert(s:request("/abandoned"))
    assert.equal(504, res.status)
    paygate.sleep(0.6)           -- past the moment the sleep would have ended
    assert.equal("0", assert(s:request("/reached")).body)
  end)
end)

-- (a server of its own, the default body_min_rate: 500 bytes/s)
describe("a body sent a byte now and then", function()
  it("is cut with 408 once it falls behind body_min_rate, whatever its"
     .. " gaps", function()
    -- was: each gap under body_timeout re-armed it, and a client sending a
    -- byte a second held its connection (and the body's buffer) for as
    -- long as it liked: out of reach of every timeout and of the idle
    -- reclaim at the connection cap
    local s = server.start{ source = APP, workers = 1, config = [[
      return { limits = { body_timeout = 1 } }]] }
    local c = assert(rawtcp.connect(s.port, 0.05))
    local t0 = paygate.update_time()
    c:send("POST /notify HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
    -- a byte every 0.25 s (4 bytes/s), for 6 s at most: no gap reaches
    -- body_timeout (1 s), but the body is due by 1 s + its bytes / 500
    local out = ""
    while out == "" and paygate.update_time() - t0 < 6 do
      c:send("x")
      out = c:recv_some()
      if out == "" then paygate.sleep(0.25) end
    end
    c:close()
    local took = paygate.update_time() - t0
    assert.matches("^HTTP/1.1 408", out)
    assert.matches("request body not received in time", out, 1, true)
    -- 1 s and a few bytes' worth; room for a loaded machine
    assert.is_true(took >= 0.9 and took < 4, ("cut after %.2f s"):format(took))
    assert.equal(0, s:stop())
  end)

  it("is never cut with body_min_rate = 0 while no gap reaches"
     .. " body_timeout", function()
    local s = server.start{ source = APP, workers = 1, config = [[
      return { limits = { body_timeout = 0.5, body_min_rate = 0 } }]] }
    local c = assert(rawtcp.connect(s.port, 5))
    c:send("POST /notify HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
           .. "Content-Length: 6\r\n\r\n")
    for i = 1, 6 do                  -- 1.5 s for 6 bytes
      c:send("x")
      if i < 6 then paygate.sleep(0.3) end
    end
    local out = c:recv_all()
    c:close()
    assert.matches("^HTTP/1.1 200", out)
    assert.matches("got 6$", out)
    assert.equal(0, s:stop())
  end)
end)

-- (a server of its own: header_timeout long enough that "from the
-- accept" and "again from the first byte" are seconds apart)
describe("a connection's first head", function()
  it("gets header_timeout from the accept, not again from its first byte",
     function()
    local s = server.start{ source = APP, workers = 1, config = [[
      return { limits = { header_timeout = 4 } }]] }
    local c = assert(rawtcp.connect(s.port, 10))
    local t0 = paygate.update_time()
    paygate.sleep(3.5)               -- a client that waits, then trickles
    c:send("GET / HTTP/1.1\r\n")
    local out = c:recv_all()
    c:close()
    -- 408, or closed before those bytes came (a loaded machine's sleep
    -- running long): either way 4 s (header_timeout) after the accept;
    -- it was 4 s after the first byte, 7.5 s in all
    assert.is_true(out == "" or out:match("^HTTP/1.1 408") ~= nil, out)
    local took = paygate.update_time() - t0
    assert.is_true(took < 6, ("closed after %.2f s"):format(took))
    assert.equal(0, s:stop())
  end)
end)

describe("a TLS handshake that stalls", function()
  it("is closed after the header timeout, not kept like an idle keep-alive", function()
    local pki = require "support.pki"
    local dir = server.tmpdir()
    local certs = pki.make(dir)
    local s = server.start{ source = APP, workers = 1, scheme = "https",
      ca_file = certs.ca, config = [[
        return { limits = { header_timeout = 0.5, keepalive_timeout = 60 } }]],
      args = { "--tls-cert", certs.server_cert, "--tls-key", certs.server_key } }
    local c = assert(rawtcp.connect(s.port, 10))
    local t0 = paygate.update_time()
    c:send("\22\3\1\0\200")          -- the start of a ClientHello, then nothing
    c:recv_all()                     -- returns when the server closes
    c:close()
    -- header_timeout (0.5 s), not keepalive_timeout (60 s; the receive
    -- gives up at 10 s): room for a loaded machine
    local took = paygate.update_time() - t0
    assert.is_true(took < 8, ("kept the stalled handshake %.2f s")
                   :format(took))
    assert.equal(0, s:stop())
    os.execute("rm -rf " .. dir)
  end)
end)

describe("part of a TLS record after a keep-alive request", function()
  it("gets header_timeout, not keepalive_timeout", function()
    local pki = require "support.pki"
    local dir = server.tmpdir()
    local certs = pki.make(dir)
    local s = server.start{ source = APP, workers = 1, scheme = "https",
      ca_file = certs.ca, config = [[
        return { limits = { header_timeout = 2, keepalive_timeout = 60 } }]],
      args = { "--tls-cert", certs.server_cert, "--tls-key", certs.server_key } }
    local p = assert(io.popen("python3 spec/support/tls_partial.py " .. s.port
                              .. " " .. certs.ca .. " 2>&1"))
    local out = p:read("*a")
    p:close()
    assert.matches("answered", out, 1, true)
    local how, secs = out:match("(%a+) ([%d.]+)%s*$")
    assert.equal("closed", how, out)
    -- 2 s after those bytes, not 60 s (the client gives up at 30)
    assert.is_true(tonumber(secs) < 10, out)
    assert.equal(0, s:stop())
    os.execute("rm -rf " .. dir)
  end)
end)

describe("the connection limit", function()
  -- (connections that sent nothing, or idle between requests, would be
  -- closed to admit the third: http_idle_spec)
  it("leaves connections past it in the backlog while those it holds are"
     .. " in a request, until one closes", function()
    local s = server.start{ source = APP, workers = 1, config = [[
      return { limits = { connections = 2 } }]] }
    local a = assert(rawtcp.connect(s.port, 5))
    local b = assert(rawtcp.connect(s.port, 5))
    -- each is in a request: the start of its head is in
    assert(a:send("GET /reached HTTP/1.1\r\n"))
    assert(b:send("GET /reached HTTP/1.1\r\n"))
    -- the worker has accepted both and read those bytes (until then a
    -- connection has sent it nothing: closed to admit the third)
    require("support.proc").wait_until(function()
      return require("support.tcpq").all_read(s.port, 2)
    end, 10, "the worker to read both heads' start")
    -- both held: a third is not served
    local res, err = s:request{ path = "/reached", timeout = 0.5 }
    assert.is_nil(res)
    assert.equal("timeout", err.kind)
    -- one closes: the next is served
    a:close()
    res = assert(s:request{ path = "/reached", timeout = 5 })
    assert.equal(200, res.status)
    b:close()
    assert.equal(0, s:stop())
  end)
end)

describe("write_timeout", function()
  local s
  setup(function()
    s = server.start{ source = [[
local paygate = require "paygate"
local big = ("b"):rep(512 * 1024)
paygate.route("GET", "/big", function() return 200, big end)
local mid = ("m"):rep(8 * 1024)
paygate.route("GET", "/mid", function() return 200, mid end)
local huge = ("h"):rep(8 * 1024 * 1024)
paygate.route("GET", "/huge", function() return 200, huge end)
]], workers = 1, args = { "--log-level", "info" }, config = [[
      return { limits = { write_timeout = 1 } }]] }
  end)
  teardown(function() if s then assert.equal(0, s:stop()) end end)

  it("closes a pipelining client that never reads its answers", function()
    -- a few requests at a time, so each is handled while earlier
    -- answers (under the 64 KiB pause mark) still wait to be sent, until
    -- the worker stops reading
    local c = assert(rawtcp.connect(s.port, 10, 4096))
    local req = ("GET /mid HTTP/1.1\r\nHost: x\r\n\r\n"):rep(5)
    local function answered()
      local m = s:admin_get("/metrics")
      return tonumber(m and m.body:match('route="/mid",status="200"} (%d+)'))
             or 0
    end
    local wait_until = require("support.proc").wait_until
    local last, steady, sent = -1, 0, 0
    wait_until(function()
      if c:send(req) then sent = sent + 5 end   -- fails once closed
      paygate.sleep(0.05)
      local now = answered()
      steady = (now == last) and steady + 1 or 0
      last = now
      return steady >= 5
    end, 30, "the worker to stop reading")
    local n = sent
    -- closed by write_timeout (1 s), long before keepalive_timeout (75 s)
    wait_until(function()
      return s:logs():find("write stalled", 1, true)
    end, 15, "the stalled connection to be closed")
    local out, how = c:recv_all()
    c:close()
    local _, got = out:gsub("HTTP/1.1 200 OK", "")
    assert.is_true(got < n, got .. " of " .. n .. " answers")
    assert.is_true(how == "eof" or how == "reset", how)
  end)

  it("does not cut a client that keeps reading, however long it takes",
     function()
    -- 8 MiB through a small window at ~2.5 MiB/s: several write_timeouts
    -- in all, never one without progress
    local c = assert(rawtcp.connect(s.port, 10, 16384))
    assert(c:send("GET /huge HTTP/1.1\r\nHost: x\r\nConnection: close"
                  .. "\r\n\r\n"))
    local parts, total = {}, 0
    while true do
      local piece = c:recv_some()
      if piece == "" then break end
      parts[#parts + 1] = piece
      total = total + #piece
      if #parts % 4 == 0 then paygate.sleep(0.02) end
    end
    c:close()
    assert.is_true(total > 8 * 1024 * 1024, "got " .. total .. " bytes")
    assert.matches("^HTTP/1.1 200", parts[1])
  end)
end)
