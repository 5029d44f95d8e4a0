/*
 * timer.c - callagent.core.timer: libuv timers for Lua.
 *
 *   t = timer.start(ms, repeat_ms, fn)  fn() no sooner than ms from now, then every
 *                                       repeat_ms (0: once)
 *   t:stop()                            stops and frees; idempotent (also __close)
 *   t:active()                          true while it will still fire
 *   t:unref() / t:ref()                 whether it keeps the loop alive
 *   timer.now()                         monotonic milliseconds (float, ns resolution)
 *
 * A timer whose userdata is collected while armed keeps running (like a
 * fire-and-forget setTimeout) and frees itself after its last firing; at
 * exit, once the Lua state is closed, those still armed are closed too (a
 * repeating one would otherwise keep the loop, and the process, alive).
 *
 * callagent.timer (lua/callagent/timer.lua) adds after/every/sleep on top.
 */
#include <stdlib.h>

#include "ca.h"

#define TIMER_MT "callagent.Timer"

/*
 * One Lua timer. Allocated by start(), owned by libuv from then on: the
 * userdata holds a pointer that stop() clears; the struct is freed in the
 * close callback.
 */
struct ca_timer {
	uv_timer_t h;
	int fn_ref;
	int repeat;
	int orphan;	/* its userdata was collected while it was still armed */
	struct ca_timer *prev, *next;	/* in the orphans list while orphan */
};

static struct ca_timer *orphans;

struct timer_box {
	struct ca_timer *t;
};

static void on_close(uv_handle_t *h)
{
	free(h->data);
}

static void close_timer(struct ca_timer *t)
{
	lua_State *L = ca_lua();

	if (t->orphan) {
		if (t->prev)
			t->prev->next = t->next;
		else
			orphans = t->next;
		if (t->next)
			t->next->prev = t->prev;
		t->orphan = 0;
	}

	if (L)
		ca_unref(L, &t->fn_ref);
	uv_timer_stop(&t->h);
	uv_close((uv_handle_t *)&t->h, on_close);
}

static void on_timer(uv_timer_t *h)
{
	struct ca_timer *t = h->data;
	lua_State *L = ca_lua();

	if (L == NULL || t->fn_ref == LUA_NOREF)
		return;
	lua_rawgeti(L, LUA_REGISTRYINDEX, t->fn_ref);
	/* A one-shot timer lets go of its function now; the handle waits for stop/gc. */
	if (!t->repeat)
		ca_unref(L, &t->fn_ref);
	ca_call(L, 0, 0, "timer callback");
	if (t->orphan && !t->repeat)
		close_timer(t);
}

/* At exit: no Lua is left to run, so the orphans go now. */
static void close_orphans(void)
{
	while (orphans)
		close_timer(orphans);
}

static struct timer_box *check_box(lua_State *L)
{
	return luaL_checkudata(L, 1, TIMER_MT);
}

static int l_start(lua_State *L)
{
	lua_Integer ms = luaL_checkinteger(L, 1);
	lua_Integer rep = luaL_optinteger(L, 2, 0);
	struct timer_box *box;
	struct ca_timer *t;

	luaL_checktype(L, 3, LUA_TFUNCTION);
	luaL_argcheck(L, ms >= 0, 1, "delay must be >= 0");
	luaL_argcheck(L, rep >= 0, 2, "repeat must be >= 0");

	box = lua_newuserdatauv(L, sizeof *box, 0);
	box->t = NULL;
	luaL_setmetatable(L, TIMER_MT);

	t = ca_malloc(sizeof *t);
	uv_timer_init(ca_loop(), &t->h);
	t->h.data = t;
	t->repeat = rep > 0;
	t->orphan = 0;
	t->prev = t->next = NULL;
	t->fn_ref = ca_ref(L, 3);
	box->t = t;
	/*
	 * Count the delay from now, not from the start of this loop iteration.
	 * libuv's clock counts whole milliseconds, truncated (and may be the
	 * coarse clock, a tick behind): from it, a delay could end up to 1 ms
	 * early. One millisecond more makes it "no sooner than ms" (CI saw
	 * timer.after(30) fire after 29.2 ms); it may be up to 2 ms late.
	 */
	uv_update_time(ca_loop());
	uv_timer_start(&t->h, on_timer, (uint64_t)ms + (ms > 0), (uint64_t)rep);
	return 1;
}

static int l_stop(lua_State *L)
{
	struct timer_box *box = check_box(L);

	if (box->t) {
		close_timer(box->t);
		box->t = NULL;
	}
	return 0;
}

static int l_gc(lua_State *L)
{
	struct timer_box *box = check_box(L);
	struct ca_timer *t = box->t;

	box->t = NULL;
	if (t == NULL)
		return 0;
	if (uv_is_active((uv_handle_t *)&t->h) && !ca_stopping()) {
		static int hooked;

		if (!hooked) {
			ca__at_close(close_orphans);
			hooked = 1;
		}
		t->orphan = 1;
		t->prev = NULL;
		t->next = orphans;
		if (orphans)
			orphans->prev = t;
		orphans = t;
	} else {
		close_timer(t);
	}
	return 0;
}

static int l_active(lua_State *L)
{
	struct timer_box *box = check_box(L);

	lua_pushboolean(L, box->t && uv_is_active((uv_handle_t *)&box->t->h));
	return 1;
}

static int l_unref(lua_State *L)
{
	struct timer_box *box = check_box(L);

	if (box->t)
		uv_unref((uv_handle_t *)&box->t->h);
	lua_settop(L, 1);
	return 1;
}

static int l_ref(lua_State *L)
{
	struct timer_box *box = check_box(L);

	if (box->t)
		uv_ref((uv_handle_t *)&box->t->h);
	lua_settop(L, 1);
	return 1;
}

static int l_now(lua_State *L)
{
	lua_pushnumber(L, (lua_Number)uv_hrtime() / 1e6);
	return 1;
}

int luaopen_callagent_core_timer(lua_State *L)
{
	static const luaL_Reg methods[] = {
		{"stop", l_stop},
		{"active", l_active},
		{"unref", l_unref},
		{"ref", l_ref},
		{NULL, NULL}
	};
	static const luaL_Reg fns[] = {
		{"start", l_start},
		{"now", l_now},
		{NULL, NULL}
	};

	if (luaL_newmetatable(L, TIMER_MT)) {
		luaL_newlib(L, methods);
		lua_setfield(L, -2, "__index");
		lua_pushcfunction(L, l_gc);
		lua_setfield(L, -2, "__gc");
		lua_pushcfunction(L, l_stop);
		lua_setfield(L, -2, "__close");
	}
	lua_pop(L, 1);
	luaL_newlib(L, fns);
	return 1;
}
