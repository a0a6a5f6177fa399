-- spec/support/notify_receiver/app.lua: a notification receiver for the
-- simulator's specs. It records every POST /notify/:box (headers, raw
-- body, arrival time, the answer it gave) and answers as told:
--
--   POST /_ctl/answer { box, statuses = { 500, 201, ... }, status = 204,
--                       delay = seconds }
--     the next POSTs to box get statuses[1], statuses[2], ... in turn,
--     then `status` (default 204); each answer waits `delay` seconds first;
--     with hold = true, each answer waits until POST /_ctl/release { box }
--     (30 s at most: then it answers anyway); with body_bytes = n, a 200
--     carries an HTML page of n bytes (a framework's default page)
--   POST /_ctl/release { box }  lets the held answers of box go
--   GET /_ctl/received?box=NAME -> [{ headers, body, at, answered }]
--
-- It keeps everything in memory: run it with one worker.
local paygate = require "paygate"
local core = require "paygate.core"

local boxes = {}
local HOLD_MAX = 30               -- s a held answer waits for its release

local function box(name)
  local b = boxes[name]
  if not b then
    b = { got = {}, statuses = {}, status = 204, delay = 0, hold = false,
          body_bytes = 0 }
    boxes[name] = b
  end
  return b
end

paygate.route("POST", "/notify/:box", function(req)
  local b = box(req.params.box)
  local status = table.remove(b.statuses, 1) or b.status
  local rec = { headers = req.headers, body = req.body, at = core.time(),
                answered = status }
  b.got[#b.got + 1] = rec
  if b.delay > 0 then core.sleep(b.delay) end
  local until_t = core.mono() + HOLD_MAX
  while b.hold and core.mono() < until_t do core.sleep(0.02) end
  if status == 200 and b.body_bytes > 0 then
    local head = "<html><body>"
    return status, head .. string.rep("x", b.body_bytes - #head),
           { ["Content-Type"] = "text/html" }
  end
  if status == 200 or status == 204 then return status, "" end
  return status, { code = "FAIL", message = "told to fail" }
end)

paygate.route("POST", "/_ctl/answer", function(req)
  local o = req:json()
  local b = box(o.box)
  b.statuses = o.statuses or {}
  b.status = o.status or 204
  b.delay = o.delay or 0
  b.hold = o.hold == true
  b.body_bytes = o.body_bytes or 0
  return 200, { ok = true }
end)

paygate.route("POST", "/_ctl/release", function(req)
  box(req:json().box).hold = false
  return 200, { ok = true }
end)

paygate.route("GET", "/_ctl/received", function(req)
  local got = box(req:query().box).got
  if #got == 0 then return 200, "[]" end
  return 200, got
end)
