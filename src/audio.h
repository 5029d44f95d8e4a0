/*
 * audio.h - the plain C side of callagent.audio: G.711 codecs, a polyphase
 * resampler and level measurement, with no Lua in sight. Used by the C unit
 * tests and meant for a C fast path that moves audio without going
 * through Lua.
 *
 * PCM is 16-bit signed little-endian mono, given as bytes with any
 * alignment. G.711 follows ITU-T G.191 (g711.c: ulaw_compress,
 * ulaw_expand, alaw_compress, alaw_expand); see audio.c for the details.
 *
 * Call ca_audio_init() once before anything else (luaopen_callagent_audio
 * does); it builds the tables and is idempotent.
 */
#ifndef CA_AUDIO_H
#define CA_AUDIO_H

#include <stddef.h>
#include <stdint.h>

void ca_audio_init(void);

/* One sample. */
uint8_t ca_ulaw_encode1(int16_t x);
int16_t ca_ulaw_decode1(uint8_t code);
uint8_t ca_alaw_encode1(int16_t x);
int16_t ca_alaw_decode1(uint8_t code);

/*
 * Buffers: n is the number of samples (codes). dst and src must not
 * overlap, except for the transcoders, which may work in place.
 */
void ca_ulaw_encode(uint8_t *dst, const uint8_t *pcm, size_t n);
void ca_ulaw_decode(uint8_t *pcm, const uint8_t *src, size_t n);
void ca_alaw_encode(uint8_t *dst, const uint8_t *pcm, size_t n);
void ca_alaw_decode(uint8_t *pcm, const uint8_t *src, size_t n);
void ca_ulaw_to_alaw(uint8_t *dst, const uint8_t *src, size_t n);
void ca_alaw_to_ulaw(uint8_t *dst, const uint8_t *src, size_t n);

/*
 * RMS level in dBFS (full scale 32768: a full-scale square wave is 0 dB,
 * a full-scale sine -3.01 dB); -INFINITY for silence or no samples.
 */
double ca_pcm_rms_dbfs(const uint8_t *pcm, size_t n);
double ca_ulaw_rms_dbfs(const uint8_t *ulaw, size_t n);

/*
 * Resampler between 8000, 16000 and 24000 Hz (any pair; equal rates copy).
 * The caller owns the memory: ca_resampler_size() bytes (0 when a rate is
 * not supported), suitably aligned for a pointer, then ca_resampler_init().
 * No other resource is held, so freeing the memory is all the cleanup.
 *
 * process() takes any number of bytes; an odd last byte is kept and joined
 * with the next call. It writes at most ca_resampler_out_max(r, len) bytes
 * to out and returns how many it wrote. After N input samples in total,
 * exactly ceil(N * to / from) output samples have come out.
 *
 * drop_carry() forgets a kept odd byte and nothing else: where one stream
 * ends and another starts, its half sample would be joined with the next
 * stream's first byte and shift every later sample by a byte.
 */
struct ca_resampler;

size_t ca_resampler_size(int from, int to);
int ca_resampler_init(struct ca_resampler *r, int from, int to);
void ca_resampler_reset(struct ca_resampler *r);
void ca_resampler_drop_carry(struct ca_resampler *r);
size_t ca_resampler_out_max(const struct ca_resampler *r, size_t len);
size_t ca_resampler_process(struct ca_resampler *r, const uint8_t *pcm, size_t len,
			    uint8_t *out);

/* Group delay of the filter in output samples (0 for equal rates). */
double ca_resampler_delay(const struct ca_resampler *r);

/*
 * Internal, for tests: on = 1 lets the resampler use the CPU's wider
 * vectors (AVX2 with FMA on x86-64) when it has them, 0 forces the portable
 * kernel. Returns whether the wide kernel was in use. ca_audio_init() turns
 * it on.
 */
int ca__audio_simd(int on);

#endif
