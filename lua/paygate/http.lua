-- paygate.http: the outbound HTTP client (libcurl multi on our loop).
--
--   local res, err = paygate.http.request{ method = "POST", url = url,
--     headers = { ["Content-Type"] = "application/json" }, body = s,
--     timeout = 5, ca_file = "ca.pem", client_cert = "c.pem",
--     client_key = "k.pem" }
--   if not res then -- err.kind: timeout, connect, dns, tls, closed,
--                   -- body_too_large; err.retryable; err.sent is false
--                   -- when nothing of the request was written (dns,
--                   -- connect, TLS handshake): safe to retry blindly
--   end
--   res.status, res.headers["content-type"], res.body

local core = require "paygate.http.core"

local _M = {}

--- syntax: res, err = paygate.http.request(opts)
-- yields: until the response is read or the request failed.
_M.request = core.request

return _M
