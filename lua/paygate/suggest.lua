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

return _M
