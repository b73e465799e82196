"""The streaming engine: pairs in, report rows out, with bounded memory.

Two ways through, one contract (rows in plan order, at most a byte budget of tensor data held at once, each
pair's data handed back to its source as soon as its row is made):

- the tensor path, for GPUs and spectral metrics: a background reader thread fetches the next pairs' tensors
  (a view of a memory map faulted in, or a Hub range read) and, on CUDA, copies them to the device on its own
  stream, while the current pair is computed by the pure metric functions;
- the fused path, for element-wise metrics on the CPU: each pair's stored bytes go straight to the C kernel
  (metrics/fused.py), split into chunks that a thread pool runs while the next pairs are read. It never imports
  torch, and the pool's threads fault the mapped pages in themselves, in parallel. A pair whose source makes
  its tensors (a merged adapter, dequantised FP8) or whose dtype the kernel does not take goes through torch.

The engine knows nothing about files, the CLI or output formats: it yields rows (dicts keyed by the report
schema's column names).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from weightdiff.errors import InputError, WeightdiffError
from weightdiff.metrics import fused
from weightdiff.metrics.fused import DEFAULT_ATOL
from weightdiff.naming import expert_of, layer_of, module_of
from weightdiff.pairing import Pair, Plan
from weightdiff.sources.base import Source
from weightdiff.sources.format import TensorInfo

if TYPE_CHECKING:
    import torch


@dataclass
class EngineOptions:
    """Everything that changes the numbers or where they are computed."""

    atol: float = DEFAULT_ATOL
    device: str = "auto"
    spectral: bool = True
    rank: int = 64
    principal_rank: int = 64
    alpha: float = 0.5
    svd: str = "auto"
    #: Bytes of tensor data the reader may hold ahead of the compute side (0 = one pair at a time; None =
    #: the default for the device, see ``prefetch_default``).
    prefetch_bytes: int | None = None
    #: Also return per-tensor singular values and angle vectors (for --spectra).
    keep_spectra: bool = False
    #: Bound on the memory the engine uses (host and device), in bytes; None = no bound (see memory_plan).
    max_memory: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "atol": self.atol,
            "device": self.device,
            "spectral": self.spectral,
            "rank": self.rank,
            "principal_rank": self.principal_rank,
            "alpha": self.alpha,
            "svd": self.svd,
        }


@dataclass
class Timings:
    """Where the time went, in seconds: ``read_wait``, the compute side waiting for data; ``reader_busy``, the
    reader loading it; ``transfer``, host-to-device copies (on CUDA issued by the reader, overlapping the
    compute, summed over its threads); ``compute``, the metrics, including any wait for a copy to land."""

    read_wait: float = 0.0
    transfer: float = 0.0
    compute: float = 0.0
    reader_busy: float = 0.0
    extras: dict[str, float] = field(default_factory=dict)


# Device nodes of the GPU drivers torch can use on Linux: NVIDIA, AMD ROCm, and WSL2's GPU bridge.
_GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def _surely_no_gpu() -> bool:
    """Whether this machine certainly has no GPU torch could use, decided without importing torch (about a
    second of start-up): on Linux, no GPU driver's device node exists. Anywhere else, torch is asked."""
    if not sys.platform.startswith("linux") or "torch" in sys.modules:
        return False
    return not any(os.path.exists(node) for node in _GPU_DEVICE_NODES)


def device_name(spec: str) -> tuple[str, str]:
    """Like ``resolve_device``, as a string (``cpu``, ``cuda:0``), and without importing torch for the CPU."""
    if spec == "cpu":
        return "cpu", "as requested"
    if spec == "auto" and _surely_no_gpu():
        return "cpu", "auto: no CUDA device, using the CPU"
    device, why = resolve_device(spec)
    return str(device), why


def resolve_device(spec: str) -> tuple[torch.device, str]:
    """The torch device for ``--device`` and a sentence saying why it was chosen."""
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), f"auto: CUDA is available ({torch.cuda.get_device_name(0)})"
        return torch.device("cpu"), "auto: no CUDA device, using the CPU"
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise InputError(f"--device: {spec!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise InputError(f"--device: {spec!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return device, "as requested"


# Bytes per element of the float64 working set of the spectral metrics for one matrix pair under the exact and
# gram solvers: both matrices, the update, the rank-r reconstruction and its magnitudes (about 5 float64
# matrices plus boolean masks). The fast solver's float32 working set stays below it.
SPECTRAL_BYTES_PER_ELEMENT = 6 * 8
#: Read-ahead when none is asked for, and on CUDA without --max-memory (see prefetch_default).
DEFAULT_PREFETCH_BYTES = 256 << 20
CUDA_PREFETCH_BYTES = 1 << 30
# Bytes of temporaries per element in the chunked element-wise path (float64 copies, masks, bf16 roundings).
ELEMENTWISE_BYTES_PER_ELEMENT = 48


@dataclass(frozen=True)
class MemoryPlan:
    prefetch_bytes: int
    chunk: int | None


def prefetch_default(options: EngineOptions, device: str = "cpu") -> int:
    """The read-ahead in bytes: as asked, else 256 MiB, or on CUDA without --max-memory 1 GiB.

    On CUDA the read-ahead is held in device memory, not the host's, and 256 MiB is less than one layer of an
    8B model: the copies of the next pairs could not keep ahead of the metrics (on the H100 the reader sat idle
    a third of the run, docs/performance.md)."""
    if options.prefetch_bytes is not None:
        return options.prefetch_bytes
    if device.startswith("cuda") and options.max_memory is None:
        return CUDA_PREFETCH_BYTES
    return DEFAULT_PREFETCH_BYTES


def memory_plan(plan: Plan, options: EngineOptions, device: str = "cpu") -> MemoryPlan:
    """How the engine stays under ``--max-memory``, or a clear error when one pair cannot.

    Read-ahead gets a quarter of the budget, element-wise temporaries are bounded by the chunk size, and every
    pair (plus, with spectral metrics, its float64 working set) must fit in what remains; the check runs on the
    plan, before any tensor is read.
    """
    if options.max_memory is None:
        return MemoryPlan(prefetch_default(options, device), None)
    budget = options.max_memory
    prefetch = min(prefetch_default(options, device), budget // 4)
    chunk = max(1 << 16, (budget // 4) // ELEMENTWISE_BYTES_PER_ELEMENT)
    for pair in plan.pairs:
        need = pair.nbytes
        if options.spectral and len(pair.base.shape) == 2 and min(pair.base.shape) >= 2:
            need += pair.base.numel * SPECTRAL_BYTES_PER_ELEMENT
        if need > budget - prefetch:
            hint = " (use --no-spectral or raise the limit)" if options.spectral else ""
            raise InputError(
                f"--max-memory {_size(budget)} is too small: {pair.name} needs about {_size(need + prefetch)}{hint}"
            )
    return MemoryPlan(prefetch, chunk)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def identity_columns(pair: Pair) -> dict[str, Any]:
    return {
        "name": pair.name,
        "layer": layer_of(pair.name),
        "expert": expert_of(pair.name),
        "module": module_of(pair.name),
        "shape": list(pair.base.shape),
        "dtype_base": pair.base.dtype,
        "dtype_tuned": pair.tuned.dtype,
    }


_DONE = object()


def _load_tensor(source: Source, info: TensorInfo) -> torch.Tensor:
    """The reader's default load: the tensor, with its pages faulted in on the reader thread so that the
    compute side finds them resident. One byte per 4 KiB page is enough; the sum releases the GIL."""
    import torch

    t = source.read(info)
    if t.numel():
        t.reshape(-1).view(torch.uint8)[::4096].sum()
    return t


@dataclass(frozen=True)
class ReadJob:
    """One unit of work for the reader: tensors to load together (a pair, or one tensor of one checkpoint)."""

    key: Any
    parts: tuple[tuple[Source, TensorInfo], ...]

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _, info in self.parts)


class Reader:
    """Background thread that loads jobs ahead of the compute side, bounded by bytes in flight.

    Iterating yields ``(job, loaded)`` in job order, ``loaded`` holding what ``load`` returned for each part
    (by default a CPU tensor with its pages faulted in); call ``done(job)`` once they are no longer needed so
    that the next jobs may be admitted and, unless ``release=False``, the sources may drop the data.
    """

    def __init__(
        self,
        jobs: list[ReadJob],
        budget: int,
        timings: Timings | None = None,
        load: Callable[[Source, TensorInfo], Any] | None = None,
    ) -> None:
        self.jobs, self.budget = jobs, budget
        self.load = load if load is not None else _load_tensor
        self.timings = timings if timings is not None else Timings()
        self.queue: queue.Queue[Any] = queue.Queue()
        self.in_flight = 0
        self.cond = threading.Condition()
        self.stop = False
        self.thread = threading.Thread(target=self._run, name="weightdiff-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for job in self.jobs:
                with self.cond:
                    # Admit a job when nothing is in flight, or when it fits in the byte budget.
                    while not self.stop and self.in_flight and self.in_flight + job.nbytes > self.budget:
                        self.cond.wait()
                    if self.stop:
                        return
                    self.in_flight += job.nbytes
                t0 = time.perf_counter()
                tensors = self._load_parts(job)
                self.timings.reader_busy += time.perf_counter() - t0
                self.queue.put((job, tensors))
        except BaseException as exc:  # handed to the compute side, which re-raises it
            self.queue.put(exc)
            return
        self.queue.put(_DONE)

    def _load_parts(self, job: ReadJob) -> list[Any]:
        # A pair's two sides load at once: over the network each is a round trip (or several) whose waits
        # overlap; on local disk the second side's page faults overlap the first's. The helper threads are
        # daemons, as the reader is: a load still retrying when the run is abandoned never holds up exit.
        if len(job.parts) == 1:
            return [self.load(*job.parts[0])]
        loaded: list[Any] = [None] * len(job.parts)
        errors: list[BaseException] = []

        def side(i: int, src: Source, info: TensorInfo) -> None:
            try:
                loaded[i] = self.load(src, info)
            except BaseException as exc:  # re-raised on the reader thread below
                errors.append(exc)

        helpers = [
            threading.Thread(target=side, args=(i, src, info), name="weightdiff-reader-side", daemon=True)
            for i, (src, info) in enumerate(job.parts[1:], start=1)
        ]
        for t in helpers:
            t.start()
        try:
            loaded[0] = self.load(*job.parts[0])
        finally:
            for t in helpers:
                t.join()
        if errors:
            raise errors[0]
        return loaded

    def __iter__(self) -> Iterator[tuple[ReadJob, list[Any]]]:
        while True:
            t0 = time.perf_counter()
            item = self.queue.get()
            self.timings.read_wait += time.perf_counter() - t0
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def done(self, job: ReadJob, release: bool = True) -> None:
        if release:
            for src, info in job.parts:
                src.release(info)
        with self.cond:
            self.in_flight -= job.nbytes
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        self.thread.join(timeout=5)


def compare_pairs(
    base: Source,
    tuned: Source,
    plan: Plan,
    options: EngineOptions,
    on_progress: Callable[[Pair], None] | None = None,
    timings: Timings | None = None,
    spectra: list[dict[str, Any]] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield one report row per planned pair, in plan order."""
    device, _why = device_name(options.device)
    timings = timings if timings is not None else Timings()
    mem = memory_plan(plan, options, device)
    if device == "cpu" and not options.spectral and fused.available():
        yield from _fused_rows(base, tuned, plan, options, mem, on_progress, timings)
    else:
        yield from _tensor_rows(base, tuned, plan, options, mem, device, on_progress, timings, spectra)


@dataclass
class _Pending:
    """A pair on the fused path: its row so far, the buffers the kernel reads, and the kernel's futures."""

    pair: Pair
    nbytes: int
    row: dict[str, Any]
    keep: tuple[Any, ...] = ()
    futures: list[Any] = field(default_factory=list)


def _load_buffer(source: Source, info: TensorInfo) -> Any:
    """The fused path's load: the stored bytes, when the kernel takes the dtype and the source stores them."""
    return source.read_buffer(info) if info.dtype in fused.DTYPE_CODES else None


def _fused_rows(
    base: Source,
    tuned: Source,
    plan: Plan,
    options: EngineOptions,
    mem: MemoryPlan,
    on_progress: Callable[[Pair], None] | None,
    timings: Timings,
) -> Iterator[dict[str, Any]]:
    import numpy as np

    # The reader thread fetches stored bytes (a slice of a memory map, or a Hub download) up to half the
    # budget ahead; the pairs whose kernel chunks are queued or running hold the other half. A pair leaves the
    # reader's count once its chunks are queued, and goes back to its source once its row is made.
    jobs = [ReadJob(pair, ((base, pair.base), (tuned, pair.tuned))) for pair in plan.pairs]
    half = mem.prefetch_bytes // 2
    reader = Reader(jobs, half, timings=timings, load=_load_buffer)
    window: deque[_Pending] = deque()
    held = 0

    def finish(p: _Pending) -> dict[str, Any]:
        t0 = time.perf_counter()
        if p.futures:
            p.row.update(fused.collect(p.futures, p.pair.base.numel))
        timings.compute += time.perf_counter() - t0
        p.keep = ()
        base.release(p.pair.base)
        tuned.release(p.pair.tuned)
        if on_progress is not None:
            on_progress(p.pair)
        return p.row

    try:
        for job, (bx, by) in reader:
            pair = job.key
            entry = _Pending(pair, pair.nbytes, identity_columns(pair))
            if bx is None or by is None:
                # A computed tensor, or a dtype the kernel does not take: torch, right here (a side that did
                # come as stored bytes is viewed, not read again).
                from weightdiff.metrics.elementwise import elementwise_metrics
                from weightdiff.sources.base import bytes_to_tensor

                t1 = time.perf_counter()
                x = bytes_to_tensor(bx, pair.base) if bx is not None else base.read(pair.base)
                y = bytes_to_tensor(by, pair.tuned) if by is not None else tuned.read(pair.tuned)
                entry.row.update(elementwise_metrics(x, y, atol=options.atol, chunk=mem.chunk))
                del x, y
                timings.compute += time.perf_counter() - t1
            else:
                ax, ay = np.frombuffer(bx, dtype=np.uint8), np.frombuffer(by, dtype=np.uint8)
                entry.keep = (bx, by, ax, ay)
                entry.futures = fused.submit(
                    ax.ctypes.data,
                    fused.DTYPE_CODES[pair.base.dtype],
                    ay.ctypes.data,
                    fused.DTYPE_CODES[pair.tuned.dtype],
                    pair.base.numel,
                    options.atol,
                )
            del bx, by
            reader.done(job, release=False)
            window.append(entry)
            held += entry.nbytes
            # Rows leave in plan order; the oldest pair is waited for once the window holds its share. A pair
            # leaves the window only once its row is made, so the cleanup below sees every pair in flight.
            while window and (held > half or all(f.done() for f in window[0].futures)):
                row = finish(window[0])
                held -= window.popleft().nbytes
                yield row
        while window:
            row = finish(window[0])
            held -= window.popleft().nbytes
            yield row
    finally:
        reader.close()
        # On an error, Ctrl-C or an abandoned iteration: no kernel chunk may still read a buffer once the
        # sources are closed, so every pair in flight is drained first.
        for p in window:
            fused.drain(p.futures)


def _tensor_rows(
    base: Source,
    tuned: Source,
    plan: Plan,
    options: EngineOptions,
    mem: MemoryPlan,
    device_spec: str,
    on_progress: Callable[[Pair], None] | None,
    timings: Timings,
    spectra: list[dict[str, Any]] | None,
) -> Iterator[dict[str, Any]]:
    import torch

    from weightdiff.metrics.elementwise import elementwise_metrics

    device = torch.device(device_spec)
    spectral_fn = None
    if options.spectral:
        from weightdiff.metrics.spectral import SpectralOptions, spectral_metrics

        spectral_opts = SpectralOptions(
            rank=options.rank, principal_rank=options.principal_rank, alpha=options.alpha, solver=options.svd
        )
        spectral_fn = spectral_metrics
    jobs = [ReadJob(pair, ((base, pair.base), (tuned, pair.tuned))) for pair in plan.pairs]
    copier = _DeviceCopier(device) if device.type == "cuda" else None
    reader = Reader(jobs, mem.prefetch_bytes, timings=timings, load=copier.load if copier else None)
    try:
        for job, (x, y) in reader:
            pair = job.key
            t1 = time.perf_counter()
            if copier is not None:
                x, y = copier.arrive(x), copier.arrive(y)
            elif device.type != "cpu":
                x = x.to(device)
                y = y.to(device)
            t2 = time.perf_counter()
            row = identity_columns(pair)
            try:
                row.update(elementwise_metrics(x, y, atol=options.atol, chunk=mem.chunk))
                if spectral_fn is not None and x.dim() == 2 and min(x.shape) >= 2:
                    spec = spectral_fn(x, y, spectral_opts)
                    row.update(spec.columns)
                    if spectra is not None and options.keep_spectra:
                        spectra.append({"name": pair.name, **spec.vectors})
            except WeightdiffError:
                raise
            except RuntimeError as exc:
                raise WeightdiffError(f"{pair.name}: computing metrics failed on {device} ({exc})") from exc
            timings.transfer += t2 - t1
            timings.compute += time.perf_counter() - t2
            del x, y
            reader.done(job)
            if on_progress is not None:
                on_progress(pair)
            yield row
    finally:
        reader.close()
        if copier is not None:
            timings.transfer += copier.seconds


class _DeviceCopier:
    """The reader's load on CUDA: each tensor is copied to the device on the reader's own stream, so the next
    pairs' copies overlap the current pair's metrics; the compute stream waits for a copy's event, never for
    the host.

    The copy is from the memory map itself. No pinned staging: on the H100 run (docs/performance.md) pinning
    a buffer per tensor cost more than it saved, and a copy from pageable memory returns only once the bytes
    are staged, so the map may be released as soon as ``load`` returns.
    """

    def __init__(self, device: Any) -> None:
        import torch

        # A bare "cuda" means the current device of the calling thread; the reader's threads have their own
        # current device (0), so the index is fixed here.
        self.device = (
            device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        )
        self.stream = torch.cuda.Stream(self.device)
        self.seconds = 0.0
        self.lock = threading.Lock()

    def load(self, source: Source, info: TensorInfo) -> Any:
        import torch

        host = _load_tensor(source, info)
        t0 = time.perf_counter()
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            dev = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        with self.lock:
            self.seconds += time.perf_counter() - t0
        return dev, done

    def arrive(self, loaded: Any) -> Any:
        import torch

        dev, done = loaded
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        # Made on the copy stream, used and freed on the compute stream.
        dev.record_stream(current)
        return dev
