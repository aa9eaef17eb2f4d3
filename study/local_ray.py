"""A local Ray instance that only this machine can reach.

``ray.init(address="local", _node_ip_address="127.0.0.1")`` is not enough: ``ray.init`` hands a
loopback ``_node_ip_address`` to ``services.resolve_ip_for_localhost``, which swaps it for the
machine's routable address (``services.get_node_ip_address``: the address of the default route), so
the node is announced on that address, and every server then binds to it or to all interfaces:

- the C++ gRPC servers (GCS, the raylet's node manager and object manager, every core worker, the
  driver's included) listen on all interfaces unless the node IP they are given is loopback itself;
- the Python agents bind where the node IP says: the dashboard agent's gRPC server
  (``dashboard/agent.py``), its HTTP server (``dashboard/http_server_agent.py``: the node IP and
  loopback) and Prometheus exporter (``dashboard/modules/reporter/reporter_agent.py``), the runtime
  env agent (``_private/runtime_env/agent/main.py``), the dashboard head's and the autoscaler
  monitor's metrics servers (``dashboard/head.py``, ``autoscaler/_private/monitor.py``): each binds
  to loopback when the node IP ``is_localhost``, otherwise to the node IP or to all interfaces.

So one setting decides them all: a node IP that stays loopback. Ray keeps it loopback where it
treats the machine as a single-node host (Windows and macOS): ``get_node_ip_address`` returns
``get_localhost_ip()`` when ``ray_constants.ENABLE_RAY_CLUSTER`` is false (the
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` environment variable, read once when ``ray`` is imported,
hence set on the module here, only while ``ray.init`` runs). Token authentication is left as Ray
decides (on by default for a new local instance, unless ``RAY_AUTH_MODE`` says otherwise): loopback
binding keeps other machines out, the token keeps out other users of this one.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterator
from typing import Any

import ray
from ray._common.network_utils import get_localhost_ip
from ray._private import ray_constants

# ray.init arguments this module sets itself: another address joins another instance, another node
# IP is announced (and bound) beyond this machine
_OWN_ARGUMENTS = frozenset({"address", "_node_ip_address"})


class NotLoopbackError(RuntimeError):
    """Ray came up announcing a routable node address (a Ray release resolving node IPs differently):
    its servers may listen beyond this machine, so it has been shut down again."""


def is_loopback(host: str) -> bool:
    """``host`` (an address a socket is bound to, or a host name to bind to) reaches this machine only:
    127.0.0.0/8, ::1, "localhost", or an IPv4-mapped loopback (``::ffff:127.0.0.1``: what a dual-stack
    IPv6 socket bound to 127.0.0.1 reports; Python < 3.13 does not call it loopback). Wildcards
    (0.0.0.0, ::) and other host names are not."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # a scoped IPv6 address: fe80::1%eth0
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@contextlib.contextmanager
def _single_node_host() -> Iterator[None]:
    """While inside, Ray resolves a loopback node IP to loopback (as on Windows and macOS) instead of
    to the machine's routable address; Ray's own setting is restored afterwards."""
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def start_local_ray(**init_kwargs: Any) -> None:
    """Start a new local Ray instance (``ray.init(address="local", **init_kwargs)``) whose processes
    (GCS, raylet, object manager, agents, dashboard, driver and workers) listen on loopback only, and
    whose node IP, as workers and Ray Tune trials see it, is loopback.

    ``address`` and ``_node_ip_address`` are this function's to set; a ``dashboard_host`` that is not
    loopback would open the dashboard to the network: each is refused (``ValueError``). Raises
    :class:`NotLoopbackError` (after shutting Ray down) if the instance still announces a routable
    node IP; ``ray.init``'s own errors as they are (a Ray already initialised in this process, ...).
    """
    own = sorted(_OWN_ARGUMENTS & init_kwargs.keys())
    if own:
        raise ValueError(f"start_local_ray sets {', '.join(own)} itself")
    dashboard_host = init_kwargs.get("dashboard_host")
    if dashboard_host is not None and not is_loopback(dashboard_host):
        raise ValueError(f"dashboard_host={dashboard_host} would open the dashboard beyond this machine")
    with _single_node_host():
        ray.init(address="local", _node_ip_address=get_localhost_ip(), **init_kwargs)
    node_ip = ray.util.get_node_ip_address()
    if not is_loopback(node_ip):
        ray.shutdown()
        raise NotLoopbackError(f"the local Ray instance announced node IP {node_ip}, not loopback")
