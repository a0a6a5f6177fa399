-- paygate.credentials and `paygate etcd publish` against a real etcd with
-- TLS and auth: sealed secrets, validation before use, hot swap in a
-- running paygate.wechatpay client, order, the on-disk cache.
local paygate = require "paygate"
local crypto = require "paygate.crypto"
local etcd = require "paygate.etcd"
local credentials = require "paygate.credentials"
local wechatpay = require "paygate.wechatpay"
local etcdsrv = require "support.etcd"
local servers = require "support.servers"
local credsets = require "support.credsets"

local MCHID, PREFIX = credsets.MCHID, credsets.PREFIX
local APIV3, APIV3_B = credsets.APIV3, credsets.APIV3_B
local sh, write, read = credsets.sh, credsets.write, credsets.read
local set_dir = credsets.set_dir

describe("watched credentials", function()
  if not etcdsrv.available() then
    pending("etcd is not installed (scripts/deps installs etcd-server)")
    return
  end

  local creds, c, dir, kek_file, cli, env

  setup(function()
    creds = credsets.start()
    c, dir, kek_file, cli = creds.c, creds.dir, creds.kek_file, creds.cli
    env = creds.env
    env.bad = set_dir(dir, "set_bad", "a", "b", APIV3)
  end)
  teardown(function()
    require("paygate.testing").stop_all()
    etcdsrv.stop_all()
  end)

  it("refuses an etcd without TLS and auth, and a missing KEK", function()
    local o = c:client_opts()
    o.user, o.password = nil, nil
    local src, err = credentials.new{ etcd = o, kek_file = kek_file,
      cache_dir = dir, merchants = { [MCHID] = PREFIX } }
    assert.is_nil(src)
    assert.equal("invalid_config", err.kind)
    assert.matches("https", err.message)
    src, err = credentials.new{ etcd = { endpoints = { "http://127.0.0.1:1" },
      user = "u", password = "p" }, kek_file = kek_file, cache_dir = dir,
      merchants = { [MCHID] = PREFIX } }
    assert.is_nil(src)
    src, err = credentials.new{ etcd = c:client_opts(), cache_dir = dir,
      merchants = { [MCHID] = PREFIX } }
    assert.is_nil(src)
    assert.matches("kek", err.message)
  end)

  it("publish refuses an invalid set and writes nothing", function()
    local code, out = creds:publish(env.bad)
    assert.equal(1, code, out)
    assert.matches("does not match", out)
    assert.same({}, assert(cli:get_prefix(PREFIX)).kvs)
    -- an APIv3 key with a newline is named as such
    local d = set_dir(dir, "set_nl", "a", "a", APIV3 .. "\n")
    code, out = creds:publish(d)
    assert.equal(1, code)
    assert.matches("newline", out)
  end)

  it("publish refuses a certificate or key in DER (the workers' client and"
     .. " listener take PEM only) and writes nothing", function()
    local d = set_dir(dir, "set_der", "a", "a", APIV3)
    sh(("openssl x509 -in %s/a.pem -outform DER -out %s/apiclient_cert.pem")
       :format(dir, d))
    local code, out = creds:publish(d)
    assert.equal(1, code, out)
    assert.matches("apiclient_cert.pem is not PEM text", out, 1, true)
    assert.same({}, assert(cli:get_prefix(PREFIX)).kvs)
    -- the key in DER, the certificate in PEM
    write(d .. "/apiclient_cert.pem", read(dir .. "/a.pem"))
    sh(("openssl pkey -in %s/a.key -outform DER -out %s/apiclient_key.pem")
       :format(dir, d))
    code, out = creds:publish(d)
    assert.equal(1, code, out)
    assert.matches("apiclient_key.pem is not PEM text", out, 1, true)
    assert.same({}, assert(cli:get_prefix(PREFIX)).kvs)
    -- a listener's set too: paygate.tls reads PEM only
    local t = dir .. "/set_der_tls"
    sh("mkdir -p " .. t)
    sh(("openssl x509 -in %s/a.pem -outform DER -out %s/cert.pem")
       :format(dir, t))
    write(t .. "/key.pem", read(dir .. "/a.key"))
    code, out = creds:publish(t, "--tls", "/paygate/tls_der/")
    assert.equal(1, code, out)
    assert.matches("cert.pem is not PEM text", out, 1, true)
    assert.same({}, assert(cli:get_prefix("/paygate/tls_der/")).kvs)
    -- and a worker refuses such a set with the same reason (one written
    -- straight to etcd), before its client's own check
    sh(("openssl x509 -in %s/a.pem -outform DER -out %s/a.der")
       :format(dir, dir))
    local files = { ["apiclient_key.pem"] = read(dir .. "/a.key"),
                    ["apiclient_cert.pem"] = read(dir .. "/a.der"),
                    apiv3_key = APIV3 }
    local set, err = credentials.validate(files, "merchant")
    assert.is_nil(set)
    assert.matches("apiclient_cert.pem is not PEM text", err.message, 1, true)
    -- an empty value (a key written by hand with nothing in it) is said
    -- to be empty, not taken for a DER file
    files["apiclient_cert.pem"] = ""
    set, err = credentials.validate(files, "merchant")
    assert.is_nil(set)
    assert.matches("apiclient_cert.pem is empty", err.message, 1, true)
    assert.not_matches("DER", err.message, 1, true)
  end)

  it("publish refuses a key the sign_type cannot use and writes nothing",
     function()
    local testing = require "paygate.testing"
    local sm = testing.merchant_keys{ mchid = MCHID, sm2 = true, dir = dir }
    local d = dir .. "/set_sm2"
    sh("mkdir -p " .. d)
    write(d .. "/apiclient_key.pem", read(sm.private_key))
    write(d .. "/apiclient_cert.pem", read(sm.certificate))
    write(d .. "/apiv3_key", APIV3)
    -- an SM2 pair for the default sign_type (RSA): every worker's client
    -- would refuse it
    local code, out = creds:publish(d)
    assert.equal(1, code, out)
    assert.matches("apiclient_key.pem is an SM2 key; sign_type "
                   .. "WECHATPAY2-SHA256-RSA2048 needs an RSA key", out, 1,
                   true)
    assert.matches("--sign-type WECHATPAY2-SM2-WITH-SM3", out, 1, true)
    assert.is_nil(out:find("BEGIN", 1, true), out)
    assert.same({}, assert(cli:get_prefix(PREFIX)).kvs)
    -- an RSA pair for the SM variant
    code, out = creds:publish(env.a, "--sign-type WECHATPAY2-SM2-WITH-SM3")
    assert.equal(1, code, out)
    assert.matches("apiclient_key.pem is an RSA key; sign_type "
                   .. "WECHATPAY2-SM2-WITH-SM3 needs an SM2 key", out, 1,
                   true)
    assert.same({}, assert(cli:get_prefix(PREFIX)).kvs)
    -- a sign_type that is none: a usage error
    code, out = creds:publish(d, "--sign-type SM2")
    assert.equal(2, code, out)
    -- the SM2 pair for the SM variant is published
    local other = "/paygate/merchants/sm2/"
    code, out = creds:publish(d, "--sign-type WECHATPAY2-SM2-WITH-SM3", other)
    assert.equal(0, code, out)
    assert.equal(3, #assert(cli:get_prefix(other)).kvs)
    assert(cli:delete(other, { prefix = true }))
  end)

  it("publishes in one transaction, secrets sealed", function()
    local code, out = creds:publish(env.a)
    assert.equal(0, code, out)
    local res = assert(cli:get_prefix(PREFIX))
    assert.equal(3, #res.kvs)
    local revs = {}
    for _, kv in ipairs(res.kvs) do
      revs[kv.mod_revision] = true
      if kv.key:match("apiclient_key.pem$") or kv.key:match("apiv3_key$") then
        assert.not_matches("PRIVATE KEY", kv.value)
        assert.not_matches(APIV3, kv.value, 1, true)
        assert.matches("paygate_envelope", kv.value)
      else
        assert.matches("BEGIN CERTIFICATE", kv.value)
      end
    end
    local n = 0
    for _ in pairs(revs) do n = n + 1 end
    assert.equal(1, n)              -- one revision: one transaction
    -- an envelope does not open under another name or another KEK
    local key = assert(cli:get(PREFIX .. "apiclient_key.pem")).value
    local kek = assert(credentials.read_kek{ kek_file = kek_file })
    local kname = PREFIX .. "apiclient_key.pem"
    assert.matches("PRIVATE KEY", assert(credentials.open(kek, kname, key)))
    assert.is_nil(credentials.open(kek, PREFIX .. "apiv3_key", key))
    local new_kek = crypto.random_bytes(32)
    local _, oerr = credentials.open(new_kek, kname, key)
    assert.equal("invalid_credentials", oerr.kind)
    assert.matches("another key%-encryption key", oerr.message)
    -- during a change of KEK, the old one (listed after the new) opens it
    assert.matches("PRIVATE KEY", assert(credentials.open({ new_kek, kek },
      kname, key)))
    local nf = dir .. "/kek_new"
    write(nf, crypto.base64_encode(new_kek))
    local src = assert(credentials.new{ etcd = c:client_opts(),
      kek_file = nf, previous_kek_files = { kek_file }, cache_dir = dir,
      merchants = { [MCHID] = PREFIX } })
    assert.equal(2, #src.keks)
  end)

  it("show says a set sealed under another KEK does not open (not that a"
     .. " file is missing), as a worker would, and prints no secret",
     function()
    local code, out = creds:publish(env.a)
    assert.equal(0, code, out)
    code, out = creds:show()
    assert.equal(0, code, out)
    assert.matches("apiclient_key.pem: sealed, opens", out, 1, true)
    assert.matches("valid: serial AAAA01", out, 1, true)
    local other = dir .. "/kek_other"
    write(other, crypto.hex(crypto.random_bytes(32)))
    code, out = creds:show(other)
    assert.equal(1, code, out)
    assert.matches("invalid: credentials: " .. PREFIX .. "apiclient_key.pem:"
                   .. " sealed under another key-encryption key", out, 1,
                   true)
    assert.is_nil(out:find("is missing", 1, true), out)
    assert.is_nil(out:find("PRIVATE KEY", 1, true), out)
    assert.is_nil(out:find(APIV3, 1, true), out)
  end)

  it("a sealed set copied to another merchant's prefix does not open "
     .. "there", function()
    -- someone who may write etcd but has no KEK copies merchant A's
    -- sealed private key and APIv3 key into merchant B's prefix
    local code, out = creds:publish(env.a)
    assert.equal(0, code, out)
    local other = "/paygate/merchants/1900000002/"
    local ops = {}
    for _, kv in ipairs(assert(cli:get_prefix(PREFIX)).kvs) do
      ops[#ops + 1] = { put = other .. kv.key:sub(#PREFIX + 1),
                        value = kv.value }
    end
    assert(cli:txn{ success = ops })
    sh("mkdir -p " .. dir .. "/cache_other")
    local src = assert(credentials.new{ etcd = c:client_opts(),
      kek_file = kek_file, cache_dir = dir .. "/cache_other",
      merchants = { ["1900000002"] = other } })
    local set, err = src:load("1900000002")
    assert.is_nil(set)
    assert.equal("invalid_credentials", err.kind)
    assert.matches("does not open", err.message)
    -- and a file's envelope copied to another file of the same set
    local kek = assert(credentials.read_kek{ kek_file = kek_file })
    local key = assert(cli:get(PREFIX .. "apiclient_key.pem")).value
    assert.is_nil(credentials.open(kek, PREFIX .. "apiv3_key", key))
    assert.matches("PRIVATE KEY", assert(credentials.open(kek,
      PREFIX .. "apiclient_key.pem", key)))
    assert(cli:delete(other, { prefix = true }))
  end)

  it("loads, binds, hot-swaps on a rotation, refuses a bad set, never "
     .. "goes back", function()
    local src = creds:source(dir .. "/cache1")
    sh("mkdir -p " .. dir .. "/cache1")
    local set = assert(src:load(MCHID))
    assert.equal("AAAA01", set.serial)
    local wx = creds:client_for(src)
    assert.equal("AAAA01", wx.conf.signer.serial)
    src:start()
    -- a second worker's source
    local src2 = creds:source(dir .. "/cache2")
    sh("mkdir -p " .. dir .. "/cache2")
    assert(src2:load(MCHID))
    src2:start()

    local code, out = creds:publish(env.b)
    assert.equal(0, code, out)
    local rev = assert(require("cjson").decode(out)).revision
    servers.wait_for(function() return wx.conf.signer.serial == "BBBB02" end,
                     10, "the swap to serial BBBB02")
    assert.equal(APIV3_B, wx.conf.apiv3_keys[1])
    assert.equal(APIV3, wx.conf.apiv3_keys[2])   -- the old one still opens
    assert.equal(rev, src:current(MCHID).revision)
    -- (its own watch stream, its own check of the set: on a loaded
    -- machine it may come well after the first's)
    servers.wait_for(function()
      return src2:current(MCHID).revision == rev
    end, 30, "the second source at the same revision")
    -- what a signed request now carries
    local sign = require "paygate.wechatpay.sign"
    local auth = assert(sign.sign_request(wx.conf.signer, "GET", "/v3/x", ""))
    assert.matches('serial_no="BBBB02"', auth, 1, true)

    -- a mismatched pair written straight to etcd: refused, old kept
    local kek = assert(credentials.read_kek{ kek_file = kek_file })
    local bad = assert(cli:txn{ success = {
      { put = PREFIX .. "apiclient_key.pem", value = credentials.seal(kek,
        PREFIX .. "apiclient_key.pem", read(dir .. "/a.key")) } } })
    local refused_rev = bad.revision
    servers.wait_for(function()
      local s = src.sets[MCHID]
      return s.refused == refused_rev
    end, 10, "the refusal")
    assert.equal("BBBB02", wx.conf.signer.serial)
    assert.equal(rev, src:current(MCHID).revision)

    -- the good set again (a newer revision) is taken
    code, out = creds:publish(env.a)
    assert.equal(0, code, out)
    servers.wait_for(function() return wx.conf.signer.serial == "AAAA01" end,
                     10, "the swap back to AAAA01 at a newer revision")
    local final = src:current(MCHID).revision
    assert.equal(1, etcd.rev_cmp(final, refused_rev))
    src:stop()
    src2:stop()

    -- etcd down at start: the cached set serves
    for _, m in ipairs(c.members) do m:stop() end
    local src3 = creds:source(dir .. "/cache1", { load_timeout = 1 })
    local cached = assert(src3:load(MCHID))
    assert.equal("AAAA01", cached.serial)
    assert.equal(final, cached.revision)
    -- the cache holds no secret in the clear
    local text = read(dir .. "/cache1/" .. MCHID .. ".json")
    assert.not_matches("PRIVATE KEY", text)
    assert.not_matches(APIV3, text, 1, true)
    -- and catches up once etcd is back
    src3:start()
    for _, m in ipairs(c.members) do m:start() end
    for _, m in ipairs(c.members) do m:wait_ready(30) end
    code, out = creds:publish(env.b)
    assert.equal(0, code, out)
    servers.wait_for(function()
      return src3:current(MCHID).serial == "BBBB02"
    end, 20, "the cached source to catch up")
    src3:stop()
  end)

  it("a rotation under a load of signed requests to the simulator: none "
     .. "fails, each after the swap carries the new serial", function()
    local testing = require "paygate.testing"
    local m = testing.merchant()
    local k2 = testing.merchant_keys{ mchid = m.mchid }
    m.certificates = { m.certificate, k2.certificate }
    local sim = testing.simulator{ merchants = { m } }
    local prefix = "/paygate/merchants/" .. m.mchid .. "/"
    local function dir_of(name, key, cert)
      local d = dir .. "/" .. name
      sh("mkdir -p " .. d)
      write(d .. "/apiclient_key.pem", read(key))
      write(d .. "/apiclient_cert.pem", read(cert))
      write(d .. "/apiv3_key", m.apiv3_key)
      return d
    end
    local code, out = creds:publish(dir_of("sim_a", m.private_key,
                                           m.certificate), nil, prefix)
    assert.equal(0, code, out)
    sh("mkdir -p " .. dir .. "/cache_sim")
    local src = assert(credentials.new{ etcd = c:client_opts(),
      kek_file = kek_file, cache_dir = dir .. "/cache_sim",
      merchants = { [m.mchid] = prefix } })
    assert(src:load(m.mchid))
    local wx = assert(wechatpay.client(src:wechatpay_conf(m.mchid,
                                                          sim:client_config())))
    src:bind(m.mchid, wx)
    src:start()

    -- the serial of every signature, in signing order (the real signer
    -- runs; this only records)
    local sign = require "paygate.wechatpay.sign"
    local real = sign.sign_request
    local serials = {}
    sign.sign_request = function(signer, ...)
      serials[#serials + 1] = signer.serial
      return real(signer, ...)
    end
    local ok_n, failed, stop = 0, {}, false
    local workers = {}
    for w = 1, 4 do
      workers[w] = paygate.spawn(function()
        local i = 0
        while not stop do
          i = i + 1
          local res, err = wx:native_prepay{
            out_trade_no = ("rot%d_%d_%s"):format(w, i,
                                                   crypto.random_nonce(6)),
            description = "rotation", notify_url = "https://127.0.0.1/n",
            amount = { total = 1 } }
          if res and res.code_url then
            ok_n = ok_n + 1
          else
            failed[#failed + 1] = tostring(err)
          end
        end
      end)
    end
    local ok, err = pcall(function()
      servers.wait_for(function() return ok_n >= 20 end, 30, "load")
      local n_before = ok_n
      code, out = creds:publish(dir_of("sim_b", k2.private_key,
                                       k2.certificate), nil, prefix)
      assert.equal(0, code, out)
      servers.wait_for(function()
        return wx.conf.signer.serial == k2.serial
      end, 10, "the swap")
      local at = ok_n
      servers.wait_for(function() return ok_n >= at + 20 end, 30,
                       "load after the swap")
      assert.is_true(n_before >= 20)
    end)
    stop = true
    for _, t in ipairs(workers) do t:wait(20) end
    sign.sign_request = real
    src:stop()
    wx:stop()
    assert(ok, tostring(err))
    assert.same({}, failed)
    -- a* then b+: no request signed with the old key after the new one
    local first_b
    for i, sn in ipairs(serials) do
      if sn == k2.serial then
        first_b = first_b or i
      else
        assert.equal(m.serial, sn)
        assert.is_nil(first_b, "an old serial after the swap at " .. i)
      end
    end
    assert.truthy(first_b)
    print(("\n# %d signed requests, %d before the swap, none failed")
          :format(#serials, first_b - 1))
  end)
end)
