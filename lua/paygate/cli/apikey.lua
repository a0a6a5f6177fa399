-- paygate apikey: creates, lists and revokes merchant-API keys
-- (paygate.apikey) in a store. `create` prints the secret once; the store
-- keeps only the key derived from it.
local common = require "paygate.cli.common"
local apikey = require "paygate.apikey"
local json = require "paygate.json"

local usage = [[
usage: paygate apikey create --db URL --app APP_ID [--json]
       paygate apikey list   --db URL [--app APP_ID] [--json]
       paygate apikey revoke --db URL --key KEY_ID

Manages the API keys merchants' systems sign requests with (see
docs/idempotency.md, "Authentication"). URL is the gateway's store
(sqlite:/path/app.db or postgres://...); a SQLite file must exist.

create  makes a key for APP_ID and prints app_id, key_id and the secret.
        The secret is shown this once: the store keeps only the signing
        key derived from it, so a lost secret means a new key.
list    prints the keys (never a secret or a signing key), each with when
        it was made, revoked and last used (the last request it signed
        that was accepted, up to a minute early; "never used" when none
        was); a database with no paygate_api_keys table is said to hold
        none (exit 1), and nothing is made in it (list and revoke).
revoke  disables KEY_ID at once in this process, and in running workers
        within their cache time (5 s): requests signed with it are then
        refused 401 revoked_key. A key revoked already (by an earlier
        revoke, or one run at the same time) is said so, with when
        (exit 1); so is a key id the store does not hold.

create and revoke each write an entry in the store's audit trail
(subject apikey:APP_ID, apikey.created or apikey.revoked, the key id,
actor cli:LOGIN: the user running the command, $SUDO_USER under sudo),
in the same transaction as the change: `paygate audit verify URL
--subject apikey:APP_ID` checks them. Never the secret.

exit: 0 done, 1 store failure or nothing to revoke, 2 usage error.
]]

local SPEC = { ["--db"] = "value", ["--app"] = "value", ["--key"] = "value",
               ["--json"] = "flag" }

local function open(o)
  if not o["--db"] then
    common.usage_error("--db URL is required")
  end
  -- the keys belong in the gateway's store: never in a new empty file
  common.sqlite_must_exist(o["--db"])
  local ok, db, err = common.open_store(o["--db"])
  if not ok then common.usage_error("%s", tostring(db)) end
  if not db then
    io.stderr:write("paygate apikey: ", tostring(err), "\n")
    return nil
  end
  return db
end

-- Who runs the command, for the audit trail: the user sudo was run by,
-- else the login name; "cli" when the environment names none.
local function actor()
  for _, name in ipairs({ "SUDO_USER", "USER", "LOGNAME" }) do
    local v = os.getenv(name)
    if v and v ~= "" and #v <= 64 and v:match("^[%w_%.%-@]+$") then
      return "cli:" .. v
    end
  end
  return "cli"
end

local function valid_id(s)
  return type(s) == "string" and #s <= 64 and s:match("^[%w_%-%.]+$")
end

local function main(args)
  local o, pos = common.parse(args, SPEC)
  local cmd = pos[1]
  if cmd ~= "create" and cmd ~= "list" and cmd ~= "revoke" then
    common.usage_error("give create, list or revoke")
  end
  if #pos > 1 then
    common.usage_error("argument %d is unexpected", pos.at[2])
  end
  -- an option of another subcommand is refused, not dropped (list --key K
  -- listed every key, revoke --json printed text)
  common.only(o, cmd, cmd == "revoke" and { ["--db"] = true, ["--key"] = true }
              or { ["--db"] = true, ["--app"] = true, ["--json"] = true })
  if cmd == "create" and o["--app"] == nil then
    common.usage_error("create needs --app APP (the app the key is for; see "
                       .. "--help)")
  end
  if cmd == "create" and not valid_id(o["--app"]) then
    common.usage_error("--app must be 1..64 of [A-Za-z0-9_.-]")
  end
  if cmd == "revoke" and not valid_id(o["--key"]) then
    common.usage_error("--key must be a key id (ak_...)")
  end
  if cmd == "list" and o["--app"] and not valid_id(o["--app"]) then
    common.usage_error("--app must be 1..64 of [A-Za-z0-9_.-]")
  end
  local db = open(o)
  if not db then return 1 end
  local code = 0
  if cmd == "create" then
    local k, err = apikey.create(db, o["--app"], { actor = actor() })
    if not k then
      io.stderr:write("paygate apikey: ", tostring(err), "\n")
      code = 1
    elseif o["--json"] then
      io.stdout:write(json.encode(k), "\n")
    else
      io.stdout:write("app_id  ", k.app_id, "\nkey_id  ", k.key_id,
                      "\nsecret  ", k.secret, "\n\nThe secret is shown"
                      .. " this once; give it to the merchant's system.\n")
    end
  elseif cmd ~= "create" and db:has_table("paygate_api_keys") == false then
    -- (read, not made: list and revoke made the table in whatever
    -- database they were pointed at, and a wrong one listed nothing, 0)
    io.stderr:write("paygate apikey: no API keys in this database (it has"
      .. " no paygate_api_keys table: not the gateway's store, or no key"
      .. " made there yet)\n")
    code = 1
  elseif cmd == "list" then
    local rows, err = apikey.list(db, o["--app"])
    if not rows then
      io.stderr:write("paygate apikey: ", tostring(err), "\n")
      code = 1
    else
      for _, r in ipairs(rows) do
        if o["--json"] then
          io.stdout:write(json.encode(r), "\n")
        else
          io.stdout:write(("%s  %s  created %s%s  %s\n"):format(r.key_id,
            r.app_id, os.date("!%Y-%m-%dT%H:%M:%SZ", r.created_at),
            r.revoked_at and os.date("!  revoked %Y-%m-%dT%H:%M:%SZ",
                                     r.revoked_at) or "",
            r.last_used_at and os.date("!last used %Y-%m-%dT%H:%M:%SZ",
                                       r.last_used_at) or "never used"))
        end
      end
    end
  else
    local ok, why, at = apikey.revoke(db, o["--key"], { actor = actor() })
    if ok == nil then
      io.stderr:write("paygate apikey: ", tostring(why), "\n")
      code = 1
    elseif not ok and why == "revoked" then
      -- (by an earlier revoke, or by one that ran at the same time)
      io.stderr:write("paygate apikey: key ", o["--key"], " was revoked"
        .. " already, at ", os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(at)),
        "\n")
      code = 1
    elseif not ok then
      io.stderr:write("paygate apikey: no key ", o["--key"], " in this"
                      .. " store\n")
      code = 1
    else
      io.stdout:write("revoked ", o["--key"], ": running workers refuse it"
                      .. " within 5 s (401 revoked_key)\n")
    end
  end
  db:close()
  return code
end

return common.run("apikey", usage, main, { ... })
