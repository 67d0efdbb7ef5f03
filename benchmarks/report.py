"""Turn pytest-benchmark JSON into a markdown report (and a PNG plot when matplotlib is installed).

    pytest benchmarks/ --benchmark-json=benchmarks/results/h100.json
    python -m benchmarks.report benchmarks/results/h100.json        # -> benchmarks/results/h100.md (+ .png)
    python -m benchmarks.report                                     # every benchmarks/results/*.json

The tables read each row's ``extra_info`` (written by ``benchmarks/common.py``): op rows give microseconds, achieved
GB/s and % of the GPU's measured copy bandwidth (H100 3.0, H200 4.3 TB/s); model and training rows give images
(clips) per second and peak memory. Rows without a ``suite`` (other suites' benchmarks) are listed with
pytest-benchmark's own median.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
OP_IMPLS = ("fused", "triton-global", "eager", "official-5d", "flex")
# implementations are "base[+mode]" (benchmarks/peers.py): columns go base by base, each base's modes in this order
MODEL_BASES = ("fused", "eager", "timm", "hiera-optim", "transformers", "official", "vit")
MODES = ("", "compile", "cudagraphs", "max-autotune-no-cudagraphs", "max-autotune")
HIERA_PEERS = ("timm", "hiera-optim", "transformers", "official")  # the Hiera implementations a user could run


def _split(impl: str) -> tuple[str, str]:
    base, _, mode = impl.partition("+")
    return base, mode


def _model_order(impls: set[str]) -> list[str]:
    def key(impl):
        base, mode = _split(impl)
        return (MODEL_BASES.index(base) if base in MODEL_BASES else len(MODEL_BASES), base,
                MODES.index(mode) if mode in MODES else len(MODES), mode)

    return sorted(impls, key=key)
PEAK_TBPS = 3.0  # rows without their own peak_tbps (older results): the H100's


# ---------------------------------------------------------------------------------------------- loading
def load_rows(path: Path) -> tuple[list[dict], dict]:
    """(rows, file metadata): one row per benchmark, ``extra_info`` plus ``name``, ``group``, ``stats_median_ms``."""
    data = json.loads(Path(path).read_text())
    rows = []
    for b in data.get("benchmarks", []):
        row = dict(b.get("extra_info") or {})
        row.setdefault("name", b.get("name"))
        row["fullname"] = b.get("fullname")
        row["group"] = b.get("group")
        stats = b.get("stats") or {}
        row["stats_median_ms"] = stats["median"] * 1e3 if "median" in stats else None
        row.setdefault("median_ms", row["stats_median_ms"])
        rows.append(row)
    meta = {"datetime": data.get("datetime"), "machine": data.get("machine_info", {}),
            "commit": data.get("commit_info", {})}
    return rows, meta


# ---------------------------------------------------------------------------------------------- formatting
def _num(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _gib(x) -> str:
    return "–" if x is None else f"{x / 2**30:.2f}"


def _table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def _ordered(impls: set[str], preferred: tuple[str, ...]) -> list[str]:
    return [i for i in preferred if i in impls] + sorted(impls - set(preferred))


def _speedup(a, b) -> str:
    """How many times faster ``a`` is than ``b`` (both ms)."""
    if not a or not b:
        return "–"
    return f"{b / a:.2f}x"


# ---------------------------------------------------------------------------------------------- sections
# op timers, headline first: (extra_info key, prefix of the row's bandwidth figures for that time, what the
# table's heading says it measured). The figures are benchmarks.attention_calls.bandwidth's, stored by test_bench_ops.
OP_TIMERS = (("graph_ms", "graph_", "GPU time (calls captured in a CUDA graph, no launch cost)"),
             ("median_ms", "", "with launches (`triton.testing.do_bench`; host time where the host is the slower)"))


def op_section(rows: list[dict], plots: list) -> list[str]:
    """One table per (model, dtype, pass) and timer: the GPU time alone (``graph_ms``) where the rows have it, then
    the do_bench time with launches (``median_ms``)."""
    out = []
    by_key = defaultdict(list)
    for r in rows:
        by_key[(r.get("model"), r.get("dtype"), r.get("pass"))].append(r)
    for (model, dtype, pass_), group in sorted(by_key.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        for key, prefix, timer in OP_TIMERS:
            if any(r.get(key) is not None for r in group):
                out += _op_table(group, model, dtype, pass_, key, prefix, timer, plots)
        errors = sorted({(r["impl"], r.get("geometry") or r.get("case"), r["graph_error"])
                         for r in group if r.get("graph_error")})
        if errors:
            out += ["Not captured in a CUDA graph (no GPU-time figure):", ""]
            out += [f"- {impl}, {case}: {err}" for impl, case, err in errors] + [""]
    return out


def _op_table(group: list[dict], model, dtype, pass_, key: str, prefix: str, timer: str, plots: list) -> list[str]:
    impls = _ordered({r["impl"] for r in group}, OP_IMPLS)
    cells: dict[tuple, dict] = defaultdict(dict)
    order = []
    for r in group:
        case = r.get("geometry") or r.get("case")
        if case not in cells:
            order.append((r.get("where", ""), case))
        cells[case][r["impl"]] = r
    order.sort()
    header = ["attention call", "calls", "batch"] + [f"{i}: µs (GB/s, % peak)" for i in impls]
    if "fused" in impls:
        header += [f"fused vs {i}" for i in impls if i != "fused"]
    peak_tbps = next((r["peak_tbps"] for r in group if r.get("peak_tbps")), PEAK_TBPS)  # rows of one GPU
    lines = []
    per_image = defaultdict(float)  # µs of all the model's calls per image (sum over calls)
    floor_per_image = 0.0
    complete = defaultdict(lambda: True)
    pct = {i: [] for i in impls}
    for _, case in order:
        c = cells[case]
        any_row = next(iter(c.values()))
        line = [case, any_row.get("calls", ""), any_row.get("batch", "")]
        batch, calls = any_row.get("batch") or 1, any_row.get("calls") or 1
        floor_per_image += (any_row.get("floor_ms") or 0.0) * 1e3 / batch * calls
        for i in impls:
            r = c.get(i)
            if r is None or r.get(key) is None:
                line.append("–")
                complete[i] = False
                pct[i].append(None)
                continue
            us = r[key] * 1e3
            per_image[i] += us / batch * calls
            gb_per_s, pct_of_peak = r.get(f"{prefix}gb_per_s"), r.get(f"{prefix}pct_of_peak")
            pct[i].append(pct_of_peak)
            line.append(f"{_num(us)} ({_num(gb_per_s)}, {_num(pct_of_peak, 2)}%)" if gb_per_s is not None
                        else _num(us))
        if "fused" in impls:
            fused = c.get("fused", {}).get(key)
            line += [_speedup(fused, c.get(i, {}).get(key)) for i in impls if i != "fused"]
        lines.append(line)
    total = ["**all calls, µs per image**", "", ""]
    total += [(_num(per_image[i]) if complete[i] else f"({_num(per_image[i])}, incomplete)") for i in impls]
    if "fused" in impls:
        total += [_speedup(per_image["fused"], per_image[i]) if complete[i] and complete["fused"] else "–"
                  for i in impls if i != "fused"]
    lines.append(total)
    out = [f"### Attention ops: {model}, {dtype}, {pass_}: {timer}", "", _table(header, lines), ""]
    out.append(f"Bytes floor (read qkv once, write out once{', plus the backward' if pass_ == 'fwd+bwd' else ''}) "
               f"at {peak_tbps} TB/s: {_num(floor_per_image)} µs per image for all calls.")
    out.append("")
    short = "GPU time" if key == "graph_ms" else "do_bench"
    plots.append((f"{model} {dtype} {pass_} ({short}): % of {peak_tbps} TB/s", [k for _, k in order], pct,
                  "% of peak"))
    return out


def throughput_section(rows: list[dict], plots: list, title: str) -> list[str]:
    out = []
    by_group = defaultdict(list)
    for r in rows:
        by_group[(r.get("dtype"), r.get("unit"), r.get("mode"))].append(r)
    for (dtype, unit, mode), group in sorted(by_group.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        impls = _model_order({r["impl"] for r in group})
        cells: dict[str, dict] = defaultdict(dict)
        order = []
        for r in group:
            if r["case"] not in cells:
                order.append(r["case"])
            cells[r["case"]][r["impl"]] = r
        ours = [i for i in impls if _split(i)[0] == "fused"]
        compiled_peers = [i for i in impls if _split(i)[0] in HIERA_PEERS and _split(i)[1]]
        eager_peers = [i for i in impls if _split(i)[0] in HIERA_PEERS and not _split(i)[1]]
        vits = [i for i in impls if _split(i)[0] == "vit"]
        ratios = [(label, group_) for label, group_ in (("best compiled Hiera peer", compiled_peers),
                                                        ("best eager Hiera peer", eager_peers),
                                                        ("ViT-B/16 (best)", vits)) if group_]
        kernel_share = [(f, f.replace("fused", "eager", 1)) for f in ours if f.replace("fused", "eager", 1) in impls]
        header = ["model", "batch"] + [f"{i}: {unit} (peak GiB)" for i in impls]
        header += [f"best fused vs {label}" for label, _ in ratios]
        header += [f"{f} vs {e}" for f, e in kernel_share]
        lines = []
        for case in order:
            c = cells[case]
            any_row = next(iter(c.values()))
            line = [any_row.get("model", case), any_row.get("batch", "")]
            for i in impls:
                r = c.get(i)
                cell = f"{_num(r.get('items_per_s'))} ({_gib(r.get('peak_memory_bytes'))})" if r else "–"
                line.append(cell)

            def best(names):
                return min((c[i]["median_ms"] for i in names if i in c and c[i].get("median_ms")), default=None)

            line += [_speedup(best(ours), best(group_)) for _, group_ in ratios]
            line += [_speedup(c.get(f, {}).get("median_ms"), c.get(e, {}).get("median_ms")) for f, e in kernel_share]
            lines.append(line)
        out.append(f"### {title}: {dtype}, {mode}")
        out.append("")
        out.append(_table(header, lines))
        out.append("")
        plots.append((f"{title} ({dtype}, {mode})", order,
                      {i: [cells[k].get(i, {}).get("items_per_s") for k in order] for i in impls}, unit or "items/s"))
    return out


def cpu_op_section(rows: list[dict], plots: list) -> list[str]:
    cells: dict[str, dict] = defaultdict(dict)
    for r in rows:
        cells[r.get("geometry") or r["case"]][r["impl"]] = r
    impls = _ordered({r["impl"] for r in rows}, ("eager", "official-5d"))
    header = ["attention call", "batch"] + [f"{i}: µs" for i in impls]
    if {"eager", "official-5d"} <= set(impls):
        header.append("eager vs official-5d")
    lines = []
    for key, c in cells.items():
        any_row = next(iter(c.values()))
        line = [key, any_row.get("batch", "")] + [_num(c[i]["median_ms"] * 1e3) if i in c else "–" for i in impls]
        if {"eager", "official-5d"} <= set(impls):
            line.append(_speedup(c.get("eager", {}).get("median_ms"), c.get("official-5d", {}).get("median_ms")))
        lines.append(line)
    first = rows[0]
    plots.append((f"CPU attention ops, {first.get('dtype')} forward: µs", list(cells),
                  {i: [c[i]["median_ms"] * 1e3 if i in c else None for c in cells.values()] for i in impls}, "µs"))
    title = f"### CPU attention ops: {first.get('model')}, {first.get('dtype')}, forward"
    return [title, "", _table(header, lines), ""]


def patch_section(rows: list[dict], plots: list) -> list[str]:
    """``benchmarks/test_bench_patch.py``: a library's model before and after ``hiera_fast.patch``."""
    header = ["library", "model", "batch", "dtype", "unpatched images/s", "patched images/s", "speed-up",
              "max rel. error"]
    lines = [[f"{r.get('library')} {r.get('library_version', '')}".strip(), r.get("model", ""), r.get("batch", ""),
              r.get("dtype", ""), _num(r.get("unpatched_images_per_s")), _num(r.get("patched_images_per_s")),
              f"{r['speedup']:.2f}x" if r.get("speedup") else "–", _num(r.get("max_rel_err"), 2)] for r in rows]
    plots.append(("hiera_fast.patch: images/s", [r.get("library") for r in rows],
                  {"unpatched": [r.get("unpatched_images_per_s") for r in rows],
                   "patched": [r.get("patched_images_per_s") for r in rows]}, "images/s"))
    return ["## Drop-in patch (`hiera_fast.patch`)", "", _table(header, lines), ""]


def other_section(rows: list[dict]) -> list[str]:
    lines = [[r.get("group") or "", r.get("name") or "", _num(r.get("stats_median_ms"))] for r in rows]
    return ["### Other benchmarks", "", _table(["group", "name", "median ms"], lines), ""]


def environment_lines(rows: list[dict], meta: dict) -> list[str]:
    def values(key):
        return sorted({str(r[key]) for r in rows if r.get(key) is not None})

    devices = sorted(set(values("device")) | set(values("gpu")))
    lines = [f"- device: {', '.join(devices) or meta['machine'].get('cpu', {}).get('brand_raw', '?')}",
             f"- torch {', '.join(values('torch')) or '?'}, triton {', '.join(values('triton')) or '?'}, "
             f"CUDA {', '.join(values('cuda')) or '–'}, hiera-fast {', '.join(values('hiera_fast')) or '?'}",
             f"- date: {', '.join(sorted({d[:10] for d in values('date')})) or meta.get('datetime') or '?'}"]
    commit = meta.get("commit") or {}
    if commit.get("id") and commit["id"] != "unversioned":
        lines.append(f"- commit: {commit['id'][:12]}{' (dirty)' if commit.get('dirty') else ''}")
    if any(r.get("smoke") for r in rows):
        lines.append("- **smoke run (--bench-smoke): toy sizes to exercise the code; the numbers mean nothing**")
    return lines


def render(rows: list[dict], meta: dict, name: str) -> tuple[str, list]:
    plots: list = []
    out = [f"# hiera-fast benchmarks: {name}", ""] + environment_lines(rows, meta) + [""]
    suites = defaultdict(list)
    for r in rows:
        suites[r.get("suite") or "other"].append(r)
    if suites.get("op"):
        timers = ("Two timers, each table names its own: *GPU time* captures the calls in one CUDA graph and "
                  "replays them back to back (`triton.testing.do_bench_cudagraph`, median; L2 not flushed), so it "
                  "measures the kernels; *with launches* is `triton.testing.do_bench`'s median of calls launched from "
                  "Python one by one after an L2 flush, which is host time wherever the host takes longer to launch "
                  "a call than the GPU takes to run it. "
                  if any(r.get("graph_ms") is not None for r in suites["op"]) else
                  "µs = median of `triton.testing.do_bench` (calls launched from Python one by one, L2 flushed). ")
        out += ["## Attention ops (GPU)", "",
                timers + "GB/s counts the least traffic any implementation needs "
                "(read qkv once, write the output once; the backward also reads qkv, out and d_out and writes d_qkv); "
                "% of the GPU's measured copy bandwidth (H100 3.0 TB/s, H200 4.3 TB/s; each table's floor line names "
                "it). `official-5d` is the official model's 5-D SDPA call (the baseline), `eager` our 4-D SDPA "
                "reference, `flex` FlexAttention with a window block mask.", ""]
        out += op_section(suites["op"], plots)
    if suites.get("model"):
        out += ["## Models: inference throughput", "",
                "Same weights and inputs for every implementation; peak memory is `torch.cuda.max_memory_allocated` "
                "over one run, weights included.", ""]
        out += throughput_section(suites["model"], plots, "Inference")
    if suites.get("train"):
        out += ["## Training: one MAE step", "", "Forward + backward + fused AdamW under autocast; peak memory "
                "includes weights, optimizer state and activations.", ""]
        out += throughput_section(suites["train"], plots, "MAE training step")
    if suites.get("cpu-model"):
        out += ["## CPU", "", "On a CPU only the eager paths run; these rows compare the peers' cost there and say "
                "nothing about the GPU kernels.", ""]
        out += throughput_section(suites["cpu-model"], plots, "CPU inference")
    if suites.get("cpu-op"):
        out += cpu_op_section(suites["cpu-op"], plots)
    if suites.get("patch"):
        out += patch_section(suites["patch"], plots)
    known = {"op", "model", "train", "cpu-model", "cpu-op", "patch"}
    other = [r for suite, group in suites.items() if suite not in known for r in group]
    if other:
        out += other_section(other)
    return "\n".join(out).rstrip() + "\n", plots


# ---------------------------------------------------------------------------------------------- plot
def plot(plots: list, path: Path, title: str = "") -> str:
    """Write the PNG; returns a line saying what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipped the plot (pip install 'hiera-fast[plot]')"
    plots = [p for p in plots if p[1]]
    if not plots:
        return "nothing to plot"
    cols = 2 if len(plots) > 1 else 1
    rows = math.ceil(len(plots) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(8 * cols, 4.5 * rows), squeeze=False)
    for ax, (panel, categories, series, ylabel) in zip(axes.flat, plots):
        width = 0.8 / max(1, len(series))
        for k, (impl, values) in enumerate(series.items()):
            xs = [i + k * width for i in range(len(categories))]
            ax.bar(xs, [v if v is not None else 0 for v in values], width, label=impl)
        ax.set_title(panel, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))])
        ax.set_xticklabels([str(c)[:40] for c in categories], rotation=30, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(plots):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*", type=Path, help="pytest-benchmark JSON files (default: "
                                                          "benchmarks/results/*.json)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (default: benchmarks/results/)")
    parser.add_argument("--no-plot", action="store_true", help="markdown only")
    args = parser.parse_args(argv)
    paths = args.json or sorted(RESULTS.glob("*.json"))
    if not paths:
        print("report: no JSON given and none in benchmarks/results/; run e.g. `pytest benchmarks/ "
              "--benchmark-json=benchmarks/results/h100.json` first", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        try:
            rows, meta = load_rows(path)
        except (OSError, json.JSONDecodeError) as err:
            print(f"report: cannot read {path}: {err}", file=sys.stderr)
            return 2
        if not rows:
            print(f"report: {path} holds no benchmark rows (were all cases skipped?)", file=sys.stderr)
            continue
        text, plots = render(rows, meta, path.stem)
        md = args.out / f"{path.stem}.md"
        md.write_text(text)
        print(f"wrote {md} ({len(rows)} rows)")
        if not args.no_plot:
            devices = sorted({str(r.get("device") or r.get("gpu")) for r in rows if r.get("device") or r.get("gpu")})
            smoke = " (smoke run: toy sizes, numbers meaningless)" if any(r.get("smoke") for r in rows) else ""
            print(plot(plots, args.out / f"{path.stem}.png", f"hiera-fast {path.stem}: {', '.join(devices)}{smoke}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
