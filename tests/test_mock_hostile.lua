-- The local no-keys experience (mock phone, stand-in model) under what a
-- careless or hostile caller does: silence, keys pressed again, and so on.
local T = require "testing"
local callagent = require "callagent"
local standin = require "callagent.standin"
local phone = require "phone"
local timer = require "callagent.timer"

-- An app with the mock phone and the stand-in model (call: more of the
-- call section), stopped at the test's end.
local function standin_app(call)
  local c = { ringTimeoutSec = 60 }
  for k, v in pairs(call or {}) do
    c[k] = v
  end
  local app = assert(callagent.app({
    telephony = { provider = "mock" },
    server = { port = 0 },
    openai = { apiKey = standin.KEY, outputFormat = "audio/pcmu" },
    call = c,
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
  return app
end

T.test("a caller who never speaks to the stand-in: asked to wrap up, it files its report (no_answer) and says goodbye", function()
  local app = standin_app({ silenceTimeoutSec = 1, wrapUpSec = 10, goodbyeTimeoutSec = 8 })
  local view = assert(app:create_call({ to = "+15555550100", prompt = "Test." }))
  T.wait_for(function()
    return app.engine:call_view(view.callId).hint
  end, 5000, "the hint")
  local t0 = timer.now()
  local p = assert(phone.answer(app.engine:call_view(view.callId).hint))
  local call
  T.wait_for(function()
    call = app.engine:call_view(view.callId)
    return require("callagent.calls").FINAL[call.status]
  end, 30000, "the call to end")
  -- Before call.wrapUpSec (10 s) would have cut the silence short.
  T.lt(timer.now() - t0, 9000, "ended by its goodbye, not by the wrap-up's limit")
  T.eq(call.status, "completed")
  T.eq(call.report and call.report.outcome, "no_answer")
  local all = {}
  for _, l in ipairs(call.transcript) do
    all[#all + 1] = l.role .. ": " .. l.text
  end
  T.match(table.concat(all, "\n"), "Goodbye")
  T.ok(p:wait_closed(5000), "the stream was closed by the hang-up")
end, { timeout = 60000 })
T.test("20 stand-in calls at once, # pressed twice on each before a word: each one report (success) and one goodbye", function()
  local task = require "callagent.task"
  local FINAL = require("callagent.calls").FINAL
  local app = standin_app({ goodbyeTimeoutSec = 8 })
  local ids = {}
  for i = 1, 20 do
    ids[i] = assert(app:create_call({ to = "+15555550100", prompt = "Test." })).callId
  end
  for i = 1, 20 do
    task.spawn(function()
      T.wait_for(function()
        return app.engine:call_view(ids[i]).hint
      end, 10000, "the hint")
      local p = assert(phone.answer(app.engine:call_view(ids[i]).hint))
      assert(p:wait_received(1, 15000)) -- the greeting
      p:dtmf("#")
      p:dtmf("#")
    end)
  end
  T.wait_for(function()
    for _, id in ipairs(ids) do
      if not FINAL[app.engine:call_view(id).status] then
        return false
      end
    end
    return true
  end, 30000, "every call to end")
  for _, id in ipairs(ids) do
    local v = app.engine:call_view(id)
    local said = {}
    for _, l in ipairs(v.transcript) do
      if l.role == "agent" then
        said[l.text] = (said[l.text] or 0) + 1
      end
    end
    T.eq({ v.status, v.report and v.report.outcome, said[standin.REPORTING], said[standin.GOODBYE] },
      { "completed", "success", 1, 1 }, id)
  end
end, { timeout = 60000 })

T.run()
