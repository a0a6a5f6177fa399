-- spec/support/outbox_app/app.lua: an app whose workers each run an
-- outbox dispatcher (webhook sink) over one database (config.db):
--
--   POST /enqueue { events = { { subject, type, payload }, ... } }
--     -> 201 { ids = { ... } }, all enqueued in one transaction
--   GET  /stats -> this worker's dispatcher stats and tag
--   GET  /held  -> { held = { n, ... } }: the shards each worker's
--                  dispatcher holds (every worker, through the shared dict)
local paygate = require "paygate"
local sql = require "paygate.sql"
local crypto = require "paygate.crypto"
local outbox = require "paygate.outbox"

local cfg = paygate.config
local db = assert(sql.open(cfg.db))
assert(outbox.setup(db))

local tag = crypto.random_nonce(8)
local d = outbox.dispatcher(db, {
  sinks = { outbox.webhook{ url = cfg.hook_url, secret = cfg.secret,
                            timeout = 5, headers = { ["X-Worker"] = tag } } },
  interval = 0.05, partitions = 8, max_partitions = 4,
  backoff_base = 0.05, backoff_cap = 0.5, max_attempts = 5,
  lease_ttl = 20,
}):start()

-- each worker publishes how many shards it holds, in slot `slot`
local dict = require("paygate.shared").get_dict("paygate")
local slot = assert(dict:incr("outbox_app:workers", 1, 0))
paygate.spawn(function()
  while true do
    local n = 0
    for _ in pairs(d.leases) do n = n + 1 end
    dict:set("outbox_app:held:" .. slot, n)
    paygate.sleep(0.05)
  end
end)

paygate.route("GET", "/held", function()
  local held = {}
  for i = 1, tonumber(dict:get("outbox_app:workers")) or 0 do
    held[i] = tonumber(dict:get("outbox_app:held:" .. i)) or 0
  end
  return 200, { held = held }
end)

paygate.route("POST", "/enqueue", function(req)
  local body = req:json()
  local ids = {}
  local ok, err = db:transaction(function(tx)
    for i, e in ipairs(body.events) do
      local id, eerr = outbox.enqueue(tx, e)
      if not id then
        return nil, eerr
      end
      ids[i] = id
    end
    return true
  end)
  if not ok then
    return 503, { error = tostring(err) }
  end
  return 201, { ids = ids }
end)

paygate.route("GET", "/stats", function()
  return 200, { tag = tag, stats = d.stats }
end)
