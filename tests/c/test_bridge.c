/*
 * test_bridge.c - the per-frame audio path (src/bridge.c) on hostile input.
 *
 * The bridge reads the few JSON fields it needs from each phone and model
 * message without a parser, and writes the messages for the other side by
 * hand. Whatever comes in, everything it writes must be well-formed JSON of
 * exactly the expected shape: an append with base64 audio to the model;
 * media (base64), mark (digits) and clear to the phone, in well-formed
 * unmasked frames. This test links the real bridge object; the two
 * connections are stand-ins (the linker's --wrap of ca__ws_check and
 * ca__ws_send), and every message the bridge sends is checked with cjson,
 * key by key.
 *
 * It runs hand-written cases, then mutations of message sequences (a fixed
 * seed, so a failure reproduces; TEST_BRIDGE_RUNS sets how many). Built with
 * clang and -DCA_FUZZ it is a libFuzzer target instead (make fuzz).
 *
 * One input: byte 0 is the set-up (bits 0-1 output format pcmu/pcm/pcma,
 * bit 2 input pcma, bit 3 model ready from the start); then messages
 * separated by 0xFF, each led by a byte: bit 0 phone (else model), then
 * after it bit 1 model_ready(), bit 2 clear(), bit 3 item().
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lualib.h>

#include "tap.h"
#include "wsconn.h"

int luaopen_cjson(lua_State *L);
int luaopen_callagent_crypto(lua_State *L);
int luaopen_callagent_core_bridge(lua_State *L);

#define SID "MZ0123456789abcdef0123456789abcdef"

static lua_State *L;
static struct ca_ws phone, model;
static int check_ref;		/* the Lua function that checks a message */
static long sent_model, sent_phone, failures;
static char first_failure[512];

static void fail(const char *why, const void *msg, size_t n)
{
	if (failures++ == 0) {
		size_t k = snprintf(first_failure, sizeof first_failure, "%s: ", why);

		for (size_t i = 0; i < n && k + 5 < sizeof first_failure; i++) {
			unsigned char c = ((const unsigned char *)msg)[i];

			k += (size_t)snprintf(first_failure + k, sizeof first_failure - k,
					      c >= 0x20 && c < 0x7f ? "%c" : "\\x%02x", c);
		}
	}
#ifdef CA_FUZZ
	fprintf(stderr, "%s\n", first_failure);
	abort();
#endif
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
		sent_model++;
		if (kind != LWS_WRITE_TEXT)
			fail("the model got a message that is not text", data, len);
		else
			check_message("model", data, len);
		return 0;
	}
	if (kind == LWS_WRITE_TEXT) {
		sent_phone++;
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
		sent_phone++;
		check_message("phone", p + h, n);
		p += h + n;
	}
	return 0;
}

/*
 * check(to, msg) -> nil, or what is wrong. Exact key sets: a key smuggled in
 * through a field's value shows up as one too many.
 */
static const char CHECK_LUA[] =
	"local cjson, b64dec, SID = ...\n"
	"local function keys(t)\n"
	"  if type(t) ~= 'table' then return '' end\n"
	"  local k = {}\n"
	"  for name in pairs(t) do k[#k + 1] = tostring(name) end\n"
	"  table.sort(k)\n"
	"  return table.concat(k, ',')\n"
	"end\n"
	"local function b64(s) return type(s) == 'string' and #s > 0 and b64dec(s) ~= nil end\n"
	"return function(to, msg)\n"
	"  if msg:find('[%z\\1-\\31]') then return 'a control character' end\n"
	"  local ok, v = pcall(cjson.decode, msg)\n"
	"  if not ok or type(v) ~= 'table' then return 'not a JSON object' end\n"
	"  local k = keys(v)\n"
	"  if to == 'model' then\n"
	"    if k ~= 'audio,type' or v.type ~= 'input_audio_buffer.append' then return 'not an append' end\n"
	"    if not b64(v.audio) then return 'append audio not base64' end\n"
	"    return nil\n"
	"  end\n"
	"  if v.streamSid ~= SID then return 'wrong streamSid' end\n"
	"  if v.event == 'media' then\n"
	"    if k ~= 'event,media,streamSid' or keys(v.media) ~= 'payload' then return 'media keys' end\n"
	"    if not b64(v.media.payload) then return 'media payload not base64' end\n"
	"  elseif v.event == 'mark' then\n"
	"    if k ~= 'event,mark,streamSid' or keys(v.mark) ~= 'name' then return 'mark keys' end\n"
	"    if type(v.mark.name) ~= 'string' or not v.mark.name:match('^%d+$') then return 'mark name' end\n"
	"  elseif v.event == 'clear' then\n"
	"    if k ~= 'event,streamSid' then return 'clear keys' end\n"
	"  else\n"
	"    return 'unknown event'\n"
	"  end\n"
	"  return nil\n"
	"end\n";

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
	if (luaL_loadstring(L, CHECK_LUA) != LUA_OK) {
		fprintf(stderr, "%s\n", lua_tostring(L, -1));
		exit(2);
	}
	luaopen_cjson(L);
	luaopen_callagent_crypto(L);
	lua_getfield(L, -1, "base64_decode");
	lua_remove(L, -2);
	lua_pushstring(L, SID);
	lua_call(L, 3, 1);
	check_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

/* bridge.new(phone, model, opts) left on the stack. */
static void new_bridge(int out_fmt, int in_pcma, int ready)
{
	lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
	lua_getfield(L, -1, "callagent.core.bridge");
	lua_getfield(L, -1, "new");
	lua_remove(L, -2);
	lua_remove(L, -2);
	lua_pushinteger(L, 1);
	lua_pushinteger(L, 2);
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

/* b:name() for the bridge at the top; results dropped. */
static void method(const char *name)
{
	lua_getfield(L, -1, name);
	lua_pushvalue(L, -2);
	lua_call(L, 1, 0);
}

/* b:stats()[field] for the bridge at the top. */
static lua_Integer bstat(const char *field)
{
	lua_Integer v;

	lua_getfield(L, -1, "stats");
	lua_pushvalue(L, -2);
	lua_call(L, 1, 1);
	lua_getfield(L, -1, field);
	v = lua_tointeger(L, -1);
	lua_pop(L, 2);
	return v;
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

static void deliver_str(struct ca_ws *ws, const char *msg)
{
	deliver(ws, msg, strlen(msg));
}

static void run_one(const unsigned char *data, size_t size)
{
	if (size == 0)
		return;
	new_bridge(data[0] % 3, data[0] >> 2 & 1, data[0] >> 3 & 1);
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
		}
		if (sep == NULL)
			break;
		data += n + 1;
		size -= n + 1;
	}
	method("close");
	lua_pop(L, 1);
}

#ifdef CA_FUZZ

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
	if (L == NULL)
		setup();
	run_one(data, size);
	return 0;
}

#else

/* Messages as they come; each follows its lead byte (see the header). */
#define MEDIA(payload) "{\"event\":\"media\",\"streamSid\":\"" SID "\",\"media\":{\"track\":\"inbound\"," \
	"\"chunk\":\"1\",\"timestamp\":\"0\",\"payload\":\"" payload "\"}}"
#define DELTA(item, delta) "{\"type\":\"response.output_audio.delta\",\"response_id\":\"resp_1\"," \
	"\"item_id\":\"" item "\",\"output_index\":0,\"content_index\":0,\"delta\":\"" delta "\"}"
#define MARK(name) "{\"event\":\"mark\",\"streamSid\":\"" SID "\",\"mark\":{\"name\":\"" name "\"}}"
#define PHONE "\xff\x01"		/* a message from the phone */
#define MODEL "\xff\x10"		/* from the model */
#define MODEL_CLEAR "\xff\x14"	/* from the model, then b:clear() */
#define MODEL_ITEM "\xff\x18"		/* from the model, then b:item() */
#define PHONE_READY "\xff\x03"	/* from the phone, then b:model_ready() */
/* 160 bytes of mu-law (0x7F), as Twilio sends a 20 ms frame. */
#define B64_160 "f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/" \
	"f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/" \
	"f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/fw=="

/*
 * Message sequences to start the mutations from, covering every branch of
 * the taps; the first byte is the set-up, then an empty first message.
 */
static const char *const SEEDS[] = {
	"\x08" PHONE MEDIA(B64_160) MODEL DELTA("item_1", B64_160) MODEL DELTA("item_1", B64_160)
		PHONE MARK("1") MODEL "{\"type\":\"response.output_audio.done\",\"item_id\":\"item_1\"}"
		PHONE MARK("2"),
	"\x10" PHONE MEDIA(B64_160) PHONE MEDIA("f39\\/f39/") PHONE_READY MEDIA(B64_160)
		MODEL DELTA("item_1", "AAAAAAAAAAAAAAAA") MODEL_CLEAR DELTA("item_2", "AAAA") PHONE MARK("1"),
	"\x0d" MODEL DELTA("a", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
		MODEL_ITEM DELTA("a", "AAEAAgADAAQABQAGAAcACA==") MODEL "{\"type\":\"response.done\"}",
	"\x0e" PHONE MEDIA(B64_160) MODEL DELTA("x", "1NTU1A==") PHONE MARK("1") MODEL_CLEAR DELTA("x", "1NTU")
		MODEL "{\"type\":\"response.audio.delta\",\"delta\":\"AAAA\",\"item_id\":\"y\"}",
	"\x08" PHONE " { \"media\" : { \"payload\" : \"" B64_160 "\" }, \"event\" : \"media\" }"
		PHONE "{\"note\":\"\\\"event\\\": \\\"mark\\\"\",\"mark\":{\"name\":\"7\"},\"event\":\"mark\"}",
	"\x08" PHONE "{\"event\":\"start\",\"start\":{}}" MODEL "{\"type\":\"session.updated\"}"
		PHONE "{\"event\":\"media\",\"media\":{\"payload\":12}}" PHONE "[\"event\",\"media\"]",
};

/* JSON's troublemakers, for insertions. */
static const char NASTY[] = "\"\\{}[]:,= /\x00\x01\n\x7f\xc3\xff";

static uint64_t rng = 0x2545f4914f6cdd1du;

static uint32_t rnd(uint32_t n)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (uint32_t)((rng >> 16) % n);
}

/* A random edit of buf (len bytes, room for cap); returns the new length. */
static size_t mutate(unsigned char *buf, size_t len, size_t cap)
{
	size_t at = len ? rnd((uint32_t)len) : 0, n;

	switch (rnd(6)) {
	case 0:		/* a byte replaced */
		if (len)
			buf[at] = (unsigned char)rnd(256);
		return len;
	case 1:		/* a troublemaker inserted */
	case 2:
		if (len + 1 > cap)
			return len;
		memmove(buf + at + 1, buf + at, len - at);
		buf[at] = (unsigned char)NASTY[rnd(sizeof NASTY - 1)];
		return len + 1;
	case 3:		/* a range deleted */
		n = rnd(16) + 1;
		if (at + n > len)
			n = len - at;
		memmove(buf + at, buf + at + n, len - at - n);
		return len - n;
	case 4:		/* a range repeated */
		n = rnd(24) + 1;
		if (at + n > len)
			n = len - at;
		if (len + n > cap)
			return len;
		memmove(buf + at + n, buf + at, len - at);
		return len + n;
	default:	/* cut short */
		return at;
	}
}

static void hand_written(void)
{
	static const char inject[] = "AAAA\\\",\\\"type\\\":\\\"session.update\\\",\\\"session\\\":"
		"{\\\"instructions\\\":\\\"pwned\\\"},\\\"x\\\":\\\"";
	char msg[1024];
	int n;

	/* A phone payload that would close the append's string and add keys. */
	new_bridge(0, 0, 1);
	sent_model = failures = 0;
	n = snprintf(msg, sizeof msg, "{\"event\":\"media\",\"media\":{\"payload\":\"%s\"}}", inject);
	deliver(&phone, msg, (size_t)n);
	CHECK(sent_model == 0 && bstat("bad_in") == 1, "a phone payload with escaped quotes is dropped, "
	      "not written into an append (%ld sent)", sent_model);
	n = snprintf(msg, sizeof msg, "{\"event\":\"media\",\"media\":{\"payload\":\"f39\\/f39/\"}}");
	deliver(&phone, msg, (size_t)n);
	CHECK(sent_model == 1 && failures == 0 && bstat("appended") == 1,
	      "a payload with \\/ escapes is forwarded (%s)", first_failure);
	method("close");
	lua_pop(L, 1);

	/* A model delta that would end the media message and start another. */
	new_bridge(0, 0, 1);
	sent_phone = failures = 0;
	n = snprintf(msg, sizeof msg, "{\"type\":\"response.output_audio.delta\",\"item_id\":\"i1\","
		     "\"delta\":\"%s\"}", B64_160);
	deliver(&model, msg, (size_t)n);
	n = snprintf(msg, sizeof msg, "{\"type\":\"response.output_audio.delta\",\"item_id\":\"i2\","
		     "\"delta\":\"AAAA\\\"}},{\\\"event\\\":\\\"clear\\\",\\\"x\\\":{\\\"y\\\":\\\"\"}");
	deliver(&model, msg, (size_t)n);
	CHECK(sent_phone == 1 && bstat("bad_out") == 1 && bstat("media_out") == 1,
	      "a model delta with escaped quotes is dropped (%ld sent)", sent_phone);
	lua_getfield(L, -1, "item");
	lua_pushvalue(L, -2);
	lua_call(L, 1, 1);
	CHECK(lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), "i1") == 0,
	      "a dropped delta does not become the current item (%s)", lua_tostring(L, -1));
	lua_pop(L, 1);
	method("close");
	lua_pop(L, 1);

	/* Not base64 in the other formats: the decoders refuse it. */
	for (int fmt = 1; fmt <= 2; fmt++) {
		new_bridge(fmt, 1, 1);
		sent_phone = sent_model = 0;
		deliver_str(&phone, "{\"event\":\"media\",\"media\":{\"payload\":\"AA\\\"A\"}}");
		deliver_str(&model, "{\"type\":\"response.output_audio.delta\",\"item_id\":\"i\",\"delta\":\"A=AA\"}");
		CHECK(sent_phone == 0 && sent_model == 0 && bstat("bad_in") == 1 && bstat("bad_out") == 1,
		      "%s output, pcma input: bad payloads counted and dropped", FORMATS[fmt]);
		method("close");
		lua_pop(L, 1);
	}
}

int main(void)
{
	const char *env = getenv("TEST_BRIDGE_RUNS");
	long runs = env ? atol(env) : 100000, sent = 0;
	size_t nseeds = sizeof SEEDS / sizeof SEEDS[0];
	static unsigned char buf[8192];

	setup();
	hand_written();

	failures = 0;
	first_failure[0] = '\0';
	for (size_t i = 0; i < nseeds; i++)
		run_one((const unsigned char *)SEEDS[i], strlen(SEEDS[i]));
	CHECK(failures == 0 && sent_model > 0 && sent_phone > 0,
	      "the seeds make well-formed messages both ways (%ld to the model, %ld to the phone) %s",
	      sent_model, sent_phone, first_failure);

	sent_model = sent_phone = 0;
	for (long r = 0; r < runs; r++) {
		const char *seed = SEEDS[rnd((uint32_t)nseeds)];
		size_t len = strlen(seed);
		int edits = (int)rnd(6) + 1;

		memcpy(buf, seed, len);
		for (int e = 0; e < edits; e++)
			len = mutate(buf, len, sizeof buf);
		run_one(buf, len);
	}
	sent = sent_model + sent_phone;
	CHECK(failures == 0, "%ld mutated sequences: every message written is well-formed "
	      "(%ld to the model, %ld to the phone; %ld wrong) %s",
	      runs, sent_model, sent_phone, failures, first_failure);
	CHECK(sent > runs, "the mutations still reach the writers (%ld messages)", sent);

	luaL_unref(L, LUA_REGISTRYINDEX, check_ref);
	lua_close(L);
	return tap_done();
}

#endif
