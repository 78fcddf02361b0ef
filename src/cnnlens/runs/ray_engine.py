"""Dataset runs on a Ray cluster (``cnnlens run --engine ray``): the same run folder, computed by Ray Data.

The pipeline, one row per pending shard::

    from_items(shards) --map(decode, CPU tasks)--> decoded batches --map_batches(_ShardExplainer, actors)--> rows
                                                                                       |
                                        maps + overlays written by the actor (run folder or --storage)
    driver: for each finished shard, in completion order: (fetch staged files) -> rows file = the commit

* **Decoding** happens in Ray Data's read stage: CPU tasks turn a shard's files into the batches the local
  engine would build (:func:`cnnlens.runs.decode.shard_batches`, same batch boundaries); a bad file becomes an
  error entry, never a failed task.
* **Explanation** happens in a pool of actors (``ActorPoolStrategy``), each built once with its model, its
  torch threads (``threads_per_actor``, default 1 per logical CPU it holds) and, with ``gpus_per_actor``, its
  GPU. Each actor runs :func:`cnnlens.runs.process_batch` (the local engine's unit of work) on a shard's
  batches and writes the shard's maps and overlays with :meth:`RunStore.write_outputs`.
* **Commit**: the driver writes each shard's rows file (:meth:`RunStore.write_rows`) as the shard arrives, so
  a killed driver or worker loses at most the shards in flight and the same command finishes the rest. The
  fingerprint, the folder layout, ``results.parquet`` and the manifest are the local engine's.

Where the workers write: into the run folder itself when every node sees it (one machine, or a shared
filesystem; an actor refuses to start when it cannot see the run's ``run.json``), or, with ``storage`` (a
``pyarrow.fs`` URI: ``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``, ``file:///shared/path``), into
``<storage>/<fingerprint[:16]>/`` from where the driver copies each shard's files into the run folder before
committing it, then deletes the staged copies.

Logical resources are planned so that the read stage always fits beside the actors (on 2 logical CPUs, two
actors holding 1 CPU each would starve it forever): see :func:`plan_resources`.

Example:
    >>> from cnnlens.runs import run_dataset
    >>> from cnnlens.runs.ray_engine import RayOptions
    >>> summary = run_dataset("runs/x", dataset, model, engine="ray",
    ...                       ray=RayOptions(actors=2))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import pickle
import re
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cnnlens.data.images import DEFAULT_MAX_PIXELS
from cnnlens.execution import Execution, as_execution
from cnnlens.models import LoadedModel, Preprocessing
from cnnlens.runs.batch import RunSettings, process_batch
from cnnlens.runs.dataset import Sample
from cnnlens.runs.decode import collate, decode_sample, shard_batches
from cnnlens.runs.errors import RunError
from cnnlens.runs.fingerprint import model_fingerprint
from cnnlens.runs.store import RunStore, atomic_write

if TYPE_CHECKING:
    from cnnlens.runs.runner import DatasetRun, ProgressFn, RunSummary

__all__ = [
    "ActorThroughput",
    "ModelLoader",
    "ModelRecipe",
    "RayEngineError",
    "RayOptions",
    "ResourcePlan",
    "check_cluster",
    "execute_ray",
    "plan_resources",
    "ray_session",
    "ships_by_value",
]

ModelLoader = Callable[[str], LoadedModel]
"""``loader(device) -> LoadedModel``: builds the run's model on a worker (``device``: ``"cpu"`` or ``"cuda"``)."""


@dataclass(frozen=True)
class ModelRecipe:
    """A picklable :data:`ModelLoader`: ``load_run_model(name, device=device, **kwargs)`` on each worker.

    Example:
        >>> recipe = ModelRecipe("mypkg.nets:build", {"weights": "/shared/ckpt.pt", "input_size": [32]})
        >>> RayOptions(actors=4, model_loader=recipe)  # doctest: +ELLIPSIS
        RayOptions(address=None, actors=4, ...)
    """

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, device: str) -> LoadedModel:
        """Load the model on ``device``."""
        from cnnlens.runs.model import load_run_model

        return load_run_model(self.name, device=device, **dict(self.kwargs))


_READ_CPUS = 0.25
"""Logical CPUs of one decoding task: small, so decoding always fits beside the actors."""
_MAX_TASK_RETRIES = 3
"""Times a shard is retried on a restarted actor after its actor process died (OOM, node loss, kill)."""
_STAGED_RE = re.compile(r"^(maps/[^/]+/shard-\d{6}\.npy|overlays/\d{6}/\d{7}\.[^/]+\.(jpg|png))$")


class RayEngineError(RunError):
    """The Ray engine cannot run as asked: no Ray, no cluster at the address, workers that cannot load the model."""


@dataclass(frozen=True)
class RayOptions:
    """How a run uses Ray (never part of the run's fingerprint).

    Attributes:
        address: ``None`` (``RAY_ADDRESS``, else a local cluster started on this machine for the run), ``"auto"``
            (the cluster this machine belongs to, see ``ray start``), ``"HOST:PORT"`` or ``"ray://HOST:10001"``.
        actors: Explaining actors (default: one per GPU with ``gpus_per_actor``, else one per logical CPU but one;
            never more than the shards left to do).
        gpus_per_actor: GPUs each actor holds (0: CPU actors).
        cpus_per_actor: Logical CPUs each actor holds (default: :func:`plan_resources`).
        threads_per_actor: torch intra-op threads per actor (default: its logical CPUs, at least 1).
        storage: A ``pyarrow.fs`` URI where workers stage their files when they cannot see the run folder
            (``s3://bucket/prefix``, ``gs://...``, ``file:///shared/path``); None: they write into the run folder.
        model_loader: ``loader(device) -> LoadedModel`` run on each worker (picklable, e.g. a
            ``functools.partial`` of :func:`cnnlens.runs.load_run_model`); None ships the driver's model to
            the workers by value (a factory file's classes included).
        connect_timeout_s: Seconds to wait for a ``HOST:PORT`` address to answer.
    """

    address: str | None = None
    actors: int | None = None
    gpus_per_actor: float = 0.0
    cpus_per_actor: float | None = None
    threads_per_actor: int | None = None
    storage: str | None = None
    model_loader: ModelLoader | None = field(default=None, compare=False)
    connect_timeout_s: float = 10.0

    def validate(self) -> None:
        """Check the options before any work (and before Ray is imported).

        Raises:
            RayEngineError: A value out of range or a storage URI pyarrow cannot open.
        """
        if self.actors is not None and self.actors < 1:
            raise RayEngineError(f"--actors must be at least 1, got {self.actors}.")
        if not self.gpus_per_actor >= 0:
            raise RayEngineError(f"--gpus-per-actor must be 0 or more, got {self.gpus_per_actor}.")
        if self.cpus_per_actor is not None and not self.cpus_per_actor > 0:
            raise RayEngineError(f"cpus_per_actor must be more than 0, got {self.cpus_per_actor}.")
        if self.threads_per_actor is not None and self.threads_per_actor < 1:
            raise RayEngineError(f"threads_per_actor must be at least 1, got {self.threads_per_actor}.")
        if self.storage is not None:
            _filesystem(self.storage)


@dataclass(frozen=True)
class ResourcePlan:
    """Logical resources of a run's Ray stages (see :func:`plan_resources`)."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    read_cpus: float
    threads: int
    read_tasks: int | None = None
    """Decoding tasks running at once (None: as many as the free CPUs admit, Ray Data's choice)."""


def plan_resources(cluster_cpus: float, cluster_gpus: float, options: RayOptions) -> ResourcePlan:
    """Share the cluster's logical CPUs between the actors and the read stage so that both make progress.

    Decoding tasks hold 0.25 CPU each; half a CPU (or a quarter of the cluster on smaller ones) stays free
    for them, and the actors share the rest, at most 1 CPU each. On a 2-CPU machine two actors hold 0.75 CPU
    each and decoding runs beside them.

    CPU actors get one decoding task at a time per three actors (at least one): decoding a shard takes a
    fraction of the time explaining it does, and every further task is a worker process that imports torch
    and torchvision (seconds of CPU each) while the actors start. GPU actors consume faster: their decoding
    tasks are left to Ray Data (as many as the free CPUs admit).

    Example:
        >>> plan_resources(2, 0, RayOptions(actors=2))
        ResourcePlan(actors=2, cpus_per_actor=0.75, gpus_per_actor=0.0, read_cpus=0.25, threads=1, read_tasks=1)

    Raises:
        RayEngineError: More GPUs or CPUs asked than the cluster has.
    """
    if cluster_cpus <= 0:
        raise RayEngineError("the Ray cluster has no CPU: decoding needs at least a fraction of one.")
    reserve = min(0.5, cluster_cpus / 4)
    gpus = float(options.gpus_per_actor)
    if gpus > 0:
        actors = options.actors or max(1, int(cluster_gpus // gpus))
        if actors * gpus > cluster_gpus + 1e-9:
            raise RayEngineError(
                f"{actors} actor(s) x {gpus:g} GPU need {actors * gpus:g} GPU(s); the cluster has {cluster_gpus:g}. "
                "Lower --actors or --gpus-per-actor, or add GPU nodes."
            )
    else:
        actors = options.actors or max(1, int(cluster_cpus) - 1)
    cpus = options.cpus_per_actor or min(1.0, (cluster_cpus - reserve) / actors)
    if actors * cpus + _READ_CPUS > cluster_cpus + 1e-9:
        raise RayEngineError(
            f"{actors} actor(s) x {cpus:g} CPU leave no CPU for decoding on a cluster of {cluster_cpus:g} CPU(s); "
            "lower --actors (or cpus_per_actor)."
        )
    threads = options.threads_per_actor or max(1, int(cpus))
    read_tasks = None if gpus > 0 else -(-actors // 3)
    return ResourcePlan(actors, round(cpus, 4), gpus, _READ_CPUS, threads, read_tasks)


@dataclass
class ActorThroughput:
    """What one actor did in a session: shards, images, compute seconds (decoding excluded)."""

    actor: str
    shards: int = 0
    images: int = 0
    seconds: float = 0.0
    first_images: int = 0
    first_seconds: float = 0.0
    setup_seconds: float = 0.0

    def add(self, images: int, seconds: float, setup: float) -> None:
        """Count one shard (the first one's time includes the actor's warm-up: imports, first capture)."""
        if self.shards == 0:
            self.first_images, self.first_seconds, self.setup_seconds = images, seconds, setup
        self.shards += 1
        self.images += images
        self.seconds += seconds

    @property
    def images_per_s(self) -> float | None:
        """Images per second of compute."""
        return self.images / self.seconds if self.seconds > 0 else None

    @property
    def steady_images_per_s(self) -> float | None:
        """Images per second after the first shard (None with one shard)."""
        seconds = self.seconds - self.first_seconds
        return (self.images - self.first_images) / seconds if self.shards > 1 and seconds > 0 else None

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        rate, steady = self.images_per_s, self.steady_images_per_s
        return {
            "actor": self.actor,
            "shards": self.shards,
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "images_per_s": None if rate is None else round(rate, 3),
            "setup_s": round(self.setup_seconds, 3),
            "first_shard_s": round(self.first_seconds, 3),
            "steady_images_per_s": None if steady is None else round(steady, 3),
        }


# -- connecting --------------------------------------------------------------------------------------------------
def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RayEngineError(
            "--engine ray needs Ray Data: pip install 'cnnlens[ray]' (or 'ray[data]'); --engine local needs nothing."
        ) from exc
    return ray


def _probe(address: str, timeout: float) -> None:
    """Fail fast when nothing listens at a ``HOST:PORT`` or ``ray://HOST:PORT`` address."""
    target = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise RayEngineError(
            f"--address {address!r} is not 'auto', 'HOST:PORT' or 'ray://HOST:PORT' (e.g. 10.0.0.5:6379)."
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise RayEngineError(
            f"no Ray cluster answers at {address!r} ({exc.strerror or exc}); start one there with `ray start --head`, "
            "check --address / RAY_ADDRESS, or leave --address out to run on a local cluster on this machine."
        ) from exc


@contextlib.contextmanager
def _quiet_ray_logs() -> Iterator[None]:
    """Ray's and Ray Data's own loggers at ERROR for the block (cnnlens shows its own progress)."""
    loggers = [logging.getLogger(name) for name in ("ray", "ray.data", "ray.data._internal")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def ray_session(address: str | None = None, *, timeout: float = 10.0) -> Iterator[Any]:
    """Connect to Ray for a run, and disconnect at the end if this call connected.

    A ``HOST:PORT`` address is probed first. An already initialised Ray is then used as it is (and left
    running); otherwise ``address`` (or ``RAY_ADDRESS``) is joined, or a local cluster is started on this machine.

    Ray's log forwarding is off (``log_to_driver=False``) and its loggers report errors only.

    Raises:
        RayEngineError: Ray is not installed, or no cluster answers at the address (nothing is written then).
    """
    ray = _import_ray()
    if address is not None and address != "auto":
        _probe(address, timeout)
    if ray.is_initialized():
        yield ray
        return
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        if address != "auto":
            _probe(address, timeout)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # the driver's C++ notices (errors still raise)
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address is None:
        kwargs["include_dashboard"] = False
    try:
        with _quiet_ray_logs():
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        raise RayEngineError(
            f"cannot connect to the Ray cluster at {address!r}: {str(exc).rstrip('.')}. Start one with "
            "`ray start --head`, check --address / RAY_ADDRESS, or leave --address out to start a local cluster on "
            "this machine."
        ) from exc
    try:
        yield ray
    finally:
        ray.shutdown()


# -- storage -----------------------------------------------------------------------------------------------------
def _filesystem(uri: str) -> tuple[Any, str]:
    """``(pyarrow FileSystem, base path)`` of a storage URI."""
    import pyarrow.fs as pafs

    try:
        fs, base = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for unknown schemes and bad URIs
        raise RayEngineError(
            f"--storage {uri!r} cannot be opened ({exc}); give a pyarrow filesystem URI such as s3://bucket/prefix, "
            "gs://bucket/prefix or file:///shared/folder."
        ) from exc
    return fs, base.rstrip("/")


def _upload(fs: Any, base: str, local_root: Path, rels: Sequence[str]) -> None:
    for rel in rels:
        target = f"{base}/{rel}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(target) as out:
            out.write((local_root / rel).read_bytes())


def _fetch(fs: Any, base: str, root: Path, rels: Sequence[str]) -> None:
    for rel in rels:
        with fs.open_input_stream(f"{base}/{rel}") as src:
            data = src.read()
        with atomic_write(root / rel, durable=rel.endswith(".npy")) as fh:
            fh.write(data)


def _delete_staged(fs: Any, base: str, rels: Sequence[str]) -> None:
    for rel in rels:
        with contextlib.suppress(FileNotFoundError, OSError):
            fs.delete_file(f"{base}/{rel}")


def _clean_staging(fs: Any, base: str) -> None:
    """Remove what a killed session staged under the run's prefix: only files named as a run names its files."""
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError:
        return
    rels = [i.path[len(base) + 1 :] for i in infos if i.type == pafs.FileType.File]
    _delete_staged(fs, base, [r for r in rels if _STAGED_RE.match(r)])


# -- workers -----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _in_folder(folder: str) -> Iterator[None]:
    """Run in the driver's working directory where this node has it, so relative paths mean the same."""
    before = os.getcwd()
    moved = False
    with contextlib.suppress(OSError):
        os.chdir(folder)
        moved = True
    try:
        yield
    finally:
        if moved:
            os.chdir(before)


def _decode_shard(
    row: dict[str, Any], *, batch_size: int, prep: Preprocessing, max_pixels: int, cwd: str
) -> dict[str, Any]:
    """Ray Data read stage: decode one shard into the batches the local engine would build (pickled)."""
    samples: list[Sample] = pickle.loads(row["samples"])
    with _in_folder(cwd):
        batches = [
            collate([decode_sample(samples[i], prep, max_pixels) for i in batch])
            for batch in shard_batches([range(len(samples))], batch_size)
        ]
    return {"shard": int(row["shard"]), "payload": pickle.dumps(batches, protocol=5)}


def ships_by_value(model: LoadedModel) -> bool:
    """Whether the driver's model can go to the workers by value (False for Keras models: rebuild them there).

    A Keras model's variables live in Keras, outside the torch module, so workers build it again (a
    :data:`ModelLoader`); any torch module pickles with its weights.

    Example:
        >>> ships_by_value(load_run_model("resnet50", random_weights=True))  # doctest: +SKIP
        True
        >>> ships_by_value(load_run_model("keras:vgg16", random_weights=True))  # doctest: +SKIP
        False
    """
    return not type(model.module).__module__.startswith("cnnlens.models.keras")


def _on_cpu(model: LoadedModel) -> LoadedModel:
    """The model as workers receive it: on the CPU (each actor moves it to its own device).

    A driver's model on a GPU would otherwise pickle as CUDA tensors, which a CPU actor (or a node without
    CUDA) cannot load. The copy is made tensor by tensor on the CPU (``deepcopy`` with the CPU copies in its
    memo), so the driver's GPU holds no second model and the driver's module is left untouched.
    """
    module = model.module
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return model
    return replace(model, module=_deepcopy_to_cpu(module))


def _deepcopy_to_cpu(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are CPU copies (same ``requires_grad``)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    return copy.deepcopy(module, memo)


def _register_by_value(model: LoadedModel) -> None:
    """Let Ray pickle a factory file's classes by value (their module exists only on the driver)."""
    from ray import cloudpickle

    for cls in type(model.module).__mro__:
        module = sys.modules.get(cls.__module__)
        if module is not None and cls.__module__.startswith("_cnnlens_user_"):
            with contextlib.suppress(ValueError):
                cloudpickle.register_pickle_by_value(module)


@dataclass(frozen=True)
class _WorkerSpec:
    """Everything an actor needs, small and picklable (the model travels as a loader or an object ref)."""

    loader: ModelLoader | None
    model_ref: tuple[Any, ...]
    state_sha256: str
    fingerprint: str
    settings: RunSettings
    root: str
    storage: str | None
    shard_size: int
    total: int
    execution: Execution
    threads: int
    gpu: bool
    cwd: str


class _ShardExplainer:
    """The explaining actor: model and capture built once; one shard per call; writes the shard's outputs.

    A model that cannot be built (a factory the worker cannot import, a missing checkpoint) or a run folder the
    worker cannot see does not raise here (Ray would restart the actor forever): every call then returns the
    reason, and the driver stops with it.
    """

    def __init__(self, spec: _WorkerSpec) -> None:
        began = time.perf_counter()
        self.spec = spec
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.setup_s = 0.0
        self.failure: str | None = None
        torch.set_num_threads(spec.threads)
        device = "cuda" if spec.gpu else "cpu"
        try:
            with _in_folder(spec.cwd):
                if spec.loader is not None:
                    model = spec.loader(device)
                else:
                    import ray

                    model = ray.get(spec.model_ref[0])
                    model.module.to(device)
        except Exception as exc:  # anything the user's code raises: reported on the driver, not retried
            self.failure = f"the Ray worker {self.name} could not load the model: {type(exc).__name__}: {exc}"
            return
        if model_fingerprint(model)["state_sha256"] != spec.state_sha256:
            self.failure = (
                f"the Ray worker {self.name} loaded a model whose weights differ from the driver's; every node needs "
                "the same checkpoint and model code."
            )
            return
        self.model = model
        self.settings = spec.settings.resolve(model)
        self.fs: Any = None
        root = Path(spec.root)
        if spec.storage is not None:
            self.fs, base = _filesystem(spec.storage)
            self.base = f"{base}/{spec.fingerprint[:16]}"
        elif spec.fingerprint not in _read_text(root / "run.json"):
            self.failure = (
                f"the Ray worker {self.name} cannot see the run folder {spec.root!r} (or it holds another run); put "
                "the run folder on storage every node mounts at the same path, or pass --storage URI "
                "(s3://..., gs://..., file:///shared/...)."
            )
            return
        self.store = RunStore(
            root, self.settings.pairs(), spec.shard_size, spec.total, overlay_format=self.settings.overlay_format
        )
        self.setup_s = time.perf_counter() - began

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {
            k: [] for k in ("shard", "rows", "actor", "seconds", "images", "files", "failure", "setup")
        }
        for shard, payload in zip(batch["shard"], batch["payload"], strict=True):
            out["shard"].append(int(shard))
            out["actor"].append(self.name)
            out["setup"].append(self.setup_s)
            if self.failure is not None:
                out["failure"].append(self.failure)
                out["rows"].append(b"")
                out["seconds"].append(0.0)
                out["images"].append(0)
                out["files"].append([])
                continue
            rows, files, seconds = self._shard(int(shard), pickle.loads(payload))
            out["failure"].append(None)
            out["rows"].append(pickle.dumps(rows, protocol=5))
            out["seconds"].append(seconds)
            out["images"].append(len(rows))
            out["files"].append(files)
        return out

    def _shard(self, shard: int, batches: list[Any]) -> tuple[list[dict[str, Any]], list[str], float]:
        started = time.perf_counter()
        results = []
        for batch in batches:
            with self.spec.execution.threads_applied():
                results.append(process_batch(self.model, batch, self.settings, execution=self.spec.execution))
        seconds = time.perf_counter() - started
        if self.fs is None:
            return self.store.write_outputs(shard, results), [], seconds
        with tempfile.TemporaryDirectory(prefix="cnnlens-shard-") as tmp:
            local = RunStore(tmp, self.store.pairs, self.spec.shard_size, self.spec.total)
            local.picture_suffix = self.store.picture_suffix
            rows = local.write_outputs(shard, results)
            files = sorted(
                p.relative_to(tmp).as_posix()
                for p in Path(tmp).rglob("*")
                if p.is_file() and not p.name.startswith(".")
            )
            _upload(self.fs, self.base, Path(tmp), files)
        return rows, files, seconds


def _read_text(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except OSError:
        return ""


# -- driver ------------------------------------------------------------------------------------------------------
def check_cluster(options: RayOptions) -> ResourcePlan:
    """The resource plan on the connected cluster.

    Call it before opening the run folder, so a plan the cluster cannot hold (more GPUs than it has) is refused
    with nothing written.

    Raises:
        RayEngineError: Ray is not connected, or the plan does not fit (see :func:`plan_resources`).
    """
    ray = _import_ray()
    if not ray.is_initialized():
        raise RayEngineError("the Ray engine needs Ray connected: use `with ray_session(address):` around it.")
    resources = ray.cluster_resources()
    return plan_resources(float(resources.get("CPU", 0)), float(resources.get("GPU", 0)), options)


def _configure_data_context(ray: Any) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = False


def execute_ray(
    run: DatasetRun,
    options: RayOptions,
    *,
    batch_size: int = 16,
    progress: ProgressFn | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    execution: Execution | None = None,
) -> RunSummary:
    """Process every pending shard of an opened :class:`~cnnlens.runs.DatasetRun` on Ray; finish the run.

    Ray must be connected (:func:`ray_session`). Shards are committed as they arrive; ``progress(completed,
    total)`` is called after each. The resource plan, the per-actor throughput (:class:`ActorThroughput`) and
    the driver's commit time and rate go into ``run.extra["engine"]``, hence into ``manifest.json``.

    Args:
        run: The opened run (``with DatasetRun(...) as run``).
        options: The Ray options (:class:`RayOptions`).
        batch_size: Images per forward/backward in the actors.
        progress: ``progress(completed, total)`` after every committed shard.
        max_pixels: Largest image decoded (larger ones become error rows).
        execution: How each batch runs in the actors (:class:`cnnlens.Execution`).

    Returns:
        The :class:`~cnnlens.runs.RunSummary`.

    Raises:
        RayEngineError: Workers cannot load the model or see the run folder; the cluster lacks resources.
    """
    if batch_size < 1:
        raise RunError(f"--batch-size must be at least 1, got {batch_size}.")
    options.validate()
    plan = check_cluster(options)
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    execution = as_execution(execution)
    pending = run.pending_shards()
    if 0 < len(pending) < plan.actors:  # an actor without a shard would only start (seconds of imports) and wait
        plan = replace(plan, actors=len(pending))
    done_before = run.completed
    completed = done_before
    if progress is not None:
        progress(completed, run.total)
    store = run.store
    fs, base = (None, "")
    if options.storage is not None:
        fs, base = _filesystem(options.storage)
        base = f"{base}/{run.fingerprint[:16]}"
        _clean_staging(fs, base)
    model_ref: tuple[Any, ...] = ()
    if options.model_loader is None:
        _register_by_value(run.model)
        model_ref = (ray.put(_on_cpu(run.model)),)
    spec = _WorkerSpec(
        loader=options.model_loader,
        model_ref=model_ref,
        state_sha256=str(run.config["model"]["state_sha256"]),
        fingerprint=run.fingerprint,
        settings=run.settings,
        root=os.path.abspath(run.root),
        storage=options.storage,
        shard_size=run.shard_size,
        total=run.total,
        execution=execution,
        threads=plan.threads,
        gpu=plan.gpus_per_actor > 0,
        cwd=os.getcwd(),
    )
    stats: dict[str, ActorThroughput] = {}
    commit_s = 0.0
    started = time.perf_counter()
    processed = 0
    if pending:
        with _quiet_ray_logs():
            _configure_data_context(ray)
            decode = _bind(
                _decode_shard,
                batch_size=batch_size,
                prep=run.model.spec.preprocessing,
                max_pixels=max_pixels,
                cwd=os.getcwd(),
            )
            samples = run.dataset.samples
            items = [
                {"shard": s, "samples": pickle.dumps([samples[i] for i in store.shard_range(s)], protocol=5)}
                for s in pending
            ]
            ds: Any = ray.data.from_items(items, override_num_blocks=len(pending))
            ds = ds.map(decode, num_cpus=plan.read_cpus, compute=ray.data.TaskPoolStrategy(size=plan.read_tasks))
            with warnings.catch_warnings():  # Ray 2.60 deprecates per-actor remote args without a replacement yet
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
                ds = _explaining_stage(ds, spec, plan, ActorPoolStrategy)
            try:
                for row in ds.iter_rows():
                    images, seconds = _commit(row, run, fs, base, stats)
                    processed += images
                    commit_s += seconds
                    if progress is not None:
                        progress(done_before + processed, run.total)
            except ray.exceptions.RayError as exc:  # an actor that died more often than retried, a lost node
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise RayEngineError(
                    f"the Ray job stopped ({type(exc).__name__}: {first}); the shards committed so far are kept: run "
                    "the same command again to continue."
                ) from exc
    elapsed = time.perf_counter() - started
    run.extra["engine"] = {
        "name": "ray",
        "actors": plan.actors,
        "cpus_per_actor": plan.cpus_per_actor,
        "gpus_per_actor": plan.gpus_per_actor,
        "threads_per_actor": plan.threads,
        "decoding_tasks": plan.read_tasks,
        "model_transfer": "by value" if options.model_loader is None else "built by each worker",
        "storage": options.storage,
        "throughput": [s.as_dict() for s in sorted(stats.values(), key=lambda s: s.actor)],
        "driver_commit_s": round(commit_s, 3),
        "driver_commits_per_s": round(processed / commit_s, 1) if commit_s > 0 else None,
    }
    return run.finish(processed, done_before, elapsed)


def _explaining_stage(ds: Any, spec: _WorkerSpec, plan: ResourcePlan, pool: Any) -> Any:
    """The actor stage: one shard per call, ``plan.actors`` actors with their logical CPUs and GPUs."""
    return ds.map_batches(
        _ShardExplainer,
        fn_constructor_kwargs={"spec": spec},
        batch_size=1,
        compute=pool(size=plan.actors),
        num_cpus=plan.cpus_per_actor,
        num_gpus=plan.gpus_per_actor or None,
        ray_remote_args_fn=_actor_remote_args,
    )


def _commit(
    row: Mapping[str, Any], run: DatasetRun, fs: Any, base: str, stats: dict[str, ActorThroughput]
) -> tuple[int, float]:
    """Commit one shard an actor finished (fetch its staged files first); returns (images, driver seconds).

    Raises:
        RayEngineError: The actor could not start (its reason, e.g. a model it cannot build).
    """
    if row["failure"]:
        raise RayEngineError(str(row["failure"]))
    mark = time.perf_counter()
    shard = int(row["shard"])
    rows = pickle.loads(row["rows"])
    files = [str(f) for f in _as_list(row["files"])]
    if fs is not None:
        _fetch(fs, base, run.root, files)
    run.store.write_rows(shard, rows, float(row["seconds"]))
    if fs is not None:
        _delete_staged(fs, base, files)
    entry = stats.setdefault(str(row["actor"]), ActorThroughput(str(row["actor"])))
    entry.add(int(row["images"]), float(row["seconds"]), float(row["setup"]))
    return len(rows), time.perf_counter() - mark


def _actor_remote_args() -> dict[str, Any]:
    """Actors restart after a crash; a shard whose actor dies ``_MAX_TASK_RETRIES`` times fails the run."""
    return {"max_restarts": -1, "max_task_retries": _MAX_TASK_RETRIES}


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return list(value.tolist())
    return list(value)


def _bind(fn: Callable[..., dict[str, Any]], **kwargs: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """``functools.partial`` with a readable name (Ray Data names its stage after the function)."""
    import functools

    bound = functools.partial(fn, **kwargs)
    functools.update_wrapper(bound, fn)
    return bound
