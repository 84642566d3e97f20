"""Hosts for the tests: Linux network namespaces on one bridge, made and removed by a test.

Each host is a namespace with its own address on a veth pair whose other end is a port of a
bridge in this (the root) namespace, which holds the bridge's own address: etcd listens there.
Every packet between hosts, and between a host and etcd, crosses its host's link, so cutting
the link (its bridge end down) is a partition, as a pulled cable would be: no reset, no error,
silence. Processes run in a host with ``ip netns exec``.

Needs root and a kernel that lets it make namespaces, veth pairs and bridges; otherwise
:func:`netns_unavailable` says why and the tests skip.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field

# torch's gloo takes the interface to use from here (it would resolve the machine's hostname,
# which a namespace does not have an address for)
HOST_INTERFACE = "eth0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def netns_unavailable() -> str:
    """Why namespace hosts cannot be made here ("" if they can)."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"etp{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"the kernel refused a network namespace: {made.stderr.strip()}"
    try:
        veth = _ip("link", "add", f"{probe}a", "type", "veth", "peer", "name", f"{probe}b",
                   check=False)  # fmt: skip
        if veth.returncode != 0:
            return f"the kernel refused a veth pair: {veth.stderr.strip()}"
        _ip("link", "del", f"{probe}a", check=False)
        bridge = _ip("link", "add", f"{probe}br", "type", "bridge", check=False)
        if bridge.returncode != 0:
            return f"the kernel refused a bridge: {bridge.stderr.strip()}"
        _ip("link", "del", f"{probe}br", check=False)
    finally:
        _ip("netns", "del", probe, check=False)
    return ""


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    link: str  # the bridge's end of its veth pair: down = the host is cut off

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    @property
    def env(self) -> dict[str, str]:
        return {"GLOO_SOCKET_IFNAME": HOST_INTERFACE}


@dataclass
class Hosts:
    """``names`` as hosts on a private /24 (10.213.X.0, X random); the bridge is .1."""

    names: tuple[str, ...]
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    hosts: dict[str, Host] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.subnet = f"10.213.{secrets.randbelow(250) + 1}"
        self.bridge = f"etb{self.tag}"
        self.bridge_address = f"{self.subnet}.1"

    def __enter__(self) -> Hosts:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for index, name in enumerate(self.names):
                self._add(index, name)
        except BaseException:
            self.close()
            raise
        return self

    def _add(self, index: int, name: str) -> None:
        namespace = f"et{self.tag}-{name}"
        outside, inside = f"et{self.tag}h{index}", f"et{self.tag}i{index}"
        address = f"{self.subnet}.{10 + index}"
        _ip("netns", "add", namespace)
        self.hosts[name] = Host(name, namespace, address, outside)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", namespace)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        run = ["netns", "exec", namespace, "ip"]
        _ip(*run, "link", "set", inside, "name", HOST_INTERFACE)
        _ip(*run, "addr", "add", f"{address}/24", "dev", HOST_INTERFACE)
        _ip(*run, "link", "set", HOST_INTERFACE, "up")
        _ip(*run, "link", "set", "lo", "up")

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def cut(self, name: str) -> None:
        """Take ``name``'s link down: it hears nobody, nobody hears it."""
        _ip("link", "set", self.hosts[name].link, "down")

    def mend(self, name: str) -> None:
        _ip("link", "set", self.hosts[name].link, "up")

    def close(self) -> None:
        for host in self.hosts.values():
            _ip("link", "del", host.link, check=False)
            _ip("netns", "del", host.namespace, check=False)
        with contextlib.suppress(subprocess.SubprocessError):
            _ip("link", "del", self.bridge, check=False)

    def __exit__(self, *exc: object) -> None:
        self.close()
