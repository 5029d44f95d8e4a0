/*
 * process.c - callagent.core.process: child processes on libuv (uv_spawn + pipes).
 *
 *   p = process.spawn(spec, on_stdout, on_stderr, on_exit, on_eof)
 *       spec[1] the program (a name without "/" is searched in PATH: the
 *       PATH of spec.env if it sets one, else callagent's own), spec[2..]
 *       its arguments; spec.env {NAME = value | false}: replaces the
 *       environment, or with spec.inherit_env = true is merged over
 *       callagent's (false removes a name); spec.cwd; spec.stdin (true: a
 *       pipe for p:write, else /dev/null); spec.max_stdin (default 1 MiB:
 *       the most bytes p:write leaves queued for a child that has not read
 *       them); spec.max_line (default 65536:
 *       longer lines come in pieces of that size); spec.kill_on_exit
 *       (default true: SIGTERM at callagent's teardown if still running,
 *       and when callagent dies without one - SIGKILL, a crash: the child
 *       is started through a wrapper (callagent-pdeathsig, else
 *       "callagent --pdeathsig": see wrapper_exe), which sets
 *       PR_SET_PDEATHSIG and execs the program, so its pid is the program's);
 *       spec.drop_secrets (default false: the child gets no inherited
 *       variable whose value holds a secret registered with the log).
 *       on_stdout(line) / on_stderr(line): a function gets each line without
 *       its "\n" (or "\r\n"); a final line without newline comes at EOF;
 *       nil or false sends that stream to /dev/null.
 *       on_eof(stream) (may be nil) runs when the child closes "stdout" or
 *       "stderr" (a pipe that is read), after that stream's last line; the
 *       child may still run.
 *       on_exit(code, signal) (may be nil) runs once the child has exited
 *       AND both output pipes reached EOF, after every line callback:
 *       code is the exit status (nil if a signal ended it), signal the
 *       signal's name ("SIGTERM") or nil.
 *       Returns p, or nil, "ECODE: message" if the child cannot be started
 *       (ENOENT: program or cwd missing, EACCES, ...). Bad arguments raise.
 *   p:pid()            the child's process id
 *   p:running()        true until the child has exited
 *   p:write(data)      queues data for the child's stdin (never blocks):
 *                      true, or nil, "EBADF: ..." (no stdin pipe) / "EPIPE: ..."
 *                      / "ENOBUFS: ..." (more than max_stdin bytes would
 *                      wait: none of data is taken, stdin stays open;
 *                      a write longer than max_stdin is refused always)
 *   p:buffered()       bytes queued for stdin that the child has not taken
 *   p:close_stdin()    ends stdin after the queued data (the child reads EOF)
 *   p:kill([sig])      sig a name ("SIGTERM", "TERM") or number, default
 *                      SIGTERM, to the child's process group: true, or nil,
 *                      "ESRCH: ..." once its group is empty (a grandchild
 *                      that outlived its wrapper still gets the signal,
 *                      whether it holds the output pipes or, the child
 *                      complete, none; one that left the group, setsid, is
 *                      out of reach, and keeps the child incomplete while it
 *                      holds the pipes)
 *
 * Each child leads a process group of its own (a new session), and every
 * signal goes to the group: what a wrapper script started (npm, a shell that
 * does not exec) stops with it. Nor does a terminal's Ctrl-C reach the
 * children: callagent stops them.
 *
 * Lifetime: the child and its callbacks live until it has exited and its
 * pipes are drained, whether or not the userdata is still referenced; then
 * every handle is closed and the memory freed. __gc at teardown
 * (ca_stopping()) sends SIGTERM to a running child with kill_on_exit and
 * closes everything; children whose userdata was already collected are
 * handled by the module's ca__at_close hook. That hook then gives the
 * groups so signalled a second (EXIT_GRACE_MS) to end, and SIGKILLs what is
 * left of them: what ignores SIGTERM (a grandchild that traps it) does not
 * outlive callagent. The groups of kill_on_exit children that completed
 * with members left in them (holding none of the pipes: see left_groups)
 * get the same SIGTERM, then SIGKILL.
 *
 * callagent.process (lua/callagent/process.lua) adds wait() and read_line().
 */
#define _GNU_SOURCE	/* pipe2 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ca.h"

#define PROCESS_MT "callagent.Process"
#define READ_CHUNK 16384	/* the least free space offered to each read */

extern char **environ;

/*
 * One output pipe of a child (stdout or stderr), embedded in its ca_proc.
 * buf holds the unfinished line (at most max_line + 1 bytes between
 * reads) and is freed with the ca_proc.
 */
struct out_pipe {
	uv_pipe_t h;
	char *buf;
	size_t len, cap;
	int fn_ref;
	int open;	/* initialized, so it needs a uv_close */
	int done;	/* EOF seen (or never read: /dev/null) */
	const char *where;
};

/*
 * One child process. Allocated by spawn(); libuv owns it from then on and
 * it is freed in the close callback of its last handle, after completion
 * (exit + EOF on both pipes) or teardown. The userdata points at it through
 * a box that is cleared when either side goes away first.
 */
struct ca_proc {
	uv_process_t h;
	struct out_pipe out, err;
	uv_pipe_t in;
	uv_shutdown_t shut;
	struct proc_box *box;
	struct ca_proc *prev, *next;	/* the list of live children, for teardown */
	size_t max_line;
	size_t max_stdin;	/* the most bytes p:write leaves queued for stdin */
	int exit_ref;
	int eof_ref;	/* on_eof(stream), or LUA_NOREF */
	int in_state;	/* IN_NONE, IN_OPEN, IN_CLOSING (shutdown or closing) */
	int in_err;	/* the error that ended stdin, for later writes */
	int exited;
	int term_signal;	/* 0 if it exited by itself */
	int64_t exit_status;
	int closing;	/* close_all has run */
	int pending;	/* uv_close calls whose callback has not run yet */
	int kill_on_exit;
};

enum { IN_NONE, IN_OPEN, IN_CLOSING };

/* The userdata: a pointer that is NULL once the child's memory is gone. */
struct proc_box {
	struct ca_proc *p;
	lua_Integer pid;
};

/* A queued stdin write with its bytes behind it; freed in its callback. */
struct write_req {
	uv_write_t req;
	char data[];
};

static struct ca_proc *live;	/* head of the list of children not yet freed */
static int hooked;

/* ---- signal names ---- */

static const struct {
	const char *name;
	int sig;
} signals[] = {
	{"SIGHUP", SIGHUP}, {"SIGINT", SIGINT}, {"SIGQUIT", SIGQUIT},
	{"SIGILL", SIGILL}, {"SIGTRAP", SIGTRAP}, {"SIGABRT", SIGABRT},
	{"SIGBUS", SIGBUS}, {"SIGFPE", SIGFPE}, {"SIGKILL", SIGKILL},
	{"SIGUSR1", SIGUSR1}, {"SIGSEGV", SIGSEGV}, {"SIGUSR2", SIGUSR2},
	{"SIGPIPE", SIGPIPE}, {"SIGALRM", SIGALRM}, {"SIGTERM", SIGTERM},
	{"SIGCHLD", SIGCHLD}, {"SIGCONT", SIGCONT}, {"SIGSTOP", SIGSTOP},
	{"SIGTSTP", SIGTSTP}, {"SIGTTIN", SIGTTIN}, {"SIGTTOU", SIGTTOU},
	{"SIGURG", SIGURG}, {"SIGXCPU", SIGXCPU}, {"SIGXFSZ", SIGXFSZ},
	{"SIGVTALRM", SIGVTALRM}, {"SIGPROF", SIGPROF}, {"SIGWINCH", SIGWINCH},
	{"SIGIO", SIGIO}, {"SIGSYS", SIGSYS},
};

static void push_signal_name(lua_State *L, int sig)
{
	for (size_t i = 0; i < sizeof signals / sizeof signals[0]; i++)
		if (signals[i].sig == sig) {
			lua_pushstring(L, signals[i].name);
			return;
		}
	lua_pushfstring(L, "SIG%d", sig);
}

/* The signal number for a name ("SIGTERM" or "TERM") or number; raises if unknown. */
static int check_signal(lua_State *L, int idx)
{
	const char *name;

	if (lua_isnoneornil(L, idx))
		return SIGTERM;
	if (lua_type(L, idx) == LUA_TNUMBER) {
		lua_Integer n = luaL_checkinteger(L, idx);

		luaL_argcheck(L, n >= 0 && n < 65, idx, "signal number out of range");
		return (int)n;
	}
	name = luaL_checkstring(L, idx);
	for (size_t i = 0; i < sizeof signals / sizeof signals[0]; i++)
		if (!strcmp(name, signals[i].name) || !strcmp(name, signals[i].name + 3))
			return signals[i].sig;
	return luaL_argerror(L, idx, lua_pushfstring(L, "unknown signal '%s'", name));
}

/* ---- closing ---- */

static void unlink_proc(struct ca_proc *p)
{
	if (p->prev)
		p->prev->next = p->next;
	else
		live = p->next;
	if (p->next)
		p->next->prev = p->prev;
}

static void on_handle_close(uv_handle_t *h)
{
	struct ca_proc *p = h->data;

	if (--p->pending > 0 || !p->closing)
		return;
	unlink_proc(p);
	if (p->box)
		p->box->p = NULL;
	free(p->out.buf);
	free(p->err.buf);
	free(p);
}

static void close_handle(struct ca_proc *p, uv_handle_t *h)
{
	if (uv_is_closing(h))
		return;
	p->pending++;
	uv_close(h, on_handle_close);
}

/*
 * Releases the callbacks and closes every handle; the memory goes with the
 * last close callback. Idempotent. Lua is touched only while it is open.
 */
static void close_all(struct ca_proc *p)
{
	lua_State *L = ca_lua();

	if (p->closing)
		return;
	p->closing = 1;
	if (L) {
		ca_unref(L, &p->out.fn_ref);
		ca_unref(L, &p->err.fn_ref);
		ca_unref(L, &p->exit_ref);
		ca_unref(L, &p->eof_ref);
	}
	if (p->out.open)
		close_handle(p, (uv_handle_t *)&p->out.h);
	if (p->err.open)
		close_handle(p, (uv_handle_t *)&p->err.h);
	if (p->in_state != IN_NONE) {
		close_handle(p, (uv_handle_t *)&p->in);
		p->in_state = IN_CLOSING;
	}
	/* Called only after uv_spawn, so this close always frees p at last. */
	close_handle(p, (uv_handle_t *)&p->h);
}

/*
 * Whether no process has this pid (kill: ESRCH). Linux gives a new process
 * no pid that is still a process group's id. So once we have reaped a
 * group's leader (a child of ours), a process with its pid is someone
 * else's - our group emptied, and the id was reused - and so is the group
 * that process may lead: a group of ours is signalled only while this
 * holds (tests/test_process.lua, "a kept group whose id ...", reuses the
 * id in a pid namespace of its own). Left out, as too unlikely to guard: a
 * group so made whose leader has gone again, its other members left.
 */
static int no_process(pid_t pid)
{
	return kill(pid, 0) != 0 && errno == ESRCH;
}

/*
 * sig to the child's process group, or to the child alone if that fails.
 * Once the child is reaped, only while its id is no other process's.
 */
static int signal_child(struct ca_proc *p, int sig)
{
	if (p->exited && p->h.pid > 0 && !no_process(p->h.pid))
		return UV_ESRCH;
	if (p->h.pid > 0 && kill(-p->h.pid, sig) == 0)
		return 0;
	if (p->exited)	/* its group is empty by now */
		return UV_ESRCH;
	return uv_process_kill(&p->h, sig);
}

/*
 * Descriptors opened without O_CLOEXEC - libcurl's sockets and the socketpair
 * its multi handle wakes up with - would be inherited by every child (a
 * keep-alive connection held open by ngrok): marked before each spawn.
 */
static void cloexec_all(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;

	if (d == NULL)
		return;
	while ((e = readdir(d)) != NULL) {
		int fd = atoi(e->d_name), fl;

		if (fd > 2 && fd != dirfd(d) && (fl = fcntl(fd, F_GETFD)) >= 0 && !(fl & FD_CLOEXEC))
			fcntl(fd, F_SETFD, fl | FD_CLOEXEC);
	}
	closedir(d);
}

/*
 * Whether the child, or something it started that still holds its output
 * pipes (a grandchild that outlived its wrapper), may be running: its
 * process group may still have members. The group's id cannot be a new
 * process's while it has members.
 */
static int may_run(const struct ca_proc *p)
{
	return !p->exited || !(p->out.done && p->err.done);
}

/* Process groups sent SIGTERM at teardown, SIGKILLed if still there after EXIT_GRACE_MS. */
#define EXIT_GRACE_MS 1000
struct exit_group {
	pid_t pgid;	/* 0 once the group is empty */
	int reaped;	/* its leader is: see no_process */
};
static struct exit_group *exit_groups;
static size_t n_exit_groups, exit_groups_cap;

static void add_exit_group(pid_t pgid, int reaped)
{
	if (n_exit_groups == exit_groups_cap) {
		exit_groups_cap = exit_groups_cap ? 2 * exit_groups_cap : 8;
		exit_groups = ca_realloc(exit_groups, exit_groups_cap * sizeof *exit_groups);
	}
	exit_groups[n_exit_groups].pgid = pgid;
	exit_groups[n_exit_groups++].reaped = reaped;
}

/* SIGTERM to a child with kill_on_exit that may still run (callagent is ending). */
static void term_on_exit(struct ca_proc *p)
{
	if (!p->kill_on_exit || !may_run(p) || p->closing || signal_child(p, SIGTERM) != 0)
		return;
	if (ca_stopping() && p->h.pid > 0)
		add_exit_group(p->h.pid, p->exited);
}

/*
 * Whether a process group has a member that is not a zombie (a killed
 * orphan stays one where the container's init does not reap).
 */
static int group_alive(pid_t pgid)
{
	DIR *d = opendir("/proc");
	struct dirent *e;
	int alive = 0;

	if (d == NULL)
		return kill(-pgid, 0) == 0;
	while (!alive && (e = readdir(d)) != NULL) {
		char path[300], buf[512];
		const char *rp;
		FILE *f;
		char state;
		int pgrp;

		if (e->d_name[0] < '1' || e->d_name[0] > '9')
			continue;
		snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
		if ((f = fopen(path, "re")) == NULL)
			continue;
		rp = fgets(buf, sizeof buf, f) ? strrchr(buf, ')') : NULL;
		/* pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses */
		if (rp && sscanf(rp + 1, " %c %*d %d", &state, &pgrp) == 2 && pgrp == pgid && state != 'Z' &&
		    state != 'X')
			alive = 1;
		fclose(f);
	}
	closedir(d);
	return alive;
}

/*
 * Whether a group whose leader was reaped still has a member that is not a
 * zombie, and is still ours (no_process): kill with no signal, then (it
 * succeeds for zombies, which a container's init may never reap) a look
 * at /proc.
 */
static int left_alive(pid_t pgid)
{
	return no_process(pgid) && kill(-pgid, 0) == 0 && group_alive(pgid);
}

/* Waits up to EXIT_GRACE_MS for the groups sent SIGTERM at teardown to end; SIGKILL for the rest. */
static void end_exit_groups(void)
{
	uint64_t deadline = uv_hrtime() + (uint64_t)EXIT_GRACE_MS * 1000000;
	size_t left = n_exit_groups;

	while (left) {
		left = 0;
		for (size_t i = 0; i < n_exit_groups; i++) {
			struct exit_group *g = &exit_groups[i];

			if (g->pgid == 0)
				continue;
			/* The leader, if it exited since: libuv's handle is closed, nobody else reaps it. */
			if (!g->reaped) {
				pid_t w = waitpid(g->pgid, NULL, WNOHANG);

				g->reaped = w == g->pgid || (w < 0 && errno == ECHILD);
			}
			if (g->reaped ? left_alive(g->pgid) : group_alive(g->pgid))
				left++;
			else
				g->pgid = 0;
		}
		if (left == 0 || uv_hrtime() >= deadline)
			break;
		usleep(10000);
	}
	for (size_t i = 0; i < n_exit_groups; i++) {
		struct exit_group *g = &exit_groups[i];

		if (g->pgid == 0 || (g->reaped && !no_process(g->pgid)))
			continue;
		ca_log(CA_LOG_WARN, "process group %d still running %d ms after SIGTERM at exit: SIGKILL",
		       (int)g->pgid, EXIT_GRACE_MS);
		kill(-g->pgid, SIGKILL);
	}
	free(exit_groups);
	exit_groups = NULL;
	n_exit_groups = exit_groups_cap = 0;
}

/*
 * The process groups of children that completed with members of theirs
 * still there - what the child started with its output elsewhere (a daemon
 * writing to /dev/null) holds none of the pipes, so the child's end did not
 * wait for it. p:kill still reaches such a group, and callagent's exit ends
 * those of kill_on_exit children as it ends a running child's. An entry
 * goes once its group is empty or its id another process's (left_alive:
 * checked as entries are added, and before each signal), or when a new
 * child gets its id (it was free then).
 */
struct left_group {
	pid_t pgid;
	int kill_on_exit;
};
static struct left_group *left_groups;
static size_t n_left, left_cap;

static void forget_group(pid_t pgid)
{
	size_t j = 0;

	for (size_t i = 0; i < n_left; i++)
		if (left_groups[i].pgid != pgid)
			left_groups[j++] = left_groups[i];
	n_left = j;
}

static int left_over(pid_t pgid)
{
	for (size_t i = 0; i < n_left; i++)
		if (left_groups[i].pgid == pgid)
			return 1;
	return 0;
}

/* At a child's completion (its leader reaped): keeps its group if it has members. */
static void keep_group(struct ca_proc *p)
{
	size_t j = 0;

	if (p->h.pid <= 0 || !left_alive(p->h.pid))
		return;
	for (size_t i = 0; i < n_left; i++)
		if (left_groups[i].pgid != p->h.pid && left_alive(left_groups[i].pgid))
			left_groups[j++] = left_groups[i];
	n_left = j;
	if (n_left == left_cap) {
		left_cap = left_cap ? 2 * left_cap : 8;
		left_groups = ca_realloc(left_groups, left_cap * sizeof *left_groups);
	}
	left_groups[n_left].pgid = p->h.pid;
	left_groups[n_left++].kill_on_exit = p->kill_on_exit;
}

/*
 * SIGTERM to the groups kept of completed kill_on_exit children (callagent
 * is ending), once: the list is emptied.
 */
static void term_left_groups(void)
{
	for (size_t i = 0; i < n_left; i++)
		if (left_groups[i].kill_on_exit && left_alive(left_groups[i].pgid) &&
		    kill(-left_groups[i].pgid, SIGTERM) == 0 && ca_stopping())
			add_exit_group(left_groups[i].pgid, 1);
	free(left_groups);
	left_groups = NULL;
	n_left = left_cap = 0;
}

/*
 * SIGTERM to every running child with kill_on_exit (a forced exit), and to
 * what is left of the groups of those that completed.
 */
void ca__kill_children(void)
{
	for (struct ca_proc *p = live; p; p = p->next)
		term_on_exit(p);
	term_left_groups();
}

/* Teardown hook: children whose userdata is gone are stopped and closed too. */
static void at_close(void)
{
	struct ca_proc *p = live;

	while (p) {
		struct ca_proc *next = p->next;

		term_on_exit(p);
		close_all(p);
		p = next;
	}
	term_left_groups();
	end_exit_groups();
}

/*
 * Delivers on_exit once the child has exited and both pipes are drained,
 * after closing every handle (so p:write and p:running see the end).
 */
static void maybe_complete(struct ca_proc *p)
{
	lua_State *L = ca_lua();
	int call = 0;

	if (p->closing || !p->exited || !p->out.done || !p->err.done)
		return;
	if (L && p->exit_ref != LUA_NOREF) {
		/* Stack: on_exit, code | nil, signal name | nil. */
		lua_rawgeti(L, LUA_REGISTRYINDEX, p->exit_ref);
		if (p->term_signal) {
			lua_pushnil(L);
			push_signal_name(L, p->term_signal);
		} else {
			lua_pushinteger(L, (lua_Integer)p->exit_status);
			lua_pushnil(L);
		}
		call = 1;
	}
	keep_group(p);
	close_all(p);
	if (call)
		ca_call(L, 2, 0, "process on_exit");
}

/* ---- output: lines ---- */

/*
 * Calls the pipe's function with data[0..n) in pieces of at most max_line
 * bytes (one call for an empty line). Returns 0 if the process began
 * closing meanwhile (a callback may end the program), else 1.
 */
static int emit(struct ca_proc *p, struct out_pipe *s, const char *data, size_t n)
{
	lua_State *L = ca_lua();

	do {
		size_t k = n < p->max_line ? n : p->max_line;

		if (L == NULL || s->fn_ref == LUA_NOREF)
			return 0;
		lua_rawgeti(L, LUA_REGISTRYINDEX, s->fn_ref);
		lua_pushlstring(L, data, k);
		ca_call(L, 1, 0, s->where);
		if (p->closing)
			return 0;
		data += k;
		n -= k;
	} while (n > 0);
	return 1;
}

/*
 * Delivers the complete lines in s->buf (new bytes start at scan) and keeps
 * the unfinished rest at the front of the buffer.
 */
static void split_lines(struct ca_proc *p, struct out_pipe *s, size_t scan)
{
	char *b = s->buf, *nl;
	size_t pos = 0, rest;

	while (scan < s->len && (nl = memchr(b + scan, '\n', s->len - scan)) != NULL) {
		size_t end = (size_t)(nl - b), n = end - pos;

		if (n > 0 && b[end - 1] == '\r')
			n--;
		if (!emit(p, s, b + pos, n))
			return;
		pos = scan = end + 1;
	}
	/*
	 * An unfinished line longer than max_line goes out in pieces now; a
	 * trailing "\r" is not counted, as it may be half of a "\r\n".
	 */
	for (;;) {
		rest = s->len - pos;
		if (rest > 0 && b[s->len - 1] == '\r')
			rest--;
		if (rest <= p->max_line)
			break;
		if (!emit(p, s, b + pos, p->max_line))
			return;
		pos += p->max_line;
	}
	if (pos > 0) {
		memmove(b, b + pos, s->len - pos);
		s->len -= pos;
	}
}

static struct out_pipe *pipe_of(struct ca_proc *p, uv_handle_t *h)
{
	return (uv_pipe_t *)h == &p->out.h ? &p->out : &p->err;
}

/*
 * Reads go straight into the line buffer, which always offers at least
 * READ_CHUNK bytes; it grows (doubling) only while a long line is pending,
 * up to max_line + 1 + READ_CHUNK.
 */
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
	struct ca_proc *p = h->data;
	struct out_pipe *s = pipe_of(p, h);

	(void)suggested;
	if (s->cap - s->len < READ_CHUNK) {
		size_t cap = s->cap * 2, most = p->max_line + 1 + READ_CHUNK;

		if (cap > most)
			cap = most;
		if (cap < s->len + READ_CHUNK)
			cap = s->len + READ_CHUNK;
		s->buf = ca_realloc(s->buf, cap);
		s->cap = cap;
	}
	*buf = uv_buf_init(s->buf + s->len, (unsigned)(s->cap - s->len));
}

/* EOF (or a read error): the last unfinished line, then maybe on_exit. */
static void finish_pipe(struct ca_proc *p, struct out_pipe *s)
{
	lua_State *L = ca_lua();
	size_t n = s->len;

	s->len = 0;
	if (n > 0 && s->buf[n - 1] == '\r')
		n--;
	if (n > 0 && !emit(p, s, s->buf, n))
		return;
	s->done = 1;
	close_handle(p, (uv_handle_t *)&s->h);
	if (L && p->eof_ref != LUA_NOREF) {
		lua_rawgeti(L, LUA_REGISTRYINDEX, p->eof_ref);
		lua_pushstring(L, s == &p->out ? "stdout" : "stderr");
		ca_call(L, 1, 0, "process on_eof");
	}
	maybe_complete(p);
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
	struct ca_proc *p = st->data;
	struct out_pipe *s = pipe_of(p, (uv_handle_t *)st);

	(void)buf;
	if (nread > 0) {
		size_t old = s->len;

		s->len += (size_t)nread;
		split_lines(p, s, old);
		return;
	}
	if (nread == 0)
		return;
	if (nread != UV_EOF)
		ca_log(CA_LOG_DEBUG, "process %d: reading %s: %s", p->h.pid,
		       s == &p->out ? "stdout" : "stderr", uv_strerror((int)nread));
	finish_pipe(p, s);
}

static void on_child_exit(uv_process_t *h, int64_t status, int sig)
{
	struct ca_proc *p = h->data;

	p->exited = 1;
	p->exit_status = status;
	p->term_signal = sig;
	maybe_complete(p);
}

/* ---- stdin ---- */

/* Ends stdin after an error; later writes report err. */
static void stdin_failed(struct ca_proc *p, int err)
{
	p->in_err = err;
	if (p->in_state == IN_OPEN) {
		p->in_state = IN_CLOSING;
		close_handle(p, (uv_handle_t *)&p->in);
	}
}

static void on_write(uv_write_t *req, int status)
{
	struct ca_proc *p = req->handle->data;

	free(req);	/* the write_req, whose first member req is */
	if (status < 0 && status != UV_ECANCELED) {
		ca_log(CA_LOG_DEBUG, "process %d: writing stdin: %s", p->h.pid, uv_strerror(status));
		stdin_failed(p, status);
	}
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
	struct ca_proc *p = req->handle->data;

	if (status < 0 && status != UV_ECANCELED)
		ca_log(CA_LOG_DEBUG, "process %d: closing stdin: %s", p->h.pid, uv_strerror(status));
	close_handle(p, (uv_handle_t *)req->handle);
}

/* ---- spawn ---- */

/*
 * The path by which callagent sees file where the child, started in cwd,
 * will: file itself, or cwd/file (in buf) for a relative one; NULL if that
 * does not fit.
 */
static const char *seen_from(char *buf, size_t size, const char *file, const char *cwd)
{
	int n;

	if (file[0] == '/' || cwd == NULL)
		return file;
	n = snprintf(buf, size, "%s/%s", cwd, file);
	return n > 0 && (size_t)n < size ? buf : NULL;
}

/*
 * Pushes the file to execute for name: as given if it has a "/", else the
 * first regular, executable file of that name in path (a relative name or
 * PATH entry is looked up from cwd, where the child's exec looks). Returns
 * 0, or a libuv error (nothing pushed): UV_ENOENT, or UV_EACCES if only
 * non-executable files matched (or, for a path, it is not a regular
 * executable file).
 */
static int resolve(lua_State *L, const char *name, const char *path, const char *cwd)
{
	char buf[4096], at[4096];
	int err = UV_ENOENT;
	const char *d = path ? path : "/usr/local/bin:/usr/bin:/bin", *f;
	struct stat cst;

	/* A cwd the child cannot enter: uv_spawn's chdir error says so. */
	if (cwd && (stat(cwd, &cst) != 0 || !S_ISDIR(cst.st_mode) || access(cwd, X_OK) != 0)) {
		lua_pushstring(L, name);
		return 0;
	}
	if (strchr(name, '/')) {
		struct stat st;

		/*
		 * Checked here: behind the wrapper (kill_on_exit) the exec's error
		 * comes too late. A relative name is looked up from cwd, as the
		 * child's exec will.
		 */
		if ((f = seen_from(at, sizeof at, name, cwd)) == NULL) {
			lua_pushstring(L, name);	/* the exec will tell */
			return 0;
		}
		if (stat(f, &st) != 0)
			return errno == EACCES ? UV_EACCES : UV_ENOENT;
		/* A directory is EACCES, as execve says (errno is not stat's here). */
		if (!S_ISREG(st.st_mode) || access(f, X_OK) != 0)
			return UV_EACCES;
		lua_pushstring(L, name);
		return 0;
	}
	if (*name == '\0')
		return UV_ENOENT;
	for (;;) {
		const char *e = strchr(d, ':');
		int dl = e ? (int)(e - d) : (int)strlen(d);
		int n = snprintf(buf, sizeof buf, "%.*s/%s", dl ? dl : 1, dl ? d : ".", name);
		struct stat st;

		/* A relative entry ("bin", "" for ".") is the child's: from cwd. */
		if (n > 0 && (size_t)n < sizeof buf && (f = seen_from(at, sizeof at, buf, cwd)) != NULL &&
		    stat(f, &st) == 0 && S_ISREG(st.st_mode)) {
			if (access(f, X_OK) == 0) {
				lua_pushstring(L, buf);
				return 0;
			}
			err = UV_EACCES;
		}
		if (e == NULL)
			return err;
		d = e + 1;
	}
}

/* A string argument C would cut at its first NUL. */
static int has_nul(lua_State *L, int idx)
{
	size_t len;
	const char *v = lua_tolstring(L, idx, &len);

	return strlen(v) != len;
}

/*
 * Builds the NULL-terminated environment from the table at idx (names to
 * strings, numbers or false), merged over environ when inherit is set. The
 * array and the "NAME=value" strings are anchored in the table at anchor.
 * Also returns the PATH the table sets, if any. With drop_secrets, an
 * inherited variable whose value holds a secret of the log's is left out.
 */
static char **build_env(lua_State *L, int idx, int inherit, int drop_secrets, int anchor, const char **path)
{
	size_t n = 0, cap = 1;
	char **env;
	int k = (int)lua_rawlen(L, anchor);

	for (lua_pushnil(L); lua_next(L, idx); lua_pop(L, 1))
		cap++;
	if (inherit)
		for (char **e = environ; *e; e++)
			cap++;
	env = lua_newuserdatauv(L, cap * sizeof *env, 0);
	lua_rawseti(L, anchor, ++k);

	for (lua_pushnil(L); lua_next(L, idx); lua_pop(L, 1)) {
		const char *name = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;

		if (name == NULL || *name == '\0' || strchr(name, '='))
			luaL_error(L, "env names must be non-empty strings without '='");
		if (has_nul(L, -2))	/* "A\0B" would set A */
			luaL_error(L, "env name holds a NUL byte");
		if (lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1))
			continue;
		if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
			luaL_error(L, "env value of '%s' must be a string, a number or false", name);
		if (has_nul(L, -1))	/* the program would get what is before it, silently */
			luaL_error(L, "env value of '%s' holds a NUL byte", name);
		env[n++] = (char *)lua_pushfstring(L, "%s=%s", name, lua_tostring(L, -1));
		if (!strcmp(name, "PATH"))
			*path = env[n - 1] + 5;
		lua_rawseti(L, anchor, ++k);
	}
	if (inherit)
		for (char **e = environ; *e; e++) {
			const char *eq = strchr(*e, '=');

			if (eq == NULL || (drop_secrets && ca__log_holds_secret(eq + 1, strlen(eq + 1))))
				continue;
			lua_pushlstring(L, *e, (size_t)(eq - *e));
			if (lua_rawget(L, idx) == LUA_TNIL)
				env[n++] = *e;
			lua_pop(L, 1);
		}
	env[n] = NULL;
	return env;
}

static int callback_arg(lua_State *L, int i)
{
	int t = lua_type(L, i);

	luaL_argexpected(L, t <= LUA_TNIL || t == LUA_TFUNCTION ||
			 (t == LUA_TBOOLEAN && !lua_toboolean(L, i)), i, "function or false");
	return t == LUA_TFUNCTION;
}

static void init_out(struct ca_proc *p, struct out_pipe *s, uv_stdio_container_t *c,
		     int wanted, const char *where)
{
	s->fn_ref = LUA_NOREF;
	s->where = where;
	if (!wanted) {
		s->done = 1;
		c->flags = UV_IGNORE;
		return;
	}
	uv_pipe_init(ca_loop(), &s->h, 0);
	s->h.data = p;
	s->open = 1;
	c->flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
	c->data.stream = (uv_stream_t *)&s->h;
}

static void start_out(struct ca_proc *p, struct out_pipe *s, lua_State *L, int fn_idx)
{
	if (!s->open)
		return;
	s->fn_ref = ca_ref(L, fn_idx);
	if (uv_read_start((uv_stream_t *)&s->h, on_alloc, on_read) < 0) {
		s->done = 1;
		close_handle(p, (uv_handle_t *)&s->h);
	}
}

/*
 * After uv_spawn of the wrapper, whose exec of the program reports on fd:
 * 0 once the program runs (EOF), or the exec's error as a libuv error, the
 * wrapper reaped (it exits at once), so that spawn fails as it does
 * without the wrapper. Blocks, as uv_spawn does for its own exec.
 */
static int wrapper_exec_error(int fd, int pid)
{
	int err;
	ssize_t n;

	do
		n = read(fd, &err, sizeof err);
	while (n < 0 && errno == EINTR);
	if (n != (ssize_t)sizeof err)
		return 0;
	while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
		;
	return uv_translate_sys_error(err);
}

/*
 * Whether path is a program callagent may start its children through: a
 * file (not a folder) of the binary's own owner or root, executable. A
 * file another user put beside a binary run from a shared folder (/tmp)
 * would run with callagent's environment, its secrets.
 */
static int trusted_program(const char *path, uid_t owner)
{
	struct stat st;

	return stat(path, &st) == 0 && S_ISREG(st.st_mode) && (st.st_uid == owner || st.st_uid == 0) &&
	       access(path, X_OK) == 0;
}

/*
 * The wrapper to start a kill_on_exit child through (src/pdeathsig.c), or
 * NULL without /proc: the small program callagent-pdeathsig beside this one
 * (the build tree) or in ../libexec/callagent/ (make install), looked for
 * once and checked at each spawn (trusted_program), so that one removed
 * since is not tried; else this program itself. That is /proc/self/exe -
 * its own, which is ours - rather than our path: it works even when the
 * binary has been replaced or removed since callagent started (an upgrade
 * under a running process). The small program execs in a millisecond where
 * callagent takes six to load its libraries, and spawn waits for that exec.
 */
static const char *wrapper_exe(void)
{
	static const char *const places[] = {"/callagent-pdeathsig", "/../libexec/callagent/callagent-pdeathsig"};
	static char small[PATH_MAX];
	static int self = -1;
	static uid_t owner;
	char dir[PATH_MAX];
	struct stat st;
	ssize_t n = -1;
	size_t i;

	if (self < 0) {
		self = access("/proc/self/exe", X_OK) == 0;
		if (stat("/proc/self/exe", &st) == 0) {
			owner = st.st_uid;
			n = readlink("/proc/self/exe", dir, sizeof dir - 1);
		}
		while (n > 0 && dir[n - 1] != '/')	/* its directory ("... (deleted)" is the name's) */
			n--;
		for (i = 0; n > 0 && i < sizeof places / sizeof *places && !small[0]; i++)
			if ((size_t)snprintf(small, sizeof small, "%.*s%s", (int)n - 1, dir, places[i]) >= sizeof small ||
			    !trusted_program(small, owner))
				small[0] = '\0';
	}
	if (small[0] && trusted_program(small, owner))
		return small;
	return self ? "/proc/self/exe" : NULL;
}

static int l_spawn(lua_State *L)
{
	uv_process_options_t o;
	uv_stdio_container_t stdio[4];
	struct proc_box *box;
	struct ca_proc *p;
	const char *path = getenv("PATH"), *cwd, *name, *file, *wrap;
	char **args, **env = NULL;
	lua_Integer max_line, max_stdin;
	int n, anchor, want_out, want_err, want_in, kill_on_exit, drop_secrets, rc;
	int errpipe[2] = {-1, -1};	/* the wrapper's exec error, read end and write end */

	luaL_checktype(L, 1, LUA_TTABLE);
	want_out = callback_arg(L, 2);
	want_err = callback_arg(L, 3);
	if (!lua_isnoneornil(L, 4))
		luaL_checktype(L, 4, LUA_TFUNCTION);
	if (!lua_isnoneornil(L, 5))
		luaL_checktype(L, 5, LUA_TFUNCTION);
	lua_settop(L, 5);
	n = (int)lua_rawlen(L, 1);
	luaL_argcheck(L, n >= 1, 1, "spec[1] must name the program");
	cwd = ca_opt_string_field(L, 1, "cwd", NULL);
	lua_getfield(L, 1, "cwd");	/* the child would start where the part before it says */
	luaL_argcheck(L, cwd == NULL || !has_nul(L, -1), 1, "cwd holds a NUL byte");
	lua_pop(L, 1);
	max_line = ca_opt_int_field(L, 1, "max_line", 65536);
	luaL_argcheck(L, max_line >= 1 && max_line <= (1 << 30), 1, "max_line must be 1 .. 2^30");
	want_in = ca_opt_bool_field(L, 1, "stdin", 0);
	kill_on_exit = ca_opt_bool_field(L, 1, "kill_on_exit", 1);

	max_stdin = ca_opt_int_field(L, 1, "max_stdin", 1 << 20);
	luaL_argcheck(L, max_stdin >= 1 && max_stdin <= 0x7fffffff, 1, "max_stdin must be 1 .. 2^31-1");

	/* Every string and array handed to uv_spawn is anchored here (index 6). */
	lua_newtable(L);
	anchor = lua_gettop(L);
	args = lua_newuserdatauv(L, ((size_t)n + 1) * sizeof *args, 0);
	lua_rawseti(L, anchor, 1);
	for (int i = 1; i <= n; i++) {
		int t = lua_rawgeti(L, 1, i);

		if (t != LUA_TSTRING && t != LUA_TNUMBER)
			return luaL_error(L, "spec[%d] must be a string", i);
		if (has_nul(L, -1))
			return luaL_error(L, "spec[%d] holds a NUL byte", i);
		args[i - 1] = (char *)lua_tostring(L, -1);
		lua_rawseti(L, anchor, (lua_Integer)lua_rawlen(L, anchor) + 1);
	}
	args[n] = NULL;
	drop_secrets = ca_opt_bool_field(L, 1, "drop_secrets", 0);
	if (lua_getfield(L, 1, "env") != LUA_TNIL) {
		luaL_argcheck(L, lua_istable(L, -1), 1, "env must be a table");
		env = build_env(L, lua_gettop(L), ca_opt_bool_field(L, 1, "inherit_env", 0), drop_secrets, anchor, &path);
	} else if (drop_secrets) {
		lua_newtable(L);	/* callagent's environment, less what holds a secret */
		env = build_env(L, lua_gettop(L), 1, 1, anchor, &path);
	}
	name = args[0];
	rc = resolve(L, name, path, cwd);
	if (rc < 0)
		return ca_fail(L, uv_err_name(rc), "%s: %s%s", name,
			       rc == UV_EACCES ? "not executable" : "not found", strchr(name, '/') ? "" : " in PATH");
	file = lua_tostring(L, -1);	/* anchored: it stays on the stack */

	/* The userdata exists, closed, before the child does. */
	box = lua_newuserdatauv(L, sizeof *box, 0);
	box->p = NULL;
	box->pid = 0;
	luaL_setmetatable(L, PROCESS_MT);

	p = ca_malloc(sizeof *p);
	memset(p, 0, sizeof *p);
	p->exit_ref = LUA_NOREF;
	p->eof_ref = LUA_NOREF;
	p->max_stdin = (size_t)max_stdin;
	p->max_line = (size_t)max_line;
	p->kill_on_exit = kill_on_exit;
	p->next = live;
	if (live)
		live->prev = p;
	live = p;

	memset(stdio, 0, sizeof stdio);
	if (want_in) {
		uv_pipe_init(ca_loop(), &p->in, 0);
		p->in.data = p;
		p->in_state = IN_OPEN;
		stdio[0].flags = UV_CREATE_PIPE | UV_READABLE_PIPE;
		stdio[0].data.stream = (uv_stream_t *)&p->in;
	} else {
		stdio[0].flags = UV_IGNORE;
	}
	init_out(p, &p->out, &stdio[1], want_out, "process on_stdout");
	init_out(p, &p->err, &stdio[2], want_err, "process on_stderr");

	memset(&o, 0, sizeof o);
	o.exit_cb = on_child_exit;
	o.file = file;
	o.args = args;
	if (kill_on_exit && (wrap = wrapper_exe()) != NULL) {
		/* Through the wrapper (ca__pdeathsig_main): [name, flag, parent, signal, errfd, file, args...]. */
		char **w = lua_newuserdatauv(L, ((size_t)n + 7) * sizeof *w, 0);

		lua_rawseti(L, anchor, (lua_Integer)lua_rawlen(L, anchor) + 1);
		lua_pushfstring(L, "%d", (int)getpid());
		w[2] = (char *)lua_tostring(L, -1);
		lua_rawseti(L, anchor, (lua_Integer)lua_rawlen(L, anchor) + 1);
		w[0] = "callagent";
		w[1] = "--pdeathsig";
		w[3] = "15";	/* SIGTERM */
		w[4] = "-1";
		if (pipe2(errpipe, O_CLOEXEC) == 0) {
			/* The child's descriptor 3, after its stdio. */
			w[4] = "3";
			stdio[3].flags = UV_INHERIT_FD;
			stdio[3].data.fd = errpipe[1];
		}
		w[5] = (char *)file;
		memcpy(w + 6, args, ((size_t)n + 1) * sizeof *w);
		o.file = wrap;
		o.args = w;
	}
	o.env = env;
	o.cwd = cwd;
	o.stdio_count = errpipe[1] >= 0 ? 4 : 3;
	o.stdio = stdio;
	o.flags = UV_PROCESS_DETACHED;	/* setsid(): its own process group */
	cloexec_all();
	rc = uv_spawn(ca_loop(), &p->h, &o);
	p->h.data = p;
	if (errpipe[1] >= 0) {
		close(errpipe[1]);
		if (rc >= 0)
			rc = wrapper_exec_error(errpipe[0], p->h.pid);
		close(errpipe[0]);
	}
	if (rc < 0) {
		close_all(p);
		return ca_fail(L, uv_err_name(rc), "%s (starting %s%s%s)", uv_strerror(rc), name,
			       cwd ? " in " : "", cwd ? cwd : "");
	}
	forget_group(p->h.pid);	/* the id was free: no group of an earlier child has it */
	box->p = p;
	box->pid = p->h.pid;
	p->box = box;
	p->exit_ref = ca_ref(L, 4);
	p->eof_ref = ca_ref(L, 5);
	start_out(p, &p->out, L, 2);
	start_out(p, &p->err, L, 3);
	return 1;
}

/* ---- methods ---- */

static struct proc_box *check_box(lua_State *L)
{
	return luaL_checkudata(L, 1, PROCESS_MT);
}

static int l_pid(lua_State *L)
{
	lua_pushinteger(L, check_box(L)->pid);
	return 1;
}

static int l_running(lua_State *L)
{
	struct proc_box *box = check_box(L);

	lua_pushboolean(L, box->p && !box->p->exited);
	return 1;
}

static int l_write(lua_State *L)
{
	struct proc_box *box = check_box(L);
	struct ca_proc *p = box->p;
	size_t len;
	const char *data = luaL_checklstring(L, 2, &len);
	struct write_req *w;
	uv_buf_t b;
	int n;

	luaL_argcheck(L, len <= 0x7fffffff, 2, "too large");
	if (p && p->in_state == IN_OPEN) {
		/*
		 * All or nothing: a write that would leave more than max_stdin
		 * bytes waiting is refused whole, so the child's input stays
		 * whole and the caller may retry once it has read.
		 */
		if (len > p->max_stdin)	/* waiting cannot help this one */
			return ca_fail(L, "ENOBUFS", "a write of %zu bytes is over max_stdin (%zu): split it", len,
				       p->max_stdin);
		if (p->in.write_queue_size + len > p->max_stdin)
			return ca_fail(L, "ENOBUFS", "stdin queue over %d bytes: the child is not reading",
				       (int)p->max_stdin);
		b = uv_buf_init((char *)data, (unsigned)len);
		n = len ? uv_try_write((uv_stream_t *)&p->in, &b, 1) : 0;
		if (n == UV_EAGAIN || n == UV_ENOSYS)
			n = 0;
		if (n >= 0 && (size_t)n < len) {
			/* The rest is copied and queued behind earlier writes. */
			w = ca_malloc(sizeof *w + len - (size_t)n);
			memcpy(w->data, data + n, len - (size_t)n);
			b = uv_buf_init(w->data, (unsigned)(len - (size_t)n));
			n = uv_write(&w->req, (uv_stream_t *)&p->in, &b, 1, on_write);
			if (n < 0)
				free(w);
		}
		if (n < 0) {
			stdin_failed(p, n);
			return ca_fail_uv(L, n);
		}
		lua_pushboolean(L, 1);
		return 1;
	}
	if (p && p->in_err)
		return ca_fail_uv(L, p->in_err);
	if (p && p->in_state == IN_NONE)
		return ca_fail(L, "EBADF", "stdin is not a pipe (spawn with stdin = true)");
	return ca_fail(L, "EPIPE", "stdin is closed");
}

static int l_buffered(lua_State *L)
{
	struct ca_proc *p = check_box(L)->p;

	lua_pushinteger(L, p && p->in_state != IN_NONE ? (lua_Integer)p->in.write_queue_size : 0);
	return 1;
}

static int l_close_stdin(lua_State *L)
{
	struct ca_proc *p = check_box(L)->p;

	if (p && p->in_state == IN_OPEN) {
		p->in_state = IN_CLOSING;
		/* Shutdown waits for the queued writes; its callback closes the pipe. */
		if (uv_shutdown(&p->shut, (uv_stream_t *)&p->in, on_shutdown) < 0)
			close_handle(p, (uv_handle_t *)&p->in);
	}
	return 0;
}

static int l_kill(lua_State *L)
{
	struct proc_box *box = check_box(L);
	int sig = check_signal(L, 2), rc;

	if (box->p == NULL || !may_run(box->p)) {
		/* What it left in its group, holding none of its pipes. */
		if (box->pid > 0 && left_over((pid_t)box->pid)) {
			if (!left_alive((pid_t)box->pid))
				forget_group((pid_t)box->pid);	/* empty, or the id is another's */
			else if (kill(-(pid_t)box->pid, sig) == 0) {
				lua_pushboolean(L, 1);
				return 1;
			}
		}
		return ca_fail(L, "ESRCH", "process %d has exited", (int)box->pid);
	}
	rc = signal_child(box->p, sig);
	if (rc < 0)
		return ca_fail_uv(L, rc);
	lua_pushboolean(L, 1);
	return 1;
}

/*
 * A running child outlives its userdata (its callbacks hold what they need);
 * at teardown it is stopped (kill_on_exit) and closed.
 */
static int l_gc(lua_State *L)
{
	struct proc_box *box = check_box(L);
	struct ca_proc *p = box->p;

	box->p = NULL;
	if (p == NULL)
		return 0;
	p->box = NULL;
	if (ca_stopping()) {
		term_on_exit(p);
		close_all(p);
	}
	return 0;
}

static int l_tostring(lua_State *L)
{
	struct proc_box *box = check_box(L);

	lua_pushfstring(L, "callagent.Process (pid %d, %s)", (int)box->pid,
			box->p && !box->p->exited ? "running" : "exited");
	return 1;
}

int luaopen_callagent_core_process(lua_State *L)
{
	static const luaL_Reg methods[] = {
		{"pid", l_pid},
		{"running", l_running},
		{"write", l_write},
		{"buffered", l_buffered},
		{"close_stdin", l_close_stdin},
		{"kill", l_kill},
		{NULL, NULL}
	};
	static const luaL_Reg fns[] = {
		{"spawn", l_spawn},
		{NULL, NULL}
	};

	if (luaL_newmetatable(L, PROCESS_MT)) {
		luaL_newlib(L, methods);
		lua_setfield(L, -2, "__index");
		lua_pushcfunction(L, l_gc);
		lua_setfield(L, -2, "__gc");
		lua_pushcfunction(L, l_tostring);
		lua_setfield(L, -2, "__tostring");
	}
	lua_pop(L, 1);
	if (!hooked) {
		hooked = 1;
		ca__at_close(at_close);
	}
	luaL_newlib(L, fns);
	return 1;
}
