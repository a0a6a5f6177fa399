-- spec/support/resetter.lua: an HTTP/1.1 server that resets a reused
-- keep-alive connection after reading a request whole. Run it as a
-- process:
--   paygate exec spec/support/resetter.lua PORT LOG SECONDS
-- On 127.0.0.1:PORT, the first request of each connection is answered
-- 200 (keep-alive, body "ok N": N counts the requests seen); a later
-- request on the same connection to a path starting with /reset is read
-- whole (head and Content-Length body), logged, and the connection is
-- reset (RST) without a byte of an answer: a server that acted on a
-- request and then lost the connection. Any other later request is
-- answered 200. Every request whole is appended to LOG as one line
-- "METHOD PATH BODY" before it is answered or reset. Exits after SECONDS
-- (bounded by design; the test kills it sooner).
local ffi = require "ffi"

pcall(ffi.cdef, [[
struct gw_sockaddr_in { unsigned short family; unsigned short port;
                        unsigned int addr; char zero[8]; };
struct gw_pollfd { int fd; short events; short revents; };
struct gw_linger { int l_onoff; int l_linger; };
int socket(int domain, int type, int protocol);
int bind(int fd, const void *addr, unsigned int len);
int listen(int fd, int backlog);
int accept(int fd, void *addr, void *len);
long send(int fd, const void *buf, unsigned long len, int flags);
long recv(int fd, void *buf, unsigned long len, int flags);
int close(int fd);
int setsockopt(int fd, int level, int name, const void *val, unsigned int len);
int poll(struct gw_pollfd *fds, unsigned long n, int timeout);
unsigned short htons(unsigned short v);
]])
local C = ffi.C
local port, logpath = tonumber(arg[1]), arg[2]
local until_t = os.time() + tonumber(arg[3] or 60)

local lfd = C.socket(2, 1, 0)
local one = ffi.new("int[1]", 1)
C.setsockopt(lfd, 1, 2, one, 4)                  -- SO_REUSEADDR
local sa = ffi.new("struct gw_sockaddr_in")
sa.family, sa.port, sa.addr = 2, C.htons(port), 0x0100007F
assert(C.bind(lfd, sa, ffi.sizeof(sa)) == 0, "bind")
assert(C.listen(lfd, 16) == 0, "listen")
io.stdout:write("listening\n")
io.stdout:flush()

local conns = {}                 -- fd -> { buf = string, served = n }
local seen = 0
local buf = ffi.new("char[65536]")

local function log(line)
  local f = assert(io.open(logpath, "a"))
  f:write(line, "\n")
  f:close()
end

local function send_all(fd, s)
  local off = 0
  while off < #s do
    local n = C.send(fd, ffi.cast("const char *", s) + off, #s - off,
                     0x4000)                     -- MSG_NOSIGNAL
    if n <= 0 then return false end
    off = off + n
  end
  return true
end

local function reset(fd)
  local l = ffi.new("struct gw_linger", { 1, 0 })
  C.setsockopt(fd, 1, 13, l, ffi.sizeof(l))      -- SO_LINGER 0: RST
  C.close(fd)
  conns[fd] = nil
end

-- Serves every whole request in c.buf; false once the connection is gone.
local function serve(fd, c)
  while true do
    local head_end = c.buf:find("\r\n\r\n", 1, true)
    if not head_end then return true end
    local head = c.buf:sub(1, head_end - 1)
    local method, path = head:match("^(%u+) (%S+) HTTP/1%.1")
    if not method then reset(fd) return false end
    local len = tonumber(head:lower():match("\ncontent%-length:%s*(%d+)")
                         or "0")
    if #c.buf < head_end + 3 + len then return true end
    local body = c.buf:sub(head_end + 4, head_end + 3 + len)
    c.buf = c.buf:sub(head_end + 4 + len)
    c.served = c.served + 1
    seen = seen + 1
    log(method .. " " .. path .. " " .. body)
    if c.served > 1 and path:sub(1, 6) == "/reset" then
      reset(fd)
      return false
    end
    local text = "ok " .. seen
    if not send_all(fd, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    .. "Content-Length: " .. #text .. "\r\n\r\n" .. text) then
      reset(fd)
      return false
    end
  end
end

while os.time() < until_t do
  local fds, list = ffi.new("struct gw_pollfd[64]"), {}
  fds[0].fd, fds[0].events = lfd, 1               -- POLLIN
  local n = 1
  for fd in pairs(conns) do
    if n < 64 then
      fds[n].fd, fds[n].events = fd, 1
      list[n] = fd
      n = n + 1
    end
  end
  if C.poll(fds, n, 200) > 0 then
    if bit.band(fds[0].revents, 1) ~= 0 then
      local c = C.accept(lfd, nil, nil)
      if c >= 0 then conns[c] = { buf = "", served = 0 } end
    end
    for i = 1, n - 1 do
      local fd = list[i]
      if fds[i].revents ~= 0 and conns[fd] then
        local got = C.recv(fd, buf, 65536, 0)
        if got <= 0 then
          C.close(fd)
          conns[fd] = nil
        else
          local c = conns[fd]
          c.buf = c.buf .. ffi.string(buf, got)
          serve(fd, c)
        end
      end
    end
  end
end
C.close(lfd)
