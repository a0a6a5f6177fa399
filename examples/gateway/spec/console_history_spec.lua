-- examples/gateway: what the console's payment page shows beyond state
-- (gw.history): the calls the gateway made to WeChat Pay about the
-- payment, and the notifications about it that were refused, with why
-- (a forged signature, a stale timestamp); the overview's list of the
-- latest refusals; hostile input in a refused notification stays text.
local testing = require "paygate.testing"
local json = require "cjson.safe"
local core = dofile("examples/gateway/spec/core_support.lua")

local function get(gw, path)
  return gw.srv:request{ path = path }
end

local function section(body, title)
  local s = body:match("<h2>" .. title .. "</h2>(.-)</section>")
  return assert(s, "no section " .. title)
end

describe("gateway console: a payment's history", function()
  local sim, gw

  setup(function() sim, gw = core.start_loopback() end)
  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)
  after_each(function() sim:clear_faults() end)

  it("lists the calls made to WeChat Pay: the order, the query", function()
    local p = gw:create{ description = "calls" }
    -- the prepay is recorded by a task of its own after the call
    local page
    testing.wait_until(function()
      page = get(gw, "/console/payments/" .. p.id).body
      return section(page, "Calls to WeChat Pay"):find("<td>POST "
        .. "/v3/pay/transactions/native</td>", 1, true) ~= nil
    end, 10, "the prepay call on the payment page")
    local calls = section(page, "Calls to WeChat Pay")
    assert.matches("<td>ok</td><td>200</td>", calls, 1, true)
    -- a settle from the console queries WeChat: that call shows too
    local row = assert(gw.db:query("SELECT * FROM gw_wechat_calls WHERE"
      .. " out_trade_no = $1", { p.out_trade_no }))[1]
    assert.equal("POST", row.method)
    assert.truthy(row.ms >= 0)
    local res = gw:call("GET", "/v1/payments/" .. p.id .. "?refresh=1")
    assert.equal(200, res.status, res.body)
    testing.wait_until(function()
      page = get(gw, "/console/payments/" .. p.id).body
      return section(page, "Calls to WeChat Pay"):find("<td>GET "
        .. "/v3/pay/transactions/out-trade-no/" .. p.out_trade_no
        .. "</td>", 1, true) ~= nil
    end, 10, "the query call on the payment page")
    -- another payment's page does not show them
    local q = gw:create{ description = "other" }
    testing.wait_until(function()
      return #assert(gw.db:query("SELECT id FROM gw_wechat_calls WHERE"
        .. " out_trade_no = $1", { q.out_trade_no })) == 1
    end, 10, "the other prepay recorded")
    page = get(gw, "/console/payments/" .. q.id).body
    assert.not_matches(p.out_trade_no, section(page, "Calls to WeChat Pay"),
                       1, true)
  end)

  it("lists each refund call once, and the refund notifications received",
     function()
    local p = gw:create{ description = "refunds", amount = 300 }
    sim:pay_and_wait(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    local nos = {}
    for _, amount in ipairs({ 100, 200 }) do
      local res = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                          { amount = amount })
      assert.equal(201, res.status, res.body)
      nos[#nos + 1] = res.json.out_refund_no
      sim:settle(res.json.out_refund_no)
    end
    gw:wait_state(p.id, "refunded")
    local page
    testing.wait_until(function()
      page = get(gw, "/console/payments/" .. p.id).body
      local _, n = section(page, "Calls to WeChat Pay"):gsub("<td>POST "
        .. "/v3/refund/domestic/refunds</td>", "")
      return n >= 2
    end, 10, "the refund calls on the payment page")
    -- each refund call once (a refund's call names the attempt too)
    local calls = section(page, "Calls to WeChat Pay")
    local _, n = calls:gsub("<td>POST /v3/refund/domestic/refunds</td>", "")
    assert.equal(2, n)
    local stored = assert(gw.db:query("SELECT count(*) AS n FROM"
      .. " gw_wechat_calls WHERE path = '/v3/refund/domestic/refunds'"
      .. " AND out_trade_no = $1", { p.out_trade_no }))
    assert.equal(2, tonumber(stored[1].n))
    -- the REFUND.SUCCESS notifications, applied, beside the payment's own
    local received = section(page, "Notifications received %(verified%)")
    assert.matches("TRANSACTION.SUCCESS", received, 1, true)
    for _, no in ipairs(nos) do
      assert.matches("refund|" .. no .. "|SUCCESS", received, 1, true)
    end
  end)

  -- the notifications of each attempt and refund are found by their
  -- business key's start (an index range, migration 008): every key of
  -- those numbers, whatever its state, and none of a number that merely
  -- begins the same, differs in case or sits elsewhere in a key
  it("lists the notifications recorded under its numbers' keys, no other",
     function()
    local p = gw:create{ description = "keys", amount = 300 }
    sim:pay_and_wait(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    local res = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                        { amount = 300 })
    assert.equal(201, res.status, res.body)
    local rno = res.json.out_refund_no
    sim:settle(rno)
    gw:wait_state(p.id, "refunded")
    local m, no = sim.merchant.mchid, p.out_trade_no
    local keys = {
      ["own-closed"] = "pay|" .. m .. "|" .. no .. "|CLOSED",
      ["own-processing"] = "refund|" .. rno .. "|PROCESSING",
      ["longer-no"] = "pay|" .. m .. "|" .. no .. "0|SUCCESS",
      ["upper-no"] = "pay|" .. m .. "|" .. no:upper() .. "|SUCCESS",
      ["longer-rno"] = "refund|" .. rno .. "0|SUCCESS",
      ["rno-inside"] = "pay|" .. m .. "|refund|" .. rno .. "|SUCCESS",
      ["no-as-merchant"] = "pay|" .. no .. "|x|SUCCESS",
    }
    for id, key in pairs(keys) do
      assert(gw.db:exec("INSERT INTO gw_notifications (id, event_type,"
        .. " business_key, received_at, outcome) VALUES ($1, 'X.Y', $2,"
        .. " $3, 'ignored')", { id, key, os.time() }))
    end
    local received = section(get(gw, "/console/payments/" .. p.id).body,
                             "Notifications received %(verified%)")
    local shown = {}
    for key in received:gmatch("<td>([^<]*|[^<]*)</td>") do
      shown[#shown + 1] = key
    end
    table.sort(shown)
    assert.same({ "pay|" .. m .. "|" .. no .. "|CLOSED",
                  "pay|" .. m .. "|" .. no .. "|SUCCESS",
                  "refund|" .. rno .. "|PROCESSING",
                  "refund|" .. rno .. "|SUCCESS" }, shown)
  end)

  it("records a failed call with its outcome and WeChat's code", function()
    local p = gw:create{ description = "failing query" }
    sim:fault{ endpoint = "*", kind = "error", status = 400,
               code = "PARAM_ERROR", count = 1 }
    gw:call("GET", "/v1/payments/" .. p.id .. "?refresh=1")
    testing.wait_until(function()
      local rows = assert(gw.db:query("SELECT outcome, status, code FROM"
        .. " gw_wechat_calls WHERE out_trade_no = $1 AND method = 'GET'",
        { p.out_trade_no }))
      return rows[1] and rows[1].code == "PARAM_ERROR"
        and rows[1].status == 400 and rows[1].outcome ~= "ok"
    end, 10, "the failed query recorded")
    local page = get(gw, "/console/payments/" .. p.id).body
    assert.matches("PARAM_ERROR", section(page, "Calls to WeChat Pay"), 1,
                   true)
  end)

  -- A row the store does not take (busy under load on several workers,
  -- a full disk) is missing from the history. It was logged as "gateway:
  -- cannot record call", naming neither the call nor its order, and
  -- counted nowhere, though the counter is what is not recorded.
  it("counts a call whose row the store failed, and logs which call",
     function()
    local function dropped()
      local text = assert(gw.srv:admin_get("/metrics")).body
      return tonumber(text:match('paygate_gateway_history_dropped_total'
        .. '{what="call"} (%d+)')) or 0
    end
    local before = dropped()
    assert(gw.db:exec("CREATE TRIGGER spec_no_calls BEFORE INSERT ON"
      .. " gw_wechat_calls BEGIN SELECT RAISE(ABORT, 'spec: no row'); END"))
    finally(function()
      assert(gw.db:exec("DROP TRIGGER IF EXISTS spec_no_calls"))
    end)
    local p = gw:create{ description = "not recorded" }
    testing.wait_until(function() return dropped() > before end, 10,
                       "the call counted as not recorded")
    local line
    testing.wait_until(function()
      for l in (gw.srv:logs() or ""):gmatch("[^\n]+") do
        local e = json.decode(l)
        if e and e.out_trade_no == p.out_trade_no and e.level == "warn"
           and tostring(e.msg):find("history did not record", 1, true) then
          line = e
        end
      end
      return line ~= nil
    end, 10, "a warn line naming the call")
    assert.equal("gateway: the console's history did not record a call to"
      .. " WeChat Pay (counted in paygate_gateway_history_dropped_total;"
      .. " nothing else is affected)", line.msg)
    assert.equal("POST", line.method)
    assert.equal("/v3/pay/transactions/native", line.path)
    assert.equal(sim.merchant.mchid, line.mchid)
    assert.matches("spec: no row", line.error, 1, true)
    -- the payment is made all the same
    assert.equal("paying", gw:get(p.id).state)
  end)

  it("shows a notification refused for its signature, why, then the one"
     .. " that verified", function()
    local p = gw:create{ description = "forged once" }
    sim:fault{ endpoint = "notify", kind = "bad_signature", count = 1 }
    sim:pay(p.out_trade_no)
    gw:wait_state(p.id, "paid", 20)   -- WeChat's retry verified
    local page = get(gw, "/console/payments/" .. p.id).body
    local refused = section(page, "Notifications refused")
    assert.matches("<td>bad_signature</td>", refused, 1, true)
    assert.matches("TRANSACTION.SUCCESS", refused, 1, true)
    assert.matches("TRANSACTION.SUCCESS",
                   section(page, "Notifications received %(verified%)"), 1,
                   true)
    local row = assert(gw.db:query("SELECT * FROM gw_notifications_refused"
      .. " WHERE out_trade_no = $1", { p.out_trade_no }))[1]
    assert.equal(1, tonumber(row.authentic))
    assert.equal(sim.merchant.mchid, row.mchid)
    -- the overview lists it among the latest refusals
    local over = get(gw, "/console").body
    assert.matches('<a href="/console/payments?q=' .. p.out_trade_no
                   .. '">yes: ' .. p.out_trade_no,
                   section(over, "Notifications refused, last 24 h %(latest"
                           .. " 10%)"), 1, true)
  end)

  it("captures a refused notification whole: one paygate verify says why",
     function()
    -- before, the log said "signature does not match the body" and kept
    -- neither the body nor the headers: nothing to check it with
    local p = gw:create{ description = "captured" }
    sim:fault{ endpoint = "notify", kind = "bad_signature", count = 1 }
    sim:pay(p.out_trade_no)
    gw:wait_state(p.id, "paid", 20)   -- WeChat's retry verified
    local cmd
    testing.wait_until(function()
      for line in gw.srv:logs():gmatch("[^\n]+") do
        if line:find("notification refused", 1, true) then
          local doc = require("cjson.safe").decode(line)
          cmd = doc and doc.verify
          if cmd then return true end
        end
      end
      return false, "no verify command in the refusal's log line"
    end, 10, "the capture of the refused notification")
    assert.matches("^paygate verify %-%-headers ", cmd)
    assert.matches(" %-%-certificate ", cmd)
    -- the command, as logged, run: not verified, and why
    local argv = {}
    for w in cmd:gmatch("%S+") do argv[#argv + 1] = w end
    argv[1] = os.getenv("PAYGATE_BIN") or "build/paygate"
    local code, out = testing.proc.run(argv)
    assert.equal(1, code, out)
    assert.matches("signature", out)
    -- captures are kept under the store's folder, bounded
    local dir = cmd:match("%-%-headers (.-)/refused%-")
    local names = assert(require("paygate.core").listdir(dir))
    assert.is_true(#names >= 2 and #names <= 3 * 20, #names .. " files")
  end)

  it("records a stale timestamp as such", function()
    local p = gw:create{ description = "stale once" }
    sim:fault{ endpoint = "notify", kind = "stale_timestamp", skew = 900,
               count = 1 }
    sim:pay(p.out_trade_no)
    gw:wait_state(p.id, "paid", 20)
    local page = get(gw, "/console/payments/" .. p.id).body
    assert.matches("stale", section(page, "Notifications refused"))
  end)

  it("keeps a forged notification's claims as text, linked to no payment",
     function()
    local hostile = "<script>alert(1)</script>"
    local res = gw.srv:request{ method = "POST",
      path = "/wechatpay/notify/" .. sim.merchant.mchid,
      headers = { ["Content-Type"] = "application/json",
        ["Wechatpay-Serial"] = hostile, ["Wechatpay-Timestamp"] =
        tostring(os.time()), ["Wechatpay-Nonce"] = "n",
        ["Wechatpay-Signature"] = "AAAA" },
      body = '{"id":"' .. hostile .. '","event_type":"TRANSACTION.SUCCESS",'
        .. '"resource":{"algorithm":"AEAD_AES_256_GCM","nonce":"abcdefabcdef",'
        .. '"associated_data":"transaction","ciphertext":"AAAAAAAAAAAAAAAA"}}' }
    assert.is_true(res.status >= 400)
    local row
    testing.wait_until(function()
      row = assert(gw.db:query("SELECT * FROM gw_notifications_refused"
        .. " WHERE serial = $1", { "<script>alert(1)</script>" }))[1]
      return row ~= nil
    end, 10, "the forged notification recorded")
    assert.equal(0, tonumber(row.authentic))
    assert.is_nil(row.out_trade_no)
    assert.is_nil(row.notification_id)  -- markup is not an identifier
    local over = get(gw, "/console").body
    assert.not_matches("<script>", over, 1, true)
    assert.matches("&lt;script&gt;", over, 1, true)
  end)

  -- Past REFUSED_PER_SECOND refusals a second in a worker, a refusal is
  -- not recorded but counted. The counter's help text was longer than
  -- paygate.metrics takes (127 bytes): making it raised, so every forged
  -- notification past the bound was answered 500 (with a traceback in
  -- the log) and the drop was counted nowhere.
  it("counts the refusals over the per-second bound, answering them 401",
     function()
    local function dropped()
      local text = assert(gw.srv:admin_get("/metrics")).body
      return tonumber(text:match('paygate_gateway_history_dropped_total'
        .. '{what="refused_notification"} (%d+)')) or 0
    end
    local statuses = {}
    testing.wait_until(function()
      for _ = 1, 60 do
        local res = gw.srv:request{ method = "POST",
          path = "/wechatpay/notify/" .. sim.merchant.mchid,
          headers = { ["Content-Type"] = "application/json",
            ["Wechatpay-Serial"] = "FLOOD", ["Wechatpay-Timestamp"] =
            tostring(os.time()), ["Wechatpay-Nonce"] = "n",
            ["Wechatpay-Signature"] = "AAAA" }, body = '{"id":"x"}' }
        statuses[res.status] = (statuses[res.status] or 0) + 1
      end
      return statuses[500] ~= nil or dropped() > 0
    end, 20, "a refusal over the bound")
    assert.is_nil(statuses[500], "answered 500 " .. tostring(statuses[500])
                  .. " times")
    assert.is_true(dropped() > 0)
    assert.not_matches("metrics.counter", gw.srv:logs(), 1, true)
  end)
end)

describe("gateway: a refused notification when no key is held", function()
  local sim, gw, key

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    -- an APIv3 key that is not the merchant's: the platform certificates
    -- do not decrypt, so the gateway holds no key to verify with
    local wrong = testing.tmpdir() .. "/wrong-apiv3.key"
    key = testing.apiv3_key()
    core.write(wrong, key .. "\n")
    gw = core.start(sim, { merchant = { apiv3_key_file = wrong },
                           gateway = { reconcile = { enabled = false } } })
  end)
  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  it("names paygate doctor, which says why, not a verify that cannot run",
     function()
    -- was: the log line's verify named the capture and no key (none was
    -- held): paygate verify exited 2, "give --certificate, --public-key
    -- with --public-key-id, or --keyring", and the wrong APIv3 key was
    -- named by nothing that command says
    local mchid = sim.merchant.mchid
    local no = sim:order{ notify_url = gw.srv:url("/wechatpay/notify/"
                                                  .. mchid) }
    sim:pay(no)
    local doc
    testing.wait_until(function()
      for line in gw.srv:logs():gmatch("[^\n]+") do
        if line:find("notification refused", 1, true) then
          local d = require("cjson.safe").decode(line)
          if d and (d.verify or d.doctor) then doc = d return true end
        end
      end
      return false, "no command in the refusal's log line"
    end, 10, "the refusal of the notification")
    assert.is_nil(doc.verify)
    local cmd = doc.doctor
    assert.matches("^paygate doctor %-%-config %S+ %-%-app %S+ %-%-merchant "
                   .. mchid .. "$", cmd)
    -- the command, as logged, run: the cause and its fix
    local argv = {}
    for w in cmd:gmatch("%S+") do argv[#argv + 1] = w end
    argv[1] = os.getenv("PAYGATE_BIN") or "build/paygate"
    local code, out = testing.proc.run(argv, { timeout = 60 })
    assert.equal(1, code, out)
    assert.matches("FAIL  signed_call: the APIv3 key does not decrypt the"
                   .. " certificates WeChat sent", out, 1, true)
    assert.matches("merchants[1].apiv3_key_file", out, 1, true)
    -- the capture is kept all the same, for a verify once keys are held
    local dir = gw.srv.dir .. "/refused"
    local names = assert(require("paygate.core").listdir(dir))
    assert.is_true(#names >= 2, #names .. " files")
  end)

  it("names the key to fix as the gateway's config names it: the start "
     .. "warning, the 502 body, the refusal's reason", function()
    -- was: "wrong APIv3 key (apiv3_key, previous_apiv3_keys)" in all
    -- three, options this config refuses (it gives apiv3_key_file)
    local NAMED = "wrong APIv3 key (merchants[1].apiv3_key_file, "
                  .. "merchants[1].previous_apiv3_key_files)"
    local function logged(msg)
      for line in gw.srv:logs():gmatch("[^\n]+") do
        if line:find(msg, 1, true) and line:find(NAMED, 1, true) then
          return true
        end
      end
      return false
    end
    testing.wait_until(function()
      return logged("platform certificate download failed")
    end, 10, "the start's warning naming apiv3_key_file")
    local res = gw:call("POST", "/v1/payments", { order_id = "o-"
      .. require("paygate.crypto").random_nonce(10), channel = "native",
      amount = 100, description = "wrong key" })
    assert.equal(502, res.status, res.body)
    assert.matches(NAMED, res.body, 1, true)
    local mchid = sim.merchant.mchid
    local no = sim:order{ notify_url = gw.srv:url("/wechatpay/notify/"
                                                  .. mchid) }
    sim:pay(no)
    testing.wait_until(function()
      return logged("notification refused")
    end, 10, "a refusal naming apiv3_key_file")
    local logs = gw.srv:logs()
    assert.not_matches("(apiv3_key, previous_apiv3_keys)", logs, 1, true)
    assert.not_matches("(apiv3_key, previous_apiv3_keys)", res.body, 1, true)
    -- never the key itself
    assert.not_matches(key, logs, 1, true)
    assert.not_matches(key, res.body, 1, true)
  end)
end)
