-- examples/gateway: the config check. A bad config is one line on stderr,
-- "gateway: config.<key>: <reason>", exit status 2, no secret in it.
local testing = require "paygate.testing"
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local server = require "paygate.testing.server"
local gwcore = dofile("examples/gateway/spec/core_support.lua")
local write, read = gwcore.write, gwcore.read

package.path = "examples/gateway/?.lua;" .. package.path
local config = require "gw.config"



-- a webhook secret of the 32 bytes the gateway wants at least
local WH_SECRET = "whsec-1-0123456789abcdefghijklmnop"

describe("gateway config", function()
  local m, dir, key

  setup(function()
    m = testing.merchant()
    dir = server.tmpdir()
    key = testing.apiv3_key()
    write(dir .. "/apiv3.key", key .. "\n")
  end)

  teardown(function()
    server.rmdir(dir)
    testing.stop_all()
  end)

  local function merchant(over)
    local t = { mchid = m.mchid, appid = m.appid,
                merchant_private_key = m.private_key,
                merchant_certificate = m.certificate,
                apiv3_key_file = dir .. "/apiv3.key",
                base_url = "http://127.0.0.1:9", backup_url = false }
    for k, v in pairs(over or {}) do
      if v == false then t[k] = nil else t[k] = v end
    end
    return t
  end

  local function expect_refused(conf, want, listen)
    return gwcore.expect_refused(dir, conf, want, listen)
  end

  -- config.check's reason for refusing conf, in this process
  local function check_refused(conf, want)
    local cfg, why = config.check(conf, { listen = "127.0.0.1:8099" })
    assert.is_nil(cfg)
    assert.equal(want, why)
  end

  it("carries a merchant's appids in its record: file, partner and etcd"
     .. " merchants alike", function()
    -- the set a payment's appid is checked against (gw/payments.lua):
    -- the default and the list the WeChat Pay client takes. Was: the
    -- record carried the default only, so the list reached the client
    -- and no payment could name one of it.
    local A, B = "wx1111111111111111", "wx2222222222222222"
    local db = "sqlite:" .. dir .. "/a.db"
    local cfg = assert(config.check({ gateway = { db = db },
      merchants = { merchant{ appid = A, appids = { B } } } },
      { listen = "127.0.0.1:8099" }))
    local mm = cfg.merchants[1]
    assert.equal(A, mm.appid)
    assert.same({ [A] = true, [B] = true }, mm.appids)
    assert.same({ B }, mm.client.appids)
    -- the default alone: a set of one; none: nil (any appid is sent)
    cfg = assert(config.check({ gateway = { db = db },
      merchants = { merchant{ appid = A } } }, { listen = "127.0.0.1:8099" }))
    assert.same({ [A] = true }, cfg.merchants[1].appids)
    cfg = assert(config.check({ gateway = { db = db },
      merchants = { merchant{ appid = false } } },
      { listen = "127.0.0.1:8099" }))
    assert.is_nil(cfg.merchants[1].appids)
    -- a service provider: sp_appid and sp_appids
    cfg = assert(config.check({ gateway = { db = db }, merchants = {
      merchant{ mchid = false, appid = false, sp_mchid = m.mchid,
                sp_appid = A, sp_appids = { B } } } },
      { listen = "127.0.0.1:8099" }))
    assert.is_true(cfg.merchants[1].partner)
    assert.same({ [A] = true, [B] = true }, cfg.merchants[1].appids)
    -- a merchant whose keys come from etcd (the section is checked, not
    -- reached)
    write(dir .. "/kek", crypto.hex(crypto.random_bytes(32)) .. "\n")
    write(dir .. "/etcd-pw", "secret\n")
    cfg = assert(config.check({ gateway = { db = db },
      merchants = { { mchid = m.mchid, appid = A, appids = { B },
                      base_url = "http://127.0.0.1:9", backup_url = false } },
      credentials = { etcd = { endpoints = { "https://127.0.0.1:9" },
                               user = "gw", password_file = dir
                               .. "/etcd-pw" },
                      kek_file = dir .. "/kek",
                      cache_dir = dir .. "/credentials",
                      merchants = { [m.mchid] = "/paygate/m1/" } } },
      { listen = "127.0.0.1:8099" }))
    mm = cfg.merchants[1]
    assert.truthy(mm.etcd)
    assert.equal(A, mm.appid)
    assert.same({ [A] = true, [B] = true }, mm.appids)
    -- a list that is none stops the start, named by the client's check
    expect_refused({ gateway = { db = db }, merchants = { merchant{
                       appid = A, appids = { app = B } } } },
      "gateway: config.merchants[1].appids: must be a non-empty list of"
      .. " appids")
  end)

  it("refuses an APIv3 key written in the config, without printing it",
     function()
    local out = expect_refused({ gateway = { db = "sqlite:" .. dir
        .. "/a.db" }, merchants = { merchant{ apiv3_key = key,
                                              apiv3_key_file = false } } },
      "gateway: config.merchants[1].apiv3_key: ")
    assert.falsy(out:find(key, 1, true))
  end)

  it("gives the client the names of the entry's APIv3 keys and state_dir,"
     .. " for its messages; key_names itself is the gateway's", function()
    -- (the client named apiv3_key, which this config refuses)
    local other = testing.merchant()
    local cfg = assert(config.check({ gateway = { db = "sqlite:" .. dir
        .. "/a.db" }, merchants = { merchant(), merchant{
          mchid = other.mchid } } }, { listen = "127.0.0.1:8099" }))
    assert.same({ apiv3_key = "merchants[1].apiv3_key_file",
                  previous_apiv3_keys = "merchants[1].previous_apiv3_key_files",
                  state_dir = "merchants[1].state_dir" },
                cfg.merchants[1].client.key_names)
    assert.same({ apiv3_key = "merchants[2].apiv3_key_file",
                  previous_apiv3_keys = "merchants[2].previous_apiv3_key_files",
                  state_dir = "merchants[2].state_dir" },
                cfg.merchants[2].client.key_names)
    check_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db" },
      merchants = { merchant{ key_names = { apiv3_key = "x" } } } },
      "config.merchants[1].key_names: unknown key: the gateway names this"
      .. " entry's keys itself (apiv3_key_file, previous_apiv3_key_files)")
  end)

  it("refuses a private key's PEM text in the config", function()
    local pem = read(m.private_key)
    local out = expect_refused({ gateway = { db = "sqlite:" .. dir
        .. "/a.db" }, merchants = { merchant{ merchant_private_key = pem } } },
      "gateway: config.merchants[1].merchant_private_key: must be a file path")
    assert.falsy(out:find(pem:match("\n(.-)\n"), 1, true))
  end)

  it("names an APIv3 key file of the wrong length, not its content",
     function()
    write(dir .. "/short.key", "0123456789abcdef\n")
    local out = expect_refused({ gateway = { db = "sqlite:" .. dir
        .. "/a.db" }, merchants = { merchant{
          apiv3_key_file = dir .. "/short.key" } } },
      "config.merchants[1].apiv3_key_file: must hold the 32-character")
    assert.falsy(out:find("0123456789abcdef", 1, true))
  end)

  it("names a previous APIv3 key file of the wrong length by its key, not"
     .. " its content", function()
    -- before: config.merchants[1].previous_apiv3_keys: entry 1 must be
    -- exactly 32 bytes -- a key the config may not hold
    write(dir .. "/old-short.key", "0123456789abcdef\n")
    write(dir .. "/old-empty.key", "\n")
    local out = expect_refused({ gateway = { db = "sqlite:" .. dir
        .. "/a.db" }, merchants = { merchant{ previous_apiv3_key_files = {
          dir .. "/apiv3.key", dir .. "/old-short.key" } } } },
      "config.merchants[1].previous_apiv3_key_files[2]: must hold a"
      .. " 32-character APIv3 key (it holds 16 characters)")
    assert.falsy(out:find("0123456789abcdef", 1, true))
    local cfg, why = config.check({ gateway = { db = "sqlite:" .. dir
        .. "/a.db" }, merchants = { merchant{ previous_apiv3_key_files = {
          dir .. "/old-empty.key" } } } }, { listen = "127.0.0.1:8099" })
    assert.is_nil(cfg)
    assert.equal("config.merchants[1].previous_apiv3_key_files[1]: must"
      .. " hold a 32-character APIv3 key (it holds 0 characters)", why)
  end)

  it("says why a previous APIv3 key file cannot be read", function()
    -- before: "must be a file path" for a path that was one (the reason
    -- was lost on the way)
    local function refused(files, want)
      local cfg, why = config.check({ gateway = { db = "sqlite:" .. dir
          .. "/a.db" }, merchants = { merchant{
            previous_apiv3_key_files = files } } },
        { listen = "127.0.0.1:8099" })
      assert.is_nil(cfg)
      assert.equal(want, why)
    end
    refused({ dir .. "/apiv3.key", dir .. "/no-such.key" },
            "config.merchants[1].previous_apiv3_key_files[2]: cannot read"
            .. " the file it names (No such file or directory)")
    refused({ dir .. "/apiv3.key", 7 },
            "config.merchants[1].previous_apiv3_key_files[2]: must be a"
            .. " file path")
  end)

  it("refuses previous_apiv3_key_files that are not a list", function()
    -- before: { old = PATH } was taken for no previous key at all
    for _, files in ipairs({ { old = dir .. "/apiv3.key" },
                             { [2] = dir .. "/apiv3.key" },
                             dir .. "/apiv3.key" }) do
      local cfg, why = config.check({ gateway = { db = "sqlite:" .. dir
          .. "/a.db" }, merchants = { merchant{
            previous_apiv3_key_files = files } } },
        { listen = "127.0.0.1:8099" })
      assert.is_nil(cfg)
      assert.equal("config.merchants[1].previous_apiv3_key_files: must be"
                   .. " a list of file paths", why)
    end
  end)

  it("says a folder named where a file belongs is a folder, not an empty"
     .. " file", function()
    -- before: "the file is empty" (a folder opens, and its read fails)
    local sub = dir .. "/a-folder"
    assert(core.mkdir_p(sub))
    local refused = check_refused
    local db = "sqlite:" .. dir .. "/a.db"
    refused({ gateway = { db = db }, merchants = { merchant{
                apiv3_key_file = sub } } },
            "config.merchants[1].apiv3_key_file: cannot read the file it"
            .. " names (Is a directory)")
    refused({ gateway = { db = db, admin_token_file = sub },
              merchants = { merchant() } },
            "config.gateway.admin_token_file: cannot read the file it names"
            .. " (Is a directory)")
    refused({ gateway = { db = db, webhooks = { { url = "https://x.example",
                secret_file = sub } } }, merchants = { merchant() } },
            "config.gateway.webhooks[1].secret_file: cannot read the file it"
            .. " names (Is a directory)")
    local _, why = require("gw.credentials").section({ credentials = {
      etcd = { endpoints = { "https://127.0.0.1:2379" }, user = "gw",
               password_file = sub } } })
    assert.equal("config.credentials.etcd.password_file: cannot read it"
                 .. " (Is a directory)", why)
    -- the merchant's key files, read by the WeChat Pay client's check
    expect_refused({ gateway = { db = db }, merchants = { merchant{
                       merchant_private_key = sub } } },
      "gateway: config.merchants[1].merchant_private_key: cannot read the"
      .. " file (Is a directory)")
  end)

  it("refuses a secret file past 1 MiB, a device or a FIFO, unread",
     function()
    -- before: the 2 MiB file was read whole and taken as the admin token,
    -- /dev/null read as "the file is empty", and a FIFO held the check
    -- waiting for a writer (io.open), so the FIFO comes last here
    local big = dir .. "/big-token"
    write(big, ("t"):rep(2 * 1048576))
    local refused = check_refused
    local db = "sqlite:" .. dir .. "/a.db"
    refused({ gateway = { db = db, admin_token_file = big },
              merchants = { merchant() } },
            "config.gateway.admin_token_file: the file is over 1048576"
            .. " bytes")
    local special = "not a regular file (a FIFO, a socket or a device)"
    refused({ gateway = { db = db }, merchants = { merchant{
                apiv3_key_file = "/dev/null" } } },
            "config.merchants[1].apiv3_key_file: cannot read the file it"
            .. " names (" .. special .. ")")
    local _, why = require("gw.credentials").section({ credentials = {
      etcd = { endpoints = { "https://127.0.0.1:2379" }, user = "gw",
               password_file = "/dev/null" } } })
    assert.equal("config.credentials.etcd.password_file: cannot read it ("
                 .. special .. ")", why)
    local fifo = dir .. "/fifo"
    assert(os.execute("mkfifo " .. fifo) == 0)
    refused({ gateway = { db = db, webhooks = { { url = "https://x.example",
                secret_file = fifo } } }, merchants = { merchant() } },
            "config.gateway.webhooks[1].secret_file: cannot read the file it"
            .. " names (" .. special .. ")")
    refused({ gateway = { db = db }, merchants = { merchant{
                previous_apiv3_key_files = { fifo } } } },
            "config.merchants[1].previous_apiv3_key_files[1]: cannot read"
            .. " the file it names (" .. special .. ")")
    expect_refused({ gateway = { db = db }, merchants = { merchant{
                       merchant_private_key = big } } },
      "gateway: config.merchants[1].merchant_private_key: the file is over"
      .. " 1048576 bytes")
    expect_refused({ gateway = { db = db }, merchants = { merchant{
                       merchant_private_key = fifo } } },
      "gateway: config.merchants[1].merchant_private_key: cannot read the"
      .. " file (" .. special .. ")")
    -- a webhook's ca_file (paygate.wechatpay.config.pem_file, as the
    -- client's own): before, its io.open waited on the FIFO for good
    write(dir .. "/fifo-wh.secret", ("w"):rep(32) .. "\n")
    expect_refused({ gateway = { db = db, webhooks = { { url =
                       "https://127.0.0.1:1/h", secret_file = dir
                       .. "/fifo-wh.secret", ca_file = fifo } } },
                     merchants = { merchant() } },
      "gateway: config.gateway.webhooks[1].ca_file: must name a readable"
      .. " file of CA certificates (PEM) (" .. special .. ")")
    -- and a merchant's (the WeChat Pay client's check at start)
    expect_refused({ gateway = { db = db }, merchants = { merchant{
                       ca_file = fifo } } },
      "gateway: config.merchants[1].ca_file: must name a readable file of"
      .. " CA certificates (PEM) (" .. special .. ")")
  end)

  it("says why the SQLite store's folder cannot be made", function()
    write(dir .. "/plain", "a file, not a folder\n")
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/plain/sub/g.db" },
                     merchants = { merchant{} } },
      "config.gateway.db: cannot create the folder " .. dir
      .. "/plain/sub: Not a directory")
  end)

  it("takes refusal_log { lines, window } or false, its defaults 10 a"
     .. " minute; refuses anything else", function()
    local function check(rl)
      return config.check({ gateway = { db = "sqlite:" .. dir .. "/a.db",
        refusal_log = rl }, merchants = { merchant() } },
        { listen = "127.0.0.1:8099" })
    end
    assert.same({ lines = 10, window = 60 }, check(nil).gateway.refusal_log)
    assert.same({ lines = 3, window = 60 },
                check({ lines = 3 }).gateway.refusal_log)
    assert.is_false(check(false).gateway.refusal_log)
    for _, c in ipairs({
      { "on", "config.gateway.refusal_log: must be a table { lines = ...,"
        .. " window = ... }, or false" },
      { { line = 3 }, "config.gateway.refusal_log.line: unknown key (did"
        .. " you mean lines?)" },
      { { lines = 0 }, "config.gateway.refusal_log.lines: must be a whole"
        .. " number, 1 .. 1000000" },
      { { lines = 2.5 }, "config.gateway.refusal_log.lines: must be a"
        .. " whole number, 1 .. 1000000" },
      { { window = 0.5 }, "config.gateway.refusal_log.window: must be"
        .. " seconds, 1 .. 86400" },
      { { window = 0 / 0 }, "config.gateway.refusal_log.window: must be"
        .. " seconds, 1 .. 86400" },
    }) do
      local cfg, why = check(c[1])
      assert.is_nil(cfg)
      assert.equal(c[2], why)
    end
  end)

  it("refuses a bill_dir or capture_dir that names a file, at start",
     function()
    -- before: accepted; every bill run (and every refused notification's
    -- capture) then failed on it, said only in the log
    write(dir .. "/not-a-folder", "a file\n")
    local file = dir .. "/not-a-folder"
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db",
                                 reconcile = { bill_dir = file } },
                     merchants = { merchant{} } },
      "gateway: config.gateway.reconcile.bill_dir: " .. file .. " is a"
      .. " file, not a folder")
    local function refused(g, want)
      local cfg, why = config.check({ gateway = g, merchants = { merchant() } },
                                    { listen = "127.0.0.1:8099" })
      assert.is_nil(cfg)
      assert.equal(want, why)
    end
    refused({ db = "sqlite:" .. dir .. "/a.db", capture_dir = file },
            "config.gateway.capture_dir: " .. file .. " is a file, not a"
            .. " folder")
    -- the defaults beside an SQLite store too
    local var = dir .. "/var-files"
    assert(core.mkdir_p(var))
    write(var .. "/reconcile", "x\n")
    refused({ db = "sqlite:" .. var .. "/gw.db" },
            "config.gateway.reconcile.bill_dir: " .. var .. "/reconcile is a"
            .. " file, not a folder")
    os.remove(var .. "/reconcile")
    write(var .. "/refused", "x\n")
    refused({ db = "sqlite:" .. var .. "/gw.db" },
            "config.gateway.capture_dir: " .. var .. "/refused is a file,"
            .. " not a folder")
    -- folders, and ones not made yet, are taken
    assert(config.check({ gateway = { db = "sqlite:" .. var .. "/gw.db",
      capture_dir = var .. "/new/captures",
      reconcile = { bill_dir = var } }, merchants = { merchant() } },
      { listen = "127.0.0.1:8099" }))
  end)

  it("names an unset APIv3 key variable", function()
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db" },
      merchants = { merchant{ apiv3_key_file = false,
                              apiv3_key_env = "GW_SPEC_NO_SUCH_VAR" } } },
      "config.merchants[1].apiv3_key_env: the environment variable"
      .. " GW_SPEC_NO_SUCH_VAR is not set")
  end)

  it("never repeats a secret written where a file or variable's name"
     .. " belongs", function()
    local key = "hOC69FJ5aBcDeFgHiJkLmNoPqRsTuVwX"      -- 32 characters
    local out = expect_refused({ gateway = { db = "sqlite:" .. dir
        .. "/a.db" }, merchants = { merchant{ apiv3_key_file = key } } },
      "config.merchants[1].apiv3_key_file: cannot read the file it names"
      .. " (No such file or directory)")
    assert.falsy(out:find(key, 1, true), out)
    -- a relative path: the working directory's, and said so (before: only
    -- "No such file or directory", the config's folder looked in vain)
    local cfg, why = config.check({ gateway = { db = "sqlite:" .. dir
        .. "/a.db" }, merchants = { merchant{
          apiv3_key_file = "apiv3.key" } } }, { listen = "127.0.0.1:8099" })
    assert.is_nil(cfg)
    assert.equal("config.merchants[1].apiv3_key_file: cannot read the file"
      .. " it names (No such file or directory); a relative path is taken"
      .. " from the working directory, not the config file's folder", why)
    out = expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db" },
      merchants = { merchant{ apiv3_key_file = false,
                              apiv3_key_env = key } } },
      "config.merchants[1].apiv3_key_env: the environment variable it names"
      .. " is not set")
    assert.falsy(out:find(key, 1, true), out)
    out = expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db",
                                       admin_token_file = key },
                           merchants = { merchant() } },
      "admin_token_file: cannot read the file it names")
    assert.falsy(out:find(key, 1, true), out)
  end)

  it("refuses a store URL its client would refuse: one line, exit 2,"
     .. " no password", function()
    -- before: a traceback and exit 1 (the option raised at connect), and
    -- rediss:// passed the check
    local out = expect_refused({ gateway = { db = "sqlite:" .. dir
        .. "/a.db", redis = "redis://:pw-s3cr3t@127.0.0.1:1?pool=99" },
      merchants = { merchant() } },
      "gateway: config.gateway.redis: must be a redis:// or redis-sentinel"
      .. ":// URL paygate.redis takes (redis.connect: opts.pool must be")
    assert.falsy(out:find("s3cr3t", 1, true), out)
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db",
                                 redis = "rediss://127.0.0.1:1" },
                     merchants = { merchant() } },
      "gateway: config.gateway.redis: ")
    out = expect_refused({ gateway = { db = "sqlite:" .. dir
        .. "/a.db?readers=many" }, merchants = { merchant() } },
      -- (before: the position sql.open raised at came between them,
      -- "config.gateway.db: /.../gw/boot.lua:67: sql.open: ...")
      "gateway: config.gateway.db: sql.open: opts.readers must be")
    assert.falsy(out:find("traceback", 1, true), out)
  end)

  it("refuses an unknown gateway key and a missing merchant list",
     function()
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db",
                                 paymnet_ttl = 5 },
                     merchants = { merchant() } },
                   "gateway: config.gateway.paymnet_ttl: unknown key")
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db" } },
                   "gateway: config.merchants: must list at least one")
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db" },
                     merchants = "1900000001" },
                   "gateway: config.merchants: must be a list of merchants")
  end)

  it("refuses a misspelt gateway, merchants or credentials section",
     function()
    -- before: the runtime leaves keys it does not read to the app, and the
    -- gateway read only its own: "gatway" started on every default (no
    -- admin token, no webhooks, an SQLite store in the working directory)
    local ms = { merchant() }
    expect_refused({ gatway = { db = "sqlite:" .. dir .. "/a.db" },
                     merchants = ms },
                   "gateway: config.gatway: unknown key (did you mean"
                   .. " gateway?)")
    for _, case in ipairs({
      { { Gateway = {}, gateway = {}, merchants = ms }, "Gateway",
        "gateway" },
      { { merchant = ms }, "merchant", "merchants" },
      { { merchnats = ms, merchants = ms }, "merchnats", "merchants" },
      { { credentails = {}, merchants = ms }, "credentails",
        "credentials" },
    }) do
      local cfg, why = config.check(case[1], { listen = "127.0.0.1:8099" })
      assert.is_nil(cfg)
      assert.equal("config." .. case[2] .. ": unknown key (did you mean "
                   .. case[3] .. "?)", why)
    end
    -- the runtime's keys and other apps' beside them are not the gateway's
    assert.truthy(config.check({ gateway = { db = "sqlite:" .. dir
        .. "/a.db" }, merchants = ms, workers = 2, log_level = "info",
        shared = {}, limits = {}, metrics_url = "http://127.0.0.1:1/m",
        leases = {}, getaway = {} }, { listen = "127.0.0.1:8099" }))
  end)

  it("names the key a misspelt one is a slip from, in every table of the"
     .. " gateway's", function()
    -- before: "unknown key" alone inside gateway = {...} and its tables,
    -- while the runtime's limits and a merchant's client keys said which
    local db = "sqlite:" .. dir .. "/a.db"
    local function says(g, want, m, extra)
      g.db = g.db or db
      local conf = { gateway = g, merchants = { merchant(m) } }
      for k, v in pairs(extra or {}) do conf[k] = v end
      local cfg, why = config.check(conf, { listen = "127.0.0.1:8099" })
      assert.is_nil(cfg, want)
      assert.equal(want, why)
    end
    says({ payment_tl = 600 }, "config.gateway.payment_tl: unknown key"
         .. " (did you mean payment_ttl?)")
    says({ webhooks = { { url = "http://127.0.0.1:9/h", secert = "x" } } },
         "config.gateway.webhooks[1].secert: unknown key (did you mean"
         .. " secret?)")
    says({ redis = "redis://127.0.0.1:9", redis_stream = { maxln = 5 } },
         "config.gateway.redis_stream.maxln: unknown key (did you mean"
         .. " maxlen?)")
    says({ dispatcher = { concurency = 4 } }, "config.gateway.dispatcher."
         .. "concurency: unknown key (did you mean concurrency?)")
    says({ reconcile = { bill_huor = 9 } }, "config.gateway.reconcile."
         .. "bill_huor: unknown key (did you mean bill_hour?)")
    says({ console = { sesion_ttl = 60 } }, "config.gateway.console."
         .. "sesion_ttl: unknown key (did you mean session_ttl?)")
    says({ retention = { outbox_dys = 3 } }, "config.gateway.retention:"
         .. " unknown retention option outbox_dys (did you mean"
         .. " outbox_days?)")
    says({}, "config.merchants[1].previous_apiv3_key_fils: unknown key (did"
         .. " you mean previous_apiv3_key_files?)",
         { previous_apiv3_key_fils = { dir .. "/apiv3.key" } })
    -- a client key's slip, as before
    says({}, "config.merchants[1].timout: unknown key (did you mean"
         .. " timeout?)", { timout = 5 })
    -- the credentials section, and its etcd table
    local c, why = require("gw.credentials").section({ credentials = {
      cache_dri = dir, etcd = { endpoints = { "https://127.0.0.1:9" } } } })
    assert.is_false(c)
    assert.equal("config.credentials.cache_dri: unknown key (did you mean"
                 .. " cache_dir?)", why)
    c, why = require("gw.credentials").section({ credentials = {
      etcd = { endpionts = { "https://127.0.0.1:9" } } } })
    assert.is_false(c)
    assert.equal("config.credentials.etcd.endpionts: unknown key (did you"
                 .. " mean endpoints?)", why)
    -- nothing near: no guess
    says({ zzzzzz = 1 }, "config.gateway.zzzzzz: unknown key")
  end)

  it("started without --config, says to give one", function()
    local free_port = core.free_port
    local code, out = testing.proc.run({ server.bin(), "run",
      "examples/gateway", "--listen", "127.0.0.1:" .. free_port(),
      "--admin", "127.0.0.1:" .. free_port() }, { timeout = 30 })
    assert.equal(2, code, out)
    local lines = gwcore.config_lines(out)
    assert.equal(1, #lines, out)
    assert.matches("gateway: config.merchants: must list at least one"
      .. " merchant, and no config file was given: paygate run"
      .. " examples/gateway --config FILE", lines[1], 1, true)
    -- with a config file, the plain reason (the file is there)
    out = expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db" } },
                         "gateway: config.merchants: must list at least one"
                         .. " merchant")
    assert.falsy(out:find("no config file", 1, true))
  end)

  it("refuses dev_app unless it listens on loopback only", function()
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db",
                                 dev_app = "dev" },
                     merchants = { merchant() } },
                   "gateway: config.gateway.dev_app: unsigned dev access"
                   .. " needs every listen address on loopback",
                   "0.0.0.0:" .. core.free_port())
  end)

  it("reports a wechatpay key error under the merchant's key", function()
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db" },
                     merchants = { merchant{ mchid = "19x" } } },
                   "gateway: config.merchants[1].mchid: ")
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db" },
                     merchants = { merchant{
                       merchant_private_key = dir .. "/none.pem" } } },
                   "gateway: config.merchants[1].merchant_private_key: ")
    -- a certificate where the private key belongs: the cause, as paygate
    -- doctor names it (was only "cannot load the private key (malformed)")
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db" },
                     merchants = { merchant{
                       merchant_private_key = m.certificate } } },
                   "gateway: config.merchants[1].merchant_private_key:"
                   .. " cannot load the private key (malformed): this is a"
                   .. " certificate, not a private key: point"
                   .. " merchant_private_key at apiclient_key.pem")
    -- a base URL with a path is told so: http:// to loopback is no fault
    -- (was "must be https://host[:port] with no path")
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db" },
                     merchants = { merchant{
                       base_url = "http://127.0.0.1:18490/v3" } } },
                   "gateway: config.merchants[1].base_url: has a path (/v3):"
                   .. " give scheme, host and port only")
    -- a misspelt client option stops the start too (it kept its default)
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db" },
                     merchants = { merchant{ timout = 5 } } },
                   "gateway: config.merchants[1].timout: unknown key (did"
                   .. " you mean timeout?)")
  end)

  -- the store was opened (and its SQLite file made, "made a new, empty
  -- SQLite database" logged) before the merchants' clients were made: a
  -- start refused for a merchant key left an empty database behind, and
  -- the next start, the key fixed, no longer said it made a new one
  it("refuses a bad merchant key before it makes the SQLite database",
     function()
    local sm2 = dir .. "/sm2.pem"
    assert(os.execute("openssl genpkey -algorithm SM2 -out " .. sm2
                      .. " 2>/dev/null"))
    for i, mk in ipairs({ m.certificate, sm2 }) do
      local state = dir .. "/fresh" .. i
      local db = state .. "/gateway.db"
      local out = expect_refused({ gateway = { db = "sqlite:" .. db },
        merchants = { merchant{ merchant_private_key = mk } } },
        "gateway: config.merchants[1].merchant_private_key: ")
      for _, f in ipairs({ db, db .. "-wal", db .. "-shm" }) do
        assert.is_nil(core.file_type(f), f .. ": " .. out)
      end
      assert.is_nil(out:find("new, empty SQLite database", 1, true), out)
    end
  end)

  -- the config check made the SQLite store's folder (and the credentials
  -- cache's) as it checked them: a start refused later in the check, or
  -- by a merchant's client config, left them behind
  it("a start refused for its config makes no folder", function()
    write(dir .. "/kek", crypto.hex(crypto.random_bytes(32)) .. "\n")
    write(dir .. "/etcd-pw", "secret\n")
    local function section(cache)
      return { etcd = { endpoints = { "https://127.0.0.1:9" }, user = "gw",
                        password_file = dir .. "/etcd-pw" },
               kek_file = dir .. "/kek", cache_dir = cache,
               merchants = { ["1900000109"] = "/paygate/m1/" } }
    end
    local cases = {
      -- refused by the config check, after it checked gateway.db
      { function(state)
          return { gateway = { db = "sqlite:" .. state .. "/var/gw.db",
                               public_url = "ftp://x" },
                   merchants = { merchant() } }
        end, "gateway: config.gateway.public_url: " },
      -- by a merchant's client config, after the config check
      { function(state)
          return { gateway = { db = "sqlite:" .. state .. "/var/gw.db" },
                   merchants = { merchant{
                     merchant_private_key = m.certificate } } }
        end, "gateway: config.merchants[1].merchant_private_key: " },
      -- after the credentials section was checked (its cache folder)
      { function(state)
          return { gateway = { db = "sqlite:" .. state .. "/var/gw.db" },
                   merchants = { merchant{ merchant_private_key =
                                           m.certificate },
                                 { mchid = "1900000109",
                                   appid = "wx1111111111111111",
                                   base_url = "http://127.0.0.1:9",
                                   backup_url = false } },
                   credentials = section(state .. "/creds") }
        end, "gateway: config.merchants[1].merchant_private_key: " },
    }
    for i, case in ipairs(cases) do
      local state = dir .. "/untouched" .. i
      local out = expect_refused(case[1](state), case[2])
      assert.is_nil(core.file_type(state), state .. ": " .. out)
    end
    -- the check goes on saying what no start could make
    write(dir .. "/plain", "a file, not a folder\n")
    check_refused({ gateway = { db = "sqlite:" .. dir .. "/plain/a/b/g.db" },
                    merchants = { merchant() } },
      "config.gateway.db: cannot create the folder " .. dir .. "/plain/a/b:"
      .. " Not a directory (making " .. dir .. "/plain/a)")
    local c = section(dir .. "/plain/creds")
    check_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db" },
                    merchants = { { mchid = "1900000109",
                                    appid = "wx1111111111111111" } },
                    credentials = c },
      "config.credentials.cache_dir: cannot create the folder " .. dir
      .. "/plain/creds: Not a directory")
  end)

  it("makes the store's folder when it starts", function()
    local sim = testing.simulator()
    local state
    local gw = gwcore.start(sim, { db = function(srv)
      state = srv.dir .. "/made/var"
      return "sqlite:" .. state .. "/gw.db"
    end })
    assert.equal("directory", core.file_type(state))
    assert.equal("file", core.file_type(state .. "/gw.db"))
    gwcore.stop(gw)
  end)

  it("refuses a bad gateway.dispatcher option in one line", function()
    -- before: the outbox dispatcher raised it in every worker (exit 1,
    -- a stack trace) after the store was opened
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db",
                                 dispatcher = { max_attempts = -1 } },
                     merchants = { merchant() } },
                   "gateway: config.gateway.dispatcher.max_attempts: must be"
                   .. " a positive number")
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db",
                                 dispatcher = { batchh = 5 } },
                     merchants = { merchant() } },
                   "gateway: config.gateway.dispatcher.batchh: unknown key")
    -- a name the outbox cannot measure its deliveries under: before, it
    -- passed here and every worker's dispatcher raised in every round,
    -- delivering nothing
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db",
                                 dispatcher = { name = "gw|eu" } },
                     merchants = { merchant() } },
                   "gateway: config.gateway.dispatcher.name: must be a"
                   .. " non-empty string without '|' (at most 184 bytes)")
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db",
                                 hooks_timeout = 0 },
                     merchants = { merchant() } },
                   "gateway: config.gateway.hooks_timeout: must be seconds")
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db",
                                 capture_dir = 5 },
                     merchants = { merchant() } },
                   "gateway: config.gateway.capture_dir: must be a folder's"
                   .. " path, or false")
  end)

  it("refuses a webhook event type that does not exist, and a name"
     .. " taken twice", function()
    write(dir .. "/wh.secret", WH_SECRET .. "\n")
    -- before: a typo in types silently filtered out every event
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db",
      webhooks = { { url = "http://127.0.0.1:1/h",
                     secret_file = dir .. "/wh.secret",
                     types = { "payment.paid", "payment.payed" } } } },
      merchants = { merchant() } },
      "gateway: config.gateway.webhooks[1].types[2]: unknown event type")
    -- before: two sinks of one name stopped every worker with a trace
    expect_refused({ gateway = { db = "sqlite:" .. dir .. "/a.db",
      webhooks = { { url = "http://127.0.0.1:1/h", name = "erp",
                     secret_file = dir .. "/wh.secret" },
                   { url = "http://127.0.0.1:2/h", name = "erp",
                     secret_file = dir .. "/wh.secret" } } },
      merchants = { merchant() } },
      "gateway: config.gateway.webhooks[2].name: ")
  end)

  it("refuses to start with a gw/hooks.lua that does not load, in one"
     .. " line", function()
    -- before: the gateway ran without its hooks, and the hooks sink
    -- counted every event as done (no hook for its type), so once
    -- hooks.lua was fixed those events never reached it
    local free_port = core.free_port
    local file = dir .. "/hooks-conf.lua"
    write(file, "return " .. server.lua_source({ gateway = {
      db = "sqlite:" .. dir .. "/hooks.db" }, merchants = { merchant() } })
      .. "\n")
    for _, case in ipairs({
      { "local _M = {}\nfunction _M.on_paid(event)\nreturn _M\n",
        "gw/hooks.lua" },
      { "error('no fulfilment service configured')\n",
        "no fulfilment service configured" },
      { "local _M = {}\nfunction _M.on_paid(event) end\n",
        "gw/hooks.lua must return a table" },
      -- a misspelt name is a hook that never runs, while the hooks sink
      -- counts its events as done
      { "local _M = {}\nfunction _M.on_payed(event) end\nreturn _M\n",
        "gw/hooks.lua: on_payed is neither an event type nor" },
      { "return { on_paid = true }\n",
        "gw/hooks.lua: on_paid must be a function" },
    }) do
      local app = server.tmpdir()
      os.execute("cp -r examples/gateway/app.lua examples/gateway/gw"
                 .. " examples/gateway/migrations '" .. app .. "/'")
      write(app .. "/gw/hooks.lua", case[1])
      local code, out = testing.proc.run({ server.bin(), "run", app,
        "--listen", "127.0.0.1:" .. free_port(),
        "--admin", "127.0.0.1:" .. free_port(), "--config", file },
        { timeout = 15 })
      server.rmdir(app)
      assert.equal(2, code, out)
      local lines = gwcore.config_lines(out)
      assert.equal(1, #lines, out)
      assert.matches(case[2], lines[1], 1, true)
    end
  end)

  describe("check()", function()
    it("fills the defaults and makes no folder", function()
      local cfg = assert(config.check({
        gateway = { db = "sqlite:" .. dir .. "/sub/var/gw.db" },
        merchants = { merchant() } }, { listen = "127.0.0.1:8099" }))
      local g = cfg.gateway
      assert.equal(7200, g.payment_ttl)
      assert.equal("refund", g.on_late_payment)
      assert.is_false(g.degraded)
      assert.equal("http://127.0.0.1:8099", g.public_url)
      assert.equal(key, cfg.merchants[1].client.apiv3_key)
      assert.is_nil(cfg.merchants[1].client.apiv3_key_file)
      -- (the gateway makes it once the whole config is checked)
      assert.is_nil(core.file_type(dir .. "/sub"))
      local def = assert(config.check({ merchants = { merchant() } },
                                      { listen = "127.0.0.1:8099" }))
      assert.equal("sqlite:var/gateway.db", def.gateway.db)
    end)

    it("holds payment_ttl to 120 .. 604800 (WeChat is reported to refuse"
       .. " a time_expire less than a minute ahead)", function()
      -- before: 60 was taken, and its time_expire reached WeChat a little
      -- under a minute ahead
      for _, t in ipairs({ 60, 119, 604801, 120.5, "7200" }) do
        local _, why = config.check({ gateway = {
          db = "sqlite:" .. dir .. "/a.db", payment_ttl = t },
          merchants = { merchant() } })
        assert.equal("config.gateway.payment_ttl: must be whole seconds,"
                     .. " 120 .. 604800", why)
      end
      for _, t in ipairs({ 120, 604800 }) do
        local cfg = assert(config.check({ gateway = {
          db = "sqlite:" .. dir .. "/a.db", payment_ttl = t },
          merchants = { merchant() } }))
        assert.equal(t, cfg.gateway.payment_ttl)
      end
    end)

    it("reads webhook secrets from files or the environment", function()
      write(dir .. "/wh.secret", WH_SECRET .. "\n")
      local cfg = assert(config.check({ gateway = {
        db = "sqlite:" .. dir .. "/a.db",
        webhooks = { { url = "http://127.0.0.1:1/h",
                       secret_file = dir .. "/wh.secret" } } },
        merchants = { merchant() } }))
      assert.equal(WH_SECRET, cfg.gateway.webhooks[1].secret)
      -- a secret shorter than 32 bytes (the doc's floor for an HMAC-SHA256
      -- key) was taken, down to one byte: refused, by its length only
      write(dir .. "/short.secret", "whsec-1\n")
      local _, short = config.check({ gateway = {
        db = "sqlite:" .. dir .. "/a.db",
        webhooks = { { url = "http://127.0.0.1:1/h",
                       secret_file = dir .. "/short.secret" } } },
        merchants = { merchant() } })
      assert.equal("config.gateway.webhooks[1].secret_file: the secret is 7"
        .. " bytes; it must be at least 32 (e.g. head -c 32 /dev/urandom |"
        .. " base64 > FILE)", short)
      -- a variable made from a file keeps its newline (a Kubernetes
      -- secret, an env file): it is dropped as the file's is (before, the
      -- gateway signed with it and a receiver that stripped it as the
      -- docs say refused every delivery: bad_signature)
      local ffi = require "ffi"
      pcall(ffi.cdef, "int setenv(const char *, const char *, int);")
      ffi.C.setenv("GW_SPEC_WH_SECRET", " " .. WH_SECRET .. "-2\n", 1)
      cfg = assert(config.check({ gateway = {
        db = "sqlite:" .. dir .. "/a.db",
        webhooks = { { url = "http://127.0.0.1:1/h",
                       secret_env = "GW_SPEC_WH_SECRET" } } },
        merchants = { merchant() } }))
      assert.equal(WH_SECRET .. "-2", cfg.gateway.webhooks[1].secret)
      ffi.C.setenv("GW_SPEC_WH_SECRET", " \n", 1)
      local _, blank = config.check({ gateway = {
        db = "sqlite:" .. dir .. "/a.db",
        webhooks = { { url = "http://127.0.0.1:1/h",
                       secret_env = "GW_SPEC_WH_SECRET" } } },
        merchants = { merchant() } })
      assert.equal("config.gateway.webhooks[1].secret_env: the environment"
                   .. " variable GW_SPEC_WH_SECRET is empty", blank)
      -- set to nothing (export X=) is empty too, not "not set"
      ffi.C.setenv("GW_SPEC_WH_SECRET", "", 1)
      _, blank = config.check({ gateway = {
        db = "sqlite:" .. dir .. "/a.db",
        webhooks = { { url = "http://127.0.0.1:1/h",
                       secret_env = "GW_SPEC_WH_SECRET" } } },
        merchants = { merchant() } })
      assert.equal("config.gateway.webhooks[1].secret_env: the environment"
                   .. " variable GW_SPEC_WH_SECRET is empty", blank)
      local _, why = config.check({ gateway = { db = "sqlite:" .. dir
        .. "/a.db", webhooks = { { url = "http://127.0.0.1:1/h",
                                   secret = "s3cr3t" } } },
        merchants = { merchant() } })
      assert.matches("^config.gateway.webhooks%[1%].secret: ", why)
      assert.falsy(why:find("s3cr3t", 1, true))
    end)

    -- a rotation from the sender's side: the old secret beside the new,
    -- each delivery signed with both, so receivers move to the new one
    -- when they are ready (before, previous_secret_file was an unknown
    -- key: the receivers had to hold the new secret before the gateway)
    it("signs with a webhook's previous secret too, while it is given",
       function()
      write(dir .. "/wh.secret", WH_SECRET .. "\n")
      write(dir .. "/wh.old", WH_SECRET .. "-old\n")
      local cfg = assert(config.check({ gateway = {
        db = "sqlite:" .. dir .. "/a.db",
        webhooks = { { url = "http://127.0.0.1:1/h",
                       secret_file = dir .. "/wh.secret",
                       previous_secret_file = dir .. "/wh.old" } } },
        merchants = { merchant() } }))
      assert.same({ WH_SECRET, WH_SECRET .. "-old" },
                  cfg.gateway.webhooks[1].secret)
      local outbox = require "paygate.outbox"
      local sig = outbox.sign_webhook(cfg.gateway.webhooks[1].secret, "{}")
      assert.is_true(outbox.verify_webhook(WH_SECRET .. "-old", sig, "{}"))
      assert.is_true(outbox.verify_webhook(WH_SECRET, sig, "{}"))
      write(dir .. "/short.secret", "whsec-1\n")
      local _, short = config.check({ gateway = {
        db = "sqlite:" .. dir .. "/a.db",
        webhooks = { { url = "http://127.0.0.1:1/h",
                       secret_file = dir .. "/wh.secret",
                       previous_secret_file = dir .. "/short.secret" } } },
        merchants = { merchant() } })
      assert.equal("config.gateway.webhooks[1].previous_secret_file: the"
        .. " secret is 7 bytes; it must be at least 32 (e.g. head -c 32"
        .. " /dev/urandom | base64 > FILE)", short)
      local _, both = config.check({ gateway = {
        db = "sqlite:" .. dir .. "/a.db",
        webhooks = { { url = "http://127.0.0.1:1/h",
                       secret_file = dir .. "/wh.secret",
                       previous_secret_file = dir .. "/wh.old",
                       previous_secret_env = "HOME" } } },
        merchants = { merchant() } })
      assert.equal("config.gateway.webhooks[1].previous_secret_file: give"
        .. " previous_secret_file or previous_secret_env, not both", both)
    end)

    it("refuses a sink's unknown key, and a webhook list without its"
       .. " brackets", function()
      write(dir .. "/wh.secret", WH_SECRET .. "\n")
      local function why_of(g)
        g.db = "sqlite:" .. dir .. "/a.db"
        local _, why = config.check({ gateway = g, merchants = { merchant() } })
        return why
      end
      -- before: each started, the key silently dropped
      assert.equal("config.gateway.webhooks[1].secert_file: unknown key"
        .. " (did you mean secret_file?)",
        why_of{ webhooks = { { url = "http://127.0.0.1:1/h",
                               secert_file = dir .. "/wh.secret" } } })
      assert.equal("config.gateway.webhooks[1].retries: unknown key",
        why_of{ webhooks = { { url = "http://127.0.0.1:1/h", retries = 3,
                               secret_file = dir .. "/wh.secret" } } })
      assert.equal("config.gateway.redis_stream.max_len: unknown key (did"
        .. " you mean maxlen?)",
        why_of{ redis = "redis://127.0.0.1:1",
                redis_stream = { max_len = 1000 } })
      -- headers and ca_file are the webhook's (paygate.outbox's options)
      local cfg = assert(config.check({ gateway = { db = "sqlite:" .. dir
        .. "/a.db", webhooks = { { url = "https://127.0.0.1:1/h",
          secret_file = dir .. "/wh.secret", ca_file = m.certificate,
          headers = { ["X-Tenant"] = "t-1" } } } },
        merchants = { merchant() } }))
      assert.equal("t-1", cfg.gateway.webhooks[1].headers["X-Tenant"])
      assert.equal("config.gateway.webhooks[1].headers.X-Tenant: must be a"
        .. " string without control characters",
        why_of{ webhooks = { { url = "http://127.0.0.1:1/h",
          secret_file = dir .. "/wh.secret",
          headers = { ["X-Tenant"] = "a\r\nX-Evil: 1" } } } })
      assert.matches("^config.gateway.webhooks%[1%]: .*Paygate%-Signature is"
        .. " set by the webhook itself", why_of{ webhooks = { { url =
          "http://127.0.0.1:1/h", secret_file = dir .. "/wh.secret",
          headers = { ["Paygate-Signature"] = "x" } } } })
      -- a receiver's token kept out of the config text: { file = PATH } or
      -- { env = NAME }, read as a secret is (before: a string only, the
      -- token written in the config; a table was refused as no string)
      write(dir .. "/erp.token", "Bearer erp-token-1\n")
      cfg = assert(config.check({ gateway = { db = "sqlite:" .. dir
        .. "/a.db", webhooks = { { url = "https://127.0.0.1:1/h",
          secret_file = dir .. "/wh.secret", headers = {
            Authorization = { file = dir .. "/erp.token" },
            ["X-Home"] = { env = "HOME" }, ["X-Tenant"] = "t-1" } } } },
        merchants = { merchant() } }))
      local hh = cfg.gateway.webhooks[1].headers
      assert.equal("Bearer erp-token-1", hh.Authorization)
      assert.equal(os.getenv("HOME"), hh["X-Home"])
      assert.equal("t-1", hh["X-Tenant"])
      -- each refusal names the key, never what the file held
      write(dir .. "/two.token", "line one\nline two\n")
      for hv, why in pairs({
        [{ file = dir .. "/nope.token" }] = "^config%.gateway%.webhooks%[1%]"
          .. "%.headers%.Authorization%.file: cannot",
        [{ file = dir .. "/two.token" }] = "^config%.gateway%.webhooks%[1%]"
          .. "%.headers%.Authorization: the value read holds control"
          .. " characters %(one line, please%)$",
        [{ env = "PAYGATE_SPEC_NO_SUCH_VAR" }] = "^config%.gateway%.webhooks"
          .. "%[1%]%.headers%.Authorization%.env: the environment variable"
          .. " PAYGATE_SPEC_NO_SUCH_VAR is not set$",
        [{ file = dir .. "/erp.token", env = "HOME" }] = "give file or env,"
          .. " not both$",
        [{ path = dir .. "/erp.token" }] = "^config%.gateway%.webhooks%[1%]"
          .. "%.headers%.Authorization%.path: unknown key",
        [{}] = "^config%.gateway%.webhooks%[1%]%.headers%.Authorization:"
          .. " give file or env$",
      }) do
        local w = why_of{ webhooks = { { url = "http://127.0.0.1:1/h",
          secret_file = dir .. "/wh.secret", headers = { Authorization = hv } } } }
        assert.matches(why, w)
        assert.not_matches("line one", w, 1, true)
      end
      -- before: a folder, or a file of no certificate, was taken, and
      -- every delivery to the receiver then failed on TLS until dead.
      -- Each refusal says why, as a merchant's ca_file does (before: the
      -- webhook's said only "must name a readable file ... (PEM)"); a
      -- file that reads and holds no certificate says so
      assert(core.mkdir_p(dir .. "/ca-folder"))
      for ca, why in pairs({
          [dir .. "/nope.pem"] = " (cannot open it: No such file or"
                                 .. " directory)",
          [dir .. "/ca-folder"] = " (Is a directory)",
          [dir .. "/wh.secret"] = " (no -----BEGIN CERTIFICATE----- block"
                                  .. " in it)" }) do
        assert.equal("config.gateway.webhooks[1].ca_file: must name a"
          .. " readable file of CA certificates (PEM)" .. why,
          why_of{ webhooks = { { url = "https://127.0.0.1:1/h",
            secret_file = dir .. "/wh.secret", ca_file = ca } } })
      end
      -- one webhook written without the list's brackets: before, no
      -- webhook ran and the events were marked delivered
      assert.matches("^config.gateway.webhooks: must be a list",
        why_of{ webhooks = { url = "http://127.0.0.1:1/h",
                             secret_file = dir .. "/wh.secret" } })
    end)

    it("refuses a webhook timeout or a stream maxlen that is not a number"
       .. " in range", function()
      write(dir .. "/wh.secret", WH_SECRET .. "\n")
      for _, t in ipairs({ "5", -1, 0, 1 / 0, 0 / 0 }) do
        local _, why = config.check({ gateway = {
          db = "sqlite:" .. dir .. "/a.db",
          webhooks = { { url = "http://127.0.0.1:1/h", timeout = t,
                         secret_file = dir .. "/wh.secret" } } },
          merchants = { merchant() } })
        assert.equal("config.gateway.webhooks[1].timeout: must be seconds,"
                     .. " more than 0 and at most 300", why)
      end
      for _, n in ipairs({ 0, 2.5, 1 / 0, "100" }) do
        local _, why = config.check({ gateway = {
          db = "sqlite:" .. dir .. "/a.db", redis = "redis://127.0.0.1:1",
          redis_stream = { maxlen = n } }, merchants = { merchant() } })
        assert.matches("^config.gateway.redis_stream.maxlen: ", why)
      end
      local cfg = assert(config.check({ gateway = {
        db = "sqlite:" .. dir .. "/a.db",
        webhooks = { { url = "http://127.0.0.1:1/h", timeout = 2.5,
                       secret_file = dir .. "/wh.secret" } } },
        merchants = { merchant() } }))
      assert.equal(2.5, cfg.gateway.webhooks[1].timeout)
    end)

    it("takes an IPv6 loopback public_url, and a notify URL for an IPv6"
       .. " wildcard listen address", function()
      -- before: "http://[::1]:8080" was refused as not loopback (its host
      -- read as "["), and --listen [::]:8080 made http://[::]:8080, a
      -- notify_url WeChat (the simulator) refuses as not loopback
      local cfg = assert(config.check({ gateway = {
        db = "sqlite:" .. dir .. "/a.db", public_url = "http://[::1]:8099/" },
        merchants = { merchant() } }))
      assert.equal("http://[::1]:8099", cfg.gateway.public_url)
      local _, why = config.check({ gateway = {
        db = "sqlite:" .. dir .. "/a.db",
        public_url = "http://[2001:db8::1]:8099" },
        merchants = { merchant() } })
      assert.equal("config.gateway.public_url: http:// is allowed for a"
                   .. " loopback host only; use https://", why)
      assert(config.check({ gateway = { db = "sqlite:" .. dir .. "/a.db",
        public_url = "https://[2001:db8::1]:8443" },
        merchants = { merchant() } }))
      cfg = assert(config.check({ gateway = { db = "sqlite:" .. dir
        .. "/a.db" }, merchants = { merchant() } }, { listen = "[::]:8099" }))
      assert.equal("http://[::1]:8099", cfg.gateway.public_url)
    end)

    it("refuses a public_url whose notify URLs the client refuses",
       function()
      -- before: --listen 10.0.0.5:8099 without public_url made
      -- http://10.0.0.5:8099, and a 240-byte public_url passed: every
      -- prepay then failed invalid_params on its notify_url
      local _, why = config.check({ gateway = { db = "sqlite:" .. dir
        .. "/a.db" }, merchants = { merchant() } }, { listen = "10.0.0.5:8099" })
      assert.matches("^config.gateway.public_url: is required", why)
      _, why = config.check({ gateway = { db = "sqlite:" .. dir .. "/a.db",
        public_url = "https://pay.example/" .. ("a"):rep(220) },
        merchants = { merchant() } })
      assert.matches("^config.gateway.public_url: makes the notify_url", why)
      assert(config.check({ gateway = { db = "sqlite:" .. dir .. "/a.db",
        public_url = "https://pay.example/" .. ("a"):rep(200) },
        merchants = { merchant() } }))
    end)

    it("takes the PostgreSQL schemes sql.open takes, no other", function()
      -- before: any postgres<letters>:// passed, and sql.open raised on it
      for _, url in ipairs({ "postgress://u@h/db", "postgresx://h/db" }) do
        local _, why = config.check({ gateway = { db = url },
                                      merchants = { merchant() } })
        assert.equal("config.gateway.db: must be \"sqlite:PATH\" or a"
                     .. " postgres:// URL", why)
      end
      for _, url in ipairs({ "postgres://u@h/db", "postgresql://u@h/db" }) do
        assert(config.check({ gateway = { db = url },
                              merchants = { merchant() } }))
      end
    end)

    it("refuses a bad gateway.reconcile option, as the worker's start"
       .. " would", function()
      -- before: check() passed any reconcile table (paygate doctor said
      -- the gateway accepts its configuration); gw.reconcile.start then
      -- refused it in every worker
      for _, case in ipairs({
        { { bil = true }, "config.gateway.reconcile.bil: unknown key (did"
          .. " you mean bill?)" },
        { { bill_hour = 25 }, "config.gateway.reconcile.bill_hour: must be"
          .. " a whole hour, 0 .. 23" },
        { false, "config.gateway.reconcile: must be a table" },
      }) do
        local _, why = config.check({ gateway = { db = "sqlite:" .. dir
          .. "/a.db", reconcile = case[1] }, merchants = { merchant() } })
        assert.equal(case[2], why)
      end
      assert(config.check({ gateway = { db = "sqlite:" .. dir .. "/a.db",
        reconcile = { bill_hour = 9, enabled = false } },
        merchants = { merchant() } }))
    end)

    it("refuses dispatcher.keep_days while retention prunes the outbox",
       function()
      -- before: accepted and ignored (the dispatcher runs with prune =
      -- false; retention's outbox_days, 7 by default, decided)
      local _, why = config.check({ gateway = { db = "sqlite:" .. dir
        .. "/a.db", dispatcher = { keep_days = 30 } },
        merchants = { merchant() } })
      assert.equal("config.gateway.dispatcher.keep_days: delivered events"
        .. " are pruned by gateway.retention (its outbox_days) while it is"
        .. " on; set that, or retention = false", why)
      _, why = config.check({ gateway = { db = "sqlite:" .. dir .. "/a.db",
        dispatcher = { keep_days = 30 }, retention = { outbox_days = 9 } },
        merchants = { merchant() } })
      assert.matches("^config.gateway.dispatcher.keep_days: ", why)
      local cfg = assert(config.check({ gateway = { db = "sqlite:" .. dir
        .. "/a.db", dispatcher = { keep_days = 30 }, retention = false },
        merchants = { merchant() } }))
      assert.equal(30, cfg.gateway.dispatcher.keep_days)
      -- the dispatcher's other pruning options too (before: accepted and
      -- ignored while retention prunes)
      for k, theirs in pairs({ prune_batch = "batch",
                               prune_interval = "interval" }) do
        _, why = config.check({ gateway = { db = "sqlite:" .. dir
          .. "/a.db", dispatcher = { [k] = 50 } },
          merchants = { merchant() } })
        assert.equal("config.gateway.dispatcher." .. k .. ": delivered"
          .. " events are pruned by gateway.retention (its " .. theirs
          .. ") while it is on; set that, or retention = false", why)
        cfg = assert(config.check({ gateway = { db = "sqlite:" .. dir
          .. "/a.db", dispatcher = { [k] = 50 }, retention = false },
          merchants = { merchant() } }))
        assert.equal(50, cfg.gateway.dispatcher[k])
      end
    end)

    it("refuses a URL with user info (a password, or a host that only"
       .. " looks like loopback)", function()
      write(dir .. "/wh.secret", WH_SECRET .. "\n")
      local _, why = config.check({ gateway = {
        db = "sqlite:" .. dir .. "/a.db",
        public_url = "http://localhost:80@pay.example/" },
        merchants = { merchant() } })
      assert.equal("config.gateway.public_url: must have no user info"
                   .. " (user:password@)", why)
      _, why = config.check({ gateway = { db = "sqlite:" .. dir .. "/a.db",
        webhooks = { { url = "https://erp:hunter2@erp.example/h",
                       secret_file = dir .. "/wh.secret" } } },
        merchants = { merchant() } })
      assert.matches("^config.gateway.webhooks%[1%].url: must have no user"
                     .. " info", why)
      assert.falsy(why:find("hunter2", 1, true))
    end)
  end)
end)
