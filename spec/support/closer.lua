-- spec/support/closer.lua: a TCP server that accepts, reads the request and
-- closes without answering -- a peer that hangs up. Run it as a process:
--   paygate exec spec/support/closer.lua PORT COUNT
-- It serves COUNT connections, then exits (bounded by design).
--   paygate exec spec/support/closer.lua PORT SECONDS hold
-- listens with the smallest backlog and never accepts, for SECONDS: once
-- its queue is full, new connections get no SYN-ACK (a connect timeout).
--   paygate exec spec/support/closer.lua PORT SECONDS silent
-- listens (backlog 16) and never accepts, for SECONDS: the kernel completes
-- each TCP connect, and nothing ever answers on it (a TLS ClientHello sits
-- unanswered: a handshake that never ends).
local ffi = require "ffi"

pcall(ffi.cdef, [[
struct gw_sockaddr_in { unsigned short family; unsigned short port;
                        unsigned int addr; char zero[8]; };
int socket(int domain, int type, int protocol);
int bind(int fd, const void *addr, unsigned int len);
int listen(int fd, int backlog);
int accept(int fd, void *addr, void *len);
long recv(int fd, void *buf, unsigned long len, int flags);
int close(int fd);
int setsockopt(int fd, int level, int name, const void *val, unsigned int len);
unsigned short htons(unsigned short v);
]])
local C = ffi.C
local port, count = tonumber(arg[1]), tonumber(arg[2] or 1)
local fd = C.socket(2, 1, 0)
local one = ffi.new("int[1]", 1)
C.setsockopt(fd, 1, 2, one, 4)                   -- SO_REUSEADDR
local a = ffi.new("struct gw_sockaddr_in")
a.family, a.port, a.addr = 2, C.htons(port), 0x0100007f
assert(C.bind(fd, a, ffi.sizeof(a)) == 0, "bind")
local hold = arg[3] == "hold"
local silent = arg[3] == "silent"
assert(C.listen(fd, hold and 0 or 16) == 0, "listen")
io.stdout:write("listening\n")
io.stdout:flush()
if hold or silent then
  os.execute("sleep " .. count)   -- never accept; the test kills us sooner
  os.exit(0)
end
local buf = ffi.new("char[4096]")
for _ = 1, count do
  local c = C.accept(fd, nil, nil)
  if c >= 0 then
    C.recv(c, buf, 4096, 0)
    C.close(c)
  end
end
C.close(fd)
