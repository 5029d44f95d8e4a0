--- callagent.timer: timers on the event loop.
--
--   t = timer.after(ms, fn)     fn() once after ms
--   t = timer.every(ms, fn)     fn() every ms
--   t:stop()                    cancel (idempotent); t:active()
--   t:unref()                   do not keep the program alive for this timer
--   timer.now()                 monotonic milliseconds (float)
--   timer.sleep(ms)             inside a task: wait ms without blocking the loop
--
-- A timer that is not kept in a variable still fires (like setTimeout).
-- A delay is never cut short (it may end up to 2 ms late). To let other
-- work run in the middle of a long job, sleep(1): a zero delay started from
-- a timer's callback runs in that same pass of libuv 1.44's timers, before
-- any I/O.
local core = require "callagent.core.timer"
local task = require "callagent.task"

local M = { now = core.now }

function M.after(ms, fn)
  return core.start(math.max(0, math.floor(ms)), 0, fn)
end

function M.every(ms, fn)
  ms = math.max(1, math.floor(ms))
  return core.start(ms, ms, fn)
end

function M.sleep(ms)
  return task.await(function(done)
    core.start(math.max(0, math.floor(ms)), 0, done)
  end)
end

return M
