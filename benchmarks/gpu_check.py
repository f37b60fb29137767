"""Issue 23's GPU check in one go (about 8-11 minutes on one H100/H200): build, run the CUDA benchmarks, record the
device, versions and date, and say which targets hold.

1. ``pip install -e . --no-build-isolation --no-deps`` (the C++ extension against the machine's own torch);
2. ``pytest benchmarks -k cuda`` with ``TRITON_INTERPRET=0`` (compiled Triton): the gather (fp32 and bf16, forward and
   forward+backward, against the raw kernel, eager, ``torch.compile``, TRL's ``selective_log_softmax`` and Liger-Kernel
   where importable), ``sequence_logprobs``, and the bin ops: ``pair_loss`` bt_kl fp32 forward+backward at
   N = 1k to 4M (each N against ``torch.compile``), other kinds and bf16, ``dist_moments``, ``gaussian_kl``;
3. appends the targets to the tables' .md: public ``pair_loss`` bt_kl fp32 fwd+bwd under 60 us at N = 65536, at
   least 80% of the card's bandwidth at N = 4M, no slower than ``torch.compile`` at any N; public gather fwd+bwd
   within 1.1x of the raw kernel in fp32 and bf16;
4. runs the default pipeline (``python -m distreward.train``) and appends its wall time and the REINFORCE step's
   phase split (the ``seconds_*`` means of ``rl/metrics.jsonl``).

Results: ``OUT.md`` (context, tables, targets) and ``OUT.json`` (every sample); ``--out`` defaults to
benchmarks/results/gpu-<card>-<date>. TRL and Liger-Kernel are optional: carry their wheels to the GPU machine
(docs/performance.md says how) or their columns are left out with a note.

    python3 benchmarks/gpu_check.py                 # on the GPU machine
    python benchmarks/gpu_check.py --dry-run        # anywhere: the same steps on the CPU at tiny sizes
"""
import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIR_LOSS_TARGETS = dict(n_fast=1 << 16, max_seconds=60e-6, n_bandwidth=1 << 22, min_share=0.8)
MAX_PUBLIC_OVER_RAW = 1.1


def card_bandwidth() -> float:
    """Peak memory bandwidth of the current CUDA card in bytes/s (double data rate x memory clock x bus width)."""
    import torch
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return 2 * getattr(props, "memory_clock_rate", 0) * 1e3 * getattr(props, "memory_bus_width", 0) / 8


def ratio(candidates: dict, slow: str, fast: str):
    """Median over rounds of slow's time / fast's time (interleave.speedup on the JSON samples); None if missing."""
    if slow not in candidates or fast not in candidates:
        return None
    return statistics.median(s / f for s, f in zip(candidates[slow]["samples_s"], candidates[fast]["samples_s"]))


def targets(rows: list, device: str, bandwidth: float, t: dict = PAIR_LOSS_TARGETS) -> list:
    """(target, measured, holds) for ``device``'s rows of the benchmark JSON; ``t``: the pair-loss targets."""
    lines = []
    pair = {int(r["N"]): r for r in rows if r["op"] == "pair_loss" and r["device"] == device
            and r["kind"] == "bt_kl" and r["dtype"] == "float32" and r["pass"] == "fwd_bwd"}
    for n, row in sorted(pair.items()):
        c = row["candidates"]
        public = c["public"]["median_s"]
        over_compile = ratio(c, "torch.compile", "public")
        lines.append((f"pair_loss bt_kl fp32 fwd+bwd N={n}: public no slower than torch.compile",
                      f"{public * 1e6:.1f} us, {over_compile:.2f}x torch.compile", over_compile >= 1))
        if n == t["n_fast"]:
            lines.append((f"pair_loss bt_kl fp32 fwd+bwd N={n}: public < {t['max_seconds'] * 1e6:.0f} us",
                          f"{public * 1e6:.1f} us", public < t["max_seconds"]))
        if n == t["n_bandwidth"]:
            share = row["bytes_moved"] / public / bandwidth if bandwidth else None
            lines.append((f"pair_loss bt_kl fp32 fwd+bwd N={n}: >= {t['min_share']:.0%} of peak bandwidth",
                          "unknown bandwidth" if share is None else f"{share:.0%} ({row['bytes_moved'] / public / 1e9:.0f} GB/s)",
                          share is not None and share >= t["min_share"]))
    for row in rows:
        if row["op"] == "gather_logprobs" and row["device"] == device and row["pass"] == "fwd_bwd":
            over_raw = ratio(row["candidates"], "public", "raw kernel")
            lines.append((f"gather {row['dtype']} fwd+bwd {row['B x T x V']}: public within {MAX_PUBLIC_OVER_RAW}x raw",
                          f"{over_raw:.2f}x", over_raw <= MAX_PUBLIC_OVER_RAW))
    return lines


def pipeline_lines(run_dir: str, seconds: float, code: int) -> list:
    """The .md lines of the pipeline's wall time and its REINFORCE phases (mean seconds per step)."""
    lines = ["", "## The default pipeline", "", f"wall time {seconds:.0f} s (exit code {code})"]
    metrics = os.path.join(run_dir, "rl", "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as handle:
            records = [json.loads(line) for line in handle]
        phases = [key for key in records[0] if key.startswith("seconds_")]
        lines += ["", "| REINFORCE phase | mean seconds per step |", "|---|---|"]
        lines += [f"| {key[len('seconds_'):]} | {statistics.mean(r[key] for r in records):.4f} |" for key in phases]
    return lines


def run(command: list, env: dict, timeout: float) -> int:
    print("+", " ".join(command), flush=True)
    try:
        return subprocess.run(command, cwd=ROOT, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"timed out after {timeout:.0f} s: the tables keep the rows measured so far", flush=True)
        return 124


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU rows at tiny sizes (pytest --bench-quick): checks the script, measures nothing")
    parser.add_argument("--no-build", action="store_true", help="skip pip install -e . (the extension is built)")
    parser.add_argument("--out", help="results stem (OUT.md, OUT.json); default benchmarks/results/gpu-<card>-<date>")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for the benchmarks (default 300)")
    parser.add_argument("--pipeline-timeout", type=float, default=150,
                        help="seconds for the default pipeline (default 150)")
    args = parser.parse_args()
    env = dict(os.environ, TRITON_INTERPRET="1" if args.dry_run else "0", PYTHONUNBUFFERED="1")

    if not args.no_build:
        code = run([sys.executable, "-m", "pip", "install", "-e", ".", "--no-build-isolation", "--no-deps", "-q"],
                   env, timeout=300)
        if code:
            return code

    import torch
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run to check the script on a CPU")
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu-dry-run"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    stem = args.out or os.path.join(ROOT, "benchmarks", "results", f"gpu-{re.sub(r'[^A-Za-z0-9]+', '-', card)}-{date}")

    select = ["-k", "cpu and not auto_choice", "--bench-quick"] if args.dry_run else ["-k", "cuda"]
    code = run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "-rs",
                "--bench-out", stem, *select], env, timeout=args.timeout)
    if not os.path.exists(stem + ".json"):
        print(f"no results: pytest exited {code} before any benchmark finished", flush=True)
        return code or 1

    with open(stem + ".json") as results:
        rows = json.load(results)["rows"]
    bandwidth = card_bandwidth() if device == "cuda" else None
    lines = ["", f"## Targets (issue 23 item 6), {device}", "", "| target | measured | holds |", "|---|---|---|"]
    sizes = dict(PAIR_LOSS_TARGETS, n_fast=256, n_bandwidth=256) if args.dry_run else PAIR_LOSS_TARGETS  # quick N
    lines += [f"| {name} | {measured} | {'yes' if ok else 'NO'} |"
              for name, measured, ok in targets(rows, device, bandwidth, sizes)]
    lines.append(f"\npytest exit code {code}" + (" (dry run on the CPU at tiny sizes: no figure here is a GPU "
                                                   "measurement)" if args.dry_run else ""))
    run_dir = stem + "-pipeline"
    tiny = ["--num_pairs", "40", "--sft_epochs", "1", "--rm_epochs", "1", "--rl_steps", "2", "--num_eval_prompts",
            "4", "--sharpening_grid", "1.0", "0.0"] if args.dry_run else []
    started = time.perf_counter()
    pipeline_code = run([sys.executable, "-m", "distreward.train", "--output_dir", run_dir, *tiny], env,
                        timeout=args.pipeline_timeout)
    lines += pipeline_lines(run_dir, time.perf_counter() - started, pipeline_code)
    with open(stem + ".md", "a") as md:
        md.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    print(f"results: {stem}.md, {stem}.json", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
