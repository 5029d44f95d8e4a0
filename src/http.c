/*
 * http.c - callagent.core.http: HTTP/1.1 + WebSocket server on libwebsockets,
 * joined to the host's libuv loop. Routing, static files and coroutines are
 * Lua's business (lua/callagent/http.lua); this file moves bytes and enforces
 * limits.
 *
 *   srv, err = http.listen(opts, on_request, on_ws)
 *     opts.host            address to bind (default "127.0.0.1")
 *     opts.port            port, 0 = any free one (default 0)
 *     opts.max_header      bytes of request line + headers (default 8192);
 *                          over it the connection is closed and a warning logged.
 *                          Process-wide: all servers and clients share it (see
 *                          configure); a different value fails with EINVAL
 *     opts.max_body        request body bytes (default 1 MiB); over it: 413
 *     opts.body_timeout    seconds a request body may take after its headers (60);
 *                          the first bytes past it get 408 and the connection closes
 *     opts.response_idle   seconds a response may make no progress (30): a client
 *                          that takes none of it for this long is dropped
 *     opts.max_connections open connections (default 1024); over it: 503
 *     opts.max_ws_message  incoming WebSocket message bytes (default 1 MiB); over it: close 1009
 *     opts.max_send_queue  bytes queued per WebSocket (default 1 MiB); over it the
 *                          peer is too slow and is dropped (close 1008)
 *     opts.ws_paths        array of paths that accept a WebSocket upgrade (others: 404)
 *     opts.ws_ping         a WebSocket peer silent this many seconds is pinged (60; 0: never)
 *     opts.ws_pong         and dropped if it does not answer within this many (10)
 *     opts.headers         extra (non-standard) request header names to capture,
 *                          e.g. {"x-twilio-signature"}; standard ones are always captured
 *     opts.tls             {cert = "file.pem", key = "file.pem"}: serve https/wss
 *     on_request(req, r)   r = {id, method, path, query, raw_query, headers, body, remote};
 *                          answer with req:respond(status, headers, body)
 *     on_ws(conn, event, a, b)   see wsconn.c ("open" gets the request table)
 *   returns a server, or nil, "EADDRINUSE: ..." / "EADDRNOTAVAIL: ..." / "ETLS: ..." etc.
 *
 *   http.configure{max_header = n}  the process-wide request head limit; call it
 *                         before the first server or client (else EINVAL when it differs)
 *
 *   srv.port, srv.host    the bound address
 *   srv:close([fn])       stop listening, close every connection (idempotent; also
 *                         __gc); fn() runs once that is done (a few ms later)
 *   srv:stop_listening()  refuse new connections (the port is free at once); the
 *                         open ones stay, and each response from now on closes its
 *                         connection (Connection: close): the way to drain before close
 *   srv:busy()            connections with a request in progress: read, handled or
 *                         its response still being written
 *   srv:connections()     open connections
 *
 *   req:respond(status, headers, body)  headers: name -> string (or array of
 *                          strings for a repeated header). true, or nil, "ECLOSED: ..."
 *                          when the client has gone.
 *   req:header(name)      any request header by name (also non-standard ones),
 *                          while the request is being handled
 *   req:is_open()         whether the client is still there
 *
 * r.query is a table of the query parameters (a repeated name gives an array),
 * decoded by lws (%xx and '+'); r.raw_query the decoded pairs joined by '&'.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <sys/socket.h>
#include <unistd.h>

#include "wsconn.h"

#define SERVER_MT "callagent.HttpServer"
#define REQ_MT "callagent.HttpRequest"
#define BODY_CHUNK 16384
#define BODY_RESERVE (1 << 20)		/* bytes of a declared body reserved at once */
#define MAX_CONNECTIONS (1 << 24)	/* a larger max_connections is this */

/*
 * One accepted connection of a server, from SERVER_NEW_CLIENT_INSTANTIATED
 * to WSI_DESTROY; the wsi's opaque user data. It, not the wsi's vhost, says
 * which server a connection belongs to: lws moves a request's wsi to the
 * first vhost whose listen port matches (lws_select_vhost), and every server
 * vhost has the same one, CONTEXT_PORT_NO_LISTEN_SERVER.
 */
struct conn_node {
	struct lws *wsi;
	struct server *s;
	struct conn_node *prev, *next;
	/*
	 * The bytes of the connection the process had read when its last
	 * answer was done (ca__tcp_bytes_read), 0 before the first, -1 when
	 * the kernel did not say. (Not in the pss: lws gives each request on
	 * a kept-alive connection a new one.)
	 */
	long long read_at_answer;
};

/*
 * One server: a vhost of the shared lws context. Created by listen(), owned
 * by its Lua userdata; freed once the userdata is gone, the vhost has been
 * finalized by lws and the close has run its course.
 */
struct server {
	struct lws_vhost *vh;
	int listen_fd;			/* ours: lws gets connections by adoption */
	uv_poll_t *lpoll;		/* watches listen_fd; NULL once closed */
	uv_timer_t *backoff;		/* accept paused (out of fds); NULL otherwise */
	int tls;
	struct conn_node *conns;
	int req_ref, ws_ref;
	int closed_ref;			/* fn() once the server is fully closed */
	char **ws_paths;
	int n_ws_paths;
	char **extra;			/* "name:" strings for lws_hdr_custom_copy */
	int n_extra;
	size_t max_body, max_ws_message, max_send_queue;
	int max_connections, nconn;
	uint64_t ws_ping_ms, ws_pong_ms;	/* see opts.ws_ping, ws_pong */
	uint64_t body_timeout_ms;	/* see opts.body_timeout */
	/*
	 * A response the client takes nothing of for this many seconds is
	 * dropped with its connection (and the body it holds): the handler's
	 * time is not bounded (dispatch), but a reader that stalls is.
	 */
	int response_idle_s;		/* see opts.response_idle */
	int port;
	char host[64];
	int closing;
	int draining;			/* stop_listening: responses close their connection */
	int vh_destroyed;		/* lws_vhost_destroy called */
	int vh_gone;			/* lws has finalized the vhost */
	int lua_alive;
	uv_timer_t *closer;		/* drives close(); NULL when done */
};

/*
 * One HTTP request and its response. Created when the request line and
 * headers are in; owned by the connection until handed to Lua, then shared
 * with the Lua handle: freed when both the connection is done with it and
 * the handle is collected.
 */
struct req {
	struct lws *wsi;		/* NULL once the connection is gone or the response sent */
	struct server *srv;
	lua_Integer id;
	int method;
	char *path;
	unsigned char *body;
	size_t body_len, body_cap, expect;
	uint64_t body_deadline;		/* uv_now() past which its body is too slow */
	int dispatched, lua_alive;

	/* The response. */
	int status;
	char *hdrs;			/* "name:\0value\0"... */
	size_t hdrs_len;
	unsigned char *out;
	size_t out_len, out_off;
	int responded, headers_sent, close_after;
	int no_content;		/* a 204 or 304: no body, no Content-Length */
};

/*
 * The retry policy of plain servers: no keepalive pings of lws's, which
 * would write on sockets that are ours (see ca__ws_take_socket) and never
 * see the answer; ours instead (opts.ws_ping).
 */
static const lws_retry_bo_t no_lws_pings;

/* Per-connection user data lws allocates for us. */
struct pss {
	struct req *req;
	struct ca_ws *ws;
};

/*
 * Whether lws 4.1.6 reads a body for the request: one its Content-Length
 * (clr, v: content_length()) does not say is empty, or without one a POST,
 * PUT or PATCH (lws reads up to 100 MB of what follows as its body).
 */
static int lws_reads_body(int method, int clr, unsigned long long v)
{
	if (clr == 0)
		return method == LWSHUMETH_POST || method == LWSHUMETH_PUT || method == LWSHUMETH_PATCH;
	return !(clr == 1 && v == 0);
}

/*
 * Whether the request line ended with its HTTP version. libwebsockets 4.1.6
 * decodes %0d and %0a in the URI and takes them for the end of the line, so
 * what follows them in the URI is read as header lines of the client's
 * choosing (a Host that passes as loopback, a Content-Type a form could not
 * send): such a request has no version, and is refused.
 */
static int whole_request_line(struct lws *wsi)
{
	return lws_hdr_total_length(wsi, WSI_TOKEN_HTTP) > 0;
}

static const char *method_names[] = {
	"GET", "POST", "OPTIONS", "PUT", "PATCH", "DELETE", "CONNECT", "HEAD", "GET"
};

/* ---- requests ---- */

static void free_req(struct req *r)
{
	free(r->path);
	free(r->body);
	free(r->hdrs);
	free(r->out);
	free(r);
}

/* The connection is done with r (response sent, or connection closed). */
static void release_req(struct req *r)
{
	r->wsi = NULL;
	if (!r->lua_alive)
		free_req(r);
}

static int req_gc(lua_State *L)
{
	struct req **b = luaL_checkudata(L, 1, REQ_MT);
	struct req *r = *b;

	*b = NULL;
	if (r == NULL)
		return 0;
	r->lua_alive = 0;
	if (r->wsi == NULL)
		free_req(r);
	return 0;
}

static struct req *check_req(lua_State *L)
{
	struct req **b = luaL_checkudata(L, 1, REQ_MT);

	if (*b == NULL)
		luaL_argerror(L, 1, "request already freed");
	return *b;
}

static void add_hdr(struct req *r, const char *name, size_t nl, const char *val, size_t vl)
{
	/* Stored as "name:\0value\0" with the name lowercased. */
	size_t need = r->hdrs_len + nl + 2 + vl + 1;

	r->hdrs = ca_realloc(r->hdrs, need);
	for (size_t i = 0; i < nl; i++) {
		char c = name[i];

		r->hdrs[r->hdrs_len++] = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
	}
	r->hdrs[r->hdrs_len++] = ':';
	r->hdrs[r->hdrs_len++] = '\0';
	memcpy(r->hdrs + r->hdrs_len, val, vl);
	r->hdrs_len += vl;
	r->hdrs[r->hdrs_len++] = '\0';
}

/*
 * A handler's header, kept for the answer. The server frames the body
 * itself (Content-Length, or none on a 204 or 304) and says whether the
 * connection stays open: a handler's Content-Length, Transfer-Encoding or
 * Connection would go out next to its own, two lengths that disagree (a
 * desync of the client or a proxy), so they are not kept; a Connection
 * with the close option closes the connection after the answer.
 */
static void take_hdr(struct req *r, const char *name, size_t nl, const char *val, size_t vl)
{
	if ((nl == 14 && !strncasecmp(name, "content-length", 14)) ||
	    (nl == 17 && !strncasecmp(name, "transfer-encoding", 17)))
		return;
	if (nl == 10 && !strncasecmp(name, "connection", 10)) {
		if (ca__has_token(val, vl, "close"))
			r->close_after = 1;
		return;
	}
	add_hdr(r, name, nl, val, vl);
}

static int valid_header_name(const char *s, size_t n)
{
	if (n == 0)
		return 0;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];

		if (c <= 32 || c >= 127 || c == ':' || c == '(' || c == ')' || c == ',' ||
		    c == '/' || c == ';' || c == '<' || c == '=' || c == '>' || c == '?' ||
		    c == '@' || c == '[' || c == '\\' || c == ']' || c == '{' || c == '}' || c == '"')
			return 0;
	}
	return 1;
}

static int valid_header_value(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0')
			return 0;
	return 1;
}

/* req:respond(status, headers, body) */
static int req_respond(lua_State *L)
{
	struct req *r = check_req(L);
	lua_Integer status = luaL_checkinteger(L, 2);
	size_t blen = 0;
	const char *body;

	/*
	 * A 1xx is no final answer (RFC 9110 15.2): the client would wait on
	 * for one the handler never gives.
	 */
	luaL_argcheck(L, status >= 200 && status <= 599, 2, "HTTP status must be 200..599");
	if (!lua_isnoneornil(L, 3))
		luaL_checktype(L, 3, LUA_TTABLE);
	body = luaL_optlstring(L, 4, "", &blen);
	if (r->responded)
		return luaL_error(L, "this request was already answered");
	if (r->wsi == NULL)
		return ca_fail(L, "ECLOSED", "the client has gone");

	r->status = (int)status;
	r->hdrs_len = 0;	/* an earlier call that raised took some: not for this one */
	if (lua_istable(L, 3)) {
		lua_pushnil(L);
		while (lua_next(L, 3)) {
			size_t nl, vl;
			const char *name, *val;

			if (lua_type(L, -2) != LUA_TSTRING)
				return luaL_error(L, "header names must be strings");
			name = lua_tolstring(L, -2, &nl);
			if (!valid_header_name(name, nl))
				return luaL_error(L, "invalid header name '%s'", name);
			if (lua_istable(L, -1)) {
				lua_Integer n = luaL_len(L, -1);

				for (lua_Integer i = 1; i <= n; i++) {
					lua_geti(L, -1, i);
					val = luaL_tolstring(L, -1, &vl);
					if (!valid_header_value(val, vl))
						return luaL_error(L, "invalid value for header '%s'", name);
					take_hdr(r, name, nl, val, vl);
					lua_pop(L, 2);
				}
			} else {
				val = luaL_tolstring(L, -1, &vl);
				if (!valid_header_value(val, vl))
					return luaL_error(L, "invalid value for header '%s'", name);
				take_hdr(r, name, nl, val, vl);
				lua_pop(L, 1);
			}
			lua_pop(L, 1);
		}
	}
	/*
	 * A 204 or a 304 has no content (RFC 9110 15.3.5, 15.4.5), nor has an
	 * answer to HEAD (9.3.2): a body a handler gives them is not sent,
	 * else the client would read it as the start of the next answer on the
	 * kept-alive connection. HEAD keeps the Content-Length of its body, as
	 * GET's; a 204 and a 304 send none (8.6: a 304's would have to be
	 * the 200's, not known here).
	 */
	r->no_content = status == 204 || status == 304;
	if (r->no_content)
		blen = 0;
	if (blen && r->method != LWSHUMETH_HEAD) {
		r->out = ca_malloc(blen);
		memcpy(r->out, body, blen);
	}
	r->out_len = blen;
	r->responded = 1;
	lws_set_timeout(r->wsi, PENDING_TIMEOUT_HTTP_CONTENT, r->srv->response_idle_s);
	lws_callback_on_writable(r->wsi);
	lua_pushboolean(L, 1);
	return 1;
}

/* Pushes a header value of len bytes without the spaces and tabs around it. */
static void push_value(lua_State *L, const char *v, int len)
{
	size_t n = ca__ows_trim(&v, (size_t)len);

	lua_pushlstring(L, v, n);
}

/* req:header(name): any header of the request while it is being handled. */
static int req_header(lua_State *L)
{
	struct req *r = check_req(L);
	size_t nl;
	const char *name = luaL_checklstring(L, 2, &nl);
	char key[128], stackbuf[1024], *buf;
	int len;

	if (r->wsi == NULL || nl == 0 || nl + 2 > sizeof key)
		return 0;
	for (size_t i = 0; i < nl; i++)
		key[i] = (name[i] >= 'A' && name[i] <= 'Z') ? (char)(name[i] + 32) : name[i];
	key[nl] = ':';
	key[nl + 1] = '\0';
	/* Standard headers first. */
	for (int t = 0; t < WSI_TOKEN_COUNT; t++) {
		const char *tn = (const char *)lws_token_to_string((enum lws_token_indexes)t);

		if (tn && strcmp(tn, key) == 0) {
			len = lws_hdr_total_length(r->wsi, (enum lws_token_indexes)t);
			if (len <= 0)
				return 0;
			buf = (size_t)len < sizeof stackbuf ? stackbuf : ca_malloc((size_t)len + 1);
			len = lws_hdr_copy(r->wsi, buf, len + 1, (enum lws_token_indexes)t);
			/* A declined Upgrade: h2c, blanked (see ca__push_headers). */
			if (t == WSI_TOKEN_UPGRADE && len > 0 && buf[0] == '\0')
				len = -1;
			if (len >= 0)
				push_value(L, buf, len);
			if (buf != stackbuf)
				free(buf);
			return len >= 0;
		}
	}
	len = lws_hdr_custom_length(r->wsi, key, (int)nl + 1);
	if (len < 0)
		return 0;
	buf = (size_t)len < sizeof stackbuf ? stackbuf : ca_malloc((size_t)len + 1);
	len = lws_hdr_custom_copy(r->wsi, buf, len + 1, key, (int)nl + 1);
	if (len >= 0)
		push_value(L, buf, len);
	if (buf != stackbuf)
		free(buf);
	return len >= 0;
}

static int req_is_open(lua_State *L)
{
	lua_pushboolean(L, check_req(L)->wsi != NULL);
	return 1;
}

/*
 * Pushes the extra (custom) headers the server captures into the table on
 * top, each whole whatever its length (max_header bounds it: a token past
 * 2 KiB was left out, and a provider's validateRequest saw no header).
 */
static void push_extra_headers(lua_State *L, struct server *s, struct lws *wsi)
{
	char stackbuf[2048], *buf;

	for (int i = 0; i < s->n_extra; i++) {
		int nl = (int)strlen(s->extra[i]);
		int len = lws_hdr_custom_length(wsi, s->extra[i], nl);

		if (len < 0)
			continue;
		buf = (size_t)len < sizeof stackbuf ? stackbuf : ca_malloc((size_t)len + 1);
		len = lws_hdr_custom_copy(wsi, buf, len + 1, s->extra[i], nl);
		if (len >= 0) {
			lua_pushlstring(L, s->extra[i], (size_t)nl - 1);
			push_value(L, buf, len);
			lua_rawset(L, -3);
		}
		if (buf != stackbuf)
			free(buf);
	}
}

static void push_remote(lua_State *L, struct lws *wsi)
{
	char peer[64];

	peer[0] = '\0';
	lws_get_peer_simple(wsi, peer, sizeof peer);
	lua_pushstring(L, peer);
}

/*
 * Pushes the query as lws decoded it: a table (name -> value, a repeated name
 * -> array of values) and the pairs joined with '&'.
 */
static void push_query(lua_State *L, struct lws *wsi)
{
	char small[4096], *big = NULL;
	luaL_Buffer raw;
	int tbl;

	lua_newtable(L);
	tbl = lua_gettop(L);
	luaL_buffinit(L, &raw);
	for (int i = 0; lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_URI_ARGS) > 0; i++) {
		int n = lws_hdr_copy_fragment(wsi, small, sizeof small, WSI_TOKEN_HTTP_URI_ARGS, i);
		char *frag = small, *eq;

		if (n < 0) {
			/* No parameter i (the end), or one over 4 KiB: taken whole,
			 * however long (lws's header buffer bounds it). */
			int len = lws_hdr_fragment_length(wsi, WSI_TOKEN_HTTP_URI_ARGS, i);

			if (len < (int)sizeof small)
				break;
			free(big);
			frag = big = ca_malloc((size_t)len + 1);
			n = lws_hdr_copy_fragment(wsi, frag, len + 1, WSI_TOKEN_HTTP_URI_ARGS, i);
			if (n < 0)
				break;
		}
		if (i)
			luaL_addchar(&raw, '&');
		luaL_addlstring(&raw, frag, (size_t)n);
		eq = memchr(frag, '=', (size_t)n);
		lua_pushlstring(L, frag, eq ? (size_t)(eq - frag) : (size_t)n);	/* name */
		if (eq)
			lua_pushlstring(L, eq + 1, (size_t)(frag + n - eq - 1));
		else
			lua_pushliteral(L, "");
		lua_pushvalue(L, -2);
		switch (lua_rawget(L, tbl)) {
		case LUA_TNIL:
			lua_pop(L, 1);
			lua_rawset(L, tbl);
			break;
		case LUA_TTABLE:	/* third and later values */
			lua_insert(L, -2);
			lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
			lua_pop(L, 2);
			break;
		default: {		/* second value: make an array */
			lua_createtable(L, 2, 0);
			lua_insert(L, -2);
			lua_rawseti(L, -2, 1);
			lua_insert(L, -2);
			lua_rawseti(L, -2, 2);
			lua_rawset(L, tbl);
			break;
		}
		}
	}
	free(big);
	luaL_pushresult(&raw);
}

static void quick_response(struct req *r, int status, const char *code, const char *msg, const char *field);

/* Hands a complete request to Lua: on_request(handle, table). */
static void dispatch(struct server *s, struct req *r)
{
	lua_State *L = ca_lua();
	struct req **b;

	if (L == NULL || r->dispatched)
		return;
	if (s->closing || s->req_ref == LUA_NOREF) {
		/* Read in the same turn the server was closed: nobody to hand it to. */
		CA_LOG_LIMITED(CA_LOG_WARN, "http: %s %s: the server is closing: answering 503",
		       method_names[r->method], r->path);
		quick_response(r, 503, "closing", "the server is closing", NULL);
		return;
	}
	r->dispatched = 1;
	/* Our handler decides how long it takes; lws should not time it out. */
	lws_set_timeout(r->wsi, NO_PENDING_TIMEOUT, 0);

	lua_rawgeti(L, LUA_REGISTRYINDEX, s->req_ref);
	b = lua_newuserdatauv(L, sizeof *b, 0);
	*b = r;
	r->lua_alive = 1;
	luaL_setmetatable(L, REQ_MT);

	lua_createtable(L, 0, 8);
	lua_pushinteger(L, r->id);
	lua_setfield(L, -2, "id");
	lua_pushstring(L, method_names[r->method]);
	lua_setfield(L, -2, "method");
	lua_pushstring(L, r->path);
	lua_setfield(L, -2, "path");
	push_query(L, r->wsi);
	lua_setfield(L, -3, "raw_query");
	lua_setfield(L, -2, "query");
	ca__push_headers(L, r->wsi);
	push_extra_headers(L, s, r->wsi);
	lua_setfield(L, -2, "headers");
	lua_pushlstring(L, r->body ? (char *)r->body : "", r->body_len);
	lua_setfield(L, -2, "body");
	push_remote(L, r->wsi);
	lua_setfield(L, -2, "remote");
	ca_call(L, 2, 0, "http request handler");
}

/* Answers straight from C (limits); the connection closes after it. */
/* field: the header at fault, as the API's errors name one (NULL: none). */
static void quick_response(struct req *r, int status, const char *code, const char *msg, const char *field)
{
	char body[256];
	int n = field
		? snprintf(body, sizeof body, "{\"error\":{\"code\":\"%s\",\"message\":\"%s\",\"field\":\"%s\"}}",
			   code, msg, field)
		: snprintf(body, sizeof body, "{\"error\":{\"code\":\"%s\",\"message\":\"%s\"}}", code, msg);

	add_hdr(r, "content-type", 12, "application/json", 16);
	/* As every answer of the Lua server's (see callagent.http's with_defaults). */
	add_hdr(r, "x-content-type-options", 22, "nosniff", 7);
	add_hdr(r, "cache-control", 13, "no-store", 8);
	r->status = status;
	r->out = ca_malloc((size_t)n);
	memcpy(r->out, body, (size_t)n);
	r->out_len = (size_t)n;
	r->responded = 1;
	r->dispatched = 1;
	r->close_after = 1;
	lws_callback_on_writable(r->wsi);
}

/*
 * RFC 9110's reason phrase (15) for the statuses lws writes without one
 * ("HTTP/1.1 204 ") or with the wrong one (every 3xx but 304 is
 * "Redirect"; RFC 2616's words for 407, 413, 414 and 416); NULL where lws'
 * is right (200, 304, the other 4xx to 417, 500-505).
 */
static const char *reason_phrase(int status)
{
	switch (status) {
	case 201: return "Created";
	case 202: return "Accepted";
	case 203: return "Non-Authoritative Information";
	case 204: return "No Content";
	case 205: return "Reset Content";
	case 206: return "Partial Content";
	case 300: return "Multiple Choices";
	case 301: return "Moved Permanently";
	case 302: return "Found";
	case 303: return "See Other";
	case 305: return "Use Proxy";
	case 307: return "Temporary Redirect";
	case 308: return "Permanent Redirect";
	case 407: return "Proxy Authentication Required";
	case 413: return "Content Too Large";
	case 414: return "URI Too Long";
	case 416: return "Range Not Satisfiable";
	case 421: return "Misdirected Request";
	case 422: return "Unprocessable Content";
	case 426: return "Upgrade Required";
	case 428: return "Precondition Required";
	case 429: return "Too Many Requests";
	case 431: return "Request Header Fields Too Large";
	case 451: return "Unavailable For Legal Reasons";
	default: return NULL;
	}
}

/*
 * Puts reason_phrase(status) into the status line lws wrote at start
 * ("HTTP/1.1 204 \r\n", then lws' own headers up to *p), moving what follows
 * it. 1 when it does not fit before end.
 */
static int set_reason(unsigned char *start, unsigned char **p, unsigned char *end, int status)
{
	const char *reason = reason_phrase(status);
	unsigned char *at = start + 13, *crlf;	/* after "HTTP/1.1 204 " */
	size_t rl;

	if (reason == NULL || *p - start < 15 || memcmp(start, "HTTP/1.", 7) || start[8] != ' ' || start[12] != ' ')
		return 0;
	crlf = memchr(at, '\r', (size_t)(*p - at));
	if (crlf == NULL)
		return 0;
	rl = strlen(reason);
	if ((size_t)(end - *p) < rl)
		return 1;
	memmove(at + rl, crlf, (size_t)(*p - crlf));
	memcpy(at, reason, rl);
	*p = at + rl + (*p - crlf);
	return 0;
}

/* Whether the answer has a header of that name ("date:", lowercase). */
static int has_hdr(const struct req *r, const char *name)
{
	size_t off = 0, nl = strlen(name);

	while (off < r->hdrs_len) {
		const char *n = r->hdrs + off, *val = n + strlen(n) + 1;

		if (strlen(n) == nl && memcmp(n, name, nl) == 0)
			return 1;
		off = (size_t)(val - r->hdrs) + strlen(val) + 1;
	}
	return 0;
}

/* Now as RFC 9110's IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT"), whatever the locale. */
static int http_date(char *out, size_t n)
{
	static const char days[7][4] = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat" };
	static const char months[12][4] = { "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
					    "Nov", "Dec" };
	time_t t = time(NULL);
	struct tm tm;

	if (gmtime_r(&t, &tm) == NULL)
		return 0;
	return snprintf(out, n, "%s, %02d %s %04d %02d:%02d:%02d GMT", days[tm.tm_wday], tm.tm_mday,
			months[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

/*
 * Writes the response headers, then the body in chunks. Returns 0 when more
 * is to come, 1 when the response is complete, -1 to close the connection.
 */
static int write_response(struct req *r)
{
	struct lws *wsi = r->wsi;

	if (!r->headers_sent) {
		/*
		 * Each header is written one byte longer than it is kept
		 * ("name: value\r\n" against "name:\0value\0"), and is kept in 4
		 * bytes at least; 512 for the status line and lws' own headers.
		 */
		size_t cap = LWS_PRE + r->hdrs_len + r->hdrs_len / 4 + 512;
		unsigned char *buf = ca_malloc(cap), *start = buf + LWS_PRE, *p = start, *end = buf + cap - 1;
		size_t off = 0;
		int bad = 0;

		if (lws_add_http_header_status(wsi, (unsigned int)r->status, &p, end) ||
		    set_reason(start, &p, end, r->status))
			bad = 1;
		while (!bad && off < r->hdrs_len) {
			const char *name = r->hdrs + off;
			const char *val = name + strlen(name) + 1;
			size_t vl = strlen(val);

			off = (size_t)(val - r->hdrs) + vl + 1;
			if (lws_add_http_header_by_name(wsi, (const unsigned char *)name,
							(const unsigned char *)val, (int)vl, &p, end))
				bad = 1;
		}
		if (!bad && !has_hdr(r, "date:")) {
			/* RFC 9110 6.6.1: an origin server with a clock sends it. */
			char date[40];
			int dl = http_date(date, sizeof date);

			if (dl > 0 && lws_add_http_header_by_name(wsi, (const unsigned char *)"date:",
								  (const unsigned char *)date, dl, &p, end))
				bad = 1;
		}
		if (r->srv->draining)
			r->close_after = 1;	/* nobody is to send the next request on it */
		if (!bad && r->close_after &&
		    lws_add_http_header_by_name(wsi, (const unsigned char *)"connection:",
						(const unsigned char *)"close", 5, &p, end))
			bad = 1;
		if (!bad && !r->no_content && lws_add_http_header_content_length(wsi, r->out_len, &p, end))
			bad = 1;
		if (!bad && lws_finalize_write_http_header(wsi, start, &p, end))
			bad = 1;
		free(buf);
		if (bad) {
			CA_LOG_LIMITED(CA_LOG_WARN, "http: %s %s: the response headers could not be written: connection closed",
			       method_names[r->method], r->path);
			return -1;
		}
		r->headers_sent = 1;
		if (r->out_len == 0 || r->method == LWSHUMETH_HEAD)
			return 1;
		lws_callback_on_writable(wsi);
		return 0;
	}

	while (r->out_off < r->out_len) {
		unsigned char chunk[LWS_PRE + BODY_CHUNK];
		size_t n = r->out_len - r->out_off;
		int last;

		if (n > BODY_CHUNK)
			n = BODY_CHUNK;
		last = r->out_off + n == r->out_len;
		memcpy(chunk + LWS_PRE, r->out + r->out_off, n);
		if (lws_write(wsi, chunk + LWS_PRE, n, last ? LWS_WRITE_HTTP_FINAL : LWS_WRITE_HTTP) < (int)n)
			return -1;
		r->out_off += n;
		if (!last && lws_send_pipe_choked(wsi)) {
			/* Some of it went: the client has response_idle_s again. */
			lws_set_timeout(wsi, PENDING_TIMEOUT_HTTP_CONTENT, r->srv->response_idle_s);
			lws_callback_on_writable(wsi);
			return 0;
		}
	}
	return 1;
}

/* Whether the request line says HTTP/1.0 (lws keeps "HTTP/1.x" as a header). */
static int http10(struct lws *wsi)
{
	char v[16];

	return lws_hdr_copy(wsi, v, sizeof v, WSI_TOKEN_HTTP) > 0 && strcmp(v, "HTTP/1.0") == 0;
}

/*
 * lws frames a request body by a Content-Length of at most this many
 * characters (it copies the value into a 32-byte buffer, lws_http_action);
 * a longer one it ignores, and reads a POST's body to 100 MB or a GET's as
 * the next request.
 */
#define LWS_CONTENT_LENGTH_MAX 30

/*
 * The request's Content-Length (RFC 9110 8.6: 1*DIGIT, the spaces and tabs
 * around it not part of it) into *v: 0 when there is none; 1 with *v set,
 * saturated (a value past what fits is only too large); 2 with *v set when
 * it is a number lws cannot frame the body by (longer than
 * LWS_CONTENT_LENGTH_MAX); -1 when it is not a number, *why saying how.
 */
static int content_length(struct lws *wsi, unsigned long long *v, const char **why)
{
	char small[LWS_CONTENT_LENGTH_MAX + 2], *buf, probe[1];
	int len = lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_CONTENT_LENGTH), n, rc;
	const char *p;
	size_t dl;

	*v = 0;
	if (len <= 0) {
		/* "Content-Length:" with nothing after it is there, and empty. */
		if (lws_hdr_copy_fragment(wsi, probe, sizeof probe, WSI_TOKEN_HTTP_CONTENT_LENGTH, 0) < 0)
			return 0;
		*why = "empty";
		return -1;
	}
	buf = (size_t)len < sizeof small ? small : ca_malloc((size_t)len + 1);
	n = lws_hdr_copy(wsi, buf, len + 1, WSI_TOKEN_HTTP_CONTENT_LENGTH);
	p = buf;
	dl = n < 0 ? 0 : ca__ows_trim(&p, (size_t)n);
	rc = len > LWS_CONTENT_LENGTH_MAX ? 2 : 1;
	if (n < 0) {
		*why = "cannot be read";
		rc = -1;
	} else if (dl == 0) {
		*why = "empty";
		rc = -1;
	}
	for (size_t i = 0; rc > 0 && i < dl; i++) {
		unsigned d = (unsigned)(unsigned char)p[i] - '0';

		if (d > 9) {
			*why = "not a number";
			rc = -1;
		} else {
			*v = *v >= ULLONG_MAX / 10 ? ULLONG_MAX : *v * 10 + d;
		}
	}
	if (buf != small)
		free(buf);
	return rc;
}

/*
 * The name of the header, Content-Length or Transfer-Encoding, that the
 * request has with spaces or tabs before its colon, or NULL. RFC 9112 5.1 has it refused with 400: lws keeps
 * it as an unknown header, so the body would be framed without it, where a
 * proxy in front that took it for the real one frames it by it (request
 * smuggling). 4.1.6 cannot list the unknown headers: the forms looked up are
 * one to four spaces, or tabs.
 */
static const char *framing_header_spaced(struct lws *wsi)
{
	static const char *const names[] = { "content-length", "transfer-encoding" };
	static const char *const shown[] = { "Content-Length", "Transfer-Encoding" };
	char key[32];

	for (int i = 0; i < 2; i++) {
		size_t nl = strlen(names[i]);

		memcpy(key, names[i], nl);
		for (int k = 1; k <= 4; k++) {
			for (int tab = 0; tab < 2; tab++) {
				memset(key + nl, tab ? '\t' : ' ', (size_t)k);
				key[nl + k] = ':';
				if (lws_hdr_custom_length(wsi, key, (int)(nl + k + 1)) >= 0)
					return shown[i];
			}
		}
	}
	return NULL;
}

/*
 * Whether the request's Connection header has the close option (RFC 9112
 * 9.6: the connection ends after the answer, which says so). lws 4.1.6
 * knows it only as the whole value: "keep-alive, close" kept it open.
 */
static int asks_close(struct lws *wsi)
{
	char small[256], *v;
	int len = lws_hdr_total_length(wsi, WSI_TOKEN_CONNECTION), n, asked;

	if (len <= 0)
		return 0;
	/* Any length (max_header bounds it): lws_hdr_copy fails on a short buffer. */
	v = (size_t)len < sizeof small ? small : ca_malloc((size_t)len + 1);
	n = lws_hdr_copy(wsi, v, len + 1, WSI_TOKEN_CONNECTION);
	asked = n > 0 && ca__has_token(v, (size_t)n, "close");
	if (v != small)
		free(v);
	return asked;
}

static int path_accepts_ws(struct server *s, const char *path)
{
	for (int i = 0; i < s->n_ws_paths; i++)
		if (strcmp(s->ws_paths[i], path) == 0)
			return 1;
	return 0;
}

static int server_callback(struct lws *wsi, enum lws_callback_reasons reason,
			   void *user, void *in, size_t len)
{
	struct conn_node *node = wsi ? lws_get_opaque_user_data(wsi) : NULL;
	struct server *s = node ? node->s : wsi ? lws_get_vhost_user(lws_get_vhost(wsi)) : NULL;
	struct pss *pss = user;
	lua_State *L = ca_lua();

	if (s == NULL)
		return lws_callback_http_dummy(wsi, reason, user, in, len);

	switch (reason) {
	case LWS_CALLBACK_SERVER_NEW_CLIENT_INSTANTIATED: {
		/* (Not at WSI_CREATE: lws resets the opaque pointer after it.) */
		struct conn_node *n = ca_malloc(sizeof *n);

		n->wsi = wsi;
		n->s = s;
		n->read_at_answer = 0;
		n->prev = NULL;
		n->next = s->conns;
		if (s->conns)
			s->conns->prev = n;
		s->conns = n;
		lws_set_opaque_user_data(wsi, n);
		s->nconn++;
		if (s->closing)
			ca__ws_kill(wsi);
		return 0;
	}

	case LWS_CALLBACK_WSI_DESTROY: {
		struct conn_node *n = lws_get_opaque_user_data(wsi);

		if (n == NULL)
			return 0;
		lws_set_opaque_user_data(wsi, NULL);
		if (n->prev)
			n->prev->next = n->next;
		else
			s->conns = n->next;
		if (n->next)
			n->next->prev = n->prev;
		free(n);
		s->nconn--;
		return 0;
	}

	case LWS_CALLBACK_HTTP: {
		struct req *r;
		char *uri;
		int ulen, meth, clr;
		unsigned long long v;
		const char *why = NULL, *spaced;
		char ex[32];

		if (pss == NULL || L == NULL)
			return -1;
		if (pss->req) {	/* a previous request still unanswered: cannot happen on h1 */
			release_req(pss->req);
			pss->req = NULL;
		}
		r = ca_malloc(sizeof *r);
		memset(r, 0, sizeof *r);
		r->wsi = wsi;
		r->srv = s;
		r->id = ca__next_id();
		meth = lws_http_get_uri_and_method(wsi, &uri, &ulen);
		r->method = meth < 0 || meth > LWSHUMETH_COLON_PATH ? 0 : meth;
		r->path = ca_malloc(len + 1);
		memcpy(r->path, in, len);
		r->path[len] = '\0';
		pss->req = r;

		clr = content_length(wsi, &v, &why);
		if (node && node->read_at_answer > 0 && lws_reads_body(r->method, clr, v) &&
		    ca__tcp_bytes_read(lws_get_socket_fd(wsi)) == node->read_at_answer) {
			/*
			 * Pipelined: sent before the answer to the request before
			 * it, its bytes came with that one's, and lws holds them
			 * (nothing was read since that answer). lws 4.1.6 reads the
			 * body of such a request from the start of its head, and
			 * then calls HTTP_BODY_COMPLETION in a loop for good: the
			 * whole server hangs. Refused before lws goes on with it:
			 * the connection closes (RFC 9112 9.3.2: a client resends
			 * on a new one what a closed pipeline left unanswered).
			 */
			CA_LOG_LIMITED(CA_LOG_WARN, "http: %s %s: a request with a body pipelined behind another (sent before "
			       "its answer): connection closed", method_names[r->method], r->path);
			pss->req = NULL;
			release_req(r);
			return -1;
		}

		if (s->nconn > s->max_connections) {
			CA_LOG_LIMITED(CA_LOG_WARN, "http: %d connections open (max_connections %d): answering 503",
			       s->nconn, s->max_connections);
			quick_response(r, 503, "busy", "too many connections", NULL);
			return 0;
		}
		if (!whole_request_line(wsi)) {
			CA_LOG_LIMITED(CA_LOG_WARN, "http: %s %s: request line without an HTTP version (a line break "
			       "encoded in the URI?): answering 400", method_names[r->method], r->path);
			quick_response(r, 400, "bad_request", "malformed request line", NULL);
			return 0;
		}
		if (lws_hdr_fragment_length(wsi, WSI_TOKEN_HOST, 1) > 0) {
			/* lws joins them ("a,  b"; a second, even empty, holds the space it adds). */
			CA_LOG_LIMITED(CA_LOG_WARN, "http: %s %s: more than one Host header: answering 400",
			       method_names[r->method], r->path);
			quick_response(r, 400, "bad_request", "more than one Host header", "Host");
			return 0;
		}
		if ((spaced = framing_header_spaced(wsi)) != NULL) {
			CA_LOG_LIMITED(CA_LOG_WARN, "http: %s %s: Content-Length or Transfer-Encoding with whitespace before "
			       "its colon: answering 400", method_names[r->method], r->path);
			quick_response(r, 400, "bad_request", "whitespace before the colon of Content-Length or Transfer-Encoding",
				       spaced);
			return 0;
		}
		if (lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_TRANSFER_ENCODING) > 0) {
			CA_LOG_LIMITED(CA_LOG_WARN, "http: %s %s: chunked body refused (Transfer-Encoding): answering 411",
			       method_names[r->method], r->path);
			quick_response(r, 411, "length_required", "chunked request bodies are not supported: send Content-Length",
				       "Transfer-Encoding");
			return 0;
		}
		if (clr < 0) {
			/* Not its value: that is no number, and may be anything (a secret). */
			CA_LOG_LIMITED(CA_LOG_WARN, "http: %s %s: invalid Content-Length (%s): answering 400",
			       method_names[r->method], r->path, why);
			quick_response(r, 400, "bad_request", "invalid Content-Length", "Content-Length");
			return 0;
		}
		if (clr > 0 && v > s->max_body) {
			if (v == ULLONG_MAX)
				CA_LOG_LIMITED(CA_LOG_WARN, "http: %s %s: body of more than %llu bytes over max_body %zu: answering 413",
				       method_names[r->method], r->path, ULLONG_MAX / 10 * 10 - 1, s->max_body);
			else
				CA_LOG_LIMITED(CA_LOG_WARN, "http: %s %s: body of %llu bytes over max_body %zu: answering 413",
				       method_names[r->method], r->path, v, s->max_body);
			quick_response(r, 413, "payload_too_large", "request body too large", "Content-Length");
			return 0;
		}
		if (clr == 2) {
			CA_LOG_LIMITED(CA_LOG_WARN, "http: %s %s: invalid Content-Length (%d characters, over the %d libwebsockets reads): answering 400",
			       method_names[r->method], r->path,
			       lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_CONTENT_LENGTH), LWS_CONTENT_LENGTH_MAX);
			quick_response(r, 400, "bad_request", "invalid Content-Length", "Content-Length");
			return 0;
		}
		/*
		 * A POST, PUT or PATCH without Content-Length has no body (RFC
		 * 9112 6.3), but lws reads what follows on the connection as
		 * one (and would eat the next request): the connection closes
		 * after the answer.
		 */
		r->close_after = asks_close(wsi) || (clr == 0 && lws_reads_body(r->method, clr, v));
		if (clr > 0) {
			const char *e = ex;

			r->expect = (size_t)v;
			if (v > 0 && lws_hdr_copy(wsi, ex, sizeof ex, WSI_TOKEN_HTTP_EXPECT) > 0 &&
			    ca__ows_trim(&e, strlen(ex)) == 12 && !strncasecmp(e, "100-continue", 12) &&
			    !http10(wsi)) {
				/* lws 4.1 does not answer it: the client would wait (1 s
				 * for curl) before it sends the body. An HTTP/1.0
				 * request's is ignored (RFC 9110 10.1.1). */
				static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
				unsigned char buf[LWS_PRE + sizeof cont];

				memcpy(buf + LWS_PRE, cont, sizeof cont - 1);
				if (lws_write(wsi, buf + LWS_PRE, sizeof cont - 1, LWS_WRITE_RAW) < (int)sizeof cont - 1)
					return -1;
			}
			/*
			 * lws times out only a pause between the body's reads
			 * (timeout_secs), so a byte a second would hold the
			 * connection for as long as the body is long.
			 */
			r->body_deadline = uv_now(ca_loop()) + s->body_timeout_ms;
			if (v > 0 || r->method == LWSHUMETH_POST)
				return 0;	/* lws calls HTTP_BODY / HTTP_BODY_COMPLETION */
		}
		dispatch(s, r);
		return 0;
	}

	case LWS_CALLBACK_HTTP_BODY: {
		struct req *r = pss ? pss->req : NULL;

		if (r == NULL || r->dispatched)
			return 0;
		if (uv_now(ca_loop()) > r->body_deadline) {
			CA_LOG_LIMITED(CA_LOG_WARN, "http: %s %s: body not in within body_timeout %llu s (%zu of %zu bytes): answering 408",
			       method_names[r->method], r->path, (unsigned long long)(s->body_timeout_ms / 1000),
			       r->body_len, r->expect);
			quick_response(r, 408, "request_timeout", "the request body took too long", NULL);
			return 0;
		}
		if (r->body_len + len > s->max_body) {
			CA_LOG_LIMITED(CA_LOG_WARN, "http: %s %s: body over max_body %zu: answering 413",
			       method_names[r->method], r->path, s->max_body);
			quick_response(r, 413, "payload_too_large", "request body too large", NULL);
			return 0;
		}
		if (r->body_len + len > r->body_cap) {
			/*
			 * The declared length is the client's word: it is reserved
			 * at once only up to BODY_RESERVE, past that the buffer
			 * doubles as the bytes come (a huge max_body and a client
			 * that claims it, sending nothing, made us ask for it all).
			 */
			size_t need = r->body_len + len, cap = r->body_cap * 2;

			if (cap < BODY_RESERVE && cap < r->expect)
				cap = r->expect < BODY_RESERVE ? r->expect : BODY_RESERVE;
			if (r->expect >= need && cap > r->expect)
				cap = r->expect;	/* the whole body: no more to come */
			if (cap < need)
				cap = need;
			r->body = ca_realloc(r->body, cap + 1);
			r->body_cap = cap;
		}
		if (len) {
			memcpy(r->body + r->body_len, in, len);
			r->body_len += len;
		}
		return 0;
	}

	case LWS_CALLBACK_HTTP_BODY_COMPLETION:
		if (pss && pss->req && !pss->req->dispatched)
			dispatch(s, pss->req);
		return 0;

	case LWS_CALLBACK_HTTP_WRITEABLE: {
		struct req *r = pss ? pss->req : NULL;
		int rc, close_after;

		if (r == NULL || !r->responded)
			return 0;
		rc = write_response(r);
		if (rc == 0)
			return 0;
		/* Finished (or failed): the connection is done with this request. */
		close_after = r->close_after;
		pss->req = NULL;
		release_req(r);
		if (rc < 0 || close_after)
			return -1;
		if (node)
			node->read_at_answer = ca__tcp_bytes_read(lws_get_socket_fd(wsi));
		return lws_http_transaction_completed(wsi) ? -1 : 0;
	}

	case LWS_CALLBACK_CLOSED_HTTP:
		if (pss && pss->req) {
			release_req(pss->req);
			pss->req = NULL;
		}
		return 0;

	case LWS_CALLBACK_HTTP_CONFIRM_UPGRADE: {
		char path[512];
		int n;

		/*
		 * An offer to go on in HTTP/2 (Upgrade: h2c, as curl --http2 and
		 * Java's HttpClient send it with every http:// request): this
		 * server speaks HTTP/1.1, and answers as if there were no offer
		 * (RFC 9113 3.1). Refused here, every route answered lws' own
		 * 404 page; taken, lws would switch to h2, which is not served.
		 * in is the name in lws' header table: blanked in place, it is
		 * neither "websocket" nor "h2c" when lws 4.1.6 compares it again
		 * after this callback, and the request goes on as plain HTTP.
		 */
		if (in != NULL && strcasecmp((const char *)in, "h2c") == 0) {
			((char *)in)[0] = '\0';
			return 0;
		}
		n = lws_hdr_copy(wsi, path, sizeof path, WSI_TOKEN_GET_URI);
		if (n <= 0 || !path_accepts_ws(s, path)) {
			lws_return_http_status(wsi, HTTP_STATUS_NOT_FOUND, NULL);
			return 1;
		}
		if (!whole_request_line(wsi)) {
			CA_LOG_LIMITED(CA_LOG_WARN, "http: WebSocket upgrade %s: request line without an HTTP version "
			       "(a line break encoded in the URI?): refused", path);
			lws_return_http_status(wsi, HTTP_STATUS_BAD_REQUEST, NULL);
			return 1;
		}
		if (s->nconn > s->max_connections) {
			CA_LOG_LIMITED(CA_LOG_WARN, "http: %d connections open (max_connections %d): refusing WebSocket",
			       s->nconn, s->max_connections);
			lws_return_http_status(wsi, HTTP_STATUS_SERVICE_UNAVAILABLE, NULL);
			return 1;
		}
		return 0;
	}

	case LWS_CALLBACK_ESTABLISHED: {
		struct ca_ws *ws;
		char path[512];

		if (pss == NULL || L == NULL)
			return -1;
		if (pss->req) {
			release_req(pss->req);
			pss->req = NULL;
		}
		ws = ca__ws_new(L, s->max_ws_message, s->max_send_queue);	/* [conn] */
		ws->wsi = wsi;
		ws->state = CA_WS_OPEN;
		/*
		 * Over plain TCP the socket is ours from here on (see
		 * ca__ws_take_socket): lws's service, parser and writes cost
		 * the audio path 6-7% of the process's CPU.
		 */
		if (!s->tls && ca__ws_take_socket(ws, NULL) == 0) {
			ws->ping_ms = s->ws_ping_ms;
			ws->pong_ms = s->ws_pong_ms;
			ca__ws_start_pings(ws);
		}
		lua_rawgeti(L, LUA_REGISTRYINDEX, s->ws_ref);
		ws->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
		pss->ws = ws;
		lua_pop(L, 1);

		lua_createtable(L, 0, 6);
		if (lws_hdr_copy(wsi, path, sizeof path, WSI_TOKEN_GET_URI) < 0)
			path[0] = '\0';
		lua_pushstring(L, path);
		lua_setfield(L, -2, "path");
		push_query(L, wsi);
		lua_setfield(L, -3, "raw_query");
		lua_setfield(L, -2, "query");
		ca__push_headers(L, wsi);
		push_extra_headers(L, s, wsi);
		lua_setfield(L, -2, "headers");
		push_remote(L, wsi);
		lua_setfield(L, -2, "remote");
		lua_pushliteral(L, "GET");
		lua_setfield(L, -2, "method");
		ca__ws_emit(ws, "open", 1);
		return 0;
	}

	case LWS_CALLBACK_RECEIVE:
		if (pss && pss->ws)
			ca__ws_receive(pss->ws, in, len, lws_is_final_fragment(wsi), lws_frame_is_binary(wsi));
		return 0;

	case LWS_CALLBACK_SERVER_WRITEABLE:
		if (pss && pss->ws && pss->ws->io) {
			/* lws holds input the client sent with its request (see ca__ws_take_socket). */
			CA_LOG_LIMITED(CA_LOG_WARN, "websocket %lld: the client sent frames before the upgrade was answered: closing (1002)",
			       (long long)pss->ws->id);
			ca__ws_fail(pss->ws, 1002, "frames sent before the upgrade was answered");
			return 0;
		}
		if (pss && pss->ws)
			return ca__ws_writeable(pss->ws);
		return 0;

	case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
		if (pss && pss->ws)
			return ca__ws_peer_close(pss->ws, in, len);
		return 0;

	case LWS_CALLBACK_CLOSED:
		if (pss && pss->ws) {
			struct ca_ws *ws = pss->ws;

			pss->ws = NULL;
			ca__ws_closed(ws);
		}
		return 0;

	case LWS_CALLBACK_RAW_ADOPT:
		/*
		 * A CONNECT request: lws 4.1.6 makes its connection a raw socket
		 * (a proxy's tunnel), with no timeout, and hands it here. This
		 * server is no proxy: it is closed, as the requests lws' parser
		 * refuses are. Kept, it stayed open for good, one of
		 * max_connections that no request head timeout ever freed.
		 */
		CA_LOG_LIMITED(CA_LOG_WARN, "http: a CONNECT request (this server is no proxy): connection closed");
		return -1;

	default:
		break;
	}
	return lws_callback_http_dummy(wsi, reason, user, in, len);
}

/* ---- the server object ---- */

static void free_server(struct server *s)
{
	for (int i = 0; s->ws_paths && i < s->n_ws_paths; i++)
		free(s->ws_paths[i]);
	free(s->ws_paths);
	for (int i = 0; s->extra && i < s->n_extra; i++)
		free(s->extra[i]);
	free(s->extra);
	free(s);
}

static void maybe_free(struct server *s)
{
	if (!s->lua_alive && s->vh_gone && s->closer == NULL)
		free_server(s);
}

/* lws is about to free the vhost: nothing of this server can call back any more. */
static void on_vhost_final(struct lws_vhost *vh, void *arg)
{
	struct server *s = arg;

	(void)vh;
	s->vh_gone = 1;
	maybe_free(s);
}

static void on_closer_closed(uv_handle_t *h)
{
	struct server *s = h->data;

	free(h);
	s->closer = NULL;
	maybe_free(s);
}

/*
 * Drives close(): hands the vhost to lws for destruction (outside any lws
 * callback), then waits for the connections to be gone and reports it.
 */
static void on_closer(uv_timer_t *t)
{
	struct server *s = t->data;
	lua_State *L = ca_lua();
	int ref;

	if (s->nconn > 0 && !ca__lws_ending())
		return;
	/*
	 * No connection is bound to the vhost any more, so lws frees it at
	 * once (on_vhost_final); with one bound it would wait for the context.
	 */
	if (!s->vh_destroyed && !s->vh_gone && !ca__lws_ending()) {
		s->vh_destroyed = 1;
		lws_vhost_destroy(s->vh);
	}
	uv_timer_stop(t);
	uv_close((uv_handle_t *)t, on_closer_closed);
	ref = s->closed_ref;
	s->closed_ref = LUA_NOREF;
	if (L && ref != LUA_NOREF) {
		ca_call_ref(ref, 0, "http server closed callback");
		luaL_unref(L, LUA_REGISTRYINDEX, ref);
	}
}

/*
 * The listening socket is ours, not lws's: each accepted connection is
 * handed to the server's vhost with lws_adopt_descriptor_vhost(), as lws's
 * own listener would. lws 4.1.6 never marks a destroyed vhost as being
 * destroyed, so a closed vhost with a listener stays on its list, keeps its
 * socket until the context ends, and trips an assertion once a new vhost
 * gets the same port; a listener of our own closes at once, frees its port
 * at once, and leaves lws nothing to trip over.
 */
/* The close callback of the listener's handles (poll and back-off timer). */
static void free_handle(uv_handle_t *h)
{
	free(h);
}

static void stop_listening(struct server *s)
{
	if (s->lpoll) {
		uv_poll_stop(s->lpoll);
		uv_close((uv_handle_t *)s->lpoll, free_handle);
		s->lpoll = NULL;
	}
	if (s->backoff) {
		uv_timer_stop(s->backoff);
		uv_close((uv_handle_t *)s->backoff, free_handle);
		s->backoff = NULL;
	}
	if (s->listen_fd >= 0) {
		close(s->listen_fd);
		s->listen_fd = -1;
	}
}

static void on_accept(uv_poll_t *h, int status, int events);

static void on_backoff(uv_timer_t *t)
{
	struct server *s = t->data;

	uv_close((uv_handle_t *)t, free_handle);
	s->backoff = NULL;
	if (s->lpoll)
		uv_poll_start(s->lpoll, UV_READABLE, on_accept);
}

static void on_accept(uv_poll_t *h, int status, int events)
{
	struct server *s = h->data;

	(void)events;
	if (status < 0)
		return;
	for (int i = 0; i < 64 && s->listen_fd >= 0; i++) {
		lws_sock_file_fd_type d;
		int one = 1, fd = accept4(s->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO)
				continue;
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
				/* The connection waits in the backlog; try again shortly. */
				CA_LOG_LIMITED(CA_LOG_WARN, "http %s:%d: cannot accept (%s): pausing 100 ms",
				       s->host, s->port, strerror(errno));
				uv_poll_stop(s->lpoll);
				s->backoff = ca_malloc(sizeof *s->backoff);
				uv_timer_init(ca_loop(), s->backoff);
				s->backoff->data = s;
				uv_timer_start(s->backoff, on_backoff, 100, 0);
			}
			return;
		}
		/* Far past the limit: refuse without a word (flood). */
		if (s->closing || s->nconn >= 2 * s->max_connections + 16) {
			close(fd);
			continue;
		}
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		d.sockfd = fd;
		/* On failure lws has closed the socket already. */
		lws_adopt_descriptor_vhost(s->vh, LWS_ADOPT_SOCKET | LWS_ADOPT_HTTP |
					   (s->tls ? LWS_ADOPT_ALLOW_SSL : 0), d, NULL, NULL);
	}
}

/* Binds and listens on host:port; 0 and the socket, or -1 with nil, err pushed. */
static int open_listener(lua_State *L, const char *host, int port, int *fd_out, int *port_out)
{
	struct sockaddr_storage ss;
	socklen_t sl;
	int fd, one = 1, err;

	memset(&ss, 0, sizeof ss);
	if (strcmp(host, "localhost") == 0)	/* the one name taken: loopback, without a resolver */
		host = "127.0.0.1";
	if (inet_pton(AF_INET, host, &((struct sockaddr_in *)&ss)->sin_addr) == 1) {
		((struct sockaddr_in *)&ss)->sin_family = AF_INET;
		((struct sockaddr_in *)&ss)->sin_port = htons((uint16_t)port);
		sl = sizeof(struct sockaddr_in);
	} else if (inet_pton(AF_INET6, host, &((struct sockaddr_in6 *)&ss)->sin6_addr) == 1) {
		((struct sockaddr_in6 *)&ss)->sin6_family = AF_INET6;
		((struct sockaddr_in6 *)&ss)->sin6_port = htons((uint16_t)port);
		sl = sizeof(struct sockaddr_in6);
	} else {
		ca_fail(L, "EINVAL", "host must be an IP address, not '%s'", host);
		return -1;
	}
	fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		ca_fail_uv(L, uv_translate_sys_error(errno));
		return -1;
	}
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (ss.ss_family == AF_INET6)
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
	if (bind(fd, (struct sockaddr *)&ss, sl) != 0 || listen(fd, SOMAXCONN) != 0 ||
	    getsockname(fd, (struct sockaddr *)&ss, &sl) != 0) {
		err = errno;
		close(fd);
		ca_fail(L, uv_err_name(uv_translate_sys_error(err)), "cannot listen on %s:%d: %s",
			host, port, strerror(err));
		return -1;
	}
	*fd_out = fd;
	*port_out = ntohs(ss.ss_family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port
						  : ((struct sockaddr_in6 *)&ss)->sin6_port);
	return 0;
}

static void begin_close(struct server *s)
{
	lua_State *L = ca_lua();

	if (s->closing)
		return;
	s->closing = 1;
	if (L) {
		ca_unref(L, &s->req_ref);
		ca_unref(L, &s->ws_ref);
	}
	/* Refuse new connections now (the port is free at once) and end the open ones. */
	stop_listening(s);
	if (s->vh == NULL) {
		s->vh_gone = 1;
		return;
	}
	for (struct conn_node *n = s->conns; n; n = n->next) {
		struct pss *p = lws_wsi_user(n->wsi);

		if (p && p->ws) {
			p->ws->stopping = 1;
			ca__ws_kill_conn(p->ws);
		} else {
			ca__ws_kill(n->wsi);
		}
	}
	s->closer = ca_malloc(sizeof *s->closer);
	uv_timer_init(ca_loop(), s->closer);
	s->closer->data = s;
	uv_timer_start(s->closer, on_closer, 0, 5);
}

struct server_box {
	struct server *s;
};

static struct server *check_server(lua_State *L)
{
	struct server_box *b = luaL_checkudata(L, 1, SERVER_MT);

	if (b->s == NULL)
		luaL_argerror(L, 1, "server already freed");
	return b->s;
}

/* srv:stop_listening(): no new connections; the open ones close after their response. */
static int server_stop_listening(lua_State *L)
{
	struct server *s = check_server(L);

	s->draining = 1;
	stop_listening(s);
	return 0;
}

/* srv:close([on_closed]): on_closed() runs once every connection and the listener are gone. */
static int server_close(lua_State *L)
{
	struct server *s = check_server(L);

	if (!lua_isnoneornil(L, 2)) {
		luaL_checktype(L, 2, LUA_TFUNCTION);
		if (s->closing && s->closer == NULL) {
			lua_pushvalue(L, 2);
			lua_call(L, 0, 0);
			return 0;
		}
		if (s->closed_ref == LUA_NOREF)
			s->closed_ref = ca_ref(L, 2);
	}
	begin_close(s);
	return 0;
}

static int server_gc(lua_State *L)
{
	struct server_box *b = luaL_checkudata(L, 1, SERVER_MT);
	struct server *s = b->s;

	b->s = NULL;
	if (s == NULL)
		return 0;
	s->lua_alive = 0;
	begin_close(s);
	maybe_free(s);
	return 0;
}

static int server_connections(lua_State *L)
{
	lua_pushinteger(L, check_server(L)->nconn);
	return 1;
}

/* srv:busy(): connections with a request whose response is not all written yet. */
static int server_busy(lua_State *L)
{
	struct server *s = check_server(L);
	lua_Integer n = 0;

	for (struct conn_node *c = s->conns; c; c = c->next) {
		struct pss *p = lws_wsi_user(c->wsi);

		if (p && p->req && !p->ws)
			n++;
	}
	lua_pushinteger(L, n);
	return 1;
}

static int server_index(lua_State *L)
{
	struct server_box *b = luaL_checkudata(L, 1, SERVER_MT);
	const char *k = luaL_checkstring(L, 2);

	if (b->s && strcmp(k, "port") == 0) {
		lua_pushinteger(L, b->s->port);
		return 1;
	}
	if (b->s && strcmp(k, "host") == 0) {
		lua_pushstring(L, b->s->host);
		return 1;
	}
	lua_pushvalue(L, 2);
	lua_rawget(L, lua_upvalueindex(1));
	return 1;
}

static char **string_list(lua_State *L, int idx, const char *field, int *count, int add_colon)
{
	char **out = NULL;
	lua_Integer n;

	*count = 0;
	if (lua_getfield(L, idx, field) == LUA_TNIL) {
		lua_pop(L, 1);
		return NULL;
	}
	if (!lua_istable(L, -1))
		luaL_error(L, "option '%s' must be an array of strings", field);
	n = luaL_len(L, -1);
	out = ca_malloc(sizeof *out * (size_t)(n ? n : 1));
	for (lua_Integer i = 1; i <= n; i++) {
		size_t len;
		const char *v;
		char *c;

		lua_geti(L, -1, i);
		v = lua_tolstring(L, -1, &len);
		if (v == NULL) {
			for (int j = 0; j < *count; j++)
				free(out[j]);
			free(out);
			*count = 0;
			luaL_error(L, "option '%s' must be an array of strings", field);
		}
		c = ca_malloc(len + 2);
		for (size_t k = 0; k < len; k++)
			c[k] = add_colon && v[k] >= 'A' && v[k] <= 'Z' ? (char)(v[k] + 32) : v[k];
		if (add_colon)
			c[len++] = ':';
		c[len] = '\0';
		out[(*count)++] = c;
		lua_pop(L, 1);
	}
	lua_pop(L, 1);
	return out;
}

static const struct lws_protocols protocols[] = {
	{"callagent-http", server_callback, sizeof(struct pss), 1024, 0, NULL, 65536},
	{NULL, NULL, 0, 0, 0, NULL, 0}
};

/* http.listen(opts, on_request, on_ws) */
/*
 * A byte limit of opts (table at 1): a negative one would be no limit at
 * all once it is a size_t, so it raises.
 */
static lua_Integer limit_field(lua_State *L, const char *k, lua_Integer def)
{
	lua_Integer v = ca_opt_int_field(L, 1, k, def);

	if (v < 0)
		luaL_error(L, "option '%s' must be >= 0", k);
	return v;
}

static int l_listen(lua_State *L)
{
	struct lws_context_creation_info info;
	struct server_box *b;
	struct server *s;
	const char *host, *cert = NULL, *key = NULL, *cerr = NULL;
	lua_Integer port, max_header, max_header_opt, ping, pong, body_timeout, response_idle;
	lua_Integer max_body, max_ws_message, max_send_queue, max_connections;

	luaL_checktype(L, 1, LUA_TTABLE);
	luaL_checktype(L, 2, LUA_TFUNCTION);
	luaL_checktype(L, 3, LUA_TFUNCTION);
	host = ca_opt_string_field(L, 1, "host", "127.0.0.1");
	port = ca_opt_int_field(L, 1, "port", 0);
	max_header_opt = ca_opt_int_field(L, 1, "max_header", 0);
	max_header = max_header_opt ? max_header_opt : 8192;
	luaL_argcheck(L, port >= 0 && port <= 65535, 1, "port must be 0..65535");
	luaL_argcheck(L, max_header >= 512 && max_header <= 1 << 20, 1, "max_header must be 512..1048576");
	(void)max_header;
	luaL_argcheck(L, strlen(host) < 64, 1, "host too long");
	/* A WebSocket peer silent for ws_ping s is pinged, dropped with no answer in ws_pong s. */
	ping = ca_opt_int_field(L, 1, "ws_ping", 60);
	pong = ca_opt_int_field(L, 1, "ws_pong", 10);
	luaL_argcheck(L, ping >= 0 && ping <= 86400 && pong >= 1 && pong <= 3600, 1,
		      "ws_ping must be 0..86400 s (0: none), ws_pong 1..3600 s");
	body_timeout = ca_opt_int_field(L, 1, "body_timeout", 60);
	luaL_argcheck(L, body_timeout >= 1 && body_timeout <= 86400, 1, "body_timeout must be 1..86400 s");
	response_idle = ca_opt_int_field(L, 1, "response_idle", 30);
	luaL_argcheck(L, response_idle >= 1 && response_idle <= 86400, 1, "response_idle must be 1..86400 s");
	max_body = limit_field(L, "max_body", 1 << 20);
	max_ws_message = limit_field(L, "max_ws_message", 1 << 20);
	max_send_queue = limit_field(L, "max_send_queue", 1 << 20);
	if (lua_getfield(L, 1, "tls") != LUA_TNIL) {
		luaL_argcheck(L, lua_istable(L, -1), 1, "tls must be {cert = file, key = file}");
		cert = ca_opt_string_field(L, -1, "cert", NULL);
		key = ca_opt_string_field(L, -1, "key", NULL);
		if (cert == NULL || key == NULL)
			return luaL_error(L, "tls needs both cert and key files");
		if (access(cert, R_OK) != 0)
			return ca_fail(L, "ETLS", "cannot read certificate file %s: %s", cert, strerror(errno));
		if (access(key, R_OK) != 0)
			return ca_fail(L, "ETLS", "cannot read key file %s: %s", key, strerror(errno));
	}
	lua_pop(L, 1);

	b = lua_newuserdatauv(L, sizeof *b, 0);
	b->s = NULL;
	luaL_setmetatable(L, SERVER_MT);

	s = ca_malloc(sizeof *s);
	memset(s, 0, sizeof *s);
	s->req_ref = s->ws_ref = s->closed_ref = LUA_NOREF;
	s->listen_fd = -1;
	s->lua_alive = 1;
	snprintf(s->host, sizeof s->host, "%s", host);
	b->s = s;	/* from here a raise (a bad option) leaves it to __gc */
	s->max_body = (size_t)max_body;
	s->max_ws_message = (size_t)max_ws_message;
	s->max_send_queue = (size_t)max_send_queue;
	max_connections = ca_opt_int_field(L, 1, "max_connections", 1024);
	/*
	 * Past MAX_CONNECTIONS (fds run out long before) it is no limit: as an
	 * int, math.maxinteger was -1, and 2^30 overflowed the flood check
	 * (2 * max + 16), which then refused every connection.
	 */
	s->max_connections = max_connections < 1 ? 1 :
			     (int)(max_connections > MAX_CONNECTIONS ? MAX_CONNECTIONS : max_connections);
	s->ws_ping_ms = (uint64_t)ping * 1000;
	s->ws_pong_ms = (uint64_t)pong * 1000;
	s->body_timeout_ms = (uint64_t)body_timeout * 1000;
	s->response_idle_s = (int)response_idle;
	s->ws_paths = string_list(L, 1, "ws_paths", &s->n_ws_paths, 0);
	s->extra = string_list(L, 1, "headers", &s->n_extra, 1);

	if (ca__lws_ctx((unsigned)max_header_opt, &cerr) == NULL) {
		begin_close(s);
		lua_pop(L, 1);
		return ca_fail(L, "EINVAL", "%s", cerr);
	}
	memset(&info, 0, sizeof info);
	info.port = CONTEXT_PORT_NO_LISTEN_SERVER;
	info.protocols = protocols;
	info.vhost_name = "callagent";
	info.alpn = "http/1.1";
	info.user = s;
	info.finalize = on_vhost_final;
	info.finalize_arg = s;
	if (cert) {
		info.options |= LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
		info.ssl_cert_filepath = cert;
		info.ssl_private_key_filepath = key;
	} else {
		info.retry_and_idle_policy = &no_lws_pings;
	}
	s->tls = cert != NULL;
	s->vh = ca__lws_vhost(&info);
	if (s->vh == NULL) {
		begin_close(s);
		lua_pop(L, 1);
		if (cert)
			return ca_fail(L, "ETLS", "cannot start TLS with %s / %s (bad certificate or key?)", cert, key);
		return ca_fail(L, "EINVAL", "cannot set up the server");
	}
	if (open_listener(L, host, (int)port, &s->listen_fd, &s->port) != 0) {
		/* nil, err are on top of the server userdata. */
		begin_close(s);
		lua_remove(L, -3);
		return 2;
	}
	s->lpoll = ca_malloc(sizeof *s->lpoll);
	uv_poll_init(ca_loop(), s->lpoll, s->listen_fd);
	s->lpoll->data = s;
	uv_poll_start(s->lpoll, UV_READABLE, on_accept);
	s->req_ref = ca_ref(L, 2);
	s->ws_ref = ca_ref(L, 3);
	return 1;
}

/* http.configure{max_header = n}: process-wide settings, before the first server or client. */
static int l_configure(lua_State *L)
{
	lua_Integer mh;
	const char *err = NULL;

	luaL_checktype(L, 1, LUA_TTABLE);
	mh = ca_opt_int_field(L, 1, "max_header", 8192);
	luaL_argcheck(L, mh >= 512 && mh <= 1 << 20, 1, "max_header must be 512..1048576");
	if (ca__lws_ctx((unsigned)mh, &err) == NULL)
		return ca_fail(L, "EINVAL", "%s", err);
	lua_pushboolean(L, 1);
	return 1;
}

int luaopen_callagent_core_http(lua_State *L)
{
	static const luaL_Reg server_methods[] = {
		{"close", server_close},
		{"stop_listening", server_stop_listening},
		{"busy", server_busy},
		{"connections", server_connections},
		{NULL, NULL}
	};
	static const luaL_Reg req_methods[] = {
		{"respond", req_respond},
		{"header", req_header},
		{"is_open", req_is_open},
		{NULL, NULL}
	};
	static const luaL_Reg fns[] = {
		{"listen", l_listen},
		{"configure", l_configure},
		{NULL, NULL}
	};

	ca__ws_register(L);
	if (luaL_newmetatable(L, SERVER_MT)) {
		luaL_newlib(L, server_methods);
		lua_pushcclosure(L, server_index, 1);
		lua_setfield(L, -2, "__index");
		lua_pushcfunction(L, server_gc);
		lua_setfield(L, -2, "__gc");
	}
	lua_pop(L, 1);
	if (luaL_newmetatable(L, REQ_MT)) {
		luaL_newlib(L, req_methods);
		lua_setfield(L, -2, "__index");
		lua_pushcfunction(L, req_gc);
		lua_setfield(L, -2, "__gc");
	}
	lua_pop(L, 1);
	luaL_newlib(L, fns);
	return 1;
}
