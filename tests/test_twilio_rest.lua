-- Twilio's REST answers to a dial, as Twilio gives them: errors that no retry
-- cures end the call at once; 429 (20429, never processed) is sent again;
-- 5xx is left to the retry policy.
local T = require "testing"
local kit = require "callkit"
local timer = require "callagent.timer"

T.test("a dial Twilio refuses for the number or the account fails at once, naming Twilio's code, and is not retried", function()
  local refusals = {
    { 400, 21211, "Invalid 'To' Phone Number: +14155550999" },
    { 400, 21214, "'To' phone number cannot be reached" },
    { 400, 21215, "Account not authorized to call +14155550999. Perhaps you need to enable some international permissions" },
    { 400, 21216, "Call blocked by Twilio" },
    { 401, 20003, "Authenticate" },
  }
  local n = 0
  local env = kit.start({
    twilio = {
      behaviour = function()
        n = n + 1
        local r = refusals[n]
        return { answer = "reject-api", reject_status = r[1], reject_code = r[2], reject_message = r[3] }
      end,
    },
    config = { retry = { maxAttempts = 3, initialDelayMs = 50 } },
  })
  for i, r in ipairs(refusals) do
    local id = env:create({ to = "+14155550999", prompt = "Say hello." })
    local call = env:wait_final(id, 5000)
    T.eq(call.status, "failed", "refusal " .. r[2])
    T.eq(#call.attempts, 1, "no retry after " .. r[2])
    T.eq(call.lastError, string.format("twilio %d: %s (HTTP %d)", r[2], r[3], r[1]))
    T.eq(call.attempts[1].reason, call.lastError)
    T.eq(call.endReason, call.lastError)
    T.ok(not call.lastError:find(kit.TOKEN, 1, true), "no auth token")
    T.eq(#env.tw.calls, i, "one dial per call")
  end
end)

T.test("a dial Twilio answers 5xx fails the attempt and follows the retry policy", function()
  local n = 0
  local env = kit.start({
    twilio = {
      behaviour = function()
        n = n + 1
        if n == 1 then
          return { answer = "reject-api", reject_status = 503, reject_code = 20500, reject_message = "Service Unavailable" }
        end
        return "busy"
      end,
    },
    config = { retry = { maxAttempts = 2, initialDelayMs = 50 } },
  })
  local id = env:create({ to = "+14155550998", prompt = "Say hello." })
  local call = env:wait_final(id, 10000)
  T.eq(#call.attempts, 2)
  T.eq(call.attempts[1].status, "failed")
  T.eq(call.attempts[1].reason, "twilio 20500: Service Unavailable (HTTP 503)")
  T.eq(call.attempts[2].status, "busy")
  T.eq(call.status, "busy")
end)

T.test("a dial answered 429 (20429) is sent again after Retry-After, within the same attempt", function()
  local env = kit.start({
    twilio = { behaviour = "busy", rate_limit = 1, retry_after = "1" },
    config = { retry = { maxAttempts = 1 } },
  })
  local t0 = timer.now()
  local id = env:create({ to = "+14155550997", prompt = "Say hello." })
  local tw_call = assert(env.tw:wait_call(5000))
  local waited = timer.now() - t0
  local call = env:wait_final(id, 10000)
  T.eq(env.tw._rate_limited, 1, "one 429")
  T.eq(#call.attempts, 1)
  T.eq(call.attempts[1].providerCallId, tw_call.sid, "the second try placed the call")
  T.eq(call.status, "busy")
  T.ge(waited, 900, "Retry-After: 1 waited")
  T.lt(waited, 3000)
end)

T.test("a dial still answered 429 after two more tries fails with 20429, and the retry policy decides", function()
  local env = kit.start({
    twilio = { behaviour = "busy", rate_limit = 3, retry_after = "0" },
    config = { retry = { maxAttempts = 2, initialDelayMs = 50 } },
  })
  local id = env:create({ to = "+14155550996", prompt = "Say hello." })
  local call = env:wait_final(id, 10000)
  T.eq(env.tw._rate_limited, 3)
  T.eq(#call.attempts, 2, "a rate limit is no refusal for good")
  T.eq(call.attempts[1].status, "failed")
  T.eq(call.attempts[1].reason, "twilio 20429: Too Many Requests (HTTP 429)")
  T.eq(call.attempts[2].status, "busy")
end)


-- A ringing-to-be call whose first dial Twilio answers 429 (Retry-After:
-- after seconds): env and the call's id, once the 429 came.
local function rate_limited_dial(to, after)
  local env = kit.start({
    twilio = { behaviour = { ring_ms = 30000 }, rate_limit = 1, retry_after = after },
    config = { retry = { maxAttempts = 1 } },
  })
  local id = env:create({ to = to, prompt = "Say hello." })
  T.wait_for(function()
    return env.tw._rate_limited == 1
  end, 3000, "the 429")
  return env, id
end

T.test("a call hung up through the API while its dial waits out a 429 is not dialed: Twilio gets no second request", function()
  local env, id = rate_limited_dial("+14155550995", "2")
  T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
  local call = env:wait_final(id, 3000)
  T.eq({ call.status, call.endReason }, { "canceled", "canceled by API" })
  timer.sleep(2500) -- past the Retry-After
  T.eq(#env.tw.calls, 0, "no call placed at Twilio for a call already canceled")
  call = env:get(id)
  T.eq({ call.status, #call.attempts, call.attempts[1].status, call.lastError }, { "canceled", 1, "canceled", nil })
end, { timeout = 20000 })

T.test("calls paused while a dial waits out a 429: nothing is sent, the attempt ends canceled, uncounted, and resume dials the call", function()
  local env, id = rate_limited_dial("+14155550993", "1")
  env.app.engine:pause("the public tunnel is down (a test)") -- what the app does when its tunnel dies
  local call = env:wait(id, function(r)
    return r.status == "queued"
  end, 3000, "the call waiting")
  T.eq({ #call.attempts, call.attempts[1].status, call.attempts[1].reason },
    { 1, "canceled", "the public tunnel went down before it was placed" })
  timer.sleep(1200) -- past the Retry-After
  T.eq(#env.tw.calls, 0, "nothing sent while paused")
  env.app.engine:resume()
  local c = assert(env.tw:wait_call(3000))
  call = env:wait(id, function(r)
    return r.attempts[2] and r.attempts[2].providerCallId ~= nil
  end, 3000, "dialed again")
  T.eq({ call.status, call.attempts[2].providerCallId }, { "dialing", c.sid },
    "retry.maxAttempts 1: the canceled attempt did not count")
end, { timeout = 20000 })

T.test("a ringing call answered before the tunnel's cancel came (its answered callback and voice webhook lost) is hung up as answered, ends failed no_stream, and is not dialed again", function()
  local env = kit.start({
    twilio = { behaviour = { answer = true, ring_ms = 100, lost_callbacks = { answered = true, completed = true },
      voice_delay_ms = 5000 } },
  })
  local id = env:create({ to = "+14155550994", prompt = "Say hello." })
  local c = assert(env.tw:wait_call(3000))
  T.wait_for(function()
    return c.answered_at
  end, 3000, "the callee answers")
  env.app.engine:pause("the public tunnel is down (a test)") -- what the app does when its tunnel dies
  local call = env:wait(id, function(r)
    return r.status ~= "dialing" and r.status ~= "in_progress"
  end, 3000, "the call over")
  T.eq({ call.status, call.endReason, #call.attempts, call.attempts[1].status, call.attempts[1].answeredAt ~= nil,
    call.lastError }, { "failed", "no_stream", 1, "failed", true,
    "answered while the public tunnel was down: its voice webhook reached nothing" })
  T.wait_for(function()
    return c.final
  end, 3000, "the answered call hung up")
  T.eq({ c.final, c.end_reason }, { "completed", "api" })
  env.app.engine:resume()
  timer.sleep(300)
  T.eq(#env.tw.calls, 1, "the callee who answered is not called again")
end, { timeout = 20000 })

T.test("the tunnel's cancel of a ringing call taken by Twilio, its answer and the check after it lost: the ring timeout finds it canceled and the call waits, not ended canceled", function()
  local env = kit.start({
    twilio = { behaviour = { ring_ms = 30000, lost_callbacks = { completed = true }, update_answer_lost_times = 1,
      get_fail_times = 1 } },
    config = { retry = { maxAttempts = 1 }, call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
  })
  local id = env:create({ to = "+14155550996", prompt = "Say hello." })
  local c = assert(env.tw:wait_call(3000))
  T.wait_for(function()
    return c.status == "ringing" and env.app.engine:call_view(id).attempts[1].providerCallId
  end, 3000, "ringing")
  env.app.engine:pause("the public tunnel is down (a test)") -- what the app does when its tunnel dies
  local call = env:wait(id, function(r)
    return r.status ~= "dialing"
  end, 5000, "the ring timeout")
  T.eq(c.final, "canceled", "canceled at the vendor")
  T.eq({ call.status, #call.attempts, call.attempts[1].status, call.attempts[1].reason },
    { "queued", 1, "canceled", "the public tunnel went down while it rang" })
  env.app.engine:resume()
  call = env:wait(id, function(r)
    return r.attempts[2] and r.attempts[2].providerCallId ~= nil
  end, 3000, "dialed again")
  T.eq(#env.tw.calls, 2)
end, { timeout = 20000 })

T.test("a stop while a dial waits out a 429: the stop does not wait for it, nothing is dialed, the next start dials the call", function()
  local env, id = rate_limited_dial("+14155550994", "4")
  local t0 = timer.now()
  env.app:stop()
  T.lt(timer.now() - t0, 1500, "the stop waited out the Retry-After")
  timer.sleep(300)
  T.eq(#env.tw.calls, 0, "a dial sent after the stop began")
  -- The next start dials the call again (its first attempt canceled by the stop).
  local app2 = env:next_start()
  T.wait_for(function()
    return #env.tw.calls == 1
  end, 5000, "dialed again by the next start")
  local rec = app2.engine:call_view(id)
  T.eq({ rec.attempt, rec.attempts[1].status, rec.attempts[1].reason }, { 2, "canceled", "callagent stopped while dialing" })
end, { timeout = 20000 })

T.test("a ringing call answered before the stop's cancel came (its answered callback lost, its voice webhook slow) is hung up as answered, not dialed again by the next start", function()
  local env = kit.start({
    twilio = { behaviour = { answer = true, ring_ms = 100, lost_callbacks = { answered = true }, voice_delay_ms = 5000 } },
  })
  local id = env:create({ to = "+14155550995", prompt = "Say hello." })
  local c = assert(env.tw:wait_call(3000))
  T.wait_for(function()
    return c.answered_at
  end, 3000, "the callee answers")
  env.app:stop()
  T.eq({ c.final, c.end_reason }, { "completed", "api" }, "hung up as answered")
  local app2 = env:next_start()
  timer.sleep(500)
  T.eq(#env.tw.calls, 1, "the callee who answered is not called again")
  local rec = app2.engine:call_view(id) or {}
  T.eq({ rec.status, rec.attempt, rec.endReason }, { "failed", 1, "shutdown" })
end, { timeout = 20000 })

T.test("a retry Twilio refuses for good ends the call failed with that refusal, notified once, with no third attempt", function()
  local n = 0
  local env = kit.start({
    twilio = {
      behaviour = function()
        n = n + 1
        if n == 1 then
          return "busy"
        end
        return { answer = "reject-api", reject_status = 400, reject_code = 21216, reject_message = "Call blocked by Twilio" }
      end,
    },
    config = { retry = { maxAttempts = 3, initialDelayMs = 50 } },
  })
  local id = env:create({ to = "+14155550993", prompt = "Say hello." })
  local call = env:wait_final(id, 10000)
  local refusal = "twilio 21216: Call blocked by Twilio (HTTP 400)"
  T.eq({ call.status, #call.attempts, call.attempts[1].status, call.attempts[2].status },
    { "failed", 2, "busy", "failed" })
  T.eq({ call.lastError, call.endReason, call.attempts[2].reason }, { refusal, refusal, refusal })
  timer.sleep(500)
  T.eq(#env.tw.calls, 2, "no third dial")
  -- The notification goes out after the call is final, on its own time.
  local notes
  T.wait_for(function()
    notes = {}
    for _, h in ipairs(env.hooks.received) do
      if h.body and h.body:find(id, 1, true) then
        notes[#notes + 1] = h
      end
    end
    return #notes >= 1
  end, 5000, "the notification")
  T.eq(#notes, 1, "notified once")
end)
T.run()
