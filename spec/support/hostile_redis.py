# hostile_redis.py PORT LOG: a "Redis" on 127.0.0.1:PORT that answers
# GET <mode> with the broken reply named by mode (REPLIES below; "split"
# sends a good one a byte per segment, "closemid" closes inside a bulk,
# "never" does not answer), SUBSCRIBE <channel> with its confirmation
# followed by the message named by channel (MESSAGES), PING with +PONG,
# anything else with +OK. Appends to LOG: "ready" once listening,
# "accept N" per connection (numbered from 1), "N <command line>" per
# command read on connection N, "closed N" when the client closed it.
# Exits after 120 s (bounded).
import socket, sys, threading, time
port, log = int(sys.argv[1]), sys.argv[2]
lock = threading.Lock()

def note(line):
    with lock, open(log, "a") as f:
        f.write(line + "\n")

REPLIES = {
    "badtype": b"?junk\r\n",
    "negbulk": b"$-5\r\n",
    "bulkjunk": b"$abc\r\n",
    "hugebulk": b"$2147483648\r\nabc",
    # lengths that lie: "10" and "100\r\n" were handed to the caller
    "shortbulk": b"$2\r\n100\r\n",
    "longbulk": b"$5\r\n100\r\n+OK\r\n",
    "nested": b"*1\r\n" * 10000 + b":1\r\n",
    "intover": b":99999999999999999999999\r\n",
    "intjunk": b":12abc\r\n",
    "negarray": b"*-5\r\n",
    "hugearray": b"*9223372036854775807\r\n",
    # one reply for the GET, then one nobody asked for
    "extra": b"+OK\r\n+EXTRA\r\n",
}

def bulk(s):
    return b"$%d\r\n%s\r\n" % (len(s), s)

MESSAGES = {
    "short": b"*1\r\n" + bulk(b"message"),
    "intkind": b"*3\r\n:1\r\n" + bulk(b"intkind") + bulk(b"x"),
    "nilchannel": b"*3\r\n" + bulk(b"message") + b"$-1\r\n" + bulk(b"x"),
    "unsub2": b"*2\r\n" + bulk(b"unsubscribe") + bulk(b"unsub2"),
    "unsubstr": b"*3\r\n" + bulk(b"punsubscribe") + bulk(b"unsubstr")
                + bulk(b"x"),
    "good": b"*3\r\n" + bulk(b"message") + bulk(b"good") + bulk(b"hi"),
}

# Replies that never end: the head, then the chunk again and again until
# the client closes the connection (or cap bytes were sent: then the
# connection is held, unanswered, until the client closes it; the caps
# bound what a client that does not stop reading holds, array elements
# costing it some 60 bytes each).
STREAMS = {
    "streambulk": (b"$1000000000\r\n", b"x" * 65536, 128 << 20),
    "streamarray": (b"*100000000\r\n", b":1\r\n" * 16384, 8 << 20),
    "streamline": (b"+", b"a" * 65536, 16 << 20),
    "streammsg": (b"*3\r\n" + bulk(b"message") + bulk(b"streammsg")
                  + b"$1000000000\r\n", b"x" * 65536, 128 << 20),
}

def stream(c, f, mode):
    head, chunk, cap = STREAMS[mode]
    c.sendall(head)
    sent = 0
    while sent < cap:
        c.sendall(chunk)
        sent += len(chunk)
    f.read()                             # until the client closes

def read_cmd(f):
    line = f.readline()
    if not line.startswith(b"*"):
        return None
    args = []
    for _ in range(int(line[1:])):
        n = int(f.readline()[1:])
        args.append(f.read(n + 2)[:-2].decode("latin-1"))
    return args

def serve(c, cid):
    f = c.makefile("rb")
    try:
        while True:
            args = read_cmd(f)
            if not args:
                note("closed %d" % cid)
                return
            note("%d %s" % (cid, " ".join(args)))
            cmd = args[0].upper()
            if cmd == "PING":
                c.sendall(b"+PONG\r\n")
            elif cmd == "SUBSCRIBE":
                ch = args[1].encode()
                c.sendall(b"*3\r\n" + bulk(b"subscribe") + bulk(ch) + b":1\r\n"
                          + MESSAGES.get(args[1], b""))
                if args[1] in STREAMS:
                    stream(c, f, args[1])
                    note("closed %d" % cid)
                    return
            elif cmd in ("GET", "BLPOP") and args[1] in STREAMS:
                stream(c, f, args[1])
                note("closed %d" % cid)
                return
            elif cmd == "GET" and args[1] in REPLIES:
                c.sendall(REPLIES[args[1]])
            elif cmd == "GET" and args[1] == "split":
                for b in bulk(b"hello"):
                    c.sendall(bytes([b]))
                    time.sleep(0.005)
            elif cmd == "GET" and args[1] == "closemid":
                c.sendall(b"$10\r\nabc")
                note("closed %d" % cid)
                return
            elif cmd == "GET" and args[1] == "never":
                pass
            else:
                c.sendall(b"+OK\r\n")
    except OSError:
        note("closed %d" % cid)
    finally:
        c.close()

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(16)
note("ready")
end = time.time() + 120
s.settimeout(1)
n = 0
while time.time() < end:
    try:
        c, _ = s.accept()
    except socket.timeout:
        continue
    n += 1
    note("accept %d" % n)
    threading.Thread(target=serve, args=(c, n), daemon=True).start()
