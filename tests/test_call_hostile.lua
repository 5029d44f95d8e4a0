-- Whole calls against a model and a phone that send events of the right
-- type but the wrong shape: every field of the events callagent reads (the
-- Lua call flow's, lua/callagent/bridge.lua and app.lua, as well as the C
-- bridge's) in turn replaced by a value of another JSON type, or removed.
-- A real callagent process (tests/apps/durable.lua) is driven through its
-- API; whatever comes in, its log must hold no Lua error, every call must
-- end with its record, and what it sends must stay well-formed.
local T = require "testing"
local kit = require "callkit"
local fetch = require "callagent.fetch"
local task = require "callagent.task"
local timer = require "callagent.timer"
local crypto = require "callagent.crypto"
local cjson = require "cjson"
local mutate = require "mutate"
local ws = require "callagent.ws"

local CALLS = tonumber(os.getenv("TEST_HOSTILE_CALLS") or "") or 6
local PER_CALL = 200 -- hostile events from each side per call

local FRAME = crypto.base64_encode(string.rep("\127", 160))

-- The server events the call flow reads, as the service sends them.
local MODEL_EVENTS = {
  { type = "response.output_audio.delta", response_id = "resp_h", item_id = "item_h", output_index = 0, content_index = 0, delta = FRAME },
  { type = "response.audio.delta", response_id = "resp_h", item_id = "item_h", output_index = 0, content_index = 0, delta = FRAME },
  { type = "input_audio_buffer.speech_started", audio_start_ms = 1200, item_id = "item_u" },
  { type = "response.created", response = { id = "resp_h", object = "realtime.response", status = "in_progress", output = {} } },
  {
    type = "response.done",
    response = {
      id = "resp_h",
      status = "failed",
      status_details = { type = "failed", error = { type = "server_error", code = "overloaded", message = "try again" } },
      output = { { id = "item_h", type = "message", role = "assistant" } },
      usage = {
        total_tokens = 120,
        input_tokens = 80,
        output_tokens = 40,
        input_token_details = { text_tokens = 60, audio_tokens = 20, cached_tokens = 0 },
        output_token_details = { text_tokens = 10, audio_tokens = 30 },
      },
    },
  },
  { type = "response.function_call_arguments.done", response_id = "resp_h", item_id = "item_f", call_id = "call_h", name = "lookup_order", arguments = '{"order":"A1"}' },
  {
    type = "response.output_item.done",
    response_id = "resp_h",
    item = { id = "item_f", type = "function_call", call_id = "call_i", name = "lookup_order", arguments = "{}" },
  },
  { type = "conversation.item.input_audio_transcription.completed", item_id = "item_u", content_index = 0, transcript = "Hello there." },
  { type = "response.output_audio_transcript.done", response_id = "resp_h", item_id = "item_h", transcript = "Good morning." },
  { type = "response.output_audio.done", response_id = "resp_h", item_id = "item_h" },
  { type = "error", error = { type = "invalid_request_error", code = "unknown_parameter", message = "Unknown parameter.", param = "x" } },
  { type = "session.updated", session = { type = "realtime", model = "gpt-realtime" } },
  { type = "rate_limits.updated", rate_limits = { { name = "tokens", limit = 1000, remaining = 900, reset_seconds = 1 } } },
}

-- What a Media Streams client sends after `start`.
local function phone_events(sid)
  return {
    { event = "media", sequenceNumber = "5", streamSid = sid, media = { track = "inbound", chunk = "3", timestamp = "60", payload = FRAME } },
    { event = "mark", sequenceNumber = "6", streamSid = sid, mark = { name = "1" } },
    { event = "dtmf", sequenceNumber = "7", streamSid = sid, dtmf = { track = "inbound_track", digit = "5" } },
    { event = "stop", sequenceNumber = "8", streamSid = sid, stop = { accountSid = kit.ACCOUNT, callSid = "CA1" } },
    { event = "start", sequenceNumber = "1", streamSid = sid, start = { streamSid = sid, callSid = "CA1", customParameters = { callId = "c_1", token = "t" } } },
    { event = "connected", protocol = "Call", version = "1.0.0" },
  }
end

-- n events from templates, each with one value of the wrong type (the
-- type or event name kept, but one in ten times). As UTF-8: a text message
-- that is not fails its connection (1007) before callagent reads it, and
-- the call would end before the rest of its hostile events (test_ws has
-- that close).
local function hostile(templates, keep, n)
  local out = {}
  for i = 1, n do
    local ev = mutate.shape(templates[math.random(#templates)], math.random(10) > 1 and keep or nil)
    local ok, text = pcall(cjson.encode, ev)
    out[i] = ok and mutate.as_text(text) or "{}"
  end
  return out
end

T.test("events of the wrong shape from the model and the phone: no Lua error, every call ends with its record", function()
  local seed = tonumber(os.getenv("TEST_SEED") or "") or os.time()
  math.randomseed(seed)
  T.diag("seed " .. seed .. " (TEST_SEED), " .. CALLS .. " calls (TEST_HOSTILE_CALLS)")
  local tw = assert(require("fakes.twilio").start({ account_sid = kit.ACCOUNT, auth_token = kit.TOKEN }))
  local rt = assert(require("fakes.realtime").start({
    api_key = kit.API_KEY,
    script = function(session)
      assert(session:wait_event("response.create", 5000))
      for i, text in ipairs(hostile(MODEL_EVENTS, { type = true }, PER_CALL)) do
        if not session:send(text) then
          return -- the call is over already (a mutated event ended it)
        end
        if i % 20 == 0 then
          timer.sleep(5)
        end
      end
      session:report_and_goodbye({ summary = "Survived.", outcome = "success" }, { ms = 200, text = "Goodbye." })
    end,
  }))
  T.defer(function()
    tw:close()
    rt:close()
  end)
  local p, api = kit.app_process(tw, rt)
  local base = api.base
  local ids = {}
  for i = 1, CALLS do
    ids[i] = api:create({ to = "+1415555" .. string.format("%04d", 200 + i), prompt = "Stay calm." })
  end
  -- The phone side of each call, once its stream is up.
  local phones_done = 0
  for _ = 1, CALLS do
    task.spawn(function()
      local c = assert(tw:wait_call(10000))
      if c:wait_stream(10000) then
        for j, text in ipairs(hostile(phone_events(c.stream_sid), { event = true }, PER_CALL)) do
          if not c.ws or c.stream_closed then
            break
          end
          c.ws:send(text)
          if j % 20 == 0 then
            timer.sleep(5)
          end
        end
      end
      phones_done = phones_done + 1
    end)
    timer.sleep(0)
  end
  local heard, failed = 0, 0
  for _, id in ipairs(ids) do
    api:wait_final(id, 60000)
    local _, call, res = api:api("GET", "/v1/calls/" .. id)
    T.eq(type(call.attempts), "table", "the record has its attempts")
    T.ok(utf8.len(res.body), "the record is UTF-8")
    for _, line in ipairs(call.transcript or {}) do
      if line.text == "Hello there." or line.text == "Good morning." then
        heard = heard + 1
      end
    end
    if type(call.lastError) == "string" and call.lastError:match("^model") then
      failed = failed + 1
    end
  end
  -- The hostile events went through the call flow: the ones left whole
  -- enough were taken (transcript lines, model errors recorded).
  T.diag(heard .. " transcript lines and " .. failed .. " model errors recorded from the events")
  T.gt(heard, 0, "transcript lines from the events")
  T.gt(failed, 0, "model errors recorded from the events")
  T.wait_for(function()
    return phones_done == CALLS
  end, 20000, "the phones")
  -- Streams whose `start` has the wrong shape: refused or ignored, nothing raised.
  local stream_url = base:gsub("^http", "ws") .. "/voice/stream"
  local sig = require("fakes.twilio").sign(kit.TOKEN, stream_url)
  local start = {
    event = "start",
    sequenceNumber = "1",
    streamSid = "MZ" .. string.rep("0", 32),
    start = {
      streamSid = "MZ" .. string.rep("0", 32),
      callSid = "CA1",
      tracks = { "inbound" },
      customParameters = { callId = ids[1], attempt = "1", token = "no-such-token" },
      mediaFormat = { encoding = "audio/x-mulaw", sampleRate = 8000, channels = 1 },
    },
  }
  local refused = 0
  for _, text in ipairs(hostile({ start }, { event = true }, 50)) do
    local conn = assert(ws.connect(stream_url, { headers = { ["X-Twilio-Signature"] = sig } }))
    conn:send(text)
    local kind, code = conn:receive(1000)
    if kind == "close" and code == 1008 then
      refused = refused + 1
    end
    conn:close()
  end
  T.gt(refused, 40, "starts refused (1008): an unknown token or a bad streamSid")
  T.eq(assert(fetch(base .. "/healthz")).status, 200)
  local list = assert(fetch(base .. "/v1/calls"))
  T.eq(list.status, 200)
  T.ok(utf8.len(list.body), "the list is UTF-8")
  -- What callagent sent stayed well-formed: the phone saw no protocol error,
  -- the model nothing it could not parse or take for an event.
  for _, c in ipairs(tw.calls) do
    T.eq(c.errors, {}, "protocol errors at the phone")
  end
  local bad = {}
  for _, s in ipairs(rt.sessions) do
    for _, e in ipairs(s.errors_sent) do
      if e.code == "invalid_json" or (e.param == "type" or e.param == "audio") then
        bad[#bad + 1] = e
      end
    end
  end
  T.eq(bad, {}, "events the model could not take")
  p:kill("SIGTERM")
  p:wait(10000)
  local errors = {}
  for _, line in ipairs(p.err) do
    if line:find(" ERROR ", 1, true) or line:find("uncaught error", 1, true) then
      errors[#errors + 1] = line
    end
  end
  T.eq(errors, {}, "errors in callagent's log")
end, { timeout = 120000 })

T.run()
