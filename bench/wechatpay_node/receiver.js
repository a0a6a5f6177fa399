// bench/wechatpay_node/receiver.js: the Node.js notification receiver of
// bench/wechatpay -- the same job as bench/wechatpay_app with
// wechatpay-axios-plugin: timestamp window, RSA signature over
// "ts\nnonce\nbody\n", AES-256-GCM decrypt of the resource, JSON, 204.
//   node receiver.js PORT PUBLIC_KEY_PEM PUBLIC_KEY_ID APIV3_KEY
'use strict';
const http = require('http');
const { Rsa, Aes, Formatter } = require('wechatpay-axios-plugin');

const [port, pubPath, pubId, apiv3] = process.argv.slice(2);
const pub = Rsa.from(`file://${pubPath}`, Rsa.KEY_TYPE_PUBLIC);

function fail(res, why) {
  res.writeHead(401, { 'Content-Type': 'application/json' });
  res.end(JSON.stringify({ code: 'FAIL', message: why }));
}

http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const body = Buffer.concat(chunks).toString('utf8');
    const ts = req.headers['wechatpay-timestamp'];
    const nonce = req.headers['wechatpay-nonce'];
    const sig = req.headers['wechatpay-signature'];
    const serial = req.headers['wechatpay-serial'];
    if (!ts || !nonce || !sig || serial !== pubId) return fail(res, 'headers');
    if (Math.abs(Date.now() / 1000 - Number(ts)) >= 300) return fail(res, 'stale');
    let ok = false;
    try { ok = Rsa.verify(Formatter.response(ts, nonce, body), sig, pub); } catch (e) { ok = false; }
    if (!ok) return fail(res, 'signature');
    let event;
    try {
      event = JSON.parse(body);
      const r = event.resource;
      event.resource = JSON.parse(Aes.AesGcm.decrypt(r.ciphertext, apiv3, r.nonce, r.associated_data));
    } catch (e) {
      return fail(res, 'decrypt');
    }
    if (!event.resource || !event.id) return fail(res, 'malformed');
    res.writeHead(204);
    res.end();
  });
}).listen(Number(port), '127.0.0.1');
