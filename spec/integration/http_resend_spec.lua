-- paygate.http.request never sends a POST (or PATCH) twice on its own.
-- libcurl sends a request again on a new connection when a reused
-- keep-alive connection dies before any byte of the answer; the server
-- (spec/support/resetter.lua) read the first copy whole before it reset
-- the connection, so it may have acted on it. Counted at the server.
local paygate = require "paygate"
local core = require "paygate.core"
local proc = require "support.proc"

describe("paygate.http.request on a connection reset after the request",
         function()
  local p, port, log, out

  setup(function()
    port = core.free_port()
    log, out = os.tmpname(), os.tmpname()
    p = proc.spawn({ PAYGATE_BIN, "exec", "spec/support/resetter.lua",
                     tostring(port), log, "300" }, { log = out })
    proc.wait_until(function() return proc.read(out):find("listening") end,
                    10, "the resetter to listen")
  end)

  teardown(function()
    if p then p:kill(proc.SIGKILL); p:wait(5) end
    os.remove(log)
    os.remove(out)
  end)

  local function url(path) return "http://127.0.0.1:" .. port .. path end

  local n = 0
  local function unique(what)
    n = n + 1
    return what .. "-" .. n .. "-" .. core.mono()
  end

  -- how many requests the server read whole with this line
  local function seen(line)
    local count = 0
    for l in (proc.read(log) or ""):gmatch("[^\n]+") do
      if l == line then count = count + 1 end
    end
    return count
  end

  -- a request on a connection the server already answered once (the
  -- client keeps it alive): the next one goes out on a reused connection
  local function warm()
    local res = assert(paygate.http.request{ url = url("/ok") })
    assert.equal(200, res.status)
  end

  -- every request made before this one was read by the server: a
  -- re-send would be in the log by now (curl re-sends before it returns)
  local function settle()
    local mark = unique("mark")
    assert(paygate.http.request{ url = url("/mark?" .. mark) })
    proc.wait_until(function() return seen("GET /mark?" .. mark .. " ") == 1
                    end, 5, "the marker at the server")
  end

  local function refused(method, body, extra)
    warm()
    local opts = { url = url("/reset"), method = method, body = body,
                   timeout = 5 }
    for k, v in pairs(extra or {}) do opts[k] = v end
    local res, err = paygate.http.request(opts)
    settle()
    assert.is_nil(res, res and res.body)
    assert.is_true(core.is_error(err))
    assert.equal("closed", err.kind, tostring(err))
    assert.is_true(err.sent)
    assert.matches("not sent again", err.message)
    assert.equal(1, seen(method .. " /reset " .. (body or "")))
  end

  it("fails a POST the server read and reset: sent once, err.sent",
     function()
    refused("POST", unique("prepay"))
  end)

  it("does the same for PATCH, a POST with an empty body, and a stream",
     function()
    refused("PATCH", unique("patch"))
    refused("POST", "")
    refused("POST", unique("streamed"), { sink = function() end })
  end)

  it("fails a GET too when resend = false", function()
    warm()
    local res, err = paygate.http.request{ url = url("/reset-get"),
                                           resend = false, timeout = 5 }
    settle()
    assert.is_nil(res)
    assert.equal("closed", err.kind)
    assert.is_true(err.sent)
    assert.equal(1, seen("GET /reset-get "))
  end)

  -- the server does make curl send again: the cases above are not vacuous
  it("sends again what may be sent again: GET by default, resend = true",
     function()
    local before = seen("GET /reset-get ")
    warm()
    local res = assert(paygate.http.request{ url = url("/reset-get"),
                                             timeout = 5 })
    assert.equal(200, res.status)
    assert.equal(before + 2, seen("GET /reset-get "))
    local body = unique("again")
    warm()
    res = assert(paygate.http.request{ url = url("/reset"), method = "POST",
                                       body = body, resend = true,
                                       timeout = 5 })
    assert.equal(200, res.status)
    assert.equal(2, seen("POST /reset " .. body))
  end)

  it("refuses a resend that is not a boolean", function()
    assert.has_error(function()
      paygate.http.request{ url = url("/ok"), resend = "no" }
    end, "http.request: opts.resend must be a boolean")
  end)
end)
