"""UniQL masked recovery fine-tuning (docs: lowrank-quant.md §7.8): LoRA under the loader's masks,
best epoch by held-out loss, merged, then quantised with the stored sorting data."""
from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, make_tiny
from tensorpress import elastic
from tensorpress.compress.apply import compress_model
from tensorpress.compress.recovery import LoRALinear, RecoverySettings, rate_weights, training_rates
from tensorpress.errors import TensorpressError
from tensorpress.nn.elastic import META_KEY
from tensorpress.recipe import Recipe

TINY = {"group_size": 32, "head_grid": 4, "mlp_grid": 32}


def recipe(recovery=None, **kw):
    st = {"method": "uniql", **TINY, **kw}
    if recovery is not None:
        st["recovery"] = recovery
    return Recipe.load({"name": "uniql-ft-test", "stages": [st]})


def skewed(n, L=32, seed=0):
    """Sequences over 8 of the vocabulary's tokens: a signal a LoRA adapter can learn quickly. The
    random tiny model starts near ln(VOCAB) = 5.77 nats; its final norm and small lm_head cap what any
    adapter can reach at about 5.35 (measured: the same plateau for ranks 8 and 32, lr 1e-2 to 3e-2)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(99))[:8]
    return pool[torch.randint(0, 8, (n, L), generator=g)]


def masked_loss(model, ids, rate):
    plan = elastic.read_plan(model)
    handles = elastic.mask_sizes(model, plan, elastic.allocate(plan, rate))
    try:
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)
    finally:
        for h in handles:
            h.remove()


def test_lora_wrapper_is_a_no_op_at_init_and_merges_exactly():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16)
    w = LoRALinear(base, 4, 8.0, 0.0, torch.Generator().manual_seed(1))
    x = torch.randn(5, 24)
    assert torch.equal(w(x), base(x))                          # B = 0: exactly the base
    with torch.no_grad():
        w.lora_B.normal_()
    y = w(x)
    merged = torch.nn.Linear(24, 16)
    merged.load_state_dict(base.state_dict())
    with torch.no_grad():
        merged.weight += w.delta().float()
    assert (merged(x) - y).abs().max() < 1e-5 * y.abs().max()
    assert (y - base(x)).abs().max() > 1e-2                    # the adapter does change the output


def test_rate_sampling_and_defaults():
    s = RecoverySettings.parse({})
    rates = training_rates(s, 0.35)
    assert rates == [0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05]    # largest first: ascending keep ratio
    p = rate_weights(len(rates))
    assert p.sum() == pytest.approx(1.0)
    assert all(p[i] / p[i + 1] == pytest.approx(torch.tensor(0.1).exp()) for i in range(len(p) - 1))
    assert training_rates(RecoverySettings.parse({"rates": [0.1, 0.3, 0.1]}), 0.5) == [0.3, 0.1]


@pytest.mark.parametrize("fam", ["llama", "qwen2"])
def test_recovery_lowers_the_masked_loss_and_the_checkpoint_slices(fam, tmp_path):
    import tensorpress as tp
    calib, test = skewed(24, seed=1), skewed(8, seed=2)
    plain = make_tiny(fam, seed=3)
    compress_model(plain, recipe(quantizer="rtn"), calib, progress=False)
    ft = make_tiny(fam, seed=3)
    recs = compress_model(ft, recipe({"epochs": 2, "lr": 1e-2, "batch_size": 2, "rates": [0.35, 0.15]},
                                     quantizer="rtn"), calib, progress=False)
    assert len(recs) == 14 and all(r.methods == ["uniql"] for r in recs)
    rep = ft.tensorpress_recovery
    assert rep["kept_epoch"] >= 1 and rep["heldout_loss_after"] < rep["heldout_loss_before"] - 0.2
    # the quantised fine-tuned model beats the quantised sorted one on unseen text, at the trained
    # rates and between them
    for rate in (0.15, 0.25, 0.35):
        assert masked_loss(ft, test, rate) < masked_loss(plain, test, rate) - 0.2
    # a standard UniQL checkpoint: the stored metadata carries this quantiser; loaded at a rate it
    # computes what the masked model computes
    plan = elastic.read_plan(ft)
    assert plan.settings["quantizer"] == "rtn" and plan.settings["bits"] == 4
    p = tmp_path / "ckpt"
    tp.save(ft, p)
    sliced, full = tp.load(p, prune_rate=0.25), tp.load(p)
    fp = elastic.read_plan(full)
    handles = elastic.mask_sizes(full, fp, elastic.allocate(fp, 0.25))
    with torch.no_grad():
        a, b = sliced(test[:2]).logits, full(test[:2]).logits
    for h in handles:
        h.remove()
    assert (a - b).abs().max() < 1e-4 * b.abs().max()


def test_channels_pruned_at_every_training_rate_are_left_untouched():
    calib = skewed(16, seed=4)
    ref = make_tiny("llama", seed=5)
    compress_model(ref, recipe(quantizer="none"), calib, progress=False)          # sorted only
    ft = make_tiny("llama", seed=5)
    compress_model(ft, recipe({"epochs": 2, "lr": 1e-2, "rates": [0.35]}, quantizer="none"), calib, progress=False)
    assert ft.tensorpress_recovery["kept_epoch"] >= 1
    plan = elastic.read_plan(ft)
    sizes = elastic.allocate(plan, 0.35)
    rows, cols = elastic.pruning_masks(plan, sizes), elastic.input_masks(plan, sizes)
    changed = 0
    for i in range(len(ft.model.layers)):
        for local in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            a = ft.model.layers[i].get_submodule(local).weight
            b = ref.model.layers[i].get_submodule(local).weight
            # the gate's rows follow the up mask (act(gate)·up is zero where up is masked)
            rkey = f"{i}.{local}" if local != "mlp.gate_proj" else f"{i}.mlp.up_proj"
            if rkey in rows:
                dead = rows[rkey] == 0
                assert torch.equal(a[dead], b[dead]), local
                changed += int((a[~dead] != b[~dead]).any())
            else:
                dead = cols[f"{i}.{local}"] == 0
                assert dead.any()
                assert torch.equal(a[:, dead], b[:, dead]), local
                changed += int((a[:, ~dead] != b[:, ~dead]).any())
    assert changed == 14                                       # every linear was trained where it is kept


def test_no_epoch_better_keeps_the_sorted_weights():
    calib = skewed(8, seed=6)
    ref = make_tiny("llama", seed=7)
    compress_model(ref, recipe(quantizer="none"), calib, progress=False)
    ft = make_tiny("llama", seed=7)
    # lr so large the held-out loss rises: nothing is merged
    compress_model(ft, recipe({"epochs": 1, "lr": 0.9, "rates": [0.25]}, quantizer="none"), calib, progress=False)
    rep = ft.tensorpress_recovery
    assert rep["epochs"][0]["heldout_loss"] >= rep["heldout_loss_before"] and rep["kept_epoch"] == 0
    for a, b in zip(ft.model.layers.parameters(), ref.model.layers.parameters()):
        assert torch.equal(a, b)
    m = ft.model.layers[0].self_attn.q_proj
    assert META_KEY in m.config()


def test_bad_recovery_settings_fail_clearly(tmp_path):
    for bad, msg in (({"epoch": 2}, "unknown recovery setting"), ({"epochs": 0}, "recovery.epochs"),
                     ({"rates": [0.6]}, "exceed"), ({"rates": []}, "non-empty"), ({"lr": -1}, "recovery.lr"),
                     ("yes", "mapping")):
        with pytest.raises(TensorpressError, match=msg):
            recipe(bad)
    two = Recipe.load({"name": "two", "stages": [{"method": "uniql", **TINY, "recovery": {}},
                                                 {"method": "eora", "rank": 4, "targets": ["mlp.down_proj"]}]})
    with pytest.raises(TensorpressError, match="only stage"):
        compress_model(make_tiny("llama"), two, skewed(4), progress=False)
    from tensorpress.compress.apply import plan
    from tensorpress.compress.streaming import check_streamable
    r = recipe({})
    with pytest.raises(TensorpressError, match="cannot be streamed"):
        check_streamable(plan(make_tiny("llama"), r), r)
    with pytest.raises(TensorpressError, match="at least 2"):
        compress_model(make_tiny("llama"), recipe({}), skewed(1), progress=False)


def test_cli_compress_with_recovery_reports_it(tiny_dir, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    rec = tmp_path / "uniql-ft-tiny.yaml"
    rec.write_text("name: uniql-ft-tiny\nstages:\n  - method: uniql\n    group_size: 32\n    head_grid: 4\n"
                   "    mlp_grid: 32\n    quantizer: gptq\n    recovery: {epochs: 1, rates: [0.25]}\n")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(root), "TENSORPRESS_DEBUG": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "tensorpress", "compress", str(tiny_dir / "model"), "-r", str(rec),
                        "-o", str(out), "--calib", str(tiny_dir / "calib.txt"), "--samples", "8", "--seq-len", "32",
                        "--no-eval", "--threads", "1", "-q"], capture_output=True, text=True, env=env, cwd=root,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["recovery"]["rates"] == [0.25] and len(report["recovery"]["epochs"]) == 1
    assert len((out / "layers.jsonl").read_text().splitlines()) == 14     # the quantisation pass's records
    import tensorpress as tp
    assert tp.load(out, prune_rate=0.25).tensorpress_pruning["rate"] == 0.25


def test_scoring_rates_span_the_training_rates():
    from tensorpress.compress.recovery import scoring_rates
    r = [0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05]
    assert scoring_rates(r) == [0.4, 0.3, 0.15, 0.05]
    assert scoring_rates(r[:3]) == r[:3]


def test_shipped_recipe_is_uniql_w4_plus_recovery():
    ft, base = Recipe.load("uniql-w4-ft").to_dict(), Recipe.load("uniql-w4").to_dict()
    rec = ft["stages"][0].pop("recovery")
    base["stages"][0].pop("recovery")
    assert ft["stages"] == base["stages"] and ft["calibration"] == base["calibration"]
    s = RecoverySettings.parse(rec)
    assert (s.rank, s.alpha, s.dropout, s.lr) == (8, 16, 0.05, 1e-4)           # docs §7.8
    assert training_rates(s, 0.5) == [0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05]


def test_finetuning_restores_the_models_flags_and_a_failure_leaves_the_weights(monkeypatch):
    from tensorpress.compress import recovery
    m = make_tiny("llama", seed=8)
    compress_model(m, recipe(quantizer="none"), skewed(8), progress=False)
    # the sorted model (SortedDenseLinear modules here; compress_with_recovery hands over plain linears)
    plan = elastic.read_plan(m)
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    rep = recovery.masked_finetune(m, plan, skewed(8, seed=9), RecoverySettings.parse({"epochs": 1, "lr": 1e-2}),
                                   progress=False)
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags and not m.training
    assert rep["steps"] == 2 and len(rep["epochs"]) == 1
    calls = []

    def boom(model, ids):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("interrupted")
        return model(input_ids=ids, labels=ids).loss
    monkeypatch.setattr(recovery, "_loss", boom)
    mid = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(RuntimeError, match="interrupted"):
        recovery.masked_finetune(m, plan, skewed(8, seed=9), RecoverySettings.parse({"epochs": 1, "lr": 1e-2}),
                                 progress=False)
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert all(torch.equal(p, mid[n]) for n, p in m.named_parameters())     # untouched, no adapters left
    assert not any(isinstance(x, LoRALinear) for x in m.modules())
    assert set(before) == set(mid)
