-- spec/support/pollnet.lua: what the reload specs' raw clients are made
-- of: non-blocking sockets driven by poll() in the spec's process (no
-- client library retries a failed request behind our back), their
-- constants, and parse() for an answer read so far.
local ffi = require "ffi"

for _, decl in ipairs{
  "struct gw_pn_sockaddr_in { unsigned short family; unsigned short port; "
    .. "unsigned int addr; char zero[8]; };",
  "struct gw_pn_pollfd { int fd; short events; short revents; };",
  "int socket(int domain, int type, int protocol);",
  "int connect(int fd, const void *addr, unsigned int len);",
  "long send(int fd, const void *buf, unsigned long len, int flags);",
  "long recv(int fd, void *buf, unsigned long len, int flags);",
  "int close(int fd);",
  "int poll(void *fds, unsigned long nfds, int timeout);",
  "int getsockopt(int fd, int level, int name, void *val, unsigned int *len);",
  "unsigned short htons(unsigned short v);",
} do
  pcall(ffi.cdef, decl)
end

local _M = {
  C = ffi.C,
  AF_INET = 2, SOCK_STREAM = 1, SOCK_NONBLOCK = 2048,
  EINTR = 4, EAGAIN = 11, EINPROGRESS = 115,
  POLLIN = 1, POLLOUT = 4,
  SOL_SOCKET = 1, SO_ERROR = 4,
  MSG_NOSIGNAL = 0x4000,
}

-- 127.0.0.1:port, for connect()
function _M.loopback(port)
  local a = ffi.new("struct gw_pn_sockaddr_in")
  a.family, a.port, a.addr = _M.AF_INET, _M.C.htons(port), 0x0100007f
  return a
end

-- n pollfd structs (indexed from 0), for poll()
function _M.pollfds(n)
  return ffi.new("struct gw_pn_pollfd[?]", n)
end

-- the answer, once whole: status, body, whether it closes the connection
function _M.parse(got)
  local head_end = got:find("\r\n\r\n", 1, true)
  if not head_end then return nil end
  local head = got:sub(1, head_end - 1)
  local len = tonumber(head:lower():match("\r\ncontent%-length:%s*(%d+)"))
  if not len or #got < head_end + 3 + len then return nil end
  return tonumber(head:match("^HTTP/1%.1 (%d%d%d)")),
         got:sub(head_end + 4, head_end + 3 + len),
         head:lower():find("\r\nconnection:%s*close") ~= nil
end

return _M
