"""One resolved configuration object for the batch stage, shared by every runtime and engine.

:class:`ExtractOptions` holds what the user asked for (command-line values, still unresolved: ``"imagenet"``,
``None`` for "the backbone's own input size"...). :func:`resolve_config` checks them and resolves them, once, into
an :class:`ExtractConfig`: the backbone spec, input size and width multiplier, the local weights file and its
SHA-256 (announcing a download first when one is needed), the feature kinds, the view spec and the run settings.
Everything downstream (the planner, the local and Ray engines, the Keras and ONNX runtimes, the cache writer)
reads that one object; nothing is passed around as loose parameters. It is a frozen dataclass of plain values, so
it pickles to Ray workers as it is.

:class:`~pipeline.backbones.ModelConfig` (the model's identity, beside the backbone registry) is the part that
defines the feature model itself (what ``predict`` and ``export`` rebuild); the cache *signature*
(:meth:`ExtractConfig.signature`) is what makes two sets of rows interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from pipeline.backbones import ModelConfig, resolve_model
from pipeline.cache.format import Signature
from pipeline.data import DEFAULT_RESIZE, RESIZE_RULES
from pipeline.errors import BackboneError, check_choice
from pipeline.machine import decode_threads
from pipeline.reader import READER_KINDS
from pipeline.runtime.factory import RUNTIME_CHOICES
from pipeline.views import NO_VIEWS, ViewSpec

PIXEL_RULE = "headbench-pixels-3"
"""Version of :mod:`pipeline.data`'s decoding rule; bump it when pixels change: old caches are then rebuilt."""

ENGINES = ("local", "ray")
MAPS_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray engine runs (see docs/scaling.md).

    Attributes
    ----------
    address : str or None
        ``None`` starts a local Ray instance; ``"auto"`` or ``"ray://host:port"`` joins an existing cluster.
    num_workers : int or None
        Model actors (default: as many as the cluster's CPUs or GPUs allow).
    gpus_per_worker : float
        GPUs reserved by each model actor (0 on CPU-only clusters).
    """

    address: str | None = None
    num_workers: int | None = None
    gpus_per_worker: float = 0.0


@dataclass(frozen=True)
class ExtractOptions:
    """What the user asked for, before resolution (the values of ``python cli.py extract``'s options).

    Attributes
    ----------
    backbone, weights : str
        Registered backbone name; ``"imagenet"``, ``"none"`` or a weights file path.
    input_size, alpha : optional
        Square input side (default: the backbone's own) and width multiplier (MobileNets).
    resize : {"crop", "squash", "pad"}
    maps, max_pool : bool
        Also store the last spatial maps / global max pooling (average pooling is always stored).
    maps_dtype : {"float16", "float32"}
    views : ViewSpec or None
        Augmented views per image; ``None`` keeps what an existing cache has (none for a new cache).
    runtime : {"auto", "onnx", "keras"}
    engine : {"local", "ray"}
    ray : RayOptions
    batch_size : int
        Images per forward pass. 32 is within noise of 16 and 64 on CPU and fits any GPU for these models. At most
        ``checkpoint_rows`` (a larger one is capped at it when resolved).
    workers : int or None
        Decoding workers (default: one per CPU core, at most 8: :func:`pipeline.machine.decode_threads`).
    reader : {"auto", "process", "thread"}
        Kind of decoding worker (:func:`pipeline.reader.plan_reader`: ``auto`` takes processes when the model runs
        on a GPU, for 256 images or more where ``/dev/shm`` has room, threads otherwise). The local engine's; Ray's
        decoding tasks are processes already.
    strict : bool
        Stop at the first image that cannot be decoded instead of recording it.
    retry_failed : bool
        Retry rows that failed in an earlier run (a file that was unreadable for a passing reason).
    checkpoint_rows, checkpoint_seconds : int, float
        Finished rows are committed every this many images or seconds, whichever comes first.
    cache_dir : path
    command : str
        The command line, recorded in the cache.
    quiet : bool
        No progress bar (it is only drawn on a terminal anyway).
    """

    backbone: str = "mobilenet_v2"
    weights: str = "imagenet"
    input_size: int | None = None
    alpha: float | None = None
    resize: str = DEFAULT_RESIZE
    maps: bool = False
    max_pool: bool = False
    maps_dtype: str = "float16"
    views: ViewSpec | None = None
    runtime: str = "auto"
    engine: str = "local"
    ray: RayOptions = field(default_factory=RayOptions)
    batch_size: int = 32
    workers: int | None = None
    reader: str = "auto"
    strict: bool = False
    retry_failed: bool = True
    checkpoint_rows: int = 256
    checkpoint_seconds: float = 20.0
    cache_dir: Path = Path("cache")
    command: str = ""
    quiet: bool = True


@dataclass(frozen=True)
class ExtractConfig:
    """The resolved configuration of one extraction (one dataset x one backbone configuration).

    Built by :func:`resolve_config`; see :class:`ExtractOptions` for the meaning of the run settings.
    ``views`` is None until the planner has read the existing cache (``None`` in the options means "keep what
    the cache has"); :meth:`with_views` fixes it.
    """

    model: ModelConfig
    resize: str
    maps_dtype: str
    views: ViewSpec | None
    runtime: str
    engine: str
    ray: RayOptions
    batch_size: int
    workers: int
    reader: str
    strict: bool
    retry_failed: bool
    checkpoint_rows: int
    checkpoint_seconds: float
    cache_dir: Path
    command: str
    quiet: bool

    @property
    def kinds(self) -> tuple[str, ...]:
        """Feature kinds stored per row (``avg`` [, ``max``] [, ``maps``])."""
        return self.model.kinds

    @property
    def label(self) -> str:
        """Backbone label, e.g. ``mobilenet_v2-a1.0-224``."""
        return self.model.label

    def with_views(self, views: ViewSpec) -> "ExtractConfig":
        """A copy with the view spec fixed."""
        return replace(self, views=views)

    def signature(self) -> dict[str, Any]:
        """Cache attributes that must agree for rows to be interchangeable (a cache, its parts, a rerun).

        Returns
        -------
        dict
            :class:`pipeline.cache.format.Signature`'s fields (:data:`~pipeline.cache.format.SIGNATURE_KEYS`, in
            that order) and their values for this configuration.
        """
        spec = self.model.spec
        views = self.views if self.views is not None else NO_VIEWS
        return Signature(
            backbone=spec.name, backbone_label=self.label, alpha=self.model.alpha,
            input_size=self.model.input_size, resize=self.resize, preprocess=spec.preprocess,
            preprocess_mode=spec.preprocess_mode, weights_source=self.model.weights.source,
            weights_sha256=self.model.weights.sha256, pixel_rule=PIXEL_RULE,
            feature_kinds=list(self.kinds), maps_dtype=self.maps_dtype if "maps" in self.kinds else "",
            views=views.to_json(),
        )._asdict()


def check_run_options(options: ExtractOptions) -> None:
    """Validate the options that need no model or file system (raises BackboneError with one clear line)."""
    for what, value, choices in (("resize rule", options.resize, RESIZE_RULES),
                                 ("maps dtype", options.maps_dtype, MAPS_DTYPES),
                                 ("runtime", options.runtime, RUNTIME_CHOICES), ("engine", options.engine, ENGINES),
                                 ("reader", options.reader, READER_KINDS)):
        check_choice(what, value, choices, BackboneError)
    if options.batch_size < 1:
        raise BackboneError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.workers is not None and options.workers < 1:
        raise BackboneError(f"--workers must be at least 1, got {options.workers}")
    if options.checkpoint_rows < 1:
        raise BackboneError(f"--checkpoint-every must be at least 1, got {options.checkpoint_rows}")
    if options.input_size is not None and options.input_size < 1:
        raise BackboneError(f"--input-size must be a positive number of pixels, got {options.input_size}")


def fit_batch_to_checkpoint(options: ExtractOptions, log: Callable[[str], None] = print) -> ExtractOptions:
    """Cap the batch at ``checkpoint_rows``, so that the checkpoint bound holds (saying so in one line).

    Finished rows are committed between whole batches; a batch larger than ``--checkpoint-every`` would be
    committed only once it is done, and a crash before that would lose more than ``--checkpoint-every`` images of
    work. The batch is the part that gives way: a smaller batch changes speed, never the features' meaning.

    Parameters
    ----------
    options : ExtractOptions
    log : callable
        Receives the line when the batch is changed.

    Returns
    -------
    ExtractOptions
        ``options`` itself when its batch fits, else a copy with ``batch_size = checkpoint_rows``.
    """
    if options.batch_size <= options.checkpoint_rows:
        return options
    log(f"--batch-size {options.batch_size} is above --checkpoint-every {options.checkpoint_rows}: running batches "
        f"of {options.checkpoint_rows} images, so that a crash loses at most {options.checkpoint_rows} images of "
        f"work")
    return replace(options, batch_size=options.checkpoint_rows)


def resolve_config(options: ExtractOptions | None = None, log: Callable[[str], None] = print,
                   **overrides: Any) -> ExtractConfig:
    """Check and resolve extraction options (``overrides`` replace fields of ``options``).

    Resolving the weights may download them (announced through ``log`` first) or raise
    :class:`~pipeline.errors.WeightsError` with what to do; no model is built here. A batch above
    ``checkpoint_rows`` is capped at it (:func:`fit_batch_to_checkpoint`, one line through ``log``).

    Raises
    ------
    BackboneError, WeightsError
        Unknown backbone, an option it does not support, a bad run option, unusable weights.
    """
    opts = replace(options or ExtractOptions(), **overrides)
    check_run_options(opts)
    opts = fit_batch_to_checkpoint(opts, log)
    kinds = ("avg",) + (("max",) if opts.max_pool else ()) + (("maps",) if opts.maps else ())
    model = resolve_model(opts.backbone, opts.weights, opts.input_size, opts.alpha, kinds, announce=log)
    return ExtractConfig(
        model=model, resize=opts.resize, maps_dtype=opts.maps_dtype,
        views=opts.views, runtime=opts.runtime, engine=opts.engine, ray=opts.ray, batch_size=opts.batch_size,
        workers=opts.workers or decode_threads(), reader=opts.reader, strict=opts.strict,
        retry_failed=opts.retry_failed,
        checkpoint_rows=opts.checkpoint_rows, checkpoint_seconds=opts.checkpoint_seconds,
        cache_dir=Path(opts.cache_dir), command=opts.command, quiet=opts.quiet,
    )
