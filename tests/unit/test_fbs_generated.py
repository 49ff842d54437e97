"""The schema files, the generated code and the verifier's descriptions agree (spec/device-protocol.md, "Wire
schema").

- ``tools/generate_fbs.py --check`` finds flcluster/wire/fbs/ up to date (skipped without flatc).
- spec/fl_job.fbs keeps the original's field order and types for the device tables (a golden copy below, taken
  from MindSpore Federated's later fl_job.fbs / cipher.fbs).
- Every verifier description in flcluster.wire.schema matches its table in the .fbs, slot for slot.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flcluster.wire import schema
from flcluster.wire.verify import Kind, Table

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "spec"
FBS_PACKAGE = ROOT / "flcluster" / "wire" / "fbs"

SCALARS = {"bool": 1, "byte": 1, "ubyte": 1, "int8": 1, "uint8": 1, "int": 4, "uint": 4, "float": 4}


def parse_fbs() -> tuple[dict[str, list[tuple[str, str]]], set[str]]:
    """Return ({table: [(field, type), ...]}, {enum names with a byte underlying type}) from spec/*.fbs."""
    tables: dict[str, list[tuple[str, str]]] = {}
    byte_enums: set[str] = set()
    for path in (SPEC / "cipher.fbs", SPEC / "fl_job.fbs"):
        text = re.sub(r"//[^\n]*", "", path.read_text())
        for name, base in re.findall(r"enum\s+(\w+)\s*:\s*(\w+)", text):
            if SCALARS[base] == 1:
                byte_enums.add(name)
        for name, body in re.findall(r"table\s+(\w+)\s*\{([^}]*)\}", text):
            fields = re.findall(r"(\w+)\s*:\s*([\[\]\w]+)\s*(?:=\s*[\w.]+)?\s*;", body)
            tables[name] = [(f, t) for f, t in fields]
    return tables, byte_enums


# The original's field order for the tables a device touches in /startFLJob, /updateModel and /getModel.
ORIGINAL = {
    "FeatureMap": (
        "weight_fullname:string",
        "data:[float]",
    ),
    "CompressFeatureMap": (
        "weight_fullname:string",
        "compress_data:[int8]",
        "min_val:float",
        "max_val:float",
    ),
    "RequestFLJob": (
        "fl_name:string",
        "fl_id:string",
        "iteration:int",
        "data_size:int",
        "timestamp:string",
        "sign_data:[ubyte]",
        "key_attestation:string",
        "equip_cert:string",
        "equip_ca_cert:string",
        "root_cert:string",
        "download_compress_types:[CompressType]",
        "eval_data_size:int",
    ),
    "ResponseFLJob": (
        "retcode:int",
        "reason:string",
        "iteration:int",
        "is_selected:bool",
        "next_req_time:string",
        "fl_plan_config:FLPlan",
        "feature_map:[FeatureMap]",
        "timestamp:string",
        "upload_compress_type:CompressType",
        "upload_sparse_rate:float",
        "download_compress_type:CompressType",
        "compress_feature_map:[CompressFeatureMap]",
        "unsupervised_eval_flg:string",
    ),
    "FLPlan": (
        "server_mode:string",
        "fl_name:string",
        "iterations:int",
        "epochs:int",
        "early_stop:EarlyStop",
        "mini_batch:int",
        "shuffle:bool",
        "lr:float",
        "aggregation:Aggregation",
        "metrics:[Metrics]",
        "cipher:CipherPublicParams",
    ),
    "RequestUpdateModel": (
        "fl_name:string",
        "fl_id:string",
        "iteration:int",
        "feature_map:[FeatureMap]",
        "timestamp:string",
        "signature:[ubyte]",
        "upload_loss:float",
        "sign:int",
        "index_array:[int]",
        "compress_feature_map:[CompressFeatureMap]",
        "upload_compress_type:CompressType",
        "upload_sparse_rate:float",
        "name_vec:[string]",
        "upload_accuracy:float",
        "unsupervised_eval_items:UnsupervisedEvalItems",
        "signds_bHat:string",
    ),
    "ResponseUpdateModel": (
        "retcode:int",
        "reason:string",
        "feature_map:[FeatureMap]",
        "next_req_time:string",
        "timestamp:string",
    ),
    "RequestGetModel": (
        "fl_name:string",
        "iteration:int",
        "timestamp:string",
        "download_compress_types:[CompressType]",
    ),
    "ResponseGetModel": (
        "retcode:int",
        "reason:string",
        "iteration:int",
        "feature_map:[FeatureMap]",
        "timestamp:string",
        "download_compress_type:CompressType",
        "compress_feature_map:[CompressFeatureMap]",
    ),
    "CipherPublicParams": (
        "encrypt_type:string",
        "pw_params:PWParams",
        "dp_params:DPParams",
        "ds_params:DSParams",
        "laplace_params:float",
    ),
    "PWParams": (
        "t:int",
        "p:[ubyte]",
        "g:int",
        "prime:[ubyte]",
    ),
    "DPParams": (
        "dp_eps:float",
        "dp_delta:float",
        "dp_norm_clip:float",
    ),
    "DSParams": (
        "sign_k:float",
        "sign_eps:float",
        "sign_thr_ratio:float",
        "sign_global_lr:float",
        "sign_dim_out:int",
    ),
}


@pytest.mark.skipif(
    shutil.which("flatc") is None, reason="flatc is not on PATH (apt-get install flatbuffers-compiler)"
)
def test_generated_code_is_up_to_date() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "generate_fbs.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, f"generated code is stale:\n{done.stdout}\n{done.stderr}"


def test_generated_package_names_its_flatc_version_and_namespace() -> None:
    init = (FBS_PACKAGE / "__init__.py").read_text()
    assert re.search(r"flatc version \d+\.\d+\.\d+", init)
    modules = {p.stem for p in FBS_PACKAGE.glob("*.py")} - {"__init__"}
    tables, _ = parse_fbs()
    assert set(tables) <= modules
    for path in FBS_PACKAGE.glob("*.py"):
        assert "mindspore" not in path.read_text(), path
    assert not (ROOT / "mindspore").exists()


def test_schema_keeps_the_original_field_order() -> None:
    tables, _ = parse_fbs()
    for name, golden in ORIGINAL.items():
        ours = tuple(f"{field}:{kind}" for field, kind in tables[name])
        assert ours == golden, name
    text = (SPEC / "fl_job.fbs").read_text()
    assert 'file_identifier "FLJ0";' in text
    assert "namespace flcluster.wire.fbs;" in text
    assert "namespace flcluster.wire.fbs;" in (SPEC / "cipher.fbs").read_text()


def _expected_kind(
    fbs_type: str, tables: dict[str, list[tuple[str, str]]], byte_enums: set[str]
) -> tuple[Kind, int]:
    if fbs_type == "string":
        return Kind.STRING, 0
    if fbs_type == "[string]":
        return Kind.STRING_VECTOR, 0
    if fbs_type.startswith("["):
        inner = fbs_type[1:-1]
        if inner in tables:
            return Kind.TABLE_VECTOR, 0
        return Kind.VECTOR, 1 if inner in byte_enums else SCALARS[inner]
    if fbs_type in tables:
        return Kind.TABLE, 0
    return Kind.SCALAR, 1 if fbs_type in byte_enums else SCALARS[fbs_type]


def _all_descriptions() -> list[Table]:
    seen: dict[str, Table] = {}
    stack = list(schema.TABLES)
    while stack:
        table = stack.pop()
        if table.name not in seen:
            seen[table.name] = table
            stack.extend(f.table for f in table.fields if f.table is not None)
    return list(seen.values())


@pytest.mark.parametrize("table", _all_descriptions(), ids=lambda t: t.name)
def test_verifier_descriptions_match_the_schema_slot_for_slot(table: Table) -> None:
    tables, byte_enums = parse_fbs()
    schema = tables[table.name]
    assert len(table.fields) <= len(schema)
    for field, (name, fbs_type) in zip(table.fields, schema, strict=False):
        assert field.name == name, (table.name, field.name, name)
        if field.kind is Kind.UNREAD:
            continue
        kind, size = _expected_kind(fbs_type, tables, byte_enums)
        assert (field.kind, field.size) == (kind, size), (table.name, name, fbs_type)
        if field.table is not None:
            assert field.table.name == fbs_type.strip("[]"), (table.name, name)
