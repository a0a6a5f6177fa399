-- paygate.tls.set_certificate refused by OpenSSL part-way (a chain
-- certificate below the listener's security level): nothing changes, the
-- listener keeps presenting the certificate and key it had. Before, the
-- new leaf was already in the context when the chain was refused, and the
-- old key, which does not match it, was dropped: every handshake after
-- failed until the next good swap.
local core = require "paygate.core"
local http = require "paygate.http"
local proc = require "paygate.testing.proc"
local server = require "paygate.testing.server"

local APP = [[
local paygate = require "paygate"
local tls = require "paygate.tls"
local function rd(p)
  local f = assert(io.open(p, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end
paygate.route("GET", "/swap", function(req)
  local dir = paygate.app_dir
  local ok, err = tls.set_certificate(rd(dir .. "/" .. req:query().cert),
                                      rd(dir .. "/" .. req:query().key))
  return 200, ok and "swapped" or (err.kind .. ": " .. err.message)
end)
paygate.route("GET", "/ping", function() return 200, "pong" end)
]]

describe("paygate.tls.set_certificate refused by OpenSSL", function()
  local dir, p, port

  local function get(path, timeout)
    return http.request{ url = "https://127.0.0.1:" .. port .. path,
                         ca_file = dir .. "/srv.pem", timeout = timeout }
  end

  -- the serial the listener presents to a new, full handshake (no
  -- session resumed, no connection reused): nil when there is none
  local function presented()
    local f = io.popen(("openssl s_client -connect 127.0.0.1:%d "
      .. "-servername localhost </dev/null 2>/dev/null | openssl x509 "
      .. "-noout -serial 2>/dev/null"):format(port))
    local out = f:read("*a")
    f:close()
    return out:match("serial=(%x+)")
  end

  local function sh(cmd)
    assert(os.execute(("cd %s && (%s) >/dev/null 2>&1"):format(dir, cmd))
           == 0, cmd)
  end

  setup(function()
    dir = server.tmpdir()
    local f = assert(io.open(dir .. "/app.lua", "wb"))
    f:write(APP)
    f:close()
    -- the serving certificate
    sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 "
       .. "-nodes -keyout srv.key -out srv.pem -days 2 -subj /CN=localhost "
       .. "-addext subjectAltName=IP:127.0.0.1")
    -- a new leaf (a sound key) under an intermediate signed with SHA-1
    -- by a 1024-bit RSA root: OpenSSL refuses that chain certificate
    sh("openssl req -x509 -newkey rsa:1024 -nodes -keyout root.key "
       .. "-out root.pem -days 2 -subj /CN=weak-root -sha1")
    sh("openssl req -newkey rsa:1024 -nodes -keyout mid.key -out mid.csr "
       .. "-subj /CN=weak-mid")
    sh("printf 'basicConstraints=critical,CA:true\\n' > ca.ext")
    sh("openssl x509 -req -in mid.csr -CA root.pem -CAkey root.key "
       .. "-CAcreateserial -out mid.pem -days 2 -sha1 -extfile ca.ext")
    sh("openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
       .. "-keyout new.key -out new.csr -subj /CN=localhost")
    sh("printf 'subjectAltName=IP:127.0.0.1\\n' > leaf.ext")
    sh("openssl x509 -req -in new.csr -CA mid.pem -CAkey mid.key "
       .. "-CAcreateserial -out leaf.pem -days 2 -sha256 -extfile leaf.ext")
    sh("cat leaf.pem mid.pem > chain.pem")
    port = core.free_port()
    p = proc.spawn({ server.bin(), "run", dir, "--listen",
                     "127.0.0.1:" .. port, "--admin", "off", "--workers",
                     "1", "--tls-cert", dir .. "/srv.pem", "--tls-key",
                     dir .. "/srv.key" },
                   { log = dir .. "/server.log", watchdog = true })
    proc.wait_until(function()
      local res = get("/ping", 1)
      return res and res.status == 200
    end, 20, "the server to serve")
  end)

  teardown(function()
    if p then p:stop(5) end
    if dir then server.rmdir(dir) end
  end)

  it("changes nothing: the listener keeps its certificate and key",
     function()
    local before = assert(presented())
    local res = assert(get("/swap?cert=chain.pem&key=new.key", 5))
    assert.equal(200, res.status)
    -- OpenSSL's reason, as tls.check gives it (it said "OpenSSL refused
    -- the certificate or key", not which check)
    assert.matches("^tls: tls.set_certificate: the certificate chain is "
                   .. "refused by OpenSSL %(ca key too small: ", res.body)
    assert.equal(before, presented())
    -- a sound set still swaps
    assert.equal("swapped",
                 assert(get("/swap?cert=srv.pem&key=srv.key", 5)).body)
  end)
end)
