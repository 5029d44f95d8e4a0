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
-- A delay below 0 (or NaN) counts as 0, one above timer.MAX_MS (2^53 ms,
-- some 285,000 years) as MAX_MS: math.huge is effectively never. every's
-- period is at least 1 ms.
-- A delay is never cut short (it may end up to 2 ms late). To let other
-- work run in the middle of a long job, sleep(1): a zero delay started from
-- a timer's callback runs in that same pass of libuv 1.44's timers, before
-- any I/O.
local core = require "callagent.core.timer"
local task = require "callagent.task"

local M = { now = core.now, MAX_MS = 2 ^ 53 }

-- ms as whole milliseconds from least up to M.MAX_MS (NaN: least); math.floor
-- of math.huge or 1e300 alone has no integer representation.
local function delay(ms, least)
  return math.floor(math.min(math.max(least, ms), M.MAX_MS))
end

function M.after(ms, fn)
  return core.start(delay(ms, 0), 0, fn)
end

function M.every(ms, fn)
  ms = delay(ms, 1)
  return core.start(ms, ms, fn)
end

function M.sleep(ms)
  return task.await(function(done)
    core.start(delay(ms, 0), 0, done)
  end)
end

return M
