-- Waiting on a fake's state from a test: objects carry a `_waiters` list and an
-- `_ended` flag; the fake calls notify(obj) whenever obj's state changes.
local task = require "callagent.task"
local timer = require "callagent.timer"

local M = {}

-- Inside a task: returns check() once it is truthy, rechecked on every
-- notify(obj); nil, "ETIMEDOUT" after timeout_ms (nil: no limit); nil,
-- "ECLOSED" when obj ends first.
function M.wait_for(obj, check, timeout_ms)
  local v = check()
  if v then
    return v
  end
  if obj._ended then
    return nil, "ECLOSED"
  end
  return task.await(function(done)
    local w = {}
    local t
    w.check = check
    w.done = function(a, b)
      if t then
        t:stop()
      end
      done(a, b)
    end
    local list = obj._waiters
    list[#list + 1] = w
    if timeout_ms then
      t = timer.after(timeout_ms, function()
        for i, x in ipairs(obj._waiters) do
          if x == w then
            table.remove(obj._waiters, i)
            break
          end
        end
        done(nil, "ETIMEDOUT")
      end)
    end
  end)
end

-- Wakes the waiters whose check now holds; once obj has ended, the rest too.
function M.notify(obj)
  local list = obj._waiters
  if #list == 0 then
    return
  end
  local ready, keep = {}, {}
  for _, w in ipairs(list) do
    local v = w.check()
    if v then
      ready[#ready + 1] = { w, v }
    elseif obj._ended then
      ready[#ready + 1] = { w, nil, "ECLOSED" }
    else
      keep[#keep + 1] = w
    end
  end
  obj._waiters = keep
  for _, r in ipairs(ready) do
    r[1].done(r[2], r[3])
  end
end

return M
