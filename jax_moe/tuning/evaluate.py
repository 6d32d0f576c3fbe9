"""How good is a tuned table: regret under realistic routing, and reproducibility.

`evaluate_table(profiler, table, config)`:

Regret. For every tuned cell of the table (a `moe_gemm1` entry and the
`moe_gemm2` entry of the same problem) and every routing of
`config.routings` (by default `softmax`: the top-k of a softmax of random
logits, and `skewed`: the same with a few hot experts; each also as
`softmax@busiest` / `skewed@busiest`, the slice of the expert-parallel rank
that receives the most slots instead of rank 0's; see
`jax_moe.tuning.profiler`), every valid exported tactic of both ops is timed
again on that routing's inputs. With

    best  = fastest GEMM1 + fastest GEMM2    (any pair runs: jax_moe.tuning.tuner)
    tuned = time(tuned GEMM1) + time(tuned GEMM2)          (same run)

the regret of the cell is `tuned / best - 1` (0 when the tuned pair is the
fastest). Other tables (`EvaluationConfig.others`, `--evaluate_also`) get their
regret from the same timings, so two tables are compared without run-to-run
noise. The report gives it per cell and its mean and maximum, per routing and
over all; the regret of the default heuristic pair is shown beside it. A cell
whose tuned tactics fail now counts as a failure, not a number.

Reproducibility. The table's cells are tuned again with the table's own
distribution and profile key (`TableMetadata.distribution`, `profile_key`;
a profile such as `balanced+spread` also brings back its secondary routings
and robust choice), and the report counts the cells whose new (GEMM1, GEMM2)
pair equals the table's.

Targets (`TARGETS`): mean regret <= 2 %, max regret <= 5 %, the same pair in
>= 95 % of the cells.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from jax_moe import models
from jax_moe.tactic import Tactic
from jax_moe.tuning.problem import ProblemKey
from jax_moe.tuning.profiler import (
    GEMM1_OP,
    GEMM2_OP,
    REALISTIC_ROUTINGS,
    Profiler,
    TuneCell,
)
from jax_moe.tuning.routing_generator import split_profile
from jax_moe.tuning.tactic_table import TacticTable
from jax_moe.tuning.tuner import (
    CellResult,
    SearchConfig,
    choose_pair,
    default_pair,
    search_of_profile,
    tune_cells,
)

__all__ = [
    "TARGETS",
    "CellRegret",
    "analyze_timings",
    "EvaluationConfig",
    "EvaluationReport",
    "Reproducibility",
    "Targets",
    "evaluate_table",
    "format_report",
    "regret_of",
    "table_cells",
]


@dataclasses.dataclass(frozen=True)
class Targets:
    """Acceptance thresholds of a tuned table."""

    mean_regret: float = 0.02
    max_regret: float = 0.05
    same_fraction: float = 0.95


TARGETS = Targets()


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """What `evaluate_table` does.

    Attributes:
      routings: routings of the regret measurement (see the module docstring).
      repeat_tuning: also tune the cells again and count identical choices.
      search: how the repeated tuning chooses (as in the original run).
      others: `(name, table)` pairs whose regret is computed from the same timings
        (cells they do not cover count as not measurable).
      key_data: the `jax.random` key data of the regret passes' inputs and routings;
        None (default): the table's profile key. Another key evaluates the table on a
        sample it was not tuned on (the repeated tuning always uses the table's key).
      models: evaluate only the cells of these layer shapes (empty: every shape the
        table holds); a model matches by shape, not by name.
      eps: evaluate only the cells of these expert-parallel sizes (empty: all).
    """

    routings: tuple[str, ...] = REALISTIC_ROUTINGS
    repeat_tuning: bool = True
    search: SearchConfig = SearchConfig()
    others: tuple[tuple[str, TacticTable], ...] = ()
    key_data: tuple[int, ...] | None = None
    models: tuple[models.MoEConfig, ...] = ()
    eps: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class CellRegret:
    """The regret of one cell under one routing.

    Attributes:
      cell: the cell (its `routing` is the evaluated routing).
      tuned: the table's (GEMM1, GEMM2).
      tuned_us: their time now, None if either failed.
      best: the fastest pair now, None if no pair ran.
      best_us: its time.
      regret: `tuned_us / best_us - 1`, None if not measurable.
      default_regret: the same for the default heuristic pair.
      other_regrets: the same for the pairs of `EvaluationConfig.others`, in order.
    """

    cell: TuneCell
    tuned: tuple[Tactic, Tactic]
    tuned_us: float | None
    best: tuple[Tactic, Tactic] | None
    best_us: float | None
    regret: float | None
    default_regret: float | None
    other_regrets: tuple[float | None, ...] = ()


@dataclasses.dataclass(frozen=True)
class Reproducibility:
    """Cells whose repeated tuning chose the table's pair, of all cells tuned again."""

    same: int
    total: int
    differing: tuple[tuple[TuneCell, tuple[Tactic, Tactic], tuple[Tactic, Tactic] | None], ...]

    @property
    def fraction(self) -> float:
        return self.same / self.total if self.total else 1.0


@dataclasses.dataclass(frozen=True)
class EvaluationReport:
    """Regrets of every (cell, routing), the reproducibility count (or None) and every
    cell result measured on the way (regret passes, then the repeated tuning)."""

    regrets: tuple[CellRegret, ...]
    reproducibility: Reproducibility | None
    results: tuple[CellResult, ...] = ()

    def values(self, routing: str | None = None, other: int | None = None) -> list[float]:
        """The measurable regrets, of one routing or all, of the table or of `others[other]`."""
        out = []
        for r in self.regrets:
            value = r.regret if other is None else r.other_regrets[other]
            if value is not None and (routing is None or r.cell.routing == routing):
                out.append(value)
        return out

    def mean_regret(self, routing: str | None = None, other: int | None = None) -> float:
        values = self.values(routing, other)
        return statistics.fmean(values) if values else math.nan

    def max_regret(self, routing: str | None = None, other: int | None = None) -> float:
        values = self.values(routing, other)
        return max(values) if values else math.nan

    @property
    def failed(self) -> list[CellRegret]:
        return [r for r in self.regrets if r.regret is None]


def _shape(model: models.MoEConfig) -> tuple[int, int, int, int]:
    return (model.num_experts, model.top_k, model.hidden, model.intermediate)


def _model_of(problem: ProblemKey) -> models.MoEConfig:
    shape = (problem.num_experts, problem.top_k, problem.hidden, problem.intermediate)
    for preset in models.PRESETS.values():
        if _shape(preset) == shape:
            return preset
    return models.MoEConfig(
        name=f"E{problem.num_experts}k{problem.top_k}H{problem.hidden}I{problem.intermediate}",
        num_experts=problem.num_experts,
        top_k=problem.top_k,
        hidden=problem.hidden,
        intermediate=problem.intermediate,
    )


def _selected(cells: list, config: EvaluationConfig) -> list:
    """The `table_cells` entries of `config.models` and `config.eps` (empty: all);
    ValueError if a selection leaves none."""
    shapes = {_shape(m) for m in config.models}
    chosen = [
        item
        for item in cells
        if (not shapes or _shape(item[0].model) in shapes)
        and (not config.eps or item[0].ep in config.eps)
    ]
    if cells and not chosen:
        held = sorted({(cell.model.name, cell.ep) for cell, _ in cells})
        wanted = [m.name for m in config.models] or ["any model"]
        raise ValueError(
            f"the table has no cell of {', '.join(wanted)} at EP "
            f"{', '.join(map(str, config.eps)) or 'any'}; it holds (model, EP) "
            f"{', '.join(f'({name}, {ep})' for name, ep in held)}"
        )
    return chosen


def table_cells(
    table: TacticTable, *, routing: str | None = None
) -> list[tuple[TuneCell, tuple[Tactic, Tactic]]]:
    """The tuned cells of `table` and their (GEMM1, GEMM2) tactics.

    A cell needs entries for both ops; `routing` defaults to the table's
    distribution (the primary routing of its profile) and the cells carry the
    table's profile key.
    """
    metadata = table.metadata
    if metadata is None:
        return []
    routing = split_profile(metadata.distribution)[0] if routing is None else routing
    out = []
    for problem in table.entries:
        if problem.op != GEMM1_OP:
            continue
        partner = dataclasses.replace(problem, op=GEMM2_OP)
        if partner not in table.entries:
            continue
        cell = TuneCell(
            _model_of(problem),
            problem.num_experts // problem.num_local_experts,
            problem.token_bucket,
            problem.arch,
            routing,
            metadata.profile_key,
            problem.activation_dtype,
        )
        out.append((cell, (table.entries[problem].tactic, table.entries[partner].tactic)))
    return sorted(out, key=lambda item: (item[0].model.name, item[0].ep, item[0].num_tokens))


def _pair_in(table: TacticTable, cell: TuneCell) -> tuple[Tactic, Tactic] | None:
    """`table`'s (GEMM1, GEMM2) for `cell`'s problem, None unless it has both."""
    entries = [table.entries.get(cell.problem_key(op)) for op in (GEMM1_OP, GEMM2_OP)]
    if None in entries:
        return None
    return entries[0].tactic, entries[1].tactic


def regret_of(
    result: CellResult,
    tuned: tuple[Tactic, Tactic],
    others: tuple[tuple[Tactic, Tactic] | None, ...] = (),
) -> CellRegret:
    """The `CellRegret` of `tuned` (and of the `others` pairs) from the timings of one
    cell (plain minimum as best)."""
    best = choose_pair(result.timings, SearchConfig(tie_tolerance=0.0))
    tuned_us = result.pair_us(tuned)
    best_us = None if best is None else best.total_us

    def regret(us: float | None) -> float | None:
        return None if us is None or best_us is None else max(0.0, us / best_us - 1)

    return CellRegret(
        result.cell,
        tuned,
        tuned_us,
        None if best is None else best.tactics,
        best_us,
        regret(tuned_us),
        regret(result.pair_us(default_pair(result.cell))),
        tuple(None if pair is None else regret(result.pair_us(pair)) for pair in others),
    )


def evaluate_table(
    profiler: Profiler,
    table: TacticTable,
    config: EvaluationConfig | None = None,
    stream: TextIO | None = None,
    on_result: Callable[[CellResult], None] | None = None,
    saved: Mapping[tuple[Any, ...], CellResult] | None = None,
) -> EvaluationReport:
    """Regret and reproducibility of `table` on `profiler`'s device (module docstring).

    `on_result` gets every measured cell as soon as it is measured, and cells in
    `saved` are not measured again (`tune_cells`).
    """
    config = config or EvaluationConfig()
    tuned_cells = _selected(table_cells(table), config)
    regrets, measured = [], []
    # Regret needs every exported variant timed fully under one routing: no screening,
    # no secondary routing, no default-search subset here (only the repeated tuning
    # below searches as the original run did, with the table's secondary routings).
    # Experimental variants only if asked (`search.experimental`).
    full = dataclasses.replace(config.search, screen=0.0, secondary=(), all_variants=True)
    # Cell by cell, every routing in turn: the routings of a cell share its compiled
    # programs (equal launch plans), which are dropped when the next cell's shapes differ.
    key = {} if config.key_data is None else {"key_data": tuple(config.key_data)}
    routings = config.routings
    cells = [
        dataclasses.replace(cell, routing=routing, **key)
        for cell, _ in tuned_cells
        for routing in routings
    ]
    results = tune_cells(profiler, cells, full, stream, on_result, saved)
    measured += results
    for r, _ in enumerate(routings):  # the regrets routing by routing
        for c, (cell, tuned) in enumerate(tuned_cells):
            others = tuple(_pair_in(table, cell) for _, table in config.others)
            regrets.append(regret_of(results[c * len(routings) + r], tuned, others))
    reproducibility = None
    if config.repeat_tuning:
        profile = "balanced" if table.metadata is None else table.metadata.distribution
        search = search_of_profile(config.search, profile)
        results = tune_cells(
            profiler, [c for c, _ in tuned_cells], search, stream, on_result, saved
        )
        measured += results
        same, differing = 0, []
        for result, (cell, tuned) in zip(results, tuned_cells, strict=True):
            again = None if result.choice is None else result.choice.tactics
            if again == tuned:
                same += 1
            else:
                differing.append((cell, tuned, again))
        reproducibility = Reproducibility(same, len(tuned_cells), tuple(differing))
    return EvaluationReport(tuple(regrets), reproducibility, tuple(measured))


def analyze_timings(
    results: Sequence[CellResult], tables: Sequence[tuple[str, TacticTable]] = ()
) -> str:
    """Offline regrets from saved timings (`tune --analyze`, rows of `--timings_out`).

    For every cell and every routing it was timed under: the best pair's time, the
    regret of the default heuristic's pair and of each table's pair for the cell (`-`
    where the table has no entry or the pair was not timed), then their mean and max.
    """
    header = f"{'cell':<40} {'best_us':>10} {'default':>8}" + "".join(
        f" {f'table{i + 1}':>8}" for i in range(len(tables))
    )
    lines = [header, *(f"(table{i + 1}: {name})" for i, (name, _) in enumerate(tables))]
    columns: list[list[float]] = [[] for _ in range(1 + len(tables))]
    for result in results:
        profiles = [(result.cell.routing, result.timings), *result.secondary.items()]
        for routing, timings in profiles:
            cell = dataclasses.replace(result.cell, routing=routing)
            one = CellResult(cell, timings)
            pairs = [default_pair(cell), *(_pair_in(table, cell) for _, table in tables)]
            regret = regret_of(one, pairs[0], tuple(pairs[1:]))
            values = [regret.regret, *regret.other_regrets]
            for column, value in zip(columns, values, strict=True):
                if value is not None:
                    column.append(value)
            best = "-" if regret.best_us is None else f"{regret.best_us:.1f}"
            lines.append(
                f"{str(cell):<40} {best:>10}" + "".join(f" {_percent(v):>8}" for v in values)
            )
    lines.append("")
    for name, column in zip(["default", *(n for n, _ in tables)], columns, strict=True):
        mean = statistics.fmean(column) if column else math.nan
        worst = max(column) if column else math.nan
        lines.append(
            f"regret of {name}: mean {_percent(mean)}, max {_percent(worst)} over "
            f"{len(column)} cells"
        )
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def format_report(
    report: EvaluationReport, targets: Targets = TARGETS, others: tuple[str, ...] = ()
) -> str:
    """The per-cell regrets, their mean and max, reproducibility and the targets;
    `others`: names of `EvaluationConfig.others` (for their columns)."""
    names = list(others)
    lines = [
        f"{'cell':<40} {'tuned_us':>10} {'best_us':>10} {'regret':>8} {'default':>8}"
        + "".join(f" {f'other{i + 1}':>8}" for i in range(len(names))),
        "(default: the regret of the default heuristic pair)",
        *(f"(other{i + 1}: the regret of {name}'s pair)" for i, name in enumerate(names)),
    ]
    for r in report.regrets:
        tuned = "failed" if r.tuned_us is None else f"{r.tuned_us:.1f}"
        best = "-" if r.best_us is None else f"{r.best_us:.1f}"
        lines.append(
            f"{str(r.cell):<40} {tuned:>10} {best:>10} {_percent(r.regret):>8} "
            f"{_percent(r.default_regret):>8}"
            + "".join(f" {_percent(x):>8}" for x in r.other_regrets)
        )
    misses = [r for r in report.regrets if r.regret is not None and r.regret > targets.max_regret]
    if misses:
        lines.append("")
        lines.append(f"cells above {_percent(targets.max_regret)}: the tuned pair and the best one")
        for r in misses:
            tuned = " + ".join(str(t) for t in r.tuned)
            best = " + ".join(str(t) for t in r.best)
            lines.append(f"  {r.cell}: tuned {tuned}; best {best}")
    lines.append("")
    routings = sorted({r.cell.routing for r in report.regrets})
    for routing in [*routings, None]:
        name = "all routings" if routing is None else routing
        lines.append(
            f"regret {name}: mean {_percent(report.mean_regret(routing))}, "
            f"max {_percent(report.max_regret(routing))} over {len(report.values(routing))} cells"
        )
    for i, name in enumerate(names):
        for routing in [*routings, None]:
            label = "all routings" if routing is None else routing
            lines.append(
                f"regret of {name}, {label}: mean {_percent(report.mean_regret(routing, i))}, "
                f"max {_percent(report.max_regret(routing, i))} over "
                f"{len(report.values(routing, i))} cells"
            )
    if report.failed:
        lines.append(f"cells whose tuned tactics failed: {len(report.failed)}")
    mean, worst = report.mean_regret(), report.max_regret()
    verdicts = [
        f"mean regret {_percent(mean)} <= {_percent(targets.mean_regret)}: "
        f"{'PASS' if mean <= targets.mean_regret else 'FAIL'}",
        f"max regret {_percent(worst)} <= {_percent(targets.max_regret)}: "
        f"{'PASS' if worst <= targets.max_regret else 'FAIL'}",
    ]
    rep = report.reproducibility
    if rep is not None:
        lines.append(f"same pair when tuned again: {rep.same}/{rep.total} cells")
        for cell, tuned, again in rep.differing:
            now = "none" if again is None else " + ".join(str(t) for t in again)
            lines.append(f"  {cell}: table {' + '.join(str(t) for t in tuned)}, now {now}")
        verdicts.append(
            f"same pair {_percent(rep.fraction)} >= {_percent(targets.same_fraction)}: "
            f"{'PASS' if rep.fraction >= targets.same_fraction else 'FAIL'}"
        )
    lines.extend(verdicts)
    return "\n".join(lines)
