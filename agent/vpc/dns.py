"""How a name resolves inside the VPC, computed from fetched facts (no DNS traffic).

The check usually runs on a laptop, outside the VPC, so it cannot ask the VPC's resolver; it
answers as the Route 53 Resolver (the VPC's ``.2`` address) would, from what AWS describes:

- **Private hosted zones associated with the VPC.** The most specific zone whose name is a
  suffix of the query answers it: the exact record, else the nearest wildcard (``*.b.zone``,
  then ``*.zone``). If that zone holds no match the answer is NXDOMAIN: the Resolver does not
  fall back to public DNS for a name inside a private zone's namespace.
- **Interface endpoints with private DNS enabled.** The service's private DNS names
  (``cp.vendor.example`` or ``*.vendor.example``) answer with the endpoint's addresses, as the
  private zone AWS manages for the endpoint does.
- **CNAME and alias records** are followed, at most :data:`MAX_CHAIN` steps.
- **An endpoint's own names** (``DnsEntries``, answered by public DNS with private addresses)
  resolve to the addresses of the endpoint's network interfaces.

Any other name is answered by public DNS, which the check does not see: :attr:`Source.PUBLIC`.
Private hosted zones and endpoints' private DNS answer only in a VPC with both DNS resolution
and DNS hostnames enabled (AWS's requirement); in any other VPC every name goes to public DNS.
Not modelled: Resolver forwarding rules, DNS Firewall, zones shared from other accounts.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from agent.vpc.model import Endpoint, EndpointService, HostedZone, NetworkInterface, Record

MAX_CHAIN: Final = 8
ADDRESS_TYPES: Final = frozenset({"A", "AAAA"})


class Source(enum.StrEnum):
    PRIVATE = "private"
    """Answered with addresses inside the VPC's private DNS (a zone or an endpoint's names)."""
    PUBLIC = "public"
    """Not in the VPC's private DNS: public DNS answers, with addresses the check cannot see."""
    NXDOMAIN = "nxdomain"
    """Inside a private zone's namespace, but the zone has no record for it."""
    LOOP = "loop"
    """A CNAME chain longer than :data:`MAX_CHAIN` (or a cycle)."""


@dataclass(frozen=True, kw_only=True)
class Answer:
    name: str
    source: Source
    addresses: tuple[str, ...] = ()
    chain: tuple[str, ...] = ()
    """Every name followed, the query first, each with where its answer came from."""
    note: str = ""

    def describe(self) -> str:
        steps = " -> ".join(self.chain)
        if self.source is Source.PRIVATE:
            return f"{steps} -> {', '.join(self.addresses)}"
        if self.source is Source.PUBLIC:
            why = self.note or "not in the VPC's private DNS"
            return f"{steps} -> (public DNS: {why})"
        if self.source is Source.NXDOMAIN:
            return f"{steps} -> NXDOMAIN"
        return f"{steps} -> (CNAME chain longer than {MAX_CHAIN})"


def normalize(name: str) -> str:
    r"""Lower case, no trailing dot, Route 53's ``\052`` escape read as ``*``."""
    return name.strip().lower().rstrip(".").replace("\\052", "*")


def _within(name: str, zone: str) -> bool:
    return name == zone or name.endswith("." + zone)


@dataclass(frozen=True)
class _Zone:
    name: str
    label: str
    """How the answer is described: ``private zone Z123 (vendor.example)``."""
    records: dict[str, list[Record]] = field(default_factory=dict)

    def lookup(self, name: str) -> list[Record]:
        exact = self.records.get(name)
        if exact:
            return exact
        labels = name.split(".")
        for start in range(1, len(labels)):
            parent = ".".join(labels[start:])
            if not _within(parent, self.name):
                break
            wildcard = self.records.get("*." + parent)
            if wildcard:
                return wildcard
        return []


class VpcResolver:
    """Answers names as the VPC's resolver would. Built once per check from the facts."""

    def __init__(
        self,
        *,
        zones: Iterable[HostedZone],
        endpoints: Iterable[Endpoint],
        services: Iterable[EndpointService],
        interfaces: Iterable[NetworkInterface],
        private_dns: bool = True,
    ) -> None:
        """``private_dns``: the VPC has DNS resolution and DNS hostnames enabled."""
        addresses_of = {eni.id: eni.addresses for eni in interfaces}
        private_names = {service.name: service.private_dns_names for service in services}
        self._zones: list[_Zone] = []
        self._note = "" if private_dns else "private zones need DNS resolution and hostnames on"
        self._endpoint_names: dict[str, tuple[str, tuple[str, ...]]] = {}
        for zone in zones:
            hosted = _Zone(normalize(zone.name), f"zone {normalize(zone.name)}")
            for record in zone.records:
                hosted.records.setdefault(normalize(record.name), []).append(record)
            self._zones.append(hosted)
        for endpoint in endpoints:
            addresses = tuple(
                address
                for eni_id in endpoint.network_interface_ids
                for address in addresses_of.get(eni_id, ())
            )
            for dns_name in endpoint.dns_names:
                self._endpoint_names[normalize(dns_name)] = (endpoint.id, addresses)
            if endpoint.private_dns_enabled:
                for private_name in private_names.get(endpoint.service_name, ()):
                    name = normalize(private_name)
                    zone_name = name.removeprefix("*.")
                    record = Record(name=name, type="A", values=addresses)
                    self._zones.append(
                        _Zone(zone_name, f"private DNS of {endpoint.id}", {name: [record]})
                    )

    def _zone_for(self, name: str) -> _Zone | None:
        if self._note:  # private DNS is off in this VPC
            return None
        matching = [zone for zone in self._zones if _within(name, zone.name)]
        return max(matching, key=lambda zone: len(zone.name), default=None)

    def resolve(self, query: str) -> Answer:
        name = normalize(query)
        chain: list[str] = []
        for _ in range(MAX_CHAIN):
            zone = self._zone_for(name)
            if zone is None:
                endpoint = self._endpoint_names.get(name)
                if endpoint is None:
                    chain.append(name)
                    return Answer(
                        name=query, source=Source.PUBLIC, chain=tuple(chain), note=self._note
                    )
                chain.append(f"{name} ({endpoint[0]})")
                return Answer(
                    name=query, source=Source.PRIVATE, addresses=endpoint[1], chain=tuple(chain)
                )
            chain.append(f"{name} [{zone.label}]")
            records = zone.lookup(name)
            addresses = tuple(
                value
                for record in records
                if record.type in ADDRESS_TYPES and record.alias_target is None
                for value in record.values
            )
            if addresses:
                return Answer(
                    name=query, source=Source.PRIVATE, addresses=addresses, chain=tuple(chain)
                )
            target = _next_name(records)
            if target is None:
                return Answer(name=query, source=Source.NXDOMAIN, chain=tuple(chain))
            name = normalize(target)
        return Answer(name=query, source=Source.LOOP, chain=tuple(chain))

    def names_leading_to(self, endpoint: Endpoint) -> list[str]:
        """Record names in the VPC's private DNS that answer with this endpoint (a CNAME or alias
        to one of its names, or its private DNS names), wildcards included, sorted."""
        own = {normalize(name) for name in endpoint.dns_names}
        found: set[str] = set()
        for zone in self._zones:
            if zone.label == f"private DNS of {endpoint.id}":
                found.update(zone.records)
                continue
            for name, records in zone.records.items():
                target = _next_name(records)
                if target is not None and normalize(target) in own:
                    found.add(name)
        return sorted(found)


def _next_name(records: Sequence[Record]) -> str | None:
    for record in records:
        if record.alias_target:
            return record.alias_target
        if record.type == "CNAME" and record.values:
            return record.values[0]
    return None


def probe_name(record_name: str) -> str:
    """A concrete name a wildcard record answers (``*.zone`` -> ``byoc-check.zone``)."""
    name = normalize(record_name)
    return "byoc-check." + name[2:] if name.startswith("*.") else name
