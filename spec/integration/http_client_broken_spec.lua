-- paygate.http.request against a server that breaks HTTP/1.1
-- (spec/support/broken_http.py): an answer cut short, bytes on an idle
-- keep-alive connection that answer no request.
local paygate = require "paygate"
local core = require "paygate.core"
local proc = require "support.proc"

describe("paygate.http.request facing a broken server", function()
  local p, port, log

  setup(function()
    port = core.free_port()
    log = os.tmpname()
    p = proc.spawn({ "python3", "spec/support/broken_http.py",
                     tostring(port), log }, { watchdog = true })
    proc.wait_until(function() return proc.read(log):find("ready") end,
                    10, "broken_http.py")
  end)

  teardown(function()
    if p then p:stop() end
    os.remove(log)
  end)

  local function url(path) return "http://127.0.0.1:" .. port .. path end

  it("fails closed, not a 200, for an answer whose head is cut short",
     function()
    -- "HTTP/1.1 200 OK\r\nX-A: a\r\nContent-Length: 2\r\n\r\nok": the head
    -- is its first 46 bytes; any cut before its blank line ended, or in
    -- the body, is no answer
    for n = 1, 47 do
      local res, err = paygate.http.request{ url = url("/cut-" .. n),
                                             timeout = 5 }
      assert.is_nil(res, "cut at " .. n .. ": status "
                    .. tostring(res and res.status))
      assert.equal("closed", err.kind, "cut at " .. n)
      assert.is_true(err.sent)
      -- streamed, the head is not handed over either
      local heads = 0
      res, err = paygate.http.request{ url = url("/cut-" .. n), timeout = 5,
        on_headers = function() heads = heads + 1 end,
        sink = function() end }
      assert.is_nil(res, "streamed, cut at " .. n)
      assert.equal("closed", err.kind, "streamed, cut at " .. n)
      if n < 46 then assert.equal(0, heads, "streamed, cut at " .. n) end
    end
    local res = assert(paygate.http.request{ url = url("/cut-48") })
    assert.equal(200, res.status)
    assert.equal("ok", res.body)
    assert.equal("a", res.headers["x-a"])
  end)

  it("fails an answer with Content-Length values that differ (RFC 9112"
     .. " 6.3)", function()
    -- libcurl (7.88) framed it by the last one: a 200 whose body was
    -- "ok" and the head of another answer
    for _, sink in ipairs({ false, true }) do
      local res, err = paygate.http.request{ url = url("/twolengths"),
        sink = sink and function() end or nil }
      assert.is_nil(res)
      assert.equal("closed", err.kind)
      assert.matches("Content-Length values that differ", err.message, 1,
                     true)
      assert.is_false(err.retryable)
      assert.is_true(err.sent)
    end
    assert.equal("ok", assert(paygate.http.request{ url = url("/ok") }).body)
  end)

  it("takes Content-Length fields that repeat one value as one, however"
     .. " long it is written (RFC 9110 8.6)", function()
    -- a value written with 28 leading zeros was cut to its first 23
    -- characters before the second field was compared with it: two
    -- identical fields were refused as values that differ
    for _, sink in ipairs({ false, true }) do
      for _, name in ipairs({ "same", "samelong" }) do
        local got = {}
        local res, err = paygate.http.request{ url = url("/twolengths-"
          .. name), timeout = 5,
          sink = sink and function(chunk) got[#got + 1] = chunk end or nil }
        assert.is_not_nil(res, name .. ": " .. tostring(err and err.message))
        assert.equal(200, res.status)
        assert.equal("ok", sink and table.concat(got) or res.body)
      end
      -- values that differ past the 23rd character still differ
      local res, err = paygate.http.request{ url = url("/twolengths-difflong"),
        timeout = 5, sink = sink and function() end or nil }
      assert.is_nil(res)
      assert.equal("closed", err.kind)
      assert.matches("Content-Length values that differ", err.message, 1,
                     true)
      assert.is_false(err.retryable)
    end
    assert.equal("ok", assert(paygate.http.request{ url = url("/ok") }).body)
  end)

  it("fails an answer whose first header line is folded: a malformed"
     .. " head, not a dropped connection", function()
    -- obs-fold with no field before it to go on (RFC 9112 5.2 lets a
    -- client refuse any obs-fold; this one cannot be joined to anything).
    -- libcurl (7.88) stops there with CURLE_BAD_FUNCTION_ARGUMENT: it was
    -- kind closed, retryable, "A libcurl function was given a bad
    -- argument", as if the network had failed and a resend could help
    for _, sink in ipairs({ false, true }) do
      local res, err = paygate.http.request{ url = url("/foldfirst"),
        timeout = 5, sink = sink and function() end or nil }
      assert.is_nil(res, res and res.status)
      assert.equal("closed", err.kind)
      assert.matches("response head is malformed", err.message, 1, true)
      assert.is_nil(err.message:find("libcurl", 1, true), err.message)
      assert.is_false(err.retryable)
      assert.is_true(err.sent)
    end
    assert.equal("ok", assert(paygate.http.request{ url = url("/ok") }).body)
  end)

  it("fails an answer with a header line that holds no colon: a malformed"
     .. " head, not a dropped connection", function()
    -- neither a field (RFC 9112 5.1) nor a folded line. libcurl (7.88)
    -- stops there with CURLE_WEIRD_SERVER_REPLY, the line not handed
    -- over: it was kind closed, retryable, "Header without colon", so an
    -- idempotent WeChat call was sent again to a server that had
    -- answered it. Anywhere in the head, a 1xx one too, and a GET or a
    -- POST alike; the line itself (here a credential) is never shown
    for n = 1, 4 do
      for _, sink in ipairs({ false, true }) do
        for _, body in ipairs({ false, "x" }) do
          local what = ("line %d, sink %s, body %s"):format(n,
            tostring(sink), tostring(body))
          local heads = 0
          local res, err = paygate.http.request{ url = url("/nocolon-" .. n),
            timeout = 5, body = body or nil,
            sink = sink and function() end or nil,
            on_headers = sink and function() heads = heads + 1 end or nil }
          assert.is_nil(res, what)
          assert.equal("closed", err.kind, what)
          assert.matches("response head is malformed: a header line"
                         .. " holds no colon", err.message, 1, true)
          assert.is_nil(err.message:find("Header without", 1, true),
                        err.message)
          assert.is_nil(err.message:find("s3cr3t", 1, true), err.message)
          assert.is_nil(err.message:find("Bogus", 1, true), err.message)
          assert.is_false(err.retryable, what)
          assert.is_true(err.sent, what)
          assert.equal(0, heads, what)
        end
      end
    end
    assert.equal("ok", assert(paygate.http.request{ url = url("/ok") }).body)
  end)

  it("fails an answer with a NUL byte in its head or a Content-Length that"
     .. " is no number: a malformed head, not a dropped connection",
     function()
    -- libcurl (7.88) stops at either with CURLE_WEIRD_SERVER_REPLY, the
    -- line not handed over: it was kind closed, retryable, "Nul byte in
    -- header" or "Invalid Content-Length: value", so an idempotent WeChat
    -- call was sent again to a server that had read and answered it. A
    -- NUL anywhere (a field, one with a credential that is never shown,
    -- the status line, a 100 head); a Content-Length that is a word,
    -- negative or empty, alone or beside a valid one; GET and POST alike
    local cases = {
      ["/nul-1"] = "a line of it holds a NUL byte",
      ["/nul-2"] = "a line of it holds a NUL byte",
      ["/nul-3"] = "a line of it holds a NUL byte",
      ["/nul-4"] = "a line of it holds a NUL byte",
    }
    for _, name in ipairs({ "word", "negative", "empty", "then-bad",
                            "bad-then" }) do
      cases["/badlength-" .. name] = "its Content-Length is not a number"
                                     .. " of bytes"
    end
    for path, says in pairs(cases) do
      for _, sink in ipairs({ false, true }) do
        for _, body in ipairs({ false, "x" }) do
          local what = ("%s, sink %s, body %s"):format(path,
            tostring(sink), tostring(body))
          local heads = 0
          local res, err = paygate.http.request{ url = url(path),
            timeout = 5, body = body or nil,
            sink = sink and function() end or nil,
            on_headers = sink and function() heads = heads + 1 end or nil }
          assert.is_nil(res, what)
          assert.equal("closed", err.kind, what)
          assert.matches("response head is malformed: " .. says,
                         err.message, 1, true)
          assert.is_nil(err.message:find("Nul byte", 1, true), err.message)
          assert.is_nil(err.message:find("Invalid", 1, true), err.message)
          assert.is_nil(err.message:find("s3cr3t", 1, true), err.message)
          assert.is_false(err.retryable, what)
          assert.is_true(err.sent, what)
          assert.equal(0, heads, what)
        end
      end
    end
    assert.equal("ok", assert(paygate.http.request{ url = url("/ok") }).body)
  end)

  it("fails an answer whose Content-Length is past any body: malformed"
     .. " past 2^63 - 1, body_too_large past max_body, both at once",
     function()
    -- libcurl (7.88) took a value past 2^63 - 1 as no length and read the
    -- body until the server closed, and a fitting one past max_body as a
    -- body still to come: this server keeps the connection open after
    -- "ok", so each ended in kind timeout, retryable, as if the network
    -- had stalled (a server that closed had "ok" taken as the whole
    -- body). A GET, a POST and a HEAD alike (libcurl refuses a word in a
    -- HEAD answer's Content-Length too); the value is never shown
    for _, name in ipairs({ "big", "2p63", "plus" }) do
      for _, sink in ipairs({ false, true }) do
        for _, method in ipairs({ "GET", "POST", "HEAD" }) do
          local what = ("%s, sink %s, %s"):format(name, tostring(sink),
                                                  method)
          local heads = 0
          local res, err = paygate.http.request{
            url = url("/biglength-" .. name), timeout = 3, method = method,
            body = method == "POST" and "x" or nil,
            sink = sink and function() end or nil,
            on_headers = sink and function() heads = heads + 1 end or nil }
          assert.is_nil(res, what)
          assert.equal("closed", err.kind, what .. ": " .. err.message)
          assert.equal("http request: the response head is malformed: its"
                       .. " Content-Length is too large (past 2^63 - 1"
                       .. " bytes)", err.message)
          assert.is_false(err.retryable, what)
          assert.is_true(err.sent, what)
          assert.equal(0, heads, what)
        end
      end
    end
    -- a length that fits but is past max_body: the default one, or one
    -- given with a sink; with a sink and no max_body nothing bounds it
    for _, name in ipairs({ "max", "tera" }) do
      for _, method in ipairs({ "GET", "POST" }) do
        local body = method == "POST" and "x" or nil
        local res, err = paygate.http.request{
          url = url("/biglength-" .. name), timeout = 3, body = body }
        assert.is_nil(res, name)
        assert.equal("body_too_large", err.kind, err.message)
        assert.equal("http request: response body exceeds max_body"
                     .. " (16777216 bytes): its Content-Length is "
                     .. (name == "max" and "9223372036854775807"
                         or "1000000000000"), err.message)
        assert.is_false(err.retryable)
        assert.is_true(err.sent)
        local heads = 0
        res, err = paygate.http.request{ url = url("/biglength-" .. name),
          timeout = 3, body = body, max_body = 1000,
          sink = function() end,
          on_headers = function() heads = heads + 1 end }
        assert.is_nil(res, name)
        assert.equal("body_too_large", err.kind, err.message)
        assert.equal(0, heads)
        local status
        res, err = paygate.http.request{ url = url("/biglength-" .. name),
          timeout = 3, body = body, sink = function() end,
          on_headers = function(s) status = s; return false end }
        assert.is_nil(res, name)
        assert.equal("aborted", err.kind, err.message)
        assert.equal(200, status)
      end
      -- a HEAD answer's length is the resource's: there is no body
      local res = assert(paygate.http.request{
        url = url("/biglength-" .. name), method = "HEAD", timeout = 3 })
      assert.equal(200, res.status)
      assert.equal("", res.body)
    end
    -- neither leading zeros nor a 204's length (no body: libcurl does
    -- not read it) is refused
    local res = assert(paygate.http.request{ url = url("/biglength-zeros"),
                                             timeout = 3 })
    assert.equal("ok", res.body)
    res = assert(paygate.http.request{ url = url("/biglength-204"),
                                       timeout = 3 })
    assert.equal(204, res.status)
    assert.equal("ok", assert(paygate.http.request{ url = url("/ok") }).body)
  end)

  it("tells libcurl's malformed-head failures apart", function()
    -- each cause says its own words: a NUL byte in a line without a
    -- colon is told as the NUL (libcurl checks it first)
    local res, err = paygate.http.request{ url = url("/nul-nocolon"),
                                           timeout = 5 }
    assert.is_nil(res)
    assert.matches("malformed: a line of it holds a NUL byte", err.message,
                   1, true)
    assert.is_nil(err.message:find("no colon", 1, true), err.message)
    assert.equal("ok", assert(paygate.http.request{ url = url("/ok") }).body)
  end)

  it("fails an answer whose status line cannot be read, or that is not"
     .. " HTTP: not a dropped connection", function()
    -- libcurl (7.88) fails each with CURLE_UNSUPPORTED_PROTOCOL: it was
    -- kind closed, retryable, with libcurl's words ("Unsupported response
    -- code in HTTP response", "Received HTTP/0.9 when not allowed"), so
    -- an idempotent WeChat call was sent again to a server that had read
    -- it and will answer the same. A status line that begins "HTTP/" is
    -- a server's that speaks HTTP; one that does not is another
    -- protocol's server: a resend meets the same peer either way, and
    -- whether it acted nothing here can tell (err.sent stays true)
    local version = "the response head is malformed: its status line"
                    .. " cannot be read (an HTTP version this client does"
                    .. " not speak)"
    local code = "the response head is malformed: its status line cannot"
                 .. " be read (no status code of three digits)"
    local other = "the response head is malformed: it is not HTTP: no"
                  .. " status line begins it"
    local cases = {
      ["/badstatus"] = code, ["/badcode"] = code, ["/nospace"] = code,
      ["/badstatus-100"] = code,
      ["/badversion"] = version, ["/http3"] = version,
      ["/nothttp-ssh"] = other, ["/nothttp-tls"] = other,
      ["/nothttp-redis"] = other,
    }
    for path, says in pairs(cases) do
      for _, sink in ipairs({ false, true }) do
        for _, body in ipairs({ false, "x" }) do
          local what = ("%s, sink %s, body %s"):format(path,
            tostring(sink), tostring(body))
          local heads = 0
          local res, err = paygate.http.request{ url = url(path),
            timeout = 5, body = body or nil,
            sink = sink and function() end or nil,
            on_headers = sink and function() heads = heads + 1 end or nil }
          assert.is_nil(res, what)
          assert.equal("closed", err.kind, what)
          assert.equal("http request: " .. says,
                       err.message:sub(1, #says + 14), what)
          for _, shown in ipairs({ "Unsupported", "HTTP/0.9", "SSH", "ERR",
                                   "1.2", "2000" }) do
            assert.is_nil(err.message:find(shown, 1, true), err.message)
          end
          assert.is_false(err.retryable, what)
          assert.is_true(err.sent, what)
          assert.equal(0, heads, what)
        end
      end
    end
    assert.equal("ok", assert(paygate.http.request{ url = url("/ok") }).body)
  end)

  it("fails a 101 Switching Protocols no request asked for", function()
    -- it was status 101, the other protocol's bytes read as the body
    -- until the server closed
    for _, sink in ipairs({ false, true }) do
      local res, err = paygate.http.request{ url = url("/switch"),
        timeout = 10, sink = sink and function() end or nil }
      assert.is_nil(res, res and res.status)
      assert.equal("closed", err.kind)
      assert.matches("101 Switching Protocols", err.message, 1, true)
      assert.is_false(err.retryable)
    end
    assert.equal("ok", assert(paygate.http.request{ url = url("/ok") }).body)
  end)

  it("hands over a bare CR in a header line as a space (RFC 9112 2.2)",
     function()
    -- libcurl (7.88) splits lines at LF alone: "X-A: a\rX-B: b" came as
    -- x-a = "a\rX-B: b", a CR that a response header (paygate's own
    -- res:header, for one) refuses, and that reads as a line break to
    -- whatever logs or forwards it
    for _, sink in ipairs({ false, true }) do
      local got
      local res = assert(paygate.http.request{ url = url("/barecr"),
        sink = sink and function() end or nil,
        on_headers = sink and function(_, h) got = h end or nil })
      local h = sink and got or res.headers
      assert.equal("a X-B: b", h["x-a"])
      assert.is_nil(h["x-b"])
    end
  end)

  it("joins a folded header line (obs-fold) to its field with one space"
     .. " (RFC 9112 5.2)", function()
    -- the continuation was dropped ("X-A: one" read as "one"), or read as
    -- a field of its own when it held a colon ("\tthree: 3" as a header
    -- named "\tthree")
    for _, sink in ipairs({ false, true }) do
      local got
      local res = assert(paygate.http.request{ url = url("/fold"),
        sink = sink and function() end or nil,
        on_headers = sink and function(_, h) got = h end or nil })
      local h = sink and got or res.headers
      assert.equal("one two three: 3, again more", h["x-a"])
      assert.equal("b", h["x-b"])
      local names = {}
      for k in pairs(h) do names[#names + 1] = k end
      table.sort(names)
      assert.same({ "content-length", "x-a", "x-b" }, names)
    end
  end)
end)

describe("paygate.http.request on a keep-alive connection with bytes that"
         .. " answer no request", function()
  local p, port, log

  before_each(function()
    port = core.free_port()
    log = os.tmpname()
    p = proc.spawn({ "python3", "spec/support/broken_http.py",
                     tostring(port), log }, { watchdog = true })
    proc.wait_until(function() return proc.read(log):find("ready") end,
                    10, "broken_http.py")
  end)

  after_each(function()
    if p then p:stop() end
    os.remove(log)
  end)

  local function url(path) return "http://127.0.0.1:" .. port .. path end

  local function seen(line)
    local count = 0
    for l in (proc.read(log) or ""):gmatch("[^\n]+") do
      if l == line then count = count + 1 end
    end
    return count
  end

  -- libcurl (7.88) reuses an idle connection with input waiting on it
  -- (its check only looks for the end of the stream): the next request
  -- read those bytes as its answer, and every later one on that
  -- connection the answer to the one before
  it("sends the next request on a new connection: a stale answer is"
     .. " nobody's", function()
    assert.equal("ok", assert(paygate.http.request{ url = url("/stale") })
                         .body)
    proc.wait_until(function() return seen("sent stale") == 1 end, 5,
                    "the stale answer")
    for i = 1, 3 do
      local res = assert(paygate.http.request{ url = url("/ok?" .. i),
                                               body = "x" })
      assert.equal(200, res.status)
      assert.equal("ok", res.body, "request " .. i)
      assert.equal(1, seen("POST /ok?" .. i))
    end
  end)

  it("does not hand a POST the 408 a server left on a connection it"
     .. " closed", function()
    assert.equal("ok", assert(paygate.http.request{ url = url("/late408") })
                         .body)
    proc.wait_until(function() return seen("sent 408") == 1 end, 5,
                    "the 408")
    local res, err = paygate.http.request{ url = url("/ok"), body = "x" }
    assert.is_nil(err)
    assert.equal(200, res.status)
    assert.equal(1, seen("POST /ok"))
  end)
end)
