-- A kit call that fails names the spec's line that called it, as busted
-- shows it ("spec/pay_spec.lua:42: timed out waiting for ..."), not a line
-- of the kit's own source: h:wait_held named paygate/testing.lua's, and its
-- "released" and "cleared" errors no line at all; srv:reload named
-- paygate/testing/server.lua's; sim:hold, sim:requests,
-- sim:notifications, sim:pay_and_wait, sim:client_config, sim:client and
-- sim:order named the kit's line where they call the simulator, or the
-- kit's function they call; testing.merchant and testing.simulator named
-- the kit's line when openssl failed; proc.run the kit's line when its
-- command could not start, and testing.write no line when the file could
-- not be written. The rest of each message is as it was.
local ffi = require "ffi"
local testing = require "paygate.testing"
local proc = require "paygate.testing.proc"

local here = debug.getinfo(1, "S").short_src

-- fn's error, which must start with this file's name and the line raised
-- is called on (write fn's call on that line too); returns the message
-- after that "file:line: "
local function raised(fn)
  local line = debug.getinfo(2, "l").currentline
  local ok, err = pcall(fn)
  assert.is_false(ok, "it did not raise")
  err = tostring(err)
  local want = here .. ":" .. line .. ": "
  assert.equal(want, err:sub(1, #want), "the error: " .. err)
  return err:sub(#want + 1)
end

local function starts(prefix, text)
  assert.equal(prefix, text:sub(1, #prefix), "the message: " .. text)
end

-- Linux's (x86, ARM): the master stopped reaps and replaces no worker
local SIGSTOP, SIGCONT = 19, 18

describe("the test kit's errors name the spec's line", function()
  teardown(testing.stop_all)

  it("srv:kill_worker's and srv:reload's timeouts", function()
    local dir = testing.tmpdir()
    -- /slow answers once the spec made dir/go: until then the old
    -- generation's worker drains it, past the reload's timeout
    local app = testing.start_app{ source = ([[
local paygate = require "paygate"
paygate.route("GET", "/slow", function()
  local f = io.open(%q, "w") f:close()
  for _ = 1, 300 do
    local go = io.open(%q) if go then go:close() break end
    paygate.sleep(0.05)
  end
  return 200, "ok"
end)
]]):format(dir .. "/in", dir .. "/go") }
    finally(function()
      proc.kill_pid(app.pid, SIGCONT)
      testing.write(dir .. "/go", "")
    end)
    local old = app:workers()
    proc.kill_pid(app.pid, SIGSTOP)
    local err = raised(function() app:kill_worker(old[1], 0.2) end)
    starts("timed out waiting for worker " .. old[1] .. " replaced", err)
    proc.kill_pid(app.pid, SIGCONT)
    testing.wait_until(function()
      local now = app:workers()
      return #now == 1 and now[1] ~= old[1]
    end, 15, "the killed worker replaced")

    local got
    require("paygate.core").spawn(function()
      got = app:request{ path = "/slow", timeout = 30 }
    end)
    testing.wait_until(function() return proc.exists(dir .. "/in") end, 10,
                       "the request at the handler")
    err = raised(function() app:reload(1) end)
    starts("timed out waiting for the old workers to exit after the reload"
           .. " (last seen: old workers still running: ", err)
    testing.write(dir .. "/go", "")
    testing.wait_until(function() return got end, 15, "the slow answer")
    assert.equal(200, got.status)
  end)

  describe("a simulator's", function()
    local sim
    setup(function()
      sim = testing.simulator{ verifier_mode = "public_key" }
    end)

    it("h:wait_held's timeout, and a hold released or cleared", function()
      local h = sim:hold("close", { seconds = 5 })
      local err = raised(function() h:wait_held(1, 0.3) end)
      starts("timed out waiting for requests to close held by fault "
             .. h.id .. " (last seen: 0 held of 1 wanted, 0 taken in all;"
             .. " each is held at most 5 s)", err)
      h:release()
      err = raised(function() h:wait_held(1, 5) end)
      assert.equal("sim:hold: fault " .. h.id .. " was released: it holds"
                   .. " nothing", err)
      local h2 = sim:hold("close")
      sim:clear_faults()
      err = raised(function() h2:wait_held() end)
      assert.equal("sim:hold: fault " .. h2.id .. " was cleared: it holds"
                   .. " nothing", err)
    end)

    it("refusals: sim:hold's, sim:pay_and_wait's", function()
      local err = raised(function() sim:hold("nosuch") end)
      starts("simulator POST /sim/faults: 400 ", err)
      err = raised(function() sim:pay_and_wait("Tnosuch") end)
      starts("simulator POST /sim/transactions/Tnosuch/pay: 404 ", err)
    end)

    it("sim:order's when its client cannot be made", function()
      local m = { mchid = "1900000109", appid = "wx8888888888888888",
                  appids = { "wx8888888888888888" },
                  apiv3_key = testing.apiv3_key(),
                  private_key = "/nonexistent/key.pem",
                  certificate = "/nonexistent/cert.pem" }
      local o = { notify_url = sim.url, merchant = m }
      local err = raised(function() sim:order(o) end)
      starts("testing: wechatpay.client: ", err)
    end)

    it("calls to a simulator that is gone", function()
      local h = sim:hold("close")
      sim:stop()
      local gone = ": connect: "
      local err = raised(function() h:wait_held() end)
      starts("simulator GET /sim/faults" .. gone, err)
      err = raised(function() sim:requests() end)
      starts("simulator GET /sim/requests" .. gone, err)
      err = raised(function() sim:notifications{ out_trade_no = "T1" } end)
      starts("simulator GET /sim/notifications?out_trade_no=T1" .. gone, err)
      err = raised(function() sim:hold("close") end)
      starts("simulator POST /sim/faults" .. gone, err)
      err = raised(function() sim:pay_and_wait("T1") end)
      starts("simulator POST /sim/transactions/T1/pay" .. gone, err)
      -- what failed, not "no acknowledged delivery ... in 5 s" at once
      err = raised(function() sim:wait_notification("T1", { timeout = 5 }) end)
      starts("simulator GET /sim/notifications?out_trade_no=T1" .. gone, err)
      err = raised(function() sim:client_config() end)
      starts("simulator GET /sim/public-key" .. gone, err)
      err = raised(function() sim:client() end)
      starts("simulator GET /sim/public-key" .. gone, err)
      err = raised(function() sim:order{ notify_url = sim.url } end)
      starts("simulator GET /sim/public-key" .. gone, err)
      -- (as these named it already)
      err = raised(function() sim:pay("T1") end)
      starts("simulator POST /sim/transactions/T1/pay" .. gone, err)
      err = raised(function() h:release() end)
      starts("simulator POST /sim/faults/" .. h.id .. "/release" .. gone, err)
    end)
  end)

  it("testing.merchant's and testing.simulator's when openssl fails",
     function()
    -- an openssl first in PATH that fails
    local bin = testing.tmpdir()
    testing.write(bin .. "/openssl", "#!/bin/sh\necho 'no keys today' >&2\n"
                  .. "exit 1\n")
    assert.equal(0, (proc.run({ "chmod", "+x", bin .. "/openssl" })))
    pcall(ffi.cdef, "int setenv(const char *, const char *, int);")
    local path = os.getenv("PATH")
    ffi.C.setenv("PATH", bin .. ":" .. path, 1)
    finally(function() ffi.C.setenv("PATH", path, 1) end)
    local err = raised(function() testing.merchant() end)
    starts("testing: openssl failed making an RSA key and certificate: "
           .. "no keys today", err)
    err = raised(function() testing.simulator() end)
    starts("testing: openssl failed making an RSA key and certificate: "
           .. "no keys today", err)
    -- (as it named it already)
    err = raised(function() testing.merchant_keys() end)
    starts("testing: openssl failed making an RSA key and certificate: "
           .. "no keys today", err)
  end)

  it("proc.run's when its command cannot start, testing.write's when the"
     .. " file cannot be written", function()
    local err = raised(function() proc.run({ "/nonexistent/cmd" }) end)
    starts("spawn: cannot start /nonexistent/cmd", err)
    err = raised(function() testing.write("/nonexistent/dir/f", "x") end)
    starts("/nonexistent/dir/f: No such file or directory", err)
  end)
end)
