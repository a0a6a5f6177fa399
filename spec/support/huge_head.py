# huge_head.py PORT LOG: answers HTTP requests on 127.0.0.1:PORT with a
# response head too large for the client: /line one header line of 150
# KiB, /many 3000 header lines of about 100 bytes (300 KiB), /ok a small
# answer. Writes "ready" to LOG once listening; exits after 60 s.
import os, sys, threading, time
from rawhttp import read_request, serve_forever
port, log = int(sys.argv[1]), sys.argv[2]
def answer(c):
    req = read_request(c)
    if req is None:
        return
    path = req[0].split(b" ", 2)[1]
    if path == b"/line":
        head = b"X-Big: " + b"a" * (150 * 1024) + b"\r\n"
    elif path == b"/many":
        head = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 90)
                        for i in range(3000))
    else:
        head = b""
    c.sendall(b"HTTP/1.1 200 OK\r\n" + head
              + b"Content-Length: 2\r\nConnection: close\r\n\r\nok")
threading.Thread(target=lambda: (time.sleep(60), os._exit(0)),
                 daemon=True).start()
serve_forever(port, 16, log, answer)
