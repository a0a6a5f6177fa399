-- paygate.utf8: UTF-8 as PostgreSQL and WeChat Pay take it (no overlong
-- form, no surrogate, nothing past U+10FFFF), one decoder for the
-- libraries that check or clean text.
local byte = string.byte

local _M = {}

--- syntax: n = utf8.char_len(s, i)
-- returns: the byte length (1 to 4) of the valid character at s[i], or
-- nil (an invalid or cut sequence, or i past the end).
function _M.char_len(s, i)
  local c = byte(s, i)
  if not c then return nil end
  if c < 0x80 then return 1 end
  local n, lo, hi
  if c >= 0xc2 and c <= 0xdf then n, lo, hi = 2, 0x80, 0xbf
  elseif c == 0xe0 then n, lo, hi = 3, 0xa0, 0xbf
  elseif c == 0xed then n, lo, hi = 3, 0x80, 0x9f
  elseif c >= 0xe1 and c <= 0xef then n, lo, hi = 3, 0x80, 0xbf
  elseif c == 0xf0 then n, lo, hi = 4, 0x90, 0xbf
  elseif c == 0xf4 then n, lo, hi = 4, 0x80, 0x8f
  elseif c >= 0xf1 and c <= 0xf3 then n, lo, hi = 4, 0x80, 0xbf
  else return nil end
  local b = byte(s, i + 1)
  if not b or b < lo or b > hi then return nil end
  for k = 2, n - 1 do
    b = byte(s, i + k)
    if not b or b < 0x80 or b > 0xbf then return nil end
  end
  return n
end
local char_len = _M.char_len

--- syntax: n, bad = utf8.len(s)
-- returns: the number of characters of s, or nil and the byte offset of
-- the first invalid sequence.
function _M.len(s)
  local i, n, len = 1, 0, #s
  while i <= len do
    if byte(s, i) < 0x80 then     -- ASCII: no call (most text is)
      i = i + 1
    else
      local k = char_len(s, i)
      if not k then return nil, i end
      i = i + k
    end
    n = n + 1
  end
  return n
end

return _M
