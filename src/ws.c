/*
 * ws.c - callagent.core.ws: WebSocket client on libwebsockets, on our loop.
 *
 *   conn, err = ws.connect(opts, handler)
 *     opts.url             "ws://host[:port]/path?query" or "wss://..."
 *     opts.headers         {Name = value}: extra handshake headers (e.g. Authorization)
 *     opts.ca_file         PEM file of extra CAs trusted for wss (the system store is
 *                          always trusted; certificate and host name checks stay on)
 *     opts.timeout         connect + handshake timeout in ms (default 10000)
 *     opts.ping_interval   seconds of silence before we ping (default 20; 0 = never);
 *                          no pong within opts.pong_timeout (default 10) s: closed
 *     opts.max_message     largest incoming message (default 16 MiB)
 *     opts.max_send_queue  bytes we may queue (default 4 MiB); over it: dropped
 *     handler(conn, event, a, b) as in src/wsconn.c: "open" (a = response
 *       headers, b = {version, cipher, resumed} over wss://, else nil),
 *       "text", "binary", "close" (code, reason), or "error" (a = "ECODE:
 *       message") when it never connected: ETIMEDOUT (the name lookup
 *       included), ENOTFOUND, ECONNREFUSED, ETLS (certificate or TLS
 *       failure), EHANDSHAKE (the server did not upgrade - the HTTP status is
 *       in the message -, or its 101 lacks Upgrade or the right
 *       Sec-WebSocket-Accept, or chose an extension, or a subprotocol not
 *       among those of a Sec-WebSocket-Protocol in opts.headers), ECANCELED.
 *   Returns the connection (connecting), or nil, "EINVAL: ..." for a bad URL.
 *
 * The header values (API keys) never appear in errors or logs.
 *
 * Client connections live in the process' lws context (see wsconn.h), on
 * one plain vhost: lws connects to an address and carries the connection's
 * bytes raw until the upgrade is answered; then the socket is ours (see
 * ca__ws_take_socket). The rest is ours too: the name lookup (off the loop
 * thread), TLS (OpenSSL through a BIO of ours that reads the bytes we are
 * handed and writes them raw - lws 4.1.6 starts TLS on a raw client
 * connection before its socket has connected, so it cannot do it) and the
 * WebSocket protocol (RFC 6455: the upgrade, framing, pings, the close
 * handshake; the frame parser is shared with the server, in wsconn.c).
 * lws 4.1's own client parses incoming frames one byte per function call;
 * on the model connection, which carries every call's audio, that was the
 * largest user-space cost of the process. Here a frame's payload is handed
 * on in one piece, without a copy when a message arrives whole.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "crypto.h"
#include "wsconn.h"

#define MAX_RESPONSE_HEAD 16384
#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

/* The client side of one connection: handshake, incoming frames, pings. */
struct ca_wsc {
	/* Our upgrade request until it is written (it holds header values: wiped). */
	unsigned char *req;		/* LWS_PRE bytes, then the request */
	size_t req_len;
	char accept[32];		/* the Sec-WebSocket-Accept the server must send */
	char *protocols;		/* the Sec-WebSocket-Protocol offered (opts.headers), or NULL */
	char *head;			/* the server's response head so far */
	size_t head_len;

	/* wss: OpenSSL with our BIO (lws carries the ciphertext). */
	SSL *ssl;
	const unsigned char *rx;	/* ciphertext lws has handed us, not yet read */
	size_t rx_len;
	int tls_started, tls_up;

	/* Before the connect: the host name being resolved, then its addresses. */
	struct lookup *lookup;
	struct target *target;
	uv_timer_t *next_timer;		/* the next address, after one that failed */
	int in_connect;			/* inside lws_client_connect_via_info */
	int tcp_up;
	char last_err[128];		/* why the last address failed */
};

/*
 * Host names are resolved on libuv's thread pool. lws 4.1.6 as Debian
 * builds it (no LWS_WITH_SYS_ASYNC_DNS) calls getaddrinfo() on the loop
 * thread: every call's model connection would hold up every live call's
 * audio for its lookup - milliseconds, or seconds when DNS is slow or down.
 * So lws gets a numeric address. Connections to a name being resolved wait
 * for that one lookup (a burst of calls makes one query, not hundreds on
 * the pool's four threads), and an answer is kept for DNS_CACHE_MS, as
 * curl keeps its own (CURLOPT_DNS_CACHE_TIMEOUT). A running lookup is
 * ca__abandonable(): a stop does not wait for it.
 */
#define DNS_CACHE_MS 60000
#define DNS_CACHE_MAX 16
#define ADDRS_MAX 8			/* addresses kept and tried per name */

struct addrs {
	int n;
	char a[ADDRS_MAX][INET6_ADDRSTRLEN];
};

struct lookup {				/* one connection waiting for its name */
	struct lookup *next, **pprev;	/* in its resolve's waiters */
	struct ca_ws *ws;
};

struct resolve {			/* one name being resolved */
	uv_getaddrinfo_t req;
	struct resolve *next, **pprev;	/* in resolves */
	struct lookup *waiters;
	char host[];
};

struct dns_entry {			/* an answer kept */
	struct dns_entry *next;
	uint64_t until;			/* uv_now() */
	struct addrs addrs;		/* IPv4 first; one that failed goes last */
	char host[];
};

struct target {				/* a connection by name: where, and its addresses in turn */
	struct addrs addrs;
	int next, port;
	char *host, *path, *hosthdr;	/* in mem */
	char mem[];
};

static struct resolve *resolves;
static struct dns_entry *dns_cache;
static int dns_hooked, dns_closed;

static void drop_lookup(struct ca_wsc *c);
static int may_try_next(struct ca_ws *ws);
static void address_failed(struct ca_ws *ws, const char *why);
static void schedule_next(struct ca_ws *ws);
static int tls_rx(struct ca_ws *ws, const unsigned char *in, size_t len);
static int client_rx(struct ca_ws *ws, unsigned char *p, size_t len);
static int tls_start(struct ca_ws *ws);
static int send_request(struct ca_ws *ws);

/*
 * Frees memory that held header values (API keys). OPENSSL_cleanse, not
 * memset: the compiler may drop a memset whose memory is freed next.
 */
static void wipe_free(void *p, size_t n)
{
	if (p == NULL)
		return;
	OPENSSL_cleanse(p, n);
	free(p);
}

static void free_client(struct ca_ws *ws)
{
	struct ca_wsc *c = ws->cl;

	if (c == NULL)
		return;
	ws->cl = NULL;
	drop_lookup(c);
	free(c->target);
	if (c->next_timer)
		uv_close((uv_handle_t *)c->next_timer, (uv_close_cb)free);
	wipe_free(c->req, LWS_PRE + c->req_len);
	free(c->head);
	free(c->protocols);
	SSL_free(c->ssl);
	free(c);
}

static void conn_finished(struct ca_ws *ws, struct lws *wsi)
{
	if (wsi)
		lws_set_wsi_user(wsi, NULL);
	free_client(ws);
	ca__ws_closed(ws);
}

static void classify_error(struct ca_ws *ws, const char *in)
{
	if (ws->error[0])
		return;	/* ours (ETLS, EHANDSHAKE, ETIMEDOUT) */
	if (in && (strstr(in, "getaddrinfo") || strstr(in, "resolve") || strstr(in, "DNS")))
		snprintf(ws->error, sizeof ws->error, "ENOTFOUND: %s", in);
	else
		snprintf(ws->error, sizeof ws->error, "ECONNREFUSED: %s", in && *in ? in : "connection failed");
}

/* ---- the upgrade ---- */

/*
 * Steps *pos to the next header line of a response head (start at the head:
 * the status line is skipped). 1 with the name and the trimmed value, 0 at
 * the end. Lines without a name and a colon are skipped.
 */
static int next_header(const char **pos, const char **name, size_t *nl, const char **val, size_t *vl)
{
	const char *l;

	while ((l = strstr(*pos, "\r\n")) != NULL && l[2] != '\0') {
		const char *n = l + 2, *eol = strstr(n, "\r\n"), *colon = memchr(n, ':', (size_t)(eol - n));
		const char *v, *e;

		*pos = n;
		if (colon == NULL || colon == n)
			continue;
		for (v = colon + 1; *v == ' ' || *v == '\t'; v++)
			;
		for (e = eol; e > v && (e[-1] == ' ' || e[-1] == '\t'); e--)
			;
		*name = n;
		*nl = (size_t)(colon - n);
		*val = v;
		*vl = (size_t)(e - v);
		return 1;
	}
	return 0;
}

/* The trimmed value of header name (any case) in head; NULL if absent. */
static const char *find_header(const char *head, const char *name, size_t *len)
{
	const char *pos = head, *n, *v;
	size_t nl, want = strlen(name);

	while (next_header(&pos, &n, &nl, &v, len))
		if (nl == want && strncasecmp(n, name, nl) == 0)
			return v;
	return NULL;
}

/* What the connection's TLS is ({version, cipher, resumed}), or nil over ws://. */
static void push_tls_info(lua_State *L, SSL *ssl)
{
	if (ssl == NULL) {
		lua_pushnil(L);
		return;
	}
	lua_createtable(L, 0, 3);
	lua_pushstring(L, SSL_get_version(ssl));
	lua_setfield(L, -2, "version");
	lua_pushstring(L, SSL_get_cipher_name(ssl));
	lua_setfield(L, -2, "cipher");
	lua_pushboolean(L, SSL_session_reused(ssl));
	lua_setfield(L, -2, "resumed");
}

/* Pushes the response head's headers as a table (lowercase names; repeats joined by ", "). */
static void push_response_headers(lua_State *L, const char *head)
{
	const char *pos = head, *name, *v;
	size_t nl, vl;

	lua_createtable(L, 0, 8);
	while (next_header(&pos, &name, &nl, &v, &vl)) {
		char lower[128];

		if (nl >= sizeof lower)
			continue;
		for (size_t i = 0; i < nl; i++)
			lower[i] = (name[i] >= 'A' && name[i] <= 'Z') ? (char)(name[i] + 32) : name[i];
		lua_pushlstring(L, lower, nl);
		if (lua_rawget(L, -2) == LUA_TSTRING) {
			lua_pushliteral(L, ", ");
			lua_pushlstring(L, v, vl);
			lua_concat(L, 3);
		} else {
			lua_pop(L, 1);
			lua_pushlstring(L, v, vl);
		}
		lua_pushlstring(L, lower, nl);
		lua_insert(L, -2);
		lua_rawset(L, -3);
	}
}

/* Checks the complete response head; 0 if the server upgraded, else -1 with ws->error set. */
static int check_upgrade(struct ca_ws *ws, const char *head)
{
	const char *v;
	size_t n;
	int status = 0;

	if (sscanf(head, "HTTP/1.%*d %d", &status) != 1) {
		snprintf(ws->error, sizeof ws->error, "EHANDSHAKE: the server's answer is not HTTP/1.1");
		return -1;
	}
	if (status != 101) {
		snprintf(ws->error, sizeof ws->error, "EHANDSHAKE: server answered HTTP %d instead of upgrading", status);
		return -1;
	}
	if ((v = find_header(head, "upgrade", &n)) == NULL || n != 9 || strncasecmp(v, "websocket", 9) != 0 ||
	    (v = find_header(head, "connection", &n)) == NULL || !ca__has_token(v, n, "upgrade")) {
		snprintf(ws->error, sizeof ws->error, "EHANDSHAKE: the server's 101 lacks Upgrade: websocket");
		return -1;
	}
	if ((v = find_header(head, "sec-websocket-accept", &n)) == NULL ||
	    n != strlen(ws->cl->accept) || memcmp(v, ws->cl->accept, n) != 0) {
		snprintf(ws->error, sizeof ws->error, "EHANDSHAKE: wrong or missing Sec-WebSocket-Accept");
		return -1;
	}
	if (find_header(head, "sec-websocket-extensions", &n)) {
		snprintf(ws->error, sizeof ws->error, "EHANDSHAKE: the server chose an extension we did not offer");
		return -1;
	}
	/* A subprotocol must be one that was offered (RFC 6455 4.1), if any was. */
	if ((v = find_header(head, "sec-websocket-protocol", &n)) != NULL) {
		const char *offered = ws->cl->protocols;
		char chosen[128];
		int ok = 0;

		if (offered && n > 0 && n < sizeof chosen && memchr(v, ',', n) == NULL) {
			memcpy(chosen, v, n);
			chosen[n] = '\0';
			ok = ca__has_token(offered, strlen(offered), chosen);
		}
		if (!ok) {
			snprintf(ws->error, sizeof ws->error, "EHANDSHAKE: the server chose a subprotocol we did not offer");
			return -1;
		}
	}
	return 0;
}

/*
 * Takes response bytes until the head is whole, then opens the connection
 * and hands what follows to the frame parser. -1: close (ws->error says why).
 */
static int handshake_rx(struct ca_ws *ws, const unsigned char *p, size_t len)
{
	struct ca_wsc *c = ws->cl;
	lua_State *L = ca_lua();
	size_t from = c->head_len > 3 ? c->head_len - 3 : 0, take = len, used;
	char *end;

	if (c->head_len + take > MAX_RESPONSE_HEAD)
		take = MAX_RESPONSE_HEAD - c->head_len;
	c->head = ca_realloc(c->head, c->head_len + take + 1);
	memcpy(c->head + c->head_len, p, take);
	c->head_len += take;
	c->head[c->head_len] = '\0';
	end = memmem(c->head + from, c->head_len - from, "\r\n\r\n", 4);
	if (end == NULL) {
		if (c->head_len < MAX_RESPONSE_HEAD)
			return 0;
		snprintf(ws->error, sizeof ws->error, "EHANDSHAKE: response head over %d bytes", MAX_RESPONSE_HEAD);
		return -1;
	}
	end[2] = '\0';		/* the head ends with its last header's CRLF */
	used = (size_t)(end + 4 - c->head) - (c->head_len - take);
	if (strchr(c->head, '\0') != end + 2 || check_upgrade(ws, c->head) != 0) {
		if (!ws->error[0])
			snprintf(ws->error, sizeof ws->error, "EHANDSHAKE: NUL byte in the response head");
		return -1;
	}

	ws->state = CA_WS_OPEN;
	/*
	 * From here on the socket is ours (see ca__ws_take_socket): lws's
	 * service and write path cost every frame of the audio. The rest of
	 * this read (already in hand) goes on below.
	 */
	ca__ws_take_socket(ws, client_rx);
	if (ws->connect_timer) {
		uv_timer_stop(ws->connect_timer);
		uv_close((uv_handle_t *)ws->connect_timer, (uv_close_cb)free);
		ws->connect_timer = NULL;
	}
	ca__ws_start_pings(ws);
	if (L) {
		push_response_headers(L, c->head);
		free(c->head);
		c->head = NULL;
		push_tls_info(L, c->ssl);
		ca__ws_emit(ws, "open", 2);
	} else {
		free(c->head);
		c->head = NULL;
	}
	if (ws->cl == NULL || ws->wsi == NULL)
		return 0;
	return ca__ws_parse(ws, (unsigned char *)p + used, len - used);
}

/* Bytes the connection carries in the clear (after TLS, if any). -1: close. */
static int plain_rx(struct ca_ws *ws, const unsigned char *p, size_t len)
{
	if (ws->state == CA_WS_CONNECTING)
		return handshake_rx(ws, p, len);
	return ca__ws_parse(ws, (unsigned char *)p, len);
}

/* Bytes from the server, through lws or, once the socket is ours, read by us. -1: close. */
static int client_rx(struct ca_ws *ws, unsigned char *p, size_t len)
{
	if (ws->cl == NULL)
		return -1;
	if (ws->cl->ssl)
		return tls_rx(ws, p, len);
	return plain_rx(ws, p, len);
}

/* ---- the lws callback ---- */

/*
 * Closed, aborted or timed out before the open (ws->error says which): lws
 * ends the connection soon (ca__ws_kill), and until then nothing more is
 * done for it. An upgrade answer already read would open it: an "open"
 * event after the app gave it up, and no error event.
 */
static int given_up(const struct ca_ws *ws)
{
	return ws->state == CA_WS_CONNECTING && ws->error[0];
}

static int client_callback(struct lws *wsi, enum lws_callback_reasons reason,
			   void *user, void *in, size_t len)
{
	struct ca_ws *ws = user;

	switch (reason) {
	case LWS_CALLBACK_RAW_CONNECTED:
	case LWS_CALLBACK_RAW_ADOPT:
		/* TCP is up: TLS (if wss), then the upgrade request. */
		if (ws == NULL || ws->cl == NULL)
			return -1;
		ws->cl->tcp_up = 1;
		if (!given_up(ws))
			lws_callback_on_writable(wsi);
		return 0;

	case LWS_CALLBACK_RAW_WRITEABLE:
		if (ws == NULL || ws->cl == NULL || given_up(ws))
			return 0;
		if (ws->cl->ssl && !ws->cl->tls_started)
			return tls_start(ws);
		if (ws->cl->req && !ws->cl->ssl)
			return send_request(ws);
		return ca__ws_writeable(ws);

	case LWS_CALLBACK_RAW_RX:
		if (ws == NULL || ws->cl == NULL || ws->fr.broken || given_up(ws))
			return 0;
		ws->last_rx = uv_now(ca_loop());
		return client_rx(ws, in, len);

	case LWS_CALLBACK_CLIENT_CONNECTION_ERROR:
		if (ws == NULL || ws->state == CA_WS_CLOSED)
			return 0;
		if (may_try_next(ws)) {
			/* This address refused or is unreachable: the next one. */
			address_failed(ws, in);
			lws_set_wsi_user(wsi, NULL);
			ws->wsi = NULL;
			if (!ws->cl->in_connect)	/* else start_connect's caller goes on */
				schedule_next(ws);
			return 0;
		}
		classify_error(ws, in);
		conn_finished(ws, wsi);
		return 0;

	case LWS_CALLBACK_RAW_CLOSE:
	case LWS_CALLBACK_WSI_DESTROY:
		/* Last word on a connection, however it ended. */
		if (ws && ws->state != CA_WS_CLOSED) {
			if (ws->state == CA_WS_CONNECTING)
				classify_error(ws, "the server closed the connection during the upgrade");
			conn_finished(ws, wsi);
		}
		return 0;

	default:
		break;
	}
	return 0;
}

static const struct lws_protocols protocols[] = {
	{"callagent-ws-client", client_callback, 0, 2048, 0, NULL, 65536},
	{NULL, NULL, 0, 0, 0, NULL, 0}
};

/* The one client vhost: plain TCP; TLS is ours (below). */
static struct lws_vhost *get_vhost(const char **err)
{
	struct lws_context_creation_info info;
	struct lws_context *ctx = ca__lws_ctx(0, err);
	struct lws_vhost *vh;

	if (ctx == NULL)
		return NULL;
	vh = lws_get_vhost_by_name(ctx, "callagent-ws-client");
	if (vh)
		return vh;
	memset(&info, 0, sizeof info);
	info.port = CONTEXT_PORT_NO_LISTEN;
	info.protocols = protocols;
	info.vhost_name = "callagent-ws-client";
	vh = ca__lws_vhost(&info);
	if (vh == NULL)
		*err = "cannot set up the WebSocket client";
	return vh;
}

/* ---- TLS (OpenSSL; lws carries the ciphertext) ---- */

/*
 * The connection's BIO. Reads take the ciphertext just read (tls_rx points
 * c->rx at it for the length of the call), writes go straight to the
 * socket, which keeps what the socket does not take. Memory BIOs
 * would copy every record twice more and keep buffers the size of the
 * largest burst (the certificate chain) for the connection's life.
 */
static BIO_METHOD *bio_method;

static int bio_read(BIO *b, char *out, int n)
{
	struct ca_ws *ws = BIO_get_data(b);
	struct ca_wsc *c = ws->cl;

	BIO_clear_retry_flags(b);
	if (c == NULL || c->rx_len == 0) {
		BIO_set_retry_read(b);
		return -1;
	}
	if ((size_t)n > c->rx_len)
		n = (int)c->rx_len;
	memcpy(out, c->rx, (size_t)n);
	c->rx += n;
	c->rx_len -= (size_t)n;
	return n;
}

static int bio_write(BIO *b, const char *in, int n)
{
	struct ca_ws *ws = BIO_get_data(b);

	BIO_clear_retry_flags(b);
	if (ca__ws_raw_write(ws, (const unsigned char *)in, (size_t)n) < 0)
		return -1;
	return n;
}

static long bio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
	(void)b;
	(void)num;
	(void)ptr;
	return cmd == BIO_CTRL_FLUSH;	/* nothing is held back; the rest is not supported */
}

static int bio_create(BIO *b)
{
	BIO_set_init(b, 1);
	return 1;
}

static BIO_METHOD *get_bio_method(void)
{
	if (bio_method == NULL) {
		bio_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "callagent-ws");
		if (bio_method == NULL)
			return NULL;
		BIO_meth_set_read(bio_method, bio_read);
		BIO_meth_set_write(bio_method, bio_write);
		BIO_meth_set_ctrl(bio_method, bio_ctrl);
		BIO_meth_set_create(bio_method, bio_create);
	}
	return bio_method;
}

/*
 * Session resumption. A full handshake has the server send its certificate
 * chain, which we parse, verify and keep with the connection, and a
 * signature we check; a resumed one does neither, so a connection costs
 * less CPU to set up and less memory for its life (the sessions made from
 * one full handshake share its certificates). The server's session tickets
 * go into a pool per server (host and port, in the context of the CA file
 * that verified it), and each new connection to that server takes one, the
 * newest, and uses it once (RFC 8446, C.4). A server that refuses a ticket
 * gets a full handshake; a burst of connections opened before any ticket
 * came back does full handshakes too.
 */
#define TICKETS_MAX 32		/* sessions kept per server */
#define PEERS_MAX 64		/* servers with a pool, per context */

struct tls_peer {
	struct tls_peer *next;
	SSL_SESSION *ticket[TICKETS_MAX];	/* oldest first */
	int n;
	char key[];			/* "host port" */
};

/* An IPv4 or IPv6 address, not a name. */
static int numeric_host(const char *host)
{
	unsigned char a[16];

	return inet_pton(AF_INET, host, a) == 1 || inet_pton(AF_INET6, host, a) == 1;
}

/* One client TLS context per CA file (system store only: ca_file NULL). */
struct tls_ctx {
	struct tls_ctx *next;
	SSL_CTX *ctx;
	struct tls_peer *peers;
	int npeers;
	char ca_file[];
};
static struct tls_ctx *tls_ctxs;

static void free_tls_ctxs(void)
{
	while (tls_ctxs) {
		struct tls_ctx *n = tls_ctxs->next;

		while (tls_ctxs->peers) {
			struct tls_peer *p = tls_ctxs->peers;

			tls_ctxs->peers = p->next;
			while (p->n > 0)
				SSL_SESSION_free(p->ticket[--p->n]);
			free(p);
		}
		SSL_CTX_free(tls_ctxs->ctx);
		free(tls_ctxs);
		tls_ctxs = n;
	}
	BIO_meth_free(bio_method);
	bio_method = NULL;
}

/* OpenSSL hands over a session (a ticket) the server gave us; 1: we keep it. */
static int on_new_session(SSL *ssl, SSL_SESSION *sess)
{
	struct tls_peer *p = SSL_get_app_data(ssl);

	if (p == NULL || !SSL_SESSION_is_resumable(sess))
		return 0;
	if (p->n == TICKETS_MAX) {
		SSL_SESSION_free(p->ticket[0]);
		memmove(p->ticket, p->ticket + 1, (TICKETS_MAX - 1) * sizeof p->ticket[0]);
		p->n--;
	}
	p->ticket[p->n++] = sess;
	return 1;
}

/* The pool of host:port in t, made if missing; NULL when t has too many. */
static struct tls_peer *get_peer(struct tls_ctx *t, const char *host, int port)
{
	char key[300];
	struct tls_peer *p;

	snprintf(key, sizeof key, "%s %d", host, port);
	for (p = t->peers; p; p = p->next)
		if (strcmp(p->key, key) == 0)
			return p;
	if (t->npeers == PEERS_MAX)
		return NULL;
	p = ca_malloc(sizeof *p + strlen(key) + 1);
	p->n = 0;
	strcpy(p->key, key);
	p->next = t->peers;
	t->peers = p;
	t->npeers++;
	return p;
}

/* Sets ssl to resume with the newest ticket of p that has not expired. */
static void resume(SSL *ssl, struct tls_peer *p)
{
	time_t now = time(NULL);

	while (p->n > 0) {
		SSL_SESSION *s = p->ticket[--p->n];
		int ok = SSL_SESSION_get_time(s) + SSL_SESSION_get_timeout(s) > now &&
			 SSL_set_session(ssl, s) == 1;

		SSL_SESSION_free(s);	/* SSL_set_session took its own reference */
		if (ok)
			return;
	}
}

static struct tls_ctx *get_tls_ctx(const char *ca_file, const char **err)
{
	const char *key = ca_file ? ca_file : "";
	struct tls_ctx *t;
	SSL_CTX *ctx;

	for (t = tls_ctxs; t; t = t->next)
		if (strcmp(t->ca_file, key) == 0)
			return t;
	ctx = SSL_CTX_new(TLS_client_method());
	if (ctx == NULL) {
		*err = "cannot create a TLS context";
		return NULL;
	}
	SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
	SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
	SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
	/*
	 * The system store as a directory of certificates named by subject
	 * hash (OpenSSL's default, /usr/lib/ssl/certs: Debian's
	 * /etc/ssl/certs; SSL_CERT_DIR overrides it), as fetch uses it: a
	 * verification reads only the root it needs, once. Loading the whole
	 * bundle instead cost the process' first wss:// connection 47-70 ms
	 * and 5 MB of RSS for its ~140 certificates.
	 */
	if (SSL_CTX_load_verify_dir(ctx, ca_system_ca_dir()) != 1)
		ERR_clear_error();	/* no system store: only ca_file is trusted */
	if (ca_file && SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1) {
		ERR_clear_error();
		SSL_CTX_free(ctx);
		*err = "cannot load ca_file (not a PEM file of certificates?)";
		return NULL;
	}
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
	SSL_CTX_sess_set_new_cb(ctx, on_new_session);
	if (tls_ctxs == NULL)
		ca__at_close(free_tls_ctxs);
	t = ca_malloc(sizeof *t + strlen(key) + 1);
	strcpy(t->ca_file, key);
	t->ctx = ctx;
	t->peers = NULL;
	t->npeers = 0;
	t->next = tls_ctxs;
	tls_ctxs = t;
	return t;
}

/*
 * Sets up the connection's TLS session for host:port (SNI and the name
 * checked), resuming an earlier session with that server when one is kept.
 */
static int tls_new(struct ca_ws *ws, struct tls_ctx *t, const char *host, int port)
{
	struct tls_peer *peer;
	struct ca_wsc *c = ws->cl;
	int is_ip = numeric_host(host);
	BIO_METHOD *m = get_bio_method();
	BIO *bio;

	c->ssl = SSL_new(t->ctx);
	bio = m ? BIO_new(m) : NULL;
	if (c->ssl == NULL || bio == NULL) {
		BIO_free(bio);
		return -1;
	}
	BIO_set_data(bio, ws);
	SSL_set_bio(c->ssl, bio, bio);	/* one reference, for both ways */
	if (is_ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), host) != 1
		  : (SSL_set_tlsext_host_name(c->ssl, host) != 1 || SSL_set1_host(c->ssl, host) != 1))
		return -1;
	peer = get_peer(t, host, port);
	SSL_set_app_data(c->ssl, peer);
	if (peer)
		resume(c->ssl, peer);
	SSL_set_connect_state(c->ssl);
	return 0;
}

/*
 * After each message in or out. OpenSSL 3.0 keeps a 16 KiB record buffer per
 * connection even with SSL_MODE_RELEASE_BUFFERS; between messages nothing is
 * in it (SSL_free_buffers refuses when something is), so it goes: about 9 KiB
 * of RSS less per call, for a malloc per message.
 */
static void tls_idle(struct ca_wsc *c)
{
	if (c->tls_up && c->rx == NULL)	/* in tls_rx: it frees them when done */
		SSL_free_buffers(c->ssl);
}

/* Why TLS failed, into ws->error. */
static void tls_error(struct ca_ws *ws, const char *stage)
{
	long vr = ws->cl->ssl ? SSL_get_verify_result(ws->cl->ssl) : X509_V_OK;
	unsigned long e = ERR_get_error();

	if (vr != X509_V_OK)
		snprintf(ws->error, sizeof ws->error, "ETLS: certificate not trusted: %s",
			 X509_verify_cert_error_string(vr));
	else
		snprintf(ws->error, sizeof ws->error, "ETLS: %s: %s", stage,
			 e ? ERR_reason_error_string(e) : "connection closed");
	ERR_clear_error();
}

int ca__wsc_write(struct ca_ws *ws, unsigned char *buf, size_t len)
{
	struct ca_wsc *c = ws->cl;

	if (c == NULL || ws->wsi == NULL)
		return -1;
	if (c->ssl == NULL)
		return ca__ws_raw_write(ws, buf, len);
	if (len && SSL_write(c->ssl, buf, (int)len) <= 0) {
		ERR_clear_error();
		return -1;
	}
	tls_idle(c);
	return 0;
}

/* Starts the TLS handshake: our ClientHello. */
static int tls_start(struct ca_ws *ws)
{
	struct ca_wsc *c = ws->cl;
	int n;

	c->tls_started = 1;
	n = SSL_do_handshake(c->ssl);
	if (n != 1 && SSL_get_error(c->ssl, n) != SSL_ERROR_WANT_READ) {
		tls_error(ws, "handshake");
		return -1;
	}
	return 0;
}

/* Runs OpenSSL on c->rx until it wants more. */
static int tls_read(struct ca_ws *ws)
{
	static unsigned char buf[16384];
	struct ca_wsc *c = ws->cl;
	int n;

	if (!c->tls_up) {
		n = SSL_do_handshake(c->ssl);
		if (n != 1) {
			if (SSL_get_error(c->ssl, n) == SSL_ERROR_WANT_READ)
				return 0;
			tls_error(ws, "handshake");	/* the alert is written */
			return -1;
		}
		c->tls_up = 1;
		if (send_request(ws) != 0)
			return -1;
	}
	for (;;) {
		n = SSL_read(c->ssl, buf, sizeof buf);
		if (n <= 0) {
			int e = SSL_get_error(c->ssl, n);

			if (e == SSL_ERROR_WANT_READ)
				return 0;
			if (e != SSL_ERROR_ZERO_RETURN) {
				tls_error(ws, "read");
				if (ws->state == CA_WS_OPEN)
					ca_log(CA_LOG_WARN, "websocket %lld: %s", (long long)ws->id, ws->error);
			}
			return -1;	/* close_notify or a TLS error: the connection is over */
		}
		if (plain_rx(ws, buf, (size_t)n) != 0)
			return -1;
		if (ws->cl != c || ws->fr.broken)
			return ws->cl == c ? 0 : -1;
		/*
		 * All the ciphertext read and no record left, whole or in part:
		 * another SSL_read could only say so (SSL_ERROR_WANT_READ).
		 */
		if (c->rx_len == 0 && !SSL_has_pending(c->ssl))
			return 0;
	}
}

/* Ciphertext from the server: the handshake, then records to decrypt. -1: close. */
static int tls_rx(struct ca_ws *ws, const unsigned char *in, size_t len)
{
	struct ca_wsc *c = ws->cl;
	int r;

	c->rx = in;
	c->rx_len = len;
	r = tls_read(ws);
	if (ws->cl == c) {
		c->rx = NULL;	/* lws's buffer: not ours past this call */
		c->rx_len = 0;
		tls_idle(c);
	}
	return r;
}

/* Sends the upgrade request (TCP, and TLS if any, are up). */
static int send_request(struct ca_ws *ws)
{
	struct ca_wsc *c = ws->cl;
	int r = ca__wsc_write(ws, c->req + LWS_PRE, c->req_len);

	wipe_free(c->req, LWS_PRE + c->req_len);
	c->req = NULL;
	return r;
}

static void on_connect_timeout(uv_timer_t *t)
{
	struct ca_ws *ws = t->data;

	if (ws->state != CA_WS_CONNECTING)
		return;
	if (!ws->error[0])
		snprintf(ws->error, sizeof ws->error, "ETIMEDOUT: no connection within %llu ms",
			 (unsigned long long)uv_timer_get_repeat(t));
	if (ws->wsi) {
		ca__ws_kill(ws->wsi);
		return;
	}
	/* Still resolving, or canceled while it was (ca__wsc_cancel). */
	if (ws->cl)
		drop_lookup(ws->cl);
	conn_finished(ws, NULL);
}

/* ---- the name lookup, then the connect ---- */

/* Takes c off the list of its name's lookup (which goes on for the others). */
static void drop_lookup(struct ca_wsc *c)
{
	struct lookup *l = c->lookup;

	if (l == NULL)
		return;
	c->lookup = NULL;
	*l->pprev = l->next;
	if (l->next)
		l->next->pprev = l->pprev;
	free(l);
}

/* Teardown: connections still waiting for a name end (ECANCELED) at once. */
static void end_lookups(void)
{
	dns_closed = 1;
	for (struct resolve *r = resolves; r; r = r->next) {
		while (r->waiters) {
			struct ca_ws *ws = r->waiters->ws;

			drop_lookup(ws->cl);
			snprintf(ws->error, sizeof ws->error, "ECANCELED: shutting down");
			conn_finished(ws, NULL);
		}
		uv_cancel((uv_req_t *)&r->req);
	}
	while (dns_cache) {
		struct dns_entry *e = dns_cache->next;

		free(dns_cache);
		dns_cache = e;
	}
}

/*
 * lws connects to address (numeric). 0, or -1 (nothing emitted; the state
 * is CLOSED if lws already reported the failure, else ws->error may say why).
 */
static int start_connect(struct ca_ws *ws, const char *address, int port, const char *path,
			 const char *hosthdr)
{
	struct lws_client_connect_info ci;
	const char *verr = NULL;
	struct lws *wsi;

	memset(&ci, 0, sizeof ci);
	ci.context = ca__lws_ctx(0, &verr);
	ci.vhost = get_vhost(&verr);
	if (ci.context == NULL || ci.vhost == NULL) {
		snprintf(ws->error, sizeof ws->error, "EIO: %s", verr ? verr : "no lws context");
		return -1;
	}
	ci.address = address;
	ci.port = port;
	ci.path = path;
	ci.host = hosthdr;
	ci.method = "RAW";
	ci.local_protocol_name = "callagent-ws-client";
	ci.userdata = ws;
	ci.pwsi = &ws->wsi;
	ws->cl->in_connect = 1;
	wsi = lws_client_connect_via_info(&ci);
	if (ws->cl)
		ws->cl->in_connect = 0;
	if (wsi == NULL || ws->state == CA_WS_CLOSED || ws->wsi == NULL) {
		if (ws->state != CA_WS_CLOSED)
			ws->wsi = NULL;
		return -1;
	}
	return 0;
}

/* The addresses of res, IPv4 first (every network routes it), in the resolver's order. */
static void collect_addrs(const struct addrinfo *res, struct addrs *out)
{
	out->n = 0;
	for (int v6 = 0; v6 < 2; v6++) {
		for (const struct addrinfo *a = res; a && out->n < ADDRS_MAX; a = a->ai_next) {
			char *dst = out->a[out->n];
			int rc;

			if (a->ai_family != (v6 ? AF_INET6 : AF_INET))
				continue;
			rc = v6 ? uv_ip6_name((const struct sockaddr_in6 *)a->ai_addr, dst, INET6_ADDRSTRLEN)
				: uv_ip4_name((const struct sockaddr_in *)a->ai_addr, dst, INET6_ADDRSTRLEN);
			if (rc == 0)
				out->n++;
		}
	}
}

/* The kept answer for host, or NULL (expired ones go). */
static struct dns_entry *dns_cached(const char *host)
{
	uint64_t now = uv_now(ca_loop());

	for (struct dns_entry **pe = &dns_cache; *pe;) {
		struct dns_entry *e = *pe;

		if (e->until <= now) {
			*pe = e->next;
			free(e);
		} else if (strcmp(e->host, host) == 0) {
			return e;
		} else {
			pe = &e->next;
		}
	}
	return NULL;
}

static void dns_keep(const char *host, const struct addrs *addrs)
{
	struct dns_entry *e, **pe;
	int n = 0;

	for (pe = &dns_cache; *pe; pe = &(*pe)->next)
		if (++n == DNS_CACHE_MAX) {	/* full: the oldest goes */
			free(*pe);
			*pe = NULL;
			break;
		}
	e = ca_malloc(sizeof *e + strlen(host) + 1);
	strcpy(e->host, host);
	e->addrs = *addrs;
	e->until = uv_now(ca_loop()) + DNS_CACHE_MS;
	e->next = dns_cache;
	dns_cache = e;
}

/*
 * Connects to the target's addresses in turn, from its next one: 0 when
 * lws has one under way, -1 when none is left (or lws reported the end).
 */
static int try_next(struct ca_ws *ws)
{
	struct ca_wsc *c = ws->cl;
	struct target *t = c->target;

	while (t->next < t->addrs.n) {
		const char *a = t->addrs.a[t->next++];

		if (start_connect(ws, a, t->port, t->path, t->hosthdr) == 0)
			return 0;
		if (ws->state == CA_WS_CLOSED || ws->cl != c || ws->error[0])
			return -1;
	}
	return -1;
}

/* Ends a connection by name whose addresses all failed (the "error" event). */
static void targets_failed(struct ca_ws *ws)
{
	if (ws->state == CA_WS_CLOSED)
		return;
	classify_error(ws, ws->cl && ws->cl->last_err[0] ? ws->cl->last_err : NULL);
	conn_finished(ws, NULL);
}

/* Where the connection by name goes; its addresses come from the lookup. */
static struct target *new_target(struct ca_ws *ws, const char *host, int port, const char *path,
				 const char *hosthdr)
{
	size_t hl = strlen(host) + 1, pl = strlen(path) + 1, ql = strlen(hosthdr) + 1;
	struct target *t = ca_malloc(sizeof *t + hl + pl + ql);

	t->addrs.n = 0;
	t->next = 0;
	t->port = port;
	t->host = memcpy(t->mem, host, hl);
	t->path = memcpy(t->mem + hl, path, pl);
	t->hosthdr = memcpy(t->mem + hl + pl, hosthdr, ql);
	ws->cl->target = t;
	return t;
}

/* A refused or unreachable address, before TCP was up, with more to try. */
static int may_try_next(struct ca_ws *ws)
{
	struct ca_wsc *c = ws->cl;

	return c && c->target && c->target->next < c->target->addrs.n && !c->tcp_up && !ws->error[0];
}

/*
 * Notes why; and the address goes to the end of the kept answer, so later
 * connections try the others first.
 */
static void address_failed(struct ca_ws *ws, const char *why)
{
	struct target *t = ws->cl->target;
	struct dns_entry *e = dns_cached(t->host);
	const char *bad = t->addrs.a[t->next - 1];

	snprintf(ws->cl->last_err, sizeof ws->cl->last_err, "%s", why ? why : "");
	if (e && e->addrs.n > 1 && strcmp(e->addrs.a[0], bad) == 0) {
		char first[INET6_ADDRSTRLEN];

		memcpy(first, e->addrs.a[0], sizeof first);
		memmove(e->addrs.a[0], e->addrs.a[1], (size_t)(e->addrs.n - 1) * sizeof e->addrs.a[0]);
		memcpy(e->addrs.a[e->addrs.n - 1], first, sizeof first);
	}
}

static void on_next_timer(uv_timer_t *tm)
{
	struct ca_ws *ws = tm->data;

	if (ws->state != CA_WS_CONNECTING || ws->cl == NULL || ws->wsi || ws->cl->lookup)
		return;
	if (dns_closed) {	/* shutting down: lws may be gone */
		snprintf(ws->error, sizeof ws->error, "ECANCELED: shutting down");
		conn_finished(ws, NULL);
		return;
	}
	if (try_next(ws) != 0)
		targets_failed(ws);
}

/* The next address, from the loop (lws is still inside the failed one's callback). */
static void schedule_next(struct ca_ws *ws)
{
	struct ca_wsc *c = ws->cl;

	if (c->next_timer == NULL) {
		c->next_timer = ca_malloc(sizeof *c->next_timer);
		uv_timer_init(ca_loop(), c->next_timer);
		c->next_timer->data = ws;
	}
	uv_timer_start(c->next_timer, on_next_timer, 0, 0);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
	struct resolve *r = (struct resolve *)req;
	struct addrs addrs = {0};
	char err[200] = "";

	ca__abandonable(-1);
	*r->pprev = r->next;
	if (r->next)
		r->next->pprev = r->pprev;
	if (status == 0)
		collect_addrs(res, &addrs);
	if (status != 0)
		snprintf(err, sizeof err, "ENOTFOUND: %s: %s", r->host, uv_strerror(status));
	else if (addrs.n == 0)
		snprintf(err, sizeof err, "ENOTFOUND: %s: no IPv4 or IPv6 address", r->host);
	else if (!dns_closed)
		dns_keep(r->host, &addrs);
	uv_freeaddrinfo(res);
	while (r->waiters) {
		struct ca_ws *ws = r->waiters->ws;

		drop_lookup(ws->cl);
		if (err[0]) {
			snprintf(ws->error, sizeof ws->error, "%s", err);
			conn_finished(ws, NULL);	/* the "error" event */
			continue;
		}
		ws->cl->target->addrs = addrs;
		if (try_next(ws) != 0)
			targets_failed(ws);
	}
	free(r);
}

/*
 * Connects to host by name: at once with a kept answer, else once the
 * lookup (this connection's, or one already under way) is done. 0, or -1
 * with the connection not under way.
 */
static int start_lookup(struct ca_ws *ws, const char *host, int port, const char *path,
			const char *hosthdr)
{
	struct target *t = new_target(ws, host, port, path, hosthdr);
	struct dns_entry *e = dns_cached(host);
	struct resolve *r;
	struct lookup *l;

	if (e) {
		t->addrs = e->addrs;	/* a copy: the entry may change meanwhile */
		if (try_next(ws) == 0)
			return 0;
		if (ws->state != CA_WS_CLOSED && !ws->error[0])
			classify_error(ws, ws->cl->last_err[0] ? ws->cl->last_err : NULL);
		return -1;
	}
	for (r = resolves; r; r = r->next)
		if (strcmp(r->host, host) == 0)
			break;
	if (r == NULL) {
		struct addrinfo hints;
		int rc;

		memset(&hints, 0, sizeof hints);
		hints.ai_family = AF_UNSPEC;
		hints.ai_socktype = SOCK_STREAM;
		r = ca_malloc(sizeof *r + strlen(host) + 1);
		strcpy(r->host, host);
		r->waiters = NULL;
		rc = uv_getaddrinfo(ca_loop(), &r->req, on_resolved, r->host, NULL, &hints);
		if (rc != 0) {
			snprintf(ws->error, sizeof ws->error, "ENOTFOUND: %s: %s", host, uv_strerror(rc));
			free(r);
			return -1;
		}
		ca__abandonable(1);
		if (!dns_hooked) {
			dns_hooked = 1;
			ca__at_close(end_lookups);
		}
		r->next = resolves;
		r->pprev = &resolves;
		if (resolves)
			resolves->pprev = &r->next;
		resolves = r;
	}
	l = ca_malloc(sizeof *l);
	l->ws = ws;
	l->next = r->waiters;
	l->pprev = &r->waiters;
	if (r->waiters)
		r->waiters->pprev = &l->next;
	r->waiters = l;
	ws->cl->lookup = l;
	return 0;
}

/*
 * conn:close() or conn:abort() before lws has a connection under way (the
 * name being resolved, or between two addresses): ECANCELED, soon.
 */
void ca__wsc_cancel(struct ca_ws *ws)
{
	if (ws->cl == NULL || ws->wsi || ws->connect_timer == NULL)
		return;
	drop_lookup(ws->cl);
	if (ws->cl->next_timer)
		uv_timer_stop(ws->cl->next_timer);
	uv_timer_start(ws->connect_timer, on_connect_timeout, 0, 0);
}

/*
 * Splits "ws[s]://host[:port][/path][?query]" into its parts (in place, in
 * buf); path gets the path and query ("/" when neither), which fit in it.
 */
static int parse_url(char *buf, int *tls, char **host, int *port, char *path, size_t pathcap)
{
	char *p = buf, *rest, *colon;

	if (strncasecmp(p, "ws://", 5) == 0) {
		*tls = 0;
		p += 5;
	} else if (strncasecmp(p, "wss://", 6) == 0) {
		*tls = 1;
		p += 6;
	} else {
		return -1;
	}
	*port = *tls ? 443 : 80;
	/*
	 * The host ends at a '?' too ("wss://h?model=x" was looked up as the
	 * name "h?model=x", and the error quoted the query); a fragment is
	 * not sent (RFC 6455 3).
	 */
	rest = p + strcspn(p, "/?#");
	snprintf(path, pathcap, "%s%.*s", *rest == '/' ? "" : "/", (int)strcspn(rest, "#"), rest);
	*rest = '\0';
	if (*p == '[') {
		char *close = strchr(p, ']');

		if (close == NULL || (close[1] != ':' && close[1] != '\0'))
			return -1;
		*close = '\0';
		*host = p + 1;
		colon = close[1] == ':' ? close + 1 : NULL;
	} else {
		*host = p;
		colon = strchr(p, ':');
		if (colon)
			*colon = '\0';
	}
	if (colon) {
		char *e;
		long v = strtol(colon + 1, &e, 10);

		if (*e || v <= 0 || v > 65535)
			return -1;
		*port = (int)v;
	}
	if (**host == '\0')
		return -1;
	return 0;
}

/* A growing byte buffer for the request. */
struct sbuf {
	unsigned char *p;
	size_t n, cap;
};

static void sb_add(struct sbuf *b, const void *s, size_t n)
{
	if (b->n + n > b->cap) {
		size_t cap = b->cap ? b->cap : 512;

		while (cap < b->n + n)
			cap *= 2;
		/* Not realloc: the old block may hold a header value; wipe it. */
		unsigned char *p = ca_malloc(cap);

		if (b->p) {
			memcpy(p, b->p, b->n);
			wipe_free(b->p, b->cap);
		}
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->n, s, n);
	b->n += n;
}

static void sb_str(struct sbuf *b, const char *s)
{
	sb_add(b, s, strlen(s));
}

/* Headers the handshake sets itself: a second Host, or a key of the caller's
 * beside ours, would make a request a server reads its own way. */
static const char *const own_headers[] = { "Host", "Upgrade", "Connection", "Sec-WebSocket-Key",
					   "Sec-WebSocket-Version", "Sec-WebSocket-Extensions", NULL };

/*
 * Builds the upgrade request (LWS_PRE bytes of headroom first) with the
 * extra headers of opts (at index 1) and a fresh key; accept gets the
 * answer the server must give, *offered a copy of any Sec-WebSocket-Protocol
 * among the headers (the subprotocols the server may choose from). -1 with
 * an error message on L for a bad header (its value is never shown).
 */
static int build_request(lua_State *L, const char *path, const char *host,
			 unsigned char **out, size_t *out_len, char accept[32], char **offered)
{
	static const char pre[LWS_PRE];
	unsigned char nonce[16], digest[EVP_MAX_MD_SIZE];
	char key[25], keyguid[24 + sizeof WS_GUID];
	unsigned dlen = 0;
	struct sbuf b = {0};

	if (RAND_bytes(nonce, sizeof nonce) != 1) {
		lua_pushliteral(L, "ws.connect: no random bytes for the handshake key");
		return -1;
	}
	key[ca_base64_encode(nonce, sizeof nonce, key)] = '\0';
	snprintf(keyguid, sizeof keyguid, "%s%s", key, WS_GUID);
	if (EVP_Digest(keyguid, strlen(keyguid), digest, &dlen, EVP_sha1(), NULL) != 1 || dlen != 20) {
		lua_pushliteral(L, "ws.connect: SHA-1 is not available");
		return -1;
	}
	accept[ca_base64_encode(digest, 20, accept)] = '\0';

	sb_add(&b, pre, sizeof pre);
	sb_str(&b, "GET ");
	sb_str(&b, path);
	sb_str(&b, " HTTP/1.1\r\nHost: ");
	sb_str(&b, host);
	sb_str(&b, "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ");
	sb_str(&b, key);
	sb_str(&b, "\r\n");
	if (lua_getfield(L, 1, "headers") == LUA_TTABLE) {
		lua_pushnil(L);
		while (lua_next(L, -2)) {
			size_t nl, vl;
			const char *name, *val, *bad = NULL;

			if (lua_type(L, -2) != LUA_TSTRING || !lua_isstring(L, -1)) {
				bad = "headers must map names to strings";
			} else {
				name = lua_tolstring(L, -2, &nl);
				val = lua_tolstring(L, -1, &vl);
				for (size_t i = 0; i < nl && !bad; i++)
					if (name[i] <= 32 || name[i] >= 127 || name[i] == ':')
						bad = "a header name has a character HTTP does not allow";
				if (nl == 0)
					bad = "a header name is empty";
				for (size_t i = 0; own_headers[i] && !bad; i++)
					if (strlen(own_headers[i]) == nl && strncasecmp(name, own_headers[i], nl) == 0)
						bad = "a header the handshake sets itself (Host, Upgrade, Connection, "
						      "Sec-WebSocket-Key, -Version, -Extensions) cannot be given";
				for (size_t i = 0; i < vl && !bad; i++)
					if (val[i] == '\r' || val[i] == '\n' || val[i] == '\0')
						bad = "a header value has a line break or NUL byte";
			}
			if (bad) {
				wipe_free(b.p, b.cap);
				free(*offered);
				*offered = NULL;
				lua_pushfstring(L, "ws.connect: %s", bad);
				return -1;
			}
			if (nl == 22 && strncasecmp(name, "Sec-WebSocket-Protocol", 22) == 0 && *offered == NULL) {
				*offered = ca_malloc(vl + 1);
				memcpy(*offered, val, vl + 1);
			}
			sb_add(&b, name, nl);
			sb_str(&b, ": ");
			sb_add(&b, val, vl);
			sb_str(&b, "\r\n");
			lua_pop(L, 1);
		}
	}
	lua_pop(L, 1);
	sb_str(&b, "\r\n");
	*out = b.p;
	*out_len = b.n - LWS_PRE;
	return 0;
}

static int l_connect(lua_State *L)
{
	struct lws_vhost *vh;
	struct tls_ctx *tctx = NULL;
	const char *verr = NULL;
	struct ca_ws *ws;
	const char *url, *ca_file;
	char *buf, *host, hosthdr[300], fullpath[2048], accept[32], *offered = NULL;
	unsigned char *req;
	int tls, port;
	lua_Integer timeout, ping, pong, max_message, max_send_queue;
	size_t urllen, req_len;

	luaL_checktype(L, 1, LUA_TTABLE);
	luaL_checktype(L, 2, LUA_TFUNCTION);
	if (lua_getfield(L, 1, "url") != LUA_TSTRING)
		return luaL_argerror(L, 1, "url must be a string");
	url = lua_tolstring(L, -1, &urllen);
	lua_pop(L, 1);
	ca_file = ca_opt_string_field(L, 1, "ca_file", NULL);
	timeout = ca_opt_int_field(L, 1, "timeout", 10000);
	ping = ca_opt_int_field(L, 1, "ping_interval", 20);
	pong = ca_opt_int_field(L, 1, "pong_timeout", 10);
	luaL_argcheck(L, timeout > 0, 1, "timeout must be > 0");
	luaL_argcheck(L, ping >= 0 && ping < 65535 && pong > 0 && pong < 65535, 1,
		      "ping_interval and pong_timeout must be seconds");
	/* Read before anything is allocated: a raise would leak it. */
	max_message = ca_opt_int_field(L, 1, "max_message", 16 << 20);
	max_send_queue = ca_opt_int_field(L, 1, "max_send_queue", 4 << 20);
	luaL_argcheck(L, max_message >= 0 && max_send_queue >= 0, 1,
		      "max_message and max_send_queue must be >= 0");
	if (urllen >= sizeof fullpath - 2)
		return ca_fail(L, "EINVAL", "URL too long");

	buf = ca_malloc(urllen + 1);
	memcpy(buf, url, urllen + 1);
	if (parse_url(buf, &tls, &host, &port, fullpath, sizeof fullpath) != 0) {
		free(buf);
		return ca_fail(L, "EINVAL", "not a ws:// or wss:// URL");
	}
	if ((tls && port == 443) || (!tls && port == 80))
		snprintf(hosthdr, sizeof hosthdr, strchr(host, ':') ? "[%s]" : "%s", host);
	else
		snprintf(hosthdr, sizeof hosthdr, strchr(host, ':') ? "[%s]:%d" : "%s:%d", host, port);

	vh = get_vhost(&verr);
	if (vh == NULL || (tls && (tctx = get_tls_ctx(ca_file, &verr)) == NULL)) {
		free(buf);
		return ca_fail(L, vh ? "ETLS" : "EIO", "%s", verr);
	}

	if (build_request(L, fullpath, hosthdr, &req, &req_len, accept, &offered) != 0) {
		free(buf);
		return lua_error(L);
	}

	ws = ca__ws_new(L, (size_t)max_message, (size_t)max_send_queue);
	ws->is_client = 1;
	ws->handler_ref = ca_ref(L, 2);
	ws->cl = ca_malloc(sizeof *ws->cl);
	memset(ws->cl, 0, sizeof *ws->cl);
	ws->cl->req = req;
	ws->cl->req_len = req_len;
	memcpy(ws->cl->accept, accept, sizeof accept);
	ws->cl->protocols = offered;
	ws->ping_ms = (uint64_t)ping * 1000;
	ws->pong_ms = (uint64_t)pong * 1000;
	if (tls && tls_new(ws, tctx, host, port) != 0) {
		ERR_clear_error();
		/* host points into buf: the message is made before buf goes. */
		snprintf(ws->error, sizeof ws->error, "ETLS: cannot set up TLS for %s", host);
		free(buf);
		lua_pop(L, 1);
		ca_unref(L, &ws->handler_ref);	/* no event: the error is the return value */
		free_client(ws);
		ca__ws_closed(ws);
		lua_pushnil(L);
		lua_pushstring(L, ws->error);
		return 2;
	}

	ws->connect_timer = ca_malloc(sizeof *ws->connect_timer);
	uv_timer_init(ca_loop(), ws->connect_timer);
	ws->connect_timer->data = ws;
	if ((numeric_host(host) ? start_connect(ws, host, port, fullpath, hosthdr)
				: start_lookup(ws, host, port, fullpath, hosthdr)) != 0) {
		free(buf);
		if (ws->state == CA_WS_CLOSED) {
			/*
			 * lws failed it inside the connect call, and the "error"
			 * event has told the handler already: the connection is
			 * returned, closed, so that the error is not told twice.
			 */
			return 1;
		}
		/* It failed at once; report it as a return value, not an event. */
		ca_unref(L, &ws->handler_ref);
		ws->wsi = NULL;
		free_client(ws);
		ca__ws_closed(ws);
		lua_pop(L, 1);
		lua_pushnil(L);
		lua_pushstring(L, ws->error[0] ? ws->error : "ECONNREFUSED: connection failed");
		return 2;
	}
	uv_timer_start(ws->connect_timer, on_connect_timeout, (uint64_t)timeout, (uint64_t)timeout);
	free(buf);
	return 1;
}

int luaopen_callagent_core_ws(lua_State *L)
{
	static const luaL_Reg fns[] = {
		{"connect", l_connect},
		{NULL, NULL}
	};
	ca__ws_register(L);
	luaL_newlib(L, fns);
	return 1;
}
