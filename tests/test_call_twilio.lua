-- A whole call through the Twilio provider: REST dial, signed /voice and
-- /status webhooks, the Media Streams WebSocket, the OpenAI Realtime session,
-- the report, the goodbye, the hang-up and the notification - against the
-- fake Twilio and fake OpenAI on loopback.
local T = require "testing"
local kit = require "callkit"
local timer = require "callagent.timer"
local json = require "callagent.json"
local audio = require "callagent.audio"

-- The callee: greets back, asks for a slot; the agent reports and says goodbye.
local function happy_script(session)
  assert(session:wait_event("response.create", 5000))
  session:speak({ ms = 600, text = "Hello, this is the assistant of Ada calling about a check-up." })
  session:user_speech({ ms = 300, text = "Sure, next Tuesday at ten works." })
  session:speak({ ms = 400, text = "Great, Tuesday at ten it is." })
  local out = session:call_function("report_call", {
    summary = "Booked a check-up for Tuesday 10:00.",
    outcome = "success",
    nextSteps = { "Add to calendar" },
    data = { date = "Tuesday", time = "10:00" },
  })
  session.report_output = out
  assert(session:wait_event("response.create", 5000))
  session:speak({ ms = 300, text = "Thank you, goodbye!" })
end

T.test("a live call's transcript comes from the store; its record in memory does not grow with it", function()
  local env = kit.start({
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Hello, this is the assistant." })
        session:user_speech({ ms = 200, text = "Hi, who is calling?" })
        timer.sleep(8000) -- the call stays live
      end,
    },
  })
  local id = env:create({ to = "+14155550109", prompt = "Say hello." })
  local rec = env:wait(id, function(r)
    return r.status == "in_progress" and #r.transcript >= 2
  end, 10000, "two transcript lines while the call is live")
  local texts = {}
  for i, l in ipairs(rec.transcript) do
    texts[i] = l.role .. ": " .. l.text
  end
  T.eq(texts, { "agent: Hello, this is the assistant.", "callee: Hi, who is calling?" })
  local live = env.app.engine.live[id]
  T.ok(live, "the call is live")
  T.eq(live.transcript, nil, "the live record holds no transcript")
end)

T.test("happy path: dial, talk, report, goodbye, hang up, notify", function()
  local env = kit.start({ realtime = { script = happy_script } })
  local id, created = env:create({
    to = "+14155550100",
    prompt = "Book a dental check-up for next week.",
    callerName = "Ada",
    calleeName = "Dr. Smith's office",
    timezone = "Europe/Paris",
    metadata = { ticket = "T-42" },
  })
  T.match(id, "^c_%x+$")
  T.ok(created.status == "queued" or created.status == "dialing", created.status)

  local call = env:wait_final(id, 20000)
  T.eq(call.status, "completed")
  T.eq(call.report.outcome, "success")
  T.eq(call.report.summary, "Booked a check-up for Tuesday 10:00.")
  T.eq(call.report.nextSteps, { "Add to calendar" })
  T.eq(call.report.data, { date = "Tuesday", time = "10:00" })
  T.eq(call.attempt, 1)
  T.eq(#call.attempts, 1)
  T.eq(call.attempts[1].status, "completed")
  T.match(call.attempts[1].providerCallId, "^CA%x+$")
  T.ok(call.completedAt and call.createdAt and call.updatedAt)
  T.eq(call.metadata, { ticket = "T-42" })

  -- Transcript of both sides, in order.
  local roles, texts = {}, {}
  for _, l in ipairs(call.transcript) do
    roles[#roles + 1] = l.role
    texts[#texts + 1] = l.text
  end
  T.eq(roles[1], "agent")
  T.match(texts[1], "assistant of Ada")
  local saw_callee = false
  for i, r in ipairs(roles) do
    if r == "callee" then
      saw_callee = texts[i] == "Sure, next Tuesday at ten works."
    end
  end
  T.ok(saw_callee, "callee line in transcript: " .. json.encode(call.transcript))
  T.match(texts[#texts], "goodbye")

  -- Usage summed over the responses.
  T.ge(call.usage.responses, 4)
  T.gt(call.usage.total_tokens, 0)
  T.gt(call.usage.output_audio_tokens, 0)

  -- Twilio saw the right REST request, webhooks and a hang-up.
  local tw = env.tw.calls[1]
  T.eq(tw.params.To, "+14155550100")
  T.eq(tw.params.From, "+15550001111")
  T.match(tw.params.Url, "/voice%?callId=" .. id .. "&attempt=1$")
  T.match(tw.params.StatusCallback, "/status%?callId=" .. id .. "&attempt=1$")
  T.eq(tw.params.StatusCallbackEvent, { "initiated", "ringing", "answered", "completed" })
  -- Twilio's TimeLimit is a backstop: past the wrap-up and the goodbye
  -- (600 + 20 + 3 s here), plus a minute.
  T.eq({ tw.params.Timeout, tw.params.TimeLimit }, { "30", "683" })
  T.eq(tw.voice_request.status, 200)
  T.eq(tw.stream_params.callId, id)
  T.ok(tw.stream_params.token and #tw.stream_params.token >= 20, "a stream token")
  T.ok(tw.hangup_requested_at, "callagent hung up")
  T.ok(tw.played_bytes > 8 * 1000, "agent audio played on the phone")
  -- The fake records a callback's answer once it has read it, which may be
  -- after the app wrote the status the completed callback brought.
  T.ok(tw:wait_closed(5000), "the completed callback answered")
  for _, cb in ipairs(tw.callbacks) do
    T.eq(cb.response_status, 204, "status callback " .. cb.status)
  end

  -- The model got the GA session: instructions with the brief and context.
  local s = env.rt.sessions[1]
  T.eq(s.model, "gpt-realtime")
  T.eq(s.headers.authorization, "Bearer " .. kit.API_KEY)
  local cfg = s.config
  T.eq(cfg.type, "realtime")
  T.match(cfg.instructions, "Book a dental check%-up")
  T.match(cfg.instructions, "Dr%. Smith's office")
  T.match(cfg.instructions, "on behalf of Ada")
  T.match(cfg.instructions, "Europe/Paris")
  -- The local time there, as the C library tells it (a minute may have turned).
  local _, now_paris = T.exec({ "date", "+%A, %B %-d, %Y, %H:%M (%Z, UTC%:z)" }, { env = { TZ = "Europe/Paris" } })
  local said = cfg.instructions:match("Current date and time where you are calling: ([^\n]-) %(time zone")
  T.diag("instructions: " .. tostring(said) .. "; date: " .. now_paris[1])
  T.eq(said and (said:gsub("%d%d:%d%d", "HH:MM")), (now_paris[1]:gsub("%d%d:%d%d", "HH:MM")))
  T.eq(cfg.audio.input.format.type, "audio/pcmu")
  T.eq(cfg.audio.output.format.type, "audio/pcmu")
  T.eq(cfg.audio.output.voice, "alloy")
  T.eq(cfg.audio.input.turn_detection.type, "server_vad")
  T.ok(cfg.audio.input.transcription and cfg.audio.input.transcription.model, "transcription on")
  T.eq(cfg.tools[1].name, "report_call")
  T.match(s.report_output, '"ok":true')
  T.gt(s.input_bytes, 8 * 500, "caller audio reached the model")

  -- The notification, once, with the seed's payload.
  T.wait_for(function()
    return #env.hooks.received >= 1
  end, 5000, "notification")
  timer.sleep(100)
  T.eq(#env.hooks.received, 1)
  local h = env.hooks.received[1]
  T.eq(h.headers.authorization, "Bearer " .. kit.HOOKS_TOKEN)
  T.eq(h.headers["idempotency-key"], id .. ":completed")
  local p = h.json
  T.eq(p.name, "CallAgent")
  T.eq(p.sessionKey, "test-session")
  T.eq(p.wakeMode, "now")
  T.eq(p.deliver, true)
  T.eq(p.data.callId, id)
  T.eq(p.data.status, "completed")
  T.eq(p.data.to, "+14155550100")
  T.eq(p.data.calleeName, "Dr. Smith's office")
  T.eq(p.data.report.outcome, "success")
  T.eq(p.data.metadata, { ticket = "T-42" })
  T.match(p.message, "completed: success")
end, { timeout = 40000 })

T.test("a provider without endCall (it is optional) hangs up by closing the media stream", function()
  -- Twilio without its REST hang-up.
  local dir = kit.twilio_variant("nohangup", [[
P.endCall = nil
]])
  local env = kit.start({ realtime = { script = happy_script }, provider_dirs = { dir },
    config = { telephony = { provider = "nohangup" } } })
  T.eq(env.app.provider.name, "nohangup")
  local id = env:create({ to = "+14155550100", prompt = "Book a dental check-up for next week." })
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "completed")
  T.eq(call.report.outcome, "success")
  local tw = env.tw.calls[1]
  tw:wait_closed(5000)
  T.eq(tw.hangup_requested_at, nil, "no REST hang-up")
  T.eq(tw.end_reason, "stream_closed")
  T.eq({ tw.stream_closed.by, tw.stream_closed.code }, { "app", 1000 })
end, { timeout = 40000 })

T.test("on shutdown, live calls are hung up concurrently, not one API round trip after another", function()
  local env = kit.start({
    twilio = { update_delay_ms = 400 },
    realtime = {
      script = function()
        timer.sleep(20000) -- the callee keeps talking: the calls stay live
      end,
    },
  })
  local N = 6
  for i = 1, N do
    env:create({ to = "+1415555013" .. i, prompt = "Stay on the line." })
  end
  T.wait_for(function()
    return #env.rt.sessions >= N
  end, 10000, "every call's stream and model session")
  local t0 = timer.now()
  env.app:stop()
  local took = timer.now() - t0
  local first, last = math.huge, 0
  for i = 1, N do
    local at = env.tw.calls[i].hangup_requested_at
    T.ok(at, "call " .. i .. " was hung up")
    first, last = math.min(first, at), math.max(last, at)
  end
  -- One after another they would be 400 ms apart each (2 s from first to
  -- last, 2.4 s in all); the bounds tell that from "together" with room for a
  -- loaded machine (ASan, two busy cores), where 200 and 800 ms were tight.
  T.lt(last - first, 400, "the hang-ups went out together, not one per round trip")
  T.ge(took, 390, "stop waited for the API's answers")
  T.lt(took, N / 2 * 400, "in about one round trip, not " .. N .. " (" .. N * 400 .. " ms)")
end, { timeout = 30000 })

T.test("a publicBaseUrl whose scheme is in capitals (HTTP://) still gives the call a ws:// stream URL, and its stream starts", function()
  -- The scheme was kept as written: the stream URL became HTTP://…/voice/stream
  -- (Twilio's <Stream> takes wss:// only) and the upgrade's signature was
  -- checked over it too, so every call was answered and never streamed.
  local port = T.free_port()
  local env = kit.start({ config = { server = { port = port, publicBaseUrl = "HTTP://127.0.0.1:" .. port } } })
  local id = env:create({ to = "+14155550111", prompt = "Say hello." })
  local call = assert(env.tw:wait_call(5000))
  T.eq(call.params.Url, "http://127.0.0.1:" .. port .. "/voice?callId=" .. id .. "&attempt=1")
  T.ok(call:wait_stream(5000), "the stream started: " .. tostring(call.stream_error))
  T.eq(call.stream_url, "ws://127.0.0.1:" .. port .. "/voice/stream")
end)

-- A form POST to one of our webhook URLs, signed as Twilio signs it.
local function signed_post(env, path, params)
  local fetch = require "callagent.fetch"
  local target = env.base .. path
  return assert(fetch(target, { method = "POST", body = require("callagent.url").form_encode(params), headers = {
    ["Content-Type"] = "application/x-www-form-urlencoded",
    ["X-Twilio-Signature"] = require("fakes.twilio").sign(kit.TOKEN, target, params) } }))
end

T.test("a SequenceNumber that is no decimal whole number (1e999, 0x10, ' 7', 1.5, -1) orders nothing: later callbacks still count", function()
  -- tonumber took "1e999" as infinity (and "0x10" as 16, " 7" as 7): every
  -- later callback of the call, its busy one here, was dropped as stale and
  -- the call stayed dialing until the ring timeout.
  local twilio = dofile(require("callagent.core").root .. "/providers/twilio.lua")
  for _, v in ipairs({ "1e999", "0x10", " 7", "7 ", "1.5", "-1", "+3", "", "9999999999999999" }) do
    T.eq(twilio:mapStatus({ CallStatus = "ringing", SequenceNumber = v }).sequence, nil, v)
  end
  T.eq(twilio:mapStatus({ CallStatus = "ringing", SequenceNumber = "12" }).sequence, 12)
  T.eq(twilio:mapStatus({ CallStatus = "completed", CallDuration = "1e9" }).duration, nil)
  local env = kit.start({ twilio = { behaviour = { answer = "busy", ring_ms = 1500 } }, config = { retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550112", prompt = "Say hello." })
  local rec = env:wait(id, function(r)
    return r.status == "dialing" and r.attempts[1].providerCallId
  end, 5000, "dialing")
  for _, v in ipairs({ " 7", "0x10", "1e999" }) do
    local res = signed_post(env, "/status?callId=" .. id .. "&attempt=1",
      { CallSid = rec.attempts[1].providerCallId, CallStatus = "ringing", SequenceNumber = v, AccountSid = kit.ACCOUNT })
    T.eq(res.status, 204, v)
  end
  local call = env:wait_final(id, 5000)
  T.eq(call.status, "busy", "Twilio's busy callback (SequenceNumber 2) was taken")
end)

T.test("a failed call's callback with an ErrorCode: the attempt's reason names it after the SIP code, never ErrorMessage", function()
  local twilio = dofile(require("callagent.core").root .. "/providers/twilio.lua")
  local function reason(p)
    p.CallStatus = "failed"
    return twilio:mapStatus(p).reason
  end
  T.eq(reason({ SipResponseCode = "404", ErrorCode = "13227", ErrorMessage = "Geo permissions <script>" }),
    "call failed (SIP 404, Twilio error 13227)")
  T.eq(reason({ ErrorCode = "32009" }), "call failed (Twilio error 32009)")
  T.eq(reason({ SipResponseCode = 503 }), "call failed (SIP 503)", "a JSON body's number")
  for _, bad in ipairs({ "1e4", "123", "123456", " 13227", "13227x", "-1322" }) do
    T.eq(reason({ SipResponseCode = "500", ErrorCode = bad }), "call failed (SIP 500)", bad)
  end
  -- Through the server: the record's attempt says why.
  local env = kit.start({ twilio = { behaviour = { ring_ms = 3000 } }, config = { retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550114", prompt = "Say hello." })
  local rec = env:wait(id, function(r)
    return r.status == "dialing" and r.attempts[1].providerCallId
  end, 5000, "dialing")
  T.eq(signed_post(env, "/status?callId=" .. id .. "&attempt=1", { CallSid = rec.attempts[1].providerCallId,
    CallStatus = "failed", SequenceNumber = "5", SipResponseCode = "404", ErrorCode = "13227",
    ErrorMessage = "Twilio could not place the call", AccountSid = kit.ACCOUNT }).status, 204)
  local call = env:wait_final(id, 3000)
  T.eq({ call.status, call.attempts[1].reason }, { "failed", "call failed (SIP 404, Twilio error 13227)" })
end)

T.test("a stream whose start.callSid is not the attempt's call, or whose callId is not the token's, is refused, and the token stays for the call's own stream", function()
  -- The token and callId alone took the call: a stream of another Twilio
  -- call (of the same account, with the token copied from a log or a
  -- TwiML bin) got the agent, and the call's own stream was refused as
  -- "already used".
  local ws = require "callagent.ws"
  local fake = require "fakes.twilio"
  local env = kit.start({ twilio = { behaviour = { stream = false } } })
  local id = env:create({ to = "+14155550113", prompt = "Say hello." })
  local tw = assert(env.tw:wait_call(5000))
  T.wait_for(function()
    return tw.twiml and tw.twiml.stream
  end, 5000, "the TwiML")
  local stream_url = env.base:gsub("^http", "ws") .. "/voice/stream"
  local sid = "MZ" .. string.rep("2", 32)
  local function start(call_sid, params)
    local conn = assert(ws.connect(stream_url, { headers = { ["X-Twilio-Signature"] = fake.sign(kit.TOKEN, stream_url) } }))
    conn:send(json.encode({ event = "connected", protocol = "Call", version = "1.0.0" }))
    conn:send(json.encode({ event = "start", sequenceNumber = "1", streamSid = sid, start = { streamSid = sid,
      callSid = call_sid, accountSid = kit.ACCOUNT, customParameters = params or tw.twiml.stream.parameters } }))
    return conn, conn:receive(1000)
  end
  local other = "CA" .. string.rep("f", 32)
  T.ne(other, tw.sid)
  local _, kind, code, reason = start(other)
  T.eq({ kind, code, reason }, { "close", 1008, "stream of another provider call" })
  -- Nor does one that names another callId beside the token use it up.
  _, kind, code, reason = start(other, { callId = "c_someone_else", attempt = "1",
    token = tw.twiml.stream.parameters.token })
  T.eq({ kind, code, reason }, { "close", 1008, "stream of another provider call" })
  _, kind, code, reason = start(json.null)
  T.eq({ kind, code, reason }, { "close", 1008, "start without a callSid" })
  -- The call's own callSid with another callId beside the token: refused
  -- alike, in one WARN naming the call the token is for, never the token.
  local log = require "callagent.log"
  local warn, refusals = log.warn, {}
  log.warn = function(msg, fields)
    if msg == "media stream refused" then
      refusals[#refusals + 1] = fields
    end
    return warn(msg, fields)
  end
  T.defer(function()
    log.warn = warn
  end)
  local token = tw.twiml.stream.parameters.token
  _, kind, code, reason = start(tw.sid, { callId = "c_someone_else", attempt = "1", token = token })
  log.warn = warn
  T.eq({ kind, code, reason }, { "close", 1008, "stream token belongs to another call" })
  T.eq(#refusals, 1, "one line")
  T.eq({ refusals[1].call, refusals[1].attempt, refusals[1].reason }, { id, 1, "stream token belongs to another call" })
  T.lacks(json.encode(refusals[1]), token, "no stream token in the log")
  T.eq(env:get(id).status, "in_progress", "the call goes on")
  local conn
  conn, kind = start(tw.sid)
  T.ne(kind, "close", "the call's own stream is taken")
  T.ok(env.app.engine.bridges[id .. "#1"].stream, "the bridge has the stream")
  conn:close(1000, "bye")
end)

T.test("a stream that starts before Twilio has named the call (dial's answer and callbacks late) is taken", function()
  -- Nothing to compare its callSid with yet: it is not refused, and the
  -- call goes on once the answer names the call.
  local env = kit.start({ twilio = { create_delay_ms = 800, behaviour = { ring_ms = 20, callback_delay_ms = 800 } } })
  local id = env:create({ to = "+14155550116", prompt = "Say hello." })
  local tw = assert(env.tw:wait_call(5000))
  assert(tw:wait_stream(5000))
  T.wait_for(function()
    local b = env.app.engine.bridges[id .. "#1"]
    return b and b.stream
  end, 3000, "the bridge has the stream")
  T.eq(env:get(id).attempts[1].providerCallId, nil, "Twilio has not named the call yet")
  env:wait(id, function(r)
    return r.attempts[1].providerCallId == tw.sid
  end, 5000, "the dial's answer")
  T.eq(env:get(id).status, "in_progress")
end)

T.test("a real process: a stream of another callSid is one WARN naming the call and the mismatch, never the token", function()
  local ws = require "callagent.ws"
  local fake = require "fakes.twilio"
  local tw = assert(fake.start({ account_sid = kit.ACCOUNT, auth_token = kit.TOKEN, behaviour = { stream = false } }))
  local rt = assert(require("fakes.realtime").start({ api_key = kit.API_KEY }))
  T.defer(function()
    tw:close()
    rt:close()
  end)
  local p, api = kit.app_process(tw, rt)
  local id = api:create({ to = "+14155550115", prompt = "Say hello." })
  local c = assert(tw:wait_call(10000))
  T.wait_for(function()
    return c.twiml and c.twiml.stream
  end, 10000, "the TwiML")
  local stream_url = "ws://127.0.0.1:" .. api.port .. "/voice/stream"
  local conn = assert(ws.connect(stream_url, { headers = { ["X-Twilio-Signature"] = fake.sign(kit.TOKEN, stream_url) } }))
  local sid = "MZ" .. string.rep("3", 32)
  conn:send(json.encode({ event = "start", sequenceNumber = "1", streamSid = sid, start = { streamSid = sid,
    callSid = "CA" .. string.rep("e", 32), customParameters = c.twiml.stream.parameters } }))
  T.eq(select(3, conn:receive(3000)), "stream of another provider call")
  p:kill("SIGTERM")
  p:wait(5000)
  local log = p.errtext()
  local lines = {}
  for line in log:gmatch("[^\n]*media stream refused[^\n]*") do
    lines[#lines + 1] = line
  end
  -- One line for one refusal (README: each refusal is one WARN line), and it
  -- says whose call the stream tried to take, and why it could not.
  T.eq(#lines, 1, log)
  T.match(lines[1], "WARN media stream refused ")
  T.match(lines[1], " call=" .. id .. "%f[^%w_]")
  T.match(lines[1], " attempt=1%f[^%w_]")
  T.match(lines[1], 'reason="stream of another provider call"')
  -- Plainly: the token is base64url, and a "-" in it made the pattern miss
  -- the token written out whole.
  T.eq(log:find(c.twiml.stream.parameters.token, 1, true), nil, "no stream token in the log")
end, { timeout = 30000 })

T.test("with Twilio's own API, an http:// public URL is refused at start: its <Stream> would be ws://", function()
  -- Twilio connects Media Streams to wss:// only (protocols.md section 2):
  -- each call was answered, got no stream, was hung up as no_stream and
  -- dialed again. A fake or emulator of Twilio (another apiBaseUrl) may
  -- take ws://, and an https:// public URL is wss://.
  local callagent = require "callagent"
  local function start(public, api)
    local app = assert(callagent.app({
      telephony = { provider = "twilio" },
      server = { host = "127.0.0.1", port = 0, publicBaseUrl = public, apiToken = "api-token-for-twilio-tests" },
      twilio = { accountSid = kit.ACCOUNT, authToken = kit.TOKEN, fromNumber = "+15550001111", apiBaseUrl = api },
      openai = { apiKey = kit.API_KEY },
      store = { backend = "memory" },
      tunnel = { provider = "none" },
    }, { no_shutdown_hook = true }))
    local ok, err = app:start()
    if ok then
      app:stop()
    end
    return ok, err
  end
  -- A host name may end in the root's dot, and carry a port.
  for _, api in ipairs({ "https://api.twilio.com", "https://api.dublin.ie1.twilio.com", "https://API.Twilio.com/",
    "https://api.twilio.com.", "https://API.TWILIO.COM.:443/" }) do
    local ok, err = start("http://calls.example.com:8080", api)
    T.eq(ok, nil, api)
    T.eq(err, "the twilio provider's init failed: server.publicBaseUrl: Twilio connects its media stream only to "
      .. "wss://, and an http:// URL makes it ws://: give the https:// URL Twilio reaches this server at", api)
    T.lacks(err, kit.TOKEN, "no auth token")
  end
  T.ok(start("https://calls.example.com", "https://api.twilio.com"))
  T.ok(start("http://calls.example.com", "http://twilio-emulator.internal:8080"))
  T.ok(start("http://calls.example.com", "http://twilio.com.emulator.internal"))
end)

T.run()
