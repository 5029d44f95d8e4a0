-- Retries, statuses and endings that do not need a conversation: busy,
-- no-answer, failed dials, exhausted retries, out-of-order callbacks,
-- API rejections, hang-ups through the REST API.
local T = require "testing"
local kit = require "callkit"
local timer = require "callagent.timer"
local json = require "callagent.json"
local log = require "callagent.log"
local fetch = require "callagent.fetch"
local url = require "callagent.url"
local fake_twilio = require "fakes.twilio"

local function ms(iso)
  local y, mo, d, h, mi, s, frac = iso:match("^(%d+)-(%d+)-(%d+)T(%d+):(%d+):(%d+)%.(%d+)Z$")
  return ((((tonumber(d) * 24 + tonumber(h)) * 60 + tonumber(mi)) * 60) + tonumber(s)) * 1000 + tonumber(frac)
end

-- The callee reports at once, so an answered attempt ends quickly.
local function quick_report(session)
  assert(session:wait_event("response.create", 5000))
  session:report_and_goodbye({ summary = "Reached them.", outcome = "success" }, { ms = 100, text = "Bye." })
end

T.test("busy, then no answer, then success on attempt 3, with the backoff delays", function()
  local n = 0
  local env = kit.start({
    twilio = {
      behaviour = function()
        n = n + 1
        if n == 1 then
          return "busy"
        elseif n == 2 then
          return "no-answer"
        end
        return "answer"
      end,
    },
    realtime = { script = quick_report },
    -- A large factor keeps the bounds apart: each delay's upper bound is the
    -- next power of the factor, and leaves a loaded ASan run room.
    config = { retry = { maxAttempts = 3, initialDelayMs = 100, backoffFactor = 8 } },
  })
  local id = env:create({ to = "+14155550101", prompt = "Say hello." })
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "completed")
  T.eq(call.attempt, 3)
  T.eq(#call.attempts, 3)
  T.eq(call.attempts[1].status, "busy")
  T.eq(call.attempts[2].status, "no_answer")
  T.eq(call.attempts[3].status, "completed")
  T.eq(call.report.outcome, "success")
  local d1 = ms(call.attempts[2].startedAt) - ms(call.attempts[1].endedAt)
  local d2 = ms(call.attempts[3].startedAt) - ms(call.attempts[2].endedAt)
  T.ge(d1, 90, "first retry after initialDelayMs")
  T.lt(d1, 800, "first retry before initialDelayMs * backoffFactor")
  T.ge(d2, 790, "second retry after initialDelayMs * backoffFactor")
  T.lt(d2, 6400, "second retry before initialDelayMs * backoffFactor^2")
  T.eq(#env.tw.calls, 3)
  T.diag(string.format("retry delays: %d ms, %d ms", d1, d2))
end, { timeout = 40000 })

T.test("the live record shows nextAttemptAt while a retry waits, and no internal fields", function()
  local n = 0
  local env = kit.start({
    twilio = {
      behaviour = function()
        n = n + 1
        return n == 1 and "busy" or "answer"
      end,
    },
    realtime = { script = quick_report },
    config = { retry = { maxAttempts = 2, initialDelayMs = 800, backoffFactor = 1 } },
  })
  local id = env:create({ to = "+14155550109", prompt = "Say hello." })
  local waiting = env:wait(id, function(r)
    return r.status == "queued" and r.attempt == 1
  end, 10000, "the retry wait")
  T.match(waiting.nextAttemptAt, "^%d%d%d%d%-%d%d%-%d%dT[%d:.]+Z$", "nextAttemptAt while waiting")
  local dialing = env:wait(id, function(r)
    return r.attempt == 2
  end, 10000, "the second attempt")
  T.eq(dialing.nextAttemptAt, nil, "nextAttemptAt once the retry dialed")
  local call = env:wait_final(id, 15000)
  T.eq(call.status, "completed")
  T.eq(call.endReason ~= nil, true)
  for i, a in ipairs(call.attempts) do
    for k in pairs(a) do
      T.ok(({ n = 1, status = 1, startedAt = 1, endedAt = 1, answeredAt = 1, reason = 1, providerCallId = 1 })[k],
        "attempt " .. i .. " field " .. k)
    end
  end
end, { timeout = 30000 })

T.test("a call hung up while it waits for a retry ends canceled, without nextAttemptAt, and is not dialed again", function()
  local env = kit.start({
    twilio = { behaviour = "busy" },
    config = { retry = { maxAttempts = 3, initialDelayMs = 600, backoffFactor = 1 } },
  })
  local id = env:create({ to = "+14155550110", prompt = "Say hello." })
  env:wait(id, function(r)
    return r.status == "queued" and r.nextAttemptAt ~= nil
  end, 10000, "the retry wait")
  T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
  local call = env:wait_final(id, 5000)
  T.eq(call.status, "canceled")
  T.eq(call.nextAttemptAt, nil, "no next attempt for a final call")
  timer.sleep(1200) -- twice the retry's wait: it would have been dialed by now
  T.eq(#env.tw.calls, 1, "not dialed again")
  T.eq(env:get(id).nextAttemptAt, nil, "as stored")
  -- The notification goes out after the call is final, on its own time.
  T.wait_for(function()
    return #env.hooks.received >= 1
  end, 5000, "the notification")
  T.eq(#env.hooks.received, 1, "notified once")
end, { timeout = 30000 })

T.test("a notification answered 408 or 429 is sent again; 400 is not; a hooksUrl query stays after /agent", function()
  for _, case in ipairs({ { 408, 2 }, { 429, 2 }, { 400, 1 } }) do
    local env = kit.start({
      twilio = { behaviour = "busy" },
      config = { retry = { maxAttempts = 1 } },
      hooks = { fail_first = 1, fail_status = case[1], query = "?source=callagent" },
    })
    local id = env:create({ to = "+14155550103", prompt = "Say hello." })
    env:wait_final(id, 10000)
    T.wait_for(function()
      return #env.hooks.received >= case[2]
    end, 5000, "notification")
    timer.sleep(300)
    T.eq(#env.hooks.received, case[2], "answered " .. case[1])
    T.eq(env.hooks.received[1].query, { source = "callagent" }, "POST /hooks/agent?source=callagent")
  end
end)

T.test("retries exhausted: the final status is the last attempt's and it is notified once", function()
  local env = kit.start({
    twilio = { behaviour = "busy" },
    config = { retry = { maxAttempts = 2, initialDelayMs = 50, backoffFactor = 1 } },
  })
  local id = env:create({ to = "+14155550102", prompt = "Say hello." })
  local call = env:wait_final(id, 10000)
  T.eq(call.status, "busy")
  T.eq(#call.attempts, 2)
  T.eq(call.report, nil)
  T.wait_for(function()
    return #env.hooks.received >= 1
  end, 5000, "notification")
  timer.sleep(200)
  T.eq(#env.hooks.received, 1)
  T.eq(env.hooks.received[1].json.data.status, "busy")
  T.eq(env.hooks.received[1].json.data.report, json.null)
  T.match(env.hooks.received[1].json.message, "No report was filed")
end)

T.test("a status not in retryStatuses is final at once", function()
  local env = kit.start({
    twilio = { behaviour = "no-answer" },
    config = { retry = { maxAttempts = 3, initialDelayMs = 50, retryStatuses = { "busy" } } },
  })
  local id = env:create({ to = "+14155550103", prompt = "Say hello." })
  local call = env:wait_final(id, 10000)
  T.eq(call.status, "no_answer")
  T.eq(#call.attempts, 1)
end)

T.test("a dial the Twilio API refuses fails with Twilio's error in lastError, and is not retried", function()
  local env = kit.start({
    twilio = { behaviour = "reject-api" },
    config = { retry = { maxAttempts = 2, initialDelayMs = 50 } },
  })
  local id = env:create({ to = "+14155550104", prompt = "Say hello." })
  local call = env:wait_final(id, 10000)
  T.eq(call.status, "failed")
  T.eq(#call.attempts, 1, "a refusal for good (HTTP 400) is not retried")
  T.match(call.lastError, "^twilio 21215: .*%(HTTP 400%)")
  T.match(call.attempts[1].reason, "21215")
end)


T.test("a Twilio error whose code is null or no number is told by its message, not as a Lua value", function()
  local answers = {
    { 503, '{"code":null,"message":"Service unavailable","status":503}', "^twilio error: Service unavailable %(HTTP 503%)$" },
    { 400, '{"code":{"n":1},"message":"Bad","status":400}', "^twilio error: Bad %(HTTP 400%)$" },
    { 400, '{"code":21215.0,"message":"Geo","status":400}', "^twilio 21215: Geo %(HTTP 400%)$" },
    { 502, "<html><body>Bad gateway</body></html>", "^twilio answered HTTP 502$" },
  }
  local n = 0
  local base = kit.rest_stub(function()
    n = n + 1
    local a = answers[n]
    return a[1], a[2], { ["Content-Type"] = a[2]:sub(1, 1) == "{" and "application/json" or "text/html" }
  end)
  local env = kit.start({ config = { twilio = { apiBaseUrl = base },
    retry = { maxAttempts = 1 } } })
  for i, a in ipairs(answers) do
    local id = env:create({ to = "+14155550107", prompt = "Say hello." })
    local call = env:wait_final(id, 5000)
    T.eq(call.status, "failed")
    T.match(call.lastError, a[3], "answer " .. i)
  end
end)

T.test("a vendor's error is kept in lastError as one line of UTF-8, at most 500 bytes", function()
  local env = kit.start({
    twilio = { behaviour = { answer = "reject-api", reject_message = "bad\n\27[31mnews \255 " .. string.rep("x", 10000) } },
    config = { retry = { maxAttempts = 1 } },
  })
  local id = env:create({ to = "+14155550104", prompt = "Say hello." })
  local call = env:wait_final(id, 10000)
  T.eq(call.status, "failed")
  T.match(call.lastError, "^twilio 21215: bad  %[31mnews \239\191\189 xxx")
  T.ok(utf8.len(call.lastError), "UTF-8")
  T.no_match(call.lastError, "[%z\1-\31\127]", "no control character")
  T.ok(#call.lastError <= 503, "bounded: " .. #call.lastError .. " bytes")
  T.match(call.lastError, "x…$", "cut with an ellipsis")
  T.eq(call.attempts[1].reason, call.lastError, "the attempt's reason alike")
end)

T.test("ringing delivered after in-progress never moves the call backwards", function()
  local states = {}
  local env = kit.start({
    twilio = { behaviour = { callbacks_out_of_order = true } },
    realtime = { script = quick_report },
    on = {
      status = function(_, from, to)
        states[#states + 1] = (from or "-") .. ">" .. to
      end,
    },
  })
  local id = env:create({ to = "+14155550105", prompt = "Say hello." })
  local call = env:wait_final(id, 15000)
  T.eq(call.status, "completed")
  T.eq(table.concat(states, " "), "->queued queued>dialing dialing>in_progress in_progress>completed")
  -- The late ringing callback was accepted (2xx) but ignored.
  local late
  for _, cb in ipairs(env.tw.calls[1].callbacks) do
    if cb.status == "ringing" then
      late = cb
    end
  end
  T.ok(late, "a ringing callback was sent")
  T.eq(late.response_status, 204)
end)

T.test("hanging up through the API while it rings cancels the call without retries", function()
  local env = kit.start({ twilio = { behaviour = { ring_ms = 5000 } } })
  local id = env:create({ to = "+14155550106", prompt = "Say hello." })
  env:wait(id, function(r)
    return r.status == "dialing" and r.attempts[1] and r.attempts[1].providerCallId
  end, 5000, "dialing")
  local status, body = env:api("POST", "/v1/calls/" .. id .. "/hangup")
  T.eq(status, 202)
  T.eq(body.callId, id)
  local call = env:wait_final(id, 5000)
  T.eq(call.status, "canceled")
  T.eq(call.endReason, "canceled by API")
  T.eq(#call.attempts, 1)
  T.eq(call.attempts[1].reason, "canceled by API")
  local again = env:api("POST", "/v1/calls/" .. id .. "/hangup")
  T.eq(again, 409)
end)

-- Twilio's status callback and its answer to the hang-up request travel
-- apart: the final status may come first, and carries no reason of ours.
T.test("an API hang-up keeps its reason when the final status callback beats Twilio's answer", function()
  -- Ringing: the canceled callback comes 500 ms before the cancel's answer.
  local env = kit.start({ twilio = { behaviour = { ring_ms = 8000, update_delay_ms = 500 } } })
  local id = env:create({ to = "+14155550106", prompt = "Say hello." })
  env:wait(id, function(r)
    return r.status == "dialing" and r.attempts[1] and r.attempts[1].providerCallId
  end, 5000, "dialing")
  T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
  local call = env:wait_final(id, 8000)
  T.eq(call.status, "canceled")
  T.eq(call.endReason, "canceled by API")
  T.eq(call.attempts[1].reason, "canceled by API")
  env:close()
  -- Answered, its stream not come yet: completed arrives with the answer.
  env = kit.start({ twilio = { behaviour = { ring_ms = 50, voice_delay_ms = 3000 } } })
  id = env:create({ to = "+14155550106", prompt = "Say hello." })
  env:wait(id, function(r)
    return r.status == "in_progress"
  end, 5000, "answered")
  T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
  call = env:wait_final(id, 15000)
  T.eq(call.status, "completed")
  T.eq(call.endReason, "hung_up_by_api", "not callee_hung_up: callagent hung up")
  T.eq(call.attempts[1].reason, "hung_up_by_api")
end)

-- Waits until callagent has told the fake Twilio to end call tw.
local function wait_told_to_end(tw, ms)
  T.wait_for(function()
    return tw.hangup_requested_at ~= nil
  end, ms, "Twilio told to end the call")
end

-- The model greets for hello_ms, reports success and says goodbye.
local function short_call_script(hello_ms)
  return function(session)
    assert(session:wait_event("response.create", 5000))
    session:speak({ ms = hello_ms, text = "Hello, a short call." })
    session:call_function("report_call", { summary = "Done.", outcome = "success" })
    assert(session:wait_event("response.create", 5000))
    session:speak({ ms = 200, text = "Goodbye!" })
  end
end

T.test("a cancel Twilio refuses is asked again, so the phone stops ringing; the call is canceled at once", function()
  local env = kit.start({ twilio = { behaviour = { ring_ms = 6000, update_fail = 503, update_fail_times = 1 } } })
  local id = env:create({ to = "+14155550401", prompt = "Hi." })
  env:wait(id, function(r)
    return r.attempts[1] and r.attempts[1].providerCallId
  end, 5000, "the call placed")
  T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
  local call = env:wait_final(id, 5000)
  T.eq(call.status, "canceled")
  local tw = env.tw.calls[1]
  assert(tw:wait_final(5000), "the call over at Twilio")
  T.eq(tw.final, "canceled", "ended by the second cancel, not answered")
  T.eq(tw.answered_at, nil)
  T.eq(#tw.updates, 2)
  T.eq({ tw.updates[1].params.Status, tw.updates[2].params.Status }, { "canceled", "canceled" })
  T.lt(tw.updates[2].at - tw.updates[1].at, 2000, "asked again about a second later")
end, { timeout = 30000 })

T.test("a hang-up asked for while Twilio is still placing the call ends the call once Twilio answers", function()
  -- Twilio answers the create request late, and sends no callback before
  -- it: callagent cannot know the call's sid when the hang-up is asked for.
  local env = kit.start({ twilio = { create_delay_ms = 800, behaviour = { initiated_ms = 3000, ring_ms = 5000 } } })
  local id = env:create({ to = "+14155550112", prompt = "Say hello." })
  local rec = env:wait(id, function(r)
    return r.status == "dialing"
  end, 5000, "dialing")
  T.eq(rec.attempts[1].providerCallId, nil, "Twilio has not answered yet")
  T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
  local call = env:wait_final(id, 5000)
  T.eq(call.status, "canceled")
  -- Once Twilio answers with the call's sid, the ringing call is ended.
  local tw = env.tw.calls[1]
  wait_told_to_end(tw, 3000)
  T.ok(tw.hangup_requested_at - tw.created_at < 2000, "ended well before it would have been answered")
  T.eq(tw.final, "canceled")
  T.eq(tw.answered_at, nil, "never answered")
  T.eq(env:get(id).attempts[1].providerCallId, tw.sid, "the attempt keeps Twilio's sid")
end)

T.test("a call answered before Twilio's answer to the dial keeps its sid and is hung up through the API", function()
  -- The status callbacks and the voice webhook come before the 201: the call
  -- talks and reports before callagent learns the sid (2 s late).
  local env = kit.start({
    twilio = { create_delay_ms = 2000 },
    realtime = { script = short_call_script(300) },
  })
  local id = env:create({ to = "+14155550113", prompt = "Say hello." })
  -- Each signed status callback names the call: its sid is known long before the 201.
  local rec = env:wait(id, function(r)
    return r.attempts[1] and r.attempts[1].providerCallId
  end, 1500, "the call's sid, from its callbacks")
  T.eq(rec.attempts[1].providerCallId, env.tw.calls[1].sid)
  local call = env:wait_final(id, 15000)
  T.eq(call.status, "completed")
  T.eq(call.report.outcome, "success")
  local tw = env.tw.calls[1]
  T.eq(call.attempts[1].providerCallId, tw.sid)
  T.ok(tw.hangup_requested_at, "callagent hung up through Twilio's API")
  T.eq(tw.final, "completed")
  T.ok(tw.voice_request and tw.voice_request.at - tw.created_at < 2000, "the call was answered before the 201")
end, { timeout = 30000 })

T.test("a call whose answered callback is lost is in progress from its voice webhook, and is not retried", function()
  -- Twilio does not retry a status callback it could not deliver.
  local env = kit.start({
    twilio = { behaviour = { lost_callbacks = { answered = true } } },
    realtime = { script = short_call_script(600) },
  })
  local id = env:create({ to = "+14155550114", prompt = "Say hello." })
  local rec = env:wait(id, function(r)
    return r.status ~= "queued" and r.status ~= "dialing"
  end, 5000, "answered")
  T.eq(rec.status, "in_progress", "talking, not dialing (the ring timeout would end a call still dialing)")
  T.eq(rec.attempts[1].status, "in_progress")
  T.ok(rec.attempts[1].answeredAt, "answeredAt")
  local call = env:wait_final(id, 15000)
  T.eq(call.status, "completed")
  T.eq(call.report.outcome, "success")
  T.eq(#call.attempts, 1, "not dialed again")
  local tw = env.tw.calls[1]
  T.eq(tw.lost_callbacks, 1, "the answered callback was lost")
  for _, cb in ipairs(tw.callbacks) do
    T.ne(cb.status, "in-progress", "no in-progress callback delivered")
  end
end, { timeout = 30000 })

-- Creates a call and hangs it up through the API as soon as Twilio has
-- answered, callagent not knowing yet: the call id, Twilio's call, and when
-- the hang-up was asked for.
local function hang_up_at_answer(env, to)
  local id = env:create({ to = to, prompt = "Say hello." })
  local tw = env.tw:wait_call(5000)
  assert(tw:wait_status("in-progress", 3000), "Twilio to answer")
  T.eq(env:get(id).status, "dialing", "callagent does not know yet")
  local asked = timer.now()
  T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
  return id, tw, asked
end

T.test("a call answered just as the API hangs it up gets no stream, and ends", function()
  -- Twilio has answered, but callagent does not know yet: the answered
  -- callback is lost and the voice webhook is on its way. The hang-up, sent
  -- as a cancel (no effect on an answered call at Twilio), is answered late;
  -- meanwhile the voice webhook comes.
  local env = kit.start({
    twilio = { behaviour = { ring_ms = 300, lost_callbacks = { answered = true }, voice_delay_ms = 600, update_delay_ms = 1000 } },
    realtime = {
      script = function(session)
        session:wait_event("response.create", 5000) -- and stays silent
      end,
    },
  })
  local id, tw, asked = hang_up_at_answer(env, "+14155550118")
  local call = env:wait_final(id, 5000)
  T.eq(call.status, "canceled")
  T.ok(tw.voice_request, "the voice webhook came")
  assert(tw:wait_final(5000), "the call over at Twilio")
  T.eq(tw.stream_started_at, nil, "no stream after the hang-up")
  T.lt(tw.ended_at - asked, 3000, "ended soon after the hang-up")
end, { timeout = 20000 })

T.test("a call answered while the API's cancel is on its way is hung up again, as answered", function()
  -- The answered callback comes while Twilio's answer to the cancel is
  -- late; the voice webhook, which would get a <Hangup/>, later still.
  local env = kit.start({
    twilio = { behaviour = { ring_ms = 300, callback_delay_ms = 500, voice_delay_ms = 5000, update_delay_ms = 2000 } },
  })
  local id, tw, asked = hang_up_at_answer(env, "+14155550119")
  assert(tw:wait_final(6000), "the call over at Twilio")
  T.lt(tw.ended_at - asked, 3000, "ended soon after the hang-up, not at the voice webhook")
  T.eq(#tw.updates, 2, "a cancel, then a hang-up")
  T.eq(tw.updates[1].params.Status, "canceled")
  T.eq(tw.updates[2].params.Status, "completed")
  local call = env:wait_final(id, 5000)
  T.eq(call.status, "completed")
  T.eq(call.endReason, "hung_up_by_api")
  T.eq(tw.stream_started_at, nil, "no stream")
end, { timeout = 20000 })

T.test("a dial whose answer times out while Twilio's callbacks show the call placed goes on", function()
  -- Twilio answers the create request after callagent's 2 s timeout; its
  -- callbacks (initiated, ringing) have named the call long before.
  local warned = ""
  local warn = log.warn
  log.warn = function(msg, fields)
    warned = warned .. msg .. "\n"
    return warn(msg, fields)
  end
  T.defer(function()
    log.warn = warn
  end)
  local env = kit.start({
    twilio = { create_delay_ms = 3000, behaviour = { ring_ms = 3500 } },
    realtime = { script = short_call_script(300) },
    config = { twilio = { requestTimeoutSec = 2 } },
  })
  local id = env:create({ to = "+14155550115", prompt = "Say hello." })
  local call = env:wait_final(id, 15000)
  T.eq(call.status, "completed")
  T.eq(call.report.outcome, "success")
  T.eq(#call.attempts, 1, "not dialed again")
  T.eq(#env.tw.calls, 1, "one call placed")
  T.eq(call.attempts[1].providerCallId, env.tw.calls[1].sid)
  T.match(warned, "the dial request failed, but the provider is placing the call", "the dial request did time out")
end, { timeout = 60000 })

T.test("a call Twilio placed although the dial request failed is hung up at its first callback", function()
  -- The create request times out (2 s) and no callback has come: the dial
  -- failed, and with one attempt the call is over. Then Twilio's callbacks
  -- show the call ringing after all.
  local env = kit.start({
    twilio = { create_delay_ms = 3000, behaviour = { initiated_ms = 3500, ring_ms = 30000 } },
    config = { retry = { maxAttempts = 1 }, twilio = { requestTimeoutSec = 2 } },
  })
  local id = env:create({ to = "+14155550116", prompt = "Say hello." })
  local call = env:wait_final(id, 10000)
  T.eq(call.status, "failed")
  local tw = env.tw.calls[1]
  wait_told_to_end(tw, 5000)
  T.eq(tw.final, "canceled")
  T.eq(tw.answered_at, nil, "never answered")
end, { timeout = 60000 })

T.test("a call Twilio placed and answered although the dial request failed is hung up as answered", function()
  -- As above, but the first callback to come is the answered one: a cancel
  -- would not end it at Twilio, and the voice webhook is slow.
  local env = kit.start({
    twilio = {
      create_delay_ms = 3000,
      behaviour = { ring_ms = 3500, lost_callbacks = { initiated = true, ringing = true }, voice_delay_ms = 5000 },
    },
    config = { retry = { maxAttempts = 1 }, twilio = { requestTimeoutSec = 2 } },
  })
  local id = env:create({ to = "+14155550120", prompt = "Say hello." })
  local call = env:wait_final(id, 10000)
  T.eq(call.status, "failed")
  local tw = env.tw.calls[1]
  assert(tw:wait_final(8000), "the call over at Twilio")
  T.eq(tw.final, "completed")
  T.ok(tw.answered_at, "answered")
  T.lt(tw.ended_at - tw.answered_at, 2000, "hung up at its answered callback, not at the voice webhook")
  T.eq(tw.updates[1].params.Status, "completed")
end, { timeout = 30000 })

T.test("with no final callback by the ring timeout, Twilio's API says how the call ended, or it is hung up", function()
  -- Both calls' final callbacks are lost. One was busy at Twilio; the other
  -- still rings there when callagent's ring timeout (1 + 2 s) comes.
  local env = kit.start({
    twilio = {
      behaviour = function(call)
        if call.params.To:match("0121$") then
          return { answer = "busy", lost_callbacks = { completed = true } }
        end
        return { ring_ms = 60000, lost_callbacks = { completed = true } }
      end,
    },
    config = { retry = { maxAttempts = 1 }, call = { ringTimeoutSec = 1, statusGraceSec = 2 } },
  })
  local busy_id = env:create({ to = "+14155550121", prompt = "Say hello." })
  local ringing_id = env:create({ to = "+14155550122", prompt = "Say hello." })
  local busy = env:wait_final(busy_id, 10000)
  T.eq(busy.status, "busy", "Twilio's API said busy")
  T.match(busy.attempts[1].reason, "no final status callback")
  local ringing = env:wait_final(ringing_id, 10000)
  T.eq(ringing.status, "no_answer")
  T.eq(ringing.attempts[1].reason, "ring timeout")
  local tw_busy, tw_ringing
  for _, c in ipairs(env.tw.calls) do
    if c.params.To == "+14155550121" then
      tw_busy = c
    else
      tw_ringing = c
    end
  end
  T.eq(tw_busy.hangup_requested_at, nil, "a call over at Twilio is not hung up")
  wait_told_to_end(tw_ringing, 5000)
  T.eq(tw_ringing.final, "canceled", "the ringing call ended")
end, { timeout = 60000 })

T.test("a cancel Twilio refuses at the ring timeout is asked again, so the phone stops ringing", function()
  local env = kit.start({
    twilio = { behaviour = { ring_ms = 60000, update_fail = 503, update_fail_times = 1 } },
    config = { retry = { maxAttempts = 1 }, call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
  })
  local id = env:create({ to = "+14155550126", prompt = "Say hello." })
  local call = env:wait_final(id, 10000)
  T.eq({ call.status, call.attempts[1].reason }, { "no_answer", "ring timeout" })
  local tw = env.tw.calls[1]
  T.wait_for(function()
    return tw.final ~= nil
  end, 5000, "the call over at Twilio")
  T.eq(tw.final, "canceled", "the ringing call ended")
  T.eq(#tw.updates, 2, "refused once, then asked again")
  T.eq({ tw.updates[1].params.Status, tw.updates[2].params.Status }, { "canceled", "canceled" })
end, { timeout = 30000 })

T.test("a call Twilio's API says is up at the ring timeout is in progress, not canceled and dialed again", function()
  -- Its answered callback is lost and its voice webhook is slow: at the
  -- ring timeout (1 + 1 s) only Twilio's API knows the callee picked up.
  local env = kit.start({
    twilio = { behaviour = { ring_ms = 200, lost_callbacks = { answered = true }, voice_delay_ms = 4000 } },
    realtime = { script = quick_report },
    config = { retry = { maxAttempts = 2, initialDelayMs = 50 }, call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
  })
  local id = env:create({ to = "+14155550123", prompt = "Say hello." })
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "completed", json.encode(call))
  T.eq(call.report and call.report.outcome, "success", "the conversation took place")
  T.eq(#call.attempts, 1)
  T.eq(#env.tw.calls, 1, "dialed once")
  T.eq(env.tw.calls[1].updates[1] and env.tw.calls[1].updates[1].params.Status, "completed", "hung up, not canceled")
end, { timeout = 30000 })

T.test("a ring timeout's cancel the vendor answers saying the callee had answered (no getCall): in progress, not no_answer and dialed again", function()
  -- Its answered callback is lost and its voice webhook is slow: at the
  -- ring timeout (1 + 1 s) only the answer to the cancel (Twilio's leaves an
  -- answered call up, and says in-progress) tells that the callee picked up.
  local dir = kit.twilio_variant("nogetcall", "P.getCall = nil\n")
  local env = kit.start({
    provider_dirs = { dir },
    twilio = { behaviour = { ring_ms = 200, lost_callbacks = { answered = true }, voice_delay_ms = 3500 } },
    realtime = { script = quick_report },
    config = { telephony = { provider = "nogetcall" }, retry = { maxAttempts = 2, initialDelayMs = 50 },
      call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
  })
  local id = env:create({ to = "+14155550127", prompt = "Say hello." })
  local c = assert(env.tw:wait_call(3000))
  local rec = env:wait(id, function(r)
    return r.status ~= "dialing"
  end, 5000, "the ring timeout")
  T.eq({ rec.status, rec.attempts[1].status, rec.attempts[1].answeredAt ~= nil }, { "in_progress", "in_progress", true })
  T.eq({ c.updates[1] and c.updates[1].params.Status, c.voice_request }, { "canceled", nil },
    "on the cancel's answer, before the voice webhook came")
  local call = env:wait_final(id, 20000)
  T.eq({ call.status, call.report and call.report.outcome, #call.attempts }, { "completed", "success", 1 },
    "the conversation took place")
  T.eq(#env.tw.calls, 1, "dialed once")
end, { timeout = 30000 })

T.test("a callee who answers while the ring timeout's refused cancel is asked again, the answered callback lost (no getCall): talks, not no_answer and dialed again", function()
  -- The ring timeout (1 + 1 s) finds the call ringing; Twilio refuses its
  -- cancel (503) and the callee picks up 0.4 s later, the answered callback
  -- lost. Before, the attempt ended no_answer at the refusal, the voice
  -- webhook got <Hangup/>, and the retry rang the callee who had answered.
  local dir = kit.twilio_variant("nogetcall", "P.getCall = nil\n")
  local env = kit.start({
    provider_dirs = { dir },
    twilio = { behaviour = { ring_ms = 2400, lost_callbacks = { answered = true }, update_fail = 503,
      update_fail_times = 1 } },
    realtime = { script = quick_report },
    config = { telephony = { provider = "nogetcall" }, retry = { maxAttempts = 2, initialDelayMs = 200 },
      call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
  })
  local id = env:create({ to = "+14155550129", prompt = "Say hello." })
  local call = env:wait_final(id, 20000)
  T.eq({ call.status, call.report and call.report.outcome, #call.attempts }, { "completed", "success", 1 },
    "the conversation took place: " .. tostring(call.attempts[1] and call.attempts[1].reason))
  T.eq(#env.tw.calls, 1, "dialed once")
  T.eq(env.tw.calls[1].updates[1].params.Status, "canceled", "the ring timeout's cancel, refused")
end, { timeout = 30000 })

T.test("a callee who answers after the ring timeout gave up on a call whose cancels were all refused: its retry is dropped, not rung again", function()
  -- The ring timeout (1 + 1 s) ends the attempt no_answer 1 s after its
  -- refused cancel (statusGraceSec); Twilio refuses every cancel, and the
  -- callee picks up 0.5 s after that, the answered callback lost.
  local dir = kit.twilio_variant("nogetcall", "P.getCall = nil\n")
  local env = kit.start({
    provider_dirs = { dir },
    twilio = { behaviour = { ring_ms = 3500, lost_callbacks = { answered = true }, update_fail = 503 } },
    config = { telephony = { provider = "nogetcall" }, retry = { maxAttempts = 2, initialDelayMs = 2500 },
      call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
  })
  local id = env:create({ to = "+14155550130", prompt = "Say hello." })
  local rec = env:wait(id, function(r)
    return r.status == "queued" and r.attempt == 1
  end, 6000, "the ring timeout's end of the attempt")
  T.eq({ rec.attempts[1].status, rec.attempts[1].reason }, { "no_answer", "ring timeout" })
  local call = env:wait_final(id, 6000)
  T.eq({ call.status, #call.attempts, call.attempts[1].answeredAt ~= nil }, { "no_answer", 1, true })
  T.match(call.lastError, "^not dialed again: the callee answered attempt 1's call after it had ended here")
  T.eq(env.tw.calls[1].voice_request and env.tw.calls[1].voice_request.body:match("<Hangup/>"), "<Hangup/>",
    "the callee hung up by the voice webhook's answer")
  timer.sleep(1500) -- past the retry's due time
  T.eq(#env.tw.calls, 1, "dialed once")
end, { timeout = 30000 })

T.test("a ring timeout's cancel refused after its attempt ended meanwhile (its canceled status came) leaves the retry's ring timer alone", function()
  -- Twilio takes the ring timeout's cancel, but its answer is lost (502,
  -- 2.5 s later): the canceled status ends attempt 1 meanwhile, and its
  -- retry dials. The refusal then set the grace wait's timer in the retry's
  -- "#dial" slot, and the retry's ring timer was no longer the engine's to
  -- stop (an answer, a final status, Engine:close): it fired anyway, up to
  -- ringTimeoutSec + statusGraceSec later, after the app's stop too.
  local warns = T.log_lines("warn")
  local n = 0
  local dir = kit.twilio_variant("nogetcall", "P.getCall = nil\n") -- nothing to ask how it ended
  local env = kit.start({
    provider_dirs = { dir },
    twilio = { behaviour = function()
      n = n + 1
      if n == 1 then
        return { ring_ms = 60000, update_answer_lost_times = 1, update_delay_ms = 2500 }
      end
      return { ring_ms = 60000 }
    end },
    config = { telephony = { provider = "nogetcall" }, retry = { maxAttempts = 2, initialDelayMs = 100 },
      call = { ringTimeoutSec = 1, statusGraceSec = 3 } },
  })
  local id = env:create({ to = "+14155550131", prompt = "Say hello." })
  local engine = env.app.engine
  T.wait_for(function()
    local call = engine.live[id]
    return call and call.attempt == 2 and engine.timers[id .. "#dial"] ~= nil
  end, 8000, "the retry ringing, its ring timer set")
  local ring = engine.timers[id .. "#dial"]
  local function refused()
    for _, l in ipairs(warns) do
      if l.msg == "provider hang-up failed" and l.fields.attempt == 1 then
        return true
      end
    end
  end
  T.ok(not refused(), "the cancel's answer still on its way")
  T.wait_for(refused, 5000, "the refused cancel's answer")
  T.eq(env:get(id).attempt, 2, "the retry still ringing")
  T.ok(engine.timers[id .. "#dial"] == ring, "the engine still holds the retry's ring timer")
end, { timeout = 30000 })

T.test("an API hang-up while the ring timeout's cancel is on its way: the attempt ends canceled, as the call does", function()
  local env = kit.start({
    twilio = { behaviour = { ring_ms = 60000, lost_callbacks = { completed = true }, update_delay_ms = 800 } },
    config = { retry = { maxAttempts = 2, initialDelayMs = 50 }, call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
  })
  local id = env:create({ to = "+14155550128", prompt = "Say hello." })
  local c = assert(env.tw:wait_call(3000))
  T.wait_for(function()
    return c.updates[1]
  end, 5000, "the ring timeout's cancel")
  T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
  local call = env:wait_final(id, 10000)
  T.eq({ call.status, call.endReason, call.attempts[1].status, call.attempts[1].reason },
    { "canceled", "canceled by API", "canceled", "canceled by API" }, "not no_answer with the API's reason")
  T.eq(#env.tw.calls, 1, "dialed once")
end, { timeout = 30000 })

T.test("a provider whose getCall raises at the ring timeout: the attempt ends no_answer, hung up, not stuck dialing", function()
  local dir = kit.twilio_variant("raising", [[
function P:getCall() error("vendor library bug") end
]])
  local env = kit.start({
    provider_dirs = { dir },
    twilio = { behaviour = { ring_ms = 60000, lost_callbacks = { completed = true } } },
    config = { telephony = { provider = "raising" }, retry = { maxAttempts = 1 },
      call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
  })
  local id = env:create({ to = "+14155550124", prompt = "Say hello." })
  local call = env:wait_final(id, 10000)
  T.eq({ call.status, call.attempts[1].reason }, { "no_answer", "ring timeout" })
  wait_told_to_end(env.tw.calls[1], 5000)
  T.wait_for(function()
    return #env.hooks.received == 1
  end, 5000, "the notification")
end, { timeout = 30000 })

T.test("a provider that reports the cancel from inside endCall: a ring timeout still ends no_answer, and is retried", function()
  -- As the mock phone does: the end of a hang-up reported at once, from
  -- inside endCall, before the engine's own end of the attempt.
  local dir = kit.twilio_variant("prompt", [[
P.getCall = nil
function P:endCall(call, attempt)
  self.engine:provider_status(call.callId, attempt.n, { status = attempt.status == "in_progress" and "completed"
    or "canceled", providerCallId = attempt.providerCallId, reason = "hung up" })
  return true
end
]])
  local env = kit.start({
    provider_dirs = { dir },
    twilio = { behaviour = { ring_ms = 60000, lost_callbacks = { completed = true } } },
    config = { telephony = { provider = "prompt" }, retry = { maxAttempts = 2, initialDelayMs = 60000 },
      call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
  })
  local id = env:create({ to = "+14155550125", prompt = "Say hello." })
  local rec = env:wait(id, function(r)
    return r.attempts[1] and r.attempts[1].status ~= "dialing"
  end, 6000, "the ring timeout")
  T.eq({ rec.status, rec.attempts[1].status, rec.attempts[1].reason }, { "queued", "no_answer", "ring timeout" },
    "a ring timeout, not a cancel: retried")
end, { timeout = 30000 })

T.test("a late ringing callback for a call that has ended hangs nothing up", function()
  local env = kit.start({ realtime = { script = short_call_script(300) } })
  local id = env:create({ to = "+14155550118", prompt = "Say hello." })
  local call = env:wait_final(id, 15000)
  T.eq(call.status, "completed")
  local tw = env.tw.calls[1]
  local updates = #tw.updates
  T.eq(updates, 1, "callagent's own hang-up")
  -- Twilio delivers the call's ringing callback late, after completed.
  local target = env.base .. "/status?callId=" .. id .. "&attempt=1"
  local params = { CallSid = tw.sid, CallStatus = "ringing", SequenceNumber = "1", AccountSid = kit.ACCOUNT }
  local res = assert(fetch(target, { method = "POST", body = url.form_encode(params), headers = {
    ["Content-Type"] = "application/x-www-form-urlencoded",
    ["X-Twilio-Signature"] = fake_twilio.sign(kit.TOKEN, target, params),
  } }))
  T.eq(res.status, 204)
  timer.sleep(500)
  T.eq(#tw.updates, updates, "no hang-up for the call the attempt had")
  T.eq(env:get(id).status, "completed", "the record unchanged")
end)

T.test("a late callback for an ended call, with a store that raises on reads, is answered 204, not 500", function()
  local env = kit.start({ realtime = { script = short_call_script(300) } })
  local id = env:create({ to = "+14155550119", prompt = "Say hello." })
  T.eq(env:wait_final(id, 15000).status, "completed")
  local tw = env.tw.calls[1]
  local updates = #tw.updates
  -- The store's way to say its disk failed: a read that raises.
  env.app.store.get_call = function()
    error("disk I/O error")
  end
  local target = env.base .. "/status?callId=" .. id .. "&attempt=1"
  local params = { CallSid = tw.sid, CallStatus = "ringing", SequenceNumber = "1", AccountSid = kit.ACCOUNT }
  local res = assert(fetch(target, { method = "POST", body = url.form_encode(params), headers = {
    ["Content-Type"] = "application/x-www-form-urlencoded",
    ["X-Twilio-Signature"] = fake_twilio.sign(kit.TOKEN, target, params),
  } }))
  T.eq(res.status, 204, "a callback for a call not live changes nothing: answered as such")
  timer.sleep(300)
  T.eq(#tw.updates, updates, "nothing hung up on a read that failed")
end)

T.test("when Twilio's API refuses the hang-up, closing the stream ends the call at once", function()
  -- Twilio ends a call whose <Connect><Stream> closes: callagent need not
  -- keep the callee waiting for a final status that will not come.
  local env = kit.start({ twilio = { update_fail = 503 }, realtime = { script = short_call_script(300) } })
  local id = env:create({ to = "+14155550117", prompt = "Say hello." })
  local call = env:wait_final(id, 15000)
  T.eq(call.status, "completed")
  T.eq(call.report.outcome, "success")
  local tw = env.tw.calls[1]
  T.ok(#tw.updates >= 1, "callagent asked Twilio to hang up")
  T.ok(tw.stream_closed and tw.stream_closed.by == "app", "callagent closed the stream")
  T.lt(tw.stream_closed.at - tw.updates[1].at, 2000, "right after the refused hang-up, not 10 s later")
end, { timeout = 30000 })

T.test("hanging up through the API during the conversation completes it with that reason", function()
  local env = kit.start({
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 5000, text = "A long story." })
      end,
    },
  })
  local id = env:create({ to = "+14155550107", prompt = "Tell a long story." })
  env:wait(id, function(r)
    return r.status == "in_progress"
  end, 8000, "in progress")
  timer.sleep(300)
  T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
  local call = env:wait_final(id, 15000)
  T.eq(call.status, "completed")
  T.eq(call.endReason, "hung_up_by_api")
  T.eq(call.report, nil)
end, { timeout = 40000 })

T.test("the callee hanging up before a report completes the call honestly, without a report", function()
  local env = kit.start({
    twilio = { behaviour = { hangup_after_ms = 800 } },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 3000, text = "Hello there, I am calling about..." })
      end,
    },
  })
  local id = env:create({ to = "+14155550108", prompt = "Say hello." })
  local call = env:wait_final(id, 15000)
  T.eq(call.status, "completed")
  T.eq(call.endReason, "callee_hung_up")
  T.eq(call.report, nil)
  T.wait_for(function()
    return #env.hooks.received >= 1
  end, 5000, "notification")
  T.match(env.hooks.received[1].json.message, "callee_hung_up")
end, { timeout = 40000 })

T.run()
