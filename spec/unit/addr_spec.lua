-- paygate.addr: what counts as this machine's loopback, for every check
-- that trusts it (the gateway's admin, console and dev_app, the
-- simulator's control API, http:// URLs allowed to loopback only).
local addr = require "paygate.addr"

describe("paygate.addr", function()
  it("loopback_host: localhost, 127.0.0.0/8, ::1, IPv4-mapped 127/8",
     function()
    for _, h in ipairs{ "localhost", "LOCALHOST", "127.0.0.1", "127.1.2.3",
                        "127.255.255.255", "::1", "[::1]",
                        "0:0:0:0:0:0:0:1", "::ffff:127.0.0.1",
                        "[::ffff:127.0.0.1]", "[::FFFF:127.9.9.9]" } do
      assert.is_true(addr.loopback_host(h), h)
    end
    for _, h in ipairs{ "", "128.0.0.1", "10.0.0.1", "0.0.0.0", "::",
                        "[::]", "::2", "::10", "::1:2", "::ffff:10.0.0.1",
                        "127.0.0.1.evil.example", "evil.127.0.0.1",
                        "127.0.0.256", "127.0.0", "localhost.evil.example",
                        "0127.0.0.1", "00127.0.0.1", "::ffff:0127.0.0.1",
                        "[127.0.0.1]x", "2001:db8::1" } do
      assert.is_false(addr.loopback_host(h), h)
    end
    assert.is_false(addr.loopback_host(nil))
    assert.is_false(addr.loopback_host(127))
  end)

  it("loopback_addr: a peer's address with its port, or a host alone",
     function()
    for _, a in ipairs{ "127.0.0.1:5000", "127.3.2.1:1", "[::1]:5000",
                        "[::ffff:127.0.0.1]:40000", "localhost:8080",
                        "localhost", "::1", "[::1]", "127.0.0.1" } do
      assert.is_true(addr.loopback_addr(a), a)
    end
    for _, a in ipairs{ "10.0.0.1:5000", "[::2]:5000", "[::]:80",
                        "[::ffff:10.1.2.3]:40000", "0.0.0.0:8080",
                        "127.0.0.1.evil.example:80", "evil:80", ":80",
                        "[::1]:x" } do
      assert.is_false(addr.loopback_addr(a), a)
    end
    assert.is_false(addr.loopback_addr(nil))
  end)

  it("is what the gateway and the client's URL check use (the simulator's:"
     .. " spec/unit/wire_dates)",
     function()
    package.path = "examples/gateway/?.lua;" .. package.path
    local gwconfig = require "gw.config"
    local wxconfig = require "paygate.wechatpay.config"
    -- a client that connected to 127.0.0.1 through a [::] listener
    assert.is_true(gwconfig.is_loopback_addr("[::ffff:127.0.0.1]:40000"))
    assert.is_true(gwconfig.is_loopback_host("127.0.0.2"))
    assert.is_false(gwconfig.is_loopback_addr("[::ffff:10.0.0.1]:40000"))
    assert.is_true(wxconfig.is_loopback_url("http://127.0.0.2:9000/v3"))
    assert.is_true(wxconfig.is_loopback_url("http://[::1]:9000"))
    assert.is_false(wxconfig.is_loopback_url("http://127.0.0.1:1@evil/"))
    assert.is_false(wxconfig.is_loopback_url("http://10.0.0.1:9000"))
  end)

  it("browser_elsewhere: a foreign Host, a cross-site Origin or"
     .. " Sec-Fetch-Site; and the gateway's admin check is it", function()
    local function req(h)
      return { header = function(_, name) return h[name] end }
    end
    assert.is_false(addr.browser_elsewhere(req{}))
    assert.is_false(addr.browser_elsewhere(req{ host = "127.0.0.1:9000" }))
    assert.is_false(addr.browser_elsewhere(req{ host = "localhost:9000",
      origin = "http://localhost:9000", ["sec-fetch-site"] = "same-origin" }))
    assert.is_false(addr.browser_elsewhere(req{ host = "[::1]:9000",
      ["sec-fetch-site"] = "none" }))
    assert.is_true(addr.browser_elsewhere(req{ host = "evil.example" }))
    assert.is_true(addr.browser_elsewhere(req{ host = "127.0.0.1:9000",
      origin = "https://evil.example" }))
    assert.is_true(addr.browser_elsewhere(req{ host = "127.0.0.1:9000",
      origin = "null" }))
    assert.is_true(addr.browser_elsewhere(req{ host = "127.0.0.1:9000",
      ["sec-fetch-site"] = "cross-site" }))
    assert.is_true(addr.browser_elsewhere(req{ host = "127.0.0.1:9000",
      ["sec-fetch-site"] = "same-site" }))
    package.path = "examples/gateway/?.lua;" .. package.path
    assert.equal(addr.browser_elsewhere,
                 require("gw.admin").from_browser_elsewhere)
  end)
end)
