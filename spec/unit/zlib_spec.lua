-- paygate.zlib: streaming inflate (gzip / zlib auto-detected) with bounded
-- output per call, and one-shot gzip / compress.
local zlib = require "paygate.zlib"
local core = require "paygate.core"

-- feeds s to a new inflater in pieces of `step` bytes; returns the output
local function inflate_all(s, step, opts)
  local z = zlib.inflate(opts)
  local out = {}
  for i = 1, #s, step do
    local piece, more = z:write(s:sub(i, i + step - 1))
    if not piece then return nil, more end
    out[#out + 1] = piece
    while more do
      piece, more = z:write("")
      if not piece then return nil, more end
      out[#out + 1] = piece
    end
  end
  repeat
    local rest, more = z:finish()
    if not rest then return nil, more end
    out[#out + 1] = rest
  until not more
  return table.concat(out)
end

local function sample(n)
  local t = {}
  for i = 1, n do t[i] = ("line %d: %s\n"):format(i, ("ab"):rep(i % 40)) end
  return table.concat(t)
end

describe("paygate.zlib", function()
  it("raises on misuse", function()
    assert.has_error(function() zlib.inflate("x") end)
    assert.has_error(function() zlib.inflate{ max_piece = 0 } end)
    assert.has_error(function() zlib.gzip(nil) end)
    assert.has_error(function() zlib.gzip("x", 12) end)
    local z = zlib.inflate()
    z:close()
    z:close()
    assert.has_error(function() z:write("x") end)
  end)

  it("refuses garbage with kind malformed", function()
    local out, err = inflate_all("this is not compressed at all", 4)
    assert.is_nil(out)
    assert.equal("malformed", err.kind)
    assert.is_true(core.is_error(err))
    -- the stream is dead after an error
    local z = zlib.inflate()
    assert.is_nil(z:write("\0\0\0\0garbage"))
    assert.has_error(function() z:write("x") end)
  end)

  it("refuses a truncated stream at finish", function()
    local gz = zlib.gzip(sample(2000))
    for _, cut in ipairs({ 1, 10, math.floor(#gz / 2), #gz - 1 }) do
      local out, err = inflate_all(gz:sub(1, cut), 7)
      assert.is_nil(out, "cut at " .. cut)
      assert.equal("malformed", err.kind)
    end
  end)

  it("refuses a corrupted body or CRC", function()
    local s = sample(500)
    local gz = zlib.gzip(s)
    local bad = gz:sub(1, #gz - 8) .. string.char((gz:byte(#gz - 7) + 1) % 256)
                .. gz:sub(#gz - 6)
    local out, err = inflate_all(bad, 100)
    assert.is_nil(out)
    assert.equal("malformed", err.kind)
  end)

  it("round-trips gzip and zlib data, any chunking", function()
    local s = sample(3000)
    for _, packed in ipairs({ zlib.gzip(s), zlib.compress(s), zlib.gzip(s, 1),
                              zlib.compress(s, 9) }) do
      assert.is_true(#packed < #s)
      for _, step in ipairs({ 1, 3, 100, 4096, #packed }) do
        assert.equal(s, inflate_all(packed, step))
      end
    end
    assert.equal("", inflate_all(zlib.gzip(""), 5))
  end)

  it("reads concatenated gzip members as one stream", function()
    assert.equal("hello, world", inflate_all(zlib.gzip("hello, ")
                                             .. zlib.gzip("world"), 3))
  end)

  it("refuses data after the end of a zlib stream", function()
    local out, err = inflate_all(zlib.compress("abc") .. "trailing", 4)
    assert.is_nil(out)
    assert.equal("malformed", err.kind)
  end)

  it("caps each piece at max_piece and the whole at max_total", function()
    local s = ("z"):rep(1000000)
    local z = zlib.inflate{ max_piece = 10000 }
    local out, more = z:write(zlib.gzip(s))
    assert.equal(10000, #out)
    assert.is_true(more)
    local n = #out
    while more do
      out, more = z:write("")
      assert.is_true(#out <= 10000)
      n = n + #out
    end
    assert.equal(1000000, n)
    assert.equal("", (z:finish()))
    local res, err = inflate_all(zlib.gzip(s), 1000, { max_total = 500000 })
    assert.is_nil(res)
    assert.equal("too_large", err.kind)
  end)

  it("inflates a 100 MiB stream fed in small chunks in bounded memory", function()
    local dir = os.tmpname()
    os.remove(dir)
    local file = dir .. ".gz"
    finally(function() os.remove(file) end)
    -- 100 MiB of text lines, compressed by the system's gzip
    assert(os.execute("yes 'paygate bill line,0001,SUCCESS,100' 2>/dev/null | head -c 104857600 | gzip -c > "
                      .. file))
    local f = assert(io.open(file, "rb"))
    local z = zlib.inflate()
    collectgarbage()
    local base, peak = collectgarbage("count"), 0
    local total, lines_ok = 0, true
    local line = "paygate bill line,0001,SUCCESS,100\n"
    local function take(piece)
      if #piece > 0 then
        -- the output continues the repeated line where the last one left it
        local off = total % #line
        local want = (line:sub(off + 1) .. line):sub(1, math.min(#piece, 16))
        if piece:sub(1, #want) ~= want then lines_ok = false end
      end
      assert.is_true(#piece <= 1024 * 1024)
      total = total + #piece
      local kb = collectgarbage("count")
      if kb > peak then peak = kb end
    end
    while true do
      local chunk = f:read(4096)
      if not chunk then break end
      local piece, more = assert(z:write(chunk))
      take(piece)
      while more do
        piece, more = assert(z:write(""))
        take(piece)
      end
    end
    f:close()
    repeat
      local rest, more = assert(z:finish())
      take(rest)
    until not more
    assert.equal(104857600, total)
    assert.is_true(lines_ok)
    assert.is_true(peak - base < 16 * 1024, ("heap grew %d KiB"):format(peak - base))
  end)
end)
