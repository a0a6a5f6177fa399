#!/usr/bin/env python3
"""A tiny authoritative DNS responder for the specs (UDP, loopback only).

usage: dns_responder.py ZONEFILE PORTFILE

Binds 127.0.0.1 on a free port, writes the port to PORTFILE (then
renamed into place, so a reader never sees half of it), and answers A
and AAAA questions from ZONEFILE, which it reads again whenever its
mtime changes (that is how a spec changes a record during the run).
Each ZONEFILE line is:

    NAME TYPE TTL ADDRESS [delay=SECONDS]

A line with delay answers that many seconds late (the answer is sent
from a timer; other questions are answered meanwhile). Unknown names
get NXDOMAIN; a known name without records of the asked type gets an
empty NOERROR answer. The question name is echoed as it came (evdns
randomizes its letter case). Queries are logged to PORTFILE.log.
"""
import heapq
import ipaddress
import os
import select
import socket
import struct
import sys
import time

TYPES = {"A": 1, "AAAA": 28}


def load(path):
    zone = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 4 or line.startswith("#"):
                continue
            name, rtype, ttl, addr = parts[:4]
            delay = 0.0
            for extra in parts[4:]:
                if extra.startswith("delay="):
                    delay = float(extra[6:])
            zone.setdefault(name.lower().rstrip("."), []).append(
                (TYPES[rtype], int(ttl), addr, delay))
    return zone


def parse_question(data):
    """Returns (id, flags, qname_wire, qname_text, qtype, end)."""
    qid, flags, qd = struct.unpack("!HHH", data[:6])
    if qd != 1:
        raise ValueError("one question expected")
    i, labels = 12, []
    while True:
        n = data[i]
        if n == 0:
            i += 1
            break
        if n & 0xC0:
            raise ValueError("compressed question")
        labels.append(data[i + 1:i + 1 + n].decode("ascii"))
        i += 1 + n
    qtype, _qclass = struct.unpack("!HH", data[i:i + 4])
    return qid, flags, data[12:i], ".".join(labels), qtype, i + 4


def answer(data, zone):
    qid, flags, qwire, qname, qtype, end = parse_question(data)
    records = zone.get(qname.lower().rstrip("."))
    rd = flags & 0x0100
    delay = 0.0
    body = b""
    count = 0
    rcode = 3 if records is None else 0
    for rtype, ttl, addr, d in records or []:
        delay = max(delay, d)
        if rtype != qtype:
            continue
        raw = ipaddress.ip_address(addr).packed
        body += struct.pack("!HHHIH", 0xC00C, rtype, 1, ttl, len(raw)) + raw
        count += 1
    header = struct.pack("!HHHHHH", qid, 0x8400 | rd | rcode, 1, count, 0, 0)
    return header + data[12:end] + body, delay, qname


def main():
    zonefile, portfile = sys.argv[1], sys.argv[2]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    with open(portfile + ".tmp", "w") as f:
        f.write("%d\n" % port)
    os.rename(portfile + ".tmp", portfile)
    log = open(portfile + ".log", "a", buffering=1)
    mtime, zone = None, {}
    later = []                          # heap of (when, seq, reply, peer)
    seq = 0
    while True:
        timeout = None
        if later:
            timeout = max(0.0, later[0][0] - time.monotonic())
        ready, _, _ = select.select([sock], [], [], timeout)
        now = time.monotonic()
        while later and later[0][0] <= now:
            _, _, reply, peer = heapq.heappop(later)
            sock.sendto(reply, peer)
        if not ready:
            continue
        data, peer = sock.recvfrom(2048)
        try:
            m = os.stat(zonefile).st_mtime_ns
            if m != mtime:
                zone, mtime = load(zonefile), m
            reply, delay, qname = answer(data, zone)
        except (ValueError, IndexError, OSError, KeyError) as e:
            log.write("bad query: %s\n" % e)
            continue
        log.write("%.3f %s %d\n" % (time.time(), qname, len(reply)))
        if delay > 0:
            seq += 1
            heapq.heappush(later, (now + delay, seq, reply, peer))
        else:
            sock.sendto(reply, peer)


if __name__ == "__main__":
    main()
