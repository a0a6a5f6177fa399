-- The exact bytes of status lines and of the server's own JSON error
-- answers, over a raw socket: `paygate run` on a free loopback port.
local json = require "cjson"
local server = require "support.server"
local rawtcp = require "support.rawtcp"
local proc = require "support.proc"

local APP = [[
local paygate = require "paygate"
paygate.route("GET", "/status/:code", function(req)
  return tonumber(req.params.code), "x"
end)
paygate.route("GET", "/abort/:code", function(req)
  paygate.abort(tonumber(req.params.code), "teapot", "short and stout")
end)
paygate.route("GET", "/abort-quoted", function()
  paygate.abort(422, 'bad"kind\\', 'say "hi"\n\tthen \1 leave \255')
end)paygate.route("GET", "/own-rid", function()
  return 200, "x", { ["X-Request-Id"] = "theirs-0001" }
end)
]]

describe("status lines", function()
  local s

  setup(function()
    s = server.start{ source = APP }
  end)

  teardown(function()
    if s then assert.equal(0, s:stop()) end
  end)

  -- one request on its own connection; returns everything the server sent
  local function raw(bytes)
    local c = assert(rawtcp.connect(s.port, 5))
    assert(c:send(bytes))
    local out = c:recv_all()
    c:close()
    return out
  end

  local function get(path, headers)
    return raw("GET " .. path .. " HTTP/1.1\r\nHost: x\r\n" .. (headers or "")
               .. "Connection: close\r\n\r\n")
  end

  local function status_line(out)
    return out:match("^([^\r\n]*\r\n)")
  end

  describe("for an unregistered code", function()
    it("has an empty reason phrase (the space stays)", function()
      for _, code in ipairs{ 299, 306, 420, 430, 509, 599 } do
        assert.equal("HTTP/1.1 " .. code .. " \r\n",
                     status_line(get("/status/" .. code)))
      end
    end)
  end)

  describe("for a registered code", function()
    it("has the registry's reason phrase, from a handler's status", function()
      local want = {
        [200] = "OK", [201] = "Created", [203] = "Non-Authoritative Information",
        [207] = "Multi-Status", [226] = "IM Used", [302] = "Found",
        [308] = "Permanent Redirect", [402] = "Payment Required",
        [409] = "Conflict", [413] = "Content Too Large",
        [416] = "Range Not Satisfiable", [418] = "I'm a teapot",
        [421] = "Misdirected Request", [422] = "Unprocessable Content",
        [425] = "Too Early", [428] = "Precondition Required",
        [429] = "Too Many Requests",
        [431] = "Request Header Fields Too Large",
        [451] = "Unavailable For Legal Reasons",
        [500] = "Internal Server Error", [503] = "Service Unavailable",
        [506] = "Variant Also Negotiates", [508] = "Loop Detected",
        [511] = "Network Authentication Required",
      }
      for code, reason in pairs(want) do
        local out = get("/status/" .. code)
        assert.equal("HTTP/1.1 " .. code .. " " .. reason .. "\r\n",
                     status_line(out))
        assert.matches("\r\n\r\nx$", out)
      end
    end)

    it("has no body for 204 and 304", function()
      for code, reason in pairs{ [204] = "No Content",
                                 [304] = "Not Modified" } do
        local out = get("/status/" .. code)
        assert.equal("HTTP/1.1 " .. code .. " " .. reason .. "\r\n",
                     status_line(out))
        assert.matches("\r\n\r\n$", out)
        assert.is_nil(out:lower():find("content-length", 1, true))
      end
    end)

    it("has the registry's reason phrase from paygate.abort()", function()
      for code, reason in pairs{ [418] = "I'm a teapot",
                                 [425] = "Too Early",
                                 [429] = "Too Many Requests",
                                 [451] = "Unavailable For Legal Reasons",
                                 [504] = "Gateway Timeout" } do
        local out = get("/abort/" .. code)
        assert.equal("HTTP/1.1 " .. code .. " " .. reason .. "\r\n",
                     status_line(out))
        local body = json.decode(out:match("\r\n\r\n(.*)$"))
        assert.equal("teapot", body.error)
        assert.equal("short and stout", body.message)
      end
      assert.equal("HTTP/1.1 499 \r\n", status_line(get("/abort/499")))
    end)

    it("has it on the server's own answers too", function()
      assert.equal("HTTP/1.1 400 Bad Request\r\n",
                   status_line(raw("GARBAGE\r\n\r\n")))
      assert.equal("HTTP/1.1 505 HTTP Version Not Supported\r\n",
                   status_line(raw("GET / HTTP/2.0\r\nHost: x\r\n\r\n")))
      assert.equal("HTTP/1.1 404 Not Found\r\n", status_line(get("/nowhere")))
    end)
  end)

  describe("the server's JSON error answer", function()
    it("keeps an aborting handler's kind and message, JSON-quoted", function()
      local out = get("/abort-quoted", "X-Request-Id: quoted-0001\r\n")
      assert.equal("HTTP/1.1 422 Unprocessable Content\r\n", status_line(out))
      local body = json.decode(out:match("\r\n\r\n(.*)$"))
      assert.equal('bad"kind\\', body.error)
      -- a byte that is not UTF-8 becomes U+FFFD
      assert.equal('say "hi"\n\tthen \1 leave \239\191\189', body.message)
      assert.equal("quoted-0001", body.request_id)
    end)
  end)

  -- was: only the server's JSON error answers named the request id (in
  -- their body); a handler's answer carried none
  describe("the X-Request-Id header", function()
    local function rids(out)
      local head, t = out:match("^(.-\r\n)\r\n"), {}
      for v in head:gmatch("\n[Xx]%-[Rr]equest%-[Ii]d: ([^\r]*)\r\n") do
        t[#t + 1] = v
      end
      return t
    end

    it("is on a handler's answer, once: the request's id, not the"
       .. " handler's", function()
      local out = get("/own-rid", "X-Request-Id: mine-000001\r\n")
      assert.equal("HTTP/1.1 200 OK\r\n", status_line(out))
      assert.same({ "mine-000001" }, rids(out))
      local made = rids(get("/status/201"))
      assert.equal(1, #made)
      assert.matches("^%x+$", made[1])
    end)

    it("is on the server's JSON error answer, the id its body names",
       function()
      local out = get("/abort/418")
      local body = json.decode(out:match("\r\n\r\n(.*)$"))
      assert.same({ body.request_id }, rids(out))
    end)

    it("is not on a refusal before any handler (no request id)", function()
      assert.same({}, rids(raw("GARBAGE\r\n\r\n")))
    end)
  end)

  describe("the access line", function()
    it("is valid JSON whatever bytes the path holds", function()
      local id = "access-ff-0001"
      local out = get("/" .. ("\255"):rep(300), "X-Request-Id: " .. id .. "\r\n")
      assert.equal("HTTP/1.1 404 Not Found\r\n", status_line(out))
      local line
      proc.wait_until(function()
        for l in s:logs():gmatch("[^\n]+") do
          if l:find(id, 1, true) and l:find('"access"', 1, true) then
            line = l
            return true
          end
        end
      end, 5, "the access line")
      local entry = json.decode(line)
      assert.equal(404, entry.status)
      assert.equal("/" .. ("\239\191\189"):rep(255), entry.path)
    end)
  end)
end)
