-- paygate.testing leaves nothing behind a spec run that fails or errors:
-- a user's spec run (`paygate exec busted`) is run here as a child, and the
-- moment it has ended, no process it started remains (not even a zombie)
-- and no folder it made is left in its TMPDIR. PAYGATE_TEST_KEEP keeps the
-- folders (and says where they are), never the processes.
local testing = require "paygate.testing"
local proc = require "paygate.testing.proc"
local core = require "paygate.core"

local BUSTED = assert(io.popen("command -v busted")):read("*l")

-- A user's spec, run from the checkout's root: it records what the kit
-- started (the run's children: apps, their watchdogs and any helper
-- shell) and the folders it made, then fails or errors.
local HEAD = [[
local testing = require "paygate.testing"
local proc = require "paygate.testing.proc"
local function report(...)
  local f = assert(io.open(os.getenv("REPORT"), "a"))
  for _, v in ipairs({ ... }) do f:write(tostring(v), "\n") end
  f:write("children ", table.concat(proc.children(proc.getpid()), " "), "\n")
  f:close()
end
]]

local SPECS = {
  ["setup raises after starting a simulator and an app, no teardown"] = [[
describe("the shop", function()
  setup(function()
    local sim = testing.simulator()
    local app = testing.start_app{ source = "",
                                   config = { wechatpay = sim:client_config() } }
    report("dir " .. sim.dir, "dir " .. app.dir,
           "file " .. sim.merchant.private_key)
    error("setup broke")
  end)
  it("never runs", function() end)
end)
]],
  ["a test errors mid-way and the next fails, no teardown"] = [[
it("errors mid-way", function()
  local app = testing.start_app{ source = "" }
  local own = testing.tmpdir()
  testing.write(own .. "/state", "x")
  local code = proc.run({ "true" })
  report("dir " .. app.dir, "dir " .. own, "code " .. code)
  error("the handler's own mistake")
end)
it("fails", function()
  local app = testing.start_app{ source = "", workers = 2 }
  report("dir " .. app.dir)
  assert.equal(1, 2)
end)
]],
}

-- what the run reported: its folders (and files in them) and the pids of
-- the children it had at each report
local function reported(path)
  local dirs, files, pids = {}, {}, {}
  for line in testing.read(path):gmatch("[^\n]+") do
    local k, v = line:match("^(%S+) ?(.*)$")
    if k == "dir" then dirs[#dirs + 1] = v
    elseif k == "file" then files[#files + 1] = v
    elseif k == "children" then
      for pid in v:gmatch("%d+") do pids[tonumber(pid)] = true end
    end
  end
  return dirs, files, pids
end

-- processes whose command line names one of the folders (an app's
-- master and workers name theirs: --pid-file, --config)
local function naming(dirs)
  local found = {}
  for _, name in ipairs(core.listdir("/proc") or {}) do
    if name:match("^%d+$") then
      -- (a process that ended since the listing has no cmdline: nil, not
      -- an error -- other specs' processes come and go meanwhile)
      local cmd = (testing.read("/proc/" .. name .. "/cmdline") or "")
                  :gsub("%z", " ")
      for _, d in ipairs(dirs) do
        if cmd:find(d, 1, true) then
          found[#found + 1] = name .. ": " .. cmd:sub(1, 160)
        end
      end
    end
  end
  return found
end

-- runs the spec text in a child `paygate exec busted` with TMPDIR set to
-- a fresh folder (env: more NAME=VALUE for it); returns its exit code, its output, the report's path
-- and that TMPDIR
local function run_child(text, env)
  local dir = testing.tmpdir()
  local tmp = dir .. "/tmp"
  assert(core.mkdir_p(tmp))
  local spec = dir .. "/user_spec.lua"
  testing.write(spec, HEAD .. text)
  -- (this run's own PAYGATE_TEST_KEEP is not the child's)
  local argv = { "env", "TMPDIR=" .. tmp, "REPORT=" .. dir .. "/report",
                 "PAYGATE_TEST_KEEP=" }
  for _, e in ipairs(env or {}) do argv[#argv + 1] = e end
  for _, a in ipairs({ testing.server.bin(), "exec", BUSTED, "-o", "TAP",
                       spec }) do
    argv[#argv + 1] = a
  end
  local p = proc.spawn(argv, { log = dir .. "/log" })
  local code = p:wait(120)
  if code == nil then p:stop(5) end
  assert.is_not_nil(code, "the spec run did not end: "
                    .. testing.read(dir .. "/log"))
  return code, testing.read(dir .. "/log"), dir .. "/report", tmp
end

describe("a failing spec run", function()
  for name, text in pairs(SPECS) do
    it("leaves no process and no folder behind when " .. name, function()
      local code, log, report, tmp = run_child(text)
      assert.are_not.equal(0, code, log)
      assert.matches("not ok 1", log)
      local dirs, files, pids = reported(report)
      assert.is_true(#dirs >= 2, log)
      -- no process the run started remains, not even unreaped
      for pid in pairs(pids) do
        assert.equal("", testing.read("/proc/" .. pid .. "/stat"),
                     "process " .. pid .. " of the run remains: "
                     .. testing.read("/proc/" .. pid .. "/cmdline")
                        :gsub("%z", " "))
      end
      assert.same({}, naming(dirs))
      -- every folder was made in its TMPDIR, and is gone
      for _, d in ipairs(dirs) do
        assert.equal(tmp .. "/paygate-", d:sub(1, #tmp + 9))
        assert.is_false(proc.exists(d .. "/."), d .. " remains")
      end
      for _, f in ipairs(files) do
        assert.is_false(proc.exists(f), f .. " remains")
      end
      assert.same({}, core.listdir(tmp))
    end)
  end

  it("keeps its folders with PAYGATE_TEST_KEEP, saying where they are,"
     .. " and still stops its processes", function()
    local text = SPECS["a test errors mid-way and the next fails, no teardown"]
    local code, log, report, tmp = run_child(text,
                                             { "PAYGATE_TEST_KEEP=1" })
    assert.are_not.equal(0, code, log)
    local dirs, _, pids = reported(report)
    assert.equal(3, #dirs, log)
    for pid in pairs(pids) do
      assert.equal("", testing.read("/proc/" .. pid .. "/stat"),
                   "process " .. pid .. " of the run remains")
    end
    assert.same({}, naming(dirs))
    for _, d in ipairs(dirs) do
      assert.is_true(proc.exists(d .. "/."), d .. " was not kept")
      assert.matches(d, log, 1, true)
    end
    assert.equal("x", testing.read(dirs[2] .. "/state"))
    assert.matches("PAYGATE_TEST_KEEP", log, 1, true)
    assert.is_true(#core.listdir(tmp) >= 3)
  end)
end)

-- A CI's timeout (timeout(1), a runner cancelling a job) SIGKILLs the
-- whole process group of the spec run: busted, the kit's apps and any
-- shell in that group die at once, and nothing of the run gets to clean
-- up after itself.
describe("a spec run killed with its process group (SIGKILL)", function()
  it("leaves no process and no folder behind", function()
    local dir = testing.tmpdir()
    local tmp = dir .. "/tmp"
    assert(core.mkdir_p(tmp))
    local spec = dir .. "/user_spec.lua"
    testing.write(spec, HEAD .. [[
it("is killed mid-way", function()
  local sim = testing.simulator()
  local app = testing.start_app{ source = "",
                                 config = { wechatpay = sim:client_config() } }
  local own = testing.tmpdir()
  testing.write(own .. "/state", "x")
  report("dir " .. sim.dir, "dir " .. app.dir, "dir " .. own,
         "file " .. sim.merchant.private_key,
         "children " .. table.concat(app:workers(), " ") .. " "
         .. table.concat(proc.children(sim.srv.pid), " "), "ready")
  require("paygate.core").sleep(300)
end)
]])
    local report = dir .. "/report"
    -- setsid: the run leads a process group of its own, as a CI's job does
    local p = proc.spawn({ "setsid", "env", "TMPDIR=" .. tmp,
      "REPORT=" .. report, "PAYGATE_TEST_KEEP=", testing.server.bin(),
      "exec", BUSTED, "-o", "TAP", spec }, { log = dir .. "/log" })
    finally(function()
      proc.kill_pid(-p.pid, proc.SIGKILL)
      p:wait(5)
    end)
    testing.wait_until(function()
      if p:poll() then error("the run ended: " .. testing.read(dir .. "/log")) end
      return testing.read(report):find("\nready\n", 1, true)
    end, 60, "the run's simulator and app")
    local dirs, files, pids = reported(report)
    assert.equal(3, #dirs)
    proc.kill_pid(-p.pid, proc.SIGKILL)
    assert.is_not_nil(p:wait(10), "the spec run did not end")
    for pid in pairs(pids) do
      testing.wait_until(function()
        return testing.read("/proc/" .. pid .. "/stat") == ""
      end, 15, "process " .. pid .. " of the run to be gone")
    end
    testing.wait_until(function()
      local left = naming(dirs)
      return #left == 0, table.concat(left, "; ")
    end, 15, "no process naming the run's folders")
    for _, d in ipairs(dirs) do
      assert.equal(tmp .. "/paygate-", d:sub(1, #tmp + 9))
      testing.wait_until(function() return not proc.exists(d .. "/.") end,
                         15, d .. " to be removed")
    end
    for _, f in ipairs(files) do
      testing.wait_until(function() return not proc.exists(f) end, 15,
                         f .. " to be removed")
    end
    testing.wait_until(function()
      local left = core.listdir(tmp)
      return #left == 0, table.concat(left, " ")
    end, 15, "the run's TMPDIR to be empty")
  end)
end)
