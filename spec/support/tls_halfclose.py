#!/usr/bin/env python3
# spec/support/tls_halfclose.py PORT CA_FILE TOTAL HOW: over TLS, one POST
# /echo of TOTAL bytes (head and body), then at once the end of the
# client's sending: HOW "close_notify" (a TLS close_notify alert) or "fin"
# (shutdown(SHUT_WR) under TLS). Prints the answer's first line and body
# ("none" when the server closed without one). A memory BIO puts the
# request and the end into the same send when they fit.
import socket, ssl, sys
from tls_bio import Client

port, ca, total, how = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
c = Client(port, ca, 10)
sock, tls, out, pump = c.sock, c.tls, c.out, c.pump
head = "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: "
for d in range(1, 6):
    body_len = total - len(head) - 4 - d
    if len(str(body_len)) == d:
        break
tls.write((head + str(body_len) + "\r\n\r\n").encode() + b"b" * body_len)
if how == "close_notify":
    try:
        tls.unwrap()
    except ssl.SSLWantReadError:
        pass
    sock.sendall(out.read())
else:
    sock.sendall(out.read())
    sock.shutdown(socket.SHUT_WR)
got = b""
while True:
    try:
        chunk = tls.read(65536)
        if not chunk:
            break
        got += chunk
    except ssl.SSLWantReadError:
        if not pump():
            break
    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
        break
    except ssl.SSLError as e:
        break
if not got:
    print("none")
else:
    h, _, b = got.partition(b"\r\n\r\n")
    print(h.split(b"\r\n")[0].decode(), "|", b.decode())
