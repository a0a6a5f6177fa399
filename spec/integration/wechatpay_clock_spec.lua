-- The clock against WeChat's, measured on every verified answer: the
-- simulator (a real HTTP server) run with its clock 90 s ahead
-- (clock_offset, a test aid) signs its answers 90 s ahead; an app's client
-- shows paygate_wechatpay_clock_skew_seconds{mchid} about -90 on /metrics
-- and logs one warning (NTP, and what 300 s would break), once for the
-- instance however many answers and workers (both answer some); paygate
-- doctor warns, its clock line (the answers' Date) as its clock_skew line
-- (their Wechatpay-Timestamp). At 0 offset: a gauge about 0, no warning,
-- doctor ok. 400 s ahead (answers refused as stale): doctor fails the
-- clock; a request refused for its timestamp says by how much.
local testing = require "paygate.testing"
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local proc = require "support.proc"

local APP = [[
local paygate = require "paygate"
local wechatpay = require "paygate.wechatpay"
local ffi = require "ffi"
pcall(ffi.cdef, "int getpid(void);")
local pid = tostring(ffi.C.getpid())
local wx = assert(wechatpay.client(paygate.config_copy().wechatpay))
paygate.route("GET", "/call", function()
  local res, err = wx:request("GET", "/v3/certificates")
  if not res then return 502, { error = tostring(err) } end
  return 200, pid                 -- the worker that answered
end)
paygate.route("GET", "/skew", function()
  local skew, at = wx:clock_skew()
  return 200, { skew = skew, at = at }
end)]]

local WARNING = "wechatpay: this host's clock is"

-- calls on new connections until both workers have answered some
-- (bounded): each worker's client then measured the skew. returns the
-- workers seen.
local function call_both(app)
  local pids, n, i = {}, 0, 0
  while (n < 2 or i < 6) and i < 400 do
    i = i + 1
    local res = app:request{ path = "/call",
                             headers = { Connection = "close" } }
    assert.equal(200, res.status, res.body)
    if not pids[res.body] then pids[res.body] = true; n = n + 1 end
  end
  return n
end

local function gauge(app, mchid)
  local body = assert(app:admin_get("/metrics")).body
  local v = body:match('paygate_wechatpay_clock_skew_seconds{mchid="'
                       .. mchid .. '"} (%S+)\n')
  return tonumber(v), body
end

local function warnings(app)
  local found = {}
  for line in (app:logs() or ""):gmatch("[^\n]+") do
    if line:find(WARNING, 1, true) then found[#found + 1] = line end
  end
  return found
end

-- paygate doctor on the merchant's client config: its results by kind
local function doctor(dir, wc)
  local path = dir .. "/conf." .. crypto.random_nonce(8) .. ".lua"
  local f = assert(io.open(path, "w"))
  local parts = {}
  for k, v in pairs(wc) do
    parts[#parts + 1] = ("[%q] = %s"):format(k, type(v) == "string"
      and ("%q"):format(v) or tostring(v))
  end
  f:write("return { wechatpay = { ", table.concat(parts, ", "), " } }\n")
  f:close()
  local log = path .. ".out"
  local p = proc.spawn({ PAYGATE_BIN, "doctor", "--json", "--config", path },
                       { log = log })
  local code = p:wait(60)
  if code == nil then p:kill(proc.SIGKILL); p:wait(2) end
  local out = proc.read(log)
  local r = {}
  for line in out:gmatch("[^\n]+") do
    if line:sub(1, 1) == "{" then
      local x = json.decode(line)
      if x and x.kind then r[x.kind] = r[x.kind] or x end
    end
  end
  return r, out
end

teardown(function() testing.stop_all() end)

describe("a WeChat clock 90 s ahead", function()
  local sim, app

  setup(function()
    sim = testing.simulator{ config = { clock_offset = 90 } }
    app = testing.start_app{ source = APP, workers = 2,
                             config = { wechatpay = sim:client_config() } }
  end)

  it("shows on /metrics as about -90, from the calls' answers", function()
    -- both workers answer some (was: six calls on whatever connection,
    -- which one worker may have answered alone: the warning below was
    -- then one whether or not the workers shared its mark)
    assert.equal(2, call_both(app))
    local v, body = gauge(app, sim.merchant.mchid)
    assert.is_truthy(v, body)
    assert.is_true(v > -92 and v < -88, tostring(v))
    assert.is_truthy(body:find("# TYPE paygate_wechatpay_clock_skew_seconds"
                               .. " gauge\n", 1, true), body)
    -- the client's own record: the latest answer's, and when
    local res = app:request{ path = "/skew" }
    assert.equal(200, res.status, res.body)
    local last = json.decode(res.body)
    assert.is_true(last.skew > -92 and last.skew < -88, tostring(last.skew))
    assert.is_true(math.abs(last.at - os.time()) < 30)
  end)

  it("logs one warning for the instance, naming NTP and the 300 s"
     .. " window", function()
    assert.equal(2, call_both(app))
    local lines = warnings(app)
    assert.equal(1, #lines, table.concat(lines, "\n"))
    local n = tonumber(lines[1]:match("clock is (%d+) s behind WeChat Pay's"))
    assert.is_truthy(n, lines[1])
    assert.is_true(n >= 88 and n <= 92, lines[1])
    assert.matches("NTP", lines[1], 1, true)
    assert.matches("at 300 s off WeChat refuses every request", lines[1], 1,
                   true)
    assert.matches(sim.merchant.mchid, lines[1], 1, true)
  end)

  it("paygate doctor warns, with the measured skew", function()
    local r, out = doctor(app.dir, sim:client_config())
    assert.equal("ok", r.signed_call and r.signed_call.status, out)
    local c = r.clock_skew
    assert.is_truthy(c, out)
    assert.equal("warn", c.status, out)
    assert.is_truthy(c.cause:match("9[0-2] s behind WeChat")
                     or c.cause:match("8[89] s behind WeChat"), c.cause)
    assert.matches("NTP", c.fix, 1, true)
    -- and the clock line, from the API host's Date, agrees: WeChat's Date
    -- and timestamp are one clock (was: the simulator's Date was the
    -- host's, ok, beside a clock_skew 90 s off)
    local d = r.clock
    assert.is_truthy(d, out)
    assert.equal("warn", d.status, out)
    local n = tonumber(d.cause:match("this clock is (%d+) s behind the API"
                                     .. " host's"))
    assert.is_truthy(n, d.cause)
    assert.is_true(n >= 88 and n <= 92, d.cause)
  end)
end)

describe("a WeChat clock in step", function()
  local sim, app

  setup(function()
    sim = testing.simulator()
    app = testing.start_app{ source = APP,
                             config = { wechatpay = sim:client_config() } }
  end)

  it("shows about 0 and warns of nothing", function()
    for _ = 1, 3 do
      assert.equal(200, app:request{ path = "/call" }.status)
    end
    local v, body = gauge(app, sim.merchant.mchid)
    assert.is_truthy(v, body)
    assert.is_true(math.abs(v) < 2, tostring(v))
    assert.same({}, warnings(app))
  end)

  it("paygate doctor says ok", function()
    local r, out = doctor(app.dir, sim:client_config())
    local c = r.clock_skew
    assert.is_truthy(c, out)
    assert.equal("ok", c.status, out)
  end)
end)

describe("a WeChat clock 400 s ahead", function()
  it("paygate doctor says the calls will fail", function()
    -- (a simulator that still takes this side's timestamps, 400 s off:
    -- its answers come back, refused as stale)
    local sim = testing.simulator{ config = { clock_offset = 400,
                                              timestamp_window = 1000 } }
    local r, out = doctor(sim.dir, sim:client_config())
    assert.equal("fail", r.signed_call and r.signed_call.status, out)
    local c = r.clock_skew
    assert.is_truthy(c, out)
    assert.equal("fail", c.status, out)
    assert.matches("6 min %d+ s behind WeChat", c.cause)
    assert.matches("(stale_timestamp)", c.detail, 1, true)
    assert.matches("NTP", c.fix, 1, true)
    assert.equal("fail", r.clock and r.clock.status, out)
  end)

  it("a refused request says by how much, from WeChat's Date", function()
    -- (past the window: WeChat refuses the request's timestamp; the
    -- client measures this host's clock against the answer's Date. Was:
    -- the simulator's Date was the host's, "agrees ... within 2 s")
    local sim = testing.simulator{ config = { clock_offset = 400 } }
    local wx = sim:client()
    local res, err = wx:request("GET", "/v3/certificates")
    assert.is_nil(res)
    assert.equal("sign_error", err.kind, tostring(err))
    assert.is_number(err.clock_skew, tostring(err))
    assert.is_true(err.clock_skew > -402 and err.clock_skew < -398,
                   tostring(err.clock_skew))
    assert.matches("this host's clock is 400 s behind WeChat's",
                   err.message, 1, true)
    wx:stop()
  end)
end)

describe("the simulator's clock_offset", function()
  it("past a day either way stops its start, naming the key", function()
    for _, bad in ipairs({ 86401, -86401, "90" }) do
      local ok, err = pcall(testing.simulator,
                            { config = { clock_offset = bad } })
      assert.is_false(ok)
      assert.matches("config.clock_offset: must be a number of seconds from "
                     .. "-86400 to 86400", tostring(err), 1, true)
    end
  end)
end)

-- An answer signed with a platform certificate the client does not hold
-- waits for the certificate download its serial starts; that download's
-- answer, verified meanwhile, is the newer reading of WeChat's clock.
-- Before: the waiting call's reading (taken when its answer came) was
-- recorded after the download's and replaced it: the client's latest
-- reading went back by the download's time (here 1 s: a download held at
-- WeChat), and the gauge with it.
describe("an answer that waited for a certificate download", function()
  it("leaves the download's newer reading of the clock", function()
    local core = require "paygate.core"
    local sim = testing.simulator()
    local wx = sim:client(nil, { download_min_interval = 0.1 })
    local no = sim:order{ notify_url = "https://example.com/notify",
                          client = wx }
    sim:fault{ endpoint = "query", kind = "expired_certificate",
               expires_in = 3600, count = 1 }
    sim:fault{ endpoint = "certificates", kind = "latency", seconds = 1,
               count = 1 }
    local before = select(2, wx:clock_skew())
    local t0 = core.time()
    testing.wait_until(function() return core.time() >= t0 + 0.2 end, 5,
                       "the download rate limit over")
    assert(wx:query_by_out_trade_no(no))
    local done = core.time()
    local skew, at = wx:clock_skew()
    assert.is_number(skew)
    assert.is_true(at > before, "no reading recorded")
    -- the download answered within the last 0.5 s; the query's answer
    -- came before the download started, a second earlier
    assert.is_true(done - at < 0.5, ("the latest reading is %.3f s old")
                                    :format(done - at))
    wx:stop()
  end)
end)
