"""The fit stage: feature caches in, a run folder out.

Modules, one job each: :mod:`.heads` (the registry of classifier heads), :mod:`.dense` (the Keras head),
:mod:`.protocol` (splits, selection folds, hyperparameter search), :mod:`.metrics`, :mod:`.evaluate` (one head on
one feature set), :mod:`.leaderboard` and :mod:`.run` (caches -> run folder).
"""

from pipeline.fit.run import CLASS_WEIGHTS, FEATURE_KINDS, FitRun, leaderboard_table, result_key, run_fit

__all__ = ["run_fit", "FitRun", "leaderboard_table", "result_key", "FEATURE_KINDS", "CLASS_WEIGHTS"]
