-- The gateway's answers against examples/gateway/openapi.json: for each
-- route, real requests (answers that worked, the documented errors,
-- WeChat failing), and each answer's status must be one the route
-- documents and its body must fit the documented schema: the required
-- fields there, each of its type and enum, and no field the schema does
-- not name (a client generated from the contract would drop it, or fail
-- on it; an unnamed field may be a leak).
--   build/paygate exec "$(command -v busted)" --helper=spec/helpers.lua \
--     examples/gateway/spec/openapi_live_spec.lua
local S = require "examples.gateway.spec.support"
local json = require "paygate.json"
local paygate = require "paygate"

local doc = assert(json.decode(S.read("examples/gateway/openapi.json")))

local function resolve(ref)
  local node = doc
  for part in ref:gsub("^#/", ""):gmatch("[^/]+") do node = node[part] end
  return assert(node, ref)
end

local function is_int(v)
  return type(v) == "number" and v % 1 == 0
end

-- the OpenAPI 3.0 schema subset openapi.json uses; adds one line per
-- mismatch to errs
-- the field names of each Payment the answers held (for the check that
-- a field every one of them had is required)
local payments_seen = {}

local function validate(v, s, path, errs)
  if s["$ref"] == "#/components/schemas/Payment" and type(v) == "table" then
    local keys = {}
    for k in pairs(v) do keys[k] = true end
    payments_seen[#payments_seen + 1] = keys
  end
  if s["$ref"] then return validate(v, resolve(s["$ref"]), path, errs) end
  if v == json.null then
    local ok = s.nullable
    for _, e in ipairs(s.enum or {}) do ok = ok or e == json.null end
    -- (an allOf wrapper takes null when it, or what it wraps, says so)
    for _, sub in ipairs(s.allOf or {}) do
      ok = ok or (sub["$ref"] and resolve(sub["$ref"]) or sub).nullable
    end
    if not ok and not s.oneOf then
      errs[#errs + 1] = path .. ": null, not nullable"
    end
    return
  end
  for _, sub in ipairs(s.allOf or {}) do validate(v, sub, path, errs) end
  if s.oneOf then
    local n = 0
    for _, sub in ipairs(s.oneOf) do
      local e = {}
      validate(v, sub, path, e)
      if #e == 0 then n = n + 1 end
    end
    if n ~= 1 then
      errs[#errs + 1] = path .. ": fits " .. n .. " of oneOf"
    end
  end
  local t = s.type
  local ok = t == nil
    or t == "object" and type(v) == "table" and v[1] == nil
    or t == "array" and type(v) == "table"
    or t == "string" and type(v) == "string"
    or t == "integer" and is_int(v)
    or t == "number" and type(v) == "number"
    or t == "boolean" and type(v) == "boolean"
  if not ok then
    errs[#errs + 1] = path .. ": not a " .. t .. " (" .. tostring(v) .. ")"
    return
  end
  if s.enum then
    local found = false
    for _, e in ipairs(s.enum) do found = found or e == v end
    if not found then
      errs[#errs + 1] = path .. ": " .. tostring(v) .. " not in its enum"
    end
  end
  if type(v) == "string" and s.pattern and not v:match(s.pattern) then
    errs[#errs + 1] = path .. ": does not match " .. s.pattern
  end
  if type(v) == "number" and s.minimum and v < s.minimum then
    errs[#errs + 1] = path .. ": below " .. s.minimum
  end
  if t == "object" then
    local props = s.properties or {}
    for _, r in ipairs(s.required or {}) do
      if v[r] == nil then errs[#errs + 1] = path .. ": no " .. r end
    end
    for k, x in pairs(v) do
      if props[k] then
        validate(x, props[k], path .. "." .. k, errs)
      elseif type(s.additionalProperties) == "table" then
        validate(x, s.additionalProperties, path .. "." .. k, errs)
      elseif s.properties then
        errs[#errs + 1] = path .. "." .. k .. ": not in the schema"
      end
    end
  elseif t == "array" and s.items then
    for i, x in ipairs(v) do
      validate(x, s.items, path .. "[" .. i .. "]", errs)
    end
  end
end

-- the gateway's own response headers: an answer that carries one must be
-- documented with it (a client generated from the contract reads only
-- those it names)
local CONTRACT_HEADERS = { "retry-after", "idempotent-replayed" }

-- asserts res is an answer the contract documents for `method template`
local function conforms(res, method, template)
  local op = assert(doc.paths[template][method:lower()], template)
  local r = op.responses[tostring(res.status)]
  assert(r, method .. " " .. template .. ": status " .. res.status
         .. " is not documented: " .. tostring(res.body))
  for _, h in ipairs(CONTRACT_HEADERS) do
    if res.headers[h] then
      local named = false
      for name in pairs(r.headers or {}) do
        named = named or name:lower() == h
      end
      assert(named, method .. " " .. template .. " " .. res.status
             .. ": header " .. h .. " is not documented")
    end
  end
  local schema = r.content["application/json"].schema
  assert(res.json, "not JSON: " .. tostring(res.body))
  local errs = {}
  validate(res.json, schema, "$", errs)
  assert(#errs == 0, method .. " " .. template .. " " .. res.status .. ": "
         .. table.concat(errs, "; ") .. "\n" .. tostring(res.body))
  return res.json
end

-- asserts the request body b fits the contract's requestBody schema
local function request_fits(b, method, template)
  local op = assert(doc.paths[template][method:lower()], template)
  local errs = {}
  validate(b, op.requestBody.content["application/json"].schema, "$", errs)
  assert(#errs == 0, method .. " " .. template .. " request: "
         .. table.concat(errs, "; "))
end

describe("the gateway's answers fit openapi.json", function()
  local env

  setup(function() env = S.start() end)
  teardown(S.stop)
  after_each(function() env.sim:clear_faults() end)

  local function create(o)
    local b = { order_id = S.order_id(), channel = "native", amount = 100,
                description = "openapi" }
    for k, v in pairs(o or {}) do b[k] = v end
    return env:api("POST", "/v1/payments", b)
  end

  it("creates, attempts, gets, closes: every channel", function()
    for _, o in ipairs({ {}, { channel = "h5", client_ip = "203.0.113.7" },
                         { channel = "jsapi", payer = { openid = "o-1" } },
                         { channel = "app", attach = "a" } }) do
      local res = create(o)
      assert.equal(201, res.status, res.body)
      conforms(res, "POST", "/v1/payments")
    end
    local p = conforms(create(), "POST", "/v1/payments").payment
    local id = p.id
    local res = env:api("POST", "/v1/payments/" .. id .. "/attempts",
                        { channel = "h5", client_ip = "203.0.113.7" })
    assert.equal(201, res.status, res.body)
    conforms(res, "POST", "/v1/payments/{id}/attempts")
    for _, q in ipairs({ "", "?refresh=1", "?refresh=2" }) do
      conforms(env:api("GET", "/v1/payments/" .. id .. q), "GET",
               "/v1/payments/{id}")
    end
    res = env:api("POST", "/v1/payments/" .. id .. "/close")
    assert.equal(200, res.status, res.body)
    conforms(res, "POST", "/v1/payments/{id}/close")
    res = env:api("POST", "/v1/payments/" .. id .. "/attempts",
                  { channel = "native" })
    assert.equal(409, res.status, res.body)
    conforms(res, "POST", "/v1/payments/{id}/attempts")
    conforms(env:api("GET", "/v1/payments/pay_none"), "GET",
             "/v1/payments/{id}")
  end)

  -- the gateway takes null for an optional field of another channel (as
  -- one body sent for every channel has it): the contract says so
  it("null payer, client_ip and h5_type: taken, and in the contract",
     function()
    local nulls = { payer = json.null, client_ip = json.null,
                    h5_type = json.null }
    local b = { order_id = S.order_id(), channel = "native", amount = 100,
                description = "openapi" }
    for k, v in pairs(nulls) do b[k] = v end
    request_fits(b, "POST", "/v1/payments")
    local res = env:api("POST", "/v1/payments", b)
    assert.equal(201, res.status, res.body)
    local id = conforms(res, "POST", "/v1/payments").payment.id
    local a = { channel = "native" }
    for k, v in pairs(nulls) do a[k] = v end
    request_fits(a, "POST", "/v1/payments/{id}/attempts")
    res = env:api("POST", "/v1/payments/" .. id .. "/attempts", a)
    assert.equal(201, res.status, res.body)
    conforms(res, "POST", "/v1/payments/{id}/attempts")
  end)

  it("replays, and the 409 of a key still running, with their headers",
     function()
    -- a replay of each kind of kept answer carries Idempotent-Replayed
    local function twice(path, body, status)
      local key = "k-" .. S.order_id()
      local first = env:api("POST", path, body, { key = key })
      assert.equal(status, first.status, first.body)
      local again = env:api("POST", path, body, { key = key })
      assert.equal(first.body, again.body)
      assert.equal("true", again.headers["idempotent-replayed"])
      conforms(again, "POST", (path:gsub("pay_[%w_]+", "{id}")))
    end
    local p = env:paid_payment()
    twice("/v1/payments/" .. p.id .. "/refunds", { amount = 1000 }, 422)
    twice("/v1/payments/" .. p.id .. "/refunds", { amount = 10 }, 201)
    twice("/v1/payments/" .. p.id .. "/attempts", { channel = "native" },
          409)
    twice("/v1/payments/pay_none/close", nil, 404)
    twice("/v1/payments/pay_none/attempts", { channel = "native" }, 404)
    twice("/v1/payments", { order_id = p.order_id, channel = "native",
                            amount = 1, description = "other" }, 409)
    -- WeChat refusing a refund: the 502 is kept (a fact, not run again)
    env.sim:fault{ endpoint = "refund", kind = "error", status = 403,
                   code = "NOT_ENOUGH", count = 1 }
    twice("/v1/payments/" .. p.id .. "/refunds", { amount = 1 }, 502)
    -- the same key while the first still runs: 409 with Retry-After
    -- (WeChat holds the first's prepay until the second was answered)
    local h = env.sim:hold("prepay")
    local b = { order_id = S.order_id(), channel = "native", amount = 100,
                description = "openapi" }
    local key, first = "k-" .. S.order_id(), nil
    paygate.spawn(function()
      first = env:api("POST", "/v1/payments", b, { key = key })
    end)
    h:wait_held()
    local second = env:api("POST", "/v1/payments", b, { key = key })
    assert.equal(409, second.status, second.body)
    assert.equal("idempotency_in_flight", second.json.error)
    assert.matches("^%d+$", second.headers["retry-after"] or "")
    conforms(second, "POST", "/v1/payments")
    h:release()
    S.wait_until(function() return first ~= nil end, 15, "the first answer")
    conforms(first, "POST", "/v1/payments")
  end)

  it("refunds: made, refused, listed, got", function()
    local p = env:paid_payment()
    local res = env:refund(p.id, 30, "one item")
    assert.equal(201, res.status, res.body)
    local rf = conforms(res, "POST", "/v1/payments/{id}/refunds")
    res = env:refund(p.id, 1000)
    assert.equal(422, res.status, res.body)
    conforms(res, "POST", "/v1/payments/{id}/refunds")
    -- WeChat refuses one: 502 with the failed refund
    env.sim:fault{ endpoint = "refund", kind = "error", status = 403,
                   code = "NOT_ENOUGH", count = 1 }
    res = env:refund(p.id, 1)
    assert.equal(502, res.status, res.body)
    conforms(res, "POST", "/v1/payments/{id}/refunds")
    assert.equal("not_enough", res.json.wechat_kind)
    assert.equal("NOT_ENOUGH", res.json.wechat_code)
    res = env:api("GET", "/v1/payments/" .. p.id .. "/refunds")
    assert.equal(2, #conforms(res, "GET", "/v1/payments/{id}/refunds").refunds)
    conforms(env:api("GET", "/v1/refunds/" .. rf.id), "GET",
             "/v1/refunds/{id}")
    conforms(env:api("GET", "/v1/refunds/ref_none"), "GET",
             "/v1/refunds/{id}")
    conforms(env:api("GET", "/v1/payments/" .. p.id), "GET",
             "/v1/payments/{id}")
  end)

  it("WeChat failing a prepay: 502 with wechat_kind and wechat_code",
     function()
    env.sim:fault{ endpoint = "prepay", kind = "error", status = 400,
                   code = "INVALID_REQUEST", count = 1 }
    local res = create()
    assert.equal(502, res.status, res.body)
    conforms(res, "POST", "/v1/payments")
    assert.equal("INVALID_REQUEST", res.json.wechat_code)
  end)

  it("an Idempotency-Key the contract takes is one the gateway takes,"
     .. " and only those", function()
    -- before: the contract said 1..255 characters and nothing of which,
    -- so a generated client sent keys the gateway refused (a tab, a
    -- non-ASCII letter) or changed (a space at either end is dropped as
    -- the header is read, and the signature no longer matched)
    local schema = doc.components.parameters.IdempotencyKey.schema
    assert.equal("^[!-~]([ -~]*[!-~])?$", schema.pattern)
    -- that pattern, in Lua: printable ASCII, no space at either end
    local function fits(k)
      return #k >= schema.minLength and #k <= schema.maxLength
        and k:find("^[!-~]") ~= nil and k:find("[!-~]$") ~= nil
        and k:find("[^ -~]") == nil
    end
    for _, k in ipairs({ "k", "a b", "!~", ("x"):rep(255), " lead",
                         "trail ", " ", "a\tb", "caf\195\169",
                         ("x"):rep(256) }) do
      -- (a space at either end is refused as the request is signed:
      -- apikey.sign, what a merchant's client signs with)
      local ok, res = pcall(env.api, env, "POST", "/v1/payments",
        { order_id = S.order_id(), channel = "native", amount = 1,
          description = "key" }, { key = k })
      if ok then
        assert.equal(fits(k), res.status == 201,
                     ("%q: %d %s"):format(k, res.status, res.body))
        conforms(res, "POST", "/v1/payments")
      else
        assert.matches("apikey.sign: idempotency_key must be", res, 1, true)
        assert.is_false(fits(k), ("%q"):format(k))
      end
    end
  end)

  it("a payer openid the contract takes is one the gateway takes, and only"
     .. " those", function()
    -- before: the contract's Payer.openid was any string, so a generated
    -- client sent openids the gateway refuses (400 payer.openid: empty,
    -- past 128, a space, a non-ASCII letter)
    local schema = doc.components.schemas.Payer.properties.openid
    assert.equal("^[!-~]+$", schema.pattern)
    local function fits(v)
      return #v >= schema.minLength and #v <= schema.maxLength
        and v:find("^[!-~]+$") ~= nil
    end
    for _, v in ipairs({ "o", "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o", ("x"):rep(128),
                         ("x"):rep(129), "", "a b", "caf\195\169",
                         "a\tb" }) do
      for _, r in ipairs({ { "/v1/payments", "POST" },
                           { "/v1/payments/{id}/attempts", "POST" } }) do
        local path, body = r[1], { channel = "jsapi", payer = { openid = v } }
        if path == "/v1/payments" then
          body.order_id, body.amount, body.description = S.order_id(), 1,
                                                         "openid"
        else
          path = "/v1/payments/" .. create().json.payment.id .. "/attempts"
        end
        local res = env:api("POST", path, body)
        assert.equal(fits(v), res.status == 201,
                     ("%q: %d %s"):format(v, res.status, res.body))
        conforms(res, "POST", r[1])
      end
    end
  end)

  it("an id that decodes to a NUL or a dot-segment: 400 bad_path, on every"
     .. " route", function()
    -- before: the two GET refund routes documented no 400 at all, and no
    -- route named bad_path, which the runtime answers for such an id
    -- before the gateway's hooks run: a client generated from the
    -- contract failed on an answer it was never told of
    local kinds = doc.components.schemas.Error.properties.error.description
    assert.matches("bad_path", kinds, 1, true)
    -- (ids of the contract's pattern, pay_ or ref_)
    for _, id in ipairs({ "x%00", "..%2F..%2Fadmin" }) do
      for _, r in ipairs({ { "GET", "/v1/payments/{id}", "pay_" },
                           { "GET", "/v1/payments/{id}/refunds", "pay_" },
                           { "GET", "/v1/refunds/{id}", "ref_" },
                           { "POST", "/v1/payments/{id}/attempts", "pay_" },
                           { "POST", "/v1/payments/{id}/close", "pay_" },
                           { "POST", "/v1/payments/{id}/refunds", "pay_" } }) do
        local res = env:api(r[1], (r[2]:gsub("{id}", function() return r[3] .. id end)),
                            r[1] == "POST" and "{}" or nil)
        assert.equal(400, res.status, r[2] .. " " .. id .. " " .. res.body)
        assert.equal("bad_path", res.json.error, res.body)
        conforms(res, r[1], r[2])
      end
    end
  end)

  it("a path of the contract with a method it does not take: 405"
     .. " method_not_allowed, Allow naming the contract's methods",
     function()
    -- before: the gateway answered it (paygate's router) and neither the
    -- contract nor docs/gateway.md's table named it
    local kinds = doc.components.schemas.Error.properties.error.description
    assert.matches("405: method_not_allowed", kinds, 1, true)
    local n = 0
    for template, item in pairs(doc.paths) do
      local want = {}
      for m in pairs(item) do want[#want + 1] = m:upper() end
      if item.get and not item.head then want[#want + 1] = "HEAD" end
      table.sort(want)
      local path = template:gsub("{id}", template:find("^/v1/refunds")
                                          and "ref_none" or "pay_none")
                           :gsub("{mchid}", env.m.mchid)
      -- (signed on /v1/: an unsigned request is a 401 first)
      local res = path:sub(1, 4) == "/v1/" and env:api("DELETE", path)
                  or env:admin("DELETE", path)
      assert.equal(405, res.status, template .. " " .. res.body)
      assert.equal("method_not_allowed", res.json and res.json.error,
                   res.body)
      local errs = {}
      validate(res.json, { ["$ref"] = "#/components/schemas/Error" }, "$",
               errs)
      assert(#errs == 0, template .. ": " .. table.concat(errs, "; "))
      local allow = {}
      for m in (res.headers.allow or ""):gmatch("[^,%s]+") do
        allow[#allow + 1] = m
      end
      table.sort(allow)
      assert.same(want, allow, template)
      n = n + 1
    end
    assert.is_true(n >= 9, n)
  end)

  it("the webhook deliveries fit x-webhooks: headers and body, of every"
     .. " kind of event", function()
    -- before: the events the gateway POSTs were in no contract. Here the
    -- deliveries the spec's receiver took, as they came (the raw body,
    -- its Paygate-* headers), against x-webhooks' entry: the envelope,
    -- the payload's payment (Payment), refund (Refund) and each type's
    -- fields, no field the schema does not name
    local op = doc["x-webhooks"].event.post
    local schema = op.requestBody.content["application/json"].schema
    -- paid, then partly refunded: payment.paying, payment.paid,
    -- refund.succeeded, payment.partially_refunded
    local p = env:paid_payment{ amount = 50 }
    local r = env:refund(p.id, 10)
    assert.equal(201, r.status, r.body)
    env.sim:settle(r.json.out_refund_no)
    -- money on a closed payment: payment.paid (late), payment.late_paid
    -- with its automatic refund (on_late_payment = "refund"), which the
    -- simulator refuses (nothing to give back on a closed order):
    -- refund.failed with wechat_kind
    local c = conforms(create{ amount = 70 }, "POST", "/v1/payments").payment
    assert.equal(200, env:api("POST", "/v1/payments/" .. c.id .. "/close")
                      .status)
    local res = env:post_paid(c)
    assert.is_true(S.ok2xx(res.status), res.status .. " " .. res.body)
    -- an amount that does not match: alarm.amount_mismatch
    local a = conforms(create{ amount = 30 }, "POST", "/v1/payments").payment
    local body, h = env:notification("TRANSACTION.SUCCESS",
      env:transaction(a, { amount = { total = 31, payer_total = 31,
        currency = "CNY", payer_currency = "CNY" } }))
    env:post_notify(body, h)
    local want = {
      [p.id] = { "payment.paying", "payment.paid", "refund.succeeded",
                 "payment.partially_refunded" },
      [c.id] = { "payment.paying", "payment.closed", "payment.paid",
                 "payment.late_paid", "refund.failed" },
      [a.id] = { "payment.paying", "alarm.amount_mismatch" },
    }
    for subject, types in pairs(want) do
      for _, t in ipairs(types) do env:wait_event(subject, t, 30) end
    end
    -- the signature's pattern, a regular expression, in Lua
    local params = {}
    for _, prm in ipairs(op.parameters) do params[prm.name:lower()] = prm end
    -- (one v1 per secret: two while a previous secret is given)
    assert.equal("^t=[0-9]+(,v1=[0-9a-f]{64})+$",
                 params["paygate-signature"].schema.pattern)
    local v1 = ",v1=" .. ("[0-9a-f]"):rep(64)
    local function sig_ok(v)
      local rest = v:match("^t=%d+(.*)$")
      return rest ~= nil and rest ~= ""
             and rest:gsub(v1, "") == ""
    end
    local seen, n = {}, 0
    for _, e in ipairs(env:events()) do
      if want[e.subject] then
        n = n + 1
        local b = assert(json.decode(e.body), e.body)
        local errs = {}
        validate(b, schema, "$", errs)
        for name, prm in pairs(params) do
          local v = e.headers[name]
          if v == nil then
            if prm.required then errs[#errs + 1] = name .. ": missing" end
          elseif name == "paygate-signature" then
            if not sig_ok(v) then errs[#errs + 1] = name .. ": " .. v end
          else
            validate(v, prm.schema, name, errs)
          end
        end
        -- every Paygate-* header sent is one the contract names
        for name in pairs(e.headers) do
          if name:sub(1, 8) == "paygate-" and not params[name] then
            errs[#errs + 1] = name .. ": not in x-webhooks"
          end
        end
        assert(#errs == 0, b.type .. ": " .. table.concat(errs, "; ")
               .. "\n" .. e.body)
        assert.equal(tostring(b.id), e.headers["paygate-event-id"])
        assert.equal(b.type, e.headers["paygate-event-type"])
        assert.equal(b.type, b.data.type)
        assert.matches("^application/json", e.headers["content-type"])
        seen[b.type] = b.data
      end
    end
    assert.is_true(n >= 11, n)
    for _, types in pairs(want) do
      for _, t in ipairs(types) do assert.is_table(seen[t], t) end
    end
    -- each type's fields came with it (the schema names them, optional)
    assert.is_true(seen["payment.late_paid"].payment.late)
    assert.equal(c.out_trade_no, seen["payment.late_paid"].out_trade_no)
    assert.equal("refund", seen["payment.late_paid"].action)
    assert.is_table(seen["payment.late_paid"].refund)
    assert.is_string(seen["refund.failed"].wechat_kind)
    assert.equal(31, seen["alarm.amount_mismatch"].alarm.got)
    assert.equal(10, seen["refund.succeeded"].refund.amount)
  end)

  -- (last: after the answers above; its own too, run alone). A field
  -- required and missing fails where the answer is checked (conforms);
  -- here the other way: one every payment had is required, or a client
  -- generated from the contract makes it optional for no reason (was
  -- appid, mchid, description and attempt)
  it("a field every payment answered had is required in Payment",
     function()
    local res = create()
    conforms(res, "POST", "/v1/payments")
    local id = res.json.payment.id
    conforms(env:api("GET", "/v1/payments/" .. id), "GET",
             "/v1/payments/{id}")
    conforms(env:api("POST", "/v1/payments/" .. id .. "/close", {}), "POST",
             "/v1/payments/{id}/close")
    assert.is_true(#payments_seen >= 3)
    local required = {}
    for _, k in ipairs(resolve("#/components/schemas/Payment").required) do
      required[k] = true
    end
    local always = {}
    for k in pairs(payments_seen[1]) do always[k] = true end
    for _, keys in ipairs(payments_seen) do
      for k in pairs(always) do always[k] = keys[k] end
    end
    local missing = {}
    for k in pairs(always) do
      if not required[k] then missing[#missing + 1] = k end
    end
    table.sort(missing)
    assert.same({}, missing)
  end)

  it("the request errors: 400, 401, 422, 413", function()
    for _, body in ipairs({ '{"amount":', '{"amount":1,"amount":2}', '[]',
                            '{"order_id":"x","extra":1}' }) do
      local res = env:api("POST", "/v1/payments", body)
      assert.equal(400, res.status, res.body)
      conforms(res, "POST", "/v1/payments")
    end
    conforms(env:api("POST", "/v1/payments", "{}", { key = false }), "POST",
             "/v1/payments")
    local res = env:api("GET", "/v1/refunds/ref_none", nil,
                        { secret = "sk_wrong" })
    assert.equal(401, res.status, res.body)
    conforms(res, "GET", "/v1/refunds/{id}")
    local body = { order_id = S.order_id(), channel = "native", amount = 1,
                   description = "x" }
    assert.equal(201, env:api("POST", "/v1/payments", body,
                              { key = "k-reuse" }).status)
    body.amount = 2
    res = env:api("POST", "/v1/payments", body, { key = "k-reuse" })
    assert.equal(422, res.status, res.body)
    conforms(res, "POST", "/v1/payments")
    -- past the runtime's limits.body_bytes (5 MiB by default)
    local big = '{"order_id":"' .. string.rep("a", 5 * 1024 * 1024) .. '"}'
    for _, path in ipairs({ "/v1/payments", "/v1/payments/pay_x/attempts",
                            "/v1/payments/pay_x/close",
                            "/v1/payments/pay_x/refunds" }) do
      res = env:api("POST", path, big)
      assert.equal(413, res.status, res.body)
      conforms(res, "POST", (path:gsub("pay_x", "{id}")))
    end
  end)
end)
