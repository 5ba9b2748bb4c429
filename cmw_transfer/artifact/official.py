"""The authors' released weighting nets, converted into normal cmw-transfer artifacts.

Two formats, both plain ``torch.save`` state_dicts:

* ``official-cmwnet``: the CMW-Net repository's ``VNet(1, 100, 100, 1, 3)`` (released as
  ``section6/webvision/vnet_119.pth``): trunk ``feature.layer.0.{weight [H,1], bias [H]}`` (Linear + ReLU) and heads
  ``classfier.layers.{j}.0.{weight [1,H], bias [1]}`` (Linear + Sigmoid; the authors' spelling ``classfier``).
* ``official-mwnet``: the MW-Net repository's ``VNet(1, 100, 1)``: ``linear1.{weight [H,1], bias [H]}`` (+ ReLU) and
  ``linear2.{weight [1,H], bias [1]}`` (+ Sigmoid), i.e. a K=1 net.

The file is read with ``torch.load(weights_only=True)`` and nothing else: a pickle that would build any object other
than tensors and containers is refused before it runs. The function is copied unchanged; only the heads are
re-ordered, because a cmw-transfer head ``i`` means "the i-th smallest class-size family" while the authors' heads
carry no order (they hard-code a class -> head list per target). The released file records neither centers nor a
loss range, so the artifact says where its centers come from and that its loss range is unknown unless a short
plain-CE run on a dataset the user names calibrates one.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cmw_transfer.artifact.card import with_origin_note
from cmw_transfer.artifact.curves import family_names
from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.artifact.scales import fit_scale_centers
from cmw_transfer.errors import UserError
from cmw_transfer.parsing import parse_int_list
from cmw_transfer.untrusted import quiet_warnings

KINDS = ("official-cmwnet", "official-mwnet")
METHODS = ("cmwnet", "cmwnet-sl", "mwnet")
MAX_SOURCE_COUNT = 10**12  # samples in one class: more than any dataset holds, and exact in float64
MAX_FILE_BYTES = 64 * 2**20  # the released net is ~3 KB; anything this large is not a weighting net

# Official head j -> toolkit head i: toolkit order [small, medium, large] = official heads [1, 2, 0]. Inferred from
# the released curves (reference notes §1.2): head 0 falls steeply (the large, noisiest receiver classes of the
# asymmetric flip), head 1 rises to ~1 (small classes), head 2 is flat at ~0.45 (medium classes).
DEFAULT_HEAD_ORDER = (1, 2, 0)
DEFAULT_HEAD_ORDER_REASON = (
    "default, inferred from the released curves: official head 0 falls steeply (large = receiver classes of the "
    "asymmetric flip), head 1 rises to ~1 (small classes), head 2 is flat ~0.45 (medium classes)"
)
# Class counts of the authors' source after PMD Type-I 35% + asymmetric 30% (seed 1) on the first 45k of CIFAR-10,
# recomputed from PLC's label file and flip (reference notes §1.2).
CIFAR10_PMD_COUNTS = (6026, 5754, 3368, 5129, 3047, 4938, 4070, 5308, 4150, 3210)
UNKNOWN_CENTER = 1.0  # K=1 without source counts: a single head is used for every class, the center is unused

ORIGINS: dict[str, dict[str, Any]] = {
    "official-cmwnet": {
        "repo": "https://github.com/xjtushujun/CMW-Net",
        "path": "section6/webvision/vnet_119.pth (byte-identical: section6/Animal-10N/vnet_119.pth)",
        "method": "cmwnet-sl",
        "source": "cifar10-pmd (the authors' run, section4/Feature-dependent_Label_Noise/mwn.py via table5.sh)",
        "bias": "pmd1:0.35+asym:0.3",
        "backbone": "ResNet-34 (authors' MetaModule)",
        "epochs": 120,
        "seed": 1,
        "meta_set": "lowest-loss:10 per class from the EMA teacher, rebuilt every epoch from 45",
        "meta_grad": "exact (authors' code: one virtual plain-SGD step every 10 iterations)",
        "counts_origin": "CIFAR-10 class counts after PMD Type-I 35% + asymmetric 30% (seed 1), the authors' source",
    },
    "official-mwnet": {
        "repo": "https://github.com/xjtushujun/meta-weight-net",
        "path": "a VNet(1, 100, 1) state_dict (resnet.py VNet, as built by MW-Net.py)",
        "method": "mwnet",
        "source": "unknown (a run of the MW-Net repository)",
        "bias": "unknown",
        "backbone": "unknown",
        "epochs": "unknown",
        "seed": "unknown",
        "meta_set": "unknown",
        "meta_grad": "exact (authors' code)",
        "counts_origin": None,
    },
}


# -- reading ------------------------------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True, map_location="cpu")`` and nothing else; every failure is a UserError.

    A ``cuda:N``-tagged storage (the authors saved from a GPU) is mapped to the CPU. A leading ``module.`` on every
    key (a DataParallel copy) is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no file at {path}: give the path of the authors' .pth state_dict")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path} is empty: re-download the authors' file")
    if size > MAX_FILE_BYTES:
        raise UserError(f"{path} is {size} bytes: far too large for a weighting net (the authors' is ~3 KB)")
    try:
        with quiet_warnings():  # torch's "Detected pickle protocol 4" would precede the one error line
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path}: refused to load: it holds objects other than tensors and containers, so it is not "
                        f"a plain state_dict and was not unpickled ({_unpickler_reason(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, AttributeError,
            TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable torch state_dict (truncated or corrupt?): {first}") from None
    if not isinstance(obj, Mapping):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors)")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: entry {key!r} is a {type(value).__name__}, not a named tensor; expected the "
                            "weighting net's state_dict itself")
        state[key] = value
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# -- the two formats ----------------------------------------------------------------------------------------------
def _unpickler_reason(exc: Exception) -> str:
    """The line of torch's weights-only refusal that names what was refused (e.g. ``GLOBAL io.open``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "nsupported" in line:  # "Unsupported global: GLOBAL x.y was not ..." / "... unsupported GLOBAL x.y whose"
            return line.split(" was not an allowed global", 1)[0].split(" whose ", 1)[0].split("error: ", 1)[-1]
    return "torch.load(weights_only=True) refused it"


def _official_layout(kind: str, state: Mapping[str, torch.Tensor]) -> tuple[str, str, list[tuple[str, str]]]:
    """(trunk weight key, trunk bias key, [(head weight key, head bias key)] in the authors' head order)."""
    if kind == "official-mwnet":
        return "linear1.weight", "linear1.bias", [("linear2.weight", "linear2.bias")]
    num_heads = 0
    while f"classfier.layers.{num_heads}.0.weight" in state or f"classfier.layers.{num_heads}.0.bias" in state:
        num_heads += 1
    heads = [(f"classfier.layers.{j}.0.weight", f"classfier.layers.{j}.0.bias") for j in range(max(num_heads, 1))]
    return "feature.layer.0.weight", "feature.layer.0.bias", heads


def validate_state_dict(kind: str, state: Mapping[str, torch.Tensor], *, source: str) -> tuple[int, int]:
    """Names, shapes, dtypes and finiteness, each failure naming the key; returns ``(hidden_size, num_heads)``."""
    if kind not in KINDS:
        raise UserError(f"unknown official format '{kind}'; expected one of {', '.join(KINDS)}")
    trunk_w, trunk_b, heads = _official_layout(kind, state)
    expected = [trunk_w, trunk_b, *(k for pair in heads for k in pair)]
    for key in expected:
        if key not in state:
            raise UserError(f"{source}: missing key '{key}' for --from {kind} (expected {_describe(expected)}); "
                            f"found {_describe(sorted(state))}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise UserError(f"{source}: unexpected key '{extra[0]}' for --from {kind} (expected {_describe(expected)})")
    hidden = state[trunk_w].shape[0] if state[trunk_w].dim() == 2 else 0
    if hidden < 1:
        raise UserError(f"{source}: {trunk_w} has shape {tuple(state[trunk_w].shape)}, expected (H, 1)")
    shapes = {trunk_w: (hidden, 1), trunk_b: (hidden,)}
    for head_w, head_b in heads:
        shapes.update({head_w: (1, hidden), head_b: (1,)})
    for key in expected:
        tensor = state[key]
        if tuple(tensor.shape) != shapes[key]:
            raise UserError(f"{source}: {key} has shape {tuple(tensor.shape)}, expected {shapes[key]} "
                            f"(hidden size {hidden} from {trunk_w})")
        if tensor.dtype != torch.float32:
            raise UserError(f"{source}: {key} has dtype {tensor.dtype}, expected torch.float32 as the authors' "
                            "file; convert it with .float() first if that is intended")
        if not torch.isfinite(tensor).all():
            raise UserError(f"{source}: {key} contains NaN or inf values; the file is damaged")
    return hidden, len(heads)


def _describe(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:6])
    return shown + (f", ... ({len(keys)} keys)" if len(keys) > 6 else "")


def parse_head_order(text: str | Sequence[int] | None, num_heads: int) -> tuple[tuple[int, ...], str]:
    """``(order, reason)``: toolkit head ``i`` (i-th smallest family) = official head ``order[i]``."""
    if text is None:
        if num_heads == 1:
            return (0,), "one head"
        if num_heads == len(DEFAULT_HEAD_ORDER):
            return DEFAULT_HEAD_ORDER, DEFAULT_HEAD_ORDER_REASON
        raise UserError(f"the file has {num_heads} heads and no default order is known for that: give "
                        f"--head-order, the official head for each family from smallest to largest classes")
    order = parse_int_list(text, "--head-order", example="1,2,0", noun="head numbers", low=0, unique=False)
    if sorted(order) != list(range(num_heads)):
        raise UserError(f"--head-order {','.join(map(str, order))} is not a permutation of the file's {num_heads} "
                        f"heads 0..{num_heads - 1}")
    return order, "given with --head-order"


def parse_counts(text: str | Sequence[int] | None) -> list[float] | None:
    """``--source-counts``: one sample count per source class, at least two, whole numbers >= 1. A class the
    source had no sample of has no size (leave it out); counts of 0 would put every center at 0, one family."""
    if text is None:
        return None
    counts = parse_int_list(text, "--source-counts", example="5000,2500,1250", noun="class sample counts",
                            low=1, high=MAX_SOURCE_COUNT, unique=False)
    if len(counts) < 2:
        raise UserError(f"--source-counts names {len(counts)} class; a source has at least 2 classes")
    return [float(c) for c in counts]


def _source_centers(kind: str, counts: list[float] | None, num_heads: int) -> tuple[list[float], list[float] | None,
                                                                                   str]:
    """(centers, counts used, where the counts come from)."""
    if counts is None and kind == "official-cmwnet":
        counts, origin = list(map(float, CIFAR10_PMD_COUNTS)), ORIGINS[kind]["counts_origin"]
    elif counts is None:
        if num_heads != 1:
            raise UserError("give --source-counts: no source class counts are known for this file")
        return [UNKNOWN_CENTER], None, "unknown: the center of the single head is a placeholder (unused)"
    else:
        origin = "given with --source-counts"
    if len(counts) < num_heads:
        raise UserError(f"--source-counts has {len(counts)} classes, fewer than the {num_heads} heads")
    try:
        centers = fit_scale_centers(counts, num_heads)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"--source-counts: {exc}") from None
    return [round(float(c), 6) for c in centers], counts, origin


# -- conversion ---------------------------------------------------------------------------------------------------
def net_from_state_dict(kind: str, state: Mapping[str, torch.Tensor], head_order: Sequence[int]) -> CMWNet:
    """The authors' function in the toolkit's layout: toolkit head ``i`` = official head ``head_order[i]``."""
    hidden, num_heads = validate_state_dict(kind, state, source=kind)
    trunk_w, trunk_b, heads = _official_layout(kind, state)
    net = CMWNet(hidden_size=hidden, num_heads=num_heads)
    with torch.no_grad():
        net.trunk.weight.copy_(state[trunk_w])
        net.trunk.bias.copy_(state[trunk_b])
        for i, j in enumerate(head_order):
            net.heads.weight[i].copy_(state[heads[j][0]][0])
            net.heads.bias[i].copy_(state[heads[j][1]][0])
    return net


def to_official_state_dict(net: CMWNet, kind: str = "official-cmwnet",
                           head_order: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """The inverse: a toolkit net as the authors' state_dict (e.g. to run their transfer scripts with it)."""
    order, _ = parse_head_order(None if head_order is None else list(head_order), net.num_heads)
    if kind == "official-mwnet" and net.num_heads != 1:
        raise UserError(f"an MW-Net VNet has one head; this net has {net.num_heads}")
    trunk_w, trunk_b, _ = _official_layout(kind, {})
    state = {trunk_w: net.trunk.weight.detach().clone(), trunk_b: net.trunk.bias.detach().clone()}
    if kind == "official-mwnet":
        state["linear2.weight"] = net.heads.weight.detach()[0:1].clone()
        state["linear2.bias"] = net.heads.bias.detach()[0:1].clone()
        return state
    for i, j in enumerate(order):
        state[f"classfier.layers.{j}.0.weight"] = net.heads.weight.detach()[i:i + 1].clone()
        state[f"classfier.layers.{j}.0.bias"] = net.heads.bias.detach()[i:i + 1].clone()
    return dict(sorted(state.items()))


def head_map_text(order: Sequence[int]) -> str:
    names = family_names(len(order))
    return "; ".join(f"toolkit head {i} ({names[i]}) = official head {j}" for i, j in enumerate(order))


def from_official(
    path: str | os.PathLike,
    kind: str = "official-cmwnet",
    *,
    head_order: str | Sequence[int] | None = None,
    source_counts: str | Sequence[float] | None = None,
    method: str | None = None,
    calibrate: Callable[[], tuple[dict[str, float], str]] | None = None,
) -> CMWNet:
    """Load and convert the authors' file into a :class:`CMWNet` whose provenance says exactly what it is.

    ``head_order``: toolkit head ``i`` (the ``i``-th smallest class-size family) = official head ``head_order[i]``;
    default ``(1, 2, 0)`` for a 3-head CMW-Net (see :data:`DEFAULT_HEAD_ORDER`). ``source_counts``: the source's
    per-class counts, clustered with the toolkit's k-means into the centers (default for ``official-cmwnet``: the
    authors' CIFAR-10 PMD counts). ``calibrate``: called once the file is read and checked, it returns the loss range
    and how it was measured (the CLI's ``--calibrate-on``: :func:`cmw_transfer.trainer.calibrate.calibrate_loss_range`);
    without it the loss range is unknown.
    """
    if kind not in KINDS:
        raise UserError(f"unknown official format '{kind}'; expected one of {', '.join(KINDS)}")
    path = Path(path)
    state = read_state_dict(path)
    _, num_heads = validate_state_dict(kind, state, source=str(path))
    order, order_reason = parse_head_order(head_order, num_heads)
    origin = ORIGINS[kind]
    method = method or origin["method"]
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got '{method}'")
    if (method == "mwnet") != (num_heads == 1):
        raise UserError(f"--method {method} does not fit a net with {num_heads} head(s): mwnet is the K=1 net")
    centers, counts, counts_origin = _source_centers(kind, parse_counts(source_counts), num_heads)
    net = net_from_state_dict(kind, state, order)
    loss_range = None
    range_note = ("unknown: the authors' file records none (the net takes raw, unnormalised cross-entropy); "
                  "re-import with --calibrate-on SPEC to record one")
    if calibrate is not None:
        loss_range, range_note = calibrate()
    from cmw_transfer.defaults import __version__

    provenance = {
        "origin": f"the authors' released weighting net ({kind}), converted by cmw-transfer import; "
                  "not trained by cmw-transfer",
        "origin_repo": origin["repo"],
        "origin_path": origin["path"],
        "origin_file": path.name,
        "origin_sha256": file_sha256(path),
        "conversion": "function copied unchanged (Linear(1->H)+ReLU trunk, Linear(H->1)+Sigmoid per head); heads "
                      "re-ordered so that head i = i-th smallest class-size family",
        "head_map": head_map_text(order),
        "head_order": ",".join(map(str, order)),
        "head_order_reason": order_reason,
        "method": method,
        "source": origin["source"],
        "bias": origin["bias"],
        "backbone": origin["backbone"],
        "epochs": origin["epochs"],
        "seed": origin["seed"],
        "meta_set": origin["meta_set"],
        "meta_grad": origin["meta_grad"],
        "source_counts": [int(c) if float(c).is_integer() else c for c in counts] if counts else "unknown",
        "source_counts_origin": counts_origin,
        "centers_by": "cmw-transfer k-means (seeded) on source_counts" if counts else "placeholder",
        "loss_range": range_note,
        "toolkit_version": __version__,
    }
    net = net.with_scales(centers, loss_range)
    net.provenance = provenance
    return net


# -- writing ------------------------------------------------------------------------------------------------------
def save_official(net: CMWNet, out: str | os.PathLike, *, overwrite: bool = False, plot: bool = True) -> Path:
    """``save_pretrained`` plus the origin section in the model card (and the curves plot), all-or-nothing."""
    from cmw_transfer.atomic import atomic_path, check_regular, file_kind, temporary_directory, write_text

    out = Path(out)
    try:
        kind = None if out.is_dir() else file_kind(os.stat(out).st_mode)
    except FileNotFoundError:
        kind = "a symbolic link to nothing" if out.is_symlink() else None
    if kind is not None:
        raise UserError(f"--out {out} is {kind}, not a directory; give a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is not empty; pass --overwrite to replace the artifact there")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_directory(out)
    try:
        net.save_pretrained(tmp)
        card = tmp / "README.md"
        write_text(card, with_origin_note(card.read_text(encoding="utf-8"), net))
        if plot:
            from cmw_transfer.artifact.curves import plot_curves

            plot_curves(net, tmp / "curves.png", title=f"{net.provenance.get('method')}: the authors' net")
        if not out.exists():
            os.replace(tmp, out)
        else:
            items = sorted(tmp.iterdir())
            for item in items:  # every target first: a FIFO or device among them leaves the old artifact whole
                check_regular(out / item.name)
            for item in items:
                with atomic_path(out / item.name) as dst:
                    shutil.copyfile(item, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
