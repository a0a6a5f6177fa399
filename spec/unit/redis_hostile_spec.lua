-- paygate.redis against a server that breaks the protocol
-- (spec/support/hostile_redis.py): every broken reply fails its command
-- with a classified error and drops the connection, never the process;
-- the next command goes out on a new connection.
local redis = require "paygate.redis"
local rcore = require "paygate.redis.core"
local core = require "paygate.core"
local proc = require "spec.support.proc"
local servers = require "spec.support.servers"

local wait_for = servers.wait_for

describe("paygate.redis against a hostile server", function()
  local port, log, p

  local function lines()
    local out = {}
    for line in (proc.read(log) or ""):gmatch("[^\n]+") do
      out[#out + 1] = line
    end
    return out
  end

  local function has(line)
    for _, l in ipairs(lines()) do
      if l == line then
        return true
      end
    end
    return false
  end

  -- the connection number the server read a command line on, last
  local function conn_of(cmdline)
    local n
    for _, l in ipairs(lines()) do
      local id, rest = l:match("^(%d+) (.*)$")
      if rest == cmdline then
        n = tonumber(id)
      end
    end
    return n
  end

  setup(function()
    port = core.free_port()
    log = os.tmpname()
    p = proc.spawn({ "python3", "spec/support/hostile_redis.py",
                     tostring(port), log }, { watchdog = true })
    wait_for(function() return has("ready") end, 10, "the hostile Redis")
  end)

  teardown(function()
    p:kill()
    os.remove(log)
  end)

  -- hiredis 0.14 asserted on it: the process aborted
  it("drops the connection on a reply no command asked for, and lives",
     function()
    local r = assert(redis.connect("redis://127.0.0.1:" .. port,
                                   { pool = 1 }))
    assert.equal("PONG", r:call("PING"))
    local n = conn_of("PING")
    -- the GET's answer, then one more nobody waits for
    assert.equal("OK", r:call("GET", "extra"))
    wait_for(function() return has("closed " .. n) end, 5,
             "the client to drop the connection")
    assert.equal("PONG", r:call("PING"))
    assert.is_true(conn_of("PING") > n)
    r:close()
  end)

  it("fails each broken reply with a classified error, on a connection"
     .. " not used again", function()
    local r = assert(redis.connect("redis://127.0.0.1:" .. port,
                                   { pool = 1, timeout = 0.5 }))
    for mode, text in pairs({
      badtype = "Protocol error", negbulk = "out of range",
      bulkjunk = "Bad bulk string length", nested = "nested",
      shortbulk = "Protocol error: a bulk string not ended where its"
                  .. " length says",
      longbulk = "Protocol error: a bulk string not ended where its"
                 .. " length says",
      intover = "Bad integer value", intjunk = "Bad integer value",
      negarray = "out of range", hugearray = "out of range",
      closemid = "closed", never = "no reply within 0.5 s",
      -- past max_reply: refused on its header (it waited for the timeout)
      hugebulk = "Protocol error: a bulk string of 2147483648 bytes,"
                 .. " past max_reply (67108864 bytes)",
    }) do
      -- a connection that answered once: its loss costs no backoff
      assert.equal("PONG", r:call("PING"), mode)
      local t0 = core.now()
      local res, err = r:call("GET", mode)
      assert.is_nil(res, mode)
      local kind = text:find("no reply") and "timeout" or "unavailable"
      assert.equal(kind, err.kind, mode)
      assert.is_true(err.sent, mode)
      assert.truthy(err.message:find(text, 1, true), mode .. ": "
                    .. err.message)
      assert.is_true(core.now() - t0 < 3, mode)
      local n = conn_of("GET " .. mode)
      assert.equal("PONG", r:call("PING"), mode)
      assert.is_true(conn_of("PING") > n, mode)
    end
    -- a reply a byte per segment is whole
    assert.equal("hello", r:call("GET", "split"))
    r:close()
  end)

  -- the process's peak resident memory (VmHWM), in kB
  local function peak_kb()
    local f = assert(io.open("/proc/self/status"))
    local s = f:read("*a")
    f:close()
    return assert(tonumber(s:match("VmHWM:%s*(%d+)")))
  end

  -- the check a refused reply's error passes: kind, message, time taken
  local function refused(err, t0, text, what)
    assert.equal("unavailable", err.cause or err.kind, what)
    assert.truthy(err.message:find("Protocol error: " .. text, 1, true),
                  what .. ": " .. err.message)
    -- well within the timeout (10 s), which it once ran to
    assert.is_true(core.now() - t0 < 3, what)
  end

  -- A reply that never ends was read until the command's timeout (200 MB
  -- held after 2 s); now it is refused once what it declares, or what has
  -- come of it, is past max_reply (64 MiB by default).
  it("refuses a reply past max_reply as it comes, and reconnects",
     function()
    local r = assert(redis.connect("redis://127.0.0.1:" .. port,
                                   { pool = 1, timeout = 10 }))
    for _, case in ipairs({
      { "streambulk", "a bulk string of 1000000000 bytes, past max_reply"
                      .. " (67108864 bytes)" },
      { "streamarray", "an array of 100000000 elements, past max_reply"
                       .. " (67108864 bytes)" },
    }) do
      local mode, text = case[1], case[2]
      assert.equal("PONG", r:call("PING"), mode)
      local peak, t0 = peak_kb(), core.now()
      local res, err = r:call("GET", mode)
      assert.is_nil(res, mode)
      assert.equal("unavailable", err.kind, mode)
      assert.is_true(err.sent, mode)
      refused(err, t0, text, mode)
      -- refused on its first line, not once held (the stream goes on to
      -- 128 MB, or 8 MB of array elements: some 500 MB held)
      assert.is_true(peak_kb() - peak < 32 * 1024, mode)
      local n = conn_of("GET " .. mode)
      assert.equal("PONG", r:call("PING"), mode)
      assert.is_true(conn_of("PING") > n, mode)
    end
    -- a blocking command's own connection (BLPOP may write: unknown_outcome)
    local t0 = core.now()
    local res, err = r:call("BLPOP", "streambulk", 1)
    assert.is_nil(res)
    assert.equal("unknown_outcome", err.kind)
    refused(err, t0, "a bulk string of 1000000000 bytes", "BLPOP")
    assert.equal("PONG", r:call("PING"))
    r:close()
    -- a line with no end: what has come of it is counted
    r = assert(redis.connect("redis://127.0.0.1:" .. port,
                             { pool = 1, timeout = 10,
                               max_reply = 1048576 }))
    t0 = core.now()
    res, err = r:call("GET", "streamline")
    assert.is_nil(res)
    refused(err, t0, "a reply past max_reply (1048576 bytes)", "line")
    assert.equal("PONG", r:call("PING"))
    r:close()
    -- a subscription's message
    local sub = rcore.subscribe("127.0.0.1", port, "streammsg", {})
    assert.is_true(sub:next(10))
    t0 = core.now()
    local msg
    msg, err = sub:next(10)
    assert.is_nil(msg)
    assert.equal("unavailable", err.kind)
    refused(err, t0, "a bulk string of 1000000000 bytes", "subscription")
    sub:close()
  end)

  -- hiredis 0.14 asserted on each of these (or read past the array):
  -- a Sentinel's broken +switch-master subscription aborted the process
  it("loses a subscription on a broken pub/sub message, and lives",
     function()
    for _, ch in ipairs({ "short", "intkind", "nilchannel", "unsub2",
                          "unsubstr" }) do
      local sub = rcore.subscribe("127.0.0.1", port, ch, {})
      assert.is_true(sub:next(5), ch)
      local msg, err = sub:next(5)
      assert.is_nil(msg, ch)
      assert.equal("unavailable", err.kind, ch)
      assert.truthy(err.message:find("Protocol error", 1, true),
                    ch .. ": " .. err.message)
      sub:close()
    end
    local sub = rcore.subscribe("127.0.0.1", port, "good", {})
    assert.is_true(sub:next(5))
    assert.equal("hi", sub:next(5))
    sub:close()
  end)
end)
