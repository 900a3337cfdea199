"""Engines that run a build's pending blocks: in this process, or on Ray actors.

Both run the one block routine, :class:`~reinforce.build.blocks.BlockRunner`: a worker decodes, computes and writes
its block through a :class:`~reinforce.build.writer.BlockSink` and marks it done; the driver alone creates, resumes
and finalizes the store, hands out block numbers and collects :class:`~reinforce.build.blocks.BlockStats`. Ray is
imported only when a Ray engine is asked for.

* :class:`InProcessEngine` (no ``--workers``, no ``--ray-address``): no cluster, nothing to configure; blocks
  in order, the next one loading and the previous one being written while the teachers run on this one.
* :class:`RayEngine`: ``--workers N`` starts a local Ray instance with N workers; ``--ray-address auto|ADDR``
  joins a running cluster. With ``--device cuda`` there is one worker per GPU (per unit of the resource
  :data:`DEVICE_RESOURCE_VARIABLE` names, when set), holding the teachers, fed by CPU-only preparers on the
  cluster's spare CPUs. An actor that dies (SIGKILL, node loss, out of host memory) is replaced and its blocks
  are retried, at most ``max_retries`` times each, each retry alone on its actor; errors the project raises on
  purpose (an unreadable image, device out of memory) are deterministic and stop the build at once.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from reinforce_loaders import format as fmt
from reinforce_loaders.errors import ReinforceError
from reinforce_loaders.source import ImageSource

from .blocks import BlockPreparer, BlockRunner, BlockStats, LoadedBlock, RecordsDone, make_processor
from .plan import BuildConfig, BuildError, BuildPlan, available_cores
from .teachers import Ensemble
from .writer import BlockSink, StoreWriter

T = TypeVar("T")

BLOCKS_IN_FLIGHT = 2
"""Blocks a worker holds at once: one decoding or writing while the other uses the device."""
BLOCKS_LOADED_AHEAD = 2
"""Blocks the in-process engine loads ahead of the one whose first micro-batch is due: with micro-batches
augmented two ahead, the next block is due while the one after it has barely started to decode."""
PREPARER_CPUS = 1
"""CPUs a Ray preparer reserves (it decodes with ``--decode-threads`` threads, 4 by default, mostly outside the
GIL)."""
PREPARERS_PER_WORKER = 2
"""At most this many preparers per device worker: two keep a worker fed while one of them is slow."""
DEVICE_RESOURCE_VARIABLE = "REINFORCE_RAY_DEVICE_RESOURCE"
"""Environment variable naming a custom Ray resource that stands in for a GPU (tests; clusters whose
accelerators carry another name): one device worker per unit of it."""
PROGRESS_SECONDS = 1.0
"""How often the Ray driver asks its workers how many records they have computed (for the progress bar)."""


def make_engine(plan: BuildPlan, writer: StoreWriter, ensemble: Ensemble,
                source: ImageSource) -> InProcessEngine | RayEngine:
    """The engine ``plan`` asks for (see the module docstring); ``writer`` is the driver's open store."""
    if plan.config.uses_ray:
        return RayEngine(plan, ensemble)
    return InProcessEngine(plan, writer, ensemble, source)


def _block_failed(header: fmt.StoreHeader, block: int, times: int, cause: str) -> BuildError:
    start, stop = header.block_range(block)
    return BuildError(
        f"block {block} (samples {start}..{stop - 1}) failed {times} time{'s' if times > 1 else ''}, giving up; "
        f"last cause: {cause}. Blocks already written are kept: fix the cause and re-run the same command to resume"
    )


class InProcessEngine:
    """Every block in this process, in order, in three overlapping stages: the next blocks load (decode, sample,
    encode parameters; :data:`BLOCKS_LOADED_AHEAD` of them) in one thread while the teachers run on this one
    (and the helper threads of :meth:`~reinforce.build.blocks.BlockProcessor.compute_blocks` augment the next
    micro-batches), and the previous block is encoded, compressed and written in another, at most one behind."""

    retries = 0

    def __init__(self, plan: BuildPlan, sink: BlockSink, ensemble: Ensemble, source: ImageSource) -> None:
        self.header = plan.header
        self.runner = BlockRunner(make_processor(plan, ensemble, source), sink, name="main")
        self.description = f"in-process on {plan.config.device}"

    def __enter__(self) -> InProcessEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.runner.processor.close()

    def run(self, pending: list[int], records_done: RecordsDone | None = None) -> Iterator[BlockStats]:
        """Run ``pending`` blocks, yielding each one's stats once written; ``records_done`` hears of every
        micro-batch."""
        if not pending:
            return
        runner, header = self.runner, self.header
        computed = 0  # blocks out of the device stage (in the order of pending)

        def loaded_blocks(loader: ThreadPoolExecutor) -> Iterator[LoadedBlock]:
            loading = collections.deque(loader.submit(runner.load, block) for block in pending[:BLOCKS_LOADED_AHEAD])
            for position, block in enumerate(pending):
                if position + BLOCKS_LOADED_AHEAD < len(pending):
                    loading.append(loader.submit(runner.load, pending[position + BLOCKS_LOADED_AHEAD]))
                yield _block_result(header, block, loading.popleft())

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as loader, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer") as writer:
            writing: tuple[int, Future[BlockStats]] | None = None
            try:
                for loaded, result in runner.compute_blocks(loaded_blocks(loader), records_done):
                    block = pending[computed]
                    computed += 1
                    if writing is not None:  # one block waits to be written at most: memory stays flat
                        yield _block_result(header, *writing)
                        writing = None
                    if runner.processor.ahead:
                        writing = (block, writer.submit(runner.write, block, loaded, result))
                    else:  # the serial baseline: each block written before the teachers go on
                        yield _block_result(header, block, _now(runner.write, block, loaded, result))
                if writing is not None:
                    yield _block_result(header, *writing)
            except ReinforceError:
                raise
            except Exception as error:
                # The device stage failed: its earliest block not yet computed is the one it was working on.
                block = pending[min(computed, len(pending) - 1)]
                raise _block_failed(header, block, 1, f"{type(error).__name__}: {error}") from error


def _now(function: Callable[..., BlockStats], *args: Any) -> Future[BlockStats]:
    """A future of ``function(*args)`` run in this thread (its error kept for :func:`_block_result` to name)."""
    future: Future[BlockStats] = Future()
    try:
        future.set_result(function(*args))
    except Exception as error:  # noqa: BLE001 - raised again by the future's result()
        future.set_exception(error)
    return future


def _block_result(header: fmt.StoreHeader, block: int, step: Future[T]) -> T:
    """The result of a step of ``block`` (its load or its write) once done; an unexpected error names the block."""
    try:
        return step.result()
    except ReinforceError:
        raise
    except Exception as error:
        raise _block_failed(header, block, 1, f"{type(error).__name__}: {error}") from error


class BlockWorker:
    """A Ray actor holding one :class:`~reinforce.build.blocks.BlockRunner` (teachers loaded once, on its device)
    and a sink into the store the driver created. It loads its blocks itself (:meth:`run`), or takes them loaded
    by a :class:`BlockPreparerActor` (:meth:`run_loaded`)."""

    def __init__(self, plan: BuildPlan, ensemble: Ensemble, name: str, cores: int | None = None) -> None:
        if plan.device_type == "cuda":  # Ray shows each actor only its own GPU
            plan = dataclasses.replace(plan, config=dataclasses.replace(plan.config, device="cuda"))
        self.runner = BlockRunner(make_processor(plan, ensemble, cores=cores),
                                  BlockSink.open(plan.config.out, plan.header), name=name)
        self.records = 0

    def run(self, block: int) -> BlockStats:
        return self.runner.finish(block, self.runner.load(block), self._count)

    def run_loaded(self, block: int, loaded: LoadedBlock) -> BlockStats:
        """Compute and write a block a preparer loaded (Ray hands over the object, not its reference)."""
        return self.runner.finish(block, loaded, self._count)

    def _count(self, records: int) -> None:
        self.records += records

    def progress(self) -> int:
        """Records this worker has computed so far, over all its blocks."""
        return self.records

    def pid(self) -> int:
        return os.getpid()


class BlockPreparerActor:
    """A CPU-only Ray actor that decodes blocks and samples their parameters for the device workers (no teachers,
    no device): it uses CPUs of the cluster the device workers leave spare."""

    def __init__(self, plan: BuildPlan) -> None:
        self.preparer = BlockPreparer(plan, cores=PREPARER_CPUS)

    def load(self, block: int) -> LoadedBlock:
        return self.preparer.load(*self.preparer.plan.header.block_range(block))

    def pid(self) -> int:
        return os.getpid()


@dataclasses.dataclass
class _Slot:
    """One worker position: its current actor and the blocks it holds."""

    name: str
    actor: Any
    blocks: list[int] = dataclasses.field(default_factory=list)
    generation: int = 0
    reported: int = 0
    """Records of the current actor already passed on to the progress callback."""


def device_resource(config: BuildConfig) -> str | None:
    """The Ray resource each device worker holds one unit of: :data:`DEVICE_RESOURCE_VARIABLE` if set, else
    ``GPU`` with ``--device cuda``; None on the CPU (workers then reserve ``--cpu-threads`` CPUs each)."""
    return os.environ.get(DEVICE_RESOURCE_VARIABLE) or ("GPU" if config.device_type == "cuda" else None)


class RayEngine:
    """Blocks on Ray actors (see the module docstring).

    With a device resource (:func:`device_resource`: GPUs, or a custom resource standing in for them) there is
    one device worker per unit of it, holding the teachers, and the CPUs the cluster has beyond those workers'
    run CPU-only :class:`BlockPreparerActor` s that decode and sample blocks for them (up to
    :data:`PREPARERS_PER_WORKER` per worker). Without one (a CPU build), every worker does all of its blocks.
    """

    def __init__(self, plan: BuildPlan, ensemble: Ensemble) -> None:
        import ray

        config = plan.config
        self.plan, self.config, self.header = plan, config, plan.header
        self.retries = 0
        self.owned = False
        self.resource = device_resource(config)
        if not ray.is_initialized():
            if config.ray_address is not None:
                ray.init(address=config.ray_address, log_to_driver=False)
            else:
                # address="local": a new instance even where another cluster runs on this machine. A CPU build
                # reserves exactly its workers' threads; a device build leaves the other cores to preparers.
                cpus = (config.workers or 1) * plan.cpu_threads
                ray.init(address="local", num_cpus=max(cpus, available_cores()) if self.resource else cpus,
                         include_dashboard=False, log_to_driver=False)
            self.owned = True
        resources = ray.cluster_resources()
        self.workers = self._worker_count(resources)
        spare = int(resources.get("CPU", 0) - self.workers * plan.cpu_threads)
        self.num_preparers = min(spare // PREPARER_CPUS, PREPARERS_PER_WORKER * self.workers) if self.resource else 0
        where = f"cluster {config.ray_address}" if config.ray_address is not None else "local"
        self.description = (f"Ray ({where}), {self.workers} workers on {config.device}"
                            + (f" ({self.resource})" if self.resource not in (None, "GPU") else "")
                            + (f", {self.num_preparers} CPU preparers" if self.num_preparers else ""))
        self.ensemble_ref = ray.put(ensemble)
        device = {} if self.resource is None else (
            {"num_gpus": 1} if self.resource == "GPU" else {"resources": {self.resource: 1}})
        self.actor_class = ray.remote(BlockWorker).options(
            num_cpus=plan.cpu_threads, max_concurrency=BLOCKS_IN_FLIGHT + 1, max_restarts=0, max_task_retries=0,
            **device)
        self.preparer_class = ray.remote(BlockPreparerActor).options(
            num_cpus=PREPARER_CPUS, max_concurrency=1, max_restarts=0, max_task_retries=0)
        # Without preparers a worker decodes its own blocks, with its share of the cluster's CPUs.
        self.worker_cores = None if self.num_preparers else max(int(resources.get("CPU", 0)) // self.workers, 1)
        self.slots: list[_Slot] = []
        self.preparers: list[Any] = []

    def _worker_count(self, resources: dict[str, float]) -> int:
        if self.resource is not None and resources.get(self.resource, 0) < 1:
            raise BuildError(
                f"--device {self.config.device} needs {self.resource} resources but the Ray cluster has none "
                f"(resources: {resources}): use --device cpu, or join a cluster with GPUs"
            )
        capacity = int(resources.get("CPU", 0) // max(self.plan.cpu_threads, 1e-9))
        if self.resource is not None:
            capacity = min(capacity, int(resources.get(self.resource, 0)))
        if capacity < 1:
            raise BuildError(f"the Ray cluster cannot host one worker of {self.plan.cpu_threads} CPUs "
                             f"(resources: {resources}): lower --cpu-threads")
        asked = self.config.workers or capacity
        if asked > capacity:
            # Actors beyond capacity would wait forever with their blocks.
            warnings.warn(f"--workers {asked} but the Ray cluster holds only {capacity} workers of "
                          f"{self.plan.cpu_threads} CPUs{f' and 1 {self.resource}' if self.resource else ''}: "
                          f"using {capacity}", stacklevel=2)
        return min(asked, capacity)

    def _spawn(self, name: str) -> Any:
        return self.actor_class.remote(self.plan, self.ensemble_ref, name, self.worker_cores)

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray

        for actor in [slot.actor for slot in self.slots] + self.preparers:
            ray.kill(actor, no_restart=True)
        self.slots, self.preparers = [], []
        if self.owned:
            ray.shutdown()

    def _report_progress(self, records_done: RecordsDone) -> None:
        for slot, count in zip(self.slots, _ray_progress_of(self.slots), strict=True):
            if count is not None and count > slot.reported:
                records_done(count - slot.reported)
                slot.reported = count

    def worker_pids(self) -> list[int]:
        """Process ids of the current device workers (for fault-injection tests)."""
        import ray

        return ray.get([slot.actor.pid.remote() for slot in self.slots])

    def run(self, pending: list[int], records_done: RecordsDone | None = None) -> Iterator[BlockStats]:
        """Run ``pending`` blocks on the actors, yielding each one's stats; ``records_done`` hears of the
        records the workers computed about every :data:`PROGRESS_SECONDS`."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        self.slots = [_Slot(name=f"worker-{i}", actor=self._spawn(f"worker-{i}")) for i in range(self.workers)]
        self.preparers = [self.preparer_class.remote(self.plan) for _ in range(self.num_preparers)]
        queue = collections.deque(pending)
        failures: collections.Counter[int] = collections.Counter()
        in_flight: dict[Any, tuple[_Slot, int, int]] = {}  # ref -> (slot, its generation, block)
        handed = 0  # blocks handed to preparers so far (round robin)

        def submit(slot: _Slot, block: int) -> Any:
            nonlocal handed
            if not self.preparers:
                return slot.actor.run.remote(block)
            preparer = self.preparers[handed % len(self.preparers)]
            handed += 1
            return slot.actor.run_loaded.remote(block, preparer.load.remote(block))

        def fill() -> None:
            for slot in self.slots:
                while queue and len(slot.blocks) < BLOCKS_IN_FLIGHT:
                    # A retried block runs alone, so a block that kills its worker takes no other block down.
                    if slot.blocks and (failures[queue[0]] or any(failures[b] for b in slot.blocks)):
                        break
                    block = queue.popleft()
                    slot.blocks.append(block)
                    in_flight[submit(slot, block)] = (slot, slot.generation, block)

        def retry(block: int, cause: str) -> None:
            failures[block] += 1
            self.retries += 1
            if failures[block] > self.config.max_retries:
                raise _block_failed(self.header, block, failures[block], cause)
            queue.appendleft(block)

        lost_preparers: set[str] = set()

        def preparer_died(actor_id: str | None) -> bool:
            """Whether ``actor_id`` names a preparer (replaced the first time one of its blocks says it died)."""
            if actor_id in lost_preparers:
                return True
            for position, preparer in enumerate(self.preparers):
                if preparer._actor_id.hex() == actor_id:
                    ray.kill(preparer, no_restart=True)
                    self.preparers[position] = self.preparer_class.remote(self.plan)
                    lost_preparers.add(actor_id)
                    return True
            return False

        fill()
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=PROGRESS_SECONDS)
            if not done:
                if records_done is not None:
                    self._report_progress(records_done)
                continue
            slot, generation, block = in_flight.pop(done[0])
            if generation == slot.generation:
                slot.blocks.remove(block)
            try:
                stats = ray.get(done[0])
            except RayTaskError as error:
                cause = error.cause
                if isinstance(cause, ReinforceError):
                    raise cause from None
                retry(block, f"{type(cause).__name__}: {cause}")
            except RayActorError as error:
                if getattr(error, "actor_init_failed", False):
                    raise BuildError(f"a build worker could not start: {_one_line(error)}") from None
                if preparer_died(getattr(error, "actor_id", None)):
                    retry(block, f"its preparer died ({_one_line(error)})")
                else:
                    if generation == slot.generation:
                        # Replace the dead actor once; its other blocks come back as errors too.
                        ray.kill(slot.actor, no_restart=True)
                        slot.generation += 1
                        slot.reported = 0
                        slot.blocks = []
                        slot.actor = self._spawn(slot.name)
                    retry(block, f"its worker died ({_one_line(error)})")
            else:
                yield stats
            fill()


def _ray_progress_of(slots: list[_Slot]) -> list[int | None]:
    """Each slot's actor's computed records (None for one that does not answer within a second)."""
    import ray

    refs = [slot.actor.progress.remote() for slot in slots]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=1.0)
    counts: list[int | None] = []
    for ref in refs:
        try:
            counts.append(ray.get(ref) if ref in ready else None)
        except Exception:  # noqa: BLE001 - a dead actor is handled where its block's result comes back
            counts.append(None)
    return counts


def _one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + "..."
