/*
 * crypto.c - callagent.crypto: hashes, MACs, signatures, randomness and the
 * encodings around them. The primitives come from OpenSSL 3.0; base64 and
 * hex are our own table-driven code because they run on every audio frame.
 *
 * All byte strings are Lua strings; "raw" means binary, not hex or base64.
 *
 *   crypto.sha1(data)                 raw 20-byte SHA-1 digest
 *   crypto.sha256(data)               raw 32-byte SHA-256 digest
 *   crypto.hmac_sha1(key, data)       raw 20-byte HMAC-SHA1
 *   crypto.hmac_sha256(key, data)     raw 32-byte HMAC-SHA256
 *
 *   crypto.to_hex(raw)                lowercase hex, two characters per byte
 *   crypto.from_hex(hex)              raw bytes; upper- and lowercase digits.
 *                                     nil, "EINVAL: ..." on an odd length or
 *                                     a character that is not a hex digit
 *
 *   crypto.base64_encode(s)           standard alphabet (+/), '=' padded
 *   crypto.base64_decode(s)           raw bytes, or nil, "EINVAL: ..." unless s
 *                                     is canonical standard base64: length a
 *                                     multiple of 4, only A-Z a-z 0-9 + /,
 *                                     '=' only as the last one or two
 *                                     characters and exactly as many as the
 *                                     length needs, no whitespace or line
 *                                     breaks, and the unused bits before the
 *                                     padding zero (non-zero padding bits are
 *                                     REJECTED, so each byte string has one
 *                                     accepted encoding)
 *   crypto.base64url_encode(s)        URL-safe alphabet (-_), no padding
 *   crypto.base64url_decode(s)        raw bytes, or nil, "EINVAL: ..." unless s
 *                                     is canonical unpadded base64url: only
 *                                     A-Z a-z 0-9 - _, no '=', length not
 *                                     1 mod 4, zero padding bits
 *
 *   crypto.random_bytes(n)            n bytes from RAND_bytes; 0 <= n <= 1 MiB
 *                                     (else an argument error)
 *   crypto.uuid4()                    RFC 4122 version 4 UUID, lowercase,
 *                                     "xxxxxxxx-xxxx-4xxx-[89ab]xxx-xxxxxxxxxxxx"
 *   crypto.random_token([nbytes=24])  nbytes random bytes as base64url without
 *                                     padding (24 -> 32 characters);
 *                                     1 <= nbytes <= 1024
 *   crypto.constant_time_eq(a, b)     true when the strings are equal. Time
 *                                     depends on the lengths only, never on
 *                                     the content (CRYPTO_memcmp); different
 *                                     lengths are false at once
 *
 *   crypto.ed25519_verify(public_raw32, message, signature_raw64)
 *                                     true when signature is a valid Ed25519
 *                                     signature of message under the key.
 *                                     false for a bad signature, a key that is
 *                                     not 32 bytes or not a curve point, or a
 *                                     signature that is not 64 bytes
 *   crypto.ed25519_keypair()          public_raw32, private_raw32 (a fresh pair)
 *   crypto.ed25519_sign(private_raw32, message)
 *                                     raw 64-byte signature; a private key
 *                                     that is not 32 bytes is an argument error
 *
 * Arguments of the wrong type are argument errors. If OpenSSL itself fails
 * (it should not), functions return nil, "ECRYPTO: <openssl reason>".
 *
 * Provider-specific signature schemes (Twilio's HMAC-SHA1 over the URL and
 * sorted parameters, Telnyx's Ed25519 over "timestamp|payload", Plivo V3)
 * are built in Lua from these primitives.
 *
 * The C base64 functions are declared in crypto.h.
 */
/* Declare only the current OpenSSL 3.0 API: a deprecated call does not compile. */
#define OPENSSL_API_COMPAT 30000
#define OPENSSL_NO_DEPRECATED

#include <limits.h>
#include <stdint.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <openssl/x509.h>

#include "ca.h"
#include "crypto.h"

#define RANDOM_MAX (1024 * 1024)
#define TOKEN_MAX 1024
#define TOKEN_DEFAULT 24

/* ---- base64 ---- */

/*
 * The tables of one base64 alphabet; read-only, built by the compiler, and
 * alive for the whole program.
 *   pair[v]     the two characters of the 12-bit value v, so encoding three
 *               bytes takes two lookups;
 *   word[k][c]  the 6-bit value of character c, already shifted to its place
 *               k (0..3) in a 24-bit group, or BADBIT for a character outside
 *               the alphabet: a group is the OR of four lookups, and OR-ing
 *               all groups tells at the end whether any character was bad;
 *   value[c]    the 6-bit value of c or BAD (for the last group and errors);
 *   single[v]   the character of the 6-bit value v.
 */
struct b64_tables {
	char pair[4096][2];
	uint32_t word[4][256];
	unsigned char value[256];
	char single[65];
};

#define BAD 0xFF
#define BADBIT 0x01000000u

/* The value of character c in the alphabet with x and y for 62 and 63, or BAD. */
#define B64V(c, x, y) \
	((c) >= 'A' && (c) <= 'Z' ? (c) - 'A' : \
	 (c) >= 'a' && (c) <= 'z' ? (c) - 'a' + 26 : \
	 (c) >= '0' && (c) <= '9' ? (c) - '0' + 52 : \
	 (c) == (x) ? 62 : (c) == (y) ? 63 : BAD)
/* The character of the 6-bit value v. */
#define B64C(v, x, y) \
	((v) < 26 ? 'A' + (v) : (v) < 52 ? 'a' + (v) - 26 : \
	 (v) < 62 ? '0' + (v) - 52 : (v) == 62 ? (x) : (y))
#define B64WORD(c, shift, x, y) \
	(B64V(c, x, y) == BAD ? BADBIT : (uint32_t)B64V(c, x, y) << (shift))
#define B64PAIR(lo, hi, x, y) { B64C(hi, x, y), B64C(lo, x, y) }
#define B64PAIRROW(hi, x, y) IN64(B64PAIR, 0, hi, x, y)

/*
 * E(i, args...) for i = base .. base+N-1, comma separated. Two families,
 * because a macro cannot expand inside its own expansion.
 */
#define REP4(E, i, ...) E(i, __VA_ARGS__), E((i) + 1, __VA_ARGS__), \
	E((i) + 2, __VA_ARGS__), E((i) + 3, __VA_ARGS__)
#define REP16(E, i, ...) REP4(E, i, __VA_ARGS__), REP4(E, (i) + 4, __VA_ARGS__), \
	REP4(E, (i) + 8, __VA_ARGS__), REP4(E, (i) + 12, __VA_ARGS__)
#define REP64(E, i, ...) REP16(E, i, __VA_ARGS__), REP16(E, (i) + 16, __VA_ARGS__), \
	REP16(E, (i) + 32, __VA_ARGS__), REP16(E, (i) + 48, __VA_ARGS__)
#define REP256(E, i, ...) REP64(E, i, __VA_ARGS__), REP64(E, (i) + 64, __VA_ARGS__), \
	REP64(E, (i) + 128, __VA_ARGS__), REP64(E, (i) + 192, __VA_ARGS__)
#define IN4(E, i, ...) E(i, __VA_ARGS__), E((i) + 1, __VA_ARGS__), \
	E((i) + 2, __VA_ARGS__), E((i) + 3, __VA_ARGS__)
#define IN16(E, i, ...) IN4(E, i, __VA_ARGS__), IN4(E, (i) + 4, __VA_ARGS__), \
	IN4(E, (i) + 8, __VA_ARGS__), IN4(E, (i) + 12, __VA_ARGS__)
#define IN64(E, i, ...) IN16(E, i, __VA_ARGS__), IN16(E, (i) + 16, __VA_ARGS__), \
	IN16(E, (i) + 32, __VA_ARGS__), IN16(E, (i) + 48, __VA_ARGS__)

#define B64TABLES(x, y, chars) { \
	.pair = { REP64(B64PAIRROW, 0, x, y) }, \
	.word = { \
		{ REP256(B64WORD, 0, 18, x, y) }, \
		{ REP256(B64WORD, 0, 12, x, y) }, \
		{ REP256(B64WORD, 0, 6, x, y) }, \
		{ REP256(B64WORD, 0, 0, x, y) }, \
	}, \
	.value = { REP256(B64V, 0, x, y) }, \
	.single = chars, \
}

static const struct b64_tables b64_std = B64TABLES('+', '/',
	"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/");
static const struct b64_tables b64_url = B64TABLES('-', '_',
	"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_");

/* Encodes the whole 3-byte groups of in; returns the characters written. */
static size_t encode_groups(const unsigned char *restrict in, size_t n, char *restrict out,
	const struct b64_tables *restrict t)
{
	char *o = out;

	for (size_t i = 0; i + 3 <= n; i += 3, o += 4) {
		uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];

		memcpy(o, t->pair[v >> 12], 2);
		memcpy(o + 2, t->pair[v & 4095], 2);
	}
	return (size_t)(o - out);
}

/* Encodes the last 1 or 2 bytes (rest) without padding; returns the characters written. */
static size_t encode_rest(const unsigned char *in, size_t rest, char *o,
	const struct b64_tables *t)
{
	uint32_t v;

	if (rest == 0)
		return 0;
	v = (uint32_t)in[0] << 16 | (rest == 2 ? (uint32_t)in[1] << 8 : 0);
	o[0] = t->single[v >> 18];
	o[1] = t->single[v >> 12 & 63];
	if (rest == 1)
		return 2;
	o[2] = t->single[v >> 6 & 63];
	return 3;
}

size_t ca_base64_encode(const unsigned char *in, size_t n, char *out)
{
	size_t k = encode_groups(in, n, out, &b64_std);
	size_t r = encode_rest(in + n / 3 * 3, n % 3, out + k, &b64_std);

	if (r == 0)
		return k;
	if (r == 2)
		out[k + r++] = '=';
	out[k + r++] = '=';
	return k + r;
}

size_t ca_base64url_encode(const unsigned char *in, size_t n, char *out)
{
	size_t k = encode_groups(in, n, out, &b64_url);

	return k + encode_rest(in + n / 3 * 3, n % 3, out + k, &b64_url);
}

/*
 * Decodes nq whole 4-character groups. Returns 0, or -1 when any character
 * was outside the alphabet (the output is then junk).
 */
static int decode_groups(const unsigned char *restrict s, size_t nq, unsigned char *restrict o,
	const struct b64_tables *restrict t)
{
	uint32_t bad = 0, v;
	size_t i = 0;

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	/* One 4-byte store per group; its fourth byte is overwritten by the next group. */
	for (; i + 1 < nq; i++, s += 4, o += 3) {
		v = t->word[0][s[0]] | t->word[1][s[1]] | t->word[2][s[2]] | t->word[3][s[3]];
		bad |= v;
		v = __builtin_bswap32(v << 8);
		memcpy(o, &v, 4);
	}
#endif
	for (; i < nq; i++, s += 4, o += 3) {
		v = t->word[0][s[0]] | t->word[1][s[1]] | t->word[2][s[2]] | t->word[3][s[3]];
		bad |= v;
		o[0] = (unsigned char)(v >> 16);
		o[1] = (unsigned char)(v >> 8);
		o[2] = (unsigned char)v;
	}
	return (bad & BADBIT) ? -1 : 0;
}

/*
 * Decodes a final group of 2 or 3 characters (the rest of the input before
 * any padding); the bits they carry beyond the output bytes must be zero.
 * Returns the bytes written or -1.
 */
static long decode_rest(const unsigned char *s, size_t rest, unsigned char *o,
	const struct b64_tables *t)
{
	unsigned a = t->value[s[0]], b = t->value[s[1]], c = rest == 3 ? t->value[s[2]] : 0;

	if ((a | b | c) > 63)
		return -1;
	o[0] = (unsigned char)(a << 2 | b >> 4);
	if (rest == 2)
		return (b & 0x0F) ? -1 : 1;
	o[1] = (unsigned char)(b << 4 | c >> 2);
	return (c & 0x03) ? -1 : 2;
}

/*
 * The shape of n characters of standard base64 (n a non-zero multiple of
 * 4): the whole groups before the last padded one (*nq) and its padding.
 * Only the last group may hold padding: "xx==" or "xxx=".
 */
static size_t std_padding(const unsigned char *s, size_t n, size_t *nq)
{
	size_t pad = s[n - 1] != '=' ? 0 : s[n - 2] != '=' ? 1 : 2;

	*nq = n / 4 - (pad != 0);
	return pad;
}

long ca_base64_decode(const char *in, size_t n, unsigned char *out)
{
	const unsigned char *s = (const unsigned char *)in;
	size_t nq, pad;
	long r;

	if (n % 4 != 0)
		return -1;
	if (n == 0)
		return 0;
	pad = std_padding(s, n, &nq);
	if (decode_groups(s, nq, out, &b64_std) < 0)
		return -1;
	if (pad == 0)
		return (long)(nq * 3);
	r = decode_rest(s + nq * 4, 4 - pad, out + nq * 3, &b64_std);
	return r < 0 ? -1 : (long)(nq * 3) + r;
}

int ca_base64_valid(const char *in, size_t n)
{
	const unsigned char *s = (const unsigned char *)in, *v = b64_std.value;
	unsigned char bad = 0, rest[2];
	size_t nq, pad;

	if (n % 4 != 0)
		return 0;
	if (n == 0)
		return 1;
	pad = std_padding(s, n, &nq);
	/* Every value is 0..63; BAD (0xFF) sets the bits above. A group at a time. */
	for (size_t i = 0; i < nq * 4; i += 4)
		bad |= v[s[i]] | v[s[i + 1]] | v[s[i + 2]] | v[s[i + 3]];
	if (bad > 63)
		return 0;
	return pad == 0 || decode_rest(s + nq * 4, 4 - pad, rest, &b64_std) >= 0;
}

long ca_base64url_decode(const char *in, size_t n, unsigned char *out)
{
	const unsigned char *s = (const unsigned char *)in;
	size_t nq = n / 4, rest = n % 4;
	long r;

	if (rest == 1)
		return -1;
	if (decode_groups(s, nq, out, &b64_url) < 0)
		return -1;
	if (rest == 0)
		return (long)(nq * 3);
	r = decode_rest(s + nq * 4, rest, out + nq * 3, &b64_url);
	return r < 0 ? -1 : (long)(nq * 3) + r;
}

/*
 * Says why s is not canonical base64 (url: base64url). Only called after a
 * decoder has refused s, so it may be slow.
 */
static int base64_fail(lua_State *L, const unsigned char *s, size_t n, int url)
{
	const unsigned char *dec = url ? b64_url.value : b64_std.value;
	const char *what = url ? "base64url" : "base64";
	size_t body = n;

	if (url && n % 4 == 1)
		return ca_fail(L, "EINVAL", "%s length %zu is 1 mod 4", what, n);
	if (!url && n % 4 != 0)
		return ca_fail(L, "EINVAL", "base64 length %zu is not a multiple of 4", n);
	if (!url) {
		while (body > 0 && n - body < 2 && s[body - 1] == '=')
			body--;
	}
	for (size_t i = 0; i < body; i++) {
		if (s[i] == '=')
			return ca_fail(L, "EINVAL", "%s has a misplaced '=' at offset %zu%s",
				what, i, url ? " (base64url is unpadded)" : "");
		if (dec[s[i]] == BAD)
			return ca_fail(L, "EINVAL", "invalid %s character 0x%02x at offset %zu",
				what, s[i], i);
	}
	return ca_fail(L, "EINVAL", "%s has non-zero padding bits", what);
}

/* ---- results ---- */

#define RESULT_SMALL 4096

/*
 * Scratch space for one string result of one binding call, on the C stack:
 * a local array when the result is small (no allocation, the audio case),
 * else a luaL_Buffer (which pushes a box onto the Lua stack until pushed).
 */
struct result {
	char *p;
	luaL_Buffer b;
	char small[RESULT_SMALL];
};

static char *result_init(lua_State *L, struct result *r, size_t n)
{
	if (n <= sizeof r->small)
		r->p = r->small;
	else
		r->p = luaL_buffinitsize(L, &r->b, n);
	return r->p;
}

/* Pushes the first n bytes written as the result string. */
static void result_push(lua_State *L, struct result *r, size_t n)
{
	if (r->p == r->small)
		lua_pushlstring(L, r->small, n);
	else
		luaL_pushresultsize(&r->b, n);
}

/* Drops the scratch space without leaving anything on the Lua stack. */
static void result_drop(lua_State *L, struct result *r)
{
	if (r->p != r->small) {
		luaL_pushresultsize(&r->b, 0);
		lua_pop(L, 1);
	}
}

/* ---- bindings ---- */

/* Returns nil, "ECRYPTO: <what> failed: <first OpenSSL error>" and clears the queue. */
static int crypto_fail(lua_State *L, const char *what)
{
	char reason[256];
	unsigned long e = ERR_get_error();

	if (e)
		ERR_error_string_n(e, reason, sizeof reason);
	else
		strcpy(reason, "unknown error");
	ERR_clear_error();
	return ca_fail(L, "ECRYPTO", "%s failed: %s", what, reason);
}

static int digest(lua_State *L, const EVP_MD *md, const char *what)
{
	size_t n;
	const char *data = luaL_checklstring(L, 1, &n);
	unsigned char out[EVP_MAX_MD_SIZE];
	unsigned int len = 0;

	if (EVP_Digest(data, n, out, &len, md, NULL) != 1)
		return crypto_fail(L, what);
	lua_pushlstring(L, (const char *)out, len);
	return 1;
}

static int l_sha1(lua_State *L)
{
	return digest(L, EVP_sha1(), "SHA-1");
}

static int l_sha256(lua_State *L)
{
	return digest(L, EVP_sha256(), "SHA-256");
}

static int hmac(lua_State *L, const EVP_MD *md, const char *what)
{
	size_t klen, n;
	const char *key = luaL_checklstring(L, 1, &klen);
	const char *data = luaL_checklstring(L, 2, &n);
	unsigned char out[EVP_MAX_MD_SIZE];
	unsigned int len = 0;

	luaL_argcheck(L, klen <= INT_MAX, 1, "key too long");
	if (HMAC(md, key, (int)klen, (const unsigned char *)data, n, out, &len) == NULL)
		return crypto_fail(L, what);
	lua_pushlstring(L, (const char *)out, len);
	return 1;
}

static int l_hmac_sha1(lua_State *L)
{
	return hmac(L, EVP_sha1(), "HMAC-SHA1");
}

static int l_hmac_sha256(lua_State *L)
{
	return hmac(L, EVP_sha256(), "HMAC-SHA256");
}

static const char hexdigits[16] = "0123456789abcdef";

static int l_to_hex(lua_State *L)
{
	size_t n;
	const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
	struct result r;
	char *o = result_init(L, &r, 2 * n);

	for (size_t i = 0; i < n; i++) {
		o[2 * i] = hexdigits[s[i] >> 4];
		o[2 * i + 1] = hexdigits[s[i] & 15];
	}
	result_push(L, &r, 2 * n);
	return 1;
}

static int hexval(unsigned char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static int l_from_hex(lua_State *L)
{
	size_t n;
	const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
	struct result r;
	char *o;

	if (n % 2 != 0)
		return ca_fail(L, "EINVAL", "hex string has odd length %zu", n);
	o = result_init(L, &r, n / 2);
	for (size_t i = 0; i < n; i += 2) {
		int hi = hexval(s[i]), lo = hexval(s[i + 1]);

		if (hi < 0 || lo < 0) {
			result_drop(L, &r);
			return ca_fail(L, "EINVAL", "not a hex digit at offset %zu",
				hi < 0 ? i : i + 1);
		}
		o[i / 2] = (char)(hi << 4 | lo);
	}
	result_push(L, &r, n / 2);
	return 1;
}

static int l_base64_encode(lua_State *L)
{
	size_t n;
	const char *s = luaL_checklstring(L, 1, &n);
	struct result r;
	char *o = result_init(L, &r, ca_base64_encoded_len(n));

	result_push(L, &r, ca_base64_encode((const unsigned char *)s, n, o));
	return 1;
}

static int l_base64url_encode(lua_State *L)
{
	size_t n;
	const char *s = luaL_checklstring(L, 1, &n);
	struct result r;
	char *o = result_init(L, &r, ca_base64url_encoded_len(n));

	result_push(L, &r, ca_base64url_encode((const unsigned char *)s, n, o));
	return 1;
}

static int base64_decode(lua_State *L, int url)
{
	size_t n;
	const char *s = luaL_checklstring(L, 1, &n);
	struct result r;
	size_t max = url ? ca_base64url_decoded_max(n) : ca_base64_decoded_max(n);
	unsigned char *o = (unsigned char *)result_init(L, &r, max);
	long len = url ? ca_base64url_decode(s, n, o) : ca_base64_decode(s, n, o);

	if (len < 0) {
		result_drop(L, &r);
		return base64_fail(L, (const unsigned char *)s, n, url);
	}
	result_push(L, &r, (size_t)len);
	return 1;
}

static int l_base64_decode(lua_State *L)
{
	return base64_decode(L, 0);
}

static int l_base64url_decode(lua_State *L)
{
	return base64_decode(L, 1);
}

static int l_random_bytes(lua_State *L)
{
	lua_Integer n = luaL_checkinteger(L, 1);
	luaL_Buffer b;
	unsigned char *p;

	luaL_argcheck(L, n >= 0 && n <= RANDOM_MAX, 1, "must be 0 .. 1048576");
	p = (unsigned char *)luaL_buffinitsize(L, &b, (size_t)n);
	if (n > 0 && RAND_bytes(p, (int)n) != 1) {
		luaL_pushresultsize(&b, 0);
		lua_pop(L, 1);
		return crypto_fail(L, "RAND_bytes");
	}
	luaL_pushresultsize(&b, (size_t)n);
	return 1;
}

static int l_uuid4(lua_State *L)
{
	unsigned char u[16];
	char s[36];
	char *o = s;

	if (RAND_bytes(u, sizeof u) != 1)
		return crypto_fail(L, "RAND_bytes");
	u[6] = (unsigned char)((u[6] & 0x0F) | 0x40);	/* version 4 */
	u[8] = (unsigned char)((u[8] & 0x3F) | 0x80);	/* variant 10xx */
	for (int i = 0; i < 16; i++) {
		if (i == 4 || i == 6 || i == 8 || i == 10)
			*o++ = '-';
		*o++ = hexdigits[u[i] >> 4];
		*o++ = hexdigits[u[i] & 15];
	}
	lua_pushlstring(L, s, sizeof s);
	return 1;
}

static int l_random_token(lua_State *L)
{
	lua_Integer n = luaL_optinteger(L, 1, TOKEN_DEFAULT);
	unsigned char raw[TOKEN_MAX];
	char out[TOKEN_MAX / 3 * 4 + 4];
	size_t len;

	luaL_argcheck(L, n >= 1 && n <= TOKEN_MAX, 1, "must be 1 .. 1024");
	if (RAND_bytes(raw, (int)n) != 1)
		return crypto_fail(L, "RAND_bytes");
	len = ca_base64url_encode(raw, (size_t)n, out);
	OPENSSL_cleanse(raw, (size_t)n);
	lua_pushlstring(L, out, len);
	return 1;
}

static int l_constant_time_eq(lua_State *L)
{
	size_t na, nb;
	const char *a = luaL_checklstring(L, 1, &na);
	const char *b = luaL_checklstring(L, 2, &nb);

	lua_pushboolean(L, na == nb && CRYPTO_memcmp(a, b, na) == 0);
	return 1;
}

static int l_ed25519_verify(lua_State *L)
{
	size_t klen, mlen, slen;
	const char *key = luaL_checklstring(L, 1, &klen);
	const char *msg = luaL_checklstring(L, 2, &mlen);
	const char *sig = luaL_checklstring(L, 3, &slen);
	EVP_PKEY *pk;
	EVP_MD_CTX *ctx;
	int ok = 0;

	if (klen != 32 || slen != 64) {
		lua_pushboolean(L, 0);
		return 1;
	}
	pk = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL,
		(const unsigned char *)key, klen);
	ctx = EVP_MD_CTX_new();
	if (pk && ctx && EVP_DigestVerifyInit(ctx, NULL, NULL, NULL, pk) == 1)
		ok = EVP_DigestVerify(ctx, (const unsigned char *)sig, slen,
			(const unsigned char *)msg, mlen) == 1;
	EVP_MD_CTX_free(ctx);
	EVP_PKEY_free(pk);
	/* A bad key or signature leaves reasons on the queue; they are not errors here. */
	ERR_clear_error();
	lua_pushboolean(L, ok);
	return 1;
}

static int l_ed25519_keypair(lua_State *L)
{
	EVP_PKEY *pk = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
	unsigned char pub[32], priv[32];
	size_t publen = sizeof pub, privlen = sizeof priv;
	int ok;

	if (pk == NULL)
		return crypto_fail(L, "Ed25519 key generation");
	ok = EVP_PKEY_get_raw_public_key(pk, pub, &publen) == 1
		&& EVP_PKEY_get_raw_private_key(pk, priv, &privlen) == 1;
	EVP_PKEY_free(pk);
	if (!ok)
		return crypto_fail(L, "Ed25519 key export");
	lua_pushlstring(L, (const char *)pub, publen);
	lua_pushlstring(L, (const char *)priv, privlen);
	OPENSSL_cleanse(priv, sizeof priv);
	return 2;
}

static int l_ed25519_sign(lua_State *L)
{
	size_t klen, mlen;
	const char *key = luaL_checklstring(L, 1, &klen);
	const char *msg = luaL_checklstring(L, 2, &mlen);
	unsigned char sig[64];
	size_t siglen = sizeof sig;
	EVP_PKEY *pk;
	EVP_MD_CTX *ctx;
	int ok = 0;

	luaL_argcheck(L, klen == 32, 1, "Ed25519 private key must be 32 bytes");
	pk = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL,
		(const unsigned char *)key, klen);
	ctx = EVP_MD_CTX_new();
	if (pk && ctx && EVP_DigestSignInit(ctx, NULL, NULL, NULL, pk) == 1)
		ok = EVP_DigestSign(ctx, sig, &siglen, (const unsigned char *)msg, mlen) == 1;
	EVP_MD_CTX_free(ctx);
	EVP_PKEY_free(pk);
	if (!ok)
		return crypto_fail(L, "Ed25519 signing");
	lua_pushlstring(L, (const char *)sig, siglen);
	return 1;
}

int luaopen_callagent_crypto(lua_State *L)
{
	static const luaL_Reg fns[] = {
		{"sha1", l_sha1},
		{"sha256", l_sha256},
		{"hmac_sha1", l_hmac_sha1},
		{"hmac_sha256", l_hmac_sha256},
		{"to_hex", l_to_hex},
		{"from_hex", l_from_hex},
		{"base64_encode", l_base64_encode},
		{"base64_decode", l_base64_decode},
		{"base64url_encode", l_base64url_encode},
		{"base64url_decode", l_base64url_decode},
		{"random_bytes", l_random_bytes},
		{"uuid4", l_uuid4},
		{"random_token", l_random_token},
		{"constant_time_eq", l_constant_time_eq},
		{"ed25519_verify", l_ed25519_verify},
		{"ed25519_keypair", l_ed25519_keypair},
		{"ed25519_sign", l_ed25519_sign},
		{NULL, NULL}
	};

	luaL_newlib(L, fns);
	return 1;
}

const char *ca_system_ca_dir(void)
{
	const char *dir = getenv(X509_get_default_cert_dir_env());

	return dir && *dir ? dir : X509_get_default_cert_dir();
}
