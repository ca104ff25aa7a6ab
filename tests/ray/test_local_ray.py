"""The local Ray that reb starts is reachable from this machine only."""

import socket

import pytest
import ray


def external_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
        return True
    except OSError:
        return False


def test_a_local_ray_listens_on_the_loopback_interface_only(local_ray):
    external = external_address()
    if external is None:
        pytest.skip("this machine has no interface but loopback")
    node = next(n for n in ray.nodes() if n["Alive"])
    assert node["NodeManagerAddress"] == "127.0.0.1"
    gcs_port = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
    for port in (gcs_port, node["NodeManagerPort"], node["ObjectManagerPort"]):
        assert accepts("127.0.0.1", port), port
        # by default Ray listens on every interface: anyone who can reach this machine could talk to it
        assert not accepts(external, port), f"port {port} answers on {external}"
