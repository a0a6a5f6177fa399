-- spec/support/rawtcp.lua: a plain TCP client for sending exact bytes
-- (malformed requests, pipelining, slow clients). Calls block with a
-- receive timeout; the server under test is another process.
local ffi = require "ffi"

pcall(ffi.cdef, [[
struct gw_sockaddr_in { unsigned short family; unsigned short port;
                        unsigned int addr; char zero[8]; };
struct gw_timeval { long tv_sec; long tv_usec; };
int socket(int domain, int type, int protocol);
int connect(int fd, const void *addr, unsigned int len);
long send(int fd, const void *buf, unsigned long len, int flags);
long recv(int fd, void *buf, unsigned long len, int flags);
int close(int fd);
int setsockopt(int fd, int level, int name, const void *val, unsigned int len);
int shutdown(int fd, int how);
unsigned short htons(unsigned short v);
]])
local C = ffi.C

local _M = {}
local Conn = {}
Conn.__index = Conn

-- rcvbuf: SO_RCVBUF set before connecting (a small window, for clients
-- that read slowly or not at all)
function _M.connect(port, timeout, rcvbuf)
  local fd = C.socket(2, 1, 0)
  assert(fd >= 0, "socket")
  if rcvbuf then
    local v = ffi.new("int[1]", rcvbuf)
    C.setsockopt(fd, 1, 8, v, 4)                   -- SO_RCVBUF
  end
  local tv = ffi.new("struct gw_timeval", { math.floor(timeout or 5),
    math.floor(((timeout or 5) % 1) * 1e6) })
  C.setsockopt(fd, 1, 20, tv, ffi.sizeof(tv))   -- SO_RCVTIMEO
  local a = ffi.new("struct gw_sockaddr_in")
  a.family = 2
  a.port = C.htons(port)
  a.addr = 0x0100007f                              -- 127.0.0.1
  if C.connect(fd, a, ffi.sizeof(a)) ~= 0 then
    C.close(fd)
    return nil, "connect failed"
  end
  return setmetatable({ fd = fd }, Conn)
end

function Conn:send(s)
  local off = 0
  while off < #s do
    local n = C.send(self.fd, ffi.cast("const char *", s) + off, #s - off,
                     0x4000)  -- MSG_NOSIGNAL
    if n <= 0 then return nil, "send failed" end
    off = off + n
  end
  return true
end

--- conn:recv_all() -> everything until the peer closes or the timeout,
-- and how it ended: "eof" (the peer's FIN), "reset" (ECONNRESET),
-- "timeout" or "errno N"
function Conn:recv_all()
  local parts, buf = {}, ffi.new("char[65536]")
  local how
  while true do
    local n = C.recv(self.fd, buf, 65536, 0)
    if n == 0 then
      how = "eof"
      break
    elseif n < 0 then
      local e = ffi.errno()
      how = e == 104 and "reset" or (e == 11 and "timeout")
            or ("errno " .. e)
      break
    end
    parts[#parts + 1] = ffi.string(buf, n)
  end
  return table.concat(parts), how
end

--- conn:recv_some() -> what one recv returns ("" on close/timeout)
function Conn:recv_some()
  local buf = ffi.new("char[65536]")
  local n = C.recv(self.fd, buf, 65536, 0)
  if n <= 0 then return "" end
  return ffi.string(buf, n)
end

function Conn:close()
  if self.fd then C.close(self.fd); self.fd = nil end
end

return _M
