"""Daemon configuration helpers: listen address or interface, peer resolution."""

from __future__ import annotations

import pytest

from p2pcast.daemon import listen_address, resolve_peers
from p2pcast.errors import ConfigError
from p2pcast.node import Peer


def test_listen_takes_an_address_or_an_interface() -> None:
    assert listen_address("198.18.0.7") == "198.18.0.7"
    assert listen_address("::1") == "::1"
    assert listen_address("lo") == "127.0.0.1"
    with pytest.raises(ConfigError, match="neither an IP address nor a network interface"):
        listen_address("nosuch0")


def test_peers_resolve_from_map_literal_or_dns() -> None:
    peers = resolve_peers(
        ["n1", "n2", "127.0.0.9", "localhost"], 7086, {"n1": "198.18.1.1", "n2": "198.18.1.2:9000"}
    )
    assert peers == [
        Peer("n1", "198.18.1.1", 7086),
        Peer("n2", "198.18.1.2", 9000),
        Peer("127.0.0.9", "127.0.0.9", 7086),
        Peer("localhost", "127.0.0.1", 7086),
    ]
    with pytest.raises(ConfigError, match=r"cannot resolve peer 'no-such-host\.invalid'"):
        resolve_peers(["no-such-host.invalid"], 7086)
