"""The address plan of a plane with real nodes: pure arithmetic, no I/O.

One plane with real nodes owns one private /16, ``10.<200 + slot>.0.0/16``, and a host bridge named after the slot:

- ``.0.0/24`` is the bridge's subnet: the host end is ``.0.1`` (API server relay), node ``i`` is ``.0.<10 + i>``;
- ``.<64 + i>.0/24`` is node ``i``'s pod range (its CNI bridge is ``.<64 + i>.1``), all inside ``.64.0/18``;
- ``.128.0/17`` is the Service range; ``.128.1`` is the ``kubernetes`` Service, ``.128.10`` is ``kube-dns``.

Nothing outside that /16 is ever routed: node namespaces have no default route, and the host gets routes only for
the plane's own pod and Service ranges, through its own bridge.
"""

from __future__ import annotations

import dataclasses
import ipaddress

FIRST_SLOT_OCTET = 200
MAX_SLOTS = 16
MAX_REAL_NODES = 64
BRIDGE_PREFIX = "kpbr"


@dataclasses.dataclass(frozen=True)
class NetPlan:
    """Every address of one plane with real nodes, derived from its slot."""

    slot: int

    def __post_init__(self) -> None:
        if not 0 <= self.slot < MAX_SLOTS:
            raise ValueError(f"slot {self.slot} is outside 0..{MAX_SLOTS - 1}")

    @property
    def _second(self) -> int:
        return FIRST_SLOT_OCTET + self.slot

    @property
    def supernet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.{self._second}.0.0/16")

    @property
    def bridge(self) -> str:
        return f"{BRIDGE_PREFIX}{self.slot}"

    @property
    def node_subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.{self._second}.0.0/24")

    @property
    def host_ip(self) -> str:
        return f"10.{self._second}.0.1"

    def node_ip(self, index: int) -> str:
        _check_index(index)
        return f"10.{self._second}.0.{10 + index}"

    def pod_cidr(self, index: int) -> str:
        _check_index(index)
        return f"10.{self._second}.{64 + index}.0/24"

    def pod_gateway(self, index: int) -> str:
        _check_index(index)
        return f"10.{self._second}.{64 + index}.1"

    @property
    def cluster_cidr(self) -> str:
        """Every pod range of the plane (kube-proxy's ``clusterCIDR``); the node subnet is outside it, so kube-proxy
        masquerades what the host sends to a ClusterIP."""
        return f"10.{self._second}.64.0/18"

    @property
    def service_cidr(self) -> str:
        return f"10.{self._second}.128.0/17"

    @property
    def kubernetes_service_ip(self) -> str:
        return f"10.{self._second}.128.1"

    @property
    def dns_service_ip(self) -> str:
        return f"10.{self._second}.128.10"

    def veth_names(self, index: int) -> tuple[str, str]:
        """(host end, node end) of node ``index``'s veth pair; at most 15 characters each."""
        _check_index(index)
        return f"kp{self.slot}n{index}h", f"kp{self.slot}n{index}n"

    def node_routes(self, index: int, nodes: int) -> list[tuple[str, str]]:
        """(destination, via) routes inside node ``index``: other nodes' pods and the Service range, nothing else."""
        routes = [(self.pod_cidr(other), self.node_ip(other)) for other in range(nodes) if other != index]
        routes.append((self.service_cidr, self.host_ip))
        return routes

    def host_routes(self, nodes: int) -> list[tuple[str, str]]:
        """(destination, via) routes on the host: each node's pods, and Services through node 0's kube-proxy."""
        routes = [(self.pod_cidr(index), self.node_ip(index)) for index in range(nodes)]
        routes.append((self.service_cidr, self.node_ip(0)))
        return routes


def _check_index(index: int) -> None:
    if not 0 <= index < MAX_REAL_NODES:
        raise ValueError(f"real node index {index} is outside 0..{MAX_REAL_NODES - 1}")


def owned_by_plan(address: str, plan: NetPlan) -> bool:
    """Whether ``address`` is inside the plane's own /16 (the only addresses real-node tests may dial)."""
    return ipaddress.ip_address(address) in plan.supernet
