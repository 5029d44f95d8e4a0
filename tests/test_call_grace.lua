-- The ring timeout's grace wait (call.statusGraceSec) when the vendor
-- refuses the cancel of a ring: a callee who answers that call afterwards,
-- across a restart, through a late cancel's answer, or while a cancel is
-- on its way to a vendor whose hang-up ends an answered call (Telnyx).
local T = require "testing"
local kit = require "callkit"
local fake_telnyx = require "fakes.telnyx"

local TELNYX_KEY = "KEY0123456789ABCDEF_telnyx-grace-key"
local CONNECTION = "1494404757140276705"

-- The callee reports at once, so an answered attempt ends quickly.
local function quick_report(session)
  assert(session:wait_event("response.create", 5000))
  session:report_and_goodbye({ summary = "Reached them.", outcome = "success" }, { ms = 100, text = "Bye." })
end

local NOT_DIALED_AGAIN = "^not dialed again: the callee answered attempt 1's call after it had ended here %(ring timeout%)"

T.test("a restart after the ring timeout gave up on a ring Twilio would not cancel: the callee who answers it drops the retry, and the cancel is asked again", function()
  -- Twilio refuses every cancel. The ring timeout (1 + 1 s) ends attempt 1
  -- no_answer 1 s after its refused cancel, and callagent restarts. The
  -- callee then answers that call (its answered callback lost): its voice
  -- webhook reaches the new process. Before, the refused cancel was known
  -- only to the process that stopped: the webhook got <Hangup/>, and the
  -- retry rang the callee again.
  local first = { ring_ms = 3600, lost_callbacks = { answered = true }, update_fail = 503 }
  local n = 0
  local env = kit.start({
    twilio = { behaviour = function()
      n = n + 1
      return n == 1 and first or "busy"
    end },
    config = { server = { port = T.free_port() }, retry = { maxAttempts = 2, initialDelayMs = 2500 },
      call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
  })
  local id = env:create({ to = "+14155550201", prompt = "Say hello." })
  local rec = env:wait(id, function(r)
    return r.status == "queued" and r.attempt == 1
  end, 6000, "the grace wait's end of attempt 1")
  T.eq({ rec.attempts[1].status, rec.attempts[1].reason }, { "no_answer", "ring timeout" })
  local c = env.tw.calls[1]
  T.eq(c.final, nil, "the call still rings at Twilio")
  env.app:stop()
  local updates = #c.updates
  env:next_start()
  local call = env:wait_final(id, 6000)
  T.eq({ call.status, #call.attempts, call.attempts[1].answeredAt ~= nil }, { "no_answer", 1, true })
  T.match(call.lastError, NOT_DIALED_AGAIN)
  T.match(c.voice_request and c.voice_request.body or "", "<Hangup/>", "the callee hung up by the voice webhook's answer")
  T.eq(#env.tw.calls, 1, "dialed once")
  T.ok(#c.updates > updates, "the cancel asked again by the next start")
end, { timeout = 30000 })

T.test("a late cancel Twilio answers saying the callee had answered, after the grace wait ended the attempt: the call is hung up, beside a dropped retry or a dialed one", function()
  -- Two apps, side by side: the ring timeout (1 + 1 s) finds the call
  -- ringing, Twilio refuses the cancel and its first try again (1 s later,
  -- as the grace wait ends the attempt), the callee answers 0.5 s after
  -- that, their answered callback lost and their voice webhook late (30 s),
  -- and the next try (2 s later) is taken, Twilio saying in-progress. One
  -- call's retry is still waiting (it is dropped); the other's has been
  -- dialed. Before, the answered call was left up, nobody talking on it.
  local function start(delay_ms)
    local n = 0
    return kit.start({
      twilio = { behaviour = function()
        n = n + 1
        return n == 1 and { ring_ms = 3500, lost_callbacks = { answered = true }, voice_delay_ms = 30000,
          update_fail = 503, update_fail_times = 2 } or { ring_ms = 60000 }
      end },
      config = { retry = { maxAttempts = 2, initialDelayMs = delay_ms },
        call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
    })
  end
  local waiting, dialed = start(10000), start(100)
  local wid = waiting:create({ to = "+14155550202", prompt = "Say hello." })
  local did = dialed:create({ to = "+14155550203", prompt = "Say hello." })
  local call = waiting:wait_final(wid, 10000)
  T.eq({ call.status, #call.attempts, call.attempts[1].answeredAt ~= nil }, { "no_answer", 1, true })
  T.match(call.lastError, NOT_DIALED_AGAIN)
  for _, c in ipairs({ waiting.tw.calls[1], dialed.tw.calls[1] }) do
    T.wait_for(function()
      return c.final ~= nil
    end, 3000, "the answered call over at Twilio")
    T.eq({ c.final, c.updates[#c.updates].params.Status }, { "completed", "completed" }, "hung up as answered")
  end
  local rec = dialed:get(did)
  T.eq({ rec.attempt, #dialed.tw.calls, rec.attempts[1].status }, { 2, 2, "no_answer" }, "the retry was dialed")
end, { timeout = 30000 })

T.test("Twilio: a callee who answers and hangs up while the ring timeout's refused cancel waits for Twilio's API ends the call completed, with its report (Twilio's cancel leaves an answered call up)", function()
  -- The ring timeout (1 + 1 s) asks Twilio's API (ringing), Twilio refuses
  -- the cancel, and the engine asks the API again (2.5 s to answer).
  -- Meanwhile the callee answers, reports and the agent hangs up. Twilio's
  -- cancel never ends an answered call: this was a conversation, not the
  -- end of a ring. Before, it ended no_answer (ring timeout), its report
  -- with it, as if the cancel had hung the callee up (as Telnyx's would).
  local env = kit.start({
    twilio = { behaviour = { ring_ms = 2600, update_fail = 503, update_fail_times = 1, get_delay_ms = { 0, 2500 } } },
    config = { retry = { maxAttempts = 2, initialDelayMs = 50 }, call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
    realtime = { script = quick_report },
  })
  local id = env:create({ to = "+14155550206", prompt = "Say hello." })
  local call = env:wait_final(id, 10000)
  local c = env.tw.calls[1]
  T.ok(c.updates[1].at < c.answered_at, "the refused cancel came before the answer")
  T.eq({ call.status, call.endReason, call.report and call.report.outcome, #call.attempts },
    { "completed", "completed", "success", 1 }, tostring(call.lastError))
  T.eq(#env.tw.calls, 1, "dialed once")
end, { timeout = 30000 })

-- A fake Telnyx (fake: its options, behaviour among them) and an app using
-- it, with config merged into the kit's.
local function telnyx_env(fake, config, script)
  local fo = { api_key = TELNYX_KEY, connection_id = CONNECTION }
  for k, v in pairs(fake) do
    fo[k] = v
  end
  local tx = assert(fake_telnyx.start(fo))
  T.defer(function()
    tx:close()
  end)
  config.telephony = { provider = "telnyx" }
  config.telnyx = { apiKey = TELNYX_KEY, connectionId = CONNECTION, fromNumber = "+15550002222",
    publicKey = tx.public_key, apiBaseUrl = tx.url }
  local env = kit.start({ realtime = { script = script or quick_report }, config = config })
  env.tx = tx
  return env
end

T.test("Telnyx: a refused cancel of the ring is not sent again once the callee answered (its hang-up would end the answered call): they talk", function()
  -- The ring timeout (1 + 1 s) finds the call ringing (Telnyx's own ring is
  -- 5 s at least); Telnyx refuses its hang-up (503) twice, and the callee
  -- answers before the provider sends it a third time, 1.5 s after the
  -- first. Before, that hang-up ended the call the callee had just answered.
  local env = telnyx_env({ fail_hangups = 2, behaviour = { ring_ms = 2900 } },
    { retry = { maxAttempts = 2, initialDelayMs = 50 }, call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
    function(session) -- a greeting past the hang-up's second try
      assert(session:wait_event("response.create", 5000))
      session:speak({ ms = 1500, text = "Hello there." })
      session:report_and_goodbye({ summary = "Reached them.", outcome = "success" }, { ms = 100, text = "Bye." })
    end)
  local id = env:create({ to = "+14155550204", prompt = "Say hello." })
  local call = env:wait_final(id, 10000)
  T.eq({ call.status, call.report and call.report.outcome, #call.attempts }, { "completed", "success", 1 },
    "the conversation took place: " .. tostring(call.endReason))
  local c = env.tx.calls[1]
  T.eq(#c.hangup_command_ids, 3, "the refused cancel's two tries, then the agent's own hang-up after the report")
  T.ok(c.hangup_requested_at > c.stream_started_at, "hung up after the conversation, not at the answer")
end, { timeout = 30000 })

T.test("Telnyx: a callee who answers while the ring timeout's cancel is on its way is hung up by it; the call ends no_answer, answered, not dialed again", function()
  -- Telnyx has one hang-up for a ringing call and an answered one, and
  -- nothing that cancels only a ring: a cancel sent while the phone rings,
  -- which Telnyx takes after the callee answered (here 1 s on its way, the
  -- answer 0.5 s after it was sent), ends the answered call. Nothing can
  -- call it back; the record says so, and the callee is not rung again.
  local env = telnyx_env({ hangup_delay_ms = 1000, behaviour = { ring_ms = 2500 } },
    { retry = { maxAttempts = 2, initialDelayMs = 50 }, call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
    function(session)
      assert(session:wait_event("response.create", 5000))
      session:speak({ ms = 3000, text = "Hello there." })
    end)
  local id = env:create({ to = "+14155550205", prompt = "Say hello." })
  local call = env:wait_final(id, 10000)
  local c = env.tx.calls[1]
  T.ok(c.answered_at < c.hangup_requested_at, "Telnyx took the cancel after the answer")
  T.eq({ call.status, call.endReason, #call.attempts, call.attempts[1].answeredAt ~= nil },
    { "no_answer", "ring timeout", 1, true })
  T.match(call.lastError, "^not dialed again: the callee answered attempt 1's call as its ring timeout's cancel")
  T.eq(#env.tx.calls, 1, "dialed once")
end, { timeout = 30000 })

T.run()
