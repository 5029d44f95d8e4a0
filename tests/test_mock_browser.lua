-- The mock phone page (providers/mock/) in a real browser: headless Debian
-- Chromium driven by playwright-core (tests/browser/drive.mjs), its fake
-- microphone playing a WAV made here, against a callagent app with the mock
-- provider and a fake OpenAI Realtime service. Also the page's DSP measured
-- in Node (tests/browser/dsp_check.mjs).
--
-- Needs /usr/bin/chromium (apt-get install -y chromium), node, and
-- tests/node_modules (npm ci in tests/): a missing one fails, it never skips.
local T = require "testing"
local fake_rt = require "fakes.realtime"
local json = require "callagent.json"
local audio = require "callagent.audio"
local crypto = require "callagent.crypto"
local core = require "callagent.core"
local task = require "callagent.task"
local timer = require "callagent.timer"
local process = require "callagent.process"

local ROOT = T.root
local CHROMIUM = "/usr/bin/chromium"
local API_KEY = "sk-test-mock-browser"
local SUMMARY = "Heard the callee's tone; the agent was interrupted and said goodbye."

local function need_tools()
  if core.stat(CHROMIUM) ~= "file" then
    error(CHROMIUM .. " is missing: install Debian's chromium (apt-get install -y chromium)", 0)
  end
  if core.stat(ROOT .. "/tests/node_modules/playwright-core/package.json") ~= "file" then
    error("tests/node_modules/playwright-core is missing: run `npm ci` in tests/", 0)
  end
end

-- Runs node on a script of tests/browser; returns the JSON of its last line
-- that is one, the exit code and its stderr.
local function node(args, timeout_ms)
  local code, out, err = T.node(args, { cwd = ROOT .. "/tests", timeout = timeout_ms })
  local result
  for i = #out, 1, -1 do
    if out[i]:sub(1, 1) == "{" then
      result = json.try_decode(out[i])
      break
    end
  end
  return result, code, table.concat(err, "\n")
end

-- drive.mjs --serve, started by the first page run and kept for the
-- file's others: one browser for them all (a context each), instead of one
-- started per run. Its stderr's last lines, for a run that fails.
local driver, driver_err, runs = nil, {}, 0
local function driver_process()
  if driver and driver:running() then
    return driver
  end
  driver_err = {}
  driver = assert(process.spawn({ "node", "browser/drive.mjs", "--serve", cwd = ROOT .. "/tests", stdin = true,
    max_line = 1 << 20, on_stderr = function(line)
      driver_err[#driver_err + 1] = line
      if #driver_err > 20 then
        table.remove(driver_err, 1)
      end
    end }))
  return driver
end

-- The line of run id that has field (ready, or ok: its result), skipping
-- what an earlier run whose test gave up on it printed. None within
-- timeout_ms fails the test, and stops the driver (the next run starts one).
local function driver_line(p, id, field, timeout_ms)
  local deadline = timer.now() + timeout_ms
  while true do
    local line = p:read_line(math.max(1, deadline - timer.now()))
    local m = line and json.try_decode(line)
    if not line then
      -- SIGTERM: its Playwright closes the browsers (which are in process
      -- groups of their own, out of a SIGKILL's reach).
      p:kill()
      driver = nil
      error("drive.mjs gave no result for its run within " .. timeout_ms .. " ms; its stderr: "
        .. table.concat(driver_err, "\n"), 0)
    elseif type(m) == "table" and m.id == id and m[field] ~= nil then
      return m
    end
  end
end

-- drive.mjs's run with args (the page's URL first), without checking how it
-- went: its JSON result. args[1] a function: the page is set up first (the
-- browser, a context and a page), then the function is called for the URL
-- (it places the call: its ring time starts as the page is about to open).
local function drive_raw(args, timeout_ms)
  local p = driver_process()
  runs = runs + 1
  local id, place = runs, nil
  if type(args[1]) == "function" then
    place, args = args[1], { "-", table.unpack(args, 2) }
  end
  assert(p:write(json.encode({ id = id, args = args }) .. "\n"))
  if place then
    driver_line(p, id, "ready", timeout_ms)
    -- A URL line whatever place does: the driver waits for one.
    local ok, url = pcall(place)
    assert(p:write(json.encode({ id = id, url = ok and url or json.null }) .. "\n"))
    if not ok then
      error(url, 0)
    end
  end
  return driver_line(p, id, "ok", timeout_ms)
end

-- drive_raw's result, which must say the page went as asked (ok).
local function drive(args, timeout_ms)
  local r = drive_raw(args, timeout_ms)
  T.ok(r.ok, "drive.mjs: " .. tostring(r.error) .. "; page: " .. json.encode({ r.banner, r.problem, r.console, r.stats }))
  return r
end

-- The callee's recording, in a folder of its own; its path. A 16-bit PCM
-- mono WAV: 2.5 s of 800 Hz at half scale, then 1 s of silence (Chromium's
-- fake microphone loops it, so the callee beeps in a rhythm).
local WAV_RATE, TONE_MS, GAP_MS, TONE_HZ = 16000, 2500, 1000, 800
local function callee_wav()
  local path = T.tmpdir() .. "/callee.wav"
  local parts = {}
  local n_tone, n = TONE_MS * WAV_RATE // 1000, (TONE_MS + GAP_MS) * WAV_RATE // 1000
  for i = 0, n - 1 do
    local v = 0
    if i < n_tone then
      -- 10 ms fades, so the edges do not click.
      local fade = math.min(1, i / 160, (n_tone - i) / 160)
      v = math.floor(16384 * fade * math.sin(2 * math.pi * TONE_HZ * i / WAV_RATE) + 0.5)
    end
    parts[#parts + 1] = string.pack("<i2", v)
  end
  local data = table.concat(parts)
  local f = assert(io.open(path, "wb"))
  f:write(string.pack("<c4I4c4c4I4I2I2I4I4I2I2c4I4", "RIFF", 36 + #data, "WAVE", "fmt ", 16, 1, 1, WAV_RATE,
    WAV_RATE * 2, 2, 16, "data", #data), data)
  f:close()
  return path
end

-- The callee's audio as the model got it (mu-law 8 kHz), in 20 ms blocks:
-- the runs of loud blocks that are whole (not cut by the start or the end of
-- the stream), the silences between runs, and the tone's frequency and level
-- over the first whole run.
local function analyse_input(ulaw)
  local pcm = audio.ulaw_decode(ulaw)
  local blocks = #ulaw // 160
  local runs, start = {}, nil
  for b = 0, blocks do
    local loud = b < blocks and audio.rms_dbfs(pcm:sub(b * 320 + 1, (b + 1) * 320)) > -30
    if loud and not start then
      start = b
    elseif not loud and start then
      -- Whole: a silence before it (the first run may have begun before the
      -- stream) and the call did not end during it.
      runs[#runs + 1] = { start = start, n = b - start, whole = #runs > 0 and b < blocks }
      start = nil
    end
  end
  local r = { seconds = #ulaw / 8000, runs_s = {}, gaps_s = {} }
  local run
  for i, x in ipairs(runs) do
    if x.whole then
      r.runs_s[#r.runs_s + 1] = x.n * 0.02
      run = run or x
    end
    if i > 1 then
      r.gaps_s[#r.gaps_s + 1] = (x.start - runs[i - 1].start - runs[i - 1].n) * 0.02
    end
  end
  if run and run.n >= 10 then
    -- Zero crossings over the middle of the first whole run.
    local a, b = (run.start + 2) * 160, (run.start + run.n - 2) * 160
    local crossings, prev = 0, nil
    for i = a, b - 1 do
      local v = string.unpack("<i2", pcm, 2 * i + 1)
      if prev and (prev < 0) ~= (v < 0) then
        crossings = crossings + 1
      end
      prev = v
    end
    r.hz = crossings / 2 / ((b - a) / 8000)
    r.run_dbfs = audio.rms_dbfs(pcm:sub(2 * a + 1, 2 * b))
  end
  return r
end

-- The model sessions opened while the page rang (openai.connectWhileRinging),
-- each closed once its attempt was over, and none ever used: no audio went to
-- the model, and no response was asked for.
local function model_unused(rt, want, closed)
  T.eq(#rt.sessions, want, "a model session per attempt, opened while it rang")
  T.wait_for(function()
    for i = 1, closed do
      if not rt.sessions[i].closed then
        return false
      end
    end
    return true
  end, 3000, "the ended attempts' sessions closed")
  for i, ses in ipairs(rt.sessions) do
    T.eq({ ses.input_bytes, #ses.response_creates }, { 0, 0 }, "session " .. i .. " never used")
  end
end

-- extra: config sections that replace start_app's own (call, retry), and
-- openai keys set over its own.
local function start_app(script, extra)
  local rt = assert(fake_rt.start({ api_key = API_KEY, script = script }))
  T.defer(function()
    rt:close()
  end)
  local openai = { apiKey = API_KEY, realtimeUrl = rt.url, outputFormat = "audio/pcmu" }
  for k, v in pairs(extra and extra.openai or {}) do
    openai[k] = v
  end
  local app = T.started_app({
    telephony = { provider = "mock" },
    server = { host = "127.0.0.1", port = 0 },
    openai = openai,
    store = { backend = "memory" },
    tunnel = { provider = "none" },
    call = extra and extra.call or { goodbyeTimeoutSec = 3, ringTimeoutSec = 30 },
    retry = extra and extra.retry,
  }, { no_shutdown_hook = true })
  return app, rt
end

local function sample_at(samples, i)
  local s = samples[i]
  return { ms = s[1], played = s[2], clears = s[3], peak = s[4], media = s[5], frames = s[6], dropped = s[7],
    echoed = s[8] }
end

T.test("the page's DSP in Node: G.711 as callagent's, a clean telephone band, gap-free playback, exact marks, clear", function()
  need_tools()
  local r, code, err = node({ "browser/dsp_check.mjs" }, 20000)
  T.ok(r, "dsp_check printed no JSON (exit " .. tostring(code) .. "): " .. err)
  -- Every int16 encodes as callagent.audio does (G.191), and decoding agrees.
  local all = {}
  for x = -32768, 32767 do
    all[#all + 1] = string.pack("<i2", x)
  end
  T.eq(r.encodeSha256, crypto.to_hex(crypto.sha256(audio.ulaw_encode(table.concat(all)))), "mu-law encoder")
  local codes = {}
  for c = 0, 255 do
    codes[#codes + 1] = string.char(c)
  end
  local pcm = audio.ulaw_decode(table.concat(codes))
  for c = 0, 255 do
    T.eq(r.decode[c + 1], (string.unpack("<i2", pcm, 2 * c + 1)), "decode of code " .. c)
  end
  for _, rate in ipairs({ "48000", "44100" }) do
    local g = r.capture[rate].gains
    for _, hz in ipairs({ "300", "1000", "2000", "3000" }) do
      T.near(g[hz], 0, 0.1, rate .. " Hz capture passband at " .. hz .. " Hz")
    end
    for _, hz in ipairs({ "4000", "4500", "5000", "7000", "10000", "15000", "20000" }) do
      T.lt(g[hz], -55, rate .. " Hz capture: what aliases from " .. hz .. " Hz")
    end
    local p = r.playback[rate]
    for hz, db in pairs(p.passDb) do
      T.near(db, 0, 0.1, rate .. " Hz playback passband at " .. hz .. " Hz")
    end
    for hz, db in pairs(p.imageDb) do
      T.lt(db, -55, rate .. " Hz playback image of " .. hz .. " Hz")
    end
    T.ok(r.seamless[rate].identical, rate .. " Hz: blocks of any size give the same samples as one block")
    local worst = -math.huge
    for _, db in pairs(p.imageDb) do
      worst = math.max(worst, db)
    end
    T.diag(string.format("%s Hz: capture %d taps, alias at 4 kHz %.1f dB, 4.5 kHz %.1f dB; "
      .. "playback %d taps, worst image %.1f dB", rate, r.capture[rate].taps, g["4000"], g["4500"], p.taps, worst))
  end

  -- The worklets themselves, run in Node with stand-ins for the browser.
  local b = r.playbackSim.burst
  T.ok(b.sameAsReference, "10 s queued at once plays exactly the interpolated input, in order")
  T.ok(b.marksInOrder, "all marks reached, in order")
  T.eq(b.marks, 500)
  T.le(b.worstMarkError, 36, "a mark is reached when its audio has played (8 kHz samples)")
  T.eq(b.starved, 0)
  local c = r.playbackSim.clear
  T.ok(c.silentAfter, "silence right after clear")
  T.near(c.playedAtClearMs, 500, 5, "played before the clear")
  T.near(c.droppedMs, 1500, 5, "the rest dropped")
  T.eq(c.marksAfter, 0, "no mark reported after the clear (the page echoes them)")
  local paced = r.playbackSim.paced
  T.eq(paced.starved, 0, "a real-time stream never runs dry")
  T.eq(paced.gaps, 0, "and plays without gaps")
  T.near(paced.playedMs, 3000, 5, "all of it")
  local cap = r.captureSim
  T.ge(cap.frames, 99, "2 s at 44.1 kHz make 99-100 frames")
  T.ok(cap.allFull, "frames are 160 bytes")
  T.near(cap.hz, 800, 2, "captured tone frequency")
  T.near(cap.dbfs, -9.03, 0.3, "captured tone level (a half-scale sine)")
  T.diag(string.format("worklets: worst mark error %.1f samples at 8 kHz; clear dropped %.0f ms after %.0f ms",
    b.worstMarkError, c.droppedMs, c.playedAtClearMs))
end, { timeout = 30000 })

T.test("a call in Chromium: it rings, Enter answers, the mic's tone reaches the model, the agent plays, clear cuts it, "
  .. "the report shows, all under the page's Content-Security-Policy", function()
  need_tools()
  local wav = callee_wav()
  local rt_session
  local app = start_app(function(s)
    rt_session = s
    assert(s:wait_event("response.create", 20000))
    -- Listen until 5 s of the callee came (a whole beep is in there).
    s:wait_audio(8 * 5000, 15000)
    s.listened_ms = s:input_ms()
    -- Twice real time, as the real service sends ahead: the page queues it.
    task.spawn(function()
      s.long = s:speak({ ms = 4000, pace = 2, text = "Let me explain the whole thing at some length." })
    end)
    s.barge = s:user_speech({ interrupt = true, after_ms = 1500, ms = 1000, text = "Sorry, stop." })
    s:call_function("report_call", {
      summary = SUMMARY,
      outcome = "success",
      nextSteps = { "Send the follow-up letter" },
      data = { tone_hz = 800 },
    })
    s:wait_event("response.create", 5000)
    s.goodbye = s:speak({ ms = 1200, text = "Thanks, goodbye." })
  end)
  local view = assert(app:create_call({ to = "+14155550199", prompt = "Listen, explain, be interrupted, report.",
    calleeName = "Dr. Smith's office", callerName = "Ada Lovelace" }))
  T.match(view.hint or "", "^http://127%.0%.0%.1:%d+/mock/call/", "the hint is the page's URL")
  local shot = ROOT .. "/tests/artifacts/mock-phone.png"
  local r = drive({ view.hint, wav, shot, "--timeout=30000", "--press=5#", "--answer-key",
    "--ring-shot=" .. ROOT .. "/tests/artifacts/mock-phone-ringing.png",
    "--live-shot=" .. ROOT .. "/tests/artifacts/mock-phone-live.png", "--csp-probe" }, 45000)
  -- The page ran under its policy (drive.mjs fails on any violation of it),
  -- which is in force: an inline script added to the page was blocked, and
  -- reported as a violation would be.
  T.match(r.documents[1].path, "^/mock/call/c_%x+$")
  T.match(r.documents[1].csp or "", "script%-src 'self';")
  T.eq(r.cspProbe, { ran = false, reported = r.cspProbe.reported }, "the inline script did not run")
  T.ge(r.cspProbe.reported, 1, "its violation was reported")
  T.eq(r.cspViolations, {}, "no violation from the page itself")
  -- It rang first: who calls whom, Answer (focused: Enter took the call) and
  -- Decline, and the microphone not asked for yet.
  T.eq(r.ring, {
    title = "Incoming call",
    from = "callagent, on behalf of Ada Lovelace",
    to = "Dr. Smith's office (+14155550199)",
    call = view.callId,
    banner = "Incoming call: answer to talk to the agent, or decline it.",
    status = "Ringing",
    focused = "answer",
    micRequests = 0,
    micPermission = "granted",
    answer = { visible = true, enabled = true },
    decline = { visible = true, enabled = true },
  }, "the ringing page")
  T.eq(core.stat(ROOT .. "/tests/artifacts/mock-phone-ringing.png"), "file", "screenshot of the ring saved")
  T.eq(r.micRequests, 1, "the microphone was asked for once, after Answer")
  T.eq({ r.buttons.answer.visible, r.buttons.decline.visible }, { false, false }, "the ring is gone once answered")
  local st = r.stats
  T.diag(string.format("page: %d Hz, %d frames (%d bytes) sent, %d bytes received, %d samples played, %d dropped by "
    .. "%d clear(s) (played %d at the clear), marks %d/%d echoed, starved %d, in %d ms", st.sampleRate, st.framesSent,
    st.bytesSent, st.mediaReceived, st.playedSamples, st.droppedOnClear, st.clears, st.playedAtClear, st.marksEchoed,
    st.marksReceived, st.starved, r.elapsedMs))
  T.eq(st.state, "ended", "page state")
  T.eq(r.banner, "Call ended")
  T.eq(r.endText, "The call ended: Completed (the agent ended it).")
  T.eq(#st.errors, 0, "page errors: " .. json.encode(st.errors))
  local console_errors = {}
  for _, line in ipairs(r.console) do
    if line:match("^error") or line:match("^pageerror") then
      console_errors[#console_errors + 1] = line
    end
  end
  T.eq(console_errors, {}, "errors in the browser console")

  -- The WAV's tone reached the model: loud, about 800 Hz, in runs as long as the WAV's.
  local s = assert(rt_session, "the model was never reached")
  T.ok(s.script_error == nil, tostring(s.script_error))
  local inp = analyse_input(s.input_audio)
  T.diag(string.format("model heard %.2f s: whole tone runs %s s, gaps %s s, %.1f Hz, %.1f dBFS", inp.seconds,
    json.encode(inp.runs_s), json.encode(inp.gaps_s), inp.hz or 0, inp.run_dbfs or -math.huge))
  T.ge(s.listened_ms, 5000, "the script heard 5 s before it spoke")
  T.ge(#inp.runs_s, 1, "at least one whole tone run")
  for i, len in ipairs(inp.runs_s) do
    T.near(len, TONE_MS / 1000, 0.2, "tone run " .. i .. " is as long as the WAV's tone")
  end
  T.ge(#inp.gaps_s, 1, "at least one silence between beeps")
  for i, len in ipairs(inp.gaps_s) do
    T.near(len, GAP_MS / 1000, 0.2, "silence " .. i .. " is as long as the WAV's")
  end
  T.near(inp.hz, TONE_HZ, 15, "tone frequency after resampling to 8 kHz")
  T.gt(inp.run_dbfs, -20, "the tone is loud (dBFS)")
  T.near(s.input_bytes, st.bytesSent, 800, "what the page sent is what the model got")
  T.near(st.framesSent * 20, inp.seconds * 1000, 100, "frames are 20 ms")

  -- The model's audio reached the page and played.
  T.gt(st.mediaReceived, 8 * 1000, "bytes of agent audio received")
  T.gt(st.playedSamples, 8000, "agent audio played (8 kHz samples)")
  local max_peak = 0
  for _, x in ipairs(r.samples) do
    max_peak = math.max(max_peak, x[4])
  end
  T.near(max_peak, 8000 / 32768, 0.05, "peak while the agent spoke (the fake's tone is 8000/32768)")

  -- clear: playback stopped at once, everything unplayed dropped.
  T.eq(st.clears, 1, "clears")
  T.gt(st.droppedOnClear, 8 * 500, "samples dropped by the clear (queued, not played)")
  local first
  for i = 1, #r.samples do
    if r.samples[i][3] >= 1 then
      first = i
      break
    end
  end
  T.ok(first, "a sample after the clear")
  local at = sample_at(r.samples, first)
  -- The last sample before more agent audio came (the goodbye, 1 s of
  -- callee speech and a report after the clear; a cut item's audio is not
  -- sent on): what played in between. The driver samples every 100 ms or
  -- so, slower on a loaded machine, so the window is what the samples give.
  local later
  for i = first + 1, #r.samples do
    local x = sample_at(r.samples, i)
    if x.media ~= at.media or x.clears ~= at.clears then
      break
    end
    later = x
  end
  T.ok(later and later.ms - at.ms >= 250, "a sample 250 ms or more after the clear, before more audio came")
  T.diag(string.format("after the clear: played %d -> %d in %d ms", at.played, later.played, later.ms - at.ms))
  T.lt(later.played - at.played, 8 * 60, "playback stopped after the clear")
  -- The engine truncated the item where the page's echoed marks said it was.
  T.eq(#s.truncates, 1, "one truncate")
  T.ok(s.truncates[1].ok, "truncate accepted: " .. json.encode(s.truncates[1]))
  local end_ms = s.truncates[1].audio_end_ms
  T.diag(string.format("truncate at %d ms; the page had played %.0f ms of it", end_ms, st.playedAtClear / 8))
  T.near(end_ms, st.playedAtClear / 8, 100,
    "truncate audio_end_ms (the bridge's played position, from the marks the page echoed) vs what the page played")
  T.gt(end_ms, 1000, "about 1.5 s had played")

  -- Marks: every one came back (played, or echoed by the clear).
  T.gt(st.marksReceived, 20, "marks received (one per 100 ms of audio)")
  T.eq(st.marksEchoed, st.marksReceived, "marks echoed")

  -- The report on the page, and the call completed in the engine.
  T.match(r.reportText, SUMMARY:gsub("%p", "%%%0"), "report summary on the page")
  T.match(r.reportText, "Send the follow%-up letter", "next steps on the page")
  T.match(r.transcriptText, "Sorry, stop%.", "the callee's line in the transcript")
  T.wait_for(function()
    local v = app.engine:call_view(view.callId)
    return v and v.status == "completed"
  end, 10000, "the call to complete")
  local v = app.engine:call_view(view.callId)
  T.eq(v.report.summary, SUMMARY)
  T.ok(s.goodbye and not s.goodbye.cancelled, "the goodbye was spoken in full")
  T.eq(core.stat(shot), "file", "screenshot saved")

  -- The keypad: dtmf events, which the bridge tells the model about.
  T.eq(st.dtmfSent, 2, "keys pressed")
  local keys = {}
  for _, ev in ipairs(s.events) do
    if ev.type == "conversation.item.create" and ev.item and ev.item.role == "user" then
      local text = ev.item.content and ev.item.content[1] and ev.item.content[1].text or ""
      keys[#keys + 1] = text:match("pressed the key (.)")
    end
  end
  T.eq(keys, { "5", "#" }, "the model heard the keys, in order")
end, { timeout = 60000 })

T.test("microphone refused: the page says so, hangs up, and the call ends without a stream", function()
  need_tools()
  local wav = callee_wav()
  local app, rt = start_app(function(s)
    s:wait_event("response.create", 20000)
  end)
  local view = assert(app:create_call({ to = "+14155550198", prompt = "Nobody can talk." }))
  local shot = ROOT .. "/tests/artifacts/mock-phone-mic-denied.png"
  local r = drive({ view.hint, wav, shot, "--deny-mic", "--reopen", "--timeout=15000" },
    30000)
  T.eq(r.stats.state, "mic-denied")
  T.match(r.problem, "^Microphone access was refused", "the message on the page")
  T.eq(r.endText, "The call ended: Completed (hung up on this phone).")
  T.eq(r.stats.framesSent, 0, "no audio was sent")
  local v
  T.wait_for(function()
    v = app.engine:call_view(view.callId)
    return v and v.status ~= "in_progress" and v.status ~= "dialing"
  end, 10000, "the call to end")
  T.eq(v.status, "completed")
  T.eq(v.endReason, "callee_hung_up")
  local s = rt.sessions[1]
  T.eq(s and s.input_bytes or 0, 0, "the model heard nothing")
  -- The link answers once: opened again, the page says so.
  T.eq(r.reopen and r.reopen.state, "error", "a used link")
  T.match(r.reopen.problem, "already used", "the message for a used link")
end, { timeout = 40000 })

T.test("a microphone allowed after STREAM_WAIT_MS: the call is answered then, and connects; a key held down is "
  .. "sent once", function()
  need_tools()
  -- A page that answered before it had the microphone would have its call
  -- fail (no_stream) once the engine's wait for the stream (15 s) passed: that
  -- wait is 3 s here, and the microphone comes after 4.5 s.
  local calls = require "callagent.calls"
  local saved = T.shorten(calls, "STREAM_WAIT_MS", 3000)
  T.eq(saved, 15000, "the product waits 15 s")
  local wav = callee_wav()
  local app, rt = start_app(function(s)
    assert(s:wait_event("response.create", 40000))
    s:speak({ ms = 4000, text = "Hello there." })
  end)
  local view = assert(app:create_call({ to = "+14155550196", prompt = "Say hello." }))
  local shot = ROOT .. "/tests/artifacts/mock-phone-slow-mic.png"
  local r = drive({ view.hint, wav, shot, "--mic-delay=4500", "--hold=7",
    "--hangup-after=500", "--timeout=40000" }, 60000)
  T.eq(r.banner, "Call ended: you hung up.")
  T.gt(r.stats.framesSent, 0, "the page streamed")
  local v
  T.wait_for(function()
    v = app.engine:call_view(view.callId)
    return v and v.status ~= "in_progress" and v.status ~= "dialing"
  end, 10000, "the call to end")
  T.eq({ v.status, v.endReason }, { "completed", "callee_hung_up" }, "not failed for want of a stream")
  T.gt(rt.sessions[1].input_bytes, 0, "the model heard the callee")
  -- A key held down is one key, as on a phone: not one per keyboard repeat.
  T.eq(r.stats.dtmfSent, 1, "the held key was sent once")
end, { timeout = 80000 })

-- A call to number to, on an app whose agent tells an 8 s story once greeted,
-- and the callee's recording: app, the call's view, the WAV's path, the fake
-- model.
local function long_story_call(to)
  need_tools()
  local wav = callee_wav()
  local app, rt = start_app(function(s)
    assert(s:wait_event("response.create", 20000))
    s:speak({ ms = 8000, text = "A long story." })
  end)
  return app, assert(app:create_call({ to = to, prompt = "Talk." })), wav, rt
end

T.test("through a forwarded port: the page streams through it, and when it is cut says callagent is gone", function()
  local app, view, wav = long_story_call("+14155550195")
  local shot = ROOT .. "/tests/artifacts/mock-phone-lost.png"
  local r = drive({ view.hint, wav, shot, "--forward", "--cut-after=500",
    "--timeout=15000" }, 30000)
  -- ssh -L 9000:127.0.0.1:4545: the page's stream goes where the page came from.
  T.eq(r.forward.streams, 1, "the media stream went through the forward")
  T.gt(r.stats.framesSent, 0, "the page streamed")
  T.eq(r.stats.state, "ended")
  T.match(r.problem, "^Lost the connection to callagent", "the page says what happened")
  T.ne(r.status, "In progress", "the status pill does not show a live call")
  T.eq(r.afterCut.errorsLater, r.afterCut.errorsSoon, "the page stopped polling a server that is gone")
  T.wait_for(function()
    local v = app.engine:call_view(view.callId)
    return v.status ~= "in_progress"
  end, 10000, "the call to end at callagent")
end, { timeout = 40000 })

T.test("placed from the dial form through a forwarded port, answered, hung up on the page: the call's page is on "
  .. "that port, stop, close, the agent is silent at once, and the call ends as the callee's hang-up", function()
  need_tools()
  local wav = callee_wav()
  local app, rt = start_app(function(s)
    assert(s:wait_event("response.create", 20000))
    -- Four times real time, as the real service sends ahead: seconds of it
    -- are queued on the page when it hangs up.
    s.talk = s:speak({ ms = 20000, pace = 4, text = "A long story nobody wants to hear." })
  end)
  local shot = ROOT .. "/tests/artifacts/mock-phone-hangup.png"
  -- /mock/'s Call places the call and opens its page, which rings: Answer takes it.
  -- Through a forward (ssh -L 9000:127.0.0.1:4545): the call's page opens
  -- on the form's own origin, not on the hint's, which the browser may not reach.
  local r = drive({ app.url .. "/mock/", wav, shot, "--dial", "--forward",
    "--hangup-after=1500", "--watch-after=1500", "--timeout=15000" }, 30000)
  local view = { callId = r.callId }
  T.match(view.callId, "^c_%x+$", "the dial form placed a call")
  T.eq(r.forward.streams, 1, "the call's page, opened by the form, streamed through the forward")
  T.eq(r.console, {}, "no errors or warnings in the browser console (the form's page has an icon: no 404)")
  -- Both pages under their policy, with no violation of it (or drive.mjs fails).
  T.eq(#r.documents, 2)
  T.eq(r.documents[1].path, "/mock/")
  T.match(r.documents[2].path, "^/mock/call/c_%x+$")
  T.match(r.documents[1].csp or "", "script%-src 'self';", "/mock/'s policy")
  T.match(r.documents[2].csp or "", "script%-src 'self';", "the phone page's policy")
  T.eq({ r.ring.title, r.ring.to, r.ring.answer.enabled }, { "Incoming call", "Dr. Smith's office (+15555550100)", true },
    "its page rang")
  T.eq(r.stats.state, "ended")
  T.eq(r.banner, "Call ended: you hung up.")
  T.eq(r.endText, "The call ended: Completed (hung up on this phone).")
  T.gt(r.stats.playedSamples, 8 * 500, "the agent was heard before the hang-up")
  -- Hung up: the agent's queued audio is dropped, not played out.
  local at, last
  for i = 1, #r.samples do
    local x = sample_at(r.samples, i)
    if x.ms <= r.hungUpMs then
      at = x
    end
    last = x
  end
  T.ok(at and last.ms - r.hungUpMs >= 1000, "watched for a second after the hang-up")
  T.diag(string.format("at the hang-up: %d samples received, %d played; %d played %d ms later", at.media, at.played,
    last.played, last.ms - at.ms))
  T.gt(at.media - at.played, 8 * 1000, "more than 1 s of the agent was queued when the page hung up")
  T.lt(last.played - at.played, 8 * 300, "and it did not play after the hang-up")
  local v
  T.wait_for(function()
    v = app.engine:call_view(view.callId)
    return v and v.status == "completed"
  end, 10000, "the call to complete")
  T.eq(v.endReason, "callee_hung_up")
  T.eq(v.report, nil, "no report")
  local s = rt.sessions[1]
  T.wait_for(function()
    return s.closed
  end, 5000, "the model session to close")
  T.ok(s.talk == nil or s.talk.cancelled, "the agent was cut off")
  T.near(s.input_bytes, r.stats.bytesSent, 800, "what the page sent is what the model got")
end, { timeout = 40000 })

-- The call of view, whose page was left mid-call, ends as the callee
-- hanging up: one attempt, not retried, and its model session (rt's one)
-- closed.
local function left_page_hung_up(app, view, rt)
  local v
  T.wait_for(function()
    v = app.engine:call_view(view.callId)
    return v and v.status ~= "in_progress"
  end, 10000, "the call to end")
  T.eq({ v.status, v.endReason, #v.attempts }, { "completed", "callee_hung_up", 1 }, "leaving the page hung up")
  T.eq(#rt.sessions, 1, "one model session")
  T.wait_for(function()
    return rt.sessions[1].closed
  end, 3000, "the model session to close")
end

T.test("reloaded mid-call: the call is hung up as the callee's, and the reloaded page says its link answered it", function()
  local app, view, wav, rt = long_story_call("+14155550191")
  local r = drive({ view.hint, wav, ROOT .. "/tests/artifacts/mock-phone-reloaded.png",
    "--reload-after=500", "--timeout=15000" }, 30000)
  T.gt(r.reload.stats.framesSent, 0, "the page streamed before the reload")
  left_page_hung_up(app, view, rt)
  -- Reloaded, the page has no session: the link was used, by this call.
  T.eq(r.reload.state, "error")
  T.match(r.reload.problem, "^This call link was already used: the call was answered from it")
end, { timeout = 40000 })

T.test("the microphone lost mid-call: the page says so and hangs up, the call ends at once, its lastError says why",
  function()
  local app, view, wav = long_story_call("+14155550187")
  local r = drive({ view.hint, wav, ROOT .. "/tests/artifacts/mock-phone-mic-lost.png",
    "--mic-lost-after=500", "--no-report", "--timeout=15000" }, 30000)
  T.gt(r.stats.framesSent, 0, "the page streamed before")
  T.eq({ r.stats.state, r.banner, r.status }, { "mic-lost", "Call ended: the microphone stopped.", "Completed" })
  -- Why, once: the problem box says the microphone stopped, the end line not again.
  T.eq(r.endText, "The call ended: Completed (hung up on this phone).")
  T.match(r.problem, "^The microphone stopped %(unplugged, or its permission was taken back%), so the call was hung up%.")
  local v = app.engine:call_view(view.callId)
  T.eq({ v.status, v.endReason }, { "completed", "callee_hung_up" })
  T.eq(v.lastError, "the mock phone's microphone stopped mid-call (unplugged, or its permission taken back): "
    .. "the page hung up")
end, { timeout = 40000 })

T.test("the microphone lost before the answer went out: the page says so, answers and hangs up, nothing streamed",
  function()
  need_tools()
  local wav = callee_wav()
  local app = start_app(function() end)
  local view = assert(app:create_call({ to = "+14155550185", prompt = "Talk." }))
  local r = drive({ view.hint, wav, ROOT .. "/tests/artifacts/mock-phone-mic-lost-early.png",
    "--mic-lost-on-grant", "--timeout=15000" }, 30000)
  T.eq({ r.stats.state, r.stats.framesSent }, { "mic-lost", 0 })
  T.match(r.problem, "^The microphone stopped %(unplugged, or its permission was taken back%), so the call was hung up%.")
  local v = app.engine:call_view(view.callId)
  T.eq({ v.status, v.endReason }, { "completed", "callee_hung_up" }, "answered and hung up, not left ringing")
end, { timeout = 40000 })

T.test("left mid-call, back from the back/forward cache: the microphone was let go on leaving, the page loads again "
  .. "and says its link answered the call", function()
  local app, view, wav, rt = long_story_call("+14155550186")
  local r = drive({ view.hint, wav, ROOT .. "/tests/artifacts/mock-phone-back.png",
    "--cache-after=500", "--timeout=15000" }, 30000)
  T.eq(r.back.micLiveInCache, false, "leaving the page let the microphone go")
  -- Not the page as it was left: loaded again, it asks its link's view.
  T.eq(r.back.reloaded, true, "the page loaded again")
  T.eq(r.back.state, "error")
  T.match(r.back.problem, "^This call link was already used: the call was answered from it")
  left_page_hung_up(app, view, rt)
end, { timeout = 40000 })

-- Left after Answer, before the answer's reply (drive.mjs --leave=WHEN):
-- the microphone let go, nothing streamed, and the call hung up.
local function left_while_answering(when, to)
  need_tools()
  local wav = callee_wav()
  local app, rt = start_app(function() end)
  local view = assert(app:create_call({ to = to, prompt = "Talk." }))
  local r = drive({ view.hint, wav, ROOT .. "/tests/artifacts/mock-phone-left-" .. when .. ".png",
    "--leave=" .. when, "--timeout=15000" }, 30000)
  T.eq(r.left, { micLive = false, state = "ended", framesSent = 0 }, "the microphone let go, nothing streamed")
  T.eq(r.banner, "Call ended: you left the page.")
  left_page_hung_up(app, view, rt)
end

T.test("left while the microphone prompt is open: the grant that comes after is let go, the call is hung up", function()
  left_while_answering("prompt", "+14155550184")
end, { timeout = 40000 })

T.test("left once the microphone is granted, before the answer's reply: it is let go, the call is hung up", function()
  left_while_answering("granted", "+14155550183")
end, { timeout = 40000 })

T.test("left once callagent answered, before the page read the reply: the page's hang-up by link ends the call, "
  .. "nothing streams", function()
  left_while_answering("answer", "+14155550181")
end, { timeout = 40000 })

T.test("left once its stream's WebSocket is made, before it opened: the call is hung up, its model session closed, "
  .. "nothing streams", function()
  left_while_answering("connecting", "+14155550178")
end, { timeout = 40000 })

-- The tab closed after Answer, before the call connected (drive.mjs
-- --close=WHEN): the page's hang-up on its way out ends the call.
local function closed_while_answering(when, to)
  need_tools()
  local app, rt = start_app(function() end)
  local view = assert(app:create_call({ to = to, prompt = "Talk." }))
  local r = drive({ view.hint, callee_wav(), ROOT .. "/tests/artifacts/mock-phone-closed.png", "--close=" .. when,
    "--timeout=15000" }, 30000)
  T.eq(r.left, { closed = true })
  left_page_hung_up(app, view, rt)
end

T.test("the tab closed once callagent answered, before the page read the reply: the call is hung up, its model "
  .. "session closed", function()
  closed_while_answering("answer", "+14155550175")
end, { timeout = 40000 })

T.test("the tab closed once the stream's WebSocket is made, before it opened: the call is hung up, its model session "
  .. "closed", function()
  closed_while_answering("connecting", "+14155550174")
end, { timeout = 40000 })

T.test("window.mockPhone.hangup twice mid-call, the page's stream failing as it closes it: the fault is said on the "
  .. "page, nothing escapes to the caller or the console, and the call is hung up once", function()
  local app, view, wav, rt = long_story_call("+14155550177")
  local r = drive({ view.hint, wav, ROOT .. "/tests/artifacts/mock-phone-hangup-fault.png", "--hook-hangup=connected",
    "--close-fault", "--no-report", "--timeout=15000" }, 30000)
  -- Before, hangup() threw the fault at its caller, and the page said nothing.
  T.eq(r.hook, { threw = false }, "hangup() threw nothing")
  T.match(r.problem, "^Something went wrong on this page: injected fault")
  T.eq(r.hangupRequests, 1, "hung up once")
  T.eq(r.console, {}, "no error in the console")
  left_page_hung_up(app, view, rt)
end, { timeout = 40000 })

T.test("window.mockPhone.hangup twice once callagent answered, before the page read the reply: the call is hung up "
  .. "once, the microphone let go, nothing connects", function()
  need_tools()
  local app, rt = start_app(function() end)
  local view = assert(app:create_call({ to = "+14155550176", prompt = "Talk." }))
  local r = drive({ view.hint, callee_wav(), ROOT .. "/tests/artifacts/mock-phone-hangup-answering.png",
    "--hook-hangup=answer", "--timeout=15000" }, 30000)
  -- Before, hangup() did nothing until the call connected: the page connected.
  T.eq(r.hook, { sockets = 0 }, "no stream made")
  T.eq({ r.stats.state, r.banner, r.micLive, r.hangupRequests, r.stats.framesSent },
    { "ended", "Call ended: you hung up.", false, 1, 0 })
  T.eq(r.console, {}, "no error in the console")
  left_page_hung_up(app, view, rt)
end, { timeout = 40000 })

T.test("a model error in a call that went on, then hung up on the page: the end line says what callagent's record says",
  function()
  need_tools()
  local wav = callee_wav()
  local app = start_app(function(s)
    assert(s:wait_event("response.create", 20000))
    s:error("server_error", "The server had an error while processing your request.")
    s:speak({ ms = 8000, text = "A long story." })
  end)
  local view = assert(app:create_call({ to = "+14155550182", prompt = "Talk." }))
  local r = drive({ view.hint, wav, ROOT .. "/tests/artifacts/mock-phone-model-error-completed.png",
    "--hangup-after=500", "--timeout=15000" }, 30000)
  local v = app.engine:call_view(view.callId)
  T.eq({ v.status, v.endReason }, { "completed", "callee_hung_up" })
  T.eq(r.problem, "")
  T.eq(r.endText, "The call ended: Completed (hung up on this phone). callagent says: " .. v.lastError)
  T.match(v.lastError, "^model error: server_error: ")
end, { timeout = 40000 })

T.test("a stream closed for a fault mid-call: the problem box says the close, the end line the end reason, not the close again",
  function()
  need_tools()
  -- The call's end comes from the page (its hang-up), not from the engine's
  -- own wait for a final status (5 s), made longer than the run here.
  T.shorten(require("callagent.calls"), "BRIDGE_END_WAIT_MS", 60000)
  local app = start_app(function(s)
    s:speak({ ms = 8000, text = "A long story." })
  end)
  local view = assert(app:create_call({ to = "+14155550186", prompt = "Talk." }))
  local r = drive({ view.hint, callee_wav(), ROOT .. "/tests/artifacts/mock-phone-stream-fault.png",
    "--oversize-after=500", "--timeout=15000" }, 30000)
  local v = app.engine:call_view(view.callId)
  T.eq({ v.status, v.endReason, v.lastError }, { "failed", "stream_error", "media stream closed: message too big (1009)" })
  T.match(r.problem, "^The audio stream closed %(1009")
  -- Before, the end line went on: " callagent says: media stream closed: message too big (1009)".
  T.eq(r.endText, "The call ended: Failed (its audio stream failed).")
end, { timeout = 40000 })

-- An app whose model refuses its key; connect_early: openai.connectWhileRinging.
local function refusing_model_app(connect_early)
  return (start_app(nil, { openai = { apiKey = "sk-revoked-key-0123456789", connectWhileRinging = connect_early } }))
end

T.test("the model refuses callagent's key while the page rings: the ring is canceled, and the page shows callagent's why", function()
  need_tools()
  local wav = callee_wav()
  local app = refusing_model_app(true)
  local view = assert(app:create_call({ to = "+14155550191", prompt = "Talk." }))
  T.wait_for(function()
    return app.engine:call_view(view.callId).status == "failed"
  end, 5000, "the call failed while it rang")
  local v = app.engine:call_view(view.callId)
  T.eq({ v.endReason, v.attempts[1].answeredAt }, { "model_error", nil })
  local r = drive_raw({ view.hint, wav, ROOT .. "/tests/artifacts/mock-phone-model-refused-ringing.png",
    "--no-report", "--timeout=15000" }, 30000)
  T.eq({ r.ok, r.stats and r.stats.state }, { false, "error" }, "nothing to answer")
  T.eq(r.problem, "This call stopped ringing before it was answered: the link has expired. callagent says: "
    .. v.lastError .. " Start a new call to get a new link.")
  T.match(v.lastError, "^model refused the session: invalid_api_key: ")
  T.no_match(r.problem, "revoked", "not the key")
end, { timeout = 40000 })

T.test("the model refuses callagent's key at the answer: the call fails, and the page shows callagent's why", function()
  need_tools()
  local wav = callee_wav()
  local app = refusing_model_app(false)
  local view = assert(app:create_call({ to = "+14155550190", prompt = "Talk." }))
  local r = drive({ view.hint, wav, ROOT .. "/tests/artifacts/mock-phone-model-refused.png",
    "--no-report", "--timeout=15000" }, 30000)
  local v = app.engine:call_view(view.callId)
  T.eq(v.status, "failed")
  T.ok(type(v.lastError) == "string" and #v.lastError > 0, "the record says why")
  T.eq(r.status, "Failed")
  T.ok(r.endText:find(v.lastError, 1, true), "the page shows the record's lastError: " .. r.endText)
  T.diag(r.endText)
  T.no_match(r.endText, "revoked", "not the key")
end, { timeout = 40000 })

T.test("answered, its media stream never connects: Hang up works meanwhile, the call fails no_stream, and the page "
  .. "ends instead of answering on", function()
  need_tools()
  local calls = require "callagent.calls"
  T.shorten(calls, "STREAM_WAIT_MS", 1500)
  local wav = callee_wav()
  local app = start_app(function() end)
  local view = assert(app:create_call({ to = "+14155550189", prompt = "Talk." }))
  local r = drive({ view.hint, wav, ROOT .. "/tests/artifacts/mock-phone-no-stream.png",
    "--forward", "--hold-stream", "--no-report", "--timeout=15000" }, 30000)
  T.eq(r.forward.held, 1, "the stream's connection went nowhere")
  T.eq(r.hangupWhileAnswering, { visible = true, enabled = true }, "Hang up could give up on it meanwhile")
  local v = app.engine:call_view(view.callId)
  T.eq({ v.status, v.endReason }, { "failed", "no_stream" })
  T.eq({ r.stats.state, r.status, r.banner }, { "error", "Failed", "The call ended before its audio connected." })
  T.match(r.endText, "^The call ended: Failed %(its audio never connected%)%. callagent says: no media stream ")
end, { timeout = 40000 })

T.test("Decline on the ringing page, the microphone allowed already: the attempt ends busy, the page says so and when "
  .. "callagent calls again", function()
  need_tools()
  local wav = callee_wav()
  local app, rt = start_app(function() end)
  local view = assert(app:create_call({ to = "+14155550194", prompt = "Nobody takes it." }))
  local shot = ROOT .. "/tests/artifacts/mock-phone-declined.png"
  -- The microphone is allowed already (a browser that remembers it): the
  -- page still rings, and Decline takes it.
  local r = drive({ view.hint, wav, shot, "--decline", "--reopen", "--timeout=10000" },
    20000)
  T.eq({ r.ring.micPermission, r.ring.decline.enabled }, { "granted", true }, "rang with the microphone allowed")
  T.eq({ r.stats.state, r.status, r.banner, r.problem, r.ringTitle },
    { "declined", "Declined", "You declined the call: callagent was told the line is busy.", "", "Declined" })
  T.eq(r.buttons, { answer = { visible = true, enabled = false }, decline = { visible = true, enabled = false } },
    "both buttons stay, disabled")
  T.eq(r.micRequests, 0, "the microphone was never asked for")
  -- This setup retries busy (the defaults: 3 attempts, 60 s apart).
  T.match(r.endText, "^callagent calls again at .+ %(attempt 2%), under a new link")
  T.eq(r.stats.framesSent, 0, "no audio was sent")
  local v = app.engine:call_view(view.callId)
  T.eq({ v.status, v.attempts[1].status, v.attempts[1].answeredAt }, { "queued", "busy", nil })
  model_unused(rt, 1, 1)
  T.eq(r.reopen and r.reopen.state, "error", "the declined link opened again")
  T.match(r.reopen.problem, "^This call was declined from this link")
  T.match(r.reopen.problem, "callagent calls again at .+ %(attempt 2%), under a new link: the call's hint",
    "and where the call went on")
end, { timeout = 30000 })


-- Opens the hint with one of drive.mjs's ways to end the ring from outside
-- (--api-hangup, --answer-elsewhere); checks that the page rang, then said
-- so and took Answer and Decline away. Returns drive.mjs's result. view: the
-- call's, or a function that places it once the page is set up (drive_raw)
-- and returns its hint.
local function ring_stopped_elsewhere(view, how, shot)
  local wav = callee_wav()
  local r = drive({ type(view) == "function" and view or view.hint, wav, ROOT .. "/tests/artifacts/" .. shot, how,
    "--timeout=10000" }, 20000)
  T.eq({ r.ring.title, r.ring.answer.enabled, r.ring.decline.enabled }, { "Incoming call", true, true }, "it rang")
  T.eq(r.stats.state, "stopped")
  T.eq(r.buttons, { answer = { visible = true, enabled = false }, decline = { visible = true, enabled = false } },
    "both buttons stay, disabled")
  T.eq(r.micRequests, 0, "the microphone was never asked for")
  T.eq(r.problem, "", "no error")
  return r
end

T.test("hung up through the API while the page rings: the page says so and disables Answer and Decline", function()
  need_tools()
  local app, rt = start_app(function() end)
  local view = assert(app:create_call({ to = "+14155550193", prompt = "Never mind." }))
  local r = ring_stopped_elsewhere(view, "--api-hangup", "mock-phone-stopped.png")
  T.eq(r.action.status, 202, "the API took the hang-up: " .. json.encode(r.action))
  T.eq({ r.ringTitle, r.status, r.banner, r.endText }, { "Call canceled", "Canceled",
    "The call stopped ringing: callagent hung up before it was answered.", "The call ended: Canceled." })
  T.eq(app.engine:call_view(view.callId).status, "canceled")
  model_unused(rt, 1, 1)
end, { timeout = 30000 })

T.test("left ringing until the ring time is up, retried at once: the page says it was missed and that the call rings "
  .. "again under a new link", function()
  need_tools()
  local app, rt = start_app(function() end, {
    call = { ringTimeoutSec = 3, statusGraceSec = 1 },
    retry = { maxAttempts = 2, initialDelayMs = 0, retryStatuses = { "no_answer" } },
  })
  -- Placed once the browser has the page ready to open it: the 3 s ring
  -- must not run out while a loaded machine starts a browser.
  local view
  local r = ring_stopped_elsewhere(function()
    view = assert(app:create_call({ to = "+14155550188", prompt = "Nobody answers." }))
    return view.hint
  end, "--let-ring", "mock-phone-missed.png")
  T.eq({ r.ringTitle, r.status }, { "Missed call", "No answer" })
  T.match(r.endText, "^callagent .*again.* %(attempt 2[%) ].*under a new link: the call's hint %(GET /v1/calls/"
    .. view.callId .. "%) has it%.$")
  T.wait_for(function()
    return app.engine:call_view(view.callId).attempt == 2
  end, 5000, "attempt 2")
  T.wait_for(function()
    return #rt.sessions == 2
  end, 3000, "attempt 2's session")
  model_unused(rt, 2, 1)
end, { timeout = 30000 })

-- A page that failed before its answer went out: the call declined as
-- failed, never answered, and the page's console without an error that
-- escaped it (pageFailed had it).
local function declined_for_fault(app, rt, view, r, t0)
  T.eq({ r.stats.state, r.banner }, { "error", "Call ended" })
  T.match(r.problem, "^Something went wrong on this page: injected fault")
  T.wait_for(function()
    return app.engine:call_view(view.callId).status == "failed"
  end, 3000, "the call failed")
  T.ok(timer.now() - t0 < 15000, "well before the ring time")
  local v = app.engine:call_view(view.callId)
  T.eq({ v.attempts[1].status, v.attempts[1].answeredAt }, { "failed", nil })
  T.eq({ v.status, v.endReason }, { "failed", "failed on the mock phone (asked by its link)" })
  for _, line in ipairs(r.console) do
    T.ok(not line:match("^pageerror"), "a fault escaped the page: " .. line)
  end
  model_unused(rt, 1, 1)
end

-- A call to `to` whose page fails where drive's flag makes it (shot: the
-- screenshot's file in tests/artifacts): app, rt, view, drive's result, and
-- when the page opened.
local function faulting_page(to, flag, shot, timeout_ms)
  need_tools()
  local app, rt = start_app(function() end, { call = { goodbyeTimeoutSec = 3, ringTimeoutSec = 30 },
    retry = { maxAttempts = 1 } })
  local view = assert(app:create_call({ to = to, prompt = "Nobody takes it." }))
  local t0 = timer.now()
  local r = drive({ view.hint, callee_wav(), ROOT .. "/tests/artifacts/" .. shot, flag, "--timeout=" .. timeout_ms },
    timeout_ms + 10000)
  return app, rt, view, r, t0
end

T.test("the page fails as it shows the ring: it declines the call as failed at once, not left ringing for the ring time",
  function()
  local app, rt, view, r, t0 = faulting_page("+14155550187", "--ring-fault", "mock-phone-ring-fault.png", 10000)
  -- Before, the page said "Call ended" and the call rang on for 30 s.
  declined_for_fault(app, rt, view, r, t0)
end, { timeout = 30000 })

T.test("the page fails in a later check of its ring: it declines the call as failed at once, not left ringing",
  function()
  -- Before, the fault was an unhandled rejection: the page rang on, its ring no longer checked.
  local app, rt, view, r, t0 = faulting_page("+14155550186", "--ring-check-fault", "mock-phone-ring-check-fault.png",
    5000)
  T.eq(r.ring.title, "Incoming call", "it rang first")
  T.eq(r.micRequests, 0)
  declined_for_fault(app, rt, view, r, t0)
end, { timeout = 30000 })

T.test("the page fails after Answer, before its answer went out: it declines the call as failed and lets the "
  .. "microphone go, never answered", function()
  -- Before, the page's hang-up answered the call to hang it up at once (completed).
  local app, rt, view, r, t0 = faulting_page("+14155550185", "--answer-fault", "mock-phone-answer-fault.png", 10000)
  T.eq({ r.micRequests, r.micLive }, { 1, false }, "the microphone was granted, then let go")
  declined_for_fault(app, rt, view, r, t0)
end, { timeout = 30000 })

T.test("answered in another tab while the page rings: the page says so and disables Answer and Decline", function()
  need_tools()
  local app = start_app(function(s)
    s:wait_event("response.create", 5000)
  end)
  local view = assert(app:create_call({ to = "+14155550192", prompt = "Someone else takes it." }))
  local r = ring_stopped_elsewhere(view, "--answer-elsewhere", "mock-phone-answered-elsewhere.png")
  T.eq(r.action.status, 200, "the other tab answered: " .. json.encode(r.action))
  T.eq({ r.ringTitle, r.status, r.banner }, { "Answered elsewhere", "Answered elsewhere",
    "The call was answered elsewhere: this link was opened in another window or tab, which took it." })
  T.eq(app.engine:call_view(view.callId).attempts[1].answeredAt ~= nil, true, "answered once, by the other tab")
end, { timeout = 30000 })

T.run()
