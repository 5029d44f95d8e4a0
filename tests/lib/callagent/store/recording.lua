--- A store backend for tests (store.backend = "recording"): the memory store,
-- with every write recorded in M.writes as {op, args, batch}: batch is the
-- number of the store:batch it ran in, nil outside one. While M.fail_reads is
-- true, get_call and list_calls fail as a disk would: nil, "EIO: ...". While
-- M.raise is a function, each method call asks it first: raise(op, args)
-- returning a message makes that call raise it (a backend that raises on a
-- full disk, say), before it does anything.
-- While M.refuse is one, refuse(op, args) returning an error makes that call
-- return nil, err instead (a write the store did not take), doing nothing.
local memory = require "callagent.store.memory"

local M = { writes = {} }
local READS = { get_call = true, list_calls = true }

local WRITES = {
  insert_call = true, update_call = true, add_attempt = true, update_attempt = true, add_transcript = true,
  add_event = true, set_retry = true, clear_retry = true, add_notification = true, mark_notified = true,
}

function M.open(cfg)
  local inner = assert(memory.open(cfg))
  local batches, current = 0, nil
  local proxy = {}
  function proxy.batch(_, fn)
    batches = batches + 1
    local outer = current
    current = current or batches
    local ok, err = pcall(fn)
    current = outer
    if not ok then
      error(err, 0)
    end
    return true
  end
  return setmetatable(proxy, {
    __index = function(_, k)
      local f = inner[k]
      if type(f) ~= "function" then
        return f
      end
      return function(_, ...)
        if WRITES[k] then
          -- As they were then: the engine goes on changing its live tables.
          local args = table.pack(...)
          for i = 1, args.n do
            if type(args[i]) == "table" then
              local c = {}
              for kk, v in pairs(args[i]) do
                c[kk] = v
              end
              args[i] = c
            end
          end
          M.writes[#M.writes + 1] = { op = k, args = args, batch = current }
        end
        local boom = M.raise and M.raise(k, table.pack(...))
        if boom then
          error(boom, 0)
        end
        local refused = M.refuse and M.refuse(k, table.pack(...))
        if refused then
          return nil, refused
        end
        if READS[k] and M.fail_reads then
          return nil, "EIO: disk I/O error"
        end
        return f(inner, ...)
      end
    end,
  })
end

return M
