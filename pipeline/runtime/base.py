"""The runtime interface: pixels in, features out, and what ran them.

A :class:`Runtime` is built from a :class:`~pipeline.backbones.ModelConfig` and called on ``(n, s, s, 3)`` uint8
RGB pixels; it returns ``{kind: array}`` for the config's feature kinds. It also says what it is (``name``,
``version``, ``device``, ``provider`` and a ``note``), which the cache records for every run. The implementations are
:class:`~pipeline.runtime.keras.KerasRuntime` and :class:`~pipeline.runtime.onnx.OnnxRuntime`;
:func:`pipeline.runtime.factory.make_runtime` chooses between them.
"""

from __future__ import annotations

import numpy as np

from pipeline.backbones import BuiltBackbone, ModelConfig
from pipeline.errors import HeadbenchError


def choice_tag(choice: str) -> str:
    """What the device line adds for a runtime's ``choice``: `` [<why auto took it>]``, or "" when it was asked for
    (the local engine's line and the Ray engine's, whose workers send the choice as a column)."""
    return f" [{choice}]" if choice else ""


class RuntimeUnavailableError(HeadbenchError):
    """The runtime asked for explicitly cannot run here (``--runtime onnx`` without onnxruntime, or its export
    failed)."""


class Runtime:
    """Pixels in, features out. Subclasses set ``name``, ``version`` and ``device`` and implement :meth:`__call__`.

    Attributes
    ----------
    model : ModelConfig
    built : BuiltBackbone or None
        The Keras feature model. The ONNX runtime lets go of it once its parity check has passed, so that the
        Keras copy does not stay in memory beside the ONNX Runtime session.
    shapes : dict
        Per-row shape of each feature kind (``avg``, ``max``, ``maps``).
    name, version, device : str
        What runs the model, for logs and the cache's provenance.
    provider : str
        What executes the graph inside the runtime (``tensorflow``, ``CPUExecutionProvider``,
        ``CUDAExecutionProvider``...).
    note : str
        Why this runtime runs rather than the one asked for ("" when nothing needs saying).
    """

    name = "base"
    version = ""
    device = ""
    provider = ""

    def __init__(self, model: ModelConfig, built: BuiltBackbone) -> None:
        self.model = model
        self.built: BuiltBackbone | None = built
        d = built.feature_dim
        self.shapes: dict[str, tuple[int, ...]] = {"avg": (d,), "max": (d,), "maps": tuple(built.map_shape)}
        self.note = ""
        self.choice = ""  # why ``auto`` took this runtime, for the device line ("" when it was asked for)

    def describe(self) -> dict[str, str]:
        """Provenance of the run: ``runtime``, ``runtime_version``, ``device``, ``provider`` and ``note``.

        The cache stores it with every run (``run_info``). Read it after the first batch: the ONNX runtime's
        parity check may have switched it to Keras, and then says why in ``note``.
        """
        return {"runtime": self.name, "runtime_version": self.version, "device": self.device,
                "provider": self.provider, "note": self.note}

    @property
    def on_gpu(self) -> bool:
        """Whether the model runs on a GPU (then decoding, not the model, is what limits a run's speed)."""
        return self.device.startswith("GPU")

    def summary(self) -> str:
        """Runtime and version for the log (e.g. ``keras 3.15.1 (tensorflow) tensorflow 2.21.0``)."""
        return self.version if self.version.startswith(self.name) else f"{self.name} {self.version}"

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError
