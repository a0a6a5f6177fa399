-- docs/gateway.md's hooks (Writing a hook) and their spec (Testing your
-- hooks) are run as the page gives them, as a user would: a copy of
-- examples/gateway as mygateway/ with the page's gw/hooks.lua, the page's
-- spec in spec/hooks_spec.lua beside it, `paygate exec busted` run in that
-- folder. The page cannot drift from what works.
local testing = require "paygate.testing"
local servers = require "spec.support.servers"

local function blocks(text) return servers.code_blocks(text, "lua") end

describe("docs/gateway.md's hooks and their spec", function()
  teardown(testing.stop_all)

  it("pass as the page gives them", function()
    local hooks, spec
    for _, b in ipairs(blocks(testing.read("docs/gateway.md"))) do
      if b:find("^%-%- gw/hooks%.lua: tell a fulfilment") then hooks = b end
      if b:find('describe("gw/hooks.lua"', 1, true) then spec = b end
    end
    assert.is_string(hooks, "the page shows gw/hooks.lua")
    assert.is_string(spec, "the page shows its spec")
    local dir = testing.tmpdir()
    assert.equal(0, (testing.proc.run{ "sh", "-c", 'cp -R examples/gateway "$1/mygateway"'
      .. ' && rm -rf "$1/mygateway/spec" && mkdir "$1/spec"', "sh", dir }))
    testing.write(dir .. "/mygateway/gw/hooks.lua", hooks)
    testing.write(dir .. "/spec/hooks_spec.lua", spec)
    local bin = os.getenv("PAYGATE_BIN") or "build/paygate"
    if bin:sub(1, 1) ~= "/" then
      bin = (os.getenv("PWD") or ".") .. "/" .. bin
    end
    local code, out = testing.proc.run({ "sh", "-c", 'cd "$1" && PAYGATE_BIN="$2"'
      .. ' exec "$2" exec "$(command -v busted)" spec/hooks_spec.lua', "sh",
      dir, bin }, { timeout = 180 })
    assert.equal(0, code, out)
    assert.matches("4 successes / 0 failures / 0 errors", out)
  end)
end)
