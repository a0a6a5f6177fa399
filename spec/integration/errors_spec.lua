-- What a handler author sees when something fails: every place the runtime
-- reports an error value (app load, handler, task, timer, paygate exec)
-- shows a paygate error as "kind: message" -- never "table: 0x..." or just
-- "table" -- and a plain table with kind/message fields the same way.
local paygate = require "paygate"
local server = require "support.server"
local proc = require "support.proc"

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

local function exec(source)
  local dir = server.tmpdir()
  write(dir .. "/script.lua", source)
  local p = proc.spawn({ PAYGATE_BIN, "exec", dir .. "/script.lua" },
                       { log = dir .. "/out" })
  local code = p:wait(10)
  if code == nil then p:kill(proc.SIGKILL); p:wait(2) end
  local out = proc.read(dir .. "/out")
  os.execute("rm -rf " .. dir)
  return code, out
end

describe("error reporting", function()
  describe("paygate exec", function()
    it("prints a raised paygate error as kind: message", function()
      local code, out = exec([[
        local paygate = require "paygate"
        error(paygate.error("my_kind", "the thing broke"))
      ]])
      assert.equal(1, code)
      assert.matches("my_kind: the thing broke", out, 1, true)
      assert.not_matches("table", out)
    end)

    it("prints assert(nil, err) of a failing open as kind: message", function()
      local code, out = exec([[
        local sql = require "paygate.sql"
        local db = assert(sql.open("sqlite:/nonexistent-dir/x/y.db"))
      ]])
      assert.equal(1, code)
      assert.matches("unavailable: ", out, 1, true)
      assert.not_matches("table", out)
    end)

    it("prints a plain table with kind and message fields", function()
      local code, out = exec([[error({ kind = "k", message = "m" })]])
      assert.equal(1, code)
      assert.matches("k: m", out, 1, true)
    end)

    it("names the type of any other error value", function()
      local code, out = exec([[error({})]])
      assert.equal(1, code)
      assert.matches("error object is a table value", out, 1, true)
      code, out = exec([[error(setmetatable({}, { __tostring =
        function() error("boom") end }))]])
      assert.equal(1, code)
      assert.matches("error object is a table value", out, 1, true)
    end)

    it("paygate.log shows a table message and a table field JSON cannot"
       .. " hold whole, never 'table: 0x' or the fields lost", function()
      -- (a table message logged as "table: 0x...", and a field table
      -- holding a function or a cycle as "(error object is a table
      -- value)", its other fields gone)
      local code, out = exec([[
        local paygate = require "paygate"
        paygate.log.warn({ order = 7 })
        local c = { name = "loop" }
        c.self = c
        paygate.log.warn("odd", { req = { id = "r1", cb = print },
                                  c = c, list = { 1, 0 / 0 } })
      ]])
      assert.equal(0, code, out)
      assert.not_matches("table: 0x", out, 1, true)
      assert.not_matches("error object", out, 1, true)
      assert.matches('"msg":"{\\"order\\":7}"', out)
      local line = out:match('[^\n]*"msg":"odd"[^\n]*')
      assert.matches('"id":"r1"', line, 1, true)
      assert.matches('"cb":"function', line, 1, true)
      assert.matches('"name":"loop"', line, 1, true)
      assert.matches('"self":"(a cycle', line, 1, true)
      assert.matches('"2":"nan"', line, 1, true)
    end)

    it("paygate.log keeps every field of a line past its 16 KiB, long"
       .. " values shortened, and a long binary message", function()
      -- (fields whose JSON did not fit the line were all dropped, the
      -- short ones with the long one: {"msg":"upstream failed"} alone;
      -- a message of 3 KiB of control bytes was "(message too long)")
      local code, out = exec([[
        local paygate = require "paygate"
        paygate.log.warn("upstream failed", { body = string.rep("x", 20000),
          status = 502, error = { kind = "closed", message = "reset" },
          nested = { list = { string.rep("y", 9000), "short" } } })
        paygate.log.warn(string.rep("\1", 3000), { after = "kept" })
      ]])
      assert.equal(0, code, out)
      local json = require "paygate.json"
      local line = out:match('[^\n]*"msg":"upstream failed"[^\n]*')
      assert.truthy(line, out)
      local t = assert(json.decode(line))
      assert.equal(502, t.status)
      assert.same({ kind = "closed", message = "reset" }, t.error)
      assert.equal("short", t.nested.list[2])
      assert.matches("^xxxx.*%(%d+ bytes more%)$", t.body)
      assert.matches("^yyyy.*%(%d+ bytes more%)$", t.nested.list[1])
      line = out:match('[^\n]*"after":"kept"[^\n]*')
      assert.truthy(line, out)
      t = assert(json.decode(line))
      assert.matches("^\1\1\1\1", t.msg)
    end)

    it("paygate.log keeps the line's own keys: a field named like one"
       .. " is logged as field_<name>", function()
      -- (a WeChat error logged as the fields brought its request_id, the
      -- line then holding two: parsers keep the last, and the line no
      -- longer matched its request's access line)
      local code, out = exec([[
        local paygate = require "paygate"
        paygate.log.warn("refused", { request_id = "wx-1", level = "debug",
          msg = "m", ts = 1, pid = 2, kind = "k" })
      ]])
      assert.equal(0, code, out)
      local line = out:match('[^\n]*"kind":"k"[^\n]*')
      assert.truthy(line, out)
      for _, key in ipairs({ "ts", "level", "pid", "msg", "request_id" }) do
        local _, n = line:gsub('"' .. key .. '":', "")
        assert.is_true(n <= 1, line)
      end
      local t = assert(require("paygate.json").decode(line))
      assert.equal("warn", t.level)
      assert.equal("refused", t.msg)
      assert.equal("wx-1", t.field_request_id)
      assert.equal("debug", t.field_level)
      assert.equal("m", t.field_msg)
      assert.equal(1, t.field_ts)
      assert.equal(2, t.field_pid)
    end)

    it("sets paygate.app_dir to the script's folder", function()
      local code, out = exec([[
        local paygate = require "paygate"
        print("app_dir=" .. paygate.app_dir)
        local f = assert(io.open(paygate.app_dir .. "/script.lua"))
        f:close()
      ]])
      assert.equal(0, code, out)
      assert.matches("app_dir=/", out, 1, true)
    end)
  end)

  it("an app whose top level raises a paygate error logs kind: message",
     function()
    local s = server.start{ wait = false, source = [[
      local paygate = require "paygate"
      local sql = require "paygate.sql"
      local db = assert(sql.open("sqlite:/nonexistent-dir/x/y.db"))
    ]] }
    local code = s.proc:wait(15)
    assert.equal(1, code)
    local logs = s:logs()
    assert.matches("app failed to load: unavailable: ", logs, 1, true)
    assert.not_matches("load: table", logs, 1, true)
    s:stop()
  end)

  describe("in a running app", function()
    local s
    setup(function()
      s = server.start{ source = [[
        local paygate = require "paygate"
        paygate.route("GET", "/raise", function()
          error(paygate.error("handler_kind", "handler broke"))
        end)
        paygate.route("GET", "/task", function()
          paygate.spawn(function()
            error(paygate.error("task_kind", "task broke"))
          end)
          return 200, "ok"
        end)
        paygate.route("GET", "/timer", function()
          local t, n = nil, 0
          t = paygate.timer.every(0.01, function()
            n = n + 1
            if n == 1 then error(paygate.error("timer_kind", "timer broke")) end
            if n == 2 then error("plain text broke") end
            t:cancel()
          end)
          return 200, "ok"
        end)
        paygate.route("GET", "/app_dir", function()
          return 200, paygate.app_dir
        end)
        paygate.route("POST", "/decode", function(req)
          local v, err = req:decode_json()
          if not v then return 422, { code = "FAIL", message = err.kind } end
          return 200, v
        end)
        local sql = require "paygate.sql"
        local db = assert(sql.open("sqlite:" .. paygate.app_dir .. "/t.db"))
        assert(db:exec("CREATE TABLE IF NOT EXISTS t (id INTEGER)"))
        paygate.route("POST", "/txabort", function()
          local ok, err = db:transaction(function(tx)
            assert(tx:exec("INSERT INTO t (id) VALUES (1)"))
            paygate.abort(409, "conflict", "order already paid")
          end)
          return 200, { after_transaction = true, err = tostring(err) }
        end)
        -- a bug two calls deep in an idempotent handler
        local function price_of(order) return order.items.total end
        paygate.route("POST", "/idem_raise", require("paygate.idempotency")
          .wrap(db, function(req)
            local n = price_of(req:json())
            return 200, { n = n }
          end))
        paygate.route("GET", "/rows", function()
          return 200, { n = assert(db:query("SELECT count(*) AS n FROM t"))[1].n }
        end)
        paygate.route("GET", "/wechat_status", function()
          -- an error that carries some other answer's status is not an abort
          error(paygate.error("order_paid", "paid", { status = 400 }))
        end)
        paygate.route("GET", "/logfields", function()
          paygate.log.warn("odd fields", { n = 7, f = function() end,
                                           big = math.huge })
          return 200, "ok"
        end)
        paygate.route("GET", "/teapot", function()
          paygate.abort(418, "teapot", "short and stout")
        end)
        paygate.route("GET", "/badstatus/:id", function()
          return { status = 200 }, "a table where the status goes"
        end)
        paygate.route("GET", "/badstatus-number", function()
          return 700, "above 599"
        end)
        paygate.route("GET", "/badstatus-text", function()
          return "2O0", "a letter O"
        end)
        paygate.route("GET", "/badstatus-body", function()
          return '{"code":"SUCCESS","secret":"not for the log"}'
        end)
        paygate.route("GET", "/badbody", function()
          return 200, true
        end)
        paygate.route("GET", "/returned", function()
          return nil, paygate.error("returned_kind", "not stored")
        end)
        paygate.before(function(req)
          if req.path == "/guarded" then
            return nil, paygate.error("hook_kind", "cannot check the key")
          end
        end)
        paygate.route("GET", "/guarded", function()
          return 200, "past the hook"
        end)
      ]] }
    end)
    teardown(function() s:stop() end)

    local function wait_log(text)
      return proc.wait_until(function()
        return s:logs():find(text, 1, true) ~= nil
      end, 10, text)
    end

    it("a handler's raised error", function()
      local res = assert(s:request("/raise"))
      assert.equal(500, res.status)
      assert.not_matches("handler broke", res.body, 1, true)  -- never to the client
      assert.truthy(wait_log("handler_kind: handler broke"))
    end)

    it("an idempotent handler's raised error: the stack is the handler's,"
       .. " once, and the key is free again", function()
      for _ = 1, 2 do
        local res = assert(s:request{ method = "POST", path = "/idem_raise",
          headers = { ["Idempotency-Key"] = "k-raise",
                      ["Content-Type"] = "application/json" },
          body = '{"items":null,"card":"4111-secret"}' })
        assert.equal(500, res.status)
        assert.matches('"request_id"', res.body, 1, true)
        assert.not_matches("items", res.body, 1, true)
      end
      assert.truthy(wait_log("attempt to index field 'items'"))
      local line = s:logs():match("[^\n]*attempt to index field 'items'[^\n]*")
      -- where it was raised and the handler that called it (was: a stack
      -- beginning at idempotency.lua's error(), the handler's frames lost)
      assert.matches("in function 'price_of'", line, 1, true)
      local _, n = line:gsub("stack traceback:", "")
      assert.equal(1, n, line)
      assert.not_matches("4111-secret", s:logs(), 1, true)
    end)

    it("a handler's returned nil, err", function()
      local res = assert(s:request("/returned"))
      assert.equal(500, res.status)
      assert.not_matches("not stored", res.body, 1, true)
      assert.truthy(wait_log("the handler returned nil, err instead of a"
                             .. " status: returned_kind: not stored"))
    end)

    -- "handler returned no valid status (200-599)" said neither what
    -- came back nor from which route
    it("a handler's invalid status, with what it was and the route",
       function()
      for path, want in pairs({
        ["/badstatus/7"] = "handler returned no valid status (200-599) for"
          .. " GET /badstatus/:id: a table",
        ["/badstatus-number"] = "handler returned no valid status"
          .. " (200-599) for GET /badstatus-number: the number 700",
        ["/badstatus-text"] = "handler returned no valid status (200-599)"
          .. " for GET /badstatus-text: the string '2O0'",
        -- a string that is no status word is not shown: it may be a body
        ["/badstatus-body"] = "handler returned no valid status (200-599)"
          .. " for GET /badstatus-body: a string of 45 bytes",
        ["/badbody"] = "handler body must be a string or a table (for GET"
          .. " /badbody: a boolean)",
      }) do
        local res = assert(s:request(path))
        assert.equal(500, res.status)
        assert.truthy(wait_log(want))
      end
      assert.is_nil(s:logs():find("not for the log", 1, true))
    end)

    it("a before hook's returned nil, err fails closed", function()
      local res = assert(s:request("/guarded"))
      assert.equal(500, res.status)
      assert.not_matches("past the hook", res.body, 1, true)
      assert.truthy(wait_log("a before hook returned nil, err instead of a"
                             .. " status: hook_kind: cannot check the key"))
    end)

    it("a spawned task's error", function()
      assert.equal(200, assert(s:request("/task")).status)
      assert.truthy(wait_log("task_kind: task broke"))
    end)

    it("a timer's error", function()
      assert.equal(200, assert(s:request("/timer")).status)
      assert.truthy(wait_log("timer_kind: timer broke"))
      assert.not_matches('"error":"table', s:logs(), 1, true)
      -- with where it was raised, as a task's failure is logged
      assert.truthy(wait_log("plain text broke"))
      local line = s:logs():match('[^\n]*plain text broke[^\n]*')
      assert.matches("stack traceback:", line, 1, true)
    end)

    it("paygate.abort inside db:transaction rolls back and ends the request",
       function()
      local res = assert(s:request{ method = "POST", path = "/txabort" })
      assert.equal(409, res.status)
      assert.matches('"conflict"', res.body, 1, true)
      assert.not_matches("after_transaction", res.body, 1, true)
      assert.equal('{"n":0}', assert(s:request("/rows")).body)
    end)

    it("an error with a status field of its own is a 500, not an abort",
       function()
      assert.equal(500, assert(s:request("/wechat_status")).status)
      assert.truthy(wait_log("order_paid: paid"))
    end)

    it("a log line keeps the fields JSON can hold and shows the rest",
       function()
      assert.equal(200, assert(s:request("/logfields")).status)
      assert.truthy(wait_log('"msg":"odd fields"'))
      local line = s:logs():match('[^\n]*"odd fields"[^\n]*')
      assert.matches('"n":7', line, 1, true)
      assert.matches('"f":"function', line, 1, true)
      assert.matches('"big":"inf"', line, 1, true)
    end)

    it("paygate.app_dir is the app's absolute folder", function()
      local res = assert(s:request("/app_dir"))
      assert.equal(s.app, res.body)
    end)

    it("req:decode_json returns nil, err instead of answering 400", function()
      local res = assert(s:request{ method = "POST", path = "/decode",
                                    body = "{nope" })
      assert.equal(422, res.status)
      assert.matches('"invalid_json"', res.body, 1, true)
      res = assert(s:request{ method = "POST", path = "/decode",
                              body = '{"a":1}' })
      assert.equal(200, res.status)
      assert.equal('{"a":1}', res.body)
    end)
  end)
end)
