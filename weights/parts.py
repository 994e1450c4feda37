"""The build-and-fill step every loader shares: a component described as a Part (its config and, per module key,
where its tensor lies) becomes a module built on the meta device and filled by a strict
load_state_dict(assign=True) with tensors read straight from the safetensors files onto the target device.

Kept apart from model.py (Stable Diffusion 1.x/2.x/XL) so the other families' loaders (weights/sd3.py) use the
same machinery without an import cycle: model.py dispatches to them.
"""
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from . import keys
from .files import CheckpointError


@dataclass
class Part:
    """One component to load: its config and, per engine key, where the tensor is (file, stored key, transform).
    A tensor the checkpoint implies without storing it (SD3 CLIP-L's identity projection in Stability's files)
    is (None, the tensor, keys.ID)."""
    config: dict
    tensors: dict  # engine key -> (file, stored key, transform)
    shapes: dict  # engine key -> shape after the transform


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Random initialisers become no-ops while modules are built on the meta device: every tensor is assigned
    from the checkpoint anyway, and normal_ on a meta tensor imports torch._dynamo (about 2 s of cold start)."""
    INIT = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.INIT or getattr(func, "__module__", None) == "torch.nn.init":
            t = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes the tensor by keyword
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def check(name: str, part: Part, expected: dict) -> None:
    """Key sets and shapes of the checkpoint against the module's; the error names the key and both shapes."""
    missing = sorted(set(expected) - set(part.tensors))
    unexpected = sorted(set(part.tensors) - set(expected))
    where = lambda k: f"{part.tensors[k][0]} [{part.tensors[k][1]}]"  # noqa: E731
    if missing:
        raise CheckpointError(f"{name}: {len(missing)} key(s) missing from the checkpoint, e.g. {missing[0]!r} "
                              f"(expected shape {tuple(expected[missing[0]])}); missing: {missing[:8]}")
    if unexpected:
        k = unexpected[0]
        raise CheckpointError(f"{name}: unexpected key {k!r} (shape {part.shapes[k]}) from {where(k)}; "
                              f"{len(unexpected)} unexpected: {unexpected[:8]}")
    for k, shape in expected.items():
        if tuple(shape) != tuple(part.shapes[k]):
            raise CheckpointError(f"{name}: shape mismatch for {k!r}: checkpoint has {tuple(part.shapes[k])} "
                                  f"({where(k)}), the model expects {tuple(shape)}")


def materialize(name: str, part: Part, device: torch.device, dtype: torch.dtype,
                build: Callable[[str, dict], torch.nn.Module],
                key_dtype: Callable[[str, torch.dtype], torch.dtype] | None = None) -> torch.nn.Module:
    """build(name, config) on the meta device, checked against part, filled from the files. key_dtype(key, dtype):
    a per-tensor dtype where a model keeps some tensors wider (T5's fp32 feed-forward outputs under fp16)."""
    try:
        with torch.device("meta"), _SkipInit():  # no allocation, no init: every tensor comes from the file
            module = build(name, part.config)
    except AssertionError as e:  # the config dataclasses assert unsupported options
        raise CheckpointError(f"{name}: unsupported configuration: {e}") from e
    check(name, part, {k: v.shape for k, v in module.state_dict().items()})
    cast = lambda k, x: x.to(key_dtype(k, dtype) if key_dtype else dtype) if x.is_floating_point() else x  # noqa: E731
    sd, by_file = {}, {}
    for k, (path, src, t) in part.tensors.items():
        by_file.setdefault(path, []).append((k, src, t))
    for k, x, _ in by_file.pop(None, []):  # implied tensors, not read from any file
        sd[k] = cast(k, x.to(device))
    for path, items in by_file.items():
        try:
            f = safe_open(str(path), framework="pt", device=str(device))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot open as safetensors: {e}") from e
        fused = {}  # OpenCLIP's in_proj, SD3's qkv: read once, the three views share it
        with f:
            for k, src, t in items:
                if t[0] == "chunk":
                    if src not in fused:
                        fused[src] = f.get_tensor(src)
                    x = keys.apply(fused[src], t)
                else:
                    x = keys.apply(f.get_tensor(src), t)
                sd[k] = cast(k, x)
    module.load_state_dict(sd, strict=True, assign=True)
    return module.requires_grad_(False).eval()


def read_json(path: Path) -> dict:
    """A config file, with one-line errors naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: missing {path.name}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed JSON ({e})") from None
