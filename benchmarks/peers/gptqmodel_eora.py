"""GPTQModel's GPTQ (+ EoRA) on the protocol, run in the peers environment (no tensorpress import
except the shared protocol perplexity, ``tensorpress.evaluate.perplexity``, which is plain PyTorch).

    python gptqmodel_eora.py TOKENS MODEL_DIR OUT_JSON --bits 4 --group-size 64 --rank 32 --threads 2

TOKENS: safetensors with ``calib [n, L]`` and ``eval [w, 512]`` token ids (the same tokens every tool
gets). GPTQModel runs on CPU with the model loaded in bf16 (its CPU path); EoRA is generated in the
same quantisation loop (``adapter=Lora(rank, path)``). The result JSON has the compression wall
time (GPTQ + EoRA, loading and evaluation excluded), peak RSS, and protocol perplexity of the
model as GPTQModel loads it back (base + adapter) with its weights and adapter upcast to fp32.
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

# The one protocol perplexity (plain PyTorch): tensorpress's source tree, not an installed package
# (the peers environment does not install tensorpress). TP_ROOT is set by the benchmark workers.
sys.path.insert(0, os.environ.get("TP_ROOT", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")))
from tensorpress.evaluate import perplexity as _perplexity  # noqa: E402


def perplexity(model, windows):
    return _perplexity(model, windows, progress=False)



def _cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _single_cpu_worker_pool(gptqmodel):
    """GPTQModel 7.6.0 deadlocks on CPU with two finalize workers (one holds a module's parent lock
    and waits for the processor lock in ``pack_module``, the other holds the processor lock in
    ``submodule_finalize`` and waits for the parent lock); with one CPU worker its default loader
    pool (2 workers) is refused. Build its device pool with one worker for both: the maths still
    uses every torch thread."""
    from gptqmodel.utils.threadx import DeviceThreadPool, WarmupTask, WarmUpCtx
    from gptqmodel.utils.linalg_warmup import run_torch_linalg_warmup

    def build():
        return DeviceThreadPool(inference_mode=True,
                                warmups={"cpu": WarmupTask(run_torch_linalg_warmup, scope=WarmUpCtx.THREAD_AND_DEVICE)},
                                workers={"cpu": 1, "model_loader:cpu": 1}, empty_cache_every_n=512)
    gptqmodel._build_device_thread_pool = build


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tokens")
    ap.add_argument("model_dir")
    ap.add_argument("out_json")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rank", type=int, default=0, help="EoRA rank (0: GPTQ alone)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import gptqmodel
    _single_cpu_worker_pool(gptqmodel)
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.adapter.adapter import Lora

    t = load_file(a.tokens)
    calib, windows = t["calib"], t["eval"]
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calib]
    work = tempfile.mkdtemp(prefix="gptqmodel-")
    adapter = Lora(rank=a.rank, path=os.path.join(work, "eora")) if a.rank else None
    qcfg = QuantizeConfig(bits=a.bits, group_size=a.group_size, sym=True, adapter=adapter)
    model = GPTQModel.load(a.model_dir, qcfg, device="cpu", dtype=torch.bfloat16)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    model.quantize(data, batch_size=a.batch_size)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out_dir = os.path.join(work, "quantized")
    model.save(out_dir)
    del model
    kw = {"adapter": Lora(rank=a.rank, path=os.path.join(work, "eora"))} if a.rank else {}
    q = GPTQModel.load(out_dir, device="cpu", **kw)
    net = q.model.eval()
    eval_dtype = "float32"
    try:
        net.float()
        for m in net.modules():            # adapters keep their own tensors: upcast them too
            ad = getattr(m, "adapter", None)
            if ad is not None and getattr(ad, "lora_A", None) is not None:
                ad.lora_A, ad.lora_B = ad.lora_A.float(), ad.lora_B.float()
        ev = perplexity(net, windows[:1])
    except Exception as e:                  # the CPU kernel may only take bf16: evaluate as it loads
        print(f"fp32 evaluation failed ({type(e).__name__}: {e}); evaluating in bf16", file=sys.stderr)
        q = GPTQModel.load(out_dir, device="cpu", **kw)
        net = q.model.eval()
        eval_dtype = "bfloat16"
    ev = perplexity(net, windows)
    n_adapters = sum(1 for m in net.modules() if getattr(getattr(m, "adapter", None), "lora_A", None) is not None)
    import importlib.metadata as md
    res = {"tool": "GPTQModel", "bits": a.bits, "group_size": a.group_size, "rank": a.rank,
           "compress_seconds": round(seconds, 1), "compress_cpu_seconds": round(cpu, 1), "peak_rss_mb": round(peak / 2**20), "threads": a.threads,
           "eval_dtype": eval_dtype, "adapters_applied": n_adapters, **ev,
           "settings": {"QuantizeConfig": {"bits": a.bits, "group_size": a.group_size, "sym": True},
                        "load_dtype": "bfloat16", "batch_size": a.batch_size},
           "versions": {k: md.version(k) for k in ("gptqmodel", "torch", "transformers")}}
    with open(a.out_json, "w") as f:
        json.dump(res, f, indent=1)
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
