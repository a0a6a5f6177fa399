-- examples/gateway: merchants' keys from etcd (the config's `credentials`
-- section, gw/credentials.lua). Two gateway instances of two workers each
-- load the set published with `paygate etcd publish`, swap to every new
-- one as their watch tells them (a few hundredths of a second after the
-- publish on an idle machine; paygate_credentials_revision on /metrics)
-- and sign with it at the simulator; a bad section is one line and exit 2.
local testing = require "paygate.testing"
local core = require "paygate.core"
local server = require "paygate.testing.server"
local crypto = require "paygate.crypto"
local etcd = require "paygate.etcd"
local credentials = require "paygate.credentials"
local etcdsrv = require "support.etcd"
local gwcore = dofile("examples/gateway/spec/core_support.lua")
local write, read = gwcore.write, gwcore.read


describe("gateway credentials from etcd", function()
  if not etcdsrv.available() then
    pending("etcd is not installed (scripts/deps installs etcd-server)")
    return
  end

  local c, sim, m, k2, k3, dir, kek_file, pw_file, prefix
  local gws = {}

  -- `paygate etcd publish` of a merchant set made of key/cert files
  -- (sign_type: --sign-type's, by default the client's, RSA)
  local function publish(name, key, cert, sign_type)
    local d = dir .. "/" .. name
    assert(os.execute("mkdir -p " .. d) == 0)
    write(d .. "/apiclient_key.pem", read(key))
    write(d .. "/apiclient_cert.pem", read(cert))
    write(d .. "/apiv3_key", m.apiv3_key)
    local o = c:client_opts()
    -- env(1) gives the password to the command's environment
    local argv = { "/usr/bin/env", "GW_SPEC_ETCD_PW=" .. o.password,
      server.bin(), "etcd", "publish", "--prefix", prefix,
      "--dir", d, "--endpoints", table.concat(o.endpoints, ","),
      "--user", o.user, "--password-env", "GW_SPEC_ETCD_PW",
      "--ca-file", o.ca_file, "--cert", o.client_cert,
      "--key", o.client_key, "--kek-file", kek_file, "--json" }
    if sign_type then
      argv[#argv + 1] = "--sign-type"
      argv[#argv + 1] = sign_type
    end
    local code, out = testing.proc.run(argv, { timeout = 30 })
    assert.equal(0, code, out)
    return assert(require("cjson").decode(out:match("{.*}"))).revision
  end

  local function section(srv)
    local o = c:client_opts()
    return { etcd = { endpoints = o.endpoints, user = o.user,
                      password_file = pw_file, ca_file = o.ca_file,
                      client_cert = o.client_cert,
                      client_key = o.client_key },
             kek_file = kek_file, cache_dir = srv.dir .. "/credentials",
             merchants = { [m.mchid] = prefix } }
  end

  local function merchant_entry()
    local e = sim:client_config(m)
    for _, k in ipairs({ "merchant_private_key", "merchant_certificate",
                         "apiv3_key" }) do
      e[k] = nil
    end
    return e
  end

  local function start_gateway()
    local db_url
    local srv = testing.start_app{ app = "examples/gateway", workers = 2,
      args = { "--log-level", "info" },
      config = function(srv)
        db_url = "sqlite:" .. srv.dir .. "/gw.db"
        return { gateway = { db = db_url, public_url = srv:url(""),
                             dispatcher = { interval = 0.05 } },
                 merchants = { merchant_entry() },
                 credentials = section(srv) }
      end }
    local gw = gwcore.gateway(srv, db_url)
    gws[#gws + 1] = gw
    return gw
  end

  -- an instance of one worker whose credentials cache holds `cached` (the
  -- text of a cache file); o: args, load_timeout (of its section)
  local function start_cached(cached, o)
    local srv = testing.start_app{ app = "examples/gateway", workers = 1,
      args = o.args,
      config = function(s)
        local sec = section(s)
        sec.load_timeout = o.load_timeout
        assert(os.execute("mkdir -p " .. s.dir .. "/credentials") == 0)
        write(s.dir .. "/credentials/" .. m.mchid .. ".json", cached)
        return { gateway = { db = "sqlite:" .. s.dir .. "/gw.db",
                             public_url = s:url("") },
                 merchants = { merchant_entry() }, credentials = sec }
      end }
    return gwcore.gateway(srv, "sqlite:" .. srv.dir .. "/gw.db")
  end

  -- worker pid -> the revision in use, from the instance's /metrics
  local function revisions(gw)
    local res = gw.srv:admin_get("/metrics")
    local out, n = {}, 0
    for labels, v in (res and res.body or ""):gmatch(
        "paygate_credentials_revision{([^}]*)} (%d+)") do
      if labels:find('set="' .. m.mchid .. '"', 1, true) then
        out[labels:match('pid="(%d+)"')] = v
        n = n + 1
      end
    end
    return out, n
  end

  -- true when both workers of every instance use revision rev
  local function all_at(rev)
    for _, gw in ipairs(gws) do
      local revs, n = revisions(gw)
      if n < 2 then return false end
      for _, v in pairs(revs) do
        if v ~= rev then return false end
      end
    end
    return true
  end

  setup(function()
    c = etcdsrv.start{ tls = true, auth = true }
    dir = server.tmpdir()
    kek_file = dir .. "/kek"
    write(kek_file, crypto.hex(crypto.random_bytes(32)) .. "\n")
    pw_file = dir .. "/etcd-password"
    write(pw_file, c:client_opts().password .. "\n")
    m = testing.merchant()
    k2 = testing.merchant_keys{ mchid = m.mchid }
    k3 = testing.merchant_keys{ mchid = m.mchid }  -- unknown to WeChat
    m.certificates = { m.certificate, k2.certificate }
    sim = testing.simulator{ merchants = { m } }
    prefix = "/paygate/merchants/" .. m.mchid .. "/"
  end)

  teardown(function()
    for _, gw in ipairs(gws) do gw:stop() end
    testing.stop_all()
    etcdsrv.stop_all()
    if dir then server.rmdir(dir) end
  end)

  it("two instances load the published set, swap within a second of a "
     .. "publish, sign with it at the simulator, refuse an invalid one",
     function()
    local rev1 = publish("set_a", m.private_key, m.certificate)
    local a = start_gateway()
    local b = start_gateway()
    testing.wait_until(function() return all_at(rev1) end, 10,
                       "both instances at revision " .. rev1)
    for _, gw in ipairs({ a, b }) do gw:create{} end
    assert.is_nil(a.srv:logs():find(read(m.private_key):match(
      "\n(.-)\n"), 1, true))

    -- a certificate WeChat does not know: both instances swap to it, and
    -- the simulator refuses what they now sign
    local rev3 = publish("set_c", k3.private_key, k3.certificate)
    local t0 = core.mono()
    testing.wait_until(function() return all_at(rev3) end, 10,
                       "both instances at revision " .. rev3)
    local took3 = core.mono() - t0
    for _, gw in ipairs({ a, b }) do
      local res = gw:call("POST", "/v1/payments", { order_id = "o-"
        .. crypto.random_nonce(10), channel = "native", amount = 1,
        description = "unknown serial" })
      -- the simulator names the serial it does not know
      assert.equal(502, res.status, res.body)
      assert.equal("SIGN_ERROR", res.json.wechat_code)
    end

    -- the rotated certificate WeChat knows: both sign with it again
    local rev2 = publish("set_b", k2.private_key, k2.certificate)
    t0 = core.mono()
    testing.wait_until(function() return all_at(rev2) end, 10,
                       "both instances at revision " .. rev2)
    local took2 = core.mono() - t0
    for _, gw in ipairs({ a, b }) do gw:create{} end

    -- an invalid pair written straight to etcd (k3's key, k2's
    -- certificate): every worker refuses and counts it, the set of rev2
    -- stays in use
    local cli = etcd.new(c:client_opts())
    local kek = assert(credentials.read_kek{ kek_file = kek_file })
    local bad = assert(cli:txn{ success = {
      { put = prefix .. "apiclient_key.pem", value = credentials.seal(kek,
        prefix .. "apiclient_key.pem", read(k3.private_key)) } } })
    testing.wait_until(function()
      for _, gw in ipairs({ a, b }) do
        local res = gw.srv:admin_get("/metrics")
        local n = 0
        for v in (res and res.body or ""):gmatch(
            "paygate_credentials_refused{[^}]*} (%d+)") do
          if tonumber(v) >= 1 then n = n + 1 end
        end
        if n < 2 then return false end
      end
      return true
    end, 10, "every worker to refuse revision " .. bad.revision)
    assert.is_true(all_at(rev2))
    for _, gw in ipairs({ a, b }) do gw:create{} end
    assert.truthy(a.srv:logs():find("credentials: set refused", 1, true))
    print(("\n# 2 instances x 2 workers at the new revision %.3f s and "
           .. "%.3f s after the publish returned"):format(took3, took2))
    -- The swap must come from the watch's event. The set has no poll: a
    -- watch whose events never came live would bring it only with its
    -- next connection (reconnect_after, 60 s) or once it gave up (60 s),
    -- which the waits above (10 s) refuse. On an idle machine the watch
    -- takes a few hundredths of a second (measured: 0.03 s); 5 s leaves a
    -- loaded CI run (ASan, about 3x slower, ctest -j on two busy cores:
    -- four workers reading the set from etcd and checking its keys at
    -- once) room for its stalls.
    assert.is_true(took3 < 5 and took2 < 5,
      ("swapped %.3f s and %.3f s after the publish"):format(took3, took2))
  end)

  it("starts from the cached set when etcd is down", function()
    -- the instances above cached their last set (still sealed)
    local cache = gws[1].srv.dir .. "/credentials/" .. m.mchid .. ".json"
    local text = read(cache)
    assert.not_matches("PRIVATE KEY", text)
    assert.is_nil(text:find(m.apiv3_key, 1, true))
    for _, mem in ipairs(c.members) do mem:stop() end
    -- etcd started again even when a step below fails: the next cases
    -- publish sets to it, and would fail too
    finally(function()
      for _, mem in ipairs(c.members) do mem:start() end
      for _, mem in ipairs(c.members) do mem:wait_ready(30) end
    end)
    local gw = start_cached(text, { load_timeout = 1 })
    local srv = gw.srv
    gw:create{}
    assert.truthy(srv:logs():find("serving the cached set", 1, true))
    gw:stop()
  end)

  it("refuses at start, as running workers do, a set the WeChat Pay client"
     .. " cannot use, and serves the cached one", function()
    -- the instances above cached their last set: the good one
    local cache = gws[1].srv.dir .. "/credentials/" .. m.mchid .. ".json"
    local good = read(cache)
    local good_rev = assert(require("cjson").decode(good)).revision
    -- an SM2 pair for this RSA merchant, published as an SM merchant's
    -- (publish refuses it for the RSA sign_type): `validate` lets it
    -- through (the key matches its certificate), the client refuses it
    local sm = testing.merchant_keys{ mchid = m.mchid, sm2 = true }
    local bad_rev = publish("sm2", sm.private_key, sm.certificate,
                            "WECHATPAY2-SM2-WITH-SM3")
    local gw = start_cached(good, { args = { "--log-level", "info" } })
    local srv = gw.srv
    gw:create{}                        -- signs with the good, cached set
    local logs = srv:logs()
    assert.truthy(logs:find("set refused", 1, true), logs)
    -- said which set serves (at a start no old one is kept)
    assert.truthy(logs:find("the set in etcd is refused, serving the"
                            .. " cached set", 1, true), logs)
    assert.falsy(logs:find("the old one kept", 1, true), logs)
    local now = assert(require("cjson").decode(read(srv.dir
      .. "/credentials/" .. m.mchid .. ".json")))
    assert.equal(good_rev, now.revision)
    assert.are_not.equal(bad_rev, now.revision)
    gw:stop()
  end)

  it("shows on the console the merchant certificate a swap put in use,"
     .. " not the one of the start", function()
    local rev1 = publish("set_long", m.private_key, m.certificate)
    local db_url
    local srv = testing.start_app{ app = "examples/gateway", workers = 1,
      config = function(s)
        db_url = "sqlite:" .. s.dir .. "/gw.db"
        return { gateway = { db = db_url, public_url = s:url(""),
                             console = { access = "loopback" } },
                 merchants = { merchant_entry() },
                 credentials = section(s) }
      end }
    local gw = gwcore.gateway(srv, db_url)
    gws[#gws + 1] = gw
    local function at(rev)
      local revs, n = revisions(gw)
      return n == 1 and next(revs) and select(2, next(revs)) == rev
    end
    -- the merchant certificate's cell: the last of the certificates row
    local function merchant_days()
      local body = srv:request{ path = "/console" }.body
      local row = assert(body:match("<tr><td>" .. m.mchid
                                    .. "</td>.-</tr>"), body)
      return row:match("<td><span class=\"(%w+)\">(%d+) days?</span></td>"
                       .. "</tr>$")
    end
    testing.wait_until(function() return at(rev1) end, 10,
                       "the instance at revision " .. rev1)
    local class, days = merchant_days()
    assert.equal("good", class)
    assert.equal("364", days)
    -- a certificate ending in 20 days: the console says so (red) once the
    -- set is in use
    local short = testing.merchant_keys{ mchid = m.mchid, days = 20 }
    local rev2 = publish("set_short", short.private_key, short.certificate)
    testing.wait_until(function() return at(rev2) end, 10,
                       "the instance at revision " .. rev2)
    class, days = merchant_days()
    assert.equal("bad", class)
    assert.equal("19", days)
  end)

  describe("the config check", function()
    local function expect_refused(edit, want)
      local fake = { dir = dir }
      local conf = { gateway = { db = "sqlite:" .. dir .. "/cfg.db" },
                     merchants = { merchant_entry() },
                     credentials = section(fake) }
      edit(conf)
      return gwcore.expect_refused(dir, conf, want)
    end

    it("refuses etcd without TLS or without a user", function()
      expect_refused(function(cf)
        cf.credentials.etcd.endpoints = { "http://127.0.0.1:2379" }
      end, "gateway: config.credentials.etcd.endpoints[1]: must be an"
           .. " https:// URL")
      expect_refused(function(cf) cf.credentials.etcd.user = nil end,
                     "gateway: config.credentials.etcd.user: ")
      expect_refused(function(cf)
        cf.credentials.etcd.password_file = nil
      end, "gateway: config.credentials.etcd.password_env: give")
      expect_refused(function(cf) cf.credentials.insecure_etcd = true end,
                     "gateway: config.credentials.insecure_etcd: unknown key")
    end)

    it("refuses a KEK of the wrong length without printing it", function()
      local short = crypto.hex(crypto.random_bytes(16))
      write(dir .. "/short.kek", short .. "\n")
      local out = expect_refused(function(cf)
        cf.credentials.kek_file = dir .. "/short.kek"
      end, "gateway: config.credentials.kek_file: ")
      assert.is_nil(out:find(short, 1, true))
      expect_refused(function(cf) cf.credentials.kek_file = nil end,
                     "gateway: config.credentials.kek_file: give kek_file")
    end)

    it("refuses a client key given as PEM text without printing it",
       function()
      local pem = read(c:client_opts().client_key)
      local out = expect_refused(function(cf)
        cf.credentials.etcd.client_key = pem
      end, "gateway: config.credentials.etcd.client_key: cannot read the"
           .. " file it names")
      for line in pem:gmatch("[^\n]+") do
        if not line:find("-----", 1, true) then
          assert.is_nil(out:find(line, 1, true), out)
        end
      end
    end)

    it("refuses a key in an etcd merchant's entry and an unlisted one",
       function()
      expect_refused(function(cf)
        cf.merchants[1].merchant_private_key = m.private_key
      end, "gateway: config.merchants[1].merchant_private_key: comes from"
           .. " etcd (" .. prefix .. "apiclient_key.pem)")
      expect_refused(function(cf)
        cf.merchants[1].apiv3_key_file = dir .. "/kek"
      end, "gateway: config.merchants[1].apiv3_key_file: comes from etcd")
      expect_refused(function(cf)
        cf.credentials.merchants["1900000999"] = "/paygate/merchants/x/"
      end, "gateway: config.credentials.merchants.1900000999: no merchant")
      expect_refused(function(cf)
        cf.credentials.merchants[m.mchid] = "paygate/no-slash"
      end, "gateway: config.credentials.merchants[" .. m.mchid .. "]: ")
    end)
  end)
end)
