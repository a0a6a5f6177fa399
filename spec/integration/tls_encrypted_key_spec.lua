-- paygate.tls.set_certificate with an encrypted private key: refused at
-- once (kind tls). Before, OpenSSL's default pass-phrase prompt read the
-- worker's terminal or stdin and the worker stopped serving. The server
-- here gets a stdin that stays open and never writes (a FIFO), as a
-- server started from a shell would have. The same for the listener's
-- key file at start and on a reload: before, the master prompted for a
-- pass phrase there (on its terminal, or its stdin) and stopped: a reload
-- never ended, /healthz and /metrics went unanswered, no worker was
-- restarted.
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
  local ok, err = tls.set_certificate(rd(dir .. "/srv.pem"),
                                      rd(dir .. "/" .. req:query().key))
  return 200, ok and "swapped" or (err.kind .. ": " .. err.message)
end)
paygate.route("GET", "/ping", function() return 200, "pong" end)
]]

describe("paygate.tls with an encrypted key", function()
  local dir, p, port, stdin, admin

  local function get(path, timeout)
    return http.request{ url = "https://127.0.0.1:" .. port .. path,
                         ca_file = dir .. "/srv.pem", timeout = timeout }
  end

  setup(function()
    dir = server.tmpdir()
    local f = assert(io.open(dir .. "/app.lua", "wb"))
    f:write(APP)
    f:close()
    assert(os.execute(("cd %s && openssl req -x509 -newkey ec -pkeyopt "
      .. "ec_paramgen_curve:P-256 -nodes -keyout srv.key -out srv.pem "
      .. "-days 2 -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1 "
      .. ">/dev/null 2>&1 && openssl pkey -in srv.key -aes256 -passout "
      .. "pass:spec-pass -out enc.key && cp srv.key live.key"):format(dir))
      == 0)
    port, admin = core.free_port(), core.free_port()
    -- stdin: a FIFO this spec holds open for writing and never writes to
    -- (exec: the spawned pid is the server's master itself)
    assert(os.execute("mkfifo " .. dir .. "/stdin") == 0)
    p = proc.spawn({ "/bin/sh", "-c", ("exec %s run %s --listen "
      .. "127.0.0.1:%d --admin 127.0.0.1:%d --workers 1 --pid-file "
      .. "%s/pid --tls-cert %s/srv.pem --tls-key %s/live.key < %s/stdin")
      :format(server.bin(), dir, port, admin, dir, dir, dir, dir) },
      { log = dir .. "/server.log", watchdog = true })
    stdin = assert(io.open(dir .. "/stdin", "wb"))  -- meets the reader
    proc.wait_until(function()
      local res = get("/ping", 1)
      return res and res.status == 200
    end, 20, "the server to serve")
  end)

  teardown(function()
    if p then p:stop(5) end
    if stdin then stdin:close() end
    if dir then server.rmdir(dir) end
  end)

  it("is refused at once and the worker keeps serving", function()
    local res, err = get("/swap?key=enc.key", 5)
    assert(res, "no answer (a pass-phrase prompt?): " .. tostring(err)
           .. "\n" .. proc.read(dir .. "/server.log"))
    assert.equal(200, res.status)
    assert.matches("^tls: ", res.body)
    assert.matches("encrypted", res.body)
    res = assert(get("/ping", 5))
    assert.equal("pong", res.body)
    -- the plain key still swaps
    assert.equal("swapped", assert(get("/swap?key=srv.key", 5)).body)
  end)

  it("as the listener's key file: a reload is refused at once, saying so",
     function()
    assert(os.execute(("cp %s/enc.key %s/live.key"):format(dir, dir)) == 0)
    local code, out = proc.run({ server.bin(), "reload", "--pid-file",
                                 dir .. "/pid" }, { timeout = 15 })
    assert(code, "no outcome (a pass-phrase prompt?): " .. tostring(out)
           .. "\n" .. proc.read(dir .. "/server.log"))
    assert.equal(1, code)
    assert.matches("tls key " .. dir .. "/live.key", out, 1, true)
    assert.matches("encrypted", out, 1, true)
    assert.is_nil(out:find("spec-pass", 1, true))
    local res = assert(http.request{ url = "http://127.0.0.1:" .. admin
                                           .. "/healthz", timeout = 5 })
    assert.equal(200, res.status)
    assert.equal("pong", assert(get("/ping", 5)).body)
  end)

  it("as the listener's key file: the start is refused, saying so",
     function()
    local code, out = proc.run({ "/bin/sh", "-c", ("exec %s run %s --listen "
      .. "127.0.0.1:%d --admin off --workers 1 --tls-cert %s/srv.pem "
      .. "--tls-key %s/enc.key < %s/stdin"):format(server.bin(), dir,
      core.free_port(), dir, dir, dir) }, { timeout = 15 })
    assert(code, "no outcome (a pass-phrase prompt?): " .. tostring(out))
    assert.equal(2, code)
    assert.matches("tls key " .. dir .. "/enc.key", out, 1, true)
    assert.matches("encrypted", out, 1, true)
  end)
end)
