--- callagent.store.memory: the call store kept in memory (lost on exit).
--
-- For tests and throwaway runs (store.backend = "memory"). The durable default
-- is callagent.store.sqlite; both implement the interface documented in
-- lua/callagent/store/init.lua, and return copies, never live objects.
local core = require "callagent.core"

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
    notes = {}, -- the notifications in the order recorded
    idempotency = {},
  }, Store)
end

function Store:insert_call(call)
  self.seq = self.seq + 1
  local c = copy(call)
  c._idempotency = nil -- kept apart, as the sqlite store does
  c._seq = self.seq
  c._created = core.time() -- when it was stored, as the sqlite store keeps it: prune's clock
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
  out._seq, out._created = nil, nil
  return out
end

function Store:transcript(id)
  local c = self.calls[id]
  return c and copy(c.transcript) or {}
end

function Store:add_attempt(id, attempt)
  local c = self.calls[id]
  if c then
    -- Attempt n, as the sqlite store keys it: written again, it replaces
    -- the one before (the engine rewrites a call whole after a refusal).
    c.attempts[math.tointeger(attempt.n) or #c.attempts + 1] = copy(attempt)
  end
  return true
end

--- nil, "ENOENT: ..." for an attempt (or call) it does not have, as the
--- sqlite store answers.
function Store:update_attempt(id, n, fields)
  local c = self.calls[id]
  local a = c and c.attempts[n]
  if not a then
    return nil, "ENOENT: no attempt " .. tostring(n) .. " of call " .. tostring(id)
  end
  for k, v in pairs(fields) do
    a[k] = copy(v)
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
--- page); nil, "ECURSOR: ..." for a cursor that is not one. A limit of 0 (or
--- less) is an empty page, without a next one.
function Store:list_calls(opts)
  opts = opts or {}
  local limit = opts.limit or 20
  local before = M.cursor_seq(opts.cursor)
  if before == false then
    return nil, "ECURSOR: not a cursor of this list"
  end
  if limit < 1 then
    return {}
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
    x._seq, x._created = nil, nil
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
  self.seq = self.seq + 1
  local n = { key = key, call_id = call_id, payload = payload, sent = false, tries = 0,
    created = core.time(), _seq = self.seq }
  self.notifications[key] = n
  -- In the order recorded (_seq ascending): what a page walks.
  self.notes[#self.notes + 1] = n
  return true
end

--- under: for state "refused", the fingerprint of the config it was refused
-- under (for its token or address), which requeue_refused compares. As the
-- sqlite store: a refused one marked refused again takes the latest; a sent
-- or refused one stays so.
function Store:mark_notified(key, state, err, under)
  assert(state == "sent" or state == "failed" or state == "refused", "mark_notified: state must be sent, failed or refused")
  local n = self.notifications[key]
  if n then
    n.tries = n.tries + 1
    if not n.sent then
      n.sent = state ~= "failed"
      if state == "refused" then
        n.refused, n.refused_under = true, under
      end
    elseif n.refused and state == "refused" then
      n.refused_under = under
    end
    n.last_error = err
  end
  return true
end

--- Sends again those refused under another config than fingerprint's:
-- pending again, in their place. Returns how many.
function Store:requeue_refused(fingerprint)
  local count = 0
  for _, n in ipairs(self.notes) do
    if n.refused and n.refused_under ~= nil and n.refused_under ~= fingerprint then
      n.sent, n.refused, n.refused_under = false, nil, nil
      count = count + 1
    end
  end
  return count
end

local function pending_copy(n)
  local x = copy(n)
  x._seq = nil
  return x
end

--- Neither sent nor refused, oldest first; opts as the sqlite store takes
-- them (limit, after: a page and the next one's cursor; keys).
function Store:pending_notifications(opts)
  opts = opts or {}
  local out = {}
  if opts.keys then
    local found = {}
    for _, key in ipairs(opts.keys) do
      local n = self.notifications[key]
      if n and not n.sent and not found[n] then
        found[n] = true
        out[#out + 1] = n
      end
    end
    table.sort(out, function(a, b)
      return a._seq < b._seq
    end)
    for i, n in ipairs(out) do
      out[i] = pending_copy(n)
    end
    return out
  end
  local notes, limit = self.notes, opts.limit or math.huge
  if limit < 1 then
    return out
  end
  -- The first one after the cursor (a _seq): notes is in _seq order.
  local lo, hi = 1, #notes + 1
  local after = opts.after or 0
  while lo < hi do
    local mid = (lo + hi) // 2
    if notes[mid]._seq <= after then
      lo = mid + 1
    else
      hi = mid
    end
  end
  local next_cursor
  for i = lo, #notes do
    local n = notes[i]
    if not n.sent then
      if #out == limit then
        next_cursor = out[#out]._seq
        break
      end
      out[#out + 1] = n
    end
  end
  for i, n in ipairs(out) do
    out[i] = pending_copy(n)
  end
  return out, next_cursor
end

local ACTIVE = { queued = true, dialing = true, in_progress = true }

--- Removes finished calls stored more than days ago, with their Idempotency-Keys,
-- and notifications that old: a long-running process does not keep every call.
function Store:prune(days)
  local now = core.time()
  local cutoff = now - (days or 30) * 86400.0
  if cutoff > now then
    return 0
  end
  local removed, order = 0, {}
  for _, id in ipairs(self.order) do
    local c = self.calls[id]
    if c and c._created < cutoff and not ACTIVE[c.status] then
      self.calls[id] = nil
      self.retries[id] = nil
      removed = removed + 1
    elseif c then
      order[#order + 1] = id
    end
  end
  self.order = order
  for key, i in pairs(self.idempotency) do
    if not self.calls[i.call_id] then
      self.idempotency[key] = nil
    end
  end
  local notes = {}
  for _, n in ipairs(self.notes) do
    if n.created < cutoff then
      self.notifications[n.key] = nil
    else
      notes[#notes + 1] = n
    end
  end
  self.notes = notes
  return removed
end

function Store:close() end

M.NULL = setmetatable({}, { __name = "store.NULL" })

return M
