-- gw.throttle against a wall clock that steps (NTP, a VM resumed): the
-- wait it tells an address over its limit is the rest of the window,
-- never the size of the step. No servers: the module alone, with
-- core.time stepped back an hour after the window opened. And the bound
-- on the windows open at once (a flood from many addresses).
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
  it("counts an IPv6 client by its /64: an address of its own for each"
     .. " try does not multiply its tries, nor open a window each",
     function()
    local of = throttle.host_of
    -- one subscriber's /64, however its addresses are written
    local net = of("[2001:db8:1:2::1]:5000")
    for _, a in ipairs({ "[2001:db8:1:2::2]:6000",
                         "[2001:DB8:1:2:ffff:ffff:ffff:ffff]:1",
                         "[2001:0db8:0001:0002:0:0:0:9]:2",
                         "[2001:db8:1:2:a:b:1.2.3.4]:3" }) do
      assert.equal(net, of(a), a)
    end
    -- another /64 (the next one, a /48 apart) is another count
    assert.are_not.equal(net, of("[2001:db8:1:3::1]:5000"))
    assert.are_not.equal(net, of("[2001:db9:1:2::1]:5000"))
    -- IPv4, an IPv4 client through a [::] listener, and a host alone
    assert.equal("192.0.2.7", of("192.0.2.7:5000"))
    assert.equal("192.0.2.7", of("[::ffff:192.0.2.7]:5000"))
    assert.equal("192.0.2.7", of("192.0.2.7"))
    -- the tries of the /64's addresses share one window: the limit holds
    -- (before the flood case below, which fills the bound on windows)
    local tag = math.random(1, 65535)
    local function addr(i)
      return ("[2001:db8:%x:%x::%x]:4000"):format(tag, pcore.pid() % 65536,
                                                   i)
    end
    for i = 1, 3 do
      local ck, wait = throttle.reserve(of(addr(i)), 3, 60)
      assert.is_string(ck)
      assert.is_nil(wait, "try " .. i)
    end
    local ck, wait = throttle.reserve(of(addr(4)), 3, 60)
    assert.is_string(ck)
    assert.is_number(wait, "a 4th address of the /64 was not throttled")
  end)

  it("opens at most max_hosts windows at once: a flood from many addresses"
     .. " evicts nothing, a new address is refused past the bound, an"
     .. " address with a window open is still counted", function()
    local d = require("paygate.shared").get_dict("paygate")
    d:set("spec:canary", "kept")       -- what the workers keep there
    local before = d:stats().evictions
    local max = throttle.max_hosts(d)
    assert.is_true(max >= 64)
    local tag = "-" .. pcore.pid() .. "-" .. math.random(1e6)
    local first = "203.0.113.1" .. tag
    assert(throttle.reserve(first, 10, 60))
    local refused, err
    for i = 2, max + 50 do
      local ck, _, e = throttle.reserve("2001:db8::" .. i .. tag, 10, 60)
      if not ck then
        refused, err = i, e
        break
      end
    end
    -- (this spec's process may have opened windows before: not more)
    assert.is_truthy(refused, "no address refused in " .. max + 50)
    assert.is_true(refused <= max + 1, "refused at " .. tostring(refused))
    assert.equal("unavailable", err.kind)
    assert.matches("too many client addresses", err.message)
    assert.equal(before, d:stats().evictions)
    assert.equal("kept", d:get("spec:canary"))
    -- the address whose window is open still counts its tries
    local ck, wait = throttle.reserve(first, 10, 60)
    assert.is_string(ck)
    assert.is_nil(wait)
  end)

end)
