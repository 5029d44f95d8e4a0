/*
 * audio.c - callagent.audio: G.711, resampling, framing and levels on Lua
 * strings. PCM is 16-bit signed little-endian mono throughout.
 *
 *   audio.ulaw_encode(pcm)       -> ulaw    one byte per sample
 *   audio.ulaw_decode(ulaw)      -> pcm     two bytes per code
 *   audio.alaw_encode(pcm)       -> alaw
 *   audio.alaw_decode(alaw)      -> pcm
 *   audio.ulaw_to_alaw(ulaw)     -> alaw    one 256-entry table per direction:
 *   audio.alaw_to_ulaw(alaw)     -> ulaw    encode(decode(code)) of the other law
 *   audio.rms_dbfs(pcm)          -> number  RMS level in dBFS; -math.huge for
 *   audio.ulaw_rms_dbfs(ulaw)    -> number  silence or an empty string
 *
 *   audio.resample_linear(pcm, from, to)
 *                                -> pcm     a whole clip to another rate (any,
 *                                   1000..192000 Hz) by linear interpolation:
 *                                   no filter, no history. For speech made at
 *                                   an odd rate (espeak-ng's 22050 Hz) on its
 *                                   way to 24 kHz; output sample i is input
 *                                   position i * from / to, computed exactly
 *                                   and rounded half up; N samples in give
 *                                   (N - 1) * to // from + 1 out
 *
 *   r = audio.resampler(from, to)  rates 8000, 16000 or 24000, any pair
 *   r:process(pcm)               -> pcm at the new rate (possibly "")
 *   r:reset()                       forget the history (as if new)
 *   r:delay()                    -> group delay in output samples (float)
 *
 *   f = audio.framer(size)         fixed-size frames out of a byte stream
 *   f:push(data)                 -> {frame, ...} the complete frames (maybe {})
 *   f:pending()                  -> bytes buffered towards the next frame
 *   f:flush([pad])               -> the remainder padded to size with the
 *                                   byte pad (default 0xFF, mu-law silence),
 *                                   or nil when nothing is pending
 *   f:reset()                       drops the pending bytes
 *
 * Errors (raised): a PCM string of odd length given to an encoder or to
 * rms_dbfs; a rate outside {8000, 16000, 24000}; a frame size outside
 * 1..1048576; a pad byte outside 0..255.
 *
 * G.711 is pinned to the ITU-T reference, G.191's g711.c (ulaw_compress,
 * ulaw_expand, alaw_compress, alaw_expand). Mu-law looks at the top 14 bits
 * of a sample, A-law at the top 12; negative samples are one's-complemented
 * before quantizing, so ulaw_encode(-1) is 0x7F (audioop says 0x7E) and
 * there is no zero trap: ulaw_encode(-32768) is 0x00. Decoding gives the
 * middle of the quantization interval: mu-law 0xFF and 0x7F decode to 0,
 * 0x80 to 32124; A-law silence is 0xD5, which decodes to 8. Tables are built
 * once, when the module is first opened, from the decision intervals of each
 * code; the unit test checks them against the G.191 algorithm for every input.
 *
 * The resampler is a polyphase FIR: up by L, low-pass, down by M (L/M =
 * to/from in lowest terms), computing only the outputs that are kept. The
 * prototype is a Kaiser-windowed sinc designed for 80 dB of stopband
 * attenuation, passband flat to 0.85 of the lower rate's Nyquist frequency
 * (3400 Hz when 8000 Hz is involved) and the stopband starting at that
 * Nyquist frequency. Coefficients are designed on the first resampler for a
 * rate pair and shared by all later ones. Each resampler keeps the filter
 * history and its phase, so output does not depend on how the input is
 * chunked: splitting a stream anywhere (an odd byte is kept and joined with
 * the next chunk) yields byte-identical output. After N input samples in
 * total, exactly ceil(N * to / from) samples have come out. Equal rates copy.
 * The group delay (r:delay()) is 2.3 to 5 ms depending on the pair. The
 * inner loop runs on 4-wide float vectors, or on 8-wide AVX2/FMA ones when
 * the x86-64 CPU has them (chosen once, at load); 24k->8k of a 20 ms chunk
 * then takes about 2.5 microseconds on a current x86-64 server core.
 *
 * The C side (audio.h) has the same functions without Lua, for unit tests
 * and for a C audio path.
 */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "ca.h"
#include "audio.h"

#define RESAMPLER_MT "callagent.Resampler"
#define FRAMER_MT "callagent.Framer"
#define FRAMER_MAX (1 << 20)

/* ---- G.711 ---- */

/*
 * The tables: decoders by code, encoders by the top bits of the sample's
 * two's complement pattern (14 for mu-law, 12 for A-law: the bits G.191
 * looks at), transcoders by code. Filled once by ca_audio_init().
 */
static int16_t ulaw_dec[256], alaw_dec[256];
static uint8_t ulaw_enc[1 << 14], alaw_enc[1 << 12];
static uint8_t ulaw2alaw[256], alaw2ulaw[256];
static int tables_ready;

/*
 * Mu-law: G.191 quantizes the biased magnitude (|x| >> 2) + 33, where |x|
 * of a negative x is its one's complement ~x, clipped to 8191. Segment s,
 * step m covers biased magnitudes [(16 + m) << (s + 1), (17 + m) << (s + 1));
 * its code is the complement of (s << 4 | m), with 0x80 set for x >= 0. The
 * decoded value is four times the middle of that interval, unbiased.
 */
static void build_ulaw(void)
{
	for (int s = 0; s < 8; s++) {
		for (int m = 0; m < 16; m++) {
			int w = 1 << (s + 1);
			int lo = ((16 + m) << (s + 1)) - 33;
			int hi = lo + w;	/* exclusive */
			uint8_t code = (uint8_t)(~(s << 4 | m) & 0x7F);
			int16_t v = (int16_t)(4 * lo + 2 * w);

			if (s == 7 && m == 15)
				hi = 8192;	/* the clip: everything above */
			if (lo < 0)
				lo = 0;
			for (int mag = lo; mag < hi; mag++) {
				ulaw_enc[mag] = code | 0x80;
				ulaw_enc[16383 - mag] = code;
			}
			ulaw_dec[code | 0x80] = v;
			ulaw_dec[code] = (int16_t)-v;
		}
	}
}

/*
 * A-law: G.191 quantizes |x| >> 4 (one's complement for x < 0), 0..2047.
 * Segment 0 has steps of 1 from 0; segment e >= 1, step m covers
 * [(16 + m) << (e - 1), (17 + m) << (e - 1)). The code is (e << 4 | m), with
 * 0x80 set for x >= 0, and its even bits toggled (^ 0x55). The decoded value
 * is sixteen times the middle of the interval.
 */
static void build_alaw(void)
{
	for (int e = 0; e < 8; e++) {
		for (int m = 0; m < 16; m++) {
			int lo = e == 0 ? m : (16 + m) << (e - 1);
			int w = e == 0 ? 1 : 1 << (e - 1);
			uint8_t code = (uint8_t)((e << 4 | m) ^ 0x55);
			int16_t v = (int16_t)(16 * lo + 8 * w);

			for (int ix = lo; ix < lo + w; ix++) {
				alaw_enc[ix] = code | 0x80;
				alaw_enc[4095 - ix] = code;
			}
			alaw_dec[code | 0x80] = v;
			alaw_dec[code] = (int16_t)-v;
		}
	}
}

static inline int rd16(const uint8_t *p)
{
	return (int16_t)(uint16_t)(p[0] | p[1] << 8);
}

static inline void wr16(uint8_t *p, int v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)((unsigned)v >> 8);
}

static inline unsigned top_bits(const uint8_t *p, int shift)
{
	return (unsigned)(p[0] | p[1] << 8) >> shift;
}

void ca_audio_init(void)
{
	if (tables_ready)
		return;
	build_ulaw();
	build_alaw();
	ca__audio_simd(1);
	for (int c = 0; c < 256; c++) {
		ulaw2alaw[c] = ca_alaw_encode1(ulaw_dec[c]);
		alaw2ulaw[c] = ca_ulaw_encode1(alaw_dec[c]);
	}
	tables_ready = 1;
}

uint8_t ca_ulaw_encode1(int16_t x)
{
	return ulaw_enc[(uint16_t)x >> 2];
}

int16_t ca_ulaw_decode1(uint8_t code)
{
	return ulaw_dec[code];
}

uint8_t ca_alaw_encode1(int16_t x)
{
	return alaw_enc[(uint16_t)x >> 4];
}

int16_t ca_alaw_decode1(uint8_t code)
{
	return alaw_dec[code];
}

void ca_ulaw_encode(uint8_t *dst, const uint8_t *pcm, size_t n)
{
	for (size_t i = 0; i < n; i++)
		dst[i] = ulaw_enc[top_bits(pcm + 2 * i, 2)];
}

void ca_alaw_encode(uint8_t *dst, const uint8_t *pcm, size_t n)
{
	for (size_t i = 0; i < n; i++)
		dst[i] = alaw_enc[top_bits(pcm + 2 * i, 4)];
}

void ca_ulaw_decode(uint8_t *pcm, const uint8_t *src, size_t n)
{
	for (size_t i = 0; i < n; i++)
		wr16(pcm + 2 * i, ulaw_dec[src[i]]);
}

void ca_alaw_decode(uint8_t *pcm, const uint8_t *src, size_t n)
{
	for (size_t i = 0; i < n; i++)
		wr16(pcm + 2 * i, alaw_dec[src[i]]);
}

void ca_ulaw_to_alaw(uint8_t *dst, const uint8_t *src, size_t n)
{
	for (size_t i = 0; i < n; i++)
		dst[i] = ulaw2alaw[src[i]];
}

void ca_alaw_to_ulaw(uint8_t *dst, const uint8_t *src, size_t n)
{
	for (size_t i = 0; i < n; i++)
		dst[i] = alaw2ulaw[src[i]];
}

/* ---- levels ---- */

static double dbfs(uint64_t sum_sq, size_t n)
{
	if (sum_sq == 0)
		return -INFINITY;
	return 10.0 * log10((double)sum_sq / (double)n / (32768.0 * 32768.0));
}

double ca_pcm_rms_dbfs(const uint8_t *pcm, size_t n)
{
	uint64_t sum = 0;

	for (size_t i = 0; i < n; i++) {
		int v = rd16(pcm + 2 * i);

		sum += (uint64_t)(v * v);
	}
	return dbfs(sum, n);
}

double ca_ulaw_rms_dbfs(const uint8_t *ulaw, size_t n)
{
	uint64_t sum = 0;

	for (size_t i = 0; i < n; i++) {
		int v = ulaw_dec[ulaw[i]];

		sum += (uint64_t)(v * v);
	}
	return dbfs(sum, n);
}

/* ---- resampler ---- */

#define RS_ATTEN 80.0		/* stopband attenuation the design aims for, dB */
#define RS_PASS 0.85		/* passband edge, as a fraction of the lower Nyquist */
#define RS_MAXTAPS 256		/* room for the longest prototype (240 taps) */
#define RS_BLOCK 512		/* input samples converted to float per pass */

/*
 * The filter for one rate pair: designed by the first resampler that needs
 * it, then shared, read-only, for the life of the process.
 */
struct rs_design {
	int ready;
	unsigned L, M;		/* up and down factors */
	unsigned K;		/* taps per phase, a multiple of 16 */
	unsigned ntaps;		/* prototype length, K * L */
	_Alignas(32) float coef[RS_MAXTAPS];	/* phase p at coef + p * K, reversed */
};

static struct rs_design designs[3][3];

/*
 * One resampler's state. The memory belongs to the caller (the Lua userdata
 * in the binding below) and holds no other resource.
 */
struct ca_resampler {
	const struct rs_design *d;	/* NULL when the rates are equal */
	int from, to;
	unsigned hist;		/* history samples kept in buf: K - 1 */
	unsigned t;		/* next output's time in upsampled ticks, from buf[hist] */
	int carry;		/* the odd byte left over by the last call, or -1 */
	float buf[];		/* hist samples of history, then up to RS_BLOCK new ones */
};

static int rate_index(lua_Integer rate)
{
	switch (rate) {
	case 8000: return 0;
	case 16000: return 1;
	case 24000: return 2;
	default: return -1;
	}
}

static double bessel_i0(double x)
{
	double sum = 1.0, term = 1.0, q = x * x / 4.0;

	for (int k = 1; k < 100 && term > 1e-15 * sum; k++) {
		term *= q / ((double)k * k);
		sum += term;
	}
	return sum;
}

static unsigned gcd(unsigned a, unsigned b)
{
	while (b) {
		unsigned r = a % b;

		a = b;
		b = r;
	}
	return a;
}

/*
 * Kaiser-windowed sinc at the upsampled rate from * L, cut off between the
 * passband edge and the lower Nyquist frequency. The length comes from
 * Kaiser's formula, rounded up so every phase has a multiple of 16 taps (the
 * extra taps lengthen the window, which only helps). Each phase is stored
 * reversed, so an output is a forward dot product over the input history.
 */
static void design(struct rs_design *d, int from, int to)
{
	unsigned g = gcd((unsigned)from, (unsigned)to);
	unsigned L = (unsigned)to / g, M = (unsigned)from / g;
	double fu = (double)from * L;
	double nyq = (from < to ? from : to) / 2.0;
	double fpass = RS_PASS * nyq;
	double width = (nyq - fpass) / fu;
	unsigned need = (unsigned)ceil((RS_ATTEN - 7.95) / (14.36 * width)) + 1;
	unsigned K = ((need + L - 1) / L + 15) & ~15u;
	unsigned N = K * L;
	double beta = 0.1102 * (RS_ATTEN - 8.7);
	double fc = (fpass + nyq) / 2.0 / fu;
	double c = (N - 1) / 2.0, i0b = bessel_i0(beta), sum = 0.0;
	double h[RS_MAXTAPS];

	/* Cannot happen with the constants above; the unit test designs every pair. */
	if (N > RS_MAXTAPS)
		abort();
	for (unsigned i = 0; i < N; i++) {
		double u = i - c, r = u / c, a = 1.0 - r * r;
		double w = bessel_i0(beta * sqrt(a > 0 ? a : 0)) / i0b;
		double s = u == 0 ? 2.0 * fc : sin(2.0 * M_PI * fc * u) / (M_PI * u);

		h[i] = s * w;
		sum += h[i];
	}
	/* Unity gain at DC for each phase on average (zero stuffing divides by L). */
	for (unsigned p = 0; p < L; p++)
		for (unsigned k = 0; k < K; k++)
			d->coef[p * K + (K - 1 - k)] = (float)(h[p + k * L] * L / sum);
	d->L = L;
	d->M = M;
	d->K = K;
	d->ntaps = N;
	d->ready = 1;
}

static const struct rs_design *get_design(int from, int to)
{
	struct rs_design *d = &designs[rate_index(from)][rate_index(to)];

	if (!d->ready)
		design(d, from, to);
	return d;
}

size_t ca_resampler_size(int from, int to)
{
	if (rate_index(from) < 0 || rate_index(to) < 0)
		return 0;
	if (from == to)
		return sizeof(struct ca_resampler);
	return sizeof(struct ca_resampler) +
	       (get_design(from, to)->K - 1 + RS_BLOCK) * sizeof(float);
}

int ca_resampler_init(struct ca_resampler *r, int from, int to)
{
	if (rate_index(from) < 0 || rate_index(to) < 0)
		return -1;
	r->from = from;
	r->to = to;
	r->d = from == to ? NULL : get_design(from, to);
	r->hist = r->d ? r->d->K - 1 : 0;
	ca_resampler_reset(r);
	return 0;
}

void ca_resampler_reset(struct ca_resampler *r)
{
	r->t = 0;
	r->carry = -1;
	if (r->d)
		memset(r->buf, 0, r->hist * sizeof(float));
}

void ca_resampler_drop_carry(struct ca_resampler *r)
{
	r->carry = -1;
}

size_t ca_resampler_out_max(const struct ca_resampler *r, size_t len)
{
	size_t n = (len + (r->carry >= 0)) / 2;

	if (r->d == NULL)
		return 2 * n;
	return 2 * ((n * r->d->L + r->d->M - 1) / r->d->M);
}

double ca_resampler_delay(const struct ca_resampler *r)
{
	if (r->d == NULL)
		return 0.0;
	return (r->d->ntaps - 1) / (2.0 * r->d->M);
}

static inline int to_pcm(float y)
{
	if (y > 32766.5f)
		return 32767;
	if (y < -32767.5f)
		return -32768;
	return (int)(y + (y < 0 ? -0.5f : 0.5f));
}

/*
 * The FIR kernel: n outputs that share one phase's coefficients c (K taps),
 * output q reading x + q * step and going to out + q * ostride. Outputs are
 * computed in pairs, sharing the coefficient loads; an odd last one is
 * computed as a pair with itself, so every output goes through the same
 * arithmetic however the input was chunked. Two versions: 4-wide vectors
 * for any target, and on x86-64 an 8-wide AVX2/FMA one chosen at startup
 * when the CPU has it.
 */
typedef void fir_fn(const float *c, unsigned K, const float *x, unsigned step,
		    size_t n, uint8_t *out, size_t ostride);

typedef float v4f __attribute__((vector_size(16)));

static void fir_generic(const float *c, unsigned K, const float *x, unsigned step,
			size_t n, uint8_t *out, size_t ostride)
{
	for (size_t q = 0; q < n; q += 2) {
		const float *xa = x + q * step;
		const float *xb = q + 1 < n ? xa + step : xa;
		v4f a0 = {0, 0, 0, 0}, a1 = a0, b0 = a0, b1 = a0;

		for (unsigned i = 0; i < K; i += 8) {
			v4f c0, c1, u0, u1, w0, w1;

			memcpy(&c0, c + i, sizeof c0);
			memcpy(&c1, c + i + 4, sizeof c1);
			memcpy(&u0, xa + i, sizeof u0);
			memcpy(&u1, xa + i + 4, sizeof u1);
			memcpy(&w0, xb + i, sizeof w0);
			memcpy(&w1, xb + i + 4, sizeof w1);
			a0 += c0 * u0;
			a1 += c1 * u1;
			b0 += c0 * w0;
			b1 += c1 * w1;
		}
		a0 += a1;
		b0 += b1;
		wr16(out + q * ostride, to_pcm((a0[0] + a0[1]) + (a0[2] + a0[3])));
		if (q + 1 < n)
			wr16(out + (q + 1) * ostride, to_pcm((b0[0] + b0[1]) + (b0[2] + b0[3])));
	}
}

#if defined(__x86_64__) && defined(__GNUC__)
typedef float v8f __attribute__((vector_size(32)));

__attribute__((target("avx2,fma")))
static void fir_avx2(const float *c, unsigned K, const float *x, unsigned step,
		     size_t n, uint8_t *out, size_t ostride)
{
	for (size_t q = 0; q < n; q += 2) {
		const float *xa = x + q * step;
		const float *xb = q + 1 < n ? xa + step : xa;
		v8f a0 = {0, 0, 0, 0, 0, 0, 0, 0}, a1 = a0, b0 = a0, b1 = a0;

		for (unsigned i = 0; i < K; i += 16) {
			v8f c0, c1, u0, u1, w0, w1;

			memcpy(&c0, c + i, sizeof c0);
			memcpy(&c1, c + i + 8, sizeof c1);
			memcpy(&u0, xa + i, sizeof u0);
			memcpy(&u1, xa + i + 8, sizeof u1);
			memcpy(&w0, xb + i, sizeof w0);
			memcpy(&w1, xb + i + 8, sizeof w1);
			a0 += c0 * u0;
			a1 += c1 * u1;
			b0 += c0 * w0;
			b1 += c1 * w1;
		}
		a0 += a1;
		b0 += b1;
		wr16(out + q * ostride, to_pcm(((a0[0] + a0[1]) + (a0[2] + a0[3])) +
					       ((a0[4] + a0[5]) + (a0[6] + a0[7]))));
		if (q + 1 < n)
			wr16(out + (q + 1) * ostride,
			     to_pcm(((b0[0] + b0[1]) + (b0[2] + b0[3])) +
				    ((b0[4] + b0[5]) + (b0[6] + b0[7]))));
	}
}
#endif

static fir_fn *fir = fir_generic;

int ca__audio_simd(int on)
{
	int was = fir != fir_generic;

	fir = fir_generic;
#if defined(__x86_64__) && defined(__GNUC__)
	__builtin_cpu_init();
	if (on && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
		fir = fir_avx2;
#else
	(void)on;
#endif
	return was;
}

/*
 * Filters n <= RS_BLOCK new samples; returns the output samples written.
 * Outputs k, k + L, k + 2L, ... of a block share a phase and step through
 * the input by M, so the block is done as (at most) L runs of the kernel.
 */
static size_t run_block(struct ca_resampler *r, const uint8_t *pcm, size_t n, uint8_t *out)
{
	const struct rs_design *d = r->d;
	float *x = r->buf + r->hist;
	unsigned L = d->L, M = d->M, K = d->K;
	unsigned t = r->t, end = (unsigned)n * L;
	size_t total = t < end ? (end - t + M - 1) / M : 0;

	for (size_t i = 0; i < n; i++)
		x[i] = (float)rd16(pcm + 2 * i);
	for (unsigned k = 0; k < L && k < total; k++) {
		unsigned tk = t + k * M, j = tk / L, p = tk - j * L;

		/* Input j and the K - 1 before it are buf[j .. j + K - 1]. */
		fir(d->coef + p * K, K, r->buf + j, M, (total - k + L - 1) / L,
		    out + 2 * k, 2 * (size_t)L);
	}
	r->t = t + (unsigned)total * M - end;
	memmove(r->buf, r->buf + n, r->hist * sizeof(float));
	return total;
}

/* Whole samples in, bytes out. */
static size_t feed(struct ca_resampler *r, const uint8_t *pcm, size_t n, uint8_t *out)
{
	size_t o = 0;

	if (r->d == NULL) {
		memcpy(out, pcm, 2 * n);
		return 2 * n;
	}
	while (n > 0) {
		size_t k = n < RS_BLOCK ? n : RS_BLOCK;

		o += 2 * run_block(r, pcm, k, out + o);
		pcm += 2 * k;
		n -= k;
	}
	return o;
}

size_t ca_resampler_process(struct ca_resampler *r, const uint8_t *pcm, size_t len,
			    uint8_t *out)
{
	size_t o = 0;

	if (len == 0)
		return 0;
	if (r->carry >= 0) {
		uint8_t s[2] = {(uint8_t)r->carry, pcm[0]};

		r->carry = -1;
		o = feed(r, s, 1, out);
		pcm++;
		len--;
	}
	if (len & 1)
		r->carry = pcm[len - 1];
	return o + feed(r, pcm, len / 2, out + o);
}

/* ---- Lua: codecs and levels ---- */

typedef void (*codec_fn)(uint8_t *dst, const uint8_t *src, size_t n);

/* Runs fn over the string at 1; in/out are bytes per unit on either side. */
static int run_codec(lua_State *L, codec_fn fn, size_t in, size_t out)
{
	size_t len, n;
	const uint8_t *s = (const uint8_t *)luaL_checklstring(L, 1, &len);
	luaL_Buffer b;
	uint8_t *d;

	luaL_argcheck(L, len % in == 0, 1, "PCM length must be even (16-bit samples)");
	n = len / in;
	d = (uint8_t *)luaL_buffinitsize(L, &b, n * out);
	fn(d, s, n);
	luaL_pushresultsize(&b, n * out);
	return 1;
}

static int l_ulaw_encode(lua_State *L)
{
	return run_codec(L, ca_ulaw_encode, 2, 1);
}

static int l_ulaw_decode(lua_State *L)
{
	return run_codec(L, ca_ulaw_decode, 1, 2);
}

static int l_alaw_encode(lua_State *L)
{
	return run_codec(L, ca_alaw_encode, 2, 1);
}

static int l_alaw_decode(lua_State *L)
{
	return run_codec(L, ca_alaw_decode, 1, 2);
}

static int l_ulaw_to_alaw(lua_State *L)
{
	return run_codec(L, ca_ulaw_to_alaw, 1, 1);
}

static int l_alaw_to_ulaw(lua_State *L)
{
	return run_codec(L, ca_alaw_to_ulaw, 1, 1);
}

static int l_rms_dbfs(lua_State *L)
{
	size_t len;
	const uint8_t *s = (const uint8_t *)luaL_checklstring(L, 1, &len);

	luaL_argcheck(L, len % 2 == 0, 1, "PCM length must be even (16-bit samples)");
	lua_pushnumber(L, ca_pcm_rms_dbfs(s, len / 2));
	return 1;
}

static int l_ulaw_rms_dbfs(lua_State *L)
{
	size_t len;
	const uint8_t *s = (const uint8_t *)luaL_checklstring(L, 1, &len);

	lua_pushnumber(L, ca_ulaw_rms_dbfs(s, len));
	return 1;
}

static int l_resample_linear(lua_State *L)
{
	size_t len, n, m, j = 0;
	const uint8_t *s = (const uint8_t *)luaL_checklstring(L, 1, &len);
	lua_Integer from = luaL_checkinteger(L, 2), to = luaL_checkinteger(L, 3);
	int64_t rem = 0;
	luaL_Buffer b;
	uint8_t *out;

	luaL_argcheck(L, len % 2 == 0, 1, "PCM length must be even (16-bit samples)");
	luaL_argcheck(L, from >= 1000 && from <= 192000, 2, "rate must be 1000..192000 Hz");
	luaL_argcheck(L, to >= 1000 && to <= 192000, 3, "rate must be 1000..192000 Hz");
	n = len / 2;
	if (n == 0) {
		lua_pushliteral(L, "");
		return 1;
	}
	/*
	 * Exact integer positions: output i is input j + rem / to with
	 * j * to + rem = i * from. Floating point put (n - 1) * to / from a hair
	 * under a whole number and lost the last sample (24000 -> 22050 Hz of
	 * 481 samples gave 441, not 442).
	 */
	luaL_argcheck(L, n - 1 <= (SIZE_MAX / 2 - 1) / (size_t)to, 1, "clip too long");
	m = (n - 1) * (size_t)to / (size_t)from + 1;
	out = (uint8_t *)luaL_buffinitsize(L, &b, 2 * m);
	for (size_t i = 0; i < m; i++) {
		int a = rd16(s + 2 * j), c = j + 1 < n ? rd16(s + 2 * j + 2) : a;
		/* a + (c - a) * rem / to rounded half up, i.e. floor(2x + 1) / 2 */
		int64_t num = 2 * ((int64_t)a * to + (int64_t)(c - a) * rem) + to;
		int64_t den = 2 * (int64_t)to;
		int64_t v = num >= 0 ? num / den : -((-num + den - 1) / den);

		wr16(out + 2 * i, (int)v);	/* between a and c: in range */
		rem += from;
		if (rem >= to) {
			j += (size_t)(rem / to);
			rem %= to;
		}
	}
	luaL_pushresultsize(&b, 2 * m);
	return 1;
}

/* ---- Lua: resampler ---- */

static struct ca_resampler *check_resampler(lua_State *L)
{
	return luaL_checkudata(L, 1, RESAMPLER_MT);
}

static int l_resampler(lua_State *L)
{
	lua_Integer from = luaL_checkinteger(L, 1);
	lua_Integer to = luaL_checkinteger(L, 2);
	struct ca_resampler *r;

	luaL_argcheck(L, rate_index(from) >= 0, 1, "rate must be 8000, 16000 or 24000");
	luaL_argcheck(L, rate_index(to) >= 0, 2, "rate must be 8000, 16000 or 24000");
	r = lua_newuserdatauv(L, ca_resampler_size((int)from, (int)to), 0);
	ca_resampler_init(r, (int)from, (int)to);
	luaL_setmetatable(L, RESAMPLER_MT);
	return 1;
}

/* r:process(pcm). Stack: r, pcm, then the buffer's box if the output is big. */
static int l_process(lua_State *L)
{
	struct ca_resampler *r = check_resampler(L);
	size_t len, n;
	const uint8_t *s = (const uint8_t *)luaL_checklstring(L, 2, &len);
	luaL_Buffer b;
	uint8_t *o = (uint8_t *)luaL_buffinitsize(L, &b, ca_resampler_out_max(r, len));

	n = ca_resampler_process(r, s, len, o);
	luaL_pushresultsize(&b, n);
	return 1;
}

static int l_reset(lua_State *L)
{
	ca_resampler_reset(check_resampler(L));
	return 0;
}

static int l_delay(lua_State *L)
{
	lua_pushnumber(L, ca_resampler_delay(check_resampler(L)));
	return 1;
}

/* ---- Lua: framer ---- */

/*
 * A frame splitter: lives in its Lua userdata and holds no other resource.
 * buf keeps the bytes of the incomplete next frame (pending < size).
 */
struct framer {
	size_t size;
	size_t pending;
	uint8_t buf[];
};

static struct framer *check_framer(lua_State *L)
{
	return luaL_checkudata(L, 1, FRAMER_MT);
}

static int l_framer(lua_State *L)
{
	lua_Integer size = luaL_checkinteger(L, 1);
	struct framer *f;

	luaL_argcheck(L, size >= 1 && size <= FRAMER_MAX, 1, "frame size must be 1..1048576");
	f = lua_newuserdatauv(L, sizeof *f + (size_t)size, 0);
	f->size = (size_t)size;
	f->pending = 0;
	luaL_setmetatable(L, FRAMER_MT);
	return 1;
}

/* f:push(data). Stack: f, data, the result table. */
static int l_push(lua_State *L)
{
	struct framer *f = check_framer(L);
	size_t len;
	const char *s = luaL_checklstring(L, 2, &len);
	size_t frames = (f->pending + len) / f->size;
	lua_Integer i = 0;

	lua_createtable(L, frames > 1 << 24 ? 1 << 24 : (int)frames, 0);
	if (frames > 0 && f->pending > 0) {
		size_t need = f->size - f->pending;

		memcpy(f->buf + f->pending, s, need);
		lua_pushlstring(L, (const char *)f->buf, f->size);
		lua_rawseti(L, -2, ++i);
		f->pending = 0;
		s += need;
		len -= need;
	}
	for (; len >= f->size; s += f->size, len -= f->size) {
		lua_pushlstring(L, s, f->size);
		lua_rawseti(L, -2, ++i);
	}
	memcpy(f->buf + f->pending, s, len);
	f->pending += len;
	return 1;
}

static int l_pending(lua_State *L)
{
	lua_pushinteger(L, (lua_Integer)check_framer(L)->pending);
	return 1;
}

static int l_flush(lua_State *L)
{
	struct framer *f = check_framer(L);
	lua_Integer pad = luaL_optinteger(L, 2, 0xFF);

	luaL_argcheck(L, pad >= 0 && pad <= 255, 2, "pad must be a byte value 0..255");
	if (f->pending == 0) {
		lua_pushnil(L);
		return 1;
	}
	memset(f->buf + f->pending, (int)pad, f->size - f->pending);
	lua_pushlstring(L, (const char *)f->buf, f->size);
	f->pending = 0;
	return 1;
}

static int l_framer_reset(lua_State *L)
{
	check_framer(L)->pending = 0;
	return 0;
}

static void new_class(lua_State *L, const char *name, const luaL_Reg *methods)
{
	if (luaL_newmetatable(L, name)) {
		lua_newtable(L);
		luaL_setfuncs(L, methods, 0);
		lua_setfield(L, -2, "__index");
	}
	lua_pop(L, 1);
}

int luaopen_callagent_audio(lua_State *L)
{
	static const luaL_Reg resampler_methods[] = {
		{"process", l_process},
		{"reset", l_reset},
		{"delay", l_delay},
		{NULL, NULL}
	};
	static const luaL_Reg framer_methods[] = {
		{"push", l_push},
		{"pending", l_pending},
		{"flush", l_flush},
		{"reset", l_framer_reset},
		{NULL, NULL}
	};
	static const luaL_Reg fns[] = {
		{"ulaw_encode", l_ulaw_encode},
		{"ulaw_decode", l_ulaw_decode},
		{"alaw_encode", l_alaw_encode},
		{"alaw_decode", l_alaw_decode},
		{"ulaw_to_alaw", l_ulaw_to_alaw},
		{"alaw_to_ulaw", l_alaw_to_ulaw},
		{"rms_dbfs", l_rms_dbfs},
		{"resample_linear", l_resample_linear},
		{"ulaw_rms_dbfs", l_ulaw_rms_dbfs},
		{"resampler", l_resampler},
		{"framer", l_framer},
		{NULL, NULL}
	};

	ca_audio_init();
	new_class(L, RESAMPLER_MT, resampler_methods);
	new_class(L, FRAMER_MT, framer_methods);
	luaL_newlib(L, fns);
	return 1;
}
