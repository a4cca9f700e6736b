#!/usr/bin/env python3
"""Delays packets by a fixed time, for kernels without `tc netem`.

Packets sent to NFQUEUE queue 0 (iptables -j NFQUEUE --queue-num 0) are
held for DELAY_MS milliseconds and then let through, in arrival order.
Speaks nfnetlink_queue directly over a netlink socket, so it needs nothing
but Python. Runs in the network namespace it is started in (one per host in
scripts/netns-faults.sh), until it is killed.

Usage: nfq-delay.py DELAY_MS
"""

import collections
import select
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
SO_RCVBUFFORCE = 33
QUEUE = 0


def attr(kind, payload):
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def message(msg_type, payload, seq, flags=NLM_F_REQUEST):
    # nfgenmsg: family, version 0, queue number (big-endian)
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(QUEUE)) + payload
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg_type
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def packet_ids(data):
    """The ids of the queued packets in one netlink datagram."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, offset + 16)
            if code != 0:
                raise OSError(-code, "netlink error from nfnetlink_queue")
        elif kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            pos, end = offset + 20, offset + length
            while pos + 4 <= end:
                alen, akind = struct.unpack_from("=HH", data, pos)
                if alen < 4:
                    break
                if akind & 0x7FFF == NFQA_PACKET_HDR:
                    yield struct.unpack_from(">I", data, pos + 4)[0]
                pos += (alen + 3) & ~3
        offset += (length + 3) & ~3


def main():
    delay = float(sys.argv[1]) / 1000.0
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    config = [
        attr(NFQA_CFG_CMD, struct.pack("=BBH", NFQNL_CFG_CMD_BIND, 0, socket.htons(socket.AF_INET))),
        attr(NFQA_CFG_PARAMS, struct.pack(">IB", 0, NFQNL_COPY_META)),
        attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", 1 << 16)),
    ]
    for seq, a in enumerate(config, 1):
        sock.send(message(NFQNL_MSG_CONFIG, a, seq, NLM_F_REQUEST | NLM_F_ACK))
        list(packet_ids(sock.recv(65536)))  # raises on a refused setting
    print(f"delaying queue {QUEUE} by {delay * 1000:.0f} ms", flush=True)

    held = collections.deque()  # (due, packet id), in arrival order
    seq = 100
    while True:
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else None
        ready, _, _ = select.select([sock], [], [], timeout)
        if ready:
            try:
                data = sock.recv(1 << 20)
            except OSError:
                # ENOBUFS: the kernel dropped notices; those packets are lost,
                # as on a congested link.
                data = b""
            due = time.monotonic() + delay
            held.extend((due, pid) for pid in packet_ids(data))
        now = time.monotonic()
        verdicts = []
        while held and held[0][0] <= now:
            _, pid = held.popleft()
            seq += 1
            verdicts.append(
                message(NFQNL_MSG_VERDICT, attr(NFQA_VERDICT_HDR, struct.pack(">II", NF_ACCEPT, pid)), seq)
            )
        if verdicts:
            sock.send(b"".join(verdicts))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
