-- bench/console_paging.lua: the console's payment list at 100,000 payments
-- in SQLite: the first page, pages deep in the list (keyset on
-- (created_at, id), not OFFSET), a state filter, and the three searches.
-- Run: paygate exec bench/console_paging.lua [payments]
local sql = require "paygate.sql"
local core = require "paygate.core"
local migrate = require "paygate.migrate"
local servers = require "spec.support.servers"

package.path = "examples/gateway/?.lua;" .. package.path
local pages = require "gw.console.pages"

local N = tonumber(arg and arg[1] or "100000")
local dir = servers.mktemp()
local db = assert(sql.open("sqlite:" .. dir .. "/bench.db"))
assert(migrate.run(db, "examples/gateway/migrations"))
pages.init({ db = db, gateway = {}, merchants = {}, wx = {} })

local STATES = { "paying", "paid", "closed", "unknown", "refunded" }
local t0 = core.mono()
local base = core.time() - N
local BATCH = 5000
for from = 1, N, BATCH do
  assert(db:transaction(function(tx)
    for i = from, math.min(N, from + BATCH - 1) do
      local id = ("pay_%020d"):format(i)
      local no = id .. "_1"
      local at = base + i + (i % 7) / 1000
      assert(tx:exec("INSERT INTO gw_payments (id, app_id, order_id, mchid,"
        .. " appid, channel, amount, currency, description, state, version,"
        .. " out_trade_no, attempt, transaction_id, expires_at, created_at,"
        .. " updated_at) VALUES ($1, 'a', $1, '1', 'wx', 'native', 100,"
        .. " 'CNY', 'bench', $2, 1, $3, 1, $4, 0, $5, $5)",
        { id, STATES[i % #STATES + 1], no, "42" .. ("%026d"):format(i),
          at }))
      -- (the attempt carries the payment's transaction_id, as the
      -- gateway writes it: the console's search finds it there)
      assert(tx:exec("INSERT INTO gw_attempts (out_trade_no, payment_id,"
        .. " n, channel, state, transaction_id, created_at) VALUES ($1, $2,"
        .. " 1, 'native', 'open', $4, $3)",
        { no, id, at, "42" .. ("%026d"):format(i) }))
    end
    return true
  end))
end
print(("inserted %d payments in %.1f s"):format(N, core.mono() - t0))

local view = { csrf = "x" }
local function timed(name, q, runs)
  runs = runs or 20
  local worst, total, body = 0, 0, nil
  for _ = 1, runs do
    local t = core.mono()
    body = assert(pages.payments(q, view))
    local dt = core.mono() - t
    total, worst = total + dt, math.max(worst, dt)
  end
  print(("%-28s mean %6.2f ms  worst %6.2f ms"):format(name,
    total / runs * 1000, worst * 1000))
  return tostring(body)
end

local body = timed("first page", {})
local after = body:match('href="/console/payments%?after=([^"&]+)')
-- walk 200 pages in (10,000 rows): each page costs the same
local t, walked, last = core.mono(), 0, after
while after and walked < 200 do
  last = after
  body = tostring(assert(pages.payments({ after = after:gsub("%%7E", "~") },
                                        view)))
  after = body:match('href="/console/payments%?after=([^"&]+)')
  walked = walked + 1
end
print(("%-28s mean %6.2f ms"):format(walked .. " pages walked (each)",
  (core.mono() - t) / walked * 1000))
timed("a page " .. walked * 50 .. " rows in",
      { after = last:gsub("%%7E", "~") })
local deep = ("%.17g"):format(base + 1000) .. "~" .. ("pay_%020d"):format(1000)
timed("a page near the end", { after = deep })
timed("state = unknown", { state = "unknown" })
timed("search out_trade_no", { q = ("pay_%020d_1"):format(math.floor(N / 2)) })
timed("search transaction_id", { q = "42" .. ("%026d"):format(math.floor(N / 3)) })
timed("search payment id", { q = ("pay_%020d"):format(math.floor(N / 4)) })
db:close()
os.execute("rm -rf '" .. dir .. "'")
