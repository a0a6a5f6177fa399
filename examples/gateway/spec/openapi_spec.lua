-- examples/gateway/openapi.json: it parses, it is OpenAPI 3.0, every
-- route of the gateway's contract is in it with the method, the
-- Idempotency-Key and the security it takes, every $ref resolves, the
-- payment / refund / error schemas carry the contract's fields, and the
-- webhook deliveries (x-webhooks) name every event type the gateway
-- emits and the envelope outbox.webhook_body makes.
local json = require "cjson.safe"

local function load()
  local f = assert(io.open("examples/gateway/openapi.json", "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

-- the routes docs/gateway.md lists: method, path, signed?, idempotent?
local ROUTES = {
  { "POST", "/v1/payments", true, true },
  { "POST", "/v1/payments/{id}/attempts", true, true },
  { "GET", "/v1/payments/{id}", true, false },
  { "POST", "/v1/payments/{id}/close", true, true },
  { "POST", "/v1/payments/{id}/refunds", true, true },
  { "GET", "/v1/payments/{id}/refunds", true, false },
  { "GET", "/v1/refunds/{id}", true, false },
  { "POST", "/v1/refunds/{id}/abnormal", true, true },
  { "POST", "/wechatpay/notify/{mchid}", false, false },
  { "GET", "/openapi.json", false, false },
  { "GET", "/admin/degrade", false, false },
  { "GET", "/admin/upstream", false, false },
  { "POST", "/admin/degrade", false, false },
  { "POST", "/admin/outbox/replay", false, false },
}

describe("examples/gateway/openapi.json", function()
  local doc

  setup(function()
    local err
    doc, err = json.decode(load())
    assert(doc, "does not parse: " .. tostring(err))
  end)

  it("is OpenAPI 3.0 with the API-key scheme as the default", function()
    assert.matches("^3%.0%.%d+$", doc.openapi)
    assert.is_string(doc.info.title)
    local sch = doc.components.securitySchemes.apiKey
    assert.equal("apiKey", sch.type)
    assert.equal("header", sch.type == "apiKey" and sch["in"])
    assert.equal("Authorization", sch.name)
    assert.matches("PAYGATE%-HMAC%-SHA256", sch.description)
    assert.same({ { apiKey = {} } }, doc.security)
  end)

  it("has every route of the contract, and only those", function()
    local want = {}
    for _, r in ipairs(ROUTES) do
      local op = doc.paths[r[2]] and doc.paths[r[2]][r[1]:lower()]
      assert.is_table(op, r[1] .. " " .. r[2])
      assert.is_string(op.operationId, r[2])
      assert.is_table(op.responses, r[2])
      want[r[1]:lower() .. " " .. r[2]] = true
    end
    for path, item in pairs(doc.paths) do
      for method in pairs(item) do
        assert.is_true(want[method .. " " .. path] == true,
                       "not in the contract: " .. method .. " " .. path)
      end
    end
  end)

  it("has every route the gateway registers (but /console's pages)",
     function()
    -- the routes app.lua and gw/*.lua register, read from their source:
    -- a route added there without its contract fails here
    local served = {}
    local files = { "examples/gateway/app.lua" }
    local ls = assert(io.popen("ls examples/gateway/gw/*.lua"))
    for f in ls:lines() do files[#files + 1] = f end
    ls:close()
    for _, file in ipairs(files) do
      local f = assert(io.open(file, "rb"))
      local src = f:read("*a")
      f:close()
      for method, path in src:gmatch('route%("(%u+)",%s*"([^"]+)"') do
        if path ~= "/console" and path:sub(1, 9) ~= "/console/" then
          served[method:lower() .. " " .. path:gsub(":(%w+)", "{%1}")] = true
        end
      end
    end
    local n = 0
    for key in pairs(served) do
      n = n + 1
      local method, path = key:match("^(%S+) (.+)$")
      assert.is_table(doc.paths[path] and doc.paths[path][method],
                      "served but not in openapi.json: " .. key)
    end
    for path, item in pairs(doc.paths) do
      for method in pairs(item) do
        assert.is_true(served[method .. " " .. path],
                       "in openapi.json but not served: " .. method .. " "
                       .. path)
      end
    end
    assert.equal(#ROUTES, n)
  end)

  it("signed routes use the default security, the others opt out",
     function()
    for _, r in ipairs(ROUTES) do
      local op = doc.paths[r[2]][r[1]:lower()]
      if r[3] then
        assert.is_nil(op.security, r[2])
        assert.is_table(op.responses["401"], r[2] .. " documents 401")
      else
        assert.is_table(op.security, r[2])
        for _, s in ipairs(op.security) do
          assert.is_nil(s.apiKey, r[2])
        end
      end
    end
  end)

  it("admin routes document their 403 (never a 401)", function()
    local n = 0
    for path, item in pairs(doc.paths) do
      if path:sub(1, 7) == "/admin/" then
        for method, op in pairs(item) do
          n = n + 1
          assert.is_table(op.responses["403"], method .. " " .. path)
          assert.is_nil(op.responses["401"], method .. " " .. path)
        end
      end
    end
    assert.is_true(n >= 3)
  end)

  it("the Error schema names every error of the docs' table", function()
    local f = assert(io.open("docs/gateway.md"))
    local text = f:read("*a")
    f:close()
    local desc = doc.components.schemas.Error.properties.error.description
    local n = 0
    for line in text:gmatch("[^\n]+") do
      if line:match("^| [45]%d%d |") then
        local kinds = line:match("^| %d+ | ([^|]+) |")
        for kind in kinds:gmatch("`([a-z_]+)`") do
          n = n + 1
          assert.truthy(desc:find(kind, 1, true), kind .. " not in Error")
        end
      end
    end
    assert.is_true(n >= 15, n)
  end)

  it("every merchant POST takes the Idempotency-Key, and only those",
     function()
    local p = doc.components.parameters.IdempotencyKey
    assert.equal("Idempotency-Key", p.name)
    assert.equal("header", p["in"])
    assert.is_true(p.required)
    for _, r in ipairs(ROUTES) do
      local op = doc.paths[r[2]][r[1]:lower()]
      local has = false
      for _, prm in ipairs(op.parameters or {}) do
        if prm["$ref"] == "#/components/parameters/IdempotencyKey" then
          has = true
        end
      end
      assert.equal(r[4], has, r[1] .. " " .. r[2])
      if r[4] then
        assert.is_table(op.responses["422"], r[2] .. " documents 422")
        assert.is_table(op.responses["409"], r[2] .. " documents 409")
      end
    end
  end)

  it("every $ref resolves", function()
    local n = 0
    local function walk(v)
      if type(v) ~= "table" then return end
      for k, x in pairs(v) do
        if k == "$ref" then
          n = n + 1
          local node = doc
          for part in x:gsub("^#/", ""):gmatch("[^/]+") do
            node = type(node) == "table" and node[part] or nil
          end
          assert.is_table(node, "unresolved " .. x)
        else
          walk(x)
        end
      end
    end
    walk(doc.paths)
    walk(doc["x-webhooks"])
    walk(doc.components)
    assert.truthy(n > 20)
  end)

  it("x-webhooks describes a delivery: its headers, the envelope"
     .. " outbox.webhook_body makes, every type gw/events.lua emits",
     function()
    -- before: nothing the gateway POSTs to a webhook was in the contract
    -- (OpenAPI 3.0 has no webhooks: x-webhooks, as Redocly reads it); a
    -- merchant generating its receiver had no schema. The type enum is
    -- events.TYPES both ways: a type added to one and not the other
    -- fails here
    package.path = "examples/gateway/?.lua;" .. package.path
    local events = require "gw.events"
    local outbox = require "paygate.outbox"
    local hooks = doc["x-webhooks"]
    assert.is_table(hooks, "no x-webhooks")
    local op = hooks.event and hooks.event.post
    assert.is_table(op, "x-webhooks.event.post")
    assert.is_string(op.operationId)
    -- no API key: the delivery is signed with the webhook's secret
    assert.same({}, op.security)
    local s = doc.components.schemas
    local want, got = {}, {}
    for i, t in ipairs(events.TYPES) do want[i] = t end
    for i, t in ipairs(s.EventType.enum) do got[i] = t end
    table.sort(want)
    table.sort(got)
    assert.same(want, got)
    local ref = "#/components/schemas/"
    assert.equal(ref .. "WebhookEvent",
      op.requestBody.content["application/json"].schema["$ref"])
    assert.is_true(op.requestBody.required)
    assert.is_table(op.responses["2XX"])
    assert.equal(ref .. "EventType", s.WebhookEvent.properties.type["$ref"])
    assert.equal(ref .. "EventData", s.WebhookEvent.properties.data["$ref"])
    assert.equal(ref .. "EventType", s.EventData.properties.type["$ref"])
    assert.equal(ref .. "Payment", s.EventData.properties.payment["$ref"])
    assert.equal(ref .. "Refund", s.EventData.properties.refund["$ref"])
    assert.equal(ref .. "EventAlarm", s.EventData.properties.alarm["$ref"])
    assert.same({ "at", "payment", "type" }, (function()
      local r = {}
      for i, k in ipairs(s.EventData.required) do r[i] = k end
      table.sort(r)
      return r
    end)())
    -- the headers outbox's webhook sink sends, each required
    local headers = {}
    for _, prm in ipairs(op.parameters) do
      assert.equal("header", prm["in"], prm.name)
      assert.is_true(prm.required, prm.name)
      headers[prm.name] = prm.schema
    end
    assert.equal(ref .. "EventType", headers["Paygate-Event-Type"]["$ref"])
    assert.is_table(headers["Paygate-Event-Id"])
    assert.is_table(headers["Paygate-Signature"])
    -- the envelope's fields are webhook_body's, every one required
    local body = assert(json.decode(outbox.webhook_body{ id = 7,
      type = "payment.paid", subject = "pay_x", created_at = 1.5,
      attempt = 1, payload_json = "{}" }))
    local keys = {}
    for k in pairs(body) do keys[#keys + 1] = k end
    table.sort(keys)
    local props, req = {}, {}
    for k in pairs(s.WebhookEvent.properties) do props[#props + 1] = k end
    for i, k in ipairs(s.WebhookEvent.required) do req[i] = k end
    table.sort(props)
    table.sort(req)
    assert.same(keys, props)
    assert.same(keys, req)
  end)

  it("Payment's required fields are those model.payment_json always sends",
     function()
    -- a client generated from the contract treats a field not required
    -- as maybe absent (and one required as always there): was appid,
    -- mchid, description and attempt sent with every payment and not
    -- required. "Always": present for any row the migrations' table
    -- holds, its NOT NULL columns at two sample values each and every
    -- nullable one NULL (the same in PostgreSQL's migrations)
    package.path = "examples/gateway/?.lua;" .. package.path
    local model = require "gw.model"
    local sql = require "paygate.sql"
    local migrate = require "paygate.migrate"
    local servers = require "spec.support.servers"
    local dir = servers.mktemp()
    finally(function() servers.sh("rm -rf " .. dir) end)
    local db = assert(sql.open("sqlite:" .. dir .. "/gw.db"))
    assert(migrate.run(db, "examples/gateway/migrations"))
    local cols = assert(db:query("PRAGMA table_info(gw_payments)"))
    assert.is_true(#cols > 10)
    local always
    for _, sample in ipairs{ { 0, "" }, { 1, "x" } } do
      local row = {}
      for _, c in ipairs(cols) do
        -- (the primary key too: SQLite reports a TEXT one as nullable)
        if tonumber(c.notnull) == 1 or tonumber(c.pk) > 0 then
          row[c.name] = tostring(c.type):upper():find("INT") and sample[1]
                        or sample[2]
        end
      end
      local keys = {}
      for k in pairs(model.payment_json(row)) do keys[k] = true end
      if always then
        for k in pairs(always) do always[k] = keys[k] end
      else
        always = keys
      end
    end
    local want = {}
    for k in pairs(always) do want[#want + 1] = k end
    table.sort(want)
    local got = {}
    for _, k in ipairs(doc.components.schemas.Payment.required) do
      got[#got + 1] = k
    end
    table.sort(got)
    assert.same(want, got)
    db:close()
  end)

  it("the payment, refund and error schemas have the contract's fields",
     function()
    local s = doc.components.schemas
    local function has(schema, fields, name)
      for _, f in ipairs(fields) do
        assert.is_table(schema.properties[f], name .. "." .. f)
      end
    end
    has(s.Payment, { "id", "order_id", "state", "version", "channel",
      "amount", "currency", "refunded", "out_trade_no", "transaction_id",
      "attempts", "refunds", "created_at", "updated_at", "expires_at",
      "stale", "mchid", "appid", "sub_mchid", "sub_appid" }, "Payment")
    has(s.Attempt, { "out_trade_no", "n", "channel", "state", "sub_appid",
      "pay" }, "Attempt")
    has(s.Refund, { "id", "payment_id", "out_refund_no", "refund_id",
      "amount", "reason", "state", "mchid", "sub_mchid" }, "Refund")
    -- (was: a refund named no merchant, its payment did: mchid always,
    -- sub_mchid for a service provider's sub-merchant, on both)
    local function required(schema, f)
      for _, r in ipairs(schema.required or {}) do
        if r == f then return true end
      end
      return false
    end
    for _, sc in ipairs{ s.Payment, s.Refund } do
      assert.is_true(required(sc, "mchid"))
      assert.is_false(required(sc, "sub_mchid"))
    end
    has(s.Error, { "error", "message" }, "Error")
    has(s.CreatePayment, { "order_id", "channel", "amount", "currency",
      "description", "payer", "client_ip", "expires_in", "attach",
      "mchid", "sub_mchid", "sub_appid", "appid" }, "CreatePayment")
    has(s.Payer, { "openid", "sp_openid", "sub_openid" }, "Payer")
    local states = {}
    for _, st in ipairs(s.Payment.properties.state.enum) do
      states[st] = true
    end
    for _, st in ipairs({ "created", "paying", "paid", "partially_refunded",
                          "refunded", "closed", "failed", "unknown" }) do
      assert.is_true(states[st], st)
    end
    assert.same({ "native", "h5", "jsapi", "app" }, s.Channel.enum)
    local create = doc.paths["/v1/payments"].post.responses["201"]
    local body = create.content["application/json"].schema
    assert.is_table(body.properties.payment)
    assert.is_table(body.properties.pay)
  end)

  -- was: PayJsapi and PayApp were seven untyped strings, without an
  -- example: nothing said what the payer's client checks (the signing
  -- string, signType, the package's form, the timestamp a string of
  -- seconds, partnerid in partner mode), nor let a front end check its
  -- own verification against a known answer
  it("the pay schemas pin what the payer's client checks, and their"
     .. " examples verify", function()
    local crypto = require "paygate.crypto"
    local s = doc.components.schemas
    local function matches(v, pat, what)
      assert.is_string(pat, what .. ": no pattern")
      assert.truthy(v:match(pat), what .. ": " .. v .. " vs " .. pat)
    end
    -- the example fits its schema: every field required, none other,
    -- each value of its pattern or enum
    local function fits(name)
      local sc = s[name]
      assert.is_false(sc.additionalProperties, name)
      assert.is_table(sc.example, name .. ": no example")
      for _, k in ipairs(sc.required) do
        assert.is_string(sc.example[k], name .. ".example." .. k)
      end
      for k, v in pairs(sc.example) do
        local p = assert(sc.properties[k], name .. ": " .. k)
        if p.enum then
          local ok = false
          for _, e in ipairs(p.enum) do ok = ok or e == v end
          assert.is_true(ok, name .. "." .. k .. ": " .. v)
        else
          matches(v, p.pattern, name .. "." .. k)
        end
      end
      return sc.example, sc.properties
    end
    local f = assert(io.open("spec/fixtures/wechatpay/a1_pub.pem", "rb"))
    local pub = assert(crypto.public_key(f:read("*a")))
    f:close()
    local j, jp = fits("PayJsapi")
    assert.same({ "RSA", "SM2" }, jp.signType.enum)
    matches("prepay_id=wx201410272009395522657a690389285100",
            jp.package.pattern, "PayJsapi.package")
    assert.falsy(("wx2014"):match(jp.package.pattern))
    assert.falsy(("1554208460.5"):match(jp.timeStamp.pattern))
    assert.is_true(crypto.verify_base64(pub, j.appId .. "\n" .. j.timeStamp
      .. "\n" .. j.nonceStr .. "\n" .. j.package .. "\n", j.paySign,
      "sha256-rsa"), "PayJsapi.example does not verify")
    assert.matches("appId\\ntimeStamp\\nnonceStr\\npackage\\n",
                   s.PayJsapi.description, 1, true)
    local a, ap = fits("PayApp")
    assert.same({ "Sign=WXPay" }, ap.package.enum)
    assert.falsy(("prepay_id=wx2014"):match(ap.prepayid.pattern))
    assert.falsy(("1554208460.5"):match(ap.timestamp.pattern))
    assert.is_true(crypto.verify_base64(pub, a.appid .. "\n" .. a.timestamp
      .. "\n" .. a.noncestr .. "\n" .. a.prepayid .. "\n", a.sign,
      "sha256-rsa"), "PayApp.example does not verify")
    assert.matches("appid\\ntimestamp\\nnoncestr\\nprepayid\\n",
                   s.PayApp.description, 1, true)
    assert.matches("sub_mchid", ap.partnerid.description, 1, true)
    -- a create answer's pay fits exactly one of the four
    fits("PayNative")
    fits("PayH5")
  end)
end)
