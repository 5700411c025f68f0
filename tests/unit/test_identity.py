"""The signed identity a replica forwards a request with (bridge/replicas.py)."""

from __future__ import annotations

import pytest

from bridge.replicas import BadIdentity, sign_identity, verify_identity

SECRET = "cluster-secret"


def test_a_signed_identity_verifies_for_its_request_only() -> None:
    value = sign_identity(SECRET, "r1", "AKIA0123456789ABCDEF", "post", "/kernel/x?a=1", now=1000)
    who = verify_identity(SECRET, value, "POST", "/kernel/x?a=1", now=1010)
    assert (who.replica, who.access_key) == ("r1", "AKIA0123456789ABCDEF")
    for method, uri in (("GET", "/kernel/x?a=1"), ("POST", "/kernel/x?a=2"),
                        ("POST", "/kernel/y?a=1")):
        with pytest.raises(BadIdentity, match="bad signature"):
            verify_identity(SECRET, value, method, uri, now=1010)


@pytest.mark.parametrize("tamper", [
    lambda v: v.replace("AKIA0123456789ABCDEF", "AKIAFFFFFFFFFFFFFFFF"),  # someone else
    lambda v: v.replace(";r1;", ";r2;"),
    lambda v: v.replace("1000.000", "1005.000"),
])
def test_a_changed_field_breaks_the_signature(tamper: object) -> None:
    value = sign_identity(SECRET, "r1", "AKIA0123456789ABCDEF", "GET", "/", now=1000)
    with pytest.raises(BadIdentity):
        verify_identity(SECRET, tamper(value), "GET", "/", now=1000)  # type: ignore[operator]


def test_stale_malformed_and_unclustered_are_refused() -> None:
    value = sign_identity(SECRET, "r1", "AK", "GET", "/", now=1000)
    with pytest.raises(BadIdentity, match="too old"):
        verify_identity(SECRET, value, "GET", "/", now=1000 + 61)
    with pytest.raises(BadIdentity, match="bad signature"):
        verify_identity("another-secret", value, "GET", "/", now=1000)
    for bad in ("", "v1;r1;AK", "v0;r1;AK;1000;00", "v1;r1;AK;soon;00"):
        with pytest.raises(BadIdentity, match="malformed"):
            verify_identity(SECRET, bad, "GET", "/", now=1000)
    with pytest.raises(BadIdentity, match="not part of a cluster"):
        verify_identity(None, value, "GET", "/", now=1000)


def test_a_replica_never_advertises_a_wildcard_address() -> None:
    from typing import Any, cast

    from bridge.errors import StartupRefused
    from bridge.replicas import Replicas

    store = cast(Any, None)  # listening() reads no table
    replica = Replicas(store, None, replica_id="r1")
    with pytest.raises(StartupRefused, match="KB_ADVERTISE_URL"):
        replica.listening("http://0.0.0.0:8002")
    replica.listening("http://10.0.0.7:8002")
    assert replica.advertise_url == "http://10.0.0.7:8002"
    told = Replicas(store, "http://kb-0.kb:8002", replica_id="r2")
    told.listening("http://0.0.0.0:8002")  # the operator's URL stands
    assert told.advertise_url == "http://kb-0.kb:8002"
    alone = Replicas(store, None)  # no shared store: nobody forwards here
    alone.listening("http://0.0.0.0:8002")
