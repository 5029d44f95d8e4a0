local T = require "testing"
local sqlite = require "callagent.sqlite"
local core = require "callagent.core"
local process = require "callagent.process"
local timer = require "callagent.timer"

-- A new database in a fresh folder; closed after the test.
local function fresh(opts, name)
  local dir = T.tmpdir()
  local path = dir .. "/" .. (name or "test.db")
  local db = assert(sqlite.open(path, opts))
  T.defer(function()
    db:close()
  end)
  return db, path, dir
end

local function file_size(path)
  local kind, size = core.stat(path)
  return kind and size or nil
end

local function write_file(path, data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
end

-- Runs the Lua source as a child callagent (argv prefix optional); returns its process.
local function spawn_child(dir, src, prefix)
  local script = dir .. "/child.lua"
  write_file(script, src)
  local argv = {}
  for _, a in ipairs(prefix or {}) do
    argv[#argv + 1] = a
  end
  argv[#argv + 1] = T.bin
  argv[#argv + 1] = "run"
  argv[#argv + 1] = script
  return assert(process.spawn(argv))
end

T.test("open creates a new file in WAL mode with NORMAL sync, foreign keys and the busy timeout", function()
  local db, path = fresh()
  T.eq(core.stat(path), "file")
  T.eq(db:value("PRAGMA journal_mode"), "wal")
  T.eq(db:value("PRAGMA synchronous"), 1, "NORMAL")
  T.eq(db:value("PRAGMA foreign_keys"), 1)
  T.eq(db:value("PRAGMA busy_timeout"), 5000)
  T.eq(db:path(), path)
  T.match(sqlite.version, "^3%.%d+%.%d+")
end)

T.test("a new database file, and its -wal and -shm, are readable by their owner only; an existing one keeps its mode", function()
  local db, path, dir = fresh()
  db:exec("CREATE TABLE t (x)")
  db:exec("INSERT INTO t VALUES (1)")
  local function mode(p)
    local code, out = T.exec({ "stat", "-c", "%a", p })
    T.eq(code, 0, p)
    return out[1]
  end
  for _, p in ipairs({ path, path .. "-wal", path .. "-shm" }) do
    T.eq(mode(p), "600", p .. " (SQLite made it 644, for every user of the machine to read the calls)")
  end
  local old = dir .. "/old.db"
  assert(io.open(old, "w")):close()
  T.eq(T.exec({ "chmod", "640", old }), 0)
  assert(sqlite.open(old)):close()
  T.eq(mode(old), "640", "a file made by its owner keeps the mode given")
end)

T.test("a path that starts with file: is that file, made 0600, not a URI naming another one", function()
  local dir = T.tmpdir()
  local script = dir .. "/child.lua"
  write_file(script, 'local db = assert(require("callagent.sqlite").open("file:u.db")) db:exec("CREATE TABLE t (x)") db:close()')
  local p = assert(process.spawn({ T.bin, "run", script, cwd = dir }))
  T.eq(p:wait(10000), 0, "child exit")
  T.eq(core.stat(dir .. "/u.db"), nil, "SQLite took file:u.db for a URI naming u.db")
  local code, out = T.exec({ "stat", "-c", "%a %s", dir .. "/file:u.db" })
  T.eq(code, 0)
  T.match(out[1], "^600 [1-9]", "the file named holds the database, mode 600")
end)

T.test("open applies synchronous = FULL and busy_timeout, and rejects bad options", function()
  local db = fresh({ synchronous = "FULL", busy_timeout = 250 })
  T.eq(db:value("PRAGMA synchronous"), 2, "FULL")
  T.eq(db:value("PRAGMA busy_timeout"), 250)
  local dir = T.tmpdir()
  T.raises(function()
    sqlite.open(dir .. "/x.db", { synchronous = "SOMETIMES" })
  end, "synchronous")
  T.raises(function()
    sqlite.open(dir .. "/x.db", { busy_timeout = -1 })
  end, "busy_timeout")
  T.raises(function()
    sqlite.open(dir .. "/x.db", "wal")
  end, "table expected")
end)

T.test("values of every type round-trip exactly; NULL columns are absent from rows", function()
  local db = fresh()
  assert(db:exec("CREATE TABLE v(id INTEGER PRIMARY KEY, x)"))
  local nul = "a\0b\0\0c"
  local bad_utf8 = "\xff\xfe\x00\x80"
  local blob = "\0\1\2\255binary\0"
  local cases = {
    { 1 << 62, "integer" },
    { -(1 << 62) - 12345, "integer" },
    { math.mininteger, "integer" },
    { math.maxinteger, "integer" },
    { -1.5e-300, "real" },
    { -2.25, "real" },
    { 1.0, "real" },
    { "", "text" },
    { nul, "text" },
    { bad_utf8, "text" },
    { true, "integer", 1 },
    { false, "integer", 0 },
  }
  for i, c in ipairs(cases) do
    assert(db:run("INSERT INTO v(id, x) VALUES(?, ?)", i, c[1]))
    local back = db:value("SELECT x FROM v WHERE id = ?", i)
    local want = c[3] == nil and c[1] or c[3]
    T.eq(back, want, "case " .. i)
    T.eq(math.type(back), math.type(want), "number subtype of case " .. i)
    T.eq(db:value("SELECT typeof(x) FROM v WHERE id = ?", i), c[2], "stored type of case " .. i)
  end
  local nul_id
  for i, c in ipairs(cases) do
    nul_id = c[1] == nul and i or nul_id
  end
  T.eq(db:value("SELECT length(CAST(x AS BLOB)) FROM v WHERE id = ?", nul_id), #nul, "embedded NULs are stored")

  assert(db:run("INSERT INTO v(id, x) VALUES(100, ?)", sqlite.blob(blob)))
  T.eq(db:value("SELECT typeof(x) FROM v WHERE id = 100"), "blob")
  T.eq(db:value("SELECT x FROM v WHERE id = 100"), blob)

  assert(db:run("INSERT INTO v(id, x) VALUES(101, ?)", nil))
  T.eq(db:value("SELECT typeof(x) FROM v WHERE id = 101"), "null")
  T.eq(db:row("SELECT id, x FROM v WHERE id = 101"), { id = 101 }, "NULL column absent")
  T.eq(db:value("SELECT x FROM v WHERE id = 101"), nil)
  T.eq(db:value("SELECT x FROM v WHERE id = 1"), 4611686018427387904, "2^62 exactly")
  T.raises(function()
    sqlite.blob(42)
  end, "string expected")
end)

T.test("positional and named parameters bind; a name missing from the table binds NULL", function()
  local db = fresh()
  assert(db:exec("CREATE TABLE p(a, b, c)"))
  assert(db:run("INSERT INTO p VALUES(?, ?, ?)", 1, "two", 3.5))
  assert(db:run("INSERT INTO p VALUES(?3, ?1, ?2)", "x", "y", "z"))
  assert(db:run("INSERT INTO p VALUES(:a, @b, $c)", { a = 10, b = "bee", c = false }))
  assert(db:run("INSERT INTO p VALUES(:a, :a, :b)", { a = 7 }))
  T.eq(db:rows("SELECT a, b, c FROM p ORDER BY rowid"), {
    { a = 1, b = "two", c = 3.5 },
    { a = "z", b = "x", c = "y" },
    { a = 10, b = "bee", c = 0 },
    { a = 7, b = 7 },
  })
  T.eq(db:value("SELECT count(*) FROM p WHERE a = :v OR b = :v", { v = 7 }), 1)
end)

T.test("misuse raises: parameter count, unknown names, tables for ?, bad types, bad SQL", function()
  local db = fresh()
  assert(db:exec("CREATE TABLE m(a, b)"))
  T.raises(function()
    db:run("INSERT INTO m VALUES(?, ?)", 1)
  end, "takes 2 parameters, got 1 value")
  T.raises(function()
    db:run("INSERT INTO m VALUES(?, ?)", 1, 2, 3)
  end, "takes 2 parameters, got 3 values")
  T.raises(function()
    db:run("INSERT INTO m VALUES(:a, :b)", { a = 1, bogus = 2 })
  end, "unknown named parameter 'bogus'")
  T.raises(function()
    db:run("INSERT INTO m VALUES(:a, :b)", { a = 1, [1] = 2 })
  end, "keys must be strings")
  T.raises(function()
    db:run("INSERT INTO m VALUES(?, ?)", { a = 1 })
  end, "positional")
  T.raises(function()
    db:run("INSERT INTO m VALUES(?, ?)", 1, {})
  end, "cannot bind a table")
  T.raises(function()
    db:run("INSERT INTO m VALUES(?, ?)", 1, print)
  end, "cannot bind a function")
  T.raises(function()
    db:prepare("SELEC 1")
  end, 'near "SELEC": syntax error')
  T.raises(function()
    db:rows("SELECT nope FROM m")
  end, "no such column: nope")
  T.raises(function()
    db:run("INSERT INTO missing VALUES(1)")
  end, "no such table: missing")
  T.raises(function()
    db:prepare("SELECT 1; SELECT 2")
  end, "one statement")
  T.raises(function()
    db:prepare("  -- nothing\n")
  end, "no SQL statement")
  T.raises(function()
    db:exec("CREATE TABLE ok(a); CREATE TABLEX")
  end, "syntax error")
  -- After all that the statements still work.
  assert(db:run("INSERT INTO m VALUES(?, ?)", 1, 2))
  T.eq(db:value("SELECT count(*) FROM m"), 1)
  -- Trailing whitespace, semicolons and comments are one statement.
  T.eq(db:prepare("SELECT 5 ; -- the end\n"):value(), 5)
end)

T.test("prepare caches by SQL text: the same statement comes back and stays correct; eviction keeps held ones usable", function()
  local db = fresh({ statements = 2 })
  assert(db:exec("CREATE TABLE c(id INTEGER PRIMARY KEY, v)"))
  local sql = "INSERT INTO c(v) VALUES(?)"
  local s1 = db:prepare(sql)
  T.ok(rawequal(s1, db:prepare(sql)), "same object for the same SQL")
  T.eq(s1:sql(), sql)
  for i = 1, 1000 do
    local _, rowid = s1:run(i)
    T.eq(rowid, i)
  end
  for i = 1, 1000 do
    T.eq(db:value("SELECT v FROM c WHERE id = ?", i), i)
  end
  T.eq(db:prepare("SELECT sum(v) FROM c"):value(), 500500)
  -- statements = 2: the INSERT was least recently used and left the cache.
  T.eq(db:stats().statements, 2)
  local s2 = db:prepare(sql)
  T.ok(not rawequal(s1, s2), "evicted: a new statement is prepared")
  assert(s1:run(1001))
  T.eq(s1:row(1002), nil, "an INSERT has no row")
  T.eq(db:value("SELECT count(*) FROM c"), 1002)
  T.eq(db:prepare("SELECT v FROM c WHERE id = :id"):row({ id = 3 }), { v = 3 })
  T.eq(#db:prepare("SELECT v FROM c WHERE id < ?"):rows(4), 3)
end)

T.test("a statement run again is not compiled again; distinct SQL is, and the cache stays at its size", function()
  local db = fresh()
  assert(db:exec("CREATE TABLE k(id INTEGER PRIMARY KEY, v TEXT)"))
  assert(db:run("INSERT INTO k VALUES(1, 'one')"))
  local n = 3000
  local before = db:stats().prepared
  local t0 = timer.now()
  for _ = 1, n do
    T.eq(db:value("SELECT v FROM k WHERE id = ?", 1), "one")
  end
  local cached = (timer.now() - t0) * 1000 / n
  T.eq(db:stats().prepared - before, 1, "one compile for the same SQL run 3000 times")
  before = db:stats().prepared
  t0 = timer.now()
  for i = 1, n do
    -- Different text each time: every call prepares (and evicts).
    T.eq(db:value("SELECT v FROM k WHERE id = ? AND " .. i .. " = " .. i, 1), "one")
  end
  local uncached = (timer.now() - t0) * 1000 / n
  T.eq(db:stats().prepared - before, n, "a compile for each distinct SQL text")
  -- The times are for the reader (make bench is where speed is judged).
  T.diag(string.format("SELECT by primary key: cached %.2f us, prepared each time %.2f us", cached, uncached))
  T.eq(db:stats().statements, 64, "the cache stays at its size")
end)

T.test("rows, row and value on empty results give {}, nil, nil", function()
  local db = fresh()
  assert(db:exec("CREATE TABLE e(a)"))
  T.eq(db:rows("SELECT a FROM e"), {})
  T.eq(db:row("SELECT a FROM e"), nil)
  T.eq(db:value("SELECT a FROM e"), nil)
  T.eq(db:value("SELECT NULL"), nil)
  T.eq(db:value("SELECT count(*) FROM e"), 0)
  T.eq(db:rows("SELECT 1 AS x UNION ALL SELECT 2 ORDER BY 1"), { { x = 1 }, { x = 2 } })
end)

T.test("run returns changes and last_insert_rowid; changes is 0 for a read-only statement", function()
  local db = fresh()
  assert(db:exec("CREATE TABLE r(id INTEGER PRIMARY KEY, v)"))
  T.eq({ db:run("INSERT INTO r(v) VALUES(1), (2), (3)") }, { 3, 3 })
  T.eq({ db:run("UPDATE r SET v = v + 1 WHERE id >= ?", 2) }, { 2, 3 })
  T.eq(db:changes(), 2)
  T.eq(db:last_insert_rowid(), 3)
  T.eq((db:run("SELECT * FROM r")), 0)
  T.eq((db:run("DELETE FROM r WHERE id = 99")), 0)
end)

T.test("exec runs several statements; a failing one returns nil, err", function()
  local db = fresh()
  T.eq(db:exec("CREATE TABLE x(a UNIQUE); INSERT INTO x VALUES(1); INSERT INTO x VALUES(2);"), true)
  T.eq(db:value("SELECT count(*) FROM x"), 2)
  local ok, err = db:exec("INSERT INTO x VALUES(3); INSERT INTO x VALUES(1); INSERT INTO x VALUES(4)")
  T.eq(ok, nil)
  T.match(err, "^ECONSTRAINT: UNIQUE constraint failed: x%.a$")
  T.eq(db:value("SELECT count(*) FROM x"), 3, "statements before the failing one ran, none after")
  ok, err = db:exec("BEGIN; BEGIN")
  T.eq(ok, nil)
  T.match(err, "^ESQL: cannot start a transaction within a transaction")
  assert(db:exec("ROLLBACK"))
end)

T.test("constraint violations give nil, ECONSTRAINT: unique, not null, foreign key", function()
  local db = fresh()
  assert(db:exec([[
    CREATE TABLE calls(id TEXT PRIMARY KEY, status TEXT NOT NULL);
    CREATE TABLE events(call_id TEXT NOT NULL REFERENCES calls(id), what TEXT);
  ]]))
  assert(db:run("INSERT INTO calls VALUES(?, ?)", "c1", "ringing"))
  local n, err = db:run("INSERT INTO calls VALUES(?, ?)", "c1", "again")
  T.eq(n, nil)
  T.eq(err, "ECONSTRAINT: UNIQUE constraint failed: calls.id")
  n, err = db:run("INSERT INTO calls VALUES(?, ?)", "c2", nil)
  T.eq(n, nil)
  T.eq(err, "ECONSTRAINT: NOT NULL constraint failed: calls.status")
  n, err = db:run("INSERT INTO events VALUES(?, ?)", "nope", "x")
  T.eq(n, nil)
  T.eq(err, "ECONSTRAINT: FOREIGN KEY constraint failed")
  local rows, err2 = db:rows("INSERT INTO calls VALUES('c1', 'x') RETURNING id")
  T.eq(rows, nil)
  T.match(err2, "^ECONSTRAINT")
  T.eq(db:value("SELECT count(*) FROM calls"), 1)
end)

T.test("transaction commits and returns true and fn's results", function()
  local db = fresh()
  assert(db:exec("CREATE TABLE t(v)"))
  local ok, a, b = db:transaction(function(x, y)
    assert(db:run("INSERT INTO t VALUES(?)", x))
    assert(db:run("INSERT INTO t VALUES(?)", y))
    T.eq(db:value("SELECT count(*) FROM t"), 2, "visible inside")
    return "a", "b"
  end, 1, 2)
  T.eq({ ok, a, b }, { true, "a", "b" })
  T.eq(db:value("SELECT sum(v) FROM t"), 3)
  T.eq(db:exec("BEGIN; ROLLBACK"), true, "no transaction left open")
end)

T.test("transaction rolls back when fn raises and raises the same error value", function()
  local db = fresh()
  assert(db:exec("CREATE TABLE t(v)"))
  local boom = { code = "boom" }
  local ok, err = pcall(db.transaction, db, function()
    assert(db:run("INSERT INTO t VALUES(1)"))
    error(boom)
  end)
  T.eq(ok, false)
  T.ok(rawequal(err, boom), "the same error object")
  T.eq(db:value("SELECT count(*) FROM t"), 0, "rolled back")
  local _, msg = pcall(db.transaction, db, function()
    assert(db:run("INSERT INTO t VALUES(2)"))
    error("plain message")
  end)
  T.match(msg, "plain message")
  T.eq(db:value("SELECT count(*) FROM t"), 0)
  T.eq(db:exec("BEGIN; ROLLBACK"), true, "no transaction left open")
end)

T.test("nested transactions are savepoints: an inner error undoes only the inner part", function()
  local db = fresh()
  assert(db:exec("CREATE TABLE t(v)"))
  assert(db:transaction(function()
    assert(db:run("INSERT INTO t VALUES('outer')"))
    local ok = pcall(db.transaction, db, function()
      assert(db:run("INSERT INTO t VALUES('inner-1')"))
      error("inner fails")
    end)
    T.eq(ok, false)
    assert(db:transaction(function()
      assert(db:run("INSERT INTO t VALUES('inner-2')"))
      assert(db:transaction(function()
        assert(db:run("INSERT INTO t VALUES('inner-3')"))
      end))
    end))
  end))
  local got = {}
  for _, r in ipairs(db:rows("SELECT v FROM t ORDER BY rowid")) do
    got[#got + 1] = r.v
  end
  T.eq(got, { "outer", "inner-2", "inner-3" })
  -- An outer failure undoes the released savepoints too.
  pcall(db.transaction, db, function()
    assert(db:transaction(function()
      assert(db:run("INSERT INTO t VALUES('lost')"))
    end))
    error("outer fails")
  end)
  T.eq(db:value("SELECT count(*) FROM t WHERE v = 'lost'"), 0)
end)

T.test("a full database rolls the whole transaction back: later writes in it are refused, none commits on its own",
  function()
    local db = fresh()
    assert(db:exec("CREATE TABLE t(v); CREATE TABLE big(v)"))
    -- Full at a few pages more: a 100 kB value does not fit, small rows do.
    assert(db:value("PRAGMA max_page_count = " .. (db:value("PRAGMA page_count") + 3)))
    local seen = {}
    local ok, err = db:transaction(function()
      assert(db:run("INSERT INTO t VALUES('before')"))
      local n, ferr = db:run("INSERT INTO big VALUES(?)", string.rep("x", 100000))
      seen.full = { n, ferr }
      seen.after = { db:run("INSERT INTO t VALUES('after')") }
      seen.read = { db:value("SELECT count(*) FROM t") }
      seen.exec = { db:exec("INSERT INTO t VALUES('exec')") }
      seen.nested = { db:transaction(function()
        seen.nested_ran = true
        db:run("INSERT INTO t VALUES('nested')")
      end) }
    end)
    T.eq(seen.full[1], nil)
    T.match(seen.full[2], "^ENOSPC")
    T.eq(seen.after[1], nil, "a write after it is refused")
    T.match(seen.after[2], "^ECANCELED: the transaction was rolled back")
    T.match(seen.read[2], "^ECANCELED", "a read too")
    T.match(seen.exec[2], "^ECANCELED", "exec too")
    T.match(seen.nested[2], "^ECANCELED", "and a nested transaction")
    T.eq(seen.nested_ran, nil, "whose fn does not run")
    T.eq(ok, nil)
    T.match(err, "^ECANCELED: the transaction was rolled back by an error inside it")
    T.eq(db:value("SELECT count(*) FROM t"), 0, "none of it written: not 'after', 'exec' or 'nested' on their own")
    T.eq(db:run("INSERT INTO t VALUES('next')"), 1, "the db works after it")
    T.eq(db:transaction(function()
      assert(db:run("INSERT INTO t VALUES('next tx')"))
    end), true, "and so does the next transaction")
  end)

-- (A plain yield: timer.sleep would leave its timer armed to resume this task later.)
T.test("a yield inside a transaction raises and rolls back", function()
  local db = fresh()
  assert(db:exec("CREATE TABLE t(v)"))
  local ok, err = pcall(db.transaction, db, function()
    assert(db:run("INSERT INTO t VALUES(1)"))
    coroutine.yield()
  end)
  T.eq(ok, false)
  T.match(err, "yield across")
  T.eq(db:value("SELECT count(*) FROM t"), 0)
end)

T.test("another connection's write lock gives EBUSY after busy_timeout, for run and transaction", function()
  local db, path = fresh()
  assert(db:exec("CREATE TABLE t(v)"))
  local other = assert(sqlite.open(path, { busy_timeout = 0 }))
  T.defer(function()
    other:close()
  end)
  assert(db:exec("BEGIN IMMEDIATE; INSERT INTO t VALUES(1)"))
  local n, err = other:run("INSERT INTO t VALUES(2)")
  T.eq(n, nil)
  T.match(err, "^EBUSY: database is locked")
  local ok, err2 = other:transaction(function()
    error("must not run")
  end)
  T.eq(ok, nil)
  T.match(err2, "^EBUSY")
  T.eq(other:value("SELECT count(*) FROM t"), 0, "readers see the last commit")
  assert(db:exec("COMMIT"))
  T.eq(other:value("SELECT count(*) FROM t"), 1)
end)

T.test("a file of garbage fails at open with ECORRUPT naming the path", function()
  local dir = T.tmpdir()
  local path = dir .. "/garbage.db"
  write_file(path, string.rep("this is not sqlite ", 500))
  local db, err = sqlite.open(path)
  T.eq(db, nil)
  T.eq(err, "ECORRUPT: " .. path .. ": file is not a database")
  db, err = sqlite.open(path, { readonly = true })
  T.eq(db, nil)
  T.match(err, "^ECORRUPT: ")
end)

T.test("integrity_check finds damaged pages: nil, ECORRUPT", function()
  local db, path = fresh()
  assert(db:exec("CREATE TABLE big(id INTEGER PRIMARY KEY, v TEXT)"))
  assert(db:transaction(function()
    for i = 1, 2000 do
      assert(db:run("INSERT INTO big(v) VALUES(?)", string.rep("x", 100) .. i))
    end
  end))
  T.eq(db:integrity_check(), true)
  db:close() -- checkpoints: everything is in the main file now
  T.eq(file_size(path .. "-wal"), nil, "WAL removed at close")
  local f = assert(io.open(path, "r+b"))
  f:seek("set", 4096 * 3)
  f:write(string.rep("\x55", 4096 * 3))
  f:close()
  local db2 = assert(sqlite.open(path))
  T.defer(function()
    db2:close()
  end)
  local ok, err = db2:integrity_check()
  T.eq(ok, nil)
  T.match(err, "^ECORRUPT: " .. path:gsub("%p", "%%%0") .. ": ")
  T.diag("integrity_check said: " .. err)
end)

T.test("open fails with ENOENT for a missing folder or a missing file with create = false", function()
  local dir = T.tmpdir()
  local db, err = sqlite.open(dir .. "/no/such/folder/x.db")
  T.eq(db, nil)
  T.match(err, "^ENOENT: " .. dir:gsub("%p", "%%%0") .. "/no/such/folder/x%.db: ")
  db, err = sqlite.open(dir .. "/missing.db", { create = false })
  T.eq(db, nil)
  T.match(err, "^ENOENT: .*missing%.db")
  T.eq(core.stat(dir .. "/missing.db"), nil, "not created")
  db, err = sqlite.open(dir .. "/missing.db", { readonly = true })
  T.eq(db, nil)
  T.match(err, "^ENOENT: ")
end)

T.test("a path that is a folder fails with EISDIR", function()
  local dir = T.tmpdir()
  local db, err = sqlite.open(dir)
  T.eq(db, nil)
  T.match(err, "^EISDIR: " .. dir:gsub("%p", "%%%0") .. ": ")
end)

T.test("readonly = true reads, and refuses writes with EROFS", function()
  local db, path = fresh()
  assert(db:exec("CREATE TABLE t(v); INSERT INTO t VALUES(1)"))
  local ro = assert(sqlite.open(path, { readonly = true }))
  T.defer(function()
    ro:close()
  end)
  T.eq(ro:value("SELECT v FROM t"), 1)
  local n, err = ro:run("INSERT INTO t VALUES(2)")
  T.eq(n, nil)
  T.match(err, "^EROFS: attempt to write a readonly database")
  local ok, err2 = ro:exec("CREATE TABLE u(v)")
  T.eq(ok, nil)
  T.match(err2, "^EROFS")
end)

-- As root, permissions are not checked: the cases run in a child callagent
-- as uid/gid 65534 (setpriv). Without root, they run in this process.
T.test("an unwritable folder or file fails at open with EACCES (as an unprivileged user)", function()
  local dir = T.tmpdir()
  os.execute("chmod 0755 '" .. dir .. "'")
  local locked = dir .. "/locked"
  local open_dir = dir .. "/open"
  assert(core.mkdir(locked, 493))
  assert(core.mkdir(open_dir, 511))
  os.execute("chmod 0777 '" .. open_dir .. "'")
  -- A database made writable-by-all inside the read-only folder, and a read-only file.
  local db = assert(sqlite.open(locked .. "/inside.db"))
  assert(db:exec("CREATE TABLE t(v)"))
  db:close()
  db = assert(sqlite.open(open_dir .. "/ro.db"))
  assert(db:exec("CREATE TABLE t(v)"))
  db:close()
  os.execute("chmod 0666 '" .. locked .. "/inside.db'; chmod 0555 '" .. locked .. "'; chmod 0444 '" .. open_dir .. "/ro.db'")
  local src = string.format([[
    local sqlite = require "callagent.sqlite"
    for _, p in ipairs({ %q, %q, %q }) do
      local db, err = sqlite.open(p)
      print(db and "opened" or err)
      if db then db:close() end
    end
    local db, err = sqlite.open(%q, { readonly = true })
    print(db and db:value("SELECT count(*) FROM t") or err)
  ]], locked .. "/new.db", locked .. "/inside.db", open_dir .. "/ro.db", open_dir .. "/ro.db")
  local out = {}
  local id = io.popen("id -u"):read("l")
  if id == "0" then
    local p = spawn_child(dir, src, { "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups" })
    for line in p:lines() do
      out[#out + 1] = line
    end
    T.eq(p:wait(10000), 0, "child exit")
  else
    local real_print = print
    print = function(s) -- luacheck: ignore
      out[#out + 1] = s
    end
    local ok, err = pcall(load(src))
    print = real_print -- luacheck: ignore
    assert(ok, err)
  end
  T.eq(#out, 4, "four results: " .. table.concat(out, " | "))
  T.match(out[1], "^EACCES: .*/locked/new%.db: ", "new file in a read-only folder")
  T.match(out[2], "^EACCES: .*/locked/inside%.db: ", "writable file in a read-only folder (no -wal/-shm)")
  T.match(out[3], "^EACCES: .*/open/ro%.db: ", "read-only file")
  T.eq(out[4], "0", "the read-only file still opens with readonly = true")
  T.diag("as uid " .. (id == "0" and "65534" or id) .. ": " .. table.concat(out, " | "))
end)

T.test("committed data is there after close and reopen", function()
  local db, path = fresh()
  assert(db:exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"))
  assert(db:transaction(function()
    for i = 1, 50 do
      assert(db:run("INSERT INTO t(v) VALUES(?)", "row " .. i))
    end
  end))
  assert(db:run("INSERT INTO t(v) VALUES('last')"))
  db:close()
  local again = assert(sqlite.open(path, { create = false }))
  T.defer(function()
    again:close()
  end)
  T.eq(again:value("SELECT count(*) FROM t"), 51)
  T.eq(again:value("SELECT v FROM t WHERE id = 51"), "last")
end)

T.test("kill -9 after 100 commits loses none of them (WAL recovery)", function()
  local dir = T.tmpdir()
  local path = dir .. "/crash.db"
  local p = spawn_child(dir, string.format([[
    local sqlite = require "callagent.sqlite"
    local db = assert(sqlite.open(%q, { autocheckpoint = 0 }))
    assert(db:exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"))
    for i = 1, 100 do
      assert(db:run("INSERT INTO t(v) VALUES(?)", "committed " .. i))
    end
    io.stdout:write("done\n")
    io.stdout:flush()
    require("callagent.timer").after(60000, function() end)
  ]], path))
  T.eq(p:read_line(10000), "done")
  T.gt(file_size(path .. "-wal") or 0, 0, "the rows are in the WAL only")
  assert(p:kill("SIGKILL"))
  local code, sig = p:wait(5000)
  T.eq({ code, sig }, { nil, "SIGKILL" })
  local db = assert(sqlite.open(path))
  T.defer(function()
    db:close()
  end)
  T.eq(db:value("SELECT count(*) FROM t"), 100)
  T.eq(db:value("SELECT v FROM t WHERE id = 100"), "committed 100")
  T.eq(db:integrity_check(), true)
end)

T.test("close is idempotent; a closed db and its statements raise; path still answers", function()
  local db, path = fresh()
  local stmt = db:prepare("SELECT 1")
  T.eq(db:close(), nil)
  db:close()
  T.raises(function()
    db:value("SELECT 1")
  end, "the database is closed")
  T.raises(function()
    db:exec("SELECT 1")
  end, "the database is closed")
  T.raises(function()
    db:transaction(function() end)
  end, "the database is closed")
  T.raises(function()
    stmt:value()
  end, "the database is closed")
  T.eq(db:path(), path)
  do
    local scoped <close> = assert(sqlite.open(path))
    T.eq(scoped:value("SELECT 2"), 2)
  end
end)

T.test("closing inside a transaction raises and leaves nothing open", function()
  local db = fresh()
  T.raises(function()
    db:transaction(function()
      db:close()
    end)
  end, "closed inside its transaction")
end)

T.test("__gc closes a forgotten db and releases its locks", function()
  local _, path = fresh()
  do
    local lost = assert(sqlite.open(path))
    assert(lost:exec("CREATE TABLE t(v); BEGIN IMMEDIATE; INSERT INTO t VALUES(1)"))
    lost:prepare("SELECT v FROM t")
  end
  local other = assert(sqlite.open(path, { busy_timeout = 0 }))
  T.defer(function()
    other:close()
  end)
  local n, err = other:run("INSERT INTO t VALUES(2)")
  T.eq(n, nil, "locked while the forgotten db lives")
  T.match(err, "^EBUSY")
  collectgarbage()
  collectgarbage()
  assert(other:run("INSERT INTO t VALUES(2)"))
  T.eq(other:value("SELECT count(*) FROM t"), 1, "its open transaction was rolled back")
end)

T.test("lock: a second locking open fails with EBUSY naming the pid, until the first closes", function()
  local dir = T.tmpdir()
  local path = dir .. "/locked.db"
  local first = assert(sqlite.open(path, { lock = true }))
  local f = assert(io.open(path .. ".lock", "rb"))
  T.eq(f:read("a"), core.pid() .. "\n", "the lock file names its holder")
  f:close()
  local db, err = sqlite.open(path, { lock = true })
  T.eq(db, nil, "a second open in this process: flock belongs to the open file")
  T.eq(err, "EBUSY: " .. path .. ": in use by another process (pid " .. core.pid() .. ")")
  first:close()
  local again = assert(sqlite.open(path, { lock = true }), "close released the lock")
  -- __gc releases it too.
  again = nil -- luacheck: ignore
  collectgarbage()
  collectgarbage()
  -- A failed locking open (here: not a database) releases the lock at once.
  local bad = dir .. "/bad.db"
  write_file(bad, string.rep("not a database. ", 300))
  db, err = sqlite.open(bad, { lock = true })
  T.eq(db, nil)
  T.match(err, "^ECORRUPT: ")
  os.remove(bad)
  db, err = sqlite.open(bad, { lock = true })
  T.ok(db, "the failed open left no lock behind: " .. tostring(err))
  db:close()
  db = assert(sqlite.open(path, { lock = true }), "the __gc released the lock")
  db:close()
end)

T.test("lock: another process's lock refuses the open with its pid; its death (kill -9) frees it", function()
  local dir = T.tmpdir()
  local path = dir .. "/shared.db"
  local p = spawn_child(dir, string.format([[
    local sqlite = require "callagent.sqlite"
    KEEP = assert(sqlite.open(%q, { lock = true }))
    io.stdout:write("locked\n")
    io.stdout:flush()
    require("callagent.timer").after(60000, function() end)
  ]], path))
  T.defer(function()
    if p:running() then
      p:kill("SIGKILL")
    end
  end)
  T.eq(p:read_line(10000), "locked")
  local db, err = sqlite.open(path, { lock = true })
  T.eq(db, nil)
  T.eq(err, "EBUSY: " .. path .. ": in use by another process (pid " .. p.pid .. ")")
  -- An unreadable pid is left out of the message.
  write_file(path .. ".lock", "")
  db, err = sqlite.open(path, { lock = true })
  T.eq(err, "EBUSY: " .. path .. ": in use by another process")
  assert(p:kill("SIGKILL"))
  p:wait(5000)
  db = assert(sqlite.open(path, { lock = true }), "the kernel released the dead holder's lock")
  db:close()
end)

T.test("lock: a readonly open neither takes the lock nor is stopped by it; an open without lock ignores it", function()
  local path = T.tmpdir() .. "/ro.db"
  local writer = assert(sqlite.open(path, { lock = true }))
  assert(writer:exec("CREATE TABLE t(v); INSERT INTO t VALUES(1)"))
  T.match(select(2, sqlite.open(path, { lock = true })), "^EBUSY: ", "the writer holds the lock")
  local reader = assert(sqlite.open(path, { readonly = true, lock = true }))
  T.eq(reader:value("SELECT count(*) FROM t"), 1)
  local plain = assert(sqlite.open(path))
  T.eq(plain:value("SELECT count(*) FROM t"), 1)
  plain:close()
  writer:close()
  -- The reader holds no lock: a locking writer opens beside it.
  local second = assert(sqlite.open(path, { lock = true }))
  T.eq(reader:value("SELECT count(*) FROM t"), 1)
  second:close()
  reader:close()
end)

T.test("checkpoint TRUNCATE empties the WAL that autocheckpoint = 0 lets grow", function()
  local db, path = fresh({ autocheckpoint = 0 })
  assert(db:exec("CREATE TABLE t(v TEXT)"))
  for i = 1, 300 do
    assert(db:run("INSERT INTO t VALUES(?)", string.rep("w", 1000) .. i))
  end
  local wal = file_size(path .. "-wal")
  T.gt(wal, 300 * 4096, "WAL bytes with no checkpoint")
  local frames, done = db:checkpoint("PASSIVE")
  T.ge(frames, 300)
  T.eq(done, frames)
  T.eq(file_size(path .. "-wal"), wal, "PASSIVE leaves the file")
  T.eq({ db:checkpoint("TRUNCATE") }, { 0, 0 })
  T.eq(file_size(path .. "-wal"), 0)
  T.eq(db:value("SELECT count(*) FROM t"), 300)
  T.raises(function()
    db:checkpoint("SOMETIMES")
  end, "invalid option")
end)

T.test("background checkpoints keep the WAL bounded without the loop doing them", function()
  -- While a background checkpoint runs, the WAL grows by every commit made
  -- meanwhile (no other checkpoint can run), so the bound below assumes one
  -- finishes within about 200 commits. With synchronous=NORMAL each one
  -- fsyncs, and a shared disk's fsync tail (seen once in CI, under the
  -- sanitizers with other tests writing) let the WAL reach 5 MB: that is
  -- the disk. The mechanism is the same without the fsyncs.
  local db, path = fresh({ autocheckpoint = 50, synchronous = "OFF" })
  T.eq(db:stats().background_checkpoint, true)
  assert(db:exec("CREATE TABLE t(v TEXT)"))
  for i = 1, 1500 do
    assert(db:run("INSERT INTO t VALUES(?)", string.rep("b", 200) .. i))
    if i % 10 == 0 then
      timer.sleep(1) -- the loop turns, as it does between call events
    end
  end
  T.wait_for(function()
    return db:stats().checkpoints > 0
  end, 5000, "a background checkpoint")
  local st = db:stats()
  local wal = file_size(path .. "-wal")
  T.diag(string.format("1500 commits, autocheckpoint 50: %d background checkpoints, %d inline, WAL %d KB",
    st.checkpoints, st.inline_checkpoints, wal // 1024))
  T.eq(st.checkpoint_failures, 0)
  T.lt(wal, 8 * 50 * 4200 + 200 * 4200, "WAL bytes stay near the limit")
  T.eq(db:value("SELECT count(*) FROM t"), 1500)
  -- Off: the committing call checkpoints, as SQLite does by default.
  local inline = fresh({ background_checkpoint = false }, "inline.db")
  T.eq(inline:stats().background_checkpoint, false)
end)

T.test("close while a background checkpoint runs: it finishes, then empties and removes the WAL", function()
  local dir = T.tmpdir()
  local path = dir .. "/bg.db"
  local db = assert(sqlite.open(path, { autocheckpoint = 1 }))
  assert(db:exec("CREATE TABLE t(v)"))
  assert(db:run("INSERT INTO t VALUES(42)")) -- queues a checkpoint; the loop has not turned
  db:close()
  T.wait_for(function()
    return file_size(path .. "-wal") == nil
  end, 5000, "the checkpointer to close last and remove the WAL")
  local again = assert(sqlite.open(path))
  T.defer(function()
    again:close()
  end)
  T.eq(again:value("SELECT v FROM t"), 42)
end)

T.test("exiting with a background checkpoint in flight frees it (a child callagent exits 0)", function()
  local dir = T.tmpdir()
  local path = dir .. "/exit.db"
  local p = spawn_child(dir, string.format([[
    local sqlite = require "callagent.sqlite"
    local db = assert(sqlite.open(%q, { autocheckpoint = 1 }))
    assert(db:exec("CREATE TABLE t(v)"))
    for i = 1, 20 do assert(db:run("INSERT INTO t VALUES(?)", i)) end
    KEEP = db -- collected only at exit, with its checkpoint queued:
    -- the loop stops after this callback, before the work is done.
    require("callagent.timer").after(0, function() require("callagent.core").stop(0) end)
  ]], path))
  local code, sig = p:wait(10000)
  T.eq({ code, sig }, { 0 }, "exit status (a leak under SAN=1 exits 99)")
  T.eq(file_size(path .. "-wal"), nil, "the checkpointer finished at exit and closed last")
  local db = assert(sqlite.open(path))
  T.defer(function()
    db:close()
  end)
  T.eq(db:value("SELECT count(*) FROM t"), 20)
end)

-- Performance: reported, not asserted. (a)-(d) in microseconds per
-- operation, (e) the worst single commit, with checkpoints in the loop's
-- commits (inline) and on the thread pool (background, the default).
T.test("performance of commits, batches, updates, selects and checkpoint stalls (diagnostics)", function()
  local function setup(opts, name)
    local db = fresh(opts, name)
    assert(db:exec([[CREATE TABLE calls(id INTEGER PRIMARY KEY, sid TEXT NOT NULL,
      status TEXT NOT NULL, updated REAL, attempts INTEGER, note TEXT)]]))
    return db
  end
  local ins = "INSERT INTO calls(sid, status, updated, attempts, note) VALUES(?, ?, ?, ?, ?)"
  local note = string.rep("n", 64)
  local db = setup({ background_checkpoint = false }, "perf.db")

  local n = 2000
  local t0 = timer.now()
  for i = 1, n do
    db:run(ins, "CA" .. i, "ringing", t0, 0, note)
  end
  local a = (timer.now() - t0) * 1000 / n

  local batches = 20
  t0 = timer.now()
  for b = 1, batches do
    db:transaction(function()
      for i = 1, 100 do
        db:run(ins, "CB" .. b .. "_" .. i, "queued", t0, 0, note)
      end
    end)
  end
  local b_us = (timer.now() - t0) * 1000 / (batches * 100)

  t0 = timer.now()
  for i = 1, n do
    db:run("UPDATE calls SET status = ?, attempts = attempts + 1 WHERE id = ?", "answered", i)
  end
  local c = (timer.now() - t0) * 1000 / n

  local m = 20000
  t0 = timer.now()
  for i = 1, m do
    db:row("SELECT * FROM calls WHERE id = ?", i % n + 1)
  end
  local d = (timer.now() - t0) * 1000 / m
  T.eq(db:value("SELECT count(*) FROM calls WHERE status = 'answered'"), n)

  T.diag(string.format("(a) single-row INSERT, own transaction (WAL, synchronous=NORMAL): %.1f us", a))
  T.diag(string.format("(b) INSERT batched 100 per transaction: %.1f us per row, %.0f us per transaction",
    b_us, b_us * 100))
  T.diag(string.format("(c) UPDATE by primary key (own transaction): %.1f us", c))
  T.diag(string.format("(d) SELECT by primary key (row table): %.2f us", d))

  -- (e) 2000 commits each, the loop turning every 20 commits.
  for _, mode in ipairs({ { false, "inline" }, { true, "background" } }) do
    local e = setup({ background_checkpoint = mode[1] }, mode[2] .. ".db")
    local lat = {}
    for i = 1, n do
      local s = timer.now()
      e:run(ins, "CE" .. i, "ringing", s, 0, note)
      lat[i] = timer.now() - s
      if i % 20 == 0 then
        timer.sleep(1)
      end
    end
    table.sort(lat)
    local over = 0
    for i = 1, n do
      if lat[i] > 2 then
        over = over + 1
      end
    end
    local st = e:stats()
    T.diag(string.format("(e) %s checkpoints: worst commit %.2f ms, p99.9 %.2f ms, p99 %.0f us, median %.0f us,"
      .. " %d commits > 2 ms (%d background, %d inline checkpoints)", mode[2], lat[n],
      lat[math.ceil(n * 0.999)], lat[math.ceil(n * 0.99)] * 1000, lat[n // 2] * 1000, over,
      st.checkpoints, st.inline_checkpoints))
  end

  local big = setup({ autocheckpoint = 0 }, "ckpt.db")
  big:transaction(function()
    for i = 1, 4000 do
      big:run(ins, "CK" .. i, "done", 0, 0, note)
    end
  end)
  local wal_kb = (file_size(big:path() .. "-wal") or 0) // 1024
  t0 = timer.now()
  assert(big:checkpoint("TRUNCATE"))
  T.diag(string.format("    db:checkpoint(\"TRUNCATE\") of a %d KB WAL, on the loop: %.2f ms", wal_kb, timer.now() - t0))
  for i = 1, 50 do
    big:run(ins, "CL" .. i, "done", 0, 0, note)
  end
  t0 = timer.now()
  assert(big:checkpoint("PASSIVE"))
  T.diag(string.format("    db:checkpoint(\"PASSIVE\") after 50 commits, on the loop: %.2f ms", timer.now() - t0))
end)

T.run()
