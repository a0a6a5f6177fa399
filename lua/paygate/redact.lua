-- paygate.redact: what a message (a log line, a config error, a CLI's
-- output) may print of a value that can hold a secret: a store's URL
-- without its password, a secret's file path or variable name only when
-- it is not the secret itself, written where its name belongs.
local type, tostring = type, tostring

local _M = {}

--- syntax: main, query = redact.split_query(s)
-- s (a store URL, or what follows its scheme) cut where its query starts:
-- query is "" or begins with "?". A "?" with an "@" after it and no "="
-- between them is in the user info (a password holding "?"), not the
-- query: the query then starts at the first "?" after that "@". The one
-- reading of paygate.redis, paygate.sql and redact.url.
function _M.split_query(s)
  local main, query = s:match("^([^?]*)(.*)$")
  -- the last "@" of the query with no "=" ahead of it
  local at = query:match("^[^=]*()@")
  if at then
    local rest, q = query:sub(at + 1):match("^([^?]*)(.*)$")
    return main .. query:sub(1, at) .. rest, q
  end
  return main, query
end
local split_query = _M.split_query

--- syntax: scheme, userinfo, hostpath, query = redact.parts(url)
-- A store's URL in the pieces paygate.redis, paygate.sql and redact.url
-- read: scheme with its "://"; userinfo everything before the last "@"
-- ahead of the query (split_query: a password may hold "/", "@" or "?"),
-- nil when there is none; hostpath what follows it up to the query;
-- query "" or beginning with "?". nil for a text with no scheme.
function _M.parts(url)
  local scheme, rest = tostring(url):match("^(%a[%w+.-]*://)(.*)$")
  if not scheme then
    return nil
  end
  local main, query = split_query(rest)
  local at = main:match(".*()@")
  if at then
    return scheme, main:sub(1, at - 1), main:sub(at + 1), query
  end
  return scheme, nil, main, query
end
local parts = _M.parts

--- syntax: s = redact.url(url)
-- A store's URL as a message may print it: no password. The user info is
-- everything before the last "@" ahead of the query (split_query), as
-- paygate.redis and paygate.sql read it (a password may hold "/", "@" or
-- "?"); of it, only a
-- PostgreSQL user name before ":" is kept (redis://SECRET@host: the whole
-- of it is the password). A query parameter named password (or
-- sentinel_password, sslpassword: any name ending in password) is masked
-- too.
function _M.url(url)
  url = tostring(url)
  local scheme, userinfo, hostpath, query = parts(url)
  if scheme then
    local user = userinfo and not scheme:lower():find("^redis")
                 and userinfo:match("^([^:]*)") or ""
    url = scheme .. (user ~= "" and user .. "@" or "") .. hostpath .. query
  end
  -- password=, and every other option named *password (paygate.redis's
  -- sentinel_password, libpq's sslpassword)
  return (url:gsub("([?&][%w_]*[Pp][Aa][Ss][Ss][Ww][Oo][Rr][Dd]=)[^&]*",
                   "%1***"))
end

--- syntax: s = redact.name(v)
-- A file path or variable name from a config, as a message may print it:
-- nil when it may be the secret itself, written where its name belongs
-- (a variable's name is upper case and short; a path holds a "." or a "/"
-- and no run of 32 key characters).
function _M.name(v)
  if type(v) ~= "string" or v == "" or #v > 200 or v:find("[%c]") then
    return nil
  end
  if v:match("^[A-Z][A-Z0-9_]*$") then
    return #v < 32 and v or nil
  end
  if (v:find(".", 1, true) or v:find("/", 1, true))
     and not v:find(("[%w+=]"):rep(32)) then
    return v
  end
  return nil
end

--- syntax: s = redact.load_error(msg)
-- A Lua file's load error (loadfile's message) as a message may print
-- it: without the token a syntax error quotes ("... near '<token>'"),
-- which may be a secret written in the file (an unfinished string: the
-- rest of its line). The file and line stay. (src/process/config.c
-- applies the same rule to the config the runtime reads.)
function _M.load_error(msg)
  msg = tostring(msg)
  local i = msg:find(" near '", 1, true)
  return i and msg:sub(1, i - 1) or msg
end

return _M
