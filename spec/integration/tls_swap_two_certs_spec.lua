-- paygate.tls.set_certificate on a listener started with two certificates
-- (tls.cert RSA and tls.ecdsa_cert): the set given becomes the one
-- certificate every new handshake gets. Before, only the slot of its key
-- type changed: swapping in a new RSA certificate left the old ECDSA one
-- in place, and every client that offers ECDSA (most of them) kept
-- getting it, while tls.serial() said the new serial.
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
paygate.route("GET", "/serial", function()
  return 200, table.concat({ tls.serial() }, " ")
end)
]]

describe("paygate.tls.set_certificate with an RSA and an ECDSA certificate",
         function()
  local dir, p, port

  local function get(path, timeout)
    return http.request{ url = "https://127.0.0.1:" .. port .. path,
                         ca_file = dir .. "/ca.pem", timeout = timeout }
  end

  -- the serial the listener presents to a new, full handshake of a client
  -- that offers these signature algorithms (s_client's -sigalgs)
  local function presented(sigalgs)
    local f = io.popen(("openssl s_client -connect 127.0.0.1:%d "
      .. "-servername localhost -sigalgs %s </dev/null 2>/dev/null "
      .. "| openssl x509 -noout -serial 2>/dev/null"):format(port, sigalgs))
    local out = f:read("*a")
    f:close()
    return out:match("serial=(%x+)")
  end

  local function serial(file)
    local f = io.popen(("openssl x509 -noout -serial -in %s/%s")
                       :format(dir, file))
    local out = f:read("*a")
    f:close()
    return assert(out:match("serial=(%x+)"), out)
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
    sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key "
       .. "-out ca.pem -days 2 -subj /CN=two-certs-ca")
    sh("printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > leaf.ext")
    -- rsa, ec: the certificates the server starts with; rsa2, ec2: new
    for _, name in ipairs({ "rsa", "ec", "rsa2", "ec2" }) do
      local new = name:match("^rsa") and "rsa:2048"
                  or "ec -pkeyopt ec_paramgen_curve:P-256"
      sh(("openssl req -newkey %s -nodes -keyout %s.key -out %s.csr "
          .. "-subj /CN=localhost"):format(new, name, name))
      sh(("openssl x509 -req -in %s.csr -CA ca.pem -CAkey ca.key "
          .. "-CAcreateserial -out %s.pem -days 2 -extfile leaf.ext")
         :format(name, name))
    end
    f = assert(io.open(dir .. "/conf.lua", "wb"))
    f:write(("return { tls = { cert = %q, key = %q, ecdsa_cert = %q, "
             .. "ecdsa_key = %q } }"):format(dir .. "/rsa.pem",
             dir .. "/rsa.key", dir .. "/ec.pem", dir .. "/ec.key"))
    f:close()
    port = core.free_port()
    p = proc.spawn({ server.bin(), "run", dir, "--listen",
                     "127.0.0.1:" .. port, "--admin", "off", "--workers",
                     "1", "--config", dir .. "/conf.lua" },
                   { log = dir .. "/server.log", watchdog = true })
    proc.wait_until(function()
      local res = get("/serial", 1)
      return res and res.status == 200
    end, 20, "the server to serve")
  end)

  teardown(function()
    if p then p:stop(5) end
    if dir then server.rmdir(dir) end
  end)

  it("serves the new certificate alone, to every client", function()
    local ecdsa = "ECDSA+SHA256:RSA-PSS+SHA256:RSA+SHA256"
    local rsa_only = "RSA-PSS+SHA256:RSA+SHA256"
    assert.equal(serial("ec.pem"), presented(ecdsa))
    assert.equal(serial("rsa.pem"), presented(rsa_only))
    -- tls.serial() names both, the RSA one first; before, only the ECDSA
    -- one (the context's "current" certificate: the last loaded)
    assert.equal(serial("rsa.pem") .. " " .. serial("ec.pem"),
                 assert(get("/serial", 5)).body)
    -- a new RSA certificate: clients that offer ECDSA get it too
    assert.equal("swapped",
                 assert(get("/swap?cert=rsa2.pem&key=rsa2.key", 5)).body)
    assert.equal(serial("rsa2.pem"), presented(ecdsa))
    assert.equal(serial("rsa2.pem"), presented(rsa_only))
    assert.equal(serial("rsa2.pem"), assert(get("/serial", 5)).body)
    -- then an ECDSA one: the RSA one is gone, a client that offers RSA
    -- only has no certificate to get
    assert.equal("swapped",
                 assert(get("/swap?cert=ec2.pem&key=ec2.key", 5)).body)
    assert.equal(serial("ec2.pem"), presented(ecdsa))
    assert.is_nil(presented(rsa_only))
    assert.equal(serial("ec2.pem"), assert(get("/serial", 5)).body)
    -- a refused set changes nothing
    assert.matches("^tls: ",
                   assert(get("/swap?cert=rsa2.pem&key=ec2.key", 5)).body)
    assert.equal(serial("ec2.pem"), presented(ecdsa))
  end)
end)
