-- The seeded draws of the randomized gateway specs (chaos_spec,
-- model_spec): a seed taken from the environment or the clock and
-- printed, so that a failure can be run again, and a generator of our own
-- (math.random is shared with other code).
local core = require "paygate.core"

local _M = {}

--- syntax: seed = seeded.seed(name, spec) -- $name, or one from the clock;
-- printed as "spec: name=seed"
function _M.seed(name, spec)
  local seed = tonumber(os.getenv(name))
               or (os.time() % 100000 + math.floor(core.time() * 1000) % 1000)
  print("\n" .. spec .. ": " .. name .. "=" .. seed)
  return seed
end

--- syntax: r = seeded.rng(seed) -- a Lehmer generator: r.float(a, b) in
-- [a, b), r.int(a, b) in a .. b, r.pick(list), r.chance(p); one draw each
function _M.rng(seed)
  local s = seed % 2147483647
  if s <= 0 then s = s + 2147483646 end
  local function step()
    s = s * 16807 % 2147483647
    return s
  end
  for _ = 1, 20 do step() end      -- near seeds, far apart draws
  local r = {}
  function r.float(a, b) return a + (b - a) * ((step() - 1) / 2147483646) end
  function r.int(a, b)             -- a .. b inclusive
    return a + math.floor((step() - 1) / 2147483646 * (b - a + 1))
  end
  function r.pick(t) return t[r.int(1, #t)] end
  function r.chance(p) return (step() - 1) / 2147483646 < p end
  return r
end

return _M
