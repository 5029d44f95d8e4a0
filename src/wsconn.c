/*
 * wsconn.c - the WebSocket connection object shared by the server side
 * (http.c) and the client (ws.c), and libwebsockets' place on our loop.
 *
 * Lua sees a connection as a "callagent.WebSocket" userdata:
 *
 *   conn:send(text)          queue a text message; true, or nil, err
 *   conn:send_binary(data)   queue a binary message
 *   conn:close([code=1000], [reason])  close after what is queued has been sent
 *   conn:abort()             drop the connection now, no close frame (peer sees 1006)
 *   conn:is_open()           true until closed (or while connecting: false)
 *   conn:buffered()          bytes queued and not yet taken by the socket (as on
 *                            the wire: a server's frame headers counted too)
 *   conn:stats()             {messages_in, messages_out, reads, writes}: the
 *                            messages (pings and pongs not counted), and
 *                            the recv / send calls once the socket is
 *                            callagent's (see ca__ws_take_socket; 0 before,
 *                            and on a TLS server, where lws does them)
 *   conn:pause() / conn:resume()  stop / restart reading from the peer: after
 *                            pause() no message (nor close) event comes until
 *                            resume(), even of what one read already brought
 *                            (that is kept, and handled after the resume, in
 *                            order, from the loop: not inside resume())
 *   conn.id                  a number unique in this process
 *   conn.<anything>          other fields live in a per-connection table, so
 *                            Lua code can keep its own state on the connection
 *
 * Send errors: "ECLOSED: ..." when the connection is closed or closing;
 * "ENOBUFS: ..." when the send queue would pass its limit - the peer is not
 * reading fast enough, so the connection is dropped (close code 1008), which
 * is how a slow peer is kept from growing memory without bound. An incoming
 * message larger than the limit closes the connection with 1009; a text
 * message that is not UTF-8 (checked as its fragments come: see
 * ca__utf8_check), and a close frame whose reason is not, with 1007 (RFC
 * 6455 8.1; neither is shown to the app, nor to a C tap).
 *
 * Events reach the connection's handler as handler(conn, event, a, b):
 * "open" (server: a = request table; client: a = response headers),
 * "text" (a = string), "binary" (a = string), "close" (a = code, b = reason),
 * and for a client that never connected "error" (a = "ECODE: message").
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/rand.h>

#include "wsconn.h"

/*
 * lws 4.1 keeps the close-frame write type private (lib/roles/ws/
 * private-lib-roles-ws.h); its value is part of the lws_write() ABI.
 */
#define CA_LWS_WRITE_CLOSE 4

static lua_Integer next_id;

lua_Integer ca__next_id(void)
{
	return ++next_id;
}

/* ---- libwebsockets on our loop ---- */

static void lws_log_emit(int level, const char *line)
{
	const char *msg = line;
	size_t n;

	/* Skip lws' own "[date] E: " prefix. */
	if (*msg == '[') {
		const char *e = strstr(msg, "] ");

		if (e)
			msg = e + 2;
	}
	n = strlen(msg);
	while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
		n--;
	if (strstr(msg, "Ran out of header data space")) {
		CA_LOG_LIMITED(CA_LOG_WARN, "http: request headers larger than the server's max_header: connection closed");
		return;
	}
	if (strstr(msg, "More hdr frags than we can deal with")) {
		/* Its WSI_TOKEN_COUNT (95) slots: the URI, the version, each query parameter, each known header line. */
		CA_LOG_LIMITED(CA_LOG_WARN, "http: a request with more query parameters and header lines than libwebsockets keeps "
		       "(about 90): connection closed");
		return;
	}
	(void)level;
	if (ca_log_enabled(CA_LOG_DEBUG))
		ca_log(CA_LOG_DEBUG, "lws: %.*s", (int)n, msg);
}

static void prepare(struct lws_context_creation_info *info)
{
	static void *foreign[1];

	foreign[0] = ca_loop();
	info->foreign_loops = foreign;
	info->options |= LWS_SERVER_OPTION_LIBUV;
}

/* ---- the one context ---- */

static struct lws_context *ctx;
static unsigned ctx_max_header;
static int ending;
static int pipe_fd = -1;		/* the context's eventfd */
static int placeholder[2] = {-1, -1};

struct handle_set {
	uv_handle_t **h;
	size_t n, cap;
};

static void collect(uv_handle_t *h, void *arg)
{
	struct handle_set *s = arg;

	if (s->n == s->cap) {
		s->cap = s->cap ? s->cap * 2 : 64;
		s->h = ca_realloc(s->h, s->cap * sizeof *s->h);
	}
	s->h[s->n++] = h;
}

static int in_set(struct handle_set *s, uv_handle_t *h)
{
	for (size_t i = 0; i < s->n; i++)
		if (s->h[i] == h)
			return 1;
	return 0;
}

/*
 * Runs fn, then returns (in *made) the libuv handles it added to the loop
 * and (in *poll_fd) the fd of the last poll handle among them.
 */
static void *watch_handles(void *(*fn)(void *), void *arg, struct handle_set *made, int *poll_fd)
{
	struct handle_set before = {0}, after = {0};
	void *r;

	uv_walk(ca_loop(), collect, &before);
	r = fn(arg);
	uv_walk(ca_loop(), collect, &after);
	*poll_fd = -1;
	for (size_t i = 0; i < after.n; i++) {
		uv_os_fd_t fd;

		if (in_set(&before, after.h[i]))
			continue;
		if (made)
			collect(after.h[i], made);
		if (after.h[i]->type == UV_POLL && uv_fileno(after.h[i], &fd) == 0)
			*poll_fd = fd;
	}
	free(before.h);
	free(after.h);
	return r;
}

static void *create_ctx(void *arg)
{
	return lws_create_context(arg);
}

static uv_timer_t reaper;
static int reap_ticks;
static struct handle_set ctx_handles;	/* the handles lws made for the context */

/* Whether any handle lws made for the context is still on the loop. */
static int ctx_handles_alive(void)
{
	struct handle_set now = {0};
	int alive = 0;

	uv_walk(ca_loop(), collect, &now);
	for (size_t i = 0; i < ctx_handles.n && !alive; i++)
		alive = in_set(&now, ctx_handles.h[i]);
	free(now.h);
	return alive;
}

/*
 * Destroying an lws context on a foreign loop takes two calls: the first
 * starts closing everything; once libuv has closed lws' handles, the second
 * frees the context (as lws' own foreign-loop example does). Calling it
 * again too early frees memory libuv still links to.
 */
static void on_reaper(uv_timer_t *t)
{
	if (ctx && reap_ticks++ == 0) {
		lws_context_destroy(ctx);
		/*
		 * lws 4.1.6 closes its eventfd now and again once libuv has
		 * closed the handle (lws issue #2514): anything opened in
		 * between would be closed under its owner. Hold the number.
		 */
		if (pipe_fd >= 0 && fcntl(pipe_fd, F_GETFD) < 0 && errno == EBADF && placeholder[0] >= 0)
			dup3(placeholder[0], pipe_fd, O_CLOEXEC);
		if (ctx)
			return;
	}
	if (ctx) {
		/* Give lws up to 2 s to close its connections and handles. */
		if (ctx_handles_alive() && reap_ticks < 400)
			return;
		lws_context_destroy(ctx);
		if (ctx)
			return;
	}
	free(ctx_handles.h);
	ctx_handles.h = NULL;
	uv_timer_stop(t);
	uv_close((uv_handle_t *)t, NULL);
}

static void end_ctx(void)
{
	if (ctx == NULL || ending)
		return;
	ending = 1;
	uv_timer_init(ca_loop(), &reaper);
	uv_timer_start(&reaper, on_reaper, 0, 5);
}

int ca__lws_ending(void)
{
	return ending;
}

struct lws_context *ca__lws_ctx(unsigned max_header, const char **err)
{
	struct lws_context_creation_info info;

	if (max_header == 0)
		max_header = ctx ? ctx_max_header : 8192;
	if (ctx) {
		if (max_header != ctx_max_header) {
			*err = "max_header is process-wide and already set: use http.configure before the first server or client";
			return NULL;
		}
		return ctx;
	}
	if (ending) {
		*err = "the program is stopping";
		return NULL;
	}
	lws_set_log_level(LLL_ERR | LLL_WARN, lws_log_emit);
	/*
	 * lws unloads its libuv plugin when the context is destroyed, even
	 * while libuv still holds close callbacks into it. Keep it loaded.
	 */
	if (dlopen(LWS_INSTALL_LIBDIR "/libwebsockets-evlib_uv.so", RTLD_NOW | RTLD_NODELETE) == NULL)
		ca_log(CA_LOG_WARN, "lws: cannot pin the libuv plugin: %s", dlerror());
	/* Opened before lws can free an fd number (see on_reaper). */
	if (placeholder[0] < 0 && pipe2(placeholder, O_CLOEXEC) != 0)
		placeholder[0] = placeholder[1] = -1;

	memset(&info, 0, sizeof info);
	prepare(&info);
	info.options |= LWS_SERVER_OPTION_EXPLICIT_VHOSTS | LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
	info.pcontext = &ctx;
	info.max_http_header_data = (unsigned short)(max_header > 65535 ? 0 : max_header);
	info.max_http_header_data2 = max_header;
	/*
	 * How many connections may hold a request head's buffer at once. lws
	 * gives one to each connection from its accept until its request is
	 * dispatched, and a connection that finds none waits, unread, for one to
	 * be freed: 1024 idle connections starved every new request, the 503 of
	 * max_connections included, for timeout_secs. Buffers are allocated on
	 * demand and freed after use, so the bound costs nothing until used:
	 * past every server's limits (an app's 4096, refused outright at twice
	 * that), at most 8192 x max_header bytes while that many are open.
	 */
	info.max_http_header_pool = 8192 + 64;
	info.timeout_secs = 30;
	info.keepalive_timeout = 30;
	ctx = watch_handles(create_ctx, &info, &ctx_handles, &pipe_fd);
	if (ctx == NULL) {
		free(ctx_handles.h);
		ctx_handles.h = NULL;
		*err = "cannot create the libwebsockets context";
		return NULL;
	}
	/* lws' own timers and wakeup pipe are not work of the program's. */
	for (size_t i = 0; i < ctx_handles.n; i++)
		uv_unref(ctx_handles.h[i]);
	ctx_max_header = max_header;
	ca__at_close(end_ctx);
	return ctx;
}

struct lws_vhost *ca__lws_vhost(struct lws_context_creation_info *info)
{
	prepare(info);
	return lws_create_vhost(ctx, info);
}

/* ---- headers ---- */

size_t ca__ows_trim(const char **s, size_t n)
{
	const char *p = *s;

	while (n && (*p == ' ' || *p == '\t')) {
		p++;
		n--;
	}
	while (n && (p[n - 1] == ' ' || p[n - 1] == '\t'))
		n--;
	*s = p;
	return n;
}

int ca__has_token(const char *v, size_t n, const char *token)
{
	size_t tl = strlen(token);

	for (size_t i = 0; i <= n;) {
		size_t j = i;
		const char *t = v + i;

		while (j < n && v[j] != ',')
			j++;
		if (ca__ows_trim(&t, j - i) == tl && strncasecmp(t, token, tl) == 0)
			return 1;
		i = j + 1;
	}
	return 0;
}

void ca__push_headers(lua_State *L, struct lws *wsi)
{
	char stackbuf[1024];

	lua_createtable(L, 0, 12);
	for (int t = 0; t < WSI_TOKEN_COUNT; t++) {
		const char *name = (const char *)lws_token_to_string((enum lws_token_indexes)t);
		size_t nl;
		int len;
		char *buf;

		if (name == NULL || t == WSI_TOKEN_HTTP_URI_ARGS)
			continue;
		nl = strlen(name);
		if (nl < 2 || name[nl - 1] != ':' || name[0] == ':')
			continue;
		len = lws_hdr_total_length(wsi, (enum lws_token_indexes)t);
		if (len <= 0)
			continue;
		buf = (size_t)len + 1 <= sizeof stackbuf ? stackbuf : ca_malloc((size_t)len + 1);
		len = lws_hdr_copy(wsi, buf, len + 1, (enum lws_token_indexes)t);
		/*
		 * An Upgrade: h2c that the server declined (src/http.c,
		 * LWS_CALLBACK_HTTP_CONFIRM_UPGRADE) is blanked in lws' table:
		 * its copy is NUL bytes. The request is one with no offer.
		 */
		if (t == WSI_TOKEN_UPGRADE && len > 0 && buf[0] == '\0')
			len = -1;
		if (len >= 0) {
			const char *v = buf;
			size_t vl = ca__ows_trim(&v, (size_t)len);

			lua_pushlstring(L, name, nl - 1);
			lua_pushlstring(L, v, vl);
			lua_rawset(L, -3);
		}
		if (buf != stackbuf)
			free(buf);
	}
}

/* ---- the connection object ---- */

struct ws_box {
	struct ca_ws *ws;
};

static int partial(const struct ca_ws *ws);
static void want_write(struct ca_ws *ws);
static int io_write(struct ca_ws *ws, unsigned char *buf, size_t len, int kind);
static void io_release(struct ca_ws *ws);

static struct ca_ws *check_ws(lua_State *L)
{
	struct ws_box *b = luaL_checkudata(L, 1, WS_MT);

	return b->ws;
}

struct ca_ws *ca__ws_check(lua_State *L, int idx)
{
	struct ws_box *b = luaL_checkudata(L, idx, WS_MT);

	if (b->ws == NULL)
		luaL_argerror(L, idx, "connection already freed");
	return b->ws;
}

struct ca_ws *ca__ws_new(lua_State *L, size_t max_message, size_t max_queue)
{
	struct ws_box *b = lua_newuserdatauv(L, sizeof *b, 1);
	struct ca_ws *ws;

	b->ws = NULL;
	luaL_setmetatable(L, WS_MT);
	lua_newtable(L);
	lua_setiuservalue(L, -2, 1);

	ws = ca_malloc(sizeof *ws);
	memset(ws, 0, sizeof *ws);
	ws->state = CA_WS_CONNECTING;
	ws->handler_ref = LUA_NOREF;
	ws->lua_alive = 1;
	ws->id = ca__next_id();
	ws->max_message = max_message;
	ws->max_queue = max_queue;
	lua_pushvalue(L, -1);
	ws->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
	b->ws = ws;
	return ws;
}

static void free_queue(struct ca_ws *ws)
{
	while (ws->head) {
		struct ca_wsmsg *n = ws->head->next;

		free(ws->head);
		ws->head = n;
	}
	ws->tail = NULL;
	ws->queued = 0;
}

void ca__ws_emit(struct ca_ws *ws, const char *event, int nargs)
{
	lua_State *L = ca_lua();

	if (L == NULL)
		return;
	if (ws->handler_ref == LUA_NOREF || ws->self_ref == LUA_NOREF) {
		lua_pop(L, nargs);
		return;
	}
	lua_rawgeti(L, LUA_REGISTRYINDEX, ws->handler_ref);
	lua_rawgeti(L, LUA_REGISTRYINDEX, ws->self_ref);
	lua_pushstring(L, event);
	lua_rotate(L, -(nargs + 3), 3);
	ca_call(L, nargs + 2, 0, "websocket handler");
}

void ca__ws_kill(struct lws *wsi)
{
	lws_set_timeout(wsi, PENDING_TIMEOUT_USER_OK, LWS_TO_KILL_ASYNC);
	/*
	 * The kill is a zero-delay lws timer; from outside an lws callback
	 * nothing would make lws look at its timers soon, so wake it.
	 */
	lws_cancel_service(lws_get_context(wsi));
}

/* A close has begun, ours (asked or failing) or the peer's: nothing more is sent. */
static int closing(const struct ca_ws *ws)
{
	return ws->close_code || ws->fail_code || ws->peer_code;
}

/* Drops the connection at once (nothing more can be sent to this peer). */
void ca__ws_drop(struct ca_ws *ws, int code, const char *reason)
{
	if (ws->fail_code || ws->wsi == NULL)
		return;
	/*
	 * The frames after this one in the read being parsed (a handler that
	 * aborts) are not answered either: no pong, no close frame.
	 */
	ws->fr.broken = 1;
	ws->fail_code = code;
	snprintf(ws->close_reason, sizeof ws->close_reason, "%s", reason);
	free_queue(ws);
	ca__ws_kill_conn(ws);
}

static void close_deadline(struct ca_ws *ws);

void ca__ws_fail(struct ca_ws *ws, int code, const char *reason)
{
	if (ws->fail_code || ws->wsi == NULL)
		return;
	/* Our close frame goes ahead of anything queued. */
	free_queue(ws);
	ws->close_code = code;
	ws->fail_code = code;
	snprintf(ws->close_reason, sizeof ws->close_reason, "%s", reason);
	want_write(ws);
	close_deadline(ws);
}

/* ---- UTF-8 of text messages ---- */

#define HIGH_BITS 0x8080808080808080ull

static inline uint64_t load64(const unsigned char *p)
{
	uint64_t w;

	memcpy(&w, p, 8);
	return w;
}

/* Bytes of ASCII at the start of p[0..n): 32 bytes at a time, then 8, then one. */
static size_t ascii_run(const unsigned char *p, size_t n)
{
	size_t i = 0;

	for (; i + 32 <= n; i += 32)
		if ((load64(p + i) | load64(p + i + 8) | load64(p + i + 16) | load64(p + i + 24)) & HIGH_BITS)
			break;
	for (; i + 8 <= n; i += 8)
		if (load64(p + i) & HIGH_BITS)
			break;
	while (i < n && p[i] < 0x80)
		i++;
	return i;
}

/*
 * Whether p[0..n) (1 to 4 bytes, none left after them) is the start of a
 * UTF-8 sequence that more bytes may complete. ca__utf8_len judges it with
 * continuation bytes after it: 0x80 fits any third and fourth byte, and
 * every lead byte's second takes 0x80 or 0xa0.
 */
static int utf8_begins(const unsigned char *p, size_t n)
{
	unsigned char s[4] = {0x80, 0x80, 0x80, 0x80};

	memcpy(s, p, n);
	if (ca__utf8_len(s, 4) > n)
		return 1;
	if (n > 1)
		return 0;
	s[1] = 0xa0;
	return ca__utf8_len(s, 4) > n;
}

int ca__utf8_check(struct ca_utf8 *st, const unsigned char *p, size_t n, int final, size_t *at)
{
	size_t i = 0, len, held = st->len;

	*at = 0;	/* the held sequence's first byte, if it fails */
	if (held) {
		/* The sequence the last piece ended in, with what this one adds to it. */
		unsigned char s[4];
		size_t k = st->len, take = n < 4 - k ? n : 4 - k;

		memcpy(s, st->part, k);
		if (take)	/* p may be NULL for an empty piece */
			memcpy(s + k, p, take);
		len = ca__utf8_len(s, k + take);
		if (len == 0) {
			if (take == n && !final && utf8_begins(s, k + take)) {
				memcpy(st->part, s, k + take);
				st->len = (unsigned)(k + take);
				return 0;
			}
			st->len = 0;
			return take == n && utf8_begins(s, k + take) ? -2 : -1;
		}
		st->len = 0;
		i = len - k;
	}
	while (i < n) {
		i += ascii_run(p + i, n - i);
		if (i == n)
			break;
		len = ca__utf8_len(p + i, n - i);
		if (len == 0) {
			if (n - i < 4 && utf8_begins(p + i, n - i)) {
				if (final) {
					*at = held + i;
					return -2;
				}
				memcpy(st->part, p + i, n - i);
				st->len = (unsigned)(n - i);
				return 0;
			}
			*at = held + i;
			return -1;
		}
		i += len;
	}
	return 0;
}

/* Whether p[0..n) is UTF-8. */
static int utf8_valid(const unsigned char *p, size_t n)
{
	struct ca_utf8 st = {{0}, 0};
	size_t at;

	return ca__utf8_check(&st, p, n, 1, &at) == 0;
}

static void deliver(struct ca_ws *ws, const void *data, size_t len, int binary)
{
	lua_State *L = ca_lua();

	ws->msgs_in++;
	/* A C tap (the call's audio path) takes the messages it handles. */
	if (ws->tap && !binary && ws->tap(ws->tap_ctx, ws, data, len))
		return;
	if (L == NULL)
		return;
	lua_pushlstring(L, data, len);
	ca__ws_emit(ws, binary ? "binary" : "text", 1);
}

/*
 * A piece of a text message that is not UTF-8 (RFC 6455 8.1: the
 * connection fails with 1007), checked as it comes: bytes that start no
 * sequence fail it at once, a sequence cut short at its end. The log says
 * where, never what.
 */
static int not_utf8(struct ca_ws *ws, const void *in, size_t len, int final)
{
	size_t at, held = ws->utf8.len;
	int r = ca__utf8_check(&ws->utf8, in, len, final, &at);

	if (r == 0)
		return 0;
	/* In the message: the bad sequence's first byte, which an earlier piece may hold. */
	at += ws->rx_len - held;
	if (r == -2)
		ca_log(CA_LOG_WARN, "websocket %lld: a text message from the %s ends inside a UTF-8 sequence "
		       "(at byte %zu): closing (1007)", (long long)ws->id, ws->is_client ? "server" : "client", at);
	else
		ca_log(CA_LOG_WARN, "websocket %lld: a text message from the %s that is not UTF-8 (at byte %zu): "
		       "closing (1007)", (long long)ws->id, ws->is_client ? "server" : "client", at);
	ws->rx_len = 0;
	/* Nothing after it in the stream is read (as after a protocol error). */
	ws->fr.broken = 1;
	ca__ws_fail(ws, 1007, "text message that is not UTF-8");
	return 1;
}

void ca__ws_receive(struct ca_ws *ws, const void *in, size_t len, int final, int binary)
{
	if (ws->fail_code || ws->state != CA_WS_OPEN)
		return;
	if (ws->rx_len + len > ws->max_message) {
		ca_log(CA_LOG_WARN, "websocket %lld: message over %zu bytes: closing (1009)",
		       (long long)ws->id, ws->max_message);
		ws->rx_len = 0;
		ws->utf8.len = 0;
		ca__ws_fail(ws, 1009, "message too big");
		return;
	}
	if (!binary && not_utf8(ws, in, len, final))
		return;
	if (final && ws->rx_len == 0) {
		/* The common case: a whole message in one piece, no copy of ours. */
		deliver(ws, in, len, binary);
		return;
	}
	if (ws->rx_len + len > ws->rx_cap) {
		size_t cap = ws->rx_cap ? ws->rx_cap : 4096;

		while (cap < ws->rx_len + len)
			cap *= 2;
		ws->rx = ca_realloc(ws->rx, cap);
		ws->rx_cap = cap;
	}
	if (len)	/* an empty first fragment: no buffer yet, and NULL is no memcpy argument */
		memcpy(ws->rx + ws->rx_len, in, len);
	ws->rx_len += len;
	if (final) {
		size_t n = ws->rx_len;

		ws->rx_len = 0;
		deliver(ws, ws->rx, n, binary);
		/*
		 * Messages larger than lws's receive buffer are rare after the
		 * first few of a connection (session set-up, a long transcript):
		 * a buffer kept for them would cost every call 4-16 KiB of RSS
		 * for its whole length, so it goes with the message.
		 */
		free(ws->rx);
		ws->rx = NULL;
		ws->rx_cap = 0;
	}
}

/* Writes bytes of the wire form (see wire_form); < 0 on failure. */
static int wire_write(struct ca_ws *ws, unsigned char *buf, size_t len, int kind)
{
	if (ws->is_client)
		return ca__wsc_write(ws, buf, len);
	if (ws->io)
		return io_write(ws, buf, len, kind);
	return lws_write(ws->wsi, buf, len, (enum lws_write_protocol)kind);
}

int ca__ws_writeable(struct ca_ws *ws)
{
	if (ws->fail_code && !ws->close_code)
		return -1;	/* dropped: nothing more goes to this peer */
	if (ws->close_sent)
		return 0;
	while (ws->head) {
		struct ca_wsmsg *m = ws->head;
		int n = wire_write(ws, m->buf + LWS_PRE, m->len, m->kind);

		if (n < 0)
			return -1;
		ws->head = m->next;
		if (ws->head == NULL)
			ws->tail = NULL;
		ws->queued -= m->cost;
		free(m);
		if (ws->head && partial(ws)) {
			want_write(ws);
			return 0;
		}
	}
	if (ws->close_code) {
		/*
		 * Our close frame: the peer answers with its own, which ends the
		 * connection (see ca__ws_peer_close).
		 */
		unsigned char body[125];
		size_t rl = strlen(ws->close_reason);

		body[0] = (unsigned char)(ws->close_code >> 8);
		body[1] = (unsigned char)(ws->close_code & 0xff);
		memcpy(body + 2, ws->close_reason, rl);
		return ca__ws_write_close(ws, body, rl + 2);
	}
	return 0;
}

int ca__ws_peer_close(struct ca_ws *ws, const void *in, size_t len)
{
	const unsigned char *p = in;

	/* The answer to our own close frame: done, close now. */
	if (ws->close_sent)
		return -1;
	if (len >= 2) {
		ws->peer_code = (p[0] << 8) | p[1];
		snprintf(ws->peer_reason, sizeof ws->peer_reason, "%.*s",
			 (int)(len - 2 < sizeof ws->peer_reason - 1 ? len - 2 : sizeof ws->peer_reason - 1),
			 (const char *)p + 2);
	} else {
		ws->peer_code = 1005;	/* no status received */
	}
	return 0;	/* lws answers with a close frame and closes */
}

static void free_ws(struct ca_ws *ws)
{
	if (ws->tap_closed)
		ws->tap_closed(ws->tap_ctx, ws);
	free_queue(ws);
	free(ws->rx);
	free(ws->held);
	free(ws);
}

void ca__ws_closed(struct ca_ws *ws)
{
	lua_State *L = ca_lua();
	int was = ws->state;

	if (ws->tap_closed) {
		void (*fn)(void *, struct ca_ws *) = ws->tap_closed;

		ws->tap = NULL;
		ws->tap_closed = NULL;
		fn(ws->tap_ctx, ws);
	}
	io_release(ws);
	if (ws->ping_timer) {
		uv_timer_stop(ws->ping_timer);
		uv_close((uv_handle_t *)ws->ping_timer, (uv_close_cb)free);
		ws->ping_timer = NULL;
	}
	if (ws->resume_timer) {
		uv_timer_stop(ws->resume_timer);
		uv_close((uv_handle_t *)ws->resume_timer, (uv_close_cb)free);
		ws->resume_timer = NULL;
	}
	free(ws->held);
	ws->held = NULL;
	ws->held_len = 0;
	ws->wsi = NULL;
	ws->state = CA_WS_CLOSED;
	free_queue(ws);
	free(ws->rx);
	ws->rx = NULL;
	ws->rx_len = ws->rx_cap = 0;
	if (ws->connect_timer) {
		uv_close((uv_handle_t *)ws->connect_timer, (uv_close_cb)free);
		ws->connect_timer = NULL;
	}
	if (L) {
		if (was == CA_WS_CONNECTING && ws->is_client) {
			if (!ws->error[0])
				snprintf(ws->error, sizeof ws->error, "ECONNREFUSED: connection failed");
			lua_pushstring(L, ws->error);
			ca__ws_emit(ws, "error", 1);
		} else if (was != CA_WS_CONNECTING) {
			int code = 1006;
			const char *reason = "connection lost";

			if (ws->fail_code || ws->close_code) {
				code = ws->fail_code ? ws->fail_code : ws->close_code;
				reason = ws->close_reason;
			} else if (ws->peer_code) {
				code = ws->peer_code;
				reason = ws->peer_reason;
			}
			lua_pushinteger(L, code);
			lua_pushstring(L, reason);
			ca__ws_emit(ws, "close", 2);
		}
		ca_unref(L, &ws->handler_ref);
		ca_unref(L, &ws->self_ref);
	}
	if (!ws->lua_alive)
		free_ws(ws);
}

/* ---- Lua methods ---- */

/* Scratch space for direct writes: lws needs LWS_PRE bytes before the payload. */
static unsigned char *scratch;
static size_t scratch_cap;

/*
 * Masking keys for client frames, drawn from OpenSSL's CSPRNG a pool at a
 * time. lws would read 4 bytes from /dev/urandom for every frame it masks:
 * one system call per message on the model connection's audio path.
 */
static unsigned char mask_pool[4096];
static size_t mask_pos = sizeof mask_pool;

static int next_mask(unsigned char key[4])
{
	if (mask_pos == sizeof mask_pool) {
		if (RAND_bytes(mask_pool, sizeof mask_pool) != 1)
			return -1;
		mask_pos = 0;
	}
	memcpy(key, mask_pool + mask_pos, 4);
	mask_pos += 4;
	return 0;
}

/* out[0..n) = in[0..n) masked with key from its byte pos (RFC 6455 5.3); out may be in. */
static void xor_mask(unsigned char *out, const unsigned char *in, size_t n, const unsigned char key[4], unsigned pos)
{
	unsigned char k[4] = {key[pos & 3], key[(pos + 1) & 3], key[(pos + 2) & 3], key[(pos + 3) & 3]};
	size_t i = 0;

	if (n >= 8) {
		uint32_t k32;
		uint64_t k64, w;

		memcpy(&k32, k, 4);
		k64 = (uint64_t)k32 << 32 | k32;
		for (; i + 8 <= n; i += 8) {
			memcpy(&w, in + i, 8);
			w ^= k64;
			memcpy(out + i, &w, 8);
		}
	}
	for (; i < n; i++)
		out[i] = in[i] ^ k[i & 3];
}

/* The opcode of each lws write kind a client frames itself (RFC 6455 5.2). */
static int client_opcode(int kind)
{
	switch (kind) {
	case LWS_WRITE_TEXT: return 0x1;
	case LWS_WRITE_BINARY: return 0x2;
	case LWS_WRITE_PING: return 0x9;
	case LWS_WRITE_PONG: return 0xa;
	case CA_LWS_WRITE_CLOSE: return 0x8;
	default: return 0;	/* LWS_WRITE_RAW: already framed */
	}
}

/*
 * Frames a whole client message (FIN, masked; RFC 6455 5.2) with opcode op
 * into out, which has room for len + 14 bytes. Returns the frame's length,
 * 0 if no masking key could be had.
 */
static size_t frame_client(unsigned char *out, const void *in, size_t len, int op)
{
	unsigned char key[4];
	size_t h;

	if (next_mask(key) != 0)
		return 0;
	h = ca__ws_header(out, op, len, 1);
	memcpy(out + h, key, 4);
	h += 4;
	xor_mask(out + h, in, len, key, 0);
	return h + len;
}

/*
 * Puts the message as it goes on the wire at out (room for len + 14):
 * a client frames its messages itself, masked (see src/ws.c); a server's
 * are framed when written (by io_write in the headroom, or by lws_write
 * over TLS). Returns the length (0 for an
 * empty message on the server side) and sets *kind to what lws_write is to
 * be told, or -1 if no masking key was had.
 */
static long wire_form(struct ca_ws *ws, unsigned char *out, const void *data, size_t len, int *kind)
{
	int op = ws->is_client ? client_opcode(*kind) : 0;
	size_t n;

	if (op == 0) {
		memcpy(out, data, len);
		return (long)len;
	}
	*kind = LWS_WRITE_RAW;
	n = frame_client(out, data, len, op);
	return n == 0 ? -1 : (long)n;
}

/* ---- frames read by callagent ---- */

/* A protocol error: tell the peer (1002) and stop reading the stream. */
/*
 * A close code an endpoint may send (RFC 6455 7.4): 1005, 1006 and 1015 only
 * say what happened locally, 1004 is reserved, the rest below 3000 unassigned.
 */
static int sendable_close_code(long code)
{
	return code == 1000 || (code >= 3000 && code <= 4999) ||
	       (code >= 1001 && code <= 1014 && code != 1004 && code != 1005 && code != 1006);
}

static void protocol_error(struct ca_ws *ws, const char *what)
{
	ca_log(CA_LOG_WARN, "websocket %lld: protocol error from the %s: %s: closing (1002)",
	       (long long)ws->id, ws->is_client ? "server" : "client", what);
	ws->fr.broken = 1;
	ca__ws_fail(ws, 1002, what);
}

/* A whole control frame. -1: close the connection now. */
static int control_frame(struct ca_ws *ws)
{
	struct ca_wsframe *f = &ws->fr;
	const char *err;

	if (f->op == 0x9) {		/* ping: answered with its payload */
		ca__ws_send(ws, f->ctl, f->ctl_len, LWS_WRITE_PONG, &err);
		return 0;
	}
	if (f->op == 0xa)		/* pong: any frame already counted as life */
		return 0;
	/* close */
	if (f->ctl_len == 1) {
		protocol_error(ws, "close frame with a 1-byte body");
		return 0;
	}
	if (f->ctl_len >= 2 && !sendable_close_code((f->ctl[0] << 8) | f->ctl[1])) {
		/* Not echoed: it is no code to send, nor one the app should see. */
		protocol_error(ws, "a close code no endpoint may send");
		return 0;
	}
	if (!ws->close_sent && f->ctl_len > 2 && !utf8_valid(f->ctl + 2, f->ctl_len - 2)) {
		/*
		 * The reason is text (RFC 6455 5.5.1, 8.1): not echoed, not shown
		 * to the app. (The answer to our own close ends it as it is.)
		 */
		ca_log(CA_LOG_WARN, "websocket %lld: a close reason that is not UTF-8 from the %s: closing (1007)",
		       (long long)ws->id, ws->is_client ? "server" : "client");
		f->broken = 1;
		ca__ws_fail(ws, 1007, "close reason that is not UTF-8");
		return 0;
	}
	if (ca__ws_peer_close(ws, f->ctl, f->ctl_len) != 0)
		return -1;	/* the answer to ours: done */
	/*
	 * Nothing the peer sends after its close frame is read (RFC 6455
	 * 5.5.1: it sends no more): a message would reach the app after the
	 * close, and a bad frame fail the connection, its 1002 taking the
	 * place of the peer's own code.
	 */
	f->broken = 1;
	/*
	 * The peer closes: answer with its code. A client then waits for the
	 * server to end the TCP connection; a server ends it once the answer
	 * is out.
	 */
	if (ca__ws_write_close(ws, f->ctl, f->ctl_len ? 2 : 0) < 0 || !partial(ws))
		return -1;	/* the answer is out (or cannot be): close now */
	return 0;
}

/* Bytes of the frame header that starts with h[0..1]. */
static unsigned header_size(const unsigned char *h)
{
	unsigned l7 = h[1] & 0x7f;

	return 2 + (l7 == 126 ? 2 : l7 == 127 ? 8 : 0) + ((h[1] & 0x80) ? 4 : 0);
}

/* A whole frame header is in f->hdr: checks it and starts its payload. */
static void start_frame(struct ca_ws *ws)
{
	struct ca_wsframe *f = &ws->fr;
	const unsigned char *h = f->hdr;
	int op = h[0] & 0x0f, fin = !!(h[0] & 0x80), masked = !!(h[1] & 0x80);
	uint64_t plen = h[1] & 0x7f;

	if (plen == 126) {
		plen = (uint64_t)h[2] << 8 | h[3];
	} else if (plen == 127) {
		plen = 0;
		for (int i = 2; i < 10; i++)
			plen = plen << 8 | h[i];
	}
	if (masked)
		memcpy(f->key, h + header_size(h) - 4, 4);
	f->hdr_len = 0;
	if (h[0] & 0x70)
		protocol_error(ws, "reserved bits set");
	else if (masked && ws->is_client)
		protocol_error(ws, "masked frame from a server");
	else if (!masked && !ws->is_client)
		protocol_error(ws, "unmasked frame from a client");
	else if ((op >= 0x3 && op <= 0x7) || op > 0xa)
		protocol_error(ws, "unknown opcode");
	else if (op >= 0x8 && (!fin || plen > 125))
		protocol_error(ws, "fragmented or long control frame");
	else if (plen >> 63)
		protocol_error(ws, "frame length over 2^63");
	else if (op == 0 && f->msg == 0)
		protocol_error(ws, "continuation without a message");
	else if ((op == 1 || op == 2) && f->msg != 0)
		protocol_error(ws, "new message inside a fragmented one");
	if (f->broken)
		return;
	f->op = op;
	f->fin = fin;
	f->left = plen;
	f->ctl_len = 0;
	f->key_pos = 0;
	f->in_payload = 1;
	if (op == 1 || op == 2)
		f->msg = op;
}

/* Keeps bytes read while paused (see ca__ws_parse), after those kept already. */
static void hold(struct ca_ws *ws, const unsigned char *p, size_t len)
{
	if (len == 0)
		return;
	ws->held = ca_realloc(ws->held, ws->held_len + len);
	memcpy(ws->held + ws->held_len, p, len);
	ws->held_len += len;
}

/*
 * A data frame's payload goes on as it arrives, in as few pieces as the
 * reads give (a message read whole is delivered from the read buffer
 * without a copy).
 */
int ca__ws_parse(struct ca_ws *ws, unsigned char *p, size_t len)
{
	struct ca_wsframe *f = &ws->fr;
	int masked = !ws->is_client;

	while (!f->broken && (len > 0 || (f->in_payload && f->left == 0))) {
		size_t n;

		if (ws->paused || ws->held_len) {
			/*
			 * A handler paused the connection (or bytes held from
			 * then wait to be parsed): the rest of the read waits
			 * for conn:resume(), as it is (still masked).
			 */
			hold(ws, p, len);
			break;
		}
		if (!f->in_payload) {
			n = (f->hdr_len < 2 ? 2 : header_size(f->hdr)) - f->hdr_len;
			if (n > len)
				n = len;
			memcpy(f->hdr + f->hdr_len, p, n);
			f->hdr_len += (unsigned)n;
			p += n;
			len -= n;
			if (f->hdr_len >= 2 && f->hdr_len == header_size(f->hdr))
				start_frame(ws);
			continue;
		}
		n = f->left < len ? (size_t)f->left : len;
		if (masked) {
			xor_mask(p, p, n, f->key, f->key_pos);
			f->key_pos = (f->key_pos + (unsigned)n) & 3;
		}
		if (f->op >= 0x8) {
			memcpy(f->ctl + f->ctl_len, p, n);
			f->ctl_len += n;
		} else {
			ca__ws_receive(ws, p, n, f->fin && n == f->left, f->msg == 2);
		}
		p += n;
		len -= n;
		f->left -= n;
		if (f->left)
			continue;
		f->in_payload = 0;
		if (f->op >= 0x8) {
			if (control_frame(ws) != 0)
				return -1;
		} else if (f->fin) {
			f->msg = 0;
		}
	}
	return 0;
}

/* ---- a connection's socket, once ours ---- */

/*
 * lws 4.1.6 has no call that hands a connection's socket over. So the
 * socket is duplicated, lws is told to stop reading (rx flow control) and
 * is never asked to write: its connection object stays, idle, with its own
 * descriptor, until the connection ends; then lws closes it as it always
 * does (a server's socket shut down first, so the peer sees the end), and
 * the duplicate is closed with it. lws' keepalive pings, which would write
 * on the socket and never see the answer, are off on the servers (see
 * http.c); ours replace them. Bytes lws read with the upgrade request and
 * holds are noticed, and fail the connection (see on_ping_timer).
 */
struct ca_wsio {
	uv_poll_t poll;			/* on fd */
	int fd;				/* our duplicate of lws' descriptor */
	int events;			/* what poll waits for */
	int (*rx)(struct ca_ws *ws, unsigned char *p, size_t len);	/* what is read goes here */
	int paused;			/* conn:pause(): not reading */
	int want;			/* a writeable callback was asked for */
	int probed;			/* lws was asked about input it holds */
	unsigned char *out;		/* what a short write left, sent on POLLOUT */
	size_t out_len, out_cap;
	struct ca_ws *ws;		/* NULL once released */
};

/* ---- pings ---- */

static void on_ping_timer(uv_timer_t *t)
{
	struct ca_ws *ws = t->data;
	uint64_t now = uv_now(ca_loop()), idle = now - ws->last_rx;
	const char *err;

	if (ws->state != CA_WS_OPEN || ws->wsi == NULL)
		return;
	if (ws->io && !ws->io->probed) {
		/*
		 * A server's first turn: bytes that came with the upgrade
		 * request (a client must wait for the answer, RFC 6455 4.1)
		 * were read by lws, which holds them. Turning its reading on
		 * and off again has lws ask for a writeable callback then
		 * (see http.c), which fails the connection: nothing is lost
		 * without a word.
		 */
		ws->io->probed = 1;
		lws_rx_flow_control(ws->wsi, 1);
		lws_rx_flow_control(ws->wsi, 0);
		if (ws->ping_ms == 0)
			return;
	}
	if (ws->paused) {
		/* Nothing is read, a pong neither: the peer is not judged meanwhile. */
		ws->last_rx = now;
		ws->ping_sent = 0;
		uv_timer_start(t, on_ping_timer, ws->ping_ms, 0);
		return;
	}
	if (ws->ping_sent > ws->last_rx) {
		if (now - ws->ping_sent >= ws->pong_ms) {
			ca_log(CA_LOG_WARN, "websocket %lld: no answer to a ping within %llu ms: dropping it",
			       (long long)ws->id, (unsigned long long)ws->pong_ms);
			ca__ws_drop(ws, 1006, "no answer to a ping");
			return;
		}
		uv_timer_start(t, on_ping_timer, ws->pong_ms - (now - ws->ping_sent), 0);
	} else if (idle >= ws->ping_ms) {
		ws->ping_sent = now;
		ca__ws_send(ws, "", 0, LWS_WRITE_PING, &err);
		uv_timer_start(t, on_ping_timer, ws->pong_ms, 0);
	} else {
		uv_timer_start(t, on_ping_timer, ws->ping_ms - idle, 0);
	}
}

void ca__ws_start_pings(struct ca_ws *ws)
{
	int probe = ws->io && !ws->is_client;	/* see on_ping_timer */

	ws->last_rx = uv_now(ca_loop());
	if ((ws->ping_ms == 0 && !probe) || ws->ping_timer)
		return;
	ws->ping_timer = ca_malloc(sizeof *ws->ping_timer);
	uv_timer_init(ca_loop(), ws->ping_timer);
	ws->ping_timer->data = ws;
	uv_timer_start(ws->ping_timer, on_ping_timer, probe ? 0 : ws->ping_ms, 0);
}

/* ---- reading and writing a socket of ours ---- */

/* One read's bytes: the loop is single-threaded, and a read is parsed before the next. */
static unsigned char io_buf[65536];

static void io_cb(uv_poll_t *h, int status, int events);

/*
 * Gathered writes. What a read sets off (the answers to the messages it
 * carried: the bridge's appends to the model for a phone read, its media
 * for a model read) is gathered and sent when the read has been handled,
 * so a read that caught up on several messages sends their answers in one
 * send(2), not one each: a loaded loop that fell behind catches up at a
 * fraction of the kernel's cost per message, and one that keeps up sends
 * as soon as before (a read's messages are handled in microseconds). One
 * socket gathers at a time: a write to another sends the gathered bytes
 * first. Bytes of a socket that has a short write pending go behind it.
 */
#define CORK_MAX 65536

static int corking;			/* a read is being handled */
static struct ca_wsio *cork_io;		/* whose bytes cork holds */
static unsigned char *cork;		/* CORK_MAX bytes, from the first use */
static size_t cork_len;

static void keep_out(struct ca_wsio *io, const unsigned char *p, size_t len);

/* send(2) on a socket of ours: the bytes taken (0: it is full), or -1 on an error. */
static ssize_t sock_send(struct ca_wsio *io, const unsigned char *p, size_t len)
{
	ssize_t n;

	io->ws->writes++;
	n = send(io->fd, p, len, MSG_NOSIGNAL);
	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
		return 0;
	return n;
}

/* Sends the gathered bytes; what the socket does not take waits for POLLOUT. */
static void cork_flush(void)
{
	struct ca_wsio *io = cork_io;
	ssize_t n;

	cork_io = NULL;
	if (io == NULL || cork_len == 0)
		return;
	/*
	 * A failed send keeps the bytes too: the socket's error comes back
	 * with its next poll, and ends the connection there, in its own
	 * callback rather than in the middle of another's.
	 */
	n = sock_send(io, cork, cork_len);
	if (n < 0)
		n = 0;
	if ((size_t)n < cork_len)
		keep_out(io, cork + n, cork_len - (size_t)n);
	cork_len = 0;
}

static void io_update(struct ca_wsio *io)
{
	int ev = (io->paused ? 0 : UV_READABLE) | (io->out_len || io->want ? UV_WRITABLE : 0);

	if (ev == io->events)
		return;
	io->events = ev;
	if (ev)
		uv_poll_start(&io->poll, ev, io_cb);
	else
		uv_poll_stop(&io->poll);
}

static void io_closed(uv_handle_t *h)
{
	struct ca_wsio *io = h->data;

	free(io->out);
	free(io);
}

/* The socket is no longer read or written by us (lws closes it). */
static void io_release(struct ca_ws *ws)
{
	struct ca_wsio *io = ws->io;

	if (io == NULL)
		return;
	if (cork_io == io)
		cork_flush();	/* a close frame may be among them */
	ws->io = NULL;
	io->ws = NULL;
	uv_poll_stop(&io->poll);
	close(io->fd);
	uv_close((uv_handle_t *)&io->poll, io_closed);
}

void ca__ws_kill_conn(struct ca_ws *ws)
{
	io_release(ws);
	if (ws->wsi)
		ca__ws_kill(ws->wsi);
}

/* Keeps bytes the socket did not take, for POLLOUT. */
static void keep_out(struct ca_wsio *io, const unsigned char *p, size_t len)
{
	if (io->out_len + len > io->out_cap) {
		io->out_cap = io->out_len + len + 4096;
		io->out = ca_realloc(io->out, io->out_cap);
	}
	memcpy(io->out + io->out_len, p, len);
	io->out_len += len;
	io_update(io);
}

/*
 * Sends bytes now (or, while a read is handled, once it has been: see
 * cork), keeping what the socket does not take for POLLOUT. 0 or -1.
 */
static int io_send(struct ca_ws *ws, const unsigned char *p, size_t len)
{
	struct ca_wsio *io = ws->io;

	if (corking && io->out_len == 0) {
		if (cork_io != io)
			cork_flush();
		if (cork_len + len > CORK_MAX)
			cork_flush();
		if (len <= CORK_MAX && io->out_len == 0) {	/* a short write: behind it */
			if (cork == NULL)
				cork = ca_malloc(CORK_MAX);
			memcpy(cork + cork_len, p, len);
			cork_len += len;
			cork_io = io;
			return 0;
		}
	}
	if (io->out_len == 0) {
		ssize_t n = sock_send(io, p, len);

		if (n < 0)
			return -1;
		if ((size_t)n == len)
			return 0;
		p += n;
		len -= (size_t)n;
	}
	keep_out(io, p, len);
	return 0;
}

/*
 * Frames a server message in the LWS_PRE bytes of headroom before buf
 * (as lws_write does) and sends it; kind LWS_WRITE_RAW is already framed.
 */
static int io_write(struct ca_ws *ws, unsigned char *buf, size_t len, int kind)
{
	int op = client_opcode(kind);
	unsigned char *h = buf;

	if (op) {
		h = buf - ca__ws_header_len(len);
		len += ca__ws_header(h, op, len, 0);
	}
	return io_send(ws, h, len);
}

/* The socket can take more: what a short write left, then the send queue. */
static int io_flush(struct ca_ws *ws)
{
	struct ca_wsio *io = ws->io;

	if (io->out_len) {
		ssize_t n = sock_send(io, io->out, io->out_len);

		if (n < 0)
			return -1;
		memmove(io->out, io->out + n, io->out_len - (size_t)n);
		io->out_len -= (size_t)n;
		if (io->out_len)
			return 0;
		/* Short writes are rare: a buffer kept for them would cost every call. */
		free(io->out);
		io->out = NULL;
		io->out_cap = 0;
	}
	io->want = 0;
	if (ws->close_sent && ws->peer_code)
		return -1;	/* our answer to the peer's close is out: done */
	if (ca__ws_writeable(ws) < 0)
		return -1;
	if (ws->io)
		io_update(io);
	return 0;
}

static void io_read(struct ca_ws *ws)
{
	ssize_t n;
	int r;

	ws->reads++;
	n = recv(ws->io->fd, io_buf, sizeof io_buf, 0);
	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
		return;
	if (n <= 0) {
		/* The peer is gone (or broke the connection): lws ends it. */
		ca__ws_kill_conn(ws);
		return;
	}
	ws->last_rx = uv_now(ca_loop());
	if (ws->fr.broken)
		return;
	corking = 1;
	r = ws->io->rx(ws, io_buf, (size_t)n);
	corking = 0;	/* a read is never handled inside another: one loop, no nesting */
	cork_flush();
	if (r != 0)
		ca__ws_kill_conn(ws);
}

static void io_cb(uv_poll_t *h, int status, int events)
{
	struct ca_wsio *io = h->data;
	struct ca_ws *ws = io->ws;

	if (ws == NULL)
		return;
	if (status < 0) {
		ca__ws_kill_conn(ws);
		return;
	}
	if ((events & UV_WRITABLE) && io_flush(ws) < 0) {
		ca__ws_kill_conn(ws);
		return;
	}
	if ((events & UV_READABLE) && ws->io == io && !io->paused)
		io_read(ws);
}

/*
 * Whether bytes read before a pause wait to be parsed: held ones, or an
 * empty frame whose header was the last thing read.
 */
static int held(const struct ca_ws *ws)
{
	return ws->held_len || (ws->fr.in_payload && ws->fr.left == 0 && !ws->fr.broken);
}

/*
 * Whether ca__ws_parse reads this connection: its socket is ours, or it is
 * a client whose socket stayed lws's (ca__ws_take_socket failed: out of
 * descriptors), read through its raw receive callback. A TLS server's is
 * lws's, and a server's that is over has none.
 */
static int parsed_here(const struct ca_ws *ws)
{
	return ws->io || (ws->is_client && ws->wsi);
}

/* A paused connection resumed: what was read before goes on, then the socket is read again. */
static void on_resume(uv_timer_t *t)
{
	struct ca_ws *ws = t->data;
	unsigned char *p = ws->held, none[1];
	size_t n = ws->held_len;
	int r;

	if (ws->paused || !parsed_here(ws))
		return;	/* paused again before this turn, or over */
	ws->held = NULL;
	ws->held_len = 0;
	corking = 1;	/* as for a read: what it sets off goes in one write */
	r = ws->fr.broken ? 0 : ca__ws_parse(ws, p ? p : none, n);
	corking = 0;
	cork_flush();
	free(p);
	if (r != 0) {
		ca__ws_kill_conn(ws);
		return;
	}
	if (ws->paused)
		return;
	if (ws->io) {
		ws->io->paused = 0;
		io_update(ws->io);
	} else if (ws->wsi) {
		lws_rx_flow_control(ws->wsi, 1);
	}
}

int ca__ws_take_socket(struct ca_ws *ws, int (*rx)(struct ca_ws *ws, unsigned char *p, size_t len))
{
	struct ca_wsio *io;
	int fd;

	if (ws->wsi == NULL || ws->io)
		return -1;
	fd = lws_partial_buffered(ws->wsi) ? -1 : fcntl(lws_get_socket_fd(ws->wsi), F_DUPFD_CLOEXEC, 0);
	if (fd < 0) {
		/*
		 * lws goes on reading it (a client: its raw callback). One
		 * paused while it connected is paused there now (l_pause left
		 * lws reading the upgrade's answer): else what comes while it
		 * is paused would be read, and held (ca__ws_parse), without end.
		 */
		if (ws->paused)
			lws_rx_flow_control(ws->wsi, 0);
		return -1;
	}
	io = ca_malloc(sizeof *io);
	memset(io, 0, sizeof *io);
	io->fd = fd;
	io->ws = ws;
	io->rx = rx ? rx : ca__ws_parse;
	io->paused = ws->paused;	/* a client paused while it connected */
	uv_poll_init_socket(ca_loop(), &io->poll, fd);
	io->poll.data = io;
	lws_rx_flow_control(ws->wsi, 0);
	ws->io = io;
	io_update(io);
	return 0;
}

int ca__ws_raw_write(struct ca_ws *ws, const unsigned char *p, size_t len)
{
	if (ws->io)
		return io_send(ws, p, len);
	if (ws->wsi == NULL || lws_write(ws->wsi, (unsigned char *)p, len, LWS_WRITE_RAW) < 0)
		return -1;
	return 0;
}

/* Whether bytes of an earlier write wait for the socket. */
static int partial(const struct ca_ws *ws)
{
	return ws->io ? ws->io->out_len > 0 : lws_partial_buffered(ws->wsi);
}

/* Asks for a writeable callback: ca__ws_writeable once the socket can take more. */
static void want_write(struct ca_ws *ws)
{
	if (ws->io == NULL) {
		lws_callback_on_writable(ws->wsi);
		return;
	}
	ws->io->want = 1;
	io_update(ws->io);
}

/*
 * The connection is dropped if it has not closed within 5 s (1 s when the
 * program stops: lws counts whole seconds), set when our close is asked for
 * and again when it is written. A peer that answers does so in milliseconds;
 * one that stopped reading would otherwise keep the close frame, and the
 * connection with its queue, waiting behind what it never reads.
 */
static void close_deadline(struct ca_ws *ws)
{
	if (ws->wsi == NULL)
		return;
	lws_set_timeout(ws->wsi, PENDING_TIMEOUT_CLOSE_ACK, ws->stopping ? 1 : 5);
	/* Outside its callbacks (the socket is ours) lws would not see the timer soon. */
	if (ws->io)
		lws_cancel_service(lws_get_context(ws->wsi));
}

int ca__ws_write_close(struct ca_ws *ws, const void *body, size_t len)
{
	/*
	 * Written by us on both sides: Debian's lws 4.1.6 build drops the
	 * frame of its own close path.
	 */
	unsigned char out[LWS_PRE + 125 + 14];
	int kind = CA_LWS_WRITE_CLOSE;
	long n = wire_form(ws, out + LWS_PRE, body, len, &kind);

	ws->close_sent = 1;
	if (n < 0 || wire_write(ws, out + LWS_PRE, (size_t)n, kind) < 0)
		return -1;
	close_deadline(ws);	/* counts again from here: the answer's wait */
	return 0;
}

/*
 * A queued message's bytes on the wire: a client's are framed already, a
 * server's get their header when written. Counted whole, an empty message
 * is not free: a queue of them was, and grew without bound.
 */
static void set_cost(struct ca_ws *ws, struct ca_wsmsg *m)
{
	m->cost = m->len + (ws->is_client ? 0 : ca__ws_header_len(m->len));
}

int ca__ws_send(struct ca_ws *ws, const void *data, size_t len, int kind, const char **err)
{
	struct ca_wsmsg *m;
	long n;
	int pong = kind == LWS_WRITE_PONG && len <= 125;

	if (ws->state != CA_WS_OPEN || closing(ws) || ws->wsi == NULL) {
		*err = "ECLOSED";
		return -1;
	}
	if (len > ws->max_queue) {
		ca_log(CA_LOG_WARN, "websocket %lld: a message of %zu bytes is over max_send_queue (%zu): dropping the connection",
		       (long long)ws->id, len, ws->max_queue);
		ca__ws_drop(ws, 1008, "message over the send queue limit");
		*err = "ENOBUFS";
		return -1;
	}
	/*
	 * Nothing queued and no partial write pending: send now. This saves
	 * the writeable round trip (two epoll_ctl calls and a callback) on
	 * every message of the audio path; the unsent tail of a short write
	 * is kept (by io_send on a socket of ours, else by lws) until POLLOUT,
	 * and later messages queue behind it.
	 */
	if (kind != LWS_WRITE_PING && kind != LWS_WRITE_PONG)
		ws->msgs_out++;	/* dropped below, the connection goes with it */
	if (ws->head == NULL && !partial(ws)) {
		if (LWS_PRE + len + 14 > scratch_cap) {
			scratch_cap = LWS_PRE + len + 14 + 4096;
			scratch = ca_realloc(scratch, scratch_cap);
		}
		n = wire_form(ws, scratch + LWS_PRE, data, len, &kind);
		if (n < 0 || wire_write(ws, scratch + LWS_PRE, (size_t)n, kind) < 0) {
			ca__ws_drop(ws, 1006, "write failed");
			*err = "ECLOSED";
			return -1;
		}
		return 0;
	}
	/*
	 * A pong still waiting at the end of the queue answers the latest ping
	 * instead (RFC 6455 5.5.3): a peer that pings and reads nothing had one
	 * queued for each ping, some 70 bytes of memory for the 2 an empty one
	 * counts (and empty ones once counted nothing: 10M pings, 500 MB).
	 */
	m = ws->tail;
	if (pong && m && m->pong) {
		n = wire_form(ws, m->buf + LWS_PRE, data, len, &kind);
		if (n < 0) {
			ca__ws_drop(ws, 1006, "no masking key");
			*err = "ECLOSED";
			return -1;
		}
		ws->queued -= m->cost;
		m->len = (size_t)n;
		m->kind = kind;
		set_cost(ws, m);
		ws->queued += m->cost;
		return 0;
	}
	if (ws->queued + len + ca__ws_header_len(len) > ws->max_queue) {
		ca_log(CA_LOG_WARN, "websocket %lld: peer too slow (send queue over %zu bytes): dropping it",
		       (long long)ws->id, ws->max_queue);
		ca__ws_drop(ws, 1008, "send queue full: peer too slow");
		*err = "ENOBUFS";
		return -1;
	}
	m = ca_malloc(sizeof *m + LWS_PRE + (pong ? 125 : len) + 14);
	m->next = NULL;
	m->pong = pong;
	n = wire_form(ws, m->buf + LWS_PRE, data, len, &kind);
	m->kind = kind;
	if (n < 0) {
		free(m);
		ca__ws_drop(ws, 1006, "no masking key");
		*err = "ECLOSED";
		return -1;
	}
	m->len = (size_t)n;
	set_cost(ws, m);
	if (ws->tail)
		ws->tail->next = m;
	else
		ws->head = m;
	ws->tail = m;
	ws->queued += m->cost;
	want_write(ws);
	return 0;
}

static int queue_msg(lua_State *L, int kind)
{
	struct ca_ws *ws = check_ws(L);
	size_t len;
	const char *data = luaL_checklstring(L, 2, &len);
	const char *err = NULL;

	if (ca__ws_send(ws, data, len, kind, &err) == 0) {
		lua_pushboolean(L, 1);
		return 1;
	}
	if (strcmp(err, "ENOBUFS") == 0)
		return ca_fail(L, "ENOBUFS", "send queue over %zu bytes: peer too slow, connection dropped", ws->max_queue);
	return ca_fail(L, "ECLOSED", "the connection is closed");
}

static int l_send(lua_State *L)
{
	return queue_msg(L, LWS_WRITE_TEXT);
}

static int l_send_binary(lua_State *L)
{
	return queue_msg(L, LWS_WRITE_BINARY);
}

static int l_close(lua_State *L)
{
	struct ca_ws *ws = check_ws(L);
	lua_Integer code = luaL_optinteger(L, 2, 1000);
	size_t rlen;
	const char *reason = luaL_optlstring(L, 3, "", &rlen);

	luaL_argcheck(L, sendable_close_code((long)code), 2, "not a close code an endpoint may send");
	luaL_argcheck(L, rlen <= 123, 3, "reason longer than 123 bytes");
	if (ws->state == CA_WS_CLOSED || closing(ws))
		return 0;
	if (ws->state == CA_WS_CONNECTING) {
		snprintf(ws->error, sizeof ws->error, "ECANCELED: closed before it connected");
		if (ws->wsi)
			ca__ws_kill(ws->wsi);
		else
			ca__wsc_cancel(ws);	/* no lws connection yet */
		return 0;
	}
	if (ws->wsi == NULL)
		return 0;
	ws->close_code = (int)code;
	memcpy(ws->close_reason, reason, rlen);
	ws->close_reason[rlen] = '\0';
	want_write(ws);
	close_deadline(ws);	/* the frame may wait behind a queue the peer never reads */
	return 0;
}

/* conn:abort(): drop the connection at once, without a close frame (the peer sees 1006). */
static int l_abort(lua_State *L)
{
	struct ca_ws *ws = check_ws(L);

	if (ws->state == CA_WS_CONNECTING && ws->is_client) {
		/*
		 * Its error says so, as a close's does: without one, the end of
		 * a connection under way (TCP, TLS, the upgrade) was taken for
		 * the server's, ECONNREFUSED.
		 */
		snprintf(ws->error, sizeof ws->error, "ECANCELED: aborted before it connected");
		if (ws->wsi)
			ca__ws_kill(ws->wsi);
		else
			ca__wsc_cancel(ws);	/* no lws connection yet */
	} else if (ws->wsi && ws->state != CA_WS_CLOSED) {
		ca__ws_drop(ws, 1006, "aborted");
	}
	return 0;
}

static int l_is_open(lua_State *L)
{
	struct ca_ws *ws = check_ws(L);

	lua_pushboolean(L, ws->state == CA_WS_OPEN && !closing(ws));
	return 1;
}

static int l_buffered(lua_State *L)
{
	lua_pushinteger(L, (lua_Integer)check_ws(L)->queued);
	return 1;
}

/* conn:stats(): messages in and out, and the recv / send calls on a socket of ours. */
static int l_stats(lua_State *L)
{
	struct ca_ws *ws = check_ws(L);

	lua_createtable(L, 0, 4);
	ca_set_int_field(L, "messages_in", ws->msgs_in);
	ca_set_int_field(L, "messages_out", ws->msgs_out);
	ca_set_int_field(L, "reads", ws->reads);
	ca_set_int_field(L, "writes", ws->writes);
	return 1;
}

static int l_pause(lua_State *L)
{
	struct ca_ws *ws = check_ws(L);

	ws->paused = 1;
	if (ws->io) {
		ws->io->paused = 1;
		io_update(ws->io);
	} else if (ws->wsi && ws->state == CA_WS_OPEN) {
		/* A client still connecting reads the upgrade's answer; then its socket is paused (ca__ws_take_socket). */
		lws_rx_flow_control(ws->wsi, 0);
	}
	return 0;
}

static int l_resume(lua_State *L)
{
	struct ca_ws *ws = check_ws(L);

	if (ws->paused) {
		ws->paused = 0;
		ws->last_rx = uv_now(ca_loop());	/* a ping's wait starts over */
		ws->ping_sent = 0;
	}
	if (parsed_here(ws) && held(ws)) {
		/*
		 * What was read before the pause goes first, from the loop
		 * (not inside this call, whose caller may be the handler, or
		 * a task); the socket is read again after it (on_resume).
		 */
		if (ws->resume_timer == NULL) {
			ws->resume_timer = ca_malloc(sizeof *ws->resume_timer);
			uv_timer_init(ca_loop(), ws->resume_timer);
			ws->resume_timer->data = ws;
		}
		uv_timer_start(ws->resume_timer, on_resume, 0, 0);
	} else if (ws->io) {
		ws->io->paused = 0;
		io_update(ws->io);
	} else if (ws->wsi) {
		lws_rx_flow_control(ws->wsi, 1);
	}
	return 0;
}

static int l_gc(lua_State *L)
{
	struct ws_box *b = luaL_checkudata(L, 1, WS_MT);
	struct ca_ws *ws = b->ws;

	b->ws = NULL;
	if (ws == NULL)
		return 0;
	ws->lua_alive = 0;
	if (ws->state == CA_WS_CLOSED)
		free_ws(ws);
	else
		ws->handler_ref = ws->self_ref = LUA_NOREF;	/* the state is going away */
	return 0;
}

/* __index: methods first, then the connection's own table; "id" is built in. */
static int l_index(lua_State *L)
{
	struct ws_box *b = luaL_checkudata(L, 1, WS_MT);

	lua_pushvalue(L, 2);
	if (lua_rawget(L, lua_upvalueindex(1)) != LUA_TNIL)
		return 1;
	lua_pop(L, 1);
	if (lua_type(L, 2) == LUA_TSTRING && strcmp(lua_tostring(L, 2), "id") == 0) {
		lua_pushinteger(L, b->ws ? b->ws->id : 0);
		return 1;
	}
	lua_getiuservalue(L, 1, 1);
	lua_pushvalue(L, 2);
	lua_rawget(L, -2);
	return 1;
}

static int l_newindex(lua_State *L)
{
	luaL_checkudata(L, 1, WS_MT);
	lua_getiuservalue(L, 1, 1);
	lua_pushvalue(L, 2);
	lua_pushvalue(L, 3);
	lua_rawset(L, -3);
	return 0;
}

static int l_tostring(lua_State *L)
{
	struct ca_ws *ws = check_ws(L);

	lua_pushfstring(L, "callagent.WebSocket %I (%s)", ws ? ws->id : (lua_Integer)0,
			ws == NULL ? "freed" : ws->state == CA_WS_OPEN ? "open" :
			ws->state == CA_WS_CONNECTING ? "connecting" : "closed");
	return 1;
}

void ca__ws_register(lua_State *L)
{
	static const luaL_Reg methods[] = {
		{"send", l_send},
		{"send_binary", l_send_binary},
		{"close", l_close},
		{"abort", l_abort},
		{"is_open", l_is_open},
		{"buffered", l_buffered},
		{"stats", l_stats},
		{"pause", l_pause},
		{"resume", l_resume},
		{NULL, NULL}
	};

	if (luaL_newmetatable(L, WS_MT)) {
		luaL_newlib(L, methods);
		lua_pushcclosure(L, l_index, 1);
		lua_setfield(L, -2, "__index");
		lua_pushcfunction(L, l_newindex);
		lua_setfield(L, -2, "__newindex");
		lua_pushcfunction(L, l_gc);
		lua_setfield(L, -2, "__gc");
		lua_pushcfunction(L, l_tostring);
		lua_setfield(L, -2, "__tostring");
	}
	lua_pop(L, 1);
}
