-- A backlog of notifications larger than many pages (a receiver down for a
-- day) is walked a page at a time, never read whole: each delivered once,
-- oldest first, a bounded number of rows held at once; and one recorded
-- while the backlog is walked is sent once.
local T = require "testing"
local http = require "callagent.http"
local timer = require "callagent.timer"
local task = require "callagent.task"
local core = require "callagent.core"
local store_mod = require "callagent.store"
local notify = require "callagent.notify"
local durable = require "durable_world"

local BACKLOG = 1200
-- notify.lua reads the backlog in pages of 200 rows.
local PAGE = 200

local function key_of(i)
  return ("c_%04d:completed"):format(i)
end

-- Records the backlog's rows c_0001 .. c_<count>, oldest first. On SQLite,
-- in threes with one creation time, so that pages end inside a run of
-- equal times (a cursor on the time alone would skip or repeat rows there).
-- A store of that backend in a folder of its own, closed after the test.
local function open_store(backend)
  local store = assert(store_mod.open({ backend = backend, path = T.tmpdir() .. "/n.db", retentionDays = 30 }))
  T.defer(function()
    store:close()
  end)
  return store
end

local function seed(store, count)
  local function add()
    for i = 1, count do
      assert(store:add_notification(key_of(i), ("c_%04d"):format(i), ('{"n":%d}'):format(i)))
    end
  end
  if store.batch then
    assert(store:batch(add))
  else
    add()
  end
  if store.db then
    -- A day ago: within the retention (an app's start prunes older ones).
    assert(store.db:run("UPDATE notifications SET created = ? + (CAST(substr(key, 3, 4) AS INTEGER) - 1) / 3",
      math.floor(core.time()) - 86400))
  end
end

-- Counts the rows each read of the backlog returns (it reads the store as
-- before; the count is what it held at once).
local function count_reads(store)
  local read = store.pending_notifications
  -- reads.all: every pending row, read whole (the test's own look, not counted).
  local reads = { most = 0, n = 0, all = function()
    return read(store)
  end }
  store.pending_notifications = function(self, ...)
    local rows, cursor = read(self, ...)
    if rows then
      reads.n = reads.n + 1
      reads.most = math.max(reads.most, #rows)
    end
    return rows, cursor
  end
  return reads
end

-- A receiver whose /hooks/agent answers 200 after hook(key), if given, or
-- 503 while down() (if given) is true: the notifier (attempts opts) on
-- store sending to it, and what it saw (refused requests not counted):
-- order (Idempotency-Keys as they came), by_key (counts), most (at once).
local function receiver(store, hook, opts, down)
  local seen = { order = {}, by_key = {}, now = 0, most = 0 }
  local hooks = http.server({ headers = { "idempotency-key" } })
  hooks:post("/hooks/agent", function(req)
    if down and down() then
      return 503, { error = "down" }
    end
    local key = req.headers["idempotency-key"]
    seen.now = seen.now + 1
    seen.most = math.max(seen.most, seen.now)
    seen.order[#seen.order + 1] = key
    seen.by_key[key] = (seen.by_key[key] or 0) + 1
    if hook then
      hook(key)
    end
    seen.now = seen.now - 1
    return 200, { ok = true }
  end)
  assert(hooks:listen())
  T.defer(function()
    hooks:close()
  end)
  local n = notify.new({ hooksUrl = hooks:url("/hooks"), hooksToken = "hooks-token-for-tests" }, store,
    opts or { base_delay_ms = 50 })
  T.defer(function()
    n:stop()
  end)
  return n, seen
end

-- Each of the backlog once, and oldest first: with 8 at once, key i is
-- taken only once keys 1 .. i-1 are, all but 7 of them answered.
local function check_delivered(seen, extra)
  local twice, missing, late = {}, 0, nil
  for i = 1, BACKLOG do
    local c = seen.by_key[key_of(i)]
    if not c then
      missing = missing + 1
    elseif c > 1 then
      twice[#twice + 1] = key_of(i)
    end
  end
  T.eq(missing, 0, "none left out")
  T.eq(twice, {}, "none sent twice")
  T.eq(#seen.order, BACKLOG + (extra or 0), "one request each")
  local j = 0
  for _, key in ipairs(seen.order) do
    local i = tonumber(key:match("^c_(%d+):"))
    if i then
      j = j + 1
      if i > j + 8 and not late then
        late = ("%s came %dth"):format(key, j)
      end
    end
  end
  T.eq(late, nil, "oldest first (each within the 8 on their way at once)")
  T.le(seen.most, 8, "at most 8 at once")
end

for _, backend in ipairs({ "sqlite", "memory" }) do
  T.test(backend .. ": pages of the backlog: at most the limit each, oldest first, each row once, and a row recorded meanwhile once",
    function()
      local store = open_store(backend)
      seed(store, 450)
      T.eq(#store:pending_notifications(), 450, "without opts: all of them, as before")
      local got, cursor, pages = {}, nil, 0
      repeat
        local rows, next_cursor = store:pending_notifications({ limit = PAGE, after = cursor })
        T.le(#rows, PAGE, "a page holds at most the limit")
        pages = pages + 1
        for _, r in ipairs(rows) do
          got[#got + 1] = r.key
          T.eq(type(r.payload), "string")
        end
        if pages == 1 then
          -- Recorded during the walk: in a later page, once.
          assert(store:add_notification("late:completed", "late", "{}"))
        end
        cursor = next_cursor
      until not cursor or pages > 10
      T.eq(pages, 3, "450 + 1 rows in pages of 200")
      T.eq(#got, 451)
      for i = 1, 450 do
        if got[i] ~= key_of(i) then
          T.eq(got[i], key_of(i), "row " .. i .. " in order")
          break
        end
      end
      T.eq(got[451], "late:completed", "the one recorded meanwhile last, once")
      -- Sent and refused ones are not in any page.
      store:mark_notified(key_of(1), "sent")
      store:mark_notified(key_of(2), "refused", "HTTP 400")
      store:mark_notified(key_of(3), "failed", "HTTP 503")
      local rows, next_cursor = store:pending_notifications({ limit = 2 })
      T.eq({ rows[1].key, rows[2].key }, { key_of(3), key_of(4) })
      T.ok(next_cursor ~= nil, "a next page")
      local some = store:pending_notifications({ keys = { key_of(450), key_of(1), key_of(7), "nope" } })
      T.eq({ #some, some[1].key, some[2].key }, { 2, key_of(7), key_of(450) }, "keys: those pending, oldest first")
    end)

  T.test(backend .. ": a backlog of 1,200 is walked in pages: each sent once, oldest first, at most a page of rows read at once",
    function()
      local store = open_store(backend)
      seed(store, BACKLOG)
      local reads = count_reads(store)
      local n, seen = receiver(store)
      T.le(n:resume(), PAGE, "the first read: a page")
      T.wait_for(function()
        return #reads.all() == 0 and next(n.in_flight) == nil
      end, 10000, "every one delivered and recorded so")
      T.le(reads.most, PAGE, "no read of the backlog returned more than a page")
      T.ge(reads.n, BACKLOG // PAGE, "read in pages")
      T.le(n.stats.most_rows, PAGE, "the notifier's own count agrees")
      check_delivered(seen)
    end)
end

for _, backend in ipairs({ "sqlite", "memory" }) do
  T.test(backend .. ": a notification recorded while the clock was ahead (set back since) is sent by a sweep, not left out",
    function()
      local store = open_store(backend)
      seed(store, 3)
      -- Recorded by a run whose wall clock was an hour ahead (a clock NTP has
      -- set back since): its creation time is later than now.
      assert(store:add_notification("ahead:completed", "ahead", "{}"))
      local ahead = core.time() + 3600
      if store.db then
        assert(store.db:run("UPDATE notifications SET created = ? WHERE key = ?", ahead, "ahead:completed"))
      else
        store.notifications["ahead:completed"].created = ahead
      end
      local n, seen = receiver(store)
      n:resume()
      T.wait_for(function()
        return #store:pending_notifications() == 0 and next(n.in_flight) == nil
      end, 3000, "all four delivered, the one created 'later' than the walk's start too")
      T.eq(seen.by_key["ahead:completed"], 1, "sent once")
      T.eq(#seen.order, 4, "one request each")
    end)
end

T.test("sqlite: notifications recorded while the backlog is walked are each sent once", function()
  local store = open_store("sqlite")
  seed(store, BACKLOG)
  local n, seen
  local added = 0
  local function ended(id)
    added = added + 1
    return assert(n:record({ callId = id, status = "completed", to = "+14155550100" }))
  end
  n, seen = receiver(store, function()
    -- Mid-walk: calls end. One as the engine does (recorded in the commit
    -- of its final status, sent at once); one recorded only, before the
    -- walk reads its last page, its send still to come when the walk has
    -- read it (the walk leaves it be: not the walk's, recorded after it
    -- began).
    if #seen.order == 300 then
      n:send(ended("e_1"))
    elseif #seen.order == 990 then
      local key, body = ended("e_2")
      timer.after(600, function()
        n:send(key, body)
        added = added + 1
      end)
    end
  end)
  n:resume()
  T.wait_for(function()
    return added == 3 and #store:pending_notifications() == 0 and next(n.in_flight) == nil
  end, 10000, "every one delivered and recorded so")
  timer.sleep(100)
  T.eq(seen.by_key["e_1:completed"], 1, "the one the engine sent, once")
  T.eq(seen.by_key["e_2:completed"], 1, "the one recorded during the walk and sent after, once")
  check_delivered(seen, 2)
end)

for _, backend in ipairs({ "sqlite", "memory" }) do
  T.test(backend .. ": 450 out of tries go in the next sweep, read by key 200 at a time, each once, the longest untried first",
    function()
      local store = open_store(backend)
      local count, down = 450, true
      local reads = count_reads(store)
      local n, seen = receiver(store, nil, { attempts = 1, sweep_ms = 600000 }, function()
        return down
      end)
      -- Calls end while the receiver is down: each notification's one try
      -- fails, in an order of its own (the answers' order).
      for i = 1, count do
        n:send(assert(n:record({ callId = ("c_%04d"):format(i), status = "completed", to = "+14155550100" })))
      end
      T.wait_for(function()
        return next(n.in_flight) == nil
      end, 10000, "every one out of tries")
      local by_rank = {}
      for key, r in pairs(n.ran_out) do
        by_rank[#by_rank + 1] = { key = key, r = r }
      end
      T.eq(#by_rank, count, "all of them out of tries")
      table.sort(by_rank, function(a, b)
        return a.r < b.r
      end)
      down = false
      reads.n, reads.most = 0, 0
      n:resume()
      T.wait_for(function()
        return #reads.all() == 0 and next(n.in_flight) == nil
      end, 10000, "every one delivered and recorded so")
      T.le(reads.most, PAGE, "no read returned more than a page")
      T.eq(reads.n, 6, "the backlog in 3 pages (all out of tries: none sent), then their payloads in 3 reads by key")
      T.eq(#seen.order, count, "one request each")
      local twice, late = {}, nil
      for key, c in pairs(seen.by_key) do
        if c > 1 then
          twice[#twice + 1] = key
        end
      end
      T.eq(twice, {}, "none sent twice")
      local pos = {}
      for i, key in ipairs(seen.order) do
        pos[key] = i
      end
      for i, e in ipairs(by_rank) do
        if not pos[e.key] or pos[e.key] > i + 8 then
          late = ("%s, untried %dth longest, came %s"):format(e.key, i, tostring(pos[e.key]))
          break
        end
      end
      T.eq(late, nil, "the longest untried first (each within the 8 on their way at once)")
      T.eq(next(n.ran_out), nil, "none held as out of tries")
    end)
end

T.test("sqlite: a sweep over a backlog all out of tries (the receiver down for days) takes turns with live calls between pages",
  function()
    local store = open_store("sqlite")
    local count = 4000
    seed(store, count)
    local reads = count_reads(store)
    local n = receiver(store, nil, { attempts = 1, sweep_ms = 600000 }, function()
      return true
    end)
    -- What days of a receiver down leave: every notification of the backlog
    -- ran out of tries in this run (each call's own sends), oldest first.
    for i = 1, count do
      n:_ran_out_set(key_of(i))
    end
    -- Pacing on every page, not only once the loop has been busy 2 ms: the
    -- count does not depend on the machine's speed.
    T.shorten(task, "pace_ms", 0)
    local at_turn
    timer.after(0, function()
      at_turn = reads.n
    end)
    n:resume()
    T.wait_for(function()
      return at_turn and not n.walking
    end, 10000, "the sweep over")
    -- 20 pages, all passed over, then one read by key: the oldest's payload,
    -- which fails and ends the sweep.
    T.eq(reads.n, count // PAGE + 1, "the backlog walked whole")
    -- The sweep's first page, then one more by each of its 8 workers.
    T.le(at_turn, 1 + 8, "a turn came before the backlog was read whole (" .. reads.n .. " reads)")
  end)

T.test("sqlite: 100,000 keys out of tries are taken in their order without a stall, and those no longer pending let go", function()
  local store = open_store("sqlite")
  local count = 100000
  local n = notify.new({ hooksUrl = "http://127.0.0.1:9/hooks", hooksToken = "hooks-token-for-tests" }, store,
    { attempts = 1, sweep_ms = 600000 })
  T.defer(function()
    n:stop()
  end)
  -- Out of tries while the receiver was down, then pruned from the store
  -- (store.retentionDays): each sweep's second phase reads them by key.
  for i = 1, count do
    n:_ran_out_set(key_of(i))
  end
  T.shorten(task, "pace_ms", 0)
  local last, longest = timer.now(), 0
  local tick = timer.every(1, function()
    local now = timer.now()
    longest = math.max(longest, now - last)
    last = now
  end)
  T.defer(function()
    tick:stop()
  end)
  timer.sleep(5)
  last = timer.now()
  n:resume()
  T.wait_for(function()
    return not n.walking
  end, 20000, "the sweep over")
  -- Sorted by when they ran out, 100,000 keys held the event loop 250 ms.
  T.lt(longest, 100, "the event loop's longest turn during the sweep, ms")
  T.eq(next(n.ran_out), nil, "none held once found no longer pending")
  n:_sweep()
  T.eq(#n.ran_out_keys, 0, "nor in the list of them, at the next sweep")
end, { timeout = 60000 })

T.test("restart: a backlog of 1,200 left in the store is delivered once each, oldest first, read in pages", function()
  local w = durable.new({})
  -- The store a run left with its receiver down: 1,200 not delivered.
  local store = assert(store_mod.open({ backend = "sqlite", path = w.db, retentionDays = 30 }))
  seed(store, BACKLOG)
  store:close()
  w.start()
  T.wait_for(function()
    return #w.requests >= BACKLOG
  end, 10000, "the backlog sent")
  T.wait_for(function()
    return w.app.errtext():match("notification backlog walked") or w.app.text():match("notification backlog walked")
  end, 5000, "the walk's end logged")
  timer.sleep(200)
  local seen = { order = w.requests, by_key = w.by_key, most = 0 }
  check_delivered(seen)
  local log = w.app.errtext() .. w.app.text()
  local most = tonumber(log:match("notification backlog walked[^\n]*most_rows=(%d+)"))
  local pages = tonumber(log:match("notification backlog walked[^\n]*pages=(%d+)"))
  T.le(most, PAGE, "no read of the backlog held more than a page")
  T.ge(pages, BACKLOG // PAGE, "read in pages")
  -- The child marks a row sent once it has read the receiver's answer, and
  -- other workers may still be at that when the first logs the walk's end:
  -- the store file is read again until none is pending, or 5 s have passed.
  local pending
  local deadline = timer.now() + 5000
  repeat
    local _, notes = w.stored()
    pending = 0
    for _, r in ipairs(notes) do
      pending = pending + (r.sent == 0 and 1 or 0)
    end
    if pending > 0 then
      timer.sleep(50)
    end
  until pending == 0 or timer.now() > deadline
  T.eq(pending, 0, "all recorded delivered")
end)

T.run()
