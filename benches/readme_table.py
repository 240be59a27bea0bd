"""The README's table of `ddpm bench` results, from the reports that `ddpm bench --json` writes.

Each row's rate is items per iteration over the median seconds per iteration of that side's
repeats, and the ratio is ours / PyTorch (above 1: ddpm-rs is faster), as `ddpm bench` prints
them. Usage:
  python3 benches/readme_table.py docs/bench/fashion-mnist-cpu.json docs/bench/cifar-cpu.json
"""

import json
import re
import statistics
import sys


def rate_text(v):
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def preset_label(report):
    # "the cifar preset (32×32×3, 2,245,763 parameters)" -> "cifar (32×32×3, 2.2M params)"
    m = re.match(r"(?:the )?(.+?)(?: preset)? \((\S+), ([\d,]+) parameters\)", report["config"])
    if not m:
        return report["config"]
    name, shape, params = m.group(1), m.group(2), int(m.group(3).replace(",", ""))
    millions = params / 1e6
    return f"{name} ({shape}, {millions:.2f}M params)" if millions < 1 else f"{name} ({shape}, {millions:.1f}M params)"


def measured(side):
    """The `Ok` payload of a side's result, or None when it failed or did not run."""
    return side.get("Ok") if isinstance(side, dict) else None


def main(paths):
    print("| preset | phase | batch | ours | PyTorch | ratio | peak RSS ours / PyTorch |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        label = preset_label(report)
        for row in report["rows"]:
            unit = "evals/s" if row["phase"] == "sample" else "img/s"
            ours, theirs = measured(row["ours"]), measured(row.get("pytorch"))
            cells = []
            rates = []
            for side in (ours, theirs):
                if side is None:
                    cells.append("failed")
                    rates.append(None)
                    continue
                r = row["items_per_iter"] / statistics.median(side["per_iter_s"])
                rates.append(r)
                cells.append(f"{rate_text(r)} {unit}")
            ratio = f"{rates[0] / rates[1]:.2f}×" if None not in rates else "–"
            rss = " / ".join(
                f"{side['peak_rss_bytes'] / 1e6:.0f}" if side else "–" for side in (ours, theirs)
            )
            print(f"| {label} | {row['phase']} | {row['batch']} | {cells[0]} | {cells[1]} | {ratio} | {rss} MB |")
            label = ""


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python3 benches/readme_table.py REPORT.json [REPORT.json ...]")
    main(sys.argv[1:])
