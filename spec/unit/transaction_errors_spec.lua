-- db:transaction and the one error shape: whatever fn raises or returns as
-- its error comes back as a paygate error (tostring "kind: message"), and
-- programmer errors are raised on after the rollback.
local paygate = require "paygate"
local sql = require "paygate.sql"
local server = require "support.server"

describe("db:transaction errors", function()
  local dir, db
  setup(function()
    dir = server.tmpdir()
    db = assert(sql.open("sqlite:" .. dir .. "/t.db"))
    assert(db:exec("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
  end)
  teardown(function()
    db:close()
    os.execute("rm -rf " .. dir)
  end)

  it("a raised bare { kind, message } table becomes a paygate error", function()
    local ok, err = db:transaction(function(tx)
      assert(tx:exec("INSERT INTO t (id) VALUES (1)"))
      error({ kind = "my_kind", message = "went wrong", code = 7 })
    end)
    assert.is_nil(ok)
    assert.is_true(paygate.is_error(err))
    assert.equal("my_kind: went wrong", tostring(err))
    assert.equal(7, err.code)
    assert.equal(0, assert(db:query("SELECT count(*) AS n FROM t"))[1].n)
  end)

  it("paygate.abort is raised on after the rollback", function()
    local ok, err = pcall(db.transaction, db, function(tx)
      assert(tx:exec("INSERT INTO t (id) VALUES (2)"))
      paygate.abort(409, "conflict", "already")
    end)
    assert.is_false(ok)
    assert.is_true(err.abort)
    assert.equal(409, err.status)
    assert.equal(0, assert(db:query("SELECT count(*) AS n FROM t"))[1].n)
  end)

  it("a programmer error is raised on after the rollback", function()
    local ok, err = pcall(db.transaction, db, function(tx)
      assert(tx:exec("INSERT INTO t (id) VALUES (3)"))
      error("oops")
    end)
    assert.is_false(ok)
    assert.matches("oops", err)
    assert.equal(0, assert(db:query("SELECT count(*) AS n FROM t"))[1].n)
  end)

  it("a programmer error keeps the frames of where it was raised", function()
    -- was: raised on by db:transaction's own error(): the log's traceback
    -- began there, the frames inside fn (which helper, which line) lost
    local function deep_helper_in_fn()
      local t = nil
      return t.field                    -- indexes a nil
    end
    local ok, err = pcall(db.transaction, db, function(tx)
      assert(tx:exec("INSERT INTO t (id) VALUES (4)"))
      local v = deep_helper_in_fn()
      return v
    end)
    assert.is_false(ok)
    assert.equal("string", type(err))
    local msg, trace = err:match("^(.-)\nstack traceback:\n(.*)$")
    assert.truthy(msg, err)
    assert.matches("attempt to index", msg)
    assert.matches("in function 'deep_helper_in_fn'", trace, 1, true)
    -- once: the wrappers and the server add none to a message with one
    local _, n = err:gsub("stack traceback:", "")
    assert.equal(1, n)
    assert.equal(0, assert(db:query("SELECT count(*) AS n FROM t"))[1].n)
  end)
end)
