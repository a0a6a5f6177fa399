-- The store's health on /metrics of a running server: each SQLite store
-- an app opened shows its commits, the writes they acknowledged, each
-- commit's time (a histogram) and its reads, by store (the file's name),
-- at 0 from the start; handles opened on new files one after another add
-- a bounded number of series. (db:stats() and the rounds themselves:
-- spec/unit/store_health_spec.lua.)
local paygate = require "paygate"
local server = require "support.server"
local proc = require "support.proc"

local APP = [[
local paygate = require "paygate"
local sql = require "paygate.sql"
local db = assert(sql.open("sqlite:" .. paygate.app_dir .. "/health.db"))
assert(db:exec("CREATE TABLE IF NOT EXISTS t (v INTEGER)"))
paygate.route("POST", "/write/:n", function(req)
  local tasks = {}
  for i = 1, tonumber(req.params.n) do
    tasks[i] = paygate.spawn(function()
      return db:exec("INSERT INTO t VALUES ($1)", { i })
    end)
  end
  for _, t in ipairs(tasks) do assert(t:wait()) end
  return 200, "ok"
end)
paygate.route("GET", "/read", function()
  return 200, tostring(db:query("SELECT count(*) AS c FROM t")[1].c)
end)
paygate.route("POST", "/churn/:n", function(req)
  for i = 1, tonumber(req.params.n) do
    local d = assert(sql.open("sqlite:" .. paygate.app_dir .. "/churn" .. i
                              .. ".db"))
    assert(d:exec("CREATE TABLE IF NOT EXISTS x (v INTEGER)"))
    d:close()
  end
  return 200, "ok"
end)
]]

local function call(s, method, path)
  local res = assert(paygate.http.request{ method = method, url = s:url(path),
    timeout = 10 })
  assert.equal(200, res.status, res.body)
  return res.body
end

local function metrics(s)
  return assert(s:admin_get("/metrics")).body
end

local function value(body, series)
  local v = body:match("\n" .. series:gsub("%p", "%%%0") .. " ([%d.e+-]+)\n")
  return tonumber(v)
end

local LAB = 'engine="sqlite",store="health.db"'

describe("the store's health on /metrics", function()
  local s
  setup(function() s = server.start{ source = APP, workers = 1 } end)
  teardown(function() if s then s:stop() end end)

  it("shows commits, writes per commit, commit time and reads by store",
     function()
    -- from the start (the CREATE TABLE's commit published within 1 s)
    local body = proc.wait_until(function()
      local b = metrics(s)
      return (value(b, "paygate_store_commits_total{" .. LAB .. "}") or 0)
             >= 1 and b
    end, 10, "the store's series")
    for _, series in ipairs({
      "paygate_store_committed_writes_total{" .. LAB .. "}",
      "paygate_store_reads_total{" .. LAB .. ',where="inline"}',
      "paygate_store_reads_total{" .. LAB .. ',where="reader"}',
      "paygate_store_commit_duration_seconds_count{" .. LAB .. "}",
      "paygate_store_commit_duration_seconds_bucket{" .. LAB
        .. ',le="0.0001"}',
      "paygate_store_commit_duration_seconds_bucket{" .. LAB
        .. ',le="+Inf"}',
    }) do
      assert.truthy(value(body, series), series .. "\n" .. body)
    end
    assert.truthy(body:find("# TYPE paygate_store_commit_duration_seconds "
                            .. "histogram\n", 1, true), body)

    local c0 = value(body, "paygate_store_commits_total{" .. LAB .. "}")
    local w0 = value(body, "paygate_store_committed_writes_total{" .. LAB
                     .. "}")
    call(s, "POST", "/write/80")
    call(s, "GET", "/read")
    body = proc.wait_until(function()
      local b = metrics(s)
      return value(b, "paygate_store_committed_writes_total{" .. LAB
                   .. "}") == w0 + 80
             and (value(b, "paygate_store_reads_total{" .. LAB
                        .. ',where="inline"}') or 0) >= 1
             and b
    end, 10, "the writes published")
    local c1 = value(body, "paygate_store_commits_total{" .. LAB .. "}")
    -- group commit: 80 concurrent writes in fewer commits
    assert.truthy(c1 > c0 and c1 - c0 < 80, c0 .. " -> " .. c1)
    -- every commit timed, once
    assert.equal(c1, value(body, "paygate_store_commit_duration_seconds_count{"
                           .. LAB .. "}"))
    assert.equal(c1, value(body, "paygate_store_commit_duration_seconds_"
                           .. 'bucket{' .. LAB .. ',le="+Inf"}'))
    assert.truthy(value(body, "paygate_store_commit_duration_seconds_sum{"
                        .. LAB .. "}") > 0)
  end)

  it("holds a bounded number of stores", function()
    call(s, "POST", "/churn/30")
    local body = metrics(s)
    local stores = {}
    for store in body:gmatch('\npaygate_store_committed_writes_total{engine='
                             .. '"[^"]*",store="([^"]*)"}') do
      stores[#stores + 1] = store
    end
    -- 8 stores at most (health.db among them), and the overflow series
    assert.truthy(#stores <= 9, table.concat(stores, " "))
    assert.truthy(body:find('\npaygate_store_committed_writes_total{engine='
      .. '"_overflow",store="_overflow"} ', 1, true), body)
  end)
end)
