"""No deserialiser that can run code, anywhere in the package, the shipped nets or the scripts (issue 22, item 1).

An AST scan with import aliases resolved (``import numpy as np``, ``from pickle import loads as l``): it fails on
``pickle.load(s)`` / ``Unpickler`` other than the one restricted CIFAR class, ``np.load(..., allow_pickle=...)``
not literally False, ``torch.load`` without ``weights_only=True`` (and any ``weights_only`` that is not literally
True), ``yaml.load`` without a safe loader, ``eval`` / ``exec`` / ``compile``, ``marshal``, ``shelve``,
``joblib.load``, ``dill`` / ``cloudpickle`` loads, ``pandas.read_pickle`` and ``torch.hub.load``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("cmw_transfer", "pretrained", "scripts")
# the one class allowed to subclass an unpickler: it overrides find_class (cmw_transfer/dataset/formats/cifar.py)
RESTRICTED = ("cmw_transfer/dataset/formats/cifar.py", "CifarUnpickler")

PICKLE_MODULES = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "pickle5")
FORBIDDEN_CALLS = {
    *(f"{m}.{f}" for m in PICKLE_MODULES for f in ("load", "loads")),
    "marshal.load", "marshal.loads", "shelve.open", "shelve.Shelf", "shelve.DbfilenameShelf", "joblib.load",
    "pandas.read_pickle", "torch.hub.load", "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load",
    "yaml.full_load_all", "builtins.eval", "builtins.exec", "builtins.compile", "eval", "exec", "compile",
}
UNPICKLERS = {f"{m}.{c}" for m in PICKLE_MODULES for c in ("Unpickler", "_Unpickler")}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
YAML_LOADS = {"yaml.load", "yaml.load_all"}
SAFE_YAML_LOADERS = ("SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader")


def _aliases(tree: ast.AST) -> dict[str, str]:
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def findings(source: str, filename: str = "<snippet>") -> list[str]:
    """Every use of a code-running deserialiser in ``source``, as ``file:line: what``."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found: list[str] = []
    allowed_bases: set[int] = set()
    for node in ast.walk(tree):  # the restricted class: its base is the one allowed Unpickler reference
        if isinstance(node, ast.ClassDef) and (filename, node.name) == RESTRICTED and any(
                isinstance(item, ast.FunctionDef) and item.name == "find_class" for item in node.body):
            allowed_bases.update(id(base) for base in node.bases)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name | ast.Attribute) and id(node) not in allowed_bases:
            name = _dotted(node, aliases)
            if name in UNPICKLERS:
                found.append(f"{filename}:{node.lineno}: {name}")
        if isinstance(node, ast.ImportFrom) and node.module in PICKLE_MODULES:
            found += [f"{filename}:{node.lineno}: from {node.module} import {a.name}" for a in node.names
                      if a.name in ("load", "loads")]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        keywords = {k.arg: k.value for k in node.keywords}
        where = f"{filename}:{node.lineno}: {name}"
        if name in FORBIDDEN_CALLS:
            found.append(where)
        if "allow_pickle" in keywords and not _is_const(keywords["allow_pickle"], False):
            found.append(f"{where}(allow_pickle=...)")
        if (name in TORCH_LOADS or "weights_only" in keywords) and not _is_const(keywords.get("weights_only"), True):
            found.append(f"{where} without weights_only=True")
        if name in YAML_LOADS:
            loader = keywords.get("Loader", node.args[1] if len(node.args) > 1 else None)
            loader_name = _dotted(loader, aliases) if loader is not None else None
            if not (loader_name and loader_name.rsplit(".", 1)[-1] in SAFE_YAML_LOADERS):
                found.append(f"{where} without a safe Loader")
    return found


@pytest.mark.parametrize("snippet", [
    'import pickle\nwith open(path, "rb") as fh:\n    obj = pickle.load(fh, encoding="bytes")\n',  # cifar.py before
    "import pickle as p\np.loads(b)\n",
    "from pickle import loads as safe\n",
    "import _pickle\n_pickle.Unpickler(fh).load()\n",
    "import pickle\nclass Mine(pickle.Unpickler):\n    def find_class(self, m, n):\n        return None\n",
    "import numpy as np\nnp.load(f, allow_pickle=True)\n",
    "import numpy\nflag = True\nnumpy.load(f, allow_pickle=flag)\n",
    "from numpy import load\nload(f, allow_pickle=1)\n",
    "import torch\ntorch.load(f)\n",
    "import torch\ntorch.load(f, weights_only=False)\n",
    "from torch import load as tl\ntl(f, map_location='cpu')\n",
    "from timm.models import load_checkpoint\nload_checkpoint(m, f, weights_only=False)\n",
    "import yaml\nyaml.load(text)\n",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)\n",
    "import yaml\nyaml.unsafe_load(text)\n",
    "eval(text)\n",
    "exec(code)\n",
    "import builtins\nbuiltins.eval(text)\n",
    "import marshal\nmarshal.loads(b)\n",
    "import shelve\nshelve.open(path)\n",
    "import joblib\njoblib.load(path)\n",
    "import dill\ndill.loads(b)\n",
    "import pandas as pd\npd.read_pickle(path)\n",
    "import torch\ntorch.hub.load('org/repo', 'model')\n",
])
def test_the_scan_finds_each_unsafe_loader(snippet):
    assert findings(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "import pickle\npickle.dump(obj, fh, protocol=2)\nraise pickle.UnpicklingError('x')\n",
    "import numpy as np\nnp.load(f)\nnp.load(f, allow_pickle=False)\n",
    "import torch\ntorch.load(f, map_location='cpu', weights_only=True)\n",
    "import yaml\nyaml.safe_load(text)\nyaml.load(text, Loader=yaml.CSafeLoader)\n",
    "model.eval()\nnet = net.eval().requires_grad_(False)\n",
])
def test_the_scan_passes_safe_code(snippet):
    assert findings(snippet) == []


def _sources() -> list[Path]:
    files = sorted(p for folder in SCANNED for p in (ROOT / folder).rglob("*.py"))
    assert len(files) > 50 and any(p.name == "cifar.py" for p in files)
    return files


def test_no_code_running_deserialiser_anywhere():
    problems = [f for path in _sources()
                for f in findings(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())]
    assert problems == [], "\n".join(problems)


def test_the_restricted_unpickler_is_the_only_one_and_restricts():
    """Exactly one class subclasses an unpickler (the CIFAR one), and it overrides find_class."""
    subclasses = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = _aliases(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(_dotted(b, aliases) in UNPICKLERS for b in node.bases):
                subclasses.append((path.relative_to(ROOT).as_posix(), node.name,
                                   {n.name for n in node.body if isinstance(n, ast.FunctionDef)}))
    assert [(f, c) for f, c, _ in subclasses] == [RESTRICTED]
    assert "find_class" in subclasses[0][2]
