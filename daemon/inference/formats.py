"""Model file formats: which one a path holds, and reading it into a Keras 3 model.

Read: Keras 3 `.keras` archives, and HDF5 files (`.h5`, `.hdf5`) as tf.keras 2.x
(or Keras 3's legacy `model.save("m.h5")`) writes them. Keras 3 reads HDF5
through its legacy loader, which still chokes on a few Keras 2 config keys;
`translate_keras2_config` rewrites exactly those (and says what it did), in
the model config of a private copy of the file, and the legacy loader then
builds the model and loads the weights from that copy. Everything Keras can
read as it is goes through untouched.

Refused with a message naming the format and how to convert it: a TensorFlow
SavedModel directory, an HDF5 file of weights only, any other file. Deciding
what the model is made of (recurrent layers, Bidirectional, ...) is not done
here: checks.py checks the loaded model whatever its format.
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import keras

from daemon.errors import UnservableModelError

KERAS = "keras"
HDF5 = "hdf5"

#: What each format is called in messages and `lstmd inspect`.
FORMAT_NAMES = {KERAS: "Keras 3 (.keras)", HDF5: "Keras 2 HDF5 (.h5)"}
SUFFIXES = {".keras": KERAS, ".h5": HDF5, ".hdf5": HDF5}

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"

HOW_TO_CONVERT = (
    "lstmd reads Keras 3 .keras files and Keras 2 HDF5 files (.h5, .hdf5): "
    'load the model with Keras 3 and save it with model.save("m.keras"), or load it '
    'with tf.keras 2 (tf_keras.models.load_model) and save it with model.save("m.h5")'
)


@dataclass(frozen=True)
class LoadedFile:
    """A model as read from its file: the format it was in and the config keys
    that had to be rewritten for Keras 3 (empty for a .keras file)."""

    model: Any  # keras.Model (keras is untyped here)
    format: str
    translations: tuple[str, ...] = field(default=())


def refuse_unreadable_path(path: Path, where: str) -> None:
    """Raise UnservableModelError for a path that is no model file lstmd reads,
    saying what it is and how to convert it; return for a file worth opening."""
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            raise UnservableModelError(
                f"{where}: is a TensorFlow SavedModel directory (it holds saved_model.pb), "
                f"which Keras 3 cannot load as a model; {HOW_TO_CONVERT}"
            )
        raise UnservableModelError(f"{where}: is a directory, not a model file; {HOW_TO_CONVERT}")
    if not path.is_file():
        raise UnservableModelError(f"{where}: no such file")
    if path.name == "saved_model.pb":
        raise UnservableModelError(
            f"{where}: is the graph of a TensorFlow SavedModel, which Keras 3 cannot load "
            f"as a model; {HOW_TO_CONVERT}"
        )
    if path.suffix.lower() not in SUFFIXES:
        raise UnservableModelError(
            f"{where}: {path.suffix or 'a name without a suffix'} is not a model format "
            f"lstmd reads; {HOW_TO_CONVERT}"
        )


def detect_format(path: Path, head: bytes, where: str) -> str:
    """KERAS or HDF5, from the suffix, checked against the file's first bytes
    (`head`): a file named for one format but holding another is refused."""
    refuse_unreadable_path(path, where)
    fmt = SUFFIXES[path.suffix.lower()]
    found = HDF5 if head.startswith(_HDF5_MAGIC) else KERAS if head.startswith(_ZIP_MAGIC) else None
    if found != fmt:
        holds = {HDF5: "an HDF5 file", KERAS: "a zip archive (a .keras file?)"}.get(
            found or "", "neither an HDF5 file nor a zip archive"
        )
        raise UnservableModelError(
            f"{where}: not a loadable Keras model: named as {FORMAT_NAMES[fmt]} but its content is {holds}; "
            f"a {path.suffix} file must be {'an HDF5 file' if fmt == HDF5 else 'a Keras 3 zip archive'}"
        )
    return fmt


def read_model(path: Path, data: bytes, where: str) -> LoadedFile:
    """The model held in `data` (the bytes of `path`), read with Keras 3.

    Keras loads from a private copy that keeps the file name and so the format
    suffix (in lower case: Keras dispatches on it): the very bytes that were
    hashed, even if the file is replaced meanwhile.
    """
    fmt = detect_format(path, data[:8], where)
    translations: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lstmd-model-") as tmp:
        copy_path = Path(tmp) / (path.stem + path.suffix.lower())
        try:
            copy_path.write_bytes(data)
            if fmt == HDF5:
                translations = _translate_file(copy_path, where)
            loaded = keras.saving.load_model(copy_path, compile=False)
        except UnservableModelError:
            raise
        except Exception as exc:
            detail = str(exc).replace(str(copy_path), str(path))
            raise UnservableModelError(
                f"{where}: not a loadable Keras model: {type(exc).__name__}: {detail}"
            ) from exc
    return LoadedFile(loaded, fmt, tuple(translations))


def _translate_file(copy_path: Path, where: str) -> list[str]:
    """Rewrite the model config of an HDF5 copy in place for Keras 3's legacy loader."""
    with h5py.File(copy_path, "r+") as f:
        raw = f.attrs.get("model_config")
        if raw is None:
            kind = "weights only (model.save_weights)" if "layer_names" in f.attrs else "no model"
            raise UnservableModelError(
                f"{where}: this HDF5 file holds {kind}, no model config; save the whole "
                'model with model.save("m.h5") (tf.keras 2) or model.save("m.keras") (Keras 3)'
            )
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        try:
            config = json.loads(text)
        except ValueError as exc:
            raise UnservableModelError(
                f"{where}: the model config in this HDF5 file is not JSON: {exc}"
            ) from None
        new, changes = translate_keras2_config(config, where)
        if changes:
            f.attrs["model_config"] = json.dumps(new)
    return changes


def translate_keras2_config(config: dict[str, Any], where: str = "model") -> tuple[dict[str, Any], list[str]]:
    """A Keras 2 model config rewritten for Keras 3's legacy loader, and what changed.

    Only what Keras 3 cannot read is rewritten; it keeps its meaning:

    * `time_major=False` on a recurrent layer (its default; Keras 3 has no such
      argument): dropped. `time_major=True` (inputs laid out (time, batch,
      features)) has no Keras 3 equivalent and is refused.
    * a Sequential whose first layer carries `batch_input_shape` (no InputLayer,
      as older tf.keras and Keras 2 saved it): an InputLayer with that
      `batch_shape` is put first. Keras 3 would read it as `input_shape`, a shape
      without the batch axis, and build a model of rank-4 inputs.
    * `batch_input_shape` on any other non-input layer of a Sequential: dropped
      (Keras 2 ignored it there too, and Keras 3 warns on it).
    * a functional model's single input (or output) listed as `[[name, 0, 0]]`:
      Keras 2 always wrote lists; Keras 3 reads a list as a structure of inputs and
      warns at every call given one tensor. Written `[name, 0, 0]`, as Keras 3 does.

    The input is not modified. Nested configs (a model in a model, the layer in
    a Bidirectional or TimeDistributed, an RNN's cells) are translated too.
    """
    out = copy.deepcopy(config)
    changes: list[str] = []
    _translate(out, where, changes)
    return out, changes


def _translate(node: Any, where: str, changes: list[str]) -> None:
    if isinstance(node, list):
        for item in node:
            _translate(item, where, changes)
        return
    if not isinstance(node, dict):
        return
    cfg = node.get("config")
    if isinstance(node.get("class_name"), str) and isinstance(cfg, dict):
        name = cfg.get("name", node["class_name"])
        if "time_major" in cfg:
            if cfg["time_major"]:
                raise UnservableModelError(
                    f"{where}: layer {name!r} was saved with time_major=True (inputs laid out "
                    "(time, batch, features)), which Keras 3 does not have; rebuild it with "
                    "time_major=False, the default, in tf.keras 2 and save it again"
                )
            del cfg["time_major"]
            changes.append(f"{name}: dropped time_major=False")
        if node["class_name"] == "Sequential" and isinstance(cfg.get("layers"), list):
            _translate_sequential(cfg["layers"], changes)
        for key in ("input_layers", "output_layers"):
            nodes = cfg.get(key)
            if isinstance(nodes, list) and len(nodes) == 1 and isinstance(nodes[0], list):
                cfg[key] = nodes[0]
                changes.append(f"{name}: its one {key.split('_')[0]} unlisted")
    for value in node.values():
        _translate(value, where, changes)


def _translate_sequential(layers: list[Any], changes: list[str]) -> None:
    entries = [e for e in layers if isinstance(e, dict) and isinstance(e.get("config"), dict)]
    if not entries:
        return
    first = entries[0]
    if first.get("class_name") != "InputLayer" and first["config"].get("batch_input_shape"):
        name = str(first["config"].get("name", "layer"))
        input_config: dict[str, Any] = {
            "batch_shape": list(first["config"]["batch_input_shape"]),
            # A Keras 2 dtype may be a mixed-precision policy: inputs are float32 then too.
            "dtype": dtype if isinstance(dtype := first["config"].get("dtype"), str) else "float32",
            "name": f"{name}_input",
        }
        layers.insert(layers.index(first), {"class_name": "InputLayer", "config": input_config})
        changes.append(f"{name}: batch_input_shape {input_config['batch_shape']} became an InputLayer")
    for entry in entries:
        if entry.get("class_name") != "InputLayer" and "batch_input_shape" in entry["config"]:
            del entry["config"]["batch_input_shape"]
            if entry is not first:
                changes.append(f"{entry['config'].get('name', 'layer')}: dropped batch_input_shape")
