-- paygate doctor: each certificate-chain failure of the catalogue produced
-- for real (a TLS server on loopback with a certificate made per run:
-- expired, from an untrusted CA, self-signed, without its intermediate,
-- for another host, revoked by a CRL), a notify URL that is slow or
-- accepts anything, a clock off, a lease shorter than the work, and the
-- command naming each.
local paygate = require "paygate"
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local server = require "support.server"
local proc = require "support.proc"
local diagpki = require "support.diagpki"

local dir, pki, notify
local write = diagpki.write

local APP = [[
local paygate = require "paygate"
paygate.route("GET", "/v3/certificates", function()
  return 401, { code = "SIGN_ERROR", message = "unsigned" }
end)
paygate.route("POST", "/notify", function() return 401, { code = "FAIL" } end)
paygate.route("POST", "/notify-open", function() return 204, "" end)
paygate.route("POST", "/notify-slow", function()
  paygate.sleep(8)
  return 401, ""
end)
paygate.route("POST", "/work", function()
  paygate.sleep(0.3)
  return 204, ""
end)
paygate.route("POST", "/work-long", function()
  paygate.sleep(10.2)
  return 204, ""
end)
]]

local function run(args)
  local log = dir .. "/out." .. crypto.random_nonce(8)
  local argv = { PAYGATE_BIN }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local p = proc.spawn(argv, { log = log })
  local code = p:wait(60)
  if code == nil then p:kill(proc.SIGKILL); p:wait(2) end
  local out = proc.read(log)
  local results = {}
  for line in out:gmatch("[^\n]+") do
    -- (a result has a kind; a log line of the runtime is JSON too, and
    -- is not a result)
    local r = line:sub(1, 1) == "{" and json.decode(line)
    if type(r) == "table" and r.kind ~= nil then
      results[#results + 1] = r
      results[r.kind] = results[r.kind] or r
    end
  end
  return code, out, results
end

-- a table as Lua source (keys sorted; strings quoted with %q)
local function lua_literal(v)
  if type(v) == "table" then
    local keys, parts = {}, {}
    for k in pairs(v) do keys[#keys + 1] = k end
    table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    for _, k in ipairs(keys) do
      parts[#parts + 1] = (type(k) == "number" and "" or k .. "=")
                          .. lua_literal(v[k])
    end
    return "{" .. table.concat(parts, ",") .. "}"
  elseif type(v) == "string" then
    return ("%q"):format(v)
  end
  return tostring(v)
end

-- a config file: the wechatpay client of the generated merchant
local function config(o)
  local t = {
    wechatpay = { mchid = "1900000001", merchant_private_key = pki.merchant_key,
      merchant_certificate = pki.merchant,
      apiv3_key = "0123456789abcdefghijABCDEFGHIJkl",
      base_url = o.base_url, ca_file = o.ca_file or pki.root,
      platform_certificates = { pki.platform } },
    notify_url = o.notify_url or notify:url("/notify"),
    database = "sqlite:" .. dir .. "/doctor.sqlite",
    limits = o.limits, metrics_url = o.metrics_url, leases = o.leases,
    notify_route = o.notify_route,
    api_crl_file = o.crl,
  }
  local path = dir .. "/doctor." .. crypto.random_nonce(6) .. ".lua"
  write(path, "return " .. lua_literal(t))
  return path
end

local function tls_server(chain, key)
  return server.start{ source = APP, scheme = "https",
                       args = { "--tls-cert", chain, "--tls-key", key } }
end

setup(function()
  dir = server.tmpdir()
  pki = diagpki.make(dir)
  notify = server.start{ source = APP }
  -- the configs' database exists (doctor never makes one)
  assert(require("paygate.sql").open("sqlite:" .. dir .. "/doctor.sqlite"))
    :close()
end)

teardown(function()
  if notify then notify:stop() end
  os.execute("rm -rf " .. dir)
end)

describe("paygate doctor: the TLS chain to the API host", function()
  local cases = {
    { "a good chain", "good_chain", "good_key", nil, nil },
    { "an expired certificate", "expired_chain", "expired_key", "expired" },
    { "a certificate not valid yet", "notyet_chain", "notyet_key",
      "not_yet_valid" },
    { "a CA not trusted", "untrusted_chain", "untrusted_key",
      "unknown_authority" },
    { "a self-signed certificate", "self_signed", "self_signed_key",
      "self_signed_untrusted" },
    { "a missing intermediate", "good", "good_key", "missing_intermediate" },
    { "a certificate for another host", "wronghost_chain", "wronghost_key",
      "hostname_mismatch" },
    { "a certificate revoked by a CRL", "revoked_chain", "revoked_key",
      "revoked", true },
  }
  for _, c in ipairs(cases) do
    it("names " .. c[1], function()
      local s = tls_server(pki[c[2]], pki[c[3]])
      local code, out, r = run({ "doctor", "--json", "--config", config{
        base_url = "https://localhost:" .. s.port,
        crl = c[5] and pki.crl or nil } })
      s:stop()
      local tls = r.tls_chain
      assert.truthy(tls, out)
      if c[4] then
        assert.equal(1, code, out)
        assert.equal("fail", tls.status, out)
        assert.equal(c[4], tls.x509_kind, out)
        assert.truthy(tls.fix)
      else
        assert.equal("ok", tls.status, out)
        assert.equal("ok", r.reachability.status, out)
        assert.equal("ok", r.clock.status, out)
      end
    end)
  end
end)

-- cert_expiry lists each certificate the API host sends, whether the
-- chain verifies or not: an expired leaf fails tls_chain, and cert_expiry
-- is where its date is read (it was listed only when the chain verified,
-- so an expired one showed under tls_chain alone)
describe("paygate doctor's cert_expiry of the API host's certificates",
         function()
  local x509 = require "paygate.x509"

  local function expiry_lines(r)
    local l = {}
    for _, x in ipairs(r) do
      if x.kind == "cert_expiry" and x.cause:find("of localhost", 1, true)
      then
        l[#l + 1] = x
      end
    end
    return l
  end

  local function ends(name)
    local c = assert(x509.load(diagpki.read(pki[name])))
    return os.date("!%Y-%m-%d %H:%M UTC", c:not_after()), c:serial()
  end

  for _, c in ipairs({
    { "an expired leaf (the chain fails for it)", "expired", "fail",
      "expired 1 day" },
    { "a leaf expiring within 30 days (the chain verifies)", "good", "warn",
      "expires in 2 days" },
  }) do
    it("names " .. c[1] .. " and its intermediate", function()
      local s = tls_server(pki[c[2] .. "_chain"], pki[c[2] .. "_key"])
      local code, out, r = run({ "doctor", "--json", "--config", config{
        base_url = "https://localhost:" .. s.port } })
      s:stop()
      assert.equal(c[3] == "fail" and "fail" or "ok", r.tls_chain.status,
                   out)
      local l = expiry_lines(r)
      assert.equal(2, #l, out)
      -- the leaf: its subject, serial, days and end date
      local at, serial = ends(c[2])
      assert.equal(c[3], l[1].status, out)
      -- (days rounded down: "1 day 2 h" once the spec has run for hours)
      local head = "TLS certificate of localhost (CN=localhost) " .. serial
                   .. " " .. c[4]
      assert.equal(head, l[1].cause:sub(1, #head), out)
      assert.equal(", on " .. at, l[1].cause:sub(-#at - 5), out)
      assert.matches("install", l[1].fix, 1, true)
      -- the intermediate the host sends (3 days)
      at, serial = ends("inter")
      assert.equal("warn", l[2].status, out)
      assert.equal("TLS intermediate of localhost (CN=diag-intermediate) "
                   .. serial .. " expires in 2 days, on " .. at, l[2].cause,
                   out)
      if c[3] == "fail" then assert.equal(1, code, out) end
    end)
  end
end)

describe("paygate doctor", function()
  it("names a clock off against the API host's Date", function()
    local port = core.free_port()
    local date = os.date("!%a, %d %b %Y %H:%M:%S GMT", os.time() - 3600)
    local p = proc.spawn({ PAYGATE_BIN, "exec", "spec/support/fixed_http.lua",
                           tostring(port), date, "20" })
    assert(proc.wait_until(function()
      local res = paygate.http.request{ url = "http://127.0.0.1:" .. port
                                        .. "/", timeout = 1 }
      return res ~= nil
    end, 10, "the fixed server"))
    local code, out, r = run({ "doctor", "--json", "--config", config{
      base_url = "http://127.0.0.1:" .. port } })
    p:kill(proc.SIGKILL)
    p:wait(5)
    assert.equal(1, code, out)
    assert.equal("fail", r.clock.status)
    assert.matches("60 min %d+ s ahead of the API host's", r.clock.cause)
    -- the signed call's 401 then points at the clock first
    assert.equal("fail", r.signed_call and r.signed_call.status, out)
    assert.matches("sync the clock first", r.signed_call.fix, 1, true)
  end)

  it("fails a notify URL that accepts an unsigned notification", function()
    local s = tls_server(pki.good_chain, pki.good_key)
    local code, out, r = run({ "doctor", "--json", "--config", config{
      base_url = "https://localhost:" .. s.port,
      notify_url = notify:url("/notify-open") } })
    s:stop()
    assert.equal(1, code, out)
    assert.matches("accepted an unsigned probe", out)
  end)

  it("fails a notify URL holding user info, shows it without the password,"
     .. " and probes it without the credentials", function()
    local s = tls_server(pki.good_chain, pki.good_key)
    local url = notify:url("/notify-open"):gsub("^(https?://)",
                                                 "%1probe:S3CRETPW@")
    local code, out = run({ "doctor", "--json", "--config", config{
      base_url = "https://localhost:" .. s.port, notify_url = url } })
    assert.equal(1, code, out)
    assert.matches("holds user info", out, 1, true)
    assert.is_nil(out:find("S3CRETPW", 1, true), out)
    -- the probe went on, to the URL without its user info
    assert.matches("accepted an unsigned probe", out, 1, true)
    -- user info and a query string: both named (the query went unnamed),
    -- the query's values masked in every line (a token was printed)
    code, out = run({ "doctor", "--json", "--config", config{
      base_url = "https://localhost:" .. s.port,
      notify_url = url .. "?token=T0KENVAL&x=1" } })
    assert.equal(1, code, out)
    assert.matches("holds user info", out, 1, true)
    assert.matches("has a query string", out, 1, true)
    assert.matches("?token=***&x=***", out, 1, true)
    assert.matches("accepted an unsigned probe", out, 1, true)
    assert.is_nil(out:find("S3CRETPW", 1, true), out)
    assert.is_nil(out:find("T0KENVAL", 1, true), out)
    s:stop()
  end)

  it("fails a notify URL that does not answer within 5 s, and warns of a "
     .. "server timeout inside WeChat's window", function()
    local s = tls_server(pki.good_chain, pki.good_key)
    local t0 = core.mono()
    local code, out, r = run({ "doctor", "--json", "--config", config{
      base_url = "https://localhost:" .. s.port,
      notify_url = notify:url("/notify-slow"),
      limits = { request_timeout = 5 } } })
    s:stop()
    assert.equal(1, code, out)
    assert.matches("did not answer within 5 s", out)
    assert.equal("warn", r.server_timeouts.status)
    assert.is_true(core.mono() - t0 < 30)
  end)

  it("compares lease TTLs with the measured processing time", function()
    local s = tls_server(pki.good_chain, pki.good_key)
    local metrics = "http://127.0.0.1:" .. notify.admin .. "/metrics"
    -- nothing measured yet on /work
    local code, out, r = run({ "doctor", "--json", "--config", config{
      base_url = "https://localhost:" .. s.port, metrics_url = metrics,
      leases = { settle = { ttl = 0.1, route = "POST /work" } } } })
    assert.equal("warn", r.lease_ttl.status, out)
    assert.matches("nothing measured yet", r.lease_ttl.cause)
    for _ = 1, 3 do
      local res = notify:request{ method = "POST", path = "/work" }
      assert.equal(204, res.status)
    end
    code, out, r = run({ "doctor", "--json", "--config", config{
      base_url = "https://localhost:" .. s.port, metrics_url = metrics,
      leases = { settle = { ttl = 0.1, route = "POST /work" } } } })
    s:stop()
    assert.equal(1, code, out)
    assert.equal("fail", r.lease_ttl.status, out)
    assert.matches("done twice", r.lease_ttl.detail)
  end)

  it("judges work longer than /metrics' largest bucket (10 s) by that bound,"
     .. " not as an infinite time", function()
    local s = tls_server(pki.good_chain, pki.good_key)
    local metrics = "http://127.0.0.1:" .. notify.admin .. "/metrics"
    local res = notify:request{ method = "POST", path = "/work-long",
                                timeout = 20 }
    assert.equal(204, res.status)
    local function lease(ttl)
      local _, out, r = run({ "doctor", "--json", "--config", config{
        base_url = "https://localhost:" .. s.port, metrics_url = metrics,
        notify_route = "/work-long",
        leases = { settle = { ttl = ttl, route = "POST /work-long" } } } })
      assert.is_nil(out:find("inf", 1, true), out)
      return r, out
    end
    -- a TTL within the bound: shorter than the work, surely
    local r, out = lease(8)
    assert.equal("fail", r.lease_ttl.status, out)
    assert.matches("over 10 s", r.lease_ttl.cause, 1, true)
    assert.matches("done twice", r.lease_ttl.detail)
    -- past the bound: /metrics cannot tell how long the work takes, so it
    -- is no proof of a double charge; said as a warning
    r, out = lease(60)
    s:stop()
    assert.equal("warn", r.lease_ttl.status, out)
    assert.matches("over 10 s", r.lease_ttl.cause, 1, true)
    assert.equal("fail", r.notify_latency.status, out)
    assert.matches("over 10 s", r.notify_latency.cause, 1, true)
  end)

  it("checks the key against the certificate, the APIv3 key, the stores",
     function()
    local s = tls_server(pki.good_chain, pki.good_key)
    local path = config{ base_url = "https://localhost:" .. s.port }
    local text = diagpki.read(path)
    text = text:gsub('merchant_private_key="[^"]*"', 'merchant_private_key="'
                     .. pki.platform_key .. '"')
               :gsub('apiv3_key="[^"]*"', 'apiv3_key="'
                     .. crypto.hex("0123456789abcdefghijABCDEFGHIJkl") .. '"')
               :gsub("}$", ',redis="redis://127.0.0.1:' .. core.free_port()
                     .. '"}')
    write(path, text)
    local code, out, r = run({ "doctor", "--json", "--config", path })
    s:stop()
    assert.equal(1, code, out)
    assert.equal("fail", r.key_certificate.status)
    assert.equal("fail", r.apiv3_key.status)
    assert.matches("hex encoding", r.apiv3_key.cause)
    assert.equal("ok", r.database.status)
    assert.equal("fail", r.redis.status)
    assert.equal("warn", r.cert_expiry.status)      -- 3-day certificates
  end)

  it("exits 2 for an unreadable configuration", function()
    local code, out = run({ "doctor", "--config", "/nonexistent.lua" })
    assert.equal(2, code)
    assert.matches("cannot read config /nonexistent.lua", out)
  end)
end)
