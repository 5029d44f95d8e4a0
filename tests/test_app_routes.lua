-- The app's telephony routes at their edges: what the media stream route
-- does with messages no media stream sends, and what it logs.
local T = require "testing"
local kit = require "callkit"
local fetch = require "callagent.fetch"
local ws = require "callagent.ws"
local json = require "callagent.json"
local fake_twilio = require "fakes.twilio"
local timer = require "callagent.timer"
local task = require "callagent.task"


T.test("a binary message before start is refused with 1008 at once and logged, as any other first message", function()
  local tw, rt = kit.fakes()
  -- The start deadline is far: a refusal must come from the message itself.
  local p, api = kit.app_process(tw, rt, { stream_start_ms = 8000 })
  local stream_url = api.base:gsub("^http", "ws") .. "/voice/stream"
  local function open()
    return assert(ws.connect(stream_url, { headers = { ["X-Twilio-Signature"] = fake_twilio.sign(kit.TOKEN, stream_url) } }))
  end
  for _, first in ipairs({ "binary", "connected, then binary" }) do
    local conn = open()
    if first ~= "binary" then
      conn:send(json.encode({ event = "connected", protocol = "Call", version = "1.0.0" }))
    end
    conn:send_binary("\0\1\2\3")
    local kind, code, reason = conn:receive(1500)
    T.eq({ kind, code, reason }, { "close", 1008, "expected start" }, first)
  end
  T.wait_for(function()
    return select(2, p.errtext():gsub("got a binary message", "")) >= 2
  end, 3000, "a log line for each: " .. p.errtext())
  T.match(p.errtext(), 'WARN media stream refused reason="expected connected or start, got a binary message" remote=127%.0%.0%.1')
  T.eq(assert(fetch(api.base .. "/healthz")).status, 200)
end, { timeout = 20000 })


T.test("a second app:stop() inside a task while the first is under way returns once the first is done", function()
  local env = kit.start({
    twilio = { update_delay_ms = 1500 }, -- the hang-up takes a while
    realtime = { script = function() timer.sleep(20000) end },
  })
  env:create({ to = "+14155550150", prompt = "Stay on the line." })
  T.wait_for(function()
    return #env.rt.sessions >= 1
  end, 10000, "a live call")
  -- The first stop (a signal's, say) and then the app's own, as an embedder
  -- that stops its app before it exits would.
  local store, closed_at = env.app.store, nil
  local close = store.close
  store.close = function(self)
    closed_at = closed_at or timer.now()
    return close(self)
  end
  local first_done, second_done
  task.spawn(function()
    env.app:stop()
    first_done = timer.now()
  end)
  local t0 = timer.now()
  task.spawn(function()
    env.app:stop()
    second_done = timer.now()
  end)
  T.wait_for(function()
    return first_done and second_done
  end, 15000, "both stops returned")
  T.ok(closed_at and second_done >= closed_at, "the second stop returned once the store was closed: after "
    .. (second_done - t0) .. " ms, the store closed after " .. tostring(closed_at and closed_at - t0) .. " ms")
  -- From a plain callback it waits for nothing, as the first would.
  local ok, err = pcall(env.app.stop, env.app)
  T.eq({ ok, err }, { true, nil })
end, { timeout = 30000 })


T.test("an app:start() that raises (the app's public_url) closes its server and store, and raises on", function()
  local callagent = require "callagent"
  local dir = T.tmpdir()
  local app = assert(callagent.app({
    telephony = { provider = "mock" },
    server = { port = 0 },
    openai = { apiKey = "sk-unused-0123456789" },
    store = { backend = "sqlite", path = dir .. "/calls.db" },
  }, { no_shutdown_hook = true, public_url = function()
    error("public_url broke", 0)
  end }))
  local ok, err = pcall(app.start, app)
  T.eq({ ok, err }, { false, "public_url broke" })
  T.ok(app.url, "it had listened")
  local res, ferr = fetch(app.url .. "/healthz", { timeout = 1000 })
  T.eq(res, nil, "nothing listens any more")
  T.match(ferr, "ECONNREFUSED")
  T.eq({ app.server, app.store }, { nil, nil })
  -- Closed, not left open: its WAL was checkpointed and removed.
  T.eq(require("callagent.core").stat(dir .. "/calls.db-wal"), nil, "the store's WAL is gone")
  app:stop() -- as an embedder's cleanup would: nothing is closed twice
end)

T.test("app:create_call before app:start() is nil and a message saying so, not a raise; after app:stop(), refused too", function()
  local callagent = require "callagent"
  local app = assert(callagent.app({
    telephony = { provider = "mock" },
    server = { port = 0 },
    openai = { apiKey = "sk-unused-0123456789" },
    store = { backend = "memory" },
  }, { no_shutdown_hook = true }))
  local ok, call, err = pcall(app.create_call, app, { to = "+14155550100", prompt = "x" })
  T.eq({ ok, call, err }, { true, nil, "the app is not started: app:start() first" })
  -- Bad input is still 400's message and status, started or not.
  local _, berr, status = app:create_call({ to = "nope", prompt = "x" })
  T.eq(status, 400, berr)
  assert(app:start())
  app:stop()
  ok, call, err = pcall(app.create_call, app, { to = "+14155550100", prompt = "x" })
  T.eq({ ok, call }, { true, nil })
  T.match(err, "shutting down")
end)

T.test("app:on with an event name the app has not (a typo) raises, naming the events", function()
  local app = assert(require("callagent").app({ telephony = { provider = "mock" }, openai = { apiKey = "sk-test-key" },
    store = { backend = "memory" } }))
  T.raises(function()
    app:on("reports", function() end)
  end, 'app:on: no event "reports" %(the events: status, transcript, report, bargein, error, ended%)')
  for _, ev in ipairs({ "status", "transcript", "report", "bargein", "error", "ended" }) do
    T.eq(app:on(ev, function() end), app, ev)
  end
end)

T.test("app:tool refuses what the model service would refuse the session for: a long name, a name given twice", function()
  local app = assert(require("callagent").app({ telephony = { provider = "mock" }, openai = { apiKey = "sk-test-key" },
    store = { backend = "memory" } }))
  local function tool(name)
    return app:tool({ name = name, handler = function() end })
  end
  T.eq(tool(string.rep("a", 64)), app, "64 characters")
  T.raises(function()
    tool(string.rep("b", 65))
  end, "tool name must be at most 64 characters")
  T.eq(tool("lookup"), app)
  T.raises(function()
    tool("lookup")
  end, "a tool named lookup was added already")
  T.raises(function()
    tool("report_call")
  end, "report_call is built in")
  T.eq(#app.tools, 2, "only the two good ones")
end)

T.test("an app:on handler that raises is logged with its traceback; the other handlers and the call go on", function()
  local errs = T.log_lines("error")
  local env = kit.start({
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Hello." })
        session:call_function("report_call", { summary = "Said hello.", outcome = "success" })
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 200, text = "Goodbye!" })
      end,
    },
  })
  local seen = {}
  for _, ev in ipairs({ "status", "transcript", "report", "ended" }) do
    env.app:on(ev, function()
      error("handler of " .. ev .. " failed")
    end)
    env.app:on(ev, function()
      seen[ev] = (seen[ev] or 0) + 1
    end)
  end
  local id = env:create({ to = "+14155550151", prompt = "Say hello." })
  local call = env:wait_final(id, 15000)
  T.eq(call.status, "completed")
  T.eq(call.report.outcome, "success")
  T.wait_for(function()
    return seen.ended == 1
  end, 2000, "the second ended handler ran")
  T.ok(seen.status and seen.transcript and seen.report, "every second handler ran: " .. json.encode(seen))
  local logged = {}
  for _, x in ipairs(errs) do
    if x.msg == "event handler failed" then
      T.match(x.fields.error, "handler of " .. x.fields.event .. " failed")
      T.match(x.fields.error, "stack traceback")
      logged[x.fields.event] = true
    end
  end
  T.eq(logged, { status = true, transcript = true, report = true, ended = true })
end, { timeout = 30000 })


T.test("a first stream message over 256 KiB is closed with 1009 and logged; the server goes on", function()
  local tw, rt = kit.fakes()
  local p, api = kit.app_process(tw, rt, { stream_start_ms = 8000 })
  local stream_url = api.base:gsub("^http", "ws") .. "/voice/stream"
  local conn = assert(ws.connect(stream_url, { headers = { ["X-Twilio-Signature"] = fake_twilio.sign(kit.TOKEN, stream_url) } }))
  conn:send(json.encode({ event = "start", pad = string.rep("x", 256 * 1024) }))
  local kind, code = conn:receive(2000)
  T.eq({ kind, code }, { "close", 1009 })
  T.wait_for(function()
    return p.errtext():find("message over 262144 bytes", 1, true)
  end, 3000, "a warning: " .. p.errtext())
  T.eq(assert(fetch(api.base .. "/healthz")).status, 200)
end, { timeout = 20000 })

T.run()

T.test("an app starts once: a second app:start() (or one after app:stop()) is refused, and the first server goes on", function()
  local env = kit.start()
  local ok, err = env.app:start()
  T.eq({ ok, err }, { nil, "this app is started already" })
  local res = assert(fetch(env.base .. "/healthz"))
  T.eq(res.status, 200, "the first server still answers")
  local port = env.app.server.port
  env.app:stop()
  ok, err = env.app:start()
  T.eq({ ok, err }, { nil, "this app was stopped: make a new one to start again" })
  T.eq(env.app.server.port, port, "no second server")
  local _, ferr = fetch(env.base .. "/healthz", { timeout = 1000 })
  T.ok(ferr, "nothing listens after the stop")
end)
