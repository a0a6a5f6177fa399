-- paygate.credentials against a real etcd (TLS + auth): what a running
-- source says when the set in etcd changes in a way it cannot take. A
-- file deleted straight in etcd (not through `paygate etcd publish`) and
-- a set that cannot be read (values under the prefix too large for one
-- answer) or an etcd down for good each keep the set in use and are
-- named in a log line; failed reads are retried with a growing pause, not
-- twice a second forever; publish refuses a prefix holding a key that is
-- no file of the set. (Each failed before its fix: no log line, a read
-- every 0.5 s, a publish that said "published".)
local credentials = require "paygate.credentials"
local etcdsrv = require "support.etcd"
local servers = require "support.servers"
local credsets = require "support.credsets"
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local paygate = require "paygate"

local MCHID, PREFIX = credsets.MCHID, credsets.PREFIX

describe("watched credentials refusing a change", function()
  if not etcdsrv.available() then pending("no etcd") return end
  local creds, env, dir
  local warns = {}
  local real_warn

  setup(function()
    creds = credsets.start()
    env, dir = creds.env, creds.dir
    real_warn = paygate.log.warn
    paygate.log.warn = function(msg, fields)
      warns[#warns + 1] = { msg = msg, fields = fields or {} }
      return real_warn(msg, fields)
    end
  end)
  teardown(function()
    paygate.log.warn = real_warn
    require("paygate.testing").stop_all()
    etcdsrv.stop_all()
  end)

  -- the first warning logged from index i on whose message has text
  local function warned(i, text)
    for j = i, #warns do
      if warns[j].msg:find(text, 1, true) then return warns[j] end
    end
  end

  local function watching(cache)
    local code, out = creds:publish(env.a)
    assert.equal(0, code, out)
    local src = creds:source(dir .. "/" .. cache)
    assert(src:load(MCHID))
    local wx = creds:client_for(src)
    src:start()
    servers.wait_for(function() return src.sets[MCHID].watch ~= nil
      and src.sets[MCHID].watch.connects >= 1 end, 10, "the watch")
    return src, wx
  end

  it("publish refuses a prefix holding a key that is no file of the set"
     .. " (every worker would refuse the set) and writes nothing",
     function()
    local code, out = creds:publish(env.a)
    assert.equal(0, code, out)
    local before = assert(creds.cli:get_prefix(PREFIX))
    assert(creds.cli:put(PREFIX .. "apiclient_key.pem.bak", "old"))
    local stray = assert(creds.cli:get_prefix(PREFIX))
    code, out = creds:publish(env.b)
    local after = assert(creds.cli:get_prefix(PREFIX))
    assert(creds.cli:delete(PREFIX .. "apiclient_key.pem.bak"))
    assert.equal(1, code, out)
    assert.matches("apiclient_key.pem.bak", out, 1, true)
    assert.equal(stray.revision, after.revision)      -- nothing written
    assert.equal(#before.kvs + 1, #after.kvs)
    -- and once the key is gone, the same publish goes through
    code, out = creds:publish(env.b)
    assert.equal(0, code, out)
  end)

  it("etcd delete removes the stray key publish names, and only such a key"
     .. " under the prefix", function()
    local code, out = creds:publish(env.a)
    assert.equal(0, code, out)
    assert(creds.cli:put(PREFIX .. "apiclient_key.pem.bak", "old"))
    -- another merchant's set beside this prefix: never reached from it
    local OTHER = "/paygate/merchants/1900000002/"
    assert(creds.cli:put(OTHER .. "apiclient_key.pem.bak", "theirs"))
    local before = assert(creds.cli:get_prefix("/paygate/"))
    -- a file of the set, the prefix itself, a key outside it, or an
    -- option delete does not take: refused, exit 2, nothing deleted
    for _, c in ipairs({
      { PREFIX .. "apiclient_key.pem", "is a file of a merchant's set" },
      { PREFIX, "is not a key under --prefix " .. PREFIX },
      { OTHER .. "apiclient_key.pem.bak", "is not a key under --prefix" },
      { "/paygate/merchants/1900000001", "is not a key under --prefix" },
      { PREFIX .. "x", "delete takes no --kek-file",
        "--kek-file " .. creds.kek_file },
    }) do
      code, out = creds:delete(c[1], c[3])
      assert.equal(2, code, c[1] .. ": " .. out)
      assert.matches(c[2], out, 1, true)
    end
    local after = assert(creds.cli:get_prefix("/paygate/"))
    assert.equal(before.revision, after.revision)
    assert.equal(#before.kvs, #after.kvs)
    -- publish names the stray key; delete removes it, and it alone
    code, out = creds:publish(env.b)
    assert.equal(1, code, out)
    assert.matches(PREFIX .. "apiclient_key.pem.bak", out, 1, true)
    code, out = creds:delete(PREFIX .. "apiclient_key.pem.bak")
    assert.equal(0, code, out)
    assert.matches("^deleted " .. PREFIX .. "apiclient_key.pem.bak at "
                   .. "revision %d+\n$", out)
    assert.is_nil((creds.cli:get(PREFIX .. "apiclient_key.pem.bak")))
    assert.equal(3, #assert(creds.cli:get_prefix(PREFIX)).kvs)
    assert.equal("theirs",
      assert(creds.cli:get(OTHER .. "apiclient_key.pem.bak")).value)
    -- gone already: said, exit 1
    code, out = creds:delete(PREFIX .. "apiclient_key.pem.bak")
    assert.equal(1, code, out)
    assert.matches("no such key (nothing deleted)", out, 1, true)
    -- and the publish it stopped now goes through
    code, out = creds:publish(env.b)
    assert.equal(0, code, out)
    assert(creds.cli:delete(OTHER, { prefix = true }))
  end)

  it("publish refuses when the prefix changed between its read and its"
     .. " write (another operator's publish, a stray key): nothing written",
     function()
    local code, out = creds:publish(env.a)
    assert.equal(0, code, out)
    -- publish run here, a change made right after its read of the prefix
    local o = creds.c:client_opts()
    local meddle
    local Client = getmetatable(creds.cli)
    local real_get, real_getenv, real_stderr = Client.get_prefix, os.getenv,
                                                io.stderr
    local function publish_a()
      local errs = {}
      Client.get_prefix = function(self, ...)
        local res, err = real_get(self, ...)
        if meddle then meddle(); meddle = nil end
        return res, err
      end
      os.getenv = function(v)
        if v == "PAYGATE_SPEC_ETCD_PW" then return o.password end
        return real_getenv(v)
      end
      io.stderr = { write = function(_, ...)
        for _, x in ipairs({ ... }) do errs[#errs + 1] = x end
      end }
      local ok, c = pcall(assert(loadfile("lua/paygate/cli/etcd.lua")),
        "publish", "--prefix", PREFIX, "--dir", env.a, "--endpoints",
        table.concat(o.endpoints, ","), "--user", o.user, "--password-env",
        "PAYGATE_SPEC_ETCD_PW", "--ca-file", o.ca_file, "--cert",
        o.client_cert, "--key", o.client_key, "--kek-file", creds.kek_file,
        "--json")
      Client.get_prefix, os.getenv, io.stderr = real_get, real_getenv,
                                                real_stderr
      assert(ok, c)
      return c, table.concat(errs)
    end
    -- another operator publishes B meanwhile: B stays, A is not written
    local b_code, b_out
    meddle = function() b_code, b_out = creds:publish(env.b) end
    local a_code, a_out = publish_a()
    assert.equal(0, b_code, b_out)
    local after = assert(creds.cli:get_prefix(PREFIX))
    assert.equal(1, a_code, a_out)
    assert.matches(PREFIX .. " changed meanwhile", a_out, 1, true)
    assert.matches("nothing written; run again", a_out, 1, true)
    assert.equal(credsets.read(env.b .. "/apiclient_cert.pem"), assert(
      creds.cli:get(PREFIX .. "apiclient_cert.pem")).value)
    assert.equal(assert(creds.cli:get_prefix(PREFIX)).revision,
                 after.revision)
    -- a stray key put meanwhile: refused too (every worker would refuse)
    meddle = function()
      assert(creds.cli:put(PREFIX .. "apiclient_key.pem.bak", "old"))
    end
    a_code, a_out = publish_a()
    assert(creds.cli:delete(PREFIX .. "apiclient_key.pem.bak"))
    assert.equal(1, a_code, a_out)
    assert.matches("changed meanwhile", a_out, 1, true)
    -- run again, nothing in between: published
    a_code, a_out = publish_a()
    assert.equal(0, a_code, a_out)
    assert.equal(credsets.read(env.a .. "/apiclient_cert.pem"), assert(
      creds.cli:get(PREFIX .. "apiclient_cert.pem")).value)
  end)

  it("publish refuses a --dir that holds a file no set has, or is no"
     .. " folder, and writes nothing", function()
    local d = credsets.set_dir(dir, "set_odd", "a", "a", credsets.APIV3)
    credsets.write(d .. "/public_key_id.txt", "PUB_KEY_ID_01142320200101")
    local before = assert(creds.cli:get_prefix(PREFIX))
    local code, out = creds:publish(d)
    assert.equal(1, code, out)
    assert.matches("holds public_key_id.txt, which is no file of a"
                   .. " merchant's set", out, 1, true)
    code, out = creds:publish(dir .. "/no_such_dir")
    assert.equal(1, code, out)
    assert.matches("--dir [^ ]*no_such_dir: No such file or directory", out)
    assert.equal(before.revision,
                 assert(creds.cli:get_prefix(PREFIX)).revision)
  end)

  it("publish refuses a KEK other than the one the set in etcd is sealed"
     .. " under (every worker would refuse the new set) and writes nothing;"
     .. " --replace-kek ID seals it under the new one", function()
    local code, out = creds:publish(env.a)
    assert.equal(0, code, out)
    local rev = require("paygate.json").decode(out).revision
    local other = dir .. "/kek_publish_other"
    credsets.write(other, crypto.hex(crypto.random_bytes(32)) .. "\n")
    local ours = credentials.kek_id(assert(credentials.read_kek{
      kek_file = creds.kek_file }))
    local theirs = credentials.kek_id(assert(credentials.read_kek{
      kek_file = other }))
    local before = assert(creds.cli:get_prefix(PREFIX))
    -- the operator's KEK is not the gateways': said, nothing written
    code, out = creds:publish(env.b, "--kek-file " .. other)
    assert.equal(1, code, out)
    assert.matches(PREFIX .. " (revision " .. rev .. ") is"
      .. " sealed under the key-encryption key id " .. ours, out, 1, true)
    assert.matches("--kek-file's is id " .. theirs, out, 1, true)
    assert.matches("--replace-kek " .. ours, out, 1, true)
    assert.matches("nothing written", out, 1, true)
    assert.equal(before.revision,
                 assert(creds.cli:get_prefix(PREFIX)).revision)
    code, out = creds:show()
    assert.equal(0, code, out)
    assert.matches("valid: serial AAAA01", out, 1, true)
    -- what --replace-kek takes is a KEK id: anything else is a usage error
    for _, bad in ipairs({ "nothex", ours .. "0", "-" }) do
      code, out = creds:publish(env.b, "--kek-file " .. other
                                .. " --replace-kek '" .. bad .. "'")
      assert.equal(2, code, out)
      assert.matches("--replace-kek", out, 1, true)
    end
    -- a change of KEK names the id it replaces: published under the new
    code, out = creds:publish(env.b, "--kek-file " .. other
                              .. " --replace-kek " .. ours)
    assert.equal(0, code, out)
    code, out = creds:show(other)
    assert.equal(0, code, out)
    assert.matches("valid: serial BBBB02", out, 1, true)
    -- and back, the way a set published under a wrong KEK is put right
    code, out = creds:publish(env.a)
    assert.equal(1, code, out)
    assert.matches("sealed under the key-encryption key id " .. theirs, out,
                   1, true)
    code, out = creds:publish(env.a, "--replace-kek " .. theirs)
    assert.equal(0, code, out)
    code, out = creds:show()
    assert.equal(0, code, out)
    assert.matches("valid: serial AAAA01", out, 1, true)
    -- an envelope edited by hand to name an id no KEK has (not 16
    -- lower-case hex digits, which --replace-kek could not name either):
    -- a broken secret, which publish replaces, not a set to keep
    local pj = require "paygate.json"
    for _, bad in ipairs({ "abc", ("ABCDEF0123456789") }) do
      local kv
      for _, x in ipairs(assert(creds.cli:get_prefix(PREFIX)).kvs) do
        if x.key == PREFIX .. "apiclient_key.pem" then kv = x end
      end
      local e = assert(pj.decode(kv.value))
      e.kek = bad
      assert(creds.cli:put(kv.key, pj.encode(e)))
      code, out = creds:publish(env.a)
      assert.equal(0, code, bad .. ": " .. out)
    end
    code, out = creds:show()
    assert.equal(0, code, out)
    assert.matches("valid: serial AAAA01", out, 1, true)
  end)

  it("a file deleted straight in etcd is named in a warning; the set in"
     .. " use is kept and the next publish taken", function()
    local src, wx = watching("cache_del")
    local kept = src:current(MCHID).revision
    local n = #warns + 1
    local res = assert(creds.cli:delete(PREFIX .. "apiv3_key"))
    local ok, err = pcall(servers.wait_for, function()
      return warned(n, "deleted") ~= nil
    end, 10, "a warning naming the deleted file")
    local w = warned(n, "deleted")
    if ok then
      assert.equal(MCHID, w.fields.set)
      assert.equal("apiv3_key", w.fields.file)
      assert.equal(res.revision, w.fields.revision)
      assert.equal(kept, w.fields.kept)
      -- what the set left in etcd lacks, as a refusal would say it
      assert.matches("apiv3_key is missing", tostring(w.fields.reason))
      assert.equal(kept, src:current(MCHID).revision)
      assert.equal("AAAA01", wx.conf.signer.serial)
      local code, out = creds:publish(env.b)
      assert.equal(0, code, out)
      ok, err = pcall(servers.wait_for, function()
        return wx.conf.signer.serial == "BBBB02"
      end, 10, "the swap to B")
    end
    src:stop(); wx:stop()
    assert(ok, tostring(err))
  end)

  it("an etcd down for longer than WATCH_GIVE_UP is named in a warning;"
     .. " back up, the next publish is taken", function()
    local src, wx = watching("cache_down")
    local give_up = credentials.WATCH_GIVE_UP
    local n = #warns + 1
    -- (read when the next watch starts: this one runs with 60 s)
    credentials.WATCH_GIVE_UP = 1
    src.sets[MCHID].watch:close()
    for _, m in ipairs(creds.c.members) do m:stop() end
    local ok, err = pcall(servers.wait_for, function()
      return warned(n, "watch ended") ~= nil
    end, 20, "a warning that the watch ended")
    credentials.WATCH_GIVE_UP = give_up
    for _, m in ipairs(creds.c.members) do m:start() end
    for _, m in ipairs(creds.c.members) do m:wait_ready(30) end
    if ok then
      assert.matches("no endpoint answered", warned(n, "watch ended")
                     .fields.reason, 1, true)
      local code, out = creds:publish(env.b)
      assert.equal(0, code, out)
      ok, err = pcall(servers.wait_for, function()
        return wx.conf.signer.serial == "BBBB02"
      end, 40, "the swap to B once etcd is back")
    end
    src:stop(); wx:stop()
    assert(ok, tostring(err))
  end)

  it("a wrong etcd password is said as such, at start and by the watch,"
     .. " once: not 'etcd unavailable', not a line per retry", function()
    -- a cache written by a source with the right password
    local src0, wx0 = watching("cache_auth")
    src0:stop(); wx0:stop()
    local o = creds.c:client_opts()
    o.password = "not-" .. o.password
    -- no cache: the start fails, naming the credentials
    local src = creds:source(dir .. "/cache_auth_none", { etcd = o })
    local set, err = src:load(MCHID)
    src:stop()
    assert.is_nil(set)
    assert.matches("etcd refused the credentials", err.message, 1, true)
    assert.no_match("unavailable", err.message, 1, true)
    assert.no_match(o.password, err.message, 1, true)
    -- a cache: served, and the warning says why
    local n = #warns + 1
    src = creds:source(dir .. "/cache_auth", { etcd = o })
    assert(src:load(MCHID))
    local w = warned(n, "serving the cached set")
    assert.truthy(w, "no warning about the cached set")
    assert.matches("etcd refused the credentials", w.msg, 1, true)
    -- the watch: each attempt refused; the pauses (1 s, 2 s) pass
    local failed = 0
    local real = src.cli.get_prefix
    src.cli.get_prefix = function(...)
      local res, gerr = real(...)
      if not res then failed = failed + 1 end
      return res, gerr
    end
    src:start()
    local ok, werr = pcall(servers.wait_for, function()
      return failed >= 3
    end, 20, "three refused reads")
    src:stop()
    assert(ok, tostring(werr))
    local ended, unread = 0, 0
    for j = n, #warns do
      if warns[j].msg:find("watch ended", 1, true) then ended = ended + 1 end
      if warns[j].msg:find("cannot read", 1, true) then unread = unread + 1 end
    end
    -- the start's line said it: the same refusal adds no line
    assert.equal(0, ended)
    assert.equal(0, unread)
  end)

  it("a set too large to read is named in a warning, read again with a"
     .. " growing pause, and taken once it can be read", function()
    local src, wx = watching("cache_big")
    local reads, failed = 0, {}
    local real = src.cli.get_prefix
    src.cli.get_prefix = function(...)
      reads = reads + 1
      local res, err = real(...)
      if not res then failed[#failed + 1] = core.mono() end
      return res, err
    end
    local n = #warns + 1
    -- 14 values of 1.4 MB: more than one answer may hold (16 MiB)
    local big = ("x"):rep(1400000)
    for i = 1, 14 do
      assert(creds.cli:put(PREFIX .. "junk/" .. i, big))
    end
    local ok, err = pcall(servers.wait_for, function()
      return #failed >= 3
    end, 30, "three failed reads")
    local w = warned(n, "cannot read")
    local spread = ok and failed[3] - failed[1]
    -- the junk removed and a new set published: taken
    assert(creds.cli:delete(PREFIX .. "junk/", { prefix = true }))
    if ok then
      local code, out = creds:publish(env.b)
      assert.equal(0, code, out)
      ok, err = pcall(servers.wait_for, function()
        return wx.conf.signer.serial == "BBBB02"
      end, 30, "the swap to B once the set reads again")
    end
    src:stop(); wx:stop()
    assert(ok, tostring(err))
    assert.truthy(w, "no warning about the read")
    assert.equal(MCHID, w.fields.set)
    assert.matches("body_too_large", tostring(w.fields.reason))
    -- one warning for the same reason, not one per read
    local same = 0
    for j = n, #warns do
      if warns[j].msg:find("cannot read", 1, true) then same = same + 1 end
    end
    assert.equal(1, same)
    -- a pause of 1 s, then 2 s: not reads back to back every half second
    assert.is_true(spread >= 2.5, "3 failed reads within " .. spread .. " s")
  end)
end)
