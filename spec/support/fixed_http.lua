-- spec/support/fixed_http.lua: run with `paygate exec` as a child process:
--   fixed_http.lua PORT DATE N
-- answers N connections on 127.0.0.1:PORT with a 401 whose Date header is
-- DATE (a server whose clock is off), then exits. Blocking sockets: it is
-- its own process.
local ffi = require "ffi"
pcall(ffi.cdef, [[
struct gw_sockaddr_in { unsigned short family; unsigned short port;
                        unsigned int addr; char zero[8]; };
int socket(int domain, int type, int protocol);
int bind(int fd, const void *addr, unsigned int len);
int listen(int fd, int backlog);
int accept(int fd, void *addr, void *len);
long send(int fd, const void *buf, unsigned long len, int flags);
long recv(int fd, void *buf, unsigned long len, int flags);
int close(int fd);
int setsockopt(int fd, int level, int name, const void *val, unsigned int len);
unsigned short htons(unsigned short v);
]])
local C = ffi.C
local port, date, n = tonumber(arg[1]), arg[2], tonumber(arg[3] or 1)
local fd = C.socket(2, 1, 0)
local one = ffi.new("int[1]", 1)
C.setsockopt(fd, 1, 2, one, 4)                  -- SO_REUSEADDR
local sa = ffi.new("struct gw_sockaddr_in")
sa.family, sa.port, sa.addr = 2, C.htons(port), 0x0100007F
assert(C.bind(fd, sa, ffi.sizeof(sa)) == 0, "bind")
assert(C.listen(fd, 8) == 0, "listen")
local reply = "HTTP/1.1 401 Unauthorized\r\nDate: " .. date
  .. "\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
local buf = ffi.new("char[4096]")
for _ = 1, n do
  local c = C.accept(fd, nil, nil)
  if c >= 0 then
    C.recv(c, buf, 4096, 0)
    C.send(c, reply, #reply, 0)
    C.close(c)
  end
end
C.close(fd)
return 0
