-- The local stand-in model (what `make run` uses without OPENAI_API_KEY)
-- carries a whole mock-phone call: it greets with synthesized speech, plays
-- each caller turn back, reports on # and says goodbye.
local T = require "testing"
local callagent = require "callagent"
local standin = require "callagent.standin"
local phone = require "phone"
local audio = require "callagent.audio"
local timer = require "callagent.timer"

T.test("synthesizing a phrase lets the loop keep serving", function()
  local ticks, last, worst = 0, timer.now(), 0
  local ticker = timer.every(5, function()
    local now = timer.now()
    worst = math.max(worst, now - last)
    last = now
    ticks = ticks + 1
  end)
  T.defer(function()
    ticker:stop()
  end)
  local text = string.rep("The stand-in says this to keep the loop busy for a while. ", 4) .. timer.now()
  local t0 = timer.now()
  local pcm = standin.speech(text) -- espeak-ng (make deps installs it), then 22050 -> 24000 Hz
  local took = timer.now() - t0
  timer.sleep(20) -- the ticker sees the end of the last stretch too
  T.gt(#pcm, 24000 * 2, "over a second of 24 kHz audio")
  T.diag(string.format("%d bytes in %.0f ms; the 5 ms ticker ran %d times, its longest gap %.1f ms", #pcm, took, ticks, worst))
  T.lt(worst, 100, "no iteration held the loop for 100 ms")
end)

T.test("a mock-phone call with the stand-in: greeting, echo of the caller's turn, report on #, goodbye", function()
  local app = assert(callagent.app({
    telephony = { provider = "mock" },
    server = { port = 0 },
    openai = { apiKey = standin.KEY, outputFormat = "audio/pcmu" },
    call = { ringTimeoutSec = 60, goodbyeTimeoutSec = 8 },
    store = { backend = "memory" },
  }, { no_shutdown_hook = true }))
  app:routes(function(srv)
    standin.mount(srv, "/standin/v1/realtime")
  end)
  assert(app:start())
  T.defer(function()
    app:stop()
  end)
  app.config.openai.realtimeUrl = app.url:gsub("^http", "ws") .. "/standin/v1/realtime"

  local view = assert(app:create_call({ to = "+15555550100", prompt = "Test the loop." }))
  T.wait_for(function()
    return app.engine:call_view(view.callId).hint
  end, 5000, "the hint")
  local hint = app.engine:call_view(view.callId).hint
  T.match(hint, "^http://127%.0%.0%.1:%d+/mock/call/c_%x+%?t=")
  local p = assert(phone.answer(hint))

  -- The greeting: several seconds of non-silent speech, sent at once. The
  -- stand-in sends all of it before any reaches the phone, and stops
  -- listening until 300 ms after it would have finished playing: the time
  -- is counted from its first byte here, not from the answer (synthesis
  -- can take a second on a loaded machine).
  assert(p:wait_received(1, 15000))
  local t0 = timer.now()
  assert(p:wait_received(8000 * 2, 15000))
  local last, stable = #p.received, 0
  while stable < 3 do
    timer.sleep(100)
    stable = #p.received == last and stable + 1 or 0
    last = #p.received
  end
  local greeting_ms = #p.received / 8
  T.gt(greeting_ms, 3000, "a spoken greeting")
  T.gt(audio.ulaw_rms_dbfs(p.received), -40, "the greeting is audible")
  -- The stand-in does not listen while its voice plays: wait that long, then
  -- speak 1.16 s (with the 100 ms it keeps of the quiet after, 1.26 s: a
  -- length whose tenths round up).
  timer.sleep(math.max(0, greeting_ms - (timer.now() - t0)) + 800)
  local before = #p.received
  p:say(phone.tone(1160, 500))
  -- The stand-in answers: "You said:" and our own tone back.
  T.wait_for(function()
    return #p.received > before + 8000
  end, 10000, "the played-back turn")
  timer.sleep(1500)
  p:dtmf("#")
  local call
  T.wait_for(function()
    call = app.engine:call_view(view.callId)
    return call.status == "completed"
  end, 20000, "the call to complete")
  T.eq(call.report.outcome, "success")
  T.eq(call.report.data.turns, 1)
  T.near(call.report.data.speechSeconds, 1.3, 0.15, "the turn is about as long as the tone")
  T.match(call.report.summary, (string.format("%.1f s of speech", call.report.data.speechSeconds):gsub("%.", "%%.")),
    "the summary and data.speechSeconds give the same length")
  T.match(call.report.summary, "local stand%-in")
  local transcript = {}
  for _, l in ipairs(call.transcript) do
    transcript[#transcript + 1] = l.role .. ": " .. l.text
  end
  local all = table.concat(transcript, "\n")
  T.match(all, "agent: Hello! This is callagent's local stand%-in")
  T.match(all, "callee: %[caller spoke %d")
  T.match(all, "agent: You said:")
  T.match(all, "Goodbye")
  T.ok(p:wait_closed(5000), "the stream was closed by the hang-up")
end, { timeout = 60000 })

T.test("the stand-in refuses a session without its key: closed with 1008, no session.created", function()
  local ws = require "callagent.ws"
  local http = require "callagent.http"
  local srv = http.server({ host = "127.0.0.1", port = 0 })
  standin.mount(srv, "/standin/v1/realtime")
  assert(srv:listen())
  T.defer(function()
    srv:close()
  end)
  local url = srv:ws_url("/standin/v1/realtime")
  -- A list: a field set to nil in a table constructor would not be there.
  for _, case in ipairs({
    { "none", nil },
    { "wrong", { Authorization = "Bearer " .. standin.KEY:sub(1, -2) .. "x" } },
    { "bare", { Authorization = standin.KEY } },
    { "empty", { Authorization = "" } },
  }) do
    local what, headers = case[1], case[2]
    local conn = assert(ws.connect(url, { headers = headers }))
    local kind, code, reason = conn:receive(5000)
    T.eq({ kind, code, reason }, { "close", 1008, "invalid api key" }, what .. ": closed, no session.created")
  end
  local conn = assert(ws.connect(url, { headers = { Authorization = "Bearer " .. standin.KEY } }))
  local kind, msg = conn:receive(5000)
  T.eq(kind, "text")
  T.eq(require("callagent.json").decode(msg).type, "session.created", "with the key")
  conn:close(1000, "bye")
end)

T.run()
