-- paygate.utf8: UTF-8 as PostgreSQL and WeChat Pay take it (no overlong
-- form, no surrogate, nothing past U+10FFFF), one decoder for the
-- libraries that check or clean text.
local byte = string.byte
local concat = table.concat

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

--- syntax: n, bad, four = utf8.len(s)
-- returns: the number of characters of s and, as third value, the byte
-- offset of its first 4-byte character (nil when none: all of s is in
-- U+0000..U+FFFF); or nil and the byte offset of the first invalid
-- sequence. One pass: a caller that must refuse 4-byte characters (WeChat
-- Pay's fields) need not search again.
function _M.len(s)
  local i, n, len, four = 1, 0, #s, nil
  while i <= len do
    if byte(s, i) < 0x80 then     -- ASCII: no call (most text is)
      i = i + 1
    else
      local k = char_len(s, i)
      if not k then return nil, i end
      if k == 4 and not four then four = i end
      i = i + k
    end
    n = n + 1
  end
  return n, nil, four
end

--- syntax: ok, at = utf8.bmp(s)
-- Whether s is valid UTF-8 of 1- to 3-byte characters only (U+0000 to
-- U+FFFF): WeChat Pay takes no 4-byte character, such as an emoji, in a
-- request field. returns: true; or false and the byte offset of the first
-- invalid sequence or 4-byte character.
function _M.bmp(s)
  local n, bad, four = _M.len(s)
  if not n then return false, bad end
  if four then return false, four end
  return true
end

--- syntax: t, cut = utf8.clean(s, max[, keep_lines])
-- s as text any store and log takes: each byte that is not part of a
-- valid character, and each control character (tab and newline kept
-- with keep_lines), as "?"; at most max bytes, cut at a character's end
-- (PostgreSQL refuses a text that is not UTF-8 or holds a NUL: a record
-- of hostile input must not be lost for its bytes). cut: whether s was
-- longer than what is returned.
function _M.clean(s, max, keep_lines)
  local len = #s
  if len <= max and not s:find("[%z\1-\31\127-\255]") then
    return s, false
  end
  local out, n, i, size = {}, 0, 1, 0
  while i <= len do
    local k = char_len(s, i)
    local piece
    if k == 1 then
      local c = byte(s, i)
      if (c < 32 or c == 127) and not (keep_lines and (c == 9 or c == 10))
      then
        piece = "?"
      else
        piece = s:sub(i, i)
      end
    elseif k then
      piece = s:sub(i, i + k - 1)
    else
      piece, k = "?", 1
    end
    if size + #piece > max then return concat(out), true end
    n = n + 1
    out[n] = piece
    size = size + #piece
    i = i + k
  end
  return concat(out), false
end

return _M
