// A scripted WebSocket client for the server's edge cases (tests/test_ws.lua):
// what a well-behaved client never sends - frames split byte by byte (the
// masking key too), a ping between fragments, 64-bit lengths, protocol
// errors, a frame in the same write as the upgrade request (RFC 6455 4.1: a
// client waits for the answer) - and peers that
// go silent.
//
//   node ws_edge_client.js SCENARIO PORT PATH
//
// Prints one JSON line per frame the server sends, {"op":1,"data":"..."}
// (binary: data is the length and sum its bytes' sum), {"op":8,"code":1002,
// "reason":"..."}, and {"end":true} when the server ends the connection.
import net from 'node:net';
import crypto from 'node:crypto';
import { frame, dribble, readStream } from './ws_frames.js';

const [scenario, port, path] = process.argv.slice(2);
const KEY = [0x37, 0xfa, 0x21, 0x3d];

const scenarios = {
  // One text message in three fragments with a ping between them, written a
  // byte at a time; a 70000-byte binary message (64-bit length) and an empty
  // text one in one write; then a close with 4001.
  fragments(sock) {
    const first = Buffer.concat([
      frame(1, 'hel', { fin: false, mask: KEY }),
      frame(9, 'p1', { mask: KEY }),
      frame(0, 'lo w', { fin: false, mask: [9, 8, 7, 6] }),
      frame(0, 'orld', { mask: KEY }),
    ]);
    dribble(sock, first, () => {
      const big = Buffer.alloc(70000);
      for (let i = 0; i < big.length; i++) big[i] = i % 251;
      sock.write(Buffer.concat([frame(2, big, { mask: KEY }), frame(1, '', { mask: KEY })]));
      setTimeout(() => sock.write(frame(8, Buffer.concat([Buffer.from([0x0f, 0xa1]), Buffer.from('bye')]), { mask: KEY })), 100);
    });
  },
  // Fragmented messages whose first fragment is empty (RFC 6455 allows it):
  // "abc", then one of empty fragments only.
  emptyfirst(sock) {
    sock.write(Buffer.concat([
      frame(1, '', { fin: false, mask: KEY }),
      frame(0, 'abc', { mask: KEY }),
      frame(1, '', { fin: false, mask: KEY }),
      frame(0, '', { mask: KEY }),
    ]));
  },
  unmasked(sock) {
    sock.write(frame(1, 'x'));
  },
  rsv(sock) {
    sock.write(frame(1, 'x', { mask: KEY, rsv: 0x40 }));
  },
  opcode(sock) {
    sock.write(frame(3, 'x', { mask: KEY }));
  },
  longping(sock) {
    sock.write(frame(9, Buffer.alloc(126), { mask: KEY }));
  },
  // Close codes no endpoint may send (RFC 6455 7.4): not to be echoed.
  close1006(sock) {
    sock.write(frame(8, Buffer.from([0x03, 0xee]), { mask: KEY }));
  },
  close999(sock) {
    sock.write(frame(8, Buffer.from([0x03, 0xe7]), { mask: KEY }));
  },
  // A close reason that is not UTF-8 (RFC 6455 8.1): an overlong form.
  badreason(sock) {
    sock.write(frame(8, Buffer.from([0x03, 0xe8, 0xc0, 0x80]), { mask: KEY }));
  },
  // UTF-8 across fragments (RFC 6455 8.1): a valid message split inside
  // characters, a ping between the halves of one, echoed whole; text that is not UTF-8 - bytes that start no
  // sequence, in a first fragment whose last never comes (utf8early); a
  // message that ends inside a sequence (utf8cut); a surrogate split across
  // fragments (utf8surrogate).
  utf8split(sock) {
    const text = Buffer.from('h\u00e9llo \u{1f600}');
    sock.write(Buffer.concat([frame(1, text.subarray(0, 2), { fin: false, mask: KEY }), frame(9, 'p1', { mask: KEY }),
      frame(0, text.subarray(2, 8), { fin: false, mask: KEY }), frame(0, text.subarray(8), { mask: KEY })]));
  },
  utf8early(sock) {
    sock.write(frame(1, Buffer.from([0x6f, 0x6b, 0xc0, 0xaf]), { fin: false, mask: KEY }));
  },
  utf8cut(sock) {
    sock.write(Buffer.concat([frame(1, Buffer.from([0x61, 0xe2]), { fin: false, mask: KEY }),
      frame(0, Buffer.from([0x82]), { mask: KEY })]));
  },
  utf8surrogate(sock) {
    sock.write(Buffer.concat([frame(1, Buffer.from([0x78, 0xed]), { fin: false, mask: KEY }),
      frame(0, Buffer.from([0xa0, 0x80]), { mask: KEY })]));
  },
  // Five text messages and a close in one write: the echoes and the answer
  // to the close must come back whole and in order.
  burst(sock) {
    const frames = [1, 2, 3, 4, 5].map((i) => frame(1, 'm' + i, { mask: KEY }));
    frames.push(frame(8, Buffer.from([0x0f, 0xa1]), { mask: KEY }));
    sock.write(Buffer.concat(frames));
  },
  // A message whose handler aborts the connection, then a ping and a close,
  // in one write: after the abort nothing more may go to this peer.
  abortburst(sock) {
    sock.write(Buffer.concat([
      frame(1, 'last words, then abort', { mask: KEY }),
      frame(9, 'p1', { mask: KEY }),
      frame(8, Buffer.from([0x0f, 0xa1]), { mask: KEY }),
    ]));
  },
  // Two text messages, then a protocol error, in one write.
  bursterror(sock) {
    sock.write(Buffer.concat([frame(1, 'm1', { mask: KEY }), frame(1, 'm2', { mask: KEY }), frame(1, 'x')]));
  },
  // A frame in the same write as the upgrade request (see below).
  pipelined() {},
  // Says nothing and answers no ping.
  silent() {},
  // Says nothing but answers pings (see below).
  answering() {},
  // The connection ends in the middle of a frame, without a close frame.
  drop(sock) {
    sock.write(frame(1, 'never finished', { mask: KEY }).subarray(0, 8));
    setTimeout(() => sock.destroy(), 50);
  },
};

if (!scenarios[scenario]) {
  console.error('unknown scenario ' + scenario);
  process.exit(2);
}

const sock = net.connect(Number(port), '127.0.0.1');
const key = crypto.randomBytes(16).toString('base64');
sock.setNoDelay(true);
sock.on('connect', () => {
  sock.write(`GET ${path} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
    `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n` +
    (scenario === 'pipelined' ? frame(1, 'too early', { mask: KEY }).toString('latin1') : ''), 'latin1');
});
readStream(sock, (head) => {
  if (!/^HTTP\/1\.1 101 /.test(head)) {
    console.log(JSON.stringify({ refused: head.split('\r\n')[0] }));
    process.exit(1);
  }
  scenarios[scenario](sock);
}, (op, data, masked, fin) => {
  const line = { op, masked, fin };
  if (op === 8) {
    line.code = data.length >= 2 ? data.readUInt16BE(0) : null;
    line.reason = data.subarray(2).toString();
  } else if (op === 2) {
    line.data = data.length;
    line.sum = data.reduce((a, b) => a + b, 0);
  } else {
    line.data = data.toString();
  }
  console.log(JSON.stringify(line));
  if (op === 8) sock.end(); // the server's close: ours is the end of the stream
  if (op === 9 && scenario === 'answering') sock.write(frame(10, data, { mask: KEY }));
});
sock.on('close', () => {
  console.log(JSON.stringify({ end: true }));
  process.exit(0);
});
sock.on('error', () => {});
