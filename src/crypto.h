/*
 * crypto.h - plain C base64 of callagent.crypto, for C callers (unit tests,
 * the audio fast path) that must not go through Lua.
 *
 * Standard base64 (RFC 4648 section 4) is written with padding and read
 * strictly: the length must be a multiple of 4, only the standard alphabet,
 * '=' only as one or two final characters, no whitespace, and the unused
 * bits before the padding must be zero (so every byte string has exactly one
 * accepted encoding). base64url (section 5) is written without padding and
 * read with the same rules, except that it takes no '=' at all and a length
 * of 1 mod 4 is the only impossible length.
 *
 * The decoders write garbage into out before they notice invalid input;
 * callers discard out when they return -1. in and out must not overlap.
 */
#ifndef CA_CRYPTO_H
#define CA_CRYPTO_H

#include <stddef.h>

/* Bytes ca_base64_encode writes for n input bytes. */
static inline size_t ca_base64_encoded_len(size_t n)
{
	return (n + 2) / 3 * 4;
}

/* Bytes ca_base64_decode may write for n input characters (at most). */
static inline size_t ca_base64_decoded_max(size_t n)
{
	return n / 4 * 3;
}

/* Characters ca_base64url_encode writes for n input bytes (no padding). */
static inline size_t ca_base64url_encoded_len(size_t n)
{
	return n / 3 * 4 + (n % 3 ? n % 3 + 1 : 0);
}

/* Bytes ca_base64url_decode may write for n input characters (at most). */
static inline size_t ca_base64url_decoded_max(size_t n)
{
	return n / 4 * 3 + n % 4 * 3 / 4;
}

/*
 * Encodes n bytes of in as standard base64 with padding into out, which must
 * hold ca_base64_encoded_len(n) bytes; writes no terminating NUL. Returns the
 * number of characters written.
 */
size_t ca_base64_encode(const unsigned char *in, size_t n, char *out);

/*
 * Decodes n characters of canonical standard base64 into out, which must hold
 * ca_base64_decoded_max(n) bytes. Returns the number of bytes written, or -1
 * when in is not canonical standard base64.
 */
long ca_base64_decode(const char *in, size_t n, unsigned char *out);

/*
 * Whether n characters are canonical standard base64, as ca_base64_decode
 * takes them, without decoding: for payloads passed on still encoded.
 */
int ca_base64_valid(const char *in, size_t n);

/* As above for base64url without padding (ca_base64url_encoded_len bytes). */
size_t ca_base64url_encode(const unsigned char *in, size_t n, char *out);

/* As above for base64url without padding (ca_base64url_decoded_max bytes). */
long ca_base64url_decode(const char *in, size_t n, unsigned char *out);

/*
 * The system CA store as OpenSSL's folder of certificates named by subject
 * hash: SSL_CERT_DIR if set, else OpenSSL's default (Debian: /etc/ssl/certs).
 * Both clients (fetch, ws) read it lazily: a handshake loads the root it needs.
 */
const char *ca_system_ca_dir(void);

#endif
