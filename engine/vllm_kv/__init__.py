"""kvpool as a vLLM KV connector (``KVConnectorBase_V1``), split as vLLM's own connectors:
``connector`` is the thin facade vLLM loads, ``scheduler`` decides what to load and save,
``worker`` moves blocks between vLLM's paged cache and the pool, ``common`` holds the
records that pass between them, ``link`` the pool client with its health, ``events`` the
KV events. The package is named ``vllm_kv`` so that it can never shadow ``vllm``.

Load it with ``--kv-transfer-config '{"kv_connector": "KVPoolConnector",
"kv_connector_module_path": "engine.vllm_kv.connector", "kv_role": "kv_both",
"kv_connector_extra_config": {"master_url": "http://127.0.0.1:7700"}}'``.
"""
