# rawhttp.py: what the raw HTTP test servers (hostile_http.py, huge_head.py,
# slow_http.py) share: the log, reading a request whole, the accept loop.
# They import it from their own folder (python puts it on sys.path).
import socket, threading
lock = threading.Lock()
def note(log, s):
    with lock:
        with open(log, "a") as f:
            f.write(s + "\n")
# The request's head and its Content-Length body; None when the client
# closes before it is whole.
def read_request(c):
    data = b""
    while b"\r\n\r\n" not in data:
        d = c.recv(65536)
        if not d: return None
        data += d
    head, _, body = data.partition(b"\r\n\r\n")
    n = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":")[1])
    while len(body) < n:
        d = c.recv(65536)
        if not d: return None
        body += d
    return head, body
# Listens on 127.0.0.1:port, writes "ready" to log, then runs answer(c)
# on a thread per connection, closing it after; a peer gone is no error.
def serve_forever(port, backlog, log, answer):
    def serve(c):
        try:
            answer(c)
        except OSError:
            pass
        finally:
            c.close()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(backlog)
    note(log, "ready")
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
