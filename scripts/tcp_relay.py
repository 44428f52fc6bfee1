"""A stand-in for ssh in tests and on hosts without it: moves a byte stream over TCP.

    python3 scripts/tcp_relay.py listen PORT_FILE      accept one connection on a free port
                                                       (written to PORT_FILE), copy it to stdout
    python3 scripts/tcp_relay.py send HOST PORT [--cut-after N]
                                                       copy stdin to HOST:PORT (with --cut-after,
                                                       drop the connection after N bytes, as a
                                                       network failure would)
"""
import os
import socket
import sys

CHUNK = 1 << 20


def listen(port_file):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(srv.getsockname()[1]))
    os.rename(tmp, port_file)
    conn, _ = srv.accept()
    out = sys.stdout.buffer
    while True:
        data = conn.recv(CHUNK)
        if not data:
            break
        out.write(data)
    out.flush()


def send(host, port, cut_after=None):
    conn = socket.create_connection((host, int(port)))
    sent = 0
    inp = sys.stdin.buffer
    while True:
        data = inp.read1(CHUNK) if hasattr(inp, "read1") else inp.read(CHUNK)
        if not data:
            break
        if cut_after is not None and sent + len(data) >= cut_after:
            conn.sendall(data[:cut_after - sent])
            conn.close()
            sys.exit(0)  # the sender's side thinks all is well; the receiver must notice
        conn.sendall(data)
        sent += len(data)
    conn.shutdown(socket.SHUT_WR)
    conn.close()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "listen":
        listen(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "send":
        cut = int(sys.argv[5]) if len(sys.argv) >= 6 and sys.argv[4] == "--cut-after" else None
        send(sys.argv[2], sys.argv[3], cut)
    else:
        sys.exit(__doc__)
