"""benchmarks/compare.py (the one-command comparison) and the peers' calibration-free quantisers it runs
(bitsandbytes NF4, HQQ): report assembly from stored rows, format bit counts, and the peer script on a
tiny model in the peers environment."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, make_tiny, peers_python

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import compare  # noqa: E402


def _row(name, tool, ppl, bpw, **kw):
    return {"row": name, "tool": tool, "ppl": ppl, "bits_per_weight": bpw, "compress_seconds": 1.0,
            "compress_cpu_seconds": 2.0, "peak_rss_mb": 10, "date": "2026-12-02 04:00", "scored_tokens": 20440, **kw}


def test_report_from_stored_rows(tmp_path):
    rows = tmp_path / "compare_rows"
    rows.mkdir()
    stored = [_row("dense", "dense fp32", 13.9, 32.0), _row("gptq-w4g64", "tensorpress", 15.8, 4.3125),
              _row("hqq-w4g64", "HQQ", 18.2, 4.5, versions={"hqq": "0.2.8.post1", "torch": "2.13.0+cpu"}),
              _row("svdllm-p80", "tensorpress", 82.3, 25.58)]
    for r in stored:
        (rows / f"{r['row']}.json").write_text(json.dumps(r))
    assert compare.main(["--report-only", "--out", str(tmp_path), "--note", "a run condition"]) == 0
    md = (tmp_path / "compare.md").read_text()
    table = [l for l in md.splitlines() if l.startswith("| ") and not l.startswith("| family")]
    assert [l.split(" | ")[1] for l in table] == ["dense", "gptq-w4g64", "hqq-w4g64", "svdllm-p80"]
    assert "| Quantisation | hqq-w4g64 | HQQ | 18.200 | 4.50 |" in md
    assert "a run condition" in md and "not run yet:" in md and "bnb-nf4" in md.split("not run yet:")[1]
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["meta"]["versions"]["hqq"] == "0.2.8.post1" and len(data["rows"]) == 4
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert data["plots"] == []
    else:
        assert data["plots"] == ["compare-bits.png", "compare-lowrank.png"]
        for p in data["plots"]:
            assert (tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({p})" in md


def test_readme_block_is_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nbefore\n{compare.README_BEGIN}\nold table\n{compare.README_END}\nafter\n")
    assert compare.update_readme(["new", "table"], readme)
    assert readme.read_text() == f"# x\nbefore\n{compare.README_BEGIN}\nnew\ntable\n{compare.README_END}\nafter\n"
    plain = tmp_path / "other.md"
    plain.write_text("no markers\n")
    assert not compare.update_readme(["t"], plain) and plain.read_text() == "no markers\n"


def test_peer_format_bits(tmp_path):
    res = compare.with_format_bits("llmc-gptq-w3g64", {"ppl": 1.0}, tmp_path)
    assert res["bits_per_weight"] == 3 + 16 / 64
    model = make_tiny("llama", layers=2)
    model.save_pretrained(tmp_path / "m")
    res = compare.with_format_bits("gptqmodel-w4g64+eora-r32", {"settings": {"QuantizeConfig": {
        "bits": 4, "group_size": 64}}, "rank": 8}, tmp_path / "m")
    # hidden 64, intermediate 96, 4 heads / 2 kv heads of 16: q,o 64x64; k,v 32x64; gate,up 96x64; down 64x96
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64), (64, 96)]
    adapter = sum(8 * (o + i) * 16 for o, i in shapes) / sum(o * i for o, i in shapes)
    assert res["bits_per_weight"] == pytest.approx(4 + 20 / 64 + adapter, rel=1e-12)
    stored = {"bits_per_weight": 5.0}
    assert compare.with_format_bits("llmc-gptq-w4g64", dict(stored), tmp_path)["bits_per_weight"] == 5.0


def test_every_row_has_a_runner():
    import lowrank
    import pruning
    import svdquant
    for name, (family, runner, arg) in compare.ROWS.items():
        assert family in compare.FAMILY_TITLES
        if runner == "lowrank":
            assert name in lowrank.ROWS
        elif runner == "pruning":
            assert name in pruning.ROWS
        elif runner == "svdquant":
            assert name in svdquant.ROWS and (ROOT / "configs" / f"{name}.yaml").is_file()
        elif runner == "tp":
            assert (ROOT / "configs" / f"{arg}.yaml").is_file()
        else:
            assert runner in ("llmc-gptq", "quantlib")


def _quant_libs(d: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """benchmarks/peers/quant_libs.py in the peers environment on the tiny model's tokens."""
    env = {**os.environ, "TP_ROOT": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([peers_python(), str(ROOT / "benchmarks" / "peers" / "quant_libs.py"),
                           str(d / "tokens.safetensors"), str(d / "model"), str(out), *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from safetensors.torch import save_file
    import transformers as tf
    d = tmp_path_factory.mktemp("quantlibs")
    # every input width a multiple of 64: bitsandbytes' CPU 4-bit matmul needs whole blocks per row
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=256)).eval()
    model.save_pretrained(d / "model")
    windows = torch.randint(0, VOCAB, (2, 128), generator=torch.Generator().manual_seed(3))
    save_file({"eval": windows}, str(d / "tokens.safetensors"))
    from tensorpress.evaluate import perplexity
    return d, perplexity(model, windows, progress=False)["ppl"]


@pytest.mark.parametrize("lib,bits", [("bnb", 4), ("hqq", 4), ("hqq", 3)])
def test_peer_quantiser_on_a_tiny_model(tiny, lib, bits):
    """The peer really quantised every decoder linear (outputs moved, a little) and the stored bits are
    the format's: NF4 4 + 32/64 (fp32 absmax per 64), HQQ 4-bit 4 + 2·16/64; HQQ 3-bit packs 10 codes
    per 32-bit word (3.2 bits, plus padding of the packed rows) + 2·16/64."""
    d, dense_ppl = tiny
    out = d / f"{lib}{bits}.json"
    r = _quant_libs(d, out, "--lib", lib, "--bits", str(bits), "--threads", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    if bits == 4:
        assert res["bits_per_weight"] == pytest.approx(4.5, rel=1e-12)
    else:
        assert 3.2 + 0.5 <= res["bits_per_weight"] < 4.5
    assert math.isfinite(res["ppl"]) and res["ppl"] != dense_ppl
    assert abs(math.log(res["ppl"] / dense_ppl)) < 0.05
    assert res["scored_tokens"] == 2 * 127


def test_bnb_refuses_settings_it_does_not_have(tiny):
    d, _ = tiny
    r = _quant_libs(d, d / "x.json", "--lib", "bnb", "--bits", "3")
    assert r.returncode != 0 and "4 bits and a block of 64 only" in r.stderr and not (d / "x.json").exists()
