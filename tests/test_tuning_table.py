"""Tests of tactics, problem keys, token buckets, tactic files and lookup (CPU)."""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
from typing import ClassVar

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_moe.tactic import Tactic, register_tactic_family, tactic_from_json
from jax_moe.tuning import (
    FILE_FORMAT,
    SCHEMA_VERSION,
    ProblemKey,
    TableMetadata,
    TacticEntry,
    TacticFileError,
    TacticTable,
    device_identity,
    load_tactic_table,
    lookup_tactic,
    token_bucket,
    token_buckets,
)
from jax_moe.tuning import lookup as lookup_module

DEVICE = "NVIDIA H100 80GB HBM3"


class Raster(enum.Enum):
    ALONG_M = 0
    ALONG_N = 1


@register_tactic_family
@dataclasses.dataclass(frozen=True)
class ExampleGemmTactic(Tactic):
    """A small tactic family for these tests."""

    family: ClassVar[str] = "test_gemm"
    block_m: int
    block_n: int
    stages: int
    swap_ab: bool
    raster: Raster = Raster.ALONG_M

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_m not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_m={self.block_m}; expected 8, 16, 32, 64 or 128")

    def check(self, problem: ProblemKey) -> None:
        if self.block_m == 128 and problem.arch != "sm_90a":
            raise NotImplementedError(f"block_m=128 runs on sm_90a only, not {problem.arch}")
        if problem.hidden % self.block_n:
            raise ValueError(f"hidden={problem.hidden} is not a multiple of block_n={self.block_n}")


def _tactic(block_m=16, block_n=128, stages=4, swap_ab=True, raster=Raster.ALONG_M):
    return ExampleGemmTactic(block_m, block_n, stages, swap_ab, raster)


def _problem(num_tokens=128, op="moe_gemm1", arch="sm_90a", hidden=7168):
    return ProblemKey.for_call(op, arch, hidden, 2048, 256, 32, 8, jnp.bfloat16, num_tokens)


def _metadata(**changes) -> TableMetadata:
    metadata = TableMetadata.create(
        device_name=DEVICE,
        arch="sm_90a",
        distribution="balanced",
        profile_key=jax.random.key(0),
        created="2026-11-27T10:00:00+00:00",
    )
    return dataclasses.replace(metadata, **changes)


def _table(**metadata_changes) -> TacticTable:
    return TacticTable(
        _metadata(**metadata_changes),
        {
            _problem(1): TacticEntry(_tactic(8), 10.5, _tactic(16), 11.0),
            _problem(128): TacticEntry(_tactic(64, swap_ab=False), 20.0),
            _problem(128, op="moe_gemm2"): TacticEntry(
                _tactic(128, raster=Raster.ALONG_N), 30.25, _tactic(64), 31.0
            ),
        },
    )


@pytest.fixture(autouse=True)
def _fresh_lookup_state():
    lookup_module._table_cache.clear()
    lookup_module._logged_misses.clear()
    yield
    lookup_module._table_cache.clear()
    lookup_module._logged_misses.clear()


# Tactics ---------------------------------------------------------------------


def _with_params(**changes) -> dict:
    data = _tactic().to_json()
    return {"family": data["family"], "params": {**data["params"], **changes}}


def test_tactic_str_json_round_trip():
    tactic = _tactic()
    assert str(tactic) == "test_gemm[block_m=16,block_n=128,stages=4,swap_ab=1,raster=ALONG_M]"
    data = tactic.to_json()
    assert data == {
        "family": "test_gemm",
        "params": {
            "block_m": 16,
            "block_n": 128,
            "stages": 4,
            "swap_ab": True,
            "raster": "ALONG_M",
        },
    }
    again = tactic_from_json(json.loads(json.dumps(data)))
    assert again == tactic and hash(again) == hash(tactic)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tactic.block_m = 32


@pytest.mark.parametrize(
    "data,match",
    [
        ({"family": "nope", "params": {}}, "unknown tactic family 'nope'"),
        ({"family": "test_gemm"}, "exactly the keys"),
        ([1, 2], "exactly the keys"),
        ({"family": 3, "params": {}}, "expected a string"),
        ({"family": "test_gemm", "params": []}, "expected an object"),
        ({"family": "test_gemm", "params": {"block_m": 16}}, "missing"),
        (_with_params(split_k=2), "unexpected"),
        (_with_params(block_m="16"), "block_m"),
        (_with_params(block_m=True), "block_m"),
        (_with_params(swap_ab=1), "swap_ab"),
        (_with_params(raster="DIAG"), "raster"),
        (_with_params(block_m=24), "block_m=24"),
    ],
)
def test_tactic_from_json_errors(data, match):
    with pytest.raises(ValueError, match=match):
        tactic_from_json(data)


def test_tactic_construction_checks_types():
    with pytest.raises(TypeError, match="swap_ab"):
        ExampleGemmTactic(16, 128, 4, 1)
    with pytest.raises(TypeError, match="stages"):
        ExampleGemmTactic(16, 128, 4.0, True)


def test_tactic_registration_errors():
    @dataclasses.dataclass
    class NotFrozen(Tactic):
        family: ClassVar[str] = "not_frozen"
        block_m: int

        def check(self, problem):
            pass

    with pytest.raises(TypeError, match="frozen"):
        register_tactic_family(NotFrozen)

    @dataclasses.dataclass(frozen=True)
    class FloatField(Tactic):
        family: ClassVar[str] = "float_field"
        ratio: float

        def check(self, problem):
            pass

    with pytest.raises(TypeError, match="ratio"):
        register_tactic_family(FloatField)

    @dataclasses.dataclass(frozen=True)
    class Duplicate(Tactic):
        family: ClassVar[str] = "test_gemm"
        block_m: int

        def check(self, problem):
            pass

    with pytest.raises(ValueError, match="already registered"):
        register_tactic_family(Duplicate)

    @dataclasses.dataclass(frozen=True)
    class OptionalWithoutDefault(Tactic):
        family: ClassVar[str] = "optional_without_default"
        optional_params: ClassVar[tuple[str, ...]] = ("block_m",)
        block_m: int

        def check(self, problem):
            pass

    with pytest.raises(ValueError, match="optional_params"):
        register_tactic_family(OptionalWithoutDefault)

    @dataclasses.dataclass(frozen=True)
    class BadName(Tactic):
        family: ClassVar[str] = "Bad Name"
        block_m: int

        def check(self, problem):
            pass

    with pytest.raises(ValueError, match="lower-case identifier"):
        register_tactic_family(BadName)
    with pytest.raises(TypeError):
        register_tactic_family(int)


# Problem keys and buckets ----------------------------------------------------


def test_token_buckets():
    buckets = token_buckets()
    assert buckets[0] == 1 and buckets[-1] == 16384 and len(buckets) == 15
    assert token_buckets(8) == (1, 2, 4, 8)
    expected = {0: 1, 1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 100: 128, 128: 128, 129: 256}
    for num_tokens, bucket in expected.items():
        assert token_bucket(num_tokens) == bucket
    assert token_bucket(16384) == 16384
    assert token_bucket(10**6) == 16384
    assert token_bucket(100, max_tokens=64) == 64
    with pytest.raises(ValueError, match="num_tokens=-1"):
        token_bucket(-1)
    with pytest.raises(ValueError, match="max_tokens=100"):
        token_bucket(5, max_tokens=100)
    with pytest.raises(ValueError, match="max_tokens=0"):
        token_buckets(0)
    with pytest.raises(TypeError):
        token_bucket(2.5)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(num_tokens=st.integers(0, 100_000), max_log2=st.integers(0, 16))
def test_token_bucket_properties(num_tokens, max_log2):
    max_tokens = 1 << max_log2
    bucket = token_bucket(num_tokens, max_tokens)
    assert bucket in token_buckets(max_tokens)
    if num_tokens <= max_tokens:
        assert bucket >= num_tokens
        assert bucket == 1 or bucket // 2 < num_tokens
    else:
        assert bucket == max_tokens


def test_problem_key():
    problem = _problem(100)
    assert problem.token_bucket == 128
    assert problem.activation_dtype == "bfloat16"
    assert str(problem) == (
        "moe_gemm1[sm_90a,hidden=7168,intermediate=2048,experts=256,local_experts=32,"
        "top_k=8,bfloat16,bucket=128]"
    )
    assert ProblemKey.from_json(json.loads(json.dumps(problem.to_json()))) == problem
    assert hash(_problem(120)) == hash(problem) and _problem(120) == problem
    assert _problem(129) != problem
    with pytest.raises(dataclasses.FrozenInstanceError):
        problem.hidden = 1


@pytest.mark.parametrize(
    "changes,error,match",
    [
        ({"op": "Moe Gemm"}, ValueError, "op="),
        ({"arch": "hopper"}, ValueError, "arch="),
        ({"activation_dtype": "float"}, ValueError, "activation_dtype='float'"),
        ({"activation_dtype": "bf16"}, TypeError, "bf16"),
        ({"hidden": 0}, ValueError, "hidden=0"),
        ({"hidden": 7168.0}, TypeError, "hidden"),
        ({"top_k": True}, TypeError, "top_k"),
        ({"num_local_experts": 3}, ValueError, "num_local_experts=3"),
        ({"top_k": 300}, ValueError, "top_k=300"),
        ({"token_bucket": 96}, ValueError, "token_bucket=96"),
    ],
)
def test_problem_key_validation(changes, error, match):
    with pytest.raises(error, match=match):
        dataclasses.replace(_problem(), **changes)


def test_problem_key_from_json_errors():
    data = _problem().to_json()
    with pytest.raises(ValueError, match="expected exactly"):
        ProblemKey.from_json({**data, "extra": 1})
    del data["op"]
    with pytest.raises(ValueError, match="expected exactly"):
        ProblemKey.from_json(data)


# Tactic files ----------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    table = _table()
    path = tmp_path / "tactics.json"
    table.save(path)
    loaded = TacticTable.load(path, expect_device=DEVICE, expect_arch="sm_90a")
    assert loaded == table
    assert loaded.metadata.profile_key == (0, 0)
    assert loaded.lookup(_problem(1)) == _tactic(8)
    assert loaded.lookup(_problem(2)) is None
    assert loaded.entries[_problem(1)].runner_up == _tactic(16)
    data = json.loads(path.read_text())
    assert data["format"] == FILE_FORMAT and data["schema_version"] == SCHEMA_VERSION
    problems = [str(ProblemKey.from_json(entry["problem"])) for entry in data["entries"]]
    assert problems == sorted(problems)
    # Overwriting is atomic and leaves no temporary file behind.
    table.with_entries({_problem(2): TacticEntry(_tactic(32), 12.0)}).save(path)
    assert len(TacticTable.load(path)) == 4
    assert os.listdir(tmp_path) == ["tactics.json"]


def test_metadata_versions_and_validation():
    metadata = _metadata()
    assert metadata.dsl_version != "" and metadata.jax_moe_version != ""
    assert TableMetadata.from_json(metadata.to_json()) == metadata
    with pytest.raises(ValueError, match="arch"):
        _metadata(arch="gpu")
    with pytest.raises(ValueError, match="distribution"):
        _metadata(distribution="zipf:1.0")  # Not canonical: 'zipf:1'.
    robust = _metadata(distribution="balanced+spread")  # A robust profile.
    assert TableMetadata.from_json(robust.to_json()) == robust
    for bad in ("balanced+balanced", "balanced+bogus", "balanced + spread"):
        with pytest.raises(ValueError, match="distribution"):
            _metadata(distribution=bad)
    with pytest.raises(ValueError, match="profile_key"):
        _metadata(profile_key=(-1,))


def test_metadata_names_the_dsl_of_the_extensions_kernels(monkeypatch):
    """The extension's kernels are what a tuning run times: its DSL_VERSION wins over
    the installed DSL (a GPU machine may have none); without it, the installed one."""
    import types

    from jax_moe import _ffi

    monkeypatch.setattr(_ffi, "is_available", lambda: True)
    monkeypatch.setattr(_ffi, "extension", lambda: types.SimpleNamespace(DSL_VERSION="9.9.9"))
    assert _metadata().dsl_version == "9.9.9"
    monkeypatch.setattr(_ffi, "is_available", lambda: False)
    monkeypatch.setattr("jax_moe.tuning.tactic_table._package_version", lambda *a: "installed-dsl")
    assert _metadata().dsl_version == "installed-dsl"


def test_entry_validation():
    with pytest.raises(ValueError, match="together"):
        TacticEntry(_tactic(), 1.0, _tactic(32))
    with pytest.raises(ValueError, match="time_us"):
        TacticEntry(_tactic(), 0.0)
    with pytest.raises(ValueError, match="time_us"):
        TacticEntry(_tactic(), float("nan"))
    with pytest.raises(TypeError, match="Tactic"):
        TacticEntry("gemm", 1.0)
    with pytest.raises(ValueError, match="arch"):
        TacticTable(_metadata(), {_problem(arch="sm_100a"): TacticEntry(_tactic(), 1.0)})


def test_merge():
    left = _table()
    faster = TacticEntry(_tactic(32), 5.0)
    slower = TacticEntry(_tactic(32), 50.0)
    new = TacticEntry(_tactic(16), 7.0)
    right = TacticTable(
        _metadata(created="2026-11-28T10:00:00+00:00"),
        {_problem(1): faster, _problem(128): slower, _problem(4): new},
    )
    merged = left.merge(right)
    assert len(merged) == 4
    assert merged.entries[_problem(1)] == faster
    assert merged.entries[_problem(128)] == left.entries[_problem(128)]
    assert merged.entries[_problem(4)] == new
    assert merged.metadata.created == "2026-11-28T10:00:00+00:00"
    assert left.merge(right, on_conflict="keep").entries[_problem(1)] == left.entries[_problem(1)]
    assert left.merge(right, on_conflict="replace").entries[_problem(128)] == slower
    with pytest.raises(ValueError, match="both tactic tables"):
        left.merge(right, on_conflict="error")
    assert left.merge(left, on_conflict="error") == left
    assert left.merge(TacticTable.empty()) is left
    assert TacticTable.empty().merge(left) is left
    with pytest.raises(ValueError, match="device_name"):
        left.merge(_table(device_name="NVIDIA H200"))
    with pytest.raises(ValueError, match="distribution"):
        left.merge(_table(distribution="uniform"))
    with pytest.raises(ValueError, match="profile_key"):
        left.merge(_table(profile_key=(0, 1)))
    with pytest.raises(ValueError, match="on_conflict"):
        left.merge(right, on_conflict="newest")


def test_merge_files(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    _table().save(a)
    TacticTable(_metadata(), {_problem(8): TacticEntry(_tactic(8), 3.0)}).save(b)
    out = tmp_path / "merged.json"
    TacticTable.load(a).merge(TacticTable.load(b)).save(out)
    assert set(TacticTable.load(out)) == set(_table()) | {_problem(8)}


def _good_json() -> dict:
    return _table().to_json()


def _corrupt_cases():
    text = json.dumps(_good_json(), indent=1)
    wrong_schema = {**_good_json(), "schema_version": SCHEMA_VERSION + 1}
    wrong_format = {**_good_json(), "format": "something_else"}
    no_metadata_field = _good_json()
    del no_metadata_field["metadata"]["dsl_version"]
    bad_entry = _good_json()
    del bad_entry["entries"][0]["time_us"]
    unknown_family = _good_json()
    unknown_family["entries"][0]["tactic"]["family"] = "gemm_sm200"
    duplicate = _good_json()
    duplicate["entries"].append(duplicate["entries"][0])
    negative_time = _good_json()
    negative_time["entries"][1]["time_us"] = -3.0
    other_arch_entry = _good_json()
    other_arch_entry["entries"][0]["problem"]["arch"] = "sm_100a"
    bad_tactic_value = _good_json()
    bad_tactic_value["entries"][0]["tactic"]["params"]["block_m"] = 24
    return [
        ("empty", b"", "empty"),
        ("blank", b"  \n", "empty"),
        ("truncated", text[: len(text) // 2].encode(), "truncated"),
        ("truncated_in_string", text[: text.index("NVIDIA") + 3].encode(), "truncated"),
        ("not_utf8", b"\xff\xfe\x00garbage", "not UTF-8"),
        ("not_json", b'{"format": , }', "not valid JSON"),
        ("list", b"[1, 2, 3]", "not a tactic table"),
        ("wrong_format", json.dumps(wrong_format).encode(), "not a tactic table"),
        ("wrong_schema", json.dumps(wrong_schema).encode(), "schema version 2"),
        ("metadata_field", json.dumps(no_metadata_field).encode(), "malformed metadata"),
        ("bad_entry", json.dumps(bad_entry).encode(), "malformed entry 0"),
        ("unknown_family", json.dumps(unknown_family).encode(), "unknown tactic family"),
        ("duplicate", json.dumps(duplicate).encode(), "duplicate entries"),
        ("negative_time", json.dumps(negative_time).encode(), "malformed entry 1"),
        ("other_arch_entry", json.dumps(other_arch_entry).encode(), "sm_100a"),
        ("bad_tactic_value", json.dumps(bad_tactic_value).encode(), "block_m=24"),
    ]


@pytest.mark.parametrize(
    "name,content,match", _corrupt_cases(), ids=[case[0] for case in _corrupt_cases()]
)
def test_corrupt_files(tmp_path, caplog, name, content, match):
    path = tmp_path / f"{name}.json"
    path.write_bytes(content)
    with pytest.raises(TacticFileError, match=match) as raised:
        TacticTable.load(path)
    assert str(path) in str(raised.value)
    with caplog.at_level(logging.WARNING, logger="jax_moe.tuning"):
        fallback = TacticTable.load(path, on_mismatch="fallback")
    assert len(fallback) == 0 and fallback.lookup(_problem()) is None
    assert any(match.split()[0] in record.getMessage() for record in caplog.records)


def test_missing_file(tmp_path):
    with pytest.raises(TacticFileError, match="cannot be read"):
        TacticTable.load(tmp_path / "missing.json")
    assert len(TacticTable.load(tmp_path / "missing.json", on_mismatch="fallback")) == 0


def test_other_device_or_arch(tmp_path, caplog):
    path = tmp_path / "h100.json"
    _table().save(path)
    with pytest.raises(TacticFileError, match="tuned on device 'NVIDIA H100 80GB HBM3'"):
        TacticTable.load(path, expect_device="NVIDIA H200")
    with pytest.raises(TacticFileError, match="tuned for arch 'sm_90a'"):
        TacticTable.load(path, expect_arch="sm_100a")
    with caplog.at_level(logging.WARNING, logger="jax_moe.tuning"):
        fallback = TacticTable.load(path, expect_device="NVIDIA H200", on_mismatch="fallback")
    assert len(fallback) == 0
    assert "falling back" in caplog.text and "NVIDIA H200" in caplog.text
    with pytest.raises(ValueError, match="on_mismatch"):
        TacticTable.load(path, on_mismatch="ignore")


def test_empty_table_cannot_be_saved(tmp_path):
    with pytest.raises(ValueError, match="cannot be saved"):
        TacticTable.empty().save(tmp_path / "x.json")
    assert os.listdir(tmp_path) == []


# Lookup ----------------------------------------------------------------------


def _default(problem: ProblemKey) -> Tactic:
    return _tactic(16 if problem.token_bucket <= 16 else 128, block_n=64, swap_ab=False)


def test_lookup_none_and_table(caplog):
    table = _table()
    assert lookup_tactic(None, _problem(1), _default) == _default(_problem(1))
    assert lookup_tactic(table, _problem(1), _default) == _tactic(8)
    with caplog.at_level(logging.INFO, logger="jax_moe.tuning"):
        for _ in range(3):
            assert lookup_tactic(table, _problem(1000), _default) == _default(_problem(1000))
    misses = [r for r in caplog.records if "no tuned tactic" in r.getMessage()]
    assert len(misses) == 1 and str(_problem(1000)) in misses[0].getMessage()


def test_lookup_path_is_cached_by_mtime(tmp_path, monkeypatch):
    path = tmp_path / "tactics.json"
    _table().save(path)
    calls = []
    original = TacticTable.load

    def counting_load(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(TacticTable, "load", counting_load)
    for _ in range(3):
        assert lookup_tactic(str(path), _problem(1), _default, device_name=DEVICE) == _tactic(8)
        assert lookup_tactic(path, _problem(128), _default, device_name=DEVICE) == _tactic(
            64, swap_ab=False
        )
    assert len(calls) == 1
    # A rewritten file is loaded again.
    _table().with_entries({_problem(1): TacticEntry(_tactic(32), 9.0)}).save(path)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert lookup_tactic(path, _problem(1), _default, device_name=DEVICE) == _tactic(32)
    assert len(calls) == 2
    assert load_tactic_table(path, expect_device=DEVICE, expect_arch="sm_90a") is load_tactic_table(
        path, expect_device=DEVICE, expect_arch="sm_90a"
    )


def test_lookup_mismatch(tmp_path, caplog):
    path = tmp_path / "tactics.json"
    _table().save(path)
    with pytest.raises(TacticFileError, match="NVIDIA H200"):
        lookup_tactic(path, _problem(1), _default, device_name="NVIDIA H200")
    problem_sm100 = _problem(1, arch="sm_100a")
    with pytest.raises(TacticFileError, match="sm_100a"):
        lookup_tactic(_table(), problem_sm100, _default)
    with caplog.at_level(logging.WARNING, logger="jax_moe.tuning"):
        tactic = lookup_tactic(_table(), problem_sm100, _default, on_mismatch="fallback")
        assert tactic == _default(problem_sm100)
        tactic = lookup_tactic(
            path, _problem(1), _default, device_name="NVIDIA H200", on_mismatch="fallback"
        )
        assert tactic == _default(_problem(1))
    assert "tuned for arch 'sm_90a', expected 'sm_100a'" in caplog.text
    assert "tuned on device" in caplog.text and "falling back" in caplog.text


def test_lookup_rejects_invalid_tactics():
    # block_n=96 does not divide hidden=7168+64: the stored tactic is invalid.
    problem = _problem(1, hidden=7232)
    table = TacticTable(_metadata(), {problem: TacticEntry(_tactic(block_n=96), 1.0)})
    with pytest.raises(ValueError, match="tuned tactic .* is invalid"):
        lookup_tactic(table, problem, _default)
    with pytest.raises(ValueError, match="default tactic .* is invalid"):
        lookup_tactic(None, problem, lambda p: _tactic(block_n=96))
    with pytest.raises(TypeError, match="expected a Tactic"):
        lookup_tactic(None, problem, lambda p: "gemm")
    # Unsupported: a stored tactic is a broken table; a default lets the caller fall back.
    unsupported = _problem(1, arch="sm_100a")
    table = TacticTable(
        _metadata(arch="sm_100a"), {unsupported: TacticEntry(_tactic(block_m=128), 1.0)}
    )
    with pytest.raises(ValueError, match="tuned tactic .* is unsupported"):
        lookup_tactic(table, unsupported, _default)
    with pytest.raises(NotImplementedError, match="block_m=128"):
        lookup_tactic(None, unsupported, lambda p: _tactic(block_m=128))
    with pytest.raises(TypeError, match="tactics="):
        lookup_tactic(3, problem, _default)


def test_lookup_at_trace_time(tmp_path):
    path = tmp_path / "tactics.json"
    _table().save(path)
    traced = []

    @jax.jit
    def scaled(x):
        problem = ProblemKey.for_call(
            "moe_gemm1", "sm_90a", 7168, 2048, 256, 32, 8, x.dtype, x.shape[0]
        )
        tactic = lookup_tactic(str(path), problem, _default, device_name=DEVICE)
        traced.append(tactic)
        return x * tactic.block_m

    x = jax.random.normal(jax.random.key(1), (1, 4), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(scaled(x), np.float32), np.asarray(x * 8, np.float32))
    y = jax.random.normal(jax.random.key(2), (100, 4), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(scaled(y), np.float32), np.asarray(y * 64, np.float32))
    scaled(x)  # Cached: no new trace, no new lookup.
    assert traced == [_tactic(8), _tactic(64, swap_ab=False)]


class _FakeDevice:
    def __init__(self, platform, device_kind, compute_capability):
        self.platform = platform
        self.device_kind = device_kind
        self.compute_capability = compute_capability


def test_device_identity():
    assert device_identity(_FakeDevice("gpu", DEVICE, "9.0")) == (DEVICE, "sm_90a")
    assert device_identity(_FakeDevice("gpu", "NVIDIA B200", "10.0")) == ("NVIDIA B200", "sm_100a")
    assert device_identity(_FakeDevice("gpu", "NVIDIA A100", "8.0")) == ("NVIDIA A100", "sm_80")
    with pytest.raises(NotImplementedError, match="not an NVIDIA GPU"):
        device_identity(_FakeDevice("cpu", "cpu", None))
