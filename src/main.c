/*
 * main.c - the callagent program: one Lua state on one libuv loop.
 *
 *   callagent run app.lua [args...]
 *
 * Loads the Lua state with the built-in modules preloaded, points
 * package.path at the project's Lua trees, runs app.lua, then runs the loop
 * until no work is left or callagent.core.stop() is called. SIGINT/SIGTERM
 * (and SIGHUP: the terminal closed)
 * go to the Lua signal handler (callagent.runtime installs one that runs the
 * shutdown handlers); a second signal exits at once (within a second even
 * when the loop is stuck in the app's own code, see raw_signal).
 *
 * Exit codes: 0 done, 1 the app failed (error in app.lua, or stop(1)),
 * 2 usage error, 128+N forced exit by a second signal N.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <dirent.h>
#include <time.h>

#include <lualib.h>
#include <lua-cjson.h>

#include "ca.h"

#ifndef CA_DATADIR
#define CA_DATADIR "/usr/local/share/callagent"
#endif

static uv_loop_t *loop;
static lua_State *mainL;
static int exit_code;
static int stopping;
static int signal_ref = LUA_NOREF;
static int signals_seen;
static uv_signal_t sig_int, sig_term, sig_hup;
static char root[PATH_MAX];	/* the folder holding lua/ and providers/ */

#define MAX_AT_CLOSE 16
static void (*at_close[MAX_AT_CLOSE])(void);
static int n_at_close;

uv_loop_t *ca_loop(void)
{
	return loop;
}

lua_State *ca_lua(void)
{
	return mainL;
}

int ca_stopping(void)
{
	return stopping;
}

void ca__at_close(void (*fn)(void))
{
	if (n_at_close < MAX_AT_CLOSE)
		at_close[n_at_close++] = fn;
}

static unsigned int abandonable;

void ca__abandonable(int delta)
{
	abandonable += (unsigned int)delta;
}

static void count_closing(uv_handle_t *h, void *arg)
{
	if (uv_is_closing(h))
		(*(unsigned int *)arg)++;
}

/*
 * At exit: what keeps the loop alive (uv_loop_alive: active handles,
 * handles being closed, requests) is abandonable work alone.
 */
static int only_abandonable_left(void)
{
	unsigned int closing = 0;

	uv_walk(loop, count_closing, &closing);
	return loop->active_handles == 0 && closing == 0 && loop->active_reqs.count == abandonable;
}

static void usage(FILE *f)
{
	fputs("usage: callagent run APP.lua [ARGS...]\n"
	      "       callagent --help | --version\n"
	      "\n"
	      "Runs APP.lua on callagent's event loop until it has no work left or\n"
	      "is stopped (SIGINT/SIGTERM/SIGHUP: graceful stop; a second signal exits).\n"
	      "\n"
	      "Environment:\n"
	      "  CALLAGENT_PATH   extra folders for require (colon separated)\n"
	      "  CALLAGENT_LOG    log level: debug, info, warn, error\n"
	      "  CALLAGENT_LOG_FORMAT  text (the default) or json: a JSON object per line\n"
	      "\n"
	      "Exit codes: 0 done, 1 the app failed, 2 usage error,\n"
	      "128+N stopped at once by a second signal N.\n", f);
}

static int is_dir(const char *p)
{
	struct stat st;

	return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/*
 * Finds the folder with lua/callagent in it: next to the binary (source tree,
 * binary in build/), or the installed data dir.
 */
static void find_root(void)
{
	static const char *const rel[] = {"/../..", "/..", "", "/../share/callagent"};
	char exe[PATH_MAX], probe[PATH_MAX + 64];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);

	if (n > 0) {
		char *slash;

		exe[n] = '\0';
		slash = strrchr(exe, '/');
		if (slash)
			*slash = '\0';
		for (size_t i = 0; i < sizeof rel / sizeof rel[0]; i++) {
			snprintf(probe, sizeof probe, "%s%s/lua/callagent", exe, rel[i]);
			if (!is_dir(probe))
				continue;
			snprintf(probe, sizeof probe, "%s%s", exe, rel[i]);
			if (realpath(probe, root))
				return;
		}
	}
	snprintf(root, sizeof root, "%s", CA_DATADIR);
}

/* The folder of the app being run (core.app_dir; empty before run). */
static char app_dir[PATH_MAX];

/* package.path: CALLAGENT_PATH, the app's folder, lua/, the root (providers.x). */
static void set_paths(lua_State *L, const char *appdir)
{
	luaL_Buffer b;
	const char *extra = getenv("CALLAGENT_PATH");

	luaL_buffinit(L, &b);
	if (extra && *extra) {
		const char *p = extra;

		while (*p) {
			const char *e = strchr(p, ':');
			size_t len = e ? (size_t)(e - p) : strlen(p);

			if (len) {
				lua_pushlstring(L, p, len);
				lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;",
						lua_tostring(L, -1), lua_tostring(L, -1));
				lua_remove(L, -2);
				luaL_addvalue(&b);
			}
			p += len + (e ? 1 : 0);
		}
	}
	lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s/lua/?.lua;%s/lua/?/init.lua;%s/?.lua",
			appdir, appdir, root, root, root);
	luaL_addvalue(&b);
	luaL_pushresult(&b);

	lua_getglobal(L, "package");
	lua_insert(L, -2);
	lua_setfield(L, -2, "path");
	lua_pushliteral(L, "");
	lua_setfield(L, -2, "cpath");
	lua_pop(L, 1);
}

static int open_cjson(lua_State *L)
{
	return luaopen_cjson(L);
}

static void preload(lua_State *L)
{
	static const luaL_Reg mods[] = {
		{"callagent.core", luaopen_callagent_core},
		{"callagent.core.timer", luaopen_callagent_core_timer},
		{"callagent.core.log", luaopen_callagent_core_log},
		{"callagent.core.http", luaopen_callagent_core_http},
		{"callagent.core.ws", luaopen_callagent_core_ws},
		{"callagent.core.fetch", luaopen_callagent_core_fetch},
		{"callagent.core.process", luaopen_callagent_core_process},
		{"callagent.core.bridge", luaopen_callagent_core_bridge},
		{"callagent.crypto", luaopen_callagent_crypto},
		{"callagent.audio", luaopen_callagent_audio},
		{"callagent.sqlite", luaopen_callagent_sqlite},
		{"cjson", open_cjson},
		{NULL, NULL}
	};

	luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
	for (const luaL_Reg *m = mods; m->name; m++) {
		lua_pushcfunction(L, m->func);
		lua_setfield(L, -2, m->name);
	}
	lua_pop(L, 1);
}

/* ---- callagent.core: the runtime's own few functions ---- */

/*
 * The first stop's code is the exit status: a shutdown handler's
 * runtime.stop(4) is not undone by the shutdown's own stop(0) as it ends.
 */
static void begin_stop(int code)
{
	if (!stopping) {
		exit_code = code;
		stopping = 1;
		uv_stop(loop);
	}
}

/* core.stop([code]): ends the loop after the current callback; exits with code
 * (a later stop keeps the first one's). */
static int core_stop(lua_State *L)
{
	begin_stop((int)luaL_optinteger(L, 1, 0));
	return 0;
}

/* core.exit([code]): flushes logs and exits now, without a graceful stop. */
static int core_exit(lua_State *L)
{
	int code = (int)luaL_optinteger(L, 1, 0);

	ca__log_flush();
	fflush(stdout);
	ca__kill_children();
	_exit(code);
	return 0;
}

/* core.on_signal(fn): fn(name) runs on SIGINT/SIGTERM/SIGHUP instead of an immediate stop. */
static int core_on_signal(lua_State *L)
{
	if (!lua_isnoneornil(L, 1))
		luaL_checktype(L, 1, LUA_TFUNCTION);
	ca_unref(L, &signal_ref);
	signal_ref = ca_ref(L, 1);
	return 0;
}

/* core.listdir(path): sorted array of entry names (no . and ..), or nil, err. */
static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static int core_listdir(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	DIR *d = opendir(path);
	struct dirent *e;
	char **names = NULL;
	size_t n = 0, cap = 0;

	if (d == NULL)
		return ca_fail_uv(L, uv_translate_sys_error(errno));
	while ((e = readdir(d)) != NULL) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		if (n == cap) {
			cap = cap ? cap * 2 : 16;
			names = ca_realloc(names, cap * sizeof *names);
		}
		names[n++] = ca_strdup(e->d_name);
	}
	closedir(d);
	qsort(names, n, sizeof *names, cmp_str);
	lua_createtable(L, (int)n, 0);
	for (size_t i = 0; i < n; i++) {
		lua_pushstring(L, names[i]);
		lua_rawseti(L, -2, (lua_Integer)i + 1);
		free(names[i]);
	}
	free(names);
	return 1;
}

/* core.stat(path): "file" | "dir" | "other", size, mtime; or nil, err. */
static int core_stat(lua_State *L)
{
	struct stat st;

	if (stat(luaL_checkstring(L, 1), &st) != 0)
		return ca_fail_uv(L, uv_translate_sys_error(errno));
	lua_pushstring(L, S_ISREG(st.st_mode) ? "file" : S_ISDIR(st.st_mode) ? "dir" : "other");
	lua_pushinteger(L, (lua_Integer)st.st_size);
	lua_pushinteger(L, (lua_Integer)st.st_mtime);
	return 3;
}

/* core.realpath(path): the canonical absolute path, or nil, err. */
static int core_realpath(lua_State *L)
{
	char out[PATH_MAX];

	if (!realpath(luaL_checkstring(L, 1), out))
		return ca_fail_uv(L, uv_translate_sys_error(errno));
	lua_pushstring(L, out);
	return 1;
}

/* core.mkdir(path [, mode]): true, or nil, err (an existing folder is fine). */
static int core_mkdir(lua_State *L)
{
	const char *p = luaL_checkstring(L, 1);

	if (mkdir(p, (mode_t)luaL_optinteger(L, 2, 0755)) != 0 && !(errno == EEXIST && is_dir(p)))
		return ca_fail_uv(L, uv_translate_sys_error(errno));
	lua_pushboolean(L, 1);
	return 1;
}

static int core_pid(lua_State *L)
{
	lua_pushinteger(L, (lua_Integer)getpid());
	return 1;
}

/* core.rss(): resident set size in bytes (from /proc/self/statm). */
static int core_rss(lua_State *L)
{
	size_t rss = 0;

	uv_resident_set_memory(&rss);
	lua_pushinteger(L, (lua_Integer)rss);
	return 1;
}

/* core.cpu(): user and system CPU seconds used by this process. */
static int core_cpu(lua_State *L)
{
	uv_rusage_t ru;

	if (uv_getrusage(&ru) != 0)
		return 0;
	lua_pushnumber(L, (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6);
	lua_pushnumber(L, (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6);
	return 2;
}

/*
 * The loop's own load, measured between its polls for I/O. The loop waits
 * in epoll_wait, runs the callbacks of what came, then polls again: the
 * time from the end of one wait to the start of the next is a busy stretch
 * ("an iteration" in core.loop_stats and /healthz), and whatever arrived
 * during it waited up to that long. A loop near saturation shows as
 * utilization near 1 and long iterations. Windows of at least lm.window_ns
 * (10 s, core.loop_window) give the recent figures; the counters run from
 * start.
 *
 * A pass of libuv's loop may poll more than once: when a poll returns a
 * full batch (1024 events) libuv polls again at once, up to 48 times, and
 * its prepare and check phases come once around all of them. So the
 * stretches are timed here, around libuv's own epoll_wait and epoll_pwait
 * calls (the definitions below take the place of libc's for libuv), not
 * between prepare phases: at 1000 calls on a slow VM, passes of 400-600 ms
 * were made of polls 10-30 ms apart, and that is what the frames waited.
 * The waits timed here are also what utilization counts as idle: libuv
 * 1.44's UV_METRICS_IDLE_TIME forgets a wait that a signal interrupts
 * (SIGCHLD from a child, SIGTERM), so an idle loop looked busy. Should the
 * calls not be seen, each pass between prepare phases counts as one
 * iteration, with that metric for its idle time.
 */
#define LOOP_SLOW_NS 5000000ULL		/* 5 ms: an iteration that long is "slow" */

static struct {
	uv_prepare_t prep;
	uint64_t start, window_ns;
	uint64_t last_now, last_idle;	/* at the previous prepare: the pass, for pacing */
	uint64_t busy_from;	/* when the loop's last wait for I/O ended */
	uint64_t iterations, busy_ns, slow, slow_ns, max_ns;
	uint64_t win_start, win_busy, win_max;	/* the current window */
	double last_util, last_max_ns, last_sec;	/* the last full window */
	int have_last;
	uint64_t waited_ns;	/* the loop's time in epoll_wait, from the wrappers */
	int waits_seen;
} lm;

static void loop_roll(uint64_t now)
{
	uint64_t span = now - lm.win_start;

	if (span < lm.window_ns)
		return;
	lm.last_util = (double)(lm.busy_ns - lm.win_busy) / (double)span;
	lm.last_max_ns = (double)lm.win_max;
	lm.last_sec = span / 1e9;
	lm.have_last = 1;
	lm.win_start = now;
	lm.win_busy = lm.busy_ns;
	lm.win_max = 0;
}

/* An iteration, busy for busy ns, ended at now: the loop is about to poll. */
static void iteration_done(uint64_t now, uint64_t busy)
{
	lm.iterations++;
	lm.busy_ns += busy;
	if (busy >= LOOP_SLOW_NS) {
		lm.slow++;
		lm.slow_ns += busy;
	}
	if (busy > lm.win_max)
		lm.win_max = busy;
	if (busy > lm.max_ns)
		lm.max_ns = busy;
	loop_roll(now);
}

/* The loop thread's wait for I/O, timed; other epoll users pass through. */
static int timed_epoll_wait(int epfd, struct epoll_event *ev, int n, int ms, const sigset_t *mask)
{
	int timed = loop != NULL && epfd == uv_backend_fd(loop);
	uint64_t t0 = 0;
	int rc;

	if (timed) {
		t0 = uv_hrtime();
		if (!lm.waits_seen) {
			lm.waits_seen = 1;	/* the first wait seen: the pass so far */
			lm.busy_from = lm.last_now;
		}
		iteration_done(t0, t0 - lm.busy_from);
	}
	rc = (int)syscall(SYS_epoll_pwait, epfd, ev, n, ms, mask, (size_t)(_NSIG / 8));
	if (timed) {
		int e = errno;

		lm.busy_from = uv_hrtime();
		lm.waited_ns += lm.busy_from - t0;
		errno = e;
	}
	return rc;
}

int epoll_wait(int epfd, struct epoll_event *ev, int n, int ms)
{
	return timed_epoll_wait(epfd, ev, n, ms, NULL);
}

int epoll_pwait(int epfd, struct epoll_event *ev, int n, int ms, const sigset_t *mask)
{
	return timed_epoll_wait(epfd, ev, n, ms, mask);
}

/* The time the loop has spent waiting for I/O, in all. */
static uint64_t idle_total(void)
{
	return lm.waits_seen ? lm.waited_ns : uv_metrics_idle_time(loop);
}

/*
 * The busy time of the pass of the loop running at now, so far: since its
 * prepare phase, the callbacks of all its polls; *idle: idle_total().
 */
static uint64_t busy_so_far(uint64_t now, uint64_t *idle)
{
	uint64_t span = now - lm.last_now, idled;

	*idle = idle_total();
	idled = *idle - lm.last_idle;
	return span > idled ? span - idled : 0;
}

/* The busy time of the iteration running at now, so far. */
static uint64_t iteration_so_far(uint64_t now)
{
	uint64_t idle;

	return lm.waits_seen ? now - lm.busy_from : busy_so_far(now, &idle);
}

static void on_prepare(uv_prepare_t *h)
{
	uint64_t now = uv_hrtime(), idle;
	uint64_t busy = busy_so_far(now, &idle);

	(void)h;
	if (!lm.waits_seen)
		iteration_done(now, busy);	/* waits not seen: each pass is one */
	lm.last_now = now;
	lm.last_idle = idle;
}

/*
 * Pacing. core.loop_busy_ms() is how long the loop has been busy in this
 * pass of libuv's loop: the callbacks of its polls so far, most often one
 * (a frame that arrived meanwhile has waited at most that long).
 * core.after_poll(fn) runs fn() once, in the check phase after the loop's
 * next poll for I/O (not the poll whose callbacks may be running now), once
 * per pass however many polls it made; while any such function waits, an
 * idle handle keeps that poll from blocking. callagent.task.pace is built
 * on the two.
 */
struct ap_fn {
	int ref;
	uint64_t polls;	/* lm.iterations when it came: it waits for a later poll */
};

static struct {
	uv_check_t check;
	uv_idle_t idle;
	struct ap_fn *fns;
	int n, cap;
} ap;

static void on_idle(uv_idle_t *h)
{
	(void)h;	/* its being active is what counts: the poll does not block */
}

static void on_check(uv_check_t *h)
{
	lua_State *L = ca_lua();
	int k = 0;

	(void)h;
	/* In the order they came: those from before the last poll. */
	while (k < ap.n && ap.fns[k].polls < lm.iterations)
		k++;
	if (k == 0 || !L)
		return;
	/*
	 * What runs now may ask for a later poll: that lands after these k
	 * (ap.fns may move, so it is read afresh each time).
	 */
	for (int i = 0; i < k; i++)
		ca_call_ref(ap.fns[i].ref, 0, "after_poll callback");
	if ((L = ca_lua()))
		for (int i = 0; i < k; i++)
			ca_unref(L, &ap.fns[i].ref);
	ap.n -= k;
	memmove(ap.fns, ap.fns + k, (size_t)ap.n * sizeof *ap.fns);
	if (ap.n == 0) {
		uv_check_stop(&ap.check);
		uv_idle_stop(&ap.idle);
	}
}

static int core_after_poll(lua_State *L)
{
	luaL_checktype(L, 1, LUA_TFUNCTION);
	if (ap.n == ap.cap) {
		int cap = ap.cap ? ap.cap * 2 : 8;
		struct ap_fn *f = realloc(ap.fns, (size_t)cap * sizeof *f);

		if (!f)
			return luaL_error(L, "out of memory");
		ap.fns = f;
		ap.cap = cap;
	}
	ap.fns[ap.n].ref = ca_ref(L, 1);
	ap.fns[ap.n].polls = lm.iterations;
	if (++ap.n == 1) {
		uv_check_start(&ap.check, on_check);
		uv_idle_start(&ap.idle, on_idle);
	}
	return 0;
}

static int core_loop_busy_ms(lua_State *L)
{
	uint64_t idle;

	lua_pushnumber(L, busy_so_far(uv_hrtime(), &idle) / 1e6);
	return 1;
}

static void loop_monitor_start(void)
{
	uv_check_init(loop, &ap.check);
	uv_idle_init(loop, &ap.idle);
	lm.start = lm.last_now = lm.win_start = uv_hrtime();
	lm.window_ns = 10000000000ULL;
	lm.last_idle = idle_total();
	uv_prepare_init(loop, &lm.prep);
	uv_prepare_start(&lm.prep, on_prepare);
	uv_unref((uv_handle_t *)&lm.prep);
}

static void loop_monitor_stop(void)
{
	uv_prepare_stop(&lm.prep);
	uv_close((uv_handle_t *)&lm.prep, NULL);
	/* Functions still waiting for a poll go with the Lua state. */
	uv_check_stop(&ap.check);
	uv_idle_stop(&ap.idle);
	uv_close((uv_handle_t *)&ap.check, NULL);
	uv_close((uv_handle_t *)&ap.idle, NULL);
	free(ap.fns);
	ap.fns = NULL;
	ap.n = ap.cap = 0;
}

/*
 * core.loop_stats(): {utilization, max_iteration_ms, window_s} for the last
 * full window of at least 10 s (before the first, the time since start),
 * and since start: iterations, busy_s, slow (iterations busy 5 ms or more),
 * slow_s (their busy time), max_ms, uptime_s.
 */
static int core_loop_stats(lua_State *L)
{
	uint64_t now = uv_hrtime();
	/* The iteration running now counts so far, so that busy_s never grows
	 * faster than uptime_s between two readings. */
	uint64_t part = iteration_so_far(now);
	uint64_t busy = lm.busy_ns + part, slow = lm.slow_ns + (part >= LOOP_SLOW_NS ? part : 0);
	double util, max_ns, win_s;

	loop_roll(now);
	if (lm.have_last) {
		util = lm.last_util;
		max_ns = lm.last_max_ns;
		win_s = lm.last_sec;
	} else {
		win_s = (now - lm.win_start) / 1e9;
		util = win_s > 0 ? (busy - lm.win_busy) / 1e9 / win_s : 0;
		max_ns = (double)lm.win_max;
	}
	lua_createtable(L, 0, 9);
	lua_pushnumber(L, util > 1 ? 1 : util);
	lua_setfield(L, -2, "utilization");
	lua_pushnumber(L, max_ns / 1e6);
	lua_setfield(L, -2, "max_iteration_ms");
	lua_pushnumber(L, win_s);
	lua_setfield(L, -2, "window_s");
	ca_set_int_field(L, "iterations", (lua_Integer)lm.iterations);
	lua_pushnumber(L, busy / 1e9);
	lua_setfield(L, -2, "busy_s");
	ca_set_int_field(L, "slow", (lua_Integer)lm.slow);
	lua_pushnumber(L, slow / 1e9);
	lua_setfield(L, -2, "slow_s");
	lua_pushnumber(L, lm.max_ns / 1e6);
	lua_setfield(L, -2, "max_ms");
	lua_pushnumber(L, (now - lm.start) / 1e9);
	lua_setfield(L, -2, "uptime_s");
	return 1;
}

/*
 * core.loop_window(seconds): the length of loop_stats()'s windows (10), and a
 * new window from now. The app sets it once it has started, so its first
 * window does not hold the start-up's work.
 */
static int core_loop_window(lua_State *L)
{
	double sec = luaL_checknumber(L, 1);

	luaL_argcheck(L, sec >= 0.01 && sec <= 86400, 1, "seconds between 0.01 and 86400");
	lm.window_ns = (uint64_t)(sec * 1e9);
	lm.win_start = uv_hrtime();
	lm.win_busy = lm.busy_ns + iteration_so_far(lm.win_start);
	lm.win_max = 0;
	lm.have_last = 0;
	return 0;
}

/* core.time(): wall-clock seconds since the epoch, with sub-second precision. */
static int core_time(lua_State *L)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	lua_pushnumber(L, (lua_Number)ts.tv_sec + ts.tv_nsec / 1e9);
	return 1;
}

int luaopen_callagent_core(lua_State *L)
{
	static const luaL_Reg fns[] = {
		{"stop", core_stop},
		{"exit", core_exit},
		{"on_signal", core_on_signal},
		{"listdir", core_listdir},
		{"stat", core_stat},
		{"realpath", core_realpath},
		{"mkdir", core_mkdir},
		{"pid", core_pid},
		{"rss", core_rss},
		{"cpu", core_cpu},
		{"loop_stats", core_loop_stats},
		{"loop_window", core_loop_window},
		{"loop_busy_ms", core_loop_busy_ms},
		{"after_poll", core_after_poll},
		{"time", core_time},
		{NULL, NULL}
	};

	luaL_newlib(L, fns);
	lua_pushliteral(L, CA_VERSION);
	lua_setfield(L, -2, "version");
	lua_pushstring(L, root);
	lua_setfield(L, -2, "root");
	lua_pushstring(L, app_dir);
	lua_setfield(L, -2, "app_dir");
	return 1;
}

/* ---- signals ---- */

static void on_signal(uv_signal_t *h, int signum)
{
	const char *name = signum == SIGINT ? "SIGINT" : signum == SIGHUP ? "SIGHUP" : "SIGTERM";

	(void)h;
	if (++signals_seen > 1 || stopping) {
		ca_log(CA_LOG_WARN, "second signal %s: exiting now", name);
		ca__log_flush();
		ca__kill_children();	/* a tunnel must not outlive us */
		_exit(128 + signum);
	}
	if (signal_ref == LUA_NOREF) {
		ca_log(CA_LOG_INFO, "signal %s: stopping", name);
		begin_stop(0);
		return;
	}
	lua_pushstring(mainL, name);
	ca_call_ref(signal_ref, 1, "signal handler");
}

/*
 * A second signal while the loop is stuck (an app's own endless loop, at its
 * top level or in a handler) never reaches on_signal: libuv's handler only
 * writes it into a pipe the loop reads. So the signals are counted as they
 * come too, in a handler of ours in front of libuv's, and the second one
 * arms an alarm: if the loop has not exited on it within a second, the alarm
 * exits. The children started with kill_on_exit get their SIGTERM from the
 * kernel then (PR_SET_PDEATHSIG); nothing else here is safe in a handler.
 */
#define STUCK_EXIT_SEC 1

static const int watched[] = {SIGINT, SIGTERM, SIGHUP};
static struct sigaction uv_act[3];	/* libuv's handlers for them */
static volatile sig_atomic_t raw_seen, raw_last;

static void on_stuck_alarm(int signum)
{
	static const char msg[] = "callagent: second signal, and the event loop did not take it within "
		"a second: exiting now\n";
	ssize_t n;

	(void)signum;
	n = write(2, msg, sizeof msg - 1);
	(void)n;
	_exit(128 + raw_last);
}

static void raw_signal(int signum, siginfo_t *info, void *ctx)
{
	int e = errno;

	raw_last = signum;
	if (++raw_seen == 2) {
		struct sigaction sa;

		memset(&sa, 0, sizeof sa);
		sa.sa_handler = on_stuck_alarm;
		sigemptyset(&sa.sa_mask);
		sigaction(SIGALRM, &sa, NULL);
		alarm(STUCK_EXIT_SEC);
	}
	for (int i = 0; i < 3; i++) {
		if (watched[i] != signum)
			continue;
		if (uv_act[i].sa_flags & SA_SIGINFO)
			uv_act[i].sa_sigaction(signum, info, ctx);
		else if (uv_act[i].sa_handler != SIG_DFL && uv_act[i].sa_handler != SIG_IGN)
			uv_act[i].sa_handler(signum);
	}
	errno = e;
}

/* After uv_signal_start: raw_signal goes in front of libuv's handlers. */
static void count_raw_signals(void)
{
	for (int i = 0; i < 3; i++) {
		struct sigaction sa;

		if (sigaction(watched[i], NULL, &uv_act[i]) != 0)
			continue;
		sa = uv_act[i];
		sa.sa_sigaction = raw_signal;
		sa.sa_flags = (uv_act[i].sa_flags & ~SA_RESETHAND) | SA_SIGINFO;
		sigaction(watched[i], &sa, NULL);
	}
}

/* ---- run ---- */

static int run_app(int argc, char **argv)
{
	lua_State *L;
	char *appdir = app_dir, *slash;
	const char *script = argv[0];
	int rc;

	if (!realpath(script, appdir)) {
		fprintf(stderr, "callagent: cannot open %s: %s\n", script, strerror(errno));
		return 2;
	}
	slash = strrchr(appdir, '/');
	if (slash)
		*slash = '\0';

	mainL = L = luaL_newstate();
	if (L == NULL) {
		fputs("callagent: cannot create the Lua state\n", stderr);
		return 1;
	}
	luaL_openlibs(L);
	preload(L);
	set_paths(L, appdir);

	/* arg: [-2] program, [-1] "run", [0] script, [1..] args */
	lua_createtable(L, argc, 3);
	lua_pushstring(L, "callagent");
	lua_rawseti(L, -2, -2);
	lua_pushliteral(L, "run");
	lua_rawseti(L, -2, -1);
	for (int i = 0; i < argc; i++) {
		lua_pushstring(L, argv[i]);
		lua_rawseti(L, -2, i);
	}
	lua_setglobal(L, "arg");

	loop_monitor_start();
	uv_signal_init(loop, &sig_int);
	uv_signal_init(loop, &sig_term);
	uv_signal_init(loop, &sig_hup);
	uv_signal_start(&sig_int, on_signal, SIGINT);
	uv_signal_start(&sig_term, on_signal, SIGTERM);
	/*
	 * A closed terminal: the children, in sessions of their own (process.c),
	 * no longer get its SIGHUP, so callagent must not just die of it.
	 */
	uv_signal_start(&sig_hup, on_signal, SIGHUP);
	count_raw_signals();
	uv_unref((uv_handle_t *)&sig_int);
	uv_unref((uv_handle_t *)&sig_term);
	uv_unref((uv_handle_t *)&sig_hup);

	rc = luaL_loadfile(L, script);
	if (rc != LUA_OK) {
		ca__log_fatal("%s", lua_tostring(L, -1));
		/* A file it cannot read (a folder, no permission) is a usage
		 * error, as a missing one is; a syntax error is the app's. */
		exit_code = rc == LUA_ERRFILE ? 2 : 1;
		goto out;
	}
	for (int i = 1; i < argc; i++)
		lua_pushstring(L, argv[i]);
	{
		/* The top level of the app: an error here is fatal, with its traceback. */
		int base = lua_gettop(L) - (argc - 1);

		lua_pushcfunction(L, ca_traceback);
		lua_insert(L, base);
		rc = lua_pcall(L, argc - 1, 0, base);
		if (rc != LUA_OK) {
			const char *msg = lua_tostring(L, -1);

			ca__log_fatal("error in %s: %s", script, msg ? msg : "?");
			exit_code = 1;
			goto out;
		}
		lua_settop(L, 0);
	}

	if (!stopping)
		uv_run(loop, UV_RUN_DEFAULT);

out:
	stopping = 1;
	uv_signal_stop(&sig_int);
	uv_signal_stop(&sig_term);
	uv_signal_stop(&sig_hup);
	uv_close((uv_handle_t *)&sig_int, NULL);
	uv_close((uv_handle_t *)&sig_term, NULL);
	uv_close((uv_handle_t *)&sig_hup, NULL);
	loop_monitor_stop();
	ca_unref(L, &signal_ref);

	/*
	 * Teardown: closing the state runs every __gc, which starts closing
	 * the handles each module owns; the loop then finishes those closes.
	 */
	lua_close(L);
	mainL = NULL;
	for (int i = n_at_close - 1; i >= 0; i--)
		at_close[i]();
	/*
	 * The log's queue is written now, and later lines at once: the loop
	 * must not wait for a stderr reader that has stopped reading (the
	 * flush waits for it a second at most).
	 */
	ca__log_flush();
	/* The first run uses up a stop requested before the loop ever ran. */
	uv_run(loop, UV_RUN_NOWAIT);
	while (uv_loop_alive(loop) && !only_abandonable_left())
		uv_run(loop, UV_RUN_ONCE);
	ca__log_flush();
	if (uv_loop_alive(loop)) {
		/*
		 * A lookup is still running in libuv's thread pool: returning
		 * would join its threads at exit (and wait for the resolver's
		 * timeout with a dead DNS server). Everything else is done.
		 */
		fflush(NULL);
		_exit(exit_code);
	}
	return exit_code;
}

/*
 * Every open WebSocket holds two descriptors (lws's, and the duplicate
 * callagent reads, see src/wsconn.c), so a call holds four: the usual soft
 * limit of 1024 would stop a process at about 250 calls. It is raised to
 * the hard limit, up to 65536 (lws sizes its tables by it).
 */
static void raise_fd_limit(void)
{
	struct rlimit rl;
	rlim_t want;

	if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
		return;
	want = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > 65536 ? 65536 : rl.rlim_max;
	if (rl.rlim_cur < want) {
		rl.rlim_cur = want;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

/*
 * Started with stdin, stdout or stderr closed (`callagent run app.lua
 * >&- 2>&-`), the first files and sockets opened would take their numbers:
 * log lines and print() would go into them, and libuv, which never closes
 * fds 0-2, aborted at exit closing one of its own there. /dev/null fills
 * each one that is closed.
 */
static void open_std_fds(void)
{
	for (int fd = 0; fd <= 2; fd++) {
		int n;

		if (fcntl(fd, F_GETFD) != -1 || errno != EBADF)
			continue;
		n = open("/dev/null", O_RDWR);	/* the lowest free number: fd itself */
		if (n >= 0 && n != fd) {
			dup2(n, fd);
			close(n);
		}
	}
}

int main(int argc, char **argv)
{
	int rc;

	open_std_fds();
	/* A child's wrapper (src/process.c): before anything changes signals or limits. */
	if (argc > 1 && strcmp(argv[1], "--pdeathsig") == 0)
		return ca__pdeathsig_main(argc, argv);
	signal(SIGPIPE, SIG_IGN);
	if (argc < 2) {
		usage(stderr);
		return 2;
	}
	if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
		usage(stdout);
		return 0;
	}
	if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "-v") || !strcmp(argv[1], "version")) {
		printf("callagent %s (%s, libuv %s)\n", CA_VERSION, LUA_RELEASE, uv_version_string());
		return 0;
	}
	if (strcmp(argv[1], "run") != 0) {
		fprintf(stderr, "callagent: unknown command '%s'\n\n", argv[1]);
		usage(stderr);
		return 2;
	}
	if (argc < 3) {
		fputs("callagent: run needs the app file, e.g. callagent run app.lua\n", stderr);
		return 2;
	}

	find_root();
	raise_fd_limit();
	loop = uv_default_loop();
	uv_loop_configure(loop, UV_METRICS_IDLE_TIME);	/* for core.loop_stats() */
	{
		const char *lvl = getenv("CALLAGENT_LOG");

		if (lvl && *lvl) {
			static const char *names[] = {"debug", "info", "warn", "error"};
			int found = -1;

			for (int i = 0; i < 4; i++)
				if (!strcmp(lvl, names[i]))
					found = i;
			if (found < 0) {
				fprintf(stderr, "callagent: CALLAGENT_LOG must be debug, info, warn or error, not '%s'\n", lvl);
				return 2;
			}
			ca__log_set_level(found);
		}
	}
	{
		const char *fmt = getenv("CALLAGENT_LOG_FORMAT");

		if (fmt && *fmt && ca__log_set_format(fmt) != 0) {
			fprintf(stderr, "callagent: CALLAGENT_LOG_FORMAT must be text or json, not '%s'\n", fmt);
			return 2;
		}
	}
	rc = run_app(argc - 2, argv + 2);
	return rc;
}
