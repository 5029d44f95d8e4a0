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
	int kind;		/* LWS_WRITE_TEXT, LWS_WRITE_BINARY or LWS_WRITE_PING */
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
	size_t queued;			/* bytes in the send queue */
	size_t max_queue;		/* over this, the peer is too slow: dropped */
	size_t max_message;		/* largest message accepted */

	unsigned char *rx;		/* partial incoming message */
	size_t rx_len, rx_cap;

	int close_code;			/* our close request (0: none) */
	int close_sent;			/* our close frame is out; the peer's ends it */
	char close_reason[124];
	int peer_code;			/* the peer's close frame */
	char peer_reason[124];
	int fail_code;			/* why we dropped it: 1009 too big, 1008 slow */
	int stopping;			/* its server is closing: the peer's close frame
					   is waited for 1 s, not 5 */

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

/* Copies the request headers of wsi into a new table on L (lowercase names). */
void ca__push_headers(lua_State *L, struct lws *wsi);

/* Registers the "callagent.WebSocket" metatable (idempotent). */
void ca__ws_register(lua_State *L);

/* Stable numbering for connections and requests. */
lua_Integer ca__next_id(void);

#endif
