--- callagent.notify: tells the hooks endpoint (Clawdbot) how a call ended.
--
--   POST {notify.hooksUrl}/agent
--   Authorization: Bearer {notify.hooksToken}
--   Idempotency-Key: {callId}:{status}
--   {"message": "...", "name": "CallAgent", "sessionKey": ..., "wakeMode": "now",
--    "deliver": true, "data": {callId, status, to, calleeName, report, metadata,
--    attempts, endReason}}
--
-- Sent once per call, on its final state, from a task of its own: it never
-- blocks or breaks the call. Network errors and 5xx answers are retried with
-- backoff (1 s, 2 s, 4 s ... up to `attempts` tries); 4xx (but 408, 429) are a
-- final no. Every notification is recorded in the store first (record, in
-- the commit of the call's final status), so one not yet
-- delivered - cut short by a restart, or out of tries - is sent again after a
-- restart, and every sweep_ms (5 minutes) while the app runs, but never one
-- the receiver refused; the Idempotency-Key lets the receiver drop duplicates.
-- But one refused with 401, 403 or 404, or redirected (3xx), was refused for
-- callagent's token or address, not for itself: it is recorded with the fingerprint of the
-- (hooksUrl, hooksToken) it went under (a SHA-256, never the token), and a
-- start under another fingerprint sends it again, once (refused again, it is
-- refused under the new one).
-- A sweep ends at the first notification out of tries (the receiver is down);
-- those that ran out of tries go last in the next one. A sweep (the one at
-- start too) walks the backlog a page of PAGE rows at a time, oldest first,
-- never whole: a receiver down for a day is thousands of rows, and what is
-- held at once is a page and the RESUME_AT_ONCE on their way.
local crypto = require "callagent.crypto"
local fetch = require "callagent.fetch"
local http = require "callagent.http" -- http.cut: what a log line quotes of a Location
local json = require "callagent.json"
local log = require "callagent.log"
local task = require "callagent.task"
local timer = require "callagent.timer"
local url = require "callagent.url"

local M = {}
local Notifier = {}
Notifier.__index = Notifier

-- cfg: the notify settings (hooksUrl, hooksToken, ...), or a function that
-- returns them, read at each try (an app's: app.config.notify as it is
-- then, its fields changed or the table replaced).
function M.new(cfg, store, opts)
  opts = opts or {}
  return setmetatable({
    get_cfg = type(cfg) == "function" and cfg or function()
      return cfg
    end,
    store = store,
    attempts = opts.attempts or 6,
    base_delay_ms = opts.base_delay_ms or 1000,
    timeout_ms = opts.timeout_ms or 10000,
    sweep_ms = opts.sweep_ms or 300000,
    in_flight = {},
    -- key -> when it last ran out of tries (a count, not a time): a sweep
    -- sends those last, the longest untried first.
    ran_out = {},
    ran_outs = 0,
    -- The same keys in that order (appended as they run out, so no sweep
    -- sorts them: 30,000 took 93 ms of the event loop), each with its
    -- count then; an entry is stale once ran_out[key] holds another (sent,
    -- refused, out of tries again, pruned), and stale ones are dropped
    -- between sweeps once they are the most (_sweep).
    ran_out_keys = {},
    ran_out_ranks = {},
    n_ran_out = 0, -- keys in ran_out
    -- key -> true: delivered, but the store did not take its "sent" (a
    -- full disk): a sweep marks it again instead of sending it again.
    unmarked = {},
    stats = { pages = 0, most_rows = 0 }, -- backlog reads: pages, the most rows one returned
    requests = 0, -- requests waiting for their answer (drain)
    -- What stop() ends, so that nothing of the notifier keeps the program
    -- running after it: the requests on their way (fetch handles), and
    -- the retries waiting their turn (task.wait_in's list).
    on_way = {},
    sleepers = {},
  }, Notifier)
end

--- The settings as they are now.
function Notifier:conf()
  return self.get_cfg() or {}
end

function M.message(view)
  local who = view.to .. (view.calleeName and (" (" .. view.calleeName .. ")") or "")
  local r = view.report
  local parts = { "Call to " .. who .. " " .. view.status }
  if r then
    parts[1] = parts[1] .. ": " .. r.outcome
    if r.summary and r.summary ~= "" then
      parts[#parts + 1] = "Summary: " .. r.summary
    end
    if r.nextSteps and #r.nextSteps > 0 then
      parts[#parts + 1] = "Next steps: " .. table.concat(r.nextSteps, "; ")
    end
  else
    local why = view.endReason or view.lastError
    if why then
      parts[1] = parts[1] .. " (" .. tostring(why) .. ")"
    end
    parts[#parts + 1] = "No report was filed."
  end
  parts[#parts + 1] = "Call id: " .. view.callId
  return table.concat(parts, "\n")
end

function M.payload(cfg, view)
  return {
    message = M.message(view),
    name = "CallAgent",
    sessionKey = cfg.sessionKey,
    wakeMode = "now",
    deliver = true,
    data = {
      callId = view.callId,
      status = view.status,
      to = view.to,
      calleeName = view.calleeName,
      report = view.report or json.null,
      metadata = view.metadata,
      attempts = #(view.attempts or {}),
      endReason = view.endReason,
    },
  }
end

function Notifier:enabled()
  return self:conf().hooksUrl ~= nil and self:conf().hooksToken ~= nil
end

-- Where a notification goes: "/agent" on the path, before a query the URL
-- may have.
function Notifier:_target()
  local path, query = self:conf().hooksUrl:match("^([^?#]*)(.*)$")
  return path:gsub("/+$", "") .. "/agent" .. query
end

--- What notifications are sent under: the SHA-256 (hex) of where they go
-- and the token, never the token itself. A refusal for the credentials or
-- the address is recorded with it. Of the settings as they are now, or as
-- a request went (target, token): app.config may be changed after start,
-- and a refusal recorded under the start's settings, not those it was
-- refused under, was never sent again by a start with the start's ones.
function Notifier:fingerprint(target, token)
  target, token = target or self:_target(), token or self:conf().hooksToken
  local under = target .. "\0" .. token
  if self._fingerprint_of ~= under then
    self._fingerprint_of = under
    self._fingerprint = crypto.to_hex(crypto.sha256("callagent notify\0" .. under))
  end
  return self._fingerprint
end

-- The answers that refuse callagent's token (401, 403) or address (404, and a
-- redirect: 3xx), not the notification: another token or address may be
-- taken. Other 4xx (400, 413, 422 ...) refuse the payload, which no config
-- change alters.
local function refused_config(status)
  return status == 401 or status == 403 or status == 404 or (status >= 300 and status < 400)
end

--- Records the notification of a call's end without sending it: the engine
-- does this in the commit of the final status, so that a stop between the
-- two cannot lose it. Returns what send takes, or nil (notifications off,
-- or already recorded).
function Notifier:record(view)
  if not self:enabled() then
    return nil
  end
  local key = view.callId .. ":" .. view.status
  local payload = M.payload(self:conf(), view)
  local ok, body = pcall(json.encode, payload)
  if not ok then
    -- Runs in the commit of the final status: it must not raise (the API
    -- and the bridge check what they take; this is the last line).
    log.error("notification payload could not be encoded: sent without metadata and report data",
      { call = view.callId, error = body })
    payload.data.metadata = nil
    if type(payload.data.report) == "table" then
      local r = payload.data.report
      payload.data.report = { summary = r.summary, outcome = r.outcome, outcomeRaw = r.outcomeRaw }
    end
    body = json.encode(payload)
  end
  local added = self.store:add_notification(key, view.callId, body)
  if not added then
    return nil -- already recorded (sent or pending); or not written (nil): not sent either
  end
  if self.walking then
    -- The caller's to send, not the walk's: it may come to it before send.
    self.walking.recorded[key] = true
  end
  return key, body
end

--- Sends (again) a recorded notification, retrying in the background.
function Notifier:send(key, body)
  if self.in_flight[key] then
    return
  end
  self.in_flight[key] = true
  task.spawn(self._deliver, self, key, body)
end

-- None of a receiver's answer is kept but its status and headers: the
-- request ends with them. A 2xx with a large body (a page, a dump) is
-- delivered: as an EMSGSIZE error it was sent again at every try and every
-- sweep; so is one whose body never comes (a Content-Length it does not
-- send): read to the timeout, it was too.
local MAX_ANSWER_BODY = 0

-- The most of a redirect's Location a log line quotes.
local MAX_LOCATION_SHOWN = 1024

-- The longest a receiver's Retry-After holds a notification back.
local MAX_RETRY_AFTER_MS = 60000

-- The store is called through store.call: one that raised out of a sweep
-- left the sweep under way for good (self.walking), and no later one ran.
local store_call = require("callagent.store").call

-- fetch(opts.url, opts), its handle in on_way while it is on its way, so
-- that stop() can cancel it.
function Notifier:_post(opts)
  local req
  local res, err = task.await(function(done)
    req = fetch.request(opts, done)
    self.on_way[req] = true
  end)
  self.on_way[req] = nil
  task.pace() -- as fetch() does: answers come in bursts too
  return res, err
end

-- Delivers one notification, with its retries (in a task; in_flight[key] set).
-- Returns whether the receiver answered for good (delivered, or refused).
function Notifier:_deliver(key, body)
  if self.resuming then
    -- Sent now, and so no more the business of the backlog being resumed.
    self.resuming[key] = nil
  end
  local delay = self.base_delay_ms
  for try = 1, self.attempts do
    if self.stopped or not self:enabled() then
      -- Stopped, or notifications turned off since (app.config): left pending.
      self.in_flight[key] = nil
      return
    end
    -- The settings of each try (app.config.notify may change meanwhile).
    local target, token = self:_target(), self:conf().hooksToken
    self.requests = self.requests + 1
    local res, err = self:_post({
      url = target,
      method = "POST",
      body = body,
      timeout = self.timeout_ms,
      max_body = MAX_ANSWER_BODY,
      truncate = true,
      headers = {
        ["Content-Type"] = "application/json",
        Authorization = "Bearer " .. token,
        ["Idempotency-Key"] = key,
      },
    })
    self.requests = self.requests - 1
    if self.stopped then
      -- The store is closed: what was not marked sent is sent again at
      -- the next start (resume).
      self.in_flight[key] = nil
      return
    end
    if res and res.status < 300 then
      if not store_call(self.store, "mark_notified", key, "sent") then
        -- Still pending in the store: sent again at every sweep while it
        -- refuses writes (hours of a full disk, a duplicate every 5
        -- minutes). Marked again instead; only a restart sends it again.
        self.unmarked[key] = true
        log.warn("a delivered notification could not be marked so: it is marked again at the next sweep",
          { key = key })
      end
      log.info("notification delivered", { key = key, status = res.status, try = try })
      self.in_flight[key] = nil
      self:_ran_out_clear(key)
      return true
    end
    local why = res and ("HTTP " .. res.status) or err
    -- 408 and 429 say "later"; another answer under 500 will not change
    -- (401, 403, 404 and 3xx may, under another token or address: refused_config).
    local refused = res and res.status < 500 and res.status ~= 429 and res.status ~= 408
    -- Refused for the token or the address: under which (a backend that
    -- does not keep it ignores it, and the refusal is for good).
    local under = refused and refused_config(res.status) and self:fingerprint(target, token) or nil
    store_call(self.store, "mark_notified", key, refused and "refused" or "failed", why, under)
    if refused then
      self:_ran_out_clear(key) -- never sent again
    end
    if refused and res.status >= 300 and res.status < 400 then
      -- Not followed: the body and its bearer token go where configured,
      -- nowhere else. The address, without its password or query (either
      -- may hold a token), its first KiB (a Location may be 100 KB).
      local to = res.headers and res.headers.location
      log.error("notification redirected; not retrying: set notify.hooksUrl to the receiver's own address"
        .. " (a start with another sends it again)",
        { key = key, error = why, location = to and http.cut(url.display(to), MAX_LOCATION_SHOWN) })
      self.in_flight[key] = nil
      return true
    elseif under then
      log.warn("notification refused; not retrying: sent again at a start with another notify.hooksUrl or hooksToken",
        { key = key, error = why })
      self.in_flight[key] = nil
      return true
    elseif refused then
      log.warn("notification refused; not retrying", { key = key, error = why })
      self.in_flight[key] = nil
      return true
    end
    if try < self.attempts then
      -- A receiver that says when (Retry-After in seconds, with 429 or 503)
      -- is asked again then, up to a minute later; the schedule goes on.
      local wait = delay
      local after = res and (res.status == 429 or res.status == 503) and res.headers
        and tostring(res.headers["retry-after"] or ""):match("^%s*(%d+)%s*$")
      if after then
        wait = math.max(wait, math.min(tonumber(after) * 1000, MAX_RETRY_AFTER_MS))
      end
      log.warn("notification failed; retrying", { key = key, error = why, try = try, retry_in_ms = wait })
      task.wait_in(self.sleepers, wait) -- stop() ends the wait
      delay = delay * 2
    else
      log.error("notification failed; out of tries: the next sweep sends it again", { key = key, error = why,
        tries = try, sweep_in_s = self.sweep_ms // 1000 })
      self:_ran_out_set(key)
    end
  end
  self.in_flight[key] = nil
  return false
end

-- key ran out of tries now: it goes last in the next sweep.
function Notifier:_ran_out_set(key)
  if not self.ran_out[key] then
    self.n_ran_out = self.n_ran_out + 1
  end
  self.ran_outs = self.ran_outs + 1
  self.ran_out[key] = self.ran_outs
  local keys = self.ran_out_keys
  keys[#keys + 1] = key
  self.ran_out_ranks[#keys] = self.ran_outs
end

-- key is no longer out of tries (sent, refused, or no longer pending).
function Notifier:_ran_out_clear(key)
  if self.ran_out[key] then
    self.ran_out[key] = nil
    self.n_ran_out = self.n_ran_out - 1
  end
end

--- Inside a task: waits, at most ms, for the requests on their way to be
-- answered, so that a delivered notification is marked so before the store
-- closes, not sent again by the next start (retries waiting their turn are
-- left for it). Returns whether none is left.
function Notifier:drain(ms)
  local deadline = timer.now() + ms
  while self.requests > 0 and timer.now() < deadline do
    timer.sleep(20)
  end
  return self.requests == 0
end

--- No more sending: sends in flight end without touching the store (it is
-- about to close); what they had not delivered stays pending for resume().
-- They end now: a retry waiting its turn (up to a minute, with a
-- Retry-After) and a request still on its way (up to timeout_ms) kept a
-- program that had stopped its app running until then.
function Notifier:stop()
  self.stopped = true
  if self.sweep_timer then
    self.sweep_timer:stop()
    self.sweep_timer = nil
  end
  local sleepers, reqs = self.sleepers, {}
  self.sleepers = {}
  for req in pairs(self.on_way) do
    reqs[#reqs + 1] = req
  end
  for _, wake in ipairs(sleepers) do
    wake()
  end
  for _, req in ipairs(reqs) do
    req:cancel()
  end
end

-- Notifications resume() sends at once: a backlog of thousands (a receiver
-- down for a day) is not thousands of connections at the start.
local RESUME_AT_ONCE = 8
-- The rows one read of the backlog takes: a backlog of any size is walked a
-- page at a time (keyset paging, oldest first), never read whole, so what a
-- sweep holds is a page and the notifications on their way.
local PAGE = 200

--- Sends every notification recorded but not delivered (after a restart),
-- RESUME_AT_ONCE at a time, oldest first; then again every sweep_ms, for
-- those that ran out of tries meanwhile (a receiver down for a minute would
-- otherwise get them only at the next restart: weeks later, or never).
-- Returns how many its first page holds (at most PAGE).
function Notifier:resume()
  if not self:enabled() then
    return 0
  end
  if not self.requeued and self.store.requeue_refused then
    -- Those refused for the token or address of another config go back
    -- into the backlog, once: the operator has changed what was refused.
    self.requeued = true
    local n, err = self.store:requeue_refused(self:fingerprint())
    if n == nil then
      log.error("the notifications refused under another notify.hooksUrl or hooksToken could not be sent again",
        { error = err })
    elseif n > 0 then
      log.info("notifications refused under another notify.hooksUrl or hooksToken: sending them again", { count = n })
    end
  end
  if not self.sweep_timer and not self.stopped then
    self.sweep_timer = timer.every(self.sweep_ms, function()
      -- One sweep at a time: the last one's keys are all taken (each in
      -- flight or done) once it is no longer self.walking.
      if not self.stopped and not self.walking then
        task.spawn(self._sweep, self)
      end
    end)
    self.sweep_timer:unref()
  end
  return self:_sweep()
end

-- Reads one page of the backlog (opts as store:pending_notifications takes
-- them), counting what it read: stats.pages, and stats.most_rows, the most
-- rows one read returned (what a sweep holds at once, but those on their way).
function Notifier:_read(opts)
  local rows, next_cursor = store_call(self.store, "pending_notifications", opts)
  if not rows then
    -- Left pending in the store: the next sweep, or start, sends them.
    log.error("the notifications not yet delivered could not be read", { error = next_cursor })
    return nil
  end
  local stats = self.stats
  stats.pages = stats.pages + 1
  stats.most_rows = math.max(stats.most_rows, #rows)
  return rows, next_cursor
end

-- Takes a page: its rows, and which of them are the backlog's to send. One
-- the engine sends, or sent before (a call the recovery ended), is its own
-- to deliver; the backlog, coming to it after it was delivered, would send
-- it again (_deliver takes it out of self.resuming).
function Notifier:_take_page(walk, rows)
  local waiting = {}
  for _, n in ipairs(rows) do
    waiting[n.key] = not self.in_flight[n.key] or nil
  end
  walk.rows, walk.i, walk.waiting = rows, 0, waiting
  if self.walking == walk then
    self.resuming = waiting
  end
end

-- The ran-out ones' next page (phase 2): up to PAGE of the keys that had
-- run out of tries before the sweep began, the longest untried first.
function Notifier:_ran_out_page(walk)
  local keys, rank = {}, {}
  local all, ranks = self.ran_out_keys, self.ran_out_ranks
  while #keys < PAGE and walk.ki < walk.ran_out_n do
    walk.ki = walk.ki + 1
    local key, r = all[walk.ki], ranks[walk.ki]
    if self.ran_out[key] == r then -- not delivered, refused or out of tries since
      keys[#keys + 1] = key
      rank[key] = r
    end
  end
  walk.rank = rank
  if #keys == 0 then
    return {}
  end
  local rows = self:_read({ keys = keys })
  if not rows then
    return nil
  end
  local found, out = {}, {}
  for _, n in ipairs(rows) do
    if rank[n.key] and not found[n.key] then -- a backend that ignores keys returns them all
      found[n.key] = true
      out[#out + 1] = n
    end
  end
  -- Those no longer pending (pruned) are no longer anyone's: no growth.
  for key in pairs(rank) do
    if not found[key] and self.ran_out[key] == rank[key] then
      self:_ran_out_clear(key)
    end
  end
  table.sort(out, function(a, b)
    return rank[a.key] < rank[b.key]
  end)
  return out
end

-- The next notification of the walk to send, reading the next page when
-- the last is taken; nil at its end.
function Notifier:_next(walk)
  while not self.stopped and not walk.down and not walk.over do
    walk.i = walk.i + 1
    local n = walk.rows[walk.i]
    if n then
      walk.rows[walk.i] = nil -- taken: no longer held here
      local key = n.key
      if self.unmarked[key] and walk.waiting[key] and not self.in_flight[key] then
        -- Delivered: marked, not sent again (_deliver).
        if store_call(self.store, "mark_notified", key, "sent") then
          self.unmarked[key] = nil
          log.info("a delivered notification is marked so at last", { key = key })
        end
      elseif walk.waiting[key] and not self.in_flight[key] then
        if walk.phase == 1 and not self.ran_out[key] and not walk.recorded[key] then
          return n
        elseif walk.phase == 2 and self.ran_out[key] == walk.rank[key] then
          return n
        end
      end
    elseif walk.phase == 1 and walk.cursor then
      local rows, cursor = self:_read({ limit = PAGE, after = walk.cursor })
      if not rows then
        walk.over = true
      else
        walk.cursor = cursor
        self:_take_page(walk, rows)
        -- Live calls get their turn between pages (the page is taken, so
        -- another worker goes on with it meanwhile): a backlog whose rows
        -- are all passed over (out of tries, the receiver down for days)
        -- was read whole in one go, 30,000 rows a 220 ms stall of every
        -- call's audio at each sweep.
        task.pace()
      end
    else
      if walk.phase == 1 then
        -- Those that ran out of tries before the sweep go last, the
        -- longest untried first: in store order, a payload the receiver
        -- fails for ever (5xx) came first at every sweep and ended it
        -- there: 8 of them, and none behind them went out while the app
        -- ran. Their keys only are held, never their payloads; they are
        -- in that order already (self.ran_out_keys), up to walk.ran_out_n.
        walk.phase, walk.rank, walk.ki = 2, {}, 0
      end
      local rows = walk.ki < walk.ran_out_n and self:_ran_out_page(walk)
      if not rows then
        walk.over = true
      else
        self:_take_page(walk, rows)
        task.pace()
      end
    end
  end
  return nil
end

-- Sends the pending notifications not already on their way: the backlog
-- oldest first, a page at a time, RESUME_AT_ONCE at once; then those that
-- ran out of tries before it began. Returns the first page's rows.
function Notifier:_sweep()
  if self.stopped then
    return 0 -- the store is closed
  end
  -- Rows recorded once the walk began are the engine's, which sends what
  -- it records; the walk leaves them be (walk.recorded, which record()
  -- fills), as a read of the whole backlog at once did. Not by their
  -- creation time: a wall clock set back (NTP) would leave those recorded
  -- before, by a clock ahead, out of every sweep until it caught up.
  if not self.walking and #self.ran_out_keys > 2 * self.n_ran_out + PAGE then
    -- Mostly stale: the live entries, in their order (no walk is reading
    -- the list by index now).
    local keys, ranks, k2, r2 = self.ran_out_keys, self.ran_out_ranks, {}, {}
    for i = 1, #keys do
      if self.ran_out[keys[i]] == ranks[i] then
        k2[#k2 + 1], r2[#k2 + 1] = keys[i], ranks[i]
      end
    end
    self.ran_out_keys, self.ran_out_ranks = k2, r2
  end
  local walk = { phase = 1, ran_outs = self.ran_outs, ran_out_n = #self.ran_out_keys, recorded = {} }
  self.walking = walk
  local rows, cursor = self:_read({ limit = PAGE })
  if not rows or (#rows == 0 and next(self.ran_out) == nil) then
    -- Nothing to walk: no worker would end this sweep (self.walking).
    if self.walking == walk then
      self.walking = nil
    end
    return 0
  end
  walk.cursor = cursor
  self:_take_page(walk, rows)
  local taken = 0
  local function worker()
    while true do
      local n = self:_next(walk)
      if not n then
        break
      end
      taken = taken + 1
      self.in_flight[n.key] = true
      -- One out of tries ends the sweep: the receiver is down, and the rest
      -- would each cost it a round of tries too (a backlog of thousands,
      -- every sweep); they wait for the next one.
      if not self:_deliver(n.key, n.payload) then
        walk.down = true
      end
    end
    walk.over = true
    if self.walking == walk then
      self.walking, self.resuming = nil, nil
      if taken > 0 then
        log.info("notification backlog walked", { sent = taken, pages = self.stats.pages - walk.pages,
          most_rows = self.stats.most_rows, receiver_down = walk.down or nil })
      end
    end
  end
  walk.pages = self.stats.pages - 1
  -- Counted before the workers start: each takes its row out of the page
  -- (a task runs until it yields), and # of a page with holes is any border.
  local first = #rows
  local workers = cursor and RESUME_AT_ONCE or math.min(RESUME_AT_ONCE, math.max(first, 1))
  if next(self.ran_out) ~= nil then
    workers = RESUME_AT_ONCE
  end
  for _ = 1, workers do
    task.spawn(worker)
  end
  return first
end

return M
