-- An app stopped with a live call in a process that goes on (as an embedder
-- would): the test running this checks that nothing of the app runs after
-- app:stop() (no error from a timer writing to the closed store). It runs
-- the test kit in this process: fake Twilio and model, the app in-process.
local T = require "testing"
local kit = require "callkit"
local timer = require "callagent.timer"

T.test("app:stop() with a live call, then the process goes on", function()
  -- The engine's waits for a final status after the stop's hang-up (10 s)
  -- and after the conversation's end (5 s) shortened to 1.5 s each.
  local calls = require "callagent.calls"
  T.eq({ T.shorten(calls, "HANGUP_WAIT_MS", 1500), T.shorten(calls, "BRIDGE_END_WAIT_MS", 1500) }, { 10000, 5000 },
    "the product's waits")
  local env = kit.start({
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 10000, text = "A long talk." })
      end,
    },
  })
  local id = env:create({ to = "+14155550111", prompt = "Explain." })
  env:wait(id, function(c)
    return c.status == "in_progress"
  end, 10000, "in progress")
  timer.sleep(1500)
  env.app:stop()
  timer.sleep(3000) -- past the two 1.5 s waits for a final status
  print("still running")
end, { timeout = 40000 })

T.run()
