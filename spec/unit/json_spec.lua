-- paygate.json: hardened decoding of outside input, exact encoding.
local json = require "paygate.json"
local cjson = require "cjson"
local core = require "paygate.core"

describe("paygate.json.decode", function()
  it("refuses numbers that are not JSON", function()
    for _, text in ipairs{
      '{"amount":Infinity}', '{"amount":-Infinity}', '{"amount":NaN}',
      'NaN', '{"amount":0x10}', '{"amount":+1}', '{"amount":inf}',
      '{"amount":-nan}' } do
      local v, err = json.decode(text)
      assert.is_nil(v, text)
      assert.is_true(core.is_error(err), text)
      assert.equal("invalid_json", err.kind, text)
    end
  end)

  it("refuses numbers that overflow a double instead of giving inf", function()
    for _, text in ipairs{
      '{"amount":1e999}', '{"amount":-1e999}', '[1,{"a":[2E+400]}]',
      '1e309', '{"amount":1e0400}', "[" .. ("9"):rep(400) .. "]" } do
      local v, err = json.decode(text)
      assert.is_nil(v, text)
      assert.equal("invalid_json", err.kind, text)
      assert.matches("out of range", err.message, 1, true)
    end
  end)

  it("accepts large finite numbers and exponent-like text in strings", function()
    assert.same({ a = 1e308, b = -1.5e-300, c = "x e999 1e999" },
                json.decode('{"a":1e308,"b":-1.5e-300,"c":"x e999 1e999"}'))
    assert.same({ 1e20, 0.5 }, json.decode("[100000000000000000000,5e-1]"))
  end)

  it("gives null as json.null and raises for a non-string", function()
    assert.equal(json.null, json.decode("null"))
    assert.equal(cjson.null, json.decode('{"a":null}').a)
    local ok, e = pcall(json.decode, 5)
    assert.is_false(ok)
    assert.matches("paygate.json.decode: text must be a string", e, 1, true)
  end)

  it("reports invalid JSON as invalid_json", function()
    local v, err = json.decode("{nope")
    assert.is_nil(v)
    assert.equal("invalid_json", err.kind)
  end)
end)

describe("paygate.json.encode", function()
  local function refuses(v, msg)
    local ok, e = pcall(json.encode, v)
    assert.is_false(ok)
    assert.matches("paygate.json.encode: " .. msg, e, 1, true)
  end

  it("refuses what JSON cannot hold, naming the path", function()
    refuses({ a = { b = { print } } }, "cannot encode a function at value.a.b[1]")
    refuses({ x = io.stdout }, "cannot encode a userdata at value.x")
    refuses({ items = { 1, { price = 0 / 0 } } },
            "NaN or infinite number at value.items[2].price")
    refuses({ n = math.huge }, "NaN or infinite number at value.n")
    refuses({ n = -math.huge }, "NaN or infinite number at value.n")
    refuses({ list = { [1] = 1, [3] = 3 } }, "sparse array")
    refuses({ [true] = 1 }, "boolean key")
    local t = {}
    t.x = { t }
    refuses(t, "cycle")
    local deep = {}
    local c = deep
    for _ = 1, 1001 do c[1] = {}; c = c[1] end
    refuses(deep, "nesting deeper than 1000")
  end)

  it("writes integers exactly up to 2^63", function()
    assert.equal('{"n":123456789012345}', json.encode({ n = 123456789012345 }))
    assert.equal("9007199254740992", json.encode(2 ^ 53))
    assert.equal("-9007199254740994", json.encode(-2 ^ 53 - 2))
    assert.equal("-9223372036854775808", json.encode(-2 ^ 63))
    assert.equal("1000000000000000000", json.encode(1e18))
    assert.equal("0", json.encode(0))
  end)

  it("writes other numbers so they read back the same", function()
    for _, x in ipairs{ 0.1, 1 / 3, 1e300, -2.5e-8, 2 ^ 63, 1e22, math.pi,
                        123456.789 } do
      local s = json.encode(x)
      assert.equal(x, tonumber(s), s)
    end
    assert.equal("0.1", json.encode(0.1))
  end)

  it("writes strings without escaping / and keeps UTF-8", function()
    assert.equal('"https://a/b?c=\\"d\\"\\\\"', json.encode('https://a/b?c="d"\\'))
    assert.equal('"\\u0000\\n\\t\\u001f é"', json.encode("\0\n\t\31 é"))
    assert.equal('"\\ufffd"', json.encode("\255"))
  end)

  it("tells arrays from objects like cjson", function()
    assert.equal("[1,2,3]", json.encode({ 1, 2, 3 }))
    assert.equal("{}", json.encode({}))
    assert.equal('{"a":[]}', json.encode({ a = json.empty_array }))
    assert.equal("[null,true,false]", json.encode({ json.null, true, false }))
    assert.same({ ["1"] = "x", a = 1 },
                cjson.decode(json.encode({ [1] = "x", a = 1 })))
    local v = { id = 7, tags = { "a", "b" }, amount = { total = 100 },
                note = cjson.null, ok = false }
    assert.same(v, cjson.decode(json.encode(v)))
  end)
end)
