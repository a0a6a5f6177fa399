-- paygate.suggest: the known name nearest to a misspelt one, for the
-- "did you mean ...?" of a message (config keys, options).
local _M = {}

--- syntax: name = suggest.nearest(key, known[, most])
-- known: a set ({ name = true, ... }). The name nearest to key, at most
-- `most` (default 2) edits away (Levenshtein), or nil; ties: the first in
-- byte order.
function _M.nearest(key, known, most)
  local best, bd = nil, (most or 2) + 1
  for k in pairs(known) do
    if math.abs(#k - #key) < bd then
      -- Levenshtein distance, two rows
      local prev, cur = {}, {}
      for j = 0, #k do prev[j] = j end
      for i = 1, #key do
        cur[0] = i
        for j = 1, #k do
          local cost = key:byte(i) == k:byte(j) and 0 or 1
          cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
        end
        prev, cur = cur, prev
      end
      if prev[#k] < bd or (prev[#k] == bd and best and k < best) then
        best, bd = k, prev[#k]
      end
    end
  end
  return best
end

--- syntax: s = suggest.hint(key, known)
-- " (did you mean NAME?)" when key is a string of at most 64 bytes within
-- nearest's two edits of NAME in the set known, else "": for an "unknown
-- key" message ("gateway.payment_tl: unknown key (did you mean
-- payment_ttl?)"). known: a set, as nearest's. (A longer key is not
-- searched: each distance costs its length times the name's.)
function _M.hint(key, known)
  if type(key) ~= "string" or #key > 64 then return "" end
  local near = _M.nearest(key, known)
  return near and " (did you mean " .. near .. "?)" or ""
end

return _M
