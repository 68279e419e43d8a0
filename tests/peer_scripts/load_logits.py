"""Load exported checkpoints with the REAL peer libraries and save their logits (no tensorpress import).

Run with the peers interpreter (transformers + gptqmodel + optimum + compressed-tensors)::

    python load_logits.py jobs.json

``jobs.json``: ``{"ids": [[...], ...], "jobs": [{"name": str, "dir": str, "loader": L, "out": path}]}``
with ``L`` one of ``hf`` (``AutoModelForCausalLM.from_pretrained(dir, device_map="cpu")``: GPTQ goes
through optimum + gptqmodel, compressed-tensors through compressed-tensors), ``hf_peft`` (the same,
then ``peft.PeftModel.from_pretrained(model, dir/lora)``), ``gptqmodel``
(``GPTQModel.load(dir, device="cpu")``) or ``gptqmodel_lora`` (with ``adapter=Lora(r, dir/lora)``). Each job writes ``out`` (safetensors: ``logits`` fp32) or
records its error; a summary JSON is printed on the last stdout line and written next to jobs.json
as ``results.json``: ``{name: {"ok": bool, "error": str, "dtype": str, "layer": str, "seconds": float}}``.
"""
import json
import os
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def _layer_type(model) -> str:
    for n, m in model.named_modules():
        if n.endswith("layers.0.self_attn.q_proj"):
            return type(m).__name__
    return "?"


def _adapters(model) -> int:
    """Modules with a LoRA applied (PEFT ``lora_A`` containers or GPTQModel ``adapter.lora_A``)."""
    n = 0
    for m in model.modules():
        la = getattr(m, "lora_A", None)
        if isinstance(la, torch.nn.ModuleDict) and len(la):
            n += 1
        elif getattr(getattr(m, "adapter", None), "lora_A", None) is not None:
            n += 1
    return n


def run_job(job, ids):
    loader = job["loader"]
    adapter_dir = os.path.join(job["dir"], "lora")
    if loader in ("hf", "hf_peft"):
        from transformers import AutoModelForCausalLM
        kw = {}
        if loader == "hf_peft" and job.get("fmt") == "compressed-tensors":
            # PEFT wraps modules that have a .weight: let compressed-tensors decompress at load
            from transformers import CompressedTensorsConfig
            kw["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
        model = AutoModelForCausalLM.from_pretrained(job["dir"], device_map="cpu", **kw)
        net = model
        if loader == "hf_peft":               # plain PEFT on top of the quantised base
            from peft import PeftModel
            net = PeftModel.from_pretrained(model, adapter_dir)
    elif loader in ("gptqmodel", "gptqmodel_lora"):
        from gptqmodel import GPTQModel
        kw = {}
        if loader == "gptqmodel_lora":        # GPTQModel's own EoRA/LoRA path
            from gptqmodel.adapter.adapter import Lora
            rank = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))["r"]
            kw["adapter"] = Lora(rank=rank, path=adapter_dir)
        model = GPTQModel.load(job["dir"], device="cpu", **kw)
        net = model.model
    else:
        raise ValueError(f"unknown loader {loader}")
    net.eval()
    with torch.no_grad():
        logits = net(input_ids=ids).logits.float()
    save_file({"logits": logits.contiguous()}, job["out"])
    dtype = str(next(p for p in net.parameters() if p.is_floating_point()).dtype)
    if any(m == "tensorpress" or m.startswith("tensorpress.") for m in sys.modules):
        raise RuntimeError("tensorpress was imported: the export is not loadable without tensorpress code")
    return {"dtype": dtype, "layer": _layer_type(net), "adapters": _adapters(net)}


def main():
    path = sys.argv[1]
    spec = json.load(open(path))
    ids = torch.tensor(spec["ids"], dtype=torch.long)
    torch.manual_seed(0)
    results = {}
    for job in spec["jobs"]:
        t0 = time.time()
        try:
            info = run_job(job, ids)
            results[job["name"]] = {"ok": True, "error": "", **info}
        except Exception as e:  # record and go on: negative controls may fail to load
            tb = traceback.format_exc(limit=3)
            results[job["name"]] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "trace": tb[-2000:]}
        results[job["name"]]["seconds"] = round(time.time() - t0, 2)
    out = os.path.join(os.path.dirname(os.path.abspath(path)), "results.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
