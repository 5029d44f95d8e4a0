// WebSocket frames (RFC 6455 5.2) for the scripted peers in tests/fakes:
// ws_edge_server.js (the client's edge cases) and ws_edge_client.js (the
// server's). frame(op, payload, {fin, mask, rsv}): mask true uses the key
// 1 2 3 4, an array of four bytes that key.
export function frame(op, payload, { fin = true, mask = false, rsv = 0 } = {}) {
  let body = Buffer.from(payload);
  const len = body.length;
  let head;
  if (len < 126) {
    head = Buffer.from([0, len]);
  } else if (len < 65536) {
    head = Buffer.alloc(4);
    head[1] = 126;
    head.writeUInt16BE(len, 2);
  } else {
    head = Buffer.alloc(10);
    head[1] = 127;
    head.writeBigUInt64BE(BigInt(len), 2);
  }
  head[0] = (fin ? 0x80 : 0) | rsv | op;
  if (mask) {
    const key = Buffer.from(typeof mask === 'object' ? mask : [1, 2, 3, 4]);
    head[1] |= 0x80;
    body = Buffer.from(body.map((b, i) => b ^ key[i & 3]));
    head = Buffer.concat([head, key]);
  }
  return Buffer.concat([head, body]);
}

// Frames (masked or not) out of buf, to onFrame(op, data, masked, fin);
// returns the bytes left over.
function readFrames(buf, onFrame) {
  for (;;) {
    if (buf.length < 2) return buf;
    let len = buf[1] & 0x7f, off = 2;
    if (len === 126) {
      if (buf.length < 4) return buf;
      len = buf.readUInt16BE(2);
      off = 4;
    } else if (len === 127) {
      if (buf.length < 10) return buf;
      len = Number(buf.readBigUInt64BE(2));
      off = 10;
    }
    const masked = (buf[1] & 0x80) !== 0;
    if (buf.length < off + (masked ? 4 : 0) + len) return buf;
    const key = masked ? buf.subarray(off, off + 4) : Buffer.alloc(4);
    off += masked ? 4 : 0;
    const data = Buffer.from(buf.subarray(off, off + len).map((b, i) => b ^ key[i & 3]));
    onFrame(buf[0] & 0x0f, data, masked, (buf[0] & 0x80) !== 0);
    buf = buf.subarray(off + len);
  }
}

// Writes the bytes one at a time, 2 ms apart: every header is split across reads.
export function dribble(sock, bytes, then) {
  let i = 0;
  const next = () => {
    if (i === bytes.length) return then();
    sock.write(bytes.subarray(i, i + 1));
    i++;
    setTimeout(next, 2);
  };
  next();
}


// Reads sock: first an HTTP head, whole, to onHead(head) (latin1, without
// the blank line); then frames, to onFrame as readFrames gives them.
export function readStream(sock, onHead, onFrame) {
  let buf = Buffer.alloc(0), upgraded = false;
  sock.on('data', (chunk) => {
    buf = Buffer.concat([buf, chunk]);
    if (!upgraded) {
      const end = buf.indexOf('\r\n\r\n');
      if (end < 0) return;
      upgraded = true;
      const head = buf.subarray(0, end).toString('latin1');
      buf = buf.subarray(end + 4);
      onHead(head);
    }
    buf = readFrames(buf, onFrame);
  });
}
