-- Waiting on a fake's state from a test: objects carry a `_waiters` list and an
-- `_ended` flag; the fake calls notify(obj) whenever obj's state changes.
local task = require "callagent.task"

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
  return task.wait_in(obj._waiters, timeout_ms, { check = check })
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
  -- In place: a waiter that times out takes itself out of this same list.
  for i = 1, #list do
    list[i] = keep[i]
  end
  for _, r in ipairs(ready) do
    r[1].wake(r[2], r[3])
  end
end

return M
