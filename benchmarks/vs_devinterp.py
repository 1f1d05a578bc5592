"""Time the same LLC estimate with llc-callbacks and with devinterp 1.3.2, alternating runs.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/vs_devinterp.py [--rounds 3]``

devinterp pins its own dependencies, so it lives in its own virtual environment
(``benchmarks/.venv-devinterp``, created on first use with ``torch==2.13.0 devinterp==1.3.2``),
never in the project's. This script trains the small MLP of ``mlp.py`` once and saves its
weights, then runs one estimate per subprocess, alternating the two libraries. Each subprocess
first runs a tiny warm-up estimate, so that one-time imports and tracing (paid once per training
run by a callback) are left out on both sides, then times one estimate. Both sample the same
weights with the same DataLoader, chains, burn-in, draws, batch size, step size, localization
and nbeta = B / log B; our paired estimator is off, so both average ``L_m(w_t) - L(w*)``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

import torch
from mlp import BATCH_SIZE, HIDDEN, loss_fn, make_data, make_loader, make_model, trained_model

HERE = Path(__file__).resolve().parent
DEVINTERP_VENV = HERE / ".venv-devinterp"
DEVINTERP_PINS = ["torch==2.13.0", "devinterp==1.3.2"]
SETTINGS = {
    "num_chains": 8,
    "num_burnin": 200,
    "num_draws": 300,
    "step_size": 1e-4,
    "localization": 100.0,
}


def devinterp_python() -> Path:
    """The interpreter of devinterp's environment, created when missing."""
    python = DEVINTERP_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {DEVINTERP_VENV} with {' '.join(DEVINTERP_PINS)}", flush=True)
        venv.create(DEVINTERP_VENV, with_pip=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", *DEVINTERP_PINS], check=True)
    return python


def settings(warmup: bool) -> dict:
    """The estimate's settings; the warm-up runs two burn-in steps and two draws."""
    return {**SETTINGS, "num_burnin": 2, "num_draws": 2} if warmup else SETTINGS


def run_ours(model, loader, seed: int, warmup: bool = False) -> dict:
    from llc_callbacks import LLCConfig, estimate_llc

    config = LLCConfig(**settings(warmup), paired=False, seed=seed, init_loss_batches=8, mala=False)
    start = time.perf_counter()
    result = estimate_llc(model, loss_fn, loader, config, warn=False)
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "mean": result.llc_mean, "std": result.llc_std}


def run_devinterp(model, loader, seed: int, warmup: bool = False) -> dict:
    import warnings

    from devinterp.slt.sampler import estimate_learning_coeff_with_summary
    from devinterp.utils import default_nbeta

    warnings.filterwarnings("ignore")
    used = settings(warmup)
    start = time.perf_counter()
    summary = estimate_learning_coeff_with_summary(
        model,
        loader,
        evaluate=loss_fn,
        optimizer_kwargs={
            "lr": used["step_size"],
            "localization": used["localization"],
            "nbeta": default_nbeta(loader),
        },
        num_chains=used["num_chains"],
        num_burnin_steps=used["num_burnin"],
        num_draws=used["num_draws"],
        seed=seed,
        verbose=False,
    )
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "mean": summary["llc/mean"], "std": summary["llc/std"]}


def run_one(backend: str, weights: str, hidden: int, seed: int) -> None:
    """Subprocess entry: a warm-up, then one timed estimate printed as JSON."""
    torch.set_num_threads(1)
    model = make_model(hidden)
    model.load_state_dict(torch.load(weights))
    loader = make_loader(make_data())
    run = run_ours if backend == "ours" else run_devinterp
    run(model, loader, seed, warmup=True)
    print(json.dumps(run(model, loader, seed)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each library")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="width of the hidden layers")
    parser.add_argument("--backend", choices=["ours", "devinterp"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        run_one(args.backend, args.weights, args.hidden, args.seed)
        return
    torch.set_num_threads(1)
    pythons = {"ours": Path(sys.executable), "devinterp": devinterp_python()}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results: dict[str, list[dict]] = {"ours": [], "devinterp": []}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "mlp.pt"
        torch.save(trained_model(make_data(), args.hidden).state_dict(), weights)
        for round_ in range(args.rounds):
            for backend in ("ours", "devinterp"):
                command = [pythons[backend], __file__, "--backend", backend, "--weights", weights]
                command += ["--hidden", str(args.hidden), "--seed", str(round_)]
                output = subprocess.run(
                    command, check=True, capture_output=True, text=True, env=env
                )
                result = json.loads(output.stdout.strip().splitlines()[-1])
                results[backend].append(result)
                print(
                    f"round {round_} {backend:>9}: {result['seconds']:6.2f} s,"
                    f" LLC {result['mean']:7.2f} ± {result['std']:5.2f}",
                    flush=True,
                )
    params = sum(p.numel() for p in make_model(args.hidden).parameters())
    print(
        f"\nMLP with {params} parameters, batch {BATCH_SIZE}, {SETTINGS['num_chains']} chains,"
        f" {SETTINGS['num_burnin']} burn-in + {SETTINGS['num_draws']} draws,"
        f" step size {SETTINGS['step_size']:g}, localization {SETTINGS['localization']:g}"
    )
    for backend, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        mean = statistics.mean(r["mean"] for r in runs)
        spread = statistics.mean(r["std"] for r in runs)
        print(
            f"{backend:>9}: median {seconds:6.2f} s, LLC {mean:7.2f} (mean chain std {spread:.2f})"
        )
    ratio = statistics.median(r["seconds"] for r in results["devinterp"]) / statistics.median(
        r["seconds"] for r in results["ours"]
    )
    print(f"speed-up (devinterp time / llc-callbacks time): {ratio:.1f}x")


if __name__ == "__main__":
    main()
