-- paygate.suggest: the name a misspelt key meant, for "did you mean".
local suggest = require "paygate.suggest"

local function set(...)
  local t = {}
  for _, k in ipairs({ ... }) do t[k] = true end
  return t
end

-- retention.table's keys: a mix of short and '_'-joined names
local TABLE = set("table", "column", "max_age", "where", "unit", "key",
                  "name")

describe("suggest.nearest", function()
  it("names the key one edit or two away", function()
    for key, want in pairs({ nam = "name", colum = "column",
                             max_ag = "max_age", tabel = "table",
                             maxage = "max_age", wher = "where",
                             nmae = "name" }) do
      assert.equal(want, suggest.nearest(key, TABLE), key)
    end
    -- two edits of a three-letter key are too many
    assert.is_nil(suggest.nearest("kye", TABLE))
    -- `most` bounds the edits
    assert.is_nil(suggest.nearest("tabel", TABLE, 1))
    assert.equal("table", suggest.nearest("tabl", TABLE, 1))
    -- ties: the first in byte order
    assert.equal("bat", suggest.nearest("cat", set("rat", "bat")))
  end)

  it("names the key a misspelt one is whole words of, before an"
     .. " unrelated key two edits away", function()
    -- age: two edits from name, but a word of max_age (before: name)
    assert.equal("max_age", suggest.nearest("age", TABLE))
    assert.equal("outbox_days",
                 suggest.nearest("days", set("outbox_days", "batch",
                                             "delay")))
    assert.equal("outbox_lease_ttl",
                 suggest.nearest("lease_ttl", set("outbox_lease_ttl",
                                                  "lease", "ttl_s")))
    -- several: the shortest, then byte order
    assert.equal("payment_ttl",
                 suggest.nearest("ttl", set("session_ttl", "payment_ttl",
                                            "idempotency_ttl")))
    -- a plain slip (one edit) stays first
    assert.equal("limit", suggest.nearest("limits", set("limit",
                                                        "rate_limits")))
    -- a part of a word is no word
    assert.is_nil(suggest.nearest("ag", TABLE))
    assert.is_nil(suggest.nearest("pay", set("payment_ttl")))
  end)

  it("suggests nothing for a short word changed wholesale", function()
    -- two edits of three letters, one of two: another word, not a slip
    -- (before: age -> name, xy -> db, id -> ip)
    assert.is_nil(suggest.nearest("age", set("name", "page_size")))
    assert.is_nil(suggest.nearest("xy", set("db", "ip")))
    assert.is_nil(suggest.nearest("id", set("ip", "db")))
    assert.is_nil(suggest.nearest("speed", set("outbox_days", "batch",
                                               "pause", "delay")))
    assert.is_nil(suggest.nearest("", set("a", "b")))
    assert.is_nil(suggest.nearest("x", set("a", "b")))
  end)
end)

describe("suggest.hint", function()
  it("says the name meant, or nothing", function()
    assert.equal(" (did you mean max_age?)", suggest.hint("age", TABLE))
    assert.equal("", suggest.hint("qqqq", TABLE))
    assert.equal("", suggest.hint(5, TABLE))
    assert.equal("", suggest.hint(("a"):rep(65), TABLE))
  end)
end)
