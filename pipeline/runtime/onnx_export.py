"""Export the Keras feature model to ONNX once, and keep it on disk keyed by everything that changes it.

Exporter
--------
The model is exported with tf2onnx from a *frozen* TensorFlow graph of the exact feature model that
:func:`pipeline.backbones.build_features` builds (preprocessing inside, outputs ``avg`` [``max``] [``maps``]),
with one input, ``pixels``: ``(n, s, s, 3)`` uint8, cast to float inside the graph (so a batch crosses into ONNX
Runtime at a quarter of the bytes and no caller can feed another scaling).

Keras's own ``model.export(path, format="onnx")`` also calls tf2onnx on the TensorFlow backend
(``tf2onnx.convert.from_function`` on the model's traced function; jax2onnx or ``torch.onnx`` on the other
backends), but it hands tf2onnx every tensor the traced function *captures* as a graph input. Keras layers that
keep a derived constant as a plain tensor rather than a variable therefore leak it as an input: EfficientNet's
``Normalization`` layer (its mean and variance are reshaped into tensors when its weights load) becomes the inputs
``normalization/Sub/y`` and ``normalization/Sqrt/x`` that ONNX Runtime then asks the caller to feed. Freezing first
(``convert_variables_to_constants_v2`` turns variables *and* captured tensors into constants) and converting the
frozen ``GraphDef`` with the one real input closes the graph whatever a layer keeps; it works for every registered
backbone. Two ConvNeXt layers trace to ops tf2onnx cannot convert (a depthwise convolution written as a grouped
``Conv2D``, which TensorFlow runs in a nested XLA function, and the exact gelu's ``Erfc``): the export traces a copy
with the same function in convertible ops (:func:`pipeline.runtime.fold.portable_copy`). TensorFlow's graph optimiser (which tf2onnx runs) already folds batch normalisations into the
convolutions, so the exported model is the plain one, not :mod:`pipeline.runtime.fold`'s copy.

Where the exported models live
------------------------------
``$HEADBENCH_HOME/onnx/`` (default ``$XDG_CACHE_HOME/headbench/onnx``, i.e. ``~/.cache/headbench/onnx``), one
``.onnx`` file per model, named ``<backbone label>__<weights tag>__<outputs>__<key digest>.onnx``. An exported model
belongs to the weights and the tool versions, not to a dataset or a feature cache: one file serves every cache
folder, ``extract`` and ``predict`` alike, and deleting a feature cache does not throw away a 5-35 s export.
It is a derived file, like Keras's downloaded weights under ``~/.keras``: safe to delete (it is exported again).

The *key* is everything that changes the file: a format version of ours, the backbone, width multiplier and input
size, the weights (source and SHA-256; random weights are seeded), the outputs, the ONNX opset, and the versions of
Keras, TensorFlow, tf2onnx, onnx and onnxruntime. Its SHA-256 names the file and the key itself is stored in the
model's metadata (``headbench_key``) and checked on every load. Files are written to a temporary name
(``.<file>.<pid>.tmp``) and renamed (atomic), under a per-model lock (``<file>.lock``), so concurrent runs export
once and never read half a file.

A store that cannot be used (``$HEADBENCH_HOME`` is a file, cannot be created or is read-only) is an
:class:`ExportError` with one line naming the folder, so ``--runtime auto`` goes on with Keras and says why; models
already stored in a read-only store are still used. A temporary left by an export killed mid-write (``kill -9``) is
removed the next time the store is used (:func:`remove_stale_temporaries`): only when the process named in it has
gone *and* its model's lock is free, so a concurrent live export is never touched. A stored model whose key is right
but whose weights are damaged is found by the runtime's parity check and exported again
(``ensure_exported(..., replacing=...)``; see :mod:`pipeline.runtime.onnx`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.atomic import commit_file
from pipeline.backbones import BuiltBackbone, ModelConfig
from pipeline.runtime.probe import PROBE_PROP, encode_probe, keras_features, probe_pixels

FORMAT_VERSION = 3
"""Version of how this module exports (input name and dtype, outputs, freezing, and the feature model it is given);
bump it to re-export. 2: EfficientNet from a weights file divides its input by the variance (models stored by
version 1 lacked that). 3: the probe features are stored in the file (:mod:`pipeline.runtime.probe`), so stored
models are exported once more to carry them."""
OPSET = 17
"""ONNX opset of the exported graphs (ONNX Runtime >= 1.13 runs it; every op these backbones use exists in it)."""
KEY_PROP = "headbench_key"
INPUT_NAME = "pixels"


class ExportError(Exception):
    """The model could not be exported to ONNX (the message is one line with the reason)."""


def store_dir() -> Path:
    """Folder of exported models: ``$HEADBENCH_HOME/onnx``, default ``$XDG_CACHE_HOME/headbench/onnx``."""
    home = os.environ.get("HEADBENCH_HOME")
    if not home:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        home = os.path.join(xdg, "headbench")
    return Path(home) / "onnx"


def tool_versions() -> dict[str, str]:
    """Versions of the packages that make or run the exported file (missing ones are ``""``)."""
    import importlib.metadata as md

    out = {}
    for pkg in ("keras", "tensorflow", "tf2onnx", "onnx", "onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = ""
    if not out["onnxruntime"]:  # the GPU build is another distribution of the same module
        with contextlib.suppress(md.PackageNotFoundError):
            out["onnxruntime"] = md.version("onnxruntime-gpu")
    return out


def export_key(model: ModelConfig) -> dict[str, Any]:
    """Everything that changes the exported file of ``model``."""
    w = model.weights
    return {
        "format": FORMAT_VERSION, "backbone": model.backbone, "label": model.label, "alpha": model.alpha,
        "input_size": model.input_size, "weights_source": w.source, "weights_sha256": w.sha256,
        "random_seed": 0 if w.source == "none" else None, "outputs": list(model.kinds), "opset": OPSET,
        "versions": tool_versions(),
    }


def key_digest(key: dict[str, Any]) -> str:
    """SHA-256 of a key's canonical JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def stored_model_path(model: ModelConfig, root: Path | None = None) -> Path:
    """Where the exported model of ``model`` is (or will be) stored."""
    digest = key_digest(export_key(model))
    return (root or store_dir()) / f"{model.label}__{model.weights.tag}__{'-'.join(model.kinds)}__{digest[:16]}.onnx"


TEMPORARY = re.compile(r"^\.(?P<model>.+\.onnx)\.(?P<pid>[0-9]+)\.tmp$")
"""Name of an export's temporary file, ``.<model file>.<pid of the exporting process>.tmp``."""


def _store_error(folder: Path, exc: OSError) -> ExportError:
    """The one-line error for a store folder that cannot be created, locked or written."""
    return ExportError(f"cannot use the ONNX model store {folder} ({exc.strerror or exc}); set HEADBENCH_HOME to a "
                       f"writable folder")


@contextlib.contextmanager
def _export_lock(path: Path) -> Iterator[None]:
    """Wait for an exclusive lock on ``path`` (another process exporting the same model: this one then reuses it).

    Raises
    ------
    ExportError
        The store folder cannot be created or the lock file cannot be created or locked (a file where the folder
        should be, a read-only folder).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(_lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _store_error(path.parent, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # a file system without locks
            raise _store_error(path.parent, exc) from None
        yield
    finally:
        os.close(fd)  # the lock file stays: unlinking it could let a third process lock a different inode


def _lock_path(path: Path) -> Path:
    """The lock file of the stored model ``path``."""
    return path.with_name(path.name + ".lock")


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (one of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove export temporaries in ``folder`` left by exports that were killed mid-write.

    A temporary ``.<model>.<pid>.tmp`` is stale when the process ``pid`` is gone *and* ``<model>``'s lock can be
    taken without waiting (every export writes its temporary under that lock). It is checked and removed while this
    process holds the lock, so an export that starts meanwhile (even one whose pid is a reused one) waits and is not
    touched. Anything that cannot be read, locked or removed (a read-only store) is left as it is.

    Returns
    -------
    list of Path
        The temporaries removed.
    """
    try:
        names = [n for n in os.listdir(folder) if TEMPORARY.match(n)]
    except OSError:
        return []
    removed = []
    for name in names:
        m = TEMPORARY.match(name)
        if m and not pid_alive(int(m["pid"])) and _remove_if_unlocked(folder / name, folder / m["model"]):
            removed.append(folder / name)
    return removed


def _remove_if_unlocked(tmp: Path, model_path: Path) -> bool:
    """Remove ``tmp`` if ``model_path``'s export lock is free right now (True when removed)."""
    try:
        fd = os.open(_lock_path(model_path), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        tmp.unlink()
        return True
    except OSError:  # locked by a live export, or not removable: keep it
        return False
    finally:
        os.close(fd)


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """``(inode, size, mtime ns)`` of ``path``, or None when it cannot be read: tells a replaced file apart."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def stored_key(path: Path) -> dict[str, Any] | None:
    """The key recorded in a stored model, or None when the file is missing or unreadable."""
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in proto.metadata_props}
        return json.loads(props[KEY_PROP])
    except Exception:  # noqa: BLE001 - missing, truncated or foreign file: it is exported again
        return None


def to_onnx(built: BuiltBackbone) -> Any:
    """The ONNX ``ModelProto`` of ``built.model`` (frozen TensorFlow graph -> tf2onnx), without its key.

    Raises
    ------
    ExportError
        Not the TensorFlow backend, tf2onnx missing, or a graph that is not closed over its one input.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ExportError(f"ONNX export runs on the TensorFlow backend of Keras, not {keras.backend.backend()!r}")
    import tensorflow as tf

    try:
        import tf2onnx
    except ImportError:
        raise ExportError("the ONNX exporter tf2onnx is not installed (pip install tf2onnx)") from None

    from pipeline.runtime.fold import portable_copy

    model = portable_copy(built.model)  # ConvNeXt's grouped convolutions and exact gelu, in ops ONNX has
    size = built.input_size
    fn = tf.function(lambda x: model(tf.cast(x, tf.float32), training=False))
    spec = tf.TensorSpec((None, size, size, 3), tf.uint8, name=INPUT_NAME)
    with _quiet_exporter():
        concrete = fn.get_concrete_function(spec)
        graph_def, inputs, outputs = _frozen_graph_def(concrete)
        kinds = sorted(concrete.structured_outputs)  # a dict of outputs flattens in sorted key order
        placeholders = [n.name for n in graph_def.node if n.op == "Placeholder"]
        if placeholders != [inputs[0].split(":")[0]] or len(outputs) != len(kinds):  # closed graph, one input
            raise ExportError(f"the frozen graph of {built.label} has inputs {placeholders} and {len(outputs)} "
                              f"outputs for {kinds}")
        renames = {**dict(zip(outputs, kinds)), inputs[0]: INPUT_NAME}
        try:  # without tf2onnx's per-optimiser deep copies of the graph (a third of the export time)
            with _env("TF2ONNX_CATCH_ERRORS", "FALSE"):
                proto, _ = tf2onnx.convert.from_graph_def(graph_def, name=built.label, input_names=inputs,
                                                          output_names=outputs, opset=OPSET,
                                                          tensors_to_rename=renames)
        except Exception:  # noqa: BLE001 - an optimiser failed: again, letting tf2onnx skip what fails
            proto, _ = tf2onnx.convert.from_graph_def(graph_def, name=built.label, input_names=inputs,
                                                      output_names=outputs, opset=OPSET, tensors_to_rename=renames)
    got_inputs = [i.name for i in proto.graph.input]
    if got_inputs != [INPUT_NAME]:
        raise ExportError(f"the exported graph of {built.label} asks for inputs {got_inputs}, not only {INPUT_NAME}")
    return proto


Convert = Callable[[BuiltBackbone], Any]
"""How :func:`export_model` turns a built feature model into an ONNX ``ModelProto``: :func:`to_onnx` unless another
is handed in (an error it raises is the export's error)."""


def ensure_exported(model: ModelConfig, built: BuiltBackbone, log: Callable[[str], None] = print,
                    root: Path | None = None, replacing: tuple[int, int, int] | None = None,
                    convert: Convert = to_onnx) -> Path:
    """The stored ONNX model of ``model``, exported from ``built`` first when it is not stored yet.

    Logs one line with the export time when it exports; reuses the stored file silently otherwise. Stale export
    temporaries in the store are removed first (:func:`remove_stale_temporaries`).

    Parameters
    ----------
    model : ModelConfig
    built : BuiltBackbone
        The Keras feature model to export.
    log : callable
    root : Path, optional
        The store folder (default :func:`store_dir`).
    replacing : tuple, optional
        :func:`file_identity` of a stored file found damaged: it is exported again, unless another process has
        replaced it meanwhile (then that file is used).
    convert : callable, optional
        ``(built) -> ModelProto``, the conversion when it exports (default :func:`to_onnx`).

    Raises
    ------
    ExportError
        The export failed, or the store cannot be used (one line with the reason).
    """
    path = stored_model_path(model, root)
    key = export_key(model)
    remove_stale_temporaries(path.parent)
    if replacing is None and _is_stored(path, key):
        return path
    with _export_lock(path):
        if _is_stored(path, key) and (replacing is None or file_identity(path) != replacing):
            return path  # exported (again) by another process while this one waited
        t0 = time.perf_counter()
        export_model(built, path, key, convert)
        log(f"exported {model.label} to ONNX in {time.perf_counter() - t0:.1f}s: {path}")
    return path


def _is_stored(path: Path, key: dict[str, Any]) -> bool:
    """Whether ``path`` is a stored model with ``key``."""
    return path.exists() and stored_key(path) == key


def export_model(built: BuiltBackbone, path: Path, key: dict[str, Any], convert: Convert = to_onnx) -> None:
    """Export ``built.model`` to ``path`` (atomically), recording ``key`` in the model's metadata.

    Parameters
    ----------
    built : BuiltBackbone
        The Keras feature model to export.
    path : Path
        The stored model's file (written to a temporary name first).
    key : dict
        The model's :func:`export_key`, recorded as ``headbench_key``.
    convert : callable, optional
        ``(built) -> ModelProto`` (default :func:`to_onnx`).

    Raises
    ------
    ExportError
        With the first line of the exporter's error.
    """
    try:
        proto = convert(built)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - tf2onnx and TensorFlow raise many types
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ExportError(f"ONNX export of {built.label} failed ({type(exc).__name__}: {text})") from exc
    entry = proto.metadata_props.add()
    entry.key, entry.value = KEY_PROP, json.dumps(key, sort_keys=True)
    probe = proto.metadata_props.add()  # the Keras features of the probe, the runs' parity reference
    probe.key, probe.value = PROBE_PROP, encode_probe(keras_features(built, probe_pixels(built.input_size)),
                                                      built.input_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(proto.SerializeToString())
        commit_file(tmp, path)  # flushed, renamed, folder flushed: the one durable commit
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"cannot write the exported model to {path} ({exc.strerror or exc}); set HEADBENCH_HOME "
                          f"to a writable folder") from None


def _frozen_graph_def(concrete: Any) -> tuple[Any, list[str], list[str]]:
    """``(GraphDef, input tensor names, output tensor names)`` of a concrete function with its variables and
    captured tensors turned into constants.

    Uses TensorFlow's converter directly (skipping the rebuild of a concrete function from the frozen graph, which
    ``convert_variables_to_constants_v2`` does and tf2onnx does not need); falls back to that public-facing function
    if the internals differ in this TensorFlow release.
    """
    from tensorflow.python.framework import convert_to_constants as c2c

    n_in = len(concrete.structured_input_signature[0])
    try:
        data = c2c._FunctionConverterDataInEager(func=concrete, lower_control_flow=False, aggressive_inlining=False)
        graph_def, _ = c2c._replace_variables_by_constants(converter_data=data)
        return graph_def, [t.name for t in concrete.inputs[:n_in]], [t.name for t in concrete.outputs]
    except (AttributeError, TypeError):
        frozen = c2c.convert_variables_to_constants_v2(concrete)
        return frozen.graph.as_graph_def(), [t.name for t in frozen.inputs], [t.name for t in frozen.outputs]


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the duration of a block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep tf2onnx's and TensorFlow's Python logging and deprecation warnings out of the tool's output."""
    loggers = [logging.getLogger(n) for n in ("tf2onnx", "tensorflow")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
