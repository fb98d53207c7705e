"""``nnUNetv2_train`` in a process that records its own peak memory and wall time.

    python -m nnunet_ssl.evaluation.measured_train STATS.json DATASET CONFIGURATION FOLD [nnUNetv2_train options]

Runs nnU-Net's own training entry point (the same function as the ``nnUNetv2_train`` command) and then writes
``STATS.json`` (atomically): the peak resident set size of this process (training and nnU-Net's final validation;
data-augmentation workers are separate processes and not included), the peak CUDA memory allocated by torch when
training ran on a GPU, and the wall time.
"""

from __future__ import annotations

import resource
import sys
import time


def main() -> None:
    if len(sys.argv) < 5:
        raise SystemExit(__doc__)
    stats_file, args = sys.argv[1], sys.argv[2:]
    import torch
    from nnunetv2.run.run_training import run_training_entry

    from nnunet_ssl.data.unlabeled import write_json_atomic

    start = time.time()
    sys.argv = ["nnUNetv2_train", *args]
    run_training_entry()
    stats = {
        "wall_s": time.time() - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "command": ["nnUNetv2_train", *args],
    }
    write_json_atomic(stats, stats_file)


if __name__ == "__main__":
    main()
