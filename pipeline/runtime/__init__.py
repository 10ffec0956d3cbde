"""Runtimes: what turns a batch of pixels into features. One interface, two implementations, one factory.

* :mod:`.base` -- the :class:`Runtime` interface (pixels in, features out, and what ran them);
* :mod:`.keras` -- the Keras feature model with batch normalisations folded (:mod:`.fold`), compiled with
  ``tf.function`` on TensorFlow;
* :mod:`.onnx` -- the same model exported to ONNX (:mod:`.onnx_export`: the export and its store) in ONNX Runtime:
  1.4-4x faster on CPU, and CUDA / TensorRT on a GPU; it checks itself against the Keras model on the first real
  batch of every run;
* :mod:`.factory` -- :func:`make_runtime`, which chooses between them.

Used alike by ``extract``, ``predict`` and ``finetune``; the model's identity is
:class:`~pipeline.backbones.ModelConfig`, the machine's facts are :mod:`pipeline.machine`.
"""

from pipeline.runtime.base import Runtime, RuntimeUnavailableError
from pipeline.runtime.factory import RUNTIME_CHOICES, RuntimeFactory, make_runtime
from pipeline.runtime.keras import KerasRuntime

__all__ = ["Runtime", "RuntimeUnavailableError", "RUNTIME_CHOICES", "RuntimeFactory", "make_runtime",
           "KerasRuntime"]
