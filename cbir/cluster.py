"""Describing images on a Ray cluster (create-db / add --ray): decode and inference in actors,
everything else in the one writer process.

Each actor loads the model once and describes batches of files: it reads (or is sent) their
bytes, hashes, decodes and runs the model, and returns per file its SHA-256 and either why it
was skipped or its class probabilities and feature. Batches are handed out in order, a few per
actor ahead, and results are taken back in the same order, so the writer (cbir.indexing)
stores them exactly as a local run would. A batch whose actor dies is given to another live
actor (a replacement is started where none is left); a batch that fails MAX_ATTEMPTS times
stops the run, which the same command then resumes from its last commit.

Ray is imported here only, and only when --ray is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cbir.errors import BadImage, CbirError

FILES_PER_TASK = 32  # files an actor describes per call: 4 model batches of 8
TASKS_AHEAD = 2  # calls queued per actor, so that none waits for the writer
MAX_ATTEMPTS = 3  # actors a batch may lose before the run stops


@dataclass(frozen=True)
class ModelSpec:
    """What every actor loads, and how it decodes (the writer's settings)."""

    backbone: str
    weights: str
    engine: str
    precision: str
    input_size: int
    resize: str
    max_megapixels: float
    batch_size: int


@dataclass(frozen=True)
class Described:
    """One file's outcome from an actor: `reason` is set when it was skipped; otherwise
    probs (1000,) and feature (d,) float32 of the database's pooling."""

    path: str
    sha256: str
    reason: str | None
    warnings: tuple[str, ...] = ()
    probs: npt.NDArray[np.float32] | None = None
    feature: npt.NDArray[np.float32] | None = None


@dataclass
class ClusterReport:
    actors: Counter[str] = field(default_factory=Counter)  # "host (engine)" -> actors started
    engine: tuple[str, str] = ("", "")  # (engine, precision) of the first actor
    retried: int = 0  # batches given to another actor after theirs died

    def summary(self) -> str:
        where = ", ".join(f"{n} on {host}" for host, n in sorted(self.actors.items()))
        text = f"ray: {sum(self.actors.values())} actor(s): {where}"
        return text + (f"; {self.retried} batch(es) retried after an actor died"
                       if self.retried else "")  # fmt: skip


class Describer:
    """A Ray actor's state: the loaded model. Runs in the actor's process."""

    def __init__(self, spec: ModelSpec, pooling: str) -> None:
        from cbir.model import load_model

        self.spec, self.pooling = spec, pooling
        self.model = load_model(spec.backbone, spec.weights, spec.engine, spec.precision)
        self._decoders = ThreadPoolExecutor(max(1, len(os.sched_getaffinity(0))))

    def where(self) -> tuple[str, str, str]:
        """(host, engine, precision) of this actor."""
        return socket.gethostname(), self.model.engine, self.model.precision

    def describe(self, files: list[tuple[str, bytes | str | None]]) -> list[Described]:
        """files: (path, its bytes, None to read it here, or why the writer could not)."""
        out: list[Described | tuple] = list(self._decoders.map(self._decode, files))
        ready = [i for i, d in enumerate(out) if isinstance(d, tuple)]  # decoded: described
        if ready:
            described = self.model.describe_in_batches([out[i][2] for i in ready],
                                                       self.spec.batch_size)  # fmt: skip
            features = described.features[self.pooling]
            for n, i in enumerate(ready):
                path, sha, _, warned = out[i]  # type: ignore[misc]
                out[i] = Described(path, sha, None, warned, described.probs[n], features[n])
        return out  # type: ignore[return-value]  # every entry is a Described now, in order

    def _decode(self, item: tuple[str, bytes | str | None]) -> Described | tuple:
        from cbir.images import load_image, read_source

        path, data = item
        if isinstance(data, str):
            return Described(path, "", f"cannot read ({data})")
        try:
            if data is None:
                try:
                    data = read_source(Path(path))
                except BadImage as bad:
                    return Described(path, "", f"{bad.reason} on {socket.gethostname()}")
            sha = hashlib.sha256(data).hexdigest()
            warned: list[str] = []
            pixels = load_image(Path(path), self.spec.input_size, data, self.spec.max_megapixels,
                                self.spec.resize, warned)  # fmt: skip
        except BadImage as bad:
            return Described(path, "", bad.reason)
        return path, sha, pixels, tuple(dict.fromkeys(warned))


@contextlib.contextmanager
def connected(address: str) -> Iterator[Any]:
    """Start ("local") or join ("auto", "HOST:PORT") a Ray runtime for one run; yields the
    ray module, and disconnects (a local runtime stops) at the end."""
    try:
        import ray
    except ImportError:
        raise CbirError("--ray needs Ray: pip install 'cbir[ray]'") from None
    if address == "local":  # our own runtime: Ray's advice on its token is not the user's
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR)
    try:
        ray.init(address=None if address == "local" else address,
                 include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise CbirError(f"cannot reach a Ray cluster at {address!r} ({_first_line(exc)}); "
                        "start one with 'ray start --head', or use --ray local") from None
    try:
        yield ray
    finally:
        ray.shutdown()


class Cluster:
    """The actors of one run, one per GPU where the cluster has GPUs, else one per node
    (with that node's CPUs)."""

    def __init__(self, ray: Any, spec: ModelSpec, pooling: str) -> None:
        self.ray, self.spec, self.pooling = ray, spec, pooling
        self.report = ClusterReport()
        self._actor_class = ray.remote(max_restarts=0)(Describer)
        self.actors: list[Any] = []
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            resources = node.get("Resources", {})
            gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
            per_actor = max(1, cpus // max(gpus, 1))
            for _ in range(gpus or 1):
                self.actors.append(self._start(node["NodeID"], per_actor, 1 if gpus else 0))
        if not self.actors:
            raise CbirError("the Ray cluster has no live node")
        from ray.exceptions import RayActorError

        started, failure = [], None
        for actor in self.actors:  # wait for every model to load; say where each runs
            try:
                host, engine, precision = ray.get(actor.where.remote())
            except RayActorError as exc:  # died while loading: the others go on without it
                failure = exc
                continue
            started.append(actor)
            self.report.actors[f"{host} ({engine})"] += 1
            if not self.report.engine[0]:
                self.report.engine = (engine, precision)
        if not started:
            raise CbirError(f"no Ray actor could load the model: {_last_line(failure)}")
        self.actors = started

    def _start(self, node_id: str | None, cpus: int, gpus: int) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
        if node_id is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=True)
        return self._actor_class.options(**options).remote(self.spec, self.pooling)

    def describe(
        self, batches: Iterator[list[tuple[str, bytes | str | None]]]
    ) -> Iterator[Described]:
        """Every file of `batches`, described, in order."""
        from ray.exceptions import RayActorError

        pending: deque[tuple[list, Any, Any, int]] = deque()  # (batch, ref, actor, attempts)
        turn = 0

        def submit(batch: list, attempts: int, front: bool = False) -> None:
            nonlocal turn
            if not self.actors:  # every actor died: start one anywhere
                self.actors.append(self._start(None, 1, 0))
                self.report.actors["a replacement"] += 1
            actor = self.actors[turn % len(self.actors)]
            turn += 1
            entry = (batch, actor.describe.remote(batch), actor, attempts)
            pending.appendleft(entry) if front else pending.append(entry)

        source = iter(batches)
        for batch in source:
            submit(batch, 1)
            if len(pending) >= TASKS_AHEAD * len(self.actors):
                break
        while pending:
            batch, ref, actor, attempts = pending.popleft()
            try:
                described = self.ray.get(ref)
            except RayActorError as exc:
                if actor in self.actors:
                    self.actors.remove(actor)
                if attempts >= MAX_ATTEMPTS:
                    raise CbirError(f"a batch of {len(batch)} files lost {attempts} Ray actors "
                                    f"({type(exc).__name__}); run the same command again to "
                                    "resume") from None  # fmt: skip
                self.report.retried += 1
                submit(batch, attempts + 1, front=True)
                continue
            yield from described
            for batch in source:
                submit(batch, 1)
                break

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors.clear()


def batches(
    files: Sequence[str], ship_bytes: bool, size: int = FILES_PER_TASK
) -> Iterator[list[tuple[str, bytes | str | None]]]:
    """The files in tasks of `size`; with `ship_bytes` the writer reads them (for one it
    cannot read, the reason is sent, and the actor reports it in order)."""
    from cbir.images import read_source

    for start in range(0, len(files), size):
        chunk = files[start : start + size]
        if not ship_bytes:
            yield [(path, None) for path in chunk]
            continue
        shipped: list[tuple[str, bytes | str | None]] = []
        for path in chunk:
            try:
                shipped.append((path, read_source(Path(path))))
            except BadImage as bad:
                shipped.append((path, bad.reason))
        yield shipped


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _last_line(exc: BaseException) -> str:
    """The last line of a remote error: the exception the actor raised, without Ray's frame."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
