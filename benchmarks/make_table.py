"""Regenerate the README's benchmark table from the newest committed results.

    python benchmarks/make_table.py          # rewrites README.md between the markers
    python benchmarks/make_table.py --check  # exit 1 if README.md is out of date

The table is never typed by hand: it is the 'summary' rows of every suite of the newest
full (non-smoke) results file per device under benchmarks/results/, CPU and GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def newest_results(results_dir: Path) -> list:
    """Newest non-smoke results file for each device, GPUs first."""
    by_device = {}
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("smoke") or "suites" not in data:  # smoke runs and single-suite files
            continue
        env = data["environment"]
        key = env["device"]
        if key not in by_device or env["date"] > by_device[key][1]["environment"]["date"]:
            by_device[key] = (path, data)
    return sorted(by_device.values(), key=lambda pd: pd[1]["environment"]["device"].startswith("CPU"))


def render(results_dir: Path) -> str:
    sys.path.insert(0, str(ROOT))
    from pfgmpp_fast.utils.benchmarking import markdown_table

    found = newest_results(results_dir)
    if not found:
        return "_No benchmark results committed yet: run `python -m pfgmpp_fast bench`._\n"
    parts = []
    for path, data in found:
        env, ceil = data["environment"], data["ceilings"]
        parts.append(
            f"**{env['device']}** — {env['date'][:10]}, torch {env['torch']}, triton {env['triton']}; "
            f"ceilings measured in the same run: copy {ceil['copy_GBps']:.1f} GB/s, "
            f"bf16 matmul {ceil['bf16_matmul_TFLOPs']:.2f} TFLOP/s "
            f"([full results]({path.relative_to(ROOT).with_suffix('.md')}))\n"
        )
        rows = []
        for name, res in data["suites"].items():
            if "error" in res:
                rows.append({"suite": name, "result": f"failed ({res['error']})"})
                continue
            for r in (res.get("summary") or [])[:12]:
                rows.append({"suite": name, **r})
        parts.append(markdown_table(rows))
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    args = parser.parse_args()
    readme = Path(args.readme)
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"{readme} has no {START} ... {END} markers", file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = head + START + "\n" + render(ROOT / "benchmarks" / "results") + END + tail
    if args.check:
        return 0 if new == text else 1
    if new != text:
        readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
