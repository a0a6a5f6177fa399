-- paygate.http: the outbound HTTP client (libcurl multi on our loop).
--
--   local res, err = paygate.http.request{ method = "POST", url = url,
--     headers = { ["Content-Type"] = "application/json" }, body = s,
--     timeout = 5, ca_file = "ca.pem", client_cert = "c.pem",
--     client_key = "k.pem" }
--   if not res then -- err.kind: timeout, connect, dns, tls, closed,
--                   -- body_too_large, header_too_large (a response
--                   -- header line past 100 KiB, or past 256 KiB of
--                   -- them); closed also for an answer cut short,
--                   -- in its head or its body, and (retryable false)
--                   -- for one that breaks HTTP: Content-Length values
--                   -- that differ, an unasked 101, a malformed head
--                   -- (a folded first header line, a header line
--                   -- with no colon, a NUL byte in a head line, a
--                   -- Content-Length that is no number of bytes or
--                   -- past 2^63 - 1, a status line that cannot be
--                   -- read, an answer that is no HTTP at all: another
--                   -- protocol's server); body_too_large also at once for
--                   -- a Content-Length past max_body;
--                   -- err.retryable; err.sent is false
--                   -- when nothing of the request was written (dns,
--                   -- connect, TLS handshake): safe to retry blindly
--   end
--   res.status, res.headers["content-type"], res.body
--
-- A TLS file that cannot be used (kind tls) is named with why, when that
-- shows from here: err.option is "ca_file", "client_cert" or "client_key"
-- and the message says the file cannot be read (and the system's reason)
-- or is not PEM. The value is shown only when it is a file name (PEM text
-- pasted where its path belongs never is). A key that does not match its
-- certificate, or a wrong client_key_password, leaves err.option unset.
--
-- Connections are kept alive and reused, but not one with bytes waiting
-- on it when a request would go out (what no request asked for: a 408 a
-- server left before closing it, a second answer to one request): it is
-- closed and the request goes out on a new connection, so no request
-- reads them as its answer. One made with a client
-- certificate is reused only by a request with the same client identity:
-- the same client_cert and client_key paths, and the same bytes in those
-- files (a key replaced, even at the same path, gets a new connection).
--
-- A request is written once: when a reused keep-alive connection dies
-- after the request went out and before any byte of the answer, libcurl
-- would send it again on a new connection, though the server may have
-- read the first copy and acted on it. That re-send happens only with
-- `resend = true`, the default for GET, HEAD, PUT, DELETE, OPTIONS and
-- TRACE; for POST, PATCH and other methods the request fails instead
-- (kind closed, err.sent = true: it may have been received).
--
-- Streamed bodies: with a `sink`, the body is handed over chunk by chunk
-- as it arrives and never held whole (res.body is nil):
--
--   local res, err = paygate.http.request{ url = url, timeout = 600,
--     on_headers = function(status, headers) ... end,  -- optional, first
--     sink = function(chunk) return f:write(chunk) end }
--
-- Both run in the calling coroutine and may yield; while they run, the
-- transfer pauses once 64 KiB are buffered (back-pressure). Returning
-- false, or nil plus an error, or raising, aborts the request: nil, err
-- with err.kind "aborted" (err.cause holds what the callback returned or
-- raised). Returning nothing continues. `max_body` does not apply to a
-- streamed body unless given, then it caps the total (body_too_large).
-- `timeout` covers the whole transfer, time spent in the sink included.
-- A head that came whole reaches on_headers even when the body then fails
-- (cut off, timed out): the request returns that failure after it.

local core = require "paygate.http.core"
local redact = require "paygate.redact"
local pcore = require "paygate.core"

local _M = {}

local function aborted(what, ok, r, e)
  local cause
  if not ok then
    cause = r
  elseif r == false then
    cause = e or "returned false"
  else
    cause = e
  end
  return nil, pcore.error("aborted", "http request: " .. what
                          .. " stopped the transfer: " .. tostring(cause),
                          { cause = cause, retryable = false, sent = true })
end

-- true when a callback's results ask to stop: false, or nil plus an error
local function stops(ok, r, e)
  return not ok or r == false or (r == nil and e ~= nil)
end

-- What is wrong with a TLS file option's file, or nil when it reads as
-- PEM (then the fault is elsewhere: a key that does not match its
-- certificate, a wrong password, a certificate that is not one).
local function file_problem(path)
  local f, e = io.open(path, "rb")
  if not f then
    -- io.open's message is "PATH: reason": the reason alone (the value
    -- is shown, when it may be, through redact.name)
    return "cannot be read (" .. (tostring(e):match(".*: ([^:]+)$")
                                  or "no such file") .. ")"
  end
  -- (a folder opens, and its read fails: "Is a directory")
  local head, rerr = f:read(65536)
  f:close()
  if not head and rerr then return "cannot be read (" .. rerr .. ")" end
  if not head or head == "" then return "is an empty file" end
  if not head:find("-----BEGIN ", 1, true) then
    return "is not PEM (no -----BEGIN line)"
  end
  return nil
end

-- err (kind tls, err.tls_files from the C side: "client" or "ca") told
-- which option's file is at fault and why, when that can be seen from
-- here. A value that is not a file name (PEM text pasted where its path
-- belongs) is never shown.
local function tls_files(opts, err)
  if type(err) ~= "table" or not err.tls_files then return err end
  local names = err.tls_files == "ca" and { "ca_file" }
                or { "client_cert", "client_key" }
  for _, name in ipairs(names) do
    local v = opts[name]
    if type(v) == "string" then
      local why = file_problem(v)
      if why then
        local shown = redact.name(v)
        err.message = err.message .. ": " .. name .. " "
          .. (shown and ("%q"):format(shown) or "(its value is not a file"
                                                  .. " name: not shown)")
          .. " " .. why
        err.option = name
        return err
      end
    end
  end
  return err
end

local function stream(opts, sink, on_headers)
  local s = core.stream(opts)
  local status, headers = s:headers()
  if not status then
    s:close()
    return nil, tls_files(opts, headers)
  end
  if on_headers then
    local ok, r, e = pcall(on_headers, status, headers)
    if stops(ok, r, e) then
      s:close()
      return aborted("on_headers", ok, r, e)
    end
  end
  while true do
    local chunk, err = s:read()
    if chunk == nil then
      local time = s:time()
      s:close()
      if err then return nil, err end
      return { status = status, headers = headers, time = time }
    end
    local ok, r, e = pcall(sink, chunk)
    if stops(ok, r, e) then
      s:close()
      return aborted("sink", ok, r, e)
    end
  end
end

--- syntax: res, err = paygate.http.request(opts)
-- opts: url, method, headers, body, timeout, connect_timeout, ca_file,
--       client_cert, client_key, client_key_password, max_body, resolve,
--       resend, sink, on_headers (timeout: the whole request, 30 s;
--       connect_timeout: the name's lookup, the TCP connect and the TLS
--       handshake, 10 s, past it kind timeout with err.sent false)
-- returns: res { status, headers, body (nil with a sink), time } or
--          nil, err (kind timeout, connect, dns, tls, closed,
--          body_too_large, header_too_large, aborted; err.sent,
--          err.retryable)
-- yields: until the response is read or the request failed.
function _M.request(opts)
  if type(opts) ~= "table" then
    error("http.request: opts must be a table", 2)
  end
  local sink, on_headers = opts.sink, opts.on_headers
  if sink == nil then
    if on_headers ~= nil then
      error("http.request: on_headers needs a sink", 2)
    end
    local res, err = core.request(opts)
    if not res then return nil, tls_files(opts, err) end
    return res
  end
  if type(sink) ~= "function" then
    error("http.request: sink must be a function", 2)
  end
  if on_headers ~= nil and type(on_headers) ~= "function" then
    error("http.request: on_headers must be a function", 2)
  end
  return stream(opts, sink, on_headers)
end

--- syntax: closed = paygate.http.close_idle()
-- Closes the connections kept alive for reuse (those of requests without
-- a client certificate), when no request of this process is under way;
-- the next request connects anew (TLS sessions are kept: it resumes).
-- What a process that is about to stop the servers it talked to calls
-- (paygate.testing.stop_all does): a server draining for a stop gives an
-- idle keep-alive connection a second to send one last request, and
-- need not once it is closed.
-- returns: true, or false when a request was under way (nothing closed).
function _M.close_idle()
  return core.close_idle()
end

return _M
