"""The README's figures of the bundled model (its sample grids and the editing figures), made
with the `ddpm` command:

    python3 docs/edit/make_figures.py [path/to/ddpm]      # default: target/release/ddpm

Python's standard library only (gzip, zlib, struct): reads Fashion-MNIST's test images from the
Debian package, writes them as PNGs, runs `ddpm inpaint`, `ddpm img2img` and `ddpm sample
--interpolate` on them (npy output), and lays the results out in docs/edit/{inpaint,img2img,
interpolate}.png (each image 28×28, scaled ×3). The sample grids (two per class in label order,
DDIM 25 steps, seed = class) go to docs/bundled-samples.png (no guidance) and
docs/bundled-samples-guidance.png (guidance 2). Prints every command it runs.
"""

import gzip
import pathlib
import struct
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "edit"
DATA = pathlib.Path("/usr/share/datasets/fashion-mnist")
MODEL = ROOT / "web" / "assets" / "fashion-mnist.safetensors"
SIDE, SCALE, GUTTER = 28, 3, 2


def read_idx(path):
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    return shape, data[4 + 4 * dims :]


def write_png(path, width, height, gray):
    """8-bit grayscale PNG; `gray` holds width·height bytes."""
    raw = b"".join(b"\0" + bytes(gray[y * width : (y + 1) * width]) for y in range(height))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    pathlib.Path(path).write_bytes(png)


def read_npy(path):
    """A float32 .npy as a list of 28×28 images with bytes 0..255 (values in [-1, 1])."""
    data = pathlib.Path(path).read_bytes()
    header_len = struct.unpack("<H", data[8:10])[0]
    body = data[10 + header_len :]
    values = struct.unpack(f"<{len(body) // 4}f", body)
    to_byte = lambda v: int((min(1.0, max(-1.0, v)) + 1.0) * 127.5 + 0.5)
    plane = SIDE * SIDE
    return [[to_byte(v) for v in values[i : i + plane]] for i in range(0, len(values), plane)]


def grid(rows, path):
    """Rows of 28×28 byte images, each scaled ×SCALE, on a white background with gutters."""
    cols = max(len(r) for r in rows)
    cell = SIDE * SCALE + GUTTER
    width, height = cols * cell + GUTTER, len(rows) * cell + GUTTER
    canvas = bytearray([255]) * (width * height)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            for y in range(SIDE * SCALE):
                for x in range(SIDE * SCALE):
                    v = image[(y // SCALE) * SIDE + x // SCALE]
                    canvas[(GUTTER + r * cell + y) * width + GUTTER + c * cell + x] = v
    write_png(path, width, height, canvas)


def run(ddpm, *args):
    cmd = [str(ddpm), *map(str, args)]
    print("+", " ".join(cmd[:1] + [a.replace(str(ROOT) + "/", "") for a in cmd[1:]]), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.time() - start


def main():
    ddpm = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "target" / "release" / "ddpm")
    (_, rows, cols), pixels = read_idx(DATA / "t10k-images-idx3-ubyte.gz")
    _, labels = read_idx(DATA / "t10k-labels-idx1-ubyte.gz")
    image = lambda i: list(pixels[i * rows * cols : (i + 1) * rows * cols])
    # The first test image of each of the ten classes.
    picks = [next(i for i, l in enumerate(labels) if l == c) for c in range(10)]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="ddpm-figures-"))
    mask = [255 if x >= SIDE // 2 else 0 for y in range(SIDE) for x in range(SIDE)]
    write_png(tmp / "mask.png", SIDE, SIDE, mask)
    common = ["--model", MODEL, "--backend", "cpu", "--format", "npy"]

    # 0. Sample grids: two per class, without guidance and with guidance 2.
    for guidance, name in [(1, "bundled-samples.png"), (2, "bundled-samples-guidance.png")]:
        pairs = []
        for c in range(10):
            run(ddpm, "sample", *common, "--class", c, "--n", 2, "--seed", c, "--sampler", "ddim",
                "--steps", 25, "--guidance", guidance, "--out", tmp / f"class{c}.npy")
            pairs.append(read_npy(tmp / f"class{c}.npy"))
        # One column per class.
        grid([[p[0] for p in pairs], [p[1] for p in pairs]], ROOT / "docs" / name)

    # 1. Inpainting: the right half of each test image regenerated (RePaint defaults).
    originals, masked, filled, seconds = [], [], [], 0.0
    for c, i in enumerate(picks):
        write_png(tmp / f"test{c}.png", SIDE, SIDE, image(i))
        seconds += run(ddpm, "inpaint", *common, "--image", tmp / f"test{c}.png", "--mask", tmp / "mask.png",
                       "--class", c, "--seed", 0, "--out", tmp / f"inpaint{c}.npy")
        originals.append(image(i))
        masked.append([128 if m else v for v, m in zip(image(i), mask)])
        filled.append(read_npy(tmp / f"inpaint{c}.npy")[0])
    grid([originals, masked, filled], OUT / "inpaint.png")
    print(f"inpaint: 10 images in {seconds:.0f} s")

    # 2. Image-to-image: one test image (a sneaker) at rising strength.
    sneaker = picks[7]
    write_png(tmp / "sneaker.png", SIDE, SIDE, image(sneaker))
    row = [image(sneaker)]
    for strength in [0.2, 0.4, 0.6, 0.8, 1.0]:
        run(ddpm, "img2img", *common, "--image", tmp / "sneaker.png", "--class", 7, "--strength", strength,
            "--seed", 1, "--out", tmp / f"vary{strength}.npy")
        row += read_npy(tmp / f"vary{strength}.npy")
    grid([row], OUT / "img2img.png")

    # 3. Interpolation: from seed 3 to seed 7, one row per class shown.
    rows = []
    for c in [0, 5, 8]:
        run(ddpm, "sample", *common, "--class", c, "--interpolate", "3,7", "--n", 8, "--out", tmp / f"row{c}.npy")
        rows.append(read_npy(tmp / f"row{c}.npy"))
    grid(rows, OUT / "interpolate.png")
    print(f"wrote {OUT / 'inpaint.png'}, {OUT / 'img2img.png'}, {OUT / 'interpolate.png'}")


if __name__ == "__main__":
    main()
