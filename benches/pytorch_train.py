"""Train a `ddpm train` recipe with PyTorch + diffusers for a fixed wall time.

It reads a ddpm-rs run's `config.json` (the UNet in diffusers' field names, the noise schedule,
prediction type, loss weighting, batch size, learning rate and its warm-up and shape, gradient
clipping, EMA decay, label dropout, seed) and trains diffusers' `UNet2DModel` the way
`ddpm train` does:

- AdamW (weight decay 0, eps 1e-8), linear warm-up then constant or cosine learning rate;
- each parameter's gradient clipped to the L2 norm `grad_clip` on its own, as burn's
  `GradientClippingConfig::Norm` does;
- EMA with decay min(ema_decay, (1 + k) / (10 + k)) after step k;
- uniform timesteps, Gaussian noise, MSE to the target (noise or v), optionally min-SNR-γ;
- class labels replaced by the null class (the last embedding) with probability p_uncond;
- Fashion-MNIST from Debian's dataset-fashion-mnist, pixels in [-1, 1], a new shuffle per epoch.

The clock starts at the first training step (after imports, data loading and model set-up) and
training stops at the first step that ends after `--seconds`. The EMA weights are written as a
diffusers directory (`config.json`, `diffusion_pytorch_model.safetensors`,
`scheduler_config.json`) that `ddpm import` reads, with `summary.json` (steps, images, seconds).

  python3 benches/pytorch_train.py --run-config runs/recipes/a/config.json --seconds 360 \\
      --threads 2 --out runs/recipes/pytorch
  target/release/ddpm import --diffusers runs/recipes/pytorch --class-names fashion-mnist \\
      --out runs/recipes/pytorch.safetensors

Needs: pip install torch diffusers safetensors numpy
"""

import argparse
import gzip
import json
import math
import os
import time

import numpy as np

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run-config", required=True, help="a ddpm-rs run's config.json")
    p.add_argument("--seconds", type=float, required=True, help="training wall time")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=FASHION_MNIST, help="Fashion-MNIST IDX directory")
    p.add_argument("--out", required=True, help="diffusers directory to write")
    return p.parse_args()


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def betas_for(schedule):
    import torch

    t = schedule["num_train_timesteps"]
    kind = schedule["beta_schedule"]
    if kind == "linear":
        return torch.linspace(schedule["beta_start"], schedule["beta_end"], t, dtype=torch.float64)
    if kind == "squaredcos_cap_v2":
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - f((i + 1) / t) / f(i / t), 0.999) for i in range(t)], dtype=torch.float64)
    raise SystemExit(f"beta_schedule {kind!r}: only linear and squaredcos_cap_v2 are supported here")


def main():
    args = parse_args()
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    with open(args.run_config) as f:
        run = json.load(f)
    if run.get("limit") or run.get("classes") or run.get("image_size") or run.get("channels"):
        raise SystemExit("only whole-Fashion-MNIST runs are supported (no --limit, --classes, --image-size)")
    info = run["model"]
    unet_config = info["unet"]
    schedule = info["schedule"]
    prediction = info["prediction"]
    if prediction not in ("epsilon", "v_prediction"):
        raise SystemExit(f"prediction {prediction!r}: only epsilon and v_prediction are supported here")
    loss_cfg = run["loss"]
    gamma = loss_cfg["min_snr"]["gamma"] if isinstance(loss_cfg, dict) and "min_snr" in loss_cfg else None
    batch, lr, warmup = run["batch_size"], run["lr"], run["warmup"]
    total_steps = run["steps"]

    torch.manual_seed(run["seed"])
    images = read_idx(os.path.join(args.data, "train-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(args.data, "train-labels-idx1-ubyte.gz"))
    x_all = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    y_all = torch.from_numpy(labels.astype(np.int64))
    n = x_all.shape[0]

    model = UNet2DModel(**unet_config)
    model.train()
    ema = UNet2DModel(**unet_config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    betas = betas_for(schedule)
    alphas_bar = torch.cumprod(1.0 - betas, 0)
    sqrt_ab = alphas_bar.sqrt().float()
    sqrt_1m_ab = (1.0 - alphas_bar).sqrt().float()
    snr = (alphas_bar / (1.0 - alphas_bar)).float()
    conditional = run["conditional"]
    null = (unet_config.get("num_class_embeds") or 1) - 1
    t_max = schedule["num_train_timesteps"]
    params = [p for p in model.parameters()]
    ema_params = [p for p in ema.parameters()]

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        if run["lr_schedule"] == "cosine":
            span = max(total_steps - warmup, 1)
            return lr * 0.5 * (1 + math.cos(math.pi * min((step - warmup) / span, 1.0)))
        return lr

    order = torch.randperm(n)
    pos, step, losses = 0, 0, []
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        if pos + batch > n:
            order, pos = torch.randperm(n), 0
        idx = order[pos : pos + batch]
        pos += batch
        x0 = x_all[idx]
        t = torch.randint(0, t_max, (batch,))
        eps = torch.randn_like(x0)
        a = sqrt_ab[t].view(-1, 1, 1, 1)
        s = sqrt_1m_ab[t].view(-1, 1, 1, 1)
        x_t = a * x0 + s * eps
        target = eps if prediction == "epsilon" else a * eps - s * x0
        class_labels = None
        if conditional:
            y = y_all[idx].clone()
            y[torch.rand(batch) < run["p_uncond"]] = null
            class_labels = y
        out = model(x_t, t, class_labels=class_labels).sample
        per_image = ((out - target) ** 2).mean(dim=(1, 2, 3))
        if gamma is not None:
            s_t = snr[t]
            w = torch.clamp(s_t, max=gamma) / (s_t if prediction == "epsilon" else s_t + 1)
            per_image = per_image * w
        loss = per_image.mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if run["grad_clip"] > 0:
            for p in params:
                if p.grad is not None:
                    torch.nn.utils.clip_grad_norm_([p], run["grad_clip"])
        for g in optim.param_groups:
            g["lr"] = lr_at(step)
        optim.step()
        step += 1
        decay = min(run["ema_decay"], (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_params, params):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"step {step}: loss {np.mean(losses[-100:]):.5f} {step * batch / (time.perf_counter() - start):.1f} img/s", flush=True)
    seconds = time.perf_counter() - start

    ema.save_pretrained(args.out, safe_serialization=True)
    DDPMScheduler(
        num_train_timesteps=t_max,
        beta_schedule=schedule["beta_schedule"],
        beta_start=schedule["beta_start"],
        beta_end=schedule["beta_end"],
        prediction_type=prediction,
    ).save_config(args.out)
    summary = {
        "steps": step,
        "images": step * batch,
        "seconds": seconds,
        "threads": args.threads,
        "final_loss_mean_100": float(np.mean(losses[-100:])) if losses else None,
        "torch": torch.__version__,
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
