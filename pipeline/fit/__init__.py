"""The fit stage: feature caches in, a run folder out.

Modules, one job each: :mod:`.heads` (the registry of classifier heads and their forms), :mod:`.dense` (the Keras
head), :mod:`.forms` (how heads are fitted at scale), :mod:`.linear` (the mini-batch linear solver and fitted
scikit-learn objects from streamed statistics), :mod:`.stream` (rows in memory or read in blocks from a cache),
:mod:`.plan` (the cost plan: memory budget, forms, search rows, skips), :mod:`.protocol` (splits, selection folds,
hyperparameter search), :mod:`.views` (view modes of caches with augmented views, chosen on the selection
split), :mod:`.metrics`, :mod:`.evaluate` (one head on one feature set), :mod:`.inputs` (caches found and opened
once, through a :class:`CacheSource`, and aligned), :mod:`.output` (run folder and results.json content),
:mod:`.leaderboard`, :mod:`.config` (:class:`FitConfig`: every option of a fit, checked once) and :mod:`.run`
(plan -> fit each cache -> write).
"""

from pipeline.fit.config import CLASS_WEIGHTS, FEATURE_KINDS, FitConfig
from pipeline.fit.inputs import CacheSource
from pipeline.fit.run import FitRun, leaderboard_table, result_key, run_fit

__all__ = ["run_fit", "FitConfig", "CacheSource", "FitRun", "leaderboard_table", "result_key", "FEATURE_KINDS",
           "CLASS_WEIGHTS"]
