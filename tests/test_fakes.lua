-- The fake outside world (tests/fakes): the OpenAI Realtime (GA) server,
-- Twilio (REST, call progress, Media Streams) and Telnyx's media stream, driven through the real
-- callagent clients and a tiny stand-in app, so engine tests can trust them.
local T = require "testing"
local ws = require "callagent.ws"
local fetch = require "callagent.fetch"
local url = require "callagent.url"
local json = require "callagent.json"
local task = require "callagent.task"
local timer = require "callagent.timer"
local crypto = require "callagent.crypto"
local audio = require "callagent.audio"
local certs = require "certs"
local realtime = require "fakes.realtime"
local twilio = require "fakes.twilio"

local now = timer.now
local KEY = "sk-test"

-- Realtime helpers ----------------------------------------------------------------

local function start_rt(opts)
  opts = opts or {}
  opts.api_key = opts.api_key or KEY
  local rt = assert(realtime.start(opts))
  T.defer(function()
    rt:close()
  end)
  return rt
end

local function rt_connect(rt, opts)
  opts = opts or {}
  local conn, err = ws.connect(rt.url .. "?model=" .. (opts.model or "gpt-realtime"), {
    headers = opts.headers or { Authorization = "Bearer " .. KEY },
  })
  if conn then
    T.defer(function()
      conn:close()
    end)
  end
  return conn, err
end

-- The next event, decoded; a close shows up as {type = "<close>", code, reason}.
local function next_event(conn, timeout)
  local kind, data, reason = conn:receive(timeout or 3000)
  if kind == "text" then
    local ev = json.decode(data)
    ev._at = now()
    ev._raw = data
    return ev
  elseif kind == "close" then
    return { type = "<close>", code = data, reason = reason, _at = now() }
  end
  error("no event from the server: " .. tostring(data), 2)
end

-- Events up to and including the first of type typ.
local function until_event(conn, typ, timeout)
  local list = {}
  local deadline = now() + (timeout or 5000)
  while true do
    local ev = next_event(conn, math.max(1, deadline - now()))
    list[#list + 1] = ev
    if ev.type == typ then
      return ev, list
    end
    if ev.type == "<close>" then
      error("closed while waiting for " .. typ, 2)
    end
  end
end

local function types(list)
  local out = {}
  for _, ev in ipairs(list) do
    out[#out + 1] = ev.type
  end
  return out
end

local function index_of(list, typ)
  for i, ev in ipairs(list) do
    if ev.type == typ then
      return i
    end
  end
end

local function send(conn, ev)
  assert(conn:send(json.encode(ev)))
end

local function ga_session(extra)
  local s = {
    type = "realtime",
    instructions = "Be brief.",
    output_modalities = { "audio" },
    audio = {
      input = {
        format = { type = "audio/pcmu" },
        turn_detection = { type = "server_vad", interrupt_response = true, create_response = true },
      },
      output = { format = { type = "audio/pcmu" }, voice = "marin" },
    },
  }
  for k, v in pairs(extra or {}) do
    s[k] = v
  end
  return s
end

-- Connects, reads session.created, applies a GA pcmu session; returns conn.
local function ready(rt, extra)
  local c = assert(rt_connect(rt))
  T.eq(next_event(c).type, "session.created")
  send(c, { type = "session.update", session = ga_session(extra) })
  T.eq(next_event(c).type, "session.updated")
  return c
end

local function delta_audio(list)
  local parts = {}
  for _, ev in ipairs(list) do
    if ev.type == "response.output_audio.delta" then
      parts[#parts + 1] = assert(crypto.base64_decode(ev.delta))
    end
  end
  return table.concat(parts), #parts
end

-- Realtime ------------------------------------------------------------------------

T.test("realtime: session.created comes first; model, headers and a merged GA session.update are recorded and echoed", function()
  local rt = start_rt({ script = function() end })
  local c = assert(rt_connect(rt, { model = "gpt-realtime-mini" }))
  local ev = next_event(c)
  T.eq(ev.type, "session.created")
  T.match(ev.event_id, "^event_")
  T.match(ev.session.id, "^sess_")
  T.eq(ev.session.type, "realtime")
  T.eq(ev.session.model, "gpt-realtime-mini")
  T.eq(ev.session.audio.output.format, { type = "audio/pcm", rate = 24000 })
  T.match(ev._raw, '"tools":%[%]', "an empty tools array stays an array")
  send(c, { type = "session.update", event_id = "evt_client_1", session = ga_session() })
  local up = next_event(c)
  T.eq(up.type, "session.updated")
  T.eq(up.session.audio.output.format, { type = "audio/pcmu" })
  T.eq(up.session.audio.input.format, { type = "audio/pcmu" })
  T.eq(up.session.audio.output.voice, "marin")
  T.eq(up.session.audio.output.speed, 1, "untouched fields of audio.output stay")
  T.eq(up.session.instructions, "Be brief.")
  T.eq(up.session.id, ev.session.id)
  local s = rt:wait_session(1000)
  T.eq(s, rt.sessions[1])
  T.eq(s.model, "gpt-realtime-mini")
  T.eq(s.headers.authorization, "Bearer sk-test")
  T.eq(s.config.audio.output.voice, "marin")
  T.eq(s.updates, 1)
  T.eq(s.events[1].type, "session.update")
  T.eq(s.events[1].event_id, "evt_client_1")
  T.eq(type(s.events[1].at), "number")
  local _, err = rt:wait_session(20)
  T.eq(err, "ETIMEDOUT", "no second session")
end)

T.test("realtime: a wrong or missing API key gets invalid_api_key and close 1008 right after open", function()
  local rt = start_rt()
  for i, headers in ipairs({ { Authorization = "Bearer sk-wrong" }, {} }) do
    local c = assert(rt_connect(rt, { headers = headers }))
    local ev = next_event(c)
    T.eq(ev.type, "error", "connection " .. i)
    T.eq(ev.error.type, "invalid_request_error")
    T.eq(ev.error.code, "invalid_api_key")
    local cl = next_event(c)
    T.eq(cl.type, "<close>")
    T.eq(cl.code, 1008)
  end
  T.eq(#rt.sessions, 2)
  T.eq(rt.sessions[1].rejected, "invalid_api_key")
  T.eq(rt.sessions[2].rejected, "invalid_api_key")
  T.eq(rt.sessions[1].script_done, nil, "no script for a rejected session")
end)

T.test("realtime: the OpenAI-Beta: realtime=v1 header is refused with beta_api_shape_disabled and a close", function()
  local rt = start_rt()
  local c = assert(rt_connect(rt, { headers = { Authorization = "Bearer " .. KEY, ["OpenAI-Beta"] = "realtime=v1" } }))
  local ev = next_event(c)
  T.eq(ev.type, "error")
  T.eq(ev.error.code, "beta_api_shape_disabled")
  T.eq(next_event(c).code, 1008)
  T.eq(rt.sessions[1].rejected, "beta_api_shape_disabled")
end)

T.test("realtime: session.update without type or with beta-only fields is rejected with the GA error and not applied", function()
  local rt = start_rt({ script = function() end })
  local c = assert(rt_connect(rt))
  next_event(c)
  local cases = {
    { { instructions = "x" }, "missing_required_parameter", "session.type" },
    { { type = "realtime", voice = "alloy" }, "unknown_parameter", "session.voice" },
    { { type = "realtime", input_audio_format = "g711_ulaw" }, "unknown_parameter", "session.input_audio_format" },
    { { type = "realtime", output_audio_format = "g711_ulaw" }, "unknown_parameter", "session.output_audio_format" },
    { { type = "realtime", input_audio_transcription = { model = "whisper-1" } }, "unknown_parameter",
      "session.input_audio_transcription" },
    { { type = "realtime", turn_detection = { type = "server_vad" } }, "unknown_parameter", "session.turn_detection" },
    { { type = "realtime", modalities = { "audio", "text" } }, "unknown_parameter", "session.modalities" },
    { { type = "realtime", temperature = 0.8 }, "unknown_parameter", "session.temperature" },
    { { type = "realtime", audio = { output = { format = { type = "pcm16" } } } }, "invalid_value",
      "session.audio.output.format.type" },
    { { type = "realtime", audio = { output = { voice = "nova" } } }, "invalid_value", "session.audio.output.voice" },
    { { type = "realtime", output_modalities = { "audio", "text" } }, "invalid_value", "session.output_modalities" },
    { { type = "realtime", audio = { input = { turn_detection = { type = "server_vad", silence_duration = 500 } } } },
      "unknown_parameter", "session.audio.input.turn_detection.silence_duration" },
    { { type = "realtime", audio = { input = { transcription = { model = "whisper-1", enabled = true } } } },
      "unknown_parameter", "session.audio.input.transcription.enabled" },
  }
  for i, case in ipairs(cases) do
    case[1].instructions = "must not apply"
    send(c, { type = "session.update", event_id = "evt_" .. i, session = case[1] })
    local ev = next_event(c)
    T.eq(ev.type, "error", "case " .. i)
    T.eq(ev.error.code, case[2], "case " .. i)
    T.eq(ev.error.param, case[3], "case " .. i)
    T.eq(ev.error.event_id, "evt_" .. i, "case " .. i)
  end
  local s = rt.sessions[1]
  T.eq(s.config.instructions, "", "nothing applied")
  T.eq(s.updates, 0)
  send(c, { type = "session.update", session = ga_session() })
  T.eq(next_event(c).type, "session.updated")
  send(c, { type = "no.such.event" })
  local ev = next_event(c)
  T.eq(ev.error.code, "invalid_value")
  T.eq(ev.error.param, "type")
end)

T.test("realtime: tools and message items not in the GA shape are refused with the field named", function()
  local rt = start_rt({ script = function() end })
  local c = assert(rt_connect(rt))
  next_event(c)
  local lookup = { name = "lookup", parameters = { type = "object", properties = { id = { type = "string" } } } }
  local cases = {
    -- Chat Completions' nesting, not the Realtime one.
    { "session.update", { session = { type = "realtime", tools = { { type = "function", ["function"] = lookup } } } },
      "unknown_parameter", "session.tools[0].function" },
    { "session.update", { session = { type = "realtime", tools = { { type = "function", description = "x" } } } },
      "missing_required_parameter", "session.tools[0].name" },
    { "session.update", { session = { type = "realtime", tools = { { type = "retrieval", name = "x" } } } },
      "invalid_value", "session.tools[0].type" },
    { "response.create", { response = { tools = { { type = "function", ["function"] = lookup } } } },
      "unknown_parameter", "response.tools[0].function" },
    { "conversation.item.create", { item = { type = "message", role = "user", content = { { type = "text", text = "hi" } } } },
      "invalid_value", "item.content[0].type" },
    { "conversation.item.create", { item = { type = "message", role = "system",
      content = { { type = "input_text", text = "a" }, { type = "output_text", text = "b" } } } },
      "invalid_value", "item.content[1].type" },
    { "conversation.item.create", { item = { type = "message", role = "developer",
      content = { { type = "input_text", text = "a" } } } }, "invalid_value", "item.role" },
    { "conversation.item.create", { item = { type = "message", role = "user" } }, "missing_required_parameter",
      "item.content" },
  }
  for i, case in ipairs(cases) do
    local ev = case[2]
    ev.type, ev.event_id = case[1], "evt_" .. i
    send(c, ev)
    local got = next_event(c)
    T.eq(got.type, "error", "case " .. i)
    T.eq({ got.error.code, got.error.param, got.error.event_id }, { case[3], case[4], "evt_" .. i }, "case " .. i)
  end
  local s = rt.sessions[1]
  T.eq({ s.updates, #s.response_creates }, { 0, 0 }, "nothing applied")
  -- The shapes callagent sends are taken.
  send(c, { type = "session.update", session = { type = "realtime",
    tools = { { type = "function", name = "lookup", description = "x", parameters = lookup.parameters } } } })
  T.eq(next_event(c).type, "session.updated")
  for _, role in ipairs({ "system", "user" }) do
    send(c, { type = "conversation.item.create", item = { type = "message", role = role,
      content = { { type = "input_text", text = "a" } } } })
    T.eq(next_event(c).type, "conversation.item.added", role)
    T.eq(next_event(c).type, "conversation.item.done", role)
  end
end)

T.test("realtime: appended audio is decoded and concatenated; wait_audio wakes once enough arrived", function()
  local rt = start_rt({
    script = function(s)
      local n = s:wait_audio(1600, 3000)
      s:send({ type = "test.audio_seen", bytes = n })
    end,
  })
  local c = ready(rt)
  local sent = {}
  for i = 1, 10 do
    sent[i] = string.rep(string.char(i), 160)
    send(c, { type = "input_audio_buffer.append", audio = crypto.base64_encode(sent[i]) })
  end
  local ev = until_event(c, "test.audio_seen")
  T.eq(ev.bytes, 1600)
  local s = rt.sessions[1]
  T.eq(s.input_audio, table.concat(sent))
  T.eq(s.appends, 10)
  T.eq(s.input_bytes, 1600)
  T.eq(s:input_ms(), 200, "pcmu: 8 bytes per ms")
  T.eq(type(s.first_append_at), "number")
  local append = s.events[2]
  T.eq(append.type, "input_audio_buffer.append")
  T.eq(append.audio_bytes, 160)
  T.eq(append.audio, nil, "the base64 is not kept")
  send(c, { type = "input_audio_buffer.append", audio = "not base64!" })
  local bad = next_event(c)
  T.eq(bad.error.code, "invalid_value")
  T.eq(bad.error.param, "audio")
  send(c, { type = "input_audio_buffer.commit" })
  local committed = next_event(c)
  T.eq(committed.type, "input_audio_buffer.committed")
  T.match(committed.item_id, "^item_")
  send(c, { type = "input_audio_buffer.commit" })
  T.eq(until_event(c, "error").error.code, "input_audio_buffer_commit_empty")
end)

T.test("realtime: light mode counts input audio without keeping it", function()
  local rt = start_rt({ light = true, script = function() end })
  local c = ready(rt)
  for _ = 1, 5 do
    send(c, { type = "input_audio_buffer.append", audio = crypto.base64_encode(string.rep("\255", 160)) })
  end
  send(c, { type = "input_audio_buffer.clear" })
  T.eq(next_event(c).type, "input_audio_buffer.cleared")
  local s = rt.sessions[1]
  T.eq(s.input_bytes, 800)
  T.eq(s.appends, 5)
  T.eq(s.input_audio, "")
  T.eq(#s.events, 2, "session.update and clear only")
end)

T.test("realtime: the default script answers response.create with 1 s of 440 Hz pcmu paced in real time, in GA event order", function()
  local rt = start_rt()
  local c = ready(rt)
  send(c, { type = "response.create" })
  local done, list = until_event(c, "response.done", 4000)
  local rl = next_event(c)
  T.eq(rl.type, "rate_limits.updated")
  local seq = types(list)
  T.eq({ table.unpack(seq, 1, 4) },
    { "response.created", "response.output_item.added", "conversation.item.added", "response.content_part.added" })
  T.eq({ table.unpack(seq, #seq - 5) }, {
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.content_part.done",
    "response.output_item.done",
    "conversation.item.done",
    "response.done",
  })
  for i = 5, #seq - 6 do
    T.ok(seq[i] == "response.output_audio.delta" or seq[i] == "response.output_audio_transcript.delta", seq[i])
  end
  local pcmu, n = delta_audio(list)
  T.eq(#pcmu, 8000, "1 s of pcmu")
  T.eq(n, 50, "20 ms deltas")
  local first = list[index_of(list, "response.output_audio.delta")]
  local took = done._at - first._at
  T.ge(took, 950, "paced in real time")
  T.lt(took, 1400)
  -- A 440 Hz tone crosses zero 880 times a second.
  local pcm = audio.ulaw_decode(pcmu)
  local crossings, prev = 0, 0
  for i = 1, #pcm // 2 do
    local v = string.unpack("<i2", pcm, 2 * i - 1)
    if (v >= 0) ~= (prev >= 0) then
      crossings = crossings + 1
    end
    prev = v
  end
  T.near(crossings, 880, 10, "zero crossings")
  T.gt(audio.ulaw_rms_dbfs(pcmu), -20)
  local words = {}
  for _, ev in ipairs(list) do
    if ev.type == "response.output_audio_transcript.delta" then
      words[#words + 1] = ev.delta
    end
  end
  T.eq(table.concat(words), "Hello, this is a test.")
  T.eq(list[index_of(list, "response.output_audio_transcript.done")].transcript, "Hello, this is a test.")
  local added = list[2]
  T.eq(added.item.type, "message")
  T.eq(added.item.role, "assistant")
  T.eq(first.item_id, added.item.id)
  T.eq(first.response_id, list[1].response.id)
  local r = done.response
  T.eq(r.status, "completed")
  T.eq(r.output[1].content[1].transcript, "Hello, this is a test.")
  local u = r.usage
  T.eq(u.total_tokens, u.input_tokens + u.output_tokens)
  T.eq(u.input_tokens, u.input_token_details.text_tokens + u.input_token_details.audio_tokens)
  T.eq(u.output_tokens, u.output_token_details.text_tokens + u.output_token_details.audio_tokens)
  T.eq(type(u.input_token_details.cached_tokens), "number")
  T.eq(rt.sessions[1].responses[1].sent_bytes, 8000)
  T.eq(#rt.sessions[1].response_creates, 1)
end)

T.test("realtime: speak in pcm sends 48 bytes per ms, and pace = false bursts it", function()
  local rt = start_rt({
    script = function(s)
      s:wait_event("response.create")
      s.result = s:speak({ ms = 2000, pace = false, text = "Quick." })
    end,
  })
  local c = assert(rt_connect(rt))
  next_event(c)
  send(c, { type = "response.create" })
  local done, list = until_event(c, "response.done")
  local pcm, n = delta_audio(list)
  T.eq(#pcm, 96000)
  T.eq(n, 100)
  -- 2 s of audio: paced, it would take 2 s; a burst takes a few ms, so the
  -- bound leaves a loaded ASan run room.
  T.lt(done._at - list[1]._at, 1000, "burst")
  T.eq(done.response.usage.output_token_details.audio_tokens, 40)
end)

T.test("realtime: response.cancel stops speak early with status cancelled; a second cancel is an error", function()
  local rt = start_rt({
    script = function(s)
      s:wait_event("response.create")
      s.result = s:speak({ ms = 2000, text = "one two three four five six seven eight" })
    end,
  })
  local c = ready(rt)
  send(c, { type = "response.create" })
  local deltas = 0
  while deltas < 10 do
    if next_event(c).type == "response.output_audio.delta" then
      deltas = deltas + 1
    end
  end
  send(c, { type = "response.create" })
  T.eq(until_event(c, "error").error.code, "conversation_already_has_active_response")
  local t0 = now()
  send(c, { type = "response.cancel" })
  local done, list = until_event(c, "response.done")
  T.lt(done._at - t0, 1000, "stopped well before the 2 s of audio ran out")
  T.eq(done.response.status, "cancelled")
  T.eq(done.response.status_details.reason, "client_cancelled")
  T.eq(done.response.output[1].status, "incomplete")
  local s = rt.sessions[1]
  T.wait_for(function()
    return s.result
  end, 1000)
  T.eq(s.result.cancelled, true)
  T.lt(s.result.sent_bytes, 16000)
  T.ge(s.result.sent_bytes, 10 * 160)
  T.ok(index_of(list, "response.output_audio_transcript.done"), "transcript done is sent on cancel too")
  T.eq(#s.response_creates, 1, "the refused response.create is not counted")
  send(c, { type = "response.cancel" })
  T.eq(until_event(c, "error").error.code, "response_cancel_not_active")
end)

T.test("realtime: a response carries its response.create's metadata; bad metadata and refused creates name the event", function()
  local rt = start_rt({
    script = function(s)
      s:wait_event("response.create")
      s:speak({ ms = 40, pace = false })
      s:speak({ ms = 40, pace = false, auto = true })
      s:refuse_next_create("server_error", "The server had an error.")
    end,
  })
  local c = ready(rt)
  send(c, { type = "response.create", event_id = "e1", response = { metadata = { n = "1" } } })
  local created = until_event(c, "response.created")
  T.eq(created.response.metadata, { n = "1" })
  T.eq(until_event(c, "response.done").response.metadata, { n = "1" })
  local auto = until_event(c, "response.created")
  T.eq(auto.response.metadata, json.null, "a response the service starts on its own has none")
  until_event(c, "response.done")
  local many = {}
  for i = 1, 17 do
    many["k" .. i] = "v"
  end
  for _, bad in ipairs({ many, { n = 1 }, "x" }) do
    send(c, { type = "response.create", event_id = "e2", response = { metadata = bad } })
    local e = until_event(c, "error").error
    T.eq({ e.code, e.param, e.event_id }, { "invalid_value", "response.metadata", "e2" })
  end
  T.wait_for(function()
    return rt.sessions[1]._refuse_create
  end, 2000)
  send(c, { type = "response.create", event_id = "e3" })
  local e = until_event(c, "error").error
  T.eq({ e.type, e.code, e.event_id }, { "server_error", "server_error", "e3" })
  T.eq(#rt.sessions[1].response_creates, 1, "refused ones are not counted")
end)

T.test("realtime: user_speech barge-in sends the VAD events and cancels the speaking response; truncate is checked", function()
  local rt = start_rt({
    script = function(s)
      s:wait_event("response.create")
      task.spawn(function()
        s.spoken = s:speak({ ms = 3000, text = "a rather long answer" })
      end)
      s.speech = s:user_speech({ interrupt = true, after_ms = 200, ms = 100, text = "stop please" })
    end,
  })
  local c = ready(rt)
  send(c, { type = "response.create" })
  local tr, list = until_event(c, "conversation.item.input_audio_transcription.completed")
  local started = index_of(list, "input_audio_buffer.speech_started")
  local done_i = index_of(list, "response.done")
  T.ok(started and done_i and started < done_i, "speech_started comes before the cancelled response.done")
  local done = list[done_i]
  T.eq(done.response.status, "cancelled")
  T.eq(done.response.status_details.reason, "turn_detected")
  local sst = list[started]
  local stopped = list[index_of(list, "input_audio_buffer.speech_stopped")]
  local committed = list[index_of(list, "input_audio_buffer.committed")]
  T.eq(stopped.item_id, sst.item_id)
  T.eq(stopped.audio_end_ms, sst.audio_start_ms + 100)
  T.eq(committed.item_id, sst.item_id)
  T.ok(index_of(list, "input_audio_buffer.speech_stopped") < index_of(list, "input_audio_buffer.committed"))
  T.eq(tr.item_id, sst.item_id)
  T.eq(tr.transcript, "stop please")
  T.eq(tr.content_index, 0)
  local user_added
  for _, ev in ipairs(list) do
    if ev.type == "conversation.item.added" and ev.item.role == "user" then
      user_added = ev
    end
  end
  T.eq(user_added.item.id, sst.item_id)
  local pcmu = delta_audio(list)
  T.ge(#pcmu, 200 * 8, "spoke at least until the barge-in")
  T.lt(#pcmu, 600 * 8, "stopped soon after it")
  -- Truncation of the assistant item: within what was sent, past it, unknown item.
  local item_id = list[index_of(list, "response.output_item.added")].item.id
  send(c, { type = "conversation.item.truncate", item_id = item_id, content_index = 0, audio_end_ms = 100 })
  local ok = next_event(c)
  T.eq(ok.type, "conversation.item.truncated")
  T.eq({ ok.item_id, ok.audio_end_ms }, { item_id, 100 })
  send(c, { type = "conversation.item.truncate", item_id = item_id, content_index = 0, audio_end_ms = 100000 })
  local past = next_event(c)
  T.eq(past.error.code, "invalid_value")
  T.eq(past.error.param, "audio_end_ms")
  send(c, { type = "conversation.item.truncate", item_id = "item_nope", content_index = 0, audio_end_ms = 1 })
  T.eq(next_event(c).error.param, "item_id")
  local s = rt.sessions[1]
  T.eq(#s.truncates, 3)
  T.eq(s.truncates[1].ok, true)
  T.eq(s.truncates[2].ok, nil)
  T.eq(s.speech.cancelled_response, done.response.id)
  T.eq(s.spoken.cancelled, true)
end)

T.test("realtime: with interrupt_response false, user speech does not cancel the response", function()
  local rt = start_rt({
    script = function(s)
      s:wait_event("response.create")
      task.spawn(function()
        s.spoken = s:speak({ ms = 400 })
      end)
      s:interrupt({ ms = 50 })
    end,
  })
  local c = ready(rt, {
    audio = {
      input = { format = { type = "audio/pcmu" }, turn_detection = { type = "server_vad", interrupt_response = false } },
      output = { format = { type = "audio/pcmu" } },
    },
  })
  send(c, { type = "response.create" })
  local done, list = until_event(c, "response.done")
  T.ok(index_of(list, "input_audio_buffer.speech_started"), "speech started during the response")
  T.eq(done.response.status, "completed")
  T.eq(#delta_audio(list), 3200)
end)

T.test("realtime: call_function streams a GA function call and returns the client's function_call_output", function()
  local args = { outcome = "reached", note = "ünïcödé text long enough to be split into several deltas" }
  local rt = start_rt({
    script = function(s)
      s:wait_event("response.create")
      s.output = s:call_function("report_call", args, { timeout = 3000 })
      s:send({ type = "test.function_done" })
    end,
  })
  local c = ready(rt)
  send(c, { type = "response.create" })
  local fdone, list = until_event(c, "response.function_call_arguments.done")
  local added = list[index_of(list, "response.output_item.added")]
  T.eq(added.item.type, "function_call")
  T.eq(added.item.name, "report_call")
  T.eq(added.item.arguments, "")
  T.eq(fdone.name, "report_call")
  T.eq(fdone.call_id, added.item.call_id)
  T.eq(json.decode(fdone.arguments), args)
  local pieces = {}
  for _, ev in ipairs(list) do
    if ev.type == "response.function_call_arguments.delta" then
      pieces[#pieces + 1] = ev.delta
      T.eq(ev.call_id, fdone.call_id)
    end
  end
  T.gt(#pieces, 1, "several deltas")
  T.eq(table.concat(pieces), fdone.arguments)
  local rdone = until_event(c, "response.done")
  T.eq(rdone.response.status, "completed")
  T.eq(rdone.response.output[1].type, "function_call")
  send(c, {
    type = "conversation.item.create",
    item = { type = "function_call_output", call_id = fdone.call_id, output = '{"ok":true}' },
  })
  local item_added = until_event(c, "conversation.item.added")
  T.eq(item_added.item.call_id, fdone.call_id)
  send(c, { type = "response.create" })
  until_event(c, "test.function_done")
  local s = rt.sessions[1]
  T.wait_for(function()
    return #s.response_creates == 2
  end, 1000, "the second response.create")
  T.eq(s.output, '{"ok":true}')
  T.eq(#s.function_outputs, 1)
  T.eq(#s.response_creates, 2)
  T.eq(s.responses[1].call_id, fdone.call_id)
end)

T.test("realtime: wait_event returns events received earlier, times out, and error/close reach the client", function()
  local rt = start_rt({
    script = function(s)
      -- Until the client's response.create is in (a fixed sleep may end
      -- before it on a loaded machine): the wait below must find it there.
      local deadline = timer.now() + 5000
      local function received()
        for _, ev in ipairs(s.events) do
          if ev.type == "response.create" then
            return true
          end
        end
      end
      while not received() and timer.now() < deadline do
        timer.sleep(10)
      end
      s.early = s:wait_event("response.create", 10)
      s.none = { s:wait_event("input_audio_buffer.clear", 30) }
      s:error("server_error", "something broke", "server_error")
      s:close(4000, "bye")
    end,
  })
  local c = assert(rt_connect(rt))
  next_event(c)
  send(c, { type = "response.create", event_id = "evt_early" })
  local err = until_event(c, "error")
  T.eq(err.error.type, "server_error")
  T.eq(err.error.code, "server_error")
  T.eq(err.error.message, "something broke")
  local cl = next_event(c)
  T.eq({ cl.type, cl.code, cl.reason }, { "<close>", 4000, "bye" })
  local s = rt.sessions[1]
  T.eq(s.early.event_id, "evt_early")
  T.eq(s.none, { nil, "ETIMEDOUT" })
  T.wait_for(function()
    return s.closed
  end, 2000, "the session to record its close")
  T.eq(s.closed.code, 4000)
  T.eq({ s:wait_event("response.create", 10) }, { nil, "ECLOSED" })
end)

T.test("realtime: drop ends the connection without a close frame (the client sees 1006)", function()
  local rt = start_rt({
    script = function(s)
      s:wait_event("response.create")
      s:drop()
    end,
  })
  local c = assert(rt_connect(rt))
  next_event(c)
  send(c, { type = "response.create" })
  local cl = next_event(c)
  T.eq(cl.type, "<close>")
  T.eq(cl.code, 1006)
  T.eq(rt.sessions[1].dropped, true)
end)

-- Twilio helpers ------------------------------------------------------------------

local SID = "AC" .. string.rep("1", 32)
local TOKEN = "tok-secret"
local CALLS = "/2010-04-01/Accounts/" .. SID .. "/Calls"

local STREAM_PARAMS = { callId = "c_1", token = 'a&b<c>"d' }

-- A stand-in for the engine: /voice answers TwiML, /status records callbacks,
-- /voice/stream records what Twilio sends (app.echo: echo media + a mark).
local function start_app(opts)
  opts = opts or {}
  local app = { voice = {}, status = {}, streams = {} }
  local srv = T.server({ headers = { "x-twilio-signature" }, tls = opts.tls }, function(srv)
    srv:post("/voice", function(req)
      app.voice[#app.voice + 1] = {
        params = url.form_decode(req.body),
        signature = req.headers["x-twilio-signature"],
        at = now(),
      }
      if app.voice_reply then
        return app.voice_reply(req)
      end
      local twiml = '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Connect><Stream url="'
        .. (app.public_stream_url or app.stream_url) .. '">'
        .. '<Parameter name="callId" value="c_1"/>'
        .. '<Parameter name="token" value="a&amp;b&lt;c&gt;&quot;d" />'
        .. "</Stream></Connect></Response>"
      return 200, twiml, { ["Content-Type"] = "text/xml" }
    end)
    srv:get("/voice", function(req)
      app.voice[#app.voice + 1] = { params = req.query, signature = req.headers["x-twilio-signature"], at = now(), get = true }
      return 200, "<Response><Connect><Stream url=\"" .. app.stream_url .. "\"/></Connect></Response>",
        { ["Content-Type"] = "text/xml" }
    end)
    srv:get("/status", function(req)
      app.status[#app.status + 1] = { params = req.query, signature = req.headers["x-twilio-signature"], at = now(), get = true }
      return 204
    end)
    srv:post("/status", function(req)
      app.status[#app.status + 1] = {
        params = url.form_decode(req.body),
        signature = req.headers["x-twilio-signature"],
        at = now(),
      }
      return 204
    end)
    srv:websocket("/voice/stream", {
      open = function(conn, req)
        local s = { conn = conn, req = req, msgs = {}, q = task.queue() }
        conn.s = s
        app.streams[#app.streams + 1] = s
      end,
      text = function(conn, msg)
        local s = conn.s
        local m = json.decode(msg)
        m._at = now()
        s.msgs[#s.msgs + 1] = m
        if m.event == "start" then
          s.sid = m.streamSid
        end
        if m.event == "media" then
          if app.echo then
            conn:send(json.encode({ event = "media", streamSid = s.sid, media = { payload = m.media.payload } }))
            conn:send(json.encode({ event = "mark", streamSid = s.sid, mark = { name = "echo-" .. m.media.chunk } }))
          end
        else
          s.q:push(m)
        end
      end,
      close = function(conn, code, reason)
        conn.s.closed = { code = code, reason = reason }
        conn.s.q:push({ event = "<close>", code = code, reason = reason, _at = now() })
      end,
    })
  end)
  app.srv = srv
  app.base = srv:url("")
  app.stream_url = srv:ws_url("/voice/stream")
  return app
end

local function start_tw(opts)
  opts = opts or {}
  opts.account_sid = SID
  opts.auth_token = TOKEN
  local tw = assert(twilio.start(opts))
  T.defer(function()
    tw:close()
  end)
  return tw
end

local function rest(tw, method, path, form, auth)
  return assert(fetch(tw.url .. path, {
    method = method,
    body = form and url.form_encode(form) or nil,
    username = auth and auth[1] or SID,
    password = auth and auth[2] or TOKEN,
  }))
end

local function call_form(app, extra)
  local form = {
    To = "+14155550100",
    From = "+14155550199",
    Url = app.base .. "/voice",
    StatusCallback = app.base .. "/status",
    StatusCallbackEvent = { "initiated", "ringing", "answered", "completed" },
    StatusCallbackMethod = "POST",
    Timeout = "30",
  }
  for k, v in pairs(extra or {}) do
    form[k] = v or nil
  end
  return form
end

local function create(tw, app, extra)
  local res = rest(tw, "POST", CALLS .. ".json", call_form(app, extra))
  T.eq(res.status, 201, "create: " .. res.body)
  return json.decode(res.body), assert(tw:wait_call(1000))
end

local function statuses_of(app, sid)
  local out = {}
  for _, cb in ipairs(app.status) do
    if cb.params.CallSid == sid then
      out[#out + 1] = cb
    end
  end
  return out
end

local function field(list, name)
  local out = {}
  for _, x in ipairs(list) do
    out[#out + 1] = x.params[name]
  end
  return out
end

local function next_msg(s, timeout)
  return assert(s.q:pop(timeout or 3000))
end

local function send_media(s, bytes)
  assert(s.conn:send(json.encode({ event = "media", streamSid = s.sid, media = { payload = crypto.base64_encode(bytes) } })))
end

local function send_mark(s, name)
  assert(s.conn:send(json.encode({ event = "mark", streamSid = s.sid, mark = { name = name } })))
end

-- Opens an answered call and returns app, tw, call, stream (after `start`).
local function live_call(tw_opts, app_opts)
  local app = start_app(app_opts)
  local tw = start_tw(tw_opts)
  local _, call = create(tw, app)
  T.ok(call:wait_stream(3000), "stream started")
  local s = app.streams[1]
  T.eq(next_msg(s).event, "connected")
  T.eq(next_msg(s).event, "start")
  return app, tw, call, s
end

-- Twilio ---------------------------------------------------------------------------

T.test("twilio: sign reproduces every signature vector of protocols.md section 4", function()
  local p = {
    CallSid = "CA1234567890ABCDE",
    Caller = "+14158675309",
    Digits = "1234",
    From = "+14158675309",
    To = "+18005551212",
  }
  local u = "https://mycompany.com/myapp.php?foo=1&bar=2"
  T.eq(twilio.sign("12345", u, p), "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
  T.eq(twilio.sign("12345", "https://mycompany.com:443/myapp.php?foo=1&bar=2", p), "kvajT1Ptam85bY51eRf/AJRuM3w=")
  T.eq(twilio.sign("12345", "http://mycompany.com:1234/myapp.php?foo=1&bar=2", p), "Zmvh+3yNM1Phv2jhDCwEM3q5ebU=")
  T.eq(twilio.sign("12345", u, { Sid = "CA123", SidAccount = "AC123", Digits = { "5678", "1234", "1234" } }),
    "IK+Dwps556ElfBT0I3Rgjkr1wJU=")
  local body = '{"property": "value", "boolean": true}'
  local hash = crypto.to_hex(crypto.sha256(body))
  T.eq(hash, "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620")
  T.eq(twilio.sign("12345", u .. "&bodySHA256=" .. hash), "a9nBmqA0ju/hNViExpshrM61xv4=")
  T.ne(twilio.sign("12346", u, p), "RSOYDt4T1cUTdK1PDd93/VVr8B8=", "the token matters")
end)

T.test("twilio REST: bad auth is 401 20003; bad To/From/Url are 400 with Twilio codes; unknown calls are 404 20404", function()
  local app = start_app()
  local tw = start_tw()
  local res = rest(tw, "POST", CALLS .. ".json", call_form(app), { SID, "wrong" })
  T.eq(res.status, 401)
  T.eq(json.decode(res.body), {
    code = 20003,
    message = "Authenticate",
    more_info = "https://www.twilio.com/docs/errors/20003",
    status = 401,
  })
  local cases = {
    { { To = false }, 21201 },
    { { To = "555-0100" }, 21211 },
    { { From = false }, 21213 },
    { { From = "+0123" }, 21212 },
    { { Url = false }, 21205 },
    { { Url = "ftp://x/voice" }, 21205 },
  }
  for i, case in ipairs(cases) do
    local r = rest(tw, "POST", CALLS .. ".json", call_form(app, case[1]))
    T.eq(r.status, 400, "case " .. i)
    local b = json.decode(r.body)
    T.eq(b.code, case[2], "case " .. i)
    T.eq(b.status, 400)
    T.match(b.more_info, "/errors/" .. case[2] .. "$")
  end
  local missing = CALLS .. "/CA" .. string.rep("0", 32) .. ".json"
  T.eq(json.decode(rest(tw, "GET", missing).body).code, 20404)
  local r = rest(tw, "POST", missing, { Status = "completed" })
  T.eq(r.status, 404)
  T.eq(json.decode(r.body).code, 20404)
  T.eq(rest(tw, "GET", "/2010-04-01/Accounts/AC" .. string.rep("2", 32) .. "/Calls.json").status, 404)
  T.eq(#tw.calls, 0, "no call was created")
end)

T.test("twilio: an answered call gets signed callbacks in order, /voice, TwiML parsing, the stream with customParameters, and a REST hangup", function()
  local app = start_app()
  local tw = start_tw()
  local body, call = create(tw, app)
  T.match(body.sid, "^CA%x+$")
  T.eq(#body.sid, 34)
  T.eq(body.status, "queued")
  T.eq(body.direction, "outbound-api")
  T.eq(body.account_sid, SID)
  T.eq({ body.to, body.from }, { "+14155550100", "+14155550199" })
  T.eq(call.sid, body.sid)
  T.eq(call.params.StatusCallbackEvent, { "initiated", "ringing", "answered", "completed" })
  T.ok(call:wait_stream(3000))
  local s = app.streams[1]
  T.eq(next_msg(s), { event = "connected", protocol = "Call", version = "1.0.0", _at = s.msgs[1]._at })
  local start = next_msg(s)
  T.eq(start.event, "start")
  T.eq(start.sequenceNumber, "1")
  T.match(start.streamSid, "^MZ" .. string.rep("%x", 32) .. "$")
  T.eq(start.start.streamSid, start.streamSid)
  T.eq(start.start.callSid, call.sid)
  T.eq(start.start.accountSid, SID)
  T.eq(start.start.tracks, { "inbound" })
  T.eq(start.start.mediaFormat, { encoding = "audio/x-mulaw", sampleRate = 8000, channels = 1 })
  T.eq(start.start.customParameters, STREAM_PARAMS, "entities in attributes decoded")
  T.eq(s.req.headers["x-twilio-signature"], twilio.sign(TOKEN, app.stream_url), "signed upgrade")
  T.eq(call.stream_params, STREAM_PARAMS)
  T.eq(call.stream_url, app.stream_url)
  -- The voice webhook.
  T.eq(#app.voice, 1)
  local v = app.voice[1]
  T.eq(v.params.CallSid, call.sid)
  T.eq(v.params.CallStatus, "in-progress")
  T.eq(v.params.Direction, "outbound-api")
  T.eq(v.params.ApiVersion, "2010-04-01")
  T.eq({ v.params.From, v.params.To, v.params.Caller, v.params.Called },
    { "+14155550199", "+14155550100", "+14155550199", "+14155550100" })
  T.eq(v.signature, twilio.sign(TOKEN, app.base .. "/voice", v.params))
  T.eq(call.voice_request.status, 200)
  T.eq(call.twiml.verbs, { "Connect" })
  T.eq(call.twiml.stream.parameter_list[2], { name = "token", value = 'a&b<c>"d' })
  T.eq(json.decode(rest(tw, "GET", CALLS .. "/" .. call.sid .. ".json").body).status, "in-progress")
  -- Hang up through the API.
  timer.sleep(100)
  local res = rest(tw, "POST", CALLS .. "/" .. call.sid .. ".json", { Status = "completed" })
  T.eq(res.status, 200)
  T.eq(json.decode(res.body).status, "completed")
  local stop = next_msg(s)
  T.eq(stop.event, "stop")
  T.eq(stop.streamSid, start.streamSid)
  T.eq(stop.stop, { accountSid = SID, callSid = call.sid })
  T.gt(tonumber(stop.sequenceNumber), 2)
  local closed = next_msg(s)
  T.eq(closed.event, "<close>")
  T.ok(call:wait_closed(3000))
  T.eq(call.end_reason, "api")
  T.eq(type(call.hangup_requested_at), "number")
  -- Status callbacks: all four, in order, signed, with the real fields.
  local cbs = statuses_of(app, call.sid)
  T.eq(field(cbs, "CallStatus"), { "initiated", "ringing", "in-progress", "completed" })
  T.eq(field(cbs, "SequenceNumber"), { "0", "1", "2", "3" })
  for i, cb in ipairs(cbs) do
    T.eq(cb.signature, twilio.sign(TOKEN, app.base .. "/status", cb.params), "signature " .. i)
    T.eq(cb.params.AccountSid, SID)
    T.eq(cb.params.Direction, "outbound-api")
    T.eq(cb.params.ApiVersion, "2010-04-01")
    T.eq(cb.params.CallbackSource, "call-progress-events")
    T.match(cb.params.Timestamp, "^%a%a%a, %d%d %a%a%a %d%d%d%d %d%d:%d%d:%d%d %+0000$")
  end
  T.eq(cbs[4].params.CallDuration, "1")
  T.eq(cbs[4].params.SipResponseCode, "200")
  T.eq(cbs[1].params.CallDuration, nil)
  T.ok(closed._at <= cbs[4].at, "the stream closed before the completed callback")
  T.eq(call.callbacks[4].response_status, 204)
  local final = json.decode(rest(tw, "GET", CALLS .. "/" .. call.sid .. ".json").body)
  T.eq(final.status, "completed")
  T.eq(final.duration, "1")
  T.eq(#call.errors, 0)
end)

T.test("twilio media: 20 ms frames on a drift-free schedule (50 frames ~ 1 s), consecutive numbering, caller audio then silence", function()
  local said = string.rep("\0", 400) .. string.rep("\85", 400)
  local app, _, call, s = live_call({ behaviour = { audio = said } })
  T.wait_for(function()
    local n = 0
    for _, m in ipairs(s.msgs) do
      if m.event == "media" then
        n = n + 1
      end
    end
    return n >= 51
  end, 3000, "51 media frames")
  local media = {}
  for _, m in ipairs(s.msgs) do
    if m.event == "media" then
      media[#media + 1] = m
    end
  end
  local maxgap, long_gaps = 0, 0
  for k = 1, 51 do
    local m = media[k]
    T.eq(m.sequenceNumber, tostring(k + 1), "sequence " .. k)
    T.eq(m.media.chunk, tostring(k), "chunk " .. k)
    T.eq(m.media.timestamp, tostring((k - 1) * 20), "timestamp " .. k)
    T.eq(m.media.track, "inbound")
    T.eq(m.streamSid, s.sid)
    T.eq(#crypto.base64_decode(m.media.payload), 160)
    if k > 1 then
      local gap = m._at - media[k - 1]._at
      maxgap = math.max(maxgap, gap)
      if gap > 60 then
        long_gaps = long_gaps + 1
      end
    end
  end
  -- Where each frame sits against a 20 ms grid: the median of ten frames at
  -- the start and ten at the end. On a drift-free schedule they match; a burst
  -- or a schedule that drifts moves the end's. A loaded machine can hold up a
  -- frame or two (the schedule then catches up), which moves neither median.
  local function median_offset(from)
    local offs = {}
    for k = from, from + 9 do
      offs[#offs + 1] = media[k]._at - (k - 1) * 20
    end
    table.sort(offs)
    return (offs[5] + offs[6]) / 2
  end
  local took = media[51]._at - media[1]._at
  local drift = median_offset(42) - median_offset(1)
  T.diag(string.format("50 frame intervals took %.1f ms (largest gap %.1f ms, %d over 60 ms, drift %.1f ms)",
    took, maxgap, long_gaps, drift))
  T.near(drift, 0, 30, "50 frames in 1 s, no drift")
  T.le(long_gaps, 3, "frames come one at a time, not in clumps")
  local function frame(k)
    return crypto.base64_decode(media[k].media.payload)
  end
  T.eq(frame(1), string.rep("\0", 160))
  T.eq(frame(3), string.rep("\0", 80) .. string.rep("\85", 80))
  T.eq(frame(5), string.rep("\85", 160))
  T.eq(frame(6), string.rep("\255", 160), "silence after the caller's audio")
  T.ge(call.media_sent, 51)
  T.eq(#app.voice, 1)
  call:hangup()
  T.ok(call:wait_closed(3000))
end)

T.test("twilio media: marks echo when playback reaches them; clear drops unplayed audio and echoes pending marks at once", function()
  local _, _, call, s = live_call()
  -- Nothing queued: echoed at once.
  local t0 = now()
  send_mark(s, "m0")
  local m0 = next_msg(s)
  T.eq(m0.event, "mark")
  T.eq(m0.mark.name, "m0")
  T.lt(m0._at - t0, 300, "long before the 400 ms of audio below could have played")
  -- 400 ms then 200 ms of audio, each followed by a mark.
  t0 = now()
  send_media(s, string.rep("\1", 3200))
  send_mark(s, "m1")
  send_media(s, string.rep("\2", 1600))
  send_mark(s, "m2")
  local m1, m2 = next_msg(s), next_msg(s)
  T.eq({ m1.mark.name, m2.mark.name }, { "m1", "m2" })
  T.eq(m1.streamSid, s.sid)
  T.gt(tonumber(m2.sequenceNumber), tonumber(m1.sequenceNumber), "one sequence with the media frames")
  -- Never early (the audio cannot arrive before t0); how late depends on the
  -- machine, so the fake's own record says when each was due and echoed.
  T.ge(m1._at - t0, 400 - 1, "m1 after 400 ms of playback")
  T.ge(m2._at - t0, 600 - 1, "m2 after 600 ms")
  local media_at = {}
  for _, r in ipairs(call.ws_received) do
    if r.event == "media" then
      media_at[#media_at + 1] = r.at
    end
  end
  local e1, e2 = call.marks_echoed[2], call.marks_echoed[3]
  T.eq({ e1.name, e2.name }, { "m1", "m2" })
  T.near(e1.due, media_at[1] + 400, 1, "m1 due when the 400 ms played")
  T.near(e2.due, e1.due + 200, 1, "m2 due 200 ms later")
  T.ge(e1.at, e1.due, "m1 not echoed early")
  T.lt(e1.at, e2.due, "m1 echoed at its audio's end, not with m2")
  T.lt(m2._at - t0, 600 + 1000, "m2 echoed when due, not at some later event")
  T.eq(call.played_bytes, 4800)
  -- 1 s + 0.5 s queued, cleared after 200 ms: 1.3 s dropped, both marks at once.
  t0 = now()
  send_media(s, string.rep("\3", 8000))
  send_mark(s, "m3")
  send_media(s, string.rep("\4", 4000))
  send_mark(s, "m4")
  T.wait_for(function()
    return #call.marks_sent == 5
  end, 3000, "the fake has m3's audio and m4")
  timer.sleep(200)
  local tc = now()
  assert(s.conn:send(json.encode({ event = "clear", streamSid = s.sid })))
  local m3, m4 = next_msg(s), next_msg(s)
  T.eq({ m3.mark.name, m4.mark.name }, { "m3", "m4" })
  T.lt(m4._at - tc, 650, "pending marks echoed at the clear, not after the 1.3 s left")
  T.eq(#call.clears, 1)
  -- Played at the clear: 8 bytes a ms from the arrival of m3's audio to the
  -- clear (the fake's own times; at least the 200 ms slept), the rest dropped.
  local cl = call.clears[1]
  media_at = {}
  for _, r in ipairs(call.ws_received) do
    if r.event == "media" then
      media_at[#media_at + 1] = r.at
    end
  end
  local heard = (cl.at - media_at[3]) * 8
  T.ge(heard, 1600 - 1, "the clear came after 200 ms of m3's audio")
  T.lt(heard, 12000, "the clear came before all of it played")
  T.near(cl.dropped_bytes, 12000 - heard, 1, "dropped bytes")
  T.eq(cl.pending_marks, 2)
  T.eq(cl.received_bytes, 4800 + 12000)
  T.near(cl.played_bytes, 4800 + heard, 1, "played at the clear")
  T.near(call.played_bytes, 4800 + heard, 1, "played bytes")
  T.eq(call.received_bytes, 4800 + 12000)
  T.eq(#call.received_audio, 16800)
  T.eq(call.received_audio:sub(1, 3200), string.rep("\1", 3200))
  T.eq(#call.marks_sent, 5)
  T.eq(#call.marks_echoed, 5)
  T.ok(call:wait_received_audio(16800, 10))
  T.eq(#call.errors, 0)
  -- A message with the wrong streamSid is a recorded protocol error.
  assert(s.conn:send(json.encode({ event = "clear", streamSid = "MZnope" })))
  T.wait_for(function()
    return #call.errors == 1
  end, 1000, "the protocol error")
end)

T.test("twilio media: an echoing app gets its audio played back and each echo mark returned", function()
  local app = start_app()
  app.echo = true
  local tw = start_tw({ behaviour = { audio = string.rep("\7", 800) } })
  local _, call = create(tw, app)
  T.ok(call:wait_received_audio(1600, 3000), "ten frames echoed")
  T.eq(call.received_audio:sub(1, 800), string.rep("\7", 800))
  T.wait_for(function()
    return #call.marks_echoed >= 5
  end, 2000, "echo marks")
  T.eq(call.marks_echoed[1].name, "echo-1")
  call:hangup()
  T.ok(call:wait_closed(3000))
end)

T.test("twilio: send_dtmf reaches the stream; the callee hanging up sends stop, closes and calls back completed", function()
  local app, _, call, s = live_call()
  assert(call:send_dtmf("7"))
  local d = next_msg(s)
  T.eq(d.event, "dtmf")
  T.eq(d.dtmf, { track = "inbound_track", digit = "7" })
  T.eq(d.streamSid, s.sid)
  T.eq(d.sequenceNumber:match("^%d+$") ~= nil, true)
  call:hangup()
  T.eq(next_msg(s).event, "stop")
  T.eq(next_msg(s).code, 1000)
  T.ok(call:wait_closed(3000))
  T.eq(call.end_reason, "callee")
  T.eq(call.final, "completed")
  local cbs = statuses_of(app, call.sid)
  T.eq(cbs[#cbs].params.CallStatus, "completed")
end)

T.test("twilio: the app closing the stream ends the call as completed", function()
  local app, _, call, s = live_call()
  s.conn:close(1000, "bye")
  T.ok(call:wait_closed(3000))
  T.eq(call.final, "completed")
  T.eq(call.end_reason, "stream_closed")
  T.eq(call.stream_closed.by, "app")
  T.eq(statuses_of(app, call.sid)[4].params.CallStatus, "completed")
end)

T.test("twilio: busy, no-answer and failed calls send their callbacks and never request /voice", function()
  local app = start_app()
  local tw = start_tw({
    behaviour = function(call)
      return ({ ["+14155550101"] = "busy", ["+14155550102"] = "no-answer", ["+14155550103"] = "failed" })[call.params.To]
    end,
  })
  local expect = {
    { "+14155550101", { "initiated", "ringing", "busy" }, "486" },
    { "+14155550102", { "initiated", "ringing", "no-answer" }, "487" },
    { "+14155550103", { "initiated", "failed" }, "500" },
  }
  for _, e in ipairs(expect) do
    local body, call = create(tw, app, { To = e[1] })
    T.ok(call:wait_closed(3000))
    local cbs = statuses_of(app, body.sid)
    T.eq(field(cbs, "CallStatus"), e[2], e[1])
    T.eq(cbs[#cbs].params.SipResponseCode, e[3])
    T.eq(cbs[#cbs].params.CallDuration, "0")
    T.eq(json.decode(rest(tw, "GET", CALLS .. "/" .. body.sid .. ".json").body).status, e[2][#e[2]])
  end
  T.eq(#app.voice, 0)
  T.eq(#app.streams, 0)
end)

T.test("twilio: callbacks_out_of_order delivers ringing after in-progress with truthful SequenceNumbers", function()
  local app, _, call = live_call({ behaviour = { callbacks_out_of_order = true } })
  call:hangup()
  T.ok(call:wait_closed(3000))
  local cbs = statuses_of(app, call.sid)
  T.eq(field(cbs, "CallStatus"), { "initiated", "in-progress", "ringing", "completed" })
  T.eq(field(cbs, "SequenceNumber"), { "0", "2", "1", "3" })
end)

T.test("twilio: only the requested callback events are sent (completed when none is given)", function()
  local app = start_app()
  local tw = start_tw({ behaviour = "busy" })
  local body, call = create(tw, app, { StatusCallbackEvent = false })
  T.ok(call:wait_closed(3000))
  local cbs = statuses_of(app, body.sid)
  T.eq(field(cbs, "CallStatus"), { "busy" })
  T.eq(field(cbs, "SequenceNumber"), { "0" })
end)

T.test("twilio: behaviour reject-api answers 400 21215 and records the attempt", function()
  local app = start_app()
  local tw = start_tw({ behaviour = "reject-api" })
  local res = rest(tw, "POST", CALLS .. ".json", call_form(app))
  T.eq(res.status, 400)
  local b = json.decode(res.body)
  T.eq(b.code, 21215)
  T.match(b.message, "^Account not authorized to call %+14155550100")
  local call = assert(tw:wait_call(100))
  T.eq(call.rejected.code, 21215)
  T.eq(call.sid, nil)
  timer.sleep(50)
  T.eq(#app.status, 0)
end)

T.test("twilio: TwiML without <Connect><Stream> (or a failing /voice) is recorded and the call completes", function()
  local app = start_app()
  local tw = start_tw()
  app.voice_reply = function()
    return 200, "<Response><Say voice=\"alice\">Hello &amp; bye</Say><Hangup/></Response>", { ["Content-Type"] = "text/xml" }
  end
  local _, call = create(tw, app)
  T.ok(call:wait_closed(3000))
  T.eq(call.final, "completed")
  T.eq(call.end_reason, "twiml")
  T.eq(call.twiml.verbs, { "Say", "Hangup" })
  T.match(call.twiml.error, "Stream")
  T.match(call.voice_request.body, "<Say")
  app.voice_reply = function()
    return 500, "oops"
  end
  local _, call2 = create(tw, app)
  T.ok(call2:wait_closed(3000))
  T.eq(call2.voice_request.status, 500)
  T.eq(call2.final, "completed")
  T.eq(#app.streams, 0)
end)

T.test("twilio: a <Stream> url's query string is not passed on (Twilio takes data by <Parameter> only)", function()
  local app = start_app()
  local tw = start_tw()
  app.voice_reply = function()
    return 200, '<Response><Connect><Stream url="' .. app.stream_url .. '?token=t1&amp;callId=c_1">'
      .. '<Parameter name="callId" value="c_1"/></Stream></Connect></Response>', { ["Content-Type"] = "text/xml" }
  end
  local _, call = create(tw, app)
  T.ok(call:wait_stream(3000), "stream started")
  local s = app.streams[1]
  T.eq(s.req.path, "/voice/stream")
  T.eq(s.req.raw_query or "", "", "no query reached the app")
  T.eq(call.stream_url, app.stream_url, "connected to the url without its query")
  T.eq(call.stream_headers["X-Twilio-Signature"], twilio.sign(TOKEN, app.stream_url))
  T.match(call.twiml.stream.url, "%?token=t1&callId=c_1$", "the TwiML as the app sent it")
  T.match(call.errors[1] and call.errors[1].message or "", "query string")
  call:hangup()
end)

T.test("twilio: canceling a ringing call ends it canceled without /voice", function()
  local app = start_app()
  local tw = start_tw({ behaviour = { ring_ms = 2000 } })
  local body, call = create(tw, app)
  T.ok(call:wait_status("ringing", 1000))
  local res = rest(tw, "POST", CALLS .. "/" .. body.sid .. ".json", { Status = "canceled" })
  T.eq(res.status, 200)
  T.eq(json.decode(res.body).status, "canceled")
  T.ok(call:wait_closed(1000), "ended long before the 2 s ring")
  T.eq(field(statuses_of(app, body.sid), "CallStatus"), { "initiated", "ringing", "canceled" })
  T.eq(#app.voice, 0)
  T.eq(call:wait_status("in-progress", 10), nil)
end)

T.test("twilio: Method=GET and StatusCallbackMethod=GET sign the full URL with the query; AMD adds AnsweredBy", function()
  local app = start_app()
  local tw = start_tw({ behaviour = { answered_by = "machine_start" } })
  local _, call = create(tw, app, { Method = "GET", StatusCallbackMethod = "GET", MachineDetection = "Enable" })
  T.ok(call:wait_stream(3000))
  local v = app.voice[1]
  T.eq(v.get, true)
  T.eq(v.params.CallStatus, "in-progress")
  T.eq(v.params.AnsweredBy, "machine_start")
  T.eq(v.signature, twilio.sign(TOKEN, app.base .. "/voice?" .. url.form_encode(v.params)))
  T.eq(call.stream_params, {}, "a Stream without Parameters")
  call:hangup()
  T.ok(call:wait_closed(3000))
  local cbs = statuses_of(app, call.sid)
  T.eq(field(cbs, "CallStatus"), { "initiated", "ringing", "in-progress", "completed" })
  T.eq(cbs[3].params.AnsweredBy, "machine_start")
  for i, cb in ipairs(cbs) do
    T.eq(cb.get, true)
    T.eq(cb.signature, twilio.sign(TOKEN, app.base .. "/status?" .. url.form_encode(cb.params)), "signature " .. i)
  end
end)

T.test("twilio: inline Twiml instead of Url connects the stream without a /voice request", function()
  local app = start_app()
  local tw = start_tw()
  local twiml = '<Response><Connect><Stream url="' .. app.stream_url .. '"><Parameter name="k" value="v"/></Stream></Connect></Response>'
  local _, call = create(tw, app, { Url = false, Twiml = twiml })
  T.ok(call:wait_stream(3000))
  T.eq(call.stream_params, { k = "v" })
  T.eq(#app.voice, 0)
  T.eq(call.voice_request, nil)
end)

T.test("twilio: public URLs are signed as given and rewritten to the local app, over https and wss with a CA file", function()
  local c = certs.make(T.tmpdir())
  local app = start_app({ tls = { cert = c.cert, key = c.key } })
  local public = "https://calls.example.test"
  app.public_stream_url = "wss://calls.example.test/voice/stream"
  local local_base = "https://localhost:" .. app.srv.port
  local tw = start_tw({
    ca_file = c.ca,
    public_url_rewrite = function(u)
      return (u:gsub("^https://calls%.example%.test", local_base):gsub("^wss://calls%.example%.test",
        "wss://localhost:" .. app.srv.port))
    end,
  })
  local _, call = create(tw, app, { Url = public .. "/voice", StatusCallback = public .. "/status" })
  T.ok(call:wait_stream(3000), tostring(call.stream_error or (call.voice_request and call.voice_request.error)))
  local v = app.voice[1]
  T.eq(v.signature, twilio.sign(TOKEN, public .. "/voice", v.params))
  T.eq(app.streams[1].req.headers["x-twilio-signature"], twilio.sign(TOKEN, app.public_stream_url))
  call:hangup()
  T.ok(call:wait_closed(3000))
  local cbs = statuses_of(app, call.sid)
  T.eq(#cbs, 4)
  T.eq(cbs[1].signature, twilio.sign(TOKEN, public .. "/status", cbs[1].params))
end)


-- Telnyx ----------------------------------------------------------------------------

T.test("telnyx media: audio sent back plays only on a stream started with stream_bidirectional_mode rtp", function()
  local telnyx = require "fakes.telnyx"
  local tx = assert(telnyx.start({ api_key = "KEY-test", connection_id = "conn-1" }))
  T.defer(function()
    tx:close()
  end)
  -- An app whose stream answers every `start` with 400 bytes of mu-law.
  local srv = T.server({}, function(srv)
    srv:post("/hook", function()
      return 200, { ok = true }
    end)
    srv:websocket("/voice/stream", {
      text = function(conn, msg)
        if json.decode(msg).event == "start" then
          conn:send(json.encode({ event = "media", media = { payload = crypto.base64_encode(string.rep("\0", 400)) } }))
        end
      end,
    })
  end)
  local auth = { Authorization = "Bearer KEY-test", ["Content-Type"] = "application/json" }
  for _, mode in ipairs({ false, "rtp" }) do
    local res = assert(fetch(tx.url .. "/v2/calls", { method = "POST", headers = auth, body = json.encode({
      connection_id = "conn-1", to = "+14155550100", from = "+14155550199", webhook_url = srv:url("/hook") }) }))
    T.eq(res.status, 200, res.body)
    local call = assert(tx:wait_call(1000))
    T.ok(call:wait(function()
      return call.answered_at
    end, 3000), "answered")
    res = assert(fetch(tx.url .. "/v2/calls/" .. call.control_id .. "/actions/streaming_start", { method = "POST",
      headers = auth, body = json.encode({ stream_url = srv:ws_url("/voice/stream"), stream_track = "inbound_track",
        stream_bidirectional_mode = mode or nil, stream_bidirectional_codec = mode and "PCMU" or nil }) }))
    T.eq(res.status, 200, res.body)
    T.ok(call:wait(function()
      return call.received_bytes + (call.dropped_bytes_unplayable or 0) >= 400
    end, 3000), "the app's media reached the fake")
    if mode then
      T.eq({ call.received_bytes, call.errors }, { 400, {} }, "played")
    else
      T.eq({ call.received_bytes, call.dropped_bytes_unplayable }, { 0, 400 }, "dropped, not played")
      T.match(call.errors[1], "stream_bidirectional_mode")
    end
    call:hangup()
    T.ok(call:wait(function()
      return call.done
    end, 3000), "its call.hangup delivered")
  end
end)

T.run()
