"""Ahead-of-time tuning of the MoE GEMM tactics: `python -m jax_moe.tune`.

Times every valid exported tactic of `moe_gemm1` and `moe_gemm2` for each cell
of the grid (model x EP size x token bucket `1, 2, 4, ..., --max_tokens`) on
the GPU, chooses per cell the fastest GEMM1 + GEMM2 pair
(`jax_moe.tuning.tuner`) and writes a tactic file for
`fused_moe(..., tactics=PATH)`. See docs/TUNING.md, "Running the tuner".

    python -m jax_moe.tune --model=deepseek_v3 --ep=1,8,16 --out=tactics.json
    python -m jax_moe.tune --hidden=4096 --intermediate=1408 --num_experts=64 \\
        --top_k=6 --ep=8 --out=tactics.json --merge
    python -m jax_moe.tune --evaluate=tactics.json          # regret + reproducibility
    python -m jax_moe.tune --model=tiny --max_tokens=64 --plot=tiny.png

Flags live in their own `flags.FlagValues` (`FLAGS`), so importing this module
defines nothing on absl's global flags; `run(config, profiler=...)` is the
whole tool without flags and `run_cli(argv, profiler=...)` parses `argv` first
(both take an injectable `Profiler`, which tests use).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from absl import app, flags

from jax_moe import models
from jax_moe.tuning.problem import DEFAULT_MAX_TOKENS
from jax_moe.tuning.profiler import (
    BUSIEST_RANK,
    OPS,
    REALISTIC_ROUTINGS,
    Profiler,
    TimingConfig,
    key_data_of_seed,
)
from jax_moe.tuning.routing_generator import (
    canonical_profile,
    join_profile,
    parse_profile,
    split_profile,
)
from jax_moe.tuning.tactic_table import TacticTable
from jax_moe.tuning.tuner import (
    CellResult,
    SearchConfig,
    build_table,
    cell_key,
    format_summary,
    make_cells,
    results_from_rows,
    search_of_profile,
    timing_rows,
    tune_cells,
    with_choice,
)

# Routings `--evaluate` accepts: each realistic routing, from rank 0 or the busiest rank.
_EVALUATION_ROUTINGS = REALISTIC_ROUTINGS + tuple(r + BUSIEST_RANK for r in REALISTIC_ROUTINGS)

__all__ = [
    "FLAGS",
    "TuneConfig",
    "TuneOutcome",
    "config_from_flags",
    "main",
    "plot_results",
    "run",
    "run_cli",
]

FLAGS = flags.FlagValues()

_MODEL = flags.DEFINE_list(
    "model", [], f"Model presets to tune: {', '.join(models.PRESETS)}.", flag_values=FLAGS
)
_HIDDEN = flags.DEFINE_integer("hidden", None, "Explicit shape: hidden size.", flag_values=FLAGS)
_INTERMEDIATE = flags.DEFINE_integer(
    "intermediate", None, "Explicit shape: expert intermediate size.", flag_values=FLAGS
)
_NUM_EXPERTS = flags.DEFINE_integer(
    "num_experts", None, "Explicit shape: number of experts.", flag_values=FLAGS
)
_TOP_K = flags.DEFINE_integer(
    "top_k", None, "Explicit shape: experts per token.", flag_values=FLAGS
)
_EP = flags.DEFINE_list(
    "ep", ["1"], "Expert-parallel sizes (rank 0's slice is tuned).", flag_values=FLAGS
)
_MAX_TOKENS = flags.DEFINE_integer(
    "max_tokens", DEFAULT_MAX_TOKENS, "Largest token bucket (a power of two).", flag_values=FLAGS
)
_DISTRIBUTION = flags.DEFINE_string(
    "distribution",
    "balanced/spread+busy",
    "Profiling routing: balanced, spread, busy, uniform or zipf:S; several joined by '+' "
    "(balanced+spread) choose the pair with the smallest worst-case slowdown over them "
    "(the first is the primary routing; see docs/TUNING.md); with '/' after the first "
    "(balanced/spread+busy) it only picks the candidates and the others are scored. With "
    "--analyze_out: choose under this scoring of the timings' routings.",
    flag_values=FLAGS,
)
_SEED = flags.DEFINE_integer(
    "seed", 0, "Seed of the profiling inputs' jax.random key.", flag_values=FLAGS
)
_OUT = flags.DEFINE_string("out", "tactics.json", "Tactic file to write.", flag_values=FLAGS)
_MERGE = flags.DEFINE_bool(
    "merge",
    False,
    "Merge into an existing --out file (tuned cells replace theirs).",
    flag_values=FLAGS,
)
_EVALUATE = flags.DEFINE_string(
    "evaluate",
    None,
    "Evaluate this tactic file (regret, reproducibility) instead of tuning; with --model "
    "or --ep, only the table's cells of those shapes or expert-parallel sizes.",
    flag_values=FLAGS,
)
_EVALUATE_ROUTINGS = flags.DEFINE_list(
    "evaluate_routings",
    ["softmax", "skewed"],
    "Routings of --evaluate: softmax, skewed, each optionally with @busiest (the busiest "
    "expert-parallel rank's slice instead of rank 0's).",
    flag_values=FLAGS,
)
_EVALUATE_REPEAT = flags.DEFINE_bool(
    "evaluate_repeat",
    True,
    "With --evaluate: also tune the table's cells again and count identical choices "
    "(--noevaluate_repeat measures the regret only).",
    flag_values=FLAGS,
)
_EVALUATE_SEED = flags.DEFINE_integer(
    "evaluate_seed",
    None,
    "With --evaluate: seed of the key the regret passes draw their inputs and routings "
    "from (default: the table's own key); the repeated tuning keeps the table's key.",
    flag_values=FLAGS,
)
_EVALUATE_ALSO = flags.DEFINE_list(
    "evaluate_also",
    [],
    "With --evaluate: more tactic files whose regret is computed from the same timings "
    "(compares tables without run-to-run noise).",
    flag_values=FLAGS,
)
_RESUME = flags.DEFINE_bool(
    "resume",
    False,
    "With --timings_out: read that file if it exists and do not measure again the cells "
    "it already holds (a tuning or evaluation stopped earlier continues where it was).",
    flag_values=FLAGS,
)
_ANALYZE = flags.DEFINE_string(
    "analyze",
    None,
    "Instead of tuning: read a --timings_out file and print, per cell and routing, the "
    "regret of the default heuristic and of each --evaluate_also table (no GPU needed).",
    flag_values=FLAGS,
)
_ANALYZE_OUT = flags.DEFINE_string(
    "analyze_out",
    None,
    "With --analyze on a tuning's timings: choose every cell's pair again with the current "
    "search settings (--tie_tolerance; --distribution, if given, for the scoring of the "
    "timings' routings) and write the tactic file here (--merge merges).",
    flag_values=FLAGS,
)
_TIMINGS_OUT = flags.DEFINE_string(
    "timings_out",
    None,
    "Also write every timing of the run (tuning or --evaluate) to this JSON file, one row "
    "per (cell, routing, op, tactic), for analysis without a GPU.",
    flag_values=FLAGS,
)
_PLOT = flags.DEFINE_string(
    "plot",
    None,
    "Write a PNG of latency vs num_tokens per tactic (needs matplotlib).",
    flag_values=FLAGS,
)
_COLD_L2 = flags.DEFINE_bool(
    "cold_l2", False, "Rotate weight copies larger than the L2.", flag_values=FLAGS
)
_REPS = flags.DEFINE_integer(
    "reps",
    20,
    "Launches per timed scan, at most (fewer for long launches, see --min_scan_us).",
    flag_values=FLAGS,
)
_MIN_SCAN_US = flags.DEFINE_float(
    "min_scan_us",
    2000.0,
    "Lower --reps for long launches so that a timed scan lasts about this long by a "
    "roofline estimate (at least 3 launches; 0: always --reps).",
    flag_values=FLAGS,
)
_TIMER = flags.DEFINE_enum(
    "timer",
    "events",
    ["events", "wall"],
    "events: device time between CUDA events around each timed scan; wall: host time.",
    flag_values=FLAGS,
)
_UNROLL = flags.DEFINE_bool(
    "unroll",
    True,
    "Unroll each timed scan into straight-line launches (--nounroll: a device loop, "
    "whose per-iteration dispatch can dominate launches of a few microseconds).",
    flag_values=FLAGS,
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed scans per tactic (median).", flag_values=FLAGS)
_COMPILE_THREADS = flags.DEFINE_integer(
    "compile_threads",
    16,
    "Threads compiling a cell's candidates and building its inputs (capped at the CPU count).",
    flag_values=FLAGS,
)
_TIE_TOLERANCE = flags.DEFINE_float(
    "tie_tolerance",
    0.0,
    "Relative time difference treated as a tie (the first in variant order wins); 0: the "
    "plain minimum.",
    flag_values=FLAGS,
)
_SCREEN = flags.DEFINE_float(
    "screen",
    0.0,
    "Screen candidates with one timed scan first and time fully only those within "
    "1 + screen of the fastest of their op (0: time every candidate fully).",
    flag_values=FLAGS,
)

_ALL_VARIANTS = flags.DEFINE_bool(
    "all_variants",
    False,
    "Time every exported variant, not only those of the default search (which leaves out "
    "the 2 x 2 warp grids, the unsplit mma.sync tiles of 32 rows or more and the "
    "experimental wgmma overlap variants; an evaluation times every variant but these "
    "last ones, and them too with this flag).",
    flag_values=FLAGS,
)


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """One run of the tool.

    Attributes:
      models: layer shapes to tune.
      eps: expert-parallel sizes.
      max_tokens: largest token bucket (<= DEFAULT_MAX_TOKENS, which lookup caps at).
      distribution: profiling routing, `str(RoutingDistribution)`, or a profile of
        several joined by `+` (`balanced+spread`): the first is the cells' routing,
        the others become `search.secondary` (which must then be empty here); a
        `/` after the first (`balanced/spread+busy`) sets `search.score_primary`
        False (`jax_moe.tuning.routing_generator.parse_profile`), which must then be
        True here.
      seed: seed of the inputs' key.
      out: the tactic file written.
      merge: merge into an existing `out` instead of replacing it.
      evaluate: evaluate this tactic file instead of tuning.
      evaluate_routings: the routings of the evaluation (`softmax`, `skewed`, each
        optionally with the suffix `@busiest`).
      evaluate_repeat: the evaluation also tunes the cells again (reproducibility).
      evaluate_also: more tactic files compared on the evaluation's timings.
      evaluate_seed: seed of the regret passes' key (None: the table's key).
      evaluate_eps: the expert-parallel sizes whose cells are evaluated (empty: all; the
        evaluated shapes are `models`, empty: all).
      timings_out: JSON file that receives every timing of the run (`timing_rows`).
      resume: read `timings_out` first (if it exists) and reuse the cells it holds.
      analyze: a `timings_out` file to analyze instead of tuning (no GPU needed).
      analyze_out: with `analyze` on a tuning's timings, the tactic file of the pairs
        chosen again from them with `search` (merged into it with `merge`).
      analyze_profile: with `analyze_out`, the profile to choose under: the routings of
        the timings' profile in any order, scored as this text says (`balanced/spread+busy`
        for timings tuned with `balanced+spread+busy`, or the reverse); None: the
        timings' own profile (`--distribution` given with `--analyze_out`).
      plot: PNG written after tuning.
      timing: profiler settings.
      search: choice settings.
    """

    models: tuple[models.MoEConfig, ...] = ()
    eps: tuple[int, ...] = (1,)
    max_tokens: int = DEFAULT_MAX_TOKENS
    distribution: str = "balanced/spread+busy"
    seed: int = 0
    out: str = "tactics.json"
    merge: bool = False
    evaluate: str | None = None
    evaluate_routings: tuple[str, ...] = ("softmax", "skewed")
    evaluate_repeat: bool = True
    evaluate_also: tuple[str, ...] = ()
    evaluate_seed: int | None = None
    evaluate_eps: tuple[int, ...] = ()
    timings_out: str | None = None
    resume: bool = False
    analyze: str | None = None
    analyze_out: str | None = None
    analyze_profile: str | None = None
    plot: str | None = None
    timing: TimingConfig = TimingConfig()
    search: SearchConfig = SearchConfig()

    def __post_init__(self) -> None:
        primary, secondary, _ = parse_profile(self.distribution)
        object.__setattr__(self, "distribution", canonical_profile(self.distribution))
        if self.search.secondary:
            raise ValueError(
                f"search.secondary={self.search.secondary!r}; give secondary routings in "
                f"distribution instead (e.g. '{primary}+spread')"
            )
        if not self.search.score_primary:
            raise ValueError(
                "search.score_primary=False; write the profile with '/' in distribution "
                f"instead (e.g. '{primary}/spread+busy')"
            )
        if self.evaluate is None and self.analyze is None and not self.models:
            raise ValueError(
                "no model to tune: give --model or --hidden/--intermediate/--num_experts/--top_k"
            )
        if not self.eps or any(
            isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in self.eps
        ):
            raise ValueError(f"eps={self.eps!r}; expected positive ints")
        for ep in self.eps:
            if self.models and all(model.num_experts % ep for model in self.models):
                experts = ", ".join(f"{m.num_experts} of {m.name}" for m in self.models)
                raise ValueError(f"--ep={ep} does not divide num_experts ({experts})")
        mt = self.max_tokens
        if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1 or mt & (mt - 1):
            raise ValueError(f"max_tokens={mt!r}; expected a power of two >= 1")
        if mt > DEFAULT_MAX_TOKENS:
            raise ValueError(
                f"max_tokens={mt}; at most {DEFAULT_MAX_TOKENS}, the largest bucket that "
                "fused_moe looks up (larger batches use that bucket)"
            )
        key_data_of_seed(self.seed)  # Validates the seed.
        if self.analyze_out is not None and self.analyze is None:
            raise ValueError("--analyze_out needs --analyze")
        if self.analyze_profile is not None:
            if self.analyze_out is None:
                raise ValueError(
                    "analyze_profile (--distribution with --analyze) needs --analyze_out"
                )
            object.__setattr__(self, "analyze_profile", canonical_profile(self.analyze_profile))
        if self.analyze_out is not None and os.path.abspath(self.analyze_out) == os.path.abspath(
            self.analyze
        ):
            raise ValueError("--analyze_out would overwrite the --analyze timings file")
        if self.evaluate is not None and self.analyze is not None:
            raise ValueError("give --evaluate or --analyze, not both")
        if self.evaluate is None and self.analyze is None and self.evaluate_also:
            raise ValueError("--evaluate_also needs --evaluate or --analyze")
        if self.resume and (self.timings_out is None or self.analyze is not None):
            raise ValueError("--resume needs --timings_out (and tuning or --evaluate)")
        if self.evaluate is None and not self.evaluate_repeat:
            raise ValueError("--noevaluate_repeat needs --evaluate")
        if self.evaluate_seed is not None:
            if self.evaluate is None:
                raise ValueError("--evaluate_seed needs --evaluate")
            key_data_of_seed(self.evaluate_seed)  # Validates the seed.
        routings = self.evaluate_routings
        if not routings or any(r not in _EVALUATION_ROUTINGS for r in routings):
            raise ValueError(
                f"evaluate_routings={routings!r}; expected some of {_EVALUATION_ROUTINGS}"
            )


@dataclasses.dataclass(frozen=True)
class TuneOutcome:
    """What `run` did: the cell results and the table written, or the evaluation."""

    results: tuple[CellResult, ...] = ()
    table: TacticTable | None = None
    report: Any = None


def _models_from_flags() -> tuple[models.MoEConfig, ...]:
    chosen = [models.get_preset(name.strip()) for name in _MODEL.value if name.strip()]
    explicit = {
        "hidden": _HIDDEN.value,
        "intermediate": _INTERMEDIATE.value,
        "num_experts": _NUM_EXPERTS.value,
        "top_k": _TOP_K.value,
    }
    given = [name for name, value in explicit.items() if value is not None]
    if given and len(given) != len(explicit):
        missing = sorted(set(explicit) - set(given))
        raise app.UsageError(
            f"explicit shape flags need all four; missing --{', --'.join(missing)}"
        )
    if given:
        name = "E{num_experts}k{top_k}H{hidden}I{intermediate}".format(**explicit)
        chosen.append(models.MoEConfig(name=name, **explicit))
    return tuple(chosen)


def config_from_flags() -> TuneConfig:
    """The `TuneConfig` of the parsed `FLAGS`; app.UsageError for bad values."""
    try:
        eps = tuple(int(e) for e in _EP.value)
    except ValueError:
        raise app.UsageError(f"--ep={','.join(_EP.value)}; expected integers") from None
    try:
        return TuneConfig(
            models=_models_from_flags(),
            eps=eps,
            max_tokens=_MAX_TOKENS.value,
            distribution=_DISTRIBUTION.value,
            seed=_SEED.value,
            out=_OUT.value,
            merge=_MERGE.value,
            evaluate=_EVALUATE.value,
            evaluate_routings=tuple(r.strip() for r in _EVALUATE_ROUTINGS.value),
            evaluate_repeat=_EVALUATE_REPEAT.value,
            evaluate_also=tuple(p.strip() for p in _EVALUATE_ALSO.value if p.strip()),
            evaluate_seed=_EVALUATE_SEED.value,
            evaluate_eps=eps if FLAGS["ep"].present else (),
            timings_out=_TIMINGS_OUT.value,
            resume=_RESUME.value,
            analyze=_ANALYZE.value,
            analyze_out=_ANALYZE_OUT.value,
            analyze_profile=(
                _DISTRIBUTION.value
                if FLAGS["distribution"].present and _ANALYZE.value is not None
                else None
            ),
            plot=_PLOT.value,
            timing=TimingConfig(
                reps=_REPS.value,
                repeats=_REPEATS.value,
                cold_l2=_COLD_L2.value,
                timer=_TIMER.value,
                min_scan_us=_MIN_SCAN_US.value,
                unroll=_UNROLL.value,
                compile_threads=_COMPILE_THREADS.value,
            ),
            search=SearchConfig(
                tie_tolerance=_TIE_TOLERANCE.value,
                screen=_SCREEN.value,
                all_variants=_ALL_VARIANTS.value,
                experimental=_ALL_VARIANTS.value,
            ),
        )
    except (TypeError, ValueError) as error:
        raise app.UsageError(str(error)) from error


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError(
            "--plot needs matplotlib, which is not installed (pip install matplotlib); "
            "run without --plot or install it"
        ) from error
    return plt


def plot_results(results: Sequence[CellResult], path: str | os.PathLike) -> None:
    """A PNG of latency vs num_tokens per tactic; the chosen tactic of each cell is marked.

    One row of panels per (model, EP), one column per op. Raises RuntimeError if
    matplotlib is not installed.
    """
    plt = _pyplot()
    groups: dict[tuple[str, int], list[CellResult]] = {}
    for r in results:
        groups.setdefault((r.cell.model.name, r.cell.ep), []).append(r)
    fig, axes = plt.subplots(
        len(groups), len(OPS), figsize=(7 * len(OPS), 4 * len(groups)), squeeze=False
    )
    for row, ((name, ep), cells) in enumerate(groups.items()):
        for col, op in enumerate(OPS):
            ax = axes[row][col]
            series: dict[str, list[tuple[int, float]]] = {}
            for r in cells:
                for tactic, us in r.times(op).items():
                    series.setdefault(str(tactic), []).append((r.cell.num_tokens, us))
            for label, points in series.items():
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, ys, linewidth=0.8, alpha=0.6, label=label.split("[", 1)[-1][:-1])
            chosen = [
                (r.cell.num_tokens, (r.choice.gemm1 if col == 0 else r.choice.gemm2).time_us)
                for r in cells
                if r.choice is not None
            ]
            if chosen:
                xs, ys = zip(*chosen, strict=True)
                ax.plot(xs, ys, "k*", markersize=9, label="chosen")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("num_tokens")
            ax.set_ylabel("us per launch")
            ax.set_title(f"{name} EP={ep} {op}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=120)
    plt.close(fig)


def _write_timings(
    config: TuneConfig,
    profiler: Profiler,
    results: Sequence[CellResult],
    run: Mapping[str, Any],
    stream: TextIO | None = None,
) -> None:
    """Writes `--timings_out` (if given): the device, the run (`_run_of`) and every
    timing of `results`.

    The file is replaced atomically (a temporary file beside it, synced, then
    renamed), so a run stopped while writing leaves the previous complete file.
    """
    if config.timings_out is None:
        return
    rows = timing_rows(results)
    data = {
        "format": "jax_moe.timings",
        "device_name": profiler.device_name,
        "arch": profiler.arch,
        "run": run,
        "rows": rows,
    }
    path = os.path.abspath(config.timings_out)
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise
    if stream is not None:
        stream.write(f"wrote {len(rows)} timings to {config.timings_out}\n")


def _digest(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()[:16]


def _run_of(config: TuneConfig) -> dict[str, Any]:
    """What a timings file's rows depend on besides their cells, which `--resume`
    checks: tuning (with which profile) or the evaluation of which table (its
    content), the search settings that pick the candidates, the timing settings, and
    the exported kernel variants."""
    from jax_moe.tuning.profiler import OPS
    from jax_moe.tuning.tuner import exported_variants

    table = None
    if config.evaluate is not None:
        with open(config.evaluate, "rb") as f:
            table = _digest(f.read())
    search = dataclasses.asdict(config.search)
    del search["tie_tolerance"], search["score_primary"]  # the choice only, not the timings
    timing = dataclasses.asdict(config.timing)
    del timing["compile_threads"]  # how fast, not what is timed
    return {
        "evaluate": table,
        "distribution": None if config.evaluate is not None else config.distribution,
        "search": search,
        "timing": timing,
        "variants": _digest("\n".join(str(t) for op in OPS for t in exported_variants(op))),
    }


def _read_timings(path: str, flag: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{flag}={path}: cannot read it: {error}") from None
    if not isinstance(data, dict) or data.get("format") != "jax_moe.timings":
        raise ValueError(f"{flag}={path}: not a timings file (--timings_out)")
    return data


def _saved_results(
    config: TuneConfig, profiler: Profiler, stream: TextIO
) -> dict[tuple[Any, ...], CellResult]:
    """With `--resume`: the cells of an existing `--timings_out` file, by `cell_key`."""
    if not config.resume or not os.path.exists(config.timings_out):
        return {}
    data = _read_timings(config.timings_out, "--timings_out")
    device, arch = data.get("device_name"), data.get("arch")
    if (device, arch) != (profiler.device_name, profiler.arch):
        raise ValueError(
            f"--resume: {config.timings_out} holds timings of {device} ({arch}), "
            f"not of this {profiler.device_name} ({profiler.arch})"
        )
    run = json.loads(json.dumps(_run_of(config)))  # as read back from JSON
    written = data.get("run")
    if isinstance(written, dict) and isinstance(written.get("timing"), dict):
        # Files written before the thread count was left out of the record.
        timing = {k: v for k, v in written["timing"].items() if k != "compile_threads"}
        written = {**written, "timing": timing}
    if _timed_part(written) != _timed_part(run):
        raise ValueError(
            f"--resume: {config.timings_out} was not written by this kind of run "
            f"(it has {data.get('run')!r}, this run {run!r}); give a new --timings_out"
        )
    saved = {cell_key(r.cell): r for r in results_from_rows(data.get("rows", []))}
    stream.write(f"resuming: {len(saved)} cells already timed in {config.timings_out}\n")
    return saved


def _timed_part(run: Any) -> Any:
    """A `_run_of` record without what only changes the choice: the profile's scoring
    (`balanced/spread+busy` times what `balanced+spread+busy` times)."""
    if not isinstance(run, dict) or not isinstance(run.get("distribution"), str):
        return run
    try:
        timed = join_profile(*split_profile(run["distribution"]))
    except ValueError:
        return run
    return {**run, "distribution": timed}


class _TimingsFile:
    """`--timings_out` kept current: every cell measured so far (and the `saved` cells
    read back for `--resume`) is written after each cell, so an interrupted tuning or
    evaluation keeps them (for `--analyze` or `--resume`)."""

    def __init__(
        self,
        config: TuneConfig,
        profiler: Profiler,
        saved: Mapping[tuple[Any, ...], CellResult],
    ):
        self.config, self.profiler = config, profiler
        self.run = _run_of(config)  # once: it reads the evaluated table
        self.done: dict[tuple[Any, ...], CellResult] = dict(saved)

    def add(self, result: CellResult) -> None:
        self.done[cell_key(result.cell)] = result
        self.write()

    def write(self, stream: TextIO | None = None) -> None:
        _write_timings(self.config, self.profiler, list(self.done.values()), self.run, stream)


def _analyze(config: TuneConfig, stream: TextIO) -> TuneOutcome:
    from jax_moe.tuning.evaluate import analyze_timings

    data = _read_timings(config.analyze, "--analyze")
    device, arch = data.get("device_name"), data.get("arch")
    results = results_from_rows(data.get("rows", []))
    tables = tuple(
        (path, TacticTable.load(path, expect_device=device, expect_arch=arch))
        for path in config.evaluate_also
    )
    stream.write(f"timings of {device} ({arch}): {len(results)} cells\n")
    stream.write(analyze_timings(results, tables) + "\n")
    if config.analyze_out is None:
        return TuneOutcome(results=tuple(results))
    profile = _profile_of(data, results, config.analyze)
    if config.analyze_profile is not None:
        wanted, tuned = parse_profile(config.analyze_profile), parse_profile(profile)
        if (wanted[0], set(wanted[1])) != (tuned[0], set(tuned[1])):
            raise ValueError(
                f"--distribution={config.analyze_profile} names other routings than the "
                f"profile {profile!r} of {config.analyze}: --analyze_out can only score the "
                "same routings another way"
            )
        profile = join_profile(tuned[0], tuned[1], wanted[2])
    search = search_of_profile(config.search, profile)
    results = [with_choice(result, search) for result in results]
    table = build_table(
        results,
        device_name=device,
        arch=arch,
        distribution=profile,
        key_data=results[0].cell.key_data,
    )
    _save_table(config, table, config.analyze_out, stream)
    stream.write(format_summary(results) + "\n")
    stream.write(
        f"wrote {len(table)} entries to {config.analyze_out} (pairs chosen again from "
        f"{config.analyze}, profile {profile}, tie_tolerance {config.search.tie_tolerance:g})\n"
    )
    return TuneOutcome(table=table, results=tuple(results))


def _save_table(config: TuneConfig, table: TacticTable, path: str, stream: TextIO) -> TacticTable:
    """Writes `table` to `path` (merged into the file there with `config.merge`); returns
    what was written."""
    if config.merge and os.path.exists(path):
        meta = table.metadata
        existing = TacticTable.load(path, expect_device=meta.device_name, expect_arch=meta.arch)
        try:
            table = existing.merge(table, on_conflict="replace")
        except ValueError as error:
            raise ValueError(f"cannot --merge into {path}: {error}") from error
        stream.write(f"merged into {path} ({len(existing)} entries before)\n")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    table.save(path)
    return table


def _profile_of(data: Mapping[str, Any], results: Sequence[CellResult], path: str) -> str:
    """The profile (`balanced+spread`) under which the timings file `data` (read from
    `path`, with its `results`) was tuned; ValueError for an evaluation's timings, an
    empty file, or cells of several primary routings or keys."""
    run = data.get("run") or {}
    if run.get("evaluate") is not None:
        raise ValueError(f"--analyze_out: {path} holds an evaluation's timings, not a tuning's")
    if not results:
        raise ValueError(f"--analyze_out: {path} holds no cells")
    cells = {(r.cell.routing, r.cell.key_data) for r in results}
    if len(cells) != 1:
        raise ValueError(
            f"--analyze_out: the cells of {path} were tuned under several routings or keys "
            f"({sorted(cells)}); a tactic file has one"
        )
    ((primary, _),) = cells
    # The run's profile as written; the cells' routings for a file without one.
    profile = run.get("distribution")
    if profile is None:
        secondary = dict.fromkeys(r for result in results for r in result.secondary)
        profile = join_profile(primary, tuple(secondary))
    try:
        if parse_profile(profile)[0] != primary:
            raise ValueError(f"its cells' routing is {primary!r}")
    except ValueError as error:
        raise ValueError(
            f"--analyze_out: {path} is not a tuning's timings (profile {profile!r}: {error})"
        ) from None
    return profile


def _default_profiler(config: TuneConfig) -> Profiler:
    from jax_moe.tuning.profiler import GpuProfiler

    return GpuProfiler(config.timing)


def _evaluate(config: TuneConfig, profiler: Profiler, stream: TextIO) -> TuneOutcome:
    from jax_moe.tuning.evaluate import EvaluationConfig, evaluate_table, format_report

    table = TacticTable.load(
        config.evaluate, expect_device=profiler.device_name, expect_arch=profiler.arch
    )
    others = tuple(
        (
            path,
            TacticTable.load(path, expect_device=profiler.device_name, expect_arch=profiler.arch),
        )
        for path in config.evaluate_also
    )
    evaluation = EvaluationConfig(
        routings=config.evaluate_routings,
        repeat_tuning=config.evaluate_repeat,
        search=config.search,
        others=others,
        key_data=None if config.evaluate_seed is None else key_data_of_seed(config.evaluate_seed),
        models=config.models,
        eps=config.evaluate_eps,
    )
    if config.evaluate_seed is not None:
        stream.write(f"regret routings and inputs drawn with seed {config.evaluate_seed}\n")
    saved = _saved_results(config, profiler, stream)
    timings = _TimingsFile(config, profiler, saved) if config.timings_out else None
    report = evaluate_table(
        profiler, table, evaluation, stream, timings.add if timings else None, saved
    )
    stream.write(format_report(report, others=tuple(name for name, _ in others)) + "\n")
    if timings is not None:
        timings.write(stream)
    return TuneOutcome(table=table, report=report)


def run(
    config: TuneConfig,
    profiler: Profiler | None = None,
    stream: TextIO | None = None,
) -> TuneOutcome:
    """Tunes (or evaluates) as `config` says; progress and tables go to `stream` (stdout).

    `profiler` defaults to `GpuProfiler(config.timing)` (NotImplementedError
    without a GPU).
    """
    stream = stream if stream is not None else sys.stdout
    if config.analyze is not None:
        return _analyze(config, stream)
    if config.plot is not None:
        _pyplot()  # Fail before hours of tuning, not after.
    if profiler is None:
        profiler = _default_profiler(config)
    stream.write(f"device: {profiler.device_name} ({profiler.arch})\n")
    if config.evaluate is not None:
        return _evaluate(config, profiler, stream)
    key_data = key_data_of_seed(config.seed)
    primary = parse_profile(config.distribution)[0]
    search = search_of_profile(config.search, config.distribution)
    cells = []
    for model in config.models:
        eps = [ep for ep in config.eps if model.num_experts % ep == 0]
        for ep in sorted(set(config.eps) - set(eps)):
            stream.write(f"skipping {model.name} EP={ep}: {model.num_experts} experts\n")
        cells += make_cells(
            [model],
            eps,
            config.max_tokens,
            arch=profiler.arch,
            routing=primary,
            key_data=key_data,
        )
    stream.write(
        f"tuning {len(cells)} cells ({len(config.models)} models x {len(config.eps)} EP sizes "
        f"x buckets up to {config.max_tokens}), routing {config.distribution}, "
        f"seed {config.seed}\n"
    )
    stream.flush()
    saved = _saved_results(config, profiler, stream)
    timings = _TimingsFile(config, profiler, saved) if config.timings_out else None
    results = tuple(
        tune_cells(profiler, cells, search, stream, timings.add if timings else None, saved)
    )
    table = build_table(
        results,
        device_name=profiler.device_name,
        arch=profiler.arch,
        distribution=config.distribution,
        key_data=key_data,
    )
    table = _save_table(config, table, config.out, stream)
    stream.write(format_summary(results) + "\n")
    spent = sum(r.seconds for r in results)
    prepared = sum(r.prepare_seconds for r in results)
    stream.write(
        f"{spent:.0f} s in cells: {prepared:.0f} s compiling and building inputs, "
        f"{spent - prepared:.0f} s timing\n"
    )
    failures = sum(len(r.failures()) for r in results)
    stream.write(f"wrote {len(table)} entries to {config.out}; {failures} tactic failures\n")
    if timings is not None:
        timings.write(stream)
    if config.plot is not None:
        plot_results(results, config.plot)
        stream.write(f"wrote {config.plot}\n")
    return TuneOutcome(results=results, table=table)


def run_cli(
    argv: Sequence[str], profiler: Profiler | None = None, stream: TextIO | None = None
) -> TuneOutcome:
    """Parses `argv` (`argv[0]` is the program name) into `FLAGS`, then `run`."""
    FLAGS.unparse_flags()
    try:
        rest = FLAGS(list(argv))
    except flags.Error as error:
        raise app.UsageError(str(error)) from error
    if len(rest) > 1:
        raise app.UsageError(f"unexpected arguments {rest[1:]}")
    return run(config_from_flags(), profiler, stream)


def main(argv: Sequence[str]) -> None:
    """The absl entry point (flags already parsed by `app.run`)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}")
    FLAGS.mark_as_parsed()
    try:
        run(config_from_flags())
    except (NotImplementedError, RuntimeError, ValueError) as error:
        sys.exit(f"jax_moe.tune: {error}")


def _adopt_flags() -> None:
    """Adds `FLAGS` to absl's global flags (parsed and listed in --help by app.run)."""
    flags.FLAGS.append_flag_values(FLAGS)
    for name in FLAGS:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])


if __name__ == "__main__":
    _adopt_flags()
    app.run(main)
