"""nnU-Net's blosc2 dataset and data loader, adapted to cases without labels."""

from __future__ import annotations

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2


class UnlabeledDataset(nnUNetDatasetBlosc2):
    """Cases of the unlabeled preprocessed folder.

    Their ``_seg`` array holds no label: it is the nonzero mask nnU-Net's preprocessing derives from the image
    (-1 outside, 0 inside), which the augmentation pipeline needs for masked normalisation, exactly as for
    labeled cases. There is no previous-stage segmentation (the cascade is not supported).
    """

    def load_case(self, identifier: str):
        data, seg, _, properties = super().load_case(identifier)
        properties.setdefault("class_locations", {})
        return data, seg, None, properties


class UnlabeledDataLoader(nnUNetDataLoader):
    """nnU-Net's loader with patches drawn uniformly at random: there are no classes to oversample and no
    annotated region to restrict sampling to (the ignore label is a property of labels)."""

    def __init__(self, *args, **kwargs):
        kwargs["oversample_foreground_percent"] = 0.0
        kwargs["probabilistic_oversampling"] = False
        super().__init__(*args, **kwargs)
        self.has_ignore = False
