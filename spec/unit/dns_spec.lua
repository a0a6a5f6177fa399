-- paygate.dns and the stores' name resolution, against a DNS responder
-- on loopback (spec/support/dnsserver.lua): answers on the loop, cached
-- for their TTL within [ttl_min, ttl_max], /etc/hosts first, every
-- address tried, failures of kind "dns".
local core = require "paygate.core"
local dns = require "paygate.dns"
local redis = require "paygate.redis"
local sql = require "paygate.sql"
local dnsserver = require "spec.support.dnsserver"
local servers = require "spec.support.servers"

local wait_for = servers.wait_for

local function hosts_has(name)
  local f = io.open("/etc/hosts")
  local text = f and f:read("*a") or ""
  if f then
    f:close()
  end
  for line in text:gmatch("[^\n]+") do
    line = line:gsub("#.*", "")
    if (" " .. line .. " "):find("%s" .. name:gsub("%.", "%%.") .. "%s") then
      return true
    end
  end
  return false
end

-- The zone; the last record is the one a spec changes.
local function zone(moving_to, rd_at)
  return {
    { "two.test", "A", 60, "127.0.0.2" },
    { "two.test", "A", 60, "127.0.0.1" },
    { "v6.test", "AAAA", 60, "::1" },
    { "short.test", "A", 1, "127.0.0.1" },
    { "zero.test", "A", 0, "127.0.0.1" },
    { "long.test", "A", 86400, "127.0.0.1" },
    { "slow.test", "A", 60, "127.0.0.1", delay = 2 },
    { "moving.test", "A", 2, moving_to or "127.0.0.1" },
    { "rd.test", "A", 1, rd_at or "127.0.0.1" },
  }
end

describe("paygate.dns", function()
  local d

  setup(function()
    d = dnsserver.start(zone())
    dns.configure({ resolver = d.addr, ttl_min = 1, ttl_max = 300,
                    timeout = 5 })
  end)

  teardown(function()
    dns.configure({ resolver = "", ttl_min = 1, ttl_max = 300 })
    d:stop()
    servers.stop_all()
  end)

  describe("configure", function()
    it("raises on a resolver that is not IP:PORT", function()
      for _, bad in ipairs({ "db.example:53", "127.0.0.1:0",
                             "127.0.0.1:x", ":53" }) do
        local ok, err = pcall(dns.configure, { resolver = bad })
        assert.is_false(ok, bad)
        assert.truthy(tostring(err):find("dns.configure: resolver must"
                                         .. " be", 1, true), err)
      end
    end)

    it("raises on an unknown option", function()
      local ok, err = pcall(dns.configure, { resolvr = "127.0.0.1:53" })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("unknown option opts.resolvr", 1,
                                       true), err)
    end)
  end)

  describe("resolve", function()
    it("fails with kind dns, retryable, for a name that does not exist",
       function()
      local a, err = dns.resolve("nx.test")
      assert.is_nil(a)
      assert.equal("dns", err.kind)
      assert.is_true(err.retryable)
      assert.truthy(tostring(err):find("nx.test", 1, true))
    end)

    it("returns every address, in the server's order", function()
      local a = assert(dns.resolve("two.test"))
      assert.same({ "127.0.0.2", "127.0.0.1" }, a)
      assert.same({ "::1" }, assert(dns.resolve("v6.test")))
    end)

    it("returns a numeric address as it is, with no query", function()
      assert.same({ "10.1.2.3" }, assert(dns.resolve("10.1.2.3")))
      assert.same({ "::1" }, assert(dns.resolve("::1")))
    end)

    it("answers from /etc/hosts before asking any server", function()
      if not hosts_has("localhost") then
        pending("/etc/hosts has no localhost")
        return
      end
      local before = d:queries("localhost")
      local a = assert(dns.resolve("localhost"))
      assert.truthy(a[1] == "127.0.0.1" or a[1] == "::1")
      assert.equal(before, d:queries("localhost"))
    end)

    it("clamps the TTL to ttl_min and ttl_max", function()
      dns.configure({ ttl_min = 3, ttl_max = 5 })
      local _, ttl = assert(dns.resolve("short.test"))
      assert.is_true(ttl > 2.5 and ttl <= 3, ttl)
      local _, ttl2 = assert(dns.resolve("long.test"))
      assert.is_true(ttl2 > 4.5 and ttl2 <= 5, ttl2)
      dns.configure({ ttl_min = 1, ttl_max = 300 })
    end)

    it("with ttl_min = 0, answers a TTL-0 record (cached for no time)",
       function()
      dns.configure({ ttl_min = 0 })
      local before = d:queries("zero.test")
      local a, ttl = dns.resolve("zero.test")
      assert.same({ "127.0.0.1" }, a, tostring(ttl))
      assert.equal(0, ttl)
      -- not cached: the next lookup asks again
      assert(dns.resolve("zero.test"))
      assert.is_true(d:queries("zero.test") > before + 2)
      dns.configure({ ttl_min = 1 })
    end)

    it("keeps an answer for its TTL, then asks again", function()
      assert.same({ "127.0.0.1" }, assert(dns.resolve("moving.test")))
      local asked = d:queries("moving.test")
      d:set(zone("127.0.0.9"))
      -- within the TTL: from the cache, no new question
      assert.same({ "127.0.0.1" }, assert(dns.resolve("moving.test")))
      assert.equal(asked, d:queries("moving.test"))
      -- once it expired: the new record
      wait_for(function()
        local a = dns.resolve("moving.test")
        return a and a[1] == "127.0.0.9"
      end, 10, "the changed record")
      assert.is_true(d:queries("moving.test") > asked)
    end)

    it("does not stop the loop while an answer takes 2 s, and asks once"
       .. " for concurrent lookups of one name", function()
      dns.flush()
      local before = d:queries("slow.test")
      local results, t0 = {}, core.mono()
      for i = 1, 3 do
        core.spawn(function()
          results[i] = { dns.resolve("slow.test") }
        end)
      end
      -- the loop keeps turning: 10 ms sleeps come back on time
      local worst, n = 0, 0
      while not results[3] do
        local s = core.mono()
        core.sleep(0.01)
        worst = math.max(worst, core.mono() - s - 0.01)
        n = n + 1
        assert.is_true(core.mono() - t0 < 10, "lookup never answered")
      end
      assert.is_true(core.mono() - t0 >= 1.9)
      assert.is_true(n > 50, n)
      assert.is_true(worst < 0.25, worst)
      for i = 1, 3 do
        assert.same({ "127.0.0.1" }, results[i][1])
      end
      -- one A and one AAAA question for the three lookups
      assert.equal(before + 2, d:queries("slow.test"))
    end)

    it("abandoning a lookup (task cancelled) leaves the others working",
       function()
      dns.flush()
      local task = core.spawn(function() dns.resolve("slow.test") end)
      local got
      core.spawn(function() got = { dns.resolve("slow.test") } end)
      core.sleep(0.1)
      task:cancel()
      wait_for(function() return got end, 10, "the second lookup")
      assert.same({ "127.0.0.1" }, got[1])
    end)
  end)

  describe("stores given a host name", function()
    it("PostgreSQL: tries every address, connects to the one that"
       .. " answers", function()
      if not servers.have_postgres() then
        pending("postgres not installed")
        return
      end
      local pg = servers.postgres_db()
      local db = assert(sql.open("postgres://postgres@two.test:" .. pg.port
                                 .. "/" .. pg.name))
      local rows = assert(db:query("SELECT inet_server_addr()::text AS a"))
      assert.equal("127.0.0.1/32", rows[1].a)
      db:close()
    end)

    it("PostgreSQL: several named hosts with target_session_attrs:"
       .. " connects to the writable one", function()
      if not servers.have_postgres() then
        pending("postgres not installed")
        return
      end
      -- ro is made read-only: a server of its own
      local ro, rw = servers.postgres(), servers.postgres_db()
      local admin = assert(sql.open(ro.url))
      assert(admin:exec("ALTER SYSTEM SET default_transaction_read_only"
                        .. " = on"))
      assert(admin:query("SELECT pg_reload_conf()"))
      admin:close()
      wait_for(function()
        local h = sql.open(ro.url)
        local rows = h and h:query("SHOW transaction_read_only")
        if h then
          h:close()
        end
        return rows and rows[1].transaction_read_only == "on"
      end, 10, "the first server to be read-only")
      -- two.test: 127.0.0.2 (nothing listens), then 127.0.0.1
      local db = assert(sql.open("postgres://postgres@two.test:" .. ro.port
                                 .. ",long.test:" .. rw.port .. "/postgres"
                                 .. "?target_session_attrs=read-write"))
      local rows = assert(db:query("SELECT inet_server_port() AS p"))
      assert.equal(rw.port, rows[1].p)
      db:close()
    end)

    it("PostgreSQL: a name that does not resolve fails with kind dns",
       function()
      if not servers.have_postgres() then
        pending("postgres not installed")
        return
      end
      local db, err = sql.open("postgres://postgres@nx.test:5432/postgres")
      assert.is_nil(db)
      assert.equal("dns", err.kind)
      assert.is_true(err.retryable)
      assert.truthy(tostring(err):find("nx.test", 1, true), tostring(err))
    end)

    it("PostgreSQL: a slow answer does not stop the loop", function()
      if not servers.have_postgres() then
        pending("postgres not installed")
        return
      end
      local pg = servers.postgres_db()
      dns.flush()
      local db, t0 = nil, core.mono()
      core.spawn(function()
        db = assert(sql.open("postgres://postgres@slow.test:" .. pg.port
                             .. "/" .. pg.name, { connect_timeout = 5 }))
      end)
      local worst = 0
      while not db do
        local s = core.mono()
        core.sleep(0.01)
        worst = math.max(worst, core.mono() - s - 0.01)
        assert.is_true(core.mono() - t0 < 10, "never connected")
      end
      assert.is_true(core.mono() - t0 >= 1.9)
      assert.is_true(worst < 0.25, worst)
      assert.same({ { one = 1 } }, assert(db:query("SELECT 1 AS one")))
      db:close()
    end)

    it("PostgreSQL: TLS checks the certificate against the name while"
       .. " libpq connects to the resolved address", function()
      if not servers.have_postgres() then
        pending("postgres not installed")
        return
      end
      local pg = servers.postgres()
      local dir = pg.dir
      assert(servers.sh("cd " .. dir .. " && openssl req -x509 -newkey"
        .. " rsa:2048 -nodes -days 1 -subj /CN=two.test -addext"
        .. " subjectAltName=DNS:two.test -keyout tls.key -out tls.crt"
        .. " >/dev/null 2>&1 && chmod 600 tls.key && { [ $(id -u) != 0 ]"
        .. " || chown postgres tls.key tls.crt; }"))
      local admin = assert(sql.open(pg.url))
      assert(admin:exec("ALTER SYSTEM SET ssl_cert_file = '" .. dir
                        .. "/tls.crt'"))
      assert(admin:exec("ALTER SYSTEM SET ssl_key_file = '" .. dir
                        .. "/tls.key'"))
      assert(admin:exec("ALTER SYSTEM SET ssl = on"))
      assert(admin:query("SELECT pg_reload_conf()"))
      admin:close()
      local tls = "/postgres?sslmode=verify-full&sslrootcert=" .. dir
                  .. "/tls.crt"
      -- two.test is 127.0.0.2 (nothing listens) then 127.0.0.1
      local got = wait_for(function()
        local h, e = sql.open("postgres://postgres@two.test:" .. pg.port
                              .. tls, { connect_timeout = 1 })
        return h and { h } or (e and not tostring(e):find("SSL off")
                               and not tostring(e):find("does not support"
                                                        .. " SSL")
                               and { nil, e })
      end, 10, "TLS on the server")
      local db, err = got[1], got[2]
      assert.is_truthy(db, tostring(err))
      local rows = assert(db:query("SELECT ssl FROM pg_stat_ssl"
                                   .. " WHERE pid = pg_backend_pid()"))
      assert.is_true(rows[1].ssl)
      db:close()
      -- the check is real: another name for the same address is refused
      local bad, berr = sql.open("postgres://postgres@long.test:"
                                 .. pg.port .. tls)
      assert.is_nil(bad)
      assert.truthy(tostring(berr):find("long.test", 1, true),
                    tostring(berr))
    end)

    it("PostgreSQL: a host whose lookup hangs does not keep the pool"
       .. " from the hosts that resolved", function()
      if not servers.have_postgres() then
        pending("postgres not installed")
        return
      end
      local pg = servers.postgres_db()
      dns.flush()
      local t0 = core.mono()
      local db, err = sql.open("postgres://postgres@two.test:" .. pg.port
                               .. ",slow.test:" .. pg.port .. "/" .. pg.name,
                               { connect_timeout = 1 })
      local took = core.mono() - t0
      -- let slow.test's lookup end, so later specs ask afresh
      assert(dns.resolve("slow.test"))
      dns.flush()
      assert.is_truthy(db, tostring(err))
      assert.is_true(took < 1.5, took)
      assert.same({ { one = 1 } }, assert(db:query("SELECT 1 AS one")))
      db:close()
      -- the only host still being looked up: kind dns, naming it
      local none, nerr = sql.open("postgres://postgres@slow.test:"
                                  .. pg.port .. "/" .. pg.name,
                                  { connect_timeout = 1 })
      assert(dns.resolve("slow.test"))
      dns.flush()
      assert.is_nil(none)
      assert.equal("dns", nerr.kind)
      assert.truthy(tostring(nerr):find("slow.test", 1, true),
                    tostring(nerr))
    end)

    it("PostgreSQL: a host from PGHOST is resolved by paygate.dns too,"
       .. " not by libpq's blocking lookup", function()
      if not servers.have_postgres() then
        pending("postgres not installed")
        return
      end
      local pg = servers.postgres_db()
      local dir = servers.mktemp()
      local script = dir .. "/open.lua"
      local f = assert(io.open(script, "w"))
      -- libpq's own lookup would not know two.test (only the spec's
      -- responder does)
      f:write([[
local dns = require "paygate.dns"
local sql = require "paygate.sql"
dns.configure({ resolver = arg[1] })
local db, err = sql.open("postgres:///postgres?user=postgres",
                         { connect_timeout = 2 })
print(db and "opened" or tostring(err))
]])
      f:close()
      local out = servers.read_cmd("PGHOST=two.test PGPORT=" .. pg.port
        .. " " .. PAYGATE_BIN .. " exec " .. script .. " " .. d.addr
        .. " 2>&1")
      servers.sh("rm -rf " .. dir)
      assert.truthy(out:find("opened", 1, true), out)
    end)

    -- Runs sql.open(url) in a paygate process with env (a shell prefix)
    -- and the spec's resolver; returns what it printed.
    local function open_with_env(env, url)
      local dir = servers.mktemp()
      local script = dir .. "/open.lua"
      local f = assert(io.open(script, "w"))
      f:write([[
local dns = require "paygate.dns"
local sql = require "paygate.sql"
dns.configure({ resolver = arg[1] })
local db, err = sql.open(arg[2], { connect_timeout = 2 })
print(db and "opened" or (err.kind .. " | " .. tostring(err)))
]])
      f:close()
      local out = servers.read_cmd(env .. " " .. PAYGATE_BIN .. " exec "
        .. script .. " " .. d.addr .. " '" .. url .. "' 2>&1")
      servers.sh("rm -rf " .. dir)
      return out
    end

    -- A pg_service.conf in a new directory: { [service] = "k=v\n..." }.
    local function service_dir(sections)
      local dir = servers.mktemp()
      local f = assert(io.open(dir .. "/pg_service.conf", "w"))
      for name, body in pairs(sections) do
        f:write("# a comment\n[" .. name .. "]\n" .. body .. "\n")
      end
      f:close()
      return dir
    end

    it("PostgreSQL: a host from a service file (service= or PGSERVICE)"
       .. " is resolved by paygate.dns too, not by libpq", function()
      if not servers.have_postgres() then
        pending("postgres not installed")
        return
      end
      local pg = servers.postgres_db()
      -- libpq's own lookup would not know two.test
      local dir = service_dir({
        other = "host=nx.test\nport=1",
        pay = "host=two.test\nport=" .. pg.port
              .. "\nuser=postgres\ndbname=postgres",
      })
      finally(function() servers.sh("rm -rf " .. dir) end)
      local file = "PGSERVICEFILE=" .. dir .. "/pg_service.conf"
      local out = open_with_env(file, "postgres:///?service=pay")
      assert.truthy(out:find("opened", 1, true), out)
      out = open_with_env(file .. " PGSERVICE=pay", "postgres://")
      assert.truthy(out:find("opened", 1, true), out)
      -- the system-wide file, when the user's has no such service
      local empty = "PGSERVICEFILE=" .. dir .. "/empty.conf"
      assert(io.open(dir .. "/empty.conf", "w")):close()
      out = open_with_env(empty .. " PGSYSCONFDIR=" .. dir,
                          "postgres:///?service=pay")
      assert.truthy(out:find("opened", 1, true), out)
      -- the URL's host wins over the service's
      out = open_with_env(file, "postgres://postgres@two.test:" .. pg.port
                          .. "/postgres?service=other")
      assert.truthy(out:find("opened", 1, true), out)
      -- a service nowhere to be found, or a PGSERVICEFILE that is not
      -- there: a config error, at once
      out = open_with_env(empty .. " PGSYSCONFDIR=" .. dir,
                          "postgres:///?service=nosuch")
      assert.truthy(out:find("^config | ") and out:find("nosuch", 1, true),
                    out)
      out = open_with_env("PGSERVICEFILE=" .. dir .. "/none.conf",
                          "postgres:///?service=pay")
      assert.truthy(out:find("^config | ") and out:find("none.conf", 1, true),
                    out)
    end)

    it("Redis: tries every address, and a missing name fails with kind"
       .. " dns", function()
      local srv = servers.redis()
      local r = assert(redis.connect("redis://two.test:" .. srv.port))
      assert.equal("PONG", r:call("PING"))
      assert.equal("127.0.0.1", r.addr)
      r:close()
      local c, err = redis.connect("redis://nx.test:" .. srv.port)
      assert.is_nil(c)
      assert.equal("dns", err.kind)
    end)
  
    it("Redis: a name whose every address is down is backed off from,"
       .. " not tried at each turn of its addresses", function()
      local srv = servers.redis()
      local r = assert(redis.connect("redis://two.test:" .. srv.port))
      assert.equal("PONG", r:call("PING"))
      srv.stop()
      -- both 127.0.0.2 and 127.0.0.1 now refuse: the client turns from
      -- one to the other, and the wait before its next attempt grows
      local longest = 0
      wait_for(function()
        local v, err = r:call("GET", "k")
        assert.is_nil(v)
        local w = tonumber(err.message:match("next attempt in ([%d.]+) s"))
        longest = math.max(longest, w or 0)
        return longest > 0.4
      end, 10, "the wait before the next attempt to grow past 0.4 s")
      r:close()
    end)

    it("Redis: after a lost connection, follows the name to its new"
       .. " address", function()
      local a = servers.redis()
      -- a second server on the same port, on another loopback address
      local dir = servers.mktemp()
      assert(servers.sh("redis-server --port " .. a.port .. " --bind"
        .. " 127.0.0.2 --dir " .. dir .. " --save '' --appendonly no"
        .. " --daemonize yes --pidfile " .. dir .. "/b.pid --logfile "
        .. dir .. "/b.log"))
      finally(function()
        servers.sh("kill $(cat " .. dir .. "/b.pid) 2>/dev/null; rm -rf "
                   .. dir)
      end)
      wait_for(function()
        return servers.read_cmd("redis-cli -h 127.0.0.2 -p " .. a.port
                                .. " PING 2>/dev/null"):match("PONG")
      end, 10, "the second redis")
      local r = assert(redis.connect("redis://rd.test:" .. a.port))
      assert.equal("127.0.0.1", r.addr)
      assert.equal("OK", r:call("SET", "where", "a"))
      d:set(zone(nil, "127.0.0.2"))
      a.stop()
      -- commands fail while the old answer is cached, then the client
      -- asks again and lands on the new address
      wait_for(function()
        local v = r:call("GET", "where")
        return v == redis.null
      end, 10, "the client to reach the new address")
      assert.equal("127.0.0.2", r.addr)
      r:close()
      d:set(zone())
    end)
  end)
end)
