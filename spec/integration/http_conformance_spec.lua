-- RFC 9110 / 9112 conformance of the server edge, each case with the exact
-- bytes on a raw socket: Host validation, absolute-form targets, HEAD on
-- GET routes, early refusal of heads that cannot become a request, 414
-- vs 431, many small header fields, dot-segments.
local json = require "cjson"
local server = require "support.server"
local rawtcp = require "support.rawtcp"
local core = require "paygate.core"

local APP = [[
local paygate = require "paygate"
paygate.route("GET", "/info/*rest", function(req)
  return 200, { path = req.path, target = req.target, rest = req.params.rest,
                query = req.query_string }
end)
paygate.route("GET", "/text", function() return 200, "twelve bytes" end)
paygate.route("GET", "/items/:id", function(req)
  return 200, { id = req.params.id, path = req.path }
end)
paygate.route("GET", "/v1/things/:id", function(req)
  return 200, { id = req.params.id }
end)
-- a hook guarding a prefix of req.path, as apikey.before_hook does
paygate.before(function(req)
  if req.path:sub(1, 4) == "/v1/" and req:header("x-auth") ~= "yes" then
    return 401, { error = "auth" }
  end
end)
paygate.route("GET", "/own-head", function() return 200, "get body" end)
paygate.route("HEAD", "/own-head", function()
  return 200, nil, { ["X-Own"] = "yes" }
end)
-- waits, its request read, until the spec says go (files in the
-- directory its query names)
paygate.route("GET", "/hold", function(req)
  local core = require "paygate.core"
  local dir = req.query_string
  local f = assert(io.open(dir .. "/started", "w"))
  f:close()
  local t0 = core.mono()
  while core.mono() - t0 < 5 do
    local g = io.open(dir .. "/go")
    if g then g:close() break end
    core.sleep(0.01)
  end
  return 200, "held"
end)
paygate.route("GET", "/count", function(req)
  local n = 0
  for _ in pairs(req.headers) do n = n + 1 end
  return 200, tostring(n)
end)
]]

describe("HTTP conformance", function()
  local s

  setup(function()
    s = server.start{ source = APP, workers = 1,
      config = [[return { limits = { header_bytes = 8192,
        header_timeout = 5 } }]] }
  end)

  teardown(function()
    if s then assert.equal(0, s:stop()) end
  end)

  -- sends bytes, returns everything until the server closes (or 3 s) and
  -- the seconds it took
  local function raw(bytes, keep)
    local c = assert(rawtcp.connect(s.port, 3))
    local t0 = core.mono()
    c:send(bytes)
    local out = keep and c:recv_some() or c:recv_all()
    c:close()
    return out, core.mono() - t0
  end

  local function body_of(out)
    return out:match("\r\n\r\n(.*)$")
  end

  describe("Host (RFC 9112 3.2)", function()
    it("answers 400 to an invalid Host value", function()
      for _, host in ipairs{ "a b", "a/b", "a, b", "a@b", "a:8x" } do
        local out = raw("GET /text HTTP/1.1\r\nHost: " .. host .. "\r\n\r\n")
        assert.matches("^HTTP/1.1 400", out, host)
      end
    end)

    it("serves a valid one, with a port, an IPv6 literal, or empty", function()
      for _, host in ipairs{ "example.com:8080", "[::1]:80", "" } do
        local out = raw("GET /text HTTP/1.1\r\nHost: " .. host
                        .. "\r\nConnection: close\r\n\r\n")
        assert.matches("^HTTP/1.1 200", out, host)
      end
    end)
  end)

  describe("absolute-form target (RFC 9112 3.2.2)", function()
    it("is routed by its path; req.target is the bytes as sent", function()
      local out = raw("GET http://example.com:8080/info/a/b?x=1 HTTP/1.1\r\n"
                      .. "Host: example.com:8080\r\nConnection: close\r\n\r\n")
      assert.matches("^HTTP/1.1 200", out)
      local doc = json.decode(body_of(out))
      assert.equal("/info/a/b", doc.path)
      assert.equal("a/b", doc.rest)
      assert.equal("x=1", doc.query)
      assert.equal("http://example.com:8080/info/a/b?x=1", doc.target)
    end)

    it("refuses a fragment in a target with 400 (no form holds one)",
       function()
      for _, t in ipairs{ "/info/a#frag", "/info/a?x=1#f", "/#",
                          "http://h/info/a#f" } do
        assert.matches("^HTTP/1.1 400", raw("GET " .. t .. " HTTP/1.1\r\n"
                                             .. "Host: h\r\n\r\n"), t)
      end
    end)

    it("refuses another scheme or userinfo with 400", function()
      assert.matches("^HTTP/1.1 400", raw("GET ftp://h/info/a HTTP/1.1\r\n"
                                           .. "Host: h\r\n\r\n"))
      assert.matches("^HTTP/1.1 400", raw("GET http://u:p@h/info/a HTTP/1.1"
                                           .. "\r\nHost: h\r\n\r\n"))
    end)
  end)

  describe("HEAD (RFC 9110 9.3.2)", function()
    it("is served by a GET route: its headers, no body", function()
      local c = assert(rawtcp.connect(s.port, 3))
      c:send("HEAD /text HTTP/1.1\r\nHost: x\r\n\r\n")
      local head = c:recv_some()
      assert.matches("^HTTP/1.1 200", head)
      assert.matches("\r\nContent%-Length: 12\r\n", head)
      assert.matches("\r\n\r\n$", head)       -- nothing after the head
      -- the connection stays in step: the next answer is GET's, whole
      c:send("GET /text HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      local out = c:recv_all()
      c:close()
      assert.matches("^HTTP/1.1 200.*\r\n\r\ntwelve bytes$", out)
    end)

    it("goes to the app's own HEAD route when it has one", function()
      local out = raw("HEAD /own-head HTTP/1.1\r\nHost: x\r\n"
                      .. "Connection: close\r\n\r\n")
      assert.matches("^HTTP/1.1 200", out)
      assert.matches("\r\nX%-Own: yes\r\n", out)
    end)

    it("lists HEAD beside GET in a 405's Allow", function()
      local out = raw("DELETE /text HTTP/1.1\r\nHost: x\r\n"
                      .. "Connection: close\r\n\r\n")
      assert.matches("^HTTP/1.1 405", out)
      assert.matches("\r\nAllow: GET, HEAD\r\n", out)
      -- an app's own HEAD route is listed once (it read "GET, HEAD, HEAD")
      out = raw("DELETE /own-head HTTP/1.1\r\nHost: x\r\n"
                .. "Connection: close\r\n\r\n")
      assert.matches("^HTTP/1.1 405", out)
      assert.matches("\r\nAllow: GET, HEAD\r\n", out)
    end)
  end)

  describe("a head that cannot become a request", function()
    it("is refused at once: a bare-LF request line", function()
      local out, secs = raw("GET /text HTTP/1.1\nHost: x\n")
      assert.matches("^HTTP/1.1 400", out)
      -- (the header timeout is 5 s: well before it, even when loaded)
      assert.is_true(secs < 3, "answered after " .. secs .. " s")
    end)

    it("is refused at once: a TLS ClientHello on the plain port", function()
      local hello = "\22\3\1\0\200\1\0\0\124\3\3" .. ("\0"):rep(32)
      local out, secs = raw(hello)
      assert.matches("^HTTP/1.1 400", out)
      -- (the header timeout is 5 s: well before it, even when loaded)
      assert.is_true(secs < 3, "answered after " .. secs .. " s")
    end)

    it("is refused at once: a method longer than any", function()
      local out, secs = raw(("A"):rep(30))
      assert.matches("^HTTP/1.1 400", out)
      -- (the header timeout is 5 s: well before it, even when loaded)
      assert.is_true(secs < 3, "answered after " .. secs .. " s")
    end)

    -- a complete line that cannot be part of a valid head, before the
    -- blank line: refused then, with the full parse's status (no Host or
    -- blank line follows; the header timeout is 5 s)
    it("is refused at once: a complete request line or header line that"
       .. " is invalid", function()
      local cases = {
        { "GET  /text HTTP/1.1\r\n", 400 },        -- two spaces
        { "GET /text  HTTP/1.1\r\n", 400 },
        { "GET /text HTTP/1.1 \r\n", 400 },
        { "GET /text HTTP/x.1\r\n", 400 },
        { "GET /text\r\n", 400 },                   -- HTTP/0.9 form
        { "GET http:// HTTP/1.1\r\n", 400 },        -- no host
        { "GET /text HTTP/9.9\r\n", 505 },
        { "GET /text HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n", 400 },
        { "GET /text HTTP/1.1\r\nHost: x\r\n folded\r\n", 400 },
        { "GET /text HTTP/1.1\r\nHost: x\r\nA: b\1c\r\n", 400 },
        { "GET /text HTTP/1.1\r\n: empty\r\n", 400 },
      }
      for _, c in ipairs(cases) do
        local out, secs = raw(c[1])
        assert.matches("^HTTP/1.1 " .. c[2], out, c[1])
        -- (the header timeout is 5 s: well before it, even when loaded)
        assert.is_true(secs < 3, ("%q answered after %.2f s"):format(c[1],
                                                                 secs))
      end
    end)

    it("is refused at once: a bare CR or a NUL, before its line ends",
       function()
      for _, bytes in ipairs{ "GET /te\rxt HTTP/1.1", "GET /te\0",
                              "GET /text HTTP/1.1\r\nHost: x\rA" } do
        local out, secs = raw(bytes)
        assert.matches("^HTTP/1.1 400", out, bytes)
        assert.is_true(secs < 3, ("%q answered after %.2f s"):format(bytes,
                                                                  secs))
      end
    end)

    it("waits for a valid head that comes in pieces, line by line",
       function()
      local c = assert(rawtcp.connect(s.port, 3))
      for _, piece in ipairs{ "GET /te", "xt HTTP/1.1\r", "\nHost: x\r\nX-A",
                              ": 1\r\n", "Connection: close\r\n", "\r\n" } do
        c:send(piece)
        core.sleep(0.05)   -- each piece in a read of its own (or not:
                           -- the answer is the same)
      end
      local out = c:recv_all()
      c:close()
      assert.matches("^HTTP/1.1 200", out)
      assert.equal("twelve bytes", body_of(out))
    end)
  end)

  describe("chunked trailers (RFC 9112 7.1.2)", function()
    local function post(trailers)
      return raw("POST /text HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 .. "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
                 .. trailers .. "\r\n")
    end

    it("are field lines: one that is not (a request line, a fold, a NUL)"
       .. " is 400", function()
      for _, t in ipairs{ "GET /text HTTP/1.1\r\n", "T: v\r\n fold\r\n",
                          "T: a\0b\r\n", "T : v\r\n" } do
        local out = post(t)
        assert.matches("^HTTP/1.1 400.*malformed chunked body", out, t)
      end
    end)

    it("valid ones are read and dropped", function()
      -- past the body: the route's answer (405: /text is GET's)
      assert.matches("^HTTP/1.1 405", post("T: v\r\nU:\r\n"))
      assert.matches("^HTTP/1.1 405", post(""))
    end)
  end)

  describe("limits", function()
    it("answers 414 to a request line over header_bytes", function()
      local out = raw("GET /info/" .. ("a"):rep(9000) .. " HTTP/1.1\r\n"
                      .. "Host: x\r\n\r\n")
      assert.matches("^HTTP/1.1 414", out)
      -- the limit and its key: what a client may send instead
      assert.matches('"request line exceeds the limit of 8192 bytes'
                     .. ' (limits.header_bytes)"', out, 1, true)
    end)

    it("answers 431 to a head over header_bytes in its fields", function()
      local out = raw("GET /text HTTP/1.1\r\nHost: x\r\nX-Big: "
                      .. ("a"):rep(9000) .. "\r\n\r\n")
      assert.matches("^HTTP/1.1 431", out)
    end)

    it("serves 200 small header fields", function()
      local t = { "GET /count HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" }
      for i = 1, 200 do t[#t + 1] = ("X-H%d: v\r\n"):format(i) end
      t[#t + 1] = "\r\n"
      local out = raw(table.concat(t))
      assert.matches("^HTTP/1.1 200", out)
      assert.equal("202", body_of(out))
    end)
  end)

  describe("dot-segments (RFC 3986 5.2.4)", function()
    it("are resolved for routing and req.path; req.target is as sent",
       function()
      local out = raw("GET /x/../info/a/./b/c/..?q=1 HTTP/1.1\r\nHost: x\r\n"
                      .. "Connection: close\r\n\r\n")
      assert.matches("^HTTP/1.1 200", out)
      local doc = json.decode(body_of(out))
      assert.equal("/info/a/b/", doc.path)
      assert.equal("/x/../info/a/./b/c/..?q=1", doc.target)
      assert.equal("q=1", doc.query)
    end)

    it("are resolved when percent-encoded", function()
      local out = raw("GET /info/a/%2e%2E/b HTTP/1.1\r\nHost: x\r\n"
                      .. "Connection: close\r\n\r\n")
      assert.matches("^HTTP/1.1 200", out)
      assert.equal("/info/b", json.decode(body_of(out)).path)
    end)

    -- an encoded slash is data to the path (not a separator), but a
    -- route parameter is percent-decoded: one that would then hold a
    -- dot-segment (or a NUL, where C file APIs stop) is refused
    it("answer 400 to a parameter that decodes to a dot-segment or a NUL",
       function()
      for _, t in ipairs{ "/info//etc/passwd", "/info/%2Fetc%2Fpasswd",
                          "/info/%5cwindows", "/info/..%2f..%2fetc",
                          "/info/%2e%2e%2fx",
                          "/info/a/..%2F", "/info/..%5c..%5cx",
                          "/info/x%00.png", "/info/.%2fa",
                          "/info/..\\..\\x" } do
        local out = raw("GET " .. t .. " HTTP/1.1\r\nHost: x\r\n"
                        .. "Connection: close\r\n\r\n")
        assert.matches("^HTTP/1.1 400", out, t)
        assert.truthy(out:find('"bad_path"', 1, true), t .. ": " .. out)
        out = raw("HEAD " .. t .. " HTTP/1.1\r\nHost: x\r\n"
                  .. "Connection: close\r\n\r\n")
        assert.matches("^HTTP/1.1 400", out, "HEAD " .. t)
      end
      -- decoded slashes, dots inside names: served as they decode
      for t, rest in pairs{ ["/info/a%2fb"] = "a/b",
                            ["/info/..a%2fb..%2f.c"] = "..a/b../.c" } do
        local out = raw("GET " .. t .. " HTTP/1.1\r\nHost: x\r\n"
                        .. "Connection: close\r\n\r\n")
        assert.matches("^HTTP/1.1 200", out, t)
        assert.equal(rest, json.decode(body_of(out)).rest, t)
      end
    end)

    it("answer 400 to a path that climbs out of the root", function()
      for _, t in ipairs{ "/../etc/passwd", "/info/../../x",
                          "/info/%2e%2e/%2E./x", "/.." } do
        local out = raw("GET " .. t .. " HTTP/1.1\r\nHost: x\r\n\r\n")
        assert.matches("^HTTP/1.1 400", out, t)
        assert.matches('"message":"path climbs above the root"', out, 1, true)
      end
    end)
  end)

  describe("empty path segments", function()
    local function get(t, extra)
      local out = raw("GET " .. t .. " HTTP/1.1\r\nHost: x\r\n" .. (extra or "")
                      .. "Connection: close\r\n\r\n")
      return tonumber(out:match("^HTTP/1.1 (%d+)")), body_of(out)
    end

    it("are not merged: a parameter route matches the exact path", function()
      local status, body = get("/items/a")
      assert.equal(200, status)
      assert.equal("a", json.decode(body).id)
      for _, t in ipairs{ "//items/a", "/items//a", "/items/a/", "/items/",
                          "///items/a" } do
        assert.equal(404, (get(t)), t)
      end
    end)

    it("cannot reach a route past a hook guarding its prefix", function()
      assert.equal(401, (get("/v1/things/a")))
      assert.equal(200, (get("/v1/things/a", "X-Auth: yes\r\n")))
      for _, t in ipairs{ "//v1/things/a", "http://x//v1/things/a",
                          "/./v1/things/a", "/%2e/v1/things/a" } do
        local status = get(t)
        assert.is_true(status == 401 or status == 404, t .. ": " .. status)
      end
    end)
  end)

  describe("closing after an answer (RFC 9112 9.6)", function()
    -- The server closes with the client's bytes still coming: they are
    -- read and dropped until the client's FIN (a close() with unread
    -- input sends a reset, and the client loses the answer or its send
    -- fails).
    it("a refused upload: the client sends its whole body, then reads"
       .. " the 413", function()
      local c = assert(rawtcp.connect(s.port, 5))
      assert(c:send("POST /text HTTP/1.1\r\nHost: x\r\n"
                    .. "Content-Length: 50000000\r\n\r\n"))
      -- 4 MiB of it, written after the server has answered and closed
      -- its side; every byte must be taken (no reset)
      local chunk = ("x"):rep(65536)
      for i = 1, 64 do
        local ok, err = c:send(chunk)
        assert(ok, "send " .. i .. " of the body: " .. tostring(err))
      end
      local out, how = c:recv_all()
      c:close()
      assert.matches("^HTTP/1.1 413", out)
      assert.matches("\r\nConnection: close\r\n", out)
      assert.equal("eof", how)
    end)

    it("requests pipelined behind a Connection: close one: the answer,"
       .. " then the end, not a reset", function()
      for _ = 1, 20 do
        local c = assert(rawtcp.connect(s.port, 5))
        assert(c:send("GET /text HTTP/1.1\r\nHost: x\r\nConnection: close"
                      .. "\r\n\r\n" .. ("GET /text HTTP/1.1\r\nHost: x"
                      .. "\r\n\r\n"):rep(200)))
        local ok, err = c:send(("GET /text HTTP/1.1\r\nHost: x\r\n\r\n")
                               :rep(200))
        assert(ok, tostring(err))
        local out, how = c:recv_all()
        c:close()
        assert.matches("^HTTP/1.1 200", out)
        assert.equal("twelve bytes", body_of(out))
        assert.equal("eof", how)      -- the end, not a reset
      end
    end)

    it("a request pipelined while the handler of a Connection: close one"
       .. " runs: the answer, then the end, not a reset", function()
      -- The pipelined bytes arrive while the handler runs: they stay in
      -- the socket (reading pauses during a request), not in the input
      -- buffer; the close must drain them too.
      local proc = require "support.proc"
      local dir = server.tmpdir()
      local c = assert(rawtcp.connect(s.port, 5))
      assert(c:send("GET /hold?" .. dir .. " HTTP/1.1\r\nHost: x\r\n"
                    .. "Connection: close\r\n\r\n"))
      proc.wait_until(function()
        local f = io.open(dir .. "/started")
        if f then f:close() end
        return f ~= nil
      end, 5, "the handler")
      assert(c:send(("GET /text HTTP/1.1\r\nHost: x\r\n\r\n"):rep(3)))
      -- the request has reached the server's socket before the answer
      proc.wait_until(function()
        local p = io.popen("ss -tnH state established '( sport = :"
                           .. s.port .. " )'")
        local lines = p:read("*a")
        p:close()
        return lines:match("^%s*[1-9]") ~= nil    -- Recv-Q > 0
      end, 5, "the pipelined request in the server's receive queue")
      proc.write(dir .. "/go", "")
      local out, how = c:recv_all()
      c:close()
      server.rmdir(dir)
      assert.matches("^HTTP/1.1 200", out)
      assert.equal("held", body_of(out))
      assert.equal("eof", how)        -- the end, not a reset
    end)
  end)

  it("keeps serving after all of that", function()
    assert.equal(200, assert(s:request("/text")).status)
  end)
end)

-- An app with catch-all routes, as CORS preflight handlers and file
-- servers have: the asterisk-form target "*" (RFC 9112 3.2.4: OPTIONS
-- only, about the server as a whole) is no path, and must reach none.
describe("asterisk-form target (RFC 9112 3.2.4)", function()
  local s

  setup(function()
    s = server.start{ workers = 1, source = [[
local paygate = require "paygate"
paygate.route("GET", "/*rest", function(req)
  return 200, { path = req.path, rest = req.params.rest }
end)
paygate.route("OPTIONS", "/:any", function(req)
  return 200, { path = req.path, any = req.params.any }
end)
]] }
  end)

  teardown(function()
    if s then assert.equal(0, s:stop()) end
  end)

  local function raw(bytes)
    local c = assert(rawtcp.connect(s.port, 3))
    c:send(bytes)
    local out = c:recv_all()
    c:close()
    return out
  end

  it("is refused with 400 for any method but OPTIONS", function()
    for _, m in ipairs{ "GET", "POST", "DELETE" } do
      local out = raw(m .. " * HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                      .. "Connection: close\r\n\r\n")
      assert.matches("^HTTP/1.1 400", out, m)
    end
  end)

  it("OPTIONS * reaches no route, not even a catch-all", function()
    local out = raw("OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert.matches("^HTTP/1.1 404", out)
    -- the catch-alls still serve the paths they are for
    out = raw("OPTIONS /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert.matches("^HTTP/1.1 200", out)
    out = raw("GET /a/b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert.matches("^HTTP/1.1 200.*\"rest\":\"a/b\"", out)
  end)
end)

-- A request refused at the edge, before any handler (a malformed or
-- smuggling head, one too large, a body over the limit, a head or body not
-- received in time), has an access line like any other: without it an
-- operator facing a client that says "400" or "413" found nothing in the
-- log. The line and the answer name the reason (a smuggling shape was
-- "malformed or unsupported request" like any other 400), and the line
-- and paygate_requests_total the method when the head was read that far
-- (they said "OTHER" of every refusal). No path: a head refused in its
-- request line may have half of one.
describe("a request refused at the edge", function()
  local proc = require "support.proc"
  local s

  setup(function()
    s = server.start{ workers = 1, source = [[
local paygate = require "paygate"
paygate.route("POST", "/in", function() return 204 end)
]], config = [[return { limits = { header_bytes = 1024, body_bytes = 100,
                                     header_timeout = 1,
                                     body_timeout = 1 } }]] }
  end)

  teardown(function()
    if s then assert.equal(0, s:stop()) end
  end)

  -- the access lines of refusals with this status, kind and message
  local function refusals(status, kind, message)
    local out = {}
    for line in s:logs():gmatch("[^\n]+") do
      local ok, l = pcall(json.decode, line)
      if ok and type(l) == "table" and l.msg == "access"
         and l.status == status and l.error == kind
         and l.message == message then
        out[#out + 1] = l
      end
    end
    return out
  end

  -- paygate_requests_total of these labels, or nil
  local function count(labels)
    local body = assert(s:admin_get("/metrics")).body
    return tonumber(body:match("\npaygate_requests_total{"
                               .. labels:gsub("%p", "%%%0") .. "} (%d+)"))
  end

  it("has one access line: status, error kind, message, the method when"
     .. " known and the client's address; the answer has the same message",
     function()
    local seen = {}
    for _, case in ipairs{
      { 400, "bad_request", "both Content-Length and Transfer-Encoding",
        "POST", "POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n"
        .. "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" },
      { 400, "bad_request", "Transfer-Encoding on HTTP/1.0", "POST",
        "POST /in HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
        .. "0\r\n\r\n" },
      { 400, "bad_request", "missing Host header", "PUT",
        "PUT /in HTTP/1.1\r\nContent-Length: 0\r\n\r\n" },
      { 400, "bad_request", "conflicting Content-Length values", "PATCH",
        "PATCH /in HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
        .. "Content-Length: 2\r\n\r\nab" },
      { 400, "bad_request", "invalid Host header", "OPTIONS",
        "OPTIONS /in HTTP/1.1\r\nHost: a b\r\n\r\n" },
      { 400, "bad_request", "more than one Host header", "GET",
        "GET /in HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n" },
      { 400, "bad_request", "chunked not the final transfer coding", "POST",
        "POST /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n" },
      { 400, "bad_request", "chunked applied more than once", "PUT",
        "PUT /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        .. "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" },
      { 501, "unsupported", "unsupported transfer coding", "POST",
        "POST /in HTTP/1.1\r\nHost: x\r\n"
        .. "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n" },
      { 417, "unsupported", "unsupported expectation", "PATCH",
        "PATCH /in HTTP/1.1\r\nHost: x\r\nExpect: magic\r\n"
        .. "Content-Length: 0\r\n\r\n" },
      { 505, "unsupported", "HTTP version not supported", "GET",
        "GET /in HTTP/2.0\r\nHost: x\r\n\r\n" },
      -- refused before the head's end (a complete line the full parse
      -- refuses), its method read whole
      { 400, "bad_request", "malformed request head", "DELETE",
        "DELETE /in HTTP/1.1\r\nBad Name: v\r\n" },
      -- refused before a parse, its method read from the request line
      -- (before: none, counted OTHER)
      { 431, "header_too_large", "request head exceeds the limit of 1024 bytes (limits.header_bytes)", "GET",
        "GET /in HTTP/1.1\r\nHost: x\r\nX-Big: " .. ("a"):rep(2000)
        .. "\r\n\r\n" },
      { 431, "header_too_large", "request head exceeds the limit of 1024 bytes (limits.header_bytes)", "PUT",
        "\r\nPUT /in HTTP/1.1\r\nHost: x\r\nX-Big: " .. ("a"):rep(2000) },
      { 413, "body_too_large", "request body exceeds the limit of 100 bytes (limits.body_bytes)", "POST",
        "POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n" },
      { 408, "timeout", "request head not received in time", "POST",
        "POST /in HTTP/1.1\r\nHost: x\r\n" },
      { 408, "timeout", "request head not received in time", nil,
        "POS" },
      { 408, "timeout", "request body not received in time", "DELETE",
        "DELETE /in HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n" },
    } do
      local status, kind, message, method, bytes = unpack(case, 1, 5)
      local c = assert(rawtcp.connect(s.port, 3))
      c:send(bytes)
      local out = c:recv_all()
      c:close()
      assert.matches("^HTTP/1.1 " .. status, out, message)
      local answer = json.decode(out:match("\r\n\r\n(.*)$"))
      assert.same({ error = kind, message = message }, answer)
      -- (cases with the same answer: each one's line after the ones before)
      local key = status .. " " .. message
      seen[key] = (seen[key] or 0) + 1
      local lines
      proc.wait_until(function()
        lines = refusals(status, kind, message)
        return #lines == seen[key]
      end, 5, "the access line of " .. message)
      local l = lines[#lines]
      assert.matches("^127%.0%.0%.1:%d+$", l.remote)
      assert.equal("info", l.level)
      assert.equal(method, l.method, message)
      assert.is_nil(l.path)
    end
    -- counted under the method the head named (a standard one: a made-up
    -- method is OTHER, as on any unmatched request), else OTHER
    for _, row in ipairs{
      { 'method="POST",route="(unmatched)",status="400"', 3 },
      { 'method="PUT",route="(unmatched)",status="400"', 2 },
      { 'method="PATCH",route="(unmatched)",status="400"', 1 },
      { 'method="OPTIONS",route="(unmatched)",status="400"', 1 },
      { 'method="GET",route="(unmatched)",status="400"', 1 },
      { 'method="DELETE",route="(unmatched)",status="400"', 1 },
      { 'method="POST",route="(unmatched)",status="501"', 1 },
      { 'method="PATCH",route="(unmatched)",status="417"', 1 },
      { 'method="GET",route="(unmatched)",status="505"', 1 },
      { 'method="POST",route="(unmatched)",status="413"', 1 },
      { 'method="DELETE",route="(unmatched)",status="408"', 1 },
      { 'method="POST",route="(unmatched)",status="408"', 1 },
      { 'method="OTHER",route="(unmatched)",status="408"', 1 },
      { 'method="GET",route="(unmatched)",status="431"', 1 },
      { 'method="PUT",route="(unmatched)",status="431"', 1 },
    } do
      assert.equal(row[2], count(row[1]), row[1])
    end
  end)

  -- A head is refused early, on its first complete bad line, when its end
  -- has not arrived; whole, by the full parse. Before, the early answer
  -- had no method (counted OTHER) and said "malformed or unsupported
  -- request" where the whole head's named the method (and for a 400 said
  -- another message): one request, told two ways by how it was split.
  it("tells a request the same, refused whole or before its end",
     function()
    for _, case in ipairs{
      { 505, "unsupported", "HTTP version not supported", "PUT",
        "PUT /in HTTP/3.0\r\n", "Host: x\r\n\r\n" },
      { 400, "bad_request", "malformed request head", "HEAD",
        "HEAD /in HTTP/1.1\r\nHost: x\r\n\tfolded\r\n", "\r\n" },
      { 400, "bad_request", "malformed request head", "TRACE",
        "TRACE /in\x01 HTTP/1.1\r\n", "Host: x\r\n\r\n" },
    } do
      local status, kind, message, method, first, rest = unpack(case, 1, 6)
      local function mine()
        local n = 0
        for _, l in ipairs(refusals(status, kind, message)) do
          if l.method == method then n = n + 1 end
        end
        return n
      end
      local before = mine()
      local outs = {}
      for i, bytes in ipairs{ first .. rest, first } do
        local c = assert(rawtcp.connect(s.port, 3))
        c:send(bytes)             -- the second: the rest is never sent
        outs[i] = c:recv_all()
        c:close()
        assert.matches("^HTTP/1.1 " .. status, outs[i], message)
        local body = outs[i]:match("\r\n\r\n(.*)$")
        if method ~= "HEAD" then
          assert.same({ error = kind, message = message }, json.decode(body))
        end
      end
      proc.wait_until(function() return mine() == before + 2 end, 5,
                      "two access lines of " .. method .. " " .. message)
    end
    assert.equal(2, count('method="PUT",route="(unmatched)",status="505"'))
    assert.equal(2, count('method="HEAD",route="(unmatched)",status="400"'))
    assert.equal(2, count('method="TRACE",route="(unmatched)",status="400"'))
  end)

  it("counts a made-up method as OTHER", function()
    local c = assert(rawtcp.connect(s.port, 3))
    c:send("BREW /in HTTP/1.1\r\n\r\n")
    local out = c:recv_all()
    c:close()
    assert.matches("^HTTP/1.1 400.*missing Host header", out)
    proc.wait_until(function()
      for _, l in ipairs(refusals(400, "bad_request", "missing Host header")) do
        if l.method == "BREW" then return true end
      end
    end, 5, "the access line of BREW")
    assert.equal(1, count('method="OTHER",route="(unmatched)",status="400"'))
  end)
end)
