"""What ``transcribe`` and ``caption_images`` share: the options of every job, the job's three parts
(model-free preprocessor, predictor, scorer) and the one way a job is started."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .fetch import FetchConfig
from .inputs import Inputs, InputSpec
from .output import output_format, own_files
from .stages import Predictor, Preprocessor, Scorer

DEFAULT_MAX_INFLIGHT_BYTES = 2 * 2**30  # decoded items (samples, features, pixels) waiting for the model
ENGINES = ("local", "ray")


def apply_overrides(options: Any, overrides: dict[str, Any], caller: str) -> None:
    """Set keyword overrides on an options dataclass; an unknown name is the caller's TypeError."""
    for key, value in overrides.items():
        if not hasattr(options, key):
            raise TypeError(f"{caller}() got an unexpected option {key!r}")
        setattr(options, key, value)


def call_options(options: Any, default: type, overrides: dict[str, Any], caller: str) -> Any:
    """The options of one API call: a copy of ``options`` (or the defaults) with ``overrides`` set. The
    caller's object is left as it was (a one-off ``overwrite=True`` was written into it, and the next call
    with it started the table over)."""
    import copy

    options = copy.deepcopy(options) if options is not None else default()
    apply_overrides(options, overrides, caller)
    return options


def adopt_loaded(options: Any, default: type, given: dict[str, Any], what: str) -> None:
    """Options a loaded model was built with (``given``: name -> value; a transcriber or captioner passed
    to the API) replace the call's: a value the call asks for that differs from both the model's and the
    default is one FatalError (it was ignored, and the summary said it was used)."""
    from .items import FatalError

    defaults = default()
    asked = {k: getattr(options, k) for k in given
             if getattr(options, k) != given[k] and getattr(options, k) != getattr(defaults, k)}
    if asked:
        built = ", ".join(f"{k}={given[k]!r}" for k in asked)
        wanted = ", ".join(f"{k}={v!r}" for k, v in asked.items())
        raise FatalError(f"the {what} given was loaded with {built}; this call asks for {wanted}: load one with "
                         "those options, or leave them out")
    for key, value in given.items():
        setattr(options, key, value)  # what the rows were made with, in the summary too


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
    max_inflight_bytes: int | None = DEFAULT_MAX_INFLIGHT_BYTES  # local engine: decoded bytes held; None: no cap
    path_column: str | None = None
    reference_columns: Sequence[str] = ()
    id_column: str | None = None
    overwrite: bool = False
    retry_failed: bool = False
    flush_rows: int = 256  # rows per part file (what a crash can cost at most)
    engine: str = "local"  # local | ray
    ray_address: str | None = None  # None/"auto": a running cluster if there is one, else a local instance
    concurrency: int = 1  # ray: model replicas (actors)
    num_gpus_per_replica: float = 0.0  # ray: GPUs each replica reserves
    quiet: bool = False
    progress: bool | None = None  # a bar; None: when stderr is a terminal
    log_every: float = 30.0  # seconds between progress log lines when there is no bar
    report: bool = False  # write OUT.report.html (batchcap report) at the end
    command: Sequence[str] | None = None  # the command line, for the summary and the report (the CLI sets it)

    def update(self, overrides: dict[str, Any], caller: str) -> None:
        apply_overrides(self, overrides, caller)

    def check(self) -> None:
        """Values the CLI's option types would have refused, given through the Python API: one FatalError
        naming the option, before anything runs (not an error in every row, or a TypeError deep inside)."""
        from .items import FatalError

        if isinstance(self.reference_columns, str):  # one column named as a string, not its letters
            self.reference_columns = (self.reference_columns,)
        counts = {"batch_size": 1, "num_beams": 1, "workers": 1, "flush_rows": 1, "concurrency": 1,
                  "fetch_workers": 1}
        for name, least in counts.items():
            value = getattr(self, name, least)
            none_ok = name == "fetch_workers"  # None: 4 x workers
            if value is None and none_ok:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise FatalError(f"{name} must be a whole number of at least {least}"
                                 f"{' (or None)' if none_ok else ''}, not {value!r}")
        for name in self.limit_numbers:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value >= 0):  # 0, as None: no limit
                raise FatalError(f"{name} must be a number (or None), not {value!r}")
        for name, allowed in self.choices.items():
            if getattr(self, name) not in allowed:
                raise FatalError(f"{name} must be one of {', '.join(map(str, allowed))}, not {getattr(self, name)!r}")
        for name, (least, most, none_ok) in self.real_numbers.items():
            value = getattr(self, name)
            if value is None and none_ok:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                    or (least is not None and value < least) or (most is not None and value > most):
                span = " ".join(p for p in (f"from {least:g}" if least is not None else "",
                                            f"to {most:g}" if most is not None else "") if p)
                raise FatalError(f"{name} must be a number{' ' + span if span else ''}"
                                 f"{' (or None)' if none_ok else ''}, not {value!r}")

    # options checked by ``check`` (subclasses add theirs): numbers where 0 / None mean "no limit", other
    # numbers (name -> least, most, None allowed), and choices
    limit_numbers: ClassVar[tuple[str, ...]] = ("max_inflight_bytes",)
    real_numbers: ClassVar[dict[str, tuple[float | None, float | None, bool]]] = {"log_every": (0.0, None, False)}
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"engine": ENGINES}


@dataclass
class Job:
    """One kind of work: what the engines need to run it.

    ``preprocessor`` and ``scorer`` hold no model and are pickled to Ray workers; ``load_predictor``
    (picklable too) loads the model where it runs: once in this process for the local engine,
    once per replica for the Ray engine.
    """

    preprocessor: Preprocessor
    scorer: Scorer
    load_predictor: Callable[[], Predictor]
    group: int = 4  # items are sorted by size in windows of batch_size * group
    # a window's batches run from its largest items to its smallest (the batches themselves are the same)
    longest_first: bool = False

    @property
    def kind(self) -> str:
        return self.scorer.kind


def run_pipeline(inputs: str | Sequence[str], output: str, options: JobOptions, spec: InputSpec, job: Job,
                 predictor: Predictor | None = None) -> Any:
    """Check inputs and output, then run ``job`` (with ``predictor`` if given, else the job's own)."""
    from .runner import run_job

    inputs = os.fspath(inputs) if isinstance(inputs, (str, os.PathLike)) else [os.fspath(i) for i in inputs]
    output = os.fspath(output)
    output_format(output)  # a bad output name fails before the model loads
    write_dir = getattr(options, "write_dir", None)  # subtitle files put elsewhere (audio)
    own = own_files(output) + ([write_dir] if write_dir else [])
    items = Inputs([inputs] if isinstance(inputs, str) else list(inputs), spec, exclude=own)
    items.check()
    return run_job(items, job, output, options, predictor=predictor)
