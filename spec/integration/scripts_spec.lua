-- The scripts a new user runs first (README's quick start): each --help
-- describes the script itself, at once, without installing or building.
local server = require "support.server"
local proc = require "support.proc"

-- runs argv to its end (10 s at most); returns its exit code and output
local function run(argv)
  local dir = server.tmpdir()
  local log = dir .. "/out"
  local p = proc.spawn(argv, { log = log })
  local code = p:wait(10)
  if code == nil then p:kill(proc.SIGKILL); p:wait(2) end
  local out = proc.read(log)
  os.execute("rm -rf " .. dir)
  return code, out
end

describe("scripts --help", function()
  it("scripts/test --help is its own usage, not ctest's, and runs nothing",
     function()
    -- (was: scripts/deps and the build ran, then ctest's usage came out)
    local code, out = run({ "scripts/test", "--help" })
    assert.equal(0, code, out)
    assert.matches("usage: scripts/test [ctest args...]", out, 1, true)
    assert.matches("scripts/test -R gateway", out, 1, true)
    assert.matches("four per\n%s+core", out)
    assert.is_nil(out:find("ctest [options]", 1, true), out)
  end)

  it("scripts/run --help and scripts/deps --help, exit 0", function()
    local code, out = run({ "scripts/run", "--help" })
    assert.equal(0, code, out)
    assert.matches("usage: scripts/run [--port N]", out, 1, true)
    code, out = run({ "scripts/deps", "--help" })
    assert.equal(0, code, out)
    assert.matches("usage: scripts/deps [--run | --bench]", out, 1, true)
  end)
end)
