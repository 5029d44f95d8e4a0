/*
 * bridge.c - callagent.core.bridge: a call's audio path in C.
 *
 * The call flow is Lua (lua/callagent/bridge.lua); this is the part of it
 * that runs 50 times a second per direction per call. It taps two WebSocket
 * connections - the phone's Media Streams stream (server side) and the
 * model's Realtime session (client side) - and handles, without Lua:
 *   phone `media`  -> model input_audio_buffer.append (the base64 payload is
 *                     forwarded as is for audio/pcmu input; transcoded for pcma)
 *   phone `mark`   -> the played position of the model's audio items
 *   model response.output_audio.delta -> phone `media`, and a `mark` in the
 *                     same socket write once 100 ms of audio went out since
 *                     the last one; pcmu passes through, pcm (24 kHz) is
 *                     low-pass resampled to 8 kHz and mu-law encoded, pcma
 *                     transcoded
 *   model response.output_audio.done / response.done -> a `mark` after the
 *                     audio not yet marked
 *   model text deltas (of the transcripts, of function call arguments) ->
 *                     dropped: the call flow reads only the whole texts
 *                     (`.done`, `.completed`), and a response has dozens of
 *                     deltas, each a JSON decode in Lua
 * Between two echoed marks the played position is the last one plus the time
 * since, while more of the item is queued at the phone (it plays in real
 * time): as exact as a mark per chunk, with a fifth of the marks
 * when chunks are 20 ms.
 * Every other message goes on to Lua as before, and so does one of these
 * that a JSON parser could read otherwise than the taps' key scan (a key
 * twice, an escaped event name: see phone_tap); Lua hands its fields back.
 *
 *   b = bridge.new(phone_conn, model_conn_or_nil, {stream_sid = "MZ...",
 *                  output = "audio/pcmu" | "audio/pcm" | "audio/pcma",
 *                  input = "audio/pcmu" | "audio/pcma", ready = false,
 *                  max_marks = 600})
 *                        made when the phone's stream starts: its frames are
 *                        checked and kept here from the first one; at most
 *                        max_marks marks wait for their echo (then the oldest
 *                        counts as played: see drop_unechoed)
 *   b:link_model(conn)   the model connection, when it comes after the phone
 *   b:unlink_model()     lets go of it (not ready: dropped to connect again);
 *                        phone frames are kept again until the next is ready
 *   b:model_ready()      appends start; phone frames kept until now are sent first
 *   b:send_audio(item_id, b64)   model audio from Lua (what came before the phone,
 *                        or a delta the model tap left to Lua)
 *   b:phone_media(b64), b:phone_mark(name)   a phone media or mark message
 *                        the phone tap left to Lua, its field decoded
 *   b:item()             the model's current audio item: id (whole up to ITEM_ID_MAX),
 *                        sent_ms, played_ms (now), truncated
 *   b:clear()            barge-in: `clear` to the phone; every item with audio
 *                        not confirmed played stops (its later audio is dropped),
 *                        pending marks forgotten; returns a list of {id,
 *                        played_ms, sent_ms}, the one playing first (nil when
 *                        nothing to clear): the one playing is cut where the
 *                        phone is, items queued behind it at what played (0)
 *   b:unplayed()         true while sent audio has not been confirmed played
 *   b:on_drained(fn)     fn() once, when nothing is left unplayed (now, if so)
 *   b:stats()            {frames_in, appended, kept, deltas, media_out, dropped_kept,
 *                        bad_in, bad_out (payloads that were not base64: dropped),
 *                        text_deltas (dropped), marks (sent, not yet echoed),
 *                        marks_unechoed (taken as played at max_marks),
 *                        scratch (bytes held, for the whole process, to
 *                        unescape payloads written with JSON escapes: at
 *                        most 64 KiB between messages),
 *                        out (bytes of the output buffer the messages sent
 *                        are written into, for the whole process: likewise)}
 *   b:close()            detaches from both connections (idempotent; also __gc)
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "audio.h"
#include "crypto.h"
#include "wsconn.h"

#define BRIDGE_MT "callagent.Bridge"
#define MAX_KEPT 500		/* phone frames kept while the model is not ready (10 s) */
#define MAX_KEPT_BYTES 262144	/* and their base64 at most: 500 frames are 107 KiB */
#define ITEMS 8			/* model audio items remembered */
#define ITEM_ID_MAX 1024	/* an id kept whole up to this long (no real one is); a longer one: 63 bytes */
#define MARK_MS 100.0		/* audio sent between two marks */
#define MARKS_MAX 600		/* marks not yet echoed kept at most: 60 s of audio or more, 14 KiB */
#define MEDIA_MAX 43688		/* base64 characters of a media message at most: 32766 bytes, 4 s */

enum { FMT_PCMU, FMT_PCMA, FMT_PCM24 };

/* A model audio item: how much of it was sent to the phone and played there. */
struct item {
	char id[64];		/* the id, or the first 63 bytes of a longer one */
	size_t id_len;		/* the whole id's length: 0, a free slot */
	char *long_id;		/* an id of 64 to ITEM_ID_MAX bytes whole (a truncate must name it), else NULL;
				   the slot's own: freed when the slot is reused, and at close */
	double sent_ms, played_ms;
	uint64_t played_at;	/* uv_hrtime() when the phone was at played_ms; 0: not playing yet */
	int truncated;
	uint32_t gen;		/* which item of the call holds the slot, counting from 1 */
};

/* A mark sent after a chunk: when it comes back, item played up to end_ms. */
struct mark {
	uint32_t seq;
	int item;
	uint32_t gen;		/* items[item].gen when sent: a reused slot is another item */
	double end_ms;
};

/*
 * One call attempt's audio path. Created by bridge.new(), owned by its Lua
 * userdata; it holds no reference on the connections: each one's tap_closed
 * clears the pointer when it goes. The model connection may come later
 * (link_model): until it is there and ready, the phone's frames are kept.
 */
struct bridge {
	struct ca_ws *phone, *model;
	int out_fmt, in_fmt, ready;
	char sid[72];
	size_t sid_len;
	struct ca_resampler *rs;
	int rs_item;			/* the item whose audio rs had last, -1: none */
	char **kept;			/* payloads kept until the model is ready */
	int n_kept;
	size_t kept_bytes;
	struct item items[ITEMS];
	int cur;			/* index of the current item, -1: none */
	int next_item;
	uint32_t gens;			/* items seen so far */
	struct mark *marks;		/* FIFO ring */
	size_t m_head, m_len, m_cap;
	size_t m_max;			/* at most this many: then the oldest counts as played */
	uint32_t seq;
	int unmarked;			/* item of the audio sent since the last mark, -1: none */
	double unmarked_ms;
	int drained_ref;
	lua_Integer frames_in, appended, deltas, media_out, dropped_kept;
	lua_Integer bad_in, bad_out;	/* payloads that were not base64: dropped */
	lua_Integer text_deltas;	/* model text deltas dropped (no Lua reads them) */
	lua_Integer marks_unechoed;	/* marks taken as played with no echo (m_max reached) */
};

struct bridge_box {
	struct bridge *b;
};

/* ---- reading the little JSON we need, without a parser ---- */

static const char *skip_space(const char *p, const char *end)
{
	while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
		p++;
	return p;
}

/* The closing quote of the string whose first character is at p, or NULL. */
static const char *string_end(const char *p, const char *end)
{
	const char *first = p;

	while (p < end) {
		const char *q = memchr(p, '"', (size_t)(end - p)), *b = q;

		if (q == NULL)
			return NULL;
		while (b > first && b[-1] == '\\')
			b--;
		if (((q - b) & 1) == 0)
			return q;	/* not escaped: an even run of backslashes before it */
		p = q + 1;
	}
	return NULL;
}

/*
 * The "key": value pairs of a JSON text, in order, with the depth of each
 * key (1: in the top-level object) and, for a key at depth 2, the top-level
 * key it is under. Keys and string values come raw (escapes left in); v is
 * NULL when the value is not a string (its keys come next). memchr carries
 * the scan through strings, so a long base64 value costs little; between
 * two strings, each byte is looked at for the brackets.
 */
struct pairs {
	const char *p, *end;
	const char *k, *v;
	size_t kl, vl;
	int depth;		/* objects and arrays open at p: the key's depth */
	const char *pk;		/* the last top-level key whose value is not a string */
	size_t pkl;
};

static inline __attribute__((always_inline)) int next_pair(struct pairs *j)
{
	const char *p = j->p, *end = j->end;
	int d = j->depth;

	while (p < end) {
		const char *a, *b, *c, *e;

		/* The next string, usually after "," or "{"; brackets on the way. */
		while (*p != '"') {
			if (*p == '{' || *p == '[')
				d++;
			else if (*p == '}' || *p == ']')
				d--;
			if (++p == end)
				goto out;
		}
		if ((b = string_end(p + 1, end)) == NULL)
			break;
		a = p;
		c = skip_space(b + 1, end);
		if (c == end || *c != ':') {
			p = b + 1;	/* a string in an array */
			continue;
		}
		c = skip_space(c + 1, end);
		j->k = a + 1;
		j->kl = (size_t)(b - a - 1);
		j->depth = d;
		if (c < end && *c == '"') {
			if ((e = string_end(c + 1, end)) == NULL)
				break;
			j->v = c + 1;
			j->vl = (size_t)(e - c - 1);
			j->p = e + 1;
		} else {
			if (d == 1) {
				j->pk = j->k;
				j->pkl = j->kl;
			}
			j->v = NULL;	/* a number, object, ...: read on from its start */
			j->vl = 0;
			j->p = c;
		}
		return 1;
	}
out:
	j->p = end;
	return 0;
}

#define IS(ptr, len, lit) ((len) == sizeof(lit) - 1 && memcmp((ptr), lit, sizeof(lit) - 1) == 0)

/* The value of four hex digits at s, or -1. */
static int hex4(const char *s)
{
	int v = 0;

	for (int i = 0; i < 4; i++) {
		int c = (unsigned char)s[i], l = c | 0x20;	/* l: a letter in lower case */

		if (c >= '0' && c <= '9')
			v = v * 16 + c - '0';
		else if (l >= 'a' && l <= 'f')
			v = v * 16 + l - 'a' + 10;
		else
			return -1;
	}
	return v;
}

static int base64_char(int c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' || c == '/' ||
	       c == '=';
}

/*
 * A base64 value as it may come in JSON: "\/" for "/" is legal, and some
 * encoders write it; so is any base64 character as "\u00XX" ("\u002F").
 * Rare: then the value is copied with its escapes decoded. Any other
 * escape ("\n", "\\", "\"", "\u000A", ...) stands for a character base64
 * has not: NULL, the value is not base64. Dropping only the backslash made
 * "AAA\u002F" the base64 "AAAu002F", and "\n" an "n": wrong audio, unseen.
 */
static char *scratch;		/* unescaped values, one for the process */
static size_t scratch_cap;

static const char *unescaped(const char *v, size_t *n)
{
	char *tmp;
	const char *s = v, *end = v + *n, *bs = memchr(v, '\\', *n);
	size_t k = 0;

	if (bs == NULL)
		return v;
	if (*n > scratch_cap) {
		scratch_cap = *n + 1024;
		scratch = ca_realloc(scratch, scratch_cap);
	}
	tmp = scratch;
	/* From escape to escape: the runs between are copied whole. */
	do {
		int c;

		memcpy(tmp + k, s, (size_t)(bs - s));
		k += (size_t)(bs - s);
		if (end - bs >= 2 && bs[1] == '/') {
			c = '/';
			s = bs + 2;
		} else if (end - bs >= 6 && bs[1] == 'u' && (c = hex4(bs + 2)) >= 0 && base64_char(c)) {
			s = bs + 6;
		} else {
			return NULL;
		}
		tmp[k++] = (char)c;
	} while ((bs = memchr(s, '\\', (size_t)(end - s))) != NULL);
	memcpy(tmp + k, s, (size_t)(end - s));
	*n = k + (size_t)(end - s);
	return tmp;
}

/*
 * Once the value unescaped() gave is used: a scratch grown past SCRATCH_KEEP
 * for one large value (a model delta may be megabytes) is freed, not held
 * for the rest of the process; a small one is kept for the next.
 */
#define SCRATCH_KEEP 65536

static void scratch_done(void)
{
	if (scratch_cap > SCRATCH_KEEP) {
		free(scratch);
		scratch = NULL;
		scratch_cap = 0;
	}
}

/* ---- writing ---- */

static char *buf;
static size_t buf_cap;

static char *room(size_t n)
{
	if (n > buf_cap) {
		buf_cap = n + 4096;
		buf = ca_realloc(buf, buf_cap);
	}
	return buf;
}

/*
 * After a message written into an output buffer grown past SCRATCH_KEEP
 * (an append of a phone payload of hundreds of KiB): freed, as the scratch
 * is. Media to the phone (MEDIA_MAX at most) and appends of phone frames
 * never grow it that far: no allocation per frame.
 */
static void room_done(void)
{
	if (buf_cap > SCRATCH_KEEP) {
		free(buf);
		buf = NULL;
		buf_cap = 0;
	}
}

static unsigned char *put(unsigned char *p, const void *s, size_t n)
{
	memcpy(p, s, n);
	return p + n;
}

static void append_to_model(struct bridge *b, const char *b64, size_t n)
{
	static const char pre[] = "{\"type\":\"input_audio_buffer.append\",\"audio\":\"";
	static const char post[] = "\"}";
	const char *err;
	char *p = room(sizeof pre + n + sizeof post);
	size_t len = 0;

	memcpy(p, pre, sizeof pre - 1);
	len += sizeof pre - 1;
	memcpy(p + len, b64, n);
	len += n;
	memcpy(p + len, post, sizeof post - 1);
	len += sizeof post - 1;
	if (ca__ws_send(b->model, p, len, LWS_WRITE_TEXT, &err) == 0)
		b->appended++;
	room_done();
}

/*
 * A payload that is not base64 is dropped, and the first one of each
 * direction logged: passed on as is, its bytes would be written into the
 * JSON for the other side unchecked.
 */
static void bad_payload(struct bridge *b, lua_Integer *count, const char *what, size_t n)
{
	if ((*count)++ == 0)
		ca_log(CA_LOG_WARN, "bridge: stream %s: %s is not base64 (%zu bytes): dropped, "
		       "and any more like it", b->sid, what, n);
}

/* Phone audio (base64 mu-law) toward the model, in the model's input format. */
static void phone_audio(struct bridge *b, const char *b64, size_t n)
{
	char stack_out[4096 * 4 / 3 + 8], *out = stack_out;
	unsigned char stack_raw[4096], *raw = stack_raw;

	b->frames_in++;
	if (n == 0)
		return;		/* nothing to hear */
	if (b->in_fmt == FMT_PCMA) {
		size_t max = ca_base64_decoded_max(n);
		long m;

		if (max > sizeof stack_raw) {	/* frames are 160 bytes, but any length is audio */
			raw = ca_malloc(max);
			out = ca_malloc(ca_base64_encoded_len(max) + 1);
		}
		if ((m = ca_base64_decode(b64, n, raw)) < 0) {
			bad_payload(b, &b->bad_in, "a phone media payload", n);
			goto done;
		}
		ca_ulaw_to_alaw(raw, raw, (size_t)m);
		n = ca_base64_encode(raw, (size_t)m, out);
		b64 = out;
	} else if (!ca_base64_valid(b64, n)) {
		bad_payload(b, &b->bad_in, "a phone media payload", n);
		return;
	}
	if (b->ready && b->model) {
		append_to_model(b, b64, n);
	} else if (b->n_kept < MAX_KEPT && b->kept_bytes + n <= MAX_KEPT_BYTES) {
		char *c = ca_malloc(n + 1);

		b->kept_bytes += n;
		memcpy(c, b64, n);
		c[n] = '\0';
		if (b->kept == NULL)
			b->kept = ca_malloc(sizeof *b->kept * MAX_KEPT);
		b->kept[b->n_kept++] = c;
	} else {
		b->dropped_kept++;
	}
done:
	if (raw != stack_raw) {
		free(raw);
		free(out);
	}
}

/* Item i is id: the same length and bytes (a long id: its first 63, then all). */
static int is_item(const struct item *it, const char *id, size_t n)
{
	size_t kept = n < sizeof it->id ? n : sizeof it->id - 1;

	return it->id_len == n && memcmp(it->id, id, kept) == 0 &&
	       (it->long_id == NULL || memcmp(it->long_id, id, n) == 0);
}

/* An item's id, whole (past ITEM_ID_MAX: its first 63 bytes), on the Lua stack. */
static void push_id(lua_State *L, const struct item *it)
{
	if (it->long_id)
		lua_pushlstring(L, it->long_id, it->id_len);
	else
		lua_pushlstring(L, it->id, it->id_len < sizeof it->id ? it->id_len : sizeof it->id - 1);
}

static int find_item(struct bridge *b, const char *id, size_t n)
{
	struct item *it;

	if (b->cur >= 0 && is_item(&b->items[b->cur], id, n))
		return b->cur;
	for (int i = 0; i < ITEMS; i++)
		if (b->items[i].id_len > 0 && is_item(&b->items[i], id, n))
			return i;
	/*
	 * A new item: the oldest slot; an odd byte the resampler kept of that
	 * one's is not this one's. Marks of the old item may still be in
	 * flight (more than ITEMS queued at the phone): its generation tells
	 * them apart, so they do not count as this item's playing.
	 */
	if (b->rs_item == b->next_item)
		b->rs_item = -1;
	it = &b->items[b->next_item];
	free(it->long_id);
	memset(it, 0, sizeof *it);
	it->id_len = n;
	it->gen = ++b->gens;
	memcpy(it->id, id, n < sizeof it->id ? n : sizeof it->id - 1);
	if (n >= sizeof it->id && n <= ITEM_ID_MAX) {	/* once per item, not per delta */
		it->long_id = ca_malloc(n);
		memcpy(it->long_id, id, n);
	}
	b->cur = b->next_item;
	b->next_item = (b->next_item + 1) % ITEMS;
	return b->cur;
}

static int playing(struct bridge *b);

/* What follows in the phone's queue plays from now on. */
static void front_plays(struct bridge *b, uint64_t now)
{
	int front = playing(b);

	if (front >= 0 && b->items[front].played_at == 0)
		b->items[front].played_at = now;
}

/* The oldest mark: the phone played the audio up to it (its item is there now). */
static void pop_mark(struct bridge *b, uint64_t now)
{
	struct mark *m = &b->marks[b->m_head];
	struct item *it = &b->items[m->item];

	if (it->gen == m->gen && !it->truncated && m->end_ms > it->played_ms) {
		it->played_ms = m->end_ms;
		it->played_at = now;
	}
	b->m_head = (b->m_head + 1) % b->m_cap;
	b->m_len--;
}

/*
 * The ring is full: m_max marks (each after 100 ms of audio or more) sent
 * and none of them echoed yet. A phone that echoes is never that far
 * behind: the model sends faster than real time, but a response's audio
 * comes seconds, not a minute, ahead of its playing. This phone does not
 * echo marks (a vendor that does not, a stream stuck), and the list would
 * grow by a mark per 100 ms of the agent's audio until the call ends. The
 * oldest mark counts as played instead, as if echoed: the phone plays what
 * it gets in real time, so what was sent m_max marks ago has played unless
 * its queue is longer than that. Only the position a barge-in cuts at
 * depends on it: an item that began playing over m_max marks ago is cut at
 * most that far behind what was sent (and between marks, as ever, by the
 * time since); one queued behind the oldest mark kept, at what played of
 * it (0), as without the bound. Once per bridge (a call attempt), a WARN.
 */
static void drop_unechoed(struct bridge *b)
{
	uint64_t now = uv_hrtime();

	if (b->marks_unechoed++ == 0)
		ca_log(CA_LOG_WARN, "bridge: stream %s: the phone has echoed none of the last %zu marks "
		       "(%g s of agent audio at least): does it echo marks? From now on, audio further behind what "
		       "was sent is taken as played (where a barge-in cuts the agent)", b->sid, b->m_len,
		       (double)b->m_len * MARK_MS / 1000);
	pop_mark(b, now);
	front_plays(b, now);
}

static void push_mark(struct bridge *b, uint32_t seq, int item, uint32_t gen, double end_ms)
{
	if (b->m_len == b->m_cap && b->m_cap >= b->m_max) {
		drop_unechoed(b);	/* full: it grows no more */
	} else if (b->m_len == b->m_cap) {
		size_t cap = b->m_cap ? b->m_cap * 2 : 8;	/* a mark per 100 ms: a few in flight */
		struct mark *m;

		if (cap > b->m_max)
			cap = b->m_max;
		m = ca_malloc(cap * sizeof *m);

		for (size_t i = 0; i < b->m_len; i++)
			m[i] = b->marks[(b->m_head + i) % b->m_cap];
		free(b->marks);
		b->marks = m;
		b->m_head = 0;
		b->m_cap = cap;
	}
	b->marks[(b->m_head + b->m_len) % b->m_cap] = (struct mark){seq, item, gen, end_ms};
	b->m_len++;
}

/* A `mark` frame at p, named by b->seq; returns the end. */
static unsigned char *put_mark(struct bridge *b, unsigned char *p)
{
	static const char mark1[] = "{\"event\":\"mark\",\"streamSid\":\"";
	static const char mark2[] = "\",\"mark\":{\"name\":\"";
	char digits[12];
	size_t dl = 0;
	uint32_t seq = b->seq;

	do {
		digits[sizeof digits - 1 - dl++] = (char)('0' + seq % 10);
		seq /= 10;
	} while (seq);
	p += ca__ws_header(p, 1, sizeof mark1 - 1 + b->sid_len + sizeof mark2 - 1 + dl + 3, 0);
	p = put(p, mark1, sizeof mark1 - 1);
	p = put(p, b->sid, b->sid_len);
	p = put(p, mark2, sizeof mark2 - 1);
	p = put(p, digits + sizeof digits - dl, dl);
	return put(p, "\"}}", 3);
}

/* The longest `mark` frame: header, constant text, stream sid, digits. */
#define MARK_MAX (2 + 64 + sizeof ((struct bridge *)0)->sid + 12)

/* Mark b->seq went out after item's audio so far: none is unmarked now. */
static void marked(struct bridge *b, int item)
{
	push_mark(b, b->seq, item, b->items[item].gen, b->items[item].sent_ms);
	b->unmarked = -1;
	b->unmarked_ms = 0;
}

/* A mark after the audio sent since the last one, if any. */
static void flush_mark(struct bridge *b)
{
	unsigned char *out, *p;
	const char *err;
	int item = b->unmarked;

	if (item < 0)
		return;
	b->unmarked = -1;
	b->unmarked_ms = 0;
	if (b->phone == NULL)
		return;
	b->seq++;
	out = (unsigned char *)room(MARK_MAX);
	p = put_mark(b, out);
	if (ca__ws_send(b->phone, out, (size_t)(p - out), LWS_WRITE_RAW, &err) == 0)
		marked(b, item);
}

/*
 * Mu-law bytes to the phone: `media`, then a `mark` once MARK_MS of audio
 * went out since the last one, framed here, one write. Written straight into
 * the output buffer from constant pieces: no printf and no second copy of
 * the payload on the per-frame path.
 */
static int send_media(struct bridge *b, int item, const char *b64, size_t n, size_t bytes)
{
	static const char media1[] = "{\"event\":\"media\",\"streamSid\":\"";
	static const char media2[] = "\",\"media\":{\"payload\":\"";
	struct item *it = &b->items[item];
	size_t media_len = sizeof media1 - 1 + b->sid_len + sizeof media2 - 1 + n + 3;
	unsigned char *out, *p;
	const char *err;
	double ms = (double)bytes / 8.0;
	int mark;

	if (b->unmarked >= 0 && b->unmarked != item)
		flush_mark(b);	/* the last item's tail gets its own mark */
	if (b->m_len == 0 && b->unmarked < 0)
		it->played_at = uv_hrtime();	/* nothing queued there: it plays on arrival */
	mark = b->unmarked_ms + ms >= MARK_MS;
	out = p = (unsigned char *)room(media_len + 10 + MARK_MAX);
	p += ca__ws_header(p, 1, media_len, 0);
	p = put(p, media1, sizeof media1 - 1);
	p = put(p, b->sid, b->sid_len);
	p = put(p, media2, sizeof media2 - 1);
	p = put(p, b64, n);
	p = put(p, "\"}}", 3);
	if (mark) {
		b->seq++;
		p = put_mark(b, p);
	}
	if (ca__ws_send(b->phone, out, (size_t)(p - out), LWS_WRITE_RAW, &err) != 0)
		return -1;
	it->sent_ms += ms;
	b->media_out++;
	if (mark) {
		marked(b, item);
	} else {
		b->unmarked = item;
		b->unmarked_ms += ms;
	}
	return 0;
}

/*
 * Model audio of any length to the phone: a delta may hold minutes (the
 * model connection takes 16 MiB messages), and one message over the phone
 * connection's max_send_queue drops the call. Pieces of MEDIA_MAX base64
 * characters each are media messages of their own, each counted and marked
 * as a delta would be.
 */
static void send_audio(struct bridge *b, int item, const char *b64, size_t n, size_t bytes)
{
	while (n > MEDIA_MAX) {
		if (send_media(b, item, b64, MEDIA_MAX, MEDIA_MAX / 4 * 3) != 0)
			return;
		b64 += MEDIA_MAX;
		n -= MEDIA_MAX;
		bytes -= MEDIA_MAX / 4 * 3;
	}
	send_media(b, item, b64, n, bytes);
}

/* Model audio (base64 in the output format) to the phone as mu-law. */
static void model_audio(struct bridge *b, const char *id, size_t idn, const char *b64, size_t n)
{
	size_t raw_max = ca_base64_decoded_max(n);
	unsigned char stack_raw[8192], stack_pcm[4096], stack_ulaw[2048];
	unsigned char *raw = stack_raw, *pcm = stack_pcm, *ulaw = stack_ulaw;
	char stack_out[(sizeof stack_ulaw + 2) / 3 * 4], *out = stack_out;	/* its base64 */
	long m = 0;
	size_t ulen;
	int item;

	if (b->phone == NULL || n == 0)
		return;
	/* Checked before it counts as the item's audio: a bad delta changes nothing. */
	if (b->out_fmt == FMT_PCMU) {
		if (!ca_base64_valid(b64, n))
			m = -1;
	} else {
		if (raw_max > sizeof stack_raw)
			raw = ca_malloc(raw_max);
		m = ca_base64_decode(b64, n, raw);
	}
	if (m < 0) {
		bad_payload(b, &b->bad_out, "a model audio delta", n);
		goto done;
	}
	item = find_item(b, id, idn);
	if (b->items[item].truncated)
		goto done;	/* interrupted: the rest of this item is not played */
	b->deltas++;
	if (b->out_fmt == FMT_PCMU) {
		send_audio(b, item, b64, n, n / 4 * 3 - (b64[n - 1] == '=') - (b64[n - 2] == '='));
		return;
	}
	if (b->out_fmt == FMT_PCMA) {
		ulen = (size_t)m;
		if (ulen > sizeof stack_ulaw)
			ulaw = ca_malloc(ulen);
		ca_alaw_to_ulaw(ulaw, raw, ulen);
	} else {
		size_t pmax;

		/*
		 * An odd byte left by another item is half of its last sample:
		 * joined with this item's first byte, every later sample of this
		 * one would be a byte off (noise) until a barge-in's reset.
		 */
		if (item != b->rs_item) {
			ca_resampler_drop_carry(b->rs);
			b->rs_item = item;
		}
		pmax = ca_resampler_out_max(b->rs, (size_t)m);

		if (pmax > sizeof stack_pcm)
			pcm = ca_malloc(pmax);
		ulen = ca_resampler_process(b->rs, raw, (size_t)m, pcm) / 2;
		if (ulen > sizeof stack_ulaw)
			ulaw = ca_malloc(ulen);
		ca_ulaw_encode(ulaw, pcm, ulen);
	}
	if (ulen > 0) {
		if (ca_base64_encoded_len(ulen) > sizeof stack_out)
			out = ca_malloc(ca_base64_encoded_len(ulen));
		send_audio(b, item, out, ca_base64_encode(ulaw, ulen, out), ulen);
	}
done:
	if (out != stack_out)
		free(out);
	if (raw != stack_raw)
		free(raw);
	if (pcm != stack_pcm)
		free(pcm);
	if (ulaw != stack_ulaw)
		free(ulaw);
}

static void call_drained(struct bridge *b)
{
	lua_State *L = ca_lua();
	int ref = b->drained_ref;

	if (ref == LUA_NOREF)
		return;
	flush_mark(b);
	if (b->m_len > 0)
		return;
	b->drained_ref = LUA_NOREF;
	if (L) {
		ca_call_ref(ref, 0, "bridge drained callback");
		luaL_unref(L, LUA_REGISTRYINDEX, ref);
	}
}

/*
 * The item the phone plays now, or -1: the oldest one with audio not
 * confirmed played; -1 too when that one's slot went to a newer item.
 */
static int playing(struct bridge *b)
{
	const struct mark *m;

	if (b->m_len == 0)
		return b->unmarked;
	m = &b->marks[b->m_head];
	return b->items[m->item].gen == m->gen ? m->item : -1;
}

/* The phone echoed mark seq: everything sent up to it has played. */
static void mark_played(struct bridge *b, uint32_t seq)
{
	uint64_t now = uv_hrtime();

	while (b->m_len > 0 && (int32_t)(b->marks[b->m_head].seq - seq) <= 0)
		pop_mark(b, now);
	front_plays(b, now);
	call_drained(b);
}

/*
 * The phone echoed a mark named name: ours are the decimal numbers of b->seq
 * as it counts up, so only 1 to 10 digits of a number at most b->seq name
 * one. Any other name is not an echo of ours; taken as a number, it would
 * confirm audio that has not played (the goodbye's drain, a barge-in's cut).
 */
static void mark_echoed(struct bridge *b, const char *name, size_t n)
{
	uint64_t seq = 0;

	if (n == 0 || n > 10)
		return;
	for (size_t i = 0; i < n; i++) {
		if (name[i] < '0' || name[i] > '9')
			return;
		seq = seq * 10 + (uint64_t)(name[i] - '0');
	}
	if (seq > UINT32_MAX || (int32_t)((uint32_t)seq - b->seq) > 0)
		return;		/* not sent yet */
	mark_played(b, (uint32_t)seq);
}

/*
 * Where the phone is in item i now: its last echoed mark, plus the time
 * since while more of the item is queued there, up to the next mark.
 */
static double played_now(struct bridge *b, int i)
{
	struct item *it = &b->items[i];
	double ms, bound;

	if (it->truncated || it->played_at == 0 || playing(b) != i)
		return it->played_ms;
	bound = b->m_len > 0 ? b->marks[b->m_head].end_ms : it->sent_ms;
	ms = it->played_ms + (double)(uv_hrtime() - it->played_at) / 1e6;
	return ms < bound ? ms : bound;
}

/* ---- the taps ---- */

/*
 * The taps read a message as a JSON parser would, or leave it to Lua's
 * (cjson, which keeps the last of a key given twice): the keys that matter
 * are read at their depth only, and a message where one of them comes
 * twice, has a value that is not a string, or an event name we do not know
 * (perhaps an escaped one), goes to Lua. Messages as Twilio and OpenAI
 * write them take none of these ways. Keys are compared raw: one written
 * with escapes is another key here.
 */
static int phone_tap(void *ctx, struct ca_ws *ws, const char *s, size_t n)
{
	struct bridge *b = ctx;
	struct pairs j = {s, s + n, NULL, NULL, 0, 0, 0, NULL, 0};
	enum { UNKNOWN, MEDIA, MARK } ev = UNKNOWN;
	const char *pay = NULL, *name = NULL;
	size_t payl = 0, namel = 0;
	int objs = 0;		/* top-level keys seen: 1 "media", 2 "mark" */

	(void)ws;
	/* "event", "media" {"payload"} and "mark" {"name"}, in any order. */
	while (next_pair(&j)) {
		if (j.depth == 1) {
			if (IS(j.k, j.kl, "event")) {
				if (ev != UNKNOWN || j.v == NULL)
					return 0;
				if (IS(j.v, j.vl, "media"))
					ev = MEDIA;
				else if (IS(j.v, j.vl, "mark"))
					ev = MARK;
				else
					return 0;	/* start, stop, dtmf: Lua's */
			} else if (IS(j.k, j.kl, "media") || IS(j.k, j.kl, "mark")) {
				int bit = j.k[1] == 'e' ? 1 : 2;

				if (objs & bit)
					return 0;
				objs |= bit;
			}
		} else if (j.depth == 2) {
			if (IS(j.k, j.kl, "payload") && IS(j.pk, j.pkl, "media")) {
				if (pay || j.v == NULL)
					return 0;
				pay = j.v;
				payl = j.vl;
			} else if (IS(j.k, j.kl, "name") && IS(j.pk, j.pkl, "mark")) {
				if (name || j.v == NULL)
					return 0;
				name = j.v;
				namel = j.vl;
			}
		}
	}
	if (ev == MEDIA && pay) {
		const char *p = unescaped(pay, &payl);

		if (p) {
			phone_audio(b, p, payl);
		} else {
			b->frames_in++;
			bad_payload(b, &b->bad_in, "a phone media payload", payl);
		}
		if (p != pay)
			scratch_done();	/* it was unescaped */
	} else if (ev == MARK && name) {
		if (memchr(name, '\\', namel))
			return 0;	/* Lua's, to read the name */
		mark_echoed(b, name, namel);
	}
	return ev != UNKNOWN;	/* media or mark without its field: nothing to do */
}

/* Whether an event type is a delta of text that Lua reads only whole. */
static int text_delta(const char *t, size_t n)
{
	return IS(t, n, "response.output_audio_transcript.delta") || IS(t, n, "response.audio_transcript.delta") ||
	       IS(t, n, "conversation.item.input_audio_transcription.delta") ||
	       IS(t, n, "response.function_call_arguments.delta") || IS(t, n, "response.output_text.delta") ||
	       IS(t, n, "response.text.delta");
}

static int model_tap(void *ctx, struct ca_ws *ws, const char *s, size_t n)
{
	struct bridge *b = ctx;
	struct pairs j = {s, s + n, NULL, NULL, 0, 0, 0, NULL, 0};
	enum { OTHER, AUDIO, TEXT } kind = OTHER;
	const char *id = NULL, *d = NULL, *p;
	size_t idn = 0, dn = 0;

	(void)ws;
	/* OpenAI sends "type" first: any other event is Lua's after one pair. */
	while (next_pair(&j)) {
		if (j.depth != 1)
			continue;
		if (IS(j.k, j.kl, "type")) {
			if (kind != OTHER || j.v == NULL)
				return 0;
			if (IS(j.v, j.vl, "response.output_audio.delta") || IS(j.v, j.vl, "response.audio.delta")) {
				kind = AUDIO;
				continue;
			}
			/* The audio is over: the phone tells when its end has played. */
			if (b->unmarked >= 0 && (IS(j.v, j.vl, "response.output_audio.done") ||
			    IS(j.v, j.vl, "response.audio.done") || IS(j.v, j.vl, "response.done")))
				flush_mark(b);
			if (!text_delta(j.v, j.vl))
				return 0;
			kind = TEXT;
		} else if (IS(j.k, j.kl, "item_id")) {
			if (id || j.v == NULL)
				return 0;
			id = j.v;
			idn = j.vl;
		} else if (IS(j.k, j.kl, "delta")) {
			if (d || j.v == NULL)
				return 0;
			d = j.v;
			dn = j.vl;
		}
	}
	if (kind == TEXT)
		b->text_deltas++;
	if (kind != AUDIO || id == NULL || d == NULL)
		return kind != OTHER;
	/* An escaped id names the item as Lua decodes it (a truncate sends it back). */
	if (!(b->cur >= 0 && is_item(&b->items[b->cur], id, idn)) && memchr(id, '\\', idn))
		return 0;
	if ((p = unescaped(d, &dn)) != NULL)
		model_audio(b, id, idn, p, dn);
	else
		bad_payload(b, &b->bad_out, "a model audio delta", dn);
	if (p != d)
		scratch_done();	/* it was unescaped */
	return 1;
}

static void tap_closed(void *ctx, struct ca_ws *ws)
{
	struct bridge *b = ctx;

	if (b->phone == ws)
		b->phone = NULL;
	if (b->model == ws)
		b->model = NULL;
}

static void detach(struct bridge *b)
{
	if (b->phone) {
		b->phone->tap = NULL;
		b->phone->tap_closed = NULL;
		b->phone = NULL;
	}
	if (b->model) {
		b->model->tap = NULL;
		b->model->tap_closed = NULL;
		b->model = NULL;
	}
}

static void free_kept(struct bridge *b)
{
	for (int i = 0; i < b->n_kept; i++)
		free(b->kept[i]);
	free(b->kept);
	b->kept = NULL;
	b->n_kept = 0;
	b->kept_bytes = 0;
}

/* ---- Lua ---- */

static struct bridge *check(lua_State *L)
{
	struct bridge_box *box = luaL_checkudata(L, 1, BRIDGE_MT);

	if (box->b == NULL)
		luaL_argerror(L, 1, "bridge closed");
	return box->b;
}

static int fmt_of(lua_State *L, const char *s)
{
	if (strcmp(s, "audio/pcmu") == 0)
		return FMT_PCMU;
	if (strcmp(s, "audio/pcma") == 0)
		return FMT_PCMA;
	if (strcmp(s, "audio/pcm") == 0)
		return FMT_PCM24;
	return luaL_error(L, "unknown audio format '%s'", s);
}

/* The model's end of the bridge: a client connection no one else taps. */
static void tap_model(lua_State *L, struct bridge *b, struct ca_ws *model)
{
	if (model->tap)
		luaL_error(L, "a connection is already bridged");
	if (!model->is_client)
		luaL_error(L, "the model connection must be a client connection");
	if (model->state == CA_WS_CLOSED)
		return;		/* gone already: the call ends with it */
	b->model = model;
	model->tap = model_tap;
	model->tap_closed = tap_closed;
	model->tap_ctx = b;
}

/* A stream sid goes into every message to the phone as it is: printable, no quote or backslash. */
static int sid_ok(const char *sid)
{
	size_t n = strlen(sid);

	for (size_t i = 0; i < n; i++)
		if ((unsigned char)sid[i] < 0x20 || sid[i] == 0x7f || sid[i] == '"' || sid[i] == '\\')
			return 0;
	return n < 64;
}

static int l_new(lua_State *L)
{
	struct ca_ws *phone = ca__ws_check(L, 1);
	struct ca_ws *model = lua_isnoneornil(L, 2) ? NULL : ca__ws_check(L, 2);
	struct bridge_box *box;
	struct bridge *b;
	const char *sid;
	int out_fmt, in_fmt, ready;
	lua_Integer max_marks;

	luaL_checktype(L, 3, LUA_TTABLE);
	sid = ca_opt_string_field(L, 3, "stream_sid", "");
	luaL_argcheck(L, sid_ok(sid), 3, "bad stream_sid");
	out_fmt = fmt_of(L, ca_opt_string_field(L, 3, "output", "audio/pcmu"));
	in_fmt = fmt_of(L, ca_opt_string_field(L, 3, "input", "audio/pcmu"));
	if (in_fmt == FMT_PCM24)
		return luaL_error(L, "the phone side is G.711: input must be audio/pcmu or audio/pcma");
	ready = ca_opt_bool_field(L, 3, "ready", 0);
	max_marks = ca_opt_int_field(L, 3, "max_marks", MARKS_MAX);
	luaL_argcheck(L, max_marks >= 1 && max_marks <= 1000000, 3, "max_marks: 1 to 1000000");
	if (phone->tap || (model && model->tap))
		return luaL_error(L, "a connection is already bridged");
	if (phone->is_client || (model && !model->is_client))
		return luaL_error(L, "bridge.new(phone, model): the phone is a server-side connection, the model a client");
	box = lua_newuserdatauv(L, sizeof *box, 0);
	box->b = NULL;
	luaL_setmetatable(L, BRIDGE_MT);
	b = ca_malloc(sizeof *b);
	memset(b, 0, sizeof *b);
	b->cur = -1;
	b->unmarked = -1;
	b->rs_item = -1;
	b->drained_ref = LUA_NOREF;
	b->out_fmt = out_fmt;
	b->in_fmt = in_fmt;
	b->ready = ready;
	b->m_max = (size_t)max_marks;
	snprintf(b->sid, sizeof b->sid, "%s", sid);
	b->sid_len = strlen(b->sid);
	if (b->out_fmt == FMT_PCM24) {
		b->rs = ca_malloc(ca_resampler_size(24000, 8000));
		ca_resampler_init(b->rs, 24000, 8000);
	}
	b->phone = phone;
	phone->tap = phone_tap;
	phone->tap_closed = tap_closed;
	phone->tap_ctx = b;
	box->b = b;
	if (model)
		tap_model(L, b, model);
	return 1;
}

/* The frames kept while the model was not there or not ready, in order. */
static void send_kept(struct bridge *b)
{
	if (b->model == NULL)
		return;
	for (int i = 0; i < b->n_kept; i++)
		append_to_model(b, b->kept[i], strlen(b->kept[i]));
	free_kept(b);
}

static int l_link_model(lua_State *L)
{
	struct bridge *b = check(L);
	struct ca_ws *model = ca__ws_check(L, 2);

	if (b->model == model)
		return 0;
	if (b->model)
		return luaL_error(L, "the bridge has a model connection");
	tap_model(L, b, model);
	if (b->ready)
		send_kept(b);
	return 0;
}

/* The model connection is dropped before it was ready (to connect again):
 * the bridge lets go of it, and keeps the phone's frames for the next one. */
static int l_unlink_model(lua_State *L)
{
	struct bridge *b = check(L);

	if (b->model) {
		b->model->tap = NULL;
		b->model->tap_closed = NULL;
		b->model = NULL;
	}
	b->ready = 0;
	return 0;
}

static int l_model_ready(lua_State *L)
{
	struct bridge *b = check(L);

	b->ready = 1;
	send_kept(b);
	return 0;
}

static int l_send_audio(lua_State *L)
{
	struct bridge *b = check(L);
	size_t idn, n;
	const char *id = luaL_checklstring(L, 2, &idn);
	const char *d = luaL_checklstring(L, 3, &n);

	model_audio(b, id, idn, d, n);
	return 0;
}

/* A media message the taps left to Lua (see phone_tap): its payload, decoded. */
static int l_phone_media(lua_State *L)
{
	struct bridge *b = check(L);
	size_t n;
	const char *b64 = luaL_checklstring(L, 2, &n);

	phone_audio(b, b64, n);
	return 0;
}

/* The same for a mark: its name, decoded. */
static int l_phone_mark(lua_State *L)
{
	struct bridge *b = check(L);
	size_t n;
	const char *name = luaL_checklstring(L, 2, &n);

	mark_echoed(b, name, n);
	return 0;
}

static int l_item(lua_State *L)
{
	struct bridge *b = check(L);
	struct item *it;

	if (b->cur < 0)
		return 0;
	it = &b->items[b->cur];
	push_id(L, it);
	lua_pushnumber(L, it->sent_ms);
	lua_pushnumber(L, played_now(b, b->cur));
	lua_pushboolean(L, it->truncated);
	return 4;
}

/* Barge-in: item i stops where the phone is in it, appended to the list on top. */
static void cut_item(lua_State *L, struct bridge *b, int i)
{
	struct item *it = &b->items[i];

	if (!it->id[0] || it->truncated || it->sent_ms <= it->played_ms)
		return;		/* nothing that has not been confirmed played */
	it->played_ms = played_now(b, i);
	it->truncated = 1;
	lua_createtable(L, 3, 0);
	push_id(L, it);
	lua_rawseti(L, -2, 1);
	lua_pushnumber(L, it->played_ms);
	lua_rawseti(L, -2, 2);
	lua_pushnumber(L, it->sent_ms);
	lua_rawseti(L, -2, 3);
	lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
}

static int l_clear(lua_State *L)
{
	struct bridge *b = check(L);
	int front = playing(b);
	char msg[128];
	const char *err;

	/*
	 * The phone plays one item now; items whose audio came meanwhile (the
	 * model spoke again after a tool call) wait behind it: all are cut.
	 */
	lua_createtable(L, 2, 0);
	if (front >= 0)
		cut_item(L, b, front);
	for (int i = 0; i < ITEMS; i++)
		if (i != front)
			cut_item(L, b, i);
	if (lua_rawlen(L, -1) == 0)
		return 0;	/* nothing that has not been confirmed played */
	if (b->phone) {
		int m = snprintf(msg, sizeof msg, "{\"event\":\"clear\",\"streamSid\":\"%s\"}", b->sid);

		ca__ws_send(b->phone, msg, (size_t)m, LWS_WRITE_TEXT, &err);
	}
	/* The phone echoes the cleared marks at once; they were not played. */
	b->m_head = b->m_len = 0;
	b->unmarked = -1;
	b->unmarked_ms = 0;
	if (b->rs)
		ca_resampler_reset(b->rs);
	call_drained(b);
	return 1;
}

static int l_unplayed(lua_State *L)
{
	struct bridge *b = check(L);

	lua_pushboolean(L, b->m_len > 0 || b->unmarked >= 0);
	return 1;
}

static int l_on_drained(lua_State *L)
{
	struct bridge *b = check(L);

	luaL_checktype(L, 2, LUA_TFUNCTION);
	ca_unref(L, &b->drained_ref);
	flush_mark(b);
	if (b->m_len == 0) {
		lua_pushvalue(L, 2);
		lua_call(L, 0, 0);
		return 0;
	}
	b->drained_ref = ca_ref(L, 2);
	return 0;
}

static int l_stats(lua_State *L)
{
	struct bridge *b = check(L);

	lua_createtable(L, 0, 13);
	ca_set_int_field(L, "frames_in", b->frames_in);
	ca_set_int_field(L, "appended", b->appended);
	ca_set_int_field(L, "kept", b->n_kept);
	ca_set_int_field(L, "dropped_kept", b->dropped_kept);
	ca_set_int_field(L, "deltas", b->deltas);
	ca_set_int_field(L, "media_out", b->media_out);
	ca_set_int_field(L, "bad_in", b->bad_in);
	ca_set_int_field(L, "bad_out", b->bad_out);
	ca_set_int_field(L, "text_deltas", b->text_deltas);
	ca_set_int_field(L, "marks", (lua_Integer)b->m_len);
	ca_set_int_field(L, "marks_unechoed", b->marks_unechoed);
	ca_set_int_field(L, "scratch", (lua_Integer)scratch_cap);
	ca_set_int_field(L, "out", (lua_Integer)buf_cap);
	return 1;
}

static int l_close(lua_State *L)
{
	struct bridge_box *box = luaL_checkudata(L, 1, BRIDGE_MT);
	struct bridge *b = box->b;
	lua_State *ML = ca_lua();

	box->b = NULL;
	if (b == NULL)
		return 0;
	detach(b);
	free_kept(b);
	for (int i = 0; i < ITEMS; i++)
		free(b->items[i].long_id);
	if (ML)
		ca_unref(ML, &b->drained_ref);
	free(b->marks);
	free(b->rs);
	free(b);
	return 0;
}

int luaopen_callagent_core_bridge(lua_State *L)
{
	static const luaL_Reg methods[] = {
		{"link_model", l_link_model},
		{"unlink_model", l_unlink_model},
		{"model_ready", l_model_ready},
		{"send_audio", l_send_audio},
		{"phone_media", l_phone_media},
		{"phone_mark", l_phone_mark},
		{"item", l_item},
		{"clear", l_clear},
		{"unplayed", l_unplayed},
		{"on_drained", l_on_drained},
		{"stats", l_stats},
		{"close", l_close},
		{NULL, NULL}
	};
	static const luaL_Reg fns[] = {
		{"new", l_new},
		{NULL, NULL}
	};

	ca_audio_init();
	ca__ws_register(L);
	if (luaL_newmetatable(L, BRIDGE_MT)) {
		luaL_newlib(L, methods);
		lua_setfield(L, -2, "__index");
		lua_pushcfunction(L, l_close);
		lua_setfield(L, -2, "__gc");
		lua_pushcfunction(L, l_close);
		lua_setfield(L, -2, "__close");
	}
	lua_pop(L, 1);
	luaL_newlib(L, fns);
	return 1;
}
