"""The master's KV events are the core's (kvpool.kv_events): the same records and ring
serve the master's index and an engine's own pages; the master's modules name them here."""

from kvpool.kv_events import EventHub, EventType, KVEvent, Reason

__all__ = ["EventHub", "EventType", "KVEvent", "Reason"]
