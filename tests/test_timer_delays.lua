-- callagent.timer with delays out of range: cut to 0..timer.MAX_MS, never an error.
local T = require "testing"
local timer = require "callagent.timer"

T.test("a delay of math.huge or 1e300 is effectively never, not an error", function()
  -- math.floor(math.huge) has no integer representation: after, every and
  -- sleep raised it.
  local fired = 0
  local timers = {}
  for _, ms in ipairs({ math.huge, 1e300, 2 ^ 60, math.maxinteger, timer.MAX_MS }) do
    timers[#timers + 1] = timer.after(ms, function()
      fired = fired + 1
    end)
    timers[#timers + 1] = timer.every(ms, function()
      fired = fired + 1
    end)
  end
  T.defer(function()
    for _, t in ipairs(timers) do
      t:stop()
    end
  end)
  local slept
  require("callagent.task").spawn(function()
    timer.sleep(math.huge)
    slept = true
  end)
  timer.sleep(30)
  for i, t in ipairs(timers) do
    T.eq(t:active(), true, "timer " .. i .. " still waits")
  end
  T.eq(fired, 0)
  T.eq(slept, nil, "sleep(math.huge) still sleeping")
  T.eq(timer.MAX_MS, 2 ^ 53, "the documented limit")
end)

T.test("a delay of NaN, -math.huge or below 0 is 0; every's period is at least 1 ms", function()
  local fired = {}
  for _, ms in ipairs({ 0 / 0, -math.huge, -5 }) do
    timer.after(ms, function()
      fired[#fired + 1] = ms
    end)
  end
  local n = 0
  local t = timer.every(0 / 0, function()
    n = n + 1
  end)
  T.defer(function()
    t:stop()
  end)
  timer.sleep(50)
  T.eq(#fired, 3)
  T.gt(n, 0, "every(NaN) fires")
end)

T.test("a delay that is not a number or a callback that is not a function is an error naming the call", function()
  -- They were "attempt to compare number with string" and "bad argument #3
  -- to 'start'": neither said which call, nor what was wrong with it.
  local cases = {
    { timer.after, "5", function() end, "timer%.after: the delay must be a number of milliseconds, not string" },
    { timer.every, nil, function() end, "timer%.every: the delay must be a number of milliseconds, not nil" },
    { timer.after, 5, nil, "timer%.after: the callback must be a function, not nil" },
    { timer.every, 5, "x", "timer%.every: the callback must be a function, not string" },
  }
  for i, c in ipairs(cases) do
    local ok, err = pcall(c[1], c[2], c[3])
    T.eq(ok, false, "case " .. i)
    T.match(err, c[4])
  end
  local ok, err = pcall(timer.sleep, {})
  T.eq(ok, false)
  T.match(err, "timer%.sleep: the delay must be a number of milliseconds, not table")
end)

T.run()
