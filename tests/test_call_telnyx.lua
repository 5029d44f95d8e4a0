-- Whole calls through the Telnyx provider (providers/telnyx.lua): REST dial
-- with a Bearer key, Ed25519-signed Call Control webhooks, streaming_start at
-- the answer, Telnyx's media stream on WS /voice/stream, the OpenAI Realtime
-- session, the report, the goodbye, the hang-up and the notification -
-- against the fake Telnyx and the fake OpenAI on loopback.
local T = require "testing"
local kit = require "callkit"
local fake = require "fakes.telnyx"
local fetch = require "callagent.fetch"
local json = require "callagent.json"
local crypto = require "callagent.crypto"
local log = require "callagent.log"
local timer = require "callagent.timer"

local API_KEY = "KEY0123456789ABCDEF_telnyx-test-key"
local CONNECTION = "1494404757140276705"
local FROM = "+15550002222"

-- The callee greets back; the agent reports and says goodbye.
local function happy_script(session)
  assert(session:wait_event("response.create", 5000))
  session:speak({ ms = 600, text = "Hello, this is the assistant of Ada calling about a check-up." })
  session:user_speech({ ms = 300, text = "Sure, next Tuesday at ten works." })
  session:speak({ ms = 400, text = "Great, Tuesday at ten it is." })
  session.report_output = session:call_function("report_call", {
    summary = "Booked a check-up for Tuesday 10:00.",
    outcome = "success",
    nextSteps = { "Add to calendar" },
    data = { date = "Tuesday", time = "10:00" },
  })
  assert(session:wait_event("response.create", 5000))
  session:speak({ ms = 300, text = "Thank you, goodbye!" })
end

-- A fake Telnyx and an app using it. opts: behaviour, script, config, fake
-- (more fakes.telnyx options).
local function start(opts)
  opts = opts or {}
  local fo = { api_key = API_KEY, connection_id = CONNECTION, behaviour = opts.behaviour }
  for k, v in pairs(opts.fake or {}) do
    fo[k] = v
  end
  local tx = assert(fake.start(fo))
  T.defer(function()
    tx:close()
  end)
  local config = {
    telephony = { provider = "telnyx" },
    telnyx = { apiKey = API_KEY, connectionId = CONNECTION, fromNumber = FROM, publicKey = tx.public_key,
      apiBaseUrl = tx.url },
  }
  for k, v in pairs(opts.config or {}) do
    if type(v) == "table" and type(config[k]) == "table" then
      for k2, v2 in pairs(v) do
        config[k][k2] = v2
      end
    else
      config[k] = v
    end
  end
  local env = kit.start({ realtime = { script = opts.script or happy_script }, config = config })
  env.tx = tx
  return env
end

-- A webhook as Telnyx sends one, signed with key (raw private) at ts. Its
-- client_state is the dial's for call id, attempt n (Telnyx echoes it in
-- every webhook of the call) unless payload.client_state is given (false:
-- none).
local function post_webhook(env, id, n, event, payload, key, ts, sig)
  if payload.client_state == nil then
    payload.client_state = crypto.base64_encode(id .. " " .. n)
  elseif payload.client_state == false then
    payload.client_state = nil
  end
  local body = json.encode({
    data = { event_type = event, id = crypto.uuid4(), occurred_at = "2026-01-01T00:00:00Z", payload = payload,
      record_type = "event" },
    meta = { attempt = 1 },
  })
  ts = tostring(ts or os.time())
  local res = assert(fetch(env.base .. "/telnyx/webhook?callId=" .. id .. "&attempt=" .. n, {
    method = "POST",
    body = body,
    headers = {
      ["Content-Type"] = "application/json",
      ["telnyx-timestamp"] = ts,
      ["telnyx-signature-ed25519"] = sig or fake.sign(key or env.tx.private_key, ts, body),
    },
  }))
  return res.status, res
end

-- A call answered and streaming, whose model says nothing (for 15 s): env,
-- the call's id, and the fake's call.
local function streaming_call(to)
  local env = start({ script = function()
    timer.sleep(15000)
  end })
  local id = env:create({ to = to, prompt = "x" })
  local tx = assert(env.tx:wait_call(5000))
  tx:wait(function()
    return tx.stream_started_at
  end, 10000)
  return env, id, tx
end

-- The body of the call.answered webhook the fake sent for its call.
local function answered_body(call)
  local body
  for _, e in ipairs(call.events) do
    if e.event == "call.answered" then
      body = e.body
    end
  end
  T.ok(body, "the call.answered webhook")
  return body
end

-- The call's events as stored (the API's view of a call leaves them out).
local function events_of(env, id)
  return env.app.store:get_call(id).events or {}
end

T.test("happy path: dial, answered, streaming_start, talk, report, goodbye, hang up, completed, notified", function()
  local env = start()
  local id = env:create({ to = "+14155550100", prompt = "Book a dental check-up for next week.", callerName = "Ada" })
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "completed")
  T.eq(call.report.outcome, "success")
  T.eq(call.report.summary, "Booked a check-up for Tuesday 10:00.")
  T.eq(call.report.data, { date = "Tuesday", time = "10:00" })
  T.eq(#call.attempts, 1)
  T.eq(call.attempts[1].status, "completed")
  local tx = env.tx.calls[1]
  T.eq(call.attempts[1].providerCallId, tx.control_id)
  T.match(tx.control_id, "^v3:")

  -- The transcript of both sides.
  local lines = {}
  for _, l in ipairs(call.transcript) do
    lines[#lines + 1] = l.role .. ": " .. l.text
  end
  T.match(lines[1], "^agent: Hello, this is the assistant of Ada")
  local heard = false
  for _, l in ipairs(lines) do
    heard = heard or l == "callee: Sure, next Tuesday at ten works."
  end
  T.ok(heard, "the callee's line: " .. json.encode(lines))
  T.match(lines[#lines], "goodbye")

  -- The dial as Telnyx's API takes it.
  local b = tx.body
  T.eq({ b.connection_id, b.to, b.from }, { CONNECTION, "+14155550100", FROM })
  T.match(b.webhook_url, "/telnyx/webhook%?callId=" .. id .. "&attempt=1$")
  T.eq(b.webhook_url_method, "POST")
  T.eq(b.timeout_secs, 30)
  T.eq(b.time_limit_secs, 600 + 20 + 3 + 60)
  T.eq(b.stream_url, nil, "no stream before the answer")
  for _, r in ipairs(env.tx.requests) do
    T.eq(r.auth, "Bearer " .. API_KEY, r.method .. " " .. r.path)
  end

  -- streaming_start after call.answered, with the one-time token.
  local s = tx.stream
  T.ok(s, "streaming_start was sent")
  T.eq(s.stream_url, env.base:gsub("^http", "ws") .. "/voice/stream")
  T.eq({ s.stream_track, s.stream_bidirectional_mode, s.stream_bidirectional_codec }, { "inbound_track", "rtp", "PCMU" })
  T.eq(tx.stream_params.callId, id)
  T.eq(tx.stream_params.attempt, "1")
  T.ok(#(tx.stream_params.token or "") >= 20, "a stream token")
  T.no_match(s.stream_url, "token", "the token is not in the URL")

  -- Audio both ways, marks echoed, hung up by the API; no protocol mistakes.
  T.ok(tx.hangup_requested_at, "callagent hung up through the REST API")
  T.gt(tx:played_bytes(), 8 * 1000, "agent audio played on the phone")
  T.gt(#tx.marks_echoed, 0, "marks echoed")
  T.eq(tx.errors, {})
  T.gt(env.rt.sessions[1].input_bytes, 8 * 500, "the callee's audio reached the model")
  tx:wait(function()
    return tx.done
  end, 5000)
  for _, e in ipairs(tx.events) do
    T.eq(e.status, 200, "webhook " .. e.event)
  end
  local names = {}
  for _, e in ipairs(tx.events) do
    names[#names + 1] = e.event
  end
  T.eq(names, { "call.initiated", "call.answered", "streaming.started", "call.hangup" })

  -- Notified once.
  T.wait_for(function()
    return #env.hooks.received >= 1
  end, 5000, "notification")
  timer.sleep(100)
  T.eq(#env.hooks.received, 1)
  T.eq(env.hooks.received[1].json.data.status, "completed")
  T.eq(env.hooks.received[1].json.data.report.outcome, "success")
end, { timeout = 40000 })

T.test("busy (user_busy) and no answer (timeout) are retried by the retry policy; the third attempt talks", function()
  local n = 0
  local env = start({ behaviour = function()
    n = n + 1
    return ({ "busy", "no-answer", "answer" })[n]
  end })
  local id = env:create({ to = "+14155550101", prompt = "Book a check-up." })
  local call = env:wait_final(id, 30000)
  T.eq(call.status, "completed")
  T.eq(#call.attempts, 3)
  T.eq({ call.attempts[1].status, call.attempts[2].status, call.attempts[3].status }, { "busy", "no_answer", "completed" })
  T.eq(call.attempts[1].reason, "line busy")
  T.eq(call.attempts[2].reason, "no answer")
  T.eq(#env.tx.calls, 3)
  T.eq(env.tx.calls[1].stream, nil, "no stream for a busy line")
  T.match(env.tx.calls[2].body.webhook_url, "attempt=2$")
end, { timeout = 40000 })

T.test("a rejected call is busy; out of attempts, the call ends busy and is notified", function()
  local env = start({ behaviour = "rejected", config = { retry = { maxAttempts = 2, initialDelayMs = 50 } } })
  local id = env:create({ to = "+14155550102", prompt = "x" })
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "busy")
  T.eq(#call.attempts, 2)
  T.eq(call.attempts[2].reason, "call rejected")
  T.wait_for(function()
    return #env.hooks.received >= 1
  end, 5000, "notification")
  T.eq(env.hooks.received[1].json.data.status, "busy")
end, { timeout = 30000 })

T.test("a key pressed reaches the model from Telnyx's dtmf event", function()
  -- No goodbye is said: the goodbye's bound (1 s, not the kit's 3) ends the call.
  local env = start({ config = { call = { goodbyeTimeoutSec = 1 } }, script = function(session)
    assert(session:wait_event("response.create", 5000))
    local ev = session:wait_event("conversation.item.create", 5000)
    session.key = ev and ev.item.content[1].text
    session:call_function("report_call", { summary = "A key.", outcome = "success" })
    session:wait_event("response.create", 5000)
  end })
  local id = env:create({ to = "+14155550108", prompt = "Ask for a key." })
  local tx = assert(env.tx:wait_call(5000))
  tx:wait(function()
    return tx.stream_started_at
  end, 10000)
  T.wait_for(function()
    local s = env.rt.sessions[1]
    return s and #s.response_creates > 0
  end, 5000, "the greeting: the model session is ready")
  assert(tx:send_dtmf("7"))
  T.eq(env:wait_final(id, 20000).status, "completed")
  T.eq(env.rt.sessions[1].key, "[The callee pressed the key 7]")
end, { timeout = 40000 })

T.test("a Telnyx-shaped start with a token that is not the call's is refused (1008); the call goes on", function()
  local ws = require "callagent.ws"
  local env, id, tx = streaming_call("+14155550109")
  local closed
  local conn = assert(ws.connect(env.base:gsub("^http", "ws") .. "/voice/stream", {
    on_close = function(_, code)
      closed = code
    end,
  }))
  conn:send('{"event":"connected","version":"1.0.0"}')
  -- The call's own token, already used by Telnyx's stream.
  conn:send(json.encode({ event = "start", sequence_number = "1", stream_id = "5f0c4f2b-hostile",
    start = { call_control_id = tx.control_id, custom_parameters = tx.stream_params } }))
  T.wait_for(function()
    return closed
  end, 5000, "the hostile stream closed")
  T.eq(closed, 1008)
  timer.sleep(200)
  T.eq(env:get(id).status, "in_progress")
  T.eq(tx.stream_closed, nil, "Telnyx's stream is untouched")
end, { timeout = 30000 })

T.test("a start whose call_control_id is not the attempt's call is refused (1008); the token stays for the call's own stream", function()
  local ws = require "callagent.ws"
  local env = start({ behaviour = { stream = false }, script = function() timer.sleep(15000) end })
  local id = env:create({ to = "+14155550139", prompt = "x" })
  local tx = assert(env.tx:wait_call(5000))
  T.wait_for(function()
    return tx.stream
  end, 5000, "streaming_start")
  local params = {}
  for _, kv in ipairs(tx.stream.custom_parameters) do
    params[kv.name] = kv.value
  end
  local function try(control_id)
    local conn = assert(ws.connect(env.base:gsub("^http", "ws") .. "/voice/stream"))
    conn:send('{"event":"connected","version":"1.0.0"}')
    conn:send(json.encode({ event = "start", sequence_number = "1", stream_id = "5f0c4f2b-0001",
      start = { call_control_id = control_id, custom_parameters = params,
        media_format = { encoding = "PCMU", sample_rate = 8000, channels = 1 } } }))
    return conn, conn:receive(1000)
  end
  local _, kind, code, reason = try("v3:another-call-of-the-account")
  T.eq({ kind, code, reason }, { "close", 1008, "stream of another provider call" })
  _, kind, code, reason = try(json.null)
  T.eq({ kind, code, reason }, { "close", 1008, "start without a call_control_id" })
  local conn
  conn, kind = try(tx.control_id)
  T.ne(kind, "close", "the call's own stream is taken")
  T.ok(env.app.engine.bridges[id .. "#1"].stream, "the bridge has the stream")
  conn:close(1000, "bye")
end, { timeout = 20000 })

T.test("hangup causes map to statuses; other events are no status", function()
  local env = start({ script = function() end })
  local p = env.app.provider
  local function map(event, cause, sip)
    local st, err = p:mapStatus({ data = { event_type = event, payload = { call_control_id = "v3:abc-_:1",
      hangup_cause = cause, sip_hangup_cause = sip } } })
    return st and st.status or err, st and st.reason
  end
  T.eq({ map("call.initiated") }, { "dialing" })
  T.eq({ map("call.answered") }, { "in_progress" })
  T.eq({ map("call.hangup", "normal_clearing") }, { "completed" })
  T.eq({ map("call.hangup", "user_busy") }, { "busy", "line busy" })
  T.eq({ map("call.hangup", "timeout") }, { "no_answer", "no answer" })
  T.eq({ map("call.hangup", "call_rejected") }, { "busy", "call rejected" })
  T.eq({ map("call.hangup", "originator_cancel") }, { "canceled", "canceled" })
  T.eq({ map("call.hangup", "not_found", "404") }, { "failed", "call failed: not_found (SIP 404)" })
  T.eq({ map("call.hangup", "a/b?c") }, { "failed", "call failed" })
  T.eq(map("streaming.started"), "not a call status event: streaming.started")
  T.eq(p:mapStatus({ data = { event_type = "call.answered", payload = { call_control_id = "v3:x/../y" } } })
    .providerCallId, nil, "an odd id is not taken")
end)

T.test("getCall: a live call counts as ringing, an ended one cannot say how it ended, an odd id asks nothing", function()
  local env, id, tx = streaming_call("+14155550112")
  local p = env.app.provider
  local st = p:getCall(tx.control_id)
  T.eq(st and st.status, "dialing", "alive")
  tx:hangup()
  tx:wait(function()
    return tx.done
  end, 5000)
  local none, err = p:getCall(tx.control_id)
  T.eq(none, nil)
  T.match(err, "has ended")
  local before = #env.tx.requests
  T.eq(p:getCall("v3:a/../b"), nil)
  T.eq(#env.tx.requests, before, "no request for an odd id")
  T.eq(env:wait_final(id, 10000).status, "completed")
end, { timeout = 30000 })

T.test("a forged, stale, future or unsigned webhook is refused with 403 and changes nothing", function()
  local env = start({ script = function()
    timer.sleep(15000)
  end })
  local id = env:create({ to = "+14155550103", prompt = "x" })
  local tx = assert(env.tx:wait_call(5000))
  local rec = env:wait(id, function(r)
    return r.status == "in_progress"
  end, 10000, "the call in progress")
  local before = #events_of(env, id)
  T.gt(before, 0, "the call has events to compare with")
  local hangup = { call_control_id = tx.control_id, hangup_cause = "normal_clearing" }
  local _, other = crypto.ed25519_keypair()
  T.eq(post_webhook(env, id, 1, "call.hangup", hangup, other), 403, "signed with another key")
  T.eq(post_webhook(env, id, 1, "call.hangup", hangup, nil, os.time() - 400), 403, "stale")
  T.eq(post_webhook(env, id, 1, "call.hangup", hangup, nil, os.time() + 400), 403, "from the future")
  T.eq(post_webhook(env, id, 1, "call.hangup", hangup, nil, nil, ""), 403, "no signature")
  T.eq(post_webhook(env, id, 1, "call.hangup", hangup, nil, nil, crypto.base64_encode(string.rep("\0", 64))), 403,
    "a zero signature")
  -- A real signature over another body.
  local ts = tostring(os.time())
  local sig = fake.sign(env.tx.private_key, ts, '{"data":{"event_type":"call.initiated"}}')
  T.eq(post_webhook(env, id, 1, "call.hangup", hangup, nil, ts, sig), 403, "signature of another body")
  -- Through the generic /status route too.
  local res = assert(fetch(env.base .. "/status?callId=" .. id .. "&attempt=1", { method = "POST",
    body = json.encode({ data = { event_type = "call.hangup", payload = hangup } }),
    headers = { ["Content-Type"] = "application/json" } }))
  T.eq(res.status, 403, "/status unsigned")
  local after = env:get(id)
  T.eq(after.status, "in_progress")
  T.eq(#events_of(env, id), before, "no event recorded")
  T.eq(tx.final, nil, "the call goes on")
  -- The window is 5 minutes: a signature 200 s old is still good (and ends the call).
  T.eq(post_webhook(env, id, 1, "call.hangup", hangup, nil, os.time() - 200), 200, "within the window")
  T.eq(env:wait_final(id, 10000).status, "completed")
end, { timeout = 30000 })

-- Anyone can post forged webhooks by the thousand: their lines are
-- rate-limited (log.limited), 5 of a reason, then one line with the count.
T.test("a flood of forged webhooks logs 5 lines per reason and a count; a signed body without data is logged too", function()
  local warns = T.log_lines("warn")
  local env = start()
  local _, other = crypto.ed25519_keypair()
  for _ = 1, 30 do
    T.eq(post_webhook(env, "c_none", 1, "call.hangup", { call_control_id = "v3:forged" }, other), 403)
  end
  local body = '{"event_type":"call.hangup"}'
  for _ = 1, 8 do
    local ts = tostring(os.time())
    local res = assert(fetch(env.base .. "/telnyx/webhook?callId=c_none&attempt=1", { method = "POST", body = body,
      headers = { ["Content-Type"] = "application/json", ["telnyx-timestamp"] = ts,
        ["telnyx-signature-ed25519"] = fake.sign(env.tx.private_key, ts, body) } }))
    T.eq(res.status, 400)
  end
  env:close()
  local seen = {}
  for _, l in ipairs(warns) do
    for _, m in ipairs({ "telnyx webhook refused", "telnyx webhook not understood" }) do
      if l.msg == m then
        seen[m] = (seen[m] or 0) + 1
      elseif l.msg:sub(1, #m + 6) == m .. " (and " then
        seen[m .. " count"] = (seen[m .. " count"] or 0) + l.fields.suppressed
      end
    end
  end
  T.eq(seen, { ["telnyx webhook refused"] = 5, ["telnyx webhook refused count"] = 25,
    ["telnyx webhook not understood"] = 5, ["telnyx webhook not understood count"] = 3 })
end)

T.test("a replayed webhook (same id, valid signature) is answered and changes nothing", function()
  local env, id, tx = streaming_call("+14155550104")
  local answered = answered_body(tx)
  local streams = #env.tx.requests
  local ts = tostring(os.time())
  local res = assert(fetch(tx.body.webhook_url, { method = "POST", body = answered, headers = {
    ["Content-Type"] = "application/json", ["telnyx-timestamp"] = ts,
    ["telnyx-signature-ed25519"] = fake.sign(env.tx.private_key, ts, answered) } }))
  T.eq(res.status, 200)
  timer.sleep(300)
  local n = 0
  for i = streams + 1, #env.tx.requests do
    n = n + (env.tx.requests[i].path:find("streaming_start", 1, true) and 1 or 0)
  end
  T.eq(n, 0, "no second streaming_start")
end, { timeout = 30000 })

T.test("a call_control_id that is not Telnyx's shape never reaches a REST path", function()
  for _, bad in ipairs({ "../../v2/calls", "v3:abc/actions/hangup", "v3:a?b=c", "v3:%2e%2e", "v3:a b" }) do
    local env = start({ behaviour = { answer = "answer", control_id = bad }, config = { retry = { maxAttempts = 1 } } })
    local id = env:create({ to = "+14155550105", prompt = "x" })
    local call = env:wait_final(id, 10000)
    T.eq(call.status, "failed", bad)
    T.match(call.lastError or "", "call_control_id", bad)
    T.eq(call.attempts[1].providerCallId, nil, bad)
    -- Its webhooks (signed, for an id no attempt took) change nothing and
    -- send nothing: only the dial reached the API.
    timer.sleep(300)
    for _, r in ipairs(env.tx.requests) do
      T.eq(r.method .. " " .. r.path, "POST /v2/calls", bad)
    end
  end
  local p = dofile(require("callagent.core").root .. "/providers/telnyx.lua") -- what goes into a path
  for _, bad in ipairs({ "a/b", "a?b", "a%2fb", "..", "a.b", "", string.rep("a", 257), 42 }) do
    T.eq(p.control_id(bad), nil, tostring(bad))
  end
  T.eq(p.control_id("v3:MdI91X4lWFEs7IgbBEOT9M4AigoY08M0WWZFISt1Yw2axZ_IiE4pqg"),
    "v3:MdI91X4lWFEs7IgbBEOT9M4AigoY08M0WWZFISt1Yw2axZ_IiE4pqg")
end, { timeout = 60000 })

T.test("a dial Telnyx refuses for good (403, 422) fails at once and is not dialed again; one it answers 503 is", function()
  local retry = { maxAttempts = 3, initialDelayMs = 50, retryStatuses = { "busy", "no_answer", "failed" } }
  for _, case in ipairs({
    { "403", { behaviour = { answer = "reject-api" } }, 1, "^telnyx 10038: Feature not permitted" },
    { "422", { fake = { connection_id = "another-connection" } }, 1, "^telnyx 10010: Invalid value for connection_id" },
    { "503", { fake = { fail_dials = 3 } }, 3, "^telnyx 10011: Service unavailable" },
  }) do
    local how, opts, dials, err = case[1], case[2], case[3], case[4]
    opts.config = { retry = retry }
    local env = start(opts)
    local id = env:create({ to = "+14155550140", prompt = "x" })
    local call = env:wait_final(id, 10000)
    T.eq(call.status, "failed", how)
    T.match(call.lastError, err)
    T.eq(#call.attempts, dials, how .. ": attempts")
    timer.sleep(200)
    T.eq(env.tx.dials, dials, how .. ": dial requests")
  end
end, { timeout = 30000 })

T.test("the API key is in no log line, stored error or API answer, even when Telnyx quotes it", function()
  local env = start({ behaviour = { answer = "reject-api", reject_detail = "key " .. API_KEY .. " may not call" },
    config = { retry = { maxAttempts = 1 } } })
  T.eq(log.scrub("x " .. API_KEY .. " y"), "x [redacted] y", "registered with log.secret")
  local id = env:create({ to = "+14155550106", prompt = "x" })
  local call = env:wait_final(id, 10000)
  T.eq(call.status, "failed")
  T.match(call.lastError, "^telnyx 10038: Feature not permitted")
  T.match(call.lastError, "%[redacted%]")
  local _, one = env:api("GET", "/v1/calls/" .. id)
  local _, list = env:api("GET", "/v1/calls")
  for what, text in pairs({ one = json.encode(one), list = json.encode(list),
    store = json.encode(env.app.store:get_call(id)) }) do
    T.eq(text:find(API_KEY, 1, true), nil, what)
  end
end, { timeout = 20000 })

T.test("a Telnyx error quoting the API key where its text is cut (300 bytes) shows no part of the key", function()
  -- The key straddles the cut: cut first and scrubbed after, its first
  -- bytes were no longer the whole key the scrub looks for.
  local detail = string.rep("x", 300 - #"Feature not permitted - " - 12) .. API_KEY .. " may not call"
  local env = start({ behaviour = { answer = "reject-api", reject_detail = detail },
    config = { retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550108", prompt = "x" })
  local call = env:wait_final(id, 10000)
  T.eq(call.status, "failed")
  T.match(call.lastError, "^telnyx 10038: Feature not permitted %- x+%[redacted%]")
  T.eq(call.lastError:find(API_KEY:sub(1, 8), 1, true), nil, "a part of the key in lastError")
  T.eq(json.encode(env.app.store:get_call(id)):find(API_KEY:sub(1, 8), 1, true), nil, "a part of the key in the store")
end, { timeout = 20000 })

T.test("a real callagent process: its log never shows the API key, through a refused and a whole call", function()
  local n = 0
  local tx = assert(fake.start({ api_key = API_KEY, connection_id = CONNECTION, behaviour = function()
    n = n + 1
    if n == 1 then
      return { answer = "reject-api", reject_detail = "key " .. API_KEY .. " may not call" }
    end
    return "answer"
  end }))
  T.defer(function()
    tx:close()
  end)
  local rt = assert(require("fakes.realtime").start({ api_key = kit.API_KEY, script = happy_script }))
  T.defer(function()
    rt:close()
  end)
  local p, api = kit.app_process({ url = "http://127.0.0.1:9" }, rt, { config = {
    telephony = { provider = "telnyx" },
    telnyx = { apiKey = API_KEY, connectionId = CONNECTION, fromNumber = FROM, publicKey = tx.public_key,
      apiBaseUrl = tx.url },
    retry = { maxAttempts = 1 },
  } })
  local refused = api:create({ to = "+14155550110", prompt = "x" })
  T.eq(api:wait_final(refused, 10000).status, "failed")
  local id = api:create({ to = "+14155550111", prompt = "Book a check-up." })
  T.eq(api:wait_final(id, 30000).status, "completed")
  p:kill("SIGTERM")
  T.eq(p:wait(10000), 0, "exit status")
  -- Read once it has exited: every line of its output has come through the pipes.
  local text = p.errtext() .. "\n" .. p.text()
  T.match(text, "key %[redacted%] may not call", "the refusal is logged, redacted")
  T.eq(text:find(API_KEY, 1, true), nil, "the key in the process's output")
  for _, r in ipairs(tx.requests) do
    T.eq(r.auth, "Bearer " .. API_KEY, "the key went where it belongs")
  end
end, { timeout = 60000 })

T.test("a wrong API key: Telnyx's 401 ends the attempt failed with its error, not retried forever", function()
  local env = start({ fake = { api_key = "another-key-entirely" }, config = { retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550107", prompt = "x" })
  local call = env:wait_final(id, 10000)
  T.eq(call.status, "failed")
  T.eq(call.lastError, "telnyx 10009: Authentication failed - The API key is not valid. (HTTP 401)")
end, { timeout = 20000 })

T.test("config: a missing or bad telnyx key stops the start with a message naming it", function()
  local callagent = require "callagent"
  local base = {
    telephony = { provider = "telnyx" },
    server = { host = "127.0.0.1", port = 0, publicBaseUrl = "https://example.com" },
    openai = { apiKey = "sk-test-xxxxxxxx", realtimeUrl = "ws://127.0.0.1:9/v1/realtime" },
    store = { backend = "memory" },
    tunnel = { provider = "none" },
  }
  local function try(section)
    local cfg = {}
    for k, v in pairs(base) do
      cfg[k] = v
    end
    cfg.telnyx = section
    local app, err = callagent.app(cfg, { no_shutdown_hook = true })
    if not app then
      return err
    end
    local ok, serr = app:start()
    if ok then
      app:stop()
      return "started"
    end
    return serr
  end
  local pk = crypto.base64_encode(string.rep("k", 32))
  T.eq(try({ connectionId = "c", fromNumber = FROM }), "telnyx.apiKey: required by the telnyx provider")
  T.match(try({ apiKey = API_KEY, connectionId = "c", fromNumber = FROM }), "telnyx%.publicKey: required while")
  T.match(try({ apiKey = API_KEY, connectionId = "c", fromNumber = FROM, publicKey = "abc" }),
    "telnyx%.publicKey: expected the account's Ed25519 public key")
  T.match(try({ apiKey = API_KEY, connectionId = "c", fromNumber = "555", publicKey = pk }),
    "telnyx%.fromNumber: expected an E%.164 number")
  T.match(try({ apiKey = "short", connectionId = "c", fromNumber = FROM, publicKey = pk }),
    "telnyx%.apiKey: expected a secret .* got %[redacted%]")
  local pasted = try({ apiKey = "KEY0123456789\u{a0}", connectionId = "c", fromNumber = FROM, publicKey = pk })
  T.match(pasted, "telnyx%.apiKey: expected a secret of printable ASCII %(byte 14 is not%), got %[redacted%]$",
    "a no-break space pasted with the key")
  T.match(try({ apiKey = API_KEY, connectionId = string.rep("c", 129), fromNumber = FROM, publicKey = pk }),
    "telnyx%.connectionId: expected the Call Control connection's id %(1 to 128 characters, no spaces%)")
  T.match(try({ apiKey = API_KEY, connectionId = "c", fromNumber = FROM, publicKey = pk, apiBaseUrl = "ftp://x" }),
    "telnyx%.apiBaseUrl")
  T.match(try({ apiKey = API_KEY, connectionId = "c", fromNumber = FROM, publicKey = pk, requestTimeoutSec = "9" }),
    "telnyx%.requestTimeoutSec")
  T.eq(try({ apiKey = API_KEY, connectionId = "c", fromNumber = FROM, validateSignature = false }), "started")
  T.eq(try({ apiKey = API_KEY, connectionId = "c", fromNumber = FROM, publicKey = pk }), "started")
end)


T.test("config: a telnyx key the provider does not know (a typo) is warned about, as config.lua's own are", function()
  local _, _, p = T.run_app(nil, nil, { source = [[
local callagent = require "callagent"
local task = require "callagent.task"
local app = assert(callagent.app({ telephony = { provider = "telnyx" }, store = { backend = "memory" },
  server = { port = 0, publicBaseUrl = "https://example.com" }, tunnel = { provider = "none" },
  openai = { apiKey = "sk-test-xxxxxxxx", realtimeUrl = "ws://127.0.0.1:9/v1/realtime" },
  telnyx = { apiKey = "KEY0123456789", connectionId = "c", fromNumber = "+15550001111",
    validateSignature = false, validatesignature = true, timeoutSec = 5 } }, { no_shutdown_hook = true }))
task.spawn(function()
  assert(app:start())
  app:stop()
end)
]] })
  local err = p.errtext()
  T.match(err, "WARN config: telnyx%.timeoutSec: unknown key, ignored\n.*WARN config: telnyx%.validatesignature: "
    .. "unknown key, ignored", "one line each, by name")
  T.no_match(err, "telnyx%.[a-zA-Z]+: unknown key, ignored.*telnyx%.[a-zA-Z]+: unknown key, ignored.*"
    .. "telnyx%.[a-zA-Z]+: unknown key", "the known keys are not")
end)

T.test("ring time: timeout_secs stays in Telnyx's 5-120 s, whatever call.ringTimeoutSec says", function()
  for _, c in ipairs({ { 180, 120 }, { 2, 5 } }) do
    local env = start({ script = function()
      timer.sleep(15000)
    end, config = { call = { ringTimeoutSec = c[1] }, retry = { maxAttempts = 1 } } })
    local id = env:create({ to = "+14155550113", prompt = "x" })
    local rec = env:wait(id, function(r)
      return r.status == "in_progress" or r.status == "failed"
    end, 10000, "answered or failed")
    T.eq(rec.status, "in_progress", "ringTimeoutSec " .. c[1] .. ": " .. tostring(rec.lastError))
    T.eq(env.tx.calls[1].body.timeout_secs, c[2], "ringTimeoutSec " .. c[1])
    T.eq(env:api("POST", "/v1/calls/" .. id .. "/hangup"), 202)
    T.eq(env:wait_final(id, 10000).status, "completed")
  end
end, { timeout = 40000 })

T.test("call.answered twice (a second delivery with its own id): one streaming_start, the call goes on", function()
  local env, id, tx = streaming_call("+14155550114")
  T.eq(post_webhook(env, id, 1, "call.answered", { call_control_id = tx.control_id }), 200)
  timer.sleep(300)
  local n = 0
  for _, r in ipairs(env.tx.requests) do
    n = n + (r.path:find("streaming_start", 1, true) and 1 or 0)
  end
  T.eq(n, 1, "streaming_start requests")
  T.eq(tx.hangup_requested_at, nil, "not hung up")
  T.eq(env:get(id).status, "in_progress")
end, { timeout = 30000 })


T.test("a provider's streamStart that raises, yields or returns junk: the stream is refused (1008) at once", function()
  local ws = require "callagent.ws"
  local dir = T.tmpdir()
  local f = assert(io.open(dir .. "/telnyx.lua", "w"))
  f:write([[
-- Telnyx, with a streamStart that misbehaves as the start's stream_id says.
local timer = require "callagent.timer"
local P = {}
for k, v in pairs(dofile(require("callagent.core").root .. "/providers/telnyx.lua")) do
  P[k] = v
end
P.junk = true
function P:streamStart(ev)
  local m = ev.stream_id
  if m == "raise" then
    error({ "not a string" })
  elseif m == "number" then
    return 42
  elseif m == "string" then
    return "x"
  elseif m == "nilerr" then
    return nil, { why = "a table" }
  elseif m == "sleep" then
    timer.sleep(10)
  elseif m == "badparams" then
    return { streamSid = "s1", parameters = 7 }
  end
  return true
end
return P
]])
  f:close()
  local tx = assert(fake.start({ api_key = API_KEY, connection_id = CONNECTION }))
  T.defer(function()
    tx:close()
  end)
  local env = kit.start({ realtime = { script = happy_script }, provider_dirs = { dir }, config = {
    telephony = { provider = "telnyx" },
    telnyx = { apiKey = API_KEY, connectionId = CONNECTION, fromNumber = FROM, publicKey = tx.public_key,
      apiBaseUrl = tx.url },
  } })
  T.eq(env.app.provider.junk, true, "the provider of the test's folder")
  local errs = T.log_lines("error")
  -- Anyone may open streams: a start the provider fails on, sent again and
  -- again, is logged 5 times a window.
  local modes = { "raise", "number", "string", "nilerr", "sleep", "badparams", "true" }
  for _ = 1, 7 do
    modes[#modes + 1] = "raise"
  end
  for _, mode in ipairs(modes) do
    local closed
    local conn = assert(ws.connect(env.base:gsub("^http", "ws") .. "/voice/stream", {
      on_close = function(_, code)
        closed = code
      end,
    }))
    conn:send('{"event":"connected","version":"1.0.0"}')
    conn:send(json.encode({ event = "start", sequence_number = "1", stream_id = mode,
      start = { custom_parameters = { callId = "c_x", token = "t" } } }))
    T.wait_for(function()
      return closed
    end, 2000, "the stream closed: " .. mode)
    T.eq(closed, 1008, mode)
  end
  local failed = 0
  for _, l in ipairs(errs) do
    failed = failed + (l.msg == "the provider's streamStart failed" and 1 or 0)
  end
  T.eq(failed, 5, "9 failed starts (8 raise, one yields), 5 lines")
  -- The server goes on.
  T.eq((env:api("GET", "/v1/calls")), 200)
end, { timeout = 30000 })


-- A fake Telnyx (behaviour) and model (script, may be nil), closed after
-- the test, and the config of a callagent process on them (one attempt):
-- tx, rt, config, for kit.app_process.
local function process_world(behaviour, script)
  local tx = assert(fake.start({ api_key = API_KEY, connection_id = CONNECTION, behaviour = behaviour }))
  T.defer(function()
    tx:close()
  end)
  local rt = assert(require("fakes.realtime").start({ api_key = kit.API_KEY, script = script }))
  T.defer(function()
    rt:close()
  end)
  return tx, rt, {
    telephony = { provider = "telnyx" },
    telnyx = { apiKey = API_KEY, connectionId = CONNECTION, fromNumber = FROM, publicKey = tx.public_key,
      apiBaseUrl = tx.url },
    retry = { maxAttempts = 1 },
  }
end

T.test("a replayed webhook is dropped before its URL is looked at: posted to another call's URL, no warning", function()
  local tx, rt, config = process_world("answer", happy_script)
  local p, api = kit.app_process({ url = "http://127.0.0.1:9" }, rt, { config = config })
  local id = api:create({ to = "+14155550104", prompt = "Book a check-up." })
  T.eq(api:wait_final(id, 30000).status, "completed")
  local call = tx.calls[1]
  local answered = answered_body(call)
  local elsewhere = call.body.webhook_url:gsub("callId=[^&]+", "callId=c_another")
  T.ok(elsewhere ~= call.body.webhook_url, "another call's URL")
  local function post(body)
    local ts = tostring(os.time())
    return assert(fetch(elsewhere, { method = "POST", body = body, headers = {
      ["Content-Type"] = "application/json", ["telnyx-timestamp"] = ts,
      ["telnyx-signature-ed25519"] = fake.sign(tx.private_key, ts, body) } })).status
  end
  T.eq(post(answered), 200, "the replay")
  -- The same webhook under a new id is no replay: its URL and client_state disagree (one warning).
  local fresh = json.decode(answered)
  fresh.data.id = crypto.uuid4()
  T.eq(post(json.encode(fresh)), 200, "a new id")
  p:kill("SIGTERM")
  T.eq(p:wait(10000), 0, "exit status")
  local _, warnings = (p.errtext() .. "\n" .. p.text()):gsub("telnyx webhook ignored", "")
  T.eq(warnings, 1, "warned of the new id only")
  T.eq(#tx.calls, 1, "nothing dialed")
end, { timeout = 60000 })

T.test("kill -9 with a Telnyx call talking and one ringing: after restart both are hung up at Telnyx, not dialed again", function()
  local n = 0
  local tx, rt, config = process_world(function()
    n = n + 1
    return n == 1 and "answer" or { ring_ms = 60000 }
  end, function(session)
    assert(session:wait_event("response.create", 5000))
    session:speak({ ms = 20000, text = "A very long monologue." })
  end)
  local p, api = kit.app_process({ url = "http://127.0.0.1:9" }, rt, { config = config })
  local talking = api:create({ to = "+14155550115", prompt = "Talk." })
  api:wait(talking, function(r)
    return r.status == "in_progress"
  end, 10000, "in progress")
  local ringing = api:create({ to = "+14155550116", prompt = "Talk." })
  local rang = api:wait(ringing, function(r)
    return r.attempts[1] and r.attempts[1].providerCallId
  end, 10000, "the second call ringing")
  T.eq(rang.status, "dialing")
  timer.sleep(300)
  p:kill("SIGKILL")
  p:wait(5000)
  T.eq(tx.calls[1].final, nil, "the talking call is up at Telnyx")
  T.eq(tx.calls[2].final, nil, "the ringing call rings on")
  local _, api2 = kit.app_process({ url = "http://127.0.0.1:9" }, rt, { config = config, port = api.port, db = api.db })
  for i, id in ipairs({ talking, ringing }) do
    local rec = api2:wait_final(id, 15000)
    T.eq(rec.status, "failed", id)
    T.eq(rec.endReason, "interrupted by restart (the call was still up: hung up)", id)
    T.eq(#rec.attempts, 1, "not dialed again")
    local c = tx.calls[i]
    c:wait(function()
      return c.final
    end, 5000)
    T.ok(c.hangup_requested_at, "hung up through Telnyx's API")
    T.eq(c.final, i == 1 and "normal_clearing" or "originator_cancel")
  end
  T.eq(#tx.calls, 2)
end, { timeout = 60000 })


-- What the store at path holds of its calls: their rows, attempts, events,
-- retries and notifications (which, not how their delivery goes).
local function stored(path)
  local db = assert(require("callagent.sqlite").open(path, { readonly = true }))
  local out = {}
  for _, sql in ipairs({ "SELECT id, status, doc FROM calls ORDER BY seq", "SELECT * FROM attempts ORDER BY call_id, n",
    "SELECT * FROM events ORDER BY id", "SELECT * FROM retries ORDER BY call_id",
    "SELECT key, call_id FROM notifications ORDER BY key" }) do
    out[#out + 1] = assert(db:rows(sql))
  end
  db:close()
  return out
end

-- A webhook the fake sent (rec: one of call.events), posted again as it was
-- sent: its body, telnyx-timestamp and signature. -> HTTP status.
local function replay(call, rec)
  local res = assert(fetch(call.body.webhook_url, { method = "POST", body = rec.body, headers = {
    ["Content-Type"] = "application/json", ["telnyx-timestamp"] = rec.ts, ["telnyx-signature-ed25519"] = rec.sig } }))
  return res.status
end

T.test("after a restart, the last run's signed webhooks replayed in their window change no call: over, queued or interrupted",
  function()
    -- The ids seen against replays are in the process only. What a replay
    -- can still do after a restart: every attempt of the last run is over
    -- (or being resolved: recover), and its effects are in the store.
    local behaviours = { { answer = "answer", hangup_after_ms = 300 }, "busy", "answer" }
    local tx, rt, config = process_world(function()
      return table.remove(behaviours, 1)
    end, function(session)
      if session:wait_event("response.create", 5000) then -- the first callee hangs up at once
        session:speak({ ms = 20000, text = "A very long monologue." })
      end
    end)
    config.retry = { maxAttempts = 2, initialDelayMs = 60000, backoffFactor = 1 }
    local p, api = kit.app_process({ url = "http://127.0.0.1:9" }, rt, { config = config })
    local done = api:create({ to = "+14155550117", prompt = "Talk." })
    T.eq(api:wait_final(done, 10000).status, "completed", "the callee hung up")
    local queued = api:create({ to = "+14155550118", prompt = "Talk." })
    api:wait(queued, function(r)
      return r.status == "queued" and r.attempts[1] and r.attempts[1].status == "busy"
    end, 10000, "busy, its retry a minute away")
    local talking = api:create({ to = "+14155550119", prompt = "Talk." })
    api:wait(talking, function(r)
      return r.status == "in_progress"
    end, 10000, "in progress")
    p:kill("SIGKILL")
    p:wait(5000)
    local sent = {}
    for i, c in ipairs(tx.calls) do
      sent[i] = { table.unpack(c.events) }
    end
    T.ok(#sent[1] >= 3 and #sent[2] >= 2 and #sent[3] >= 2, "each call's webhooks")
    local _, api2 = kit.app_process({ url = "http://127.0.0.1:9" }, rt, { config = config, port = api.port, db = api.db })
    T.eq(api2:wait_final(talking, 15000).endReason, "interrupted by restart (the call was still up: hung up)")
    local before = {}
    for _, id in ipairs({ done, queued, talking }) do
      before[id] = api2:get(id)
    end
    T.eq(before[queued].status, "queued")
    local rows = stored(api.db)
    local requests = #tx.requests
    for i, c in ipairs(tx.calls) do
      for _, rec in ipairs(sent[i]) do
        T.eq(replay(c, rec), 200, rec.event .. " of call " .. i)
      end
    end
    -- A call.answered of a call that is over asks Telnyx to hang that call
    -- up (as a late one does): it is over there too, and Telnyx says so.
    T.wait_for(function()
      return #tx.requests >= requests + 2
    end, 5000, "the answered calls' hang-ups")
    timer.sleep(200) -- anything else they would set off
    local asked = {}
    for i = requests + 1, #tx.requests do
      asked[#asked + 1] = tx.requests[i].method .. " " .. tx.requests[i].path
    end
    T.eq(asked, { "POST /v2/calls/" .. tx.calls[1].control_id .. "/actions/hangup",
      "POST /v2/calls/" .. tx.calls[3].control_id .. "/actions/hangup" }, "nothing dialed, streamed or asked but those")
    for _, id in ipairs({ done, queued, talking }) do
      T.eq(api2:get(id), before[id], "the record of " .. id .. " is unchanged")
    end
    T.eq(stored(api.db), rows, "the store's rows are unchanged: no event, attempt, retry or notification")
    T.eq(#tx.calls, 3)
  end, { timeout = 60000 })

T.test("a stop's cancel Telnyx answers 'already ended' (the decline's webhook lost): the retry policy decides, no dial past it", function()
  local tx, rt, config = process_world({ ring_ms = 60000, lost_hangup_webhook = true })
  local p, api = kit.app_process({ url = "http://127.0.0.1:9" }, rt, { config = config })
  local id = api:create({ to = "+14155550119", prompt = "Talk." })
  api:wait(id, function(r)
    return r.attempts[1] and r.attempts[1].providerCallId
  end, 10000, "ringing")
  local c = tx.calls[1]
  c:hangup() -- declined; Telnyx's call.hangup never comes
  c:wait(function()
    return c.done
  end, 5000)
  T.ok(p:kill("SIGTERM"))
  T.eq(p:wait(15000), 0)
  T.eq(#(c.hangup_command_ids or {}), 1, "the stop asked Telnyx to hang up, which said it had ended")
  local _, api2 = kit.app_process({ url = "http://127.0.0.1:9" }, rt, { config = config, port = api.port, db = api.db })
  local rec = api2:wait_final(id, 10000)
  T.eq({ rec.status, #rec.attempts }, { "failed", 1 })
  T.eq(rec.attempts[1].reason, "it ended before the stop's cancel; the provider did not say how")
  timer.sleep(300)
  T.eq(#tx.calls, 1, "not dialed again: maxAttempts is 1")
end, { timeout = 60000 })

T.test("the tunnel's cancel Telnyx answers 'already ended' (the decline's webhook lost): the attempt fails at once, the retry policy decides", function()
  local env = start({ behaviour = { ring_ms = 60000, lost_hangup_webhook = true },
    config = { retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550120", prompt = "Talk." })
  local c = assert(env.tx:wait_call(5000))
  env:wait(id, function(r)
    return r.attempts[1] and r.attempts[1].providerCallId == c.control_id
  end, 5000, "ringing")
  c:hangup() -- declined; Telnyx's call.hangup never comes
  c:wait(function()
    return c.done
  end, 5000)
  env.app.engine:pause("the public tunnel is down (a test)") -- what the app does when its tunnel dies
  -- Not left to the ring timeout (30 s), which would end it no_answer.
  local rec = env:wait_final(id, 3000)
  T.eq({ rec.status, #rec.attempts, rec.attempts[1].status, rec.attempts[1].reason },
    { "failed", 1, "failed", "it ended before the tunnel's cancel; the provider did not say how" })
  T.eq(#(c.hangup_command_ids or {}), 1, "one cancel, which Telnyx said came after the end")
  env.app.engine:resume()
  timer.sleep(300)
  T.eq(#env.tx.calls, 1, "not dialed again: maxAttempts is 1")
end, { timeout = 20000 })

-- A call created on env, ringing at Telnyx: its id and the fake's call.
local function ringing_call(env, to)
  local id = env:create({ to = to, prompt = "x" })
  local tx = assert(env.tx:wait_call(5000))
  env:wait(id, function(r)
    return r.attempts[1] and r.attempts[1].providerCallId == tx.control_id
  end, 5000, "ringing")
  return id, tx
end

T.test("hung up through the API while ringing: Telnyx's hangup cancels it; an answer racing it is hung up, never streamed", function()
  local env = start({ behaviour = { ring_ms = 60000 }, config = { retry = { maxAttempts = 1 } } })
  local id, tx = ringing_call(env, "+14155550117")
  T.eq(env:api("POST", "/v1/calls/" .. id .. "/hangup"), 202)
  local rec = env:wait_final(id, 5000)
  T.eq(rec.status, "canceled")
  T.ok(tx.hangup_requested_at, "Telnyx was asked to hang up")
  tx:wait(function()
    return tx.done
  end, 5000)
  T.eq(tx.final, "originator_cancel")
  -- The callee's answer crossed the hang-up: it is hung up again, no stream.
  local before = #env.tx.requests
  T.eq(post_webhook(env, id, 1, "call.answered", { call_control_id = tx.control_id }), 200)
  T.wait_for(function()
    return #env.tx.requests > before
  end, 3000, "a request to Telnyx")
  timer.sleep(200)
  local paths = {}
  for i = before + 1, #env.tx.requests do
    paths[#paths + 1] = env.tx.requests[i].path
  end
  T.eq(paths, { "/v2/calls/" .. tx.control_id .. "/actions/hangup" })
  T.eq(tx.stream, nil, "no streaming_start")
  T.eq(env:get(id).status, "canceled")
end, { timeout = 30000 })


T.test("a signed call.answered without client_state for a call already over (canceled while ringing) is hung up as one with it is", function()
  -- The call's record is final (no longer live): its call_control_id is
  -- read from the store. Before, the answer was ignored, and a callee who
  -- picked up heard silence until time_limit_secs.
  local env = start({ behaviour = { ring_ms = 60000 }, config = { retry = { maxAttempts = 1 } } })
  local id, tx = ringing_call(env, "+14155550140")
  T.eq(env:api("POST", "/v1/calls/" .. id .. "/hangup"), 202)
  T.eq(env:wait_final(id, 5000).status, "canceled")
  local before = #env.tx.requests
  T.eq(post_webhook(env, id, 1, "call.answered", { call_control_id = tx.control_id, client_state = false }), 200)
  T.wait_for(function()
    return #env.tx.requests > before
  end, 3000, "a request to Telnyx")
  T.eq(env.tx.requests[before + 1].path, "/v2/calls/" .. tx.control_id .. "/actions/hangup")
  T.eq(tx.stream, nil, "no streaming_start")
  T.eq(env:get(id).status, "canceled")
end, { timeout = 30000 })

T.test("a signed webhook of another call (its call_control_id) posted to this call's URL changes nothing", function()
  local env, id, tx = streaming_call("+14155550118")
  -- The URL's query is not signed, only the body: Telnyx's own webhook of
  -- another call, sent (or replayed) here, must not end this one.
  T.eq(post_webhook(env, id, 1, "call.hangup", { call_control_id = "v3:another-call", hangup_cause = "user_busy" }),
    200)
  timer.sleep(300)
  local rec = env:get(id)
  T.eq(rec.status, "in_progress")
  T.eq(rec.attempts[1].providerCallId, tx.control_id)
  T.eq(tx.final, nil, "the call goes on at Telnyx")
  -- Its own hang-up still ends it.
  T.eq(post_webhook(env, id, 1, "call.hangup", { call_control_id = tx.control_id, hangup_cause = "normal_clearing" }),
    200)
  T.eq(env:wait_final(id, 10000).status, "completed")
end, { timeout = 30000 })


T.test("a flood of signed webhooks of other calls is logged 5 lines a kind, then one count", function()
  local warns = T.log_lines("warn")
  local env, id = streaming_call("+14155550119")
  for i = 1, 12 do
    -- Another call's, posted to this call's URL; and one of a call this
    -- callagent never had (another callagent's on the account).
    T.eq(post_webhook(env, id, 1, "call.hangup", { call_control_id = "v3:another-call-" .. i,
      hangup_cause = "user_busy" }), 200)
    T.eq(post_webhook(env, "c_never" .. i, 1, "call.hangup", { call_control_id = "v3:never-" .. i,
      hangup_cause = "user_busy" }), 200)
  end
  T.eq(env:get(id).status, "in_progress", "nothing changed")
  env:close() -- writes the counts
  for _, msg in ipairs({ "a status for another provider call than the attempt's: ignored",
    "telnyx webhook for a call callagent has no record of: ignored (another callagent's?)" }) do
    local full, counts = {}, {}
    for _, l in ipairs(warns) do
      if l.msg == msg then
        full[#full + 1] = l.fields
      elseif l.msg:sub(1, #msg + 6) == msg .. " (and " then
        counts[#counts + 1] = l.fields.suppressed
      end
    end
    T.eq({ #full, counts }, { 5, { 7 } }, msg)
    T.ok(full[1].call, "names the call")
  end
end, { timeout = 30000 })

T.test("a Telnyx-signed body posted to /voice or /status (whose query is not signed) is refused (403)", function()
  -- No session opened while it rings (openai.connectWhileRinging): a webhook's would be counted.
  local env = start({ behaviour = { ring_ms = 60000 }, config = { retry = { maxAttempts = 1 },
    openai = { connectWhileRinging = false } } })
  local id, tx = ringing_call(env, "+14155550126")
  -- A body Telnyx signed (another call's, say): only the body is signed.
  local body = json.encode({ data = { event_type = "call.hangup", id = crypto.uuid4(), payload = {
    call_control_id = tx.control_id, client_state = crypto.base64_encode("c_other 1"), hangup_cause = "user_busy" } } })
  for _, path in ipairs({ "/voice", "/status" }) do
    local ts = tostring(os.time())
    local res = assert(fetch(env.base .. path .. "?callId=" .. id .. "&attempt=1", { method = "POST", body = body,
      headers = { ["Content-Type"] = "application/json", ["telnyx-timestamp"] = ts,
        ["telnyx-signature-ed25519"] = fake.sign(env.tx.private_key, ts, body) } }))
    T.eq(res.status, 403, path)
  end
  timer.sleep(200)
  T.eq(env:get(id).status, "dialing", "still ringing")
  T.eq(#env.rt.sessions, 0, "no model session")
end, { timeout = 20000 })

T.test("replays: past SEEN_MAX webhook ids in the window, a new id is still remembered, and old ones rotate out", function()
  local env = start({ script = function() end })
  local p = env.app.provider
  local max = p.SEEN_MAX
  local t0 = timer.now()
  for i = 1, max do
    T.eq(p:_replayed("id-" .. i), false)
  end
  -- The table is full of ids still in the window: the next one is new, and
  -- its replay is caught.
  T.eq(p:_replayed("one-more"), false, "first delivery")
  T.eq(p:_replayed("one-more"), true, "its replay")
  T.eq(p:_replayed("id-" .. max), true, "an id of the full table")
  -- Memory stays bounded: SEEN_MAX ids later, the first ones are forgotten.
  for i = 1, max do
    p:_replayed("more-" .. i)
  end
  T.eq(p:_replayed("id-1"), false, "forgotten")
  T.eq(p:_replayed("more-" .. max), true, "a recent one")
  T.ok(timer.now() - t0 < 3000, "cheap per webhook")
end)


T.test("a hang-up Telnyx answers 503 once is sent again (same command_id): the callee is not left on a silent line", function()
  local env = start({ fake = { fail_hangups = 1 } })
  local id = env:create({ to = "+14155550119", prompt = "Book a check-up." })
  T.eq(env:wait_final(id, 20000).status, "completed")
  local tx = env.tx.calls[1]
  tx:wait(function()
    return tx.final
  end, 5000)
  T.eq(tx.final, "normal_clearing", "the call ended at Telnyx")
  T.eq(env.tx.hangups, 2, "hang-up requests")
  local cid = tx.hangup_command_ids[1]
  T.ok(type(cid) == "string" and #cid >= 16, "a command_id")
  T.eq(tx.hangup_command_ids, { cid, cid }, "the same command_id both times")
end, { timeout = 30000 })


T.test("a streaming_start Telnyx answers 503 once is sent again (same command_id): the call talks", function()
  local env = start({ fake = { fail_streaming_starts = 1 } })
  local id = env:create({ to = "+14155550120", prompt = "Book a check-up." })
  local tx = assert(env.tx:wait_call(5000))
  tx:wait(function()
    return tx.stream_started_at
  end, 5000)
  T.ok(tx.stream_started_at, "the stream came within 5 s of the answer")
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "completed")
  T.eq(call.report and call.report.outcome, "success")
  T.eq(env.tx.stream_starts, 2, "streaming_start requests")
  local cid = tx.stream_command_ids[1]
  T.ok(type(cid) == "string" and #cid >= 16, "a command_id")
  T.eq(tx.stream_command_ids, { cid, cid }, "the same command_id both times")
end, { timeout = 30000 })


T.test("call.hangup delivered before call.answered: the attempt ends once, the late answer starts no stream", function()
  local env = start({ behaviour = { ring_ms = 60000 }, config = { retry = { maxAttempts = 1 },
    openai = { connectWhileRinging = false } } })
  local id, tx = ringing_call(env, "+14155550121")
  -- Answered and hung up at once by the callee; Telnyx delivers the two out of order.
  T.eq(post_webhook(env, id, 1, "call.hangup", { call_control_id = tx.control_id, hangup_cause = "normal_clearing",
    sip_hangup_cause = "200" }), 200)
  -- As any answered call whose stream never came: failed, and not dialed again.
  local rec = env:wait_final(id, 5000)
  T.eq(rec.status, "failed")
  T.ok(rec.attempts[1].answeredAt, "answered (the hang-up says so)")
  T.eq(post_webhook(env, id, 1, "call.answered", { call_control_id = tx.control_id }), 200)
  timer.sleep(300)
  T.eq(tx.stream, nil, "no streaming_start")
  T.eq(#env.rt.sessions, 0, "no model session")
  local after = env:get(id)
  T.eq({ after.status, #after.attempts }, { "failed", 1 })
end, { timeout = 30000 })


T.test("client_state (signed) names the call and attempt: a webhook without the URL's query still counts", function()
  local env, id, tx = streaming_call("+14155550122")
  local cs = tx.body.client_state
  T.eq(crypto.base64_decode(cs), id .. " 1", "the dial's client_state")
  -- Telnyx echoes client_state in every webhook of the call.
  for _, e in ipairs(tx.events) do
    T.eq(json.decode(e.body).data.payload.client_state, cs, e.event)
  end
  -- A webhook whose URL lost its query: client_state says whose it is.
  local body = json.encode({ data = { event_type = "call.hangup", id = crypto.uuid4(), record_type = "event",
    payload = { call_control_id = tx.control_id, client_state = cs, hangup_cause = "normal_clearing" } } })
  local ts = tostring(os.time())
  local res = assert(fetch(env.base .. "/telnyx/webhook", { method = "POST", body = body, headers = {
    ["Content-Type"] = "application/json", ["telnyx-timestamp"] = ts,
    ["telnyx-signature-ed25519"] = fake.sign(env.tx.private_key, ts, body) } }))
  T.eq(res.status, 200)
  T.eq(env:wait_final(id, 10000).status, "completed")
end, { timeout = 30000 })

-- An inbound call's webhook (a signed call.answered of another call of the
-- account: no client_state, another call_control_id), posted to attempt
-- 1's URL of call id - only the body is signed, the query is anyone's:
-- answered 200, and no request to Telnyx follows (no hang-up of that call).
local function another_calls_answer_hangs_up_nothing(env, id)
  local before = #env.tx.requests
  T.eq(post_webhook(env, id, 1, "call.answered", { call_control_id = "v3:someone-elses-call", client_state = false }),
    200)
  timer.sleep(300)
  T.eq(#env.tx.requests, before, "no request to Telnyx (no hang-up of that call)")
end

T.test("a signed webhook without client_state counts for its URL's attempt only when its call_control_id is that attempt's", function()
  -- Were Telnyx to leave client_state out of one event (its docs show it
  -- in each we use, but do not promise it), that event was dropped with a
  -- WARN: a call.hangup so lost left the record in_progress until the
  -- engine's own timers.
  local env, id, tx = streaming_call("+14155550138")
  T.eq(post_webhook(env, id, 1, "call.hangup", { call_control_id = "v3:someone-elses-call", client_state = false,
    hangup_cause = "normal_clearing" }), 200)
  timer.sleep(200)
  T.eq(env:get(id).status, "in_progress", "another call's webhook changes nothing")
  T.eq(post_webhook(env, id, 1, "call.hangup", { call_control_id = tx.control_id, client_state = false,
    hangup_cause = "normal_clearing" }), 200)
  T.eq(env:wait_final(id, 3000).status, "completed")
end, { timeout = 30000 })

T.test("a signed webhook whose client_state is empty counts as one without: for its URL's attempt only when its call_control_id is that attempt's", function()
  -- Empty is no client_state: before, it was taken for another app's and
  -- the call's own call.hangup was dropped.
  local env, id, tx = streaming_call("+14155550139")
  T.eq(post_webhook(env, id, 1, "call.hangup", { call_control_id = "v3:someone-elses-call", client_state = "",
    hangup_cause = "normal_clearing" }), 200)
  timer.sleep(200)
  T.eq(env:get(id).status, "in_progress", "another call's webhook changes nothing")
  T.eq(post_webhook(env, id, 1, "call.hangup", { call_control_id = tx.control_id, client_state = "",
    hangup_cause = "normal_clearing" }), 200)
  T.eq(env:wait_final(id, 3000).status, "completed")
end, { timeout = 30000 })

T.test("a signed call.answered without client_state, to the URL of a call's ended attempt, hangs up no other call", function()
  -- The call lives on (its retry waits): the engine takes a call that is
  -- up for an attempt that is over as one to hang up, so only the route's
  -- call_control_id check keeps another call of the account from it.
  local env = start({ behaviour = "busy", config = { retry = { maxAttempts = 2, initialDelayMs = 60000 } } })
  local id = env:create({ to = "+14155550137", prompt = "x" })
  env:wait(id, function(r)
    return r.attempts[1] and r.attempts[1].status == "busy"
  end, 10000, "the first attempt busy")
  another_calls_answer_hangs_up_nothing(env, id)
end, { timeout = 20000 })

T.test("a webhook whose signed client_state names another call than its URL is not applied to either", function()
  local env = start({ script = function()
    timer.sleep(15000)
  end })
  local a = env:create({ to = "+14155550123", prompt = "x" })
  local ta = assert(env.tx:wait_call(5000))
  local b = env:create({ to = "+14155550124", prompt = "x" })
  local tb = assert(env.tx:wait_call(5000))
  for _, t in ipairs({ ta, tb }) do
    t:wait(function()
      return t.stream_started_at
    end, 10000)
  end
  -- Call a's own hang-up webhook, sent to call b's URL.
  T.eq(post_webhook(env, b, 1, "call.hangup", { call_control_id = ta.control_id, client_state = ta.body.client_state,
    hangup_cause = "normal_clearing" }), 200)
  timer.sleep(300)
  T.eq(env:get(a).status, "in_progress")
  T.eq(env:get(b).status, "in_progress")
end, { timeout = 30000 })


-- The model greets, then says nothing more (for 15 s).
local function greet_script(session)
  assert(session:wait_event("response.create", 5000))
  session:speak({ ms = 300, text = "Hello, this is the assistant." })
  timer.sleep(15000)
end

local function quiet_script()
  timer.sleep(15000)
end

-- A call to `to` on env (whose model greets) answered, streaming, and its
-- greeting in the transcript: its id and the fake's call.
local function greeted_call(env, to)
  local id = env:create({ to = to, prompt = "x" })
  local tx = assert(env.tx:wait_call(5000))
  tx:wait(function()
    return tx.stream_started_at
  end, 5000)
  env:wait(id, function(r)
    return #r.transcript >= 1
  end, 5000, "the greeting in the transcript")
  return id, tx
end

T.test("a signed call.answered without callagent's client_state (another call of the account) hangs up nothing", function()
  local env = start({ behaviour = "busy", config = { retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550129", prompt = "x" })
  T.eq(env:wait_final(id, 10000).status, "busy")
  another_calls_answer_hangs_up_nothing(env, id)
end, { timeout = 20000 })

T.test("a signed webhook whose client_state names a call callagent never had (another deployment's on the account) hangs up nothing", function()
  -- Telnyx sends a call's webhooks to the connection's failover URL when
  -- its own webhook_url fails: another callagent's call on the same
  -- connection can reach this one. Its client_state is well-formed, its
  -- call is not ours to hang up. Before, it was hung up as a stray.
  local env = start({ behaviour = "busy", config = { retry = { maxAttempts = 1 } } })
  local warns = T.log_lines("warn")
  local theirs = "c_" .. string.rep("ab", 10)
  local before = #env.tx.requests
  for _, ev in ipairs({ "call.initiated", "call.answered" }) do
    T.eq(post_webhook(env, theirs, 1, ev, { call_control_id = "v3:another-deployments-call" }), 200, ev)
  end
  timer.sleep(300)
  T.eq(#env.tx.requests, before, "no request to Telnyx (no hang-up of that call)")
  local said = 0
  for _, l in ipairs(warns) do
    if l.msg:find("no record of", 1, true) and l.fields.call == theirs then
      said = said + 1
    end
  end
  T.eq(said, 2, "a WARN line each")
  -- A call of ours that is over still has a late answer of it hung up.
  local id = env:create({ to = "+14155550141", prompt = "x" })
  T.eq(env:wait_final(id, 10000).status, "busy")
  local tx = env.tx.calls[#env.tx.calls]
  before = #env.tx.requests
  T.eq(post_webhook(env, id, 1, "call.answered", { call_control_id = tx.control_id }), 200)
  T.wait_for(function()
    return #env.tx.requests > before
  end, 3000, "the hang-up")
  T.eq(env.tx.requests[before + 1].path, "/v2/calls/" .. tx.control_id .. "/actions/hangup")
end, { timeout = 20000 })

T.test("a call whose codec is PCMA streams PCMU all the same (stream_codec): the bridge speaks mu-law only", function()
  local env = start({ behaviour = { codec = "PCMA" }, script = quiet_script })
  local id = env:create({ to = "+14155550127", prompt = "x" })
  local tx = assert(env.tx:wait_call(5000))
  tx:wait(function()
    return tx.stream_started_at
  end, 5000)
  T.eq(tx.stream and tx.stream.stream_codec, "PCMU", "streaming_start's stream_codec")
  T.eq(tx.stream_encoding, "PCMU", "the stream's media_format")
  T.eq(env:get(id).status, "in_progress")
end, { timeout = 20000 })

T.test("a stream Telnyx cannot transcode to PCMU (a G722 call) is refused (1008), not fed to the model as noise", function()
  local env = start({ behaviour = { codec = "G722" }, script = quiet_script })
  env:create({ to = "+14155550128", prompt = "x" })
  local tx = assert(env.tx:wait_call(5000))
  tx:wait(function()
    return tx.stream_closed
  end, 5000)
  T.eq(tx.stream_encoding, "G722")
  T.eq(tx.stream_closed and tx.stream_closed.code, 1008, "refused")
end, { timeout = 20000 })

T.test("streaming.failed after the answer: hung up at Telnyx at once, failed (no_stream) with its failure_reason, notified once", function()
  local env = start({ behaviour = { stream = "fail", failure_reason = "connection_failed" }, script = quiet_script })
  local id = env:create({ to = "+14155550125", prompt = "x" })
  local tx = assert(env.tx:wait_call(5000))
  tx:wait(function()
    return tx.stream_failed_at
  end, 5000)
  T.ok(tx.stream_failed_at, "Telnyx sent streaming.failed")
  -- Not the 15 s no_stream timer: within a second of the webhook.
  local call = env:wait_final(id, 3000)
  T.ok(tx.hangup_requested_at, "hung up through Telnyx's API")
  T.ok(tx.hangup_requested_at - tx.stream_failed_at < 1000,
    "hung up " .. (tx.hangup_requested_at - tx.stream_failed_at) .. " ms after streaming.failed")
  tx:wait(function()
    return tx.done
  end, 5000)
  T.eq(tx.final, "normal_clearing", "the call ended at Telnyx")
  T.eq(call.status, "failed")
  T.eq(call.endReason, "no_stream")
  T.eq(call.lastError, "telnyx media stream failed: connection_failed")
  -- The record keeps its attempt (answered, Telnyx's id) and its transcript list.
  T.eq(#call.attempts, 1)
  local a = call.attempts[1]
  T.eq({ a.status, a.reason, a.providerCallId }, { "failed", "no_stream", tx.control_id })
  T.ok(a.answeredAt, "answered")
  T.eq(type(call.transcript), "table")
  -- Notified once; no second stream asked for, nothing dialed again, one hang-up.
  T.wait_for(function()
    return #env.hooks.received >= 1
  end, 5000, "notification")
  timer.sleep(300)
  T.eq(#env.hooks.received, 1)
  T.eq(env.hooks.received[1].json.data.status, "failed")
  T.eq(env.hooks.received[1].json.data.endReason, "no_stream")
  T.eq({ env.tx.stream_starts, env.tx.hangups, #env.tx.calls }, { 1, 1, 1 })
  T.eq(#env.rt.sessions <= 1, true, "at most the one model session")
end, { timeout = 30000 })

T.test("the callee hangs up after the answer, before Telnyx's stream opens: completed by the callee, not no_stream", function()
  local env = start({ behaviour = { stream = false }, config = { retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550127", prompt = "x" })
  local tx = assert(env.tx:wait_call(5000))
  tx:wait(function()
    return tx.stream
  end, 5000)
  env:wait(id, function(r)
    return r.status == "in_progress"
  end, 5000, "in progress")
  tx:hangup()
  local call = env:wait_final(id, 5000)
  T.eq({ call.status, call.endReason, call.lastError }, { "completed", "callee_hung_up", nil })
end, { timeout = 20000 })

T.test("a forged, stale or unsigned streaming.failed is refused (403) and changes nothing; Telnyx's own ends the call", function()
  local env = start({ behaviour = { stream = false }, script = quiet_script })
  local id = env:create({ to = "+14155550126", prompt = "x" })
  local tx = assert(env.tx:wait_call(5000))
  tx:wait(function()
    return tx.stream
  end, 5000)
  local rec = env:wait(id, function(r)
    return r.status == "in_progress"
  end, 5000, "in progress")
  local p = { call_control_id = tx.control_id, client_state = tx.body.client_state,
    failure_reason = "connection_failed", stream_id = crypto.uuid4() }
  local before = #events_of(env, id)
  T.gt(before, 0, "the call has events to compare with")
  local _, other = crypto.ed25519_keypair()
  T.eq(post_webhook(env, id, 1, "streaming.failed", p, other), 403, "signed with another key")
  T.eq(post_webhook(env, id, 1, "streaming.failed", p, nil, nil, ""), 403, "unsigned")
  T.eq(post_webhook(env, id, 1, "streaming.failed", p, nil, os.time() - 400), 403, "stale")
  T.eq(post_webhook(env, id, 1, "streaming.stopped", p, other), 403, "streaming.stopped signed with another key")
  timer.sleep(300)
  local after = env:get(id)
  T.eq(after.status, "in_progress")
  T.eq(after.lastError, rec.lastError)
  T.eq(#events_of(env, id), before, "no event recorded")
  T.eq(env.tx.hangups, nil, "no hang-up request")
  T.eq(tx.final, nil, "the call goes on at Telnyx")
  -- Signed by Telnyx: the call ends at once, not at the 15 s no_stream timer.
  local t0 = timer.now()
  T.eq(post_webhook(env, id, 1, "streaming.failed", p), 200)
  local call = env:wait_final(id, 3000)
  T.ok(timer.now() - t0 < 1500, "ended " .. (timer.now() - t0) .. " ms after")
  T.eq({ call.status, call.endReason, call.lastError }, { "failed", "no_stream",
    "telnyx media stream failed: connection_failed" })
  T.ok(tx.hangup_requested_at, "hung up through Telnyx's API")
end, { timeout = 30000 })

T.test("a streaming.failed of another call, or of an attempt that is over, changes nothing; the attempt's own ends it", function()
  local n = 0
  local env = start({ behaviour = function()
    n = n + 1
    return n == 1 and "busy" or { stream = false }
  end, script = quiet_script })
  local id = env:create({ to = "+14155550127", prompt = "x" })
  local t1 = assert(env.tx:wait_call(5000))
  local t2 = assert(env.tx:wait_call(5000))
  t2:wait(function()
    return t2.stream
  end, 5000)
  local rec = env:wait(id, function(r)
    return r.attempts[2] and r.attempts[2].status == "in_progress"
  end, 5000, "the second attempt in progress")
  local fr = "connection_failed"
  -- The first attempt's call (busy, over here): a late streaming.failed of it.
  T.eq(post_webhook(env, id, 1, "streaming.failed", { call_control_id = t1.control_id,
    client_state = t1.body.client_state, failure_reason = fr }), 200)
  -- The second attempt's call, posted as the first attempt's.
  T.eq(post_webhook(env, id, 1, "streaming.failed", { call_control_id = t2.control_id, failure_reason = fr }), 200)
  -- Another call's, posted to the second attempt's URL (only the body is signed).
  T.eq(post_webhook(env, id, 2, "streaming.failed", { call_control_id = "v3:another-call", failure_reason = fr }), 200)
  T.eq(post_webhook(env, id, 2, "streaming.stopped", { call_control_id = "v3:another-call" }), 200)
  timer.sleep(300)
  local after = env:get(id)
  T.eq({ after.status, after.attempts[1].status, after.attempts[2].status }, { "in_progress", "busy", "in_progress" })
  T.eq(after.lastError, rec.lastError)
  T.eq(env.tx.hangups, nil, "no hang-up request")
  T.eq({ t1.final, t2.final }, { "user_busy", nil })
  -- Its own: ended at once.
  T.eq(post_webhook(env, id, 2, "streaming.failed", { call_control_id = t2.control_id, failure_reason = fr }), 200)
  local call = env:wait_final(id, 3000)
  T.eq({ call.status, call.endReason, #call.attempts }, { "failed", "no_stream", 2 })
  T.eq(call.attempts[1].status, "busy")
  T.ok(t2.hangup_requested_at, "the second attempt's call hung up at Telnyx")
  T.eq(t1.hangup_requested_at, nil, "not the first's")
end, { timeout = 30000 })

T.test("streaming.stopped while the call is up: hung up at Telnyx at once, ended as after a Twilio stream close, transcript kept", function()
  local env = start({ script = greet_script })
  -- Telnyx closes the stream and says so (before and after callagent has
  -- seen the close), says so with the stream still open, or closes it and
  -- its webhook is lost.
  for i, how in ipairs({ {}, { delay_ms = 300 }, { keep_socket = true }, { no_webhook = true } }) do
    local id, tx = greeted_call(env, "+1415555013" .. i)
    local t0 = timer.now()
    tx:stop_stream(how)
    -- Not the bridge's 5 s wait for a final status that never comes.
    local call = env:wait_final(id, 3000)
    T.ok(tx.hangup_requested_at, "hung up through Telnyx's API")
    T.ok(tx.hangup_requested_at - t0 < 1000 + (how.delay_ms or 0),
      "hung up " .. (tx.hangup_requested_at - t0) .. " ms after")
    tx:wait(function()
      return tx.done
    end, 5000)
    T.eq(tx.final, "normal_clearing", "the call ended at Telnyx")
    T.eq({ call.status, call.endReason }, { "completed", "callee_hung_up" })
    T.eq(call.transcript[1].text, "Hello, this is the assistant.")
    T.eq(#call.attempts, 1)
    T.eq(env.tx.hangups, i, "one hang-up per call")
  end
  T.wait_for(function()
    return #env.hooks.received >= 4
  end, 5000, "notifications")
  timer.sleep(300)
  T.eq(#env.hooks.received, 4, "one notification per call")
end, { timeout = 30000 })

T.test("a real process: a streaming.failed is one WARN line naming Telnyx's failure_reason, never the key", function()
  local _, rt, config = process_world({ stream = "fail", failure_reason = "connection_failed: " .. API_KEY .. " refused" },
    quiet_script)
  local p, api = kit.app_process({ url = "http://127.0.0.1:9" }, rt, { config = config })
  local id = api:create({ to = "+14155550128", prompt = "x" })
  local call = api:wait_final(id, 5000)
  T.eq({ call.status, call.endReason }, { "failed", "no_stream" })
  T.eq(call.lastError, "telnyx media stream failed: connection_failed: [redacted] refused")
  local text, lines
  local function warn_lines()
    text = p.errtext() .. "\n" .. p.text()
    lines = {}
    for line in text:gmatch("[^\n]+") do
      if line:find("media stream failed", 1, true) and line:find("WARN", 1, true) then
        lines[#lines + 1] = line
      end
    end
    return #lines > 0
  end
  -- The child's output comes through a pipe: its WARN line is waited for, not
  -- assumed read 200 ms after the record went final; then a moment for a second.
  T.wait_for(warn_lines, 10000, "the WARN line")
  timer.sleep(200)
  warn_lines()
  T.eq(#lines, 1, "WARN lines: " .. table.concat(lines, "\n"))
  T.match(lines[1] or "", "failure_reason=\"connection_failed: %[redacted%] refused\"")
  T.match(lines[1] or "", "call=" .. id)
  T.eq(text:find(API_KEY, 1, true), nil, "the key in the process's output")
end, { timeout = 30000 })

T.test("a real process: Telnyx's error frames on the stream are one WARN line with what the first says and a count, not messages not understood", function()
  local tx, rt, config = process_world(nil, function(session)
    assert(session:wait_event("response.create", 5000))
    session:speak({ ms = 200, text = "Hello." })
    T.wait_for(function()
      return session.errors_sent
    end, 10000, "the error frames")
    session:report_and_goodbye({ summary = "Fine.", outcome = "success" }, { ms = 100, text = "Bye." })
  end)
  local p, api = kit.app_process({ url = "http://127.0.0.1:9" }, rt, { config = config })
  local id = api:create({ to = "+14155550129", prompt = "x" })
  local c = assert(tx:wait_call(10000))
  c:wait(function()
    return c.stream_started_at
  end, 10000)
  local s = assert(rt:wait_session(10000))
  for i = 1, 3 do
    c.ws:send(json.encode({ event = "error", sequence_number = tostring(100 + i), stream_id = c.stream_id,
      payload = { code = 100004, title = "invalid_media", detail = "Media payload could not be decoded" } }))
  end
  timer.sleep(100)
  s.errors_sent = true
  local call = api:wait_final(id, 20000)
  T.eq({ call.status, call.endReason }, { "completed", "completed" }, "the call goes on")
  p:kill("SIGTERM")
  p:wait(10000)
  local text = p.errtext() .. "\n" .. p.text()
  T.eq(text:find("not understood", 1, true), nil, "Telnyx's error frame is no message not understood: " .. text)
  local _, n = text:gsub("WARN media stream: the vendor reported an error attempt=1 call=" .. id
    .. " code=100004 detail=\"Media payload could not be decoded\" title=invalid_media", "")
  T.eq(n, 1, "one line, with what the first says: " .. text)
  T.match(text, "WARN media stream: the vendor reported more errors attempt=1 call=" .. id .. " count=3")
end, { timeout = 40000 })


T.test("Telnyx's streaming.stopped after callagent's own hang-up (stream closed, call.hangup not yet in) sends no second hang-up", function()
  -- Telnyx ends the stream of a call it hangs up, and may say so before its
  -- call.hangup: the API's hang-up, and the agent's goodbye.
  for _, how in ipairs({ "api", "goodbye" }) do
    local env = start({ fake = { stopped_at_end = 200 }, script = how == "goodbye" and happy_script or quiet_script })
    local id = env:create({ to = "+14155550140", prompt = "x" })
    local tx = assert(env.tx:wait_call(5000))
    tx:wait(function()
      return tx.stream_started_at
    end, 5000)
    if how == "api" then
      env:wait(id, function(r)
        return r.status == "in_progress"
      end, 5000, "in progress")
      T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
    end
    local call = env:wait_final(id, 10000)
    tx:wait(function()
      return tx.done
    end, 5000)
    local names = {}
    for _, e in ipairs(tx.events) do
      names[#names + 1] = e.event
    end
    T.eq(names[#names - 1], "streaming.stopped", how .. ": Telnyx said the stream stopped before the call.hangup")
    timer.sleep(300)
    T.eq(env.tx.hangups, 1, how .. ": hang-up requests")
    T.eq(call.endReason, how == "api" and "hung_up_by_api" or "completed", how)
  end
end, { timeout = 30000 })


T.test("the callee hangs up while their last words are transcribed: no hang-up request for the call Telnyx has ended", function()
  local tx
  local env
  env = start({ script = function(session)
    assert(session:wait_event("response.create", 5000))
    session:speak({ ms = 300, text = "Hello, is this Ann?" })
    -- The transcription takes 800 ms; the callee hangs up meanwhile, and
    -- Telnyx's call.hangup comes while the words are awaited.
    session:user_speech({ ms = 300, text = "Sorry, I have to go.", transcript_delay_ms = 800 })
    tx:hangup()
  end })
  local id = env:create({ to = "+14155550141", prompt = "x" })
  tx = assert(env.tx:wait_call(5000))
  local call = env:wait_final(id, 10000)
  T.eq({ call.status, call.endReason }, { "completed", "callee_hung_up" })
  T.eq(call.transcript[#call.transcript].text, "Sorry, I have to go.")
  timer.sleep(300)
  T.eq(env.tx.hangups, nil, "hang-up requests")
end, { timeout = 30000 })

T.test("a stream message over max_ws_message: the call Telnyx keeps up is hung up once, failed (stream_error)", function()
  local env = start({ script = greet_script })
  local id, tx = greeted_call(env, "+14155550145")
  assert(tx.ws:send(json.encode({ event = "media", stream_id = tx.stream_id,
    media = { track = "inbound", payload = string.rep("A", 256 * 1024) } })))
  local call = env:wait_final(id, 3000)
  T.eq({ call.status, call.endReason, #call.attempts }, { "failed", "stream_error", 1 })
  T.eq(call.lastError, "media stream closed: message too big (1009)")
  T.eq({ tx.stream_closed.code, tx.stream_closed.by }, { 1009, "app" })
  tx:wait(function()
    return tx.done
  end, 5000)
  T.eq(tx.final, "normal_clearing", "hung up at Telnyx")
  T.wait_for(function()
    return #env.hooks.received >= 1
  end, 5000, "notification")
  timer.sleep(300)
  T.eq(env.tx.hangups, 1, "one hang-up request")
  T.eq(#env.hooks.received, 1, "notified once")
end, { timeout = 30000 })

T.run()
