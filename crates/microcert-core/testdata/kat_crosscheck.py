#!/usr/bin/env python3
"""Independent check of kat.txt: a second implementation of the microcert
derivations and messages, written from the design (PROTOCOL.md sections 1
to 6) on top of pyca/cryptography's AES-CMAC and AES-CCM, sharing no code
with the Rust crate.

    python3 crates/microcert-core/testdata/kat_crosscheck.py [kat.txt]

Recomputes every K0, KEY, KTR, challenge and MESSAGE of the file and exits
non-zero at the first difference. Without an argument it also checks
kat_fs.txt, the forward-secret update (v1.2): the public keys from the
private ones, Z by pyca's ECDH on P-256, the SP 800-56C two-step KDF,
the UPDATE_SEED_FS COMMAND and the ENROLL answering it.
"""

import datetime
import hashlib
import os
import struct
import sys

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from cryptography.hazmat.primitives.cmac import CMAC

TYPE_NIBBLE = {
    "auth": 1, "auth-response": 2, "signature": 3, "sealed": 4,
    "enroll-transport": 5, "enroll-update": 5, "command": 6,
    "receipt-center": 7, "receipt-node": 7,
}
LABEL = {
    "auth": b"MC-AUTH", "auth-response": b"MC-AUTH", "signature": b"MC-SIGN",
    "sealed": b"MC-ENC", "enroll-update": b"MC-UPD", "command": b"MC-CMD",
    "receipt-center": b"MC-RCPT-C", "receipt-node": b"MC-RCPT-N",
}


def cmac(key, data):
    c = CMAC(algorithms.AES(key))
    c.update(data)
    return c.finalize()


def kdf(key, label, context):
    return cmac(key, b"\x00\x00\x00\x01" + label + b"\x00" + context + b"\x00\x00\x00\x80")


def k0(seed, base_year, t, r):
    rows = [seed[16 * i:16 * i + 16] for i in range(61)]
    y, m, d = rows[0:5], rows[5:17], rows[17:48]
    fixed = rows[48:61]
    date = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    yi = date.year - base_year
    assert 0 <= yi < 5, "time outside the seed's years"
    pick = list(range(13))
    for j in range(4):
        v = (r >> (48 - 16 * j)) & 0xFFFF
        k = j + v % (13 - j)
        pick[j], pick[k] = pick[k], pick[j]
    return cmac(y[yi], m[date.month - 1] + d[date.day - 1] + b"".join(fixed[p] for p in pick[:4]))


def parse(path):
    globals_, records, cur = {}, [], None
    for line in open(path, encoding="ascii"):
        line = line.rstrip("\n")
        if line.startswith("#"):
            continue
        if not line.strip():
            if cur:
                records.append(cur)
            cur = None
            continue
        name, _, value = line.partition(" = ")
        if cur is None and name != "COUNT":
            globals_[name] = value
            continue
        cur = cur or {}
        cur[name] = value
    if cur:
        records.append(cur)
    return globals_, records


def check(rec, name, value):
    if rec[name] != value.hex() if isinstance(value, bytes) else rec[name] != value:
        sys.exit(f"COUNT {rec['COUNT']} ({rec['TYPE']}): {name} differs:\n"
                 f"  file   {rec[name]}\n  python {value.hex() if isinstance(value, bytes) else value}")


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "kat.txt")
    g, records = parse(path)
    seed, base_year = bytes.fromhex(g["SEED"]), int(g["BASE_YEAR"])
    # A periodic seed lets wrong row offsets pass: every row must differ.
    assert len(seed) == 976 and len({seed[i:i + 16] for i in range(0, 976, 16)}) == 61, \
        "the seed must have 61 distinct rows"
    checked = 0
    for rec in records:
        ty = rec["TYPE"]
        if ty == "challenge":
            kchal, dev, c = (bytes.fromhex(rec[n]) for n in ("KCHAL", "DEVICE", "C"))
            w = int(rec["NOW"]) // 60
            check(rec, "W", str(w))
            check(rec, "MESSAGE", c + cmac(kchal, dev + c + struct.pack(">I", w))[:8])
            checked += 1
            continue
        if ty == "transport-key":
            ktr = kdf(bytes.fromhex(rec["KTRANS"]), b"MC-TRANSPORT",
                      bytes.fromhex(rec["DEVICE"]) + bytes([int(rec["EPOCH"])]))
            check(rec, "KTR", ktr)
            checked += 1
            continue
        suite = int(rec["SUITE"])
        taglen = {1: 8, 2: 16}[suite]
        dev = bytes.fromhex(rec["DEVICE"])
        gen, t, r = int(rec["GENERATION"]), int(rec["TIME"]), int(rec["NONCE"], 16)
        header = (bytes([0x10 | TYPE_NIBBLE[ty], suite]) + dev + bytes([gen])
                  + struct.pack(">IQ", t, r))
        context = dev + bytes([gen]) + struct.pack(">IQ", t, r)
        nonce = struct.pack(">IQ", t, r) + b"\x00"
        if ty == "enroll-transport":
            key = kdf(bytes.fromhex(rec["KTRANS"]), b"MC-TRANSPORT",
                      dev + bytes([int(rec["EPOCH"])]))
            check(rec, "KTR", key)
        else:
            k = k0(seed, base_year, t, r)
            check(rec, "K0", k)
            key = kdf(k, LABEL[ty], context)
        check(rec, "KEY", key)
        aud = bytes.fromhex(rec.get("AUDIENCE", "00" * 8))
        if "AUDIENCE_NAME" in rec:
            check(rec, "AUDIENCE", hashlib.sha256(b"MC-AUD" + rec["AUDIENCE_NAME"].encode()).digest()[:8])
        if ty == "auth":
            msg = header + cmac(key, header + aud)[:taglen]
        elif ty == "auth-response":
            ch = bytes.fromhex(rec["CHALLENGE"])
            msg = header + ch + cmac(key, header + ch + aud)[:taglen]
        elif ty == "signature":
            digest = hashlib.sha256(bytes.fromhex(rec["DATA"])).digest()
            msg = header + cmac(key, header + digest)[:taglen]
        elif ty == "sealed":
            assert aud != b"\x00" * 8
            msg = header + AESCCM(key, tag_length=taglen).encrypt(nonce, bytes.fromhex(rec["DATA"]), header + aud)
        elif ty.startswith("enroll"):
            pt = bytes.fromhex(rec["NEW_SEED"]) + struct.pack(">H", int(rec["NEW_SEED_BASE_YEAR"]))
            msg = header + AESCCM(key, tag_length=taglen).encrypt(nonce, pt, header)
        elif ty == "command":
            body = struct.pack(">IB", int(rec["COUNTER"]), int(rec["OPCODE"]))
            msg = header + body + cmac(key, header + body)[:taglen]
        else:
            body = bytes.fromhex(rec["REF"]) + bytes([int(rec["STATUS"])])
            msg = header + body + cmac(key, header + body)[:taglen]
        check(rec, "MESSAGE", msg)
        checked += 1
    print(f"{checked} of {len(records)} records match the independent implementation")
    if checked != len(records):
        sys.exit(1)


def check_fs(path):
    """The forward-secret update vectors (docs/protocol.md, v1.2)."""
    g, records = parse(path)
    seed, base_year = bytes.fromhex(g["SEED"]), int(g["BASE_YEAR"])
    curve = ec.SECP256R1()
    checked = 0
    for rec in records:
        assert rec["TYPE"] == "fs-update"
        suite = int(rec["SUITE"])
        taglen = {1: 8, 2: 16}[suite]
        dev = bytes.fromhex(rec["DEVICE"])
        priv = {}
        for who in ("C", "N"):
            d = ec.derive_private_key(int(rec["D_" + who], 16), curve)
            priv[who] = d
            check(rec, "Q_" + who, d.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint))
        qc, qn = bytes.fromhex(rec["Q_C"]), bytes.fromhex(rec["Q_N"])
        z = priv["C"].exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(curve, qn))
        assert z == priv["N"].exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(curve, qc))
        check(rec, "Z", z)
        ct, cr = int(rec["CMD_TIME"]), int(rec["CMD_NONCE"], 16)
        et, er = int(rec["ENROLL_TIME"]), int(rec["ENROLL_NONCE"], 16)
        salt = struct.pack(">QQ", cr, er)
        check(rec, "SALT", salt)
        kdk = cmac(salt, z)
        check(rec, "KDK", kdk)
        context = dev + bytes([0, 1]) + qc + qn
        check(rec, "CONTEXT", context)
        kfs = kdf(kdk, b"MC-FS-UPD", context)
        check(rec, "KFS", kfs)
        # The COMMAND: generation 0, opcode 3, the center's public key under Kcmd.
        k = k0(seed, base_year, ct, cr)
        check(rec, "CMD_K0", k)
        kcmd = kdf(k, b"MC-CMD", dev + bytes([0]) + struct.pack(">IQ", ct, cr))
        check(rec, "CMD_KEY", kcmd)
        header = bytes([0x16, suite]) + dev + bytes([0]) + struct.pack(">IQ", ct, cr)
        body = struct.pack(">IB", int(rec["COUNTER"]), 3) + qc
        check(rec, "COMMAND", header + body + cmac(kcmd, header + body)[:taglen])
        # The ENROLL: generation 1, Qn, CCM under Kfs (aad H || Qn), Kupd tag.
        k = k0(seed, base_year, et, er)
        check(rec, "UPD_K0", k)
        kupd = kdf(k, b"MC-UPD", dev + bytes([1]) + struct.pack(">IQ", et, er))
        check(rec, "UPD_KEY", kupd)
        header = bytes([0x15, suite]) + dev + bytes([1]) + struct.pack(">IQ", et, er)
        nonce = struct.pack(">IQ", et, er) + b"\x00"
        pt = bytes.fromhex(rec["NEW_SEED"]) + struct.pack(">H", int(rec["NEW_SEED_BASE_YEAR"]))
        signed = header + qn + AESCCM(kfs, tag_length=taglen).encrypt(nonce, pt, header + qn)
        check(rec, "MESSAGE", signed + cmac(kupd, signed)[:taglen])
        checked += 1
    print(f"{checked} of {len(records)} forward-secret records match the independent implementation")
    if checked != len(records) or not records:
        sys.exit(1)


if __name__ == "__main__":
    main()
    if len(sys.argv) == 1:
        check_fs(os.path.join(os.path.dirname(__file__), "kat_fs.txt"))
