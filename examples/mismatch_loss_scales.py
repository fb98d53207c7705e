"""Magnitudes of MisMatch's two loss terms on a dataset: the supervised Dice + CE of both decoders (L_s) and the
consistency MSE between the decoders (L_c), as values and as gradient norms over the network's parameters.

Use it to choose the consistency weight alpha for a dataset: alpha * ||grad L_c|| / ||grad L_s|| says how much the
consistency term steers the update relative to the supervised one.

    python examples/mismatch_loss_scales.py -d 990 -c 3d_fullres [-f 0] [--checkpoint PATH] [--batches 8]

Without --checkpoint the network is freshly initialised (the state at the start of training); with one (e.g. the
fold's checkpoint_latest.pth of a MisMatchTrainer run) the trained state is measured. Batches come from the
trainer's own labeled and unlabeled loaders (augmented patches, as in training).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-c", default="3d_fullres", help="configuration")
    parser.add_argument("-f", default="0", help="fold")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("--checkpoint", default=None, help="MisMatchTrainer checkpoint to measure (default: fresh)")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--alphas", type=float, nargs="*", default=[0.002, 0.1, 1.0, 10.0])
    args = parser.parse_args()

    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_ssl.methods.mismatch.losses import consistency_loss, supervised_loss
    from nnunet_ssl.methods.mismatch.trainer import MisMatchTrainer

    name = maybe_convert_to_dataset_name(args.d)
    pp = Path(nnUNet_preprocessed.require()) / name
    plans = json.loads((pp / f"{args.p}.json").read_text())
    dataset_json = json.loads((pp / "dataset.json").read_text())
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="nnunet_ssl_scales_")  # the trainer creates folders
    fold = args.f if args.f == "all" else int(args.f)
    trainer = MisMatchTrainer({**plans, "continue_training": False}, args.c, fold, dataset_json, torch.device("cpu"))
    trainer.initialize()
    if args.checkpoint:
        trainer.load_checkpoint(args.checkpoint)
    trainer.unlabeled_identifiers = trainer.prepare_unlabeled_data()
    labeled, _ = trainer.get_dataloaders()
    unlabeled = trainer.get_unlabeled_dataloader()
    net = trainer.network
    params = [p for p in net.parameters() if p.requires_grad]
    rows = []
    for _ in range(args.batches):
        batch = next(labeled)
        data, target, data_u = batch["data"], batch["target"], next(unlabeled)["data"]
        n_l = data.shape[0]
        out_d, out_e = net(torch.cat((data, data_u)), both_decoders=True)
        l_s = supervised_loss(trainer.loss, [o[:n_l] for o in out_d], [o[:n_l] for o in out_e], target)
        l_c = consistency_loss(out_d[0][n_l:], out_e[0][n_l:], trainer.label_manager.has_regions)
        g_s = torch.autograd.grad(l_s, params, retain_graph=True, allow_unused=True)
        g_c = torch.autograd.grad(l_c, params, allow_unused=True)
        norm = [float(torch.sqrt(sum((g.float() ** 2).sum() for g in gs if g is not None))) for gs in (g_s, g_c)]
        rows.append((float(l_s.detach()), float(l_c.detach()), *norm))
    l_s, l_c, n_s, n_c = np.mean(rows, 0)
    print(f"{name} {args.c}, {'checkpoint ' + args.checkpoint if args.checkpoint else 'fresh network'}, "
          f"{args.batches} batches")
    print(f"L_s (Dice+CE, both decoders) {l_s:.4f}   ||grad L_s|| {n_s:.4g}")
    print(f"L_c (MSE between decoders)   {l_c:.4g}   ||grad L_c|| {n_c:.4g}")
    print(f"alpha at which alpha ||grad L_c|| = ||grad L_s||: {n_s / n_c:.4g}")
    for a in args.alphas:
        print(f"alpha {a:<8g} weighted term {a * l_c:.3g} ({a * l_c / abs(l_s):.2%} of |L_s|), "
              f"gradient ratio {a * n_c / n_s:.3g}")
    for loader in (labeled, unlabeled):
        if hasattr(loader, "_finish"):
            loader._finish()


if __name__ == "__main__":
    main()
