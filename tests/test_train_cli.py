"""tools/train_net.py and tools/demo.py end to end on a tiny model and generated data (CPU).

Every command runs in a scratch working directory, not the repository, to show the tools
work from anywhere.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import ddl_mask2former
from ddl_mask2former.data.synthetic import generate_ddl_dataset
from tool_helpers import load_tool

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "tests" / "configs" / "tiny.yaml"
TRAIN_NET = REPO / "tools" / "train_net.py"
DEMO = REPO / "tools" / "demo.py"
CALIBRATE = REPO / "tools" / "calibrate.py"
# Values from tests/configs/tiny.yaml, used to recompute the learning-rate schedule.
BASE_LR, WARMUP_ITERS, WARMUP_FACTOR, POLY_POWER = 0.0005, 2, 0.1, 0.9
RESUME_MAX_ITER, KILL_AFTER_CHECKPOINT = 20, "model_0000005.pth"
# Batches hold consecutive draws only without aspect-ratio grouping (the DDL configs' setting).
RESUME_OPTS = ["SOLVER.MAX_ITER", str(RESUME_MAX_ITER), "DATALOADER.ASPECT_RATIO_GROUPING", "False"]
COMMAND_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def ddl_root(tmp_path_factory):
    """$DETECTRON2_DATASETS with a small DDL-I (8 train, 4 val images of 64-96 px)."""
    root = tmp_path_factory.mktemp("datasets")
    generate_ddl_dataset(str(root / "DDL-I"), 8, 4, seed=0, min_size=64, max_size=96, workers=1)
    return root


def _env(ddl_root):
    # One intra-op thread per process: on a busy 2-core machine two threads per process
    # made the tiny model ~10x slower (docs/PERFORMANCE.md, section Training).
    return dict(os.environ, DETECTRON2_DATASETS=str(ddl_root), DDL_INDEX_CACHE="off",
                OMP_NUM_THREADS="1")


def _run(args, ddl_root, cwd):
    result = subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=_env(ddl_root),
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
    )
    return result


def _check(result):
    assert result.returncode == 0, (
        f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-4000:]}"
    )
    return result


def _read_metrics(output_dir):
    with open(output_dir / "metrics.json") as f:
        return [json.loads(line) for line in f if line.strip()]


def _expected_lr(iteration, max_iter):
    """Warm-up from WARMUP_FACTOR * BASE_LR to the poly value, then (1 - t/T) ** power."""
    poly = lambda it: (1.0 - it / max_iter) ** POLY_POWER  # noqa: E731
    if iteration < WARMUP_ITERS:
        start, end = WARMUP_FACTOR, poly(WARMUP_ITERS)
        return BASE_LR * (start + (end - start) * iteration / WARMUP_ITERS)
    return BASE_LR * poly(iteration)


@pytest.fixture(scope="module")
def killed_then_resumed(ddl_root, tmp_path_factory):
    """Train, kill -9 right after a checkpoint, then --resume to the end."""
    workdir = tmp_path_factory.mktemp("train_workdir")
    output_dir = workdir / "run"
    opts = RESUME_OPTS + ["OUTPUT_DIR", "run"]
    command = [sys.executable, str(TRAIN_NET), "--config-file", str(TINY_CONFIG)]
    with open(workdir / "killed.log", "w") as log:
        proc = subprocess.Popen(command + opts, cwd=workdir, env=_env(ddl_root), stdout=log,
                                stderr=subprocess.STDOUT)
        tag = output_dir / "last_checkpoint"
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        while not (tag.exists() and tag.read_text() == KILL_AFTER_CHECKPOINT):
            if proc.poll() is not None:
                pytest.fail(f"training exited ({proc.returncode}) before {KILL_AFTER_CHECKPOINT}; "
                            f"log: {(workdir / 'killed.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("timed out waiting for the first checkpoints")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    interrupted = {
        "returncode": proc.returncode,
        "final_exists": (output_dir / "model_final.pth").exists(),
        "iterations": [row["iteration"] for row in _read_metrics(output_dir)],
    }
    resumed = _check(_run(command[1:] + ["--resume"] + opts, ddl_root, workdir))
    return {"output_dir": output_dir, "interrupted": interrupted, "resumed": resumed}


def test_resume_after_kill_continues_iterations_and_schedule(killed_then_resumed):
    output_dir = killed_then_resumed["output_dir"]
    interrupted = killed_then_resumed["interrupted"]
    assert interrupted["returncode"] == -signal.SIGKILL
    assert not interrupted["final_exists"], "the first run finished before it was killed"
    assert max(interrupted["iterations"]) < RESUME_MAX_ITER - 1

    log = killed_then_resumed["resumed"].stderr + killed_then_resumed["resumed"].stdout
    assert "Resumed at iteration 6 of 20" in log
    assert "Starting training from iteration 6" in log

    assert (output_dir / "last_checkpoint").read_text() == "model_final.pth"
    final = torch.load(output_dir / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == RESUME_MAX_ITER - 1
    rows = [row for row in _read_metrics(output_dir) if "lr" in row]
    iterations = {row["iteration"] for row in rows}
    assert set(range(6, RESUME_MAX_ITER)) <= iterations
    # Before and after the kill, every logged rate is the one schedule of MAX_ITER=20.
    for row in rows:
        assert row["lr"] == pytest.approx(_expected_lr(row["iteration"], RESUME_MAX_ITER), rel=1e-6)
        assert np.isfinite(row["total_loss"])
    assert list(output_dir.glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert "eta:" in (output_dir / "log.txt").read_text()


@pytest.mark.slow
def test_resumed_run_equals_the_uninterrupted_one(killed_then_resumed, ddl_root, tmp_path):
    # Killed with SIGKILL after iteration 5's checkpoint and resumed, the run must end with the
    # weights of a run that was never interrupted: the data order, the crops and every random
    # draw continue (data/training_order.py) instead of starting over.
    _check(_run([TRAIN_NET, "--config-file", TINY_CONFIG, *RESUME_OPTS, "OUTPUT_DIR", "straight"],
                ddl_root, tmp_path))
    resumed = torch.load(killed_then_resumed["output_dir"] / "model_final.pth", map_location="cpu",
                         weights_only=False)["model"]
    straight = torch.load(tmp_path / "straight" / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert resumed.keys() == straight.keys()
    differing = [key for key in straight if not torch.equal(resumed[key], straight[key])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def test_eval_only_writes_metrics_and_export(killed_then_resumed, ddl_root, tmp_path):
    weights = killed_then_resumed["output_dir"] / "model_final.pth"
    result = _check(_run(
        [TRAIN_NET, "--config-file", TINY_CONFIG, "--eval-only", "MODEL.WEIGHTS", weights,
         "OUTPUT_DIR", "eval", "TEST.EXPORT_DIR", "export"], ddl_root, tmp_path))
    assert "copypaste: AUC,F1,IoU,score" in result.stdout + result.stderr

    with open(tmp_path / "eval" / "inference" / "ddl_i_val" / "ddl_metrics.json") as f:
        metrics = json.load(f)["ddl"]
    for key in ("AUC", "F1", "IoU", "score"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["num_real"] + metrics["num_fake"] == 4

    val_images = sorted((ddl_root / "DDL-I" / "val").glob("*/*.png"))
    val_images = [p for p in val_images if p.parent.name in ("real", "fake")]
    lines = (tmp_path / "export" / "prediction.txt").read_text().split()
    assert sorted(line.split(",")[0] for line in lines) == sorted(p.name for p in val_images)
    # The head's scores before the verdict go along, for ensembles (docs/EVALUATION.md).
    head_lines = (tmp_path / "export" / "head_prediction.txt").read_text().split()
    assert sorted(line.split(",")[0] for line in head_lines) == sorted(p.name for p in val_images)
    assert all(0.0 <= float(line.split(",")[1]) <= 1.0 for line in lines)
    for image_path in val_images:
        mask = cv2.imread(str(tmp_path / "export" / "mask" / image_path.name), cv2.IMREAD_UNCHANGED)
        assert mask is not None and mask.shape == cv2.imread(str(image_path)).shape[:2]
        assert set(np.unique(mask)) <= {0, 255}


def test_calibrate_writes_a_calibrated_checkpoint_that_eval_uses(killed_then_resumed, ddl_root, tmp_path):
    weights = killed_then_resumed["output_dir"] / "model_final.pth"
    calibrated = tmp_path / "calibrated" / "model.pth"
    result = _check(_run(
        [CALIBRATE, "--config-file", TINY_CONFIG, "--output", calibrated, "MODEL.WEIGHTS", weights,
         "DATASETS.CALIBRATION", "('ddl_i_train',)", "MODEL.DDL.VERDICT.TARGET_FPR", "0.25"], ddl_root, tmp_path))
    assert f"wrote {calibrated}" in result.stdout
    state = torch.load(calibrated, map_location="cpu", weights_only=False)["model"]
    assert torch.equal(state["verdict.target_fprs"], torch.full((4,), 0.25, dtype=torch.float64))
    _check(_run([TRAIN_NET, "--config-file", TINY_CONFIG, "--eval-only", "MODEL.WEIGHTS", calibrated,
                 "OUTPUT_DIR", "eval", "TEST.EXPORT_DIR", "export"], ddl_root, tmp_path))
    verdict = json.loads((tmp_path / "export" / "verdict.json").read_text())
    assert verdict["target_fpr"] == 0.25 and verdict["threshold"] == float(state["verdict.thresholds"][1])
    # An uncalibrated checkpoint evaluated with DATASETS.CALIBRATION is calibrated first.
    result = _check(_run([TRAIN_NET, "--config-file", TINY_CONFIG, "--eval-only", "MODEL.WEIGHTS", weights,
                          "OUTPUT_DIR", "eval2", "TEST.EXPORT_DIR", "export2",
                          "DATASETS.CALIBRATION", "('ddl_i_train',)"], ddl_root, tmp_path))
    assert ("holds no verdict calibration (uncalibrated checkpoint): calibrating on ddl_i_train first"
            in result.stdout + result.stderr)
    assert json.loads((tmp_path / "export2" / "verdict.json").read_text())["calibrated"]
    missing = _run([CALIBRATE, "--config-file", TINY_CONFIG, "--output", tmp_path / "x.pth",
                    "MODEL.WEIGHTS", weights], ddl_root, tmp_path)
    assert missing.returncode != 0 and "DATASETS.CALIBRATION is empty" in missing.stderr
    assert not (tmp_path / "x.pth").exists()


def test_uncalibrated_checkpoint_without_calibration_data_says_how_to_go_on(killed_then_resumed, tmp_path):
    weights = killed_then_resumed["output_dir"] / "model_final.pth"
    empty_root = tmp_path / "no_datasets"
    empty_root.mkdir()
    result = _run([TRAIN_NET, "--config-file", TINY_CONFIG, "--eval-only", "MODEL.WEIGHTS", weights,
                   "OUTPUT_DIR", "eval", "DATASETS.CALIBRATION", "('ddl_i_train',)"], empty_root, tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{weights} holds no verdict calibration (uncalibrated checkpoint)" in result.stderr
    assert "split folder does not exist" in result.stderr
    assert "tools/calibrate.py" in result.stderr and 'DATASETS.CALIBRATION "()"' in result.stderr


def test_every_checkpoint_carries_a_fit_of_its_own_weights(ddl_root, tmp_path):
    # Calibration runs before the periodic checkpointer: model_0000001.pth holds the fit of the
    # weights of iteration 1, not of an older evaluation's (or none).
    _check(_run([TRAIN_NET, "--config-file", TINY_CONFIG, "OUTPUT_DIR", "run", "SOLVER.MAX_ITER", "4",
                 "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.CALIBRATION", "('ddl_i_train',)"], ddl_root, tmp_path))
    for name, iteration in (("model_0000001.pth", 1), ("model_final.pth", 3)):
        checkpoint = torch.load(tmp_path / "run" / name, map_location="cpu", weights_only=False)
        assert checkpoint["iteration"] == iteration
        assert int(checkpoint["model"]["verdict.calibration_iteration"]) == iteration
        assert float(checkpoint["model"]["verdict.target_fprs"][1]) == 0.05
    result = _check(_run([TRAIN_NET, "--config-file", TINY_CONFIG, "--eval-only", "OUTPUT_DIR", "eval",
                          "MODEL.WEIGHTS", tmp_path / "run" / "model_0000001.pth",
                          "DATASETS.CALIBRATION", "('ddl_i_train',)"], ddl_root, tmp_path))
    assert "calibrating on" not in result.stdout + result.stderr


@pytest.mark.slow
def test_two_cpu_processes_over_gloo_train_and_evaluate(ddl_root, tmp_path):
    result = _check(_run(
        [TRAIN_NET, "--config-file", TINY_CONFIG, "--num-gpus", "2", "--dist-url", "auto",
         "OUTPUT_DIR", "run", "SOLVER.MAX_ITER", "4", "TEST.EVAL_PERIOD", "4",
         "TEST.EXPORT_DIR", "export", "DATASETS.CALIBRATION", "('ddl_i_train',)"], ddl_root, tmp_path))
    log = result.stdout + result.stderr
    assert "World size: 2" in log
    output_dir = tmp_path / "run"
    assert (output_dir / "model_final.pth").exists()
    assert (output_dir / "log.txt.rank1").exists()
    assert max(row["iteration"] for row in _read_metrics(output_dir) if "lr" in row) == 3
    # The evaluation gathered both processes' halves of the 4 val images.
    assert len((tmp_path / "export" / "prediction.txt").read_text().split()) == 4
    # The verdict was calibrated on all 8 training images (both processes' halves) before the
    # final evaluation, saved in model_final.pth and described beside the export.
    assert "Verdict calibrated on ddl_i_train (8 images" in log
    state = torch.load(output_dir / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert float(state["verdict.target_fprs"][1]) == 0.05  # map_max, fitted at the default rate
    verdict = json.loads((tmp_path / "export" / "verdict.json").read_text())
    assert verdict["calibrated"] and verdict["rule"] == "map_max"
    assert verdict["threshold"] == pytest.approx(float(state["verdict.thresholds"][1]))


def test_demo_writes_overlays_and_json_and_reports_bad_files(killed_then_resumed, ddl_root,
                                                             tmp_path):
    weights = killed_then_resumed["output_dir"] / "model_final.pth"
    val = ddl_root / "DDL-I" / "val"
    (tmp_path / "broken.png").write_text("this is not a PNG")
    # A photo much larger than the tiny model's base scale (inference is at the base scale).
    from skimage import data as skimage_data

    big = cv2.resize(skimage_data.astronaut(), (1000, 750), interpolation=cv2.INTER_LINEAR)
    cv2.imwrite(str(tmp_path / "big.jpg"), big[:, :, ::-1])
    result = _run(
        [DEMO, "--config-file", TINY_CONFIG, "--input", val / "fake", str(val / "real" / "*.png"),
         "broken.png", "big.jpg", "--output", "demo", "--opts", "MODEL.WEIGHTS", weights],
        ddl_root, tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "broken.png: not an image file" in result.stderr
    assert "[5/6]" in result.stderr  # progress lines

    records = [json.loads(line) for line in result.stdout.splitlines()]
    sources = sorted(str(p) for p in val.glob("*/*.png") if p.parent.name in ("real", "fake"))
    assert sorted(r["file"] for r in records) == sorted(sources + ["big.jpg"])
    for record in records:
        assert set(record) == {"file", "fake_prob", "is_fake", "forged_area_fraction", "output"}
        assert 0.0 <= record["fake_prob"] <= 1.0
        assert 0.0 <= record["forged_area_fraction"] <= 1.0
        overlay = cv2.imread(str(tmp_path / record["output"]))
        source = cv2.imread(str(tmp_path / record["file"]))
        assert overlay is not None and overlay.shape == source.shape
    saved = (tmp_path / "demo" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in saved] == records


def test_demo_exit_code_zero_when_all_inputs_are_read(killed_then_resumed, ddl_root, tmp_path,
                                                      monkeypatch, capsys):
    demo = load_tool("demo")
    weights = killed_then_resumed["output_dir"] / "model_final.pth"
    image = ddl_root / "DDL-I" / "val" / "fake"
    monkeypatch.chdir(tmp_path)
    code = demo.main(["--config-file", str(TINY_CONFIG), "--input", str(image),
                      "--output", "out", "--opts", "MODEL.WEIGHTS", str(weights)])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(list(image.glob("*.png")))


def test_demo_input_collection(tmp_path):
    demo = load_tool("demo")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"")
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "sub" / "y.JPG").write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_text("")
    (tmp_path / "empty").mkdir()
    paths, problems = demo.collect_inputs([
        str(tmp_path / "a"), str(tmp_path / "a" / "*.png"), str(tmp_path / "empty"),
        str(tmp_path / "none*.png"), str(tmp_path / "named.bin"),
    ])
    assert paths == [str(tmp_path / "a" / "sub" / "y.JPG"), str(tmp_path / "a" / "x.png"),
                     str(tmp_path / "named.bin")]
    assert [spec for spec, _ in problems] == [str(tmp_path / "empty"), str(tmp_path / "none*.png")]


def test_trainer_stops_on_non_finite_loss_naming_iteration_and_terms(ddl_root, tmp_path):
    from detectron2.config import get_cfg

    from ddl_mask2former.config import add_ddl_mask2former_config
    from ddl_mask2former.data import register_ddl_split
    from ddl_mask2former.engine import NonFiniteLossError, Trainer

    ddl_mask2former.register_all()
    register_ddl_split("train_test_non_finite", str(ddl_root / "DDL-I" / "train"), cache_dir=None)
    cfg = get_cfg()
    add_ddl_mask2former_config(cfg)
    cfg.merge_from_file(str(TINY_CONFIG))
    # A zero pixel std turns every normalized input into inf/NaN, so loss_det is NaN at once
    # (detection only: the localization matcher would reject NaN costs before any loss).
    cfg.merge_from_list([
        "DATASETS.TRAIN", ("train_test_non_finite",), "MODEL.PIXEL_STD", [0.0, 0.0, 0.0],
        "MODEL.DDL.TASKS", ["detection"], "MODEL.DDL.VERDICT.RULE", "head", "OUTPUT_DIR", str(tmp_path / "run"),
    ])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    weights_before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(NonFiniteLossError) as excinfo:
        trainer.train()
    assert "Non-finite loss at iteration 0" in str(excinfo.value)
    assert "loss_det=nan <-- non-finite" in str(excinfo.value)
    for before, after in zip(weights_before, trainer.model.parameters()):
        assert torch.equal(before, after.detach())
