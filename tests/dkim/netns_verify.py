"""Run OpenDKIM's verifier against our own DNS server, inside private namespaces.

`opendkim-testmsg` has no option for a name server: libopendkim asks the resolver of
libc, which reads /etc/resolv.conf and always uses port 53. So this script is started
by the tests as `unshare --net --mount python netns_verify.py WORKDIR`, and inside those
namespaces it:

1. brings up the loopback interface of the new network namespace, which has no other
   interface: nothing sent here can leave the machine, whatever any resolver does;
2. bind-mounts WORKDIR/resolv.conf ("nameserver 127.0.0.1") over /etc/resolv.conf, in
   the private mount namespace only (the machine's file is untouched);
3. starts dnsmasq on 127.0.0.1:53 from WORKDIR/dnsmasq.conf (the same records the
   tests publish on the host), with --no-resolv so it forwards nothing;
4. runs `opendkim-testmsg` on each WORKDIR/*.eml and prints a JSON object
   {file name: [exit status, stderr]}; exit status 0 means every signature verified.
"""

from __future__ import annotations

import fcntl
import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def loopback_up() -> None:
    """`ip link set lo up` without needing iproute2: one ioctl on the interface flags."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))


def wait_for_dns(name: str, timeout: float = 10.0) -> None:
    import dns.exception
    import dns.message
    import dns.query

    deadline = time.monotonic() + timeout
    while True:
        try:
            query = dns.message.make_query(name, "TXT")
            if dns.query.udp(query, "127.0.0.1", port=53, timeout=0.5).answer:
                return
        except (OSError, dns.exception.Timeout):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"dnsmasq did not answer for {name}")
        time.sleep(0.05)


def main(workdir: Path) -> None:
    loopback_up()
    resolv = workdir / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:2\n")
    subprocess.run(["mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)
    log = (workdir / "dnsmasq-netns.log").open("wb")
    dnsmasq = subprocess.Popen(
        [
            "dnsmasq",
            f"--conf-file={workdir / 'dnsmasq.conf'}",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--port=53",
            "--pid-file=",
            "--log-facility=-",
        ],
        stdout=log,
        stderr=log,
    )
    try:
        wait_for_dns((workdir / "probe-name").read_text().strip())
        results: dict[str, tuple[int, str]] = {}
        for message in sorted(workdir.glob("*.eml")):
            with message.open("rb") as stdin:
                done = subprocess.run(
                    ["opendkim-testmsg"], stdin=stdin, capture_output=True, timeout=60
                )
            results[message.name] = (done.returncode, done.stderr.decode(errors="replace"))
        print(json.dumps(results))
    finally:
        dnsmasq.terminate()
        dnsmasq.wait(timeout=10)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
