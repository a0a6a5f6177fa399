# slow_http.py PORT MODE LOG: a raw HTTP server answering slowly, for the
# specs of what a client does with a slow body. Reads each request whole,
# then answers 200:
#   drip    Content-Length 100, the body 1 byte / 0.3 s (a webhook
#           receiver whose discarded body is slow)
#   steady  a 2,000-byte bill (SHA-1 35bea1aa...c86d) in 20 pieces, one
#           each 0.15 s: 3 s in all, flowing
#   stall   the same bill's first 100 bytes, then nothing
# Writes "ready" to LOG once listening and "start" per request (flushed).
import sys, time
from rawhttp import note, read_request, serve_forever
port, mode, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
BILL = b"".join(b"%04d," % i + b"x" * 94 + b"\n" for i in range(20))
def answer(c):
    if read_request(c) is None: return
    note(log, "start")
    if mode == "drip":
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):
            c.sendall(b"x")
            time.sleep(0.3)
        return
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
              b"Content-Length: %d\r\n\r\n" % len(BILL))
    if mode == "steady":
        for i in range(20):
            c.sendall(BILL[i * 100:(i + 1) * 100])
            time.sleep(0.15)
    else:
        c.sendall(BILL[:100])
        time.sleep(60)
serve_forever(port, 16, log, answer)
