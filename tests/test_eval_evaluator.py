"""DDLEvaluator: hand-computed results, export, offline scorer agreement, 2 processes."""
import json
import os

import cv2
import numpy as np
import pytest
import torch

from ddl_mask2former.evaluation import DDLEvaluator, score_export
from ddl_mask2former.evaluation.export import decode_prob_u8, read_predictions
from ddl_mask2former.evaluation.metrics import f1_from_counts, iou_from_counts, roc_auc

from eval_helpers import make_outputs, read_gt, write_split, write_split_dicts


def _evaluate(dicts, outputs, batch_size=3, **kwargs):
    evaluator = DDLEvaluator("eval_test", **kwargs)
    evaluator.reset()
    for start in range(0, len(dicts), batch_size):
        evaluator.process(dicts[start:start + batch_size], outputs[start:start + batch_size])
    return evaluator.evaluate()


def _tiny_split(tmp_path):
    """Two reals and two fakes of 2x3 pixels with known masks."""
    gt_masks = {"f1.png": [[1, 1, 0], [0, 0, 0]], "f2.png": [[0, 0, 0], [1, 1, 1]]}
    dicts = []
    for name in ("r1.png", "r2.png", "f1.png", "f2.png"):
        label = int(name.startswith("f"))
        folder = tmp_path / ("fake" if label else "real")
        folder.mkdir(exist_ok=True)
        cv2.imwrite(str(folder / name), np.zeros((2, 3, 3), np.uint8))
        record = {"file_name": str(folder / name), "image_id": name, "height": 2, "width": 3,
                  "label": label}
        if label:
            (tmp_path / "masks").mkdir(exist_ok=True)
            record["mask_file"] = str(tmp_path / "masks" / name)
            cv2.imwrite(record["mask_file"], np.array(gt_masks[name], np.uint8) * 255)
        dicts.append(record)
    probs = {
        "r1.png": [[0.9, 0.1, 0.1], [0.1, 0.1, 0.1]],  # 1 of 6 pixels forged
        "r2.png": [[0.5, 0.1, 0.1], [0.1, 0.1, 0.1]],  # 0.5 itself is not forged
        "f1.png": [[0.8, 0.2, 0.7], [0.0, 0.0, 0.0]],  # TP 1, FP 1, FN 1
        "f2.png": [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],  # empty on a 3-pixel mask
    }
    scores = {"r1.png": 0.7, "r2.png": 0.2, "f1.png": 0.9, "f2.png": 0.7}
    outputs = [{"fake_prob": torch.tensor(scores[d["image_id"]]),
                "mask_prob": torch.tensor(probs[d["image_id"]]),
                "mask": torch.tensor(probs[d["image_id"]]) > 0.5} for d in dicts]
    return dicts, outputs


def test_evaluator_hand_computed(tmp_path):
    dicts, outputs = _tiny_split(tmp_path)
    results = _evaluate(dicts, outputs, output_dir=str(tmp_path / "out"))["ddl"]
    # fakes 0.9, 0.7 vs reals 0.7, 0.2: pairs >, >, tie, >  -> 3.5 / 4
    assert results["AUC"] == pytest.approx(87.5)
    # f1.png: F1 2/4, IoU 1/3; f2.png: 0, 0
    assert results["F1"] == pytest.approx(100 * 0.25)
    assert results["IoU"] == pytest.approx(100 / 6)
    # summed TP 1, FP 1, FN 4
    assert results["F1_pixel"] == pytest.approx(100 * 2 / 7)
    assert results["IoU_pixel"] == pytest.approx(100 / 6)
    assert results["real_forged_frac"] == pytest.approx(100 / 12)
    assert results["score"] == pytest.approx((87.5 + 25 + 100 / 6) / 3)
    assert (results["num_real"], results["num_fake"]) == (2, 2)
    saved = json.load(open(tmp_path / "out" / "ddl_metrics.json"))
    assert saved["ddl"]["AUC"] == pytest.approx(87.5)


def test_evaluator_single_task(tmp_path):
    dicts, outputs = _tiny_split(tmp_path)
    det = _evaluate(dicts, [{"fake_prob": o["fake_prob"]} for o in outputs])["ddl"]
    assert det["AUC"] == pytest.approx(87.5) and "F1" not in det and "score" not in det
    loc = _evaluate(dicts, [{k: o[k] for k in ("mask_prob", "mask")} for o in outputs])["ddl"]
    assert loc["F1"] == pytest.approx(25) and "AUC" not in loc and "score" not in loc
    # a model returning only a boolean mask is scored from it
    mask_only = _evaluate(dicts, [{"mask": o["mask"]} for o in outputs])["ddl"]
    assert mask_only["IoU"] == pytest.approx(loc["IoU"])


def test_evaluator_errors_name_the_image(tmp_path):
    dicts, outputs = _tiny_split(tmp_path)
    outputs[2]["mask_prob"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="f1.png.*original resolution"):
        _evaluate(dicts, outputs)
    dicts, outputs = _tiny_split(tmp_path)
    del dicts[3]["mask_file"]
    with pytest.raises(ValueError, match="f2.png.*mask_file"):
        _evaluate(dicts, outputs)
    dicts, outputs = _tiny_split(tmp_path)
    outputs[0]["mask_prob"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="r1.png.*NaN"):
        _evaluate(dicts, outputs)


def test_evaluator_matches_metrics_on_random_split(tmp_path):
    dicts = write_split(str(tmp_path / "split"))
    outputs = make_outputs(dicts)
    results = _evaluate(dicts, outputs)["ddl"]
    labels = [d["label"] for d in dicts]
    assert results["AUC"] == pytest.approx(100 * roc_auc(labels, [float(o["fake_prob"])
                                                                  for o in outputs]))
    f1s, ious = [], []
    for record, output in zip(dicts, outputs):
        if record["label"] == 1:
            pred, gt = output["mask_prob"].numpy() > 0.5, read_gt(record)
            counts = ((pred & gt).sum(), (pred & ~gt).sum(), (~pred & gt).sum())
            f1s.append(f1_from_counts(*counts))
            ious.append(iou_from_counts(*counts))
    assert results["F1"] == pytest.approx(100 * np.mean(f1s))
    assert results["IoU"] == pytest.approx(100 * np.mean(ious))


def test_export_then_offline_scorer_equals_evaluator(tmp_path):
    split = str(tmp_path / "split")
    dicts = write_split(split)
    outputs = make_outputs(dicts)
    export_dir = tmp_path / "export"
    results = _evaluate(dicts, outputs, export_dir=str(export_dir), export_zip=True)["ddl"]
    # the challenge format
    scores = read_predictions(str(export_dir / "prediction.txt"))
    assert set(scores) == {os.path.basename(d["file_name"]) for d in dicts}
    for record, output in zip(dicts, outputs):
        name = os.path.basename(record["file_name"])
        assert scores[name] == float(output["fake_prob"])
        mask = cv2.imread(str(export_dir / "mask" / name), cv2.IMREAD_UNCHANGED)
        prob = cv2.imread(str(export_dir / "prob" / name), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (record["height"], record["width"]) and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, output["mask"].numpy())
        np.testing.assert_array_equal(prob >= 128, mask == 255)
        assert np.abs(decode_prob_u8(prob) - output["mask_prob"].numpy()).max() <= 1 / 256
    import zipfile
    with zipfile.ZipFile(export_dir / "submission.zip") as archive:
        assert "prediction.txt" in archive.namelist()
        assert sum(n.startswith("mask/") for n in archive.namelist()) == len(dicts)
    offline = score_export(str(export_dir), split, num_workers=2)
    for key, name in (("auc", "AUC"), ("f1", "F1"), ("iou", "IoU"), ("score", "score"),
                      ("f1_pixel", "F1_pixel"), ("iou_pixel", "IoU_pixel"),
                      ("real_forged_frac", "real_forged_frac")):
        assert 100 * offline[key] == pytest.approx(results[name], abs=1e-12), key
    assert (offline["num_real"], offline["num_fake"]) == (results["num_real"], results["num_fake"])


def test_unlabeled_images_are_exported_not_scored(tmp_path):
    dicts = write_split(str(tmp_path / "split"), num_real=2, num_fake=2)
    outputs = make_outputs(dicts)
    for record in dicts:
        record.pop("label")
        record.pop("mask_file", None)
    export_dir = tmp_path / "export"
    assert _evaluate(dicts, outputs, export_dir=str(export_dir)) == {}
    assert len(read_predictions(str(export_dir / "prediction.txt"))) == 4
    assert len(os.listdir(export_dir / "mask")) == 4


def test_group_breakdown_from_registered_dataset(tmp_path):
    from detectron2.data import DatasetCatalog

    split = str(tmp_path / "split")
    write_split(split)
    dicts = write_split_dicts(split)
    name = f"eval_test_groups_{os.getpid()}"
    DatasetCatalog.register(name, lambda: write_split_dicts(split))
    try:
        # the mapper drops the group key: the evaluator looks it up in the registered dicts
        mapper_dicts = [{k: v for k, v in d.items() if k != "forgery_type"} for d in dicts]
        evaluator = DDLEvaluator(name, group_key="forgery_type")
        evaluator.reset()
        evaluator.process(mapper_dicts, make_outputs(dicts))
        results = evaluator.evaluate()
    finally:
        DatasetCatalog.remove(name)
    groups = results["ddl_groups"]
    assert {"edit/AUC", "swap/AUC", "edit/F1", "swap/num_fake"} <= set(groups)
    assert groups["edit/num_fake"] + groups["swap/num_fake"] == results["ddl"]["num_fake"]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    from ddl_mask2former.engine import launch
    from eval_helpers import distributed_evaluate

    split = str(tmp_path / "split")
    write_split(split, num_real=7, num_fake=9)
    runs = {}
    for world_size in (1, 2):
        export_dir = str(tmp_path / f"export_{world_size}")
        result_path = str(tmp_path / f"results_{world_size}.json")
        launch(distributed_evaluate, world_size, dist_url="auto",
               args=(split, export_dir, result_path, 2, "forgery_type"))
        runs[world_size] = (json.load(open(result_path)), export_dir)
        # every rank evaluated its own share of the 16 images
        shares = [int(open(f"{result_path}.rank{r}").read()) for r in range(world_size)]
        assert sum(shares) == 16 and min(shares) > 0
    (one, one_dir), (two, two_dir) = runs[1], runs[2]
    assert one == two and "ddl_groups" in one
    assert open(os.path.join(one_dir, "prediction.txt")).read() == \
        open(os.path.join(two_dir, "prediction.txt")).read()
    for folder in ("mask", "prob"):
        names = sorted(os.listdir(os.path.join(one_dir, folder)))
        assert names == sorted(os.listdir(os.path.join(two_dir, folder))) and len(names) == 16
        for name in names:
            np.testing.assert_array_equal(cv2.imread(os.path.join(one_dir, folder, name), -1),
                                          cv2.imread(os.path.join(two_dir, folder, name), -1))


def test_build_from_config(tmp_path):
    from detectron2.config import get_cfg

    from ddl_mask2former.config import add_ddl_mask2former_config
    from ddl_mask2former.evaluation import build_ddl_evaluator

    cfg = get_cfg()
    add_ddl_mask2former_config(cfg)
    assert cfg.TEST.EXPORT_DIR == "" and cfg.TEST.EXPORT_PROB and not cfg.TEST.EXPORT_ZIP
    assert build_ddl_evaluator(cfg, "ddl_i_val").export_dir is None
    cfg.merge_from_list(["TEST.EXPORT_DIR", str(tmp_path), "TEST.EXPORT_ZIP", "True",
                         "TEST.EVAL_GROUP_KEY", "forgery_type", "INPUT.MASK_THRESHOLD", "0",
                         "DATASETS.TEST", "('ddl_i_val', 'ddl_i_test')"])
    evaluator = build_ddl_evaluator(cfg, "ddl_i_test", output_dir=str(tmp_path / "inference"))
    # several test datasets export side by side, one folder each
    assert evaluator.export_dir == str(tmp_path / "ddl_i_test")
    assert (evaluator.export_zip, evaluator.group_key, evaluator.gt_mask_threshold) == \
        (True, "forgery_type", 0)
