"""Which hosts a webhook may reach: the public internet only, unless the deployment says so.

A customer's URL must not reach Kana's own network (the database, Redis, the cloud metadata
service at 169.254.169.254), all the more as the deliveries log shows the start of what
answered. Checked twice: when an endpoint is saved (what is private on its face: literal
addresses, ``localhost``) and before every POST (what the name resolves to then). A name
that resolves differently between the check and the connection is not caught here; an
egress proxy (KANA_WEBHOOK_PROXY) that enforces the same rule closes that gap.
"""

import ipaddress
import socket

from django.conf import settings


def is_public(address: str) -> bool:
    """Whether an IP address is on the public internet (not loopback, private, link-local,
    shared or reserved); an IPv4 address mapped into IPv6 counts as itself."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global


def _checked() -> bool:
    # With an egress proxy, the proxy resolves names and its policy decides.
    return not (settings.KANA_WEBHOOK_ALLOW_PRIVATE_ADDRESSES or settings.KANA_WEBHOOK_PROXY)


def private_on_its_face(host: str) -> bool:
    """A host that is a non-public address as written, or ``localhost``."""
    if not _checked():
        return False
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return not is_public(host)
    except ValueError:  # a name: resolved when a delivery is sent
        return False


def refusal(host: str) -> str:
    """Why ``host`` must not be called now (it resolves to a non-public address, or not at
    all); empty when it may be."""
    if not _checked():
        return ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError) as failure:
        return f"cannot resolve {host}: {failure}"
    for address in sorted(addresses):
        if not is_public(address):
            return f"refused: {host} resolves to {address}, which is not a public address"
    return ""
