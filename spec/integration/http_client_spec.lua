-- paygate.http.request against real local servers: plain and TLS (with a
-- test CA and a client certificate), timeouts, refused connections.
local paygate = require "paygate"
local core = require "paygate.core"
local server = require "support.server"
local pki = require "support.pki"

local APP = [[
local paygate = require "paygate"
paygate.route("GET", "/hi", function(req)
  return 200, "hi " .. (req:header("x-name") or "?"), { ["X-Served"] = "yes" }
end)
paygate.route("POST", "/echo", function(req)
  return 200, req.method .. ":" .. req.body
end)
paygate.route("GET", "/slow", function() paygate.sleep(2) return 200, "late" end)
paygate.route("GET", "/slower", function() paygate.sleep(6) return 200, "late" end)
paygate.route("GET", "/big", function() return 200, ("x"):rep(100000) end)
paygate.route("GET", "/reuse", function() return 200, "ok" end)
paygate.route("GET", "/peer", function(req) return 200, req.remote_addr end)
paygate.route("GET", "/whoami", function(req) return 200, req.scheme end)
]]

describe("paygate.http.request", function()
  local plain, tls, certs, dir

  setup(function()
    dir = server.tmpdir()
    certs = pki.make(dir)
    plain = server.start{ source = APP }
    tls = server.start{ source = APP, scheme = "https", ca_file = certs.ca,
      args = { "--tls-cert", certs.server_cert, "--tls-key", certs.server_key,
               "--tls-client-ca", certs.ca } }
  end)

  teardown(function()
    if plain then plain:stop() end
    if tls then tls:stop() end
    os.execute("rm -rf " .. dir)
  end)

  it("raises on misuse: no url, bad scheme, bad option types", function()
    assert.has_error(function() paygate.http.request{} end)
    assert.has_error(function() paygate.http.request{ url = "ftp://x/" } end)
    assert.has_error(function()
      paygate.http.request{ url = plain:url("/hi"), timeout = "soon" } end)
    assert.has_error(function()
      paygate.http.request{ url = plain:url("/hi"), headers = { ["X-A"] = "a\r\nb" } } end)
  end)

  it("raises on a url that is no URL, and on a header that would not go"
     .. " out as given", function()
    -- curl refused each at the transfer: kind closed, retryable (a bad
    -- URL was tried again and again); a NUL cut the URL or the value
    -- short and the request went out to, or with, something else
    local url = plain:url("/hi")
    for _, u in ipairs({ url .. " x", url .. "\r\nX-B: b", "http://",
                         "http://[::1" }) do
      local ok, err = pcall(paygate.http.request, { url = u })
      assert.is_false(ok)
      assert.matches("http.request: opts.url is not a valid URL", err, 1,
                     true)
      assert.not_matches("X-B", err, 1, true)    -- the value is not shown
    end
    local ok, err = pcall(paygate.http.request, { url = url .. "\0/other" })
    assert.is_false(ok)
    assert.matches("http.request: opts.url has a NUL byte in it", err, 1,
                   true)
    assert.not_matches("other", err, 1, true)
    for name, value in pairs({ ["X-A"] = "a\0b", ["X A"] = "a",
                               ["X-A\0B"] = "a", ["X(A)"] = "a" }) do
      local ok, err = pcall(paygate.http.request,
                            { url = url, headers = { [name] = value } })
      assert.is_false(ok)
      assert.matches("http.request: opts.headers", err, 1, true)
    end
    -- a header with an empty value still goes, and a URL with an
    -- escaped space
    local res = assert(paygate.http.request{ url = url .. "?a=%20",
                                             headers = { ["X-Name"] = "" } })
    assert.equal(200, res.status)
  end)

  it("returns status, lower-case headers and body", function()
    local res = assert(paygate.http.request{ url = plain:url("/hi"),
                                             headers = { ["X-Name"] = "ada" } })
    assert.equal(200, res.status)
    assert.equal("hi ada", res.body)
    assert.equal("yes", res.headers["x-served"])
  end)

  it("sends a body, with POST by default", function()
    local res = assert(paygate.http.request{ url = plain:url("/echo"), body = "abc" })
    assert.equal("POST:abc", res.body)
    res = assert(paygate.http.request{ url = plain:url("/echo"), method = "PUT",
                                       body = "" })
    assert.equal(405, res.status)
  end)

  it("classifies a timeout", function()
    local t0 = paygate.update_time()
    local res, err = paygate.http.request{ url = plain:url("/slower"),
                                          timeout = 0.2 }
    assert.is_nil(res)
    assert.equal("timeout", err.kind)
    assert.is_true(err.retryable)
    -- the 0.2 s timeout, not one applied late (/slower answers at 6 s:
    -- without a timeout that is a result, not an error): room for a
    -- loaded machine
    local took = paygate.update_time() - t0
    assert.is_true(took < 5, "took " .. took .. " s")
    assert.matches("^timeout: ", tostring(err))
  end)

  it("lets a request that ended cancel one that ended with it", function()
    -- both time out in one timer pass; the first woken cancels the other,
    -- whose completion is already collected
    for _ = 1, 3 do
      local tasks = {}
      local function req(i)
        local _, err = paygate.http.request{ url = plain:url("/slow"), timeout = 0.3 }
        local other = tasks[3 - i]
        if other ~= nil and not other:finished() then other:cancel() end
        return err and err.kind
      end
      tasks[1] = paygate.spawn(req, 1)
      tasks[2] = paygate.spawn(req, 2)
      local a, ea = tasks[1]:wait()
      local b, eb = tasks[2]:wait()
      assert.is_true(a == "timeout" or b == "timeout")
      assert.is_true(ea ~= nil or eb ~= nil or (a == "timeout" and b == "timeout"))
    end
  end)

  it("classifies a refused connection", function()
    local port = core.free_port()
    local res, err = paygate.http.request{ url = "http://127.0.0.1:" .. port .. "/" }
    assert.is_nil(res)
    assert.equal("connect", err.kind)
    assert.is_false(err.sent)
  end)

  it("says sent = true for a timeout while waiting for the answer", function()
    local res, err = paygate.http.request{ url = plain:url("/slow"), timeout = 0.2 }
    assert.is_nil(res)
    assert.equal("timeout", err.kind)
    assert.is_true(err.sent)
  end)

  it("says sent = false for a host name that does not resolve", function()
    local res, err = paygate.http.request{ url = "http://nonexistent.invalid/",
                                           timeout = 5 }
    assert.is_nil(res)
    assert.is_truthy(({ dns = true, timeout = true })[err.kind], err.kind)
    assert.is_false(err.sent)
  end)

  it("classifies a peer that hangs up without answering", function()
    local proc = require "support.proc"
    local port = core.free_port()
    local log = os.tmpname()
    local p = proc.spawn({ PAYGATE_BIN, "exec", "spec/support/closer.lua",
                           tostring(port), "2" }, { log = log })
    proc.wait_until(function() return proc.read(log):find("listening") end,
                    10, "the closer to listen")
    local res, err = paygate.http.request{ url = "http://127.0.0.1:" .. port .. "/" }
    assert.is_nil(res)
    assert.equal("closed", err.kind)
    assert.is_true(err.retryable)
    assert.is_true(err.sent)
    p:kill(proc.SIGKILL)
    p:wait(5)
    os.remove(log)
  end)

  it("gives up connecting after connect_timeout, not the total timeout", function()
    local proc = require "support.proc"
    local rawtcp = require "support.rawtcp"
    local port = core.free_port()
    local log = os.tmpname()
    local p = proc.spawn({ PAYGATE_BIN, "exec", "spec/support/closer.lua",
                           tostring(port), "20", "hold" }, { log = log })
    finally(function() p:kill(proc.SIGKILL); p:wait(5); os.remove(log) end)
    proc.wait_until(function() return proc.read(log):find("listening") end,
                    10, "the listener")
    -- fill the accept queue (backlog 0 holds one; nobody accepts): the
    -- next SYN goes unanswered
    local held = { assert(rawtcp.connect(port, 1)) }
    local t0 = paygate.update_time()
    local res, err = paygate.http.request{ url = "http://127.0.0.1:" .. port .. "/",
                                           connect_timeout = 0.3, timeout = 10 }
    local took = paygate.update_time() - t0
    for i = 1, #held do if held[i] then held[i]:close() end end
    assert.is_nil(res)
    assert.equal("timeout", err.kind, tostring(err) .. " after " .. took .. " s")
    assert.is_false(err.sent)
    -- connect_timeout (0.3 s), not the total timeout (10 s): room for a
    -- loaded machine
    assert.is_true(took < 5, "took " .. took .. " s")
  end)

  it("counts the TLS handshake in connect_timeout: a server that takes the"
     .. " TCP connect and never answers the ClientHello", function()
    local proc = require "support.proc"
    local port = core.free_port()
    local log = os.tmpname()
    local p = proc.spawn({ PAYGATE_BIN, "exec", "spec/support/closer.lua",
                           tostring(port), "30", "silent" }, { log = log })
    finally(function() p:kill(proc.SIGKILL); p:wait(5); os.remove(log) end)
    proc.wait_until(function() return proc.read(log):find("listening") end,
                    10, "the listener")
    local t0 = paygate.update_time()
    local res, err = paygate.http.request{
      url = "https://127.0.0.1:" .. port .. "/", connect_timeout = 0.5,
      timeout = 20 }
    local took = paygate.update_time() - t0
    assert.is_nil(res)
    -- the connection phase ends with the handshake: past connect_timeout
    -- it fails timeout, before any request byte (a retry repeats nothing)
    assert.equal("timeout", err.kind, tostring(err) .. " after " .. took
                 .. " s")
    assert.is_false(err.sent)
    assert.is_true(took >= 0.45, "took " .. took .. " s")
    -- connect_timeout (0.5 s), not the total timeout (20 s): room for a
    -- loaded machine
    assert.is_true(took < 10, "took " .. took .. " s: " .. tostring(err))
  end)

  it("classifies a body over max_body", function()
    local res, err = paygate.http.request{ url = plain:url("/big"), max_body = 1000 }
    assert.is_nil(res)
    assert.equal("body_too_large", err.kind)
  end)

  it("classifies a response head too large: a header line past curl's"
     .. " 100 KiB (which curl reports as out of memory) or 256 KiB of"
     .. " header lines, streamed or not", function()
    local proc = require "support.proc"
    local port = core.free_port()
    local log = dir .. "/huge_head.log"
    local p = proc.spawn({ "python3", "spec/support/huge_head.py",
                           tostring(port), log }, { watchdog = true })
    proc.wait_until(function()
      local f = io.open(log)
      local l = f and f:read("*l")
      if f then f:close() end
      return l == "ready"
    end, 10, "huge_head.py")
    local base = "http://127.0.0.1:" .. port
    for _, path in ipairs({ "/line", "/many" }) do
      for _, sink in ipairs({ false, true }) do
        local res, err = paygate.http.request{ url = base .. path,
          sink = sink and function() end or nil }
        assert.is_nil(res)
        assert.equal("header_too_large", err.kind, path .. ": "
                     .. tostring(err))
        assert.matches("the response head is too large", err.message, 1,
                       true)
        assert.is_false(err.retryable)
        assert.is_true(err.sent)
      end
    end
    assert.equal(200, assert(paygate.http.request{ url = base .. "/ok" })
                        .status)
    p:stop()
  end)

  it("reuses connections across requests", function()
    for _ = 1, 20 do
      assert.equal(200, assert(paygate.http.request{ url = plain:url("/reuse") }).status)
    end
    local ports
    require("support.proc").wait_until(function()
      ports = {}
      local n = 0
      for line in plain:logs():gmatch("[^\n]+") do
        if line:find('"path":"/reuse"', 1, true) then
          n = n + 1
          ports[line:match('"remote":"([^"]+)"')] = true
        end
      end
      return n == 20
    end, 5, "20 access lines")
    local distinct = 0
    for _ in pairs(ports) do distinct = distinct + 1 end
    assert.equal(1, distinct)
  end)

  it("close_idle closes the connections kept for reuse, none while a"
     .. " request is under way", function()
    -- /peer answers the client's address: the same one, the same
    -- connection
    local function peer()
      local res = assert(paygate.http.request{ url = plain:url("/peer") })
      assert.equal(200, res.status)
      return res.body
    end
    local first = peer()
    assert.equal(first, peer())                 -- kept alive, reused
    -- a request under way: nothing closed (its connection is in use)
    local slow = paygate.spawn(paygate.http.request,
                               { url = plain:url("/slow") })
    assert.is_false(paygate.http.close_idle())
    assert.equal(200, assert(slow:wait()).status)
    -- none under way: closed, so the next request connects anew
    local again = peer()
    assert.is_true(paygate.http.close_idle())
    local fresh = peer()
    assert.not_equal(again, fresh)
    assert.equal(fresh, peer())                 -- which is kept alive
  end)

  it("runs many requests concurrently from one worker", function()
    local tasks = {}
    for i = 1, 50 do
      tasks[i] = paygate.spawn(paygate.http.request, { url = plain:url("/hi") })
    end
    for i = 1, 50 do assert.equal(200, assert(tasks[i]:wait()).status) end
  end)

  describe("over TLS", function()
    it("talks to a server with a test CA and a client certificate", function()
      local res = assert(paygate.http.request{ url = tls:url("/whoami"),
        ca_file = certs.ca, client_cert = certs.client_cert,
        client_key = certs.client_key })
      assert.equal(200, res.status)
      assert.equal("https", res.body)
    end)

    it("sends bodies small and large, byte for byte", function()
      local big = ("0123456789abcdef"):rep(20000) .. "\0z"
      for _, body in ipairs({ "x", big }) do
        local res = assert(paygate.http.request{ url = tls:url("/echo"),
          body = body, ca_file = certs.ca, client_cert = certs.client_cert,
          client_key = certs.client_key, headers = { ["X-A"] = "1" } })
        assert.equal(200, res.status)
        assert.is_true(res.body == "POST:" .. body, #res.body)
      end
    end)

    it("checks the host name by SNI (localhost resolved to 127.0.0.1)", function()
      local res = assert(paygate.http.request{
        url = "https://localhost:" .. tls.port .. "/whoami",
        resolve = { "localhost:" .. tls.port .. ":127.0.0.1" },
        ca_file = certs.ca, client_cert = certs.client_cert,
        client_key = certs.client_key })
      assert.equal("https", res.body)
    end)

    it("fails with kind tls against an untrusted CA", function()
      local res, err = paygate.http.request{ url = tls:url("/whoami"),
        ca_file = certs.other_ca, client_cert = certs.client_cert,
        client_key = certs.client_key }
      assert.is_nil(res)
      assert.equal("tls", err.kind)
      assert.is_false(err.retryable)
      assert.is_false(err.sent)
    end)

    it("fails tls without repeating a key or CA given as PEM text",
       function()
      -- curl's message quotes the file options as given: a key pasted
      -- where its path belongs would be in the error (and in every log
      -- line or CLI message that shows it)
      local f = assert(io.open(certs.client_key, "rb"))
      local pem = f:read("*a")
      f:close()
      local body = pem:match("\n([%w+/=]+)\n")
      for _, o in ipairs({
        { ca_file = certs.ca, client_cert = certs.client_cert,
          client_key = pem },
        { ca_file = certs.ca, client_cert = pem,
          client_key = certs.client_key },
        { ca_file = pem, client_cert = certs.client_cert,
          client_key = certs.client_key },
      }) do
        -- a host name of its own: no pooled connection (made with the
        -- right key) is reused, so the files are loaded
        o.url = "https://pem-check.test:" .. tls.port .. "/whoami"
        o.resolve = { "pem-check.test:" .. tls.port .. ":127.0.0.1" }
        local res, err = paygate.http.request(o)
        assert.is_nil(res)
        assert.equal("tls", err.kind)
        assert.is_nil(err.message:find(body, 1, true), err.message)
        assert.is_nil(err.message:find("BEGIN", 1, true), err.message)
        assert.truthy(err.message:find("not shown", 1, true), err.message)
      end
    end)

    it("fails tls naming the file option at fault and why", function()
      local notpem = dir .. "/notpem.key"
      local f = assert(io.open(notpem, "wb"))
      f:write("not a key\n")
      f:close()
      local n = 0
      local function try(o)
        n = n + 1
        -- a host name of its own each time: no pooled connection is reused
        local host = "files-" .. n .. ".test"
        o.url = "https://" .. host .. ":" .. tls.port .. "/whoami"
        o.resolve = { host .. ":" .. tls.port .. ":127.0.0.1" }
        local res, err = paygate.http.request(o)
        assert.is_nil(res)
        assert.equal("tls", err.kind)
        return err
      end
      local err = try{ ca_file = certs.ca, client_cert = certs.client_cert,
                       client_key = dir .. "/missing.key" }
      assert.equal("client_key", err.option)
      assert.truthy(err.message:find('client_key "' .. dir
        .. '/missing.key" cannot be read (No such file or directory)', 1,
        true), err.message)
      err = try{ ca_file = certs.ca, client_cert = certs.client_cert,
                 client_key = notpem }
      assert.equal("client_key", err.option)
      assert.truthy(err.message:find("is not PEM", 1, true), err.message)
      err = try{ ca_file = dir .. "/missing-ca.pem",
                 client_cert = certs.client_cert,
                 client_key = certs.client_key }
      assert.equal("ca_file", err.option)
      assert.truthy(err.message:find('ca_file "' .. dir
        .. '/missing-ca.pem" cannot be read', 1, true), err.message)
      -- a folder opens, and then does not read: not "an empty file"
      err = try{ ca_file = certs.ca, client_cert = certs.client_cert,
                 client_key = dir }
      assert.equal("client_key", err.option)
      assert.truthy(err.message:find('client_key "' .. dir
        .. '" cannot be read (Is a directory)', 1, true), err.message)
      -- the files read as PEM: nothing more to say from here (a key that
      -- does not match), and no option is blamed
      err = try{ ca_file = certs.ca, client_cert = certs.client_cert,
                 client_key = certs.server_key }
      assert.is_nil(err.option)
      os.remove(notpem)
    end)

    it("is refused by the server without a client certificate", function()
      local res, err = paygate.http.request{ url = tls:url("/whoami"),
                                             ca_file = certs.ca }
      assert.is_nil(res)
      assert.is_truthy(({ tls = true, closed = true })[err.kind], err.kind)
    end)

    -- libcurl matches a pooled connection on the certificate's path, not
    -- on the key: a request whose key is another one must not go out on
    -- a connection the old key authenticated.
    it("resumes the TLS session on a new connection to the same host",
       function()
      -- each answer closes its connection: the next request must make a
      -- new one, which resumes the first's session (a ticket) instead of
      -- a full handshake (libcurl keeps sessions per easy handle, and
      -- ours live for one request: the shared session cache does it)
      local proc = require "support.proc"
      local port = core.free_port()
      local log = dir .. "/resume.log"
      local srv = proc.spawn({ "python3", "spec/support/tls_resume.py",
        tostring(port), certs.server_cert, certs.server_key, log })
      finally(function() srv:stop() end)
      proc.wait_until(function() return proc.read(log) == "ready\n" end,
                      10, "the TLS server")
      local seen = {}
      for i = 1, 3 do
        local res = assert(paygate.http.request{
          url = ("https://127.0.0.1:%d/"):format(port), ca_file = certs.ca })
        assert.equal(200, res.status)
        seen[i] = res.body
      end
      assert.same({ "reused=False", "reused=True", "reused=True" }, seen)
    end)

    describe("a change of client key", function()
      local proc = require "support.proc"
      local port, whoami_server, whoami_log, a_cert, a_key, b_cert, b_key

      setup(function()
        a_cert, a_key = pki.client(dir, "client-a")
        b_cert, b_key = pki.client(dir, "client-b")
        port = core.free_port()
        local log = dir .. "/whoami.log"
        whoami_server = proc.spawn({ "python3", "spec/support/mtls_whoami.py",
          tostring(port), certs.server_cert, certs.server_key, certs.ca,
          log })
        proc.wait_until(function() return proc.read(log) == "ready\n" end,
                        10, "the mutual-TLS server")
        whoami_log = log
      end)

      teardown(function()
        if whoami_server then whoami_server:stop() end
      end)

      local function copy(from, to)
        proc.write(to, proc.read(from))
      end

      -- "cn=<client CN> conn=<server's connection number>"
      local function whoami(cert, key)
        local res = assert(paygate.http.request{
          url = ("https://127.0.0.1:%d/"):format(port), ca_file = certs.ca,
          client_cert = cert, client_key = key })
        assert.equal(200, res.status)
        local cn, conn = res.body:match("^cn=(%S+) conn=(%d+)$")
        return cn, tonumber(conn)
      end

      it("another key file (the certificate's file rewritten): a new"
         .. " connection", function()
        local cert = dir .. "/rotated.pem"
        copy(a_cert, cert)
        local cn, first = whoami(cert, a_key)
        assert.equal("client-a", cn)
        local _, again = whoami(cert, a_key)
        assert.equal(first, again)          -- the same key: pooled
        copy(b_cert, cert)
        local cn2, conn2 = whoami(cert, b_key)
        assert.equal("client-b", cn2)
        assert.is_true(conn2 > first)
        -- and the first key's connection is still there for it
        copy(a_cert, cert)
        local cn3, conn3 = whoami(cert, a_key)
        assert.equal("client-a", cn3)
        assert.equal(first, conn3)
      end)

      it("the same files with another key in them: a new connection",
         function()
        local cert, key = dir .. "/inplace.pem", dir .. "/inplace.key"
        copy(a_cert, cert)
        copy(a_key, key)
        assert.equal("client-a", (whoami(cert, key)))
        copy(b_cert, cert)
        copy(b_key, key)
        assert.equal("client-b", (whoami(cert, key)))
      end)

      it("keeps the pools of 16 identities: the least recently used"
         .. " beyond them is closed", function()
        local conns = {}
        for i = 1, 17 do
          local cert, key = dir .. "/pool" .. i .. ".pem",
                            dir .. "/pool" .. i .. ".key"
          copy(a_cert, cert)
          copy(a_key, key)
          local _, conn = whoami(cert, key)
          conns[i] = conn
        end
        -- the 17th identity closed the first one's idle connection
        proc.wait_until(function()
          return proc.read(whoami_log):find("\nclosed " .. conns[1] .. "\n",
                                            1, true)
        end, 10, "the first identity's connection closed")
        local _, again = whoami(dir .. "/pool17.pem", dir .. "/pool17.key")
        assert.equal(conns[17], again)
        local _, first = whoami(dir .. "/pool1.pem", dir .. "/pool1.key")
        assert.is_true(first > conns[17])
      end)

      -- identities in use at once are all pooled (none is idle to close);
      -- once they are idle, the next new identity closes every idle pool
      -- beyond the 16 most recently used, not only the oldest
      it("closes every idle pool beyond 16 after a burst of identities in"
         .. " use at once", function()
        local N, conns, done = 20, {}, 0
        for i = 1, N do
          local cert, key = dir .. "/burst" .. i .. ".pem",
                            dir .. "/burst" .. i .. ".key"
          copy(a_cert, cert)
          copy(a_key, key)
        end
        for i = 1, N do
          paygate.spawn(function()
            local ok, _, conn = pcall(whoami, dir .. "/burst" .. i .. ".pem",
                                      dir .. "/burst" .. i .. ".key")
            conns[i] = ok and conn or tostring(_)
            done = done + 1
          end)
        end
        proc.wait_until(function() return done == N end, 20, "the burst")
        for i = 1, N do
          assert.equal("number", type(conns[i]), tostring(conns[i]))
        end
        local cert, key = dir .. "/burst-next.pem", dir .. "/burst-next.key"
        copy(a_cert, cert)
        copy(a_key, key)
        whoami(cert, key)
        -- 21 identities, 16 kept: the five least recently used closed
        for k = 1, 5 do
          local conn = conns[k]
          proc.wait_until(function()
            return proc.read(whoami_log):find("\nclosed " .. conn .. "\n",
                                              1, true)
          end, 10, "connection " .. conn .. " (burst identity " .. k
                   .. ") closed")
        end
      end)
    end)
  end)
end)
