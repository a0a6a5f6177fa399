-- The HTTPS listener's certificate published in etcd (paygate etcd
-- publish --tls) is swapped by every worker of a running server
-- (paygate.credentials + paygate.tls): new handshakes present it.
local etcdsrv = require "support.etcd"
local servers = require "support.servers"
local server = require "support.server"
local credentials = require "paygate.credentials"

local PREFIX = "/paygate/tls/"

local APP = [[
local paygate = require "paygate"
local credentials = require "paygate.credentials"
local tls = require "paygate.tls"
local conf = paygate.config_copy().creds
paygate.timer.at(0, function()
  local src = assert(credentials.new(conf))
  src:on_change("tls", function(v)
    return tls.set_certificate(v.cert, v.key)
  end)
  local ok, err = src:load("tls")
  if not ok then paygate.log.warn("tls set not loaded", { err = err }) end
  src:start()
end)
paygate.route("GET", "/serial", function() return 200, tls.serial() end)
]]

local function sh(cmd)
  assert(servers.sh("(" .. cmd .. ") >/dev/null 2>&1"),
         "command failed: " .. cmd)
end

-- the serial the listener presents to a new handshake (openssl s_client)
local function presented(port)
  local p = io.popen(("openssl s_client -connect 127.0.0.1:%d -servername "
    .. "localhost </dev/null 2>/dev/null | openssl x509 -noout -serial "
    .. "2>/dev/null"):format(port))
  local out = p:read("*a")
  p:close()
  return out:match("serial=(%x+)")
end

-- a config value as Lua source
local function lit(v)
  if type(v) == "table" then
    local t = {}
    for k, x in pairs(v) do
      t[#t + 1] = "[" .. lit(k) .. "] = " .. lit(x)
    end
    return "{" .. table.concat(t, ", ") .. "}"
  end
  if type(v) == "number" then return tostring(v) end
  return ("%q"):format(v)
end

-- `paygate etcd publish --tls` of the folder d to prefix: its output,
-- ending "exit=<status>"
local function publish(o, prefix, d, kek_file)
  local cmd = ("PAYGATE_SPEC_ETCD_PW=%s %s etcd publish --tls --prefix %s "
    .. "--dir %s --endpoints %s --user %s --password-env "
    .. "PAYGATE_SPEC_ETCD_PW --ca-file %s --cert %s --key %s --kek-file %s"
    .. " 2>&1; echo \"exit=$?\""):format(o.password, PAYGATE_BIN, prefix,
    d, o.endpoints[1], o.user, o.ca_file, o.client_cert, o.client_key,
    kek_file)
  local p = io.popen(cmd)
  local out = p:read("*a")
  p:close()
  return out
end

describe("the HTTPS listener's certificate from etcd", function()
  if not etcdsrv.available() then
    pending("etcd is not installed (scripts/deps installs etcd-server)")
    return
  end
  local c, srv, srv2, dir

  -- the revisions /metrics shows for the tls set, one per worker
  local function revisions(s)
    local res = s:admin_get("/metrics")
    local out = {}
    for pid, v in (res and res.body or ""):gmatch(
        'paygate_credentials_revision{[^}]*pid="(%d+)"[^}]*} (%d+)') do
      out[pid] = v
    end
    return out
  end

  setup(function() c = etcdsrv.start{ tls = true, auth = true } end)
  teardown(function()
    if srv then srv:stop() end
    if srv2 then srv2:stop() end
    etcdsrv.stop_all()
  end)

  it("new handshakes see the new certificate in every worker", function()
    dir = c.dir
    local kek_file = dir .. "/kek"
    local f = assert(io.open(kek_file, "w"))
    f:write(("ab"):rep(32))
    f:close()
    -- the new listener certificate, from the same CA, serial 0x7777
    local ext = dir .. "/web.ext"
    f = assert(io.open(ext, "w"))
    f:write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    f:close()
    sh("mkdir -p " .. dir .. "/web")
    sh(("openssl req -newkey rsa:2048 -nodes -keyout %s/web/key.pem -out "
        .. "%s/web.csr -subj /CN=localhost && openssl x509 -req -in "
        .. "%s/web.csr -CA %s -CAkey %s/ca.key -set_serial 0x7777 -out "
        .. "%s/web/cert.pem -days 2 -extfile %s"):format(dir, dir, dir,
        c.pki.ca, dir, dir, ext))
    sh("mkdir -p " .. dir .. "/cache")
    local o = c:client_opts()
    local conf = { etcd = o, kek_file = kek_file, cache_dir = dir .. "/cache",
                   tls = PREFIX, load_timeout = 2 }
    srv = server.start{ source = APP, workers = 2,
      config = "return { creds = " .. lit(conf) .. " }",
      args = { "--tls-cert", c.pki.server_cert, "--tls-key",
               c.pki.server_key },
      scheme = "https", ca_file = c.pki.ca }
    -- a second instance of the same app and configuration
    srv2 = server.start{ source = APP, workers = 2,
      config = "return { creds = " .. lit(conf) .. " }",
      args = { "--tls-cert", c.pki.server_cert, "--tls-key",
               c.pki.server_key },
      scheme = "https", ca_file = c.pki.ca }
    local before = presented(srv.port)
    assert.truthy(before)
    assert.not_equal("7777", before)

    local out = publish(o, PREFIX, dir .. "/web", kek_file)
    assert.matches("exit=0", out)
    local published = require("paygate").update_time()
    local rev = out:match("at revision (%d+)")
    assert.truthy(rev, out)

    -- both instances, every worker: the same revision
    servers.wait_for(function()
      local n = 0
      for _, s in ipairs({ srv, srv2 }) do
        for _, v in pairs(revisions(s)) do
          if v ~= rev then return false end
          n = n + 1
        end
      end
      return n == 4
    end, 10, "4 workers of 2 instances at revision " .. rev)
    local took = require("paygate").update_time() - published
    print(("\n# 2 instances x 2 workers at revision %s %.3f s after the "
           .. "publish returned"):format(rev, took))
    assert.is_true(took < 5, took)

    -- every worker: several new handshakes in a row all present it
    local ok, err = pcall(servers.wait_for, function()
      for _ = 1, 6 do
        if presented(srv.port) ~= "7777" then return false end
      end
      return true
    end, 20, "every handshake to present serial 7777")
    assert(ok, tostring(err) .. "\n" .. srv:logs())
    -- and requests over the new certificate work
    local res = assert(srv:request{ path = "/serial" })
    assert.equal(200, res.status)
    assert.equal("7777", res.body)

    -- a mismatched pair is refused: handshakes keep the good one
    local kek = assert(credentials.read_kek{ kek_file = kek_file })
    local etcd = require "paygate.etcd"
    local cli = etcd.new(o)
    local kf = assert(io.open(c.pki.server_key))
    local wrong = kf:read("*a")
    kf:close()
    assert(cli:put(PREFIX .. "key.pem",
                   credentials.seal(kek, PREFIX .. "key.pem", wrong)))
    servers.wait_for(function()
      return srv:logs():find("credentials: set refused", 1, true) ~= nil
    end, 20, "the refusal in the log")
    for _ = 1, 4 do assert.equal("7777", presented(srv.port)) end
    for _, v in pairs(revisions(srv2)) do assert.equal(rev, v) end
  end)

  -- The listener serves ECDSA (tls.ecdsa_cert, tls.set_certificate):
  -- publish refused such a pair ("key.pem is not a private key"), and a
  -- worker refused the set, for validation took RSA or SM2 keys only.
  it("an ECDSA pair publishes and is served", function()
    local dir = c.dir
    local prefix = "/paygate/tls-ec/"
    local kek_file = dir .. "/kek-ec"
    local f = assert(io.open(kek_file, "w"))
    f:write(("cd"):rep(32))
    f:close()
    local ext = dir .. "/web-ec.ext"
    f = assert(io.open(ext, "w"))
    f:write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    f:close()
    sh("mkdir -p " .. dir .. "/web-ec " .. dir .. "/cache-ec")
    sh(("openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 "
        .. "-nodes -keyout %s/web-ec/key.pem -out %s/web-ec.csr -subj "
        .. "/CN=localhost && openssl x509 -req -in %s/web-ec.csr -CA %s "
        .. "-CAkey %s/ca.key -set_serial 0xEC01 -out %s/web-ec/cert.pem "
        .. "-days 2 -extfile %s"):format(dir, dir, dir, c.pki.ca, dir, dir,
        ext))
    local o = c:client_opts()
    local conf = { etcd = o, kek_file = kek_file, tls = prefix,
                   cache_dir = dir .. "/cache-ec", load_timeout = 10 }
    local s = server.start{ source = APP, workers = 1,
      config = "return { creds = " .. lit(conf) .. " }",
      args = { "--tls-cert", c.pki.server_cert, "--tls-key",
               c.pki.server_key },
      scheme = "https", ca_file = c.pki.ca }
    -- (the worker finds the prefix empty at its start: "set refused",
    -- revision 0; then the publish's set, which it validates as publish
    -- does, swapped in)
    local ok, err = pcall(function()
      local out = publish(o, prefix, dir .. "/web-ec", kek_file)
      assert.matches("exit=0", out)
      assert.matches("serial EC01", out, 1, true)
      servers.wait_for(function()
        return presented(s.port) == "EC01"
      end, 20, "handshakes to present serial EC01")
    end)
    local logs = s:logs()
    s:stop()
    assert(ok, tostring(err) .. "\n" .. logs)
  end)
end)
