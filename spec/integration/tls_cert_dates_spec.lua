-- The listener's certificate out of its validity dates. On a reload
-- (certificate and key replaced on disk, then HUP) it is refused, and the
-- certificate serving stays: before, the reload took it without a word and
-- every client that verifies refused every handshake after. At start (no
-- other certificate to serve) it is a warning.
local core = require "paygate.core"
local http = require "paygate.http"
local proc = require "paygate.testing.proc"
local server = require "paygate.testing.server"

describe("a TLS certificate out of its dates", function()
  local dir

  local function sh(cmd)
    assert(os.execute(("cd %s && (%s) >/dev/null 2>&1"):format(dir, cmd))
           == 0, cmd)
  end

  -- name.pem, name.key: a self-signed certificate for 127.0.0.1, valid
  -- from `from` to `to` seconds from now
  local function cert_between(name, from, to)
    local function stamp(t) return os.date("!%Y%m%d%H%M%SZ", os.time() + t) end
    proc.write(dir .. "/" .. name .. ".cnf", ("[ca]\ndefault_ca=d\n[d]\n"
      .. "database=%s.idx\nnew_certs_dir=.\nserial=%s.srl\ndefault_md="
      .. "sha256\npolicy=p\ncopy_extensions=copy\n[p]\ncommonName="
      .. "supplied\n"):format(name, name))
    proc.write(dir .. "/" .. name .. ".idx", "")
    proc.write(dir .. "/" .. name .. ".srl", "0400\n")
    sh(("openssl req -newkey rsa:2048 -nodes -keyout %s.key -out %s.csr "
        .. "-subj /CN=localhost -addext subjectAltName=IP:127.0.0.1 && "
        .. "openssl ca -batch -notext -selfsign -config %s.cnf -in %s.csr "
        .. "-keyfile %s.key -startdate %s -enddate %s -out %s.pem")
       :format(name, name, name, name, name, stamp(from), stamp(to), name))
  end

  local function serial(file)
    local f = io.popen(("openssl x509 -noout -serial -in %s/%s")
                       :format(dir, file))
    local out = f:read("*a")
    f:close()
    return assert(out:match("serial=(%x+)"), out)
  end

  setup(function()
    dir = server.tmpdir()
    proc.write(dir .. "/app.lua", 'require("paygate").route("GET", "/ping", '
               .. 'function() return 200, "pong" end)')
    cert_between("good", -3600, 2 * 86400)
    cert_between("gone", -10 * 86400, -3600)
    cert_between("soon", 86400, 2 * 86400)
  end)

  teardown(function()
    if dir then server.rmdir(dir) end
  end)

  local function start(cert)
    sh(("cp %s.pem live.pem && cp %s.key live.key"):format(cert, cert))
    local port, admin = core.free_port(), core.free_port()
    local p = proc.spawn({ server.bin(), "run", dir, "--listen",
      "127.0.0.1:" .. port, "--admin", "127.0.0.1:" .. admin, "--workers",
      "1", "--pid-file", dir .. "/pid", "--tls-cert", dir .. "/live.pem",
      "--tls-key", dir .. "/live.key" },
      { log = dir .. "/server.log", watchdog = true })
    proc.wait_until(function()
      local res = http.request{ url = "http://127.0.0.1:" .. admin
                                      .. "/healthz", timeout = 1 }
      return res and res.status == 200
    end, 20, "the server to serve")
    return p, port
  end

  -- the serial a new handshake is presented
  local function presented(port)
    local f = io.popen(("openssl s_client -connect 127.0.0.1:%d </dev/null "
      .. "2>/dev/null | openssl x509 -noout -serial 2>/dev/null")
      :format(port))
    local out = f:read("*a")
    f:close()
    return out:match("serial=(%x+)")
  end

  it("is refused on a reload; the certificate serving stays", function()
    local p, port = start("good")
    local ok, err = pcall(function()
      for _, bad in ipairs({ { "gone", "expired on" },
                             { "soon", "is not valid yet" } }) do
        sh(("cp %s.pem live.pem && cp %s.key live.key"):format(bad[1],
                                                               bad[1]))
        local code, out = proc.run({ server.bin(), "reload", "--pid-file",
                                     dir .. "/pid" }, { timeout = 30 })
        assert.equal(1, code, out)
        assert.matches("tls certificate " .. dir .. "/live.pem "
                       .. bad[2], out, 1, true)
        assert.equal(serial("good.pem"), presented(port))
      end
      -- a valid pair still reloads
      sh("cp good.pem live.pem && cp good.key live.key")
      local code, out = proc.run({ server.bin(), "reload", "--pid-file",
                                   dir .. "/pid" }, { timeout = 30 })
      assert.equal(0, code, out)
    end)
    p:stop(5)
    assert(ok, err)
  end)

  it("is a warning at start", function()
    local p, port = start("gone")
    local ok, err = pcall(function()
      assert.equal(serial("gone.pem"), presented(port))
      local log = proc.read(dir .. "/server.log")
      assert.matches('"level":"warn"[^\n]*tls certificate ' .. dir:gsub("%p",
        "%%%0") .. "/live%.pem expired on", log)
    end)
    p:stop(5)
    assert(ok, err)
  end)
end)
