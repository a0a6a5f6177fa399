-- examples/hello: the smallest paygate app.
--   paygate run examples/hello --listen 127.0.0.1:8080
--   curl localhost:8080/            -> hello, world
--   curl localhost:8080/hello/ada   -> {"hello":"ada"}
local paygate = require "paygate"

paygate.route("GET", "/", function()
  return 200, "hello, world\n"
end)

paygate.route("GET", "/hello/:name", function(req)
  return 200, { hello = req.params.name }
end)

paygate.route("POST", "/echo", function(req)
  return 200, { you_sent = req:json(), request_id = req.id }
end)

paygate.route("GET", "/slow", function(req)
  paygate.sleep(tonumber(req:query().s) or 0.1)
  return 200, "done\n"
end)
