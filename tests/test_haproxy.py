"""Debian's HAProxy in front of two ``postvault serve`` nodes on one store.

The store is a PostgreSQL database on the throwaway cluster of
``tests/pgcluster.py`` (blobs in the database too), so the two nodes are
two processes over one store, as in production. Both nodes run from one
home folder (one certificate and CA, one config), on ports of their own.

HAProxy runs the configuration of docs/scaling.md ("HAProxy in front"):
this test takes that block from the file, keeps everything from
``defaults`` on, and changes only the addresses (frontends bind free
loopback ports; ``10.0.0.11``/``10.0.0.12`` become the two nodes), the CA
file of the checks, and the ``global`` section (a stats socket here, no
syslog). A second IMAPS frontend, this test's own, sends PROXY v1
(``send-proxy``) instead of v2.

Clients connect from 127.0.0.77 and up, HAProxy reaches the nodes from
127.0.0.1 (the one address the nodes trust): the audit log and the
Received headers must show the clients' addresses, never 127.0.0.1.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import pytest

from postvault.conf.load import load_config
from postvault.home import init_home, open_store
from postvault.store.api import Store
from tests.imapd.conftest import start_server, stop_server
from tests.pgcluster import Cluster
from tests.proxy_clients import AuditView, ProxiedIMAP, ProxiedSMTP, web_login
from tests.support import cheap_home_env, free_port

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery staple"
HOST = "mail.example.test"
MEMBER, READER = "office@dental.test", "front@clinic.test"
# Standard port of each listener, as docs/scaling.md's config names them.
STANDARD = {993: "imaps", 143: "imap", 465: "submissions", 587: "submission", 443: "https"}


def documented_config() -> str:
    """The haproxy.cfg block of docs/scaling.md's "HAProxy in front"."""
    doc = (ROOT / "docs" / "scaling.md").read_text()
    section = doc.split("## HAProxy in front", 1)[1]
    found = re.search(r"```haproxy\n(.*?)```", section, re.DOTALL)
    assert found, "no haproxy block in docs/scaling.md"
    return found[1]


@dataclass
class Setup(AuditView):
    home: Path
    store: Store
    nodes: list[dict[str, int]]
    logs: list[Path]
    front: dict[str, int]
    stats: Path
    haproxy_log: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def stat(self) -> list[dict[str, str]]:
        """HAProxy's ``show stat``, one dict per row."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.stats))
            sock.sendall(b"show stat\n")
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
        lines = out.decode().strip().splitlines()
        names = lines[0].lstrip("# ").split(",")
        return [dict(zip(names, line.split(","))) for line in lines[1:]]


def _haproxy_config(setup_home: Path, nodes: list[dict[str, int]], front: dict[str, int], stats: Path) -> str:
    body = documented_config()
    body = body[body.index("defaults"):]
    body = re.sub(r"bind :(\d+)", lambda m: f"bind 127.0.0.1:{front[STANDARD[int(m[1])]]}", body)
    for node, address in zip(nodes, ("10.0.0.11", "10.0.0.12")):
        def to_node(m: re.Match[str], node: dict[str, int] = node) -> str:
            return f"127.0.0.1:{node[STANDARD[int(m[1])]]}"

        body = re.sub(re.escape(address) + r":(\d+)", to_node, body)
    body = body.replace("/etc/haproxy/postvault-ca.pem", str(setup_home / "certs" / "ca.pem"))
    assert "10.0.0." not in body and "bind :" not in body
    v1 = (f"\nfrontend imaps_v1\n    bind 127.0.0.1:{front['imaps_v1']}\n    default_backend imaps_v1\n"
          f"backend imaps_v1\n    balance roundrobin\n"
          + "".join(f"    server node{n + 1} 127.0.0.1:{node['imaps']} no-send-proxy-v2 send-proxy\n"
                    for n, node in enumerate(nodes)))
    return f"global\n    maxconn 200\n    stats socket {stats} mode 600 level user\n\n{body}{v1}"


def _wait_ready(setup: Setup, proc: subprocess.Popen[str]) -> None:
    """Until HAProxy answers on its stats socket, which it opens after
    binding every frontend (a failed bind ends it). Not by connecting to a
    frontend: HAProxy would relay that empty connection to a node."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("haproxy exited:\n" + setup.haproxy_log.read_text())
        try:
            setup.stat()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("haproxy did not start:\n" + setup.haproxy_log.read_text())


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, pg_cluster: Cluster) -> Iterator[Setup]:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert Path(haproxy).exists(), "HAProxy is missing: apt-get install haproxy (.ci/run does)"
    root = tmp_path_factory.mktemp("haproxy")
    home = root / "home"
    with cheap_home_env():
        init_home(home, HOST, {"store.url": pg_cluster.new_database(), "store.blobs": "database"})
        store = open_store(load_config(home))
    procs: list[subprocess.Popen[str]] = []
    try:
        store.create_account(MEMBER, "member", "Smile Dental", PASSWORD)
        store.create_account(READER, "member", "Family Clinic", PASSWORD)
        nodes, logs = [], []
        for _ in range(2):
            https = free_port()
            proc, ports, log = start_server(home, {
                "POSTVAULT_LISTEN_HTTPS": f"127.0.0.1:{https}",
                "POSTVAULT_PROXY_LISTENERS": "imaps, imap, submissions, submission, https",
                "POSTVAULT_PROXY_TRUSTED": "127.0.0.1",
                # "connection from <address> (imaps)": which node served whom.
                "POSTVAULT_LOG_LEVEL": "debug",
            })
            procs.append(proc)
            nodes.append({**ports, "https": https})
            logs.append(log)
        front = {name: free_port() for name in (*STANDARD.values(), "imaps_v1")}
        stats = root / "stats.sock"
        cfg = root / "haproxy.cfg"
        cfg.write_text(_haproxy_config(home, nodes, front, stats))
        check = subprocess.run([haproxy, "-c", "-f", str(cfg)], check=False, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        haproxy_log = root / "haproxy.log"
        with open(haproxy_log, "w") as out:
            # -db: foreground, no daemon; its own log stays off (no global log).
            proc = subprocess.Popen([haproxy, "-f", str(cfg), "-db"], stdout=out, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        ready = Setup(home, store, nodes, logs, front, stats, haproxy_log, procs)
        _wait_ready(ready, proc)
        yield ready
    finally:
        for proc in reversed(procs):
            stop_server(proc)
        store.close()


def _served(setup: Setup, needle: str) -> list[bool]:
    return [needle in log.read_text() for log in setup.logs]


def test_health_checks_pass_with_local_headers(setup: Setup) -> None:
    """Every server of every backend comes UP with its layer-7 check (TLS and
    greeting, or HTTP 200), through the nodes' PROXY listeners."""
    deadline = time.monotonic() + 60
    while True:
        rows = [r for r in setup.stat() if r["svname"].startswith("node")]
        if rows and all(r["status"] == "UP" and r["check_status"] in ("L7OK", "L4OK") for r in rows):
            break
        assert time.monotonic() < deadline, [(r["pxname"], r["svname"], r["status"], r["check_status"]) for r in rows]
        time.sleep(0.5)
    assert len(rows) == 2 * len(setup.front)
    assert all(r["check_status"] == "L7OK" for r in rows if r["pxname"] != "imaps_v1")


def test_imaps_logins_on_both_nodes_show_the_client(setup: Setup) -> None:
    after = setup.last_id()
    for attempt in range(8):
        with ProxiedIMAP(setup.front["imaps"], b"", setup.context(), source="127.0.0.77") as client:
            client.login(MEMBER, PASSWORD)
            client.select("INBOX")
        if all(_served(setup, "connection from 127.0.0.77 (imaps)")):
            break
    assert all(_served(setup, "connection from 127.0.0.77 (imaps)")), "HAProxy did not use both nodes"
    logins = [e for e in setup.events("login.ok", after) if e["protocol"] == "imap"]
    assert logins and {e["client_ip"] for e in logins} == {"127.0.0.77"}


def test_send_proxy_v1_backend(setup: Setup) -> None:
    after = setup.last_id()
    for _ in range(2):  # roundrobin: one login on each node
        with ProxiedIMAP(setup.front["imaps_v1"], b"", setup.context(), source="127.0.0.78") as client:
            client.login(MEMBER, PASSWORD)
    assert all(_served(setup, "connection from 127.0.0.78 (imaps)"))
    # What HAProxy sent: v1 here (send-proxy), v2 everywhere else (send-proxy-v2).
    assert all(_served(setup, "proxy: imaps: v1 PROXY header from 127.0.0.1 for 127.0.0.78"))
    assert all(_served(setup, "proxy: imaps: v2 PROXY header from 127.0.0.1 for 127.0.0.77"))
    assert all(_served(setup, "proxy: imaps: v2 LOCAL header from 127.0.0.1 for itself"))  # health checks
    assert [e["client_ip"] for e in setup.events("login.ok", after)] == ["127.0.0.78", "127.0.0.78"]


def _message(n: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = MEMBER, READER, f"through haproxy {n}"
    msg.set_content("hello\n")
    return msg


def test_submission_through_haproxy_shows_the_client(setup: Setup) -> None:
    after = setup.last_id()
    # 465: implicit TLS through the balancer.
    client = ProxiedSMTP(setup.front["submissions"], b"", setup.context(), source="127.0.0.79")
    try:
        client.login(MEMBER, PASSWORD)
        client.send_message(_message(1))
        client.quit()
    finally:
        client.close()
    # 587: STARTTLS through the balancer.
    client = ProxiedSMTP(setup.front["submission"], b"", source="127.0.0.80")
    try:
        client.starttls(context=setup.context())
        client.login(MEMBER, PASSWORD)
        client.send_message(_message(2))
        client.quit()
    finally:
        client.close()
    smtp = [e["client_ip"] for e in setup.events("login.ok", after) if e["protocol"] == "smtp"]
    assert smtp == ["127.0.0.79", "127.0.0.80"]
    with ProxiedIMAP(setup.front["imaps"], b"", setup.context(), source="127.0.0.81") as reader:
        reader.login(READER, PASSWORD)
        reader.select("INBOX", readonly=True)
        _, data = reader.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (RECEIVED)])")
    received = " ".join(bytes(part[1]).decode() for part in data if isinstance(part, tuple))
    assert "([127.0.0.79])" in received and "([127.0.0.80])" in received, received
    assert "([127.0.0.1])" not in received, received


def test_web_login_through_haproxy(setup: Setup) -> None:
    # balance source keeps the form's GET and its POST on one node.
    after = setup.last_id()
    assert web_login(setup.front["https"], b"", setup.context(), MEMBER, PASSWORD, source="127.0.0.82") == 303
    web = [e for e in setup.events("login.ok", after) if e["protocol"] == "web"]
    assert [e["client_ip"] for e in web] == ["127.0.0.82"]


def test_nodes_refused_nothing(setup: Setup) -> None:
    """HAProxy's connections, health checks included, all had valid headers
    and none failed (warnings and info lines of postvault.proxy)."""
    for log in setup.logs:
        text = log.read_text()
        assert "WARNING postvault.proxy" not in text and "INFO postvault.proxy: proxy:" not in text, text[-2000:]
