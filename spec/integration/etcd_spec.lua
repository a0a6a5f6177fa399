-- paygate.etcd against a real etcd member on loopback (spec/support/etcd).
local paygate = require "paygate"
local core = require "paygate.core"
local etcd = require "paygate.etcd"
local etcdsrv = require "support.etcd"
local servers = require "support.servers"

local function wait_for(check, secs, what)
  return servers.wait_for(check, secs, what)
end

describe("paygate.etcd", function()
  if not etcdsrv.available() then
    pending("etcd is not installed (scripts/deps installs etcd-server)")
    return
  end

  local srv, cli

  setup(function()
    -- progress notifications every 200 ms (etcd's default is 10 min):
    -- the watches below see them, and one relies on them
    srv = etcdsrv.start{ progress_notify = "200ms" }
    cli = etcd.new(srv:client_opts())
  end)
  teardown(function() etcdsrv.stop_all() end)

  describe("etcd.new", function()
    it("raises on misuse", function()
      assert.has_error(function() etcd.new() end)
      assert.has_error(function() etcd.new{ endpoints = {} } end)
      assert.has_error(function() etcd.new{ endpoints = { "ftp://x" } } end)
      assert.has_error(function()
        etcd.new{ endpoints = { "http://127.0.0.1:1" }, user = "u" } end)
      assert.has_error(function()
        etcd.new{ endpoints = { "http://127.0.0.1:1" }, timeout = 0 } end)
      -- a password in the URL would go into every error naming the
      -- endpoint: refused, without repeating it
      local ok, err = pcall(etcd.new, { endpoints = {
        "https://paygate:s3cret@127.0.0.1:2379" } })
      assert.is_false(ok)
      assert.is_nil(tostring(err):find("s3cret", 1, true), err)
    end)

    it("reports an endpoint that is down as connect, then tries the next",
       function()
      local down = "http://127.0.0.1:" .. core.free_port()
      local c1 = etcd.new{ endpoints = { down }, timeout = 2 }
      local res, err = c1:get("/x")
      assert.is_nil(res)
      assert.equal("connect", err.kind)
      assert.is_true(core.is_error(err))
      local c2 = etcd.new{ endpoints = { down, srv.endpoints[1] } }
      assert.truthy(c2:put("/spec/next", "ok"))
      assert.equal("ok", c2:get("/spec/next").value)
      assert.equal(2, c2.ep)          -- remembers the one that answered
    end)
  end)

  describe("revisions", function()
    it("steps and compares 64-bit decimal strings exactly", function()
      assert.equal("10", etcd.rev_next("9"))
      assert.equal("9223372036854775807",
                   etcd.rev_next("9223372036854775806"))
      assert.equal("9007199254740993", etcd.rev_next("9007199254740992"))
      assert.equal(-1, etcd.rev_cmp("9", "10"))
      assert.equal(1, etcd.rev_cmp("9007199254740993", "9007199254740992"))
      assert.equal(0, etcd.rev_cmp("42", "42"))
      assert.equal("/a0", etcd.prefix_end("/a/"))
    end)
  end)

  describe("kv", function()
    it("puts and gets a key, revisions as strings", function()
      local r = assert(cli:put("/spec/kv/a", "one"))
      assert.is_string(r.revision)
      local kv = assert(cli:get("/spec/kv/a"))
      assert.equal("one", kv.value)
      assert.equal("/spec/kv/a", kv.key)
      assert.equal(r.revision, kv.mod_revision)
      assert.is_string(kv.revision)
      local r2 = assert(cli:put("/spec/kv/a", "two"))
      assert.equal(1, etcd.rev_cmp(r2.revision, r.revision))
    end)

    it("returns nil for an absent key and keeps binary and empty values",
       function()
      local v, err = cli:get("/spec/kv/absent")
      assert.is_nil(v)
      assert.is_nil(err)
      local bin = "\0\1\255 binary\n"
      assert(cli:put("/spec/kv/bin", bin))
      assert.equal(bin, cli:get("/spec/kv/bin").value)
      assert(cli:put("/spec/kv/empty", ""))
      assert.equal("", cli:get("/spec/kv/empty").value)
    end)

    it("reads a prefix, sorted, and not its neighbours", function()
      assert(cli:put("/spec/p/b", "2"))
      assert(cli:put("/spec/p/a", "1"))
      assert(cli:put("/spec/p/c/d", "3"))
      assert(cli:put("/spec/p0", "outside"))
      assert(cli:put("/spec/o", "outside"))
      local res = assert(cli:get_prefix("/spec/p/"))
      assert.equal(3, #res.kvs)
      assert.same({ "/spec/p/a", "/spec/p/b", "/spec/p/c/d" },
        { res.kvs[1].key, res.kvs[2].key, res.kvs[3].key })
      assert.equal("3", res.kvs[3].value)
      assert.is_string(res.revision)
      assert.same({}, assert(cli:get_prefix("/spec/none/")).kvs)
    end)

    it("deletes a key and a prefix", function()
      assert(cli:put("/spec/d/1", "x"))
      assert(cli:put("/spec/d/2", "x"))
      assert.equal(1, assert(cli:delete("/spec/d/1")).deleted)
      assert.equal(0, assert(cli:delete("/spec/d/1")).deleted)
      assert.is_nil(cli:get("/spec/d/1"))
      assert(cli:put("/spec/d/3", "x"))
      assert.equal(2, assert(cli:delete("/spec/d/", { prefix = true })).deleted)
      assert.same({}, assert(cli:get_prefix("/spec/d/")).kvs)
    end)

    it("compares and swaps on the mod revision", function()
      assert.is_true(assert(cli:cas("/spec/cas", "0", "first")))
      assert.is_false(cli:cas("/spec/cas", "0", "again"))
      local kv = cli:get("/spec/cas")
      assert.equal("first", kv.value)
      assert.is_true(cli:cas("/spec/cas", kv.mod_revision, "second"))
      assert.is_false(cli:cas("/spec/cas", kv.mod_revision, "third"))
      assert.equal("second", cli:get("/spec/cas").value)
      -- two racers on one revision: exactly one wins
      kv = cli:get("/spec/cas")
      local wins = 0
      local tasks = {}
      for i = 1, 5 do
        tasks[i] = paygate.spawn(function()
          if cli:cas("/spec/cas", kv.mod_revision, "racer" .. i) then
            wins = wins + 1
          end
        end)
      end
      for _, t in ipairs(tasks) do t:wait(10) end
      assert.equal(1, wins)
    end)

    it("runs a transaction all or nothing", function()
      local r = assert(cli:txn{
        compare = { { key = "/spec/tx/guard", mod_revision = "0" } },
        success = { { put = "/spec/tx/a", value = "A" },
                    { put = "/spec/tx/b", value = "B" },
                    { put = "/spec/tx/guard", value = "g" } } })
      assert.is_true(r.succeeded)
      local a, b = cli:get("/spec/tx/a"), cli:get("/spec/tx/b")
      assert.equal(a.mod_revision, b.mod_revision)   -- one revision
      r = assert(cli:txn{
        compare = { { key = "/spec/tx/guard", mod_revision = "0" } },
        success = { { put = "/spec/tx/a", value = "X" } },
        failure = { { delete = "/spec/tx/b" } } })
      assert.is_false(r.succeeded)
      assert.equal("A", cli:get("/spec/tx/a").value)
      assert.is_nil(cli:get("/spec/tx/b"))
      -- each operation's answer, in order: a get's kv (it was dropped)
      assert(cli:put("/spec/tx/d", "D"))
      r = assert(cli:txn{
        compare = { { key = "/spec/tx/guard", value = "g" } },
        success = { { get = "/spec/tx/a" }, { get = "/spec/tx/none" },
                    { put = "/spec/tx/c", value = "C" },
                    { delete = "/spec/tx/d" } } })
      assert.is_true(r.succeeded)
      assert.equal(4, #r.responses)
      assert.equal("A", r.responses[1].kv.value)
      assert.equal("/spec/tx/a", r.responses[1].kv.key)
      assert.equal(r.revision, r.responses[1].kv.revision)
      assert.is_nil(r.responses[2].kv)
      assert.same({}, r.responses[3])
      assert.equal(1, r.responses[4].deleted)
      r = assert(cli:txn{
        compare = { { key = "/spec/tx/guard", value = "other" } },
        success = { { put = "/spec/tx/a", value = "Y" } },
        failure = { { get = "/spec/tx/guard" } } })
      assert.is_false(r.succeeded)
      assert.equal("g", r.responses[1].kv.value)
      -- nothing under a prefix written since a read: a key put or created
      -- there later fails it; an empty prefix holds
      local seen = assert(cli:get_prefix("/spec/tx/")).revision
      local function since(rev, key)
        return assert(cli:txn{ compare = { { key = key or "/spec/tx/",
          prefix = true, max_mod_revision = rev } },
          success = { { get = "/spec/tx/a" } } }).succeeded
      end
      assert.is_true(since(seen))
      assert.is_true(since(seen, "/spec/tx-none/"))
      assert(cli:put("/spec/tx/new", "N"))
      assert.is_false(since(seen))
      seen = assert(cli:get_prefix("/spec/tx/")).revision
      assert.is_true(since(seen))
      assert(cli:put("/spec/tx/a", "Z"))
      assert.is_false(since(seen))
    end)

    it("raises on misuse", function()
      assert.has_error(function() cli:get(1) end)
      assert.has_error(function() cli:put("/k", 1) end)
      assert.has_error(function() cli:cas("/k", 1.5, "v") end)
      assert.has_error(function() cli:cas("/k", "abc", "v") end)
      assert.has_error(function() cli:grant(0) end)
    end)
  end)

  describe("leases", function()
    it("grants with a string id, keeps alive, and expires", function()
      local lease = assert(cli:grant(2))
      assert.is_string(lease.id)
      assert.matches("^%d+$", lease.id)
      assert.is_true(lease.ttl >= 2)
      assert(cli:put("/spec/lease/k", "v", { lease = lease.id }))
      assert.equal(lease.id, cli:get("/spec/lease/k").lease)
      local ka = assert(cli:keepalive(lease.id))
      assert.equal(lease.id, ka.id)
      assert.is_true(ka.ttl >= 1)
      -- no more keep-alives: the key goes with the lease
      wait_for(function() return cli:get("/spec/lease/k") == nil end, 15,
               "the leased key to expire")
      local none, err = cli:keepalive(lease.id)
      assert.is_nil(none)
      assert.equal("not_found", err.kind)
    end)

    it("a kept-alive lease outlives its ttl", function()
      local lease = assert(cli:grant(2))
      assert(cli:put("/spec/lease/kept", "v", { lease = lease.id }))
      local task = cli:keep_alive_every(lease.id, 0.5)
      local t0 = paygate.update_time()
      while paygate.update_time() - t0 < 4 do
        assert.truthy(cli:get("/spec/lease/kept"))
        paygate.sleep(0.25)
      end
      task:cancel()
      assert(cli:revoke(lease.id))
      assert.is_nil(cli:get("/spec/lease/kept"))
    end)
  end)

  describe("watch", function()
    it("delivers puts and deletes of a prefix in order, from a revision",
       function()
      local first = assert(cli:put("/spec/w1/a", "1")).revision
      assert(cli:put("/spec/w1/b", "2"))
      assert(cli:put("/spec/other", "x"))
      assert(cli:delete("/spec/w1/a"))
      local w = cli:watch("/spec/w1/", { from_revision = first })
      local got = {}
      for ev, err in w do
        assert.is_nil(err)
        got[#got + 1] = ev
        if #got == 3 then break end
      end
      w:close()
      assert.equal("put", got[1].type)
      assert.equal("/spec/w1/a", got[1].key)
      assert.equal("1", got[1].value)
      assert.equal(first, got[1].revision)
      assert.equal("/spec/w1/b", got[2].key)
      assert.equal("delete", got[3].type)
      assert.equal("/spec/w1/a", got[3].key)
      assert.equal(-1, etcd.rev_cmp(got[1].revision, got[2].revision))
    end)

    it("sees changes made after it starts", function()
      local got = {}
      local task = paygate.spawn(function()
        local w = cli:watch("/spec/w2/")
        for ev in w do
          got[#got + 1] = ev.value
          if #got == 5 then break end
        end
        w:close()
      end)
      -- the watch is created once its first read went out; keep writing
      -- until all five arrive (an early write before creation is missed
      -- by design: no from_revision)
      local i = 0
      wait_for(function()
        if #got == 0 then
          i = i + 1
          assert(cli:put("/spec/w2/k", "v" .. i))
          return false
        end
        return true
      end, 10, "the first event")
      local base = i
      for j = 1, 4 do assert(cli:put("/spec/w2/k", "v" .. (base + j))) end
      wait_for(function() return #got == 5 end, 10, "five events")
      task:wait(5)
      for j = 2, 5 do
        assert.equal("v" .. (tonumber(got[1]:sub(2)) + j - 1), got[j])
      end
    end)

    it("reports compacted so the caller reloads", function()
      local r1 = assert(cli:put("/spec/w3/a", "1")).revision
      assert(cli:put("/spec/w3/a", "2"))
      local r3 = assert(cli:put("/spec/w3/a", "3")).revision
      srv:compact(r3)
      local w = cli:watch("/spec/w3/", { from_revision = r1 })
      local ev, err = w()
      assert.is_nil(ev)
      assert.equal("compacted", err.kind)
      assert.equal(r3, err.compact_revision)
      w:close()
      -- a range read at the compacted revision says the same
      local res
      res, err = cli:get_prefix("/spec/w3/", { revision = r1 })
      assert.is_nil(res)
      assert.equal("compacted", err.kind)
    end)

    it("resumes after the member restarts without missing an event",
       function()
      local m = srv.members[1]
      local got, errs = {}, {}
      local from = assert(cli:put("/spec/w4/start", "0")).revision
      local w = cli:watch("/spec/w4/", { from_revision = from })
      local task = paygate.spawn(function()
        for ev, err in w do
          if err then errs[#errs + 1] = err break end
          got[#got + 1] = ev
          if ev.key == "/spec/w4/end" then break end
        end
      end)
      wait_for(function() return #got >= 1 end, 10, "the first event")
      for i = 1, 5 do assert(cli:put("/spec/w4/k", "before" .. i)) end
      wait_for(function() return #got >= 6 end, 10, "six events")
      m:kill()
      m:start()
      m:wait_ready(30)
      for i = 1, 5 do assert(cli:put("/spec/w4/k", "after" .. i)) end
      assert(cli:put("/spec/w4/end", "x"))
      wait_for(function()
        return #errs > 0 or (got[#got] and got[#got].key == "/spec/w4/end")
      end, 30, "the last event")
      task:wait(5)
      w:close()
      assert.same({}, errs)
      assert.equal(12, #got)
      for i = 2, #got do
        assert.equal(-1, etcd.rev_cmp(got[i - 1].revision, got[i].revision))
      end
      assert.equal("after5", got[11].value)
      assert.is_true(w.connects >= 2, "reconnected: " .. w.connects)
    end)

    it("a quiet watch resumes after a compaction of what it skipped"
       .. " (progress notifications move its resume revision)", function()
      local m = srv.members[1]
      local got, errs = {}, {}
      local from = assert(cli:put("/spec/w6/start", "0")).revision
      local w = cli:watch("/spec/w6/", { from_revision = from })
      local task = paygate.spawn(function()
        for ev, err in w do
          if err then errs[#errs + 1] = err break end
          got[#got + 1] = ev
          if ev.key == "/spec/w6/end" then break end
        end
      end)
      wait_for(function() return #got == 1 end, 10, "the first event")
      -- the store moves on elsewhere; this watch sees nothing
      local now
      for i = 1, 5 do
        now = assert(cli:put("/spec/not-w6", tostring(i))).revision
      end
      wait_for(function() return etcd.rev_cmp(w.next_rev, now) > 0 end, 10,
               "a progress notification past revision " .. now)
      srv:compact(now)              -- from + 1 .. now are gone
      m:kill()                      -- the stream must be opened anew
      m:start()
      m:wait_ready(30)
      assert(cli:put("/spec/w6/end", "x"))
      wait_for(function()
        return #errs > 0 or (got[#got] and got[#got].key == "/spec/w6/end")
      end, 30, "the event after the compaction")
      task:wait(5)
      w:close()
      assert.same({}, errs)
      assert.equal(2, #got)
      assert.is_true(w.connects >= 2, "reconnected: " .. w.connects)
    end)

    it("watches one key with key = true, not its prefix", function()
      local r = assert(cli:put("/spec/w5", "1")).revision
      assert(cli:put("/spec/w5/under", "x"))
      assert(cli:put("/spec/w5x", "x"))
      assert(cli:put("/spec/w5", "2"))
      local w = cli:watch("/spec/w5", { key = true, from_revision = r })
      local a, b = assert(w()), assert(w())
      w:close()
      assert.same({ "/spec/w5", "1" }, { a.key, a.value })
      assert.same({ "/spec/w5", "2" }, { b.key, b.value })
      assert.is_nil(w())                  -- closed
    end)

    it("gives up after give_up_after when no endpoint answers", function()
      local c = etcd.new{ endpoints = { "http://127.0.0.1:"
                                        .. core.free_port() } }
      local t0 = paygate.update_time()
      local w = c:watch("/x/", { give_up_after = 0.5 })
      local ev, err = w()
      assert.is_nil(ev)
      assert.equal("unavailable", err.kind)
      assert.is_true(paygate.update_time() - t0 < 5)
    end)
  end)
end)

describe("paygate.etcd with TLS and auth", function()
  if not etcdsrv.available() then return end
  local srv

  setup(function() srv = etcdsrv.start{ tls = true, auth = true } end)
  teardown(function() etcdsrv.stop_all() end)

  it("works with client certificates and the root user", function()
    local cli = etcd.new(srv:client_opts())
    assert.is_true(cli:secure())
    assert(cli:put("/sec/a", "1"))
    assert.equal("1", cli:get("/sec/a").value)
    local w = cli:watch("/sec/", { from_revision = "1" })
    local ev = assert(w())
    assert.equal("/sec/a", ev.key)
    w:close()
  end)

  it("refuses a wrong password and a missing user with kind auth", function()
    local o = srv:client_opts()
    o.password = "wrong"
    local res, err = etcd.new(o):get("/sec/a")
    assert.is_nil(res)
    assert.equal("auth", err.kind)
    assert.not_matches("wrong", tostring(err))
    o.user, o.password = nil, nil
    local c = etcd.new(o)
    assert.is_false(c:secure())
    res, err = c:get("/sec/a")
    assert.is_nil(res)
    assert.equal("auth", err.kind)
    local ev
    ev, err = c:watch("/sec/")()
    assert.is_nil(ev)
    assert.equal("auth", err.kind)
  end)

  it("renews an invalidated token", function()
    local cli = etcd.new(srv:client_opts())
    assert(cli:get("/sec/a"))
    cli.tokens[cli.endpoints[1]] = "not-a-token.1"
    assert.equal("1", assert(cli:get("/sec/a")).value)
    -- a watch opened with a stale token renews it too
    cli.tokens[cli.endpoints[1]] = "not-a-token.2"
    local w = cli:watch("/sec/", { from_revision = "1" })
    local ev, err = w()
    w:close()
    assert.is_nil(err)
    assert.equal("/sec/a", ev.key)
  end)

  it("fails with tls without the client certificate", function()
    local o = srv:client_opts()
    o.client_cert, o.client_key = nil, nil
    local res, err = etcd.new(o):get("/sec/a")
    assert.is_nil(res)
    assert.truthy(err.kind == "tls" or err.kind == "closed"
                  or err.kind == "connect", err.kind)
  end)
end)
