-- make bench: how many concurrent calls one machine carries in real time.
--
-- This process is the load generator: a fake Twilio (REST, signed webhooks,
-- Media Streams clients sending 160-byte mu-law frames every 20 ms, marks
-- echoed) and a fake OpenAI Realtime that echoes every appended frame back as
-- an audio delta. callagent runs as a separate process (tests/bench/app.lua)
-- with the Twilio provider and the SQLite store, so its CPU and memory are its
-- own. For each N it creates N calls through the REST API, streams them for T
-- seconds and measures:
--   established/failed calls, frames sent and lost (phone -> model, and model
--   -> phone), bridge latency p50/p99/max (frame sent by "Twilio" -> append
--   received by "OpenAI"; delta sent by "OpenAI" -> media received by
--   "Twilio": both include two loopback hops and the load generator's own
--   receive path, so they are upper bounds of what callagent adds),
--   callagent's CPU seconds per call-minute (utime + stime from /proc), its
--   RSS per call, and whether the load generator kept its 20 ms schedule.
--
-- Environment: BENCH_N ("10,100,200,400,800,1000"), BENCH_SECONDS (20),
-- BENCH_MODES ("audio/pcmu,audio/pcm"), BENCH_PIN (1: callagent on CPU 0,
-- the load generator on CPU 1), BENCH_STORE ("sqlite").
local http = require "callagent.http"
local ws = require "callagent.ws"
local fetch = require "callagent.fetch"
local url = require "callagent.url"
local timer = require "callagent.timer"
local task = require "callagent.task"
local crypto = require "callagent.crypto"
local audio = require "callagent.audio"
local process = require "callagent.process"
local core = require "callagent.core"
local log = require "callagent.log"

log.level("warn")

local ROOT = core.root
local BIN = ROOT .. "/build/release/callagent"
local SID = "AC" .. string.rep("c3", 16)
local TOKEN = "bench-twilio-token"
local RING = 4096

local function env_list(name, default)
  local out = {}
  for x in (os.getenv(name) or default):gmatch("[^,%s]+") do
    out[#out + 1] = x
  end
  return out
end

local NS = env_list("BENCH_N", "10,100,200,400,800,1000")
local MODES = env_list("BENCH_MODES", "audio/pcmu,audio/pcm")
local SECONDS = tonumber(os.getenv("BENCH_SECONDS") or "20")
local PIN = os.getenv("BENCH_PIN") ~= "0"
local STORE = os.getenv("BENCH_STORE") or "sqlite"

local b64enc, b64dec = crypto.base64_encode, crypto.base64_decode
local now = timer.now
local floor = math.floor
local spack, sunpack = string.pack, string.unpack

-- Histograms: 20 us buckets up to 500 ms ------------------------------------

local Hist = {}
Hist.__index = Hist
local BUCKETS = 25000

local function hist()
  return setmetatable({ b = {}, n = 0, max = 0 }, Hist)
end

function Hist:add(ms)
  local i = floor(ms * 50) + 1
  if i > BUCKETS then
    i = BUCKETS
  elseif i < 1 then
    i = 1
  end
  local b = self.b
  b[i] = (b[i] or 0) + 1
  self.n = self.n + 1
  if ms > self.max then
    self.max = ms
  end
end

function Hist:pct(p)
  if self.n == 0 then
    return 0
  end
  local want, seen = self.n * p, 0
  for i = 1, BUCKETS do
    seen = seen + (self.b[i] or 0)
    if seen >= want then
      return i / 50
    end
  end
  return self.max
end

-- The caller's audio: a 3-byte frame number, then a fixed mu-law pattern ------

local pattern = {}
for i = 0, 159 do
  pattern[#pattern + 1] = string.char(0x80 + (floor(40 * math.sin(i / 3)) % 64))
end
local TAIL = b64enc(table.concat(pattern):sub(4))

-- 20 ms of 24 kHz PCM for the model's deltas in audio/pcm mode.
local pcm = {}
for i = 0, 479 do
  pcm[#pcm + 1] = spack("<i2", floor(6000 * math.sin(2 * math.pi * 440 * i / 24000)))
end
local PCM_DELTA = b64enc(table.concat(pcm))

-- One run's state ----------------------------------------------------------------

local run

local function new_run(mode)
  return {
    mode = mode,
    calls = {},
    by_sid = {},
    next_call = 0,
    lat_in = hist(),
    lat_out = hist(),
    late = hist(),
    sending = false,
    failed = 0,
  }
end

local function twilio_sign(u, params)
  local names = {}
  for k in pairs(params) do
    names[#names + 1] = k
  end
  table.sort(names)
  local parts = { u }
  for _, k in ipairs(names) do
    parts[#parts + 1] = k .. params[k]
  end
  return b64enc(crypto.hmac_sha1(TOKEN, table.concat(parts)))
end

local function signed_post(u, params)
  return fetch(u, {
    method = "POST",
    body = url.form_encode(params),
    headers = { ["Content-Type"] = "application/x-www-form-urlencoded", ["X-Twilio-Signature"] = twilio_sign(u, params) },
    timeout = 30000,
  })
end

-- Messages from callagent on a call's media stream.
local function on_stream_text(c, msg)
  if msg:find('"event":"media"', 1, true) then
    local k = c.media_in + 1
    c.media_in = k
    local t = c.delta_at[k]
    if t then
      c.delta_at[k] = nil
      if run.measuring then
        run.lat_out:add(now() - t)
      end
    end
  elseif msg:find('"event":"mark"', 1, true) then
    local name = msg:match('"name":"([^"]*)"')
    c.conn:send('{"event":"mark","streamSid":"' .. c.stream_sid .. '","mark":{"name":"' .. name .. '"}}')
  end
end

local function answer(c, form)
  local base = { CallSid = c.sid, AccountSid = SID, From = form.From, To = form.To, Direction = "outbound-api", ApiVersion = "2010-04-01" }
  local p = {}
  for k, v in pairs(base) do
    p[k] = v
  end
  p.CallStatus = "in-progress"
  p.SequenceNumber = "0"
  signed_post(form.StatusCallback, p)
  local q = {}
  for k, v in pairs(base) do
    q[k] = v
  end
  q.CallStatus = "in-progress"
  local res, err = signed_post(form.Url, q)
  if not res or res.status ~= 200 then
    c.failed = "voice webhook: " .. tostring(res and res.status or err)
    run.failed = run.failed + 1
    return
  end
  local stream_url = res.body:match('<Stream url="([^"]+)"')
  local params = {}
  for name, value in res.body:gmatch('<Parameter name="([^"]+)" value="([^"]*)"') do
    params[name] = value
  end
  ws.connect_cb(stream_url, {
    headers = { ["X-Twilio-Signature"] = twilio_sign(stream_url, {}) },
    timeout = 30000,
    ping_interval = 0,
    on_text = function(_, msg)
      on_stream_text(c, msg)
    end,
    on_close = function()
      c.closed = true
    end,
  }, function(conn, cerr)
    if not conn then
      c.failed = "stream: " .. tostring(cerr)
      run.failed = run.failed + 1
      return
    end
    c.conn = conn
    c.stream_sid = "MZ" .. crypto.to_hex(crypto.random_bytes(16))
    conn:send('{"event":"connected","protocol":"Call","version":"1.0.0"}')
    conn:send(require("callagent.json").encode({
      event = "start",
      sequenceNumber = "1",
      streamSid = c.stream_sid,
      start = {
        accountSid = SID,
        streamSid = c.stream_sid,
        callSid = c.sid,
        tracks = { "inbound" },
        mediaFormat = { encoding = "audio/x-mulaw", sampleRate = 8000, channels = 1 },
        customParameters = params,
      },
    }))
    c.seq = 1
    c.established = true
  end)
end

local tw_server, rt_server

local function start_fakes()
  tw_server = http.server({ max_connections = 16384, max_body = 65536 })
  tw_server:post("/2010-04-01/Accounts/{acc}/Calls.json", function(req)
    local form = url.form_decode(req.body)
    local i = run.next_call + 1
    run.next_call = i
    local c = {
      i = i,
      sid = "CA" .. crypto.to_hex(crypto.random_bytes(16)),
      phase = i % 20,
      sent_at = {},
      delta_at = {},
      next_frame = 0,
      frames = 0,
      appends = 0,
      deltas = 0,
      media_in = 0,
    }
    run.calls[#run.calls + 1] = c
    run.by_sid[c.sid] = c
    -- The API request numbered the call in its To number: the model's
    -- session finds its call by that number (its prompt says "bench call #k").
    run.by_k[tonumber(form.To:sub(-4))] = c
    task.spawn(answer, c, form)
    return 201, '{"sid":"' .. c.sid .. '","status":"queued"}', { ["Content-Type"] = "application/json" }
  end)
  tw_server:post("/2010-04-01/Accounts/{acc}/Calls/{sid}.json", function(req)
    local c = run.by_sid[(req.params.sid or ""):gsub("%.json$", "")]
    if c and c.conn and c.conn:is_open() then
      c.conn:close(1000, "hung up")
    end
    return 200, "{}", { ["Content-Type"] = "application/json" }
  end)
  assert(tw_server:listen())

  rt_server = http.server({ max_connections = 16384, max_ws_message = 1 << 20, max_send_queue = 8 << 20 })
  rt_server:websocket("/v1/realtime", {
    open = function(conn)
      conn:send('{"type":"session.created","session":{"id":"sess_bench","type":"realtime"}}')
    end,
    text = function(conn, msg)
      local c = conn.call
      if c and msg:find('"input_audio_buffer.append"', 1, true) then
        local p = msg:find('"audio":"', 1, true)
        local idx = sunpack("<I3", b64dec(msg:sub(p + 9, p + 12)))
        local t = c.sent_at[idx % RING]
        if t then
          c.sent_at[idx % RING] = nil
          c.appends = c.appends + 1
          if run.measuring then
            run.lat_in:add(now() - t)
          end
        end
        local delta = run.mode == "audio/pcm" and PCM_DELTA or msg:sub(p + 9, -3)
        local k = c.deltas + 1
        c.deltas = k
        c.delta_at[k] = now()
        conn:send('{"type":"response.output_audio.delta","response_id":"resp_b","item_id":"' .. c.item
          .. '","output_index":0,"content_index":0,"delta":"' .. delta .. '"}')
      elseif msg:find('"session.update"', 1, true) then
        local n = tonumber(msg:match("bench call #(%d+)"))
        local call = n and run.by_k[n]
        if call then
          conn.call = call
          call.item = "item_" .. n
        end
        conn:send('{"type":"session.updated","session":{"type":"realtime"}}')
      end
    end,
  })
  assert(rt_server:listen())
end

-- The 20 ms schedule: a 1 ms tick sends the frames of the calls in that phase.
local function frame_message(c)
  local idx = c.next_frame
  c.next_frame = idx + 1
  c.sent_at[idx % RING] = now()
  c.frames = c.frames + 1
  local seq = c.seq + 1
  c.seq = seq
  return '{"event":"media","sequenceNumber":"' .. seq .. '","streamSid":"' .. c.stream_sid
    .. '","media":{"track":"inbound","chunk":"' .. idx .. '","timestamp":"' .. idx * 20 .. '","payload":"'
    .. b64enc(spack("<I3", idx % 16777216)) .. TAIL .. '"}}'
end

local phases = {}
local ticker

local function start_ticker()
  local t0 = floor(now())
  local slot = t0
  ticker = timer.every(1, function()
    local t = now()
    while slot <= t do
      if run and run.sending then
        local lateness = t - slot
        local list = phases[slot % 20]
        if list then
          for _, c in ipairs(list) do
            if c.conn and not c.closed then
              c.conn:send(frame_message(c))
              if run.measuring then
                run.late:add(lateness)
              end
            end
          end
        end
      end
      slot = slot + 1
    end
  end)
end

-- callagent under test ------------------------------------------------------------

local function proc_stat(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then
    return nil
  end
  local s = f:read("a")
  f:close()
  local fields = {}
  for x in s:match("%) (.*)$"):gmatch("%S+") do
    fields[#fields + 1] = x
  end
  -- utime and stime are fields 14 and 15 (12 and 13 after the name).
  return (tonumber(fields[12]) + tonumber(fields[13])) / 100
end

local function proc_rss(pid)
  local f = io.open("/proc/" .. pid .. "/status")
  if not f then
    return nil
  end
  local s = f:read("a")
  f:close()
  return tonumber(s:match("VmRSS:%s+(%d+) kB")) * 1024
end

local function start_app(mode, port, db)
  local argv = PIN and { "taskset", "-c", "0", BIN, "run", ROOT .. "/tests/bench/app.lua" }
    or { BIN, "run", ROOT .. "/tests/bench/app.lua" }
  local ready = false
  argv.env = {
    BENCH_APP_PORT = tostring(port),
    BENCH_TW_SID = SID,
    BENCH_TW_TOKEN = TOKEN,
    BENCH_TW_URL = tw_server:url(""):gsub("/$", ""),
    BENCH_RT_URL = rt_server:ws_url("/v1/realtime"),
    BENCH_OUTPUT = mode,
    BENCH_STORE = STORE,
    BENCH_DB = db,
    CALLAGENT_LOG = "warn",
  }
  argv.inherit_env = true
  argv.on_stdout = function(line)
    if line == "ready" then
      ready = true
    end
  end
  argv.on_stderr = function(line)
    io.stderr:write("  [callagent] ", line, "\n")
  end
  local t0 = now()
  local p = assert(process.spawn(argv))
  while not ready do
    if not p:running() then
      error("callagent did not start")
    end
    timer.sleep(2)
  end
  return p, now() - t0
end

local function free_port()
  local s = http.server({})
  assert(s:listen())
  local port = s.port
  s:close()
  return port
end

local function api_post(base, path, body)
  return fetch(base .. path, { method = "POST", body = body, headers = { ["Content-Type"] = "application/json" }, timeout = 30000 })
end

local function run_one(mode, n)
  run = new_run(mode)
  run.by_k = {}
  phases = {}
  local port = free_port()
  local db = os.tmpname()
  local app = start_app(mode, port, db)
  local base = "http://127.0.0.1:" .. port
  timer.sleep(300)
  local rss0 = proc_rss(app.pid)
  run.sending = true

  -- Create the calls, 50 at a time.
  local t_setup = now()
  local i = 0
  while i < n do
    local batch = {}
    for _ = 1, math.min(50, n - i) do
      i = i + 1
      local k = i
      batch[#batch + 1] = function()
        local res = api_post(base, "/v1/calls", '{"to":"+1415555' .. string.format("%04d", k)
          .. '","prompt":"bench call #' .. k .. '"}')
        return res and res.status == 201
      end
    end
    task.all(batch)
  end
  local deadline = now() + 60000
  local established
  repeat
    timer.sleep(50)
    established = 0
    for _, c in ipairs(run.calls) do
      if c.established then
        established = established + 1
        if not c.scheduled then
          c.scheduled = true
          local ph = phases[c.phase] or {}
          ph[#ph + 1] = c
          phases[c.phase] = ph
        end
      end
    end
  until established + run.failed >= n or now() > deadline
  local setup_ms = now() - t_setup

  -- Warm up, then measure a window of SECONDS.
  timer.sleep(2000)
  local frames0, appends0, deltas0, media0 = 0, 0, 0, 0
  for _, c in ipairs(run.calls) do
    frames0, appends0 = frames0 + c.frames, appends0 + c.appends
    deltas0, media0 = deltas0 + c.deltas, media0 + c.media_in
  end
  if os.getenv("BENCH_PROFILE") then
    io.stderr:write("PROFILE callagent pid ", app.pid, "\n")
  end
  local cpu0 = proc_stat(app.pid)
  run.measuring = true
  timer.sleep(SECONDS * 1000)
  run.measuring = false
  local cpu1 = proc_stat(app.pid)
  local rss1 = proc_rss(app.pid)
  run.sending = false
  timer.sleep(1000) -- let what is in flight arrive
  local frames, appends, deltas, media = 0, 0, 0, 0
  local lost_in, lost_out = 0, 0
  for _, c in ipairs(run.calls) do
    frames, appends = frames + c.frames, appends + c.appends
    deltas, media = deltas + c.deltas, media + c.media_in
    lost_in = lost_in + (c.frames - c.appends)
    lost_out = lost_out + (c.deltas - c.media_in)
  end
  app:kill("SIGTERM")
  app:wait(10000)
  for _, c in ipairs(run.calls) do
    if c.conn and c.conn:is_open() then
      c.conn:close()
    end
  end
  os.remove(db)
  os.remove(db .. "-wal")
  os.remove(db .. "-shm")
  local cpu = cpu1 - cpu0
  return {
    mode = mode,
    n = n,
    established = established,
    failed = n - established,
    setup_ms = setup_ms,
    frames = frames - frames0,
    frames_total = frames,
    lost_in = lost_in,
    lost_out = lost_out,
    lat_in = { run.lat_in:pct(0.5), run.lat_in:pct(0.99), run.lat_in.max },
    lat_out = { run.lat_out:pct(0.5), run.lat_out:pct(0.99), run.lat_out.max },
    late_p99 = run.late:pct(0.99),
    late_max = run.late.max,
    cpu_per_call_min = cpu / (established * SECONDS / 60),
    cpu_cores = cpu / SECONDS,
    rss0 = rss0,
    rss1 = rss1,
    rss_per_call = (rss1 - rss0) / math.max(1, established),
  }
end

local function startup_times()
  local times = {}
  for _ = 1, 5 do
    local port = free_port()
    local db = os.tmpname()
    local app, ms = start_app("audio/pcmu", port, db)
    times[#times + 1] = ms
    app:kill("SIGTERM")
    app:wait(5000)
    os.remove(db)
  end
  table.sort(times)
  return times
end

task.spawn(function()
  if PIN then
    os.execute("taskset -p -c 1 " .. core.pid() .. " >/dev/null")
  end
  start_fakes()
  start_ticker()
  local cpus = io.popen("nproc --all"):read("l")
  local model = io.popen("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"):read("l") or "?"
  print(string.format("callagent %s benchmark - %s, %s CPUs, %s", core.version, os.date("!%Y-%m-%d %H:%M UTC"), cpus, model:gsub("^%s+", "")))
  print(string.format("%d s measured per row after a 2 s warm-up; store: %s; %s", SECONDS, STORE,
    PIN and "callagent pinned to CPU 0, load generator to CPU 1" or "no CPU pinning"))
  local st = startup_times()
  print(string.format("start-up (spawn to serving): min %.0f ms, median %.0f ms", st[1], st[3]))
  print("")
  print("| mode | calls | ok/failed | frames | lost in/out | in p50/p99/max ms | out p50/p99/max ms | CPU s per call-min | CPU cores | RSS per call | harness p99 late |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  local rows = {}
  for _, mode in ipairs(MODES) do
    for _, ns in ipairs(NS) do
      local n = tonumber(ns)
      local ok, r = pcall(run_one, mode, n)
      if not ok then
        print(string.format("| %s | %d | run failed: %s |", mode, n, tostring(r)))
      else
        rows[#rows + 1] = r
        local harness = r.late_p99 > 5 and string.format("**%.1f ms: harness-limited**", r.late_p99) or string.format("%.1f ms", r.late_p99)
        print(string.format("| %s | %d | %d/%d | %d | %d/%d | %.2f / %.2f / %.1f | %.2f / %.2f / %.1f | %.4f | %.2f | %.1f KiB | %s |",
          mode:gsub("audio/", ""), n, r.established, r.failed, r.frames, r.lost_in, r.lost_out,
          r.lat_in[1], r.lat_in[2], r.lat_in[3], r.lat_out[1], r.lat_out[2], r.lat_out[3],
          r.cpu_per_call_min, r.cpu_cores, r.rss_per_call / 1024, harness))
        io.stdout:flush()
      end
    end
  end
  -- RSS per call as the slope over N (least squares), per mode.
  for _, mode in ipairs(MODES) do
    local xs, ys = {}, {}
    for _, r in ipairs(rows) do
      if r.mode == mode then
        xs[#xs + 1], ys[#ys + 1] = r.established, r.rss1
      end
    end
    if #xs >= 2 then
      local mx, my = 0, 0
      for k = 1, #xs do
        mx, my = mx + xs[k], my + ys[k]
      end
      mx, my = mx / #xs, my / #xs
      local sxy, sxx = 0, 0
      for k = 1, #xs do
        sxy = sxy + (xs[k] - mx) * (ys[k] - my)
        sxx = sxx + (xs[k] - mx) ^ 2
      end
      print(string.format("RSS slope (%s): %.1f KiB per call", mode, sxy / sxx / 1024))
    end
  end
  ticker:stop()
  tw_server:close()
  rt_server:close()
  core.stop(0)
end)
