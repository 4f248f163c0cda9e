"""Whether two checkpoints hold the same state: the test of an exact resume.

Two runs that reach iteration N by different paths (one uninterrupted, one killed and resumed)
must write the same checkpoint, RNG states included. Compared per file of the manifest:

* ``__R_I.distcp`` (every tensor and sharded object, the RNG states among them) and
  ``metadata.json``: byte for byte, through the manifests' sizes and CRC-32s;
* ``common.pt`` (scheduler and optimizer hyper-parameters): value by value, as torch.save's
  pickle of equal values may differ in its bytes;
* ``megatron_patch.json``: progress (the measured wall-clock seconds and peak memory aside), model
  shape and layout;
* ``.metadata`` is not compared: torch stores a random save id in it; it only indexes the
  ``.distcp`` files, which are compared.
"""

import json
import os
from typing import List

import torch

from megatron_patch.checkpoint.manifest import read_manifest

SKIPPED = (".metadata",)


def _values_differ(a, b, where: str, out: List[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                out.append(f"{where}/{key}: only in {'the first' if key in a else 'the second'}")
            else:
                _values_differ(a[key], b[key], f"{where}/{key}", out)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b)):
            _values_differ(x, y, f"{where}[{index}]", out)
    elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            out.append(f"{where}: tensors differ")
    elif type(a) is not type(b) or a != b:
        out.append(f"{where}: {a!r} vs {b!r}")


def _progress(path: str) -> dict:
    with open(os.path.join(path, "megatron_patch.json")) as f:
        meta = json.load(f)
    measured = ("seconds", "peak_memory_gib")
    progress = {key: value for key, value in meta.get("progress", {}).items() if key not in measured}
    return {"progress": progress, "model_shape": meta.get("model_shape"), "layout": meta.get("layout")}


def differences(first: str, second: str) -> List[str]:
    """One line per difference between checkpoint folders ``first`` and ``second`` (empty: equal).
    Both need a manifest (``manifest.json``); ValueError otherwise."""
    manifests = [read_manifest(path) for path in (first, second)]
    for path, files in zip((first, second), manifests):
        if files is None:
            raise ValueError(f"{path} has no manifest.json; only checkpoints with one can be compared")
    a, b = manifests
    out: List[str] = []
    for name in sorted(set(a) | set(b)):
        if name in SKIPPED:
            continue
        if name not in a or name not in b:
            out.append(f"{name}: only in {first if name in a else second}")
        elif name == "common.pt":
            values = [
                torch.load(os.path.join(path, name), map_location="cpu", weights_only=True) for path in (first, second)
            ]
            _values_differ(values[0], values[1], name, out)
        elif name == "megatron_patch.json":
            _values_differ(_progress(first), _progress(second), name, out)
        elif a[name] != b[name]:
            out.append(
                f"{name}: {a[name]['size']} bytes crc32 {a[name]['crc32']:08x} vs "
                f"{b[name]['size']} bytes crc32 {b[name]['crc32']:08x}"
            )
    return out
