"""results.md of an evaluation: Table 1 (metrics as rows, variants as columns) and the few-shot tables.

K-class evaluations (``data.num_classes`` > 2) add per-class Dice tables; a binary report is unchanged."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.fewshot import ROW_LABELS, ROWS


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _dice_cell(d: dict[str, Any] | None) -> str:
    if not d:
        return "–"
    return f"{d['dice']['mean']:.3f} (±{d['dice']['std']:.3f})"


def num_classes(r: dict[str, Any]) -> int:
    return int(r.get("data", {}).get("num_classes", 2))


def _class_note(r: dict[str, Any]) -> str:
    k = num_classes(r)
    return (
        f" {k} classes: Dice is the mean foreground Dice (per image, the Dice of each foreground class "
        f"1..{k - 1} of the softmax argmax, averaged over the classes; a class absent from both prediction "
        f"and mask counts 1); the per-class table gives each class's Dice."
    )


def _summary_cell(s: dict[str, Any] | None) -> str:
    return "–" if not s else f"{s['mean']:.3f} (±{s['std']:.3f})"


def class_table(
    columns: list[tuple[str, dict[str, Any] | None]], k: int, lead: tuple[str, str] | None = None
) -> list[str]:
    """Rows: foreground classes 1..K-1; columns: (label, {"1": {"mean", "std"}, ...} or None).

    ``lead`` (header, value) puts a first column before the class (the few-shot fraction)."""
    head = f"| {lead[0]} | class | " if lead else "| class | "
    lines = [head + " | ".join(label for label, _ in columns) + " |",
             "|---" * (len(columns) + 1 + bool(lead)) + "|"]  # fmt: skip
    for c in range(1, k):
        first = f"| {lead[1]} | {c} | " if lead else f"| {c} | "
        lines.append(first + " | ".join(_summary_cell((d or {}).get(str(c))) for _, d in columns) + " |")
    return lines


def table_markdown(r: dict[str, Any]) -> list[str]:
    """A Table-1-shaped table (metrics as rows, variants as columns) plus the Fig. 2 numbers."""
    cfg = r["config"]
    vs = r["variants"]
    table_keys = [k for k in vs if vs[k]["downstream"] is not None]
    lines = [
        f"Data `{r['data']['folder']}` at {r['data']['resolution']}x{r['data']['resolution']}: "
        f"{r['data']['n_train']} train / {r['data']['n_test']} test pairs (the bundle's split). "
        f"Bundle `{r['bundle']['path']}`. N = {cfg['n_synthetic']} synthetic pairs per variant, "
        f"seeds {cfg['seeds']}, downstream {cfg['model']} {cfg['channels']} "
        f"(res units {cfg['num_res_units']}), batch {cfg['batch_size']}, Adam lr {cfg['lr']} cosine, "
        f"{r['steps']['expanded']} steps (equal-steps rows), {r['steps']['origin_epochs']} steps (equal epochs). "
        f"Stage III: {r['bundle']['sampling_params']}; η = {r['bundle']['eta']}.",
        "",
        "Dice: per-image Dice at 0.5 on the test split, mean (± std over seeds), no test-time augmentation."
        + (_class_note(r) if num_classes(r) > 2 else ""),
        "",
        "| Metric | " + " | ".join(vs[k]["label"] for k in table_keys) + " |",
        "|---|" + "---|" * len(table_keys),
    ]

    def row(name: str, cell: Callable[[dict[str, Any]], str]) -> None:
        lines.append(f"| {name} | " + " | ".join(cell(vs[k]) for k in table_keys) + " |")

    row("FID (Inception) ↓", lambda v: _fmt(v.get("fid_inception"), 2))
    row("FID (filter features) ↓", lambda v: _fmt(v.get("fid_filter"), 3))
    row("Dice ↑", lambda v: _dice_cell(v["downstream"]))
    row("train steps", lambda v: str(v["downstream"]["steps"]))
    row("train pairs", lambda v: str(v["downstream"]["train_pairs"]))
    row("kept / generated", lambda v: f"{v['kept']}/{v['generated']}" if "kept" in v else "–")
    origin = vs.get("origin", {}).get("downstream")
    if origin:
        o = origin["dice"]["mean"]
        row("Δ Dice vs origin (equal steps)", lambda v: f"{v['downstream']['dice']['mean'] - o:+.3f}")
    if num_classes(r) > 2:
        lines += ["", "Per-class Dice (mean ± std over seeds):", ""]
        lines += class_table(
            [(vs[k]["label"], vs[k]["downstream"].get("dice_by_class")) for k in table_keys], num_classes(r)
        )
    f = r["bundle"]["filter_real_test"]
    lines += [
        "",
        f"Stage IV ceiling: the filter passes {f['real_pass_rate']:.1%} of the real test pairs at η = {f['eta']} "
        f"(filter test Dice {f['dice_mean']:.3f}).",
        "",
    ]
    gen = [k for k in vs if "kept" in vs[k]]
    if gen:
        lines += [
            "## Synthetic pairs (Fig. 2 left: τ vs s)",
            "",
            "| Variant | generated | kept | yield | pass rate at η | mean Dice loss | median Dice loss | FID (Inception) | FID (filter) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for k in gen:
            v = vs[k]
            lines.append(
                f"| {v['label']} | {v['generated']} | {v['kept']} | {v['yield']:.1%} | "
                f"{_fmt(v['filter_pass_rate_at_eta'] * 100, 1)} % | {v['dice_loss']['mean']:.3f} | "
                f"{v['dice_loss']['median']:.3f} | {_fmt(v['fid_inception'], 2)} | {_fmt(v['fid_filter'])} |"
            )
        lines.append("")
    fid = r["fid"]  # the Table-1 part always computes it
    lines += [
        "## FID",
        "",
        f"Against the {fid['reference']}. Inception: {fid['inception']['features']}"
        + ("" if fid["inception"]["available"] else f" — not computed: {fid['inception'].get('reason')}")
        + f". Filter features: {fid['filter']['features']}. Small sets bias FID upwards; compare only at equal N.",
        "",
    ]
    return lines


def _ci(p: dict[str, Any] | None) -> str:
    if not p:
        return "–"
    return f"{p['mean']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]"


def _row_cell(row: dict[str, Any] | None) -> str:
    return "–" if not row else f"{row['mean']:.3f} (±{row['std']:.3f}, {len(row['runs'])} runs)"


def fewshot_markdown(r: dict[str, Any]) -> list[str]:
    """The five rows per fraction, paired confidence intervals, the N sweep and memorisation."""
    entries = r.get("fewshot") or []
    if not entries:
        return []
    split = r.get("split", {})
    grouping = split.get("grouping")
    group_text = (
        f"group-aware ({grouping['by']} {grouping['value']!r})" if grouping else "by pair (no grouping)"
    )
    lines = [
        f"## Few-shot: + {r.get('fewshot_variant')} pairs, against augmentation",
        "",
        f"Split {group_text}, seed {split.get('seed')}: {r['data']['n_train']} train / {r['data']['n_test']} test "
        f"pairs; nested train subsets. Dice: per-image Dice at 0.5 on the test split, mean (± std over all "
        f"runs: synthetic rows run once per (synthetic set, seed)). Paired: mean per-test-image Dice "
        f"difference of the row against the reference, with its 95 % bootstrap CI over test images."
        + (_class_note(r) if num_classes(r) > 2 else ""),
        "",
        "| fraction | real pairs | N | steps | bundle | " + " | ".join(ROW_LABELS[k] for k in ROWS) + " |",
        "|---|---|---|---|---|" + "---|" * len(ROWS),
    ]
    for e in entries:
        bundle = "retrained" if e["retrained"] else "**not retrained** (upper bound)"
        lines.append(
            f"| {e['fraction']:.0%} | {e['n_real']} | {e['n_synthetic']} | {e['steps']} | {bundle} | "
            + " | ".join(_row_cell(e["rows"].get(k)) for k in ROWS)
            + " |"
        )
    if num_classes(r) > 2:
        lines += ["", "Per-class Dice (mean ± std over runs):", ""]
        for i, e in enumerate(entries):
            table = class_table(
                [(ROW_LABELS[k], e["rows"][k].get("dice_by_class")) for k in ROWS if k in e["rows"]],
                num_classes(r),
                lead=("fraction", f"{e['fraction']:.0%}"),
            )
            lines += table if i == 0 else table[2:]  # one header for every fraction
    lines += [
        "",
        "| fraction | row | vs origin (paired, 95 % CI) | vs origin + augmentation (paired, 95 % CI) "
        "| vs pseudo-labels + augmentation (paired, 95 % CI) |",
        "|---|---|---|---|---|",
    ]
    for e in entries:
        for k in ROWS:
            p = e.get("paired_all", {}).get(k)
            if p:
                lines.append(
                    f"| {e['fraction']:.0%} | {ROW_LABELS[k]} | {_ci(p.get('vs_origin'))} | {_ci(p.get('vs_augment'))} "
                    f"| {_ci(p.get('vs_pseudo_augment'))} |"
                )
    if any("equivalence" in e for e in entries):
        lines += [
            "",
            "Real-pair equivalence: (synthetic + augmentation − augmentation) ÷ (N real + augmentation − "
            "augmentation); 1 means the synthetic pairs are worth as many real ones.",
            "",
            "| fraction | N | mask source | unlabelled images | synthetic − augmentation | oracle − augmentation "
            "| equivalence |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in entries:
            sweep = e.get("sweep") or [{"n": e["n_synthetic"], "paired": e.get("paired", {}),
                                        "equivalence": e.get("equivalence")}]  # fmt: skip
            for sw in sweep:
                p = sw.get("paired", {})
                lines.append(
                    f"| {e['fraction']:.0%} | {sw.get('n', sw.get('n_synthetic'))} | {e.get('mask_source', 'generated')} "
                    f"| {e.get('n_unlabelled', 0)} | {_ci(p.get('vs_augment'))} | {_ci(p.get('oracle_vs_augment'))} "
                    f"| {_fmt(sw.get('equivalence'), 2)} |"
                )
    lines += ["", "Synthetic sets (Stage IV at η; kept / generated; the fraction's bundle):", ""]
    lines += ["| fraction | set seed | kept / generated | yield | mean Dice loss | filter held-out Dice | seconds |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in entries:
        ft = e.get("bundle_filter_test") or {}
        for st in e["synthetic_sets"]:
            lines.append(
                f"| {e['fraction']:.0%} | {st['seed']} | {st['kept']}/{st['generated']} | {st['yield']:.1%} | "
                f"{_fmt(st['dice_loss_mean'])} | {_fmt(ft.get('dice_mean'))} | {st['seconds']:.0f} |"
            )
    sweeps = [e for e in entries if len(e.get("sweep", [])) > 1]
    for e in sweeps:
        lines += [
            "",
            f"N sweep at {e['fraction']:.0%} (origin + N synthetic + augmentation, {e['steps']} steps each):",
            "",
            "| N (capped at --max-synthetic) | × real | synthetic used per set | Dice | vs origin + augmentation | vs origin |",
            "|---|---|---|---|---|---|",
        ]
        for sw in e["sweep"]:
            lines.append(
                f"| {sw['n_synthetic']} | {sw['n_synthetic'] / e['n_real']:.1f} | {sw.get('synthetic_used_per_set')} | "
                f"{sw['mean']:.3f} (±{sw['std']:.3f}) | {_ci(sw['paired'].get('vs_augment'))} | "
                f"{_ci(sw['paired'].get('vs_origin'))} |"
            )
    mems = [e for e in entries if e.get("memorisation")]
    if mems:
        lines += [
            "",
            "Memorisation (nearest training pair among the pairs the fraction's bundle saw):",
            "",
            "| fraction | synthetic masks with nearest-train Dice > 0.95 | real test masks > 0.95 | "
            "mean nearest-train Dice synthetic / real | mean nearest-train image SSIM synthetic / real |",
            "|---|---|---|---|---|",
        ]
        for e in mems:
            m = e["memorisation"]
            lines.append(
                f"| {e['fraction']:.0%} | {m['synthetic_share_over_0.95']:.1%} of {m['n_synthetic']} | "
                f"{m['real_share_over_0.95']:.1%} of {m['n_real']} | "
                f"{_fmt(m['synthetic_mask_dice']['mean'])} / {_fmt(m['real_mask_dice']['mean'])} | "
                f"{_fmt(m['synthetic_image_ssim']['mean'])} / {_fmt(m['real_image_ssim']['mean'])} |"
            )
    if any(not e["retrained"] for e in entries if e["fraction"] < 1):
        lines += [
            "",
            "Rows marked not retrained used a bundle trained on the whole train split: an optimistic "
            "upper bound, not a result.",
        ]
    lines.append("")
    return lines


def budget_markdown(r: dict[str, Any]) -> list[str]:
    """The step-budget study: augmentation against the oracle with every other train pair."""
    study = r.get("budget_study") or []
    if not study:
        return []
    lines = [
        "## Step budget: where can data matter?",
        "",
        "| fraction | real pairs | steps | origin + augmentation | origin + all other train pairs + augmentation "
        "| oracle − augmentation (paired, 95 % CI) |",
        "|---|---|---|---|---|---|",
    ]
    for b in study:
        lines.append(
            f"| {b['fraction']:.0%} | {b['n_real']} | {b['steps']} | {_row_cell(b['rows']['augment'])} "
            f"| {_row_cell(b['rows']['oracle_all_augment'])} | {_ci(b['oracle_vs_augment'])} |"
        )
    return [*lines, ""]


def results_markdown(r: dict[str, Any]) -> str:
    lines = ["# DiffuseExpand evaluation", ""]
    lines += budget_markdown(r)
    if r.get("variants"):
        lines += table_markdown(r)
    elif r.get("table_skipped"):
        lines += [f"Table 1 skipped: {r['table_skipped']}.", ""]
    lines += fewshot_markdown(r)
    lines += [
        f"Wall time {r['wall_seconds']:.0f} s on {r['machine']['processor']} ({r['machine']['threads']} thread(s), "
        f"{r['machine']['device']}).",
        "",
    ]
    for name, file in r.get("plots", {}).items():
        lines.append(f"![{name}]({file})")
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(results))
