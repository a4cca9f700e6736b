#!/usr/bin/env python3
"""Plays the original Python programs against our binaries.

The original system (see LEGACY-WIRE facts in PROTOCOL.md) speaks unframed
JSON written by json.dumps. This script behaves byte for byte like its
client, its balancer and its server, and checks what our balancer and
server do with them:

  1. original balancer -> our server: one-byte status probe, documents with
     numero_richiesta on one connection each;
  2. original client -> our balancer: documents concatenated on one
     connection, several per read, one over 4 KiB;
  3. our balancer (--backend-wire legacy) -> original servers, played here.

Usage: legacy_peers.py SERVER_BIN BALANCER_BIN CLIENT_BIN
Prints one line per check and 'N passed, M failed'; exits 1 on failure.
Only loopback addresses are used; every process started is stopped.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

DEADLINE = 20.0  # seconds for anything to happen
RESULTS = []


def check(name, condition, detail=""):
    RESULTS.append(bool(condition))
    print(("ok   " if condition else "FAIL ") + name + ("" if condition else f": {detail}"))


def eventually(predicate):
    """Bounded poll: the original protocol has no acknowledgement to wait on."""
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def start(cmd, cwd):
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, text=True)
    while True:
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{cmd[0]} exited before listening")
        if line.startswith("listening on "):
            host, port = line.split()[2].rstrip(",").rsplit(":", 1)
            # Keep draining stdout so the child never blocks on a full pipe.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, (host, int(port))


def stop(proc):
    proc.kill()
    proc.wait()


def documents():
    return [
        {"titolo": "Città vecchia", "contenuto": "Le case è là, perché sì. " * 3},
        {"titolo": "Lungo", "contenuto": "àèìòù abc " * 600},  # over 4 KiB
        {"titolo": "../fuori", "contenuto": "tentativo di uscire dalla cartella"},
        {"titolo": "Emoji 😀", "contenuto": "astral plane: 😀 and \"quotes\"\n"},
        {"titolo": "Semplice", "contenuto": "aaaa AAAA"},
    ]


def stored_docs(folder):
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".json"):
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    out.append((os.path.relpath(os.path.join(root, name), folder), json.load(f)))
    return out


def as_original_client(addr, docs):
    """The original client: one connection, json.dumps texts back to back."""
    payload = b""
    for doc in docs:
        message = dict(doc)
        message["request_type"] = "file_di_testo"
        payload += json.dumps(message).encode()
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(payload)  # several documents in one send, as a fast client would


def original_probe(addr):
    """The original monitor: connect, send the probe, read exactly one byte."""
    with socket.create_connection(addr, timeout=1) as s:
        s.sendall(json.dumps({"request_type": "richiesta_status"}).encode())
        return s.recv(1)


def original_forward(addr, doc, number):
    """The original balancer forwarding one document: new connection, no reply."""
    message = dict(doc)
    message["request_type"] = "file_di_testo"
    message["numero_richiesta"] = number
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(json.dumps(message).encode())


def scenario_original_balancer(server_bin, work):
    folder = os.path.join(work, "store")
    server, addr = start([server_bin, "--listen", "127.0.0.1:0", "--dir", folder], work)
    try:
        byte = original_probe(addr)
        check("status probe gets exactly one byte 0x00", byte == b"\x00", repr(byte))
        docs = documents()
        for number, doc in enumerate(docs, start=1):
            original_forward(addr, doc, number)
        check("every forwarded document is stored", eventually(lambda: len(stored_docs(folder)) == len(docs)),
              stored_docs(folder))
        stored = {d["numero_richiesta"]: (name, d) for name, d in stored_docs(folder)}
        for number, doc in enumerate(docs, start=1):
            name, got = stored.get(number, ("", {}))
            check(f"document {number} kept its title and content",
                  got.get("titolo") == doc["titolo"] and got.get("contenuto") == doc["contenuto"], got)
            check(f"document {number} stays inside the folder",
                  name.startswith(f"{number}_") and "/" not in name and ".." not in name, name)
        byte = original_probe(addr)
        check("server still answers probes", byte in (b"\x00", b"\x01"), repr(byte))
    finally:
        stop(server)


def scenario_original_client(server_bin, balancer_bin, work):
    folders = [os.path.join(work, f"s{i}") for i in range(2)]
    servers = [start([server_bin, "--listen", "127.0.0.1:0", "--dir", f], work) for f in folders]
    addrs = ",".join(f"{h}:{p}" for _, (h, p) in servers)
    balancer, addr = start([balancer_bin, "--listen", "127.0.0.1:0", "--check-interval", "100ms",
                            "--servers", addrs, "--log-file", os.path.join(work, "lb.log")], work)
    try:
        docs = documents() * 2  # 10 documents, one connection
        as_original_client(addr, docs)
        total = lambda: sum(len(stored_docs(f)) for f in folders)
        check("original client: all 10 documents stored", eventually(lambda: total() == 10), total())
        counts = sorted(len(stored_docs(f)) for f in folders)
        check("original client: round robin spread 5/5", counts == [5, 5], counts)
        contents = sorted(d["contenuto"] for f in folders for _, d in stored_docs(f))
        check("original client: contents intact (escapes decoded, >4 KiB whole)",
              contents == sorted(d["contenuto"] for d in docs))
        with open(os.path.join(work, "lb.log"), encoding="utf-8") as f:
            log = f.read()
        check("balancer logged the documents", log.count("document received from") == 10)
    finally:
        stop(balancer)
        for proc, _ in servers:
            stop(proc)


class OriginalServer:
    """The original storage server: one byte per probe, documents as text."""

    def __init__(self, folder):
        self.folder = folder
        self.probes = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.addr = self.sock.getsockname()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn):
        with conn:
            conn.settimeout(5)
            data = b""
            while True:
                try:
                    message = json.loads(data.decode()) if data else None
                except ValueError:
                    message = None
                if message is not None:
                    break
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            if message is None:
                return
            if message.get("request_type") != "file_di_testo":
                self.probes += 1
                conn.sendall(b"\x00")
                return
            name = f"{message['numero_richiesta']}_{message['titolo']}".replace("/", "_")
            # Write then rename, so a reader never sees a half-written file.
            temp = os.path.join(self.folder, "." + name + ".tmp")
            with open(temp, "w", encoding="utf-8") as f:
                f.write(message["contenuto"])
            os.replace(temp, os.path.join(self.folder, name))

    def close(self):
        self.sock.close()


def scenario_legacy_backends(balancer_bin, client_bin, work):
    folders = [os.path.join(work, f"orig{i}") for i in range(2)]
    for f in folders:
        os.makedirs(f)
    originals = [OriginalServer(f) for f in folders]
    addrs = ",".join(f"{h}:{p}" for h, p in (o.addr for o in originals))
    balancer, addr = start([balancer_bin, "--listen", "127.0.0.1:0", "--check-interval", "100ms",
                            "--backend-wire", "legacy", "--allow-unauthenticated-legacy",
                            "--servers", addrs,
                            "--log-file", os.path.join(work, "lb2.log")], work)
    try:
        paths = []
        for i, doc in enumerate(documents()[:4]):
            path = os.path.join(work, f"doc{i}.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(doc, f, ensure_ascii=False)
            paths.append(path)
        result = subprocess.run([client_bin, "--balancer", f"{addr[0]}:{addr[1]}", "send", *paths],
                                capture_output=True, text=True, timeout=60)
        check("client through a legacy-backend balancer succeeds", result.returncode == 0,
              result.stdout + result.stderr)
        files = lambda: sorted(n for f in folders for n in os.listdir(f) if not n.startswith("."))
        check("original servers received every document", eventually(lambda: len(files()) == 4), files())
        counts = sorted(len([n for n in os.listdir(f) if not n.startswith(".")]) for f in folders)
        check("legacy backends share the documents 2/2", counts == [2, 2], counts)
        texts = sorted(open(os.path.join(f, n), encoding="utf-8").read()
                       for f in folders for n in os.listdir(f) if not n.startswith("."))
        check("original servers got the contents intact", texts == sorted(d["contenuto"] for d in documents()[:4]))
        check("balancer probed the original servers", all(o.probes > 0 for o in originals),
              [o.probes for o in originals])
    finally:
        stop(balancer)
        for o in originals:
            o.close()


def main():
    if len(sys.argv) != 4:
        print(__doc__)
        return 2
    server_bin, balancer_bin, client_bin = sys.argv[1:]
    with tempfile.TemporaryDirectory() as work:
        scenario_original_balancer(server_bin, work)
        scenario_original_client(server_bin, balancer_bin, work)
        scenario_legacy_backends(balancer_bin, client_bin, work)
    failed = RESULTS.count(False)
    print(f"{RESULTS.count(True)} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
