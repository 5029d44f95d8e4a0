// A scripted WebSocket server for the client's edge cases (tests/test_ws.lua):
// what a well-behaved server (lws, in the other tests) never sends - headers
// split across reads, fragments with a ping between them, 64-bit lengths,
// protocol errors and broken upgrades.
//
//   node ws_edge_server.js SCENARIO [CERT KEY]
//
// With CERT and KEY it speaks TLS (wss://), and writes the ciphertext in
// pieces of 1 to 7 bytes: TLS records split across the client's reads.
// Prints its port, then one JSON line per frame the client sends:
// {"op":1,"data":"..."} or {"op":8,"code":1002,"reason":"..."}.
import net from 'node:net';
import tls from 'node:tls';
import fs from 'node:fs';
import crypto from 'node:crypto';
import { Duplex } from 'node:stream';
import { frame, dribble, readStream } from './ws_frames.js';

const scenario = process.argv[2];
const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';

function upgrade(sock, head, extra = {}) {
  const key = /sec-websocket-key:\s*(\S+)/i.exec(head)[1];
  const accept = crypto.createHash('sha1').update(key + GUID).digest('base64');
  const lines = ['HTTP/1.1 101 Switching Protocols'];
  if (!extra.noUpgrade) lines.push('Upgrade: websocket', 'Connection: Upgrade');
  lines.push('Sec-WebSocket-Accept: ' + (extra.badAccept ? 'AAAA' + accept.slice(4) : accept));
  if (extra.headers) lines.push(...extra.headers);
  lines.push('X-Edge: ' + scenario);
  return Buffer.from(lines.join('\r\n') + '\r\n\r\n');
}

const scenarios = {
  // One text message in three fragments with a ping between them, the first
  // fragment in the same write as the 101; then a 70000-byte binary message
  // (64-bit length) and an empty one; then the server closes with 4001.
  fragments(sock, head) {
    sock.write(Buffer.concat([upgrade(sock, head), frame(1, 'hel', { fin: false })]));
    const rest = Buffer.concat([frame(9, 'p1'), frame(0, 'lo ', { fin: false }), frame(0, 'world')]);
    dribble(sock, rest, () => {
      const big = Buffer.alloc(70000);
      for (let i = 0; i < big.length; i++) big[i] = i % 251;
      sock.write(Buffer.concat([frame(2, big), frame(1, '')]));
      setTimeout(() => sock.write(frame(8, Buffer.concat([Buffer.from([0x0f, 0xa1]), Buffer.from('bye')]))), 50);
    });
  },
  masked(sock, head) {
    sock.write(Buffer.concat([upgrade(sock, head), frame(1, 'x', { mask: true })]));
  },
  rsv(sock, head) {
    sock.write(Buffer.concat([upgrade(sock, head), frame(1, 'x', { rsv: 0x40 })]));
  },
  continuation(sock, head) {
    sock.write(Buffer.concat([upgrade(sock, head), frame(0, 'orphan')]));
  },
  // The connection ends in the middle of a frame, without a close frame.
  drop(sock, head) {
    const f = frame(1, 'never finished');
    sock.write(Buffer.concat([upgrade(sock, head), f.subarray(0, 6)]));
    setTimeout(() => sock.destroy(), 50);
  },
  // Close codes no endpoint may send (RFC 6455 7.4): not to be echoed.
  close1005(sock, head) {
    sock.write(Buffer.concat([upgrade(sock, head), frame(8, Buffer.from([0x03, 0xed]))]));
  },
  close5000(sock, head) {
    sock.write(Buffer.concat([upgrade(sock, head), frame(8, Buffer.from([0x13, 0x88]))]));
  },
  badaccept(sock, head) {
    sock.write(upgrade(sock, head, { badAccept: true }));
  },
  noupgrade(sock, head) {
    sock.write(upgrade(sock, head, { noUpgrade: true }));
  },
  // A text message 100 ms after the upgrade, in a read of its own.
  hello(sock, head) {
    sock.write(upgrade(sock, head));
    setTimeout(() => sock.write(frame(1, 'hello')), 100);
  },
  // Answers the upgrade 300 ms late.
  late(sock, head) {
    setTimeout(() => sock.write(upgrade(sock, head)), 300);
  },
  // Answers the upgrade 300 ms late, with three text messages in the same write.
  latethree(sock, head) {
    setTimeout(() => sock.write(Buffer.concat([upgrade(sock, head), frame(1, 'm1'), frame(1, 'm2'), frame(1, 'm3')])), 300);
  },
  // Answers the upgrade 300 ms late, then sends a 32 MB binary message.
  lateflood(sock, head) {
    setTimeout(() => sock.write(Buffer.concat([upgrade(sock, head), frame(2, Buffer.alloc(32 << 20))])), 300);
  },
  // Sends the request line and the Host header back, as a text message.
  requestline(sock, head) {
    const lines = head.split('\r\n');
    const host = lines.find((l) => /^host:/i.test(l));
    sock.write(Buffer.concat([upgrade(sock, head), frame(1, lines[0] + '\n' + host)]));
  },
  // Answers the client did not ask for: an extension, a subprotocol.
  extension(sock, head) {
    sock.write(upgrade(sock, head, { headers: ['Sec-WebSocket-Extensions: permessage-deflate'] }));
  },
  subprotocol(sock, head) {
    sock.write(upgrade(sock, head, { headers: ['Sec-WebSocket-Protocol: chat'] }));
  },
  // Other protocol errors: an unknown opcode, a long or fragmented ping, a
  // new message inside a fragmented one.
  opcode(sock, head) {
    sock.write(Buffer.concat([upgrade(sock, head), frame(3, 'x')]));
  },
  longping(sock, head) {
    sock.write(Buffer.concat([upgrade(sock, head), frame(9, Buffer.alloc(126))]));
  },
  fragping(sock, head) {
    sock.write(Buffer.concat([upgrade(sock, head), frame(9, 'x', { fin: false })]));
  },
  newmessage(sock, head) {
    sock.write(Buffer.concat([upgrade(sock, head), frame(1, 'a', { fin: false }), frame(2, 'b')]));
  },
  // A close reason that is not UTF-8 (RFC 6455 8.1).
  badreason(sock, head) {
    sock.write(Buffer.concat([upgrade(sock, head), frame(8, Buffer.from([0x03, 0xe8, 0xff, 0xfe]))]));
  },
  // Valid UTF-8 split mid-character across fragments, then a close whose
  // reason is UTF-8 of more than one byte a character.
  utf8split(sock, head) {
    const text = Buffer.from('h\u00e9llo \u{1f600}');
    sock.write(Buffer.concat([upgrade(sock, head), frame(1, text.subarray(0, 2), { fin: false }),
      frame(0, text.subarray(2, 8), { fin: false }), frame(0, text.subarray(8))]));
    setTimeout(() => sock.write(frame(8, Buffer.concat([Buffer.from([0x03, 0xe8]), Buffer.from('s\u00fc\u00df')]))), 50);
  },
  // Text that is not UTF-8 across fragments: see ws_edge_client.js.
  utf8early(sock, head) {
    sock.write(Buffer.concat([upgrade(sock, head), frame(1, Buffer.from([0x6f, 0x6b, 0xc0, 0xaf]), { fin: false })]));
  },
  utf8cut(sock, head) {
    sock.write(Buffer.concat([upgrade(sock, head), frame(1, Buffer.from([0x61, 0xe2]), { fin: false }),
      frame(0, Buffer.from([0x82]))]));
  },
  utf8surrogate(sock, head) {
    sock.write(Buffer.concat([upgrade(sock, head), frame(1, Buffer.from([0x78, 0xed]), { fin: false }),
      frame(0, Buffer.from([0xa0, 0x80]))]));
  },
};

if (!scenarios[scenario]) {
  console.error('unknown scenario ' + scenario);
  process.exit(2);
}

// The TCP side of a TLS socket that writes the ciphertext in pieces of 1 to 7
// bytes, one per turn of node's loop.
class Shredder extends Duplex {
  constructor(raw) {
    super();
    this.raw = raw;
    raw.on('data', (d) => this.push(d));
    raw.on('end', () => this.push(null));
    raw.on('error', () => this.destroy());
  }
  _read() {}
  _write(chunk, _enc, cb) {
    let i = 0;
    const next = () => {
      if (i >= chunk.length) return cb();
      const n = 1 + Math.floor(Math.random() * 7);
      this.raw.write(chunk.subarray(i, i + n));
      i += n;
      setImmediate(next);
    };
    next();
  }
  _final(cb) {
    this.raw.end();
    cb();
  }
}

const [certFile, keyFile] = process.argv.slice(3);
const tlsOpts = certFile && { isServer: true, cert: fs.readFileSync(certFile), key: fs.readFileSync(keyFile) };

const server = net.createServer((raw) => {
  raw.setNoDelay(true);
  raw.on('error', () => {});
  const sock = tlsOpts ? new tls.TLSSocket(new Shredder(raw), tlsOpts) : raw;
  readStream(sock, (head) => scenarios[scenario](sock, head), (op, data, masked) => {
    const line = { op, masked };
    if (op === 8) {
      line.code = data.length >= 2 ? data.readUInt16BE(0) : null;
      line.reason = data.subarray(2).toString();
      sock.end();
    } else {
      line.data = op === 2 ? data.length : data.toString();
    }
    console.log(JSON.stringify(line));
  });
  sock.on('error', () => {});
});
server.listen(0, '127.0.0.1', () => console.log(server.address().port));
