--- callagent.store.memory: the call store kept in memory (lost on exit).
--
-- For tests and throwaway runs (store.backend = "memory"). The durable default
-- is callagent.store.sqlite; both implement the interface documented in
-- lua/callagent/store/init.lua, and return copies, never live objects.
local M = {}
local Store = {}
Store.__index = Store

local function copy(v)
  if type(v) ~= "table" then
    return v
  end
  local out = {}
  for k, x in pairs(v) do
    out[k] = copy(x)
  end
  return setmetatable(out, getmetatable(v))
end

function M.open()
  return setmetatable({
    calls = {},
    order = {},
    seq = 0,
    retries = {},
    notifications = {},
    idempotency = {},
  }, Store)
end

function Store:insert_call(call)
  self.seq = self.seq + 1
  local c = copy(call)
  c._idempotency = nil -- kept apart, as the sqlite store does
  c._seq = self.seq
  c.attempts = c.attempts or {}
  c.transcript = c.transcript or {}
  c.events = c.events or {}
  self.calls[call.id] = c
  self.order[#self.order + 1] = call.id
  local idem = call._idempotency
  if idem then
    self.idempotency[idem.key] = { call_id = call.id, fingerprint = idem.fingerprint }
  end
  return true
end

function Store:find_idempotent(key)
  return copy(self.idempotency[key])
end

function Store:update_call(id, fields)
  local c = self.calls[id]
  if not c then
    return nil, "ENOENT: no call " .. tostring(id)
  end
  for k, v in pairs(fields) do
    if v == M.NULL then
      c[k] = nil
    else
      c[k] = copy(v)
    end
  end
  return true
end

function Store:get_call(id)
  local c = self.calls[id]
  if not c then
    return nil
  end
  local out = copy(c)
  out._seq = nil
  return out
end

function Store:transcript(id)
  local c = self.calls[id]
  return c and copy(c.transcript) or {}
end

function Store:add_attempt(id, attempt)
  local c = self.calls[id]
  if c then
    c.attempts[#c.attempts + 1] = copy(attempt)
  end
  return true
end

function Store:update_attempt(id, n, fields)
  local c = self.calls[id]
  local a = c and c.attempts[n]
  if a then
    for k, v in pairs(fields) do
      a[k] = copy(v)
    end
  end
  return true
end

local function append(self, id, list, v)
  local c = self.calls[id]
  if c then
    c[list][#c[list] + 1] = copy(v)
  end
  return true
end

function Store:add_transcript(id, line)
  return append(self, id, "transcript", line)
end

function Store:add_event(id, event)
  return append(self, id, "events", event)
end

--- The call sequence number a list_calls cursor of the built-in backends
--- stands for: nil without one (or ""), false for what is no such cursor.
function M.cursor_seq(cursor)
  if cursor == nil or cursor == "" then
    return nil
  end
  return type(cursor) == "string" and #cursor <= 18 and cursor:match("^%d+$") and math.tointeger(tonumber(cursor)) or false
end

--- Newest first. opts: status, limit, cursor (opaque string from a previous
--- page); nil, "ECURSOR: ..." for a cursor that is not one.
function Store:list_calls(opts)
  opts = opts or {}
  local limit = opts.limit or 20
  local before = M.cursor_seq(opts.cursor)
  if before == false then
    return nil, "ECURSOR: not a cursor of this list"
  end
  before = before or math.huge
  local out, next_cursor = {}, nil
  for i = #self.order, 1, -1 do
    local c = self.calls[self.order[i]]
    if c and c._seq < before and (not opts.status or c.status == opts.status) then
      if #out == limit then
        next_cursor = tostring(out[#out]._seq)
        break
      end
      out[#out + 1] = c
    end
  end
  for i, c in ipairs(out) do
    local x = copy(c)
    x._seq = nil
    out[i] = x
  end
  return out, next_cursor
end

function Store:active_calls()
  local out = {}
  for _, id in ipairs(self.order) do
    local c = self.calls[id]
    if c and (c.status == "queued" or c.status == "dialing" or c.status == "in_progress") then
      out[#out + 1] = self:get_call(id)
    end
  end
  return out
end

function Store:set_retry(id, due_at)
  self.retries[id] = due_at
  return true
end

function Store:clear_retry(id)
  self.retries[id] = nil
  return true
end

function Store:due_retries()
  local out = {}
  for id, due in pairs(self.retries) do
    out[#out + 1] = { call_id = id, due_at = due }
  end
  table.sort(out, function(a, b)
    return a.due_at < b.due_at
  end)
  return out
end

function Store:add_notification(key, call_id, payload)
  if self.notifications[key] then
    return false
  end
  self.notifications[key] = { key = key, call_id = call_id, payload = payload, sent = false, tries = 0 }
  return true
end

function Store:mark_notified(key, state, err)
  assert(state == "sent" or state == "failed" or state == "refused", "mark_notified: state must be sent, failed or refused")
  local n = self.notifications[key]
  if n then
    n.tries = n.tries + 1
    n.sent = n.sent or state ~= "failed"
    n.last_error = err
  end
  return true
end

function Store:pending_notifications()
  local out = {}
  for _, n in pairs(self.notifications) do
    if not n.sent then
      out[#out + 1] = copy(n)
    end
  end
  return out
end

function Store:prune()
  return 0
end

function Store:close() end

M.NULL = setmetatable({}, { __name = "store.NULL" })

return M
