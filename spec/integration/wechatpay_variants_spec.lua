-- One merchant, both signature variants: an RSA client and an SM client
-- of the same mchid in one process (a merchant moving to, or running
-- beside, the ShangMi variant) keep their platform certificates apart --
-- in the instance's shared dictionary (the set one worker downloaded for
-- the others) and in state_dir (the file a restart with WeChat
-- unreachable verifies with). They once shared both, keyed by mchid
-- alone: the second client took the first one's set as its own (and,
-- none of it fitting its key type, held nothing), and each save replaced
-- the other's file.
local core = require "paygate.core"
local wxtest = require "support.wxtest"

local P1, S1 = wxtest.P1, wxtest.S1

local rsa, sm = {}, {}

setup(function()
  rsa.dir, rsa.keys, rsa.srv = wxtest.serve()
  sm.dir, sm.keys, sm.srv = wxtest.serve(wxtest.make_sm)
end)

teardown(function()
  wxtest.stop(rsa.srv, rsa.dir)
  wxtest.stop(sm.srv, sm.dir)
end)

describe("an RSA and an SM client of one mchid", function()
  it("each download and keep their own certificates", function()
    wxtest.fresh(rsa.srv, P1)
    wxtest.certs(sm.srv, { serials = { S1 } })
    local state = rsa.dir .. "/state"
    local a = wxtest.client(rsa.srv, rsa.keys, { state_dir = state })
    assert.same({ P1 }, a:certificate_status().serials)
    a:stop()
    -- right after: the RSA set is fresh in the shared dictionary
    local b = wxtest.client(sm.srv, sm.keys, { state_dir = state })
    assert.same({ S1 }, b:certificate_status().serials)
    b:stop()
    -- restarts with WeChat unreachable (the instance's dictionary gone
    -- with it): each finds its own in state_dir
    require("paygate.shared").get_dict("paygate"):flush_all()
    local closed = "http://127.0.0.1:" .. core.free_port()
    for _, v in ipairs({ { rsa, P1 }, { sm, S1 } }) do
      local wx = wxtest.client(nil, v[1].keys, { state_dir = state,
                                                 base_url = closed,
                                                 startup_timeout = 0.5 })
      assert.same({ v[2] }, wx:certificate_status().serials)
      wx:stop()
    end
  end)

  it("an SM client reads the set an older version saved under the RSA"
     .. " file name", function()
    wxtest.fresh(sm.srv, S1)
    local state = sm.dir .. "/state-old"
    local b = wxtest.client(sm.srv, sm.keys, { state_dir = state })
    assert.same({ S1 }, b:certificate_status().serials)
    b:stop()
    local base = state .. "/wechatpay-" .. wxtest.MCHID
    assert(os.rename(base .. "-sm-platform-certificates.pem",
                     base .. "-platform-certificates.pem"))
    require("paygate.shared").get_dict("paygate"):flush_all()
    local wx = wxtest.client(nil, sm.keys, { state_dir = state,
      base_url = "http://127.0.0.1:" .. core.free_port(),
      startup_timeout = 0.5 })
    assert.same({ S1 }, wx:certificate_status().serials)
    wx:stop()
  end)
end)
