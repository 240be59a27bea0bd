"""The PyTorch + diffusers side of `ddpm bench`.

It builds diffusers' `UNet2DModel` from the config stored in a ddpm-rs model file, loads that
file's weights into it (the file uses diffusers' parameter names), and times one case the way
`ddpm bench` times its own side: `--warmup` untimed iterations, then `--repeats` timed repeats of
k iterations each, k chosen so that a repeat lasts at least `--min-repeat-secs`. It prints one JSON
line. `ddpm bench` runs it once per case, in a fresh process, so each peak-memory figure belongs
to one case only.

Phases:
  versions  the torch and diffusers versions (fails when either is missing)
  check     max |ours - PyTorch| of one forward pass over the inputs in --check-file
  train     one training step per iteration: q_sample, forward, MSE to the noise, backward, AdamW
  sample    one DDIM run of --steps steps per iteration, from Gaussian noise, under inference_mode
  conv      one 3x3 convolution alone (the first level's channels, full resolution), forward and
            backward with input and weight gradients
  silu      SiLU alone on the first level's activations, forward only, under inference_mode

Run by hand, e.g.:
  python3 benches/pytorch_reference.py --model m.safetensors --phase train --batch 64 --threads 2
Needs: pip install torch diffusers safetensors
"""

import argparse
import json
import math
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="ddpm-rs model file (.safetensors)")
    p.add_argument("--phase", required=True, choices=["versions", "check", "train", "sample", "conv", "silu"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-repeat-secs", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per sampling run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--check-file", help="safetensors with sample, timesteps, [class_labels], output")
    return p.parse_args()


def emit(obj):
    print(json.dumps(obj), flush=True)


def status_bytes(key):
    """A memory figure from /proc/self/status in bytes: VmHWM (peak RSS) or VmRSS (current)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if key == "VmHWM":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return 0


def load_model(path, device):
    import torch
    from diffusers import UNet2DModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != "ddpm-rs":
        raise SystemExit(f"{path} is not a ddpm-rs model file (no ddpm-rs metadata)")
    info = json.loads(metadata["model"])
    # The model file's UNet config uses diffusers' field names and values.
    model = UNet2DModel(**info["unet"])
    state = {k: v.to(torch.float32) for k, v in load_file(path).items()}
    model.load_state_dict(state, strict=True)
    return model.to(device), info


def scheduler_config(info):
    s = info["schedule"]
    config = {
        "num_train_timesteps": s["num_train_timesteps"],
        "beta_start": s["beta_start"],
        "beta_end": s["beta_end"],
        "beta_schedule": s["beta_schedule"],
        "rescale_betas_zero_snr": s.get("rescale_betas_zero_snr", False),
        "prediction_type": {"epsilon": "epsilon", "v_prediction": "v_prediction",
                            "sample": "sample"}.get(info.get("prediction", "epsilon"), "epsilon"),
    }
    if s.get("trained_betas"):
        config["trained_betas"] = s["trained_betas"]
    return config


def class_count(info):
    n = info["unet"].get("num_class_embeds")
    return n or 0


def measure(fn, sync, warmup, repeats, min_repeat_secs):
    """Seconds per iteration of each timed repeat, and the iterations per repeat."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync()
    warm = (time.perf_counter() - start) / max(warmup, 1)
    k = max(1, math.ceil(min_repeat_secs / max(warm, 1e-9)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(k):
            fn()
        sync()
        times.append((time.perf_counter() - start) / k)
    return times, k


def main():
    args = parse_args()
    try:
        import diffusers
        import torch
        import torch.nn.functional as F
        from diffusers import DDIMScheduler, DDPMScheduler
    except ImportError as e:
        emit({"error": f"{e.name} is not installed (pip install torch diffusers safetensors)"})
        return 3
    if args.phase == "versions":
        emit({"torch": torch.__version__, "diffusers": diffusers.__version__,
              "cuda": torch.cuda.is_available()})
        return 0

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if args.device == "cuda" and not torch.cuda.is_available():
        emit({"error": "PyTorch sees no CUDA device"})
        return 4
    device = torch.device(args.device)
    start_rss = status_bytes("VmRSS")
    model, info = load_model(args.model, device)
    unet = info["unet"]
    c, s = unet["in_channels"], unet["sample_size"]
    classes = class_count(info)
    gen = torch.Generator().manual_seed(0)

    if args.phase == "check":
        from safetensors.torch import load_file

        io = load_file(args.check_file)
        labels = io.get("class_labels")
        model.eval()
        with torch.no_grad():
            out = model(io["sample"].to(device), io["timesteps"].to(device),
                        class_labels=None if labels is None else labels.to(device)).sample
        diff = (out.cpu() - io["output"]).abs().max().item()
        emit({"max_abs_diff": diff})
        return 0

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    b = args.batch
    labels = None
    if classes:
        labels = torch.randint(0, classes, (b,), generator=gen).to(device)

    if args.phase == "train":
        model.train()
        noise_scheduler = DDPMScheduler(**scheduler_config(info))
        x0 = (torch.rand((b, c, s, s), generator=gen) * 2 - 1).to(device)
        noise = torch.randn((b, c, s, s), generator=gen).to(device)
        t = torch.randint(0, info["schedule"]["num_train_timesteps"], (b,), generator=gen).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, eps=1e-8)

        def step():
            x_t = noise_scheduler.add_noise(x0, noise, t)
            out = model(x_t, t, class_labels=labels).sample
            loss = F.mse_loss(out, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        fn = step
    elif args.phase == "conv":
        width = unet["block_out_channels"][0]
        conv = torch.nn.Conv2d(width, width, 3, padding=1).to(device)
        x = torch.randn((b, width, s, s), generator=gen).to(device).requires_grad_(True)

        def conv_step():
            conv.zero_grad(set_to_none=True)
            x.grad = None
            conv(x).sum().backward()
            assert x.grad is not None and conv.weight.grad is not None
            return x.grad[0, 0, 0, 0].item()

        fn = conv_step
    elif args.phase == "silu":
        width = unet["block_out_channels"][0]
        x = torch.randn((b, width, s, s), generator=gen).to(device)

        def silu_step():
            with torch.inference_mode():
                return F.silu(x)[0, 0, 0, 0].item()

        fn = silu_step
    else:
        model.eval()
        scheduler = DDIMScheduler(**scheduler_config(info))
        scheduler.set_timesteps(args.steps)

        def run():
            x = torch.randn((b, c, s, s), generator=gen).to(device)
            with torch.inference_mode():
                for t in scheduler.timesteps:
                    eps = model(x, t, class_labels=labels).sample
                    x = scheduler.step(eps, t, x).prev_sample
            return x.cpu()

        fn = run

    times, k = measure(fn, sync, args.warmup, args.repeats, args.min_repeat_secs)
    result = {
        "per_iter_s": times,
        "iters_per_repeat": k,
        "peak_rss_bytes": status_bytes("VmHWM"),
        "start_rss_bytes": start_rss,
        "device": args.device,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
