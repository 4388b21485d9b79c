"""Names of the tests' tiny dataset and model (the fixtures in conftest.py build them once per session), and the
real CT files shipped with the tests. A helper module, not a conftest: test files import it by name."""

from __future__ import annotations

from pathlib import Path

REAL_CT = Path(__file__).resolve().parent / "data" / "real-ct"  # a real abdominal CT (TotalSegmentator, Apache-2.0)
TINY_DATASET_ID = 990
TINY_DATASET = f"Dataset{TINY_DATASET_ID}_Tiny"
TINY_PLANS = "nnUNetPlans_MTLtiny"
# Training cases per subtype: imbalanced on purpose, so inverse-frequency class weights differ from 1 (7 cases:
# 7 / (3 x 2) for subtypes 0 and 1, 7 / (3 x 3) for subtype 2), as in the real split.
TINY_TRAIN_PER_SUBTYPE = (2, 2, 3)
TINY_VAL_PER_SUBTYPE = (1, 1, 1)
TINY_TEST_CASES = 3
