"""Running ``compare``, ``spectrum`` and ``consistency`` as several processes under ``torchrun``.

When the environment says so (``WORLD_SIZE`` > 1, with ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` as torchrun sets them), ``current()`` returns a ``Shard``; in a single process it returns None
and nothing here imports ``torch.distributed`` or touches a process group. Under a ``Shard``:

- ``collective`` (a decorator on the API functions and CLI commands) joins the process group over the env://
  rendezvous (nccl when the work runs on CUDA, gloo otherwise) and wraps the call in a *session*: whatever a
  rank raises, every rank learns of it at the next status exchange and raises ``RankFailed``, whose exit code
  is the failing rank's; only rank 0 prints it (``quiet`` elsewhere).
- ``Shard.select`` gives this rank a deterministic share of the planned items, balanced by cost (greedy,
  largest first, onto the least-loaded rank: ``assign``), after a status exchange that also checks that every
  rank planned the same work.
- ``Shard.merged`` runs this rank's rows through ``track`` (which tensor is being worked on, the test hook,
  early abort when another rank failed), exchanges statuses again, and gathers every rank's rows (and extras:
  --spectra vectors, --stripes tables) to rank 0, which gets them back in plan order, so that the report it
  writes is the one a single process writes.
- ``is_leader``: only rank 0 checks output paths, writes files and prints.

Exchanges happen at fixed points that every rank passes in the same order: after the plan (``select``), after
the rank's share (``merged``), and at the end of the session. A rank that fails anywhere sends its failure at
the next exchange the others are waiting in, so no rank is left waiting and no rank writes anything after a
failure; it also sets a flag in the rendezvous store so that the others stop before their next tensor. After
an agreed failure the ranks meet once more (``settle``) so that none exits, and makes torchrun terminate the
rest, before rank 0 has removed its temporary files. A rank that dies outright (killed, segfault) cannot
report; torchrun then sends SIGTERM to the others, which a session turns into ``SystemExit`` so that their
writers still clean up.

Test hook: ``WEIGHTDIFF_TEST_FAIL_TENSOR=NAME`` makes the rank whose share holds tensor NAME raise an
``InputError`` when it reaches it (distributed runs only; the single-process path never reads it).

This module computes no metric, prints nothing and writes no file; it does not cancel a tensor already being
computed when another rank fails (ranks stop at the next tensor), and it does not aggregate progress across
ranks (rank 0 shows its own share).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import functools
import hashlib
import heapq
import os
import pickle
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from weightdiff.errors import EXIT_USAGE, InputError, WeightdiffError

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

#: Test hook (see the module docstring).
FAIL_ENV = "WEIGHTDIFF_TEST_FAIL_TENSOR"
#: Seconds a rank may wait in one exchange. A rank that failed early waits there for the others to notice, and
#: the others only look between tensors, so this must exceed the longest single tensor; torchrun stops every
#: rank anyway when one dies, so a generous default costs nothing.
TIMEOUT_ENV = "WEIGHTDIFF_DIST_TIMEOUT"
_DEFAULT_TIMEOUT_S = 6 * 3600


class RankFailed(WeightdiffError):
    """Raised on every rank when any rank failed; carries the failing rank's exit code.

    ``quiet`` is true on ranks other than 0: rank 0 prints the one line, the others exit with the same code.
    """

    def __init__(self, message: str, exit_code: int, quiet: bool) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.quiet = quiet


class _Aborted(Exception):
    """Raised on a rank that stops early because another rank reported a failure."""


@dataclass(frozen=True)
class Failure:
    """What one rank reports at an exchange when it failed."""

    rank: int
    tensor: str | None
    message: str
    exit_code: int
    #: True when this rank only stopped because another one failed (not reported as a cause).
    aborted: bool = False


def assign(costs: Sequence[int], world: int) -> list[int]:
    """The rank of each item: greedy largest-first onto the least-loaded rank (ties: lower index, lower rank).

    Pure and deterministic, so every rank computes the same assignment from the same plan without talking.
    """
    loads = [(0, r) for r in range(world)]
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(loads)
        owner[i] = r
        heapq.heappush(loads, (load + costs[i], r))
    return owner


def svd_cost(shape: Sequence[int]) -> int:
    """Relative cost of the SVD-type work on an m x n matrix: m * n * min(m, n)."""
    m, n = int(shape[0]), int(shape[1])
    return m * n * min(m, n)


def pair_cost(shape: Sequence[int], nbytes: int, spectral: bool) -> int:
    """Balancing weight of one compare pair: its bytes, plus the SVD estimate when spectral metrics run on it.

    The units differ, but for any matrix worth balancing the SVD term dominates, and for vectors the bytes do.
    """
    if spectral and len(shape) == 2 and min(shape) >= 2:
        return svd_cost(shape) + nbytes
    return nbytes


_END = object()


class Buffer(list[Any]):
    """A list with ``write``: stands in for a streaming writer while a rank's extras wait for the gather."""

    def write(self, item: Any) -> None:
        self.append(item)

    def write_table(self, table: Any) -> None:
        self.append(table)


class Shard:
    """This process's place in a torch.distributed run (see the module docstring)."""

    def __init__(self, rank: int, world: int, local_rank: int) -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.backend: str | None = None
        self.active = False
        #: This rank's items, once ``select`` has run in the current session.
        self.share: list[Any] | None = None
        #: Name of the item being worked on (reported when the rank fails), or None.
        self.current: str | None = None
        self._session = 0
        self._broken = False
        self._agreed = False
        self._names: list[str] = []
        self._indices: list[int] = []
        self._marks: list[int] = []
        self._store: Any = None
        self._sigterm: Any = None

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------ process group

    def _init(self, device_spec: str) -> None:
        import torch
        import torch.distributed as dist

        if dist.is_initialized():  # the caller's own process group (weightdiff used inside a training script)
            self.backend = str(dist.get_backend())
        else:
            # The backend only carries our status objects and rows, but it must be one the device can use for
            # object collectives: nccl needs each rank bound to its own GPU first.
            use_cuda = not device_spec.startswith("cpu") and torch.cuda.is_available()
            self.backend = "nccl" if use_cuda else "gloo"
            if use_cuda:
                torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
            try:
                timeout = float(os.environ.get(TIMEOUT_ENV, _DEFAULT_TIMEOUT_S))
            except ValueError:
                raise InputError(f"{TIMEOUT_ENV} must be a number of seconds") from None
            try:
                dist.init_process_group(
                    backend=self.backend, init_method="env://", timeout=_dt.timedelta(seconds=timeout)
                )
            except (RuntimeError, ValueError, TimeoutError) as exc:
                raise InputError(
                    f"torch.distributed: rank {self.rank} cannot join the process group ({exc})"
                ) from exc
            atexit.register(_destroy)
        if dist.get_rank() != self.rank or dist.get_world_size() != self.world:
            raise InputError(
                f"torch.distributed: the process group says rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"the environment rank {self.rank} of {self.world}"
            )
        try:
            from torch.distributed.distributed_c10d import _get_default_store

            self._store = _get_default_store()
        except Exception:  # early abort is an optimisation: without the store ranks stop at the exchange
            self._store = None

    def device(self, spec: str) -> str:
        """The device this rank computes on: ``cuda:LOCAL_RANK`` for auto/cuda when CUDA is present."""
        import torch

        if spec in ("auto", "cuda") and torch.cuda.is_available():
            count = torch.cuda.device_count()
            if self.local_rank >= count:
                raise InputError(
                    f"LOCAL_RANK {self.local_rank} but only {count} CUDA device(s): start at most {count} "
                    "processes per node (torchrun --nproc-per-node)"
                )
            return f"cuda:{self.local_rank}"
        return spec

    # ------------------------------------------------------------------------------------------ session

    def begin(self, device_spec: str) -> None:
        if self.backend is None:
            self._init(device_spec)
        self.active = True
        self._session += 1
        self._broken = self._agreed = False
        self.share, self.current = None, None
        self._names, self._indices, self._marks = [], [], []
        # torchrun answers a worker that exits non-zero (or is killed) by sending SIGTERM to the others, whose
        # default action skips every cleanup. As an exception it unwinds the stack like Ctrl-C does, so the
        # writers remove their temporary files. Signal handlers can only be set from the main thread.
        self._sigterm = None
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _terminated)

    def end(self) -> None:
        self.active = False
        self.current = None
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None

    def settle(self) -> None:
        """After an agreed failure: wait until every rank has unwound (and removed its temporary files).

        torchrun stops the remaining workers as soon as one exits non-zero, so no rank may exit before rank 0
        has aborted its writers.
        """
        import torch.distributed as dist

        if self._agreed and not self._broken:
            with contextlib.suppress(Exception):
                dist.all_gather_object([None] * self.world, None)

    def finish(self) -> None:
        """The last exchange of a session that succeeded on this rank."""
        self._exchange("end")

    def fail(self, exc: BaseException) -> None:
        """Report ``exc`` to every rank; raises ``RankFailed`` (chained), or returns when ``exc`` should pass."""
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) or self._broken or self._agreed:
            # Interrupts stop every rank at once (torchrun forwards the signal); after a broken or already
            # agreed exchange there is nobody left to tell.
            return
        # typer's exceptions are told apart by shape: typer vendors click in some versions and not in others.
        code = getattr(exc, "exit_code", None)
        if isinstance(exc, _Aborted):
            failure = Failure(self.rank, self.current, "", EXIT_USAGE, aborted=True)
        elif isinstance(exc, WeightdiffError):
            failure = Failure(self.rank, self.current, str(exc), exc.exit_code)
        elif type(exc).__name__ == "Exit" and isinstance(code, int):  # typer.Exit: a gate's verdict (shown)
            if code == 0:
                self.finish()
                return
            failure = Failure(self.rank, None, "", code)
        elif hasattr(exc, "format_message") and isinstance(code, int):  # typer.BadParameter and the like
            failure = Failure(self.rank, None, exc.format_message(), code)
        else:
            failure = Failure(
                self.rank, self.current, f"internal error: {type(exc).__name__}: {exc}", EXIT_USAGE
            )
        if not failure.aborted and self._store is not None:
            # Tell the others now, so that they stop at their next tensor instead of finishing their share.
            with contextlib.suppress(Exception):
                self._store.set(self._abort_key, str(self.rank))
        self._exchange("failed", failure)

    @property
    def _abort_key(self) -> str:
        return f"weightdiff/abort/{self._session}"

    def _exchange(self, stage: str, failure: Failure | None = None, fingerprint: str | None = None) -> None:
        """All ranks swap ``(stage, failure, fingerprint)``; raise ``RankFailed`` on every rank if any failed."""
        import torch.distributed as dist

        if self.backend is None:
            self._init("auto")
        status = {"stage": stage, "failure": failure, "fingerprint": fingerprint}
        got: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(got, status)
        except Exception as exc:
            self._broken = True
            raise WeightdiffError(
                f"torch.distributed: rank {self.rank} lost contact with the others ({exc})"
            ) from exc
        failures = [s["failure"] for s in got if s["failure"] is not None]
        if not failures:
            if len({s["stage"] for s in got}) > 1:
                failures = [Failure(0, None, f"internal error: ranks out of step ({got})", EXIT_USAGE)]
            elif len({s["fingerprint"] for s in got}) > 1:
                differ = [r for r, s in enumerate(got) if s["fingerprint"] != got[0]["fingerprint"]]
                failures = [
                    Failure(
                        differ[0],
                        None,
                        "planned different tensors than rank 0 (did a checkpoint change while the ranks started?)",
                        EXIT_USAGE,
                    )
                ]
        if failures:
            self._agreed = True
            raise verdict(failures, self.world, self.rank)

    # ----------------------------------------------------------------------------------------- the work

    def select(self, items: Sequence[T], cost: Callable[[T], int], name: Callable[[T], str]) -> list[T]:
        """This rank's share of ``items`` (in their order), after checking that every rank planned the same."""
        names = [name(item) for item in items]
        costs = [int(cost(item)) for item in items]
        digest = hashlib.sha256(pickle.dumps((names, costs))).hexdigest()
        self._exchange("select", fingerprint=digest)
        owner = assign(costs, self.world)
        self._indices = [i for i, r in enumerate(owner) if r == self.rank]
        self._names = names
        self.share = [items[i] for i in self._indices]
        return self.share

    def track(self, rows: Iterable[T], extras: Sequence[Any] | None = None) -> Iterator[T]:
        """Yield ``rows`` (one per share item, in share order), keeping ``current`` up to date.

        Before each item: stop if another rank failed, and raise for the test hook. After each item, note how
        many ``extras`` exist so that ``gather`` can put each extra back beside its item.
        """
        fail_on = os.environ.get(FAIL_ENV)
        it = iter(rows)
        try:
            for index in self._indices:
                self.current = self._names[index]
                if self._store is not None and self._store.check([self._abort_key]):
                    raise _Aborted()
                if fail_on is not None and self.current == fail_on:
                    raise InputError(f"{fail_on}: failure injected by {FAIL_ENV} (a test hook)")
                try:
                    row = next(it)
                except StopIteration:
                    raise WeightdiffError(
                        f"internal error: rank {self.rank} got fewer rows than tensors in its share"
                    ) from None
                self._marks.append(len(extras) if extras is not None else 0)
                yield row
            if next(it, _END) is not _END:
                raise WeightdiffError(
                    f"internal error: rank {self.rank} got more rows than tensors in its share"
                )
        finally:
            # Stop the engine's reader thread now, not whenever the generator is collected.
            close = getattr(it, "close", None)
            if close is not None:
                close()
        self.current = None

    def gather(self, rows: list[Any], extras: list[Any] | None = None) -> list[Any]:
        """Every rank's rows on rank 0, in plan order (``extras`` likewise, in place); own rows elsewhere."""
        import torch.distributed as dist

        if len(rows) != len(self._indices):
            raise WeightdiffError(f"internal error: rank {self.rank} has {len(rows)} rows for its share")
        # Extras carry the plan position of the item they came with (marks are counts after each item).
        extra_list = list(extras) if extras is not None else []
        tagged: list[tuple[int, int, Any]] = []
        start = 0
        for index, stop in zip(self._indices, self._marks, strict=True):
            tagged.extend((index, k, extra_list[k]) for k in range(start, stop))
            start = stop
        # Pickle here, inside this rank's share: a payload that cannot be sent fails like any tensor would,
        # before the exchange, instead of breaking the gather on the other ranks.
        payload = pickle.dumps((self._indices, rows, tagged), protocol=pickle.HIGHEST_PROTOCOL)
        self._exchange("gather")
        got: list[Any] | None = [None] * self.world if self.leader else None
        try:
            dist.gather_object(payload, got, dst=0)
        except Exception as exc:
            self._broken = True
            raise WeightdiffError(
                f"torch.distributed: rank {self.rank} lost contact with the others ({exc})"
            ) from exc
        if not self.leader:
            return rows
        assert got is not None
        slots: list[Any] = [None] * len(self._names)
        merged_extras: list[tuple[int, int, int, Any]] = []
        for rank, blob in enumerate(got):
            indices, their_rows, their_extras = pickle.loads(blob)
            for index, row in zip(indices, their_rows, strict=True):
                slots[index] = row
            merged_extras.extend((index, rank, k, e) for index, k, e in their_extras)
        if extras is not None:
            merged_extras.sort(key=lambda t: t[:3])
            extras[:] = [e for *_, e in merged_extras]
        return slots

    def merged(self, rows: Iterable[T], extras: list[Any] | None = None) -> Iterator[T]:
        """``gather`` over ``track``: rank 0 yields every rank's rows in plan order, other ranks their own."""
        mine = list(self.track(rows, extras))
        yield from self.gather(mine, extras)


def verdict(failures: list[Failure], world: int, rank: int) -> RankFailed:
    """The error every rank raises once the ranks have agreed that ``failures`` happened."""
    # Ranks that only stopped because another failed are not the cause: the first real failure decides.
    first = next((f for f in failures if not f.aborted), failures[0])
    # An empty message is a gate's exit: its rank has shown the verdict, so nobody prints anything more.
    quiet = rank != 0 or not first.message
    return RankFailed(_describe(failures, world), first.exit_code, quiet=quiet)


def _describe(failures: list[Failure], world: int) -> str:
    """One line for rank 0: who failed on which tensor, and why."""
    real = [f for f in failures if not f.aborted] or failures
    first = real[0]
    if len(real) == world and all(f.message == first.message and f.tensor is None for f in real):
        # The same error everywhere (a bad option, nothing to compare): say it as one process would.
        return first.message
    message = first.message
    if first.tensor and message.startswith(f"{first.tensor}: "):
        message = message[len(first.tensor) + 2 :]
    text = f"rank {first.rank} of {world} failed" + (f" on tensor {first.tensor}" if first.tensor else "")
    text += f": {message}" if message else ""
    others = sorted({f.rank for f in real[1:]})
    if others:
        text += f" (rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} failed too)"
    return text


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


_shard: Shard | None = None


def current() -> Shard | None:
    """This process's ``Shard`` when launched with WORLD_SIZE > 1, else None (and nothing is imported)."""
    global _shard
    world = int(os.environ.get("WORLD_SIZE", "1") or "1")
    if world <= 1:
        return None
    if _shard is None:
        try:
            rank = int(os.environ["RANK"])
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        except (KeyError, ValueError):
            raise InputError(
                f"WORLD_SIZE={world} but RANK is missing or not a number: launch with torchrun"
            ) from None
        if not 0 <= rank < world:
            raise InputError(f"RANK={rank} is outside WORLD_SIZE={world}")
        _shard = Shard(rank, world, local_rank)
    return _shard


def is_leader() -> bool:
    """Whether this process writes files and prints: always in a single process, rank 0 under torchrun."""
    shard = current()
    return shard is None or shard.leader


def own_share(items: Sequence[T]) -> Sequence[T]:
    """The items this process computes: all of them, or this rank's share once ``select`` has run."""
    shard = current()
    return items if shard is None or shard.share is None else shard.share


def share_note(items: Sequence[Any]) -> str | None:
    """A line for rank 0's plan output under torchrun, None in a single process."""
    shard = current()
    if shard is None or shard.share is None:
        return None
    return (
        f"torch.distributed: {shard.world} ranks ({shard.backend}); rank 0 computes {len(shard.share)} of "
        f"{len(items)} tensors and its progress is shown"
    )


def collective(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` as one session of every rank under torchrun (see the module docstring); as is otherwise.

    The backend is chosen from ``fn``'s ``device`` keyword argument. Nested calls join the outer session.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        shard = current()
        if shard is None or shard.active:
            return fn(*args, **kwargs)
        shard.begin(str(kwargs.get("device", "auto")))
        try:
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                try:
                    shard.fail(exc)
                except RankFailed as agreed:
                    raise agreed from exc
                raise
            shard.finish()
            return result
        except RankFailed:
            shard.settle()
            raise
        finally:
            shard.end()

    return wrapper
