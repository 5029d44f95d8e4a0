/*
 * test_audio.c - unit tests of the plain C side of callagent.audio: G.711
 * against a straightforward rendering of the ITU-T G.191 reference
 * algorithm (written here, sharing nothing with audio.c, which builds its
 * tables a different way), the transcoders, levels, and the resampler's
 * contracts through both of its kernels.
 *
 * The Lua side and the resampler's measured quality are in test_audio.lua.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "audio.h"
#include "tap.h"

/* ---- G.191 g711.c, as the algorithm reads there ---- */

/* ulaw_compress: 14-bit magnitude plus 33, segment by bit length, nibbles inverted. */
static uint8_t ref_ulaw_compress(int16_t x)
{
	int absno = (x < 0 ? (~x) >> 2 : x >> 2) + 33;
	int segno = 1, low, code;

	if (absno > 0x1FFF)
		absno = 0x1FFF;
	for (int i = absno >> 6; i != 0; i >>= 1)
		segno++;
	low = 0x0F - ((absno >> segno) & 0x0F);
	code = ((8 - segno) << 4) | low;
	if (x >= 0)
		code |= 0x80;
	return (uint8_t)code;
}

static int16_t ref_ulaw_expand(uint8_t code)
{
	int sign = code < 0x80 ? -1 : 1;
	int mant = ~code;
	int exponent = (mant >> 4) & 7;
	int step = 4 << (exponent + 1);

	mant &= 0x0F;
	return (int16_t)(sign * ((0x80 << exponent) + step * mant + step / 2 - 4 * 33));
}

/* alaw_compress: 12-bit magnitude, exponent by shifting, even bits toggled. */
static uint8_t ref_alaw_compress(int16_t x)
{
	int ix = x < 0 ? (~x) >> 4 : x >> 4;

	if (ix > 15) {
		int iexp = 1;

		while (ix > 16 + 15) {
			ix >>= 1;
			iexp++;
		}
		ix -= 16;
		ix += iexp << 4;
	}
	if (x >= 0)
		ix |= 0x80;
	return (uint8_t)(ix ^ 0x55);
}

static int16_t ref_alaw_expand(uint8_t code)
{
	int ix = (code ^ 0x55) & 0x7F;
	int iexp = ix >> 4, mant = ix & 0x0F;

	if (iexp > 0)
		mant += 16;
	mant = (mant << 4) + 8;
	if (iexp > 1)
		mant <<= iexp - 1;
	return (int16_t)(code > 127 ? mant : -mant);
}

/* ---- helpers ---- */

static void put16(uint8_t *p, int v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)((unsigned)v >> 8);
}

static int get16(const uint8_t *p)
{
	return (int16_t)(uint16_t)(p[0] | p[1] << 8);
}

/* n samples of a sine of amplitude amp (of full scale) at hz, sampled at rate. */
static uint8_t *sine(size_t n, double hz, int rate, double amp)
{
	uint8_t *p = malloc(2 * n);

	for (size_t i = 0; i < n; i++)
		put16(p + 2 * i, (int)lrint(amp * 32767.0 * sin(2 * M_PI * hz * (double)i / rate)));
	return p;
}

/* ---- G.711 ---- */

static void test_vectors(void)
{
	static const struct { uint8_t code; int16_t v; } dec[] = {
		{0xFF, 0}, {0x7F, 0}, {0x00, -32124}, {0x80, 32124},
		{0x01, -31100}, {0xF0, 120}, {0xFE, 8},
	};
	static const struct { int16_t x; uint8_t code; } enc[] = {
		{0, 0xFF}, {100, 0xF2}, {1000, 0xCE}, {16384, 0x8F}, {32767, 0x80},
		{-1, 0x7F}, {-32768, 0x00},
	};

	for (size_t i = 0; i < sizeof dec / sizeof dec[0]; i++)
		CHECK(ca_ulaw_decode1(dec[i].code) == dec[i].v, "mu-law decode(0x%02X) = %d (got %d)",
		      dec[i].code, dec[i].v, ca_ulaw_decode1(dec[i].code));
	for (size_t i = 0; i < sizeof enc / sizeof enc[0]; i++)
		CHECK(ca_ulaw_encode1(enc[i].x) == enc[i].code, "mu-law encode(%d) = 0x%02X (got 0x%02X)",
		      enc[i].x, enc[i].code, ca_ulaw_encode1(enc[i].x));
	CHECK(ca_alaw_decode1(0xD5) == 8, "A-law silence 0xD5 decodes to 8");
	CHECK(ca_alaw_decode1(0x55) == -8, "A-law 0x55 decodes to -8");
	CHECK(ca_alaw_encode1(0) == 0xD5, "A-law encode(0) = 0xD5");
	CHECK(ca_alaw_encode1(-1) == 0x55, "A-law encode(-1) = 0x55 (G.191 one's complement)");
	CHECK(ca_alaw_encode1(32767) == 0xAA && ca_alaw_encode1(-32768) == 0x2A,
	      "A-law encodes the extremes to 0xAA and 0x2A");
}

static void test_against_g191(void)
{
	int bad_u = 0, bad_a = 0, first_u = 0, first_a = 0;

	for (int x = -32768; x <= 32767; x++) {
		if (ca_ulaw_encode1((int16_t)x) != ref_ulaw_compress((int16_t)x) && !bad_u++)
			first_u = x;
		if (ca_alaw_encode1((int16_t)x) != ref_alaw_compress((int16_t)x) && !bad_a++)
			first_a = x;
	}
	CHECK(bad_u == 0, "mu-law encoder matches G.191 ulaw_compress for all 65536 inputs "
	      "(%d differ, first %d)", bad_u, first_u);
	CHECK(bad_a == 0, "A-law encoder matches G.191 alaw_compress for all 65536 inputs "
	      "(%d differ, first %d)", bad_a, first_a);

	bad_u = bad_a = 0;
	for (int c = 0; c < 256; c++) {
		bad_u += ca_ulaw_decode1((uint8_t)c) != ref_ulaw_expand((uint8_t)c);
		bad_a += ca_alaw_decode1((uint8_t)c) != ref_alaw_expand((uint8_t)c);
	}
	CHECK(bad_u == 0, "mu-law decoder matches G.191 ulaw_expand for all 256 codes (%d differ)", bad_u);
	CHECK(bad_a == 0, "A-law decoder matches G.191 alaw_expand for all 256 codes (%d differ)", bad_a);
}

static void test_round_trip(void)
{
	int bad_u = 0, bad_a = 0;

	for (int c = 0; c < 256; c++) {
		/* 0x7F is "negative zero": it decodes to 0, which encodes as 0xFF. */
		int want = c == 0x7F ? 0xFF : c;

		bad_u += ca_ulaw_encode1(ca_ulaw_decode1((uint8_t)c)) != want;
		bad_a += ca_alaw_encode1(ca_alaw_decode1((uint8_t)c)) != c;
	}
	CHECK(bad_u == 0, "mu-law decode then encode gives every code back (0x7F -> 0xFF) (%d differ)", bad_u);
	CHECK(bad_a == 0, "A-law decode then encode gives every code back (%d differ)", bad_a);
}

/* Independent of G.191: quantizing must keep the order of the inputs. */
static void test_monotonic(void)
{
	int bad_u = 0, bad_a = 0, worst_u = 0, worst_a = 0;
	int pu = -32768, pa = -32768;

	for (int x = -32768; x <= 32767; x++) {
		int u = ca_ulaw_decode1(ca_ulaw_encode1((int16_t)x));
		int a = ca_alaw_decode1(ca_alaw_encode1((int16_t)x));

		bad_u += u < pu;
		bad_a += a < pa;
		pu = u;
		pa = a;
		if (abs(u - x) > worst_u)
			worst_u = abs(u - x);
		if (abs(a - x) > worst_a)
			worst_a = abs(a - x);
	}
	CHECK(bad_u == 0 && bad_a == 0, "quantizing keeps the order of the inputs");
	/* The largest steps are 1024 wide; the clipped ends add mu-law's 643 and A-law's 512. */
	CHECK(worst_u <= 1024 && worst_a <= 1024, "quantization error stays within a step "
	      "(mu-law %d, A-law %d)", worst_u, worst_a);
}

static void test_buffers(void)
{
	uint8_t *pcm = malloc(2 * 65536), *pcm2 = malloc(2 * 65536);
	uint8_t *u = malloc(65536), *a = malloc(65536);
	uint8_t codes[256], t[256];
	int bad = 0;

	for (int i = 0; i < 65536; i++)
		put16(pcm + 2 * i, i - 32768);
	ca_ulaw_encode(u, pcm, 65536);
	ca_alaw_encode(a, pcm, 65536);
	for (int i = 0; i < 65536; i++)
		bad += u[i] != ca_ulaw_encode1((int16_t)(i - 32768)) ||
		       a[i] != ca_alaw_encode1((int16_t)(i - 32768));
	CHECK(bad == 0, "buffer encoders read little-endian samples like the one-sample ones");

	for (int c = 0; c < 256; c++)
		codes[c] = (uint8_t)c;
	bad = 0;
	ca_ulaw_decode(pcm2, codes, 256);
	for (int c = 0; c < 256; c++)
		bad += get16(pcm2 + 2 * c) != ca_ulaw_decode1((uint8_t)c);
	ca_alaw_decode(pcm2 + 1, codes, 256);	/* odd address on purpose */
	for (int c = 0; c < 256; c++)
		bad += get16(pcm2 + 1 + 2 * c) != ca_alaw_decode1((uint8_t)c);
	CHECK(bad == 0, "buffer decoders write little-endian samples at any alignment");

	/* Transcoders: the composition through the linear value, in place too. */
	bad = 0;
	ca_ulaw_to_alaw(t, codes, 256);
	for (int c = 0; c < 256; c++)
		bad += t[c] != ca_alaw_encode1(ca_ulaw_decode1((uint8_t)c));
	memcpy(t, codes, 256);
	ca_alaw_to_ulaw(t, t, 256);
	for (int c = 0; c < 256; c++)
		bad += t[c] != ca_ulaw_encode1(ca_alaw_decode1((uint8_t)c));
	CHECK(bad == 0, "ulaw_to_alaw and alaw_to_ulaw are encode(decode(code)), also in place");
	ca_ulaw_to_alaw(t, (const uint8_t *)"\xFF", 1);
	CHECK(t[0] == 0xD5, "mu-law silence transcodes to A-law silence");

	/* How far a round trip through the other law moves a code, for the record. */
	{
		int moved = 0, worst = 0;

		for (int c = 0; c < 256; c++) {
			uint8_t x = (uint8_t)c, y;

			ca_alaw_to_ulaw(&y, &x, 1);
			ca_ulaw_to_alaw(&y, &y, 1);
			if (y != x) {
				int d = abs(ca_alaw_decode1(y) - ca_alaw_decode1(x));

				moved++;
				worst = d > worst ? d : worst;
			}
		}
		printf("# A-law -> mu-law -> A-law changes %d of 256 codes (largest move %d)\n",
		       moved, worst);
	}
	free(pcm);
	free(pcm2);
	free(u);
	free(a);
}

/* ---- levels ---- */

static void test_levels(void)
{
	uint8_t sq[2 * 1000], *s = sine(8000, 1000, 8000, 1.0), u[8000];
	uint8_t *half = sine(8000, 1000, 8000, 0.5);
	double db;

	for (int i = 0; i < 1000; i++)
		put16(sq + 2 * i, i % 2 ? -32768 : 32767);
	db = ca_pcm_rms_dbfs(sq, 1000);
	CHECK(fabs(db) < 0.001, "a full-scale square wave is 0 dBFS (%.5f)", db);
	db = ca_pcm_rms_dbfs(s, 8000);
	CHECK(fabs(db + 3.0103) < 0.001, "a full-scale sine is -3.01 dBFS (%.5f)", db);
	ca_ulaw_encode(u, half, 8000);
	db = ca_ulaw_rms_dbfs(u, 8000);
	CHECK(fabs(db - ca_pcm_rms_dbfs(half, 8000)) < 0.05,
	      "a half-scale sine measures the same in mu-law (%.4f dBFS)", db);
	memset(sq, 0, sizeof sq);
	CHECK(isinf(ca_pcm_rms_dbfs(sq, 1000)) && ca_pcm_rms_dbfs(sq, 1000) < 0,
	      "silence is -inf dBFS");
	CHECK(isinf(ca_pcm_rms_dbfs(sq, 0)) && isinf(ca_ulaw_rms_dbfs(u, 0)), "no samples is -inf dBFS");
	memset(u, 0xFF, sizeof u);
	CHECK(isinf(ca_ulaw_rms_dbfs(u, 8000)), "mu-law silence (0xFF) is -inf dBFS");
	free(s);
	free(half);
}

/* ---- resampler ---- */

static const int pairs[][2] = {
	{24000, 8000}, {8000, 24000}, {16000, 8000}, {8000, 16000}, {24000, 16000},
	{16000, 24000}, {8000, 8000}, {16000, 16000}, {24000, 24000},
};
#define NPAIRS (sizeof pairs / sizeof pairs[0])

static struct ca_resampler *new_rs(int from, int to)
{
	struct ca_resampler *r = malloc(ca_resampler_size(from, to));

	ca_resampler_init(r, from, to);
	return r;
}

static void test_resampler_api(void)
{
	CHECK(ca_resampler_size(44100, 8000) == 0 && ca_resampler_size(8000, 0) == 0,
	      "unsupported rates have size 0");
	{
		struct ca_resampler *r = new_rs(8000, 16000);

		CHECK(ca_resampler_init(r, 8000, 11025) == -1, "init refuses an unsupported rate");
		free(r);
	}
	for (size_t q = 0; q < NPAIRS; q++) {
		int from = pairs[q][0], to = pairs[q][1];
		struct ca_resampler *r = new_rs(from, to);
		double d = ca_resampler_delay(r), ms = 1000 * d / to;

		CHECK(from == to ? d == 0 : ms > 1 && ms < 6, "%d -> %d: delay %.2f output samples (%.2f ms)",
		      from, to, d, ms);
		free(r);
	}
}

/* Chunking, lengths, out_max and reset, through the kernel now selected. */
static void test_resampler_contracts(const char *kernel)
{
	static const size_t odd[] = {1, 7, 333, 959, 2, 160, 3, 640, 1001, 5};
	size_t n = 6007;	/* samples: not a multiple of anything */
	uint8_t *in = malloc(2 * n), *a = malloc(8 * n), *b = malloc(8 * n);

	srand(7);
	for (size_t i = 0; i < 2 * n; i++)
		in[i] = (uint8_t)rand();
	for (size_t q = 0; q < NPAIRS; q++) {
		int from = pairs[q][0], to = pairs[q][1];
		struct ca_resampler *r = new_rs(from, to);
		size_t la, lb, want = (n * (size_t)to + (size_t)from - 1) / (size_t)from;
		int bounded = 1;

		la = ca_resampler_process(r, in, 2 * n, a);
		ca_resampler_reset(r);
		lb = 0;
		for (size_t i = 0, k = 0; i < 2 * n; k++) {
			size_t c = odd[k % 10] < 2 * n - i ? odd[k % 10] : 2 * n - i;
			size_t m = ca_resampler_out_max(r, c), o = ca_resampler_process(r, in + i, c, b + lb);

			bounded &= o <= m;
			lb += o;
			i += c;
		}
		CHECK(la == 2 * want && lb == la && memcmp(a, b, la) == 0,
		      "%s %d -> %d: %zu samples give exactly %zu, byte-identical in odd pieces",
		      kernel, from, to, n, want);
		CHECK(bounded, "%s %d -> %d: process stays within out_max", kernel, from, to);
		free(r);
	}
	free(in);
	free(a);
	free(b);
}

/* Level of a tone after resampling, relative to its input level, in dB. */
static double gain_db(int from, int to, double hz)
{
	size_t n = (size_t)from;	/* one second */
	uint8_t *in = sine(n, hz, from, 0.5), *out = malloc(8 * n);
	struct ca_resampler *r = new_rs(from, to);
	size_t len = ca_resampler_process(r, in, 2 * n, out);
	size_t skip = 2 * (size_t)(2 * ca_resampler_delay(r) + 16);
	double g = ca_pcm_rms_dbfs(out + skip, (len - skip) / 2) - ca_pcm_rms_dbfs(in, n);

	free(in);
	free(out);
	free(r);
	return g;
}

static void test_resampler_response(const char *kernel)
{
	for (size_t q = 0; q < 6; q++) {
		int from = pairs[q][0], to = pairs[q][1];
		int low = from < to ? from : to, high = from < to ? to : from;
		double pass = gain_db(from, to, 1000);

		CHECK(fabs(pass) < 0.05, "%s %d -> %d: 1 kHz passes at %.4f dB", kernel, from, to, pass);
		if (from > to) {
			/* A tone between the two Nyquist frequencies must not alias in. */
			double hz = 0.5 * (low / 2.0 + high / 2.0), stop = gain_db(from, to, hz);

			CHECK(stop < -70, "%s %d -> %d: %.0f Hz is attenuated %.1f dB", kernel, from,
			      to, hz, -stop);
		}
	}
}

/* The two kernels round differently (FMA, summation order) but barely. */
static void test_kernels_agree(void)
{
	size_t n = 4801;
	uint8_t *in = sine(n, 1234.5, 24000, 0.9), *a = malloc(4 * n), *b = malloc(4 * n);
	int worst = 0;
	size_t la, lb;
	int was = ca__audio_simd(0);
	struct ca_resampler *r = new_rs(24000, 8000);

	la = ca_resampler_process(r, in, 2 * n, a);
	ca__audio_simd(1);
	ca_resampler_reset(r);
	lb = ca_resampler_process(r, in, 2 * n, b);
	for (size_t i = 0; i + 1 < la && la == lb; i += 2) {
		int d = abs(get16(a + i) - get16(b + i));

		worst = d > worst ? d : worst;
	}
	CHECK(la == lb && worst <= 1, "portable and wide kernels agree within 1 LSB (simd %s, worst %d)",
	      was ? "available" : "not available", worst);
	ca__audio_simd(was);
	free(r);
	free(in);
	free(a);
	free(b);
}

int main(void)
{
	int simd;

	ca_audio_init();
	test_vectors();
	test_against_g191();
	test_round_trip();
	test_monotonic();
	test_buffers();
	test_levels();
	test_resampler_api();
	simd = ca__audio_simd(0);
	test_resampler_contracts("portable");
	test_resampler_response("portable");
	if (simd) {
		ca__audio_simd(1);
		test_resampler_contracts("wide");
		test_resampler_response("wide");
	}
	test_kernels_agree();
	return tap_done();
}
