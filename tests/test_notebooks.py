"""notebooks/model.ipynb runs top to bottom on CPU: a model (the tiny preset here), its forward pass and
generation, one SFT and one DPO step on a mesh of the 8 simulated devices, save/convert/load with equal
logits, and the pipeline on a reduced tiny config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# the pipeline at the end of the notebook: the byte-level config at the size of tests/test_pipeline.py
TINY = [
    "data.n_train_1=96",
    "data.n_train_2=48",
    "data.n_test=24",
    "data.synthetic={kind: arith, min_steps: 1, max_steps: 1, max_value: 4, ops: [add]}",
    "strong.pretrain.synthetic={kind: arith, min_steps: 1, max_steps: 1, max_value: 4, ops: [add]}",
    "weak.overrides={d_model: 32, n_layers: 1, n_heads: 2, n_kv_heads: 2, head_dim: 16, d_ff: 64, max_seq_len: 1024}",
    "strong.overrides={d_model: 32, n_layers: 2, n_heads: 2, n_kv_heads: 1, head_dim: 16, d_ff: 64, max_seq_len: 1024}",
    "strong.pretrain.examples=48",
    "strong.pretrain.few_shot_max=1",
    "stage1.n_demos=1",
    "strong.pretrain.train={lr: 1.0e-2, epochs: 2, batch_size: 4, seq_len: 256, progress: false}",
    "weak_train={lr: 1.0e-2, epochs: 2, batch_size: 4, seq_len: 128, progress: false}",
    "strong_train={lr: 1.0e-3, epochs: 1, batch_size: 4, seq_len: 128, progress: false}",
    "stage2.train={loss_type: sigmoid, beta: 0.1, lr: 1.0e-4, epochs: 1, batch_size: 4, seq_len: 128, progress: false}",
    "stage2.n_samples=2",
    "stage1.demos=train_1_gold",
    "stage1.variants=[hybrid]",
    "eval_samples=2",
    "generation.max_new_tokens=16",
    "mesh.data=1",
]


@pytest.mark.slow
def test_model_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("W2S_NOTEBOOK_MODEL", "tiny")
    monkeypatch.setenv("W2S_NOTEBOOK_OVERRIDES", ";".join(TINY))
    monkeypatch.setenv("W2S_NOTEBOOK_OUT", str(tmp_path / "run"))
    nb = nbformat.read(REPO / "notebooks" / "model.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "embed sharding" in text and "'loss'" in text and "rewards/margins" in text
    diff = re.search(r"max \|logit difference\|: (\S+)", text)
    assert diff and float(diff.group(1)) < 1e-4  # the converted Hugging Face model gives the same logits
    assert (tmp_path / "run" / "results.md").is_file() and "Stage II" in text
