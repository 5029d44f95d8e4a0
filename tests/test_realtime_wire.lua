-- The model service as it behaves on the wire where a kinder fake would not:
-- a response.create it takes whose response then fails (response.done with
-- status "failed": a tokens-per-minute limit, an account out of quota), its
-- session's end (an error session_expired, then a close), a goodbye
-- response that also calls report_call again (or a made-up end_call), and
-- an answer to a barge-in over the goodbye that calls an app tool.
local T = require "testing"
local kit = require "callkit"

T.test("a greeting whose response fails for a rate limit is asked for again after the service's wait, and the call goes on", function()
  local env = kit.start({
    config = { retry = { maxAttempts = 1 }, call = { silenceTimeoutSec = 8, wrapUpSec = 2, maxDurationSec = 20 } },
    realtime = {
      script = function(session)
        session:fail_next_create("rate_limit_exceeded", "Rate limit reached for gpt-realtime on tokens per min (TPM): "
          .. "Limit 40000, Used 39800, Requested 900. Please try again in 1.2s.", "tokens")
        session.first = assert(session:wait_event("response.create", 5000))
        -- Asked again before the silence timeout's wrap-up (8 s).
        session.second = session:wait_event("response.create", 4000)
        if session.second then
          session:speak({ ms = 200, text = "Hello, this is the agent." })
          session:report_and_goodbye({ summary = "Greeted.", outcome = "success" }, { ms = 200, text = "Bye." })
        end
      end,
    },
  })
  local id = env:create({ to = "+14155550190", prompt = "Say hello." })
  local call = env:wait_final(id, 20000)
  local s = env.rt.sessions[1]
  T.ok(s.second, "the greeting was asked for again")
  T.ge(s.second.at - s.first.at, 1200, "not before the service's 1.2 s")
  T.lt(s.second.at - s.first.at, 3000, "soon after it")
  T.eq({ call.status, call.endReason, call.report and call.report.outcome }, { "completed", "completed", "success" })
  T.match(call.lastError or "", "^model response failed: rate_limit_exceeded: ")
end, { timeout = 30000 })

T.test("a failed greeting's second ask is not sent once the call is being hung up", function()
  -- The API hangs up during the service's wait; Twilio takes 3 s to end
  -- the call, so the stream and the model are still there when the wait ends.
  local env = kit.start({
    twilio = { update_delay_ms = 3000 },
    config = { retry = { maxAttempts = 1 }, call = { silenceTimeoutSec = 8, wrapUpSec = 2, maxDurationSec = 20 } },
    realtime = {
      script = function(session)
        session:fail_next_create("rate_limit_exceeded", "Rate limit reached for gpt-realtime on tokens per min (TPM): "
          .. "Please try again in 1.2s.", "tokens")
        session.first = assert(session:wait_event("response.create", 5000))
        session.second = session:wait_event("response.create", 3000)
      end,
    },
  })
  local id = env:create({ to = "+14155550194", prompt = "Say hello." })
  local s = T.wait_for(function()
    local s = env.rt.sessions[1]
    return s and s.first and s
  end, 10000, "the greeting asked for")
  T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
  T.wait_for(function()
    return s.done or s.second ~= nil or s.closed
  end, 6000, "the script's wait over")
  T.eq(s.second, nil, "no response asked for during the hang-up")
  T.eq(#s.response_creates, 1)
  env:wait_final(id, 10000)
end, { timeout = 30000 })

T.test("a response that fails for insufficient_quota ends the call failed at once, not a silent line", function()
  local env = kit.start({
    config = { retry = { maxAttempts = 1 }, call = { silenceTimeoutSec = 8, wrapUpSec = 8, maxDurationSec = 30 } },
    realtime = {
      fail_responses = { type = "insufficient_quota", code = "insufficient_quota",
        message = "You exceeded your current quota, please check your plan and billing details." },
      script = function(session)
        session.first = assert(session:wait_event("response.create", 5000))
      end,
    },
  })
  local id = env:create({ to = "+14155550191", prompt = "Say hello." })
  local call = env:wait_final(id, 25000)
  local s = env.rt.sessions[1]
  T.eq({ call.status, call.endReason }, { "failed", "model_error" })
  T.eq(call.lastError, "model response failed: insufficient_quota: You exceeded your current quota, please check "
    .. "your plan and billing details.")
  T.lt(env.tw.calls[1].hangup_requested_at - s.first.at, 2000, "hung up once the response failed")
  T.eq(#s.response_creates, 1, "not asked again: no response can be generated")
end, { timeout = 40000 })

T.test("the service's session_expired, then its close: the record keeps the expiry, not the close that follows it", function()
  -- The service's limit comes before openai.sessionMaxSec says (its 60
  -- minutes counted from its own start): an `error` session_expired, then
  -- close 1000, as the service ends a session.
  local env = kit.start({
    config = { retry = { maxAttempts = 1 } },
    realtime = {
      session_max_ms = 1500,
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 300, text = "Let us talk." })
      end,
    },
  })
  local id = env:create({ to = "+14155550192", prompt = "Talk." })
  local call = env:wait_final(id, 15000)
  local s = env.rt.sessions[1]
  T.ok(s.expired_at, "the session expired")
  T.eq({ call.status, call.endReason }, { "completed", "model session expired" })
  T.eq(call.lastError, "model error: session_expired: Your session hit the maximum duration of 60 minutes.")
end, { timeout = 30000 })

-- A model that greets, reports, and is asked for its goodbye, which says
-- goodbye (speech: session:speak's options) and calls a function in the
-- same response; then waits 1 s for a response asked of it after that
-- (session.extra), and says extra_text in it.
local function goodbye_with_a_call(speech, extra_text)
  return function(session)
    assert(session:wait_event("response.create", 5000))
    session:speak({ ms = 200, text = "Hello." })
    session:call_function("report_call", { summary = "one", outcome = "success" })
    assert(session:wait_event("response.create", 5000), "the goodbye asked for")
    session.goodbye = session:speak(speech)
    session.extra = session:wait_event("response.create", 1000)
    if session.extra and extra_text then
      session:speak({ ms = 600, text = extra_text })
    end
  end
end

T.test("a goodbye that also calls report_call again is the last thing said: no response is asked for after it", function()
  local env = kit.start({
    config = { call = { goodbyeTimeoutSec = 6 } },
    -- The model says goodbye and, in the same response, reports again.
    realtime = { script = goodbye_with_a_call({ ms = 600, text = "Thank you, goodbye.",
      call = { "report_call", { summary = "two", outcome = "success" } } }, "I have already reported the call.") },
  })
  local id = env:create({ to = "+14155550193", prompt = "Say hello." })
  local call = env:wait_final(id, 20000)
  local s = env.rt.sessions[1]
  T.eq({ call.status, call.endReason, call.report.summary }, { "completed", "completed", "one" })
  local outputs = {}
  for _, o in ipairs(s.function_outputs) do
    outputs[#outputs + 1] = o.call_id == s.goodbye.call_id and o.output:match('"note"') and "second: note" or "first"
  end
  T.eq(outputs, { "first", "second: note" }, "the second report's output still sent")
  T.eq(s.extra, nil, "nothing asked of the model after its goodbye")
  local said = {}
  for _, l in ipairs(call.transcript) do
    said[#said + 1] = l.role .. ": " .. l.text
  end
  T.eq(said, { "agent: Hello.", "agent: Thank you, goodbye." })
end, { timeout = 30000 })

T.test("the callee's question over the goodbye, answered with a call of the app's tool: its answer is still said", function()
  -- After a barge-in, the service's answer to the callee is the goodbye. One
  -- that says "let me check" and calls a tool was taken for the whole
  -- goodbye: the tool ran, its output went to the model, no response was
  -- asked for, and the call hung up without the answer.
  local env = kit.start({
    config = { call = { goodbyeTimeoutSec = 8 } },
    tools = { { name = "balance", handler = function() return { balance = "5 dollars" } end } },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Hello." })
        session:call_function("report_call", { summary = "ok", outcome = "success" })
        assert(session:wait_event("response.create", 5000))
        require("callagent.task").spawn(function()
          session:speak({ ms = 2000, text = "Thank you, goodbye." })
        end)
        session:user_speech({ interrupt = true, after_ms = 300, ms = 300, text = "Wait, what is my balance?" })
        session:speak({ auto = true, ms = 300, text = "Let me check.", call = { "balance", {} } })
        session.extra = session:wait_event("response.create", 2000)
        if session.extra then
          session:speak({ ms = 300, text = "It is 5 dollars. Goodbye." })
        end
      end,
    },
  })
  local id = env:create({ to = "+14155550194", prompt = "Say hello." })
  local call = env:wait_final(id, 20000)
  local s = env.rt.sessions[1]
  T.eq({ call.status, call.endReason }, { "completed", "completed" })
  T.ok(s.extra, "the answer asked for once the tool's output was in")
  T.eq(call.transcript[#call.transcript].text, "It is 5 dollars. Goodbye.")
end, { timeout = 30000 })

T.test("a goodbye that also calls a function the app has not (end_call) is the last thing said, as one calling report_call", function()
  local env = kit.start({
    config = { call = { goodbyeTimeoutSec = 6 } },
    realtime = { script = goodbye_with_a_call({ ms = 400, text = "Goodbye.", call = { "end_call", {} } }) },
  })
  local id = env:create({ to = "+14155550195", prompt = "Say hello." })
  local call = env:wait_final(id, 20000)
  local s = env.rt.sessions[1]
  T.eq({ call.status, call.endReason }, { "completed", "completed" })
  T.match(s.function_outputs[#s.function_outputs].output, "unknown function end_call")
  T.eq(s.extra, nil, "nothing asked of the model after its goodbye")
end, { timeout = 30000 })

T.run()
