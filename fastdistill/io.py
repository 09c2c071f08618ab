"""Run outputs: the distilled set on disk (``.pt`` and ``.npz``), the metrics JSON, the PNG grid.

A distilled set is a plain dict of tensors and Python primitives, so any tool can read it with
``torch.load(path, weights_only=True)`` (no fastdistill import, no pickled classes), and the same
arrays go to an ``.npz`` for tools without torch::

    format   "fastdistill.distilled/v1"
    data     x̃, float [S, n, C, H, W] (normalised like the real data; S steps of n = k·classes)
    labels   ỹ, int64 [S, n] (hard) or float [S, n, classes] (soft)
    lrs      η_t = softplus(ρ_t), [T] with T = S·E; step t trains on data[t mod S] with lrs[t]
    betas    β_t, [T] for the momentum inner loop, else None
    theta0   the fixed θ_0, [P] (fixed init), else None
    config   DistillConfig.to_dict()
    dataset  {name, num_classes, in_channels, image_size, mean, std, class_names}
    model    the model name ("lenet", ...)
    metrics  the run's metrics (the content of metrics.json minus the history)

Example::

    >>> from fastdistill.io import load_distilled        # doctest: +SKIP
    >>> d = load_distilled("runs/mnist-fixed-20240101-120000")
    >>> d.data.shape, d.lrs
    (torch.Size([1, 10, 1, 28, 28]), tensor([0.0312, 0.0271, 0.0193]))
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .distill import DistillConfig, DistillResult
from .errors import DataError, FastDistillError, ShapeError

__all__ = ["DISTILLED_FORMAT", "DistilledSet", "save_distilled", "save_npz", "load_distilled",
           "save_metrics", "load_metrics", "make_grid_image", "row_titles", "save_grid", "save_distilled_grid", "grid_layout",
           "dataset_info_dict", "atomic_write", "DISTILLED_FILE", "NPZ_FILE", "METRICS_FILE",
           "GRID_FILE", "CHECKPOINT_FILE"]

DISTILLED_FORMAT = "fastdistill.distilled/v1"
METRICS_FORMAT = "fastdistill.metrics/v1"

#: file names inside a run folder
CHECKPOINT_FILE = "checkpoint.pt"
DISTILLED_FILE = "distilled.pt"
NPZ_FILE = "distilled.npz"
METRICS_FILE = "metrics.json"
GRID_FILE = "distilled.png"
BEST_FILE = "best.pt"                # the best periodic iterate on the validation split (val_size > 0)
BEST_METRICS_FILE = "best.json"

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` and move ``tmp`` onto ``path``: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def dataset_info_dict(info: Any) -> Dict[str, Any]:
    """The dataset description stored with a distilled set, as plain Python values.

    ``info`` is a ``fastdistill.data`` info object (attributes ``name``, ``num_classes``,
    ``in_channels``, ``image_size``, ``mean``, ``std``, ``class_names``) or a dict with those keys.
    """
    get = info.get if isinstance(info, dict) else (lambda k, d=None: getattr(info, k, d))

    def floats(v):
        if v is None:
            return None
        if isinstance(v, (int, float)):
            return [float(v)]
        return [float(a) for a in (v.tolist() if hasattr(v, "tolist") else v)]

    names = get("class_names")
    return {"name": get("name"), "num_classes": int(get("num_classes")),
            "in_channels": int(get("in_channels")), "image_size": int(get("image_size")),
            "mean": floats(get("mean")), "std": floats(get("std")),
            "class_names": None if names is None else [str(n) for n in names]}


@dataclass
class DistilledSet:
    """A distilled set as stored on disk (see the module docstring for the fields)."""

    data: Tensor
    labels: Tensor
    lrs: Tensor
    config: DistillConfig
    dataset: Dict[str, Any]
    model: str
    betas: Optional[Tensor] = None
    theta0: Optional[Tensor] = None
    metrics: Dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return int(self.data.shape[0])

    @property
    def epochs(self) -> int:
        return len(self.lrs) // self.steps

    @classmethod
    def from_result(cls, result: DistillResult, dataset_info: Any,
                    model: Optional[str] = None) -> "DistilledSet":
        return cls(data=result.data.detach().cpu(), labels=result.labels.detach().cpu(),
                   lrs=result.lrs.detach().cpu(),
                   betas=None if result.betas is None else result.betas.detach().cpu(),
                   theta0=None if result.theta0 is None else result.theta0.detach().cpu(),
                   config=result.config, dataset=dataset_info_dict(dataset_info),
                   model=model or result.config.model, metrics=dict(result.metrics))

    def to_dict(self) -> Dict[str, Any]:
        """The plain dict written to ``distilled.pt`` (loadable with ``weights_only=True``)."""
        return {"format": DISTILLED_FORMAT, "data": self.data, "labels": self.labels,
                "lrs": self.lrs, "betas": self.betas, "theta0": self.theta0,
                "config": self.config.to_dict(), "dataset": dict(self.dataset), "model": self.model,
                "steps": self.steps, "epochs": self.epochs, "metrics": _plain(self.metrics)}

    def validate(self, where: str = "distilled set") -> None:
        """Raise :class:`ShapeError` unless data, labels, rates and θ_0 fit together."""
        d, y, lr = self.data, self.labels, self.lrs
        if d.dim() != 5:
            raise ShapeError(f"{where}: data must be [steps, n, C, H, W], got {list(d.shape)}")
        S, n = d.shape[:2]
        if tuple(y.shape[:2]) != (S, n) or y.dim() not in (2, 3):
            raise ShapeError(f"{where}: labels must be [{S}, {n}] (or [{S}, {n}, classes]), got "
                             f"{list(y.shape)}")
        if lr.dim() != 1 or len(lr) == 0 or len(lr) % S:
            raise ShapeError(f"{where}: lrs must be [steps × epochs] = [{S}·E], got {list(lr.shape)}")
        if self.betas is not None and tuple(self.betas.shape) != tuple(lr.shape):
            raise ShapeError(f"{where}: betas must have the shape of lrs {list(lr.shape)}, got "
                             f"{list(self.betas.shape)}")
        if self.theta0 is not None and self.theta0.dim() != 1:
            raise ShapeError(f"{where}: theta0 must be a flat vector, got {list(self.theta0.shape)}")
        info = self.dataset
        if info.get("in_channels") is not None and d.shape[2] != info["in_channels"]:
            raise ShapeError(f"{where}: data has {d.shape[2]} channels but the dataset "
                             f"{info.get('name')} has {info['in_channels']}")
        for name in ("data", "lrs"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ShapeError(f"{where}: {name} contains NaN or inf")


def _plain(obj: Any) -> Any:
    """Tensors and tuples to lists, so JSON and ``weights_only`` loading accept the value."""
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, str):  # str subclasses (torch's TorchVersion) are not weights_only-safe
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalar
        return obj.item()
    return obj


def save_distilled(path: PathLike, ds: DistilledSet) -> Path:
    """Write ``ds`` to ``path`` as a plain dict (atomic)."""
    ds.validate()
    blob = ds.to_dict()
    return atomic_write(path, lambda tmp: torch.save(blob, tmp))


def save_npz(path: PathLike, ds: DistilledSet) -> Path:
    """The same arrays as :func:`save_distilled` in an ``.npz``; config, dataset info and metrics
    go to the 0-d string array ``meta`` as JSON. ``numpy.load(path)`` needs no pickle."""
    import numpy as np

    arrays = {"data": ds.data.numpy(), "labels": ds.labels.numpy(), "lrs": ds.lrs.numpy()}
    if ds.betas is not None:
        arrays["betas"] = ds.betas.numpy()
    if ds.theta0 is not None:
        arrays["theta0"] = ds.theta0.numpy()
    for k in ("mean", "std"):
        if ds.dataset.get(k) is not None:
            arrays[k] = np.asarray(ds.dataset[k], dtype=np.float32)
    meta = {"format": DISTILLED_FORMAT, "config": ds.config.to_dict(), "dataset": ds.dataset,
            "model": ds.model, "metrics": ds.metrics}
    arrays["meta"] = np.array(json.dumps(_json_safe(meta)))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy would append ".npz" to a str path
            np.savez_compressed(f, **arrays)
    return atomic_write(path, write)


def _resolve(path: PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in (DISTILLED_FILE, NPZ_FILE):
            if (path / name).is_file():
                return path / name
        raise DataError(f"{path}: no {DISTILLED_FILE} or {NPZ_FILE} in this folder; is it a "
                        f"finished fastdistill run?")
    if not path.is_file():
        raise DataError(f"{path}: no such file or run folder")
    return path


def load_distilled(path: PathLike) -> DistilledSet:
    """Read a distilled set from a run folder, a ``distilled.pt`` or a ``distilled.npz``.

    Raises:
        DataError: missing or unreadable file, or not a fastdistill distilled set.
        ShapeError: the stored arrays do not fit together.
    """
    path = _resolve(path)
    if path.suffix == ".npz":
        d = _load_npz(path)
    else:
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, garbage bytes, foreign pickle
            raise DataError(f"{path}: unreadable ({type(e).__name__}: {_first_line(e)}); is it a "
                            f"fastdistill {DISTILLED_FILE}?") from None
    if not isinstance(d, dict) or d.get("format") != DISTILLED_FORMAT:
        fmt = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise DataError(f"{path}: not a fastdistill distilled set (format {fmt!r}, expected "
                        f"{DISTILLED_FORMAT!r})")
    try:
        ds = DistilledSet(data=d["data"], labels=d["labels"], lrs=d["lrs"],
                          config=DistillConfig.from_dict(d["config"]), dataset=dict(d["dataset"]),
                          model=str(d["model"]), betas=d.get("betas"), theta0=d.get("theta0"),
                          metrics=dict(d.get("metrics") or {}))
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: incomplete distilled set ({type(e).__name__}: {e})") from None
    ds.validate(str(path))
    return ds


def _load_npz(path: Path) -> Dict[str, Any]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except Exception as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {_first_line(e)})") from None
    d = dict(meta)
    for k in ("data", "labels", "lrs", "betas", "theta0"):
        d[k] = torch.from_numpy(arrays[k]) if k in arrays else None
    return d


def _first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception message, without terminal colour codes, at most ``limit``."""
    import re

    s = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    s = s[0] if s else type(e).__name__
    return s if len(s) <= limit else s[:limit - 1] + "…"


# -- metrics -----------------------------------------------------------------------------------
def _json_safe(obj: Any) -> Any:
    """Strict JSON: NaN/inf become None, tensors and tuples become lists."""
    obj = _plain(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def save_metrics(path: PathLike, metrics: Dict[str, Any]) -> Path:
    """Write ``metrics`` as strict, indented JSON (non-finite numbers as ``null``; atomic)."""
    text = json.dumps(_json_safe(metrics), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def load_metrics(path: PathLike) -> Dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the metrics ({e})") from None


# -- the PNG grid ------------------------------------------------------------------------------
#: pixels between tiles, height of a row's title strip, height of a tile's label strip
GRID_PAD, GRID_HEADER, GRID_LABEL = 4, 16, 14
#: tiles are scaled up by an integer factor until they are at least this many pixels wide
GRID_MIN_TILE = 80


def grid_layout(steps: int, n: int, height: int, width: int) -> Dict[str, int]:
    """Geometry of :func:`make_grid_image`: the integer ``scale``, tile size and image size.

    Image width ``= PAD + n·(scale·W + PAD)``, height ``= PAD + S·(HEADER + scale·H + LABEL + PAD)``.
    """
    scale = max(1, math.ceil(GRID_MIN_TILE / max(height, width)))
    tw, th = scale * width, scale * height
    row_h = GRID_HEADER + th + GRID_LABEL + GRID_PAD
    return {"scale": scale, "tile_w": tw, "tile_h": th, "row_h": row_h,
            "width": GRID_PAD + n * (tw + GRID_PAD), "height": GRID_PAD + steps * row_h}


def _font():
    """A font with Greek letters if the system has DejaVu Sans, else Pillow's default (ASCII)."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans.ttf", 11), True
    except OSError:
        return ImageFont.load_default(), False


def _fit(draw, text: str, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-1]
    return text


def _to_uint8(x: Tensor, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> Tensor:
    """[N, C, H, W] normalised -> uint8 [N, H, W, C] in pixel space."""
    x = x.detach().to(torch.float64).cpu()
    C = x.shape[1]
    if mean is not None and std is not None:
        m = torch.tensor(list(mean) * (C if len(mean) == 1 else 1), dtype=x.dtype)[:C].view(1, C, 1, 1)
        s = torch.tensor(list(std) * (C if len(std) == 1 else 1), dtype=x.dtype)[:C].view(1, C, 1, 1)
        x = x * s + m
    else:  # no statistics stored: stretch each image to [0, 1]
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def row_titles(lrs: Tensor, steps: int, betas: Optional[Tensor] = None, *, greek: bool = True) -> List[str]:
    """The title of each grid row: ``"step s: η=η_s,η_{S+s},…"``, one rate per epoch (3 significant
    digits), then ``"β=…"`` for the momentum inner loop; ``lr=``/``beta=`` when ``greek`` is False."""
    S, E = steps, max(1, len(lrs) // steps)
    eta, beta = ("η", "β") if greek else ("lr", "beta")
    out = []
    for s in range(S):
        t = f"step {s + 1}: {eta}=" + ",".join(f"{float(lrs[e * S + s]):.3g}" for e in range(E))
        if betas is not None:
            t += f"  {beta}=" + ",".join(f"{float(betas[e * S + s]):.2g}" for e in range(E))
        out.append(t)
    return out


def make_grid_image(data: Tensor, labels: Tensor, lrs: Tensor, *, mean=None, std=None,
                    class_names: Optional[Sequence[str]] = None, betas: Optional[Tensor] = None):
    """The distilled set as a PIL image: one row per step, one column per image.

    Args:
        data: x̃, ``[S, n, C, H, W]``, normalised; shown as ``x·std + mean`` clipped to [0, 1]
            (each image stretched to its own range when ``mean``/``std`` are None). C = 1 is
            grey, C = 3 RGB, other C show channel 0.
        labels: ``[S, n]`` class indices, or ``[S, n, classes]`` soft labels (each tile is
            captioned with its top-3 classes, strongest first; one-logit models: ỹ > 0.5).
        lrs: η, ``[T]`` with ``T = S·E``; row s is titled with η_{s}, η_{S+s}, …, η_{(E−1)S+s},
            the rates its images are trained with in each of the E epochs.
        class_names: tile captions (default: the class index).
        betas: β, ``[T]``, shown after the rates for the momentum inner loop.
    Returns:
        ``PIL.Image.Image`` (RGB) of the size given by :func:`grid_layout`.
    """
    from PIL import Image, ImageDraw

    S, n, C, H, W = data.shape
    g = grid_layout(S, n, H, W)
    img = Image.new("RGB", (g["width"], g["height"]), "white")
    draw = ImageDraw.Draw(img)
    font, greek = _font()
    pix = _to_uint8(data.reshape(S * n, C, H, W), mean, std).reshape(S, n, H, W, C)
    top3 = None
    if labels.dim() == 3:  # soft labels: the strongest class (one-logit models: ỹ > 0.5)
        cls = (labels[..., 0] > 0.5).long() if labels.shape[-1] == 1 else labels.argmax(-1)
        if labels.shape[-1] > 1:  # SLDD: caption each image with its top-3 classes
            top3 = labels.detach().topk(min(3, labels.shape[-1]), dim=-1).indices
    else:
        cls = labels
    row_w = g["width"] - 2 * GRID_PAD
    titles = row_titles(lrs, S, betas, greek=greek)
    for s, title in enumerate(titles):
        y0 = GRID_PAD + s * g["row_h"]
        draw.text((GRID_PAD, y0 + 1), _fit(draw, title, font, row_w), fill="black", font=font)
        for j in range(n):
            x0 = GRID_PAD + j * (g["tile_w"] + GRID_PAD)
            a = pix[s, j].numpy()
            tile = Image.fromarray(a[..., 0], "L") if C != 3 else Image.fromarray(a, "RGB")
            tile = tile.resize((g["tile_w"], g["tile_h"]), Image.NEAREST).convert("RGB")
            img.paste(tile, (x0, y0 + GRID_HEADER))
            k = int(cls[s, j])
            name = class_names[k] if class_names is not None and k < len(class_names) else str(k)
            cap = name if name == str(k) else f"{k} {name}"
            if top3 is not None:
                cap = " ".join(str(int(c)) for c in top3[s, j])
            cap = _fit(draw, cap, font, g["tile_w"])
            draw.text((x0, y0 + GRID_HEADER + g["tile_h"] + 1), cap, fill="black", font=font)
    return img


def save_grid(path: PathLike, data: Tensor, labels: Tensor, lrs: Tensor, **kwargs) -> Path:
    """Write :func:`make_grid_image` as a PNG (atomic); keyword arguments as there."""
    img = make_grid_image(data, labels, lrs, **kwargs)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def save_distilled_grid(path: PathLike, ds: DistilledSet) -> Path:
    """:func:`save_grid` for a :class:`DistilledSet`, with its dataset's statistics and names."""
    info = ds.dataset
    return save_grid(path, ds.data, ds.labels, ds.lrs, mean=info.get("mean"), std=info.get("std"),
                     class_names=info.get("class_names"), betas=ds.betas)
