#!/usr/bin/env bash
# From a fresh machine to two trained models: install nnunet-ssl into .venv, generate the synthetic demo dataset,
# plan and preprocess it with nnU-Net, train MuSTTrainer and the supervised baseline on the same 4 labeled cases
# with a short schedule, predict the test images with nnUNetv2_predict, evaluate with nnU-Net's evaluation and
# print both Dice scores side by side. Everything is written below $DEMO_DIR (default: demo_work/).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${NNUNET_SSL_VENV:-.venv}"
DEMO_DIR="$(pwd)/${DEMO_DIR:-demo_work}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -e .
export PATH="$(pwd)/$VENV/bin:$PATH"

export nnUNet_raw="$DEMO_DIR/nnUNet_raw" nnUNet_preprocessed="$DEMO_DIR/nnUNet_preprocessed"
export nnUNet_results="$DEMO_DIR/nnUNet_results"
export nnUNet_def_n_proc="${nnUNet_def_n_proc:-2}" nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-2}"
export nnUNet_extTrainer="$(nnunet_ssl trainers-path)"
DEVICE="${DEVICE:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
ID=990
DS="$nnUNet_raw/Dataset${ID}_SSLDemo"

# 5 labeled cases: nnU-Net's 5-fold split leaves 4 for training in fold 0 (1 for validation); 20 unlabeled
python examples/make_demo_dataset.py --raw "$nnUNet_raw" --id $ID --labeled 5 --unlabeled 20 --test 10 --size 32
nnUNetv2_plan_and_preprocess -d $ID -c 3d_fullres -np "$nnUNet_def_n_proc"
nnunet_ssl preprocess-unlabeled -d $ID -c 3d_fullres  # optional: training would do it too

# A short schedule for a CPU: 12 epochs of 20 iterations (the paper-length default is 1000 x 250).
SHORT='{"num_epochs": 12, "num_iterations_per_epoch": 20, "num_val_iterations_per_epoch": 5}'
export nnUNet_ssl_hparams="${nnUNet_ssl_hparams:-$SHORT}"
SUMMARIES=()
for TR in SupervisedTrainer MuSTTrainer; do
    nnUNetv2_train $ID 3d_fullres 0 -tr $TR -device "$DEVICE"
    nnUNetv2_predict -i "$DS/imagesTs" -o "$DEMO_DIR/predictions_$TR" -d $ID -c 3d_fullres -tr $TR -f 0 \
        -device "$DEVICE"
    nnUNetv2_evaluate_folder "$DS/labelsTs" "$DEMO_DIR/predictions_$TR" \
        -djfile "$DEMO_DIR/predictions_$TR/dataset.json" -pfile "$DEMO_DIR/predictions_$TR/plans.json"
    SUMMARIES+=("$TR=$DEMO_DIR/predictions_$TR/summary.json")
done
python examples/compare_dice.py "${SUMMARIES[@]}"
