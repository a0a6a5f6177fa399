-- paygate.http.request{ sink = } against a real local server: the body
-- arrives chunk by chunk in the calling coroutine and is never held whole.
local paygate = require "paygate"
local core = require "paygate.core"
local server = require "support.server"

local PATTERN = "0123456789abcdef"

local APP = [[
local paygate = require "paygate"
local big = {}
paygate.route("GET", "/bytes/:n", function(req)
  local n = tonumber(req.params.n)
  big[n] = big[n] or ("0123456789abcdef"):rep(n / 16)
  return 200, big[n], { ["X-Len"] = tostring(n) }
end)
paygate.route("GET", "/empty", function() return 204, "" end)
paygate.route("GET", "/slow", function() paygate.sleep(2) return 200, "late" end)
]]

-- the pattern as it continues at byte offset `off`
local function expect_at(off, n)
  local r = off % 16
  local s = PATTERN:sub(r + 1) .. PATTERN
  return s:sub(1, math.min(n, 16))
end

describe("paygate.http.request with a sink", function()
  local srv

  setup(function() srv = server.start{ source = APP } end)
  teardown(function() if srv then srv:stop() end end)

  it("raises on misuse", function()
    assert.has_error(function()
      paygate.http.request{ url = srv:url("/empty"), sink = "file" } end)
    assert.has_error(function()
      paygate.http.request{ url = srv:url("/empty"), on_headers = print } end)
    assert.has_error(function()
      paygate.http.request{ url = srv:url("/empty"), sink = print,
                            on_headers = 1 } end)
  end)

  it("streams a body larger than max_body with bounded Lua memory", function()
    local size = 48 * 1024 * 1024        -- 3x the default max_body
    collectgarbage()
    local base = collectgarbage("count")
    local peak, total, chunks, bad = 0, 0, 0, nil
    local got_status, got_len
    local res, err = paygate.http.request{
      url = srv:url("/bytes/" .. size), timeout = 120,
      on_headers = function(status, headers)
        assert.equal(0, total)           -- before the first chunk
        got_status, got_len = status, headers["x-len"]
      end,
      sink = function(chunk)
        if not bad and chunk:sub(1, 16) ~= expect_at(total, #chunk) then
          bad = total
        end
        total = total + #chunk
        chunks = chunks + 1
        local kb = collectgarbage("count")
        if kb > peak then peak = kb end
      end }
    assert.is_nil(err)
    assert.equal(200, res.status)
    assert.is_nil(res.body)
    assert.equal(200, got_status)
    assert.equal(tostring(size), got_len)
    assert.equal(tostring(size), res.headers["content-length"])
    assert.equal(size, total)
    assert.is_nil(bad)
    assert.is_true(chunks > 100, chunks .. " chunks")
    print(("\n# streamed %d MiB in %d chunks, Lua heap peak +%d KiB"):format(
      size / 1048576, chunks, peak - base))
    -- the body is 48 MiB; the Lua heap never grew by more than 16 MiB
    assert.is_true(peak - base < 16 * 1024,
                   ("peak grew by %d KiB"):format(peak - base))
  end)

  it("lets the sink yield; the transfer waits for it (back-pressure)", function()
    local size = 4 * 1024 * 1024
    local total, n = 0, 0
    local res = assert(paygate.http.request{ url = srv:url("/bytes/" .. size),
      sink = function(chunk)
        assert.is_true(#chunk <= 128 * 1024, #chunk)
        n = n + 1
        if n % 8 == 0 then paygate.sleep(0.001) end
        total = total + #chunk
      end })
    assert.equal(200, res.status)
    assert.equal(size, total)
  end)

  it("applies an explicit max_body to the total", function()
    local res, err = paygate.http.request{ url = srv:url("/bytes/1048576"),
      max_body = 100000, sink = function() end }
    assert.is_nil(res)
    assert.equal("body_too_large", err.kind)
  end)

  it("ends at once for a response without a body", function()
    local called = false
    local res = assert(paygate.http.request{ url = srv:url("/empty"),
      sink = function() called = true end })
    assert.equal(204, res.status)
    assert.is_false(called)
  end)

  it("aborts when the sink raises, returns false or nil, err", function()
    local cases = {
      function() error("disk full") end,
      function() return false end,
      function() return nil, "stop here" end,
    }
    for i, sink in ipairs(cases) do
      local res, err = paygate.http.request{
        url = srv:url("/bytes/4194304"), sink = sink }
      assert.is_nil(res, "case " .. i)
      assert.equal("aborted", err.kind, "case " .. i)
      assert.is_true(core.is_error(err))
      assert.is_false(err.retryable)
    end
    local _, err = paygate.http.request{ url = srv:url("/bytes/1024"),
      sink = function() end,
      on_headers = function(status) return nil, "status " .. status end }
    assert.equal("aborted", err.kind)
    assert.matches("status 200", err.message)
    -- the client still works after aborted transfers
    assert.equal(200, assert(paygate.http.request{
      url = srv:url("/bytes/16") }).status)
  end)

  it("classifies transport errors as request does", function()
    local port = core.free_port()
    local res, err = paygate.http.request{ url = "http://127.0.0.1:" .. port .. "/",
                                           sink = function() end }
    assert.is_nil(res)
    assert.equal("connect", err.kind)
    assert.is_false(err.sent)
    res, err = paygate.http.request{ url = srv:url("/slow"), timeout = 0.2,
                                     sink = function() end }
    assert.is_nil(res)
    assert.equal("timeout", err.kind)
    assert.is_true(err.sent)
  end)

  it("times out while the sink holds the transfer", function()
    local t0 = paygate.update_time()
    local res, err = paygate.http.request{ url = srv:url("/bytes/8388608"),
      timeout = 0.5, sink = function() paygate.sleep(0.1) end }
    assert.is_nil(res)
    assert.equal("timeout", err.kind)
    assert.is_true(paygate.update_time() - t0 < 3)
  end)

  it("is cancellable: a cancelled task stops its transfer", function()
    local started = false
    local task = paygate.spawn(function()
      return paygate.http.request{ url = srv:url("/bytes/33554432"),
        sink = function() started = true; paygate.sleep(0.01) end }
    end)
    local deadline = paygate.update_time() + 10
    while not started and paygate.update_time() < deadline do
      paygate.sleep(0.005)
    end
    assert.is_true(started)
    task:cancel()
    -- and one waiting in read (no sink pause) is cancelled too
    local t2 = paygate.spawn(function()
      return paygate.http.request{ url = srv:url("/slow"),
                                   sink = function() end }
    end)
    paygate.sleep(0.05)
    t2:cancel()
    collectgarbage()
    assert.equal(200, assert(paygate.http.request{
      url = srv:url("/bytes/16") }).status)
  end)

  it("a coroutine waiting on a stream another one opened is woken when "
     .. "the opener ends and the transfer is aborted", function()
    local hcore = require "paygate.http.core"
    local s
    local opener = paygate.spawn(function()
      s = hcore.stream{ url = srv:url("/slow") }
    end)
    opener:wait()
    -- the opener ended before this: its transfer was aborted. A reader
    -- that waits while it ends must be woken too, not left for ever
    local got, done
    local reader = paygate.spawn(function()
      got = { s:headers() }
      done = true
    end)
    local t0 = paygate.update_time()
    while not done and paygate.update_time() - t0 < 5 do
      paygate.sleep(0.01)
    end
    assert.is_true(done)
    assert.is_nil(got[1])
    assert.is_true(paygate.update_time() - t0 < 1)
    local s2, waiting = nil, false
    local opener2 = paygate.spawn(function()
      s2 = hcore.stream{ url = srv:url("/slow") }
      paygate.sleep(0.1)              -- ends while the reader waits
    end)
    paygate.sleep(0.02)
    done, got = false, nil
    local reader2 = paygate.spawn(function()
      waiting = true
      got = { s2:headers() }
      done = true
    end)
    t0 = paygate.update_time()
    while not done and paygate.update_time() - t0 < 5 do
      paygate.sleep(0.01)
    end
    assert.is_true(waiting)
    assert.is_true(done, "the reader was never woken")
    assert.is_nil(got[1])
    assert.is_true(paygate.update_time() - t0 < 1)
    reader:cancel() reader2:cancel() opener2:cancel()
    s:close() s2:close()
  end)
end)
