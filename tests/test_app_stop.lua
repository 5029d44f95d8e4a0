-- app:stop() while the app is busy: a dial whose answer comes during the
-- stop, hang-ups slower than the grace period, a stop from a plain callback.
-- Nothing is left ringing or published, nothing writes to the closed store,
-- and no timer of the app runs after it.
local T = require "testing"
local kit = require "callkit"
local timer = require "callagent.timer"
local fetch = require "callagent.fetch"
local task = require "callagent.task"
local log = require "callagent.log"
local json = require "callagent.json"
local callagent = require "callagent"

-- ERROR lines from now until the end of the test ("uncaught error in task"
-- is one: a task that wrote to the closed store).
local function errors()
  local lines = {}
  local e = log.error
  log.error = function(msg, f)
    lines[#lines + 1] = msg .. " " .. tostring(f and (f.error or f.traceback) or "")
    return e(msg, f)
  end
  T.defer(function()
    log.error = e
  end)
  return lines
end

-- Waits until every HTTP request of this process has its answer (fetch.active
-- counts them, the app's and the fakes' alike), then for a turn behind the
-- tasks that got one: fetch paces each answer (task.pace, first come first
-- served), so those tasks have gone on with it when this returns.
local function answers_taken(what)
  T.wait_for(function()
    return fetch.active() == 0
  end, 10000, what)
  task.pace()
end

-- app:stop() from a plain callback, which waits for nothing (inside a task it
-- waits for the resolutions and hang-ups under way): returns once it has,
-- the store closed.
local function stop_from_callback(app)
  local closed
  timer.after(0, function()
    app:stop()
    closed = app.store.db == nil
  end)
  T.wait_for(function()
    return closed ~= nil
  end, 2000, "the stop")
  T.ok(closed, "the store closed")
end

T.test("a call whose dial was on its way when the app stopped is hung up, and dialed again by the next start", function()
  local errs = errors()
  local env = kit.start({
    -- Twilio places the call at once but answers the dial 1.5 s later.
    twilio = { create_delay_ms = 1500, behaviour = { ring_ms = 30000 } },
  })
  local db = env.app.config.store.path
  local id = env:create({ to = "+14155550140", prompt = "Hello." })
  -- The dial has reached Twilio (its answer 1.5 s away): waited for, not
  -- slept for, so the stop begins well before that answer on a loaded machine.
  T.wait_for(function()
    return #env.tw.calls >= 1
  end, 10000, "the dial to reach Twilio")
  local t0 = timer.now()
  env.app:stop()
  T.ok(timer.now() - t0 >= 1000, "stop waited for the dial's answer")
  local placed = env.tw.calls[1]
  T.wait_for(function()
    return placed.status == "canceled"
  end, 5000, "the ringing call canceled at Twilio (it is " .. tostring(placed.status) .. ")")
  T.eq(#errs, 0, table.concat(errs, "\n"))
  -- The next start dials the call again.
  local app2 = env:next_start()
  T.eq(env.app.config.store.path, db)
  T.wait_for(function()
    return #env.tw.calls == 2
  end, 5000, "dialed again by the next start")
  local rec = app2.engine:call_view(id)
  T.eq(rec.attempts[1].status, "canceled")
  T.eq(rec.attempts[1].reason, "callagent stopped while dialing")
  T.eq(rec.attempt, 2)
end, { timeout = 30000 })

T.test("a stop while the last run's calls are resolved, or while a hang-up waits for Twilio: nothing writes to the closed store", function()
  local errs = errors()
  local env = kit.start({
    -- Ringing for long; the stop's cancel of it fails (the next start
    -- resolves it), the next one does not; Twilio's GET of a call answers
    -- 300 ms late.
    twilio = { behaviour = { ring_ms = 30000, get_delay_ms = 300, update_fail = 500, update_fail_times = 1 } },
  })
  local id = env:create({ to = "+14155550141", prompt = "Hello." })
  env:wait(id, function(r)
    return r.status == "dialing" and r.attempts[1].providerCallId
  end, 5000, "ringing")
  env.app:stop() -- its cancel fails: the ringing call is left to the next start
  local app2 = assert(callagent.app(env.app.config, { public_url = function(u) return u end,
    no_shutdown_hook = true }))
  assert(app2:start()) -- asks Twilio how the call is doing
  local gets = env.tw.calls[1].gets or 0
  stop_from_callback(app2)
  T.gt(fetch.active(), 0, "the GET still on its way as the store closed")
  answers_taken("Twilio's answer to the GET")
  T.eq(env.tw.calls[1].gets, gets + 1, "Twilio was asked, and answered")
  T.eq(#errs, 0, table.concat(errs, "\n"))

  -- The same for a hang-up (POST /v1/calls/{id}/hangup) that Twilio answers late.
  local env3 = kit.start({
    twilio = { update_delay_ms = 300, behaviour = { ring_ms = 30000, lost_callbacks = { completed = true } } },
  })
  local id3 = env3:create({ to = "+14155550142", prompt = "Hello." })
  env3:wait(id3, function(r)
    return r.status == "dialing" and r.attempts[1].providerCallId
  end, 5000, "ringing")
  task.spawn(function()
    env3.app.engine:hangup(id3)
  end)
  T.wait_for(function()
    return #env3.tw.calls[1].updates >= 1
  end, 5000, "the hang-up to reach Twilio")
  stop_from_callback(env3.app)
  T.gt(fetch.active(), 0, "the hang-up still on its way as the store closed")
  answers_taken("Twilio's answer to the hang-up")
  T.eq(#errs, 0, table.concat(errs, "\n"))
end, { timeout = 30000 })

T.test("a stop answers the requests in progress before it closes the server, and refuses new ones meanwhile", function()
  local started = 0
  local env = kit.start({
    routes = function(srv)
      srv:get("/report", function()
        started = started + 1
        timer.sleep(300) -- a route of the app's that takes a moment
        return 200, { done = true }
      end)
    end,
  })
  local answers = {}
  for i = 1, 3 do
    task.spawn(function()
      local res, err = fetch(env.base .. "/report", { timeout = 5000 })
      answers[i] = res and res.status or err
    end)
  end
  T.wait_for(function()
    return started == 3
  end, 2000, "the requests to be in progress")
  local stopped
  task.spawn(function()
    env.app:stop()
    stopped = true
  end)
  T.wait_for(function()
    return env.app.server.draining
  end, 2000, "the stop's drain")
  local res, err = fetch(env.base .. "/v1/calls", { timeout = 2000 })
  T.eq(res, nil, "a new connection during the stop is refused")
  T.match(err, "^ECONNREFUSED")
  T.wait_for(function()
    return stopped
  end, 8000, "the stop to end")
  T.eq(answers, { 200, 200, 200 }, "each request in progress was answered")
end)

T.test("app:stop() from a plain callback, not a task: the live call is hung up, and nothing runs after it", function()
  local errs = errors()
  -- The engine's wait for a final status after the conversation's end (5 s)
  -- shortened to 300 ms.
  local calls = require "callagent.calls"
  T.shorten(calls, "BRIDGE_END_WAIT_MS", 300)
  local env = kit.start({
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 10000, text = "A long talk." })
      end,
    },
  })
  local id = env:create({ to = "+14155550143", prompt = "Explain." })
  env:wait(id, function(c)
    return c.status == "in_progress"
  end, 10000, "in progress")
  T.wait_for(function()
    return (env.tw.calls[1].received_bytes or 0) > 0
  end, 5000, "the model talking to the phone")
  local ok, err
  timer.after(0, function() -- the main thread: nothing can wait here
    ok, err = pcall(env.app.stop, env.app)
  end)
  T.wait_for(function()
    return ok ~= nil
  end, 2000, "stop ran")
  T.eq({ ok, err }, { true, nil })
  T.eq(env.app.store.db, nil, "the store is closed")
  T.wait_for(function()
    return env.tw.calls[1].status == "completed"
  end, 5000, "hung up at Twilio")
  -- The bridge ends as its stream closes, and starts the engine's wait for
  -- the final status then: a timer started after it, as long, fires after it.
  T.wait_for(function()
    return next(env.app.engine.bridges) == nil
  end, 5000, "the bridge to end")
  timer.sleep(calls.BRIDGE_END_WAIT_MS + 5)
  T.eq(#errs, 0, table.concat(errs, "\n"))
end, { timeout = 30000 })

T.test("hang-ups that take the grace period, and a tunnel slow to close: the store still closes within the grace", function()
  local runtime = require "callagent.runtime"
  local grace = runtime.grace_ms
  runtime.grace_ms = 4000 -- the hang-ups get 1 s of it
  T.defer(function()
    runtime.grace_ms = grace
  end)
  local env = kit.start({
    twilio = { update_delay_ms = 8000 }, -- a vendor API that is slow today
    realtime = { script = function() timer.sleep(20000) end },
  })
  env:create({ to = "+14155550144", prompt = "Stay on the line." })
  T.wait_for(function()
    return #env.rt.sessions >= 1
  end, 10000, "a live call")
  -- A tunnel whose close waits for its CLI (`tailscale funnel ... off` may
  -- take up to 5 s).
  local t0 = timer.now()
  local tunnel_closing, store_closed
  env.app.tunnel = {
    close = function()
      tunnel_closing = tunnel_closing or timer.now() - t0
      timer.sleep(5000)
    end,
  }
  local store = env.app.store
  local close = store.close
  store.close = function(self)
    store_closed = store_closed or timer.now() - t0
    return close(self)
  end
  env.app:stop()
  T.ok(tunnel_closing and tunnel_closing < runtime.grace_ms, "the tunnel's close began within the grace: "
    .. tostring(tunnel_closing))
  T.ok(store_closed and store_closed < runtime.grace_ms, "the store closed within the grace: " .. tostring(store_closed))
end, { timeout = 30000 })

T.test("a request that holds the stop's drain its whole second leaves the hang-ups' notifications their time to be answered", function()
  local runtime = require "callagent.runtime"
  local store_mod = require "callagent.store"
  -- A 6 s grace, no tunnel: 1 s kept for closing the store, 1 s for the
  -- notifications' answers, up to 1 s for the server's drain, the hang-ups
  -- the first 3 s.
  T.shorten(runtime, "grace_ms", 6000)
  -- The receiver takes 1.5 s to answer: more than the drain, less than the
  -- drain and the notifications' turn.
  local answered = {}
  local hooks = T.server({}, function(srv)
    srv:post("/hooks/agent", function()
      timer.sleep(1500)
      answered[#answered + 1] = timer.now()
      return 200, { ok = true }
    end)
  end)
  -- An API client whose request is still in progress when the drain begins,
  -- and past its end.
  local release, in_route = false, false
  T.defer(function()
    release = true
  end)
  local env = kit.start({
    -- The final status of the stop's hang-up never comes: the hang-ups' wait
    -- for it takes their whole share, and the call ends at its end.
    twilio = { behaviour = { lost_callbacks = { completed = true } } },
    realtime = { script = function() timer.sleep(20000) end },
    config = { notify = { hooksUrl = hooks:url("/hooks") } },
    routes = function(srv)
      srv:get("/slow", function()
        in_route = true
        local until_ms = timer.now() + 5000
        while not release and timer.now() < until_ms do
          timer.sleep(20)
        end
        return 200, { done = true }
      end)
    end,
  })
  local id = env:create({ to = "+14155550145", prompt = "Stay on the line." })
  env:wait(id, function(r)
    return r.status == "in_progress"
  end, 10000, "a live call")
  task.spawn(function()
    fetch(env.base .. "/slow", { timeout = 10000 })
  end)
  T.wait_for(function()
    return in_route
  end, 5000, "the slow request in progress")
  local warns = {}
  local w = log.warn
  log.warn = function(msg, f)
    warns[#warns + 1] = msg
    return w(msg, f)
  end
  T.defer(function()
    log.warn = w
  end)
  local t0 = timer.now()
  env.app:stop()
  local took = timer.now() - t0
  T.lt(took, runtime.grace_ms - 1000 + 200, "the stop left its last second for closing the store")
  -- The hang-up waited 2 s for the final status (with the tunnel's 3 s kept,
  -- its share was 1 s), then the drain 1 s, the receiver's answer coming at
  -- 3.5 s (2.5 s with the tunnel's share).
  T.gt(took, runtime.grace_ms - 3000, "the hang-ups had the 2 s no tunnel needs")
  T.match(table.concat(warns, "\n"), "requests still in progress at the stop were cut off",
    "the drain was busy to its end")
  T.no_match(table.concat(warns, "\n"), "notifications still on their way at the stop")
  T.eq(#answered, 1, "the receiver answered within the stop")
  -- Marked delivered before the store closed: the next start does not send it again.
  local store = assert(store_mod.open(env.app.config.store))
  local pending = store:pending_notifications()
  store:close()
  T.eq(#pending, 0, "no notification left for the next start")
end, { timeout = 30000 })

-- An app whose start finds a notification not yet delivered, sending to a
-- receiver that answers as `answer` does, stops itself once `ready` (a Lua
-- expression over its notifier, n) is true and ends its script: how long
-- the program then takes to exit, and the store's path. from_callback: the
-- stop is called from a plain callback (a timer's), not the task.
local function exit_after_stop(answer, ready, from_callback)
  local hooks = T.server({}, function(srv)
    srv:post("/hooks/agent", answer)
  end)
  local dir = T.tmpdir()
  local store_mod = require "callagent.store"
  local store = assert(store_mod.open({ backend = "sqlite", path = dir .. "/c.db", retentionDays = 30 }))
  assert(store:add_notification("c_1:completed", "c_1", "{}"))
  store:close()
  local p = T.spawn_app(nil, nil, { source = [[
local callagent = require "callagent"
local task = require "callagent.task"
local timer = require "callagent.timer"
local app = assert(callagent.app({
  telephony = { provider = "mock" },
  server = { port = 0 },
  openai = { apiKey = "sk-unused", realtimeUrl = "ws://127.0.0.1:9/v1/realtime" },
  store = { backend = "sqlite", path = ]] .. string.format("%q", dir .. "/c.db") .. [[ },
  notify = { hooksUrl = ]] .. string.format("%q", hooks:url("/hooks")) .. [[, hooksToken = "hooks-token" },
}, { no_shutdown_hook = true, notify = { timeout_ms = 30000 } }))
task.spawn(function()
  assert(app:start())
  local n, deadline = app.notifier, timer.now() + 5000
  while not (]] .. ready .. [[) and timer.now() < deadline do
    timer.sleep(5)
  end
  print("ready: " .. tostring(]] .. ready .. [[))
  ]] .. (from_callback and "timer.after(0, function() app:stop() print('stopped') end)"
    or "app:stop() print('stopped')") .. [[
end)
]] })
  T.wait_for(function()
    return p.text():find("stopped", 1, true) ~= nil
  end, 10000, "the app stopped: " .. p.errtext())
  T.match(p.text(), "ready: true", ready)
  local t0 = timer.now()
  local code = p:wait(5000)
  return code, timer.now() - t0, p, dir .. "/c.db"
end

T.test("a stop leaves no notification retry waiting its turn: the program exits at once, not at the retry", function()
  -- 503 with Retry-After: 30: the second try was 30 s away, and its timer
  -- kept the program running until then, the app long stopped.
  local tries = 0
  local code, took, p = exit_after_stop(function()
    tries = tries + 1
    return 503, { error = "later" }, { ["Retry-After"] = "30" }
  end, "#n.sleepers > 0") -- the retry waits its turn
  T.eq(code, 0, "exited within 5 s of the stop: " .. p.errtext())
  T.lt(took, 2000)
  T.eq(tries, 1)
  T.no_match(p.errtext(), "ERROR")
end, { timeout = 30000 })

T.test("a stop leaves no notification request on its way: past the stop's wait for its answer it is canceled", function()
  -- A receiver that holds the request: it went on until its timeout (30 s
  -- here), and kept the program running as long.
  local code, took, p = exit_after_stop(function()
    timer.sleep(20000)
    return 200, { ok = true }
  end, "n.requests > 0") -- the request is on its way
  T.eq(code, 0, "exited within 5 s of the stop: " .. p.errtext())
  T.lt(took, 2000)
  T.match(p.errtext(), "notifications still on their way at the stop")
  T.no_match(p.errtext(), "ERROR")
end, { timeout = 40000 })

T.test("a stop from a plain callback, which waits for nothing, warns of the notification request on its way, left for the next start", function()
  -- No time to wait for its answer: the request is canceled, said so (it was
  -- said only after a wait inside a task), and stays pending.
  local code, took, p, path = exit_after_stop(function()
    timer.sleep(20000)
    return 200, { ok = true }
  end, "n.requests > 0", true)
  T.eq(code, 0, "exited within 5 s of the stop: " .. p.errtext())
  T.lt(took, 2000)
  T.match(p.errtext(), "notifications still on their way at the stop")
  T.no_match(p.errtext(), "ERROR")
  local store = assert(require("callagent.store").open({ backend = "sqlite", path = path, retentionDays = 30 }))
  local pending = store:pending_notifications()
  store:close()
  T.eq(#pending, 1, "pending: the next start sends it")
end, { timeout = 40000 })

T.test("an app stopped, or whose start failed, leaves no shutdown handler behind: the program keeps none of them", function()
  local busy = T.server({}, function() end) -- its port: where the failing app cannot listen
  local p = T.spawn_app(nil, nil, { source = [[
local callagent = require "callagent"
local task = require "callagent.task"
local runtime = require "callagent.runtime"
local function cfg(port)
  return { telephony = { provider = "mock" }, server = { host = "127.0.0.1", port = port },
    openai = { apiKey = "sk-unused", realtimeUrl = "ws://127.0.0.1:9/v1/realtime" }, store = { backend = "memory" } }
end
task.spawn(function()
  for _ = 1, 3 do
    local app = assert(callagent.app(cfg(0)))
    assert(app:start())
    app:stop()
  end
  local bad = assert(callagent.app(cfg(]] .. busy.port .. [[)))
  print("bad start:", (select(2, bad:start())))
  local live = assert(callagent.app(cfg(0)))
  assert(live:start())
  runtime.shutdown(0, "done")
end)
]] })
  T.eq(p:wait(10000), 0, p.errtext())
  T.match(p.text(), "bad start:%s+%S")
  T.match(p.errtext(), "shutting down handlers=1 reason=done", "only the live app's")
end, { timeout = 20000 })

T.run()
