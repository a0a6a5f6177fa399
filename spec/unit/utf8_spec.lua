-- paygate.utf8: the one UTF-8 decoder of the libraries (wechatpay's
-- parameter checks, the outbox's last_error).
local utf8 = require "paygate.utf8"

describe("paygate.utf8", function()
  it("char_len: the length of a valid character, nil for anything else",
     function()
    assert.equal(1, utf8.char_len("a", 1))
    assert.equal(1, utf8.char_len("\0", 1))           -- ASCII, controls too
    assert.equal(2, utf8.char_len("é", 1))
    assert.equal(3, utf8.char_len("中", 1))
    assert.equal(4, utf8.char_len("😀", 1))
    assert.equal(3, utf8.char_len("a中", 2))
    assert.is_nil(utf8.char_len("a", 2))              -- past the end
    for _, bad in ipairs({
      "\128",            -- a continuation byte alone
      "\192\175",        -- overlong (C0, C1)
      "\193\191",
      "\224\128\175",    -- overlong three-byte
      "\237\160\128",    -- a surrogate (U+D800)
      "\240\128\128\175",-- overlong four-byte
      "\244\144\128\128",-- past U+10FFFF
      "\245\128\128\128",
      "\255",
      "\228\184",        -- cut
      "\228a\173",       -- a bad continuation
    }) do
      assert.is_nil(utf8.char_len(bad, 1), ("%q"):format(bad))
    end
  end)

  it("len: characters, or nil and the offset of the first bad byte",
     function()
    assert.equal(0, utf8.len(""))
    assert.equal(6, utf8.len("a中é😀\t\n"))
    local n, at = utf8.len("ab\237\160\128c")
    assert.is_nil(n)
    assert.equal(3, at)
    n, at = utf8.len("中\228\184")
    assert.is_nil(n)
    assert.equal(4, at)
  end)

  it("len: the offset of the first 4-byte character, as third value",
     function()
    assert.same({ 6, nil, 7 }, { utf8.len("a中é😀\t\n") })
    assert.same({ 3, nil, 2 }, { utf8.len("a\240\144\128\128😀") })
    assert.same({ 4, nil, nil }, { utf8.len("ab中\239\191\191") })
    -- a bad sequence after one: nil and the bad byte, as ever
    assert.same({ nil, 6 }, { utf8.len("😀a\255") })
  end)

  it("clean: bad bytes and controls as ?, cut at a character's end",
     function()
    -- text that needs nothing is the same string, not cut
    local t, cut = utf8.clean("abc 中文", 100)
    assert.equal("abc 中文", t)
    assert.is_false(cut)
    -- invalid bytes and control characters, each byte one "?" (the
    -- surrogate's three bytes are three)
    assert.equal("a?b?c?d???", (utf8.clean("a\255b\0c\27d\237\160\128",
                                           100)))
    assert.equal("x\ty\nz", (utf8.clean("x\ty\nz", 100, true)))
    assert.equal("x?y?z", (utf8.clean("x\ty\nz", 100)))
    -- a cut never splits a character: "中" is 3 bytes, so 4 bytes of
    -- "a中中" keep "a中", 6 keep "a中" too
    t, cut = utf8.clean("a中中", 4)
    assert.equal("a中", t)
    assert.is_true(cut)
    t, cut = utf8.clean("a中中", 6)
    assert.equal("a中", t)
    assert.is_true(cut)
    t, cut = utf8.clean("a中中", 7)
    assert.equal("a中中", t)
    assert.is_false(cut)
    -- what comes out is always valid UTF-8 of at most max bytes
    local rnd = {}
    for i = 1, 2000 do rnd[i] = string.char(math.random(0, 255)) end
    local s = table.concat(rnd)
    for _, max in ipairs({ 0, 1, 2, 3, 50, 1999, 5000 }) do
      t = utf8.clean(s, max)
      assert.truthy(utf8.len(t))
      assert.truthy(#t <= max)
      assert.is_nil(t:find("[%z\1-\31\127]"))
    end
  end)

  it("bmp: 1- to 3-byte characters only (what WeChat Pay takes)", function()
    assert.is_true(utf8.bmp(""))
    assert.is_true(utf8.bmp("ascii 中文 \239\191\191"))     -- up to U+FFFF
    -- U+10000 (the first 4-byte character) and an emoji: refused, at
    -- the byte that starts them
    assert.same({ false, 2 }, { utf8.bmp("a\240\144\128\128") })
    assert.same({ false, 3 }, { utf8.bmp("QQ\240\159\152\128") })
    -- not UTF-8 at all: refused at the bad byte
    assert.same({ false, 2 }, { utf8.bmp("a\255") })
    assert.same({ false, 1 }, { utf8.bmp("\237\160\128") })  -- a surrogate
  end)
end)
