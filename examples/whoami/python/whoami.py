#!/usr/bin/env python3
"""A TCP server that tells each client who pktmeta says opened the
connection: one getsockopt on the accepted socket, standard library only.

    python3 whoami.py 8080

The layout is struct pktmeta_conn_origin (bpf/include/pktmeta_origin.h).
socket.getsockopt() takes buffers of at most 1024 bytes and the answer is
1952, so the call goes to libc through ctypes.
"""
import ctypes
import ctypes.util
import errno
import os
import socket
import struct
import sys

SOL_PKTMETA = 0x706D
PKTMETA_SO_ORIGIN = 1
ORIGIN_VERSION = 1
F_REMOTE, F_NAT, F_UDP, F_PARTIAL, F_SELF = 1, 2, 4, 8, 16
MAX_TAGS = 8
HEADER = struct.Struct("=BBBxIQQHxxI")  # version .. origin_workload: 32 bytes
SIZE = HEADER.size + 64 + 256 + 64 + MAX_TAGS * (64 + 128)  # 1952


def _cstr(b):
    return b.split(b"\0", 1)[0].decode("utf-8", "replace")


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _getsockopt(fd, level, name, size):
    buf = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    if _libc.getsockopt(fd, level, name, buf, ctypes.byref(length)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return buf.raw[:length.value]


def origin(sock):
    """Who opened sock's connection, as a dict; None when pktmeta does not
    know (ENOENT) or does not answer here (EOPNOTSUPP, ENOPROTOOPT)."""
    try:
        raw = _getsockopt(sock.fileno(), SOL_PKTMETA, PKTMETA_SO_ORIGIN, SIZE)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EOPNOTSUPP, errno.ENOPROTOOPT):
            return None
        raise
    if len(raw) < SIZE or raw[0] != ORIGIN_VERSION:
        raise OSError(errno.EPROTO, "pktmeta answer of version %d, %d bytes" % (raw[0], len(raw)))
    version, n_tags, pod_tags, flags, conn_id, first_seen_ns, node, workload = HEADER.unpack_from(raw)
    off = HEADER.size
    namespace, pod, uid = (_cstr(raw[off:off + 64]), _cstr(raw[off + 64:off + 320]), _cstr(raw[off + 320:off + 384]))
    off += 384
    tags, claimed = {}, {}
    for i in range(min(n_tags, MAX_TAGS)):
        t = off + i * 192
        (claimed if pod_tags & (1 << i) else tags)[_cstr(raw[t:t + 64])] = _cstr(raw[t + 64:t + 192])
    return {
        "namespace": namespace, "pod": pod, "uid": uid, "tags": tags, "pod_tags": claimed,
        "conn_id": conn_id, "first_seen_ns": first_seen_ns, "remote": bool(flags & F_REMOTE),
        "node": node, "workload": workload, "via_service": bool(flags & F_NAT),
    }


def describe(o):
    if o is None:
        return "unknown"
    who = "node %d workload %d" % (o["node"], o["workload"]) if o["remote"] else "%s/%s" % (o["namespace"], o["pod"])
    tags = " ".join("%s=%s" % kv for kv in sorted(o["tags"].items()))
    claimed = " ".join("%s=%s" % kv for kv in sorted(o["pod_tags"].items()))
    return "%s conn=%d tags: %s pod-claimed: %s" % (who, o["conn_id"], tags, claimed)


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)  # IPv4 clients arrive IPv4-mapped
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.bind(("::", port))
    ls.listen(16)
    while True:
        conn, _ = ls.accept()
        with conn:
            line = describe(origin(conn)) + "\n"
            sys.stdout.write(line)
            sys.stdout.flush()
            conn.sendall(line.encode())


if __name__ == "__main__":
    main()
