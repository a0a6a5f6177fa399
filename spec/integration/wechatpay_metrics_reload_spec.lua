-- paygate_wechatpay_certificate_days_left across a reload, as
-- docs/wechatpay.md says (the gauge "is set when the client is made, after
-- each download and every hour"): the workers of a reload take the set the
-- old ones downloaded from paygate.shared, not from WeChat, and each
-- publishes the series when it comes to hold it. Before, a worker that took
-- the set (certs.lua import) published nothing: the series left with the
-- old workers and came back only on the hourly recompute.
local proc = require "support.proc"
local server = require "support.server"
local wxtest = require "support.wxtest"

local P1 = wxtest.P1
local dir, keys, srv, s

local SERIES = 'paygate_wechatpay_certificate_days_left{mchid="'
               .. wxtest.MCHID .. '",serial="' .. P1 .. '"} '

local function metrics() return assert(s:admin_get("/metrics")).body end

local function reload()
  local out = s.dir .. "/reload.out"
  local p = proc.spawn({ PAYGATE_BIN, "reload", "--pid-file",
                         s.dir .. "/paygate.pid" }, { log = out })
  assert.equal(0, p:wait(30), proc.read(out))
end

setup(function()
  dir, keys, srv = wxtest.serve()
  wxtest.fresh(srv, P1)
  local conf = wxtest.client_conf(srv, keys)
  local app = ([[
local paygate = require "paygate"
local wechatpay = require "paygate.wechatpay"
assert(wechatpay.client{ mchid = %q, merchant_private_key = %q,
  merchant_serial = %q, apiv3_key = %q, base_url = %q, timeout = 5 })
paygate.route("GET", "/", function() return 200, "ok" end)
]]):format(conf.mchid, conf.merchant_private_key, conf.merchant_serial,
           conf.apiv3_key, conf.base_url)
  s = server.start{ source = app, workers = 2 }
end)

teardown(function()
  if s then s:stop() end
  wxtest.stop(srv, dir)
end)

describe("the certificate metric after a reload", function()
  it("is shown by the new workers, which took the downloaded set", function()
    -- one download for the instance: the other worker takes its set
    proc.wait_until(function() return metrics():find(SERIES, 1, true) end,
                    15, "the series after the first download")
    local before = wxtest.count(srv, "GET", "/v3/certificates")
    assert.equal(1, before)
    local gen = s:workers()
    reload()
    -- the old workers gone (their series with them), the new ones serving
    proc.wait_until(function()
      local now = s:workers()
      if #now ~= 2 then return false end
      for _, pid in ipairs(now) do
        for _, old in ipairs(gen) do
          if pid == old then return false end
        end
      end
      return true
    end, 15, "the old workers to leave")
    local ok = pcall(proc.wait_until, function()
      return metrics():find(SERIES, 1, true)
    end, 10, "the series from the new workers")
    local body = metrics()
    assert.is_true(ok, "no days_left series 10 s after the reload:\n" .. body)
    -- the new workers took the old ones' set: no second download
    assert.equal(before, wxtest.count(srv, "GET", "/v3/certificates"))
    local _, n = body:gsub("paygate_wechatpay_certificate_days_left{", "")
    assert.equal(1, n, body)
  end)
end)
