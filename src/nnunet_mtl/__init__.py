"""nnunet-mtl: one nnU-Net v2 network that segments pancreas + lesion and classifies the lesion subtype."""

__version__ = "0.1.0"
