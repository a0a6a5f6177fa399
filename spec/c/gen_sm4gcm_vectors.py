#!/usr/bin/env python3
"""Known answers for SM4-GCM with nonces other than 12 bytes, computed
with an independent implementation: the `cryptography` package's SM4-GCM
(its bundled OpenSSL), not paygate's GHASH. Also crafts a 16-byte nonce
whose J0 ends in 0xfffffffe, so the payload counter wraps its low 32 bits
after one block (GCM's inc32 must not carry into the upper 96 bits).
Prints the initialisers of test_long_nonces() in spec/c/test_sm4gcm.c
(run: python3 spec/c/gen_sm4gcm_vectors.py; needs cryptography >= 42
with a bundled OpenSSL that has SM4-GCM, which accepts 8..128-byte IVs)."""
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY = bytes.fromhex("0123456789abcdeffedcba9876543210")
AAD = b"transaction"
PT = bytes(range(64)) + b"paygate any-length nonce"


def seal(key, iv, aad, pt):
    e = Cipher(algorithms.SM4(key), modes.GCM(iv)).encryptor()
    e.authenticate_additional_data(aad)
    ct = e.update(pt) + e.finalize()
    return ct + e.tag


R = 0xE1 << 120


def gmul(x, y):                       # GF(2^128), GCM bit order
    z, v = 0, y
    for i in range(127, -1, -1):
        if (x >> i) & 1:
            z ^= v
        v = (v >> 1) ^ R if v & 1 else v >> 1
    return z


def ginv(a):                           # a^(2^128 - 2)
    r, e = 1 << 127, (1 << 128) - 2    # 1 << 127 is the field's one
    while e:
        if e & 1:
            r = gmul(r, a)
        a = gmul(a, a)
        e >>= 1
    return r


def wrap_nonce(key):
    ecb = Cipher(algorithms.SM4(key), modes.ECB()).encryptor()
    h = int.from_bytes(ecb.update(bytes(16)) + ecb.finalize(), "big")
    hi = ginv(h)
    j0 = (0x5047 << 112) | 0xFFFFFFFE  # any upper bits, low 32 = 2^32 - 2
    lens = 128                         # 0^64 || [len(IV) = 128 bits]_64
    iv = gmul(gmul(j0, hi) ^ lens, hi)
    # check: J0 = GHASH(IV || lens) = ((IV * H) ^ lens) * H
    assert gmul(gmul(iv, h) ^ lens, h) == j0
    return iv.to_bytes(16, "big")


def c_hex(b):
    return '"' + b.hex() + '"'


for iv in [b"01234567", b"0123456789abc", b"0123456789abcdef",
           b"0123456789abcdef0123456789abcdef", bytes(range(60)),
           wrap_nonce(KEY)]:
    print("    { %s,\n      %s }," % (c_hex(iv), c_hex(seal(KEY, iv, AAD, PT))))
