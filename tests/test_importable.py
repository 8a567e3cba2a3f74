"""transformers made importable: a SciPy / scikit-learn that cannot be imported (the H200 image's SciPy, built
for numpy 2, under the numpy<2 that Triton's Python-backend stub needs) is marked absent so that transformers'
T5 loads; working or absent ones are left alone. Each case runs in a fresh interpreter (sys.modules is what changes) with small
stand-in packages first on PYTHONPATH, ahead of any installed SciPy / scikit-learn."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import importlib.util, json, sys
from toprovar.model.importable import hide_unimportable_packages
hidden = hide_unimportable_packages()
imports = {}
for name in ("scipy", "sklearn"):
    try:
        __import__(name)
        imports[name] = True
    except ImportError:
        imports[name] = False
from transformers import T5Config, T5EncoderModel
import torch
enc = T5EncoderModel(T5Config(vocab_size=16, d_model=8, d_kv=2, d_ff=16, num_layers=1, num_heads=4)).eval()
out = enc(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
print(json.dumps({"hidden": hidden, "spec": {n: importlib.util.find_spec(n) is not None for n in ("scipy", "sklearn")}, "imports": imports,
                  "scipy_left": [m for m in sys.modules if m.split(".")[0] == "scipy"], "t5": list(out.shape)}))
"""


ENCODER = """
import json, warnings
import torch
from toprovar.model.text import tiny_text_encoder
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    enc = tiny_text_encoder(16, 32)
feats = enc.encode(["a red square"])
print(json.dumps({"warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
                  "finite": all(bool(torch.isfinite(t.float()).all()) for t in feats if torch.is_tensor(t))}))
"""


def _probe(site: Path | None, code: str = PROBE) -> dict:
    path = [str(ROOT)] + ([str(site)] if site else []) + [os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _package(root: Path, name: str, files: dict[str, str]) -> None:
    for rel, text in files.items():
        f = root / name / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)


SCIPY_NUMPY2 = {"__init__.py": "", "optimize/__init__.py": "from . import _sparse\n",
                "optimize/_sparse.py": "import numpy as np\nnp.long  # numpy<2: AttributeError, as scipy/sparse\n"}
BOTH = {"scipy": True, "sklearn": True}
NONE = {"scipy": False, "sklearn": False}


def test_unimportable_scipy_and_sklearn_are_hidden_and_t5_loads(tmp_path):
    """SciPy of the numpy-2 ABI fails as on the H200 (sklearn with it); afterwards both are absent, T5 runs."""
    _package(tmp_path, "scipy", SCIPY_NUMPY2)
    _package(tmp_path, "sklearn", {"__init__.py": "", "metrics/__init__.py": "import scipy.optimize\n"})
    res = _probe(tmp_path)
    assert sorted(res["hidden"]) == ["scipy", "sklearn"]
    assert res["hidden"]["scipy"].startswith("AttributeError: module 'numpy' has no attribute 'long'")
    assert res["hidden"]["sklearn"].startswith("ModuleNotFoundError: No module named 'scipy.optimize'")
    assert res == {**res, "spec": NONE, "imports": NONE, "scipy_left": ["scipy"], "t5": [1, 3, 8]}


def test_only_the_broken_package_is_hidden(tmp_path):
    """A working SciPy stays; a scikit-learn broken on its own is hidden."""
    _package(tmp_path, "scipy", {"__init__.py": "", "optimize/__init__.py": "linear_sum_assignment = None\n"})
    _package(tmp_path, "sklearn", {"__init__.py": "", "metrics/__init__.py": "raise ImportError('no _cython')\n"})
    res = _probe(tmp_path)
    assert res["hidden"] == {"sklearn": "ImportError: no _cython"}
    assert res == {**res, "spec": {"scipy": True, "sklearn": False}, "imports": {"scipy": True, "sklearn": False},
                   "t5": [1, 3, 8]}


def test_importable_packages_are_left_alone(tmp_path):
    _package(tmp_path, "scipy", {"__init__.py": "", "optimize/__init__.py": "linear_sum_assignment = None\n"})
    _package(tmp_path, "sklearn", {"__init__.py": "", "metrics/__init__.py": "roc_curve = None\n"})
    res = _probe(tmp_path)
    assert res == {**res, "hidden": {}, "spec": BOTH, "imports": BOTH, "t5": [1, 3, 8]}


def test_this_environment_is_left_alone():
    """No stand-ins: whatever this environment has (absent or working) is neither hidden nor changed."""
    import importlib.util
    here = {n: importlib.util.find_spec(n) is not None for n in ("scipy", "sklearn")}
    res = _probe(None)
    assert res == {**res, "hidden": {}, "spec": here, "imports": here, "t5": [1, 3, 8]}


def test_text_encoder_loads_under_a_broken_scipy_with_a_warning(tmp_path):
    """The real path (toprovar's T5 text encoder) with the H200's failure: it builds, runs, and warns once per
    hidden package, naming it and numpy's version."""
    _package(tmp_path, "scipy", SCIPY_NUMPY2)
    _package(tmp_path, "sklearn", {"__init__.py": "", "metrics/__init__.py": "import scipy.optimize\n"})
    res = _probe(tmp_path, ENCODER)
    assert res["finite"]
    assert [w.split(" cannot", 1)[0] for w in res["warnings"]] == ["scipy", "sklearn"], res["warnings"]
    assert all("marked absent so that transformers loads" in w and "numpy " in w for w in res["warnings"])
