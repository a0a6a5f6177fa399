# bill_server.py PORT MODE LOG: a raw HTTP server for the bill download
# specs, answering any GET with a 200 and a bill body of 2,000 bytes.
# MODE steady: the body in 20 pieces, one each 0.15 s (3 s in all).
# MODE stall: 100 bytes, then nothing (the connection stays open).
# Writes "ready" to LOG once listening, "start" per request (flushed).
import socket, sys, threading, time
port, mode, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
BODY = b"".join(b"%04d," % i + b"x" * 94 + b"\n" for i in range(20))
lock = threading.Lock()
def note(s):
    with lock:
        with open(log, "a") as f:
            f.write(s + "\n")
def serve(c):
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            d = c.recv(65536)
            if not d: return
            data += d
        note("start")
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(BODY))
        if mode == "steady":
            for i in range(20):
                c.sendall(BODY[i * 100:(i + 1) * 100])
                time.sleep(0.15)
        else:
            c.sendall(BODY[:100])
            time.sleep(60)
    except OSError:
        pass
    finally:
        c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(16)
note("ready")
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
