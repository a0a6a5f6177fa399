# hostile_http.py PORT LOG: a raw HTTP server that answers each request as
# its path says, for the specs of a webhook sink facing a hostile
# receiver (and of the WeChat Pay client: the answer is chosen by the
# path's last segment, the query dropped, so /v3/x/garbage?a=1 is
# /garbage). Reads each request whole (head and Content-Length body), logs
# "<path>" per request (flushed), then:
#   /redirect     302 to http://127.0.0.1:PORT/target (which answers 200)
#   /target       200
#   /r429         429 with Retry-After: 0 and a short body
#   /r401, /r403  401 (403) refusing the signature, as a receiver whose
#                 secret is not the sender's answers
#   /hang500      a 500 head with Content-Length 100, then nothing
#   /silent       nothing at all (the connection stays open)
#   /endless200   a 200 with a chunked body that never ends (1 KiB chunks)
#   /endless500   a 500 with a chunked body that never ends
#   /garbage      bytes that are no HTTP answer, then close
#   /hugehead     a 200 head with one header line of 300 KiB
#   /cut200       a 200 head with Content-Length 100, 3 bytes, then close
#   /r400nl       a 400 whose JSON body ends in a newline (as many
#                 frameworks write it)
#   /cut404       a 404 head with Content-Length 100, "unknown order",
#                 then close
# Writes "ready" to LOG once listening. Every connection ends within 30 s.
import sys, time
from rawhttp import note, read_request, serve_forever
port, log = int(sys.argv[1]), sys.argv[2]
def endless(c, status):
    c.sendall(b"HTTP/1.1 " + status + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"400\r\n" + b"z" * 1024 + b"\r\n"
    deadline = time.time() + 30
    while time.time() < deadline:
        c.sendall(chunk)
def answer(c):
    c.settimeout(30)
    req = read_request(c)
    if req is None: return
    head, _ = req
    target = head.split(b" ")[1].decode()
    note(log, target)
    path = "/" + target.split("?")[0].rsplit("/", 1)[-1]
    if path == "/redirect":
        c.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:%d"
                  b"/target\r\nContent-Length: 0\r\n\r\n" % port)
    elif path == "/target":
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    elif path == "/r429":
        c.sendall(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 0\r\n"
                  b"Content-Length: 9\r\n\r\nslow down")
    elif path in ("/r401", "/r403"):
        c.sendall(b"HTTP/1.1 %s Refused\r\nContent-Length: 27\r\n\r\n"
                  b'{"error":"bad_signature"}\r\n' % path[2:].encode())
    elif path == "/hang500":
        c.sendall(b"HTTP/1.1 500 Oops\r\nContent-Length: 100\r\n\r\n")
        time.sleep(30)
    elif path == "/silent":
        time.sleep(30)
    elif path == "/endless200":
        endless(c, b"200 OK")
    elif path == "/endless500":
        endless(c, b"500 Oops")
    elif path == "/garbage":
        c.sendall(b"SSH-2.0-OpenSSH_9.0\r\n\x00\xff\xfe garbage\r\n\r\n")
    elif path == "/hugehead":
        c.sendall(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (300 * 1024)
                  + b"\r\nContent-Length: 0\r\n\r\n")
    elif path == "/r400nl":
        c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 26\r\n\r\n"
                  b'{"error":"unknown order"}\n')
    elif path == "/cut200":
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
    elif path == "/cut404":
        c.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 100\r\n\r\n"
                  b"unknown order")
serve_forever(port, 32, log, answer)
