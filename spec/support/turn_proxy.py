#!/usr/bin/env python3
"""spec/support/turn_proxy.py: a TCP relay on loopback that counts turns.

    turn_proxy.py LISTEN_PORT TARGET_PORT COUNT_FILE [LIFETIME_S]

Relays one client connection at a time to 127.0.0.1:TARGET_PORT and writes
to COUNT_FILE, after every chunk it relays, how many times the client spoke
after the server had (a "turn": one round trip the client waited for).
A client that pipelines its requests takes one turn for all of them. The
relay prints "ready" once it listens and exits by itself after LIFETIME_S
(default 60) seconds.
"""
import os
import select
import socket
import sys
import time


def main():
    lport, tport, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    deadline = time.monotonic() + (float(sys.argv[4]) if len(sys.argv) > 4 else 60)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", lport))
    ls.listen(8)
    print("ready", flush=True)
    turns, last = 0, "server"

    def record():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(turns))
        os.replace(tmp, path)

    record()
    pairs = {}
    while time.monotonic() < deadline:
        r, _, _ = select.select([ls] + list(pairs), [], [], 0.2)
        for s in r:
            if s is ls:
                c, _ = ls.accept()
                t = socket.create_connection(("127.0.0.1", tport))
                for x in (c, t):
                    x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                pairs[c], pairs[t] = (t, "client"), (c, "server")
                continue
            if s not in pairs:
                continue
            other, side = pairs[s]
            data = s.recv(65536)
            if not data:
                for x in (s, other):
                    pairs.pop(x, None)
                    x.close()
                continue
            if side == "client" and last == "server":
                turns += 1
            last = side
            other.sendall(data)
            record()


if __name__ == "__main__":
    main()
