-- Nothing lost: the SQLite store across kill -9 of the real callagent
-- process, during a retry wait, during a live call, and between a report and
-- its notification; one process per store file; and clear errors for an
-- unusable store file.
local T = require "testing"
local fetch = require "callagent.fetch"
local json = require "callagent.json"
local timer = require "callagent.timer"
local task = require "callagent.task"
local sqlite = require "callagent.sqlite"
local durable = require "durable_world"

-- The outside world for one test, and a way to (re)start the app on one db and port.
local world = durable.new

local first_then_answer = durable.first_then_answer

-- A model that greets and talks on.
local function monologue(session)
  assert(session:wait_event("response.create", 5000))
  session:speak({ ms = 20000, text = "A very long monologue." })
end

-- A call to `to` placed and in a conversation: its id.
local function in_conversation(w, to)
  local id = w.create(to)
  w.wait(id, function(r)
    return r.status == "in_progress"
  end, 10000, "in progress")
  return id
end

local report_script = durable.report_script

-- The record as the store has it, read beside the process (or after it).
local function stored(w, id)
  return (w.stored())[id]
end

T.test("kill -9 during a retry wait: after restart the retry fires once, at its time", function()
  local w = world({
    behaviour = first_then_answer("busy"),
    script = report_script,
    retry_ms = 2000,
  })
  w.start()
  local status, created = w.api("POST", "/v1/calls", { to = "+14155550160", prompt = "Retry me." })
  T.eq(status, 201)
  local id = created.callId
  local waiting = w.wait(id, function(r)
    return r.status == "queued" and r.nextAttemptAt ~= nil
  end, 10000, "the retry wait")
  T.eq(waiting.attempts[1].status, "busy")
  w.kill9()
  w.start()
  local rec = w.wait_final(id, 20000)
  T.eq(rec.status, "completed")
  T.eq(#rec.attempts, 2)
  T.eq(#w.tw.calls, 2, "exactly one retry dialed")
  T.match(w.tw.calls[2].params.Url, "&attempt=2$", "the attempt number an integer, as before the restart")
  T.eq(rec.report.outcome, "success")
  T.wait_for(function()
    return #w.deliveries >= 1
  end, 10000, "the notification")
  timer.sleep(300)
  T.eq(#w.deliveries, 1)
  T.eq(w.deliveries[1].key, id .. ":completed")
  local function ms(iso)
    local h, mi, sec, frac = iso:match("T(%d+):(%d+):(%d+)%.(%d+)Z$")
    return ((tonumber(h) * 60 + tonumber(mi)) * 60 + tonumber(sec)) * 1000 + tonumber(frac)
  end
  local gap = ms(rec.attempts[2].startedAt) - ms(rec.attempts[1].endedAt)
  T.ge(gap, 1950, "the retry waited for its due time across the restart")
  T.lt(gap, 4000)
  T.diag(string.format("retry due 2000 ms after attempt 1; dialed after %d ms, across a kill -9 and restart", gap))
end, { timeout = 60000 })

T.test("kill -9 during a live call: after restart the call is resolved honestly and notified once", function()
  local w = world({ script = monologue })
  w.start()
  local id = w.create("+14155550161", "Talk.")
  w.wait(id, function(r)
    return r.status == "in_progress"
  end, 10000, "in progress")
  timer.sleep(500)
  w.kill9()
  w.start()
  local rec = w.wait_final(id, 20000)
  T.eq(rec.status, "failed")
  T.match(rec.lastError, "^interrupted by restart")
  T.match(rec.endReason, "^interrupted by restart")
  T.eq(#rec.attempts, 1, "an answered call is not dialed again")
  T.eq(#w.tw.calls, 1)
  T.wait_for(function()
    return #w.deliveries >= 1
  end, 10000, "the notification")
  timer.sleep(300)
  T.eq(#w.deliveries, 1)
  T.eq(w.deliveries[1].body.data.status, "failed")
end, { timeout = 60000 })

T.test("kill -9 while ringing, answered while the restart asks Twilio: no stream, and the call ends", function()
  -- Twilio's answer to the restart's question comes late; meanwhile the
  -- callee answers and the voice webhook comes. The call is being ended.
  local w = world({
    behaviour = { ring_ms = 1500, get_delay_ms = 1500 },
    script = function(session)
      session:wait_event("response.create", 5000)
    end,
  })
  w.start()
  local id, tw = w.ring("+14155550163", "Talk.")
  w.kill9()
  local restarted = timer.now()
  w.start()
  local rec = w.wait_final(id, 20000)
  T.eq(rec.status, "failed")
  T.match(rec.endReason, "^interrupted by restart")
  assert(tw:wait_final(5000), "the call over at Twilio")
  T.ok(tw.answered_at, "answered while the restart asked")
  T.eq(tw.stream_started_at, nil, "no stream")
  -- (The killed run's, opened while it rang, may be there: it got nothing.)
  for i, s in ipairs(w.rt.sessions) do
    T.lt(s.opened_at, restarted, "session " .. i .. ": none opened by the restart")
    T.eq({ s.input_bytes, #s.response_creates }, { 0, 0 }, "session " .. i .. " never used")
  end
end, { timeout = 60000 })

T.test("kill -9 while ringing, answered while callagent is down: hung up as answered, never dialed again", function()
  -- The callee picks up while callagent is down (the voice webhook finds
  -- nobody). Twilio's API says in-progress after the restart, or
  -- completed once the callee has hung up: answered either way.
  for _, hang_up_first in ipairs({ false, true }) do
    local n = 0
    local w = world({
      behaviour = function()
        n = n + 1
        return n == 1 and { ring_ms = 1500, hangup_after_ms = hang_up_first and 300 or nil } or "answer"
      end,
      script = report_script,
      retry_ms = 500,
    })
    w.start()
    local id, tw = w.ring("+14155550166")
    w.kill9()
    assert(tw:wait_status("in-progress", 5000), "answered while down")
    if hang_up_first then
      assert(tw:wait_final(5000), "the callee hung up")
    end
    w.start()
    local rec = w.wait_final(id, 20000)
    timer.sleep(1500) -- a retry would have been dialed by now (500 ms)
    T.eq(#w.tw.calls, 1, "dialed once: the callee picked up")
    T.eq(rec.status, "failed")
    T.ok(rec.attempts[1].answeredAt, "the attempt was answered")
    T.match(rec.endReason, "^interrupted by restart")
    assert(tw:wait_final(5000), "the call over at Twilio")
    T.eq(tw.final, "completed", hang_up_first and "ended by the callee" or "hung up as answered, not canceled")
  end
end, { timeout = 90000 })

T.test("kill -9 while ringing: after restart the call is hung up, and its retry talks", function()
  local w = world({
    behaviour = first_then_answer({ ring_ms = 60000 }),
    script = report_script,
    retry_ms = 500,
  })
  w.start()
  local id, tw = w.ring_and_restart("+14155550165")
  local rec = w.wait_final(id, 20000)
  T.eq(rec.status, "completed", "the retry reached the callee and the agent: " .. json.encode(rec))
  T.eq(rec.report and rec.report.outcome, "success")
  T.eq(#rec.attempts, 2)
  T.match(rec.attempts[1].reason, "^interrupted by restart")
  T.eq(tw.final, "canceled", "the ringing call was hung up")
end, { timeout = 60000 })

T.test("kill -9 while ringing, the restart's cancel refused once: asked again, the phone stops ringing", function()
  local w = world({
    behaviour = first_then_answer({ ring_ms = 60000, update_fail = 503, update_fail_times = 1 }),
    script = report_script,
    retry_ms = 10000,
  })
  w.start()
  local id, tw = w.ring_and_restart("+14155550173")
  assert(tw:wait_final(3000), "the call canceled at Twilio: " .. #tw.updates .. " cancel(s) sent")
  T.eq({ tw.final, #tw.updates }, { "canceled", 2 }, "canceled at the second try, a second after the first")
  local rec = w.call(id)
  T.eq({ rec.status, rec.attempts[1].reason }, { "queued", "interrupted by restart (the call was still up: hung up)" })
end, { timeout = 60000 })

T.test("kill -9 while ringing, Twilio's API silent at restart: the call is hung up all the same, before its retry rings", function()
  local w = world({
    behaviour = first_then_answer({ ring_ms = 60000, get_delay_ms = 5000 }),
    script = report_script,
    retry_ms = 500,
    config = { twilio = { requestTimeoutSec = 1 } }, -- the lookup times out after 1 s
  })
  w.start()
  local id, tw = w.ring_and_restart("+14155550166")
  local rec = w.wait_final(id, 20000)
  T.eq(rec.status, "completed", "the retry reached the callee and the agent: " .. json.encode(rec))
  T.eq(#rec.attempts, 2)
  T.eq(rec.attempts[1].reason, "interrupted by restart (its state unknown: hung up)")
  T.eq(tw.final, "canceled", "the first call no longer rings")
  local second = w.tw.calls[2]
  T.ok(tw.ended_at <= second.statuses[1].at, "it ended before the retry was placed")
end, { timeout = 60000 })

T.test("kill -9 while the dial request is on its way, answered after the restart: hung up, never dialed again", function()
  -- Twilio has the call but has not answered the create request (nor sent
  -- a callback that names it) when callagent dies: the restart cannot ask
  -- about it and ends the attempt, retry queued. Then its answered callback
  -- comes: the callee picked up once, so the retry is dropped.
  local w = world({
    behaviour = first_then_answer({ create_delay_ms = 4000, ring_ms = 800,
      lost_callbacks = { initiated = true, ringing = true } }),
    script = report_script,
  })
  w.start()
  local id = w.create("+14155550168")
  local tw = w.tw:wait_call(5000)
  w.kill9()
  w.start()
  local rec = w.wait_final(id, 10000)
  T.eq(#w.tw.calls, 1, "dialed once: the callee picked up")
  T.eq({ rec.status, rec.endReason, #rec.attempts }, { "failed", "interrupted by restart", 1 })
  T.ok(rec.attempts[1].answeredAt, "the attempt was answered")
  T.eq(rec.nextAttemptAt, nil)
  T.eq(rec.lastError, "not dialed again: the callee answered attempt 1's call after it had ended here "
    .. "(interrupted by restart); it was hung up")
  assert(tw:wait_final(5000), "the call over at Twilio")
  T.eq(tw.final, "completed", "hung up as answered")
  T.eq(stored(w, id).status, "failed", "the end is in the store")
  T.wait_for(function()
    return #w.deliveries >= 1
  end, 5000, "the notification")
  T.eq(w.deliveries[1].key, id .. ":failed")
end, { timeout = 60000 })

T.test("kill -9 while the dial request is on its way, the call ringing unseen: its retry waits for the ring to be over", function()
  -- Twilio rings the call, its first callbacks lost with the process: the
  -- restart cannot name it nor cancel it. A retry due sooner (300 ms)
  -- waits until ringTimeoutSec + statusGraceSec after the dial.
  local w = world({
    behaviour = first_then_answer({ answer = "no-answer", create_delay_ms = 4000, ring_ms = 1200,
      lost_callbacks = { initiated = true, ringing = true } }),
    script = report_script,
    retry_ms = 300,
    config = { call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
  })
  w.start()
  local id = w.create("+14155550172")
  local first = w.tw:wait_call(5000)
  w.kill9()
  w.start()
  local rec = w.wait_final(id, 10000)
  T.eq({ rec.status, #rec.attempts, #w.tw.calls }, { "completed", 2, 2 })
  T.eq(rec.attempts[1].reason, "interrupted by restart")
  local second = w.tw.calls[2]
  T.ok(first.ended_at and first.ended_at <= second.created_at, "never two rings at once")
  T.ge(second.created_at - first.created_at, 1950, "dialed again 2 s after the first dial")
end, { timeout = 60000 })

T.test("kill -9 while ringing, hung up through the API while the restart asks Twilio: canceled, as the API asked", function()
  local w = world({
    behaviour = first_then_answer({ ring_ms = 60000, get_delay_ms = 5000 }),
    script = report_script,
    config = { twilio = { requestTimeoutSec = 2 } }, -- the lookup times out after 2 s
  })
  w.start()
  local id, tw = w.ring_and_restart("+14155550167")
  local status
  T.wait_for(function()
    status = w.api("POST", "/v1/calls/" .. id .. "/hangup")
    return status ~= 503
  end, 5000, "the API, once started")
  T.eq(status, 202)
  local rec = w.wait_final(id, 10000)
  T.eq({ rec.status, rec.endReason }, { "canceled", "canceled by API" })
  timer.sleep(3000) -- past the restart's lookup timing out
  rec = w.call(id)
  T.eq({ rec.status, rec.endReason, rec.lastError, #rec.attempts }, { "canceled", "canceled by API", nil, 1 },
    "the lookup's failure changed nothing")
  T.eq(tw.final, "canceled")
  T.eq(#w.tw.calls, 1, "not dialed again")
end, { timeout = 60000 })


T.test("kill -9 after an API hang-up (202) of a live call, its final callback not in: completed, hung_up_by_api", function()
  local w = world({ behaviour = { lost_callbacks = { completed = true } }, script = monologue })
  w.start()
  local id = in_conversation(w, "+14155550169")
  local tw = w.tw.calls[1]
  T.eq(w.api("POST", "/v1/calls/" .. id .. "/hangup"), 202)
  assert(tw:wait_final(5000), "hung up at Twilio")
  T.eq(stored(w, id).status, "in_progress", "its end not in the store yet (the final callback lost)")
  w.kill9()
  w.start()
  local rec = w.wait_final(id, 10000)
  T.eq({ rec.status, rec.endReason, rec.lastError, #rec.attempts }, { "completed", "hung_up_by_api", nil, 1 },
    "ended as the API's hang-up ends a call")
  T.eq(rec.attempts[1]._hangupAsked, nil, "the engine's own field is not shown")
  T.wait_for(function()
    return #w.deliveries >= 1
  end, 5000, "the notification")
  T.eq(w.deliveries[1].key, id .. ":completed")
  T.eq(#w.tw.calls, 1)
end, { timeout = 60000 })

T.test("kill -9 while the API's cancel of a ringing call is on its way: canceled after the restart, not dialed again", function()
  -- Twilio has canceled the call, but its answer and its canceled callback
  -- do not reach callagent, and its API cannot say at the restart: the
  -- call is hung up as one of unknown state would be, and not retried.
  local w = world({
    behaviour = first_then_answer({ ring_ms = 60000, update_delay_ms = 3000, get_fail_times = 1,
      lost_callbacks = { completed = true } }),
    script = report_script,
    retry_ms = 500,
  })
  w.start()
  local id, tw = w.ring("+14155550170")
  task.spawn(function()
    w.api("POST", "/v1/calls/" .. id .. "/hangup") -- its answer never comes: killed first
  end)
  T.wait_for(function()
    return #tw.updates >= 1
  end, 3000, "the cancel on its way to Twilio")
  w.kill9()
  w.start()
  local rec = w.wait_final(id, 10000)
  T.eq({ rec.status, rec.endReason, rec.nextAttemptAt, #rec.attempts }, { "canceled", "canceled by API", nil, 1 })
  T.eq(#w.tw.calls, 1, "not dialed again")
end, { timeout = 60000 })

T.test("kill -9 after the agent's own hang-up, its final callback not in: the call ends as that hang-up would have", function()
  -- The model's session expires (a limit, not a failure): the agent hangs
  -- up, and Twilio's completed callback is lost.
  local w = world({
    behaviour = { lost_callbacks = { completed = true } },
    script = function(session)
      assert(session:wait_event("response.create", 5000))
      session:error("session_expired", "Your session hit the maximum duration of 60 minutes.")
    end,
  })
  w.start()
  local id = in_conversation(w, "+14155550174")
  local tw = w.tw.calls[1]
  assert(tw:wait_final(5000), "hung up at Twilio")
  T.eq(stored(w, id).status, "in_progress", "its end not in the store yet (the final callback lost)")
  w.kill9()
  w.start()
  local rec = w.wait_final(id, 10000)
  T.eq({ rec.status, rec.endReason, #rec.attempts }, { "completed", "model session expired", 1 },
    "ended as after the hang-up, not as a call the restart interrupted")
  T.match(rec.lastError, "session_expired", "the session's end, as it happened")
  T.eq(#w.tw.calls, 1)
end, { timeout = 60000 })

T.test("SIGTERM during a conversation: the call ends failed with endReason shutdown before the exit, notified once", function()
  local w = world({ script = monologue })
  w.start()
  local id = in_conversation(w, "+14155550173")
  timer.sleep(500)
  assert(w.app:kill("SIGTERM"))
  T.eq(w.app:wait(10000), 0)
  local rec = stored(w, id)
  T.eq({ rec.status, rec.endReason }, { "failed", "shutdown" }, "ended before the exit, not left in progress")
  T.eq(w.tw.calls[1].final, "completed", "hung up at Twilio")
  w.start()
  rec = w.call(id)
  T.eq({ rec.status, rec.endReason }, { "failed", "shutdown" }, "the next start keeps it")
  T.wait_for(function()
    return #w.deliveries >= 1
  end, 10000, "the notification")
  timer.sleep(500)
  T.eq(#w.deliveries, 1, "notified once")
  T.eq(w.deliveries[1].body.data.status, "failed")
end, { timeout = 60000 })

T.test("SIGTERM right after an API hang-up (202) of a live call: completed, hung_up_by_api, as the 202 said", function()
  -- Twilio's completed callback comes during the stop (each callback 200 ms late).
  local w = world({ behaviour = { callback_delay_ms = 200 }, script = monologue })
  w.start()
  local id = in_conversation(w, "+14155550171")
  T.eq(w.api("POST", "/v1/calls/" .. id .. "/hangup"), 202)
  assert(w.app:kill("SIGTERM"))
  T.eq(w.app:wait(10000), 0)
  local rec = stored(w, id)
  T.eq({ rec.status, rec.endReason, rec.lastError }, { "completed", "hung_up_by_api", nil }, "not ended as the stop's own hang-up")
  T.eq(#w.deliveries, 1)
  T.eq(w.deliveries[1].key, id .. ":completed")
end, { timeout = 60000 })

T.test("SIGTERM during a conversation, the receiver slow to answer: notified once, not again by the next start", function()
  local w = world({
    hook_ms = 400,
    script = monologue,
  })
  w.start()
  local id = in_conversation(w, "+14155550176")
  assert(w.app:kill("SIGTERM"))
  T.eq(w.app:wait(10000), 0)
  T.eq(#w.deliveries, 1, "delivered during the stop")
  w.start()
  timer.sleep(1500) -- the next start's resume
  T.eq(w.requests, { id .. ":failed" }, "one request, not a second from the next start")
end, { timeout = 60000 })

T.test("SIGTERM during a conversation whose final callback is lost: ended here within 2 s of the hang-up", function()
  local w = world({
    behaviour = { lost_callbacks = { completed = true } },
    script = monologue,
  })
  w.start()
  local id = in_conversation(w, "+14155550175")
  local t0 = timer.now()
  assert(w.app:kill("SIGTERM"))
  T.eq(w.app:wait(10000), 0)
  T.lt(timer.now() - t0, 4000, "the wait for the callback is bounded")
  local rec = stored(w, id)
  T.eq({ rec.status, rec.endReason }, { "failed", "shutdown" })
end, { timeout = 60000 })

for _, lost in ipairs({ false, true }) do
  T.test("SIGTERM while ringing" .. (lost and " (Twilio's final callback lost)" or "")
    .. ": canceled at Twilio before the exit, and dialed again by the next start", function()
    local ringing = { ring_ms = 60000, lost_callbacks = lost and { completed = true } or nil }
    local w = world({ behaviour = first_then_answer(ringing), script = report_script })
    w.start()
    local id, tw = w.ring("+14155550177")
    assert(w.app:kill("SIGTERM"))
    T.eq(w.app:wait(10000), 0)
    T.eq(tw.final, "canceled", "no phone rings for a callagent that is down")
    T.eq(tw.lost_callbacks, lost and 1 or nil, "the final callback, lost or not")
    T.eq(stored(w, id).status, "queued")
    w.start()
    local rec = w.wait_final(id, 20000)
    T.eq({ rec.status, rec.attempts[1].status, rec.attempts[1].reason, #rec.attempts },
      { "completed", "canceled", "callagent stopped while it rang", 2 })
    T.eq(#w.tw.calls, 2)
    T.wait_for(function()
      return #w.deliveries >= 1
    end, 5000, "the notification")
    timer.sleep(300)
    T.eq(w.requests, { id .. ":completed" }, "notified once, of the end")
  end, { timeout = 60000 })
end

T.test("SIGTERM while the ring timeout's cancel is on its way, the canceled callback lost: no_answer, not queued to ring again", function()
  -- The ring timeout (1 + 1 s) sends its cancel, which Twilio answers 8 s
  -- later; the stop's own cancel is answered at once, and the canceled
  -- callback of either never comes. The attempt rang out: no_answer.
  local w = world({
    behaviour = { ring_ms = 60000, lost_callbacks = { completed = true }, update_delay_ms = { 8000 } },
    script = report_script,
    config = { retry = { maxAttempts = 1 }, call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
  })
  w.start()
  local id = w.create("+14155550179")
  local tw = w.tw:wait_call(5000)
  T.wait_for(function()
    return #tw.updates >= 1
  end, 8000, "the ring timeout's cancel")
  assert(w.app:kill("SIGTERM"))
  T.eq(w.app:wait(15000), 0)
  T.eq(#tw.updates, 2, "the stop's cancel too")
  T.eq(stored(w, id).status, "no_answer", "ended, not queued")
  w.start()
  local rec = w.wait_final(id, 5000)
  T.eq({ rec.status, rec.attempts[1].status, rec.attempts[1].reason, #rec.attempts, #w.tw.calls },
    { "no_answer", "no_answer", "ring timeout", 1, 1 }, "not dialed again")
end, { timeout = 60000 })

T.test("an attempt a stop canceled while it rang does not count toward retry.maxAttempts", function()
  -- maxAttempts 2: the ring the stop canceled, then a busy line, then the
  -- second real attempt, which is answered.
  local n = 0
  local w = world({
    behaviour = function()
      n = n + 1
      return n == 1 and { ring_ms = 60000 } or n == 2 and "busy" or "answer"
    end,
    script = report_script,
    retry_ms = 200,
    config = { retry = { maxAttempts = 2 } },
  })
  w.start()
  local id, tw = w.ring("+14155550178")
  assert(w.app:kill("SIGTERM"))
  T.eq(w.app:wait(10000), 0)
  T.eq(stored(w, id).status, "queued")
  w.start()
  local rec = w.wait_final(id, 15000)
  T.eq({ rec.status, #rec.attempts, #w.tw.calls }, { "completed", 3, 3 },
    "two real attempts: the busy line is retried")
  T.eq({ rec.attempts[1].status, rec.attempts[2].status }, { "canceled", "busy" })
end, { timeout = 60000 })

T.test("SIGTERM during the goodbye: the report is kept, the call completed with endReason shutdown", function()
  local w = world({
    script = function(session)
      assert(session:wait_event("response.create", 5000))
      session:report_and_goodbye({ summary = "All good.", outcome = "success" }, { ms = 8000, text = "Bye bye bye." })
    end,
    config = { call = { goodbyeTimeoutSec = 20 } },
  })
  w.start()
  local id = w.create("+14155550174")
  w.wait(id, function(r)
    return r.report ~= nil
  end, 10000, "the report")
  timer.sleep(300)
  assert(w.app:kill("SIGTERM"))
  T.eq(w.app:wait(10000), 0)
  local rec = stored(w, id)
  T.eq({ rec.status, rec.endReason, rec.report and rec.report.outcome }, { "completed", "shutdown", "success" })
end, { timeout = 60000 })

-- A: SIGTERM first (its cancel of the ringing call slow), then the API's hang-up.
-- B: the API's hang-up first (slow), then SIGTERM while it is on its way.
for _, order in ipairs({ "sigterm-then-hangup", "hangup-then-sigterm" }) do
  for _, lost in ipairs({ false, true }) do
    T.test("ringing, " .. order .. (lost and " (final callback lost)" or "")
      .. ": the API's hang-up wins, the call is not dialed again", function()
      local ringing = { ring_ms = 60000, update_delay_ms = 1000, lost_callbacks = lost and { completed = true } or nil }
      local w = world({ behaviour = first_then_answer(ringing), script = report_script, retry_ms = 500 })
      w.start()
      local id, tw = w.ring("+14155550190")
      local hst, hbody
      local function hang()
        local res, ferr = fetch(w.base .. "/v1/calls/" .. id .. "/hangup", { method = "POST" })
        hst, hbody = res and res.status or ("error: " .. tostring(ferr)), res and json.try_decode(res.body)
      end
      if order == "sigterm-then-hangup" then
        assert(w.app:kill("SIGTERM"))
        timer.sleep(100)
        hang()
      else
        task.spawn(hang)
        timer.sleep(100)
        assert(w.app:kill("SIGTERM"))
      end
      T.eq(w.app:wait(10000), 0)
      T.wait_for(function() return hst ~= nil end, 15000, "the hang-up's answer")
      T.diag("API hang-up answered " .. tostring(hst) .. " " .. json.encode(hbody))
      local rec = stored(w, id)
      T.diag("stored after the stop: " .. rec.status .. " attempts[1]=" .. json.encode(rec.attempts and rec.attempts[1]))
      w.start()
      timer.sleep(1500) -- a retry would have been dialed by now (500 ms)
      rec = w.call(id)
      T.diag("after the restart: " .. rec.status .. " " .. tostring(rec.endReason) .. ", twilio calls " .. #w.tw.calls)
      -- A hang-up whose answer the closing server cut off may or may not
      -- have been applied; one answered 202 was.
      T.ok(hst == 202 or tostring(hst):match("^error"), "202, or cut off by the closing server: " .. tostring(hst))
      if #w.tw.calls > 1 then
        T.ok(w.tw.calls[1].ended_at and w.tw.calls[1].ended_at <= w.tw.calls[2].created_at, "never two rings at once")
      end
      if hst == 202 then
        T.eq(#w.tw.calls, 1, "a call the API hung up (202) is not dialed again by the next start")
        T.eq(rec.status, "canceled", "canceled, as the API asked")
      end
    end, { timeout = 60000 })
  end
end

-- C: the dial's answer is slow (its callbacks come first); the callee answers
-- during the stop, while the stop waits for that dial.
for _, lost in ipairs({ false, true }) do
  T.test("dial on its way, answered during the stop" .. (lost and " (final callback lost)" or "")
    .. ": ended before the exit, not left in progress", function()
    local b = { create_delay_ms = 3000, ring_ms = 1500, lost_callbacks = lost and { completed = true } or nil }
    local w = world({ behaviour = first_then_answer(b), script = monologue, retry_ms = 500 })
    w.start()
    local id, tw = w.ring("+14155550191")
    timer.sleep(500)
    assert(w.app:kill("SIGTERM"))
    local t0 = timer.now()
    T.eq(w.app:wait(10000), 0)
    T.diag(string.format("exit after %d ms; twilio: answered %s, final %s/%s", math.floor(timer.now() - t0),
      tostring(tw.answered_at ~= nil), tostring(tw.final), tostring(tw.end_reason)))
    local rec = stored(w, id)
    T.diag("stored after the stop: " .. rec.status .. " " .. tostring(rec.endReason) .. " attempts[1]="
      .. json.encode(rec.attempts and rec.attempts[1]))
    T.ok(rec.status ~= "in_progress" and rec.status ~= "dialing", "not left for the next start to resolve")
    w.start()
    timer.sleep(1500) -- a retry would have been dialed by now (500 ms)
    rec = w.call(id)
    T.diag("after the restart: " .. rec.status .. " " .. tostring(rec.endReason) .. ", twilio calls " .. #w.tw.calls)
    T.eq(#w.tw.calls, 1, "a callee who answered is not dialed again")
  end, { timeout = 60000 })
end

T.test("a retry queued before a restart that lowered retry.maxAttempts is not dialed: the call ends, notified once", function()
  local opts = { behaviour = { answer = "busy" }, retry_ms = 800, config = { retry = { maxAttempts = 3 } } }
  local w = world(opts)
  w.start()
  local id = w.create("+14155550165", "Talk.")
  w.wait(id, function(r)
    return r.status == "queued" and r.attempt == 2 and r.nextAttemptAt ~= nil
  end, 15000, "the wait for attempt 3")
  w.kill9()
  opts.config = { retry = { maxAttempts = 2 } }
  w.start()
  local rec = w.wait_final(id, 10000)
  timer.sleep(1600) -- past the retry's due time (0.8 s after attempt 2): it would have been dialed by now
  rec = w.call(id)
  T.eq(#w.tw.calls, 2, "attempt 3 not dialed")
  T.eq(rec.status, "busy", "final as the last attempt ended, as when retries run out")
  T.eq(rec.endReason, "line busy", "the last attempt's end reason kept")
  T.eq(#rec.attempts, 2)
  T.eq(rec.attempts[2].reason, "line busy")
  T.eq(rec.nextAttemptAt, nil)
  T.match(rec.lastError, "retry%.maxAttempts", "lastError says why it was not dialed")
  T.wait_for(function()
    return (w.app.errtext() .. w.app.text()):match("past this run.s retry policy: not dialed.*retry%.maxAttempts is 2 now")
  end, 5000, "the log line saying so: " .. w.app.errtext())
  T.wait_for(function()
    return #w.deliveries >= 1
  end, 10000, "the notification")
  timer.sleep(300)
  T.eq(#w.deliveries, 1, "notified once")
  T.eq(w.deliveries[1].key, id .. ":busy")
  local recs, notes = w.stored()
  T.eq(recs[id].status, "busy", "the end is in the store")
  T.eq(#notes, 1)
  local db = assert(sqlite.open(w.db, { readonly = true }))
  T.eq(db:value("SELECT count(*) FROM retries WHERE call_id = ?", id), 0, "its retry row is gone")
  db:close()
  -- Started again: nothing more happens to it.
  w.kill9()
  w.start()
  timer.sleep(1000)
  T.eq(#w.tw.calls, 2)
  T.eq(#w.deliveries, 1)
end, { timeout = 60000 })

T.test("a retry queued before a restart that took its status out of retry.retryStatuses is not dialed", function()
  local opts = { behaviour = { answer = "busy" }, retry_ms = 800 }
  local w = world(opts)
  w.start()
  local id = w.create("+14155550167", "Talk.")
  w.wait(id, function(r)
    return r.status == "queued" and r.attempt == 1
  end, 15000, "the wait for attempt 2")
  w.kill9()
  opts.config = { retry = { retryStatuses = { "no_answer", "failed" } } }
  w.start()
  w.wait_final(id, 10000)
  timer.sleep(1600) -- past the retry's due time (0.8 s after attempt 1)
  local rec = w.call(id)
  T.eq(#w.tw.calls, 1, "attempt 2 not dialed")
  T.eq({ rec.status, rec.endReason, #rec.attempts }, { "busy", "line busy", 1 })
  T.match(rec.lastError, "retry%.retryStatuses", "lastError says why it was not dialed")
  T.wait_for(function()
    return #w.deliveries >= 1
  end, 10000, "the notification")
  timer.sleep(300)
  T.eq(#w.deliveries, 1, "notified once")
end, { timeout = 60000 })

T.test("a notification sent by the restart's recovery while a backlog resumes is not sent again by the backlog", function()
  -- The recovery ends a call (its retry past a lowered retry.maxAttempts) and
  -- sends its notification at once; the backlog read at the same start holds
  -- it too, behind 16 others that a slow receiver takes a while to answer.
  local opts = { behaviour = { answer = "busy" }, retry_ms = 800, hook_ms = 300,
    config = { retry = { maxAttempts = 3 } } }
  local w = world(opts)
  w.start()
  local id = w.create("+14155550166", "Talk.")
  w.wait(id, function(r)
    return r.status == "queued" and r.attempt == 2
  end, 15000, "the wait for attempt 3")
  w.kill9()
  local db = assert(sqlite.open(w.db))
  local old = require("callagent.core").time() - 60
  for i = 1, 16 do
    assert(db:run("INSERT INTO notifications (key, call_id, payload, created) VALUES (?, ?, ?, ?)",
      "c_backlog" .. i .. ":completed", "c_backlog" .. i, json.encode({ message = "old", name = "CallAgent" }), old + i))
  end
  db:close()
  opts.config = { retry = { maxAttempts = 2 } }
  w.start()
  T.wait_for(function()
    return #w.deliveries >= 17
  end, 15000, "the backlog and the recovered call's notification")
  timer.sleep(1500)
  T.eq(w.by_key[id .. ":busy"], 1, "the recovered call notified once")
  T.eq(#w.deliveries, 17, "each notification delivered once")
end, { timeout = 60000 })

T.test("a store whose call is dialing but its attempt is over: after restart the retry policy goes on", function()
  -- What a kill -9 between the two writes left before they were one commit.
  -- The first call rings long enough to be killed during it; the retries are
  -- busy at once, 300 ms apart.
  local n = 0
  local w = world({ behaviour = function()
    n = n + 1
    return n == 1 and { answer = "busy", ring_ms = 1000 } or "busy"
  end, retry_ms = 300 })
  w.start()
  local id, tw = w.ring("+14155550164", "Talk.")
  w.kill9()
  assert(tw:wait_status("busy", 5000), "busy at Twilio")
  local db = assert(sqlite.open(w.db))
  local doc = json.decode(assert(db:value("SELECT doc FROM attempts WHERE call_id = ? AND n = 1", id)))
  doc.status, doc.reason, doc.endedAt = "busy", "line busy", "2026-11-26T00:00:00.000Z"
  assert(db:run("UPDATE attempts SET doc = ? WHERE call_id = ? AND n = 1", json.encode(doc), id))
  db:close()
  w.start()
  local rec = w.wait_final(id, 15000)
  T.eq(rec.status, "busy")
  T.eq(rec.endReason, "line busy")
  T.eq(#rec.attempts, 3, "retried, as a busy attempt is")
  T.eq(#w.tw.calls, 3)
end, { timeout = 60000 })

T.test("kill -9 between a report and its notification: after restart it is delivered, once", function()
  local w = world({ script = report_script, hold_first = true })
  w.start()
  local id = w.create("+14155550162", "Report.")
  T.wait_for(function()
    return #w.requests >= 1
  end, 20000, "the first notification attempt (held)")
  local before = w.call(id)
  T.eq(before.status, "completed")
  T.eq(before.report.summary, "All good.")
  w.kill9()
  w.start()
  T.wait_for(function()
    return #w.deliveries >= 1
  end, 10000, "the notification after the restart")
  timer.sleep(500)
  T.eq(#w.deliveries, 1, "delivered once")
  T.eq(w.deliveries[1].key, id .. ":completed")
  for _, k in ipairs(w.requests) do
    T.eq(k, id .. ":completed", "every attempt carries the same idempotency key")
  end
  local after = w.call(id)
  T.eq(after.report.summary, "All good.", "the report survived")
  T.eq(#after.transcript, #before.transcript, "the transcript survived")
end, { timeout = 60000 })

-- Starts w's app, places a call that reports, and waits for its
-- notification's first try, and a moment for a retry were one sent: the id.
local function first_notification(w, to)
  w.start()
  local id = w.create(to, "Report.")
  T.wait_for(function()
    return #w.requests >= 1
  end, 20000, "the notification attempt")
  timer.sleep(300)
  return id
end

T.test("a notification the receiver refused (4xx) is not sent again after a restart", function()
  local w = world({ script = report_script, refuse = true })
  local id = first_notification(w, "+14155550163")
  T.eq(#w.requests, 1, "a 4xx is not retried")
  T.eq(w.call(id).status, "completed")
  w.kill9()
  w.start()
  timer.sleep(1500)
  T.eq(#w.requests, 1, "nor sent again after the restart")
end, { timeout = 60000 })

T.test("a notification redirected (3xx) is not followed nor retried, and the log says where it pointed", function()
  local w = world({ script = report_script, redirect = "https://user:pw-s3cret@hooks.example.test/agent?token=s3cret-in-query" })
  local id = first_notification(w, "+14155550164")
  T.eq(#w.requests, 1, "not retried, and not followed (the body and its token stay with hooksUrl)")
  T.eq(w.call(id).status, "completed")
  -- The child logs the redirect once it has read the receiver's answer: a
  -- line on its stderr pipe, which comes when it comes.
  T.wait_for(function()
    return w.app.errtext():find("ERROR notification redirected", 1, true)
  end, 5000, "the redirect's log line: " .. w.app.errtext())
  local log = w.app.errtext()
  T.match(log, "ERROR notification redirected; not retrying: set notify%.hooksUrl to the receiver's own address "
    .. "%(a start with another sends it again%) error=\"HTTP 308\" key=" .. id .. ":completed location=\"?https://%[redacted%]@hooks%.example%.test/agent%?%[redacted%]")
  T.no_match(log, "s3cret", "the Location's password and query are left out")
end, { timeout = 60000 })

T.test("app:stop() in a process that goes on: a notification's retry stops, nothing touches the closed store", function()
  local db = T.tmpdir() .. "/calls.db"
  local code, _, p = T.run_app(nil, nil, { env = { CA_DB = db }, source = [[
local callagent = require "callagent"
local task = require "callagent.task"
local timer = require "callagent.timer"
local runtime = require "callagent.runtime"
local app = assert(callagent.app({
  telephony = { provider = "mock" },
  server = { port = 0 },
  openai = { apiKey = "sk-unused", realtimeUrl = "ws://127.0.0.1:9/v1/realtime" },
  notify = { hooksUrl = "http://127.0.0.1:9/hooks", hooksToken = "hooks-token-1234" },
  store = { backend = "sqlite", path = os.getenv("CA_DB") },
}, { no_shutdown_hook = true, notify = { base_delay_ms = 200, attempts = 5 } }))
task.spawn(function()
  assert(app:start())
  local call = assert(app:create_call({ to = "+14155550100", prompt = "x" }))
  assert(app.engine:hangup(call.callId or call.id))
  timer.sleep(100) -- the first try failed; the next is 200 ms away
  app:stop()
  timer.sleep(1000)
  print("still running")
  runtime.stop(0)
end)
]] })
  T.eq(code, 0, p.errtext())
  T.eq(p.out, { "still running" })
  T.match(p.errtext(), "notification failed; retrying")
  T.no_match(p.errtext(), "ERROR", "no error after the stop")
  -- The notification is still pending: the next start sends it.
  local sqlite = require "callagent.sqlite"
  local conn = assert(sqlite.open(db))
  local rows = assert(conn:rows("SELECT sent, tries FROM notifications"))
  T.eq(#rows, 1)
  T.eq({ rows[1].sent, rows[1].tries }, { 0, 1 }, "one try, not sent: pending for resume")
  conn:close()
end, { timeout = 30000 })

T.test("app:stop() with a live call in a process that goes on: no timer of the app fires after it", function()
  local code, _, p = T.run_app(T.root .. "/tests/apps/stop_live.lua", nil, { env = { TEST_FILTER = "." }, timeout = 45000 })
  T.eq(code, 0, p.errtext())
  T.ok(table.concat(p.out, "\n"):find("still running", 1, true), "ran on after the stop")
  T.no_match(p.errtext(), "ERROR", "no error after the stop")
end, { timeout = 60000 })

T.test("a second process on the store of a running one exits at once: the first one's ringing call is untouched", function()
  -- Without the lock it would take that call for one interrupted by a
  -- restart: hang it up at Twilio and dial the callee again.
  local w = world({
    behaviour = first_then_answer({ ring_ms = 60000 }),
    retry_ms = 500,
  })
  w.start()
  local first = w.app
  local id, tw = w.ring("+14155550167")
  local second_port = T.free_port()
  local code, _, p = T.run_app(T.root .. "/tests/apps/durable.lua", nil, { env = w.env(second_port), timeout = 10000 })
  T.eq(code, 1, "the second process fails: " .. p.errtext())
  T.eq(p.out, {}, "never ready")
  T.match(p.errtext(), "callagent: store%.path: " .. w.db:gsub("%p", "%%%0")
    .. " is in use by another callagent %(pid " .. first.pid .. "%)")
  T.eq(fetch("http://127.0.0.1:" .. second_port .. "/v1/calls"), nil, "it never listened")
  timer.sleep(1500) -- a retry would have been dialed by now (500 ms)
  T.eq(#w.tw.calls, 1, "the callee is dialed once")
  T.eq(tw.hangup_requested_at, nil, "the first one's call is not hung up")
  T.eq(tw.final, nil)
  T.eq(tw.status, "ringing")
  T.ok(first:running(), "the first one serves on")
  local rec = w.call(id)
  T.eq(#rec.attempts, 1)
  T.eq(rec.attempts[1].reason, nil, "not interrupted")
  -- Stopped (SIGTERM), then killed (SIGKILL): each time the next start opens the store.
  assert(first:kill("SIGTERM"))
  T.eq(first:wait(15000), 0, "a graceful stop")
  w.start()
  T.ok(w.app.out[1]:match("^ready"), "started after a graceful stop")
  w.kill9()
  w.start()
  T.ok(w.app.out[1]:match("^ready"), "started after a kill -9")
  T.eq(w.call(id).callId, id, "and serves the store")
end, { timeout = 60000 })

T.test("a corrupt store file is refused at start with a clear error", function()
  local w = world()
  local f = assert(io.open(w.db, "wb"))
  f:write(string.rep("this is not a database. ", 200))
  f:close()
  local code, _, p = T.run_app(T.root .. "/tests/apps/durable.lua", nil, {
    env = w.env(),
  })
  T.eq(code, 1)
  T.match(p.errtext(), "store%.path: cannot open .*calls%.db: ECORRUPT")
end)

T.test("an unwritable store path is refused at start with a clear error", function()
  local w = world()
  for _, path in ipairs({ "/proc/callagent-test.db", "/sys/callagent-test/calls.db" }) do
    local code, _, p = T.run_app(T.root .. "/tests/apps/durable.lua", nil, {
      env = w.env(nil, path),
    })
    T.eq(code, 1, path)
    T.match(p.errtext(), "store%.path: cannot open " .. path:gsub("%p", "%%%0") .. ": E%u+", path)
  end
end)

T.test("a store folder that cannot be created is refused at start naming that folder", function()
  -- Under a umask that takes the owner's write bit off, the folder made
  -- first cannot take the next one (for any user but root): SQLite then
  -- said "No such file or directory" of the file. Here a file is in the way.
  local w = world()
  local dir = T.tmpdir()
  assert(io.open(dir .. "/data", "w")):close()
  local path = dir .. "/data/callagent/calls.db"
  local code, _, p = T.run_app(T.root .. "/tests/apps/durable.lua", nil, { env = w.env(nil, path) })
  T.eq(code, 1)
  T.match(p.errtext(), "callagent: store%.path: cannot open " .. path:gsub("%p", "%%%0")
    .. ": EEXIST: cannot create the folder " .. (dir .. "/data"):gsub("%p", "%%%0") .. ": ")
end)

-- The mode of each file (stat's %a), nil for one that is not there.
local function modes(paths)
  local out = {}
  for _, p in ipairs(paths) do
    local code, lines = T.exec({ "stat", "-c", "%a", p })
    out[#out + 1] = code == 0 and lines[1] or nil
  end
  return out
end

-- The durable app of world w on store db (under umask): once it is ready or has exited.
local function start_on(w, db, umask)
  local app = T.spawn_app(T.root .. "/tests/apps/durable.lua", nil, { env = w.env(nil, db), umask = umask })
  T.wait_for(function()
    return app.out[1] or not app:running()
  end, 10000, "the app to be ready or exit")
  return app
end

-- Stops the app (SIGTERM), which must exit 0.
local function stop(app)
  assert(app:kill("SIGTERM"))
  T.eq(app:wait(15000), 0, "a graceful stop")
end

T.test("a new store, its -wal, -shm and lock file are 0600 under any umask: 0277 leaves it writable, 000 unreadable to others",
  function()
    local w = world()
    for _, umask in ipairs({ "0277", "000" }) do
      local db = T.tmpdir() .. "/calls.db"
      local app = start_on(w, db, umask)
      T.match(app.out[1] or "", "^ready", "umask " .. umask .. ": started: " .. app.errtext())
      -- 0400 under umask 0277: a file SQLite opens read-only (for any user
      -- but root), and a lock file the next start cannot open.
      T.eq(modes({ db, db .. "-wal", db .. "-shm", db .. ".lock" }), { "600", "600", "600", "600" }, "umask " .. umask)
      stop(app)
    end
  end, { timeout = 40000 })

T.test("a store.path that is a symbolic link to a missing file is refused at start; one to an existing file is followed",
  function()
    local w = world()
    local dir = T.tmpdir()
    local link, target = dir .. "/calls.db", dir .. "/data/calls.db"
    assert(require("callagent.core").mkdir(dir .. "/data"))
    T.eq(T.exec({ "ln", "-s", target, link }), 0)
    local app = start_on(w, link)
    T.eq(app.out[1], nil, "refused, never ready")
    T.eq(app:wait(5000), 1, "exit status")
    T.match(app.errtext(), "callagent: store%.path: cannot open " .. link:gsub("%p", "%%%0") .. ": ENOENT: "
      .. link:gsub("%p", "%%%0") .. ": a symbolic link to " .. target:gsub("%p", "%%%0") .. ", which does not exist")
    T.eq(modes({ target }), {}, "nothing created where it points (SQLite created it 0644)")
    -- Created first (an empty file is a new database), it is the store.
    assert(io.open(target, "w")):close()
    T.eq(T.exec({ "chmod", "600", target }), 0)
    app = start_on(w, link)
    T.match(app.out[1] or "", "^ready", "started: " .. app.errtext())
    T.eq(modes({ target .. "-wal" }), { "600" }, "its WAL beside the file linked to")
    stop(app)
    local db = assert(sqlite.open(target, { readonly = true }))
    T.eq(db:value("SELECT value FROM meta WHERE key = 'schema'"), "1", "the store is in the file linked to")
    db:close()
  end, { timeout = 40000 })

T.run()
