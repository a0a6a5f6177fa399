# huge_head.py PORT LOG: answers HTTP requests on 127.0.0.1:PORT with a
# response head too large for the client: /line one header line of 150
# KiB, /many 3000 header lines of about 100 bytes (300 KiB), /ok a small
# answer. Writes "ready" to LOG once listening; exits after 60 s.
import socket, sys, threading, time, os
port, log = int(sys.argv[1]), sys.argv[2]
def handle(c):
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            d = c.recv(65536)
            if not d:
                return
            data += d
        path = data.split(b" ", 2)[1]
        if path == b"/line":
            head = b"X-Big: " + b"a" * (150 * 1024) + b"\r\n"
        elif path == b"/many":
            head = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 90)
                            for i in range(3000))
        else:
            head = b""
        c.sendall(b"HTTP/1.1 200 OK\r\n" + head
                  + b"Content-Length: 2\r\nConnection: close\r\n\r\nok")
    except OSError:
        pass
    finally:
        c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(16)
threading.Thread(target=lambda: (time.sleep(60), os._exit(0)),
                 daemon=True).start()
with open(log, "w") as f:
    f.write("ready\n")
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
