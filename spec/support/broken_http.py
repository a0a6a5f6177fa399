# broken_http.py PORT LOG: a raw HTTP/1.1 server with keep-alive whose
# answers break HTTP as the request's path says, for the specs of the
# HTTP client facing broken servers. Logs "<METHOD> <target>" per request
# read whole (flushed), then:
#   /ok          200 "ok"
#   /cut-<n>     the first n bytes of a 200 head with a header and a
#                body ("HTTP/1.1 200 OK\r\nX-A: a\r\nContent-Length: 2"
#                "\r\n\r\nok"), then close
#   /stale       200 "ok", then 0.1 s later, on the idle connection, a
#                second answer to no request: 200 "stale", and logs
#                "sent stale"; keeps serving
#   /barecr      200 "ok" with a header line holding a bare CR:
#                "X-A: a\rX-B: b"
#   /fold        200 "ok" with folded header lines (obs-fold): "X-A: one",
#                "  two", "\tthree: 3", "X-B: b", "X-A: again", " more"
#   /foldfirst   200 "ok" whose first header line is folded (obs-fold
#                with no field before it to go on): "  X-A: a"
#   /nocolon-<n> 200 "ok" with a header line that holds no colon (neither
#                a field nor a folded line): n = 1 right after the status
#                line, 2 after a field ("Authorization Bearer s3cr3t-...",
#                a secret no error may show), 3 the last before the blank
#                line, 4 in a 100 Continue head before the 200
#   /nul-<n>     200 "ok" with a NUL byte in its head: n = 1 in a header
#                value, 2 in a field holding a credential ("Authorization:
#                Bearer s3cr3t-...", a secret no error may show), 3 in the
#                status line's reason, 4 in a 100 Continue head before
#                the 200
#   /badlength-<name>  200 "ok" whose Content-Length is no number of
#                bytes: name = word ("x2"), negative ("-2"), empty (""),
#                then-bad ("2", then a second one "-2"), bad-then ("x2",
#                then "2")
#   /biglength-<name>  a 200 whose Content-Length no body can have, then
#                "ok" on the connection kept open (to a HEAD: no "ok"):
#                name = big (twenty nines), 2p63 (2^63, one past the most
#                a signed 64-bit number holds), plus ("+" and twenty
#                nines), max (2^63 - 1), tera (10^12), zeros (2, written
#                with 25 leading zeros), 204 (a 204 with twenty nines)
#   /nul-nocolon 200 "ok" with a header line holding a NUL byte and no
#                colon: "Bo\0gus"
#   /badstatus   "HTTP/1.1 20 OK" (a status code of two digits), "ok"
#   /badversion  "HTTP/1.2 200 OK", "ok"
#   /badcode     "HTTP/1.1 2000 OK", "ok"
#   /http3       "HTTP/3 200 OK", "ok"
#   /nospace     "HTTP/1.1200 OK", "ok"
#   /badstatus-100  a 100 Continue head, then "HTTP/1.1 20 OK", "ok"
#   /nothttp-<name>  an answer that is not HTTP, what a server of another
#                protocol sends: name = ssh (its banner, "SSH-2.0-..."),
#                tls (a TLS alert record, as some TLS servers answer a
#                request in plain text), redis (an error line)
#   /twolengths  a 200 with Content-Length 2 and Content-Length 40, then
#                40 bytes ("ok" and a second answer's head)
#   /twolengths-<name>  a 200 with two Content-Length fields, then "ok":
#                name = same ("2" twice), samelong (2 written with 28
#                leading zeros, twice), difflong (2, then 4, each written
#                with 28 leading zeros)
#   /switch      101 Switching Protocols (asked by no request), then
#                bytes of another protocol; keeps the connection 2 s
#   /late408     200 "ok", then 0.1 s later a 408 with Connection: close
#                on the idle connection, logs "sent 408", then closes
# Writes "ready" to LOG once listening; exits after 60 s.
import os, sys, threading, time
from rawhttp import note, read_request, serve_forever
port, log = int(sys.argv[1]), sys.argv[2]
FULL = b"HTTP/1.1 200 OK\r\nX-A: a\r\nContent-Length: 2\r\n\r\nok"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
NOCOLON = {
    "1": b"HTTP/1.1 200 OK\r\nBogus line\r\nContent-Length: 2\r\n\r\nok",
    "2": b"HTTP/1.1 200 OK\r\nX-A: a\r\nAuthorization Bearer s3cr3t-"
         + b"t0k3n" * 40 + b"\r\nContent-Length: 2\r\n\r\nok",
    "3": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nBogus\r\n\r\nok",
    "4": b"HTTP/1.1 100 Continue\r\nBogus\r\n\r\n" + OK,
}
NUL = {
    "1": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "2": b"HTTP/1.1 200 OK\r\nAuthorization: Bearer s3cr3t-\x00"
         + b"t0k3n" * 40 + b"\r\nContent-Length: 2\r\n\r\nok",
    "3": b"HTTP/1.1 200 O\x00K\r\nContent-Length: 2\r\n\r\nok",
    "4": b"HTTP/1.1 100 Continue\r\nX-A: a\x00b\r\n\r\n" + OK,
}
OTHER = {
    "/nul-nocolon": b"HTTP/1.1 200 OK\r\nBo\x00gus\r\n"
                    b"Content-Length: 2\r\n\r\nok",
    "/badstatus": b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok",
    "/badversion": b"HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "/badcode": b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
    "/http3": b"HTTP/3 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "/nospace": b"HTTP/1.1200 OK\r\nContent-Length: 2\r\n\r\nok",
    "/badstatus-100": b"HTTP/1.1 100 Continue\r\n\r\n"
                      b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok",
    "/nothttp-ssh": b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
    "/nothttp-tls": b"\x15\x03\x03\x00\x02\x02\x46",
    "/nothttp-redis": b"-ERR unknown command 'GET'\r\n",
}
BADLENGTH = {
    "word": b"Content-Length: x2\r\n",
    "negative": b"Content-Length: -2\r\n",
    "empty": b"Content-Length: \r\n",
    "then-bad": b"Content-Length: 2\r\nContent-Length: -2\r\n",
    "bad-then": b"Content-Length: x2\r\nContent-Length: 2\r\n",
}
BIGLENGTH = {
    "big": b"99999999999999999999",
    "2p63": b"9223372036854775808",
    "plus": b"+99999999999999999999",
    "max": b"9223372036854775807",
    "tera": b"1000000000000",
    "zeros": b"0" * 25 + b"2",
}
LONG2 = b"0" * 28 + b"2"
TWOLENGTHS = {
    "same": (b"2", b"2"),
    "samelong": (LONG2, LONG2),
    "difflong": (LONG2, b"0" * 28 + b"4"),
}
def answer(c):
    c.settimeout(30)
    while True:
        req = read_request(c)
        if req is None:
            return
        method, target = req[0].split(b" ")[:2]
        note(log, (method + b" " + target).decode())
        path = target.decode()
        if path.startswith("/cut-"):
            c.sendall(FULL[:int(path[5:])])
            return
        if path == "/barecr":
            c.sendall(b"HTTP/1.1 200 OK\r\nX-A: a\rX-B: b\r\n"
                      b"Content-Length: 2\r\n\r\nok")
            continue
        if path == "/fold":
            c.sendall(b"HTTP/1.1 200 OK\r\nX-A: one\r\n  two\r\n"
                      b"\tthree: 3\r\nX-B: b\r\nX-A: again\r\n more \r\n"
                      b"Content-Length: 2\r\n\r\nok")
            continue
        if path == "/foldfirst":
            c.sendall(b"HTTP/1.1 200 OK\r\n  X-A: a\r\n"
                      b"Content-Length: 2\r\n\r\nok")
            continue
        if path.startswith("/nocolon-"):
            c.sendall(NOCOLON[path[9:]])
            continue
        if path in OTHER:
            c.sendall(OTHER[path])
            continue
        if path.startswith("/nul-"):
            c.sendall(NUL[path[5:]])
            continue
        if path.startswith("/badlength-"):
            c.sendall(b"HTTP/1.1 200 OK\r\n" + BADLENGTH[path[11:]]
                      + b"\r\nok")
            continue
        if path.startswith("/biglength-"):
            name = path[11:]
            if name == "204":
                c.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: "
                          + BIGLENGTH["big"] + b"\r\n\r\n")
                continue
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: "
                      + BIGLENGTH[name] + b"\r\n\r\n"
                      + (b"" if method == b"HEAD" else b"ok"))
            continue
        if path == "/twolengths":
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                      b"Content-Length: 40\r\n\r\nokHTTP/1.1 200 OK\r\n"
                      b"Content-Length: 4\r\n\r\n")
            continue
        if path.startswith("/twolengths-"):
            first, second = TWOLENGTHS[path[12:]]
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: " + first
                      + b"\r\nContent-Length: " + second + b"\r\n\r\nok")
            continue
        if path == "/switch":
            c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x"
                      b"\r\nConnection: Upgrade\r\n\r\n\x00\x01binary")
            time.sleep(2)
            return
        c.sendall(OK)
        if path == "/stale":
            time.sleep(0.1)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")
            note(log, "sent stale")
        elif path == "/late408":
            time.sleep(0.1)
            c.sendall(b"HTTP/1.1 408 Request Timeout\r\nConnection: close"
                      b"\r\nContent-Length: 0\r\n\r\n")
            note(log, "sent 408")
            return
threading.Thread(target=lambda: (time.sleep(60), os._exit(0)),
                 daemon=True).start()
serve_forever(port, 16, log, answer)
