-- gw.throttle against a wall clock that steps (NTP, a VM resumed): the
-- wait it tells an address over its limit is the rest of the window,
-- never the size of the step. No servers: the module alone, with
-- core.time stepped back an hour after the window opened.
package.path = "examples/gateway/?.lua;" .. package.path
local pcore = require "paygate.core"
local throttle = require "gw.throttle"

describe("gw.throttle", function()
  it("tells the rest of the window after the wall clock stepped back",
     function()
    local host = "192.0.2." .. math.random(1, 250) .. "-" .. pcore.pid()
    assert(throttle.reserve(host, 1, 60))         -- the one allowed try
    local time = pcore.time
    pcore.time = function() return time() - 3600 end
    local ok, ck, wait = pcall(throttle.reserve, host, 1, 60)
    pcore.time = time
    assert(ok, ck)
    assert.is_string(ck)
    assert.is_number(wait)
    assert.is_true(wait >= 1 and wait <= 60, "wait " .. wait .. " s")
  end)

  it("tells at most the window after a reload from code that stored the"
     .. " window's start on the wall clock", function()
    -- the shared dictionary outlives a reload: the code before left a
    -- window opened at a wall-clock time (epoch seconds)
    local host = "198.51.100." .. math.random(1, 250) .. "-" .. pcore.pid()
    local d = require("paygate.shared").get_dict("paygate")
    assert(d:set("gw:console:lf:" .. host, pcore.time(), 60))
    assert(throttle.reserve(host, 1, 60))
    local ck, wait = throttle.reserve(host, 1, 60)
    assert.is_string(ck)
    assert.is_number(wait)
    assert.is_true(wait >= 1 and wait <= 60, "wait " .. wait .. " s")
  end)
end)
