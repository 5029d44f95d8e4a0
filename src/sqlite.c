/*
 * sqlite.c - callagent.sqlite: SQLite 3 databases for Lua (the durable call
 * store: calls, attempts, events, transcripts, reports, retries).
 *
 *   local sqlite = require "callagent.sqlite"
 *
 *   db, err = sqlite.open(path [, opts])
 *       Opens (by default creates) the database file at path and sets it up:
 *       PRAGMA journal_mode=WAL (checked: it must report "wal"), synchronous,
 *       foreign_keys=ON, the busy timeout and the WAL checkpoints. The first
 *       statement reads the schema, so a file that is not a database fails
 *       here. A writable open refuses a file SQLite could only open read-only
 *       and takes the write lock once without waiting (if another connection
 *       holds it, open goes on), so an unwritable file or folder fails here,
 *       not at the first write.
 *       opts (all optional):
 *         readonly = false       open read-only (no WAL switch, no write check)
 *         create = true          create the file if missing (ignored if readonly),
 *                                mode 0600 whatever the umask: its -wal and -shm
 *                                files get the same. Never through a symbolic
 *                                link: one to an existing file is followed, one
 *                                to a missing file fails (ENOENT)
 *         busy_timeout = 5000    ms to wait for another connection's lock. The
 *                                wait blocks the loop thread; it only happens
 *                                when another connection uses the same file
 *         synchronous = "NORMAL" "OFF", "NORMAL" or "FULL" (PRAGMA synchronous).
 *                                In WAL mode NORMAL commits without fsync:
 *                                a commit survives a crash of callagent (kill -9),
 *                                not a power loss; checkpoints do fsync
 *         autocheckpoint = 1000  WAL pages after which a checkpoint starts; 0:
 *                                none, call db:checkpoint() yourself
 *         background_checkpoint = true
 *                                those checkpoints run on the libuv thread pool
 *                                with a second connection (PASSIVE: never blocks
 *                                the loop's writes), so their fsyncs do not stall
 *                                the loop. Writes that never pause keep a
 *                                checkpoint from reaching the WAL's end, and only
 *                                a fully checkpointed WAL starts over: at 8 x
 *                                autocheckpoint pages the committing call
 *                                checkpoints inline once, to bound the file.
 *                                false: the committing call always checkpoints
 *                                (SQLite's default; a stall of milliseconds)
 *         statements = 64        how many prepared statements the cache keeps
 *         lock = false           a writable open takes an exclusive advisory
 *                                lock for the life of the db: <path>.lock,
 *                                created beside the file (beside the real
 *                                file path's links lead to; mode 0600, kept
 *                                afterwards; not opened through a symbolic
 *                                link), flock()ed without waiting, with
 *                                this process's pid in it. While one db holds
 *                                it, another locking open of the file fails
 *                                with EBUSY, in this process too (flock belongs
 *                                to the open file); close, __gc or the
 *                                process's death releases it. Ignored if
 *                                readonly: a reader takes no lock and is not
 *                                stopped by one, and for ":memory:" and ""
 *                                (no file to share). SQLite's own locks still
 *                                apply, and opens without lock ignore it
 *       Errors, as nil, "ECODE: <path>: message":
 *         ENOENT    the folder, or the file with create = false, does not exist;
 *                   or path is a symbolic link to a missing file: "<path>: a
 *                   symbolic link to <target>, which does not exist (...)"
 *         EACCES    no permission, or a read-only location or file when writing
 *                   is needed (also when SQLite could only open it read-only)
 *         EISDIR    path is a folder
 *         ECORRUPT  "file is not a database" / malformed
 *         EBUSY, ELOCKED   another connection holds a lock past busy_timeout
 *         EBUSY     with lock: "<path>: in use by another process (pid N)",
 *                   the pid of the holder as its lock file says (left out
 *                   when the file does not say)
 *         EIO       an I/O error
 *       Bad options raise.
 *
 *   db:exec(sql)            runs one or more statements without parameters:
 *                           true, or nil, err
 *   stmt = db:prepare(sql)  one statement, compiled once and kept in the
 *                           db's cache (least recently used goes first), so
 *                           the same SQL again returns the same stmt at the
 *                           cost of a table lookup. SQL that does not
 *                           compile (syntax, unknown table or column) raises
 *                           with SQLite's message: that is a programmer
 *                           error. Other failures (EBUSY while reading the
 *                           schema, ECORRUPT, ...) return nil, err
 *   db:run(sql, ...)        prepare (cached) + bind + step to the end:
 *                           changes, last_insert_rowid; or nil, err.
 *                           changes is 0 for a read-only statement
 *   db:rows(sql, ...)       array of row tables {column name = value}
 *                           (empty when no row); or nil, err
 *   db:row(sql, ...)        the first row table, or nil when there is none
 *                           (nil, err on failure)
 *   db:value(sql, ...)      the first column of the first row, or nil when
 *                           there is no row or it is NULL (nil, err on failure)
 *   db:transaction(fn, ...) BEGIN IMMEDIATE; fn(...); COMMIT. Returns true
 *                           followed by fn's results. If fn raises, ROLLBACK
 *                           and the same error value is raised again. If
 *                           BEGIN or COMMIT fails: rolled back, nil, err.
 *                           Inside another transaction (ours or an explicit
 *                           BEGIN) it is a SAVEPOINT instead: an error rolls
 *                           back to it only. fn must not yield (it runs under
 *                           the write lock; a yield raises "attempt to yield
 *                           across a C-call boundary" and rolls back).
 *                           Some errors (SQLITE_FULL, SQLITE_IOERR, ...) make
 *                           SQLite roll the whole transaction back; from then
 *                           until it returns, statements of the db (and a
 *                           nested transaction) return nil, "ECANCELED: ..."
 *                           without running, so none commits on its own, and
 *                           transaction returns nil, "ECANCELED: ..." too
 *   db:checkpoint([mode])   WAL checkpoint, mode "PASSIVE" (default, never
 *                           waits), "FULL", "RESTART" or "TRUNCATE" (these
 *                           may wait up to busy_timeout for readers/writers;
 *                           TRUNCATE also empties the -wal file): returns
 *                           wal_frames, checkpointed_frames; or nil, err
 *   db:integrity_check()    PRAGMA quick_check: true, or nil,
 *                           "ECORRUPT: <path>: <first problems>"
 *   db:stats()              {statements = cached count, prepared = SQL texts
 *                           compiled so far (each cache miss), background_checkpoint
 *                           = bool, checkpoints = background runs done,
 *                           checkpoint_failures = n (each is logged),
 *                           inline_checkpoints = n (the WAL limit was hit)}
 *   db:changes()            rows changed by the last INSERT/UPDATE/DELETE
 *   db:last_insert_rowid()  rowid of the last successful INSERT
 *   db:path()               the path given to open (also once closed)
 *   db:close()              finalizes every statement and closes; idempotent
 *                           (also __close and __gc). Any other method of a
 *                           closed db, or of one of its statements, raises
 *                           "sqlite: the database is closed"
 *
 *   stmt:run(...), stmt:rows(...), stmt:row(...), stmt:value(...)
 *                           as the db methods of the same name
 *   stmt:sql()              the statement's SQL text
 *   A stmt evicted from the cache keeps working while it is referenced.
 *
 *   sqlite.blob(s)          wraps the string s so that it binds as a BLOB
 *   sqlite.version          the SQLite library version, "3.40.1"
 *
 * Parameters: positional ?, ?NNN, :name, @name or $name values come from the
 * arguments after sql, one per parameter; or a single table (not a blob)
 * binds named parameters by name without the prefix ({id = 1} for :id), a
 * name missing from the table binds NULL. Raised as misuse: a wrong number
 * of values, a table key that is no parameter of the statement, a table for
 * a statement with positional parameters, a value of another type.
 *   Lua -> SQLite: nil -> NULL, boolean -> INTEGER 0/1, integer -> INTEGER,
 *   float -> REAL, string -> TEXT (its exact bytes, embedded NULs and
 *   invalid UTF-8 included), sqlite.blob(s) -> BLOB.
 *   SQLite -> Lua: INTEGER -> integer, REAL -> float, TEXT and BLOB ->
 *   string, NULL -> nil: a NULL column is absent from a row table.
 *
 * Error codes of failures (nil, "ECODE: message" with sqlite3_errmsg):
 * SQLITE_CONSTRAINT ECONSTRAINT, SQLITE_FULL ENOSPC, SQLITE_READONLY EROFS,
 * SQLITE_CANTOPEN ENOENT/EACCES/EISDIR (by errno), SQLITE_NOTADB and
 * SQLITE_CORRUPT ECORRUPT, SQLITE_BUSY EBUSY, SQLITE_LOCKED ELOCKED,
 * SQLITE_IOERR EIO (ENOSPC/EACCES/EROFS when errno says so), SQLITE_NOMEM
 * ENOMEM, SQLITE_TOOBIG E2BIG, SQLITE_MISMATCH EMISMATCH, SQLITE_INTERRUPT
 * EINTR, SQLITE_ABORT ECANCELED, SQLITE_PERM/AUTH EACCES, SQLITE_ERROR while
 * running (e.g. BEGIN inside a transaction) ESQL, others ESQLITE.
 *
 * Every call is synchronous on the loop thread. In WAL mode with
 * synchronous=NORMAL a commit is a write() without fsync (about 20-40 us
 * here); a checkpoint fsyncs (4-20 ms here, with rare much longer tails),
 * hence the background checkpoints. One fsync stays on the writer: SQLite
 * syncs the WAL header when a checkpointed WAL starts over (once per WAL
 * cycle, usually under 2 ms). tests/test_sqlite.lua prints the numbers.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sqlite3.h>

#include "ca.h"

#define DB_MT "callagent.SqliteDb"
#define STMT_MT "callagent.SqliteStmt"
#define BLOB_MT "callagent.SqliteBlob"

#define DEFAULT_STATEMENTS 64
#define TX_SAVEPOINT "callagent_tx"
#define WAL_LIMIT_FACTOR 8	/* WAL pages, in autocheckpoints, before an inline checkpoint */

struct ca_db;

/*
 * One prepared statement, inside its Stmt userdata (user value 1: the Db
 * userdata, which keeps the db alive). The sqlite3_stmt is finalized by the
 * Stmt's __gc or by db:close, whichever comes first; st is NULL after that.
 */
struct ca_stmt {
	sqlite3_stmt *st;
	struct ca_db *db;
	struct ca_stmt *prev, *next;		/* db->all: every live statement */
	struct ca_stmt *lru_prev, *lru_next;	/* db->lru: the cached ones, newest first */
	int cached;
};

/* The fixed statements of transaction(), prepared on first use. */
enum { TX_BEGIN, TX_COMMIT, TX_ROLLBACK, TX_SAVE, TX_RELEASE, TX_ROLLBACK_TO, TX_N };

static const char *const tx_sql[TX_N] = {
	"BEGIN IMMEDIATE", "COMMIT", "ROLLBACK", "SAVEPOINT " TX_SAVEPOINT,
	"RELEASE " TX_SAVEPOINT, "ROLLBACK TO " TX_SAVEPOINT,
};

/*
 * One connection, inside its Db userdata (user value 1: the statement cache
 * table, sql -> Stmt and lightuserdata(ca_stmt) -> sql; user value 2: the
 * path). Lives until close/__gc; h is NULL once closed.
 */
struct ca_db {
	sqlite3 *h;
	struct ca_stmt *all;
	struct ca_stmt *lru_head, *lru_tail;
	int ncached, max_cached;
	lua_Integer prepared;		/* statements compiled for the cache, ever */
	sqlite3_stmt *tx[TX_N];
	int autockpt;			/* WAL pages that start a background checkpoint */
	struct bg_ckpt *bg;		/* NULL unless background checkpoints are on */
	int lock;			/* fd of <path>.lock, flock()ed while open; -1: none */
	int tx_depth;		/* transaction() calls under way (nested ones included) */
};

/*
 * The background checkpointer of a db: a second connection to the same file
 * that runs PASSIVE checkpoints on the libuv thread pool. Allocated at open,
 * owned by the db until it closes; a checkpoint still running then owns it
 * and its after-work callback closes h and frees it. h is opened and used
 * only on the pool thread, and closed on the loop thread only while no work
 * is queued (libuv orders the two).
 */
struct bg_ckpt {
	uv_work_t req;
	sqlite3 *h;
	char *path;
	int busy;		/* work queued or running */
	int orphan;		/* the db closed while busy */
	int rc;			/* result of the last run, with its message */
	char err[200];
	char sync_sql[80];
	lua_Integer runs, failures, inline_runs;
};

/* ---- errors ---- */

static const char *errno_code(int e, const char *def)
{
	switch (e) {
	case ENOENT:
	case ENOTDIR:
		return "ENOENT";
	case EACCES:
	case EPERM:
		return "EACCES";
	case EROFS:
		return "EROFS";
	case EISDIR:
		return "EISDIR";
	case ENOSPC:
	case EDQUOT:
		return "ENOSPC";
	default:
		return def;
	}
}

/* The ECODE word for a (possibly extended) result code of connection h. */
static const char *rc_code(sqlite3 *h, int rc)
{
	switch (rc & 0xff) {
	case SQLITE_CONSTRAINT:
		return "ECONSTRAINT";
	case SQLITE_FULL:
		return "ENOSPC";
	case SQLITE_READONLY:
		return "EROFS";
	case SQLITE_CANTOPEN:
		return errno_code(h ? sqlite3_system_errno(h) : 0, "ENOENT");
	case SQLITE_NOTADB:
	case SQLITE_CORRUPT:
		return "ECORRUPT";
	case SQLITE_BUSY:
		return "EBUSY";
	case SQLITE_LOCKED:
		return "ELOCKED";
	case SQLITE_IOERR:
		if (rc == SQLITE_IOERR_NOMEM)
			return "ENOMEM";
		return errno_code(h ? sqlite3_system_errno(h) : 0, "EIO");
	case SQLITE_NOMEM:
		return "ENOMEM";
	case SQLITE_TOOBIG:
		return "E2BIG";
	case SQLITE_MISMATCH:
		return "EMISMATCH";
	case SQLITE_INTERRUPT:
		return "EINTR";
	case SQLITE_ABORT:
		return "ECANCELED";
	case SQLITE_PERM:
	case SQLITE_AUTH:
		return "EACCES";
	case SQLITE_PROTOCOL:
		return "EPROTO";
	case SQLITE_NOLFS:
		return "EFBIG";
	case SQLITE_ERROR:
		return "ESQL";
	default:
		return "ESQLITE";
	}
}

/* Pushes nil, "ECODE: message" for a failure of h; returns 2. */
static int push_err(lua_State *L, sqlite3 *h, int rc)
{
	return ca_fail(L, rc_code(h, rc), "%s", h ? sqlite3_errmsg(h) : sqlite3_errstr(rc));
}

/* ---- statements ---- */

static struct ca_db *check_db(lua_State *L)
{
	struct ca_db *db = luaL_checkudata(L, 1, DB_MT);

	if (db->h == NULL)
		luaL_error(L, "sqlite: the database is closed");
	return db;
}

static struct ca_stmt *check_stmt(lua_State *L)
{
	struct ca_stmt *e = luaL_checkudata(L, 1, STMT_MT);

	if (e->st == NULL)
		luaL_error(L, "sqlite: the database is closed");
	return e;
}

static void lru_unlink(struct ca_db *db, struct ca_stmt *e)
{
	if (!e->cached)
		return;
	if (e->lru_prev)
		e->lru_prev->lru_next = e->lru_next;
	else
		db->lru_head = e->lru_next;
	if (e->lru_next)
		e->lru_next->lru_prev = e->lru_prev;
	else
		db->lru_tail = e->lru_prev;
	e->lru_prev = e->lru_next = NULL;
	e->cached = 0;
	db->ncached--;
}

static void lru_push_front(struct ca_db *db, struct ca_stmt *e)
{
	e->lru_prev = NULL;
	e->lru_next = db->lru_head;
	if (db->lru_head)
		db->lru_head->lru_prev = e;
	else
		db->lru_tail = e;
	db->lru_head = e;
	e->cached = 1;
	db->ncached++;
}

/* Finalizes e's statement and takes it off the db's lists. */
static void stmt_release(struct ca_stmt *e)
{
	struct ca_db *db = e->db;

	if (e->st == NULL)
		return;
	sqlite3_finalize(e->st);
	e->st = NULL;
	lru_unlink(db, e);
	if (e->prev)
		e->prev->next = e->next;
	else
		db->all = e->next;
	if (e->next)
		e->next->prev = e->prev;
	e->prev = e->next = NULL;
}

static int stmt_gc(lua_State *L)
{
	stmt_release(luaL_checkudata(L, 1, STMT_MT));
	return 0;
}

/* Drops the least recently used statement from the cache table at idx. */
static void evict_one(lua_State *L, struct ca_db *db, int cache)
{
	struct ca_stmt *old = db->lru_tail;

	lru_unlink(db, old);
	if (lua_rawgetp(L, cache, old) == LUA_TSTRING) {
		lua_pushnil(L);
		lua_rawset(L, cache);	/* cache[sql] = nil */
	} else {
		lua_pop(L, 1);
	}
	lua_pushnil(L);
	lua_rawsetp(L, cache, old);
}

static int only_space(const char *s)
{
	while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r' || *s == ';')
		s++;
	return *s == '\0';
}

/*
 * The cached statement for the SQL string at sqlidx of the Db at stack index
 * 1. Leaves its Stmt userdata on the stack and returns it; or leaves nil, err
 * and returns NULL. SQL errors raise.
 */
static struct ca_stmt *get_stmt(lua_State *L, struct ca_db *db, int sqlidx)
{
	size_t len;
	const char *sql = luaL_checklstring(L, sqlidx, &len);
	const char *tail;
	sqlite3_stmt *st;
	struct ca_stmt *e;
	int rc, cache;

	lua_getiuservalue(L, 1, 1);
	cache = lua_gettop(L);
	lua_pushvalue(L, sqlidx);
	if (lua_rawget(L, cache) == LUA_TUSERDATA) {
		e = lua_touserdata(L, -1);
		if (db->lru_head != e) {
			lru_unlink(db, e);
			lru_push_front(db, e);
		}
		lua_remove(L, cache);
		return e;
	}
	lua_pop(L, 1);

	luaL_argcheck(L, len < INT32_MAX, sqlidx, "SQL text too long");
	/* The userdata exists, not yet prepared or linked, before the statement does. */
	e = lua_newuserdatauv(L, sizeof *e, 1);
	memset(e, 0, sizeof *e);
	e->db = db;
	luaL_setmetatable(L, STMT_MT);
	lua_pushvalue(L, 1);
	lua_setiuservalue(L, -2, 1);

	/* The length includes the terminating NUL: SQLite need not copy the text. */
	rc = sqlite3_prepare_v3(db->h, sql, (int)len + 1, SQLITE_PREPARE_PERSISTENT, &st, &tail);
	db->prepared++;
	if (rc != SQLITE_OK) {
		if ((rc & 0xff) == SQLITE_ERROR)
			luaL_error(L, "sqlite: %s in: %s", sqlite3_errmsg(db->h), sql);
		lua_pop(L, 2);
		push_err(L, db->h, rc);
		return NULL;
	}
	if (st == NULL)
		luaL_error(L, "sqlite: no SQL statement in: '%s'", sql);
	if (!only_space(tail)) {
		sqlite3_stmt *more = NULL;

		rc = sqlite3_prepare_v2(db->h, tail, -1, &more, NULL);
		sqlite3_finalize(more);
		if (rc != SQLITE_OK || more != NULL) {
			sqlite3_finalize(st);
			luaL_error(L, "sqlite: prepare takes one statement (db:exec runs several): %s", sql);
		}
	}

	while (db->ncached >= db->max_cached && db->lru_tail)
		evict_one(L, db, cache);
	e->st = st;
	e->next = db->all;
	if (db->all)
		db->all->prev = e;
	db->all = e;
	lru_push_front(db, e);

	lua_pushvalue(L, sqlidx);
	lua_pushvalue(L, -2);
	lua_rawset(L, cache);		/* cache[sql] = stmt */
	lua_pushvalue(L, sqlidx);
	lua_rawsetp(L, cache, e);	/* cache[e] = sql */
	lua_remove(L, cache);
	return e;
}

/* ---- binding ---- */

/* Leaves st clean and raises the message on top of the stack: misuse found while binding. */
static int raise_clean(lua_State *L, sqlite3_stmt *st)
{
	sqlite3_reset(st);
	sqlite3_clear_bindings(st);
	luaL_where(L, 1);
	lua_insert(L, -2);
	lua_concat(L, 2);
	return lua_error(L);
}

/*
 * Binds the value at idx to parameter i. Strings bind SQLITE_STATIC: they
 * are held by the Lua stack or the parameter table for the whole call, and
 * the bindings are cleared before the call returns.
 */
static void bind_one(lua_State *L, sqlite3_stmt *st, int i, int idx)
{
	int rc = SQLITE_OK;
	size_t len;
	const char *s;

	switch (lua_type(L, idx)) {
	case LUA_TNIL:
		rc = sqlite3_bind_null(st, i);
		break;
	case LUA_TBOOLEAN:
		rc = sqlite3_bind_int(st, i, lua_toboolean(L, idx));
		break;
	case LUA_TNUMBER:
		if (lua_isinteger(L, idx))
			rc = sqlite3_bind_int64(st, i, (sqlite3_int64)lua_tointeger(L, idx));
		else
			rc = sqlite3_bind_double(st, i, (double)lua_tonumber(L, idx));
		break;
	case LUA_TSTRING:
		s = lua_tolstring(L, idx, &len);
		rc = sqlite3_bind_text64(st, i, s, len, SQLITE_STATIC, SQLITE_UTF8);
		break;
	case LUA_TUSERDATA:
		if (luaL_testudata(L, idx, BLOB_MT)) {
			lua_getiuservalue(L, idx, 1);
			s = lua_tolstring(L, -1, &len);
			lua_pop(L, 1);	/* the blob userdata keeps the string */
			rc = sqlite3_bind_blob64(st, i, s, len, SQLITE_STATIC);
			break;
		}
		/* fall through */
	default:
		lua_pushfstring(L, "sqlite: cannot bind a %s value (parameter %d)",
				luaL_typename(L, idx), i);
		raise_clean(L, st);
	}
	if (rc != SQLITE_OK) {
		lua_pushfstring(L, "sqlite: cannot bind parameter %d: %s", i, sqlite3_errstr(rc));
		raise_clean(L, st);
	}
}

/* Whether the statement has a parameter called name (without its prefix). */
static int has_param(sqlite3_stmt *st, const char *name)
{
	static const char prefixes[] = ":@$";
	char buf[256];
	size_t n = strlen(name);

	if (n + 2 > sizeof buf)
		return 0;
	memcpy(buf + 1, name, n + 1);
	for (const char *p = prefixes; *p; p++) {
		buf[0] = *p;
		if (sqlite3_bind_parameter_index(st, buf) > 0)
			return 1;
	}
	return 0;
}

static void bind_named(lua_State *L, sqlite3_stmt *st, int t)
{
	int n = sqlite3_bind_parameter_count(st), found = 0, keys = 0;

	for (int i = 1; i <= n; i++) {
		const char *name = sqlite3_bind_parameter_name(st, i);

		if (name == NULL || name[0] == '?') {
			lua_pushfstring(L, "sqlite: parameter %d is positional: pass values, not a table", i);
			raise_clean(L, st);
		}
		lua_pushstring(L, name + 1);
		if (lua_rawget(L, t) != LUA_TNIL)
			found++;
		bind_one(L, st, i, -1);
		lua_pop(L, 1);	/* the table keeps the value */
	}
	lua_pushnil(L);
	while (lua_next(L, t)) {
		keys++;
		lua_pop(L, 1);
	}
	if (keys == found)
		return;
	lua_pushnil(L);
	while (lua_next(L, t)) {
		lua_pop(L, 1);
		if (lua_type(L, -1) != LUA_TSTRING) {
			lua_pushfstring(L, "sqlite: named parameter keys must be strings, not %s",
					luaL_typename(L, -1));
			raise_clean(L, st);
		}
		if (!has_param(st, lua_tostring(L, -1))) {
			lua_pushfstring(L, "sqlite: unknown named parameter '%s'", lua_tostring(L, -1));
			raise_clean(L, st);
		}
	}
}

/* Binds the arguments first..top (a value per parameter, or one table). */
static void bind_args(lua_State *L, sqlite3_stmt *st, int first, int top)
{
	int nargs = top - first + 1;
	int n = sqlite3_bind_parameter_count(st);

	/* A no-op unless an error (out of memory) left st part-way through its rows. */
	sqlite3_reset(st);
	if (nargs == 1 && lua_type(L, first) == LUA_TTABLE) {
		bind_named(L, st, first);
		return;
	}
	if (nargs != n) {
		lua_pushfstring(L, "sqlite: the statement takes %d parameter%s, got %d value%s",
				n, n == 1 ? "" : "s", nargs, nargs == 1 ? "" : "s");
		raise_clean(L, st);
	}
	for (int i = 1; i <= n; i++)
		bind_one(L, st, i, first + i - 1);
}

/* ---- stepping ---- */

static void push_column(lua_State *L, sqlite3_stmt *st, int i)
{
	switch (sqlite3_column_type(st, i)) {
	case SQLITE_INTEGER:
		lua_pushinteger(L, (lua_Integer)sqlite3_column_int64(st, i));
		break;
	case SQLITE_FLOAT:
		lua_pushnumber(L, (lua_Number)sqlite3_column_double(st, i));
		break;
	case SQLITE_TEXT: {
		const char *s = (const char *)sqlite3_column_text(st, i);

		lua_pushlstring(L, s, (size_t)sqlite3_column_bytes(st, i));
		break;
	}
	case SQLITE_BLOB: {
		const void *p = sqlite3_column_blob(st, i);

		lua_pushlstring(L, p, (size_t)sqlite3_column_bytes(st, i));
		break;
	}
	default:
		lua_pushnil(L);
	}
}

/* Pushes the current row as a table; the column names are at names+0.. */
static void push_row(lua_State *L, sqlite3_stmt *st, int ncols, int names)
{
	lua_createtable(L, 0, ncols);
	for (int i = 0; i < ncols; i++) {
		if (sqlite3_column_type(st, i) == SQLITE_NULL)
			continue;
		lua_pushvalue(L, names + i);
		push_column(L, st, i);
		lua_rawset(L, -3);
	}
}

/*
 * Whether a transaction() under way has lost its transaction: on some errors
 * (SQLITE_FULL, SQLITE_IOERR, SQLITE_NOMEM) SQLite rolls the whole of it
 * back, and a statement run after that would commit on its own, outside it:
 * part of an all-or-none write kept. If so, pushes nil, "ECANCELED: ..." and
 * returns 1; the statement is not run.
 */
static int tx_lost(lua_State *L, struct ca_db *db)
{
	if (db->tx_depth == 0 || !sqlite3_get_autocommit(db->h))
		return 0;
	ca_fail(L, "ECANCELED", "the transaction was rolled back by an earlier error: none of it is written");
	return 1;
}

/* Resets st after a use and lets go of the bound strings. */
static void done(sqlite3_stmt *st)
{
	sqlite3_reset(st);
	sqlite3_clear_bindings(st);
}

/* Leaves st clean and pushes nil, err for step result rc (misuse raises). */
static int step_fail(lua_State *L, struct ca_stmt *e, int rc)
{
	sqlite3 *h = e->db->h;

	if (rc == SQLITE_MISUSE || rc == SQLITE_RANGE) {
		done(e->st);
		return luaL_error(L, "sqlite: %s", sqlite3_errmsg(h));
	}
	push_err(L, h, rc);
	done(e->st);
	return 2;
}

static int do_run(lua_State *L, struct ca_stmt *e, int first, int top)
{
	sqlite3_stmt *st = e->st;
	sqlite3 *h = e->db->h;
	int rc;

	if (tx_lost(L, e->db))
		return 2;
	bind_args(L, st, first, top);
	while ((rc = sqlite3_step(st)) == SQLITE_ROW)
		;
	if (rc != SQLITE_DONE)
		return step_fail(L, e, rc);
	lua_pushinteger(L, sqlite3_stmt_readonly(st) ? 0 : (lua_Integer)sqlite3_changes64(h));
	lua_pushinteger(L, (lua_Integer)sqlite3_last_insert_rowid(h));
	done(st);
	return 2;
}

static int do_rows(lua_State *L, struct ca_stmt *e, int first, int top)
{
	sqlite3_stmt *st = e->st;
	int ncols = sqlite3_column_count(st), names, rc;
	lua_Integer n = 0;

	if (tx_lost(L, e->db))
		return 2;
	bind_args(L, st, first, top);
	luaL_checkstack(L, ncols + 4, "too many columns");
	lua_createtable(L, 4, 0);
	names = lua_gettop(L) + 1;
	for (int i = 0; i < ncols; i++)
		lua_pushstring(L, sqlite3_column_name(st, i));
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		push_row(L, st, ncols, names);
		lua_rawseti(L, names - 1, ++n);
	}
	if (rc != SQLITE_DONE)
		return step_fail(L, e, rc);
	done(st);
	lua_settop(L, names - 1);
	return 1;
}

/* db:row / db:value: the first row as a table, or its first column. */
static int do_first(lua_State *L, struct ca_stmt *e, int first, int top, int whole)
{
	sqlite3_stmt *st = e->st;
	int ncols = sqlite3_column_count(st), rc, names;

	if (tx_lost(L, e->db))
		return 2;
	bind_args(L, st, first, top);
	rc = sqlite3_step(st);
	if (rc == SQLITE_DONE) {
		done(st);
		lua_pushnil(L);
		return 1;
	}
	if (rc != SQLITE_ROW)
		return step_fail(L, e, rc);
	if (!whole) {
		if (ncols > 0)
			push_column(L, st, 0);
		else
			lua_pushnil(L);
	} else {
		luaL_checkstack(L, ncols + 4, "too many columns");
		names = lua_gettop(L) + 1;
		for (int i = 0; i < ncols; i++)
			lua_pushstring(L, sqlite3_column_name(st, i));
		push_row(L, st, ncols, names);
	}
	done(st);
	return 1;
}

static int l_prepare(lua_State *L)
{
	struct ca_db *db = check_db(L);

	return get_stmt(L, db, 2) ? 1 : 2;
}

static int l_run(lua_State *L)
{
	struct ca_db *db = check_db(L);
	int top = lua_gettop(L);
	struct ca_stmt *e = get_stmt(L, db, 2);

	return e ? do_run(L, e, 3, top) : 2;
}

static int l_rows(lua_State *L)
{
	struct ca_db *db = check_db(L);
	int top = lua_gettop(L);
	struct ca_stmt *e = get_stmt(L, db, 2);

	return e ? do_rows(L, e, 3, top) : 2;
}

static int l_row(lua_State *L)
{
	struct ca_db *db = check_db(L);
	int top = lua_gettop(L);
	struct ca_stmt *e = get_stmt(L, db, 2);

	return e ? do_first(L, e, 3, top, 1) : 2;
}

static int l_value(lua_State *L)
{
	struct ca_db *db = check_db(L);
	int top = lua_gettop(L);
	struct ca_stmt *e = get_stmt(L, db, 2);

	return e ? do_first(L, e, 3, top, 0) : 2;
}

static int s_run(lua_State *L)
{
	return do_run(L, check_stmt(L), 2, lua_gettop(L));
}

static int s_rows(lua_State *L)
{
	return do_rows(L, check_stmt(L), 2, lua_gettop(L));
}

static int s_row(lua_State *L)
{
	return do_first(L, check_stmt(L), 2, lua_gettop(L), 1);
}

static int s_value(lua_State *L)
{
	return do_first(L, check_stmt(L), 2, lua_gettop(L), 0);
}

static int s_sql(lua_State *L)
{
	lua_pushstring(L, sqlite3_sql(check_stmt(L)->st));
	return 1;
}

/* ---- the connection ---- */

/* Runs each statement of sql, without parameters; 0 or a failing rc. SQL errors raise. */
static int exec_all(lua_State *L, sqlite3 *h, const char *sql)
{
	while (*sql) {
		sqlite3_stmt *st;
		const char *tail;
		int rc = sqlite3_prepare_v2(h, sql, -1, &st, &tail);

		if (rc != SQLITE_OK) {
			if ((rc & 0xff) == SQLITE_ERROR && L)
				luaL_error(L, "sqlite: %s in: %s", sqlite3_errmsg(h), sql);
			return rc;
		}
		sql = tail;
		if (st == NULL)
			continue;
		while ((rc = sqlite3_step(st)) == SQLITE_ROW)
			;
		/* Finalizing keeps the step's error message in h for push_err. */
		sqlite3_finalize(st);
		if (rc != SQLITE_DONE)
			return rc;
	}
	return SQLITE_OK;
}

static int l_exec(lua_State *L)
{
	struct ca_db *db = check_db(L);
	const char *sql = luaL_checkstring(L, 2);
	int rc;

	if (tx_lost(L, db))
		return 2;
	rc = exec_all(L, db->h, sql);
	if (rc != SQLITE_OK)
		return push_err(L, db->h, rc);
	lua_pushboolean(L, 1);
	return 1;
}

/* Runs fixed transaction statement k; 0 or a failing rc (the message stays in h). */
static int tx_step(struct ca_db *db, int k)
{
	int rc;

	if (db->tx[k] == NULL) {
		rc = sqlite3_prepare_v3(db->h, tx_sql[k], -1, SQLITE_PREPARE_PERSISTENT,
					&db->tx[k], NULL);
		if (rc != SQLITE_OK)
			return rc;
	}
	rc = sqlite3_step(db->tx[k]);
	sqlite3_reset(db->tx[k]);
	return rc == SQLITE_DONE ? SQLITE_OK : rc;
}

/* Undoes the transaction (or savepoint) after a failure, if SQLite has not already. */
static void tx_undo(struct ca_db *db, int nested)
{
	if (sqlite3_get_autocommit(db->h))
		return;
	if (!nested) {
		tx_step(db, TX_ROLLBACK);
	} else if (tx_step(db, TX_ROLLBACK_TO) == SQLITE_OK) {
		tx_step(db, TX_RELEASE);
	}
}

static int l_transaction(lua_State *L)
{
	struct ca_db *db = check_db(L);
	int nested, top, rc, status;

	luaL_checktype(L, 2, LUA_TFUNCTION);
	/* Inside one whose transaction is gone: a BEGIN now would commit on its own. */
	if (tx_lost(L, db))
		return 2;
	nested = !sqlite3_get_autocommit(db->h);
	rc = tx_step(db, nested ? TX_SAVE : TX_BEGIN);
	if (rc != SQLITE_OK)
		return push_err(L, db->h, rc);
	/* Stack: db fn args... -> call fn(args...) with everything after db. */
	top = lua_gettop(L);
	db->tx_depth++;
	status = lua_pcall(L, top - 2, LUA_MULTRET, 0);
	db->tx_depth--;
	if (status != LUA_OK) {
		if (db->h)
			tx_undo(db, nested);
		return lua_error(L);
	}
	if (db->h == NULL)
		return luaL_error(L, "sqlite: the database was closed inside its transaction");
	/* fn went on after an error that rolled it all back: nothing to commit. */
	if (sqlite3_get_autocommit(db->h))
		return ca_fail(L, "ECANCELED", "the transaction was rolled back by an error inside it: none of it is written");
	rc = tx_step(db, nested ? TX_RELEASE : TX_COMMIT);
	if (rc != SQLITE_OK) {
		int n = push_err(L, db->h, rc);

		tx_undo(db, nested);
		return n;
	}
	lua_pushboolean(L, 1);
	lua_insert(L, 2);
	return lua_gettop(L) - 1;
}

static int l_checkpoint(lua_State *L)
{
	static const char *const names[] = {"PASSIVE", "FULL", "RESTART", "TRUNCATE", NULL};
	static const int modes[] = {
		SQLITE_CHECKPOINT_PASSIVE, SQLITE_CHECKPOINT_FULL,
		SQLITE_CHECKPOINT_RESTART, SQLITE_CHECKPOINT_TRUNCATE,
	};
	struct ca_db *db = check_db(L);
	int mode = modes[luaL_checkoption(L, 2, "PASSIVE", names)];
	int nlog = 0, nckpt = 0;
	int rc = sqlite3_wal_checkpoint_v2(db->h, NULL, mode, &nlog, &nckpt);

	if (rc != SQLITE_OK)
		return push_err(L, db->h, rc);
	lua_pushinteger(L, nlog);
	lua_pushinteger(L, nckpt);
	return 2;
}

/* Pushes nil, "ECODE: <path>: message" for a failure at open or check. */
static int path_err(lua_State *L, sqlite3 *h, const char *code, const char *path, int rc)
{
	int e = h ? sqlite3_system_errno(h) : 0;

	if ((rc & 0xff) == SQLITE_CANTOPEN && e != 0)
		return ca_fail(L, code, "%s: %s (%s)", path, sqlite3_errmsg(h), strerror(e));
	return ca_fail(L, code, "%s: %s", path, h ? sqlite3_errmsg(h) : sqlite3_errstr(rc));
}

static int l_integrity_check(lua_State *L)
{
	struct ca_db *db = check_db(L);
	const char *path;
	sqlite3_stmt *st;
	luaL_Buffer b;
	int rc, n = 0;

	lua_getiuservalue(L, 1, 2);
	path = lua_tostring(L, -1);
	rc = sqlite3_prepare_v2(db->h, "PRAGMA quick_check(5)", -1, &st, NULL);
	if (rc != SQLITE_OK)
		return path_err(L, db->h, rc_code(db->h, rc), path, rc);
	luaL_buffinit(L, &b);
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		const char *msg = (const char *)sqlite3_column_text(st, 0);

		if (msg && !strcmp(msg, "ok"))
			continue;
		if (n++)
			luaL_addstring(&b, "; ");
		luaL_addstring(&b, msg ? msg : "?");
	}
	if (rc != SQLITE_DONE) {
		int k = path_err(L, db->h, rc_code(db->h, rc), path, rc);

		sqlite3_finalize(st);
		return k;
	}
	sqlite3_finalize(st);
	luaL_pushresult(&b);
	if (n == 0) {
		lua_pushboolean(L, 1);
		return 1;
	}
	return ca_fail(L, "ECORRUPT", "%s: %s", path, lua_tostring(L, -1));
}

static int l_changes(lua_State *L)
{
	lua_pushinteger(L, (lua_Integer)sqlite3_changes64(check_db(L)->h));
	return 1;
}

static int l_last_insert_rowid(lua_State *L)
{
	lua_pushinteger(L, (lua_Integer)sqlite3_last_insert_rowid(check_db(L)->h));
	return 1;
}

static int l_stats(lua_State *L)
{
	struct ca_db *db = check_db(L);

	lua_createtable(L, 0, 6);
	ca_set_int_field(L, "statements", db->ncached);
	ca_set_int_field(L, "prepared", db->prepared);
	lua_pushboolean(L, db->bg != NULL);
	lua_setfield(L, -2, "background_checkpoint");
	ca_set_int_field(L, "checkpoints", db->bg ? db->bg->runs : 0);
	ca_set_int_field(L, "checkpoint_failures", db->bg ? db->bg->failures : 0);
	ca_set_int_field(L, "inline_checkpoints", db->bg ? db->bg->inline_runs : 0);
	return 1;
}

static int l_path(lua_State *L)
{
	luaL_checkudata(L, 1, DB_MT);
	lua_getiuservalue(L, 1, 2);
	return 1;
}

/* ---- background checkpoints ---- */

/* On a thread-pool thread: opens the second connection once, then checkpoints. */
static void bg_work(uv_work_t *req)
{
	struct bg_ckpt *c = req->data;
	int nlog, nckpt, rc = SQLITE_OK;

	if (c->h == NULL) {
		rc = sqlite3_open_v2(c->path, &c->h, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
		if (rc == SQLITE_OK) {
			sqlite3_busy_timeout(c->h, 1000);
			/* Reading the schema opens the WAL; the sync level decides the checkpoint's fsyncs. */
			rc = exec_all(NULL, c->h, c->sync_sql);
		}
		if (rc != SQLITE_OK) {
			c->rc = rc;
			snprintf(c->err, sizeof c->err, "%s", c->h ? sqlite3_errmsg(c->h) : sqlite3_errstr(rc));
			sqlite3_close(c->h);
			c->h = NULL;
			return;
		}
	}
	c->rc = sqlite3_wal_checkpoint_v2(c->h, NULL, SQLITE_CHECKPOINT_PASSIVE, &nlog, &nckpt);
	if (c->rc != SQLITE_OK)
		snprintf(c->err, sizeof c->err, "%s", sqlite3_errmsg(c->h));
}

static void bg_free(struct bg_ckpt *c)
{
	sqlite3_close(c->h);
	free(c->path);
	free(c);
}

/* On the loop thread, after bg_work. */
static void bg_after(uv_work_t *req, int status)
{
	struct bg_ckpt *c = req->data;

	(void)status;
	c->busy = 0;
	if (c->orphan) {
		bg_free(c);
		return;
	}
	c->runs++;
	/* BUSY: a checkpoint of the loop connection was running; the next commit retries. */
	if (c->rc != SQLITE_OK && (c->rc & 0xff) != SQLITE_BUSY) {
		c->failures++;
		ca_log(CA_LOG_WARN, "sqlite: background checkpoint of %s failed: %s", c->path, c->err);
	}
}

/* The WAL hook: after each commit, with the WAL's size in pages. Must not call Lua. */
static int on_wal(void *arg, sqlite3 *h, const char *name, int pages)
{
	struct ca_db *db = arg;
	struct bg_ckpt *c = db->bg;

	if (pages < db->autockpt || c->busy || ca_stopping())
		return SQLITE_OK;
	/*
	 * Under sustained writes a background checkpoint never catches up with
	 * the WAL's end, and only a fully checkpointed WAL starts over: past the
	 * limit, this commit checkpoints inline (a stall) to bound the file.
	 */
	if (pages >= db->autockpt * WAL_LIMIT_FACTOR) {
		c->inline_runs++;
		sqlite3_wal_checkpoint_v2(h, name, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
		return SQLITE_OK;
	}
	c->req.data = c;
	if (uv_queue_work(ca_loop(), &c->req, bg_work, bg_after) == 0)
		c->busy = 1;
	return SQLITE_OK;
}

static void bg_start(struct ca_db *db, const char *path, const char *sync)
{
	struct bg_ckpt *c = ca_malloc(sizeof *c);

	memset(c, 0, sizeof *c);
	c->path = ca_strdup(path);
	snprintf(c->sync_sql, sizeof c->sync_sql,
		 "SELECT 1 FROM sqlite_master LIMIT 1; PRAGMA synchronous=%s", sync);
	db->bg = c;
	sqlite3_wal_hook(db->h, on_wal, db);
}

static void bg_stop(struct ca_db *db)
{
	struct bg_ckpt *c = db->bg;

	if (c == NULL)
		return;
	db->bg = NULL;
	if (c->busy)
		c->orphan = 1;
	else
		bg_free(c);
}

/* Closes the lock file, which releases its flock. */
static void unlock(struct ca_db *db)
{
	if (db->lock >= 0)
		close(db->lock);
	db->lock = -1;
}

static void db_close(struct ca_db *db)
{
	if (db->h == NULL)
		return;
	while (db->all)
		stmt_release(db->all);
	for (int k = 0; k < TX_N; k++) {
		sqlite3_finalize(db->tx[k]);
		db->tx[k] = NULL;
	}
	/* Every statement is finalized, so this cannot be SQLITE_BUSY. */
	if (sqlite3_close(db->h) != SQLITE_OK)
		sqlite3_close_v2(db->h);
	db->h = NULL;
	/* After the loop connection: the checkpointer, closing last, empties the WAL. */
	bg_stop(db);
	unlock(db);
}

static int l_close(lua_State *L)
{
	struct ca_db *db = luaL_checkudata(L, 1, DB_MT);

	if (db->h) {
		db_close(db);
		/* Let the cached Stmt userdata go. */
		lua_pushnil(L);
		lua_setiuservalue(L, 1, 1);
	}
	return 0;
}

/* Runs a PRAGMA and copies its first text result into out (may be empty). */
static int pragma_text(sqlite3 *h, const char *sql, char *out, size_t n)
{
	sqlite3_stmt *st;
	int rc = sqlite3_prepare_v2(h, sql, -1, &st, NULL);

	out[0] = '\0';
	if (rc != SQLITE_OK)
		return rc;
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		const char *s = (const char *)sqlite3_column_text(st, 0);

		snprintf(out, n, "%s", s ? s : "");
		rc = SQLITE_OK;
	} else if (rc == SQLITE_DONE) {
		rc = SQLITE_OK;
	}
	sqlite3_reset(st);
	sqlite3_finalize(st);
	return rc;
}

/* An open-time code: a read-only database or location means no permission to write. */
static const char *open_code(sqlite3 *h, int rc)
{
	if ((rc & 0xff) == SQLITE_READONLY)
		return "EACCES";
	if ((rc & 0xff) == SQLITE_CANTOPEN && h) {
		const char *c = errno_code(sqlite3_system_errno(h), "ENOENT");

		return strcmp(c, "EROFS") ? c : "EACCES";
	}
	return rc_code(h, rc);
}

/*
 * Sets up a freshly opened connection; 0, or pushes nil, err and returns 2.
 * The first statement reads the schema, so a file that is not a database
 * fails here.
 */
static int configure(lua_State *L, sqlite3 *h, const char *path, int readonly,
		     const char *sync, int busy, lua_Integer autockpt, int *wal)
{
	char mode[32], sql[64];
	int rc;

	rc = exec_all(NULL, h, "SELECT 1 FROM sqlite_master LIMIT 1");
	if (rc != SQLITE_OK)
		return path_err(L, h, open_code(h, rc), path, rc);
	if (readonly)
		return 0;
	if (sqlite3_db_readonly(h, "main") == 1)
		return ca_fail(L, "EACCES", "%s: no permission to write (SQLite opened it read-only)",
			       path);
	rc = pragma_text(h, "PRAGMA journal_mode=WAL", mode, sizeof mode);
	if (rc != SQLITE_OK)
		return path_err(L, h, open_code(h, rc), path, rc);
	if (strcmp(mode, "wal") != 0 && strcmp(mode, "memory") != 0)
		return ca_fail(L, "EACCES", "%s: cannot switch to WAL mode (journal mode stays '%s')",
			       path, mode);
	*wal = strcmp(mode, "wal") == 0;
	snprintf(sql, sizeof sql, "PRAGMA synchronous=%s; PRAGMA foreign_keys=ON", sync);
	rc = exec_all(NULL, h, sql);
	if (rc == SQLITE_OK)
		sqlite3_wal_autocheckpoint(h, (int)autockpt);
	/*
	 * Take the write lock once, without waiting: the -wal and -shm files
	 * must be writable too. Another connection holding it (BUSY) means we
	 * cannot tell; the first write will.
	 */
	if (rc == SQLITE_OK) {
		sqlite3_busy_timeout(h, 0);
		rc = exec_all(NULL, h, "BEGIN IMMEDIATE");
		if (rc == SQLITE_OK)
			rc = exec_all(NULL, h, "COMMIT");
		else if ((rc & 0xff) == SQLITE_BUSY)
			rc = SQLITE_OK;
		sqlite3_busy_timeout(h, busy);
	}
	if (rc != SQLITE_OK)
		return path_err(L, h, open_code(h, rc), path, rc);
	return 0;
}

/* Whether the folder that would hold path exists and this process may create files in it. */
static int folder_writable(const char *path)
{
	const char *slash = strrchr(path, '/');
	char dir[4096];
	struct stat st;

	if (slash == NULL)
		snprintf(dir, sizeof dir, ".");
	else if (slash == path)
		snprintf(dir, sizeof dir, "/");
	else
		snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
	if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
		return 1;	/* missing: ENOENT is right */
	return access(dir, W_OK | X_OK) == 0;
}

/*
 * Creates the file at path, mode 0600 whatever the umask (one that takes the
 * owner's write bit off made it 0400: a database SQLite then opened read-only,
 * and a lock file the next start could not open), never through a symbolic
 * link. Returns its fd, or -1 with errno: EEXIST when something is there
 * already, a dangling symbolic link too.
 */
static int create_private(const char *path)
{
	int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);

	/* Only a file system without modes (vfat) refuses: it has the mount's. */
	if (fd >= 0 && fchmod(fd, 0600) != 0)
		ca_log(CA_LOG_WARN, "sqlite: cannot make %s mode 0600: %s", path, strerror(errno));
	return fd;
}

/*
 * Takes the lock of path (opts.lock): <real path>.lock, created if missing,
 * flock()ed without waiting, with our pid written in it. Returns its fd; or
 * pushes nil, err and returns -1, with EBUSY and the holder's pid from the
 * file when another open file holds the lock. The lock is beside the file
 * path resolves to (its links, its folders' links followed): two paths that
 * reach one database through different links take the same lock.
 */
static int take_lock(lua_State *L, const char *path)
{
	char lpath[4096], buf[24];
	char *real = realpath(path, NULL);
	long pid = 0;
	int fd, e, n;

	snprintf(lpath, sizeof lpath, "%s.lock", real ? real : path);
	free(real);
	fd = create_private(lpath);
	if (fd < 0 && errno == EEXIST)
		fd = open(lpath, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0) {
		e = errno;
		ca_fail(L, errno_code(e, "EIO"), "%s: cannot open the lock file %s: %s", path, lpath,
			strerror(e));
		return -1;
	}
	if (flock(fd, LOCK_EX | LOCK_NB) == 0) {
		n = snprintf(buf, sizeof buf, "%ld\n", (long)getpid());
		/* The pid only names us in another open's error: a failed write just leaves it out. */
		if (ftruncate(fd, 0) != 0 || pwrite(fd, buf, (size_t)n, 0) != n)
			ca_log(CA_LOG_WARN, "sqlite: cannot write the pid into %s: %s", lpath, strerror(errno));
		return fd;
	}
	e = errno;
	if (e == EWOULDBLOCK) {
		n = (int)pread(fd, buf, sizeof buf - 1, 0);
		buf[n > 0 ? n : 0] = '\0';
		pid = strtol(buf, NULL, 10);
	}
	close(fd);
	if (e != EWOULDBLOCK)
		ca_fail(L, errno_code(e, "EIO"), "%s: cannot lock %s: %s", path, lpath, strerror(e));
	else if (pid > 0)
		ca_fail(L, "EBUSY", "%s: in use by another process (pid %ld)", path, pid);
	else
		ca_fail(L, "EBUSY", "%s: in use by another process", path);
	return -1;
}

static int l_open(lua_State *L)
{
	static const char *const syncs[] = {"OFF", "NORMAL", "FULL", NULL};
	const char *path = luaL_checkstring(L, 1);
	int readonly = 0, create = 1, lock = 0, flags, rc, sync = 1, background = 1, wal = 0;
	lua_Integer busy = 5000, autockpt = 1000, statements = DEFAULT_STATEMENTS;
	struct ca_db *db;
	sqlite3 *h = NULL;

	if (!lua_isnoneornil(L, 2)) {
		const char *s;

		luaL_checktype(L, 2, LUA_TTABLE);
		readonly = ca_opt_bool_field(L, 2, "readonly", 0);
		create = ca_opt_bool_field(L, 2, "create", 1);
		lock = ca_opt_bool_field(L, 2, "lock", 0);
		busy = ca_opt_int_field(L, 2, "busy_timeout", busy);
		autockpt = ca_opt_int_field(L, 2, "autocheckpoint", autockpt);
		statements = ca_opt_int_field(L, 2, "statements", statements);
		background = ca_opt_bool_field(L, 2, "background_checkpoint", 1);
		s = ca_opt_string_field(L, 2, "synchronous", "NORMAL");
		sync = -1;
		for (int i = 0; syncs[i]; i++)
			if (!strcasecmp(s, syncs[i]))
				sync = i;
		if (sync < 0)
			luaL_error(L, "option 'synchronous' must be \"OFF\", \"NORMAL\" or \"FULL\"");
		if (busy < 0 || busy > INT32_MAX)
			luaL_error(L, "option 'busy_timeout' must be >= 0 (ms)");
		if (autockpt < 0 || autockpt > INT32_MAX)
			luaL_error(L, "option 'autocheckpoint' must be >= 0 (pages)");
		if (statements < 1 || statements > 100000)
			luaL_error(L, "option 'statements' must be between 1 and 100000");
	}
	/*
	 * A path is a file's name, never a URI: this SQLite reads "file:..." as
	 * one, which opened another file than the one created 0600 here and
	 * locked beside it (store.path "file:calls.db": calls.db, mode 0644,
	 * while "file:calls.db.lock" guarded nothing).
	 */
	if (!strncmp(path, "file:", 5))
		path = lua_pushfstring(L, "./%s", path);

	/* The userdata exists, closed, before the connection does. */
	db = lua_newuserdatauv(L, sizeof *db, 2);
	memset(db, 0, sizeof *db);
	db->lock = -1;
	db->max_cached = (int)statements;
	luaL_setmetatable(L, DB_MT);
	lua_newtable(L);
	lua_setiuservalue(L, -2, 1);
	lua_pushvalue(L, 1);
	lua_setiuservalue(L, -2, 2);

	flags = SQLITE_OPEN_NOMUTEX;
	if (readonly)
		flags |= SQLITE_OPEN_READONLY;
	else
		flags |= SQLITE_OPEN_READWRITE | (create ? SQLITE_OPEN_CREATE : 0);
	/*
	 * A new file is made readable by its owner only: it holds every call's
	 * number, prompt, transcript and report. SQLite made it 0644 (less the
	 * umask), for every user of the machine to read; it gives the -wal and
	 * -shm files the mode of the database's. An existing file keeps its own.
	 * Once the file is there SQLite only opens it, never creates it: not
	 * 0644 should it be gone by then, nor where a symbolic link put there
	 * meanwhile points. A link to an existing file is followed (SQLite puts
	 * the -wal and -shm beside the file it points to); one to a missing
	 * file is refused, rather than a file created wherever it points.
	 * Whatever else fails here (no folder, no permission) SQLite's open
	 * reports.
	 */
	if (!readonly && create && path[0] && strcmp(path, ":memory:")) {
		int fd = create_private(path);
		struct stat st;

		if (fd >= 0) {
			close(fd);
			flags &= ~SQLITE_OPEN_CREATE;
		} else if (errno == EEXIST) {
			flags &= ~SQLITE_OPEN_CREATE;
			if (lstat(path, &st) == 0 && S_ISLNK(st.st_mode) && stat(path, &st) != 0 && errno == ENOENT) {
				char to[4096];
				ssize_t n = readlink(path, to, sizeof to - 1);

				to[n > 0 ? n : 0] = '\0';
				return ca_fail(L, "ENOENT", "%s: a symbolic link to %s, which does not exist "
					       "(not created through a link: create it first, or give the file's own path)",
					       path, n > 0 ? to : "a missing file");
			}
		}
	}
	rc = sqlite3_open_v2(path, &h, flags, NULL);
	if (rc != SQLITE_OK) {
		const char *code = open_code(h, rc);
		int n;

		/* SQLite retries read-only, so a folder we cannot write reports ENOENT. */
		if (!readonly && create && !strcmp(code, "ENOENT") && !folder_writable(path))
			n = ca_fail(L, "EACCES", "%s: cannot create the file: no permission to write its folder",
				    path);
		else
			n = path_err(L, h, code, path, rc);
		sqlite3_close(h);
		return n;
	}
	/*
	 * Before the first read or write of the file: a second process stops
	 * here. An in-memory or temporary database (":memory:", "") is this
	 * connection's alone: no lock, no "<path>.lock" in the working folder.
	 */
	if (lock && !readonly && path[0] && strcmp(path, ":memory:")) {
		db->lock = take_lock(L, path);
		if (db->lock < 0) {
			sqlite3_close(h);
			return 2;
		}
	}
	sqlite3_extended_result_codes(h, 1);
	sqlite3_busy_timeout(h, (int)busy);
	if (configure(L, h, path, readonly, syncs[sync], (int)busy, autockpt, &wal)) {
		sqlite3_close(h);
		unlock(db);
		return 2;
	}
	db->h = h;
	db->autockpt = (int)autockpt;
	if (wal && background && autockpt > 0)
		bg_start(db, path, syncs[sync]);
	return 1;
}

static int l_blob(lua_State *L)
{
	luaL_checktype(L, 1, LUA_TSTRING);
	lua_newuserdatauv(L, 0, 1);
	luaL_setmetatable(L, BLOB_MT);
	lua_pushvalue(L, 1);
	lua_setiuservalue(L, -2, 1);
	return 1;
}

int luaopen_callagent_sqlite(lua_State *L)
{
	static const luaL_Reg db_methods[] = {
		{"exec", l_exec},
		{"prepare", l_prepare},
		{"run", l_run},
		{"rows", l_rows},
		{"row", l_row},
		{"value", l_value},
		{"transaction", l_transaction},
		{"checkpoint", l_checkpoint},
		{"integrity_check", l_integrity_check},
		{"changes", l_changes},
		{"last_insert_rowid", l_last_insert_rowid},
		{"stats", l_stats},
		{"path", l_path},
		{"close", l_close},
		{NULL, NULL}
	};
	static const luaL_Reg stmt_methods[] = {
		{"run", s_run},
		{"rows", s_rows},
		{"row", s_row},
		{"value", s_value},
		{"sql", s_sql},
		{NULL, NULL}
	};
	static const luaL_Reg fns[] = {
		{"open", l_open},
		{"blob", l_blob},
		{NULL, NULL}
	};

	if (luaL_newmetatable(L, DB_MT)) {
		luaL_newlib(L, db_methods);
		lua_setfield(L, -2, "__index");
		lua_pushcfunction(L, l_close);
		lua_setfield(L, -2, "__gc");
		lua_pushcfunction(L, l_close);
		lua_setfield(L, -2, "__close");
	}
	lua_pop(L, 1);
	if (luaL_newmetatable(L, STMT_MT)) {
		luaL_newlib(L, stmt_methods);
		lua_setfield(L, -2, "__index");
		lua_pushcfunction(L, stmt_gc);
		lua_setfield(L, -2, "__gc");
	}
	lua_pop(L, 1);
	luaL_newmetatable(L, BLOB_MT);
	lua_pop(L, 1);
	luaL_newlib(L, fns);
	lua_pushstring(L, sqlite3_libversion());
	lua_setfield(L, -2, "version");
	return 1;
}
