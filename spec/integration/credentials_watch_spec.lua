-- paygate.credentials against a real etcd (TLS + auth): a change whose
-- read fails after its watch event is still applied; the watch resumes
-- after an etcd restart; no socket leaks per reconnect or start/stop; a
-- cache write that fails keeps the previous cache. (Cases 1 and the last
-- failed before their fixes.)
local crypto = require "paygate.crypto"
local etcd = require "paygate.etcd"
local credentials = require "paygate.credentials"
local etcdsrv = require "support.etcd"
local servers = require "support.servers"
local credsets = require "support.credsets"
local core = require "paygate.core"

local MCHID = credsets.MCHID
local APIV3, APIV3_B = credsets.APIV3, credsets.APIV3_B
local sh, write, read = credsets.sh, credsets.write, credsets.read
local set_dir = credsets.set_dir

describe("watched credentials", function()
  if not etcdsrv.available() then pending("no etcd") return end
  local creds, c, dir, env

  setup(function()
    creds = credsets.start()
    c, dir, env = creds.c, creds.dir, creds.env
  end)
  teardown(function()
    require("paygate.testing").stop_all()
    etcdsrv.stop_all()
  end)

  -- set A published; a source with its cache in `cache` loads it, binds a
  -- client and watches
  local function watching(cache)
    local code, out = creds:publish(env.a)
    assert.equal(0, code, out)
    local src = creds:source(cache)
    assert(src:load(MCHID))
    local wx = creds:client_for(src)
    src:start()
    return src, wx
  end

  -- set B published; then pcall of waiting `secs` for wx to sign with it
  local function swap_to_b(wx, secs, what)
    local code, out = creds:publish(env.b)
    assert.equal(0, code, out)
    return pcall(servers.wait_for, function()
      return wx.conf.signer.serial == "BBBB02"
    end, secs, what)
  end

  -- waits until src's watch has connected
  local function wait_watching(src, what)
    servers.wait_for(function() return src.sets[MCHID].watch ~= nil
      and src.sets[MCHID].watch.connects >= 1 end, 10, what)
  end

  it("a published change is applied even if the read after its watch "
     .. "event fails for a second (a transient etcd outage)", function()
    local src, wx = watching(dir .. "/cache_t1")
    -- range requests fail for one second from the first one after the
    -- publish (as during a leader election or a timed-out member); later
    -- ones work
    local real = src.cli.get_prefix
    local failed, until_t = 0, nil
    src.cli.get_prefix = function(self, ...)
      local now = core.update_time()
      until_t = until_t or now + 1
      if now < until_t then
        failed = failed + 1
        return nil, core.error("unavailable", "etcd: /v3/kv/range: "
                               .. "etcdserver: request timed out",
                               { retryable = true })
      end
      return real(self, ...)
    end
    local ok, err = swap_to_b(wx, 10, "the swap to BBBB02 after failed reads")
    src:stop(); wx:stop()
    assert.is_true(failed >= 1)
    assert(ok, tostring(err) .. " (still " .. wx.conf.signer.serial .. ")")
  end)
  it("a hook that raises refuses the set (the old one kept) and the watch"
     .. " goes on", function()
    local code, out = creds:publish(env.a)
    assert.equal(0, code, out)
    local src = creds:source(dir .. "/cache_raise")
    local raise = false
    src:on_change(MCHID, function()
      if raise then error("a hook's own bug") end
      return true
    end)
    assert(src:load(MCHID))
    local wx = creds:client_for(src)
    src:start()
    wait_watching(src, "the watch")
    local before = wx.conf.signer.serial
    raise = true
    code, out = creds:publish(env.b)
    assert.equal(0, code, out)
    local ok, err = pcall(servers.wait_for, function()
      return src.sets[MCHID].refused ~= nil
    end, 10, "the set the hook raised on refused")
    if ok then
      assert.equal(before, wx.conf.signer.serial)
      raise = false
      ok, err = swap_to_b(wx, 10, "the swap once the hook works again")
    end
    src:stop(); wx:stop()
    assert(ok, tostring(err))
  end)

  it("a hostile answer to the read after a change (a revision that is no"
     .. " number, a value that is no string) is refused as malformed; the"
     .. " watch lives on and takes the next good read", function()
    local http = require "paygate.http"
    local json = require "paygate.json"
    local src, wx = watching(dir .. "/cache_hostile")
    wait_watching(src, "the watch")
    -- the next range answers, each spoiled one way, then real ones
    local spoil = {
      function(kv) kv.mod_revision = "12abc" end,
      function(kv) kv.mod_revision = -5 end,
      function(kv) kv.mod_revision = 1e30 end,
      function(kv) kv.value = { "x" } end,
      function(kv) kv.key = true end,
    }
    local real, spoiled, errs = http.request, 0, {}
    http.request = function(o)
      local res, err = real(o)
      if res and o.url:find("/v3/kv/range", 1, true) and spoiled < #spoil then
        local doc = json.decode(res.body)
        if type(doc) == "table" and type(doc.kvs) == "table" and doc.kvs[1] then
          spoiled = spoiled + 1
          spoil[spoiled](doc.kvs[1])
          res.body = json.encode(doc)
        end
      end
      return res, err
    end
    -- the client itself: nil, err (malformed), never a raise or a kv
    -- with a revision it cannot compare
    local probe = etcd.new(c:client_opts())
    for i = 1, #spoil do
      local ok, res, err = pcall(probe.get_prefix, probe,
                                 credsets.PREFIX)
      errs[i] = { ok, res, err }
    end
    spoiled = 0
    -- five failed reads in a row: read again every 0.1 s (the pause
    -- doubles up to READ_PAUSE_MAX, 30 s, which credentials_refuse_spec
    -- covers), so that this stays about the answers, not the pause (1 s
    -- each was 5 s of pauses waited out)
    local pause_max = credentials.READ_PAUSE_MAX
    credentials.READ_PAUSE_MAX = 0.1
    local ok, err = swap_to_b(wx, 10, "the swap to BBBB02 after bad answers")
    credentials.READ_PAUSE_MAX = pause_max
    http.request = real
    src:stop(); wx:stop()
    for i, e in ipairs(errs) do
      assert(e[1], "get_prefix raised on spoil " .. i .. ": "
             .. tostring(e[2]))
      assert(e[2] == nil, "spoil " .. i .. " gave an answer")
      assert.equal("etcd", e[3].kind)
      assert.matches("malformed", e[3].message)
    end
    assert.equal(#spoil, spoiled)
    assert(ok, tostring(err) .. " (still " .. wx.conf.signer.serial .. ")")
  end)
  local function fds()
    local n = 0
    local p = io.popen("ls /proc/" .. core.pid() .. "/fd")
    for _ in p:lines() do n = n + 1 end
    p:close()
    return n
  end

  it("after an etcd restart (auth on: tokens gone) a running source "
     .. "applies the next publish", function()
    local src, wx = watching(dir .. "/cache_t2")
    wait_watching(src, "the watch")
    for _, m in ipairs(c.members) do m:stop() end
    for _, m in ipairs(c.members) do m:start() end
    for _, m in ipairs(c.members) do m:wait_ready(30) end
    local ok, err = swap_to_b(wx, 15, "the swap after the restart")
    src:stop(); wx:stop()
    assert(ok, tostring(err))
  end)

  it("a watch reconnecting every 0.1 s holds no more sockets", function()
    local wcli = etcd.new(c:client_opts())
    local w = wcli:watch("/review/leak/", { reconnect_after = 0.1 })
    local task = core.spawn(function() for _ in w do end end)
    servers.wait_for(function() return w.connects >= 3 end, 10, "3 connects")
    local before = fds()
    servers.wait_for(function() return w.connects >= 40 end, 30, "40 connects")
    local after = fds()
    w:close(); pcall(task.cancel, task)
    assert.is_true(after <= before + 2, before .. " -> " .. after)
  end)
  it("starting and stopping a source leaves no socket open", function()
    local code, out = creds:publish(env.a)
    assert.equal(0, code, out)
    local function cycle(i)
      local src = creds:source(dir .. "/cache_t6")
      assert(src:load(MCHID))
      src:start()
      wait_watching(src, "the watch " .. i)
      src:stop()
    end
    cycle(0)
    local before = fds()
    for i = 1, 10 do cycle(i) end
    local after = fds()
    assert.is_true(after <= before + 2, before .. " -> " .. after)
  end)

  it("an APIv3 key rotation published with previous_apiv3_key: a worker"
     .. " started after the swap still opens what was sealed under the old"
     .. " key", function()
    local resource = require "paygate.wechatpay.resource"
    local code, out = creds:publish(env.a)          -- APIV3
    assert.equal(0, code, out)
    -- the rotation: the new key, and the old one beside it
    local d = set_dir(dir, "set_b_prev", "b", "b", APIV3_B)
    write(d .. "/previous_apiv3_key", APIV3)
    code, out = creds:publish(d)
    assert.equal(0, code, out)
    -- a notification WeChat sealed under the old key, still in flight
    local nonce = "0123456789ab"
    local ct = assert(crypto.aead_encrypt("AEAD_AES_256_GCM", APIV3, nonce,
                                          "transaction", '{"ok":1}'))
    local r = { algorithm = "AEAD_AES_256_GCM", nonce = nonce,
                associated_data = "transaction",
                ciphertext = crypto.base64_encode(ct) }
    -- a worker (re)started now: it never saw the old set
    local src = creds:source(dir .. "/cache_prev")
    assert(src:load(MCHID))
    local wx = creds:client_for(src)
    assert.equal("BBBB02", wx.conf.signer.serial)
    assert.equal(APIV3_B, wx.conf.apiv3_keys[1])
    local plain, err = resource.decrypt(r, wx.conf.apiv3_keys)
    wx:stop()
    assert.equal('{"ok":1}', plain, tostring(err))
    -- a previous key of the wrong length is refused at publish
    write(d .. "/previous_apiv3_key", APIV3 .. "\n")
    code, out = creds:publish(d)
    assert.equal(1, code, out)
    assert.matches("previous_apiv3_key", out)
  end)

  it("a set refused only because its certificate starts soon (a clock a"
     .. " little behind) is taken once valid, with no new publish",
     function()
    local src, wx = watching(dir .. "/cache_soon")
    -- B's certificate, as this worker's clock sees it, starts in 1.5 s
    local real = credentials.validate
    local from = core.time() + 1.5
    credentials.validate = function(files, kind, now)
      local set, err = real(files, kind, now)
      if set and set.serial == "BBBB02" and core.time() < from then
        return nil, core.error("invalid_credentials", "credentials: the"
          .. " certificate (serial BBBB02) is not valid yet",
          { valid_from = from })
      end
      return set, err
    end
    local ok, err = swap_to_b(wx, 10, "the swap once the certificate is valid")
    credentials.validate = real
    local refused = src.refusals or 0
    src:stop()
    wx:stop()
    assert(ok, tostring(err))
    assert.truthy(refused >= 1)             -- refused first, then taken
  end)

  it("a lagging worker's older set does not replace a newer cache (a"
     .. " later start with etcd down loads the newest)", function()
    local json = require "paygate.json"
    local cache = dir .. "/cache_lag"
    local file = cache .. "/" .. MCHID .. ".json"
    local function cached_rev()
      return json.decode(read(file)).revision
    end
    -- the draining worker: loads A, then lags behind two publishes
    local code, out = creds:publish(env.a)
    assert.equal(0, code, out)
    local old = creds:source(cache)
    assert(old:load(MCHID))
    code, out = creds:publish(env.b)            -- B, the lagging read's
    assert.equal(0, code, out)
    local at_b = assert(creds.cli:get_prefix(credsets.PREFIX))
    code, out = creds:publish(env.a)            -- A again: the newest
    assert.equal(0, code, out)
    -- a worker of the new generation takes the newest and caches it
    local new = creds:source(cache)
    local newest = assert(new:load(MCHID)).revision
    assert.equal(newest, cached_rev())
    -- the old worker's read answers only now, with B (lag made
    -- deterministic: its reads return the answer etcd gave at B)
    old.cli.get_prefix = function() return at_b end
    old:start()
    local ok, err = pcall(servers.wait_for, function()
      return old:current(MCHID).serial == "BBBB02"
    end, 10, "the lagging worker to apply B")
    old:stop()
    assert(ok, tostring(err))
    assert.equal(newest, cached_rev())
    -- etcd down: a worker started now serves the newest set (A)
    for _, m in ipairs(c.members) do m:stop() end
    local later = creds:source(cache, { load_timeout = 1 })
    local set, lerr = later:load(MCHID)
    for _, m in ipairs(c.members) do m:start() end
    for _, m in ipairs(c.members) do m:wait_ready(30) end
    assert(set, tostring(lerr))
    assert.equal("AAAA01", set.serial)
    assert.equal(newest, set.revision)
  end)

  it("a start with several sets and a hung etcd waits load_timeout once,"
     .. " not once per set, and serves each cached set", function()
    local P2 = "/paygate/merchants/1900000002/"
    local code, out = creds:publish(env.a)
    assert.equal(0, code, out)
    code, out = creds:publish(env.b, nil, P2)
    assert.equal(0, code, out)
    local cache = dir .. "/cache_hung"
    local sets = { [MCHID] = credsets.PREFIX, ["1900000002"] = P2 }
    local first = creds:source(cache, { merchants = sets })
    assert(first:load(MCHID))
    assert(first:load("1900000002"))
    -- the member hung (SIGSTOP): connections are taken, never answered
    local m = c.members[1]
    m.proc:kill(19)
    local src = creds:source(cache, { merchants = sets, load_timeout = 2 })
    local t0 = core.mono()
    local a, aerr = src:load(MCHID)
    local b, berr = src:load("1900000002")
    local took = core.mono() - t0
    m.proc:kill(18)
    -- the member answers again: the watches take over from the cache
    src:start()
    local ok, err = pcall(servers.wait_for, function()
      return src.sets[MCHID].watch ~= nil
        and src.sets[MCHID].watch.connects >= 1
    end, 15, "the watch once the member answers")
    src:stop()
    assert(a, tostring(aerr))
    assert(b, tostring(berr))
    assert.equal("AAAA01", a.serial)
    assert.equal("BBBB02", b.serial)
    assert(took < 3.5, ("two loads took %.1f s (load_timeout 2)"):format(took))
    assert(ok, tostring(err))
    assert(creds.cli:delete(P2, { prefix = true }))
  end)

  it("a cache write that fails (disk full) keeps the previous cache",
     function()
    local mnt = dir .. "/tinyfs"
    sh("mkdir -p " .. mnt)
    if not servers.sh("mount -t tmpfs -o size=64k tmpfs " .. mnt
                      .. " >/dev/null 2>&1") then
      pending("cannot mount a tmpfs here")
      return
    end
    local ok, err = pcall(function()
      local code, out = creds:publish(env.a)
      assert.equal(0, code, out)
      local src = creds:source(mnt .. "/cache")
      local wx
      assert(src:load(MCHID))
      local good = read(mnt .. "/cache/" .. MCHID .. ".json")
      wx = creds:client_for(src)
      src:start()
      -- the disk fills up
      servers.sh("dd if=/dev/zero of=" .. mnt .. "/fill bs=1k >/dev/null 2>&1")
      code, out = creds:publish(env.b)
      assert.equal(0, code, out)
      servers.wait_for(function() return wx.conf.signer.serial == "BBBB02" end,
                       10, "the swap")
      src:stop(); wx:stop()
      sh("rm -f " .. mnt .. "/fill")
      local now = read(mnt .. "/cache/" .. MCHID .. ".json")
      assert.truthy(#now > 0 and (now == good or now:find("BBBB", 1, true)
                    or now:find("revision", 1, true)),
                    "the cache is now " .. #now .. " bytes (was " .. #good
                    .. ")")
      -- etcd down: a restarted worker must still find a cached set
      for _, m in ipairs(c.members) do m:stop() end
      local src3 = creds:source(mnt .. "/cache", { load_timeout = 1 })
      local set, lerr = src3:load(MCHID)
      for _, m in ipairs(c.members) do m:start() end
      for _, m in ipairs(c.members) do m:wait_ready(30) end
      assert(set, tostring(lerr))
    end)
    servers.sh("umount " .. mnt)
    assert(ok, tostring(err))
  end)
end)
