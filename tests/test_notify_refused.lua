-- A notification the receiver refused for callagent's token (401, 403) or
-- address (404, or a redirect) is sent again, once, by a start with another notify.hooksUrl
-- or hooksToken; one refused for its payload (422) never is; the store keeps
-- a fingerprint of what it was refused under, never the token.
local T = require "testing"
local http = require "callagent.http"
local timer = require "callagent.timer"
local sqlite = require "callagent.sqlite"
local store_mod = require "callagent.store"
local notify = require "callagent.notify"

local TOKEN_A = "hooks-token-A-the-wrong-one"
local TOKEN_B = "hooks-token-B-the-right-one"
local TOKEN_C = "hooks-token-C-the-next-one"
local KEY = "c_1:completed"

-- A receiver at /hooks/agent that answers 401 to a token other than
-- good (good(): the one it takes now), and otherwise status (200 unless
-- given): what it saw, tries and delivered (counts by key), and its url.
local function receiver(good, status)
  local seen = { tries = {}, delivered = {}, total = 0 }
  local hooks = http.server({ headers = { "idempotency-key" } })
  hooks:post("/hooks/agent", function(req)
    local key = req.headers["idempotency-key"]
    seen.total = seen.total + 1
    seen.tries[key] = (seen.tries[key] or 0) + 1
    if req.headers.authorization ~= "Bearer " .. good() then
      return 401, { error = "bad token" }
    end
    if status then
      return status, { error = "cannot take this one" }
    end
    seen.delivered[key] = (seen.delivered[key] or 0) + 1
    return 200, { ok = true }
  end)
  assert(hooks:listen())
  T.defer(function()
    hooks:close()
  end)
  seen.url = hooks:url("/hooks")
  return seen
end

local function open_store(backend, path)
  local store = assert(store_mod.open({ backend = backend, path = path or (T.tmpdir() .. "/n.db"),
    retentionDays = 30 }))
  T.defer(function()
    store:close()
  end)
  return store
end

-- A notifier on store, sending to url with token: a new one is what a
-- restart makes.
local function notifier(store, url, token)
  local n = notify.new({ hooksUrl = url, hooksToken = token }, store, { base_delay_ms = 20, attempts = 2 })
  T.defer(function()
    n:stop()
  end)
  return n
end

-- Waits until n sends nothing more: no sweep under way, none in flight.
local function settle(n)
  timer.sleep(20)
  T.wait_for(function()
    return not n.walking and next(n.in_flight) == nil
  end, 5000, "the notifier to be done")
end

-- KEY recorded and sent by n, which the receiver refuses: no longer pending.
local function refused_by(n, store)
  assert(store:add_notification(KEY, "c_1", "{}"))
  n:send(KEY, "{}")
  settle(n)
  T.eq(#store:pending_notifications(), 0, "refused: no longer pending")
end

for _, backend in ipairs({ "sqlite", "memory" }) do
  T.test(backend .. ": refused with 401 under one token, a notification is delivered once by a start with another",
    function()
      local seen = receiver(function()
        return TOKEN_B
      end)
      local store = open_store(backend)
      local a = notifier(store, seen.url, TOKEN_A)
      T.eq(a:resume(), 0, "nothing pending at the first start")
      refused_by(a, store)
      a:stop()
      local b = notifier(store, seen.url, TOKEN_B)
      T.eq(b:resume(), 1, "the refused one is in the backlog again")
      settle(b)
      T.eq(seen.delivered[KEY], 1, "delivered under the new token")
      T.eq(#store:pending_notifications(), 0, "marked delivered")
      b:stop()
      local again = notifier(store, seen.url, TOKEN_B)
      T.eq(again:resume(), 0, "a delivered one is not sent again")
      settle(again)
      T.eq({ seen.tries[KEY], seen.delivered[KEY] }, { 2, 1 }, "one refusal, one delivery")
    end)

  T.test(backend .. ": one refused under the same token and address is not sent again at a start", function()
    local seen = receiver(function()
      return TOKEN_B
    end)
    local store = open_store(backend)
    local a = notifier(store, seen.url, TOKEN_A)
    refused_by(a, store)
    a:stop()
    local again = notifier(store, seen.url, TOKEN_A)
    T.eq(again:resume(), 0, "nothing to send")
    settle(again)
    T.eq(seen.tries[KEY], 1, "refused once, never sent again")
  end)

  T.test(backend .. ": one refused with 422 (its payload) is not sent again at a start with another token", function()
    local seen = receiver(function()
      return TOKEN_A
    end, 422)
    local store = open_store(backend)
    local a = notifier(store, seen.url, TOKEN_A)
    refused_by(a, store)
    a:stop()
    local b = notifier(store, seen.url, TOKEN_B)
    T.eq(b:resume(), 0, "nothing to send")
    settle(b)
    T.eq(seen.tries[KEY], 1, "refused once, for good")
  end)

  T.test(backend .. ": refused again under the new token, it stays refused until the next change", function()
    local good = TOKEN_C
    local seen = receiver(function()
      return good
    end)
    local store = open_store(backend)
    local a = notifier(store, seen.url, TOKEN_A)
    refused_by(a, store)
    a:stop()
    local b = notifier(store, seen.url, TOKEN_B)
    T.eq(b:resume(), 1, "sent again under B")
    settle(b)
    T.eq(seen.tries[KEY], 2, "refused under B too")
    T.eq(#store:pending_notifications(), 0, "refused again")
    b:stop()
    local b2 = notifier(store, seen.url, TOKEN_B)
    T.eq(b2:resume(), 0, "not sent again under the B it was refused under")
    settle(b2)
    T.eq(seen.tries[KEY], 2, "no third try under B")
    b2:stop()
    local c = notifier(store, seen.url, TOKEN_C)
    T.eq(c:resume(), 1, "sent again under C")
    settle(c)
    T.eq({ seen.tries[KEY], seen.delivered[KEY] }, { 3, 1 }, "delivered under C, once")
  end)

  T.test(backend .. ": refused with 404 for a wrong hooksUrl path, it is delivered by a start with the right one",
    function()
      local seen = receiver(function()
        return TOKEN_A
      end)
      local store = open_store(backend)
      local wrong = notifier(store, seen.url:gsub("/hooks$", "/hookz"), TOKEN_A)
      refused_by(wrong, store)
      wrong:stop()
      local right = notifier(store, seen.url, TOKEN_A)
      T.eq(right:resume(), 1, "sent again at the right address")
      settle(right)
      T.eq(seen.delivered[KEY], 1, "delivered once")
    end)

  T.test(backend .. ": redirected (308) from an old hooksUrl, it is delivered by a start with the receiver's own",
    function()
      local seen = receiver(function()
        return TOKEN_A
      end)
      -- The receiver moved: its old address answers with a redirect, which
      -- is not followed (the token goes nowhere but hooksUrl).
      local moved = http.server({})
      local redirects = 0
      moved:post("/old/agent", function()
        redirects = redirects + 1
        return 308, "", { Location = seen.url .. "/agent" }
      end)
      assert(moved:listen())
      T.defer(function()
        moved:close()
      end)
      local store = open_store(backend)
      local old = notifier(store, moved:url("/old"), TOKEN_A)
      refused_by(old, store)
      old:stop()
      T.eq({ redirects, seen.total }, { 1, 0 }, "redirected once, not followed")
      T.eq(notifier(store, moved:url("/old"), TOKEN_A):resume(), 0, "not again under the same config")
      local right = notifier(store, seen.url, TOKEN_A)
      T.eq(right:resume(), 1, "sent again at the receiver's own address")
      settle(right)
      T.eq(seen.delivered[KEY], 1, "delivered once")
    end)

  T.test(backend .. ": 450 refused under an old token go out once each at a start with another, read in pages of 200",
    function()
      local seen = receiver(function()
        return TOKEN_B
      end)
      local store = open_store(backend)
      local a = notifier(store, seen.url, TOKEN_A)
      for i = 1, 450 do
        local key = ("c_%03d:completed"):format(i)
        assert(store:add_notification(key, key:match("^[^:]+"), "{}"))
        -- As a's 401 marks it (the send itself is the tests above).
        assert(store:mark_notified(key, "refused", "HTTP 401", a:fingerprint()))
      end
      -- And one refused for its payload, in their midst: stays refused.
      assert(store:add_notification("c_bad:completed", "c_bad", "{}"))
      assert(store:mark_notified("c_bad:completed", "refused", "HTTP 422", nil))
      T.eq(#store:pending_notifications(), 0, "all refused")
      a:stop()
      local b = notifier(store, seen.url, TOKEN_B)
      T.eq(b:resume(), 200, "a page at a time")
      T.wait_for(function()
        return #store:pending_notifications() == 0 and not b.walking and next(b.in_flight) == nil
      end, 10000, "all delivered")
      local once, count = true, 0
      for key, c in pairs(seen.delivered) do
        count = count + 1
        once = once and c == 1 and key ~= "c_bad:completed"
      end
      T.eq({ count, once, seen.total }, { 450, true, 450 }, "each of the 450 once, the 422 one not")
      T.le(b.stats.most_rows, 200, "no read held more than a page")
      T.ge(b.stats.pages, 3, "read in pages")
    end)
end

T.test("sqlite: the row of a refused notification holds a fingerprint of the config, never the token", function()
  local seen = receiver(function()
    return TOKEN_B
  end)
  local path = T.tmpdir() .. "/n.db"
  local store = open_store("sqlite", path)
  local a = notifier(store, seen.url, TOKEN_A)
  refused_by(a, store)
  local row = store.db:row("SELECT * FROM notifications WHERE key = ?", KEY)
  T.match(row.refused_under or "", "^" .. ("%x"):rep(64) .. "$", "a SHA-256 in hex")
  T.eq(row.refused_under, a:fingerprint())
  local b = notifier(store, seen.url, TOKEN_B)
  T.ne(b:fingerprint(), a:fingerprint(), "another token, another fingerprint")
  store:close()
  -- Nowhere in the file either (nor its WAL).
  for _, file in ipairs({ path, path .. "-wal" }) do
    local f = io.open(file, "rb")
    if f then
      local bytes = f:read("a")
      f:close()
      T.eq(bytes:find(TOKEN_A, 1, true), nil, file .. " does not hold the token")
    end
  end
end)

T.test("sqlite: a store written before refused_under opens, gains it, and its refused rows stay refused", function()
  local path = T.tmpdir() .. "/old.db"
  local db = assert(sqlite.open(path))
  -- The notifications table (and the schema row) as a callagent before wrote them.
  assert(db:exec([[
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
INSERT INTO meta (key, value) VALUES ('schema', '1');
CREATE TABLE notifications (
  key TEXT PRIMARY KEY,
  call_id TEXT NOT NULL,
  payload TEXT NOT NULL,
  sent INTEGER NOT NULL DEFAULT 0,
  tries INTEGER NOT NULL DEFAULT 0,
  last_error TEXT,
  created REAL NOT NULL
);
INSERT INTO notifications (key, call_id, payload, sent, tries, last_error, created)
  VALUES ('c_old:completed', 'c_old', '{}', 2, 1, 'HTTP 401', 1000), ('c_new:completed', 'c_new', '{}', 0, 1, NULL, 1001);
]]))
  db:close()
  local store = open_store("sqlite", path)
  local cols = {}
  for _, c in ipairs(store.db:rows("SELECT name FROM pragma_table_info('notifications')")) do
    cols[c.name] = true
  end
  T.ok(cols.refused_under, "the column was added")
  T.eq(store.db:value("SELECT count(*) FROM notifications"), 2, "its rows kept")
  local seen = receiver(function()
    return TOKEN_B
  end)
  local b = notifier(store, seen.url, TOKEN_B)
  T.eq(b:resume(), 1, "the pending one only")
  settle(b)
  T.eq(seen.delivered, { ["c_new:completed"] = 1 }, "refused before the fingerprint: refused for good")
  store:close()
  T.ok(open_store("sqlite", path), "opens again")
end)

T.test("a store backend without the refused fingerprint works as before: a 401 stays refused", function()
  local inner = open_store("memory")
  -- A custom backend of the interface before: mark_notified takes three
  -- arguments, no requeue_refused.
  local store = {}
  for _, m in ipairs({ "add_notification", "pending_notifications", "close" }) do
    store[m] = function(_, ...)
      return inner[m](inner, ...)
    end
  end
  function store.mark_notified(_, key, state, err)
    return inner:mark_notified(key, state, err)
  end
  local seen = receiver(function()
    return TOKEN_B
  end)
  local a = notifier(store, seen.url, TOKEN_A)
  refused_by(a, store)
  a:stop()
  local b = notifier(store, seen.url, TOKEN_B)
  T.eq(b:resume(), 0, "nothing to send")
  settle(b)
  T.eq(seen.tries[KEY], 1, "refused for good")
end)

-- A process that opens the SQLite store N_DB and notifies N_HOOKS with
-- N_TOKEN: with N_SEED, KEY recorded and sent; without, what resume sends.
local RUN = [[
local store_mod = require "callagent.store"
local notify = require "callagent.notify"
local task = require "callagent.task"
local timer = require "callagent.timer"
local runtime = require "callagent.runtime"
task.spawn(function()
  local store = assert(store_mod.open({ backend = "sqlite", path = os.getenv("N_DB"), retentionDays = 30 }))
  local n = notify.new({ hooksUrl = os.getenv("N_HOOKS"), hooksToken = os.getenv("N_TOKEN") }, store,
    { base_delay_ms = 20, attempts = 2 })
  n:resume()
  if os.getenv("N_SEED") then
    assert(store:add_notification("c_1:completed", "c_1", "{}"))
    n:send("c_1:completed", "{}")
  end
  timer.sleep(20)
  while n.walking or next(n.in_flight) do
    timer.sleep(20)
  end
  n:stop()
  store:close()
  print("done")
  io.stdout:flush()
  runtime.exit(0)
end)
]]

T.test("a restart with another hooksToken delivers the one refused before once, logs how many, and no token", function()
  local seen = receiver(function()
    return TOKEN_B
  end)
  local dir = T.tmpdir()
  local db = dir .. "/n.db"
  local function run(token, seed)
    local p = T.spawn_app(nil, nil, { source = RUN, name = "run.lua",
      env = { N_DB = db, N_HOOKS = seen.url, N_TOKEN = token, N_SEED = seed } })
    T.eq(p:wait(10000), 0, "exits 0: " .. p.errtext())
    T.eq(p.text(), "done")
    return p.errtext()
  end
  local first = run(TOKEN_A, "1")
  T.match(first, "WARN notification refused; not retrying: sent again at a start with another notify%.hooksUrl or "
    .. "hooksToken error=\"HTTP 401\" key=c_1:completed")
  T.eq(seen.tries[KEY], 1)
  local second = run(TOKEN_B)
  T.match(second, "INFO notifications refused under another notify%.hooksUrl or hooksToken: sending them again count=1")
  T.eq(seen.delivered[KEY], 1, "delivered after the restart")
  local third = run(TOKEN_B)
  T.no_match(third, "refused under another", "nothing to send again")
  T.eq({ seen.tries[KEY], seen.delivered[KEY] }, { 2, 1 }, "once")
  for _, log in ipairs({ first, second, third }) do
    T.eq(log:find(TOKEN_A, 1, true), nil, "token A not logged")
    T.eq(log:find(TOKEN_B, 1, true), nil, "token B not logged")
  end
  local s = assert(sqlite.open(db, { readonly = true }))
  local row = s:row("SELECT * FROM notifications WHERE key = ?", KEY)
  s:close()
  for col, v in pairs(row) do
    T.eq(tostring(v):find("hooks-token", 1, true), nil, col .. " holds no token")
  end
end)

T.test("a hooksUrl with a user, password and query secret: none of them is logged, whatever the receiver answers", function()
  local SECRETS = { "hook-url-password", "hook-query-secret", "loc-password", "loc-query-secret" }
  local seen = receiver(function()
    return TOKEN_B
  end)
  local redirect = http.server()
  redirect:post("/hooks/agent", function()
    return 308, "", { Location = "http://luser:loc-password@127.0.0.1:9/hooks/agent?token=loc-query-secret" }
  end)
  assert(redirect:listen())
  T.defer(function()
    redirect:close()
  end)
  local function with_secrets(u)
    return (u:gsub("^http://", "http://hookuser:hook-url-password@")) .. "?sig=hook-query-secret"
  end
  for _, case in ipairs({
    { "refused (401)", with_secrets(seen.url), TOKEN_A, "notification refused" },
    { "delivered", with_secrets(seen.url), TOKEN_B, "notification delivered" },
    { "no connection", with_secrets("http://127.0.0.1:9/hooks"), TOKEN_B, "notification failed; out of tries" },
    { "redirected", with_secrets(redirect:url("/hooks")), TOKEN_B, "notification redirected.*location=" },
  }) do
    local p = T.spawn_app(nil, nil, { source = RUN, name = "run.lua",
      env = { N_DB = T.tmpdir() .. "/n.db", N_HOOKS = case[2], N_TOKEN = case[3], N_SEED = "1" } })
    T.eq(p:wait(10000), 0, case[1] .. ": exits 0: " .. p.errtext())
    local log = p.errtext()
    T.match(log, case[4], case[1] .. ": logged")
    for _, secret in ipairs(SECRETS) do
      T.eq(log:find(secret, 1, true), nil, case[1] .. ": " .. secret .. " not logged:\n" .. log)
    end
  end
  T.eq(seen.delivered[KEY], 1, "the receiver took it under its URL's user and query")
end)

T.run()
