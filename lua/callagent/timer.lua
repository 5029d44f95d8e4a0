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
-- period is at least 1 ms. A delay that is not a number, or a callback that
-- is not a function, is an error that names the call (timer.after: ...).
-- A delay is never cut short (it may end up to 2 ms late). To let other
-- work run in the middle of a long job, sleep(1): a zero delay started from
-- a timer's callback runs in that same pass of libuv 1.44's timers, before
-- any I/O.
local core = require "callagent.core.timer"
local task = require "callagent.task"

local M = { now = core.now, MAX_MS = 2 ^ 53 }

-- ms as whole milliseconds from least up to M.MAX_MS (NaN: least); math.floor
-- of math.huge or 1e300 alone has no integer representation.
-- what names the caller's function in an error: after, every or sleep.
local function delay(ms, least, what)
  if type(ms) ~= "number" then
    error(string.format("timer.%s: the delay must be a number of milliseconds, not %s", what, type(ms)), 3)
  end
  return math.floor(math.min(math.max(least, ms), M.MAX_MS))
end

local function callback(fn, what)
  if type(fn) ~= "function" then
    error(string.format("timer.%s: the callback must be a function, not %s", what, type(fn)), 3)
  end
  return fn
end

function M.after(ms, fn)
  return core.start(delay(ms, 0, "after"), 0, callback(fn, "after"))
end

function M.every(ms, fn)
  ms = delay(ms, 1, "every")
  return core.start(ms, ms, callback(fn, "every"))
end

function M.sleep(ms)
  local d = delay(ms, 0, "sleep")
  return task.await(function(done)
    core.start(d, 0, done)
  end)
end

return M
