"""Calibration-free 4-bit (and 3-bit) weight quantisers of other libraries on the protocol, run in the
peers environment: bitsandbytes NF4 (through transformers' ``BitsAndBytesConfig``, the way its users
load a model) and HQQ (``HQQLinear`` on every decoder linear, the library's own API).

    python quant_libs.py TOKENS MODEL_DIR OUT_JSON --lib bnb|hqq [--bits 4] [--group-size 64] [--threads 2]

TOKENS: safetensors with ``eval [w, 512]`` token ids (the protocol windows every tool is scored on;
``calib`` is ignored: neither method calibrates). Perplexity is tensorpress's protocol function
(plain PyTorch, imported from ``TP_ROOT``), so every row of the comparison is scored by the same code.
The JSON has the quantisation wall time (bnb: the quantising load minus nothing else: bnb quantises
while loading; HQQ: the ``HQQLinear`` replacements), peak RSS, stored bits per weight of the decoder
linears and perplexity. lm_head and embeddings stay dense, as in every other row.
"""
import argparse
import importlib.metadata as md
import json
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, os.environ.get("TP_ROOT", os.path.join(os.path.dirname(__file__), "..", "..")))
from tensorpress.evaluate import perplexity  # noqa: E402
from tensorpress.modeling import decoder_layers, set_submodule, target_linears  # noqa: E402


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bnb_nf4(model_dir: str, bits: int, group: int):
    """NF4 with bitsandbytes' defaults through transformers (block 64, fp32 absmax, no double quant)."""
    if bits != 4 or group != 64:
        raise SystemExit("bitsandbytes NF4 has 4 bits and a block of 64 only")
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, dtype=torch.float32,
                                                 device_map="cpu").eval()
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    stored = weights = 0
    for layer in decoder_layers(model):
        for name, m in target_linears(layer).items():
            if not isinstance(m, bnb.nn.Linear4bit):
                raise SystemExit(f"{name} was not quantised by bitsandbytes ({type(m).__name__})")
            qs = m.weight.quant_state
            weights += m.in_features * m.out_features
            stored += m.weight.numel() * m.weight.element_size() * 8 + qs.absmax.numel() * qs.absmax.element_size() * 8
            if qs.nested:
                stored += qs.state2.absmax.numel() * qs.state2.absmax.element_size() * 8
    settings = {"quant_type": "nf4", "blocksize": int(qs.blocksize), "double_quant": bool(qs.nested),
                "compute_dtype": "float32"}
    return model, seconds, cpu, stored / weights, settings, "bitsandbytes"


def hqq(model_dir: str, bits: int, group: int):
    """HQQ's half-quadratic quantiser (``optimize=True``, axis 1, its defaults) on every decoder linear;
    computed in fp32 here. Its scale and zero are counted at 16 bits: HQQ serves in fp16/bf16 (its
    default ``compute_dtype``), which is where the meta-data lives."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    stored = weights = 0
    for layer in decoder_layers(model):
        for name, lin in target_linears(layer).items():
            q = HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float32, device="cpu")
            set_submodule(layer, name, q)
            weights += lin.in_features * lin.out_features
            meta = q.meta
            stored += q.W_q.numel() * q.W_q.element_size() * 8 + (meta["scale"].numel() + meta["zero"].numel()) * 16
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    settings = {"nbits": bits, "group_size": group, "axis": cfg["weight_quant_params"]["axis"],
                "optimize": cfg["weight_quant_params"]["optimize"], "compute_dtype": "float32",
                "meta_bits_counted": 16}
    return model, seconds, cpu, stored / weights, settings, "hqq"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tokens")
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--lib", choices=["bnb", "hqq"], required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    windows = load_file(a.tokens)["eval"]
    model, seconds, cpu, bpw, settings, package = (bnb_nf4 if a.lib == "bnb" else hqq)(a.model_dir, a.bits,
                                                                                        a.group_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ev = perplexity(model, windows, progress=False)
    res = {"tool": {"bnb": "bitsandbytes", "hqq": "HQQ"}[a.lib], "compress_seconds": round(seconds, 1),
           "compress_cpu_seconds": round(cpu, 1), "peak_rss_mb": round(peak / 2**20), "threads": a.threads,
           "bits_per_weight": bpw, "settings": settings, **ev,
           "versions": {p: md.version(p) for p in (package, "transformers", "torch")}}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print("RESULT " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
