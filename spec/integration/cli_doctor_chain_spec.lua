-- paygate doctor and x509.verify_chain: the two chain failures the other
-- doctor specs leave out, produced for real. Wrong usage: a TLS client
-- certificate (extendedKeyUsage clientAuth only) served as the API host's,
-- a key usage without digitalSignature / keyEncipherment, a leaf used as a
-- CA. Bad signature: a byte of the leaf's signature flipped, a leaf
-- re-signed by another key under its intermediate's name (the server
-- sends the real intermediate, which did not sign it).
local x509 = require "paygate.x509"
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local server = require "support.server"
local proc = require "support.proc"
local diagpki = require "support.diagpki"

local dir, pki, notify
local read, write = diagpki.read, diagpki.write

local APP = [[
local paygate = require "paygate"
paygate.route("GET", "/v3/certificates", function()
  return 401, { code = "SIGN_ERROR", message = "unsigned" }
end)
paygate.route("POST", "/notify", function() return 401, { code = "FAIL" } end)
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
      results[r.kind] = results[r.kind] or r
    end
  end
  return code, out, results
end

-- a config file against base_url, trusting the test root
local function config(base_url)
  local path = dir .. "/doctor." .. crypto.random_nonce(6) .. ".lua"
  write(path, ("return { wechatpay = { mchid = '1900000001', "
    .. "merchant_private_key = %q, merchant_certificate = %q, "
    .. "apiv3_key = '0123456789abcdefghijABCDEFGHIJkl', base_url = %q, "
    .. "ca_file = %q, platform_certificates = { %q } }, notify_url = %q, "
    .. "database = %q }"):format(pki.merchant_key, pki.merchant, base_url,
    pki.root, pki.platform, notify:url("/notify"),
    "sqlite:" .. dir .. "/doctor.sqlite"))
  return path
end

setup(function()
  dir = server.tmpdir()
  pki = diagpki.make(dir)
  notify = server.start{ source = APP }
end)

teardown(function()
  if notify then notify:stop() end
  os.execute("rm -rf " .. dir)
end)

describe("x509.verify_chain", function()
  local function verify(name, extra)
    local inter = { read(pki.inter) }
    if extra then inter[#inter + 1] = read(extra) end
    return x509.verify_chain(assert(x509.load(read(pki[name]))), {
      roots = { read(pki.root) }, intermediates = inter,
      hostname = "localhost", purpose = "server" })
  end

  it("passes the good leaf", function()
    assert.is_true(verify("good"))
  end)

  local cases = {
    { "clientonly", "wrong_usage", "unsuitable certificate purpose" },
    { "certsignonly", "wrong_usage", "unsuitable certificate purpose" },
    { "byleaf", "wrong_usage", "invalid CA certificate", "good" },
    { "flipped", "bad_signature", "does not verify with its issuer's key" },
    { "forged", "bad_signature", "did not sign it" },
  }
  for _, c in ipairs(cases) do
    it("names the " .. c[1] .. " leaf " .. c[2], function()
      local ok, err = verify(c[1], c[4] and pki[c[4]])
      assert.is_nil(ok)
      assert.equal(c[2], err.kind, tostring(err))
      assert.matches(c[3], err.message, 1, true)
    end)
  end
end)

describe("paygate doctor: the TLS chain to the API host", function()
  local cases = {
    { "a TLS client certificate (clientAuth only)", "clientonly",
      "wrong_usage", "serverAuth" },
    { "a leaf whose signature has a flipped byte", "flipped",
      "bad_signature", "altered" },
    { "a leaf re-signed by another key under the intermediate's name",
      "forged", "bad_signature", "altered" },
  }
  for _, c in ipairs(cases) do
    it("names " .. c[1], function()
      local s = server.start{ source = APP, scheme = "https", args = {
        "--tls-cert", pki[c[2] .. "_chain"],
        "--tls-key", pki[c[2] .. "_key"] } }
      local code, out, r = run({ "doctor", "--json", "--config",
                                 config("https://localhost:" .. s.port) })
      s:stop()
      local tls = r.tls_chain
      assert.truthy(tls, out)
      assert.equal(1, code, out)
      assert.equal("fail", tls.status, out)
      assert.equal(c[3], tls.x509_kind, out)
      assert.matches(c[4], tls.cause .. " " .. tls.fix, 1, true)
      -- the HTTP client refuses the same chain
      assert.equal("fail", r.reachability.status, out)
    end)
  end
end)

-- A doctor config whose notify_url is url, its CA diagpki's root, extra
-- (Lua text) appended to the table.
local function notify_config(url, extra)
  local path = dir .. "/doctor." .. crypto.random_nonce(6) .. ".lua"
  write(path, ("return { wechatpay = { mchid = '1900000001', "
    .. "merchant_private_key = %q, merchant_certificate = %q, "
    .. "apiv3_key = '0123456789abcdefghijABCDEFGHIJkl', base_url = "
    .. "'http://127.0.0.1:9' }, notify_url = %q, notify_ca_file = %q%s }")
    :format(pki.merchant_key, pki.merchant, url, pki.root, extra or ""))
  return path
end

-- WeChat delivers notifications over HTTPS only and trusts public CAs: a
-- notify server that sends its leaf without the intermediate, or a
-- self-signed certificate, gets no notification at all. notify_url names
-- the chain failure as tls_chain names the API host's (it was curl's
-- message, told as a timeout: "no answer within 5 s").
describe("paygate doctor: the TLS chain of the notify URL", function()
  local cases = {
    { "a leaf sent without its intermediate", "good", "good_key",
      "missing_intermediate", "the intermediates" },
    { "a self-signed certificate", "self_signed", "self_signed_key",
      "self_signed_untrusted", "public CAs only" },
    { "an expired certificate", "expired_chain", "expired_key", "expired",
      "renew" },
    { "a certificate for another host (DNS:wrong.example)",
      "wronghost_chain", "wronghost_key", "hostname_mismatch",
      "covers the host of notify_url" },
  }
  for _, c in ipairs(cases) do
    it("names " .. c[1], function()
      local s = server.start{ source = APP, scheme = "https", args = {
        "--tls-cert", pki[c[2]], "--tls-key", pki[c[3]] } }
      local code, out, r = run({ "doctor", "--json", "--config",
        notify_config("https://localhost:" .. s.port .. "/notify") })
      s:stop()
      local n = r.notify_url
      assert.truthy(n, out)
      assert.equal(1, code, out)
      assert.equal("fail", n.status, out)
      assert.equal(c[4], n.x509_kind, out)
      assert.matches("TLS " .. c[4], n.cause, 1, true)
      assert.matches("no notification reaches the handler", n.detail, 1,
                     true)
      assert.is_nil(n.detail:find("within 5 s", 1, true), out)
      assert.matches(c[5], n.fix, 1, true)
    end)
  end

  -- an IP-literal host: the verify's host check matches DNS names only,
  -- so the chain is verified without it (before: the expired chain below
  -- was hostname_mismatch, "install a certificate that covers the host")
  it("names the chain's fault at an IPv4 address, not the host",
     function()
    local s = server.start{ source = APP, scheme = "https", args = {
      "--tls-cert", pki.expired_chain, "--tls-key", pki.expired_key } }
    local code, out, r = run({ "doctor", "--json", "--config",
      notify_config("https://127.0.0.1:" .. s.port .. "/notify") })
    s:stop()
    local n = r.notify_url
    assert.truthy(n, out)
    assert.equal(1, code, out)
    assert.equal("fail", n.status, out)
    assert.equal("expired", n.x509_kind, out)
  end)

  -- A test server's certificate of the operator's own CA, doctor given no
  -- notify_ca_file: its issuer is not found, which doctor cannot tell from
  -- an intermediate left out; the fix names notify_ca_file as well (it
  -- said "serve the full chain" alone, which no chain served fixes).
  it("a leaf of an unknown issuer and no notify_ca_file: the fix names "
     .. "notify_ca_file", function()
    local s = server.start{ source = APP, scheme = "https", args = {
      "--tls-cert", pki.good, "--tls-key", pki.good_key } }
    local path = notify_config("https://localhost:" .. s.port .. "/notify")
    write(path, (read(path):gsub(", notify_ca_file = \"[^\"]*\"", "")))
    local code, out, r = run({ "doctor", "--json", "--config", path })
    s:stop()
    local n = r.notify_url
    assert.truthy(n, out)
    assert.equal(1, code, out)
    assert.equal("missing_intermediate", n.x509_kind, out)
    assert.matches("the intermediates", n.fix, 1, true)
    assert.matches("give doctor that CA as notify_ca_file", n.fix, 1, true)
  end)

  it("passes the full chain from a CA it trusts", function()
    local s = server.start{ source = APP, scheme = "https", args = {
      "--tls-cert", pki.good_chain, "--tls-key", pki.good_key } }
    local _, out, r = run({ "doctor", "--json", "--config",
      notify_config("https://localhost:" .. s.port .. "/notify") })
    s:stop()
    assert.equal("ok", r.notify_url and r.notify_url.status, out)
  end)
end)

-- cert_expiry of the notify URL's host: once the probe's handshake
-- passes, each certificate the host sends is listed as the API host's
-- are (a certificate ending in 5 days went unsaid, and WeChat's
-- notifications failed TLS the day it ended). An expired one fails the
-- handshake: notify_url names it, with its date, and cert_expiry does not
-- list it again.
describe("paygate doctor's cert_expiry of the notify URL's host",
         function()
  -- every result line of the --json output, in order
  local function lines(out)
    local l = {}
    for line in out:gmatch("[^\n]+") do
      local r = line:sub(1, 1) == "{" and json.decode(line)
      if type(r) == "table" and r.kind ~= nil then l[#l + 1] = r end
    end
    return l
  end
  local function notify_expiry(out)
    local l = {}
    for _, x in ipairs(lines(out)) do
      if x.kind == "cert_expiry" and x.cause:find("notify", 1, true) then
        l[#l + 1] = x
      end
    end
    return l
  end
  local function ends(pem)
    local c = assert(x509.load(read(pem)))
    return os.date("!%Y-%m-%d %H:%M UTC", c:not_after()), c:serial()
  end
  local function serve(chain, key)
    return server.start{ source = APP, scheme = "https", args = {
      "--tls-cert", chain, "--tls-key", key } }
  end

  it("warns of the leaf and intermediate it sends expiring within 30 "
     .. "days", function()
    local s = serve(pki.good_chain, pki.good_key)
    local _, out, r = run({ "doctor", "--json", "--config",
      notify_config("https://localhost:" .. s.port .. "/notify") })
    s:stop()
    assert.equal("ok", r.notify_url.status, out)
    local l = notify_expiry(out)
    assert.equal(2, #l, out)
    local at, serial = ends(pki.good)
    assert.equal("warn", l[1].status, out)
    assert.equal(("notify_url's TLS certificate of localhost:%d "
                  .. "(CN=localhost) %s expires in 2 days, on %s"):format(
                  s.port, serial, at), l[1].cause, out)
    assert.matches("WeChat cannot deliver notifications to localhost:"
                   .. s.port .. " once it expires", l[1].fix, 1, true)
    assert.matches("renew the certificate on the notify host", l[1].fix, 1,
                   true)
    -- a certificate of the operator's own CA (a test): said so
    assert.matches("notify_ca_file", l[1].fix, 1, true)
    at, serial = ends(pki.inter)
    assert.equal("warn", l[2].status, out)
    assert.equal(("notify_url's TLS intermediate of localhost:%d "
                  .. "(CN=diag-intermediate) %s expires in 2 days, on %s")
                 :format(s.port, serial, at), l[2].cause, out)
  end)

  it("says the days left of a certificate valid long", function()
    -- a CA and a leaf of 400 days (diagpki's are of 3)
    local function f(n) return dir .. "/long_" .. n end
    local function sh(cmd)
      local ok = os.execute(cmd .. " >/dev/null 2>&1")
      assert(ok == 0 or ok == true, cmd)
    end
    sh(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s -out %s "
        .. "-days 400 -subj /CN=diag-long-root -addext basicConstraints="
        .. "critical,CA:TRUE"):format(f("root.key"), f("root.pem")))
    sh(("openssl req -newkey rsa:2048 -nodes -keyout %s -out %s -subj "
        .. "/CN=localhost"):format(f("leaf.key"), f("leaf.csr")))
    sh(("openssl x509 -req -in %s -CA %s -CAkey %s -set_serial 0x4C4F -out "
        .. "%s -days 400 -sha256 -extfile %s"):format(f("leaf.csr"),
        f("root.pem"), f("root.key"), f("leaf.pem"), dir .. "/good.ext"))
    local s = serve(f("leaf.pem"), f("leaf.key"))
    local path = notify_config("https://localhost:" .. s.port .. "/notify")
    write(path, (read(path):gsub("notify_ca_file = \"[^\"]*\"",
                                 ("notify_ca_file = %q"):format(
                                   f("root.pem")))))
    local _, out, r = run({ "doctor", "--json", "--config", path })
    s:stop()
    assert.equal("ok", r.notify_url.status, out)
    local l = notify_expiry(out)
    assert.equal(1, #l, out)
    local at = ends(f("leaf.pem"))
    assert.equal("ok", l[1].status, out)
    -- (399 days and some hours: rounded down)
    assert.equal(("notify_url's TLS certificate of localhost:%d "
                  .. "(CN=localhost) 4C4F: 399 days left, until %s"):format(
                  s.port, at), l[1].cause, out)
  end)

  it("an expired certificate: notify_url names it with its date, "
     .. "cert_expiry does not list it again", function()
    local s = serve(pki.expired_chain, pki.expired_key)
    local code, out, r = run({ "doctor", "--json", "--config",
      notify_config("https://localhost:" .. s.port .. "/notify") })
    s:stop()
    assert.equal(1, code, out)
    local n = r.notify_url
    assert.equal("fail", n.status, out)
    assert.equal("expired", n.x509_kind, out)
    assert.matches("expired on", n.detail, 1, true)
    assert.matches("renew", n.fix, 1, true)
    assert.equal(0, #notify_expiry(out), out)
  end)

  -- the HTTPS listener's certificate (the config's tls section) served at
  -- the notify URL: one line, naming it as both
  it("names the listener's certificate the notify host sends once",
     function()
    local s = serve(pki.good_chain, pki.good_key)
    local _, out = run({ "doctor", "--json", "--config",
      notify_config("https://localhost:" .. s.port .. "/notify",
        (", tls = { cert = %q, key = %q }"):format(pki.good_chain,
                                                   pki.good_key)) })
    s:stop()
    local l = notify_expiry(out)
    assert.equal(2, #l, out)
    local _, serial = ends(pki.good)
    assert.matches("^the HTTPS listener's certificate %(tls%.cert%), which "
                   .. "the notify host localhost:" .. s.port .. " sends, "
                   .. serial .. " expires in 2 days", l[1].cause)
    assert.matches("^WeChat cannot deliver notifications", l[1].fix)
    assert.matches("give tls.cert and tls.key", l[1].fix, 1, true)
    assert.matches("^notify_url's TLS intermediate of localhost:"
                   .. s.port, l[2].cause)
  end)
end)
