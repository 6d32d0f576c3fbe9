"""Checks and times the sm_90a NVFP4 MoE GEMM kernels (CuTe DSL) on a GPU.

For each model shape, token count and tactic the script builds random NVFP4
weights (logical layout) and their prepared layout, a random top-k routing and
its routing metadata, runs GEMM1 and GEMM2 into poisoned (NaN) outputs and
compares every routed row with a float32 torch reference:

* GEMM1: ``act`` against ``silu(g) * u`` computed in float32 from the same bf16
  hidden rows and the dequantized weights (the kernel rounds once to bf16);
* GEMM2: ``y`` against ``topk_weight * (act_kernel @ W2^T) * gs2`` in float32
  (fed with the kernel's own ``act`` so the two checks are independent; the
  kernel rounds once to bf16).

Kernels are compiled from the same `export_spec` as the ahead-of-time export.
Timing: CUDA-graph replays of back-to-back launches (events), median of repeats.
Writes a log and a JSON file of results to ``--out_dir``.

Usage (GPU machine, DSL on PYTHONPATH):
    python benchmarks/gemm_kernels_dsl.py --out_dir=$OUT [--models=...] [--tokens=1,3,64,1000]
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from jax_moe.routing_metadata import padded_rows  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    num_experts: int
    num_local_experts: int
    top_k: int
    hidden: int
    intermediate: int


MODELS = {
    "deepseek_v3_ep8": ModelShape("deepseek_v3_ep8", 256, 32, 8, 7168, 2048),
    "qwen3_30b_a3b": ModelShape("qwen3_30b_a3b", 128, 128, 8, 2048, 768),
    "mixtral_8x7b": ModelShape("mixtral_8x7b", 8, 8, 2, 4096, 14336),
    "small": ModelShape("small", 16, 8, 4, 256, 192),
}

E2M1_SIGNED = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)


def routing_metadata(topk_ids: np.ndarray, num_local: int, offset: int, block_m: int):
    """Routing metadata of the GPU data path for local experts [offset, offset + num_local).

    Returns (sorted_slots int32 (m_pad,), tile_expert int32 (m_pad // block_m,),
    slot_row int32 (N*k,)).
    """
    n, k = topk_ids.shape
    experts = topk_ids.reshape(-1).astype(np.int64) - offset
    slots = np.arange(n * k)
    local = (experts >= 0) & (experts < num_local)
    m_pad = padded_rows(n * k, num_local, block_m)  # the layer's row tiles, as fused_moe
    sorted_slots = np.full(m_pad, -1, np.int32)
    tile_expert = np.full(m_pad // block_m, -1, np.int32)
    slot_row = np.full(n * k, -1, np.int32)
    pos = 0
    for e in range(num_local):
        seg = slots[local & (experts == e)]
        if seg.size == 0:
            continue
        sorted_slots[pos : pos + seg.size] = seg
        slot_row[seg] = pos + np.arange(seg.size)
        tiles = -(-seg.size // block_m)
        tile_expert[pos // block_m : pos // block_m + tiles] = e
        pos += tiles * block_m
    return sorted_slots, tile_expert, slot_row


class Problem:
    """Random NVFP4 weights (logical + prepared) for one model shape, on the GPU."""

    def __init__(self, shape: ModelShape, seed: int):
        import torch

        from jax_moe.prepare import (
            SCALE_ENCODING,
            fold_scale_signs,
            gate_up_row_order,
            interleave_code_words,
            tile_rows,
        )

        self.shape = shape
        gen = torch.Generator(device="cuda").manual_seed(seed)
        dev = "cuda"
        num_local, h, i = shape.num_local_experts, shape.hidden, shape.intermediate

        def rand_scales(rows, cols):
            # e4m3 bytes with exponent field 4..10 (2^-3 .. 2^3), random mantissa, positive;
            # one in 64 blocks gets a subnormal scale to exercise that path.
            exp = torch.randint(
                4, 11, (num_local, rows, cols), generator=gen, device=dev, dtype=torch.int32
            )
            man = torch.randint(
                0, 8, (num_local, rows, cols), generator=gen, device=dev, dtype=torch.int32
            )
            sub = torch.randint(0, 64, (num_local, rows, cols), generator=gen, device=dev) == 0
            exp = torch.where(sub, torch.zeros_like(exp), exp)
            return ((exp << 3) | man).to(torch.uint8)

        def rand_packed(rows, cols):
            return torch.randint(
                0, 256, (num_local, rows, cols // 2), generator=gen, device=dev, dtype=torch.int32
            ).to(torch.uint8)

        self.w13_packed = rand_packed(2 * i, h)
        self.w13_scale = rand_scales(2 * i, h // 16)
        self.w13_global = (torch.rand(num_local, generator=gen, device=dev) * 0.02 + 0.005).float()
        self.w2_packed = rand_packed(h, i)
        self.w2_scale = rand_scales(h, i // 16)
        self.w2_global = (torch.rand(num_local, generator=gen, device=dev) * 0.02 + 0.005).float()

        def interleaved(packed):
            out = torch.empty_like(packed)
            for e in range(packed.shape[0]):
                b = packed[e].to(torch.int64).reshape(packed.shape[1], -1, 4)
                words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
                words = interleave_code_words(words)
                out[e] = (
                    torch.stack([(words >> (8 * j)) & 0xFF for j in range(4)], dim=-1)
                    .reshape(packed.shape[1], -1)
                    .to(torch.uint8)
                )
            return out

        order = torch.as_tensor(gate_up_row_order(i), device=dev)
        encoding = torch.as_tensor(SCALE_ENCODING, device=dev)

        def prepared(packed, scale):
            """(codes, scales) in the kernels' layout (jax_moe.prepare, done with torch)."""
            codes = fold_scale_signs(packed, scale)
            codes = interleaved(tile_rows(codes, 32).contiguous())
            return codes, tile_rows(encoding[scale.long()], 4).contiguous()

        self.p13_packed, self.p13_scale = prepared(
            self.w13_packed.index_select(1, order), self.w13_scale.index_select(1, order)
        )
        self.p2_packed, self.p2_scale = prepared(self.w2_packed, self.w2_scale)
        self.lut = torch.as_tensor(E2M1_SIGNED, device=dev)
        self.gen = gen

    def dequant(self, packed, scale, gs, e):
        """float32 (rows, cols) logical weights of local expert e (cached)."""
        import torch

        key = (packed.data_ptr(), e)
        cache = self.__dict__.setdefault("_dequant_cache", {})
        if key in cache:
            return cache[key]
        p = packed[e].to(torch.int64)
        codes = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], -1)
        vals = self.lut[codes]
        s = scale[e].view(torch.float8_e4m3fn).float().repeat_interleave(16, dim=1)
        cache[key] = vals * s * gs[e]
        return cache[key]

    def weight_bytes(self, active_experts: int) -> tuple[int, int]:
        h, i = self.shape.hidden, self.shape.intermediate
        per13 = 2 * i * h // 2 + 2 * i * h // 16
        per2 = h * i // 2 + h * i // 16
        return active_experts * per13, active_experts * per2


def _cute_arg(t, align: int):
    from cutlass.cute.runtime import from_dlpack

    ct = from_dlpack(t, assumed_align=align)
    return ct.mark_layout_dynamic(leading_dim=t.dim() - 1)


class Runner:
    """Compiles one tactic of a kernel module (from its export_spec) and launches it.

    The function compiled from the fake arguments of `export_spec` (the AOT
    path) is called with `from_dlpack` tensors of dynamic layout; if that call
    is rejected, the kernel is recompiled from the real arguments (mode "real").
    """

    def __init__(self, module, tactic, log: Callable[[str], None]):
        import cutlass.cute as cute

        fn, fake = module.export_spec(tactic)
        t0 = time.time()
        self.compiled = cute.compile(fn, *fake)
        self.compile_s = time.time() - t0
        self.fn = fn
        self.tactic = tactic
        self.log = log
        self.mode = "export_spec"

    def bind(self, tensors, scalars, aligns) -> Callable[[], None]:
        """A no-argument launcher on the current torch stream for fixed buffers."""
        import cuda.bindings.driver as cuda
        import cutlass.cute as cute
        import torch

        args = [_cute_arg(t, a) for t, a in zip(tensors, aligns, strict=True)]

        def launch():
            stream = cuda.CUstream(torch.cuda.current_stream().cuda_stream)
            self.compiled(*args, *scalars, stream)

        try:
            launch()
            torch.cuda.synchronize()
        except Exception as error:  # noqa: BLE001 - fall back to compiling from real tensors
            self.log(
                f"{self.tactic}: call of the export_spec build failed "
                f"({type(error).__name__}: {error}); compiling from real tensors"
            )
            stream = cuda.CUstream(torch.cuda.current_stream().cuda_stream)
            t0 = time.time()
            self.compiled = cute.compile(self.fn, *args, *scalars, stream)
            self.compile_s += time.time() - t0
            self.mode = "real"
        return launch


def time_launch(launch: Callable[[], None], reps: int = 20, repeats: int = 7) -> float:
    """Median microseconds per launch over CUDA-graph replays of `reps` launches."""
    import torch

    launch()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        launch()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    try:
        with torch.cuda.graph(graph):
            for _ in range(reps):
                launch()
        run = graph.replay
    except Exception:  # noqa: BLE001 - fall back to direct launches when capture fails

        def run():
            for _ in range(reps):
                launch()

    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / reps)
    return statistics.median(times)


def run_case(
    problem: Problem,
    num_tokens: int,
    tactic1,
    tactic2,
    runners: dict,
    seed: int,
    log: Callable[[str], None],
    timing: bool = True,
) -> dict:
    """Runs GEMM1 and GEMM2 for one routing; returns errors and times."""
    import torch

    from jax_moe.kernels import moe_gemm1_sm90, moe_gemm2_sm90

    shape = problem.shape
    if tactic1.block_m != tactic2.block_m:
        raise ValueError("GEMM1 and GEMM2 tactics must share block_m")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n, k, h, i = num_tokens, shape.top_k, shape.hidden, shape.intermediate
    num_local = shape.num_local_experts
    ids = torch.rand(n, shape.num_experts, generator=gen, device="cuda").argsort(dim=1)[:, :k]
    ids_np = ids.cpu().numpy()
    topk_w = torch.rand(n * k, generator=gen, device="cuda").float() + 0.1
    hidden = torch.randn(n, h, generator=gen, device="cuda").to(torch.bfloat16)
    sorted_slots, tile_expert, _ = routing_metadata(ids_np, num_local, 0, tactic1.block_m)
    m_pad = sorted_slots.size
    ss = torch.as_tensor(sorted_slots, device="cuda")
    te = torch.as_tensor(tile_expert, device="cuda")
    act = torch.full((m_pad, i), float("nan"), device="cuda", dtype=torch.bfloat16)
    y = torch.full((m_pad, h), float("nan"), device="cuda", dtype=torch.bfloat16)

    key1 = ("g1", tactic1)
    if key1 not in runners:
        runners[key1] = Runner(moe_gemm1_sm90, tactic1, log)
    key2 = ("g2", tactic2)
    if key2 not in runners:
        runners[key2] = Runner(moe_gemm2_sm90, tactic2, log)
    r1, r2 = runners[key1], runners[key2]

    launch1 = r1.bind(
        [hidden, ss, te, problem.p13_packed, problem.p13_scale, problem.w13_global, act],
        [k],
        [16, 4, 4, 16, 16, 4, 16],
    )
    launch2 = r2.bind(
        [act, ss, te, problem.p2_packed, problem.p2_scale, problem.w2_global, topk_w, y],
        [],
        [16, 4, 4, 16, 16, 4, 4, 16],
    )
    act.fill_(float("nan"))
    y.fill_(float("nan"))
    launch1()
    torch.cuda.synchronize()
    launch2()
    torch.cuda.synchronize()

    # Reference, per active local expert.
    err1_num = err1_den = err2_num = err2_den = 0.0
    max_rel1 = 0.0
    nonfinite1 = nonfinite2 = 0
    active = 0
    valid = sorted_slots >= 0
    for e in range(num_local):
        rows = np.nonzero(valid & (np.repeat(tile_expert, tactic1.block_m) == e))[0]
        if rows.size == 0:
            continue
        active += 1
        rows_t = torch.as_tensor(rows, device="cuda")
        slots_t = ss[rows_t].long()
        x = hidden[slots_t // k].float()
        w13 = problem.dequant(problem.w13_packed, problem.w13_scale, problem.w13_global, e)
        g = x @ w13[:i].T
        u = x @ w13[i:].T
        ref1 = torch.nn.functional.silu(g) * u
        got1 = act[rows_t].float()
        nonfinite1 += int((~torch.isfinite(got1)).sum())
        err1_num += float(((got1 - ref1) ** 2).sum())
        err1_den += float((ref1**2).sum())
        max_rel1 = max(max_rel1, float(((got1 - ref1).abs() / (ref1.abs() + 1e-3)).max()))
        w2 = problem.dequant(problem.w2_packed, problem.w2_scale, problem.w2_global, e)
        ref2 = (got1 @ w2.T) * topk_w[slots_t][:, None]
        got2 = y[rows_t].float()
        nonfinite2 += int((~torch.isfinite(got2)).sum())
        err2_num += float(((got2 - ref2) ** 2).sum())
        err2_den += float((ref2**2).sum())
    rel1 = math.sqrt(err1_num / max(err1_den, 1e-30))
    rel2 = math.sqrt(err2_num / max(err2_den, 1e-30))
    ok = nonfinite1 == 0 and nonfinite2 == 0 and rel1 < 5e-3 and rel2 < 5e-3
    result = dict(
        model=shape.name,
        num_tokens=n,
        tactic1=str(tactic1),
        tactic2=str(tactic2),
        active_experts=active,
        m_pad=m_pad,
        rel_err_gemm1=rel1,
        max_rel_gemm1=max_rel1,
        rel_err_gemm2=rel2,
        nonfinite_gemm1=nonfinite1,
        nonfinite_gemm2=nonfinite2,
        ok=ok,
    )
    if timing:
        t1 = time_launch(launch1)
        t2 = time_launch(launch2)
        b13, b2 = problem.weight_bytes(active)
        result.update(us_gemm1=t1, us_gemm2=t2, gbps_gemm1=b13 / t1 / 1e3, gbps_gemm2=b2 / t2 / 1e3)
    return result


def _fmt(r: dict) -> str:
    s = (
        f"{r['model']:16s} N={r['num_tokens']:5d} {r['tactic1']:58s} act={r['active_experts']:3d} "
        f"err1={r['rel_err_gemm1']:.2e} err2={r['rel_err_gemm2']:.2e} "
        f"nf={r['nonfinite_gemm1']}/{r['nonfinite_gemm2']} {'OK ' if r['ok'] else 'BAD'}"
    )
    if "us_gemm1" in r:
        s += (
            f" g1={r['us_gemm1']:8.1f}us ({r['gbps_gemm1']:6.0f} GB/s)"
            f" g2={r['us_gemm2']:8.1f}us ({r['gbps_gemm2']:6.0f} GB/s)"
        )
    return s


_OUT_DIR = flags.DEFINE_string(
    "out_dir", os.environ.get("OUT", "."), "Folder for the log and JSON."
)
_MODELS = flags.DEFINE_list(
    "models", ["small", "qwen3_30b_a3b", "mixtral_8x7b", "deepseek_v3_ep8"], "Shapes to run."
)
_TOKENS = flags.DEFINE_list("tokens", ["1", "3", "64", "1000"], "Token counts.")
_TACTICS = flags.DEFINE_enum("tactics", "all", ["all", "default"], "Tactic pairs to run.")
_NO_TIMING = flags.DEFINE_bool("no_timing", False, "Check correctness only.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the inputs.")
_ONLY = flags.DEFINE_string(
    "only", "", "Comma-separated substrings; keep GEMM1 tactics whose name has one."
)
_COPY_BASELINE = flags.DEFINE_bool(
    "copy_baseline", False, "Also time a 1 GiB device-to-device copy (bytes read + written)."
)


def main(argv: Sequence[str]) -> int:
    del argv
    args = types.SimpleNamespace(
        out_dir=_OUT_DIR.value,
        models=",".join(_MODELS.value),
        tokens=",".join(_TOKENS.value),
        tactics=_TACTICS.value,
        no_timing=_NO_TIMING.value,
        seed=_SEED.value,
        only=_ONLY.value,
        copy_baseline=_COPY_BASELINE.value,
    )

    import torch

    from jax_moe.kernels import moe_gemm_config as cfg

    torch.backends.cuda.matmul.allow_tf32 = False
    os.makedirs(args.out_dir, exist_ok=True)
    log_file = open(os.path.join(args.out_dir, "gemm_kernels_dsl.log"), "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    log(f"device: {torch.cuda.get_device_name()} sms={sms}")
    if args.copy_baseline:
        src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
        dst = torch.empty_like(src)
        us = time_launch(lambda: dst.copy_(src), reps=5, repeats=5)
        gbps = 2 * (1 << 30) / us / 1e3
        log(f"copy baseline: 1 GiB in {us:.1f} us = {gbps:.0f} GB/s (read+write)")
        del src, dst
    results = []
    runners: dict = {}
    failures = 0
    for name in args.models.split(","):
        shape = MODELS[name]
        problem = Problem(shape, seed=args.seed)
        for n in (int(t) for t in args.tokens.split(",")):
            if args.tactics == "default":
                pairs = [
                    tuple(
                        cfg.default_tactic(
                            op,
                            n,
                            shape.top_k,
                            shape.num_local_experts,
                            shape.hidden,
                            shape.intermediate,
                            num_experts=shape.num_experts,
                        )
                        for op in ("moe_gemm1", "moe_gemm2")
                    )
                ]
            else:
                pairs = list(zip(cfg.gemm1_variants(), cfg.gemm2_variants(), strict=True))
                if args.only:
                    keys = args.only.split(",")
                    pairs = [(t1, t2) for t1, t2 in pairs if any(k in str(t1) for k in keys)]
            for t1, t2 in pairs:
                try:
                    r = run_case(
                        problem,
                        n,
                        t1,
                        t2,
                        runners,
                        seed=args.seed + n,
                        log=log,
                        timing=not args.no_timing,
                    )
                except Exception as error:  # noqa: BLE001 - logged, counted and reported
                    failures += 1
                    log(f"{name} N={n} {t1}: ERROR {type(error).__name__}: {error}")
                    continue
                failures += 0 if r["ok"] else 1
                results.append(r)
                log(_fmt(r))
        del problem
        torch.cuda.empty_cache()
    compile_times = {f"{k[0]}:{k[1]}": v.compile_s for k, v in runners.items()}
    modes = sorted({v.mode for v in runners.values()})
    log(
        f"compiled {len(runners)} kernels, build modes {modes}, "
        f"compile seconds total {sum(compile_times.values()):.1f}"
    )
    with open(os.path.join(args.out_dir, "gemm_kernels_dsl.json"), "w") as f:
        json.dump(dict(results=results, compile_s=compile_times), f, indent=1)
    log(f"cases={len(results)} failures={failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    app.run(main)
