-- docs/testing.md's example is run as the page gives it: its app
-- (myapp/app.lua) and its spec (spec/notify_spec.lua) are taken from the
-- page's code blocks, written to a fresh folder, and the spec is run there
-- with `paygate exec busted`, as a user would. The page cannot drift from
-- what works. Nor does the run print a log line of the kit's own: the
-- spec's output is the spec's (sim:order's client logged its platform
-- certificate, at info, as if the app had).
local proc = require "support.proc"
local servers = require "spec.support.servers"

local function blocks(text) return servers.code_blocks(text, "lua") end

describe("docs/testing.md", function()
  local dir = servers.mktemp()
  teardown(function() servers.sh("rm -rf " .. dir) end)

  it("its app and its spec pass as the page gives them", function()
    local text = proc.read("docs/testing.md")
    local app, spec
    for _, b in ipairs(blocks(text)) do
      if b:find("^%-%- myapp/app%.lua\n") then app = b end
      if b:find('describe("my notify handler"', 1, true) then spec = b end
    end
    assert.is_string(app, "the page shows myapp/app.lua")
    assert.is_string(spec, "the page shows the spec")
    assert(os.execute("mkdir -p " .. dir .. "/myapp " .. dir .. "/spec"))
    proc.write(dir .. "/myapp/app.lua", app)
    proc.write(dir .. "/spec/notify_spec.lua", spec)
    local bin = os.getenv("PAYGATE_BIN") or "build/paygate"
    if bin:sub(1, 1) ~= "/" then
      bin = (os.getenv("PWD") or ".") .. "/" .. bin
    end
    local code, out = proc.run({ "sh", "-c", 'cd "$1" && PAYGATE_BIN="$2"'
      .. ' exec "$2" exec "$(command -v busted)" spec/notify_spec.lua', "sh",
      dir, bin }, { timeout = 120 })
    assert.equal(0, code, out)
    assert.matches("1 success / 0 failures / 0 errors", out)
    assert.falsy(out:find('"level":"info"', 1, true), out)
  end)
end)
