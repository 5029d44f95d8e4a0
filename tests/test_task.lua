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

T.run()
