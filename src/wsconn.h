/*
 * wsconn.h - what the HTTP server (http.c) and the WebSocket client (ws.c)
 * share: libwebsockets set-up on the host's libuv loop, and the WebSocket
 * connection object both sides hand to Lua ("callagent.WebSocket").
 */
#ifndef CA_WSCONN_H
#define CA_WSCONN_H

#include <libwebsockets.h>

#include "ca.h"

#define WS_MT "callagent.WebSocket"

/* A queued outgoing message: LWS_PRE bytes of headroom, then the payload. */
struct ca_wsmsg {
	struct ca_wsmsg *next;
	size_t len;
	size_t cost;		/* its bytes on the wire: len, and a server's frame header */
	int kind;		/* LWS_WRITE_TEXT, LWS_WRITE_BINARY or LWS_WRITE_PING */
	int pong;		/* a pong, with room for any: a later ping's may replace it */
	unsigned char buf[];
};

enum { CA_WS_CONNECTING, CA_WS_OPEN, CA_WS_CLOSED };

/*
 * The process has one lws context, shared by every server (one vhost each)
 * and the WebSocket client (one vhost, raw connections): lws 4.1 keeps some TLS
 * state process-global per context created, and destroying contexts at run
 * time trips over its bugs (double close of its eventfd, plugin unloading),
 * so the one context lives until exit. Its own libuv handles do not keep the
 * loop alive; listeners and connections do.
 */

/*
 * The shared context, created on first use with max_header bytes of request
 * head per connection (0: the default, 8192). Returns NULL and sets *err when
 * it exists with another max_header or cannot be created.
 */
struct lws_context *ca__lws_ctx(unsigned max_header, const char **err);

/* Whether the shared context is being destroyed (program exit). */
int ca__lws_ending(void);

/* Creates a vhost of the shared context (servers listen on sockets of their own). */
struct lws_vhost *ca__lws_vhost(struct lws_context_creation_info *info);

/* The frame being read (RFC 6455 5.2): see ca__ws_parse. */
struct ca_wsframe {
	unsigned char hdr[14];
	unsigned hdr_len;
	int in_payload;			/* the header is read; left bytes of payload follow */
	uint64_t left;
	int op, fin;
	int msg;			/* the data message in progress: 0 none, 1 text, 2 binary */
	unsigned char key[4];		/* its masking key (frames from a client) */
	unsigned key_pos;		/* payload bytes unmasked so far, mod 4 */
	unsigned char ctl[125];		/* a control frame's payload */
	size_t ctl_len;
	int broken;			/* a protocol error, or the peer's close: the rest of the stream is ignored */
};

struct ca_wsio;

/*
 * The UTF-8 check of a text message whose pieces come one by one (see
 * ca__utf8_check): the start of a sequence the last piece ended in.
 */
struct ca_utf8 {
	unsigned char part[4];
	unsigned len;			/* 0..3 bytes of it */
};

/*
 * Checks the next piece p[0..n) of a text message for UTF-8 (RFC 3629, as
 * ca__utf8_len; RFC 6455 8.1); final: the message's last piece. A sequence
 * cut at the end of a piece waits in st for the next one: it is an error
 * only at the last piece, unless its bytes so far start no sequence.
 * ASCII goes 32 and 8 bytes at a time. 0 when it is UTF-8 so far; -1 when
 * not; -2 when the message ends inside a sequence. On -1 and -2 *at is the
 * offset of that sequence's first byte, counted from the first of the bytes
 * st held before this piece (from p[0] when it held none): 0 for a sequence
 * begun in an earlier piece.
 * st is empty again after the last piece, or an error.
 */
int ca__utf8_check(struct ca_utf8 *st, const unsigned char *p, size_t n, int final, size_t *at);

/*
 * One WebSocket connection, server or client side. On the server side lws
 * speaks the protocol; a client's connection is raw to lws and src/ws.c
 * speaks it (cl), sending through ca__wsc_write. Allocated when the
 * connection is accepted (server) or started (client); lws points at it from
 * the connection's user data. Freed once lws has closed the connection and
 * the Lua userdata is gone (or the state is closed at exit).
 */
struct ca_ws {
	struct lws *wsi;		/* NULL once lws has closed it */
	int state;
	int self_ref;			/* registry ref to the userdata while not closed */
	int handler_ref;		/* fn(conn, event, a, b) */
	int lua_alive;			/* the userdata has not been collected */
	lua_Integer id;

	struct ca_wsmsg *head, *tail;	/* send queue */
	size_t queued;			/* bytes in the send queue, as they go on the wire */
	size_t max_queue;		/* over this, the peer is too slow: dropped */
	size_t max_message;		/* largest message accepted */

	unsigned char *rx;		/* partial incoming message */
	size_t rx_len, rx_cap;
	struct ca_utf8 utf8;		/* the text message being read, checked as it comes */

	int close_code;			/* our close request (0: none) */
	int close_sent;			/* our close frame is out; the peer's ends it */
	char close_reason[124];
	int peer_code;			/* the peer's close frame */
	char peer_reason[124];
	int fail_code;			/* why we dropped it: 1009 too big, 1008 slow */
	int stopping;			/* its server is closing: the peer's close frame
					   is waited for 1 s, not 5 */

	/*
	 * Frames read by callagent (a client's connection; a server's once
	 * its socket is ours, see ca__ws_take_socket): the frame being read,
	 * and pings after ping_ms of silence, dropped with no answer in pong_ms.
	 */
	struct ca_wsframe fr;
	struct ca_wsio *io;		/* the socket, once ours (ca__ws_take_socket) */
	lua_Integer msgs_in, msgs_out;	/* conn:stats() */
	lua_Integer reads, writes;	/* recv and send calls on the socket, once ours */
	uv_timer_t *ping_timer;
	uint64_t ping_ms, pong_ms;
	uint64_t last_rx, ping_sent;
	int paused;			/* conn:pause(): not read, so not pinged either */
	/*
	 * What a read held after the frame whose message paused the
	 * connection (ca__ws_parse): parsed once it is resumed, from the
	 * loop (resume_timer, owned here), ahead of anything read later.
	 */
	unsigned char *held;
	size_t held_len;
	uv_timer_t *resume_timer;

	/* Client side only. */
	uv_timer_t *connect_timer;	/* connect timeout, owned here */
	char error[200];		/* why connecting failed */
	int is_client;
	struct ca_wsc *cl;		/* handshake, framing and pings (src/ws.c) */

	/*
	 * A C tap on incoming text messages (see src/bridge.c): tap returns 1
	 * for a message it handled (Lua never sees it), 0 to pass it on.
	 * tap_closed is called once when the connection goes.
	 */
	int (*tap)(void *ctx, struct ca_ws *ws, const char *data, size_t len);
	void (*tap_closed)(void *ctx, struct ca_ws *ws);
	void *tap_ctx;
};



/*
 * Creates the connection object and its userdata (left on the stack of L),
 * with an empty uservalue table for Lua fields.
 */
struct ca_ws *ca__ws_new(lua_State *L, size_t max_message, size_t max_queue);

/*
 * Delivers an incoming piece of a data message (final: its last piece);
 * calls the handler when the message is whole.
 */
void ca__ws_receive(struct ca_ws *ws, const void *in, size_t len, int final, int binary);

/* Writes what the send queue holds while the socket takes it; returns -1 to close. */
int ca__ws_writeable(struct ca_ws *ws);

/* Records the peer's close frame (in: 2-byte code + reason); -1: close now. */
int ca__ws_peer_close(struct ca_ws *ws, const void *in, size_t len);

/* lws closed the connection: tells Lua ("close"), frees what lws no longer needs. */
void ca__ws_closed(struct ca_ws *ws);

/*
 * Sends a message from C, as conn:send does from Lua (kind LWS_WRITE_TEXT,
 * LWS_WRITE_BINARY, or LWS_WRITE_RAW for bytes already framed). 0, or -1
 * with *err "ECLOSED" / "ENOBUFS" (the connection is then being dropped).
 */
int ca__ws_send(struct ca_ws *ws, const void *data, size_t len, int kind, const char **err);

/* Bytes of a frame header (RFC 6455 5.2) for len bytes of payload, without a masking key. */
static inline size_t ca__ws_header_len(size_t len)
{
	return len < 126 ? 2 : len < 65536 ? 4 : 10;
}

/*
 * Writes the header of a whole (FIN) frame of opcode op and len bytes of
 * payload at out; mask sets its MASK bit (the caller puts the key after
 * it). Returns the header's length, ca__ws_header_len(len).
 */
static inline size_t ca__ws_header(unsigned char *out, int op, size_t len, int mask)
{
	size_t h = ca__ws_header_len(len);
	unsigned char m = mask ? 0x80 : 0;

	out[0] = (unsigned char)(0x80 | op);
	if (h == 2) {
		out[1] = (unsigned char)(m | len);
	} else if (h == 4) {
		out[1] = m | 126;
		out[2] = (unsigned char)(len >> 8);
		out[3] = (unsigned char)len;
	} else {
		out[1] = m | 127;
		for (int b = 0; b < 8; b++)
			out[2 + b] = (unsigned char)((uint64_t)len >> (56 - 8 * b));
	}
	return h;
}

/*
 * Bytes of the stream after the upgrade (a client's, or a server's whose
 * socket is ours): frames are checked (a server's peer must mask them, a
 * client's must not), data goes to the handler, pings are answered and a
 * close frame answered or taken as the answer to ours. p is unmasked in
 * place. 0, or -1: the connection is over, close it now.
 */
int ca__ws_parse(struct ca_ws *ws, unsigned char *p, size_t len);

/*
 * Starts the pings (ws->ping_ms, pong_ms) of an open connection, and for a
 * server connection whose socket is ours the check for bytes lws holds
 * (see on_ping_timer): call it after ca__ws_take_socket.
 */
void ca__ws_start_pings(struct ca_ws *ws);

/*
 * Takes the socket of an open connection from lws, which keeps its
 * connection object idle until the end and then closes the socket: reads
 * and writes go straight to the socket from then on, without lws' service,
 * parser and write path (the audio of every call). What is read goes to rx
 * (NULL: ca__ws_parse; 0, or -1 to close). 0, or -1 (lws keeps it).
 */
int ca__ws_take_socket(struct ca_ws *ws, int (*rx)(struct ca_ws *ws, unsigned char *p, size_t len));

/* Writes bytes as they are (a client's frames, TLS records); 0 or -1. */
int ca__ws_raw_write(struct ca_ws *ws, const unsigned char *p, size_t len);

/* Closes a connection without a word, soon: its socket if ours, then lws'. */
void ca__ws_kill_conn(struct ca_ws *ws);

/* Writes wire bytes of a client connection (through its TLS, if any); 0 or -1. */
int ca__wsc_write(struct ca_ws *ws, unsigned char *buf, size_t len);

/*
 * A client connection closed or aborted before lws has a connection under
 * way (its host name being resolved, or between two of its addresses): it
 * ends with the error already set (ECANCELED), from the loop, not from
 * inside the caller.
 */
void ca__wsc_cancel(struct ca_ws *ws);

/* The connection behind a "callagent.WebSocket" userdata at idx (raises if not one). */
struct ca_ws *ca__ws_check(lua_State *L, int idx);

/* Closes a connection without a word, soon (safe from anywhere). */
void ca__ws_kill(struct lws *wsi);

/* Closes with code (1002, 1009...): our close frame goes first, nothing else after. */
void ca__ws_fail(struct ca_ws *ws, int code, const char *reason);

/* Drops the connection now (no close frame); Lua sees code and reason. */
void ca__ws_drop(struct ca_ws *ws, int code, const char *reason);

/*
 * Writes a close frame with body (2-byte code + reason, at most 125 bytes)
 * now, ahead of anything queued, then waits up to 5 s for the peer to end
 * the connection. 0, or -1 when it could not be written (close now).
 */
int ca__ws_write_close(struct ca_ws *ws, const void *body, size_t len);

/* Pushes the connection userdata and calls its handler with event + nargs values on top. */
void ca__ws_emit(struct ca_ws *ws, const char *event, int nargs);

/*
 * Copies the request headers of wsi into a new table on L (lowercase names),
 * their values without the spaces and tabs around them (see ca__ows_trim).
 */
void ca__push_headers(lua_State *L, struct lws *wsi);

/*
 * The length of the header value s[0..n) without the spaces and tabs around
 * it, which RFC 9110 5.5 says are not part of it (lws drops only the leading
 * ones); *s moves past the leading ones.
 */
size_t ca__ows_trim(const char **s, size_t n);

/*
 * Whether the comma-separated list v[0..n) (a Connection header's value,
 * say) has token as one of its elements, spaces and tabs around it
 * ignored, in any case.
 */
int ca__has_token(const char *v, size_t n, const char *token);

/* Registers the "callagent.WebSocket" metatable (idempotent). */
void ca__ws_register(lua_State *L);

/* Stable numbering for connections and requests. */
lua_Integer ca__next_id(void);

#endif
