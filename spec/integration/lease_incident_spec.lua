-- The lock-TTL incident, time-scaled 100:1: a payment path guarded by a
-- lock whose TTL is a fixed 30 s (here 0.3 s) while the path takes 42 s
-- (0.42 s). The lock expires mid-work, the retry of the same request
-- (a second instance) takes it, and the customer is charged twice.
--
-- Each scenario runs the same payment path on two instances (two store
-- handles): A starts; B, the retry, starts 0.32 s after A took the lock
-- (the lock's 0.3 s are over). So that load on the machine cannot
-- reorder them, A's work lasts 0.42 s AND until B has decided whether to
-- charge (locked out, or read the order as unpaid).
--
--   naive    SETNX-style lock with a fixed TTL, no fencing -> charged twice
--   fenced   paygate.lease with the same fixed TTL and no renewal: A's
--            commit is refused (its token is stale), B's goes through ->
--            charged once
--   adaptive lease.run with the ttl measured from earlier runs
--            (p99.9 x margin): A keeps the lease, B is turned away ->
--            charged once, nothing refused
local paygate = require "paygate"
local core = require "paygate.core"
local sql = require "paygate.sql"
local redis = require "paygate.redis"
local lease = require "paygate.lease"
local servers = require "spec.support.servers"

local TTL = 0.3          -- the fixed guess (30 s)
local WORK = 0.42        -- the payment path (42 s)
local RETRY_AT = 0.32    -- the retry arrives after the lock's TTL
local AMOUNT = 100

local tmp = servers.mktemp()
local redis_srv
local n = 0

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

-- An engine: two instances (handles) on one store, the order book and
-- the charge ledger on it, a naive lock, and the commit of a charge.
local engines = {}

engines.sqlite = function()
  n = n + 1
  local url = "sqlite:" .. tmp .. "/incident" .. n .. ".db"
  local a = assert(sql.open(url))
  local b = assert(sql.open(url))
  assert(a:exec_script([[
    CREATE TABLE orders (id TEXT PRIMARY KEY, state TEXT NOT NULL);
    CREATE TABLE charges (order_id TEXT NOT NULL, by TEXT NOT NULL,
                          amount INTEGER NOT NULL);
    CREATE TABLE naive_locks (name TEXT PRIMARY KEY, expires_at REAL);
    INSERT INTO orders (id, state) VALUES ('order:123', 'unpaid')]]))
  local e = { instances = { a, b } }

  function e.add_order(id)
    assert(a:exec("INSERT INTO orders (id, state) VALUES ($1, 'unpaid')",
                  { id }))
  end

  function e.state(db, id)
    return assert(db:query("SELECT state FROM orders WHERE id = $1",
                           { id }))[1].state
  end

  -- SET key NX PX ttl: taken when absent or expired
  function e.naive_lock(db, key, ttl)
    local now = core.time()
    local res = assert(db:exec("INSERT INTO naive_locks (name, expires_at)"
      .. " VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET expires_at ="
      .. " excluded.expires_at WHERE naive_locks.expires_at <= $3",
      { key, now + ttl, now }))
    return res.changes == 1
  end

  function e.naive_unlock(db, key)
    assert(db:exec("DELETE FROM naive_locks WHERE name = $1", { key }))
  end

  -- the charge and the order's new state, in one transaction; guard(tx)
  -- (the fence) first when given
  function e.charge(db, id, who, guard)
    return db:transaction(function(tx)
      if guard then
        local ok, err = guard(tx)
        if not ok then
          return nil, err
        end
      end
      assert(tx:exec("INSERT INTO charges (order_id, by, amount) VALUES"
                     .. " ($1, $2, $3)", { id, who, AMOUNT }))
      assert(tx:exec("UPDATE orders SET state = 'paid' WHERE id = $1",
                     { id }))
      return "charged"
    end)
  end

  function e.fenced_charge(db, id, who, h)
    return e.charge(db, id, who, function(tx) return h:check(tx) end)
  end

  function e.charges(id)
    return assert(a:query("SELECT by FROM charges WHERE order_id = $1"
                          .. " ORDER BY rowid", { id }))
  end

  function e.close()
    a:close()
    b:close()
  end

  return e
end

if servers.have_redis() then
  engines.redis = function()
    redis_srv = redis_srv or servers.redis()
    local a = assert(redis.connect(redis_srv.url))
    local b = assert(redis.connect(redis_srv.url))
    assert(a:call("FLUSHALL"))
    assert(a:call("SET", "state:order:123", "unpaid"))
    local e = { instances = { a, b } }

    function e.add_order(id)
      assert(a:call("SET", "state:" .. id, "unpaid"))
    end

    function e.state(c, id)
      return c:call("GET", "state:" .. id)
    end

    -- exactly the incident's lock: SET key value NX PX ttl
    function e.naive_lock(c, key, ttl)
      return c:call("SET", "lock:" .. key, "processing", "NX", "PX",
                    math.floor(ttl * 1000)) == "OK"
    end

    function e.naive_unlock(c, key)
      assert(c:call("DEL", "lock:" .. key))
    end

    -- the charge is the ledger entry; the state follows
    function e.charge(c, id, who)
      assert(c:call("RPUSH", "charges:" .. id, who))
      assert(c:call("SET", "state:" .. id, "paid"))
      return "charged"
    end

    function e.fenced_charge(_, id, who, h)
      local res, err = h:call("RPUSH", "charges:" .. id, who)
      if not res then
        return nil, err
      end
      res, err = h:call("SET", "state:" .. id, "paid")
      if not res then
        return nil, err
      end
      return "charged"
    end

    function e.charges(id)
      local list = assert(a:call("LRANGE", "charges:" .. id, 0, -1))
      local out = {}
      for i, who in ipairs(list) do
        out[i] = { by = who }
      end
      return out
    end

    function e.close()
      a:close()
      b:close()
    end

    return e
  end
end

-- The scenario. guarded(db, who, path) runs path(ctx) under the lock of
-- the variant; path reads the order, works, commits. Returns A's and B's
-- results and the ledger.
local function incident(e, guarded)
  local a_db, b_db = e.instances[1], e.instances[2]
  local id = "order:123"
  local b_decided = false
  local a_locked_at

  local function path(db, who, commit)
    if who == "A" then
      a_locked_at = core.mono()
    end
    if e.state(db, id) == "paid" then
      if who == "B" then
        b_decided = true
      end
      return "already paid"
    end
    if who == "B" then
      b_decided = true                -- B read the order as unpaid
    end
    paygate.sleep(WORK)               -- risk check, the bank, ...
    if who == "A" then
      -- the slow path: still working while the retry decides
      servers.wait_for(function() return b_decided end, 10,
                       "the retry to decide")
    end
    return commit(db, who)
  end

  local ta = paygate.spawn(function()
    return guarded(a_db, "A", path)
  end)
  servers.wait_for(function() return a_locked_at ~= nil end, 5,
                   "A to take the lock")
  paygate.sleep(math.max(0, a_locked_at + RETRY_AT - core.mono()))
  local tb = paygate.spawn(function()
    local r, err = guarded(b_db, "B", path)
    b_decided = true                  -- locked out counts as decided
    return r, err
  end)
  local ra, ea = ta:wait()
  local rb, eb = tb:wait()
  return { r = ra, err = ea }, { r = rb, err = eb }, e.charges(id),
         e.state(a_db, id)
end

local function kind(res)
  return res.err and res.err.kind
end

for engine, new_engine in pairs(engines) do
  describe("the lock-TTL incident on " .. engine, function()
    local e

    before_each(function() e = new_engine() end)
    after_each(function() e.close() end)

    it("naive: a fixed-TTL lock without fencing charges the customer"
       .. " twice", function()
      local a, b, charges, state = incident(e, function(db, who, path)
        if not e.naive_lock(db, "order:123", TTL) then
          return nil, core.error("held", "order:123 is being processed")
        end
        local r, err = path(db, who, function(d, w)
          return e.charge(d, "order:123", w)
        end)
        e.naive_unlock(db, "order:123")
        return r, err
      end)
      assert.equal("charged", a.r)
      assert.equal("charged", b.r)
      assert.same({ { by = "A" }, { by = "B" } }, charges)   -- the incident
      assert.equal("paid", state)
    end)

    it("fenced: the same fixed TTL, but the stale holder's commit is"
       .. " refused and the charge is applied once", function()
      local a, b, charges, state = incident(e, function(db, who, path)
        return lease.run(db, "order:123", function(h)
          return path(db, who, function(d, w)
            return e.fenced_charge(d, "order:123", w, h)
          end)
        end, { ttl = TTL, renew = false })    -- as fixed as the incident's
      end)
      assert.is_nil(a.r)
      assert.equal("fenced", kind(a))        -- A's lease had moved on to B
      assert.equal("charged", b.r)
      assert.same({ { by = "B" } }, charges)
      assert.equal("paid", state)
    end)

    it("adaptive: after the durations were measured the lease outlives the"
       .. " work and the retry is turned away", function()
      local name = "pay-" .. engine .. "-" .. n .. "-" .. core.pid()
      local adaptive = { adaptive = name, initial = TTL, floor = 0.05,
                         ceiling = 5, margin = 3, min_samples = 5,
                         renew = false }  -- the ttl alone must suffice
      -- before any measurement the ttl is the initial guess
      local ttl, info = lease.ttl_for(name, adaptive)
      assert.equal(TTL, ttl)
      assert.equal("initial", info.source)
      -- earlier payments (other orders) measure the path
      local tasks = {}
      for i = 1, adaptive.min_samples do
        local id = "order:warm" .. i
        e.add_order(id)
        tasks[i] = paygate.spawn(function()
          return lease.run(e.instances[1], id, function(h)
            paygate.sleep(WORK)
            return e.fenced_charge(e.instances[1], id, "warm", h)
          end, adaptive)
        end)
      end
      for i = 1, #tasks do
        assert.equal("charged", tasks[i]:wait())
      end
      ttl, info = lease.ttl_for(name, adaptive)
      assert.equal("measured", info.source)
      assert.truthy(ttl >= WORK * 3, "ttl " .. ttl)
      local fenced, lost = lease.stats().fenced, lease.stats().lost

      local a, b, charges, state = incident(e, function(db, who, path)
        return lease.run(db, "order:123", function(h)
          return path(db, who, function(d, w)
            return e.fenced_charge(d, "order:123", w, h)
          end)
        end, adaptive)
      end)
      assert.equal("charged", a.r)
      assert.is_nil(b.r)
      assert.equal("held", kind(b))          -- the retry found it held
      assert.same({ { by = "A" } }, charges)
      assert.equal("paid", state)
      assert.equal(fenced, lease.stats().fenced)  -- nothing was refused
      assert.equal(lost, lease.stats().lost)      -- nor lost
    end)
  end)
end
