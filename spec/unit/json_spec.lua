-- paygate.json: hardened decoding of outside input, exact encoding.
local json = require "paygate.json"
local cjson = require "cjson"
local core = require "paygate.core"

describe("paygate.json.decode", function()
  -- the string scan reads sixteen bytes at a time, then eight: every byte
  -- it must stop at ('"', '\\', a control byte), at every offset within
  -- a block, in strings of every length around one, next to bytes that
  -- neighbour the stop bytes (' ', '!', '#', '[', ']', 0x7f, 0x80, 0xff)
  it("finds quotes, escapes and control bytes at any offset", function()
    local fill = { "a", "\xc3\xa9", "~", "\x7f", "\xff", " ", "!", "#",
                   "[", "]", "\x80" }
    for len = 0, 40 do
      for _, f in ipairs(fill) do
        local base = f:rep(len):sub(1, len)
        assert.equal(base, json.decode('"' .. base .. '"'), len)
        for at = 1, len do
          local function with(c) return base:sub(1, at - 1) .. c
                                        .. base:sub(at + 1) end
          -- escapes: the value has the character
          assert.equal(with('"'), json.decode('"' .. with('\\"') .. '"'))
          assert.equal(with("\\"), json.decode('"' .. with("\\\\") .. '"'))
          assert.equal(with("\1"), json.decode('"' .. with("\\u0001")
                                                .. '"'))
          -- a raw control byte is refused, at its byte
          for _, c in ipairs{ "\0", "\1", "\n", "\31" } do
            local v, err = json.decode('"' .. with(c) .. '"')
            assert.is_nil(v, len .. "/" .. at)
            assert.matches("control character", err.message)
            assert.truthy(err.message:find("at byte " .. (at + 1), 1, true),
                          err.message)
          end
          -- a quote ends the string there
          local v = assert(json.decode('["' .. with('","') .. '"]'))
          assert.same({ base:sub(1, at - 1), base:sub(at + 1) }, v)
        end
      end
    end
  end)

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

describe("paygate.json.decode, strictly RFC 8259", function()
  local jcore = require "paygate.json.core"

  local function refused(text, what)
    local v, err = json.decode(text)
    assert.is_nil(v, text)
    assert.equal("invalid_json", err.kind, text)
    if what then assert.matches(what, err.message, 1, true) end
    return err
  end

  it("refuses what lua-cjson let through", function()
    refused('[1.]', "a digit must follow '.'")
    refused('[1.e5]', "a digit must follow '.'")
    refused('[01]', "expected ',' or ']'")
    refused('["a\tb"]', "control character in a string")
    refused('"a"\0', "more after the value at byte 4")
    refused('[1,]', "expected a value at byte 4")
    refused('{"a":1,}', "expected a string key")
  end)

  it("says what is wrong and where", function()
    assert.equal("more after the value at byte 8",
                 refused('{"a":1}x').message)
    assert.equal("expected a value at the end of the text",
                 refused('').message)
    refused('"\\ud800"', "high surrogate without its low half at byte 2")
    refused('"\\udc00"', "lone low surrogate")
    refused('"\\x"', "unknown escape")
    refused('"\\u12g4"', "bad hex digit")
    refused('"abc', "unterminated string")
    refused('{"a" 1}', "expected ':'")
    refused('tru', "expected a value")
  end)

  it("decodes escapes, surrogate pairs, \\u0000 and long strings", function()
    assert.equal("x\u{e9}\u{1F600}\n\0/\"\\\b\f\r\t",
      json.decode('"x\\u00e9\\ud83d\\ude00\\n\\u0000\\/\\"\\\\\\b\\f\\r\\t"'))
    local long = ("ab"):rep(3000)
    assert.equal(long .. "\n" .. long, json.decode('"' .. long .. '\\n'
                                                   .. long .. '"'))
    assert.equal("\u{e9}\u{e9}", json.decode('"\u{e9}\\u00e9"'))
  end)

  it("keeps the last of duplicate keys; gives -0, big and tiny numbers",
     function()
    assert.same({ a = 2 }, json.decode('{"a":1,"a":2}'))
    assert.equal(-math.huge, 1 / json.decode("-0"))
    assert.equal(123456789012345678, json.decode("123456789012345678"))
    assert.equal(9007199254740993 + 0, json.decode("9007199254740993"))
    assert.equal(0, json.decode("1e-400"))
    assert.equal(-1.5e-3, json.decode(" \t\r\n-1.5E-3 \n"))
  end)

  describe("with unique_keys", function()
    local U = { unique_keys = true }

    local function dup(text)
      local v, err = json.decode(text, U)
      assert.is_nil(v, text)
      assert.equal("invalid_json", err.kind)
      return err.message
    end

    it("refuses a key given twice, naming it and where it came again",
       function()
      local body = '{"order_id":"a1","channel":"native","amount":100,'
                   .. '"description":"tea","amount":5}'
      assert.equal('duplicate key "amount" at byte '
                   .. body:find('"amount":5', 1, true), dup(body))
      assert.equal('duplicate key "a" at byte 9', dup('{"a":1, "a":1}'))
      -- null is a value like any other; an escaped spelling is one key
      assert.equal('duplicate key "a" at byte 11', dup('{"a":null,"a":2}'))
      assert.equal('duplicate key "ab" at byte 9',
                   dup('{"ab":1,"a\\u0062":2}'))
      assert.equal('duplicate key "" at byte 7', dup('{"":1,"":2}'))
    end)

    it("refuses it in nested objects and inside arrays", function()
      assert.equal('duplicate key "amount" at byte 29',
                   dup('{"refund":{"amount":1,"x":2,"amount":3}}'))
      assert.equal('duplicate key "k" at byte 17',
                   dup('[{"k":1},{"k":2,"k":3}]'))
      assert.matches('^duplicate key "k" at byte %d+$',
                     dup(('[{"a":'):rep(50) .. '{"k":1,"k":2}'
                         .. ('}]'):rep(50)))
    end)

    it("takes a key again in another object, nested or beside", function()
      assert.same({ a = 1, b = { a = 2, b = { a = 3 } }, c = { { a = 4 },
                    { a = 5 } } },
                  json.decode('{"a":1,"b":{"a":2,"b":{"a":3}},'
                              .. '"c":[{"a":4},{"a":5}]}', U))
      assert.same({ a = json.null, b = false },
                  json.decode('{"a":null,"b":false}', U))
      -- keys of 1 and "1" are one key in a Lua table, both strings here
      assert.same({ ["1"] = 1, ["01"] = 2 },
                  json.decode('{"1":1,"01":2}', U))
    end)

    it("names a long key in part and a control character as ?", function()
      local long = ("k"):rep(100)
      assert.equal('duplicate key "' .. ("k"):rep(48) .. '..." at byte 107',
                   dup('{"' .. long .. '":1,"' .. long .. '":2}'))
      assert.equal('duplicate key "a?b" at byte 11',
                   dup('{"a\\nb":1,"a\\nb":2}'))
    end)

    it("is off without the option, and opts must be a table", function()
      assert.same({ a = 2 }, json.decode('{"a":1,"a":2}', {}))
      assert.same({ a = 2 }, json.decode('{"a":1,"a":2}',
                                         { unique_keys = false }))
      assert.has_error(function() json.decode("{}", true) end,
                       "paygate.json.decode: opts must be a table")
    end)

    it("raises on an option it does not know, or a unique_keys not a"
       .. " boolean", function()
      -- a slip (uniq, unique_key, "true") left duplicates accepted
      -- without a word: the check the caller asked for was not made
      for _, opts in ipairs({ { uniq = true }, { unique_key = true },
                              { unique_keys = "true" } }) do
        local ok, err = pcall(json.decode, '{"a":1,"a":2}', opts)
        assert.is_false(ok)
        assert.matches("paygate.json.decode: ", err, 1, true)
        assert.matches("opts.unique", err, 1, true)
      end
    end)
  end)

  -- objects are made the size the last object with the same first key
  -- had (a hint): whatever the hint says, every member is there
  it("decodes objects of one first key and many sizes whole", function()
    local function obj(first, n, extra)
      local t, parts = {}, {}
      for i = 1, n do
        local k = i == 1 and first or ("m" .. i .. (extra or ""))
        t[k] = i
        parts[#parts + 1] = cjson.encode(k) .. ":" .. i
      end
      return "{" .. table.concat(parts, ",") .. "}", t
    end
    local firsts = { "a", "out_trade_no", "out_trade_x", "out_trad",
                     "", "k\\\"q", "\u{e9}t\u{e9}", "id" }
    for _, first in ipairs(firsts) do
      local key = cjson.decode('"' .. first .. '"')
      -- 1, 200, 3, 65, 2 ... members: each after another size
      for _, n in ipairs{ 1, 200, 3, 65, 2, 64, 17, 1, 9, 9 } do
        local text, want = obj(key, n, first)
        assert.same(want, json.decode(text), first .. "/" .. n)
        -- the same shape nested, and in an array of its own kind
        local two = assert(json.decode('{"x":' .. text .. ',"y":[' .. text
                                       .. "," .. text .. "]}"))
        assert.same({ x = want, y = { want, want } }, two)
      end
    end
    -- duplicate keys count as members (for the hint); the last still wins
    assert.same({ a = 3, b = 1 }, json.decode('{"a":1,"b":1,"a":2,"a":3}'))
    assert.same({ a = 1 }, json.decode('{"a":1}'))
    -- a first key at the end of the text, shorter than a word
    assert.same({ k = {} }, json.decode('{"k":{}}'))
    assert.is_nil((json.decode('{"ab')))
  end)

  -- hints come from earlier texts, which may be hostile: one that sets a
  -- large hint for a first key, then a chain of small objects under that
  -- key, must cost what the chain costs unprimed, not 16 times more
  it("keeps hinted table sizes within what the text can hold", function()
    local chain = ('{"x":'):rep(990) .. "0" .. ("}"):rep(990)
    local function held(text)
      collectgarbage("collect")
      local before = collectgarbage("count")
      local v = assert(json.decode(text))
      collectgarbage("collect")
      local kb = collectgarbage("count") - before
      assert.is_table(v)
      return kb
    end
    local plain = held((chain:gsub('"x"', '"w"')))  -- a key never hinted
    local distinct = { '"x":0' }
    for i = 1, 63 do distinct[#distinct + 1] = '"k' .. i .. '":0' end
    for _, prime in ipairs{
      "{" .. ('"x":0,'):rep(63) .. '"x":0}',          -- one key, repeated
      "{" .. table.concat(distinct, ",") .. "}",      -- 64 keys
    } do
      assert.is_table(json.decode(prime))
      local primed = held(chain)
      assert.is_true(primed < 1.5 * plain, ("%.0f KB primed, %.0f KB"
        .. " unprimed"):format(primed, plain))
    end
  end)

  it("nests 1000 deep and no deeper", function()
    local ok = ("["):rep(1000) .. ("]"):rep(1000)
    assert.is_table(json.decode(ok))
    refused("[" .. ok .. "]", "nesting deeper than 1000")
  end)

  it("reads numbers longer than its stack buffer (64 bytes)", function()
    local digits = ("9"):rep(80)
    assert.equal(tonumber(digits), json.decode(digits))
    assert.equal(1e-101, json.decode("0." .. ("0"):rep(100) .. "1"))
    assert.equal(-1.5, json.decode("-1.5" .. ("0"):rep(200)))
    refused(digits .. ("0"):rep(300), "number out of range at byte 1")
  end)

  it("builds a long escaped string deep inside tables", function()
    -- the string's buffer spills onto the Lua stack many times, above the
    -- 400 tables under construction
    local piece = "a\\n\\u00e9\\ud83d\\ude00b"
    local text = '"' .. piece:rep(20000) .. '"'
    local open, close = ('[{"k":'):rep(200), ("}]"):rep(200)
    local v = assert(json.decode(open .. text .. close))
    for _ = 1, 200 do v = v[1].k end
    assert.equal(("a\n\u{e9}\u{1F600}b"):rep(20000), v)
    refused(open .. text:sub(1, -2) .. "\\q" .. close, "unknown escape")
  end)

  -- lua-cjson (numbers strict, depth 1000, and no overflow to inf) as the
  -- reference: what it refuses is refused here; what is accepted here it
  -- accepts with the same value; what it accepts and this refuses has a
  -- raw control character or a "1." number in it.
  local ref = cjson.new()
  ref.decode_invalid_numbers(false)
  ref.decode_max_depth(1000)
  local function ref_decode(text)
    local ok, v = pcall(ref.decode, text)
    if not ok or not jcore.finite(v) then return nil end
    return v
  end

  local function same(a, b)
    if type(a) ~= type(b) then return false end
    if type(a) ~= "table" then
      return a == b or (a ~= a and b ~= b)
    end
    for k, v in pairs(a) do
      if not same(v, b[k]) then return false end
    end
    for k in pairs(b) do
      if a[k] == nil then return false end
    end
    return true
  end

  -- a seeded generator, so that a failure is the same failure again
  local seed = 20261130
  local function rnd(n)
    seed = (seed * 1103515245 + 12345) % 2147483648
    return seed % n + 1
  end
  local ATOMS = { "0", "-0", "1", "-12", "3.25", "1e5", "-2.5E-3", "1E+2",
    "123456789012345678901234", "0.000001", "true", "false", "null",
    '""', '"a"', '"\\u00e9x"', '"\\ud83d\\ude00"', '"tab\\there"',
    '"\u{e4}\u{f6}"', '"\\\\\\"\\/"', '"' .. ("z"):rep(70) .. '"' }
  local WS = { "", "", "", " ", "\n", "\t ", "\r\n" }
  local function gen(depth)
    local r = rnd(depth > 4 and 1 or 3)
    if r == 1 then return ATOMS[rnd(#ATOMS)] end
    local parts, n = {}, rnd(4) - 1
    for i = 1, n do
      local v = gen(depth + 1)
      if r == 2 then
        parts[i] = WS[rnd(#WS)] .. v .. WS[rnd(#WS)]
      else
        parts[i] = WS[rnd(#WS)] .. '"k' .. rnd(5) .. '"' .. WS[rnd(#WS)]
                   .. ":" .. WS[rnd(#WS)] .. v
      end
    end
    if r == 2 then return "[" .. table.concat(parts, ",") .. "]" end
    return "{" .. table.concat(parts, ",") .. WS[rnd(#WS)] .. "}"
  end
  local BYTES = { "{", "}", "[", "]", ":", ",", '"', "\\", "u", "0", "1",
    "9", "e", "E", ".", "+", "-", "t", "n", "l", " ", "\t", "\n", "\1",
    "\0", "\127", "\200", "d8", "dc", "x", "'" }
  local function mutate(text)
    for _ = 1, rnd(3) do
      local at = rnd(#text + 1)
      local k = rnd(3)
      if k == 1 then                                  -- insert
        text = text:sub(1, at - 1) .. BYTES[rnd(#BYTES)] .. text:sub(at)
      elseif k == 2 and #text > 0 then                -- delete
        text = text:sub(1, at - 1) .. text:sub(at + 1)
      else                                            -- replace
        text = text:sub(1, at - 1) .. BYTES[rnd(#BYTES)] .. text:sub(at + 1)
      end
    end
    return text
  end

  it("decodes 3,000 generated documents as lua-cjson does", function()
    for i = 1, 3000 do
      local text = WS[rnd(#WS)] .. gen(0) .. WS[rnd(#WS)]
      local v, err = json.decode(text)
      assert(v ~= nil, ("#%d %q: %s"):format(i, text, tostring(err)))
      assert(same(v, ref_decode(text)), ("#%d %q"):format(i, text))
    end
  end)

  it("agrees with lua-cjson on 20,000 mutated documents", function()
    local accepted, refused_n = 0, 0
    for i = 1, 20000 do
      local text = mutate(gen(0))
      local v = json.decode(text)
      local r = ref_decode(text)
      if v ~= nil then
        accepted = accepted + 1
        assert(r ~= nil, ("#%d accepted what lua-cjson refuses: %q")
                         :format(i, text))
        assert(same(v, r), ("#%d decoded differently: %q"):format(i, text))
      else
        refused_n = refused_n + 1
        if r ~= nil then
          assert(text:find("[%z\1-\31]") or text:find("%d%.[^%d]")
                 or text:find("%d%.$"),
                 ("#%d refused what lua-cjson accepts: %q"):format(i, text))
        end
      end
    end
    -- both kinds were exercised
    assert.is_true(accepted > 1000 and refused_n > 1000,
                   accepted .. " accepted, " .. refused_n .. " refused")
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

  -- A value that is no table is encoded apart (no lua_pcall, no shared
  -- buffer: audit's canonical JSON encodes its keys and values one by
  -- one): its bytes and its errors must be those it has inside a table.
  it("writes a lone value as it writes it inside an array", function()
    local all = {}
    for c = 0, 255 do all[#all + 1] = string.char(c) end
    all = table.concat(all)
    local values = { "", "plain", "caf\195\169", "\255", "a\"b\\c/\n\t\0\127",
                     all, ("x"):rep(509), ("x"):rep(510), ("x"):rep(511),
                     ("x"):rep(5000), ("\1"):rep(84), ("\1"):rep(85),
                     ("\1"):rep(2000), ("\226\130\172"):rep(200), 0, -0, 1,
                     -2 ^ 63, 2 ^ 63, 1e300, 0.1, 1795919696.7419429, 1e-7,
                     true, false, json.null, json.empty_array }
    for i, v in ipairs(values) do
      local inside = json.encode({ v })
      assert.equal(inside:sub(2, -2), json.encode(v), i)
    end
    assert.equal("null", json.encode(nil))
    for _, v in ipairs({ 0 / 0, math.huge, -math.huge, print, 1LL,
                         coroutine.create(print), newproxy() }) do
      local ok, lone = pcall(json.encode, v)
      assert.is_false(ok)
      local _, inside = pcall(json.encode, { v })
      assert.equal(inside:gsub(" at value%[1%]$", " at value"), lone)
    end
  end)

  -- What an outbox payload's times (ms: epoch seconds to 3 places) and
  -- amounts write as: webhooks sign those bytes, so the digits of a
  -- fraction are pinned to printf's %.15g, or %.17g when %.15g does not
  -- read back the same (whatever way the encoder finds them).
  it("writes a fraction as %.15g when it reads back, else as %.17g",
     function()
    -- (the C library's printf: LuaJIT's own %g rounds ties otherwise)
    local ffi = require "ffi"
    pcall(ffi.cdef, "int snprintf(char *, size_t, const char *, ...);")
    local buf = ffi.new("char[64]")
    local function printf(x)
      ffi.C.snprintf(buf, 64, "%.15g", ffi.new("double", x))
      local s = ffi.string(buf)
      if tonumber(s) ~= x then
        ffi.C.snprintf(buf, 64, "%.17g", ffi.new("double", x))
        s = ffi.string(buf)
      end
      return s
    end
    local xs = { 1795919696.123, 1795919696.1, 1795919696.12, 0.5, -0.5,
                 0.0001, 0.00012, 0.00001, 99999999999999.9,
                 999999999999999.9, 123456789012.345, 1e-7, 0.3, 2.675,
                 1.005, -1795919696.999, 4503599627370495.5, 1e15 + 0.5,
                 0.1 + 0.2, 1 / 3, 5e-324, 1.7976931348623157e308,
                 999999999999999.5, 99999999999999.99, 99999999999999.5,
                 9999999999999.999, 0.99999999999999999, 0.00009999999999,
                 1795919696.7419429, 2 ^ 40 + 0.5, 0.625, 1 - 2 ^ -53,
                 2 ^ 52 - 0.5, 2 ^ -13, 0.1 * 3 }
    math.randomseed(7)
    for _ = 1, 2000 do
      local ms = math.random(0, 4102444800000)
      xs[#xs + 1] = ms / 1000
      xs[#xs + 1] = -ms / 1000
      xs[#xs + 1] = math.random(0, 99999999) / 100
      xs[#xs + 1] = math.random(1, 999999) / 10 ^ math.random(1, 9)
      xs[#xs + 1] = math.random() * 10 ^ math.random(-6, 16)
      -- a time to the microsecond (17 digits: %.17g)
      xs[#xs + 1] = (math.random(0, 2 ^ 31) * 1e6 + math.random(0, 999999))
                    / 1e6
      -- just either side of a power of 10 or of 2; a binary fraction
      -- (ties in rounding to 15 or 17 digits)
      local near = 1 + (math.random() - 0.5) * 2 ^ -math.random(40, 52)
      xs[#xs + 1] = 10 ^ math.random(-4, 14) * near
      xs[#xs + 1] = 2 ^ math.random(-14, 49) * near
      local b = math.random(1, 40)
      xs[#xs + 1] = math.random(0, 2 ^ (52 - b))
                    + math.random(1, 2 ^ b - 1) / 2 ^ b
    end
    for _, x in ipairs(xs) do
      if x ~= math.floor(x) then
        assert.equal(printf(x), json.encode(x))
        assert.equal('{"at":' .. printf(x) .. '}', json.encode({ at = x }))
      end
    end
  end)

  -- A finalizer may run inside an encode (the GC step of its final
  -- lua_pushlstring, before the copy) and encode too, e.g. by logging.
  -- It used to write into the same buffer, and free it when large: the
  -- outer result was read from freed memory (ASan: heap-use-after-free;
  -- without it, a crash or another value's bytes).
  it("gives an encode run by a finalizer during an encode its own buffer",
     function()
    local big = {}
    for i = 1, 3000 do big[i] = ("x"):rep(100) .. i end
    local want = json.encode(big)
    local ran = 0
    local function garbage()
      local p = newproxy(true)
      getmetatable(p).__gc = function()
        ran = ran + 1
        assert(#json.encode({ a = ("y"):rep(300000) }) == 300008)
      end
    end
    -- a whole cycle at every GC check: the proxy made just before an
    -- encode is finalized in the encode's own lua_pushlstring
    local bad = 0
    collectgarbage("setpause", 1)
    collectgarbage("setstepmul", 100000)
    collectgarbage()                    -- the next cycle starts at once
    local ok, err = pcall(function()
      for _ = 1, 20 do
        garbage()
        if json.encode(big) ~= want then bad = bad + 1 end
      end
    end)
    collectgarbage("setpause", 200)
    collectgarbage("setstepmul", 200)
    assert(ok, err)
    assert.is_true(ran > 0)
    assert.equal(0, bad)
  end)

  -- An error raised through an encode -- a finalizer that raises in the
  -- GC step of its final lua_pushlstring, as a memory error would --
  -- left the state's encoder marked busy, so every later encode took the
  -- nested path: a new state of its own (about 32 KB) each time.
  it("is not left busy by an error raised through an encode", function()
    local v = { "x" }
    local armed = false
    local function raising_garbage()
      local p = newproxy(true)
      getmetatable(p).__gc = function()
        if armed then error("finalizer failed", 0) end
      end
    end
    local raised
    -- a whole cycle at every GC check, however large the heap is (a step
    -- that stops short would run the finalizer at some later allocation,
    -- unarmed): the proxy is finalized in the encode's lua_pushlstring
    collectgarbage("setpause", 1)
    collectgarbage("setstepmul", 100000000)
    collectgarbage()                    -- the next cycle starts at once
    local ok, err = pcall(function()
      for _ = 1, 20 do
        raising_garbage()
        armed = true
        local done, e = pcall(json.encode, v)
        armed = false
        if not done then raised = e break end
      end
    end)
    armed = false
    collectgarbage("setpause", 200)
    collectgarbage("setstepmul", 200)
    assert(ok, err)
    assert.equal("finalizer failed", raised)
    collectgarbage()
    collectgarbage("stop")
    local before = collectgarbage("count")
    for _ = 1, 10 do assert.equal('["x"]', json.encode(v)) end
    local grew = collectgarbage("count") - before
    collectgarbage("restart")
    assert.is_true(grew < 30, ("%.1f KB allocated by 10 encodes"):format(grew))
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
    -- an empty array read back is written back as [] (it became {}: a
    -- WeChat answer's "promotion_detail": [] passed on as an object)
    local back = json.decode('{"a":[],"b":{},"c":[[]],"d":[1]}')
    assert.same({ a = {}, b = {}, c = { {} }, d = { 1 } }, back)
    assert.same({ a = "[]", b = "{}", c = "[[]]", d = "[1]" },
                { a = json.encode(back.a), b = json.encode(back.b),
                  c = json.encode(back.c), d = json.encode(back.d) })
    assert.equal(0, #back.a)
    -- filled since: what it holds decides
    back.a.x = 1
    assert.equal('{"x":1}', json.encode(back.a))
    local arr = json.decode("[]")
    arr[1] = "v"
    assert.equal('["v"]', json.encode(arr))
    assert.equal("[null,true,false]", json.encode({ json.null, true, false }))
    assert.same({ ["1"] = "x", a = 1 },
                cjson.decode(json.encode({ [1] = "x", a = 1 })))
    local v = { id = 7, tags = { "a", "b" }, amount = { total = 100 },
                note = cjson.null, ok = false }
    assert.same(v, cjson.decode(json.encode(v)))
  end)
end)
