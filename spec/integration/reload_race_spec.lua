-- Reloads lose nothing: requests on fresh connections (Connection: close)
-- and on keep-alive connections, sent without pause while generation after
-- generation takes over, each get a whole answer. A connection the kernel
-- completed is a request on its way: whichever worker holds it must answer
-- it, never close it unanswered ("Empty reply from server"), even when its
-- first request comes late (a client descheduled, slowed by ASan, doing a
-- TLS handshake): DRAIN_LINGER is for idle keep-alive connections only.
--
-- The clients are raw non-blocking sockets driven by poll() in this
-- process: no client library retries a failed request behind our back,
-- and every request goes on the connection we chose for it.
local ffi = require "ffi"
local server = require "support.server"
local proc = require "support.proc"
local paygate = require "paygate"

local pn = require "support.pollnet"
local C, parse = pn.C, pn.parse

local function app_source(version)
  return ([[
local paygate = require "paygate"
paygate.route("GET", "/version", function() return 200, %q end)
]]):format(version)
end

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

-- One client: a connection sending GET /version one request at a time.
-- keep_alive: requests follow each other on the connection until the
-- server answers with Connection: close; otherwise every request asks for
-- Connection: close and the next one opens a new connection.
local Client = {}
Client.__index = Client

local function new_client(port, keep_alive, pause)
  return setmetatable({ port = port, keep_alive = keep_alive, fd = -1,
                        pause = pause or 0, state = "idle" }, Client)
end

function Client:fail(why)
  self.failures[#self.failures + 1] = ("%s (%s%s, %d bytes: %q)"):format(why,
    self.keep_alive and "keep-alive" or "close",
    self.pause > 0 and ", slow" or "", #self.got, self.got:sub(1, 40))
  self:close()
end

function Client:close()
  if self.fd >= 0 then C.close(self.fd) end
  self.fd, self.state = -1, "idle"
end

-- starts a request (opening a connection when there is none)
function Client:start(now)
  self.got, self.deadline = "", now + 15
  if self.fd < 0 then
    local fd = C.socket(pn.AF_INET, pn.SOCK_STREAM + pn.SOCK_NONBLOCK, 0)
    assert(fd >= 0, "socket")
    local a = pn.loopback(self.port)
    self.fd = fd
    if C.connect(fd, a, ffi.sizeof(a)) ~= 0
       and ffi.errno() ~= pn.EINPROGRESS then
      return self:fail("connect: errno " .. ffi.errno())
    end
    self.state = "connecting"
    return
  end
  self:send()
end

function Client:send()
  local req = "GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              .. (self.keep_alive and "" or "Connection: close\r\n") .. "\r\n"
  local n = C.send(self.fd, req, #req, pn.MSG_NOSIGNAL)
  if n ~= #req then     -- a few bytes into an empty socket buffer
    return self:fail("send: errno " .. ffi.errno())
  end
  self.state = "reading"
end

function Client:on_event(revents, now)
  if self.state == "connecting" then
    local err, len = ffi.new("int[1]"), ffi.new("unsigned int[1]", 4)
    C.getsockopt(self.fd, pn.SOL_SOCKET, pn.SO_ERROR, err, len)
    if err[0] ~= 0 then
      return self:fail("connect: errno " .. err[0])
    end
    if self.pause > 0 then
      self.state, self.send_at = "pausing", now + self.pause
      return
    end
    return self:send()
  end
  if self.state == "pausing" then
    -- readable before we sent anything: the server closed (or reset) a
    -- connection it accepted, with no request read
    return self:fail("closed before the request was sent")
  end
  local buf, eof = ffi.new("char[4096]"), false
  while true do
    local n = C.recv(self.fd, buf, 4096, 0)
    if n > 0 then
      self.got = self.got .. ffi.string(buf, n)
    elseif n == 0 then
      eof = true
      break
    else
      local e = ffi.errno()
      if e == pn.EAGAIN then break end
      if e ~= pn.EINTR then return self:fail("recv: errno " .. e) end
    end
  end
  local status, body, closes = parse(self.got)
  if status == nil then
    -- not whole yet: an EOF now is a request the server dropped
    if eof then
      return self:fail(self.got == "" and "closed without an answer"
                       or "closed mid-answer")
    end
    return
  end
  if status ~= 200 or not body:match("^v%d+$") then
    return self:fail("answer " .. tostring(status))
  end
  self.done = self.done + 1
  if closes or not self.keep_alive then
    self:close()
  else
    self.state = "idle"
  end
end

-- How many reloads the master has finished (PID_FILE.reload's count).
local function reloads_done(s)
  local text = proc.read(s.dir .. "/paygate.pid.reload") or ""
  local n, what = text:match("^(%d+) (%a+)")
  assert(what == nil or what == "ok" or what == "started"
         or what == "loading",
         "a reload was refused: " .. text)
  return tonumber(n) or 0
end

-- Drives clients against s while o.reloads reloads happen one after the
-- other, o.gap s apart: o.close clients on fresh connections, o.keep on
-- keep-alive ones, o.slow fresh ones that send their request o.pause s
-- after connecting. Returns the requests answered (by kind) and failures.
local function hammer(s, o)
  local clients, failures, counts = {}, {}, {}
  local function add(n, kind, keep_alive, pause)
    for _ = 1, n do
      local c = new_client(s.port, keep_alive, pause)
      c.failures, c.done, c.kind = failures, 0, kind
      clients[#clients + 1] = c
    end
  end
  add(o.close, "close", false)
  add(o.keep, "keep", true)
  add(o.slow or 0, "slow", false, o.pause)
  local limit = o.limit or 120
  local pfds = pn.pollfds(#clients)
  local t0 = paygate.update_time()
  local sent_hups, settled_at, done_at = 0, nil, t0
  while true do
    local now = paygate.update_time()
    assert(now - t0 < limit, ("%d of %d reloads in %d s"):format(
      reloads_done(s), o.reloads, limit))
    local finished = reloads_done(s)
    if finished >= sent_hups and done_at == nil then done_at = now end
    if finished >= o.reloads then
      -- then long enough for the last clients' requests to be answered
      settled_at = settled_at or now
      if now - settled_at > (o.pause or 0) + 0.5 then break end
    elseif sent_hups == finished and now - done_at >= o.gap then
      -- the next reload, the previous one done and the clients busy
      sent_hups = sent_hups + 1
      done_at = nil
      s:signal(proc.SIGHUP)
    end
    for i, c in ipairs(clients) do
      if c.state == "idle" then c:start(now) end
      if c.state == "pausing" and now >= c.send_at then c:send() end
      if c.state ~= "idle" and now > c.deadline then
        c:fail("no answer in time")
      end
      pfds[i - 1].fd = c.fd
      pfds[i - 1].events = c.state == "connecting" and pn.POLLOUT or pn.POLLIN
      pfds[i - 1].revents = 0
    end
    if C.poll(pfds, #clients, 10) > 0 then
      now = paygate.update_time()
      for i, c in ipairs(clients) do
        if pfds[i - 1].revents ~= 0 and c.fd == pfds[i - 1].fd then
          c:on_event(pfds[i - 1].revents, now)
        end
      end
    end
  end
  for _, c in ipairs(clients) do
    c:close()
    counts[c.kind] = (counts[c.kind] or 0) + c.done
  end
  return counts, failures
end

-- The listening socket's accept queue length (/proc/net/tcp: rx_queue of
-- the socket in LISTEN on port), or nil when there is none.
local function accept_queue(port)
  for line in io.lines("/proc/net/tcp") do
    local lport, st, rxq = line:match(
      "^%s*%d+: %x+:(%x+) %x+:%x+ (%x%x) %x+:(%x+)")
    if lport and tonumber(lport, 16) == port and st == "0A" then
      return tonumber(rxq, 16)
    end
  end
end

describe("requests sent while reloads happen", function()
  local s
  after_each(function() if s then s:stop(); s = nil end end)

  it("each get a whole answer, on fresh and keep-alive connections", function()
    s = server.start{ source = app_source("v1"), workers = 2,
                      args = { "--no-access-log" } }
    write(s.app .. "/app.lua", app_source("v2"))
    -- slow: their request comes 1.5 s after the connection, past the 1 s
    -- an idle keep-alive connection is given once its worker drains
    local counts, failures = hammer(s, { close = 24, keep = 8, slow = 6,
      pause = 1.5, reloads = 8, gap = 0.3 })
    assert.same({}, failures)
    assert.is_true((counts.close or 0) > 200 and (counts.keep or 0) > 200
                   and (counts.slow or 0) >= 6,
      ("too few requests: %d close, %d keep-alive, %d slow"):format(
        counts.close or 0, counts.keep or 0, counts.slow or 0))
  end)

  it("answers a late first request on a connection the old worker accepted",
     function()
    s = server.start{ source = app_source("v1"), workers = 1 }
    write(s.app .. "/app.lua", app_source("v2"))
    local c = new_client(s.port, false, 3600)
    c.failures, c.done = {}, 0
    c:start(paygate.update_time())
    local pfd = pn.pollfds(1)
    pfd[0].fd, pfd[0].events = c.fd, pn.POLLOUT
    assert.equal(1, C.poll(pfd, 1, 5000), "connect")
    c:on_event(pfd[0].revents, paygate.update_time())
    assert.equal("pausing", c.state)
    -- the one worker has taken it from the accept queue
    proc.wait_until(function() return accept_queue(s.port) == 0 end, 10,
                    "the worker to accept the connection")
    s:signal(proc.SIGHUP)
    proc.wait_until(function() return reloads_done(s) == 1 end, 30,
                    "the reload")
    -- generation 2 serves; generation 1 drains and holds our connection:
    -- it must not close it for want of a request within DRAIN_LINGER
    pfd[0].events, pfd[0].revents = pn.POLLIN, 0
    assert.equal(0, C.poll(pfd, 1, 2000),
                 "the draining worker closed a connection it accepted")
    c:send()
    while c.state == "reading" do
      pfd[0].revents = 0
      assert.equal(1, C.poll(pfd, 1, 10000), "no answer")
      c:on_event(pfd[0].revents, paygate.update_time())
    end
    assert.same({}, c.failures)
    assert.equal(1, c.done)
    -- answered by the worker that accepted it, on its code
    assert.matches("v1$", c.got)
    assert.matches("\r\n[Cc]onnection: close\r\n", c.got)
  end)

  it("lets a new TLS connection finish a slow handshake while its worker drains",
     function()
    for _, decl in ipairs{
      "typedef struct ssl_st SSL;", "typedef struct ssl_ctx_st SSL_CTX;",
      "typedef struct ssl_method_st SSL_METHOD;",
      "const SSL_METHOD *TLS_client_method(void);",
      "SSL_CTX *SSL_CTX_new(const SSL_METHOD *m);",
      "void SSL_CTX_free(SSL_CTX *ctx);", "SSL *SSL_new(SSL_CTX *ctx);",
      "void SSL_free(SSL *s);", "int SSL_set_fd(SSL *s, int fd);",
      "int SSL_connect(SSL *s);", "int SSL_get_error(const SSL *s, int r);",
      "int SSL_write(SSL *s, const void *buf, int n);",
      "int SSL_read(SSL *s, void *buf, int n);",
    } do
      pcall(ffi.cdef, decl)
    end
    local pki = require "support.pki"
    local dir = server.tmpdir()
    local certs = pki.make(dir)
    finally(function() os.execute("rm -rf " .. dir) end)
    s = server.start{ source = app_source("v1"), workers = 1, scheme = "https",
      ca_file = certs.ca, args = { "--tls-cert", certs.server_cert,
                                   "--tls-key", certs.server_key } }
    write(s.app .. "/app.lua", app_source("v2"))
    local c = new_client(s.port, false, 3600)
    c.failures, c.done = {}, 0
    c:start(paygate.update_time())
    local pfd = pn.pollfds(1)
    local function wait(events, ms)
      pfd[0].fd, pfd[0].events, pfd[0].revents = c.fd, events, 0
      return C.poll(pfd, 1, ms)
    end
    assert.equal(1, wait(pn.POLLOUT, 5000), "connect")
    proc.wait_until(function() return accept_queue(s.port) == 0 end, 10,
                    "the worker to accept the connection")
    s:signal(proc.SIGHUP)
    proc.wait_until(function() return reloads_done(s) == 1 end, 30,
                    "the reload")
    -- the handshake starts while the worker drains: our ClientHello, its
    -- answer; then this client is slow to go on, past DRAIN_LINGER
    local ctx = C.SSL_CTX_new(C.TLS_client_method())   -- verifies nothing
    local ssl = C.SSL_new(ctx)
    finally(function() C.SSL_free(ssl); C.SSL_CTX_free(ctx) end)
    C.SSL_set_fd(ssl, c.fd)
    local r = C.SSL_connect(ssl)
    if r ~= 1 then
      assert.equal(2, C.SSL_get_error(ssl, r))          -- SSL_ERROR_WANT_READ
      assert.equal(1, wait(pn.POLLIN, 5000), "the server's handshake answer")
    end
    paygate.sleep(1.5)           -- the slow client (not a wait for a state)
    while r ~= 1 do
      r = C.SSL_connect(ssl)
      if r ~= 1 and (C.SSL_get_error(ssl, r) ~= 2
                     or wait(pn.POLLIN, 5000) ~= 1) then
        break
      end
    end
    assert.equal(1, r, "the handshake failed: the server closed it")
    local req = "GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert.equal(#req, C.SSL_write(ssl, req, #req), "the server closed it")
    local buf, got = ffi.new("char[4096]"), ""
    while not parse(got) do
      local n = C.SSL_read(ssl, buf, 4096)
      if n > 0 then
        got = got .. ffi.string(buf, n)
      elseif C.SSL_get_error(ssl, n) ~= 2 or wait(pn.POLLIN, 10000) ~= 1 then
        break
      end
    end
    local status, body = parse(got)
    assert.equal(200, status, ("answer: %q"):format(got))
    assert.equal("v1", body)
    c:close()
  end)
end)
