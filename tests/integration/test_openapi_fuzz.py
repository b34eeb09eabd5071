"""schemathesis against a live pool (`kvpool up` as a process) with the master's own
/openapi.json: generated requests for every operation, valid and not, meet no server
error and no response outside the document's schemas (errors included)."""

from __future__ import annotations

import secrets
from typing import Iterator

import pytest

from kvpool.launcher import spawn, stop

schemathesis = pytest.importorskip("schemathesis")  # the `test` extra installs it
from hypothesis import HealthCheck, settings  # noqa: E402  (schemathesis brings hypothesis)

ADMIN = secrets.token_hex(16)
ENV = {"KVPOOL_DAEMON_HOST_BYTES": "8MiB", "KVPOOL_DAEMON_SSD_BYTES": "16MiB",
       "KVPOOL_DAEMON_OBJECT_BYTES": "0", "KVPOOL_MASTER_SWEEP_INTERVAL_S": "0.2",
       # credentials on, so the document's security requirements are checked too
       "KVPOOL_MASTER_CLUSTER_TOKEN": secrets.token_hex(16), "KVPOOL_MASTER_ADMIN_TOKEN": ADMIN,
       "KVPOOL_MASTER_VIEWER_TOKEN": secrets.token_hex(16),
       "KVPOOL_MASTER_CLIENT_TOKENS": secrets.token_hex(16)}


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("fuzz")
    proc, info = spawn("kvpool", ["up", "--port", "0", "--data-dir", str(tmp / "data")], ENV,
                       tmp / "up.log")
    try:
        yield info["master"]
    finally:
        stop(proc)


def test_the_admin_api_keeps_to_its_schema(master: str) -> None:
    """Each operation in turn (hypothesis drives schemathesis's strategies directly: its
    pytest plugin does not follow pytest 9 yet)."""
    from hypothesis import given

    auth = {"Authorization": f"Bearer {ADMIN}"}
    api = schemathesis.openapi.from_url(f"{master}/openapi.json", headers=auth)
    checked = []
    for result in api.get_all_operations():
        op = result.ok()
        if op.path == "/v1/events":  # streams until the client leaves: the event tests check it
            continue

        @given(case=op.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def run(case) -> None:  # type: ignore[no-untyped-def]
            case.call_and_validate(headers=auth, timeout=10)

        run()
        checked.append(f"{op.method.upper()} {op.path}")
    assert len(checked) >= 15, checked
