# closing_listener.py PORT LOG: a TCP listener on 127.0.0.1:PORT that
# closes every connection as soon as it accepts it (a server that is up
# but never answers: a Redis still starting, a wrong port). Writes "ready"
# to LOG once listening, then "accept" per connection (flushed before the
# close, so a client that saw the close finds its line).
import socket, sys
port, log = int(sys.argv[1]), sys.argv[2]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(64)
with open(log, "a") as f:
    f.write("ready\n")
while True:
    c, _ = s.accept()
    with open(log, "a") as f:
        f.write("accept\n")
    c.close()
