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
local function validate(v, s, path, errs)
  if s["$ref"] then return validate(v, resolve(s["$ref"]), path, errs) end
  if v == json.null then
    local ok = s.nullable
    for _, e in ipairs(s.enum or {}) do ok = ok or e == json.null end
    if not ok and not s.allOf and not s.oneOf then
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

-- asserts res is an answer the contract documents for `method template`
local function conforms(res, method, template)
  local op = assert(doc.paths[template][method:lower()], template)
  local r = op.responses[tostring(res.status)]
  assert(r, method .. " " .. template .. ": status " .. res.status
         .. " is not documented: " .. tostring(res.body))
  local schema = r.content["application/json"].schema
  assert(res.json, "not JSON: " .. tostring(res.body))
  local errs = {}
  validate(res.json, schema, "$", errs)
  assert(#errs == 0, method .. " " .. template .. " " .. res.status .. ": "
         .. table.concat(errs, "; ") .. "\n" .. tostring(res.body))
  return res.json
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
