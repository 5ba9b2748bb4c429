"""The model card written next to the weights: what the net was trained on and what it does."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cmw_transfer.artifact.curves import TABLE_LOSSES, curves_table, family_names

if TYPE_CHECKING:
    from cmw_transfer.artifact.net import CMWNet


def render_model_card(net: CMWNet) -> str:
    prov = net.provenance or {}
    method = "MW-Net" if net.num_heads == 1 else f"CMW-Net (K={net.num_heads})"
    lines = [
        "---",
        "library_name: cmw-transfer",
        "license: mit",
        "tags:",
        "- sample-weighting",
        "- noisy-labels",
        "- long-tail",
        "- meta-learning",
        "---",
        "",
        f"# {method} weighting net",
        "",
        "Maps a sample's training loss and its class-size family to a weight in [0, 1]. Load it with",
        "`CMWNet.from_pretrained(SPEC)` or `cmw-transfer apply --weights SPEC`; on a new dataset the families are",
        "re-fitted on that dataset's class counts and each class uses the head of the same size rank.",
        "",
        "## Provenance",
        "",
        "| field | value |",
        "|---|---|",
    ]
    for key in sorted(prov):
        lines.append(f"| {key} | {prov[key]} |")
    lines += ["", "## Scale families", "", "| head | family | center (samples per class) |", "|---|---|---|"]
    for i, (name, center) in enumerate(zip(family_names(net.num_heads), net.centers or [])):
        lines.append(f"| {i} | {name} | {center:.1f} |")
    if net.loss_range:
        rng = ", ".join(f"{k}={v:.3g}" for k, v in sorted(net.loss_range.items()))
        lines += ["", f"Observed training-loss range of the source run: {rng}."]
    lines += ["", "## Weight vs loss", "", "| family | " + " | ".join(f"loss {x:g}" for x in TABLE_LOSSES) + " |",
              "|---|" + "---|" * len(TABLE_LOSSES)]
    for name, row in curves_table(net).items():
        lines.append(f"| {name} | " + " | ".join(f"{w:.2f}" for w in row.values()) + " |")
    lines += ["", f"Format version {net.format_version}; weights in `model.safetensors` (config also in its header).",
              ""]
    return "\n".join(lines)
