"""The process stage on a Ray cluster (`[inference] backend = "ray"`).

The node stays the DICOM front door and the journal stays the source of truth; only the work of
the inference process moves: a pool of Ray actors, each holding the model loaded once (on a GPU
when the cluster has them), takes one job at a time. Nothing assumes a shared filesystem: the
model's files and each series' bytes go to the actors through Ray's object store, and the encoded
outputs come back as bytes, which the node writes to the job's spool folder as the local inference
process would. It implements `dicomnode.engine.Engine`, as the local inference process does, with
`capacity` jobs in flight at once.

Failures map onto the same outcomes: an exception in the processor fails the job
(InferenceFailed); a dead actor or a lost worker is InferenceCrashed (Ray restarts the actor, and
the job is retried, `[inference] crash_retries`, on whichever actor is free); a job past the
watchdog gets its actor killed and restarted (InferenceTimeout); a cluster that cannot be reached
is InferenceUnavailable: the job goes back to the queue without counting an attempt, /readyz says
so, and the node keeps trying to connect. Ray is imported only here, and only when configured.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dicomnode.config import InferenceConfig
from dicomnode.engine import (
    EngineResult,
    InferenceCrashed,
    InferenceFailed,
    InferenceRefused,
    InferenceRequest,
    InferenceTimeout,
    InferenceUnavailable,
    ProcessorSpec,
    Synthesis,
    build_processor,
    describe_processor,
    output_name,
    run_processor,
)
from dicomnode.spool import write_atomic

log = logging.getLogger("dicomnode.cluster")

CONNECT_RETRY_SECONDS = 10.0
NAMESPACE = "dicomnode"


@dataclass(frozen=True)
class ShippedModel:
    """A model folder's files, carried to the actors through the object store."""

    name: str
    files: tuple[tuple[str, bytes], ...]

    @classmethod
    def read(cls, folder: Path) -> "ShippedModel":
        return cls(folder.name, tuple((p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()))

    def materialize(self) -> Path:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="dicomnode-model-")) / self.name
        folder.mkdir()
        for name, data in self.files:
            (folder / name).write_bytes(data)
        return folder


class SynthesisActor:
    """One model replica: builds the processor once, then runs jobs sent as bytes."""

    def __init__(self, processor_spec: ProcessorSpec, model: ShippedModel | None = None):
        if model is not None and isinstance(processor_spec, Synthesis):  # load the shipped copy of the model
            processor_spec = processor_spec.using_model(model.materialize())
        self.processor = build_processor(processor_spec)

    def info(self) -> dict[str, Any]:
        import socket

        return {**describe_processor(self.processor), "pid": os.getpid(), "host": socket.gethostname()}

    def process(self, request: InferenceRequest, blobs: list[bytes]) -> dict[str, Any]:
        from io import BytesIO

        from pydicom import dcmread

        t0 = time.perf_counter()
        datasets = [dcmread(BytesIO(b)) for b in blobs]
        timings = {"load": time.perf_counter() - t0}
        result = run_processor(self.processor, request, datasets)
        timings.update(result.timings)
        t0 = time.perf_counter()
        files = []
        for ds in result.datasets:
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            files.append((output_name(ds), buf.getvalue()))
        timings["encode_bytes"] = time.perf_counter() - t0
        return {"files": files, "timings": timings, "metrics": dict(result.metrics)}


class RayEngine:
    """A pool of `ray_actors` SynthesisActors on the cluster at `ray_address`."""

    hold_jobs_while_unready = True  # an unreachable cluster: jobs wait in the queue, never fail

    def __init__(self, processor_spec: ProcessorSpec, inference: InferenceConfig, *,
                 on_restart: Callable[[str], None] | None = None):
        self.processor_spec = processor_spec
        self.inference = inference
        self.on_restart = on_restart
        self.capacity = inference.ray_actors
        self.info: dict[str, Any] = {}
        self._actors: list = []
        self._idle: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._keeper: threading.Thread | None = None
        self._wake = threading.Event()
        self._last_attempt = float("-inf")
        self._error: str | None = None
        self._started_ray = False
        self._stopping = False
        self._actor_args: tuple = ()

    # -- connection ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return bool(self._actors) and self._error is None

    def status(self) -> tuple[bool, str]:
        if self.ready:
            where = self.inference.ray_address
            return True, f"{self.info.get('name', '?')}: {len(self._actors)} Ray actor(s) on {where}"
        return False, f"Ray cluster {self.inference.ray_address}: {self._error or 'connecting'}"

    def start(self, wait_ready: bool = True) -> None:
        """Connect and create the actors: now, in this thread, or (not `wait_ready`) in the keeper
        thread, which retries every CONNECT_RETRY_SECONDS until it succeeds.

        Whichever thread starts a local Ray must outlive it: Ray's processes get SIGKILL when the
        *thread* that spawned them exits (PR_SET_PDEATHSIG), so that is never a short-lived one."""
        if wait_ready:
            self._connect()
            return
        self.ensure_started()

    def ensure_started(self) -> None:
        if self._keeper is None or not self._keeper.is_alive():
            self._keeper = threading.Thread(target=self._keep_connected, name="dicomnode-ray", daemon=True)
            self._keeper.start()

    def _keep_connected(self) -> None:
        while not self._stopping:
            if not self.ready and time.monotonic() - self._last_attempt >= CONNECT_RETRY_SECONDS:
                self._connect()
            self._wake.wait(1.0)
            self._wake.clear()

    def _connect(self) -> None:
        import ray

        self._last_attempt = time.monotonic()
        try:
            with self._lock:
                if not ray.is_initialized():
                    self._init_ray(ray)
                if not self._actors:
                    self._create_actors(ray)
            self._error = None
        except Exception as exc:  # unreachable, refused, or the model does not load on the workers
            self._error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            log.error("Ray backend not ready (%s); retrying every %.0f s", self._error, CONNECT_RETRY_SECONDS)

    def _init_ray(self, ray) -> None:
        inf = self.inference
        common = dict(namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
        if inf.ray_address == "local":  # one machine, sized for the actors (Ray listens on every interface)
            cpus = max(1, int(round(inf.ray_actors * inf.ray_cpus_per_actor + 0.4999)))
            ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **common)
            self._started_ray = True
        else:
            ray.init(address=inf.ray_address, **common)
        log.info("connected to Ray %s (%s)", inf.ray_address, ray.cluster_resources())

    def _create_actors(self, ray) -> None:
        from dicomnode.modelpath import resolve_model

        inf = self.inference
        spec, model = self.processor_spec, None
        if isinstance(spec, Synthesis):  # ship the model's files: the workers need no copy of models/
            model = ShippedModel.read(resolve_model(spec.inference.model))
        gpus = inf.ray_gpus_per_actor
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        actor_cls = ray.remote(SynthesisActor).options(num_cpus=inf.ray_cpus_per_actor, num_gpus=gpus,
                                                        max_restarts=-1, max_task_retries=0)
        # held for the engine's life: Ray rebuilds a restarted actor from these same objects
        self._actor_args = (ray.put(spec), ray.put(model))
        actors = [actor_cls.remote(*self._actor_args) for _ in range(inf.ray_actors)]
        infos = ray.get([a.info.remote() for a in actors], timeout=inf.start_timeout_seconds)
        self.info = {**infos[0], "actors": len(actors)}
        self._actors = actors
        for a in actors:
            self._idle.put(a)
        log.info("%d Ray actor(s) ready: %s", len(actors), ", ".join(f"{i['host']}:{i['pid']} ({i['device']})"
                                                                     for i in infos))

    # -- jobs ------------------------------------------------------------------------------------
    def run(self, request: InferenceRequest, timeout: float) -> EngineResult:
        """Run one job on a free actor; write its outputs to `request.out_dir`."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        if not self.ready or self._stopping:
            raise InferenceUnavailable(f"Ray cluster {self.inference.ray_address}: {self._error or 'not connected'}")
        actor = self._idle.get()
        try:
            self._await_actor(actor)
            t0 = time.perf_counter()
            blobs = ray.put([Path(p).read_bytes() for p in request.paths])
            send = time.perf_counter() - t0
            ref = actor.process.remote(request, blobs)
            try:
                result = self._get(ref, timeout)
            except GetTimeoutError:
                ray.kill(actor, no_restart=False)  # Ray starts a fresh replica in its place
                if self.on_restart is not None:
                    self.on_restart("timeout")
                raise InferenceTimeout(f"inference exceeded {timeout:g} s; the Ray actor was killed and is "
                                       "restarted") from None
            except RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                if isinstance(cause, InferenceRefused):  # the safety gate
                    raise InferenceRefused(cause.check, cause.reason, cause.score) from None
                raise InferenceFailed(f"{type(cause).__name__}: {cause}") from None
            except RayActorError as exc:
                if self.on_restart is not None:
                    self.on_restart("crash")
                raise InferenceCrashed(f"the Ray actor died during the job ({type(exc).__name__}); Ray restarts "
                                       "it") from None
            except (ConnectionError, ray.exceptions.RaySystemError) as exc:
                self._error = f"{type(exc).__name__}: {exc}"[:300]
                raise InferenceUnavailable(f"lost the Ray cluster: {self._error}") from None
        finally:
            self._idle.put(actor)
        t0 = time.perf_counter()
        out_dir = Path(request.out_dir)
        for name, data in result["files"]:
            write_atomic(out_dir / name, [data])
        timings = {**result["timings"], "transfer": send, "write": time.perf_counter() - t0}
        return {"outputs": len(result["files"]), "timings": timings, "metrics": result["metrics"]}

    def _await_actor(self, actor) -> None:
        """Return once `actor` answers: one that Ray is restarting after a crash answers when its
        model is loaded again. InferenceCrashed if it does not within start_timeout_seconds."""
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

        deadline = time.monotonic() + self.inference.start_timeout_seconds
        while True:
            try:
                self._get(actor.info.remote(), max(0.1, deadline - time.monotonic()))
                return
            except ActorUnavailableError:  # restarting
                if time.monotonic() >= deadline:
                    raise InferenceCrashed("the Ray actor did not come back after a crash") from None
                time.sleep(0.5)
            except (GetTimeoutError, RayActorError) as exc:
                raise InferenceCrashed(f"the Ray actor is not available ({type(exc).__name__})") from None

    def _get(self, ref, timeout: float):
        import ray

        try:
            return ray.get(ref, timeout=timeout)
        except Exception:
            if self._stopping:  # the node is stopping: the job goes back to the queue
                raise InferenceUnavailable("the node is stopping") from None
            raise

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        try:
            import ray
        except ImportError:
            return
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone with its cluster
                pass
        self._actors = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False
