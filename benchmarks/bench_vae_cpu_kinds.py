"""Does the embedded VAE train to the same ceiling whatever the CPU's float rounding?

    .venv/bin/python benchmarks/bench_vae_cpu_kinds.py            # after `dvc repro vae_ceiling`

The same seed and photos gave different `vae_ceiling` figures on an AMD EPYC and an Intel Xeon: their
vector units round sums in another order, and a run that has not converged amplifies that. Short of a
second machine kind, this trains the embedded VAE (`consissr train-vae`, params.yaml as it is) once per
"CPU kind", where a kind is torch's, oneDNN's and OpenCV's instruction-set dispatch capped by their documented
environment variables (`benchmarks/common.py`, `DISPATCH_KINDS`): other kernels, other summation
order, other rounding, as on another CPU. Each VAE then goes through the `backbone` and `vae-ceiling`
commands with the checkout's data/prepared and data/degraded (native dispatch, so only training differs).
Writes benchmarks/results/vae_cpu_kinds.json: each kind's ceiling PSNR(Y), held-out PSNR(Y), training
seconds, and the spread (max - min of the ceilings; the goal is within 0.2 dB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import DISPATCH_KINDS, machine, write_record

OUT = ROOT / "benchmarks" / "results" / "vae_cpu_kinds.json"


def run(args: list[str], env: dict[str, str]) -> None:
    subprocess.run([str(Path(sys.executable).parent / "consissr"), *args], cwd=ROOT, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=list(DISPATCH_KINDS), choices=list(DISPATCH_KINDS))
    parser.add_argument("--steps", type=int, help="train_vae.steps instead of params.yaml's")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    for needed in ("data/prepared", "data/degraded"):
        if not (ROOT / needed).is_dir():
            sys.exit(f"{ROOT / needed} is missing: run `dvc repro degrade` first")
    load = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory(prefix="vae-kinds-") as tmp:
        base_env = dict(os.environ, HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1",
                        MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db")  # keep the checkout's store clean
        params = ROOT / "params.yaml"
        if args.steps:
            doc = yaml.safe_load(params.read_text())
            doc["train_vae"]["steps"] = args.steps
            params = Path(tmp, "params.yaml")
            params.write_text(yaml.safe_dump(doc, sort_keys=False))
        for kind in args.kinds:
            vae, backbone, ceiling = (f"{tmp}/{kind}-{part}" for part in ("vae", "backbone", "ceiling.json"))
            start = time.perf_counter()
            run(["train-vae", "--params", str(params), "--out", vae], {**base_env, **DISPATCH_KINDS[kind]})
            seconds = time.perf_counter() - start
            run(["backbone", "--params", "params.yaml", "--vae", vae, "--out", backbone], base_env)
            run(["vae-ceiling", "--params", "params.yaml", "--prepared", "data/prepared", "--degraded",
                 "data/degraded", "--backbone", backbone, "--out", ceiling], base_env)
            report = json.loads(Path(ceiling).read_text())
            metrics = json.loads(Path(vae, "vae_metrics.json").read_text())
            results[kind] = {"env": DISPATCH_KINDS[kind], "ceiling": report, "vae_metrics": metrics,
                             "train_vae_wall_seconds": round(seconds, 1)}
            print(f"{kind}: {json.dumps(report)}", flush=True)
    ceilings = {kind: r["ceiling"]["ceiling_psnr_y"] for kind, r in results.items()}
    spread = max(ceilings.values()) - min(ceilings.values())
    print(f"ceiling_psnr_y by kind: {ceilings}; spread {spread:.3f} dB (goal <= 0.2)")
    write_record(args.out, {"machine": machine(load), "train_vae_steps": args.steps or yaml.safe_load(
        (ROOT / "params.yaml").read_text())["train_vae"]["steps"], "kinds": results, "ceiling_psnr_y": ceilings,
                       "spread_db": round(spread, 3), "goal_db": 0.2})


if __name__ == "__main__":
    main()
