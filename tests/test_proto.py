"""The committed gRPC stubs are exactly what regenerating from proto/etrain.proto gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from elastictrain.rpc import codegen

pytest.importorskip("grpc_tools")


def test_generated_stubs_are_current(tmp_path):
    committed = Path(codegen.__file__).parent
    for fresh in codegen.generate(tmp_path):
        assert fresh.read_bytes() == (committed / fresh.name).read_bytes(), (
            f"{fresh.name} is stale: run `python -m elastictrain.rpc.codegen`"
        )
