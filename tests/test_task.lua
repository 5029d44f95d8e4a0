-- callagent.task through a child program: task.all when one of its
-- functions raises.
local T = require "testing"

T.test("task.all: a function that raises is done, its result nil and its error logged with a traceback", function()
  -- The waiting task used to be left suspended for good: the app printed
  -- nothing and simply ran out of work.
  local code, _, p = T.run_app(nil, nil, {
    source = [[
local task = require "callagent.task"
local timer = require "callagent.timer"
task.spawn(function()
  local a, b, c, d = task.all({
    function() return "one" end,
    function() error("early boom") end,
    function() timer.sleep(5); error(setmetatable({}, { __tostring = function() return "late boom" end })) end,
    function() timer.sleep(10); return "four" end,
  })
  print(a, b, c, d)
end)
]],
  })
  T.eq(code, 0, p.errtext())
  T.eq(p.out, { "one\tnil\tnil\tfour" })
  local err = p.errtext()
  T.match(err, 'ERROR uncaught error in task error="[^"]*: early boom" traceback="stack traceback:\\n')
  T.match(err, 'ERROR uncaught error in task error="late boom" traceback="stack traceback:\\n')
  T.eq(#p.err, 2, "one line per error")
end)

T.test("task.all: a nil member is an error like a non-function's, and all still returns", function()
  -- ipairs stopped at the hole: the count never reached 0 and the caller
  -- waited for good.
  local code, _, p = T.run_app(nil, nil, {
    source = [[
local task = require "callagent.task"
task.spawn(function()
  print(task.all({ function() return 1 end, nil, function() return 3 end }))
  print(task.all({ function() return 1 end, 42 }))
end)
]],
  })
  T.eq(code, 0, p.errtext())
  T.eq(p.out, { "1\tnil\t3", "1\tnil" })
  T.match(p.errtext(), 'uncaught error in task error="attempt to call a nil value"')
  T.match(p.errtext(), 'uncaught error in task error="attempt to call a number value"')
end)

T.test("await: a done() that comes after the task was resumed from elsewhere is ignored", function()
  -- It used to resume the coroutine again: an error about a dead coroutine,
  -- or, had the task been waiting elsewhere, a wake with the wrong values.
  local code, _, p = T.run_app(nil, nil, {
    source = [[
local task = require "callagent.task"
local timer = require "callagent.timer"
local co = task.spawn(function()
  print("first", task.await(function(done) timer.after(30, function() done("late") end) end))
  print("second", task.await(function(done) timer.after(60, function() done("mine") end) end))
end)
timer.after(5, function() task.resume(co, "external") end)
]],
  })
  T.eq(code, 0, p.errtext())
  T.eq(p.out, { "first\texternal", "second\tmine" })
  T.eq(p.err, {}, "nothing logged")
end)

T.test("a task that fails deep in nested spawns is logged with its own error, once", function()
  -- Loading callagent.log to report it overflowed the C stack in turn, and
  -- the loader's error was logged instead of the task's.
  local code, _, p = T.run_app(nil, nil, {
    source = [[
local task = require "callagent.task"
local depth = 0
local function f(n)
  depth = n
  if n < 1000 then task.spawn(f, n + 1) end
end
task.spawn(f, 1)
print(depth > 100)
]],
  })
  T.eq(code, 0, p.errtext())
  T.eq(p.out, { "true" })
  T.eq(#p.err, 1, p.errtext())
  T.match(p.err[1], 'ERROR uncaught error in task error="C stack overflow"')
end)

T.test("task.close of a task that is running raises, and the task still wakes from its waits", function()
  -- The task was marked closed before coroutine.close refused it: every
  -- later wake-up was dropped, and it waited for good without a word.
  local code, _, p = T.run_app(nil, nil, {
    source = [[
local task = require "callagent.task"
local timer = require "callagent.timer"
task.spawn(function()
  print(pcall(task.close, task.running()))
  timer.sleep(5)
  print("woke")
end)
]],
  })
  T.eq(code, 0, p.errtext())
  T.match(p.out[1] or "", "^false\t.*cannot close a running coroutine$")
  T.eq(p.out[2], "woke")
end)

T.run()
