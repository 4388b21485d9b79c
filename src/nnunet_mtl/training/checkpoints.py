"""Checkpoints of the multi-task trainer: atomic, and readable with ``torch.load(..., weights_only=True)``.

Overrides of :class:`nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer` (mixed into
:class:`~nnunet_mtl.training.trainer.nnUNetTrainerMTL`):

- ``save_checkpoint``: nnU-Net's content plus the combined-score state and the optimizer's name, converted to plain
  Python values (numpy scalars would need ``weights_only=False``), written to a temporary name and renamed, so an
  interrupted write never leaves a broken checkpoint.
- ``load_checkpoint``: 2.8.1's cannot take a dict and expects nnU-Net's keys only; ours restores our keys too,
  tolerates older checkpoints lacking a logger key, refuses to resume with another optimizer, and reports a damaged
  file by its path (:func:`read_checkpoint`; torch's own errors name no file).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from nnunet_mtl.tempfiles import temp_path

CHECKPOINT_KEYS = ("network_weights", "init_args")
RESUME_KEYS = ("network_weights", "optimizer_state", "logging", "current_epoch", "init_args")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names it and the other checkpoints of its folder."""


def other_checkpoints(path: Path) -> list[str]:
    return [p.name for p in sorted(Path(path).parent.glob("checkpoint_*.pth")) if p.name != Path(path).name]


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    required: Sequence[str] = CHECKPOINT_KEYS, hint: str = "") -> dict:
    """``torch.load(path, weights_only=True)``; a damaged file (0 bytes, cut short, not a checkpoint) or one lacking
    ``required`` keys is a :class:`CheckpointError` naming it, its size and the other checkpoints beside it
    (``hint`` says what to do with them)."""
    path = Path(path)
    others = other_checkpoints(path)
    beside = (f"; the folder also holds {', '.join(others)}{hint}" if others
              else "; the folder holds no other checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint{beside}") from None
    except Exception as e:  # torch raises EOFError, RuntimeError, UnpicklingError... for the same user problem
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: damaged or not a checkpoint ({path.stat().st_size} bytes; {reason})"
                              f"{beside}") from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of this kind (no {', '.join(missing)}){beside}")
    return state


def to_plain(value):
    """numpy scalars and arrays to Python numbers, so checkpoints load with weights_only=True."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class CheckpointMixin:
    """save_checkpoint / load_checkpoint for nnUNetTrainerMTL (see the module docstring)."""

    extra_log_keys: tuple[str, ...] = ()

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            return
        checkpoint = {
            "network_weights": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": to_plain(self.logger.get_checkpoint()),
            "_best_ema": to_plain(self._best_ema),
            "_best_combined": to_plain(self._best_combined),
            "current_epoch": self.current_epoch + 1,
            "init_args": {k: v for k, v in self.my_init_kwargs.items()},
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": to_plain(self.inference_allowed_mirroring_axes),
            "optimizer_name": self.optimizer_name,
        }
        tmp = temp_path(Path(filename))  # hidden, named after this process: a later run removes it if killed
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, filename)
        finally:
            tmp.unlink(missing_ok=True)

    def load_weights_for_validation(self, filename: str | Path) -> None:
        """``--validation-only``: the network weights and mirroring axes of a checkpoint, none of its optimizer
        state, so that predicting the validation fold again does not ask for the options that shaped training."""
        checkpoint = read_checkpoint(filename, self.device, ("network_weights",))
        self._load_network(checkpoint)
        self.current_epoch = checkpoint.get("current_epoch", self.current_epoch)

    def _load_network(self, checkpoint: dict) -> None:
        """The weights (a DDP run's ``module.`` prefix dropped) and the mirroring axes the checkpoint predicts with."""
        self.model.load_state_dict({k.removeprefix("module."): v for k, v in checkpoint["network_weights"].items()})
        axes = checkpoint.get("inference_allowed_mirroring_axes", self.inference_allowed_mirroring_axes)
        self.inference_allowed_mirroring_axes = tuple(axes) if axes is not None else None

    def load_checkpoint(self, filename_or_checkpoint: str | dict) -> None:
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if not isinstance(checkpoint, dict):
            checkpoint = read_checkpoint(filename_or_checkpoint, self.device, RESUME_KEYS,
                                         hint=": move the damaged one away to resume from another")
        self._load_network(checkpoint)
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        logging = checkpoint["logging"]
        for key in self.extra_log_keys:  # checkpoints of older runs may lack a key; nnU-Net's logger needs them all
            logging.setdefault(key, [])
        self.logger.load_checkpoint(logging)
        self._best_ema = checkpoint["_best_ema"]
        self._best_combined = checkpoint.get("_best_combined")
        saved_optimizer = checkpoint.get("optimizer_name", "sgd")
        if saved_optimizer != self.optimizer_name:
            raise ValueError(f"{filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else 'checkpoint'}"
                             f" was trained with optimizer {saved_optimizer!r}; resume it with --optimizer "
                             f"{saved_optimizer}, not {self.optimizer_name!r}")
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint["grad_scaler_state"] is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
