/*
 * test_wsconn.c - unit tests of the WebSocket connection's reading
 * (src/wsconn.c): the UTF-8 check of text messages (ca__utf8_check, RFC
 * 3629 and RFC 6455 8.1) on fixed vectors, split at every point, and
 * against a byte-by-byte check over ca__utf8_len on random input; and the
 * frame parser (ca__ws_parse) on a connection with a C tap: text that is
 * not UTF-8 never reaches the tap, and a tap that pauses the connection
 * leaves the rest of the read held.
 * Prints the speed of the check and of a whole text frame's parse on
 * audio-path sizes (300 and 1000 bytes of ASCII JSON) as "# " diagnostics.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "wsconn.h"
#include "tap.h"

/* The check as it was, one ca__utf8_len call a character: the reference. */
static int ref_valid(const unsigned char *p, size_t n)
{
	for (size_t i = 0, len; i < n; i += len)
		if ((len = ca__utf8_len(p + i, n - i)) == 0)
			return 0;
	return 1;
}

/* A whole message in one piece: 0, -1 or -2 as ca__utf8_check. */
static int check_whole(const unsigned char *p, size_t n)
{
	struct ca_utf8 st = {{0}, 0};
	size_t at;

	return ca__utf8_check(&st, p, n, 1, &at);
}

/*
 * The message in pieces cut at a and b (a <= b <= n; empty pieces allowed):
 * the verdict, and in *piece which piece said it (0, 1, 2).
 */
static int check_split(const unsigned char *p, size_t n, size_t a, size_t b, int *piece)
{
	struct ca_utf8 st = {{0}, 0};
	size_t at;
	size_t cut[4] = {0, a, b, n};
	int r = 0;

	for (int k = 0; k < 3; k++) {
		r = ca__utf8_check(&st, p + cut[k], cut[k + 1] - cut[k], k == 2, &at);
		if (r != 0) {
			*piece = k;
			return r;
		}
	}
	*piece = 2;
	return r;
}

struct vec {
	const char *s;
	int want;		/* 0 UTF-8, -1 not, -2 ends inside a sequence */
	const char *what;
};

static const struct vec vecs[] = {
	{"", 0, "empty"},
	{"{\"event\":\"media\",\"media\":{\"payload\":\"f39/fw==\"}}", 0, "ASCII JSON"},
	{"h\xc3\xa9llo \xf0\x9f\x98\x80 \xe2\x82\xac \xdf\xbf \xef\xbf\xbf \xf4\x8f\xbf\xbf", 0, "2-, 3- and 4-byte characters, the last ones of each length"},
	{"\xc2\x80\xe0\xa0\x80\xf0\x90\x80\x80\xed\x9f\xbf\xee\x80\x80", 0, "the first ones, and around the surrogates"},
	{"abc\x80", -1, "a lone continuation byte"},
	{"\xc0\xaf", -1, "overlong 2-byte form"},
	{"\xc1\xbf", -1, "overlong 2-byte form (C1)"},
	{"\xe0\x80\xaf", -1, "overlong 3-byte form"},
	{"\xf0\x80\x80\xaf", -1, "overlong 4-byte form"},
	{"x\xed\xa0\x80y", -1, "a surrogate (U+D800)"},
	{"x\xed\xbf\xbfy", -1, "a surrogate (U+DFFF)"},
	{"\xf4\x90\x80\x80", -1, "past U+10FFFF"},
	{"\xf5\x80\x80\x80", -1, "F5 starts nothing"},
	{"abc\xff", -1, "FF"},
	{"\xc3(", -1, "a lead byte and no continuation"},
	{"\xe2\x82(", -1, "a 3-byte sequence cut by ASCII"},
	{"01234567890123456789012345678901234567\xfe", -1, "FE after 38 ASCII bytes"},
	{"a\xe2\x82", -2, "ends inside a 3-byte sequence"},
	{"a\xf0\x9f\x98", -2, "ends inside a 4-byte sequence"},
	{"\xc3", -2, "only a lead byte"},
	{"\xe0\xa0", -2, "E0 A0, cut"},
	{"\xe0\x80", -1, "E0 80: starts no sequence (overlong), even cut"},
	{"\xed\xa0", -1, "ED A0: a surrogate, even cut"},
	{"\xf4\x90", -1, "F4 90: past U+10FFFF, even cut"},
};

static void test_vectors(void)
{
	for (size_t v = 0; v < sizeof vecs / sizeof vecs[0]; v++) {
		const unsigned char *p = (const unsigned char *)vecs[v].s;
		size_t n = strlen(vecs[v].s);
		int bad_splits = 0, piece;

		CHECK(check_whole(p, n) == vecs[v].want, "whole: %s (%d)", vecs[v].what, check_whole(p, n));
		if (vecs[v].want != -2)
			CHECK(ref_valid(p, n) == (vecs[v].want == 0), "the reference agrees: %s", vecs[v].what);
		for (size_t a = 0; a <= n; a++)
			for (size_t b = a; b <= n; b++)
				bad_splits += check_split(p, n, a, b, &piece) != vecs[v].want;
		CHECK(bad_splits == 0, "in three pieces, cut at every two points: %s (%d wrong)", vecs[v].what, bad_splits);
	}
}

/*
 * Bytes that start no sequence fail the piece they are in, not the last
 * one; a sequence cut short fails at the end only. The 1007 of a message
 * whose last fragment never comes is not waited for.
 */
static void test_fails_early(void)
{
	const unsigned char bad[] = "valid start \xc0\xaf and more";
	const unsigned char cut[] = "abc\xe2\x82";
	struct ca_utf8 st = {{0}, 0};
	size_t at;

	CHECK(ca__utf8_check(&st, bad, 20, 0, &at) == -1 && at == 12,
	      "an overlong form fails its (first, not last) piece, at its offset (%zu)", at);
	CHECK(st.len == 0, "and leaves nothing behind");
	CHECK(ca__utf8_check(&st, cut, 5, 0, &at) == 0 && st.len == 2, "a cut sequence waits for the next piece");
	CHECK(ca__utf8_check(&st, (const unsigned char *)"", 0, 0, &at) == 0 && st.len == 2, "an empty piece changes nothing");
	CHECK(ca__utf8_check(&st, (const unsigned char *)"", 0, 1, &at) == -2 && st.len == 0,
	      "an empty last piece after it: the message ends inside the sequence");
	CHECK(ca__utf8_check(&st, cut, 4, 0, &at) == 0 && st.len == 1, "E2 alone waits");
	CHECK(ca__utf8_check(&st, (const unsigned char *)"\x82", 1, 0, &at) == 0 && st.len == 2, "E2 82 waits");
	CHECK(ca__utf8_check(&st, (const unsigned char *)"\xac!", 2, 1, &at) == 0 && st.len == 0,
	      "E2 82 AC completed across three pieces");
	CHECK(ca__utf8_check(&st, (const unsigned char *)"\xed", 1, 0, &at) == 0 &&
	      ca__utf8_check(&st, (const unsigned char *)"\xa0\x80", 2, 0, &at) == -1,
	      "a surrogate split after its lead byte fails at its second byte, before the last piece");
}

/*
 * Where a failure is: the first byte of the bad sequence, counted from the
 * bytes the last piece left held, so that one begun in an earlier piece is
 * not placed at the start of this one.
 */
static void test_fail_offset(void)
{
	struct ca_utf8 st = {{0}, 0};
	size_t at = 99;

	CHECK(ca__utf8_check(&st, (const unsigned char *)"x\xed", 2, 0, &at) == 0 && st.len == 1 &&
	      ca__utf8_check(&st, (const unsigned char *)"\xa0\x80", 2, 1, &at) == -1 && at == 0,
	      "a surrogate split after its lead byte: at its lead byte, held from the piece before (%zu)", at);
	at = 99;
	CHECK(ca__utf8_check(&st, (const unsigned char *)"a\xe2", 2, 0, &at) == 0 &&
	      ca__utf8_check(&st, (const unsigned char *)"\x82", 1, 1, &at) == -2 && at == 0,
	      "a message ending inside a sequence begun a piece before: at its lead byte (%zu)", at);
	at = 99;
	CHECK(ca__utf8_check(&st, (const unsigned char *)"\xe2", 1, 0, &at) == 0 &&
	      ca__utf8_check(&st, (const unsigned char *)"\x82\xacz\xc0\xaf", 5, 0, &at) == -1 && at == 4,
	      "a held sequence completed, then bytes that start none: counted from the held byte (%zu)", at);
	at = 99;
	CHECK(ca__utf8_check(&st, (const unsigned char *)"\xe2\x82", 2, 0, &at) == 0 &&
	      ca__utf8_check(&st, (const unsigned char *)"\xac\xf0\x9f", 3, 1, &at) == -2 && at == 3,
	      "a held sequence completed, then the message ends inside the next one (%zu)", at);
	at = 99;
	CHECK(ca__utf8_check(&st, (const unsigned char *)"ok\xf0\x9f", 4, 1, &at) == -2 && at == 2,
	      "a whole message ending inside a sequence: at its lead byte (%zu)", at);
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static unsigned next_rand(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (unsigned)(rng >> 32);
}

/*
 * Random text near the edges: mostly ASCII and valid characters of every
 * length, now and then a byte of any value; whole and split at random
 * points, the verdict is the reference's (a cut sequence at the end is
 * "not UTF-8" for it).
 */
static void test_random(void)
{
	static const char *chars[] = {"a", "{", "\x7f", "\xc3\xa9", "\xdf\xbf", "\xe2\x82\xac", "\xed\x9f\xbf",
		"\xef\xbf\xbf", "\xf0\x9f\x98\x80", "\xf4\x8f\xbf\xbf", "abcdefghijklmnop"};
	unsigned char s[96];
	int wrong_whole = 0, wrong_split = 0, valid = 0, tries = 300000;

	for (int t = 0; t < tries; t++) {
		size_t n = 0;

		while (n < 64) {
			unsigned r = next_rand();

			if (r % 23 == 0) {
				s[n++] = (unsigned char)(r >> 8);
			} else {
				const char *c = chars[(r >> 8) % (sizeof chars / sizeof chars[0])];
				size_t l = strlen(c);

				memcpy(s + n, c, l);
				n += l;
			}
			if ((r >> 20) % 9 == 0)
				break;
		}
		if (next_rand() % 7 == 0 && n > 1)
			n -= 1 + next_rand() % (n < 3 ? n - 1 : 3);	/* often cut inside a sequence */
		{
			int ref = ref_valid(s, n), piece;
			size_t a = n ? next_rand() % (n + 1) : 0, b = a + (n - a ? next_rand() % (n - a + 1) : 0);

			valid += ref;
			wrong_whole += (check_whole(s, n) == 0) != ref;
			wrong_split += (check_split(s, n, a, b, &piece) == 0) != ref;
		}
	}
	CHECK(wrong_whole == 0, "%d random strings (%d of them UTF-8): the reference's verdict whole (%d wrong)", tries,
	      valid, wrong_whole);
	CHECK(wrong_split == 0, "and in three pieces cut at random (%d wrong)", wrong_split);
}

/* ---- the parser, on a connection with a C tap ---- */

static int tapped;
static size_t tapped_len;

static int count_tap(void *ctx, struct ca_ws *ws, const char *data, size_t len)
{
	(void)ctx;
	(void)data;
	tapped++;
	tapped_len = len;
	if (ws->tap_ctx == (void *)1)
		ws->paused = 1;		/* as conn:pause() in a handler */
	return 1;
}

/* A client connection (frames unmasked), open, whose text goes to count_tap. */
static void init_conn(struct ca_ws *ws)
{
	memset(ws, 0, sizeof *ws);
	ws->state = CA_WS_OPEN;
	ws->is_client = 1;
	ws->max_message = 1 << 20;
	ws->tap = count_tap;
}

/* A whole unmasked text frame of p[0..n) at out; its length. */
static size_t text_frame(unsigned char *out, const char *p, size_t n)
{
	size_t h = ca__ws_header(out, 1, n, 0);

	memcpy(out + h, p, n);
	return h + n;
}

static void test_parse(void)
{
	struct ca_ws ws;
	unsigned char buf[256];
	size_t n = 0;

	init_conn(&ws);
	tapped = 0;
	n += text_frame(buf + n, "one", 3);
	n += text_frame(buf + n, "t\xc3\xa9", 3);
	n += text_frame(buf + n, "bad \xff", 5);
	n += text_frame(buf + n, "after", 5);
	CHECK(ca__ws_parse(&ws, buf, n) == 0, "parse");
	CHECK(tapped == 2, "two UTF-8 messages at the tap, not the bad one nor what follows (%d)", tapped);
	CHECK(ws.fr.broken == 1, "the stream is broken off at the bad message");

	/* Fragments: the message reaches the tap whole, checked across the cut. */
	init_conn(&ws);
	tapped = 0;
	n = 0;
	buf[n++] = 0x01;	/* text, not FIN */
	buf[n++] = 2;
	buf[n++] = 'a';
	buf[n++] = 0xe2;
	buf[n++] = 0x80;	/* continuation, FIN */
	buf[n++] = 2;
	buf[n++] = 0x82;
	buf[n++] = 0xac;
	CHECK(ca__ws_parse(&ws, buf, n) == 0 && tapped == 1 && tapped_len == 4 && !ws.fr.broken,
	      "a euro sign cut across two fragments arrives whole");
	free(ws.rx);

	/* A tap that pauses: the rest of the read is held, as it came. */
	init_conn(&ws);
	ws.tap_ctx = (void *)1;
	tapped = 0;
	n = 0;
	n += text_frame(buf + n, "m1", 2);
	n += text_frame(buf + n, "m2", 2);
	n += text_frame(buf + n, "m3", 2);
	CHECK(ca__ws_parse(&ws, buf, n) == 0 && tapped == 1, "paused by the first message: one at the tap");
	CHECK(ws.held_len == 8 && memcmp(ws.held, buf + 4, 8) == 0, "the other two frames held, as read (%zu bytes)",
	      ws.held_len);
	CHECK(ca__ws_parse(&ws, buf, 4) == 0 && tapped == 1 && ws.held_len == 12,
	      "a later read while held goes behind them, not to the tap");
	ws.paused = 0;
	ws.tap_ctx = NULL;
	{
		unsigned char *p = ws.held;
		size_t len = ws.held_len;

		ws.held = NULL;
		ws.held_len = 0;
		CHECK(ca__ws_parse(&ws, p, len) == 0 && tapped == 4, "resumed: the three held messages, in order");
		free(p);
	}
}

/* ---- speed ---- */

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* An ASCII JSON message like Twilio's media or a model delta, n bytes. */
static void json_message(char *out, size_t n)
{
	static const char head[] = "{\"event\":\"media\",\"sequenceNumber\":\"4\",\"media\":{\"track\":\"inbound\","
		"\"chunk\":\"3\",\"timestamp\":\"5\",\"payload\":\"";
	static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	size_t h = strlen(head);

	memcpy(out, head, h);
	for (size_t i = h; i < n - 4; i++)
		out[i] = b64[next_rand() % 64];
	memcpy(out + n - 4, "\"}}\n", 4);
}

/* ns per call of op on an n-byte message, over about 30 ms: 0 ca__utf8_check, 1 the reference, 2 a frame's parse. */
static double bench(size_t n, int op)
{
	static char msg[1024];
	static unsigned char frame[1040];
	struct ca_ws ws;
	size_t flen;
	long sink = 0, iters = 0;
	double t0, t;

	json_message(msg, n);
	flen = text_frame(frame, msg, n);
	init_conn(&ws);
	t0 = now_ns();
	do {
		for (int i = 0; i < 1000; i++) {
			if (op == 0)
				sink += check_whole((const unsigned char *)msg, n) == 0;
			else if (op == 1)
				sink += ref_valid((const unsigned char *)msg, n);
			else
				sink += ca__ws_parse(&ws, frame, flen) == 0;
		}
		iters += 1000;
		t = now_ns();
	} while (t - t0 < 30e6);
	if (sink != iters)
		printf("# (unexpected result)\n");
	return (t - t0) / (double)iters;
}

static void bench_utf8(void)
{
	const size_t sizes[] = {300, 1000};

	for (int i = 0; i < 2; i++) {
		double fast = bench(sizes[i], 0), ref = bench(sizes[i], 1), parse = bench(sizes[i], 2);

		printf("# UTF-8 check of a %zu-byte ASCII JSON message: %.0f ns (%.1f GB/s); "
		       "a ca__utf8_len call a byte: %.0f ns; the whole frame's parse with it, to a C tap: %.0f ns\n",
		       sizes[i], fast, (double)sizes[i] / fast, ref, parse);
	}
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);	/* the WARN lines on stderr between, not inside, the points */
	test_vectors();
	test_fails_early();
	test_fail_offset();
	test_random();
	test_parse();
	bench_utf8();
	return tap_done();
}
