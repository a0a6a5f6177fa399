-- The simulator's notifications to an https notify_url served under a
-- private CA (a gateway trialled on HTTPS with a test certificate):
-- notify_ca_file is the CA the simulator verifies it against, verification
-- still applies (another CA's server is refused, as with the system store),
-- and a notify_ca_file that is no file of CA certificates stops the start.
local sn = require "support.simnotify"
local server = require "support.server"
local pki = require "support.pki"
local crypto = require "paygate.crypto"

local function order_no()
  return "TLS" .. crypto.random_nonce(16)
end

describe("simulator notifications over https", function()
  local dir, p, recv

  setup(function()
    dir = server.tmpdir()
    p = pki.make(dir)
    -- the recording receiver, serving https with the test CA's certificate
    recv = server.start{ app = "spec/support/notify_receiver",
      scheme = "https", ca_file = p.ca,
      config = ("return { tls = { cert = %q, key = %q } }"):format(
        p.server_cert, p.server_key) }
  end)

  teardown(function()
    if recv then recv:stop() end
    if dir then os.execute("rm -rf " .. dir) end
  end)

  local function url(box)
    return "https://localhost:" .. recv.port .. "/notify/" .. box
  end

  local function received(box)
    local res = assert(recv:request{ path = "/_ctl/received?box=" .. box })
    assert.equal(200, res.status, res.body)
    return res.json
  end

  -- the notification of no once it is no longer pending
  local function settled(sim, no)
    local n
    sn.wait_until(function()
      n = sn.notifications(sim, "out_trade_no=" .. no)[1]
      return n and n.state ~= "pending" and n.state ~= "held"
                 and #n.attempts > 0
    end, 20, "the notification of " .. no .. " to settle")
    return n
  end

  it("notify_ca_file: delivered to a server whose certificate it issued",
     function()
    local sim = sn.start{ extra = ("notify_ca_file = %q"):format(p.ca) }
    local ok, err = pcall(function()
      local no = order_no()
      sn.prepay(sim, no, url("ok"), 77)
      sn.pay(sim, no)
      local n = settled(sim, no)
      assert.equal("delivered", n.state, n.attempts[1].error)
      assert.equal(204, n.attempts[1].status)
      local got = received("ok")
      assert.equal(1, #got)
      local _, res = sn.decrypt(got[1])
      assert.equal(no, res.out_trade_no)
    end)
    sim:stop()
    assert(ok, err)
  end)

  it("verification still applies: a server of another CA is refused",
     function()
    local sim = sn.start{ time_scale = 1000, answer_timeout = 1,
                          extra = ("notify_ca_file = %q"):format(p.other_ca) }
    local ok, err = pcall(function()
      local no = order_no()
      sn.prepay(sim, no, url("other"), 77)
      sn.pay(sim, no)
      -- failed, it stays pending for its retry: wait for the first
      -- attempt's outcome (not the in_flight mark it carries meanwhile)
      local n
      sn.wait_until(function()
        n = sn.notifications(sim, "out_trade_no=" .. no)[1]
        local a = n and n.attempts[1]
        return a and (a.status or (a.error and not a.error:find(
                      "^in_flight")))
      end, 20, "the first attempt of " .. no)
      assert.is_nil(n.attempts[1].status)
      assert.matches("^tls: .*certificate", n.attempts[1].error)
      assert.equal(0, #received("other"))
    end)
    sim:stop()
    assert(ok, err)
  end)

  it("a notify_ca_file that is no file of CA certificates stops the start",
     function()
    local nopem = dir .. "/nopem.txt"
    local f = assert(io.open(nopem, "w"))
    f:write("not a certificate\n")
    f:close()
    for _, case in ipairs({
      { dir .. "/missing.pem", "(cannot open it: No such file or directory)" },
      { dir, "(Is a directory)" },
      { nopem, "(no -----BEGIN CERTIFICATE----- block in it)" },
      -- a private key given for the CA: every delivery failed on TLS
      { "spec/fixtures/wechatpay/a5_platform_key.pem",
        "(it holds a private key, not a certificate)" },
    }) do
      local ok, e = pcall(sn.start, { extra =
        ("notify_ca_file = %q"):format(case[1]) })
      assert.is_false(ok, case[1])
      e = tostring(e)
      assert.truthy(e:find("config.notify_ca_file: must name a readable file"
        .. " of CA certificates (PEM)", 1, true), e)
      assert.truthy(e:find(case[2], 1, true), e)
    end
  end)
end)
