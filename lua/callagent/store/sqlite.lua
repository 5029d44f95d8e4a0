--- callagent.store.sqlite: the durable call store (the default backend).
--
-- One SQLite file (store.path, created with its folder if missing) in WAL
-- mode: every write is committed when the call returns (it survives kill -9;
-- synchronous=NORMAL, so not a power loss between checkpoints), and WAL
-- checkpoints run on the thread pool, off the event loop (src/sqlite.c).
-- One process at a time: the open holds an flock on store.path .. ".lock"
-- (beside the real file, links followed) until close (or the process's death).
-- Records are JSON documents in a few tables; see lua/callagent/store/init.lua
-- for the interface.
local sqlite = require "callagent.sqlite"
local json = require "callagent.json"
local core = require "callagent.core"
local log = require "callagent.log"
local task = require "callagent.task"
local timer = require "callagent.timer"

local M = {}
local Store = {}
Store.__index = Store

local SCHEMA = [[
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS calls (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  status TEXT NOT NULL,
  created REAL NOT NULL,
  doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_by_status ON calls (status, seq);
CREATE INDEX IF NOT EXISTS calls_by_created ON calls (created);
CREATE TABLE IF NOT EXISTS attempts (
  call_id TEXT NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
  n INTEGER NOT NULL,
  doc TEXT NOT NULL,
  PRIMARY KEY (call_id, n)
);
CREATE TABLE IF NOT EXISTS transcript (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  call_id TEXT NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
  doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS transcript_by_call ON transcript (call_id, id);
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  call_id TEXT NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
  doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_call ON events (call_id, id);
CREATE TABLE IF NOT EXISTS retries (
  call_id TEXT PRIMARY KEY REFERENCES calls (id) ON DELETE CASCADE,
  due_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS notifications (
  key TEXT PRIMARY KEY,
  call_id TEXT NOT NULL,
  payload TEXT NOT NULL,
  sent INTEGER NOT NULL DEFAULT 0,
  tries INTEGER NOT NULL DEFAULT 0,
  last_error TEXT,
  created REAL NOT NULL,
  refused_under TEXT
);
CREATE INDEX IF NOT EXISTS notifications_by_created ON notifications (created);
-- The backlog still to send, walked a page at a time in (created, rowid)
-- order: sent ones, most of the table, are not in it.
CREATE INDEX IF NOT EXISTS notifications_pending ON notifications (created) WHERE sent = 0;
CREATE TABLE IF NOT EXISTS idempotency (
  key TEXT PRIMARY KEY,
  call_id TEXT NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
  fingerprint TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_by_call ON idempotency (call_id);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', '1');
]]
-- The meta row 'schema': changes a callagent before this one cannot read
-- bump it (tables added with CREATE IF NOT EXISTS do not, nor nullable
-- columns: every statement names its columns).
local SCHEMA_VERSION = 1
-- The tables of SCHEMA.
local OWN_TABLES = {}
for name in SCHEMA:gmatch("CREATE TABLE IF NOT EXISTS ([%w_]+)") do
  OWN_TABLES[name] = true
end

-- Columns added since the tables were first written: a store from before
-- gets them at open (NULL in its rows, which is what they held then).
local ADDED_COLUMNS = {
  -- The fingerprint of the notify.hooksUrl and hooksToken a notification was
  -- refused under (401, 403, 404); NULL for every other state.
  { "notifications", "refused_under", "TEXT" },
}
-- What needs the added columns: after them.
local SCHEMA_ADDED = [[
-- The notifications refused for a config's token or address, which a start
-- under another one sends again.
CREATE INDEX IF NOT EXISTS notifications_refused ON notifications (refused_under) WHERE refused_under IS NOT NULL;
]]

-- The call document holds everything but the rows of its own tables.
local SEPARATE = { attempts = true, transcript = true, events = true, id = true }

local encode, decode = json.encode_stored, json.decode_stored

-- A document of the store read back (what: which, for the error). One that
-- is no JSON object - a row damaged inside a file whose pages are sound
-- (integrity_check reads the pages, not what they hold), or written by
-- another program - raises naming the file and the row, not json.lua: at
-- start that error stops it, and says what to mend.
local function decode_doc(path, raw, what)
  local ok, v = pcall(decode, raw)
  if not ok or type(v) ~= "table" then
    local why = ok and "a JSON " .. type(v) or tostring(v):gsub("^[^\n]-%.lua:%d+: ", "")
    error("ECORRUPT: " .. tostring(path) .. ": " .. what .. " is not a JSON object (" .. why .. ")", 0)
  end
  return v
end
local cursor_seq = require("callagent.store.memory").cursor_seq
-- A call's rows of the other tables, oldest first.
local CALL_ROWS = {
  attempts = "SELECT doc FROM attempts WHERE call_id = ? ORDER BY n",
  transcript = "SELECT doc FROM transcript WHERE call_id = ? ORDER BY id",
  events = "SELECT doc FROM events WHERE call_id = ? ORDER BY id",
}

-- Creates dir and its missing parents, mode 0700 (less the umask): the store
-- holds numbers and transcripts; a folder that is there keeps its mode.
-- true, or nil, "ECODE: cannot create the folder <one>: message" for the
-- first that could not be made (under a umask that takes the owner's write
-- bit off, the one in a folder made just before: SQLite then said "No such
-- file or directory" of the file).
local function mkdir_p(dir)
  local acc = dir:sub(1, 1) == "/" and "" or "."
  for part in dir:gmatch("[^/]+") do
    acc = acc .. "/" .. part
    local ok, err = core.mkdir(acc, 448) -- 0700
    if not ok then
      local code, msg = tostring(err):match("^(E%u+): (.*)$")
      return nil, (code or "EIO") .. ": cannot create the folder " .. acc .. ": " .. (msg or tostring(err))
    end
  end
  return true
end

-- The tables, the columns added since and the indexes on them, in one
-- commit. Returns a message when the file is a store a newer callagent
-- wrote; raises when the SQL does not fit the file (another program's
-- database with a table called meta or calls): rolled back, left as it was.
local function set_up(db, path)
  local function must(ok, err)
    if ok == nil then
      error(err, 0)
    end
    return ok
  end
  -- Before anything is created in it: a store a newer callagent wrote is
  -- not this one's to change.
  local tables, has_meta = {}, false
  for _, r in ipairs(must(db:rows("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite!_%' "
    .. "ESCAPE '!' ORDER BY name"))) do
    tables[#tables + 1] = r.name
    has_meta = has_meta or r.name == "meta"
  end
  -- A failed read (a meta table of another shape) is no schema row.
  local read, value = false, nil
  if has_meta then
    read, value = pcall(db.value, db, "SELECT value FROM meta WHERE key = 'schema'")
  end
  local version = read and tonumber(value)
  -- A callagent before the one-commit set-up (it ran the schema statement
  -- by statement, meta first, its schema row last) stopped part-way: meta
  -- readable and empty (that row was its only one), and only tables of its
  -- own. Its set-up is finished.
  local cut_off = read and value == nil and db:value("SELECT count(*) FROM meta") == 0
  for _, name in ipairs(tables) do
    cut_off = cut_off and OWN_TABLES[name]
  end
  if #tables > 0 and not version and not cut_off then
    -- Tables, none of them a callagent store's: another program's database,
    -- which the store's tables would be added to.
    local shown = table.concat(tables, ", ", 1, math.min(#tables, 5)) .. (#tables > 5 and ", ..." or "")
    return "store.path: " .. path .. " is another program's database (tables " .. shown
      .. "; no callagent store schema): give callagent a file of its own"
  end
  if version and version > SCHEMA_VERSION then
    return "store.path: " .. path .. " was written by a newer callagent (store schema " .. version
      .. "; this one reads " .. SCHEMA_VERSION .. "): run that version, or give this one another store.path"
  end
  must(db:exec(SCHEMA))
  for _, c in ipairs(ADDED_COLUMNS) do
    local cols = must(db:rows("SELECT name FROM pragma_table_info(?) WHERE name = ?", c[1], c[2]))
    if #cols == 0 then
      must(db:exec("ALTER TABLE " .. c[1] .. " ADD COLUMN " .. c[2] .. " " .. c[3]))
    end
  end
  must(db:exec(SCHEMA_ADDED))
end

--- Opens (creating if missing) the store; a corrupt or unwritable file is an
-- error here, naming the path, not a crash later.
function M.open(cfg)
  local path = cfg.path
  local dir = path:match("^(.*)/[^/]*$")
  if dir and dir ~= "" and not core.stat(dir) then
    local ok, err = mkdir_p(dir)
    if not ok then
      return nil, "store.path: cannot open " .. path .. ": " .. err
    end
  end
  -- lock: one process per file. A second one would take the first one's
  -- live calls for calls interrupted by a restart.
  local db, err = sqlite.open(path, { busy_timeout = 5000, lock = true })
  if not db then
    if tostring(err):match("^EBUSY: .*: in use by another process") then
      local pid = err:match("%(pid (%d+)%)$")
      return nil, "store.path: " .. path .. " is in use by another callagent" .. (pid and " (pid " .. pid .. ")" or "")
    end
    return nil, "store.path: cannot open " .. path .. ": " .. tostring(err)
  end
  local ok, cerr = db:integrity_check()
  if not ok then
    db:close()
    return nil, "store.path: " .. path .. " is damaged: " .. tostring(cerr)
  end
  local pok, tok, res = pcall(db.transaction, db, set_up, db, path)
  local failure
  local misfit = not pok and tostring(tok):match("sqlite: (.-) in: ")
  if misfit then
    -- SQLite's words, without the SQL (all of SCHEMA, for a CREATE).
    failure = "store.path: cannot set up " .. path .. " (another program's database?): " .. misfit
  elseif not pok or not tok then
    failure = "store.path: cannot set up " .. path .. ": " .. tostring(pok and res or tok)
  else
    failure = res -- a newer callagent's store, or nil
  end
  if failure then
    db:close()
    return nil, failure
  end
  local self = setmetatable({ db = db, path = path, retention_days = cfg.retentionDays }, Store)
  log.info("store open", { path = path, calls = db:value("SELECT count(*) FROM calls") })
  return self
end

-- Inside batch(): false, or the first write of the batch that failed. A
-- batch runs no yield (its fn must not), so one at a time.
local batch_failed

local function check(ok, err, what)
  if ok == nil then
    log.error("store write failed", { what = what, error = err })
    if batch_failed == false then
      batch_failed = err or "a write failed"
    end
    return nil, err
  end
  return true
end

local BATCH_FAILED = setmetatable({}, { __tostring = function()
  return "a write of the batch failed"
end })

local function doc_of(call)
  local d = {}
  for k, v in pairs(call) do
    if not SEPARATE[k] and type(k) == "string" and k:sub(1, 1) ~= "_" then
      d[k] = v
    end
  end
  return encode(d)
end

-- Runs fn in one commit: true, or nil, err when the store refused it (undone).
local function commit(db, fn)
  local pok, ok, err = pcall(db.transaction, db, fn)
  if not pok then
    return nil, ok
  end
  return ok, err
end

function Store:insert_call(call)
  local db = self.db
  -- A write that fails (a full disk) raises out of the transaction, which
  -- undoes it; here it is the write's failure, nil, err, like any other.
  local ok, err = commit(db, function()
    local function write(sql, ...)
      local n, werr = db:run(sql, ...)
      if n == nil then
        error(werr, 0)
      end
    end
    write("INSERT INTO calls (id, status, created, doc) VALUES (?, ?, ?, ?)", call.id, call.status, core.time(),
      doc_of(call))
    local idem = call._idempotency
    if idem then
      write("INSERT INTO idempotency (key, call_id, fingerprint) VALUES (?, ?, ?)", idem.key, call.id, idem.fingerprint)
    end
    for _, a in ipairs(call.attempts or {}) do
      write("INSERT INTO attempts (call_id, n, doc) VALUES (?, ?, ?)", call.id, a.n, encode(a))
    end
  end)
  return check(ok, err, "insert_call")
end

function Store:update_call(id, fields)
  local db = self.db
  local raw, rerr = db:value("SELECT doc FROM calls WHERE id = ?", id)
  if rerr then
    return check(nil, rerr, "update_call") -- the read failed: not "no such call"
  elseif not raw then
    return nil, "ENOENT: no call " .. tostring(id)
  end
  local d = decode_doc(self.path, raw, "the record of call " .. tostring(id))
  for k, v in pairs(fields) do
    if not SEPARATE[k] then
      if v == M.NULL then
        d[k] = nil
      else
        d[k] = v
      end
    end
  end
  local status = fields.status or d.status
  return check(db:run("UPDATE calls SET status = ?, doc = ? WHERE id = ?", status, encode(d), id))
end

-- what: the rows' table (attempts, transcript, events), of call id.
local function rows_docs(path, rows, what, id)
  local out = json.array()
  for i, r in ipairs(rows) do
    out[i] = decode_doc(path, r.doc, "a row of " .. what .. " of call " .. tostring(id))
  end
  return out
end

--- The call, or nil when there is none, or nil, err when the read fails.
function Store:get_call(id)
  local db = self.db
  local r, err = db:row("SELECT doc FROM calls WHERE id = ?", id)
  if not r then
    return nil, err
  end
  local c = decode_doc(self.path, r.doc, "the record of call " .. tostring(id))
  c.id = id
  for field, sql in pairs(CALL_ROWS) do
    local rows, rerr = db:rows(sql, id)
    if not rows then
      return nil, rerr
    end
    c[field] = rows_docs(self.path, rows, field, id)
  end
  return c
end

--- A call's transcript lines, or nil, err when the read fails (not {}: the
-- API's GET answers 500 store_failed, not a call that said nothing).
function Store:transcript(id)
  local rows, err = self.db:rows(CALL_ROWS.transcript, id)
  if not rows then
    return nil, err
  end
  return rows_docs(self.path, rows, "transcript", id)
end

--- Runs fn, whose writes commit together: one transaction instead of one each.
-- All or none: a write in it that fails (a full disk, an I/O error) undoes the
-- others, and batch returns nil, err; so does a commit that fails.
function Store:batch(fn)
  local outer = batch_failed
  batch_failed = false
  local pok, ok, err = pcall(self.db.transaction, self.db, function()
    fn()
    if batch_failed then
      error(BATCH_FAILED, 0)
    end
  end)
  local failed = batch_failed
  -- A batch inside another fails that one too; one that went through leaves
  -- it still watching (false, not nil: `a and false or nil` is nil).
  if outer == nil then
    batch_failed = nil
  else
    batch_failed = outer or failed
  end
  if not pok then
    if ok == BATCH_FAILED then
      return nil, failed
    end
    error(ok, 0)
  end
  if ok == nil then
    return check(nil, err, "batch")
  end
  return true
end

function Store:add_attempt(id, attempt)
  return check(self.db:run("INSERT OR REPLACE INTO attempts (call_id, n, doc) VALUES (?, ?, ?)", id, attempt.n, encode(attempt)))
end

function Store:update_attempt(id, n, fields)
  local db = self.db
  local raw, rerr = db:value("SELECT doc FROM attempts WHERE call_id = ? AND n = ?", id, n)
  if rerr then
    return check(nil, rerr, "update_attempt")
  elseif not raw then
    return nil, "ENOENT: no attempt " .. tostring(n) .. " of call " .. tostring(id)
  end
  local a = decode_doc(self.path, raw, "attempt " .. tostring(n) .. " of call " .. tostring(id))
  for k, v in pairs(fields) do
    a[k] = v
  end
  return check(db:run("UPDATE attempts SET doc = ? WHERE call_id = ? AND n = ?", encode(a), id, n))
end

function Store:add_transcript(id, line)
  return check(self.db:run("INSERT INTO transcript (call_id, doc) VALUES (?, ?)", id, encode(line)))
end

function Store:add_event(id, event)
  return check(self.db:run("INSERT INTO events (call_id, doc) VALUES (?, ?)", id, encode(event)))
end

--- Newest first; the cursor is the last row's sequence number. nil,
--- "ECURSOR: ..." for a cursor that is not one; nil, err when the read fails.
--- A limit of 0 (or less) is an empty page, without a next one.
function Store:list_calls(opts)
  opts = opts or {}
  local limit = opts.limit or 20
  local before = cursor_seq(opts.cursor)
  if before == false then
    return nil, "ECURSOR: not a cursor of this list"
  end
  if limit < 1 then
    return {}
  end
  before = before or math.maxinteger
  local rows, err
  if opts.status then
    rows, err = self.db:rows("SELECT seq, id, doc FROM calls WHERE status = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
      opts.status, before, limit + 1)
  else
    rows, err = self.db:rows("SELECT seq, id, doc FROM calls WHERE seq < ? ORDER BY seq DESC LIMIT ?", before, limit + 1)
  end
  if not rows then
    return nil, err
  end
  local out, next_cursor = {}, nil
  for i, r in ipairs(rows) do
    if i > limit then
      next_cursor = tostring(rows[limit].seq)
      break
    end
    local c = decode_doc(self.path, r.doc, "the record of call " .. tostring(r.id))
    c.id = r.id
    local attempts, aerr = self.db:rows(CALL_ROWS.attempts, r.id)
    if not attempts then
      return nil, aerr
    end
    c.attempts = rows_docs(self.path, attempts, "attempts", r.id)
    out[#out + 1] = c
  end
  return out, next_cursor
end

-- The reads a restart recovers from: one that fails is nil, err, not an
-- empty list (the last run's calls would be left as they are, unseen).
function Store:active_calls()
  local out = {}
  local rows, err = self.db:rows("SELECT id FROM calls WHERE status IN ('queued', 'dialing', 'in_progress') ORDER BY seq")
  if not rows then
    return nil, err
  end
  for _, r in ipairs(rows) do
    local c, cerr = self:get_call(r.id)
    if not c then
      return nil, cerr or "ENOENT: call " .. r.id .. " went while it was read"
    end
    out[#out + 1] = c
  end
  return out
end

function Store:set_retry(id, due_at)
  return check(self.db:run("INSERT OR REPLACE INTO retries (call_id, due_at) VALUES (?, ?)", id, due_at))
end

function Store:clear_retry(id)
  return check(self.db:run("DELETE FROM retries WHERE call_id = ?", id))
end

function Store:due_retries()
  return self.db:rows("SELECT call_id, due_at FROM retries ORDER BY due_at")
end

function Store:add_notification(key, call_id, payload)
  local changes, err = self.db:run(
    "INSERT OR IGNORE INTO notifications (key, call_id, payload, created) VALUES (?, ?, ?, ?)",
    key, call_id, payload, core.time())
  if changes == nil then
    return check(nil, err, "notification") -- not "already recorded"
  end
  return changes == 1
end

local NOTIFY_STATE = { failed = 0, sent = 1, refused = 2 }

-- A pending one takes the state; a sent or refused one stays so (not
-- max(sent, ?1): a sent one marked refused became refused, and with a
-- fingerprint sent again by requeue_refused).
-- refused_under: of a refused one (one refused before too: the latest),
-- the fingerprint given, or NULL; a refused one marked otherwise keeps it;
-- any other is NULL.
local MARK = [[UPDATE notifications SET tries = tries + 1, sent = CASE WHEN sent = 0 THEN ?1 ELSE sent END, last_error = ?2,
  refused_under = CASE WHEN ?1 = 2 AND sent <> 1 THEN ?3 WHEN sent = 2 THEN refused_under END
  WHERE key = ?4]]

--- under: for state "refused", the fingerprint of the config it was refused
-- under (for its token or address), which requeue_refused compares.
function Store:mark_notified(key, state, err, under)
  local v = assert(NOTIFY_STATE[state], "mark_notified: state must be sent, failed or refused")
  return check(self.db:run(MARK, v, err, under, key))
end

--- Sends again those refused under another config than fingerprint's: they
-- are pending again (in their place in the backlog), their fingerprint
-- gone. Returns how many; nil, err when the store refused it.
function Store:requeue_refused(fingerprint)
  local n, err = self.db:run("UPDATE notifications SET sent = 0, refused_under = NULL "
    .. "WHERE refused_under IS NOT NULL AND refused_under <> ? AND sent = 2", fingerprint)
  if n == nil then
    return check(nil, err, "requeue_refused")
  end
  return n
end

local PENDING = "SELECT rowid, key, call_id, payload, tries, created FROM notifications WHERE sent = 0"

--- Neither sent nor refused, oldest first (created, then rowid: the order
-- they were recorded in). Without opts, all of them. opts.limit: a page of
-- at most that many, and the cursor of the next page (nil after the last),
-- which opts.after takes back: keyset paging on (created, rowid), so a page
-- costs the same at the backlog's end as at its start, and a row recorded
-- meanwhile is in a later page, never in two. opts.keys: only those keys
-- (no paging).
function Store:pending_notifications(opts)
  local db = self.db
  if not opts then
    return db:rows(PENDING .. " ORDER BY created, rowid")
  end
  if opts.keys then
    if #opts.keys == 0 then
      return {}
    end
    return db:rows(PENDING .. " AND key IN (" .. string.rep("?", #opts.keys, ", ") .. ") ORDER BY created, rowid",
      table.unpack(opts.keys))
  end
  local sql, args = PENDING, {}
  if opts.after then
    sql = sql .. " AND (created, rowid) > (?, ?)"
    args[#args + 1], args[#args + 2] = opts.after[1], opts.after[2]
  end
  local limit = opts.limit or math.maxinteger
  if limit < 1 then
    return {}
  end
  -- One more than the page: whether there is a next one.
  args[#args + 1] = math.min(limit, math.maxinteger - 1) + 1
  local rows, err = db:rows(sql .. " ORDER BY created, rowid LIMIT ?", table.unpack(args))
  if not rows then
    return nil, err
  end
  if #rows > limit then
    rows[#rows] = nil
    local last = rows[#rows]
    return rows, { last.created, last.rowid }
  end
  return rows
end

function Store:find_idempotent(key)
  local rows, err = self.db:rows("SELECT call_id, fingerprint FROM idempotency WHERE key = ?", key)
  if not rows then
    return nil, err
  end
  return rows[1]
end

-- The calls (with their rows: a call's transcript and events can be
-- hundreds) or notifications one commit of a prune removes at first: cut
-- to fit PRUNE_BATCH_MS after a batch that took longer (calls with long
-- transcripts), doubled after one that took under a quarter of it.
local PRUNE_BATCH, PRUNE_BATCH_MIN, PRUNE_BATCH_MAX = 20, 5, 1000
local PRUNE_BATCH_MS = 20
local PRUNE_CALLS = [[DELETE FROM calls WHERE seq IN (SELECT seq FROM calls WHERE created < ?
  AND status NOT IN ('queued', 'dialing', 'in_progress') ORDER BY created LIMIT ?)]]
local OLD_NOTIFICATIONS = "rowid IN (SELECT rowid FROM notifications WHERE created < ? ORDER BY created LIMIT ?)"

-- The batches of a prune: the calls removed, the notifications never
-- delivered removed, and the error that ended it, if one did.
local function prune_batches(self, cutoff)
  local n, stale = 0, 0
  local size = PRUNE_BATCH
  for _, step in ipairs({ "calls", "notifications" }) do
    local removed = size
    while removed == size do
      local db = self.db
      if not db then
        return n, stale, "ECLOSED: the store closed during the prune"
      end
      local started = timer.now()
      local ok, err = commit(db, function()
        local werr
        if step == "calls" then
          removed, werr = db:run(PRUNE_CALLS, cutoff, size)
        else
          -- Undelivered ones too: a receiver that was never reachable must
          -- not have its backlog grow for ever, nor hear of calls older
          -- than the retention.
          local never = db:value("SELECT count(*) FROM notifications WHERE sent = 0 AND " .. OLD_NOTIFICATIONS,
            cutoff, size)
          removed, werr = db:run("DELETE FROM notifications WHERE " .. OLD_NOTIFICATIONS, cutoff, size)
          stale = removed and stale + (never or 0) or stale
        end
        if removed == nil then
          error(werr, 0)
        end
      end)
      if not ok then
        return n, stale, err or "a prune write failed"
      end
      if step == "calls" then
        n = n + removed
      end
      if removed == size then
        local took = timer.now() - started
        if took > PRUNE_BATCH_MS then
          size = math.max(PRUNE_BATCH_MIN, math.floor(size * PRUNE_BATCH_MS / took))
        elseif took < PRUNE_BATCH_MS / 4 then
          size = math.min(PRUNE_BATCH_MAX, size * 2)
        end
        removed = size -- not the end yet
        -- Live calls' audio goes first (inside a task).
        task.pace()
      end
    end
  end
  return n, stale
end

--- Removes finished calls created more than days ago (their rows go with
-- them), and notifications as old. In batches of about PRUNE_BATCH_MS, a
-- commit each,
-- taking turns with live calls between them inside a task (task.pace): one
-- statement that removed months of calls held the loop, and every call's
-- audio, for seconds. Returns the calls removed; nil, err when the store
-- refused a batch (the batches before it stay removed, the next prune goes
-- on) or closed meanwhile.
function Store:prune(days)
  days = days or self.retention_days
  -- In floating point: an integer product past 2^63 wraps, and a cutoff in
  -- the future would delete every finished call.
  local now = core.time()
  local cutoff = now - days * 86400.0
  if cutoff > now then
    return 0
  end
  if self.pruning then
    return 0 -- the prune under way removes them
  end
  self.pruning = true
  local pok, n, stale, err = pcall(prune_batches, self, cutoff)
  self.pruning = nil
  if not pok then
    error(n, 0)
  end
  if stale > 0 then
    log.warn("store pruned notifications never delivered", { removed = stale, older_than_days = days })
  end
  if n > 0 then
    log.info("store pruned old calls", { removed = n, older_than_days = days })
  end
  if err and not self.db then
    return nil, err -- a stop: the next start's prune goes on
  elseif err then
    return check(nil, err, "prune")
  end
  return n
end

function Store:close()
  if self.db then
    self.db:close()
    self.db = nil
  end
end

M.NULL = require("callagent.store.memory").NULL

return M
