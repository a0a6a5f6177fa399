-- sim/control_notify.lua: the control routes of notifications and bills
-- (registered by notify.routes, under the same rules as sim.control:
-- no signature, loopback callers only, off with control = false).
--
--   GET  /sim/notifications[?out_trade_no=&out_refund_no=&event_type=
--                            &mchid=&id=&state=]
--        -> [{ id, event_type, state, attempts = [{ n, at, status, error,
--              latency, ... }], ... }] in the order they were made
--   POST /sim/bills/close { "bill_date": "YYYY-MM-DD" }
--        -> { bill_date, cutoff }: that day's bills are ready now
local control = require "sim.control"
local notify = require "sim.notify"
local bills = require "sim.bills"

local _M = {}

function _M.routes(ctx)
  local answer = control.answer

  control.route("GET", "/sim/notifications", function(req)
    local q = req:query()
    local list, err = notify.list(ctx.db, {
      out_trade_no = q.out_trade_no, out_refund_no = q.out_refund_no,
      event_type = q.event_type, mchid = q.mchid, id = q.id, state = q.state,
    })
    if not list then
      return answer(500, { code = "SYSTEM_ERROR", message = tostring(err) })
    end
    return answer(200, notify.encode(list))
  end)

  control.route("POST", "/sim/bills/close", function(req)
    local b, why = control.body_of(req)
    if b and type(b.bill_date) ~= "string" then
      why = 'bill_date must be a string "YYYY-MM-DD"'
    end
    if why then return answer(400, { code = "PARAM_ERROR", message = why }) end
    local cut, err, status = bills.close(ctx, b.bill_date)
    if not cut then
      -- (the store failing is not the caller's date)
      return answer(status, { code = status == 500 and "SYSTEM_ERROR"
                                or "PARAM_ERROR", message = tostring(err) })
    end
    return answer(200, { bill_date = b.bill_date, cutoff = cut })
  end)
end

return _M
