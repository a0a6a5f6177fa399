#!/usr/bin/env python3
# spec/support/tls_resume.py PORT CERT KEY LOG: an HTTPS server that
# answers each request with "reused=<True|False>" -- whether the client
# resumed an earlier TLS session -- and closes the connection after it
# (Connection: close), so each request of a client comes on a new
# connection. Writes "ready" to LOG once listening. Ends when killed.
import socket, ssl, sys

port, cert, key, log = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(16)
with open(log, "a") as f:
    f.write("ready\n")
while True:
    raw, _ = s.accept()
    try:
        c = ctx.wrap_socket(raw, server_side=True)
    except (OSError, ssl.SSLError):
        raw.close()
        continue
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            d = c.recv(65536)
            if not d:
                break
            data += d
        body = ("reused=%s" % c.session_reused).encode()
        c.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        try:
            c.unwrap()
        except (OSError, ssl.SSLError):
            pass
    except (OSError, ssl.SSLError):
        pass
    finally:
        c.close()
