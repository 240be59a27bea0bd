"""Compare training recipes for the bundled Fashion-MNIST model at equal wall time.

Each recipe is one `ddpm train` run (class-conditional, on the CPU backend), stopped with
Ctrl-C (which saves a checkpoint) `--seconds` after it starts; the recipes named by `--pytorch`
(default: the first) are also trained by PyTorch + diffusers for the same time
(benches/pytorch_train.py, imported with `ddpm import`). Then every model is measured with
`ddpm eval --n 1000` (DDIM 50 steps, no guidance), and the table is written as Markdown.

  python3 benches/recipes.py train --ddpm target/debug/ddpm --seconds 300 --out runs/recipes
  python3 benches/recipes.py train --ddpm target/debug/ddpm --seconds 300 --out runs/recipes \
      --pytorch tiny-b32-v-cosine --only pytorch-tiny-b32-v-cosine
  python3 benches/recipes.py eval  --ddpm target/debug/ddpm --out runs/recipes \
      --pytorch tiny-b32,tiny-b32-v-cosine
  python3 benches/recipes.py table --out runs/recipes --pytorch tiny-b32,tiny-b32-v-cosine
  (prints the Markdown table of docs/recipes.md)

Run the training phase with nothing else busy on the machine: the recipes compete on wall time
(the evaluations may share it). The steps, images and seconds in the table come from each run's
own checkpoint (`state.json`) or PyTorch's `summary.json`. Needs torch, diffusers, numpy and
safetensors (pip) for the PyTorch runs.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

BASE = ["--data", "fashion-mnist", "--conditional", "--warmup", "100", "--ema-decay", "0.999",
        "--seed", "1", "--backend", "cpu", "--steps", "1000000", "--checkpoint-every", "1000000",
        "--sample-every", "0", "--log-every", "100"]

# (name, what changes, flags)
RECIPES = [
    ("tiny-b32", "the bundled model's recipe: tiny UNet, batch 32, lr 1e-3, linear β, ε",
     ["--model", "tiny", "--batch-size", "32", "--lr", "1e-3"]),
    ("tiny-b64", "batch 64", ["--model", "tiny", "--batch-size", "64", "--lr", "1e-3"]),
    ("small-b32", "small UNet (3 levels, 32/64/128, attention at two)",
     ["--model", "small", "--batch-size", "32", "--lr", "1e-3"]),
    ("tiny-b32-minsnr", "min-SNR-5 weighting",
     ["--model", "tiny", "--batch-size", "32", "--lr", "1e-3", "--min-snr-gamma", "5"]),
    ("tiny-b32-v-cosine", "v-prediction, cosine β",
     ["--model", "tiny", "--batch-size", "32", "--lr", "1e-3", "--prediction", "v",
      "--schedule", "cosine"]),
    ("tiny-b32-v-cosine-minsnr", "v-prediction, cosine β, min-SNR-5 weighting",
     ["--model", "tiny", "--batch-size", "32", "--lr", "1e-3", "--prediction", "v",
      "--schedule", "cosine", "--min-snr-gamma", "5"]),
]


def train(args):
    os.makedirs(args.out, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    for name, _, flags in RECIPES:
        if only and name not in only:
            continue
        run = os.path.join(args.out, name)
        if os.path.exists(os.path.join(run, "config.json")):
            print(f"{name}: already trained, skipped", flush=True)
            continue
        cmd = [args.ddpm, "train", *BASE, *flags, "--out", run]
        print(" ".join(cmd), flush=True)
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
        with open(os.path.join(args.out, f"{name}.log"), "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                proc.wait(timeout=args.seconds)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
                proc.wait()
        print(f"{name}: {read_state(run)}", flush=True)
    for recipe in args.pytorch.split(","):
        pytorch_train(args, recipe, only)


def pytorch_train(args, recipe, only):
    """PyTorch + diffusers on `recipe`'s run config, for the same wall time."""
    name = f"pytorch-{recipe}"
    if only and name not in only:
        return
    if recipe not in [r[0] for r in RECIPES]:
        raise SystemExit(f"--pytorch {recipe}: no such recipe")
    out = os.path.join(args.out, name)
    if not os.path.exists(os.path.join(out, "summary.json")):
        config = os.path.join(args.out, recipe, "config.json")
        cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "pytorch_train.py"),
               "--run-config", config, "--seconds", str(args.seconds),
               "--threads", str(args.threads), "--out", out]
        print(" ".join(cmd), flush=True)
        with open(os.path.join(args.out, f"{name}.log"), "w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    subprocess.run([args.ddpm, "import", "--diffusers", out, "--class-names", "fashion-mnist",
                    "--out", os.path.join(out, "model.safetensors")], check=True)


def read_state(run):
    """Steps, images and training seconds of a ddpm run's newest checkpoint (or PyTorch's)."""
    summary = os.path.join(run, "summary.json")
    if os.path.exists(summary):
        with open(summary) as f:
            s = json.load(f)
        return {"steps": s["steps"], "images": s["images"], "seconds": s["seconds"]}
    with open(os.path.join(run, "config.json")) as f:
        batch = json.load(f)["batch_size"]
    root = os.path.join(run, "checkpoints")
    newest = sorted(d for d in os.listdir(root) if d.startswith("step-"))[-1]
    with open(os.path.join(root, newest, "state.json")) as f:
        s = json.load(f)
    return {"steps": s["step"], "images": s["step"] * batch, "seconds": s["elapsed_secs"]}


def names(args):
    return [r[0] for r in RECIPES] + [f"pytorch-{r}" for r in args.pytorch.split(",")]


def evaluate(args):
    only = set(args.only.split(",")) if args.only else None
    for name in names(args):
        if only and name not in only:
            continue
        run = os.path.join(args.out, name)
        report = os.path.join(run, "eval.json")
        if os.path.exists(report):
            continue
        cmd = [args.ddpm, "eval", "--model", os.path.join(run, "model.safetensors"), "--n", "1000",
               "--steps", "50", "--backend", "cpu", "--json", report]
        print(" ".join(cmd), flush=True)
        started = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"{name}: eval took {time.perf_counter() - started:.0f} s", flush=True)


def table(args):
    what = {r[0]: r[1] for r in RECIPES}
    for recipe in args.pytorch.split(","):
        what[f"pytorch-{recipe}"] = f"PyTorch + diffusers, the `{recipe}` recipe"
    print("| recipe | what | steps | images seen | training s | Fréchet distance | precision | recall "
          "| class recognised | per-class FD (mean) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    floor = None
    for name in names(args):
        run = os.path.join(args.out, name)
        report = os.path.join(run, "eval.json")
        if not os.path.exists(report):
            continue
        with open(report) as f:
            r = json.load(f)
        s = read_state(run)
        model = r["rows"][0]
        floor = r["rows"][1]
        print(f"| `{name}` | {what[name]} | {s['steps']:,} | {s['images']:,} | {s['seconds']:.0f} | "
              f"{model['frechet_distance']:.2f} | {model['precision']:.3f} | {model['recall']:.3f} | "
              f"{100 * r['requested_class_accuracy']:.1f} % | {r['per_class_mean']:.2f} |")
    if floor:
        print(f"| real training images (the floor) | | | | | {floor['frechet_distance']:.2f} | "
              f"{floor['precision']:.3f} | {floor['recall']:.3f} | | {r['per_class_floor_mean']:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("phase", choices=["train", "eval", "table"])
    p.add_argument("--ddpm", default="target/debug/ddpm")
    p.add_argument("--seconds", type=float, default=360)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/recipes")
    p.add_argument("--only", help="comma-separated recipe names")
    p.add_argument("--pytorch", default=RECIPES[0][0],
                   help="comma-separated recipes that PyTorch + diffusers trains too")
    args = p.parse_args()
    {"train": train, "eval": evaluate, "table": table}[args.phase](args)


if __name__ == "__main__":
    main()
