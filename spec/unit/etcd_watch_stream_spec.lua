-- paygate.etcd's watch stream parser, on a stream stubbed in-process (no
-- etcd): lines split across chunks and several lines in one chunk, and a
-- long message (a huge value) read in time linear in its size.
local core = require "paygate.core"
local json = require "paygate.json"
local crypto = require "paygate.crypto"
local hcore = require "paygate.http.core"
local etcd = require "paygate.etcd"

-- a watch answer line with one put of key = value at revision rev
local function put_line(key, value, rev)
  return json.encode({ result = { header = { revision = rev }, events = {
    { kv = { key = crypto.base64_encode(key),
             value = crypto.base64_encode(value),
             mod_revision = rev, create_revision = "2", version = "1" } } } }
  }) .. "\n"
end

-- hcore.stream replaced by one serving `chunks` in turn, then waiting
local function stub(chunks)
  local real = hcore.stream
  hcore.stream = function()
    local i = 0
    return { headers = function() return 200, {} end,
             read = function()
               i = i + 1
               if chunks[i] then return chunks[i] end
               core.sleep(0.05)
               return nil, core.error("timeout", "idle")
             end,
             close = function() end }
  end
  return function() hcore.stream = real end
end

describe("etcd watch stream", function()
  local cli = etcd.new{ endpoints = { "http://127.0.0.1:1" } }

  it("splits lines across chunks and takes several lines in one chunk",
     function()
    local text = json.encode({ result = { header = { revision = "5" },
                                          created = true } }) .. "\n"
                 .. put_line("/x/a", "1", "6") .. put_line("/x/b", "2", "7")
                 .. put_line("/x/c", "3", "8")
    local chunks = {}
    for i = 1, #text, 7 do chunks[#chunks + 1] = text:sub(i, i + 6) end
    chunks[#chunks + 1] = put_line("/x/d", "4", "9")
                          .. put_line("/x/e", "5", "10")
    local restore = stub(chunks)
    local w = cli:watch("/x/", { from_revision = "6" })
    local got = {}
    for _ = 1, 5 do
      local ev, err = w()
      assert(ev, tostring(err))
      got[#got + 1] = ev.key .. "=" .. ev.value .. "@" .. ev.revision
    end
    w:close()
    restore()
    assert.same({ "/x/a=1@6", "/x/b=2@7", "/x/c=3@8", "/x/d=4@9",
                  "/x/e=5@10" }, got)
  end)

  -- CPU seconds to read one message holding a value of `size` bytes, in
  -- 16 KiB chunks
  local function read_cpu(size)
    local value = ("v"):rep(size)
    local line = put_line("/x/big", value, "6")
    local chunks = {}
    for i = 1, #line, 16384 do chunks[#chunks + 1] = line:sub(i, i + 16383) end
    local restore = stub(chunks)
    local w = cli:watch("/x/", { from_revision = "6" })
    local t0 = os.clock()
    local ev, err = w()
    local cpu = os.clock() - t0
    w:close()
    restore()
    assert(ev, tostring(err))
    assert.equal(#value, #ev.value)
    return cpu
  end

  it("reads a message in time linear in its size (a huge value does not"
     .. " hold the worker's CPU)", function()
    -- 16 times the bytes: about 16 times the CPU when linear, 256 times
    -- when each chunk scans the whole line again (12 MiB took ~50 s).
    -- A ratio, not a time: it holds on a slow or busy machine alike.
    local small = read_cpu(768 * 1024)
    local big = read_cpu(12 * 1024 * 1024)
    local ratio = big / math.max(small, 0.002)
    assert.is_true(ratio < 64, ("%.3f s for 16 x the bytes of one that"
      .. " took %.3f s (x %.0f)"):format(big, small, ratio))
  end)

  -- A member that answers 200 and then ends the stream (or sends nothing
  -- until reconnect_after) without creating the watch: each connection
  -- was reconnected to the same member at once, for ever -- no other
  -- endpoint tried, no pause, give_up_after never reached.
  local function broken_member(finish)
    local real = hcore.stream
    local urls = {}
    hcore.stream = function(o)
      urls[#urls + 1] = o.url:match("^http://[^/]+")
      return { headers = function() return 200, {} end,
               read = function() return finish() end,
               close = function() end }
    end
    return urls, function() hcore.stream = real end
  end

  for _, case in ipairs({
    { "ends the stream", function() core.sleep(0.01) return nil end,
      "ended the stream before creating the watch" },
    { "sends nothing until reconnect_after", function()
        core.sleep(0.1)
        return nil, core.error("timeout", "Operation timed out")
      end, "did not create the watch within 0.1 s" } }) do
    it("a member that " .. case[1] .. " before the watch is created is a"
       .. " failure: the next endpoint, a pause, give_up_after", function()
      local urls, restore = broken_member(case[2])
      local c2 = etcd.new{ endpoints = { "http://127.0.0.1:1",
                                         "http://127.0.0.1:2" } }
      local w = c2:watch("/x/", { reconnect_after = 0.1,
                                  give_up_after = 0.5 })
      local ev, err
      local done = core.event()
      local task = core.spawn(function() ev, err = w(); done:set() end)
      local ended = done:wait(5)
      if not ended then task:cancel() end
      w:close()
      restore()
      assert.is_true(ended, "the watch still ran after 5 s, "
                     .. #urls .. " connections")
      assert.is_nil(ev)
      assert.equal("unavailable", err.kind)
      assert.matches(case[3], tostring(err), 1, true)
      assert.is_true(#urls < 30, #urls .. " connections")
      local seen = {}
      for _, u in ipairs(urls) do seen[u] = true end
      assert.is_true(seen["http://127.0.0.1:1"] and seen["http://127.0.0.1:2"]
                     or false)
    end)
  end

  it("refuses a reconnect_after or give_up_after that is not a duration"
     .. " at the call", function()
    -- (NaN passed: the iterator raised later, or the watch never gave up;
    -- a string gave up with a Lua error from inside the watch)
    for _, o in ipairs({ { reconnect_after = 0 / 0 },
                         { reconnect_after = -1 },
                         { reconnect_after = "5" },
                         { reconnect_after = 1e6 },
                         { give_up_after = 0 / 0 },
                         { give_up_after = -1 },
                         { give_up_after = "1" },
                         { give_up_after = math.huge } }) do
      local k = next(o)
      local ok, err = pcall(cli.watch, cli, "/x/", o)
      assert.is_false(ok, k .. " " .. tostring(o[k]))
      assert.matches("etcd watch: opts." .. k .. " must be", err, 1, true)
    end
    local w = cli:watch("/x/", { reconnect_after = 0.5, give_up_after = 0 })
    w:close()
    -- the client's own timeout likewise (every call raised from the HTTP
    -- client for NaN, inf or more than a day)
    for _, t in ipairs({ 0 / 0, math.huge, 1e6, 0 }) do
      assert.has_error(function()
        etcd.new{ endpoints = { "http://127.0.0.1:1" }, timeout = t }
      end, "etcd.new: timeout must be a number > 0 (at most 86400)")
    end
    -- and keep_alive_every's period (its task died in core.sleep: no
    -- keepalive was ever sent, and the lease expired)
    for _, e in ipairs({ 0 / 0, -1, 0, math.huge }) do
      assert.has_error(function() cli:keep_alive_every("7", e) end,
        "etcd keep_alive_every: seconds must be a number > 0 (at most 1e8)")
    end
    assert.has_error(function() cli:keep_alive_every("7") end,
      "etcd keep_alive_every: seconds must be a number > 0 (at most 1e8)")
  end)

  it("give_up_after and the pause count on the monotonic clock: a wall"
     .. " clock stepped forward two hours does not end the watch", function()
    local urls, restore = broken_member(function()
      core.sleep(0.01)
      return nil
    end)
    local real_update, real_time = core.update_time, core.time
    local calls = 0
    core.update_time = function()
      calls = calls + 1
      return real_update() + (calls > 1 and 7200 or 0)
    end
    core.time = function() return real_time() + 7200 end
    local c2 = etcd.new{ endpoints = { "http://127.0.0.1:1",
                                       "http://127.0.0.1:2" } }
    local w = c2:watch("/x/", { reconnect_after = 0.1, give_up_after = 30 })
    local err
    local done = core.event()
    local task = core.spawn(function() err = select(2, w()); done:set() end)
    local ended = done:wait(0.5)
    core.update_time, core.time = real_update, real_time
    if not ended then task:cancel() end
    w:close()
    restore()
    assert.is_falsy(ended, "gave up after " .. #urls .. " connections: "
                    .. tostring(err))
    assert.is_true(#urls >= 2, #urls .. " connections")
  end)

  it("a member that ends each stream just after creating the watch is"
     .. " reconnected to after a pause that grows", function()
    -- (a proxy closing every long response): before, each end was the
    -- normal cycle and the watch reconnected at once, for ever
    local real = hcore.stream
    local n = 0
    local created = json.encode({ result = { header = { revision = "5" },
                                             created = true } }) .. "\n"
    hcore.stream = function()
      n = n + 1
      local sent = false
      return { headers = function() return 200, {} end,
               read = function()
                 core.sleep(0.005)
                 if not sent then sent = true return created end
                 return nil                       -- a clean end
               end,
               close = function() end }
    end
    local c2 = etcd.new{ endpoints = { "http://127.0.0.1:1",
                                       "http://127.0.0.1:2" } }
    local w = c2:watch("/x/", { reconnect_after = 30 })
    local task = core.spawn(function() w() end)
    core.sleep(1)
    task:cancel()
    w:close()
    hcore.stream = real
    -- pauses of 0.05, 0.1, 0.2, 0.4 s...: about 5 connections in 1 s
    -- (at once, it was about 100)
    assert.is_true(n >= 2 and n <= 10, n .. " connections in 1 s")
    assert.matches("ended the stream", tostring(w.last_error), 1, true)
  end)

end)
