/*
 * ca.h - what every C module of the callagent host shares.
 *
 * The host owns one libuv loop and one Lua state. C modules register as
 * package.preload entries (see main.c) and call back into Lua only through
 * ca_call(), which runs the function protected, with a traceback, and logs
 * an uncaught error instead of letting it take the process down.
 *
 * Conventions (see ../shared/STYLE.md):
 *   - public C names start with ca_, internal shared ones with ca__;
 *   - metatables are named "callagent.<Type>";
 *   - misuse raises (luaL_argerror); failures of the world return
 *     nil, "ECODE: message" (ca_fail / ca_fail_uv).
 */
#ifndef CA_H
#define CA_H

#include <stddef.h>
#include <stdint.h>

#include <lua.h>
#include <lauxlib.h>
#include <uv.h>

#define CA_VERSION "0.1.0"

/*
 * The one event loop and the main Lua thread. ca_lua() is NULL once the state
 * is closed at exit: callbacks that fire then must not call into Lua.
 * ca_stopping() is true from the start of teardown (before lua_close), when
 * __gc handlers should release resources instead of keeping them running.
 */
uv_loop_t *ca_loop(void);
lua_State *ca_lua(void);
int ca_stopping(void);

/*
 * Calls the function at stack position -(nargs+1) of the main Lua thread with
 * nargs arguments, protected. On error, logs "where" with the message and a
 * traceback and returns -1; else returns 0. nresults as in lua_pcall. The
 * function and arguments are always popped; on success nresults are left.
 */
int ca_call(lua_State *L, int nargs, int nresults, const char *where);

/*
 * The message handler ca_call uses, for other protected calls: the error plus
 * a traceback, as one string. An error that is not a string is shown by its
 * __tostring, or named by its type ("(error object is a table value)").
 */
int ca_traceback(lua_State *L);

/* Pushes the registry ref onto the main thread and calls it via ca_call. */
void ca_call_ref(int ref, int nargs_pushed_after, const char *where);

/* Registry reference helpers: ref the value at idx (LUA_NOREF for nil). */
int ca_ref(lua_State *L, int idx);
void ca_unref(lua_State *L, int *ref);

/* Failure returns: push nil and "CODE: message"; return 2. */
int ca_fail(lua_State *L, const char *code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
int ca_fail_uv(lua_State *L, int uverr);

/* Levels match callagent.log. */
enum { CA_LOG_DEBUG = 0, CA_LOG_INFO, CA_LOG_WARN, CA_LOG_ERROR };

/*
 * Writes one log line from C ("level msg") through the same non-blocking sink
 * the Lua logger uses. Messages must not carry secrets.
 */
void ca_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int ca_log_enabled(int level);

/*
 * A line anyone outside can cause as often as they like (a refused request):
 * as ca_log, but of each call site only the first CA_LOG_LIMIT_LINES in a
 * window (60 s; core.log.limits) are written. The rest are counted, and
 * one line at the window's end (or at exit) gives the count with the last
 * one's text. Each CA_LOG_LIMITED is a site of its own.
 */
struct ca_log_limit {
	struct ca_log_limit *next;	/* in the list of sites with lines not written */
	uint64_t since;			/* uv_now() at the window's first line */
	unsigned int logged, more;
	int level, listed;
	char last[400];			/* the last line not written (redacted, cut) */
};
#define CA_LOG_LIMIT_LINES 5
void ca_log_limited(struct ca_log_limit *l, int level, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
#define CA_LOG_LIMITED(level, ...) do { \
		static struct ca_log_limit ca_limit_; \
		ca_log_limited(&ca_limit_, (level), __VA_ARGS__); \
	} while (0)

/* Allocation that treats out-of-memory as fatal, as the host does. */
void *ca_malloc(size_t n);
void *ca_realloc(void *p, size_t n);
char *ca_strdup(const char *s);

/* Sets t[k] = v in the table on top of the stack. */
void ca_set_int_field(lua_State *L, const char *k, lua_Integer v);

/* Fetches an integer/boolean/string field from the table at idx, with a default. */
lua_Integer ca_opt_int_field(lua_State *L, int idx, const char *k, lua_Integer def);
int ca_opt_bool_field(lua_State *L, int idx, const char *k, int def);
const char *ca_opt_string_field(lua_State *L, int idx, const char *k, const char *def);

/* Module entry points, registered in package.preload by main.c. */
int luaopen_callagent_core(lua_State *L);
int luaopen_callagent_core_timer(lua_State *L);
int luaopen_callagent_core_log(lua_State *L);
int luaopen_callagent_core_http(lua_State *L);
int luaopen_callagent_core_ws(lua_State *L);
int luaopen_callagent_core_fetch(lua_State *L);
int luaopen_callagent_core_process(lua_State *L);
int luaopen_callagent_core_bridge(lua_State *L);
int luaopen_callagent_crypto(lua_State *L);
int luaopen_callagent_audio(lua_State *L);
int luaopen_callagent_sqlite(lua_State *L);

/* Shutdown hooks of C modules: run once after the loop stops (e.g. curl multi cleanup). */
void ca__at_close(void (*fn)(void));
void ca__kill_children(void);	/* process.c: SIGTERM to kill_on_exit children (forced exit) */
int ca__pdeathsig_main(int argc, char **argv);	/* pdeathsig.c: a kill_on_exit child's wrapper */

/*
 * Thread-pool work whose result no one needs once the loop stops (a DNS
 * lookup): +1 when queued, -1 in its callback. A stop does not wait for
 * such work that is already running (libuv cannot cancel it).
 */
void ca__abandonable(int delta);

/* Log sink internals shared by main.c and log.c. */
void ca__log_write(const char *line, size_t len);
void ca__log_flush(void);
int ca__log_holds_secret(const char *s, size_t n);	/* a registered secret, as written, is in s */
void ca__log_set_level(int level);
/* "text" or "json"; -1 for anything else. */
int ca__log_set_format(const char *f);
/*
 * log.c: the length of the valid UTF-8 sequence at s (1..4; RFC 3629: no
 * overlong forms, surrogates or code points past U+10FFFF), or 0 when it is
 * not one. n > 0 bytes are there.
 */
size_t ca__utf8_len(const unsigned char *s, size_t n);
/*
 * util.c: the bytes of a TCP socket's stream that the process has read so far
 * (those the kernel received, less those still waiting to be read), or -1
 * when the kernel does not say.
 */
long long ca__tcp_bytes_read(int fd);
/* A fatal error: written at once, redacted, keeping its traceback's lines. */
void ca__log_fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
