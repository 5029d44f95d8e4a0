--- callagent.standin: a local stand-in for the OpenAI Realtime model.
--
-- Not a language model. It lets `make run` carry a whole call offline, with
-- no API key: it speaks the Realtime GA protocol on a WebSocket route of the
-- app's own server, so the call engine runs unchanged. It
--   - greets the caller (speech from espeak-ng when installed, else chimes),
--   - notices when the caller speaks and stops (a simple energy detector),
--     and after each turn says "You said:" and plays the caller's own words back,
--   - files report_call after the third turn, or when the caller presses #
--     on the mock phone's keypad, or when the call asks it to wrap up (a
--     silent caller: outcome no_answer; its time up), then says goodbye.
-- Transcripts say how long the caller spoke ("[caller spoke 2.3 s]"): there is
-- no speech recognition here. An event it cannot use (not JSON, no type, a
-- field of the wrong kind, an audio format it does not speak, PCM at a
-- rate other than 24 kHz too) gets an "error" event, as from the real
-- service, and the session goes on.
--
--   local standin = require "callagent.standin"
--   -- openai = { apiKey = standin.KEY } in the app's config, then
--   standin.mount(srv, "/standin/v1/realtime")   -- before srv:listen()
--   -- then point openai.realtimeUrl at ws://host:port/standin/v1/realtime
--
-- The route is on the app's own server, which a tunnel may make public: a
-- session must send the key (Authorization: Bearer <standin.KEY>, made at
-- random for this process; opts.key to mount gives another). One without it
-- is closed at once (1008) and logged, before any speech is made for it.
local json = require "callagent.json"
local audio = require "callagent.audio"
local crypto = require "callagent.crypto"
local timer = require "callagent.timer"
local task = require "callagent.task"
local log = require "callagent.log"
local process = require "callagent.process"
local core = require "callagent.core"

local M = {}

--- The key sessions must send: random, for this process only.
M.KEY = "standin-" .. crypto.random_token(24)

M.GREETING = "Hello! This is callagent's local stand-in model. Say something, and I will repeat it. "
  .. "Press the hash key to finish."
M.YOU_SAID = "You said:"
M.REPORTING = "That's enough for a test. I'm filing my report now."
M.GOODBYE = "Thanks for trying callagent. Goodbye!"

local TURNS = 3
local SPEECH_DBFS = -42 -- a frame louder than this is speech
local START_FRAMES = 3 -- 60 ms of speech starts a turn
local END_FRAMES = 35 -- 700 ms of quiet ends it
local MAX_TURN_MS = 8000

-- Speech --------------------------------------------------------------------

local cache = {} -- text -> 24 kHz 16-bit PCM
local making = {} -- text -> the tasks waiting for its synthesis under way

-- 22050 Hz (espeak-ng) to 24000 Hz by linear interpolation, in C; the FIR
-- resampler then takes it to 8 kHz when the phone needs it. (In Lua a
-- phrase took 100-200 ms of the loop, and more under a sanitizer.)
local function to_24k(pcm22)
  return audio.resample_linear(pcm22, 22050, 24000)
end

-- A short two-note chime, when espeak-ng is not there.
local function chime(ms)
  local out = {}
  local n = 24 * ms
  for i = 0, n - 1 do
    local f = i < n / 2 and 660 or 880
    local env = math.min(1, i / 240, (n - i) / 240)
    out[#out + 1] = string.pack("<i2", math.floor(6000 * env * math.sin(2 * math.pi * f * i / 24000)))
  end
  return table.concat(out)
end

-- How long an espeak-ng run may take (a field, so that a test can shorten it).
M.ESPEAK_WAIT_MS = 15000

-- espeak-ng's speech for text as 24 kHz PCM; nil when it is not there, or
-- nil, why when it failed.
local function espeak(text)
  local file = os.tmpname()
  -- drop_secrets: the config's secrets (a Twilio token, a hooks token) are
  -- none of espeak-ng's business.
  local p = process.spawn({ "espeak-ng", "-v", "en-us", "-s", "165", "-w", file, text, on_stdout = false,
    on_stderr = false, drop_secrets = true })
  local wav, why
  if p then
    local code, sig = p:wait(M.ESPEAK_WAIT_MS)
    if code == nil and not p.done then
      p:kill("SIGKILL") -- hung: not left running until callagent exits
      why = string.format("espeak-ng took more than %g s", M.ESPEAK_WAIT_MS / 1000)
    elseif code ~= 0 then
      why = "espeak-ng " .. (code and ("exited " .. code) or ("was killed by " .. tostring(sig)))
    end
    local f = code == 0 and io.open(file, "rb")
    if f then
      wav = f:read("a")
      f:close()
    end
  end
  os.remove(file)
  local data = wav and wav:find("data", 1, true)
  if data then
    return to_24k(wav:sub(data + 8))
  end
  return nil, p and (why or "espeak-ng wrote no WAV data") or nil
end

--- 24 kHz PCM for text (inside a task: espeak-ng runs as a child process).
function M.speech(text)
  if cache[text] then
    return cache[text]
  end
  -- Sessions that start together (a burst of calls, or one during the
  -- warm-up) wait for the one espeak-ng run, rather than each start one.
  if making[text] then
    return task.wait_in(making[text])
  end
  making[text] = {}
  -- Under pcall: an error (no temporary file to be had, a WAV with an odd
  -- byte) must not leave making[text] set, or every session after it
  -- would wait for this phrase for ever. It chimes instead.
  local ok, pcm, why = pcall(espeak, text)
  if not ok or why then
    log.warn("stand-in model: espeak-ng's speech could not be used; it will chime instead",
      { error = tostring(ok and why or pcm) })
    pcm = nil
  elseif not pcm and not M.warned then
    M.warned = true
    log.warn("stand-in model: espeak-ng is not installed; it will chime instead of speaking (apt-get install espeak-ng)")
  end
  pcm = pcm or chime(math.min(1500, 40 * #text))
  cache[text] = pcm
  local waiting = making[text]
  making[text] = nil
  for _, wake in ipairs(waiting) do
    wake(pcm)
  end
  return pcm
end

--- Synthesizes the fixed phrases in the background, so the first call does not wait.
function M.warm_up()
  task.spawn(function()
    for _, t in ipairs({ M.GREETING, M.YOU_SAID, M.REPORTING, M.GOODBYE }) do
      M.speech(t)
    end
  end)
end

-- A session -------------------------------------------------------------------

local Session = {}
Session.__index = Session

local function id(prefix)
  return prefix .. "_" .. crypto.to_hex(crypto.random_bytes(8))
end

function Session:send(ev)
  if self.conn:is_open() then
    self.conn:send(json.encode(ev))
  end
end

-- t[k1][k2]... when each step is a table, else nil.
local function dig(t, ...)
  for _, k in ipairs({ ... }) do
    if type(t) ~= "table" then
      return nil
    end
    t = t[k]
  end
  return t
end

local FORMATS = { ["audio/pcm"] = true, ["audio/pcmu"] = true, ["audio/pcma"] = true }

-- Whether f is a format it speaks: PCM only at 24 kHz, as the real service.
local function known_format(f)
  local t = dig(f, "type")
  return FORMATS[t] and (t ~= "audio/pcm" or f.rate == nil or f.rate == 24000) or false
end

function Session:out_format()
  return dig(self.config, "audio", "output", "format", "type") or "audio/pcm"
end

function Session:in_format()
  return dig(self.config, "audio", "input", "format", "type") or "audio/pcm"
end

-- An event it cannot use, answered as the real service does: an error
-- event, and the session goes on.
function Session:refuse(ev, code, message, param)
  self:send({
    type = "error",
    event_id = id("event"),
    error = { type = "invalid_request_error", code = code, message = message, param = param,
      event_id = type(ev) == "table" and type(ev.event_id) == "string" and ev.event_id or nil },
  })
end

-- Encodes 24 kHz PCM for the session's output format.
function Session:encode(pcm24)
  local fmt = self:out_format()
  if fmt == "audio/pcm" then
    return pcm24
  end
  local ulaw = audio.ulaw_encode(audio.resampler(24000, 8000):process(pcm24))
  if fmt == "audio/pcma" then
    return audio.ulaw_to_alaw(ulaw)
  end
  return ulaw
end

-- One assistant response made of audio pieces (already in the output format).
function Session:respond(pieces, text)
  local rid, iid = id("resp"), id("item")
  self.speaking_until = timer.now()
  self:send({ type = "response.created", response = { id = rid, object = "realtime.response", status = "in_progress", output = json.array() } })
  self:send({
    type = "response.output_item.added",
    response_id = rid,
    output_index = 0,
    item = { id = iid, type = "message", role = "assistant", status = "in_progress", content = json.array() },
  })
  local bytes_per_ms = self:out_format() == "audio/pcm" and 48 or 8
  local total = 0
  for _, data in ipairs(pieces) do
    local chunk = 100 * bytes_per_ms
    for i = 1, #data, chunk do
      local part = data:sub(i, i + chunk - 1)
      total = total + #part
      self:send({
        type = "response.output_audio.delta",
        response_id = rid,
        item_id = iid,
        output_index = 0,
        content_index = 0,
        delta = crypto.base64_encode(part),
      })
    end
  end
  self.speaking_until = timer.now() + total / bytes_per_ms + 300
  self:send({ type = "response.output_audio.done", response_id = rid, item_id = iid, output_index = 0, content_index = 0 })
  self:send({ type = "response.output_audio_transcript.done", response_id = rid, item_id = iid, output_index = 0, content_index = 0, transcript = text })
  self:send({ type = "response.output_item.done", response_id = rid, output_index = 0, item = { id = iid, type = "message", role = "assistant", status = "completed" } })
  self:send({
    type = "response.done",
    response = {
      id = rid,
      object = "realtime.response",
      status = "completed",
      usage = { total_tokens = 0, input_tokens = 0, output_tokens = 0 },
    },
  })
end

function Session:say(text, extra_pcm8_ulaw)
  task.spawn(function()
    local pieces = { self:encode(M.speech(text)) }
    local transcript = text
    if extra_pcm8_ulaw then
      local fmt = self:out_format()
      if fmt == "audio/pcmu" then
        pieces[2] = extra_pcm8_ulaw
      elseif fmt == "audio/pcma" then
        pieces[2] = audio.ulaw_to_alaw(extra_pcm8_ulaw)
      else
        pieces[2] = audio.resampler(8000, 24000):process(audio.ulaw_decode(extra_pcm8_ulaw))
      end
      transcript = text .. " [your own words, played back]"
    end
    if not self.closed then
      self:respond(pieces, transcript)
    end
  end)
end

-- wrap_up: asked for by the call (a silent caller, its time up), not by
-- the caller's turns or their # key.
function Session:report(wrap_up)
  if self.reported then
    return
  end
  self.reported = true
  local rid, iid, cid = id("resp"), id("item"), id("call")
  -- One rounding for the summary and the data: they must not disagree.
  local seconds = math.floor(self.speech_ms / 100 + 0.5) / 10
  -- A caller who never spoke nor pressed # (the call wrapped up for their
  -- silence): no_answer, as the real model is asked to report.
  local nobody = wrap_up and self.turns == 0
  local args = json.encode({
    summary = nobody and "A test call with callagent's local stand-in model: the caller said nothing."
      or string.format("A test call with callagent's local stand-in model: the caller took %d turn%s, %.1f s of speech in all.",
        self.turns, self.turns == 1 and "" or "s", seconds),
    outcome = nobody and "no_answer" or "success",
    nextSteps = json.array({ "Set OPENAI_API_KEY to talk to the real model." }),
    data = { turns = self.turns, speechSeconds = seconds, model = "local stand-in" },
  })
  self.pending_report = cid
  self:say(M.REPORTING)
  task.spawn(function()
    timer.sleep(100)
    self:send({ type = "response.created", response = { id = rid, status = "in_progress", output = json.array() } })
    self:send({ type = "response.output_item.added", response_id = rid, output_index = 0, item = { id = iid, type = "function_call", name = "report_call", call_id = cid, arguments = "" } })
    self:send({ type = "response.function_call_arguments.done", response_id = rid, item_id = iid, output_index = 0, call_id = cid, name = "report_call", arguments = args })
    self:send({ type = "response.output_item.done", response_id = rid, output_index = 0, item = { id = iid, type = "function_call", name = "report_call", call_id = cid, arguments = args, status = "completed" } })
    self:send({ type = "response.done", response = { id = rid, status = "completed", usage = { total_tokens = 0, input_tokens = 0, output_tokens = 0 } } })
  end)
end

-- Caller audio: a 20 ms frame at a time, through the energy detector.
function Session:frame(ulaw)
  if self.reported then
    return
  end
  -- Ignore what arrives while our own voice plays (it may come back as echo).
  if timer.now() < (self.speaking_until or 0) then
    self.loud, self.quiet = 0, 0
    return
  end
  local speech = audio.ulaw_rms_dbfs(ulaw) > SPEECH_DBFS
  if not self.in_turn then
    if speech then
      self.loud = (self.loud or 0) + 1
      self.pre = self.pre or {}
      self.pre[#self.pre + 1] = ulaw
      if self.loud >= START_FRAMES then
        self.in_turn = true
        self.turn_audio = self.pre
        self.pre, self.quiet = nil, 0
        self.item = id("item")
        self:send({ type = "input_audio_buffer.speech_started", audio_start_ms = math.floor(self.input_ms - #self.turn_audio * 20), item_id = self.item })
      end
    else
      self.loud, self.pre = 0, nil
    end
    return
  end
  local t = self.turn_audio
  t[#t + 1] = ulaw
  self.quiet = speech and 0 or (self.quiet + 1)
  if self.quiet >= END_FRAMES or #t * 20 >= MAX_TURN_MS then
    self:end_turn()
  end
end

function Session:end_turn()
  local frames = self.turn_audio
  -- Without the quiet tail.
  local keep = math.max(1, #frames - self.quiet + 5)
  local words = table.concat(frames, "", 1, math.min(keep, #frames))
  self.in_turn, self.turn_audio, self.quiet, self.loud = false, nil, 0, 0
  self.turns = self.turns + 1
  local ms = #words / 8
  self.speech_ms = self.speech_ms + ms
  self:send({ type = "input_audio_buffer.speech_stopped", audio_end_ms = math.floor(self.input_ms), item_id = self.item })
  self:send({ type = "input_audio_buffer.committed", item_id = self.item })
  self:send({
    type = "conversation.item.input_audio_transcription.completed",
    item_id = self.item,
    content_index = 0,
    transcript = string.format("[caller spoke %.1f s]", ms / 1000),
  })
  if self.turns >= TURNS then
    self:report()
  else
    self:say(M.YOU_SAID, words)
  end
end

function Session:on_event(ev)
  local t = ev.type
  if type(t) ~= "string" then
    return self:refuse(ev, "missing_required_parameter", "The event has no type.", "type")
  elseif t == "input_audio_buffer.append" then
    local ulaw = type(ev.audio) == "string" and crypto.base64_decode(ev.audio)
    if not ulaw then
      return self:refuse(ev, "invalid_value", "audio must be a base64 string.", "audio")
    end
    local fmt = self:in_format()
    if fmt == "audio/pcma" then
      ulaw = audio.alaw_to_ulaw(ulaw)
    elseif fmt == "audio/pcm" then
      -- 24 kHz 16-bit: the detector takes 8 kHz mu-law. One resampler for
      -- the session, so its filter history (and an odd byte) carry from one
      -- append to the next: a new one for each append faded in every
      -- append's start and lost its end (the words played back buzzed).
      self.in_rs = self.in_rs or audio.resampler(24000, 8000)
      ulaw = audio.ulaw_encode(self.in_rs:process(ulaw))
    end
    -- 20 ms frames whatever the appends' size: the detector counts frames.
    for _, f in ipairs(self.framer:push(ulaw)) do
      self.input_ms = self.input_ms + 20 -- the end of this frame, in the input's own time
      self:frame(f)
    end
  elseif t == "session.update" then
    local s = ev.session
    if type(s) ~= "table" then
      return self:refuse(ev, "invalid_value", "session must be an object.", "session")
    end
    if s.audio ~= nil and type(s.audio) ~= "table" then
      return self:refuse(ev, "invalid_value", "session.audio must be an object.", "session.audio")
    end
    for _, dir in ipairs({ "input", "output" }) do
      local d = dig(s, "audio", dir)
      if d ~= nil and (type(d) ~= "table" or (d.format ~= nil and not known_format(d.format))) then
        return self:refuse(ev, "invalid_value", "Unsupported audio format.", "session.audio." .. dir .. ".format")
      end
    end
    local was = self:in_format()
    for k, v in pairs(s) do
      self.config[k] = v
    end
    if self:in_format() ~= was then
      self.in_rs = nil -- another format: no history from the one before
    end
    self:send({ type = "session.updated", session = self.config })
  elseif t == "response.create" then
    if not self.greeted then
      self.greeted = true
      self:say(M.GREETING)
    elseif self.report_answered and not self.said_goodbye then
      self.said_goodbye = true
      self:say(M.GOODBYE)
    end
  elseif t == "conversation.item.create" then
    local item = ev.item
    if type(item) ~= "table" then
      return self:refuse(ev, "invalid_value", "item must be an object.", "item")
    end
    if item.type == "function_call_output" and item.call_id == self.pending_report then
      self.report_answered = true
    elseif item.type == "message" then
      local text = dig(item, "content", 1, "text")
      if type(text) == "string" and text:find("pressed the key #", 1, true) then
        self:report()
      elseif item.role == "system" and type(text) == "string" and text:find("report_call", 1, true) then
        -- The call wraps up (a silent caller, its time up) and asks for the
        -- report: filed now, then goodbye, not dead air until call.wrapUpSec.
        self:report(true)
      end
    end
  end
end

function M.mount(srv, path, opts)
  local want = "Bearer " .. (opts and opts.key or M.KEY)
  srv:websocket(path, {
    open = function(conn, req)
      local auth = req.headers and req.headers.authorization
      if type(auth) ~= "string" or not crypto.constant_time_eq(auth, want) then
        -- Anyone who reaches the server (through its tunnel) may try: rate-limited.
        log.limited("warn", "stand-in model refused a session without its key", { remote = req.remote, path = path })
        conn:close(1008, "invalid api key")
        return
      end
      local s = setmetatable({ conn = conn, config = { type = "realtime" }, turns = 0, speech_ms = 0, input_ms = 0, quiet = 0, loud = 0,
        framer = audio.framer(160) }, Session)
      conn.standin = s
      s:send({
        type = "session.created",
        session = { id = id("sess"), object = "realtime.session", type = "realtime", model = "callagent-local-standin" },
      })
    end,
    text = function(conn, msg)
      local s = conn.standin
      if not s then
        return
      end
      local ev = json.try_decode(msg)
      if type(ev) ~= "table" then
        return s:refuse(ev, "invalid_json", "The event is not a JSON object.", nil)
      end
      s:on_event(ev)
    end,
    close = function(conn)
      if conn.standin then
        conn.standin.closed = true
      end
    end,
  })
  M.warm_up()
end

return M
