/*
 * fuzz_bridge.c - libFuzzer on the per-frame audio path (src/bridge.c):
 * `make fuzz` (clang, ASan+UBSan, FUZZ_SECONDS).
 *
 * The bridge reads the few JSON fields it needs from each phone and model
 * message without a parser, and writes the messages for the other side by
 * hand. Whatever comes in, everything it writes must be well-formed JSON of
 * exactly the expected shape: an append with base64 audio to the model;
 * media (base64), mark (digits) and clear to the phone, in well-formed
 * unmasked frames. tests/test_bridge.lua checks that over real connections
 * in the test suite; this target runs the bridge object alone, millions of
 * inputs a minute, with stand-ins for its two connections (the linker's
 * --wrap of ca__ws_check and ca__ws_send), and aborts on the first message
 * that tests/lib/bridge_check.lua (the test's own check; its path is
 * BRIDGE_CHECK, from the Makefile) refuses.
 *
 * One input: byte 0 is the set-up (bits 0-1 output format pcmu/pcm/pcma,
 * bit 2 input pcma, bit 3 model ready from the start, bit 4 made without
 * the model connection); then messages separated by 0xFF, each led by a
 * byte: bit 0 phone (else model), then after it bit 1 model_ready(),
 * bit 2 clear(), bit 3 item(), bit 4 link_model().
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lualib.h>

#include "wsconn.h"

int luaopen_cjson(lua_State *L);
int luaopen_callagent_crypto(lua_State *L);
int luaopen_callagent_core_bridge(lua_State *L);

#define SID "MZ0123456789abcdef0123456789abcdef"

static lua_State *L;
static struct ca_ws phone, model;
static int check_ref;		/* the Lua function that checks a message */

/* A malformed message: says what is wrong, with the message escaped, and aborts. */
static void fail(const char *why, const void *msg, size_t n)
{
	fprintf(stderr, "%s: ", why);
	for (size_t i = 0; i < n; i++) {
		unsigned char c = ((const unsigned char *)msg)[i];

		fprintf(stderr, c >= 0x20 && c < 0x7f ? "%c" : "\\x%02x", c);
	}
	fprintf(stderr, "\n");
	abort();
}

/* One message for `to` through the Lua check. */
static void check_message(const char *to, const void *msg, size_t n)
{
	lua_rawgeti(L, LUA_REGISTRYINDEX, check_ref);
	lua_pushstring(L, to);
	lua_pushlstring(L, msg, n);
	lua_call(L, 2, 1);
	if (!lua_isnil(L, -1))
		fail(lua_tostring(L, -1), msg, n);
	lua_pop(L, 1);
}

struct ca_ws *__wrap_ca__ws_check(lua_State *l, int idx);
int __wrap_ca__ws_send(struct ca_ws *ws, const void *data, size_t len, int kind, const char **err);

struct ca_ws *__wrap_ca__ws_check(lua_State *l, int idx)
{
	return lua_tointeger(l, idx) == 1 ? &phone : &model;
}

/* The model gets text messages; the phone text (clear) or frames written by the bridge. */
int __wrap_ca__ws_send(struct ca_ws *ws, const void *data, size_t len, int kind, const char **err)
{
	const unsigned char *p = data, *end = p + len;

	(void)err;
	if (ws == &model) {
		if (kind != LWS_WRITE_TEXT)
			fail("the model got a message that is not text", data, len);
		else
			check_message("model", data, len);
		return 0;
	}
	if (kind == LWS_WRITE_TEXT) {
		check_message("phone", data, len);
		return 0;
	}
	while (p < end) {
		size_t n, h = 2;

		if (end - p < 2 || p[0] != 0x81 || (p[1] & 0x80)) {
			fail("not an unmasked final text frame", p, (size_t)(end - p));
			return 0;
		}
		n = p[1] & 0x7f;
		if (n == 126) {
			h = 4;
			n = end - p >= 4 ? (size_t)p[2] << 8 | p[3] : 0;
			if (n < 126)
				fail("a 16-bit length under 126", p, (size_t)(end - p));
		} else if (n == 127) {
			h = 10;
			n = 0;
			for (int i = 2; i < 10 && p + i < end; i++)
				n = n << 8 | p[i];
			if (n < 65536)
				fail("a 64-bit length under 65536", p, (size_t)(end - p));
		}
		if ((size_t)(end - p) < h || (size_t)(end - p) - h < n) {
			fail("a frame longer than the write", p, (size_t)(end - p));
			return 0;
		}
		check_message("phone", p + h, n);
		p += h + n;
	}
	return 0;
}

static const char *const FORMATS[] = {"audio/pcmu", "audio/pcm", "audio/pcma"};

static void setup(void)
{
	L = luaL_newstate();
	luaL_openlibs(L);
	model.is_client = 1;
	luaL_requiref(L, "callagent.core.bridge", luaopen_callagent_core_bridge, 0);
	lua_pop(L, 1);
	/* The bridge's warnings about bad payloads, thousands here: errors only. */
	luaL_requiref(L, "callagent.core.log", luaopen_callagent_core_log, 0);
	lua_getfield(L, -1, "level");
	lua_pushinteger(L, CA_LOG_ERROR);
	lua_call(L, 1, 0);
	lua_pop(L, 1);
	/* check(to, msg) -> nil, or what is wrong: tests/lib/bridge_check.lua. */
	luaL_requiref(L, "cjson", luaopen_cjson, 0);
	luaL_requiref(L, "callagent.crypto", luaopen_callagent_crypto, 0);
	lua_pop(L, 2);
	if (luaL_dofile(L, BRIDGE_CHECK) != LUA_OK) {
		fprintf(stderr, "%s\n", lua_tostring(L, -1));
		exit(2);
	}
	lua_pushstring(L, SID);
	lua_call(L, 1, 1);
	check_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

/* bridge.new(phone, model, opts) left on the stack. */
static void new_bridge(int out_fmt, int in_pcma, int ready, int with_model)
{
	lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
	lua_getfield(L, -1, "callagent.core.bridge");
	lua_getfield(L, -1, "new");
	lua_remove(L, -2);
	lua_remove(L, -2);
	lua_pushinteger(L, 1);
	if (with_model)
		lua_pushinteger(L, 2);
	else
		lua_pushnil(L);
	lua_createtable(L, 0, 4);
	lua_pushstring(L, SID);
	lua_setfield(L, -2, "stream_sid");
	lua_pushstring(L, FORMATS[out_fmt]);
	lua_setfield(L, -2, "output");
	lua_pushstring(L, in_pcma ? "audio/pcma" : "audio/pcmu");
	lua_setfield(L, -2, "input");
	lua_pushboolean(L, ready);
	lua_setfield(L, -2, "ready");
	lua_call(L, 3, 1);
}

/* b:name(model) for the bridge at the top; results dropped. */
static void link_model(void)
{
	lua_getfield(L, -1, "link_model");
	lua_pushvalue(L, -2);
	lua_pushinteger(L, 2);
	lua_call(L, 2, 0);
}

/* b:name() for the bridge at the top; results dropped. */
static void method(const char *name)
{
	lua_getfield(L, -1, name);
	lua_pushvalue(L, -2);
	lua_call(L, 1, 0);
}

/* A message to a tap, from a copy of exactly its bytes (so ASan sees any overread). */
static void deliver(struct ca_ws *ws, const void *msg, size_t n)
{
	char *copy = malloc(n ? n : 1);

	memcpy(copy, msg, n);
	if (ws->tap)
		ws->tap(ws->tap_ctx, ws, copy, n);
	free(copy);
}

static void run_one(const unsigned char *data, size_t size)
{
	if (size == 0)
		return;
	new_bridge(data[0] % 3, data[0] >> 2 & 1, data[0] >> 3 & 1, !(data[0] & 16));
	data++;
	size--;
	while (size > 0) {
		const unsigned char *sep = memchr(data, 0xFF, size);
		size_t n = sep ? (size_t)(sep - data) : size;

		if (n > 0) {
			deliver(data[0] & 1 ? &phone : &model, data + 1, n - 1);
			if (data[0] & 2)
				method("model_ready");
			if (data[0] & 4)
				method("clear");
			if (data[0] & 8)
				method("item");
			if (data[0] & 16)
				link_model();
		}
		if (sep == NULL)
			break;
		data += n + 1;
		size -= n + 1;
	}
	method("close");
	lua_pop(L, 1);
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
	if (L == NULL)
		setup();
	run_one(data, size);
	return 0;
}
