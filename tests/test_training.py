"""Training: the two-stage schedule end to end on a tiny cache, stage-1 gradient routing, determinism, errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import make_cache, make_plans

from dscovid.cli.train import main as train_main
from dscovid.errors import DscovidError
from dscovid.model import build_network
from dscovid.model.network import CLASSIFICATION_PART, SEGMENTATION_PART
from dscovid.plans.configuration import Configuration, OptimizerConfig, Plans, StageConfig
from dscovid.results.checkpoint import load_checkpoint
from dscovid.roots import Roots
from dscovid.training.augmentation import AugmentationSettings
from dscovid.training.base_trainer import TrainingSetup
from dscovid.training.data import list_cache_cases
from dscovid.training.loader import build_loader, close_loader
from dscovid.training.run import run_training
from dscovid.training.schedule import learning_rate
from dscovid.training.trainers import TRAINERS, DeepSCCOVIDTrainer, get_trainer

FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json", "checkpoint_latest.pt", "checkpoint_best.pt",
         "checkpoint_final.pt", "training_log.txt", "progress.png")


@pytest.fixture
def nondeterministic_after():
    yield
    torch.use_deterministic_algorithms(False)


def _roots(tmp_path) -> Roots:
    return Roots(preprocessed=tmp_path / "pre", results=tmp_path / "res")


def _fixed_batch(dataset_dir, seed=11):
    cases = list(list_cache_cases(dataset_dir / "3d_cpu").values())
    loader = build_loader(cases, 6, (8, 16, 16), (2.0, 1.5, 1.5), 0.5, AugmentationSettings.none(), seed, 0)
    batch = next(loader)
    close_loader(loader)
    return batch


def _losses(network, configuration, batch) -> dict[str, float]:
    from dscovid.model import build_loss

    trainer = object.__new__(DeepSCCOVIDTrainer)  # only its batch conversion is used
    trainer.device = torch.device("cpu")
    inputs = trainer.to_device(batch)
    network.eval()
    with torch.no_grad():
        out = network(inputs["seg_patch"], inputs["patch_box"], inputs["volume_shape"], inputs["cls_image"],
                      inputs["lesion_context"])
        result = build_loss(configuration)(out, inputs["lesion_target"], inputs["class_index"],
                                           inputs["lesion_annotated"])
    return result.terms


def test_two_stage_training_learns_and_writes_the_results_folder(tmp_path):
    plans = make_plans("Dataset900_Tiny", epochs=(3, 2), iterations=8)
    dataset_dir = make_cache(tmp_path / "pre", n_cases=12, plans=plans, unannotated=("case_0003",))
    result = run_training(_roots(tmp_path), None, "3d_cpu", 0, num_workers=1, device="cpu", seed=5)

    fold_dir = tmp_path / "res" / "Dataset900_Tiny" / "DeepSCCOVIDTrainer__3d_cpu" / "fold_0"
    assert result.fold_dir == fold_dir and result.epochs == 5
    for name in FILES:
        assert (fold_dir / name).is_file(), name
    state = load_checkpoint(fold_dir / "checkpoint_final.pt")  # weights_only=True
    assert state["epoch"] == 5 and state["stage"] == 1 and state["trainer"] == "DeepSCCOVIDTrainer"
    assert state["configuration"]["network"]["tasks"] == "joint"
    json.dumps({k: v for k, v in state.items() if k not in ("network_weights", "optimizer_state")})
    assert [int(s) for s in state["history"]["stage"]] == [0, 0, 0, 1, 1]
    assert np.allclose(state["history"]["lr"], [1e-3, 1e-3 * 2 / 3, 1e-3 / 3, 1e-4, 5e-5])
    # the network at the end of pre-training is kept for the joint-stage ablation
    stage1 = load_checkpoint(fold_dir / "checkpoint_stage1.pt")
    assert stage1["epoch"] == 3 and stage1["stage"] == 0 and not (fold_dir / "checkpoint_stage2.pt").exists()
    assert any(not torch.equal(stage1["network_weights"][k], v) for k, v in state["network_weights"].items())
    splits = json.loads((dataset_dir / "splits_final.json").read_text(encoding="utf-8"))
    assert len(splits) == 10 and state["plans"]["configurations"]["3d_cpu"]["network"]["tasks"] == "joint"

    # The losses fall: the same fixed batch scored with the initial and the trained weights.
    configuration = Configuration.from_dict("3d_cpu", state["configuration"])
    torch.manual_seed(5)
    initial = build_network(configuration)
    trained = build_network(configuration)
    trained.load_state_dict(state["network_weights"])
    batch = _fixed_batch(dataset_dir)
    before, after = _losses(initial, configuration, batch), _losses(trained, configuration, batch)
    assert after["seg"] < before["seg"] and after["cls"] < before["cls"], (before, after)


def _trainer(tmp_path, network: dict | None = None, **loss_overrides) -> DeepSCCOVIDTrainer:
    plans = make_plans("Dataset900_Tiny")
    plans["configurations"]["3d_cpu"]["training"]["loss"].update(loss_overrides)
    plans["configurations"]["3d_cpu"]["network"].update(network or {})
    dataset_dir = make_cache(tmp_path / "pre", n_cases=4, plans=plans)
    cases = list(list_cache_cases(dataset_dir / "3d_cpu").values())
    plans = Plans.from_dict(plans)
    configuration = DeepSCCOVIDTrainer.effective_configuration(plans.configuration("3d_cpu"))
    setup = TrainingSetup(plans, "3d_cpu", configuration, cases, [], tmp_path / "out", num_workers=0)
    trainer = DeepSCCOVIDTrainer(setup)
    trainer.on_stage_start(0)
    return trainer


def test_findings_head_learns_at_its_own_rate_in_both_stages(tmp_path):
    plans = make_plans("Dataset900_Tiny")
    configuration = plans["configurations"]["3d_cpu"]
    configuration["network"]["findings_head"] = True
    configuration["training"]["findings_head_lr_scale"] = 10.0
    dataset_dir = make_cache(tmp_path / "pre", n_cases=4, plans=plans)
    cases = list(list_cache_cases(dataset_dir / "3d_cpu").values())
    plans = Plans.from_dict(plans)
    setup = TrainingSetup(plans, "3d_cpu", DeepSCCOVIDTrainer.effective_configuration(plans.configuration("3d_cpu")),
                          cases, [], tmp_path / "out", num_workers=0)
    trainer = DeepSCCOVIDTrainer(setup)
    head = {id(p) for p in trainer.network.findings_head.parameters()}
    for stage in (0, 1):
        trainer.on_stage_start(stage)
        trainer.epoch = sum(s.epochs for s in trainer.stages[:stage])
        lr = trainer.on_epoch_start()
        groups = trainer.optimizer.param_groups
        assert [g["lr"] for g in groups] == pytest.approx([lr, 10 * lr])
        assert {id(p) for p in groups[1]["params"]} == head and not head & {id(p) for p in groups[0]["params"]}
    # Stage 1 trains the head with the classification part.
    trainer.on_stage_start(0)
    trainer.optimizer.zero_grad(set_to_none=True)
    terms = trainer._separate_backward(trainer.to_device(_fixed_batch(dataset_dir)))
    assert "findings" in terms and trainer.network.findings_head.linear.weight.grad is not None


@pytest.mark.parametrize("cross_stitch", [False, True])
@pytest.mark.parametrize("silenced", ["seg", "cls"])
def test_stage_one_routes_each_loss_to_its_own_part(tmp_path, silenced, cross_stitch):
    """Stage 1 pre-trains the parts separately: a task's loss must not move the other task's part (the findings
    head's own cross-entropy belongs to the classification task, with the head); with and without the cross-stitch
    unit (3d_paper has it, 3d_cpu not)."""
    silence = {"seg": ("lambda_seg",), "cls": ("lambda_cls", "lambda_findings")}[silenced]
    trainer = _trainer(tmp_path, {"cross_stitch": cross_stitch}, **dict.fromkeys(silence, 0.0))
    assert trainer.step_mode(trainer.stages[0]) == "separate"
    batch = _fixed_batch(tmp_path / "pre" / "Dataset900_Tiny")
    trainer.optimizer.zero_grad(set_to_none=False)
    trainer._separate_backward(trainer.to_device(batch))
    quiet, active = (SEGMENTATION_PART, CLASSIFICATION_PART) if silenced == "seg" else (CLASSIFICATION_PART,
                                                                                        SEGMENTATION_PART)
    grads = {n: p.grad for n, p in trainer.network.named_parameters()}
    assert all(float(g.abs().sum()) == 0 for n, g in grads.items() if n.startswith(quiet))
    assert sum(float(g.abs().sum()) > 0 for n, g in grads.items() if n.startswith(active)) > 5
    # both rows of the cross-stitch are covered by exactly one part
    assert {n for n in grads if n.startswith("cross_stitch")} == ({
        "cross_stitch.w_seg1", "cross_stitch.w_cls2", "cross_stitch.w_seg2", "cross_stitch.w_cls1"} if cross_stitch
        else set())


def test_joint_stage_backpropagates_task_aware_loss_into_both_parts(tmp_path):
    trainer = _trainer(tmp_path, lambda_seg=0.0, lambda_cls=0.0, lambda_ta=10.0)  # only λ_ta · L_ta left
    trainer.on_stage_start(1)
    trainer.optimizer.zero_grad(set_to_none=True)
    inputs = trainer.to_device(_fixed_batch(tmp_path / "pre" / "Dataset900_Tiny"))
    trainer.compute_loss(trainer.forward(inputs), inputs).total.backward()
    named = dict(trainer.network.named_parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for n, p in named.items()
               if n.startswith("lesion_subnet."))
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for n, p in named.items()
               if n.startswith("classification_subnet."))


def test_deterministic_seed_gives_identical_weights(tmp_path, nondeterministic_after):
    make_cache(tmp_path / "pre", n_cases=12, plans=make_plans("Dataset900_Tiny", epochs=(1, 1), iterations=2))

    def weights(seed, name, workers):
        roots = Roots(preprocessed=tmp_path / "pre", results=tmp_path / name)
        result = run_training(roots, "Dataset900_Tiny", "3d_cpu", 1, seed=seed, deterministic=True, device="cpu",
                              num_workers=workers, run_final_validation=False)
        return load_checkpoint(result.fold_dir / "checkpoint_final.pt")["network_weights"]

    # with a background worker: its batches are seeded too
    first, second, other = weights(3, "a", 1), weights(3, "b", 1), weights(4, "c", 0)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("name, tasks", [("SegmentationTrainer", "segmentation"),
                                         ("ClassificationTrainer", "classification"),
                                         ("DeepSCCOVIDTrainer_crossStitch", "joint"),
                                         ("DeepSCCOVIDTrainer_findings", "joint")])
def test_single_task_and_ablation_trainers_train(tmp_path, name, tasks):
    make_cache(tmp_path / "pre", n_cases=10, plans=make_plans("Dataset900_Tiny", epochs=(1, 1), iterations=2))
    result = run_training(_roots(tmp_path), None, "3d_cpu", 2, name, device="cpu", num_workers=0)
    state = load_checkpoint(result.fold_dir / "checkpoint_final.pt")
    assert result.fold_dir.parent.name == f"{name}__3d_cpu" and state["epoch"] == 2
    assert state["configuration"]["network"]["tasks"] == tasks
    saved = json.loads((result.fold_dir / "plans.json").read_text(encoding="utf-8"))
    assert saved["configurations"]["3d_cpu"]["network"]["tasks"] == tasks  # what the predictor will rebuild
    stitched = any(k.startswith("cross_stitch") for k in state["network_weights"])
    assert stitched == name.endswith("crossStitch")  # 3d_cpu has none; the variant puts it back
    assert saved["configurations"]["3d_cpu"]["network"]["cross_stitch"] is stitched
    if name.endswith("findings"):
        # Trained in both stages (stage 1 counts it with the classification part).
        assert int(state["network_weights"]["findings_head.updates"]) == 4
        assert float(state["network_weights"]["findings_head.linear.weight"].abs().sum()) > 0


def test_registry_and_ablation_overrides():
    with pytest.raises(DscovidError, match="unknown trainer 'Nope' \\(known: DeepSCCOVIDTrainer, Segmentation"):
        get_trainer("Nope")
    base = Configuration.from_dict("3d_cpu", make_plans("x")["configurations"]["3d_cpu"])
    assert TRAINERS["DeepSCCOVIDTrainer_lambdaTA100"].effective_configuration(base).training.loss.lambda_ta == 100
    # 3d_cpu drops the three parts
    assert base.network.stem == "conv" and base.training.loss.lambda_ta == 0 and not base.network.cross_stitch
    assert TRAINERS["DeepSCCOVIDTrainer_inceptionStem"].effective_configuration(base).network.stem == "inception"
    paper = TRAINERS["DeepSCCOVIDTrainer_paperParts"].effective_configuration(base)
    assert (paper.network.stem, paper.training.loss.lambda_ta, paper.network.cross_stitch) == ("inception", 10, True)
    assert TRAINERS["DeepSCCOVIDTrainer_crossStitch"].effective_configuration(base).network.cross_stitch
    assert TRAINERS["DeepSCCOVIDTrainer_taskAware"].effective_configuration(base).network.stem == "conv"
    assert base.network.stem == "conv" and base.training.loss.lambda_ta == 0  # the plans are not changed in place
    sampling = TRAINERS["DeepSCCOVIDTrainer_lesionSampling"].effective_configuration(base).training.lesion_sampling
    assert (base.training.lesion_sampling, sampling) == ("voxel", "lesion")
    # Every trainer the module defines can be named with -tr.
    import dscovid.training.trainers as module
    from dscovid.training.base_trainer import Trainer

    defined = {name for name, value in vars(module).items()
               if isinstance(value, type) and issubclass(value, Trainer) and value.__module__ == module.__name__}
    assert defined <= set(TRAINERS), f"not in TRAINERS: {sorted(defined - set(TRAINERS))}"


def test_linear_decay_schedule():
    stage = StageConfig("s", 4, 1, OptimizerConfig("adam", 1e-3, (0.9, 0.999), 0.0), "linear", ("all",))
    assert [learning_rate(stage, e) for e in range(4)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])


def test_existing_fold_is_not_overwritten_and_cli_errors_are_one_line(tmp_path, capsys):
    make_cache(tmp_path / "pre", n_cases=10, plans=make_plans("Dataset900_Tiny", epochs=(1, 1), iterations=1))
    args = ["0", "--preprocessed", str(tmp_path / "pre"), "--results", str(tmp_path / "res"), "--device", "cpu",
            "--workers", "0", "-q"]
    assert train_main(args) == 0
    assert train_main(args) == 1
    assert "already holds checkpoints: pass --continue" in capsys.readouterr().err
    assert train_main([*args, "-tr", "Bogus"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown trainer 'Bogus'" in err and "DeepSCCOVIDTrainer" in err
    assert train_main([*args, "--continue"]) == 0  # already finished: resumes at the end, nothing left to train
    assert train_main(["11", *args[1:]]) == 1
    assert "fold must be 0-9 or 'all'" in capsys.readouterr().err
    assert train_main([*args, "--val-only"]) == 0  # no raw dataset here: skipped with a warning, not an error
    assert "Final validation skipped: the raw dataset Dataset900_Tiny is not available" in capsys.readouterr().err
    assert train_main(["1", *args[1:], "--val-only"]) == 1
    assert "checkpoint_final.pt: not found (train the fold before --val-only)" in capsys.readouterr().err


def test_prediction_context_is_the_networks_own_cached_map_in_the_joint_stage(tmp_path, monkeypatch):
    import dscovid.training.lesion_context as lesion_context

    plans = make_plans("Dataset900_Tiny", epochs=(1, 3), iterations=2)
    configuration = plans["configurations"]["3d_cpu"]
    configuration["network"]["lesion_context"] = "prediction"
    configuration["training"]["lesion_context_refresh_epochs"] = 2
    configuration["training"]["hard_negative_fraction"] = 0.5
    dataset_dir = make_cache(tmp_path / "pre", n_cases=10, plans=plans)
    refreshed = []  # one entry per refresh of the cached maps

    def refresh(*args, **kwargs):
        refreshed.append(1)
        return refresh_contexts(*args, **kwargs)

    refresh_contexts = lesion_context.refresh_contexts
    monkeypatch.setattr(lesion_context, "refresh_contexts", refresh)
    stage_modes = []
    on_epoch_start = DeepSCCOVIDTrainer.on_epoch_start

    def record_stage(trainer):
        lr = on_epoch_start(trainer)
        stage_modes.append((trainer.step_mode(trainer.stages[trainer.stage_index]), len(refreshed)))
        return lr

    monkeypatch.setattr(DeepSCCOVIDTrainer, "on_epoch_start", record_stage)
    run_training(_roots(tmp_path), None, "3d_cpu", 0, num_workers=0, device="cpu", seed=5)
    fold_dir = tmp_path / "res" / "Dataset900_Tiny" / "DeepSCCOVIDTrainer__3d_cpu" / "fold_0"
    # Made at the start of the joint stage and again two epochs into it; never in the separate stage 1.
    assert stage_modes == [("separate", 0), ("total", 1), ("total", 1), ("total", 2)]
    cases = list_cache_cases(dataset_dir / "3d_cpu")
    files = sorted((fold_dir / "lesion_context").glob("*.npy"))
    assert [f.stem for f in files] == sorted(cases)  # training and validation cases of the fold
    grid = tuple(configuration["classification"]["grid_zyx"])
    first = np.load(files[0]).astype(np.float32)
    assert first.shape == grid and 0 <= first.min() and first.max() <= 1
    # The loader hands the cached map over in place of the ground truth.
    loader = build_loader([cases[files[0].stem]], 1, (8, 16, 16), (2.0, 1.5, 1.5), 0.0, AugmentationSettings.none(), 0,
                          0, fold_dir / "lesion_context")
    batch = next(loader)
    np.testing.assert_array_equal(batch["cls_lesion"][0, 0], first)
    assert not np.array_equal(first, cases[files[0].stem].load(("cls_lesion",))["cls_lesion"])
    # A fresh run that starts in stage 1 removes an old run's maps rather than training on them.
    from dscovid.training.distributed import DistributedContext
    from dscovid.training.lesion_context import clear_contexts

    clear_contexts(fold_dir / "lesion_context", DistributedContext())
    assert not (fold_dir / "lesion_context").exists()
    # Hard negatives: mined from the training cases only (validation stays unbiased), on voxels without lesion.
    splits = json.loads((dataset_dir / "splits_final.json").read_text(encoding="utf-8"))[0]
    mined = sorted(f.stem for f in (fold_dir / "hard_negatives").glob("*.npy"))
    assert mined and set(mined) <= set(splits["train"]) and not set(mined) & set(splits["val"])
    for name in mined:
        locations = np.load(fold_dir / "hard_negatives" / f"{name}.npy")
        lesion = cases[name].load(("lesion",))["lesion"]
        assert locations.ndim == 2 and locations.shape[1] == 3 and len(locations) <= 2000
        assert not lesion[tuple(locations.T)].any()


def test_loader_centres_non_lesion_patches_on_mined_false_positives(tmp_path):
    dataset_dir = make_cache(tmp_path / "pre", n_cases=3)
    case = list_cache_cases(dataset_dir / "3d_cpu")["case_0002"]  # non-pneumonia
    folder = tmp_path / "hard_negatives"
    folder.mkdir()
    spot = np.array([[3, 30, 35]], dtype=np.int32)
    np.save(folder / "case_0002.npy", spot)
    loader = build_loader([case], 4, (8, 16, 16), (2.0, 1.5, 1.5), 0.0, AugmentationSettings.none(), 3, 0,
                          None, folder, 1.0)
    for _ in range(3):
        for start, size in next(loader)["patch_box"]:
            assert ((start <= spot[0]) & (spot[0] < start + size)).all()
    close_loader(loader)
    # The plans' hard negatives need the joint network's context refresh: a single-task trainer of the same plans
    # trains without them (it used to refuse to start).
    plans = make_plans("Dataset901_Tiny", epochs=(1, 1), iterations=2)
    plans["configurations"]["3d_cpu"]["training"]["hard_negative_fraction"] = 0.3
    make_cache(tmp_path / "pre2", n_cases=10, plans=plans, name="Dataset901_Tiny")
    run_training(Roots(preprocessed=tmp_path / "pre2", results=tmp_path / "res2"), None, "3d_cpu", 0,
                 "SegmentationTrainer", num_workers=0, device="cpu")
    fold_dir = tmp_path / "res2" / "Dataset901_Tiny" / "SegmentationTrainer__3d_cpu" / "fold_0"
    assert (fold_dir / "checkpoint_final.pt").is_file() and not (fold_dir / "hard_negatives").exists()


def test_predicted_context_matches_the_predictors_map(tmp_path):
    from dscovid.inference.engine import segment_scan
    from dscovid.preprocessing.resampling import resample_to_grid
    from dscovid.training.lesion_context import predict_scan

    plans = make_plans("Dataset900_Tiny")
    configuration = plans["configurations"]["3d_cpu"]
    configuration["inference"]["tile_placement"] = "region"  # as both presets: the refresh must follow the plans
    dataset_dir = make_cache(tmp_path / "pre", n_cases=3, plans=plans)
    case = list_cache_cases(dataset_dir / "3d_cpu")["case_0000"]
    configuration = Configuration.from_dict("3d_cpu", configuration)
    torch.manual_seed(0)
    network = build_network(configuration).eval()
    with torch.no_grad():
        made = predict_scan(network, case, configuration, torch.device("cpu"))[0]
        arrays = case.load(("image", "region", "cls_image"))
        scans = {placement: segment_scan(network, torch.from_numpy(arrays["image"])[None], arrays["region"] > 0,
                                         torch.from_numpy(arrays["cls_image"])[None, None], (8, 16, 16), 1.0,
                                         "constant", 2, torch.device("cpu"), torch.device("cpu"), placement=placement)
                 for placement in ("region", "grid")}
    scan = scans["region"]
    expected = resample_to_grid(scan.probability.numpy(), arrays["cls_image"].shape)
    np.testing.assert_allclose(made, expected, atol=1e-6)
    on_grid = resample_to_grid(scans["grid"].probability.numpy(), arrays["cls_image"].shape)
    assert np.abs(made - on_grid).max() > 1e-4  # the tiles differ, so a refresh ignoring the plans would be caught
    assert made.max() > 0 and (scan.probability.numpy()[arrays["region"] == 0] == 0).all()


def test_the_lesion_context_component_follows_the_configuration(tmp_path):
    from dscovid.training.lesion_context import GroundTruthContext, PredictedContext, lesion_context_for

    base = Configuration.from_dict("3d_cpu", make_plans("x")["configurations"]["3d_cpu"])
    predicted = base.with_overrides({"network.lesion_context": "prediction", "training.hard_negative_fraction": 0.3,
                                     "training.lesion_context_refresh_epochs": 3})
    context, notes = lesion_context_for(predicted, tmp_path)
    assert isinstance(context, PredictedContext) and not notes
    assert (context.folder, context.hard_negative_folder) == (tmp_path / "lesion_context", tmp_path / "hard_negatives")
    assert (context.refresh_epochs, context.hard_negative_fraction) == (3, 0.3)
    no_mining, _ = lesion_context_for(predicted.with_overrides({"training.hard_negative_fraction": 0.0}), tmp_path)
    assert no_mining.hard_negative_folder is None and no_mining.hard_negative_fraction == 0.0
    for configuration in (base, predicted.with_overrides({"network.tasks": "segmentation"})):
        context, notes = lesion_context_for(configuration, tmp_path)
        assert type(context) is GroundTruthContext and context.folder is None
    assert notes and "hard_negative_fraction 0.30 not used" in notes[0]


def test_a_cpu_whose_bfloat16_kernels_are_wrong_trains_those_layers_in_float32(tmp_path, monkeypatch, caplog):
    """The trainer replays its own network's layers before trusting bfloat16: the wrong ones compute in float32, and
    if that does not make the check pass, the whole run trains in float32."""
    from dscovid.model import precision

    monkeypatch.delenv(precision.PRECISION_ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: True)
    layer = "lesion_subnet.down3.0.0"
    fault = (layer, f"{layer} [2, 32, 2, 6, 6] weight gradient", float("inf"))
    for replies, dtype, message in [
        ([[]], torch.bfloat16, None),
        ([[fault], []], torch.bfloat16, f"bfloat16 computes wrong results on this CPU ({fault[1]}: relative error "
                                        f"inf against float32); 1 layer(s) compute in float32: {layer}"),
        ([[fault], [fault]], None, f"bfloat16 computes wrong results on this CPU ({fault[1]}: relative error inf "
                                   f"against float32), still with the faulty layers in float32 ({fault[1]}); "
                                   f"training in float32"),
    ]:
        trainer = _trainer(tmp_path)
        assert trainer.autocast_dtype == torch.bfloat16
        weights = {k: v.clone() for k, v in trainer.network.state_dict().items()}
        replies = iter(replies)
        seen = []

        def replay(network, run_forward, dtype, device, replies=replies, seen=seen):
            seen.append(network)
            run_forward()
            return next(replies)

        monkeypatch.setattr("dscovid.training.base_trainer.kernel_faults", replay)
        caplog.clear()
        with caplog.at_level("WARNING", logger="dscovid.training"):
            trainer.check_reduced_precision()
        assert trainer.autocast_dtype == dtype and set(seen) == {trainer.network}
        assert next(replies, "all replayed") == "all replayed"
        assert (message in caplog.text) if message else not caplog.text
        module = dict(trainer.network.named_modules())[layer]
        assert precision.computes_in_float32(module) == (message is not None)
        assert trainer.float32_layers == ([layer] if dtype is not None and message else [])
        assert trainer.checkpoint_state()["precision"] == precision.dtype_name(dtype)
        assert all(torch.equal(v, trainer.network.state_dict()[k]) for k, v in weights.items())  # trains nothing
        assert trainer.network.training


def test_a_step_with_a_non_finite_gradient_is_skipped_and_an_epoch_of_them_stops_training(tmp_path, monkeypatch):
    # float32: a CPU's bfloat16 kernels may themselves give non-finite gradients (docs/training.md, mixed precision)
    monkeypatch.setenv("DSCOVID_PRECISION", "float32")
    trainer = _trainer(tmp_path)
    trainer.train_loader = iter(lambda: _fixed_batch(tmp_path / "pre" / "Dataset900_Tiny"), None)
    trainer.val_loader = trainer.train_loader
    weight = trainer.network.lesion_subnet.side_outputs[0].weight
    before = {k: v.detach().clone() for k, v in trainer.network.named_parameters()}
    handle = weight.register_hook(lambda grad: grad * float("nan"))  # the loss stays finite
    terms = trainer.train_step(next(trainer.train_loader))
    assert np.isfinite(terms["total"]) and trainer.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.network.named_parameters())  # no step taken
    trainer.stages[0] = dataclasses.replace(trainer.stages[0], iterations_per_epoch=2)
    with pytest.raises(DscovidError, match=r"out: training stopped at epoch 1: every step had a non-finite loss or "
                                           r"gradient \(DSCOVID_PRECISION=float32 rules out reduced precision\)$"):
        trainer.run_epoch()
    handle.remove()
    trainer.run_epoch()  # healthy gradients again: the epoch runs and the weights move
    assert trainer.skipped_steps == 0 and not torch.equal(weight, before["lesion_subnet.side_outputs.0.weight"])
