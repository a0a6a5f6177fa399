-- paygate doctor on the reference gateway's config when the merchant's
-- keys come from etcd (the `credentials` section, docs/etcd.md): the set
-- is read as the gateway's start reads it (a real etcd with TLS and auth,
-- the password from the variable the section names, the KEK opening the
-- envelopes, else the cached set) and checked as file-configured keys
-- are, the signed call against the simulator included. Before, doctor
-- warned "doctor does not read them there" and exited 0 whatever the set.
local testing = require "paygate.testing"
local crypto = require "paygate.crypto"
local credentials = require "paygate.credentials"
local json = require "cjson.safe"
local etcdsrv = require "support.etcd"
local server = require "support.server"
local proc = require "support.proc"

local PW_ENV = "DOCTOR_SPEC_ETCD_PW"

-- v as Lua source (a config file)
local function literal(v)
  if type(v) == "table" then
    local parts = {}
    for k, x in pairs(v) do
      parts[#parts + 1] = (type(k) == "number" and "[%d] = %s"
                           or "[%q] = %s"):format(k, literal(x))
    end
    return "{ " .. table.concat(parts, ", ") .. " }"
  elseif type(v) == "string" then
    return ("%q"):format(v)
  end
  return tostring(v)
end

describe("paygate doctor, a merchant whose keys come from etcd", function()
  if not etcdsrv.available() then
    pending("etcd is not installed (scripts/deps installs etcd-server)")
    return
  end

  local c, sim, m, dir, kek_file, prefix, notify, db

  -- `paygate etcd publish` of the simulator merchant's pair with apiv3
  local function publish(name, apiv3)
    local d = dir .. "/" .. name
    assert(os.execute("mkdir -p " .. d) == 0)
    proc.write(d .. "/apiclient_key.pem", proc.read(m.private_key))
    proc.write(d .. "/apiclient_cert.pem", proc.read(m.certificate))
    proc.write(d .. "/apiv3_key", apiv3)
    local o = c:client_opts()
    local code, out = proc.run({ "/usr/bin/env", PW_ENV .. "=" .. o.password,
      PAYGATE_BIN, "etcd", "publish", "--prefix", prefix, "--dir", d,
      "--endpoints", table.concat(o.endpoints, ","), "--user", o.user,
      "--password-env", PW_ENV, "--ca-file", o.ca_file, "--cert",
      o.client_cert, "--key", o.client_key, "--kek-file", kek_file,
      "--json" }, { timeout = 30 })
    assert.equal(0, code, out)
    return assert(json.decode(out)).revision
  end

  -- the gateway's config for the simulator merchant, its keys from etcd
  -- (endpoints: the cluster's unless given), its cache in cache_dir;
  -- extra's keys added at its top level (doctor's own: metrics_url), and
  -- cred's to its credentials section
  local function config(name, cache_dir, endpoints, extra, cred)
    local o = c:client_opts()
    local e = sim:client_config(m)
    for _, k in ipairs({ "merchant_private_key", "merchant_certificate",
                         "apiv3_key" }) do
      e[k] = nil
    end
    local conf = {
      gateway = { db = db, public_url = notify:url("") },
      merchants = { e },
      credentials = {
        etcd = { endpoints = endpoints or o.endpoints, user = o.user,
                 password_env = PW_ENV, ca_file = o.ca_file,
                 client_cert = o.client_cert, client_key = o.client_key },
        kek_file = kek_file, cache_dir = cache_dir,
        merchants = { [m.mchid] = prefix } } }
    for k, v in pairs(extra or {}) do conf[k] = v end
    for k, v in pairs(cred or {}) do conf.credentials[k] = v end
    local path = dir .. "/" .. name .. ".lua"
    proc.write(path, "return " .. literal(conf) .. "\n")
    return path
  end

  -- doctor --json on path with the etcd password pw in PW_ENV (the
  -- cluster's unless given): exit code, output, results by kind
  local function doctor(path, pw)
    local code, out = proc.run({ "/usr/bin/env", PW_ENV .. "="
      .. (pw or c.password), PAYGATE_BIN, "doctor", "--json", "--config",
      path }, { timeout = 90 })
    local r = {}
    for line in out:gmatch("[^\n]+") do
      local x = line:sub(1, 1) == "{" and json.decode(line)
      if type(x) == "table" and x.kind then r[x.kind] = r[x.kind] or x end
    end
    return code, out, r
  end

  setup(function()
    dir = server.tmpdir()
    c = etcdsrv.start{ tls = true, auth = true }
    kek_file = dir .. "/kek"
    proc.write(kek_file, crypto.hex(crypto.random_bytes(32)) .. "\n")
    sim = testing.simulator()
    m = sim.merchant
    prefix = "/paygate/merchants/" .. m.mchid .. "/"
    -- the gateway's notify route, refusing an unsigned probe as it does
    notify = server.start{ source = [[
      require("paygate").route("POST", "/wechatpay/notify/:mchid",
        function() return 401, { code = "FAIL" } end)
    ]] }
    db = "sqlite:" .. dir .. "/gw.db"
    assert(require("paygate.sql").open(db)):close()
  end)

  teardown(function()
    if notify then notify:stop() end
    testing.stop_all()
    etcdsrv.stop_all()
    os.execute("rm -rf " .. dir)
  end)

  it("passes with a good set in etcd, and fails a wrong APIv3 key", function()
    publish("good", m.apiv3_key)
    local cache = dir .. "/cache-good"
    assert(os.execute("mkdir -p " .. cache) == 0)
    local code, out, r = doctor(config("good", cache))
    assert.equal(0, code, out)
    assert.equal("ok", r.gateway_config and r.gateway_config.status, out)
    assert.equal("ok", r.credentials and r.credentials.status, out)
    assert.matches("from etcd", r.credentials.cause, 1, true)
    assert.matches(prefix, r.credentials.cause, 1, true)
    for _, k in ipairs({ "key_certificate", "serial_format", "apiv3_key",
                         "wechatpay_config", "signed_call" }) do
      assert.equal("ok", r[k] and r[k].status, k .. ": " .. out)
    end
    assert.matches("decrypted with the APIv3 key", r.signed_call.cause, 1,
                   true)
    -- no secret printed: the etcd password, the APIv3 key
    assert.is_nil(out:find(c.password, 1, true), out)
    assert.is_nil(out:find(m.apiv3_key, 1, true), out)
    -- and nothing written: the cache is the gateway's workers' (a file
    -- or lock of another user's would stop them replacing it)
    local ls = io.popen("ls -A " .. cache)
    assert.equal("", ls:read("*a"))
    ls:close()

    -- a set whose APIv3 key is not the merchant's: the signed call fails,
    -- the fix naming the set's file, not a key of the config
    local wrong = testing.apiv3_key()
    publish("wrong", wrong)
    code, out, r = doctor(config("wrong", cache))
    assert.equal(1, code, out)
    assert.equal("ok", r.credentials.status, out)
    assert.equal("fail", r.signed_call and r.signed_call.status, out)
    assert.matches("APIv3 key does not decrypt", r.signed_call.cause, 1, true)
    assert.matches(prefix .. "apiv3_key", r.signed_call.fix, 1, true)
    assert.is_nil(r.signed_call.fix:find("apiv3_key_file", 1, true), out)
    assert.is_nil(out:find(wrong, 1, true), out)
  end)

  it("says which revision the running gateway's workers use (metrics_url),"
     .. " and names the workers serving another than the set checked",
     function()
    local rev = publish("inuse", m.apiv3_key)
    local cache = dir .. "/cache-inuse"
    assert(os.execute("mkdir -p " .. cache) == 0)
    -- two workers that load the set at their start and watch nothing: a
    -- publish after it leaves them on the revision they loaded, as a
    -- worker whose watch is stuck is
    local app = server.start{ workers = 2, source = [[
      local paygate = require "paygate"
      local credentials = require "paygate.credentials"
      local src = assert(credentials.new(paygate.config.creds))
      assert(src:load(paygate.config.mchid))
      paygate.route("GET", "/", function() return 200, "ok" end)
    ]], config = "return " .. literal{ mchid = m.mchid, creds = {
      etcd = c:client_opts(), kek_file = kek_file, cache_dir = cache,
      merchants = { [m.mchid] = prefix } } } .. "\n" }
    local extra = { metrics_url = "http://127.0.0.1:" .. app.admin
                                  .. "/metrics" }
    local code, out, r = doctor(config("inuse", cache, nil, extra))
    assert.equal(0, code, out)
    assert.equal("ok", r.credentials_in_use and r.credentials_in_use.status,
                 out)
    assert.matches("the running gateway's 2 workers use revision " .. rev
                   .. ", the set in etcd checked above",
                   r.credentials_in_use.cause, 1, true)
    -- a new set the workers have not applied: named, with their pids
    local rev2 = publish("inuse2", m.apiv3_key)
    code, out, r = doctor(config("inuse", cache, nil, extra))
    assert.equal(0, code, out)
    assert.equal("warn", r.credentials_in_use.status, out)
    assert.matches("serves revision " .. rev .. " %(workers %d+, %d+%), not"
                   .. " revision " .. rev2 .. ", the set in etcd checked",
                   r.credentials_in_use.cause)
    -- the running gateway not answering: said, not passed
    app:stop()
    code, out, r = doctor(config("inuse", cache, nil, extra))
    assert.equal("warn", r.credentials_in_use.status, out)
    assert.matches("not known", r.credentials_in_use.cause, 1, true)
    assert.matches("no answer from", r.credentials_in_use.detail, 1, true)
    assert.is_nil(out:find(c.password, 1, true), out)
  end)

  it("checks the cached set when etcd does not answer, and says so",
     function()
    publish("good2", m.apiv3_key)
    -- the cache as a gateway's worker leaves it (paygate.credentials)
    local cache = dir .. "/cache-kept"
    assert(os.execute("mkdir -p " .. cache) == 0)
    local o = c:client_opts()
    local src = assert(credentials.new{ etcd = o, kek_file = kek_file,
      cache_dir = cache, merchants = { [m.mchid] = prefix },
      load_timeout = 10 })
    assert(src:load(m.mchid))
    src:stop()
    local dead = { "https://127.0.0.1:" .. require("paygate.core").free_port() }
    local code, out, r = doctor(config("down", cache, dead))
    assert.equal(0, code, out)
    assert.equal("warn", r.credentials and r.credentials.status, out)
    assert.matches("etcd unavailable", r.credentials.cause, 1, true)
    assert.matches("cached set", r.credentials.cause, 1, true)
    assert.equal("ok", r.signed_call and r.signed_call.status, out)
    -- etcd refusing the password is no outage: failed, the cached set
    -- still checked
    code, out, r = doctor(config("badpw", cache), "not-the-password")
    assert.equal(1, code, out)
    assert.equal("fail", r.credentials.status, out)
    assert.matches("etcd refused the credentials", r.credentials.cause, 1,
                   true)
    assert.equal("ok", r.signed_call and r.signed_call.status, out)
    assert.is_nil(out:find("not-the-password", 1, true), out)
    -- a set in etcd the gateway refuses (a secret written unsealed,
    -- straight into etcd): failed, naming why, the cached set checked
    local cli = require("paygate.etcd").new(c:client_opts())
    assert(cli:put(prefix .. "apiv3_key", m.apiv3_key))
    code, out, r = doctor(config("refused", cache))
    assert.equal(1, code, out)
    assert.equal("fail", r.credentials.status, out)
    assert.matches("is refused: " .. prefix .. "apiv3_key: not an envelope",
                   r.credentials.cause, 1, true)
    assert.matches("cached set", r.credentials.cause, 1, true)
    assert.equal("ok", r.signed_call and r.signed_call.status, out)
    assert.is_nil(out:find(m.apiv3_key, 1, true), out)
    -- neither etcd nor a cached set: failed, not warned and passed
    code, out, r = doctor(config("none", dir .. "/cache-none", dead))
    assert.equal(1, code, out)
    assert.equal("fail", r.credentials and r.credentials.status, out)
    assert.matches("no cached set", r.credentials.cause, 1, true)
    assert.is_nil(r.signed_call, out)
    assert.is_nil(r.key_certificate, out)
  end)

  -- a listener's pair: dir/NAME/cert.pem (serial, valid for days) and
  -- dir/NAME/key.pem, a publishable set directory. ec: a P-256 key (the
  -- listener takes ECDSA too), else RSA
  local function listener_pair(name, serial, days, ec)
    local d = dir .. "/" .. name
    assert(os.execute(("mkdir -p %s && openssl req -x509 -newkey %s -nodes"
      .. " -keyout %s/key.pem -out %s/cert.pem -days %d -set_serial 0x%s"
      .. " -subj /CN=localhost >/dev/null 2>&1"):format(d, ec
      and "ec -pkeyopt ec_paramgen_curve:P-256" or "rsa:2048", d, d, days,
      serial)) == 0)
    return d
  end

  -- `paygate etcd publish --tls` of the set directory d to tls_prefix
  local function publish_tls(d, tls_prefix)
    local o = c:client_opts()
    local code, out = proc.run({ "/usr/bin/env", PW_ENV .. "=" .. o.password,
      PAYGATE_BIN, "etcd", "publish", "--tls", "--prefix", tls_prefix,
      "--dir", d, "--endpoints", table.concat(o.endpoints, ","), "--user",
      o.user, "--password-env", PW_ENV, "--ca-file", o.ca_file, "--cert",
      o.client_cert, "--key", o.client_key, "--kek-file", kek_file },
      { timeout = 30 })
    assert.equal(0, code, out)
  end

  -- doctor's results of kind, in order
  local function all(out, kind)
    local r = {}
    for line in out:gmatch("[^\n]+") do
      local x = line:sub(1, 1) == "{" and json.decode(line)
      if type(x) == "table" and x.kind == kind then r[#r + 1] = x end
    end
    return r
  end

  -- the one result of kind whose cause holds s
  local function about(out, kind, s)
    local found
    for _, x in ipairs(all(out, kind)) do
      if tostring(x.cause):find(s, 1, true) then
        assert.is_nil(found, "two " .. kind .. " lines about " .. s .. ": "
                      .. out)
        found = x
      end
    end
    assert.truthy(found, "no " .. kind .. " line about " .. s .. ": " .. out)
    return found
  end

  -- Before, doctor read neither the HTTPS listener's certificate set in
  -- etcd (credentials.tls) nor the config's tls files: a set about to
  -- expire, or a key that is not the certificate's, passed unsaid
  it("checks the HTTPS listener's certificate from etcd (credentials.tls)"
     .. " as it checks the tls section's files", function()
    local tls_prefix = "/paygate/tls/"
    publish("tls-merchant", m.apiv3_key)
    local web = listener_pair("web", "7777", 400)
    publish_tls(web, tls_prefix)
    local file = listener_pair("file", "6666", 400, true)
    local cache = dir .. "/cache-tls"
    assert(os.execute("mkdir -p " .. cache) == 0)
    local files = { tls = { cert = file .. "/cert.pem",
                            key = file .. "/key.pem" } }
    local set = "the set at " .. tls_prefix .. " in etcd"
    local code, out = doctor(config("tls", cache, nil, files,
                                    { tls = tls_prefix }))
    assert.equal(0, code, out)
    assert.equal("ok", about(out, "credentials", set).status, out)
    assert.matches("read from etcd", about(out, "credentials", set).cause,
                   1, true)
    local l = about(out, "tls_certificate", set)
    assert.equal("ok", l.status, out)
    assert.matches("the key matches the certificate 7777", l.cause, 1, true)
    l = about(out, "tls_certificate", "(tls.cert)")
    assert.equal("ok", l.status, out)
    assert.matches("the key matches the certificate 6666", l.cause, 1, true)
    for _, s in ipairs({ set .. ") 7777", "(tls.cert) 6666" }) do
      l = about(out, "cert_expiry", s)
      assert.equal("ok", l.status, out)
      assert.matches("399 days left", l.cause, 1, true)
    end
    -- no key material printed, nor the set's
    for _, k in ipairs({ web .. "/key.pem", file .. "/key.pem" }) do
      for line in proc.read(k):gmatch("[^\n]+") do
        if not line:find("-----", 1, true) then
          assert.is_nil(out:find(line, 1, true), out)
        end
      end
    end

    -- a set expiring in 10 days: warned, naming the set
    publish_tls(listener_pair("web-short", "7778", 10), tls_prefix)
    code, out = doctor(config("tls", cache, nil, files,
                              { tls = tls_prefix }))
    assert.equal(0, code, out)
    l = about(out, "cert_expiry", set .. ") 7778")
    assert.equal("warn", l.status, out)
    assert.matches("expires in 9 days", l.cause, 1, true)
    assert.matches("paygate etcd publish --tls --prefix " .. tls_prefix,
                   l.fix, 1, true)

    -- the tls section's key not the certificate's: failed, as the
    -- merchant's pair is
    files.tls.key = web .. "/key.pem"
    code, out = doctor(config("tls", cache, nil, files,
                              { tls = tls_prefix }))
    assert.equal(1, code, out)
    l = about(out, "tls_certificate", "(tls.cert)")
    assert.equal("fail", l.status, out)
    assert.matches("(tls.cert): tls.key: the private key does not match"
                   .. " the certificate 6666", l.cause, 1, true)

    -- a key written into etcd unsealed: the set is refused, said naming
    -- its key, and the key is not printed
    files.tls.key = file .. "/key.pem"
    local cli = require("paygate.etcd").new(c:client_opts())
    local raw_key = proc.read(web .. "/key.pem")
    assert(cli:put(tls_prefix .. "key.pem", raw_key))
    code, out = doctor(config("tls", cache, nil, files,
                              { tls = tls_prefix }))
    assert.equal(1, code, out)
    l = about(out, "credentials", set)
    assert.equal("fail", l.status, out)
    assert.matches(tls_prefix .. "key.pem: not an envelope", l.cause, 1, true)
    assert.matches("--tls", l.fix, 1, true)
    for line in raw_key:gmatch("[^\n]+") do
      if not line:find("-----", 1, true) then
        assert.is_nil(out:find(line, 1, true), out)
      end
    end
  end)
end)
