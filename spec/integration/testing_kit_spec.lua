-- paygate.testing's own parts that need no simulator: test keys, apps on
-- free ports, and that nothing it starts outlives the spec run.
local crypto = require "paygate.crypto"
local x509 = require "paygate.x509"
local testing = require "paygate.testing"
local proc = require "paygate.testing.proc"

local function alive(pid)
  -- kill(pid, 0) succeeds while the process (or its zombie) exists
  local st = testing.read("/proc/" .. pid .. "/stat")
  return st ~= "" and not st:match("^%d+ %b() Z")
end

describe("testing.merchant", function()
  teardown(testing.stop_all)

  it("makes an RSA key and a certificate with its serial", function()
    local m = testing.merchant()
    assert.matches("^%d+$", m.mchid)
    assert.equal(32, #m.apiv3_key)
    assert.matches("^wx%x+$", m.appid)
    assert.matches("^%x+$", m.serial)
    assert.equal(40, #m.serial)
    local cert = assert(x509.load(testing.read(m.certificate)))
    local info = cert:info()
    assert.equal(m.serial, info.serial:upper())
    assert.equal("rsa", info.key_type:lower())
    local key = assert(crypto.private_key(testing.read(m.private_key)))
    local pub = assert(crypto.public_key(testing.read(m.public_key)))
    local sig = assert(crypto.sign_base64(key, "msg"))
    assert.is_true(crypto.verify_base64(pub, "msg", sig))
    assert.matches("^%-%-%-%-%-BEGIN PRIVATE KEY", testing.read(m.private_key))
  end)

  it("makes SM2 keys for the SM variant", function()
    local m = testing.merchant{ sm2 = true }
    local key = assert(crypto.private_key(testing.read(m.private_key)))
    assert.equal("sm2", key:type():lower())
    local sig = assert(crypto.sign_base64(key, "msg",
                                          "WECHATPAY2-SM2-WITH-SM3"))
    local pub = assert(crypto.public_key(testing.read(m.public_key)))
    assert.is_true(crypto.verify_base64(pub, "msg", sig,
                                        "WECHATPAY2-SM2-WITH-SM3"))
  end)

  it("makes a certificate that no client warns about as expiring soon",
     function()
    -- paygate.wechatpay warns at start of a merchant_certificate that ends
    -- within 30 days ("renew the merchant API certificate in the merchant
    -- platform"): a test merchant's must outlast that, or every spec that
    -- makes a client, and every app under test, logs that warning
    local m = testing.merchant()
    local info = assert(x509.load(testing.read(m.certificate))):info()
    assert.is_true(info.not_after - os.time() > 60 * 86400,
                   "not_after " .. tostring(info.not_after))
  end)

  it("gives each merchant its own keys and ids", function()
    local a, b = testing.merchant(), testing.merchant()
    assert.are_not.equal(a.mchid, b.mchid)
    assert.are_not.equal(a.serial, b.serial)
    assert.are_not.equal(a.apiv3_key, b.apiv3_key)
  end)
end)

describe("testing.start_app", function()
  teardown(testing.stop_all)

  it("raises with the app's log when it cannot start", function()
    local ok, err = pcall(testing.start_app,
                          { source = "error('boom at start')" })
    assert.is_false(ok)
    assert.matches("exited early", err)
    assert.matches("boom at start", err)
  end)

  -- the log's end says why; a whole log (a noisy app's, or one logging
  -- at every retry until the timeout) would bury the spec's output
  it("shows the end of the app's log, bounded, when it cannot start",
     function()
    local ok, err = pcall(testing.start_app, { source = [[
local log = require("paygate").log
for i = 1, 400 do log.warn(("noise %d "):format(i):rep(60)) end
error('boom after the noise')]] })
    assert.is_false(ok)
    assert.matches("exited early", err)
    assert.matches("boom after the noise", err)
    assert.matches("bytes before left out", err)
    assert.is_true(#err < 16000, #err .. " bytes")
    ok, err = pcall(testing.start_app, { timeout = 2, workers = 2, source = [[
local log = require("paygate").log
for i = 1, 400 do log.warn(("noise %d "):format(i):rep(60)) end
local d = require("paygate.shared").get_dict("paygate")
if not d:add("first", true) then require("paygate.core").sleep(60) end]] })
    assert.is_false(ok)
    assert.matches("(1 of 2 workers serving)", err, 1, true)
    assert.matches("bytes before left out", err)
    assert.is_true(#err < 16000, #err .. " bytes")
  end)

  it("refuses a misspelt option, naming it, before starting anything",
     function()
    -- ignored, confg would start the app without its config, and
    -- time_scal would leave WeChat's 15 s retries in place
    local ok, err = pcall(testing.start_app, { source = "", confg = {} })
    assert.is_false(ok)
    assert.matches("testing.start_app: unknown option o.confg (known: app,",
                   err, 1, true)
    -- its start's wait may be given (a slow machine): a timeout too
    -- short for any start says so, not "unknown option"
    ok, err = pcall(testing.simulator, { timeout = 0.001 })
    assert.is_false(ok)
    assert.not_matches("unknown option", tostring(err), 1, true)
    assert.matches("paygate to serve", tostring(err), 1, true)
    ok, err = pcall(testing.simulator, { time_scal = 100 })
    assert.is_false(ok)
    assert.matches("testing.simulator: unknown option o.time_scal (known:",
                   err, 1, true)
    assert.matches("time_scale", err, 1, true)
  end)

  it("wait_until ends its error with what fn saw last", function()
    local n = 0
    local ok, err = pcall(testing.wait_until, function()
      n = n + 1
      return false, "try " .. n
    end, 0.1, "the spec's condition")
    assert.is_false(ok)
    assert.matches("timed out waiting for the spec's condition (last seen:"
                   .. " try " .. n .. ")", tostring(err), 1, true)
    -- bounded; and without a second value, as before
    ok, err = pcall(testing.wait_until, function()
      return nil, ("x"):rep(5000)
    end, 0.05, "a long one")
    assert.is_true(#tostring(err) < 600)
    ok, err = pcall(testing.wait_until, function() return false end, 0.05,
                    "nothing said")
    assert.matches("timed out waiting for nothing said$", tostring(err))
  end)

  it("names the spec's line when the app cannot start", function()
    local ok, err = pcall(function()
      testing.start_app{ source = "error('boom')" }
    end)
    assert.is_false(ok)
    assert.matches("^[^\n]*testing_kit_spec%.lua:%d+: paygate run /%S+"
                   .. " exited early", err)
    ok, err = pcall(function()
      testing.start_app{ app = "no/such/app" }
    end)
    assert.is_false(ok)
    assert.matches("^[^\n]*testing_kit_spec%.lua:%d+: testing.start_app: "
                   .. "no/such/app/app.lua not found", err)
  end)

  -- testing.simulator's start named the kit's own line ("testing.lua:316:
  -- timed out waiting for paygate to serve ..."), where start_app's errors
  -- name the spec's
  it("names the spec's line when the app or the simulator does not serve "
     .. "in time", function()
    local ok, err = pcall(function()
      testing.start_app{ source = "os.execute('sleep 3')", timeout = 0.3 }
    end)
    assert.is_false(ok)
    assert.matches("^[^\n]*testing_kit_spec%.lua:%d+: timed out waiting "
                   .. "for paygate to serve /%S+", err)
    ok, err = pcall(function()
      testing.simulator{ timeout = 0.001 }
    end)
    assert.is_false(ok)
    assert.matches("^[^\n]*testing_kit_spec%.lua:%d+: timed out waiting "
                   .. "for paygate to serve /%S+simulator", err)
  end)

  -- o.app is taken from the current directory (busted's), not the spec
  -- file's folder: run from another folder, the message said only
  -- "myapp/app.lua not found", and the reader looked for it in vain
  it("says which folder a relative app was looked for in", function()
    local here = assert(proc.cwd())
    local ok, err = pcall(testing.start_app, { app = "myapp" })
    assert.is_false(ok)
    assert.matches("testing.start_app: myapp/app.lua not found: o.app is "
                   .. "taken from the current directory, " .. here .. " (",
                   err, 1, true)
    assert.not_matches("exited early", err, 1, true)
    -- an absolute path: no folder to name
    ok, err = pcall(testing.start_app, { app = "/nonexistent/myapp" })
    assert.is_false(ok)
    assert.matches("testing.start_app: /nonexistent/myapp/app.lua not "
                   .. "found (an app is a folder with an app.lua)", err, 1,
                   true)
  end)

  -- was: o.args = { "--admin", "off" } started the app, and start_app,
  -- waiting on the /healthz of the admin port it had picked, raised 15 s
  -- later "timed out waiting for paygate to serve" over a log that said
  -- serving; a --listen there moved the app off srv:url()
  it("refuses in o.args the options the kit sets itself", function()
    for _, args in ipairs{ { "--admin", "off" }, { "--admin=off" },
                           { "--workers", "1", "--listen", "127.0.0.1:1" },
                           { "--pid-file", "/tmp/x.pid" } } do
      local name = args[#args]:match("^%-%-[%w-]+")
                   or args[#args - 1]
      local ok, err = pcall(testing.start_app, { app = "examples/hello",
                                                 args = args })
      assert.is_false(ok)
      assert.matches("testing.start_app: o.args gives " .. name
                     .. ", which the kit sets itself", err, 1, true)
      assert.not_matches("timed out", err, 1, true)
    end
  end)

  it("serves an app with a config made from its own port", function()
    local srv = testing.start_app{
      source = [[
local paygate = require "paygate"
paygate.route("GET", "/me", function()
  return 200, { url = paygate.config.me.url, n = paygate.config.me.n }
end)
paygate.route("POST", "/echo", function(req) return 200, req:json() end)]],
      config = function(s) return { me = { url = s:url("/x"), n = 3 } } end }
    local res = assert(srv:request("/me"))
    assert.equal(200, res.status)
    assert.equal(srv:url("/x"), res.json.url)
    assert.equal(3, res.json.n)
    res = assert(srv:request{ path = "/echo", json = { a = "形" } })
    assert.same({ a = "形" }, res.json)
    local dir = srv.dir
    assert.equal(0, srv:stop())
    assert.is_nil(io.open(dir .. "/paygate.log"))      -- its folder is gone
  end)

  -- srv:request spoke cjson: a 16-digit integer went out as
  -- 1.2345678901235e+15 (another number), "/" as "\/", and an empty array
  -- the app answered came back as a table that encodes as {}. It speaks
  -- the runtime's JSON (paygate.json), as the app under test does.
  it("sends and reads JSON as the app does: integers exact, [] kept",
     function()
    local json = require "paygate.json"
    local srv = testing.start_app{ source = [[
local paygate = require "paygate"
paygate.route("POST", "/raw", function(req) return 200, { raw = req.body } end)
paygate.route("GET", "/empty", function()
  return 200, { items = require("paygate.json").empty_array }
end)]] }
    local res = assert(srv:request{ path = "/raw",
      json = { id = 1234567890123456, url = "https://a/b" } })
    assert.equal(200, res.status)
    assert.same({ id = 1234567890123456, url = "https://a/b" },
                json.decode(res.json.raw))
    assert.is_nil(res.json.raw:find("\\/", 1, true), res.json.raw)
    res = assert(srv:request("/empty"))
    assert.equal('{"items":[]}', json.encode(res.json))
    srv:stop()
  end)

  -- A spec that rewrites app.lua to reload it right after the start must
  -- not race a worker still reading the first one: the start waits for
  -- every worker. Here the second worker to load takes 1 s longer.
  it("returns once every worker serves, not the first one only",
     function()
    local srv = testing.start_app{ workers = 2, source = [[
local core = require "paygate.core"
local d = require("paygate.shared").get_dict("paygate")
if not d:add("first", true) then core.sleep(1) end]] }
    local res = assert(srv:admin_get("/healthz"))
    assert.matches('"workers":2,', res.body)
  end)

  it("counts the workers a --workers in args asks for (it wins)",
     function()
    local srv = testing.start_app{ args = { "--workers", "3" }, source = [[
local core = require "paygate.core"
local d = require("paygate.shared").get_dict("paygate")
if d:incr("loaded", 1, 0) > 1 then core.sleep(1) end]] }
    local res = assert(srv:admin_get("/healthz"))
    assert.matches('"workers":3,', res.body)
  end)

  -- (one that fails instead may do so before the first serves: the
  -- master then gives up the start, and start raises that it exited)
  it("raises at the timeout, saying how many serve, when a worker never"
     .. " finishes loading", function()
    local t0 = require("paygate.core").mono()
    local ok, err = pcall(testing.start_app, { workers = 2, timeout = 6,
      source = [[
local core = require "paygate.core"
local d = require("paygate.shared").get_dict("paygate")
if not d:add("first", true) then core.sleep(60) end]] })
    assert.is_false(ok)
    assert.matches("(1 of 2 workers serving)", tostring(err), 1, true)
    assert.is_true(require("paygate.core").mono() - t0 < 30)
  end)

  it("stop_all ends every app it started and removes their folders",
     function()
    local a = testing.start_app{ source = "" }
    local b = testing.start_app{ source = "", workers = 2 }
    assert.is_true(alive(a.pid) and alive(b.pid))
    testing.stop_all()
    assert.is_false(alive(a.pid))
    assert.is_false(alive(b.pid))
    assert.is_nil(io.open(a.dir .. "/paygate.log"))
    testing.stop_all()                          -- twice is fine
  end)

  it("stop_all closes our idle keep-alive connections before it stops the"
     .. " apps, which need not wait for them", function()
    -- Was: each app, draining, gave our idle connection its second for a
    -- last request, one app after another (a second or more per app in
    -- every teardown). Which side closed first shows in the kernel's
    -- table: the first to close keeps the connection in TIME_WAIT.
    local app = testing.start_app{ source = [[
require("paygate").route("GET", "/peer", function(req)
  return 200, req.remote_addr end)]] }
    local res = assert(app:request("/peer"))
    local lport = assert(tonumber(res.body:match(":(%d+)$")), res.body)
    testing.stop_all()
    local function time_wait(from, to)   -- IPv4 loopback, as listened on
      for line in io.lines("/proc/net/tcp") do
        local l, r, st = line:match(
          "^%s*%d+: %x+:(%x+) %x+:(%x+) (%x%x)")
        if l and tonumber(l, 16) == from and tonumber(r, 16) == to
           and st == "06" then
          return true
        end
      end
      return false
    end
    assert.is_true(time_wait(lport, app.port), "we closed first")
    assert.is_false(time_wait(app.port, lport), "the app closed first")
  end)
end)

describe("testing.start_app on a port taken after the pick", function()
  local core = require "paygate.core"
  local pick = core.free_port
  local taker
  setup(function() taker = testing.start_app{ source = "" } end)
  teardown(function()
    core.free_port = pick
    testing.stop_all()
  end)

  -- core.free_port's n-th answer is the taker's (listening) port
  local function take(n)
    local calls = 0
    core.free_port = function(...)
      calls = calls + 1
      if calls == n then return taker.port end
      return pick(...)
    end
  end

  for n, which in ipairs({ "main", "admin" }) do
    it("starts again on fresh ports when the " .. which .. " port was taken",
       function()
      take(n)
      local srv = testing.start_app{ source = [[
require("paygate").route("GET", "/", function() return 200, "mine" end)]] }
      core.free_port = pick
      assert.are_not.equal(taker.port, srv.port)
      assert.are_not.equal(taker.port, srv.admin)
      assert.equal("mine", assert(srv:request("/")).body)
      assert.not_matches("already in use", srv:logs())
      srv:stop()
    end)
  end

  it("does not move a port the caller chose", function()
    local ok, err = pcall(testing.start_app,
                          { source = "", port = taker.port })
    assert.is_false(ok)
    assert.matches("exited early", err)
    assert.matches("Address already in use", err)
  end)
end)

describe("a spec run that dies", function()
  it("leaves no app behind (the watchdog ends it, removes its folder)",
     function()
    local dir = testing.tmpdir()
    local script = dir .. "/run.lua"
    local f = assert(io.open(script, "w"))
    f:write(([[
local testing = require "paygate.testing"
local srv = testing.start_app{ source = "" }
local out = assert(io.open(%q, "w"))
out:write(srv.pid, "\n", srv.dir, "\n")
out:close()
require("paygate.core").sleep(60)
]]):format(dir .. "/pid"))
    f:close()
    local p = proc.spawn({ testing.server.bin(), "exec", script },
                         { log = dir .. "/log" })
    local pid, app_dir
    testing.wait_until(function()
      pid, app_dir = testing.read(dir .. "/pid"):match("^(%d+)\n(.-)\n")
      return pid
    end, 20, "the app's pid")
    pid = tonumber(pid)
    assert.equal(proc.tmp_root() .. "/paygate-test.",
                 app_dir:sub(1, #proc.tmp_root() + 14))
    assert.is_true(alive(pid))
    p:kill(proc.SIGKILL)                        -- the spec run dies
    p:wait(5)
    testing.wait_until(function() return not alive(pid) end, 15,
                       "the orphaned app to end")
    testing.wait_until(function()
      return io.open(app_dir .. "/app/app.lua") == nil
    end, 10, "its folder to be removed")
    testing.server.rmdir(dir)
  end)

  -- kill -0 says yes to a zombie; a daemon's parent (init) may reap it
  -- seconds later: a wait for a stopped server timed out on a loaded run
  it("proc.running: false for a process that ended, reaped or not",
     function()
    local p = proc.spawn({ "sh", "-c", "exit 0" })
    testing.wait_until(function()
      local st = proc.read("/proc/" .. p.pid .. "/stat")
      return st:match("^.*%) (%S)") == "Z"
    end, 10, "the child to end (a zombie until reaped)")
    local zombie = os.execute("kill -0 " .. p.pid .. " 2>/dev/null")
    assert.is_true(zombie == 0 or zombie == true, "kill -0 of a zombie")
    assert.is_false(proc.running(p.pid))
    assert.equal(0, p:wait(5))
    assert.is_false(proc.running(p.pid))
    assert.is_true(proc.running(proc.getpid()))
    assert.is_false(proc.running("x"))
  end)

  it("is guarded only as asked: proc.guard refuses a folder outside the"
     .. " kit's, a signal it does not send, and guards no ended process",
     function()
    local p = proc.spawn({ "sleep", "30" })
    finally(function() p:stop(1) end)
    local function refused(opts, what)
      local ok, err = pcall(proc.guard, p.pid, opts)
      assert.is_false(ok)
      assert.matches(what, err, 1, true)
    end
    refused({ rmdir = "/tmp" }, "rmdir is not a")
    refused({ rmdir = proc.tmp_root() .. "/paygate-x/../.." },
            "rmdir is not a")
    refused({ signal = "KILL" }, "signal must be")
    refused({ grace = -1 }, "grace must be")
    local ok, err = pcall(proc.guard, "1; rm -rf /", {})
    assert.is_false(ok)
    assert.matches("pid must be a process id", err, 1, true)
    local done = proc.spawn({ "true" })
    assert.equal(0, done:wait(5))
    assert.is_nil(proc.guard(done.pid))
    local g = assert(proc.guard(p.pid))
    g:cancel()
    assert.is_not_nil(g:poll())
    assert.is_nil(p:poll(), "a cancelled guard ended its process")
  end)

  -- Ctrl-C in a terminal, or a CI cancelling a job, signals the whole
  -- process group: the spec run, its apps and their watchdogs alike.
  -- SIGINT is tried only where it is not ignored here (a job started in
  -- the background of a shell ignores it, and so would the spec run).
  local sigs = { TERM = proc.SIGTERM }
  if not testing.read("/proc/self/status"):match("SigIgn:%s*%x*[2367abef]\n")
  then
    sigs.INT = proc.SIGINT
  end
  for name, sig in pairs(sigs) do
    it("leaves no app and no folder behind when SIG" .. name
       .. " ends its process group", function()
      local dir = testing.tmpdir()
      local script = dir .. "/run.lua"
      testing.write(script, ([[
local testing = require "paygate.testing"
local srv = testing.start_app{ source = "" }
local keys = testing.merchant_keys()
local own = testing.tmpdir()
testing.write(own .. "/made", "x")
testing.write(%q, srv.pid .. "\n" .. srv.dir .. "\n"
  .. keys.private_key .. "\n" .. own .. "\n")
require("paygate.core").sleep(60)
]]):format(dir .. "/out"))
      -- setsid: the run leads a process group of its own, as a shell's
      -- foreground job does
      local p = proc.spawn({ "setsid", testing.server.bin(), "exec",
                             script }, { log = dir .. "/log" })
      local out
      testing.wait_until(function()
        out = testing.read(dir .. "/out"):match("^(%d+)\n(.-)\n(.-)\n(.-)\n")
        return out
      end, 30, "the run's app, keys and folder")
      local pid, app_dir, key, own =
        testing.read(dir .. "/out"):match("^(%d+)\n(.-)\n(.-)\n(.-)\n")
      pid = tonumber(pid)
      assert.is_true(alive(pid))
      assert.is_true(proc.exists(key))
      proc.kill_pid(-p.pid, sig)
      assert.is_not_nil(p:wait(10), "the spec run did not end")
      testing.wait_until(function() return not alive(pid) end, 15,
                         "the app to end")
      for _, path in ipairs({ app_dir .. "/paygate.log", key,
                              own .. "/made" }) do
        testing.wait_until(function() return not proc.exists(path) end,
                           15, path .. " to be removed")
      end
      testing.server.rmdir(dir)
    end)
  end
end)

describe("testing.wait_until and a process's wait", function()
  it("count their deadline on the monotonic clock: a wall clock stepped"
     .. " forward an hour (NTP) does not end them at once", function()
    local pcore = require "paygate.core"
    local update = pcore.update_time
    local calls = 0
    pcore.update_time = function()
      calls = calls + 1
      return update() + (calls > 1 and 3600 or 0)
    end
    local t0 = pcore.mono()
    local ok, v = pcall(testing.wait_until, function()
      return pcore.mono() - t0 > 0.1 and "met"
    end, 5, "0.1 s")
    calls = 0
    local p = testing.spawn({ "sleep", "0.2" })
    local code = p:wait(5)
    pcore.update_time = update
    assert(ok, v)
    assert.equal("met", v)
    assert.equal(0, code)
  end)
end)

describe("srv:workers", function()
  it("lists the master's workers; one killed is replaced", function()
    local app = testing.start_app{ source = [[
local paygate = require "paygate"
paygate.route("GET", "/", function() return 200, "ok" end)
]], workers = 2 }
    finally(function() app:stop() end)
    local old = app:workers()
    assert.equal(2, #old)
    assert.is_true(old[1] < old[2])
    for _, pid in ipairs(old) do
      assert.is_true(alive(pid))
      assert.not_equal(app.pid, pid)
    end
    local now = app:kill_worker(old[1])
    assert.equal(2, #now)
    assert.is_true(now[1] ~= old[1] and now[2] ~= old[1])
    assert.same({}, proc.children(old[2] + 1e6))     -- no such process
  end)
end)

-- A spec reloading its app (a hook changed live) had no kit call for it:
-- it had to know the kit's pid file (srv.dir .. "/paygate.pid", nowhere
-- documented) and read the master's PID_FILE.reload itself, as the
-- project's own specs did.
describe("srv:reload", function()
  it("loads the app's new code; code that does not load is refused with"
     .. " its file:line, the old code serving on", function()
    local v1 = [[
local paygate = require "paygate"
paygate.route("GET", "/", function() return 200, "v1" end)
]]
    local app = testing.start_app{ source = v1, workers = 2 }
    finally(function() app:stop() end)
    assert.equal("v1", app:request("/").body)
    local old = app:workers()
    testing.write(app.app .. "/app.lua", v1:gsub('"v1" end%)', '"v2" end'))
    local ok, why = app:reload()
    assert.is_nil(ok)
    assert.matches("^paygate reload: refused: ", why)
    assert.matches("/app.lua:3: ')' expected (to close '(' at line 2)", why, 1,
                   true)
    assert.equal("v1", app:request("/").body)       -- the old code serves
    assert.same(old, app:workers())
    testing.write(app.app .. "/app.lua", v1:gsub('"v1"', '"v2"'))
    local done, out = app:reload()
    assert.is_true(done)
    assert.matches("^paygate reload: done, generation %d+$", out)
    -- the old generation is gone: no answer of the spec comes from it
    local now = app:workers()
    assert.equal(2, #now)
    for _, pid in ipairs(now) do
      assert.is_false(pid == old[1] or pid == old[2])
    end
    assert.equal("v2", app:request("/").body)
    assert.has_error(function() app:reload(0) end,
                     "srv:reload: timeout must be seconds, more than 0")
  end)
end)

describe("testing.tmpdir", function()
  it("a folder a spec forgot is removed when its busted run ends",
     function()
    local dir = testing.tmpdir()
    local spec = dir .. "/forgets_spec.lua"
    testing.write(spec, ([[
local testing = require "paygate.testing"
it("makes a folder and leaves it", function()
  local d = testing.tmpdir()
  local o = assert(io.open(d .. "/key.pem", "w"))
  o:write("secret")
  o:close()
  o = assert(io.open(%q, "w"))
  o:write(d)
  o:close()
end)
]]):format(dir .. "/made"))
    local busted = assert(io.popen("command -v busted")):read("*l")
    local p = proc.spawn({ testing.server.bin(), "exec", busted, "-o", "TAP",
                           spec }, { log = dir .. "/log" })
    assert.equal(0, p:wait(60), testing.read(dir .. "/log"))
    local made = testing.read(dir .. "/made")
    assert.equal(proc.tmp_root() .. "/paygate-test.",
                 made:sub(1, #proc.tmp_root() + 14))
    assert.is_nil(io.open(made .. "/key.pem"), "left behind: " .. made)
    testing.server.rmdir(dir)
  end)

  it("names its folder after the name given (the project's spec helpers"
     .. " say spec); a name that is no plain word is refused", function()
    local d = testing.tmpdir("spec")
    assert.equal(proc.tmp_root() .. "/paygate-spec.",
                 d:sub(1, #proc.tmp_root() + 14))
    assert.is_true(proc.exists(d .. "/."))
    testing.server.rmdir(d)
    assert.is_false(proc.exists(d .. "/."))
    for _, bad in ipairs({ "../x", "a/b", "", 5 }) do
      assert.error_matches(function() testing.tmpdir(bad) end,
                           "name must be letters")
    end
  end)
end)

describe("testing.simulator", function()
  local sim, app

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    -- acknowledges /ok, refuses /fail
    app = testing.start_app{ source = [[
local paygate = require "paygate"
paygate.route("POST", "/ok", function() return 204, "" end)
paygate.route("POST", "/fail", function() return 500, "no" end)
paygate.route("POST", "/raise", function()
  paygate.log.info(("filler "):rep(2000))
  error("the handler's own mistake")
end)]] }
  end)

  teardown(testing.stop_all)

  it("creates an order, pays it and waits for the app's answer", function()
    local no, data = sim:order{ notify_url = app:url("/ok"), total = 7 }
    assert.matches("^weixin://", data.code_url)
    local d = sim:pay_and_wait(no)
    assert.equal("TRANSACTION.SUCCESS", d.event_type)
    assert.equal(no, d.resource.out_trade_no)
    assert.equal(7, d.resource.amount.total)
    assert.equal(204, d.last.status)
  end)

  -- (docs/testing.md's run checks the spec's output holds no info line)
  it("makes its own clients warn-only, not the app's configuration",
     function()
    assert.is_nil(sim:client_config().log_level)
    local wx = sim:client()
    wx:stop()
    assert.equal("warn", wx.conf.log_level)
    wx = sim:client(nil, { log_level = "info" })
    wx:stop()
    assert.equal("info", wx.conf.log_level)
    wx = sim:client(nil, { log_level = false })      -- the runtime's level
    wx:stop()
    assert.is_nil(wx.conf.log_level)
  end)

  it("raises with what the app answered when it never acknowledges",
     function()
    local no = sim:order{ notify_url = app:url("/fail") }
    sim:pay(no)
    -- retries come 0.15 s, 0.15 s, 0.3 s... apart: three attempts arrive
    local d = sim:wait_notification(no, { attempts = 3 })
    -- (the three waited for: a fourth may be on its way already)
    for i = 1, 3 do assert.equal(500, d.attempts[i].status) end
    local ok, err = pcall(sim.wait_notification, sim, no, { timeout = 0.5 })
    assert.is_false(ok)
    assert.matches("no acknowledged delivery", err)
    assert.matches('"status":500', err)
    -- what the app answered comes first, with where to read why: not only
    -- the advice to wait longer, which would not help
    assert.matches("the app answered 500 to every attempt (", err, 1, true)
    assert.matches("srv:logs()", err, 1, true)
    assert.truthy(err:find("every attempt", 1, true)
                  < err:find("seen:", 1, true), err)
    -- the URL the app was called at, as written (no "\/" escapes)
    assert.truthy(err:find("/fail", 1, true), err)
    assert.is_nil(err:find("\\/", 1, true), err)
  end)

  -- why the app answered 500 is in its log: the message shows its end
  -- (bounded), so the spec's output says it without a print of its own
  it("shows the end of the app's log when the app answered 500", function()
    local no = sim:order{ notify_url = app:url("/raise") }
    sim:pay(no)
    sim:wait_notification(no, { attempts = 2 })
    local ok, err = pcall(sim.wait_notification, sim, no, { timeout = 0.5 })
    assert.is_false(ok)
    assert.matches("the app answered 500 to every attempt (", err, 1, true)
    assert.matches("the handler's own mistake", err, 1, true)
    assert.matches("bytes before left out", err, 1, true)
    assert.is_true(#err < 16000, #err .. " bytes")
  end)

  -- every matching delivery was shown whole (its resource, each of up to
  -- 16 attempts): a wait on many pages of output
  it("shows a bounded part of what it saw when many deliveries match",
     function()
    local nos = {}
    for i = 1, 12 do
      nos[i] = sim:order{ notify_url = app:url("/fail"), total = 5 }
      sim:pay(nos[i])
    end
    for i = 1, 12 do sim:wait_notification(nos[i], { attempts = 2 }) end
    local ok, err = pcall(sim.wait_notification, sim,
      { state = "pending", event_type = "TRANSACTION.SUCCESS" },
      { timeout = 0.5 })
    assert.is_false(ok)
    assert.matches("no acknowledged delivery", err, 1, true)
    assert.matches('"status":500', err, 1, true)
    -- (12 of this it's, and any an earlier it left pending)
    local more = tonumber(err:match("(%d+) more matching deliveries not"
                                    .. " shown"))
    assert.is_true(more and more >= 9, err)
    -- (the end of the app's log before it is bounded on its own: 4 KB)
    local seen = assert(err:match("; seen: (.*)$"))
    assert.is_true(#seen < 3500, #seen .. " bytes")
    -- one delivery with many attempts: its last ones, bounded
    ok, err = pcall(sim.wait_notification, sim, nos[1], { timeout = 0.5 })
    assert.is_false(ok)
    assert.matches('"status":500', err, 1, true)
    seen = assert(err:match("; seen: (.*)$"))
    assert.is_true(#seen < 1200, #seen .. " bytes")
    assert.matches(nos[1], seen, 1, true)
  end)

  it("says a notify_url without a route is the URL's fault", function()
    local no = sim:order{ notify_url = app:url("/no/such/route") }
    sim:pay(no)
    sim:wait_notification(no, { attempts = 2 })
    local ok, err = pcall(sim.wait_notification, sim, no, { timeout = 0.5 })
    assert.is_false(ok)
    assert.matches("the app answered 404 to every attempt (", err, 1, true)
    assert.matches("no route of the app takes a POST to notify_url's path",
                   err, 1, true)
    assert.is_nil(err:find("notify handler refused", 1, true), err)
  end)

  -- an auth hook (README's paygate.before example) answers WeChat's
  -- notifications 401 before the notify handler runs: the message sent the
  -- reader to a handler that never ran and a log with no word of it
  it("names a before hook when the app answered 401 to every attempt",
     function()
    local hooked = testing.start_app{ source = [[
local paygate = require "paygate"
paygate.before(function(req)
  if not req:header("authorization") then return 401, { error = "unauthorized" } end
end)
paygate.route("POST", "/notify", function() return 204, "" end)]] }
    local no = sim:order{ notify_url = hooked:url("/notify") }
    sim:pay(no)
    sim:wait_notification(no, { attempts = 2 })
    local ok, err = pcall(sim.wait_notification, sim, no, { timeout = 0.3 })
    assert.is_false(ok)
    assert.matches("the app answered 401 to every attempt (", err, 1, true)
    assert.matches("paygate.before hook", err, 1, true)
    hooked:stop()
  end)

  it("waits for the event_type opts names, not the order's payment",
     function()
    local no = sim:order{ notify_url = app:url("/ok"), total = 3 }
    sim:pay_and_wait(no)
    local wx = sim:client()
    local rno = "R" .. no
    assert(wx:refund{ out_trade_no = no, out_refund_no = rno,
      notify_url = app:url("/fail"),
      amount = { refund = 3, total = 3, currency = "CNY" } })
    sim:settle(rno)
    wx:stop()
    -- the refund's notification is refused: no acknowledged REFUND.SUCCESS
    -- (the payment's TRANSACTION.SUCCESS, acknowledged, is not it)
    local ok, err = pcall(sim.wait_notification, sim, no,
                          { event_type = "REFUND.SUCCESS", timeout = 0.5 })
    assert.is_false(ok, "took " .. tostring(ok and err.event_type))
    assert.matches("REFUND.SUCCESS", err, 1, true)
    local d = sim:wait_notification(no, { event_type = "REFUND.SUCCESS",
                                          attempts = 1 })
    assert.equal("REFUND.SUCCESS", d.event_type)
    assert.equal(rno, d.resource.out_refund_no)
    assert.equal(500, d.attempts[1].status)
  end)

  -- nothing matched at all: the wait ended with "seen: []" and no word of
  -- why. A payment is notified once paid; a refund once settled, and only
  -- when it was made with a notify_url (a spec's refund without one was
  -- waited for in vain)
  it("says why no notification was made when none matches", function()
    local no = sim:order{ notify_url = app:url("/ok"), total = 4 }
    local ok, err = pcall(sim.wait_notification, sim, no, { timeout = 0.3 })
    assert.is_false(ok)
    assert.matches("the simulator made no notification matching it",
                   err, 1, true)
    assert.matches("sim:pay(out_trade_no)", err, 1, true)
    sim:pay_and_wait(no)
    local wx = sim:client()
    local rno = "R" .. no
    assert(wx:refund{ out_trade_no = no, out_refund_no = rno,   -- no notify_url
      amount = { refund = 4, total = 4, currency = "CNY" } })
    wx:stop()
    ok, err = pcall(sim.wait_notification, sim, { out_refund_no = rno },
                    { timeout = 0.3 })
    assert.is_false(ok)
    assert.matches("a refund is notified once it settles", err, 1, true)
    sim:settle(rno)
    ok, err = pcall(sim.wait_notification, sim, { out_refund_no = rno },
                    { timeout = 0.3 })
    assert.is_false(ok)
    assert.matches("no notification for refund " .. rno
                   .. ", which sim:settle settled", err, 1, true)
    assert.matches("made with a notify_url", err, 1, true)
  end)

  -- sim:settle, made to remember what it settled, stopped tail-calling
  -- sim:control: its failure named a line of paygate/testing.lua instead
  -- of the spec's, as sim:pay's and every other control call's name it.
  -- And a refund it could not settle is not taken as settled.
  it("sim:settle's failure names the spec's line", function()
    local ok, err = pcall(function() sim:settle("Rnone") end)
    assert.is_false(ok)
    assert.matches("^[^\n]*testing_kit_spec%.lua:%d+: simulator POST"
                   .. " /sim/refunds/Rnone/settle: 404", err)
    assert.is_nil(sim.settled and sim.settled.Rnone)
  end)

  -- a match naming nothing (its value nil: a field the app's answer named
  -- otherwise) or a misspelt key would match any delivery: the payment's
  -- acknowledged one made a wait for a refund never made pass
  it("refuses a match that names nothing, or a key it does not know",
     function()
    local no = sim:order{ notify_url = app:url("/ok") }
    sim:pay_and_wait(no)
    local refund = {}
    local ok, err = pcall(sim.wait_notification, sim,
                          { out_refund_no = refund.out_refund_no },
                          { timeout = 0.5 })
    assert.is_false(ok, "took " .. tostring(ok and err.event_type))
    assert.matches("sim:wait_notification: match names nothing", err, 1,
                   true)
    ok, err = pcall(sim.wait_notification, sim,
                    { out_trade_no = no, out_refund = "R" .. no },
                    { timeout = 0.5 })
    assert.is_false(ok, "took " .. tostring(ok and err.event_type))
    assert.matches("sim:wait_notification: unknown key match.out_refund "
                   .. "(known: event_type, id, mchid, out_refund_no,",
                   err, 1, true)
    ok, err = pcall(sim.wait_notification, sim, nil)
    assert.is_false(ok)
    assert.matches("sim:wait_notification: match must be", err, 1, true)
  end)

  -- ignored, totl would order 1 fen, and timout would wait 15 s
  it("refuses a misspelt option of an order or of a wait, naming it",
     function()
    local ok, err = pcall(sim.order, sim,
                          { notify_url = app:url("/ok"), totl = 500 })
    assert.is_false(ok)
    assert.matches("sim:order: unknown option o.totl (known: appid,", err,
                   1, true)
    local no = sim:order{ notify_url = app:url("/ok") }
    ok, err = pcall(sim.pay_and_wait, sim, no, { timout = 30 })
    assert.is_false(ok)
    assert.matches("sim:pay_and_wait: unknown option o.timout (known:",
                   err, 1, true)
    sim:pay(no)
    ok, err = pcall(sim.wait_notification, sim, no, { attempt = 1 })
    assert.is_false(ok)
    assert.matches("sim:wait_notification: unknown option o.attempt "
                   .. "(known: attempts, event_type, mchid, timeout)", err,
                   1, true)
  end)

  it("makes clients for the merchant it configured", function()
    local wx = sim:client()
    local no = sim:order{ notify_url = app:url("/ok") }
    assert.equal("NOTPAY", assert(wx:query_by_out_trade_no(no)).trade_state)
    sim:fail(no)
    assert.equal("PAYERROR", assert(wx:query_by_out_trade_no(no)).trade_state)
    wx:stop()
  end)

  it("sim:hold keeps a call at WeChat until the spec releases it",
     function()
    local wx = sim:client()
    local no = sim:order{ notify_url = app:url("/ok") }
    local h = sim:hold("query")
    local got
    require("paygate.core").spawn(function()
      got = { wx:query_by_out_trade_no(no) }
    end)
    local f = h:wait_held(1, 10)
    assert.equal(1, f.held)
    assert.is_nil(got, "answered while held")
    -- what the spec does while the call is in flight comes first
    sim:pay(no)
    assert.is_true(h:release().released)
    testing.wait_until(function() return got ~= nil end, 5, "the query")
    assert.equal("SUCCESS", assert(got[1], tostring(got[2])).trade_state)
    -- count 1: the next query is not held
    assert.equal("SUCCESS", assert(wx:query_by_out_trade_no(no)).trade_state)
    wx:stop()
  end)

  it("h:wait_held says how far it got, and a hold released holds nothing",
     function()
    local h = sim:hold("close", { seconds = 5 })
    local ok, err = pcall(h.wait_held, h, 1, 0.3)
    assert.is_false(ok)
    assert.matches("timed out waiting for requests to close held by fault "
      .. h.id .. " (last seen: 0 held of 1 wanted, 0 taken in all; each"
      .. " is held at most 5 s)", err, 1, true)
    h:release()
    ok, err = pcall(h.wait_held, h, 1, 5)
    assert.is_false(ok)
    assert.matches("was released: it holds nothing", err, 1, true)
    ok, err = pcall(sim.hold, sim, "query", { cout = 1 })
    assert.is_false(ok)
    assert.matches("sim:hold: unknown option o.cout (known: count, seconds)",
                   err, 1, true)
    -- released after the faults were cleared (which let its requests go):
    -- nothing to do, and no error (a release in a `finally`)
    assert.equal(h.id, h:release().id)            -- a second release
    local h2 = sim:hold("close")
    sim:clear_faults()
    assert.is_nil(h2:release())
  end)
end)

describe("testing.simulator with a merchant of two appids", function()
  teardown(testing.stop_all)

  it("its client takes both: an order under the second is placed",
     function()
    local A, B = "wx1111111111111111", "wx2222222222222222"
    local sim = testing.simulator{ merchants = {
      testing.merchant{ appids = { A, B } } } }
    local c = sim:client_config()
    assert.equal(A, c.appid)
    assert.same({ B }, c.appids)
    local no = sim:order{ notify_url = "http://127.0.0.1:1/notify",
                          appid = B }
    local wx = sim:client()
    local t = assert(wx:query_by_out_trade_no(no))
    wx:stop()
    assert.equal(B, t.appid)
    assert.equal("NOTPAY", t.trade_state)
  end)
end)

describe("testing.simulator on WeChat's own retry schedule", function()
  teardown(testing.stop_all)

  it("a wait for a retry not due yet says when it is due and what to do",
     function()
    local sim = testing.simulator()
    local app = testing.start_app{ source = [[
local paygate = require "paygate"
paygate.route("POST", "/fail", function() return 500, "no" end)]] }
    local no = sim:order{ notify_url = app:url("/fail") }
    sim:pay(no)
    sim:wait_notification(no, { attempts = 1 })
    local ok, err = pcall(sim.wait_notification, sim, no,
                          { attempts = 2, timeout = 0.5 })
    assert.is_false(ok)
    assert.matches("no 2 attempts", err)
    -- the first retry comes 15 s after the failed attempt
    assert.matches("its next attempt is due in 1%d%.%d s", err)
    assert.matches("time_scale = 100", err, 1, true)
  end)

  it("with a time_scale already set, a wait for a retry not due yet says"
     .. " to wait longer, not to set one", function()
    local sim = testing.simulator{ time_scale = 100 }
    local app = testing.start_app{ source = [[
local paygate = require "paygate"
paygate.route("POST", "/fail", function() return 500, "no" end)]] }
    local no = sim:order{ notify_url = app:url("/fail") }
    sim:pay(no)
    -- 15 s, 15 s, 30 s, 3 min: /100, the fifth comes 1.8 s after the
    -- fourth
    sim:wait_notification(no, { attempts = 4 })
    local ok, err = pcall(sim.wait_notification, sim, no,
                          { attempts = 5, timeout = 0.5 })
    assert.is_false(ok)
    assert.matches("its next attempt is due in %d%.%d s", err)
    assert.is_nil(err:find("start the simulator with a time_scale", 1,
                           true), err)
    assert.matches("time_scale 100", err, 1, true)
    assert.matches("opts.timeout", err, 1, true)
  end)
end)

-- Two merchants may use the same out_trade_no: the control API then asks
-- which one (409 AMBIGUOUS) and ?mchid= picks it (sim:pay's mchid).
describe("testing.simulator with two merchants", function()
  local sim, app

  setup(function()
    sim = testing.simulator{ merchants = 2, time_scale = 100 }
    app = testing.start_app{ source = [[
local paygate = require "paygate"
paygate.route("POST", "/ok", function() return 204, "" end)]] }
  end)

  teardown(testing.stop_all)

  it("pays the one ?mchid= names when both have the out_trade_no",
     function()
    local a, b = sim.merchants[1], sim.merchants[2]
    local no = testing.out_trade_no()
    sim:order{ merchant = a, out_trade_no = no, notify_url = app:url("/ok"),
               total = 3 }
    sim:order{ merchant = b, out_trade_no = no, notify_url = app:url("/ok"),
               total = 5 }
    local body, res = sim:control("POST", "/sim/transactions/" .. no
                                  .. "/pay", nil, 409)
    assert.equal("AMBIGUOUS", body.code, res.body)
    local paid = sim:pay(no, b.mchid)
    assert.equal("SUCCESS", paid.trade_state)
    assert.equal(5, paid.amount.total)
    -- a's order is untouched; b's answers SUCCESS at its own query
    local wa = sim:client(a)
    local wb = sim:client(b)
    assert.equal("NOTPAY", assert(wa:query_by_out_trade_no(no)).trade_state)
    assert.equal("SUCCESS", assert(wb:query_by_out_trade_no(no)).trade_state)
  end)
end)

-- With partner = true the kit configures a service provider with one
-- sub-merchant (sim.partner): sim:order places a partner order for it.
describe("testing.simulator with a service provider", function()
  local sim, app

  setup(function()
    sim = testing.simulator{ partner = true, time_scale = 100 }
    app = testing.start_app{ source = [[
local paygate = require "paygate"
paygate.route("POST", "/ok", function() return 204, "" end)]] }
  end)

  teardown(testing.stop_all)

  it("sim:order{ merchant = sim.partner } orders for the sub-merchant",
     function()
    local p = sim.partner
    local no, data = sim:order{ merchant = p, notify_url = app:url("/ok"),
                                total = 4 }
    assert.matches("^weixin://", data.code_url)
    local d = sim:pay_and_wait(no)
    assert.equal(p.mchid, d.resource.sp_mchid)
    assert.equal(p.sub_mchid, d.resource.sub_mchid)
    assert.equal(p.appid, d.resource.sp_appid)
    assert.equal(4, d.resource.amount.total)
    -- the notification is the provider's; the sub-merchant names it too,
    -- as ?mchid= does for pay and settle
    for _, id in ipairs({ p.mchid, p.sub_mchid }) do
      local l = sim:notifications{ mchid = id, out_trade_no = no }
      assert.equal(1, #l, id)
      assert.equal(d.id, l[1].id)
    end
    assert.equal(0, #sim:notifications{ mchid = sim.merchant.mchid,
                                         out_trade_no = no })
    local wx = sim:client(p)
    local t = assert(wx:query_by_out_trade_no(no, p.sub_mchid))
    assert.equal("SUCCESS", t.trade_state)
    wx:stop()
  end)
end)

-- The replay check's nonces fill at most NONCE_SHARE of the "paygate"
-- dictionary: past that they are not recorded (said once in the log),
-- and the simulator's own state there -- a fault's count -- is never
-- evicted for them. (They used to evict the least recently used
-- entries: a count-limited fault taken once before a burst of requests
-- lost its count and fired again.)
describe("testing.simulator under a burst of requests", function()
  local sim

  setup(function()
    sim = testing.simulator{ config = { shared = { paygate = "512k" } } }
  end)

  teardown(testing.stop_all)

  it("keeps a fault's count however many nonces come", function()
    local wx = sim:client(nil, { max_attempts = 1 })   -- no retry of a 500
    sim:fault{ endpoint = "close", kind = "error", status = 500, count = 2 }
    local no = testing.out_trade_no()
    local _, err = wx:close(no)
    assert.equal(500, err.status)                    -- the fault's first
    -- ~150 bytes a nonce: 6,000 distinct requests are well past 512 KB
    for i = 1, 6000 do
      local t, qerr = wx:query_by_out_trade_no(no .. "q")
      assert(t == nil and qerr.kind == "not_found", "request " .. i)
    end
    _, err = wx:close(no)
    assert.equal(500, err.status)                    -- its second
    local ok, err3 = wx:close(no)                    -- and no more
    assert(ok or (err3 and err3.status ~= 500), err3 and tostring(err3))
    assert.truthy(sim.srv:logs():find("records no more nonces", 1, true))
  end)
end)

describe("proc.exists and proc.read", function()
  it("tell a missing file from an empty one (read cannot)", function()
    local path = os.tmpname()
    os.remove(path)
    assert.is_false(proc.exists(path))
    assert.equal("", proc.read(path))
    proc.write(path, "")
    assert.is_true(proc.exists(path))
    assert.equal("", proc.read(path))
    os.remove(path)
  end)
end)
