"""Group layers with similar sensitivity (KVTuner §5.3): layers in a group share one pair."""

from __future__ import annotations

from collections.abc import Sequence


def cluster_layers(candidates: Sequence[Sequence[tuple[int, int]]], vectors: Sequence[Sequence[float]], *,
                   eps: float = 0.05, min_samples: int = 2) -> list[list[int]]:
    """Partition layers: first by identical candidate sets, then by DBSCAN on their error vectors.

    Args:
        candidates: per layer, its pruned pair list.
        vectors: per layer, the errors of its candidate pairs (same order).
        eps, min_samples: DBSCAN parameters (paper: 0.05 and 2; Euclidean distance).

    Returns:
        Groups of layer indices, each sorted, ordered by their first layer. DBSCAN noise points become
        groups of one.
    """
    try:
        from sklearn.cluster import DBSCAN
    except ImportError as e:
        raise ImportError("layer clustering needs scikit-learn; install the extra: pip install 'kvtuner[tune]'") \
            from e
    import numpy as np

    by_set: dict[tuple, list[int]] = {}
    for layer, cands in enumerate(candidates):
        by_set.setdefault(tuple(map(tuple, cands)), []).append(layer)
    groups: list[list[int]] = []
    for layers in by_set.values():
        if len(layers) == 1:
            groups.append(layers)
            continue
        x = np.asarray([vectors[i] for i in layers], dtype=float)
        labels = DBSCAN(eps=eps, min_samples=min_samples).fit(x).labels_
        for label in sorted(set(labels)):
            members = [layers[i] for i in range(len(layers)) if labels[i] == label]
            if label == -1:
                groups.extend([m] for m in members)
            else:
                groups.append(members)
    return sorted(groups, key=lambda g: g[0])
