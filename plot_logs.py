"""Training curves of one or more runs as one PNG, from the log.txt (one JSON object per epoch) that main_dino.py,
main_pretrain_mae.py and main_finetune.py write: a panel per metric (loss, k-NN top-1, validation top-1, learning
rate) that some run logged, every run overlaid under its name, so runs compare at a glance without a server.

    python plot_logs.py runs/dino_a runs/dino_b                  # writes runs/dino_a/curves.png
    python plot_logs.py runs/mae runs/finetune --output curves.png
"""
import argparse
import json
import math
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from core.checkpoint import save_checkpoint
from core.errors import UserError, run_cli

PANELS = (  # (log key, panel title)
    ("train_loss", "training loss"),
    ("knn_top1", "k-NN top-1 (%)"),
    ("test_acc1", "validation top-1 (%)"),
    ("train_lr", "learning rate"),
)
PANEL_INCHES = (6.0, 4.0)
DPI = 100
COLUMNS = 2


def get_args_parser():
    p = argparse.ArgumentParser("plot_logs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="Output folders of runs, each holding a log.txt.")
    p.add_argument("--output", default=None, type=Path,
                   help="Where the PNG goes; default: curves.png in the first run's folder.")
    return p


def read_log(run):
    """The records of run/log.txt. A last line cut short (a run killed mid-write) is left out with a warning; any
    other line that is not a JSON object means the file is not a run log."""
    path = run / "log.txt"
    if not path.is_file():
        raise UserError(f"{run} has no log.txt: give the --output_dir of a main_dino.py, main_pretrain_mae.py or "
                        f"main_finetune.py run")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                print(f"warning: {path} line {number} is cut short (a run killed while writing it?): plotting the "
                      f"{len(records)} line(s) before it", file=sys.stderr)
                break
            raise UserError(f"{path} line {number} is not JSON: is it a run log? Fix or remove that line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path} line {number} is not a JSON object: plot_logs.py reads the log.txt of our "
                            f"training scripts")
        records.append(record)
    if not any(key in record for record in records for key, _ in PANELS):
        raise UserError(f"{path} has none of the logged values plot_logs.py draws ({', '.join(k for k, _ in PANELS)})"
                        f": was it written by main_dino.py, main_pretrain_mae.py or main_finetune.py?")
    return records


def curve(records, key):
    """(epochs, values) of the records that logged `key` as a finite number; epoch from the record, else its line."""
    points = [(r.get("epoch", i), r[key]) for i, r in enumerate(records)
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [e for e, _ in points], [v for _, v in points]


def plot(logs, output):
    """One figure, a panel per metric some run logged; PANEL_INCHES x DPI pixels per panel, COLUMNS wide."""
    panels = [(key, title) for key, title in PANELS if any(curve(records, key)[0] for _, records in logs)]
    cols = min(COLUMNS, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # Agg renders to the file: no display, no pyplot state
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for name, records in logs:
            epochs, values = curve(records, key)
            if epochs:
                ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None, markersize=3, label=name)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes.flat[len(panels):]:
        ax.remove()
    save_checkpoint(fig, output, write=lambda figure, f: figure.savefig(f, format="png", dpi=DPI))


def main(args):
    names = [run.resolve().name for run in args.runs]
    if len(set(names)) < len(names):  # runs/a/dino and runs/b/dino: their paths tell them apart
        names = [str(run) for run in args.runs]
    logs = [(name, read_log(run)) for name, run in zip(names, args.runs)]
    output = args.output or args.runs[0] / "curves.png"
    plot(logs, output)
    print(f"curves of {len(logs)} run(s) written to {output}")
    return output


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
