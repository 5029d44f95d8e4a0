/*
 * log.c - callagent.core.log: the one log sink, written without blocking the loop.
 *
 * Lines go to stderr. When stderr is a pipe or a terminal the sink writes
 * with uv_try_write and queues what the reader has not taken yet, written
 * later by uv_write; the queue is bounded (CA_LOG_QUEUE_MAX) and lines past
 * it are dropped and counted, never allowed to stall the loop or grow
 * memory. A line is written whole or not at all: one longer than the queue
 * is dropped before any of it is written, and the rest of one partly
 * written is queued whatever the bound (at most twice it, then). A regular file gets plain write()s (the page cache absorbs them).
 *
 * At the end (ca__log_flush: the exit, a second signal, runtime.exit, a
 * fatal error) what is queued is written synchronously, and from then on
 * every line is. Those writes wait for a reader that does not take them for
 * CA_LOG_WAIT_MS in all, CA_LOG_FORCED_WAIT_MS when the exit is forced (the
 * Lua state still open): a stderr that nobody reads must not keep the
 * process from exiting. What is left then is dropped and counted.
 *
 * Secrets registered with add_secret() are replaced by "[redacted]" in every
 * line, from Lua or from C, before it is written; so is anything shaped like
 * an OpenAI API key (sk_key()), registered or not.
 *
 * Lua API (the framework's callagent.log builds on it):
 *   write(level, line)   level 0..3 (debug..error); line without newline
 *   level([n])           get/set the minimum level
 *   enabled(n)           whether level n is written
 *   timestamp()          "2026-11-25T14:22:04.123Z" (UTC, wall clock)
 *   add_secret(s)        redact s from now on (at least 8 bytes; the longest
 *                        match wins); callagent.log adds each secret's escaped
 *                        forms too
 *   format([f])          get/set "text" or "json" (C lines follow it as well)
 *   scrub(s)             s with every registered secret replaced by
 *                        "[redacted]" as in a line (s itself when it holds none)
 *   dropped()            lines dropped so far because the reader was too slow
 *   limits([window_ms])  get/set the window of C's rate-limited lines
 *                        (ca_log_limited: 60000 ms)
 */
#define _GNU_SOURCE	/* memmem */
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "ca.h"

#define CA_LOG_QUEUE_MAX (4u << 20)
#define CA_LOG_WAIT_MS 1000		/* the most the sink ever waits for a stalled reader */
#define CA_LOG_FORCED_WAIT_MS 250	/* ... when the exit is forced */
#define CA_MAX_SECRETS 256	/* forms of secrets: each as written, quoted, in JSON */
#define CA_MIN_SECRET 8

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
static int64_t wait_left_ns = CA_LOG_WAIT_MS * 1000000LL;	/* what blocking writes may still wait */
static int cut;			/* a line was cut short: the next write starts a new line */
static char *secrets[CA_MAX_SECRETS];
static size_t secret_len[CA_MAX_SECRETS];
static int n_secrets;
static unsigned char first_bytes[32];	/* bit set: some secret starts with this byte */
static int json_format;			/* CALLAGENT_LOG_FORMAT=json */

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

/*
 * Writes p[0..n) to stderr, waiting for room while wait_left_ns lasts (a
 * non-blocking pipe says EAGAIN when its reader has not taken what it holds).
 * Returns 0 when all was written, -1 when none was, 1 when the line was cut.
 */
static int write_all_blocking(const char *p, size_t n)
{
	size_t total = n;

	if (cut && n > 0) {
		/* The line before was cut: this one must not run into it. */
		if (write(STDERR_FILENO, "\n", 1) != 1)
			return -1;
		cut = 0;
	}
	while (n > 0) {
		ssize_t w = write(STDERR_FILENO, p, n);

		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN && wait_left_ns > 0) {
			struct pollfd pfd = {STDERR_FILENO, POLLOUT, 0};
			uint64_t t0 = uv_hrtime();

			poll(&pfd, 1, (int)((wait_left_ns + 999999) / 1000000));
			wait_left_ns -= (int64_t)(uv_hrtime() - t0);
			continue;
		}
		if (w <= 0)
			break;
		p += w;
		n -= (size_t)w;
	}
	if (n == 0)
		return 0;
	if (n == total)
		return -1;
	cut = 1;
	return 1;
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

/* force: the rest of a line already partly written (queued whatever the limit). */
static void enqueue(const char *p, size_t n, int force)
{
	struct chunk *c;

	if (!force && queued + n > CA_LOG_QUEUE_MAX) {
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
		if (write_all_blocking(p, n) != 0)
			dropped++;
		return;
	}
	/* Whole or not at all: a line the queue could never hold is not begun. */
	if (n > CA_LOG_QUEUE_MAX) {
		dropped++;
		return;
	}
	if (head == NULL) {
		uv_buf_t buf = uv_buf_init((char *)p, (unsigned)n);
		int w = uv_try_write((uv_stream_t *)&stream, &buf, 1);

		if (w == (int)n)
			return;
		if (w > 0) {
			/* Begun: its rest must follow, or the next line runs into it. */
			enqueue(p + w, n - (size_t)w, 1);
			return;
		} else if (w != UV_EAGAIN) {
			return;
		}
	}
	enqueue(p, n, 0);
}

/* A growable output buffer that starts on the stack. */
struct buf {
	char *p;
	size_t n, cap;
	char stack[2048];
};

static void b_init(struct buf *b)
{
	b->p = b->stack;
	b->n = 0;
	b->cap = sizeof b->stack;
}

static void b_reserve(struct buf *b, size_t more)
{
	size_t ncap;

	if (b->n + more <= b->cap)
		return;
	ncap = (b->n + more) * 2;
	b->p = b->p == b->stack ? memcpy(ca_malloc(ncap), b->stack, b->n) : ca_realloc(b->p, ncap);
	b->cap = ncap;
}

static void b_put(struct buf *b, const char *s, size_t n)
{
	b_reserve(b, n);
	memcpy(b->p + b->n, s, n);
	b->n += n;
}

static void b_hex(struct buf *b, const char *fmt, unsigned char c)
{
	b_reserve(b, 8);
	b->n += (size_t)snprintf(b->p + b->n, 8, fmt, c);
}

static void b_free(struct buf *b)
{
	if (b->p != b->stack)
		free(b->p);
}

/* Whether s[k] is a backslash that begins an escape: an odd run of them ends at k. */
static int escapes(const char *s, size_t k)
{
	size_t run = 0;

	while (s[k] == '\\') {
		run++;
		if (k == 0)
			break;
		k--;
	}
	return run % 2 == 1;
}

/*
 * The start of the escape (\x or \uXXXX, as JSON and a quoted text value
 * write them) that s[i] is inside of, or i when it is inside none: a match
 * must not begin after a backslash, which would then escape "[redacted]".
 */
static size_t escape_start(const char *s, size_t i)
{
	if (i > 0 && escapes(s, i - 1))
		return i - 1;
	for (size_t d = 2; d <= 5 && d <= i; d++)
		if (s[i - d] == '\\' && s[i - d + 1] == 'u' && escapes(s, i - d))
			return i - d;
	return i;
}

/* A byte of an API key as OpenAI writes them: letters, digits, "-" and "_". */
static int key_byte(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
}

/*
 * The length of an OpenAI API key at s[i] ("sk-", "sk-proj-", ... and at
 * least CA_MIN_SK_KEY more key bytes, not inside a longer word; the last
 * letter of an escape, as in "\nsk-...", ends a word), or 0:
 * redacted as a registered secret is, whether it is ours or not (a proxy's
 * upstream key in its error, a key pasted where it does not belong).
 */
#define CA_MIN_SK_KEY 32
static size_t sk_key(const char *s, size_t n, size_t i)
{
	size_t j;

	if (n - i < 3 + CA_MIN_SK_KEY || memcmp(s + i, "sk-", 3) != 0 ||
	    (i > 0 && key_byte((unsigned char)s[i - 1]) && escape_start(s, i - 1) == i - 1))
		return 0;
	for (j = i + 3; j < n && key_byte((unsigned char)s[j]); j++)
		;
	return j - i >= 3 + CA_MIN_SK_KEY ? j - i : 0;
}

int ca__log_holds_secret(const char *s, size_t n)
{
	for (size_t i = 0; i + 3 + CA_MIN_SK_KEY <= n; i++)
		if (s[i] == 's' && sk_key(s, n, i))
			return 1;
	for (int k = 0; k < n_secrets; k++)
		if (secret_len[k] <= n && memmem(s, n, secrets[k], secret_len[k]))
			return 1;
	return 0;
}

/* The end of a span s[..end) that must not stop inside an escape either. */
static size_t escape_end(const char *s, size_t n, size_t end)
{
	size_t last = end - 1, e = escape_start(s, last);

	if (e == last && !escapes(s, last))
		return end;	/* the last byte is inside no escape and begins none */
	end = e + (e + 1 < n && s[e + 1] == 'u' ? 6 : 2);
	return end < n ? end : n;
}

/*
 * Replaces every registered secret in s[0..n): the longest match wins. A
 * match is widened to whole escapes: "\nsecret" where a secret is "nsecret"
 * becomes "[redacted]", not "\[redacted]", which is no JSON.
 */
static void redact(struct buf *out, const char *s, size_t n)
{
	size_t i = 0, from = 0;

	while (i < n) {
		unsigned char c = (unsigned char)s[i];
		size_t len = 0;

		if (first_bytes[c >> 3] & (1u << (c & 7)))
			for (int k = 0; k < n_secrets; k++)	/* longest first */
				if (secret_len[k] <= n - i && (unsigned char)secrets[k][0] == c &&
				    memcmp(s + i, secrets[k], secret_len[k]) == 0) {
					len = secret_len[k];
					break;
				}
		if (c == 's') {
			size_t sk = sk_key(s, n, i);

			if (sk > len)
				len = sk;
		}
		if (len == 0) {
			i++;
			continue;
		}
		{
			/* Another secret starting inside this one and going past it
			 * is redacted in the same span: no tail of it is left. */
			size_t start = escape_start(s, i), end = i + len;

			if (start < from)
				start = from;
			for (size_t j = i + 1; j < end; j++) {
				size_t sk = s[j] == 's' ? sk_key(s, n, j) : 0;

				if (j + sk > end)
					end = j + sk;
				for (int k = 0; k < n_secrets; k++)
					if (j + secret_len[k] > end && secret_len[k] <= n - j &&
					    memcmp(s + j, secrets[k], secret_len[k]) == 0)
						end = j + secret_len[k];
			}
			b_put(out, s + from, start - from);
			b_put(out, "[redacted]", 10);
			i = escape_end(s, n, end);
		}
		from = i;
	}
	b_put(out, s + from, n - from);
}

size_t ca__utf8_len(const unsigned char *s, size_t n)
{
	unsigned c = s[0];
	size_t len;
	unsigned cp;

	if (c < 0x80)
		return 1;
	if (c >= 0xc2 && c <= 0xdf)
		len = 2, cp = c & 0x1f;
	else if (c >= 0xe0 && c <= 0xef)
		len = 3, cp = c & 0x0f;
	else if (c >= 0xf0 && c <= 0xf4)
		len = 4, cp = c & 0x07;
	else
		return 0;
	if (len > n)
		return 0;
	for (size_t k = 1; k < len; k++) {
		if ((s[k] & 0xc0) != 0x80)
			return 0;
		cp = cp << 6 | (s[k] & 0x3f);
	}
	if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
	    (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
		return 0;
	return len;
}

/*
 * Text lines: one line per event. A newline is written \n, a tab or carriage
 * return as a space, any other control character (C0, DEL, C1) and any byte
 * that is not UTF-8 as \xNN: a request's bytes may reach a line, but no
 * terminal escape from a client. `block` keeps newlines and tabs (the fatal
 * error's traceback).
 */
static void sanitize_text(struct buf *out, const char *s, size_t n, int block)
{
	const unsigned char *u = (const unsigned char *)s;

	for (size_t i = 0; i < n;) {
		unsigned char c = u[i];
		size_t len = ca__utf8_len(u + i, n - i);

		if (len > 1 && !(c == 0xc2 && u[i + 1] < 0xa0)) {
			b_put(out, s + i, len);
			i += len;
			continue;
		}
		if (len > 1) {	/* C1 control: both bytes escaped */
			b_hex(out, "\\x%02x", c);
			b_hex(out, "\\x%02x", u[i + 1]);
			i += 2;
			continue;
		}
		i++;
		if ((c == '\n' || c == '\t') && block) {
			b_put(out, (const char *)&c, 1);
		} else if (c == '\n') {
			b_put(out, "\\n", 2);
		} else if (c == '\r' || c == '\t') {
			b_put(out, " ", 1);
		} else if (c < 0x20 || c >= 0x7f) {
			b_hex(out, "\\x%02x", c);
		} else {
			b_put(out, (const char *)&c, 1);
		}
	}
}

/*
 * JSON string content: control characters and DEL as \u00XX, bytes that are
 * not UTF-8 as \ufffd (a JSON reader refuses them). `quote` also escapes "
 * and \ (a C message; the Lua logger's lines are JSON already).
 */
static void escape_json(struct buf *out, const char *s, size_t n, int quote)
{
	const unsigned char *u = (const unsigned char *)s;

	for (size_t i = 0; i < n;) {
		unsigned char c = u[i];
		size_t len = ca__utf8_len(u + i, n - i);

		if (len == 0) {
			b_put(out, "\\ufffd", 6);
			i++;
		} else if (len > 1) {
			b_put(out, s + i, len);
			i += len;
		} else if (c < 0x20 || c == 0x7f) {
			b_hex(out, "\\u%04x", c);
			i++;
		} else if (quote && (c == '"' || c == '\\')) {
			b_put(out, "\\", 1);
			b_put(out, s + i++, 1);
		} else {
			b_put(out, s + i++, 1);
		}
	}
}

/* Redacts and sanitizes a finished line (from Lua: text or JSON) and writes it. */
void ca__log_write(const char *line, size_t len)
{
	struct buf r, out;

	b_init(&r);
	b_init(&out);
	redact(&r, line, len);
	if (json_format)
		escape_json(&out, r.p, r.n, 0);
	else
		sanitize_text(&out, r.p, r.n, 0);
	b_put(&out, "\n", 1);
	emit(out.p, out.n);
	b_free(&r);
	b_free(&out);
}

static void write_c_line(int level, const char *msg, size_t len, int block, unsigned int suppressed);
static void limits_flush(void);

/*
 * The end: writes what is queued synchronously and stops the stream, so that
 * the loop no longer waits for the reader (and lines from now on are written
 * at once). Used at exit and before _exit(); waits for a stalled reader
 * CA_LOG_FORCED_WAIT_MS at most while the Lua state is open (a forced exit),
 * CA_LOG_WAIT_MS in all. What is left then is dropped and counted.
 */
void ca__log_flush(void)
{
	struct chunk *c = head;
	int failed = 0;

	limits_flush();	/* their counts are lines too */
	if (ca_lua() != NULL && wait_left_ns > CA_LOG_FORCED_WAIT_MS * 1000000LL)
		wait_left_ns = CA_LOG_FORCED_WAIT_MS * 1000000LL;
	if (sink_kind == 1) {
		if (writing && c) {
			/* The rest of the line libuv is writing: the last bytes of its chunk. */
			size_t rest = uv_stream_get_write_queue_size((uv_stream_t *)&stream);

			if (rest > c->len)
				rest = c->len;
			if (rest > 0 && write_all_blocking(c->data + c->len - rest, rest) != 0) {
				cut = 1;	/* begun by libuv: the next write starts a new line */
				failed = 1;
				dropped++;
			}
			c = c->next;
		}
		for (; c; c = c->next) {
			if (failed || write_all_blocking(c->data, c->len) != 0) {
				failed = 1;
				dropped++;
			}
		}
		/* Everything but the chunk of a write in flight goes; closing the
		 * stream cancels that write (its callback frees it). The stream's
		 * fd, stderr, stays open: libuv does not close stdio. */
		c = writing ? head : NULL;
		if (c) {
			head = head->next;
			c->next = NULL;
		}
		drop_queue();
		head = tail = c;
		queued = c ? c->len : 0;
		sink_kind = 2;
		uv_close((uv_handle_t *)&stream, NULL);
	}
	if (dropped) {
		char msg[96];
		unsigned long was = dropped;
		int n = snprintf(msg, sizeof msg, "callagent: %lu log lines dropped (slow reader)", dropped);

		dropped = 0;
		write_c_line(CA_LOG_WARN, msg, (size_t)n, 1, 0);	/* a JSON line in JSON mode */
		if (dropped)
			dropped = was;	/* not written: the count stands */
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

/*
 * A line from C: the message is formatted, redacted, then written as text
 * ("<ts> LEVEL message") or as a JSON object like the Lua logger's. A
 * rate-limited site's count line gives suppressed > 0: the field
 * "suppressed" is added as log.limited's count line has it (" suppressed=N",
 * or a number in JSON).
 */
static void write_c_line(int level, const char *msg, size_t len, int block, unsigned int suppressed)
{
	static const char *lower[] = {"debug", "info", "warn", "error"};
	char ts[64];
	size_t tn = timestamp(ts, sizeof ts);
	struct buf r, out;

	b_init(&r);
	b_init(&out);
	redact(&r, msg, len);
	if (json_format) {
		b_put(&out, "{\"ts\":\"", 7);
		b_put(&out, ts, tn);
		b_put(&out, "\",\"level\":\"", 11);
		b_put(&out, lower[level & 3], strlen(lower[level & 3]));
		b_put(&out, "\",\"msg\":\"", 9);
		escape_json(&out, r.p, r.n, 1);
		b_put(&out, "\"", 1);
		if (suppressed) {
			char f[32];
			int fn = snprintf(f, sizeof f, ",\"suppressed\":%u", suppressed);

			b_put(&out, f, (size_t)fn);
		}
		b_put(&out, "}\n", 2);
	} else {
		b_put(&out, ts, tn);
		b_put(&out, " ", 1);
		b_put(&out, level_names[level & 3], strlen(level_names[level & 3]));
		b_put(&out, " ", 1);
		sanitize_text(&out, r.p, r.n, block);
		if (suppressed) {
			char f[32];
			int fn = snprintf(f, sizeof f, " suppressed=%u", suppressed);

			b_put(&out, f, (size_t)fn);
		}
		b_put(&out, "\n", 1);
	}
	if (block) {
		if (write_all_blocking(out.p, out.n) != 0)
			dropped++;
	} else {
		emit(out.p, out.n);
	}
	b_free(&r);
	b_free(&out);
}

/*
 * fmt formatted whole, never cut (a cut could leave a secret's head
 * unredacted): in small (cap bytes) when it fits, else in a new block the
 * caller frees; *len its length.
 */
static char *format_whole(char *small, size_t cap, int *len, const char *fmt, va_list ap)
{
	char *msg = small;
	va_list copy;
	int m;

	va_copy(copy, ap);
	m = vsnprintf(small, cap, fmt, ap);
	if (m < 0)
		m = 0;
	if ((size_t)m >= cap) {
		msg = ca_malloc((size_t)m + 1);
		vsnprintf(msg, (size_t)m + 1, fmt, copy);
	}
	va_end(copy);
	*len = m;
	return msg;
}

static void vlog(int level, int block, const char *fmt, va_list ap)
{
	char small[1024];
	int m;
	char *msg = format_whole(small, sizeof small, &m, fmt, ap);

	write_c_line(level, msg, (size_t)m, block, 0);
	if (msg != small)
		free(msg);
}

void ca_log(int level, const char *fmt, ...)
{
	va_list ap;

	if (level < min_level)
		return;
	va_start(ap, fmt);
	vlog(level, 0, fmt, ap);
	va_end(ap);
}

void ca__log_fatal(const char *fmt, ...)
{
	va_list ap;

	ca__log_flush();
	va_start(ap, fmt);
	vlog(CA_LOG_ERROR, 1, fmt, ap);
	va_end(ap);
}

/*
 * Rate-limited lines (ca_log_limited). A site's window opens with its first
 * line; lines past CA_LOG_LIMIT_LINES in it are counted, the site listed,
 * and one timer (unref'd: it never keeps the process alive) ends the
 * listed windows, writing each count. A site whose window is over and has
 * no count starts a new one at its next line.
 */
static uint64_t limit_window_ms = 60000;
static struct ca_log_limit *limited;	/* listed sites */
static uv_timer_t limit_timer;
static int limit_timer_state;		/* 0 none, 1 initialised, 2 closed (the exit) */

static void limit_close(struct ca_log_limit *l, uint64_t now)
{
	if (l->more) {
		char msg[512];
		uint64_t ms = now - l->since;
		int n = snprintf(msg, sizeof msg, "%s (and %u more like this in the last %llu.%llu s, not logged; "
				 "this was the last)", l->last, l->more, (unsigned long long)(ms / 1000),
				 (unsigned long long)(ms % 1000 / 100));

		if (n < 0)
			n = 0;
		if ((size_t)n >= sizeof msg)
			n = (int)sizeof msg - 1;
		write_c_line(l->level, msg, (size_t)n, 0, l->more);
	}
	l->logged = l->more = 0;
}

/* Ends the listed windows that are over at now (all of them with all). */
static void close_listed(uint64_t now, int all)
{
	struct ca_log_limit **p = &limited;

	while (*p) {
		struct ca_log_limit *l = *p;

		if (all || now - l->since >= limit_window_ms) {
			*p = l->next;
			l->next = NULL;
			l->listed = 0;
			limit_close(l, now);
		} else {
			p = &l->next;
		}
	}
}

static void limit_arm(uint64_t now);

static void on_limit_timer(uv_timer_t *t)
{
	uint64_t now = uv_now(t->loop);

	close_listed(now, 0);
	limit_arm(now);
}

/* The timer, for the earliest end of a listed window. */
static void limit_arm(uint64_t now)
{
	uint64_t due = UINT64_MAX;

	if (limit_timer_state == 2)
		return;
	for (struct ca_log_limit *l = limited; l; l = l->next)
		if (l->since + limit_window_ms < due)
			due = l->since + limit_window_ms;
	if (due == UINT64_MAX) {
		if (limit_timer_state == 1)
			uv_timer_stop(&limit_timer);
		return;
	}
	if (limit_timer_state == 0) {
		uv_timer_init(ca_loop(), &limit_timer);
		uv_unref((uv_handle_t *)&limit_timer);
		limit_timer_state = 1;
	}
	uv_timer_start(&limit_timer, on_limit_timer, due > now ? due - now : 0, 0);
}

/* The exit: every count written now, and the timer closed. */
static void limits_flush(void)
{
	close_listed(ca_loop() ? uv_now(ca_loop()) : 0, 1);
	if (limit_timer_state == 1)
		uv_close((uv_handle_t *)&limit_timer, NULL);
	limit_timer_state = 2;
}

void ca_log_limited(struct ca_log_limit *l, int level, const char *fmt, ...)
{
	uint64_t now;
	va_list ap;

	if (level < min_level)
		return;
	now = uv_now(ca_loop());
	if (l->logged && !l->listed && now - l->since >= limit_window_ms)
		l->logged = 0;	/* its window is over, with nothing counted */
	if (l->logged == 0)
		l->since = now;
	va_start(ap, fmt);
	if (l->logged < CA_LOG_LIMIT_LINES) {
		l->logged++;
		vlog(level, 0, fmt, ap);
	} else {
		char small[1024];
		struct buf r;
		int m;
		char *msg = format_whole(small, sizeof small, &m, fmt, ap);

		/*
		 * Redacted before it is cut: a line may quote a client's path,
		 * which may hold a secret, and a cut across one would leave its
		 * head, which the redaction at the write no longer knows.
		 */
		b_init(&r);
		redact(&r, msg, (size_t)m);
		if (msg != small)
			free(msg);
		if (r.n >= sizeof l->last) {
			memcpy(l->last, r.p, sizeof l->last - 4);
			memcpy(l->last + sizeof l->last - 4, "...", 4);
		} else {
			memcpy(l->last, r.p, r.n);
			l->last[r.n] = '\0';
		}
		b_free(&r);
		l->more++;
		l->level = level;
		if (!l->listed) {
			l->listed = 1;
			l->next = limited;
			limited = l;
			limit_arm(now);
		}
	}
	va_end(ap);
}

int ca__log_set_format(const char *f)
{
	if (strcmp(f, "text") && strcmp(f, "json"))
		return -1;
	json_format = f[0] == 'j';
	return 0;
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

/* Secrets are kept longest first: one that starts another cannot leave its tail. */
static int l_add_secret(lua_State *L)
{
	size_t len;
	const char *s = luaL_checklstring(L, 1, &len);
	int at;

	luaL_argcheck(L, len >= CA_MIN_SECRET, 1, "a secret must be at least 8 bytes");
	for (int i = 0; i < n_secrets; i++)
		if (secret_len[i] == len && memcmp(secrets[i], s, len) == 0)
			return 0;
	if (n_secrets == CA_MAX_SECRETS)
		return luaL_error(L, "too many secrets registered (max %d)", CA_MAX_SECRETS);
	for (at = n_secrets; at > 0 && secret_len[at - 1] < len; at--) {
		secrets[at] = secrets[at - 1];
		secret_len[at] = secret_len[at - 1];
	}
	secrets[at] = ca_malloc(len);
	memcpy(secrets[at], s, len);
	secret_len[at] = len;
	n_secrets++;
	first_bytes[(unsigned char)s[0] >> 3] |= (unsigned char)(1u << ((unsigned char)s[0] & 7));
	return 0;
}

static int l_format(lua_State *L)
{
	if (!lua_isnoneornil(L, 1)) {
		luaL_argcheck(L, ca__log_set_format(luaL_checkstring(L, 1)) == 0, 1, "format must be text or json");
	}
	lua_pushstring(L, json_format ? "json" : "text");
	return 1;
}

/* Text that is not a log line (an API answer, a webhook, the store) goes through the same redact(). */
static int l_scrub(lua_State *L)
{
	size_t len;
	const char *s = luaL_checklstring(L, 1, &len);
	struct buf out;

	if (!ca__log_holds_secret(s, len)) {
		lua_settop(L, 1);
		return 1;
	}
	b_init(&out);
	redact(&out, s, len);
	lua_pushlstring(L, out.p, out.n);
	b_free(&out);
	return 1;
}

static int l_limits(lua_State *L)
{
	if (!lua_isnoneornil(L, 1)) {
		lua_Integer ms = luaL_checkinteger(L, 1);

		luaL_argcheck(L, ms >= 1 && ms <= 86400000, 1, "window must be 1..86400000 ms");
		limit_window_ms = (uint64_t)ms;
	}
	lua_pushinteger(L, (lua_Integer)limit_window_ms);
	return 1;
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
		{"limits", l_limits},
		{"format", l_format},
		{"scrub", l_scrub},
		{NULL, NULL}
	};
	luaL_newlib(L, fns);
	return 1;
}
