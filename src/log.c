/*
 * log.c - callagent.core.log: the one log sink, written without blocking the loop.
 *
 * Lines go to stderr. When stderr is a pipe or a terminal the sink writes
 * with uv_try_write and queues what the reader has not taken yet, written
 * later by uv_write; the queue is bounded (CA_LOG_QUEUE_MAX) and lines past
 * it are dropped and counted, never allowed to stall the loop or grow
 * memory. A regular file gets plain write()s (the page cache absorbs them).
 *
 * Secrets registered with add_secret() are replaced by "[redacted]" in every
 * line, from Lua or from C, before it is written.
 *
 * Lua API (the framework's callagent.log builds on it):
 *   write(level, line)   level 0..3 (debug..error); line without newline
 *   level([n])           get/set the minimum level
 *   enabled(n)           whether level n is written
 *   timestamp()          "2026-11-25T14:22:04.123Z" (UTC, wall clock)
 *   add_secret(s)        redact s (strings shorter than 4 bytes are ignored)
 *   dropped()            lines dropped so far because the reader was too slow
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "ca.h"

#define CA_LOG_QUEUE_MAX (4u << 20)
#define CA_MAX_SECRETS 64

/* A queued chunk of log text; owned by the sink until its uv_write completes. */
struct chunk {
	uv_write_t req;
	struct chunk *next;
	size_t len;
	char data[];
};

static int min_level = CA_LOG_INFO;
static int sink_kind;		/* 0 not set up, 1 stream (pipe/tty), 2 plain fd */
static union {
	uv_pipe_t pipe;
	uv_tty_t tty;
} stream;
static size_t queued;		/* bytes queued or being written */
static int writing;		/* a uv_write is in flight */
static struct chunk *head, *tail;
static unsigned long dropped;
static char *secrets[CA_MAX_SECRETS];
static size_t secret_len[CA_MAX_SECRETS];
static int n_secrets;

static void setup(void)
{
	uv_loop_t *loop = ca_loop();
	uv_handle_type t;

	if (sink_kind)
		return;
	sink_kind = 2;
	if (loop == NULL)
		return;
	t = uv_guess_handle(STDERR_FILENO);
	if (t == UV_TTY && uv_tty_init(loop, &stream.tty, STDERR_FILENO, 0) == 0) {
		sink_kind = 1;
	} else if (t == UV_NAMED_PIPE && uv_pipe_init(loop, &stream.pipe, 0) == 0) {
		if (uv_pipe_open(&stream.pipe, STDERR_FILENO) == 0)
			sink_kind = 1;
		else
			uv_close((uv_handle_t *)&stream.pipe, NULL);
	}
	if (sink_kind == 1)
		uv_unref((uv_handle_t *)&stream);
}

static void write_all_blocking(const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(STDERR_FILENO, p, n);

		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN) {
			struct timespec ts = {0, 1000000};

			nanosleep(&ts, NULL);
			continue;
		}
		if (w <= 0)
			return;
		p += w;
		n -= (size_t)w;
	}
}

static void pump(void);

static void drop_queue(void)
{
	while (head) {
		struct chunk *n = head->next;

		free(head);
		head = n;
	}
	tail = NULL;
	queued = 0;
}

static void on_written(uv_write_t *req, int status)
{
	struct chunk *c = (struct chunk *)req;

	writing = 0;
	queued -= c->len;
	head = c->next;
	if (head == NULL)
		tail = NULL;
	free(c);
	if (status != 0)
		drop_queue();	/* the reader is gone */
	pump();
}

static void pump(void)
{
	uv_buf_t buf;

	if (writing)
		return;
	if (head == NULL) {
		uv_unref((uv_handle_t *)&stream);
		return;
	}
	buf = uv_buf_init(head->data, (unsigned)head->len);
	if (uv_write(&head->req, (uv_stream_t *)&stream, &buf, 1, on_written) == 0) {
		writing = 1;
		uv_ref((uv_handle_t *)&stream);
	} else {
		drop_queue();	/* the reader is gone */
	}
	if (!writing)
		uv_unref((uv_handle_t *)&stream);
}

static void enqueue(const char *p, size_t n)
{
	struct chunk *c;

	if (queued + n > CA_LOG_QUEUE_MAX) {
		dropped++;
		return;
	}
	c = ca_malloc(sizeof *c + n);
	c->next = NULL;
	c->len = n;
	memcpy(c->data, p, n);
	if (tail)
		tail->next = c;
	else
		head = c;
	tail = c;
	queued += n;
	pump();
}

static void emit(const char *p, size_t n)
{
	setup();
	if (sink_kind != 1 || ca_loop() == NULL) {
		write_all_blocking(p, n);
		return;
	}
	if (head == NULL) {
		uv_buf_t buf = uv_buf_init((char *)p, (unsigned)n);
		int w = uv_try_write((uv_stream_t *)&stream, &buf, 1);

		if (w == (int)n)
			return;
		if (w > 0) {
			p += w;
			n -= (size_t)w;
		} else if (w != UV_EAGAIN) {
			return;
		}
	}
	enqueue(p, n);
}

/* Replaces every registered secret in line[0..len) and writes it with a newline. */
void ca__log_write(const char *line, size_t len)
{
	char stackbuf[2048];
	char *out = stackbuf;
	size_t cap = sizeof stackbuf, o = 0;

	for (size_t i = 0; i < len;) {
		int hit = -1;

		for (int s = 0; s < n_secrets; s++)
			if (secret_len[s] <= len - i && line[i] == secrets[s][0] &&
			    memcmp(line + i, secrets[s], secret_len[s]) == 0) {
				hit = s;
				break;
			}
		if (o + 16 >= cap) {
			size_t ncap = cap * 2 + len;

			out = out == stackbuf ? memcpy(ca_malloc(ncap), stackbuf, o)
					      : ca_realloc(out, ncap);
			cap = ncap;
		}
		if (hit >= 0) {
			memcpy(out + o, "[redacted]", 10);
			o += 10;
			i += secret_len[hit];
		} else {
			char c = line[i++];

			/*
			 * One line per event: embedded newlines are escaped, and
			 * so are the other control characters (a request's bytes
			 * may reach a line: no terminal escapes from a client).
			 */
			if (c == '\n') {
				out[o++] = '\\';
				out[o++] = 'n';
			} else if (c == '\r' || c == '\t') {
				out[o++] = ' ';
			} else if ((unsigned char)c < 0x20 || c == 0x7f) {
				o += (size_t)snprintf(out + o, 5, "\\x%02x", (unsigned char)c);
			} else {
				out[o++] = c;
			}
		}
	}
	out[o++] = '\n';
	emit(out, o);
	if (out != stackbuf)
		free(out);
}

void ca__log_flush(void)
{
	/* Write what is queued synchronously; used at exit and before _exit(). */
	struct chunk *c = head;

	if (writing && c) {
		/* The in-flight chunk may be partly written; libuv keeps no offset we can read. */
		c = c->next;
	}
	for (; c; c = c->next)
		write_all_blocking(c->data, c->len);
	if (dropped) {
		char msg[96];
		int n = snprintf(msg, sizeof msg, "callagent: %lu log lines dropped (slow reader)\n", dropped);

		write_all_blocking(msg, (size_t)n);
		dropped = 0;
	}
}

void ca__log_set_level(int level)
{
	min_level = level;
}

int ca_log_enabled(int level)
{
	return level >= min_level;
}

static size_t timestamp(char *buf, size_t cap)
{
	struct timeval tv;
	struct tm tm;
	size_t n;

	gettimeofday(&tv, NULL);
	gmtime_r(&tv.tv_sec, &tm);
	n = strftime(buf, cap, "%Y-%m-%dT%H:%M:%S", &tm);
	n += (size_t)snprintf(buf + n, cap - n, ".%03dZ", (int)(tv.tv_usec / 1000));
	return n;
}

static const char *level_names[] = {"DEBUG", "INFO", "WARN", "ERROR"};

void ca_log(int level, const char *fmt, ...)
{
	char buf[4096];
	va_list ap;
	size_t n;
	int m;

	if (level < min_level)
		return;
	n = timestamp(buf, sizeof buf);
	n += (size_t)snprintf(buf + n, sizeof buf - n, " %s ", level_names[level & 3]);
	va_start(ap, fmt);
	m = vsnprintf(buf + n, sizeof buf - n, fmt, ap);
	va_end(ap);
	if (m < 0)
		m = 0;
	n += (size_t)m;
	if (n >= sizeof buf)
		n = sizeof buf - 1;
	ca__log_write(buf, n);
}

/* ---- Lua ---- */

static int l_write(lua_State *L)
{
	int level = (int)luaL_checkinteger(L, 1);
	size_t len;
	const char *line = luaL_checklstring(L, 2, &len);

	if (level >= min_level)
		ca__log_write(line, len);
	return 0;
}

static int l_level(lua_State *L)
{
	if (!lua_isnoneornil(L, 1)) {
		lua_Integer n = luaL_checkinteger(L, 1);

		luaL_argcheck(L, n >= 0 && n <= 3, 1, "level must be 0..3");
		min_level = (int)n;
	}
	lua_pushinteger(L, min_level);
	return 1;
}

static int l_enabled(lua_State *L)
{
	lua_pushboolean(L, luaL_checkinteger(L, 1) >= min_level);
	return 1;
}

static int l_timestamp(lua_State *L)
{
	char buf[64];

	lua_pushlstring(L, buf, timestamp(buf, sizeof buf));
	return 1;
}

static int l_add_secret(lua_State *L)
{
	size_t len;
	const char *s = luaL_checklstring(L, 1, &len);

	if (len < 4)
		return 0;
	for (int i = 0; i < n_secrets; i++)
		if (secret_len[i] == len && memcmp(secrets[i], s, len) == 0)
			return 0;
	if (n_secrets == CA_MAX_SECRETS)
		return luaL_error(L, "too many secrets registered (max %d)", CA_MAX_SECRETS);
	secrets[n_secrets] = ca_malloc(len);
	memcpy(secrets[n_secrets], s, len);
	secret_len[n_secrets++] = len;
	return 0;
}

static int l_dropped(lua_State *L)
{
	lua_pushinteger(L, (lua_Integer)dropped);
	return 1;
}

int luaopen_callagent_core_log(lua_State *L)
{
	static const luaL_Reg fns[] = {
		{"write", l_write},
		{"level", l_level},
		{"enabled", l_enabled},
		{"timestamp", l_timestamp},
		{"add_secret", l_add_secret},
		{"dropped", l_dropped},
		{NULL, NULL}
	};
	luaL_newlib(L, fns);
	return 1;
}
