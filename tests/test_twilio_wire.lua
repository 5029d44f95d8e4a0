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
  --   ...0144: queue_time said 0.5 s, placed 2.3 s in; the ring timeout
  --     (2.5 s) finds it 0.2 s into its ring, answered 0.8 s into it.
  --   ...0145: still queued at the ring timeout (2 s), placed 3.7 s in, just
  --     before the ring timeout armed again (4 s); answered 0.8 s into it.
  local env = kit.start({
    twilio = {
      behaviour = function(call)
        if call.params.To:match("0142$") then
          return { queue_ms = 1500, ring_ms = 1200 }
        elseif call.params.To:match("0144$") then
          return { queue_ms = 2300, queue_time_ms = 500, ring_ms = 800 }
        elseif call.params.To:match("0145$") then
          return { queue_ms = 3700, queue_time_ms = 0, ring_ms = 800 }
        end
        return { queue_ms = 2600, queue_time_ms = 0 }
      end,
    },
    realtime = { script = quick_report },
    config = { retry = { maxAttempts = 2, initialDelayMs = 50 }, call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
  })
  local ids = {}
  for i = 2, 5 do
    ids[i - 1] = env:create({ to = "+1415555014" .. i, prompt = "Say hello." })
  end
  local got, want = {}, {}
  for i, id in ipairs(ids) do
    local call = env:wait_final(id, 15000)
    got[i] = { call.to, call.status, #call.attempts, call.report and call.report.outcome }
    want[i] = { call.to, "completed", 1, "success" }
  end
  T.eq(got, want, "placed from the queue, answered, not canceled and dialed again")
  T.eq(#env.tw.calls, 4)
  for _, tw in ipairs(env.tw.calls) do
    T.eq(tw.updates[1] and tw.updates[1].params.Status, "completed", "hung up after the report, never canceled")
    if tw.params.To:match("0143$") then
      T.ge(tw.gets or 0, 1, "Twilio's API was asked at the ring timeout")
    end
  end
end, { timeout = 30000 })

T.run()
