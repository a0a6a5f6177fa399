# scripted_sentinel.py PORT DIR: a "Sentinel" on 127.0.0.1:PORT that a
# spec steers through files in DIR.
#   DIR/answer   "DELAY PORT EPOCH": SENTINEL MASTER is answered, DELAY s
#                after the question, with 127.0.0.1:PORT at EPOCH (the
#                file is read when the question comes: the answer is the
#                view of that moment, however late it arrives)
#   DIR/publish  a +switch-master payload: sent once to every subscriber,
#                then the file is removed
#   DIR/log      "ready" once listening, then "ask" per SENTINEL MASTER
# PING is +PONG, SUBSCRIBE is confirmed, anything else an error. Exits
# after 120 s (bounded).
import os, socket, sys, threading, time
port, d = int(sys.argv[1]), sys.argv[2]
lock = threading.Lock()

def note(line):
    with lock, open(os.path.join(d, "log"), "a") as f:
        f.write(line + "\n")

def bulk(s):
    s = s.encode()
    return b"$%d\r\n%s\r\n" % (len(s), s)

def read_cmd(f):
    line = f.readline()
    if not line.startswith(b"*"):
        return None
    args = []
    for _ in range(int(line[1:])):
        n = int(f.readline()[1:])
        args.append(f.read(n + 2)[:-2].decode("latin-1"))
    return args

def publish_loop(c, ch):
    path = os.path.join(d, "publish")
    while True:
        with lock:
            msg = None
            if os.path.exists(path):
                with open(path) as f:
                    msg = f.read().strip()
                os.remove(path)
        if msg is not None:
            c.sendall(b"*3\r\n" + bulk("message") + bulk(ch) + bulk(msg))
        time.sleep(0.02)

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
                with open(os.path.join(d, "answer")) as af:
                    delay, mport, epoch = af.read().split()
                time.sleep(float(delay))
                c.sendall(b"*6\r\n" + bulk("ip") + bulk("127.0.0.1")
                          + bulk("port") + bulk(mport)
                          + bulk("config-epoch") + bulk(epoch))
            elif cmd == "PING":
                c.sendall(b"+PONG\r\n")
            elif cmd == "SUBSCRIBE":
                c.sendall(b"*3\r\n" + bulk("subscribe") + bulk(args[1])
                          + b":1\r\n")
                publish_loop(c, args[1])
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
