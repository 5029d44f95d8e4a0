--- callagent.runtime: the program around the app.
--
--   runtime.version, runtime.root       callagent's version; the folder holding lua/ and providers/
--   runtime.on_shutdown(fn)             fn(reason) runs (in a task) when the program is
--                                       asked to stop; may wait for I/O
--   runtime.off_shutdown(fn)            fn no longer runs at the shutdown
--   runtime.shutdown([code], [reason])  graceful stop: run the shutdown handlers (at most
--                                       runtime.grace_ms, default 10000), then end with code
--   runtime.stop([code])                end the loop now (after the current callback)
--   runtime.exit([code])                exit the process at once
--   runtime.loop_stats()                the event loop's load: utilization and
--                                       max_iteration_ms over the last window (10 s or more;
--                                       runtime.loop_window(seconds) sets the length and starts
--                                       a new window), window_s; since start:
--                                       iterations, busy_s, slow and slow_s (iterations busy
--                                       5 ms or more), max_ms, uptime_s; an iteration is
--                                       the loop's work between two polls for I/O
--
-- SIGINT, SIGTERM and SIGHUP call runtime.shutdown(0, "SIGINT"/...); a second
-- signal exits at once (128 + signal number).
local core = require "callagent.core"
local task = require "callagent.task"
local timer = require "callagent.timer"
local log = require "callagent.log"

local M = {
  version = core.version,
  root = core.root,
  grace_ms = 10000,
  stop = core.stop,
  exit = core.exit,
  pid = core.pid,
  rss = core.rss,
  cpu = core.cpu,
  loop_stats = core.loop_stats,
  loop_window = core.loop_window,
}

local handlers = {}
local shutting_down = false

function M.on_shutdown(fn)
  assert(type(fn) == "function", "on_shutdown needs a function")
  handlers[#handlers + 1] = fn
  return fn
end

--- fn (given to on_shutdown) no longer runs at the shutdown: an app that
-- stopped, or failed to start, is not kept alive by its handler.
function M.off_shutdown(fn)
  for i = #handlers, 1, -1 do
    if handlers[i] == fn then
      table.remove(handlers, i)
    end
  end
end

function M.shutting_down()
  return shutting_down
end

function M.shutdown(code, reason)
  if shutting_down then
    return
  end
  shutting_down = true
  code = code or 0
  log.info("shutting down", { reason = reason or "requested", handlers = #handlers })
  local left = #handlers
  if left == 0 then
    log.flush()
    return core.stop(code)
  end
  local finished = false
  local function finish()
    if not finished then
      finished = true
      log.flush() -- the counts of rate-limited lines, which no timer writes after this
      core.stop(code)
    end
  end
  local grace = timer.after(M.grace_ms, function()
    log.warn("shutdown handlers still running after grace period; stopping", { grace_ms = M.grace_ms })
    finish()
  end)
  for i = #handlers, 1, -1 do
    local fn = handlers[i]
    task.spawn(function()
      local ok, err = xpcall(fn, debug.traceback, reason)
      if not ok then
        log.error("shutdown handler failed", { error = err })
      end
      left = left - 1
      if left == 0 then
        grace:stop()
        finish()
      end
    end)
  end
end

core.on_signal(function(name)
  M.shutdown(0, name)
end)

return M
