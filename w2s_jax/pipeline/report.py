"""The reports of ``w2s run``: ``results.json`` (:func:`build_results`), ``results.md``
(:func:`results_markdown`) and the chart ``results.png`` (:func:`plot_results`).

:func:`build_results` and :func:`gold_use` read a run through its pipeline ``p``
(:class:`w2s_jax.pipeline.stages.Pipeline`: ``p.cfg``, ``p.manifest(stage)``, ``p.path(...)``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import jax

from w2s_jax.core.config import config_hash
from w2s_jax.models.config import ModelConfig
from w2s_jax.pipeline.fingerprints import STAGE_NAMES
from w2s_jax.train.loop import TrainConfig

__all__ = ["build_results", "gold_use", "results_markdown", "plot_results", "results_figure"]


def _model_info(p, role: str) -> dict:
    """What a role's starting model is: where it came from, its shape and parameter count."""
    spec = getattr(p.cfg, role)
    man = p.manifest(f"{role}_model") or {}
    info: dict[str, Any] = {"source": spec.path or f"preset {spec.preset} (random init, seed {spec.seed})"}
    if role == "weak":
        info["trained_here"] = man.get("trained_here", spec.path is None or not spec.trained)
    model_dir = Path(man["model"]) if man.get("model") else None
    if role == "weak" and spec.path is None and (p.path("weak_model", "init") / "w2s_model.json").is_file():
        model_dir = p.path("weak_model", "init")
    meta_file = model_dir / "w2s_model.json" if model_dir is not None else None
    if meta_file is not None and meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        m = meta.get("model", {})
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        try:
            mc = ModelConfig(**{k: v for k, v in m.items() if k in names})
            info.update(name=mc.name, params=mc.num_params, d_model=mc.d_model, n_layers=mc.n_layers,
                        vocab_size=mc.vocab_size)
        except (TypeError, ValueError):
            pass
        tok = meta.get("tokenizer") or {}
        info["tokenizer"] = "byte-level" if tok.get("type") == "byte" else "the model's own (BPE)"
    return info


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = jax.devices()
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "backend": jax.default_backend(),
            "devices": f"{len(dev)} x {dev[0].device_kind}" if dev else "none", "jax": jax.__version__,
            "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}"}


def _train_summary(t: TrainConfig) -> str:
    length = f"{t.max_steps} steps" if t.max_steps is not None else f"{t.epochs} epoch{'s' if t.epochs != 1 else ''}"
    lora = f", LoRA r={t.lora.rank}" if t.lora is not None else ", full fine-tuning"
    return f"{length}, batch {t.batch_size} x {t.seq_len} tokens, lr {t.lr:g}{lora}"


def build_results(p, rows: list[dict]) -> dict:
    acc = {r["model"]: r["accuracy"] for r in rows}
    weak = acc.get("weak")
    ceiling = acc.get("gold SFT (ceiling)")
    for r in rows:
        if weak is not None and ceiling is not None and ceiling != weak and r["model"] not in ("weak",):
            r["pgr"] = (r["accuracy"] - weak) / (ceiling - weak)
        else:
            r["pgr"] = None
    stage1 = p.manifest("stage1") or {}
    sampling = p.manifest("sampling") or {}
    data = p.manifest("data") or {}
    cfg = p.cfg
    manifests = {s: p.manifest(s) or {} for s in STAGE_NAMES}
    started = [m["started"] for m in manifests.values() if m.get("started")]
    wall = (time.time() - min(started)) if started else None
    cpu = {s: m.get("cpu_seconds") for s, m in manifests.items()}
    if manifests["eval"].get("status") == "running" and p._eval_cpu0 is not None:
        cpu["eval"] = round(time.process_time() - p._eval_cpu0, 2)
    syn = cfg.data.synthetic
    source = cfg.data.source + (f" ({syn.kind}, {syn.min_steps}-{syn.max_steps} steps, numbers up to {syn.max_value})"
                                if cfg.data.source == "synthetic" else "")
    return {
        "name": cfg.name,
        "task": cfg.data.task,
        "config_hash": config_hash(cfg),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": _machine(),
        "models": rows,
        "model_info": {"weak": _model_info(p, "weak"), "strong": _model_info(p, "strong")},
        "training": {"weak": _train_summary(cfg.weak_train), "strong": _train_summary(cfg.strong_train),
                     "stage1": _train_summary(cfg.stage1.train or cfg.strong_train),
                     "stage2": f"{cfg.stage2.train.loss_type}, " + _train_summary(cfg.stage2.train)},
        "seeds": {"data.seed": cfg.data.seed, "weak.seed": cfg.weak.seed, "strong.seed": cfg.strong.seed,
                  "weak_train.seed": cfg.weak_train.seed, "strong_train.seed": cfg.strong_train.seed,
                  "stage1.demo_seed": cfg.stage1.demo_seed, "stage2.seed": cfg.stage2.seed,
                  "stage2.pair_seed": cfg.stage2.pair_seed, "stage2.train.seed": cfg.stage2.train.seed},
        "data": data.get("counts", {}),
        "data_source": source,
        "weak_labels": (p.manifest("weak_labels") or {}).get("counts"),
        "strong_icl_labels": (p.manifest("strong_icl") or {}).get("counts"),
        "n_demos": cfg.stage1.n_demos,
        "stage1": {k: v for k, v in stage1.items() if k.startswith("round")},
        "stage1_train_set": cfg.stage1.train_set,
        "n_samples": cfg.stage2.n_samples,
        "pairs": sampling.get("pair_counts"),
        "pass_at_k": sampling.get("pass_at_k"),
        **gold_use(p),
        # the stage writing this report (eval) is still running: its time so far
        "seconds": {s: manifests[s].get("seconds") if manifests[s].get("status") != "running" or not
                    manifests[s].get("started") else round(time.time() - manifests[s]["started"], 2)
                    for s in STAGE_NAMES},
        "cpu_seconds": cpu,
        "wall_seconds": None if wall is None else round(wall, 1),
    }


def gold_use(p) -> dict:
    """Which demonstrations were used and which stages read train_2 gold (beyond scoring)."""
    icl = p.manifest("strong_icl") or {}
    reads = []
    if icl.get("demos_read_gold"):
        reads.append("strong_icl: demonstrations chosen among gold-correct weak outputs (stage1.demos=correct)")
    if p.cfg.baselines.gold:
        reads.append("gold: the ceiling baseline is trained on train_2 gold solutions")
    return {"demonstrations": {"source": icl.get("demos_source"), "ids": icl.get("demos"),
                               "read_gold": bool(icl.get("demos_read_gold"))},
            "train_2_gold_read_by": reads}


def _fmt(x: Any, pct: bool = True) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{100 * x:.2f}" if pct else f"{x:.3f}"
    return str(x)


def _model_line(info: dict) -> str:
    parts = [str(info.get("source", "-"))]
    if info.get("params"):
        parts.append(f"{info['params'] / 1e6:.2f}M parameters" if info["params"] >= 1e6
                     else f"{info['params'] / 1e3:.0f}K parameters")
    if info.get("d_model"):
        parts.append(f"d={info['d_model']} x {info['n_layers']} layers")
    if info.get("tokenizer"):
        parts.append(f"{info['tokenizer']} tokenizer")
    return "; ".join(parts)


def results_markdown(res: dict) -> str:
    lines = [f"# Results: {res['name']} ({res['task']})", ""]
    mach = res.get("machine") or {}
    if res.get("date") or mach:
        lines += [f"Run finished {res.get('date', '-')} on {mach.get('cpu', '-')} ({mach.get('cpu_cores', '-')} "
                  f"logical cores; JAX {mach.get('jax', '-')} on {mach.get('devices', '-')}).", ""]
    n_test = res["models"][0]["n"] if res["models"] else 0
    lines += [f"## Accuracy on test ({n_test} questions, greedy)", "",
              "| model | accuracy (%) | PGR | n |", "| --- | ---: | ---: | ---: |"]
    for r in res["models"]:
        lines.append(f"| {r['model']} | {_fmt(r['accuracy'])} | {_fmt(r.get('pgr'), pct=False)} | {r['n']} |")
    lines += ["", "PGR = (acc - acc(weak)) / (acc(gold SFT ceiling) - acc(weak)).", ""]
    info = res.get("model_info") or {}
    if info:
        tr = res.get("training") or {}
        lines += ["## What ran", "", "| item | value |", "| --- | --- |"]
        lines.append(f"| weak model | {_model_line(info.get('weak', {}))} |")
        lines.append(f"| weak training (train_1 gold) | {tr.get('weak', '-')} |")
        lines.append(f"| strong model | {_model_line(info.get('strong', {}))} |")
        lines.append(f"| strong SFT: full weak FT, gold | {tr.get('strong', '-')} |")
        lines.append(f"| strong SFT: Stage I | {tr.get('stage1', tr.get('strong', '-'))} |")
        lines.append(f"| Stage II | {tr.get('stage2', '-')} |")
        lines.append(f"| strong ICL | {res.get('n_demos', '-')} demonstrations |")
        lines.append(f"| Stage I training set | {res.get('stage1_train_set', '-')} |")
        lines.append(f"| samples per train_2 question | {res.get('n_samples', '-')} |")
        lines.append(f"| data | {res.get('data_source', '-')} |")
        seeds = res.get("seeds") or {}
        if seeds:
            lines.append("| seeds | " + ", ".join(f"{k}={v}" for k, v in seeds.items()) + " |")
        lines.append(f"| config hash | {res.get('config_hash', '-')} |")
        lines.append("")
    lines += ["## Data", "", "| item | count |", "| --- | ---: |"]
    for k, v in (res.get("data") or {}).items():
        lines.append(f"| {k} | {v} |")
    for key, title in (("weak_labels", "weak labels on train_2"), ("strong_icl_labels", "strong ICL labels")):
        c = res.get(key) or {}
        if c:
            lines.append(f"| {title}: answered / total | {c.get('with_answer')} / {c.get('total')} |")
            lines.append(f"| {title}: accuracy vs gold (%) | {_fmt(c.get('accuracy_vs_gold'))} |")
    for rnd, st in (res.get("stage1") or {}).items():
        lines.append(f"| Stage I {rnd}: kept / total | {st.get('kept')} / {st.get('total')} |")
        lines.append(f"| Stage I {rnd}: kept label accuracy vs gold (%) | {_fmt(st.get('label_accuracy'))} |")
    for k, v in (res.get("pairs") or {}).items():
        lines.append(f"| pairs: {k} | {v} |")
    for k, v in (res.get("pass_at_k") or {}).items():
        lines.append(f"| Stage I sampling {k} on train_2 (%) | {_fmt(v)} |")
    for r in res["models"]:
        for k, v in (r.get("pass_at_k") or {}).items():
            lines.append(f"| {r['model']}: test {k} (%) | {_fmt(v)} |")
    demos = res.get("demonstrations") or {}
    if demos.get("ids") is not None:
        lines += ["", f"ICL demonstrations ({demos.get('source')}): ids {', '.join(str(i) for i in demos['ids'])}."]
    reads = res.get("train_2_gold_read_by") or []
    lines += ["", "train_2 gold read (besides scoring): " + ("; ".join(reads) if reads else "by no stage") + "."]
    secs = {k: v for k, v in (res.get("seconds") or {}).items() if v is not None}
    cpu = res.get("cpu_seconds") or {}
    if secs:
        lines += ["", "## Time per stage", "", "CPU = this process's CPU time, all threads (on a busy machine the "
                  "wall time is longer than the stage's cost).", "",
                  "| stage | wall (s) | CPU (s) |", "| --- | ---: | ---: |"]
        lines += [f"| {k} | {v:.0f} | " + (f"{cpu[k]:.0f}" if cpu.get(k) is not None else "-") + " |"
                  for k, v in secs.items()]
        cpus = [cpu[k] for k in secs if cpu.get(k) is not None]
        lines.append(f"| sum of stages | {sum(secs.values()):.0f} | {round(sum(cpus)) if cpus else '-'} |")
        if res.get("wall_seconds") is not None:
            lines.append(f"| wall, first stage start to report (includes earlier runs when resumed) | "
                         f"{res['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _spread_labels(ys: list[float], gap: float) -> list[float]:
    """Label heights near ``ys`` with at least ``gap`` between neighbours (order kept)."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    out = list(ys)
    for a, b in zip(order, order[1:]):
        if out[b] - out[a] < gap:
            out[b] = out[a] + gap
    return out


def plot_results(res: dict, path: Path) -> None:
    """Accuracy per model (bars, accuracy and PGR above each), the weak model and the gold ceiling as lines."""
    import matplotlib.pyplot as plt

    fig = results_figure(res)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def results_figure(res: dict):
    """The figure of :func:`plot_results` (a matplotlib Figure, not yet saved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["models"]
    names = [r["model"] for r in rows]
    vals = [100 * r["accuracy"] for r in rows]
    acc = dict(zip(names, vals))
    weak, gold = acc.get("weak"), acc.get("gold SFT (ceiling)")
    colors = ["#999999" if n == "weak" else "#228833" if n.startswith("gold") else
              "#cc6677" if n.startswith("full weak") else "#4477aa" for n in names]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.25 * len(names) + 2.0), 4.8))
    x = list(range(len(names)))
    ax.bar(x, vals, color=colors, width=0.65)
    top = max([*vals, 1.0])
    ymax = min(100.0, top) * 1.22 + 4
    for xi, v, r in zip(x, vals, rows):
        label = f"{v:.1f}%"
        if r.get("pgr") is not None and r["model"] not in ("weak", "gold SFT (ceiling)"):
            label += f"\nPGR {r['pgr']:.2f}"
        ax.text(xi, v + ymax * 0.015, label, ha="center", va="bottom", fontsize=8, zorder=3,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0, "alpha": 0.85})
    refs = [(v, f"{lbl} {v:.1f}%", c) for v, lbl, c in ((weak, "weak", "#777777"), (gold, "gold ceiling", "#228833"))
            if v is not None]
    label_ys = _spread_labels([v for v, _, _ in refs], ymax * 0.06)
    for (v, lbl, c), ly in zip(refs, label_ys):
        ax.axhline(v, color=c, linestyle="--", linewidth=1)
        ax.annotate(lbl, xy=(1.0, v), xycoords=("axes fraction", "data"), xytext=(1.01, ly),
                    textcoords=("axes fraction", "data"), va="center", ha="left", fontsize=8, color=c)
    ax.set_ylim(0, ymax)
    ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= 100])
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    n_test = rows[0]["n"] if rows else 0
    strong = ((res.get("model_info") or {}).get("strong") or {}).get("name") or ""
    sub = f"{n_test} test questions" + (f"; strong: {strong}" if strong else "")
    ax.set_title(f"{res['name']} ({res['task']}): {sub}", fontsize=10, pad=10)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.subplots_adjust(right=0.84)
    return fig
