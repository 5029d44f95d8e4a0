-- app:stop() while the app is busy: a dial whose answer comes during the
-- stop, hang-ups slower than the grace period, a stop from a plain callback.
-- Nothing is left ringing or published, nothing writes to the closed store,
-- and no timer of the app runs after it.
local T = require "testing"
local kit = require "callkit"
local timer = require "callagent.timer"
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

T.test("a call whose dial was on its way when the app stopped is hung up, and dialed again by the next start", function()
  local errs = errors()
  local env = kit.start({
    -- Twilio places the call at once but answers the dial 1.5 s later.
    twilio = { create_delay_ms = 1500, behaviour = { ring_ms = 30000 } },
  })
  local db = env.app.config.store.path
  local id = env:create({ to = "+14155550140", prompt = "Hello." })
  timer.sleep(200)
  local t0 = timer.now()
  env.app:stop()
  T.ok(timer.now() - t0 >= 1000, "stop waited for the dial's answer")
  local placed = env.tw.calls[1]
  T.wait_for(function()
    return placed.status == "canceled"
  end, 5000, "the ringing call canceled at Twilio (it is " .. tostring(placed.status) .. ")")
  T.eq(#errs, 0, table.concat(errs, "\n"))
  -- The next start dials the call again.
  local cfg = env.app.config
  local app2 = assert(callagent.app(cfg, { public_url = function(u) return u end, no_shutdown_hook = true }))
  assert(app2:start())
  T.defer(function()
    app2:stop()
  end)
  T.eq(cfg.store.path, db)
  T.wait_for(function()
    return #env.tw.calls == 2
  end, 5000, "dialed again by the next start")
  local rec = app2.engine:call_view(id)
  T.eq(rec.attempts[1].status, "canceled")
  T.eq(rec.attempts[1].reason, "callagent stopped while dialing")
  T.eq(rec.attempt, 2)
end, { timeout = 30000 })

T.run()
