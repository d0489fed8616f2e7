"""Turn a results file of JSON lines into a readable Markdown page: targets, step times, overhead, data, all lines.

Usage: python benchmarks/report.py benchmarks/results/2026-11-21-cpu.jsonl [--out benchmarks/results/x.md]

Where a name was measured several times, the tables show its newest record; every line stays in the page. A file
`<results>.notes.md` next to the results (the reading of the numbers) is put between the tables and the lines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Target:
    """One target of issue 9: what ours must reach, and what the reference trainer reaches on this machine class."""

    what: str
    reference: str
    limit: float  # ours must stay at or under this
    unit: str


TARGETS = {
    "step_unet_te": Target("steady step, LoRA UNet + text encoder (full-size SD 1.5, 256 px, batch 1, fp32)",
                           "5.6-6.0 s", 6.0, "s"),
    "step_cached": Target("steady step, LoRA UNet only with cached latents", "4.0-4.5 s", 4.5, "s"),
    "launch": Target("launch to first step (LoRA UNet + text encoder, no cache)", "~30 s", 15.0, "s"),
    "rss": Target("peak RSS of the training process", "8.4 GiB", 5.5, "GiB"),
    "caching": Target("latent caching time / raw VAE encode time, same images", "~2.5 s per image", 1.05, "x"),
    "overhead": Target("LoRA step / floor step (overhead ratio)", "-", 1.05, "x"),
}


def read_records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def newest(records: list[dict]) -> dict[str, dict]:
    """The last record of each name."""
    return {record["name"]: record for record in records}


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f} GiB"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _faults(record: dict) -> str:
    if record.get("step_sys_seconds") is None:
        return "-"
    return f"{record['step_sys_seconds']:.2f} s, {record['step_minor_faults'] / 1000:.0f}k"


def target_rows(latest: dict[str, dict]) -> list[str]:
    """ours / target for the four targets of the issue, plus the overhead ratio."""
    unet_te = latest.get("train_step/sd15/lora_unet_te")
    cached = latest.get("train_step/sd15/lora_unet_cached")
    overhead = latest.get("overhead/sd15/lora_unet_te")
    caching = latest.get("overhead/sd15/lora_unet_cached")
    rss = max((r["peak_rss_bytes"] for r in (unet_te, cached) if r), default=None)
    # the overhead records pool the steps of every round of ours; without them, the newest run alone
    fastest = {
        "step_unet_te": (overhead or unet_te or {}).get("seconds_min"),
        "step_cached": (caching or cached or {}).get("seconds_min"),
    }
    values = {
        "step_unet_te": (overhead or unet_te or {}).get("seconds"),
        "step_cached": (caching or cached or {}).get("seconds"),
        "launch": unet_te and unet_te["launch_to_first_step_seconds"],
        "rss": rss and rss / GIB,
        "caching": caching and caching.get("caching_ratio"),
        "overhead": overhead and overhead["overhead_ratio"],
    }
    header = "| target | reference trainer | ours must be at most | ours (steps: median of all rounds, fastest) |"
    rows = [header + " ours / target |", "| --- | --- | --- | --- | --- |"]
    for key, target in TARGETS.items():
        value = values[key]
        ratio = "-" if value is None else f"{value / target.limit:.2f}"
        shown = "-" if value is None else f"{_num(value)} {target.unit}"
        if fastest.get(key) is not None:
            shown += f" (fastest {_num(fastest[key])} {target.unit})"
            ratio += f" ({fastest[key] / target.limit:.2f})"
        rows.append(f"| {target.what} | {target.reference} | {target.limit:g} {target.unit} | {shown} | {ratio} |")
    return rows


def step_rows(latest: dict[str, dict]) -> list[str]:
    rows = [("| setting | ours median s (min) | ours CPU s | floor median s (min) | floor CPU s | overhead "
             "median / min / CPU | system s, 1000 page faults per step: ours / floor | peak RSS ours (steps) | "
             "peak RSS floor (steps) | load avg |"),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, ours in latest.items():
        if not name.startswith("train_step/"):
            continue
        setting = name.removeprefix("train_step/")
        floor, overhead = latest.get(f"floor_step/{setting}"), latest.get(f"overhead/{setting}")
        floor_cells = ["-", "-", "-", "-"]
        if floor is not None:
            floor_cells = [f"{floor['seconds']:.3g} ({floor['seconds_min']:.3g})", f"{floor['step_cpu_seconds']:.3g}",
                           f"{_gib(floor['peak_rss_bytes'])} ({_gib(floor.get('peak_rss_training_bytes'))})",
                           _faults(floor)]
        ratios = "-"
        if overhead is not None:
            ratios = " / ".join(f"{overhead[key]:.2f}" for key in ("overhead_ratio", "overhead_ratio_min",
                                                                   "overhead_ratio_cpu"))
        rows.append(
            f"| {setting} | {ours['seconds']:.3g} ({ours['seconds_min']:.3g}) | {ours['step_cpu_seconds']:.3g} | "
            f"{floor_cells[0]} | {floor_cells[1]} | {ratios} | {_faults(ours)} / {floor_cells[3]} | "
            f"{_gib(ours['peak_rss_bytes'])} ({_gib(ours.get('peak_rss_training_bytes'))}) | {floor_cells[2]} | "
            f"{ours['load_average'][0]:.1f} |"
        )
    return rows


def phase_rows(latest: dict[str, dict]) -> list[str]:
    rows = [("| run | python started | train() | models placed | cache start | loader made | first step | "
            "model load s | latent caching s | RSS at 1st step | peak RSS before 1st step |"),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, record in latest.items():
        if not name.startswith("train_step/"):
            continue
        phases = record["phases"]
        cells = [_num(phases.get(key), 1) for key in ("python_started", "train", "_place_models",
                                                      "cache_dataset_latents", "_make_dataloader", "first_step")]
        rows.append(f"| {name.removeprefix('train_step/')} | {' | '.join(cells)} | "
                    f"{_num(phases.get('model_load_seconds'), 1)} | {_num(record.get('latent_caching_seconds'), 1)} | "
                    f"{_gib(record['rss_at_first_step_bytes'])} | {_gib(record['peak_rss_before_first_step_bytes'])} |")
    return rows


def data_rows(latest: dict[str, dict]) -> list[str]:
    rows = ["| measurement | seconds | batches/s | batches per tiny step | peak RSS |",
            "| --- | --- | --- | --- | --- |"]
    for name, record in latest.items():
        if name.startswith("loader/"):
            rows.append(f"| {name} | {record['seconds']:.3g} per batch | {record['batches_per_second']:g} | "
                        f"{_num(record.get('batches_per_step'), 0)} | {_gib(record['peak_rss_bytes'])} |")
        elif name.startswith("dataset_startup"):
            rows.append(f"| {name} ({record['settings'].get('images')} images) | {record['seconds']:.3g} | - | - | "
                        f"{_gib(record['peak_rss_bytes'])} |")
    return rows


def load_summary(records: list[dict]) -> str:
    loads = [record["load_average"][0] for record in records if record.get("load_average")]
    if not loads:
        return "no load averages recorded"
    return (f"1-minute load average over the records: median {statistics.median(loads):.1f}, min {min(loads):.1f}, "
            f"max {max(loads):.1f} (2 cores; above 2 the benchmark shared the cores with other work)")


def render(records: list[dict], title: str) -> str:
    latest = newest(records)
    sections = [
        f"# {title}", "", load_summary(records), "", "## Targets (issue 9)", "", *target_rows(latest), "",
        "## Training steps: ours and the floor, interleaved", "", *step_rows(latest), "",
        "## Launch to first step (seconds from the launch) and memory", "", *phase_rows(latest), "",
        "## Data", "", *data_rows(latest), "", "## All JSON lines", "", "```",
        *(json.dumps(record) for record in records), "```", "",
    ]
    return "\n".join(sections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="file of JSON lines")
    parser.add_argument("--out", default=None, help="Markdown file (default: the results file with .md)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--notes", default=None,
                        help="a Markdown file whose text is put after the tables (default: <results>.notes.md if any)")
    args = parser.parse_args()
    out = args.out or os.path.splitext(args.results)[0] + ".md"
    notes = args.notes or os.path.splitext(args.results)[0] + ".notes.md"
    title = args.title or f"Benchmark results: {os.path.splitext(os.path.basename(args.results))[0]}"
    text = render(read_records(args.results), title)
    if os.path.isfile(notes):
        with open(notes, encoding="utf-8") as handle:
            head, tail = text.split("## All JSON lines", 1)
            text = head + handle.read().rstrip() + "\n\n## All JSON lines" + tail
    with open(out, "w", encoding="utf-8") as handle:
        handle.write(text)
    print(out)


if __name__ == "__main__":
    main()
