"""Reading a run's saved head back: the one loader of ``heads/*.joblib`` and ``heads/*.keras`` files.

``predict``, ``export`` and ``finetune`` load heads through :func:`load_saved_head`, so a damaged file or a head of
another shape is one line naming the file, never a traceback or a silently wrong prediction. The file itself is
first checked against results.json by :func:`pipeline.results.head_file` (present, same SHA-256).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from pipeline.errors import RunError

__all__ = ["load_saved_head", "head_shapes"]


def load_saved_head(path: str | os.PathLike, input_shape: Sequence[int] | None = None,
                    n_classes: int | None = None) -> Any:
    """Load a saved head (a Keras model from ``.keras``, a scikit-learn estimator from ``.joblib``) and check it
    takes rows of ``input_shape`` and gives ``n_classes`` probabilities.

    Parameters
    ----------
    path : path
        The head file (``.keras`` or ``.joblib``).
    input_shape : sequence of int, optional
        Shape of one input row (``(D,)`` pooled features, ``(h, w, c)`` maps or pixels); not checked when None.
    n_classes : int, optional
        Number of classes of the run; not checked when None.

    Returns
    -------
    keras.Model or estimator

    Raises
    ------
    RunError
        The file cannot be read or is not a model (truncated, overwritten), or its shapes are not the run's.
    """
    path = Path(path)
    try:
        if path.suffix == ".keras":
            import keras

            model = keras.models.load_model(path)
        else:
            import joblib

            model = joblib.load(path)
    except Exception as exc:  # a truncated zip, a pickle of garbage, a file of another format: all the same to users
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise RunError(f"saved head {path} is damaged and cannot be loaded ({type(exc).__name__}: {first}); rerun "
                       f"the command that wrote it (`python cli.py fit`, or `finetune` for a fine-tuned model)") \
            from None
    takes, gives = head_shapes(model)
    want = None if input_shape is None else tuple(int(s) for s in input_shape)
    if (want is not None and takes is not None and takes != want) or \
            (n_classes is not None and gives is not None and gives != int(n_classes)):
        raise RunError(f"saved head {path} takes rows of shape {takes} and gives {gives} classes, but the run's "
                       f"features are {want} and it has {n_classes} classes: it is another run's head; rerun the "
                       f"command that wrote it")
    return model


def head_shapes(model: Any) -> tuple[tuple[int, ...] | None, int | None]:
    """The row shape a loaded head takes and the number of classes it gives (None where it does not say)."""
    inputs = getattr(model, "inputs", None)
    if inputs:  # a Keras model
        takes = tuple(int(s) for s in inputs[0].shape[1:]) if None not in inputs[0].shape[1:] else None
        return takes, int(model.outputs[0].shape[-1])
    n_in = getattr(model, "n_features_in_", None)
    classes = getattr(model, "classes_", None)
    return ((int(n_in),) if n_in is not None else None), (len(classes) if classes is not None else None)
