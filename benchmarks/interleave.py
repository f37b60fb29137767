"""Interleaved timing and the report of ``pytest benchmarks`` (and of benchmarks/gpu_check.py).

Candidates of one row (public call, raw kernel, eager, ``torch.compile``, peers) are timed round-robin:
each round runs every candidate once, in an order rotated from round to round, so a burst of load from
other processes lands on all of them alike. A candidate's time is the median of its rounds, reported with
the [min, max] interval; a speed ratio is the median of the per-round ratios (two candidates of one round
ran seconds apart), with the [min, max] of those. Thresholds assert on the median ratio.

On the CPU a sample is ``perf_counter`` around ``number`` calls (``number`` chosen in the warm-up so a sample
lasts at least ``MIN_SAMPLE_S``). On CUDA every call is timed alone with CUDA events after an L2 flush and a
synchronise, so the GPU starts idle and the host's launch overhead and syncs count, as a user sees them.
"""
import ctypes
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field

import torch

MIN_SAMPLE_S = 0.02
M_MMAP_THRESHOLD, M_TRIM_THRESHOLD = -3, -1  # glibc mallopt parameters


def rounds(device: torch.device, quick: bool) -> int:
    """Rounds per row: 7 on the CPU, 15 on CUDA, 2 under --bench-quick."""
    return 2 if quick else (7 if device.type == "cpu" else 15)

ROLES = ("public", "raw kernel", "eager", "torch.compile")  # a table's columns, then "best peer"
# (column, slow, fast): a speed-up column, slow's time / fast's time ("public / raw" is the public call's cost)
RATIOS = (("public vs eager", "eager", "public"), ("public vs compile", "torch.compile", "public"),
          ("public / raw", "public", "raw kernel"))


@dataclass
class Timing:
    """Seconds per call, one sample per round, and the calls a sample averaged over."""
    samples: list
    calls_per_sample: int = 1
    peak_extra_bytes: int = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def _cuda_time(fn, number: int, flush: torch.Tensor) -> float:
    """Mean seconds of ``number`` calls, each alone on an idle GPU with a cold L2 (CUDA events)."""
    total = 0.0
    for _ in range(number):
        flush.zero_()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        total += start.elapsed_time(end) * 1e-3
    return total / number


def _cpu_time(fn, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def peak_extra_bytes(fn, device: torch.device) -> int:
    """Peak memory during one ``fn()`` above what was in use just before: CUDA allocator statistics, or on Linux
    the process's resident set (its peak reset through /proc/self/clear_refs); None elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    libc = ctypes.CDLL("libc.so.6") if platform.libc_ver()[0] == "glibc" else None
    if libc:  # every allocation of 1 MiB or more mapped afresh, not served from freed heap memory already resident
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _status_bytes("VmRSS")
    fn()
    peak = _status_bytes("VmHWM") - before
    if libc:  # back to glibc's dynamic scheme at its cap, for the timing
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
    return peak


def _status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def interleave(candidates: dict, device: torch.device, rounds: int, warmup: int = 2, memory: bool = False) -> dict:
    """Time each ``candidates[name]()`` (no arguments) round-robin for ``rounds`` rounds -> {name: Timing}.

    ``warmup`` calls each first (``torch.compile`` compiles there); with ``memory`` one more call each measures
    :func:`peak_extra_bytes`."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if device.type == "cuda" else None
    timings = {}
    for name, fn in candidates.items():
        for _ in range(warmup):
            fn()
        peak = peak_extra_bytes(fn, device) if memory else None
        number = 1
        if flush is None:  # calls per sample, from the fastest of three (a burst of load must not make it 1)
            once = min(_cpu_time(fn, 1) for _ in range(3 if warmup else 1))
            number = max(1, min(1000, round(MIN_SAMPLE_S / max(once, 1e-7))))
        timings[name] = Timing([], number, peak)
    names = list(candidates)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            timing = timings[name]
            fn = candidates[name]
            timing.samples.append(_cuda_time(fn, timing.calls_per_sample, flush) if flush is not None
                                  else _cpu_time(fn, timing.calls_per_sample))
    return timings


def speedup(timings: dict, slow: str, fast: str):
    """(median, min, max) over rounds of ``slow``'s time / ``fast``'s time; None when either is missing."""
    if slow not in timings or fast not in timings:
        return None
    ratios = [s / f for s, f in zip(timings[slow].samples, timings[fast].samples)]
    return statistics.median(ratios), min(ratios), max(ratios)


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def _cell(timing: Timing) -> str:
    return f"{_seconds(timing.median)} [{_seconds(min(timing.samples))}, {_seconds(max(timing.samples))}]"


def _ratio(r) -> str:
    return "" if r is None else f"{r[0]:.2f}x [{r[1]:.2f}, {r[2]:.2f}]"


@dataclass
class Row:
    op: str
    device: str
    case: dict  # shape / dtype / pass ... -> str
    timings: dict  # candidate name -> Timing
    peers: tuple  # which candidate names are peers
    bytes_moved: int = None  # what one call must read and write, for GB/s (CUDA)


def best_peer(row: Row) -> str:
    """The name of ``row``'s fastest peer (lowest median); None when it has none."""
    return min(row.peers, key=lambda name: row.timings[name].median) if row.peers else None


@dataclass
class Report:
    """Rows of every benchmark of a session, one markdown table per (op, device), written as .md and .json."""
    rows: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)  # (op, device) -> list of lines under the table
    load_before: tuple = field(default_factory=os.getloadavg)
    stem: str = None  # where :meth:`write` writes after every row, if set

    def add(self, op: str, device: torch.device, case: dict, timings: dict, peers=(), bytes_moved=None) -> Row:
        row = Row(op, device.type, case, timings, tuple(peers), bytes_moved)
        self.rows.append(row)
        if self.stem:
            self.write(self.stem)
        return row

    def note(self, op: str, device: torch.device, text: str):
        lines = self.notes.setdefault((op, device.type), [])
        if text not in lines:
            lines.append(text)

    def tables(self) -> list:
        lines = []
        for op, device in dict.fromkeys((row.op, row.device) for row in self.rows):
            rows = [row for row in self.rows if (row.op, row.device) == (op, device)]
            keys = list(dict.fromkeys(k for row in rows for k in row.case))
            roles = [role for role in ROLES if any(role in row.timings for row in rows)]
            extra = list(dict.fromkeys(name for row in rows for name in row.timings
                                       if name not in ROLES and name not in row.peers))
            peers = list(dict.fromkeys(name for row in rows for name in row.peers))
            memory = any(t.peak_extra_bytes is not None for row in rows for t in row.timings.values())
            gbps = any(row.bytes_moved for row in rows) and device == "cuda"
            ratios = [(label, slow, fast) for label, slow, fast in RATIOS
                      if any(slow in row.timings and fast in row.timings for row in rows)]
            header = keys + roles + extra + [f"peer: {name}" for name in peers] + [r[0] for r in ratios] + (
                ["public vs best peer"] if peers else []) + (["public GB/s"] if gbps else [])
            lines += [f"\n**{op} on {device}**: median of interleaved rounds [min, max]; "
                      f"ratios: median of per-round ratios [min, max]",
                      "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for row in rows:
                t = row.timings
                cells = [row.case.get(k, "") for k in keys] + [_cell(t[n]) if n in t else ""
                                                               for n in roles + extra + peers]
                cells += [_ratio(speedup(t, slow, fast)) for _, slow, fast in ratios]
                if peers:
                    cells.append(_ratio(speedup(t, best_peer(row), "public")) if row.peers else "no peer")
                if gbps:
                    cells.append(f"{row.bytes_moved / t['public'].median / 1e9:.0f}" if row.bytes_moved else "")
                lines.append("| " + " | ".join(cells) + " |")
            if memory:
                names = roles + extra + peers
                lines += ["", f"Peak extra memory of one call (MiB), {op} on {device}:", "",
                          "| " + " | ".join(keys + names) + " |", "|" + "---|" * (len(keys) + len(names))]
                for row in rows:
                    peaks = [row.timings[n].peak_extra_bytes if n in row.timings else None for n in names]
                    lines.append("| " + " | ".join([row.case.get(k, "") for k in keys] + [
                        "" if p is None else f"{p / 2**20:.1f}" for p in peaks]) + " |")
            lines += [""] + [f"- {text}" for text in self.notes.get((op, device), [])]
        return lines

    def write(self, stem: str):
        """Write ``stem``.md (the tables under the run's context) and ``stem``.json (every sample)."""
        context = run_context()
        context["load_average_1_5_15"] = {"before": list(self.load_before), "after": list(os.getloadavg())}
        os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
        with open(stem + ".md", "w") as md:
            md.write("\n".join(describe(context) + self.tables()) + "\n")
        with open(stem + ".json", "w") as out:
            json.dump({"context": context, "rows": [
                {"op": r.op, "device": r.device, **r.case, "bytes_moved": r.bytes_moved, "peers": list(r.peers),
                 "candidates": {n: {"samples_s": t.samples, "median_s": t.median, "calls_per_sample": t.calls_per_sample,
                                    "peak_extra_bytes": t.peak_extra_bytes} for n, t in r.timings.items()}}
                for r in self.rows]}, out, indent=1)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_context() -> dict:
    """Machine, build, versions, commit and date of this run."""
    try:
        from distreward import _build_info
        build = {"cpu_arch": _build_info.CPU_ARCH, "compile_flags": list(_build_info.COMPILE_FLAGS),
                 "vector_isa": list(_build_info.VECTOR_ISA)}
    except ImportError:
        build = {"cpu_arch": "unknown (no distreward/_build_info.py: the C++ extension was built before it existed)"}
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            flags = set(next((line for line in cpuinfo if line.startswith("flags")), ":").split(":", 1)[1].split())
    context = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "commit": _git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if _git(  # besides the tables
            "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(exclude,top)benchmarks/results") else ""),
        "cpu": _cpu_model(), "cpu_vector_flags": sorted(flags & {"avx2", "avx512f", "avx512bw", "avx512_bf16", "fma"}),
        "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "build": build,
        "versions": {p: _version(p) for p in ("torch", "triton", "transformers", "trl", "liger-kernel")},
    }
    if torch.cuda.is_available():
        context["gpu"] = torch.cuda.get_device_name()
        context["cuda"] = torch.version.cuda
    return context


def describe(context: dict) -> list:
    """The run's context as the markdown lines above the tables."""
    build = context["build"]
    lines = [f"Measured {context['date_utc']} UTC at commit {context['commit']} on {context['cpu']} "
             f"({context['cores']} cores, torch threads {context['torch_threads']}, "
             f"CPU flags {' '.join(context['cpu_vector_flags']) or 'none of avx2/avx512'})"
             + (f", GPU {context['gpu']} (CUDA {context['cuda']})" if "gpu" in context else "") + ".",
             f"C++ extension built with DISTREWARD_CPU_ARCH={build['cpu_arch']}"
             + (f" ({' '.join(build.get('compile_flags', [])) or 'no -march'}; vector ISA "
                f"{' '.join(build.get('vector_isa', [])) or 'baseline'})" if "compile_flags" in build else "") + ".",
             "Python " + context["python"] + ", " + ", ".join(f"{k} {v}" for k, v in context["versions"].items()) + "."]
    if "load_average_1_5_15" in context:
        load = context["load_average_1_5_15"]
        lines.append(f"Load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load['before'])}, "
                     f"after {tuple(round(x, 2) for x in load['after'])}.")
    return lines
