-- spec/support/hammer.lua: clients that send GET requests without pause
-- while a spec changes the server under them (a reload, an upgrade), each
-- on a raw non-blocking socket driven by poll() in the spec's process (no
-- client library retries a failed request behind our back): every
-- connection refused, reset or closed without a whole answer is a failure.
local ffi = require "ffi"
local paygate = require "paygate"
local pn = require "support.pollnet"
local C, parse = pn.C, pn.parse

local _M = {}

-- One client: GET o.path (/version) one request at a time, on keep-alive
-- connections (kept until the server closes them) or fresh ones.
local Client = {}
Client.__index = Client

function Client:fail(why)
  self.failures[#self.failures + 1] = ("%s (%s, %d bytes: %q)"):format(why,
    self.keep_alive and "keep-alive" or "close", #self.got,
    self.got:sub(1, 40))
  self:close()
end

function Client:close()
  if self.fd >= 0 then C.close(self.fd) end
  self.fd, self.state = -1, "idle"
end

function Client:start(now)
  self.got, self.deadline = "", now + 15
  if self.fd >= 0 then return self:send() end
  local fd = C.socket(pn.AF_INET, pn.SOCK_STREAM + pn.SOCK_NONBLOCK, 0)
  assert(fd >= 0, "socket")
  local a = pn.loopback(self.port)
  self.fd, self.state = fd, "connecting"
  if C.connect(fd, a, ffi.sizeof(a)) ~= 0
     and ffi.errno() ~= pn.EINPROGRESS then
    return self:fail("connect: errno " .. ffi.errno())
  end
end

function Client:send()
  local req = "GET " .. self.path .. " HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              .. (self.keep_alive and "" or "Connection: close\r\n") .. "\r\n"
  if C.send(self.fd, req, #req, pn.MSG_NOSIGNAL) ~= #req then
    return self:fail("send: errno " .. ffi.errno())
  end
  self.state = "reading"
end

function Client:on_event()
  if self.state == "connecting" then
    local err, len = ffi.new("int[1]"), ffi.new("unsigned int[1]", 4)
    C.getsockopt(self.fd, pn.SOL_SOCKET, pn.SO_ERROR, err, len)
    if err[0] ~= 0 then return self:fail("connect: errno " .. err[0]) end
    return self:send()
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
    if eof then
      return self:fail(self.got == "" and "closed without an answer"
                       or "closed mid-answer")
    end
    return
  end
  if status ~= 200 then return self:fail("answer " .. status) end
  self.answers[body] = (self.answers[body] or 0) + 1
  if closes or not self.keep_alive then
    self:close()
  else
    self.state = "idle"
  end
end

--- syntax: answers, failures = hammer.hammer(s, o, during)
-- Drives o.close fresh-connection and o.keep keep-alive clients (GET
-- o.path, default /version) against s.port while during(t) returns true
-- (t: s since the start; called every turn, it may start things), then
-- lets the requests in progress finish. Returns the answers counted by
-- body, and the failures (strings).
function _M.hammer(s, o, during)
  local clients, failures, answers = {}, {}, {}
  for i = 1, o.close + o.keep do
    clients[i] = setmetatable({ port = s.port, keep_alive = i > o.close,
      path = o.path or "/version",
      fd = -1, state = "idle", failures = failures, answers = answers },
      Client)
  end
  local pfds = pn.pollfds(#clients)
  local t0, running = paygate.update_time(), true
  while true do
    local now = paygate.update_time()
    assert(now - t0 < 90, "the clients ran for 90 s")
    running = running and during(now - t0)
    local busy = false
    for i, c in ipairs(clients) do
      if c.state == "idle" and running then c:start(now) end
      if c.state ~= "idle" and now > c.deadline then
        c:fail("no answer in time")
      end
      busy = busy or c.state ~= "idle"
      pfds[i - 1].fd = c.state == "idle" and -1 or c.fd
      pfds[i - 1].events = c.state == "connecting" and pn.POLLOUT or pn.POLLIN
      pfds[i - 1].revents = 0
    end
    if not running and not busy then break end
    if C.poll(pfds, #clients, 10) > 0 then
      for i, c in ipairs(clients) do
        if pfds[i - 1].revents ~= 0 and c.fd == pfds[i - 1].fd then
          c:on_event()
        end
      end
    end
  end
  for _, c in ipairs(clients) do c:close() end
  return answers, failures
end

return _M
