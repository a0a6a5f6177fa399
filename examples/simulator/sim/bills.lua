-- sim.bills: trade and fund-flow bills (owned by simB; this file is the
-- interface app.lua calls, with a placeholder body).
--
-- bills.routes(ctx) registers, through ctx.api.route (sim.api: the request
-- is authenticated, recorded and answered the simulator's way):
--   GET /v3/bill/tradebill?bill_date=&bill_type=&tar_type=[&sub_mchid=]
--   GET /v3/bill/fundflowbill?bill_date=&account_type=&tar_type=
--   GET /v3/billdownload/file?token=...   (raw file, unsigned: raw = true)
-- ctx = { db, config, identity, faults, api = sim.api }.
local _M = {}

function _M.routes(ctx) return true end

return _M
