-- paygate.http.request against a server that breaks HTTP/1.1
-- (spec/support/broken_http.py): an answer cut short, bytes on an idle
-- keep-alive connection that answer no request.
local paygate = require "paygate"
local core = require "paygate.core"
local proc = require "support.proc"

describe("paygate.http.request facing a broken server", function()
  local p, port, log

  setup(function()
    port = core.free_port()
    log = os.tmpname()
    p = proc.spawn({ "python3", "spec/support/broken_http.py",
                     tostring(port), log }, { watchdog = true })
    proc.wait_until(function() return proc.read(log):find("ready") end,
                    10, "broken_http.py")
  end)

  teardown(function()
    if p then p:stop() end
    os.remove(log)
  end)

  local function url(path) return "http://127.0.0.1:" .. port .. path end

  it("fails closed, not a 200, for an answer whose head is cut short",
     function()
    -- "HTTP/1.1 200 OK\r\nX-A: a\r\nContent-Length: 2\r\n\r\nok": the head
    -- is its first 46 bytes; any cut before its blank line ended, or in
    -- the body, is no answer
    for n = 1, 47 do
      local res, err = paygate.http.request{ url = url("/cut-" .. n),
                                             timeout = 5 }
      assert.is_nil(res, "cut at " .. n .. ": status "
                    .. tostring(res and res.status))
      assert.equal("closed", err.kind, "cut at " .. n)
      assert.is_true(err.sent)
      -- streamed, the head is not handed over either
      local heads = 0
      res, err = paygate.http.request{ url = url("/cut-" .. n), timeout = 5,
        on_headers = function() heads = heads + 1 end,
        sink = function() end }
      assert.is_nil(res, "streamed, cut at " .. n)
      assert.equal("closed", err.kind, "streamed, cut at " .. n)
      if n < 46 then assert.equal(0, heads, "streamed, cut at " .. n) end
    end
    local res = assert(paygate.http.request{ url = url("/cut-48") })
    assert.equal(200, res.status)
    assert.equal("ok", res.body)
    assert.equal("a", res.headers["x-a"])
  end)
end)
