--- callagent.calls: the call engine - call records, attempts, retries, endings.
--
-- A call record (what GET /v1/calls/{id} returns):
--   callId, status, attempt, attempts = [{n, status, providerCallId, startedAt,
--   endedAt, reason}], to, prompt, timezone, locale, callerName, calleeName,
--   voice, metadata, report, transcript = [{role = "agent"|"callee", text, at}],
--   usage, createdAt, updatedAt, completedAt, lastError, endReason,
--   nextAttemptAt, hint
-- Status: queued (waiting to dial, also between retries), dialing, in_progress,
-- completed, busy, no_answer, failed, canceled.
--
-- Rules:
--   - provider statuses never move an attempt backwards (sequence numbers and
--     the order dialing < in_progress < final); "dialing"/"ringing" never retry;
--   - an attempt that ends busy, no_answer or failed before it was answered is
--     retried when its status is in retry.retryStatuses, after
--     retry.initialDelayMs * retry.backoffFactor^(n-1), up to retry.maxAttempts
--     (not a dial the provider refused for good: startCall's nil, err,
--     {permanent = true});
--   - an answered attempt ends the call: completed (with the report, or with
--     endReason "callee_hung_up" and no report when the callee hung up first),
--     or failed when the agent could not carry on (model lost, media stream
--     broken: no retry - the callee already picked up once);
--   - the final state is notified once (callagent.notify).
local crypto = require "callagent.crypto"
local timer = require "callagent.timer"
local task = require "callagent.task"
local log = require "callagent.log"
local json = require "callagent.json"
local core = require "callagent.core"
local bridge_mod = require "callagent.bridge"
local store_mod = require "callagent.store"

local M = {}
local Engine = {}
Engine.__index = Engine

local FINAL = { completed = true, busy = true, no_answer = true, failed = true, canceled = true }

-- A hang-up the vendor refused, logged: rate-limited (log.limited), as a
-- vendor outage refuses one for every live call, again at each retry. Of a
-- kind per error: its words before the first colon and its HTTP status
-- ("twilio 20500 (HTTP 503)", "telnyx request failed"), which name no call,
-- so that the first lines of an outage are written whole, the call and
-- attempt in them, and a failure of another kind during it is written too.
local function hangup_failed(fields)
  local err = tostring(fields.error)
  local kind = (err:match("^([^:]*):") or err):sub(1, 80) .. " " .. (err:match("%(HTTP %d+%)$") or "")
  log.limited("warn", "provider hang-up failed", fields, "provider hang-up failed " .. kind)
end

-- An answered call's media stream comes within a second or two; one that has
-- not come this long after the answer never will. (Module fields, read when
-- used, so that a test can shorten them.)
M.STREAM_WAIT_MS = 15000
-- After callagent's own hang-up, how long the provider's final status may take.
M.HANGUP_WAIT_MS = 10000
-- After an attempt's conversation ended (its bridge closed), how long the
-- provider's final status may take.
M.BRIDGE_END_WAIT_MS = 5000
-- An end reason that makes an answered call without a report a failure:
-- the agent could not carry it out. A limit reached (max_duration,
-- session_limit, callee_silent, "model session expired") is not one: the
-- call was carried on as long as it could be.
local function agent_failed(reason)
  return reason == "model_error" or reason == "no_stream" or reason == "stream_error" or reason == "shutdown"
    or type(reason) == "string" and reason:find("^interrupted by restart") ~= nil
end
-- lastError and end reasons reach API clients, webhooks and the store, from
-- vendors and the model: one line of UTF-8, at most MAX_ERROR bytes (and a
-- "…"), with no secret of ours in it (a vendor's error may quote our key).
local MAX_ERROR = 500
local function error_text(s)
  s = json.utf8((log.scrub(tostring(s)):gsub("[%z\1-\31\127]", " ")))
  if #s > MAX_ERROR then
    local cut = MAX_ERROR
    while s:byte(cut + 1) >= 0x80 and s:byte(cut + 1) < 0xc0 do -- not inside a character
      cut = cut - 1
    end
    s = s:sub(1, cut) .. "…"
  end
  return s
end

local RANK = { queued = 0, dialing = 1, in_progress = 2 }
local function rank(s)
  return FINAL[s] and 3 or RANK[s] or 0
end
M.FINAL = FINAL
-- The statuses a provider reports (mapStatus, provider_status): an
-- attempt's, which is never queued.
M.PROVIDER_STATUSES = { dialing = true, in_progress = true, completed = true, busy = true, no_answer = true,
  failed = true, canceled = true }
local STATUS_WORDS = "dialing, in_progress, completed, busy, no_answer, failed or canceled"
M.STATUS_WORDS = STATUS_WORDS

-- A provider's status as {status, ...}: the word alone (the seed's
-- CallStatus) is {status = word}. nil and the word as shown in a log line
-- for a word not among PROVIDER_STATUSES: it would rank below every
-- status and be dropped as "not newer" without a word, the call ringing on.
-- The word shown is UTF-8 of at most 64 bytes, cut between characters: its
-- bytes that are no UTF-8 are U+FFFD first (3 bytes each), then it is cut.
-- Cut first, a character across byte 64 became a U+FFFD of its own, and
-- each bad byte grew to 3 bytes after the cut (64 of them: 192 bytes).
local WORD_MAX = 64
local function shown_word(word)
  -- A character that starts by byte 64 ends by byte 67; repair makes
  -- nothing shorter, so what follows byte 67 cannot come before the cut.
  local s = json.utf8(word:sub(1, WORD_MAX + 3))
  if #s <= WORD_MAX then
    return s
  end
  local i = WORD_MAX + 1 -- the first byte left out: back to a character's start
  while i > 1 and s:byte(i) >= 0x80 and s:byte(i) < 0xC0 do
    i = i - 1
  end
  return s:sub(1, i - 1)
end

function M.status_of(st)
  if type(st) == "string" then
    st = { status = st }
  end
  if type(st) == "table" and M.PROVIDER_STATUSES[st.status] then
    return st
  end
  local word = type(st) == "table" and st.status or st
  return nil, type(word) == "string" and shown_word(word) or tostring(word)
end

function M.iso(t)
  t = t or core.time()
  return os.date("!%Y-%m-%dT%H:%M:%S", math.floor(t)) .. string.format(".%03dZ", math.floor((t % 1) * 1000))
end
local iso = M.iso

-- Epoch seconds of a time M.iso wrote; nil for anything else.
local function from_iso(s)
  local y, mo, d, h, mi, sec, ms = tostring(s):match("^(%d%d%d%d)%-(%d%d)%-(%d%d)T(%d%d):(%d%d):(%d%d)%.(%d%d%d)Z$")
  if not y then
    return nil
  end
  return require("callagent.tz").days_from_civil(tonumber(y), tonumber(mo), tonumber(d)) * 86400
    + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(sec) + tonumber(ms) / 1000
end

function M.new_id()
  return "c_" .. crypto.to_hex(crypto.random_bytes(10))
end

--- engine = calls.new{config, store, provider, notifier, tools, emit, base_urls}
function M.new(opts)
  local self = setmetatable({
    config = opts.config,
    store = opts.store,
    provider = opts.provider,
    notifier = opts.notifier,
    tools = opts.tools or {},
    tools_by_name = {},
    emit = opts.emit or function() end,
    public_url = opts.public_url,
    local_url = opts.local_url,
    live = {}, -- call id -> live record (active calls)
    unsaved = {}, -- call id -> a final call the store has not taken yet (_finish)
    bridges = {}, -- call id .. "#" .. n -> bridge
    warm = {}, -- call id .. "#" .. n -> model session opened while it rings (bridge.warm)
    tokens = {}, -- stream token -> {call_id, attempt, expires}
    timers = {}, -- call id -> retry or dial timers
    strays = {}, -- vendor call ids hung up as strays (_end_stray)
    n_strays = 0,
    started_at = core.time(),
  }, Engine)
  for _, t in ipairs(self.tools) do
    self.tools_by_name[t.name] = t
  end
  return self
end

-- Records -------------------------------------------------------------------

-- A shallow copy of t without its internal ("_"-prefixed) fields.
local function public_fields(t)
  local v = {}
  for k, x in pairs(t) do
    if type(k) == "string" and k:sub(1, 1) ~= "_" then
      v[k] = x
    end
  end
  return v
end

--- A read-only copy of a call for API responses, tools and event handlers.
-- Never raises: a store that raises (a backend's way to say "disk full") is
-- one that failed to read (logged). A call the store cannot read is nil,
-- err; a live call whose transcript it cannot read is its view without
-- those lines (the engine and the app's handlers go on with it), and, with
-- strict (the API's GET), nil, err.
function Engine:call_view(id, strict)
  local c = self.live[id] or self.unsaved[id]
  local transcript
  if self.closed then
    -- app:stop() closed the store (a request or a hang-up still finishing).
    if not c then
      return nil, "ESTOPPED: the store is closed"
    end
  elseif c then
    -- A live record holds no transcript (it would grow, and be walked by
    -- the collector, for as long as the call lasts): the store has it.
    local store, err = self.store, nil
    if store.transcript then
      transcript, err = store_mod.call(store, "transcript", id)
    else -- a backend from before store:transcript
      local r
      r, err = store_mod.call(store, "get_call", id)
      transcript = r and r.transcript
    end
    if err ~= nil and strict then
      return nil, err
    end
    -- Lines the store refused come after every line it has.
    for _, r in ipairs(c._unsaved_rows or {}) do
      if r[1] == "transcript" then
        transcript = transcript or {}
        transcript[#transcript + 1] = r[2]
      end
    end
  else
    local err
    c, err = store_mod.call(self.store, "get_call", id)
    if not c then
      return nil, err -- err: the store could not read it (nil: no such call)
    end
    transcript = c.transcript
  end
  return self:_view(c, transcript)
end

--- The view of a record list_calls gave, for a listing: no transcript (a
-- listing does not read them: 100 calls of 400 lines took 65 ms). A call
-- this process holds is shown as it holds it, as call_view shows it: the
-- store's row lags behind while the store refuses its writes (a full disk),
-- and a listing must not say "dialing" of a call GET says has ended.
function Engine:list_view(c)
  local v = self:_view(self.live[c.id] or self.unsaved[c.id] or c)
  v.transcript = nil
  return v
end

function Engine:_view(c, transcript)
  local v = public_fields(c)
  v.callId = c.id
  v.id = nil
  v.events = nil
  local attempts = json.array({})
  for i, a in ipairs(c.attempts or {}) do
    attempts[i] = public_fields(a)
  end
  v.attempts = attempts
  v.transcript = json.array(transcript or {})
  if type(v.report) == "table" then
    -- Read back from the store, a list is a plain table: [] would be {}.
    v.report.nextSteps = json.array(type(v.report.nextSteps) == "table" and v.report.nextSteps or {})
  end
  return v
end

function Engine:_save(call, fields)
  call.updatedAt = iso()
  fields.updatedAt = call.updatedAt
  local ok, err = self:_store_write("update_call", call.id, fields)
  if not ok then
    log.error("store update failed", { call = call.id, error = err })
    call._save_failed = true -- its end is then written whole (_finish)
  end
end

-- Runs fn's store writes as one commit where the backend can (store:batch;
-- without it, one each). fn must not yield. A store that raises (a backend's
-- way to say "disk full") refused the writes: logged, and nil, err, as for
-- a refusal. The caller keeps what was not written (a call's end is written
-- again by _write_unsaved), and a timer's work runs again at its next turn
-- instead of ending with the error for good.
function Engine:_batch(fn)
  local store = self.store
  if not store.batch then
    self._batching = (self._batching or 0) + 1
    local ok, err = pcall(fn)
    self._batching = self._batching - 1
    if not ok then
      log.error("store write failed", { what = "raised", error = tostring(err) })
      return nil, err
    end
    return true
  end
  -- The rows written in it: kept again with their calls if it is undone.
  local outer = self._batch_rows
  local rows = {}
  self._batch_rows = rows
  self._batching = (self._batching or 0) + 1
  local res = table.pack(pcall(store.batch, store, fn))
  self._batching = self._batching - 1
  self._batch_rows = outer
  if not res[1] then
    log.error("store write failed", { what = "batch raised", error = tostring(res[2]) })
    res = { true, nil, res[2] }
  end
  if res[2] then
    if outer then -- committed only with the outer batch
      table.move(rows, 1, #rows, #outer + 1, outer)
    end
  else
    for _, r in ipairs(rows) do
      self:_keep_row(r[1], r[2], r[3])
    end
  end
  return res[2], res[3]
end

-- store:method(...) outside a batch through store.call, where a store that
-- raises refused the write (logged, nil, err): raised up, it ended the work
-- that called it (a failed dial's end, an attempt's vendor id) half done, a
-- call left dialing for good. Inside a batch (_batch) it raises, which
-- undoes the batch, whose caller keeps what was not written.
function Engine:_store_write(method, ...)
  local store = self.store
  if (self._batching or 0) > 0 then
    return store[method](store, ...)
  end
  return store_mod.call(store, method, ...)
end

-- Rows ----------------------------------------------------------------------
-- Transcript lines and events are rows of their own in the store. One the
-- store refuses (a full disk) is kept with its call, in order, and written
-- before the call's next row and with its end (_finish, _write_unsaved).

-- Most rows a call keeps while its store refuses them; later ones are dropped.
local MAX_UNSAVED_ROWS = 2000

function Engine:_keep_row(call, kind, row)
  local kept = call._unsaved_rows or {}
  call._unsaved_rows = kept
  if #kept >= MAX_UNSAVED_ROWS then
    if not call._rows_dropped then
      log.error("the store refuses this call's rows: dropping them", { call = call.id, kept = #kept })
    end
    call._rows_dropped = (call._rows_dropped or 0) + 1
    return
  end
  kept[#kept + 1] = { kind, row }
end

function Engine:_write_row(call, kind, row)
  local store, method = self.store, kind == "transcript" and "add_transcript" or "add_event"
  local batch = self._batch_rows
  if batch then
    -- Taken first: a write that raises undoes the batch (_batch), which
    -- keeps its rows again.
    batch[#batch + 1] = { call, kind, row }
    store[method](store, call.id, row)
  elseif not store_mod.call(store, method, call.id, row) then
    self:_keep_row(call, kind, row)
  end
end

-- Writes the rows the store refused before, if any, in one commit.
function Engine:_write_kept_rows(call)
  local kept = call._unsaved_rows
  if not kept then
    return
  end
  local function write() -- not run when the batch cannot begin
    call._unsaved_rows = nil
    for _, r in ipairs(kept) do
      self:_write_row(call, r[1], r[2])
    end
  end
  if self._batch_rows then
    write()
  else
    self:_batch(write)
  end
end

function Engine:_add_row(call, kind, row)
  if call._unsaved_rows then
    self:_keep_row(call, kind, row) -- after those, in order
    return self:_write_kept_rows(call)
  end
  self:_write_row(call, kind, row)
end

-- also: more store writes that commit with the status (run first).
function Engine:_set_status(call, status, extra, also)
  local old = call.status
  call.status = status
  local fields = extra or {}
  fields.status = status
  for k, v in pairs(fields) do
    -- store_mod.NULL clears a field in the store; the live record drops it.
    if v == store_mod.NULL then
      call[k] = nil
    else
      call[k] = v
    end
  end
  local ok, err = self:_batch(function()
    if also then
      also()
    end
    self:_save(call, fields)
    self:_add_row(call, "events", { at = iso(), type = "status", from = old, to = status })
  end)
  if not ok then
    call._save_failed = true -- undone whole: its end is then written whole (_finish)
  end
  if old ~= status then
    log.info("call status", { call = call.id, from = old, to = status, attempt = call.attempt })
    self.emit("status", self:call_view(call.id), old, status)
  end
  return ok, err
end

--- Creates a call from validated API input and starts dialing it.
function Engine:create(input, idempotency)
  if self.stopped then
    -- Shutting down: nothing would hang it up, or hear of it.
    return nil, "ESTOPPED: shutting down"
  end
  local cfg = self.config
  local now = iso()
  local call = {
    id = M.new_id(),
    status = "queued",
    attempt = 0,
    attempts = {},
    to = input.to,
    prompt = input.prompt,
    timezone = input.timezone or cfg.defaults.timezone,
    locale = input.locale or cfg.defaults.locale,
    callerName = input.callerName,
    calleeName = input.calleeName,
    voice = input.voice or cfg.openai.voice,
    metadata = input.metadata,
    usage = {},
    createdAt = now,
    updatedAt = now,
    _idempotency = idempotency, -- {key, fingerprint}: kept by the store, not in the record
  }
  -- A store that raises refused it, as one that answers nil, err: the API
  -- answers 500 store_failed, not internal.
  local ok, err = store_mod.call(self.store, "insert_call", call)
  if not ok then
    return nil, err
  end
  self.live[call.id] = call
  log.info("call created", { call = call.id, to = call.to })
  self.emit("status", self:call_view(call.id), nil, "queued")
  -- Dial in a task of its own: the caller gets the record at once.
  task.spawn(function()
    self:dial(call.id)
  end)
  return call
end

-- Dialing ------------------------------------------------------------------

-- The reasons of an attempt the pause canceled (it is dialed again, and
-- does not count against retry.maxAttempts).
local RANG_AT_PAUSE = "the public tunnel went down while it rang"
local UNSENT_AT_PAUSE = "the public tunnel went down before it was placed"
-- The reason of a ringing attempt whose pause's cancel found it over at the
-- vendor, which did not say how (its final status went to the dead tunnel).
local ENDED_BEFORE_PAUSE = "it ended before the tunnel's cancel; the provider did not say how"

function Engine:dial(id)
  local call = self.live[id]
  if not call or FINAL[call.status] or self.stopped then
    return -- stopped: a queued call is dialed by the next run's recover()
  end
  if self.paused then
    -- Queued until resume(): placed now, the callee would answer a call
    -- whose webhooks reach nothing.
    if not self.held_set[id] then
      self.held_set[id] = true
      self.held[#self.held + 1] = id
      log.info("dial held: calls are paused", { call = id, reason = self.paused })
    end
    return
  end
  local n = call.attempt + 1
  call.attempt = n
  call.nextAttemptAt = nil
  local attempt = { n = n, status = "dialing", startedAt = iso() }
  call.attempts[n] = attempt
  self:_set_status(call, "dialing", { attempt = n, nextAttemptAt = store_mod.NULL }, function()
    if n > 1 then
      self.store:clear_retry(id) -- a first attempt has no retry to clear
    end
    self.store:add_attempt(id, attempt)
  end)
  attempt._placing = true
  -- A pause that comes while the request is on its way, even one over by
  -- its answer (the tunnel died and opened again under a new URL): the call
  -- was placed with the dead tunnel's webhooks.
  local pauses = self.pauses
  self:_busy(1) -- a stop waits for the dial's answer (see _placed_while_stopping)
  -- A provider's error is the attempt's, not a call left dialing for good.
  local res, err, how = self:_provider("startCall", self:call_view(id), self.public_url(), self.local_url())
  attempt._placing = nil
  if res ~= nil and type(res) ~= "table" then
    res, err = nil, "the " .. tostring(self.provider.name) .. " provider's startCall returned a "
      .. type(res) .. ", not {providerCallId, userHint}"
  end
  if not res and attempt.providerCallId then
    -- The request failed (its answer timed out, say), but the vendor's
    -- callbacks have named the call: it was placed, and it goes on.
    log.warn("the dial request failed, but the provider is placing the call: going on",
      { call = id, attempt = n, error = err })
    res = { providerCallId = attempt.providerCallId }
  end
  if self.stopped and (res or attempt._unsent_at_stop) then
    -- Placed, or not sent because of the stop (dial_wanted): queued again.
    self:_placed_while_stopping(call, n, res and res.providerCallId)
    return self:_busy(-1)
  end
  self:_busy(-1)
  if self.closed then
    return -- failed while the app stopped, after the store closed: the next start resolves it
  end
  if res then
    -- Kept whatever happened meanwhile: the call may be talking by now, or
    -- over, and a hang-up needs it.
    self:_provider_id(call, n, res.providerCallId)
  end
  attempt._end_pending = nil -- no call was placed, or it was just ended
  if call.status ~= "dialing" or call.attempt ~= n then
    return -- answered or canceled meanwhile
  end
  if not res and attempt._unsent_at_pause then
    return self:_hold_canceled(call, n, UNSENT_AT_PAUSE) -- not sent: the tunnel went down (dial_wanted)
  end
  if not res then
    log.warn("dialing failed", { call = id, attempt = n, error = err })
    err = error_text(err)
    -- The vendor refused the call for good (the number, the account): a
    -- retry would be refused alike.
    attempt._no_retry = type(how) == "table" and how.permanent == true or nil
    return self:_attempt_final(call, n, "failed", err, err)
  end
  if res.userHint and res.userHint ~= call.hint then
    -- Each attempt's own: a retry's link is a new one.
    call.hint = res.userHint
    self:_save(call, { hint = res.userHint })
  end
  -- A call the vendor places from a queue (Twilio's calls per second)
  -- rings from when it leaves it: its ring timeout is that much later.
  local q = res.queueMs
  q = math.type(q) == "integer" and q > 0 and math.min(q, 86400000) or 0
  attempt._from_queue = q > 0 or nil -- _ring_timeout
  self:_arm_ring_timer(call, n, q)
  if self.paused or self.pauses ~= pauses then
    -- Placed while the tunnel went down: its webhooks reach nothing.
    task.spawn(self._cancel_at_pause, self, call, n)
    return true
  end
  -- The model session opens while the phone rings: at the answer, the
  -- greeting need not wait for its connection and setup. Not where it could
  -- never be taken over (bridge.warm_spare_ms).
  if self.config.openai.connectWhileRinging and bridge_mod.warm_spare_ms(self.config) > 0 then
    self.warm[id .. "#" .. n] = bridge_mod.warm(self, call, n)
  end
  return true
end

-- Ringing attempt a of call has a session the model refused, for good
-- (warm_refused; recover, for one the last run had): unanswered, it ends
-- failed however the ring ends (_attempt_final), and is not dialed again.
local function model_refused(call, a)
  call._model_refused = a.n
  call._end_reason = call._end_reason or "model_error"
  a._no_retry = true
end

--- The model refused attempt n's session while it rang (bridge.warm), for
-- good: the same session would be refused at the answer, and the callee
-- would answer into silence. The ringing call is canceled; the attempt ends
-- failed (model_error), why in lastError, and the call is not retried (a
-- retry would be refused alike). Also while the tunnel is down: the pause's
-- cancel, on its way, would have the call wait and ring the callee again.
function Engine:warm_refused(w, why)
  local key = w.call_id .. "#" .. w.attempt
  if self.warm[key] == w then
    self.warm[key] = nil
  end
  local call = self.live[w.call_id]
  local a = call and call.attempts[w.attempt]
  if not a or a.status ~= "dialing" or call.attempt ~= w.attempt or a._voiced or call._cancel_requested
    or self.stopped then
    return -- answered meanwhile (its bridge connects, and is refused as any), ended, or being ended
  end
  log.warn("canceling the ringing call: the model refused its session", { call = call.id, attempt = a.n })
  model_refused(call, a)
  why = error_text(why)
  call.lastError = why
  -- Kept with the attempt as well (one commit): should its cancel and the
  -- stop's both fail, the next start resolves it as refused (recover,
  -- _resolve_interrupted), not as a call to dial again.
  local ok = self:_batch(function()
    self:_save(call, { lastError = why })
    self.store:update_attempt(call.id, a.n, { _modelRefused = true })
  end)
  if not ok then
    call._save_failed = true -- its end is then written whole (_finish)
  end
  self.emit("error", call.id, why)
  -- A cancel: asked again only while the call rings (a vendor's hang-up
  -- ends an answered call too, Telnyx's), and as one (a copy of the ringing
  -- attempt, not the live one, in progress once answered).
  self:_cancel_in_task(call.id, { n = a.n, providerCallId = a.providerCallId, status = "dialing" }, function()
    return a.status == "dialing" and call.attempt == a.n
  end)
end

--- Bridge b's model session is ready. A refusal of the session opened while
-- the attempt rang (warm_refused) whose cancel came after the callee had
-- answered (Twilio's leaves an answered call up) was no refusal for good:
-- the call, talking on the answer's session, no longer ends for it.
function Engine:bridge_model_ready(b)
  local call = self.live[b.call_id]
  if call and call._model_refused == b.attempt then
    call._model_refused = nil
    if call._end_reason == "model_error" then
      call._end_reason = nil
    end
  end
end

-- Closes attempt key's model session opened while it rang, if nobody took it.
function Engine:_close_warm(key)
  local w = self.warm[key]
  if w then
    self.warm[key] = nil
    w:close()
  end
end

--- Pauses dialing (reason: why, for the log and the API): dials wait,
-- queued, until resume(). The app pauses while its tunnel is down. Calls
-- ringing now were placed with webhooks that reach nothing: a callee who
-- answered would hear the vendor's error message. They are canceled, and
-- wait with the others (_cancel_at_pause).
function Engine:pause(reason)
  local was = self.paused
  self.paused = reason
  self.held, self.held_set = self.held or {}, self.held_set or {}
  if was then
    return
  end
  self.pauses = (self.pauses or 0) + 1 -- a dial on its way sees it (dial)
  for _, call in pairs(self.live) do
    local a = call.attempts[call.attempt]
    if a and a.status == "dialing" and call.status == "dialing" and a.providerCallId and not a._placing then
      task.spawn(self._cancel_at_pause, self, call, a.n)
    end
  end
end

-- Attempt n rings with webhooks that reach nothing (the tunnel is down): it
-- is canceled at the vendor and ends canceled, and the call waits for the
-- tunnel (_hold_canceled). One the vendor had ended already, not saying how,
-- ends failed (ENDED_BEFORE_PAUSE); one answered, as answered
-- (_answered_at_pause); one whose cancel failed is left to its ring timeout,
-- which asks the vendor how it went.
function Engine:_cancel_at_pause(call, n)
  local a = call.attempts[n]
  if not (a and a.status == "dialing" and call.attempt == n and a.providerCallId) or call._cancel_requested
    or self.stopped then
    return
  end
  log.info("canceling a ringing call placed with the dead tunnel's URL, to dial it again once a tunnel is up",
    { call = call.id, attempt = n })
  call._pause_cancel = n -- its canceled status holds it (_attempt_final)
  self:_ring_cancel_kept(call, a, "pause")
  local ok, err, how = self:_provider_end(self:call_view(call.id), a)
  if ok and call._pause_cancel == n then
    -- Kept after a failed cancel: the vendor may have taken it all the same
    -- (its answer lost), and the ring timeout then finds it canceled.
    call._pause_cancel = nil
  end
  if not ok then
    log.warn("the cancel of a ringing call failed; it rings on", { call = call.id, attempt = n, error = err })
    return
  end
  if type(how) == "table" and how.ended then
    -- Over at the vendor before the cancel (Telnyx's "already ended"), its
    -- final status sent to the dead tunnel: it ended on its own (declined,
    -- unanswered), so the retry policy decides, as at a stop; not left to
    -- the ring timeout, which would end it no_answer half a minute later.
    if a.status == "dialing" and call.attempt == n and not call._cancel_requested and not self.stopped then
      self:_attempt_final(call, n, "failed", ENDED_BEFORE_PAUSE)
    end
    return
  end
  if type(how) == "table" and how.answered then
    return self:_answered_at_pause(call, n)
  end
  -- The vendor's canceled status went to the dead tunnel: ended here.
  if a.status == "dialing" and call.attempt == n and not call._cancel_requested and not self.stopped then
    if call._model_refused == n then
      -- Canceled for the model's refusal as well (warm_refused): it ends
      -- failed, not retried, as that cancel's status would have ended it.
      return self:_attempt_final(call, n, "canceled", "canceled: the model refused its session")
    end
    self:_hold_canceled(call, n, RANG_AT_PAUSE)
  end
end

-- Attempt n, ringing here, whose cancel the vendor answered saying the
-- callee had answered (Twilio's leaves an answered call up): in progress
-- now, as its answered status would have made it.
function Engine:_answered_at_cancel(call, n)
  local a = call.attempts[n]
  if a and a.status == "dialing" and call.attempt == n then
    self:provider_status(call.id, n, { status = "in_progress", raw = "(the provider's answer to the cancel)" })
  end
end

-- Attempt n was answered before the pause's cancel came (a vendor whose
-- cancel leaves an answered call up says so: Twilio): its voice webhook went
-- to the dead tunnel, so nobody talks to the callee. The callee picked up
-- once: it is hung up as answered and ends failed (no_stream), not dialed
-- again.
function Engine:_answered_at_pause(call, n)
  local a = call.attempts[n]
  if call.attempt ~= n or FINAL[a.status] or self.stopped then
    return
  end
  self:_answered_at_cancel(call, n)
  if a.status ~= "in_progress" or call.attempt ~= n or self.bridges[call.id .. "#" .. n] then
    return -- its stream came after all
  end
  log.warn("a ringing call was answered before the tunnel's cancel came: hanging it up", { call = call.id,
    attempt = n })
  local why = "answered while the public tunnel was down: its voice webhook reached nothing"
  call._end_reason = call._end_reason or "no_stream"
  call.lastError = why
  self:_save(call, { lastError = why })
  self:_end_in_task(call.id, { n = n, providerCallId = a.providerCallId, status = "in_progress" })
  self:_attempt_final(call, n, "completed", why)
end

-- Attempt n ends canceled because of the pause (why), uncounted, and the
-- call waits for the tunnel with the others (dial).
function Engine:_hold_canceled(call, n, why)
  local a = call.attempts[n]
  self:_cancel_timer(call.id .. "#dial")
  self:_close_warm(call.id .. "#" .. n)
  a.status, a.endedAt, a.reason = "canceled", iso(), why
  log.info("attempt ended", { call = call.id, attempt = n, status = "canceled", reason = why })
  self:_set_status(call, "queued", nil, function()
    self.store:update_attempt(call.id, n, { status = a.status, endedAt = a.endedAt, reason = a.reason,
      providerCallId = a.providerCallId })
  end)
  task.spawn(function()
    self:dial(call.id)
  end)
end

--- Dials what waited, in the order it came.
function Engine:resume()
  local held = self.held or {}
  self.paused, self.held, self.held_set = nil, nil, nil
  for _, id in ipairs(held) do
    task.spawn(function()
      self:dial(id)
    end)
  end
  if #held > 0 then
    log.info("calls resumed: dialing those that waited", { calls = #held })
  end
end

--- Whether attempt n of call id, whose vendor call is provider_call_id, has
-- been answered here (its answered status, its voice webhook, or the
-- vendor's answer to a cancel). A provider whose cancel of a ringing call
-- would end an answered one (Telnyx's hang-up) asks before it sends a
-- cancel again, and sends none once the answer is true: the callee picked
-- up while the cancel was refused.
function Engine:answered(id, n, provider_call_id)
  local call = self.live[id]
  local a = call and call.attempts[n]
  return a ~= nil and a.answeredAt ~= nil and a.providerCallId == provider_call_id
end

--- Whether attempt n of call id is still to be placed: a provider whose
-- startCall waits before it sends its dial again (a vendor's 429) asks
-- before each request, and sends none once the answer is false (the call
-- hung up through the API, the attempt over, the app stopping); startCall
-- then returns nil, err. One the stop made unwanted goes back to the queue
-- for the next start (dial, _placed_while_stopping).
function Engine:dial_wanted(id, n)
  local call = self.live[id]
  local a = call and call.attempts[n]
  if not a or call.attempt ~= n or a.status ~= "dialing" or call.status ~= "dialing" or call._cancel_requested
    or a._end_pending then
    return false
  end
  if self.stopped then
    a._unsent_at_stop = true
    return false
  end
  if self.paused then
    a._unsent_at_pause = true
    return false
  end
  return true
end

-- The dial's answer came while the app stops: nobody would talk to the
-- callee, nor hear how the call ends. A placed call is hung up; the attempt
-- ends canceled and the call goes back to the queue, dialed again by the next
-- start as a call queued at the stop would be (with the store already closed,
-- the next start resolves it as a call interrupted by the stop).
function Engine:_placed_while_stopping(call, n, pid)
  local a = call.attempts[n]
  pid = a.providerCallId or pid
  a.providerCallId = pid
  if not self.closed and a.status == "dialing" and call.status == "dialing" and call.attempt == n then
    -- Queued before its hang-up is sent, which may not reach the vendor
    -- (refused, or a kill -9 first): the ring's cancel is kept unconfirmed
    -- with the attempt until taken, so that the next start asks it again
    -- and dials no sooner than that ring's end (recover), not beside it.
    a._cancel_unconfirmed = pid and true or nil
    self:_requeue_at_stop(call, n, "callagent stopped while dialing")
  end
  if pid then
    log.warn("a call was placed while callagent stopped: hanging it up; the next start dials it again",
      { call = call.id, attempt = n })
    -- As it is now: a callee who answered meanwhile is hung up as answered.
    local ok, err = self:_provider_end(self:call_view(call.id) or { callId = call.id },
      { n = n, providerCallId = pid, status = a.answeredAt and "in_progress" or "dialing" })
    if ok then
      self:_cancel_confirmed(call, a) -- taken: the next start need not ask it again
    end
    if not ok then
      hangup_failed({ call = call.id, attempt = n, error = err })
    elseif a.status == "in_progress" and call.attempt == n and not self.closed then
      self:_end_at_stop(call, n) -- answered meanwhile
    end
  end
end

-- The reason of a ringing attempt a stop canceled (it is dialed again).
local RANG_AT_STOP = "callagent stopped while it rang"
-- The reason of a ringing attempt whose stop's cancel found it over at the
-- vendor, which did not say how (its final status lost).
local ENDED_BEFORE_CANCEL = "it ended before the stop's cancel; the provider did not say how"

-- Attempt n, answered during the stop and hung up there: it ends before the
-- exit, as answered (_end_hung_up).
function Engine:_end_at_stop(call, n)
  call._end_reason = call._end_reason or "shutdown"
  self.ended_at_stop = self.ended_at_stop or {}
  self.ended_at_stop[call.id] = n
end

-- Attempt n, not answered, ends canceled by a stop, and the call waits for
-- the next start, which dials it again at once.
function Engine:_requeue_at_stop(call, n, reason)
  local a = call.attempts[n]
  local due = core.time()
  a.status, a.endedAt, a.reason = "canceled", iso(), reason
  self:_set_status(call, "queued", { nextAttemptAt = iso(due) }, function()
    self.store:update_attempt(call.id, n, { status = a.status, endedAt = a.endedAt, reason = a.reason,
      providerCallId = a.providerCallId, _cancelUnconfirmed = a._cancel_unconfirmed })
    self.store:set_retry(call.id, due)
  end)
end

-- Work a stop waits for (dials in flight, hang-ups): delta +1 or -1.
function Engine:_busy(delta)
  self.busy = (self.busy or 0) + delta
  if self.busy == 0 and self.idle_waiters then
    local ws = self.idle_waiters
    self.idle_waiters = nil
    for _, w in ipairs(ws) do
      w()
    end
  end
end

-- A safety net for providers that never report the end of ringing: the
-- ring timeout of attempt n, call.ringTimeoutSec + call.statusGraceSec
-- (and extra_ms) from now.
function Engine:_arm_ring_timer(call, n, extra_ms)
  local limit = (self.config.call.ringTimeoutSec + self.config.call.statusGraceSec) * 1000 + (extra_ms or 0)
  self.timers[call.id .. "#dial"] = timer.after(limit, function()
    self.timers[call.id .. "#dial"] = nil
    local a = call.attempts[n]
    if a and a.status == "dialing" and call.attempt == n then
      task.spawn(self._ring_timeout, self, call, n)
    end
  end)
end

-- Attempt a's ring is about to be canceled by callagent itself (why: "stop",
-- "pause" or "ring_timeout"), not by the API: kept with the attempt, so that
-- a start after a kill -9 that came before the canceled status ends it as
-- that status would have (_resolve_interrupted), not canceled for good. The
-- ring timeout's stays (it rang out, as _end_hung_up has it); else the first.
function Engine:_ring_cancel_kept(call, a, why)
  if self.closed or a._ringCanceledBy == why or (a._ringCanceledBy and why ~= "ring_timeout") then
    return
  end
  a._ringCanceledBy = why
  self:_store_write("update_attempt", call.id, a.n, { _ringCanceledBy = why })
end

-- No answer and no final status call.ringTimeoutSec + call.statusGraceSec
-- (30) s after dialing:
-- the final callback may have been lost (the vendor ends an unanswered call
-- at its ring timeout). The vendor's API, where it has one, says how the call
-- ended; if it cannot, or the call still rings, it is hung up as no_answer.
function Engine:_ring_timeout(call, n)
  local a = call.attempts[n]
  local seen, queued = self:_ask_provider(call, a, "a call that sent no status")
  if self.closed then
    return -- app:stop() closed the store meanwhile: the next start resolves the call
  end
  if a.status ~= "dialing" or call.attempt ~= n then
    return -- a status came meanwhile
  end
  if seen == "dialing" and queued then
    -- Not placed yet: it waits in the vendor's queue (Twilio places calls
    -- beyond the account's calls per second at that rate), and nothing has
    -- rung. Canceled now, it ended no_answer without ever ringing, and its
    -- retry queued behind the same burst. Its ring timeout starts again.
    if not a._queued_seen then
      -- Once per attempt; a burst of calls queues them all: rate-limited.
      a._queued_seen = true
      log.limited("warn", "the provider has not placed the call yet (it waits in the provider's queue): waiting for it",
        { call = call.id, attempt = n })
    end
    a._from_queue = true
    return self:_arm_ring_timer(call, n)
  end
  if seen == "dialing" and a._from_queue and not a._placed_waited then
    -- Placed from the vendor's queue since the last look (or later than its
    -- queue_time said): it may have rung a moment only, and its callee had
    -- no time to answer. Its ring timeout starts again, once: it has rung
    -- since before now, and the vendor ends its ring (ringTimeoutSec) first.
    a._placed_waited = true
    return self:_arm_ring_timer(call, n)
  end
  if seen == "in_progress" then
    -- Answered, its callback lost: in progress now, and its stream awaited
    -- as for any answered call (not canceled, and never dialed again).
    log.warn("no answered status came from the provider; its API says the call is up", { call = call.id, attempt = n })
    return self:provider_status(call.id, n, { status = "in_progress" })
  end
  if seen == "completed" then
    -- Answered and over, with no callback and no stream: not retried.
    log.warn("no status came from the provider; its API says the call was answered and ended", { call = call.id,
      attempt = n })
    self:_mark_answered(call, n)
    return self:_attempt_final(call, n, "failed", "answered, but no stream came (the provider's API says completed)")
  end
  if seen and FINAL[seen] then
    log.warn("no final status came from the provider; its API says the call ended", { call = call.id, attempt = n,
      status = seen })
    return self:_attempt_final(call, n, seen, "ended " .. seen .. " (no final status callback came; the provider's API)")
  end
  log.warn("no answer and no status from the provider: giving up on this attempt", { call = call.id, attempt = n })
  -- Canceled first, and ended no_answer once the vendor answered: a cancel
  -- it answers saying the callee had answered (Twilio's leaves an answered
  -- call up; the answered callback lost, no getCall to ask, or the answer
  -- came after it) makes the attempt in progress (_answered_at_cancel), not
  -- no_answer and dialed again beside the callee on the line. A canceled
  -- status for this cancel, even one a provider reports from inside its
  -- endCall (the mock phone does), ends it no_answer too (_attempt_final).
  a._rang_out = true
  self:_ring_cancel_kept(call, a, "ring_timeout")
  local copy = { n = n, providerCallId = a.providerCallId, status = "dialing" }
  local ok, err, how = self:_ring_cancel(call, n, copy)
  if self.closed then
    return -- app:stop() closed the store meanwhile: the next start resolves the call
  end
  if ok then
    self:_cancel_answered(call.id, n, how)
    return self:_rang_out(call, n)
  end
  hangup_failed({ call = call.id, attempt = n, error = err })
  if a.status ~= "dialing" or call.attempt ~= n then
    -- A status came while the cancel was on its way (answered, or over at
    -- the vendor, its retry maybe dialing already): nothing rings to wait
    -- for, and the "#dial" timer below would take the retry's ring timer's
    -- slot, that timer then out of the engine's reach (an answer, a final
    -- status and Engine:close no longer stopped it).
    return
  end
  -- The cancel refused, the phone rings on, and the callee may pick up
  -- before a later one is taken, the answered callback lost: ended
  -- no_answer now, the attempt's voice webhook got a hang-up and its retry
  -- rang the callee who had answered. So it stays dialing while the cancel
  -- is asked again (1, 2, 4 s later, until it is answered here): its voice
  -- webhook or answered status makes it in progress, as does the answer to
  -- a later cancel saying the callee had answered; a final status ends it.
  -- It ends no_answer once a cancel is taken, or call.statusGraceSec from
  -- now at the latest (the cancel asked again all the same): an answer
  -- after that still drops its retry (_answered_after_end). Kept with the
  -- attempt in the store too, so that this holds after a restart, which
  -- asks the cancel again (recover).
  a._cancel_unconfirmed = true
  if not self:_store_write("update_attempt", call.id, n, { _cancelUnconfirmed = true }) then
    call._save_failed = true -- its end is then written whole (_finish)
  end
  self:_ring_cancel_retrying(call, n, copy)
  self.timers[call.id .. "#dial"] = timer.after(self.config.call.statusGraceSec * 1000, function()
    self.timers[call.id .. "#dial"] = nil
    if not self.closed then
      self:_rang_out(call, n)
    end
  end)
end

-- One try of the cancel of attempt n's ring (_ring_timeout, and its tries
-- again): endCall's answer. A vendor whose cancel ends an answered call
-- too (Telnyx has one hang-up, and nothing that cancels only a ring;
-- Twilio's leaves an answered call up and says so) hangs up a callee who
-- answers while the cancel is on its way, and nothing can call it back: the
-- callee had answered as the ring timeout gave up, so the attempt ends as
-- the ring timeout ends it (no_answer), answered, and is not dialed again
-- (_ring_cancel_hung_up), whichever comes first: the cancel's answer, or
-- the vendor's final status while it is on its way (provider_status).
-- Only for a provider that says so (cancelEndsAnswered): a callee who
-- answers while Twilio's cancel is on its way talks, and a call they end
-- then (a report made, say) is theirs, not the cancel's.
function Engine:_ring_cancel(call, n, copy)
  local view = self:call_view(call.id) or { callId = call.id }
  if not self.provider.cancelEndsAnswered then
    return self:_provider_end(view, copy)
  end
  local a = call.attempts[n]
  local answered = a.answeredAt ~= nil
  a._ring_cancels = (a._ring_cancels or 0) + 1
  local ok, err, how = self:_provider_end(view, copy)
  a._ring_cancels = a._ring_cancels > 1 and a._ring_cancels - 1 or nil
  if ok and not answered and a.answeredAt and not (type(how) == "table" and (how.answered or how.ended))
      and not self.closed then
    self:_ring_cancel_hung_up(call, n)
  end
  return ok, err, how
end

-- Attempt n's callee answered while its ring timeout's cancel was on its
-- way, and the vendor took the cancel after the answer, ending the call
-- (_ring_cancel).
function Engine:_ring_cancel_hung_up(call, n)
  local a = call.attempts[n]
  if FINAL[a.status] or call.attempt ~= n then
    return
  end
  log.warn("the callee answered as the ring timeout's cancel reached the provider, which ended the call: "
    .. "not dialed again", { call = call.id, attempt = n })
  call._end_reason = nil -- not the callee's hang-up, nor the stream's end: the ring timeout's cancel
  return self:_attempt_final(call, n, "no_answer", "ring timeout", "not dialed again: the callee answered attempt "
    .. n .. "'s call as its ring timeout's cancel reached the provider, which ended it")
end

-- A later cancel of attempt n's ring, the ring timeout's refused one asked
-- again (_ring_timeout, or recover after a restart), was taken (how:
-- endCall's third value). One the vendor answers saying the callee had
-- answered (Twilio's leaves an answered call up), after the grace wait had
-- ended the attempt here: the callee picked up once, so its retry is
-- dropped (_answered_after_end); and nobody talks to them (the voice
-- webhook, which would have hung up, may be lost or late), so that call is
-- hung up, as answered, also when the retry was dialed already.
function Engine:_ring_cancel_taken(call, n, how)
  local a = call.attempts[n]
  if type(how) == "table" and how.answered and FINAL[a.status] then
    self:_answered_after_end(call, n, { status = "in_progress" })
    log.warn("the callee answered a call after its ring timeout had ended it here: hanging it up",
      { call = call.id, attempt = n })
    self:_end_in_task(call.id, { n = n, providerCallId = a.providerCallId, status = "in_progress" })
  end
  self:_cancel_confirmed(call, a)
  self:_rang_out(call, n)
  local due = call._due_past_ring
  call._due_past_ring = nil
  if due and call.status == "queued" and call.attempt == n and self.live[call.id] == call
      and self.timers[call.id .. "#retry"] and not self.stopped then
    -- Its retry, not dialed yet, waited for the ring to be over (recover): it is.
    self:_cancel_timer(call.id .. "#retry")
    self:_dial_after(call.id, math.max(0, math.floor((due - core.time()) * 1000)))
  end
end

-- The refused cancel of attempt n's ring (copy: endCall's attempt) asked
-- again, 1, 2 and 4 s later (at_once: now, then so), while nobody answers
-- it (_cancel_retrying); one taken goes to _ring_cancel_taken.
function Engine:_ring_cancel_retrying(call, n, copy, at_once)
  local a = call.attempts[n]
  self:_cancel_retrying(call.id, copy, function()
    return a.answeredAt == nil
  end, function(how)
    self:_ring_cancel_taken(call, n, how)
  end, { at_once = at_once, send = function()
    return self:_ring_cancel(call, n, copy)
  end })
end

-- Attempt a's ring is over at the vendor (a cancel taken, a final status):
-- no longer a call a callee may answer after the attempt ended here.
function Engine:_cancel_confirmed(call, a)
  if a._cancel_unconfirmed then
    a._cancel_unconfirmed = nil
    if not self.closed then
      self:_store_write("update_attempt", call.id, a.n, { _cancelUnconfirmed = false })
    end
  end
end

-- Attempt n, ringing at its ring timeout, whose cancel was taken (or the
-- wait for one is over): no_answer, unless a status or a voice webhook
-- came meanwhile. An API hang-up that came while the cancel was on its way
-- makes it canceled, as that hang-up (or the vendor's canceled status)
-- would end it, not no_answer with the API's reason.
function Engine:_rang_out(call, n)
  local a = call.attempts[n]
  if a.status ~= "dialing" or call.attempt ~= n then
    return
  end
  if call._cancel_requested then
    self:_attempt_final(call, n, "canceled", "canceled by API")
  else
    self:_attempt_final(call, n, "no_answer", "ring timeout")
  end
end

-- Attempt n was answered, as the provider's API says (its callback lost).
function Engine:_mark_answered(call, n)
  local a = call.attempts[n]
  if not a.answeredAt then
    a.answeredAt = iso()
    if not self:_store_write("update_attempt", call.id, n, { answeredAt = a.answeredAt }) then
      call._save_failed = true -- its end is then written whole (_finish)
    end
  end
end

-- The vendor's id for attempt n, from its answer to the dial or from its
-- first signed callback, whichever comes first: a vendor's callbacks and
-- webhooks can come before its answer. A hang-up asked for before the id was
-- known could not reach the vendor, so it is done now.
function Engine:_provider_id(call, n, pid)
  local a = call.attempts[n]
  if not a or a.providerCallId or type(pid) ~= "string" or pid == "" then
    return
  end
  a.providerCallId = pid
  if not self:_store_write("update_attempt", call.id, n, { providerCallId = pid }) then
    call._save_failed = true -- its end is then written whole (_finish)
  end
  if a._end_pending then
    a._end_pending = nil
    log.info("hanging up now that the provider has named the call", { call = call.id, attempt = n })
    self:_end_in_task(call.id, a, function()
      if not a.answeredAt then
        -- A ringing call canceled here: the vendor is asked again, as for
        -- any cancel it refuses (hangup), so that the phone stops ringing.
        self:_cancel_retrying(call.id, { n = n, providerCallId = pid, status = "dialing" })
      end
    end)
  end
end

-- provider:method(...) for call id: one that raises is logged and fails like
-- one that says no (nil, err). A third value (startCall's {permanent = true})
-- is passed on.
local function guarded(self, method, id, ...)
  local ok, res, err, how = xpcall(self.provider[method], debug.traceback, self.provider, ...)
  if not ok then
    log.error("provider " .. method .. " raised", { call = id, provider = self.provider.name, error = res })
    return nil, "the " .. tostring(self.provider.name) .. " provider's " .. method .. " failed: "
      .. tostring(res):match("^[^\n]*")
  end
  return res, err, how
end

function Engine:_provider(method, view, ...)
  return guarded(self, method, view.callId, view, ...)
end

-- What the provider's API says of attempt a now (getCall): its status, or
-- nil, err (also when getCall raises or answers no status); and, third,
-- whether the call still waits in the vendor's queue (getCall's queued).
function Engine:_provider_state(call, a)
  local st, err = guarded(self, "getCall", call.id, a.providerCallId)
  if type(st) ~= "table" or type(st.status) ~= "string" then
    return nil, err or "the provider's getCall gave no status"
  end
  return st.status, nil, st.queued == true
end

-- The same where the vendor may have no getCall (it is optional) or no
-- id for the call yet: nil then, and where it could not say (logged).
-- Its status, and whether the call waits in the vendor's queue.
function Engine:_ask_provider(call, a, what)
  if not (a.providerCallId and self.provider.getCall) then
    return nil
  end
  local seen, err, queued = self:_provider_state(call, a)
  if not seen then
    log.warn("cannot ask the provider about " .. what, { call = call.id, error = err })
  end
  return seen, queued
end

function Engine:_provider_end(view, a)
  if self.provider.endCall then
    local ok, err, how = self:_provider("endCall", view, a)
    if not ok and a and a.providerCallId and self.provider.getCall then
      -- A hang-up refused because the call is over already (Twilio's
      -- answer for one is not documented): what the vendor says of the
      -- call decides, so it is neither asked again nor reported failed.
      -- Its final callback may have been lost: the attempt ends with the
      -- status the vendor reports (else a stop would take a declined call
      -- for one its cancel ended, and dial it again past the retry policy).
      local seen = self:_provider_state({ id = view.callId }, a)
      if FINAL[seen] then
        log.info("the provider refused the hang-up of a call already over there",
          { call = view.callId, attempt = a.n, status = seen, error = err })
        self:_ended_there(view.callId, a, seen)
        return true
      end
    end
    return ok, err, how
  end
  -- No endCall (it is optional): the call ends with its media stream.
  local b = a and self.bridges[view.callId .. "#" .. tostring(a.n)]
  if b and b.stream and b.stream:is_open() then
    b.stream:close(1000, "call ended")
    return true
  end
  return nil, "the " .. tostring(self.provider.name) .. " provider has no endCall, and the call has no media stream to close"
end

-- Attempt a of call id is over at the vendor with final status seen (its
-- API says so): if it is still the call's attempt and not over here, it
-- ends as that status would have ended it (completed: answered, as
-- _ring_timeout takes it). Nothing once app:stop() closed the store.
function Engine:_ended_there(id, a, seen)
  local call = self.live[id]
  local mine = call and a.n and call.attempts[a.n]
  if self.closed or not mine or call.attempt ~= a.n or FINAL[mine.status]
      or mine.providerCallId ~= a.providerCallId then
    return
  end
  if seen == "completed" then
    self:_mark_answered(call, a.n)
  end
  self:provider_status(id, a.n, { status = seen, providerCallId = a.providerCallId,
    raw = "(the provider's API, after a refused hang-up)" })
end

-- Hangs up attempt a at the vendor from a task of its own; a failure is
-- logged (hangup_failed), and then on_failed() runs (may be nil).
function Engine:_end_in_task(id, a, on_failed, on_ended)
  task.spawn(function()
    local ok, err, how = self:_provider_end(self:call_view(id) or { callId = id }, a)
    if not ok then
      hangup_failed({ call = id, attempt = a.n, error = err })
      if on_failed then
        on_failed()
      end
    elseif on_ended then
      on_ended(how)
    end
  end)
end

-- Cancels ringing attempt a at the vendor, in a task; a cancel it refuses
-- is asked again (_cancel_retrying), so that the phone stops ringing, while
-- wanted() (optional) is true. One it answers saying the callee had
-- answered (Twilio's leaves an answered call up) makes the attempt, still
-- ringing here, in progress (_answered_at_cancel), as the pause's, the
-- stop's and the API's cancels do.
function Engine:_cancel_in_task(id, a, wanted)
  self:_end_in_task(id, a, function()
    self:_cancel_retrying(id, a, wanted)
  end, function(how)
    self:_cancel_answered(id, a.n, how)
  end)
end

-- The vendor's answer to a cancel of attempt n of call id (how: endCall's
-- third value), when it says the callee had answered: _answered_at_cancel.
function Engine:_cancel_answered(id, n, how)
  local call = self.live[id]
  if call and type(how) == "table" and how.answered and not self.closed then
    self:_answered_at_cancel(call, n)
  end
end

-- A cancel the vendor refused, asked again in the background: 1, 2, 4 s
-- later (opts.at_once: now, then so), each while wanted() (optional) is
-- true, and sent by opts.send() (endCall's answer; optional); on_taken(how)
-- (optional) runs once the vendor took one (how: endCall's third value).
local CANCEL_RETRIES = 3

function Engine:_cancel_retrying(id, a, wanted, on_taken, opts)
  opts = opts or {}
  task.spawn(function()
    for i = opts.at_once and 0 or 1, CANCEL_RETRIES do
      if i > 0 then
        timer.sleep(1000 * 2 ^ (i - 1))
      end
      if self.stopped or wanted and not wanted() then
        return
      end
      local ok, err, how
      if opts.send then
        ok, err, how = opts.send()
      else
        ok, err, how = self:_provider_end(self:call_view(id) or { callId = id }, a)
      end
      if ok then
        log.info("provider hang-up done on a later try", { call = id, attempt = a.n, try = i + 1 })
        self:_cancel_answered(id, a.n, how)
        if on_taken and not self.closed then
          on_taken(how)
        end
        return
      end
      hangup_failed({ call = id, attempt = a.n, try = i + 1, error = err })
    end
    -- One per ringing call in a vendor outage: rate-limited too.
    log.limited("error", "provider hang-up failed for good: the phone may ring until the vendor gives up",
      { call = id, attempt = a.n })
  end)
end

-- Hangs up attempt a at the vendor (may wait). While the vendor is still
-- placing the call, the hang-up waits for the call's id (_provider_id).
function Engine:_end_at_provider(call, a)
  if a and a._placing and not a.providerCallId then
    a._end_pending = true
    log.info("the hang-up waits for the provider to name the call", { call = call.id, attempt = a.n })
    return true
  end
  return self:_provider_end(self:call_view(call.id), a)
end

function Engine:_cancel_timer(key)
  local t = self.timers[key]
  if t then
    t:stop()
    self.timers[key] = nil
  end
end

-- Provider status ------------------------------------------------------------

-- The vendor says a call is up (ringing or answered) for an attempt that is
-- over here and never knew that call: a dial whose answer timed out although
-- the vendor placed the call. Nobody will talk to the callee: the call is
-- hung up (once per vendor call id; the set is kept small). A late callback
-- for the call the attempt had (ringing delivered after completed) is not.
function Engine:_end_stray(id, n, st, call)
  local pid = st.providerCallId
  if (st.status ~= "dialing" and st.status ~= "in_progress") or type(pid) ~= "string" or self.strays[pid] then
    return
  end
  -- A call whose end the store has not taken yet is the process's; a read
  -- that fails (or raises) cannot tell whose the call is: nothing is hung up.
  call = call or self.unsaved[id]
  if not call then
    local err
    call, err = self:_stored_call(id, "nothing hung up")
    if err ~= nil then
      return
    end
  end
  for _, a in ipairs(call and type(call.attempts) == "table" and call.attempts or {}) do
    if a.providerCallId == pid or a._end_pending then
      return -- the call of one of its attempts, or one a hang-up waits for
    end
  end
  if self.n_strays >= 1000 then
    self.strays, self.n_strays = {}, 0
  end
  self.strays[pid], self.n_strays = true, self.n_strays + 1
  -- One a vendor's id, which a vendor at fault may make up at every callback.
  log.limited("warn", "the provider has a call up for an attempt that is over: hanging it up", { call = id,
    attempt = n })
  self:_end_in_task(id, { n = n, providerCallId = pid, status = st.status }) -- answered: ended as such
end

-- The vendor says the callee answered (in_progress, or completed: answered
-- and over) the call of attempt n, which had ended here without ever
-- knowing that call (its dial failed, or a restart interrupted it before the
-- vendor named it), or which its ring timeout ended while the vendor
-- refused every cancel (_ring_timeout: its voice webhook counts too), while
-- the call waits to dial attempt n + 1. The callee picked up once (the call
-- is hung up: _end_stray, the voice webhook's answer): an answered call is
-- not retried, so the retry is dropped and the call ends as that attempt
-- did.
function Engine:_answered_after_end(call, n, st)
  local a = call.attempts[n]
  local pid = type(st.providerCallId) == "string" and st.providerCallId or nil
  local unknown = pid and not a.providerCallId
  local rang_out = a._cancel_unconfirmed and (pid == nil or pid == a.providerCallId)
  if (st.status ~= "in_progress" and st.status ~= "completed") or not (unknown or rang_out) or a.answeredAt
      or call.status ~= "queued" or call.attempt ~= n then
    return
  end
  self:_cancel_timer(call.id .. "#retry")
  a.answeredAt = iso()
  local why = error_text("not dialed again: the callee answered attempt " .. n .. "'s call after it had ended here ("
    .. tostring(a.reason or a.status) .. "); it was hung up")
  log.warn("the callee answered the call of an attempt that had ended: not dialed again; the call ends",
    { call = call.id, attempt = n })
  call.lastError = why
  local status = a.status ~= "canceled" and a.status or "failed"
  return self:_finish(call, status, a.reason or status, function()
    self:_save(call, { lastError = why })
    self.store:update_attempt(call.id, n, { answeredAt = a.answeredAt })
  end)
end

--- Applies a provider status (from mapStatus) to attempt n of a call.
function Engine:provider_status(id, n, st)
  local known, word = M.status_of(st)
  if not known then
    if type(type(st) == "table" and st.status or st) == "string" then
      word = '"' .. word .. '"'
    end
    -- A webhook's, as often as the vendor sends it: rate-limited.
    log.limited("error", "a provider status callagent does not know: ignored", { call = id, attempt = n,
      status = word })
    return false, "not a status: " .. word .. " (" .. STATUS_WORDS .. ")"
  end
  st = known
  local call = self.live[id]
  if not call then
    self:_end_stray(id, n, st, nil)
    return false, "unknown or finished call"
  end
  n = n or call.attempt
  local a = call.attempts[n]
  local over = not a or FINAL[a.status]
  if over then
    self:_end_stray(id, n, st, call) -- before the attempt learns the id below
    if a then
      self:_answered_after_end(call, n, st)
    end
  end
  if a and FINAL[st.status] and (st.providerCallId == nil or st.providerCallId == a.providerCallId) then
    self:_cancel_confirmed(call, a) -- its ring is over at the vendor
  end
  if a then
    self:_provider_id(call, n, st.providerCallId)
  end
  if over then
    return false, "attempt already ended"
  end
  -- A status naming another vendor call than the attempt's is not this
  -- attempt's (a vendor that signs the body only, not the URL that names
  -- the attempt: Telnyx).
  if type(st.providerCallId) == "string" and a.providerCallId and st.providerCallId ~= a.providerCallId then
    -- Anyone with one signed body may post it to any call's URL as often
    -- as they like: rate-limited.
    log.limited("warn", "a status for another provider call than the attempt's: ignored", { call = id, attempt = n,
      status = st.status })
    return false, "another provider call"
  end
  if st.sequence then
    if a._seq and st.sequence <= a._seq then
      log.debug("stale status callback ignored", { call = id, attempt = n, seq = st.sequence, status = st.status })
      return false, "stale"
    end
    a._seq = st.sequence
  end
  if rank(st.status) < rank(a.status) or (st.status == a.status and not FINAL[st.status]) then
    return false, "not newer"
  end
  local function provider_event()
    self:_add_row(call, "events", { at = iso(), type = "provider", attempt = n, status = st.status, raw = st.raw })
  end
  if st.status == "dialing" then
    provider_event()
    return true
  elseif st.status == "in_progress" then
    a.status = "in_progress"
    a.answeredAt = iso()
    a._answered_under_cancel = a._ring_cancels ~= nil or nil -- _ring_cancel
    self:_cancel_timer(id .. "#dial")
    self.timers[id .. "#stream"] = timer.after(M.STREAM_WAIT_MS, function()
      self.timers[id .. "#stream"] = nil
      self:_no_stream(call, n)
    end)
    local function answered()
      provider_event()
      self.store:update_attempt(id, n, { status = "in_progress", answeredAt = a.answeredAt })
    end
    if call.attempt == n then
      self:_set_status(call, "in_progress", nil, answered)
    else
      self:_batch(answered)
    end
    return true
  end
  if a._answered_under_cancel and a._ring_cancels then
    -- Over as the ring timeout's cancel, taken after the answer, ended it.
    provider_event()
    return self:_ring_cancel_hung_up(call, n)
  end
  provider_event()
  -- Answered and over, and its voice webhook never came (it failed on its
  -- way: the callee heard the vendor's error message, then the vendor hung
  -- up), or came and its media stream never started (the vendor could not
  -- connect it: its <Connect> ended, and the call with it). The agent never
  -- had the call: it fails as one whose stream never came does, not as a
  -- callee who hung up on the agent. Not when callagent was hanging up; the
  -- second case only where the call ends with its stream (Twilio's): Telnyx
  -- keeps a call whose stream failed (streaming.failed says so), and a
  -- status that says why it came (the mock page's own hang-up) is the
  -- callee's, there as a callee who hangs up before the stream opens is.
  local err
  local b = self.bridges[id .. "#" .. n]
  local streamless = b and not b.ended and not b.stream_sid and not b.hanging_up and b.end_reason == nil
    and self.provider.streamEndsCall ~= false and st.reason == nil
  if st.status == "completed" and (not a._voiced or streamless) and call._end_reason == nil
    and not call._cancel_requested and not call._resolving and not self.stopped then
    err = "the call ended before its media stream came: "
      .. (a._voiced and "no stream started after its voice webhook" or "its voice webhook never reached callagent")
    log.warn("the provider ended an answered call whose " .. (a._voiced and "media stream" or "voice webhook")
      .. " never came", { call = id, attempt = n })
    call._end_reason = "no_stream"
    self:_mark_answered(call, n)
  end
  -- Final, as the provider sees it.
  if b and not b.ended then
    b:finish(b.end_reason or (st.status == "completed" and "callee_hung_up") or st.status)
  end
  return self:_attempt_final(call, n, st.status, st.reason, err)
end

-- Answered M.STREAM_WAIT_MS ago, and no media stream has come: the voice
-- webhook or the stream's connection failed. With the final callback lost
-- too, nothing else would end the attempt. The call is hung up, and ends
-- failed (no_stream) unless something ended it already (a hang-up).
function Engine:_no_stream(call, n)
  local a = call.attempts[n]
  if not a or FINAL[a.status] or call.attempt ~= n then
    return
  end
  local why = string.format("no media stream %d s after the answer", M.STREAM_WAIT_MS // 1000)
  log.warn("no media stream came: hanging up", { call = call.id, attempt = n })
  call._end_reason = call._end_reason or "no_stream"
  -- Before the hang-up: a provider may end the attempt inside its endCall
  -- (the mock phone does), and the why then came after the end. So not
  -- again with the end below.
  call.lastError = why
  self:_save(call, { lastError = why })
  self:_end_in_task(call.id, a)
  self:_attempt_final(call, n, "completed", why)
end

-- After callagent's own hang-up of attempt n: with no final status from the
-- provider M.HANGUP_WAIT_MS later, the attempt ends completed.
function Engine:_await_final(call, n)
  timer.after(M.HANGUP_WAIT_MS, function()
    local a = call.attempts[n]
    if self.closed then
      return -- app:stop() closed the store meanwhile
    end
    if call.attempt == n and a and not FINAL[a.status] then
      self:_attempt_final(call, n, "completed", "no final status from the provider")
    end
  end)
end

-- Bridges ----------------------------------------------------------------------

--- POST /voice for attempt n: the model starts now; returns the stream token.
function Engine:prepare_stream(id, n)
  local call = self.live[id]
  if not call or FINAL[call.status] then
    return nil, "unknown or finished call"
  end
  if self.stopped then
    -- Answered while shutting down: the voice webhook's answer hangs up,
    -- and the call ends before the exit (_end_hung_up), as answered.
    local m = n or call.attempt
    local a = call.attempts[m]
    if a and not FINAL[a.status] and m == call.attempt and not self.closed then
      self:_end_at_stop(call, m)
      if a.status == "dialing" then
        self:provider_status(id, m, { status = "in_progress", raw = "(voice webhook)" })
      end
    end
    return nil, "shutting down"
  end
  n = n or call.attempt
  local a = call.attempts[n]
  if a and FINAL[a.status] and a._cancel_unconfirmed then
    -- Answered after its ring timeout ended it, every cancel refused: its
    -- retry would ring a callee who picked up (hung up by the answer here).
    self:_answered_after_end(call, n, { status = "in_progress" })
  end
  if not a or FINAL[a.status] or n ~= call.attempt then
    return nil, "attempt not active"
  end
  -- Answered while the API's hang-up (or the one of a call interrupted by a
  -- restart) was on its way (a cancel does not end an answered call at
  -- Twilio): the voice webhook's answer hangs up.
  if call._resolving then
    call._end_reason = call._end_reason or "interrupted by restart"
    return nil, "interrupted by restart"
  end
  if call._cancel_requested then
    return nil, "hung up through the API"
  end
  a._voiced = true -- its voice webhook came: the agent has the call
  if a.status == "dialing" then
    -- A provider asks for the call's audio only once it is answered. Its
    -- answered callback may be late, or lost (Twilio does not retry one it
    -- could not deliver): a talking call left "dialing" would be ended by the
    -- ring timeout, and retried.
    self:provider_status(id, n, { status = "in_progress", raw = "(voice webhook)" })
  end
  local key = id .. "#" .. n
  local b = self.bridges[key]
  if not b then
    b = bridge_mod.new(self, call, n)
    self.bridges[key] = b
    local warm = self.warm[key]
    self.warm[key] = nil
    b:start_model(warm)
  end
  local token = crypto.random_token(24)
  self.tokens[token] = { call_id = id, attempt = n, expires = timer.now() + 120000 }
  return token
end

--- A Media Streams `start` with its customParameters: the bridge, or nil, why
-- (and, for a stream of another call, {call, attempt} for the refusal's log
-- line). provider_call_id: the vendor's call the stream says it belongs to
-- (Twilio's start.callSid, Telnyx's start.call_control_id), when the
-- provider reads one. A stream of another call than the attempt's, by that
-- or by the callId beside the token, is refused, and the token stays for
-- the attempt's own stream (a token that leaked to a stream of another
-- call, of the same account, does not take the call's place, nor keep the
-- call's own stream out).
function Engine:claim_stream(params, provider_call_id)
  local token = params and params.token
  local entry = token and self.tokens[token]
  if not entry then
    return nil, "unknown or already used stream token"
  end
  if entry.expires >= timer.now() then
    -- The route logs the refusal (one line for it), naming the call.
    local who = { call = entry.call_id, attempt = entry.attempt }
    if provider_call_id ~= nil then
      local call = self.live[entry.call_id]
      local a = call and call.attempts[entry.attempt]
      local pid = a and a.providerCallId
      if pid and provider_call_id ~= pid then
        return nil, "stream of another provider call", who -- whatever callId it names
      end
    end
    if params.callId ~= entry.call_id then
      return nil, "stream token belongs to another call", who
    end
  end
  self.tokens[token] = nil -- single use
  if entry.expires < timer.now() then
    return nil, "expired stream token"
  end
  local b = self.bridges[entry.call_id .. "#" .. entry.attempt]
  if not b or b.ended or b.stream then
    return nil, "no call waiting for this stream"
  end
  self:_cancel_timer(entry.call_id .. "#stream") -- the stream came
  return b
end

function Engine:bridge_transcript(b, role, text, interrupted)
  local call = self.live[b.call_id]
  if not call then
    return
  end
  local line = { role = role, text = text, at = iso(), attempt = b.attempt, interrupted = interrupted }
  self:_add_row(call, "transcript", line)
  self.emit("transcript", call.id, line)
end

local USAGE_KEYS = {
  { "total_tokens" }, { "input_tokens" }, { "output_tokens" },
  { "input_token_details", "text_tokens", "input_text_tokens" },
  { "input_token_details", "audio_tokens", "input_audio_tokens" },
  { "input_token_details", "cached_tokens", "cached_tokens" },
  { "output_token_details", "text_tokens", "output_text_tokens" },
  { "output_token_details", "audio_tokens", "output_audio_tokens" },
}

function Engine:bridge_usage(b, usage)
  local call = self.live[b.call_id]
  if not call then
    return
  end
  local u = call.usage
  for _, k in ipairs(USAGE_KEYS) do
    local v
    if #k == 1 then
      v = usage[k[1]]
    else
      v = type(usage[k[1]]) == "table" and usage[k[1]][k[2]]
    end
    if type(v) == "number" and v >= 0 and v <= 2 ^ 53 then -- a count (not NaN, not infinite)
      local name = k[3] or k[1]
      u[name] = (u[name] or 0) + v
    end
  end
  u.responses = (u.responses or 0) + 1
  self:_save(call, { usage = u })
end

function Engine:bridge_report(b, report)
  local call = self.live[b.call_id]
  if not call or call.report then
    return
  end
  call.report = report
  self:_save(call, { report = report })
  log.info("call reported", { call = call.id, outcome = report.outcome })
  self.emit("report", self:call_view(call.id), report)
end

function Engine:bridge_error(b, message)
  local call = self.live[b.call_id]
  if call then
    message = error_text(message)
    self:_save(call, { lastError = message })
    call.lastError = message
    self.emit("error", call.id, message)
  end
end

function Engine:bridge_bargein(b, item_id, played_ms)
  self.emit("bargein", b.call_id, item_id, played_ms)
end

--- The bridge wants the call hung up.
function Engine:bridge_hangup(b, reason)
  local call = self.live[b.call_id]
  if not call then
    return
  end
  local a = call.attempts[b.attempt]
  log.info("hanging up", { call = call.id, attempt = b.attempt, reason = reason })
  if a then
    a._bridge_hangup = true -- on its way or taken: stream_over sends no other
    if not a._hangupReason and not FINAL[a.status] then
      -- Kept with the attempt: a restart before the vendor's final status
      -- comes ends the call as this hang-up would have (recover).
      a._hangupReason = b.end_reason or reason
      self:_store_write("update_attempt", call.id, b.attempt, { _hangupReason = a._hangupReason })
    end
  end
  task.spawn(function()
    local ok, err = self:_end_at_provider(call, a)
    if not ok then
      hangup_failed({ call = call.id, error = err })
      if a then
        a._bridge_hangup = nil
      end
      -- Closing the media stream ends the call at the vendor too (its
      -- <Connect><Stream> is over): the callee is not kept waiting.
      if not b.ended then
        b:finish(reason)
      end
    end
    -- If the provider never says the call ended, end it ourselves.
    self:_await_final(call, b.attempt)
  end)
end

--- Whether this callagent has call id: true for a call it holds or its
-- store has, false for one the store never had, nil when the store cannot
-- be read (logged: it cannot tell).
function Engine:has_call(id)
  if self.live[id] or self.unsaved[id] then
    return true
  end
  local call, err = self:_stored_call(id)
  if err ~= nil then
    return nil
  end
  return call ~= nil
end

-- The stored call a callback names (one not held here); nil and the
-- store's error when it cannot be read, logged - rate-limited, as often as
-- callbacks come - with what that leaves undone (after, may be nil).
function Engine:_stored_call(id, after)
  local call, err = store_mod.call(self.store, "get_call", id)
  if err ~= nil then
    log.limited("warn", "cannot read the call a callback names" .. (after and ": " .. after or ""),
      { call = id, error = err })
  end
  return call, err
end

--- Whether attempt n of call id has its media stream up (a bridge whose
--- stream came, not ended).
function Engine:streaming(id, n)
  local b = self.bridges[id .. "#" .. tostring(n)]
  return b ~= nil and b.stream ~= nil and not b.ended
end

--- The vendor's id of attempt n of call id (its providerCallId), or nil (no
-- such call or attempt, its id not known yet, or the store cannot be read).
-- A call that is over is read from the store, as _end_stray reads it.
function Engine:provider_call_id(id, n)
  local call = self.live[id] or self.unsaved[id]
  if not call then
    local err
    call, err = self:_stored_call(id)
    if err ~= nil then
      return nil
    end
  end
  for _, a in ipairs(call and type(call.attempts) == "table" and call.attempts or {}) do
    if a.n == n then
      return a.providerCallId
    end
  end
  return nil
end

--- The vendor says attempt n's media stream is over (it could not start, or
--- it stopped) while its call may still be up: the call is hung up now, not
--- left silent until the no_stream timer. provider_call_id must be the
--- attempt's; message (may be nil) becomes lastError. A stream that never
--- came here ends the attempt failed (no_stream); one that was streaming as
--- a closed stream does. -> true, or false, why it changed nothing.
function Engine:stream_over(id, n, provider_call_id, message)
  local call = self.live[id]
  local a = call and call.attempts[n]
  if not (a and call.attempt == n and a.status == "in_progress" and provider_call_id
      and a.providerCallId == provider_call_id) then
    return false, "not the vendor call of an attempt in progress"
  end
  local b = self.bridges[id .. "#" .. n]
  if b and not b.ended then
    if b.hanging_up then
      return false, "being hung up already"
    end
    if message then
      self:bridge_error(b, message)
    end
    b:hangup(not b.stream and "no_stream" or nil)
    return true
  end
  if a._bridge_hangup or a._final_pending then
    -- The bridge hung up (the goodbye, the API), or the attempt's end waits
    -- for the callee's last words only: the vendor stopped the stream of a
    -- call that is ending.
    return false, "being hung up already"
  end
  if a._hung_up_after_stream then
    return false, "hung up when its stream closed"
  end
  a._hung_up_after_stream = true
  self:_end_in_task(id, a)
  return true
end

--- The bridge is done (the stream closed, or the provider ended the call).
function Engine:bridge_finished(b, reason)
  local key = b.call_id .. "#" .. b.attempt
  self.bridges[key] = nil
  for token, e in pairs(self.tokens) do
    if e.call_id == b.call_id and e.attempt == b.attempt then
      self.tokens[token] = nil
    end
  end
  local call = self.live[b.call_id]
  if not call then
    return
  end
  call._end_reason = call._end_reason or reason
  local a = call.attempts[b.attempt]
  if a and not FINAL[a.status] and b.stream_closed and not b.hanging_up and self.provider.streamEndsCall == false
      and call.attempt == b.attempt and not a._hung_up_after_stream and not a._final_pending then
    -- A vendor whose call outlives its stream (Telnyx): nobody would speak
    -- on it again, and the callee is not left in silence.
    a._hung_up_after_stream = true
    log.info("media stream closed with the call up at the vendor: hanging up", { call = call.id, attempt = b.attempt })
    self:_end_in_task(call.id, a)
  end
  if a and not FINAL[a.status] then
    -- Wait briefly for the provider's own final status, then decide ourselves.
    timer.after(M.BRIDGE_END_WAIT_MS, function()
      if self.closed then
        return -- app:stop() closed the store meanwhile
      end
      if not FINAL[a.status] and call.attempt == b.attempt then
        self:_attempt_final(call, b.attempt, "completed", "stream ended")
      end
    end)
  end
end

-- Endings ----------------------------------------------------------------------

function Engine:_attempt_final(call, n, status, reason, err)
  self:_close_warm(call.id .. "#" .. n)
  local a = call.attempts[n]
  if not a or FINAL[a.status] then
    return false
  end
  local answered = a.status == "in_progress" or a.answeredAt ~= nil
  if call._model_refused == n and not answered then
    -- Being ended because the model refused its session (warm_refused):
    -- failed, as its model_error says, whatever ended the ring (its cancel's
    -- canceled status, the ring timeout after cancels the vendor refused,
    -- the vendor's own no-answer or busy before a cancel took). Also when an
    -- API hang-up came after the refusal (warm_refused ignores one after
    -- it): the call was being ended for the refusal already.
    status = "failed"
  end
  if a._rang_out and status == "canceled" and not answered and not call._cancel_requested then
    -- The ring timeout's own cancel (_ring_timeout): no answer.
    status, reason = "no_answer", "ring timeout"
  end
  if call._stop_cancel == n and status == "canceled" and not answered and not call._cancel_requested
    and not self.closed then
    -- The stop's own cancel of a ringing call: dialed again by the next start.
    return self:_requeue_at_stop(call, n, RANG_AT_STOP)
  end
  if call._pause_cancel == n and status == "canceled" and not answered and not call._cancel_requested
    and not self.closed and not self.stopped then
    call._pause_cancel = nil
    self:_hold_canceled(call, n, RANG_AT_PAUSE)
    return true
  end
  local b = self.bridges[call.id .. "#" .. n]
  if b and not b.ended then
    b:finish(b.end_reason or reason)
  end
  -- The callee's last words are still being transcribed: the attempt ends
  -- once they are in the transcript, a bounded wait (bridge.LAST_WORDS_MS).
  if b and b:after_last_words(function()
    if not self.closed then
      self:_attempt_final(call, n, status, reason, err)
    end
  end) then
    -- Over at the vendor, or hung up by us: nothing more to hang up there.
    a._final_pending = true
    return true
  end
  -- An API hang-up whose final status came before the vendor's answer to
  -- the request: the reason is still the API's, not the callee's.
  if call._cancel_requested and call._end_reason == nil then
    if answered then
      call._end_reason = "hung_up_by_api"
    else
      reason = "canceled by API"
    end
  end
  local end_reason = call._end_reason
  -- An answered call that ends because the agent failed is a failure.
  if status == "completed" and not call.report and agent_failed(end_reason) then
    status = "failed"
  end
  a.status = status
  a.endedAt = iso()
  a.reason = end_reason or reason
  if a.reason ~= nil then
    a.reason = error_text(a.reason)
  end
  -- Written with the call's next state (queued or final), in one commit: a
  -- crash between the two left a call dialing with its attempt over.
  local function write_attempt()
    self.store:update_attempt(call.id, n, { status = status, endedAt = a.endedAt, reason = a.reason })
  end
  self:_cancel_timer(call.id .. "#dial")
  log.info("attempt ended", { call = call.id, attempt = n, status = status, reason = a.reason })
  if err then
    call.lastError = err
    self:_save(call, { lastError = err })
  end
  return self:_after_attempt(call, n, status, answered, reason, write_attempt)
end

local function none() end

-- How many of attempts 1..n were made: its last one and the count. Those a
-- stop or a pause canceled while they rang (the only canceled attempts a
-- call goes on after) do not count: they are dialed again.
local function attempts_made(call, n)
  local made, last = 0, nil
  for i = 1, n or 0 do
    local a = call.attempts[i]
    if a and a.status ~= "canceled" then
      made, last = made + 1, a
    end
  end
  return made, last
end

-- Call id is dialed again in delay ms (its retry timer, canceled by a hang-up).
function Engine:_dial_after(id, delay)
  self.timers[id .. "#retry"] = timer.after(delay, function()
    self.timers[id .. "#retry"] = nil
    task.spawn(function()
      self:dial(id)
    end)
  end)
end

-- After attempt n ended with status: a retry, or the call's end, by the
-- retry policy. also: store writes that commit with the call's next state.
function Engine:_after_attempt(call, n, status, answered, reason, also)
  also = also or none
  local end_reason = call._end_reason
  if call.status == "canceled" then
    also()
    return true
  end
  local r = self.config.retry
  local retryable = false
  if not answered and call._cancel_requested == nil and not (call.attempts[n] or {})._no_retry then
    for _, s in ipairs(r.retryStatuses) do
      if s == status then
        retryable = true
      end
    end
  end
  -- Attempts a stop canceled while they rang do not count (_retry_void).
  local made = attempts_made(call, n)
  if retryable and made < r.maxAttempts then
    -- At most a day: 10^19 ms would not even be a timer's integer.
    local delay = math.floor(math.min(r.initialDelayMs * r.backoffFactor ^ (made - 1), 86400000))
    if call._retry_not_before then
      -- The vendor may still ring the attempt's call (_resolve_interrupted).
      delay = math.max(delay, math.ceil((call._retry_not_before - core.time()) * 1000))
      call._retry_not_before = nil
    end
    local due = core.time() + delay / 1000
    call._end_reason = nil
    self:_set_status(call, "queued", { nextAttemptAt = iso(due) }, function()
      also()
      self.store:set_retry(call.id, due)
    end)
    log.info("retrying later", { call = call.id, after_ms = delay, next_attempt = n + 1 })
    if self.stopped then
      return true -- the store's retry row: the next start dials it
    end
    self:_dial_after(call.id, delay)
    return true
  end
  local final = status
  if call._cancel_requested and not answered and call._model_refused ~= n then
    final = "canceled" -- not one the model's refusal was ending (_attempt_final)
  end
  return self:_finish(call, final, end_reason or (answered and status == "completed" and "completed") or reason, also)
end

-- also: more store writes that commit with the final status.
function Engine:_finish(call, status, reason, also)
  also = also or none
  if FINAL[call.status] then
    also()
    return false
  end
  if call.status == "in_progress" and status == "completed" and not call.report and reason == "completed" then
    reason = "callee_hung_up"
  end
  if reason ~= nil then
    reason = error_text(reason)
  end
  call.endReason = reason
  local note_key, note_body
  -- A final call has no next attempt (it may end while queued for one).
  local fields = { completedAt = iso(), endReason = reason or store_mod.NULL, nextAttemptAt = store_mod.NULL }
  local whole = call._save_failed -- a write of it failed before (the report, say): written whole now
  call._save_failed = nil
  if whole then
    for k, v in pairs(self:_record_fields(call)) do
      if fields[k] == nil then
        fields[k] = v
      end
    end
  end
  local saved, serr = self:_set_status(call, status, fields, function()
    also()
    if whole then
      self:_write_attempts(call)
    end
    self:_write_kept_rows(call)
    self.store:clear_retry(call.id)
    -- The notification is recorded in the same commit: a stop between the
    -- two left a final call that was never notified.
    if self.notifier then
      note_key, note_body = self.notifier:record(self:call_view(call.id))
    end
  end)
  if saved and call._save_failed then
    -- A backend without store:batch writes one by one: the record's write
    -- failed while the rest may have gone.
    saved, serr, call._save_failed = nil, "the store did not take the call's record", nil
  end
  -- The call as it ended, from the record held here: the store may not be
  -- able to read it back now (the event got nil).
  local view = self:call_view(call.id)
  self.live[call.id] = nil
  for key in pairs(self.timers) do
    if key:sub(1, #call.id + 1) == call.id .. "#" then
      self:_cancel_timer(key)
    end
  end
  if not saved then
    -- Not written (a full disk, an I/O error): the call is kept here, as it
    -- is, and written whole until the store takes it; its notification goes
    -- then, so none goes out for a state the store does not have.
    log.error("the end of a call could not be written: writing it again every 5 s", { call = call.id,
      status = status, error = serr })
    -- A backend without store:batch may have taken the notification's row
    -- (one write at a time): recorded again, it is not new, and would not
    -- be sent. It goes out with the end's write (_write_unsaved).
    call._note = note_key and { note_key, note_body } or nil
    note_key = nil
    self.unsaved[call.id] = call
    self:_write_unsaved(call.id)
  end
  self.emit("ended", view)
  if note_key then
    self.notifier:send(note_key, note_body)
  end
  return true
end

-- A module field, read when used, so that a test can shorten it.
M.UNSAVED_RETRY_MS = 5000

-- The fields of a call's record as the store keeps them (not its rows).
-- Those the call may have dropped since its last write that was taken (a
-- retry's nextAttemptAt, once it dialed or ended) are cleared in the store
-- too: written whole, the record is the call as the process has it.
local CLEARABLE = { "nextAttemptAt", "endReason" }

function Engine:_record_fields(call)
  local fields = public_fields(call)
  fields.id, fields.attempts, fields.transcript, fields.events = nil, nil, nil, nil
  for _, k in ipairs(CLEARABLE) do
    if fields[k] == nil then
      fields[k] = store_mod.NULL
    end
  end
  return fields
end

function Engine:_write_attempts(call)
  for _, a in ipairs(call.attempts or {}) do
    self.store:add_attempt(call.id, public_fields(a))
  end
end

-- Writes a final call the store refused, whole (its record, its attempts,
-- its notification, one commit), every M.UNSAVED_RETRY_MS until it takes it.
function Engine:_write_unsaved(id)
  self.timers[id .. "#unsaved"] = timer.after(M.UNSAVED_RETRY_MS, function()
    self.timers[id .. "#unsaved"] = nil
    local call = self.unsaved[id]
    if not call or self.closed then
      return -- app:stop() closed the store: the next start resolves the call
    end
    local key, body
    call._save_failed = nil
    local ok = self:_batch(function()
      self:_save(call, self:_record_fields(call))
      self:_write_attempts(call)
      self:_write_kept_rows(call)
      self.store:clear_retry(id)
      if self.notifier then
        key, body = self.notifier:record(self:call_view(id))
      end
    end)
    if not ok or call._save_failed then
      return self:_write_unsaved(id)
    end
    if not key and call._note then
      -- Recorded by _finish, not sent by it; unless a sweep sent it meanwhile.
      local pending = store_mod.call(self.store, "pending_notifications", { keys = { call._note[1] } })
      if pending and pending[1] then
        key, body = call._note[1], call._note[2]
      end
    end
    call._note = nil
    self.unsaved[id] = nil
    log.info("the end of a call was written at last", { call = id, status = call.status })
    if key then
      self.notifier:send(key, body)
    end
  end)
end

--- POST /v1/calls/{id}/hangup. Returns true (202), or nil, "not_active".
-- One hang-up of an attempt at the vendor at a time: requests that come
-- while it is on its way wait for it and get its answer; once the vendor
-- took it, later ones send nothing (the vendor's final status ends the
-- call, or _await_final does); once the vendor refused it, the next
-- request asks again.
function Engine:hangup(id)
  local call = self.live[id]
  if not call then
    return nil, "not_active"
  end
  call._cancel_requested = true
  local n = call.attempt
  local a = call.attempts[n]
  if a and not a._hangupAsked and not FINAL[a.status] then
    -- Kept with the attempt: a restart before the call ends (the vendor's
    -- final status on its way) ends it as this hang-up asked, not as one
    -- the restart interrupted (recover).
    a._hangupAsked = true
    self:_store_write("update_attempt", id, n, { _hangupAsked = true })
  end
  if call.status == "queued" then
    self:_cancel_timer(id .. "#retry")
    self:_finish(call, "canceled", "canceled by API")
    return true
  end
  local b = self.bridges[id .. "#" .. n]
  if b then
    b.end_reason = b.end_reason or "hung_up_by_api" -- a reason of its own (model_error) stays
    b:hangup("hung_up_by_api")
    return true
  end
  if not a then
    return (self:_hangup_attempt(call, n, a))
  end
  local h = a._api_hangup
  if h == "taken" then
    return true
  elseif h then
    local ok, res = task.wait_in(h)
    if not ok then
      error(res, 0) -- the first request's error, as it got it
    end
    return res
  end
  h = {}
  a._api_hangup = h
  local res = table.pack(pcall(self._hangup_attempt, self, call, n, a))
  a._api_hangup = res[1] and res[3] and "taken" or nil
  for _, wake in ipairs(h) do
    wake(res[1], res[2])
  end
  if not res[1] then
    error(res[2], 0)
  end
  return res[2]
end

-- The API's hang-up of attempt n, with no bridge: returns true, and whether
-- the vendor took the hang-up.
function Engine:_hangup_attempt(call, n, a)
  local id = call.id
  local was = a and a.status
  local ok, err, how = self:_end_at_provider(call, a)
  if not ok then
    hangup_failed({ call = id, error = err })
  end
  if self.closed then
    return true, ok -- app:stop() closed the store meanwhile: the next start resolves the call
  end
  if ok then
    -- A cancel that came after the answer: the callee is on the line, and is
    -- hung up as answered below.
    self:_cancel_answered(id, n, how)
  end
  if a and a.status == "dialing" then
    if not ok then
      -- The call is canceled here (a callee who answers gets a hang-up),
      -- but the phone would ring on: the vendor is asked again.
      self:_cancel_retrying(id, { n = n, providerCallId = a.providerCallId, status = "dialing" })
    end
    self:_attempt_final(call, n, "canceled", "canceled by API")
  elseif a and a.status == "in_progress" then
    -- Answered, with no stream yet (or meanwhile: what was sent to end a
    -- ringing call may not end an answered one, as Twilio's cancel does not;
    -- it is asked again, as answered).
    call._end_reason = call._end_reason or "hung_up_by_api"
    if was == "dialing" then
      log.info("answered while being hung up: hanging up again", { call = id, attempt = n })
      ok, err = self:_provider_end(self:call_view(id) or { callId = id }, a)
      if not ok then
        hangup_failed({ call = id, error = err })
      end
      if self.closed then
        return true, ok
      end
    end
    self:_await_final(call, n)
  end
  return true, ok
end

-- After a restart ---------------------------------------------------------------

local ALIVE = { dialing = true, in_progress = true }

-- Resolves a call that was dialing or talking when the last run ended: the
-- provider is asked for the call's real state where it can tell.
function Engine:_resolve_interrupted(call)
  local n = call.attempt
  local a = call.attempts[n]
  local why = "interrupted by restart"
  if not a then
    return self:_finish(call, "failed", why)
  end
  if FINAL[a.status] then
    -- Its attempt had ended, but not the call (a store from before the two
    -- were written in one commit): the retry policy decides, as it would have.
    return self:_after_attempt(call, n, a.status, a.answeredAt ~= nil, a.reason)
  end
  -- No stream for it now: a voice webhook that comes while the vendor is
  -- asked is answered with a hang-up.
  call._resolving = true
  local seen = self:_ask_provider(call, a, "an interrupted call")
  if self.closed then
    return -- app:stop() closed the store meanwhile: the next start resolves it again
  end
  call._resolving = nil -- decided below; a retry's attempt gets its stream
  if self.live[call.id] ~= call or FINAL[a.status] then
    return -- ended meanwhile (hung up through the API)
  end
  if seen == "in_progress" or seen == "completed" then
    -- Answered while we were down (completed is answered, then over): the
    -- callee picked up once, so this attempt is not followed by another.
    self:_mark_answered(call, n)
  end
  -- The model refused its session while it rang, and neither the refusal's
  -- cancel nor the stop's had taken (recover): unanswered, it ends as that
  -- cancel would have ended it, failed (model_error, the refusal's
  -- lastError), not retried; a dial again would ring into the same refusal.
  local refused = call._model_refused == n and a.status == "dialing" and not a.answeredAt
  local up
  if seen and ALIVE[seen] then
    -- Still up at the vendor, but its audio had nowhere to go: end it (as
    -- answered, if the vendor or a callback since says so), once the attempt
    -- has ended here: the vendor's final status for our own hang-up
    -- (canceled) is not the call's.
    local answered = (seen == "in_progress" or a.status == "in_progress") and "in_progress" or a.status
    up = { n = n, providerCallId = a.providerCallId, status = answered }
    why = why .. " (the call was still up: hung up)"
  elseif seen == "canceled" and not refused and not call._cancel_requested and not a.answeredAt
      and (a._ringCanceledBy == "stop" or a._ringCanceledBy == "pause") then
    -- The last run's stop (or its tunnel's fall) canceled the ring, and it
    -- died before the canceled status: dialed again, as that status would
    -- have had it (uncounted), not ended canceled, which only the API does.
    return self:_hold_canceled(call, n, a._ringCanceledBy == "stop" and RANG_AT_STOP or RANG_AT_PAUSE)
  elseif seen and seen ~= "completed" then
    -- It ended unanswered while we were down: the usual rules (retries) apply.
    -- Canceled by its ring timeout's cancel, it rang out (_attempt_final).
    a._rang_out = a._rang_out or (seen == "canceled" and a._ringCanceledBy == "ring_timeout") or nil
    return self:_attempt_final(call, n, seen, "ended while callagent was down")
  elseif seen == "completed" then
    why = why .. " (the call ended while callagent was down)"
  elseif a.providerCallId and self.provider.getCall then
    -- The vendor could not say: it may still ring, and a retry would ring
    -- beside it. Ended there, as a ring timeout the API cannot explain is.
    up = { n = n, providerCallId = a.providerCallId, status = a.status }
    why = why .. " (its state unknown: hung up)"
  end
  local answered = a.status == "in_progress" or a.answeredAt ~= nil
  if not a.providerCallId and a.status == "dialing" then
    -- Its dial request was on its way: the vendor may ring a call nobody
    -- here can name or cancel (its first callbacks went to the process
    -- that died). A retry waits until that ring is over, as the ring
    -- timeout would end it (ringTimeoutSec + statusGraceSec after the
    -- dial), so that two calls never ring the callee at once.
    local started = from_iso(a.startedAt)
    call._retry_not_before = started and core.time() + self:_ring_end_wait(started) / 1000
  end
  if refused then
    log.info("an interrupted call rang with a session the model refused: it ends failed (model_error)",
      { call = call.id, attempt = n })
  elseif call._cancel_requested then
    -- Hung up through the API before the stop, its end not in yet: it ends
    -- as the API's hang-up ends a call (completed, hung_up_by_api; one
    -- never answered, canceled).
    log.info("an interrupted call had been hung up through the API: it ends so", { call = call.id, attempt = n })
    call._end_reason = answered and "hung_up_by_api" or nil
  elseif call._hangup_reason and answered then
    -- The agent had hung up (the goodbye done, a limit, the model's
    -- failure), the vendor's final status on its way: it ends as that
    -- hang-up ends a call (a failure of the agent's, failed), its
    -- lastError what happened.
    log.info("an interrupted call had been hung up by its agent: it ends so", { call = call.id, attempt = n,
      reason = call._hangup_reason })
    call._end_reason = call._hangup_reason
  else
    call._end_reason = why
    if not call.report then
      call.lastError = why
      self:_save(call, { lastError = why })
    end
  end
  -- Answered attempts end the call; unanswered ones follow the retry policy.
  local status = (call.report or (call._cancel_requested or call._hangup_reason) and answered) and "completed"
    or call._cancel_requested and "canceled" or "failed"
  local ok = self:_attempt_final(call, n, status, why)
  if up then
    -- A hang-up the vendor refuses is asked again (1, 2, 4 s later), as any
    -- cancel is: the phone would ring on, beside the retry.
    self:_end_in_task(call.id, up, function()
      self:_cancel_retrying(call.id, up)
    end)
  end
  return ok
end

-- How long, in ms, until the vendor's ring of an attempt dialed at started
-- (epoch s, the last run's clock) is over: call.ringTimeoutSec +
-- call.statusGraceSec after that dial, when the vendor has given up on it.
-- At most that long: a dial the last run's clock put ahead of this run's
-- (the host's clock set back since) does not hold the call for the gap.
function Engine:_ring_end_wait(started)
  local c = self.config.call
  local ring_ms = (c.ringTimeoutSec + c.statusGraceSec) * 1000
  return math.max(0, math.min(ring_ms, math.ceil((started - core.time()) * 1000) + ring_ms))
end

-- A queued call that this run's retry policy would not have queued (a
-- restart may have lowered retry.maxAttempts, or taken its last attempt's
-- status out of retry.retryStatuses): its last attempt and why; else nil.
-- Attempts a stop canceled while they rang do not count: they are dialed again.
function Engine:_retry_void(call)
  local made, last = attempts_made(call, call.attempt)
  if not last then
    return nil
  end
  local r = self.config.retry
  if made >= r.maxAttempts then
    return last, "retry.maxAttempts is " .. r.maxAttempts .. " now"
  end
  for _, st in ipairs(r.retryStatuses) do
    if st == last.status then
      return nil
    end
  end
  return last, "retry.retryStatuses has no " .. tostring(last.status) .. " now"
end

-- Ends a queued call whose retry this run's policy would not have made, as
-- its retries running out would have: final as its last attempt ended, with
-- that attempt's reason; lastError and the log say why it was not dialed.
function Engine:_end_retry_void(call, a, why)
  why = error_text("not dialed again: " .. why .. " (attempt " .. a.n .. " was the last: "
    .. tostring(a.reason or a.status) .. ")")
  log.warn("a retry queued before the restart is past this run's retry policy: not dialed; the call ends",
    { call = call.id, attempt = a.n, status = a.status, why = why })
  call.lastError = why
  local status = FINAL[a.status] and a.status ~= "canceled" and a.status or "failed"
  return self:_finish(call, status, a.reason or status, function()
    self:_save(call, { lastError = why })
  end)
end

-- Attempt a ended at its ring timeout, the vendor refusing every cancel
-- of its ring until the last run stopped: the phone may ring on (beside
-- the retry). The cancel is asked again now, then 1, 2 and 4 s later, as
-- that run did (_ring_timeout).
function Engine:_ring_cancel_again(call, a)
  log.info("asking again for the cancel of a ring the last run could not cancel", { call = call.id, attempt = a.n })
  self:_ring_cancel_retrying(call, a.n, { n = a.n, providerCallId = a.providerCallId, status = "dialing" }, true)
end

--- Picks up where the last run stopped: due and overdue retries are
-- scheduled (each runs once: its row goes when it dials), calls never dialed
-- are dialed, calls that were dialing or talking are resolved, queued calls
-- this run's retry policy would not retry end. Returns counts.
function Engine:recover()
  -- A read that fails stops the start (app:start says so): going on would
  -- leave the last run's calls undialed and unresolved.
  local active, err = self.store:active_calls()
  local due = active and table.pack(self.store:due_retries())
  if not active or not due[1] then
    error("the store could not be read: " .. tostring(err or due[2]), 0)
  end
  local retries = {}
  for _, r in ipairs(due[1]) do
    retries[r.call_id] = r.due_at
  end
  local counts = { retries = 0, dialed = 0, resolved = 0, ended = 0 }
  for _, call in ipairs(active) do
    if self.live[call.id] then
      goto next -- this run's own (created before recover ran): not interrupted
    end
    -- Numbers come back from the store's JSON as floats (1.0): keys such
    -- as id .. "#" .. n need the integers.
    call.attempt = math.tointeger(call.attempt) or call.attempt
    local attempts = {}
    for _, a in ipairs(call.attempts or {}) do
      a.n = math.tointeger(a.n) or a.n
      attempts[a.n] = a
    end
    call.attempts = attempts
    local last = attempts[call.attempt]
    if last and last._modelRefused and last.status == "dialing" and not last.answeredAt then
      -- Ringing when the last run ended, with a session the model had
      -- refused (warm_refused): as that run had it, in memory.
      model_refused(call, last)
    end
    if last and last._cancelUnconfirmed == true and not last.answeredAt then
      -- Its ring timeout ended it while the vendor refused every cancel
      -- (_ring_timeout), or a stop queued it again before its cancel was
      -- taken (_placed_while_stopping): the callee may still answer that
      -- call, whose answer drops the retry (_answered_after_end), as in the
      -- last run.
      last._cancel_unconfirmed = true
    end
    if last and last._hangupAsked and call.status ~= "queued" then
      call._cancel_requested = true -- hung up through the API (hangup): it ends as that asked
    end
    if last and type(last._hangupReason) == "string" and call.status ~= "queued" then
      call._hangup_reason = last._hangupReason -- the agent's own hang-up (bridge_hangup)
    end
    call.transcript = nil -- in the store; see call_view
    call.usage = call.usage or {}
    call.events = nil
    self.live[call.id] = call
    if last and last._cancel_unconfirmed and FINAL[last.status] then
      self:_ring_cancel_again(call, last)
    end
    local void, why
    if call.status == "queued" then
      void, why = self:_retry_void(call)
    end
    if void then
      -- Its retry was queued under another retry policy than this run's.
      counts.ended = counts.ended + 1
      self:_end_retry_void(call, void, why)
    elseif call.status == "queued" then
      local due = retries[call.id]
      local delay = due and math.max(0, math.floor((due - core.time()) * 1000)) or 0
      -- Its last ring, which a cancel not taken may leave going at the vendor.
      local started = last and last._cancel_unconfirmed and from_iso(last.startedAt)
      local ring_wait = started and self:_ring_end_wait(started) or 0
      if ring_wait > delay then
        -- Its last ring may go on at the vendor (the cancel is asked again
        -- above): dialed no sooner than the vendor ends it itself, at its
        -- ring timeout, so that two calls never ring the callee at once;
        -- or at its own time once the vendor takes that cancel
        -- (_ring_cancel_taken), which ends the ring.
        call._due_past_ring = core.time() + delay / 1000
        delay = ring_wait
      end
      counts[due and "retries" or "dialed"] = counts[due and "retries" or "dialed"] + 1
      log.info("recovered a queued call", { call = call.id, dial_in_ms = delay, attempt = call.attempt + 1 })
      self:_dial_after(call.id, delay)
    else
      counts.resolved = counts.resolved + 1
      log.info("resolving a call interrupted by the restart", { call = call.id, status = call.status })
      task.spawn(function()
        self:_resolve_interrupted(call)
      end)
    end
    ::next::
  end
  return counts
end

-- Hang-ups in flight at once on shutdown: one at a time, a few hundred live
-- calls would outlast the shutdown grace (runtime.grace_ms) at any API
-- round trip; all at once could trip the telephony API's concurrency limit.
local SHUTDOWN_HANGUPS = 16
-- How long, at most, the shutdown waits for the vendor's final status of the
-- calls it hung up.
local SHUTDOWN_FINAL_WAIT_MS = 2000

function Engine:_cancel_timers()
  for key in pairs(self.timers) do
    self:_cancel_timer(key)
  end
end

--- After shutdown, before the store closes: no timer fires any more.
function Engine:close()
  self.stopped = true
  self.closed = true
  self:_cancel_timers()
  self:_close_warms()
end

function Engine:_close_warms()
  for key in pairs(self.warm) do
    self:_close_warm(key)
  end
end

--- Stops everything (program shutdown): hang up active calls. Inside a
-- task, waits for the hang-ups, at most deadline_ms when given (what is
-- left goes on in the background: the tunnel and the store must still close
-- within the program's grace period).
function Engine:shutdown(deadline_ms)
  local started = timer.now()
  self.stopped = true -- background hang-up retries end
  -- No retries or other timers fire while the calls are being hung up.
  self:_cancel_timers()
  self:_close_warms() -- a call answered now is hung up (prepare_stream)
  -- Attempts waiting for the callee's last words end now, while the store is open.
  local tails = {}
  for _, b in pairs(self.bridges) do
    tails[#tails + 1] = b
  end
  for _, b in ipairs(tails) do
    b:end_last_words()
  end
  local todo = {}
  for id, call in pairs(self.live) do
    local b = self.bridges[id .. "#" .. call.attempt]
    local a = call.attempts[call.attempt]
    if b then
      -- One hung up through the API already ends as that hang-up asked
      -- (hung_up_by_api; also when its final status does not come and
      -- _end_hung_up ends it), as it does when the stop waits for its end.
      if call._cancel_requested and b.end_reason then
        call._end_reason = call._end_reason or b.end_reason
      else
        b.end_reason = "shutdown"
      end
      todo[#todo + 1] = { self:call_view(id), a }
    elseif a and a.status == "in_progress" then
      -- Answered, its stream not come yet: hung up as well, not left talking
      -- to a server about to close.
      call._end_reason = call._end_reason or "shutdown"
      todo[#todo + 1] = { self:call_view(id), a }
    elseif a and a.status == "dialing" and a.providerCallId and not a._placing and call.attempt == a.n then
      -- Ringing: a callee who answered once the server is gone would hear
      -- the vendor's error message. Canceled, and dialed again by the next
      -- start (unless the cancel fails: that start resolves it then). One
      -- whose dial request is still on its way: _placed_while_stopping.
      call._stop_cancel = a.n -- its canceled status requeues it (_attempt_final)
      self:_ring_cancel_kept(call, a, "stop")
      todo[#todo + 1] = { self:call_view(id), a, ringing = true }
    end
  end
  local next_one = 0
  local function worker()
    while next_one < #todo do
      next_one = next_one + 1
      local entry = todo[next_one]
      local ok, err, how = self:_provider_end(entry[1], entry[2])
      if ok and type(how) == "table" and how.ended then
        entry.ended_there = true -- over before the cancel (_end_hung_up)
      end
      if ok and entry.ringing then
        local call = self.live[entry[1].callId]
        if call and call.attempts[entry[2].n] then
          self:_cancel_confirmed(call, call.attempts[entry[2].n])
        end
        -- Answered before the cancel came, its answered status not come
        -- (Twilio's cancel leaves the call up and says so): hung up as
        -- answered below, not queued again.
        self:_cancel_answered(entry[1].callId, entry[2].n, how)
        self:_rang_at_stop(entry)
      end
      entry.hung_up = ok
      if not ok then
        log.warn("hang-up at shutdown failed", { call = entry[1].callId, error = tostring(err) })
      end
    end
  end
  for _ = 1, math.min(SHUTDOWN_HANGUPS, #todo) do
    self:_busy(1)
    task.spawn(function()
      worker()
      self:_busy(-1)
    end)
  end
  -- Outside a task nothing can wait: the hang-ups go on in the background.
  if (self.busy or 0) > 0 and task.running() then
    self.idle_waiters = self.idle_waiters or {}
    local _, err = task.wait_in(self.idle_waiters, deadline_ms)
    if err then
      log.warn("shutdown: hang-ups or dials still under way; going on without them", {
        hangups_left = #todo - next_one, in_flight = self.busy, waited_ms = deadline_ms })
    end
    self:_end_hung_up(todo, math.min(SHUTDOWN_FINAL_WAIT_MS, (deadline_ms or math.huge) - (timer.now() - started)))
  end
end


-- A ringing call shutdown canceled, answered meanwhile: hung up again, as
-- answered (a vendor takes the cancel of an answered call as a no-op).
function Engine:_rang_at_stop(entry)
  local call, a = self.live[entry[1].callId], entry[2]
  if not call or call.attempt ~= a.n or self.closed or a.status ~= "in_progress" or entry.answered then
    return -- still dialing: its canceled status requeues it (_attempt_final, _end_hung_up)
  end
  entry.answered = true
  call._end_reason = call._end_reason or "shutdown"
  local ok, err = self:_provider_end(self:call_view(call.id) or entry[1], a)
  if not ok then
    log.warn("hang-up at shutdown failed", { call = call.id, error = tostring(err) })
  end
end

-- The calls shutdown hung up end with the vendor's final status, which comes
-- back through the server, still open: waited for, up to wait_ms. One whose
-- status has not come by then ends here, as that status would have ended it
-- (the vendor took the hang-up), so the next start does not take it for a
-- call a restart interrupted. One whose hang-up failed is left to that start.
function Engine:_end_hung_up(todo, wait_ms)
  -- Calls answered during the stop, their hang-up the voice webhook's answer
  -- (prepare_stream) or the stop's hang-up of a dial placed meanwhile.
  for id, n in pairs(self.ended_at_stop or {}) do
    local call = self.live[id]
    if call and call.attempts[n] then
      todo[#todo + 1] = { { callId = id }, call.attempts[n], hung_up = true }
    end
  end
  local function open(entry) -- the call, while its hung-up attempt has not ended
    local call = self.live[entry[1].callId]
    local a = entry[2]
    if entry.hung_up and call and call.attempt == a.n and not FINAL[a.status] then
      return call
    end
  end
  local until_ms = timer.now() + math.max(0, wait_ms)
  local left = true
  while left and timer.now() < until_ms do
    left = false
    for _, entry in ipairs(todo) do
      left = left or open(entry) ~= nil
    end
    if left then
      timer.sleep(25)
    end
  end
  for _, entry in ipairs(todo) do
    local call, a = open(entry), entry[2]
    if call and a.status == "dialing" and call._cancel_requested then
      -- Canceled through the API as well (its request still on its way):
      -- it ends canceled, as that request would have ended it, not dialed again.
      self:_attempt_final(call, a.n, "canceled", "canceled by API")
    elseif call and a.status == "dialing" and entry.ended_there then
      -- The vendor said it was over before the cancel, not how (Telnyx's
      -- "already ended"), and its final status never came: it ended on its
      -- own (declined, unanswered), so the retry policy decides, as for a
      -- failed attempt; requeued, it was dialed again past maxAttempts.
      self:_attempt_final(call, a.n, "failed", ENDED_BEFORE_CANCEL)
    elseif call and a.status == "dialing" and call._model_refused == a.n then
      -- Canceled for the model's refusal as well (warm_refused), its
      -- canceled status not come: it ends failed (model_error), not retried,
      -- as that status would have ended it; queued, the next start dialed it
      -- again, to the same refusal.
      self:_attempt_final(call, a.n, "canceled", "canceled: the model refused its session")
    elseif call and a.status == "dialing" and a._rang_out then
      -- The ring timeout's cancel was on its way too (_ring_timeout), its
      -- canceled status not come: it rang out, no_answer (_attempt_final),
      -- as that status would have ended it; queued, it rang again, and
      -- did not count toward retry.maxAttempts.
      self:_attempt_final(call, a.n, "canceled", "ring timeout")
    elseif call and a.status == "dialing" then
      -- A ringing call canceled, its canceled status not come: queued again.
      self:_requeue_at_stop(call, a.n, RANG_AT_STOP)
    elseif call then
      if entry.ringing then
        self:_rang_at_stop(entry) -- answered during the stop: a cancel does not end it
      end
      call._end_reason = call._end_reason or "shutdown"
      log.info("no final status from the provider for a call hung up at shutdown: ended here", { call = call.id })
      self:provider_status(call.id, a.n, { status = "completed", raw = "(hung up at shutdown)" })
    end
  end
end

function Engine:active_count()
  local n = 0
  for _ in pairs(self.live) do
    n = n + 1
  end
  return n
end

return M
