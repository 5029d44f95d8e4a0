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
  -- Two ways to hold the loop, two measures. Waiting for espeak-ng in the
  -- loop's thread: the ticker would not run at all while it speaks.
  -- Working in the loop's thread (the resampling once took 100-200 ms in
  -- Lua): the process's CPU time between two ticks, which, unlike their
  -- wall-clock gap, does not grow when a loaded machine deschedules the
  -- process (a 394 ms gap was seen at load 9 with the loop free).
  local ticks, last, worst, last_cpu, worst_cpu = 0, timer.now(), 0, os.clock(), 0
  local ticker = timer.every(5, function()
    local now, cpu = timer.now(), os.clock()
    worst = math.max(worst, now - last)
    worst_cpu = math.max(worst_cpu, (cpu - last_cpu) * 1000)
    last, last_cpu = now, cpu
    ticks = ticks + 1
  end)
  T.defer(function()
    ticker:stop()
  end)
  local text = string.rep("The stand-in says this to keep the loop busy for a while. ", 4) .. timer.now()
  local t0 = timer.now()
  local pcm = standin.speech(text) -- espeak-ng (make deps installs it), then 22050 -> 24000 Hz
  local took, during = timer.now() - t0, ticks
  timer.sleep(20) -- the ticker sees the end of the last stretch too
  T.gt(#pcm, 24000 * 2, "over a second of 24 kHz audio")
  T.diag(string.format("%d bytes in %.0f ms; the 5 ms ticker ran %d times meanwhile, its longest gap %.1f ms (%.1f ms of CPU)",
    #pcm, took, during, worst, worst_cpu))
  T.gt(during, 0, "the loop ran while espeak-ng spoke")
  T.lt(worst_cpu, 100, "no iteration took 100 ms of CPU")
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

-- A server with the stand-in at /standin/v1/realtime (closed after the test).
local function standin_server()
  local srv = require("callagent.http").server({ host = "127.0.0.1", port = 0 })
  standin.mount(srv, "/standin/v1/realtime")
  assert(srv:listen())
  T.defer(function()
    srv:close()
  end)
  return srv
end

T.test("the stand-in refuses a session without its key: closed with 1008, no session.created", function()
  local ws = require "callagent.ws"
  local srv = standin_server()
  local url = srv:ws_url("/standin/v1/realtime")
  -- A list: a field set to nil in a table constructor would not be there.
  for _, case in ipairs({
    { "none", nil },
    { "wrong", { Authorization = "Bearer " .. standin.KEY:sub(1, -2) .. (standin.KEY:sub(-1) == "x" and "y" or "x") } },
    { "bare", { Authorization = standin.KEY } },
    { "empty", { Authorization = "" } },
  }) do
    local what, headers = case[1], case[2]
    local conn = assert(ws.connect(url, { headers = headers }))
    local kind, code, reason = conn:receive(5000)
    T.eq({ kind, code, reason }, { "close", 1008, "invalid api key" }, what .. ": closed, no session.created")
  end
  -- Anyone who reaches the server may try as often as they like: 5 lines
  -- of it a window, the rest counted.
  local warns = T.log_lines("warn")
  for _ = 1, 8 do
    local c = assert(ws.connect(url))
    T.eq((select(2, c:receive(5000))), 1008)
  end
  local logged = 0
  for _, l in ipairs(warns) do
    logged = logged + (l.msg == "stand-in model refused a session without its key" and 1 or 0)
  end
  T.eq(logged, 1, "5 in the window, 4 of them before")
  local conn = assert(ws.connect(url, { headers = { Authorization = "Bearer " .. standin.KEY } }))
  local kind, msg = conn:receive(5000)
  T.eq(kind, "text")
  T.eq(require("callagent.json").decode(msg).type, "session.created", "with the key")
  conn:close(1000, "bye")
end)

-- Runs app (Lua source) with an espeak-ng of the test's first in PATH: a
-- shell script whose lines after "#!/bin/sh" are script(dir), dir the
-- folder it is in, where it may leave what the test reads. opts.env: more
-- variables; opts.timeout: run_app's. Returns code, p, dir.
local function with_espeak(script, app, opts)
  opts = opts or {}
  local dir = T.tmpdir()
  local f = assert(io.open(dir .. "/espeak-ng", "w"))
  f:write("#!/bin/sh\n", script(dir))
  f:close()
  os.execute("chmod +x '" .. dir .. "/espeak-ng'")
  f = assert(io.open(dir .. "/app.lua", "w"))
  f:write(app)
  f:close()
  local code, _, p = T.run_app(dir .. "/app.lua", nil, { env = T.with({ PATH = dir .. ":" .. os.getenv("PATH") },
    opts.env), timeout = opts.timeout })
  return code, p, dir
end

T.test("sessions that need the same phrase at once share one espeak-ng run", function()
  local real = io.popen("command -v espeak-ng"):read("l")
  -- A stand-in that counts its runs, then runs the real one (or fails as it would without one).
  local code, p, dir = with_espeak(function(dir)
    return "echo run >> '" .. dir .. "/runs'\n" .. (real and ("exec '" .. real .. "' \"$@\"\n") or "exit 1\n")
  end, [[
local standin, task = require "callagent.standin", require "callagent.task"
task.spawn(function()
  local fns = {}
  for i = 1, 5 do
    fns[i] = function() return #standin.speech("Five sessions want this at once.") end
  end
  print(table.concat({ task.all(fns) }, " "))
end)
]], { timeout = 20000 })
  T.eq(code, 0, p.errtext())
  local n = assert((p.out[1] or ""):match("^(%d+)"), p.text() .. p.errtext())
  T.eq(p.out[1], (n .. " "):rep(5):sub(1, -2), "five the same length")
  local runs = 0
  for _ in io.lines(dir .. "/runs") do
    runs = runs + 1
  end
  T.eq(runs, 1, "espeak-ng ran once")
end)

T.test("espeak-ng gets callagent's environment without the variables that hold a secret", function()
  local code, p, dir = with_espeak(function(dir)
    return "env > '" .. dir .. "/env'\nexit 1\n"
  end, [[
local standin, task, log = require "callagent.standin", require "callagent.task", require "callagent.log"
log.secret(os.getenv("HOOKS_TOKEN"))
task.spawn(function()
  print(standin.speech("Hello there.") == nil)
end)
]], { env = { HOOKS_TOKEN = "hk-7f3a9c2e1d4b5a69", PLAIN_SETTING = "kept-as-is" } })
  T.eq(code, 0, p.errtext())
  local env = assert(io.open(dir .. "/env")):read("a")
  T.lacks(env, "hk-7f3a9c2e1d4b5a69", "the secret's variable left out")
  T.match(env, "PLAIN_SETTING=kept%-as%-is", "the rest passed on")
end)

T.test("an espeak-ng run that fails with an error wakes the sessions waiting for it: all chime, none waits for ever", function()
  -- A WAV whose data has an odd byte: reading it raises. Slow enough that the others wait for it.
  local code, p = with_espeak(function()
    return "sleep 0.3\nwhile [ \"$1\" != -w ]; do shift; done\nprintf 'RIFFxxxxWAVEdataxxxxabc' > \"$2\"\n"
  end, [[
local standin, task, timer, runtime = require "callagent.standin", require "callagent.task", require "callagent.timer",
  require "callagent.runtime"
timer.after(3000, function()
  print("hung")
  runtime.exit(3)
end)
task.spawn(function()
  local fns = {}
  for i = 1, 3 do
    fns[i] = function() return #standin.speech("This phrase cannot be read.") end
  end
  local a, b, c = task.all(fns)
  print(a, b, c, #standin.speech("This phrase cannot be read."))
  runtime.exit(0)
end)
]], { timeout = 10000 })
  T.eq(code, 0, p.text() .. p.errtext())
  local n = (p.out[1] or ""):match("^(%d+)")
  T.ok(n and tonumber(n) > 0, "chimes: " .. p.text())
  T.eq(p.out[1], table.concat({ n, n, n, n }, "\t"), "all four the same chime")
  T.match(p.errtext(), "espeak%-ng's speech could not be used")
end)

T.test("an espeak-ng run that hangs is killed after its wait, and the sessions chime", function()
  local code, p, dir = with_espeak(function(dir)
    return "echo $$ > '" .. dir .. "/pid'\nexec sleep 30\n"
  end, [[
local standin, task, runtime = require "callagent.standin", require "callagent.task", require "callagent.runtime"
standin.ESPEAK_WAIT_MS = 300
task.spawn(function()
  print(#standin.speech("This phrase never comes."))
  runtime.exit(0)
end)
]], { timeout = 10000 })
  T.eq(code, 0, p.text() .. p.errtext())
  T.ok(tonumber(p.out[1] or "") and tonumber(p.out[1]) > 0, "a chime: " .. p.text())
  T.match(p.errtext(), "espeak%-ng's speech could not be used; it will chime instead error=\"espeak%-ng took more than 0%.3 s\"")
  local pid = assert(tonumber(assert(io.open(dir .. "/pid")):read("l")), "espeak-ng's pid")
  T.wait_for(function()
    return not io.open("/proc/" .. pid .. "/stat")
  end, 2000, "the hung espeak-ng gone")
end)

-- A server with the stand-in and one session that has its key.
local function session()
  local ws = require "callagent.ws"
  local srv = standin_server()
  local conn = assert(ws.connect(srv:ws_url("/standin/v1/realtime"),
    { headers = { Authorization = "Bearer " .. standin.KEY } }))
  local json = require "callagent.json"
  local function next_event(ms)
    local kind, msg = conn:receive(ms or 2000)
    return kind == "text" and json.decode(msg) or nil
  end
  T.eq(next_event().type, "session.created")
  return conn, next_event
end

T.test("events the stand-in cannot use get an error event, as from the real service, and the session goes on", function()
  local conn, next_event = session()
  for _, case in ipairs({
    { "not json", "invalid_json" },
    { "42", "invalid_json" },
    { "[1]", "missing_required_parameter", "type" },
    { '{"type":5}', "missing_required_parameter", "type" },
    { '{"type":"session.update","session":"x","event_id":"ev1"}', "invalid_value", "session" },
    { '{"type":"session.update","session":{"audio":{"output":"pcm"}}}', "invalid_value", "session.audio.output.format" },
    { '{"type":"session.update","session":{"audio":{"input":{"format":{"type":"audio/opus"}}}}}', "invalid_value",
      "session.audio.input.format" },
    { '{"type":"session.update","session":{"audio":{"output":{"format":{"type":"audio/pcm","rate":16000}}}}}', "invalid_value",
      "session.audio.output.format" },
    { '{"type":"input_audio_buffer.append","audio":5}', "invalid_value", "audio" },
    { '{"type":"input_audio_buffer.append","audio":"!!!"}', "invalid_value", "audio" },
    { '{"type":"conversation.item.create","item":5}', "invalid_value", "item" },
  }) do
    conn:send(case[1])
    local ev = next_event()
    T.eq(ev and ev.type, "error", case[1])
    T.eq({ ev.error.type, ev.error.code, ev.error.param }, { "invalid_request_error", case[2], case[3] }, case[1])
  end
  -- Odd but well-formed: no reply, no harm.
  conn:send('{"type":"conversation.item.create","item":{"type":"message","content":[{"text":5}]}}')
  conn:send('{"type":"conversation.item.create","item":{"type":"message","content":"x"}}')
  conn:send('{"type":"response.cancel"}')
  -- The session still works: a format it refused did not stick, and it greets.
  conn:send('{"type":"session.update","session":{"audio":{"output":{"format":{"type":"audio/pcmu"}}}}}')
  local ev = next_event()
  T.eq(ev.type, "session.updated")
  T.eq(ev.session.audio.output.format.type, "audio/pcmu")
  conn:send('{"type":"response.create"}')
  T.eq(next_event(15000).type, "response.created", "the greeting")
  conn:close(1000, "bye")
end)

T.test("with 24 kHz PCM input the detector hears PCM: silence is no turn, a tone is one", function()
  local conn, next_event = session()
  local crypto = require "callagent.crypto"
  conn:send('{"type":"session.update","session":{"audio":{"input":{"format":{"type":"audio/pcm","rate":24000}}}}}')
  T.eq(next_event().type, "session.updated")
  -- One second of digital silence: as mu-law, its zero bytes would be full scale.
  conn:send('{"type":"input_audio_buffer.append","audio":"' .. crypto.base64_encode(string.rep("\0", 48000)) .. '"}')
  T.eq(next_event(300), nil, "no speech_started for silence")
  local tone = {}
  for i = 0, 24000 - 1 do
    tone[#tone + 1] = string.pack("<i2", math.floor(8000 * math.sin(2 * math.pi * 440 * i / 24000)))
  end
  conn:send('{"type":"input_audio_buffer.append","audio":"' .. crypto.base64_encode(table.concat(tone)) .. '"}')
  local ev = next_event()
  T.eq(ev and ev.type, "input_audio_buffer.speech_started", "the tone starts a turn")
  T.near(ev.audio_start_ms, 1000, 10, "counted in the PCM's own time, from the turn's first frame")
  conn:close(1000, "bye")
end)


T.test("24 kHz PCM input in 5 ms appends: turns timed in 20 ms frames, the caller's words played back as sent", function()
  local conn, next_event = session()
  local crypto = require "callagent.crypto"
  local json = require "callagent.json"
  conn:send('{"type":"session.update","session":{"audio":{"input":{"format":{"type":"audio/pcm","rate":24000}},'
    .. '"output":{"format":{"type":"audio/pcmu"}}}}}')
  T.eq(next_event().type, "session.updated")
  -- 1 s of silence, 1 s of a tone, 1.5 s of silence, sent 5 ms (240 bytes) at a time.
  local s = {}
  for i = 0, 24000 * 7 // 2 - 1 do
    local v = (i >= 24000 and i < 48000) and math.floor(8000 * math.sin(2 * math.pi * 440 * i / 24000)) or 0
    s[#s + 1] = string.pack("<i2", v)
  end
  local pcm = table.concat(s)
  for i = 1, #pcm, 240 do
    conn:send(json.encode({ type = "input_audio_buffer.append", audio = crypto.base64_encode(pcm:sub(i, i + 239)) }))
  end
  local started, stopped = next_event(), next_event()
  T.eq(started and started.type, "input_audio_buffer.speech_started")
  -- The tone's first frame; 3 frames of 5 ms started a turn that began 60 ms before.
  T.near(started.audio_start_ms, 1000, 10, "the turn starts with the tone")
  T.eq(stopped and stopped.type, "input_audio_buffer.speech_stopped")
  -- 35 frames of quiet end it: 700 ms, not 35 appends of 5 ms.
  T.near(stopped.audio_end_ms, 2700, 30, "it ends 700 ms after the tone")
  -- The words played back are the input as one resampler makes it, whatever the appends.
  local want = audio.ulaw_encode(audio.resampler(24000, 8000):process(pcm))
  local said = #audio.ulaw_encode(audio.resampler(24000, 8000):process(standin.speech(standin.YOU_SAID)))
  local deltas = {}
  repeat
    local ev = next_event(5000)
    if ev and ev.type == "response.output_audio.delta" then
      deltas[#deltas + 1] = crypto.base64_decode(ev.delta)
    end
  until not ev or ev.type == "response.done"
  local words = table.concat(deltas):sub(said + 1)
  T.gt(#words, 8000, "over a second of the caller's words")
  local at = started.audio_start_ms * 8
  T.ok(words == want:sub(at + 1, at + #words), "the words are the input's, byte for byte")
  conn:close(1000, "bye")
end)
T.run()
