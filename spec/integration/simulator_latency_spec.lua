-- The simulator's latency fault: it delays the answer, then the work is
-- done, however long the delay, even past the server's request_timeout
-- (2 s here; 30 s by default: a 30 s fault once raced it and the refund
-- was never made).
local sn = require "support.simnotify"
local crypto = require "paygate.crypto"
local core = require "paygate.core"
local json = require "cjson.safe"

describe("simulator latency fault longer than request_timeout", function()
  local sim, recv
  setup(function()
    sim = sn.start{ extra = "limits = { request_timeout = 2 }" }
    recv = sn.receiver()
  end)
  teardown(function()
    if sim then sim:stop() end
    if recv then recv:stop() end
  end)

  it("answers after the delay and the refund is made", function()
    local no = "lat" .. crypto.random_nonce(10)
    local rno = "rlat" .. crypto.random_nonce(10)
    sn.prepay(sim, no, sn.notify_url(recv, "lat"), 50)
    sn.pay(sim, no)
    local st = sn.ctl(sim, "POST", "/sim/faults", { endpoint = "refund",
                      kind = "latency", seconds = 3, count = 1 })
    assert.equal(200, st)
    local t0 = core.mono()
    local r = sn.refund(sim, no, rno, 20, 50, sn.notify_url(recv, "lat"))
    -- the delay happened (the simulator's timer may fire a millisecond
    -- early by this clock: seen once in CI at 2.9997 s)
    local took = core.mono() - t0
    assert(took >= 2.99, "answered after " .. took .. " s")
    assert.equal(rno, r.out_refund_no)
    local q = sn.signed(sim, "GET", "/v3/refund/domestic/refunds/" .. rno)
    assert.equal(200, q.status, q.body)
    assert.equal("PROCESSING", json.decode(q.body).status)
  end)
end)
