-- examples/gateway: a SQLite store others may read is said at start.
-- A store is made 0600 now, but one an earlier version made (0644 under a
-- umask of 022) holds payers' openids and amounts for every local user:
-- the gateway says so at each start, with the chmod that ends it, and
-- changes nothing itself (a group, a backup agent's, may be meant).
local testing = require "paygate.testing"
local servers = require "spec.support.servers"
local core = dofile("examples/gateway/spec/core_support.lua")

describe("gateway: the store's file mode", function()
  local sim, gw

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  it("warns at start when others can read the store, once, with the chmod",
     function()
    -- was: nothing said; the store stayed 0644 for good
    sim = testing.simulator{ time_scale = 100 }
    local path = testing.tmpdir() .. "/gw.db"
    local opts = { db = function() return "sqlite:" .. path end,
                   workers = 2,
                   gateway = { reconcile = { enabled = false } } }
    gw = core.start(sim, opts)
    -- made 0600: nothing to say
    assert.equal("600", servers.file_mode(path))
    assert.is_nil(gw.srv:logs():find("can be read by every local user", 1,
                                      true))
    gw:stop()
    assert(require("paygate.core").chmod(path, 420))            -- 0644
    gw = core.start(sim, opts)
    testing.wait_until(function()
      return gw.srv:logs():find("can be read by every local user", 1, true)
    end, 10, "the store's mode said")
    local logs = gw.srv:logs()
    local _, n = logs:gsub("can be read by every local user", "")
    assert.equal(1, n)                            -- once, not per worker
    assert.matches("chmod o%-rwx " .. path:gsub("%p", "%%%0"), logs)
    assert.matches(path:gsub("%p", "%%%0") .. " %(644%)", logs)
    -- said, not changed: the mode is the operator's
    assert.equal("644", servers.file_mode(path))
  end)
end)
