-- model_spec's model (model_support.lua) with the gateway's reconcile
-- runners at work on a short schedule, and the operations only they can
-- settle (model_support.lua's header: option `reconcile`):
--   - a payment paid at WeChat whose notification is dropped (the
--     simulator's never_sent) ends paid by the payment checks, with one
--     transition to paid and one payment.paid event;
--   - a refund settled (SUCCESS, ABNORMAL, CLOSED; an abnormal one
--     applied for, then SUCCESS or CLOSED) whose notification is dropped
--     ends settled by the refund checks;
--   - an `unknown` payment (a switch whose prepay answer does not verify)
--     ends `paying` (WeChat: NOTPAY) or `paid` (paid there, its
--     notification dropped) by the checks; an `unknown` refund (its answer
--     lost) ends `processing`;
--   - a failed payment paid at WeChat before the checks closed its
--     attempt there, the notification dropped: found by the checks' close,
--     paid late, refunded;
--   - a payment past its expiry is closed at WeChat by the checks (their
--     first close failing too; the merchant closing it at the same
--     moment; a switch then refused), then here, and a payment on it is
--     refused there; paid while the checks' close is held (or failed) at
--     WeChat, it ends paid, once, not late;
-- and every operation of model_spec besides, with the checks running
-- under them: before each step's check the model waits (a condition with
-- a deadline) until nothing is left for the checks to apply, then checks
-- what they made of it. The final checks are model_spec's (one event per
-- transition, money never dropped, chains verify, replays identical; a
-- closed payment has no attempt still payable at WeChat).
--
-- Two gateways, one after the other: a merchant of its own, and a
-- service provider's sub-merchant (partner mode: sp_mchid / sub_mchid).
-- The seed is printed; MODEL_SEED=<seed> runs it again (the partner run
-- takes seed + 1), MODEL_N payments per run (10 unless given),
-- MODEL_TRACE=<file> the steps (<file>-merchant and <file>-partner).
local testing = require "paygate.testing"
local support = dofile("examples/gateway/spec/core_support.lua")
local model = dofile("examples/gateway/spec/model_support.lua")

local seeded = dofile("examples/gateway/spec/seeded.lua")
local SEED = seeded.seed("MODEL_SEED", "model_reconcile_spec")
local N = tonumber(os.getenv("MODEL_N")) or 10
print("model_reconcile_spec: MODEL_N=" .. N)

-- checks every second at most: check_after 1 s, then 0.5 s doubling to
-- a ceiling of 1 s; the runners' rounds every 0.1 s. The merchant's
-- client deadline is short: the checks first ask about an attempt
-- closed here (not confirmed by WeChat) that long + 5 s after.
local GATEWAY = { reconcile = { check_after = 1, first = 0.5, ceiling = 1,
                                interval = 0.1, bill = false } }
local MERCHANT = { timeout = 3, deadline = 6 }

for _, mode in ipairs({ "merchant", "partner" }) do
  local partner = mode == "partner"
  local seed = partner and SEED + 1 or SEED
  describe("gateway model with reconciliation, " .. mode .. " (seed "
           .. seed .. ")", function()
    local sim, gw
    setup(function()
      sim = testing.simulator{ time_scale = 100, partner = partner }
      gw = support.start(sim, { workers = 2, gateway = GATEWAY,
                                merchant = MERCHANT, partner = partner })
    end)

    teardown(function()
      if gw then gw:stop() end
      testing.stop_all()
    end)

    if not partner then
      -- (rare in the random runs: a payment fails seldom, and the checks
      -- close its attempt at WeChat deadline + 5 s later)
      it("a failed payment paid at WeChat before the checks closed its"
         .. " attempt, the notification lost: found by them, late,"
         .. " refunded", function()
        local p = gw:create{ amount = 5 }
        sim:control("POST", "/sim/transactions/" .. p.out_trade_no
                    .. "/fail")
        gw:wait_state(p.id, "failed", 20)           -- by the checks
        sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
        sim:pay(p.out_trade_no)
        local got = gw:wait_state(p.id, "paid", 30)
        assert.is_true(got.late)
        local rf
        testing.wait_until(function()
          rf = gw:get(p.id).refunds[1]
          return rf and rf.state == "processing"
        end, 20, "the late payment's refund")
        assert.same({ "late_payment", 5 }, { rf.kind, rf.amount })
        assert.equal("PROCESSING", assert(sim:client()
          :query_refund(rf.out_refund_no)).status)
        local ev = assert(gw.db:query("SELECT type FROM paygate_outbox"
          .. " WHERE subject = $1 ORDER BY id", { p.id }))
        local types = {}
        for _, e in ipairs(ev) do types[#types + 1] = e.type end
        assert.same({ "payment.paying", "payment.failed", "payment.paid",
                      "payment.late_paid" }, types)
      end)
    end

    it("keeps every invariant with the checks settling what notifications"
       .. " do not", function()
      model.new{ sim = sim, gw = gw, seed = seed,
                 wx = sim:client(partner and sim.partner or nil),
                 name = "model_reconcile_spec (" .. mode .. ")",
                 reconcile = true, trace = os.getenv("MODEL_TRACE")
                   and os.getenv("MODEL_TRACE") .. "-" .. mode,
                 sub_mchid = partner and sim.partner.sub_mchid or nil }
        .run(N)
    end)
  end)
end
