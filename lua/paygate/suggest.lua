-- paygate.suggest: the known name nearest to a misspelt one, for the
-- "did you mean ...?" of a message (config keys, options).
local _M = {}

-- Levenshtein distance of a and b, two rows
local function distance(a, b)
  local prev, cur = {}, {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    cur[0] = i
    for j = 1, #b do
      local cost = a:byte(i) == b:byte(j) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev, cur = cur, prev
  end
  return prev[#b]
end

-- Whether key is whole words of name: one or more of its '_'-separated
-- parts, in a row, not all of them (age of max_age, lease_ttl of
-- outbox_lease_ttl; not ag of max_age, not age of page).
local function words_of(key, name)
  local a, b = "_" .. name .. "_", "_" .. key .. "_"
  return #name > #key and a:find(b, 1, true) ~= nil
end

--- syntax: name = suggest.nearest(key, known[, most])
-- known: a set ({ name = true, ... }). The name meant by key, or nil:
--   1. one edit away (Levenshtein: a letter added, dropped or changed);
--   2. else a name key is whole words of (age: max_age; days:
--      outbox_days), for a key of 3 bytes or more;
--   3. else up to `most` (default 2) edits away.
-- An edit must leave two bytes of the key at least (a key of 3 bytes: one
-- edit; of 2: none): a short word changed wholesale is another word, not
-- a slip (age is two edits from name). Ties: the first in byte order (of
-- word matches: the shortest first).
function _M.nearest(key, known, most)
  most = most or 2
  local room = math.min(most, #key - 2)
  local best, bd = nil, room + 1
  local word
  for k in pairs(known) do
    if math.abs(#k - #key) <= room then
      local d = distance(key, k)
      if d < bd or (d == bd and best and k < best) then best, bd = k, d end
    end
    if #key >= 3 and words_of(key, k)
       and (not word or #k < #word or (#k == #word and k < word)) then
      word = k
    end
  end
  if best and bd <= 1 then return best end
  return word or best
end

--- syntax: s = suggest.hint(key, known)
-- " (did you mean NAME?)" when key is a string of at most 64 bytes and
-- nearest finds the NAME it means in the set known, else "": for an "unknown
-- key" message ("gateway.payment_tl: unknown key (did you mean
-- payment_ttl?)"). known: a set, as nearest's. (A longer key is not
-- searched: each distance costs its length times the name's.)
function _M.hint(key, known)
  if type(key) ~= "string" or #key > 64 then return "" end
  local near = _M.nearest(key, known)
  return near and " (did you mean " .. near .. "?)" or ""
end

return _M
