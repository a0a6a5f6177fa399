-- spec/support/dnsserver.lua: a DNS responder on a free loopback UDP port
-- for specs (spec/support/dns_responder.py; python3 is in scripts/deps).
--
--   local dnsserver = require "spec.support.dnsserver"
--   local d = dnsserver.start({
--     { "db.test", "A", 1, "127.0.0.1" },              -- name type ttl addr
--     { "slow.test", "A", 30, "127.0.0.1", delay = 2 }, -- answers after 2 s
--   })
--   d.addr                   -- "127.0.0.1:PORT", for resolver = ...
--   d:set(records)           -- replaces the zone (read on the next query)
--   d:queries("db.test")     -- how many questions for that name came
--   d:stop()
local proc = require "spec.support.proc"
local server = require "paygate.testing.server"

local _M = {}
local D = {}
D.__index = D

local HERE = debug.getinfo(1, "S").source:match("^@(.*/)") or "spec/support/"

local function zone_text(records)
  local out = {}
  for _, r in ipairs(records) do
    out[#out + 1] = string.format("%s %s %d %s%s", r[1], r[2], r[3], r[4],
                                  r.delay and (" delay=" .. r.delay) or "")
  end
  return table.concat(out, "\n") .. "\n"
end

-- Writes the zone in one rename, so the responder never reads half.
function D:set(records)
  local tmp = self.zone .. ".new"
  local f = assert(io.open(tmp, "w"))
  f:write(zone_text(records))
  f:close()
  assert(os.rename(tmp, self.zone))
end

function D:queries(name)
  local n = 0
  for line in proc.read(self.portfile .. ".log"):gmatch("[^\n]+") do
    local q = line:match("^%S+ (%S+)")
    if q and q:lower() == name:lower() then
      n = n + 1
    end
  end
  return n
end

function D:stop()
  if self.proc then
    self.proc:stop(5)
    self.proc = nil
  end
  server.rmdir(self.dir)
end

function _M.start(records)
  local d = setmetatable({ dir = server.tmpdir() }, D)
  d.zone = d.dir .. "/zone"
  d.portfile = d.dir .. "/port"
  d:set(records or {})
  d.proc = proc.spawn({ "python3", HERE .. "dns_responder.py", d.zone,
                        d.portfile },
                      { log = d.dir .. "/responder.log", watchdog = true })
  local port = proc.wait_until(function()
    return tonumber((proc.read(d.portfile):match("%d+")))
  end, 10, "the DNS responder's port")
  d.port = port
  d.addr = "127.0.0.1:" .. port
  return d
end

return _M
