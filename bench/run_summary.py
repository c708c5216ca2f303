#!/usr/bin/env python3
"""The figures of one `isp run` folder's summary.json, for the bench scripts' logs and tables.

  run_summary.py line RUN_DIR LABEL          one line: accuracies, FLOPs, speed, saliency (bench/gpu_session.sh)
  run_summary.py row RUN_DIR CONFIG STATUS   one Markdown row of the README-job table (bench/cpu_host_session.sh);
                                             STATUS holds "EXIT_CODE WALL_SECONDS" as the scheduler timed the run
  run_summary.py header                      that table's header

A missing or unreadable summary.json is reported in the line or row, never an error: a failed run still gets its
place in the table.
"""
import json
import sys


def load(run_dir):
    try:
        return json.load(open(run_dir + "/summary.json")), None
    except Exception as e:  # noqa: BLE001 -- any reason goes in the table
        return None, e


def saliency_text(d):
    return "deletion AUC %.3f (centred Gaussian %.3f), mass on object %.3f (foreground %.3f)" % (
        d["deletion_auc"], d["centred_gaussian"]["deletion_auc"], d["mass_on_object"], d["foreground_share"])


def line(run_dir, label):
    s, err = load(run_dir)
    if s is None:
        return f"{label} no summary: {err}"
    keys = ["val_top1", "test_top1", "baseline_top1", "pruned_top1", "finetuned_top1", "budget_met", "flops_ratio",
            "predictor_agreement", "selector_agreement", "train_images_per_s", "wall_seconds"]
    parts = []
    for k in keys:
        if k in s and not isinstance(s[k], (dict, list)):
            v = s[k]
            parts.append(f"{k} {100 * v:.2f}%" if k.endswith(("top1", "agreement")) and isinstance(v, float)
                         else f"{k} {v}")
    try:
        sal = s.get("saliency") or {}
        if "mask_iou_at_0.5" in sal:  # the export's: pruned vs original maps
            parts.append("mask IoU %.3f, centre shift %.2f px" % (sal["mask_iou_at_0.5"],
                                                                  sal.get("mean_center_shift_px", -1)))
            for side in ("original", "pruned"):
                if side in sal:
                    parts.append(side + " " + saliency_text(sal[side]))
        elif "deletion_auc" in sal:
            parts.append(saliency_text(sal))
    except Exception as e:  # noqa: BLE001
        parts.append("saliency: %s" % e)
    return f"{label:28s} " + "; ".join(parts)


HEADER = ("| configuration | wall s | baseline top-1 | pruned | finetuned | FLOPs ratio | kept widths | deletion AUC "
          "| mass on object |\n|---|---|---|---|---|---|---|---|---|")


def row(run_dir, cfg, status_file):
    try:
        rc, wall = open(status_file).read().split()
    except Exception:  # noqa: BLE001 -- no status: the scheduler never ran it
        rc, wall = "?", "—"
    if rc not in ("0", "?"):
        wall += f" (exit {rc})"
    s, err = load(run_dir)
    if s is None:
        return f"| {cfg} | {wall} | no summary ({err.__class__.__name__}) |"

    def g(k, f="{:.1f}", scale=1):
        v = s.get(k)
        return f.format(v * scale) if isinstance(v, (int, float)) else "—"

    sal = (s.get("saliency") or {}).get("pruned") or s.get("saliency") or {}
    return (f"| {cfg} | {wall} | {g('baseline_top1', '{:.1f}', 100)} | {g('pruned_top1', '{:.1f}', 100)} "
            f"| {g('finetuned_top1', '{:.1f}', 100)} | {g('flops_ratio', '{:.3f}')} | {s.get('kept_widths', '—')} "
            f"| {sal.get('deletion_auc', float('nan')):.3f} | {sal.get('mass_on_object', float('nan')):.3f} |")


def main(argv):
    if len(argv) == 2 and argv[1] == "header":
        print(HEADER)
    elif len(argv) == 4 and argv[1] == "line":
        print(line(argv[2], argv[3]))
    elif len(argv) == 5 and argv[1] == "row":
        print(row(argv[2], argv[3], argv[4]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
