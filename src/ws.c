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
 *       headers), "text", "binary", "close" (code, reason), or "error" (a =
 *       "ECODE: message") when it never connected: ETIMEDOUT, ECONNREFUSED,
 *       ETLS (certificate or TLS failure), EHANDSHAKE (the server did not
 *       upgrade; the HTTP status is in the message), ECANCELED.
 *   Returns the connection (connecting), or nil, "EINVAL: ..." for a bad URL.
 *
 * The header values (API keys) never appear in errors or logs.
 *
 * Client connections live in the process' lws context (see wsconn.h), one
 * vhost per CA file.
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "wsconn.h"

#define SYSTEM_CA "/etc/ssl/certs/ca-certificates.crt"

/* ---- the lws callback ---- */

static void conn_finished(struct ca_ws *ws, struct lws *wsi)
{
	if (wsi)
		lws_set_wsi_user(wsi, NULL);
	ca__ws_closed(ws);
}

static void classify_error(struct ca_ws *ws, struct lws *wsi, const char *in)
{
	int status;

	if (ws->error[0])
		return;
	status = lws_http_client_http_response(wsi);
	if (in && (strstr(in, "SSL") || strstr(in, "ssl") || strstr(in, "tls") ||
		   strstr(in, "certificate") || strstr(in, "CA ")))
		snprintf(ws->error, sizeof ws->error, "ETLS: %s", in);
	else if (status > 0 && status != 101)
		snprintf(ws->error, sizeof ws->error, "EHANDSHAKE: server answered HTTP %d instead of upgrading", status);
	else if (in && strncmp(in, "HS:", 3) == 0)
		snprintf(ws->error, sizeof ws->error, "EHANDSHAKE: %s", in + 3 + (in[3] == ' '));
	else if (in && (strstr(in, "getaddrinfo") || strstr(in, "resolve") || strstr(in, "DNS")))
		snprintf(ws->error, sizeof ws->error, "ENOTFOUND: %s", in);
	else
		snprintf(ws->error, sizeof ws->error, "ECONNREFUSED: %s", in && *in ? in : "connection failed");
}

static int client_callback(struct lws *wsi, enum lws_callback_reasons reason,
			   void *user, void *in, size_t len)
{
	struct ca_ws *ws = user;
	lua_State *L = ca_lua();

	switch (reason) {
	case LWS_CALLBACK_CLIENT_APPEND_HANDSHAKE_HEADER: {
		unsigned char **p = in, *end = *p + len;
		size_t off = 0;

		if (ws == NULL || ws->client_headers == NULL)
			return 0;
		while (off < ws->client_headers_len && ws->client_headers[off]) {
			const char *name = ws->client_headers + off;
			const char *val = name + strlen(name) + 1;

			off = (size_t)(val - ws->client_headers) + strlen(val) + 1;
			if (lws_add_http_header_by_name(wsi, (const unsigned char *)name,
							(const unsigned char *)val, (int)strlen(val), p, end))
				return -1;
		}
		/* The key is not needed any more: do not keep it in memory. */
		memset(ws->client_headers, 0, ws->client_headers_len);
		return 0;
	}

	case LWS_CALLBACK_CLIENT_CONNECTION_ERROR:
		if (ws == NULL || ws->state == CA_WS_CLOSED)
			return 0;
		classify_error(ws, wsi, in);
		conn_finished(ws, wsi);
		return 0;

	case LWS_CALLBACK_CLIENT_ESTABLISHED:
		if (ws == NULL)
			return -1;
		ws->state = CA_WS_OPEN;
		if (ws->connect_timer) {
			uv_timer_stop(ws->connect_timer);
			uv_close((uv_handle_t *)ws->connect_timer, (uv_close_cb)free);
			ws->connect_timer = NULL;
		}
		free(ws->client_headers);
		ws->client_headers = NULL;
		if (L) {
			ca__push_headers(L, wsi);
			ca__ws_emit(ws, "open", 1);
		}
		return 0;

	case LWS_CALLBACK_CLIENT_RECEIVE:
		if (ws)
			ca__ws_receive(ws, in, len);
		return 0;

	case LWS_CALLBACK_CLIENT_WRITEABLE:
		if (ws)
			return ca__ws_writeable(ws);
		return 0;

	case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
		if (ws)
			return ca__ws_peer_close(ws, in, len);
		return 0;

	case LWS_CALLBACK_CLIENT_CLOSED:
		if (ws && ws->state != CA_WS_CLOSED)
			conn_finished(ws, wsi);
		return 0;

	case LWS_CALLBACK_WSI_DESTROY:
		/* Last word on a connection that died without the callbacks above. */
		if (ws && ws->state != CA_WS_CLOSED) {
			if (ws->state == CA_WS_CONNECTING)
				classify_error(ws, wsi, NULL);
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

/* The client vhost trusting ca_file besides the system store (NULL: system only). */
/*
 * lws keeps the vhost's name and CA path as pointers, so they are interned
 * here for the life of the process (one per distinct CA file).
 */
struct vhost_name {
	struct vhost_name *next;
	char name[];
};
static struct vhost_name *vhost_names;

static const char *intern_name(const char *name)
{
	struct vhost_name *n;
	size_t len = strlen(name);

	for (n = vhost_names; n; n = n->next)
		if (strcmp(n->name, name) == 0)
			return n->name;
	n = ca_malloc(sizeof *n + len + 1);
	memcpy(n->name, name, len + 1);
	n->next = vhost_names;
	vhost_names = n;
	return n->name;
}

static struct lws_vhost *get_vhost(const char *ca_file, const char **err)
{
	struct lws_context_creation_info info;
	const char *name = ca_file ? ca_file : "system";
	struct lws_context *ctx = ca__lws_ctx(0, err);
	struct lws_vhost *vh;

	if (ctx == NULL)
		return NULL;
	vh = lws_get_vhost_by_name(ctx, name);
	if (vh)
		return vh;
	name = intern_name(name);
	if (ca_file)
		ca_file = name;
	memset(&info, 0, sizeof info);
	info.options |= LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
	info.port = CONTEXT_PORT_NO_LISTEN;
	info.protocols = protocols;
	info.vhost_name = name;
	info.client_ssl_ca_filepath = ca_file ? ca_file : SYSTEM_CA;
	info.alpn = "http/1.1";
	vh = ca__lws_vhost(&info);
	if (vh == NULL)
		*err = "cannot set up TLS for the WebSocket client (bad ca_file?)";
	return vh;
}

static void on_connect_timeout(uv_timer_t *t)
{
	struct ca_ws *ws = t->data;

	if (ws->state != CA_WS_CONNECTING || ws->wsi == NULL)
		return;
	snprintf(ws->error, sizeof ws->error, "ETIMEDOUT: no connection within %llu ms",
		 (unsigned long long)uv_timer_get_repeat(t));
	ca__ws_kill(ws->wsi);
}

/* Splits "ws[s]://host[:port]/path" into its parts (in place, in buf). */
static int parse_url(char *buf, int *tls, char **host, int *port, char **path)
{
	char *p = buf, *slash, *colon;

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
	slash = strchr(p, '/');
	*path = slash ? slash : NULL;
	if (slash)
		*slash = '\0';
	if (*p == '[') {
		char *close = strchr(p, ']');

		if (close == NULL)
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

static int l_connect(lua_State *L)
{
	struct lws_client_connect_info ci;
	struct lws_vhost *vh;
	const char *verr = NULL;
	struct ca_ws *ws;
	const char *url, *ca_file;
	char *buf, *host, *path, hosthdr[300], fullpath[2048];
	int tls, port;
	lua_Integer timeout, ping, pong;
	size_t urllen;

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
	if (urllen >= sizeof fullpath - 2)
		return ca_fail(L, "EINVAL", "URL too long");

	buf = ca_malloc(urllen + 1);
	memcpy(buf, url, urllen + 1);
	if (parse_url(buf, &tls, &host, &port, &path) != 0) {
		free(buf);
		return ca_fail(L, "EINVAL", "not a ws:// or wss:// URL");
	}
	snprintf(fullpath, sizeof fullpath, "/%s", path ? path + 1 : "");
	if ((tls && port == 443) || (!tls && port == 80))
		snprintf(hosthdr, sizeof hosthdr, "%s", host);
	else
		snprintf(hosthdr, sizeof hosthdr, strchr(host, ':') ? "[%s]:%d" : "%s:%d", host, port);

	vh = get_vhost(ca_file, &verr);
	if (vh == NULL) {
		free(buf);
		return ca_fail(L, "ETLS", "%s", verr);
	}

	ws = ca__ws_new(L, (size_t)ca_opt_int_field(L, 1, "max_message", 16 << 20),
			(size_t)ca_opt_int_field(L, 1, "max_send_queue", 4 << 20));
	ws->is_client = 1;
	ws->handler_ref = ca_ref(L, 2);

	/* Handshake headers, kept as "name:\0value\0...\0". */
	if (lua_getfield(L, 1, "headers") == LUA_TTABLE) {
		size_t cap = 256, n = 0;
		char *h = ca_malloc(cap);

		lua_pushnil(L);
		while (lua_next(L, -2)) {
			size_t nl, vl;
			const char *name = lua_tolstring(L, -2, &nl), *val = lua_tolstring(L, -1, &vl);

			if (name == NULL || val == NULL || lua_type(L, -2) != LUA_TSTRING) {
				free(h);
				free(buf);
				return luaL_error(L, "headers must map names to strings");
			}
			while (n + nl + vl + 4 > cap)
				cap *= 2;
			h = ca_realloc(h, cap);
			for (size_t i = 0; i < nl; i++)
				h[n++] = (name[i] >= 'A' && name[i] <= 'Z') ? (char)(name[i] + 32) : name[i];
			h[n++] = ':';
			h[n++] = '\0';
			memcpy(h + n, val, vl);
			n += vl;
			h[n++] = '\0';
			lua_pop(L, 1);
		}
		h[n++] = '\0';
		ws->client_headers = h;
		ws->client_headers_len = n;
	}
	lua_pop(L, 1);

	if (ping > 0) {
		ws->keepalive.secs_since_valid_ping = (uint16_t)ping;
		ws->keepalive.secs_since_valid_hangup = (uint16_t)(ping + pong);
	}

	memset(&ci, 0, sizeof ci);
	ci.context = ca__lws_ctx(0, &verr);
	ci.vhost = vh;
	ci.address = host;
	ci.port = port;
	ci.path = fullpath;
	ci.host = hosthdr;
	ci.origin = hosthdr;
	ci.ssl_connection = tls ? LCCSCF_USE_SSL : 0;
	ci.local_protocol_name = "callagent-ws-client";
	ci.userdata = ws;
	ci.pwsi = &ws->wsi;
	if (ping > 0)
		ci.retry_and_idle_policy = &ws->keepalive;

	ws->connect_timer = ca_malloc(sizeof *ws->connect_timer);
	uv_timer_init(ca_loop(), ws->connect_timer);
	ws->connect_timer->data = ws;
	if (lws_client_connect_via_info(&ci) == NULL || ws->state == CA_WS_CLOSED) {
		/* It failed at once; report it as a return value, not an event. */
		if (ws->state != CA_WS_CLOSED) {
			ws->handler_ref = LUA_NOREF;
			classify_error(ws, NULL, NULL);
			ws->wsi = NULL;
			ca__ws_closed(ws);
		}
		free(buf);
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
