# drip_receiver.py PORT MODE LOG: a raw HTTP receiver for the outbox specs.
# MODE drip: answers "200 OK" at once, then drips its body 1 byte / 0.3 s.
# Every request's start is logged as a line "start" to LOG (flushed).
import socket, sys, threading, time
port, mode, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
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
        head, _, body = data.partition(b"\r\n\r\n")
        n = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                n = int(line.split(b":")[1])
        while len(body) < n:
            d = c.recv(65536)
            if not d: return
            body += d
        note("start")
        if mode == "drip":
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
            for _ in range(100):
                c.sendall(b"x")
                time.sleep(0.3)
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
