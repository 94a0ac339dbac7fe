import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import plot_logs
from conftest import one_line_error
from core.errors import UserError

REPO = Path(plot_logs.__file__).resolve().parent


def write_log(folder, records, tail=""):
    folder.mkdir(parents=True)
    (folder / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return folder


def dino_records(epochs, start_loss):
    return [{"train_loss": start_loss - 0.1 * e, "train_lr": 1e-3 * (e + 1), "train_wd": 0.04,
             "train_skipped_images": 0, "knn_top1": 20.0 + 5 * e, "epoch": e} for e in range(epochs)]


def run(argv):
    return plot_logs.main(plot_logs.get_args_parser().parse_args(argv))


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_two_runs_one_png_of_the_expected_size(tmp_path):
    a = write_log(tmp_path / "a", dino_records(5, 6.0))
    b = write_log(tmp_path / "b", dino_records(3, 5.0))
    output = run([str(a), str(b)])
    assert output == a / "curves.png"
    # loss, k-NN top-1 and lr: three panels, two per row, 6 x 4 inches each at 100 dpi
    assert png_size(output) == (1200, 800)
    pixels = np.asarray(Image.open(output).convert("L"))
    assert pixels[:400, :].std() > 10 and (pixels[420:, 650:] == 255).all()  # drawn panels, blank fourth slot


def test_finetune_log_gets_a_validation_panel(tmp_path):
    records = [{"train_loss": 2.0 - 0.1 * e, "train_lr": 1e-3, "test_loss": 1.9, "test_acc1": 30.0 + e,
                "test_acc5": 70.0, "test_images": 600, "max_accuracy": 30.0 + e, "epoch": e} for e in range(4)]
    run_dir = write_log(tmp_path / "ft", records)
    output = run([str(run_dir), "--output", str(tmp_path / "plots" / "ft.png")])
    assert output == tmp_path / "plots" / "ft.png" and png_size(output) == (1200, 800)
    single = write_log(tmp_path / "mae", [{"train_loss": 1.0, "epoch": 0}])
    assert png_size(run([str(single)])) == (600, 400)


def cli_error(argv, capsys):
    return one_line_error(lambda: run(argv), capsys)


def test_folder_without_log_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "plot_logs.py", str(tmp_path / "empty")], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {tmp_path / 'empty'} has no log.txt: give the --output_dir of a "
                                        f"main_dino.py, main_pretrain_mae.py or main_finetune.py run"]
    assert not list((tmp_path / "empty").iterdir())


def test_truncated_last_line_warns_and_plots_the_rest(tmp_path, capsys):
    run_dir = write_log(tmp_path / "killed", dino_records(4, 6.0), tail='{"train_loss": 5.6, "train_l')
    assert len(plot_logs.read_log(run_dir)) == 4
    output = run([str(run_dir)])
    err = capsys.readouterr().err
    assert "warning:" in err and "line 5 is cut short" in err
    assert png_size(output) == (1200, 800)


def test_foreign_or_corrupt_logs_are_refused(tmp_path, capsys):
    linear = write_log(tmp_path / "linear", [{"train_loss_lr0.01": 1.0, "test_acc1_lr0.01": 50.0, "epoch": 0}])
    assert "has none of the logged values" in cli_error([str(linear)], capsys)
    broken = write_log(tmp_path / "broken", dino_records(1, 6.0), tail="not json\n" + json.dumps({"epoch": 2}) + "\n")
    assert "line 2 is not JSON" in cli_error([str(broken)], capsys)
    listing = write_log(tmp_path / "list", [[1, 2, 3]])
    assert "not a JSON object" in cli_error([str(listing)], capsys)
    with pytest.raises(UserError, match="none of the logged values"):
        plot_logs.read_log(write_log(tmp_path / "blank", []))
    assert not (tmp_path / "linear" / "curves.png").exists()
