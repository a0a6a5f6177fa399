-- paygate doctor: what a first version passed or got backwards — a notify
-- URL answering 404, 405, a redirect or a proxy's 502 (the handler's own
-- refusal, 401 or notify_fail's 500 FAIL, passes); an https:// notify URL
-- served by plain HTTP; the merchant certificate put in
-- platform_certificates; header_timeout and body_timeout against WeChat's
-- 5 s; the serial-mismatch check; notify_latency from the metrics; a
-- weak (SHA-1 signed) TLS certificate on the API host; a cause from a
-- driver flattened to one line.
local paygate = require "paygate"
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local server = require "support.server"
local proc = require "support.proc"
local diagpki = require "support.diagpki"

local dir, pki, app
local write = diagpki.write

local APP = [[
local paygate = require "paygate"
local wechatpay = require "paygate.wechatpay"
paygate.route("GET", "/v3/certificates", function()
  return 401, { code = "SIGN_ERROR", message = "unsigned" }
end)
paygate.route("POST", "/notify", function() return 401, { code = "FAIL" } end)
paygate.route("POST", "/notify-fail", function()
  return wechatpay.notify_fail("signature")
end)
paygate.route("POST", "/notify-proxy", function()
  return 502, "<html>Bad Gateway</html>"
end)
paygate.route("GET", "/notify-get-only", function() return 200, "" end)
paygate.route("POST", "/notify-moved", function()
  return 301, "", { location = "/elsewhere" }
end)
paygate.route("POST", "/notify-by/:mchid", function()
  return 401, { code = "FAIL" }
end)
paygate.route("POST", "/notify-late", function()
  paygate.sleep(5.3)
  return 401, ""
end)
]]

-- (pre: a command line run before paygate's, e.g. env setting variables)
local function run(args, pre)
  local log = dir .. "/out." .. crypto.random_nonce(8)
  local argv = {}
  for _, a in ipairs(pre or {}) do argv[#argv + 1] = a end
  argv[#argv + 1] = PAYGATE_BIN
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
      results[r.kind] = r                    -- the last of its kind
    end
  end
  return code, out, results
end

-- the results of one kind
local function all(results, kind)
  local l = {}
  for _, r in ipairs(results) do
    if r.kind == kind then l[#l + 1] = r end
  end
  return l
end

-- a table as Lua source (strings quoted with %q)
local function lua_literal(v)
  if type(v) == "table" then
    local parts = {}
    for k, x in pairs(v) do
      parts[#parts + 1] = (type(k) == "number" and "[" .. k .. "]="
                           or k .. "=") .. lua_literal(x)
    end
    return "{" .. table.concat(parts, ",") .. "}"
  elseif type(v) == "string" then
    return ("%q"):format(v)
  end
  return tostring(v)
end

-- a configuration against the plain-HTTP app (quick: no TLS to check)
local function config(o)
  local wc = { mchid = "1900000001", merchant_private_key = pki.merchant_key,
    merchant_certificate = pki.merchant,
    apiv3_key = "0123456789abcdefghijABCDEFGHIJkl",
    base_url = o.base_url or app:url(""), ca_file = pki.root,
    platform_certificates = o.platform or { pki.platform },
    merchant_serial = o.serial, state_dir = o.state_dir }
  local t = { wechatpay = wc, notify_url = o.notify_url or app:url("/notify"),
    database = o.database or ("sqlite:" .. dir .. "/doctor.sqlite"),
    limits = o.limits, metrics_url = o.metrics_url,
    notify_route = o.notify_route, leases = o.leases }
  local path = dir .. "/doctor." .. crypto.random_nonce(6) .. ".lua"
  write(path, "return " .. lua_literal(t))
  return path
end

setup(function()
  dir = server.tmpdir()
  pki = diagpki.make(dir)
  app = server.start{ source = APP }
end)

teardown(function()
  if app then app:stop() end
  os.execute("rm -rf " .. dir)
end)

describe("paygate doctor: the notify URL's answer to the unsigned probe",
         function()
  local cases = {
    { "/notify", "ok" },                        -- 401 from the handler
    { "/notify-fail", "ok" },                   -- notify_fail's 500 FAIL
    { "/no-such-path", "fail", "no handler at this path" },       -- 404
    { "/notify-get-only", "fail", "no handler at this path" },    -- 405
    { "/notify-moved", "fail", "no handler at this path" },       -- 301
    { "/notify-proxy", "fail", "a proxy answers" },               -- 502
  }
  for _, c in ipairs(cases) do
    it(c[1] .. " is " .. c[2], function()
      local code, out, r = run({ "doctor", "--json", "--config",
                                 config{ notify_url = app:url(c[1]) } })
      assert.equal(c[2], r.notify_url.status, out)
      if c[3] then
        assert.equal(1, code, out)
        assert.matches(c[3], r.notify_url.cause, 1, true)
      end
    end)
  end

  it("names an https:// notify URL served by plain HTTP", function()
    local code, out, r = run({ "doctor", "--json", "--config", config{
      notify_url = "https://127.0.0.1:" .. app.port .. "/notify" } })
    assert.equal(1, code, out)
    assert.matches("plain HTTP, not TLS", r.notify_url.cause)
    assert.is_nil(r.notify_url.cause:find("did not answer", 1, true))
  end)
end)

describe("paygate doctor", function()
  it("names the merchant certificate put in platform_certificates",
     function()
    local code, out, r = run({ "doctor", "--json", "--config", config{
      platform = { pki.platform, pki.merchant } } })
    assert.equal(1, code, out)
    local p = r.platform_certificates
    assert.equal("fail", p.status, out)
    assert.matches("platform_certificates%[2%]", p.cause)
    assert.matches("merchant's own API certificate", p.cause)
    assert.is_nil(out:find("fix wechatpay.merchant_serial", 1, true))
  end)

  it("judges a CA certificate in platform_certificates as the client"
     .. " uses it", function()
    -- beside the platform certificate (a chain file) it is the issuer: not
    -- used, nothing to say
    local chain = dir .. "/chain." .. crypto.random_nonce(6) .. ".pem"
    write(chain, diagpki.read(pki.platform) .. diagpki.read(pki.root))
    local _, out, r = run({ "doctor", "--json", "--config", config{
      platform = { chain } } })
    for _, x in ipairs(all(r, "platform_certificates")) do
      assert.is_nil(x.cause and x.cause:find("CA certificate", 1, true),
                    out)
    end
    -- alone it is used: a warning (a root put there verifies nothing)
    _, out, r = run({ "doctor", "--json", "--config", config{
      platform = { pki.platform, pki.root } } })
    local seen
    for _, x in ipairs(all(r, "platform_certificates")) do
      if x.cause and x.cause:find("is a CA certificate", 1, true) then
        seen = x
      end
    end
    assert.truthy(seen, out)
    assert.equal("warn", seen.status, out)
    assert.matches("platform_certificates%[2%]", seen.cause)
    assert.matches("platform_ca", seen.fix, 1, true)
  end)

  it("checks header_timeout and body_timeout against the 5 s window",
     function()
    local code, out, r = run({ "doctor", "--json", "--config", config{
      limits = { request_timeout = 15, header_timeout = 5,
                 body_timeout = 4 } } })
    local warned = {}
    for _, x in ipairs(all(r, "server_timeouts")) do
      if x.status == "warn" then warned[#warned + 1] = x.cause end
    end
    assert.equal(2, #warned, out)
    assert.matches("header_timeout 5 s", warned[1])
    assert.matches("body_timeout 4 s", warned[2])
    code, out, r = run({ "doctor", "--json", "--config", config{} })
    for _, x in ipairs(all(r, "server_timeouts")) do
      assert.equal("ok", x.status, out)
    end
  end)

  it("names a timeout in quotes, a metrics_url or a lease that is no "
     .. "table, and goes on", function()
    local code, out, r = run({ "doctor", "--json", "--config", config{
      limits = { request_timeout = "30", header_timeout = "3" },
      metrics_url = { "http://127.0.0.1:9/metrics" },
      leases = { notify = 10 } } })
    assert.equal(1, code, out)
    assert.not_matches("internal error", out)
    local failed = {}
    for _, x in ipairs(all(r, "server_timeouts")) do
      if x.status == "fail" then failed[#failed + 1] = x.cause end
    end
    assert.same({ "limits.request_timeout is a string, not a number",
                  "limits.header_timeout is a string, not a number" },
                failed, out)
    assert.equal("fail", r.metrics_url.status, out)
    assert.equal("fail", r.lease_ttl.status, out)
    assert.matches("leases.notify needs ttl", r.lease_ttl.cause)
    -- the checks after them ran
    assert.truthy(r.cert_expiry, out)
  end)

  it("fails a merchant_serial that is not the certificate's", function()
    local code, out, r = run({ "doctor", "--json", "--config", config{
      serial = ("AB"):rep(20) } })
    assert.equal(1, code, out)
    assert.equal("fail", r.serial_format.status)
    assert.matches("is not merchant_certificate's serial", r.serial_format.cause)
  end)

  it("judges notify_latency from the measured answers", function()
    local metrics = "http://127.0.0.1:" .. app.admin .. "/metrics"
    local res = app:request{ method = "POST", path = "/notify" }
    assert.equal(401, res.status)
    local code, out, r = run({ "doctor", "--json", "--config", config{
      metrics_url = metrics } })
    assert.equal("ok", r.notify_latency.status, out)
    res = app:request{ method = "POST", path = "/notify-late", timeout = 15 }
    assert.equal(401, res.status)
    code, out, r = run({ "doctor", "--json", "--config", config{
      metrics_url = metrics, notify_url = app:url("/notify-late") } })
    assert.equal(1, code, out)
    assert.equal("fail", r.notify_latency.status, out)
    assert.matches("not within 5 s", r.notify_latency.cause)
  end)

  it("says nothing listens at a loopback notify URL, and that WeChat could"
     .. " not reach it anyway", function()
    local code, out, r = run({ "doctor", "--json", "--config", config{
      notify_url = "http://127.0.0.1:9/wechatpay/notify" } })
    assert.equal(1, code, out)
    assert.equal("warn", r.notify_host.status, out)
    assert.matches("127.0.0.1 is a loopback address", r.notify_host.cause,
                   1, true)
    assert.equal("fail", r.notify_url.status, out)
    assert.matches("nothing listens there", r.notify_url.fix, 1, true)
    assert.is_nil(r.notify_url.fix:find("DNS", 1, true))
    -- not the gateway's config: the fixes name this config's keys and the
    -- app, not the reference gateway and its public_url
    assert.matches("start the app that serves it", r.notify_url.fix, 1, true)
    assert.is_nil(r.notify_url.fix:find("gateway", 1, true), r.notify_url.fix)
    assert.is_nil(r.notify_host.fix:find("gateway", 1, true), r.notify_host.fix)
  end)

  it("finds a notify route with a parameter by notify_route", function()
    local metrics = "http://127.0.0.1:" .. app.admin .. "/metrics"
    local res = app:request{ method = "POST", path = "/notify-by/1900000001" }
    assert.equal(401, res.status)
    -- /metrics labels it /notify-by/:mchid: the URL's path finds nothing
    local _, out, r = run({ "doctor", "--json", "--config", config{
      metrics_url = metrics, notify_url = app:url("/notify-by/1900000001"),
      leases = { notify = { ttl = 10, route = "POST /notify-by/1900000001" },
                 other = { ttl = 10, route = "POST /notify-by" } } } })
    -- said, as lease_ttl says it, naming the route looked for and the
    -- pattern /metrics measures it under (more traffic would change
    -- nothing)
    assert.equal("warn", r.notify_latency and r.notify_latency.status, out)
    assert.matches("POST /notify-by/1900000001: nothing measured yet",
                   r.notify_latency.cause, 1, true)
    assert.matches('notify_route = "/notify-by/:mchid"',
                   r.notify_latency.fix, 1, true)
    local leases = {}
    for line in out:gmatch("[^\n]+") do
      local l = json.decode(line)
      if l and l.kind == "lease_ttl" then leases[#leases + 1] = l end
    end
    assert.equal(2, #leases, out)
    for _, l in ipairs(leases) do
      assert.equal("warn", l.status, out)
      assert.matches("nothing measured yet", l.cause, 1, true)
      assert.matches('route = "POST /notify-by/:mchid"', l.fix, 1, true)
    end
    -- a metrics_url that does not answer: said too
    _, out, r = run({ "doctor", "--json", "--config", config{
      metrics_url = "http://127.0.0.1:9/metrics" } })
    assert.equal("warn", r.notify_latency and r.notify_latency.status, out)
    assert.matches("no answer from http://127.0.0.1:9/metrics",
                   r.notify_latency.detail, 1, true)
    _, out, r = run({ "doctor", "--json", "--config", config{
      metrics_url = metrics, notify_url = app:url("/notify-by/1900000001"),
      notify_route = "/notify-by/:mchid" } })
    assert.equal("ok", r.notify_latency and r.notify_latency.status, out)
    assert.matches("POST /notify-by/:mchid", r.notify_latency.cause, 1, true)
  end)

  it("names a missing merchant key as missing", function()
    local path = dir .. "/doctor.nokey.lua"
    write(path, 'return { wechatpay = { mchid = "1900000001" } }')
    local _, out = run({ "doctor", "--config", path })
    -- (the line read "merchant_key: nil")
    assert.matches("FAIL  merchant_key: wechatpay.merchant_private_key is"
                   .. " missing", out, 1, true)
  end)

  -- notify_ulr = ... was passed over: doctor said only "no notify_url in
  -- the configuration: not checked" and exited 0. A key of the app's own
  -- (one far from any doctor reads) is left alone.
  it("names a top-level key one slip from one it reads", function()
    local path = dir .. "/doctor.typo.lua"
    write(path, "return " .. lua_literal{ wechatpay = {
      mchid = "1900000001", merchant_private_key = pki.merchant_key,
      merchant_certificate = pki.merchant, base_url = app:url(""),
      apiv3_key = "0123456789abcdefghijABCDEFGHIJkl",
      platform_certificates = { pki.platform } },
      notify_ulr = app:url("/notify"),
      databse = "sqlite:" .. dir .. "/doctor.sqlite",
      shop_name = "example" })
    local _, out, r = run({ "doctor", "--json", "--config", path })
    local seen = {}
    for _, x in ipairs(all(r, "config_key")) do
      assert.equal("warn", x.status, out)
      seen[#seen + 1] = x.cause
    end
    table.sort(seen)
    assert.same({
      "databse is not a key doctor reads (did you mean database?)",
      "notify_ulr is not a key doctor reads (did you mean notify_url?)" },
      seen, out)
  end)

  -- Runs doctor --json on wc as a user that may not read `files`: root
  -- reads a mode-000 file, so then as nobody (setpriv) on root's mode-600
  -- files (the others in d readable). returns: the exit code, the output and the first result of
  -- each kind; nil when neither can be arranged (the caller is pending).
  local function doctor_denied(d, wc, files)
    local path = d .. "/doctor.lua"
    write(path, "return " .. lua_literal{ wechatpay = wc })
    local argv = { PAYGATE_BIN, "doctor", "--json", "--config", path }
    local _, uid = proc.run({ "id", "-u" })
    if uid:match("^0%s") then
      if os.execute("command -v setpriv >/dev/null") ~= 0 then
        return nil
      end
      -- nobody goes through the folder and reads every file in it but
      -- `files`
      assert(os.execute(("chmod 711 %s && chmod 644 %s/* && chmod 600 %s")
        :format(d, d, table.concat(files, " "))) == 0)
      for i, a in ipairs({ "setpriv", "--reuid=65534", "--regid=65534",
                           "--clear-groups" }) do
        table.insert(argv, i, a)
      end
    else
      assert(os.execute(("chmod 000 %s"):format(table.concat(files, " ")))
             == 0)
    end
    local p = proc.spawn(argv, { log = d .. "/out" })
    local code = p:wait(60)
    if code == nil then p:kill(proc.SIGKILL); p:wait(2) end
    local out = proc.read(d .. "/out")
    local r = {}
    for line in out:gmatch("[^\n]+") do
      local x = line:sub(1, 1) == "{" and json.decode(line)
      if type(x) == "table" and x.kind then r[x.kind] = r[x.kind] or x end
    end
    return code, out, r
  end

  local NO_SETPRIV = "running as root without setpriv: root reads a"
    .. " mode-000 file, so there is no EACCES to see"

  -- a key file this user may not read was told "point it at
  -- apiclient_key.pem (a path)": the path was right, the user wrong.
  -- Root reads a mode-000 file: then doctor runs as nobody (setpriv) on
  -- root's mode-600 files, or the check is left pending, saying why.
  it("says a key file it may not read is a matter of user or mode, not"
     .. " of path", function()
    local d = server.tmpdir()
    local key, cert = d .. "/apiclient_key.pem", d .. "/apiclient_cert.pem"
    write(key, diagpki.read(pki.merchant_key))
    write(cert, diagpki.read(pki.merchant))
    local code, out, r = doctor_denied(d, {
      mchid = "1900000001", merchant_private_key = key,
      merchant_certificate = cert, base_url = app:url(""),
      apiv3_key = "0123456789abcdefghijABCDEFGHIJkl" }, { key, cert })
    if not code then pending(NO_SETPRIV) return end
    assert.equal(1, code, out)
    for _, kind in ipairs({ "merchant_key", "merchant_certificate" }) do
      local x = r[kind]
      assert.equal("fail", x and x.status, out)
      assert.matches("Permission denied", x.cause, 1, true)
      assert.matches("run paygate doctor as the user the gateway runs as",
                     x.fix, 1, true)
      assert.is_nil(x.fix:find("point it at", 1, true), x.fix)
    end
    -- the client's own check of the configuration fails on the same
    -- file: its fix was a bare "fix wechatpay.merchant_private_key"
    local x = r.wechatpay_config
    assert.equal("fail", x and x.status, out)
    assert.matches("run paygate doctor as the user the gateway runs as",
                   x.fix, 1, true)
  end)

  it("checks state_dir: a folder this user can write, and what it holds"
     .. " for the merchant", function()
    -- was: no check at all; a state_dir the gateway could not write was
    -- one warning in its log per download, and a restart while WeChat Pay
    -- was unreachable had nothing to verify with
    local function state(o)
      local _, out, r = run({ "doctor", "--json", "--config", config(o) })
      assert.truthy(r.state_dir, out)
      return r.state_dir, out
    end
    local base = server.tmpdir()
    -- missing: made at the first download (the folder above is writable)
    local x, out = state{ state_dir = base .. "/a/b" }
    assert.equal("warn", x.status, out)
    assert.matches("wechatpay.state_dir (" .. base .. "/a/b) does not exist"
                   .. " yet", x.cause, 1, true)
    assert.is_nil(core.file_type(base .. "/a"), "doctor made it")
    -- a file where the folder belongs
    write(base .. "/file", "x")
    x, out = state{ state_dir = base .. "/file" }
    assert.equal("fail", x.status, out)
    assert.matches("is a file, not a folder", x.cause, 1, true)
    assert.matches("point wechatpay.state_dir at a folder", x.fix, 1, true)
    x, out = state{ state_dir = base .. "/file/under" }
    assert.equal("fail", x.status, out)
    assert.matches("cannot be made: " .. base .. "/file is not a folder",
                   x.cause, 1, true)
    -- a folder holding nothing for this merchant
    local sd = base .. "/state"
    assert(core.mkdir_p(sd))
    x, out = state{ state_dir = sd }
    assert.equal("warn", x.status, out)
    assert.matches("holds no platform certificate of merchant 1900000001"
                   .. " yet", x.cause, 1, true)
    local names = assert(core.listdir(sd))
    assert.same({}, names)                    -- the probe file removed
    -- the certificates kept, when they end, how old the file is
    local file = sd .. "/wechatpay-1900000001-platform-certificates.pem"
    write(file, diagpki.read(pki.platform))
    local serial = assert(crypto.certificate(diagpki.read(pki.platform)))
                   :serial()
    x, out = state{ state_dir = sd }
    assert.equal("ok", x.status, out)
    assert.matches("1 platform certificate of merchant 1900000001 ("
                   .. serial .. " until ", x.cause, 1, true)
    assert.matches("written %d+ s ago", x.cause)
    -- one expired: the file is not rewritten by downloads
    write(file, diagpki.read(pki.platform) .. diagpki.read(pki.expired))
    x, out = state{ state_dir = sd }
    assert.equal("warn", x.status, out)
    assert.matches("2 platform certificates", x.cause, 1, true)
    assert.matches("1 expired", x.cause, 1, true)
    assert.matches("cannot save the platform certificates", x.fix, 1, true)
    -- old: no download saved it for more than two refresh intervals
    write(file, diagpki.read(pki.platform))
    local t = os.time() - 3 * 86400
    assert.truthy(os.execute("touch -m -d @" .. t .. " " .. file))
    x, out = state{ state_dir = sd }
    assert.equal("warn", x.status, out)
    assert.matches("written 3 days ago", x.cause, 1, true)
    assert.matches("older than two refresh intervals (24 h 0 min)",
                   x.cause, 1, true)
    -- only expired ones: none to verify with after a restart
    write(file, diagpki.read(pki.expired))
    x, out = state{ state_dir = sd }
    assert.equal("fail", x.status, out)
    assert.matches("none valid", x.cause, 1, true)
    os.execute("rm -rf " .. base)
  end)

  it("says a state_dir it may not write is a matter of user or mode",
     function()
    local d = server.tmpdir()
    local key, cert = d .. "/apiclient_key.pem", d .. "/apiclient_cert.pem"
    write(key, diagpki.read(pki.merchant_key))
    write(cert, diagpki.read(pki.merchant))
    assert(core.mkdir_p(d .. "/state"))
    local code, out, r = doctor_denied(d, {
      mchid = "1900000001", merchant_private_key = key,
      merchant_certificate = cert, base_url = app:url(""),
      apiv3_key = "0123456789abcdefghijABCDEFGHIJkl",
      state_dir = d .. "/state" }, { d .. "/state" })
    if not code then pending(NO_SETPRIV) return end
    local x = r.state_dir
    assert.equal("fail", x and x.status, out)
    assert.matches("is not writable by this user", x.cause, 1, true)
    assert.matches("Permission denied", x.cause, 1, true)
    assert.matches("run paygate doctor as the user the gateway runs as",
                   x.fix, 1, true)
  end)

  it("says a platform certificate file it may not read is a matter of"
     .. " user or mode", function()
    local d = server.tmpdir()
    local f = {}
    for _, k in ipairs({ "platform", "merchant_key", "merchant", "root" }) do
      f[k] = d .. "/" .. k .. ".pem"
      write(f[k], diagpki.read(pki[k]))
    end
    local code, out, r = doctor_denied(d, {
      mchid = "1900000001", merchant_private_key = f.merchant_key,
      merchant_certificate = f.merchant, base_url = app:url(""),
      ca_file = f.root, platform_certificates = { f.platform },
      apiv3_key = "0123456789abcdefghijABCDEFGHIJkl" }, { f.platform })
    if not code then pending(NO_SETPRIV) return end
    assert.equal(1, code, out)
    local x = r.wechatpay_config
    assert.equal("fail", x and x.status, out)
    assert.matches("Permission denied", x.cause, 1, true)
    assert.matches("run paygate doctor as the user the gateway runs as",
                   x.fix, 1, true)
  end)

  -- doctor read a key or certificate file with io.open + read("*a"): a
  -- FIFO named as the key held it for good (the open waits for a writer),
  -- a folder said only "cannot open", a wrong 2 MiB file was read whole
  -- and said "does not load (not_pem)". It now reads them as the gateway
  -- does (paygate.read_file): refused unread, saying why.
  it("refuses a key file that is a FIFO, a folder or past 1 MiB, unread,"
     .. " saying why", function()
    local d = server.tmpdir()
    assert(os.execute(("mkfifo %s/key.pem && mkdir %s/cert.pem")
      :format(d, d)) == 0)
    local wc = { mchid = "1900000001", merchant_private_key = d .. "/key.pem",
      merchant_certificate = d .. "/cert.pem", base_url = app:url(""),
      apiv3_key = "0123456789abcdefghijABCDEFGHIJkl" }
    local path = d .. "/doctor.lua"
    write(path, "return " .. lua_literal{ wechatpay = wc })
    local code, out, r = run({ "doctor", "--json", "--config", path })
    assert.equal(1, code, out)              -- (nil: it waited on the FIFO)
    local x = r.merchant_key
    assert.equal("fail", x and x.status, out)
    assert.matches("wechatpay.merchant_private_key is neither PEM text"
      .. " (-----BEGIN...) nor a readable file (value not shown): not a"
      .. " regular file (a FIFO, a socket or a device)", x.cause, 1, true)
    assert.matches("point it at apiclient_key.pem", x.fix, 1, true)
    x = r.merchant_certificate
    assert.equal("fail", x and x.status, out)
    assert.matches("nor a readable file (value not shown): Is a directory",
                   x.cause, 1, true)
    assert.matches("point it at apiclient_cert.pem", x.fix, 1, true)
    assert.is_nil(out:find(d, 1, true), out)    -- the path is not said
    -- a file past 1 MiB: the wrong one, not read
    local f = assert(io.open(d .. "/big.pem", "wb"))
    f:write(("x"):rep(1024 * 1024 + 1))
    f:close()
    wc.merchant_private_key, wc.merchant_certificate = d .. "/big.pem", nil
    write(path, "return " .. lua_literal{ wechatpay = wc })
    code, out, r = run({ "doctor", "--json", "--config", path })
    assert.equal(1, code, out)
    x = r.merchant_key
    assert.equal("fail", x and x.status, out)
    assert.matches("wechatpay.merchant_private_key: the file is over"
                   .. " 1048576 bytes", x.cause, 1, true)
  end)

  it("keeps a driver's multi-line message on one line", function()
    -- libpq's refusal of two hosts is two lines: "...port P1 failed:
    -- Connection refused\n...port P2 failed: Connection refused"
    local p1, p2 = core.free_port(), core.free_port()
    local code, out = run({ "doctor", "--config", config{
      database = "postgres://paygate@127.0.0.1:" .. p1 .. ",127.0.0.1:"
                 .. p2 .. "/paygate" } })
    assert.equal(1, code, out)
    local line = out:match("FAIL  database: [^\n]*")
    assert.truthy(line, out)
    assert.is_nil(line:find("\t", 1, true))
    assert.matches("port " .. p1 .. " failed: Connection refused.*port "
                   .. p2 .. " failed: Connection refused", line)
    -- the pool's own warning is not printed beside it (stdout and stderr)
    assert.is_nil(out:find("pool down", 1, true), out)
  end)

  if require("spec.support.servers").have_postgres() then
    it("names what a PostgreSQL server refused the login for, and where"
       .. " the password comes from", function()
      -- before: every failed open, a refused login included, was fixed
      -- with "check database ... and that the server runs": an operator
      -- running doctor from a shell without the service's PGPASSFILE
      -- (libpq's "no password supplied") was sent to check a server that
      -- was up
      local servers = require "spec.support.servers"
      local srv = servers.postgres{ password = "doctorpw" }
      local ok, err = pcall(function()
        local base = "127.0.0.1:" .. srv.port
        -- libpq takes the password from PGPASSWORD or PGPASSFILE: neither
        local env = { "/usr/bin/env", "-u", "PGPASSWORD",
                      "PGPASSFILE=" .. dir .. "/no-pgpass" }
        local function doctor(url)
          return run({ "doctor", "--json", "--config",
                       config{ database = url } }, env)
        end
        local code, out, r = doctor("postgres://postgres@" .. base
                                    .. "/postgres")
        assert.equal(1, code, out)
        assert.equal("fail", r.database.status, out)
        assert.matches("no password supplied", r.database.cause, 1, true)
        assert.is_nil(r.database.fix:find("that the server runs", 1, true),
                      r.database.fix)
        assert.matches("PGPASSFILE", r.database.fix, 1, true)
        assert.matches("environment the gateway runs with", r.database.fix,
                       1, true)
        -- a wrong password: the password, never shown
        code, out, r = doctor("postgres://postgres:wrongpw@" .. base
                              .. "/postgres")
        assert.equal(1, code, out)
        assert.matches("28P01", r.database.cause, 1, true)
        -- (the config's URL gives it: fixed there, whoever connects)
        assert.matches("refused the password the URL in database gives"
                       .. " for its user: fix it there", r.database.fix, 1,
                       true)
        assert.is_nil(out:find("wrongpw", 1, true), out)
        -- a wrong password from doctor's environment (PGPASSWORD), the URL
        -- giving none: it is the gateway's environment that counts.
        -- Before: "fix it where doctor reads it", as if doctor's password
        -- were the one to fix
        code, out, r = run({ "doctor", "--json", "--config",
          config{ database = "postgres://postgres@" .. base .. "/postgres" }
        }, { "/usr/bin/env", "PGPASSWORD=wrongenvpw",
             "PGPASSFILE=" .. dir .. "/no-pgpass" })
        assert.equal(1, code, out)
        assert.matches("28P01", r.database.cause, 1, true)
        assert.matches("refused the password for the URL's user, which the"
          .. " URL in database does not give: fix it where libpq took it"
          .. " from, PGPASSFILE (default ~/.pgpass of the user running"
          .. " doctor", r.database.fix, 1, true)
        assert.matches("run doctor with the environment the gateway runs"
                       .. " with", r.database.fix, 1, true)
        assert.is_nil(out:find("wrongenvpw", 1, true), out)
        -- a database that does not exist
        code, out, r = doctor("postgres://postgres:doctorpw@" .. base
                              .. "/gatewy")
        assert.equal(1, code, out)
        assert.matches("3D000", r.database.cause, 1, true)
        assert.matches("no database gatewy", r.database.fix, 1, true)
        assert.is_nil(out:find("doctorpw", 1, true), out)
        -- a role without CONNECT on the database
        local sql = require "paygate.sql"
        local adm = assert(sql.open("postgres://postgres:doctorpw@" .. base
                                    .. "/postgres"))
        for _, q in ipairs({ "CREATE ROLE docrole LOGIN PASSWORD 'rolepw'",
                             "CREATE DATABASE docdb",
                             "REVOKE CONNECT ON DATABASE docdb FROM PUBLIC" })
        do
          assert(adm:exec(q))
        end
        adm:close()
        code, out, r = doctor("postgres://docrole:rolepw@" .. base
                              .. "/docdb")
        assert.equal(1, code, out)
        assert.matches("42501", r.database.cause, 1, true)
        assert.matches("GRANT CONNECT", r.database.fix, 1, true)
        -- refused by libpq before any server (no such service file): not
        -- a login the server refused
        code, out, r = doctor("postgres://postgres:doctorpw@" .. base
                              .. "/postgres?service=nosuchservice")
        assert.equal(1, code, out)
        assert.is_nil(r.database.fix:find("refused the login", 1, true),
                      r.database.fix)
        assert.matches("fix what the cause names", r.database.fix, 1, true)
        -- the server down: what it said before
        srv.stop()
        code, out, r = doctor("postgres://postgres:doctorpw@" .. base
                              .. "/postgres")
        assert.equal(1, code, out)
        assert.matches("that the server runs", r.database.fix, 1, true)
      end)
      servers.stop_all()
      assert(ok, err)
    end)
  end

  it("names a SHA-1 signed TLS certificate on the API host", function()
    -- paygate's own server refuses to load a SHA-1 certificate: openssl
    -- s_server at security level 0 plays the misconfigured host
    local port = core.free_port()
    local s = proc.spawn({ "openssl", "s_server", "-accept", tostring(port),
      "-cert", pki.sha1, "-key", pki.sha1_key, "-cert_chain", pki.inter,
      "-cipher", "DEFAULT@SECLEVEL=0", "-www", "-quiet" },
      { log = dir .. "/s_server.log" })
    assert(proc.wait_until(function()
      local _, err = paygate.http.request{ url = "https://127.0.0.1:"
        .. port .. "/", timeout = 1, connect_timeout = 1 }
      return err == nil or err.kind ~= "connect"
    end, 10, "openssl s_server"))
    local code, out, r = run({ "doctor", "--json", "--config", config{
      base_url = "https://localhost:" .. port } })
    s:kill(proc.SIGKILL)
    s:wait(5)
    assert.equal(1, code, out)
    assert.equal("weak_signature", r.tls_chain.x509_kind, out)
  end)
end)
