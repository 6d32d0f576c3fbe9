"""The tactic search: time every valid tactic of each cell, pick a GEMM pair, build a table.

For one cell (`TuneCell`) and each op (`moe_gemm1`, `moe_gemm2`):

1. candidates: the exported variants of the op
   (`jax_moe.kernels.moe_gemm_config.gemm1_variants` / `gemm2_variants`) that
   pass `tactic.check(problem_key)`; the others are listed as rejected with the
   reason;
2. each candidate is timed by the `Profiler`; a `Failure` (or an exception of
   the profiler) is recorded and the tactic skipped.

GEMM1 and GEMM2 share the routing metadata, built for the larger of their
`block_m`s (`jax_moe.gpu`: the one with the smaller row tile runs over the same
padded rows), so any GEMM1 pairs with any GEMM2. `choose_pair` takes the fastest
GEMM1 and the fastest GEMM2. (Each is timed with metadata of its own `block_m`; in
a mixed pair the smaller tile's extra tiles hold only padding and exit at once.)
With a positive `tie_tolerance`, a tactic within it of the fastest counts as tied,
and among tied ones the first in the exported variant order wins; the chosen pair
is then within about `tie_tolerance` of the fastest pair. The default is
0, the plain minimum: on saved timings of repeated H200 tunes (four presets, 60
cells) it reproduced as many cells as any positive tolerance up to 2 % (56 of 60,
against 51 at 0.5 %; 3 % reached 58 at a higher regret, a mean of 2.36 % against
1.41 %), with the lowest regret under realistic routings; a tolerance moves the flip
point to its boundary rather than removing it (docs/TUNING.md).

Robust choice (`SearchConfig.secondary`, a profile such as `balanced+spread`).
The cell's routing is the primary profile; each secondary routing (by default
none) re-times the promising candidates: per op, the tactics within
`1 + secondary_margin` of the op's fastest under the primary routing. Over every
pair of those with a time under every routing, the score of a pair is its worst
normalized time

    score(pair) = max over routings r of  time_r(pair) / min over pairs of time_r

and the pair with the smallest score is chosen (ties within `tie_tolerance` go
to the first in variant order, GEMM1 first). With `score_primary` False (a
profile written `balanced/spread+busy`) the primary routing only picks the
promising candidates and the maximum runs over the secondary routings alone; a
secondary routing skipped because its plan holds the primary's loads (below) is
scored with the primary timings (`scored_secondary`), and when no secondary
routing is left the plain choice under the primary routing stands. A pair that
is fastest under one routing but slow under another loses to one that is close
to the best under both: the balanced plan is a busy rank with evenly filled
experts, the spread plan a typical rank's uneven loads, the busy plan the busiest
rank's total with such unevenness (`jax_moe.tuning.routing_generator`), and a
served batch lies between them; the balanced plan's exactly even loads also favour
tiles that fit them more than any served batch does, hence the default profile
`balanced/spread+busy` (docs/TUNING.md). A secondary planned routing whose plan
holds the same loads as a routing already timed for the cell is skipped
(`_same_plan`): it would repeat the same launches.

`table_entries` writes one `TacticEntry` per op: the chosen tactic, its time and
as runner-up the fastest other timed tactic of the op.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TextIO

from jax_moe.models import MoEConfig
from jax_moe.tactic import Tactic
from jax_moe.tuning.problem import ProblemKey, token_buckets
from jax_moe.tuning.profiler import (
    GEMM1_OP,
    GEMM2_OP,
    OPS,
    Failure,
    Measurement,
    Profiler,
    TuneCell,
    cell_expert_loads,
)
from jax_moe.tuning.routing_generator import (
    PLANNED_KINDS,
    RoutingDistribution,
    join_profile,
    parse_profile,
    planned_expert_loads,
    split_profile,
)
from jax_moe.tuning.tactic_table import TableMetadata, TacticEntry, TacticTable

__all__ = [
    "CellResult",
    "OpChoice",
    "PairChoice",
    "Progress",
    "SearchConfig",
    "build_table",
    "candidates",
    "choose_pair",
    "default_pair",
    "exported_variants",
    "format_summary",
    "choose_robust_pair",
    "join_profile",
    "make_cells",
    "measure_cell",
    "results_from_rows",
    "scored_secondary",
    "search_of_profile",
    "secondary_candidates",
    "split_profile",
    "table_entries",
    "with_choice",
    "timing_rows",
    "tune_cells",
]


def exported_variants(op: str) -> tuple[Tactic, ...]:
    """Every exported tactic of `op`, in variant order."""
    from jax_moe.kernels import moe_gemm_config

    if op == GEMM1_OP:
        return tuple(moe_gemm_config.gemm1_variants())
    if op == GEMM2_OP:
        return tuple(moe_gemm_config.gemm2_variants())
    raise ValueError(f"op={op!r}; expected one of {OPS}")


def candidates(
    op: str, problem: ProblemKey, *, all_variants: bool = False, experimental: bool = False
) -> tuple[tuple[Tactic, ...], tuple[tuple[Tactic, str], ...]]:
    """`(valid, rejected)`: exported tactics of `op` that pass `check(problem)`, and the
    others with the reason. Without `all_variants` (as in `SearchConfig`), tactics
    outside the default search (`moe_gemm_config.searched_by_default`) are rejected too,
    and without `experimental` the experimental variants (`is_experimental`)."""
    from jax_moe.kernels.moe_gemm_config import is_experimental, searched_by_default

    valid, rejected = [], []
    for tactic in exported_variants(op):
        try:
            tactic.check(problem)
        except (ValueError, NotImplementedError) as error:
            rejected.append((tactic, str(error)))
        else:
            if is_experimental(tactic) and not experimental:
                rejected.append((tactic, "experimental (--all_variants times it)"))
            elif all_variants or searched_by_default(tactic):
                valid.append(tactic)
            else:
                rejected.append((tactic, "not in the default search (--all_variants times it)"))
    return tuple(valid), tuple(rejected)


def default_pair(cell: TuneCell) -> tuple[Tactic, Tactic]:
    """The heuristic (GEMM1, GEMM2) tactics `fused_moe` uses without a table for `cell`."""
    from jax_moe.kernels import moe_gemm_config

    m = cell.model
    return tuple(
        moe_gemm_config.default_tactic(
            op,
            cell.num_tokens,
            m.top_k,
            cell.num_local_experts,
            m.hidden,
            m.intermediate,
            num_experts=m.num_experts,
        )
        for op in OPS
    )


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """How a pair is chosen from the timings.

    Attributes:
      tie_tolerance: relative time difference below which two choices count as
        tied (then the variant order decides); 0 picks the plain minimum.
      screen: 0 (default) times every candidate fully. A positive margin first
        times every candidate once with `Profiler.screen` (one scan), then fully
        only those within `1 + screen` of the fastest screened candidate of the
        same op; the others keep their screening measurement. The
        chosen pair is unchanged while one scan's error stays below about half
        the margin (a best tactic read high and a rival read low must still be
        within `1 + screen` of each other).
      secondary: routings (`RoutingDistribution` texts, e.g. `('spread',)`) under
        which the promising candidates are timed again for the robust choice
        (module docstring); empty (default): the plain choice.
      secondary_margin: which candidates are promising (module docstring).
      score_primary: whether the robust choice's score includes the primary
        routing (default) or only the secondary ones (module docstring).
      all_variants: time every exported variant; False (default): only those of the
        default search (`moe_gemm_config.searched_by_default`).
      experimental: also time the experimental variants
        (`moe_gemm_config.is_experimental`; `--all_variants` sets both).
    """

    tie_tolerance: float = 0.0
    screen: float = 0.0
    secondary: tuple[str, ...] = ()
    secondary_margin: float = 0.25
    score_primary: bool = True
    all_variants: bool = False
    experimental: bool = False

    def __post_init__(self) -> None:
        tol = self.tie_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 0.5:
            raise ValueError(f"SearchConfig.tie_tolerance={tol!r}; expected a float in [0, 0.5)")
        for name in ("screen", "secondary_margin"):
            margin = getattr(self, name)
            if (
                isinstance(margin, bool)
                or not isinstance(margin, (int, float))
                or not 0 <= margin < float("inf")
            ):
                raise ValueError(f"SearchConfig.{name}={margin!r}; expected a float >= 0")
        if not isinstance(self.score_primary, bool):
            raise TypeError(f"SearchConfig.score_primary={self.score_primary!r}; expected a bool")
        if isinstance(self.secondary, str) or not isinstance(self.secondary, (tuple, list)):
            raise TypeError(f"SearchConfig.secondary={self.secondary!r}; expected a tuple of str")
        try:
            secondary = tuple(str(RoutingDistribution.parse(r)) for r in self.secondary)
        except (TypeError, ValueError) as error:
            raise type(error)(f"SearchConfig.secondary={self.secondary!r}: {error}") from None
        if len(set(secondary)) != len(secondary):
            raise ValueError(f"SearchConfig.secondary={self.secondary!r} names a routing twice")
        object.__setattr__(self, "secondary", secondary)


@dataclasses.dataclass(frozen=True)
class OpChoice:
    """The chosen tactic of one op, its time and the fastest other tactic of the op."""

    tactic: Tactic
    time_us: float
    runner_up: Tactic | None = None
    runner_up_time_us: float | None = None


@dataclasses.dataclass(frozen=True)
class PairChoice:
    """The chosen (GEMM1, GEMM2) pair of a cell."""

    gemm1: OpChoice
    gemm2: OpChoice

    @property
    def block_m(self) -> int:
        """The row tile of the pair's routing metadata: the larger `block_m`."""
        return max(self.gemm1.tactic.block_m, self.gemm2.tactic.block_m)

    @property
    def total_us(self) -> float:
        return self.gemm1.time_us + self.gemm2.time_us

    @property
    def tactics(self) -> tuple[Tactic, Tactic]:
        return self.gemm1.tactic, self.gemm2.tactic


Timings = Mapping[str, Mapping[Tactic, Measurement | Failure]]


@dataclasses.dataclass(frozen=True)
class CellResult:
    """Everything measured for one cell.

    Attributes:
      cell: the cell.
      timings: op -> tactic -> Measurement or Failure, in variant order.
      rejected: op -> (tactic, reason) of exported tactics invalid for the problem.
      choice: the chosen pair, None unless both ops have a timed tactic.
      skipped: why the cell was not timed at all (e.g. an infeasible balanced or busy
        plan).
      seconds: wall time spent on the cell.
      prepare_seconds: the part of `seconds` in `Profiler.prepare_cell` (the GPU
        profiler compiles the candidates and builds their inputs there; the rest is
        timing).
      secondary: routing -> timings of the candidates re-timed under that
        secondary routing (`SearchConfig.secondary`); empty without.
      secondary_skipped: `(routing, reason)` of secondary routings not timed for this
        cell (an infeasible balanced or busy plan, or a plan with the same loads as a
        routing already timed). Not kept in timings files: cells read back from one
        have it empty.
    """

    cell: TuneCell
    timings: Timings = dataclasses.field(default_factory=dict)
    rejected: Mapping[str, tuple[tuple[Tactic, str], ...]] = dataclasses.field(default_factory=dict)
    choice: PairChoice | None = None
    skipped: str | None = None
    seconds: float = 0.0
    prepare_seconds: float = 0.0
    secondary: Mapping[str, Timings] = dataclasses.field(default_factory=dict)
    secondary_skipped: tuple[tuple[str, str], ...] = ()

    def times(self, op: str) -> dict[Tactic, float]:
        """Tactic -> microseconds of the successfully timed tactics of `op`."""
        return {
            t: r.time_us for t, r in self.timings.get(op, {}).items() if isinstance(r, Measurement)
        }

    def failures(self) -> list[tuple[str, Tactic, str]]:
        """`(op, tactic, message)` of every failed tactic; failures under a secondary
        routing have the message prefixed with `under <routing>: `."""
        profiles = [("", self.timings)]
        profiles += [(f"under {r}: ", t) for r, t in self.secondary.items()]
        return [
            (op, t, prefix + r.message)
            for prefix, timings in profiles
            for op, results in timings.items()
            for t, r in results.items()
            if isinstance(r, Failure)
        ]

    @property
    def robust(self) -> bool:
        """Whether the choice used the secondary routings (some pair was timed under all);
        False for a plain search and for the fallback to the plain choice."""
        if not self.secondary:
            return False
        measured = [_measured(t) for t in (self.timings, *self.secondary.values())]
        return bool(_pairs_timed_everywhere(measured))

    def pair_us(self, pair: Sequence[Tactic]) -> float | None:
        """GEMM1 + GEMM2 time of `pair`, None unless both were timed."""
        g1, g2 = self.times(GEMM1_OP).get(pair[0]), self.times(GEMM2_OP).get(pair[1])
        return None if g1 is None or g2 is None else g1 + g2


def search_of_profile(search: SearchConfig, profile: str) -> SearchConfig:
    """`search` with the secondary routings and the scoring of `profile`
    (`routing_generator.parse_profile`)."""
    _, secondary, score_primary = parse_profile(profile)
    return dataclasses.replace(search, secondary=secondary, score_primary=score_primary)


def _first_within(times: Mapping[Tactic, float], tolerance: float) -> Tactic:
    """The first tactic (mapping order) within `tolerance` of the fastest."""
    fastest = min(times.values())
    return next(t for t, us in times.items() if us <= fastest * (1 + tolerance))


def _op_choice(times: Mapping[Tactic, float], tolerance: float) -> OpChoice:
    return _op_choice_of(times, _first_within(times, tolerance))


def _op_choice_of(times: Mapping[Tactic, float], chosen: Tactic) -> OpChoice:
    """`chosen` with its time and the fastest other tactic of `times` as runner-up."""
    others = {t: us for t, us in times.items() if t != chosen}
    if not others:
        return OpChoice(chosen, times[chosen])
    runner_up = min(others, key=others.get)
    return OpChoice(chosen, times[chosen], runner_up, others[runner_up])


def choose_pair(timings: Timings, search: SearchConfig | None = None) -> PairChoice | None:
    """The fastest GEMM1 and the fastest GEMM2 (see the module docstring)."""
    search = search or SearchConfig()
    per_op = _measured(timings)
    if not all(per_op):
        return None
    return PairChoice(*(_op_choice(times, search.tie_tolerance) for times in per_op))


def _measured(timings: Timings) -> list[dict[Tactic, float]]:
    """Per op (in `OPS` order): tactic -> microseconds of the measured tactics."""
    return [
        {t: r.time_us for t, r in timings.get(op, {}).items() if isinstance(r, Measurement)}
        for op in OPS
    ]


def secondary_candidates(timings: Timings, margin: float) -> dict[str, tuple[Tactic, ...]]:
    """op -> the promising tactics to re-time under a secondary routing (module docstring)."""
    if not all(_measured(timings)):
        return {op: () for op in OPS}
    out = {}
    for op in OPS:
        close = _survivors(timings[op], margin)  # within the margin of the op's fastest
        out[op] = tuple(t for t in timings[op] if t in close)
    return out


def _pairs_timed_everywhere(
    measured: Sequence[list[dict[Tactic, float]]],
) -> list[tuple[Tactic, Tactic]]:
    """The (GEMM1, GEMM2) pairs with a time in every `_measured` profile, in variant
    order (GEMM1 first)."""
    g1_all, g2_all = measured[0]
    return [
        (g1, g2)
        for g1 in g1_all
        for g2 in g2_all
        if all(g1 in m[0] and g2 in m[1] for m in measured)
    ]


def choose_robust_pair(
    timings: Timings,
    secondary: Mapping[str, Timings],
    search: SearchConfig | None = None,
) -> PairChoice | None:
    """The pair with the smallest worst normalized time over the primary `timings` (unless
    `search.score_primary` is False) and every routing of `secondary` (module
    docstring); the plain `choose_pair` when no pair was timed under every routing.
    Times in the result are the primary ones."""
    search = search or SearchConfig()
    measured = [_measured(t) for t in (timings, *secondary.values())]
    pairs = _pairs_timed_everywhere(measured)
    if not secondary or not pairs:
        return choose_pair(timings, search)
    g1_all, g2_all = measured[0]
    scored = measured if search.score_primary else measured[1:]
    totals = [{(g1, g2): m[0][g1] + m[1][g2] for g1, g2 in pairs} for m in scored]
    best = [min(t.values()) for t in totals]
    scores = {p: max(t[p] / b for t, b in zip(totals, best, strict=True)) for p in pairs}
    lowest = min(scores.values())
    g1, g2 = next(p for p in pairs if scores[p] <= lowest * (1 + search.tie_tolerance))
    return PairChoice(_op_choice_of(g1_all, g1), _op_choice_of(g2_all, g2))


def _timed(call, op: str, tactic: Tactic, cell: TuneCell) -> Measurement | Failure:
    """`call(op, tactic, cell)` with exceptions and wrong return types as Failures."""
    try:
        result = call(op, tactic, cell)
    except Exception as error:  # noqa: BLE001 - a failing tactic is recorded
        return Failure(f"{type(error).__name__}: {error}")
    if not isinstance(result, (Measurement, Failure)):
        return Failure(f"profiler returned {result!r}; expected Measurement or Failure")
    return result


def _survivors(results: Mapping[Tactic, Measurement | Failure], margin: float) -> set[Tactic]:
    """Tactics within `1 + margin` of the fastest measured one."""
    times = {t: r.time_us for t, r in results.items() if isinstance(r, Measurement)}
    if not times:
        return set()
    fastest = min(times.values())
    return {t for t, us in times.items() if us <= fastest * (1 + margin)}


def measure_cell(
    profiler: Profiler, cell: TuneCell, search: SearchConfig | None = None
) -> CellResult:
    """Times every valid exported tactic of both ops on `cell` (no choice made).

    With `search.screen > 0` the candidates are screened first, and with
    `search.secondary` the promising ones are timed again under each secondary
    routing (`SearchConfig`).
    """
    search = search or SearchConfig()
    start = time.perf_counter()
    reason = _infeasible(cell)
    if reason is not None:
        return CellResult(cell, skipped=reason)
    valid, rejected = {}, {}
    for op in OPS:
        valid[op], rejected[op] = candidates(
            op,
            cell.problem_key(op),
            all_variants=search.all_variants,
            experimental=search.experimental,
        )
    prepare = time.perf_counter()
    profiler.prepare_cell(cell, valid)
    prepare = time.perf_counter() - prepare
    timings: dict[str, dict[Tactic, Measurement | Failure]] = {}
    fully = {}  # op -> the tactics timed fully (not only screened)
    for op in OPS:
        if search.screen > 0:
            screened = {t: _timed(profiler.screen, op, t, cell) for t in valid[op]}
            fully[op] = keep = _survivors(screened, search.screen)
            timings[op] = {
                t: _timed(profiler.time, op, t, cell) if t in keep else screened[t]
                for t in valid[op]
            }
        else:
            timings[op] = {t: _timed(profiler.time, op, t, cell) for t in valid[op]}
            fully[op] = set(valid[op])
    secondary, skipped = {}, []
    if search.secondary:
        # Only fully timed candidates: a single screening scan is too rough to score.
        fully_timed = {op: {t: timings[op][t] for t in fully[op]} for op in OPS}
        kept = secondary_candidates(fully_timed, search.secondary_margin)
        again = {op: tuple(t for t in valid[op] if t in kept[op]) for op in OPS}
        profiled = [cell]
        for routing in search.secondary:
            other = dataclasses.replace(cell, routing=routing)
            reason = _infeasible(other) or _same_plan(other, profiled)
            if reason is not None:
                skipped.append((routing, reason))
                continue
            started = time.perf_counter()
            profiler.prepare_cell(other, again)
            prepare += time.perf_counter() - started
            secondary[routing] = {
                op: {t: _timed(profiler.time, op, t, other) for t in again[op]} for op in OPS
            }
            profiled.append(other)
    return CellResult(
        cell,
        timings,
        rejected,
        seconds=time.perf_counter() - start,
        prepare_seconds=prepare,
        secondary=secondary,
        secondary_skipped=tuple(skipped),
    )


def _infeasible(cell: TuneCell) -> str | None:
    """Why `cell`'s routing cannot be built (an infeasible balanced or busy plan: the
    same total), else None."""
    if cell.routing not in ("balanced", "busy"):
        return None
    m = cell.model
    try:
        planned_expert_loads(
            cell.routing, cell.num_tokens, m.num_experts, m.top_k, cell.num_local_experts
        )
    except ValueError as error:
        return str(error)
    return None


def _same_plan(cell: TuneCell, profiled: Sequence[TuneCell]) -> str | None:
    """Why timing `cell` would repeat a cell of `profiled`: a planned routing whose
    plan holds the same loads as an earlier one's (e.g. `busy` and `spread` without
    expert parallelism, or `busy` and `balanced` at one token) times the same launches,
    at most on other experts' weights, and a repeated routing cannot change the robust
    choice (its worst normalized time) beyond noise. None if `cell` is new."""
    if cell.routing not in PLANNED_KINDS:
        return None
    loads = sorted(cell_expert_loads(cell))
    for other in profiled:
        if other.routing in PLANNED_KINDS and sorted(cell_expert_loads(other)) == loads:
            return f"same expert loads as {other.routing}"
    return None


class Progress:
    """One progress line per finished cell: a bar, the result, elapsed time and an estimate.

    The estimate weighs cells by `1 + num_tokens * top_k / ep / 16384`: a cell
    costs a fixed part (compiling and launching every candidate) plus a part that
    grows with its routed rows; on an H100, DeepSeek-V3 EP=8 cells took 8 s at
    N=1 and 17 s at N=16384. It is rough until a few cells are done.
    """

    def __init__(self, cells: Sequence[TuneCell], stream: TextIO | None = None, width: int = 24):
        self._weights = [self._weight(c) for c in cells]
        self._done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._width = width
        self._start = time.perf_counter()

    @staticmethod
    def _weight(cell: TuneCell) -> float:
        return 1.0 + cell.num_tokens * cell.model.top_k / cell.ep / 16384

    @staticmethod
    def _clock(seconds: float) -> str:
        seconds = int(round(seconds))
        return f"{seconds // 60}:{seconds % 60:02d}"

    def update(self, result: CellResult, note: str) -> None:
        """Prints the line of the next finished cell."""
        self._done += 1
        total = len(self._weights)
        filled = self._width * self._done // max(total, 1)
        bar = "#" * filled + "-" * (self._width - filled)
        elapsed = time.perf_counter() - self._start
        done_weight = sum(self._weights[: self._done])
        left_weight = sum(self._weights[self._done :])
        eta = elapsed * left_weight / done_weight if done_weight else 0.0
        self._stream.write(
            f"[{bar}] {self._done}/{total} {result.cell}: {note}  "
            f"elapsed {self._clock(elapsed)} eta {self._clock(eta)}\n"
        )
        self._stream.flush()


def _short(tactic: Tactic) -> str:
    """`str(tactic)` without the family name."""
    text = str(tactic)
    return text[text.index("[") + 1 : -1] if "[" in text else text


def _note(result: CellResult) -> str:
    if result.skipped:
        return f"skipped ({result.skipped})"
    timed = sum(len(result.times(op)) for op in OPS)
    again = sum(len(t) for timings in result.secondary.values() for t in timings.values())
    failed = len(result.failures())
    counts = f"{timed} timed" + (f", {again} again" if result.secondary else "")
    notes = [f"{routing} skipped: {reason}" for routing, reason in result.secondary_skipped]
    if result.secondary and not result.robust:
        notes.append("no pair timed under every routing: plain choice")
    extra = "".join(f"; {n}" for n in notes)
    if result.choice is None:
        return f"no pair ({counts}, {failed} failed{extra})"
    return (
        f"block_m={result.choice.block_m} {result.choice.total_us:.1f} us "
        f"({counts}, {failed} failed{extra})"
    )


def scored_secondary(result: CellResult, search: SearchConfig | None = None) -> dict[str, Timings]:
    """The secondary timings `with_choice` scores: `result.secondary`, and when the primary
    routing is not scored (`search.score_primary` False), each routing of
    `search.secondary` that was not timed because its plan holds the primary's loads
    (`_same_plan`), with the primary timings: it would have timed the same launches, so
    skipping it saves time without changing what the profile scores. Empty when no
    secondary routing was timed (then `choose_robust_pair` makes the plain choice)."""
    search = search or SearchConfig()
    secondary = dict(result.secondary)
    if search.score_primary or not secondary:
        return secondary  # Nothing timed again: the plain choice.
    cell = result.cell
    for routing in search.secondary:
        other = dataclasses.replace(cell, routing=routing)
        if routing not in secondary and not _infeasible(other) and _same_plan(other, [cell]):
            secondary[routing] = result.timings
    return secondary


def with_choice(result: CellResult, search: SearchConfig | None = None) -> CellResult:
    """`result` with its pair chosen from its timings by `search` (`choose_robust_pair`
    over `scored_secondary`); a skipped cell unchanged."""
    if result.skipped:
        return result
    choice = choose_robust_pair(result.timings, scored_secondary(result, search), search)
    return dataclasses.replace(result, choice=choice)


def tune_cells(
    profiler: Profiler,
    cells: Iterable[TuneCell],
    search: SearchConfig | None = None,
    stream: TextIO | None = None,
    on_result: Callable[[CellResult], None] | None = None,
    saved: Mapping[tuple[Any, ...], CellResult] | None = None,
) -> list[CellResult]:
    """`measure_cell` and `choose_pair` for each cell, with a progress line per cell.

    `on_result` is called with each cell's result as soon as it is measured (e.g. to
    save the timings so far, so that an interrupted run keeps them). A cell whose
    `cell_key` is in `saved` (results read back with `results_from_rows`) is not
    measured again: its saved timings are used, unless a tactic failed there (a
    failure may be transient, or caused by an earlier fault in the same process).
    """
    cells = list(cells)
    progress = Progress(cells, stream)
    results = []
    saved = saved or {}
    for cell in cells:
        earlier = saved.get(cell_key(cell))
        if earlier is not None and earlier.failures():
            earlier = None
        if earlier is not None:
            result = dataclasses.replace(earlier, cell=cell, choice=None)
        else:
            result = measure_cell(profiler, cell, search)
        result = with_choice(result, search)
        note = _note(result) + (" (saved timings)" if earlier is not None else "")
        progress.update(result, note)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def make_cells(
    models: Sequence[MoEConfig],
    eps: Sequence[int],
    max_tokens: int,
    *,
    arch: str,
    routing: str = "balanced",
    key_data: tuple[int, ...] = (0, 0),
) -> list[TuneCell]:
    """The grid: every model x EP size x token bucket `1, 2, ..., max_tokens`."""
    cells = []
    for model in models:
        for ep in eps:
            for n in token_buckets(max_tokens):
                cells.append(TuneCell(model, ep, n, arch, routing, key_data))
    return cells


def table_entries(results: Iterable[CellResult]) -> dict[ProblemKey, TacticEntry]:
    """One entry per op of every cell with a chosen pair."""
    entries = {}
    for result in results:
        if result.choice is None:
            continue
        for op, choice in zip(OPS, (result.choice.gemm1, result.choice.gemm2), strict=True):
            entries[result.cell.problem_key(op)] = TacticEntry(
                choice.tactic, choice.time_us, choice.runner_up, choice.runner_up_time_us
            )
    return entries


def build_table(
    results: Iterable[CellResult],
    *,
    device_name: str,
    arch: str,
    distribution: str,
    key_data: tuple[int, ...],
) -> TacticTable:
    """A `TacticTable` of the results with the run's metadata."""
    metadata = TableMetadata.create(
        device_name=device_name, arch=arch, distribution=distribution, profile_key=list(key_data)
    )
    return TacticTable(metadata, table_entries(results))


def timing_rows(results: Iterable[CellResult]) -> list[dict[str, Any]]:
    """Every timing of `results` as JSON-ready rows, one per (cell, routing, op, tactic).

    Each row: the cell (`model` name, `shape` = num_experts, top_k, hidden and
    intermediate, `ep`, `num_tokens`, `arch`, `dtype`, `key_data`, `cell_routing`),
    `routing` (the cell's, or a secondary routing's), `op`, `tactic`
    (`Tactic.to_json()`), `time_us` and `samples_us` of a Measurement, or `error` of a
    Failure. `results_from_rows` reads them back. For analysis without a GPU (say, the
    regret of another heuristic on the timings of an evaluation).
    """
    rows = []
    for result in results:
        cell = result.cell
        m = cell.model
        profiles = [(cell.routing, result.timings), *result.secondary.items()]
        for routing, timings in profiles:
            for op, per_tactic in timings.items():
                for tactic, outcome in per_tactic.items():
                    row = {
                        "model": m.name,
                        "shape": [m.num_experts, m.top_k, m.hidden, m.intermediate],
                        "ep": cell.ep,
                        "num_tokens": cell.num_tokens,
                        "arch": cell.arch,
                        "dtype": cell.dtype,
                        "key_data": list(cell.key_data),
                        "cell_routing": cell.routing,
                        "routing": routing,
                        "op": op,
                        "tactic": tactic.to_json(),
                    }
                    if isinstance(outcome, Measurement):
                        row["time_us"] = outcome.time_us
                        row["samples_us"] = list(outcome.samples_us)
                    else:
                        row["error"] = outcome.message
                    rows.append(row)
    return rows


def cell_key(cell: TuneCell) -> tuple[Any, ...]:
    """What identifies a cell's timings in a `timing_rows` file: the model's name and
    shape, EP, tokens, arch, routing, key and dtype."""
    m = cell.model
    return (
        m.name,
        (m.num_experts, m.top_k, m.hidden, m.intermediate),
        cell.ep,
        cell.num_tokens,
        cell.arch,
        cell.routing,
        tuple(cell.key_data),
        cell.dtype,
    )


def results_from_rows(rows: Iterable[Mapping[str, Any]]) -> list[CellResult]:
    """The `CellResult`s (timings and secondary timings, no choice) of `timing_rows`
    output, in first-seen order. ValueError for a malformed row."""
    from jax_moe.tactic import tactic_from_json

    cells: dict[TuneCell, CellResult] = {}
    for i, row in enumerate(rows):
        try:
            experts, top_k, hidden, intermediate = (int(x) for x in row["shape"])
            model = MoEConfig(
                name=str(row["model"]),
                num_experts=experts,
                top_k=top_k,
                hidden=hidden,
                intermediate=intermediate,
            )
            cell = TuneCell(
                model,
                int(row["ep"]),
                int(row["num_tokens"]),
                str(row["arch"]),
                str(row["cell_routing"]),
                tuple(row["key_data"]),
                str(row["dtype"]),
            )
            tactic = tactic_from_json(row["tactic"])
            op, routing = str(row["op"]), str(row["routing"])
            if op not in OPS:
                raise ValueError(f"op {op!r}")
            outcome = (
                Measurement(float(row["time_us"]), tuple(row.get("samples_us", ())))
                if "time_us" in row
                else Failure(str(row["error"]))
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"timing row {i} is malformed: {error}") from None
        result = cells.setdefault(cell, CellResult(cell, {}, {}, secondary={}))
        timings = (
            result.timings if routing == cell.routing else result.secondary.setdefault(routing, {})
        )
        timings.setdefault(op, {})[tactic] = outcome
    return list(cells.values())


def _format_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    lines = [
        " ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]
    lines.insert(1, " ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_summary(results: Sequence[CellResult]) -> str:
    """A text table: per cell the chosen pair (`block_m`: the routing metadata's row
    tile, the larger of the two), its time and the default pair's time."""
    header = (
        "cell",
        "block_m",
        "gemm1",
        "us",
        "gemm2",
        "us",
        "pair_us",
        "default_us",
        "gain",
        "failed",
    )
    rows = []
    for r in results:
        failed = str(len(r.failures()))
        if r.choice is None:
            reason = r.skipped or "no tactic of both ops ran"
            rows.append((str(r.cell), "-", reason, "", "", "", "", "", "", failed))
            continue
        c = r.choice
        default_us = r.pair_us(default_pair(r.cell))
        gain = "" if default_us is None else f"{default_us / c.total_us:.2f}x"
        rows.append(
            (
                str(r.cell),
                str(c.block_m),
                _short(c.gemm1.tactic),
                f"{c.gemm1.time_us:.1f}",
                _short(c.gemm2.tactic),
                f"{c.gemm2.time_us:.1f}",
                f"{c.total_us:.1f}",
                "-" if default_us is None else f"{default_us:.1f}",
                gain,
                failed,
            )
        )
    return _format_rows(header, rows)
