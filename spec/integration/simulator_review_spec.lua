-- Findings of a review of the simulator and the client it serves, each
-- pinned here: the new-user flow (a typed client with an http:// loopback
-- notify_url), configured platform keys, one-line config errors with two
-- workers, the connection-reset fault, exact header spellings over a raw
-- socket, and the fault endpoint names.
local paygate = require "paygate"
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local wechatpay = require "paygate.wechatpay"
local sn = require "support.simnotify"

local function order_no()
  return "REV" .. crypto.random_nonce(16)
end

local function client(sim, extra)
  local conf = { mchid = sn.MCHID, appid = sn.APPID,
    merchant_private_key = sn.KEY_PATH, merchant_serial = sn.SERIAL,
    apiv3_key = sn.APIV3, base_url = sim.base, timeout = 5, deadline = 10 }
  for k, v in pairs(extra or {}) do conf[k] = v end
  return assert(wechatpay.client(conf))
end

describe("the new-user flow", function()
  local sim, recv
  setup(function()
    sim = sn.start{ time_scale = 1000, answer_timeout = 1 }
    recv = sn.receiver()
  end)
  teardown(function()
    if sim then sim:stop() end
    if recv then recv:stop() end
  end)

  it("wx:native_prepay with an http:// loopback notify_url, paid via "
     .. "/sim/, notifies the receiver", function()
    local wx = client(sim)
    local no = order_no()
    local url = sn.notify_url(recv, "newuser")
    assert.truthy(url:match("^http://127%.0%.0%.1:%d+/"))
    local res, err = wx:native_prepay({ description = "new user",
      out_trade_no = no, notify_url = url, amount = { total = 5 } })
    assert.truthy(res, tostring(err))
    assert.truthy(res.code_url)
    sn.pay(sim, no)
    local list
    sn.wait_until(function()
      list = sn.received(recv, "newuser")
      return #list >= 1
    end, 20, "the payment notification")
    local _, plain = sn.decrypt(list[1])
    assert.equal(no, plain.out_trade_no)
    assert.equal("SUCCESS", plain.trade_state)
    wx:stop()
  end)

  it("the client still refuses http:// to a host that is not loopback",
     function()
    local wx = client(sim)
    for _, url in ipairs({ "http://example.com/notify",
                           "http://localhost:1@example.com/notify",
                           "http://127.0.0.1.example.com/notify",
                           "http://127.0.0.1/notify?x=1" }) do
      local res, err = wx:native_prepay({ description = "d",
        out_trade_no = order_no(), notify_url = url,
        amount = { total = 1 } })
      assert.is_nil(res, url)
      assert.equal("invalid_params", err.kind, url)
      assert.truthy(tostring(err):find("notify_url", 1, true), url)
    end
    -- [::1] and localhost are loopback
    for _, url in ipairs({ "http://[::1]:9/n", "http://localhost:9/n" }) do
      local _, body = wx:prepay_request("native", { description = "d",
        out_trade_no = order_no(), notify_url = url,
        amount = { total = 1 } })
      assert.truthy(type(body) == "string", url)
    end
    wx:stop()
  end)
end)

describe("platform keys given in the config", function()
  it("replace the generated ones on a restart of the same state_dir",
     function()
    local server = require "support.server"
    local state = server.tmpdir()
    local sim = sn.start{ state_dir = state }
    local first = sn.platform_certs(sim)
    sim:stop()
    local kf, cf = state .. "/given_key.pem", state .. "/given_cert.pem"
    assert(os.execute(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s "
      .. "-out %s -days 30 -subj '/CN=Tenpay.com sign' -set_serial "
      .. "0x3A1B2C3D4E5F60718293A4B5C6D7E8F901234567 2>/dev/null")
      :format(kf, cf)) == 0)
    local serial = "3A1B2C3D4E5F60718293A4B5C6D7E8F901234567"
    assert.is_nil(first[serial])
    sim = sn.start{ state_dir = state, extra = ("platform_private_key = %q, "
      .. "platform_certificate = %q"):format(kf, cf) }
    local ok, err = pcall(function()
      local now = sn.platform_certs(sim)
      local serials = {}
      for s in pairs(now) do serials[#serials + 1] = s end
      assert.same({ serial }, serials)
      local res = sn.signed(sim, "GET", "/v3/certificates")
      assert.equal(200, res.status)
      assert.equal(serial, res.headers["wechatpay-serial"])
    end)
    sim:stop()
    assert(ok, err)
  end)

  it("an expired one is said at the start", function()
    local fx = "spec/fixtures/wechatpay/"
    local sim = sn.start{ extra = ("platform_private_key = %q, "
      .. "platform_certificate = %q"):format(fx .. "a5_platform_key.pem",
                                             fx .. "a6_platform_cert.pem") }
    local ok, err = pcall(function()
      local logs = sim:logs()
      assert.matches("no platform certificate is valid now: %x+ expired at"
                     .. " 2025%-05%-09", logs)
      local _, n = logs:gsub("no platform certificate is valid now", "")
      assert.equal(1, n)
    end)
    sim:stop()
    assert(ok, err)
  end)
end)

describe("a bad configuration with two workers", function()
  local server = require "support.server"
  local proc = require "support.proc"
  local sc = require "support.simclient"

  local function run(conf)
    local dir = server.tmpdir()
    local f = assert(io.open(dir .. "/c.lua", "w"))
    f:write(conf)
    f:close()
    local p = proc.spawn({ os.getenv("PAYGATE_BIN") or "build/paygate", "run",
      "examples/simulator", "--listen", "127.0.0.1:"
      .. require("paygate.core").free_port(), "--admin", "off",
      "--workers", "2", "--config", dir .. "/c.lua" },
      { log = dir .. "/log" })
    local code = p:wait(30)
    local log = proc.read(dir .. "/log")
    return code, log, dir
  end

  it("is one line on stderr naming the key, and exit 2", function()
    for _ = 1, 3 do
      local code, log = run(sc.config("/tmp/never-made", "colour = 'red',"))
      assert.equal(2, code)
      assert.equal("simulator: config.colour: unknown key\n", log)
    end
  end)

  it("never repeats a key body pasted where a path or PEM belongs",
     function()
    -- a private key's base64 body without its PEM lines
    local body = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"
    local code, log = run(sc.config("/tmp/never-made",
      "public_key_id = 'PUB_KEY_ID_0114232134912410000000000000000001',"
      .. " public_key_private_key = '" .. body .. "',"))
    assert.equal(2, code)
    assert.matches("config.public_key_private_key: not PEM text", log, 1,
                   true)
    assert.is_nil(log:find(body:sub(1, 24), 1, true), log)
  end)

  it("a state_dir that cannot be made: one line, no mkdir chatter",
     function()
    local dir = server.tmpdir()
    local f = assert(io.open(dir .. "/file", "w"))
    f:close()
    local code, log = run(sc.config(dir .. "/file/state"))
    assert.equal(2, code)
    assert.equal("simulator: config.state_dir: cannot create " .. dir
                 .. "/file/state (Not a directory)\n", log)
  end)
end)

-- recv until the peer ends: the bytes and the errno of the end (104
-- ECONNRESET for a reset, 0 for an orderly close)
local function read_to_end(conn)
  local ffi = require "ffi"
  local parts, buf = {}, ffi.new("char[4096]")
  while true do
    local n = ffi.C.recv(conn.fd, buf, 4096, 0)
    if n < 0 then return table.concat(parts), ffi.errno() end
    if n == 0 then return table.concat(parts), 0 end
    parts[#parts + 1] = ffi.string(buf, n)
  end
end

local function sc_read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

-- the raw bytes of a signed request, as simnotify.signed signs it
local function raw_request(method, target, body, serial)
  local key = assert(crypto.private_key(sc_read(sn.KEY_PATH)))
  local ts, nonce = tostring(os.time()), crypto.random_nonce(32)
  local msg = method .. "\n" .. target .. "\n" .. ts .. "\n" .. nonce .. "\n"
              .. (body or "") .. "\n"
  local sig = assert(crypto.sign_base64(key, msg,
                                        "WECHATPAY2-SHA256-RSA2048"))
  local auth = ('WECHATPAY2-SHA256-RSA2048 mchid="%s",nonce_str="%s",'
    .. 'timestamp="%s",serial_no="%s",signature="%s"'):format(sn.MCHID,
    nonce, ts, serial or sn.SERIAL, sig)
  return method .. " " .. target .. " HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    .. "Authorization: " .. auth .. "\r\nAccept: application/json\r\n"
    .. "User-Agent: review-spec\r\nContent-Type: application/json\r\n"
    .. "Content-Length: " .. #(body or "") .. "\r\nConnection: close\r\n\r\n"
    .. (body or "")
end


describe("faults", function()
  local rawtcp = require "support.rawtcp"
  local sim
  setup(function() sim = sn.start{} end)
  teardown(function() if sim then sim:stop() end end)
  after_each(function() sn.ctl(sim, "DELETE", "/sim/faults") end)

  local function prepay_bytes(no)
    return json.encode({ appid = sn.APPID, mchid = sn.MCHID,
      description = "reset " .. no, out_trade_no = no,
      notify_url = "https://merchant.example/n",
      amount = { total = 1, currency = "CNY" } })
  end

  local function query(no)
    return sn.signed(sim, "GET", "/v3/pay/transactions/out-trade-no/" .. no
                     .. "?mchid=" .. sn.MCHID)
  end

  it("reset: the connection is reset unanswered, nothing is created",
     function()
    local st = sn.ctl(sim, "POST", "/sim/faults",
                      { endpoint = "prepay", kind = "reset", count = 1 })
    assert.equal(200, st)
    local no = order_no()
    local c = assert(rawtcp.connect(sim.port, 10))
    assert(c:send(raw_request("POST", "/v3/pay/transactions/native",
                              prepay_bytes(no))))
    local got, errno = read_to_end(c)
    c:close()
    assert.equal("", got)
    assert.equal(104, errno)
    assert.equal(404, query(no).status)
    -- the count is spent: the same request now succeeds
    local res = sn.signed(sim, "POST", "/v3/pay/transactions/native",
                          prepay_bytes(no))
    assert.equal(200, res.status)
  end)

  it("reset with after = true: the order exists, the answer is lost",
     function()
    sn.ctl(sim, "POST", "/sim/faults",
           { endpoint = "prepay", kind = "reset", count = 1, after = true })
    local no = order_no()
    local c = assert(rawtcp.connect(sim.port, 10))
    assert(c:send(raw_request("POST", "/v3/pay/transactions/native",
                              prepay_bytes(no))))
    local got, errno = read_to_end(c)
    c:close()
    assert.equal("", got)
    assert.equal(104, errno)
    assert.equal(200, query(no).status)
  end)

  it("a typo in the endpoint, or a kind on the wrong endpoint, is 400",
     function()
    local st, doc = sn.ctl(sim, "POST", "/sim/faults",
                           { endpoint = "prepayy", kind = "error" })
    assert.equal(400, st)
    assert.truthy(doc.message:find('"prepay"', 1, true))
    st = sn.ctl(sim, "POST", "/sim/faults",
                { endpoint = "prepay", kind = "never_sent" })
    assert.equal(400, st)
    st = sn.ctl(sim, "POST", "/sim/faults",
                { endpoint = "notify", kind = "reset" })
    assert.equal(400, st)
    for _, e in ipairs({ "*", "notify", "query", "tradebill",
                         "certificates" }) do
      st = sn.ctl(sim, "POST", "/sim/faults", { endpoint = e,
        kind = e == "notify" and "never_sent" or "bad_signature" })
      assert.equal(200, st, e)
    end
    local _, list = sn.ctl(sim, "GET", "/sim/faults")
    assert.equal(5, #list)
  end)

  it("latency and error combine: the error still fires", function()
    sn.ctl(sim, "POST", "/sim/faults", { endpoint = "query",
           kind = "latency", seconds = 0.3, count = 1 })
    sn.ctl(sim, "POST", "/sim/faults", { endpoint = "query",
           kind = "error", status = 503, count = 1 })
    local t0 = require("paygate.core").time()
    local res = query(order_no())
    assert.equal(503, res.status)
    assert.is_true(require("paygate.core").time() - t0 >= 0.29)
  end)
end)

describe("control_listen", function()
  it("elsewhere: /sim/ is not served on this listener; /v3 still is",
     function()
    local sim = sn.start{ extra = 'control_listen = "127.0.0.1:1"' }
    local ok, err = pcall(function()
      local st, doc = sn.ctl(sim, "GET", "/sim/public-key")
      assert.equal(404, st)
      assert.equal("NOT_FOUND", doc.code)
      assert.equal(200, sn.signed(sim, "GET", "/v3/certificates").status)
    end)
    sim:stop()
    assert(ok, err)
  end)
end)

describe("the notification deliverer's fencing", function()
  -- the simulator's own deliverer on a real SQLite database in this
  -- process: a deliverer whose lease was taken over can neither claim an
  -- attempt nor record one as delivered
  local sql = require "paygate.sql"
  local migrate = require "paygate.migrate"
  local lease = require "paygate.lease"
  local server = require "support.server"
  local saved_path

  setup(function()
    saved_path = package.path
    package.path = "examples/simulator/?.lua;" .. package.path
  end)
  teardown(function() package.path = saved_path end)

  -- a fresh simulator database holding the pending notifications ids
  -- (due a second ago); returns it and a row(id) reader
  local function store(ids)
    local db = assert(sql.open("sqlite:" .. server.tmpdir() .. "/sim.db"))
    assert(migrate.run(db, "examples/simulator/migrations"))
    local now = require("paygate.core").time()
    for _, id in ipairs(ids) do
      assert(db:exec("INSERT INTO sim_notifications (id, mchid, notify_url,"
        .. " event_type, summary, original_type, resource, body, "
        .. "create_time, created_at, state, attempts, next_at) VALUES ($1, "
        .. "'1900007291', 'http://127.0.0.1:1/n', 'TRANSACTION.SUCCESS', "
        .. "'s', 'transaction', '{}', '{\"id\":1}', "
        .. "'2026-01-01T00:00:00+08:00', $2, 'pending', 0, $2)",
        { id, now - 1 }))
    end
    local function row(id)
      return assert(db:query("SELECT * FROM sim_notifications WHERE id = $1",
                             { id }))[1]
    end
    return db, row
  end

  -- a deliverer on db holding the lease for ttl seconds
  local function deliverer(db, ttl, answer_timeout)
    local notify = require "sim.notify"
    local l = assert(lease.acquire(db, notify.LEASE_KEY, ttl))
    return setmetatable({ ctx = { config = { answer_timeout = answer_timeout,
      time_scale = 1 } }, db = db, lease = l, in_flight = 0 },
      notify.Deliverer)
  end

  it("a lost lease cannot mark a notification delivered", function()
    local notify = require "sim.notify"
    local db, row = store({ "N1", "N2" })
    local d = deliverer(db, 0.2, 1)
    local r1 = row("N1")
    local n = d:claim(r1)
    assert.equal(1, n)
    -- the lease expires and another worker takes it over
    require("support.proc").wait_until(function()
      return lease.acquire(db, notify.LEASE_KEY, 30) ~= nil
    end, 5, "the takeover")
    d:finish(r1, n, { status = 204, latency = 0.01 }, 0)
    assert.equal("pending", row("N1").state)
    -- nor may it claim the next one
    local r2 = row("N2")
    local n2 = d:claim(r2)
    assert.is_nil(n2)
    assert.equal(0, row("N2").attempts)
    db:close()
  end)

  it("an attempt claimed between list's two reads is in flight", function()
    -- notify.list reads the notifications, then their attempts: a claim
    -- landing in between must not read as an interrupted attempt
    local notify = require "sim.notify"
    local db, row = store({ "N1" })
    local d = deliverer(db, 30, 5)
    local r = row("N1")
    local claimed
    local racing = { query = function(_, q, p)
      local rows, err = db:query(q, p)
      if not claimed and q:find("FROM sim_notifications", 1, true) then
        claimed = assert(d:claim(r))
      end
      return rows, err
    end }
    local list = assert(notify.list(racing, { id = "N1" }))
    assert.equal(1, claimed)
    assert.equal(1, #list[1].attempts)
    assert.equal("in_flight: no answer yet", list[1].attempts[1].error)
    db:close()
  end)

  it("the holder's finish marks it delivered", function()
    local db, row = store({ "N1" })
    local d = deliverer(db, 30, 1)
    local r = row("N1")
    local n = assert(d:claim(r))
    d:finish(r, n, { status = 204, latency = 0.01 }, 0)
    assert.equal("delivered", row("N1").state)
    db:close()
  end)
end)

describe("exact bytes on the wire", function()
  local rawtcp = require "support.rawtcp"
  local server = require "support.server"
  local sim
  setup(function()
    -- the merchant of simnotify with a second appid
    sim = server.start{ app = "examples/simulator", config = ([[
return { state_dir = %q, merchants = { { mchid = %q, apiv3_key = %q,
  appids = { %q, "wx2222222222222222" }, merchant_public_key = %q,
  merchant_serial = %q } } }]]):format(server.tmpdir(), sn.MCHID, sn.APIV3,
      sn.APPID, sn.PUB_PATH, sn.SERIAL) }
    sim.base = "http://127.0.0.1:" .. sim.port
  end)
  teardown(function() if sim then sim:stop() end end)

  local function exchange(method, target, body, serial)
    local c = assert(rawtcp.connect(sim.port, 10))
    assert(c:send(raw_request(method, target, body, serial)))
    local got = read_to_end(c)
    c:close()
    local head = got:match("^(.-\r\n)\r\n")
    assert.truthy(head, got)
    return tonumber(head:match("^HTTP/1%.1 (%d+)")), head
  end

  it("a signed answer's headers are spelled exactly as WeChat's", function()
    local st, head = exchange("GET", "/v3/certificates")
    assert.equal(200, st)
    for _, name in ipairs({ "Wechatpay-Serial", "Wechatpay-Timestamp",
                            "Wechatpay-Nonce", "Wechatpay-Signature",
                            "Request-ID" }) do
      assert.truthy(head:find("\r\n" .. name .. ": ", 1, true), name)
    end
    assert.is_nil(head:find("\r\nWechatpay-Signature-Type: ", 1, true))
    -- an error: unsigned, with its Request-ID
    st, head = exchange("GET", "/v3/pay/transactions/out-trade-no/"
                        .. "NOPE12345?mchid=" .. sn.MCHID)
    assert.equal(404, st)
    assert.truthy(head:find("\r\nRequest-ID: ", 1, true))
    assert.is_nil(head:lower():find("\r\nwechatpay%-signature:"))
  end)

  it("an Authorization sent twice is 401 SIGN_ERROR, though each verifies",
     function()
    local req = raw_request("GET", "/v3/certificates")
    local auth = req:match("\r\n(Authorization: [^\r]*)\r\n")
    assert.truthy(auth)
    local cut = #req - 2                 -- before the head's closing CRLF
    req = req:sub(1, cut) .. auth .. "\r\n\r\n"
    local c = assert(rawtcp.connect(sim.port, 10))
    assert(c:send(req))
    local got = read_to_end(c)
    c:close()
    assert.equal("401", got:match("^HTTP/1%.1 (%d+)"), got)
    assert.truthy(got:find('"code":"SIGN_ERROR"', 1, true), got)
  end)

  it("the merchant serial matches in any case, and with leading zeros",
     function()
    assert.equal(200, (exchange("GET", "/v3/certificates", nil,
                                sn.SERIAL:lower())))
    assert.equal(200, (exchange("GET", "/v3/certificates", nil,
                                "00" .. sn.SERIAL)))
    assert.equal(401, (exchange("GET", "/v3/certificates", nil,
                                sn.SERIAL:sub(1, -2) .. "0")))
  end)

  it("an out_trade_no reused with another appid is 403 OUT_TRADE_NO_USED",
     function()
    local no = order_no()
    local function body(appid)
      return json.encode({ appid = appid, mchid = sn.MCHID,
        description = "appid " .. no, out_trade_no = no,
        notify_url = "https://merchant.example/n",
        amount = { total = 1, currency = "CNY" } })
    end
    local res = sn.signed(sim, "POST", "/v3/pay/transactions/native",
                          body(sn.APPID))
    assert.equal(200, res.status)
    res = sn.signed(sim, "POST", "/v3/pay/transactions/native",
                    body("wx2222222222222222"))
    assert.equal(403, res.status, res.body)
    assert.equal("OUT_TRADE_NO_USED", json.decode(res.body).code)
    -- the same appid and bytes again is a re-entry, not a reuse
    res = sn.signed(sim, "POST", "/v3/pay/transactions/native",
                    body(sn.APPID))
    assert.equal(200, res.status)
  end)
end)

describe("the control API and a browser page from elsewhere", function()
  -- A page the developer opens while scripts/run runs could POST a form
  -- (or a no-cors fetch) to http://127.0.0.1:9000/sim/...: the browser is
  -- on loopback, so the address check alone let it pay orders, rotate
  -- the platform certificate or inject faults; a DNS-rebound page (its
  -- own name pointed at 127.0.0.1, Host: evil.example) could read it too.
  local sim
  setup(function() sim = sn.start{} end)
  teardown(function() if sim then sim:stop() end end)

  local function ctl(method, path, headers)
    local h = { ["Content-Type"] = "text/plain" }
    for k, v in pairs(headers or {}) do h[k] = v end
    local res, err = paygate.http.request{ method = method,
      url = sim.base .. path, body = method == "POST" and "{}" or nil,
      timeout = 10, headers = h }
    assert(res, tostring(err))
    return res.status, json.decode(res.body) or res.body
  end

  it("refuses a cross-site Origin or Sec-Fetch-Site and a foreign Host,"
     .. " and pays nothing", function()
    local no = order_no()
    sn.prepay(sim, no, "http://127.0.0.1:9/notify")
    for _, h in ipairs({
      { Origin = "https://evil.example" },
      { Origin = "null" },
      { ["Sec-Fetch-Site"] = "cross-site" },
      { ["Sec-Fetch-Site"] = "same-site" },
      { Host = "evil.example" },
      { Host = "evil.example:" .. sim.port },
    }) do
      local k, v = next(h)
      local st, doc = ctl("POST", "/sim/transactions/" .. no .. "/pay", h)
      assert.equal(403, st, k .. ": " .. v)
      assert.equal("FORBIDDEN", doc.code)
      assert.truthy(doc.message:find("browser page from elsewhere", 1, true),
                    doc.message)
      st = ctl("GET", "/sim/public-key", h)
      assert.equal(403, st, "GET with " .. k .. ": " .. v)
    end
    local res = sn.signed(sim, "GET", "/v3/pay/transactions/out-trade-no/"
                          .. no .. "?mchid=" .. sn.MCHID)
    assert.equal(200, res.status, res.body)
    assert.equal("NOTPAY", json.decode(res.body).trade_state)
  end)

  it("takes curl, scripts and its own origin as before", function()
    local no = order_no()
    sn.prepay(sim, no, "http://127.0.0.1:9/notify")
    local origin = "http://127.0.0.1:" .. sim.port
    assert.equal(200, (ctl("GET", "/sim/public-key",
      { Origin = origin, ["Sec-Fetch-Site"] = "same-origin" })))
    assert.equal(200, (ctl("GET", "/sim/public-key",
      { Host = "localhost:" .. sim.port, ["Sec-Fetch-Site"] = "none" })))
    assert.equal(200, (ctl("POST", "/sim/transactions/" .. no .. "/pay")))
  end)
end)
