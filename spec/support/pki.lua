-- spec/support/pki.lua: a throw-away test PKI made with the openssl CLI:
-- a CA, a server certificate for 127.0.0.1/localhost and a client
-- certificate. Test-only keys, generated per run, never committed.
local _M = {}

local function sh(cmd)
  local err = os.tmpname()
  local ok = os.execute(cmd .. " >/dev/null 2>" .. err)
  local f = io.open(err)
  local msg = f and f:read("*a") or ""
  if f then f:close() end
  os.remove(err)
  assert(ok == 0 or ok == true, "command failed (" .. tostring(ok) .. "): "
         .. cmd .. "\n" .. msg)
end

--- pki = make(dir) -> { ca, server_cert, server_key, client_cert,
---                      client_key, other_ca }
function _M.make(dir)
  local p = {}
  local function f(name) return dir .. "/" .. name end
  local ext = f("server.ext")
  local fh = assert(io.open(ext, "w"))
  fh:write("subjectAltName=IP:127.0.0.1,DNS:localhost\n",
           "extendedKeyUsage=serverAuth\n")
  fh:close()
  local cext = f("client.ext")
  fh = assert(io.open(cext, "w"))
  fh:write("extendedKeyUsage=clientAuth\n")
  fh:close()
  for _, ca in ipairs({ "ca", "other_ca" }) do
    sh(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s -out %s " ..
        "-days 2 -subj /CN=paygate-test-%s"):format(f(ca .. ".key"),
        f(ca .. ".pem"), ca))
  end
  for _, who in ipairs({ "server", "client" }) do
    sh(("openssl req -newkey rsa:2048 -nodes -keyout %s -out %s " ..
        "-subj /CN=%s"):format(f(who .. ".key"), f(who .. ".csr"),
        who == "server" and "localhost" or "paygate-test-client"))
    sh(("openssl x509 -req -in %s -CA %s -CAkey %s -CAcreateserial " ..
        "-out %s -days 2 -extfile %s"):format(f(who .. ".csr"),
        f("ca.pem"), f("ca.key"), f(who .. ".pem"),
        who == "server" and ext or cext))
  end
  p.ca, p.other_ca = f("ca.pem"), f("other_ca.pem")
  p.server_cert, p.server_key = f("server.pem"), f("server.key")
  p.client_cert, p.client_key = f("client.pem"), f("client.key")
  return p
end

--- syntax: cert, key = pki.client(dir, cn) -- one more client
-- certificate (CN = cn) from the CA pki.make(dir) made, and its key:
-- dir/<cn>.pem, dir/<cn>.key.
function _M.client(dir, cn)
  local function f(name) return dir .. "/" .. name end
  sh(("openssl req -newkey rsa:2048 -nodes -keyout %s -out %s " ..
      "-subj /CN=%s"):format(f(cn .. ".key"), f(cn .. ".csr"), cn))
  sh(("openssl x509 -req -in %s -CA %s -CAkey %s -CAcreateserial " ..
      "-out %s -days 2 -extfile %s"):format(f(cn .. ".csr"), f("ca.pem"),
      f("ca.key"), f(cn .. ".pem"), f("client.ext")))
  return f(cn .. ".pem"), f(cn .. ".key")
end

return _M
