--- callagent.bridge: one call attempt's audio, between the phone and the model.
--
-- Created when the provider asks for the voice answer (POST /voice), so the
-- model session opens while the phone side is still connecting. Then:
--
--   phone (Twilio Media Streams JSON, 20 ms mu-law frames)
--     -> input_audio_buffer.append to the model; frames that arrive before
--        the model is ready are kept (10 s) and sent when it is
--   model (response.output_audio.delta)
--     -> media to the phone, a mark per 100 ms of audio and after an item's
--        end; G.711 passes through, 24 kHz PCM is low-pass resampled to 8 kHz
--        and mu-law encoded
--   barge-in: the marks the phone echoes as audio plays give the played
--     position (interpolated in real time between two echoes); on
--     input_audio_buffer.speech_started the phone's buffer is
--     cleared and the model's item truncated at the played audio_end_ms
--   report_call (first one wins) -> stored; the agent says goodbye; once that
--     has played (or call.goodbyeTimeoutSec) the provider hangs up
--   faults (model lost or failing, maximum duration, the model's session
--     limit near, a silent callee, the phone hanging up) end or wrap up the
--     call with a reason; a rate limit at the session's start is tried
--     again (MODEL_RETRY_MS)
--   the phone gone while the callee's words are still being transcribed:
--     the model stays open for them, LAST_WORDS_MS at most
--
-- The per-frame work (media, appends, deltas, marks) runs in C from the
-- phone stream's start (callagent.core.bridge, src/bridge.c; the model
-- connection joins it when it opens); this file keeps the call flow. The
-- engine (lua/callagent/calls.lua) owns the call record; the bridge tells
-- it what happened through engine:bridge_* methods.
local realtime = require "callagent.realtime"
local cbridge = require "callagent.core.bridge"
local instructions = require "callagent.instructions"
local json = require "callagent.json"
local http = require "callagent.http" -- http.cut: what a log line quotes of the model's field names and outcome
local timer = require "callagent.timer"
local task = require "callagent.task"
local log = require "callagent.log"

local M = {}
local Bridge = {}
Bridge.__index = Bridge
local MAX_HELD_KEYS = 32 -- keys kept while the model connection opens
local EMPTY = setmetatable({}, { __newindex = function()
  error("read-only", 2)
end })

local MAX_PENDING_OUT = 2 * 1024 * 1024 -- bytes of model audio kept until the phone connects
-- session.update sent, session.updated awaited this long (a module field,
-- read when used, so that a test can shorten it)
M.SESSION_READY_MS = 10000
local SESSION_MARGIN_MS = 15000 -- between the end of the wrap-up and the session's

-- A response asked for, or started, and nothing at all from the model for
-- this long (no event, no audio delta): the model has stalled. A response
-- streams its deltas as it is generated, so even a long one is never quiet
-- this long. A field so that tests can shorten it.
M.RESPONSE_STALL_MS = 15000

-- The callee's last words: when the phone side ends while the model still
-- transcribes what the callee said (speech started, or committed and its
-- transcription not in), the model connection stays open this long at most
-- for it, and the attempt's end (its final state) waits as long. Nothing
-- pending: no wait. A field so that tests can read it.
M.LAST_WORDS_MS = 2500

-- A rate limit at the session's start (an `error` rate_limit_exceeded
-- before session.updated, or HTTP 429 at the WebSocket upgrade) is often
-- over in a second or two: the model connection is tried again after each of
-- these waits (a longer "try again in N s" of the service's, up to
-- MODEL_RETRY_MAX_MS, is waited instead), while the phone's frames are kept
-- (10 s). The callee hears silence meanwhile, so the tries are few; after
-- the last, the call fails model_error. Redialing is no remedy: the call
-- was answered. A field so that tests can read it.
M.MODEL_RETRY_MS = { 500, 1500, 3000 }

-- Marks sent to the phone and not yet echoed, kept at most (one per 100 ms
-- of agent audio: 60 s, 14 KiB). More means a phone that does not echo
-- them: the oldest then counts as played (src/bridge.c, drop_unechoed). A
-- field so that tests can shorten it.
M.MAX_MARKS = 600
local MODEL_RETRY_MAX_MS = 4000
-- Each conversation.item.truncate's event_id is this and its number: an
-- error that answers one has it.
local TRUNCATE_EVENT_ID = "callagent_truncate_"

-- When the model's session (openai.sessionMaxSec from its open) is near
-- enough to ask for the wrap-up: the report (call.wrapUpSec) and the goodbye
-- (call.goodbyeTimeoutSec) must end before it does, with a margin for what
-- those bounds do not count (the report's response finishing before the
-- goodbye timer starts, the hang-up, the service's clock starting before
-- our open). The margin is SESSION_MARGIN_MS, or half of what the wrap-up
-- leaves when that is less: a short session keeps some talk time (the
-- config makes sure the wrap-up fits in it at all).
function M.session_wrap_up_ms(cfg)
  local left = (cfg.openai.sessionMaxSec - cfg.call.wrapUpSec - cfg.call.goodbyeTimeoutSec) * 1000
  return left - math.min(SESSION_MARGIN_MS, left // 2)
end

-- How long a session opened while the phone rang (M.warm) may have been open
-- at the answer and still leave the call its whole call.maxDurationSec before
-- the session's wrap-up (which counts from the session's open): one open
-- longer is not taken over, so that a long ring does not shorten the call.
-- Zero or less (a session limit shorter than the call's): none ever is.
function M.warm_spare_ms(cfg)
  return M.session_wrap_up_ms(cfg) - cfg.call.maxDurationSec * 1000
end

function M.new(engine, call, attempt)
  local cfg = engine.config
  local self = setmetatable({
    engine = engine,
    cfg = cfg,
    call = call,
    call_id = call.id,
    attempt = attempt,
    log_fields = { call = call.id, attempt = attempt },
    model_ready = false,
    stream = nil,
    stream_sid = nil,
    pending_out = {},
    held_keys = {}, -- keys pressed before the model was ready
    pending_out_bytes = 0,
    truncated = {},
    functions_seen = {},
    timers = {},
    out_format = cfg.openai.outputFormat,
    in_format = cfg.openai.inputFormat,
    ended = false,
  }, Bridge)
  return self
end

-- Model ------------------------------------------------------------------

-- A field of a server event, if it has the type the protocol gives it (a
-- model server that sends another is not trusted with the call flow).
local function str(v)
  return type(v) == "string" and v or nil
end

-- A string of the model's that goes into the call's record: made UTF-8.
local function text(v)
  return type(v) == "string" and json.utf8(v) or nil
end

local function obj(v)
  return type(v) == "table" and v or EMPTY
end

-- The call's instructions, with the date and time of now.
local function call_instructions(engine, call)
  local names = {}
  for _, t in ipairs(engine.tools) do
    names[#names + 1] = t.name
  end
  return instructions.build(call, { extra_tools = names })
end

-- The options of the call's model session: its instructions, voice and
-- tools (report_call and the app's).
local function session_opts(engine, call, log_fields)
  local tools = { instructions.report_tool() }
  for _, t in ipairs(engine.tools) do
    tools[#tools + 1] = { type = "function", name = t.name, description = t.description, parameters = t.parameters }
  end
  return {
    log_fields = log_fields,
    instructions = call_instructions(engine, call),
    voice = call.voice,
    tools = tools,
  }
end

--- Connects the model, or takes over warm (M.warm's, opened while the phone
-- rang) when it is still good: then the callee need not wait for the model's
-- connection and session.update before the greeting.
function Bridge:start_model(warm)
  local rt
  -- The call's session: not one dropped for a rate limit (its events, on
  -- their way before the service read our close, are not the call's).
  local function current()
    return rt == self.rt and not rt.dropped
  end
  local handlers = {
    on_open = function()
      if current() then -- not dropped for another (rate limited) while it opened
        self:_model_open()
      end
    end,
    on_ready = function(_, ev)
      if current() then
        self:_model_ready(ev)
      end
    end,
    on_event = function(_, ev)
      if current() then
        self:_model_event(ev)
      end
    end,
    on_close = function(_, code, reason)
      if current() then
        self:_model_closed(code, reason)
      end
    end,
  }
  local ready_ev, told
  if warm then
    rt, ready_ev, told = warm:take(self.cfg)
  end
  if rt then
    for k, f in pairs(handlers) do
      rt.opts[k] = f
    end
    rt.opts.log_fields = self.log_fields
    self.rt = rt
    log.debug("model session taken over from the ring", { call = self.call_id, attempt = self.attempt,
      ready = rt.ready })
    -- Its instructions give the date and time of the dial, up to
    -- call.ringTimeoutSec ago: the model is told the answer's (before the
    -- greeting's response.create, which it then answers with them). Not
    -- before its session.updated: a session the service refuses gets
    -- nothing more (an update applied after the refused one would confirm
    -- it, in other formats than asked).
    local now_told = call_instructions(self.engine, self.call)
    if now_told ~= told then
      if not rt.conn then
        rt.opts.instructions = now_told -- still connecting: its session.update is yet to go
      elseif rt.ready then
        self:_tell_instructions(now_told)
      else
        self.told_when_ready = { rt = rt, instructions = now_told } -- Bridge:_model_ready
      end
    end
    if rt.conn then
      self:_model_open()
    end
    if rt.ready then
      self:_model_ready(ready_ev)
    end
    return
  end
  local opts = session_opts(self.engine, self.call, self.log_fields)
  for k, f in pairs(handlers) do
    opts[k] = f
  end
  rt = realtime.session(self.cfg.openai, opts)
  self.rt = rt
  rt:connect()
end

-- Sends the session's instructions again (the answer's time).
function Bridge:_tell_instructions(text)
  self.rt:send({ type = "session.update", session = { type = "realtime", instructions = text } })
end

-- The model connection is open (the session.update sent): the phone's audio
-- joins it. The session's limit counts from its open; its confirmation is
-- awaited SESSION_READY_MS from now, also for a session opened while the
-- phone rang (the answer's wait is as long as for one opened at the answer).
function Bridge:_model_open()
  local rt = self.rt
  local since = timer.now() - (rt.t_open or timer.now())
  if self.cb and not self.ended then
    self.cb:link_model(rt.conn)
  end
  -- The service ends the session at its limit, without a warning: the
  -- call is wrapped up before, from the session's own start.
  if not self.ended then
    self.session_timer = timer.after(math.max(0, M.session_wrap_up_ms(self.cfg) - since), function()
      self.session_timer = nil
      self:on_session_limit()
    end)
  end
  -- A service that never confirms the session would leave the call silent.
  if not rt.ready then
    self.ready_timer = timer.after(M.SESSION_READY_MS, function()
      self.ready_timer = nil
      if not self.model_ready and not self.ended then
        log.warn("model did not confirm the session", self.log_fields)
        self.engine:bridge_error(self, "model did not confirm the session within " .. M.SESSION_READY_MS // 1000 .. " s")
        self:hangup("model_error")
      end
    end)
  end
end

-- A model session opened while the phone rings (attempt n of call), for the
-- bridge to take over at the answer (Bridge:start_model). Until then it only
-- waits: audio and responses start with the bridge. One that fails meanwhile
-- (rate limited, closed, not confirmed within SESSION_READY_MS) is dropped,
-- and the bridge connects at the answer as it would without it. One the
-- service refuses for good - the same session would be refused at the answer:
-- the key or the model (HTTP 401, 403 or 404 at the upgrade, an error such as
-- invalid_api_key or model_not_found before session.updated), the session's
-- fields, its audio formats - is told to engine:warm_refused(w, why), which
-- cancels the ringing call: nobody is to answer into silence.
local Warm = {}
Warm.__index = Warm

local REFUSED_CODES = { invalid_api_key = true, model_not_found = true, unknown_parameter = true,
  invalid_value = true, missing_required_parameter = true, beta_api_shape_disabled = true }

function M.warm(engine, call, n)
  local w = setmetatable({ engine = engine, call_id = call.id, attempt = n }, Warm)
  local fields = { call = call.id, attempt = n }
  local opts = session_opts(engine, call, fields)
  w.instructions = opts.instructions -- as sent, for the answer to compare (Warm:take)
  opts.on_open = function()
    w.ready_timer = timer.after(M.SESSION_READY_MS, function()
      w.ready_timer = nil
      w:_drop("not confirmed within " .. M.SESSION_READY_MS // 1000 .. " s")
    end)
  end
  opts.on_ready = function(_, ev)
    w:_stop_ready()
    local mismatch = realtime.format_mismatch(engine.config.openai, type(ev) == "table" and ev.session)
    if mismatch then
      return w:_refused("model session has other audio formats than asked: " .. mismatch)
    end
    w.ready_ev = ev
  end
  opts.on_event = function(rt, ev)
    if ev.type == "error" then
      local e = obj(ev.error)
      local code = text(e.code)
      local why = (code or text(e.type) or "no code") .. ": " .. (text(e.message) or "no message")
      if not rt.ready and REFUSED_CODES[code] then
        return w:_refused("model refused the session: " .. why)
      end
      w:_drop("error " .. why)
    end
  end
  opts.on_close = function(_, code, reason)
    w:_stop_ready()
    if not w.rt then
      return
    end
    local status = not code and tostring(reason):match("^EHANDSHAKE: server answered HTTP (%d+) ")
    if status == "401" or status == "403" or status == "404" or not code and tostring(reason):find("^ESESSION:") then
      return w:_refused("model connection failed: " .. tostring(reason))
    end
    w.rt = nil
    log.info("model session opened while ringing was lost: connecting at the answer",
      { call = w.call_id, attempt = w.attempt, code = code, reason = reason })
  end
  w.rt = realtime.session(engine.config.openai, opts)
  w.rt:connect()
  return w
end

function Warm:_stop_ready()
  if self.ready_timer then
    self.ready_timer:stop()
    self.ready_timer = nil
  end
end

function Warm:_drop(why)
  local rt = self.rt
  if not rt then
    return
  end
  log.info("model session opened while ringing dropped: connecting at the answer",
    { call = self.call_id, attempt = self.attempt, reason = why })
  self:close()
end

function Warm:_refused(why)
  if not self.rt then
    return
  end
  log.warn("model refused the session while the phone rang", { call = self.call_id, attempt = self.attempt,
    reason = why })
  self:close()
  self.engine:warm_refused(self, why)
end

--- The session, its session.updated event if it came, and the instructions
-- it was opened with; nil when it failed, was taken already, or has been
-- open too long for the call's time (M.warm_spare_ms of cfg: then it is
-- closed).
function Warm:take(cfg)
  local rt, told = self.rt, self.instructions
  self:_stop_ready()
  self.rt, self.instructions = nil, nil
  if not rt or rt.closed then
    return nil
  end
  local open_ms = rt.t_open and timer.now() - rt.t_open or 0
  if open_ms > M.warm_spare_ms(cfg) then
    log.info("model session opened while ringing is too old for the call's time: connecting at the answer",
      { call = self.call_id, attempt = self.attempt, open_ms = math.floor(open_ms) })
    rt:close()
    return nil
  end
  return rt, self.ready_ev, told
end

--- Closes the session if nobody took it (the attempt ended while ringing).
function Warm:close()
  self:_stop_ready()
  local rt = self.rt
  self.rt, self.instructions = nil, nil
  if rt then
    rt:close()
  end
end

-- "Please try again in 1.5s" / "in 800ms" in a message of the service's:
-- its own hint, in ms; nil if none.
local function retry_hint_ms(message)
  local num, unit = tostring(message or ""):match("try again in ([%d%.]+)%s*(m?s)")
  local hint = tonumber(num)
  return hint and math.ceil(unit == "ms" and hint or hint * 1000) or nil
end

-- What the service answers when the account cannot pay for any response
-- (an error refusing a response.create, or a response.done "failed" with
-- it in status_details.error): the session is up, but no response of this
-- call will ever be generated. Going on would be a silent line until the
-- silence timeout, recorded as a callee who said nothing.
local NO_RESPONSES = { insufficient_quota = true }

-- The service refused the session's start for its rate limit: the model
-- connection is dropped and made again after a wait, up to
-- #MODEL_RETRY_MS times; false once they are used up (or the call is over).
function Bridge:_model_rate_limited(why, message)
  if self.model_retry_timer then
    return true -- another event of the session already dropped: one retry for it
  end
  local n = (self.model_retries or 0) + 1
  local wait = M.MODEL_RETRY_MS[n]
  if not wait or self.ended or self.hanging_up or self.model_ready then
    return false
  end
  self.model_retries = n
  local hint = retry_hint_ms(message)
  if hint then
    wait = math.max(wait, math.min(hint, MODEL_RETRY_MAX_MS))
  end
  log.warn("model rate limited at the session's start: connecting again", { call = self.call_id,
    attempt = self.attempt, retry = n, after_ms = wait, reason = why })
  self:_stop_timer("ready_timer")
  self:_stop_timer("session_timer")
  if self.cb then
    self.cb:unlink_model()
  end
  self.rt.dropped = true
  self.rt:close()
  self.model_retry_timer = timer.after(wait, function()
    self.model_retry_timer = nil
    if not self.ended and not self.hanging_up then
      self:start_model()
    end
  end)
  return true
end

-- After the tries a rate limit got, for lastError.
function Bridge:_tries()
  return self.model_retries and string.format(" (%d tries)", self.model_retries + 1) or ""
end

function Bridge:_model_ready(ev)
  if self.ended then
    return
  end
  local later = self.told_when_ready
  self.told_when_ready = nil
  -- A session in other audio formats than asked would take the phone's
  -- mu-law for something else and send the phone noise: not a call to go on.
  local mismatch = realtime.format_mismatch(self.cfg.openai, type(ev) == "table" and ev.session)
  if mismatch then
    self:_stop_timer("ready_timer")
    log.warn("model session has other audio formats than asked", { call = self.call_id, formats = mismatch })
    self.engine:bridge_error(self, "model session has other audio formats than asked: " .. mismatch)
    return self:hangup("model_error")
  end
  self.model_ready = true
  self.was_ready = true
  self:_stop_timer("ready_timer")
  if later and later.rt == self.rt then
    self:_tell_instructions(later.instructions) -- the answer's time (Bridge:start_model)
  end
  self.engine:bridge_model_ready(self)
  if log.enabled("debug") then
    local tls = self.rt.conn and self.rt.conn.tls
    log.debug("model ready", {
      call = self.call_id,
      attempt = self.attempt,
      tls = tls and tls.version,
      tls_resumed = tls and tls.resumed,
    })
  end
  -- Caller audio that came before goes first, in order, then the keys
  -- pressed meanwhile (the greeting, next, is their reply).
  if self.cb then
    self.cb:model_ready()
  end
  for _, d in ipairs(self.held_keys) do
    self:_send_key(d)
  end
  if #self.held_keys > 0 then
    self.callee_spoke_at = timer.now()
    self.held_keys = {}
  end
  self:_maybe_greet()
end

-- The agent speaks first, once both sides are there.
function Bridge:_maybe_greet()
  if self.greeted or not self.model_ready or not self.stream_sid then
    return
  end
  self.greeted = true
  self.greeting_waiting = true -- until a response.create for it goes out
  self:_respond()
end

function Bridge:_model_closed(code, reason)
  self:_report_held_at_close()
  if self.ended then
    return self:end_last_words() -- if they were awaited, they will not come now
  end
  self.model_ready = false
  if self.hanging_up then
    -- The call is ending already, for a reason of its own: the service's
    -- close that follows its session_expired, say. That reason is the
    -- call's, and its lastError stays the service's word, not the close.
    log.debug("model connection closed while hanging up", { call = self.call_id, attempt = self.attempt,
      code = code, reason = reason })
    return
  end
  if self.report then
    return self:_finish_after_report()
  end
  if not code and tostring(reason):find("^EHANDSHAKE: server answered HTTP 429 ") then
    -- Refused at the upgrade for the rate limit: tried again, a few times.
    if self:_model_rate_limited(tostring(reason), nil) then
      return
    end
  end
  local why = code and string.format("model connection closed (%s %s)", tostring(code), reason or "")
    or ("model connection failed: " .. tostring(reason) .. self:_tries())
  log.warn("model connection lost", { call = self.call_id, attempt = self.attempt, reason = why })
  self.engine:bridge_error(self, why)
  self:hangup("model_error")
end

-- Hangs up, done, once the phone has played what was sent to it.
function Bridge:_hangup_when_drained()
  self:_when_drained(function()
    if not self.ended then
      self:hangup("completed")
    end
  end)
end

-- The model is gone after the report: the call is finished as if the
-- goodbye were done, once the phone has played what was sent (a goodbye
-- already generated is still queued there), within call.goodbyeTimeoutSec.
function Bridge:_finish_after_report()
  if self.finishing_after_report then
    return
  end
  self.finishing_after_report = true
  self:_start_goodbye_timer()
  self:_hangup_when_drained()
end

-- What the model may still send once the call has ended (on its way when we
-- closed, or while the callee's last words are awaited) that still counts:
-- the callee's words and their transcription. A response to them goes
-- nowhere and is no agent line (nobody heard it); its usage is counted, and
-- a report_call in it is the call's report (_late_report).
local AFTER_END = {
  ["input_audio_buffer.speech_started"] = true,
  ["input_audio_buffer.speech_stopped"] = true,
  ["input_audio_buffer.committed"] = true,
  ["conversation.item.input_audio_transcription.completed"] = true,
  ["conversation.item.input_audio_transcription.failed"] = true,
  ["error"] = true,
}

function Bridge:_model_event(ev)
  local t = ev.type
  if self.ended and not AFTER_END[t] then
    local r = t == "response.done" and obj(ev.response)
    if r and type(r.usage) == "table" then
      self.engine:bridge_usage(self, r.usage) -- tokens spent all the same
    end
    if t == "response.output_item.done" then
      self:_late_report(obj(ev.item))
    end
    for _, item in ipairs(r and type(r.output) == "table" and r.output or EMPTY) do
      self:_late_report(obj(item))
    end
    return
  end
  self.model_events = (self.model_events or 0) + 1
  if t == "response.output_audio.delta" or t == "response.audio.delta" then
    return self:_audio_out(ev.item_id, ev.delta)
  elseif t == "input_audio_buffer.speech_started" then
    -- The callee's words are pending from now until their transcript is in.
    self.speaking = str(ev.item_id) or true
    self.speech_stopped = false
    return self:_speech_started()
  elseif t == "input_audio_buffer.speech_stopped" then
    self.speech_stopped = true
  elseif t == "response.created" then
    -- Ours carries the number of its response.create in its metadata; one
    -- without it was started by the service (turn detection) - once the
    -- service has shown that it echoes metadata.
    local r = obj(ev.response)
    local n = tonumber(str(obj(r.metadata).callagent))
    self.echoes_metadata = self.echoes_metadata or n ~= nil
    local ours = n ~= nil or not self.echoes_metadata
    self.responding = true
    self:_watch_response()
    if ours then
      self.create_sent_at = nil
    end
    if self.goodbye_requested and not self.goodbye_id
      and (self.goodbye_any or ours and (n or math.huge) >= self.goodbye_from) then
      self.goodbye_id = str(r.id)
    end
  elseif t == "response.done" then
    return self:_response_done(obj(ev.response))
  elseif t == "response.function_call_arguments.done" then
    -- Provisional: a call cut short by a barge-in may end this way too, with
    -- partial arguments; its output item or its response decides.
    local call_id = str(ev.call_id)
    if call_id and not self.functions_seen[call_id] then
      self:_take_held(call_id)
      self.fn_held = self.fn_held or {}
      self.fn_held[#self.fn_held + 1] = { call_id = call_id, name = str(ev.name), arguments = str(ev.arguments),
        response_id = str(ev.response_id) }
    end
  elseif t == "response.output_item.done" then
    local item = obj(ev.item)
    if item.type == "function_call" then
      return self:_decide_function(item)
    end
  elseif t == "input_audio_buffer.committed" then
    self.speaking = nil -- now awaited as a committed item
    self:_await_transcript(str(ev.item_id))
    self:_check_last_words()
  elseif t == "conversation.item.input_audio_transcription.completed" then
    local line = self:_line(ev.transcript, "callee")
    self:_transcript_in(str(ev.item_id), line and line:match("%S") and line or nil)
    self:_check_last_words()
  elseif t == "conversation.item.input_audio_transcription.failed" then
    self:_transcript_in(str(ev.item_id))
    self:_check_last_words()
  elseif t == "response.output_audio_transcript.done" or t == "response.audio_transcript.done" then
    local line = self:_line(ev.transcript, "agent")
    if line and line:match("%S") then
      self:_agent_line(str(ev.item_id), line)
    end
  elseif t == "error" then
    if self.ended then
      -- One the service sent before it read our close: the call is over,
      -- and its record and hang-up are no longer the model's to change.
      -- One refusing the commit of the callee's cut-off words (too short
      -- to commit): there is nothing to wait for.
      if self.last_words and str(obj(ev.error).code) == "input_audio_buffer_commit_empty" then
        self.speaking = nil
        self:_check_last_words()
      end
      return
    end
    local e = obj(ev.error)
    local code, etype, message = text(e.code), text(e.type), text(e.message)
    if not self.model_ready then
      if (code == "rate_limit_exceeded" or etype == "rate_limit_exceeded")
        and self:_model_rate_limited(tostring(code) .. ": " .. tostring(message), message) then
        return
      end
      -- Before session.updated: the service refused the session (its model,
      -- a field of it). Nothing will be said: the call ends now.
      log.warn("model refused the session", { call = self.call_id, code = code, type = etype, message = message })
      self.engine:bridge_error(self, "model refused the session: " .. tostring(code or etype) .. ": " .. tostring(message)
        .. self:_tries())
      return self:hangup("model_error")
    end
    if NO_RESPONSES[code] or NO_RESPONSES[etype] then
      return self:_no_responses("model error: " .. tostring(code or etype) .. ": " .. tostring(message))
    end
    -- An error that answers our latest response.create refuses it.
    local refused = self.create_event_id ~= nil and str(e.event_id) == self.create_event_id
    if refused then
      self.create_sent_at = nil
    end
    if (str(e.event_id) or ""):sub(1, #TRUNCATE_EVENT_ID) == TRUNCATE_EVENT_ID then
      -- A cut the service did not take (an item it no longer has, a
      -- played length a rounding past its own): the model's idea of what
      -- was heard is a little off, nothing more. Logged, not the call's
      -- lastError.
      log.warn("model refused a truncate", { call = self.call_id, code = code, type = etype, message = message })
      return
    end
    if code == "conversation_already_has_active_response" then
      -- A response the service started (its own turn detection) was
      -- active: ours is asked for again when it is done.
      log.debug("model busy: response asked for again later", self.log_fields)
      self.responding = true
      self.respond_after = true
      if refused and self.creates == 1 then
        self.greeting_waiting = true -- the greeting itself
      end
      return
    end
    local param = text(e.param)
    if refused and not self.plain_creates and param and param:find("^response%.metadata") then
      -- A service that takes no metadata: asked again without it.
      log.warn("model takes no response.metadata: responses are asked for without it", self.log_fields)
      self.plain_creates = true
      self.respond_after = false
      return self:_respond()
    end
    if refused then
      -- Refused for another reason: a response asked for since goes now,
      -- not when the refused one's window ends.
      log.warn("model refused a response.create", { call = self.call_id, code = code, type = etype,
        message = message })
      self.engine:bridge_error(self, "model refused a response: " .. tostring(code or etype) .. ": "
        .. tostring(message))
      if self.respond_after and not self.responding and not self.ended then
        self:_stop_timer("respond_timer")
        self:_respond()
      elseif not self.first_response_done then
        self:_greeting_refused(message)
      end
      return
    end
    log.warn("model error", { call = self.call_id, code = code, type = etype, message = message })
    self.engine:bridge_error(self, "model error: " .. tostring(code or etype) .. ": " .. tostring(message))
    if code == "session_expired" then
      if self.report then
        -- The close follows: the goodbye already sent still plays.
        return self:_finish_after_report()
      end
      -- Asked to wrap up for this very limit, the model did not report in time.
      self:_wrap_up_now(self.wrapup_reason == "session_limit" and "session_limit" or "model session expired")
    end
  end
end

-- The greeting (or what was asked before it) was refused: the silence
-- timer, armed once the greeting has played, would never be, and a silent
-- callee would hold the line until call.maxDurationSec. It counts from now.
-- The greeting is asked for once more after GREETING_RETRY_MS: a refusal
-- like server_error or rate_limit_exceeded is often transient, and without
-- a greeting a callee waiting for the caller to speak would be taken for
-- nobody (reported no_answer). Once only, so a service that keeps refusing
-- costs one more error, and not if the callee spoke meanwhile: the
-- service's turn detection answers them.
-- A "try again in N s" in the refusal's message (a rate limit's) is waited
-- instead, up to MODEL_RETRY_MAX_MS: asked sooner, it is refused again.
-- A greeting whose response the service took and then failed (response.done
-- "failed": a tokens-per-minute limit, a server error) is the same silence.
local GREETING_RETRY_MS = 1000
-- The greeting's length and this: taken as played though the phone has not
-- said so (a module field: a test shortens it).
M.GREETING_PLAY_SLACK_MS = 5000

function Bridge:_greeting_refused(message)
  if not self.silence_timer then
    self:_arm_silence_timer()
  end
  if self.greeting_retried then
    return
  end
  self.greeting_retried = true
  local wait = math.max(GREETING_RETRY_MS, math.min(retry_hint_ms(message) or 0, MODEL_RETRY_MAX_MS))
  self.greet_retry_timer = timer.after(wait, function()
    self.greet_retry_timer = nil
    -- Not while one asked for since is on its way (create_sent_at).
    -- Nor once the call is being hung up (a vendor slow to stop the stream).
    if not (self.ended or self.hanging_up or self.responding or self.create_sent_at or self.first_response_done
      or self.callee_spoke_at or self.wrapup_reason) then
      log.info("greeting asked for again", self.log_fields)
      self:_respond()
    end
  end)
end

-- Model audio to the phone --------------------------------------------------

--- The phone's stream started: the per-frame work moves to C, and the
-- model connection joins it now or when it opens.
function Bridge:_link()
  local conn = self.rt and not self.rt.closed and self.rt.conn
  self.cb = cbridge.new(self.stream, conn or nil, {
    stream_sid = self.stream_sid,
    output = self.out_format,
    input = self.in_format,
    ready = self.model_ready,
    max_marks = M.MAX_MARKS,
  })
  -- Model audio that came before the phone did, in order.
  for i, p in ipairs(self.pending_out) do
    self.cb:send_audio(p[1], p[2])
    self.pending_out[i] = nil
  end
  self.pending_out_bytes = 0
end

-- Model audio that reaches Lua: only before the phone's stream started.
function Bridge:_audio_out(item_id, delta)
  if type(item_id) ~= "string" or type(delta) ~= "string" or delta == "" or self.ended then
    return
  end
  if self.cb then
    return self.cb:send_audio(item_id, delta)
  end
  if self.pending_out_bytes + #delta <= MAX_PENDING_OUT then
    self.pending_out[#self.pending_out + 1] = { item_id, delta }
    self.pending_out_bytes = self.pending_out_bytes + #delta
  end
end

-- Barge-in: the callee speaks over the agent.
function Bridge:_speech_started()
  self.callee_spoke_at = timer.now()
  self:_stop_timer("silence_timer")
  -- The callee speaks over the goodbye (its words cut it, as any agent
  -- line): it is not over, and they are not hung up on mid-sentence. The
  -- next response, the service's answer to them too, is the goodbye now,
  -- within call.goodbyeTimeoutSec of the report still. Before the clear,
  -- whose drained callbacks would hang up.
  if self.goodbye_id then
    self.goodbye_id, self.goodbye_done, self.goodbye_any = nil, false, true
  end
  if not self.cb then
    return
  end
  -- Twilio gets `clear`; the model's items are cut where the phone stopped
  -- playing: the one it plays, and any queued behind it (at what played).
  -- The lines waiting for their audio are written once the cut is known
  -- (clear() runs the drained callbacks).
  local lines = self.pending_lines
  self.pending_lines = nil
  local cut = self.cb:clear()
  for _, c in ipairs(cut or {}) do
    local item, played, sent = c[1], math.floor(c[2]), c[3]
    self.truncated[item] = true
    self.truncates = (self.truncates or 0) + 1
    self.rt:send({ type = "conversation.item.truncate", event_id = TRUNCATE_EVENT_ID .. self.truncates, item_id = item,
      content_index = 0, audio_end_ms = played })
    log.debug("barge-in", { call = self.call_id, item = item, played_ms = played, sent_ms = math.floor(sent) })
    self.engine:bridge_bargein(self, item, played)
  end
  self:_flush_lines(lines)
end

-- The most of one transcript line kept, in bytes: about 9 minutes of
-- speech, more than any one turn of a call says. Only the model
-- connection's 16 MiB message limit bounded a line before: a faulty model
-- service put megabytes into the store, the call record and the
-- notification's receiver. A field so that tests can shorten it.
M.TRANSCRIPT_LINE_MAX = 8192

-- A transcript of the model's as a line of the record: UTF-8, at most
-- M.TRANSCRIPT_LINE_MAX bytes (cut between characters, ending with "…").
-- The first cut of the call is logged; a faulty service may cut every line.
function Bridge:_line(v, role)
  local line = text(v)
  if line and #line > M.TRANSCRIPT_LINE_MAX then
    if not self.line_cut_logged then
      self.line_cut_logged = true
      log.warn("transcript line cut: longer than the most a line keeps (later ones of this call are cut unlogged)",
        { call = self.call_id, attempt = self.attempt, role = role, bytes = #line, kept = M.TRANSCRIPT_LINE_MAX })
    end
    line = http.cut(line, M.TRANSCRIPT_LINE_MAX)
  end
  return line
end

-- Agent lines wait until their audio has played (the model writes them
-- faster than real time): a barge-in meanwhile marks them interrupted.
function Bridge:_agent_line(item, line)
  if not self.cb then
    return self:_write_agent(line, self.truncated[item or false])
  end
  self.pending_lines = self.pending_lines or {}
  self.pending_lines[#self.pending_lines + 1] = { item = item, line = line }
  self:_when_drained(function()
    self:_flush_lines()
  end)
end

function Bridge:_flush_lines(lines)
  lines = lines or self.pending_lines
  self.pending_lines = nil
  for _, l in ipairs(lines or {}) do
    self:_write_agent(l.line, self.truncated[l.item or false])
  end
end

-- The callee's words are transcribed after they are committed, and that can
-- take longer than the agent's answer takes to play, or than the callee's
-- next words take to be transcribed: lines wait in self.record, in the order
-- things were said (a callee item at its commit, an agent line once its
-- audio played), up to M.TRANSCRIPT_WAIT_MS for each awaited transcript, and
-- are written from its front as they come in (written as they came, two
-- callee lines could swap, and an agent line waited for every callee line
-- awaited, those said after it too). A field so that tests can shorten it.
M.TRANSCRIPT_WAIT_MS = 5000

function Bridge:_await_transcript(item)
  if not item or (self.ended and not self.last_words) then
    return
  end
  self.awaiting = self.awaiting or {}
  if self.awaiting[item] then
    return
  end
  local e = { item = item }
  e.timer = timer.after(M.TRANSCRIPT_WAIT_MS, function()
    e.timer = nil
    self:_transcript_in(item)
    -- The last one the callee's last words waited for: no more to wait.
    self:_check_last_words()
  end)
  self.awaiting[item] = e
  self.record = self.record or {}
  self.record[#self.record + 1] = e
end

-- A callee item's transcript came (line, or nil: it failed, it was empty, or
-- it was waited for long enough): the lines held for it are written, up to
-- the next one still awaited. One not awaited (its wait is over) is written
-- at once.
function Bridge:_transcript_in(item, line)
  local e = item and self.awaiting and self.awaiting[item]
  if not e then
    if line then
      self.engine:bridge_transcript(self, "callee", line)
    end
    return
  end
  if e.timer then
    e.timer:stop()
    e.timer = nil
  end
  e.done, e.line = true, line
  self.awaiting[item] = nil
  if next(self.awaiting) == nil then
    self.awaiting = nil
  end
  while self.record and self.record[1].done do
    local rec = self.record
    local first = table.remove(rec, 1)
    if #rec == 0 then
      self.record = nil
    end
    if first.line then
      self.engine:bridge_transcript(self, first.agent and "agent" or "callee", first.line, first.interrupted)
    end
  end
end

function Bridge:_write_agent(line, interrupted)
  if self.record then
    self.record[#self.record + 1] = { agent = true, done = true, line = line, interrupted = interrupted }
    return
  end
  self.engine:bridge_transcript(self, "agent", line, interrupted)
end

-- fn() once the phone has played all the audio sent to it (now, if so).
-- Several may wait; they run in the order they came.
function Bridge:_when_drained(fn)
  if not self.cb then
    return fn()
  end
  local waiting = self.drain_waiters
  if waiting then
    waiting[#waiting + 1] = fn
    return
  end
  self.drain_waiters = { fn }
  self.cb:on_drained(function()
    local list = self.drain_waiters
    self.drain_waiters = nil
    for _, f in ipairs(list or {}) do
      f()
    end
  end)
end

-- One response at a time: the service refuses response.create while one is
-- active ("conversation_already_has_active_response"), so one asked for
-- meanwhile is sent when the active one is done. Each response.create is
-- numbered: its event_id comes back on an error that refuses it, and its
-- metadata on the response it starts. A service that echoes neither is
-- given CREATE_WINDOW_MS to start ours before another goes out.
local CREATE_WINDOW_MS = 2000

function Bridge:_respond()
  local since = self.create_sent_at and timer.now() - self.create_sent_at
  if self.responding or (since and since < CREATE_WINDOW_MS) then
    self.respond_after = true
    if not self.responding and not self.respond_timer then
      -- Ours was sent and has not started: if the service refused it, no
      -- response.done will come to send this one; the window's end will.
      self.respond_timer = timer.after(CREATE_WINDOW_MS - since + 1, function()
        self.respond_timer = nil
        if self.respond_after and not self.responding and not self.ended then
          self.respond_after = false
          self.create_sent_at = nil
          self:_respond()
        end
      end)
    end
    return
  end
  self.respond_after = false -- this one serves any asked for meanwhile
  self.greeting_waiting = nil
  self.create_sent_at = timer.now()
  self.creates = (self.creates or 0) + 1
  local n = tostring(self.creates)
  self.create_event_id = "callagent_create_" .. n
  self.rt:send({
    type = "response.create",
    event_id = self.create_event_id,
    response = not self.plain_creates and { metadata = { callagent = n } } or nil,
  })
  self:_watch_response()
end

-- How much the model has sent: its events that reached Lua, and the deltas
-- (audio, text) the C path took.
function Bridge:_model_progress()
  local st = self.cb and self.cb:stats() or EMPTY
  return (self.model_events or 0) + (st.deltas or 0) + (st.text_deltas or 0)
end

-- While a response is due (ours asked for and not started, or one active),
-- the model must send something every RESPONSE_STALL_MS; else the call
-- would be a silent line until call.maxDurationSec. After the report the
-- goodbye's own bound ends the call, and a wrap-up's its own.
function Bridge:_watch_response()
  if self.stall_timer or self.ended then
    return
  end
  local seen = self:_model_progress()
  self.stall_timer = timer.after(M.RESPONSE_STALL_MS, function()
    self.stall_timer = nil
    if self.ended or not (self.responding or self.create_sent_at) then
      return
    end
    if self:_model_progress() ~= seen then
      return self:_watch_response()
    end
    if self.report or self.wrapup_reason or self.hanging_up then
      return
    end
    local why = "model stalled: nothing from it for " .. M.RESPONSE_STALL_MS // 1000 .. " s while a response was due"
    log.warn("model stalled", { call = self.call_id, attempt = self.attempt, reason = why })
    self.engine:bridge_error(self, why)
    self:hangup("model_error")
  end)
end

-- Whether a response's output holds a message (what the agent said).
local function spoke(r)
  for _, item in ipairs(type(r.output) == "table" and r.output or EMPTY) do
    if obj(item).type == "message" then
      return true
    end
  end
  return false
end

-- Whether function calls hold one of the app's tools (not report_call, nor
-- a function the app has not: "end_call", made up with a goodbye, gets
-- its error and nothing to say).
local function calls_a_tool(fns, tools)
  for _, fc in ipairs(fns) do
    if fc.name ~= "report_call" and tools[fc.name] then
      return true
    end
  end
  return false
end

-- The model can generate no response in this call (NO_RESPONSES): it ends
-- failed (model_error), why in lastError; after the report, once what was
-- sent has played, as if the goodbye were done.
function Bridge:_no_responses(why)
  log.warn("model cannot respond: the call ends", { call = self.call_id, attempt = self.attempt, reason = why })
  self.engine:bridge_error(self, why)
  if self.report then
    return self:_finish_after_report()
  end
  return self:hangup("model_error")
end

function Bridge:_response_done(r)
  self.responding = false
  local failed = r.status == "failed"
  -- One that failed said nothing: not the agent's first turn either.
  if self.greeting_waiting and not failed then
    -- A response the service started itself (its turn detection heard the
    -- callee, often a "Hello?" while the model connection was opening) came
    -- first: that was the agent's first turn. Greeting after it would have
    -- the agent speak twice with nothing said in between.
    self.greeting_waiting = nil
    if not self.first_response_done then
      log.info("greeting dropped: the model already answered the callee", self.log_fields)
      self.respond_after = false
      self:_stop_timer("respond_timer")
    end
  end
  for _, item in ipairs(type(r.output) == "table" and r.output or EMPTY) do
    if obj(item).type == "function_call" then
      self:_decide_function(item)
    end
  end
  -- Calls of this response known only from their arguments.done: they
  -- stand if it completed, and were cut short with it if not.
  local rid, held, keep = str(r.id), self.fn_held, nil
  self.fn_held = nil
  for _, h in ipairs(held or EMPTY) do
    if rid and h.response_id and h.response_id ~= rid then
      keep = keep or {}
      keep[#keep + 1] = h
    else
      self:_decide_function({ call_id = h.call_id, name = h.name, arguments = h.arguments,
        status = r.status == "completed" and "completed" or "incomplete" })
    end
  end
  self.fn_held = keep
  -- A goodbye response that said nothing and only called functions
  -- (report_call once more, say) is not the goodbye: taken for it, it would
  -- hang up before anything was said. Nor is one that called a tool of the
  -- app's (after a barge-in, the answer to the callee: "let me check"):
  -- the model has the tool's output still to say. The response asked for
  -- once their outputs are in is.
  if self.goodbye_id and r.id == self.goodbye_id and self.fn_pending
    and (not spoke(r) or calls_a_tool(self.fn_pending, self.engine.tools_by_name or EMPTY)) then
    self.goodbye_id = nil
    self.goodbye_from = (self.creates or 0) + 1
  end
  if self.fn_pending then
    -- Calls the goodbye made beside what it said (report_call once more:
    -- an app's tool is not left unsaid, see above) get their outputs, and
    -- no response: the goodbye was the last thing to be said, and one
    -- asked for now would follow it.
    self:_run_functions(self.goodbye_id ~= nil and r.id == self.goodbye_id)
  end
  if type(r.usage) == "table" then
    self.engine:bridge_usage(self, r.usage)
  end
  if failed then
    local err = obj(obj(r.status_details).error)
    local code, message = text(err.code) or text(err.type), text(err.message)
    local why = "model response failed: " .. (code or "?") .. ": " .. (message or "no details")
    if NO_RESPONSES[code] or NO_RESPONSES[text(err.type)] then
      return self:_no_responses(why)
    end
    self.engine:bridge_error(self, why)
    if not self.first_response_done then
      -- Nothing was said: the greeting is still to come (asked again once,
      -- as a refused one is), and the silence is not yet counted from it.
      self:_greeting_refused(message)
    end
  end
  if not self.first_response_done and not failed then
    self.first_response_done = true
    -- The silence counts once the greeting has played, not been generated:
    -- when the phone says it has (its marks), or GREETING_PLAY_SLACK_MS
    -- after the greeting's length at the latest. A phone that never says
    -- what it played (a frozen page, a stalled stream: no mark echoed, no
    -- frame) held the count, and the call, until call.maxDurationSec.
    local counted = false
    local function count()
      self:_stop_timer("greet_played_timer")
      if not (counted or self.ended) then
        counted = true
        self:_arm_silence_timer()
      end
    end
    local sent_ms = self.cb and select(2, self.cb:item()) or 0
    self.greet_played_timer = timer.after(sent_ms + M.GREETING_PLAY_SLACK_MS, count)
    self:_when_drained(count)
  end
  if self.goodbye_id and r.id == self.goodbye_id then
    self.goodbye_done = true
    self:_check_goodbye()
  end
  -- Tools still running send theirs once their outputs are in: that one
  -- serves a response asked for meanwhile too.
  if self.respond_after and (self.tools_running or 0) == 0 then
    self:_respond()
  end
end

-- Functions ----------------------------------------------------------------

function Bridge:_send_function_output(call_id, output)
  self.rt:send({
    type = "conversation.item.create",
    item = { type = "function_call_output", call_id = call_id, output = output },
  })
end

local OUTCOMES = { success = true, failure = true, voicemail = true, no_answer = true, unknown = true }
local DATA_DEPTH = 20
-- The most of a report kept: the record, every listing of it and the
-- notification hold it (the notification twice: its message quotes the
-- summary and the steps), and a receiver refuses a body over its limit for
-- good (a 413: 1 MiB in callagent's own server, 100 KiB in Express's). A
-- model asked for two or three sentences writes a few hundred bytes.
M.REPORT_LIMITS = { summary = 4096, outcome = 256, step = 1024, steps = 20, data = 32768 }
local REPORT_FIELDS = { summary = true, outcome = true, nextSteps = true, data = true }

-- fields: the call's log fields (call, attempt), for the warnings.
local function normalize_report(args, fields)
  local function warn(msg, extra)
    local f = {}
    for k, v in pairs(fields or EMPTY) do
      f[k] = v
    end
    for k, v in pairs(extra) do
      f[k] = v
    end
    log.warn(msg, f)
  end
  local limits = M.REPORT_LIMITS
  local function cut(s, what)
    if #s > limits[what] then
      warn("report_call " .. (what == "step" and "next step" or what) .. " cut", { bytes = #s, kept = limits[what] })
      return http.cut(s, limits[what])
    end
    return s
  end
  local r = {}
  r.summary = cut(text(args.summary) or "", "summary")
  -- "Success" is success: the model's word, not a new one.
  local outcome = type(args.outcome) == "string" and args.outcome:lower()
  r.outcome = OUTCOMES[outcome] and outcome or "unknown"
  if not OUTCOMES[outcome] and args.outcome ~= nil and args.outcome ~= json.null then
    -- Another word than the five ("callback_requested"; the schema's enum
    -- guides the model, the service does not enforce it): unknown, and the
    -- model's own kept beside it (a value that is no string as its JSON),
    -- so that nothing it said is lost.
    local raw = text(args.outcome)
    if raw == nil then
      local ok, s = pcall(json.encode, json.utf8(args.outcome))
      raw = ok and s or nil
    end
    r.outcomeRaw = raw and cut(raw, "outcome")
    warn("report_call outcome is none of success, failure, voicemail, no_answer, unknown: unknown, the model's "
      .. "kept as outcomeRaw", { outcome = raw and http.cut(raw, 64) or "(" .. type(args.outcome) .. ")" })
  end
  r.nextSteps = json.array({})
  -- One step written as a string, not a list of one, is that step.
  local steps = type(args.nextSteps) == "string" and { args.nextSteps } or args.nextSteps
  if type(steps) == "table" then
    for _, s in ipairs(steps) do
      if type(s) == "string" then
        if #r.nextSteps == limits.steps then
          warn("report_call next steps dropped", { given = #steps, kept = limits.steps })
          break
        end
        r.nextSteps[#r.nextSteps + 1] = cut(json.utf8(s), "step")
      end
    end
  end
  local data = args.data
  if data == json.null then
    data = nil
  elseif data ~= nil and (type(data) ~= "table" or json.is_array(data) or rawlen(data) > 0) then
    -- An array, a string, a number: kept, under "value", so that data stays
    -- the object the record and the webhook promise.
    warn("report_call data was not an object: kept as data.value", { kind = type(data) == "table" and "array"
      or type(data) })
    data = { value = data }
  end
  data = type(data) == "table" and data or {}
  -- Fields the model put beside these (a report schema the prompt asked
  -- for, written at the top level) are the call's details too: kept in
  -- data, where one of data's own keys wins. One no record could hold is
  -- dropped alone: in data, it would take data's own fields with it.
  for k, v in pairs(args) do
    if not REPORT_FIELDS[k] and data[k] == nil then
      local fits, why = json.check(json.utf8(v), DATA_DEPTH - 1)
      if fits then
        data[k] = v
      else
        warn("report_call field beside data dropped", { field = http.cut(json.utf8(k), 64), reason = "it " .. why })
      end
    end
  end
  r.data = json.utf8(data)
  -- The record and the webhook must be able to hold it.
  local ok, why = json.check(r.data, DATA_DEPTH)
  local size = ok and #json.encode(r.data)
  if size and size > limits.data then
    ok, why = false, "is " .. size .. " bytes of JSON, more than " .. limits.data
  end
  if not ok then
    warn("report_call data dropped", { reason = "it " .. why })
    r.data = {}
  end
  return r
end

local ARG_KINDS = { table = "an array", string = "a string", number = "a number", boolean = "a boolean" }

-- The arguments of a function call as a table, or nil and a short reason
-- (the arguments themselves can be long, and are the model's).
local function decode_arguments(arguments)
  if not arguments then
    return nil, "none were sent"
  end
  local args, err = json.try_decode(arguments, true)
  if args == nil then
    return nil, "invalid JSON: " .. tostring(err):gsub("^EJSON: ", ""):sub(1, 100)
  elseif type(args) ~= "table" or not arguments:find("^[ \t\r\n]*{") then
    return nil, "they were " .. (ARG_KINDS[type(args)] or "null")
  end
  return args
end

-- The output the model gets for a call whose arguments are no JSON object.
local function bad_arguments(fc)
  local out = { error = "the arguments were not a JSON object (" .. fc.bad .. "); call " .. tostring(fc.name)
    .. " again with valid JSON" }
  if fc.name == "report_call" then
    out.ok = false
  end
  return json.encode(out)
end

-- A report_call that comes once the call has ended (the model made it as the
-- phone hung up, or answering the callee's last words) is stored: the report
-- must not depend on the rest of the call. Nothing else of the call runs
-- then: no tool, no output to the model, no goodbye for a phone that is gone.
function Bridge:_late_report(item)
  if self.report or item.type ~= "function_call" or item.name ~= "report_call"
    or (item.status ~= nil and item.status ~= "completed") then
    return
  end
  local args = decode_arguments(str(item.arguments))
  if args then
    self.report = normalize_report(args, self.log_fields)
    log.info("report_call came after the call ended: stored", self.log_fields)
    self.engine:bridge_report(self, self.report)
  end
end

-- The model went after a report_call's arguments.done, before its output
-- item or its response said how it ended: arguments that are a JSON object
-- are whole (a cut leaves the JSON unclosed), so they are the call's report
-- rather than lost with the model.
function Bridge:_report_held_at_close()
  if self.report then
    return
  end
  for _, h in ipairs(self.fn_held or EMPTY) do
    local args = h.name == "report_call" and decode_arguments(h.arguments)
    if args then
      self.functions_seen[h.call_id] = true
      self.report = normalize_report(args, self.log_fields)
      log.info("report_call's arguments came before the model went: stored", self.log_fields)
      self.engine:bridge_report(self, self.report)
      return
    end
  end
end

-- The function call held for call_id (from its arguments.done), taken out.
function Bridge:_take_held(call_id)
  for i, h in ipairs(self.fn_held or EMPTY) do
    if h.call_id == call_id then
      return table.remove(self.fn_held, i)
    end
  end
end

-- A function call is decided by its output item (or its response): one that
-- completed runs, with the arguments its arguments.done gave if the item has
-- none; one cut short (status "incomplete", its response cancelled by a
-- barge-in) has partial arguments: not run, and not taken for the report.
function Bridge:_decide_function(item)
  local call_id = str(item.call_id)
  if not call_id or self.functions_seen[call_id] then
    return
  end
  local held = self:_take_held(call_id) or EMPTY
  local name = str(item.name) or held.name
  if item.status ~= nil and item.status ~= "completed" then
    self.functions_seen[call_id] = true
    log.debug("function call cut short: not run", { call = self.call_id, ["function"] = name,
      status = text(item.status) })
    return
  end
  return self:_function_call(call_id, name, str(item.arguments) or held.arguments)
end

--- A function call is complete; it runs once its response is done (the
-- service takes no new response.create while one is active).
function Bridge:_function_call(call_id, name, arguments)
  self.functions_seen[call_id] = true
  local args, why = decode_arguments(arguments)
  local fc = { call_id = call_id, name = name, args = args }
  if not args then
    -- Not the report (nor a tool's input): the model is told, and may call again.
    fc.bad = why
    log.warn("function call arguments are not a JSON object", { call = self.call_id, attempt = self.attempt,
      ["function"] = name, reason = why })
  elseif name == "report_call" and not self.report then
    -- Stored at once: the report must not depend on the rest of the call.
    self.report = normalize_report(args, self.log_fields)
    self.engine:bridge_report(self, self.report)
    fc.first_report = true
    self:_stop_timer("silence_timer")
    self:_stop_timer("wrapup_timer")
  end
  self.fn_pending = self.fn_pending or {}
  self.fn_pending[#self.fn_pending + 1] = fc
end

-- after_goodbye: their outputs are sent, and no response is asked for.
function Bridge:_run_functions(after_goodbye)
  local list = self.fn_pending
  self.fn_pending = nil
  -- The report ends the call: its goodbye bound starts now, not once the
  -- tools called in the same response have returned (one that never does
  -- would hold the call open, with no wrap-up left to end it).
  for _, fc in ipairs(list) do
    if fc.first_report then
      self:_start_goodbye_timer()
    end
  end
  self.tools_running = (self.tools_running or 0) + 1
  task.spawn(function()
    local goodbye = false
    for _, fc in ipairs(list) do
      local out
      if fc.name == "report_call" then
        if fc.first_report then
          goodbye = true
          out = '{"ok":true,"next":"Say a short goodbye now; the call then ends."}'
        elseif fc.bad and not self.report then
          out = bad_arguments(fc)
        else
          out = '{"ok":true,"note":"The call was already reported; this report was not stored."}'
        end
      else
        out = self:_run_tool(fc)
      end
      if self.ended or self.rt.closed then
        return
      end
      self:_send_function_output(fc.call_id, out)
    end
    if goodbye then
      self.goodbye_requested = true
      self.goodbye_from = (self.creates or 0) + 1 -- the next response.create asks for it
      self:_start_goodbye_timer()
    end
    self.tools_running = self.tools_running - 1
    if not after_goodbye then
      self:_respond()
    end
  end)
end

-- A tool's output goes to the model as one message, with the call's audio
-- queued beside it: one over the connection's send queue (4 MiB) would drop
-- the model, and the call with it. Far less already fills the model's
-- context; past this the model is told the output was too long.
local MAX_TOOL_OUTPUT = 256 * 1024

function Bridge:_run_tool(fc)
  local out = self:_tool_output(fc)
  if #out > MAX_TOOL_OUTPUT then
    log.warn("tool output too long: the model is told so", { call = self.call_id, tool = fc.name, bytes = #out })
    return json.encode({ error = "the tool's output was too long (" .. #out .. " bytes, at most " .. MAX_TOOL_OUTPUT
      .. ")" })
  end
  -- The connection's text frames must be UTF-8 (the service fails it on one
  -- that is not): a tool's Latin-1 text, say, gets U+FFFD for its bad bytes.
  -- In an encoded table they are inside its strings: it stays JSON.
  return json.utf8(out)
end

function Bridge:_tool_output(fc)
  local tool = self.engine.tools_by_name[fc.name]
  if not tool then
    return json.encode({ error = "unknown function " .. tostring(fc.name) })
  elseif fc.bad then
    return bad_arguments(fc)
  end
  local ok, result = xpcall(tool.handler, debug.traceback, fc.args, self.engine:call_view(self.call_id))
  if not ok then
    log.error("tool failed", { call = self.call_id, tool = fc.name, error = result })
    return json.encode({ error = "the tool failed" })
  elseif type(result) == "string" then
    return result
  end
  local eok, js = pcall(json.encode, result == nil and json.null or result)
  return eok and js or json.encode({ error = "the tool returned something that is not JSON" })
end

-- The goodbye's bound: call.goodbyeTimeoutSec, then the call is hung up
-- whatever still plays (a phone that never echoes marks holds nothing).
function Bridge:_start_goodbye_timer()
  if self.goodbye_timer or self.ended then
    return
  end
  self.goodbye_timer = timer.after(self.cfg.call.goodbyeTimeoutSec * 1000, function()
    self.goodbye_timer = nil
    self:hangup("completed")
  end)
end

-- The goodbye is over once its response is done and all its audio has played.
function Bridge:_check_goodbye()
  if not self.goodbye_done or self.ended then
    return
  end
  if not self.cb then
    return self:hangup("completed")
  end
  self:_when_drained(function()
    if self.goodbye_done and not self.ended then -- not if the callee spoke over it (_speech_started)
      self:hangup("completed")
    end
  end)
end

-- Wrapping up ---------------------------------------------------------------

function Bridge:_stop_timer(name)
  local t = self[name]
  if t then
    t:stop()
    self[name] = nil
  end
end

function Bridge:_arm_silence_timer()
  -- Once the wrap-up was asked for, its own timer bounds the call.
  if self.callee_spoke_at or self.report or self.wrapup_reason then
    return
  end
  self:_stop_timer("silence_timer") -- from a refused greeting: counts again from the greeting played
  self.silence_timer = timer.after(self.cfg.call.silenceTimeoutSec * 1000, function()
    self.silence_timer = nil
    if self.callee_spoke_at or self.report or self.ended then
      return
    end
    log.info("callee silent: wrapping up", self.log_fields)
    self:_ask_to_wrap_up(
      "The person on the line has not said anything since you started. Assume nobody is listening: "
        .. "call report_call now (outcome no_answer, or voicemail if you heard a voicemail greeting), then say goodbye.",
      "callee_silent")
  end)
end

function Bridge:_ask_to_wrap_up(text, reason)
  if self.report or self.ended or not self.model_ready then
    return self:hangup(reason)
  end
  self.rt:send({
    type = "conversation.item.create",
    item = { type = "message", role = "system", content = { { type = "input_text", text = text } } },
  })
  self:_respond()
  self.wrapup_reason = reason
  self.wrapup_timer = timer.after(self.cfg.call.wrapUpSec * 1000, function()
    self.wrapup_timer = nil
    if not self.report then
      self:hangup(reason)
    end
  end)
end

function Bridge:_wrap_up_now(reason)
  self.wrapup_reason = reason
  self:hangup(reason)
end

-- The call's time is up: call.maxDurationSec of streaming, or the model's
-- session near its end. The first of the two asks for the wrap-up; the
-- other then does nothing (its timer is stopped), nor does either while
-- another wrap-up (a silent callee's) runs: its own bound is sooner.
function Bridge:_time_up(reason, message, why)
  self:_stop_timer("max_timer")
  self:_stop_timer("session_timer")
  if self.ended or self.report or self.time_up or self.wrapup_reason then
    return
  end
  self.time_up = reason
  log.info(message .. ": wrapping up", self.log_fields)
  self.engine:bridge_error(self, why)
  self:_ask_to_wrap_up("The time for this call is up. Call report_call now with what you have, then say a one-sentence goodbye.",
    reason)
end

function Bridge:on_max_duration()
  self:_time_up("max_duration", "maximum call duration reached",
    "maximum call duration reached (" .. self.cfg.call.maxDurationSec .. " s)")
end

function Bridge:on_session_limit()
  self:_time_up("session_limit", "model session ends soon",
    "model session ends soon (openai.sessionMaxSec " .. self.cfg.openai.sessionMaxSec .. " s)")
end

--- Ends the attempt: the provider hangs up; the rest follows from its status.
function Bridge:hangup(reason)
  if self.hanging_up then
    return
  end
  self.hanging_up = true
  self.end_reason = self.end_reason or reason
  self.engine:bridge_hangup(self, reason)
end

-- Phone (Media Streams) ----------------------------------------------------

--- A Media Streams WebSocket says its `start`: the stream belongs to this attempt.
function Bridge:attach(conn, start)
  self.stream = conn
  self.stream_sid = start.streamSid
  log.info("media stream started", { call = self.call_id, attempt = self.attempt, stream = start.streamSid })
  self:_link()
  self.max_timer = timer.after(self.cfg.call.maxDurationSec * 1000, function()
    self.max_timer = nil
    self:on_max_duration()
  end)
  self:_maybe_greet()
end

-- The events of a Media Streams stream after its start (a `connected`
-- before it is no harm either), and Telnyx's `error`.
local STREAM_EVENTS = { media = true, mark = true, stop = true, dtmf = true, connected = true, error = true }

-- A stream message that is none of them, or a second start: ignored, the
-- first logged (no vendor of ours sends one: a peer that speaks another
-- protocol, or a broken one), the count when the attempt ends.
function Bridge:_stream_ignored(what)
  self.stream_ignored = (self.stream_ignored or 0) + 1
  if self.stream_ignored == 1 then
    log.warn("media stream: a message not understood ignored, and any more like it", { call = self.call_id,
      attempt = self.attempt, what = what })
  end
end

-- A field of the vendor's error, for the log: a whole number (JSON's
-- decode gives a float), or text made UTF-8 and cut to 200 bytes, scrubbed
-- before the cut (a secret across it would keep its first bytes).
local function error_field(v)
  if type(v) == "number" and v % 1 == 0 and math.abs(v) < 2 ^ 53 then
    return string.format("%d", v)
  end
  return type(v) == "string" and json.utf8(log.scrub(v):sub(1, 200)) or nil
end

-- Telnyx's Media Streaming sends an `error` frame when an error occurs in
-- the stream (of the media sent to it, say): the vendor's word, not a
-- message not understood. Its fields (payload.code, title, detail) are
-- ASSUMED from Telnyx's error shape elsewhere. The first is logged with
-- them; a vendor that sends one per frame is not a line per frame: the
-- count when the attempt ends.
function Bridge:_stream_error(ev)
  self.stream_errors = (self.stream_errors or 0) + 1
  if self.stream_errors == 1 then
    local p = type(ev.payload) == "table" and ev.payload or ev
    log.warn("media stream: the vendor reported an error", { call = self.call_id, attempt = self.attempt,
      code = error_field(p.code), title = error_field(p.title), detail = error_field(p.detail) })
  end
end

--- Text messages of the attached stream that the C path did not take:
-- everything but media and marks, and those of them that only a JSON
-- parser reads right (a key twice, an escaped event name): their fields go
-- back to C.
function Bridge:on_stream_text(msg)
  local ev = json.try_decode(msg)
  if type(ev) ~= "table" then
    return self:_stream_ignored("a message that is not a JSON object")
  end
  local e = ev.event
  if type(e) ~= "string" then
    return self:_stream_ignored("a message without an event name")
  elseif e == "start" then
    return self:_stream_ignored("a second start")
  elseif not STREAM_EVENTS[e] then
    return self:_stream_ignored(#e <= 32 and "event " .. e or "an event of an unknown name")
  end
  if e == "media" or e == "mark" then
    local m = ev[e]
    local v = type(m) == "table" and m[e == "media" and "payload" or "name"]
    if type(v) == "string" and self.cb then
      if e == "media" then
        self.cb:phone_media(v)
      else
        self.cb:phone_mark(v)
      end
    end
  elseif e == "stop" then
    log.info("media stream stopped", { call = self.call_id, attempt = self.attempt })
    self.phone_stopped = true
  elseif e == "error" then
    self:_stream_error(ev)
  elseif e == "dtmf" then
    local d = type(ev.dtmf) == "table" and ev.dtmf.digit
    if type(d) == "string" and d:match("^[%d*#A-Da-d]$") then
      if self.model_ready then
        self:_send_key(d)
        self:_key_pressed(d)
      elseif #self.held_keys < MAX_HELD_KEYS then
        -- Kept, as the caller's audio is, until the model is there.
        self.held_keys[#self.held_keys + 1] = d
      end
    end
  end
end

function Bridge:_send_key(d)
  self.rt:send({
    type = "conversation.item.create",
    item = { type = "message", role = "user", content = { { type = "input_text", text = "[The callee pressed the key " .. d .. "]" } } },
  })
end

-- A key press is the callee answering: it ends the silence count, and it
-- gets a reply, which the service's turn detection would never start (it
-- listens for speech). Keys typed in a row get one reply, DTMF_PAUSE_MS
-- after the last; "#", which ends an entry, gets it at once. Not once the
-- report is in: the goodbye is the last thing said.
local DTMF_PAUSE_MS = 1200

function Bridge:_key_pressed(digit)
  self.callee_spoke_at = timer.now()
  self:_stop_timer("silence_timer")
  self:_stop_timer("dtmf_timer")
  local function reply()
    if not (self.ended or self.report or self.goodbye_requested or self.hanging_up) then
      self:_respond()
    end
  end
  if digit == "#" then
    return reply()
  end
  self.dtmf_timer = timer.after(DTMF_PAUSE_MS, function()
    self.dtmf_timer = nil
    reply()
  end)
end

-- Close codes (RFC 6455 7.4.1) that end a media stream for a fault: ours
-- (the C side gives its own fail code first: a protocol error, a message
-- over max_ws_message, 1008 for a peer that reads too slowly, its send
-- queue over max_send_queue) or the peer's. Not the callee hanging up, as
-- 1000, 1001, 1005 (no code) and 1006 (the connection lost) are taken to be.
local STREAM_FAULTS = {
  [1002] = "protocol error",
  [1007] = "invalid data",
  [1008] = "policy violation",
  [1009] = "message too big",
  [1011] = "internal error",
}

--- The stream's WebSocket closed (the phone hung up, or after our hang-up,
-- or for a fault): code, reason as the connection's close gives them.
function Bridge:on_stream_closed(code, reason)
  self.stream_closed = true
  local fault = STREAM_FAULTS[code]
  -- After the vendor's `stop` the stream was over (the call ended there):
  -- how its socket then closes says nothing of the call.
  if fault and not self.ended and not self.hanging_up and not self.end_reason and not self.phone_stopped then
    -- Nobody hung up: the stream broke. The call ends with it (Twilio's
    -- <Connect><Stream> is over; a vendor whose call outlives its stream
    -- is hung up by the engine), and the record says callagent's side
    -- failed, not that the callee went.
    local why = type(reason) == "string" and reason ~= "" and reason ~= fault and (": " .. reason) or ""
    log.warn("media stream closed for a fault", { call = self.call_id, attempt = self.attempt, code = code,
      reason = fault .. why })
    self.end_reason = "stream_error"
    self.engine:bridge_error(self, string.format("media stream closed: %s (%d%s)", fault, code, why))
  end
  self:finish(self.end_reason or (self.hanging_up and "completed") or "callee_hung_up")
end

--- Frees everything; tells the engine how the attempt ended.
function Bridge:finish(reason)
  if self.ended then
    return
  end
  -- The phone side ended before the model session was ready (still opening,
  -- or its start rate limited): the agent never got to speak, and a record
  -- with no more than callee_hung_up would not say why the callee went.
  -- A stream that failed says so in lastError already: the phone side did not end it.
  if self.stream_sid and not self.was_ready and not self.hanging_up and self.end_reason ~= "stream_error"
    and reason ~= "shutdown" then
    local n = self.model_retries
    self.engine:bridge_error(self, "the phone side ended before the model session was ready"
      .. (n and string.format(" (rate limited %d %s)", n, n == 1 and "time" or "times") or ""))
  end
  self.ended = true
  for _, name in ipairs({ "max_timer", "session_timer", "silence_timer", "goodbye_timer", "wrapup_timer",
    "ready_timer", "respond_timer", "greet_retry_timer", "greet_played_timer", "dtmf_timer", "stall_timer",
    "model_retry_timer" }) do
    self:_stop_timer(name)
  end
  self:_flush_lines() -- what was said and not yet (known to be) played
  if (self.stream_ignored or 0) > 1 then
    log.warn("media stream: messages not understood were ignored", { call = self.call_id, attempt = self.attempt,
      count = self.stream_ignored })
  end
  if (self.stream_errors or 0) > 1 then
    log.warn("media stream: the vendor reported more errors", { call = self.call_id, attempt = self.attempt,
      count = self.stream_errors })
  end
  local st = self.cb and self.cb:stats() or { bad_in = 0, bad_out = 0, dropped_kept = 0 }
  if st.bad_in > 0 or st.bad_out > 0 or st.dropped_kept > 0 then
    log.warn("call audio dropped", {
      call = self.call_id,
      not_base64_from_phone = st.bad_in,
      not_base64_from_model = st.bad_out,
      phone_frames_over_buffer = st.dropped_kept,
    })
  end
  if self.cb then
    self.cb:close()
    self.cb = nil
  end
  if self.stream and self.stream:is_open() then
    self.stream:close(1000, "call ended")
  end
  self.stream = nil
  self.pending_out = {}
  self.finish_reason = self.end_reason or reason
  -- The callee's last words, still being transcribed: the model connection
  -- stays open for them, LAST_WORDS_MS at most, and the attempt ends after.
  -- Not at a stop (the store closes), nor with no model session to hear them.
  if self:_callee_pending() and self.rt and self.rt.ready and not self.rt.closed and reason ~= "shutdown"
    and not self.engine.stopped and not self.engine.closed then
    self.last_words = { waiters = {} }
    log.info("waiting for the callee's last words", { call = self.call_id, attempt = self.attempt })
    if self.speaking and not self.speech_stopped then
      -- The phone ended mid-sentence: no end of speech for the service's
      -- turn detection to hear. What it has is committed, and transcribed.
      self.rt:send({ type = "input_audio_buffer.commit" })
    end
    self.last_words.timer = timer.after(M.LAST_WORDS_MS, function()
      self.last_words.timer = nil
      log.info("the callee's last words did not come in time", { call = self.call_id, attempt = self.attempt })
      self:_last_words_late()
    end)
    return
  end
  self:_close_model()
end

-- Whether the callee said something whose transcript has not come.
function Bridge:_callee_pending()
  return self.speaking ~= nil or next(self.awaiting or EMPTY) ~= nil
end

function Bridge:_check_last_words()
  if self.last_words and not self:_callee_pending() then
    self:end_last_words()
  end
end

-- LAST_WORDS_MS passed, and the callee's words are still being transcribed.
-- Their transcription may be on its way, sent before the service read our
-- close: the model connection closes now, and the wait ends once the service
-- has answered the close (nothing of its comes after that), CLOSE_WAIT_MS at
-- most, or once the words came. Until then the agent lines said after them
-- are held, and the attempt's end waits, so that a late line is still
-- written, before those lines.
local CLOSE_WAIT_MS = 1000

function Bridge:_last_words_late()
  local lw = self.last_words
  lw.timer = timer.after(CLOSE_WAIT_MS, function()
    lw.timer = nil
    self:end_last_words()
  end)
  self.rt:close(function()
    self:end_last_words()
  end)
end

--- The wait for the callee's last words is over (they came, or the bound and
-- the close passed, or the model went, or the app stops): the attempt ends now.
function Bridge:end_last_words()
  local lw = self.last_words
  if not lw then
    return
  end
  self.last_words = nil
  if lw.timer then
    lw.timer:stop()
  end
  self:_close_model()
  for _, fn in ipairs(lw.waiters) do
    fn()
  end
end

-- The model connection closes, and the engine learns the attempt is over.
function Bridge:_close_model()
  -- Transcripts still awaited will not come: the agent lines held for them go now.
  for item in pairs(self.awaiting or EMPTY) do
    self:_transcript_in(item)
  end
  self.speaking = nil
  if self.rt then
    self.rt:close()
  end
  self.engine:bridge_finished(self, self.finish_reason)
end

--- fn() once the callee's last words are in (see LAST_WORDS_MS); false, and
-- fn is not kept, when they are not being waited for.
function Bridge:after_last_words(fn)
  if not self.last_words then
    return false
  end
  local w = self.last_words.waiters
  w[#w + 1] = fn
  return true
end

return M
