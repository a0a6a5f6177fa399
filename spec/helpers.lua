-- spec/helpers.lua: loaded by busted before every spec file (see the
-- ctest entries in CMakeLists.txt). Specs run inside `paygate exec`, so
-- they may call yielding functions (paygate.sleep, http, databases).
package.path = "spec/?.lua;" .. package.path

-- A spec must never hang the suite: give up on a test after this long.
local paygate = require "paygate"
assert(require("paygate.core").in_coroutine(),
       "run specs with: build/paygate exec $(command -v busted) ...")
_G.PAYGATE_BIN = os.getenv("PAYGATE_BIN") or "build/paygate"
return paygate
