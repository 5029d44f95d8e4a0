/*
 * util.c - the protected call into Lua, failure values, small helpers.
 */
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#include "ca.h"

int ca_traceback(lua_State *L)
{
	const char *msg = lua_tostring(L, 1);

	if (msg == NULL) {
		if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
			msg = lua_tostring(L, -1);
		else
			msg = lua_pushfstring(L, "(error object is a %s value)",
					      luaL_typename(L, 1));
	}
	luaL_traceback(L, L, msg, 1);
	return 1;
}

int ca_call(lua_State *L, int nargs, int nresults, const char *where)
{
	int base = lua_gettop(L) - nargs;
	int rc;

	lua_pushcfunction(L, ca_traceback);
	lua_insert(L, base);
	rc = lua_pcall(L, nargs, nresults, base);
	lua_remove(L, base);
	if (rc == LUA_OK)
		return 0;
	if (rc == LUA_ERRMEM) {
		fprintf(stderr, "callagent: out of memory in %s\n", where);
		ca__log_flush();
		abort();
	}
	ca_log(CA_LOG_ERROR, "uncaught error in %s: %s", where,
	       lua_tostring(L, -1) ? lua_tostring(L, -1) : "?");
	lua_pop(L, 1);
	return -1;
}

void ca_call_ref(int ref, int nargs, const char *where)
{
	lua_State *L = ca_lua();

	if (L == NULL)
		return;
	lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
	lua_insert(L, -(nargs + 1));
	ca_call(L, nargs, 0, where);
}

int ca_ref(lua_State *L, int idx)
{
	if (lua_isnoneornil(L, idx))
		return LUA_NOREF;
	lua_pushvalue(L, idx);
	return luaL_ref(L, LUA_REGISTRYINDEX);
}

void ca_unref(lua_State *L, int *ref)
{
	if (*ref != LUA_NOREF && *ref != LUA_REFNIL)
		luaL_unref(L, LUA_REGISTRYINDEX, *ref);
	*ref = LUA_NOREF;
}

int ca_fail(lua_State *L, const char *code, const char *fmt, ...)
{
	va_list ap;
	char msg[512];

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	lua_pushnil(L);
	lua_pushfstring(L, "%s: %s", code, msg);
	return 2;
}

int ca_fail_uv(lua_State *L, int uverr)
{
	return ca_fail(L, uv_err_name(uverr), "%s", uv_strerror(uverr));
}

void *ca_malloc(size_t n)
{
	void *p = malloc(n ? n : 1);

	if (p == NULL) {
		fputs("callagent: out of memory\n", stderr);
		abort();
	}
	return p;
}

void *ca_realloc(void *p, size_t n)
{
	void *q = realloc(p, n ? n : 1);

	if (q == NULL) {
		fputs("callagent: out of memory\n", stderr);
		abort();
	}
	return q;
}

char *ca_strdup(const char *s)
{
	size_t n = strlen(s) + 1;

	return memcpy(ca_malloc(n), s, n);
}

void ca_set_int_field(lua_State *L, const char *k, lua_Integer v)
{
	lua_pushinteger(L, v);
	lua_setfield(L, -2, k);
}

lua_Integer ca_opt_int_field(lua_State *L, int idx, const char *k, lua_Integer def)
{
	lua_Integer v = def;

	if (lua_getfield(L, idx, k) != LUA_TNIL) {
		int ok;

		v = lua_tointegerx(L, -1, &ok);
		if (!ok)
			luaL_error(L, "option '%s' must be an integer", k);
	}
	lua_pop(L, 1);
	return v;
}

int ca_opt_bool_field(lua_State *L, int idx, const char *k, int def)
{
	int v = def;

	if (lua_getfield(L, idx, k) != LUA_TNIL)
		v = lua_toboolean(L, -1);
	lua_pop(L, 1);
	return v;
}

/*
 * The returned string stays valid while the table at idx holds it, which is
 * the caller's business; the usual case is an options table on the stack.
 */
const char *ca_opt_string_field(lua_State *L, int idx, const char *k, const char *def)
{
	const char *v = def;

	if (lua_getfield(L, idx, k) != LUA_TNIL) {
		if (lua_type(L, -1) != LUA_TSTRING)
			luaL_error(L, "option '%s' must be a string", k);
		v = lua_tostring(L, -1);
	}
	lua_pop(L, 1);
	return v;
}

/*
 * glibc's tcp_info and the fields Linux 4.1 added after it, up to
 * tcpi_bytes_received (linux/tcp.h has them, but clashes with the
 * netinet/tcp.h that uv.h includes).
 */
struct tcp_info_41 {
	struct tcp_info base;
	uint64_t pacing_rate, max_pacing_rate, bytes_acked, bytes_received;
};
_Static_assert(offsetof(struct tcp_info_41, bytes_received) == 128, "linux/tcp.h's tcpi_bytes_received is at 128");

long long ca__tcp_bytes_read(int fd)
{
	for (int i = 0; i < 4; i++) {
		struct tcp_info_41 a, b;
		socklen_t la = sizeof a, lb = sizeof b;
		int inq, fin;

		if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &a, &la) || ioctl(fd, FIONREAD, &inq) ||
		    getsockopt(fd, IPPROTO_TCP, TCP_INFO, &b, &lb))
			return -1;
		if (la < sizeof a || inq < 0)
			return -1;	/* a kernel before 4.1 */
		if (a.bytes_received != b.bytes_received || a.base.tcpi_state != b.base.tcpi_state)
			continue;	/* bytes came between the two reads: ask again */
		/* The peer's FIN, once in, counts one in bytes_received and none in FIONREAD. */
		fin = a.base.tcpi_state == TCP_CLOSE_WAIT || a.base.tcpi_state == TCP_LAST_ACK ||
		      a.base.tcpi_state == TCP_CLOSING || a.base.tcpi_state == TCP_TIME_WAIT;
		return (long long)(a.bytes_received - (unsigned)inq - (unsigned)fin);
	}
	return -1;
}
