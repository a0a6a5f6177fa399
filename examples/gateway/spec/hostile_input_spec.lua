-- examples/gateway: hostile input on every route of the merchant API.
-- Each bad input gets a classified 4xx (never a 5xx, nothing stored, no
-- store or Lua error text), and good inputs at the edges are taken.
local testing = require "paygate.testing"
local core = dofile("examples/gateway/spec/core_support.lua")
local json = require "paygate.json"

describe("gateway hostile input", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim)
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  local n = 0
  local function order_id()
    n = n + 1
    return "hostile-" .. n
  end

  local function stored(id)
    return #assert(gw.db:query("SELECT id FROM gw_payments WHERE"
      .. " order_id = $1", { id }))
  end

  -- a 4xx of this error (and field), nothing stored for the order, and
  -- no store or Lua error text in the answer
  local function refused(res, status, err, field, oid)
    assert.equal(status, res.status, res.body)
    assert.equal(err, res.json.error, res.body)
    if field then assert.truthy(res.json.fields[field], res.body) end
    assert.falsy(res.body:find("traceback", 1, true), res.body)
    assert.falsy(res.body:find("%.lua:%d"), res.body)
    assert.falsy(res.body:lower():find("sql"), res.body)
    if oid then assert.equal(0, stored(oid)) end
  end

  -- a create body with one raw JSON field spliced in
  local function create_raw(oid, extra, channel)
    return gw:call("POST", "/v1/payments", '{"order_id":"' .. oid
      .. '","channel":"' .. (channel or "native") .. '","amount":1,'
      .. '"description":"tea"' .. (extra or "") .. '}')
  end

  it("refuses amounts that are not whole fen, and takes the edges",
     function()
    for _, a in ipairs{ "1e308", "-0", "0", "1.5", '"100"',
                        "9007199254740993", "true", "null", "[]", "{}",
                        "10000000001" } do
      local oid = order_id()
      local res = gw:call("POST", "/v1/payments", '{"order_id":"' .. oid
        .. '","channel":"native","amount":' .. a .. ',"description":"tea"}')
      refused(res, 400, "invalid_request", "amount", oid)
    end
    local oid = order_id()
    refused(gw:call("POST", "/v1/payments", '{"order_id":"' .. oid
      .. '","channel":"native","amount":1e400,"description":"tea"}'),
      400, "invalid_json", nil, oid)
    -- the answer names the bounds (was: "at least 1" for 10000000001)
    oid = order_id()
    local res = gw:call("POST", "/v1/payments", '{"order_id":"' .. oid
      .. '","channel":"native","amount":10000000001,"description":"tea"}')
    refused(res, 400, "invalid_request", "amount", oid)
    assert.equal("must be a whole number of fen, 1 .. 10000000000",
                 res.json.fields.amount)
    for _, a in ipairs{ "1", "10000000000" } do
      oid = order_id()
      local res = gw:call("POST", "/v1/payments", '{"order_id":"' .. oid
        .. '","channel":"native","amount":' .. a .. ',"description":"tea"}')
      assert.equal(201, res.status, res.body)
      assert.equal(tonumber(a), res.json.payment.amount)
    end
  end)

  it("refuses text WeChat does not take in description and attach",
     function()
    for _, field in ipairs{ "description", "attach" } do
      for _, v in ipairs{ '"a\255b"', '"a\\u0000b"', '"a\\u007fb"',
                          '"' .. string.rep("x", 10240) .. '"',
                          '"\240\159\141\181"', '"\\ud83c\\udf75"', "5" } do
        local oid = order_id()
        local text = { description = '"tea"', attach = '"x"' }
        text[field] = v
        local json = '{"order_id":"' .. oid .. '","channel":"native",'
          .. '"amount":1,"description":' .. text.description
          .. ',"attach":' .. text.attach .. '}'
        refused(gw:call("POST", "/v1/payments", json), 400,
                "invalid_request", field, oid)
      end
    end
    -- at the edges: 127 (128) three-byte characters
    local oid = order_id()
    local res = gw:call("POST", "/v1/payments", { order_id = oid,
      channel = "native", amount = 1,
      description = string.rep("\232\140\182", 127),
      attach = string.rep("\232\140\182", 128) })
    assert.equal(201, res.status, res.body)
    oid = order_id()
    refused(gw:call("POST", "/v1/payments", { order_id = oid,
      channel = "native", amount = 1,
      description = string.rep("\232\140\182", 128) }),
      400, "invalid_request", "description", oid)
  end)

  it("holds order_id to 1..64 of its characters, expires_in to its range",
     function()
    local res = gw:call("POST", "/v1/payments", { order_id =
      string.rep("a", 64), channel = "native", amount = 1,
      description = "tea" })
    assert.equal(201, res.status, res.body)
    res = gw:call("POST", "/v1/payments", { order_id = "-_.:|*@",
      channel = "native", amount = 1, description = "tea" })
    assert.equal(201, res.status, res.body)
    for _, oid in ipairs{ string.rep("b", 65), "", "a b", "a/b", "a%b",
                          "\195\169", "a\0b", "a+b", "a\nb" } do
      refused(gw:call("POST", "/v1/payments", { order_id = oid,
        channel = "native", amount = 1, description = "tea" }),
        400, "invalid_request", "order_id", oid)
    end
    -- at least 120: WeChat is reported to refuse a time_expire less than
    -- a minute ahead (before: 60 was taken)
    for _, e in ipairs{ "60", "119", "604801", "120.5", '"120"', "null" } do
      local oid = order_id()
      local res = create_raw(oid, ',"expires_in":' .. e)
      refused(res, 400, "invalid_request", "expires_in", oid)
      assert.equal("must be whole seconds, 120 .. 604800",
                   res.json.fields.expires_in, res.body)
    end
    for _, e in ipairs{ 120, 604800 } do
      res = create_raw(order_id(), ',"expires_in":' .. e)
      assert.equal(201, res.status, res.body)
      local p = res.json.payment
      assert.near(p.created_at + e, p.expires_at, 1)
    end
  end)

  it("refuses bodies that are not one JSON object", function()
    local oid = order_id()
    local ok = '{"order_id":"' .. oid .. '","channel":"native","amount":1,'
               .. '"description":"tea"}'
    for _, case in ipairs{
      { "\239\187\191" .. ok, "invalid_json" },          -- a UTF-8 BOM
      { (ok:gsub("}$", ",}")), "invalid_json" },            -- trailing comma
      { "", "invalid_json" }, { "   ", "invalid_json" },
      { ok .. "{}", "invalid_json" },
      { string.rep("[", 1001) .. string.rep("]", 1001), "invalid_json" },
      { "[" .. ok .. "]", "invalid_request" },
      { "null", "invalid_request" }, { '"x"', "invalid_request" },
    } do
      refused(gw:call("POST", "/v1/payments", case[1]), 400, case[2], nil,
              oid)
    end
    -- nested 1000 deep: decoded, then refused by field
    refused(gw:call("POST", "/v1/payments", '{"order_id":"' .. oid
      .. '","channel":"native","description":"tea","amount":'
      .. string.rep("[", 999) .. string.rep("]", 999) .. '}'),
      400, "invalid_request", "amount", oid)
    -- past the runtime's body limit (5 MiB)
    local res = gw:call("POST", "/v1/payments", (ok:gsub('"tea"', '"'
      .. string.rep("x", 6 * 1024 * 1024) .. '"')))
    assert.equal(413, res.status)
    assert.equal(0, stored(oid))
  end)

  it("refuses a key given twice in a payment or a refund body", function()
    -- was: the last amount won (5 fen), while a merchant system whose
    -- JSON reader keeps the first had checked 100
    local oid = order_id()
    local body = '{"order_id":"' .. oid .. '","channel":"native",'
                 .. '"amount":100,"description":"tea","amount":5}'
    local res = gw:call("POST", "/v1/payments", body)
    refused(res, 400, "invalid_json", nil, oid)
    assert.equal('request body is not valid JSON: duplicate key "amount"'
                 .. " at byte " .. body:find('"amount":5', 1, true),
                 res.json.message)
    -- nested: a payer's openid twice
    refused(gw:call("POST", "/v1/payments", '{"order_id":"' .. oid
      .. '","channel":"jsapi","amount":1,"description":"tea",'
      .. '"payer":{"openid":"o-1","openid":"o-2"}}'), 400, "invalid_json",
      nil, oid)
    local p = gw:create{ amount = 100 }
    sim:pay(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    res = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                  '{"amount":100,"reason":"r","amount":5}')
    refused(res, 400, "invalid_json")
    assert.matches('duplicate key "amount"', res.json.message, 1, true)
    assert.equal(0, #assert(gw.db:query("SELECT id FROM gw_refunds WHERE"
      .. " payment_id = $1", { p.id })))
    -- one key in two objects is no duplicate: decoded, refused by field
    local oid2 = order_id()
    refused(gw:call("POST", "/v1/payments", '{"order_id":"' .. oid2
      .. '","channel":"jsapi","amount":1,"description":"tea",'
      .. '"payer":{"openid":"o-1","amount":1}}'), 400, "invalid_request",
      "payer.amount", oid2)
  end)

  it("refuses a payer openid that is not printable ASCII, before WeChat",
     function()
    -- was: a NUL or a control went to WeChat; bytes that are not UTF-8
    -- got 502 wechat_error from the client's own check, with the payment
    -- stored (created) for an order whose input was bad
    for _, v in ipairs{ '"a\\u0000b"', '"a\\u0001b"', '"o\255"',
                        '"o\\u00e9"', '"o p"' } do
      local oid = order_id()
      refused(create_raw(oid, ',"payer":{"openid":' .. v .. '}', "jsapi"),
              400, "invalid_request", "payer.openid", oid)
    end
    local p = gw:create{ amount = 100 }
    refused(gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
      '{"channel":"jsapi","payer":{"openid":"o\255"}}'),
      400, "invalid_request", "payer.openid")
    assert.equal(1, #gw:get(p.id).attempts)
    local res = create_raw(order_id(),
      ',"payer":{"openid":"oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"}', "jsapi")
    assert.equal(201, res.status, res.body)
  end)

  it("refuses a service provider's payer fields for a direct merchant",
     function()
    -- sp_openid and sub_openid are a partner prepay's payer (a direct
    -- merchant's WeChat Pay client would refuse them after the payment
    -- was stored): 400 naming the field, on a create and a switch
    for _, f in ipairs{ "sp_openid", "sub_openid" } do
      local oid = order_id()
      local res = create_raw(oid, ',"payer":{"' .. f .. '":"o-1"}', "jsapi")
      refused(res, 400, "invalid_request", "payer." .. f, oid)
      assert.matches("service provider", res.json.fields["payer." .. f], 1,
                     true)
      local p = gw:create{ amount = 100 }
      refused(gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
        '{"channel":"jsapi","payer":{"' .. f .. '":"o-1"}}'),
        400, "invalid_request", "payer." .. f)
      assert.equal(1, #gw:get(p.id).attempts)
    end
  end)

  it("takes an h5 client_ip only as an IPv4 or IPv6 address", function()
    -- was: any run of hex digits, dots and colons (":::", "1.2.3",
    -- "999.1.1.1") went to WeChat, which refused the prepay: a 502
    -- wechat_error, the payment stored for an order whose input was bad
    for _, v in ipairs{ '":::"', '"1.2.3"', '"999.1.1.1"', '"01.2.3.4"',
                        '"1::2::3"', '"12345::1"', '"fe80::1%eth0"',
                        '"1:2:3:4:5:6:7"', '" 203.0.113.7"', '""', "7" } do
      local oid = order_id()
      refused(create_raw(oid, ',"client_ip":' .. v, "h5"),
              400, "invalid_request", "client_ip", oid)
    end
    local p = gw:create{ amount = 100 }
    refused(gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
      '{"channel":"h5","client_ip":"1.2.3"}'),
      400, "invalid_request", "client_ip")
    assert.equal(1, #gw:get(p.id).attempts)
    for _, v in ipairs{ "203.0.113.7", "2001:db8::1", "::ffff:192.0.2.1" } do
      local res = create_raw(order_id(), ',"client_ip":"' .. v .. '"', "h5")
      assert.equal(201, res.status, res.body)
      assert.truthy(res.json.h5_url or res.json.payment, res.body)
    end
  end)

  it("checks another channel's fields when given, takes them null",
     function()
    -- a body one client sends for every channel: its junk is refused even
    -- where the field is not used (was: a native payment took payer "x",
    -- client_ip 5 and h5_type [])
    -- (and an empty array, which decodes to an empty table: was taken
    -- for a payer object, where [1] was refused)
    for _, c in ipairs{ { ',"payer":"x"', "payer" },
                        { ',"payer":[]', "payer" },
                        { ',"payer": [ ]', "payer" },
                        { ',"payer":{"openid":5}', "payer.openid" },
                        { ',"client_ip":5', "client_ip" },
                        { ',"h5_type":[]', "h5_type" } } do
      local oid = order_id()
      refused(create_raw(oid, c[1], "native"), 400, "invalid_request", c[2],
              oid)
    end
    local res = create_raw(order_id(), ',"payer":null,"client_ip":null,'
      .. '"h5_type":null', "native")
    assert.equal(201, res.status, res.body)
    res = create_raw(order_id(), ',"client_ip":"203.0.113.7",'
      .. '"payer":{"openid":"o-1"}', "native")
    assert.equal(201, res.status, res.body)
    local p = res.json.payment
    refused(gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
      '{"channel":"h5","client_ip":"203.0.113.7","payer":[]}'),
      400, "invalid_request", "payer")
    assert.equal(1, #gw:get(p.id).attempts)
  end)

  it("refuses an appid that is not one as the WeChat Pay client sends it,"
     .. " as it does a sub_appid", function()
    -- was: type and length only ("must be an appid" for false or 33
    -- characters; "wx 1" or "" told to be the merchant's appid, and
    -- stored as given for a merchant that lists none)
    for _, a in ipairs{ '""', '"wx 1"', '"wx1<b>"', '"wx\\u00e91"',
                        '"' .. ("w"):rep(33) .. '"', "false", "1" } do
      local oid = order_id()
      local res = create_raw(oid, ',"appid":' .. a)
      refused(res, 400, "invalid_request", "appid", oid)
      assert.equal("must be an appid (1 to 32 letters, digits, _ and -)",
                   res.json.fields.appid, a)
    end
    -- the merchant's own, given: taken
    local oid = order_id()
    local res = create_raw(oid, ',"appid":"' .. sim.merchant.appid .. '"')
    assert.equal(201, res.status, res.body)
    assert.equal(sim.merchant.appid, res.json.payment.appid)
  end)

  it("refuses false for every field of a create, a switch, a refund",
     function()
    -- was: "currency": false was taken for no currency (CNY), where the
    -- contract says "CNY" and every other field refused it
    local body = '{"order_id":"%s","channel":"native","amount":1,'
                 .. '"description":"tea"}'
    for _, f in ipairs{ "order_id", "channel", "amount", "currency",
                        "description", "payer", "client_ip", "h5_type",
                        "expires_in", "attach", "mchid", "sub_mchid",
                        "appid" } do
      local oid = order_id()
      local b = assert(json.decode(body:format(oid)))
      b[f] = false
      local res = gw:call("POST", "/v1/payments", b)
      refused(res, 400, "invalid_request", f, f ~= "order_id" and oid)
    end
    local p = gw:create{ amount = 100 }
    for _, f in ipairs{ "channel", "payer", "client_ip", "h5_type" } do
      local b = { channel = "h5", client_ip = "203.0.113.7" }
      b[f] = false
      refused(gw:call("POST", "/v1/payments/" .. p.id .. "/attempts", b),
              400, "invalid_request", f)
    end
    assert.equal(1, #gw:get(p.id).attempts)
    sim:pay(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    for _, b in ipairs{ { amount = false }, { amount = 1, reason = false } } do
      refused(gw:call("POST", "/v1/payments/" .. p.id .. "/refunds", b),
              400, "invalid_request", b.amount and "reason" or "amount")
    end
    assert.equal(0, #assert(gw.db:query("SELECT id FROM gw_refunds WHERE"
      .. " payment_id = $1", { p.id })))
  end)

  it("refuses an empty JSON array where an object belongs", function()
    -- was: [] decoded to an empty table, taken for {}: a close with it
    -- closed the payment, the others answered field by field
    local p = gw:create{ amount = 100 }
    local oid = order_id()
    for _, case in ipairs{ { "/v1/payments", "[]" },
                           { "/v1/payments", " [ ] " },
                           { "/v1/payments/" .. p.id .. "/attempts", "[]" },
                           { "/v1/payments/" .. p.id .. "/close", "[]" },
                           { "/v1/payments/" .. p.id .. "/refunds", "[]" } } do
      local res = gw:call("POST", case[1], case[2])
      refused(res, 400, "invalid_request", nil, oid)
      assert.equal("the body must be a JSON object", res.json.message)
    end
    local got = gw:get(p.id)
    assert.equal("paying", got.state)
    assert.equal(1, #got.attempts)
    -- {} and no body still close
    assert.equal(200, gw:call("POST", "/v1/payments/" .. p.id .. "/close",
                              "{}").status)
  end)

  it("refuses an unusable Idempotency-Key, takes 255 characters",
     function()
    for _, k in ipairs{ "", string.rep("k", 256), string.rep("k", 300),
                        "k\195\164", "k\tk" } do
      local oid = order_id()
      refused(gw:call("POST", "/v1/payments", { order_id = oid,
        channel = "native", amount = 1, description = "tea" },
        { ["Idempotency-Key"] = k }), 400, "invalid_idempotency_key", nil,
        oid)
    end
    local res = gw:call("POST", "/v1/payments", { order_id = order_id(),
      channel = "native", amount = 1, description = "tea" },
      { ["Idempotency-Key"] = string.rep("k", 255) })
    assert.equal(201, res.status, res.body)
  end)

  it("names at most 10 unknown fields, each by its first 64 bytes",
     function()
    -- was: every one, whole: 20000 unknown keys (250 KB) were answered
    -- with 940 KB; 5 MB of them with 21 MB, after seconds of the worker
    local oid = order_id()
    local keys = {}
    for i = 1, 20000 do keys[i] = '"k' .. i .. '":1' end
    local res = create_raw(oid, "," .. table.concat(keys, ",") .. ',"'
                           .. string.rep("x", 100000) .. '":1')
    refused(res, 400, "invalid_request", nil, oid)
    local named = 0
    for k, v in pairs(res.json.fields) do
      named = named + 1
      assert.equal("unknown field", v)
      assert.truthy(#k <= 64 + 3, "a name of " .. #k .. " bytes")
    end
    assert.equal(10, named)
    assert.truthy(#res.body < 2000, #res.body)
    res = create_raw(oid, ',"' .. string.rep("y", 100) .. '":1')
    refused(res, 400, "invalid_request", string.rep("y", 64) .. "...", oid)
    refused(create_raw(oid, ',"expire_in":60'), 400, "invalid_request",
            "expire_in", oid)
  end)

  it("keeps no refused body for its Idempotency-Key: the fix runs",
     function()
    -- was: the 400 was stored as the key's answer, so the corrected
    -- request under the same key was 422 idempotency_key_reused for 24 h
    local oid = order_id()
    local key = { ["Idempotency-Key"] = "fix-" .. oid }
    refused(gw:call("POST", "/v1/payments", { order_id = oid,
      channel = "native", amount = 0, description = "tea" }, key),
      400, "invalid_request", "amount", oid)
    refused(gw:call("POST", "/v1/payments", '{"order_id":', key), 400,
            "invalid_json", nil, oid)
    assert.equal(0, #assert(gw.db:query("SELECT idem_key FROM"
      .. " paygate_idempotency WHERE idem_key = $1", { key["Idempotency-Key"] })))
    local res = gw:call("POST", "/v1/payments", { order_id = oid,
      channel = "native", amount = 1, description = "tea" }, key)
    assert.equal(201, res.status, res.body)
    -- the same for the payment's other POSTs (a refund's keep rule too)
    local p = res.json.payment
    sim:pay(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    local rk = { ["Idempotency-Key"] = "fix-r-" .. oid }
    refused(gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
      { amount = 1, reason = "r", rason = "typo" }, rk),
      400, "invalid_request", "rason")
    assert.equal(201, gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
      { amount = 1, reason = "r" }, rk).status)
    local ak = { ["Idempotency-Key"] = "fix-a-" .. oid }
    refused(gw:call("POST", "/v1/payments/" .. p.id .. "/close",
      { foo = 1 }, ak), 400, "invalid_request", "foo")
    assert.equal(409, gw:call("POST", "/v1/payments/" .. p.id .. "/close",
      "", ak).status)                           -- paid: ran, not 422
  end)

  it("refuses an encoded body with 415, keeping nothing for its key",
     function()
    -- was: 400 invalid_json for gzip bytes, and a JSON body sent with
    -- Content-Encoding: gzip was taken as it stood (201)
    local oid = order_id()
    local body = { order_id = oid, channel = "native", amount = 1,
                   description = "tea" }
    local key = { ["Idempotency-Key"] = "enc-" .. oid }
    for _, enc in ipairs{ "gzip", "br", "deflate, gzip", "identity" } do
      key["Content-Encoding"] = enc
      local res = gw:call("POST", "/v1/payments", body, key)
      refused(res, 415, "unsupported_content_encoding", nil, oid)
      assert.matches("Content-Encoding", res.json.message, 1, true)
    end
    -- gzip's own bytes (the magic, then anything)
    refused(gw:call("POST", "/v1/payments", "\31\139\8\0\0\0\0\0",
      { ["Content-Encoding"] = "gzip" }), 415, "unsupported_content_encoding",
      nil, oid)
    -- not kept: the same request unencoded, under the same key, runs
    key["Content-Encoding"] = nil
    local res = gw:call("POST", "/v1/payments", body, key)
    assert.equal(201, res.status, res.body)
    local p = res.json.payment
    -- the payment's other POSTs too, the close's empty body included
    local gz = { ["Content-Encoding"] = "gzip" }
    refused(gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
      { channel = "native" }, gz), 415, "unsupported_content_encoding")
    refused(gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
      { amount = 1, reason = "r" }, gz), 415, "unsupported_content_encoding")
    refused(gw:call("POST", "/v1/payments/" .. p.id .. "/close", "", gz),
      415, "unsupported_content_encoding")
    assert.equal("paying", gw:get(p.id).state)
  end)

  it("takes refresh=1 and no other value of refresh", function()
    -- was: ?refresh=yes (=true, =0) answered local state, nothing asked
    local p = gw:create{ amount = 100 }
    for _, v in ipairs{ "yes", "true", "0", "", "1%00" } do
      refused(gw:call("GET", "/v1/payments/" .. p.id .. "?refresh=" .. v),
              400, "invalid_request", "refresh")
    end
    assert.equal("paying", gw:get(p.id, "?refresh=1").state)
    assert.equal("paying", gw:get(p.id).state)
  end)

  it("refuses refresh given twice, in either order", function()
    -- was: the last one counted, so refresh=0&refresh=1 asked WeChat and
    -- refresh=1&refresh=0 was refused
    local p = gw:create{ amount = 100 }
    for _, q in ipairs{ "refresh=0&refresh=1", "refresh=1&refresh=0",
                        "refresh=1&refresh=1", "r%65fresh=1&refresh=1",
                        "refresh=1&x=2&refresh" } do
      local res = gw:call("GET", "/v1/payments/" .. p.id .. "?" .. q)
      refused(res, 400, "invalid_request", "refresh")
      assert.equal("given more than once", res.json.fields.refresh, q)
    end
  end)

  it("refuses a query parameter the GET routes do not take", function()
    -- was: ignored, so ?refersh=1 (or ?Refresh=1) answered the local state
    -- as if refresh had not been asked, with no word that it was not
    local p = gw:create{ amount = 100 }
    sim:pay(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    local r = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                      { amount = 1, reason = "r" })
    assert.equal(201, r.status, r.body)
    local paths = { "/v1/payments/" .. p.id,
                    "/v1/payments/" .. p.id .. "/refunds",
                    "/v1/refunds/" .. r.json.id }
    for _, path in ipairs(paths) do
      for _, c in ipairs{ { "refersh=1", "refersh", "refresh" },
                          { "Refresh=1", "Refresh", "refresh" },
                          { "expand=attempts", "expand" },
                          { "refresh=1&x=1&x=2", "x" } } do
        local res = gw:call("GET", path .. "?" .. c[1])
        refused(res, 400, "invalid_request", c[2])
        assert.equal("unknown parameter" .. (c[3] and " (did you mean "
                     .. c[3] .. "?)" or ""), res.json.fields[c[2]],
                     path .. "?" .. c[1])
      end
      -- both wrongs at once: both named
      local res = gw:call("GET", path .. "?refresh=yes&x=1")
      refused(res, 400, "invalid_request", "refresh")
      assert.equal("unknown parameter", res.json.fields.x, res.body)
      assert.equal(200, gw:call("GET", path .. "?refresh=1").status)
      assert.equal(200, gw:call("GET", path).status)
    end
  end)

  it("answers odd payment ids in the path with 400 or 404", function()
    local p = gw:create{ amount = 100 }
    for _, case in ipairs{ { "pay_x%00", 400, "bad_path" },
                           { p.id .. "%00", 400, "bad_path" },
                           { "..%2F..%2Fadmin", 400, "bad_path" },
                           { "pay_x%2Fy", 404, "not_found" },
                           { string.rep("p", 200), 404, "not_found" },
                           { "%ff", 404, "not_found" } } do
      refused(gw:call("GET", "/v1/payments/" .. case[1]), case[2], case[3])
      refused(gw:call("POST", "/v1/payments/" .. case[1] .. "/close", ""),
              case[2], case[3])
      refused(gw:call("POST", "/v1/payments/" .. case[1] .. "/refunds",
              { amount = 1 }), case[2], case[3])
      refused(gw:call("GET", "/v1/refunds/" .. case[1]), case[2], case[3])
    end
    assert.equal("paying", gw:get(p.id).state)
  end)

  it("refunds up to what is left, and not a fen more", function()
    local p = gw:create{ amount = 100 }
    sim:pay(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    local R = "/v1/payments/" .. p.id .. "/refunds"
    for _, a in ipairs{ "0", "-0", "1.5", '"10"', "1e308", "true", "null",
                        "9007199254740993" } do
      refused(gw:call("POST", R, '{"amount":' .. a .. '}'), 400,
              "invalid_request", "amount")
    end
    local res = gw:call("POST", R, '{"amount":10000000001}')
    refused(res, 400, "invalid_request", "amount")
    assert.equal("must be a whole number of fen, 1 .. 10000000000",
                 res.json.fields.amount)
    res = gw:call("POST", R, { amount = 101 })
    refused(res, 422, "refund_exceeds_paid")
    assert.equal(100, res.json.refundable)
    assert.equal(201, gw:call("POST", R, { amount = 60 }).status)
    res = gw:call("POST", R, { amount = 41 })
    refused(res, 422, "refund_exceeds_paid")
    assert.equal(40, res.json.refundable)
    assert.equal(201, gw:call("POST", R, { amount = 40 }).status)
    res = gw:call("POST", R, { amount = 1 })
    refused(res, 422, "refund_exceeds_paid")
    assert.equal(0, res.json.refundable)
    assert.equal(2, #assert(gw.db:query("SELECT id FROM gw_refunds WHERE"
      .. " payment_id = $1", { p.id })))
  end)
end)
