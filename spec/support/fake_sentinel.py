# fake_sentinel.py PORT ANSWER LOG: a "Sentinel" on 127.0.0.1:PORT whose
# SENTINEL MASTER answer is ANSWER, raw RESP (a hostile or broken one);
# PING is +PONG, SUBSCRIBE is confirmed (nothing is ever published),
# anything else an error. Appends "ask" to LOG for each SENTINEL MASTER,
# and writes "ready" there once listening. Exits after 120 s (bounded).
import socket, sys, threading, time
port, answer, log = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3]
lock = threading.Lock()

def note(line):
    with lock, open(log, "a") as f:
        f.write(line + "\n")

def read_cmd(f):
    line = f.readline()
    if not line.startswith(b"*"):
        return None
    args = []
    for _ in range(int(line[1:])):
        n = int(f.readline()[1:])
        args.append(f.read(n + 2)[:-2].decode("latin-1"))
    return args

def serve(c):
    f = c.makefile("rb")
    try:
        while True:
            args = read_cmd(f)
            if not args:
                return
            cmd = args[0].upper()
            if cmd == "SENTINEL":
                note("ask")
                c.sendall(answer)
            elif cmd == "PING":
                c.sendall(b"+PONG\r\n")
            elif cmd == "SUBSCRIBE":
                ch = args[1].encode()
                c.sendall(b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n"
                          % (len(ch), ch))
            else:
                c.sendall(b"-ERR unknown command\r\n")
    except OSError:
        pass
    finally:
        c.close()

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(16)
note("ready")
end = time.time() + 120
s.settimeout(1)
while time.time() < end:
    try:
        c, _ = s.accept()
    except socket.timeout:
        continue
    threading.Thread(target=serve, args=(c,), daemon=True).start()
