-- The command line: help, exit codes (0 ok, 1 runtime, 2 usage/config),
-- one-line reasons on stderr.
local server = require "support.server"
local proc = require "support.proc"

-- runs the binary with args, returns exit code and output (stdout+stderr)
local function run(args, timeout)
  local dir = server.tmpdir()
  local log = dir .. "/out"
  local argv = { PAYGATE_BIN }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local p = proc.spawn(argv, { log = log })
  local code = p:wait(timeout or 10)
  if code == nil then p:kill(proc.SIGKILL); p:wait(2) end
  local out = proc.read(log)
  os.execute("rm -rf " .. dir)
  return code, out
end

-- The commands `paygate --help` lists (its "  NAME  what it does" lines),
-- in its order: every check below runs on each, so a command added to the
-- binary is checked as soon as its help names it.
local function listed_commands()
  local code, out = run({ "--help" })
  assert.equal(0, code, out)
  local cmds = {}
  for name in out:gmatch("\n  (%l+) ") do cmds[#cmds + 1] = name end
  return cmds, out
end

describe("paygate CLI", function()
  it("the help lists every command: each command script of"
     .. " lua/paygate/cli/ and the binary's own run, exec, reload and"
     .. " version", function()
    local cmds, out = listed_commands()
    local set = {}
    for _, c in ipairs(cmds) do set[c] = true end
    local want = { "run", "exec", "reload", "version" }
    -- a command's script ends by running as one (common.run("NAME", ...));
    -- the others (common, keys) are the commands' shared code
    for _, f in ipairs(assert(require("paygate.core").listdir(
                                "lua/paygate/cli"))) do
      local name = f:match("^(%l+)%.lua$")
      if name and proc.read("lua/paygate/cli/" .. f):find(
                    "common.run(\"" .. name .. "\"", 1, true) then
        want[#want + 1] = name
      end
    end
    assert.is_true(#want > 10)
    for _, c in ipairs(want) do
      assert.is_true(set[c], "paygate --help does not list " .. c .. ":\n"
                     .. out)
    end
  end)

  it("prints help for every command, exit 0", function()
    local all = { { "--help" }, { "help" } }
    for _, cmd in ipairs((listed_commands())) do
      all[#all + 1] = { cmd, "--help" }
    end
    for _, args in ipairs(all) do
      local code, out = run(args)
      assert.equal(0, code, table.concat(args, " ") .. ": " .. out)
      assert.matches("usage: paygate" .. (args[2] and " " .. args[1] or ""),
                     out, 1, true)
    end
  end)

  it("help COMMAND is COMMAND --help", function()
    for _, cmd in ipairs((listed_commands())) do
      local code, out = run({ "help", cmd })
      local want_code, want = run({ cmd, "--help" })
      assert.equal(0, want_code, want)
      assert.equal(0, code, out)
      assert.equal(want, out)
    end
    local code, out = run({ "help", "frobnicate" })
    assert.equal(2, code)
    assert.matches("unknown command 'frobnicate'", out, 1, true)
  end)

  it("exec of a command's name (not a file here) gives its path on PATH",
     function()
    -- paygate exec busted ...: the script is a file, so busted's path
    local f = assert(io.popen("command -v sh"))
    local path = f:read("*l")
    f:close()
    local code, out = run({ "exec", "sh" })
    assert.equal(2, code)
    assert.matches("cannot read sh: No such file or directory", out, 1, true)
    assert.matches("give its path: " .. path, out, 1, true)
    code, out = run({ "exec", "no-such-command-or-file" })
    assert.equal(2, code)
    assert.equal("paygate exec: cannot read no-such-command-or-file: No such"
                 .. " file or directory\n", out)
    -- paygate exec "$(command -v busted)" with busted not installed
    code, out = run({ "exec", "" })
    assert.equal(2, code)
    assert.matches("the script path is empty", out, 1, true)
    assert.matches("lua-busted", out, 1, true)
  end)

  it("run on port 0 says the port the kernel gave (listener and admin)",
     function()
    local http = require "paygate.http"
    local servers = require "support.servers"
    local dir = server.tmpdir()
    local log = dir .. "/out"
    local p = proc.spawn({ PAYGATE_BIN, "run", "examples/hello", "--listen",
      "127.0.0.1:0", "--admin", "127.0.0.1:0", "--workers", "1" },
      { log = log })
    local line = servers.wait_for(function()
      return proc.read(log):match("paygate: serving [^\n]*")
    end, 15, "the serving line")
    local port = tonumber(line:match("on http://127%.0%.0%.1:(%d+) "))
    local admin = tonumber(line:match("admin on 127%.0%.0%.1:(%d+)"))
    assert.truthy(port and port > 0, line)       -- was: 127.0.0.1:0
    assert.truthy(admin and admin > 0, line)
    local res = http.request{ url = "http://127.0.0.1:" .. port .. "/",
                              timeout = 5 }
    assert.truthy(res, "the port it named serves")
    res = http.request{ url = "http://127.0.0.1:" .. admin .. "/healthz",
                        timeout = 5 }
    assert.equal(200, res and res.status)
    p:kill(proc.SIGTERM)
    p:wait(10)
    os.execute("rm -rf " .. dir)
  end)

  it("exits 2 with a reason for usage errors", function()
    local code, out = run({ "frobnicate" })
    assert.equal(2, code)
    assert.matches("unknown command", out)
    code, out = run({ "run" })
    assert.equal(2, code)
    code, out = run({ "run", "/nonexistent-app" })
    assert.equal(2, code)
    assert.matches("app.lua not found", out)
    -- a relative APP_DIR: says where it was looked for (it said only
    -- "no-such-app/app.lua not found", whatever the current directory)
    code, out = run({ "run", "no-such-app" })
    assert.equal(2, code)
    assert.matches("paygate run: no-such-app/app.lua not found: no-such-app"
                   .. " is taken from the current directory, "
                   .. assert(proc.cwd()) .. " (run from the folder that "
                   .. "holds it, or give an absolute path; an app is a "
                   .. "folder with an app.lua)\n", out, 1, true)
    code, out = run({ "run", "spec" })   -- a folder, without an app.lua
    assert.equal(2, code)
    assert.matches("paygate run: spec/app.lua not found: spec is taken from"
                   .. " the current directory, " .. assert(proc.cwd())
                   .. " (an app is a folder with an app.lua)\n", out, 1,
                   true)
    -- a trailing slash: one '/' before app.lua (was: "spec//app.lua")
    code, out = run({ "run", "spec/" })
    assert.equal(2, code)
    assert.matches("paygate run: spec/app.lua not found: spec/ is taken"
                   .. " from the current directory, ", out, 1, true)
    code, out = run({ "run", "/nonexistent-app//" })
    assert.equal(2, code)
    assert.matches("paygate run: /nonexistent-app/app.lua not found (",
                   out, 1, true)
    code, out = run({ "run", "examples/hello", "--workers", "zero" })
    assert.equal(2, code)
    assert.equal("paygate run: --workers must be a whole number, 1..128"
                 .. " (see paygate run --help)\n", out)
    code, out = run({ "run", "examples/hello", "--listen", "nonsense" })
    assert.equal(2, code)
    assert.matches("bad", out)
    -- a missing --pid-file, a missing script: one line saying what is
    -- missing (was: the whole usage, nothing saying what was wrong)
    for _, cmd in ipairs({ "reload", "upgrade" }) do
      code, out = run({ cmd })
      assert.equal(2, code)
      assert.equal("paygate " .. cmd .. ": --pid-file FILE is required: the"
                   .. " pid file the server was started with (paygate run"
                   .. " --pid-file FILE, or the config's pid_file) (see"
                   .. " paygate " .. cmd .. " --help)\n", out)
    end
    code, out = run({ "exec" })
    assert.equal(2, code)
    assert.equal("paygate exec: give the script to run, SCRIPT.lua"
                 .. " [ARGS...] (see paygate exec --help)\n", out)
    -- an empty admin is refused, not taken as "off" (was: silently off)
    code, out = run({ "run", "examples/hello", "--admin", "" })
    assert.equal(2, code)
    assert.matches('admin is empty: give HOST:PORT, or "off"', out, 1, true)
    -- reload names the option at fault as run does (was: the usage alone)
    code, out = run({ "reload", "--pid-flie=s3cret" })
    assert.equal(2, code)
    assert.equal("paygate reload: unknown option --pid-flie (see paygate "
                 .. "reload --help)\n", out)
    code, out = run({ "reload", "--pid-file", "x", "--timeout" })
    assert.equal(2, code)
    assert.equal("paygate reload: --timeout needs a value (see paygate "
                 .. "reload --help)\n", out)
    -- --timeout=N as --timeout N (was refused as unknown)
    code, out = run({ "reload", "--timeout=5", "--pid-file",
                      "/nonexistent/paygate.pid" })
    assert.equal(1, code)
    assert.matches("cannot read /nonexistent/paygate.pid", out, 1, true)
    code, out = run({ "exec", "/nonexistent.lua" })
    assert.equal(2, code)
    -- an option where the script belongs: exec takes none but --help (was
    -- "cannot read --help-me: No such file or directory"); named up to
    -- its "=", as run names one
    -- (a short one by its letter alone: -pS3cret is -p and a value)
    for _, a in ipairs({ "--help-me", "-v", "--key=s3cret", "-pS3cret" }) do
      code, out = run({ "exec", a, "x.lua" })
      assert.equal(2, code, out)
      assert.equal("paygate exec: unknown option "
                   .. (a:match("^%-%-") and a:match("^[^=]+") or a:sub(1, 2))
                   .. ": exec takes no options but --help; the script comes"
                   .. " first, SCRIPT.lua [ARGS...] (see paygate exec"
                   .. " --help)\n", out)
    end
    -- an unknown option, or one without its value: one line naming it
    -- (never the value given with =), not the whole usage
    code, out = run({ "run", "examples/hello", "--bogus=s3cret" })
    assert.equal(2, code)
    assert.equal("paygate run: unknown option --bogus (see paygate run "
                 .. "--help)\n", out)
    code, out = run({ "run", "examples/hello", "--listen" })
    assert.equal(2, code)
    assert.equal("paygate run: --listen needs a value (see paygate run "
                 .. "--help)\n", out)
    for args, want in pairs({
      [{ "run", "examples/hello", "-xy" }] = "unknown option -x",
      [{ "run", "-vx", "examples/hello" }] = "unknown option -v",
      [{ "run", "examples/hello", "--no-access-log=yes" }] =
        "--no-access-log takes no value",
      [{ "run", "examples/hello", "--tls" }] = "ambiguous option --tls",
    }) do
      code, out = run(args)
      assert.equal(2, code, out)
      assert.equal("paygate run: " .. want .. " (see paygate run --help)\n",
                   out)
    end
    code, out = run({ "version", "extra" })
    assert.equal(2, code)
  end)

  it("a command given nothing it needs says what, in one line pointing at"
     .. " --help, exit 2", function()
    -- (was: "--body is required", "--prefix must be an etcd prefix" for
    -- no --prefix at all, and no word of where to read more)
    for args, want in pairs({
      [{ "sign" }] = "paygate sign: --method is required",
      [{ "verify" }] = "paygate verify: --body is required",
      [{ "verify", "--body" }] = "paygate verify: --body needs a value",
      [{ "decrypt" }] = "paygate decrypt: --apiv3-key-file is required",
      [{ "certs" }] = "paygate certs: give files or directories",
      [{ "doctor" }] = "paygate doctor: --config FILE is required",
      [{ "apikey", "create" }] = "paygate apikey: create needs --app APP"
        .. " (the app the key is for;",
      [{ "apikey", "list" }] = "paygate apikey: --db URL is required",
      [{ "etcd", "publish" }] = "paygate etcd: --prefix PREFIX is required",
      [{ "etcd", "show", "--prefix", "/p/" }] = "paygate etcd: give"
        .. " --kek-file FILE or --kek-env VAR (the key-encryption key;",
      [{ "etcd", "delete", "--prefix", "/p/", "/p/x" }] =
        "paygate etcd: --endpoints is required",
    }) do
      local code, out = run(args)
      assert.equal(2, code, out)
      assert.equal(want, out:sub(1, #want), out)
      assert.equal("see --help)\n", out:sub(-12), out)
      assert.equal(1, select(2, out:gsub("\n", "")), out)
    end
  end)

  it("a command given something it cannot use says what, pointing at"
     .. " --help as well; one whose input cannot be read says why alone",
     function()
    -- (common.usage_error adds the pointer; each command said it or not
    -- as it was written: "--user needs --password-env VAR", "X is not a
    -- JSON object", "--json takes no value" said nothing of --help)
    local dir = server.tmpdir()
    finally(function() os.execute("rm -rf " .. dir) end)
    proc.write(dir .. "/key", ("k"):rep(32))
    proc.write(dir .. "/kek", ("ab"):rep(32))
    proc.write(dir .. "/brace", "{ not json")
    proc.write(dir .. "/text", "not json")
    for args, want in pairs({
      [{ "etcd", "show", "--prefix", "/p/", "--kek-file", dir .. "/kek",
         "--endpoints", "https://127.0.0.1:1", "--user", "u" }] =
        "paygate etcd: --user needs --password-env VAR",
      -- (the option that named it, not the variable alone: was "X is not
      -- set")
      [{ "etcd", "show", "--prefix", "/p/", "--kek-file", dir .. "/kek",
         "--endpoints", "https://127.0.0.1:1", "--user", "u",
         "--password-env", "PAYGATE_SPEC_UNSET_PW" }] =
        "paygate etcd: --password-env PAYGATE_SPEC_UNSET_PW: the variable"
        .. " PAYGATE_SPEC_UNSET_PW is not set in this environment",
      [{ "decrypt", "--apiv3-key-file", dir .. "/key", "--resource",
         dir .. "/text" }] = "paygate decrypt: " .. dir
        .. "/text is not a JSON object",
      [{ "verify", "--body", dir .. "/text", "--headers", dir .. "/brace",
         "--certificate", dir .. "/text" }] = "paygate verify: " .. dir
        .. "/brace is not a JSON object",
      [{ "sign", "--json=yes" }] = "paygate sign: --json takes no value",
      [{ "sign", "--method", "G T", "--url", "/v3/x", "--mchid", "1",
         "--serial", "AB", "--key",
         "spec/fixtures/wechatpay/a3_merchant_key.pem" }] =
        "paygate sign: --method must be a method name",
      [{ "apikey", "list", "--db", "sqlite:" .. dir .. "/x.db", "--app",
         "a b" }] = "paygate apikey: --app must be 1..64 of",
      [{ "backup", "redis://x", dir .. "/b" }] =
        "paygate backup: SQLITE_URL must be sqlite:PATH, not redis://x",
    }) do
      local code, out = run(args)
      assert.equal(2, code, out)
      assert.equal(want, out:sub(1, #want), out)
      assert.equal(" (see --help)\n", out:sub(-14), out)
      assert.equal(1, select(2, out:gsub("\n", "")), out)
    end
    -- a file or store that fails: its reason is the whole line
    local code, out = run({ "decrypt", "--apiv3-key-file", dir .. "/none",
                            "--resource", dir .. "/text" })
    assert.equal(2, code, out)
    assert.matches("^paygate decrypt: %-%-apiv3%-key%-file is not a readable"
                   .. " file %(value not shown%): [^\n]+\n$", out)
    assert.falsy(out:find("--help", 1, true), out)
  end)

  it("version names the commit the binary was built from", function()
    local code, out = run({ "version" })
    assert.equal(0, code, out)
    local commit = out:match("^paygate %d+%.%d+%.%d+ %(build ([%w._-]+)%)\n$")
    assert.is_string(commit, out)
    -- built from this checkout: one of its commits (abbreviated), never
    -- "unknown" (before: "paygate 0.1.0" for every build, none told apart)
    local p = assert(io.popen("git rev-parse --git-dir >/dev/null 2>&1"
                              .. " && echo yes"))
    local in_git = p:read("*l") == "yes"
    p:close()
    if in_git then
      local hash = commit:match("^(%x+)")
      assert.is_string(hash, commit)
      assert.is_true(#hash >= 7, commit)
      p = assert(io.popen("git cat-file -e " .. hash .. "^{commit}"
                          .. " 2>/dev/null && echo yes"))
      assert.equal("yes", p:read("*l"), commit .. " is no commit here")
      p:close()
    end
  end)

  it("etcd delete refuses a file of a set inside a wider --prefix, exit 2,"
     .. " before reaching etcd", function()
    -- --prefix /paygate/ for /paygate/merchants/1900000001/'s set: its
    -- files are keys under the prefix that are no file of a set there,
    -- and were deleted (the endpoint here answers nothing: a refusal is
    -- exit 2 before any connection, a delete tried is exit 1)
    local function del(prefix, key)
      return run({ "etcd", "delete", "--prefix", prefix, "--endpoints",
                   "https://127.0.0.1:1", "--user", "u", "--password-env",
                   "HOME", key })
    end
    for _, key in ipairs({ "/paygate/merchants/1900000001/apiclient_key.pem",
                           "/paygate/merchants/1900000001/apiv3_key",
                           "/paygate/tls/key.pem" }) do
      local code, out = del("/paygate/", key)
      assert.equal(2, code, key .. ": " .. out)
      assert.matches("is a file of the set at " .. key:match("^(.*/)"),
                     out, 1, true)
    end
    -- a stray key deeper under the prefix is still deletable (tried: the
    -- endpoint refuses the connection, exit 1)
    local code, out = del("/paygate/", "/paygate/old/apiclient_key.pem.bak")
    assert.equal(1, code, out)
    assert.no.matches("is a file of", out, 1, true)
  end)

  it("apikey and etcd refuse an option of another subcommand, exit 2",
     function()
    -- each was dropped in silence: etcd show --json printed text to a
    -- script reading JSON, apikey list --key K listed every key, revoke
    -- --json printed text (refused before any store or etcd is opened)
    for args, want in pairs({
      [{ "etcd", "show", "--prefix", "/p/", "--json" }] =
        "paygate etcd: show takes no --json (see --help)\n",
      [{ "etcd", "show", "--prefix", "/p/", "--dir", "d" }] =
        "paygate etcd: show takes no --dir (see --help)\n",
      [{ "etcd", "show", "--prefix", "/p/", "--sign-type=s3cret" }] =
        "paygate etcd: show takes no --sign-type (see --help)\n",
      [{ "apikey", "list", "--db", "sqlite:/nonexistent/x.db", "--key",
         "ak_x" }] = "paygate apikey: list takes no --key (see --help)\n",
      [{ "apikey", "revoke", "--db", "sqlite:/nonexistent/x.db", "--key",
         "ak_x", "--json" }] =
        "paygate apikey: revoke takes no --json (see --help)\n",
      [{ "apikey", "revoke", "--db", "sqlite:/nonexistent/x.db", "--key",
         "ak_x", "--app", "shop" }] =
        "paygate apikey: revoke takes no --app (see --help)\n",
      [{ "apikey", "create", "--db", "sqlite:/nonexistent/x.db", "--app",
         "shop", "--key", "s3cret" }] =
        "paygate apikey: create takes no --key (see --help)\n",
    }) do
      local code, out = run(args)
      assert.equal(2, code, out)
      assert.equal(want, out)
    end
    -- what each subcommand does take still passes this check
    local code, out = run({ "apikey", "list", "--db",
                            "sqlite:/nonexistent/x.db", "--app", "shop",
                            "--json" })
    assert.equal(2, code, out)
    assert.matches("no database file /nonexistent/x.db", out, 1, true)
    -- no path at all: said so (was "no database file  (check...")
    code, out = run({ "apikey", "list", "--db", "sqlite:" })
    assert.equal(2, code, out)
    assert.matches("the sqlite: URL names no file (sqlite:PATH)", out, 1,
                   true)
    code, out = run({ "etcd", "publish", "--prefix", "/p/", "--json",
                      "--dir", "/nonexistent", "--sign-type",
                      "WECHATPAY2-SHA256-RSA2048", "--tls" })
    assert.equal(2, code, out)
    assert.matches("kek", out, 1, true)
  end)

  it("apikey list and revoke on a database without API keys say so, exit 1,"
     .. " and make nothing there", function()
    -- (they made paygate_api_keys in whatever database they were given,
    -- and a wrong one listed nothing, exit 0)
    local dir = server.tmpdir()
    local sql = require "paygate.sql"
    local url = "sqlite:" .. dir .. "/other.db"
    local db = assert(sql.open(url))
    assert(db:exec("CREATE TABLE mine (x INTEGER)"))
    db:close()
    for _, args in ipairs({ { "apikey", "list", "--db", url },
                            { "apikey", "revoke", "--db", url, "--key",
                              "ak_x" } }) do
      local code, out = run(args)
      assert.equal(1, code, out)
      assert.matches("no API keys in this database (it has no"
                     .. " paygate_api_keys table", out, 1, true)
    end
    db = assert(sql.open(url))
    assert.is_false(db:has_table("paygate_api_keys"))
    assert.is_true(db:has_table("mine"))
    db:close()
  end)

  it("a store it cannot reach: the one-line reason alone on stderr, not the"
     .. " PostgreSQL pool's own warning before it", function()
    -- (the pool's JSON "postgres: pool down (unavailable) ..." line came
    -- first: two lines, one of them a log record, where README promises a
    -- one-line reason)
    local url = "postgres://gw:SECRETMARKER@127.0.0.1:"
                .. require("paygate.core").free_port() .. "/gw"
    for _, c in ipairs({
      { { "migrate", "status", url, "examples/gateway/migrations" }, 2,
        "paygate migrate: cannot open postgres://gw@127.0.0.1:" },
      { { "audit", "verify", url }, 2,
        "paygate audit: cannot open postgres://gw@127.0.0.1:" },
      { { "apikey", "list", "--db", url }, 1, "paygate apikey: unavailable:" },
      { { "apikey", "revoke", "--db", url, "--key", "ak_x" }, 1,
        "paygate apikey: unavailable:" },
    }) do
      local code, out = run(c[1])
      local what = table.concat(c[1], " ", 1, 2)
      assert.equal(c[2], code, what .. ": " .. out)
      assert.equal(c[3], out:sub(1, #c[3]), what .. ": " .. out)
      assert.matches("Connection refused\n$", out, 1, false)
      local _, lines = out:gsub("\n", "")
      assert.equal(1, lines, what .. ": " .. out)
      assert.is_nil(out:find("SECRETMARKER", 1, true), out)
    end
  end)

  it("exits 2 for a bad config file, naming the key", function()
    local dir = server.tmpdir()
    local f = assert(io.open(dir .. "/c.lua", "w"))
    f:write("return { limits = { body_byts = 10 } }")
    f:close()
    local code, out = run({ "run", "examples/hello", "--config", dir .. "/c.lua" })
    assert.equal(2, code)
    assert.matches("config.limits: unknown key 'body_byts' (did you mean"
                   .. " 'body_bytes'?)", out, 1, true)
    -- as for the top-level keys: a slip names the key it looks like, and
    -- a key far from any is named alone
    for text, want in pairs{
      ["limits = { request_timout = 30 }"] = "config.limits: unknown key"
        .. " 'request_timout' (did you mean 'request_timeout'?)\n",
      ["tls = { ciphersuite = 'x' }"] = "config.tls: unknown key"
        .. " 'ciphersuite' (did you mean 'ciphersuites'?)\n",
      ["limits = { speed = 1 }"] = "config.limits: unknown key 'speed'\n",
    } do
      f = assert(io.open(dir .. "/c.lua", "w"))
      f:write("return { " .. text .. " }")
      f:close()
      code, out = run({ "run", "examples/hello", "--config",
                        dir .. "/c.lua" })
      assert.equal(2, code, out)
      assert.matches(want, out, 1, true)
    end
    f = assert(io.open(dir .. "/c.lua", "w"))
    f:write("return { pid_file = '/tmp/x\\0/etc/passwd' }")
    f:close()
    code, out = run({ "run", "examples/hello", "--config", dir .. "/c.lua" })
    assert.equal(2, code)
    assert.matches("pid_file has a NUL byte", out)
    f = assert(io.open(dir .. "/c.lua", "w"))
    f:write("return { workers = 'many' }")
    f:close()
    code, out = run({ "run", "examples/hello", "--config", dir .. "/c.lua" })
    assert.equal(2, code)
    assert.matches("workers must be a number", out)
    -- a switch given as text is refused, not taken as on
    for text, msg in pairs{
      ["return { access_log = 'off' }"] = "access_log must be true or false",
      ["return { tls = { session_tickets = 'no' } }"] =
        "session_tickets must be true or false" } do
      f = assert(io.open(dir .. "/c.lua", "w"))
      f:write(text)
      f:close()
      code, out = run({ "run", "examples/hello", "--config", dir .. "/c.lua" })
      assert.equal(2, code, text)
      assert.truthy(out:find(msg, 1, true), out)
    end
    f = assert(io.open(dir .. "/c.lua", "w"))
    f:write("syntax error here")
    f:close()
    code, out = run({ "run", "examples/hello", "--config", dir .. "/c.lua" })
    assert.equal(2, code)
    os.execute("rm -rf " .. dir)
  end)

  it("reads the config file however --config is spelled (--conf FILE, "
     .. "--conf=FILE)", function()
    -- getopt takes an abbreviation of --config for it: the file was then
    -- not read at all (only "--config" was looked for) and the server
    -- started on the defaults, the file's limits, TLS, listener unapplied
    local dir = server.tmpdir()
    local f = assert(io.open(dir .. "/c.lua", "w"))
    f:write("return { limits = { speed = 1 } }")
    f:close()
    for _, args in ipairs({ { "--conf", dir .. "/c.lua" },
                            { "--confi=" .. dir .. "/c.lua" },
                            { "--con", dir .. "/c.lua" } }) do
      local argv = { "run", "examples/hello", "--listen", "127.0.0.1:0",
                     "--admin", "off" }
      for _, a in ipairs(args) do argv[#argv + 1] = a end
      local code, out = run(argv, 5)
      assert.equal(2, code, out)
      assert.matches("config.limits: unknown key 'speed'", out, 1, true)
    end
    -- the last one given is read, as with --config twice
    local g = assert(io.open(dir .. "/ok.lua", "w"))
    g:write("return { limits = { spede = 1 } }")
    g:close()
    local code, out = run({ "run", "examples/hello", "--config",
                            dir .. "/c.lua", "--conf", dir .. "/ok.lua" }, 5)
    assert.equal(2, code, out)
    assert.matches("unknown key 'spede'", out, 1, true)
    os.execute("rm -rf " .. dir)
  end)

  it("exits 2 for a port that only fits after wrapping or truncation", function()
    -- 2^32 + p was bound as port p; 22 digits were cut to 15 (port 0)
    local port = require("paygate.core").free_port()
    local code, out = run({ "run", "examples/hello", "--admin", "off",
                            "--listen", "127.0.0.1:" .. (4294967296 + port) })
    assert.equal(2, code)
    assert.matches("bad port", out)
    code, out = run({ "run", "examples/hello", "--admin", "off",
                      "--listen", "127.0.0.1:0000000000000000000" .. port })
    assert.equal(2, code)
    assert.matches("bad port", out)
  end)

  it("exits 2 for a config listen or admin no start could bind, a flag"
     .. " for it notwithstanding", function()
    -- the flag overrode the file's value unread: the server started, and
    -- the next start without the flag (or a reload, as "done") took a
    -- file that start refuses
    local dir = server.tmpdir()
    local port = require("paygate.core").free_port()
    for text, want in pairs{
      ['listen = "127.0.0.1:99999"'] = "paygate: config.listen: bad port"
        .. " in '127.0.0.1:99999' (want HOST:PORT)\n",
      ['admin = "nope"'] = "paygate: config.admin: bad port in 'nope'"
        .. " (want HOST:PORT)\n",
      ['admin = ""'] = 'paygate: config.admin is empty: give HOST:PORT, or'
        .. ' "off" for no admin listener\n',
      ['listen = "localhost:8080"'] = "paygate: config.listen: bad address"
        .. " 'localhost:8080': ",
    } do
      local f = assert(io.open(dir .. "/c.lua", "w"))
      f:write("return { " .. text .. " }")
      f:close()
      local code, out = run({ "run", "examples/hello", "--config",
                              dir .. "/c.lua", "--listen",
                              "127.0.0.1:" .. port, "--admin", "off" }, 5)
      assert.equal(2, code, text .. ": " .. out)
      assert.equal(1, select(2, out:gsub("\n", "")), out)
      assert.equal(want, out:sub(1, #want), out)
    end
    os.execute("rm -rf " .. dir)
  end)

  it("exits 1 for a listen or admin address in use or not on this host"
     .. " (a restart may bind it; a bad one exits 2, above)", function()
    local s = server.start{ source = "local paygate = require 'paygate'\n"
      .. "paygate.route('GET', '/', function() return 200, 'hi' end)" }
    local free = require("paygate.core").free_port()
    for _, case in ipairs({
      { { "--listen", "127.0.0.1:" .. s.port, "--admin", "off" }, 1,
        "paygate: cannot listen on 127.0.0.1:" .. s.port
        .. ": Address already in use\n" },
      { { "--listen", "127.0.0.1:" .. free, "--admin",
          "127.0.0.1:" .. s.admin }, 1,
        "paygate: admin: cannot listen on 127.0.0.1:" .. s.admin
        .. ": Address already in use\n" },
      -- an address of no interface of this host: EADDRNOTAVAIL, as at a
      -- boot before the interface is up (TEST-NET-1, never assigned)
      { { "--listen", "192.0.2.1:" .. free, "--admin", "off" }, 1,
        "paygate: cannot listen on 192.0.2.1:" .. free
        .. ": Cannot assign requested address\n" },
    }) do
      local args = { "run", "examples/hello" }
      for _, a in ipairs(case[1]) do args[#args + 1] = a end
      local code, out = run(args, 10)
      assert.equal(case[2], code, out)
      assert.equal(case[3], out)
    end
    s:stop()
  end)

  it("exits 2, not a Lua panic, for a config whose table has a hostile metatable", function()
    local dir = server.tmpdir()
    local f = assert(io.open(dir .. "/c.lua", "w"))
    f:write("return setmetatable({ workers = 500 }, "
            .. "{ __index = function() error('boom') end })")
    f:close()
    local code, out = run({ "run", "examples/hello", "--config", dir .. "/c.lua",
                            "--admin", "off" })
    assert.equal(2, code)
    assert.not_matches("PANIC", out)
    assert.matches("workers", out)
    os.execute("rm -rf " .. dir)
  end)

  it("exits 2 for a config that never returns", function()
    local dir = server.tmpdir()
    local f = assert(io.open(dir .. "/c.lua", "w"))
    f:write("while true do end")
    f:close()
    local code, out = run({ "run", "examples/hello", "--config", dir .. "/c.lua",
                            "--admin", "off" }, 15)
    assert.equal(2, code)
    assert.matches("still running", out)
    os.execute("rm -rf " .. dir)
  end)

  it("exits 2 for TLS files that do not load", function()
    local code, out = run({ "run", "examples/hello", "--tls-cert", "/nonexistent.pem",
                            "--tls-key", "/nonexistent.key" })
    assert.equal(2, code)
    assert.matches("tls certificate /nonexistent.pem: No such file or "
                   .. "directory", out, 1, true)
    -- one of the pair, from the config file or a flag: named both ways
    -- (was: "--tls-cert and --tls-key go together" for a config's tls.cert)
    local dir = server.tmpdir()
    local f = assert(io.open(dir .. "/c.lua", "w"))
    f:write('return { tls = { cert = "' .. dir .. '/c.pem" } }')
    f:close()
    code, out = run({ "run", "examples/hello", "--config", dir .. "/c.lua" })
    assert.equal(2, code)
    assert.equal("paygate: tls.cert and tls.key (--tls-cert, --tls-key) go"
                 .. " together: give both for HTTPS, or neither\n", out)
    code, out = run({ "run", "examples/hello", "--tls-client-ca", "x.pem" })
    assert.equal(2, code)
    assert.equal("paygate: tls.client_ca (--tls-client-ca) and"
                 .. " tls.ecdsa_cert need tls.cert and tls.key (--tls-cert,"
                 .. " --tls-key)\n", out)
    -- the two files swapped: said in words, not as an OpenSSL code
    assert(os.execute("openssl req -x509 -newkey rsa:2048 -nodes -keyout "
      .. dir .. "/k.pem -out " .. dir .. "/c.pem -subj /CN=t -days 1 "
      .. "2>/dev/null"))
    code, out = run({ "run", "examples/hello", "--tls-cert", dir .. "/k.pem",
                      "--tls-key", dir .. "/c.pem" })
    assert.equal(2, code)
    assert.matches("a private key, not a certificate", out, 1, true)
    assert.is_nil(out:find("BEGIN", 1, true))
    code, out = run({ "run", "examples/hello", "--tls-cert", dir .. "/c.pem",
                      "--tls-key", dir .. "/c.pem" })
    assert.equal(2, code)
    assert.matches("a certificate, not a private key", out, 1, true)
    -- a key of another certificate (of its type), and a chain file whose
    -- leaf is not first: each said as such, not "cannot be loaded (key
    -- values mismatch)"
    assert(os.execute("openssl req -x509 -newkey rsa:2048 -nodes -keyout "
      .. dir .. "/k2.pem -out " .. dir .. "/c2.pem -subj /CN=t2 -days 1 "
      .. "2>/dev/null"))
    code, out = run({ "run", "examples/hello", "--tls-cert", dir .. "/c.pem",
                      "--tls-key", dir .. "/k2.pem" })
    assert.equal(2, code)
    assert.matches("tls key " .. dir .. "/k2.pem does not match certificate "
                   .. dir .. "/c.pem", out, 1, true)
    assert(os.execute(("cat %s/c2.pem %s/c.pem > %s/back.pem"):format(dir,
                      dir, dir)))
    code, out = run({ "run", "examples/hello", "--tls-cert",
                      dir .. "/back.pem", "--tls-key", dir .. "/k.pem" })
    assert.equal(2, code)
    assert.matches("the chain is out of order: the certificate of key "
                   .. dir .. "/k.pem is number 2", out, 1, true)
    -- a FIFO is refused, not opened (with no writer it would block the
    -- start for good); PEM text given for a path is not repeated
    assert(os.execute("mkfifo " .. dir .. "/fifo"))
    code, out = run({ "run", "examples/hello", "--tls-cert", dir .. "/c.pem",
                      "--tls-key", dir .. "/fifo" })
    assert.equal(2, code)
    assert.matches("not a regular file", out, 1, true)
    code, out = run({ "run", "examples/hello", "--tls-cert", dir .. "/c.pem",
                      "--tls-key", "-----BEGIN " .. "PRIVATE KEY-----\nMIIEvAIB" })
    assert.equal(2, code)
    assert.is_nil(out:find("MIIEvAIB", 1, true), out)
    os.execute("rm -rf " .. dir)
  end)

  it("exits 1 when the app fails to load at start, saying why", function()
    local s = server.start{ source = "error('database url missing')", wait = false }
    local code = s.proc:wait(15)
    assert.equal(1, code)
    assert.matches("database url missing", s:logs())
    os.execute("rm -rf " .. s.dir)
  end)

  it("reload refuses a pid file that names another process", function()
    local dir = server.tmpdir()
    local victim = proc.spawn({ "sleep", "30" })
    local f = assert(io.open(dir .. "/pid", "w"))
    f:write(victim.pid, "\n")
    f:close()
    local code, out = run({ "reload", "--pid-file", dir .. "/pid" })
    assert.equal(1, code)
    assert.matches("not a paygate master", out)
    assert.is_nil(victim:poll(), "the other process was signalled")
    victim:kill(proc.SIGKILL)
    victim:wait(5)
    f = assert(io.open(dir .. "/pid", "w"))
    f:write("999999999\n")
    f:close()
    code = run({ "reload", "--pid-file", dir .. "/pid" })
    assert.equal(1, code)
    os.execute("rm -rf " .. dir)
  end)

  -- A master that died under a parent that does not reap it is a zombie:
  -- its pid still answers kill(pid, 0), so reload took it for alive and
  -- waited its whole timeout (here 60 s) for an outcome that could never
  -- come. It now fails at once, saying so.
  it("reload fails at once on a master that is a zombie, before and while"
     .. " it waits", function()
    local dir = server.tmpdir()
    local pid_file = dir .. "/p.pid"
    local port = require("paygate.core").free_port()
    -- sh starts the master, then becomes `sleep`, which never reaps it
    local parent = proc.spawn({ "sh", "-c", '"$1" run examples/hello'
      .. ' --listen "$2" --workers 1 --admin off --pid-file "$3" >"$4" 2>&1'
      .. ' & exec sleep 120', "sh", PAYGATE_BIN, "127.0.0.1:" .. port,
      pid_file, dir .. "/log" })
    local master = tonumber(proc.wait_until(function()
      return proc.read(pid_file):match("^(%d+)")
    end, 20, "the master's pid file"))
    proc.wait_until(function()
      return proc.read(dir .. "/log"):find("serving", 1, true)
    end, 20, "the master serving")
    local function status(field)
      return proc.read("/proc/" .. master .. "/status")
        :match("\n" .. field .. ":%s*(%S+)")
    end
    -- stopped, it leaves the HUP pending: then it dies, unreaped
    proc.kill_pid(master, 19)                          -- SIGSTOP
    local reload = proc.spawn({ PAYGATE_BIN, "reload", "--pid-file",
      pid_file, "--timeout", "60" }, { log = dir .. "/reload.out" })
    proc.wait_until(function()
      local pending = status("ShdPnd")
      return pending and tonumber(pending, 16) % 2 == 1    -- SIGHUP's bit
    end, 20, "reload's SIGHUP pending at the master")
    proc.kill_pid(master, proc.SIGKILL)
    proc.wait_until(function() return status("State") == "Z" end, 20,
                    "the master a zombie")
    local code = reload:wait(10)
    if code == nil then reload:kill(proc.SIGKILL); reload:wait(2) end
    local out = proc.read(dir .. "/reload.out")
    assert.equal(1, code, out)
    assert.equal("paygate reload: pid " .. master .. " exited before the"
      .. " reload ended (a zombie: its parent has not reaped it)\n", out)
    -- and asked again, with the master a zombie from the start: nothing
    -- signalled (was: called "not a paygate master", its cmdline empty)
    local out2
    code, out2 = run({ "reload", "--pid-file", pid_file, "--timeout", "60" })
    assert.equal(1, code, out2)
    assert.equal("paygate reload: pid " .. master .. " from " .. pid_file
      .. " has exited (a zombie: its parent has not reaped it); nothing"
      .. " signalled\n", out2)
    parent:kill(proc.SIGKILL)             -- the zombie goes to init, reaped
    parent:wait(5)
    os.execute("rm -rf " .. dir)
  end)

  it("reload through a pid file the master did not write: signals, says"
     .. " the outcome is in the log, does not wait", function()
    local s = server.start{ source = "local paygate = require 'paygate'\n"
      .. "paygate.route('GET', '/', function() return 200, 'hi' end)" }
    local other = s.dir .. "/by-hand.pid"
    local f = assert(io.open(other, "w"))
    f:write(s.proc.pid, "\n")
    f:close()
    local t0 = os.time()
    local code, out = run({ "reload", "--pid-file", other }, 30)
    assert.equal(0, code, out)
    assert.matches("did not write " .. other .. " itself", out, 1, true)
    assert.is_true(os.time() - t0 < 10)        -- not the 90 s wait
    proc.wait_until(function()
      return s:logs():find("generation 2 serving", 1, true) ~= nil
    end, 20, "the reload in the server's log")
    -- through the master's own pid file it waits and reports
    code, out = run({ "reload", "--pid-file", s.dir .. "/paygate.pid" }, 30)
    assert.equal(0, code, out)
    assert.matches("done, generation 3", out, 1, true)
    s:stop()
    -- pid_file given in the config (not on the command line) is the
    -- master's own too: reload waits and reports
    local dir = server.tmpdir()
    local conf = dir .. "/c.lua"
    local f2 = assert(io.open(conf, "w"))
    f2:write(("return { pid_file = %q }\n"):format(dir .. "/c.pid"))
    f2:close()
    local port = require("paygate.core").free_port()
    local p = proc.spawn({ PAYGATE_BIN, "run", "examples/hello", "--listen",
      "127.0.0.1:" .. port, "--workers", "1", "--admin", "off", "--config",
      conf }, { log = dir .. "/log" })
    proc.wait_until(function()
      local fp = io.open(dir .. "/c.pid")
      if fp then fp:close() end
      return fp ~= nil
    end, 20, "the config's pid file")
    code, out = run({ "reload", "--pid-file", dir .. "/c.pid" }, 30)
    assert.equal(0, code, out)
    assert.matches("done, generation 2", out, 1, true)
    p:kill(15)                          -- TERM: a graceful stop
    p:wait(15)
    os.execute("rm -rf " .. dir)
  end)

  it("exec returns the script's exit status", function()
    local dir = server.tmpdir()
    local f = assert(io.open(dir .. "/s.lua", "w"))
    f:write("local paygate = require 'paygate'; paygate.sleep(0.01); os.exit(3)")
    f:close()
    assert.equal(3, (run({ "exec", dir .. "/s.lua" })))
    -- a status a shell would read as 0 is a failure
    f = assert(io.open(dir .. "/s.lua", "w"))
    f:write("return 256")
    f:close()
    assert.equal(1, (run({ "exec", dir .. "/s.lua" })))
    f = assert(io.open(dir .. "/s.lua", "w"))
    f:write("error('raised')")
    f:close()
    local code, out = run({ "exec", dir .. "/s.lua" })
    assert.equal(1, code)
    assert.matches("raised", out)
    f = assert(io.open(dir .. "/s.lua", "w"))
    f:write("print(select('#', ...), arg[1]) return 0")
    f:close()
    code, out = run({ "exec", dir .. "/s.lua", "a1", "b2" })
    assert.equal(0, code)
    assert.matches("2\ta1", out)
    os.execute("rm -rf " .. dir)
  end)
  it("exits 1, saying so, when its output cannot be written", function()
    -- `paygate version > file` on a full disk, or with stdout closed: the
    -- output is lost, and exit 0 would say it was written
    local dir = server.tmpdir()
    local f = assert(io.open(dir .. "/s.lua", "w"))
    f:write("print(('x'):rep(100)) return 0")
    f:close()
    local bin = "'" .. PAYGATE_BIN .. "'"
    for _, case in ipairs({
      { bin .. " version >/dev/full", "paygate: cannot write the output: "
                                      .. "No space left on device" },
      { bin .. " --help >/dev/full", "No space left on device" },
      { bin .. " run --help >&-", "paygate: cannot write the output: Bad "
                                  .. "file descriptor" },
      { bin .. " exec " .. dir .. "/s.lua >/dev/full", "No space left" },
    }) do
      local p = assert(io.popen("exec 3>&1; (" .. case[1] .. ") 2>&3; "
                                .. "echo \"rc=$?\""))
      local out = p:read("*a")
      p:close()
      assert.matches("rc=1\n$", out, nil)
      assert.matches(case[2], out, 1, true)
    end
    -- written: 0 as before
    local p = assert(io.popen(bin .. " version >/dev/null; echo rc=$?"))
    assert.equal("rc=0\n", p:read("*a"))
    p:close()
    os.execute("rm -rf " .. dir)
  end)
end)
