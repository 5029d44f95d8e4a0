-- Faults and forgeries: bad or missing Twilio signatures, stream tokens that
-- are reused or unknown, the model failing (before and during the call, or
-- with an error event), the maximum duration, and a callee who never speaks.
-- Each ends or wraps up the call with a clear reason, and the server stays up.
local T = require "testing"
local kit = require "callkit"
local fetch = require "callagent.fetch"
local ws = require "callagent.ws"
local url = require "callagent.url"
local timer = require "callagent.timer"
local task = require "callagent.task"
local json = require "callagent.json"
local fake_twilio = require "fakes.twilio"
local crypto = require "callagent.crypto"
local calls = require "callagent.calls"
local bridge = require "callagent.bridge"

local function healthy(env)
  local status, body = env:api("GET", "/healthz")
  T.eq(status, 200)
  T.eq(body.ok, true)
end

T.test("a status callback with a bad or missing signature gets 403 and changes nothing", function()
  local env = kit.start({ twilio = { behaviour = { ring_ms = 3000 } } })
  local id = env:create({ to = "+14155550120", prompt = "Say hello." })
  local rec = env:wait(id, function(r)
    return r.status == "dialing" and r.attempts[1].providerCallId
  end, 5000, "dialing")
  local target = env.base .. "/status?callId=" .. id .. "&attempt=1"
  local params = { CallSid = rec.attempts[1].providerCallId, CallStatus = "completed", SequenceNumber = "9", AccountSid = kit.ACCOUNT }
  local body = url.form_encode(params)
  local headers = { ["Content-Type"] = "application/x-www-form-urlencoded" }
  local res = assert(fetch(target, { method = "POST", body = body, headers = headers }))
  T.eq(res.status, 403, "missing signature")
  headers["X-Twilio-Signature"] = fake_twilio.sign("wrong-token", target, params)
  res = assert(fetch(target, { method = "POST", body = body, headers = headers }))
  T.eq(res.status, 403, "signature with the wrong token")
  headers["X-Twilio-Signature"] = fake_twilio.sign(kit.TOKEN, target, params)
  local tampered = url.form_encode({ CallSid = params.CallSid, CallStatus = "busy", SequenceNumber = "9", AccountSid = kit.ACCOUNT })
  res = assert(fetch(target, { method = "POST", body = tampered, headers = headers }))
  T.eq(res.status, 403, "body changed after signing")
  -- A JSON body is signed through its hash (bodySHA256 in the URL): a
  -- signature of the URL alone does not vouch for it.
  local function jpost(text, bare)
    local signed = bare and target or (target .. "&bodySHA256=" .. crypto.to_hex(crypto.sha256(text)))
    return assert(fetch(signed, { method = "POST", body = text, headers = {
      ["Content-Type"] = "application/json", ["X-Twilio-Signature"] = fake_twilio.sign(kit.TOKEN, signed) } }))
  end
  T.eq(jpost('{"CallStatus":"completed"}', true).status, 403, "JSON without bodySHA256")
  local signed = target .. "&bodySHA256=" .. crypto.to_hex(crypto.sha256('{"CallStatus":"busy"}'))
  res = assert(fetch(signed, { method = "POST", body = '{"CallStatus":"completed"}', headers = {
    ["Content-Type"] = "application/json", ["X-Twilio-Signature"] = fake_twilio.sign(kit.TOKEN, signed) } }))
  T.eq(res.status, 403, "JSON that is not the body hashed")
  -- Signed, but JSON that is no object, or fields of the wrong type: 400.
  for _, text in ipairs({ "5", "[1]", '"completed"', '{"CallStatus":{"x":1}}', "{not json" }) do
    res = jpost(text)
    T.eq(res.status, 400, text)
    T.eq(json.decode(res.body).error.code, "bad_status", text)
  end
  -- The answer names the problem, not the request's bytes.
  for text, message in pairs({
    ['{"CallStatus":{"x":1}}'] = "CallStatus is missing or not a string",
    ['{"CallStatus":"exploded"}'] = "unknown CallStatus exploded",
    ['{"CallStatus":"\\u001b[2J\\u00ff"}'] = "unknown CallStatus",
  }) do
    res = jpost(text)
    local e = json.decode(res.body).error
    T.eq({ e.message, e.field }, { message, "CallStatus" }, text)
  end
  -- A repeated CallStatus is not one status.
  local twice = { CallSid = params.CallSid, CallStatus = { "ringing", "completed" }, AccountSid = kit.ACCOUNT }
  res = assert(fetch(target, { method = "POST", body = url.form_encode(twice), headers = {
    ["Content-Type"] = "application/x-www-form-urlencoded", ["X-Twilio-Signature"] = fake_twilio.sign(kit.TOKEN, target, twice) } }))
  T.eq(res.status, 400)
  T.eq(json.decode(res.body).error.field, "CallStatus")
  local after = env:get(id)
  T.eq(after.status, "dialing", "nothing changed")
  T.eq(#after.attempts, 1)
  -- A status with other fields of the wrong type: taken, those passed over.
  res = jpost('{"CallStatus":"failed","SipResponseCode":{},"CallSid":[1]}')
  T.eq(res.status, 204)
  after = env:get(id)
  T.eq({ after.attempts[1].status, after.attempts[1].providerCallId, after.attempts[1].reason },
    { "failed", rec.attempts[1].providerCallId, "call failed" })
  -- And a correctly signed one is accepted, its media type in any case (RFC 9110 8.3.1).
  headers["Content-Type"] = "Application/X-WWW-Form-Urlencoded; Charset=UTF-8"
  res = assert(fetch(target, { method = "POST", body = body, headers = headers }))
  T.eq(res.status, 204)
  healthy(env)
end)


T.test("a CallSid that is no Twilio call sid never becomes part of a REST URL", function()
  -- A Twilio API that records every request, and answers a dial with a
  -- sid that is a path.
  local seen = {}
  local base = kit.rest_stub(function(req)
    seen[#seen + 1] = req.method .. " " .. req.path
    if req.path:find("/Calls%.json$") then
      return 201, { sid = "CA../../IncomingPhoneNumbers/PN1", status = "queued" }
    end
    return 404, { code = 20404, message = "not found" }
  end)
  local env = kit.start({ config = { twilio = { apiBaseUrl = base },
    retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550123", prompt = "Say hello." })
  local rec = env:wait_final(id, 5000)
  T.eq(rec.status, "failed")
  T.match(rec.lastError, "without a call sid")
  -- Signed callbacks that show a call up for a call nobody knows: a sid
  -- that is a path, a query or an escape is not hung up.
  for _, sid in ipairs({ "CA../../../IncomingPhoneNumbers/PN1", "CAx?Foo=1#", "CA%2e%2e/x",
    "CA" .. string.rep("a", 31) .. "/" }) do
    local target = env.base .. "/status?callId=c_unknown&attempt=1"
    local params = { CallSid = sid, CallStatus = "ringing", SequenceNumber = "1" }
    local res = assert(fetch(target, { method = "POST", body = url.form_encode(params), headers = {
      ["Content-Type"] = "application/x-www-form-urlencoded", ["X-Twilio-Signature"] = fake_twilio.sign(kit.TOKEN, target, params) } }))
    T.eq(res.status, 204, sid)
  end
  timer.sleep(300)
  local bad = {}
  for _, s in ipairs(seen) do
    if not s:find("^POST /2010%-04%-01/Accounts/" .. kit.ACCOUNT .. "/Calls%.json$") then
      bad[#bad + 1] = s
    end
  end
  T.eq(bad, {}, "requests other than the dial")
  healthy(env)
end)

T.test("the voice webhook without a valid signature gets 403 and hands out no stream", function()
  -- No session opened while it rings (openai.connectWhileRinging): the webhook's own are counted.
  local env = kit.start({ twilio = { behaviour = { ring_ms = 3000 } }, config = { openai = { connectWhileRinging = false } } })
  local id = env:create({ to = "+14155550121", prompt = "Say hello." })
  env:wait(id, function(r)
    return r.status == "dialing"
  end, 5000, "dialing")
  local target = env.base .. "/voice?callId=" .. id .. "&attempt=1"
  local res = assert(fetch(target, {
    method = "POST",
    body = "CallSid=CAx&CallStatus=in-progress",
    headers = { ["Content-Type"] = "application/x-www-form-urlencoded", ["X-Twilio-Signature"] = "Zm9vYmFy" },
  }))
  T.eq(res.status, 403)
  T.no_match(res.body, "Stream")
  T.eq(#env.rt.sessions, 0, "no model session was opened")
end)


T.test("a webhook whose attempt is not a whole number gets 400: no second bridge, no model session", function()
  -- No session opened while it rings (openai.connectWhileRinging): the webhook's own are counted.
  local env = kit.start({ twilio = { behaviour = { ring_ms = 3000 } }, config = { openai = { connectWhileRinging = false } } })
  local id = env:create({ to = "+14155550124", prompt = "Say hello." })
  local rec = env:wait(id, function(r)
    return r.status == "dialing" and r.attempts[1].providerCallId
  end, 5000, "dialing")
  local params = { CallSid = rec.attempts[1].providerCallId, CallStatus = "in-progress", AccountSid = kit.ACCOUNT }
  for _, attempt in ipairs({ "1.0", "1e0", "0x1", "1.5", "abc", "" }) do
    for _, path in ipairs({ "/voice", "/status" }) do
      local target = env.base .. path .. "?callId=" .. id .. "&attempt=" .. attempt
      local res = assert(fetch(target, { method = "POST", body = url.form_encode(params), headers = {
        ["Content-Type"] = "application/x-www-form-urlencoded",
        ["X-Twilio-Signature"] = fake_twilio.sign(kit.TOKEN, target, params) } }))
      T.eq(res.status, 400, path .. " attempt=" .. attempt)
      local e = json.decode(res.body).error
      T.eq({ e.code, e.field }, { "bad_request", "attempt" }, path .. " attempt=" .. attempt)
    end
  end
  T.eq(#env.rt.sessions, 0, "no model session was opened")
  T.eq(env:get(id).status, "dialing", "nothing changed")
  healthy(env)
end)

T.test("a stream token works once: a second stream with it, or an unknown one, is refused", function()
  local env = kit.start({
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 3000, text = "Hello..." })
      end,
    },
  })
  local id = env:create({ to = "+14155550122", prompt = "Say hello." })
  local tw = assert(env.tw:wait_call(5000))
  assert(tw:wait_stream(5000))
  local token = tw.stream_params.token
  local stream_url = env.base:gsub("^http", "ws") .. "/voice/stream"
  local function try(tok, sid)
    local conn = assert(ws.connect(stream_url, { headers = { ["X-Twilio-Signature"] = fake_twilio.sign(kit.TOKEN, stream_url) } }))
    conn:send(json.encode({ event = "connected", protocol = "Call", version = "1.0.0" }))
    sid = sid or "MZ" .. string.rep("0", 32)
    conn:send(json.encode({
      event = "start",
      sequenceNumber = "1",
      streamSid = sid,
      start = { streamSid = sid, callSid = "CAx", customParameters = { callId = id, attempt = "1", token = tok } },
    }))
    return conn:receive(3000)
  end
  local kind, code, reason = try(token)
  T.eq(kind, "close")
  T.eq(code, 1008)
  T.match(reason, "already used")
  kind, code, reason = try("made-up-token")
  T.eq(kind, "close")
  T.eq(code, 1008)
  T.match(reason, "unknown")
  -- The stream sid goes into every message to the phone: one that would
  -- break them is refused before the token is looked at.
  for _, sid in ipairs({ 'MZ"}', "MZ\\", "MZ\n1", "MZ 1", "", string.rep("M", 64), json.null }) do
    kind, code, reason = try(token, sid)
    T.eq({ kind, code, reason }, { "close", 1008, "bad streamSid" }, json.encode(sid))
  end
  -- The real stream is unaffected.
  T.eq(env:get(id).status, "in_progress")
  healthy(env)
end, { timeout = 30000 })


T.test("a refused media stream is not heard any more: a start it sends after claims nothing", function()
  local env = kit.start({ twilio = { behaviour = { stream = false } } })
  local id = env:create({ to = "+14155550125", prompt = "Say hello." })
  local tw = assert(env.tw:wait_call(5000))
  T.wait_for(function()
    return tw.twiml and tw.twiml.stream
  end, 5000, "the TwiML")
  local token = tw.twiml.stream.parameters.token
  local stream_url = env.base:gsub("^http", "ws") .. "/voice/stream"
  local sid = "MZ" .. string.rep("1", 32)
  local start = json.encode({ event = "start", sequenceNumber = "1", streamSid = sid,
    start = { streamSid = sid, callSid = tw.sid, customParameters = { callId = id, attempt = "1", token = token } } })
  -- Refused for its signature, then for a first message that is not
  -- `start`: what each sends right after (in the same read, before the
  -- close is through) is not taken.
  for _, case in ipairs({ { "bm9wZQ==", nil, "invalid signature" },
    { fake_twilio.sign(kit.TOKEN, stream_url), json.encode({ event = "media", media = { payload = "" } }), "expected start" } }) do
    local conn = assert(ws.connect(stream_url, { headers = { ["X-Twilio-Signature"] = case[1] } }))
    if case[2] then
      conn:send(case[2])
    end
    conn:send(start)
    local kind, code, reason = conn:receive(3000)
    T.eq({ kind, code, reason }, { "close", 1008, case[3] })
  end
  -- The token is still unused: Twilio's own stream gets the call.
  local conn = assert(ws.connect(stream_url, { headers = { ["X-Twilio-Signature"] = fake_twilio.sign(kit.TOKEN, stream_url) } }))
  conn:send(json.encode({ event = "connected", protocol = "Call", version = "1.0.0" }))
  conn:send(start)
  local kind = conn:receive(1000)
  T.ne(kind, "close", "the signed stream is taken")
  T.eq(env:get(id).status, "in_progress")
  conn:close(1000, "bye")
  healthy(env)
end, { timeout = 30000 })

T.test("a media stream that never starts, or sends something else first, is closed with 1008 and logged", function()
  local tw, rt = kit.fakes()
  local p, api = kit.app_process(tw, rt, { stream_start_ms = 500 })
  local stream_url = api.base:gsub("^http", "ws") .. "/voice/stream"
  local function open()
    return assert(ws.connect(stream_url, { headers = { ["X-Twilio-Signature"] = fake_twilio.sign(kit.TOKEN, stream_url) } }))
  end
  -- Silent after the handshake, and silent after `connected`.
  local silent, connected = open(), open()
  connected:send(json.encode({ event = "connected", protocol = "Call", version = "1.0.0" }))
  local t0 = timer.now()
  for _, conn in ipairs({ silent, connected }) do
    local kind, code, reason = conn:receive(5000)
    T.eq({ kind, code, reason }, { "close", 1008, "no start" })
  end
  T.gt(timer.now() - t0, 300, "closed at the deadline, not before")
  -- Media before start, and a message that is no event: refused at once.
  for _, text in ipairs({ json.encode({ event = "media", media = { payload = "" } }), "hello", "[1]" }) do
    local conn = open()
    conn:send(text)
    -- The reason tells this refusal from the 500 ms deadline's ("no start"):
    -- no tight bound on a loaded machine.
    local kind, code, reason = conn:receive(5000)
    T.eq({ kind, code, reason }, { "close", 1008, "expected start" }, text)
  end
  T.wait_for(function()
    return select(2, p.errtext():gsub("media stream refused", "")) >= 5
  end, 5000, "a log line for each: " .. p.errtext())
  local log = p.errtext()
  T.match(log, 'WARN media stream refused reason="no start within 0%.5 s" remote=127%.0%.0%.1')
  T.match(log, 'reason="expected connected or start, got event media"')
  T.match(log, 'reason="expected connected or start, got a message that is not an event"')
  T.eq(assert(fetch(api.base .. "/healthz")).status, 200)
end, { timeout = 30000 })

-- A call whose model files report at its first turn and says "Bye."
-- (bye_ms of audio, 100 by default).
local function reporting(report, bye_ms)
  return kit.start({
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:report_and_goodbye(report, { ms = bye_ms or 100, text = "Bye." })
      end,
    },
  })
end

T.test("a report whose data is no object (an array, a string) keeps it as data.value: data stays an object", function()
  for _, case in ipairs({ { { "Tuesday", "10:00" }, { value = { "Tuesday", "10:00" } } }, { "Tuesday", { value = "Tuesday" } },
    { json.array({}), { value = {} } }, { json.null, {} } }) do
    local env = reporting({ summary = "Booked.", outcome = "success", data = case[1] })
    local id = env:create({ to = "+14155550125", prompt = "Book it." })
    local call = env:wait_final(id, 20000)
    T.eq(call.report.data, case[2], json.encode(case[1]))
    T.wait_for(function()
      return #env.hooks.received >= 1
    end, 10000, "the notification")
    T.eq(env.hooks.received[1].json.data.report.data, case[2])
    env:close()
  end
end, { timeout = 60000 })

T.test("report_call fields beside summary, outcome, nextSteps and data (a schema the prompt asked for) are kept in data; one no record could hold is dropped alone", function()
  -- 20 levels: data with it would be 21 deep, past the 20 a record holds.
  local deep = {}
  for _ = 1, 20 do
    deep = { a = deep }
  end
  local env = reporting({ summary = "Booked.", outcome = "success", appointment = "Tuesday 10:00",
    confirmation = "AB12", notes = deep, data = { room = "3", confirmation = "CD34" } })
  local id = env:create({ to = "+14155550126", prompt = "Book it. Report appointment and confirmation." })
  local call = env:wait_final(id, 20000)
  local want = { room = "3", confirmation = "CD34", appointment = "Tuesday 10:00" }
  T.eq(call.report.data, want, "data's own key wins over one beside it")
  T.wait_for(function()
    return #env.hooks.received >= 1
  end, 10000, "the notification")
  T.eq(env.hooks.received[1].json.data.report.data, want)
end, { timeout = 30000 })

T.test("report_call near misses of its schema keep what the model said: nextSteps as one string, outcome in capitals", function()
  local env = reporting({ summary = "Booked.", outcome = "Success", nextSteps = "Call back Tuesday." })
  local id = env:create({ to = "+14155550127", prompt = "Book it." })
  local call = env:wait_final(id, 20000)
  T.eq({ call.report.outcome, call.report.nextSteps, call.report.outcomeRaw }, { "success", { "Call back Tuesday." }, nil })
end, { timeout = 30000 })

T.test("a report_call outcome outside the five is unknown, the model's word kept as outcomeRaw and warned about", function()
  local warns = T.log_lines("warn")
  local env = reporting({ summary = "They asked us to call back.", outcome = "callback_requested" })
  local id = env:create({ to = "+14155550128", prompt = "Book it." })
  local call = env:wait_final(id, 20000)
  T.eq({ call.report.outcome, call.report.outcomeRaw }, { "unknown", "callback_requested" })
  T.wait_for(function()
    return #env.hooks.received >= 1
  end, 10000, "the notification")
  local sent = env.hooks.received[1].json.data.report
  T.eq({ sent.outcome, sent.outcomeRaw }, { "unknown", "callback_requested" }, "in the notification too")
  local said
  for _, l in ipairs(warns) do
    if l.msg:find("report_call outcome is none of", 1, true) then
      said = l.fields
    end
  end
  T.eq({ said and said.outcome, said and said.call }, { "callback_requested", id }, "one WARN line naming it")
end, { timeout = 30000 })

T.test("an oversized report is cut to its limits: the record keeps the rest, and its notification is small enough to deliver", function()
  local warns = T.log_lines("warn")
  local steps = {}
  for i = 1, 25 do
    steps[i] = "Step " .. i .. "."
  end
  steps[2] = string.rep("s", 5000)
  -- 1.1 MB: over the 1 MiB body the test's hooks receiver (callagent's own
  -- server) takes, as a receiver's limit would refuse it for good.
  local report = { summary = "Booked. " .. string.rep("é", 550000), outcome = string.rep("o", 100000),
    nextSteps = steps, data = { slots = string.rep("x", 40000) } }
  local env = kit.start({
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:call_function("report_call", report, { delta_size = 65536 })
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 100, text = "Bye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550128", prompt = "Book it." })
  local call = env:wait_final(id, 20000)
  T.eq({ call.status, call.endReason, call.report.outcome }, { "completed", "completed", "unknown" })
  T.eq(call.report.outcomeRaw, string.rep("o", 256) .. "…", "the model's outcome word cut to 256 bytes")
  local summary = call.report.summary
  T.le(#summary, 4096 + #"…", "the summary cut to 4 KiB")
  T.eq(summary:sub(1, 10), "Booked. é", "its start kept")
  T.eq(summary:sub(-3), "…", "marked as cut")
  T.ok(utf8.len(summary), "cut between characters")
  T.eq(#call.report.nextSteps, 20, "20 steps kept")
  T.eq({ call.report.nextSteps[1], #call.report.nextSteps[2], call.report.nextSteps[20] },
    { "Step 1.", 1024 + #"…", "Step 20." })
  T.eq(call.report.data, {}, "data over 32 KiB dropped")
  T.wait_for(function()
    return #env.hooks.received >= 1
  end, 10000, "the notification")
  local note = env.hooks.received[1]
  T.eq(note.json.data.report.summary, summary)
  T.lt(#note.body, 64 * 1024, "the notification's body")
  local said = {}
  for _, w in ipairs(warns) do
    said[#said + 1] = w.msg
  end
  for _, msg in ipairs({ "report_call summary cut", "report_call next step cut", "report_call next steps dropped",
    "report_call data dropped", "report_call outcome cut" }) do
    T.ok(table.concat(said, "\n"):find(msg, 1, true), "warned: " .. msg)
  end
end, { timeout = 30000 })

T.test("a transcript line over 8 KiB is cut between characters with …, warned about once per call", function()
  local warns = T.log_lines("warn")
  -- 3-byte characters: 8192 bytes end inside one.
  local said, heard = string.rep("€", 200000), "Yes. " .. string.rep("ü", 5000)
  local env = kit.start({
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 100, text = said })
        session:user_speech({ ms = 100, text = heard })
        session:call_function("report_call", { summary = "ok", outcome = "success" })
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 100, text = "Bye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550129", prompt = "Ask." })
  local call = env:wait_final(id, 20000)
  T.eq({ call.status, #call.transcript }, { "completed", 3 })
  local agent, callee = call.transcript[1].text, call.transcript[2].text
  T.eq(agent, string.rep("€", 2730) .. "…", "cut to 8190 bytes: the next character would pass 8192")
  T.eq(callee, heard:sub(1, 5) .. string.rep("ü", 4093) .. "…")
  T.eq(call.transcript[3].text, "Bye.", "a short line as it was")
  local cuts = {}
  for _, w in ipairs(warns) do
    if w.msg:find("^transcript line cut") then
      cuts[#cuts + 1] = w.fields
    end
  end
  T.eq(#cuts, 1, "one warning for the call")
  T.eq({ cuts[1].call, cuts[1].role, cuts[1].bytes, cuts[1].kept }, { id, "agent", #said, 8192 })
end, { timeout = 30000 })

T.test("a report whose data no record could hold is kept without it: the call completes and is notified", function()
  -- 97 levels: the model's arguments encode; the call document, one
  -- level more, and the webhook's payload would not (encoding stops at 100).
  local deep = {}
  for _ = 1, 97 do
    deep = { a = deep }
  end
  local env = reporting({ summary = "Booked.", outcome = "success", data = deep }, 200)
  local id = env:create({ to = "+14155550124", prompt = "Book it.", metadata = { ref = "r1" } })
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "completed")
  T.eq({ call.report.summary, call.report.outcome, call.report.data }, { "Booked.", "success", {} })
  T.wait_for(function()
    return #env.hooks.received >= 1
  end, 10000, "the notification")
  local data = env.hooks.received[1].json.data
  T.eq({ data.callId, data.status, data.report.summary, data.metadata }, { id, "completed", "Booked.", { ref = "r1" } })
  local _, list = env:api("GET", "/v1/calls")
  T.eq(list.calls[1].callId, id, "the list still answers")
  healthy(env)
end)

T.test("the wrap-up at call.maxDurationSec waits for the response in progress: no refused response.create", function()
  local env = kit.start({
    config = { call = { maxDurationSec = 1, wrapUpSec = 4 } },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 2500, text = "A long greeting, still being generated at the one second mark." })
        assert(session:wait_event("response.create", 5000), "the wrap-up's response")
        session:report_and_goodbye({ summary = "x", outcome = "success" }, { ms = 200, text = "Bye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550112", prompt = "Talk." })
  local call = env:wait_final(id, 20000)
  local s = env.rt.sessions[1]
  T.eq(s.errors_sent, {}, "nothing refused by the service")
  T.eq(call.report and call.report.summary, "x", "the agent reported after the wrap-up message")
  T.eq(call.endReason, "completed")
end, { timeout = 40000 })

T.test("the model dropping mid-call fails the call with a clear reason and hangs up", function()
  local env = kit.start({
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 300, text = "Hello." })
        session:drop()
      end,
    },
  })
  local id = env:create({ to = "+14155550123", prompt = "Say hello." })
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "failed")
  T.match(call.lastError, "model connection closed")
  T.eq(call.endReason, "model_error")
  T.eq(#call.attempts, 1, "an answered call is not dialed again")
  T.ok(env.tw.calls[1].hangup_requested_at, "Twilio was told to hang up")
  T.wait_for(function()
    return #env.hooks.received >= 1
  end, 5000, "notification")
  T.eq(env.hooks.received[1].json.data.status, "failed")
  healthy(env)
end, { timeout = 30000 })

T.test("an API hang-up after the model dropped keeps the call failed with model_error", function()
  -- The model drops before the phone's stream has come; Twilio's completed
  -- callback is lost, so the call is still up here when the API asks.
  -- The wait for the provider's final status after the hang-up (10 s)
  -- shortened: the call ends at it.
  T.shorten(calls, "HANGUP_WAIT_MS", 1500)
  local env = kit.start({
    twilio = { behaviour = { stream_delay_ms = 5000, lost_callbacks = { completed = true } } },
    realtime = {
      script = function(session)
        session:wait_event("session.update", 5000)
        session:drop()
      end,
    },
  })
  local id = env:create({ to = "+14155550132", prompt = "Say hello." })
  local tw = env.tw:wait_call(5000)
  T.wait_for(function()
    return tw.hangup_requested_at ~= nil
  end, 5000, "the hang-up after the model dropped")
  T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
  local call = env:wait_final(id, 15000)
  T.eq(call.status, "failed")
  T.eq(call.endReason, "model_error", "the first reason stays")
  T.match(call.lastError, "model connection closed")
end, { timeout = 30000 })

T.test("a model that refuses the session (bad key) fails the call and hangs up", function()
  local env = kit.start({
    -- Opened at the answer (one opened while it rings cancels the ring: test_call_model).
    config = { openai = { apiKey = "sk-wrong-key", connectWhileRinging = false }, retry = { maxAttempts = 1 } },
  })
  local id = env:create({ to = "+14155550124", prompt = "Say hello." })
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "failed")
  T.match(call.lastError, "invalid_api_key")
  T.ok(env.tw.calls[1].hangup_requested_at, "Twilio was told to hang up")
  healthy(env)
end, { timeout = 30000 })

-- The client events of a session, as "response.create" and
-- "item(function_call_output)", in the order they came.
local function creates_and_outputs(session)
  local order = {}
  for _, ev in ipairs(session.events) do
    if ev.type == "response.create" then
      order[#order + 1] = "create"
    elseif ev.type == "conversation.item.create" and ev.item.type == "function_call_output" then
      order[#order + 1] = "output"
    end
  end
  return order
end

T.test("a response asked for while the model was busy waits for a slow tool's output", function()
  local env = kit.start({
    tools = { { name = "slow", description = "x", parameters = { type = "object", properties = {} },
      handler = function()
        timer.sleep(800)
        return { ok = true }
      end } },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Hi." })
        -- As the service refuses a create while its own response is active.
        session:send({ type = "error", error = { type = "invalid_request_error",
          code = "conversation_already_has_active_response", message = "busy" } })
        session:call_function("slow", {})
        assert(session:wait_event("response.create", 5000), "the create after the tool")
        session.order = creates_and_outputs(session)
        session:report_and_goodbye({ summary = "x", outcome = "success" }, { ms = 100, text = "Bye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550127", prompt = "Explain." })
  T.eq(env:wait_final(id, 20000).status, "completed")
  T.eq(env.rt.sessions[1].order, { "create", "output", "create" }, "the greeting's, then the tool's after its output")
end, { timeout = 40000 })

T.test("no response is asked for after the goodbye", function()
  local env = kit.start({
    config = { call = { goodbyeTimeoutSec = 8 } },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Hi." })
        session:send({ type = "error", error = { type = "invalid_request_error",
          code = "conversation_already_has_active_response", message = "busy" } })
        session:call_function("report_call", { summary = "x", outcome = "success" })
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 1500, pace = false, text = "Bye." })
        session.third = session:wait_event("response.create", 3000)
      end,
    },
  })
  local id = env:create({ to = "+14155550128", prompt = "Explain." })
  T.eq(env:wait_final(id, 20000).status, "completed")
  local s = env.rt.sessions[1]
  -- The script's last wait ends when the connection closes (or after its
  -- 3 s): until then a late response.create could still be on its way.
  T.wait_for(function()
    return s.script_done
  end, 5000, "the model's script to end")
  T.eq(s.third, nil, "no response.create after the goodbye")
  T.eq(creates_and_outputs(s), { "create", "output", "create" })
end, { timeout = 40000 })

T.test("the goodbye is the response asked for after report_call, not one the service started meanwhile", function()
  local env = kit.start({
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Hi." })
        session:call_function("report_call", { summary = "x", outcome = "success" }, { wait = false })
        -- The callee spoke: the service's turn detection starts a response
        -- before the goodbye's response.create comes; that one is refused.
        session:speak({ auto = true, ms = 600, text = "Noted." })
        assert(session:wait_event("response.create", 5000), "the goodbye asked for again")
        timer.sleep(500) -- the model takes a moment to start speaking
        session:speak({ ms = 800, text = "Goodbye now." })
        session.goodbye_done_at = timer.now()
      end,
    },
  })
  local id = env:create({ to = "+14155550129", prompt = "Explain." })
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "completed")
  local s = env.rt.sessions[1]
  T.eq(s.errors_sent[1] and s.errors_sent[1].code, "conversation_already_has_active_response")
  T.ok(s.goodbye_done_at, "the goodbye was spoken")
  T.gt(env.tw.calls[1].hangup_requested_at, s.goodbye_done_at, "the hang-up came after the goodbye, not after the other")
  local lines = {}
  for _, l in ipairs(call.transcript) do
    lines[#lines + 1] = l.role .. (l.interrupted and " (interrupted)" or "") .. ": " .. l.text
  end
  T.eq(lines, { "agent: Hi.", "agent: Noted.", "agent: Goodbye now." })
end, { timeout = 40000 })

T.test("a response the service started before the greeting went out is the agent's first turn: no second greeting", function()
  local env = kit.start({
    twilio = { behaviour = { stream_delay_ms = 600 } },
    -- The session opens at the answer, the callee already there to be heard.
    config = { openai = { connectWhileRinging = false } },
    realtime = {
      script = function(session)
        -- Its turn detection answers the callee at once (a "Hello?"): the
        -- phone's stream starts while that response is on. Once the
        -- session's settings are in, as the service takes events in order
        -- (before them the audio would be pcm16 at 24 kHz, not the mu-law
        -- asked for: 9 s of noise for the phone to play, the goodbye's
        -- hang-up waiting for it until call.goodbyeTimeoutSec).
        assert(session:wait_event("session.update", 5000))
        session:speak({ auto = true, ms = 1500, text = "Hello, this is the agent." })
        session.first_done_at = timer.now()
        -- Nothing asked for a response since: a greeting now would be a second one.
        -- One would go out at the response's end: a second is ample.
        session.extra_create = session:wait_event("response.create", 1000)
        session:call_function("report_call", { summary = "Greeted once.", outcome = "success" })
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 100, text = "Bye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550130", prompt = "Greet." })
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "completed")
  local s = env.rt.sessions[1]
  T.ok(env.tw.calls[1].stream_started_at < s.first_done_at, "the stream started while the service's response was on")
  T.eq(s.extra_create, nil, "no greeting after the service's own response")
  local lines = {}
  for _, l in ipairs(call.transcript) do
    lines[#lines + 1] = l.role .. ": " .. l.text
  end
  T.eq(lines, { "agent: Hello, this is the agent.", "agent: Bye." })
end, { timeout = 40000 })

-- The model of the store-refusal tests: "Hello.", then each of lines once
-- the test has set session.go to its number, then the report and "Bye."
-- once session.go passes them.
local function held_script(lines)
  return function(session)
    assert(session:wait_event("response.create", 5000))
    session:speak({ ms = 200, text = "Hello." })
    for i = 1, #lines + 1 do
      while (session.go or 0) < i do
        timer.sleep(20)
      end
      if lines[i] then
        session:speak({ ms = 200, text = lines[i] })
      end
    end
    session:report_and_goodbye({ summary = "Booked.", outcome = "success" }, { ms = 100, text = "Bye." })
  end
end

T.test("a store that refuses writes at the call's end: the call is kept, written once it can be, notified once", function()
  -- The store is tried again every UNSAVED_RETRY_MS (5 s; here 0.4 s).
  T.shorten(calls, "UNSAVED_RETRY_MS", 400)
  local env = kit.start({ realtime = { script = held_script({}) } })
  local id = env:create({ to = "+14155550131", prompt = "Book it." })
  local s
  T.wait_for(function()
    s = env.rt.sessions[1]
    return s and #(s.responses or {}) > 0
  end, 5000, "the greeting")
  -- The disk stops taking writes (as when it is full): SQLite's query_only
  -- refuses every one, the transaction's BEGIN included.
  local db = env.app.store.db
  assert(db:exec("PRAGMA query_only = ON"))
  s.go = 1
  local view = env:wait(id, function(r)
    return r.status == "completed"
  end, 10000, "the call's end, as the engine has it")
  T.eq(view.report and view.report.outcome, "success", "the API shows the report it holds")
  timer.sleep(1000)
  T.eq(#env.hooks.received, 0, "no notification for an end the store does not have")
  T.eq(select(1, env.app.store:get_call(id)).status, "in_progress", "the store did not take it")
  assert(db:exec("PRAGMA query_only = OFF"))
  T.wait_for(function()
    return #env.hooks.received >= 1
  end, 10000, "the notification, once the end is written")
  local stored = env.app.store:get_call(id)
  T.eq(stored.status, "completed")
  T.eq(stored.report and stored.report.outcome, "success", "the report was written with it")
  T.eq(stored.attempts[1].status, "completed")
  local texts = {}
  for _, l in ipairs(stored.transcript) do
    texts[#texts + 1] = l.text
  end
  T.eq(texts, { "Hello.", "Bye." }, "the goodbye's line, refused at first, was written with the end")
  timer.sleep(1000) -- past two more retries: nothing more is written or sent
  T.eq(#env.hooks.received, 1, "notified once")
  T.eq(env.hooks.received[1].json.data.status, "completed")
end, { timeout = 60000 })

T.test("a backend without store:batch that refuses the call's end: kept and written later, notified only then", function()
  T.shorten(calls, "UNSAVED_RETRY_MS", 400) -- the store tried again every 0.4 s, not 5
  local env = kit.start({ realtime = { script = held_script({}) } })
  local store = env.app.store
  store.batch = false -- as a backend that has none: one write at a time
  local id = env:create({ to = "+14155550133", prompt = "Book it." })
  local s
  T.wait_for(function()
    s = env.rt.sessions[1]
    return s and #(s.responses or {}) > 0
  end, 5000, "the greeting")
  assert(store.db:exec("PRAGMA query_only = ON"))
  s.go = 1
  env:wait(id, function(r)
    return r.status == "completed"
  end, 10000, "the call's end, as the engine has it")
  timer.sleep(1000)
  T.eq(#env.hooks.received, 0, "no notification for an end the store does not have")
  assert(store.db:exec("PRAGMA query_only = OFF"))
  T.wait_for(function()
    return #env.hooks.received >= 1
  end, 10000, "the notification, once the end is written")
  local stored = store:get_call(id)
  T.eq({ stored.status, stored.report and stored.report.outcome }, { "completed", "success" })
  timer.sleep(1000) -- past two more retries
  T.eq(#env.hooks.received, 1, "notified once")
end, { timeout = 60000 })

T.test("a backend without store:batch that takes the notification but refuses the call's end: notified once the end is written", function()
  -- One write at a time: the notification's row goes in, the record's
  -- final write is refused (a moment's I/O error), and the end is written
  -- again UNSAVED_RETRY_MS later (5 s; here 0.4 s); its notification is sent
  -- then, not left to a sweep.
  T.shorten(calls, "UNSAVED_RETRY_MS", 400)
  local env = kit.start({ realtime = { script = held_script({}) } })
  local store = env.app.store
  store.batch = false
  local update, refuse = store.update_call, true
  store.update_call = function(st, cid, fields)
    if refuse and fields.completedAt then
      return nil, "EIO: disk I/O error"
    end
    return update(st, cid, fields)
  end
  local id = env:create({ to = "+14155550134", prompt = "Book it." })
  T.wait_for(function()
    return env.rt.sessions[1]
  end, 5000, "the model session")
  env.rt.sessions[1].go = 1
  env:wait(id, function(r)
    return r.status == "completed"
  end, 10000, "the call's end, as the engine has it")
  T.eq(#env.hooks.received, 0, "no notification for an end the store does not have")
  refuse = false
  T.wait_for(function()
    return #env.hooks.received >= 1
  end, 8000, "the notification, once the end is written")
  T.eq(store:get_call(id).status, "completed")
  T.eq(#env.hooks.received, 1, "notified once")
end, { timeout = 30000 })

T.test("a call hung up during its retry wait whose end the store refused at first is written without nextAttemptAt", function()
  T.shorten(calls, "UNSAVED_RETRY_MS", 400) -- the store tried again every 0.4 s, not 5
  local env = kit.start({
    twilio = { behaviour = "busy" },
    config = { retry = { maxAttempts = 3, initialDelayMs = 20000, backoffFactor = 1 } },
  })
  local id = env:create({ to = "+14155550135", prompt = "Say hello." })
  env:wait(id, function(r)
    return r.status == "queued" and r.nextAttemptAt ~= nil
  end, 10000, "the retry wait")
  local db = env.app.store.db
  assert(db:exec("PRAGMA query_only = ON"))
  T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
  T.eq(env:get(id).nextAttemptAt, nil, "none for the final call the process holds")
  assert(db:exec("PRAGMA query_only = OFF"))
  T.wait_for(function()
    return env.app.store:get_call(id).status == "canceled"
  end, 8000, "the end, written")
  local stored = env.app.store:get_call(id)
  T.eq({ stored.status, stored.endReason, stored.nextAttemptAt }, { "canceled", "canceled by API", nil },
    "a final call has no next attempt, in the store too")
  T.eq(env:get(id).nextAttemptAt, nil, "as the API shows it")
end, { timeout = 30000 })

T.test("a store that refuses writes mid-call: the lines and events it refused are written in order once it can", function()
  local env = kit.start({ realtime = { script = held_script({ "Line two." }) } })
  local id = env:create({ to = "+14155550132", prompt = "Book it." })
  local store = env.app.store
  T.wait_for(function()
    return #store:transcript(id) == 1
  end, 10000, "the greeting's line in the store")
  local db = store.db
  assert(db:exec("PRAGMA query_only = ON"))
  local s = env.rt.sessions[1]
  s.go = 1
  env:wait(id, function(r)
    return #r.transcript == 2
  end, 10000, "the second line in the API's view")
  T.eq(#store:transcript(id), 1, "the store refused it")
  assert(db:exec("PRAGMA query_only = OFF"))
  s.go = 2
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "completed")
  local stored = store:get_call(id)
  local texts = {}
  for _, l in ipairs(stored.transcript) do
    texts[#texts + 1] = l.text
  end
  T.eq(texts, { "Hello.", "Line two.", "Bye." }, "every line, once, in order")
  local statuses = {}
  for _, ev in ipairs(stored.events) do
    if ev.type == "status" then
      statuses[#statuses + 1] = ev.to
    end
  end
  T.eq(statuses[#statuses], "completed", "the status events end with the call's end")
  T.wait_for(function()
    return #env.hooks.received >= 1
  end, 5000, "the notification")
  T.eq(env.hooks.received[1].json.data.status, "completed")
end, { timeout = 60000 })

T.test("a response.create refused for another reason does not hold back the next one", function()
  local env = kit.start({
    tools = {
      { name = "lookup", description = "x", parameters = { type = "object", properties = {} },
        handler = function() return { ok = true } end },
    },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Hi." })
        session:refuse_next_create("server_error", "The server had an error.")
        session:call_function("lookup", {})
        assert(session:wait_event("response.create", 5000), "the refused one")
        -- The service starts a response of its own, with another call.
        session:call_function("lookup", {}, { auto = true })
        local out_at = timer.now()
        local ev = assert(session:wait_event("response.create", 5000), "the one after the second output")
        session.gap = ev.at - out_at
        session:report_and_goodbye({ summary = "x", outcome = "success" }, { ms = 100, text = "Bye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550130", prompt = "Explain." })
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "completed")
  local s = env.rt.sessions[1]
  T.eq(s.errors_sent[1] and s.errors_sent[1].code, "server_error")
  T.match(s.errors_sent[1].event_id, "^callagent_create_%d+$", "the error names the refused event")
  T.lt(s.gap, 1500, "sent at once, not when the refused one's 2 s window ends")
  T.match(call.lastError, "^model refused a response: server_error: The server had an error%.")
  for _, ev in ipairs(s.events) do
    if ev.type == "response.create" then
      T.match(ev.response.metadata.callagent, "^%d+$", "each response.create is numbered")
    end
  end
end, { timeout = 40000 })

T.test("a service that takes no response.metadata is asked without it, and the call goes on", function()
  local env = kit.start({
    realtime = {
      no_response_metadata = true,
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        assert(session:wait_event("response.create", 5000), "asked again")
        session:speak({ ms = 200, text = "Hi." })
        session:report_and_goodbye({ summary = "x", outcome = "success" }, { ms = 100, text = "Bye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550131", prompt = "Explain." })
  local call = env:wait_final(id, 20000)
  T.eq({ call.status, call.lastError }, { "completed", nil })
  local s = env.rt.sessions[1]
  T.eq(#s.errors_sent, 1, "one refusal")
  T.eq(s.errors_sent[1].param, "response.metadata")
  T.eq(#s.response_creates, 2, "the greeting's, asked again, and the goodbye's")
  T.eq(call.report.summary, "x")
end, { timeout = 40000 })

T.test("while the app stops, a new call is refused (503) and nothing is dialed", function()
  local env = kit.start({
    twilio = { update_delay_ms = 1500 }, -- the hang-up at stop takes a while
    realtime = { script = function() timer.sleep(20000) end },
  })
  env:create({ to = "+14155550134", prompt = "Stay on the line." })
  T.wait_for(function()
    return #env.rt.sessions >= 1
  end, 10000, "a live call")
  local stopped = false
  task.spawn(function()
    env.app:stop()
    stopped = true
  end)
  timer.sleep(200)
  T.eq(stopped, false, "stop still waits for the hang-up")
  local status, body = env:api("POST", "/v1/calls", { to = "+14155550135", prompt = "hi" })
  T.eq({ status, body.error.code }, { 503, "shutting_down" })
  T.wait_for(function()
    return stopped
  end, 5000, "stop done")
  T.eq(#env.tw.calls, 1, "no phone call placed while stopping")
end, { timeout = 30000 })

T.test("a session the model refuses, or never confirms, fails the call at once instead of a silent call", function()
  -- The wait for session.updated (10 s) shortened to 1 s.
  T.eq(T.shorten(bridge, "SESSION_READY_MS", 1000), 10000, "the product waits 10 s")
  for _, case in ipairs({
    { refuse = { "model_not_found", "The model gpt-nonesuch does not exist." }, error = "^model refused the session: model_not_found: The model" },
    { refuse = true, error = "^model did not confirm the session within 1 s" },
  }) do
    local env = kit.start({
      realtime = { refuse_update = case.refuse },
      config = { retry = { maxAttempts = 1 } },
    })
    local t0 = timer.now()
    local id = env:create({ to = "+14155550125", prompt = "Say hello." })
    local call = env:wait_final(id, 20000)
    T.eq({ call.status, call.endReason }, { "failed", "model_error" })
    T.match(call.lastError, case.error)
    T.lt(timer.now() - t0, 14000, "not at call.maxDurationSec")
    T.eq(#env.rt.sessions[1].response_creates, 0, "nothing asked of a session that was not set up")
    T.ok(env.tw.calls[1].hangup_requested_at, "Twilio was told to hang up")
    healthy(env)
  end
end, { timeout = 60000 })

T.test("a function call cut short (its response cancelled) is not run and is not the report", function()
  local env = kit.start({
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Hello." })
        -- As the service ends a function call whose response a barge-in cancelled.
        session:send({ type = "response.output_item.done", response_id = "resp_cut", output_index = 0, item = {
          id = "item_cut", type = "function_call", status = "incomplete", call_id = "call_cut", name = "report_call",
          arguments = '{"summary":"Half', } })
        session:send({ type = "response.done", response = { id = "resp_cut", status = "cancelled", output = {} } })
        timer.sleep(300)
        session:report_and_goodbye({ summary = "The whole report.", outcome = "success" }, { ms = 200, text = "Bye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550126", prompt = "Say hello." })
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "completed")
  T.eq({ call.report.summary, call.report.outcome }, { "The whole report.", "success" })
  local outputs = {}
  for _, o in ipairs(env.rt.sessions[1].function_outputs) do
    outputs[#outputs + 1] = o.call_id
  end
  T.eq(#outputs, 1, "one function output: " .. json.encode(outputs))
  T.ok(outputs[1] ~= "call_cut", "none for the call cut short")
end, { timeout = 30000 })

-- An app tool "lookup" that counts its runs (lookup.runs).
local function counted_lookup()
  local t = { name = "lookup", description = "x", parameters = { type = "object", properties = {} }, runs = 0 }
  t.handler = function()
    t.runs = t.runs + 1
    return { ok = true }
  end
  return t
end

T.test("function arguments that are no JSON object: no report stored, no tool run; the model is told and calls again", function()
  local lookup = counted_lookup()
  local env = kit.start({
    tools = { lookup },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Hello." })
        -- Cut off, an array, a string: each answered, none the report.
        session.outs = {}
        for _, bad in ipairs({ '{"summary":"Booked for Tuesday.","outcome":"success"', '["Booked"]', '"Booked"' }) do
          session.outs[#session.outs + 1] = session:call_function("report_call", bad)
          assert(session:wait_event("response.create", 5000), "a response after " .. bad)
        end
        session.tool_out = session:call_function("lookup", '{"q":')
        assert(session:wait_event("response.create", 5000))
        session.good_out = session:call_function("report_call", { summary = "Booked for Tuesday.", outcome = "success" })
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Bye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550133", prompt = "Book it." })
  local call = env:wait_final(id, 20000)
  local s = env.rt.sessions[1]
  local outs = {}
  for i, o in ipairs(s.outs) do
    outs[i] = json.decode(o)
  end
  local prefix = "^the arguments were not a JSON object %("
  T.eq(outs[1].ok, false)
  T.match(outs[1].error, prefix .. "invalid JSON: [^)]+%); call report_call again with valid JSON$")
  T.eq(outs[2], { ok = false, error = "the arguments were not a JSON object (they were an array); call report_call again with valid JSON" })
  T.eq(outs[3], { ok = false, error = "the arguments were not a JSON object (they were a string); call report_call again with valid JSON" })
  local tool_out = json.decode(s.tool_out)
  T.eq(tool_out.ok, nil)
  T.match(tool_out.error, prefix .. "invalid JSON: [^)]+%); call lookup again with valid JSON$")
  T.eq(lookup.runs, 0, "the tool's handler was not called")
  T.eq(json.decode(s.good_out).ok, true, "the valid report is taken: " .. s.good_out)
  T.eq({ call.status, call.endReason, call.report.summary, call.report.outcome },
    { "completed", "completed", "Booked for Tuesday.", "success" })
end, { timeout = 40000 })

T.test("report_call arguments that are no JSON object are logged with a short reason, not the arguments", function()
  local tw = assert(fake_twilio.start({ account_sid = kit.ACCOUNT, auth_token = kit.TOKEN }))
  local long = '{"summary":"' .. string.rep("very long summary ", 200)
  local rt = assert(require("fakes.realtime").start({ api_key = kit.API_KEY, script = function(session)
    assert(session:wait_event("response.create", 5000))
    session:speak({ ms = 200, text = "Hello." })
    session:call_function("report_call", long)
    assert(session:wait_event("response.create", 5000))
    session:report_and_goodbye({ summary = "x", outcome = "success" }, { ms = 200, text = "Bye." })
  end }))
  T.defer(function()
    tw:close()
    rt:close()
  end)
  local p, api = kit.app_process(tw, rt)
  local id = api:create({ to = "+14155550136", prompt = "Book it." })
  T.eq(api:wait_final(id, 20000).report.summary, "x")
  p:kill("SIGTERM")
  p:wait(5000)
  local log = p.errtext()
  T.match(log, "WARN function call arguments are not a JSON object [^\n]*call=" .. id .. "[^\n]*function=report_call[^\n]*reason=\"invalid JSON: ")
  T.no_match(log, "very long summary", "the arguments are not logged")
end, { timeout = 40000 })

T.test("model events that are no JSON object: the first logged, then only their count when the session ends", function()
  local tw = assert(fake_twilio.start({ account_sid = kit.ACCOUNT, auth_token = kit.TOKEN }))
  local rt = assert(require("fakes.realtime").start({ api_key = kit.API_KEY, script = function(session)
    assert(session:wait_event("response.create", 5000))
    for i = 1, 50 do
      session:send("not json " .. i)
    end
    session:speak({ ms = 200, text = "Hello." })
    session:report_and_goodbye({ summary = "x", outcome = "success" }, { ms = 200, text = "Bye." })
  end }))
  T.defer(function()
    tw:close()
    rt:close()
  end)
  local p, api = kit.app_process(tw, rt)
  local id = api:create({ to = "+14155550147", prompt = "Say hello." })
  local call = api:wait_final(id, 20000)
  T.eq({ call.status, call.endReason }, { "completed", "completed" }, "the call goes on")
  p:kill("SIGTERM")
  p:wait(5000)
  local log = p.errtext()
  local _, n = log:gsub("undecodable event ignored", "")
  T.eq(n, 1, "one line for the first: " .. log)
  T.match(log, "WARN realtime: undecodable event ignored, and any more like it [^\n]*attempt=1 call=" .. id
    .. " size=10")
  T.match(log, "WARN realtime: undecodable events were ignored [^\n]*call=" .. id .. " count=50")
end, { timeout = 40000 })

T.test("a function call cut short after its arguments.done is not run; one its response completes is", function()
  local lookup = counted_lookup()
  local env = kit.start({
    tools = { lookup },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Hello." })
        local function args_done(rid, cid, name, arguments)
          session:send({ type = "response.function_call_arguments.done", response_id = rid, item_id = "item_" .. cid,
            output_index = 0, call_id = cid, name = name, arguments = arguments })
        end
        -- A barge-in cancels a report: arguments.done with what was there,
        -- then its item incomplete and the response cancelled.
        session:send({ type = "response.created", response = { id = "resp_cut", status = "in_progress", output = {} } })
        args_done("resp_cut", "call_cut", "report_call", '{"summary":"Half')
        session:send({ type = "response.output_item.done", response_id = "resp_cut", output_index = 0, item = {
          id = "item_call_cut", type = "function_call", status = "incomplete", call_id = "call_cut", name = "report_call",
          arguments = '{"summary":"Half' } })
        session:send({ type = "response.done", response = { id = "resp_cut", status = "cancelled", output = {} } })
        -- A tool call whose response is cancelled with no output item at all.
        session:send({ type = "response.created", response = { id = "resp_cut2", status = "in_progress", output = {} } })
        args_done("resp_cut2", "call_cut2", "lookup", "{}")
        session:send({ type = "response.done", response = { id = "resp_cut2", status = "cancelled", output = {} } })
        timer.sleep(300)
        -- A report known only from its arguments.done, its response completed.
        session:send({ type = "response.created", response = { id = "resp_whole", status = "in_progress", output = {} } })
        args_done("resp_whole", "call_whole", "report_call", '{"summary":"The whole report.","outcome":"success"}')
        session:send({ type = "response.done", response = { id = "resp_whole", status = "completed", output = {} } })
        assert(session:wait_event("response.create", 5000), "the goodbye")
        session:speak({ ms = 200, text = "Bye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550137", prompt = "Say hello." })
  local call = env:wait_final(id, 20000)
  T.eq({ call.status, call.endReason, call.report.summary, call.report.outcome },
    { "completed", "completed", "The whole report.", "success" })
  T.eq(lookup.runs, 0, "the cut tool call was not run")
  local outputs = {}
  for _, o in ipairs(env.rt.sessions[1].function_outputs) do
    outputs[#outputs + 1] = { o.call_id, json.decode(o.output).ok }
  end
  T.eq(outputs, { { "call_whole", true } }, "one function output, for the whole report")
end, { timeout = 30000 })

T.test("a phone that never says what it played (no mark echoed) still has a silent callee wrapped up", function()
  -- A frozen mock-phone page, a stalled stream: the greeting is never
  -- confirmed played. The silence counts from its length and the slack (here
  -- 0.5 s) at the latest, not from never (the call held to maxDurationSec).
  T.shorten(bridge, "GREETING_PLAY_SLACK_MS", 500)
  local env = kit.start({
    twilio = { behaviour = { echo_marks = false } },
    config = { call = { silenceTimeoutSec = 1, wrapUpSec = 2, maxDurationSec = 30 } },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 400, text = "Hello, this is the agent." })
        session.wrap = session:wait_event("conversation.item.create", 20000)
        if session.wrap then
          session:report_and_goodbye({ summary = "Nobody there.", outcome = "no_answer" }, { ms = 100, text = "Bye." })
        end
      end,
    },
  })
  local t0 = timer.now()
  local id = env:create({ to = "+14155550139", prompt = "Say hello." })
  local call = env:wait_final(id, 30000)
  local took = timer.now() - t0
  local s = env.rt.sessions[1]
  T.ok(s.wrap, "the wrap-up message reached the model")
  T.match(s.wrap.item.content[1].text, "has not said anything")
  T.eq({ call.status, call.endReason, call.report.outcome }, { "completed", "completed", "no_answer" })
  T.lt(took, 12000, "well before call.maxDurationSec (30 s)")
end, { timeout = 40000 })

T.test("a refused greeting is asked for once more, and a silent callee is still wrapped up at call.silenceTimeoutSec", function()
  local env = kit.start({
    config = { call = { silenceTimeoutSec = 2, wrapUpSec = 2, maxDurationSec = 15 } },
    realtime = {
      script = function(session)
        session:refuse_next_create("server_error", "The server had an error.")
        -- Nothing is spoken: the model waits, as the service does.
        session.wrap = session:wait_event("conversation.item.create", 20000)
      end,
    },
  })
  local t0 = timer.now()
  local id = env:create({ to = "+14155550138", prompt = "Say hello." })
  local call = env:wait_final(id, 30000)
  local took = timer.now() - t0
  local s = env.rt.sessions[1]
  T.eq({ call.status, call.endReason }, { "completed", "callee_silent" })
  T.match(call.lastError, "^model refused a response: server_error: ")
  T.ok(s.wrap, "the wrap-up message reached the model")
  T.match(s.wrap.item.content[1].text, "has not said anything")
  T.gt(took, 3500, "silenceTimeoutSec (2 s) + wrapUpSec (2 s)")
  T.lt(took, 9000, "not at call.maxDurationSec (15 s)")
  local creates = {}
  for _, ev in ipairs(s.events) do
    if ev.type == "response.create" then
      creates[#creates + 1] = ev.at
    end
  end
  T.ge(#creates, 2, "the greeting was asked for again")
  -- Asked again a second after the refusal: not at once, and not with the
  -- wrap-up 2 s after the greeting (the room is for a loaded ASan run).
  T.ge(creates[2] - creates[1], 950, "a second after the refusal")
  T.lt(creates[2] - creates[1], 1800, "a second after the refusal, before the wrap-up")
end, { timeout = 40000 })

T.test("the model closing after the report lets the goodbye queued at the phone play, within call.goodbyeTimeoutSec", function()
  for _, case in ipairs({ { goodbye_ms = 2000, timeout = 8 }, { goodbye_ms = 6000, timeout = 1 } }) do
    local env = kit.start({
      config = { call = { goodbyeTimeoutSec = case.timeout } },
      realtime = {
        script = function(session)
          assert(session:wait_event("response.create", 5000))
          session:speak({ ms = 200, text = "Hi." })
          session:call_function("report_call", { summary = "x", outcome = "success" })
          session.report_at = timer.now()
          assert(session:wait_event("response.create", 5000))
          -- All of it at once, faster than real time, as the service sends it.
          session:speak({ ms = case.goodbye_ms, pace = false, text = "Thanks so much for your time, goodbye." })
          session.closed_at = timer.now()
          session:close(1000, "bye")
        end,
      },
    })
    local id = env:create({ to = "+14155550139", prompt = "x" })
    local call = env:wait_final(id, 20000)
    T.eq({ call.status, call.endReason, call.report.summary }, { "completed", "completed", "x" })
    local tw, s = env.tw.calls[1], env.rt.sessions[1]
    local last = tw.marks_sent[#tw.marks_sent]
    if case.timeout == 8 then
      T.ge(tw.hangup_requested_at, last.due - 200, "hung up once the goodbye played")
      T.gt(tw.hangup_requested_at - s.closed_at, 1500, "not at the close")
    else
      T.lt(tw.hangup_requested_at - s.report_at, case.timeout * 1000 + 800, "hung up at call.goodbyeTimeoutSec")
      T.lt(tw.hangup_requested_at, last.due - 3000, "while the goodbye still played")
    end
  end
end, { timeout = 60000 })

T.test("a recoverable model error is recorded and the call goes on", function()
  local env = kit.start({
    -- No goodbye is said: the goodbye's bound (1 s, not the kit's 3) ends the call.
    config = { call = { goodbyeTimeoutSec = 1 } },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:error("rate_limit_exceeded", "Slow down a bit", "rate_limit_error")
        session:speak({ ms = 200, text = "Still here." })
        session:call_function("report_call", { summary = "Fine.", outcome = "success" })
        session:wait_event("response.create", 5000)
      end,
    },
  })
  local id = env:create({ to = "+14155550125", prompt = "Say hello." })
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "completed")
  T.eq(call.report.outcome, "success")
  T.match(call.lastError, "rate_limit_exceeded")
end, { timeout = 30000 })

-- A model that greets, then ignores the wrap-up request (kept in
-- session.wrap, waited for up to wait_ms): the call is hung up anyway.
local function talks_on(wait_ms)
  return function(session)
    assert(session:wait_event("response.create", 5000))
    session:speak({ ms = 300, text = "Let me tell you everything." })
    session.wrap = session:wait_event("conversation.item.create", wait_ms)
  end
end

T.test("at call.maxDurationSec the agent is asked to wrap up, then the call is hung up", function()
  local env = kit.start({
    config = { call = { maxDurationSec = 1, wrapUpSec = 1 } },
    realtime = {
      script = talks_on(5000),
    },
  })
  local id = env:create({ to = "+14155550126", prompt = "Talk forever." })
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "completed")
  T.eq(call.endReason, "max_duration")
  T.match(call.lastError, "maximum call duration")
  local wrap = env.rt.sessions[1].wrap
  T.ok(wrap, "a wrap-up message reached the model")
  T.eq(wrap.item.role, "system")
  T.match(wrap.item.content[1].text, "time for this call is up")
end, { timeout = 30000 })

-- The model's session limit (openai.sessionMaxSec): 10 s here, wrapUpSec and
-- goodbyeTimeoutSec 2 s each, so 6 s are left and the margin is half of
-- them: the wrap-up is asked for 3 s after the session opened. The fake
-- model's session expires at 10 s, as OpenAI's does at 60 minutes.
local SESSION_LIMIT = {
  config = { openai = { sessionMaxSec = 10 }, call = { maxDurationSec = 600, wrapUpSec = 2, goodbyeTimeoutSec = 2 } },
  session_max_ms = 10000,
}

-- The system messages the model got.
local function system_messages(s)
  local list = {}
  for _, ev in ipairs(s.events) do
    if ev.type == "conversation.item.create" and type(ev.item) == "table" and ev.item.role == "system" then
      list[#list + 1] = ev
    end
  end
  return list
end

T.test("before the model's session limit the agent is asked to wrap up, reports and says goodbye", function()
  local env = kit.start({
    config = SESSION_LIMIT.config,
    realtime = {
      session_max_ms = SESSION_LIMIT.session_max_ms,
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 300, text = "Let us talk for hours." })
        session.wrap = session:wait_event("conversation.item.create", 15000)
        assert(session:wait_event("response.create", 5000), "the wrap-up's response")
        session:report_and_goodbye({ summary = "Talked until the session's limit.", outcome = "success" },
          { ms = 500, text = "Thank you, goodbye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550140", prompt = "Talk forever." })
  local call = env:wait_final(id, 20000)
  local s, tw = env.rt.sessions[1], env.tw.calls[1]
  T.eq(s.script_error, nil)
  T.eq({ call.status, call.endReason, call.report and call.report.summary },
    { "completed", "completed", "Talked until the session's limit." })
  T.eq(call.lastError, "model session ends soon (openai.sessionMaxSec 10 s)")
  T.eq(#system_messages(s), 1, "one wrap-up message")
  T.match(s.wrap.item.content[1].text, "time for this call is up")
  T.near(s.wrap.at - s.opened_at, 3000, 700, "sessionMaxSec - wrapUpSec - goodbyeTimeoutSec - margin")
  local said = {}
  for _, line in ipairs(call.transcript) do
    said[#said + 1] = line.role .. ": " .. line.text
  end
  T.eq(said[#said], "agent: Thank you, goodbye.", "the goodbye was said")
  T.lt(tw.hangup_requested_at - s.opened_at, 10000, "hung up before the session's end")
  T.eq(s.expired_at, nil, "the session never expired")
end, { timeout = 30000 })

T.test("a model that does not report before its session limit is hung up with session_limit, before the session ends", function()
  local env = kit.start({
    config = SESSION_LIMIT.config,
    realtime = {
      session_max_ms = SESSION_LIMIT.session_max_ms,
      script = talks_on(15000),
    },
  })
  local id = env:create({ to = "+14155550141", prompt = "Talk forever." })
  local call = env:wait_final(id, 20000)
  local s, tw = env.rt.sessions[1], env.tw.calls[1]
  T.eq({ call.status, call.endReason, call.report }, { "completed", "session_limit", nil })
  T.eq(call.attempts[1].reason, "session_limit")
  T.eq(call.lastError, "model session ends soon (openai.sessionMaxSec 10 s)")
  T.ok(s.wrap, "a wrap-up message reached the model")
  -- Not at the wrap-up (3 s), nor after goodbyeTimeoutSec more (7 s).
  T.ge(tw.hangup_requested_at - s.opened_at, 4200, "at the wrap-up (3 s) + wrapUpSec (2 s)")
  T.lt(tw.hangup_requested_at - s.opened_at, 6500, "at the wrap-up (3 s) + wrapUpSec (2 s)")
  T.eq(s.expired_at, nil, "the session never expired")
end, { timeout = 30000 })

T.test("call.maxDurationSec before the session limit: its wrap-up goes on, and the session limit adds nothing", function()
  -- sessionMaxSec 15, wrapUpSec 6, goodbyeTimeoutSec 2: the session's
  -- wrap-up would be asked for at 3.5 s. The maximum duration (1 s) comes
  -- first, and the model reports at 4.5 s, after that.
  local env = kit.start({
    config = { openai = { sessionMaxSec = 15 }, call = { maxDurationSec = 1, wrapUpSec = 6, goodbyeTimeoutSec = 2 } },
    realtime = {
      session_max_ms = 15000,
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 300, text = "Let us talk for hours." })
        session.wrap = session:wait_event("conversation.item.create", 5000)
        assert(session:wait_event("response.create", 5000), "the wrap-up's response")
        timer.sleep(math.max(0, session.opened_at + 4500 - timer.now()))
        session:report_and_goodbye({ summary = "Out of time.", outcome = "success" }, { ms = 300, text = "Bye now." })
      end,
    },
  })
  local id = env:create({ to = "+14155550142", prompt = "Talk forever." })
  local call = env:wait_final(id, 20000)
  local s = env.rt.sessions[1]
  T.eq(s.script_error, nil)
  T.eq({ call.status, call.endReason, call.report and call.report.summary }, { "completed", "completed", "Out of time." })
  T.eq(call.lastError, "maximum call duration reached (1 s)", "not the session limit's")
  T.eq(#system_messages(s), 1, "one wrap-up message")
  T.lt(s.wrap.at - s.opened_at, 3000, "at call.maxDurationSec (1 s), not at the session's wrap-up (3.5 s)")
end, { timeout = 30000 })

T.test("a session that expires after the report lets the goodbye queued at the phone play, and the call completes", function()
  -- A service whose limit (2 s) is shorter than openai.sessionMaxSec says.
  local env = kit.start({
    config = { call = { goodbyeTimeoutSec = 8 } },
    realtime = {
      session_max_ms = 2000,
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Hi." })
        session:call_function("report_call", { summary = "Quick.", outcome = "success" })
        assert(session:wait_event("response.create", 5000))
        -- All of it at once, faster than real time: it plays past the expiry.
        session:speak({ ms = 4000, pace = false, text = "Thanks so much for your time, goodbye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550143", prompt = "x" })
  local call = env:wait_final(id, 20000)
  local s, tw = env.rt.sessions[1], env.tw.calls[1]
  T.ok(s.expired_at, "the session expired")
  T.eq({ call.status, call.endReason, call.report.summary }, { "completed", "completed", "Quick." })
  T.match(call.lastError, "session_expired")
  local last = tw.marks_sent[#tw.marks_sent]
  T.gt(last.due, s.expired_at + 500, "the goodbye still played at the expiry")
  T.ge(tw.hangup_requested_at, last.due - 200, "hung up once the goodbye played")
end, { timeout = 30000 })

T.test("a callee who never speaks: the agent is told, reports no_answer, and the call ends", function()
  local env = kit.start({
    -- No goodbye is said: the goodbye's bound (1 s, not the kit's 3) ends the call.
    config = { call = { silenceTimeoutSec = 1, wrapUpSec = 3, goodbyeTimeoutSec = 1 } },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Hello? Anyone there?" })
        local msg = session:wait_event("conversation.item.create", 5000)
        session.silence_msg = msg
        session:wait_event("response.create", 5000)
        session:call_function("report_call", { summary = "Nobody spoke.", outcome = "no_answer" })
        session:wait_event("response.create", 5000)
      end,
    },
  })
  local id = env:create({ to = "+14155550127", prompt = "Say hello." })
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "completed")
  T.eq(call.report.outcome, "no_answer")
  T.match(env.rt.sessions[1].silence_msg.item.content[1].text, "has not said anything")
end, { timeout = 30000 })

T.test("an answered call whose media stream never comes is hung up after STREAM_WAIT_MS and fails", function()
  -- The voice webhook is answered, the stream never connects, and the final
  -- callback is lost: nothing but the wait for the stream ends the attempt.
  -- That wait (15 s) shortened to 2 s.
  T.eq(T.shorten(calls, "STREAM_WAIT_MS", 2000), 15000, "the product waits 15 s")
  local env = kit.start({ twilio = { behaviour = { stream = false, lost_callbacks = { completed = true } } } })
  local id = env:create({ to = "+14155550130", prompt = "Say hello." })
  local tw = env.tw:wait_call(5000)
  T.wait_for(function()
    return tw.voice_request ~= nil
  end, 5000, "the voice webhook")
  local call = env:wait_final(id, 20000)
  T.eq(call.status, "failed")
  T.eq(call.endReason, "no_stream")
  T.eq(call.lastError, "no media stream 2 s after the answer")
  T.eq(#call.attempts, 1, "an answered call is not dialed again")
  assert(tw:wait_final(3000), "the call over at Twilio")
  T.eq(tw.end_reason, "api", "hung up through the API")
  T.near((tw.ended_at - tw.answered_at) / 1000, 2, 1, "STREAM_WAIT_MS after the answer")
  healthy(env)
end, { timeout = 40000 })


T.test("an answered call whose voice webhook never reached callagent fails: the callee did not hang up on the agent", function()
  -- Twilio answers, its voice webhook cannot reach callagent (Twilio then
  -- plays its error message and hangs up), and the completed callback comes.
  local env = kit.start({ twilio = { public_url_rewrite = function(u)
    return u:find("/voice?", 1, true) and u:gsub("^(http://[^/:]+):%d+", "%1:9") or u
  end } })
  local id = env:create({ to = "+14155550131", prompt = "Say hello." })
  local tw = env.tw:wait_call(5000)
  local call = env:wait_final(id, 10000)
  T.ok(tw.voice_request and tw.voice_request.error, "the voice webhook failed")
  T.eq(call.status, "failed")
  T.eq(call.endReason, "no_stream")
  T.match(call.lastError, "before its media stream came")
  T.eq(#call.attempts, 1, "an answered call is not dialed again")
  T.eq(call.attempts[1].reason, "no_stream")
  healthy(env)
end)

T.test("an answered call whose media stream cannot connect fails (no_stream): the callee did not hang up on the agent", function()
  -- The voice webhook is answered, Twilio cannot open the stream (its URL
  -- unreachable: a tunnel or TLS fault), so its <Connect> ends and Twilio
  -- ends the call; the completed callback comes.
  local env = kit.start({ twilio = { public_url_rewrite = function(u)
    return u:find("/voice/stream", 1, true) and u:gsub("^(wss?://[^/:]+):%d+", "%1:9") or u
  end } })
  local id = env:create({ to = "+14155550132", prompt = "Say hello." })
  local tw = env.tw:wait_call(5000)
  local call = env:wait_final(id, 10000)
  T.eq(tw.end_reason, "stream_failed", "Twilio could not open the stream")
  T.eq({ call.status, call.endReason, call.attempts[1].reason }, { "failed", "no_stream", "no_stream" })
  T.match(call.lastError, "before its media stream came")
  T.eq(#call.attempts, 1, "an answered call is not dialed again")
  healthy(env)
end)

T.test("a call hung up through the API before its stream, with the final callback lost, ends", function()
  -- Answered (the callback came), the voice webhook still on its way: there
  -- is no conversation to end yet, and Twilio's completed callback is lost.
  -- The wait for the provider's final status (10 s) shortened to 2 s.
  T.eq(T.shorten(calls, "HANGUP_WAIT_MS", 2000), 10000, "the product waits 10 s")
  local env = kit.start({
    twilio = { behaviour = { voice_delay_ms = 3000, lost_callbacks = { completed = true } } },
  })
  local id = env:create({ to = "+14155550131", prompt = "Say hello." })
  env:wait(id, function(r)
    return r.status == "in_progress"
  end, 5000, "answered")
  local asked = timer.now()
  T.eq((env:api("POST", "/v1/calls/" .. id .. "/hangup")), 202)
  local call = env:wait_final(id, 15000)
  T.eq(call.status, "completed")
  T.eq(call.endReason, "hung_up_by_api")
  T.near((timer.now() - asked) / 1000, 2, 1, "HANGUP_WAIT_MS after the hang-up, without the provider's final status")
  local tw = env.tw.calls[1]
  T.eq(tw.end_reason, "api")
  T.eq(tw.voice_request, nil, "over before the voice webhook")
end, { timeout = 30000 })

-- A call whose stream runs, the greeting heard: its fake Twilio call.
local function streaming_call(env, to)
  local id = env:create({ to = to, prompt = "Say hello." })
  local tw = env.tw:wait_call(5000)
  assert(tw:wait_stream(5000), "the stream")
  env:wait(id, function(r)
    return #(r.transcript or {}) >= 1
  end, 5000, "the greeting")
  return id, tw
end

T.test("a media stream message over max_ws_message ends the call failed (stream_error), not as the callee hanging up", function()
  local env = kit.start({})
  local id, tw = streaming_call(env, "+14155550141")
  -- A media event of 256 KiB and more: the server closes the stream, 1009.
  assert(tw.ws:send(json.encode({ event = "media", streamSid = tw.stream_sid,
    media = { track = "inbound", payload = string.rep("A", 256 * 1024) } })))
  local call = env:wait_final(id, 15000)
  T.eq({ call.status, call.endReason }, { "failed", "stream_error" })
  T.eq(call.lastError, "media stream closed: message too big (1009)")
  T.eq(#call.attempts, 1, "an answered call is not dialed again")
  T.eq({ call.attempts[1].status, call.attempts[1].reason }, { "failed", "stream_error" })
  -- The vendor call is over: Twilio's <Connect><Stream> ends with its stream.
  assert(tw:wait_closed(5000), "the call over at Twilio")
  T.eq({ tw.stream_closed.code, tw.stream_closed.by }, { 1009, "app" })
  T.eq(tw.final, "completed")
  T.wait_for(function()
    return #env.hooks.received >= 1
  end, 5000, "notification")
  timer.sleep(300)
  T.eq(#env.hooks.received, 1, "notified once")
  T.eq({ env.hooks.received[1].json.data.status, env.hooks.received[1].json.data.endReason },
    { "failed", "stream_error" })
  healthy(env)
end, { timeout = 30000 })

T.test("a stream closed for a fault before the model session was ready: lastError names the fault, not the phone side", function()
  local env = kit.start({
    realtime = {
      refuse_update = { "rate_limit_exceeded", "Rate limit reached. Please try again in 1.5s.", sessions = 4 },
    },
  })
  local id = env:create({ to = "+14155550146", prompt = "Say hello." })
  local tw = env.tw:wait_call(5000)
  assert(tw:wait_stream(5000), "the stream")
  T.wait_for(function()
    return env.rt.sessions[1] and env.rt.sessions[1].closed
  end, 5000, "the first session refused")
  tw.ws:close(1002, "bad frame")
  local call = env:wait_final(id, 15000)
  T.eq({ call.status, call.endReason, #call.attempts }, { "failed", "stream_error", 1 })
  T.eq(call.lastError, "media stream closed: protocol error (1002: bad frame)")
end, { timeout = 30000 })

T.test("the phone closing its stream: 1000 or a lost connection is the callee hanging up, its 1011 a stream error", function()
  local env = kit.start({})
  local cases = {
    { to = "+14155550142", close = function(c) c:close(1000, "bye") end, status = "completed",
      reason = "callee_hung_up" },
    { to = "+14155550143", close = function(c) c:abort() end, status = "completed", reason = "callee_hung_up" },
    { to = "+14155550144", close = function(c) c:close(1011, "media server fault") end, status = "failed",
      reason = "stream_error", err = "media stream closed: internal error (1011: media server fault)" },
  }
  for _, case in ipairs(cases) do
    local id, tw = streaming_call(env, case.to)
    case.close(tw.ws)
    local call = env:wait_final(id, 15000)
    T.eq({ call.status, call.endReason, #call.attempts }, { case.status, case.reason, 1 }, case.to)
    T.eq(call.lastError, case.err, case.to)
  end
  healthy(env)
end, { timeout = 30000 })

T.test("the phone closing its stream with 1008 (a policy violation, as callagent drops a peer too slow to read) is a stream error, not the callee hanging up", function()
  local env = kit.start({})
  local id, tw = streaming_call(env, "+14155550145")
  tw.ws:close(1008, "send queue full: peer too slow")
  local call = env:wait_final(id, 15000)
  T.eq({ call.status, call.endReason, #call.attempts }, { "failed", "stream_error", 1 })
  T.eq(call.lastError, "media stream closed: policy violation (1008: send queue full: peer too slow)")
  T.eq({ call.attempts[1].status, call.attempts[1].reason }, { "failed", "stream_error" })
  healthy(env)
end, { timeout = 30000 })

T.test("a stream closed with 1011 after the vendor's stop is the callee hanging up, not a stream error", function()
  local env = kit.start({})
  local id, tw = streaming_call(env, "+14155550148")
  -- The vendor said the stream stopped (the call ended there); how its
  -- socket then closes is no fault of the call's.
  assert(tw.ws:send(json.encode({ event = "stop", sequenceNumber = "999", streamSid = tw.stream_sid,
    stop = { accountSid = kit.ACCOUNT, callSid = tw.sid } })))
  tw.ws:close(1011, "teardown")
  local call = env:wait_final(id, 15000)
  T.eq({ call.status, call.endReason, #call.attempts }, { "completed", "callee_hung_up", 1 })
  T.eq(call.lastError, nil, "no stream error")
  healthy(env)
end, { timeout = 30000 })

T.test("a stream closed with 1011 during the goodbye after the report: completed with the report, notified once", function()
  local env = kit.start({
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Hello." })
        session:report_and_goodbye({ summary = "Booked.", outcome = "success" }, { ms = 4000, text = "Goodbye now." })
      end,
    },
  })
  local id = env:create({ to = "+14155550149", prompt = "Say hello." })
  local tw = env.tw:wait_call(5000)
  assert(tw:wait_stream(5000), "the stream")
  env:wait(id, function(r)
    return r.report ~= nil
  end, 10000, "the report")
  timer.sleep(300) -- the goodbye plays
  tw.ws:close(1011, "media server fault")
  local call = env:wait_final(id, 15000)
  T.eq({ call.status, call.endReason, #call.attempts }, { "completed", "stream_error", 1 })
  T.eq(call.report.summary, "Booked.")
  T.eq(call.lastError, "media stream closed: internal error (1011: media server fault)")
  T.wait_for(function()
    return #env.hooks.received >= 1
  end, 5000, "notification")
  timer.sleep(300)
  T.eq(#env.hooks.received, 1, "notified once")
  T.eq(env.hooks.received[1].json.data.status, "completed")
end, { timeout = 30000 })

T.run()
