-- spec/support/diagpki.lua: the certificates the CLI diagnostics specs
-- break things with, made per run with the openssl CLI (test-only keys):
-- a root and an intermediate CA, TLS server certificates (good, expired,
-- wrong host, from an untrusted CA, revoked with a CRL, signed with SHA-1,
-- with an RSA-1024 key; for the wrong use: TLS client only, a key usage
-- without digitalSignature / keyEncipherment, issued by a leaf; with a bad
-- signature: a byte of it flipped, re-signed by another key under the
-- intermediate's name), a WeChat-style
-- platform certificate and a merchant certificate (CN = mchid).
local bit = require "bit"

local _M = {}

local function sh(cmd)
  local ok = os.execute(cmd .. " >/dev/null 2>&1")
  assert(ok == 0 or ok == true, "command failed: " .. cmd)
end

local write = require("paygate.testing.proc").write

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end
_M.read, _M.write = read, write

function _M.make(dir)
  local function f(n) return dir .. "/" .. n end
  local p = { dir = dir }
  write(f("ca.ext"), "basicConstraints=critical,CA:TRUE\n"
        .. "keyUsage=critical,keyCertSign,cRLSign\n")
  write(f("good.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        .. "extendedKeyUsage=serverAuth\n")
  write(f("clientonly.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        .. "extendedKeyUsage=clientAuth\n")
  write(f("certsignonly.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        .. "keyUsage=critical,keyCertSign\nextendedKeyUsage=serverAuth\n")
  write(f("wronghost.ext"), "subjectAltName=DNS:wrong.example\n"
        .. "extendedKeyUsage=serverAuth\n")
  -- roots
  for _, ca in ipairs({ "root", "other" }) do
    sh(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s -out %s "
        .. "-days 3 -subj /CN=diag-%s -addext basicConstraints=critical,"
        .. "CA:TRUE"):format(f(ca .. ".key"), f(ca .. ".pem"), ca))
  end
  -- the intermediate
  sh(("openssl req -newkey rsa:2048 -nodes -keyout %s -out %s "
      .. "-subj /CN=diag-intermediate"):format(f("inter.key"), f("inter.csr")))
  sh(("openssl x509 -req -in %s -CA %s -CAkey %s -set_serial 100 -out %s "
      .. "-days 3 -extfile %s"):format(f("inter.csr"), f("root.pem"),
      f("root.key"), f("inter.pem"), f("ca.ext")))
  -- leaves: name, issuer, ext, days
  local serial = 200
  local function leaf(name, ca, ext, days, cn, bits, md)
    serial = serial + 1
    sh(("openssl req -newkey rsa:%d -nodes -keyout %s -out %s -subj '%s'")
       :format(bits or 2048, f(name .. ".key"), f(name .. ".csr"),
       cn or "/CN=localhost"))
    sh(("openssl x509 -req -in %s -CA %s -CAkey %s -set_serial %d -out %s "
        .. "-days %d -%s%s"):format(f(name .. ".csr"), f(ca .. ".pem"),
        f(ca .. ".key"), serial, f(name .. ".pem"), days, md or "sha256",
        ext and (" -extfile " .. f(ext .. ".ext")) or ""))
    p[name] = f(name .. ".pem")
    p[name .. "_key"] = f(name .. ".key")
  end
  leaf("good", "inter", "good", 3)
  leaf("expired", "inter", "good", -1)
  leaf("wronghost", "inter", "wronghost", 3)
  leaf("untrusted", "other", "good", 3)
  leaf("revoked", "inter", "good", 3)
  -- weak: a SHA-1 signature, an RSA-1024 key
  leaf("sha1", "inter", "good", 3, nil, 2048, "sha1")
  leaf("rsa1024", "inter", "good", 3, nil, 1024)
  -- the wrong use: a TLS client certificate (extendedKeyUsage clientAuth
  -- only), a key usage of keyCertSign only, a leaf issued by "good" (a
  -- leaf, CA:FALSE, used as a CA)
  leaf("clientonly", "inter", "clientonly", 3)
  leaf("certsignonly", "inter", "certsignonly", 3)
  leaf("byleaf", "good", "good", 3)
  -- a bad signature: "forged" is issued under the intermediate's name by
  -- another key ("impostor", CN=diag-intermediate); "flipped" is "good"
  -- with the last byte of its signature flipped in the DER
  sh(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s -out %s "
      .. "-days 3 -subj /CN=diag-intermediate -addext basicConstraints="
      .. "critical,CA:TRUE"):format(f("impostor.key"), f("impostor.pem")))
  leaf("forged", "impostor", "good", 3)
  sh(("openssl x509 -in %s -outform DER -out %s"):format(f("good.pem"),
     f("good.der")))
  local der = read(f("good.der"))
  write(f("flipped.der"), der:sub(1, -2)
        .. string.char(bit.bxor(der:byte(-1), 0x01)))
  sh(("openssl x509 -inform DER -in %s -out %s"):format(f("flipped.der"),
     f("flipped.pem")))
  p.flipped, p.flipped_key = f("flipped.pem"), f("good.key")
  -- chain files the servers send (leaf first)
  for _, n in ipairs({ "good", "expired", "wronghost", "revoked", "sha1",
                       "rsa1024", "clientonly", "certsignonly", "forged",
                       "flipped" }) do
    write(f(n .. "_chain.pem"), read(f(n .. ".pem")) .. read(f("inter.pem")))
    p[n .. "_chain"] = f(n .. "_chain.pem")
  end
  -- from a CA the client does not trust: leaf and that root
  write(f("untrusted_chain.pem"), read(f("untrusted.pem"))
                                  .. read(f("other.pem")))
  p.untrusted_chain = f("untrusted_chain.pem")
  p.self_signed, p.self_signed_key = f("other.pem"), f("other.key")
  -- a CRL from the intermediate revoking "revoked"
  write(f("index.txt"), "")
  write(f("crlnumber"), "01\n")
  write(f("ca.cnf"), ("[ca]\ndefault_ca=d\n[d]\ndatabase=%s\n"
    .. "crlnumber=%s\ndefault_md=sha256\ndefault_crl_days=3\n")
    :format(f("index.txt"), f("crlnumber")))
  sh(("openssl ca -config %s -revoke %s -keyfile %s -cert %s"):format(
     f("ca.cnf"), f("revoked.pem"), f("inter.key"), f("inter.pem")))
  sh(("openssl ca -config %s -gencrl -keyfile %s -cert %s -out %s"):format(
     f("ca.cnf"), f("inter.key"), f("inter.pem"), f("inter.crl")))
  p.crl = f("inter.crl")
  -- valid only from 2030: openssl ca sets the start date
  write(f("ca2.cnf"), ("[ca]\ndefault_ca=d\n[d]\ndatabase=%s\n"
    .. "new_certs_dir=%s\nserial=%s\ndefault_md=sha256\npolicy=p\n[p]\n"
    .. "commonName=supplied\n"):format(f("index.txt"), dir, f("serial")))
  write(f("serial"), "0300\n")
  sh(("openssl req -newkey rsa:2048 -nodes -keyout %s -out %s -subj "
      .. "/CN=localhost"):format(f("notyet.key"), f("notyet.csr")))
  sh(("openssl ca -batch -notext -config %s -in %s -cert %s -keyfile %s "
      .. "-startdate 20300101000000Z -enddate 20310101000000Z -extfile %s "
      .. "-out %s"):format(f("ca2.cnf"), f("notyet.csr"), f("inter.pem"),
      f("inter.key"), f("good.ext"), f("notyet.pem")))
  write(f("notyet_chain.pem"), read(f("notyet.pem")) .. read(f("inter.pem")))
  p.notyet_chain, p.notyet_key = f("notyet_chain.pem"), f("notyet.key")
  p.root, p.inter, p.other = f("root.pem"), f("inter.pem"), f("other.pem")
  p.impostor = f("impostor.pem")
  -- WeChat-style keys: platform (CN=Tenpay.com sign), merchant (CN=mchid)
  leaf("platform", "root", nil, 3,
       "/CN=Tenpay.com sign/O=Tenpay.com/OU=Tenpay.com CA Center/C=CN")
  leaf("merchant", "root", nil, 3, "/CN=1900000001/O=diag merchant")
  leaf("platform_soon", "root", nil, 3, "/CN=Tenpay.com sign/O=Tenpay.com")
  -- the WeChat Pay public key (its own key pair)
  sh(("openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out %s")
     :format(f("pub.key")))
  sh(("openssl pkey -in %s -pubout -out %s"):format(f("pub.key"),
     f("pub.pem")))
  p.pub, p.pub_key = f("pub.pem"), f("pub.key")
  return p
end

--- code, out, results = diagpki.run(dir, args[, timeout]): runs the paygate
-- binary with args (output to a file under dir); results are the --json
-- lines decoded, in order.
function _M.run(dir, args, timeout)
  local proc = require "support.proc"
  local json = require "cjson.safe"
  local argv = { PAYGATE_BIN }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local code, out = proc.run(argv, { timeout = timeout or 30,
    log = dir .. "/out." .. require("paygate.crypto").random_nonce(8) })
  local results = {}
  for line in out:gmatch("[^\n]+") do
    if line:sub(1, 1) == "{" then results[#results + 1] = json.decode(line) end
  end
  return code, out, results
end

return _M
