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
