-- End to end: `paygate run` on a free loopback port, real HTTP.
local paygate = require "paygate"
local json = require "cjson"
local server = require "support.server"
local rawtcp = require "support.rawtcp"
local proc = require "support.proc"

local APP = [[
local paygate = require "paygate"
paygate.before(function(req)
  if req:header("x-deny") then return 403, { error = "denied" } end
end)
paygate.after(function(req, res)
  -- (the first after hook: res.headers is a table even when the handler
  -- gave none)
  if req:header("x-after") then res.headers["X-After"] = "seen" end
end)
paygate.after(function(req, res)
  res.headers = res.headers or {}
  res.headers["X-Request-Id"] = req.id
end)
paygate.route("GET", "/", function() return 200, "hello" end)
paygate.route("GET", "/orders/:id", function(req)
  return 200, { id = req.params.id, q = req:query().q }
end)
paygate.route("GET", "/files/*rest", function(req)
  return 200, req.params.rest
end)
paygate.route("POST", "/echo", function(req)
  return 200, req.body, { ["Content-Type"] = "application/octet-stream" }
end)
paygate.route("POST", "/json", function(req)
  return 201, { got = req:json() }
end)
paygate.route("GET", "/empty-list", function(req)
  -- (json.empty_array and json.null, not tables, were "invalid handler
  -- response": a 500)
  return 200, require("paygate.json")[req:query().v or "empty_array"]
end)
paygate.route("GET", "/big", function()
  return 200, { n = 123456789012345, m = 2 ^ 53, url = "https://x/y" }
end)
paygate.route("POST", "/decode", function(req)
  local v, err = req:decode_json()
  if not v then return 422, { kind = err.kind } end
  return 200, { got = v }
end)
paygate.route("GET", "/headers", function(req)
  return 200, { ua = req.headers["x-test"], via_method = req:header("X-TEST") }
end)
paygate.route("GET", "/headers2", function(req)
  local a, na, b, nb, c, nc = req:header("X-Test", "x-absent", "X-OTHER")
  return 200, { a = a, na = na, b = b or "nil", nb = nb or "nil", c = c,
                nc = nc, n = select("#", req:header("X-Test", "x-absent",
                                                    "X-OTHER")) }
end)
paygate.route("GET", "/headers_misuse", function(req)
  local out = {}
  for i, call in ipairs{
    function() return req:header(5) end,
    function() return req:header("X-Test", 5) end,
    function() return req:header_count(5) end,
    function() return req:header({}) end,
  } do
    local ok, err = pcall(call)
    out[i] = ok and "returned" or tostring(err)
  end
  return 200, out
end)
paygate.route("GET", "/boom", function() error("handler exploded") end)
paygate.route("GET", "/badstatus", function() return "nope" end)
paygate.route("GET", "/hugestatus", function() return 4294967496, "x" end)
paygate.route("GET", "/infostatus", function() return 101, "x" end)
paygate.route("GET", "/badheader", function()
  return 200, "x", { ["X-Evil"] = "a\r\nSet-Cookie: pwned=1" }
end)
paygate.route("GET", "/framing", function()
  return 200, "abc", { ["Transfer-Encoding"] = "chunked",
                       ["Content-Length"] = "10" }
end)
paygate.route("GET", "/dated", function()
  return 200, "abc", { ["date"] = "Mon, 07 Dec 2026 06:38:48 GMT" }
end)
paygate.route("GET", "/sleep", function(req)
  paygate.sleep(tonumber(req:query().s) or 0.2)
  return 200, "slept"
end)
paygate.route("GET", "/deadline", function(req)
  req:set_deadline(0.1)
  paygate.sleep(20)                    -- cancelled at the deadline
  return 200, "too late"
end)
paygate.route("GET", "/empty", function() return 204 end)
paygate.route("GET", "/config", function()
  local keys = {}
  for k in pairs(paygate.config_copy().limits) do keys[#keys + 1] = k end
  table.sort(keys)
  return 200, { keys = keys, body_bytes = paygate.config.limits.body_bytes }
end)
]]

describe("paygate run", function()
  local s

  setup(function()
    s = server.start{ source = APP, workers = 2,
      config = [[return { limits = { header_bytes = 2048,
        body_bytes = 1024, header_timeout = 0.5, body_timeout = 0.5 },
        shutdown_timeout = 5 }]] }
  end)

  teardown(function()
    if s then assert.equal(0, s:stop()) end
  end)

  describe("routing", function()
    it("serves a static route", function()
      local res = assert(s:request("/"))
      assert.equal(200, res.status)
      assert.equal("hello", res.body)
      assert.matches("text/plain", res.headers["content-type"])
    end)

    it("binds path parameters and the query", function()
      local res = assert(s:request("/orders/o%2D42?q=a%20b"))
      assert.equal(200, res.status)
      assert.same({ id = "o-42", q = "a b" }, json.decode(res.body))
    end)

    it("binds a trailing wildcard", function()
      local res = assert(s:request("/files/a/b/c.txt"))
      assert.equal("a/b/c.txt", res.body)
    end)

    it("answers 404 as JSON for an unknown path", function()
      local res = assert(s:request("/missing"))
      assert.equal(404, res.status)
      assert.equal("not_found", json.decode(res.body).error)
    end)

    it("answers 405 with Allow for a known path and wrong method", function()
      local res = assert(s:request{ method = "DELETE", path = "/" })
      assert.equal(405, res.status)
      assert.equal("GET, HEAD", res.headers["allow"])
    end)

    it("runs before and after hooks", function()
      local res = assert(s:request{ path = "/", headers = { ["X-Deny"] = "1" } })
      assert.equal(403, res.status)
      local ok = assert(s:request("/"))
      assert.matches("^[%x]+$", ok.headers["x-request-id"])
    end)

    it("gives an after hook a res.headers table when the answer has none",
       function()
      -- the handler's, the router's 404 and a before hook's, none with
      -- headers: indexing res.headers raised, and each became a 500
      for _, r in ipairs({ { "/", 200 }, { "/missing", 404 },
                           { "/empty", 204 } }) do
        local res = assert(s:request{ path = r[1],
                                      headers = { ["X-After"] = "1" } })
        assert.equal(r[2], res.status)
        assert.equal("seen", res.headers["x-after"])
      end
      local res = assert(s:request{ path = "/", headers = { ["X-After"] = "1",
                                                            ["X-Deny"] = "1" } })
      assert.equal(403, res.status)
      assert.equal("seen", res.headers["x-after"])
    end)
  end)

  describe("requests", function()
    it("gives the raw body bytes exactly", function()
      local body = "\0\1\2 binary \255 and \r\n bytes"
      local res = assert(s:request{ method = "POST", path = "/echo", body = body })
      assert.equal(body, res.body)
    end)

    it("decodes JSON and encodes a table body", function()
      local res = assert(s:request{ method = "POST", path = "/json",
                                    body = '{"a":[1,2]}' })
      assert.equal(201, res.status)
      assert.equal("application/json", res.headers["content-type"])
      assert.same({ got = { a = { 1, 2 } } }, json.decode(res.body))
    end)

    it("sends json.empty_array and json.null bodies as JSON", function()
      local res = assert(s:request("/empty-list"))
      assert.equal(200, res.status, res.body)
      assert.equal("application/json", res.headers["content-type"])
      assert.equal("[]", res.body)
      res = assert(s:request("/empty-list?v=null"))
      assert.equal(200, res.status, res.body)
      assert.equal("application/json", res.headers["content-type"])
      assert.equal("null", res.body)
    end)

    it("answers invalid JSON with a clear 400, not a traceback", function()
      local res = assert(s:request{ method = "POST", path = "/json", body = "{nope" })
      assert.equal(400, res.status)
      local e = json.decode(res.body)
      assert.equal("invalid_json", e.error)
      assert.is_nil(res.body:find("traceback"))
    end)

    it("refuses non-JSON and overflowing numbers in a body", function()
      for _, body in ipairs{ '{"amount":Infinity}', '{"amount":0x10}',
                             '{"amount":NaN}', '{"amount":1e999}' } do
        local res = assert(s:request{ method = "POST", path = "/json",
                                      body = body })
        assert.equal(400, res.status, body)
        assert.equal("invalid_json", json.decode(res.body).error, body)
        res = assert(s:request{ method = "POST", path = "/decode",
                                body = body })
        assert.equal(422, res.status, body)
        assert.equal("invalid_json", json.decode(res.body).kind, body)
      end
      local res = assert(s:request{ method = "POST", path = "/decode",
                                    body = '{"amount":1e3}' })
      assert.equal('{"got":{"amount":1000}}', res.body)
    end)

    it("writes integers in a JSON body exactly, / unescaped", function()
      local res = assert(s:request("/big"))
      assert.equal(200, res.status)
      assert.matches('"n":123456789012345[,}]', res.body)
      assert.matches('"m":9007199254740992[,}]', res.body)
      assert.matches('"url":"https://x/y"', res.body, 1, true)
    end)

    it("looks headers up case-insensitively", function()
      local res = assert(s:request{ path = "/headers", headers = { ["X-Test"] = "v" } })
      assert.same({ ua = "v", via_method = "v" }, json.decode(res.body))
    end)

    it("joins a repeated header with ', ' in order, whatever its case",
       function()
      local c = assert(rawtcp.connect(s.port, 3))
      c:send("GET /headers HTTP/1.1\r\nHost: x\r\nX-Test: a\r\nX-Other: o"
             .. "\r\nx-test: b\r\nX-TEST: c,d\r\nConnection: close\r\n\r\n")
      local out = c:recv_all()
      c:close()
      assert.matches("^HTTP/1.1 200", out)
      -- (req:header gives the first, as documented)
      assert.same({ ua = "a, b, c,d", via_method = "a" },
                  json.decode(out:match("\r\n\r\n(.*)$")))
    end)

    it("looks several headers up in one req:header call: a value and a"
       .. " count each, nil, nil for an absent one", function()
      local c = assert(rawtcp.connect(s.port, 3))
      c:send("GET /headers2 HTTP/1.1\r\nHost: x\r\nX-Test: a\r\nX-Other: o"
             .. "\r\nx-test: b\r\nConnection: close\r\n\r\n")
      local out = c:recv_all()
      c:close()
      assert.matches("^HTTP/1.1 200", out)
      assert.same({ a = "a", na = 2, b = "nil", nb = "nil", c = "o", nc = 1,
                    n = 6 }, json.decode(out:match("\r\n\r\n(.*)$")))
    end)

    it("raises on a header name that is not a string (a number too, not"
       .. " read as its digits)", function()
      local res = assert(s:request{ path = "/headers_misuse",
                                    headers = { ["X-Test"] = "v",
                                                ["5"] = "five" } })
      assert.equal(200, res.status)
      local out = json.decode(res.body)
      assert.equal(4, #out)
      -- (named however called: these are tail calls through pcall)
      for i, want in ipairs{ "req:header: name must be a string (got number)",
                             "req:header: name 2 must be a string (got"
                               .. " number)",
                             "req:header_count: name must be a string (got"
                               .. " number)",
                             "req:header: name must be a string (got table)",
                           } do
        assert.truthy(out[i]:find(want, 1, true), out[i])
      end
    end)

    it("gives the app its config file, read-only, with a copy to iterate", function()
      local res = assert(s:request("/config"))
      assert.same({ keys = { "body_bytes", "body_timeout", "header_bytes",
                             "header_timeout" }, body_bytes = 1024 },
                  json.decode(res.body))
    end)

    it("sends no body for 204", function()
      local res = assert(s:request("/empty"))
      assert.equal(204, res.status)
      assert.equal("", res.body)
    end)
  end)

  describe("handler errors", function()
    it("answer 500 with the request id and log the traceback", function()
      local res = assert(s:request("/boom"))
      assert.equal(500, res.status)
      local e = json.decode(res.body)
      assert.equal("internal", e.error)
      assert.is_string(e.request_id)
      assert.is_nil(res.body:find("exploded"))
      proc.wait_until(function()
        local logs = s:logs()
        return logs:find(e.request_id, 1, true) and logs:find("handler exploded", 1, true)
          and logs:find("stack traceback", 1, true)
      end, 5, "the traceback in the log")
      -- the worker keeps serving
      assert.equal(200, assert(s:request("/")).status)
    end)

    it("answer 500 for an invalid status or an injected header", function()
      assert.equal(500, assert(s:request("/badstatus")).status)
      assert.equal(500, assert(s:request("/hugestatus")).status)
      -- a 1xx is not a final answer: the client would wait forever
      assert.equal(500, assert(s:request{ path = "/infostatus",
                                          timeout = 3 }).status)
      local res = assert(s:request("/badheader"))
      assert.equal(500, res.status)
      assert.is_nil(res.headers["set-cookie"])
    end)

    it("answer 504 when the request deadline passes", function()
      local t0 = paygate.update_time()
      local res = assert(s:request("/deadline"))
      assert.equal(504, res.status)
      -- the connection closes after it, and the answer says so
      assert.equal("close", res.headers["connection"])
      assert.equal("deadline_exceeded", json.decode(res.body).error)
      -- at the 0.1 s deadline, not once the handler's 20 s sleep ended
      -- (room for a loaded machine, well under the 20 s)
      local took = paygate.update_time() - t0
      assert.is_true(took < 8, "took " .. took .. " s")
    end)
  end)

  describe("concurrency", function()
    it("serves 100 concurrent sleeping requests in well under 100 x 0.2 s", function()
      local t0 = paygate.update_time()
      local tasks = {}
      for i = 1, 100 do
        tasks[i] = paygate.spawn(function() return s:request("/sleep?s=0.2") end)
      end
      for i = 1, 100 do
        local res = assert(tasks[i]:wait())
        assert.equal(200, res.status)
      end
      local took = paygate.update_time() - t0
      -- one after another they take 20 s; together, well under half that
      -- even on a loaded machine
      assert.is_true(took < 10, "took " .. took .. " s")
    end)
  end)

  describe("hardening", function()
    local function raw(bytes)
      local c = assert(rawtcp.connect(s.port, 3))
      c:send(bytes)
      local out = c:recv_all()
      c:close()
      return out
    end

    it("answers a malformed request line with 400 and closes", function()
      assert.matches("^HTTP/1.1 400", raw("GARBAGE\r\n\r\n"))
      assert.matches("^HTTP/1.1 400", raw("GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"))
    end)

    it("refuses request smuggling shapes", function()
      assert.matches("^HTTP/1.1 400", raw("POST /echo HTTP/1.1\r\nHost: x\r\n" ..
        "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"))
      assert.matches("^HTTP/1.1 400", raw("POST /echo HTTP/1.1\r\nHost: x\r\n" ..
        "Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"))
    end)

    it("frames an answer by its Content-Length alone, whatever framing"
       .. " headers the handler returned", function()
      -- a handler's Transfer-Encoding went out beside the Content-Length:
      -- the client reads "abc" as a chunk size, and the stream is lost
      local out = raw("GET /framing HTTP/1.1\r\nHost: x\r\n"
                      .. "Connection: close\r\n\r\n")
      assert.matches("^HTTP/1.1 200", out)
      local head, body = out:match("^(.-\r\n)\r\n(.*)$")
      assert.is_nil(head:lower():find("transfer-encoding", 1, true), out)
      local _, n = head:lower():gsub("content%-length:", "")
      assert.equal(1, n, out)
      assert.matches("\r\nContent%-Length: 3\r\n", head)
      assert.equal("abc", body)
    end)

    it("sends a handler's Date instead of its own, one Date line",
       function()
      -- both went out: two Date lines (a singleton field), which a client
      -- joins into no date at all
      local out = raw("GET /dated HTTP/1.1\r\nHost: x\r\n"
                      .. "Connection: close\r\n\r\n")
      assert.matches("^HTTP/1.1 200", out)
      local head = out:match("^(.-\r\n)\r\n")
      local _, n = head:lower():gsub("\r\ndate:", "")
      assert.equal(1, n, out)
      assert.matches("\r\ndate: Mon, 07 Dec 2026 06:38:48 GMT\r\n", head)
      -- and one of its own when the handler gives none
      head = raw("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 .. "\r\n"):match("^(.-\r\n)\r\n")
      _, n = head:gsub("\r\nDate: %a%a%a, %d%d %a%a%a %d%d%d%d "
                       .. "%d%d:%d%d:%d%d GMT\r\n", "")
      assert.equal(1, n, head)
    end)

    it("answers 505 to another HTTP major version", function()
      assert.matches("^HTTP/1.1 505", raw("GET / HTTP/2.0\r\nHost: x\r\n\r\n"))
    end)

    it("answers 431 when the head exceeds the limit", function()
      local out = raw("GET / HTTP/1.1\r\nHost: x\r\nX-Big: " .. ("a"):rep(4000) .. "\r\n\r\n")
      assert.matches("^HTTP/1.1 431", out)
    end)

    it("answers 413 when the body exceeds the limit", function()
      local out = raw("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
      assert.matches("^HTTP/1.1 413", out)
      local res = assert(s:request{ method = "POST", path = "/echo", body = ("x"):rep(2000) })
      assert.equal(413, res.status)
    end)

    it("answers 408 to a client that stalls in the head", function()
      local t0 = paygate.update_time()
      local out = raw("GET / HTTP/1.1\r\nHost: x\r\n")
      assert.matches("^HTTP/1.1 408", out)
      assert.is_true(paygate.update_time() - t0 < 2.5)
    end)

    it("answers 408 to a client that stalls in the body", function()
      local out = raw("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
      assert.matches("^HTTP/1.1 408", out)
    end)

    it("decodes a chunked body", function()
      local out = raw("POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" ..
        "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nX-T: 1\r\n\r\n")
      assert.matches("^HTTP/1.1 200", out)
      assert.matches("\r\n\r\nabcdefg$", out)
    end)

    it("answers pipelined requests in order, in one connection", function()
      local req = "GET /orders/1 HTTP/1.1\r\nHost: x\r\n\r\n" ..
                  "GET /sleep?s=0.05 HTTP/1.1\r\nHost: x\r\n\r\n" ..
                  "GET /orders/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
      local out = raw(req)
      local _, n = out:gsub("HTTP/1.1 200", "")
      assert.equal(3, n)
      local a = out:find('"id":"1"', 1, true)
      local b = out:find("slept", 1, true)
      local c = out:find('"id":"3"', 1, true)
      assert.is_true(a < b and b < c)
    end)

    it("parses each request on a connection afresh (chunked, then sized)", function()
      local out = raw("POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" ..
        "\r\n2\r\nab\r\n0\r\n\r\n" ..
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\ncd")
      local _, n = out:gsub("HTTP/1.1 200", "")
      assert.equal(2, n)
      assert.matches("\r\n\r\nab.*\r\n\r\ncd$", out)
    end)

    it("sends no 100 Continue to an HTTP/1.0 client", function()
      local c = assert(rawtcp.connect(s.port, 3))
      c:send("POST /echo HTTP/1.0\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nhi")
      local out = c:recv_all()
      c:close()
      assert.matches("^HTTP/1.1 200", out)
      assert.is_nil(out:find("100 Continue", 1, true))
    end)

    it("answers Expect: 100-continue", function()
      local c = assert(rawtcp.connect(s.port, 3))
      c:send("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n" ..
             "Expect: 100-continue\r\nConnection: close\r\n\r\n")
      assert.matches("^HTTP/1.1 100 Continue", c:recv_some())
      c:send("hi")
      local out = c:recv_all()
      c:close()
      assert.matches("HTTP/1.1 200.*\r\n\r\nhi$", out)
    end)

    it("answers 413 to a chunked body whose framing outgrows the buffer", function()
      -- 1-byte chunks with long extensions: little decoded body, lots of raw
      -- bytes. Once the input buffer is full the server must answer, not
      -- spin on a readable socket it can no longer read from.
      local c = assert(rawtcp.connect(s.port, 3))
      c:send("POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
      local chunk = "1;" .. ("e"):rep(4000) .. "\r\nx\r\n"
      for _ = 1, 24 do c:send(chunk) end
      local out = c:recv_all()
      c:close()
      assert.matches("^HTTP/1.1 413", out)
    end)

    it("reads a body that fills the buffer behind pipelined requests", function()
      -- The buffer holds ~68 KB here (head + body limits + 64 KB). After 65
      -- pipelined requests, the 66th's body must still find room.
      local body = ("b"):rep(1000)
      local one = "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
      local c = assert(rawtcp.connect(s.port, 3))
      c:send((one .. body):rep(65) .. one .. body:sub(1, 300))
      paygate.sleep(0.2)
      c:send(body:sub(301) .. "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      local out = c:recv_all()
      c:close()
      local _, n = out:gsub("HTTP/1.1 200", "")
      assert.equal(67, n)
      assert.matches("hello$", out)
    end)

    it("keeps the head of a request whose body grows the buffer", function()
      -- the third request's head is parsed, then its body arrives and the
      -- buffer (4 KB at first) is reallocated under it
      local body = ("b"):rep(1000)
      local one = "POST /echo HTTP/1.1\r\nHost: x\r\nX-Pad: " .. ("p"):rep(400)
                  .. "\r\nContent-Length: 1000\r\n\r\n"
      local c = assert(rawtcp.connect(s.port, 3))
      c:send((one .. body):rep(2) .. one)
      paygate.sleep(0.2)
      c:send(body .. "GET /headers HTTP/1.1\r\nHost: x\r\nX-Test: still-here\r\n"
             .. "Connection: close\r\n\r\n")
      local out = c:recv_all()
      c:close()
      local _, n = out:gsub("HTTP/1.1 200", "")
      assert.equal(4, n)
      assert.matches("still%-here", out)
    end)

    it("answers an oversized head after a finished HEAD request", function()
      -- the 431 must not read the finished request's head, whose buffer
      -- was reallocated meanwhile (ASan: heap-use-after-free)
      local c = assert(rawtcp.connect(s.port, 3))
      c:send("HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
      assert.matches("^HTTP/1.1 200", c:recv_some())
      c:send("GET / HTTP/1.1\r\nX-Big: " .. ("a"):rep(5000))
      local out = c:recv_all()
      c:close()
      assert.matches("^HTTP/1.1 431.*\r\n\r\n{.*}$", out)
    end)

    it("keeps serving after all of that", function()
      assert.equal(200, assert(s:request("/")).status)
    end)
  end)

  describe("admin", function()
    it("serves /healthz and /metrics in Prometheus text", function()
      local h = assert(s:admin_get("/healthz"))
      assert.equal(200, h.status)
      assert.equal(2, json.decode(h.body).workers)
      local m = assert(s:admin_get("/metrics"))
      assert.equal(200, m.status)
      assert.matches('paygate_requests_total{method="GET",route="/orders/:id",status="200"} %d+', m.body)
      assert.matches("paygate_request_duration_seconds_bucket", m.body)
      assert.matches("paygate_lua_memory_bytes{pid=", m.body)
      assert.matches("paygate_reloads_total 0", m.body)
      assert.matches("paygate_worker_restarts_total 0", m.body)
    end)
  end)

  describe("logging", function()
    it("writes JSON lines with an access line per request and no bodies", function()
      local secret = "card-4111111111111111"
      assert(s:request{ method = "POST", path = "/echo", body = secret })
      proc.wait_until(function() return s:logs():find('"path":"/echo"', 1, true) end,
                      5, "the access line")
      for line in s:logs():gmatch("[^\n]+") do
        local ok, v = pcall(json.decode, line)
        assert.is_true(ok, "not JSON: " .. line)
        assert.is_string(v.ts)
        assert.is_string(v.level)
        assert.is_number(v.pid)
      end
      assert.is_nil(s:logs():find(secret, 1, true))
    end)
  end)
end)
