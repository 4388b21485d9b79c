"""Entry point for nnU-Net's own command-line tools.

Point ``nnUNet_extTrainer`` at this folder (``nnunet-mtl ext-trainer-path`` prints it) and nnU-Net's trainer lookup
by name finds ``nnUNetTrainerMTL``: ``nnUNetv2_train ... -tr nnUNetTrainerMTL`` (including its multi-GPU DDP path)
and ``nnUNetv2_predict_from_modelfolder`` (segmentation only) then work on our model folders. nnU-Net removes the
modules it loads from this folder after the lookup, so this file only re-exports; it must not import lazily.
"""

from nnunet_mtl.training.trainer import nnUNetTrainerMTL

__all__ = ["nnUNetTrainerMTL"]
