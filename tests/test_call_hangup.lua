-- POST /v1/calls/{id}/hangup and the engine's other ways of ending a call
-- at the vendor: one hang-up request per attempt at a time, whatever the
-- number of API requests; a cancel the vendor refuses is asked again even
-- when it waited for the dial's answer; a stop does not dial again a call
-- the API canceled.
local T = require "testing"
local kit = require "callkit"
local timer = require "callagent.timer"
local task = require "callagent.task"

-- n hang-up requests for call id at once: their HTTP statuses and bodies.
local function hang_up_at_once(env, id, n)
  local fns = {}
  for i = 1, n do
    fns[i] = function()
      local status, body = env:api("POST", "/v1/calls/" .. id .. "/hangup")
      return { status = status, body = body }
    end
  end
  return task.all(fns)
end

-- The Status of each update (hang-up) callagent sent Twilio for call tw.
local function update_statuses(tw)
  local s = {}
  for i, u in ipairs(tw.updates) do
    s[i] = u.params.Status
  end
  return s
end

T.test("hang-ups asked for at once for a ringing call send Twilio one cancel, and all get its 202", function()
  -- Twilio answers the cancel 500 ms late (its canceled callback comes first).
  local env = kit.start({ twilio = { behaviour = { ring_ms = 8000, update_delay_ms = 500 } } })
  local id = env:create({ to = "+14155550501", prompt = "Say hello." })
  env:wait(id, function(r)
    return r.status == "dialing" and r.attempts[1] and r.attempts[1].providerCallId
  end, 5000, "ringing")
  local answers = hang_up_at_once(env, id, 5)
  for i, a in ipairs(answers) do
    T.eq({ a.status, a.body.callId }, { 202, id }, "request " .. i)
  end
  local call = env:wait_final(id, 5000)
  T.eq({ call.status, call.endReason }, { "canceled", "canceled by API" })
  local tw = env.tw.calls[1]
  assert(tw:wait_final(3000), "the call over at Twilio")
  timer.sleep(200)
  T.eq(update_statuses(tw), { "canceled" }, "one cancel")
  -- Once the call is over, a hang-up is 409 not_active, and sends nothing.
  local status, body = env:api("POST", "/v1/calls/" .. id .. "/hangup")
  T.eq({ status, body.error.code }, { 409, "not_active" })
  T.eq(#tw.updates, 1)
end)

T.test("hang-ups at once for an answered call share one request; after a refused one, a later hang-up asks again", function()
  -- Answered, its voice webhook slow (no stream yet: the API hangs up at
  -- Twilio itself). Twilio refuses the first hang-up (503), 300 ms late.
  local env = kit.start({ twilio = { update_fail = 503, update_fail_times = 1,
    behaviour = { ring_ms = 50, voice_delay_ms = 8000, update_delay_ms = 300 } } })
  local id = env:create({ to = "+14155550502", prompt = "Say hello." })
  env:wait(id, function(r)
    return r.status == "in_progress"
  end, 5000, "answered")
  local tw = env.tw.calls[1]
  local answers = hang_up_at_once(env, id, 4)
  for i, a in ipairs(answers) do
    T.eq({ a.status, a.body.callId, a.body.status }, { 202, id, "in_progress" }, "request " .. i)
  end
  T.eq(update_statuses(tw), { "completed" }, "one hang-up, refused")
  T.eq(tw.final, nil, "the call still up at Twilio")
  -- A later hang-up asks Twilio again, which ends the call this time.
  T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
  T.eq(update_statuses(tw), { "completed", "completed" })
  local call = env:wait_final(id, 5000)
  T.eq({ call.status, call.endReason }, { "completed", "hung_up_by_api" })
  T.eq(tw.final, "completed")
end, { timeout = 20000 })

T.test("a hang-up Twilio took is not sent again by later hang-ups while its final status is on its way", function()
  -- Answered, no stream yet; the final callback of Twilio's is lost.
  local env = kit.start({ twilio = { behaviour = { ring_ms = 50, voice_delay_ms = 8000,
    lost_callbacks = { completed = true } } } })
  local id = env:create({ to = "+14155550503", prompt = "Say hello." })
  env:wait(id, function(r)
    return r.status == "in_progress"
  end, 5000, "answered")
  local tw = env.tw.calls[1]
  T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
  assert(tw:wait_final(3000), "the call over at Twilio")
  for _ = 1, 3 do
    local status, body = env:api("POST", "/v1/calls/" .. id .. "/hangup")
    T.eq({ status, body.status }, { 202, "in_progress" }, "waiting for the final status")
  end
  T.eq(update_statuses(tw), { "completed" }, "one hang-up")
end, { timeout = 20000 })

T.test("the API's cancel of a ringing call the callee answered just before (its answered callback lost, its voice webhook slow): hung up as answered, not recorded canceled", function()
  -- Twilio's cancel leaves an answered call up and answers with its status
  -- in-progress: the callee is on the line, and only a hang-up ends it.
  local env = kit.start({ twilio = { behaviour = { answer = true, ring_ms = 100, voice_delay_ms = 8000,
    lost_callbacks = { answered = true } } } })
  local id = env:create({ to = "+14155550508", prompt = "Say hello." })
  local tw = assert(env.tw:wait_call(3000))
  T.wait_for(function()
    return tw.answered_at and env.app.engine:call_view(id).attempts[1].providerCallId
  end, 3000, "the callee answers")
  T.eq(env.app.engine:call_view(id).status, "dialing", "no answered callback came")
  local status, body = env:api("POST", "/v1/calls/" .. id .. "/hangup")
  T.eq({ status, body.callId }, { 202, id })
  local t0 = timer.now()
  assert(tw:wait_final(3000), "the answered call hung up at Twilio, not left up for its voice webhook")
  T.lt(timer.now() - t0, 3000)
  T.eq({ tw.final, update_statuses(tw) }, { "completed", { "canceled", "completed" } })
  local call = env:wait_final(id, 3000)
  T.eq({ call.status, call.endReason, call.attempts[1].status, call.attempts[1].answeredAt ~= nil },
    { "completed", "hung_up_by_api", "completed", true })
end, { timeout = 20000 })

T.test("a cancel that waited for Twilio to name the call, and that Twilio refuses, is asked again: the phone stops ringing", function()
  -- Twilio answers the dial 800 ms late with no callback before it, and
  -- refuses the first cancel (503).
  local env = kit.start({ twilio = { create_delay_ms = 800, update_fail = 503, update_fail_times = 1,
    behaviour = { initiated_ms = 3000, ring_ms = 30000 } } })
  local id = env:create({ to = "+14155550504", prompt = "Say hello." })
  local rec = env:wait(id, function(r)
    return r.status == "dialing"
  end, 5000, "dialing")
  T.eq(rec.attempts[1].providerCallId, nil, "Twilio has not answered yet")
  T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
  T.eq(env:wait_final(id, 3000).status, "canceled")
  local tw = env.tw.calls[1]
  assert(tw:wait_final(4000), "the call canceled at Twilio, not left ringing")
  T.eq(tw.final, "canceled", "canceled by the second try, not rung until answered")
  T.eq(tw.answered_at, nil)
  T.eq(update_statuses(tw), { "canceled", "canceled" })
  T.lt(tw.updates[2].at - tw.updates[1].at, 2000, "asked again about a second later")
end, { timeout = 20000 })

T.test("a hang-up Twilio refuses because the call is over there already is done, not asked again", function()
  -- The callee declines while it rings; Twilio's final callback is lost, and
  -- it answers the cancel of the call that is over with 400 21220.
  local env = kit.start({ twilio = { ended_update = { status = 400, code = 21220 },
    behaviour = { ring_ms = 30000, lost_callbacks = { completed = true } } } })
  local id = env:create({ to = "+14155550506", prompt = "Say hello." })
  env:wait(id, function(r)
    return r.status == "dialing" and r.attempts[1] and r.attempts[1].providerCallId
  end, 5000, "ringing")
  local tw = env.tw.calls[1]
  tw:hangup()
  assert(tw:wait_final(3000), "declined at Twilio")
  T.eq(tw.final, "busy")
  T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
  local call = env:wait_final(id, 3000)
  T.eq({ call.status, call.endReason }, { "canceled", "canceled by API" })
  timer.sleep(1500) -- a cancel asked again would go 1 s after the first
  T.eq(update_statuses(tw), { "canceled" }, "one cancel: Twilio's GET said the call was over")
end, { timeout = 20000 })

T.test("a stop's cancel Twilio refuses because the callee declined: the call ends busy, not dialed again", function()
  -- The callee declines while it rings; Twilio's final callback is lost, and
  -- it refuses the stop's cancel of the call that is over (400 21220). The
  -- retry policy allows no second attempt: what Twilio's GET says ends it.
  local env = kit.start({ config = { retry = { maxAttempts = 1 } }, twilio = { ended_update = { status = 400,
    code = 21220 }, behaviour = { ring_ms = 30000, lost_callbacks = { completed = true } } } })
  local id = env:create({ to = "+14155550507", prompt = "Say hello." })
  env:wait(id, function(r)
    return r.status == "dialing" and r.attempts[1] and r.attempts[1].providerCallId
  end, 5000, "ringing")
  local tw = env.tw.calls[1]
  tw:hangup()
  assert(tw:wait_final(3000), "declined at Twilio")
  T.eq(tw.final, "busy")
  env.app:stop()
  T.eq(update_statuses(tw), { "canceled" }, "the stop's cancel")
  local app2 = env:next_start()
  timer.sleep(500)
  T.eq(#env.tw.calls, 1, "not dialed again")
  local rec = app2.engine:call_view(id)
  T.eq({ rec.status, #rec.attempts, rec.attempts[1].status }, { "busy", 1, "busy" })
end, { timeout = 20000 })

T.test("a stop while the API's cancel of a ringing call is on its way: the call ends canceled, not dialed again", function()
  -- The first hang-up of each call takes Twilio 5 s (a provider that waits
  -- before its request); the stop's own cancel goes at once. Twilio's final
  -- callbacks are lost.
  local dir = kit.twilio_variant("slowcancel", [[
local timer = require "callagent.timer"
local twilio_end, slowed = P.endCall, {}
function P:endCall(view, a)
  if not slowed[view.callId] then
    slowed[view.callId] = true
    timer.sleep(5000)
  end
  return twilio_end(self, view, a)
end
]])
  local env = kit.start({
    provider_dirs = { dir },
    twilio = { behaviour = { ring_ms = 30000, lost_callbacks = { completed = true } } },
    config = { telephony = { provider = "slowcancel" } },
  })
  local id = env:create({ to = "+14155550505", prompt = "Say hello." })
  env:wait(id, function(r)
    return r.status == "dialing" and r.attempts[1].providerCallId
  end, 5000, "ringing")
  task.spawn(function()
    env.app.engine:hangup(id)
  end)
  timer.sleep(100)
  env.app:stop()
  local tw = env.tw.calls[1]
  T.eq(tw.final, "canceled", "the stop canceled the ringing call")
  -- The next start finds the call canceled, and dials nothing.
  local app2 = env:next_start({ provider_dirs = { dir } })
  timer.sleep(500)
  T.eq(#env.tw.calls, 1, "not dialed again")
  local rec = app2.engine:call_view(id)
  T.eq({ rec.status, rec.endReason, rec.attempts[1].status }, { "canceled", "canceled by API", "canceled" })
end, { timeout = 30000 })

T.run()
