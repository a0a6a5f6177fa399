-- A client that sends its last request and half-closes (shutdown(SHUT_WR),
-- or a TLS close_notify) in the same breath still gets its answer, however
-- the bytes fall into the server's reads.
local server = require "support.server"
local rawtcp = require "support.rawtcp"

local APP = [[
local paygate = require "paygate"
paygate.route("POST", "/echo", function(req) return 200, "len " .. #req.body end)
local mid = ("m"):rep(400000)  -- past the socket buffers and 64 KiB
paygate.route("GET", "/mid", function() return 200, mid end)
]]

describe("a half-close right behind a request", function()
  local s
  setup(function() s = server.start{ source = APP, workers = 1 } end)
  teardown(function() if s then assert.equal(0, s:stop()) end end)

  -- heads and bodies that end exactly at the first input buffer's size
  -- (4096), its double, and around them
  for _, total in ipairs({ 4095, 4096, 4097, 8192, 100 }) do
    it("answers a " .. total .. "-byte request, then closes", function()
      local head = "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: "
      -- the Content-Length's own digits count toward the total
      local body_len, len
      for d = 1, 5 do
        body_len = total - #head - 4 - d
        len = tostring(body_len)
        if #len == d then break end
      end
      assert(#head + #len + 4 + body_len == total)
      local c = assert(rawtcp.connect(s.port, 5))
      assert(c:send(head .. len .. "\r\n\r\n" .. ("b"):rep(body_len)))
      require("ffi").C.shutdown(c.fd, 1)            -- SHUT_WR
      local out, how = c:recv_all()
      c:close()
      assert.matches("^HTTP/1.1 200", out)
      assert.matches("len " .. body_len .. "$", out)
      assert.equal("eof", how)
    end)
  end
end)

describe("a half-close while the answer is still going out", function()
  local s
  setup(function() s = server.start{ source = APP, workers = 1 } end)
  teardown(function() if s then assert.equal(0, s:stop()) end end)

  it("sends the whole answer, then closes", function()
    -- a client reading slowly (a small window): the answer waits in the
    -- server's buffer when the client's FIN is read. (On loopback the
    -- kernel's buffers take an answer under 64 KiB whole, and past it the
    -- server reads nothing until it is out: this guards the large case;
    -- the small one, a real network's, has no loopback reproduction.)
    local c = assert(rawtcp.connect(s.port, 5, 2048))
    assert(c:send("GET /mid HTTP/1.1\r\nHost: x\r\n\r\n"))
    require("ffi").C.shutdown(c.fd, 1)            -- SHUT_WR
    require("paygate").sleep(0.5)
    local out, how = c:recv_all()
    c:close()
    assert.matches("^HTTP/1.1 200", out)
    local body = out:match("\r\n\r\n(.*)$") or ""
    assert.equal(400000, #body)
    assert.equal("eof", how)
  end)
end)

describe("a half-close right behind a request, over TLS", function()
  local s, dir, certs
  setup(function()
    local pki = require "support.pki"
    dir = server.tmpdir()
    certs = pki.make(dir)
    s = server.start{ source = APP, workers = 1, scheme = "https",
      ca_file = certs.ca,
      args = { "--tls-cert", certs.server_cert, "--tls-key", certs.server_key } }
  end)
  teardown(function()
    if s then assert.equal(0, s:stop()) end
    os.execute("rm -rf " .. dir)
  end)

  for _, how in ipairs({ "close_notify", "fin" }) do
    for _, total in ipairs({ 100, 4096, 8192 }) do
      it("answers a " .. total .. "-byte request followed by a " .. how,
         function()
        local p = assert(io.popen(("python3 spec/support/tls_halfclose.py"
          .. " %d %s %d %s 2>&1"):format(s.port, certs.ca, total, how)))
        local out = p:read("*a")
        p:close()
        assert.matches("^HTTP/1.1 200 OK | len %d+%s*$", out)
      end)
    end
  end
end)
