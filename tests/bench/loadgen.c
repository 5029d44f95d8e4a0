/*
 * loadgen.c - the benchmark's data plane (see tests/bench/bench.lua).
 *
 * One process, one thread, one epoll loop, non-blocking sockets:
 *   - fake Twilio Media Streams clients: a WebSocket connection per call to
 *     callagent's /voice/stream, `connected` + `start`, then one `media`
 *     message (160 bytes of mu-law) every 20 ms on phase k % 20; every
 *     `mark` callagent sends is echoed at once, every `media` it sends is
 *     counted and timed against the model delta it came from;
 *   - a fake OpenAI Realtime server on 127.0.0.1: session.created on
 *     connect, session.updated for a session.update (which names the call:
 *     "bench call #<k>"), and for every input_audio_buffer.append a
 *     response.output_audio.delta (the appended audio echoed, or in pcm
 *     mode 20 ms of a 24 kHz 16-bit sine); and every LOADGEN_TURN appends
 *     of a call (default 250: a turn each 5 s; 0: never; the first turn
 *     of each call after a random share of that, so calls set up together
 *     do not all end their turns at the same moment) what ends a turn:
 *     the caller's transcript, the agent's transcript and a response.done
 *     with usage, so callagent's store writes while the audio flows.
 *     With LOADGEN_TLS_CERT and LOADGEN_TLS_KEY (PEM files) it serves
 *     wss:// (TLS over memory BIOs, so the kernel time stamps still apply),
 *     as OpenAI does.
 *
 * Control: one-line commands on stdin, one-line replies on stdout.
 *   (at start)                              -> realtime <port>
 *   mode pcmu|pcm                           -> ok mode
 *   call <k> <ws_url> <signature> <stream_sid> <start_json>
 *                                           -> ok call; later, asynchronously:
 *                                              established <k> | failed <k> <reason>
 *   hangup <k>                              -> ok hangup <k> (`stop`, then close 1000 to
 *                                              callagent: the call is over)
 *   end <k>                                 -> ok end | error end <k> <reason>: the
 *                                              model ends call k as a real one does
 *                                              (see end_call)
 *   send on|off                             -> ok send (frames on the 20 ms schedule)
 *   measure start|stop                      -> ok measure (start resets histograms)
 *   wake tick|io                            -> ok wake (see below)
 *   stats                                   -> stats {json}
 *   quit (or EOF on stdin)                  -> ok quit, exit 0
 * Other asynchronous lines: closed <k> <code> (callagent closed call k's
 * stream), rt_closed <k> <code> (the model connection of call k went), both
 * only for calls not ended with `end`.
 *
 * Calls that come and go (the bench's churn row): `end <k>` has the model
 * call report_call and, asked for the goodbye, say it and fall silent;
 * callagent then hangs up through the fake Twilio, which sends `hangup <k>`.
 * Once both of an ended call's connections are gone its slot is freed, and
 * its counts move to the "ended" totals of `stats` ("unfreed": ended calls
 * with a connection still open). `hangup` ends a call too (the callee's).
 *
 * Latencies are CLOCK_MONOTONIC (a received message is timed by the kernel's
 * receive time stamp, SO_TIMESTAMPNS, so the generator's own delay in reading
 * it does not count), in 10 us buckets up to 100 ms, 1 ms buckets beyond;
 * "late" is how long after its 1 ms slot of the 20 ms schedule each frame
 * went out, "lag" how long received data waited in the kernel before the
 * generator read it (at most a tick when it keeps up): either one large
 * means the generator, not callagent, is the limit. "lat_in" leaves out each
 * call's first 25 frames (half a second), which may wait in callagent for
 * the call's model session to be ready: "lat_start" has those.
 *
 * Waking: on this kind of machine a loopback TCP send costs several us of
 * CPU, most of it the receiver's TCP path run inline, so the generator does
 * the least it can per frame: one send per message it must send (the
 * frame, the delta, the mark echo; the replies to what one read brought go
 * in one send), one recv per readable socket (up to 256 KiB, so whatever
 * queued is read at once), no locks, no threads. In
 * "tick" mode (the default) the loop sleeps on the 1 ms timer only: each
 * tick sends the frames due, then takes every socket event pending
 * (epoll_wait with timeout 0), so at most 1000 wake-ups a second whatever
 * the load, and replies (deltas, mark echoes) go out within the tick they
 * were read in, up to 1 ms after they arrived. "io" mode (LOADGEN_WAKE=io,
 * or `wake io`) also wakes for every socket event, replying sooner at the
 * price of a wake-up per message at low load.
 *
 * Build: cc -std=gnu11 -O2 -Wall -Wextra -o loadgen loadgen.c -lcrypto
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <openssl/ssl.h>

#define RING 1024			/* frames / deltas remembered per call (20 s) */
#define RBUF (256 * 1024)		/* one recv takes up to this much */
#define MAX_MSG (1 << 20)		/* largest WebSocket message accepted */
#define HB_NS 10000			/* histogram buckets: 10 us up to 100 ms, */
#define HB_FINE 10000
#define HB_COARSE_NS 1000000		/* then 1 ms up to 100 s; the max is kept exactly */
#define HBUCKETS (HB_FINE + 99900)
#define CONNECT_TIMEOUT_NS 30000000000LL
#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

enum kind { K_LISTEN = 1, K_TIMER, K_STDIN, K_SOCKETS, K_RT, K_PHONE };
enum state { S_CONNECTING, S_HANDSHAKE, S_OPEN, S_CLOSING, S_DEAD };
enum call_state { C_NEW, C_CONNECTING, C_OPEN, C_FAILED, C_CLOSED };

struct obj {
	int kind;
	int fd;
};

struct buf {
	char *p;
	size_t len, off, cap;		/* data is p[off, len) */
};

struct call;

struct conn {
	struct obj o;
	int state;
	uint32_t events;		/* registered with epoll */
	struct call *call;
	struct buf in, out, frag;
	int frag_op;
	int close_code;
	char key[32];			/* client: expected Sec-WebSocket-Accept */
	int64_t t_start;		/* accepted / connect() called */
	struct conn *next_dead;
	SSL *ssl;			/* LOADGEN_TLS_CERT: the model side speaks TLS */
	BIO *rbio, *wbio;		/* memory BIOs, owned by ssl */
};

struct call {
	int k, state;
	struct conn *phone, *rt;
	char sid[72];
	size_t sid_len;
	char item[32];
	size_t item_len;
	char *host, *path, *sig, *start;
	int port;
	int64_t deadline;
	uint32_t next_frame, seq;
	uint64_t frames, appends, deltas, media, marks;
	uint32_t since_turn, turns;
	int ending;			/* `end`: 1 report sent; 2 goodbye said, the model is silent;
					 * 3: hung up (`hangup`) without `end` */
	int retiring;			/* on the retire list: freed at the end of this loop turn */
	struct call *next_retired;
	uint32_t sent_idx[RING];
	int64_t sent_at[RING];
	int64_t delta_at[RING];
};

struct hist {
	uint32_t *b;
	uint64_t n;
	int64_t max;
};

/* ---- globals ---- */

static int ep, wait_ep;		/* sockets; what the loop sleeps on */
static SSL_CTX *tls_ctx;		/* LOADGEN_TLS_CERT + LOADGEN_TLS_KEY: wss:// model side */
static int wake_io;			/* 1: wake for every socket event; 0: on the tick only */
static int64_t rx_ns;			/* when the data being handled arrived (kernel time stamp) */
static int64_t real_off;		/* CLOCK_REALTIME - CLOCK_MONOTONIC */
static struct obj listener = {K_LISTEN, -1}, tick = {K_TIMER, -1}, in_ctl = {K_STDIN, 0}, sockets_obj = {K_SOCKETS, -1};
static char *rbuf, *scratch;
static size_t scratch_cap;
static struct call **calls;
static int ncalls_cap;
static struct call **phase[20];
static int nphase[20], capphase[20];
static struct conn *dead_list;
static struct call *retire_list;
static int mode_pcm, sending = 1, measuring, quitting;
static int64_t t0, next_slot;
static struct hist lat_in, lat_out, late, lag;
/* A call's first half second in (frames 0-24): they may wait for its model session. */
static struct hist lat_start;
#define START_FRAMES 25
static uint64_t rng = 0x9e3779b97f4a7c15ULL;
static char ctl_line[1 << 16];
static size_t ctl_len;
static char tail_b64[256];		/* payload after the 4 chars of the frame index */
static size_t tail_len;
static char pcm_b64[1400];
static size_t pcm_len;

/* counters */
static uint64_t n_established, n_failed, n_closed, n_rt_conns, n_rt_closed, n_unbound, appends_raw;
static uint64_t frames0, appends0, deltas0, media0;
/* Handshake times, max: how long a model connection's upgrade request waited
 * for our 101 (from its arrival in the kernel, which may precede accept()),
 * and a phone connection's connect() -> 101 received. */
static int64_t rt_hs_max, phone_hs_max;
static uint64_t pings_rt, pings_phone;
static uint32_t turn_every = 250;	/* appends per turn of the fake model; 0: no turns */
static uint64_t n_turns;	/* pings received (answered with pongs) */
/* Ended calls (`end`): how many, and the counts of those whose slots were freed. */
static uint64_t n_end, n_retired, ret_frames, ret_appends, ret_deltas, ret_media, ret_marks;
static char bye_b64[256];		/* the goodbye's audio in pcmu mode: 20 ms of mu-law silence */
/* Back-pressure: sends the socket did not take whole (the peer is not reading
 * fast enough), and the most bytes one connection had queued. */
static uint64_t blocked_rt, blocked_phone;
static size_t queued_max_rt, queued_max_phone;
static int64_t cpu0_ns, cpu1_ns, win0_ns, win1_ns;

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t cpu_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint64_t xorshift(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static void *xmalloc(size_t n)
{
	void *p = malloc(n);

	if (!p) {
		fprintf(stderr, "loadgen: out of memory\n");
		exit(1);
	}
	return p;
}

static void *xrealloc(void *p, size_t n)
{
	p = realloc(p, n);
	if (!p) {
		fprintf(stderr, "loadgen: out of memory\n");
		exit(1);
	}
	return p;
}

static char *xstrndup(const char *s, size_t n)
{
	char *p = xmalloc(n + 1);

	memcpy(p, s, n);
	p[n] = '\0';
	return p;
}

/* A line to bench.lua (stdout is a pipe; lines are rare, so blocking is fine). */
static void say(const char *fmt, ...)
{
	char line[8192];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof line - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof line - 2)
		n = (int)sizeof line - 2;
	line[n++] = '\n';
	for (int off = 0; off < n;) {
		ssize_t w = write(1, line + off, (size_t)(n - off));

		if (w < 0) {
			if (errno == EINTR)
				continue;
			exit(0);	/* bench.lua is gone */
		}
		off += (int)w;
	}
}

/* sin without libm: range-reduce to [-pi, pi], then Taylor. */
static double lg_sin(double x)
{
	const double pi = 3.14159265358979323846;
	double x2, term, sum;

	x -= 2 * pi * (double)(long long)(x / (2 * pi));
	if (x > pi)
		x -= 2 * pi;
	if (x < -pi)
		x += 2 * pi;
	x2 = x * x;
	term = x;
	sum = x;
	for (int i = 1; i < 12; i++) {
		term *= -x2 / (double)((2 * i) * (2 * i + 1));
		sum += term;
	}
	return sum;
}

static long lfloor(double x)
{
	long i = (long)x;

	return (double)i > x ? i - 1 : i;
}

/* ---- histograms ---- */

static void hist_init(struct hist *h)
{
	if (!h->b)
		h->b = xmalloc(sizeof *h->b * HBUCKETS);
	memset(h->b, 0, sizeof *h->b * HBUCKETS);
	h->n = 0;
	h->max = 0;
}

static inline void hist_add(struct hist *h, int64_t ns)
{
	int64_t i;

	if (ns < 0)
		ns = 0;
	i = ns / HB_NS;
	if (i >= HB_FINE)
		i = HB_FINE + (ns - (int64_t)HB_FINE * HB_NS) / HB_COARSE_NS;
	if (i >= HBUCKETS)
		i = HBUCKETS - 1;
	h->b[i]++;
	h->n++;
	if (ns > h->max)
		h->max = ns;
}

/* The p-quantile in ms: the upper edge of its bucket (at most the max). */
static double hist_pct(const struct hist *h, double p)
{
	double want = (double)h->n * p;
	uint64_t seen = 0;

	if (h->n == 0)
		return 0;
	for (int i = 0; i < HBUCKETS; i++) {
		seen += h->b[i];
		if ((double)seen >= want && seen > 0) {
			int64_t edge = i < HB_FINE ? (int64_t)(i + 1) * HB_NS
						   : (int64_t)HB_FINE * HB_NS + (int64_t)(i - HB_FINE + 1) * HB_COARSE_NS;

			return (double)(edge < h->max ? edge : h->max) / 1e6;
		}
	}
	return (double)h->max / 1e6;
}

/* ---- base64 ---- */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static int8_t B64D[256];

static size_t b64_encode(const unsigned char *in, size_t n, char *out)
{
	return (size_t)EVP_EncodeBlock((unsigned char *)out, in, (int)n);
}

static void b64_init(void)
{
	memset(B64D, -1, sizeof B64D);
	for (int i = 0; i < 64; i++)
		B64D[(unsigned char)B64[i]] = (int8_t)i;
}

/* The first 3 bytes behind 4 base64 characters (little-endian), or -1. */
static long b64_idx(const char *s)
{
	int a = B64D[(unsigned char)s[0]], b = B64D[(unsigned char)s[1]];
	int c = B64D[(unsigned char)s[2]], d = B64D[(unsigned char)s[3]];

	if ((a | b | c | d) < 0)
		return -1;
	uint32_t v = (uint32_t)a << 18 | (uint32_t)b << 12 | (uint32_t)c << 6 | (uint32_t)d;
	/* bytes: v >> 16, v >> 8, v: the first is the lowest */
	return (long)(((v >> 16) & 0xff) | (v & 0xff00) | ((v & 0xff) << 16));
}

/* ---- buffers and sockets ---- */

static void buf_append(struct buf *b, const void *p, size_t n)
{
	if (b->off > 0 && b->off == b->len)
		b->off = b->len = 0;
	if (b->len + n > b->cap) {
		if (b->off > 0) {
			memmove(b->p, b->p + b->off, b->len - b->off);
			b->len -= b->off;
			b->off = 0;
		}
		if (b->len + n > b->cap) {
			size_t cap = b->cap ? b->cap : 512;

			while (cap < b->len + n)
				cap *= 2;
			b->p = xrealloc(b->p, cap);
			b->cap = cap;
		}
	}
	memcpy(b->p + b->len, p, n);
	b->len += n;
}

static void buf_free(struct buf *b)
{
	free(b->p);
	memset(b, 0, sizeof *b);
}

static char *room(size_t n)
{
	if (n > scratch_cap) {
		scratch_cap = n + 4096;
		scratch = xrealloc(scratch, scratch_cap);
	}
	return scratch;
}

static void set_events(struct conn *c)
{
	uint32_t want = EPOLLIN;
	struct epoll_event ev;

	if (c->state == S_CONNECTING || c->out.len > c->out.off)
		want |= EPOLLOUT;
	if (want == c->events)
		return;
	ev.events = want;
	ev.data.ptr = c;
	if (epoll_ctl(ep, EPOLL_CTL_MOD, c->o.fd, &ev) == 0)
		c->events = want;
}

static void conn_dead(struct conn *c, int code, const char *why);
static void set_wake(int io);

static void note_queued(struct conn *c)
{
	size_t q = c->out.len - c->out.off;

	if (c->o.kind == K_RT) {
		blocked_rt++;
		if (q > queued_max_rt)
			queued_max_rt = q;
	} else if (c->state != S_HANDSHAKE) {
		blocked_phone++;
		if (q > queued_max_phone)
			queued_max_phone = q;
	}
}

/*
 * The connection whose read is being handled: its replies (a delta per
 * append, mark echoes, the answer to a close) are gathered and sent in one
 * send once the read is handled (see on_readable), as callagent does - a
 * generator that fell behind and reads several messages at once then
 * catches up at less kernel cost.
 */
static struct conn *gathering;

/* Writes at once when nothing is queued; the rest waits for EPOLLOUT. */
static void raw_send(struct conn *c, const void *p, size_t n)
{
	if (c->state == S_DEAD)
		return;
	if (c == gathering) {
		buf_append(&c->out, p, n);
		return;
	}
	if (c->out.len == c->out.off) {
		ssize_t w = send(c->o.fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);

		if (w == (ssize_t)n)
			return;
		if (w < 0) {
			if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
				conn_dead(c, 1006, strerror(errno));
				return;
			}
			w = 0;
		}
		buf_append(&c->out, (const char *)p + w, n - (size_t)w);
		set_events(c);
		note_queued(c);
		return;
	}
	buf_append(&c->out, p, n);
	note_queued(c);
}

/* What TLS has written into the connection's memory BIO goes to the socket. */
static void tls_out(struct conn *c)
{
	char b[16384];
	int n;

	while (c->state != S_DEAD && (n = BIO_read(c->wbio, b, sizeof b)) > 0)
		raw_send(c, b, (size_t)n);
}

/* Plaintext out: through TLS when the connection has it. */
static void conn_send(struct conn *c, const void *p, size_t n)
{
	if (c->ssl == NULL) {
		raw_send(c, p, n);
		return;
	}
	if (c->state == S_DEAD)
		return;
	if (n && SSL_write(c->ssl, p, (int)n) <= 0) {
		ERR_clear_error();
		conn_dead(c, 1006, "TLS write failed");
		return;
	}
	tls_out(c);
}

static void conn_flush(struct conn *c)
{
	while (c->out.len > c->out.off) {
		ssize_t w = send(c->o.fd, c->out.p + c->out.off, c->out.len - c->out.off, MSG_NOSIGNAL | MSG_DONTWAIT);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				conn_dead(c, 1006, strerror(errno));
			return;
		}
		c->out.off += (size_t)w;
	}
	c->out.off = c->out.len = 0;
	if (c->state == S_CLOSING)
		shutdown(c->o.fd, SHUT_WR);
	set_events(c);
}

static size_t ws_header(unsigned char *h, int op, size_t n, int masked)
{
	size_t hl;

	h[0] = (unsigned char)(0x80 | op);
	if (n < 126) {
		h[1] = (unsigned char)n;
		hl = 2;
	} else if (n < 65536) {
		h[1] = 126;
		h[2] = (unsigned char)(n >> 8);
		h[3] = (unsigned char)n;
		hl = 4;
	} else {
		h[1] = 127;
		for (int i = 0; i < 8; i++)
			h[2 + i] = (unsigned char)((uint64_t)n >> (56 - 8 * i));
		hl = 10;
	}
	if (masked)
		h[1] |= 0x80;
	return hl;
}

static void mask_bytes(unsigned char *p, size_t n, const unsigned char key[4])
{
	uint32_t k32;
	uint64_t k64;
	size_t i = 0;

	memcpy(&k32, key, 4);
	k64 = (uint64_t)k32 << 32 | k32;
	for (; i + 8 <= n; i += 8) {
		uint64_t v;

		memcpy(&v, p + i, 8);
		v ^= k64;
		memcpy(p + i, &v, 8);
	}
	for (; i < n; i++)
		p[i] ^= key[i & 3];
}

/* One WebSocket frame: masked from the phone clients, plain from the server. */
static void ws_send(struct conn *c, int op, const char *payload, size_t n)
{
	int masked = c->o.kind == K_PHONE;
	unsigned char *f;
	size_t hl;

	if (c->state != S_OPEN)
		return;		/* closing: only the close frame went */
	f = (unsigned char *)room(n + 14);
	hl = ws_header(f, op, n, masked);

	if (masked) {
		uint32_t key = (uint32_t)xorshift();

		memcpy(f + hl, &key, 4);
		hl += 4;
		memcpy(f + hl, payload, n);
		mask_bytes(f + hl, n, f + hl - 4);
	} else {
		memcpy(f + hl, payload, n);
	}
	conn_send(c, f, hl + n);
}

static void ws_close(struct conn *c, int code)
{
	char p[2] = {(char)(code >> 8), (char)code};

	if (c->state != S_OPEN)
		return;
	ws_send(c, 8, p, 2);
	c->state = S_CLOSING;
	if (c->out.len == c->out.off)
		shutdown(c->o.fd, SHUT_WR);
}

/* ---- calls ---- */

static struct call *get_call(int k)
{
	if (k < 0 || k > 10000000)
		return NULL;
	if (k >= ncalls_cap) {
		int cap = ncalls_cap ? ncalls_cap : 1024;

		while (cap <= k)
			cap *= 2;
		calls = xrealloc(calls, sizeof *calls * (size_t)cap);
		memset(calls + ncalls_cap, 0, sizeof *calls * (size_t)(cap - ncalls_cap));
		ncalls_cap = cap;
	}
	if (!calls[k]) {
		struct call *c = calloc(1, sizeof *c);

		if (!c) {
			fprintf(stderr, "loadgen: out of memory\n");
			exit(1);
		}
		c->k = k;
		c->item_len = (size_t)snprintf(c->item, sizeof c->item, "item_%d", k);
		calls[k] = c;
	}
	return calls[k];
}

static void schedule(struct call *c)
{
	int ph = c->k % 20;

	if (nphase[ph] == capphase[ph]) {
		capphase[ph] = capphase[ph] ? capphase[ph] * 2 : 64;
		phase[ph] = xrealloc(phase[ph], sizeof *phase[ph] * (size_t)capphase[ph]);
	}
	phase[ph][nphase[ph]++] = c;
}

static void call_failed(struct call *c, const char *why)
{
	if (c->state != C_CONNECTING && c->state != C_NEW)
		return;
	c->state = C_FAILED;
	n_failed++;
	say("failed %d %s", c->k, why);
}

static struct conn *conn_new(int kind, int fd)
{
	struct conn *c = calloc(1, sizeof *c);
	struct epoll_event ev;
	int one = 1;

	if (!c) {
		fprintf(stderr, "loadgen: out of memory\n");
		exit(1);
	}
	c->o.kind = kind;
	c->o.fd = fd;
	c->close_code = 1006;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one);
	c->events = EPOLLIN | (kind == K_PHONE ? EPOLLOUT : 0);
	ev.events = c->events;
	ev.data.ptr = c;
	if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
		fprintf(stderr, "loadgen: epoll_ctl: %s\n", strerror(errno));
		exit(1);
	}
	return c;
}

/* Closes the socket now; the memory goes at the end of this loop turn. */
static void conn_dead(struct conn *c, int code, const char *why)
{
	struct call *call = c->call;

	if (c->state == S_DEAD)
		return;
	int was = c->state;

	c->state = S_DEAD;
	close(c->o.fd);
	c->o.fd = -1;
	c->next_dead = dead_list;
	dead_list = c;
	if (c->o.kind == K_PHONE && call) {
		call->phone = NULL;
		if (call->state == C_CONNECTING) {
			char msg[256];

			snprintf(msg, sizeof msg, "%s%s", was == S_CONNECTING ? "connect: " : "handshake: ",
				 why ? why : "closed");
			call_failed(call, msg);
		} else if (call->state == C_OPEN) {
			call->state = C_CLOSED;
			n_closed++;
			if (!quitting && !call->ending)
				say("closed %d %d", call->k, code);
		}
	} else if (c->o.kind == K_RT) {
		n_rt_closed++;
		if (call && call->rt == c) {
			call->rt = NULL;
			if (!quitting && !call->ending)
				say("rt_closed %d %d", call->k, code);
		}
	}
	/* An ended call whose connections are both gone: its slot is freed. */
	if (call && call->ending && !call->phone && !call->rt && !call->retiring && !quitting) {
		call->retiring = 1;
		call->next_retired = retire_list;
		retire_list = call;
	}
}

static void unschedule(struct call *c)
{
	int ph = c->k % 20;

	for (int i = 0; i < nphase[ph]; i++) {
		if (phase[ph][i] == c) {
			phase[ph][i] = phase[ph][--nphase[ph]];
			return;
		}
	}
}

static void free_dead(void)
{
	while (dead_list) {
		struct conn *c = dead_list;

		dead_list = c->next_dead;
		buf_free(&c->in);
		buf_free(&c->out);
		buf_free(&c->frag);
		SSL_free(c->ssl);
		free(c);
	}
	while (retire_list) {
		struct call *c = retire_list;

		retire_list = c->next_retired;
		unschedule(c);
		ret_frames += c->frames;
		ret_appends += c->appends;
		ret_deltas += c->deltas;
		ret_media += c->media;
		ret_marks += c->marks;
		n_retired++;
		calls[c->k] = NULL;
		free(c->host);
		free(c->path);
		free(c->sig);
		free(c->start);
		free(c);
	}
}

/* ---- the phone side: Twilio Media Streams client ---- */

static void phone_connect(struct call *c)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)c->port)};
	int fd;

	if (inet_pton(AF_INET, c->host, &sa.sin_addr) != 1 || (ntohl(sa.sin_addr.s_addr) >> 24) != 127) {
		call_failed(c, "connect: only 127.x.x.x addresses (loopback)");
		return;
	}
	fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		call_failed(c, strerror(errno));
		return;
	}
	c->phone = conn_new(K_PHONE, fd);
	c->phone->call = c;
	c->phone->t_start = now_ns();
	c->phone->state = S_CONNECTING;
	c->state = C_CONNECTING;
	c->deadline = now_ns() + CONNECT_TIMEOUT_NS;
	if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS)
		conn_dead(c->phone, 1006, strerror(errno));
}

static void phone_connected(struct conn *c)
{
	struct call *call = c->call;
	unsigned char raw[16], sha[SHA_DIGEST_LENGTH];
	char key[32], accept_src[96];
	int err = 0;
	socklen_t el = sizeof err;

	if (getsockopt(c->o.fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0 || err) {
		conn_dead(c, 1006, strerror(err ? err : errno));
		return;
	}
	for (int i = 0; i < 16; i += 8) {
		uint64_t r = xorshift();

		memcpy(raw + i, &r, 8);
	}
	b64_encode(raw, 16, key);
	snprintf(accept_src, sizeof accept_src, "%s%s", key, WS_GUID);
	SHA1((const unsigned char *)accept_src, strlen(accept_src), sha);
	b64_encode(sha, sizeof sha, c->key);
	c->state = S_HANDSHAKE;
	char *req = room(strlen(call->path) + strlen(call->sig) + 512);
	int n = sprintf(req,
			"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
			"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nX-Twilio-Signature: %s\r\n"
			"User-Agent: TwilioProxy/1.1\r\n\r\n",
			call->path, call->host, call->port, key, call->sig);

	conn_send(c, req, (size_t)n);
	set_events(c);
}

static void phone_open(struct conn *c)
{
	struct call *call = c->call;
	static const char connected[] = "{\"event\":\"connected\",\"protocol\":\"Call\",\"version\":\"1.0.0\"}";
	char *start = call->start;

	c->state = S_OPEN;
	if (now_ns() - c->t_start > phone_hs_max)
		phone_hs_max = now_ns() - c->t_start;
	ws_send(c, 1, connected, sizeof connected - 1);
	ws_send(c, 1, start, strlen(start));
	free(call->start);
	call->start = NULL;
	call->seq = 1;
	call->state = C_OPEN;
	n_established++;
	schedule(call);
	say("established %d", call->k);
}

/*
 * The value of header name ("lower-case-name:") in the HTTP head p[0..hl),
 * leading spaces skipped; its length in *len. NULL when it is not there.
 */
static const char *header_value(const char *p, size_t hl, const char *name, size_t *len)
{
	size_t nl = strlen(name);
	const char *h = memmem(p, hl, "\r\n", 2);	/* past the request or status line */

	while (h && h + 2 < p + hl) {
		const char *eol;

		h += 2;
		eol = memmem(h, (size_t)(p + hl - h), "\r\n", 2);
		if (!eol)
			break;
		if ((size_t)(eol - h) > nl && strncasecmp(h, name, nl) == 0) {
			const char *v = h + nl;

			while (v < eol && *v == ' ')
				v++;
			*len = (size_t)(eol - v);
			return v;
		}
		h = eol;
	}
	return NULL;
}

/* The handshake response: 0 = need more, -1 = failed, else its length. */
static ssize_t phone_handshake(struct conn *c, const char *p, size_t n)
{
	const char *end = memmem(p, n, "\r\n\r\n", 4);
	char msg[160];

	if (!end)
		return n > 16384 ? -1 : 0;
	size_t hl = (size_t)(end - p) + 4;

	if (hl < 12 || memcmp(p, "HTTP/1.1 101", 12) != 0) {
		const char *eol = memchr(p, '\r', hl);

		snprintf(msg, sizeof msg, "server answered %.*s", (int)(eol ? eol - p : 40), p);
		conn_dead(c, 1006, msg);
		return -1;
	}
	/* Sec-WebSocket-Accept must match the key we sent. */
	size_t al;
	const char *acc = header_value(p, hl, "sec-websocket-accept:", &al);

	if (!acc || al != strlen(c->key) || memcmp(acc, c->key, al) != 0) {
		conn_dead(c, 1006, "bad Sec-WebSocket-Accept");
		return -1;
	}
	phone_open(c);
	return (ssize_t)hl;
}

/* Every 20 ms per call: one `media` message, as Twilio sends it. */
static void send_frame(struct call *c, int64_t slot_ns)
{
	struct conn *pc = c->phone;
	uint32_t idx = c->next_frame++;
	unsigned char f[640];
	char *m = (char *)f + 8, *q = m;
	unsigned char three[3] = {(unsigned char)idx, (unsigned char)(idx >> 8), (unsigned char)(idx >> 16)};
	int64_t t;

	c->seq++;
#define PUT(s) (memcpy(q, s, sizeof s - 1), q += sizeof s - 1)
	PUT("{\"event\":\"media\",\"sequenceNumber\":\"");
	q += sprintf(q, "%u", c->seq);
	PUT("\",\"streamSid\":\"");
	memcpy(q, c->sid, c->sid_len);
	q += c->sid_len;
	PUT("\",\"media\":{\"track\":\"inbound\",\"chunk\":\"");
	q += sprintf(q, "%u", idx);
	PUT("\",\"timestamp\":\"");
	q += sprintf(q, "%llu", (unsigned long long)idx * 20);
	PUT("\",\"payload\":\"");
	q[0] = B64[three[0] >> 2];
	q[1] = B64[((three[0] & 3) << 4) | (three[1] >> 4)];
	q[2] = B64[((three[1] & 15) << 2) | (three[2] >> 6)];
	q[3] = B64[three[2] & 63];
	q += 4;
	memcpy(q, tail_b64, tail_len);
	q += tail_len;
	PUT("\"}}");
#undef PUT
	size_t n = (size_t)(q - m);
	/* Header (4 bytes for 126..65535) + mask right before the payload. */
	unsigned char *h = (unsigned char *)m - 8;
	uint32_t key = (uint32_t)xorshift();

	h[0] = 0x81;
	h[1] = 0x80 | 126;
	h[2] = (unsigned char)(n >> 8);
	h[3] = (unsigned char)n;
	memcpy(h + 4, &key, 4);
	mask_bytes((unsigned char *)m, n, h + 4);
	t = now_ns();
	c->sent_idx[idx % RING] = idx & 0xffffff;
	c->sent_at[idx % RING] = t;
	c->frames++;
	if (measuring)
		hist_add(&late, t - slot_ns);
	conn_send(pc, h, n + 8);
}

static void phone_message(struct conn *c, char *p, size_t n)
{
	struct call *call = c->call;

	if (n > 16 && memcmp(p, "{\"event\":\"media\"", 16) == 0) {
		goto media;
	} else if (n > 15 && memcmp(p, "{\"event\":\"mark\"", 15) == 0) {
		goto mark;
	} else if (memmem(p, n, "\"event\":\"media\"", 15)) {
		goto media;
	} else if (memmem(p, n, "\"event\":\"mark\"", 14)) {
		goto mark;
	}
	return;
media: {
	uint64_t m = call->media++;

	if (m < call->deltas) {
		int64_t t = call->delta_at[m % RING];

		if (t && measuring)
			hist_add(&lat_out, rx_ns - t);
		call->delta_at[m % RING] = 0;
	}
	return;
}
mark: {
	const char *v = memmem(p, n, "\"name\":\"", 8), *e;

	if (!v)
		return;
	v += 8;
	e = memchr(v, '"', (size_t)(p + n - v));
	if (!e || e - v > 200)
		return;
	call->marks++;
	char echo[512];
	int len = snprintf(echo, sizeof echo, "{\"event\":\"mark\",\"streamSid\":\"%s\",\"mark\":{\"name\":\"%.*s\"}}",
			   call->sid, (int)(e - v), v);

	ws_send(c, 1, echo, (size_t)len);
}
}

/* ---- the model side: fake OpenAI Realtime server ---- */

static void rt_accept(void)
{
	for (;;) {
		int fd = accept4(listener.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

		if (fd < 0) {
			if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
				fprintf(stderr, "loadgen: accept: %s\n", strerror(errno));
			return;
		}
		struct conn *c = conn_new(K_RT, fd);

		if (tls_ctx) {
			c->ssl = SSL_new(tls_ctx);
			c->rbio = BIO_new(BIO_s_mem());
			c->wbio = BIO_new(BIO_s_mem());
			if (!c->ssl || !c->rbio || !c->wbio) {
				fprintf(stderr, "loadgen: out of memory for TLS\n");
				exit(1);
			}
			BIO_set_mem_eof_return(c->rbio, -1);
			SSL_set_bio(c->ssl, c->rbio, c->wbio);
			SSL_set_accept_state(c->ssl);
		}
		c->state = S_HANDSHAKE;
		c->t_start = now_ns();
		n_rt_conns++;
	}
}

static ssize_t rt_handshake(struct conn *c, const char *p, size_t n)
{
	const char *end = memmem(p, n, "\r\n\r\n", 4);
	char key[128] = "", out[512];
	unsigned char sha[SHA_DIGEST_LENGTH];
	char acc[64], src[256];

	if (!end)
		return n > 65536 ? -1 : 0;
	size_t hl = (size_t)(end - p) + 4, kl;
	const char *kv;

	if (hl < 16 || memcmp(p, "GET /v1/realtime", 16) != 0) {
		static const char nf[] = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

		conn_send(c, nf, sizeof nf - 1);
		conn_dead(c, 1006, "not /v1/realtime");
		return -1;
	}
	kv = header_value(p, hl, "sec-websocket-key:", &kl);
	if (kv && kl > 0 && kl < sizeof key) {
		memcpy(key, kv, kl);
		key[kl] = '\0';
	}
	if (!key[0]) {
		conn_dead(c, 1006, "no Sec-WebSocket-Key");
		return -1;
	}
	snprintf(src, sizeof src, "%s%s", key, WS_GUID);
	SHA1((const unsigned char *)src, strlen(src), sha);
	b64_encode(sha, sizeof sha, acc);
	int ol = snprintf(out, sizeof out,
			  "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
			  "Sec-WebSocket-Accept: %s\r\n\r\n", acc);
	static const char created[] = "{\"type\":\"session.created\",\"session\":{\"id\":\"sess_bench\",\"type\":\"realtime\"}}";
	unsigned char f[256];
	size_t fl = ws_header(f, 1, sizeof created - 1, 0);

	memcpy(f + fl, created, sizeof created - 1);
	fl += sizeof created - 1;
	/* The 101 and session.created in one write: the server speaks first. */
	memcpy(out + ol, f, fl);
	c->state = S_OPEN;
	conn_send(c, out, (size_t)ol + fl);
	int64_t t = now_ns(), since = rx_ns < c->t_start ? rx_ns : c->t_start;

	if (t - since > rt_hs_max)
		rt_hs_max = t - since;
	return (ssize_t)hl;
}

/* What ends a turn at the model: both sides' transcripts, then usage. */
static void end_turn(struct conn *c, struct call *call)
{
	char m[512];
	int n;

	call->since_turn = 0;
	call->turns++;
	n_turns++;
	n = snprintf(m, sizeof m, "{\"type\":\"conversation.item.input_audio_transcription.completed\","
		     "\"item_id\":\"item_in_%u\",\"content_index\":0,"
		     "\"transcript\":\"Caller turn %u of bench call %d.\"}", call->turns, call->turns, call->k);
	ws_send(c, 1, m, (size_t)n);
	n = snprintf(m, sizeof m, "{\"type\":\"response.output_audio_transcript.done\",\"response_id\":\"resp_b\","
		     "\"item_id\":\"%.*s\",\"output_index\":0,\"content_index\":0,"
		     "\"transcript\":\"Agent turn %u of bench call %d.\"}", (int)call->item_len, call->item,
		     call->turns, call->k);
	ws_send(c, 1, m, (size_t)n);
	n = snprintf(m, sizeof m, "{\"type\":\"response.done\",\"response\":{\"id\":\"resp_b\","
		     "\"status\":\"completed\",\"usage\":{\"total_tokens\":300,\"input_tokens\":200,"
		     "\"output_tokens\":100,\"input_token_details\":{\"text_tokens\":20,\"audio_tokens\":180,"
		     "\"cached_tokens\":0},\"output_token_details\":{\"text_tokens\":10,\"audio_tokens\":90}}}}");
	ws_send(c, 1, m, (size_t)n);
}

/*
 * `end <k>`: the model reports the call as OpenAI's Realtime API delivers a
 * function call - the finished function_call item, then its response.done.
 */
static int end_call(struct call *call)
{
	char m[1024];
	int n;

	if (!call->rt || call->rt->state != S_OPEN || call->ending)
		return -1;
	call->ending = 1;
	n_end++;
	n = snprintf(m, sizeof m, "{\"type\":\"response.output_item.done\",\"response_id\":\"resp_r%d\",\"output_index\":0,"
		     "\"item\":{\"id\":\"item_fc_%d\",\"type\":\"function_call\",\"status\":\"completed\","
		     "\"call_id\":\"call_r%d\",\"name\":\"report_call\",\"arguments\":\"{\\\"summary\\\":"
		     "\\\"Bench call %d is done.\\\",\\\"outcome\\\":\\\"success\\\",\\\"nextSteps\\\":[],"
		     "\\\"data\\\":{\\\"k\\\":%d}}\"}}", call->k, call->k, call->k, call->k, call->k);
	ws_send(call->rt, 1, m, (size_t)n);
	n = snprintf(m, sizeof m, "{\"type\":\"response.done\",\"response\":{\"id\":\"resp_r%d\",\"status\":\"completed\"}}",
		     call->k);
	ws_send(call->rt, 1, m, (size_t)n);
	return 0;
}

/* Asked for the goodbye (response.create after the report): one frame of it,
 * then silence. The response carries the create's metadata, as the service's
 * does: {"callagent":"N"}. */
static void goodbye(struct conn *c, struct call *call, const char *p, size_t len)
{
	static const char KEY[] = "\"callagent\":\"";
	const char *k = memmem(p, len, KEY, sizeof KEY - 1);
	int digits = 0;
	char m[2048];
	int n;

	if (k) {
		k += sizeof KEY - 1;
		while (digits < 12 && k + digits < p + len && k[digits] >= '0' && k[digits] <= '9')
			digits++;
	}
	call->ending = 2;
	if (digits)
		n = snprintf(m, sizeof m, "{\"type\":\"response.created\",\"response\":{\"id\":\"resp_bye%d\","
			     "\"status\":\"in_progress\",\"metadata\":{\"callagent\":\"%.*s\"}}}", call->k, digits, k);
	else
		n = snprintf(m, sizeof m, "{\"type\":\"response.created\",\"response\":{\"id\":\"resp_bye%d\","
			     "\"status\":\"in_progress\",\"metadata\":null}}", call->k);
	ws_send(c, 1, m, (size_t)n);
	n = snprintf(m, sizeof m, "{\"type\":\"response.output_audio.delta\",\"response_id\":\"resp_bye%d\","
		     "\"item_id\":\"item_bye%d\",\"output_index\":0,\"content_index\":0,\"delta\":\"%s\"}",
		     call->k, call->k, mode_pcm ? pcm_b64 : bye_b64);
	ws_send(c, 1, m, (size_t)n);
	n = snprintf(m, sizeof m, "{\"type\":\"response.output_audio_transcript.done\",\"response_id\":\"resp_bye%d\","
		     "\"item_id\":\"item_bye%d\",\"output_index\":0,\"content_index\":0,\"transcript\":\"Goodbye.\"}",
		     call->k, call->k);
	ws_send(c, 1, m, (size_t)n);
	n = snprintf(m, sizeof m, "{\"type\":\"response.done\",\"response\":{\"id\":\"resp_bye%d\",\"status\":\"completed\"}}",
		     call->k);
	ws_send(c, 1, m, (size_t)n);
}

static void rt_message(struct conn *c, char *p, size_t n)
{
	static const char APPEND[] = "{\"type\":\"input_audio_buffer.append\",\"audio\":\"";
	const char *audio = NULL;

	if (n > sizeof APPEND + 4 && memcmp(p, APPEND, sizeof APPEND - 1) == 0) {
		audio = p + sizeof APPEND - 1;
	} else if (memmem(p, n < 128 ? n : 128, "\"input_audio_buffer.append\"", 27)) {
		audio = memmem(p, n, "\"audio\":\"", 9);
		if (!audio)
			return;
		audio += 9;
	} else if (memmem(p, n, "\"session.update\"", 16)) {
		static const char upd[] = "{\"type\":\"session.updated\",\"session\":{\"type\":\"realtime\"}}";
		const char *b = memmem(p, n, "bench call #", 12);

		if (b) {
			struct call *call = get_call(atoi(b + 12));

			if (call) {
				/* A call has one model connection: one bound before lets go
				 * of it (an ended call's slot is freed once its own is gone). */
				if (call->rt && call->rt != c)
					call->rt->call = NULL;
				c->call = call;
				call->rt = c;
				/* Calls' turns end at random phases, as in real traffic,
				 * not all in the same quarter second (the calls were
				 * set up together). */
				if (turn_every)
					call->since_turn = (uint32_t)(xorshift() % turn_every);
			}
		}
		ws_send(c, 1, upd, sizeof upd - 1);
		return;
	} else if (c->call && c->call->ending == 1 && memmem(p, n, "\"response.create\"", 17)) {
		goodbye(c, c->call, p, n);
		return;
	} else {
		return;
	}

	struct call *call = c->call;
	const char *end = memchr(audio, '"', (size_t)(p + n - audio));
	size_t alen = end ? (size_t)(end - audio) : 0;

	appends_raw++;
	if (!call) {
		n_unbound++;
		return;
	}
	if (alen >= 4) {
		long idx = b64_idx(audio);

		if (idx >= 0 && call->sent_idx[idx % RING] == (uint32_t)idx && call->sent_at[idx % RING]) {
			call->appends++;
			if (measuring)
				hist_add(idx < START_FRAMES ? &lat_start : &lat_in, rx_ns - call->sent_at[idx % RING]);
			call->sent_at[idx % RING] = 0;
		}
	}
	if (call->ending == 2)
		return;		/* the goodbye was said: the model listens, silent */
	const char *delta = mode_pcm ? pcm_b64 : audio;
	size_t dl = mode_pcm ? pcm_len : alen;
	static const char pre[] = "{\"type\":\"response.output_audio.delta\",\"response_id\":\"resp_b\",\"item_id\":\"";
	static const char mid[] = "\",\"output_index\":0,\"content_index\":0,\"delta\":\"";
	size_t ml = sizeof pre - 1 + call->item_len + sizeof mid - 1 + dl + 2;
	unsigned char *f = (unsigned char *)room(ml + 16);
	size_t hl = ws_header(f, 1, ml, 0);
	char *q = (char *)f + hl;

	memcpy(q, pre, sizeof pre - 1);
	q += sizeof pre - 1;
	memcpy(q, call->item, call->item_len);
	q += call->item_len;
	memcpy(q, mid, sizeof mid - 1);
	q += sizeof mid - 1;
	memmove(q, delta, dl);	/* delta may point into our own input */
	q += dl;
	memcpy(q, "\"}", 2);
	call->delta_at[call->deltas % RING] = now_ns();
	call->deltas++;
	conn_send(c, f, hl + ml);
	if (turn_every && ++call->since_turn >= turn_every)
		end_turn(c, call);
}

/* ---- WebSocket frames in ---- */

static void on_message(struct conn *c, char *p, size_t n)
{
	if (c->o.kind == K_RT)
		rt_message(c, p, n);
	else if (c->call)
		phone_message(c, p, n);
}

static void on_frame(struct conn *c, int fin, int op, char *p, size_t n)
{
	switch (op) {
	case 8: {		/* close: answer it, then the peer closes */
		int code = n >= 2 ? ((unsigned char)p[0] << 8 | (unsigned char)p[1]) : 1005;

		c->close_code = code;
		if (c->state == S_OPEN) {
			ws_send(c, 8, p, n >= 2 ? 2 : 0);
			c->state = S_CLOSING;
			if (c->out.len == c->out.off)
				shutdown(c->o.fd, SHUT_WR);
		}
		return;
	}
	case 9:
		if (c->o.kind == K_RT)
			pings_rt++;
		else
			pings_phone++;
		ws_send(c, 10, p, n);
		return;
	case 10:
		return;
	case 0:
		if (!c->frag_op)
			return;
		buf_append(&c->frag, p, n);
		if (fin) {
			on_message(c, c->frag.p, c->frag.len);
			c->frag.len = 0;
			c->frag_op = 0;
		}
		return;
	case 1:
	case 2:
		if (fin) {
			on_message(c, p, n);
		} else {
			c->frag.len = 0;
			c->frag_op = op;
			buf_append(&c->frag, p, n);
		}
		return;
	default:
		conn_dead(c, 1002, "bad opcode");
	}
}

/* Consumes whole frames; returns how much, or -1 when the connection died. */
static ssize_t parse_frames(struct conn *c, char *p, size_t n)
{
	size_t off = 0;

	while (n - off >= 2 && c->state != S_DEAD) {
		unsigned char b0 = (unsigned char)p[off], b1 = (unsigned char)p[off + 1];
		uint64_t len = b1 & 0x7f;
		size_t h = 2;

		if (len == 126) {
			if (n - off < 4)
				break;
			len = (uint64_t)(unsigned char)p[off + 2] << 8 | (unsigned char)p[off + 3];
			h = 4;
		} else if (len == 127) {
			if (n - off < 10)
				break;
			len = 0;
			for (int i = 0; i < 8; i++)
				len = len << 8 | (unsigned char)p[off + 2 + i];
			h = 10;
		}
		if (len > MAX_MSG) {
			conn_dead(c, 1009, "message too big");
			return -1;
		}
		if (b1 & 0x80)
			h += 4;
		if (n - off < h + len)
			break;
		char *pl = p + off + h;

		if (b1 & 0x80)
			mask_bytes((unsigned char *)pl, (size_t)len, (unsigned char *)pl - 4);
		on_frame(c, b0 & 0x80, b0 & 0x0f, pl, (size_t)len);
		off += h + (size_t)len;
	}
	return c->state == S_DEAD ? -1 : (ssize_t)off;
}

/* New bytes from the socket: handshake, then frames; a partial frame waits in c->in. */
static void on_data(struct conn *c, char *p, size_t n)
{
	ssize_t used;

	if (c->in.len > c->in.off) {
		buf_append(&c->in, p, n);
		p = c->in.p + c->in.off;
		n = c->in.len - c->in.off;
	}
	if (c->state == S_HANDSHAKE) {
		used = c->o.kind == K_RT ? rt_handshake(c, p, n) : phone_handshake(c, p, n);
		if (used < 0)
			return;
		if (used == 0) {
			if (p != c->in.p + c->in.off)
				buf_append(&c->in, p, n);
			return;
		}
		p += used;
		n -= (size_t)used;
	}
	used = parse_frames(c, p, n);
	if (used < 0)
		return;
	p += used;
	n -= (size_t)used;
	if (c->in.len > c->in.off) {
		/* p points into c->in */
		c->in.off = (size_t)(p - c->in.p);
		if (c->in.off == c->in.len)
			c->in.off = c->in.len = 0;
	} else if (n > 0) {
		buf_append(&c->in, p, n);
	}
}

static void plain_in(struct conn *c, char *p, size_t n)
{
	if (c->state == S_CLOSING)
		parse_frames(c, p, n);	/* only the peer's close (or EOF) matters now */
	else
		on_data(c, p, n);
}

/* Ciphertext in: the handshake, then records, decrypted into plain_in. */
static void tls_in(struct conn *c, char *p, size_t n)
{
	static char plain[65536];

	if (BIO_write(c->rbio, p, (int)n) != (int)n) {
		conn_dead(c, 1006, "TLS: out of memory");
		return;
	}
	while (c->state != S_DEAD) {
		int r = SSL_read(c->ssl, plain, sizeof plain);

		if (r <= 0) {
			int e = SSL_get_error(c->ssl, r);

			tls_out(c);	/* handshake messages, alerts */
			if (e != SSL_ERROR_WANT_READ) {
				ERR_clear_error();
				conn_dead(c, 1006, e == SSL_ERROR_ZERO_RETURN ? "TLS closed" : "TLS error");
			}
			return;
		}
		plain_in(c, plain, (size_t)r);
	}
}

static void on_readable(struct conn *c)
{
	for (;;) {
		union {
			char buf[CMSG_SPACE(sizeof(struct timespec))];
			struct cmsghdr align;
		} ctl;
		struct iovec iov = {.iov_base = rbuf, .iov_len = RBUF};
		struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf, .msg_controllen = sizeof ctl.buf};
		ssize_t r = recvmsg(c->o.fd, &mh, 0);
		struct cmsghdr *cm = r > 0 ? CMSG_FIRSTHDR(&mh) : NULL;

		/* The kernel's receive time of the (last) segment read. */
		rx_ns = 0;
		if (cm && cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_TIMESTAMPNS) {
			struct timespec ts;

			memcpy(&ts, CMSG_DATA(cm), sizeof ts);
			rx_ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec - real_off;
		}
		if (rx_ns <= 0 || rx_ns > now_ns())
			rx_ns = now_ns();
		else if (measuring && r > 0)
			hist_add(&lag, now_ns() - rx_ns);

		if (r == 0) {
			conn_dead(c, c->close_code, "closed by peer");
			return;
		}
		if (r < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
				return;
			conn_dead(c, 1006, strerror(errno));
			return;
		}
		gathering = c;
		if (c->ssl)
			tls_in(c, rbuf, (size_t)r);
		else
			plain_in(c, rbuf, (size_t)r);
		gathering = NULL;
		if (c->state != S_DEAD && c->out.len > c->out.off) {
			conn_flush(c);
			if (c->state != S_DEAD && c->out.len > c->out.off) {
				set_events(c);	/* the rest waits for EPOLLOUT */
				note_queued(c);
			}
		}
		if (c->state == S_DEAD || r < RBUF)
			return;
	}
}

/* ---- the schedule ---- */

/*
 * Sends the frames of every slot due now. Slots that come due meanwhile wait
 * for the next call, so a generator that falls behind still reads its
 * sockets and stdin between slots (and reports how late it is).
 */
static void run_slots(void)
{
	int64_t t = now_ns();

	while (t0 + next_slot * 1000000 <= t) {
		if (sending) {
			int ph = (int)(next_slot % 20);
			int64_t slot_ns = t0 + next_slot * 1000000;

			for (int i = 0; i < nphase[ph]; i++) {
				struct call *c = phase[ph][i];

				if (c->state == C_OPEN && c->phone && c->phone->state == S_OPEN)
					send_frame(c, slot_ns);
			}
		}
		next_slot++;
	}
}

static void check_timeouts(void)
{
	int64_t t = now_ns();

	for (int k = 0; k < ncalls_cap; k++) {
		struct call *c = calls[k];

		if (c && c->state == C_CONNECTING && t > c->deadline && c->phone)
			conn_dead(c->phone, 1006, "timed out");
	}
}

/* ---- control ---- */

static void stats(void)
{
	uint64_t frames = 0, appends = 0, deltas = 0, media = 0, marks = 0, unfreed = 0;
	int64_t cpu = (measuring ? cpu_ns() : cpu1_ns) - cpu0_ns;
	int64_t win = (measuring ? now_ns() : win1_ns) - win0_ns;

	for (int k = 0; k < ncalls_cap; k++) {
		struct call *c = calls[k];

		if (!c)
			continue;
		frames += c->frames;
		appends += c->appends;
		deltas += c->deltas;
		media += c->media;
		marks += c->marks;
		unfreed += c->ending != 0;	/* ended, a connection still open */
	}
	say("stats {\"established\":%llu,\"failed\":%llu,\"closed\":%llu,\"rt_conns\":%llu,\"rt_closed\":%llu,"
	    "\"frames\":%llu,\"appends\":%llu,\"appends_raw\":%llu,\"unbound_appends\":%llu,\"deltas\":%llu,"
	    "\"media\":%llu,\"marks\":%llu,\"lost_in\":%lld,\"lost_out\":%lld,"
	    "\"window\":{\"frames\":%llu,\"appends\":%llu,\"deltas\":%llu,\"media\":%llu,\"seconds\":%.3f,\"cpu_s\":%.4f},"
	    "\"lat_in\":{\"n\":%llu,\"p50\":%.3f,\"p99\":%.3f,\"max\":%.3f},"
	    "\"lat_out\":{\"n\":%llu,\"p50\":%.3f,\"p99\":%.3f,\"max\":%.3f},"
	    "\"lat_start\":{\"n\":%llu,\"p50\":%.3f,\"p99\":%.3f,\"max\":%.3f},"
	    "\"late\":{\"n\":%llu,\"p50\":%.3f,\"p99\":%.3f,\"max\":%.3f},"
	    "\"lag\":{\"n\":%llu,\"p50\":%.3f,\"p99\":%.3f,\"max\":%.3f},\"cpu_total_s\":%.4f,"
	    "\"handshake_max_ms\":{\"model\":%.1f,\"phone\":%.1f},"
	    "\"pings\":{\"model\":%llu,\"phone\":%llu},\"turns\":%llu,"
	    "\"ended\":{\"asked\":%llu,\"freed\":%llu,\"unfreed\":%llu,\"frames\":%llu,\"appends\":%llu,\"deltas\":%llu,"
	    "\"media\":%llu,\"marks\":%llu},"
	    "\"send_queued\":{\"model\":%llu,\"model_max_bytes\":%zu,\"phone\":%llu,\"phone_max_bytes\":%zu}}",
	    (unsigned long long)n_established, (unsigned long long)n_failed, (unsigned long long)n_closed,
	    (unsigned long long)n_rt_conns, (unsigned long long)n_rt_closed, (unsigned long long)frames,
	    (unsigned long long)appends, (unsigned long long)appends_raw, (unsigned long long)n_unbound,
	    (unsigned long long)deltas, (unsigned long long)media, (unsigned long long)marks,
	    (long long)(frames - appends), (long long)(deltas - media), (unsigned long long)(frames - frames0),
	    (unsigned long long)(appends - appends0), (unsigned long long)(deltas - deltas0),
	    (unsigned long long)(media - media0), (double)win / 1e9, (double)cpu / 1e9,
	    (unsigned long long)lat_in.n, hist_pct(&lat_in, 0.5), hist_pct(&lat_in, 0.99), (double)lat_in.max / 1e6,
	    (unsigned long long)lat_out.n, hist_pct(&lat_out, 0.5), hist_pct(&lat_out, 0.99),
	    (double)lat_out.max / 1e6, (unsigned long long)lat_start.n, hist_pct(&lat_start, 0.5),
	    hist_pct(&lat_start, 0.99), (double)lat_start.max / 1e6, (unsigned long long)late.n, hist_pct(&late, 0.5), hist_pct(&late, 0.99),
	    (double)late.max / 1e6, (unsigned long long)lag.n, hist_pct(&lag, 0.5), hist_pct(&lag, 0.99),
	    (double)lag.max / 1e6, (double)cpu_ns() / 1e9, (double)rt_hs_max / 1e6,
	    (double)phone_hs_max / 1e6, (unsigned long long)pings_rt, (unsigned long long)pings_phone,
	    (unsigned long long)n_turns, (unsigned long long)n_end, (unsigned long long)n_retired, (unsigned long long)unfreed,
	    (unsigned long long)ret_frames, (unsigned long long)ret_appends, (unsigned long long)ret_deltas,
	    (unsigned long long)ret_media, (unsigned long long)ret_marks, (unsigned long long)blocked_rt, queued_max_rt, (unsigned long long)blocked_phone, queued_max_phone);
}

static void totals(uint64_t *f, uint64_t *a, uint64_t *d, uint64_t *m)
{
	*f = *a = *d = *m = 0;
	for (int k = 0; k < ncalls_cap; k++) {
		struct call *c = calls[k];

		if (c) {
			*f += c->frames;
			*a += c->appends;
			*d += c->deltas;
			*m += c->media;
		}
	}
}

static void quit(void)
{
	quitting = 1;
	for (int k = 0; k < ncalls_cap; k++) {
		struct call *c = calls[k];

		if (!c)
			continue;
		if (c->phone)
			conn_dead(c->phone, 1000, "quit");
		if (c->rt)
			conn_dead(c->rt, 1000, "quit");
	}
	say("ok quit");
	exit(0);
}

/* ws://host:port/path -> host, port, path ("/" at least). */
static int parse_ws_url(struct call *c, const char *u)
{
	const char *h, *slash, *colon;

	if (strncmp(u, "ws://", 5) != 0)
		return -1;
	h = u + 5;
	slash = strchr(h, '/');
	if (!slash)
		slash = h + strlen(h);
	colon = memchr(h, ':', (size_t)(slash - h));
	free(c->host);
	free(c->path);
	c->host = xstrndup(h, (size_t)((colon ? colon : slash) - h));
	if (strcmp(c->host, "localhost") == 0) {
		free(c->host);
		c->host = xstrndup("127.0.0.1", 9);
	}
	c->port = colon ? atoi(colon + 1) : 80;
	c->path = *slash ? xstrndup(slash, strlen(slash)) : xstrndup("/", 1);
	return c->port > 0 && c->port < 65536 ? 0 : -1;
}

static void command(char *line)
{
	char *save = NULL, *cmd = strtok_r(line, " ", &save);

	if (!cmd)
		return;
	if (strcmp(cmd, "mode") == 0) {
		char *m = strtok_r(NULL, " ", &save);

		mode_pcm = m && strcmp(m, "pcm") == 0;
		say("ok mode %s", mode_pcm ? "pcm" : "pcmu");
	} else if (strcmp(cmd, "call") == 0) {
		char *ks = strtok_r(NULL, " ", &save), *u = strtok_r(NULL, " ", &save);
		char *sig = strtok_r(NULL, " ", &save), *sid = strtok_r(NULL, " ", &save);
		char *start = save;
		struct call *c = ks ? get_call(atoi(ks)) : NULL;

		if (!c || !u || !sig || !sid || !start || !*start || strlen(sid) >= sizeof c->sid) {
			say("error call: call <k> <ws_url> <signature> <stream_sid> <start_json>");
			return;
		}
		if (c->state != C_NEW) {
			say("error call %d: already started", c->k);
			return;
		}
		say("ok call");
		if (parse_ws_url(c, u) < 0) {
			call_failed(c, "bad url");
			return;
		}
		c->sig = xstrndup(sig, strlen(sig));
		c->sid_len = strlen(sid);
		memcpy(c->sid, sid, c->sid_len + 1);
		c->start = xstrndup(start, strlen(start));
		phone_connect(c);
	} else if (strcmp(cmd, "hangup") == 0) {
		char *ks = strtok_r(NULL, " ", &save);
		int k = ks ? atoi(ks) : -1;

		if (k >= 0 && k < ncalls_cap && calls[k] && calls[k]->phone && calls[k]->phone->state == S_OPEN) {
			struct call *c = calls[k];
			char stop[256];
			int n = snprintf(stop, sizeof stop, "{\"event\":\"stop\",\"sequenceNumber\":\"%u\","
					 "\"streamSid\":\"%s\",\"stop\":{\"accountSid\":\"AC0\",\"callSid\":\"CA0\"}}",
					 ++c->seq, c->sid);

			/* As Twilio ends a stream: `stop`, then the close. A call
			 * not ended with `end` was hung up by the callee: its slot
			 * is freed too once both connections are gone. */
			if (!c->ending)
				c->ending = 3;
			ws_send(c->phone, 1, stop, (size_t)n);
			ws_close(c->phone, 1000);
		}
		say("ok hangup %d", k);
	} else if (strcmp(cmd, "end") == 0) {
		char *ks = strtok_r(NULL, " ", &save);
		int k = ks ? atoi(ks) : -1;

		if (k < 0 || k >= ncalls_cap || !calls[k] || end_call(calls[k]) < 0)
			say("error end %d: no live model session, or already ended", k);
		else
			say("ok end");
	} else if (strcmp(cmd, "send") == 0) {
		char *v = strtok_r(NULL, " ", &save);

		sending = !(v && strcmp(v, "off") == 0);
		say("ok send %s", sending ? "on" : "off");
	} else if (strcmp(cmd, "measure") == 0) {
		char *v = strtok_r(NULL, " ", &save);

		if (v && strcmp(v, "start") == 0) {
			hist_init(&lat_in);
			hist_init(&lat_out);
			hist_init(&lat_start);
			hist_init(&late);
			hist_init(&lag);
			totals(&frames0, &appends0, &deltas0, &media0);
			cpu0_ns = cpu_ns();
			win0_ns = now_ns();
			measuring = 1;
		} else if (measuring) {
			measuring = 0;
			cpu1_ns = cpu_ns();
			win1_ns = now_ns();
		}
		say("ok measure");
	} else if (strcmp(cmd, "wake") == 0) {
		char *v = strtok_r(NULL, " ", &save);

		set_wake(v && strcmp(v, "io") == 0);
		say("ok wake %s", wake_io ? "io" : "tick");
	} else if (strcmp(cmd, "stats") == 0) {
		stats();
	} else if (strcmp(cmd, "quit") == 0) {
		quit();
	} else {
		say("error unknown command: %s", cmd);
	}
}

static void on_stdin(void)
{
	for (;;) {
		ssize_t r = read(0, ctl_line + ctl_len, sizeof ctl_line - 1 - ctl_len);

		if (r == 0)
			quit();
		if (r < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return;
			quit();
		}
		ctl_len += (size_t)r;
		char *nl;

		while ((nl = memchr(ctl_line, '\n', ctl_len))) {
			size_t ll = (size_t)(nl - ctl_line);

			*nl = '\0';
			if (ll > 0 && ctl_line[ll - 1] == '\r')
				ctl_line[ll - 1] = '\0';
			command(ctl_line);
			memmove(ctl_line, nl + 1, ctl_len - ll - 1);
			ctl_len -= ll + 1;
		}
		if (ctl_len == sizeof ctl_line - 1) {
			say("error line too long");
			ctl_len = 0;
		}
	}
}

/* ---- main ---- */

static int64_t real_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void on_event(struct obj *o, uint32_t events)
{
	struct conn *c = (struct conn *)o;

	if (o->kind == K_LISTEN) {
		rt_accept();
		return;
	}
	if (c->state == S_DEAD)
		return;
	if (events & EPOLLOUT) {
		if (c->state == S_CONNECTING)
			phone_connected(c);
		else
			conn_flush(c);
	}
	if (c->state != S_DEAD && (events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
		on_readable(c);
}

/* The loop sleeps on the tick and stdin, and with wake_io on the sockets too. */
static void set_wake(int io)
{
	struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &sockets_obj};

	if (io && !wake_io)
		epoll_ctl(wait_ep, EPOLL_CTL_ADD, ep, &ev);
	else if (!io && wake_io)
		epoll_ctl(wait_ep, EPOLL_CTL_DEL, ep, NULL);
	wake_io = io;
}

static void init_audio(void)
{
	unsigned char pat[160], pcm[960];

	for (int i = 0; i < 160; i++) {
		long v = lfloor(40 * lg_sin(i / 3.0)) % 64;

		if (v < 0)
			v += 64;	/* Lua's floor modulo */
		pat[i] = (unsigned char)(0x80 + v);
	}
	tail_len = b64_encode(pat + 3, 157, tail_b64);
	for (int i = 0; i < 480; i++) {
		int16_t s = (int16_t)lfloor(6000 * lg_sin(2 * 3.14159265358979323846 * 440 * i / 24000));

		pcm[2 * i] = (unsigned char)((uint16_t)s & 0xff);
		pcm[2 * i + 1] = (unsigned char)((uint16_t)s >> 8);
	}
	pcm_len = b64_encode(pcm, sizeof pcm, pcm_b64);
	memset(pat, 0xff, sizeof pat);
	b64_encode(pat, sizeof pat, bye_b64);
}

int main(int argc, char **argv)
{
	int port = 0;
	struct rlimit rl;
	struct epoll_event ev, evs[64];
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t sl = sizeof sa;
	int one = 1;

	if (argc > 1)
		port = atoi(argv[1]);
	signal(SIGPIPE, SIG_IGN);
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	rng ^= (uint64_t)now_ns() * 0x2545F4914F6CDD1DULL ^ (uint64_t)getpid();
	b64_init();
	init_audio();
	rbuf = xmalloc(RBUF);
	room(65536);
	hist_init(&lat_in);
	hist_init(&lat_out);
	hist_init(&lat_start);
	hist_init(&late);
	hist_init(&lag);

	ep = epoll_create1(EPOLL_CLOEXEC);
	wait_ep = epoll_create1(EPOLL_CLOEXEC);
	real_off = real_now_ns() - now_ns();
	listener.fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	sa.sin_port = htons((uint16_t)port);
	setsockopt(listener.fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (ep < 0 || listener.fd < 0 || bind(listener.fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
	    listen(listener.fd, 4096) < 0 || getsockname(listener.fd, (struct sockaddr *)&sa, &sl) < 0) {
		fprintf(stderr, "loadgen: cannot listen on 127.0.0.1:%d: %s\n", port, strerror(errno));
		return 1;
	}
	ev.events = EPOLLIN;
	ev.data.ptr = &listener;
	epoll_ctl(ep, EPOLL_CTL_ADD, listener.fd, &ev);

	/* The 1 ms tick, on whole milliseconds of CLOCK_MONOTONIC. */
	tick.fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	t0 = (now_ns() / 1000000 + 1) * 1000000;
	struct itimerspec its = {.it_interval = {0, 1000000}, .it_value = {t0 / 1000000000, t0 % 1000000000}};

	if (tick.fd < 0 || timerfd_settime(tick.fd, TFD_TIMER_ABSTIME, &its, NULL) < 0) {
		fprintf(stderr, "loadgen: timerfd: %s\n", strerror(errno));
		return 1;
	}
	ev.events = EPOLLIN;
	ev.data.ptr = &tick;
	epoll_ctl(wait_ep, EPOLL_CTL_ADD, tick.fd, &ev);

	fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
	ev.events = EPOLLIN;
	ev.data.ptr = &in_ctl;
	epoll_ctl(wait_ep, EPOLL_CTL_ADD, 0, &ev);
	set_wake(getenv("LOADGEN_WAKE") && strcmp(getenv("LOADGEN_WAKE"), "io") == 0);
	if (getenv("LOADGEN_TURN"))
		turn_every = (uint32_t)strtoul(getenv("LOADGEN_TURN"), NULL, 10);
	if (getenv("LOADGEN_TLS_CERT") && getenv("LOADGEN_TLS_KEY")) {
		tls_ctx = SSL_CTX_new(TLS_server_method());
		if (!tls_ctx || SSL_CTX_use_certificate_chain_file(tls_ctx, getenv("LOADGEN_TLS_CERT")) != 1 ||
		    SSL_CTX_use_PrivateKey_file(tls_ctx, getenv("LOADGEN_TLS_KEY"), SSL_FILETYPE_PEM) != 1) {
			fprintf(stderr, "loadgen: cannot load the TLS certificate or key\n");
			return 1;
		}
		SSL_CTX_set_mode(tls_ctx, SSL_MODE_RELEASE_BUFFERS);
	}

	say("realtime %d", ntohs(sa.sin_port));

	uint64_t turns = 0;

	for (;;) {
		struct epoll_event wevs[8];
		int n = epoll_wait(wait_ep, wevs, 8, 100);

		if (n < 0) {
			if (errno != EINTR) {
				fprintf(stderr, "loadgen: epoll_wait: %s\n", strerror(errno));
				return 1;
			}
			n = 0;
		}
		for (int i = 0; i < n; i++) {
			struct obj *o = wevs[i].data.ptr;

			if (o->kind == K_TIMER) {
				uint64_t x;

				if (read(tick.fd, &x, sizeof x) < 0 && errno != EAGAIN)
					fprintf(stderr, "loadgen: timerfd read: %s\n", strerror(errno));
				if ((++turns & 127) == 0) {
					check_timeouts();
					real_off = real_now_ns() - now_ns();
				}
			} else if (o->kind == K_STDIN) {
				on_stdin();
			}
		}
		/*
		 * The frames due first, then everything the sockets have, looking
		 * at the clock every 16 events: a burst from callagent does not
		 * hold back the next frames. After 5 ms, back to the top for stdin
		 * (a generator that cannot keep up still answers its commands).
		 */
		run_slots();
		int m;
		int64_t until = now_ns() + 5000000;

		do {
			m = epoll_wait(ep, evs, (int)(sizeof evs / sizeof evs[0]), 0);
			for (int i = 0; i < m; i++) {
				on_event(evs[i].data.ptr, evs[i].events);
				if ((i & 15) == 15)
					run_slots();
			}
			run_slots();
		} while (m == (int)(sizeof evs / sizeof evs[0]) && now_ns() < until);
		free_dead();
	}
}
