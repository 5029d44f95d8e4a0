--- callagent.task: coroutines as tasks, so async code reads top to bottom.
--
-- Every handler the framework runs (HTTP request, WebSocket event flow, call,
-- webhook) runs in a task. Code inside a task may call anything that waits
-- (fetch, timer.sleep, ws:receive, queue:pop): it yields, and the loop
-- resumes it when the result is there.
--
--   task.spawn(fn, ...)        run fn(...) in a new task now; returns the coroutine
--   task.resume(co, ...)       resume a task; an uncaught error is logged with
--                              its traceback and the task ends (the process does not)
--   task.await(start)          inside a task: start(done) begins an operation that
--                              later calls done(...); await returns those values
--   task.wait_in(list, [timeout_ms], [entry])
--                              inside a task: adds a waiter to list and returns
--                              what it is woken with; after timeout_ms it leaves
--                              list and returns nil, "ETIMEDOUT". The waiter is
--                              the wake function, or entry with entry.wake set
--   task.running()             the current task's coroutine, or nil on the main thread
--   task.close(co)             ends a suspended task (coroutine.close): a wake-up
--                              still on its way to it (a timer's) is dropped
--   task.queue([max])          FIFO between tasks: q:push(v), q:pop([timeout_ms])
--                              (nil, "ETIMEDOUT" / nil, "ECLOSED"), q:close(), #q,
--                              q:waiting() (pops waiting: the next push is theirs)
--   task.all(fns)              inside a task: run fns concurrently, wait for all,
--                              return their first results in order; one that
--                              raises is done too, its result nil and its error
--                              logged with its traceback, as a task's is
--   task.pace()                inside a task: once the loop has been busy for
--                              task.pace_ms (2) since it last polled for I/O, or
--                              while other tasks wait here, waits its turn after
--                              the next poll (each poll gives the waiting tasks
--                              task.pace_ms of work, or a tenth of what the
--                              poll's I/O took if that is more, first come first
--                              served, at least one task); returns whether it
--                              waited.
--                              Work that comes in bursts (the HTTP server paces
--                              every request, fetch every response) so takes
--                              turns with the I/O of live calls instead of
--                              holding it up. Outside a task: false at once.
local M = { pace_ms = 2 }

local unpack, pack = table.unpack, table.pack
-- Loaded now, not when an error is first reported: a task that fails deep in
-- nested resumes (a C stack overflow) could not load it then, and the
-- loader's error took the place of the task's.
local log = require "callagent.log"
local ctimer = require "callagent.core.timer"

local function report(co, err)
  local fields = { error = tostring(err), traceback = debug.traceback(co) }
  if not pcall(log.error, "uncaught error in task", fields) then
    -- Too deep in nested resumes to log here: from the loop, at once.
    ctimer.start(0, 0, function()
      log.error("uncaught error in task", fields)
    end)
  end
end

-- xpcall's handler in task.all: the error and where it was raised.
local function caught(err)
  return { err = err, traceback = debug.traceback(nil, 2) }
end

-- Tasks ended by M.close: a wake-up that comes for one later is no error.
local closed = setmetatable({}, { __mode = "k" })

function M.close(co)
  -- Marked before the close, whose to-be-closed variables may wake it; not
  -- when coroutine.close refuses it (running, or resuming another): it
  -- goes on, and its wake-ups are still its own.
  local st = coroutine.status(co)
  if st == "suspended" or st == "dead" then
    closed[co] = true
  end
  return coroutine.close(co)
end

function M.resume(co, ...)
  if closed[co] then
    return false, "the task was closed"
  end
  local ok, err = coroutine.resume(co, ...)
  if not ok then
    report(co, err)
  end
  return ok, err
end

function M.spawn(fn, ...)
  local co = coroutine.create(fn)
  M.resume(co, ...)
  return co
end

function M.running()
  local co, main = coroutine.running()
  if main then
    return nil
  end
  return co
end

local function must_be_in_task(what)
  local co, main = coroutine.running()
  if main then
    error(what .. " must be called inside a task (see callagent.task.spawn)", 3)
  end
  return co
end

function M.await(start)
  local co = must_be_in_task("this call")
  local done, waiting, results = false, false, nil
  start(function(...)
    if done then
      return
    end
    done = true
    if waiting then
      M.resume(co, ...)
    else
      results = pack(...)
    end
  end)
  if done then
    return unpack(results, 1, results.n)
  end
  waiting = true
  local r = pack(pcall(coroutine.yield))
  -- Whoever resumed it (done, or a task.resume from elsewhere), this wait is
  -- over: a late done() must not resume the coroutine, which has moved on
  -- (to another wait it would wake with the wrong values, or it has ended).
  -- So too when the yield itself failed (e.g. across a C call).
  done = true
  if not r[1] then
    error(r[2], 0)
  end
  return unpack(r, 2, r.n)
end

function M.wait_in(list, timeout_ms, entry)
  local t
  return M.await(function(done)
    local function wake(...)
      if t then
        t:stop()
      end
      done(...)
    end
    local w = wake
    if entry then
      entry.wake, w = wake, entry
    end
    list[#list + 1] = w
    if timeout_ms then
      t = require("callagent.timer").after(timeout_ms, function()
        for i, x in ipairs(list) do
          if x == w then
            table.remove(list, i)
            break
          end
        end
        done(nil, "ETIMEDOUT")
      end)
    end
  end)
end

-- Queue ----------------------------------------------------------------------

local Queue = {}
Queue.__index = Queue
Queue.__len = function(q)
  return q.last - q.first + 1
end

function M.queue(max)
  return setmetatable({ first = 1, last = 0, items = {}, waiters = {}, max = max, closed = false }, Queue)
end

--- Pushes v (not nil); wakes one waiting pop. Returns false when the queue is
-- closed or full (max items).
function Queue:push(v)
  if self.closed then
    return false
  end
  local w = table.remove(self.waiters, 1)
  if w then
    w(v)
    return true
  end
  if self.max and (self.last - self.first + 1) >= self.max then
    return false
  end
  self.last = self.last + 1
  self.items[self.last] = v
  return true
end

--- Takes the oldest item, waiting up to timeout_ms (nil: forever) inside a task.
function Queue:pop(timeout_ms)
  if self.first <= self.last then
    local v = self.items[self.first]
    self.items[self.first] = nil
    self.first = self.first + 1
    return v
  end
  if self.closed then
    return nil, "ECLOSED"
  end
  return M.wait_in(self.waiters, timeout_ms)
end

--- How many pops wait: while any does, a push hands its value to the first
-- of them, whatever max, and the queue stays empty.
function Queue:waiting()
  return #self.waiters
end

--- Closes the queue: waiting pops get nil, "ECLOSED"; items already in it can
-- still be popped.
function Queue:close()
  self.closed = true
  local ws = self.waiters
  self.waiters = {}
  for _, w in ipairs(ws) do
    w(nil, "ECLOSED")
  end
end

-- pace -----------------------------------------------------------------------

-- Tasks waiting for their turn, first come first served: a wake function each.
local paced = { first = 1, last = 0 }
local scheduled = false
local core -- callagent.core, required on first use

-- After a poll: wake the tasks that waited before it, for up to the budget
-- of work, and always at least one. The budget does not count the I/O the
-- poll brought, so a loop busy with live calls still gets on with the rest.
-- A saturated loop's passes take long (a second or more): there the budget
-- is a tenth of the pass's I/O instead, so the waiting tasks still get about
-- a tenth of its time rather than one task per pass, which starved the
-- set-up of hundreds of calls until their requests timed out. Not more: a
-- budget that grew with the I/O would make each pass longer than the last.
local function take_turns()
  scheduled = false
  local last, woken, t0 = paced.last, 0, core.loop_busy_ms()
  local budget = math.max(M.pace_ms, t0 / 10)
  while paced.first <= last and (woken == 0 or core.loop_busy_ms() - t0 < budget) do
    local wake = paced[paced.first]
    paced[paced.first] = nil
    paced.first = paced.first + 1
    woken = woken + 1
    wake()
  end
  if paced.first <= paced.last and not scheduled then
    scheduled = true
    core.after_poll(take_turns)
  end
end

function M.pace()
  if not coroutine.isyieldable() then -- the main thread, or inside a C call
    return false
  end
  core = core or require "callagent.core"
  if paced.first > paced.last and core.loop_busy_ms() < M.pace_ms then
    return false
  end
  M.await(function(done)
    paced.last = paced.last + 1
    paced[paced.last] = done
    if not scheduled then
      scheduled = true
      core.after_poll(take_turns)
    end
  end)
  return true
end

-- all ------------------------------------------------------------------------

function M.all(fns)
  must_be_in_task("task.all")
  local n, left, results = #fns, #fns, {}
  if n == 0 then
    return
  end
  local finish
  -- 1 to n, not ipairs: a nil member (an error, as a non-function is) must
  -- not leave the count short and the caller waiting forever.
  for i = 1, n do
    local fn = fns[i]
    M.spawn(function()
      local ok, r = xpcall(fn, caught)
      if ok then
        results[i] = r
      else
        log.error("uncaught error in task", { error = tostring(r.err), traceback = r.traceback })
      end
      left = left - 1
      if left == 0 and finish then
        finish()
      end
    end)
  end
  if left > 0 then
    M.await(function(done)
      finish = done
    end)
  end
  return unpack(results, 1, n)
end

return M
