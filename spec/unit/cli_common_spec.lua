-- paygate.cli.common.apiv3_key_problem: what is wrong with an APIv3 key,
-- never repeating it.
local common = require "paygate.cli.common"

describe("cli common.apiv3_key_problem", function()
  it("a key of 32 characters is no problem", function()
    assert.is_nil(common.apiv3_key_problem(("k"):rep(32)))
  end)

  it("a missing key is missing", function()
    assert.equal("the APIv3 key is missing", (common.apiv3_key_problem(nil)))
  end)

  it("a number (written without quotes) is named a number, not missing,"
     .. " and not repeated", function()
    local cause, fix = common.apiv3_key_problem(12345678901234567890)
    assert.matches("is a number, not a string", cause, 1, true)
    assert.matches("in quotes", fix, 1, true)
    assert.is_nil((cause .. fix):find("1234", 1, true))
  end)
end)

describe("what a message may print of a path or a variable's name", function()
  local credentials = require "paygate.credentials"
  local KEY = "hOC69FJ5aBcDeFgHiJkLmNoPqRsTuVwX"    -- an APIv3 key's shape

  it("common.shown hides key material, keeps paths", function()
    for _, v in ipairs({ KEY, "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIB",
                         "-----BEGIN PRIVATE KEY-----" }) do
      assert.matches("not shown", common.shown(v), 1, true)
    end
    for _, v in ipairs({ "/etc/paygate/apiv3.key", "apiclient_key.pem",
      "/var/lib/paygate/5F1C72E2A8931B72A2E13AF8DEE92471EB397115.pem" }) do
      assert.equal(v, common.shown(v))
    end
  end)

  it("credentials.shown_name names variables and paths, never a secret",
     function()
    assert.equal("PAYGATE_KEK", credentials.shown_name("PAYGATE_KEK"))
    assert.equal("/etc/paygate/kek", credentials.shown_name("/etc/paygate/kek"))
    for _, v in ipairs({ KEY, KEY:upper(), "s3cr3t-pa55", "a\nb", "", 5 }) do
      assert.is_nil(credentials.shown_name(v), tostring(v))
    end
    local _, err = credentials.read_kek{ kek_env = KEY }
    assert.is_nil(err.message:find(KEY, 1, true))
    _, err = credentials.read_kek{ kek_file = KEY }
    assert.is_nil(err.message:find(KEY, 1, true))
  end)
end)

describe("redact.url", function()
  local redact = require("paygate.redact").url

  it("is what paygate.credentials gives as redact_url and shown_name, and"
     .. " needs no etcd client", function()
    assert.equal(redact, require("paygate.credentials").redact_url)
    assert.equal(require("paygate.redact").name,
                 require("paygate.credentials").shown_name)
    -- (paygate audit prints store URLs: it used to load the etcd client
    -- for that alone)
    local script = os.tmpname()
    local f = assert(io.open(script, "w"))
    -- (required bare, the command only prints its usage, to stderr)
    f:write('pcall(require, "paygate.cli.audit")\n'
            .. 'io.write(tostring(package.loaded["paygate.etcd"] ~= nil))\n')
    f:close()
    local out = require("spec.support.servers").read_cmd(
      (os.getenv("PAYGATE_BIN") or "build/paygate") .. " exec " .. script
      .. " 2>/dev/null")
    os.remove(script)
    assert.equal("false", out)
  end)

  it("drops the password wherever the URL parsers would find it", function()
    -- the user info runs to the last @ ahead of the query, as
    -- paygate.redis and paygate.sql read it
    local cases = {
      { "redis://:ab/Cd+Slash9@127.0.0.1:26390", "redis://127.0.0.1:26390" },
      { "redis://:R3d@Secret@h:1/0", "redis://h:1/0" },
      { "redis://secret@h", "redis://h" },
      { "redis-sentinel://pw@a:1,b:2/m", "redis-sentinel://a:1,b:2/m" },
      { "postgres://gateway:Pg/Slash7@h:5432/db?pool=4",
        "postgres://gateway@h:5432/db?pool=4" },
      { "postgres://gw:Wr@ngPw@h/db", "postgres://gw@h/db" },
      { "postgres://gw@h/db", "postgres://gw@h/db" },
      { "postgres://h/db?password=xx&pool=2",
        "postgres://h/db?password=***&pool=2" },
      { "sqlite:var/x.db", "sqlite:var/x.db" },
      -- a "?" in the password (no "=" before its "@"): user info, not a
      -- query
      { "redis://Pa?ss@h:1/0", "redis://h:1/0" },
      { "redis://:Pa?s?s@h:1/0?timeout=2", "redis://h:1/0?timeout=2" },
      { "postgres://gw:Pa?ss@h/db?pool=4", "postgres://gw@h/db?pool=4" },
      -- an "@" in a query's value stays the query's
      { "postgres://h/db?application_name=me@x",
        "postgres://h/db?application_name=me@x" },
      { "redis://h:1?password=p@ss", "redis://h:1?password=***" },
      -- every option named *password
      { "redis-sentinel://a:1/m?sentinel_password=sp&db=1",
        "redis-sentinel://a:1/m?sentinel_password=***&db=1" },
      { "postgres://h/db?sslmode=require&sslpassword=kp",
        "postgres://h/db?sslmode=require&sslpassword=***" },
    }
    for _, c in ipairs(cases) do assert.equal(c[2], redact(c[1])) end
  end)
end)

-- common.files: what the CLI reads as key or certificate files when given
-- a folder (paygate certs, verify --keyring / --certificate).
describe("common.files", function()
  local proc = require "paygate.testing.proc"
  local dir

  before_each(function()
    dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -m 755 " .. dir) == 0)
  end)

  after_each(function()
    os.execute("chmod -R u+rwx " .. dir .. " 2>/dev/null; rm -rf " .. dir
               .. " " .. dir .. ".lua")
  end)

  -- the path of each of common.files(d)'s names, relative to d
  local function names(list)
    local out = {}
    for i, f in ipairs(list) do out[i] = f:sub(#dir + 2) end
    return out
  end

  -- a FIFO, a socket and a folder are no files, for root as for anyone:
  -- they were taken for files (a FIFO's read then waited for a writer)
  it("takes a folder's regular files and links to them, passing over"
     .. " folders, FIFOs and sockets", function()
    proc.write(dir .. "/a.pem", "x")
    assert(os.execute(("mkdir %s/sub && mkfifo %s/fifo && ln -s a.pem"
      .. " %s/link.pem && ln -s missing.pem %s/dangling.pem"):format(
      dir, dir, dir, dir)) == 0)
    assert.equal(0, (proc.run({ "python3", "-c", "import socket, sys;"
      .. " socket.socket(socket.AF_UNIX).bind(sys.argv[1])",
      dir .. "/sock" })))
    -- a dangling link is kept: reading it says why
    assert.same({ "a.pem", "dangling.pem", "link.pem" },
                names(assert(common.files(dir))))
    assert.same({ dir .. "/a.pem" }, common.files(dir .. "/a.pem"))
  end)

  -- a folder inside that cannot be opened (EACCES) was taken for a file,
  -- and reading it failed the whole command. Root opens any folder: then
  -- the check runs as nobody (setpriv), or is left pending, saying why.
  it("passes over a folder inside that it cannot open", function()
    proc.write(dir .. "/a.pem", "x")
    assert(os.execute(("mkdir -m 000 %s/locked"):format(dir)) == 0)
    local script = dir .. ".lua"           -- beside the folder, not in it
    proc.write(script, 'local common = require "paygate.cli.common"\n'
      .. 'local t, why = common.files(arg[1])\n'
      .. 'print("FILES " .. (t and table.concat(t, ",") or "nil " .. why))\n')
    local argv = { PAYGATE_BIN, "exec", script, dir }
    local _, uid = proc.run({ "id", "-u" })
    if uid:match("^0%s") then
      if os.execute("command -v setpriv >/dev/null") ~= 0 then
        pending("running as root without setpriv: root opens a mode-000"
                .. " folder, so there is no EACCES to see")
        return
      end
      table.insert(argv, 1, "setpriv")
      table.insert(argv, 2, "--reuid=65534")
      table.insert(argv, 3, "--regid=65534")
      table.insert(argv, 4, "--clear-groups")
    end
    local code, out = proc.run(argv, { timeout = 30 })
    assert.equal(0, code, out)
    assert.equal("FILES " .. dir .. "/a.pem", out:match("FILES [^\n]*"), out)
  end)
end)
