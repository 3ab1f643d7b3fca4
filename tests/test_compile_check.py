"""tpu_specs (slice names, topologies) and `w2s compile-check` (AOT fit check for a TPU topology)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import pytest

from w2s_jax.cli import app
from w2s_jax.cli import compile_check as CLI
from w2s_jax.core.errors import UserError
from w2s_jax.tools import compile_check as C
from w2s_jax.tools import tpu_specs as T

ROOT = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(not T.libtpu_available(), reason="libtpu not installed (pip install libtpu)")

TINY = """
model: tiny
model_overrides: {n_layers: 2}
remat: full
param_dtype: float32
dtype: bfloat16
mesh: {data: 1, fsdp: -1}
sft: {batch_size: 8, seq_len: 64}
dpo: {batch_size: 4, seq_len: 64, reference: precompute}
generation: {batch_size: 8, prompt_len: 16, max_new_tokens: 16}
"""


@pytest.fixture
def tiny_cfg(tmp_path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY)
    return p


# ----------------------------------------------------------------------------- tpu_specs


@pytest.mark.parametrize(
    "name, chips, topo, hosts, gcloud",
    [
        ("v5p-128", 64, "v5p:4x4x4", 16, "v5p-128"),
        ("v5p-64", 32, "v5p:2x4x4", 8, "v5p-64"),
        ("v5p-8", 4, "v5p:2x2x1", 1, "v5p-8"),
        ("v5p-256", 128, "v5p:4x4x8", 32, "v5p-256"),
        ("v4-32", 16, "v4:2x2x4", 4, "v4-32"),
        ("v5litepod-16", 16, "v5e:4x4", 4, "v5litepod-16"),
        ("v5e-16", 16, "v5e:4x4", 4, "v5litepod-16"),
        ("v5litepod-8", 8, "v5e:2x4", 1, "v5litepod-8"),
        ("v5litepod-1", 1, "v5e:1x1", 1, "v5litepod-1"),
        ("v6e-8", 8, "v6e:2x4", 1, "v6e-8"),
        ("v6e-256", 256, "v6e:16x16", 64, "v6e-256"),
        ("v5e:2x2", 4, "v5e:2x2", 1, "v5litepod-4"),
        ("v5p:4x4x8", 128, "v5p:4x4x8", 32, "v5p-256"),
    ],
)
def test_parse_slice(name, chips, topo, hosts, gcloud):
    sl = T.parse_slice(name)
    assert (sl.num_chips, sl.topology_name, sl.num_hosts, sl.accelerator_type) == (chips, topo, hosts, gcloud)


@pytest.mark.parametrize("bad", ["v5p-127", "v7-8", "v5p:4x4", "v5e-12", "tpu"])
def test_parse_slice_rejects(bad):
    with pytest.raises(UserError):
        T.parse_slice(bad)


def test_chip_table():
    assert T.chip("v5p").hbm_gib == 95 and T.chip("v5p").peak_bf16_flops == 459e12
    assert T.chip("v5litepod") is T.TPU_CHIPS["v5e"]
    assert T.chip("h100").peak_bf16_flops == 989e12
    for spec in [*T.TPU_CHIPS.values(), *T.GPUS.values()]:
        assert spec.hbm_bytes > 0 and spec.peak_bf16_flops > 1e14 and spec.hbm_bandwidth > 5e11
    assert T.chip_for_device("TPU v5 lite") is T.TPU_CHIPS["v5e"]
    assert T.chip_for_device("NVIDIA H100 80GB HBM3") is T.GPUS["h100-sxm"]
    assert T.chip_for_device("cpu") is None
    with pytest.raises(UserError):
        T.chip("v9")


# ----------------------------------------------------------------------------- config


def test_config_strict(tiny_cfg):
    cfg = C.load_check_config(tiny_cfg, ["generation.batch_size=16", "sft.lora={rank: 8}"])
    assert cfg.generation.batch_size == 16 and cfg.sft.lora.rank == 8 and cfg.dpo.lora is None
    with pytest.raises(UserError, match="did you mean `sft.seq_len`"):
        C.load_check_config(tiny_cfg, ["sft.seq_lenn=3"])
    with pytest.raises(UserError, match="generation.batchsize"):
        C.load_check_config(tiny_cfg, ["generation.batchsize=3"])
    with pytest.raises(UserError, match="stage"):
        C.load_check_config(tiny_cfg, ["stages=[sft, rl]"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "tpu").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = C.load_check_config(path)
    assert cfg.model == "llama2-70b" and cfg.sft.seq_len == 1024 and cfg.dpo.seq_len == 1024


# ----------------------------------------------------------------------------- compile


def _check_report(rep: C.Report, n_chips: int):
    assert [s.stage for s in rep.stages] == list(C.STAGES)
    assert rep.num_chips == n_chips
    for s in rep.stages:
        assert s.ok, s.error
        assert s.arguments > 0 and s.total >= s.arguments + s.temporaries - s.aliased
        assert s.fits and s.total <= s.hbm
        assert s.flops_analytic > 0 and s.time_50 == pytest.approx(s.flops_analytic / (0.5 * rep.peak_flops_per_chip))
        assert s.tokens > 0
    sft = rep.stages[0]
    # the analytic estimate is per chip: 6N per token (full fine-tuning) plus attention, over the chips
    n = rep.num_params
    assert sft.flops_analytic >= 6 * n * sft.tokens / n_chips


def _devices_for(topology: str):
    """Compile-only TPU devices when libtpu is installed, else as many simulated CPU devices."""
    if T.libtpu_available():
        return None
    return jax.devices()[: T.parse_slice(topology).num_chips]


@pytest.mark.skipif(T.libtpu_available(), reason="covered by the TPU-topology test")
def test_compile_on_cpu_devices(tiny_cfg):
    """Without libtpu the same targets compile on simulated CPU devices."""
    cfg = C.load_check_config(tiny_cfg)
    rep = C.check(cfg, "v5e:2x2", devices=jax.devices()[:4], xla_costs=False)
    _check_report(rep, 4)
    text = C.format_report(rep)
    assert "| sft |" in text and "| decode |" in text and text.endswith("FITS")


def test_lora_accumulation_and_reference(tiny_cfg):
    """LoRA SFT with gradient accumulation and LoRA DPO with the adapters-off reference."""
    cfg = C.load_check_config(tiny_cfg, ["sft.lora={rank: 4}", "dpo.lora={rank: 4}", "dpo.reference=lora_off",
                                         "param_dtype=bfloat16", "sft.grad_accum=2", "stages=[sft, dpo]"])
    rep = C.check(cfg, "v5e:2x2", devices=_devices_for("v5e:2x2"), xla_costs=False)
    assert [s.stage for s in rep.stages] == ["sft", "dpo"] and all(s.ok and s.fits for s in rep.stages)
    assert "2 x 8 rows" in rep.stages[0].detail and "LoRA r=4" in rep.stages[0].detail
    assert "reference: lora_off" in rep.stages[1].detail
    n = rep.num_params
    assert rep.stages[0].flops_analytic >= 4 * n * rep.stages[0].tokens / 4  # LoRA: ~4N per token


def test_run_config_is_accepted():
    """A `w2s run` config: strong model, strong_train (SFT), stage2.train (DPO), generation, mesh."""
    import yaml

    path = ROOT / "w2s_jax" / "configs" / "smoke.yaml"
    run = yaml.safe_load(path.read_text())
    cfg = C.load_check_config(path, ["strong_train.batch_size=32", "generation.max_prompt_len=200"])
    assert cfg.model == run["strong"]["preset"]
    assert cfg.model_overrides["d_model"] == run["strong"]["overrides"]["d_model"]
    assert cfg.sft.batch_size == 32 and cfg.sft.seq_len == run["strong_train"]["seq_len"]
    assert cfg.dpo.loss_type == run["stage2"]["train"]["loss_type"]
    assert cfg.generation.batch_size == run["generation"]["batch_size"] and cfg.generation.prompt_len == 200
    assert cfg.generation.max_new_tokens == run["generation"]["max_new_tokens"] and cfg.mesh.data == -1


@needs_libtpu
def test_compile_for_tpu_topology(tiny_cfg, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = CLI.main([str(tiny_cfg), "--topology", "v5litepod-4", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "v5litepod-4 = v5e:2x2: 4 chips" in text and "FITS" in text
    data = json.loads(out.read_text())
    assert data["fits"] and data["chip"] == "v5e" and data["hbm_per_chip"] == 16 * 2**30
    rep = C.Report(**{**{k: v for k, v in data.items() if k != "fits"},
                      "stages": [C.StageReport(**s) for s in data["stages"]]})
    _check_report(rep, 4)
    for s in rep.stages:  # per-layer extrapolated XLA costs are present and of the model estimate's order
        assert s.flops_compiled and s.bytes_accessed and s.time_hbm
        if s.stage != "insert":  # (insert has no model FLOPs: a cache copy and the first token's sampling)
            assert 0.3 < s.flops_compiled / s.flops_analytic < 5, s
    assert "new tokens/s" in rep.stages[-1].detail


@needs_libtpu
def test_does_not_fit_exits_nonzero(tmp_path, capsys):
    p = tmp_path / "big.yaml"
    # 13B parameters with fp32 Adam: ~200 GiB of state on 4 x 16 GiB chips
    p.write_text("model: llama2-13b\nsft: {seq_len: 256, batch_size: 4}\nstages: [sft]\nmesh: {fsdp: -1}\n")
    rc = CLI.main([str(p), "--topology", "v5litepod-4", "--no-xla-costs"])
    text = capsys.readouterr().out
    assert rc == 1 and "DOES NOT FIT" in text and "| sft |" in text


def test_command_module():
    """`w2s compile-check` runs the cli module, whose parser hands its options to the library entry."""
    assert app.COMMANDS["compile-check"][0] == CLI.__name__
    with pytest.raises(SystemExit) as e:
        CLI.main(["--help"])
    assert e.value.code == 0


def test_bytes_math():
    assert math.isclose(T.parse_slice("v5p-128").hbm_bytes_total / 2**30, 64 * 95)


def _hlo(compiled) -> str:
    """Optimized HLO without source locations, instruction numbers and argument layout annotations (the
    Sampler's arguments are arrays placed on one device, compile-check's abstract ones on the mesh)."""
    import re

    text = re.sub(r", metadata=\{[^}]*\}", "", compiled.as_text())
    text = re.sub(r", sharding=\{[^}]*\}|, frontend_attributes=\{xla.sdy.sharding=\"[^\"]*\"\}", "", text)
    lines = [ln for ln in text.splitlines()[1:] if not re.match(r"^\d+ ", ln)
             and ln.strip() not in ("FileNames", "FunctionNames", "FileLocations", "StackFrames")]
    return re.sub(r"\.\d+\b", "", "\n".join(lines))


def test_generation_targets_are_the_engine_programs(tmp_path):
    """compile-check's prefill, insert and decode targets compile to the programs a Sampler compiles and
    runs for the same generation shape (sampling at T = 1, one prompt bucket, no shared prefix)."""
    import numpy as np

    from w2s_jax.infer.sampler import ProgramCache, SampleConfig, Sampler
    from w2s_jax.models.params import init_params
    from w2s_jax.parallel.sharding import make_mesh

    p = tmp_path / "gen.yaml"
    p.write_text("model: tiny\nmodel_overrides: {n_layers: 2}\ndtype: float32\nparam_dtype: float32\n"
                 "generation: {batch_size: 4, prompt_len: 16, max_new_tokens: 8, param_dtype: float32}\n"
                 "stages: [prefill, insert, decode]\n")
    cfg = C.load_check_config(p)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    targets = {t.name: t for t in C.build_targets(cfg, mesh, mesh)}
    assert list(targets) == ["prefill", "insert", "decode"]
    mcfg = cfg.model_config(remat="none")
    sampler = Sampler(init_params(mcfg, jax.random.PRNGKey(0)), mcfg, mesh=mesh, programs=ProgramCache(),
                      cpu_kernels=False)
    rng = np.random.default_rng(0)
    prompts = [[int(3 + i)] + [int(t) for t in rng.integers(3, 200, 15)] for i in range(4)]
    sampler.generate(prompts, SampleConfig(max_new_tokens=8, temperature=1.0, batch_size=4, prompt_buckets=(16,)),
                     progress=False)
    ran = {k[0]: prog for k, prog in sampler._programs.items() if k[0] in targets}
    assert set(ran) == set(targets)
    for name, t in targets.items():
        compiled = t.fn.lower(*t.args).compile(compiler_options=t.compiler_options or None)
        assert _hlo(compiled) == _hlo(ran[name]), name
