"""The batch stage: run a frozen backbone over every image once and cache the features.

Small parts with one job each, wired by one resolved configuration (:mod:`.config`):

* :mod:`.plan` -- what to do, given the folder and what earlier runs left in the cache;
* :mod:`.reader` -- threads that read, hash and decode images ahead of the model;
* :mod:`pipeline.runtime` -- pixels in, features out (Keras with batch norms folded, or ONNX Runtime), shared with
  ``predict`` and ``finetune``;
* :mod:`.local` -- the engine that drives reader -> runtime -> part writer on this machine;
* :mod:`.ray_engine` -- the same on a Ray cluster (Ray Data decoding tasks -> model actors -> part writers);
* :mod:`.run` -- :func:`extract_dataset`: plan -> engine -> assemble the complete cache; :func:`extract_all`: every
  backbone of one ``extract`` command (discover, resolve all, check the cache names, then one backbone at a time).

The cache itself (parts, assembly, schema) is :mod:`pipeline.cache`.
"""

from pipeline.extract.config import (PIXEL_RULE, ExtractConfig, ExtractOptions, ModelConfig, RayOptions,
                                     resolve_config)
from pipeline.extract.run import ExtractResult, extract_all, extract_dataset

__all__ = ["PIXEL_RULE", "ExtractConfig", "ExtractOptions", "ModelConfig", "RayOptions", "resolve_config",
           "ExtractResult", "extract_all", "extract_dataset"]
