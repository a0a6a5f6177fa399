-- paygate.cli.common: what the diagnostic commands (paygate sign, verify,
-- decrypt, certs, doctor) share: argument parsing, reading input files,
-- printing results as text or JSON lines, and the exit status.
--
-- A result is { status = "ok" | "warn" | "fail", kind, cause, detail, fix }
-- (kind: what was checked or found; cause: one line; detail: more, may be
-- nil; fix: what to do, may be nil). Exit status: 0 when no result
-- failed, 1 when one did, 2 for a usage error or unreadable input (one
-- line on stderr).
local json = require "paygate.json"      -- the runtime's encoder: "/" as is

local type, tostring, ipairs = type, tostring, ipairs

local _M = {}

local USAGE = {}        -- marks a usage error raised through error()

--- syntax: common.usage_error(fmt, ...) -- raises; run() exits 2 with it
-- The command line is wrong: an option or argument missing, malformed,
-- at odds with another, or naming a file that is not what it takes. The
-- line ends with where to read more, " (see --help)", unless it says so
-- itself: in its own parenthesis ("(the app the key is for; see
-- --help)"), or naming a page of docs/. Every command's usage errors end
-- alike, said here once.
function _M.usage_error(fmt, ...)
  local msg = fmt:format(...)
  if not msg:find("; see --help)", 1, true)
     and not msg:find("[ (]docs/[%w_]+%.md") then
    msg = msg .. " (see --help)"
  end
  error(setmetatable({ msg = msg }, USAGE), 0)
end
local usage_error = _M.usage_error

--- syntax: common.input_error(fmt, ...) -- raises; run() exits 2 with it
-- What the command line names cannot be used as things stand, through
-- no fault of the line's form: a file that cannot be read or written, is
-- missing or a folder, or is there already (without --force); a store
-- that does not open or read, or is in use; a config file that does not
-- load; a key file that holds something else, named with the fix. The
-- message says why and what to do; --help would not say more.
function _M.input_error(fmt, ...)
  error(setmetatable({ msg = fmt:format(...) }, USAGE), 0)
end
local input_error = _M.input_error

--- syntax: path = common.sqlite_missing(url)
-- returns: the file a sqlite: URL names when it does not exist (sql.open
-- would make it), else nil (it exists, or another engine's URL).
function _M.sqlite_missing(url)
  if not (type(url) == "string" and url:match("^sqlite3?:")) then
    return nil
  end
  local path = require("paygate.sql").sqlite_path(url) or ""
  local f = io.open(path, "rb")
  if f then
    f:close()
    return nil
  end
  return path
end

--- syntax: common.sqlite_must_exist(url)
-- A tool that reads or edits an existing store (a typo in the path would
-- make an empty one and act on it) raises a usage error for a missing
-- SQLite file instead. URLs of other engines pass.
function _M.sqlite_must_exist(url)
  local path = _M.sqlite_missing(url)
  if path == "" then
    usage_error("the sqlite: URL names no file (sqlite:PATH)")
  elseif path then
    input_error("no database file %s (check the path: the store is made "
                .. "by the app that owns it, e.g. the gateway at its first "
                .. "start)", path)
  end
end

--- syntax: ok, db, err = common.open_store(url)
-- pcall(sql.open, url), for a command that says in its own line why a
-- store failed: the runtime's log is set to errors only for the rest of
-- the command, since the store's client logs its own warning of the same
-- failure (the PostgreSQL pool's JSON "pool down" line on stderr, at the
-- open and at any statement after it) and README promises a one-line
-- reason. The command ends with the store, so the level is left so.
function _M.open_store(url)
  require("paygate.core").log_level(3)
  return pcall(require("paygate.sql").open, url)
end

--- syntax: db, why, usage = common.open_for_script(url)
-- open_store for an exec script (one that prints its own one-line
-- reason and picks its own exit codes): db, or nil, why (one line, the
-- URL's password never in it) and usage = true when sql.open refused the
-- URL itself (a bad option, an unknown scheme: the caller's usage error,
-- its code position left out) rather than the store failing to open.
function _M.open_for_script(url)
  local ok, db, err = _M.open_store(url)
  if not ok then
    -- (a raise names where it was raised: "scripts/x.lua:12: sql.open:
    -- ..."; the operator wants the why)
    return nil, _M.one_line(tostring(db):gsub("^[^:\n]+:%d+: ", "")), true
  end
  if not db then return nil, _M.one_line(err), false end
  return db
end

--- syntax: text = common.one_line(v)
-- tostring(v) with its line breaks (and the blanks around them) folded
-- to one space: a driver's error in a one-line reason.
function _M.one_line(v)
  return (tostring(v):gsub("%s*\n%s*", " "))
end

--- syntax: db = common.open_existing(url, name)
-- The store a tool reads or edits: a missing SQLite file is a usage error
-- (never made empty), as is a URL sql.open refuses ("bad NAME URL: why")
-- or a store that does not open ("cannot open URL: why"); the URL's
-- password never shown. name: how the usage calls it (DB_URL, ...).
function _M.open_existing(url, name)
  _M.sqlite_must_exist(url)
  local redact = require("paygate.redact").url
  local ok, db, err = _M.open_store(url)
  if not ok then
    usage_error("bad %s %s: %s", name, redact(url), _M.one_line(db))
  end
  if not db then
    input_error("cannot open %s: %s", redact(url), _M.one_line(err))
  end
  return db
end

--- syntax: opts, positional = common.parse(args, spec)
-- spec maps an option name ("--json", "-H") to "flag" (boolean), "value"
-- (string, the last one given wins) or "list" (every value, in order).
-- "--name=value" works as "--name value".
function _M.parse(args, spec)
  local opts, pos = {}, { at = {} }
  local i = 1
  while i <= #args do
    local a = args[i]
    local name, inline = a:match("^(%-%-[%w-]+)=(.*)$")
    name = name or a
    local kind = spec[name]
    if a:sub(1, 1) == "-" and a ~= "-" and not kind then
      -- its name only: "--apiv3-key=<the key>" or a pasted PEM must not
      -- come back in the message
      if name:match("^%-%-?[%w][%w-]*$") and #name <= 40 then
        usage_error("unknown option %s", name)
      end
      usage_error("argument %d is not an option this command knows", i)
    elseif not kind then
      pos[#pos + 1] = a
      pos.at[#pos] = i
    elseif kind == "flag" then
      if inline then usage_error("%s takes no value", name) end
      opts[name] = true
    else
      local v = inline
      if not v then
        i = i + 1
        v = args[i]
        if v == nil then usage_error("%s needs a value", name) end
      end
      if kind == "list" then
        opts[name] = opts[name] or {}
        local l = opts[name]
        l[#l + 1] = v
      else
        opts[name] = v
      end
    end
    i = i + 1
  end
  return opts, pos
end

--- syntax: common.only(opts, cmd, allowed)
-- For a command with subcommands sharing one spec: raises a usage error
-- naming an option given that subcommand cmd does not take (allowed: a
-- set of option names), rather than doing without it in silence.
function _M.only(opts, cmd, allowed)
  local names = {}
  for name in pairs(opts) do
    if not allowed[name] then names[#names + 1] = name end
  end
  if names[1] then
    table.sort(names)
    usage_error("%s takes no %s", cmd, names[1])
  end
end

--- syntax: opts = common.parse_options(args, spec)
-- As common.parse, for a command that takes options only: an argument
-- that is not an option is a usage error (a mistyped option's value, a
-- path meant for --config), not silently dropped.
function _M.parse_options(args, spec)
  local opts, pos = _M.parse(args, spec)
  if pos[1] ~= nil then
    -- not echoed: a stray argument may be a key pasted in the wrong place
    usage_error("argument %d is not an option, nor an option's value "
                .. "(this command takes options only; see --help)", pos.at[1])
  end
  return opts
end

-- io.open's message names the path; the reason alone (errno text)
local function reason(path, err)
  err = tostring(err)
  if err:sub(1, #path + 2) == path .. ": " then return err:sub(#path + 3) end
  if err:find(path, 1, true) then return "cannot open" end
  return err
end

--- syntax: s = common.read(path, what) -- raises a usage error when unreadable
function _M.read(path, what)
  local f, err = io.open(path, "rb")
  if not f then
    input_error("cannot read %s %s: %s", what, _M.shown(path),
                reason(path, err))
  end
  local s, rerr = f:read("*a")
  f:close()
  if s == nil then        -- a folder opens, and then reads nothing
    input_error("cannot read %s %s: %s", what, _M.shown(path),
                reason(path, rerr or "cannot read"))
  end
  return s
end

--- syntax: s = common.read_secret(path, option)
-- Reads the file a secret option (--key, --apiv3-key-file) names. The
-- option's value is never printed: a merchant may have passed the secret
-- itself in place of a path. Raises a usage error naming only the option
-- and the reason.
function _M.read_secret(path, option)
  local f, err = io.open(path, "rb")
  local s
  if f then
    s, err = f:read("*a")
    f:close()
  end
  if s == nil then
    input_error("%s is not a readable file (value not shown): %s", option,
                reason(path, err or "cannot read"))
  end
  return s
end

--- syntax: form = common.encrypted_key_form(pem)
-- How pem's private key is encrypted, or nil when it is not: "PKCS#8"
-- (-----BEGIN ENCRYPTED PRIVATE KEY-----) or "traditional" (an OpenSSL
-- RSA/EC PRIVATE KEY block with Proc-Type: 4,ENCRYPTED and DEK-Info).
-- paygate loads private keys without a passphrase only, so either form
-- is refused, and the commands say so rather than that no key was found.
function _M.encrypted_key_form(pem)
  if pem:find("-----BEGIN ENCRYPTED PRIVATE KEY-----", 1, true) then
    return "PKCS#8"
  end
  if pem:find("PRIVATE KEY-----", 1, true)
     and pem:find("Proc-Type: 4,ENCRYPTED", 1, true) then
    return "traditional"
  end
  return nil
end

--- syntax: key, pem = common.private_key_file(path, option)
-- Reads and loads the private key a --key option names; raises a usage
-- error naming the option, the file (as common.shown shows it) and what
-- the file holds instead (a certificate, a public key...). Never its
-- content.
function _M.private_key_file(path, option)
  local pem = _M.read_secret(path, option)
  local crypto = require "paygate.crypto"
  local ok, key, kerr = pcall(crypto.private_key, pem)
  if ok and key then return key, pem end
  -- what the file holds instead, by its first PEM block's label
  local label = pem:match("%-%-%-%-%-BEGIN ([%u%d ]+)%-%-%-%-%-")
  local why
  if label == "CERTIFICATE" then
    why = "it holds a CERTIFICATE, not a private key (apiclient_cert.pem? "
          .. "the key is apiclient_key.pem)"
  elseif label == "PUBLIC KEY" or label == "RSA PUBLIC KEY" then
    why = "it holds a PUBLIC key, not a private key (the key is "
          .. "apiclient_key.pem)"
  elseif _M.encrypted_key_form(pem) then
    -- PKCS#8 (ENCRYPTED PRIVATE KEY) or the older OpenSSL form (RSA
    -- PRIVATE KEY with Proc-Type and DEK-Info lines)
    why = "it holds an ENCRYPTED private key: decrypt it first (openssl "
          .. "pkey -in KEY -out PLAIN_KEY)"
  elseif not pem:find("-----BEGIN", 1, true) then
    why = "it holds no PEM block (a private key file is a PEM block"
          .. " whose label names a private key)"
  else
    why = "it does not load as a private key ("
          .. tostring(ok and kerr and kerr.kind or "malformed") .. ")"
  end
  input_error("%s %s: %s", option, _M.shown(path), why)
end

--- syntax: key = common.read_apiv3_key_file(path, option)
-- The APIv3 key from a file, as the gateway reads apiv3_key_file: the
-- whitespace around it (a file's trailing newline) is not part of it.
function _M.read_apiv3_key_file(path, option)
  local s = _M.read_secret(path, option)
  return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end

--- syntax: s = common.shown(path) -- path as printed in a message, or a
-- note in its place when it looks like key material rather than a path
-- (PEM text, several lines, very long, or 32 key characters in a row and
-- no "." as an APIv3 key or a key body has).
function _M.shown(path)
  path = tostring(path)
  if path:find("-----BEGIN", 1, true) or path:find("[\r\n]") or #path > 200
     or path:find("PRIVATE KEY", 1, true)
     or (not path:find(".", 1, true) and path:find(("[%w+=]"):rep(32))) then
    return "(value not shown: it is not a path)"
  end
  return path
end

--- syntax: names = common.files(path) -- a file, or a directory's files
-- (sorted, not recursive: a folder inside is passed over, as a file that
-- holds no key is, and so is one that cannot be opened); nil, why when
-- neither. Of a folder's entries only regular files (or links to them)
-- are taken: a FIFO, socket or device in it is passed over too (reading
-- a FIFO would wait for a writer); path itself may be one (a pipe given
-- as <(command) is read). An entry that cannot be looked at (a dangling
-- link) is kept, so that reading it says why.
function _M.files(path)
  local core = require "paygate.core"
  local kind, kerr = core.file_type(path)
  if kind == "directory" then
    local names, lerr = core.listdir(path)
    if not names then     -- "listdir PATH: Permission denied": the reason
      return nil, tostring(lerr.message or lerr):match(": ([^:]+)$")
                  or "cannot open"
    end
    local out = {}
    path = path:match("^(.-)/*$")             -- "keys/": no "keys//x.pem"
    if path == "" then path = "/" end
    for _, n in ipairs(names) do
      local full = (path == "/" and "" or path) .. "/" .. n
      local t = core.file_type(full)
      if n:sub(1, 1) ~= "." and (t == "file" or t == nil) then
        out[#out + 1] = full
      end
    end
    return out
  end
  local f, err = io.open(path, "rb")
  if not f then return nil, reason(path, err or kerr) end
  f:close()
  return { path }
end

--- syntax: s = common.visible(text) -- "\n" shown as the two characters
-- \n followed by a line break, other control bytes as \xHH, a BOM named
function _M.visible(text)
  text = text:gsub("\239\187\191", "<BOM>")
  text = text:gsub("[%z\1-\9\11-\31\127]", function(c)
    if c == "\r" then return "\\r" end
    if c == "\t" then return "\\t" end
    return ("\\x%02X"):format(c:byte())
  end)
  return (text:gsub("\n", "\\n\n"))
end

-- The output of one command run.
local Out = {}
Out.__index = Out

--- syntax: out = common.output(json_mode)
function _M.output(json_mode)
  return setmetatable({ json = json_mode, results = {}, worst = 0 }, Out)
end

-- a result's value as JSON; what JSON has no form for (an infinite
-- number, a function) as its text: a result is printed, never raised
local function encode(v)
  local ok, s = pcall(json.encode, v)
  if ok then return s end
  return json.encode(tostring(v))
end

local RANK = { ok = 0, warn = 0, fail = 1 }
local MARK = { ok = "ok  ", warn = "warn", fail = "FAIL" }

--- syntax: out:result{ status, kind, cause, detail, fix, ... }
-- Prints it at once (a long check shows progress).
function Out:result(r)
  assert(RANK[r.status], "bad status")
  -- the cause is one line, whatever a driver's message holds
  r.cause = tostring(r.cause):gsub("[\r\n\t]+", " ")
  if self.secrets then
    for k, v in pairs(r) do
      if type(v) == "string" then r[k] = self:scrub(v) end
    end
  end
  self.results[#self.results + 1] = r
  if RANK[r.status] > self.worst then self.worst = RANK[r.status] end
  if self.json then
    -- status, kind, cause, detail, fix first, then the rest sorted
    local parts, seen = {}, {}
    local function add(k)
      if r[k] ~= nil and not seen[k] then
        seen[k] = true
        parts[#parts + 1] = json.encode(k) .. ":" .. encode(r[k])
      end
    end
    for _, k in ipairs({ "status", "kind", "cause", "detail", "fix" }) do
      add(k)
    end
    local rest = {}
    for k in pairs(r) do
      if not seen[k] and type(k) == "string" then rest[#rest + 1] = k end
    end
    table.sort(rest)
    for _, k in ipairs(rest) do add(k) end
    io.stdout:write("{", table.concat(parts, ","), "}\n")
  else
    local kind = r.what and r.kind .. " (" .. tostring(r.what) .. ")"
                 or r.kind
    local lines = { MARK[r.status] .. "  " .. kind .. ": " .. r.cause }
    if r.detail and r.detail ~= "" then
      lines[#lines + 1] = "      " .. tostring(r.detail):gsub("\n", "\n      ")
    end
    if r.fix and r.fix ~= "" then
      lines[#lines + 1] = "      fix: " .. r.fix
    end
    io.stdout:write(table.concat(lines, "\n"), "\n")
  end
  io.stdout:flush()
  return r
end

--- syntax: out:secret(value) -- never print value (nor its lines, for
-- PEM text): every result's strings are scrubbed of it
function Out:secret(v)
  if type(v) ~= "string" or #v < 6 then return end
  self.secrets = self.secrets or {}
  local l = self.secrets
  l[#l + 1] = v
  for line in v:gmatch("[^\r\n]+") do
    if #line >= 16 and not line:find("-----", 1, true) then
      l[#l + 1] = line
    end
  end
  table.sort(l, function(a, b) return #a > #b end)
end

--- syntax: s = out:scrub(s) -- s with every secret replaced
function Out:scrub(s)
  for _, v in ipairs(self.secrets or {}) do
    local i = s:find(v, 1, true)
    while i do
      s = s:sub(1, i - 1) .. "(value not shown)" .. s:sub(i + #v)
      i = s:find(v, i + 1, true)
    end
  end
  return s
end

function Out:ok(kind, cause, detail, fix)
  return self:result{ status = "ok", kind = kind, cause = cause,
                      detail = detail, fix = fix }
end

function Out:warn(kind, cause, detail, fix)
  return self:result{ status = "warn", kind = kind, cause = cause,
                      detail = detail, fix = fix }
end

function Out:fail(kind, cause, detail, fix)
  return self:result{ status = "fail", kind = kind, cause = cause,
                      detail = detail, fix = fix }
end

--- syntax: out:text(s) -- free text, printed only in text mode
function Out:text(s)
  if not self.json then io.stdout:write(s) io.stdout:flush() end
end

function Out:code() return self.worst end

--- syntax: code = common.run(name, usage, main, args)
-- Runs main(args) (which returns an exit code); prints usage for --help
-- and a one-line reason (exit 2) for a usage error.
function _M.run(name, usage, main, args)
  for _, a in ipairs(args) do
    if a == "--help" or a == "-h" then
      io.stdout:write(usage)
      return 0
    end
  end
  local ok, code = pcall(main, args)
  if ok then return code end
  if getmetatable(code) == USAGE then
    io.stderr:write("paygate ", name, ": ", code.msg, "\n")
    return 2
  end
  io.stderr:write("paygate ", name, ": internal error: ", tostring(code), "\n")
  return 1
end

--- syntax: cause, fix = common.apiv3_key_problem(key)
-- nil when key is 32 bytes; else what is wrong with it (a trailing
-- newline, a hex or base64 encoding of 32 bytes, the wrong length) and
-- the fix. Never repeats the key.
function _M.apiv3_key_problem(key)
  local crypto = require "paygate.crypto"
  if key ~= nil and type(key) ~= "string" then
    -- (a number: written without quotes in the config; never repeated)
    return "the APIv3 key is a " .. type(key) .. ", not a string",
           "write it as a string: the 32 characters in quotes, or a file"
           .. " holding them"
  end
  if type(key) ~= "string" then
    return "the APIv3 key is missing", "set it (the 32 characters set in "
           .. "the merchant platform, API security)"
  end
  if key:find("-----BEGIN", 1, true) then
    return "the APIv3 key is a PEM file (" .. #key .. " bytes: a "
           .. "certificate or a key), not the APIv3 key",
           "give a file holding only the 32 characters of the APIv3 key "
           .. "(merchant platform, API security)"
  end
  if #key == 32 and not key:find("^%s") and not key:find("%s$") then
    return nil
  end
  local lead = key:match("^%s+")
  if lead and #key:gsub("^%s+", ""):gsub("%s+$", "") == 32 then
    return "the APIv3 key is 32 characters with " .. #lead .. " leading "
           .. "space" .. (#lead > 1 and "s" or "") .. " (or tabs)",
           "strip the whitespace around the key"
  end
  if #key == 32 then return nil end
  local t = key:gsub("[\r\n%s]+$", "")
  local encoded = "the APIv3 key is used as its 32 ASCII characters, never "
    .. "decoded: give the characters set in the merchant platform"
  if #t == 32 then
    local tail = key:sub(33)
    return "the APIv3 key is 32 characters and "
           .. (tail:find("\n") and "a trailing newline" or "trailing spaces"),
           "strip it: printf %s KEY > FILE (a file read whole keeps its "
           .. "newline)"
  elseif #t == 64 and t:match("^%x+$") then
    return "the APIv3 key is 64 hex digits: a hex encoding of 32 bytes",
           encoded
  elseif #t == 44 and #(crypto.base64_decode(t) or "") == 32 then
    return "the APIv3 key is base64 of 32 bytes (44 characters)", encoded
  end
  -- copied with its quotes, or the line of an env file (KEY=..., export
  -- KEY="..."): the name is not shown either (the file is a secret's)
  local function unquoted(v)
    return v:match('^"(.*)"$') or v:match("^'(.*)'$")
  end
  local value = t:gsub("^%s+", ""):match("^[%a_][%w_ ]*=%s*(.*)$")
  if value and #(unquoted(value) or value) == 32 then
    return "the APIv3 key is a NAME=VALUE line (an environment file's), "
           .. "not the key alone",
           "give a file holding only the 32 characters (or the variable: "
           .. "apiv3_key_env in the gateway)"
  elseif #(unquoted(t:gsub("^%s+", "")) or "") == 32 then
    return "the APIv3 key is 32 characters in quotes",
           "drop the quotes: the key is the 32 characters between them"
  end
  return "the APIv3 key is " .. #key .. " bytes; it is exactly 32",
         "copy the APIv3 key (not the APIv2 key, not a certificate serial) "
         .. "from the merchant platform, API security; reset it if lost"
end

--- syntax: n = common.number(opts, name) -- a numeric option or nil
-- decimal notation only (1700000000, 1.5, 2e3): Lua's tonumber also
-- takes hex (0x10), spaces around and nan/inf
local function decimal(s)
  local m = s:match("^([+-]?[%d.]+)[eE][+-]?%d+$") or s
  return m:match("^[+-]?%d+%.?%d*$") or m:match("^[+-]?%.%d+$")
end

function _M.number(opts, name)
  local v = opts[name]
  if v == nil then return nil end
  local n = type(v) == "string" and decimal(v) and tonumber(v)
            or type(v) == "number" and v or nil
  -- nan and inf read as numbers, and every comparison with NaN is false:
  -- --at nan passed every freshness and validity check
  if not n or n ~= n or n == math.huge or n == -math.huge then
    usage_error("%s must be a number, not %s", name, v)
  end
  return n
end

--- syntax: what, expected = common.sign_error_blame(err)
-- What a 401 SIGN_ERROR blames ("scheme", "mchid", "serial", "timestamp",
-- "signature" or nil): paygate.wechatpay.errors.sign_error_blame, which
-- the client's own errors use too. paygate certs and paygate doctor word
-- the fix each with their own names.
_M.sign_error_blame = require("paygate.wechatpay.errors").sign_error_blame

--- syntax: s = common.days(seconds) -- a certificate's time left (or
-- since it expired), rounded down as the gateway's console does: "12
-- days", and under 2 days with its hours, "1 day 23 h", "5 h", "40 min"
-- (never "1 days" for 47 hours)
function _M.days(s)
  s = math.abs(s)
  local d = math.floor(s / 86400)
  if d >= 2 then return d .. " days" end
  local h = math.floor(s % 86400 / 3600)
  if d == 1 then return h > 0 and ("1 day " .. h .. " h") or "1 day" end
  if h >= 1 then return h .. " h" end
  return math.floor(s / 60) .. " min"
end

--- syntax: s = common.duration(seconds) -- "3 min 20 s", "2 h 5 min"...
function _M.duration(s)
  s = math.floor(math.abs(s) + 0.5)
  if s < 120 then return s .. " s" end
  if s < 7200 then
    return ("%d min %d s"):format(math.floor(s / 60), s % 60)
  end
  if s < 172800 then
    return ("%d h %d min"):format(math.floor(s / 3600),
                                   math.floor(s % 3600 / 60))
  end
  return ("%d days"):format(math.floor(s / 86400))
end

return _M
