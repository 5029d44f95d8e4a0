/*
 * test_crypto.c - unit tests of callagent.crypto: the hash and MAC bindings
 * against the RFC 2202, RFC 4231 and FIPS 180 vectors (called through a bare
 * Lua state, so the bindings are what is tested), and the C base64 of
 * crypto.h against RFC 4648, OpenSSL's encoder, and malformed input.
 * Prints the speed of base64 on audio-frame sizes as "# " diagnostics.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/evp.h>

#include "ca.h"
#include "crypto.h"
#include "tap.h"

static lua_State *L;

static char *to_hex(const unsigned char *p, size_t n)
{
	static char buf[2 * 1024 + 1];
	static const char digits[] = "0123456789abcdef";

	for (size_t i = 0; i < n && i < 1024; i++) {
		buf[2 * i] = digits[p[i] >> 4];
		buf[2 * i + 1] = digits[p[i] & 15];
	}
	buf[2 * (n < 1024 ? n : 1024)] = 0;
	return buf;
}

/*
 * Calls crypto.<fn>(args...) with one or two string arguments and returns
 * the hex of its first result, truncated to want_bytes (0: all of it).
 */
static const char *call_hex(const char *fn, const void *a, size_t an, const void *b, size_t bn,
	size_t want_bytes)
{
	size_t n;
	const char *s;
	const char *hex;

	lua_getfield(L, 1, fn);
	lua_pushlstring(L, a, an);
	if (b)
		lua_pushlstring(L, b, bn);
	lua_call(L, b ? 2 : 1, 1);
	s = lua_tolstring(L, -1, &n);
	if (s == NULL) {
		lua_pop(L, 1);
		return "(not a string)";
	}
	if (want_bytes && want_bytes < n)
		n = want_bytes;
	hex = to_hex((const unsigned char *)s, n);
	lua_pop(L, 1);
	return hex;
}

/* One MAC test case: key and data as bytes, the expected (maybe truncated) hex. */
struct mac_case {
	const char *name;
	const unsigned char *key;
	size_t keylen;
	const unsigned char *data;
	size_t datalen;
	const char *hex;
};

static unsigned char k0b[20], kaa20[20], kaa80[80], kaa131[131], k0c[20], k25[25];
static unsigned char ddd50[50], dcd50[50];

static void fill_keys(void)
{
	memset(k0b, 0x0b, sizeof k0b);
	memset(kaa20, 0xaa, sizeof kaa20);
	memset(kaa80, 0xaa, sizeof kaa80);
	memset(kaa131, 0xaa, sizeof kaa131);
	memset(k0c, 0x0c, sizeof k0c);
	for (int i = 0; i < 25; i++)
		k25[i] = (unsigned char)(i + 1);
	memset(ddd50, 0xdd, sizeof ddd50);
	memset(dcd50, 0xcd, sizeof dcd50);
}

#define S(lit) (const unsigned char *)(lit), sizeof(lit) - 1
#define B(arr) arr, sizeof(arr)

static void test_hmac_sha1(void)
{
	const struct mac_case cases[] = {
		{"1", B(k0b), S("Hi There"), "b617318655057264e28bc0b6fb378c8ef146be00"},
		{"2", S("Jefe"), S("what do ya want for nothing?"),
			"effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"},
		{"3", B(kaa20), B(ddd50), "125d7342b9ac11cd91a39af48aa17b4f63f175d3"},
		{"4", B(k25), B(dcd50), "4c9007f4026250c6bc8414f9bf50c86c2d7235da"},
		{"5", B(k0c), S("Test With Truncation"), "4c1a03424b55e07fe7f27be1d58bb9324a9a5a04"},
		{"6", B(kaa80), S("Test Using Larger Than Block-Size Key - Hash Key First"),
			"aa4ae5e15272d00e95705637ce8a3b55ed402112"},
		{"7", B(kaa80),
			S("Test Using Larger Than Block-Size Key and Larger Than One Block-Size Data"),
			"e8e99d0f45237d786d6bbaa7965c7808bbff1a91"},
	};

	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		const struct mac_case *c = &cases[i];
		const char *got = call_hex("hmac_sha1", c->key, c->keylen, c->data, c->datalen, 0);

		CHECK(strcmp(got, c->hex) == 0, "hmac_sha1 matches RFC 2202 test case %s (got %s)",
			c->name, got);
	}
}

static void test_hmac_sha256(void)
{
	const struct mac_case cases[] = {
		{"1", B(k0b), S("Hi There"),
			"b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"},
		{"2", S("Jefe"), S("what do ya want for nothing?"),
			"5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"},
		{"3", B(kaa20), B(ddd50),
			"773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"},
		{"4", B(k25), B(dcd50),
			"82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"},
		/* Case 5 specifies only the first 128 bits of the output. */
		{"5", B(k0c), S("Test With Truncation"), "a3b6167473100ee06e0c796c2955552b"},
		{"6", B(kaa131), S("Test Using Larger Than Block-Size Key - Hash Key First"),
			"60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"},
		{"7", B(kaa131),
			S("This is a test using a larger than block-size key and a larger than "
			  "block-size data. The key needs to be hashed before being used by the "
			  "HMAC algorithm."),
			"9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"},
	};

	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		const struct mac_case *c = &cases[i];
		size_t want = strlen(c->hex) / 2;
		const char *got = call_hex("hmac_sha256", c->key, c->keylen, c->data, c->datalen,
			want);

		CHECK(strcmp(got, c->hex) == 0, "hmac_sha256 matches RFC 4231 test case %s (got %s)",
			c->name, got);
	}
	/* The full output is 32 bytes even where the RFC compares only 16. */
	lua_getfield(L, 1, "hmac_sha256");
	lua_pushlstring(L, (const char *)k0c, sizeof k0c);
	lua_pushliteral(L, "Test With Truncation");
	lua_call(L, 2, 1);
	CHECK(lua_rawlen(L, -1) == 32, "hmac_sha256 returns all 32 bytes (case 5 compares 16)");
	lua_pop(L, 1);
}

static void test_sha256(void)
{
	static const char *msg448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
	char *million = malloc(1000000);
	const char *got;

	memset(million, 'a', 1000000);
	got = call_hex("sha256", "abc", 3, NULL, 0, 0);
	CHECK(strcmp(got, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad") == 0,
		"sha256 of \"abc\" matches FIPS 180 (got %s)", got);
	got = call_hex("sha256", "", 0, NULL, 0, 0);
	CHECK(strcmp(got, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855") == 0,
		"sha256 of the empty string matches FIPS 180 (got %s)", got);
	got = call_hex("sha256", msg448, strlen(msg448), NULL, 0, 0);
	CHECK(strcmp(got, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1") == 0,
		"sha256 of the 448-bit message matches FIPS 180 (got %s)", got);
	got = call_hex("sha256", million, 1000000, NULL, 0, 0);
	CHECK(strcmp(got, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0") == 0,
		"sha256 of one million 'a' matches FIPS 180 (got %s)", got);
	free(million);
}

/* Standard base64 through crypto.h: returns a NUL-terminated static copy. */
static const char *enc(const char *s, size_t n, int url)
{
	static char out[256];
	size_t k = url ? ca_base64url_encode((const unsigned char *)s, n, out)
		: ca_base64_encode((const unsigned char *)s, n, out);

	out[k] = 0;
	return out;
}

/* Decodes s; returns the length or -1 and leaves the bytes in dec_out. */
static unsigned char dec_out[256];

/* ca_base64_valid is checked against the decoder on every standard input decoded here. */
static int valid_checked, valid_wrong;

static long dec_std(const char *s, size_t n, unsigned char *out)
{
	long r = ca_base64_decode(s, n, out);

	valid_checked++;
	valid_wrong += ca_base64_valid(s, n) != (r >= 0);
	return r;
}

static long dec(const char *s, size_t n, int url)
{
	return url ? ca_base64url_decode(s, n, dec_out) : dec_std(s, n, dec_out);
}

static void test_base64_vectors(void)
{
	static const char *plain[] = {"", "f", "fo", "foo", "foob", "fooba", "foobar"};
	static const char *std[] = {"", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy"};
	static const char *url[] = {"", "Zg", "Zm8", "Zm9v", "Zm9vYg", "Zm9vYmE", "Zm9vYmFy"};
	int bad_enc = 0, bad_dec = 0, bad_uenc = 0, bad_udec = 0;

	for (int i = 0; i < 7; i++) {
		size_t n = strlen(plain[i]);
		long k;

		bad_enc += strcmp(enc(plain[i], n, 0), std[i]) != 0;
		bad_uenc += strcmp(enc(plain[i], n, 1), url[i]) != 0;
		k = dec(std[i], strlen(std[i]), 0);
		bad_dec += k != (long)n || memcmp(dec_out, plain[i], n) != 0;
		k = dec(url[i], strlen(url[i]), 1);
		bad_udec += k != (long)n || memcmp(dec_out, plain[i], n) != 0;
	}
	CHECK(bad_enc == 0, "ca_base64_encode matches the RFC 4648 section 10 vectors");
	CHECK(bad_dec == 0, "ca_base64_decode reads the RFC 4648 section 10 vectors");
	CHECK(bad_uenc == 0, "ca_base64url_encode writes the RFC 4648 vectors unpadded");
	CHECK(bad_udec == 0, "ca_base64url_decode reads the unpadded RFC 4648 vectors");

	CHECK(strcmp(enc("\xfb\xff\xbf", 3, 0), "+/+/") == 0, "base64 uses + and / for 62 and 63");
	CHECK(strcmp(enc("\xfb\xff\xbf", 3, 1), "-_-_") == 0, "base64url uses - and _ for 62 and 63");
	CHECK(dec("+/+/", 4, 0) == 3 && memcmp(dec_out, "\xfb\xff\xbf", 3) == 0,
		"base64 decodes + and /");
	CHECK(dec("-_-_", 4, 1) == 3 && memcmp(dec_out, "\xfb\xff\xbf", 3) == 0,
		"base64url decodes - and _");
}

static void test_base64_rejects(void)
{
	/* Each is invalid standard base64 for the reason given. */
	static const struct {
		const char *s;
		const char *why;
	} bad[] = {
		{"Zm9v!mFy", "a character outside the alphabet"},
		{"Zm9vYmF\x80", "a byte above 127"},
		{"Zm9-", "the base64url character -"},
		{"Zm9_", "the base64url character _"},
		{"Zm9vYg", "missing padding"},
		{"Zm9vYg=", "one pad short"},
		{"Zm9vYmE", "missing single pad"},
		{"Zm9vYg===", "too much padding (length 9)"},
		{"Zm9vY===", "three pads"},
		{"Zm9v====", "a group of only padding"},
		{"====", "only padding"},
		{"Zg=a", "a character after '='"},
		{"Zm=vYmFy", "'=' in the middle"},
		{"Zg==Zm9v", "padding before another group"},
		{"Zm9v YmFy", "a space"},
		{"Zm9vYmFy\n", "a trailing newline"},
		{" Zm9", "a leading space"},
		{"Zm9\t", "a tab"},
		{"Z", "length 1"},
		{"Zm9vY", "length 5 (1 mod 4)"},
		{"Zh==", "non-zero padding bits (one byte)"},
		{"Zm9=", "non-zero padding bits (two bytes)"},
	};
	int fails = 0;

	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		long r = dec(bad[i].s, strlen(bad[i].s), 0);

		CHECK(r == -1, "ca_base64_decode rejects %s", bad[i].why);
	}
	CHECK(dec("Zm\0v", 4, 0) == -1, "ca_base64_decode rejects an embedded NUL");

	CHECK(dec("Zm9vYg==", 8, 1) == -1, "ca_base64url_decode rejects '=' padding");
	CHECK(dec("Zm9+", 4, 1) == -1 && dec("Zm9/", 4, 1) == -1,
		"ca_base64url_decode rejects + and /");
	CHECK(dec("Z", 1, 1) == -1 && dec("Zm9vY", 5, 1) == -1,
		"ca_base64url_decode rejects lengths of 1 mod 4");
	CHECK(dec("Zh", 2, 1) == -1 && dec("Zm9", 3, 1) == -1,
		"ca_base64url_decode rejects non-zero padding bits");
	CHECK(dec("Zm9v YmFy", 9, 1) == -1, "ca_base64url_decode rejects whitespace");

	/* Every byte value in every position of a group: accepted iff in the alphabet. */
	for (int url = 0; url <= 1; url++) {
		const char *alpha = url
			? "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
			: "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

		fails = 0;
		for (int pos = 0; pos < 4; pos++) {
			for (int c = 0; c < 256; c++) {
				char s[8];
				int valid = memchr(alpha, c, 64) != NULL;

				memcpy(s, "Zm9vYmFy", 8);
				s[pos] = (char)c;
				fails += (dec(s, 8, url) == 6) != valid;
			}
		}
		CHECK(fails == 0, "%s decoding accepts exactly its 64 characters (%d wrong)",
			url ? "base64url" : "base64", fails);
	}
}

/* A small deterministic generator, so a failing length can be reproduced. */
static uint64_t rng = 0x9e3779b97f4a7c15u;

static unsigned char next_byte(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (unsigned char)(rng >> 24);
}

static void test_base64_round_trips(void)
{
	int bad_len = 0, bad_trip = 0, bad_oracle = 0, bad_url = 0, first_bad = -1;

	/* Buffers of exactly the documented sizes, so ASan catches any overrun. */
	for (size_t n = 0; n <= 2000; n++) {
		unsigned char *in = malloc(n ? n : 1);
		size_t elen = ca_base64_encoded_len(n), ulen = ca_base64url_encoded_len(n);
		char *e = malloc(elen ? elen : 1), *u = malloc(ulen ? ulen : 1);
		unsigned char *oracle = malloc(elen + 1);
		unsigned char *d = malloc(ca_base64_decoded_max(elen) + 1);
		unsigned char *ud = malloc(ca_base64url_decoded_max(ulen) + 1);
		size_t k, uk;
		long dn, udn;
		int bad = 0;

		for (size_t i = 0; i < n; i++)
			in[i] = next_byte();
		k = ca_base64_encode(in, n, e);
		uk = ca_base64url_encode(in, n, u);
		bad_len += k != elen || uk != ulen;
		bad |= k != elen || uk != ulen;

		EVP_EncodeBlock(oracle, in, (int)n);
		if (memcmp(oracle, e, k) != 0 || oracle[k] != 0) {
			bad_oracle++;
			bad = 1;
		}
		dn = dec_std(e, k, d);
		if (dn != (long)n || memcmp(d, in, n) != 0 || (size_t)dn > ca_base64_decoded_max(k)) {
			bad_trip++;
			bad = 1;
		}
		for (size_t i = 0; i < uk; i++) {
			char want = e[i] == '+' ? '-' : e[i] == '/' ? '_' : e[i];

			if (u[i] != want)
				bad = 1;
		}
		udn = ca_base64url_decode(u, uk, ud);
		if (udn != (long)n || memcmp(ud, in, n) != 0
		    || (size_t)udn != ca_base64url_decoded_max(uk)) {
			bad_url++;
			bad = 1;
		}
		if (bad && first_bad < 0)
			first_bad = (int)n;
		free(in);
		free(e);
		free(u);
		free(oracle);
		free(d);
		free(ud);
	}
	CHECK(bad_len == 0, "encoders write exactly ca_base64_encoded_len/ca_base64url_encoded_len");
	CHECK(bad_oracle == 0, "ca_base64_encode equals OpenSSL EVP_EncodeBlock for lengths 0..2000");
	CHECK(bad_trip == 0, "base64 decode(encode(x)) == x for random x of lengths 0..2000");
	CHECK(bad_url == 0, "base64url decode(encode(x)) == x for random x of lengths 0..2000");
	CHECK(first_bad < 0, "no failing length in the round trips (first: %d)", first_bad);
}

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/*
 * Runs one operation on an n-byte frame for about 30 ms; returns ns per call.
 * op: 0 encode, 1 decode, 2 OpenSSL EVP_EncodeBlock, 3 EVP_DecodeBlock.
 */
static double bench(size_t n, int op)
{
	unsigned char in[960], out[960], eo[1281];
	char e[1280];
	size_t k;
	long sink = 0, iters = 0;
	double t0, t;

	for (size_t i = 0; i < n; i++)
		in[i] = next_byte();
	k = ca_base64_encode(in, n, e);
	t0 = now_ns();
	do {
		for (int i = 0; i < 1000; i++) {
			if (op == 0)
				sink += (long)ca_base64_encode(in, n, e);
			else if (op == 1)
				sink += ca_base64_decode(e, k, out);
			else if (op == 4)
				sink += ca_base64_valid(e, k);
			else if (op == 2)
				sink += EVP_EncodeBlock(eo, in, (int)n);
			else
				sink += EVP_DecodeBlock(out, (const unsigned char *)e, (int)k);
		}
		iters += 1000;
		t = now_ns();
	} while (t - t0 < 30e6);
	if (sink == 0)
		printf("# (unexpected zero)\n");
	return (t - t0) / (double)iters;
}

static void bench_base64(void)
{
	const size_t sizes[] = {160, 960};

	for (int i = 0; i < 2; i++) {
		double e = bench(sizes[i], 0), d = bench(sizes[i], 1);

		printf("# base64 %zu-byte frame: encode %.0f ns, decode %.0f ns "
			"(%.2f / %.2f GB/s of raw bytes), check only %.0f ns\n",
			sizes[i], e, d, (double)sizes[i] / e, (double)sizes[i] / d, bench(sizes[i], 4));
		printf("#   for comparison, OpenSSL EVP_EncodeBlock %.0f ns, EVP_DecodeBlock %.0f ns "
			"(no strict checks)\n", bench(sizes[i], 2), bench(sizes[i], 3));
	}
}

/*
 * ca_base64_valid says yes exactly when the decoder does: on every input
 * the tests above decoded, and on random strings near the edge (alphabet
 * characters, '=', and now and then a byte outside it).
 */
static void test_base64_valid(void)
{
	static const char near[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/===\\\"\0 -_";
	unsigned char out[64];
	char s[48];
	int yes = 0;

	for (int i = 0; i < 200000; i++) {
		size_t n = next_byte() % 13;

		for (size_t k = 0; k < n; k++)
			s[k] = near[next_byte() % (sizeof near - 1)];
		yes += dec_std(s, n, out) >= 0;
	}
	CHECK(valid_wrong == 0, "ca_base64_valid agrees with ca_base64_decode on %d inputs (%d valid "
		"random ones; %d wrong)", valid_checked, yes, valid_wrong);
	CHECK(yes > 1000, "the random inputs include valid ones (%d)", yes);
}

int main(void)
{
	L = luaL_newstate();
	luaL_requiref(L, "callagent.crypto", luaopen_callagent_crypto, 0);
	fill_keys();

	test_hmac_sha1();
	test_hmac_sha256();
	test_sha256();
	test_base64_vectors();
	test_base64_rejects();
	test_base64_round_trips();
	test_base64_valid();
	bench_base64();

	lua_close(L);
	return tap_done();
}
