-- paygate exec scripts/outbox.lua DB_URL COMMAND [ARGS]
--
-- Inspect and replay the outbox of a paygate.outbox database:
--   list   [--state S] [--subject S] [--type T] [--limit N]
--   replay ID...                      replay these events (any state)
--   replay --dead [--subject S] [--type T]
--                                     replay the matching dead letters
--   prune  [--keep-days N]            delete delivered rows now
-- Exit: 0 done, 1 the store failed, 2 usage (an option or event ids the
-- command does not take included: nothing is changed), 3 an event id
-- given to replay is not in the store (said on stderr; the others given
-- were replayed).
local outbox = require "paygate.outbox"
local json = require "paygate.json"

local USAGE = [[
usage: paygate exec scripts/outbox.lua DB_URL COMMAND [ARGS]
  list   [--state pending|delivered|dead|any] [--subject S] [--type T]
         [--limit N]
  replay ID...
  replay --dead [--subject S] [--type T]
  prune  [--keep-days N]
]]

local args = { ... }

local function usage(msg)
  if msg then
    io.stderr:write("outbox: ", msg, "\n")
  end
  io.stderr:write(USAGE)
  return 2
end

local function options(from)
  local o, ids = {}, {}
  local i = from
  while i <= #args do
    local a = args[i]
    local flag = a:match("^%-%-([%w-]+)$")
    if flag == "dead" then
      o.dead = true
    elseif flag then
      local v = args[i + 1]
      if v == nil then
        return nil, "--" .. flag .. " needs a value"
      end
      o[flag] = v
      i = i + 1
    elseif a:match("^%d+$") then
      ids[#ids + 1] = tonumber(a)
    else
      return nil, "unexpected argument " .. a
    end
    i = i + 1
  end
  return o, ids
end

-- The options each command takes (ids: whether it takes event ids). Any
-- other is a usage error: a filter dropped without a word would widen a
-- replay (`replay --dead --subjet pay_1` replayed every dead letter).
local TAKES = {
  list = { state = true, dead = true, subject = true, type = true,
           limit = true },
  replay = { dead = true, subject = true, type = true, ids = true },
  prune = { ["keep-days"] = true },
}
local NUMERIC = { limit = true, ["keep-days"] = true }
-- (a state that is none listed nothing: "no events match", said of a store
-- full of dead letters when --state was misspelt)
local STATES = { pending = true, delivered = true, dead = true, any = true }

-- nil, or why o and ids do not fit cmd
local function misfit(cmd, o, ids)
  local takes = TAKES[cmd]
  if not takes then
    return nil                          -- said as an unknown command
  end
  for k, v in pairs(o) do
    if not takes[k] then
      return cmd .. " takes no --" .. k
    end
    if NUMERIC[k] and not tonumber(v) then
      return "--" .. k .. " must be a number"
    end
    if k == "state" and not STATES[v] then
      return "--state must be pending, delivered, dead or any"
    end
  end
  if #ids > 0 and (not takes.ids or next(o) ~= nil) then
    return cmd == "replay" and "replay takes event ids or --dead with"
      .. " filters, not both" or (cmd .. " takes no event ids")
  end
  return nil
end

local function main()
  local url, cmd = args[1], args[2]
  if url == "--help" or url == "-h" then
    io.stdout:write(USAGE)
    return 0
  end
  if not url or not cmd then
    return usage()
  end
  local o, ids = options(3)
  if not o then
    return usage(ids)
  end
  local why = misfit(cmd, o, ids)
  if why then
    return usage(why)
  end
  -- sql.open would make a missing SQLite file: a typo in the path must
  -- not list an empty store as if it were the gateway's
  local missing = require("paygate.cli.common").sqlite_missing(url)
  if missing then
    io.stderr:write("outbox: no database file ", missing, "\n")
    return 2
  end
  -- (quietly: the PostgreSQL pool's own "pool down" line would stand
  -- beside this one-line reason)
  local db, why, bad_url = require("paygate.cli.common").open_for_script(url)
  if not db then
    -- (a URL sql.open refuses is a usage error, exit 2)
    io.stderr:write("outbox: ", bad_url and "bad store URL: " or
                    "cannot open the store: ", why, "\n")
    return bad_url and 2 or 1
  end
  if cmd == "list" then
    local rows, lerr = outbox.list(db, { state = o.state
                                           or (o.dead and "dead" or nil),
                                         subject = o.subject,
                                         type = o.type,
                                         limit = tonumber(o.limit) })
    if not rows then
      io.stderr:write("outbox: ", tostring(lerr), "\n")
      return 1
    end
    for _, r in ipairs(rows) do
      io.stdout:write(json.encode(r), "\n")
    end
    if #rows == 0 then
      io.stderr:write("outbox: no events match\n")   -- stdout stays JSON lines
    end
    return 0
  elseif cmd == "replay" then
    local total = 0
    local missing = 0
    if #ids > 0 then
      for _, id in ipairs(ids) do
        local n, rerr = outbox.replay(db, id)
        if not n then
          io.stderr:write("outbox: ", tostring(rerr), "\n")
          return 1
        end
        if n == 0 then
          -- none changed: the id is not in the store, or its event is
          -- pending already (replay leaves a pending one alone)
          local rows, lerr = outbox.list(db, { id = id })
          if not rows then
            io.stderr:write("outbox: ", tostring(lerr), "\n")
            return 1
          end
          if rows[1] then
            io.stderr:write("outbox: event ", id, " is pending already:"
                            .. " left as it is\n")
          else
            io.stderr:write("outbox: no event ", id, " in the store\n")
            missing = missing + 1
          end
        end
        total = total + n
      end
    elseif o.dead then
      local n, rerr = outbox.replay(db, { state = "dead",
                                          subject = o.subject,
                                          type = o.type })
      if not n then
        io.stderr:write("outbox: ", tostring(rerr), "\n")
        return 1
      end
      total = n
    else
      return usage("replay needs event ids or --dead")
    end
    io.stdout:write("replayed ", total, "\n")
    return missing > 0 and 3 or 0
  elseif cmd == "prune" then
    local n, perr = outbox.prune(db, { keep_days = tonumber(o["keep-days"]),
                                       max_batches = 1e9 })
    if not n then
      io.stderr:write("outbox: ", tostring(perr), "\n")
      return 1
    end
    io.stdout:write("pruned ", n, "\n")
    return 0
  end
  return usage("unknown command " .. cmd)
end

return main()
