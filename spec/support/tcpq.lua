-- spec/support/tcpq.lua: what the kernel holds for a local TCP port
-- (IPv4, /proc/net/tcp), to wait on a server having taken what a client
-- sent instead of sleeping and hoping it has.
local _M = {}

-- the listener's accept queue and the unread bytes of each established
-- connection whose local port is `port` (the server's side)
local function scan(port)
  local backlog, unread = nil, {}
  for line in io.lines("/proc/net/tcp") do
    local lport, st, rxq = line:match(
      "^%s*%d+: %x+:(%x+) %x+:%x+ (%x%x) %x+:(%x+)")
    if lport and tonumber(lport, 16) == port then
      if st == "0A" then
        backlog = tonumber(rxq, 16)
      elseif st == "01" then
        unread[#unread + 1] = tonumber(rxq, 16)
      end
    end
  end
  return backlog, unread
end

--- syntax: ok = tcpq.all_read(port, n)
-- true when the server on `port` has accepted every connection (its
-- accept queue is empty), has n of them at least, and has read every
-- byte sent on each (no receive queue left)
function _M.all_read(port, n)
  local backlog, unread = scan(port)
  if backlog ~= 0 or #unread < n then
    return false
  end
  for _, q in ipairs(unread) do
    if q ~= 0 then return false end
  end
  return true
end

return _M
