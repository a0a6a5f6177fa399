-- paygate.lease: a fencing token as a string of its decimal digits (read
-- back from a text column or an HTTP header) is the same token as the
-- number, on SQLite, PostgreSQL and Redis; anything else that is not a
-- non-negative integer is misuse and raises.
local lease = require "paygate.lease"
local servers = require "spec.support.servers"

local tmp = servers.mktemp()

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

-- SQLite and PostgreSQL (each call a fresh store), then Redis
local stores = servers.stores(tmp, "", "paygate_leases")
if servers.have_redis() then
  stores.redis = servers.redis_store()
end

-- lease.check inside a transaction (SQL), lease.fenced_call (Redis):
-- true when the guarded write may happen, else nil, err.
local function fenced_write(name, store, key, token)
  if name == "redis" then
    local res, err = lease.fenced_call(store, key, token, "SET", "w", "v")
    return res and true, err
  end
  return store:transaction(function(tx)
    return lease.check(tx, key, token)
  end)
end

for name, new_store in pairs(stores) do
  describe("paygate.lease tokens on " .. name, function()
    local store

    before_each(function() store = new_store() end)
    after_each(function() store:close() end)

    it("takes the current token as a string of its digits", function()
      assert(lease.release(store,
        assert(lease.acquire(store, "job", 5, { owner = "a" }))))
      local l = assert(lease.acquire(store, "job", 5, { owner = "b" }))
      assert.equal("number", type(l.token))
      assert.truthy(l.token >= 2)
      local s = tostring(l.token)
      assert(fenced_write(name, store, "job", l.token))
      local ok, err = fenced_write(name, store, "job", s)
      assert.is_nil(err)
      assert.is_true(ok)
      if name ~= "redis" then
        assert(store:atomic({ lease.guard(store, "job", s) }))
      end
      -- an older token is still refused, as a number or as a string
      for _, old in ipairs({ l.token - 1, tostring(l.token - 1) }) do
        local ok2, err2 = fenced_write(name, store, "job", old)
        assert.is_nil(ok2)
        assert.equal("fenced", err2.kind)
      end
      if name ~= "redis" then
        local res, gerr = store:atomic({
          lease.guard(store, "job", tostring(l.token - 1)) })
        assert.is_nil(res)
        assert.is_true(lease.fenced(gerr))
      end
    end)

    it("renews and releases a lease whose token is a string", function()
      local l = assert(lease.acquire(store, "job", 5, { owner = "a" }))
      local copy = { key = l.key, token = tostring(l.token), owner = l.owner,
                     ttl = l.ttl }
      assert(lease.renew(store, copy, 5))
      assert.is_true(lease.release(store, copy))
      -- released: another owner gets it at once
      assert(lease.acquire(store, "job", 5, { owner = "b" }))
    end)
  end)
end

describe("paygate.lease tokens beyond 2^53 (SQLite)", function()
  it("compares them by their exact digits", function()
    local db = stores.sqlite()
    assert(lease.acquire(db, "big", 5))
    -- what a store gives for an integer a double cannot hold: the digits
    assert(db:exec("UPDATE paygate_leases SET token = 9007199254740993"
                   .. " WHERE name = 'big'"))
    assert.equal("9007199254740993",
      db:query("SELECT token FROM paygate_leases")[1].token)
    local function check(t)
      return db:transaction(function(tx) return lease.check(tx, "big", t) end)
    end
    assert(check("9007199254740993"))
    -- 2^53 is one below: as a number or as its digits it is older
    for _, t in ipairs({ 2 ^ 53, "9007199254740992" }) do
      local ok, err = check(t)
      assert.is_nil(ok)
      assert.equal("fenced", err.kind)
    end
    db:close()
  end)
end)

describe("paygate.lease token misuse", function()
  local db, l

  setup(function()
    db = stores.sqlite()
    l = assert(lease.acquire(db, "k", 5))
  end)
  teardown(function() db:close() end)

  local MSG = "token must be a non-negative integer (a number, or a string"
    .. " of its decimal digits)"

  local function raises(fn, what)
    local ok, msg = pcall(fn)
    assert.is_false(ok, what .. " did not raise")
    assert.truthy(tostring(msg):find(MSG, 1, true), what .. ": " .. msg)
  end

  it("raises for a token that is not exactly a non-negative integer", function()
    local bad = { "042", " 42", "42 ", "+42", "-1", "4.2e1", "0x2a", "42.0",
                  "", "abc", -1, 1.5, 0 / 0, math.huge, {}, true }
    for _, t in ipairs(bad) do
      local what = type(t) .. " " .. tostring(t)
      raises(function()
        db:transaction(function(tx) lease.check(tx, "k", t) end)
      end, "check " .. what)
      raises(function() lease.guard(db, "k", t) end, "guard " .. what)
    end
    raises(function()
      lease.renew(db, { key = "k", token = "1.0", owner = l.owner })
    end, "renew")
    raises(function()
      lease.release(db, { key = "k", token = "01", owner = l.owner })
    end, "release")
  end)
end)
