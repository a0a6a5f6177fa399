#!/usr/bin/env python3
# spec/support/mtls_whoami.py PORT CERT KEY CA LOG: an HTTPS server that
# requires a client certificate (signed by CA) and answers every request
# on a keep-alive connection with "cn=<the client certificate's CN>
# conn=<n>", n counting the TLS connections it accepted. So a client can
# see which identity authenticated the connection a request went out on,
# and whether the connection was a new one. Writes "ready" to LOG once
# listening and "closed <n>" when connection n ends. Ends when killed.
import socket, ssl, sys, threading

port, cert, key, ca, log = (int(sys.argv[1]), sys.argv[2], sys.argv[3],
                            sys.argv[4], sys.argv[5])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.load_verify_locations(ca)
ctx.verify_mode = ssl.CERT_REQUIRED
lock = threading.Lock()
count = [0]


def note(line):
    with lock:
        with open(log, "a") as f:
            f.write(line + "\n")


def serve(raw):
    try:
        c = ctx.wrap_socket(raw, server_side=True)
    except (OSError, ssl.SSLError):
        raw.close()
        return
    with lock:
        count[0] += 1
        n = count[0]
    cn = "?"
    for rdn in c.getpeercert().get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                cn = v
    data = b""
    try:
        while True:
            while b"\r\n\r\n" not in data:
                d = c.recv(65536)
                if not d:
                    return
                data += d
            _, _, data = data.partition(b"\r\n\r\n")
            body = ("cn=%s conn=%d" % (cn, n)).encode()
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                      % len(body) + body)
    except (OSError, ssl.SSLError):
        pass
    finally:
        c.close()
        note("closed %d" % n)


s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(16)
note("ready")
while True:
    conn, _ = s.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
