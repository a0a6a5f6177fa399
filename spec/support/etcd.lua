-- spec/support/etcd.lua: real etcd members (Debian's etcd-server, 3.4) on
-- loopback for specs, each in a temporary directory on free ports.
--
--   local etcdsrv = require "support.etcd"
--   local c = etcdsrv.start()                 -- one member, plain HTTP
--   local c = etcdsrv.start{ members = 3 }    -- a 3-member cluster
--   local c = etcdsrv.start{ tls = true, auth = true } -- HTTPS with client
--       -- certificates (spec/support/pki.lua) and a root user
--   c.endpoints   -- { "http(s)://127.0.0.1:P", ... }
--   c:client_opts() -- what etcd.new needs (endpoints, TLS files, user)
--   c.members[i]:kill() / :start()  -- SIGKILL one member / start it again
--   c:leader()    -- index of the current leader (nil when none)
--   etcdsrv.stop_all()                        -- in teardown()
--
-- Readiness is waited for with a deadline (GET /health answers
-- {"health":"true"} once the member has a leader), never a fixed sleep.
-- Members are started with posix_spawn (paygate.testing.proc) under a
-- watchdog, so a killed spec run leaves no etcd behind.
local core = require "paygate.core"
local http = require "paygate.http"
local json = require "paygate.json"
local crypto = require "paygate.crypto"
local proc = require "support.proc"
local servers = require "support.servers"
local pki = require "support.pki"

local _M = {}

_M.BIN = os.getenv("ETCD_BIN") or "/usr/bin/etcd"
_M.ROOT_PASSWORD = "root-pw-for-specs"

local started = {}

function _M.available()
  return servers.sh("test -x " .. _M.BIN)
end

local Cluster = {}
Cluster.__index = Cluster

local Member = {}
Member.__index = Member

local function tls_opts(c)
  if not c.pki then return {} end
  return { ca_file = c.pki.ca, client_cert = c.client_cert,
           client_key = c.client_key }
end

-- GET/POST on one member with the cluster's TLS files.
local function req(c, url, method, body, token)
  local o = tls_opts(c)
  o.url, o.method, o.timeout = url, method or "GET", 3
  o.body = body
  o.headers = { ["Content-Type"] = "application/json" }
  if token then o.headers.Authorization = token end
  return http.request(o)
end

function Member:healthy()
  local res = req(self.cluster, self.url .. "/health")
  if not res or res.status ~= 200 then return false end
  local doc = json.decode(res.body)
  return type(doc) == "table" and doc.health == "true"
end

function Member:start()
  if self.proc and self.proc:poll() == nil then return end
  local c = self.cluster
  local scheme = c.pki and "https" or "http"
  local argv = { _M.BIN, "--name", self.name,
    "--data-dir", self.dir,
    "--listen-client-urls", self.url,
    "--advertise-client-urls", self.url,
    "--listen-peer-urls", self.peer_url,
    "--initial-advertise-peer-urls", self.peer_url,
    "--initial-cluster", c.initial_cluster,
    "--initial-cluster-token", c.token,
    "--initial-cluster-state", "new",
    "--heartbeat-interval", "50", "--election-timeout", "500",
    "--logger", "zap", "--log-outputs", "stderr",
  }
  if c.progress_notify then
    argv[#argv + 1] = "--experimental-watch-progress-notify-interval"
    argv[#argv + 1] = c.progress_notify
  end
  if c.pki then
    for _, a in ipairs({ "--cert-file", c.member_cert,
                         "--key-file", c.member_key,
                         "--trusted-ca-file", c.pki.ca,
                         "--client-cert-auth" }) do
      argv[#argv + 1] = a
    end
  end
  assert(scheme)
  -- the watchdog removes the cluster's folder once the member is gone
  -- (the last member's, once every member is)
  self.proc = proc.spawn(argv, { log = self.dir .. ".log", watchdog = true,
                                 watchdog_rmdir = c.dir })
end

-- Waits (with a deadline) until this member answers healthy.
function Member:wait_ready(secs)
  servers.wait_for(function()
    if self.proc:poll() ~= nil then
      local f = io.open(self.dir .. ".log")
      local log = f and f:read("*a") or ""
      if f then f:close() end
      error("etcd " .. self.name .. " exited: " .. log:sub(-2000))
    end
    return self:healthy()
  end, secs or 20, "etcd " .. self.name .. " to be healthy")
end

--- Kills the member at once (SIGKILL: no goodbye to its clients).
function Member:kill()
  if self.proc then
    self.proc:kill(proc.SIGKILL)
    self.proc:wait(10)
  end
end

function Member:stop()
  if self.proc then self.proc:stop(10) end
end

function Member:running()
  return self.proc ~= nil and self.proc:poll() == nil
end

--- syntax: c = etcd.start{ members = 1, tls = false, auth = false,
--                          progress_notify = nil }
-- progress_notify: the members' watch progress notification interval
-- (an etcd duration, "200ms"; etcd's default is 10 minutes)
function _M.start(opts)
  opts = opts or {}
  local n = opts.members or 1
  local c = setmetatable({ members = {}, endpoints = {},
    dir = servers.mktemp(), token = "paygate-spec-" .. core.free_port(),
    progress_notify = opts.progress_notify },
    Cluster)
  if opts.tls then
    c.pki = pki.make(c.dir)
    -- etcd's JSON gateway calls its own gRPC server with the member's
    -- certificate as a client certificate: with --client-cert-auth it
    -- needs clientAuth beside serverAuth (pki's server one has only the
    -- latter)
    local d = c.dir
    local ext = d .. "/etcd.ext"
    local f = assert(io.open(ext, "w"))
    f:write("subjectAltName=IP:127.0.0.1,DNS:localhost\n",
            "extendedKeyUsage=serverAuth,clientAuth\n")
    f:close()
    assert(servers.sh(("openssl req -newkey rsa:2048 -nodes -keyout %s/etcd.key"
      .. " -out %s/etcd.csr -subj /CN=localhost >/dev/null 2>&1 && "
      .. "openssl x509 -req -in %s/etcd.csr -CA %s -CAkey %s/ca.key "
      .. "-CAcreateserial -out %s/etcd.pem -days 2 -extfile %s "
      .. ">/dev/null 2>&1"):format(d, d, d, c.pki.ca, d, d, ext)),
      "cannot make the etcd member certificate")
    c.member_cert, c.member_key = d .. "/etcd.pem", d .. "/etcd.key"
    -- etcd 3.4's gateway refuses (400) a client certificate with a
    -- CommonName (CN-based users do not pass through it): the client's
    -- has none
    local cext = d .. "/etcdclient.ext"
    f = assert(io.open(cext, "w"))
    f:write("extendedKeyUsage=clientAuth\n")
    f:close()
    assert(servers.sh(("openssl req -newkey rsa:2048 -nodes -keyout "
      .. "%s/etcdclient.key -out %s/etcdclient.csr -subj /O=paygate-spec "
      .. ">/dev/null 2>&1 && openssl x509 -req -in %s/etcdclient.csr -CA %s "
      .. "-CAkey %s/ca.key -CAcreateserial -out %s/etcdclient.pem -days 2 "
      .. "-extfile %s >/dev/null 2>&1"):format(d, d, d, c.pki.ca, d, d,
      cext)), "cannot make the etcd client certificate")
    c.client_cert = d .. "/etcdclient.pem"
    c.client_key = d .. "/etcdclient.key"
  end
  local scheme = c.pki and "https" or "http"
  local peers = {}
  for i = 1, n do
    local m = setmetatable({ cluster = c, name = "m" .. i,
      dir = c.dir .. "/m" .. i }, Member)
    local cp = core.free_port()
    local pp = core.free_port()
    while pp == cp do pp = core.free_port() end
    m.url = scheme .. "://127.0.0.1:" .. cp
    m.peer_url = "http://127.0.0.1:" .. pp
    c.members[i] = m
    c.endpoints[i] = m.url
    peers[i] = m.name .. "=" .. m.peer_url
  end
  c.initial_cluster = table.concat(peers, ",")
  started[#started + 1] = c
  for _, m in ipairs(c.members) do m:start() end
  for _, m in ipairs(c.members) do m:wait_ready(30) end
  if opts.auth then
    c.user, c.password = "root", _M.ROOT_PASSWORD
    local function post(path, body)
      local res, err = req(c, c.endpoints[1] .. path, "POST",
                           json.encode(body))
      assert(res, tostring(err))
      assert(res.status == 200, path .. ": " .. res.status .. " "
             .. tostring(res.body))
    end
    post("/v3/auth/role/add", { name = "root" })
    post("/v3/auth/user/add", { name = "root", password = c.password })
    post("/v3/auth/user/grant", { user = "root", role = "root" })
    post("/v3/auth/enable", {})
  end
  return c
end

--- syntax: opts = c:client_opts([extra]) -- for etcd.new
function Cluster:client_opts(extra)
  local o = tls_opts(self)
  o.endpoints = {}
  for i, u in ipairs(self.endpoints) do o.endpoints[i] = u end
  o.user, o.password = self.user, self.password
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

-- A token for admin calls (auth on), or nil.
local function admin_token(c, url)
  if not c.user then return nil end
  local res = req(c, url .. "/v3/auth/authenticate", "POST",
    json.encode({ name = c.user, password = c.password }))
  local doc = res and res.status == 200 and json.decode(res.body)
  return doc and doc.token
end

--- syntax: i = c:leader() -- the index of the leader member, or nil
function Cluster:leader()
  for _, m in ipairs(self.members) do
    if m:running() then
      local res = req(self, m.url .. "/v3/maintenance/status", "POST", "{}",
                      admin_token(self, m.url))
      local doc = res and res.status == 200 and json.decode(res.body)
      if type(doc) == "table" and doc.leader then
        for j, o in ipairs(self.members) do
          local r2 = req(self, o.url .. "/v3/maintenance/status", "POST",
                         "{}", admin_token(self, o.url))
          local d2 = r2 and r2.status == 200 and json.decode(r2.body)
          if type(d2) == "table" and d2.header
             and d2.header.member_id == doc.leader then
            return j
          end
        end
      end
    end
  end
  return nil
end

--- syntax: c:compact(rev) -- compacts history up to rev (physical)
function Cluster:compact(rev)
  local url = self.endpoints[1]
  for _, m in ipairs(self.members) do
    if m:running() then url = m.url break end
  end
  local res, err = req(self, url .. "/v3/kv/compaction", "POST",
    json.encode({ revision = rev, physical = true }), admin_token(self, url))
  assert(res, tostring(err))
  assert(res.status == 200, tostring(res.body))
end

function Cluster:stop()
  for _, m in ipairs(self.members) do m:stop() end
end

function Cluster:cleanup()
  self:stop()
  servers.sh("rm -rf " .. self.dir)
end

function _M.stop_all()
  for i = #started, 1, -1 do
    started[i]:cleanup()
    started[i] = nil
  end
end

_M.b64 = crypto.base64_encode

return _M
