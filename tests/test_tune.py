"""The tuner end to end on CPU, with a deterministic cost-model profiler.

`CostModelProfiler` stands in for the GPU: the time of a tactic is a function
of its tile shape and stages and of the rows each local expert receives under
the cell's routing. The GPU profiler itself is checked by `requires_gpu` tests.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app
from conftest import requires_gpu

from jax_moe import _ffi, gpu, models, tune
from jax_moe.kernels import moe_gemm_config
from jax_moe.kernels.moe_gemm_config import is_experimental, searched_by_default
from jax_moe.moe import MoEProblem
from jax_moe.routing_metadata import routing_metadata
from jax_moe.tactic import tactic_from_json
from jax_moe.tuning import TacticTable, shipped
from jax_moe.tuning.evaluate import (
    CellRegret,
    EvaluationConfig,
    EvaluationReport,
    Reproducibility,
    evaluate_table,
    format_report,
    regret_of,
)
from jax_moe.tuning.profiler import (
    GEMM1_OP,
    GEMM2_OP,
    OPS,
    Failure,
    GpuProfiler,
    Measurement,
    Profiler,
    TimingConfig,
    TuneCell,
    after,
    cell_expert_loads,
    cell_inputs,
    estimated_launch_us,
    key_data_of_seed,
)
from jax_moe.tuning.routing_generator import PLANNED_KINDS
from jax_moe.tuning.tuner import (
    CellResult,
    SearchConfig,
    candidates,
    choose_pair,
    choose_robust_pair,
    exported_variants,
    format_summary,
    measure_cell,
    results_from_rows,
    scored_secondary,
    secondary_candidates,
    timing_rows,
    with_choice,
)
from jax_moe.tuning.tuner import _note as tuner_note

DEVICE = "NVIDIA H100 80GB HBM3"
ARCH = "sm_90a"
TINY = models.get_preset("tiny")


class CostModelProfiler(Profiler):
    """Deterministic stand-in for the GPU (see the module docstring).

    `fail`: tactic names that return a Failure; `raise_for`: names whose timing
    raises; `penalty`: name -> time factor.
    """

    device_name = DEVICE
    arch = ARCH

    def __init__(self, fail=(), raise_for=(), penalty=None):
        self.fail = set(fail)
        self.raise_for = set(raise_for)
        self.penalty = dict(penalty or {})
        self.calls = []
        self.prepared = []

    def prepare_cell(self, cell, candidates):
        self.prepared.append((cell, {op: len(t) for op, t in candidates.items()}))

    def time(self, op, tactic, cell):
        self.calls.append((op, tactic, cell))
        name = str(tactic)
        if name in self.fail:
            return Failure("launch failed: too many resources requested")
        if name in self.raise_for:
            raise RuntimeError("compile error: register allocation failed")
        return Measurement(model_time(op, tactic, cell) * self.penalty.get(name, 1.0))


def model_time(op, tactic, cell):
    """Microseconds: waves of CTAs on a toy 8-SM GPU plus the active experts' weight bytes."""
    m = cell.model
    rows_w, depth = (2 * m.intermediate, m.hidden) if op == GEMM1_OP else (m.hidden, m.intermediate)
    loads = cell_expert_loads(cell)
    tiles = sum(-(-load // tactic.block_m) for load in loads)
    ctas = tiles * (rows_w // tactic.block_w)
    waves = -(-ctas // 8)
    per_cta = tactic.block_m * tactic.block_w * depth * 1e-4 / (1 + 0.1 * tactic.stages)
    weight_us = sum(1 for load in loads if load) * rows_w * depth * 2e-4
    return 2.0 + waves * per_cta + weight_us


def _cli(tmp_path, *flags, profiler=None):
    stream = io.StringIO()
    profiler = profiler or CostModelProfiler()
    argv = ["jax_moe.tune", "--model=tiny", f"--out={tmp_path / 'tactics.json'}", *flags]
    outcome = tune.run_cli(argv, profiler=profiler, stream=stream)
    return outcome, stream.getvalue(), profiler


def _pair_time(op_times):
    """The best pair by brute force over both ops' tactics (any two block_m pair up)."""
    g1, g2 = op_times
    return min(a + b for a in g1.values() for b in g2.values())


def test_candidates_are_the_valid_exported_variants():
    cell = TuneCell(models.get_preset("deepseek_v3"), 8, 128, ARCH)
    for op in (GEMM1_OP, GEMM2_OP):
        valid, rejected = candidates(op, cell.problem_key(op), all_variants=True, experimental=True)
        assert valid == exported_variants(op) and not rejected
        # Without `experimental`, the experimental variants are left out (evaluations).
        valid, rejected = candidates(op, cell.problem_key(op), all_variants=True)
        assert [t for t, _ in rejected] == [t for t in exported_variants(op) if is_experimental(t)]
        assert all(why.startswith("experimental") for _, why in rejected)
    odd = models.MoEConfig(name="odd", num_experts=4, top_k=2, hidden=192, intermediate=128)
    key = TuneCell(odd, 1, 4, ARCH).problem_key(GEMM2_OP)
    valid, rejected = candidates(GEMM2_OP, key, all_variants=True)
    assert not valid and len(rejected) == len(exported_variants(GEMM2_OP))
    assert "multiple of 128" in rejected[0][1]
    valid, rejected = candidates(GEMM1_OP, TuneCell(TINY, 1, 4, "sm_80").problem_key(GEMM1_OP))
    assert not valid and "not supported" in rejected[0][1]


def test_default_search_leaves_out_2x2_grids_and_mma_sync_prefill_tiles(tmp_path):
    cell = TuneCell(models.get_preset("deepseek_v3"), 8, 4096, ARCH)
    for op in (GEMM1_OP, GEMM2_OP):
        valid, rejected = candidates(op, cell.problem_key(op), all_variants=False)
        # Unsplit mma.sync tiles of 32+ rows and the experimental variants are left out;
        # every other wgmma tile is searched.
        left_out = [
            t
            for t in exported_variants(op)
            if t.warps_n == 2
            or (t.block_m >= 32 and not t.wgmma and t.split_k == 1)
            or is_experimental(t)
        ]
        assert {t.block_m for t in valid if t.wgmma} == {16, 32, 64, 128}
        assert {t.block_m for t in valid if not t.wgmma} == {16}
        assert left_out and not set(left_out) & set(valid)
        # Those a problem rejects anyway (decode tactics here) say why instead.
        invalid = {t for t, why in rejected if "--all_variants" not in why}
        assert all(t.split_k > 1 or t.stages > 4 or t.bulk or t.stream_k for t in invalid)
        assert {t for t, why in rejected if "--all_variants" in why} == set(left_out) - invalid
        assert all(searched_by_default(t) for t in valid)
    # The CLI times the subset by default and every variant with --all_variants.
    _, _, default = _cli(tmp_path, "--ep=1", "--max_tokens=1")
    _, _, every = _cli(tmp_path, "--ep=1", "--max_tokens=1", "--all_variants")
    timed = {t for _, t, _ in every.calls} - {t for _, t, _ in default.calls}
    assert timed and all(not searched_by_default(t) for t in timed)


def test_evaluation_times_every_variant_for_regret(tmp_path):
    _cli(tmp_path, "--ep=2", "--max_tokens=2")
    table = TacticTable.load(str(tmp_path / "tactics.json"))
    profiler = CostModelProfiler()
    evaluate_table(profiler, table, EvaluationConfig(repeat_tuning=False))
    assert any(not searched_by_default(t) for _, t, _ in profiler.calls)


def _variant(op, block_m, index=0):
    return [t for t in exported_variants(op) if t.block_m == block_m][index]


def test_choose_pair_takes_the_fastest_of_each_op_whatever_their_block_m():
    a16, b16 = _variant(GEMM1_OP, 16), _variant(GEMM1_OP, 16, 1)
    a32, c32 = _variant(GEMM1_OP, 32), _variant(GEMM2_OP, 32)
    c16, c64 = _variant(GEMM2_OP, 16), _variant(GEMM2_OP, 64)
    timings = {
        GEMM1_OP: {a16: Measurement(10.0), b16: Measurement(10.5), a32: Measurement(11.0)},
        GEMM2_OP: {
            c16: Measurement(20.0),
            c32: Measurement(12.0),
            c64: Measurement(1.0),
            _variant(GEMM2_OP, 32, 1): Failure("boom"),
        },
    }
    # GEMM1 is fastest at 16 and GEMM2 at 64: the metadata's row tile is then 64.
    choice = choose_pair(timings, SearchConfig(tie_tolerance=0.0))
    assert choice.tactics == (a16, c64) and choice.block_m == 64
    assert choice.total_us == 11.0
    # Runner-ups: the fastest other measured tactic of the op (the failed one skipped).
    assert choice.gemm1.runner_up == b16 and choice.gemm1.runner_up_time_us == 10.5
    assert choice.gemm2.runner_up == c32 and choice.gemm2.runner_up_time_us == 12.0
    timings[GEMM2_OP][c64] = Measurement(25.0)
    choice = choose_pair(timings, SearchConfig(tie_tolerance=0.0))
    assert choice.tactics == (a16, c32) and choice.block_m == 32
    only_one_op = {GEMM1_OP: {a16: Measurement(1.0)}, GEMM2_OP: {c64: Failure("boom")}}
    assert choose_pair(only_one_op) is None


def test_near_ties_go_to_the_first_variant():
    first, second = _variant(GEMM1_OP, 16), _variant(GEMM1_OP, 16, 1)
    gemm2 = _variant(GEMM2_OP, 16)
    timings = {
        GEMM1_OP: {first: Measurement(10.03), second: Measurement(10.0)},
        GEMM2_OP: {gemm2: Measurement(5.0)},
    }
    assert choose_pair(timings, SearchConfig(tie_tolerance=0.005)).gemm1.tactic == first
    assert choose_pair(timings, SearchConfig(tie_tolerance=0.0)).gemm1.tactic == second
    with pytest.raises(ValueError, match="tie_tolerance"):
        SearchConfig(tie_tolerance=-0.1)


def test_tune_writes_a_table_with_metadata_progress_and_summary(tmp_path):
    outcome, output, profiler = _cli(
        tmp_path,
        "--ep=1,2",
        "--max_tokens=8",
        "--seed=3",
        "--tie_tolerance=0",
        "--distribution=balanced",
    )
    path = tmp_path / "tactics.json"
    assert sorted(os.listdir(tmp_path)) == ["tactics.json"]  # atomic write, no leftovers
    table = TacticTable.load(path, expect_device=DEVICE, expect_arch=ARCH)
    meta = table.metadata
    assert (meta.device_name, meta.arch, meta.distribution) == (DEVICE, ARCH, "balanced")
    assert meta.profile_key == key_data_of_seed(3)
    assert len(outcome.results) == 8 and len(table) == 16  # 2 EP x 4 buckets x 2 ops
    for result in outcome.results:
        cell = result.cell
        assert cell.key_data == key_data_of_seed(3)
        g1 = table.entries[cell.problem_key(GEMM1_OP)]
        g2 = table.entries[cell.problem_key(GEMM2_OP)]
        times = [
            {t: model_time(op, t, cell) for t in exported_variants(op) if searched_by_default(t)}
            for op in (GEMM1_OP, GEMM2_OP)
        ]
        assert math.isclose(g1.time_us + g2.time_us, _pair_time(times))
        assert g1.runner_up is not None and g1.runner_up != g1.tactic
    # Every tactic of the default search was timed once per cell, after prepare_cell.
    searched = [t for t in exported_variants(GEMM1_OP) if searched_by_default(t)]
    assert len(profiler.calls) == 8 * 2 * len(searched)
    assert [p[0] for p in profiler.prepared] == [r.cell for r in outcome.results]
    progress = [line for line in output.splitlines() if line.startswith("[")]
    assert len(progress) == 8 and "8/8" in progress[-1] and "eta" in progress[0]
    assert "block_m" in output and "default_us" in output and "wrote 16 entries" in output
    data = json.loads(path.read_text())
    assert data["format"] == "jax_moe.tactic_table" and len(data["entries"]) == 16


def test_a_tuned_table_is_used_by_select_tactics(tmp_path):
    outcome, _, _ = _cli(tmp_path, "--ep=1,2", "--max_tokens=8")
    path = str(tmp_path / "tactics.json")
    for result in outcome.results:
        cell = result.cell
        problem = MoEProblem(
            num_tokens=cell.num_tokens - (cell.num_tokens > 2),  # same bucket
            hidden=TINY.hidden,
            intermediate=TINY.intermediate,
            top_k=TINY.top_k,
            num_experts=TINY.num_experts,
            num_local_experts=cell.num_local_experts,
            local_expert_offset=0,
            dtype="bfloat16",
        )
        chosen = gpu.select_tactics(problem, path, arch=ARCH, device_name=DEVICE)
        assert chosen == result.choice.tactics


def test_merge_adds_cells_and_rejects_other_inputs(tmp_path):
    path = tmp_path / "tactics.json"
    _cli(tmp_path, "--ep=1", "--max_tokens=4")
    first = TacticTable.load(path)
    outcome, output, _ = _cli(tmp_path, "--ep=2", "--max_tokens=4", "--merge")
    merged = TacticTable.load(path)
    assert len(first) == 6 and len(merged) == len(outcome.table) == 12
    assert set(first.entries) <= set(merged.entries) and "merged into" in output
    with pytest.raises(ValueError, match="cannot --merge.*profile_key"):
        _cli(tmp_path, "--ep=2", "--max_tokens=4", "--merge", "--seed=1")
    _cli(tmp_path, "--ep=2", "--max_tokens=2")  # without --merge: replaced
    assert len(TacticTable.load(path)) == 4
    # Another profile: rejected, with the flag that would match.
    with pytest.raises(ValueError, match="--distribution=balanced/spread\\+busy"):
        _cli(tmp_path, "--ep=1", "--max_tokens=2", "--merge", "--distribution=balanced")


def test_failing_tactics_are_recorded_and_skipped(tmp_path):
    cell = TuneCell(TINY, 1, 8, ARCH)
    best = choose_pair(measure_cell(CostModelProfiler(), cell).timings)
    bad, broken = best.gemm1.tactic, best.gemm2.tactic
    profiler = CostModelProfiler(fail={str(bad)}, raise_for={str(broken)})
    result = measure_cell(profiler, cell)
    failures = {(op, t): message for op, t, message in result.failures()}
    assert failures == {
        (GEMM1_OP, bad): "launch failed: too many resources requested",
        (GEMM2_OP, broken): "RuntimeError: compile error: register allocation failed",
    }
    choice = choose_pair(result.timings)
    assert bad not in choice.tactics and broken not in choice.tactics
    summary = format_summary([CellResult(cell, result.timings, choice=choice)])
    assert summary.splitlines()[-1].split()[-1] == "2"
    outcome, output, _ = _cli(tmp_path, "--max_tokens=8", profiler=profiler)
    assert "tactic failures" in output and len(outcome.table) == 8


class SlowPrepareProfiler(CostModelProfiler):
    """`prepare_cell` takes a known time (as compiling does on a GPU)."""

    def prepare_cell(self, cell, candidates):
        time.sleep(0.02)


def test_cell_time_splits_preparing_from_timing(tmp_path):
    cell = TuneCell(TINY, 2, 8, ARCH)
    plain = measure_cell(SlowPrepareProfiler(), cell)
    assert 0.02 <= plain.prepare_seconds <= plain.seconds
    # A secondary routing prepares its cell again.
    both = measure_cell(SlowPrepareProfiler(), cell, SearchConfig(secondary=("spread",)))
    assert 0.04 <= both.prepare_seconds <= both.seconds
    _, output, _ = _cli(tmp_path, "--ep=2", "--max_tokens=2", profiler=SlowPrepareProfiler())
    line = next(x for x in output.splitlines() if " s in cells: " in x)
    assert line.endswith(" s timing") and "compiling and building inputs" in line


def test_a_secondary_routing_with_an_earlier_plan_is_not_timed_again():
    search = SearchConfig(secondary=("spread", "busy"))
    # Without expert parallelism the busy plan is the spread plan: same inputs, skipped.
    cell = TuneCell(TINY, 1, 8, ARCH)
    assert cell_expert_loads(dataclasses.replace(cell, routing="busy")) == cell_expert_loads(
        dataclasses.replace(cell, routing="spread")
    )
    profiler = CostModelProfiler()
    result = measure_cell(profiler, cell, search)
    assert set(result.secondary) == {"spread"}
    assert result.secondary_skipped == (("busy", "same expert loads as spread"),)
    assert {c.routing for _, _, c in profiler.calls} == {"balanced", "spread"}
    assert "busy skipped: same expert loads as spread" in tuner_note(with_choice(result))
    # With expert parallelism the busiest rank's plan differs from both: timed.
    cell = TuneCell(TINY, 2, 8, ARCH)
    loads = {r: cell_expert_loads(dataclasses.replace(cell, routing=r)) for r in PLANNED_KINDS}
    assert len(set(loads.values())) == 3
    result = measure_cell(CostModelProfiler(), cell, search)
    assert set(result.secondary) == {"spread", "busy"} and result.secondary_skipped == ()
    # One token at EP=2: the busy plan is the balanced one (the primary routing).
    cell = TuneCell(TINY, 2, 1, ARCH)
    result = measure_cell(CostModelProfiler(), cell, search)
    assert dict(result.secondary_skipped).get("busy") == "same expert loads as balanced"
    # Scoring the secondary routings only, the skipped one is scored with the primary
    # timings (its launches); scoring all routings, nothing is added.
    only = dataclasses.replace(search, score_primary=False)
    scored = scored_secondary(result, only)
    assert set(scored) == {"spread", "busy"} and scored["busy"] is result.timings
    assert scored_secondary(result, search) == dict(result.secondary)
    want = choose_robust_pair(result.timings, scored, only)
    assert with_choice(result, only).choice == want
    # A routing skipped as a copy of another secondary routing adds nothing.
    result = measure_cell(CostModelProfiler(), TuneCell(TINY, 1, 8, ARCH), search)
    assert scored_secondary(result, only) == dict(result.secondary)


class NoisyScreenProfiler(CostModelProfiler):
    """`screen` is off by a factor per tactic (a rough first look); `time` is exact."""

    def __init__(self, screen_error, **kwargs):
        super().__init__(**kwargs)
        self.screen_error = screen_error
        self.screened = []

    def screen(self, op, tactic, cell):
        self.screened.append((op, tactic))
        result = self.time(op, tactic, cell)
        self.calls.pop()  # count full timings only in `calls`
        if isinstance(result, Measurement):
            return Measurement(result.time_us * self.screen_error(tactic))
        return result


def test_screening_times_fully_only_the_close_candidates():
    cell = TuneCell(TINY, 1, 64, ARCH)
    full = measure_cell(CostModelProfiler(), cell)
    want = choose_pair(full.timings)
    # Screening errors of up to +-4 % with a 10 % margin: the same pair, fewer full timings.
    rng = np.random.default_rng(0)
    errors = {}

    def error(tactic):
        return errors.setdefault(tactic, 1.0 + rng.uniform(-0.04, 0.04))

    profiler = NoisyScreenProfiler(error)
    result = measure_cell(profiler, cell, SearchConfig(screen=0.1))
    screened = {(op, t) for op, t in profiler.screened}
    fully = {(op, t) for op, t, _ in profiler.calls}
    assert screened == {(op, t) for op in OPS for t in full.timings[op]}
    assert fully < screened
    assert choose_pair(result.timings).tactics == want.tactics
    for op in OPS:
        for tactic, measurement in result.timings[op].items():
            exact = full.timings[op][tactic].time_us
            if (op, tactic) in fully:
                assert measurement.time_us == exact
            else:  # kept from the screen: more than 10 % slower than its block_m's best
                assert measurement.time_us == pytest.approx(exact * errors[tactic])
    # Failures seen while screening stay failures and are not timed again.
    bad = want.gemm1.tactic
    profiler = NoisyScreenProfiler(lambda t: 1.0, fail={str(bad)})
    result = measure_cell(profiler, cell, SearchConfig(screen=0.1))
    assert isinstance(result.timings[GEMM1_OP][bad], Failure)
    assert (GEMM1_OP, bad) not in {(op, t) for op, t, _ in profiler.calls}
    with pytest.raises(ValueError, match="screen"):
        SearchConfig(screen=-0.1)


def test_robust_choice_minimizes_the_worst_normalized_time():
    a16, b16 = _variant(GEMM1_OP, 16), _variant(GEMM1_OP, 16, 1)
    a32, c16, c32 = _variant(GEMM1_OP, 32), _variant(GEMM2_OP, 16), _variant(GEMM2_OP, 32)
    primary = {
        GEMM1_OP: {a16: Measurement(10.0), b16: Measurement(10.2), a32: Measurement(10.4)},
        GEMM2_OP: {c16: Measurement(5.0), c32: Measurement(5.0)},
    }
    # Primary: a16+c16 15.0 (best), b16+c16 15.2, a32+c32 15.4.
    # Secondary: a16+c16 15.0, b16+c16 12.0 (best), a32+c32 12.6.
    other = {
        GEMM1_OP: {a16: Measurement(10.0), b16: Measurement(7.0), a32: Measurement(7.6)},
        GEMM2_OP: {c16: Measurement(5.0), c32: Measurement(5.0)},
    }
    plain = choose_pair(primary, SearchConfig(tie_tolerance=0.0))
    assert plain.tactics == (a16, c16)
    # Worst ratios: a16+c16 max(1, 1.25) = 1.25; b16+c16 max(1.013, 1) = 1.013;
    # a32+c32 max(1.027, 1.05) = 1.05.
    robust = choose_robust_pair(primary, {"spread": other}, SearchConfig(tie_tolerance=0.0))
    assert robust.tactics == (b16, c16) and robust.block_m == 16
    assert robust.gemm1.time_us == 10.2  # primary times are reported
    assert robust.gemm1.runner_up == a16 and robust.gemm1.runner_up_time_us == 10.0
    # Ties: a pair within tie_tolerance of the lowest score that comes first in
    # variant order (GEMM1 first) wins. a16+c16 scores 1.25 unless the secondary makes it 1.02.
    close = {
        GEMM1_OP: {a16: Measurement(8.1), b16: Measurement(7.0), a32: Measurement(7.6)},
        GEMM2_OP: {c16: Measurement(5.0), c32: Measurement(5.0)},
    }
    # Scores: a16+c16 max(1.0, 13.1/12) = 1.0917; b16+c16 1.0133; a32+c32 1.05.
    strict = choose_robust_pair(primary, {"spread": close}, SearchConfig(tie_tolerance=0.0))
    assert strict.tactics == (b16, c16)
    tied = choose_robust_pair(primary, {"spread": close}, SearchConfig(tie_tolerance=0.08))
    assert tied.tactics == (a16, c16)  # within 8 % of 1.0133 and first in order
    # Tactics not timed (or failed) under a secondary routing cannot be chosen.
    other[GEMM1_OP][b16] = Failure("boom")
    again = choose_robust_pair(primary, {"spread": other}, SearchConfig(tie_tolerance=0.0))
    assert again.tactics == (a32, c16) and again.block_m == 32  # any two block_m pair up
    # No pair timed under every routing: the plain choice.
    none = {GEMM1_OP: {}, GEMM2_OP: {}}
    assert choose_robust_pair(primary, {"spread": none}).tactics == plain.tactics
    assert choose_robust_pair(primary, {}).tactics == plain.tactics


def test_robust_choice_can_score_the_secondary_routings_only():
    a16, b16 = _variant(GEMM1_OP, 16), _variant(GEMM1_OP, 16, 1)
    c16 = _variant(GEMM2_OP, 16)
    primary = {
        GEMM1_OP: {a16: Measurement(10.0), b16: Measurement(12.0)},
        GEMM2_OP: {c16: Measurement(5.0)},
    }
    # Spread: a16+c16 13.0, b16+c16 12.5; busy: a16+c16 20.0, b16+c16 19.6.
    spread = {
        GEMM1_OP: {a16: Measurement(8.0), b16: Measurement(7.5)},
        GEMM2_OP: {c16: Measurement(5.0)},
    }
    busy = {
        GEMM1_OP: {a16: Measurement(15.0), b16: Measurement(14.6)},
        GEMM2_OP: {c16: Measurement(5.0)},
    }
    secondary = {"spread": spread, "busy": busy}
    # With the primary: a16 max(1, 1.04, 1.02) = 1.04 beats b16 max(1.133, 1, 1) = 1.133.
    assert choose_robust_pair(primary, secondary).tactics == (a16, c16)
    only = SearchConfig(score_primary=False)
    chosen = choose_robust_pair(primary, secondary, only)
    assert chosen.tactics == (b16, c16)
    assert chosen.gemm1.time_us == 12.0  # primary times are still reported
    # Nothing timed under a secondary routing: the plain choice under the primary.
    assert choose_robust_pair(primary, {}, only).tactics == (a16, c16)
    with pytest.raises(TypeError, match="score_primary"):
        SearchConfig(score_primary=1)


def test_secondary_candidates_keep_the_close_tactics_of_each_op():
    a16, b16 = _variant(GEMM1_OP, 16), _variant(GEMM1_OP, 16, 1)
    a32, a64, a128 = _variant(GEMM1_OP, 32), _variant(GEMM1_OP, 64), _variant(GEMM1_OP, 128)
    c16, c32, c64 = _variant(GEMM2_OP, 16), _variant(GEMM2_OP, 32), _variant(GEMM2_OP, 64)
    timings = {
        GEMM1_OP: {
            a16: Measurement(10.0),
            b16: Measurement(13.0),
            a32: Measurement(11.0),
            a64: Measurement(30.0),
            a128: Measurement(10.5),  # no GEMM2 with block_m=128: still a candidate
        },
        GEMM2_OP: {c16: Measurement(5.0), c32: Measurement(5.0), c64: Failure("x")},
    }
    kept = secondary_candidates(timings, 0.25)
    # Within 25 % of the op's fastest: b16 is 30 % over a16, a64 200 %.
    assert kept == {GEMM1_OP: (a16, a32, a128), GEMM2_OP: (c16, c32)}
    assert secondary_candidates(timings, 0.4)[GEMM1_OP] == (a16, b16, a32, a128)
    assert secondary_candidates({GEMM1_OP: {}, GEMM2_OP: {}}, 0.25) == {
        GEMM1_OP: (),
        GEMM2_OP: (),
    }


def test_measure_cell_times_promising_candidates_again_under_secondary_routings():
    cell = TuneCell(TINY, 1, 16, ARCH)
    profiler = CostModelProfiler()
    search = SearchConfig(secondary=("spread",), secondary_margin=0.1)
    result = measure_cell(profiler, cell, search)
    kept = secondary_candidates(result.timings, 0.1)
    assert set(result.secondary) == {"spread"}
    spread = dataclasses.replace(cell, routing="spread")
    for op in OPS:
        assert tuple(result.secondary["spread"][op]) == kept[op]
        assert {t for o, t, c in profiler.calls if c == spread and o == op} == set(kept[op])
        for tactic, measurement in result.secondary["spread"][op].items():
            assert measurement.time_us == model_time(op, tactic, spread)
    assert (spread, {op: len(kept[op]) for op in OPS}) in profiler.prepared
    assert 0 < sum(len(kept[op]) for op in OPS) < sum(len(result.timings[op]) for op in OPS)
    with pytest.raises(ValueError, match="secondary"):
        SearchConfig(secondary=("spread", "spread"))
    with pytest.raises(ValueError, match="distribution"):
        SearchConfig(secondary=("bogus",))
    with pytest.raises(TypeError, match="secondary"):
        SearchConfig(secondary="spread")
    with pytest.raises(ValueError, match="secondary_margin"):
        SearchConfig(secondary_margin=-1.0)


class SecondaryTroubleProfiler(CostModelProfiler):
    """Fails `bad` tactics only under the `spread` routing."""

    def __init__(self, bad=(), **kwargs):
        super().__init__(**kwargs)
        self.bad = set(bad)

    def time(self, op, tactic, cell):
        if cell.routing == "spread" and (op, tactic) in self.bad:
            self.calls.append((op, tactic, cell))
            return Failure("launch failed under spread")
        return super().time(op, tactic, cell)


def test_secondary_failures_and_infeasible_secondary_routings_are_reported():
    cell = TuneCell(TINY, 1, 16, ARCH)
    search = SearchConfig(secondary=("spread",))
    plain = measure_cell(CostModelProfiler(), cell, search)
    kept = secondary_candidates(plain.timings, search.secondary_margin)
    # One GEMM1 candidate fails under spread only: listed with the routing, not chosen.
    victim = kept[GEMM1_OP][0]
    result = measure_cell(SecondaryTroubleProfiler(bad={(GEMM1_OP, victim)}), cell, search)
    assert (GEMM1_OP, victim, "under spread: launch failed under spread") in result.failures()
    choice = choose_robust_pair(result.timings, result.secondary, search)
    assert result.robust and choice.gemm1.tactic != victim
    # Every GEMM1 candidate fails under spread: the plain choice, said in the note.
    bad = {(GEMM1_OP, t) for t in kept[GEMM1_OP]}
    result = measure_cell(SecondaryTroubleProfiler(bad=bad), cell, search)
    assert not result.robust
    assert choose_robust_pair(result.timings, result.secondary, search) == choose_pair(
        result.timings, search
    )
    result = dataclasses.replace(result, choice=choose_pair(result.timings, search))
    assert "plain choice" in tuner_note(result)
    # A balanced secondary routing whose plan is infeasible is skipped, not fatal.
    narrow = models.MoEConfig(name="narrow", num_experts=8, top_k=4, hidden=256, intermediate=128)
    cell = TuneCell(narrow, 8, 1, ARCH, "spread")
    result = measure_cell(CostModelProfiler(), cell, SearchConfig(secondary=("balanced",)))
    assert result.secondary == {} and result.secondary_skipped[0][0] == "balanced"
    assert "infeasible" in result.secondary_skipped[0][1]
    assert "balanced skipped: infeasible" in tuner_note(result)
    # The busy plan has the balanced plan's total: infeasible in the same cells, skipped.
    result = measure_cell(CostModelProfiler(), dataclasses.replace(cell, routing="busy"))
    assert result.skipped and "infeasible busy plan" in result.skipped
    result = measure_cell(CostModelProfiler(), cell, SearchConfig(secondary=("busy",)))
    assert result.secondary == {} and result.secondary_skipped[0][0] == "busy"


def test_gpu_profiler_shares_compiled_scans_across_routings_of_one_shape(monkeypatch):
    profiler = GpuProfiler.__new__(GpuProfiler)
    profiler._setup(TimingConfig(), DEVICE, ARCH, l2_bytes=50 << 20)
    compiled = []
    monkeypatch.setattr(
        profiler, "_compile", lambda op, tactic, cell: compiled.append((op, tactic, cell)) or op
    )
    tactics = {GEMM1_OP: exported_variants(GEMM1_OP)[:2], GEMM2_OP: ()}
    cell = TuneCell(TINY, 1, 16, ARCH)
    profiler.prepare_cell(cell, tactics)
    assert len(compiled) == 2
    # Same shape, another routing with the same launch plans: nothing compiled again.
    profiler.prepare_cell(dataclasses.replace(cell, routing="spread"), tactics)
    assert len(compiled) == 2
    # Another shape: compiled again.
    profiler.prepare_cell(dataclasses.replace(cell, num_tokens=32), tactics)
    assert len(compiled) == 4


def test_gpu_profiler_prepares_inputs_so_timing_compiles_nothing(monkeypatch):
    # prepare_cell draws the routing and weights, builds the metadata and compiles the
    # activation draws of every launch plan in its threads; building a plan's inputs
    # afterwards (what `time` does) must not compile anything. Runs on the CPU backend
    # (no tactic is compiled). Small L2: several weight copies per launch (cold L2).
    timing = TimingConfig(reps=4, cold_l2=True, max_weight_copies=3)
    profiler = GpuProfiler.__new__(GpuProfiler)
    profiler._setup(timing, DEVICE, ARCH, l2_bytes=1 << 20)
    monkeypatch.setattr(profiler, "_compile", lambda op, tactic, cell: op)
    tactics = {op: exported_variants(op) for op in OPS}
    cell = TuneCell(TINY, 2, 8, ARCH, routing="spread", key_data=key_data_of_seed(3))
    profiler.prepare_cell(cell, tactics)
    plans = {profiler._plan(op, t.block_m, cell) for op in OPS for t in tactics[op]}
    assert len({p.block_m for p in plans}) > 1 and min(p.copies for p in plans) == 3
    compiles = []

    def listener(name, duration, **kwargs):
        if name.endswith("backend_compile_duration"):
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        args = {plan: profiler._concrete_args(plan, cell) for plan in plans}
        assert compiles == []
        # The listener sees a compile when there is one: a shape never prepared.
        jax.block_until_ready(jnp.arange(12345.0) * 3)
        assert compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    inputs = cell_inputs(cell)
    for plan, (xs, meta, weights, slots) in args.items():
        assert len(xs) == len(weights) == plan.copies
        expected = routing_metadata(inputs.topk_ids, num_local_experts=4, block_m=plan.block_m)
        np.testing.assert_array_equal(meta[0], expected.sorted_slots)
        np.testing.assert_array_equal(meta[1], expected.tile_expert)
        np.testing.assert_array_equal(slots, inputs.topk_weights.reshape(-1))
        # Each copy as drawn before the draws were compiled ahead: op by op.
        key = jax.random.fold_in(jax.random.fold_in(cell.key(), 102), plan.block_m)
        shape = (plan.steps, *plan.activation.shape)
        for c, x in enumerate(xs):
            copy_key = jax.random.fold_in(key, c)
            if plan.op == GEMM1_OP and c == 0:  # the cell's own hidden states first
                rest = jax.random.normal(copy_key, (shape[0] - 1, *shape[1:]))
                want = jnp.concatenate([inputs.hidden_states[None], rest.astype(jnp.bfloat16)])
            else:
                want = jax.random.normal(copy_key, shape).astype(jnp.bfloat16)
            assert x.shape == shape and x.dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(want, np.float32))
        assert not np.array_equal(xs[0][-1], xs[1][-1])  # copies differ


def test_evaluating_a_balanced_table_repeats_the_plain_search(tmp_path):
    _cli(tmp_path, "--ep=2", "--max_tokens=2", "--distribution=balanced")
    path = str(tmp_path / "tactics.json")
    evaluated, _, profiler = _cli(tmp_path, f"--evaluate={path}")
    assert {c.routing for _, _, c in profiler.calls} == {"softmax", "skewed", "balanced"}
    assert evaluated.report.reproducibility.same == 2
    with pytest.raises(app.UsageError, match="needs --evaluate"):
        _cli(tmp_path, "--noevaluate_repeat")
    with pytest.raises(app.UsageError, match="needs --evaluate"):
        _cli(tmp_path, f"--evaluate_also={path}")


def test_tune_with_a_robust_profile_records_it_and_evaluation_repeats_it(tmp_path):
    outcome, output, profiler = _cli(tmp_path, "--ep=2", "--max_tokens=8")  # the default
    table = TacticTable.load(str(tmp_path / "tactics.json"))
    assert table.metadata.distribution == "balanced/spread+busy"
    assert {c.routing for _, _, c in profiler.calls} == {"balanced", "spread", "busy"}
    assert ", " in output and " again" in output
    for result in outcome.results:
        want = choose_robust_pair(
            result.timings, result.secondary, SearchConfig(score_primary=False)
        )
        assert result.choice.tactics == want.tactics
    path = str(tmp_path / "tactics.json")
    evaluated, _, profiler = _cli(tmp_path, f"--evaluate={path}")
    routings = {c.routing for _, _, c in profiler.calls}
    assert routings == {"softmax", "skewed", "balanced", "spread", "busy"}
    rep = evaluated.report.reproducibility
    assert rep.same == rep.total == 4
    with pytest.raises(app.UsageError, match="twice"):
        _cli(tmp_path, "--distribution=balanced+balanced")
    plain, _, profiler = _cli(tmp_path, "--ep=2", "--max_tokens=2", "--distribution=balanced")
    assert {c.routing for _, _, c in profiler.calls} == {"balanced"}
    assert plain.table.metadata.distribution == "balanced"
    assert all(not r.secondary for r in plain.results)
    with pytest.raises(ValueError, match="secondary"):
        tune.TuneConfig(
            models=(TINY,), distribution="balanced", search=SearchConfig(secondary=("spread",))
        )
    with pytest.raises(ValueError, match="score_primary"):
        tune.TuneConfig(models=(TINY,), search=SearchConfig(score_primary=False))
    # A profile that also scores its primary routing: recorded, scored with it, and the
    # evaluation's repeated tuning does the same.
    every, _, profiler = _cli(
        tmp_path, "--ep=2", "--max_tokens=8", "--distribution=balanced + spread+busy"
    )
    assert every.table.metadata.distribution == "balanced+spread+busy"
    assert {c.routing for _, _, c in profiler.calls} == {"balanced", "spread", "busy"}
    search = SearchConfig(score_primary=True)
    for result in every.results:
        want = choose_robust_pair(result.timings, result.secondary, search)
        assert result.choice.tactics == want.tactics
    evaluated, _, _ = _cli(tmp_path, f"--evaluate={tmp_path / 'tactics.json'}")
    rep = evaluated.report.reproducibility
    assert rep.same == rep.total == 4


class BalancedOnlyProfiler(CostModelProfiler):
    """`favoured` runs 15 % faster than its twins under the balanced plan and 10 % slower
    under every other routing: fastest only for the primary routing."""

    def __init__(self, favoured, **kwargs):
        super().__init__(**kwargs)
        self.favoured = favoured

    def time(self, op, tactic, cell):
        result = super().time(op, tactic, cell)
        if tactic != self.favoured or not isinstance(result, Measurement):
            return result
        return Measurement(result.time_us * (0.85 if cell.routing == "balanced" else 1.1))


def test_the_profile_decides_whether_the_primary_routing_is_scored(tmp_path):
    # The plain choice's GEMM1 of one cell, favoured by the balanced plan only: scored
    # with the primary routing it wins (worst ratio 1.1 against its twins' 1.18), scored
    # over the spread and busy plans a twin wins; the evaluation's repeated tuning, and
    # --analyze_out with an explicit --distribution, apply the profile's own rule.
    cell = TuneCell(TINY, 2, 8, ARCH)
    favoured = with_choice(measure_cell(CostModelProfiler(), cell)).choice.gemm1.tactic
    key = cell.problem_key(GEMM1_OP)
    timings = tmp_path / "timings.json"
    chosen = {}
    for profile in ("balanced+spread+busy", "balanced/spread+busy"):
        outcome, _, _ = _cli(
            tmp_path,
            "--ep=2",
            "--max_tokens=8",
            f"--distribution={profile}",
            f"--timings_out={timings}",
            profiler=BalancedOnlyProfiler(favoured),
        )
        chosen[profile] = outcome.table.lookup(key)
        evaluated, _, _ = _cli(
            tmp_path,
            f"--evaluate={tmp_path / 'tactics.json'}",
            profiler=BalancedOnlyProfiler(favoured),
        )
        rep = evaluated.report.reproducibility
        assert rep.same == rep.total == 4
    assert chosen["balanced+spread+busy"] == favoured
    assert chosen["balanced/spread+busy"] != favoured
    # The timings of the last (balanced/spread+busy) tune, chosen again.
    again = tmp_path / "again.json"
    for flags, profile in [
        ((), "balanced/spread+busy"),  # the timings' own profile
        (("--distribution=balanced+spread+busy",), "balanced+spread+busy"),
        (("--distribution=balanced/busy+spread",), "balanced/spread+busy"),  # any order
    ]:
        argv = ["jax_moe.tune", f"--analyze={timings}", f"--analyze_out={again}", *flags]
        tune.run_cli(argv, stream=io.StringIO())
        table = TacticTable.load(again)
        assert table.metadata.distribution == profile
        assert table.lookup(key) == chosen[profile]
    with pytest.raises(ValueError, match="other routings"):
        argv = [f"--analyze={timings}", f"--analyze_out={again}", "--distribution=balanced"]
        tune.run_cli(["jax_moe.tune", *argv], stream=io.StringIO())
    with pytest.raises(app.UsageError, match="needs --analyze_out"):
        tune.run_cli(
            ["jax_moe.tune", f"--analyze={timings}", "--distribution=balanced"],
            stream=io.StringIO(),
        )


def test_infeasible_balanced_cells_are_skipped(tmp_path):
    # 8 experts, top_k 4, EP 8: one local expert cannot take 2 slots of 1 token.
    model = models.MoEConfig(name="narrow", num_experts=8, top_k=4, hidden=256, intermediate=128)
    result = measure_cell(CostModelProfiler(), TuneCell(model, 8, 1, ARCH))
    assert result.skipped and "infeasible" in result.skipped and result.choice is None
    assert "infeasible" in format_summary([result])


def test_explicit_shapes_and_usage_errors(tmp_path):
    outcome, _, _ = _cli(
        tmp_path,
        "--model=",
        "--hidden=256",
        "--intermediate=128",
        "--num_experts=4",
        "--top_k=2",
        "--ep=2",
        "--max_tokens=2",
    )
    assert {r.cell.model.name for r in outcome.results} == {"E4k2H256I128"}
    for flags, message in [
        (["--hidden=256"], "need all four"),
        (["--ep=3"], "does not divide"),
        (["--ep=x"], "integers"),
        (["--max_tokens=32768"], "at most 16384"),
        (["--max_tokens=6"], "power of two"),
        (["--distribution=gauss"], "distribution"),
        (["--model=gpt5"], "unknown model preset"),
        (["--timer=cycles"], "timer"),
        (["--min_scan_us=-1"], "min_scan_us"),
    ]:
        with pytest.raises((app.UsageError, ValueError), match=message):
            _cli(tmp_path, *flags)
    outcome, output, _ = _cli(tmp_path, "--model=tiny,qwen3_30b_a3b", "--ep=16", "--max_tokens=1")
    assert "skipping tiny EP=16: 8 experts" in output
    assert [str(r.cell) for r in outcome.results] == ["qwen3_30b_a3b EP=16 N=1"]
    with pytest.raises(app.UsageError, match="no model"):
        tune.run_cli(["jax_moe.tune", "--model="], profiler=CostModelProfiler())


def test_regret_arithmetic():
    cell = TuneCell(TINY, 1, 8, ARCH, "softmax")
    g1a, g1b = _variant(GEMM1_OP, 16), _variant(GEMM1_OP, 32)
    g2a, g2b = _variant(GEMM2_OP, 16), _variant(GEMM2_OP, 32)
    timings = {
        GEMM1_OP: {g1a: Measurement(12.0), g1b: Measurement(10.0)},
        GEMM2_OP: {g2a: Measurement(11.0), g2b: Measurement(10.0)},
    }
    result = CellResult(cell, timings)
    regret = regret_of(result, (g1a, g2a))
    assert (regret.tuned_us, regret.best_us, regret.best) == (23.0, 20.0, (g1b, g2b))
    assert math.isclose(regret.regret, 0.15)
    assert regret_of(result, (g1b, g2b)).regret == 0.0
    assert regret_of(result, (g1a, _variant(GEMM2_OP, 64))).regret is None

    def entry(value, routing="softmax"):
        return CellRegret(
            TuneCell(TINY, 1, 8, ARCH, routing), (g1a, g2a), 1.0, None, 1.0, value, None
        )

    report = EvaluationReport(
        (entry(0.0), entry(0.03), entry(0.01, "skewed"), entry(None, "skewed")),
        Reproducibility(19, 20, ()),
    )
    assert math.isclose(report.mean_regret(), 0.04 / 3)
    assert report.max_regret() == 0.03 and report.max_regret("skewed") == 0.01
    assert math.isclose(report.mean_regret("softmax"), 0.015) and len(report.failed) == 1
    text = format_report(report)
    assert "mean regret 1.33% <= 2.00%: PASS" in text
    assert "max regret 3.00% <= 5.00%: PASS" in text
    assert "same pair 95.00% >= 95.00%: PASS" in text and "19/20" in text


def test_evaluate_reports_regret_and_reproducibility(tmp_path):
    outcome, _, _ = _cli(tmp_path, "--ep=1,2", "--max_tokens=4")
    path = str(tmp_path / "tactics.json")
    evaluated, output, _ = _cli(tmp_path, f"--evaluate={path}")
    report = evaluated.report
    assert {r.cell.routing for r in report.regrets} == {"softmax", "skewed"}
    assert len(report.regrets) == 2 * 6 and all(r.regret is not None for r in report.regrets)
    assert report.reproducibility.same == report.reproducibility.total == 6
    assert "regret all routings" in output and "same pair 100.00%" in output
    # A device on which one tuned tactic became 50% slower: regret and a changed choice.
    slow = outcome.results[0].choice.gemm1.tactic
    hit = [r for r in outcome.results if r.choice.gemm1.tactic == slow]
    evaluated, output, _ = _cli(
        tmp_path, f"--evaluate={path}", profiler=CostModelProfiler(penalty={str(slow): 1.5})
    )
    rep = evaluated.report.reproducibility
    assert rep.total - rep.same == len(hit) and str(hit[0].cell) in output
    assert evaluated.report.max_regret() > 0
    worst = max(evaluated.report.regrets, key=lambda r: r.regret)
    assert worst.regret > 0.05  # listed with the pair that beat it
    assert f"  {worst.cell}: tuned {worst.tuned[0]}" in output and "; best " in output


def test_evaluate_only_the_cells_of_the_given_ep_and_model(tmp_path):
    _cli(tmp_path, "--ep=1,2", "--max_tokens=4")
    path = str(tmp_path / "tactics.json")
    evaluated, _, _ = _cli(tmp_path, f"--evaluate={path}", "--ep=2", "--noevaluate_repeat")
    cells = {(r.cell.model.name, r.cell.ep, r.cell.num_tokens) for r in evaluated.report.regrets}
    assert cells == {("tiny", 2, n) for n in (1, 2, 4)}
    with pytest.raises(ValueError, match=r"no cell of tiny at EP 4; it holds .*\(tiny, 2\)"):
        _cli(tmp_path, f"--evaluate={path}", "--ep=4", "--noevaluate_repeat")
    stream = io.StringIO()
    argv = ["jax_moe.tune", f"--evaluate={path}", "--model=mixtral_8x7b", "--noevaluate_repeat"]
    with pytest.raises(ValueError, match="no cell of mixtral_8x7b at EP any"):
        tune.run_cli(argv, profiler=CostModelProfiler(), stream=stream)


def test_busiest_rank_routing_profiles_the_most_loaded_slice():
    model = models.get_preset("deepseek_v3")
    ep, local = 8, model.num_experts // 8
    for n in (1, 3, 64):
        plain = np.asarray(cell_inputs(TuneCell(model, ep, n, ARCH, "softmax")).topk_ids)
        cell = TuneCell(model, ep, n, ARCH, "softmax@busiest")
        shifted = cell_inputs(cell)
        ids = np.asarray(shifted.topk_ids)
        rank_loads = np.bincount((plain // local).ravel(), minlength=ep)
        assert sum(cell_expert_loads(cell)) == rank_loads.max() >= rank_loads[0]
        assert sorted(np.bincount((ids // local).ravel(), minlength=ep)) == sorted(rank_loads)
        assert all(len(set(row)) == model.top_k for row in ids.tolist())
        assert ids.min() >= 0 and ids.max() < model.num_experts
        np.testing.assert_array_equal(
            np.asarray(shifted.topk_weights),
            np.asarray(cell_inputs(TuneCell(model, ep, n, ARCH, "softmax")).topk_weights),
        )


def test_evaluate_on_the_busiest_rank(tmp_path):
    _cli(tmp_path, "--ep=2", "--max_tokens=2")
    path = str(tmp_path / "tactics.json")
    evaluated, _, _ = _cli(
        tmp_path, f"--evaluate={path}", "--evaluate_routings=softmax@busiest,skewed"
    )
    assert {r.cell.routing for r in evaluated.report.regrets} == {"softmax@busiest", "skewed"}
    regret_only, output, _ = _cli(tmp_path, f"--evaluate={path}", "--noevaluate_repeat")
    assert regret_only.report.reproducibility is None and "same pair" not in output


def test_timings_out_writes_every_timing(tmp_path):
    out = tmp_path / "timings" / "tune.json"
    outcome, output, profiler = _cli(tmp_path, "--ep=2", "--max_tokens=2", f"--timings_out={out}")
    data = json.loads(out.read_text())
    assert data["format"] == "jax_moe.timings" and data["device_name"] == DEVICE
    rows = data["rows"]
    assert len(rows) == len(profiler.calls) and f"wrote {len(rows)} timings" in output
    result = outcome.results[0]
    cell = result.cell
    for row in rows[:5]:
        tactic = tactic_from_json(row["tactic"])
        routed = dataclasses.replace(cell, routing=row["routing"], num_tokens=row["num_tokens"])
        assert row["time_us"] == model_time(row["op"], tactic, routed)
    assert {r["routing"] for r in rows} == {"balanced", "spread", "busy"}
    path = str(tmp_path / "tactics.json")
    evaluated, _, profiler = _cli(
        tmp_path, f"--evaluate={path}", "--noevaluate_repeat", f"--timings_out={out}"
    )
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(profiler.calls)
    assert {r["routing"] for r in rows} == {"softmax", "skewed"}
    failed = _cli(
        tmp_path,
        "--ep=2",
        "--max_tokens=1",
        f"--timings_out={out}",
        profiler=CostModelProfiler(fail={str(result.choice.gemm1.tactic)}),
    )[0]
    errors = [r for r in json.loads(out.read_text())["rows"] if "error" in r]
    assert failed.results and len(errors) >= 1 and "launch failed" in errors[0]["error"]


class _StopsAt(CostModelProfiler):
    """Interrupts the run (like Ctrl-C or a time limit) when it reaches a cell."""

    def __init__(self, routing, num_tokens):
        super().__init__()
        self.stop = (routing, num_tokens)

    def prepare_cell(self, cell, candidates):
        if (cell.routing, cell.num_tokens) == self.stop:
            raise KeyboardInterrupt
        super().prepare_cell(cell, candidates)


def test_an_interrupted_run_keeps_the_timings_of_the_cells_done(tmp_path):
    out = tmp_path / "timings.json"
    with pytest.raises(KeyboardInterrupt):
        _cli(
            tmp_path,
            "--ep=2",
            "--max_tokens=8",
            f"--timings_out={out}",
            profiler=_StopsAt("balanced", 8),
        )
    tuned = results_from_rows(json.loads(out.read_text())["rows"])
    assert [r.cell.num_tokens for r in tuned] == [1, 2, 4]
    assert not (tmp_path / "tactics.json").exists()  # the table is written at the end only
    _cli(tmp_path, "--ep=2", "--max_tokens=8")
    path = str(tmp_path / "tactics.json")
    with pytest.raises(KeyboardInterrupt):
        _cli(
            tmp_path,
            f"--evaluate={path}",
            "--noevaluate_repeat",
            f"--timings_out={out}",
            profiler=_StopsAt("skewed", 2),
        )
    rows = json.loads(out.read_text())["rows"]
    # Cell by cell, both routings of a cell in turn (they share compiled programs).
    assert [(r.cell.routing, r.cell.num_tokens) for r in results_from_rows(rows)] == [
        ("softmax", 1),
        ("skewed", 1),
        ("softmax", 2),
    ]
    stream = io.StringIO()
    tune.run_cli(["jax_moe.tune", f"--analyze={out}", f"--evaluate_also={path}"], stream=stream)
    assert f"regret of {path}: mean" in stream.getvalue()


def test_resume_measures_only_the_cells_not_saved(tmp_path):
    whole, _, _ = _cli(tmp_path, "--ep=2", "--max_tokens=8")
    path = tmp_path / "tactics.json"
    expected = path.read_text()
    path.unlink()
    out = tmp_path / "timings.json"
    flags = ("--ep=2", "--max_tokens=8", f"--timings_out={out}", "--resume")
    with pytest.raises(KeyboardInterrupt):
        _cli(tmp_path, *flags, profiler=_StopsAt("balanced", 8))
    # The compile thread count is not part of the run; files that recorded it resume too.
    data = json.loads(out.read_text())
    assert "compile_threads" not in data["run"]["timing"]
    data["run"]["timing"]["compile_threads"] = 8
    out.write_text(json.dumps(data))
    resumed, output, profiler = _cli(tmp_path, *flags, "--compile_threads=3")
    assert "resuming: 3 cells already timed" in output and "(saved timings)" in output
    assert {cell.num_tokens for cell, _ in profiler.prepared} == {8}
    assert [r.choice for r in resumed.results] == [r.choice for r in whole.results]
    table, again = json.loads(path.read_text()), json.loads(expected)
    assert table["entries"] == again["entries"]
    assert len(results_from_rows(json.loads(out.read_text())["rows"])) == 4
    # The profile's scoring changes the choice only: timings of the same routings
    # scored another way resume too.
    data = json.loads(out.read_text())
    assert data["run"]["distribution"] == "balanced/spread+busy"
    data["run"]["distribution"] = "balanced+spread+busy"
    out.write_text(json.dumps(data))
    _, output, profiler = _cli(tmp_path, *flags)
    assert "resuming: 4 cells already timed" in output and not profiler.prepared
    # An evaluation resumes the same way, and keeps its own timings apart.
    ev_out = tmp_path / "eval_timings.json"
    ev_flags = (f"--evaluate={path}", f"--timings_out={ev_out}", "--resume")
    with pytest.raises(KeyboardInterrupt):
        _cli(tmp_path, *ev_flags, profiler=_StopsAt("skewed", 4))
    full, _, _ = _cli(tmp_path, f"--evaluate={path}")
    evaluated, _, profiler = _cli(tmp_path, *ev_flags)
    assert {(c.routing, c.num_tokens) for c, _ in profiler.prepared} == {
        ("skewed", 4),
        ("softmax", 8),
        ("skewed", 8),
        *(("balanced", n) for n in (1, 2, 4, 8)),  # the repeated tuning
        *(("spread", n) for n in (1, 2, 4, 8)),
        *(("busy", n) for n in (2, 4, 8)),  # at one token the busy plan is the balanced one
    }
    assert evaluated.report.regrets == full.report.regrets
    assert evaluated.report.reproducibility == full.report.reproducibility
    # Timings of another kind of run or other timing settings are not mixed in.
    with pytest.raises(ValueError, match="not written by this kind of run"):
        _cli(tmp_path, *flags[:-2], f"--timings_out={ev_out}", "--resume")
    with pytest.raises(ValueError, match="not written by this kind of run"):
        _cli(tmp_path, *flags, "--reps=7")
    with pytest.raises(app.UsageError, match="--resume needs --timings_out"):
        _cli(tmp_path, "--resume")
    for other in ("--distribution=balanced", "--all_variants"):
        with pytest.raises(ValueError, match="not written by this kind of run"):
            _cli(tmp_path, *flags, other)
    # A run over fewer cells keeps the others in the file.
    _cli(tmp_path, "--ep=2", "--max_tokens=2", f"--timings_out={out}", "--resume")
    assert len(results_from_rows(json.loads(out.read_text())["rows"])) == 4


def test_resume_measures_again_the_cells_with_a_failure(tmp_path):
    out = tmp_path / "timings.json"
    flags = ("--ep=2", "--max_tokens=4", f"--timings_out={out}", "--resume")
    first, _, _ = _cli(tmp_path, *flags)
    failing = str(first.results[1].choice.gemm1.tactic)  # chosen at N=2
    out.unlink()
    _cli(tmp_path, *flags, profiler=CostModelProfiler(fail={failing}))
    failed = {
        r.cell.num_tokens
        for r in results_from_rows(json.loads(out.read_text())["rows"])
        if r.failures()
    }
    assert failed  # the failing tactic is valid in some cells
    resumed, _, profiler = _cli(tmp_path, *flags)
    assert {cell.num_tokens for cell, _ in profiler.prepared} == failed
    assert [r.choice for r in resumed.results] == [r.choice for r in first.results]


def test_timings_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    out = tmp_path / "timings.json"
    _cli(tmp_path, "--ep=2", "--max_tokens=2", f"--timings_out={out}")
    before = out.read_text()

    def broken_dump(data, f, **kwargs):
        f.write('{"format": "jax_moe.timings", "ro')
        raise OSError("disk full")

    monkeypatch.setattr(tune.json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        _cli(tmp_path, "--ep=2", "--max_tokens=4", f"--timings_out={out}")
    assert out.read_text() == before  # and no temporary file left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tactics.json", "timings.json"]


def test_analyze_reads_saved_timings_without_a_gpu(tmp_path):
    _cli(tmp_path, "--ep=2", "--max_tokens=4")
    path = str(tmp_path / "tactics.json")
    out = tmp_path / "eval_timings.json"
    evaluated, _, _ = _cli(
        tmp_path, f"--evaluate={path}", "--noevaluate_repeat", f"--timings_out={out}"
    )
    rows = json.loads(out.read_text())["rows"]
    results = results_from_rows(rows)
    assert timing_rows(results) == rows  # a round trip
    # No profiler is needed; the table's regret on the saved timings is the evaluation's.
    stream = io.StringIO()
    outcome = tune.run_cli(
        ["jax_moe.tune", f"--analyze={out}", f"--evaluate_also={path}"], stream=stream
    )
    text = stream.getvalue()
    report = evaluated.report
    assert len(outcome.results) == len(report.regrets)
    assert f"regret of {path}: mean {100 * report.mean_regret():.2f}%" in text
    defaults = [r.default_regret for r in report.regrets]
    assert f"regret of default: mean {100 * sum(defaults) / len(defaults):.2f}%" in text
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "jax_moe.timings", "rows": [{"op": "x"}]}))
    with pytest.raises(ValueError, match="timing row 0 is malformed"):
        tune.run_cli(["jax_moe.tune", f"--analyze={bad}"], stream=io.StringIO())
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a timings file"):
        tune.run_cli(["jax_moe.tune", f"--analyze={bad}"], stream=io.StringIO())
    with pytest.raises(app.UsageError, match="not both"):
        _cli(tmp_path, f"--analyze={out}", f"--evaluate={path}")


def test_analyze_out_chooses_again_from_saved_timings(tmp_path):
    timings = tmp_path / "timings.json"
    tuned, _, _ = _cli(tmp_path, "--ep=2", "--max_tokens=8", f"--timings_out={timings}")
    again = tmp_path / "again.json"
    # The same search settings on the saved timings give the tuned table, without a GPU.
    outcome = tune.run_cli(
        ["jax_moe.tune", f"--analyze={timings}", f"--analyze_out={again}"], stream=io.StringIO()
    )
    table = TacticTable.load(again)
    assert (
        table.metadata.distribution == tuned.table.metadata.distribution == "balanced/spread+busy"
    )
    assert table.metadata.profile_key == tuned.table.metadata.profile_key
    assert dict(table.entries) == dict(tuned.table.entries)
    # A wide tie tolerance changes choices: the table holds the rule's new pairs.
    wide = tmp_path / "wide.json"
    outcome = tune.run_cli(
        ["jax_moe.tune", f"--analyze={timings}", f"--analyze_out={wide}", "--tie_tolerance=0.3"],
        stream=io.StringIO(),
    )
    chosen = TacticTable.load(wide)
    changed = [k for k in chosen if chosen.lookup(k) != tuned.table.lookup(k)]
    assert changed
    for result in outcome.results:
        assert result.choice is not None
        assert result.choice.gemm1.tactic == chosen.lookup(result.cell.problem_key(GEMM1_OP))
    # An evaluation's timings are not a tuning's; --analyze_out needs --analyze.
    evaluated = tmp_path / "eval_timings.json"
    _cli(
        tmp_path,
        f"--evaluate={tmp_path / 'tactics.json'}",
        "--noevaluate_repeat",
        f"--timings_out={evaluated}",
    )
    with pytest.raises(ValueError, match="an evaluation's timings"):
        tune.run_cli(
            ["jax_moe.tune", f"--analyze={evaluated}", f"--analyze_out={again}"],
            stream=io.StringIO(),
        )
    with pytest.raises(app.UsageError, match="needs --analyze"):
        _cli(tmp_path, f"--analyze_out={again}")
    with pytest.raises(app.UsageError, match="would overwrite"):
        _cli(tmp_path, f"--analyze={timings}", f"--analyze_out={timings}")
    # A file without the run's profile (written before it was recorded, when every
    # routing was scored): the routings of its cells, all scored.
    data = json.loads(timings.read_text())
    del data["run"]
    old = tmp_path / "old_timings.json"
    old.write_text(json.dumps(data))
    outcome = tune.run_cli(
        ["jax_moe.tune", f"--analyze={old}", f"--analyze_out={again}"], stream=io.StringIO()
    )
    assert outcome.table.metadata.distribution == "balanced+spread+busy"
    assert dict(TacticTable.load(again).entries) == dict(tuned.table.entries)


def test_evaluate_also_compares_tables_on_the_same_timings(tmp_path):
    _cli(tmp_path, "--ep=2", "--max_tokens=4")
    path = str(tmp_path / "tactics.json")
    other = tmp_path / "other.json"
    # Another table: tuned on a device where one tactic looked 50 % slower.
    table = TacticTable.load(path)
    slow = next(iter(table.entries.values())).tactic
    tune.run_cli(
        ["jax_moe.tune", "--model=tiny", "--ep=2", "--max_tokens=2", f"--out={other}"],
        profiler=CostModelProfiler(penalty={str(slow): 1.5}),
        stream=io.StringIO(),
    )
    evaluated, output, _ = _cli(
        tmp_path, f"--evaluate={path}", f"--evaluate_also={other},{path}", "--noevaluate_repeat"
    )
    report = evaluated.report
    for r in report.regrets:
        assert len(r.other_regrets) == 2
        assert r.other_regrets[1] == r.regret  # the same table, the same timings
        if r.cell.num_tokens == 4:  # not in the other table
            assert r.other_regrets[0] is None
    assert report.mean_regret(other=1) == report.mean_regret()
    assert f"other1: the regret of {other}" in output and f"regret of {other}, all" in output
    with pytest.raises(app.UsageError, match="evaluate_routings"):
        _cli(tmp_path, f"--evaluate={path}", "--evaluate_routings=balanced@busiest")


def test_evaluate_times_regret_fully_even_with_screening(tmp_path):
    _cli(tmp_path, "--ep=2", "--max_tokens=2")
    path = str(tmp_path / "tactics.json")
    table = TacticTable.load(path)
    profiler = NoisyScreenProfiler(lambda t: 1.0)
    search = SearchConfig(screen=0.1)
    evaluate_table(profiler, table, EvaluationConfig(repeat_tuning=False, search=search))
    assert profiler.screened == [] and profiler.calls
    evaluate_table(profiler, table, EvaluationConfig(repeat_tuning=True, search=search))
    assert profiler.screened  # the repeated tuning screens as the original run would


def test_evaluate_seed_draws_the_regret_passes_from_another_key(tmp_path):
    _cli(tmp_path, "--ep=2", "--max_tokens=2")
    path = str(tmp_path / "tactics.json")
    evaluated, output, profiler = _cli(tmp_path, f"--evaluate={path}", "--evaluate_seed=7")
    keys = {(c.routing, c.key_data) for _, _, c in profiler.calls}
    assert {k for r, k in keys if r in ("softmax", "skewed")} == {key_data_of_seed(7)}
    # The repeated tuning (balanced, then spread) keeps the table's key.
    assert {k for r, k in keys if r not in ("softmax", "skewed")} == {key_data_of_seed(0)}
    assert "drawn with seed 7" in output and evaluated.report.reproducibility is not None
    with pytest.raises(app.UsageError, match="needs --evaluate"):
        _cli(tmp_path, "--evaluate_seed=7")
    with pytest.raises(app.UsageError, match="seed"):
        _cli(tmp_path, f"--evaluate={path}", "--evaluate_seed=-1")


def test_plot_needs_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    profiler = CostModelProfiler()
    with pytest.raises(RuntimeError, match="--plot needs matplotlib"):
        _cli(tmp_path, "--max_tokens=2", f"--plot={tmp_path / 'p.png'}", profiler=profiler)
    assert not profiler.calls  # failed before any profiling


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "latency.png"
    _cli(tmp_path, "--ep=1,2", "--max_tokens=4", f"--plot={png}")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cells_validate_their_fields():
    with pytest.raises(ValueError, match="does not divide"):
        TuneCell(TINY, 3, 4, ARCH)
    with pytest.raises(ValueError, match="routing"):
        TuneCell(TINY, 1, 4, ARCH, "gauss")
    with pytest.raises(ValueError, match="arch"):
        TuneCell(TINY, 1, 4, "hopper")
    cell = TuneCell(TINY, 2, 8, ARCH, "zipf:1.50", key_data_of_seed(1))
    assert cell.routing == "zipf:1.5" and str(cell) == "tiny EP=2 N=8 zipf:1.5"
    assert sum(cell_expert_loads(TuneCell(TINY, 1, 8, ARCH))) == 8 * TINY.top_k
    # Balanced cells answer from the plan; it is what the drawn routing holds.
    for ep, n in ((1, 8), (2, 5), (4, 1)):
        balanced = TuneCell(TINY, ep, n, ARCH)
        ids = np.asarray(cell_inputs(balanced).topk_ids).ravel()
        drawn = np.bincount(ids[ids < balanced.num_local_experts], minlength=TINY.num_experts // ep)
        assert cell_expert_loads(balanced) == tuple(int(x) for x in drawn)


@pytest.mark.parametrize(
    "device, presets",
    [
        (DEVICE, [("deepseek_v3", (256, 32, 16))]),
        ("NVIDIA H200", [("deepseek_v3", (256, 32, 16)), ("qwen3_30b_a3b", (128,))]),
    ],
)
def test_the_shipped_tables_are_used_by_default(device, presets):
    from jax_moe import gpu
    from jax_moe.kernels import moe_gemm_config
    from jax_moe.moe import MoEProblem

    shipped.shipped_table.cache_clear()
    table = shipped.shipped_table(device, ARCH)
    assert table is not None and table.metadata.device_name == device
    exported = set(moe_gemm_config.gemm1_variants() + moe_gemm_config.gemm2_variants())
    assert all(table.lookup(key) in exported for key in table)
    # Every tuned slice: every bucket is covered by a pair of tuned tactics.
    for name, locals_ in presets:
        cfg = models.get_preset(name)
        for local in locals_:
            for n in (1, 3, 64, 1000, 16384):
                problem = MoEProblem(
                    n,
                    cfg.hidden,
                    cfg.intermediate,
                    cfg.top_k,
                    cfg.num_experts,
                    local,
                    0,
                    "bfloat16",
                )
                gemm1, gemm2 = gpu.select_tactics(problem, None, arch=ARCH, device_name=device)
                key1 = gpu._problem_key("moe_gemm1", problem, ARCH)
                key2 = gpu._problem_key("moe_gemm2", problem, ARCH)
                assert (gemm1, gemm2) == (table.lookup(key1), table.lookup(key2))
    # Elsewhere (another device, a user table) the shipped table is not used.
    cfg = models.get_preset("deepseek_v3")
    problem = MoEProblem(1, cfg.hidden, cfg.intermediate, 8, 256, 32, 0, "bfloat16")
    assert shipped.shipped_table("NVIDIA H800", ARCH) is None
    assert gpu.select_tactics(problem, None, arch=ARCH, device_name="NVIDIA H800") == tuple(
        moe_gemm_config.default_tactic(op, 1, 8, 32, cfg.hidden, cfg.intermediate, num_experts=256)
        for op in ("moe_gemm1", "moe_gemm2")
    )


def test_shipped_table(tmp_path, monkeypatch):
    shipped.shipped_table.cache_clear()
    assert shipped.device_slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert shipped.shipped_table("NVIDIA A100-SXM4-80GB", ARCH) is None  # none shipped
    outcome, _, _ = _cli(tmp_path, "--max_tokens=2")
    directory = tmp_path / "package" / shipped.SHIPPED_DIRECTORY
    directory.mkdir(parents=True)
    outcome.table.save(directory / "nvidia_h100_80gb_hbm3.json")
    monkeypatch.setattr(shipped.importlib.resources, "files", lambda _: tmp_path / "package")
    shipped.shipped_table.cache_clear()
    try:
        assert shipped.shipped_table(DEVICE, ARCH) == outcome.table
        assert shipped.shipped_table("NVIDIA H100 80GB-HBM3", ARCH) is None  # other name
        assert shipped.shipped_table(DEVICE, "sm_100a") is None
    finally:
        shipped.shipped_table.cache_clear()


def test_gpu_profiler_needs_a_gpu():
    from conftest import gpu_reason

    if gpu_reason() is None:
        pytest.skip("a GPU is present")
    with pytest.raises(NotImplementedError, match="GpuProfiler needs"):
        GpuProfiler()
    with pytest.raises(NotImplementedError, match="GpuProfiler needs"):
        tune.run_cli(
            ["jax_moe.tune", "--model=tiny", "--max_tokens=2", "--out=/nonexistent/t.json"]
        )


@pytest.mark.skipif(not _ffi.is_available(), reason="the jax_moe CUDA extension is not built")
def test_gpu_profiler_scans_lower_for_cuda_with_matching_inputs():
    # The GPU profiler's programs and inputs, checked without a GPU (no __init__ device checks).
    profiler = GpuProfiler.__new__(GpuProfiler)
    timing = TimingConfig(reps=6, cold_l2=True, max_weight_copies=4)
    profiler._setup(timing, DEVICE, ARCH, l2_bytes=1 << 20)
    cell = TuneCell(TINY, 2, 8, ARCH)
    for op in OPS:
        tactic = exported_variants(op)[5]
        plan = profiler._plan(op, tactic.block_m, cell)
        assert (plan.copies, plan.steps, plan.launches) == (4, 2, 8)  # tiny weights: 4 copies
        text = profiler._lower(op, tactic, cell, ("cuda",)).as_text()
        # Unrolled (the default): no device loop; the step (one launch per copy) is
        # either a function called once per step or inlined once per step (newer jax).
        assert "stablehlo.while" not in text
        calls = text.count("call @closed_call(")
        assert (calls, text.count(f"@jax_moe_{op}(")) in ((2, 4), (0, 8))
        profiler._setup(dataclasses.replace(timing, unroll=False), DEVICE, ARCH, 1 << 20)
        looped = profiler._lower(op, tactic, cell, ("cuda",)).as_text()
        assert looped.count(f"@jax_moe_{op}(") == 4 and "stablehlo.while" in looped
        profiler._setup(timing, DEVICE, ARCH, l2_bytes=1 << 20)
        assert f"variant = {_ffi.variant_id(op, tactic)} : i32" in text
        concrete = profiler._concrete_args(plan, cell)
        abstract = profiler._abstract_args(plan, cell)
        assert jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), concrete) == jax.tree.map(
            lambda a: (a.shape, jnp.dtype(a.dtype)), abstract
        )
    # Large problems: fewer launches per scan so the stacked inputs fit max_input_bytes.
    profiler._setup(TimingConfig(reps=20, max_input_bytes=2**30), DEVICE, ARCH, 50 << 20)
    big = TuneCell(models.get_preset("deepseek_v3"), 1, 16384, ARCH)
    plan = profiler._plan(GEMM2_OP, 128, big)
    assert plan.copies == 1 and plan.steps * plan.activation.shape[0] * 2048 * 2 <= 2**30
    assert profiler._plan(GEMM1_OP, 16, TuneCell(TINY, 1, 1, ARCH)).launches == 20


def test_after_keeps_timed_launches_in_order_after_optimization():
    # XLA must not fold `acc * 0` away: each step's input index would no longer wait
    # for the previous step's result, and the steps could run concurrently.
    weights = jnp.ones((64, 64), jnp.bfloat16)

    def program(xs, chained):
        def step(i, acc):
            index = i + after(acc) if chained else i
            x = jax.lax.dynamic_index_in_dim(xs, index, keepdims=False)
            return acc + (x @ weights)[0, 0].astype(jnp.float32)

        return jax.lax.fori_loop(0, len(xs), step, jnp.zeros((), jnp.float32), unroll=True)

    xs = jnp.ones((4, 32, 64), jnp.bfloat16)
    for chained, slices in ((True, 3), (False, 0)):  # the first step's index is constant
        text = jax.jit(program, static_argnums=1).lower(xs, chained).compile().as_text()
        assert text.count("dynamic-slice(") == slices and "while(" not in text
    assert int(after(jnp.float32(3.5))) == 0 and after(jnp.float32(1)).dtype == jnp.int32


def test_timer_flags_reach_the_profiler_settings(tmp_path):
    tune.run_cli(
        [
            "jax_moe.tune",
            "--model=tiny",
            f"--out={tmp_path / 'tactics.json'}",
            "--timer=wall",
            "--min_scan_us=500",
            "--reps=7",
            "--nounroll",
            "--compile_threads=3",
        ],
        profiler=CostModelProfiler(),
        stream=io.StringIO(),
    )
    timing = tune.config_from_flags().timing
    assert (
        timing.timer,
        timing.min_scan_us,
        timing.reps,
        timing.unroll,
        timing.compile_threads,
    ) == ("wall", 500.0, 7, False, 3)


def test_timing_config_validates_the_timer_fields():
    with pytest.raises(ValueError, match="timer='cycles'"):
        TimingConfig(timer="cycles")
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="min_scan_us"):
            TimingConfig(min_scan_us=bad)
    with pytest.raises(ValueError, match="min_reps=0"):
        TimingConfig(min_reps=0)
    with pytest.raises(TypeError, match="unroll=1"):
        TimingConfig(unroll=1)


def test_long_launches_get_fewer_launches_per_scan():
    profiler = GpuProfiler.__new__(GpuProfiler)
    profiler._setup(TimingConfig(), DEVICE, ARCH, 50 << 20)
    deepseek = models.get_preset("deepseek_v3")
    # EP=1, N=16384: all 256 experts (4.2 GB of GEMM1 weights) and 7.7 TFLOP per launch.
    big = TuneCell(deepseek, 1, 16384, ARCH)
    assert estimated_launch_us(GEMM1_OP, big) == pytest.approx(
        2 * 16384 * 8 * 2 * 2048 * 7168 / 1.2e9
    )
    assert [profiler._plan(op, 128, big).launches for op in OPS] == [3, 3]  # min_reps
    # EP=8, N=1: 3 active experts, weight-bound estimate, the full 20 launches.
    small = TuneCell(deepseek, 8, 1, ARCH)
    assert estimated_launch_us(GEMM1_OP, small) == pytest.approx(3 * 4096 * 7168 * 9 / 16 / 5e6)
    assert [profiler._plan(op, 16, small).launches for op in OPS] == [20, 20]
    # In between: about min_scan_us per scan; the plan depends on the cell alone.
    mid = TuneCell(deepseek, 8, 8192, ARCH)
    launches = profiler._plan(GEMM1_OP, 64, mid).launches
    assert launches == math.ceil(2000 / estimated_launch_us(GEMM1_OP, mid)) and 3 < launches < 20
    profiler._setup(TimingConfig(min_scan_us=0), DEVICE, ARCH, 50 << 20)
    # Without it: `reps`, capped only by max_input_bytes (18 stacked 117 MB inputs).
    assert profiler._plan(GEMM1_OP, 64, mid).launches == 2**31 // (8192 * 7168 * 2)


@pytest.mark.skipif(not _ffi.is_available(), reason="the jax_moe CUDA extension is not built")
def test_event_timer_brackets_the_scan():
    profiler = GpuProfiler.__new__(GpuProfiler)
    cell = TuneCell(TINY, 1, 8, ARCH)
    tactic = exported_variants(GEMM1_OP)[0]
    for timer, records in (("events", 2), ("wall", 0)):
        for unroll in (True, False):
            profiler._setup(TimingConfig(timer=timer, unroll=unroll), DEVICE, ARCH, 1 << 20)
            text = profiler._lower(GEMM1_OP, tactic, cell, ("cuda",)).as_text()
            assert text.count("@jax_moe_record_event(") == records
            if records:
                # Start, then a barrier that every launch's input passes, then the
                # launches (in a loop or not), then the stop on their result.
                start = text.index("slot = 0 : i32")
                barrier = text.index("stablehlo.optimization_barrier")
                stop = text.index("slot = 1 : i32")
                loop = "stablehlo.while"
                if unroll:  # the step as a called function, or inlined (newer jax)
                    called = "call @closed_call(" in text
                    loop = "call @closed_call(" if called else f"@jax_moe_{GEMM1_OP}("
                assert start < barrier < text.index(loop) <= text.rindex(loop) < stop
    with pytest.raises(ValueError, match="slot=16"):
        _ffi.record_event(jnp.zeros(()), slot=16)
    with pytest.raises(ValueError, match="slot=True"):
        _ffi.record_event(jnp.zeros(()), slot=True)
    with pytest.raises(RuntimeError, match="not both recorded"):
        _ffi.event_elapsed_ms(14, 15)  # never recorded: an error, not a crash
    with pytest.raises(ValueError, match="slot=-1"):
        _ffi.event_elapsed_ms(-1, 0)


@requires_gpu
def test_gpu_profiler_times_tactics_and_records_failures():
    profiler = GpuProfiler(TimingConfig(reps=4, repeats=2))
    cell = TuneCell(TINY, 1, 8, profiler.arch)
    g1, g2 = (
        moe_gemm_config.default_tactic("moe_gemm1", 8, 2, 8, 256, 128),
        moe_gemm_config.default_tactic("moe_gemm2", 8, 2, 8, 256, 128),
    )
    profiler.prepare_cell(cell, {GEMM1_OP: [g1], GEMM2_OP: [g2]})
    for op, tactic in ((GEMM1_OP, g1), (GEMM2_OP, g2)):
        result = profiler.time(op, tactic, cell)
        assert isinstance(result, Measurement) and 0 < result.time_us < 1e5, result
        assert len(result.samples_us) == 2 and result.launches == 4
    not_exported = moe_gemm_config.MoeGemm1Sm90Tactic(
        block_m=16, block_w=128, warps_m=4, warps_n=1, stages=3, cp_async=True
    )
    failure = profiler.time(GEMM1_OP, not_exported, cell)
    assert isinstance(failure, Failure) and "not compiled" in failure.message
    cold = GpuProfiler(TimingConfig(reps=4, repeats=2, cold_l2=True))
    result = cold.time(GEMM1_OP, g1, cell)
    assert isinstance(result, Measurement) and result.launches >= 16


@requires_gpu
def test_event_timer_measures_device_time():
    def program(x):
        x = _ffi.record_event(x, slot=2)
        y = jax.lax.fori_loop(0, 50, lambda _, a: jnp.tanh(a @ a) * 0.5, x)
        return _ffi.record_event(y, slot=3)

    run = jax.jit(program)
    x = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    jax.block_until_ready(run(x))
    import time

    start = time.perf_counter()
    jax.block_until_ready(run(x))
    wall_ms = (time.perf_counter() - start) * 1e3
    device_ms = _ffi.event_elapsed_ms(2, 3)
    # 50 float32 2048^3 matmuls: 0.86 TFLOP, well over 0.1 ms on any GPU, and the events
    # lie inside the host's window.
    assert 0.1 < device_ms <= wall_ms, (device_ms, wall_ms)
    # Both timers of the profiler agree to within the host overhead.
    cell = TuneCell(TINY, 1, 8, ARCH)
    tactic = moe_gemm_config.default_tactic("moe_gemm1", 8, 2, 8, 256, 128)
    times = {}
    for timer in ("events", "wall"):
        result = GpuProfiler(TimingConfig(reps=20, repeats=3, timer=timer)).time(
            GEMM1_OP, tactic, cell
        )
        assert isinstance(result, Measurement), result
        times[timer] = result.time_us
    assert times["events"] <= times["wall"] * 1.2, times


@requires_gpu
def test_gpu_tune_run_end_to_end(tmp_path):
    path = tmp_path / "tactics.json"
    stream = io.StringIO()
    outcome = tune.run_cli(
        [
            "jax_moe.tune",
            "--model=tiny",
            "--ep=1,2",
            "--max_tokens=4",
            "--reps=4",
            "--repeats=2",
            f"--out={path}",
        ],
        stream=stream,
    )
    table = TacticTable.load(path)
    assert len(table) == 12 and not any(r.failures() for r in outcome.results), stream.getvalue()
