"""The one harness every ``benchmarks/bench_*.py`` script measures with.

A shared 2-core machine makes one-shot timings meaningless: another busy process can slow a run 20x. So:

* arms run **interleaved** in one process (A B C A B C ...), after warm-up rounds that are not kept, and
  every call is timed in wall time *and* process CPU time (CPU time barely moves when the machine is busy);
* a comparison is a :class:`Ratio` of the paired rounds (round i of A over round i of B), printed as the
  median with the min-max of those per-round ratios, so load drifts that hit both arms cancel;
* thread counts are fixed (:func:`fix_threads`) and printed with the load average in every table;
* freed memory stays in the process: by default glibc's malloc hands large blocks back to the OS and
  page-faults them in again, a kernel (system) time that depends on the process's allocation history (one
  training epoch: 282k page faults in one process, 624k in the next, same user time). :func:`begin`
  re-runs the script under mimalloc told never to hand memory back (:func:`use_caching_allocator`, the
  ``cmeel-mimalloc`` wheel of the ``bench-allocator`` extra), like a GPU's caching allocator; without it
  glibc's thresholds are fixed (:func:`fix_allocator`), which keeps blocks below 32 MiB only;
* peak memory of an arm is read in a fresh child process (:func:`peak_rss_in_child`), so arms never share
  a high-water mark;
* :func:`report` prints a table and, under ``make bench``, appends its rows to the run's JSON-lines file
  that ``benchmarks/summary.py`` turns into one table.

``torch.utils.benchmark.Timer`` and ``pyperf`` measure one statement at a time with one clock (``Timer``
refuses a custom clock when an accelerator is present); neither interleaves arms, which is the point here,
so the timing loop below is the small part they leave out. Thread pools are limited through
``threadpoolctl``; tables are drawn with ``rich``.

Example::

    import harness

    harness.begin("matmul vs einsum", threads=1)
    t = harness.interleave({"matmul": lambda: a @ b, "einsum": lambda: torch.einsum("ij,jk", a, b)})
    harness.report("matmul vs einsum", [("einsum / matmul", harness.ratio(t["einsum"], t["matmul"]))])
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from threadpoolctl import threadpool_limits

SUMMARY_ENV = "TL_BENCH_SUMMARY"
"""Environment variable naming the JSON-lines file :func:`report` appends to (set by ``make bench``)."""

KINDS = ("cpu", "wall")
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def fix_threads(n: int) -> int:
    """Use ``n`` threads for torch's intra-op pool and every loaded BLAS/OpenMP pool, children included.

    Args:
        n: number of threads, >= 1.

    Returns:
        The thread count torch now reports.

    Raises:
        ValueError: if ``n`` < 1.
    """
    import torch

    if n < 1:
        raise ValueError(f"fix_threads: n must be >= 1, got {n}")
    for variable in _THREAD_VARIABLES:  # read by child processes when they load their libraries
        os.environ[variable] = str(n)
    threadpool_limits(limits=n)  # pools already loaded in this process (numpy's BLAS, OpenMP)
    torch.set_num_threads(n)
    return torch.get_num_threads()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
MMAP_THRESHOLD = 32 * 2**20
"""Blocks below this come from the heap (glibc's largest value; larger blocks are always mapped anew)."""
TRIM_THRESHOLD = 2**31 - 1
"""Free memory at the top of the heap is handed back to the OS only beyond this (the largest C int)."""
_ALLOCATOR_OPTIONS = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
_allocator = "default"


def fix_allocator() -> bool:
    """Make glibc's malloc keep freed memory, so that a call does not pay for page faults of the last one.

    glibc maps large blocks with ``mmap`` and trims the heap once its free top grows past a threshold it
    moves with the process's allocation history; memory handed back is zero-filled by page faults on next
    use. That kernel time is part of the process CPU time and is not repeatable: an uncached training epoch
    of ``bench_feature_cache`` had 0.39 s of it in one process and 0.83 s in the next, same user time.
    Fixing both thresholds (:data:`MMAP_THRESHOLD`, :data:`TRIM_THRESHOLD`) keeps blocks below 32 MiB in
    the heap and the heap resident, like the caching allocators of a GPU. Larger blocks still fault in
    on every call.

    Returns:
        Whether the thresholds were set (``False`` where the C library is not glibc).
    """
    global _allocator
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    fixed = all(mallopt(option, value) for option, value in _ALLOCATOR_OPTIONS)
    _allocator = "glibc malloc keeps freed memory" if fixed else "default"
    return fixed


MIMALLOC_SETTINGS = {"MIMALLOC_PURGE_DELAY": "-1"}
"""mimalloc options for timed processes: never purge, i.e. never hand freed memory back to the OS."""
_RESTARTED = "TL_BENCH_RESTARTED_UNDER_MIMALLOC"


def mimalloc_library() -> Path | None:
    """``libmimalloc.so`` of the ``cmeel-mimalloc`` wheel (``bench-allocator`` extra); ``None`` without it."""
    try:
        library = Path(importlib.metadata.distribution("cmeel-mimalloc").locate_file("cmeel.prefix/lib"))
    except importlib.metadata.PackageNotFoundError:
        return None
    found = sorted(library.glob("libmimalloc.so*"))
    return found[0] if found else None


def _mimalloc_loaded() -> bool:
    return hasattr(ctypes.CDLL(None), "mi_version")


def use_caching_allocator() -> bool:
    """Make this process allocate with mimalloc that keeps freed memory, re-running it if need be.

    glibc's malloc maps every block of 32 MiB or more anew and unmaps it on ``free``, so each call of an arm
    that allocates such blocks (a batched forward+backward over 256 samples: 740k minor page faults, 1.8 s
    of system time beside 2.3 s of user time) pays a kernel time that moves from process to process.
    mimalloc with :data:`MIMALLOC_SETTINGS` reuses its own pages: after the first call no page faults at all.
    A running process cannot change its ``malloc``, so the script is started again (``os.execve``, same
    interpreter and arguments) with ``LD_PRELOAD`` naming :func:`mimalloc_library`. Child processes inherit
    it; :func:`peak_rss_in_child` and :func:`default_allocator_environment` take it away again.

    Returns:
        Whether mimalloc is this process's allocator (``False`` when the wheel is missing, or when the
        restart did not load it: then a warning is printed and glibc's malloc stays).
    """
    if _mimalloc_loaded():
        return True
    library = mimalloc_library()
    if library is None:
        return False
    if os.environ.get(_RESTARTED):
        print(f"harness: LD_PRELOAD={library} did not load mimalloc; timing with glibc malloc", flush=True)
        return False
    preload = " ".join(filter(None, [str(library), os.environ.get("LD_PRELOAD")]))
    environment = os.environ | MIMALLOC_SETTINGS | {"LD_PRELOAD": preload, _RESTARTED: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)


def default_allocator_environment() -> dict[str, str]:
    """This process's environment without what :func:`use_caching_allocator` added (for child processes)."""
    environment = {k: v for k, v in os.environ.items() if k not in MIMALLOC_SETTINGS and k != _RESTARTED}
    preload = [item for item in environment.pop("LD_PRELOAD", "").split() if "libmimalloc" not in item]
    return environment | ({"LD_PRELOAD": " ".join(preload)} if preload else {})


def machine() -> str:
    """One line with what decides a timing: threads, allocator, load average, CPUs, torch version."""
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    torch = sys.modules.get("torch")
    version = f", torch {torch.__version__}" if torch else ""
    cpus = os.cpu_count()
    allocator = "mimalloc keeps freed memory" if _mimalloc_loaded() else _allocator
    return f"{_threads()} torch threads, allocator {allocator}, load average {load} on {cpus} CPUs{version}"


def begin(title: str, threads: int) -> None:
    """Fix the allocator and the thread count, print the title with :func:`machine` (call first).

    This may start the script again under mimalloc (:func:`use_caching_allocator`): nothing it did before
    the call is kept, so call it before any work.
    """
    if not use_caching_allocator():
        fix_allocator()
    fix_threads(threads)
    print(f"{title}\n{machine()}", flush=True)


def _keep_freed_memory() -> None:
    """In a child of :func:`interleave_in_processes`: mimalloc comes with the caller's ``LD_PRELOAD``, but
    glibc's thresholds are per process, so they are fixed again here when mimalloc is not loaded."""
    if not _mimalloc_loaded():
        fix_allocator()


@dataclass
class Timing:
    """Seconds per call of one arm, one entry per kept round.

    Args:
        wall: wall-clock seconds (``time.perf_counter``).
        cpu: CPU seconds of the whole process, all threads (``time.process_time``).
    """

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def values(self, kind: str = "cpu") -> list[float]:
        """The per-round seconds of one clock, ``kind`` in :data:`KINDS`."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return self.wall if kind == "wall" else self.cpu

    def median(self, kind: str = "cpu") -> float:
        return statistics.median(self.values(kind))

    def min(self, kind: str = "cpu") -> float:
        return min(self.values(kind))

    def max(self, kind: str = "cpu") -> float:
        return max(self.values(kind))

    def per(self, n: int) -> Timing:
        """The same timing divided by ``n`` (e.g. seconds per step when each call runs ``n`` steps)."""
        return Timing([t / n for t in self.wall], [t / n for t in self.cpu])

    def minus(self, other: Timing) -> Timing:
        """Round-by-round difference ``self - other`` (e.g. what an arm's extras cost per call)."""
        if len(self.cpu) != len(other.cpu):
            raise ValueError(f"minus needs paired rounds: {len(self.cpu)} vs {len(other.cpu)}")
        return Timing(
            [a - b for a, b in zip(self.wall, other.wall, strict=True)],
            [a - b for a, b in zip(self.cpu, other.cpu, strict=True)],
        )

    def describe(self, kind: str = "cpu") -> str:
        """``"12.3 ms [11.9-13.0]"``: median and min-max (the median alone for a single round)."""
        scale, unit = (1e3, "ms") if abs(self.median(kind)) < 1 else (1.0, "s")
        low, median, high = (scale * f(kind) for f in (self.min, self.median, self.max))
        if len(self.values(kind)) == 1:
            return f"{_number(median)} {unit}"
        return f"{_number(median)} {unit} [{_number(low)}-{_number(high)}]"


def _clocks() -> tuple[float, float]:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def interleave(
    arms: dict[str, Callable[[], object]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    clock: Callable[[], tuple[float, float]] = _clocks,
) -> dict[str, Timing]:
    """Call the arms in turn, ``warmup + repeats`` rounds of A B C ..., and time the kept rounds.

    Garbage is collected before every call, outside the timed window, so no arm pays for another's, and
    automatic collection is off during the call, as in ``timeit``: a collection runs when some allocation
    crosses the threshold, so it would land in whichever arm or hook happens to make it.

    Args:
        arms: name -> zero-argument callable; one call is one measurement.
        repeats: rounds kept.
        warmup: leading rounds run but not kept (first-call costs: allocator, caches, lazy imports).
        clock: returns ``(wall seconds, CPU seconds)``; read right before and after each call.

    Returns:
        name -> :class:`Timing` with ``repeats`` entries per clock.

    Raises:
        ValueError: for no arms, ``repeats`` < 1 or ``warmup`` < 0.
    """
    if not arms or repeats < 1 or warmup < 0:
        raise ValueError(
            f"interleave needs at least one arm, repeats >= 1 and warmup >= 0; got {len(arms)} arms, "
            f"repeats={repeats}, warmup={warmup}"
        )
    timings = {name: Timing() for name in arms}
    for round_ in range(warmup + repeats):
        for name, call in arms.items():
            gc.collect()
            collecting = gc.isenabled()
            gc.disable()
            try:
                wall, cpu = clock()
                call()
                wall_end, cpu_end = clock()
            finally:
                if collecting:
                    gc.enable()
            if round_ >= warmup:
                timings[name].wall.append(wall_end - wall)
                timings[name].cpu.append(cpu_end - cpu)
    return timings


@dataclass(frozen=True)
class Ratio:
    """A over B from paired rounds: the median of the per-round ratios and their min (low) and max (high)."""

    median: float
    low: float
    high: float
    kind: str = "cpu"

    def __str__(self) -> str:
        return f"{_number(self.median)}x [{_number(self.low)}-{_number(self.high)}]"


def ratio(a: Timing, b: Timing, kind: str = "cpu") -> Ratio:
    """``a / b`` round by round (round i of ``a`` was measured next to round i of ``b``).

    Raises:
        ValueError: if the two timings have different numbers of rounds, or ``kind`` is unknown.
    """
    top, bottom = a.values(kind), b.values(kind)
    if len(top) != len(bottom):
        raise ValueError(f"ratio needs paired rounds: {len(top)} vs {len(bottom)}")
    pairs = [x / y for x, y in zip(top, bottom, strict=True)]
    return Ratio(statistics.median(pairs), min(pairs), max(pairs), kind)


def _number(value: float) -> str:
    """Three significant digits at most, at least two decimals below 10: 0.0183, 2.31, 25.4, 312."""
    if abs(value) < 0.1:
        return f"{value:.3g}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"


def peak_rss_in_child(target: str, *args: Any) -> int:
    """Peak resident memory, in bytes, of a fresh Python process that runs ``target(*args)``.

    ``target`` is ``"package.module:function"``, ``"path/to/script.py:function"``, a module next to this
    file (``"bench_fisher:function"``), or ``"__main__:function"`` for the calling script's own function.
    The child starts with the caller's thread count and inherits its stdout/stderr, and allocates with the
    default ``malloc`` (the one users run with), not the caching one of :func:`use_caching_allocator`.

    The high-water mark counts from the child's start (interpreter, imports and all). If the function
    returns a callable, that callable is the arm: the high-water mark is reset (Linux ``clear_refs``)
    after the function returns and read after the callable ran, so set-up spikes are left out while the
    memory the set-up still holds counts.

    Args:
        target: what to run, as above.
        args: JSON-serialisable positional arguments.

    Returns:
        Peak RSS in bytes (``VmHWM``; ``ru_maxrss`` where ``/proc`` is missing).

    Raises:
        RuntimeError: if the child exits with an error (its traceback is on stderr).
    """
    return _in_child("peak", target, args, default_allocator_environment())["peak"]


def interleave_in_processes(target: str, processes: int, *args: Any) -> dict[str, Timing]:
    """Run ``target(*args)``, which returns name -> :class:`Timing`, in fresh processes; join their rounds.

    A measurement of microseconds of Python moves from one process to the next: the per-step hook time
    of ``bench_callbacks`` had medians from 46 to 55 us in six processes (not the CPU a process ran on,
    not the hash seed; where code and data land in memory is the usual suspect, and the reason ``pyperf``
    runs worker processes). The processes run one after another, with this process's
    allocator and thread count; rounds stay paired inside their process, so :func:`ratio` still pairs
    round i of one arm with round i of another.

    Args:
        target: as for :func:`peak_rss_in_child`; typically a function that calls :func:`interleave`.
        processes: how many fresh processes, >= 1.
        args: JSON-serialisable positional arguments.

    Returns:
        name -> :class:`Timing` with the rounds of every process, process by process.

    Raises:
        ValueError: if ``processes`` < 1.
        RuntimeError: if a child exits with an error.
    """
    if processes < 1:
        raise ValueError(f"interleave_in_processes needs processes >= 1, got {processes}")
    joined: dict[str, Timing] = {}
    for _ in range(processes):
        for name, rounds in _in_child("timings", target, args, dict(os.environ)).items():
            timing = joined.setdefault(name, Timing())
            timing.wall += rounds["wall"]
            timing.cpu += rounds["cpu"]
    return joined


def _in_child(measure: str, target: str, args: tuple[Any, ...], environment: dict[str, str]) -> Any:
    """Run ``target`` in a fresh interpreter (:func:`_child`); return what it measured, read back as JSON."""
    module, _, function = target.partition(":")
    if module == "__main__":
        module = os.path.abspath(sys.modules["__main__"].__file__)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / f"{measure}.json"
        command = [sys.executable, os.path.abspath(__file__), "--child", f"{module}:{function}"]
        command += ["--measure", measure, "--threads", str(_threads()), "--args", json.dumps(args)]
        code = subprocess.run([*command, "--out", str(out)], env=environment, check=False).returncode
        if code != 0:
            caller = "peak_rss_in_child" if measure == "peak" else "interleave_in_processes"
            raise RuntimeError(f"{caller}({target!r}, ...) failed: the child exited with {code}")
        return json.loads(out.read_text())


def _threads() -> int:
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch else int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))


def _resolve(target: str) -> Callable[..., Any]:
    module_name, _, function = target.partition(":")
    if not function:
        raise ValueError(f"target must be 'module:function' or 'path.py:function', got {target!r}")
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, function)


def _high_water_mark() -> int:
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def _child(measure: str, target: str, threads: int, args: list[Any], out: Path) -> None:
    # the harness itself imports no torch here, so a torch-free target measures only itself
    for variable in _THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    if measure == "timings":
        _keep_freed_memory()
    function = _resolve(target)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    result = function(*args)
    if measure == "timings":
        out.write_text(json.dumps({name: {"wall": t.wall, "cpu": t.cpu} for name, t in result.items()}))
        return
    if callable(result):
        clear_refs = Path("/proc/self/clear_refs")
        if clear_refs.exists():
            clear_refs.write_text("5")  # high-water mark := current RSS
        result()
    out.write_text(json.dumps({"peak": _high_water_mark()}))


def report(title: str, rows: list[tuple[str, str | Ratio]]) -> None:
    """Print ``rows`` as a table under ``title`` and the machine line; append them to the run's summary.

    Under ``make bench`` (environment variable ``TL_BENCH_SUMMARY`` set to a JSON-lines file) every row
    becomes one JSON line ``{"script", "title", "label", "value", "machine"}``, plus ``median``, ``low``,
    ``high`` and ``kind`` for a :class:`Ratio`. Without the variable nothing is written.

    Args:
        title: what was measured (benchmark and setting); the summary groups rows by it.
        rows: ``(label, value)``; a value is a :class:`Ratio` or any preformatted string. The ``make bench``
            summary table lists the :class:`Ratio` rows (and ``skip`` rows); strings stay in this table.
    """
    table = Table(title=escape(title), title_justify="left")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    for label, value in rows:
        table.add_row(escape(label), escape(str(value)))
    Console(width=120).print(table)
    print(machine(), flush=True)
    path = os.environ.get(SUMMARY_ENV)
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as file:
        for label, value in rows:
            row = {"script": Path(sys.argv[0]).stem, "title": title, "label": label, "value": str(value)}
            row["machine"] = machine()
            if isinstance(value, Ratio):
                row |= {"median": value.median, "low": value.low, "high": value.high, "kind": value.kind}
            file.write(json.dumps(row) + "\n")


def skip(title: str, reason: str) -> None:
    """Report a benchmark (or part of one) as not run, e.g. an optional dependency is missing."""
    report(title, [("skipped", reason)])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="child of peak_rss_in_child / interleave_in_processes")
    parser.add_argument("--child", required=True)
    parser.add_argument("--measure", choices=("peak", "timings"), required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--args", required=True)
    parser.add_argument("--out", type=Path, required=True)
    options = parser.parse_args()
    _child(options.measure, options.child, options.threads, json.loads(options.args), options.out)
