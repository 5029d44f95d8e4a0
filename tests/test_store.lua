-- The store interface, the same for both backends (memory and sqlite):
-- records, attempts, transcript, paging, retries, notifications, pruning.
local T = require "testing"
local store_mod = require "callagent.store"
local core = require "callagent.core"
local timer = require "callagent.timer"
local task = require "callagent.task"

local function open(backend)
  local cfg = { backend = backend, path = T.tmpdir() .. "/s.db", retentionDays = 30 }
  local s = assert(store_mod.open(cfg))
  T.defer(function()
    s:close()
  end)
  return s
end

local function call(id, status)
  return { id = id, status = status or "queued", attempt = 0, attempts = {}, to = "+14155550100", prompt = "p", usage = {}, createdAt = "x" }
end

for _, backend in ipairs({ "memory", "sqlite" }) do
  T.test(backend .. ": calls round-trip with attempts, transcript and events; updates merge", function()
    local s = open(backend)
    assert(s:insert_call(call("c_1")))
    assert(s:update_call("c_1", { status = "dialing", attempt = 1, hint = "h" }))
    assert(s:add_attempt("c_1", { n = 1, status = "dialing", startedAt = "t1" }))
    assert(s:update_attempt("c_1", 1, { status = "busy", providerCallId = "CA1" }))
    assert(s:add_transcript("c_1", { role = "agent", text = "hi", at = "t" }))
    assert(s:add_transcript("c_1", { role = "callee", text = "hello", at = "t" }))
    assert(s:add_event("c_1", { type = "status", to = "dialing" }))
    assert(s:update_call("c_1", { hint = store_mod.NULL, report = { outcome = "success", data = { k = 1 } } }))
    local c = s:get_call("c_1")
    T.eq(c.status, "dialing")
    T.eq(c.attempt, 1)
    T.eq(c.hint, nil)
    T.eq(c.report, { outcome = "success", data = { k = 1 } })
    T.eq(c.attempts[1], { n = 1, status = "busy", startedAt = "t1", providerCallId = "CA1" })
    T.eq(#c.transcript, 2)
    T.eq(c.transcript[2].text, "hello")
    T.eq(s:transcript("c_1"), c.transcript, "transcript(id): the same lines, in order")
    s:transcript("c_1")[1].text = "changed"
    T.eq(s:transcript("c_1")[1].text, "hi", "a copy")
    T.eq(#s:transcript("c_none"), 0)
    T.eq(#c.events, 1)
    T.eq(s:get_call("c_none"), nil)
    local ok, err = s:update_call("c_none", { status = "x" })
    T.eq(ok, nil)
    T.match(err, "^ENOENT")
  end)

  T.test(backend .. ": an attempt added again (a call rewritten whole) replaces the one with its n", function()
    local s = open(backend)
    assert(s:insert_call(call("c_1")))
    assert(s:add_attempt("c_1", { n = 1, status = "dialing" }))
    assert(s:add_attempt("c_1", { n = 2, status = "dialing" }))
    assert(s:add_attempt("c_1", { n = 1, status = "busy", providerCallId = "CA1" }))
    local a = s:get_call("c_1").attempts
    T.eq(#a, 2)
    T.eq(a[1], { n = 1, status = "busy", providerCallId = "CA1" })
    T.eq(a[2].status, "dialing")
  end)

  T.test(backend .. ": listing is newest first, filtered, and paged with a cursor", function()
    local s = open(backend)
    for i = 1, 7 do
      assert(s:insert_call(call("c_" .. i, i % 2 == 0 and "busy" or "completed")))
    end
    local page, cursor = s:list_calls({ limit = 3 })
    T.eq({ page[1].id, page[2].id, page[3].id }, { "c_7", "c_6", "c_5" })
    local page2, cursor2 = s:list_calls({ limit = 3, cursor = cursor })
    T.eq({ page2[1].id, page2[2].id, page2[3].id }, { "c_4", "c_3", "c_2" })
    local page3, cursor3 = s:list_calls({ limit = 3, cursor = cursor2 })
    T.eq(#page3, 1)
    T.eq(cursor3, nil)
    T.eq(#s:list_calls({ limit = 3, cursor = "" }), 3, "an empty cursor is none")
    -- What no page gave is refused, not read as "from the start".
    for _, bad in ipairs({ "zzz", "1e3", "-1", " 5", "0x10", "99999999999999999999", { "5" } }) do
      local none, err = s:list_calls({ limit = 3, cursor = bad })
      T.eq(none, nil, tostring(bad))
      T.match(err, "^ECURSOR")
    end
    local busy = s:list_calls({ status = "busy", limit = 10 })
    T.eq(#busy, 3)
    local active = s:active_calls()
    T.eq(#active, 0)
  end)

  T.test(backend .. ": an update of an attempt (or call) it does not have is ENOENT, and adds none", function()
    local s = open(backend)
    assert(s:insert_call(call("c_1")))
    assert(s:add_attempt("c_1", { n = 1, status = "dialing" }))
    for _, args in ipairs({ { "c_1", 2 }, { "c_none", 1 } }) do
      local ok, err = s:update_attempt(args[1], args[2], { status = "busy" })
      T.eq(ok, nil, args[1] .. " #" .. args[2])
      T.match(tostring(err), "^ENOENT", args[1] .. " #" .. args[2])
    end
    T.eq(s:get_call("c_1").attempts, { { n = 1, status = "dialing" } }, "attempt 1 as it was, no attempt 2")
    T.eq(s:get_call("c_none"), nil)
  end)

  T.test(backend .. ": a list with limit 0 is an empty page without a next one, not a raise", function()
    local s = open(backend)
    for i = 1, 3 do
      assert(s:insert_call(call("c_" .. i, "completed")))
      T.eq(s:add_notification("k" .. i, "c_" .. i, "{}"), true)
    end
    local _, cursor = s:list_calls({ limit = 1 })
    for _, opts in ipairs({ { limit = 0 }, { limit = 0, status = "completed" }, { limit = 0, cursor = cursor } }) do
      local page, next_cursor = s:list_calls(opts)
      T.eq(page, {}, "list_calls")
      T.eq(next_cursor, nil, "list_calls")
    end
    local _, after = s:pending_notifications({ limit = 1 })
    for _, opts in ipairs({ { limit = 0 }, { limit = 0, after = after } }) do
      local page, next_cursor = s:pending_notifications(opts)
      T.eq(page, {}, "pending_notifications")
      T.eq(next_cursor, nil, "pending_notifications")
    end
  end)

  T.test(backend .. ": retries and notifications are kept until done", function()
    local s = open(backend)
    assert(s:insert_call(call("c_1")))
    assert(s:set_retry("c_1", 123.5))
    T.eq(s:due_retries()[1].call_id, "c_1")
    T.eq(s:due_retries()[1].due_at, 123.5)
    assert(s:clear_retry("c_1"))
    T.eq(#s:due_retries(), 0)
    T.eq(s:add_notification("c_1:completed", "c_1", "{}"), true)
    T.eq(s:add_notification("c_1:completed", "c_1", "{}"), false, "a key is recorded once")
    T.eq(#s:pending_notifications(), 1)
    s:mark_notified("c_1:completed", "failed", "HTTP 503")
    T.eq(#s:pending_notifications(), 1, "a failed one is sent again")
    s:mark_notified("c_1:completed", "sent")
    T.eq(#s:pending_notifications(), 0)
    T.eq(s:add_notification("c_2:failed", "c_2", "{}"), true)
    s:mark_notified("c_2:failed", "refused", "HTTP 400")
    T.eq(#s:pending_notifications(), 0, "a refused one is never sent again")
    s:mark_notified("c_2:failed", "failed", "HTTP 503")
    T.eq(#s:pending_notifications(), 0, "and stays refused")
  end)

  T.test(backend .. ": a delivered notification marked refused afterwards stays delivered: requeue_refused leaves it", function()
    local s = open(backend)
    T.eq(s:add_notification("k", "c_1", "{}"), true)
    s:mark_notified("k", "sent")
    s:mark_notified("k", "refused", "HTTP 401", "fp-old")
    s:mark_notified("k", "refused", "HTTP 401", "fp-old")
    T.eq(s:requeue_refused("fp-new"), 0)
    T.eq(#s:pending_notifications(), 0, "not sent again")
  end)
end

T.test("sqlite: finished calls older than the retention are pruned with their rows; active ones stay", function()
  local s = open("sqlite")
  assert(s:insert_call(call("c_old", "completed")))
  assert(s:add_transcript("c_old", { role = "agent", text = "x" }))
  assert(s:insert_call(call("c_live", "in_progress")))
  assert(s:insert_call(call("c_new", "completed")))
  -- Age two of them by 40 days.
  assert(s.db:run("UPDATE calls SET created = ? WHERE id IN ('c_old', 'c_live')", core.time() - 40 * 86400))
  -- Days whose seconds pass 2^63 keep everything (an integer product wrapped).
  T.eq(s:prune(999999999999999), 0)
  T.ok(s:get_call("c_old"), "kept by a retention past 2^63 seconds")
  T.eq(s:prune(30), 1)
  T.eq(s:get_call("c_old"), nil)
  T.ok(s:get_call("c_live"), "active calls are never pruned")
  T.ok(s:get_call("c_new"))
  T.eq(s.db:value("SELECT count(*) FROM transcript WHERE call_id = 'c_old'"), 0, "its rows went with it")
end)

T.test("memory: finished calls older than the retention are pruned with their keys; active ones stay", function()
  -- A process on the memory store that runs for months must not keep every call.
  local s = open("memory")
  local old = call("c_old", "completed")
  old._idempotency = { key = "k-old", fingerprint = "f" }
  assert(s:insert_call(old))
  assert(s:insert_call(call("c_live", "in_progress")))
  assert(s:insert_call(call("c_new", "completed")))
  T.eq(s:add_notification("c_old:completed", "c_old", "{}"), true)
  T.eq(s:add_notification("c_new:completed", "c_new", "{}"), true)
  -- Aged by 40 days.
  for _, id in ipairs({ "c_old", "c_live" }) do
    s.calls[id]._created = core.time() - 40 * 86400
  end
  s.notifications["c_old:completed"].created = core.time() - 40 * 86400
  T.eq(s:prune(999999999999999), 0)
  T.eq(s:prune(30), 1)
  T.eq(s:get_call("c_old"), nil)
  T.eq(s:find_idempotent("k-old"), nil, "its Idempotency-Key went with it")
  T.ok(s:get_call("c_live"), "active calls are never pruned")
  T.ok(s:get_call("c_new"))
  local listed = {}
  for _, c in ipairs(s:list_calls({})) do
    listed[#listed + 1] = c.id
  end
  T.eq(listed, { "c_new", "c_live" })
  T.eq(s:get_call("c_new")._created, nil, "the store's clock is not part of the record")
  local left = {}
  for _, n in ipairs(s:pending_notifications()) do
    left[#left + 1] = n.key
  end
  T.eq(left, { "c_new:completed" })
end)

T.test("sqlite: a read at recovery that fails is nil, err: never an empty list of calls, retries or notifications", function()
  -- Read as empty, a restart would leave the last run's calls undialed and
  -- unresolved, and dial retries at once, not at their time.
  local s = open("sqlite")
  assert(s:insert_call(call("c_1", "queued")))
  assert(s:set_retry("c_1", core.time() + 60))
  assert(s:add_notification("c_1:busy", "c_1", "{}"))
  -- The disk fails under the open store: another connection moves
  -- everything into the main file (so the store reads it again from there),
  -- whose pages past the first then turn to garbage.
  local other = assert(require("callagent.sqlite").open(s.path))
  assert(other:run("UPDATE meta SET value = value"))
  assert(other:checkpoint("TRUNCATE"))
  local ps = other:value("PRAGMA page_size")
  other:close()
  local f = assert(io.open(s.path, "r+b"))
  for off = ps, f:seek("end") - 1, ps do
    f:seek("set", off)
    f:write(string.rep("\255", ps))
  end
  f:close()
  for _, m in ipairs({ "active_calls", "due_retries", "pending_notifications" }) do
    local res, err = s[m](s)
    T.eq(res, nil, m)
    T.match(tostring(err), "^ECORRUPT", m)
  end
end)

T.test("sqlite: a prune the store refuses is nil, err, and keeps everything", function()
  local s = open("sqlite")
  assert(s:insert_call(call("c_old", "completed")))
  assert(s:add_notification("c_old:completed", "c_old", "{}"))
  assert(s.db:run("UPDATE calls SET created = ?", core.time() - 40 * 86400))
  assert(s.db:run("UPDATE notifications SET created = ?", core.time() - 40 * 86400))
  assert(s.db:exec("PRAGMA query_only = ON")) -- as a full or read-only disk
  local n, err = s:prune(30)
  T.eq(n, nil, "not 0: nothing was found to prune is not what happened")
  T.match(tostring(err), "^E")
  assert(s.db:exec("PRAGMA query_only = OFF"))
  T.ok(s:get_call("c_old"))
  T.eq(#s:pending_notifications(), 1)
  T.eq(s:prune(30), 1)
end)

T.test("sqlite: notifications older than the retention are pruned, delivered or not", function()
  local s = open("sqlite")
  for _, key in ipairs({ "old-sent", "old-pending", "old-failed", "new-pending" }) do
    T.eq(s:add_notification(key, "c_" .. key, "{}"), true)
  end
  s:mark_notified("old-sent", "sent")
  s:mark_notified("old-failed", "failed", "ECONNREFUSED")
  assert(s.db:run("UPDATE notifications SET created = ? WHERE key LIKE 'old-%'", core.time() - 40 * 86400))
  s:prune(30)
  local left = {}
  for _, n in ipairs(s:pending_notifications()) do
    left[#left + 1] = n.key
  end
  T.eq(left, { "new-pending" }, "a receiver never reached does not keep a backlog past the retention")
  T.eq(s.db:value("SELECT count(*) FROM notifications"), 1)
end)

T.test("sqlite: the data is there after closing and opening again", function()
  local path = T.tmpdir() .. "/again.db"
  local s = assert(store_mod.open({ backend = "sqlite", path = path, retentionDays = 30 }))
  assert(s:insert_call(call("c_1", "completed")))
  assert(s:add_transcript("c_1", { role = "agent", text = "kept" }))
  s:close()
  local s2 = assert(store_mod.open({ backend = "sqlite", path = path, retentionDays = 30 }))
  T.eq(s2:get_call("c_1").transcript[1].text, "kept")
  s2:close()
end)

for _, backend in ipairs({ "memory", "sqlite" }) do
  T.test(backend .. ": a call's Idempotency-Key is found again, and is not part of its record", function()
    local path = T.tmpdir() .. "/idem.db"
    local s = assert(store_mod.open({ backend = backend, path = path, retentionDays = 30 }))
    local c = call("c_1")
    c._idempotency = { key = "k-1", fingerprint = "f1" }
    assert(s:insert_call(c))
    T.eq(s:find_idempotent("k-1"), { call_id = "c_1", fingerprint = "f1" })
    T.eq(s:find_idempotent("k-2"), nil)
    T.eq(s:get_call("c_1")._idempotency, nil)
    if backend == "sqlite" then
      s:close()
      s = assert(store_mod.open({ backend = backend, path = path, retentionDays = 30 }))
      T.eq(s:find_idempotent("k-1"), { call_id = "c_1", fingerprint = "f1" }, "after a restart")
      s.db:run("UPDATE calls SET created = 0, status = 'completed'")
      T.eq(s:prune(30), 1)
      T.eq(s:find_idempotent("k-1"), nil, "pruned with its call")
    end
    s:close()
  end)
end

T.test("sqlite: empty arrays and long numbers in a record read back as they were written", function()
  local json = require "callagent.json"
  local path = T.tmpdir() .. "/arrays.db"
  local s = assert(store_mod.open({ backend = "sqlite", path = path, retentionDays = 30 }))
  local c = call("c_1", "completed")
  c.metadata = json.try_decode('{"tags":[],"nested":[[],{"e":[]}],"obj":{},"n":123456789012345}', true)
  assert(s:insert_call(c))
  assert(s:update_call("c_1", { report = { nextSteps = json.array({}), data = { list = json.array({}) } } }))
  s:close()
  s = assert(store_mod.open({ backend = "sqlite", path = path, retentionDays = 30 }))
  local got = s:get_call("c_1")
  s:close()
  T.eq(json.decode(json.encode(got.metadata)), json.decode(json.encode(c.metadata))) -- keys in any order
  T.match(json.encode(got.metadata), '"nested":%[%[%],{"e":%[%]}%]')
  T.match(json.encode(got.metadata), '"n":123456789012345[,}]')
  T.match(json.encode(got.report), '"nextSteps":%[%]')
  T.match(json.encode(got.report), '"list":%[%]')
end)

T.test("sqlite: a store a newer callagent wrote (a higher schema) is refused, and left as it is", function()
  local path = T.tmpdir() .. "/s.db"
  local s = assert(store_mod.open({ backend = "sqlite", path = path, retentionDays = 30 }))
  assert(s.db:run("UPDATE meta SET value = '2' WHERE key = 'schema'"))
  s:close()
  local again, err = store_mod.open({ backend = "sqlite", path = path, retentionDays = 30 })
  T.eq(again, nil)
  T.eq(err, "store.path: " .. path .. " was written by a newer callagent (store schema 2; this one reads 1): run "
    .. "that version, or give this one another store.path")
  local db = assert(require("callagent.sqlite").open(path, { readonly = true }))
  T.eq(db:value("SELECT value FROM meta WHERE key = 'schema'"), "2", "untouched")
  db:close()
end)

T.test("sqlite: a batch's writes commit together; one that raises leaves none of them", function()
  local s = open("sqlite")
  T.eq(s:batch(function()
    assert(s:insert_call(call("c_1")))
    assert(s:add_event("c_1", { type = "status", to = "queued" }))
  end), true)
  T.eq(#s:get_call("c_1").events, 1)
  local ok, err = pcall(s.batch, s, function()
    assert(s:insert_call(call("c_2")))
    assert(s:add_event("c_1", { type = "status", to = "dialing" }))
    error("boom")
  end)
  T.eq(ok, false)
  T.match(tostring(err), "boom")
  T.eq(s:get_call("c_2"), nil, "the insert was rolled back")
  T.eq(#s:get_call("c_1").events, 1, "and the event")
  -- A write that fails (here a row for no call) undoes the others, and the
  -- batch says so: a caller must not take the rest for written.
  local bok, berr = s:batch(function()
    assert(s:update_call("c_1", { status = "dialing" }))
    s:add_transcript("c_none", { role = "agent", text = "x" })
    assert(s:add_event("c_1", { type = "status", to = "dialing" }))
  end)
  T.eq(bok, nil)
  T.match(berr, "FOREIGN KEY")
  T.eq(s:get_call("c_1").status, "queued", "the update was undone")
  T.eq(#s:get_call("c_1").events, 1, "and the event")
  T.eq(s:batch(function()
    assert(s:add_event("c_1", { type = "status", to = "dialing" }))
  end), true, "the next batch is not taken for failed")
end)

T.test("sqlite: a write that fails after a nested batch went through still fails the outer batch, none of it kept", function()
  local s = open("sqlite")
  assert(s:insert_call(call("c_1")))
  local ok, err = s:batch(function()
    assert(s:batch(function()
      assert(s:add_event("c_1", { type = "status", to = "dialing" }))
    end))
    s:add_transcript("c_none", { role = "agent", text = "x" })
    assert(s:add_event("c_1", { type = "status", to = "in_progress" }))
  end)
  T.eq(ok, nil)
  T.match(tostring(err), "FOREIGN KEY")
  T.eq(#s:get_call("c_1").events, 0, "neither event is kept")
end)

T.test("sqlite: a full disk in a batch undoes all of it: the writes after the refused one are not kept either", function()
  local s = open("sqlite")
  assert(s:insert_call(call("c_1")))
  -- Full at a few pages more: a 100 kB transcript line does not fit, an event does.
  assert(s.db:value("PRAGMA max_page_count = " .. (s.db:value("PRAGMA page_count") + 3)))
  local ok, err = s:batch(function()
    s:add_event("c_1", { type = "status", to = "dialing" })
    s:add_transcript("c_1", { role = "callee", text = string.rep("x", 100000), at = "t" })
    s:add_event("c_1", { type = "status", to = "in_progress" })
    s:update_call("c_1", { status = "in_progress" })
  end)
  T.eq(ok, nil)
  T.match(tostring(err), "^ENOSPC", "the batch's error is the write the disk refused")
  local c = s:get_call("c_1")
  T.eq({ c.status, #c.events, #c.transcript }, { "queued", 0, 0 }, "none of the batch is in the store")
  -- Room again: the same writes go.
  assert(s.db:value("PRAGMA max_page_count = 1000000"))
  T.eq(s:batch(function()
    s:add_transcript("c_1", { role = "callee", text = string.rep("x", 100000), at = "t" })
    s:update_call("c_1", { status = "in_progress" })
  end), true)
  T.eq(s:get_call("c_1").status, "in_progress")
end)

T.test("sqlite: a read that fails under update_call and update_attempt is their error, not 'no such call'", function()
  local s = open("sqlite")
  assert(s:insert_call(call("c_1")))
  assert(s:add_attempt("c_1", { n = 1, status = "dialing" }))
  local ok, err = s.db:transaction(function()
    -- The transaction gone under the store (a full disk rolls it back):
    -- every statement until it returns is refused.
    assert(s.db:exec("ROLLBACK"))
    local r1 = { s:update_call("c_1", { status = "dialing" }) }
    local r2 = { s:update_attempt("c_1", 1, { status = "busy" }) }
    T.eq(r1[1], nil)
    T.match(tostring(r1[2]), "^ECANCELED", "update_call")
    T.eq(r2[1], nil)
    T.match(tostring(r2[2]), "^ECANCELED", "update_attempt")
  end)
  T.eq(ok, nil)
  T.match(tostring(err), "^ECANCELED")
end)

T.test("the engine writes a status change with its event and attempt rows in one batch", function()
  local kit = require "callkit"
  local recording = require "callagent.store.recording"
  recording.writes = {}
  local env = kit.start({
    config = { store = { backend = "recording" } },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:call_function("report_call", { summary = "Done.", outcome = "success" })
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 100, text = "Bye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550120", prompt = "Report at once." })
  T.eq(env:wait_final(id, 20000).status, "completed")
  -- The writes of one batch, as "op:detail" strings.
  local function group(pred)
    for _, w in ipairs(recording.writes) do
      if pred(w) then
        T.ok(w.batch, w.op .. " ran in a batch")
        local out = {}
        for _, x in ipairs(recording.writes) do
          if x.batch == w.batch then
            local a2 = x.args[2]
            local detail = a2
            if type(a2) == "table" then
              detail = x.op == "add_event" and a2.type or a2.status
            end
            out[#out + 1] = x.op .. ":" .. tostring(detail)
          end
        end
        return out
      end
    end
    error("no such write")
  end
  T.eq(group(function(w)
    return w.op == "add_attempt"
  end), { "add_attempt:dialing", "update_call:dialing", "add_event:status" }, "dialing: the attempt, the record, the event")
  T.eq(group(function(w)
    return w.op == "update_attempt" and w.args[3].status == "in_progress"
  end), { "add_event:provider", "update_attempt:1", "update_call:in_progress", "add_event:status" },
    "answered: the vendor's event, the attempt, the record, the status event")
  T.eq(group(function(w)
    return w.op == "update_call" and w.args[2].status == "completed"
  end), { "update_attempt:1", "clear_retry:nil", "add_notification:" .. id, "update_call:completed", "add_event:status" },
    "final: the attempt's end, the retry cleared and the notification recorded with the status")
  for _, w in ipairs(recording.writes) do
    T.ok(w.op ~= "clear_retry" or w.batch, "clear_retry only with a status change")
  end
end)

T.test("sqlite: a store written before notifications.refused_under gets the column and its index at open, rows kept", function()
  local sqlite = require "callagent.sqlite"
  local path = T.tmpdir() .. "/old.db"
  local db = assert(sqlite.open(path))
  assert(db:exec([[
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
INSERT INTO meta (key, value) VALUES ('schema', '1');
CREATE TABLE notifications (key TEXT PRIMARY KEY, call_id TEXT NOT NULL, payload TEXT NOT NULL,
  sent INTEGER NOT NULL DEFAULT 0, tries INTEGER NOT NULL DEFAULT 0, last_error TEXT, created REAL NOT NULL);
INSERT INTO notifications (key, call_id, payload, created) VALUES ('c_1:completed', 'c_1', '{}', 1);
]]))
  db:close()
  local s = assert(store_mod.open({ backend = "sqlite", path = path, retentionDays = 30 }))
  T.defer(function()
    s:close()
  end)
  T.eq(#s.db:rows("SELECT name FROM pragma_table_info('notifications') WHERE name = 'refused_under'"), 1)
  T.eq(s.db:value("SELECT count(*) FROM sqlite_master WHERE name = 'notifications_refused'"), 1)
  assert(s:mark_notified("c_1:completed", "refused", "HTTP 401", "fp-old"))
  T.eq(s:requeue_refused("fp-new"), 1, "the old row refused under another config is pending again")
  T.eq(#s:pending_notifications(), 1)
end)

T.test("sqlite: another program's database at store.path is an error naming it, left as it was, its lock let go", function()
  local sqlite = require "callagent.sqlite"
  for _, foreign in ipairs({ "CREATE TABLE meta (k TEXT, v TEXT)", "CREATE TABLE calls (x); INSERT INTO calls VALUES (1)",
    "CREATE TABLE users (name TEXT); CREATE TABLE orders (id INTEGER PRIMARY KEY AUTOINCREMENT)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT); INSERT INTO meta VALUES ('version', '3')" }) do
    local path = T.tmpdir() .. "/other.db"
    local db = assert(sqlite.open(path))
    assert(db:exec(foreign))
    local before = db:rows("SELECT name FROM sqlite_master ORDER BY name")
    db:close()
    for try = 1, 2 do
      local ok, s, err = pcall(store_mod.open, { backend = "sqlite", path = path, retentionDays = 30 })
      T.eq(ok, true, foreign .. ": no raise")
      T.eq(s, nil, foreign)
      T.match(err, "^store%.path: .*other%.db is another program's database %(tables [%w, ]+; no callagent store "
        .. "schema%): give callagent a file of its own$", foreign .. ", try " .. try .. ": not 'in use' by this very process")
      T.no_match(err, "sqlite_", "SQLite's own tables are not named")
    end
    db = assert(sqlite.open(path, { readonly = true }))
    T.eq(db:rows("SELECT name FROM sqlite_master ORDER BY name"), before, foreign .. ": nothing created in it")
    db:close()
  end
end)

T.test("sqlite: a store an older callagent began to set up and was stopped in is finished, not refused", function()
  -- Before the one-commit set-up, the schema went statement by statement:
  -- meta first, its schema row last. A kill between left this.
  local sqlite = require "callagent.sqlite"
  local path = T.tmpdir() .. "/calls.db"
  local db = assert(sqlite.open(path))
  assert(db:exec("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT); CREATE TABLE calls (seq INTEGER PRIMARY KEY "
    .. "AUTOINCREMENT, id TEXT NOT NULL UNIQUE, status TEXT NOT NULL, created REAL NOT NULL, doc TEXT NOT NULL)"))
  db:close()
  local s, err = store_mod.open({ backend = "sqlite", path = path, retentionDays = 30 })
  T.ok(s, err)
  assert(s:insert_call(call("c_1")))
  T.eq(s:get_call("c_1").id, "c_1")
  s:close()
  db = assert(sqlite.open(path, { readonly = true }))
  T.eq(db:value("SELECT value FROM meta WHERE key = 'schema'"), "1", "its set-up finished")
  db:close()
end)

T.test("the store folder is created when missing", function()
  local path = T.tmpdir() .. "/a/b/c/calls.db"
  local s = assert(store_mod.open({ backend = "sqlite", path = path, retentionDays = 30 }))
  assert(s:insert_call(call("c_1")))
  s:close()
  T.eq(core.stat(path), "file")
end)


T.test("sqlite: a prune of thousands of calls goes in batches, the loop served between them; the same calls go", function()
  -- One DELETE of months of calls held the loop, and every live call's
  -- audio, until it was done.
  local s = open("sqlite")
  local old = core.time() - 40 * 86400
  assert(s.db:exec(([[
    BEGIN;
    WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < 3000)
      INSERT INTO calls (id, status, created, doc) SELECT 'c_' || i, 'completed', %f, '{}' FROM k;
    WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < 10)
      INSERT INTO transcript (call_id, doc) SELECT c.id, '{"role":"agent","text":"x"}' FROM calls c, k;
    INSERT INTO notifications (key, call_id, payload, sent, created)
      SELECT id || ':completed', id, '{}', seq %% 2, created FROM calls;
    COMMIT;
  ]]):format(old)))
  assert(s:insert_call(call("c_live", "in_progress")))
  assert(s:insert_call(call("c_new", "completed")))
  assert(s:add_notification("c_new:completed", "c_new", "{}"))
  assert(s.db:run("UPDATE calls SET created = ? WHERE id = 'c_live'", old))
  local ticks, last, longest = 0, timer.now(), 0
  local t = timer.every(1, function()
    ticks = ticks + 1
    longest = math.max(longest, timer.now() - last)
    last = timer.now()
  end)
  T.defer(function()
    t:stop()
  end)
  timer.sleep(5)
  ticks, last, longest = 0, timer.now(), 0
  local started = timer.now()
  T.eq(s:prune(30), 3000, "the calls removed")
  local took = timer.now() - started
  t:stop()
  T.diag(("prune: %.1f ms, %d timer ticks in it, longest gap %.1f ms"):format(took, ticks, longest))
  T.ge(ticks, 5, "the loop ran timers between the batches")
  T.eq(s.db:value("SELECT count(*) FROM calls"), 2, "the active one and the new one stay")
  T.ok(s:get_call("c_live"))
  T.eq(s.db:value("SELECT count(*) FROM transcript"), 0, "their rows went with them")
  local left = {}
  for _, n in ipairs(s:pending_notifications()) do
    left[#left + 1] = n.key
  end
  T.eq(left, { "c_new:completed" })
  T.eq(s.db:value("SELECT count(*) FROM notifications"), 1)
  T.eq(s:prune(30), 0, "nothing left to prune")
end)

T.test("sqlite: a store closed during a prune's turn ends it without an error raised", function()
  local s = assert(store_mod.open({ backend = "sqlite", path = T.tmpdir() .. "/closing.db", retentionDays = 30 }))
  assert(s.db:exec(([[
    WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < 2000)
      INSERT INTO calls (id, status, created, doc) SELECT 'c_' || i, 'completed', %f, '{}' FROM k;
  ]]):format(core.time() - 40 * 86400)))
  local n, err
  local done = false
  -- The loop busy for a while in this pass: the prune's first batch is
  -- followed by its turn.
  local busy = os.clock()
  repeat
  until os.clock() - busy > 0.005
  task.spawn(function()
    n, err = s:prune(30)
    done = true
  end)
  T.eq(done, false, "the prune took turns")
  s:close()
  T.wait_for(function()
    return done
  end, 2000, "the prune ended")
  T.eq(n, nil)
  T.match(tostring(err), "^ECLOSED")
end)

T.test("sqlite: a prune of calls with long transcripts takes smaller batches: no turn holds the loop for long", function()
  local s = open("sqlite")
  assert(s.db:exec(([[
    BEGIN;
    WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < 600)
      INSERT INTO calls (id, status, created, doc) SELECT 'c_' || i, 'completed', %f, '{}' FROM k;
    WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < 300)
      INSERT INTO transcript (call_id, doc) SELECT c.id, '{"role":"agent","text":"a line of what was said"}'
      FROM calls c, k;
    COMMIT;
  ]]):format(core.time() - 40 * 86400)))
  local last, longest = timer.now(), 0
  local t = timer.every(1, function()
    longest = math.max(longest, timer.now() - last)
    last = timer.now()
  end)
  T.defer(function()
    t:stop()
  end)
  timer.sleep(5)
  last, longest = timer.now(), 0
  local started = timer.now()
  T.eq(s:prune(30), 600)
  local took = timer.now() - started
  longest = math.max(longest, timer.now() - last)
  T.diag(("prune: %.1f ms, longest the loop waited for a timer %.1f ms"):format(took, longest))
  T.eq(s.db:value("SELECT count(*) FROM transcript"), 0)
  T.lt(longest, took / 3, "no batch held the loop for most of the prune")
end)
T.run()
