"""The model card written next to the weights: a ``huggingface_hub.ModelCard`` with what the net was trained on,
what it does, how to use it and what it cannot do.

Deterministic: the same net (and the same source-run metrics) give the same bytes, so the shipped nets' cards are
regenerated and compared exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from cmw_transfer.artifact.curves import TABLE_LOSSES, curves_table, family_names
from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.untrusted import loads

PAPER_URL = "https://arxiv.org/abs/2202.05613"
MWNET_PAPER_URL = "https://arxiv.org/abs/1902.07379"
TAGS = ["sample-weighting", "noisy-labels", "long-tail", "meta-learning"]
METRICS_NAME = "metrics.jsonl"
CARD_METRICS = ("epoch", "test_top1", "test_top5", "clean_noisy_auc", "meta_steps", "train_loss")

CITATION = """\
@article{shu2023cmwnet,
  title   = {CMW-Net: Learning a Class-Aware Sample Weighting Mapping for Robust Deep Learning},
  author  = {Shu, Jun and Yuan, Xiang and Meng, Deyu and Xu, Zongben},
  journal = {IEEE Transactions on Pattern Analysis and Machine Intelligence},
  year    = {2023},
  eprint  = {2202.05613},
  archivePrefix = {arXiv}
}
@inproceedings{shu2019metaweightnet,
  title     = {Meta-Weight-Net: Learning an Explicit Mapping For Sample Weighting},
  author    = {Shu, Jun and Xie, Qi and Yi, Lixuan and Zhao, Qian and Zhou, Sanping and Xu, Zongben and Meng, Deyu},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2019}
}"""

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A frozen sample-weighting net for training classifiers on biased data (label noise, long tails): it maps a
sample's training loss and its class-size family to a weight in [0, 1]. Method: [CMW-Net]({{ paper_url }}) with
K={{ num_heads }} heads{% if num_heads == 1 %} (i.e. [MW-Net]({{ mwnet_url }})){% endif %}, meta-trained with
cmw-transfer. On a new dataset the families are re-fitted on that dataset's class counts and each class uses
the head of the same size rank.

## Usage

`{{ spec }}` stands for this net: its Hub repo, its local directory or its `.safetensors` file. Command line:

```bash
cmw-transfer inspect --weights {{ spec }}
cmw-transfer apply --weights {{ spec }} --dataset cifar10 --noise asym:0.4 --model resnet18 --out runs/cifar10
```

In your own training loop (the net stays frozen; `class_counts` are your training set's samples per class):

```python
from cmw_transfer import CMWLoss

criterion = CMWLoss.from_spec("{{ spec }}", class_counts=class_counts)
loss = criterion(model(images), targets)  # weighted cross-entropy
loss.backward()
```

## Source run

| field | value |
|---|---|
{% for key, value in provenance %}| {{ key }} | {{ value }} |
{% endfor %}{% if metrics %}
Final epoch of the meta-training run:

| metric | value |
|---|---|
{% for key, value in metrics %}| {{ key }} | {{ value }} |
{% endfor %}{% endif %}
## Scale families

| head | family | center (samples per class) |
|---|---|---|
{% for head, name, center in families %}| {{ head }} | {{ name }} | {{ center }} |
{% endfor %}{% if loss_range %}
Observed training-loss range of the source run: {{ loss_range }}.
{% endif %}
## Weight vs loss

![weight vs loss per family]({{ curves_file }})

| family | {{ loss_header }} |
|---|{{ loss_rule }}
{% for name, row in curves %}| {{ name }} | {{ row }} |
{% endfor %}
## Limitations

- The net weights cross-entropy losses of a classifier trained from scratch or fine-tuned with a learning rate
  comparable to the source run's; losses far outside the source run's range (above) are extrapolated.
- Families are defined by class size only: a target whose noise is not related to class size (e.g. symmetric noise
  on a balanced set) gets one shared curve, as MW-Net would.
- It was meta-trained on one source ({{ source }}); transfer to a very different domain is not guaranteed and should
  be checked against the unweighted baseline (`cmw-transfer apply --weighting none`).

## Citation

```bibtex
{{ citation }}
```

Format version {{ format_version }}; weights in `model.safetensors` (the config is also in its header).
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return " ".join(text.replace("|", "\\|").split())  # one table cell: no newlines, no column breaks


def final_metrics(directory: Path) -> dict[str, Any] | None:
    """The last complete row of a run's metrics.jsonl (a torn tail line is skipped), or None."""
    path = directory / METRICS_NAME
    if not path.is_file():
        return None
    for line in reversed(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        try:
            row = loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            return row
    return None


def card_data(net: CMWNet, metrics: dict[str, Any] | None) -> ModelCardData:
    prov = net.provenance or {}
    source = str(prov.get("source", "unknown"))
    name = f"{prov.get('method', 'cmwnet')}-{source}"
    results = None
    auc = (metrics or {}).get("clean_noisy_auc")
    if isinstance(auc, int | float) and math.isfinite(auc):
        results = [EvalResult(task_type="other", task_name="clean-vs-noisy sample separation", dataset_type=source,
                              dataset_name=f"{source} ({prov.get('bias', 'as shipped')})", dataset_split="train",
                              metric_type="roc_auc", metric_name="clean-vs-noisy AUC of the weights",
                              metric_value=round(float(auc), 4))]
    return ModelCardData(library_name="cmw-transfer", license="mit", tags=list(TAGS), model_name=name,
                         eval_results=results)


def as_text(model_card: ModelCard) -> str:
    """The README.md bytes of a card: its text with exactly one final newline."""
    return str(model_card).rstrip("\n") + "\n"


def render_model_card(net: CMWNet, *, metrics: dict[str, Any] | None = None, spec: str | None = None,
                      curves_file: str = "curves.png") -> ModelCard:
    """The card as a ``huggingface_hub.ModelCard``; ``metrics`` is the source run's final row (metrics.jsonl)."""
    prov = net.provenance or {}
    method = "MW-Net" if net.num_heads == 1 else f"CMW-Net (K={net.num_heads})"
    source = str(prov.get("source", "an unnamed source"))
    shown = [(k, _fmt(metrics[k])) for k in CARD_METRICS if metrics and k in metrics]
    table = curves_table(net)
    return ModelCard.from_template(
        card_data(net, metrics),
        template_str=TEMPLATE,
        title=f"{method} weighting net" + (f" from {source}" if "source" in prov else ""),
        paper_url=PAPER_URL,
        mwnet_url=MWNET_PAPER_URL,
        num_heads=net.num_heads,
        spec=spec or "hub:ORG/NAME",
        provenance=[(k, _fmt(prov[k])) for k in sorted(prov)],
        metrics=shown,
        families=[(i, name, f"{c:.1f}") for i, (name, c) in enumerate(zip(family_names(net.num_heads),
                                                                              net.centers or []))],
        loss_range=", ".join(f"{k}={v:.3g}" for k, v in sorted((net.loss_range or {}).items())),
        curves_file=curves_file,
        loss_header=" | ".join(f"loss {x:g}" for x in TABLE_LOSSES),
        loss_rule="---|" * len(TABLE_LOSSES),
        curves=[(name, " | ".join(f"{w:.2f}" for w in row.values())) for name, row in table.items()],
        source=source,
        citation=CITATION,
        format_version=net.format_version,
    )


# -- an imported net (cmw_transfer.artifact.official) -------------------------------------------------------------
def origin_note(net: CMWNet) -> str:
    """The model-card section of an imported net: the authors' net, and how it was converted."""
    p = net.provenance
    counts = p.get("source_counts")
    lines = [
        "## Origin: the authors' net, converted",
        "",
        f"This is **the authors' released weighting net**, not one trained by cmw-transfer: `{p.get('origin_file')}` "
        f"(sha256 `{p.get('origin_sha256')}`), the format of {p.get('origin_repo')} `{p.get('origin_path')}`, "
        f"converted with `cmw-transfer import` (cmw-transfer {p.get('toolkit_version')}).",
        "",
        f"- Conversion: {p.get('conversion')}.",
        f"- Head map: {p.get('head_map')} ({p.get('head_order_reason')}).",
        f"- Method: {p.get('method')}" + (" (apply it with `--soft-labels`: the weight interpolates between the "
                                          "given label and the pseudo-label, as the authors use it)."
                                          if p.get("method") == "cmwnet-sl" else "."),
        f"- Source: {p.get('source')}; bias {p.get('bias')}.",
        f"- Centers: {net.centers} from source class counts {counts} ({p.get('source_counts_origin')}); on a target "
        "the families are re-fitted on the target's own counts, so the centers are informational.",
        f"- Loss range: {p.get('loss_range')}.",
        "- Licence: the authors' repository states no licence for its weights; do not redistribute them without the "
        "authors' permission.",
        "",
    ]
    return "\n".join(lines)


def with_origin_note(card: str, net: CMWNet) -> str:
    """The card with :func:`origin_note` before its first section (and the authors' weights' licence unknown)."""
    note = origin_note(net)
    card = card.replace("\nlicense: mit\n", "\nlicense: unknown\n", 1)  # the weights are the authors', not MIT
    head, sep, rest = card.partition("\n## ")
    return f"{head}\n{note}\n## {rest}" if sep else f"{card.rstrip()}\n\n{note}"
