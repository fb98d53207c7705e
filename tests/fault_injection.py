"""Run ``nnUNetv2_train`` with a fault injected, for the interruption tests.

    python fault_injection.py kill POINT N -- DATASET CONFIGURATION FOLD -tr TRAINER ...
    python fault_injection.py dump FILE -- DATASET CONFIGURATION FOLD -tr TRAINER ... --c

``kill``: SIGKILL the whole process group (as a cluster scheduler does) at the N-th (1-based) occurrence of POINT:

- ``iteration``: inside a training iteration, after the forward pass and the losses, before the backward pass;
- ``checkpoint``: while a checkpoint is written (half of its bytes are in the temporary file);
- ``preprocessing``: while the unlabeled images are preprocessed (N cases finished, the others in flight);
- ``pseudo_label``: while a pseudo-label file is written (half of its bytes are in the temporary file).

``dump``: after ``on_train_start`` (the checkpoint is loaded and every method has restored its state), save what
the trainer holds (``torch.save``) to FILE, then train on as usual.
"""

from __future__ import annotations

import io
import os
import signal
import sys

import torch


def _die() -> None:
    sys.stdout.flush()
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _nth(n: int):
    """A counter that is true on its n-th call."""
    calls = [0]

    def hit() -> bool:
        calls[0] += 1
        return calls[0] == n
    return hit


def install_kill(point: str, n: int) -> None:
    hit = _nth(n)
    if point == "iteration":
        from nnunet_ssl.training.supervised import SupervisedTrainer
        original = SupervisedTrainer._backward_and_step

        def backward_and_step(self, total):
            if hit():
                _die()
            return original(self, total)
        SupervisedTrainer._backward_and_step = backward_and_step
    elif point == "checkpoint":
        save = torch.save

        def torch_save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and "network_weights" in obj and hit():
                buffer = io.BytesIO()
                save(obj, buffer, *args, **kwargs)
                with open(f, "wb") as out:
                    out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    out.flush()
                    os.fsync(out.fileno())
                _die()
            return save(obj, f, *args, **kwargs)
        torch.save = torch_save
    elif point == "preprocessing":
        from nnunet_ssl.data import unlabeled
        write = unlabeled.write_json_atomic

        def write_json_atomic(obj, path):
            write(obj, path)
            if str(path).endswith(unlabeled.MANIFEST) and hit():
                _die()
        unlabeled.write_json_atomic = write_json_atomic
    elif point == "pseudo_label":
        from nnunet_ssl.training import pseudo_labels
        replace = pseudo_labels._replace_atomic

        def replace_atomic(write, path):
            if hit():
                def half(tmp: str) -> None:
                    write(tmp)
                    with open(tmp, "r+b") as f:
                        f.truncate(os.path.getsize(tmp) // 2)
                replace(lambda tmp: (half(tmp), _die()), path)
            return replace(write, path)
        pseudo_labels._replace_atomic = replace_atomic
    else:
        raise SystemExit(f"unknown kill point {point!r}")


def install_dump(file: str) -> None:
    from nnunet_ssl.training.supervised import SupervisedTrainer
    original = SupervisedTrainer.on_train_start

    def on_train_start(self):
        original(self)
        store = self.pseudo_label_store() if hasattr(self, "pseudo_label_store") else getattr(self, "store", None)
        torch.save({
            "current_epoch": self.current_epoch,
            "global_step": self.global_step,
            "network_weights": self.checkpoint_network_weights(),
            "nnunet_ssl": self.extra_checkpoint_state(),
            "pseudo_label_shapes": {c: tuple(store.load(c)[0].shape) for c in store.cases()} if store else {},
        }, file)
    SupervisedTrainer.on_train_start = on_train_start


if __name__ == "__main__":
    split = sys.argv.index("--")
    mode, *args = sys.argv[1:split]
    if mode == "kill":
        install_kill(args[0], int(args[1]))
    elif mode == "dump":
        install_dump(args[0])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    from nnunetv2.run.run_training import run_training_entry
    sys.argv = ["nnUNetv2_train", *sys.argv[split + 1:]]
    run_training_entry()
