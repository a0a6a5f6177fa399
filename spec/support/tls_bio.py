# spec/support/tls_bio.py: a TLS client over a memory BIO, for specs that
# put raw bytes under TLS (tls_partial.py, tls_halfclose.py).
import socket, ssl


class Client:
    def __init__(self, port, ca, timeout):
        ctx = ssl.create_default_context(cafile=ca)
        ctx.check_hostname = False
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.inc, self.out, server_hostname="localhost")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                if not self.pump():
                    raise SystemExit("closed during the handshake")
        self.flush()

    def flush(self):
        """Sends what the TLS layer has written."""
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def pump(self):
        """Feeds what the socket has to the TLS layer; False at its end."""
        data = self.sock.recv(65536)
        if not data:
            return False
        self.inc.write(data)
        return True
