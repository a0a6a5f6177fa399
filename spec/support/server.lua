-- spec/support/server.lua: start `paygate run` on free loopback ports and
-- talk to it over real HTTP.
local paygate = require "paygate"
local core = require "paygate.core"
local proc = require "support.proc"

local _M = {}
local Server = {}
Server.__index = Server

local function tmpdir()
  local p = io.popen("mktemp -d /tmp/paygate-spec.XXXXXX")
  local d = p:read("*l")
  p:close()
  return d
end
_M.tmpdir = tmpdir

--- server = start{ app = dir | source = "lua code", workers = 1,
---                 args = { ... }, config = "lua source", scheme = "http" }
function _M.start(o)
  local dir = tmpdir()
  local app = o.app
  if o.source then
    app = dir .. "/app"
    os.execute("mkdir -p " .. app)
    local f = assert(io.open(app .. "/app.lua", "w"))
    f:write(o.source)
    f:close()
  end
  local port, admin = core.free_port(), core.free_port()
  local argv = { PAYGATE_BIN, "run", app,
                 "--listen", "127.0.0.1:" .. port,
                 "--admin", "127.0.0.1:" .. admin,
                 "--workers", tostring(o.workers or 1),
                 "--pid-file", dir .. "/paygate.pid" }
  if o.config then
    local f = assert(io.open(dir .. "/config.lua", "w"))
    f:write(o.config)
    f:close()
    argv[#argv + 1] = "--config"
    argv[#argv + 1] = dir .. "/config.lua"
  end
  for _, a in ipairs(o.args or {}) do argv[#argv + 1] = a end
  local s = setmetatable({ dir = dir, app = app, port = port, admin = admin,
                           scheme = o.scheme or "http",
                           log = dir .. "/paygate.log",
                           ca_file = o.ca_file }, Server)
  s.proc = proc.spawn(argv, { log = s.log })
  s.pid = s.proc.pid
  if o.wait ~= false then
    local ok = proc.wait_until(function()
      if s.proc:poll() then return true end
      local res = paygate.http.request{
        url = "http://127.0.0.1:" .. admin .. "/healthz", timeout = 1 }
      return res and res.status == 200
    end, 15, "paygate to serve")
    if s.proc:poll() then
      error("paygate exited early (" .. s.proc.status .. "):\n"
            .. proc.read(s.log))
    end
    assert(ok)
  end
  return s
end

function Server:url(path)
  return self.scheme .. "://127.0.0.1:" .. self.port .. (path or "/")
end

--- server:request{ method, path, body, headers, timeout } -> res, err
function Server:request(o)
  if type(o) == "string" then o = { path = o } end
  return paygate.http.request{
    method = o.method, url = self:url(o.path), body = o.body,
    headers = o.headers, timeout = o.timeout or 10,
    ca_file = o.ca_file or self.ca_file, client_cert = o.client_cert,
    client_key = o.client_key }
end

function Server:admin_get(path)
  return paygate.http.request{
    url = "http://127.0.0.1:" .. self.admin .. path, timeout = 5 }
end

function Server:logs() return proc.read(self.log) end

--- server:stop() -- TERM, wait for the exit, return its code
function Server:stop(timeout)
  self.proc:kill(proc.SIGTERM)
  local code = self.proc:wait(timeout or 15)
  if code == nil then
    self.proc:kill(proc.SIGKILL)
    code = self.proc:wait(5)
  end
  os.execute("rm -rf " .. self.dir)
  return code
end

function Server:signal(sig) proc.kill_pid(self.pid, sig) end

return _M
