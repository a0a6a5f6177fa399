-- examples/gateway/spec/notify_tee: stands where WeChat's notifications
-- arrive for the multi-instance spec. Each notification the simulator
-- POSTs is forwarded, byte for byte with its signature headers, to one
-- gateway instance (round robin), whose answer goes back to the
-- simulator; the same signed request is also sent at once to every other
-- instance (after a random 0-20 ms), so each instance sees the same
-- notification ids, interleaved, concurrently. A request the primary
-- acknowledged is sent to it once more, unchanged (a replay).
--
--   POST /_ctl/targets { targets = { "http://127.0.0.1:P1", ... }
--                        [, seed = n, copy = p] }
--     with a seed, each notification's primary instance is drawn by a
--     generator of that seed instead (one draw per notification, in
--     arrival order), and the copy to each other instance is sent with
--     probability p (another draw; p = 1 unless given)
--   POST /wechatpay/notify/:mchid      -> the primary instance's answer
--   GET  /_ctl/log -> [{ id, primary, status, again (the replay's status),
--                         copies = { {target, status} } (as answered),
--                         sent (how many copies were sent) }]
--
-- It keeps everything in memory: run it with one worker.
local paygate = require "paygate"
local core = require "paygate.core"
local http = require "paygate.http"
local json = require "paygate.json"

local targets = {}
local log = {}
local n = 0
local draw, copy_p        -- the seeded choice: one draw in [0, 1) each

local FORWARD = { "content-type", "wechatpay-timestamp", "wechatpay-nonce",
                  "wechatpay-signature", "wechatpay-serial",
                  "wechatpay-signature-type", "request-id" }

local function send(base, path, h, body)
  local res, err = http.request{ method = "POST", url = base .. path,
                                 body = body, headers = h, timeout = 8 }
  if not res then return nil, tostring(err) end
  return res
end

paygate.route("POST", "/_ctl/targets", function(req)
  local b = req:json()
  targets = b.targets or {}
  draw = nil
  if b.seed then
    -- (run from the repository's root, as the specs run)
    local r = dofile("examples/gateway/spec/seeded.lua").rng(b.seed)
    draw = function() return r.float(0, 1) end
  end
  copy_p = b.copy or 1
  return 200, { targets = targets }
end)

paygate.route("POST", "/wechatpay/notify/:mchid", function(req)
  if #targets == 0 then
    return 500, { code = "FAIL", message = "no targets yet" }
  end
  n = n + 1
  local env = json.decode(req.body or "") or {}
  local rec = { id = env.id, copies = {}, sent = 0 }
  log[#log + 1] = rec
  local first = (n % #targets) + 1
  if draw then first = math.floor(draw() * #targets) + 1 end
  -- copied now: the request is gone once the handler returned
  local h, body, path = {}, req.body, req.path
  for _, k in ipairs(FORWARD) do
    h[k] = req.headers[k]
  end
  rec.primary = targets[first]
  for i, t in ipairs(targets) do
    if i ~= first and (not draw or draw() < copy_p) then
      rec.sent = rec.sent + 1
      core.spawn(function()
        core.sleep(math.random() * 0.02)
        local ok, res, err = pcall(send, t, path, h, body)
        if not ok then res, err = nil, res end
        rec.copies[#rec.copies + 1] = { target = t,
          status = res and res.status or nil, error = err }
      end)
    end
  end
  local res, err = send(rec.primary, path, h, body)
  if not res then
    rec.error = err
    return 502, { code = "FAIL", message = "tee: " .. err }
  end
  rec.status = res.status
  if res.status == 200 or res.status == 204 then
    -- the very same signed request again to the instance that took it:
    -- its replay check refuses the signature, and it must see that the
    -- effect is committed and acknowledge it
    core.spawn(function()
      local ok, again = pcall(send, rec.primary, path, h, body)
      rec.again = ok and again and again.status or -1
    end)
  end
  return res.status, res.body or "",
         { ["Content-Type"] = res.headers and res.headers["content-type"]
                              or "application/json" }
end)

paygate.route("GET", "/_ctl/log", function()
  if #log == 0 then return 200, "[]" end
  return 200, log
end)
