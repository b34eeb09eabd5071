"""Where a cluster's records live in the coordinator: the one place that spells the keys.

    /kvpool/<cluster>/nodes/<node id>     a daemon's membership (leased; JSON: url, agent, tiers, ttl)
    /kvpool/<cluster>/master/leader       the leading master's URL (the leader's lease)
    /kvpool/<cluster>/master/generation   the count of terms led so far (daemons fence by it)

Block keys never go here, nor NIXL metadata: the master takes that from each daemon over
its RPC (cluster credential) and hands out only what a caller may load (master.regions).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keyspace:
    cluster: str

    @property
    def root(self) -> str:
        return f"/kvpool/{self.cluster}/"

    @property
    def nodes(self) -> str:
        """Prefix of every membership key (what the leader lists and watches)."""
        return f"{self.root}nodes/"

    def node(self, node_id: str) -> str:
        return f"{self.nodes}{node_id}"

    def node_id(self, key: str) -> str:
        """The node id a membership key names."""
        return key[len(self.nodes):] if key.startswith(self.nodes) else key.rsplit("/", 1)[-1]

    @property
    def leader(self) -> str:
        return f"{self.root}master/leader"

    @property
    def generation(self) -> str:
        return f"{self.root}master/generation"
