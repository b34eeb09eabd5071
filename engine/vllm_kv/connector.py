"""``KVPoolConnector``: the class vLLM loads (``kv_connector_module_path`` =
``engine.vllm_kv.connector``). A thin facade: scheduler calls go to ``KVPoolScheduler``,
worker calls to ``KVPoolWorker``; nothing here decides anything."""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorMetadata,
                                                               KVConnectorRole)

from engine.vllm_kv.common import ConnectorConfig, KVPoolMetadata
from engine.vllm_kv.scheduler import KVPoolScheduler
from engine.vllm_kv.worker import KVPoolWorker

log = logging.getLogger("vllm.kvpool." + __name__.rsplit(".", 1)[-1])  # under vLLM's handler


class KVPoolConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        cfg = ConnectorConfig.from_extra(ktc.kv_connector_extra_config, ktc.kv_role)
        self.scheduler: KVPoolScheduler | None = None
        self.worker: KVPoolWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            if ktc.kv_load_failure_policy != "recompute":
                # The pool is a cache: a block it lost or that arrived corrupt is recomputed,
                # never a failed request. vLLM reads the policy after building the connector.
                log.warning("kvpool: kv_load_failure_policy %r -> 'recompute' (a pool failure "
                            "is a recomputation)", ktc.kv_load_failure_policy)
                ktc.kv_load_failure_policy = "recompute"
            self.scheduler = KVPoolScheduler(vllm_config, kv_cache_config, cfg)
        else:
            self.worker = KVPoolWorker(vllm_config, kv_cache_config, cfg, ktc.kv_role)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a pool is a cache: a save that did not happen is a later miss

    def _meta(self) -> KVPoolMetadata:
        meta = self._connector_metadata
        assert isinstance(meta, KVPoolMetadata), type(meta)
        return meta

    # -- worker side ----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker is not None
        self.worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.worker is not None and isinstance(connector_metadata, KVPoolMetadata):
            self.worker.begin_saves(connector_metadata)  # before the forward: reserve

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert self.worker is not None and isinstance(kv_connector_metadata, KVPoolMetadata)
        self.worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        assert self.worker is not None
        self.worker.start_load_kv(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: a request runs only once its blocks are in place

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        assert self.worker is not None
        self.worker.save_kv_layer(layer_name)

    def wait_for_save(self) -> None:
        assert self.worker is not None
        self.worker.wait_for_save(self._meta())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self.worker is not None
        meta = self._connector_metadata
        return self.worker.get_finished(finished_req_ids, isinstance(meta, KVPoolMetadata) and meta.idle)

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self.worker is not None
        return self.worker.get_block_ids_with_load_errors()

    def build_connector_worker_meta(self) -> Any:
        return self.worker.take_stored() if self.worker is not None else None

    # -- scheduler side -------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        assert self.scheduler is not None
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert self.scheduler is not None
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self.scheduler is not None
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        assert self.scheduler is not None
        self.scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Any, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler is not None
        return self.scheduler.request_finished(request, block_ids)

    def take_events(self) -> Iterable[Any]:
        return self.scheduler.take_events() if self.scheduler is not None else ()

    def shutdown(self) -> None:
        for side in (self.scheduler, self.worker):
            if side is not None:
                side.shutdown()
