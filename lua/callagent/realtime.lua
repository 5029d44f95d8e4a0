--- callagent.realtime: one OpenAI Realtime session (GA shape) over a WebSocket.
--
--   local s = realtime.session(cfg.openai, {
--     instructions = "...", voice = "alloy", tools = { ... },
--     on_event = function(s, ev) end,      -- every server event, decoded
--     on_open = function(s) end,           -- connected (s.conn is the WebSocket)
--     on_ready = function(s, ev) end,      -- session.updated (ev): audio may flow
--     on_close = function(s, code, reason) end,  -- closed or failed (code nil, reason = err)
--     log_fields = { call = id, attempt = n },  -- optional: in its log lines
--   })
--   s:connect()                  -- starts connecting now (does not wait)
--   s:send(event_table)          -- any client event
--   s:close([on_closed])         -- on_closed() once the service has answered
--                                   the close, or the connection ended (what
--                                   it sent before it read the close comes first)
--   s.ready, s.closed, s.t_open (timer.now() at the open)
--   s.opts.on_*                  may be replaced while the session runs (a
--                                session opened ahead of its call is handed over)
--   realtime.format_mismatch(cfg, session)  -- nil, or how the audio formats a
--                                session.updated names differ from cfg's
--
-- The session.update sent on connect: realtime type, the model, instructions,
-- audio output only, input in cfg.inputFormat with transcription and server
-- VAD (create_response and interrupt_response on), output in
-- cfg.outputFormat (audio/pcm at 24 kHz, or G.711 passthrough), the voice,
-- and the tools. No beta field names: the GA service rejects them.
local ws = require "callagent.ws"
local json = require "callagent.json"
local url = require "callagent.url"
local log = require "callagent.log"

local M = {}
local Session = {}
Session.__index = Session

local decode = json.decode

local function format_of(name, rate)
  if name == "audio/pcm" then
    return { type = "audio/pcm", rate = rate or 24000 }
  end
  return { type = name }
end

--- The GA session.update for these options.
function M.session_update(cfg, opts)
  local session = {
    type = "realtime",
    model = cfg.model,
    instructions = opts.instructions,
    output_modalities = { "audio" },
    audio = {
      input = {
        format = format_of(cfg.inputFormat),
        transcription = { model = cfg.transcriptionModel },
        turn_detection = {
          type = "server_vad",
          threshold = 0.5,
          prefix_padding_ms = 300,
          silence_duration_ms = 500,
          create_response = true,
          interrupt_response = true,
        },
      },
      output = {
        format = format_of(cfg.outputFormat, cfg.outputSampleRate),
        voice = opts.voice or cfg.voice,
      },
    },
    tool_choice = "auto",
  }
  if opts.tools and #opts.tools > 0 then
    session.tools = opts.tools
  end
  return { type = "session.update", session = session }
end

-- The name of a GA format object, "audio/pcm" at a rate other than 24000 as
-- "audio/pcm;rate=N" (the bridge resamples from 24 kHz only); nil if none.
local function format_name(f)
  if type(f) ~= "table" or type(f.type) ~= "string" then
    return nil
  end
  if f.type == "audio/pcm" and f.rate ~= nil and f.rate ~= 24000 then
    return "audio/pcm;rate=" .. tostring(f.rate)
  end
  return f.type
end

--- What differs between the audio formats a session.updated names and the
-- ones asked for (cfg.inputFormat, cfg.outputFormat), or nil. A format the
-- session does not name is taken as granted.
function M.format_mismatch(cfg, session)
  local audio = type(session) == "table" and session.audio
  audio = type(audio) == "table" and audio or {}
  local diffs = {}
  for _, side in ipairs({ { "input", cfg.inputFormat }, { "output", cfg.outputFormat } }) do
    local dir = type(audio[side[1]]) == "table" and audio[side[1]] or {}
    local got = format_name(dir.format)
    if got and got ~= side[2] then
      diffs[#diffs + 1] = side[1] .. " " .. got .. " (asked " .. side[2] .. ")"
    end
  end
  return #diffs > 0 and table.concat(diffs, ", ") or nil
end

function M.session(cfg, opts)
  return setmetatable({ cfg = cfg, opts = opts, ready = false, closed = false, conn = nil }, Session)
end

function Session:connect()
  local cfg, opts = self.cfg, self.opts
  local target = cfg.realtimeUrl .. (cfg.realtimeUrl:find("?", 1, true) and "&" or "?") .. "model=" .. url.encode(cfg.model)
  self.t_connect = require("callagent.timer").now()
  ws.connect_cb(target, {
    -- No key (a proxy, a test fake): no Authorization at all. "Bearer "
    -- with nothing after it is a malformed credential a proxy may refuse.
    headers = cfg.apiKey and { Authorization = "Bearer " .. cfg.apiKey } or {},
    ca_file = cfg.caFile,
    timeout = opts.connect_timeout or 10000,
    ping_interval = 20,
    pong_timeout = 10,
    on_text = function(_, msg)
      self:_on_text(msg)
    end,
    on_close = function(_, code, reason)
      self:_closed(code, reason)
    end,
  }, function(conn, err)
    if not conn then
      self:_closed(nil, err)
      return
    end
    if self.closed then -- closed while connecting
      conn:close(1000, "not needed")
      return
    end
    self.conn = conn
    self.t_open = require("callagent.timer").now()
    -- One that cannot be encoded (an app tool's schema with an infinite
    -- number, say) fails the session now: raised here, it left a model
    -- connection open that nothing set up, and the call silent.
    local eok, update = pcall(json.encode, M.session_update(cfg, opts))
    if not eok then
      local why = "ESESSION: the session.update could not be encoded: "
        .. tostring(update):gsub("^[^\n]-:%d+: ", "")
      log.error("realtime: " .. why)
      self:_closed(nil, why)
      conn:close(1000, "session not set up")
      return
    end
    conn:send(update)
    -- Sent once: a call need not hold its instructions and tool schemas
    -- (a few KiB) for the rest of its length.
    opts.instructions, opts.tools = nil, nil
    if opts.on_open then
      opts.on_open(self)
    end
  end)
end

function Session:_closed(code, reason)
  if (self.undecodable or 0) > 1 then
    log.warn("realtime: undecodable events were ignored", self:_log_fields({ count = self.undecodable }))
  end
  self.undecodable = nil
  if self.closed then
    local f = self.on_closed -- ours: s:close(on_closed)
    self.on_closed = nil
    if f then
      f()
    end
    return
  end
  self.closed = true
  self.ready = false
  if self.opts.on_close then
    self.opts.on_close(self, code, reason)
  end
end

-- opts.log_fields (call, attempt) added to t.
function Session:_log_fields(t)
  for k, v in pairs(self.opts.log_fields or {}) do
    t[k] = v
  end
  return t
end

-- An event that is no JSON object: ignored, the first logged, the count once
-- the connection has ended (a broken service may send thousands, and a line
-- each would flood the log).
function Session:_undecodable(msg)
  self.undecodable = (self.undecodable or 0) + 1
  if self.undecodable == 1 then
    log.warn("realtime: undecodable event ignored, and any more like it", self:_log_fields({ size = #msg }))
  end
end

function Session:_on_text(msg)
  local ok, ev = pcall(decode, msg)
  if not ok or type(ev) ~= "table" then
    return self:_undecodable(msg)
  end
  if ev.type == "session.updated" and not self.ready then
    self.ready = true
    if self.opts.on_ready then
      self.opts.on_ready(self, ev)
    end
    return
  end
  self.opts.on_event(self, ev)
end

function Session:send(ev)
  local c = self.conn
  if not c or self.closed then
    return nil, "ECLOSED: no model connection"
  end
  return c:send(json.encode(ev))
end

function Session:close(on_closed)
  if self.closed then
    if on_closed then
      on_closed()
    end
    return
  end
  self.closed = true
  self.ready = false
  if self.conn then
    self.on_closed = on_closed
    self.conn:close(1000, "call ended")
  elseif on_closed then
    on_closed()
  end
end

return M
