-- Notifications through a running app: the replay check holds across
-- workers (paygate.shared), a genuine WeChat retry (same id, new nonce and
-- signature) is accepted.
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local server = require "support.server"
local proc = require "support.proc"
local wxtest = require "support.wxtest"

local FIX = "spec/fixtures/wechatpay/"
local PUB_ID = wxtest.PUB_ID
local srv, key

local function abs(p)
  return io.popen("pwd"):read("*l") .. "/" .. p
end

-- a notification as WeChat signs it (by default with A.1 as the WeChat
-- public key's private half)
local function note(id, signer, serial)
  local rnonce = crypto.random_nonce(12)
  local ct = crypto.aead_encrypt("AEAD_AES_256_GCM", wxtest.APIV3, rnonce,
    "transaction", json.encode({ out_trade_no = "T-" .. id }))
  local body = json.encode({ id = id, event_type = "TRANSACTION.SUCCESS",
    resource_type = "encrypt-resource", summary = "支付成功",
    create_time = "2025-01-01T12:00:06+08:00",
    resource = { original_type = "transaction", algorithm = "AEAD_AES_256_GCM",
      ciphertext = crypto.base64_encode(ct), associated_data = "transaction",
      nonce = rnonce } })
  local ts, nonce = tostring(os.time()), crypto.random_nonce(32)
  return { body = body, headers = {
    ["Content-Type"] = "application/json", ["Connection"] = "close",
    ["Wechatpay-Timestamp"] = ts, ["Wechatpay-Nonce"] = nonce,
    ["Wechatpay-Serial"] = serial or PUB_ID,
    ["Wechatpay-Signature"] = crypto.sign_base64(signer or key, ts .. "\n" .. nonce
                                                 .. "\n" .. body .. "\n") } }
end

local function post(n, to)
  local res = assert((to or srv):request{ method = "POST", path = "/notify",
                                  body = n.body, headers = n.headers })
  local kind = res.status ~= 204 and json.decode(res.body).message or nil
  return res.status, kind, res.headers["x-pid"]
end

setup(function()
  key = assert(crypto.private_key(io.open(FIX .. "a1_merchant_key.pem"):read("*a")))
  srv = server.start{ app = "spec/support/wxnotify", workers = 2,
    config = ("return { wechatpay = { mchid = %q, merchant_private_key = %q, "
      .. "merchant_serial = %q, apiv3_key = %q, public_key = %q, "
      .. "public_key_id = %q, base_url = 'http://127.0.0.1:1' } }")
      :format(wxtest.MCHID, abs(FIX .. "a3_merchant_key.pem"),
              wxtest.MERCHANT_SERIAL, wxtest.APIV3, abs(FIX .. "a1_pub.pem"),
              PUB_ID) }
end)

teardown(function() if srv then srv:stop() end end)

describe("notification replay", function()
  it("is refused on the worker that accepted it and on the other", function()
    local n = note("EV-replay")
    local status, _, first = post(n)
    assert.equal(204, status)
    -- new connections until the replay has reached the other worker too
    local other
    proc.wait_until(function()
      local s, kind, pid = post(n)
      assert.equal(401, s)
      assert.equal("replayed", kind)
      if pid ~= first then other = pid end
      return other
    end, 20, "the replay to reach the other worker")
    assert.not_equal(first, other)
  end)
  it("accepts a WeChat retry: same id, new nonce and signature", function()
    assert.equal(204, (post(note("EV-retry"))))
    assert.equal(204, (post(note("EV-retry"))))
  end)
  it("reads each header from the request's head, in any case", function()
    -- the app hands parse_notification the request itself (req:header,
    -- no req.headers table): an upper-case Signature-Type that the RSA
    -- key does not fit is still seen, and refused
    local n = note("EV-type")
    n.headers["WECHATPAY-SIGNATURE-TYPE"] = "WECHATPAY2-SM2-WITH-SM3"
    local s, kind = post(n)
    assert.equal(401, s)
    assert.equal("bad_signature", kind)
    n.headers["WECHATPAY-SIGNATURE-TYPE"] = "WECHATPAY2-SHA256-RSA2048"
    assert.equal(204, (post(n)))
  end)
  it("refuses a Wechatpay-* header sent twice, though each copy verifies",
     function()
    local n = note("EV-twice")
    for _, name in ipairs({ "Wechatpay-Serial", "Wechatpay-Timestamp",
                            "Wechatpay-Nonce", "Wechatpay-Signature" }) do
      n.headers[name:lower()] = n.headers[name]   -- the same field again
      local s, kind = post(n)
      assert.equal(401, s, name)
      assert.equal("malformed", kind, name)
      n.headers[name:lower()] = nil
    end
    -- Wechatpay-Signature-Type, optional, is refused twice as well
    n.headers["Wechatpay-Signature-Type"] = "WECHATPAY2-SHA256-RSA2048"
    n.headers["wechatpay-signature-type"] = "WECHATPAY2-SHA256-RSA2048"
    local s, kind = post(n)
    assert.equal(401, s)
    assert.equal("malformed", kind)
    n.headers["wechatpay-signature-type"] = nil
    assert.equal(204, (post(n)))                 -- once each: accepted
  end)
  it("a tampered replay is bad_signature, not replayed", function()
    local n = note("EV-t")
    assert.equal(204, (post(n)))
    n.body = n.body:gsub("EV%-t", "EV-u")
    local s, kind = post(n)
    assert.equal(401, s)
    assert.equal("bad_signature", kind)
  end)
end)

describe("boot with WeChat unreachable", function()
  it("serves from the certificates in state_dir", function()
    local dir = server.tmpdir()
    local keys = wxtest.make(dir)
    local state = dir .. "/state"
    os.execute("mkdir -p " .. state .. " && cp " .. keys.p1_cert .. " " .. state
               .. "/wechatpay-" .. wxtest.MCHID .. "-platform-certificates.pem")
    local app = server.start{ app = "spec/support/wxnotify",
      config = ("return { wechatpay = { mchid = %q, merchant_private_key = %q, "
        .. "merchant_serial = %q, apiv3_key = %q, state_dir = %q, "
        .. "base_url = 'http://127.0.0.1:%d' } }")
        :format(wxtest.MCHID, keys.merchant_key, wxtest.MERCHANT_SERIAL,
                wxtest.APIV3, state, require("paygate.core").free_port()) }
    local ok, e = pcall(function()
      local p1 = assert(crypto.private_key(io.open(keys.p1_key):read("*a")))
      assert.equal(204, (post(note("EV-state", p1, wxtest.P1), app)))
      local s, kind = post(note("EV-state2", p1, wxtest.P2), app)
      assert.equal(401, s)
      assert.equal("unknown_serial", kind)
    end)
    app:stop()
    os.execute("rm -rf " .. dir)
    assert(ok, e)
  end)
end)

-- Under paygate run the dictionaries are the config's: without a
-- wechatpay_replay one the replay cache shares paygate's, where other
-- writers' entries can evict its records (a replay then gets through),
-- and nothing said so.
describe("the replay cache's dictionary", function()
  local LINE = "wechatpay: the notification replay cache shares the "
               .. "paygate dictionary"

  local function conf(extra)
    return ("return { %s wechatpay = { mchid = %q, merchant_private_key = "
      .. "%q, merchant_serial = %q, apiv3_key = %q, public_key = %q, "
      .. "public_key_id = %q, base_url = 'http://127.0.0.1:1' } }")
      :format(extra, wxtest.MCHID, abs(FIX .. "a3_merchant_key.pem"),
              wxtest.MERCHANT_SERIAL, wxtest.APIV3, abs(FIX .. "a1_pub.pem"),
              PUB_ID)
  end

  it("is named at start when it shares paygate's, with the fix", function()
    -- srv: two workers, no shared section
    local lines = proc.wait_until(function()
      local found = {}
      for l in srv:logs():gmatch("[^\n]+") do
        if l:find(LINE, 1, true) then found[#found + 1] = l end
      end
      return #found == 2 and found, #found .. " lines"
    end, 10, "the replay cache's warning from each worker")
    for _, l in ipairs(lines) do
      local e = assert(json.decode(l), l)
      assert.equal("warn", e.level)
      assert.equal("paygate", e.dict)
      assert.matches('shared = { wechatpay_replay = "4m" }', e.msg, 1, true)
      assert.not_matches(wxtest.APIV3, l, 1, true)
    end
  end)

  it("says nothing when it has a dictionary of its own", function()
    for _, extra in ipairs({ "shared = { wechatpay_replay = '1m' },",
                             "shared = { mine = '1m' }," }) do
      local c = conf(extra)
      if extra:find("mine", 1, true) then
        c = c:gsub("base_url", "replay_dict = 'mine', base_url")
      end
      local s = server.start{ app = "spec/support/wxnotify", config = c }
      local logs = s:logs()
      s:stop()
      assert.not_matches("replay cache", logs, 1, true)
    end
  end)
end)

describe("a dict the instance does not have", function()
  -- under paygate run dicts are configured, not made on use
  for _, key in ipairs{ "replay_dict", "shared_dict" } do
    it(key .. " stops the start with a message naming it", function()
      local s = server.start{ app = "spec/support/wxnotify", wait = false,
        config = ("return { wechatpay = { mchid = %q, merchant_private_key "
          .. "= %q, merchant_serial = %q, apiv3_key = %q, public_key = %q, "
          .. "public_key_id = %q, base_url = 'http://127.0.0.1:1', "
          .. "%s = 'spec_dict_typo' } }")
          :format(wxtest.MCHID, abs(FIX .. "a3_merchant_key.pem"),
                  wxtest.MERCHANT_SERIAL, wxtest.APIV3,
                  abs(FIX .. "a1_pub.pem"), PUB_ID, key) }
      local code = s.proc:wait(15)
      local logs = s:logs()
      s:stop()
      assert.equal(1, code, logs)
      assert.matches("invalid_config: wechatpay." .. key .. ": no "
        .. "paygate.shared dict spec_dict_typo", logs, 1, true)
      assert.not_matches(wxtest.APIV3, logs, 1, true)
    end)
  end
end)
