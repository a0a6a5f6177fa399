-- paygate etcd: publishes a merchant's credentials (or the HTTPS
-- listener's certificate) to etcd in one transaction, after validating
-- them, sealing the secrets under the key-encryption key
-- (paygate.credentials); shows what a prefix holds without its secrets;
-- deletes a stray key under a prefix (one that is no file of the set).
local common = require "paygate.cli.common"
local credentials = require "paygate.credentials"
local etcd = require "paygate.etcd"
local json = require "paygate.json"
local crypto = require "paygate.crypto"
local sign = require "paygate.wechatpay.sign"

local usage = [[
usage: paygate etcd publish --prefix PREFIX --dir DIR [--sign-type TYPE]
                            [--tls] [--json] [--replace-kek ID] ETCD KEK
       paygate etcd show    --prefix PREFIX [--tls] ETCD KEK
       paygate etcd delete  --prefix PREFIX [--tls] ETCD KEY

ETCD: --endpoints URL[,URL...] --user NAME --password-env VAR
      [--ca-file FILE] [--cert FILE --key FILE] [--insecure]
KEK:  --kek-file FILE | --kek-env VAR   (the key-encryption key: 32 bytes,
      raw, 64 hex digits or base64; the one the gateways are given)

publish  reads the set from DIR (which holds the set's files and no
         other), validates it (the private key matches
         the certificate, its dates, the APIv3 key's length, the public
         key and its id; with --tls, as the listener takes a pair: RSA
         or ECDSA, at OpenSSL's security level), seals the secrets and writes every file under
         PREFIX in one etcd transaction (files of an older set that the
         new one lacks are deleted in it; refused, nothing written, if
         PREFIX changed since publish read it: run again). Every gateway
         watching PREFIX swaps to it. A merchant's DIR holds apiclient_key.pem,
         apiclient_cert.pem, apiv3_key and optionally
         wechatpay_public_key.pem + public_key_id, and previous_apiv3_key
         (in an APIv3 key rotation: the old key, so that a worker started
         after the swap still opens what WeChat sealed under it; publish
         again without it a day later); with --tls, cert.pem and key.pem
         (the HTTPS listener's). --sign-type is the merchant client's
         sign_type (WECHATPAY2-SHA256-RSA2048, the default, or
         WECHATPAY2-SM2-WITH-SM3): a key of another type is refused.
         --json prints the result as one JSON line (prefix, revision,
         serial, files). A set in etcd sealed under another KEK than
         the one given is not replaced (the gateways open it with
         theirs, and would refuse the new set): publish names that
         KEK's id; --replace-kek ID replaces it all the same (a change
         of KEK, or a set sealed under a wrong one put right).
show     prints the set's revision, the certificate's serial and dates,
         and which files are sealed (never a secret).
delete   deletes KEY (the whole key, as publish names it) under PREFIX:
         a key that is no file of the set, which makes every worker
         refuse the set and publish refuse PREFIX. A file of the set
         (with --tls, of a listener's) is refused: publish replaces
         those. Needs no KEK.

Without --insecure, etcd must be https:// with a user: the files are
secrets. The password is read from the environment variable named by
--password-env, never from the command line.

exit: 0 done, 1 etcd or validation failure, 2 usage error.
]]

local SPEC = {
  ["--prefix"] = "value", ["--dir"] = "value", ["--tls"] = "flag",
  ["--endpoints"] = "value", ["--user"] = "value",
  ["--password-env"] = "value", ["--ca-file"] = "value",
  ["--cert"] = "value", ["--key"] = "value", ["--insecure"] = "flag",
  ["--kek-file"] = "value", ["--kek-env"] = "value", ["--json"] = "flag",
  ["--sign-type"] = "value", ["--replace-kek"] = "list",
}

local function fail(msg)
  io.stderr:write("paygate etcd: ", msg, "\n")
  return 1
end

local function client(o)
  if not o["--endpoints"] then
    common.usage_error("--endpoints is required")
  end
  local eps = {}
  for u in o["--endpoints"]:gmatch("[^,%s]+") do eps[#eps + 1] = u end
  local pw
  if o["--user"] then
    local var = o["--password-env"]
    if not var then
      common.usage_error("--user needs --password-env VAR")
    end
    pw = os.getenv(var)
    if not pw then
      common.usage_error("--password-env %s: the variable %s is not set in"
                         .. " this environment", var, var)
    end
  end
  local ok, cli = pcall(etcd.new, { endpoints = eps, user = o["--user"],
    password = pw, ca_file = o["--ca-file"], client_cert = o["--cert"],
    client_key = o["--key"] })
  if not ok then
    common.usage_error("%s", tostring(cli):gsub("^.-etcd%.new: ", ""))
  end
  if not cli:secure() and not o["--insecure"] then
    common.usage_error("etcd must be https:// with --user (or give "
                       .. "--insecure for a throw-away etcd)")
  end
  return cli
end

local function kek(o)
  if not o["--kek-file"] and not o["--kek-env"] then
    common.usage_error("give --kek-file FILE or --kek-env VAR (the "
                       .. "key-encryption key; see --help)")
  end
  local k, err = credentials.read_kek{ kek_file = o["--kek-file"],
                                       kek_env = o["--kek-env"] }
  if not k then
    -- the library names its config keys: here they are these options
    local msg = tostring(err.message):gsub("^credentials: ", "")
      :gsub("^kek_file", "--kek-file"):gsub("^kek_env", "--kek-env")
    common.usage_error("%s", msg)
  end
  return k
end

local function prefix(o)
  local p = o["--prefix"]
  if p == nil then
    common.usage_error("--prefix PREFIX is required")
  end
  if type(p) ~= "string" or p:sub(1, 1) ~= "/" then
    common.usage_error("--prefix must be an etcd prefix: /.../")
  end
  if p:sub(-1) ~= "/" then p = p .. "/" end
  return p
end

local function publish(o)
  local p, k = prefix(o), kek(o)
  local dir = o["--dir"]
  if not dir then
    common.usage_error("--dir DIR is required")
  end
  local kind = o["--tls"] and "tls" or "merchant"
  local spec = kind == "tls" and credentials.TLS_FILES
               or credentials.MERCHANT_FILES
  local replace = {}             -- KEK ids the set in etcd may be under
  for _, id in ipairs(o["--replace-kek"] or {}) do
    if not id:match("^" .. ("%x"):rep(16) .. "$") then
      common.usage_error("--replace-kek takes the 16 hex digits of a KEK"
                         .. " id, as publish names it")
    end
    replace[id:lower()] = true
  end
  local schema = o["--sign-type"] or sign.RSA
  if schema ~= sign.RSA and schema ~= sign.SM2 then
    common.usage_error("--sign-type must be %s or %s", sign.RSA, sign.SM2)
  elseif kind == "tls" and o["--sign-type"] then
    common.usage_error("--sign-type is for a merchant's set, not --tls")
  end
  -- the folder, and nothing in it that is no file of the set (a
  -- misnamed public_key_id.txt would be left out in silence)
  local listed, lerr = require("paygate.core").listdir(dir)
  if not listed then
    return fail("--dir " .. dir .. ": " .. tostring(lerr and lerr.message
                or lerr):gsub("^listdir .-: ", ""))
  end
  for _, name in ipairs(listed) do
    if not spec[name] then
      local want = {}
      for n in pairs(spec) do want[#want + 1] = n end
      table.sort(want)
      return fail(("--dir %s holds %s, which is no file of %s set (%s):"
        .. " rename it, or move it out"):format(dir, name, kind == "tls"
        and "a listener's" or "a merchant's", table.concat(want, ", ")))
    end
  end
  local files = {}
  for name in pairs(spec) do
    local f = io.open(dir .. "/" .. name, "rb")
    if f then
      files[name] = f:read("*a")
      f:close()
    end
  end
  if files.public_key_id then
    files.public_key_id = files.public_key_id:gsub("%s+$", "")
  end
  for _, name in ipairs({ "apiv3_key", "previous_apiv3_key" }) do
    if kind == "merchant" and files[name] then
      local cause, fix = common.apiv3_key_problem(files[name])
      if cause then return fail(name .. ": " .. cause .. "; " .. fix) end
    end
  end
  local set, err = credentials.validate(files, kind)
  if not set then return fail(tostring(err.message)) end
  if kind == "merchant" then
    -- the client's sign_type takes keys of one type (the workers' client
    -- would refuse the set): said before anything is written
    local want = schema == sign.SM2 and "SM2" or "RSA"
    local keys = {
      { "apiclient_key.pem", crypto.private_key(set.merchant_private_key) },
      { "wechatpay_public_key.pem",
        set.public_key and crypto.public_key(set.public_key) } }
    for _, e in ipairs(keys) do
      if e[2] and e[2]:type() ~= want then
        return fail(("%s is an %s key; sign_type %s needs an %s key%s")
          :format(e[1], e[2]:type(), schema, want, o["--sign-type"] and ""
          or " (an SM merchant's set: --sign-type " .. sign.SM2 .. ")"))
      end
    end
  end
  local cli = client(o)
  -- a key under the prefix that is no file of the set (a copy left
  -- beside a file, another set's prefix nested in this one) makes every
  -- worker refuse the set ("unexpected file"): said here, nothing written
  local cur, rerr = cli:get_prefix(p)
  if not cur then return fail("read " .. p .. ": " .. tostring(rerr)) end
  for _, kv in ipairs(cur.kvs) do
    local name = kv.key:sub(#p + 1)
    if not spec[name] then
      return fail(("%s holds %s, which is no file of %s set: every worker"
        .. " would refuse the set; delete it (paygate etcd delete --prefix"
        .. " %s%s KEY, with the same etcd options) or publish under another"
        .. " prefix, and publish again"):format(p, common.visible(kv.key),
        kind == "tls"
        and "a listener's" or "a merchant's", p, kind == "tls"
        and " --tls" or ""))
    end
  end
  -- The gateways open the set with the KEK they were given, which
  -- publish cannot see; the set in etcd names it (each envelope carries
  -- its KEK's id). Sealed here under another one, the new set would be
  -- refused by every worker ("sealed under another key-encryption key")
  -- and fail the start of a gateway without a cached set, while publish
  -- said "published". A change of KEK, or a set sealed under a wrong one
  -- put right, names the id it replaces. (A secret that does not open
  -- for another reason, not sealed or altered, is what publish repairs.)
  local mine, theirs, seen, rev = credentials.kek_id(k), {}, {}, "0"
  for _, kv in ipairs(cur.kvs) do
    if etcd.rev_cmp(kv.mod_revision, rev) > 0 then rev = kv.mod_revision end
    if spec[kv.key:sub(#p + 1)].secret then
      local _, oerr = credentials.open(k, kv.key, kv.value)
      -- (kek_id: only an id of a KEK's form; another is a broken secret)
      local id = oerr and oerr.kek_id
      if id and not replace[id] and not seen[id] then
        seen[id] = true
        theirs[#theirs + 1] = id
      end
    end
  end
  if #theirs > 0 then
    table.sort(theirs)
    local ids = table.concat(theirs, ", ")
    return fail(("publish %s: %s (revision %s) is sealed under the"
      .. " key-encryption key id %s, and %s's is id %s: every gateway that"
      .. " opens it would refuse this set; nothing written. Give the"
      .. " gateways' KEK; when changing it (the gateways given the new one"
      .. " and the old in previous_kek_files), or putting right a set"
      .. " sealed under a wrong one, add --replace-kek %s"):format(p, p, rev,
      ids, o["--kek-file"] and "--kek-file" or "--kek-env", mine,
      table.concat(theirs, " --replace-kek ")))
  end
  local ops = {}
  local names = {}
  for name in pairs(files) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    local v = files[name]
    if spec[name].secret then v = credentials.seal(k, p .. name, v) end
    ops[#ops + 1] = { put = p .. name, value = v }
  end
  for name in pairs(spec) do
    if not files[name] then ops[#ops + 1] = { delete = p .. name } end
  end
  -- written only if nothing under the prefix changed since the read
  -- above (another operator's publish, a stray key): else two publishes
  -- at once interleave, the later one replacing the other unannounced
  local res
  res, err = cli:txn{ compare = { { key = p, prefix = true,
    max_mod_revision = cur.revision } }, success = ops }
  if not res then return fail("publish " .. p .. ": " .. tostring(err)) end
  if not res.succeeded then
    return fail(("publish %s: %s changed meanwhile (another publish?): "
      .. "nothing written; run again"):format(p, p))
  end
  if o["--json"] then
    io.stdout:write(json.encode({ prefix = p, revision = res.revision,
      serial = set.serial, files = names }), "\n")
  else
    io.stdout:write(("published %s at revision %s: serial %s, valid until "
      .. "%s (%s)\n"):format(p, res.revision, set.serial,
      os.date("!%Y-%m-%dT%H:%M:%SZ", set.not_after),
      table.concat(names, ", ")))
  end
  return 0
end

local function show(o)
  local p, k = prefix(o), kek(o)
  local kind = o["--tls"] and "tls" or "merchant"
  local spec = kind == "tls" and credentials.TLS_FILES
               or credentials.MERCHANT_FILES
  local cli = client(o)
  local res, err = cli:get_prefix(p)
  if not res then return fail("read " .. p .. ": " .. tostring(err)) end
  if #res.kvs == 0 then return fail("nothing under " .. p) end
  local files, rev, lines = {}, "0", {}
  local sealed_err             -- the first secret that does not open
  for _, kv in ipairs(res.kvs) do
    local name = kv.key:sub(#p + 1)
    if etcd.rev_cmp(kv.mod_revision, rev) > 0 then rev = kv.mod_revision end
    local d = spec[name]
    local v = kv.value
    if d and d.secret then
      local pt, oerr = credentials.open(k, kv.key, v)
      lines[#lines + 1] = name .. ": " .. (pt and "sealed, opens"
                                           or tostring(oerr.message))
      sealed_err = sealed_err or not pt and oerr
      v = pt
    else
      lines[#lines + 1] = name .. ": " .. #v .. " bytes"
    end
    files[name] = v
  end
  -- a secret that does not open is the reason, as a worker gives it (not
  -- "apiclient_key.pem is missing": it is there, sealed)
  local set, verr
  if sealed_err then
    verr = sealed_err
  else
    set, verr = credentials.validate(files, kind)
  end
  io.stdout:write(p, " revision ", rev, "\n")
  for _, l in ipairs(lines) do io.stdout:write("  ", l, "\n") end
  if not set then
    io.stdout:write("invalid: ", tostring(verr.message), "\n")
    return 1
  end
  io.stdout:write(("valid: serial %s, until %s\n"):format(set.serial,
    os.date("!%Y-%m-%dT%H:%M:%SZ", set.not_after)))
  return 0
end

-- Deletes one key under the prefix that is no file of the set: the
-- stray key publish names ("delete it") and every worker refuses the set
-- for. Not a file of the set (a set without its key is refused by every
-- worker too: publish replaces those, deleting what the new set lacks),
-- not the prefix itself nor a key outside it (a typo must not delete
-- another merchant's set's file).
local function delete(o, key)
  local p = prefix(o)
  local kind = o["--tls"] and "tls" or "merchant"
  local spec = kind == "tls" and credentials.TLS_FILES
               or credentials.MERCHANT_FILES
  local shown = common.visible(key)
  local name = key:sub(#p + 1)
  if key:sub(1, #p) ~= p or name == "" then
    common.usage_error("%s is not a key under --prefix %s", shown,
                       common.visible(p))
  end
  if spec[name] then
    common.usage_error("%s is a file of %s set: publish the set to change"
      .. " it (a file the new set lacks is deleted then)", shown,
      kind == "tls" and "a listener's" or "a merchant's")
  end
  -- a key deeper under the prefix whose last part is a file of a set (of
  -- either kind) is that file of the set at its folder: a --prefix wider
  -- than the set's (/paygate/ for /paygate/merchants/1900000001/) must
  -- not let a slip take another set's file
  local leaf = name:match("([^/]*)$")
  if leaf ~= name and (credentials.MERCHANT_FILES[leaf]
                       or credentials.TLS_FILES[leaf]) then
    common.usage_error("%s is a file of the set at %s (inside --prefix %s):"
      .. " give that set's prefix, and publish the set to change it",
      shown, common.visible(key:sub(1, #key - #leaf)), common.visible(p))
  end
  local cli = client(o)
  local res, err = cli:delete(key)
  if not res then return fail("delete " .. shown .. ": " .. tostring(err)) end
  if res.deleted == 0 then
    return fail(("delete %s: no such key (nothing deleted)"):format(shown))
  end
  io.stdout:write(("deleted %s at revision %s\n"):format(shown,
                                                        res.revision))
  return 0
end

local function main(args)
  local o, pos = common.parse(args, SPEC)
  local cmd = pos[1]
  -- delete's one argument is the key
  local nargs = cmd == "delete" and 2 or 1
  if cmd == "delete" and not pos[2] then
    common.usage_error("delete takes the KEY to delete")
  end
  if #pos > nargs then
    common.usage_error("argument %d is unexpected",
                       pos.at[nargs + 1])
  end
  -- an option of the other subcommand is refused, not dropped (show
  -- --json printed text where a script read JSON)
  local takes = { ["--prefix"] = true, ["--tls"] = true,
    ["--endpoints"] = true, ["--user"] = true, ["--password-env"] = true,
    ["--ca-file"] = true, ["--cert"] = true, ["--key"] = true,
    ["--insecure"] = true, ["--kek-file"] = true, ["--kek-env"] = true }
  if cmd == "publish" then
    takes["--dir"], takes["--sign-type"], takes["--json"] = true, true, true
    takes["--replace-kek"] = true
    common.only(o, cmd, takes)
    return publish(o)
  end
  if cmd == "show" then
    common.only(o, cmd, takes)
    return show(o)
  end
  if cmd == "delete" then
    takes["--kek-file"], takes["--kek-env"] = nil, nil
    common.only(o, cmd, takes)
    return delete(o, pos[2])
  end
  common.usage_error("give publish, show or delete")
end

return common.run("etcd", usage, main, { ... })
