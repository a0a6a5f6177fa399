# answer_once.py PORT STATUS BODY LOG: answers ONE HTTP request on
# 127.0.0.1:PORT with STATUS and the JSON BODY, then exits. The listening
# socket is closed as soon as that request's connection is accepted, so
# every later connect is refused (a server that answered once, then went
# away). Writes "ready" to LOG once listening.
import socket, sys
port, status, body, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode(), sys.argv[4]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(1)
with open(log, "w") as f:
    f.write("ready\n")
s.settimeout(30)
c, _ = s.accept()
s.close()
c.settimeout(10)
data = b""
while b"\r\n\r\n" not in data:
    d = c.recv(65536)
    if not d:
        sys.exit(0)
    data += d
head, _, rest = data.partition(b"\r\n\r\n")
n = 0
for line in head.split(b"\r\n"):
    if line.lower().startswith(b"content-length:"):
        n = int(line.split(b":")[1])
while len(rest) < n:
    d = c.recv(65536)
    if not d:
        break
    rest += d
c.sendall(b"HTTP/1.1 %d Error\r\nContent-Type: application/json\r\n"
          b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (status, len(body)) + body)
c.close()
