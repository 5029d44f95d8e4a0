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

T.test("calls waiting in Twilio's calls-per-second queue are not canceled by the ring timeout: they ring, and talk", function()
  -- Twilio places calls created beyond the account's calls per second (1 by
  -- default) from a queue, at that rate: a burst of calls waits there, its
  -- REST status queued. The ring timeout is 1 + 1 s.
  --   ...0142: placed 1.5 s in, as the create answer's queue_time says; the
  --     callee answers 1.2 s into the ring, past the 2 s from the dial.
  --   ...0143: placed 2.6 s in, past the ring timeout; queue_time said 0 (it
  --     is an estimate: the account's other calls went first).
  local env = kit.start({
    twilio = {
      behaviour = function(call)
        if call.params.To:match("0142$") then
          return { queue_ms = 1500, ring_ms = 1200 }
        end
        return { queue_ms = 2600, queue_time_ms = 0 }
      end,
    },
    realtime = { script = quick_report },
    config = { retry = { maxAttempts = 2, initialDelayMs = 50 }, call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
  })
  local estimated = env:create({ to = "+14155550142", prompt = "Say hello." })
  local late = env:create({ to = "+14155550143", prompt = "Say hello." })
  for _, id in ipairs({ estimated, late }) do
    local call = env:wait_final(id, 15000)
    T.eq({ call.status, #call.attempts, call.report and call.report.outcome }, { "completed", 1, "success" },
      "placed from the queue, answered, not canceled and dialed again")
  end
  T.eq(#env.tw.calls, 2)
  for _, tw in ipairs(env.tw.calls) do
    T.eq(tw.updates[1] and tw.updates[1].params.Status, "completed", "hung up after the report, never canceled")
    if tw.params.To:match("0143$") then
      T.ge(tw.gets or 0, 1, "Twilio's API was asked at the ring timeout")
    end
  end
end, { timeout = 30000 })

T.run()
