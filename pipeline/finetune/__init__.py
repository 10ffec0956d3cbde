"""The fine-tuning stage: the top of a backbone trained together with a fitted head, from the image files.

:mod:`.train` is the mechanics (the model from a backbone and a head, batch norms kept in inference mode, training
from streamed image batches, the best epoch kept); :mod:`.run` is ``python cli.py finetune RUN`` (the starting head,
the run's protocol and splits, the result added to the run folder).
"""

from pipeline.finetune.run import (FINETUNE_HEAD, HOLDOUT_FRACTION, SELECT_MAX_ROWS, STARTABLE, FinetuneRun,
                                   finetune_run, holdout_split, pick_start, startable_results)
from pipeline.finetune.train import (UNFREEZE_FROM, FinetuneConfig, FinetuneData, FinetuneResult,
                                     build_finetune_model, default_unfreeze, finetune, image_batches,
                                     logreg_dense_weights, save_finetuned)

__all__ = ["FinetuneConfig", "FinetuneData", "FinetuneResult", "image_batches", "UNFREEZE_FROM", "default_unfreeze",
           "logreg_dense_weights", "build_finetune_model", "finetune", "save_finetuned",
           "FINETUNE_HEAD", "STARTABLE", "HOLDOUT_FRACTION", "SELECT_MAX_ROWS", "FinetuneRun", "startable_results",
           "pick_start", "holdout_split", "finetune_run"]
