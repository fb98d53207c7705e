"""Train trainers with nnU-Net's multi-GPU code path (``nnUNetv2_train -num_gpus N``: ``run_ddp``) on CPU processes.

    python ddp_cpu.py SPEC.json

SPEC: ``{"world_size": 2, "out": folder, "dataset": id, "runs": [{"trainer": name, "configuration": c,
"hparams": {...}, "validate": true}, ...]}`` (``validate`` false: training ends without nnU-Net's final validation).
Each rank runs nnU-Net's ``run_ddp`` for every run in turn, with the three things that tie it to CUDA replaced: the
process group uses gloo (a file store), the trainer's device is the CPU (nnU-Net sets ``cuda:rank`` under DDP, and a
CUDA grad scaler), and ``DistributedDataParallel`` gets no ``device_ids``. Everything else (batch split over ranks,
loaders, training loop, checkpoints, final validation) is nnU-Net's and the plugin's.
Each rank writes ``{out}/{trainer}_rank{r}.pt`` with what the test compares across ranks.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.multiprocessing as mp
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel


def _rank(rank: int, spec: dict) -> None:
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    from nnunetv2.run import run_training
    from nnunetv2.utilities.collate_outputs import collate_outputs

    from nnunet_ssl.training.base import SemiSupervisedTrainer
    from nnunet_ssl.training.supervised import SupervisedTrainer

    world = spec["world_size"]
    record: dict = {}
    trainers: list = []
    store = [None]
    validate = [True]

    run_training.setup_ddp = lambda r, w: dist.init_process_group(
        "gloo", init_method=f"file://{store[0]}", rank=r, world_size=w)
    torch.cuda.set_device = lambda *a, **k: None
    nnunet_trainer_module.DDP = lambda module, device_ids=None, **kw: DistributedDataParallel(module, **kw)
    get_trainer = run_training.get_trainer_from_args

    def get_trainer_on_cpu(*args, **kwargs):
        trainer = get_trainer(*args, **kwargs)
        trainer.device, trainer.grad_scaler = torch.device("cpu"), None
        if not validate[0]:
            trainer.perform_actual_validation = lambda *a, **k: None
        trainers.append(trainer)
        return trainer
    run_training.get_trainer_from_args = get_trainer_on_cpu

    train_step, epoch_end = SupervisedTrainer.train_step, SupervisedTrainer.on_train_epoch_end

    def recording_train_step(self, batch):
        out = train_step(self, batch)
        net = self.unwrapped_network()
        record["no_grad"].update(n for n, p in net.named_parameters() if p.requires_grad and p.grad is None)
        record["batch_sizes"].append(int(batch["data"].shape[0]))
        return out

    def recording_epoch_end(self, train_outputs):
        kept = collate_outputs([{k: v for k, v in o.items() if k != "skipped"} for o in train_outputs])
        record["local_means"].append({k: float(v.mean()) for k, v in kept.items()})
        return epoch_end(self, train_outputs)
    SupervisedTrainer.train_step, SupervisedTrainer.on_train_epoch_end = recording_train_step, recording_epoch_end

    unlabeled_input = SemiSupervisedTrainer.unlabeled_input

    def recording_unlabeled_input(self):
        data = unlabeled_input(self)
        if data is not None:
            record["unlabeled_batch_sizes"].append(int(data.shape[0]))
        return data
    SemiSupervisedTrainer.unlabeled_input = recording_unlabeled_input

    for i, run in enumerate(spec["runs"]):
        store[0] = os.path.join(spec["out"], f"store_{i}")
        validate[0] = run.get("validate", True)
        os.environ["nnUNet_ssl_hparams"] = json.dumps(run["hparams"])
        record.clear()
        record.update(no_grad=set(), batch_sizes=[], unlabeled_batch_sizes=[], local_means=[])
        run_training.run_ddp(rank, str(spec["dataset"]), run["configuration"], 0, run["trainer"], "nnUNetPlans",
                             False, False, False, None, False, False, world)
        trainer = trainers[-1]
        teacher = getattr(trainer, "teacher", None)
        torch.save({
            "network_is_ddp": isinstance(trainer.network, DistributedDataParallel),
            "teacher_is_ddp": teacher is not None and isinstance(teacher.module, DistributedDataParallel),
            "weights": trainer.unwrapped_network().state_dict(),
            "teacher": teacher.state_dict() if teacher is not None else None,
            "logged": {k: list(v) for k, v in trainer.logger.get_checkpoint().items()},
            "extra_log_keys": list(trainer.extra_log_keys),
            "batch_size": trainer.batch_size,
            **{k: sorted(v) if isinstance(v, set) else v for k, v in record.items()},
        }, os.path.join(spec["out"], f"{run['trainer']}_rank{rank}.pt"))


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    mp.spawn(_rank, args=(spec,), nprocs=spec["world_size"], join=True)
