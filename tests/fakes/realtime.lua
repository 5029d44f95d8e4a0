--- fakes.realtime: an OpenAI Realtime (GA shape) server for tests and benchmarks.
--
-- It runs in the test process on loopback, speaks the GA wire protocol, is
-- driven by a per-session script and records what clients send.
--
--   local fake = require "fakes.realtime"
--   local rt = assert(fake.start{
--     api_key = "sk-test",          -- required: "Authorization: Bearer <api_key>"
--     script = function(session) end, -- optional, one task per session, started
--                                   -- right after session.created (default below)
--     light = false,                -- true: count input audio, keep neither the
--                                   -- bytes nor the append events (benchmarks)
--     session_defaults = {...},     -- optional fields merged over the default
--                                   -- session (as a session.update would)
--     rate_limits = true,           -- send rate_limits.updated after response.done
--     refuse_update = nil,          -- {code, message}: every session.update is
--                                   -- answered with that error (a model or key
--                                   -- the service will not serve), or true: with
--                                   -- nothing at all (a service that hangs);
--                                   -- {code, message, sessions = n}: only the
--                                   -- first n sessions are refused (a rate
--                                   -- limit that passes)
--                                   -- {code, message, updates = m}: only the
--                                   -- first m session.updates of a session are
--                                   -- refused (a field of the setup; a later
--                                   -- update without it is applied)
--     update_delay_ms = nil,        -- each session.update is answered (applied
--                                   -- or refused) this long after it came, as
--                                   -- by a slow service, and never before the
--                                   -- one before it (a session's events are
--                                   -- answered in order); a list: the i-th
--                                   -- update's (the last for those after)
--     keep_formats = false,         -- true: the audio formats of a session.update
--                                   -- are not applied (the defaults, 24 kHz PCM
--                                   -- both ways, stay and are echoed), as by a
--                                   -- service that does not take them
--     fail_responses = nil,         -- {code, message, type = ...}: every
--                                   -- response.create is taken and its response
--                                   -- fails at once (as fail_next_create), as
--                                   -- all do on an account whose quota is used up
--     no_response_metadata = false, -- true: response.metadata is an unknown
--                                   -- parameter (a service without it)
--     session_max_ms = nil,         -- the session limit (OpenAI's is 60 min):
--                                   -- that long after session.created, an
--                                   -- `error` session_expired and close 1000,
--                                   -- with no warning before (session.expired_at)
--     max_connections = 4096,
--     tls = { cert = ..., key = ... }, -- optional: serve wss:// (see tests/lib/certs.lua)
--   })
--   rt.url                 "ws://127.0.0.1:PORT/v1/realtime" (wss:// with tls; clients add ?model=...)
--   rt.port, rt.sessions   sessions in connection order (rejected ones too)
--   rt:wait_session([timeout_ms]) -> session, or nil, "ETIMEDOUT" (inside a task):
--                          the next session not yet taken, in connection order
--   rt:close()             stops listening, closes every session
--
-- Per connection: the model comes from the query; a wrong or missing bearer
-- gets an `error` (invalid_request_error / invalid_api_key) and close 1008;
-- an `OpenAI-Beta: realtime=v1` header gets `beta_api_shape_disabled` and close
-- 1008 (session.rejected holds the code; no script runs). Else session.created
-- is sent first, then the script task starts.
--
-- Client events handled like the service does:
--   session.update    GA validation: session.type "realtime" is required
--                     (missing_required_parameter), any field outside the GA
--                     schema - the beta ones included (session.voice,
--                     input_audio_format, output_audio_format,
--                     input_audio_transcription, turn_detection, modalities,
--                     temperature, ...) or a misspelt one of turn_detection
--                     or transcription - is unknown_parameter with param;
--                     bad formats/voices are invalid_value; a tool not in the
--                     GA shape {type "function", name, description, parameters}
--                     (Chat Completions' {type, function = {...}}, say) is
--                     unknown_parameter or missing_required_parameter, as in
--                     response.create's response.tools. A rejected update is
--                     not applied. A valid one is merged (session, audio,
--                     audio.input and audio.output field by field; deeper values
--                     replaced whole) and answered with session.updated.
--   input_audio_buffer.append   base64 decoded into session.input_audio
--   input_audio_buffer.commit / clear   committed (+ user item) / cleared; a
--                     commit during user_speech{until_commit} commits that
--                     speech, and its transcription follows
--   conversation.item.create    conversation.item.added + .done (a message's
--                     role must be system, user or assistant, its content
--                     parts of that role's types: input_text for system;
--                     input_text, input_audio, input_image for user;
--                     output_text, output_audio for assistant); a
--                     function_call_output goes to session.function_outputs
--   conversation.item.truncate  checked against the assistant audio sent for
--                     that item: conversation.item.truncated or an error
--   conversation.item.delete    conversation.item.deleted
--   response.create   recorded in session.response_creates; while a response
--                     is active: error conversation_already_has_active_response;
--                     response.metadata (at most 16 string values) is checked
--                     and carried by the response it starts (the next speak or
--                     call_function that is not opts.auto); an error answering
--                     it carries its event_id
--   response.cancel   cancels the active response (speak ends "cancelled"),
--                     else error response_cancel_not_active
--   anything else     error invalid_value (param "type")
--
-- Session (all fields readable by tests):
--   session.id, .model, .query, .headers (lowercase names), .config (the
--   merged GA session object), .events (client events decoded, in order, each
--   with .at = timer.now(); an append event keeps .audio_bytes instead of its
--   base64 .audio), .input_audio (all appended bytes, concatenated),
--   .input_bytes, .appends, .first_append_at, .truncates (each event, with .ok
--   or .error), .function_outputs (the items), .response_creates (the accepted
--   events; # is the count), .responses (results of speak/call_function),
--   .errors_sent (error objects sent), .failed_responses (responses failed
--   by fail_next_create or fail_responses), .closed = {code, reason} once closed
--   (.closed_at), .rejected (auth/beta code), .script_error, .script_done.
--   session:input_ms()           input audio received, in ms of the input format
--   session:send(tbl_or_json)    one server event (tables get an event_id)
--   session:wait_event(type, [timeout_ms]) -> the next client event of that type
--       not yet waited for (also ones already received), or nil, "ETIMEDOUT" /
--       nil, "ECLOSED". Appends are not queued here: use wait_audio.
--   session:wait_audio(bytes, [timeout_ms]) -> input_bytes once >= bytes
--   session:speak(opts) -> {response_id, item_id, sent_bytes, cancelled, status,
--       reason, transcript, escaped_slashes}. One assistant audio response: response.created,
--       response.output_item.added, conversation.item.added,
--       response.content_part.added, response.output_audio.delta (+
--       response.output_audio_transcript.delta of opts.text spread over the
--       audio), response.output_audio.done, response.output_audio_transcript.done,
--       response.content_part.done, response.output_item.done,
--       conversation.item.done, response.done (usage), rate_limits.updated.
--       opts.audio (raw bytes in the output format) or opts.ms (default 1000)
--       of a 440 Hz tone in the output format (pcmu/pcma 8 bytes/ms, pcm 24 kHz
--       48 bytes/ms); opts.chunk_ms (20); opts.escape_slashes (write "/" in
--       the base64 as "\/", as some JSON encoders do; counted in the result's
--       escaped_slashes); opts.pace: true/1 real time (default),
--       a number = that many times real time, false = burst; opts.usage;
--       opts.auto = true: a response the service starts on its own (server
--       VAD), not the answer to a response.create (no metadata).
--       opts.call = {name, args}: the response also calls that function after
--       its audio (a second output item, as a model that says something and
--       calls a function in one turn); its call_id in the result.
--       A delta is sent, then the next one waits until the previous audio's
--       duration has passed; response.done comes when all of it "played".
--       Stops early on response.cancel ("client_cancelled") or on a
--       speech_started from user_speech when turn_detection.interrupt_response
--       is not false ("turn_detected"): then status "cancelled".
--   session:user_speech(opts) -> {item_id, audio_start_ms, audio_end_ms,
--       cancelled_response}. Server VAD events: input_audio_buffer.speech_started,
--       after opts.ms (500) speech_stopped, committed, conversation.item.added,
--       conversation.item.done (user item), then
--       conversation.item.input_audio_transcription.completed {transcript =
--       opts.text}; opts.transcript_delay_ms: the transcription comes that
--       much later, as .delta then .completed (not at all if the session
--       closed meanwhile: as the service's, it is lost). opts.until_commit:
--       speech_started only, and the speech goes on (the phone hung up
--       mid-sentence, no end for VAD to hear) until the client's
--       input_audio_buffer.commit, which commits it as that item and
--       transcribes opts.text (after transcript_delay_ms). session.transcribed
--       counts the transcriptions sent. opts.interrupt = true first waits (opts.wait_ms, 5000) for a
--       speak() in progress that has sent audio, then opts.after_ms more: barge-in.
--       The service does not start a response by itself here: scripts do.
--   session:interrupt(opts)       user_speech with interrupt = true
--   session:call_function(name, args, opts) -> output string, or nil, err.
--       A function_call response (response.created, output_item.added,
--       conversation.item.added, function_call_arguments.delta(s), .done {name,
--       call_id, arguments}, output_item.done, conversation.item.done,
--       response.done), then waits opts.timeout (10000) ms for the client's
--       function_call_output with that call_id. args: table (JSON-encoded) or
--       a JSON string. The call_id is in session.responses[#].call_id.
--       opts.wait = false: returns after response.done, without waiting.
--       opts.auto as for speak.
--   session:report_and_goodbye(report, speak_opts) -> speak()'s result: the
--       end of most scripted calls: report_call with report, then, once the
--       client asks for the goodbye (response.create), speak(speak_opts).
--   session:error(code, message, [type])   an `error` event
--   session:refuse_next_create(code, message)   the next response.create is
--       answered with that error (with its event_id), as the service refuses
--       one for a reason other than an active response
--   session:fail_next_create(code, message, [type])   the next response.create
--       is taken, and its response fails at once: response.created, then
--       response.done with status "failed", no output, zero usage and
--       status_details {type = "failed", error = {type (default
--       "server_error"), code, message}}, as the service ends a response it
--       cannot generate (a tokens-per-minute limit, a quota used up)
--   session:close([code], [reason])       close frame (default 1000)
--   session:drop()   ends the TCP connection with no close frame (conn:abort()):
--       the client sees 1006.
--
-- Default script: wait for the first response.create, then speak 1 s of tone
-- with text "Hello, this is a test.".
local http = require "callagent.http"
local json = require "callagent.json"
local task = require "callagent.task"
local timer = require "callagent.timer"
local crypto = require "callagent.crypto"
local audio = require "callagent.audio"
local log = require "callagent.log"

local M = {}

local null = json.null
local encode = json.encode
local b64enc, b64dec = crypto.base64_encode, crypto.base64_decode
local now = timer.now
local fmt, concat, rep = string.format, table.concat, string.rep
local floor, ceil, max, min = math.floor, math.ceil, math.max, math.min

local MAX_SEND_QUEUE = 8 * 1024 * 1024
local MAX_MESSAGE = 16 * 1024 * 1024

-- Bytes per millisecond of each GA audio format.
local BPM = { ["audio/pcmu"] = 8, ["audio/pcma"] = 8, ["audio/pcm"] = 48 }
local VOICES = {}
for _, v in ipairs({ "alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar" }) do
  VOICES[v] = true
end

-- Ids: a random per-process prefix and a counter (cheap, unique, id-shaped).
local id_prefix = crypto.to_hex(crypto.random_bytes(4))
local id_seq = 0
local function new_id(kind)
  id_seq = id_seq + 1
  return fmt("%s_%s%06d", kind, id_prefix, id_seq)
end

-- Waiting ---------------------------------------------------------------------

local waiters = require "fakes.waiters"
local wait_for, notify = waiters.wait_for, waiters.notify

-- Audio -----------------------------------------------------------------------

-- 50 ms holds exactly 22 periods of 440 Hz, so a 50 ms block repeats seamlessly.
local tone_blocks = {}
local function tone(format, ms)
  local block = tone_blocks[format]
  if not block then
    local rate = format == "audio/pcm" and 24000 or 8000
    local n = rate // 20
    local parts = {}
    for i = 0, n - 1 do
      parts[i + 1] = string.pack("<i2", floor(8000 * math.sin(2 * math.pi * 440 * i / rate) + 0.5))
    end
    local pcm = concat(parts)
    if format == "audio/pcmu" then
      block = audio.ulaw_encode(pcm)
    elseif format == "audio/pcma" then
      block = audio.alaw_encode(pcm)
    else
      block = pcm
    end
    tone_blocks[format] = block
  end
  local bytes = floor(ms * BPM[format])
  if format == "audio/pcm" then
    bytes = bytes - bytes % 2
  end
  return rep(block, ceil(bytes / #block)):sub(1, bytes)
end
M.tone = tone

-- Session object ----------------------------------------------------------------

local Session = {}
local session_mt = {
  __index = function(s, k)
    if k == "input_audio" then
      local chunks = rawget(s, "_audio")
      if #chunks > 1 then
        local all = concat(chunks)
        rawset(s, "_audio", { all })
        return all
      end
      return chunks[1] or ""
    end
    return Session[k]
  end,
}

local function default_config(model)
  return {
    type = "realtime",
    object = "realtime.session",
    id = new_id("sess"),
    model = model or "gpt-realtime",
    output_modalities = json.array({ "audio" }),
    instructions = "",
    tools = json.array({}),
    tool_choice = "auto",
    max_output_tokens = "inf",
    tracing = null,
    prompt = null,
    truncation = "auto",
    expires_at = os.time() + 3600,
    include = null,
    audio = {
      input = {
        format = { type = "audio/pcm", rate = 24000 },
        transcription = null,
        noise_reduction = null,
        turn_detection = {
          type = "server_vad",
          threshold = 0.5,
          prefix_padding_ms = 300,
          silence_duration_ms = 200,
          idle_timeout_ms = null,
          create_response = true,
          interrupt_response = true,
        },
      },
      output = { format = { type = "audio/pcm", rate = 24000 }, voice = "alloy", speed = 1.0 },
    },
  }
end

function Session:send(ev)
  local s = ev
  if type(ev) == "table" then
    if ev.event_id == nil then
      ev.event_id = new_id("event")
    end
    s = encode(ev)
  end
  if self._ended then
    return nil, "ECLOSED: the session is closed"
  end
  return self.conn:send(s)
end

local function send_error(self, code, message, param, client_event_id, etype)
  local e = {
    type = etype or "invalid_request_error",
    code = code or null,
    message = message,
    param = param or null,
    event_id = client_event_id or null,
  }
  self.errors_sent[#self.errors_sent + 1] = e
  return self:send({ type = "error", error = e })
end

function Session:error(code, message, etype)
  return send_error(self, code, message or code, nil, nil, etype)
end

function Session:refuse_next_create(code, message)
  self._refuse_create = { code, message or code }
end

function Session:fail_next_create(code, message, etype)
  self._fail_create = { code = code, message = message or code, type = etype }
end

function Session:close(code, reason)
  if not self._ended then
    self.conn:close(code or 1000, reason)
  end
end

function Session:drop()
  if self._ended then
    return
  end
  -- The connection ends at once, without a close frame (the client sees 1006).
  self.dropped = true
  self.conn:abort()
end

function Session:output_format()
  local out = type(self.config.audio) == "table" and self.config.audio.output
  local f = type(out) == "table" and out.format
  return type(f) == "table" and f.type or "audio/pcm"
end

function Session:input_format()
  local inp = type(self.config.audio) == "table" and self.config.audio.input
  local f = type(inp) == "table" and inp.format
  return type(f) == "table" and f.type or "audio/pcm"
end

function Session:input_ms()
  return self.input_bytes / (BPM[self:input_format()] or 48)
end

local function turn_detection(self)
  local inp = type(self.config.audio) == "table" and self.config.audio.input
  local td = type(inp) == "table" and inp.turn_detection
  return type(td) == "table" and td or nil
end

-- Pending events per type, for wait_event.
local function pending_push(self, ev)
  local q = self._pending[ev.type]
  if not q then
    q = { first = 1, last = 0 }
    self._pending[ev.type] = q
  end
  q.last = q.last + 1
  q[q.last] = ev
end

local function pending_pop(self, typ)
  local q = self._pending[typ]
  if q and q.first <= q.last then
    local ev = q[q.first]
    q[q.first] = nil
    q.first = q.first + 1
    return ev
  end
end

function Session:wait_event(typ, timeout_ms)
  return wait_for(self, function()
    return pending_pop(self, typ)
  end, timeout_ms)
end

function Session:wait_audio(bytes, timeout_ms)
  return wait_for(self, function()
    return self.input_bytes >= bytes and self.input_bytes
  end, timeout_ms)
end

-- Sleeps ms inside a response, returning early when it is cancelled.
local function pause(resp, ms)
  if ms <= 0 or resp.cancel_reason then
    return
  end
  task.await(function(done)
    local t = timer.after(ceil(ms), done)
    resp.wake = function()
      t:stop()
      done()
    end
  end)
  resp.wake = nil
end

local function cancel_active(self, reason)
  local resp = self._active
  if resp and not resp.cancel_reason then
    resp.cancel_reason = reason
    if resp.wake then
      resp.wake()
    end
    return resp.id
  end
end

local function response_object(self, rid, status, details, output, usage, metadata)
  local out = self.config.audio and self.config.audio.output or {}
  return {
    object = "realtime.response",
    id = rid,
    status = status,
    status_details = details or null,
    output = json.array(output or {}),
    conversation_id = self.conversation_id,
    output_modalities = json.array({ "audio" }),
    max_output_tokens = "inf",
    audio = { output = { format = out.format or null, voice = out.voice or null } },
    usage = usage or null,
    metadata = metadata or null,
  }
end

-- The metadata of the response.create a response answers (none for one the
-- service starts on its own): the latest one accepted, taken once.
local function take_metadata(self, opts)
  if opts.auto then
    return nil
  end
  local ev = self._create_pending
  self._create_pending = nil
  return ev and type(ev.response) == "table" and ev.response.metadata or nil
end

local function default_usage(self, out_ms, text)
  local n = #self.responses
  local in_audio = floor(self:input_ms() / 100)
  local in_text = 180 + 40 * n
  local cached = n > 0 and min(in_text, 128 * n) or 0
  local out_audio = ceil(out_ms / 50)
  local out_text = ceil(#text / 4)
  return {
    total_tokens = in_text + in_audio + out_text + out_audio,
    input_tokens = in_text + in_audio,
    output_tokens = out_text + out_audio,
    input_token_details = { text_tokens = in_text, audio_tokens = in_audio, cached_tokens = cached },
    output_token_details = { text_tokens = out_text, audio_tokens = out_audio },
  }
end

local RATE_LIMITS = '{"type":"rate_limits.updated","event_id":"%s","rate_limits":['
  .. '{"name":"requests","limit":10000,"remaining":9999,"reset_seconds":0.006},'
  .. '{"name":"tokens","limit":2000000,"remaining":%d,"reset_seconds":0.36}]}'

local function finish_response(self, rid, status, details, output, usage, metadata, more)
  local items = { output }
  for _, it in ipairs(more or {}) do
    items[#items + 1] = it
  end
  self:send({ type = "response.done", response = response_object(self, rid, status, details, items, usage,
    metadata) })
  if self.rt.opts.rate_limits ~= false then
    self:send(fmt(RATE_LIMITS, new_id("event"), 2000000 - (usage.total_tokens or 0)))
  end
end

function Session:speak(opts)
  opts = opts or {}
  assert(not self._active, "speak: another response is still in progress")
  local format = self:output_format()
  local bpm = BPM[format] or 48
  local data = opts.audio or tone(format, opts.ms or 1000)
  local text = opts.text or ""
  local rid, iid = new_id("resp"), new_id("item")
  local resp = { id = rid, item_id = iid, sent_bytes = 0 }
  self._active = resp
  local metadata = take_metadata(self, opts)
  local item = { id = iid, role = "assistant", bpm = bpm, sent_bytes = 0 }
  self.items[iid] = item
  local prev = self.last_item_id or null
  self.last_item_id = iid

  self:send({ type = "response.created", response = response_object(self, rid, "in_progress", nil, nil, nil,
    metadata) })
  local item_obj = {
    id = iid,
    object = "realtime.item",
    type = "message",
    status = "in_progress",
    role = "assistant",
    content = json.array({}),
  }
  self:send({ type = "response.output_item.added", response_id = rid, output_index = 0, item = item_obj })
  self:send({ type = "conversation.item.added", previous_item_id = prev, item = item_obj })
  self:send({
    type = "response.content_part.added",
    response_id = rid,
    item_id = iid,
    output_index = 0,
    content_index = 0,
    part = { type = "audio", transcript = "" },
  })

  local words = {}
  for w in text:gmatch("%S+%s*") do
    words[#words + 1] = w
  end
  local said = {}
  local head = fmt('{"type":"response.output_audio.delta","response_id":"%s","item_id":"%s",'
    .. '"output_index":0,"content_index":0,"event_id":"', rid, iid)
  local thead = fmt('{"type":"response.output_audio_transcript.delta","response_id":"%s","item_id":"%s",'
    .. '"output_index":0,"content_index":0,"event_id":"', rid, iid)
  local function say_upto(k)
    while #said < k do
      local w = words[#said + 1]
      said[#said + 1] = w
      self:send(thead .. new_id("event") .. '","delta":' .. encode(w) .. "}")
    end
  end

  local chunk = max(1, floor((opts.chunk_ms or 20) * bpm))
  if bpm == 48 then
    chunk = max(2, chunk - chunk % 2)
  end
  local n = ceil(#data / chunk)
  local speed = opts.pace
  if speed == nil or speed == true then
    speed = 1
  end
  local t0 = now()
  for i = 1, n do
    if resp.cancel_reason or self._ended then
      break
    end
    local piece = data:sub((i - 1) * chunk + 1, i * chunk)
    local b64 = b64enc(piece)
    if opts.escape_slashes then
      local k
      b64, k = b64:gsub("/", "\\/")
      resp.escaped_slashes = (resp.escaped_slashes or 0) + k
    end
    if not self.conn:send(head .. new_id("event") .. '","delta":"' .. b64 .. '"}') then
      resp.cancel_reason = "send_failed"
      break
    end
    resp.sent_bytes = resp.sent_bytes + #piece
    item.sent_bytes = resp.sent_bytes
    say_upto(floor(i * #words / n))
    if speed then
      pause(resp, t0 + resp.sent_bytes / bpm / speed - now())
    end
  end
  local cancelled = resp.cancel_reason ~= nil or self._ended
  if not cancelled then
    say_upto(#words)
  end
  local transcript = concat(said)
  local status = cancelled and "cancelled" or "completed"
  local done_item = {
    id = iid,
    object = "realtime.item",
    type = "message",
    status = cancelled and "incomplete" or "completed",
    role = "assistant",
    content = { { type = "output_audio", transcript = transcript } },
  }
  local common = { response_id = rid, item_id = iid, output_index = 0, content_index = 0 }
  local function ev(t, extra)
    local e = { type = t }
    for k, v in pairs(common) do
      e[k] = v
    end
    for k, v in pairs(extra or {}) do
      e[k] = v
    end
    return e
  end
  local usage = opts.usage or default_usage(self, resp.sent_bytes / bpm, transcript)
  local details = cancelled and { type = "cancelled", reason = resp.cancel_reason or "client_cancelled" } or nil
  if not self._ended then
    self:send(ev("response.output_audio.done"))
    self:send(ev("response.output_audio_transcript.done", { transcript = transcript }))
    self:send(ev("response.content_part.done", { part = { type = "audio", transcript = transcript } }))
    self:send({ type = "response.output_item.done", response_id = rid, output_index = 0, item = done_item })
    self:send({ type = "conversation.item.done", previous_item_id = prev, item = done_item })
    local more
    if opts.call and not cancelled then
      -- A function call after the audio, in the same response (output_index 1).
      local fc = opts.call
      local fid, cid = new_id("item"), new_id("call")
      local arguments = type(fc[2]) == "string" and fc[2] or encode(fc[2] or {})
      local fitem = { id = fid, object = "realtime.item", type = "function_call", status = "in_progress", name = fc[1],
        call_id = cid, arguments = "" }
      self:send({ type = "response.output_item.added", response_id = rid, output_index = 1, item = fitem })
      self:send({ type = "conversation.item.added", previous_item_id = iid, item = fitem })
      self:send({ type = "response.function_call_arguments.delta", response_id = rid, item_id = fid, output_index = 1,
        call_id = cid, delta = arguments })
      self:send({ type = "response.function_call_arguments.done", response_id = rid, item_id = fid, output_index = 1,
        call_id = cid, name = fc[1], arguments = arguments })
      local fdone = { id = fid, object = "realtime.item", type = "function_call", status = "completed", name = fc[1],
        call_id = cid, arguments = arguments }
      self:send({ type = "response.output_item.done", response_id = rid, output_index = 1, item = fdone })
      self:send({ type = "conversation.item.done", previous_item_id = iid, item = fdone })
      self.last_item_id = fid
      more = { fdone }
      resp.call_id = cid
    end
    finish_response(self, rid, status, details, done_item, usage, metadata, more)
  end
  self._active = nil
  self.produced_audio = true
  local result = {
    response_id = rid,
    item_id = iid,
    sent_bytes = resp.sent_bytes,
    cancelled = cancelled,
    status = status,
    reason = details and details.reason,
    transcript = transcript,
    usage = usage,
    escaped_slashes = resp.escaped_slashes,
    call_id = resp.call_id,
  }
  self.responses[#self.responses + 1] = result
  notify(self)
  return result
end

local function user_item(iid, transcript)
  return {
    id = iid,
    object = "realtime.item",
    type = "message",
    status = "completed",
    role = "user",
    content = { { type = "input_audio", transcript = transcript or null } },
  }
end

function Session:user_speech(opts)
  opts = opts or {}
  if opts.interrupt then
    local ok, err = wait_for(self, function()
      return self._active and self._active.sent_bytes > 0
    end, opts.wait_ms or 5000)
    if not ok then
      return nil, err
    end
    if opts.after_ms then
      timer.sleep(opts.after_ms)
    end
  end
  if self._ended then
    return nil, "ECLOSED"
  end
  local iid = new_id("item")
  local ms = opts.ms or 500
  local start_ms = floor(self:input_ms())
  self:send({ type = "input_audio_buffer.speech_started", audio_start_ms = start_ms, item_id = iid })
  local td = turn_detection(self)
  local cancelled
  if td and td.interrupt_response ~= false then
    cancelled = cancel_active(self, "turn_detected")
  end
  timer.sleep(ms)
  if self._ended then
    return nil, "ECLOSED"
  end
  local end_ms = start_ms + ms
  if opts.until_commit then
    -- Speech that goes on: the service's VAD never hears its end (the
    -- phone hung up mid-sentence). Only the client's commit ends it.
    self._speaking = { item_id = iid, text = opts.text or "", delay = opts.transcript_delay_ms }
    return { item_id = iid, audio_start_ms = start_ms }
  end
  local prev = self.last_item_id or null
  self.last_item_id = iid
  self._buffered = 0
  self:send({ type = "input_audio_buffer.speech_stopped", audio_end_ms = end_ms, item_id = iid })
  self:send({ type = "input_audio_buffer.committed", previous_item_id = prev, item_id = iid })
  self:send({ type = "conversation.item.added", previous_item_id = prev, item = user_item(iid) })
  self:send({ type = "conversation.item.done", previous_item_id = prev, item = user_item(iid) })
  self:_transcribe(iid, opts.text or "", opts.transcript_delay_ms)
  return { item_id = iid, audio_start_ms = start_ms, audio_end_ms = end_ms, cancelled_response = cancelled }
end

-- The transcription of a committed user item, as the service sends it: at
-- once, or delay_ms later (in its own task) as .delta then .completed;
-- nothing once the session has closed (the words are lost).
function Session:_transcribe(iid, text, delay_ms)
  local function send()
    if self._ended then
      return
    end
    if delay_ms then
      self:send({ type = "conversation.item.input_audio_transcription.delta", item_id = iid, content_index = 0,
        delta = text })
    end
    self:send({ type = "conversation.item.input_audio_transcription.completed", item_id = iid, content_index = 0,
      transcript = text })
    self.transcribed = (self.transcribed or 0) + 1
    notify(self)
  end
  if not delay_ms then
    return send()
  end
  task.spawn(function()
    timer.sleep(delay_ms)
    send()
  end)
end

function Session:interrupt(opts)
  local o = {}
  for k, v in pairs(opts or {}) do
    o[k] = v
  end
  o.interrupt = true
  return self:user_speech(o)
end

-- Splits s into pieces of about size bytes, never inside a UTF-8 sequence.
local function split_utf8(s, size)
  local out, i = {}, 1
  while i <= #s do
    local j = min(#s, i + size - 1)
    while j < #s and s:byte(j + 1) >= 0x80 and s:byte(j + 1) < 0xC0 do
      j = j + 1
    end
    out[#out + 1] = s:sub(i, j)
    i = j + 1
  end
  return out
end

function Session:report_and_goodbye(report, speak_opts)
  self:call_function("report_call", report)
  self:wait_event("response.create", 5000)
  return self:speak(speak_opts)
end

function Session:call_function(name, args, opts)
  opts = opts or {}
  assert(type(name) == "string", "call_function: name must be a string")
  assert(not self._active, "call_function: another response is still in progress")
  local arguments = type(args) == "string" and args or encode(args or {})
  local rid, iid, cid = new_id("resp"), new_id("item"), new_id("call")
  local prev = self.last_item_id or null
  self.last_item_id = iid
  local result = { response_id = rid, item_id = iid, call_id = cid, name = name, arguments = arguments }
  self.responses[#self.responses + 1] = result
  local metadata = take_metadata(self, opts)

  self:send({ type = "response.created", response = response_object(self, rid, "in_progress", nil, nil, nil,
    metadata) })
  local item_obj = {
    id = iid,
    object = "realtime.item",
    type = "function_call",
    status = "in_progress",
    name = name,
    call_id = cid,
    arguments = "",
  }
  self:send({ type = "response.output_item.added", response_id = rid, output_index = 0, item = item_obj })
  self:send({ type = "conversation.item.added", previous_item_id = prev, item = item_obj })
  for _, piece in ipairs(split_utf8(arguments, opts.delta_size or 24)) do
    self:send({
      type = "response.function_call_arguments.delta",
      response_id = rid,
      item_id = iid,
      output_index = 0,
      call_id = cid,
      delta = piece,
    })
  end
  self:send({
    type = "response.function_call_arguments.done",
    response_id = rid,
    item_id = iid,
    output_index = 0,
    call_id = cid,
    name = name,
    arguments = arguments,
  })
  local done_item = {
    id = iid,
    object = "realtime.item",
    type = "function_call",
    status = "completed",
    name = name,
    call_id = cid,
    arguments = arguments,
  }
  self:send({ type = "response.output_item.done", response_id = rid, output_index = 0, item = done_item })
  self:send({ type = "conversation.item.done", previous_item_id = prev, item = done_item })
  local usage = opts.usage or default_usage(self, 0, arguments)
  result.usage = usage
  finish_response(self, rid, "completed", nil, done_item, usage, metadata)
  if opts.wait == false then
    return result
  end

  local out, err = wait_for(self, function()
    for _, item in ipairs(self.function_outputs) do
      if item.call_id == cid and not item.taken then
        item.taken = true
        return item
      end
    end
  end, opts.timeout or 10000)
  if not out then
    return nil, err
  end
  result.output = out.output
  return out.output
end

-- Validation of session.update (GA schema) -------------------------------------

local SESSION_KEYS = {
  type = true,
  model = true,
  instructions = true,
  output_modalities = true,
  audio = true,
  tools = true,
  tool_choice = true,
  max_output_tokens = true,
  tracing = true,
  prompt = true,
  truncation = true,
  include = true,
}
local AUDIO_KEYS = { input = true, output = true }
local INPUT_KEYS = { format = true, transcription = true, noise_reduction = true, turn_detection = true }
local OUTPUT_KEYS = { format = true, voice = true, speed = true }
-- The fields of server_vad and semantic_vad together, and of transcription
-- (openai-python types/realtime/realtime_audio_input_turn_detection_param.py,
-- audio_transcription_param.py): a misspelt one is an unknown parameter.
local TURN_DETECTION_KEYS = { type = true, threshold = true, prefix_padding_ms = true, silence_duration_ms = true,
  idle_timeout_ms = true, create_response = true, interrupt_response = true, eagerness = true }
local TRANSCRIPTION_KEYS = { model = true, language = true, prompt = true }
local RESPONSE_KEYS = {
  conversation = true,
  input = true,
  instructions = true,
  max_output_tokens = true,
  metadata = true,
  output_modalities = true,
  prompt = true,
  tool_choice = true,
  tools = true,
  audio = true,
}

local function sorted_keys(t)
  local ks = {}
  for k in pairs(t) do
    ks[#ks + 1] = tostring(k)
  end
  table.sort(ks)
  return ks
end

-- Returns nil when t only has allowed keys, else the first unknown one.
local function unknown_key(t, allowed)
  for _, k in ipairs(sorted_keys(t)) do
    if not allowed[k] then
      return k
    end
  end
end

local function unknown(param)
  return "unknown_parameter", "Unknown parameter: '" .. param .. "'.", param
end

local function invalid(param, value, detail)
  return "invalid_value", fmt("Invalid value: '%s'. %s", tostring(value), detail), param
end

local function check_format(f, param)
  if type(f) ~= "table" then
    return invalid(param, f, "Expected an object like {\"type\": \"audio/pcmu\"}.")
  end
  if not BPM[f.type] then
    return invalid(param .. ".type", f.type, "Supported values are: 'audio/pcm', 'audio/pcmu', and 'audio/pcma'.")
  end
  local k = unknown_key(f, { type = true, rate = true })
  if k then
    return unknown(param .. "." .. k)
  end
  if f.rate ~= nil and (f.type ~= "audio/pcm" or f.rate ~= 24000) then
    return invalid(param .. ".rate", f.rate, "Supported values are: 24000.")
  end
end

-- A GA function tool is flat: {type = "function", name, description,
-- parameters} (openai-python types/realtime/realtime_function_tool_param.py);
-- Chat Completions' {type, function = {...}} is an unknown parameter there.
-- An "mcp" tool is taken as it is.
local FUNCTION_TOOL_KEYS = { type = true, name = true, description = true, parameters = true }

-- Returns code, message, param for a tools array (at param) that is not the GA one, or nil.
local function check_tools(tools, param)
  if type(tools) ~= "table" then
    return invalid(param, tools, "Expected an array of tools.")
  end
  for i, t in ipairs(tools) do
    local p = fmt("%s[%d]", param, i - 1)
    if type(t) ~= "table" then
      return invalid(p, t, "Expected an object.")
    end
    if t.type == "function" then
      local k = unknown_key(t, FUNCTION_TOOL_KEYS)
      if k then
        return unknown(p .. "." .. k)
      end
      if type(t.name) ~= "string" or t.name == "" then
        return "missing_required_parameter", "Missing required parameter: '" .. p .. ".name'.", p .. ".name"
      end
    elseif t.type ~= "mcp" then
      return invalid(p .. ".type", t.type, "Supported values are: 'function' and 'mcp'.")
    end
  end
end

-- Returns code, message, param for an invalid GA session object, or nil.
local function check_session(s, produced_audio, current_voice)
  if type(s) ~= "table" then
    return "missing_required_parameter", "Missing required parameter: 'session'.", "session"
  end
  local k = unknown_key(s, SESSION_KEYS)
  if k then
    return unknown("session." .. k)
  end
  if s.type == nil then
    return "missing_required_parameter", "Missing required parameter: 'session.type'.", "session.type"
  end
  if s.type ~= "realtime" then
    return invalid("session.type", s.type, "Supported values are: 'realtime'.")
  end
  if s.output_modalities ~= nil then
    local m = s.output_modalities
    if type(m) ~= "table" or #m ~= 1 or (m[1] ~= "audio" and m[1] ~= "text") then
      return invalid("session.output_modalities", encode(m), "Supported values are: ['audio'] or ['text'].")
    end
  end
  local a = s.audio
  if a ~= nil then
    if type(a) ~= "table" then
      return invalid("session.audio", a, "Expected an object.")
    end
    k = unknown_key(a, AUDIO_KEYS)
    if k then
      return unknown("session.audio." .. k)
    end
    local i, o = a.input, a.output
    if i ~= nil then
      if type(i) ~= "table" then
        return invalid("session.audio.input", i, "Expected an object.")
      end
      k = unknown_key(i, INPUT_KEYS)
      if k then
        return unknown("session.audio.input." .. k)
      end
      if i.format ~= nil then
        local c, m, p = check_format(i.format, "session.audio.input.format")
        if c then
          return c, m, p
        end
      end
      local td = i.turn_detection
      if td ~= nil and td ~= null then
        if type(td) ~= "table" or (td.type ~= "server_vad" and td.type ~= "semantic_vad") then
          return invalid("session.audio.input.turn_detection.type", type(td) == "table" and td.type or td,
            "Supported values are: 'server_vad' and 'semantic_vad'.")
        end
        k = unknown_key(td, TURN_DETECTION_KEYS)
        if k then
          return unknown("session.audio.input.turn_detection." .. k)
        end
      end
      local tr = i.transcription
      if tr ~= nil and tr ~= null then
        if type(tr) ~= "table" then
          return invalid("session.audio.input.transcription", tr, "Expected an object.")
        end
        k = unknown_key(tr, TRANSCRIPTION_KEYS)
        if k then
          return unknown("session.audio.input.transcription." .. k)
        end
      end
    end
    if o ~= nil then
      if type(o) ~= "table" then
        return invalid("session.audio.output", o, "Expected an object.")
      end
      k = unknown_key(o, OUTPUT_KEYS)
      if k then
        return unknown("session.audio.output." .. k)
      end
      if o.format ~= nil then
        local c, m, p = check_format(o.format, "session.audio.output.format")
        if c then
          return c, m, p
        end
      end
      if o.voice ~= nil then
        if not VOICES[o.voice] then
          return invalid("session.audio.output.voice", o.voice,
            "Supported values are: 'alloy', 'ash', 'ballad', 'coral', 'echo', 'sage', 'shimmer', 'verse', 'marin', and 'cedar'.")
        end
        if produced_audio and o.voice ~= current_voice then
          return "cannot_update_voice", "Cannot update a conversation's voice if assistant audio is present.",
            "session.audio.output.voice"
        end
      end
    end
  end
  if s.tools ~= nil then
    return check_tools(s.tools, "session.tools")
  end
end

-- Known empty-array fields: cjson decodes [] as an empty table, which would
-- encode back as {}.
local function fix_arrays(cfg)
  for _, k in ipairs({ "tools", "output_modalities" }) do
    if type(cfg[k]) == "table" and next(cfg[k]) == nil then
      cfg[k] = json.array({})
    end
  end
end

local function merge_session(cfg, s)
  for k, v in pairs(s) do
    if k == "audio" and type(v) == "table" then
      if type(cfg.audio) ~= "table" then
        cfg.audio = {}
      end
      for side, sv in pairs(v) do
        if type(sv) == "table" and type(cfg.audio[side]) == "table" then
          for f, fv in pairs(sv) do
            cfg.audio[side][f] = fv
          end
        else
          cfg.audio[side] = sv
        end
      end
    else
      cfg[k] = v
    end
  end
  fix_arrays(cfg)
end

-- Client events -----------------------------------------------------------------

local handlers = {}

-- JSON Schema keywords whose value is an array: the service refuses a
-- function whose parameters give one of them as an object (an empty Lua
-- table encodes as {}).
local SCHEMA_ARRAYS = { required = true, enum = true, anyOf = true, oneOf = true, allOf = true, prefixItems = true }

local function schema_error(v, depth)
  if type(v) ~= "table" or depth > 30 then
    return nil
  end
  for k, x in pairs(v) do
    if SCHEMA_ARRAYS[k] and type(x) == "table" and next(x) == nil and not json.is_array(x) then
      return "'" .. k .. "' is not of type 'array'"
    end
    local e = schema_error(x, depth + 1)
    if e then
      return e
    end
  end
end

-- The answer to a session.update (its tools' schemas checked already).
local function answer_update(self, ev)
  local refuse = self.rt.opts.refuse_update
  if type(refuse) == "table" and refuse.sessions and self.index > refuse.sessions then
    refuse = nil -- only the first refuse.sessions sessions are refused
  end
  self.updates_answered = (self.updates_answered or 0) + 1
  if type(refuse) == "table" and refuse.updates and self.updates_answered > refuse.updates then
    refuse = nil -- only the first refuse.updates updates of the session are refused
  end
  if refuse == true then
    return
  elseif refuse then
    return send_error(self, refuse[1], refuse[2], nil, ev.event_id)
  end
  local out = self.config.audio and self.config.audio.output
  local code, msg, param = check_session(ev.session, self.produced_audio, type(out) == "table" and out.voice)
  if code then
    return send_error(self, code, msg, param, ev.event_id)
  end
  local kept = self.rt.opts.keep_formats and self.config.audio
    and { self.config.audio.input.format, self.config.audio.output.format }
  merge_session(self.config, ev.session)
  if kept then
    self.config.audio.input.format, self.config.audio.output.format = kept[1], kept[2]
  end
  self.updates = self.updates + 1
  self:send({ type = "session.updated", session = self.config })
end

handlers["session.update"] = function(self, ev, raw)
  -- Read again keeping [] apart from {}: cjson decodes both as an empty table.
  local exact = json.try_decode(raw, true)
  for i, tool in ipairs(type(exact) == "table" and type(exact.session) == "table"
    and type(exact.session.tools) == "table" and exact.session.tools or {}) do
    local e = type(tool) == "table" and schema_error(tool.parameters, 0)
    if e then
      return send_error(self, "invalid_function_parameters", "Invalid schema for function '" .. tostring(tool.name)
        .. "': " .. e .. ".", "session.tools[" .. (i - 1) .. "].parameters", ev.event_id)
    end
  end
  local delay = self.rt.opts.update_delay_ms
  self.updates_received = (self.updates_received or 0) + 1
  if type(delay) == "table" then
    delay = delay[math.min(self.updates_received, #delay)]
  end
  if delay or self._update_due then
    -- Answered (applied, refused) later, as by a slow service, and in the
    -- order they came (not before the one before); nothing once the session
    -- has closed.
    local due = math.max(now() + (delay or 0), self._update_due and self._update_due + 1 or 0)
    self._update_due = due
    return timer.after(math.max(0, due - now()), function()
      if self._update_due == due then
        self._update_due = nil
      end
      if not self._ended then
        answer_update(self, ev)
      end
    end)
  end
  return answer_update(self, ev)
end

handlers["input_audio_buffer.commit"] = function(self, ev)
  local ms = self._buffered / (BPM[self:input_format()] or 48)
  if ms < 100 then
    return send_error(self, "input_audio_buffer_commit_empty",
      fmt("Error committing input audio buffer: buffer too small. Expected at least 100ms of audio, but buffer only has %.2fms of audio.", ms),
      nil, ev.event_id)
  end
  self._buffered = 0
  local speaking = self._speaking
  self._speaking = nil
  local iid = speaking and speaking.item_id or new_id("item")
  local prev = self.last_item_id or null
  self.last_item_id = iid
  self:send({ type = "input_audio_buffer.committed", previous_item_id = prev, item_id = iid })
  self:send({ type = "conversation.item.added", previous_item_id = prev, item = user_item(iid) })
  self:send({ type = "conversation.item.done", previous_item_id = prev, item = user_item(iid) })
  if speaking then
    self:_transcribe(iid, speaking.text, speaking.delay)
  end
end

handlers["input_audio_buffer.clear"] = function(self)
  self._buffered = 0
  self:send({ type = "input_audio_buffer.cleared" })
end

-- The content part types of a message item, by role (openai-python
-- types/realtime/realtime_conversation_item_{system,user,assistant}_message_param.py);
-- [1]: them as an error message lists them.
local MESSAGE_CONTENT = {
  system = { "'input_text'", input_text = true },
  user = { "'input_text', 'input_audio', 'input_image'", input_text = true, input_audio = true, input_image = true },
  assistant = { "'output_text', 'output_audio'", output_text = true, output_audio = true },
}

handlers["conversation.item.create"] = function(self, ev)
  local item = ev.item
  if type(item) ~= "table" then
    return send_error(self, "missing_required_parameter", "Missing required parameter: 'item'.", "item", ev.event_id)
  end
  local t = item.type
  if t ~= "message" and t ~= "function_call" and t ~= "function_call_output" then
    return send_error(self, "invalid_value",
      fmt("Invalid value: '%s'. Supported values are: 'message', 'function_call', and 'function_call_output'.", tostring(t)),
      "item.type", ev.event_id)
  end
  if t == "message" then
    local allowed = MESSAGE_CONTENT[item.role]
    if not allowed then
      return send_error(self, "invalid_value", fmt("Invalid value: '%s'. Supported values are: 'user', 'assistant', and "
        .. "'system'.", tostring(item.role)), "item.role", ev.event_id)
    end
    if type(item.content) ~= "table" then
      return send_error(self, "missing_required_parameter", "Missing required parameter: 'item.content'.",
        "item.content", ev.event_id)
    end
    for i, part in ipairs(item.content) do
      local pt = type(part) == "table" and part.type
      if type(pt) ~= "string" or not allowed[pt] then
        return send_error(self, "invalid_value", fmt("Invalid value: '%s'. Supported values for a %s message are: %s.",
          tostring(pt), item.role, allowed[1]), fmt("item.content[%d].type", i - 1), ev.event_id)
      end
    end
  end
  if t == "function_call_output" then
    if type(item.call_id) ~= "string" then
      return send_error(self, "missing_required_parameter", "Missing required parameter: 'item.call_id'.",
        "item.call_id", ev.event_id)
    end
    if type(item.output) ~= "string" then
      return send_error(self, "missing_required_parameter", "Missing required parameter: 'item.output'.",
        "item.output", ev.event_id)
    end
  end
  local id = type(item.id) == "string" and item.id or new_id("item")
  local prev = self.last_item_id or null
  self.last_item_id = id
  local echoed = { id = id, object = "realtime.item", status = "completed" }
  for k, v in pairs(item) do
    if echoed[k] == nil then
      echoed[k] = v
    end
  end
  if t == "function_call_output" then
    self.function_outputs[#self.function_outputs + 1] = item
  end
  self:send({ type = "conversation.item.added", previous_item_id = prev, item = echoed })
  self:send({ type = "conversation.item.done", previous_item_id = prev, item = echoed })
end

handlers["conversation.item.truncate"] = function(self, ev)
  self.truncates[#self.truncates + 1] = ev
  local item = type(ev.item_id) == "string" and self.items[ev.item_id]
  local function fail(code, msg, param)
    ev.error = msg
    return send_error(self, code, msg, param, ev.event_id)
  end
  if not item then
    return fail("invalid_value", "Conversation item not found or not an assistant message with audio: '"
      .. tostring(ev.item_id) .. "'.", "item_id")
  end
  if ev.content_index ~= 0 then
    return fail("invalid_value", "Invalid value: '" .. tostring(ev.content_index) .. "'. Only 0 is valid here.",
      "content_index")
  end
  local end_ms = ev.audio_end_ms
  if type(end_ms) ~= "number" or end_ms ~= floor(end_ms) or end_ms < 0 then
    return fail("invalid_value", "Invalid value: '" .. tostring(end_ms) .. "'. Expected a non-negative integer.",
      "audio_end_ms")
  end
  local have = ceil(item.sent_bytes / item.bpm)
  if end_ms > have then
    return fail("invalid_value", fmt("Audio content of %dms is already shorter than %dms", have, end_ms),
      "audio_end_ms")
  end
  ev.ok = true
  item.truncated_ms = end_ms
  self:send({ type = "conversation.item.truncated", item_id = ev.item_id, content_index = 0, audio_end_ms = end_ms })
end

handlers["conversation.item.delete"] = function(self, ev)
  if type(ev.item_id) ~= "string" then
    return send_error(self, "missing_required_parameter", "Missing required parameter: 'item_id'.", "item_id",
      ev.event_id)
  end
  self:send({ type = "conversation.item.deleted", item_id = ev.item_id })
end

handlers["conversation.item.retrieve"] = function() end
handlers["output_audio_buffer.clear"] = function() end

handlers["response.create"] = function(self, ev)
  local r = ev.response
  if r ~= nil then
    if type(r) ~= "table" then
      return send_error(self, "invalid_value", "Invalid value for 'response': expected an object.", "response",
        ev.event_id)
    end
    local k = unknown_key(r, RESPONSE_KEYS)
    if self.rt.opts.no_response_metadata and r.metadata ~= nil then
      k = "metadata"
    end
    if k then
      return send_error(self, "unknown_parameter", "Unknown parameter: 'response." .. k .. "'.", "response." .. k,
        ev.event_id)
    end
    if r.tools ~= nil then
      local code, msg, param = check_tools(r.tools, "response.tools")
      if code then
        return send_error(self, code, msg, param, ev.event_id)
      end
    end
  end
  local meta = r and r.metadata
  if meta ~= nil then
    local n, bad = 0, type(meta) ~= "table"
    for k, v in pairs(bad and {} or meta) do
      n = n + 1
      bad = bad or type(k) ~= "string" or #k > 64 or type(v) ~= "string" or #v > 512
    end
    if bad or n > 16 then
      return send_error(self, "invalid_value", "Invalid 'response.metadata': expected an object of at most 16 "
        .. "string values.", "response.metadata", ev.event_id)
    end
  end
  if self._active then
    return send_error(self, "conversation_already_has_active_response",
      "Conversation already has an active response in progress: " .. self._active.id
        .. ". Wait until the response is finished before creating a new one.", nil, ev.event_id)
  end
  local refuse = self._refuse_create
  if refuse then
    self._refuse_create = nil
    return send_error(self, refuse[1], refuse[2], nil, ev.event_id, "server_error")
  end
  self.response_creates[#self.response_creates + 1] = ev
  local fail = self._fail_create or self.rt.opts.fail_responses
  if fail then
    -- Taken, and the response it starts fails at once: nothing generated,
    -- nothing left pending for a speak() to answer.
    self._fail_create = nil
    local meta = type(r) == "table" and r.metadata or nil
    local rid = new_id("resp")
    self:send({ type = "response.created", response = response_object(self, rid, "in_progress", nil, nil, nil, meta) })
    local e = { type = fail.type or "server_error", code = fail.code or fail[1] or null,
      message = fail.message or fail[2] or "The response failed." }
    local zero = { total_tokens = 0, input_tokens = 0, output_tokens = 0,
      input_token_details = { text_tokens = 0, audio_tokens = 0, cached_tokens = 0 },
      output_token_details = { text_tokens = 0, audio_tokens = 0 } }
    self:send({ type = "response.done", response = response_object(self, rid, "failed", { type = "failed", error = e },
      {}, zero, meta) })
    self.failed_responses = (self.failed_responses or 0) + 1
    return
  end
  self._create_pending = ev
end

handlers["response.cancel"] = function(self, ev)
  if not cancel_active(self, "client_cancelled") then
    return send_error(self, "response_cancel_not_active", "Cancellation failed: no active response found", nil,
      ev.event_id)
  end
end

local decode = require("cjson").decode

local function on_text(self, msg)
  local t = now()
  local ok, ev = pcall(decode, msg)
  if not ok or type(ev) ~= "table" then
    send_error(self, "invalid_json", "The server could not parse the event as JSON.", nil, nil)
    return
  end
  local typ = ev.type
  if typ == "input_audio_buffer.append" then
    local data = type(ev.audio) == "string" and b64dec(ev.audio)
    ev.at = t
    if not data then
      if not self.light then
        self.events[#self.events + 1] = ev
      end
      send_error(self, "invalid_value", "Invalid 'audio'. Expected base64-encoded audio bytes.", "audio", ev.event_id)
      return
    end
    self.appends = self.appends + 1
    self.first_append_at = self.first_append_at or t
    self.last_append_at = t
    self.input_bytes = self.input_bytes + #data
    self._buffered = self._buffered + #data
    if not self.light then
      local chunks = self._audio
      chunks[#chunks + 1] = data
      ev.audio = nil
      ev.audio_bytes = #data
      self.events[#self.events + 1] = ev
    end
    if #self._waiters > 0 then
      notify(self)
    end
    return
  end
  ev.at = t
  self.events[#self.events + 1] = ev
  local h = type(typ) == "string" and handlers[typ]
  if not h then
    send_error(self, "invalid_value", "Invalid value: '" .. tostring(typ) .. "'. Supported values are the GA client event types.",
      "type", ev.event_id)
  else
    h(self, ev, msg)
  end
  if type(typ) == "string" then
    pending_push(self, ev)
  end
  notify(self)
end

local function default_script(session)
  if session:wait_event("response.create") then
    session:speak({ ms = 1000, text = "Hello, this is a test." })
  end
end
M.default_script = default_script

-- Server ------------------------------------------------------------------------

local Fake = {}
Fake.__index = Fake

local function open(rt, conn, req)
  local session = setmetatable({
    rt = rt,
    conn = conn,
    id = nil,
    headers = req.headers,
    query = req.query,
    model = req.query and req.query.model,
    events = {},
    _audio = {},
    input_bytes = 0,
    appends = 0,
    _buffered = 0,
    truncates = {},
    function_outputs = {},
    response_creates = {},
    responses = {},
    errors_sent = {},
    items = {},
    updates = 0,
    light = rt.opts.light,
    conversation_id = new_id("conv"),
    opened_at = now(),
    _pending = {},
    _waiters = {},
  }, session_mt)
  conn.session = session
  rt.sessions[#rt.sessions + 1] = session
  session.index = #rt.sessions
  session.config = default_config(session.model)
  if rt.opts.session_defaults then
    merge_session(session.config, rt.opts.session_defaults)
  end
  session.id = session.config.id

  local auth = req.headers.authorization
  if auth ~= "Bearer " .. rt.api_key then
    session.rejected = "invalid_api_key"
    send_error(session, "invalid_api_key",
      auth and "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys."
        or "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
      nil, nil, "invalid_request_error")
    conn:close(1008, "invalid_api_key")
    rt._queue:push(session)
    return
  end
  if req.headers["openai-beta"] ~= nil then
    session.rejected = "beta_api_shape_disabled"
    send_error(session, "beta_api_shape_disabled",
      "The Realtime API beta shape is no longer supported. Remove the 'OpenAI-Beta: realtime=v1' header and use the GA event shapes.",
      nil, nil, "invalid_request_error")
    conn:close(1008, "beta_api_shape_disabled")
    rt._queue:push(session)
    return
  end

  session:send({ type = "session.created", session = session.config })
  rt._queue:push(session)
  if rt.opts.session_max_ms then
    session._expiry = timer.after(rt.opts.session_max_ms, function()
      if session._ended then
        return
      end
      session.expired_at = now()
      send_error(session, "session_expired", "Your session hit the maximum duration of 60 minutes.")
      session:close(1000, "session expired")
    end)
  end
  local script = rt.opts.script or default_script
  task.spawn(function()
    local ok, err = xpcall(script, debug.traceback, session)
    if not ok then
      session.script_error = err
      log.error("fakes.realtime: session script failed", { session = session.id, error = err })
    end
    session.script_done = true
  end)
end

local function closed(conn, code, reason)
  local session = conn.session
  if not session or session._ended then
    return
  end
  session.closed = { code = code, reason = reason }
  session.closed_at = now()
  session._ended = true
  if session._expiry then
    session._expiry:stop()
  end
  cancel_active(session, "client_cancelled")
  notify(session)
end

function M.start(opts)
  assert(type(opts) == "table" and type(opts.api_key) == "string", "fakes.realtime.start needs {api_key = ...}")
  local rt = setmetatable({ opts = opts, api_key = opts.api_key, sessions = {}, _queue = task.queue() }, Fake)
  local srv = http.server({
    host = "127.0.0.1",
    port = 0,
    headers = { "openai-beta" },
    max_ws_message = MAX_MESSAGE,
    max_send_queue = MAX_SEND_QUEUE,
    max_connections = opts.max_connections or 4096,
    tls = opts.tls,
  })
  srv:websocket("/v1/realtime", {
    open = function(conn, req)
      open(rt, conn, req)
    end,
    text = function(conn, msg)
      local s = conn.session
      if s and not s.rejected then
        on_text(s, msg)
      end
    end,
    binary = function(conn)
      local s = conn.session
      if s and not s.rejected then
        send_error(s, "invalid_json", "Binary frames are not supported: send JSON text events.", nil, nil)
      end
    end,
    close = closed,
  })
  local ok, err = srv:listen()
  if not ok then
    return nil, err
  end
  rt.srv = srv
  rt.port = srv.port
  rt.url = (opts.tls and "wss" or "ws") .. "://127.0.0.1:" .. srv.port .. "/v1/realtime"
  return rt
end

function Fake:wait_session(timeout_ms)
  return self._queue:pop(timeout_ms)
end

function Fake:close()
  if self.srv then
    local srv = self.srv
    self.srv = nil
    srv:close()
    self._queue:close()
  end
end

return M
