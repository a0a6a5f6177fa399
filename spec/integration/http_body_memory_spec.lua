-- Request bodies being received share one budget per worker
-- (limits.body_memory, 64 MiB by default): a body holds its whole length
-- in the worker's memory until its last byte, and a client may take as
-- long as it likes to send that byte (body_timeout is a gap, not a
-- total). Without the budget a few hundred connections each holding a
-- 5 MiB body one byte short took gigabytes of the worker, from anyone
-- who reaches the port. Past it a new big body is answered 503; small
-- requests (head and body in 16 KiB) never count against it.
local server = require "support.server"
local rawtcp = require "support.rawtcp"

local APP = [[
local paygate = require "paygate"
paygate.route("POST", "/notify", function(req)
  return 200, "got " .. #req.body
end)
]]

-- a POST of a body of size bytes, all but its last byte sent; or nil
-- when the connection could not be made
local function hold(port, size, body)
  local c = rawtcp.connect(port, 10)
  if not c then return nil end
  c:send("POST /notify HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
         .. "Content-Length: " .. size .. "\r\n\r\n" .. body:sub(1, size - 1))
  return c
end

-- what each held connection is answered once its last byte is sent:
-- a list of "200" / "503" / other text
local function finish(conns)
  local out = {}
  for i, c in ipairs(conns) do
    c:send("x")
    local got = c:recv_all()
    c:close()
    out[i] = got:match("^HTTP/1%.1 (%d+)") or ("none: " .. got:sub(1, 80))
  end
  return out
end

local function count(list, v)
  local n = 0
  for _, x in ipairs(list) do if x == v then n = n + 1 end end
  return n
end

describe("request bodies in memory (limits.body_memory)", function()
  local s

  teardown(function() if s then assert.equal(0, s:stop()) end end)

  it("refuses with 503 the big bodies past the default 64 MiB a worker"
     .. " holds, serving small requests meanwhile", function()
    s = server.start{ source = APP, workers = 1 }
    local SIZE = 5 * 1024 * 1024               -- the default body_bytes
    local body = ("b"):rep(SIZE)
    local N = 16                               -- 80 MiB of bodies at once
    local conns = {}
    for i = 1, N do conns[i] = assert(hold(s.port, SIZE, body)) end
    -- a small request while they hold the budget: served
    local small = assert(rawtcp.connect(s.port, 10))
    small:send("POST /notify HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               .. "Content-Length: 2000\r\n\r\n" .. ("s"):rep(2000))
    local got = small:recv_all()
    small:close()
    assert.matches("^HTTP/1.1 200", got)
    assert.matches("got 2000$", got)
    local out = finish(conns)
    -- each body's buffer is 5 MiB + 80 KiB (header_bytes + body_bytes +
    -- 64 KiB): at most 12 fit in 64 MiB; every other one was refused
    local ok, busy = count(out, "200"), count(out, "503")
    assert.equal(N, ok + busy, table.concat(out, " "))
    assert.is_true(ok >= 1 and ok <= 12, table.concat(out, " "))
    assert.is_true(busy >= N - 12, table.concat(out, " "))
    assert.equal(0, s:stop())
    s = nil
  end)

  it("says the limit and its key in the 503; one body is always let in",
     function()
    s = server.start{ source = APP, workers = 1, config = [[
      return { limits = { body_bytes = 1048576, body_memory = 65536 } }]] }
    local SIZE = 1048576
    local body = ("b"):rep(SIZE)
    -- the first body alone is over the budget: let in all the same
    local a = assert(hold(s.port, SIZE, body))
    local b = assert(hold(s.port, SIZE, body))
    local out_b = b:recv_all()                 -- refused while a holds
    b:close()
    assert.matches("^HTTP/1.1 503", out_b)
    assert.matches('"error":"unavailable"', out_b, 1, true)
    assert.matches("memory for request bodies being received exceeds the"
      .. " limit of 65536 bytes (limits.body_memory)", out_b, 1, true)
    assert.same({ "200" }, finish({ a }))
    -- a's buffer given back: the next body goes through
    local c = assert(hold(s.port, SIZE, body))
    assert.same({ "200" }, finish({ c }))
  end)
end)
