-- The model side of a call, second pass: events in unusual but legal orders
-- (several function calls in one response, the report alongside a tool),
-- errors at each stage, and what reaches the call's record.
local T = require "testing"
local kit = require "callkit"
local timer = require "callagent.timer"
local json = require "callagent.json"
local bridge_mod = require "callagent.bridge"

-- One response of the model's holding several function calls, as the
-- service sends it: each call's arguments.done and output item, then
-- response.done listing them all. calls: { {name, arguments (table)}, ... }.
local function function_calls(session, rid, calls)
  session:send({ type = "response.created", response = { id = rid, object = "realtime.response",
    status = "in_progress", output = json.array({}) } })
  local items = {}
  for i, c in ipairs(calls) do
    local cid, iid = rid .. "_call" .. i, rid .. "_item" .. i
    local arguments = json.encode(c[2])
    local item = { id = iid, object = "realtime.item", type = "function_call", status = "completed", name = c[1],
      call_id = cid, arguments = arguments }
    session:send({ type = "response.function_call_arguments.done", response_id = rid, item_id = iid,
      output_index = i - 1, call_id = cid, name = c[1], arguments = arguments })
    session:send({ type = "response.output_item.done", response_id = rid, output_index = i - 1, item = item })
    items[i] = item
  end
  session:send({ type = "response.done", response = { id = rid, object = "realtime.response", status = "completed",
    output = items } })
end

T.test("report_call with a tool that never returns in the same response: the call still ends, within call.goodbyeTimeoutSec", function()
  local env = kit.start({
    config = { call = { goodbyeTimeoutSec = 2 } },
    tools = { { name = "stuck", description = "x", parameters = { type = "object", properties = {} },
      handler = function()
        timer.sleep(60000)
        return { ok = true }
      end } },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Hello." })
        session.report_at = timer.now()
        function_calls(session, "resp_both", { { "report_call", { summary = "Done.", outcome = "success" } },
          { "stuck", {} } })
        session:wait_event("response.create", 20000)
      end,
    },
  })
  local id = env:create({ to = "+14155550171", prompt = "Say hello." })
  local call = env:wait_final(id, 15000)
  T.eq({ call.status, call.endReason, call.report.summary }, { "completed", "completed", "Done." })
  local s = env.rt.sessions[1]
  T.lt(env.tw.calls[1].hangup_requested_at - s.report_at, 2000 + 1500, "hung up at call.goodbyeTimeoutSec")
end, { timeout = 40000 })

T.test("a session.updated with other audio formats than asked fails the call: no noise played, no garbled input", function()
  local env = kit.start({
    realtime = { keep_formats = true },
    -- Opened at the answer (one opened while it rings cancels the ring: below).
    config = { retry = { maxAttempts = 1 }, openai = { connectWhileRinging = false } },
  })
  local id = env:create({ to = "+14155550172", prompt = "Say hello." })
  local call = env:wait_final(id, 15000)
  T.eq({ call.status, call.endReason }, { "failed", "model_error" })
  T.eq(call.lastError, "model session has other audio formats than asked: input audio/pcm (asked audio/pcmu), "
    .. "output audio/pcm (asked audio/pcmu)")
  T.eq(#env.rt.sessions[1].response_creates, 0, "nothing asked of a session that would play noise")
  T.eq(env.rt.sessions[1].appends, 0, "no mu-law sent to a session that takes it for PCM")
  T.ok(env.tw.calls[1].hangup_requested_at, "Twilio was told to hang up")
end, { timeout = 30000 })

T.test("a model that stalls while a response is due fails the call instead of a silent line until call.maxDurationSec", function()
  local bridge = require "callagent.bridge"
  T.shorten(bridge, "RESPONSE_STALL_MS", 1000)
  for _, case in ipairs({ { started = true }, { started = false } }) do
    local env = kit.start({
      config = { retry = { maxAttempts = 1 }, call = { maxDurationSec = 30 } },
      realtime = {
        script = function(session)
          local create = assert(session:wait_event("response.create", 5000))
          if case.started then
            -- The greeting's response starts, and then nothing comes: no delta, no done.
            session:send({ type = "response.created", response = { id = "resp_stuck", object = "realtime.response",
              status = "in_progress", output = json.array({}), metadata = create.response.metadata } })
          end
          session.stalled_at = timer.now()
        end,
      },
    })
    local id = env:create({ to = "+14155550173", prompt = "Say hello." })
    local call = env:wait_final(id, 15000)
    T.eq({ call.status, call.endReason }, { "failed", "model_error" })
    T.eq(call.lastError, "model stalled: nothing from it for 1 s while a response was due")
    T.near(env.tw.calls[1].hangup_requested_at - env.rt.sessions[1].stalled_at, 1000, 2100,
      "hung up once RESPONSE_STALL_MS passed")
  end
end, { timeout = 60000 })

-- The roles and texts of a record's transcript, in order.
local function lines(call)
  local out = {}
  for _, l in ipairs(call.transcript) do
    out[#out + 1] = l.role .. ": " .. l.text
  end
  return out
end

T.test("a callee line whose transcription comes after the agent's answer has played is still written before it", function()
  local env = kit.start({
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 300, text = "Hello, is this Ann?" })
        -- The callee speaks; the service answers at once, and its
        -- transcription of what was said is slow.
        session:send({ type = "input_audio_buffer.speech_started", audio_start_ms = 500, item_id = "item_user1" })
        timer.sleep(300)
        session:send({ type = "input_audio_buffer.speech_stopped", audio_end_ms = 800, item_id = "item_user1" })
        session:send({ type = "input_audio_buffer.committed", previous_item_id = json.null, item_id = "item_user1" })
        session:speak({ ms = 300, text = "Great.", auto = true })
        timer.sleep(1000)
        session:send({ type = "conversation.item.input_audio_transcription.completed", item_id = "item_user1",
          content_index = 0, transcript = "Yes, speaking." })
        -- One whose transcription fails holds nothing back.
        session:send({ type = "input_audio_buffer.committed", previous_item_id = "item_user1", item_id = "item_user2" })
        session:speak({ ms = 200, text = "Sorry?", auto = true })
        session:send({ type = "conversation.item.input_audio_transcription.failed", item_id = "item_user2",
          content_index = 0, error = { type = "transcription_error", code = "audio_unintelligible", message = "x" } })
        session:report_and_goodbye({ summary = "Ann.", outcome = "success" }, { ms = 200, text = "Bye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550174", prompt = "Say hello." })
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "completed")
  T.eq(lines(call), { "agent: Hello, is this Ann?", "callee: Yes, speaking.", "agent: Great.", "agent: Sorry?",
    "agent: Bye." })
end, { timeout = 40000 })

T.test("model events that were on their way when the call ended: transcripts are kept, errors change nothing", function()
  -- The model connection delivers what the service sent before it read
  -- our close; the bridge has ended by then.
  local bridge = require "callagent.bridge"
  local seen = {}
  local engine = {
    config = { openai = { outputFormat = "audio/pcmu", inputFormat = "audio/pcmu" }, call = {} },
    tools = {},
  }
  setmetatable(engine, { __index = function(_, name)
    return function(_, _, ...)
      seen[#seen + 1] = { name, ... }
    end
  end })
  local b = bridge.new(engine, { id = "c_test" }, 1)
  b.model_ready = true
  b:finish("callee_hung_up")
  seen = {}
  b:_model_event({ type = "conversation.item.input_audio_transcription.completed", item_id = "i1", transcript = "Bye." })
  b:_model_event({ type = "error", error = { type = "invalid_request_error", code = "session_expired",
    message = "Your session hit the maximum duration of 60 minutes." } })
  b:_model_event({ type = "error", error = { type = "server_error", code = "server_error", message = "Oops." } })
  local names = {}
  for _, s in ipairs(seen) do
    names[#names + 1] = s[1]
  end
  T.eq(names, { "bridge_transcript" }, "the callee's last words only: no lastError, no second hang-up")
end)

T.test("a tool output too long for the model connection is replaced by an error: the call goes on", function()
  local env = kit.start({
    -- The script's goodbye answers the tool's response.create, not the
    -- report's: the goodbye's bound (1 s, not the kit's 3) ends the call.
    config = { call = { goodbyeTimeoutSec = 1 } },
    tools = { { name = "big", description = "x", parameters = { type = "object", properties = {} },
      handler = function()
        return string.rep("x", 6 * 1024 * 1024)
      end } },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Hello." })
        session.big_out = session:call_function("big", {})
        session:report_and_goodbye({ summary = "ok", outcome = "success" }, { ms = 200, text = "Bye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550175", prompt = "Say hello." })
  local call = env:wait_final(id, 30000)
  T.eq({ call.status, call.endReason, call.report.summary }, { "completed", "completed", "ok" })
  local out = json.decode(env.rt.sessions[1].big_out)
  T.eq(out.error, "the tool's output was too long (6291456 bytes, at most 262144)")
end, { timeout = 40000 })

T.test("a goodbye response that only calls report_call again is not the goodbye: the one after it is, and plays", function()
  local env = kit.start({
    config = { call = { goodbyeTimeoutSec = 8 } },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Hello." })
        session:call_function("report_call", { summary = "one", outcome = "success" })
        assert(session:wait_event("response.create", 5000))
        -- Asked for the goodbye, the model reports again instead.
        session:call_function("report_call", { summary = "two", outcome = "failure" })
        assert(session:wait_event("response.create", 5000), "asked again after the second report's output")
        session.goodbye_at = timer.now()
        session:speak({ ms = 1500, pace = false, text = "Goodbye then." })
      end,
    },
  })
  local id = env:create({ to = "+14155550176", prompt = "Say hello." })
  local call = env:wait_final(id, 20000)
  T.eq({ call.status, call.endReason, call.report.summary }, { "completed", "completed", "one" })
  local tw = env.tw.calls[1]
  local last = tw.marks_sent[#tw.marks_sent]
  T.ok(env.rt.sessions[1].goodbye_at, "the goodbye was asked for")
  T.ge(tw.hangup_requested_at, env.rt.sessions[1].goodbye_at + 1300, "hung up once the goodbye played")
  T.ge(tw.hangup_requested_at, last.due - 200, "hung up once the goodbye played")
  T.eq(lines(call), { "agent: Hello.", "agent: Goodbye then." })
end, { timeout = 40000 })

-- The agent's lines of a call, an interrupted one marked.
local function lines_marked(call)
  local out = {}
  for _, l in ipairs(call.transcript) do
    out[#out + 1] = l.role .. (l.interrupted and " (interrupted)" or "") .. ": " .. l.text
  end
  return out
end

-- The goodbye, then the callee speaking over it once it has played for
-- 600 ms; paced: it is still being generated then, or not: all of it is
-- already at the phone, playing.
local function talked_over_goodbye(paced, answer)
  return function(session)
    assert(session:wait_event("response.create", 5000))
    session:speak({ ms = 200, text = "Hello." })
    session:call_function("report_call", { summary = "ok", outcome = "success" })
    assert(session:wait_event("response.create", 5000))
    session.report_at = timer.now()
    if paced then
      require("callagent.task").spawn(function()
        session:speak({ ms = 2000, text = "Thank you for your time, and goodbye." })
      end)
      session:user_speech({ interrupt = true, after_ms = 600, ms = 400, text = "Wait, one more thing." })
    else
      session:speak({ ms = 2000, pace = false, text = "Thank you for your time, and goodbye." })
      timer.sleep(600)
      session:user_speech({ ms = 400, text = "Wait, one more thing." })
    end
    if answer then
      -- The service's turn detection answers them.
      session:speak({ auto = true, ms = 600, text = "Of course: we will call you back. Goodbye." })
      session.answered_at = timer.now()
    end
  end
end

for _, paced in ipairs({ true, false }) do
  T.test("the callee speaking over the goodbye (" .. (paced and "still generated" or "all of it at the phone")
    .. ") is answered before the hang-up, not hung up on", function()
    local env = kit.start({
      config = { call = { goodbyeTimeoutSec = 8 } },
      realtime = { script = talked_over_goodbye(paced, true) },
    })
    local id = env:create({ to = "+14155550178", prompt = "Say hello." })
    local call = env:wait_final(id, 20000)
    T.eq({ call.status, call.endReason, call.report and call.report.summary }, { "completed", "completed", "ok" })
    local s, tw = env.rt.sessions[1], env.tw.calls[1]
    T.ok(s.answered_at, "the answer was spoken")
    T.ge(tw.hangup_requested_at, s.answered_at, "hung up after the answer, not when the callee spoke")
    T.lt(tw.hangup_requested_at - s.answered_at, 1500, "and once it had played")
    T.eq(#tw.clears, 1, "the goodbye was cut at the phone")
    local l = lines_marked(call)
    T.eq(#l, 4, json.encode(l))
    T.eq(l[1], "agent: Hello.")
    T.ok(l[2]:find("^agent %(interrupted%): Thank you"), "the goodbye, cut: " .. l[2])
    T.eq({ l[3], l[4] }, { "callee: Wait, one more thing.", "agent: Of course: we will call you back. Goodbye." })
  end, { timeout = 40000 })
end

T.test("the callee speaking over the goodbye with no answer after: hung up at call.goodbyeTimeoutSec from the report", function()
  local env = kit.start({
    config = { call = { goodbyeTimeoutSec = 2 } },
    realtime = { script = talked_over_goodbye(true, false) },
  })
  local id = env:create({ to = "+14155550179", prompt = "Say hello." })
  local call = env:wait_final(id, 20000)
  T.eq({ call.status, call.endReason }, { "completed", "completed" })
  local s, tw = env.rt.sessions[1], env.tw.calls[1]
  local after = tw.hangup_requested_at - s.report_at
  T.diag(string.format("hung up %.0f ms after the goodbye was asked for", after))
  T.ge(after, 1700, "not when the callee spoke")
  T.lt(after, 3500, "at the goodbye's bound")
end, { timeout = 40000 })

-- report_call's arguments.done, then the model gone before the output item
-- or the response that would say how the call ended.
local function report_then_drop(arguments)
  return function(session)
    assert(session:wait_event("response.create", 5000))
    session:speak({ ms = 200, text = "Hello." })
    local rid = "resp_dropped"
    session:send({ type = "response.created", response = { id = rid, object = "realtime.response",
      status = "in_progress", output = json.array({}) } })
    session:send({ type = "response.function_call_arguments.done", response_id = rid, item_id = "item_r",
      output_index = 0, call_id = "call_r", name = "report_call", arguments = arguments })
    timer.sleep(100)
    session:drop()
  end
end

T.test("report_call's arguments in, then the model drops before its output item: the report is kept, completed", function()
  local env = kit.start({
    realtime = { script = report_then_drop(json.encode({ summary = "Booked for Tuesday.", outcome = "success" })) },
  })
  local id = env:create({ to = "+14155550180", prompt = "Book." })
  local call = env:wait_final(id, 20000)
  T.eq({ call.status, call.endReason, call.report and call.report.summary, call.report and call.report.outcome },
    { "completed", "completed", "Booked for Tuesday.", "success" }, tostring(call.lastError))
end, { timeout = 30000 })

T.test("report_call's arguments cut short (JSON not closed), then the model drops: no report, model_error", function()
  local env = kit.start({
    config = { retry = { maxAttempts = 1 } },
    realtime = { script = report_then_drop('{"summary":"Booked for Tu') },
  })
  local id = env:create({ to = "+14155550181", prompt = "Book." })
  local call = env:wait_final(id, 20000)
  T.eq({ call.status, call.endReason, call.report }, { "failed", "model_error", nil })
end, { timeout = 30000 })

T.test("an app tool's parameters written with required = {} go to the model as an array, and the call talks", function()
  -- An empty Lua table encodes as {}; the service refuses a schema whose
  -- required is no array, and with it the whole session.update.
  local env = kit.start({
    config = { retry = { maxAttempts = 1 } },
    tools = { { name = "ping", description = "x",
      parameters = { type = "object", properties = { mode = { type = "string", enum = {} } }, required = {} },
      handler = function()
        return { ok = true }
      end } },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Hello." })
        session:report_and_goodbye({ summary = "Talked.", outcome = "success" }, { ms = 100, text = "Bye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550177", prompt = "Say hello." })
  local call = env:wait_final(id, 15000)
  T.eq({ call.status, call.endReason, call.report and call.report.summary }, { "completed", "completed", "Talked." },
    tostring(call.lastError))
end, { timeout = 30000 })

-- The call the rate-limit tests end with, once a session talks: a greeting,
-- the callee's answer, the report and the goodbye; and how it ends.
local function talk_with_ann(session)
  session:speak({ ms = 300, text = "Hello, is this Ann?" })
  session:user_speech({ ms = 300, text = "Yes." })
  session:report_and_goodbye({ summary = "Ann.", outcome = "success" }, { ms = 200, text = "Bye." })
end

-- talk_with_ann once the greeting is asked for (a session never asked ends).
local function ann_when_asked(session)
  if session:wait_event("response.create", 10000) then
    talk_with_ann(session)
  end
end

local function completed_with_ann(call)
  T.eq({ call.status, call.endReason, call.report and call.report.summary }, { "completed", "completed", "Ann." },
    tostring(call.lastError))
end

-- Waits until every bridge of the app has seen its phone stream end (a
-- bridge awaiting the callee's last words has ended so).
local function wait_bridges_ended(env, what)
  T.wait_for(function()
    for _, b in pairs(env.app.engine.bridges) do
      if not b.ended then
        return false
      end
    end
    return true
  end, 10000, what)
end

-- The callee says something and hangs up at once: the model is still
-- transcribing it. script(session, hangup, env) plays the call; hangup() is
-- the callee hanging up (Twilio's stop, the stream's close, then completed).
local function last_words_call(to, script)
  local env
  env = kit.start({
    config = { retry = { maxAttempts = 1 } },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 300, text = "Hello, is this Ann?" })
        script(session, function()
          session.hung_up_at = timer.now()
          env.tw.calls[1]:hangup()
        end, env)
      end,
    },
  })
  local id = env:create({ to = to, prompt = "Say hello." })
  local call = env:wait_final(id, 20000)
  local s = env.rt.sessions[1]
  s.final_seen_at = timer.now()
  return call, s, env
end

T.test("the callee's last words before they hang up are in the transcript, in order", function()
  local call, s = last_words_call("+14155550178", function(session, hangup)
    -- speech_stopped and committed have come; the transcription takes 800 ms.
    session:user_speech({ ms = 300, text = "Sorry, I have to go.", transcript_delay_ms = 800 })
    -- The service answers at once; the callee hangs up while it plays.
    session:speak({ ms = 300, text = "Oh, okay.", auto = true })
    hangup()
  end)
  T.eq({ call.status, call.endReason }, { "completed", "callee_hung_up" })
  T.eq(lines(call), { "agent: Hello, is this Ann?", "callee: Sorry, I have to go.", "agent: Oh, okay." })
  T.eq(s.transcribed, 1, "the service sent the transcription before the close")
  T.lt(s.closed_at - s.hung_up_at, bridge_mod.LAST_WORDS_MS, "closed once the words were in")
end, { timeout = 40000 })

T.test("the callee hangs up mid-sentence: what they said is committed, transcribed and written", function()
  local call, s = last_words_call("+14155550179", function(session, hangup)
    -- Speech goes on when the phone hangs up: VAD never hears its end.
    session:user_speech({ ms = 400, text = "No, wait, call me", until_commit = true, transcript_delay_ms = 300 })
    hangup()
    -- The service answers the committed words, to a phone that is gone.
    assert(session:wait_event("input_audio_buffer.commit", 3000))
    session:speak({ ms = 200, pace = false, text = "Okay, goodbye.", auto = true })
  end)
  T.eq({ call.status, call.endReason }, { "completed", "callee_hung_up" })
  T.eq(lines(call), { "agent: Hello, is this Ann?", "callee: No, wait, call me" }, "no line for what nobody heard")
  T.eq(call.usage.responses, 2, "the unheard response's tokens are counted")
  local commits = 0
  for _, ev in ipairs(s.events) do
    commits = commits + (ev.type == "input_audio_buffer.commit" and 1 or 0)
  end
  T.eq(commits, 1, "the bridge committed the speech the phone cut off")
end, { timeout = 40000 })

T.test("the callee's last words: the call ends within LAST_WORDS_MS when the transcription does not come, at once when none is pending", function()
  local call, s, env = last_words_call("+14155550180", function(session, hangup)
    session:user_speech({ ms = 300, text = "Never transcribed.", transcript_delay_ms = 20000 })
    hangup()
  end)
  T.eq({ call.status, call.endReason }, { "completed", "callee_hung_up" })
  T.eq(lines(call), { "agent: Hello, is this Ann?" })
  local ended = env.tw.calls[1].ended_at
  T.near(s.closed_at - s.hung_up_at, bridge_mod.LAST_WORDS_MS, 500, "the model kept open for the bound only")
  T.lt(s.final_seen_at - ended, bridge_mod.LAST_WORDS_MS + 1000, "the record final once the bound passed")
  -- Nothing pending: the model connection closes with the phone's.
  local call2, s2 = last_words_call("+14155550181", function(session, hangup)
    session:user_speech({ ms = 300, text = "Bye." })
    timer.sleep(200)
    hangup()
  end)
  T.eq(lines(call2), { "agent: Hello, is this Ann?", "callee: Bye." })
  -- Half the bound: "at the phone's close" told from "at LAST_WORDS_MS" with
  -- room for a loaded machine (ASan, two busy cores), where 300 ms was not.
  T.lt(s2.closed_at - s2.hung_up_at, bridge_mod.LAST_WORDS_MS / 2, "no wait when no transcript is pending")
end, { timeout = 60000 })

T.test("the callee's last words: the wait ends when the transcript awaited is given up (its TRANSCRIPT_WAIT_MS over), not at LAST_WORDS_MS", function()
  T.shorten(bridge_mod, "TRANSCRIPT_WAIT_MS", 1500)
  local call, s = last_words_call("+14155550195", function(session, hangup)
    -- Committed 1 s before the hang-up, never transcribed: given up 0.5 s after it.
    session:send({ type = "input_audio_buffer.speech_started", audio_start_ms = 1000, item_id = "item_lost" })
    session:send({ type = "input_audio_buffer.speech_stopped", audio_end_ms = 1300, item_id = "item_lost" })
    session:send({ type = "input_audio_buffer.committed", previous_item_id = json.null, item_id = "item_lost" })
    timer.sleep(1000)
    hangup()
  end)
  T.eq({ call.status, call.endReason }, { "completed", "callee_hung_up" })
  T.eq(lines(call), { "agent: Hello, is this Ann?" })
  T.lt(s.closed_at - s.hung_up_at, bridge_mod.LAST_WORDS_MS - 700, "closed once nothing was awaited any more")
end, { timeout = 30000 })

T.test("the callee's last words transcribed after LAST_WORDS_MS, before the service read our close, are stored before the agent's answer", function()
  local call, s, env = last_words_call("+14155550189", function(session, hangup)
    -- The callee's words are committed; their transcription is slow.
    session:send({ type = "input_audio_buffer.speech_started", audio_start_ms = 1000, item_id = "item_late" })
    session:send({ type = "input_audio_buffer.speech_stopped", audio_end_ms = 1300, item_id = "item_late" })
    session:send({ type = "input_audio_buffer.committed", previous_item_id = json.null, item_id = "item_late" })
    -- The service answers at once; the callee hangs up once it has played.
    session:speak({ ms = 300, text = "Oh, okay.", auto = true })
    hangup()
    -- The service reads nothing of ours for a while (our close among it),
    -- and its transcription comes after the bound.
    session.conn:pause()
    timer.sleep(bridge_mod.LAST_WORDS_MS + 400)
    session:send({ type = "conversation.item.input_audio_transcription.completed", item_id = "item_late",
      content_index = 0, transcript = "Sorry, I have to go." })
    session.late_sent_at = timer.now()
    session.conn:resume()
  end)
  -- Read once the service has had its say (the record is final before it, without the fix).
  T.wait_for(function()
    return s.script_done and s.closed_at
  end, 10000, "the script to end and the session to close")
  call = env:get(call.callId)
  T.ok(s.late_sent_at and s.closed_at and s.closed_at >= s.late_sent_at, "the transcription was sent before the close was read")
  T.eq({ call.status, call.endReason }, { "completed", "callee_hung_up" })
  T.eq(lines(call), { "agent: Hello, is this Ann?", "callee: Sorry, I have to go.", "agent: Oh, okay." })
end, { timeout = 40000 })

T.test("a report_call that comes once the phone hung up (while the callee's last words are awaited) is stored", function()
  local call, s = last_words_call("+14155550188", function(session, hangup, env)
    session:user_speech({ ms = 300, text = "Tuesday at five works. Bye.", transcript_delay_ms = 1500 })
    hangup()
    T.wait_for(function()
      return env.tw.calls[1].stream_closed
    end, 10000, "the phone's stream to close")
    -- The bridge has seen it (not assumed after a sleep: on a loaded machine
    -- the report could come first, and be a live call's).
    wait_bridges_ended(env, "the bridge to end")
    -- The model reports what it heard; no tool output is awaited from a call that ended.
    session:call_function("report_call", { summary = "Booked for Tuesday at five.", outcome = "success" },
      { wait = false })
  end)
  T.eq({ call.status, call.endReason }, { "completed", "callee_hung_up" })
  T.eq(call.report and call.report.summary, "Booked for Tuesday at five.", "the report the model made is the call's")
  T.eq(call.report.outcome, "success")
  T.eq(#s.function_outputs, 0, "nothing sent back for a call that ended")
  T.eq(lines(call), { "agent: Hello, is this Ann?", "callee: Tuesday at five works. Bye." })
end, { timeout = 40000 })

T.test("a rate limit on the model's first session.update: the model connection is tried again while the phone waits, and the call talks", function()
  -- The answer's own connection (one opened while the phone rings would take the first refusal).
  local env = kit.start({
    config = { retry = { maxAttempts = 1 }, openai = { connectWhileRinging = false } },
    realtime = {
      refuse_update = { "rate_limit_exceeded", "Rate limit reached for sessions. Please try again in 0.2s.",
        sessions = 2 },
      script = function(session)
        if not session:wait_event("response.create", 10000) then
          return -- a refused session: the client goes
        end
        talk_with_ann(session)
      end,
    },
  })
  local id = env:create({ to = "+14155550182", prompt = "Say hello." })
  local call = env:wait_final(id, 30000)
  completed_with_ann(call)
  T.eq(#env.rt.sessions, 3, "two refused sessions, then one that talked")
  local s1, s2, s3 = env.rt.sessions[1], env.rt.sessions[2], env.rt.sessions[3]
  T.ok(s1.closed and s2.closed, "the refused sessions were closed by the client")
  T.ge(s2.opened_at - s1.opened_at, bridge_mod.MODEL_RETRY_MS[1] - 50, "waited before trying again")
  T.gt(s3.input_bytes, 0, "the phone's audio went to the session that talked")
  T.eq(lines(call), { "agent: Hello, is this Ann?", "callee: Yes.", "agent: Bye." })
end, { timeout = 40000 })

-- A TCP front for the fake Realtime server (Node, which the tests have):
-- its first `refuse` connections are answered HTTP 429 at the upgrade, as
-- OpenAI answers a rate-limited connection; later ones are passed through.
-- Returns its ws:// URL and poll(want), the front's connection lines. Node's
-- stdout is a pipe written behind the socket's answer, so poll waits up to
-- 5 s for `want` lines, then 300 ms more for any extra line.
local function rate_limiting_front(rt_port, refuse)
  local process = require "callagent.process"
  local p = assert(process.spawn({ "node", "-e", [[
const net = require('net');
const target = +process.argv[1], refuse = +process.argv[2];
let n = 0;
const s = net.createServer(c => {
  c.on('error', () => {});
  if (++n <= refuse) {
    c.once('data', () => {
      const body = '{"error":{"message":"Too many requests","type":"requests","code":"rate_limit_exceeded"}}';
      console.log('refused');
      c.end('HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Length: ' +
        body.length + '\r\nConnection: close\r\n\r\n' + body);
    });
  } else {
    const u = net.connect(target, '127.0.0.1');
    u.on('error', () => c.destroy());
    c.pipe(u); u.pipe(c);
    console.log('passed');
  }
});
s.listen(0, '127.0.0.1', () => console.log(s.address().port));
]], tostring(rt_port), tostring(refuse) }))
  T.defer(function()
    p:kill()
  end)
  local port = assert(p:read_line(5000), "the front's port")
  local seen = {}
  local function poll(want)
    local deadline = timer.now() + 5000
    while true do
      local wait = #seen < want and math.max(0, deadline - timer.now()) or 300
      local l = p:read_line(wait)
      if not l then
        return seen
      end
      seen[#seen + 1] = { l, timer.now() }
    end
  end
  return "ws://127.0.0.1:" .. port .. "/v1/realtime", poll
end

T.test("HTTP 429 at the model's WebSocket upgrade: tried again while the phone waits, and the call talks", function()
  local env = kit.start({
    config = { retry = { maxAttempts = 1 } },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 300, text = "Hello, is this Ann?" })
        session:report_and_goodbye({ summary = "Ann.", outcome = "success" }, { ms = 200, text = "Bye." })
      end,
    },
  })
  local front, poll = rate_limiting_front(env.rt.port, 2)
  env.app.config.openai.realtimeUrl = front -- the engine's config: read at each model connection
  local id = env:create({ to = "+14155550183", prompt = "Say hello." })
  local call = env:wait_final(id, 30000)
  completed_with_ann(call)
  T.eq(#poll(3), 3, "two connections refused, the third passed")
  T.eq(#env.rt.sessions, 1, "one session reached the service")
  T.gt(env.rt.sessions[1].input_bytes, 0, "the phone's audio reached it")
  T.eq(lines(call), { "agent: Hello, is this Ann?", "agent: Bye." })
end, { timeout = 40000 })

T.test("HTTP 429 at every model connection: a bounded number of tries with backoff, then the call fails model_error", function()
  -- The backoffs (0.5, 1.5 and 3 s) shortened, as many of them.
  T.shorten(bridge_mod, "MODEL_RETRY_MS", { 200, 400, 800 })
  local env = kit.start({ config = { retry = { maxAttempts = 1 }, openai = { connectWhileRinging = false } } })
  local front, poll = rate_limiting_front(env.rt.port, 100)
  env.app.config.openai.realtimeUrl = front
  local id = env:create({ to = "+14155550184", prompt = "Say hello." })
  local call = env:wait_final(id, 30000)
  T.eq({ call.status, call.endReason }, { "failed", "model_error" })
  T.match(call.lastError, "HTTP 429 .*%(4 tries%)$")
  T.eq(#poll(#bridge_mod.MODEL_RETRY_MS + 1), #bridge_mod.MODEL_RETRY_MS + 1, "the first connection and each retry")
  local waited = 0
  for _, ms in ipairs(bridge_mod.MODEL_RETRY_MS) do
    waited = waited + ms
  end
  local took = env.tw.calls[1].hangup_requested_at - env.tw.calls[1].stream_started_at
  T.ge(took, waited - 100, "backed off between tries")
  T.lt(took, 10000, "within the 10 s the phone's frames are kept")
end, { timeout = 40000 })

T.test("a dropped (rate limited) session's late events are not the call's: the next session greets and hears the phone", function()
  local env
  env = kit.start({
    config = { retry = { maxAttempts = 1 } },
    realtime = {
      refuse_update = { "rate_limit_exceeded", "Rate limit reached for sessions. Please try again in 0.6s.",
        sessions = 1 },
      script = function(session)
        if session.index == 1 then
          -- On its way with the refusal, before the service read the client's close.
          assert(session:wait_event("session.update", 5000))
          session:send({ type = "session.updated", session = { type = "realtime", audio = {
            input = { format = { type = "audio/pcmu" } }, output = { format = { type = "audio/pcmu" } } } } })
          return
        end
        assert(session:wait_event("response.create", 5000), "the greeting asked of the session that talks")
        talk_with_ann(session)
      end,
    },
  })
  local id = env:create({ to = "+14155550187", prompt = "Say hello." })
  local call = env:wait_final(id, 15000)
  completed_with_ann(call)
  T.eq(#env.rt.sessions, 2, "one refused session, then one that talked")
  T.eq(#env.rt.sessions[1].response_creates, 0, "nothing asked of the dropped session")
  T.gt(env.rt.sessions[2].input_bytes, 0, "the phone's audio went to the session that talked")
  T.eq(lines(call), { "agent: Hello, is this Ann?", "callee: Yes.", "agent: Bye." })
end, { timeout = 40000 })
T.test("without openai.apiKey (a proxy that holds the key) the model connection carries no Authorization header", function()
  local env = kit.start({ config = { openai = { apiKey = json.null }, retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550185", prompt = "Say hello." })
  env:wait_final(id, 15000) -- the fake wants a key: refused
  local s = env.rt.sessions[1]
  T.ok(s, "the model was connected to")
  T.eq(s.headers.authorization, nil)
end, { timeout = 30000 })

T.test("the app stops while the callee's last words are awaited: the call still ends as the callee ended it, and is notified", function()
  local env
  env = kit.start({
    config = { retry = { maxAttempts = 1 } },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 300, text = "Hello, is this Ann?" })
        session:user_speech({ ms = 300, text = "Never transcribed.", transcript_delay_ms = 20000 })
        env.tw.calls[1]:hangup()
        session.hung_up_at = timer.now()
      end,
    },
  })
  local id = env:create({ to = "+14155550186", prompt = "Say hello." })
  T.wait_for(function()
    return env.rt.sessions[1] and env.rt.sessions[1].hung_up_at
  end, 10000, "the callee to hang up")
  -- The bridge has seen the stream close, and awaits the last words (waited
  -- for: a stop before it would end the call as a shutdown).
  wait_bridges_ended(env, "the bridge to see the hang-up")
  env.app:stop()
  local note
  for _, r in ipairs(env.hooks.received) do
    if r.json and r.json.data and r.json.data.callId == id then
      note = r.json.data
    end
  end
  T.ok(note, "the call was notified before the stop ended")
  T.eq({ note.status, note.endReason }, { "completed", "callee_hung_up" })
end, { timeout = 30000 })


T.test("a session.update that cannot be encoded (an app tool's schema with an infinite number) fails the call at once, not a silent call", function()
  local env = kit.start({
    config = { retry = { maxAttempts = 1 } },
    tools = { { name = "book", description = "Books a slot.", parameters = { type = "object",
      properties = { n = { type = "number", maximum = math.huge } } }, handler = function()
        return { ok = true }
      end } },
  })
  local t0 = timer.now()
  local id = env:create({ to = "+14155550190", prompt = "Say hello." })
  local call = env:wait_final(id, 20000)
  T.eq({ call.status, call.endReason }, { "failed", "model_error" })
  T.match(call.lastError, "^model connection failed: ESESSION: the session.update could not be encoded: Cannot serialise number")
  T.lt(timer.now() - t0, 8000, "at once, not at the session's confirmation bound nor call.maxDurationSec")
  T.ok(env.tw.calls[1].hangup_requested_at, "Twilio was told to hang up")
end, { timeout = 30000 })


T.test("callee lines transcribed out of order, and an agent line said between them, are written in the order they were said", function()
  local env = kit.start({
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 300, text = "Hello, is this Ann?" })
        local function committed(item, prev)
          session:send({ type = "input_audio_buffer.speech_started", audio_start_ms = 500, item_id = item })
          session:send({ type = "input_audio_buffer.speech_stopped", audio_end_ms = 800, item_id = item })
          session:send({ type = "input_audio_buffer.committed", previous_item_id = prev or json.null, item_id = item })
        end
        -- The callee speaks (a slow transcription), the agent answers, the
        -- callee speaks again (a quick one): the second is transcribed first.
        committed("item_a")
        session:speak({ ms = 300, text = "Great.", auto = true })
        timer.sleep(300) -- played: the agent line is in
        committed("item_b", "item_a")
        session:send({ type = "conversation.item.input_audio_transcription.completed", item_id = "item_b",
          content_index = 0, transcript = "And Bob is here too." })
        timer.sleep(300)
        session:send({ type = "conversation.item.input_audio_transcription.completed", item_id = "item_a",
          content_index = 0, transcript = "Yes, speaking." })
        session:report_and_goodbye({ summary = "Ann.", outcome = "success" }, { ms = 200, text = "Bye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550191", prompt = "Say hello." })
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "completed")
  T.eq(lines(call), { "agent: Hello, is this Ann?", "callee: Yes, speaking.", "agent: Great.",
    "callee: And Bob is here too.", "agent: Bye." })
end, { timeout = 40000 })


T.test("a tool output that is not UTF-8 (Latin-1 text, as a string or in a table) reaches the model as UTF-8", function()
  -- The model connection's text frames must be UTF-8: the service fails
  -- the connection on one that is not (RFC 6455 8.1), and the call with it.
  local env = kit.start({
    -- The script's goodbye answers a tool's response.create, not the
    -- report's: the goodbye's bound (1 s, not the kit's 3) ends the call.
    config = { call = { goodbyeTimeoutSec = 1 } },
    tools = {
      { name = "page", description = "x", parameters = { type = "object", properties = {} }, handler = function()
        return "Caf\xe9 ouvert"
      end },
      { name = "who", description = "x", parameters = { type = "object", properties = {} }, handler = function()
        return { name = "M\xfcller" }
      end },
    },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Hello." })
        session.outs = { session:call_function("page", {}), session:call_function("who", {}) }
        session:report_and_goodbye({ summary = "ok", outcome = "success" }, { ms = 200, text = "Bye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550193", prompt = "Say hello." })
  local call = env:wait_final(id, 30000)
  T.eq({ call.status, call.endReason }, { "completed", "completed" })
  local outs = env.rt.sessions[1].outs
  T.eq(outs[1], "Caf\u{FFFD} ouvert")
  T.eq(json.decode(outs[2]), { name = "M\u{FFFD}ller" })
  for _, ev in ipairs(env.rt.sessions[1].events) do
    T.ok(json.is_utf8(ev), "every event the model got is UTF-8: " .. tostring(ev.type))
  end
end, { timeout = 40000 })


T.test("the callee hangs up while the model's session start is rate limited: the record says the agent never got to speak", function()
  local env = kit.start({
    config = { retry = { maxAttempts = 1 }, openai = { connectWhileRinging = false } },
    realtime = {
      refuse_update = { "rate_limit_exceeded", "Rate limit reached. Please try again in 1.5s.", sessions = 4 },
    },
  })
  local id = env:create({ to = "+14155550194", prompt = "Say hello." })
  local c = assert(env.tw:wait_call(10000))
  assert(c:wait_stream(10000))
  T.wait_for(function()
    return env.rt.sessions[1] and env.rt.sessions[1].closed
  end, 5000, "the first session refused")
  c:hangup()
  local call = env:wait_final(id, 20000)
  T.eq({ call.status, call.endReason }, { "completed", "callee_hung_up" })
  T.eq(call.lastError, "the phone side ended before the model session was ready (rate limited 1 time)")
  T.eq(#env.rt.sessions, 1, "no session opened for a call that ended")
end, { timeout = 40000 })

T.test("the model session opens while the phone rings, and the answered call talks on it: no connection at the answer", function()
  for _, early in ipairs({ true, false }) do
    local env = kit.start({
      config = { retry = { maxAttempts = 1 }, openai = { connectWhileRinging = early } },
      twilio = { behaviour = { answer = true, ring_ms = 600 } },
      realtime = {
        script = ann_when_asked,
      },
    })
    local id = env:create({ to = "+14155550196", prompt = "Say hello." })
    local call = env:wait_final(id, 30000)
    completed_with_ann(call)
    local c = env.tw.calls[1]
    T.eq(#env.rt.sessions, 1, "one model session for the call")
    local s = env.rt.sessions[1]
    local created = s.events[1]
    T.eq(created and created.type, "session.update")
    if early then
      T.lt(s.opened_at, c.answered_at, "opened before the answer")
      T.lt(created.at, c.answered_at, "set up before the answer")
    else
      T.ge(s.opened_at, c.answered_at, "openai.connectWhileRinging false: opened at the answer")
    end
    T.gt(s.input_bytes, 0, "the phone's audio went to it")
    -- Set up once; a ring across a minute's turn adds an update of the
    -- instructions alone (the answer's time).
    local setups = 0
    for _, e in ipairs(s.events) do
      if e.type == "session.update" and e.session.tools then
        setups = setups + 1
      elseif e.type == "session.update" then
        local keys = {}
        for k in pairs(e.session) do
          keys[#keys + 1] = k
        end
        table.sort(keys)
        T.eq(keys, { "instructions", "type" }, "then the answer's time only")
      end
    end
    T.eq(setups, 1, "set up once")
    env:close()
  end
end, { timeout = 60000 })

T.test("an attempt that ends while it rings closes the model session opened for it, unused; its retry opens its own", function()
  local dialed = 0
  local env = kit.start({
    config = { retry = { maxAttempts = 2, initialDelayMs = 200 } },
    twilio = { behaviour = function()
      dialed = dialed + 1
      return dialed == 1 and { answer = "busy", ring_ms = 400 } or { answer = true, ring_ms = 300 }
    end },
    realtime = {
      script = ann_when_asked,
    },
  })
  local id = env:create({ to = "+14155550197", prompt = "Say hello." })
  local call = env:wait_final(id, 30000)
  completed_with_ann(call)
  T.eq({ call.attempts[1].status, call.attempts[2].status }, { "busy", "completed" })
  T.eq(#env.rt.sessions, 2, "one session per attempt")
  local s1, s2 = env.rt.sessions[1], env.rt.sessions[2]
  T.ok(s1.closed, "the busy attempt's session was closed")
  T.eq({ s1.closed.code, s1.input_bytes, #s1.response_creates }, { 1000, 0, 0 }, "closed normally, never used")
  T.lt(s1.closed_at, env.tw.calls[2].statuses[1].at, "closed before the retry was dialed")
  T.gt(s2.input_bytes, 0, "the answered attempt talked on its own")
  T.eq(call.lastError, nil, "a session closed unused is no error of the call")
end, { timeout = 40000 })

T.test("a model that refuses the session while the phone rings (key, formats): the ring is canceled, the call fails, no retry", function()
  for _, case in ipairs({
    { what = "a bad key", config = { apiKey = "sk-wrong-key" }, err = "^model refused the session: invalid_api_key: " },
    { what = "other formats", realtime = { keep_formats = true },
      err = "^model session has other audio formats than asked: input audio/pcm %(asked audio/pcmu%)" },
  }) do
    local env = kit.start({
      config = { retry = { maxAttempts = 3, initialDelayMs = 100 }, openai = case.config },
      twilio = { behaviour = { ring_ms = 5000 } },
      realtime = case.realtime,
    })
    local id = env:create({ to = "+14155550189", prompt = "Say hello." })
    local call = env:wait_final(id, 10000)
    local c = env.tw.calls[1]
    T.eq({ call.status, call.endReason, #call.attempts, call.attempts[1].status },
      { "failed", "model_error", 1, "failed" }, case.what .. ": not retried")
    T.match(call.lastError, case.err, case.what)
    T.eq({ c.final, c.answered_at }, { "canceled", nil }, case.what .. ": the ring canceled, never answered")
    T.lt(c.ended_at - c.statuses[1].at, 2000, case.what .. ": canceled at once, not at the ring's end")
    timer.sleep(300)
    T.eq(#env.tw.calls, 1, case.what .. ": dialed once")
    env:close()
  end
end, { timeout = 40000 })

-- Call id of env rang with a model session the model refused (code), and
-- the tunnel died (env's engine paused): the call fails model_error, not
-- retried, and once the tunnel is back it is not dialed again.
local function refused_not_redialed(env, id, code, wait_ms)
  local call = env:wait(id, function(r)
    return r.status ~= "dialing"
  end, wait_ms, "the attempt over")
  T.eq({ call.status, call.endReason, #call.attempts, call.attempts[1].status },
    { "failed", "model_error", 1, "failed" }, "not retried")
  T.match(call.lastError, "^model refused the session: " .. code .. ": ")
  env.app.engine:resume()
  timer.sleep(300)
  T.eq(#env.tw.calls, 1, "dialed once")
end

T.test("a ring the model's refusal canceled, then the tunnel's (its canceled status lost): the call fails model_error, not dialed again", function()
  local env = kit.start({
    config = { retry = { maxAttempts = 3, initialDelayMs = 100 }, openai = { apiKey = "sk-wrong-key" } },
    twilio = { behaviour = { ring_ms = 5000, lost_callbacks = { completed = true }, update_delay_ms = 500 } },
  })
  local id = env:create({ to = "+14155550198", prompt = "Say hello." })
  local c = assert(env.tw:wait_call(3000))
  T.wait_for(function()
    return #c.updates >= 1
  end, 5000, "the ring canceled for the model's refusal")
  env.app.engine:pause("the public tunnel is down (a test)") -- what the app does when its tunnel dies
  refused_not_redialed(env, id, "invalid_api_key", 3000)
end, { timeout = 20000 })

T.test("a model that refuses the session while the tunnel's cancel of the ring is on its way: the call fails model_error, not dialed again", function()
  local env = kit.start({
    config = { retry = { maxAttempts = 3, initialDelayMs = 100 } },
    twilio = { behaviour = { ring_ms = 5000, lost_callbacks = { completed = true }, update_delay_ms = 800 } },
    realtime = { refuse_update = { "invalid_value", "Invalid value: 'x'." }, update_delay_ms = 500 },
  })
  local id = env:create({ to = "+14155550188", prompt = "Say hello." })
  T.wait_for(function()
    return env.rt.sessions[1] and #env.rt.sessions[1].events > 0
  end, 3000, "the session set up while it rings")
  env.app.engine:pause("the public tunnel is down (a test)") -- what the app does when its tunnel dies
  T.eq(#env.rt.sessions[1].errors_sent, 0, "refused after the pause")
  refused_not_redialed(env, id, "invalid_value", 5000)
end, { timeout = 20000 })

T.test("a stop while the phone rings closes the model session opened for it", function()
  local env = kit.start({ twilio = { behaviour = { ring_ms = 30000 } } })
  local id = env:create({ to = "+14155550199", prompt = "Say hello." })
  T.wait_for(function()
    return env.rt.sessions[1] and #env.rt.sessions[1].events > 0
  end, 5000, "the session opened while it rings")
  T.eq(env.app.engine:call_view(id).status, "dialing")
  env.app:stop()
  T.wait_for(function()
    return env.rt.sessions[1].closed
  end, 3000, "the session closed by the stop")
  T.eq({ env.rt.sessions[1].closed.code, env.rt.sessions[1].input_bytes }, { 1000, 0 })
end, { timeout = 20000 })

T.test("a model session refused while the phone rings is no fault of the call: a new one opens at the answer, and the call talks", function()
  for _, how in ipairs({ "rate_limit", "429" }) do
    local env = kit.start({
      config = { retry = { maxAttempts = 1 } },
      twilio = { behaviour = { answer = true, ring_ms = 500 } },
      realtime = {
        refuse_update = how == "rate_limit"
          and { "rate_limit_exceeded", "Rate limit reached for sessions. Please try again in 0.2s.", sessions = 1 }
          or nil,
        script = ann_when_asked,
      },
    })
    local poll
    if how == "429" then
      local front
      front, poll = rate_limiting_front(env.rt.port, 1)
      env.app.config.openai.realtimeUrl = front
    end
    local id = env:create({ to = "+14155550198", prompt = "Say hello." })
    -- The refusal's line, read as it comes (its time read is after the refusal).
    local early = poll and poll(1)[1]
    local call = env:wait_final(id, 30000)
    completed_with_ann(call)
    T.eq(call.lastError, nil, how .. ": nothing went wrong for the call")
    local c = env.tw.calls[1]
    local talked = env.rt.sessions[#env.rt.sessions]
    T.eq(#env.rt.sessions, how == "rate_limit" and 2 or 1, how .. ": the sessions the fake served")
    if how == "rate_limit" then
      T.lt(env.rt.sessions[1].opened_at, c.answered_at, "refused while the phone rang")
      T.ok(env.rt.sessions[1].closed, "the refused one was closed")
    else
      T.eq(#poll(2), 2, "the refused upgrade and the answer's connection")
      T.eq(early and early[1], "refused")
      T.lt(early and early[2], c.answered_at, "refused while the phone rang")
    end
    T.ge(talked.opened_at, c.answered_at, how .. ": the session that talked opened at the answer")
    T.gt(talked.input_bytes, 0)
    env:close()
  end
end, { timeout = 60000 })

T.test("a ring longer than the session limit can spare: the session opened while it rang is not taken over, and the call keeps its whole maxDurationSec", function()
  -- sessionMaxSec 10, wrapUpSec and goodbyeTimeoutSec 2: the session's
  -- wrap-up comes 3 s after its open; maxDurationSec 2 leaves 1 s of it to
  -- spare. A session open 1.5 s when the phone is answered would wrap the
  -- call up 1.5 s after the answer, before its 2 s.
  local env = kit.start({
    config = { retry = { maxAttempts = 1 }, openai = { sessionMaxSec = 10 },
      call = { maxDurationSec = 2, wrapUpSec = 2, goodbyeTimeoutSec = 2 } },
    twilio = { behaviour = { answer = true, ring_ms = 1500 } },
    realtime = {
      script = function(session)
        if not session:wait_event("response.create", 10000) then
          return
        end
        session:speak({ ms = 200, text = "Hello." })
        session.wrap = session:wait_event("conversation.item.create", 5000)
        assert(session:wait_event("response.create", 5000), "the wrap-up's response")
        session:report_and_goodbye({ summary = "Out of time.", outcome = "success" }, { ms = 200, text = "Bye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550195", prompt = "Talk forever." })
  local call = env:wait_final(id, 20000)
  local c = env.tw.calls[1]
  T.eq({ call.status, call.report and call.report.summary }, { "completed", "Out of time." })
  T.eq(call.lastError, "maximum call duration reached (2 s)", "not the session limit's")
  T.eq(#env.rt.sessions, 2, "the one opened while it rang, and the answer's")
  local s1, s2 = env.rt.sessions[1], env.rt.sessions[2]
  T.lt(s1.opened_at, c.answered_at, "opened while it rang")
  T.eq({ s1.closed and s1.closed.code, s1.input_bytes, #s1.response_creates }, { 1000, 0, 0 }, "closed unused")
  T.ge(s2.opened_at, c.answered_at, "the call's session opened at the answer")
  T.ge(s2.wrap.at - c.answered_at, 1900, "wrapped up at maxDurationSec after the answer")
end, { timeout = 30000 })

T.test("a callee who answers before the cancel of a session refused while it rang talks on the answer's session: the call ends completed, not model_error", function()
  local env = kit.start({
    config = { retry = { maxAttempts = 1 } },
    -- The answered callback lost and the voice webhook late: callagent still
    -- sees the call ringing when the refusal comes, and cancels it; Twilio's
    -- cancel leaves the answered call up.
    twilio = { behaviour = { answer = true, ring_ms = 100, lost_callbacks = { answered = true }, voice_delay_ms = 1000 } },
    realtime = {
      refuse_update = { "invalid_value", "Invalid value: 'x'.", sessions = 1 },
      update_delay_ms = 400,
      script = ann_when_asked,
    },
  })
  local id = env:create({ to = "+14155550191", prompt = "Say hello." })
  local call = env:wait_final(id, 30000)
  local c = env.tw.calls[1]
  T.ok(c.updates[1] and c.answered_at and c.updates[1].at > c.answered_at, "the refusal's cancel came after the answer")
  completed_with_ann(call)
  T.match(call.lastError, "^model refused the session: invalid_value: ", "the refusal, as it happened")
  T.eq({ #env.rt.sessions, #env.rt.sessions[1].response_creates }, { 2, 0 }, "the refused one, and the answer's")
  T.gt(env.rt.sessions[2].input_bytes, 0, "the answer's session talked")
end, { timeout = 30000 })

T.test("the refusal's cancel is not asked again once the callee answered: the call that talks on the answer's session is not hung up", function()
  local env = kit.start({
    config = { retry = { maxAttempts = 1 } },
    -- The refusal's cancel fails once (asked again 1 s later); the callee
    -- answers meanwhile.
    twilio = { behaviour = { answer = true, ring_ms = 500, update_fail = 503, update_fail_times = 1 } },
    realtime = {
      refuse_update = { "invalid_value", "Invalid value: 'x'.", sessions = 1 },
      update_delay_ms = 300,
      script = ann_when_asked,
    },
  })
  local id = env:create({ to = "+14155550190", prompt = "Say hello." })
  local call = env:wait_final(id, 30000)
  local c = env.tw.calls[1]
  local asked = {}
  for i, u in ipairs(c.updates) do
    asked[i] = u.params.Status
  end
  T.eq(asked, { "canceled", "completed" }, "the refused cancel, then the goodbye's hang-up")
  T.lt(c.answered_at, c.updates[1].at + 1000, "answered before the cancel's retry was due")
  completed_with_ann(call)
end, { timeout = 30000 })

T.test("a refusal's cancel Twilio answers in-progress (the answered callback lost): the call is in progress at once, not ringing until its voice webhook", function()
  local env = kit.start({
    config = { retry = { maxAttempts = 1 } },
    -- Twilio's cancel leaves the answered call up and says so; the answered
    -- callback never comes, the voice webhook comes 2 s after the answer.
    twilio = { behaviour = { answer = true, ring_ms = 100, lost_callbacks = { answered = true }, voice_delay_ms = 2000 } },
    realtime = {
      refuse_update = { "invalid_value", "Invalid value: 'x'.", sessions = 1 },
      update_delay_ms = 400,
      script = ann_when_asked,
    },
  })
  local id = env:create({ to = "+14155550187", prompt = "Say hello." })
  local c = assert(env.tw:wait_call(3000))
  T.wait_for(function()
    return c.updates[1]
  end, 3000, "the refusal's cancel")
  T.ok(c.answered_at and c.updates[1].at > c.answered_at, "the cancel came after the answer")
  local rec = env:wait(id, function(r)
    return r.status == "in_progress"
  end, 1000, "in progress on the cancel's answer")
  T.eq({ rec.attempts[1].status, rec.attempts[1].answeredAt ~= nil }, { "in_progress", true })
  T.eq(c.voice_request, nil, "before the voice webhook came")
  local call = env:wait_final(id, 30000)
  completed_with_ann(call)
  T.eq(#env.rt.sessions, 2, "the refused one, and the answer's")
end, { timeout = 30000 })

T.test("a refusal whose cancels the vendor all refuses, then the ring timeout (no getCall): the call fails model_error, not no_answer, and is not retried", function()
  local dir = kit.twilio_variant("nogetcall", "P.getCall = nil\n")
  local env = kit.start({
    provider_dirs = { dir },
    config = { telephony = { provider = "nogetcall" }, retry = { maxAttempts = 3, initialDelayMs = 100 },
      openai = { apiKey = "sk-wrong-key" }, call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
    twilio = { update_fail = 503, behaviour = { ring_ms = 60000 } },
  })
  local id = env:create({ to = "+14155550186", prompt = "Say hello." })
  local call = env:wait_final(id, 6000)
  T.eq({ call.status, call.endReason, #call.attempts, call.attempts[1].status, call.attempts[1].reason },
    { "failed", "model_error", 1, "failed", "model_error" })
  T.match(call.lastError, "^model refused the session: invalid_api_key: ")
  T.ge(#env.tw.calls[1].updates, 2, "the refusal's cancel, refused, and asked again")
  timer.sleep(300)
  T.eq(#env.tw.calls, 1, "dialed once")
end, { timeout = 20000 })

T.test("an API hang-up while the cancel of a ring the model refused is on its way: the call fails model_error (the refusal came first), as status and endReason say", function()
  local env = kit.start({
    config = { retry = { maxAttempts = 3, initialDelayMs = 100 }, openai = { apiKey = "sk-wrong-key" } },
    -- The cancel is answered 800 ms late, and its canceled callback is lost.
    twilio = { behaviour = { ring_ms = 5000, update_delay_ms = 800, lost_callbacks = { completed = true } } },
  })
  local id = env:create({ to = "+14155550185", prompt = "Say hello." })
  local c = assert(env.tw:wait_call(3000))
  T.wait_for(function()
    return c.updates[1]
  end, 3000, "the refusal's cancel on its way")
  T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
  local call = env:wait_final(id, 5000)
  T.eq({ call.status, call.endReason, #call.attempts, call.attempts[1].status, call.attempts[1].reason },
    { "failed", "model_error", 1, "failed", "model_error" })
  T.match(call.lastError, "^model refused the session: invalid_api_key: ")
  T.eq(c.final, "canceled", "the ring canceled")
  timer.sleep(300)
  T.eq(#env.tw.calls, 1, "dialed once")
end, { timeout = 20000 })

T.test("a stop after the cancel of a ring the model refused (its canceled status lost): the call fails model_error, and the next start does not dial it again", function()
  local env = kit.start({
    config = { retry = { maxAttempts = 3, initialDelayMs = 100 }, openai = { apiKey = "sk-wrong-key" } },
    twilio = { behaviour = { ring_ms = 30000, lost_callbacks = { completed = true } } },
  })
  local id = env:create({ to = "+14155550184", prompt = "Say hello." })
  local c = assert(env.tw:wait_call(3000))
  T.wait_for(function()
    return c.final
  end, 3000, "the ring canceled for the model's refusal")
  env.app:stop()
  local app2 = env:next_start()
  timer.sleep(500)
  T.eq(#env.tw.calls, 1, "not dialed again")
  local rec = app2.engine:call_view(id)
  T.eq({ rec.status, rec.endReason, #rec.attempts, rec.attempts[1].status }, { "failed", "model_error", 1, "failed" })
  T.match(rec.lastError, "^model refused the session: invalid_api_key: ")
end, { timeout = 30000 })

T.test("a stop whose cancel of a ring the model refused fails as the refusal's did: the next start ends the call failed model_error, and does not dial it again", function()
  local env = kit.start({
    config = { retry = { maxAttempts = 3, initialDelayMs = 100 }, openai = { apiKey = "sk-wrong-key" } },
    twilio = { update_fail = 503, behaviour = { ring_ms = 30000 } },
  })
  local id = env:create({ to = "+14155550183", prompt = "Say hello." })
  local c = assert(env.tw:wait_call(3000))
  T.wait_for(function()
    return c.updates[1]
  end, 3000, "the refusal's cancel, refused")
  env.app:stop()
  T.eq(c.final, nil, "still ringing: every cancel refused")
  local app2 = env:next_start()
  local rec
  T.wait_for(function()
    rec = app2.engine:call_view(id)
    return rec.status ~= "dialing"
  end, 3000, "the interrupted call resolved")
  timer.sleep(300)
  T.eq(#env.tw.calls, 1, "not dialed again")
  rec = app2.engine:call_view(id)
  T.eq({ rec.status, rec.endReason, #rec.attempts, rec.attempts[1].status, rec.attempts[1].reason },
    { "failed", "model_error", 1, "failed", "model_error" })
  T.match(rec.lastError, "^model refused the session: invalid_api_key: ", "the refusal's, as it happened")
end, { timeout = 30000 })

T.test("a session taken over at the answer before its session.updated has the whole SESSION_READY_MS from the answer, as one opened then would", function()
  T.shorten(bridge_mod, "SESSION_READY_MS", 1500)
  local env = kit.start({
    config = { retry = { maxAttempts = 1 } },
    twilio = { behaviour = { answer = true, ring_ms = 1000 } },
    -- Confirmed 2 s after it opened: 1 s after the answer.
    realtime = { update_delay_ms = 2000, script = ann_when_asked },
  })
  local id = env:create({ to = "+14155550192", prompt = "Say hello." })
  local call = env:wait_final(id, 30000)
  completed_with_ann(call)
  T.eq(#env.rt.sessions, 1, "the session opened while it rang talked")
  T.lt(env.rt.sessions[1].opened_at, env.tw.calls[1].answered_at, "opened while it rang")
end, { timeout = 30000 })

T.test("the session opened while the phone rang is told the date and time of the answer, not of the dial", function()
  local instructions = require "callagent.instructions"
  local env = kit.start({
    config = { retry = { maxAttempts = 1 } },
    twilio = { behaviour = { answer = true, ring_ms = 600 } },
    realtime = { script = ann_when_asked },
  })
  local id = env:create({ to = "+14155550193", prompt = "Say hello." })
  T.wait_for(function()
    return env.rt.sessions[1] and env.rt.sessions[1].updates >= 1
  end, 3000, "set up while it rings")
  -- Three hours pass while it rings (the wall clock the instructions read).
  local real_time = os.time
  T.shorten(os, "time", function(t)
    return t and real_time(t) or real_time() + 3 * 3600
  end)
  local call = env:wait_final(id, 30000)
  completed_with_ann(call)
  T.eq(#env.rt.sessions, 1, "the session opened while it rang talked")
  local s = env.rt.sessions[1]
  local told, told_at = {}, nil
  for _, e in ipairs(s.events) do
    if e.type == "session.update" then
      told_at = e.at
      told[#told + 1] = e.session.instructions:match("Current date and time where you are calling: ([^\n]-) %(time zone")
    end
  end
  T.eq(#told, 2, "the dial's instructions, then the answer's time")
  local now = os.time()
  local near = {}
  for _, dt in ipairs({ -60, 0 }) do
    near[instructions.local_time("America/Los_Angeles", now + dt)] = true
  end
  T.ok(near[told[2]], "the answer's time: " .. tostring(told[2]))
  T.ne(told[1], told[2], "not the dial's")
  T.ok(s.config.instructions:find(told[2], 1, true), "the session's instructions now hold it")
  T.lt(told_at, s.response_creates[1].at, "told before the greeting was asked for")
end, { timeout = 30000 })

T.test("a session taken over before its session.updated is told the answer's time once it is confirmed, never if it is refused", function()
  local instructions_mod = require "callagent.instructions"
  local real_time = os.time
  for _, refused in ipairs({ false, true }) do
    local env = kit.start({
      config = { retry = { maxAttempts = 1 } },
      -- The answer (600 ms) comes before the setup's answer (1.5 s).
      twilio = { behaviour = { answer = true, ring_ms = 600 } },
      realtime = {
        -- An update sent behind the setup is answered right after it.
        update_delay_ms = { 1500, 0 },
        -- The setup refused, a later update of the instructions alone applied
        -- (as the service does: the refused one is not applied, the session
        -- stays in its default formats).
        refuse_update = refused and { "invalid_value", "Invalid value: 'x'.", updates = 1 } or nil,
        script = ann_when_asked,
      },
    })
    local id = env:create({ to = "+14155550194", prompt = "Say hello." })
    T.wait_for(function()
      return env.rt.sessions[1] and #env.rt.sessions[1].events > 0
    end, 3000, "set up while it rings")
    -- Three hours pass while it rings (the wall clock the instructions read).
    T.shorten(os, "time", function(t)
      return t and real_time(t) or real_time() + 3 * 3600
    end)
    local call = env:wait_final(id, 30000)
    os.time = real_time -- the next case dials at the real time (T.shorten restores it too)
    local s = env.rt.sessions[1]
    T.eq(#env.rt.sessions, 1, "the session opened while it rang, taken over")
    T.lt(s.opened_at, env.tw.calls[1].answered_at, "opened while it rang")
    local updates = {}
    for _, e in ipairs(s.events) do
      if e.type == "session.update" then
        updates[#updates + 1] = e
      end
    end
    if refused then
      T.eq({ call.status, call.endReason }, { "failed", "model_error" })
      T.match(call.lastError, "^model refused the session: invalid_value: ", "the refusal, not what came after it")
      T.eq({ #updates, #s.response_creates }, { 1, 0 }, "nothing more sent to a session the service refused")
    else
      completed_with_ann(call)
      T.eq(#updates, 2, "the setup, then the answer's time")
      T.ge(updates[2].at, updates[1].at + 1400, "sent once the setup was confirmed (1.5 s after it came), not before")
      local told = updates[2].session.instructions:match("Current date and time where you are calling: ([^\n]-) %(time zone")
      local near = {}
      for _, dt in ipairs({ -60, 0 }) do
        near[instructions_mod.local_time("America/Los_Angeles", real_time() + 3 * 3600 + dt)] = true
      end
      T.ok(near[told], "the answer's time: " .. tostring(told))
      T.lt(updates[2].at, s.response_creates[1].at, "told before the greeting was asked for")
    end
    env:close()
  end
end, { timeout = 30000 })

T.test("the callee hangs up while the model session is still opening: lastError says so; a hang-up through the API then does not", function()
  for _, how in ipairs({ "callee", "api" }) do
    local env = kit.start({
      config = { retry = { maxAttempts = 1 } },
      realtime = { refuse_update = true }, -- session.updated never comes
    })
    local id = env:create({ to = "+14155550196", prompt = "Say hello." })
    local c = assert(env.tw:wait_call(10000))
    assert(c:wait_stream(10000))
    if how == "callee" then
      c:hangup()
    else
      local status = env:api("POST", "/v1/calls/" .. id .. "/hangup")
      T.eq(status, 202, "hang-up accepted")
    end
    local call = env:wait_final(id, 20000)
    if how == "callee" then
      T.eq({ call.status, call.endReason }, { "completed", "callee_hung_up" })
      T.eq(call.lastError, "the phone side ended before the model session was ready")
    else
      T.eq(call.endReason, "hung_up_by_api")
      T.eq(call.lastError, nil, "the API's hang-up is no fault of the phone side's")
    end
  end
end, { timeout = 40000 })

T.run()
