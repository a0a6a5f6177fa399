-- Smaller findings of the simulator's review, each pinned: notify_url
-- rules, strict UTF-8 and detail, unknown /v3 paths, the Authorization
-- parser, the merchants array, notification attempts in flight, and the
-- duplicate fault's state.
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local sn = require "support.simnotify"

local function sn_read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local function order_no()
  return "NIT" .. crypto.random_nonce(16)
end

local function prepay_body(no, over)
  local b = { appid = sn.APPID, mchid = sn.MCHID, description = "nit " .. no,
    out_trade_no = no, notify_url = "https://merchant.example/n",
    amount = { total = 1, currency = "CNY" } }
  for k, v in pairs(over or {}) do b[k] = v end
  return json.encode(b)
end

describe("simulator review nits", function()
  local sim
  setup(function() sim = sn.start{} end)
  teardown(function() if sim then sim:stop() end end)

  local function prepay(over)
    local no = order_no()
    local res = sn.signed(sim, "POST", "/v3/pay/transactions/native",
                          prepay_body(no, over))
    return res, json.decode(res.body)
  end

  it("checks a signature over the target as sent, dot-segments and all",
     function()
    -- the server routes by the resolved path (/v3/certificates) while the
    -- merchant signed the bytes it sent
    local res = sn.signed(sim, "GET", "/v3/x/%2e%2e/certificates")
    assert.equal(200, res.status, res.body)
  end)

  it("notify_url: [::1] is loopback; the simulator itself is refused",
     function()
    local res = prepay{ notify_url = "http://[::1]:8080/notify" }
    assert.equal(200, res.status, res.body)
    for _, url in ipairs({
        "http://127.0.0.1:" .. sim.port .. "/sim/transactions/x/pay",
        "http://localhost:" .. sim.port .. "/n",
        -- the same port with leading zeros: the client connects to it
        -- all the same, and its /sim/ API took the notification for a
        -- command (paying another order)
        "http://127.0.0.1:0" .. sim.port .. "/sim/transactions/x/pay",
        "http://[::1]:000" .. sim.port .. "/n",
        "http://localhost:1@example.com/n" }) do
      local r, doc = prepay{ notify_url = url }
      assert.equal(400, r.status, url)
      assert.equal("/notify_url", doc.detail.field, url)
    end
  end)

  it("strings must be UTF-8 of 1-3 byte characters; detail an object",
     function()
    local r, doc = prepay{ description = "coffee \240\159\152\128" }
    assert.equal(400, r.status)
    assert.equal("/description", doc.detail.field)
    r, doc = prepay{ attach = "bad \255 byte" }
    assert.equal(400, r.status)
    assert.equal("/attach", doc.detail.field)
    r = prepay{ description = "咖啡 café" }
    assert.equal(200, r.status, r.body)
    r, doc = prepay{ detail = "not an object" }
    assert.equal(400, r.status)
    assert.equal("/detail", doc.detail.field)
  end)

  it("unknown /v3 paths and methods: WeChat's shape with a Request-ID",
     function()
    local res = sn.signed(sim, "GET", "/v3/no/such/thing")
    assert.equal(404, res.status)
    local doc = json.decode(res.body)
    assert.equal("NOT_FOUND", doc.code)
    assert.equal("string", type(doc.message))
    assert.truthy(res.headers["request-id"])
    res = sn.signed(sim, "DELETE", "/v3/certificates")
    assert.equal(405, res.status)
    assert.equal("METHOD_NOT_ALLOWED", json.decode(res.body).code)
    assert.truthy(res.headers["request-id"])
    res = sn.signed(sim, "GET", "/v3/pay/transactions/native")
    assert.equal(405, res.status)
    -- OPTIONS as well (the runtime's own 405 body before)
    res = sn.signed(sim, "OPTIONS", "/v3/certificates")
    assert.equal(405, res.status)
    assert.equal("METHOD_NOT_ALLOWED", json.decode(res.body).code)
    assert.truthy(res.headers["request-id"])
  end)

  -- The runtime refuses these before any handler: a method no route of
  -- the path has (TRACE, a made-up one) and a path parameter holding a
  -- dot-segment once percent-decoded. They got the runtime's own body
  -- ({"error","message"}) and no Request-ID.
  it("the runtime's refusals under /v3: WeChat's shape with a Request-ID",
     function()
    for _, m in ipairs({ "TRACE", "BREW" }) do
      local res = sn.signed(sim, m, "/v3/certificates")
      assert.equal(405, res.status, m)
      local doc = json.decode(res.body)
      assert.equal("METHOD_NOT_ALLOWED", doc and doc.code, res.body)
      assert.truthy(doc.message:find(m, 1, true), doc.message)
      assert.is_nil(doc.error)
      assert.matches("^%x+%-%d+$", res.headers["request-id"] or "")
      assert.equal("application/json; charset=utf-8",
                   res.headers["content-type"])
      -- (the runtime's Allow stays: RFC 9110 asks it of a 405)
      assert.truthy((res.headers["allow"] or ""):find("GET", 1, true))
    end
    local res = sn.signed(sim, "GET",
                          "/v3/refund/domestic/refunds/..%2f..%2fx")
    assert.equal(400, res.status)
    local doc = json.decode(res.body)
    assert.equal("PARAM_ERROR", doc and doc.code, res.body)
    assert.equal("uri_template", doc.detail.location)
    -- the runtime's reason, as the issue
    assert.matches("dot%-segment", doc.detail.issue or "")
    assert.is_nil(doc.error)
    assert.matches("^%x+%-268435461$", res.headers["request-id"] or "")
    -- the control API is no WeChat answer: the runtime's own, as before
    local st, body = sn.ctl(sim, "GET", "/sim/no/such/thing")
    assert.equal(404, st)
    assert.equal("not_found", type(body) == "table" and body.error, body)
  end)

  it("a bill query's PARAM_ERROR names /query/bill_date", function()
    local res = sn.signed(sim, "GET", "/v3/bill/tradebill?bill_date=2026-13-01")
    assert.equal(400, res.status)
    local doc = json.decode(res.body)
    assert.truthy(doc.message:find("/query/bill_date", 1, true), doc.message)
  end)

  describe("the Authorization parser refuses", function()
    local paygate = require "paygate"
    local function with_auth(mutate)
      local key = assert(crypto.private_key(sn_read(sn.KEY_PATH)))
      local ts, nonce = tostring(os.time()), crypto.random_nonce(32)
      local p = { ts = ts }
      mutate(p)
      local msg = "GET\n/v3/certificates\n" .. p.ts .. "\n" .. nonce .. "\n\n"
      local sig = assert(crypto.sign_base64(key, msg,
                                            "WECHATPAY2-SHA256-RSA2048"))
      local auth = ('WECHATPAY2-SHA256-RSA2048 mchid="%s",nonce_str="%s",'
        .. 'timestamp="%s",serial_no="%s",signature="%s"'):format(sn.MCHID,
        nonce, p.ts, sn.SERIAL, sig) .. (p.suffix or "")
      local res = assert(paygate.http.request{ url = sim.base
        .. "/v3/certificates", timeout = 10, headers = {
          Authorization = auth, Accept = "application/json",
          ["User-Agent"] = "nits" } })
      return res.status, json.decode(res.body)
    end

    it("nothing wrong: 200", function()
      assert.equal(200, (with_auth(function() end)))
    end)
    it("a trailing comma", function()
      local st, doc = with_auth(function(p) p.suffix = "," end)
      assert.equal(401, st)
      assert.equal("SIGN_ERROR", doc.code)
    end)
    it("an unknown parameter", function()
      assert.equal(401, (with_auth(function(p)
        p.suffix = ',realm="x"' end)))
    end)
    it("a timestamp with a leading zero", function()
      local st, doc = with_auth(function(p) p.ts = "0" .. p.ts end)
      assert.equal(401, st)
      assert.equal("timestamp", doc.detail.field)
    end)
  end)
end)

-- A /v3 handler that raises (here: the state database lost the orders
-- table under the running simulator) got the runtime's 500
-- {"error": "internal"}: no Request-ID, not WeChat's shape, and no entry
-- in GET /sim/requests.
describe("simulator: a handler that raises", function()
  it("answers 500 SYSTEM_ERROR with a Request-ID, logged once", function()
    local sql = require "paygate.sql"
    local sim = sn.start{}
    finally(function() sim:stop() end)
    local no = order_no()
    sn.prepay(sim, no, "https://merchant.example/n")
    local db = assert(sql.open("sqlite:" .. sim.state_dir .. "/simulator.db"))
    assert(db:exec("ALTER TABLE sim_orders RENAME TO sim_orders_gone"))
    db:close()
    local res = sn.signed(sim, "GET", "/v3/pay/transactions/out-trade-no/"
                          .. no .. "?mchid=" .. sn.MCHID)
    assert.equal(500, res.status, res.body)
    local doc = json.decode(res.body)
    assert.equal("SYSTEM_ERROR", doc and doc.code, res.body)
    assert.equal("系统繁忙,请稍后重试", doc.message)
    assert.is_nil(doc.error)
    local rid = res.headers["request-id"] or ""
    assert.matches("^%x+%-268435456$", rid)
    assert.equal("application/json; charset=utf-8",
                 res.headers["content-type"])
    -- the log has it once, with its traceback and the Request-ID answered
    local log = sn.wait_until(function()
      local l = sim:logs()
      return l:find(rid, 1, true) and l
    end, 10, "the failure in the log")
    local _, tracebacks = log:gsub("stack traceback", "")
    assert.equal(1, tracebacks, log)
    assert.truthy(log:find("no such table: sim_orders", 1, true), log)
    -- and the request is listed, as every /v3 request is
    local st, reqs = sn.ctl(sim, "GET", "/sim/requests")
    assert.equal(200, st)
    local last = reqs[#reqs]
    assert.equal("query", last.endpoint)
    assert.equal(500, last.status)
    assert.equal("SYSTEM_ERROR", last.code)
  end)
end)

describe("simulator config: merchants", function()
  it("given as a table that is not an array: 'must be an array'", function()
    local server = require "support.server"
    local proc = require "support.proc"
    local dir = server.tmpdir()
    local f = assert(io.open(dir .. "/c.lua", "w"))
    f:write(('return { state_dir = %q, merchants = { first = { mchid = "1" '
             .. '} } }'):format(dir .. "/st"))
    f:close()
    local p = proc.spawn({ os.getenv("PAYGATE_BIN") or "build/paygate", "run",
      "examples/simulator", "--listen", "127.0.0.1:"
      .. require("paygate.core").free_port(), "--admin", "off",
      "--workers", "1", "--config", dir .. "/c.lua" },
      { log = dir .. "/log" })
    assert.equal(2, p:wait(30))
    assert.equal("simulator: config.merchants: must be an array (a key first "
                 .. "found)\n", proc.read(dir .. "/log"))
  end)
end)

describe("simulator notifications: attempts and duplicates", function()
  local sim, recv
  setup(function()
    -- answer_timeout: the attempt held at the receiver stays owned by
    -- the deliverer (answer_timeout + 2 s) however slow the machine is
    sim = sn.start{ time_scale = 1000, answer_timeout = 30 }
    recv = sn.receiver()
  end)
  teardown(function()
    if sim then sim:stop() end
    if recv then recv:stop() end
  end)

  it("an attempt awaiting its answer is in_flight, not interrupted",
     function()
    local no, b = order_no(), "slow" .. crypto.random_nonce(6)
    -- the receiver holds its answer until released: the attempt is
    -- awaiting it for as long as the spec looks
    sn.answer(recv, b, { status = 204, hold = true })
    sn.prepay(sim, no, sn.notify_url(recv, b))
    sn.pay(sim, no)
    local n
    sn.wait_until(function()
      n = sn.notifications(sim, "out_trade_no=" .. no)[1]
      return n and #n.attempts == 1 and #sn.received(recv, b) == 1
    end, 10, "the first attempt")
    assert.equal("pending", n.state)
    assert.truthy(tostring(n.attempts[1].error):match("^in_flight"),
                  n.attempts[1].error)
    sn.release(recv, b)
    sn.wait_until(function()
      n = sn.notifications(sim, "out_trade_no=" .. no)[1]
      return n.state == "delivered"
    end, 10, "the delivery")
    assert.equal(204, n.attempts[1].status)
    assert.is_nil(n.attempts[1].error)
  end)

  it("duplicate: delivered stays delivered, a refused duplicate is not "
     .. "retried", function()
    sn.ctl(sim, "POST", "/sim/faults", { endpoint = "notify",
           kind = "duplicate", count = 1, times = 2 })
    local no, b = order_no(), "dup" .. crypto.random_nonce(6)
    sn.answer(recv, b, { statuses = { 204, 500 }, status = 204 })
    sn.prepay(sim, no, sn.notify_url(recv, b))
    sn.pay(sim, no)
    local n
    sn.wait_until(function()
      n = sn.notifications(sim, "out_trade_no=" .. no)[1]
      return n and n.state == "delivered"
    end, 10, "the first delivery")
    sn.wait_until(function()
      return #sn.received(recv, b) >= 3
    end, 10, "the two duplicates")
    -- the receiver having the third request does not mean the simulator
    -- has recorded its answer yet: wait for the third attempt's status
    sn.wait_until(function()
      n = sn.notifications(sim, "out_trade_no=" .. no)[1]
      return n and n.attempts[3] and n.attempts[3].status ~= nil
    end, 10, "the second duplicate's answer")
    -- the second duplicate came after the first was refused (500): both
    -- are duplicates, and nothing more is sent
    n = sn.notifications(sim, "out_trade_no=" .. no)[1]
    assert.equal("delivered", n.state)
    assert.equal(3, #n.attempts)
    assert.same({ 204, 500, 204 }, { n.attempts[1].status,
      n.attempts[2].status, n.attempts[3].status })
    assert.is_true(n.attempts[2].duplicate)
    assert.is_true(n.attempts[3].duplicate)
    sn.ctl(sim, "DELETE", "/sim/faults")
  end)
end)

describe("simulator faults across workers", function()
  local sim
  setup(function() sim = sn.start{ workers = 2 } end)
  teardown(function() if sim then sim:stop() end end)

  it("keeps every fault added at once through both workers", function()
    -- each add read the list, appended and wrote it back: two workers
    -- adding in the same moment lost one of the two (seen: 195 of 200)
    local paygate = require "paygate"
    local function add_many(n, conc)
      local tasks, left, bad = {}, n, {}
      for t = 1, conc do
        tasks[t] = paygate.spawn(function()
          while left > 0 do
            left = left - 1
            local st, doc = sn.ctl(sim, "POST", "/sim/faults",
              { endpoint = "query", kind = "latency", seconds = 0.001,
                count = 1 })
            if st ~= 200 then bad[#bad + 1] = tostring(st) end
            assert(type(doc) == "table" and doc.id, "no id")
          end
        end)
      end
      for _, t in ipairs(tasks) do t:wait() end
      assert.same({}, bad)
    end
    for round = 1, 3 do
      local st = sn.ctl(sim, "DELETE", "/sim/faults")
      assert.equal(204, st)
      add_many(200, 40)
      local st2, l = sn.ctl(sim, "GET", "/sim/faults")
      assert.equal(200, st2)
      local ids = {}
      for _, f in ipairs(l) do ids[f.id] = true end
      local distinct = 0
      for _ in pairs(ids) do distinct = distinct + 1 end
      assert.equal(200, #l, "round " .. round)
      assert.equal(200, distinct, "round " .. round)
    end
    -- and clear still clears every one of them, on both workers
    assert.equal(204, (sn.ctl(sim, "DELETE", "/sim/faults")))
    for _ = 1, 4 do
      local _, l = sn.ctl(sim, "GET", "/sim/faults")
      assert.equal(0, #l)
    end
  end)
end)
