-- spec/support/sdnotify.lua: systemd's end of sd_notify(3) for specs: a
-- unix datagram socket bound where NOTIFY_SOCKET is to name it (a path,
-- or "@name" for an abstract one), and the datagrams it has received,
-- each kept as its text and its KEY=VALUE fields.
local ffi = require "ffi"
local proc = require "support.proc"

for _, decl in ipairs{
  "struct gw_sd_sockaddr_un { unsigned short family; char path[108]; };",
  "int socket(int domain, int type, int protocol);",
  "int bind(int fd, const void *addr, unsigned int len);",
  "long recv(int fd, void *buf, unsigned long len, int flags);",
  "long sendto(int fd, const void *buf, unsigned long len, int flags, "
    .. "const void *addr, unsigned int alen);",
  "int close(int fd);",
} do
  pcall(ffi.cdef, decl)
end

local C = ffi.C
local AF_UNIX, SOCK_DGRAM = 1, 2
local SOCK_NONBLOCK, SOCK_CLOEXEC = 2048, 524288

local _M = {}
local Listener = {}
Listener.__index = Listener

-- addr's sockaddr_un and its length
local function sockaddr(addr)
  local sa = ffi.new("struct gw_sd_sockaddr_un")
  sa.family = AF_UNIX
  ffi.copy(sa.path, addr, #addr)
  local len = 2 + #addr + 1
  if addr:sub(1, 1) == "@" then
    sa.path[0] = 0          -- abstract: no NUL after the name
    len = 2 + #addr
  end
  return sa, len
end

--- syntax: l = sdnotify.listen(addr)
-- addr: a path ("/tmp/.../notify"), or "@" and an abstract name.
-- returns: the listener (l.addr is what NOTIFY_SOCKET takes); raises
-- when the socket cannot be made or bound.
function _M.listen(addr)
  assert(#addr < 108, "sdnotify.listen: the address is too long")
  local fd = C.socket(AF_UNIX, SOCK_DGRAM + SOCK_NONBLOCK + SOCK_CLOEXEC, 0)
  assert(fd >= 0, "sdnotify.listen: socket() failed")
  local sa, len = sockaddr(addr)
  if C.bind(fd, sa, len) ~= 0 then
    C.close(fd)
    error("sdnotify.listen: cannot bind " .. addr, 2)
  end
  return setmetatable({ fd = fd, addr = addr, got = {} }, Listener)
end

--- syntax: got = l:read()
-- the datagrams received so far, in order, each { text = "READY=1\n...",
-- READY = "1", ... } (arrived ones are read without waiting).
function Listener:read()
  local buf = ffi.new("char[4096]")
  while self.fd do
    local n = tonumber(C.recv(self.fd, buf, 4096, 0))
    if n <= 0 then break end
    local text = ffi.string(buf, n)
    local msg = { text = text }
    for k, v in text:gmatch("([%u_]+)=([^\n]*)") do msg[k] = v end
    self.got[#self.got + 1] = msg
  end
  return self.got
end

--- syntax: msg, i = l:wait(pred[, from[, timeout[, what]]])
-- yields: until a datagram from index `from` (1) on satisfies pred(msg).
-- returns: that datagram and its index; raises at the deadline (10 s),
-- naming every datagram received.
function Listener:wait(pred, from, timeout, what)
  local ok, found = pcall(proc.wait_until, function()
    local got = self:read()
    for i = from or 1, #got do
      if pred(got[i]) then return { got[i], i } end
    end
    return false, self:texts()
  end, timeout or 10, what or "a notify datagram")
  if not ok then     -- said where the spec waited
    error((tostring(found):gsub("^[^:]*:%d+: ", "")), 2)
  end
  return found[1], found[2]
end

--- syntax: s = l:texts() -- every datagram so far, one a line, for a
-- failure's message
function Listener:texts()
  local t = {}
  for i, msg in ipairs(self.got) do
    t[i] = ("%d: %s"):format(i, msg.text:gsub("\n", " | "))
  end
  return table.concat(t, "; ")
end

--- syntax: n = l:fill()
-- fills the listener's receive queue (as a busy systemd leaves its own)
-- with datagrams "FILL=1" until a sender would have to wait; returns how
-- many it took. l:read() then drains them (and what came after).
function Listener:fill()
  local fd = C.socket(AF_UNIX, SOCK_DGRAM + SOCK_NONBLOCK + SOCK_CLOEXEC, 0)
  assert(fd >= 0, "sdnotify.fill: socket() failed")
  local sa, len = sockaddr(self.addr)
  local n = 0
  while C.sendto(fd, "FILL=1", 6, 0, sa, len) == 6 do
    n = n + 1
    assert(n < 100000, "sdnotify.fill: the queue never filled")
  end
  C.close(fd)
  return n
end

--- syntax: l:close() -- safe to call twice
function Listener:close()
  if self.fd then
    C.close(self.fd)
    self.fd = nil
  end
end

return _M
