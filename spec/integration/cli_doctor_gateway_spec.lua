-- paygate doctor on the reference gateway's own config ({ gateway,
-- merchants }, as scripts/run writes it): the merchant's keys are checked
-- as the gateway reads them (its APIv3 key file, the newline dropped),
-- the notify URL is the one the gateway gives WeChat, the database its.
local json = require "cjson.safe"
local server = require "support.server"
local proc = require "support.proc"

local dir

-- runs paygate with args (from the folder cwd when given); returns its
-- exit code (nil when still running after deadline seconds, default 60:
-- it is killed), output and the JSON results by kind
local function run(args, cwd, deadline)
  local log = dir .. "/out"
  os.remove(log)
  local argv = { PAYGATE_BIN }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  if cwd then
    if argv[1]:sub(1, 1) ~= "/" then
      argv[1] = io.popen("pwd"):read("*l") .. "/" .. argv[1]
    end
    local q = {}
    for i, a in ipairs(argv) do q[i] = "'" .. a:gsub("'", "'\\''") .. "'" end
    argv = { "/bin/sh", "-c", "cd '" .. cwd:gsub("'", "'\\''") .. "' && exec "
             .. table.concat(q, " ") }
  end
  local p = proc.spawn(argv, { log = log })
  local code = p:wait(deadline or 60)
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

-- a variant of the dev gateway config: body changes `c` (that config)
local function variant(name, body)
  local path = dir .. "/" .. name .. ".lua"
  local f = assert(io.open(path, "w"))
  f:write(("local c = dofile(%q)\n"):format(dir .. "/dev/gateway.lua"),
          body, "\nreturn c\n")
  f:close()
  return path
end

setup(function()
  dir = server.tmpdir()
  -- the dev merchant and the gateway config scripts/run makes (ports
  -- where nothing listens: reachability fails, the rest is checked)
  local code, out = run({ "exec", "scripts/dev.lua", dir .. "/dev",
                          "http://127.0.0.1:9", "http://127.0.0.1:9" })
  assert(code == 0, out)
  -- the gateway's database, as its first start makes it
  assert(require("paygate.sql").open("sqlite:" .. dir .. "/dev/gateway.db"))
    :close()
end)

teardown(function() os.execute("rm -rf " .. dir) end)

describe("paygate doctor --config <the gateway's config>", function()
  it("checks its merchant as the gateway reads it", function()
    local conf = dir .. "/dev/gateway.lua"
    -- a key file ending in a newline, which the gateway drops: so must
    -- the check
    local kf = dir .. "/dev/apiv3.key"
    local key = assert(io.open(kf)):read("*a")
    assert.equal(32, #key)
    local f = assert(io.open(kf, "w"))
    f:write(key, "\n")
    f:close()
    local _, out, r = run({ "doctor", "--json", "--config", conf })
    assert.is_nil(out:find("no wechatpay table", 1, true))
    -- JSON as the rest of paygate writes it (paygate.json): "/" as is
    assert.matches("http://127.0.0.1:9/wechatpay/notify/", out, 1, true)
    assert.is_nil(out:find("\\/", 1, true), out)
    assert.equal("ok", r.config.status, out)
    assert.matches("merchant %d+ %(1 of them%)", r.config.cause)
    for _, k in ipairs({ "gateway_config", "key_certificate",
                         "serial_format", "apiv3_key", "wechatpay_config",
                         "database" }) do
      assert.equal("ok", r[k] and r[k].status, k .. ": " .. out)
    end
    -- the notify URL is public_url's route for the merchant
    local probed
    for _, x in ipairs(r) do
      if x.kind == "notify_url" and x.cause:find("127.0.0.1:9/wechatpay/"
                                                  .. "notify/19", 1, true)
      then
        probed = true
      end
    end
    assert.is_true(probed, out)
    -- base_url on loopback where nothing listens (was: "check the firewall
    -- and proxy (outbound 443)", for a plain-HTTP simulator's port 9)
    assert.equal("fail", r.reachability.status, out)
    assert.equal("nothing listens on 127.0.0.1:9: start the server base_url"
                 .. " names (the simulator: scripts/run, or paygate run"
                 .. " examples/simulator), or correct base_url",
                 r.reachability.fix)
  end)

  if require("spec.support.servers").have_redis() then
    it("reaches Redis with the password the gateway reads from"
       .. " redis_password_file", function()
      -- before: doctor connected without it, and Redis's NOAUTH failed
      -- the check of a config the gateway runs with
      local servers = require "spec.support.servers"
      local srv = servers.redis{ requirepass = "doctorpw" }
      local pf = dir .. "/redis.pw"
      local f = assert(io.open(pf, "w"))
      f:write("doctorpw\n")
      f:close()
      local conf = variant("redispw", ("c.gateway.redis = %q\n"
        .. "c.gateway.redis_password_file = %q")
        :format("redis://127.0.0.1:" .. srv.port, pf))
      local _, out, r = run({ "doctor", "--json", "--config", conf })
      servers.stop_all()
      assert.equal("ok", r.gateway_config.status, out)
      assert.equal("ok", r.redis and r.redis.status, out)
      assert.is_nil(out:find("doctorpw", 1, true), out)
      -- the gateway's check failing (another key), the password is not
      -- read: Redis is not checked, rather than failed with NOAUTH
      srv = servers.redis{ requirepass = "doctorpw" }
      conf = variant("redispw2", ("c.gateway.redis = %q\n"
        .. "c.gateway.redis_password_file = %q\n"
        .. "c.gateway.frobnicate = true")
        :format("redis://127.0.0.1:" .. srv.port, pf))
      _, out, r = run({ "doctor", "--json", "--config", conf })
      servers.stop_all()
      assert.equal("fail", r.gateway_config.status, out)
      assert.equal("warn", r.redis and r.redis.status, out)
      assert.matches("not checked", r.redis.cause, 1, true)
      assert.is_nil(out:find("NOAUTH", 1, true), out)
    end)
  end

  it("fails what the gateway itself would refuse to start with", function()
    local conf = variant("badkey", "c.gateway.frobnicate = true")
    local code, out, r = run({ "doctor", "--json", "--config", conf })
    assert.equal(1, code, out)
    assert.equal("fail", r.gateway_config.status, out)
    assert.matches("gateway.frobnicate", r.gateway_config.cause, 1, true)
    -- the same with the app named; a folder without the gateway: exit 2
    code, out, r = run({ "doctor", "--json", "--config", conf, "--app",
                         "examples/gateway" })
    assert.equal("fail", r.gateway_config.status, out)
    code, out = run({ "doctor", "--config", conf, "--app", dir })
    assert.equal(2, code, out)
    assert.matches("no gw/config.lua there", out, 1, true)
  end)

  it("names an APIv3 key given inline as it is given", function()
    -- the gateway refuses it (keys come from files or variables); the
    -- key's own check must not speak of an apiv3_key_file never given
    local conf = variant("inline", "local m = c.merchants[1]\n"
      .. "m.apiv3_key = string.rep('k', 32)\n"
      .. "m.apiv3_key_file = nil")
    local code, out, r = run({ "doctor", "--json", "--config", conf })
    assert.equal(1, code, out)
    assert.equal("fail", r.gateway_config.status, out)
    assert.matches("merchants[1].apiv3_key)", r.apiv3_key.cause, 1, true)
    assert.is_nil(r.apiv3_key.cause:find("apiv3_key_file", 1, true), out)
  end)

  it("fails a merchant key the gateway's start would refuse", function()
    -- an EC key: the structure is fine, the WeChat Pay client's check
    -- (made at start) refuses it; doctor says so in gateway_config
    local ec = dir .. "/ec_key.pem"
    assert(os.execute("openssl genpkey -algorithm EC -pkeyopt "
      .. "ec_paramgen_curve:P-256 -out " .. ec .. " 2>/dev/null"))
    local conf = variant("eckey", ("c.merchants[1].merchant_private_key = %q")
                                  :format(ec))
    local code, out, r = run({ "doctor", "--json", "--config", conf })
    assert.equal(1, code, out)
    assert.equal("fail", r.gateway_config.status, out)
    assert.matches("config.merchants[1].merchant_private_key: cannot load "
                   .. "the private key", r.gateway_config.cause, 1, true)
    assert.is_nil(out:find("BEGIN", 1, true))
    -- the key's own check says what is wrong with it, in the gateway's terms
    assert.equal("fail", r.merchant_key.status, out)
    assert.matches("RSA key", r.merchant_key.fix, 1, true)
    -- a key file that is not there: a path is the fix (the gateway takes
    -- no PEM text), under the gateway's key name
    conf = variant("nokey", ("c.merchants[1].merchant_private_key = %q")
                              :format(dir .. "/nope.pem"))
    code, out, r = run({ "doctor", "--json", "--config", conf })
    assert.equal(1, code, out)
    assert.equal("fail", r.gateway_config.status, out)
    assert.matches("merchants[1].merchant_private_key",
                   r.merchant_key.cause, 1, true)
    assert.is_nil(r.merchant_key.fix:find("BEGIN", 1, true))
  end)

  -- a key of the other variant than sign_type's: the message named the
  -- sign_type that takes it, the fixes still sent the user to the key
  -- ("fix the key it names", "fix merchants[1].merchant_private_key")
  -- where an SM merchant has most often left sign_type out
  it("names sign_type in the fix for a merchant key of the other variant",
     function()
    local sm2 = dir .. "/sm2_key.pem"
    assert(os.execute("openssl genpkey -algorithm SM2 -out " .. sm2
                      .. " 2>/dev/null"))
    local conf = variant("sm2key", ("c.merchants[1].merchant_private_key"
                                    .. " = %q"):format(sm2))
    local code, out, r = run({ "doctor", "--json", "--config", conf })
    assert.equal(1, code, out)
    local want = 'set merchants[1].sign_type = "WECHATPAY2-SM2-WITH-SM3"'
    for _, k in ipairs({ "gateway_config", "wechatpay_config" }) do
      assert.equal("fail", r[k] and r[k].status, k .. ": " .. out)
      assert.equal(1, r[k].fix:find(want, 1, true), k .. ": " .. out)
      assert.matches("or give merchants[1].merchant_private_key the "
                     .. "merchant's RSA key", r[k].fix, 1, true)
    end
    -- the reverse: the dev merchant's RSA key under the SM sign_type
    conf = variant("rsaundersm", 'c.merchants[1].sign_type = '
                                 .. '"WECHATPAY2-SM2-WITH-SM3"')
    code, out, r = run({ "doctor", "--json", "--config", conf })
    assert.equal(1, code, out)
    want = "leave merchants[1].sign_type out"
    for _, k in ipairs({ "gateway_config", "wechatpay_config" }) do
      assert.equal("fail", r[k] and r[k].status, k .. ": " .. out)
      assert.equal(1, r[k].fix:find(want, 1, true), k .. ": " .. out)
      assert.matches("merchant's SM2 key", r[k].fix, 1, true)
    end
    -- another failure of the key keeps the fix naming the key
    local ec = dir .. "/ec_key2.pem"
    assert(os.execute("openssl genpkey -algorithm EC -pkeyopt "
      .. "ec_paramgen_curve:P-256 -out " .. ec .. " 2>/dev/null"))
    conf = variant("eckey2", ("c.merchants[1].merchant_private_key = %q")
                             :format(ec))
    code, out, r = run({ "doctor", "--json", "--config", conf })
    assert.equal("fix the key it names (docs/gateway.md lists them)",
                 r.gateway_config.fix, out)
    assert.equal("fix merchants[1].merchant_private_key",
                 r.wechatpay_config.fix, out)
  end)

  -- doctor read apiv3_key_file and previous_apiv3_key_files with the
  -- command-line reader, which takes a pipe (--apiv3-key-file <(...)): a
  -- FIFO named in the config held it for good, waiting for a writer,
  -- while the gateway refuses it at start. It now reads them as the
  -- gateway does, and says so in the gateway's words (a failed apiv3_key
  -- check, the others run: see "fails the check of an APIv3 key file it
  -- cannot read").
  it("refuses a FIFO as the APIv3 key file unread, as the gateway does",
     function()
    local fifo = dir .. "/apiv3.fifo"
    assert(os.execute("mkfifo " .. fifo) == 0)
    local special = "cannot read the file it names (not a regular file (a"
                    .. " FIFO, a socket or a device))"
    local conf = variant("fifokey", ("c.merchants[1].apiv3_key_file = %q")
                                    :format(fifo))
    local code, out, r = run({ "doctor", "--json", "--config", conf }, nil,
                             20)
    assert.equal(1, code, out)              -- (nil: it waited on the FIFO)
    assert.equal("config.merchants[1].apiv3_key_file: " .. special,
                 r.apiv3_key and r.apiv3_key.cause, out)
    assert.is_nil(out:find(fifo, 1, true), out) -- the path is not said
    conf = variant("fifoprev", ("c.merchants[1].previous_apiv3_key_files"
      .. " = { c.merchants[1].apiv3_key_file, %q }"):format(fifo))
    code, out = run({ "doctor", "--json", "--config", conf }, nil, 20)
    assert.equal(1, code, out)
    assert.matches("config.merchants[1]."
                   .. "previous_apiv3_key_files[2]: " .. special, out, 1,
                   true)
    -- a path that is no string: the gateway's words (before, doctor
    -- looked for a file named "7")
    conf = variant("prevnum", "c.merchants[1].previous_apiv3_key_files"
      .. " = { c.merchants[1].apiv3_key_file, 7 }")
    code, out = run({ "doctor", "--json", "--config", conf }, nil, 20)
    assert.equal(2, code, out)
    assert.matches("paygate doctor: config.merchants[1]."
                   .. "previous_apiv3_key_files[2]: must be a file path",
                   out, 1, true)
    -- a file that is there reads as before: its newline dropped
    conf = variant("prevok", "c.merchants[1].previous_apiv3_key_files"
      .. " = { c.merchants[1].apiv3_key_file }")
    local r
    code, out, r = run({ "doctor", "--json", "--config", conf }, nil, 20)
    assert.equal("ok", r.gateway_config and r.gateway_config.status, out)
    assert.equal("ok", r.apiv3_key and r.apiv3_key.status, out)
  end)

  -- an APIv3 key file the gateway's reader refuses (missing, a folder;
  -- mode 000 too, but the suite may run as root, who reads it) stopped
  -- doctor with exit 2 and one line, where an unreadable
  -- apiclient_key.pem is a failed check and the others run: it is now a
  -- failed apiv3_key check with its fix, exit 1
  it("fails the check of an APIv3 key file it cannot read, and goes on",
     function()
    local cases = {
      missing = { dir .. "/no-such.key", "No such file or directory" },
      folder = { dir, "Is a directory" } }
    for name, c in pairs(cases) do
      local conf = variant("unread" .. name, ("c.merchants[1]"
        .. ".apiv3_key_file = %q"):format(c[1]))
      local code, out, r = run({ "doctor", "--json", "--config", conf }, nil,
                               20)
      assert.equal(1, code, out)
      local x = r.apiv3_key
      assert.equal("fail", x and x.status, out)
      assert.equal("config.merchants[1].apiv3_key_file: cannot read the"
        .. " file it names (" .. c[2] .. ")", x.cause)
      assert.matches("point merchants[1].apiv3_key_file at the file holding"
        .. " the 32-character APIv3 key", x.fix, 1, true)
      -- the client configuration's check does not blame the key it could
      -- not read: the rest of it is checked (was: a second failed line,
      -- "merchants[1].apiv3_key: must be exactly 32 bytes")
      local w = r.wechatpay_config
      assert.equal("ok", w and w.status, out)
      assert.matches("the APIv3 key not read (see apiv3_key)", w.cause, 1,
                     true)
      assert.is_nil(out:find("32 bytes", 1, true), out)
      -- the other checks ran
      assert.equal("fail", r.gateway_config.status, out)
      assert.equal("ok", r.key_certificate and r.key_certificate.status, out)
      assert.truthy(r.database, out)
      assert.is_nil(out:find(c[1], 1, true), out) -- the path is not said
    end
    -- one of previous_apiv3_key_files: its own failed line; the current
    -- key is checked as ever
    local conf = variant("unreadprev", ("c.merchants[1]"
      .. ".previous_apiv3_key_files = { %q }"):format(dir))
    local code, out, r = run({ "doctor", "--json", "--config", conf }, nil,
                             20)
    assert.equal(1, code, out)
    local causes = {}
    for _, x in ipairs(r) do
      if x.kind == "apiv3_key" then causes[#causes + 1] = x.status .. " "
                                                         .. x.cause end
    end
    table.sort(causes)
    assert.same({ "fail config.merchants[1].previous_apiv3_key_files[1]:"
      .. " cannot read the file it names (Is a directory)",
      "ok the APIv3 key (merchants[1].apiv3_key_file) is 32 bytes" },
      causes, out)
  end)

  -- the previous key files doctor could read go to the client's check
  -- without the one it could not: the client's "entry N" counted them
  -- alone, so a short key in file [2] after an unreadable [1] was blamed
  -- on entry 1, the file already reported unreadable
  it("names the previous APIv3 key file that is wrong by its place in the"
     .. " config, past one it cannot read", function()
    local short = dir .. "/short-prev.key"
    local f = assert(io.open(short, "w"))
    f:write(string.rep("k", 31), "\n")
    f:close()
    local conf = variant("unreadprevshort", ("c.merchants[1]"
      .. ".previous_apiv3_key_files = { %q, %q }"):format(dir, short))
    local code, out, r = run({ "doctor", "--json", "--config", conf }, nil,
                             20)
    assert.equal(1, code, out)
    local x = r.wechatpay_config
    assert.equal("fail", x and x.status, out)
    assert.equal("merchants[1].previous_apiv3_key_files: entry 2 must be"
                 .. " exactly 32 bytes", x.cause, out)
    assert.equal("fix merchants[1].previous_apiv3_key_files", x.fix, out)
  end)

  -- an empty apiv3_key_file (or one that is no string) is no path: the
  -- gateway says "must be a file path"; doctor read "" as a file and said
  -- "cannot read the file it names (No such file or directory)", and
  -- passed a number over, running its checks without the key
  it("says an APIv3 key file that is no path is none, in the gateway's"
     .. " words", function()
    for name, v in pairs({ emptykey = '""', numkey = "7" }) do
      local conf = variant(name, "c.merchants[1].apiv3_key_file = " .. v)
      local code, out = run({ "doctor", "--json", "--config", conf }, nil,
                            20)
      assert.equal(2, code, out)
      assert.matches("paygate doctor: config.merchants[1].apiv3_key_file: "
                     .. "must be a file path\n", out, 1, true)
      assert.is_nil(out:find("cannot read", 1, true), out)
    end
  end)

  it("finds the gateway app from another folder", function()
    -- run outside the checkout: its examples/gateway is still the app
    local _, out, r = run({ "doctor", "--json", "--config",
                            dir .. "/dev/gateway.lua" }, dir)
    assert.truthy(r.gateway_config, out)
    assert.equal("ok", r.gateway_config.status, out)
  end)

  -- (spec/integration/cli_doctor_etcd_spec.lua reads a set from a real
  -- etcd; here no member answers and no set was cached)
  it("a merchant whose keys come from etcd, neither etcd nor a cached set"
     .. " giving them: failed", function()
    local kek = dir .. "/kek"
    local f = assert(io.open(kek, "w"))
    f:write(("ab"):rep(32), "\n")
    f:close()
    local conf = variant("etcd", "local m = c.merchants[1]\n"
      .. "c.merchants[1] = { mchid = m.mchid, appid = m.appid,"
      .. " base_url = m.base_url }\n"
      .. ("c.credentials = { etcd = { endpoints = { 'https://127.0.0.1:9' },"
          .. " user = 'paygate', password = 'pw' },"
          .. " kek_file = %q, cache_dir = %q, merchants = { [m.mchid] ="
          .. " '/paygate/m/' } }"):format(kek, dir .. "/cache"))
    local code, out, r = run({ "doctor", "--json", "--config", conf })
    -- before: warned "doctor does not read them there", exit 0
    assert.equal(1, code, out)
    assert.equal("ok", r.gateway_config.status, out)
    assert.equal("fail", r.credentials and r.credentials.status, out)
    assert.matches("(the set at /paygate/m/ in etcd)", r.credentials.cause,
                   1, true)
    assert.matches("etcd unavailable", r.credentials.cause, 1, true)
    assert.matches("no cached set", r.credentials.cause, 1, true)
    assert.is_nil(r.merchant_key, out)       -- no keys to check
    assert.is_nil(r.wechatpay_config, out)
    -- nor was the cache folder made (the gateway's check runs dry)
    assert.is_nil(io.open(dir .. "/cache"))
  end)

  it("says a SQLite database is missing, and makes no file", function()
    local conf = variant("nodb", ("c.gateway.db = %q"):format("sqlite:" .. dir
                                                       .. "/typo/typo.db"))
    local code, out, r = run({ "doctor", "--json", "--config", conf })
    assert.equal(1, code, out)
    assert.equal("fail", r.database.status)
    assert.matches("no database file", r.database.cause, 1, true)
    -- nor its folder (the gateway's own check makes it at start)
    assert.is_nil(io.open(dir .. "/typo/typo.db"))
    assert.is_nil(io.open(dir .. "/typo"))
    -- an absolute path: no advice about relative ones
    assert.is_nil(r.database.detail, out)
    assert.is_nil(r.database.fix:find("absolute path", 1, true), out)
    assert.matches("check the path", r.database.fix, 1, true)
    -- a relative one: taken from where doctor runs, said
    conf = variant("reldb", "c.gateway.db = 'sqlite:typo/typo.db'")
    code, out, r = run({ "doctor", "--json", "--config", conf }, dir)
    assert.equal(1, code, out)
    assert.matches("a relative path", r.database.detail, 1, true)
    assert.matches("absolute path", r.database.fix, 1, true)
    assert.is_nil(io.open(dir .. "/typo"))
  end)

  it("says which option of the database URL is refused", function()
    -- (an existing file: the check reaches sql.open, which refuses the
    -- option as the gateway's start does)
    local db = dir .. "/opts.db"
    assert(io.open(db, "w")):close()
    local conf = variant("dbopt", ("c.gateway.db = %q"):format("sqlite:" .. db
                                                       .. "?readers=many"))
    local code, out, r = run({ "doctor", "--json", "--config", conf })
    assert.equal(1, code, out)
    assert.equal("fail", r.database.status, out)
    assert.matches("the database URL is refused: sql.open: opts.readers",
                   r.database.cause, 1, true)
    assert.is_nil(r.database.cause:find("%.lua:%d+:"), r.database.cause)
    assert.matches("fix that option", r.database.fix, 1, true)
  end)

  it("measures its notify route and leases from its metrics_url", function()
    -- the gateway's notify route, on an app whose admin listener serves
    -- /metrics as the gateway's does
    local app = server.start{ source = [[
      require("paygate").route("POST", "/wechatpay/notify/:mchid",
        function() return 401, { code = "FAIL" } end)
    ]] }
    local ok, err = pcall(function()
      local res = app:request{ method = "POST",
                               path = "/wechatpay/notify/1900000001" }
      assert.equal(401, res.status)
      local conf = variant("metrics", ("c.gateway.public_url = %q\n"
        .. "c.metrics_url = %q\n"
        .. "c.leases = { notify = { ttl = 10, route = "
        .. "'POST /wechatpay/notify/:mchid' } }")
        :format(app:url(""), "http://127.0.0.1:" .. app.admin .. "/metrics"))
      local _, out, r = run({ "doctor", "--json", "--config", conf })
      assert.equal("ok", r.gateway_config.status, out)
      assert.equal("ok", r.notify_latency and r.notify_latency.status, out)
      assert.matches("POST /wechatpay/notify/:mchid", r.notify_latency.cause,
                     1, true)
      assert.equal("ok", r.lease_ttl and r.lease_ttl.status, out)
    end)
    app:stop()
    assert(ok, err)
  end)

  it("says a gateway answering 'unknown merchant' runs an older config,"
     .. " and a 404 elsewhere that public_url does not reach it", function()
    -- was: both "no handler at this path", fix "route POST
    -- /wechatpay/notify/<mchid> to the notification handler (or fix
    -- notify_url)": the gateway has that route, and its config has no
    -- notify_url. A merchant added to the config, the gateway not
    -- reloaded (or the reload refused), is answered 404 unknown merchant:
    -- every notification of it is lost until a reload.
    local gw = server.start{ app = "examples/gateway",
      config = ("return dofile(%q)\n"):format(dir .. "/dev/gateway.lua") }
    local ok, err = pcall(function()
      local res = gw:request{ method = "POST",
                              path = "/wechatpay/notify/1900000002" }
      assert.equal(404, res.status)
      -- (the dev merchant's keys under another mchid: the running gateway
      -- serves only 1900000001)
      local function notify_fail(name, body)
        local _, out, r = run({ "doctor", "--json", "--config",
                                variant(name, body) })
        for _, x in ipairs(r) do
          if x.kind == "notify_url" and x.status == "fail" then
            return x, out
          end
        end
        error("no failed notify_url in:\n" .. out)
      end
      local x, out = notify_fail("added", ("c.merchants[1].mchid ="
        .. " '1900000002'\nc.gateway.public_url = %q"):format(gw:url("")))
      assert.matches("answered HTTP 404: the gateway there does not serve"
                     .. " merchant 1900000002 (unknown merchant)", x.cause,
                     1, true)
      assert.matches("reload the gateway", x.fix, 1, true)
      assert.is_nil(x.fix:find("route POST", 1, true), out)
      -- a path in public_url the gateway does not serve: its router's 404
      x, out = notify_fail("prefixed", ("c.gateway.public_url = %q")
                           :format(gw:url("/pay")))
      assert.matches("answered HTTP 404: no handler at this path", x.cause,
                     1, true)
      assert.matches("public_url", x.fix, 1, true)
      assert.is_nil(x.fix:find("notify_url", 1, true), out)
    end)
    gw:stop()
    assert(ok, err)
  end)

  it("its unsigned notify probe is named in the gateway's refusal line, and"
     .. " not kept as a refused WeChat notification", function()
    -- was: each doctor run left a "notification refused" warning, a row in
    -- the console's refused notifications and a capture for paygate
    -- verify, none saying they came from doctor. Told apart by the whole
    -- request (doctor's User-Agent, its fixed body, no Wechatpay-*
    -- header): the same bytes from anyone carry nothing, and the answer
    -- is the refusal every unsigned request gets
    local sql = require "paygate.sql"
    local gw = server.start{ app = "examples/gateway",
      args = { "--log-level", "info" },
      config = ("return dofile(%q)\n"):format(dir .. "/dev/gateway.lua") }
    local db = assert(sql.open("sqlite:" .. dir .. "/dev/gateway.db"))
    local ok, err = pcall(function()
      local function refused_rows()
        return assert(db:query("SELECT COUNT(*) AS n FROM"
                               .. " gw_notifications_refused"))[1].n
      end
      local function captures()
        local n = 0
        for _, name in ipairs(require("paygate.core").listdir(dir
                              .. "/dev/refused") or {}) do
          if name:match("%.body$") then n = n + 1 end
        end
        return n
      end
      local function lines()
        local l = {}
        for line in (gw:logs() or ""):gmatch("[^\n]+") do
          local rec = json.decode(line)
          if type(rec) == "table"
             and rec.msg == "gateway: notification refused" then
            l[#l + 1] = rec
          end
        end
        return l
      end
      local rows0, caps0 = refused_rows(), captures()
      local conf = variant("probe", ("c.gateway.public_url = %q")
                           :format(gw:url("")))
      local _, out, r = run({ "doctor", "--json", "--config", conf })
      local answered
      for _, x in ipairs(r) do
        if x.kind == "notify_url" and x.status == "ok" then answered = x end
      end
      assert.truthy(answered, out)         -- refused, as it should be
      proc.wait_until(function() return #lines() >= 1 end, 10,
                      "the gateway's refusal line")
      local rec = lines()[1]
      assert.equal("paygate doctor", rec.probe, json.encode(rec))
      assert.equal("info", rec.level)
      assert.equal("1900000001", rec.mchid)
      assert.is_string(rec.reason)
      -- (a capture is written before the answer: none)
      assert.equal(caps0, captures())
      -- the same body from another client: a refused notification as
      -- ever, recorded (and captured), no probe named
      local probe = '{"id":"paygate-doctor-probe","event_type":"DOCTOR.PROBE"}'
      local res = gw:request{ method = "POST", body = probe,
        path = "/wechatpay/notify/1900000001",
        headers = { ["content-type"] = "application/json" } }
      assert.equal(401, res.status)
      proc.wait_until(function() return refused_rows() == rows0 + 1 end, 10,
                      "the other client's refusal recorded")
      -- doctor's User-Agent on another body: the same
      res = gw:request{ method = "POST", body = '{"id":"x"}',
        path = "/wechatpay/notify/1900000001",
        headers = { ["content-type"] = "application/json",
                    ["user-agent"] = "paygate-doctor/0.1.0" } }
      assert.equal(401, res.status)
      proc.wait_until(function() return refused_rows() == rows0 + 2 end, 10,
                      "the other body's refusal recorded")
      local l = lines()
      assert.equal(3, #l)
      assert.is_nil(l[2].probe)
      assert.is_nil(l[3].probe)
      assert.equal("warn", l[3].level)
      -- (the rows counted exactly: doctor's probe added none)
      assert.equal(rows0 + 2, refused_rows())
    end)
    db:close()
    gw:stop()
    assert(ok, err)
  end)

  it("refuses --merchant for a merchant it does not list, and for a"
     .. " config of its own shape", function()
    local conf = dir .. "/dev/gateway.lua"
    local code, out = run({ "doctor", "--config", conf, "--merchant", "42" })
    assert.equal(2, code, out)
    assert.matches("no merchant 42", out, 1, true)
    local own = dir .. "/own.lua"
    local f = assert(io.open(own, "w"))
    f:write("return { wechatpay = { mchid = '1900000001' } }\n")
    f:close()
    code, out = run({ "doctor", "--config", own, "--merchant", "1" })
    assert.equal(2, code, out)
    assert.matches("--merchant is for the gateway's config", out, 1, true)
  end)

  it("--merchant naming a sub-merchant of a service provider: says the "
     .. "provider is the one to check", function()
    -- the dev merchant as a service provider: its sub-merchants are named
    -- by each payment, never listed in the config
    local conf = variant("partner", [[
      local m = c.merchants[1]
      m.sp_mchid, m.mchid = m.mchid, nil
      m.sp_appid, m.appid = m.appid, nil]])
    local code, out = run({ "doctor", "--config", conf, "--merchant",
                            "1900000109" })
    assert.equal(2, code, out)
    assert.matches("no merchant 1900000109 in the gateway config", out, 1,
                   true)
    assert.matches("service provider", out, 1, true)
    assert.matches("sub-merchants are not listed in the config", out, 1,
                   true)
    assert.matches("--merchant " .. assert(out:match("sp_mchid (%d+)")),
                   out, 1, true)
  end)
end)
