-- Twilio as it behaves on the wire where the fake's defaults are kinder:
-- each test has the fake do what real Twilio does (tests/fakes/twilio.lua
-- behaviours) and checks that callagent copes.
local T = require "testing"
local kit = require "callkit"

-- The callee reports at once, so an answered attempt ends quickly.
local function quick_report(session)
  assert(session:wait_event("response.create", 5000))
  session:report_and_goodbye({ summary = "Reached them.", outcome = "success" }, { ms = 100, text = "Bye." })
end

T.test("a call waiting in Twilio's calls-per-second queue past the ring timeout is not canceled: it rings, and talks", function()
  -- Twilio places calls created beyond the account's calls per second (1 by
  -- default) from a queue, at that rate: a burst of calls waits there, its
  -- REST status queued. Its answer's queue_time is an estimate, here 0
  -- (the account's other calls went first): the ring timeout (1 + 1 s)
  -- comes before the callee's phone has rung at all.
  local env = kit.start({
    twilio = { behaviour = { queue_ms = 2600, queue_time_ms = 0 } },
    realtime = { script = quick_report },
    config = { retry = { maxAttempts = 2, initialDelayMs = 50 }, call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
  })
  local id = env:create({ to = "+14155550140", prompt = "Say hello." })
  local call = env:wait_final(id, 15000)
  T.eq({ call.status, #call.attempts }, { "completed", 1 }, "placed from the queue, answered, not canceled and dialed again")
  T.eq(call.report and call.report.outcome, "success")
  local tw = env.tw.calls[1]
  T.eq(#env.tw.calls, 1)
  T.ge(tw.gets or 0, 1, "Twilio's API was asked at the ring timeout")
  for _, u in ipairs(tw.updates) do
    T.ne(u.params.Status, "canceled", "no cancel of the queued call")
  end
end, { timeout = 30000 })
T.test("a call Twilio places from its queue just before the ring timeout rings its whole ring time (queue_time), not canceled at once", function()
  -- The create answer's queue_time says how long the call will wait in
  -- the queue: here 1.5 s of the ring timeout's 2 s (1 + 1). Placed then,
  -- it rings, and the callee answers 1.2 s into the ring.
  local env = kit.start({
    twilio = { behaviour = { queue_ms = 1500, ring_ms = 1200 } },
    realtime = { script = quick_report },
    config = { retry = { maxAttempts = 1 }, call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
  })
  local id = env:create({ to = "+14155550141", prompt = "Say hello." })
  local call = env:wait_final(id, 15000)
  T.eq({ call.status, #call.attempts }, { "completed", 1 }, "answered, not canceled after a part of its ring")
  local tw = env.tw.calls[1]
  T.eq(tw.updates[1] and tw.updates[1].params.Status, "completed", "hung up after the report, never canceled")
end, { timeout = 30000 })

T.run()
