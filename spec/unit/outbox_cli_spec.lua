-- scripts/outbox.lua against a SQLite store: an option the command does
-- not know is a usage error (exit 2) that changes nothing. A filter
-- dropped without a word widens a replay: `replay --dead --subjet pay_1`
-- set every dead letter of every subject pending again.
local paygate = require "paygate"
local sql = require "paygate.sql"
local outbox = require "paygate.outbox"
local servers = require "spec.support.servers"
local proc = require "spec.support.proc"
local kit = require "support.outbox_kit"

local BIN = os.getenv("PAYGATE_BIN") or "build/paygate"
local tmp = servers.mktemp()

teardown(function()
  servers.sh("rm -rf " .. tmp)
end)

-- Runs the exec script; returns its exit code and output.
local function cli(url, ...)
  local out = tmp .. "/cli.out"
  os.remove(out)
  local p = proc.spawn({ BIN, "exec", "scripts/outbox.lua", url, ... },
                       { log = out })
  local rc = p:wait(30)
  return rc, proc.read(out)
end

describe("scripts/outbox.lua", function()
  it("a store it cannot open: exit 1, said in one line", function()
    local rc, out = cli("postgres://nobody@127.0.0.1:1/x", "list")
    assert.equal(1, rc)
    -- (not beside the PostgreSQL pool's own "pool down" log line)
    assert.matches("^outbox: cannot open the store: unavailable: [^\n]*\n$",
                   out)
    -- a URL sql.open refuses is a usage error (exit 2), said without the
    -- code position of the raise
    rc, out = cli("postgres://nobody@127.0.0.1:1/x?pool=abc", "list")
    assert.equal(2, rc, out)
    assert.equal("outbox: bad store URL: sql.open: opts.pool must be an"
                 .. " integer from 1 to 32\n", out)
  end)

  it("refuses an option its command does not take, and replays nothing",
     function()
    local path = tmp .. "/cli.db"
    local url = "sqlite:" .. path
    local db = assert(sql.open(url))
    local ids = {}
    for i, subject in ipairs({ "pay_1", "pay_2" }) do
      ids[i] = kit.enqueue(db, subject, "payment.paid")
    end
    local d = outbox.dispatcher(db, { sinks = { function()
      return nil, paygate.error("rejected", "no", { retryable = false })
    end } })
    assert.equal(2, d:step())
    d:stop()
    local function states()
      local t = {}
      for i, id in ipairs(ids) do
        t[i] = assert(outbox.list(db, { id = id }))[1].state
      end
      return t
    end
    assert.same({ "dead", "dead" }, states())
    for _, argv in ipairs({
      { "replay", "--dead", "--subjet", "pay_1" },   -- a misspelt filter
      { "replay", "--dead", "--state", "delivered" },
      { "replay", "--dead", "--limit", "1" },
      { "replay", "--dead", "--keep-days", "1" },
      { "replay", tostring(ids[1]), "--subject", "pay_1" },
      { "list", "--stat", "dead" },
      { "prune", "--keep-day", "0" },
      { "list", "17" },
      -- a state that is none (before: "no events match", exit 0: no dead
      -- letters, said of a store full of them)
      { "list", "--state", "daed" },
      { "list", "--state", "Dead" },
    }) do
      local rc, out = cli(url, unpack(argv))
      assert.equal(2, rc, table.concat(argv, " ") .. ": " .. out)
      assert.matches("usage:", out, 1, true)
      assert.same({ "dead", "dead" }, states())
    end
    -- the right spelling replays the one subject's
    local rc, out = cli(url, "replay", "--dead", "--subject", "pay_1")
    assert.equal(0, rc, out)
    assert.matches("replayed 1", out, 1, true)
    assert.same({ "pending", "dead" }, states())
    db:close()
  end)

  it("replay of an id not in the store says so and exits 3", function()
    local path = tmp .. "/cli_ids.db"
    local url = "sqlite:" .. path
    local db = assert(sql.open(url))
    local id = kit.enqueue(db, "pay_1", "payment.paid")
    local d = outbox.dispatcher(db, { sinks = { function()
      return nil, paygate.error("rejected", "no", { retryable = false })
    end } })
    assert.equal(1, d:step())
    d:stop()
    assert.equal("dead", assert(outbox.list(db, { id = id }))[1].state)
    -- before: "replayed 0", exit 0, as if the id were there and done
    local rc, out = cli(url, "replay", tostring(id + 100))
    assert.equal(3, rc, out)
    assert.matches("outbox: no event " .. (id + 100) .. " in the store\n",
                   out, 1, true)
    assert.matches("replayed 0", out, 1, true)
    -- a missing id beside a real one: the real one is replayed
    rc, out = cli(url, "replay", tostring(id + 100), tostring(id))
    assert.equal(3, rc, out)
    assert.matches("replayed 1", out, 1, true)
    assert.equal("pending", assert(outbox.list(db, { id = id }))[1].state)
    -- a pending one again: left as it is, said, not an error
    rc, out = cli(url, "replay", tostring(id))
    assert.equal(0, rc, out)
    assert.matches("outbox: event " .. id .. " is pending already: left as"
                   .. " it is", out, 1, true)
    assert.matches("replayed 0", out, 1, true)
    db:close()
  end)
end)
