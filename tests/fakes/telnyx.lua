--- fakes.telnyx: Telnyx Call Control (v2) REST, signed webhooks and Media
-- Streaming, faked on loopback for tests. It speaks the wire protocol as
-- providers/telnyx.lua's header documents it, from the same docs.
--
--   local fake = require "fakes.telnyx"
--   local tx = assert(fake.start{
--     api_key = "KEY...",          -- the Bearer key it accepts
--     connection_id = "conn-1",    -- the connection_id it accepts
--     behaviour = "answer",        -- or "busy" | "no-answer" | "rejected" |
--                                  -- "failed" | "reject-api" | a table
--                                  -- {answer = one of those, ring_ms,
--                                  -- control_id (the id the dial answers),
--                                  -- audio (mu-law bytes the callee says),
--                                  -- hangup_after_ms, stream = false (no
--                                  -- stream, no webhook) | "fail" (a
--                                  -- streaming.failed webhook instead of the
--                                  -- stream), failure_reason,
--                                  -- lost_hangup_webhook (its call.hangup
--                                  -- is never sent), codec (the call's:
--                                  -- "PCMU" (default), "PCMA", "G722"...)}
--                                  -- | fn(call) -> one of those
--     clock_skew_s = 0,            -- the webhooks' telnyx-timestamp this far off
--     fail_hangups = 0,            -- the first n hangup requests get 503
--     hangup_delay_ms = nil,       -- a hangup request is taken (and answered)
--                                  -- this late, as over a slow link: a callee
--                                  -- may answer meanwhile, and is hung up
--     stopped_at_end = nil,        -- ms: a call that streamed sends streaming.stopped
--                                  -- that long after it ends, before its call.hangup
--     fail_streaming_starts = 0,   -- the first n streaming_start requests get 503
--     echo_streaming_starts = nil, -- an HTTP status (422, 503): every streaming_start
--                                  -- is refused with it, its detail quoting the
--                                  -- request's custom_parameters (call.refused_stream:
--                                  -- the request's body)
--     fail_dials = 0,              -- the first n dials get 503 (tx.dials counts them all)
--   })
--   tx.url, tx.public_key (base64), tx.private_key (raw 32 bytes)
--   tx.calls (in creation order), tx.requests ({method, path, auth, body, at})
--   tx:wait_call([ms]) -> call;  tx:close()
--   fake.sign(private_raw, timestamp, body) -> base64 signature
--
-- REST (Bearer api_key, else 401 {"errors":[{code "10009", title
-- "Authentication failed"}]}):
--   POST /v2/calls   JSON connection_id, to, from (E.164), webhook_url,
--     timeout_secs (5..120) and time_limit_secs (at most 14400) if given: 422
--     {"errors":[...]} when one is missing or wrong; 200 {"data":{call_control_id,
--     call_leg_id, call_session_id, is_alive, record_type "call"}}.
--   POST /v2/calls/{id}/actions/streaming_start  JSON stream_url, stream_track,
--     stream_bidirectional_mode, stream_bidirectional_codec, custom_parameters
--     ([{name, value}]): 200 {"data":{"result":"ok"}}, then the WebSocket.
--   POST /v2/calls/{id}/actions/hangup   200 {"data":{"result":"ok"}}; 422
--     code 90018 for a call that has ended.
--   GET  /v2/calls/{id}   {"data":{call_control_id, is_alive, call_duration,...}}
--   Unknown id or path: 404 {"errors":[{code "10005", title "Resource not found"}]}.
--
-- Webhooks: POST to webhook_url, JSON {"data":{"event_type","id","occurred_at",
-- "payload":{...},"record_type":"event"},"meta":{"attempt":1,"delivered_to"}},
-- signed: telnyx-timestamp (Unix s) and telnyx-signature-ed25519 =
-- base64(Ed25519(private, ts .. "|" .. body)). Events: call.initiated;
-- call.answered; streaming.started; streaming.failed (behaviour stream
-- "fail": failure_reason, stream_id, stream_params {stream_url,
-- stream_track}, stream_type "websocket", as developers.telnyx.com/
-- api-reference/callbacks/streaming-failed shows it); streaming.stopped
-- (call:stop_stream(): stream_url); call.hangup (hangup_cause user_busy,
-- timeout, call_rejected, normal_clearing, originator_cancel,
-- unspecified + sip_hangup_cause).
--
-- Media: connects to stream_url, sends {"event":"connected","version":"1.0.0"},
-- `start` {sequence_number, stream_id, start:{call_control_id, user_id,
-- client_state, media_format:{encoding "PCMU", sample_rate 8000, channels 1},
-- custom_parameters (an object name -> value)}}, then `media` every 20 ms
-- (160 bytes, track "inbound", chunk, timestamp, sequence_number as strings,
-- stream_id). The stream's encoding (call.stream_encoding, in media_format):
-- streaming_start's stream_codec where Telnyx can transcode (PCMU <-> PCMA),
-- else (no stream_codec, "default", or no transcoding) the call's codec;
-- A-law audio is the mu-law audio converted. Plays what the app sends at 8 bytes/ms (only on a stream
-- started with stream_bidirectional_mode "rtp": without it Telnyx drops audio sent back, and so does the
-- fake, counting it in call.dropped_bytes_unplayable with one entry in call.errors), echoes each mark once
-- its audio has played, and on `clear` drops what is queued and echoes the
-- pending marks at once. `stop` and a close when the call ends.
--
-- Call record: control_id, body (the dial's JSON), behaviour, status,
-- events (webhooks sent: {event, status (HTTP answer), body, ts, sig: its
-- telnyx-timestamp and signature, to replay it as sent}), stream
-- (streaming_start's JSON), stream_params, stream_id, stream_closed,
-- received_bytes, dropped_bytes_unplayable, played_bytes(), marks_echoed, clears, errors (protocol
-- mistakes of the app), hangup_requested_at, hangup_command_ids (each hangup
-- request's command_id), stream_command_ids (streaming_start's), final, done.
-- tx.hangups and tx.stream_starts count those requests.
--   call:wait(pred, [ms]) -> pred() once true (inside a task)
--   call:hangup([opts])   the callee hangs up; opts.cause, opts.source,
--     opts.sip: the call.hangup's hangup_cause (normal_clearing once
--     answered, else user_busy), hangup_source (callee), sip_hangup_cause
--     (a call Telnyx's network drops: {cause = "unspecified", source = "unknown"})
--   call:send_dtmf(digit)   a `dtmf` event on the stream
--   call:stop_stream([opts])   Telnyx stops streaming, the call stays up:
--     `stop` and a close on the WebSocket, then a streaming.stopped webhook
--     opts.delay_ms later (opts.keep_socket: the webhook only; opts.no_webhook:
--     the close only, the webhook lost); inside a task
--   call:webhook(event, payload)   one more signed webhook of the call (its
--     ids and client_state filled in, call_control_id unless given); inside a task
local http = require "callagent.http"
local ws = require "callagent.ws"
local fetch = require "callagent.fetch"
local json = require "callagent.json"
local task = require "callagent.task"
local timer = require "callagent.timer"
local crypto = require "callagent.crypto"
local waiters = require "fakes.waiters"
local audio = require "callagent.audio"

local M = {}
local now = timer.now
local b64enc, b64dec = crypto.base64_encode, crypto.base64_decode
local fmt = string.format
local SILENCE_B64 = b64enc(string.rep("\255", 160))

function M.sign(private_raw, timestamp, body)
  return b64enc(assert(crypto.ed25519_sign(private_raw, tostring(timestamp) .. "|" .. body)))
end

local function terror(status, code, title, detail)
  return status, { errors = { { code = code, title = title, detail = detail } } }
end

local function e164(s)
  return type(s) == "string" and s:find("^%+[1-9]%d%d%d%d%d%d+$") ~= nil
end

local Call = {}
Call.__index = Call

function Call:wait(pred, ms)
  return waiters.wait_for(self, pred, ms)
end

local function notify(call)
  waiters.notify(call)
end

function Call:played_bytes()
  local t = now()
  local played = self.received_bytes - self.dropped_bytes - math.max(0, (self._play_end - t) * 8)
  return math.floor(math.max(0, played))
end

-- A signed webhook, sent in order (one at a time per call).
local function webhook(call, event, payload)
  local tx = call.tx
  payload.call_control_id = payload.call_control_id or call.control_id
  payload.call_leg_id = call.leg_id
  payload.call_session_id = call.session_id
  payload.connection_id = call.body.connection_id
  payload.from = call.body.from
  payload.to = call.body.to
  payload.client_state = call.body.client_state or json.null -- echoed in every webhook of the call
  local body = json.encode({
    data = { event_type = event, id = crypto.uuid4(), occurred_at = os.date("!%Y-%m-%dT%H:%M:%S.000000Z"),
      payload = payload, record_type = "event" },
    meta = { attempt = 1, delivered_to = call.body.webhook_url },
  })
  local ts = tostring(os.time() + (tx.opts.clock_skew_s or 0))
  local rec = { event = event, body = body, at = now(), ts = ts, sig = M.sign(tx.private_key, ts, body) }
  call.events[#call.events + 1] = rec
  local res, err = fetch(call.body.webhook_url, {
    method = "POST",
    body = body,
    headers = {
      ["Content-Type"] = "application/json",
      ["telnyx-timestamp"] = ts,
      ["telnyx-signature-ed25519"] = rec.sig,
      ["User-Agent"] = "telnyx-webhooks",
    },
    timeout = 5000,
  })
  rec.status = res and res.status
  rec.error = err
  notify(call)
  return res
end

local function ws_send(call, s)
  if call.ws and not call.stream_closed then
    return call.ws:send(s)
  end
end

local function finish(call, cause, extra)
  if call.final then
    return
  end
  call.final = cause
  call.ended_at = now()
  call.alive = false
  for _, t in pairs(call._mark_timers) do
    t:stop()
  end
  call._mark_timers = {}
  task.spawn(function()
    if call.ws and not call.stream_closed then
      call._seq = call._seq + 1
      ws_send(call, json.encode({ event = "stop", sequence_number = tostring(call._seq), stream_id = call.stream_id,
        stop = { call_control_id = call.control_id, user_id = "u-1" } }))
      call.ws:close(1000, "call ended")
    end
    if call.tx.opts.stopped_at_end and call.stream_id and call.stream then
      timer.sleep(call.tx.opts.stopped_at_end)
      webhook(call, "streaming.stopped", { stream_url = call.stream.stream_url })
    end
    local p = { hangup_cause = cause, hangup_source = extra and extra.source or "callee",
      sip_hangup_cause = extra and extra.sip or (cause == "user_busy" and "486" or "unspecified"),
      start_time = call.started_iso, end_time = os.date("!%Y-%m-%dT%H:%M:%SZ") }
    if not call.behaviour.lost_hangup_webhook then
      webhook(call, "call.hangup", p)
    end
    call.done = true
    call._ended = true
    notify(call)
  end)
end

-- A key the callee presses, as Telnyx sends it on the stream.
function Call:send_dtmf(digit)
  if not self.stream_id or self.stream_closed or self.final then
    return nil, "ECLOSED: no open stream"
  end
  self._seq = self._seq + 1
  return ws_send(self, json.encode({ event = "dtmf", sequence_number = tostring(self._seq), stream_id = self.stream_id,
    occurred_at = os.date("!%Y-%m-%dT%H:%M:%SZ"), dtmf = { digit = tostring(digit) } }))
end

function Call:hangup(opts)
  local cause = opts and opts.cause or (self.answered_at and "normal_clearing" or "user_busy")
  finish(self, cause, { source = opts and opts.source or "callee", sip = opts and opts.sip })
end

function Call:webhook(event, payload)
  return webhook(self, event, payload or {})
end

-- Telnyx ends the media stream (an error on its side) and keeps the call.
function Call:stop_stream(opts)
  if self.ws and not self.stream_closed and not (opts and opts.keep_socket) then
    self._seq = self._seq + 1
    ws_send(self, json.encode({ event = "stop", sequence_number = tostring(self._seq), stream_id = self.stream_id,
      stop = { call_control_id = self.control_id, user_id = "u-1" } }))
    self.stream_closed = { code = 1000, reason = "stream stopped", by = "telnyx", at = now() }
    self.ws:close(1000, "stream stopped")
  end
  self.stream_stopped_at = now()
  if opts and opts.no_webhook then
    return
  end
  if opts and opts.delay_ms then
    timer.sleep(opts.delay_ms)
  end
  return webhook(self, "streaming.stopped", { stream_url = self.stream and self.stream.stream_url })
end

-- What the app sends on the stream.
local function on_app_message(call, msg)
  local t = now()
  local m = json.try_decode(msg)
  if type(m) ~= "table" then
    call.errors[#call.errors + 1] = "a message that is not a JSON object"
    return
  end
  if m.event == "media" then
    local data = type(m.media) == "table" and type(m.media.payload) == "string" and b64dec(m.media.payload)
    if not data then
      call.errors[#call.errors + 1] = "media without a base64 payload"
      return
    end
    if (call.stream or {}).stream_bidirectional_mode ~= "rtp" then
      -- Not a bidirectional RTP stream: Telnyx drops what is sent back.
      if not call.dropped_bytes_unplayable then
        call.errors[#call.errors + 1] = "media sent on a stream started without stream_bidirectional_mode rtp: dropped"
      end
      call.dropped_bytes_unplayable = (call.dropped_bytes_unplayable or 0) + #data
      notify(call)
      return
    end
    local start = math.max(t, call._play_end)
    call._play_end = start + #data / 8
    call.received_bytes = call.received_bytes + #data
  elseif m.event == "mark" then
    local name = type(m.mark) == "table" and m.mark.name
    if type(name) ~= "string" then
      call.errors[#call.errors + 1] = "mark without a name"
      return
    end
    local due = math.max(t, call._play_end)
    local key = {}
    call._mark_timers[key] = timer.after(math.max(1, math.ceil(due - t)), function()
      call._mark_timers[key] = nil
      call._seq = call._seq + 1
      ws_send(call, json.encode({ event = "mark", sequence_number = tostring(call._seq), stream_id = call.stream_id,
        mark = { name = name } }))
      call.marks_echoed[#call.marks_echoed + 1] = { name = name, at = now() }
      notify(call)
    end)
    call._pending_marks[key] = name
  elseif m.event == "clear" then
    local dropped = math.max(0, (call._play_end - t) * 8)
    call.dropped_bytes = call.dropped_bytes + dropped
    call._play_end = t
    call.clears[#call.clears + 1] = { at = t, dropped_bytes = math.floor(dropped) }
    for key, tm in pairs(call._mark_timers) do
      tm:stop()
      call._seq = call._seq + 1
      ws_send(call, json.encode({ event = "mark", sequence_number = tostring(call._seq), stream_id = call.stream_id,
        mark = { name = call._pending_marks[key] } }))
      call.marks_echoed[#call.marks_echoed + 1] = { name = call._pending_marks[key], at = t }
    end
    call._mark_timers = {}
  else
    call.errors[#call.errors + 1] = "unknown event " .. tostring(m.event)
  end
  notify(call)
end

local function run_stream(call)
  local st = call.stream
  local params = {}
  for _, kv in ipairs(st.custom_parameters or {}) do
    params[kv.name] = kv.value
  end
  call.stream_params = params
  local conn, err = ws.connect(st.stream_url, {
    timeout = 5000,
    on_text = function(_, msg)
      on_app_message(call, msg)
    end,
    on_close = function(_, code, reason)
      if not call.stream_closed then
        call.stream_closed = { code = code, reason = reason, by = call.final and "telnyx" or "app", at = now() }
        notify(call)
      end
    end,
  })
  if not conn then
    call.stream_error = err
    notify(call)
    return
  end
  call.ws = conn
  call.stream_id = crypto.uuid4()
  -- Telnyx transcodes between PCMU and PCMA only; else the call's codec.
  local codec = call.behaviour.codec or "PCMU"
  local want = st.stream_codec
  local g711 = { PCMU = true, PCMA = true }
  local enc = (g711[want] and g711[codec]) and want or codec
  call.stream_encoding = enc
  local conv = enc == "PCMA" and audio.ulaw_to_alaw or function(x)
    return x
  end
  ws_send(call, '{"event":"connected","version":"1.0.0"}')
  call._seq = 1
  ws_send(call, json.encode({
    event = "start",
    sequence_number = "1",
    stream_id = call.stream_id,
    start = {
      user_id = "3E6F995F-85F7-4705-9741-53B116D28237",
      call_control_id = call.control_id,
      client_state = json.null,
      media_format = { encoding = enc, sample_rate = 8000, channels = 1 },
      custom_parameters = params,
    },
  }))
  call.stream_started_at = now()
  notify(call)
  local b = call.behaviour
  if b.hangup_after_ms then
    timer.after(b.hangup_after_ms, function()
      call:hangup()
    end)
  end
  local src = b.audio
  local t0 = call.stream_started_at
  local k = 0
  while not call.final and not call.stream_closed do
    k = k + 1
    local payload = enc == "PCMU" and SILENCE_B64 or b64enc(conv(string.rep("\255", 160)))
    local off = (k - 1) * 160
    if src and off < #src then
      local piece = src:sub(off + 1, off + 160)
      payload = b64enc(conv(piece .. string.rep("\255", 160 - #piece)))
    end
    call._seq = call._seq + 1
    -- Telnyx's shape: numbers as strings, extra keys the app must not mind.
    local ok = ws_send(call, fmt('{"event":"media","sequence_number":"%d","media":{"track":"inbound","chunk":"%d",'
      .. '"timestamp":"%d","payload":"%s"},"stream_id":"%s"}', call._seq, k, (k - 1) * 20, payload, call.stream_id))
    if not ok then
      break
    end
    call.media_sent = k
    local wait = t0 + k * 20 - now()
    if wait > 0 then
      timer.sleep(math.ceil(wait))
    end
  end
end

local function hold(call, ms)
  if call.final then
    return false
  end
  call:wait(function()
    return call.final
  end, ms)
  return not call.final
end

local function run_call(call)
  local b = call.behaviour
  if not hold(call, 5) then
    return
  end
  webhook(call, "call.initiated", { direction = "outgoing", state = "bridging", start_time = call.started_iso })
  if not hold(call, b.ring_ms or 50) then
    return
  end
  local a = b.answer
  if a == "busy" then
    return finish(call, "user_busy", { sip = "486" })
  elseif a == "no-answer" then
    return finish(call, "timeout", { sip = "480" })
  elseif a == "rejected" then
    return finish(call, "call_rejected", { sip = "603" })
  elseif a == "failed" then
    return finish(call, "unspecified", { sip = "404" })
  end
  call.answered_at = now()
  call.status = "answered"
  webhook(call, "call.answered", { start_time = call.started_iso })
end

local Fake = {}
Fake.__index = Fake

local function resolve(b, call)
  if type(b) == "function" then
    b = b(call)
  end
  if type(b) == "string" or b == nil then
    return { answer = b or "answer" }
  end
  local out = {}
  for k, v in pairs(b) do
    out[k] = v
  end
  out.answer = out.answer or "answer"
  return out
end

function Fake:_auth(req)
  return req.headers.authorization == "Bearer " .. self.opts.api_key
end

function Fake:_record(req)
  self.requests[#self.requests + 1] = { method = req.method, path = req.path, auth = req.headers.authorization,
    body = req.body, at = now() }
end

function Fake:_dial(req)
  if not self:_auth(req) then
    return terror(401, "10009", "Authentication failed", "The API key is not valid.")
  end
  self.dials = (self.dials or 0) + 1
  if self.dials <= (self.opts.fail_dials or 0) then
    return terror(503, "10011", "Service unavailable", "Please try again.")
  end
  local body = req:json_object()
  if not body then
    return terror(422, "10015", "Bad Request", "The request body is not a JSON object.")
  end
  if body.connection_id ~= self.opts.connection_id then
    return terror(422, "10010", "Invalid value for connection_id", "connection_id must be a Call Control connection.")
  end
  if not e164(body.to) then
    return terror(422, "10016", "Invalid 'to' address", "to must be E.164.")
  end
  if not e164(body.from) then
    return terror(422, "10016", "Invalid 'from' address", "from must be E.164.")
  end
  if type(body.webhook_url) ~= "string" or not body.webhook_url:find("^https?://") then
    return terror(422, "10015", "Invalid webhook_url", "webhook_url must be an http(s) URL.")
  end
  -- Telnyx's dial: timeout_secs 5..120 (default 30), time_limit_secs at most
  -- 14400 (default 14400).
  local t = body.timeout_secs
  if t ~= nil and (type(t) ~= "number" or t ~= math.floor(t) or t < 5 or t > 120) then
    return terror(422, "10015", "Invalid timeout_secs", "timeout_secs must be from 5 to 120.")
  end
  t = body.time_limit_secs
  if t ~= nil and (type(t) ~= "number" or t ~= math.floor(t) or t < 1 or t > 14400) then
    return terror(422, "10015", "Invalid time_limit_secs", "time_limit_secs must be at most 14400.")
  end
  local call = setmetatable({
    tx = self, body = body, events = {}, errors = {}, clears = {}, marks_echoed = {},
    received_bytes = 0, dropped_bytes = 0, _play_end = 0, _seq = 0, _mark_timers = {}, _pending_marks = {},
    _waiters = {}, alive = true, status = "initiated", started_iso = os.date("!%Y-%m-%dT%H:%M:%SZ"),
    created_at = now(),
  }, Call)
  call.behaviour = resolve(self.opts.behaviour, call)
  self.calls[#self.calls + 1] = call
  if call.behaviour.answer == "reject-api" then
    call.final = "rejected"
    call.done = true
    call._ended = true
    self._queue:push(call)
    return terror(403, "10038", "Feature not permitted",
      call.behaviour.reject_detail or "Outbound calls to this destination are not enabled.")
  end
  call.control_id = call.behaviour.control_id or ("v3:" .. b64enc(crypto.random_bytes(30)):gsub("[+/=]", "_"))
  call.leg_id = crypto.uuid4()
  call.session_id = crypto.uuid4()
  self.by_id[call.control_id] = call
  self._queue:push(call)
  task.spawn(run_call, call)
  return 200, { data = { call_control_id = call.control_id, call_leg_id = call.leg_id,
    call_session_id = call.session_id, is_alive = false, record_type = "call" } }
end

function Fake:_call(req)
  if not self:_auth(req) then
    return nil, terror(401, "10009", "Authentication failed", "The API key is not valid.")
  end
  local call = self.by_id[req.params.id]
  if not call then
    return nil, terror(404, "10005", "Resource not found", "The call_control_id is not known.")
  end
  return call
end

function Fake:_action(req)
  local call, s, b = self:_call(req)
  if not call then
    return s, b
  end
  local action = req.params.action
  if action == "hangup" then
    self.hangups = (self.hangups or 0) + 1
    call.hangup_command_ids = call.hangup_command_ids or {}
    local hb = req:json_object()
    call.hangup_command_ids[#call.hangup_command_ids + 1] = hb and hb.command_id or json.null
    if self.hangups <= (self.opts.fail_hangups or 0) then
      return terror(503, "10011", "Service unavailable", "Please try again.")
    end
    if self.opts.hangup_delay_ms then
      timer.sleep(self.opts.hangup_delay_ms)
    end
    if call.final then
      return terror(422, "90018", "Call has already ended", "This call is no longer active and can't receive commands.")
    end
    call.hangup_requested_at = now()
    finish(call, call.answered_at and "normal_clearing" or "originator_cancel", { source = "caller", sip = "200" })
    return 200, { data = { result = "ok" } }
  elseif action == "streaming_start" then
    self.stream_starts = (self.stream_starts or 0) + 1
    local sb = req:json_object()
    call.stream_command_ids = call.stream_command_ids or {}
    call.stream_command_ids[#call.stream_command_ids + 1] = sb and sb.command_id or json.null
    if self.opts.echo_streaming_starts then
      call.refused_stream = sb
      return terror(self.opts.echo_streaming_starts, "90015", "Invalid parameter",
        "custom_parameters " .. json.encode(sb and sb.custom_parameters or json.null) .. " not accepted.")
    end
    if self.stream_starts <= (self.opts.fail_streaming_starts or 0) then
      return terror(503, "10011", "Service unavailable", "Please try again.")
    end
    if call.final then
      return terror(422, "90018", "Call has already ended", "This call is no longer active and can't receive commands.")
    end
    local body = req:json_object()
    if not body or type(body.stream_url) ~= "string" or not body.stream_url:find("^wss?://") then
      return terror(422, "10015", "Invalid stream_url", "stream_url must be a ws(s) URL.")
    end
    call.stream = body
    if call.behaviour.stream == "fail" then
      -- Telnyx could not reach stream_url: no stream, a streaming.failed.
      task.spawn(function()
        timer.sleep(20)
        call.stream_failed_at = now()
        webhook(call, "streaming.failed", { failure_reason = call.behaviour.failure_reason or "connection_failed",
          stream_id = crypto.uuid4(), stream_params = { stream_url = body.stream_url, stream_track = body.stream_track },
          stream_type = "websocket" })
      end)
    elseif call.behaviour.stream ~= false then
      task.spawn(function()
        webhook(call, "streaming.started", { stream_url = body.stream_url })
      end)
      task.spawn(run_stream, call)
    end
    notify(call)
    return 200, { data = { result = "ok" } }
  end
  return terror(404, "10005", "Resource not found", "Unknown action.")
end

function M.start(opts)
  assert(type(opts) == "table" and type(opts.api_key) == "string" and type(opts.connection_id) == "string",
    "fakes.telnyx.start needs api_key and connection_id")
  local pub, priv = assert(crypto.ed25519_keypair())
  local tx = setmetatable({
    opts = opts, calls = {}, by_id = {}, requests = {}, _queue = task.queue(),
    private_key = priv, public_key = b64enc(pub),
  }, Fake)
  local srv = http.server({ host = "127.0.0.1", port = 0, headers = { "authorization" } })
  srv:route("*", "/*", function(req)
    tx:_record(req)
    local path = req.path
    if req.method == "POST" and path == "/v2/calls" then
      return tx:_dial(req)
    end
    local id, action = path:match("^/v2/calls/([^/]+)/actions/([%w_]+)$")
    if req.method == "POST" and id then
      req.params = { id = id, action = action }
      return tx:_action(req)
    end
    id = path:match("^/v2/calls/([^/]+)$")
    if req.method == "GET" and id then
      req.params = { id = id }
      local call, s, b = tx:_call(req)
      if not call then
        return s, b
      end
      return 200, { data = { call_control_id = call.control_id, call_leg_id = call.leg_id,
        call_session_id = call.session_id, is_alive = not call.final,
        call_duration = call.answered_at and math.floor((now() - call.answered_at) / 1000) or 0,
        record_type = "call" } }
    end
    return terror(404, "10005", "Resource not found", "No such path.")
  end)
  local ok, err = srv:listen()
  if not ok then
    return nil, err
  end
  tx.srv = srv
  tx.url = "http://127.0.0.1:" .. srv.port
  return tx
end

function Fake:wait_call(ms)
  return self._queue:pop(ms)
end

function Fake:close()
  if not self.srv then
    return
  end
  for _, call in ipairs(self.calls) do
    if not call.done then
      call.final = call.final or "fake closed"
      for _, t in pairs(call._mark_timers or {}) do
        t:stop()
      end
      if call.ws and not call.stream_closed then
        call.stream_closed = { code = 1001, reason = "fake closed", by = "telnyx", at = now() }
        call.ws:close(1001, "fake closed")
      end
      call.done = true
      call._ended = true
      notify(call)
    end
  end
  self._queue:close()
  self.srv:close()
  self.srv = nil
end

return M
