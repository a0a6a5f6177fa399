#!/usr/bin/env python3
# spec/support/tls_partial.py PORT CA_FILE: a TLS client that makes one
# keep-alive request, reads its answer, then sends the first 3 bytes of a
# TLS record header (the next request's record begun) and nothing more.
# Prints "answered" after the answer, then "closed S" with the seconds from
# those 3 bytes until the server closed (or "open S" at its 30 s limit).
# Over a memory BIO, so the raw bytes go under the TLS layer.
import socket, ssl, sys, time
from tls_bio import Client

c = Client(int(sys.argv[1]), sys.argv[2], 30)
sock, tls = c.sock, c.tls

def pump():
    if not c.pump():
        raise SystemExit("closed early")

tls.write(b"GET /reached HTTP/1.1\r\nHost: x\r\n\r\n")
c.flush()
got = b""
while b"\r\n\r\n" not in got:
    try:
        got += tls.read(65536)
    except ssl.SSLWantReadError:
        pump()
head, _, body = got.partition(b"\r\n\r\n")
length = 0
for line in head.split(b"\r\n")[1:]:
    k, _, v = line.partition(b":")
    if k.strip().lower() == b"content-length":
        length = int(v.strip())
while len(body) < length:
    try:
        body += tls.read(65536)
    except ssl.SSLWantReadError:
        pump()
print("answered", flush=True)
sock.sendall(b"\x17\x03\x03")      # an application-data record begins
t0 = time.monotonic()
try:
    while sock.recv(65536):
        pass
    print("closed %.2f" % (time.monotonic() - t0))
except socket.timeout:
    print("open %.2f" % (time.monotonic() - t0))
