"""Loaders: the data files scikit-learn ships, read without importing scikit-learn.

(The on-disk formats of the paper's datasets are tested through the registry, in
``test_datasets.py``.)"""

from __future__ import annotations

import numpy as np
import pytest

from dst.loaders import breast_cancer_arrays, digits_arrays


@pytest.mark.parametrize("name", ["digits", "breast_cancer"])
def test_scikit_learn_data_read_from_its_files_equals_its_loaders(name: str) -> None:
    """Read without importing scikit-learn (seconds saved in every trial process), the arrays
    are exactly its loader's."""
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, f"load_{name}")()
    x, y = {"digits": digits_arrays, "breast_cancer": breast_cancer_arrays}[name]()
    assert x.dtype == np.float64 and y.dtype == np.int64
    np.testing.assert_array_equal(x, bunch.data)
    np.testing.assert_array_equal(y, bunch.target)
