--- phone: a scripted mock-phone client for tests - answers a mock provider
-- hint like the browser page does, and speaks Twilio's Media Streams protocol.
--
--   local phone = require "phone"
--   local p = assert(phone.answer(hint_url))   -- inside a task
--   p:say(ulaw_bytes)        -- queue caller audio (sent at 20 ms pacing; silence otherwise)
--   p:dtmf("#")
--   p:hangup()
--   p.received              -- mu-law bytes received from the agent
--   p.closed                -- {code, reason} once the server closed the stream
--   p:wait_received(bytes, timeout_ms)  p:wait_closed(timeout_ms)
local fetch = require "callagent.fetch"
local ws = require "callagent.ws"
local json = require "callagent.json"
local crypto = require "callagent.crypto"
local timer = require "callagent.timer"
local task = require "callagent.task"

local M = {}
local Phone = {}
Phone.__index = Phone

local SILENCE = string.rep("\255", 160)

function M.answer(hint)
  local base, call_id, token = hint:match("^(https?://[^/]+)/mock/call/([^?]+)%?t=(.+)$")
  assert(base, "not a mock hint: " .. tostring(hint))
  local res, err = fetch(base .. "/mock/api/answer", {
    method = "POST",
    headers = { ["Content-Type"] = "application/json" },
    body = json.encode({ callId = call_id, token = token }),
  })
  if not res then
    return nil, err
  end
  if res.status ~= 200 then
    return nil, "answer refused: " .. res.status .. " " .. res.body
  end
  local a = json.decode(res.body)
  local self = setmetatable({ base = base, call_id = call_id, session = a.session, received = "", queue = {}, seq = 1, marks = 0 }, Phone)
  local conn, cerr = ws.connect(a.streamUrl, {
    on_text = function(_, msg)
      local ev = json.decode(msg)
      if ev.event == "media" then
        self.received = self.received .. crypto.base64_decode(ev.media.payload)
      elseif ev.event == "mark" then
        self.marks = self.marks + 1
        self:_send({ event = "mark", streamSid = self.sid, mark = ev.mark })
      elseif ev.event == "clear" then
        self.clears = (self.clears or 0) + 1
      end
    end,
    on_close = function(_, code, reason)
      self.closed = { code = code, reason = reason }
    end,
  })
  if not conn then
    return nil, cerr
  end
  self.conn = conn
  self.sid = "MZ" .. crypto.to_hex(crypto.random_bytes(16))
  self:_send({ event = "connected", protocol = "Call", version = "1.0.0" })
  self:_send({
    event = "start",
    streamSid = self.sid,
    start = {
      streamSid = self.sid,
      callSid = "CAmock",
      accountSid = "ACmock",
      tracks = json.array({ "inbound" }),
      mediaFormat = { encoding = "audio/x-mulaw", sampleRate = 8000, channels = 1 },
      customParameters = a.parameters,
    },
  })
  -- 20 ms frames, drift-free.
  self.timer = timer.every(20, function()
    if self.closed then
      self.timer:stop()
      return
    end
    local frame = table.remove(self.queue, 1) or SILENCE
    self.seq = self.seq + 1
    self.conn:send('{"event":"media","sequenceNumber":"' .. self.seq .. '","streamSid":"' .. self.sid
      .. '","media":{"track":"inbound","payload":"' .. crypto.base64_encode(frame) .. '"}}')
  end)
  return self
end

function Phone:_send(ev)
  self.seq = self.seq + 1
  ev.sequenceNumber = tostring(self.seq)
  if self.conn:is_open() then
    self.conn:send(json.encode(ev))
  end
end

function Phone:say(ulaw)
  for i = 1, #ulaw, 160 do
    local f = ulaw:sub(i, i + 159)
    if #f < 160 then
      f = f .. SILENCE:sub(1, 160 - #f)
    end
    self.queue[#self.queue + 1] = f
  end
end

function Phone:dtmf(digit)
  self:_send({ event = "dtmf", streamSid = self.sid, dtmf = { track = "inbound_track", digit = digit } })
end

function Phone:hangup()
  self:_send({ event = "stop", streamSid = self.sid, stop = { accountSid = "ACmock", callSid = "CAmock" } })
  self.conn:close(1000, "hang up")
  fetch(self.base .. "/mock/api/hangup", {
    method = "POST",
    headers = { ["Content-Type"] = "application/json" },
    body = json.encode({ callId = self.call_id, session = self.session }),
  })
end

function Phone:wait_received(bytes, timeout_ms)
  local deadline = timer.now() + (timeout_ms or 10000)
  while #self.received < bytes do
    if timer.now() > deadline then
      return nil, "ETIMEDOUT"
    end
    timer.sleep(10)
  end
  return true
end

function Phone:wait_closed(timeout_ms)
  local deadline = timer.now() + (timeout_ms or 10000)
  while not self.closed do
    if timer.now() > deadline then
      return nil, "ETIMEDOUT"
    end
    timer.sleep(10)
  end
  return true
end

--- A loud tone as mu-law: ms of hz.
function M.tone(ms, hz)
  local audio = require "callagent.audio"
  local out = {}
  for i = 0, 8 * ms - 1 do
    out[#out + 1] = string.pack("<i2", math.floor(12000 * math.sin(2 * math.pi * (hz or 500) * i / 8000)))
  end
  return audio.ulaw_encode(table.concat(out))
end

return M
