"""RegMix's regression: mixture weights -> per-task validation loss, its
quality on held-out proxy runs, and the predicted optimum.

Reference: sail-sg/regmix, ``regression_fitting/regression.ipynb`` at commit
b004d3a. Cell 13 fits one LightGBM model per target metric (gbdt, L2
objective, learning rate 1e-2, up to 1000 trees, seed 42) and scores it by
Spearman's rank correlation on held-out mixtures; cells 16-18 predict
100,000 simulated mixtures and take the mean of the 128 best as the optimum.
allenai/olmix keeps those LightGBM settings (olmix/fit/utils.py:42-52),
averages per-metric predictions into one objective (utils.py:465-469), and
filters candidates by the repetition cap (utils.py:447-451).

Library: LightGBM (pinned in pyproject.toml), as both references; it
installs as a wheel wherever raymix does. scikit-learn gives the linear
alternative (``regressor: linear``) and the k-fold split; SciPy the Spearman.

What raymix does differently, and why:

* No early stopping: the reference stops on its separate test mixtures
  (cell 13, ``stopping_rounds=3``); here every proxy run is training data,
  and the held-out estimate is the k-fold one. ``trees`` rounds (1000) at rate 1e-2.
* ``min_child_samples`` (default 4, LightGBM's is 20): a swarm of 32 would
  otherwise allow at most one split per tree.
* The target may be the worst case over tasks: each task's loss is
  predicted by its own model and the objective is their maximum (or mean),
  as olmix aggregates per-metric predictions.

Pure NumPy plus the libraries above; no Ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

LGBM_PARAMS = dict(boosting_type="gbdt", objective="regression", learning_rate=1e-2, verbosity=-1, n_jobs=1)
"""regression.ipynb cell 13 (``learning_rate`` 1e-2; its ``num_iterations``
1000 is ``policy.regmix.trees``); one thread: the fits are small and the
machine is shared with the runs."""


def aggregate(losses: np.ndarray, target: str, tasks: Sequence[str]) -> np.ndarray:
    """Per-run target from per-task losses (rows: runs, columns: ``tasks``)."""
    losses = np.atleast_2d(losses)
    if target == "worst":
        return losses.max(axis=1)
    if target == "mean":
        return losses.mean(axis=1)
    return losses[:, list(tasks).index(target)]


@dataclass
class MixtureRegression:
    """One regression per task column, from mixture weights to loss."""

    kind: str = "lightgbm"
    min_child_samples: int = 4
    trees: int = 1000
    seed: int = 42  # regression.ipynb cell 13

    def fit(self, X: np.ndarray, Y: np.ndarray) -> MixtureRegression:
        X, Y = np.asarray(X, dtype=np.float64), np.atleast_2d(np.asarray(Y, dtype=np.float64))
        if self.kind == "linear":
            from sklearn.linear_model import LinearRegression

            self.models = [LinearRegression().fit(X, Y)]
        else:
            import lightgbm as lgb

            self.models = [lgb.LGBMRegressor(**LGBM_PARAMS, random_state=self.seed, n_estimators=self.trees,
                                             min_child_samples=self.min_child_samples).fit(X, Y[:, j])
                           for j in range(Y.shape[1])]
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Per-task predicted losses, shape (len(X), tasks)."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        if self.kind == "linear":
            return np.atleast_2d(self.models[0].predict(X)).reshape(len(X), -1)
        return np.stack([m.predict(X) for m in self.models], axis=1)


def cross_validate(reg: MixtureRegression, X: np.ndarray, Y: np.ndarray, target: str, tasks: Sequence[str],
                   folds: int, seed: int) -> dict:
    """The regression's quality on held-out proxy runs: k-fold predictions
    of every run's target (each from the model fitted on the other folds),
    their Spearman rank correlation with the observed targets, and the mean
    relative error |predicted - observed| / observed."""
    from scipy.stats import spearmanr
    from sklearn.model_selection import KFold

    X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    observed = aggregate(Y, target, tasks)
    predicted = np.empty_like(observed)
    for train, held in KFold(n_splits=folds, shuffle=True, random_state=seed).split(X):
        part = MixtureRegression(reg.kind, reg.min_child_samples, reg.trees, reg.seed).fit(X[train], Y[train])
        predicted[held] = aggregate(part.predict(X[held]), target, tasks)
    rho = spearmanr(predicted, observed).statistic if np.ptp(predicted) > 0 else float("nan")
    return {"spearman": float(rho), "relative_error": float(np.mean(np.abs(predicted - observed) / observed)),
            "predicted": predicted.tolist(), "observed": observed.tolist(), "folds": folds}


def search_optimum(reg: MixtureRegression, candidates: np.ndarray, target: str, tasks: Sequence[str],
                   top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(the mean of the ``top_k`` candidates with the lowest predicted
    target, every candidate's predicted target). Candidates within the
    repetition cap keep their mean within it (the cap is linear in the weights)."""
    pred = aggregate(reg.predict(candidates), target, tasks)
    best = np.argsort(pred, kind="stable")[:top_k]
    chosen = np.asarray(candidates)[best].mean(axis=0)
    return chosen / chosen.sum(), pred
