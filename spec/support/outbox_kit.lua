-- spec/support/outbox_kit.lua: steps the paygate.outbox specs share.
--
--   local kit = require "support.outbox_kit"
--   local id = kit.enqueue(db, subject, type[, payload])
--   kit.wait_until(function() return done end, 10, "the delivery")
local paygate = require "paygate"
local core = require "paygate.core"
local outbox = require "paygate.outbox"

local _M = {}

--- syntax: kit.wait_until(cond, secs, what)
-- Yields (10 ms at a time, on the real clock) until cond() holds; raises
-- after secs, naming what it waited for.
function _M.wait_until(cond, secs, what)
  local deadline = core.time() + secs
  while not cond() do
    if core.time() > deadline then
      error("timed out after " .. secs .. " s waiting for " .. what, 2)
    end
    paygate.sleep(0.01)
  end
end

--- syntax: id = kit.enqueue(db, subject, etype[, payload])
-- One event (payload { subject = subject } unless given) enqueued in a
-- transaction of its own; returns its id.
function _M.enqueue(db, subject, etype, payload)
  return assert(db:transaction(function(tx)
    return outbox.enqueue(tx, { subject = subject, type = etype,
                                payload = payload or { subject = subject } })
  end))
end

return _M
