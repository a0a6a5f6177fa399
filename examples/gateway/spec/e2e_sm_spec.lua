-- The national-crypto (ShangMi) variant end to end: a merchant configured
-- with sign_type = "WECHATPAY2-SM2-WITH-SM3" (SM2 keys) against the
-- simulator in that variant. Its calls are signed with SM2 and SM3, the
-- simulator's answers (SM2-signed, Wechatpay-Signature-Type) verified,
-- its notifications (SM2-signed, SM4-GCM-encrypted) verified, decrypted
-- and applied once (state, audit entry, outbox event); the JSAPI pay
-- parameters carry signType SM2 and pay at the payer's client; a refund
-- and its notification; ?refresh=1 (a query answered SM2-signed);
-- forged notifications refused (another SM2 key, its capture's paygate
-- verify command failing alike; an RSA signature, of the other variant)
-- and the simulator's notification faults refused, their retries
-- applied; the day's trade bill (hash type SHA1, as for RSA merchants:
-- unconfirmed for SM ones, docs/wechatpay.md) reconciled from the console.
-- e2e_sm_postgres_spec.lua runs the same cases on PostgreSQL.
--   build/paygate exec "$(command -v busted)" --helper=spec/helpers.lua \
--     examples/gateway/spec/e2e_sm_spec.lua
local S = require "examples.gateway.spec.support"
local testing = require "paygate.testing"
local crypto = require "paygate.crypto"
local audit = require "paygate.audit"
local json = require "cjson.safe"

local SM = testing.SM2
-- when this file started: its bill case reconciles every Beijing day since
local days = require "support.days"
local T0 = os.time()
local OPENID = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"

describe("gateway, national-crypto (SM) variant, end to end", function()
  local env
  -- the orders paid here by a crafted notification alone: the simulator
  -- never took their money, so the day's bill has no line of them
  local crafted = {}
  -- the last day whose bill the bill case found made, with its lines
  local billed

  setup(function()
    env = S.start{ sign_type = SM, gateway = {
      console = { access = "loopback" },
      -- (PostgreSQL has no default folder for the bill's report)
      reconcile = { bill_dir = testing.tmpdir("sm-bills") .. "/bills" } } }
  end)
  teardown(S.stop)
  after_each(function() env.sim:clear_faults() end)

  -- the audit entries of a subject ("payment:<id>") whose what is what
  local function audited(subject, what)
    local out = {}
    for _, e in ipairs(assert(audit.entries(env.db, subject))) do
      if e.what == what then out[#out + 1] = e end
    end
    return out
  end

  -- the "gateway: notification refused" log lines' fields, decoded
  local function refusals()
    local out = {}
    for line in env.gw:logs():gmatch("[^\n]+") do
      local rec = json.decode(line)
      if type(rec) == "table" and rec.msg == "gateway: notification refused"
      then
        out[#out + 1] = rec
      end
    end
    return out
  end

  it("the merchant is configured for SM: SM2 keys, the SM variant",
     function()
    -- the gateway's config file as written: the merchant's entry
    local conf = assert(loadstring(testing.read(env.gw.config_file)))()
    assert.equal(SM, conf.merchants[1].sign_type)
    assert.equal(env.m.private_key, conf.merchants[1].merchant_private_key)
    local key = assert(crypto.private_key(S.read(env.m.private_key)))
    assert.equal("sm2", key:type():lower())
    local pk = assert(crypto.private_key(S.read(env.platform.private_key)))
    assert.equal("sm2", pk:type():lower())
  end)

  it("native: paid at the simulator, its SM2-signed, SM4-encrypted"
     .. " notification verified, decrypted and applied once", function()
    local b = env:create{ amount = 120 }
    assert.matches("^weixin://", b.pay.code_url)
    local d = env.sim:pay_and_wait(b.payment.out_trade_no)
    -- the first delivery was taken (not a refusal and its retry)
    assert.is_true(S.ok2xx(d.attempts[1].status),
                   "first attempt: " .. tostring(d.attempts[1].status))
    local p = env:wait_state(b.payment.id, "paid")
    assert.is_string(p.transaction_id)
    assert.equal(120, p.amount)
    -- the audit entry of the transition, with WeChat's evidence
    local e = audited("payment:" .. p.id, "payment.succeeded")
    assert.equal(1, #e)
    assert.equal("paid", e[1].to)
    assert.matches(p.transaction_id, e[1].evidence, 1, true)
    -- the outbox event, once, delivered to the merchant's webhook
    assert.equal(1, env:count_events(p.id, "payment.paid"))
    local ev = env:wait_event(p.id, "payment.paid")
    assert.equal("paid", ev.data.payment.state)
    assert.same({}, refusals())
  end)

  it("a crafted notification, SM2-signed and SM4-encrypted as WeChat's,"
     .. " applies; the same again is acknowledged without a second effect",
     function()
    local p = env:create().payment
    local body, h = env:notification("TRANSACTION.SUCCESS",
                                     env:transaction(p))
    assert.equal("AEAD_SM4_GCM", json.decode(body).resource.algorithm)
    assert.equal(SM, h["Wechatpay-Signature-Type"])
    local res = env:post_notify(body, h)
    assert.is_true(S.ok2xx(res.status), res.status .. " " .. res.body)
    env:wait_state(p.id, "paid")
    crafted[#crafted + 1] = p.out_trade_no
    res = env:post_notify(body, env:notify_headers(body))
    assert.is_true(S.ok2xx(res.status), res.status .. " " .. res.body)
    assert.equal(1, env:count_events(p.id, "payment.paid"))
  end)

  it("jsapi: the pay parameters carry signType SM2, an SM2 paySign, and"
     .. " pay at the payer's client", function()
    local b = env:create{ channel = "jsapi", payer = { openid = OPENID } }
    local pay = b.pay
    assert.equal("SM2", pay.signType)
    assert.equal("prepay_id=", pay.package:sub(1, 10))
    -- SM2 with SM3 (the distinguishing ID 1234567812345678) over the
    -- documented signing string, under the merchant's certificate
    local cert = assert(crypto.certificate(S.read(env.m.certificate)))
    assert(crypto.verify_base64(cert, pay.appId .. "\n" .. pay.timeStamp
      .. "\n" .. pay.nonceStr .. "\n" .. pay.package .. "\n", pay.paySign,
      SM))
    -- what the simulator's payer checks, as WeChat's client does
    local t = env.sim:pay_with(pay)
    assert.equal("SUCCESS", t.trade_state)
    assert.equal("JSAPI", t.trade_type)
    assert.equal("paid", env:wait_state(b.payment.id, "paid").state)
    assert.equal(1, env:count_events(b.payment.id, "payment.paid"))
  end)

  it("a refund: asked SM2-signed, its notification verified, decrypted"
     .. " and applied", function()
    local p = env:paid_payment{ amount = 90 }
    local r = S.expect(env:refund(p.id, 30, "SM refund"), 201, "refund")
    assert.equal(30, r.amount)
    env.sim:settle(r.out_refund_no)
    env.sim:wait_notification({ out_refund_no = r.out_refund_no },
                              { event_type = "REFUND.SUCCESS" })
    assert.equal("succeeded", env:wait_refund(r.id, "succeeded").state)
    local after = env:wait_state(p.id, "partially_refunded")
    assert.equal(30, after.refunded)
    local e = env:wait_event(p.id, "refund.succeeded")
    assert.equal(r.id, e.data.refund.id)
    local a = audited("refund:" .. r.id, "refund.succeeded")
    assert.equal(1, #a)
    assert.equal("succeeded", a[1].to)
    assert.equal(1, env:count_events(p.id, "refund.succeeded"))
  end)

  it("?refresh=1: the query, answered SM2-signed, is verified and applied",
     function()
    env.sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
    local b = env:create()
    env.sim:pay(b.payment.out_trade_no)
    assert.equal("paying", env:get(b.payment.id).state)
    local p = env:get(b.payment.id, true)
    assert.equal("paid", p.state)
    assert.is_not_true(p.stale)
    assert.is_string(p.transaction_id)
    assert.equal(1, #audited("payment:" .. p.id, "payment.succeeded"))
    assert.equal(1, env:count_events(p.id, "payment.paid"))
  end)

  it("a forged SM notification (another SM2 key) is refused 401"
     .. " bad_signature; the real one applies", function()
    local p = env:create().payment
    local forger = testing.merchant_keys{ mchid = "forger", sm2 = true }
    local fkey = assert(crypto.private_key(S.read(forger.private_key)))
    local body = env:notification("TRANSACTION.SUCCESS", env:transaction(p))
    local before = #refusals()
    local res = env:post_notify(body, env:notify_headers(body,
                                                         { key = fkey }))
    assert.equal(401, res.status, res.body)
    assert.equal("FAIL", res.json.code)
    assert.equal(SM, res.headers["www-authenticate"])
    local lines = refusals()
    assert.equal(before + 1, #lines)
    assert.equal("bad_signature", lines[#lines].kind)
    -- the capture's verify command judges it as the gateway did (the
    -- file's first refusal: captured, whatever the per-second bound;
    -- captures are made by default beside an SQLite store only)
    if env.db_url:match("^sqlite:") then
      local cmd = tostring(lines[#lines].verify)
      assert.matches("--sign-type " .. SM, cmd, 1, true)
      local argv = { testing.server.bin() }
      for w in cmd:gmatch("%S+") do
        if w ~= "paygate" or #argv > 1 then argv[#argv + 1] = w end
      end
      -- run as the log line says: it fails as the gateway did
      local code, out = testing.proc.run(argv, { timeout = 30 })
      assert.equal(1, code, out)
      assert.matches("signature_mismatch", out, 1, true)
    end
    assert.equal("paying", env:get(p.id).state)
    res = env:post_notify(body, env:notify_headers(body))
    assert.is_true(S.ok2xx(res.status), res.status .. " " .. res.body)
    assert.equal("paid", env:wait_state(p.id, "paid").state)
    crafted[#crafted + 1] = p.out_trade_no
  end)

  it("an RSA-signed notification to an SM merchant is refused as of the"
     .. " other variant (bad_signature, the types named)", function()
    local p = env:create().payment
    local rsa = testing.merchant_keys{ mchid = "rsa-platform" }
    local rkey = assert(crypto.private_key(S.read(rsa.private_key)))
    local body = env:notification("TRANSACTION.SUCCESS", env:transaction(p))
    -- typed RSA, and not typed at all (which means RSA)
    for _, stype in ipairs({ S.RSA, false }) do
      local before = #refusals()
      local res = env:post_notify(body, env:notify_headers(body,
        { key = rkey, sign_type = S.RSA, signature_type = stype,
          serial = rsa.serial }))
      assert.equal(401, res.status, res.body)
      assert.equal("bad_signature", res.json.message)
      assert.equal(SM, res.headers["www-authenticate"])
      local lines = refusals()
      assert.equal(before + 1, #lines)
      local l = lines[#lines]
      assert.equal("bad_signature", l.kind)
      assert.matches(S.RSA, l.reason, 1, true)
      assert.matches(SM, l.reason, 1, true)
      assert.matches("other variant", l.reason, 1, true)
      -- (captured at most once a second: a verify command when it was)
      if l.verify then
        assert.matches("--sign-type " .. SM, l.verify, 1, true)
      end
    end
    assert.equal("paying", env:get(p.id).state)
    -- counted by merchant and kind (the workers publish every second)
    S.wait_until(function()
      local m = env.gw:admin_get("/metrics")
      local n = m and m.body:match('\npaygate_gateway_notifications_refused'
        .. '_total{merchant="' .. env.m.mchid .. '",kind="bad_signature"}'
        .. ' (%d+)')
      return n and tonumber(n) >= 2, n
    end, 15, "the refusals counted on /metrics")
  end)

  for _, kind in ipairs({ "bad_signature", "unknown_serial",
                          "stale_timestamp" }) do
    it("a notification with " .. kind .. " is refused 401, its retry"
       .. " applied once", function()
      env.sim:fault{ endpoint = "notify", kind = kind, count = 1 }
      local b = env:create()
      local d = env.sim:pay_and_wait(b.payment.out_trade_no)
      assert.truthy(#d.attempts >= 2)
      assert.equal(401, d.attempts[1].status,
                   "first attempt answered " .. tostring(d.attempts[1].status))
      assert.is_true(S.ok2xx(d.last.status))
      env:wait_state(b.payment.id, "paid")
      assert.equal(1, env:count_events(b.payment.id, "payment.paid"))
      local lines = refusals()
      assert.equal(kind, lines[#lines].kind)
    end)
  end

  it("the day's trade bill (SHA1 in the SM variant too) is reconciled from"
     .. " the console: the simulator's orders agree", function()
    -- the payments of the cases above, in the bills of every Beijing day
    -- since this file started: today's, and yesterday's too when the run
    -- crossed a Beijing midnight, each reconciled and the runs summed
    local mismatches, payments, refunds, bills, got = 0, 0, 0, 0, {}
    for _, date in ipairs(days.since(T0, days.BEIJING)) do
      env.sim:close_bills(date)
      -- what the simulator answers in the SM variant: the code expects
      -- SHA1 (docs/wechatpay.md, Bills: unconfirmed for SM merchants);
      -- a day without trades has no bill
      local b, berr = env.sim:client(env.m):trade_bill{ bill_date = date }
      if b then
        assert.equal("SHA1", b.hash_type)
        bills = bills + 1
        billed = date
      else
        assert.equal("no_statement_exist", berr.kind, tostring(berr))
      end
      local page = env.gw:request("/console/reconcile")
      assert.equal(200, page.status, page.body)
      local csrf = assert(page.body:match('name="csrf" value="(%x+)"'))
      local res = env.gw:request{ method = "POST",
        path = "/console/reconcile", body = "date=" .. date .. "&csrf="
        .. csrf, headers = { ["Content-Type"]
                             = "application/x-www-form-urlencoded" } }
      assert.equal(303, res.status, res.body)
      local flash = env.gw:request(res.headers["location"]).body:match(
        '<p class="flash">(.-)</p>')
      local said = tostring(flash):match("^reconciled "
        .. date:gsub("%-", "%%-") .. ": (%d+) mismatches")
      assert.truthy(said, tostring(flash))
      mismatches = mismatches + tonumber(said)
      local e = assert(audit.entries(env.db, "reconcile:" .. date))
      assert.equal("reconcile.bill", e[#e].what)
      local ev = json.decode(e[#e].evidence)
      assert.equal(env.m.mchid, ev.merchant)
      assert.equal(b == nil, ev.empty)
      payments = payments + (ev.remote_payments or 0)
      refunds = refunds + (ev.remote_refunds or 0)
      for _, f in ipairs(ev.findings or {}) do
        got[#got + 1] = f.kind .. " " .. f.out_trade_no
      end
    end
    assert.is_true(bills >= 1, "no day's bill had the payments")
    assert.equal(#crafted, mismatches)
    -- every payment paid here but those the crafted notifications paid
    local n = assert(env.db:query("SELECT count(*) AS n FROM gw_payments"
      .. " WHERE transaction_id IS NOT NULL"))[1].n
    assert.equal(tonumber(n) - #crafted, payments)
    assert.equal(1, refunds)
    -- the only mismatches: the orders the crafted notifications paid
    local want = {}
    for i, no in ipairs(crafted) do want[i] = "missing_remote " .. no end
    table.sort(got)
    table.sort(want)
    assert.same(want, got)
  end)

  it("a bill answered with another hash type (SM3, unconfirmed for SM"
     .. " merchants) fails the day's run, the console naming it",
     function()
    -- was: its 64-digit hash_value refused first, as no SHA-1
    -- ("hash_value: must be at most 40 characters"), hash_type unnamed
    -- a day whose bill is made and has a line: the answer the fault
    -- spoils (the case above's, else one paid and closed here)
    local date = billed
    if not date then
      date = days.within(days.BEIJING, function()
        local b = env:create()
        env.sim:pay_and_wait(b.payment.out_trade_no)
        env:wait_state(b.payment.id, "paid")
      end)
      env.sim:close_bills(date)
    end
    env.sim:fault{ endpoint = "tradebill", kind = "bad_body", count = 1,
      body = json.encode({ hash_type = "SM3", hash_value = ("ab"):rep(32),
        download_url = env.sim.url .. "/v3/billdownload/file?token=x" }) }
    local page = env.gw:request("/console/reconcile")
    local csrf = assert(page.body:match('name="csrf" value="(%x+)"'))
    local res = env.gw:request{ method = "POST", path = "/console/reconcile",
      body = "date=" .. date .. "&csrf=" .. csrf,
      headers = { ["Content-Type"] = "application/x-www-form-urlencoded" } }
    assert.equal(303, res.status, res.body)
    local flash = env.gw:request(res.headers["location"]).body:match(
      '<p class="flash">(.-)</p>')
    assert.matches("1 of 1 merchants failed", tostring(flash), 1, true)
    assert.matches("hash_type: must be SHA1", tostring(flash), 1, true)
    assert.matches("got &quot;SM3&quot;", tostring(flash), 1, true)
    -- (the gateway's trade_bill call is the one that got it)
    assert.equal(1, env.sim:control("GET", "/sim/faults")[1].fired)
  end)
end)
