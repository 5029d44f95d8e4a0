/*
 * fetch.c - callagent.core.fetch: an HTTP(S) client on libcurl's multi
 * interface, driven by the libuv loop (curl's docs/examples/multi-uv.c
 * pattern: CURLMOPT_SOCKETFUNCTION feeds uv_poll handles, CURLMOPT_TIMERFUNCTION
 * a uv_timer). No blocking calls, no threads of ours; one shared multi handle,
 * so connections are reused across requests, and one TLS session cache, so
 * new connections to a server resume an earlier session.
 *
 *   req = fetch.request(url, opts, fn)  starts a request; later, from the loop and
 *                                       exactly once, fn(res) or fn(nil, err)
 *   req:cancel()                        stops a request in flight: fn then gets
 *                                       nil, "ECANCELED" (later, never from inside
 *                                       cancel). Returns true if it was in flight.
 *   fetch.active()                      requests started whose fn has not run yet
 *
 * opts (table or nil):
 *   method           "GET" (always the default, also with a body); any token
 *   headers          {name = string|number}; CR/LF in a value raises
 *   body             string (sent as is; curl adds Content-Type
 *                    application/x-www-form-urlencoded unless headers set one)
 *   timeout          total ms, default 30000 (0: none)
 *   connect_timeout  ms, default 10000 (0: curl's default)
 *   max_body         response body limit in bytes, default 16 MiB
 *   truncate         a body past max_body is cut there (res.truncated = true)
 *                    rather than an EMSGSIZE error, default false: for a
 *                    caller that needs the status, not the whole body; with
 *                    max_body 0 the request ends with the headers (a body
 *                    that never comes is not waited for)
 *   follow           follow redirects (at most 5), default false; from https
 *                    only to https. The request's headers go along, but for
 *                    Authorization and Cookie when the host changes (libcurl)
 *   ca_file          PEM file of extra CAs, trusted in addition to the system
 *                    store (OpenSSL's default cert directory, or SSL_CERT_DIR)
 *   username, password  HTTP basic auth
 * res = {status = int, headers = {lowercase name = value; repeats joined with
 *        ", "}, body = string, time_ms = float, truncated = true or nil}
 * err = "ECODE: message" with ECODE one of ETIMEDOUT, ECONNREFUSED (could not
 * connect), ENOTFOUND, ETLS, EMSGSIZE (body over max_body), EINVAL (bad URL, or
 * a scheme other than http/https, also in a followed redirect, or http after
 * https), ECANCELED, ECURL (anything else: a reply that is not HTTP, too many
 * redirects, response headers over curl's 300 KiB). Messages never carry the
 * password, the URL's password, Authorization header values or the
 * user:password of a URL curl quotes (a proxy's, from the environment).
 * Misuse (wrong argument or option types, a bad method or header) raises.
 *
 * A request whose handle is dropped still runs and calls fn. At teardown
 * every request is released without calling fn.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <curl/curl.h>

#include "ca.h"
#include "crypto.h"

#define REQ_MT "callagent.FetchRequest"
#define POOL_MAX 32
#define MAX_REDIRS 5L
#define DEFAULT_TIMEOUT 30000
#define DEFAULT_CONNECT_TIMEOUT 10000
#define DEFAULT_MAX_BODY (16 * 1024 * 1024)
#define BODY_RESERVE_MAX DEFAULT_MAX_BODY	/* most of a declared body reserved at once */
#define REDACTED "[redacted]"

#define container_of(p, type, member) ((type *)((char *)(p) - offsetof(type, member)))

/* A node of an intrusive circular list; the list head is a node too. */
struct link {
	struct link *prev, *next;
};

static void list_del(struct link *l)
{
	l->prev->next = l->next;
	l->next->prev = l->prev;
	l->prev = l->next = l;
}

static void list_append(struct link *head, struct link *l)
{
	l->prev = head->prev;
	l->next = head;
	head->prev->next = l;
	head->prev = l;
}

/* A growable byte buffer; owned by the struct that embeds it. */
struct buf {
	char *p;
	size_t len, cap;
};

static void buf_reserve(struct buf *b, size_t need)
{
	size_t cap;

	if (need <= b->cap)
		return;
	cap = b->cap ? b->cap : 1024;
	while (cap < need)
		cap *= 2;
	b->p = ca_realloc(b->p, cap);
	b->cap = cap;
}

static void buf_add(struct buf *b, const void *p, size_t n)
{
	buf_reserve(b, b->len + n);
	memcpy(b->p + b->len, p, n);
	b->len += n;
}

static void buf_free(struct buf *b)
{
	free(b->p);
	b->p = NULL;
	b->len = b->cap = 0;
}

enum { REQ_RUNNING, REQ_DONE, REQ_CALLING, REQ_FINISHED };

struct req_box;

/*
 * One request. Made by request(); while RUNNING (in curl) or DONE (result
 * known, fn not called yet) it sits on the running or done list and the
 * module owns it. After fn has run it belongs to its userdata (freed by
 * __gc), or is freed at once if the userdata was collected before.
 */
struct req {
	struct link link;		/* on running or done */
	struct req_box *box;		/* NULL once the userdata is collected */
	CURL *easy;			/* while RUNNING */
	CURLU *cu;			/* the parsed URL, while RUNNING */
	struct curl_slist *headers;	/* one block: the nodes, then the strings */
	char *secret;			/* a password to keep out of messages */
	int fn_ref, body_ref;
	int state;
	int too_big;
	int truncate;			/* too_big cuts the body: no error */
	int follow;			/* redirects are followed */
	curl_off_t max_body;
	long status;
	double time_ms;
	int n_hdrs;
	struct buf body;
	struct buf hdrs;		/* "name\0value\0" pairs of the last response */
	const char *err_code;		/* NULL on success */
	char err[CURL_ERROR_SIZE];	/* curl's error buffer, then our message */
};

/* The Lua handle (userdata): points at its request until either goes away. */
struct req_box {
	struct req *r;
};

/* One socket curl asked us to watch; freed in the poll handle's close callback. */
struct sock {
	struct link link;		/* on socks */
	uv_poll_t poll;
	curl_socket_t fd;
};

static CURLM *multi;
static uv_timer_t multi_timer;	/* curl's timeout */
static uv_timer_t later_timer;	/* reports results of cancel() and bad URLs */
static struct link running = {&running, &running};
static struct link done = {&done, &done};
static struct link socks = {&socks, &socks};
static int n_running;		/* requests in curl */
static int n_active;		/* requests whose fn has not run */
/*
 * TLS sessions, shared by every easy handle: a new connection to a server
 * resumes the session of an earlier one (curl matches host, port and TLS
 * settings, the CA file among them), so a burst of requests to one API
 * does not pay a full handshake - certificate chain and signature checks -
 * per connection. Per easy handle, as curl keeps them by default, a pooled
 * handle would only resume its own.
 */
static CURLSH *share;
static CURL *pool[POOL_MAX];	/* reset easy handles, ready for reuse */
static int n_pool;
static const char *sys_capath;	/* the system store: SSL_CERT_DIR or OpenSSL's cert folder */

/* ---- easy handles ---- */

static CURL *take_easy(void)
{
	CURL *e = n_pool ? pool[--n_pool] : curl_easy_init();

	if (e == NULL) {
		fputs("callagent: out of memory (curl_easy_init)\n", stderr);
		abort();
	}
	return e;
}

static void give_easy(CURL *e)
{
	if (n_pool < POOL_MAX && !ca_stopping()) {
		curl_easy_reset(e);
		pool[n_pool++] = e;
	} else {
		curl_easy_cleanup(e);
	}
}

static void count_running(int delta)
{
	n_running += delta;
	/* curl's timer keeps the program alive only while there is work. */
	if (n_running > 0)
		uv_ref((uv_handle_t *)&multi_timer);
	else
		uv_unref((uv_handle_t *)&multi_timer);
}

/* ---- error messages ---- */

static int https_url(CURLU *cu);

static const char *code_of(struct req *r, CURLcode rc)
{
	switch (rc) {
	case CURLE_OPERATION_TIMEDOUT:
		return "ETIMEDOUT";
	case CURLE_COULDNT_CONNECT:
		return "ECONNREFUSED";
	case CURLE_COULDNT_RESOLVE_HOST:
	case CURLE_COULDNT_RESOLVE_PROXY:
		return "ENOTFOUND";
	case CURLE_FILESIZE_EXCEEDED:
		return "EMSGSIZE";
	case CURLE_WRITE_ERROR:
		return r->too_big ? "EMSGSIZE" : "ECURL";
	case CURLE_URL_MALFORMAT:
		return "EINVAL";
	case CURLE_UNSUPPORTED_PROTOCOL: {
		char *u = NULL;

		/*
		 * Our checks pass only http and https to curl: a URL of a scheme
		 * it may not follow (another one, or http from https) is a
		 * redirect's; else this is a reply that is not HTTP (curl calls
		 * it HTTP/0.9), which no URL of ours could fix. (The status of a
		 * redirect before it stays curl's response code: no help here.)
		 */
		if (r->easy && curl_easy_getinfo(r->easy, CURLINFO_EFFECTIVE_URL, &u) == CURLE_OK && u &&
		    strncasecmp(u, "https://", 8) != 0 && (strncasecmp(u, "http://", 7) != 0 || https_url(r->cu)))
			return "EINVAL";
		return "ECURL";
	}
	case CURLE_SSL_CONNECT_ERROR:
	case CURLE_PEER_FAILED_VERIFICATION:
	case CURLE_SSL_CERTPROBLEM:
	case CURLE_SSL_CIPHER:
	case CURLE_SSL_CACERT_BADFILE:
	case CURLE_SSL_ENGINE_NOTFOUND:
	case CURLE_SSL_ENGINE_SETFAILED:
	case CURLE_SSL_ENGINE_INITFAILED:
	case CURLE_SSL_SHUTDOWN_FAILED:
	case CURLE_SSL_CRL_BADFILE:
	case CURLE_SSL_ISSUER_ERROR:
	case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
	case CURLE_SSL_INVALIDCERTSTATUS:
	case CURLE_SSL_CLIENTCERT:
	case CURLE_USE_SSL_FAILED:
		return "ETLS";
	default:
		return "ECURL";
	}
}

/*
 * Replaces the slen bytes at hit, inside msg (cap bytes), by REDACTED,
 * cutting the message short if it does not fit; returns where to go on,
 * or NULL when nothing is left.
 */
static char *redact_at(char *msg, size_t cap, char *hit, size_t slen)
{
	size_t rlen = sizeof REDACTED - 1, keep = (size_t)(hit - msg);
	size_t tail = strlen(hit + slen);

	if (keep + rlen >= cap) {
		*hit = '\0';
		return NULL;
	}
	if (keep + rlen + tail >= cap)
		tail = cap - 1 - keep - rlen;
	memmove(hit + rlen, hit + slen, tail);
	memcpy(hit, REDACTED, rlen);
	hit[rlen + tail] = '\0';
	return hit + rlen;
}

/* Replaces each occurrence of secret (4 bytes or more) in msg by REDACTED. */
static void scrub(char *msg, size_t cap, const char *secret)
{
	size_t slen = strlen(secret);
	char *at = msg, *hit;

	if (slen < 4)
		return;
	while (at && (hit = strstr(at, secret)) != NULL)
		at = redact_at(msg, cap, hit, slen);
}

/* What ends a word of an error message: a URL curl quotes is one word. */
#define WORD_END " \t\r\n'\""

/*
 * Replaces the userinfo of every URL in msg ("user:pass@host", after its
 * "scheme://" or not) by REDACTED: curl quotes a proxy from the environment
 * as it was given when it cannot use it (http_proxy=user:pass@host is
 * common), and that password is none we were given. In a word with an '@',
 * what comes before its last '@' (after its "://") is userinfo, whatever
 * '/', '?' or '#' a password left unencoded holds. A message that fills the
 * buffer may have been cut inside a userinfo, before its '@': its last word
 * goes (after its "://") too.
 */
static void scrub_userinfo(char *msg, size_t cap)
{
	int cut = strlen(msg) >= cap - 1;
	char *at = msg;

	while (at != NULL && *(at += strspn(at, WORD_END)) != '\0') {
		size_t n = strcspn(at, WORD_END);
		char *start = at, *last = NULL;

		for (size_t i = 0; i < n; i++) {
			if (last == NULL && i + 3 <= n && memcmp(at + i, "://", 3) == 0)
				start = at + i + 3;
			else if (at[i] == '@')
				last = at + i;
		}
		if (cut && at[n] == '\0') {
			if (at + n > start)
				redact_at(msg, cap, start, (size_t)(at + n - start));
			return;
		}
		at = last != NULL && last > start ? redact_at(msg, cap, start, (size_t)(last - start)) : at + n;
	}
}

/* Keeps passwords, URL userinfo and Authorization header values out of r->err. */
static void scrub_secrets(struct req *r)
{
	scrub_userinfo(r->err, sizeof r->err);
	if (r->secret)
		scrub(r->err, sizeof r->err, r->secret);
	for (struct curl_slist *h = r->headers; h; h = h->next) {
		const char *v;

		if (strncasecmp(h->data, "authorization:", 14) == 0)
			v = h->data + 14;
		else if (strncasecmp(h->data, "proxy-authorization:", 20) == 0)
			v = h->data + 20;
		else
			continue;
		v += strspn(v, " \t");
		scrub(r->err, sizeof r->err, v);
		/* The credentials alone, after the scheme ("Bearer xyz"). */
		if (strchr(v, ' '))
			scrub(r->err, sizeof r->err, strchr(v, ' ') + 1 + strspn(strchr(v, ' ') + 1, " "));
	}
}

/*
 * Ends a RUNNING request: takes it out of curl, records the outcome (code
 * NULL: from rc) and queues it for its callback. Never calls Lua.
 */
static void finish(struct req *r, CURLcode rc, const char *code)
{
	lua_State *L = ca_lua();

	if (code == NULL && rc != CURLE_OK)
		code = code_of(r, rc);
	if (code && r->truncate && r->too_big && !strcmp(code, "EMSGSIZE"))
		code = NULL;	/* the body is cut at max_body: a result */
	if (r->easy) {
		if (code == NULL) {
			curl_off_t us = 0;

			curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &r->status);
			curl_easy_getinfo(r->easy, CURLINFO_TOTAL_TIME_T, &us);
			r->time_ms = (double)us / 1000.0;
		}
		curl_multi_remove_handle(multi, r->easy);
		give_easy(r->easy);
		r->easy = NULL;
		count_running(-1);
	}
	r->err_code = code;
	if (code) {
		if (!strcmp(code, "ECANCELED"))
			snprintf(r->err, sizeof r->err, "request canceled");
		else if (!strcmp(code, "EMSGSIZE"))
			snprintf(r->err, sizeof r->err, "response body larger than %lld bytes",
				 (long long)r->max_body);
		else if (r->err[0] == '\0')
			snprintf(r->err, sizeof r->err, "%s", curl_easy_strerror(rc));
		scrub_secrets(r);
		buf_free(&r->body);
		buf_free(&r->hdrs);
	}
	curl_url_cleanup(r->cu);
	r->cu = NULL;
	free(r->headers);
	r->headers = NULL;
	free(r->secret);
	r->secret = NULL;
	if (L)
		ca_unref(L, &r->body_ref);
	r->state = REQ_DONE;
	list_del(&r->link);
	list_append(&done, &r->link);
}

/* ---- results ---- */

static void push_result(lua_State *L, struct req *r)
{
	const char *p = r->hdrs.p, *end = p + r->hdrs.len;

	lua_createtable(L, 0, 4);
	lua_pushinteger(L, r->status);
	lua_setfield(L, -2, "status");
	lua_createtable(L, 0, r->n_hdrs);
	while (p < end) {
		const char *name = p, *val = p + strlen(p) + 1;
		size_t vlen = strlen(val);

		p = val + vlen + 1;
		if (lua_getfield(L, -1, name) == LUA_TNIL) {
			lua_pop(L, 1);
			lua_pushlstring(L, val, vlen);
		} else {
			lua_pushliteral(L, ", ");
			lua_pushlstring(L, val, vlen);
			lua_concat(L, 3);
		}
		lua_setfield(L, -2, name);
	}
	lua_setfield(L, -2, "headers");
	lua_pushlstring(L, r->body.p, r->body.len);
	lua_setfield(L, -2, "body");
	lua_pushnumber(L, r->time_ms);
	lua_setfield(L, -2, "time_ms");
	if (r->too_big) {
		lua_pushboolean(L, 1);
		lua_setfield(L, -2, "truncated");
	}
}

static void free_req(struct req *r)
{
	buf_free(&r->body);
	buf_free(&r->hdrs);
	free(r);
}

/* Calls fn of a DONE request (taken off the done list) with its result. */
static void notify(lua_State *L, struct req *r)
{
	int nargs = 1;

	r->state = REQ_CALLING;
	n_active--;
	lua_rawgeti(L, LUA_REGISTRYINDEX, r->fn_ref);
	ca_unref(L, &r->fn_ref);
	if (r->err_code == NULL) {
		push_result(L, r);
	} else {
		lua_pushnil(L);
		lua_pushfstring(L, "%s: %s", r->err_code, r->err);
		nargs = 2;
	}
	buf_free(&r->body);
	buf_free(&r->hdrs);
	ca_call(L, nargs, 0, "fetch callback");
	/* fn may have let go of the handle; __gc leaves a CALLING request to us. */
	r->state = REQ_FINISHED;
	if (r->box == NULL)
		free_req(r);
}

/*
 * Runs the callbacks of finished requests. Only from loop callbacks; none
 * once the program is stopping (teardown releases what is left).
 */
static void flush_done(void)
{
	lua_State *L = ca_lua();

	if (L == NULL)
		return;
	while (done.next != &done && !ca_stopping()) {
		struct req *r = container_of(done.next, struct req, link);

		list_del(&r->link);
		notify(L, r);
	}
}

static void on_later(uv_timer_t *h)
{
	(void)h;
	flush_done();
}

/* Reports results queued from inside a Lua call on the next loop turn. */
static void report_later(void)
{
	if (!uv_is_active((uv_handle_t *)&later_timer))
		uv_timer_start(&later_timer, on_later, 0, 0);
}

/* Takes finished transfers out of curl. */
static void check_multi(void)
{
	CURLMsg *m;
	int left;

	while ((m = curl_multi_info_read(multi, &left)) != NULL) {
		char *priv = NULL;

		if (m->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, &priv);
		/* m is invalid once the handle is removed, which finish does. */
		finish((struct req *)priv, m->data.result, NULL);
	}
}

/* ---- curl callbacks ---- */

static size_t on_body(char *p, size_t size, size_t n, void *ud)
{
	struct req *r = ud;
	size_t len = size * n;

	if ((curl_off_t)(r->body.len + len) > r->max_body) {
		/* What fits is kept (none with max_body 0: the buffer may not exist). */
		if (r->truncate && r->max_body > (curl_off_t)r->body.len)
			buf_add(&r->body, p, (size_t)(r->max_body - (curl_off_t)r->body.len));
		r->too_big = 1;
		return 0;
	}
	buf_add(&r->body, p, len);
	return len;
}

static size_t trim_end(const char *p, size_t len)
{
	while (len && (p[len - 1] == '\r' || p[len - 1] == '\n' || p[len - 1] == ' ' ||
		       p[len - 1] == '\t'))
		len--;
	return len;
}

/*
 * Parses one header line into r->hdrs. A status line starts a new response
 * (after 1xx or a followed redirect) and drops what came before.
 */
static size_t on_header(char *p, size_t size, size_t n, void *ud)
{
	struct req *r = ud;
	size_t total = size * n, len = trim_end(p, total);
	const char *colon, *v;

	if (len >= 5 && memcmp(p, "HTTP/", 5) == 0) {
		r->hdrs.len = 0;
		r->body.len = 0;
		r->n_hdrs = 0;
	} else if (len == 0) {
		curl_off_t cl = -1;

		/*
		 * End of the headers: make room for the body in one allocation,
		 * up to BODY_RESERVE_MAX. The length is the server's word: past
		 * that the buffer grows as the bytes come (a server that
		 * declared 1 TiB under a huge max_body made us ask for it).
		 */
		long code = 0;

		/*
		 * Truncated at 0 bytes: the status and headers are all the caller
		 * wants, so the transfer ends here, a result (too_big). Waiting
		 * for the body (even for its first byte) ran a reply whose body
		 * never came to the timeout: an error, for a status that was in.
		 * Not after 1xx (the final answer is still to come), nor at a
		 * redirect being followed.
		 */
		curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &code);
		if (r->truncate && r->max_body == 0 && code >= 200 &&
		    !(r->follow && code >= 300 && code < 400)) {
			r->too_big = 1;
			return 0;
		}
		curl_easy_getinfo(r->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
		if (cl > 0 && cl <= r->max_body)
			buf_reserve(&r->body, (size_t)(cl < BODY_RESERVE_MAX ? cl : BODY_RESERVE_MAX));
	} else if (*p == ' ' || *p == '\t') {
		/* obs-fold: the line continues the previous value. */
		size_t skip = strspn(p, " \t");

		if (r->hdrs.len > 0 && skip < len) {
			r->hdrs.p[r->hdrs.len - 1] = ' ';
			buf_add(&r->hdrs, p + skip, len - skip);
			buf_add(&r->hdrs, "", 1);
		}
	} else if ((colon = memchr(p, ':', len)) != NULL && colon > p) {
		size_t nlen = (size_t)(colon - p), start = r->hdrs.len;

		buf_add(&r->hdrs, p, nlen);
		for (size_t i = start; i < start + nlen; i++)
			if (r->hdrs.p[i] >= 'A' && r->hdrs.p[i] <= 'Z')
				r->hdrs.p[i] += 'a' - 'A';
		buf_add(&r->hdrs, "", 1);
		v = colon + 1;
		while (v < p + len && (*v == ' ' || *v == '\t'))
			v++;
		buf_add(&r->hdrs, v, (size_t)(p + len - v));
		buf_add(&r->hdrs, "", 1);
		r->n_hdrs++;
	}
	return total;
}

static void on_sock_close(uv_handle_t *h)
{
	free(h->data);
}

static void close_sock(struct sock *s)
{
	list_del(&s->link);
	uv_close((uv_handle_t *)&s->poll, on_sock_close);
}

static void on_poll(uv_poll_t *h, int status, int events)
{
	struct sock *s = h->data;
	int flags = 0, still;

	if (status < 0)
		flags = CURL_CSELECT_ERR | CURL_CSELECT_IN | CURL_CSELECT_OUT;
	if (events & UV_READABLE)
		flags |= CURL_CSELECT_IN;
	if (events & UV_WRITABLE)
		flags |= CURL_CSELECT_OUT;
	/* s stays allocated until its close callback even if curl drops the socket. */
	curl_multi_socket_action(multi, s->fd, flags, &still);
	check_multi();
	flush_done();
}

static int on_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
	struct sock *s = socketp;
	int events = 0;

	(void)easy;
	(void)userp;
	if (what == CURL_POLL_REMOVE) {
		if (s) {
			curl_multi_assign(multi, fd, NULL);
			close_sock(s);
		}
		return 0;
	}
	if (s == NULL) {
		s = ca_malloc(sizeof *s);
		if (uv_poll_init_socket(ca_loop(), &s->poll, fd) != 0) {
			free(s);
			return -1;
		}
		s->poll.data = s;
		s->fd = fd;
		list_append(&socks, &s->link);
		curl_multi_assign(multi, fd, s);
	}
	if (what & CURL_POLL_IN)
		events |= UV_READABLE;
	if (what & CURL_POLL_OUT)
		events |= UV_WRITABLE;
	uv_poll_start(&s->poll, events, on_poll);
	return 0;
}

static void on_multi_timer(uv_timer_t *h)
{
	int still;

	(void)h;
	curl_multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &still);
	check_multi();
	flush_done();
}

static int on_timer(CURLM *m, long ms, void *userp)
{
	(void)m;
	(void)userp;
	if (ms < 0)
		uv_timer_stop(&multi_timer);
	else
		uv_timer_start(&multi_timer, on_multi_timer, (uint64_t)ms, 0);
	return 0;
}

/* ---- request() ---- */

static int is_token(const char *s, size_t n)
{
	if (n == 0)
		return 0;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];

		if (c <= 32 || c >= 127 || strchr("\"(),/:;<=>?@[\\]{}", c))
			return 0;
	}
	return 1;
}

/*
 * Walks the headers table at t: checks every entry (raises on misuse) and,
 * when block is not NULL, writes the curl_slist there. Returns the bytes
 * the strings need; *n gets the number of entries.
 */
static size_t walk_headers(lua_State *L, int t, struct curl_slist *block, int *n, int *expect)
{
	char *s = block ? (char *)(block + *n) : NULL;
	size_t total = 0;
	int i = 0;

	lua_pushnil(L);
	while (lua_next(L, t)) {
		size_t nl, vl;
		const char *name, *val;

		if (lua_type(L, -2) != LUA_TSTRING)
			luaL_error(L, "header names must be strings");
		name = lua_tolstring(L, -2, &nl);
		if (!is_token(name, nl))
			luaL_error(L, "invalid header name '%s'", name);
		if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
			luaL_error(L, "header '%s' must be a string or a number", name);
		val = lua_tolstring(L, -1, &vl);
		if (memchr(val, '\r', vl) || memchr(val, '\n', vl) || strlen(val) != vl)
			luaL_error(L, "header '%s' must not contain CR, LF or NUL", name);
		if (nl == 6 && strncasecmp(name, "expect", 6) == 0)
			*expect = 1;
		total += nl + vl + 3;
		if (block) {
			block[i].data = s;
			block[i].next = i + 1 < *n ? &block[i + 1] : NULL;
			memcpy(s, name, nl);
			s += nl;
			if (vl) {
				memcpy(s, ": ", 2);
				memcpy(s + 2, val, vl);
				s += 2 + vl;
			} else {
				/* "Name;" is curl's way to send an empty header. */
				*s++ = ';';
			}
			*s++ = '\0';
		}
		i++;
		lua_pop(L, 1);
	}
	if (!block)
		*n = i;
	return total;
}

/*
 * The options of one request() call, read and checked before anything is
 * allocated; on its stack. Each field is read once, and the strings and
 * tables read stay on the Lua stack until request() returns: an __index
 * function may answer with a fresh value each time (a second read of
 * headers could hold more than the block sized on the first). The headers
 * are walked in a copy only this call holds: the collector may run a
 * finalizer between the walk that sizes the block and the one that fills
 * it (an allocation, a number made a string), and a finalizer may change
 * the caller's table.
 */
struct opts {
	const char *method, *body, *ca_file, *username, *password;
	size_t body_len;
	lua_Integer timeout, connect_timeout, max_body;
	int follow, truncate, headers_idx, body_idx, n_headers, expect;
	size_t headers_size;
};

/* Replaces the table at t by a shallow copy of it (raw: no metamethod runs). */
static void copy_table(lua_State *L, int t)
{
	lua_newtable(L);
	lua_pushnil(L);
	while (lua_next(L, t)) {
		lua_pushvalue(L, -2);
		lua_insert(L, -2);
		lua_rawset(L, -4);
	}
	lua_replace(L, t);
}

/* Like ca_opt_string_field, but the value stays on the stack (one slot, nil or the string). */
static const char *opt_string(lua_State *L, int idx, const char *k, const char *def)
{
	if (lua_getfield(L, idx, k) == LUA_TNIL)
		return def;
	if (lua_type(L, -1) != LUA_TSTRING)
		luaL_error(L, "option '%s' must be a string", k);
	return lua_tostring(L, -1);
}

static void read_opts(lua_State *L, int idx, struct opts *o)
{
	memset(o, 0, sizeof *o);
	o->method = "GET";
	o->timeout = DEFAULT_TIMEOUT;
	o->connect_timeout = DEFAULT_CONNECT_TIMEOUT;
	o->max_body = DEFAULT_MAX_BODY;
	if (lua_isnoneornil(L, idx))
		return;
	luaL_argcheck(L, lua_type(L, idx) == LUA_TTABLE, idx, "options must be a table");
	/* 6 values kept, and the headers' copy: the table, a key twice, a value. */
	luaL_checkstack(L, 10, NULL);
	o->method = opt_string(L, idx, "method", "GET");
	if (!is_token(o->method, strlen(o->method)))
		luaL_error(L, "option 'method' must be an HTTP method token");
	o->ca_file = opt_string(L, idx, "ca_file", NULL);
	o->username = opt_string(L, idx, "username", NULL);
	o->password = opt_string(L, idx, "password", NULL);
	o->timeout = ca_opt_int_field(L, idx, "timeout", DEFAULT_TIMEOUT);
	o->connect_timeout = ca_opt_int_field(L, idx, "connect_timeout", DEFAULT_CONNECT_TIMEOUT);
	o->max_body = ca_opt_int_field(L, idx, "max_body", DEFAULT_MAX_BODY);
	o->follow = ca_opt_bool_field(L, idx, "follow", 0);
	o->truncate = ca_opt_bool_field(L, idx, "truncate", 0);
	if (o->timeout < 0 || o->connect_timeout < 0)
		luaL_error(L, "options 'timeout' and 'connect_timeout' must be >= 0");
	if (o->max_body < 0)
		luaL_error(L, "option 'max_body' must be >= 0");
	if (lua_getfield(L, idx, "body") != LUA_TNIL) {
		if (lua_type(L, -1) != LUA_TSTRING)
			luaL_error(L, "option 'body' must be a string");
		o->body = lua_tolstring(L, -1, &o->body_len);
		o->body_idx = lua_gettop(L);
	}
	if (lua_getfield(L, idx, "headers") != LUA_TNIL) {
		if (lua_type(L, -1) != LUA_TTABLE)
			luaL_error(L, "option 'headers' must be a table");
		o->headers_idx = lua_gettop(L);
		copy_table(L, o->headers_idx);
		o->headers_size = walk_headers(L, o->headers_idx, NULL, &o->n_headers, &o->expect);
	}
}

/*
 * Builds the request's header list in one allocation: the user's headers,
 * plus an empty "Expect:" so curl does not wait for 100-continue.
 */
static struct curl_slist *build_headers(lua_State *L, struct opts *o)
{
	static const char no_expect[] = "Expect:";
	int n = o->n_headers + !o->expect;
	size_t size = (size_t)n * sizeof(struct curl_slist) + o->headers_size + sizeof no_expect;
	struct curl_slist *block = ca_malloc(size);

	if (o->headers_idx)
		walk_headers(L, o->headers_idx, block, &n, &o->expect);
	if (!o->expect) {
		char *s = (char *)block + size - sizeof no_expect;

		memcpy(s, no_expect, sizeof no_expect);
		block[n - 1].data = s;
		block[n - 1].next = NULL;
		if (n > 1)
			block[n - 2].next = &block[n - 1];
	}
	return block;
}

/* Parses the URL into r->cu; returns an error message or NULL. */
static const char *parse_url(struct req *r, const char *url, size_t len)
{
	char *scheme = NULL, *pw = NULL;
	CURLUcode uc;
	int ok;

	if (strlen(url) != len)
		return "invalid URL: contains a NUL byte";
	r->cu = curl_url();
	if (r->cu == NULL) {
		fputs("callagent: out of memory (curl_url)\n", stderr);
		abort();
	}
	uc = curl_url_set(r->cu, CURLUPART_URL, url, 0);
	if (uc != CURLUE_OK)
		return curl_url_strerror(uc);
	if (curl_url_get(r->cu, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK)
		return "invalid URL: no scheme";
	ok = !strcmp(scheme, "http") || !strcmp(scheme, "https");
	curl_free(scheme);
	if (!ok)
		return "unsupported URL scheme (http and https only)";
	if (curl_url_get(r->cu, CURLUPART_PASSWORD, &pw, 0) == CURLUE_OK && pw) {
		if (r->secret == NULL)
			r->secret = ca_strdup(pw);
		curl_free(pw);
	}
	return NULL;
}


/*
 * An https request followed (opts.follow) never goes on over plain http: its
 * headers would cross the network in the clear (libcurl strips only
 * Authorization and Cookie when a redirect changes host).
 */
static int https_url(CURLU *cu)
{
	char *scheme = NULL;
	int yes = curl_url_get(cu, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK && strcmp(scheme, "https") == 0;

	curl_free(scheme);
	return yes;
}
static void setup_easy(struct req *r, struct opts *o)
{
	CURL *e = r->easy;

	r->err[0] = '\0';
	curl_easy_setopt(e, CURLOPT_PRIVATE, (char *)r);
	curl_easy_setopt(e, CURLOPT_SHARE, share);
	curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(e, CURLOPT_CURLU, r->cu);
	curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR, https_url(r->cu) ? "https" : "http,https");
	curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->err);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, (void *)r);
	curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
	curl_easy_setopt(e, CURLOPT_HEADERDATA, (void *)r);
	curl_easy_setopt(e, CURLOPT_USERAGENT, "callagent/" CA_VERSION);
	curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)o->timeout);
	curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)o->connect_timeout);
	/* Refused from its Content-Length at once; not when it is to be cut (0: none). */
	curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, o->truncate ? (curl_off_t)0 : (curl_off_t)o->max_body);
	curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, (long)o->follow);
	curl_easy_setopt(e, CURLOPT_MAXREDIRS, MAX_REDIRS);
	curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->headers);
	if (o->body) {
		/* No copy: body_ref keeps the Lua string alive while curl reads it. */
		curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)o->body_len);
		curl_easy_setopt(e, CURLOPT_POSTFIELDS, o->body);
		if (strcmp(o->method, "POST") != 0)
			curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, o->method);
	} else if (!strcmp(o->method, "HEAD")) {
		curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
	} else if (!strcmp(o->method, "POST") || !strcmp(o->method, "PUT") ||
		   !strcmp(o->method, "PATCH")) {
		/* An empty body, so the request carries Content-Length: 0. */
		curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)0);
		curl_easy_setopt(e, CURLOPT_POSTFIELDS, "");
		if (strcmp(o->method, "POST") != 0)
			curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, o->method);
	} else if (strcmp(o->method, "GET") != 0) {
		curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, o->method);
	}
	if (o->username || o->password) {
		curl_easy_setopt(e, CURLOPT_HTTPAUTH, (long)CURLAUTH_BASIC);
		curl_easy_setopt(e, CURLOPT_USERNAME, o->username ? o->username : "");
		curl_easy_setopt(e, CURLOPT_PASSWORD, o->password ? o->password : "");
	}
	/*
	 * The system store is the folder of certificates named by subject hash,
	 * read lazily: a handshake loads the one root it needs. curl's default
	 * bundle file would be parsed whole - about 140 certificates, 30 ms of
	 * the loop's time - for every new connection (curl 7.88 caches the
	 * store only when no CApath is set, and Debian's build sets one).
	 * NULL: no bundle; a ca_file adds its CAs.
	 */
	curl_easy_setopt(e, CURLOPT_CAINFO, o->ca_file);
	curl_easy_setopt(e, CURLOPT_CAPATH, sys_capath);
}

static int l_request(lua_State *L)
{
	size_t url_len;
	const char *url, *bad;
	struct opts o;
	struct req_box *box;
	struct req *r;
	CURLMcode mc;

	luaL_checktype(L, 1, LUA_TSTRING);
	url = lua_tolstring(L, 1, &url_len);
	luaL_checktype(L, 3, LUA_TFUNCTION);
	/* Stack: url, opts, fn, then what read_opts leaves (values it points into). */
	lua_settop(L, 3);
	read_opts(L, 2, &o);

	/* Everything is checked: from here on nothing raises but out of memory. */
	box = lua_newuserdatauv(L, sizeof *box, 0);
	box->r = NULL;
	luaL_setmetatable(L, REQ_MT);

	r = ca_malloc(sizeof *r);
	memset(r, 0, sizeof *r);
	r->link.prev = r->link.next = &r->link;
	r->box = box;
	r->max_body = (curl_off_t)o.max_body;
	r->truncate = o.truncate;
	r->follow = o.follow;
	r->fn_ref = ca_ref(L, 3);
	r->body_ref = LUA_NOREF;
	r->state = REQ_RUNNING;
	box->r = r;
	n_active++;
	if (o.password)
		r->secret = ca_strdup(o.password);
	r->headers = build_headers(L, &o);

	bad = parse_url(r, url, url_len);
	if (bad) {
		/* Report on the next loop turn, like every other result. */
		snprintf(r->err, sizeof r->err, "%s%s", strncmp(bad, "invalid URL", 11) ? "invalid URL: " : "", bad);
		list_append(&running, &r->link);
		finish(r, CURLE_URL_MALFORMAT, "EINVAL");
		report_later();
		return 1;
	}
	if (o.body) {
		lua_pushvalue(L, o.body_idx);
		r->body_ref = luaL_ref(L, LUA_REGISTRYINDEX);
	}
	r->easy = take_easy();
	setup_easy(r, &o);
	list_append(&running, &r->link);
	count_running(1);
	mc = curl_multi_add_handle(multi, r->easy);
	if (mc != CURLM_OK) {
		snprintf(r->err, sizeof r->err, "%s", curl_multi_strerror(mc));
		finish(r, CURLE_FAILED_INIT, "ECURL");
		report_later();
	}
	return 1;
}

/* Releases a RUNNING or DONE request without calling fn (teardown). */
static void discard(struct req *r)
{
	lua_State *L = ca_lua();

	if (r->easy) {
		curl_multi_remove_handle(multi, r->easy);
		curl_easy_cleanup(r->easy);
		r->easy = NULL;
		count_running(-1);
	}
	curl_url_cleanup(r->cu);
	free(r->headers);
	free(r->secret);
	if (L) {
		ca_unref(L, &r->fn_ref);
		ca_unref(L, &r->body_ref);
	}
	list_del(&r->link);
	n_active--;
	if (r->box)
		r->box->r = NULL;
	free_req(r);
}

static struct req_box *check_box(lua_State *L)
{
	return luaL_checkudata(L, 1, REQ_MT);
}

static int l_cancel(lua_State *L)
{
	struct req_box *box = check_box(L);
	struct req *r = box->r;

	if (r == NULL || r->state != REQ_RUNNING) {
		lua_pushboolean(L, 0);
		return 1;
	}
	finish(r, CURLE_OK, "ECANCELED");
	report_later();
	lua_pushboolean(L, 1);
	return 1;
}

static int l_gc(lua_State *L)
{
	struct req_box *box = check_box(L);
	struct req *r = box->r;

	if (r == NULL)
		return 0;
	box->r = NULL;
	r->box = NULL;
	if (r->state == REQ_FINISHED)
		free_req(r);
	else if (ca_stopping() && (r->state == REQ_RUNNING || r->state == REQ_DONE))
		discard(r);
	/* Otherwise it runs on; notify() frees it after fn. */
	return 0;
}

static int l_active(lua_State *L)
{
	lua_pushinteger(L, n_active);
	return 1;
}

static int l_tostring(lua_State *L)
{
	struct req_box *box = check_box(L);
	static const char *const names[] = {"running", "done", "calling", "finished"};

	lua_pushfstring(L, "fetch request (%s)", box->r ? names[box->r->state] : "finished");
	return 1;
}

/* ---- module setup and teardown ---- */

static void at_close(void)
{
	while (running.next != &running)
		discard(container_of(running.next, struct req, link));
	while (done.next != &done)
		discard(container_of(done.next, struct req, link));
	while (n_pool > 0)
		curl_easy_cleanup(pool[--n_pool]);
	/* Our polls go first, while their sockets are still open; curl must not call back. */
	curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, NULL);
	curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, NULL);
	while (socks.next != &socks)
		close_sock(container_of(socks.next, struct sock, link));
	curl_multi_cleanup(multi);
	multi = NULL;
	curl_share_cleanup(share);	/* every easy handle that used it is gone */
	share = NULL;
	uv_close((uv_handle_t *)&multi_timer, NULL);
	uv_close((uv_handle_t *)&later_timer, NULL);
	curl_global_cleanup();
}

static void setup(void)
{
	if (multi)
		return;
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK || (multi = curl_multi_init()) == NULL) {
		fputs("callagent: cannot initialise libcurl\n", stderr);
		abort();
	}
	share = curl_share_init();
	if (share == NULL || curl_share_setopt(share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION) != CURLSHE_OK) {
		fputs("callagent: cannot initialise libcurl's TLS session cache\n", stderr);
		abort();
	}
	curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, on_socket);
	curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, on_timer);
	uv_timer_init(ca_loop(), &multi_timer);
	uv_timer_init(ca_loop(), &later_timer);
	uv_unref((uv_handle_t *)&multi_timer);
	sys_capath = ca_system_ca_dir();
	ca__at_close(at_close);
}

int luaopen_callagent_core_fetch(lua_State *L)
{
	static const luaL_Reg methods[] = {
		{"cancel", l_cancel},
		{NULL, NULL}
	};
	static const luaL_Reg fns[] = {
		{"request", l_request},
		{"active", l_active},
		{NULL, NULL}
	};

	setup();
	if (luaL_newmetatable(L, REQ_MT)) {
		luaL_newlib(L, methods);
		lua_setfield(L, -2, "__index");
		lua_pushcfunction(L, l_gc);
		lua_setfield(L, -2, "__gc");
		lua_pushcfunction(L, l_tostring);
		lua_setfield(L, -2, "__tostring");
	}
	lua_pop(L, 1);
	luaL_newlib(L, fns);
	return 1;
}
