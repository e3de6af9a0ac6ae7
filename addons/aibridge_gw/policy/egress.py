"""Where proxied traffic to non-AI hosts may go: never to the gateway's own machine or the cloud metadata service.

A proxy that relays to loopback, link-local or its own addresses exposes every service behind it
(`curl -x http://gw:8080 http://127.0.0.1:5432/`, `http://169.254.169.254/`). Targets are checked by the
addresses they resolve to, and the connection is pinned to the address that was checked, so a DNS answer
that changes between the check and the connect (rebinding) cannot slip through.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class EgressPolicy:
    def __init__(self, allow: Iterable[str] = (), own_addresses: set[str] | None = None) -> None:
        self.allow_nets = []
        self.allow_hosts = set()
        for a in allow:
            try:
                self.allow_nets.append(ipaddress.ip_network(a, strict=False))
            except ValueError:
                self.allow_hosts.add(a.lower().rstrip("."))
        # Canonical address strings, shared with the gateway: it adds the listener's once the listener is up.
        self.own = own_addresses if own_addresses is not None else set()

    def refused(self, ip: Address) -> str | None:
        """Why an address may not be a relay target (None: it may)."""
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allow_nets):
            return None
        if ip.is_loopback:
            return "a loopback address"
        if ip.is_link_local:
            return "a link-local address (cloud metadata)"
        if ip.is_unspecified or ip.is_multicast:
            return "an unspecified or multicast address"
        if str(ip) in self.own:
            return "the gateway's own address"
        return None

    async def check(self, host: str, port: int) -> tuple[str | None, str | None]:
        """(reason refused or None, the address to connect to). Resolves host names off the event loop."""
        name = host.lower().rstrip(".")
        if name in self.allow_hosts:
            return None, None
        try:
            return self._check_ip(ipaddress.ip_address(name.strip("[]")))
        except ValueError:
            pass
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            return f"cannot resolve {host}: {e}", None
        addrs = []
        for info in infos:
            try:
                addrs.append(ipaddress.ip_address(info[4][0].split("%")[0]))
            except ValueError:
                continue
        if not addrs:
            return f"cannot resolve {host}", None
        for ip in addrs:  # every answer must be acceptable, or an attacker picks the one that is not
            why = self.refused(ip)
            if why:
                return f"{host} resolves to {why}", None
        return None, str(addrs[0])

    def _check_ip(self, ip: Address) -> tuple[str | None, str | None]:
        why = self.refused(ip)
        return (f"{ip} is {why}" if why else None), str(ip)


def local_addresses(listen_host: str) -> set[str]:
    """The addresses this gateway answers on, as canonical strings: the listen address, or every local one for a
    wildcard listener."""
    names = [listen_host] if listen_host and listen_host not in ("0.0.0.0", "::") else []
    if not names:
        try:
            names = [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)]
        except OSError:
            pass
    out = set()
    for name in names:
        try:
            out.add(str(ipaddress.ip_address(name.split("%")[0])))
        except ValueError:
            continue  # a host name listener: its addresses are loopback or found by the wildcard case
    return out
