-- req:drop() (no answer: the connection is reset) and req.local_addr
-- (the address the client connected to), over raw sockets.
local ffi = require "ffi"
local server = require "support.server"
local rawtcp = require "support.rawtcp"

local APP = [[
local paygate = require "paygate"
paygate.route("GET", "/drop", function(req)
  req:drop()
  return 200, "never sent"
end)
paygate.route("GET", "/drop-later", function(req)
  req:drop()
  paygate.sleep(0.05)
  error("raised after drop: still no answer")
end)
paygate.route("GET", "/local", function(req)
  return 200, req.local_addr .. " " .. req.remote_addr
end)
paygate.route("GET", "/late", function(req)
  local r = req
  paygate.spawn(function()
    paygate.sleep(0.05)
    local ok, err = pcall(r.drop, r)
    paygate.log.info("late drop: " .. tostring(ok) .. " " .. tostring(err))
  end)
  return 200, "ok"
end)
]]

-- recv until the peer ends: returns the bytes and the errno of the end
-- (104 ECONNRESET for a reset, 0 for an orderly close)
local function read_to_end(conn)
  local parts, buf = {}, ffi.new("char[4096]")
  while true do
    local n = ffi.C.recv(conn.fd, buf, 4096, 0)
    if n < 0 then return table.concat(parts), ffi.errno() end
    if n == 0 then return table.concat(parts), 0 end
    parts[#parts + 1] = ffi.string(buf, n)
  end
end

describe("req:drop()", function()
  local s
  setup(function() s = server.start{ source = APP } end)
  teardown(function() if s then s:stop() end end)

  for _, path in ipairs({ "/drop", "/drop-later" }) do
    it("GET " .. path .. ": no answer, the connection is reset", function()
      local c = assert(rawtcp.connect(s.port, 5))
      -- a pipelined second request is not answered either
      assert(c:send("GET " .. path .. " HTTP/1.1\r\nHost: x\r\n\r\n"
                    .. "GET /local HTTP/1.1\r\nHost: x\r\n\r\n"))
      local got, errno = read_to_end(c)
      c:close()
      assert.equal("", got)
      assert.equal(104, errno)          -- ECONNRESET
    end)
  end

  it("the server goes on serving; req.local_addr is the listener's",
     function()
    local res = assert(s:request("/local"))
    assert.equal(200, res.status)
    local l, r = res.body:match("^(%S+) (%S+)$")
    assert.equal("127.0.0.1:" .. s.port, l)
    assert.truthy(r:match("^127%.0%.0%.1:%d+$"))
  end)

  it("raises once the request has ended", function()
    local res = assert(s:request("/late"))
    assert.equal(200, res.status)
    require("support.proc").wait_until(function()
      return s:logs():find("late drop: false", 1, true)
    end, 10, "the late drop's log line")
    assert.truthy(s:logs():find("request already finished", 1, true))
  end)
end)
