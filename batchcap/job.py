"""What ``transcribe`` and ``caption_images`` share: options common to every job and the one
way a job is set up (inputs checked, output name checked, model loaded here or in Ray replicas)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .fetch import FetchConfig
from .inputs import Inputs, InputSpec
from .output import output_format
from .runner import RunConfig, RunResult, Task, run_job


def apply_overrides(options: Any, overrides: dict[str, Any], caller: str) -> None:
    """Set keyword overrides on an options dataclass; an unknown name is the caller's TypeError."""
    for key, value in overrides.items():
        if not hasattr(options, key):
            raise TypeError(f"{caller}() got an unexpected option {key!r}")
        setattr(options, key, value)


@dataclass
class JobOptions:
    """Options of every job; AudioOptions and ImageOptions add their model's."""

    model: str = ""
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16
    num_beams: int = 1
    workers: int = 8  # decode threads
    fetch_workers: int | None = None  # fetch threads; None: 4 x workers
    fetch: FetchConfig = field(default_factory=FetchConfig)
    path_column: str | None = None
    reference_columns: Sequence[str] = ()
    id_column: str | None = None
    overwrite: bool = False
    retry_failed: bool = False
    flush_rows: int = 256
    engine: str = "local"  # local | ray
    ray_address: str | None = None
    concurrency: int = 1  # ray: model replicas
    num_gpus_per_replica: float = 0.0
    quiet: bool = False
    progress: bool | None = None

    def update(self, overrides: dict[str, Any], caller: str) -> None:
        apply_overrides(self, overrides, caller)

    def run_config(self, group: int) -> RunConfig:
        return RunConfig(batch_size=self.batch_size, workers=self.workers, fetch_workers=self.fetch_workers,
                         group=group, quiet=self.quiet,
                         progress=self.progress, flush_rows=self.flush_rows, engine=self.engine,
                         ray_address=self.ray_address, concurrency=self.concurrency,
                         num_gpus_per_replica=self.num_gpus_per_replica)


def build_task(task_cls: Callable[[Any, Any], Task], load_model: Callable[[Any], Any], options: JobOptions,
               model: Any, with_model: bool) -> Task:
    """A job's task around ``model`` (loaded with ``load_model`` when None and wanted); the Ray
    driver gets one without a model, only to score rows and summarize."""
    if model is None and with_model:
        model = load_model(options)
    return task_cls(model, options)


def run_pipeline(inputs: str | Sequence[str], output: str, options: JobOptions, spec: InputSpec,
                 make_task: Callable[[bool], Task], group: int) -> RunResult:
    """Check inputs and output, then run; ``make_task(with_model)`` builds the job's task.

    The local engine loads the model here; the Ray engine gives the driver a task without a
    model and each replica builds its own from ``make_task`` (so it must be picklable).
    """
    output_format(output)  # a bad output name fails before the model loads
    items = Inputs([inputs] if isinstance(inputs, str) else list(inputs), spec)
    items.check()
    if options.engine == "ray":
        task, factory = make_task(False), functools.partial(make_task, True)
    else:
        task, factory = make_task(True), None
    return run_job(items, task, output, fetch=options.fetch, config=options.run_config(group),
                   overwrite=options.overwrite, retry_failed=options.retry_failed, task_factory=factory)
