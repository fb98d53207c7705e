"""Every trainer under nnU-Net's multi-GPU code path (``run_ddp``, as ``nnUNetv2_train -num_gpus 2`` runs it), on two
CPU processes with the gloo backend: the batch is split over the ranks, each rank draws its own unlabeled batches,
every parameter gets a gradient in every step (DDP fails otherwise), the replicas stay identical, the teacher is
never wrapped, the extra logged values are averaged over the ranks, and training ends with nnU-Net's validation (for
the two trainers whose networks predict through their own heads; the others' final validation, which differs only in
the network, runs in a single process in ``test_interruption.py``)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from nnunet_ssl.trainers import TRAINERS

pytestmark = pytest.mark.slow

SCHEDULE = {"num_epochs": 2, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1}
VALIDATED = ("MisMatchTrainer", "UGMCLTrainer")  # two decoders averaged; the dual-task network's segmentation head
EXTRA = {  # hyper-parameters that put a pseudo-label round into these two epochs
    "POPCORNTrainer": {"first_step_epochs": 1, "epochs_per_round": 1, "selection_size": 4},
    "LocalContrastiveTrainer": {"supervised_fraction": 0.25, "pseudo_label_rounds": 1, "refresh_every": 1},
    "UGMCLTrainer": {"mc_passes": 2},
    "UAMTTrainer": {"mc_passes": 2},
}


@pytest.fixture(scope="module")
def ddp_runs(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    env = demo.copy(root / "env")
    out = root / "out"
    out.mkdir()
    spec = {"world_size": 2, "out": str(out), "dataset": env.dataset_id,
            "runs": [{"trainer": t, "configuration": "2d", "hparams": {**SCHEDULE, **EXTRA.get(t, {})},
                      "validate": t in VALIDATED} for t in TRAINERS]}
    (root / "spec.json").write_text(json.dumps(spec))
    # one export worker per rank in nnU-Net's final validation (the test environments' nnUNet_def_n_proc)
    env.run(sys.executable, str(REPO / "tests" / "ddp_cpu.py"), str(root / "spec.json"),
            extra_env={"nnUNet_n_proc_DA": "0"})
    return env, out


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_trainer_under_ddp(trainer, ddp_runs):
    env, out = ddp_runs
    ranks = [torch.load(out / f"{trainer}_rank{r}.pt", weights_only=False) for r in (0, 1)]
    global_batch = json.loads((env.pp / "nnUNetPlans.json").read_text())["configurations"]["2d"]["batch_size"]
    assert sum(r["batch_size"] for r in ranks) == global_batch  # nnU-Net's split of the batch over the ranks
    for r in ranks:
        assert r["network_is_ddp"] and not r["teacher_is_ddp"]
        assert r["no_grad"] == [], f"parameters without gradient under DDP: {r['no_grad'][:5]}"
        assert r["batch_sizes"] and set(r["batch_sizes"]) == {r["batch_size"]}
        if TRAINERS[trainer].__dict__.get("draws_unlabeled_batches", True) and trainer != "SupervisedTrainer":
            assert r["unlabeled_batch_sizes"], "no unlabeled batch was drawn on this rank"
    # DDP averaged the gradients: both replicas (and the teachers built from them) are the same
    assert _equal(ranks[0]["weights"], ranks[1]["weights"])
    if ranks[0]["teacher"] is not None:
        assert _equal(ranks[0]["teacher"], ranks[1]["teacher"])
    # every rank logs the mean over the ranks, of losses that differ between the ranks
    for key in ("train_losses", *ranks[0]["extra_log_keys"]):
        assert ranks[0]["logged"][key] == ranks[1]["logged"][key], key
    assert [m["loss"] for m in ranks[0]["local_means"]] != [m["loss"] for m in ranks[1]["local_means"]]
    for key in ranks[0]["extra_log_keys"]:
        expected = [np.mean([r["local_means"][e][key] for r in ranks]) for e in range(SCHEDULE["num_epochs"])]
        assert ranks[0]["logged"][key] == pytest.approx(expected), key
    fold = env.results(trainer, "2d")
    assert (fold / "checkpoint_final.pth").is_file()
    assert (fold / "validation" / "summary.json").is_file() == (trainer in VALIDATED)
