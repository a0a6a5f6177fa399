-- examples/gateway: the console in a real browser. Headless Chromium
-- (Debian's `chromium`) loads the overview and a payment page from a
-- running gateway + simulator; the DOM it renders holds the expected
-- figures (and a hostile description as text, no script), and a
-- screenshot of each page is written under the build folder
-- (build/console-screenshots/).
local testing = require "paygate.testing"
local server = require "paygate.testing.server"
local core = dofile("examples/gateway/spec/core_support.lua")

local HOSTILE = "<script>document.title='pwned'</script>"

local function chromium()
  for _, p in ipairs({ "/usr/bin/chromium", "/usr/bin/chromium-browser" }) do
    local f = io.open(p, "rb")
    if f then
      f:close()
      return p
    end
  end
  return nil
end

local BIN = chromium()
if not BIN then
  describe("gateway console in a browser", function()
    pending("chromium is not installed (scripts/deps installs it)")
  end)
  return
end

describe("gateway console in a browser", function()
  local sim, gw, profile, shots

  setup(function()
    sim, gw = core.start_loopback()
    profile = server.tmpdir()
    local bin = os.getenv("PAYGATE_BIN") or "build/paygate"
    shots = (bin:match("^(.*)/[^/]*$") or ".") .. "/console-screenshots"
    os.execute("mkdir -p '" .. shots .. "'")
  end)

  teardown(function()
    if gw then gw:stop() end
    if profile then server.rmdir(profile) end
    testing.stop_all()
  end)

  -- Chromium's flags: headless, as root without its sandbox, its own
  -- profile folder, no network beyond the loopback URL it is given.
  local function browse(args, url, height)
    local argv = { BIN, "--headless=new", "--no-sandbox", "--disable-gpu",
                   "--user-data-dir=" .. profile, "--no-first-run",
                   "--disable-extensions", "--disable-background-networking",
                   "--window-size=1280," .. (height or 1000) }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    argv[#argv + 1] = url
    local code, out = testing.proc.run(argv, { timeout = 90 })
    assert(code == 0, "chromium: " .. tostring(code) .. " " .. tostring(out))
    return out
  end

  local function dom(path)
    return browse({ "--dump-dom" }, gw.srv:url(path))
  end

  local function screenshot(path, name, height)
    local file = shots .. "/" .. name .. ".png"
    os.remove(file)
    browse({ "--screenshot=" .. file, "--hide-scrollbars" }, gw.srv:url(path),
           height)
    local f = assert(io.open(file, "rb"), "no screenshot " .. file)
    local head = f:read(8)
    f:close()
    assert.equal("\137PNG\r\n\26\n", head)
  end

  it("renders the overview and a payment page with their figures",
     function()
    local paid = gw:create{ description = HOSTILE, amount = 1234 }
    -- its first notification is forged-looking (refused), the retry is not
    sim:fault{ endpoint = "notify", kind = "bad_signature", count = 1 }
    sim:pay(paid.out_trade_no)
    testing.wait_until(function()
      local r = assert(gw.db:query("SELECT state FROM gw_payments WHERE id"
        .. " = $1", { paid.id }))
      return r[1].state == "paid"
    end, 10, "the payment to be paid")
    gw:create{ description = "still open" }

    local overview = dom("/console")
    assert.matches("<h1>Overview</h1>", overview, 1, true)
    assert.matches('href="/console/payments%?state=paid&amp;since=%d+">'
                   .. 'paid</a></td>'
                   .. "<td>1</td>", overview)
    assert.matches('href="/console/payments%?state=paying&amp;since=%d+">'
                   .. 'paying</a></td>'
                   .. "<td>1</td>", overview)
    assert.matches("<svg", overview, 1, true)
    assert.matches("5 s window", overview, 1, true)
    assert.not_matches("pwned", overview, 1, true)
    screenshot("/console", "overview")

    local page = dom("/console/payments/" .. paid.id)
    assert.matches("<title>Payment " .. paid.id, page, 1, true)
    -- the description is text in the DOM, not a script element
    assert.matches("&lt;script&gt;document.title='pwned'&lt;/script&gt;",
                   page, 1, true)
    assert.not_matches("<script", page, 1, true)
    assert.matches("<td>12.34 CNY</td>", page, 1, true)
    assert.matches("hash chain verified", page, 1, true)
    assert.matches("payment.succeeded", page, 1, true)
    assert.matches("TRANSACTION.SUCCESS", page, 1, true)
    assert.matches("<td>bad_signature</td>", page, 1, true)
    assert.matches("POST /v3/pay/transactions/native", page, 1, true)
    screenshot("/console/payments/" .. paid.id, "payment", 1900)
  end)
end)
