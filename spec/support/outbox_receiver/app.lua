-- spec/support/outbox_receiver/app.lua: a merchant's webhook endpoint for
-- the outbox specs. It checks every delivery's Paygate-Signature with
-- outbox.verify_webhook (config.secret) and counts by event id:
--
--   POST /hook        -> 204, or 400 { error = kind } for a bad signature;
--                        500 for the first attempt of an event whose id is
--                        a multiple of config.fail_first_every; 400
--                        { error = "rejected" } for a subject listed by
--                        POST /_ctl/reject
--   POST /_ctl/reject { subjects = { ... } }   (replaces the list)
--   GET  /_ctl/stats  -> { ok = { [id] = n }, attempts = { [id] = n },
--                          order = { { id, subject, worker } },
--                          refused = { kind = n } }
--
-- It keeps everything in memory: run it with one worker.
local paygate = require "paygate"
local json = require "paygate.json"
local outbox = require "paygate.outbox"

local secret = paygate.config.secret
local every = paygate.config.fail_first_every or 0
local reject = {}
local ok, attempts, order, refused = {}, {}, {}, {}

paygate.route("POST", "/hook", function(req)
  local good, err = outbox.verify_webhook(secret,
                                          req:header("Paygate-Signature"),
                                          req.body)
  if not good then
    refused[err.kind] = (refused[err.kind] or 0) + 1
    return 400, { error = err.kind }
  end
  local event = json.decode(req.body)
  local id = tostring(event.id)
  if req:header("Paygate-Event-Id") ~= id then
    return 400, { error = "id_mismatch" }
  end
  attempts[id] = (attempts[id] or 0) + 1
  if reject[event.subject] then
    return 400, { error = "rejected" }
  end
  if every > 0 and event.id % every == 0 and attempts[id] == 1 then
    return 500, { error = "first attempt fails" }
  end
  ok[id] = (ok[id] or 0) + 1
  order[#order + 1] = { id = event.id, subject = event.subject,
                        worker = req:header("X-Worker") }
  return 204
end)

paygate.route("POST", "/_ctl/reject", function(req)
  reject = {}
  for _, s in ipairs(req:json().subjects or {}) do
    reject[s] = true
  end
  return 200, { ok = true }
end)

paygate.route("GET", "/_ctl/stats", function()
  return 200, { ok = ok, attempts = attempts,
                order = #order > 0 and order or json.empty_array,
                refused = refused }
end)
