"""Benchmark report: the JSON written by ``textserve bench`` → Markdown tables and a PNG."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.run import ABLATION_WAIT_MS, WAIT

KINDS = {"batch": "64 texts/request", "single": "1 text/request"}
SERVERS = ("textserve", "naive", "textserve-2w")
WORKERS2_TITLE = "textserve --workers 2"


def _runs(model: dict[str, Any], server: str) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = model.get("servers", {}).get(server, {}).get("runs", [])
    return runs


def _find(model: dict[str, Any], server: str, kind: str, c: int) -> dict[str, Any] | None:
    return next(
        (r for r in _runs(model, server) if r["kind"] == kind and r["connections"] == c), None
    )


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}"


def vs_ceiling(run: dict[str, Any] | None, model: dict[str, Any]) -> float | None:
    """HTTP texts/s ÷ the ceiling, paired by repetition: each repetition's HTTP figure over the
    ceiling sampled at that repetition's start, median over repetitions (the ceiling drifts
    with the machine's load). Unpaired medians when the sample counts differ."""
    if run is None:
        return None
    ceiling = model["ceiling"]
    samples = [s["texts_per_s"] for s in ceiling.get("runtime_samples", [])]
    http = [s["texts_per_s"] for s in run.get("samples", [])]
    if samples and len(samples) == len(http) and all(samples):
        return float(statistics.median(h / c for h, c in zip(http, samples, strict=True)))
    rt = ceiling["runtime"]["texts_per_s"]
    return float(run["texts_per_s"] / rt) if rt else None


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "–" if x is None else fmt.format(x)


def _cpu(rate: dict[str, Any]) -> str:
    return _num(rate.get("cpu_us_per_text"), "{:,.1f}")


def _get(run: dict[str, Any] | None, key: str) -> float | None:
    return None if run is None else float(run[key])


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        "# textserve load benchmark",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}, host: {meta['cpu_count']} CPUs ({meta['cpu_model']}), "
        f"TensorFlow {meta['tensorflow']}, Python {meta['python']}.  ",
        f"Mode: {meta['mode']}; each load point runs {meta['duration_s']:g} s, "
        f"{meta['repeats']} time(s), servers interleaved back to back "
        f"(`wrk -t1 -cN -s bench/post.lua`, bodies from real WordNet glosses).  ",
        f"CPUs: {meta['cpu_note']}",
        "",
        "Throughput counts texts in 2xx responses; latency is per request (wrk's distribution). "
        "Figures are medians over the repetitions.",
        "`vs ceiling` = HTTP texts/s ÷ in-process `Runtime.predict` texts/s at batch 64, paired "
        "by repetition (the ceiling is sampled at the start of each repetition; median of the "
        "per-repetition ratios); "
        "`ts/naive` = textserve texts/s ÷ naive texts/s, median of the back-to-back pairs. "
        "`CPU us/text` = server process CPU time (all threads) ÷ texts answered: what a text "
        "costs, which unlike texts/s does not depend on how much CPU other tenants left over.",
        f"Machine load (1-min load average) during the runs: {meta.get('loadavg', '–')}; "
        "other work shared these cores, so compare ratios, not absolute figures.",
        "",
    ]
    for model in result["models"]:
        lines += _model_section(model)
    return "\n".join(lines) + "\n"


def _samples(ceiling: dict[str, Any]) -> str:
    rates = [s["texts_per_s"] for s in ceiling.get("runtime_samples", [])]
    if len(rates) < 2:
        return ""
    return "; median of " + " / ".join(f"{r:,.0f}" for r in rates)


def _model_section(model: dict[str, Any]) -> list[str]:
    ceiling = model["ceiling"]
    rt = ceiling["runtime"]["texts_per_s"]
    raw = ceiling.get("raw")
    tok = ceiling.get("tokenize")
    lines = [
        f"## {model['title']}",
        "",
        f"Texts: {model['texts']} (mean {model['mean_tokens']:.1f} tokens).",
        "",
        "| in-process ceiling (batch 64) | texts/s | median call ms | CPU us/text |",
        "|---|---:|---:|---:|",
        f"| `Runtime.predict` (the server's runtime{_samples(ceiling)}) | {rt:,.0f} | "
        f"{ceiling['runtime']['p50_ms']:.2f} | {_cpu(ceiling['runtime'])} |",
    ]
    if raw:
        lines.append(
            f"| raw `session.run`, embedding as a graph variable | {raw['texts_per_s']:,.0f} | "
            f"{raw['p50_ms']:.2f} | {_cpu(raw)} |"
        )
    two = ceiling.get("two_callers")
    if two:
        lines.append(
            f"| `Runtime.predict` from 2 threads at once (1 intra-op + 2 inter-op threads) | "
            f"{two['texts_per_s']:,.0f} | {two['p50_ms']:.2f} | {_cpu(two)} |"
        )
    if tok:
        lines.append(
            f"| tokenize + pad only (1 thread) | {tok['texts_per_s']:,.0f} | {tok['p50_ms']:.2f} "
            f"| {_cpu(tok)} |"
        )
    lines += [
        "",
        "| request | conc. | textserve texts/s | p50 ms | p99 ms | CPU us/text | naive texts/s | "
        "p50 ms | p99 ms | CPU us/text | ts/naive texts/s | naive/ts CPU per text | "
        "ts vs ceiling | naive vs ceiling |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, label in KINDS.items():
        conns = sorted(
            {r["connections"] for s in SERVERS for r in _runs(model, s) if r["kind"] == kind}
        )
        for c in conns:
            t = _find(model, "textserve", kind, c)
            n = _find(model, "naive", kind, c)
            tt = t["texts_per_s"] if t else None
            nt = n["texts_per_s"] if n else None
            paired = t.get("paired_ratio_vs_naive") if t else None
            vs_naive = f"{paired:.2f}" if paired is not None else _ratio(tt, nt)
            tc = t.get("server_cpu_us_per_text") if t else None
            nc = n.get("server_cpu_us_per_text") if n else None
            lines.append(
                f"| {label} | {c} | {_num(tt)} | {_num(_get(t, 'p50_ms'), '{:.1f}')} | "
                f"{_num(_get(t, 'p99_ms'), '{:.1f}')} | {_num(tc)} | {_num(nt)} | "
                f"{_num(_get(n, 'p50_ms'), '{:.1f}')} | {_num(_get(n, 'p99_ms'), '{:.1f}')} | "
                f"{_num(nc)} | {vs_naive} | {_ratio(nc, tc)} | "
                f"{_num(vs_ceiling(t, model), '{:.2f}')} | {_num(vs_ceiling(n, model), '{:.2f}')} |"
            )
    lines += [
        "",
        "| server | request | conc. | non-2xx | socket errors | server cores | wrk cores |",
    ]
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    for s in SERVERS:
        for r in _runs(model, s):
            lines.append(
                f"| {s} | {KINDS[r['kind']]} | {r['connections']} | {r['non_2xx']} | "
                f"{r['socket_errors']} | {r['server_cores']:.2f} | {r['wrk_cores']:.2f} |"
            )
    for s in SERVERS:
        info = model.get("servers", {}).get(s)
        if info:
            mem = info.get("memory", {})
            lines.append("")
            procs = mem.get("processes", 1)
            lines.append(
                f"{s}: ready in {info['ready_s']:.1f} s; {procs} process(es), RSS "
                f"{mem.get('rss', 0) / 2**20:,.0f} MiB (summed), USS "
                f"{mem.get('uss', 0) / 2**20:,.0f} MiB, PSS {mem.get('pss', 0) / 2**20:,.0f} MiB "
                f"after the runs; settings {info.get('settings') or 'defaults'}."
            )
    lines += _workers(model)
    lines += _ablation(model)
    lines += _batcher(model.get("batcher"))
    lines.append("")
    return lines


def _workers(model: dict[str, Any]) -> list[str]:
    runs = _runs(model, "textserve-2w")
    if not runs:
        return []
    lines = [
        "",
        f"`{WORKERS2_TITLE}` (two processes on one port, same CPUs) vs the default one process:",
        "",
        "| request | conc. | 2 workers texts/s | p50 ms | p99 ms | CPU us/text | vs ceiling | "
        "vs 2-caller ceiling | 2w/naive texts/s | 1 process texts/s | 2w / 1 process |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    two = model["ceiling"].get("two_callers")
    two_rate = two["texts_per_s"] if two else None
    for r in runs:
        one = _get(_find(model, "textserve", r["kind"], r["connections"]), "texts_per_s")
        paired = r.get("paired_ratio_vs_naive")
        lines.append(
            f"| {KINDS[r['kind']]} | {r['connections']} | {r['texts_per_s']:,.0f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {_num(r.get('server_cpu_us_per_text'))} | "
            f"{_num(vs_ceiling(r, model), '{:.2f}')} | {_ratio(r['texts_per_s'], two_rate)} | "
            f"{'–' if paired is None else f'{paired:.2f}'} | "
            f"{_num(one)} | {_ratio(r['texts_per_s'], one)} |"
        )
    return lines


def _ablation(model: dict[str, Any]) -> list[str]:
    runs = _runs(model, WAIT)
    if not runs:
        return []
    lines = [
        "",
        f"max_wait_ms ablation (textserve, 1 text/request): default 0 ms vs {ABLATION_WAIT_MS} ms",
        "",
        f"| conc. | 0 ms texts/s | p99 ms | {ABLATION_WAIT_MS} ms texts/s | p99 ms |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        d = _find(model, "textserve", r["kind"], r["connections"])
        lines.append(
            f"| {r['connections']} | {_num(_get(d, 'texts_per_s'))} | "
            f"{_num(_get(d, 'p99_ms'), '{:.1f}')} | {r['texts_per_s']:,.0f} | {r['p99_ms']:.1f} |"
        )
    return lines


def _batcher(effects: dict[str, Any] | None) -> list[str]:
    if not effects:
        return []
    lines = ["", "Batcher choices, measured in-process on the same runtime:", ""]
    g = effects.get("length_grouping")
    if g:
        lines.append(
            f"- length grouping, one request of {g['texts']} texts "
            f"({g['tokens_min']}-{g['tokens_max']} tokens, median {g['tokens_median']}): "
            f"arrival order {g['arrival_order']['median_ms']:.1f} ms "
            f"({g['arrival_order']['padded_fraction']:.0%} padding) vs grouped "
            f"{g['grouped']['median_ms']:.1f} ms ({g['grouped']['padded_fraction']:.0%} padding): "
            f"{g['speedup']:.2f}x."
        )
    f = effects.get("in_flight")
    if f:
        one, two = f["max_in_flight_1"], f["max_in_flight_2"]
        lines.append(
            f"- predicts in flight, {f['clients']} closed-loop clients x 1 text: 1 → "
            f"{one['texts_per_s']:,.0f} texts/s (p99 {one['p99_ms']:.1f} ms); 2 → "
            f"{two['texts_per_s']:,.0f} texts/s (p99 {two['p99_ms']:.1f} ms)."
        )
    return lines


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(len(models), 3, figsize=(16, 4.2 * len(models)), squeeze=False)
    styles = {"textserve": "-", "naive": "--", "textserve-2w": "-."}
    markers = {"batch": "o", "single": "s"}
    for row, model in zip(axes, models, strict=True):
        tp, p99, cpu = row
        for s in SERVERS:
            for kind, label in KINDS.items():
                runs = sorted(
                    (r for r in _runs(model, s) if r["kind"] == kind),
                    key=lambda r: r["connections"],
                )
                if not runs:
                    continue
                xs = [r["connections"] for r in runs]
                name = f"{s}, {label}"
                tp.plot(
                    xs,
                    [r["texts_per_s"] for r in runs],
                    styles[s],
                    marker=markers[kind],
                    label=name,
                )
                p99.plot(
                    xs, [r["p99_ms"] for r in runs], styles[s], marker=markers[kind], label=name
                )
                cpu.plot(
                    xs,
                    [r.get("server_cpu_us_per_text") for r in runs],
                    styles[s],
                    marker=markers[kind],
                    label=name,
                )
        ceiling = model["ceiling"]["runtime"]["texts_per_s"]
        tp.axhline(ceiling, color="grey", linestyle=":", label="ceiling: Runtime.predict, batch 64")
        tp.set(
            xscale="log",
            yscale="log",
            xlabel="concurrent connections",
            ylabel="texts/s",
            title=f"{model['key']}: throughput",
        )
        p99.set(
            xscale="log",
            yscale="log",
            xlabel="concurrent connections",
            ylabel="p99 ms",
            title=f"{model['key']}: p99 latency",
        )
        cpu_ceiling = model["ceiling"]["runtime"].get("cpu_us_per_text")
        if cpu_ceiling:
            cpu.axhline(cpu_ceiling, color="grey", linestyle=":", label="ceiling")
        cpu.set(
            xscale="log",
            yscale="log",
            xlabel="concurrent connections",
            ylabel="server CPU us per text",
            title=f"{model['key']}: CPU cost per text",
        )
        for ax in row:
            ax.grid(True, which="both", alpha=0.3)
        tp.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
