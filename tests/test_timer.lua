local T = require "testing"
local timer = require "callagent.timer"
local task = require "callagent.task"

T.test("timer.after fires once after its delay", function()
  local fired, t0, at = 0, timer.now(), nil
  timer.after(30, function()
    fired = fired + 1
    at = timer.now()
  end)
  timer.sleep(80)
  T.eq(fired, 1)
  T.ge(at - t0, 29.5, "delay")
end)

T.test("a delay is never cut short by the loop's whole-millisecond clock", function()
  -- Other work wakes the loop every millisecond, as a busy server's does:
  -- the loop then checks its timers at every tick of its clock.
  local ticker = timer.every(1, function() end)
  T.defer(function()
    ticker:stop()
  end)
  local early, worst = 0, math.huge
  for i = 1, 60 do
    local t = timer.now()
    while timer.now() - t < (i % 10) / 10 do end -- start at varied points of a millisecond
    local t0 = timer.now()
    timer.sleep(2)
    local took = timer.now() - t0
    worst = math.min(worst, took)
    if took < 2 then
      early = early + 1
    end
  end
  T.eq(early, 0, string.format("sleeps of 2 ms that ended early (shortest %.3f ms)", worst))
end)

T.test("timer.every repeats until stopped", function()
  -- Not a count in a fixed time: a machine busy with other tests can hold
  -- this process off for most of 100 ms (2 firings seen once), and libuv
  -- does not fire the periods it missed. Four firings never come before
  -- four periods have passed.
  local n, t0 = 0, timer.now()
  local t = timer.every(10, function()
    n = n + 1
  end)
  local deadline = t0 + 5000
  while n < 4 and timer.now() < deadline do
    timer.sleep(5)
  end
  local took = timer.now() - t0
  t:stop()
  local seen = n
  T.ge(seen, 4, "it fired again and again")
  T.ge(took, 39.5, "four firings took four periods")
  timer.sleep(40)
  T.eq(n, seen, "no firing after stop")
  T.eq(t:active(), false)
  t:stop() -- idempotent
end)

T.test("stop before firing cancels the callback", function()
  local fired = false
  local t = timer.after(20, function()
    fired = true
  end)
  T.eq(t:active(), true)
  t:stop()
  timer.sleep(40)
  T.eq(fired, false)
end)

T.test("a timer that is not kept still fires after garbage collection", function()
  local fired = false
  timer.after(20, function()
    fired = true
  end)
  collectgarbage()
  collectgarbage()
  timer.sleep(50)
  T.eq(fired, true)
end)

T.test("timer.now is monotonic with sub-millisecond resolution", function()
  local a = timer.now()
  local b = timer.now()
  T.ge(b, a)
  T.ok(math.type(a) == "float")
  local t0 = timer.now()
  timer.sleep(25)
  T.ge(timer.now() - t0, 24.5)
end)

T.test("sleep outside a task is an error that says so", function()
  local ok, err = coroutine.resume(coroutine.create(function() end))
  T.ok(ok, err)
  -- Run the check on the main thread through a timer callback.
  local msg
  timer.after(0, function()
    local okk, e = pcall(timer.sleep, 1)
    msg = not okk and e
  end)
  T.wait_for(function()
    return msg ~= nil
  end)
  T.match(msg, "inside a task")
end)

T.test("an error in a timer callback is logged and the loop keeps running", function()
  timer.after(1, function()
    error("deliberate failure in callback")
  end)
  timer.sleep(20)
  local ok = false
  timer.after(1, function()
    ok = true
  end)
  timer.sleep(20)
  T.ok(ok, "later timers still fire")
end)

T.test("queue pop waits, times out, and closes", function()
  local q = task.queue()
  timer.after(10, function()
    q:push("a")
  end)
  T.eq(q:pop(1000), "a")
  local v, err = q:pop(20)
  T.eq(v, nil)
  T.eq(err, "ETIMEDOUT")
  q:push(1)
  q:push(2)
  T.eq(#q, 2)
  T.eq(q:pop(), 1)
  timer.after(5, function()
    q:close()
  end)
  T.eq(q:pop(), 2)
  local v2, err2 = q:pop()
  T.eq(v2, nil)
  T.eq(err2, "ECLOSED")
end)

T.test("task.all runs functions concurrently", function()
  -- Ordering, not a time limit: each function sees the other one start
  -- before it finishes, which only concurrent runs can do.
  local started = {}
  local a, b = task.all({
    function()
      started.a = true
      timer.sleep(40)
      return started.b and "a" or "a ran alone"
    end,
    function()
      started.b = true
      timer.sleep(40)
      return started.a and "b" or "b ran alone"
    end,
  })
  T.eq(a, "a")
  T.eq(b, "b")
end)

-- Keeps the loop busy for ms of CPU, without yielding.
local function burn(ms)
  local t = timer.now()
  while timer.now() - t < ms do
  end
end

T.test("task.pace waits only once the loop has been busy, then takes turns with polls, first come first served", function()
  local core = require "callagent.core"
  T.eq(task.pace_ms, 2, "the default budget")
  -- The budget is wall time: on a busy machine a descheduled test could pass
  -- 2 ms where it means to stay under. The cases that must not wait have
  -- 100 ms; those that must, more work than 2 ms.
  T.defer(function()
    task.pace_ms = 2
  end)
  task.pace_ms = 100
  local outside
  timer.after(0, function()
    outside = task.pace() -- a timer callback is not a task
  end)
  timer.sleep(5)
  T.eq(outside, false, "outside a task: no wait")
  T.eq(task.pace(), false, "just after a poll, with no one waiting: no wait")
  task.pace_ms = 2
  burn(5)
  local polls0 = core.loop_stats().iterations
  T.eq(task.pace(), true, "after 5 ms of work: it waits")
  T.gt(core.loop_stats().iterations, polls0, "and the loop polled meanwhile")

  -- Five tasks each doing 3 ms of work once they have their turn: one turn
  -- per poll, in the order they came. The first waits as the loop is
  -- already past its budget; the others, as someone is waiting before them.
  burn(3)
  local order, polls, waited, done = {}, {}, {}, 0
  for i = 1, 5 do
    task.spawn(function()
      waited[i] = task.pace()
      order[#order + 1] = i
      polls[#polls + 1] = core.loop_stats().iterations
      burn(3)
      done = done + 1
    end)
  end
  T.eq(done, 0, "none ran before the loop polled")
  local deadline = timer.now() + 5000
  while done < 5 and timer.now() < deadline do
    timer.sleep(1)
  end
  T.eq(order, { 1, 2, 3, 4, 5 }, "first come first served")
  T.eq(waited, { true, true, true, true, true })
  for i = 2, 5 do
    T.gt(polls[i], polls[i - 1], "turn " .. i .. " came after another poll")
  end

  -- Under the budget, the waiting ones all go after one poll.
  burn(3)
  local light = {}
  for i = 1, 5 do
    task.spawn(function()
      T.eq(task.pace(), true, "light task " .. i .. " waits behind the first")
      light[#light + 1] = core.loop_stats().iterations
    end)
  end
  task.pace_ms = 100
  deadline = timer.now() + 5000
  while #light < 5 and timer.now() < deadline do
    timer.sleep(1)
  end
  T.eq(#light, 5)
  T.eq(light[5], light[1], "light tasks share one turn")
end)

T.run()
