"""PEFT's own method test suite (`tests/test_custom_models.py` of the installed peft release) on MeDyate.

The release's test module is fetched as its sdist (see `peft_release`). Its case lists are replaced in
place by MeDyate cases before pytest expands the parametrizations (the `parametrize` marks hold the
list objects), and its test classes are re-exported here holding only the tests that take those
cases; the others exercise other PEFT methods. Not run: `TestMixedAdapterBatches` (per-sample
`adapter_names`, a LoRA-family feature MeDyate does not offer) and the per-method classes.

The cases cover PEFT's test models that hold a Linear, Conv2d or transformers' Conv1D layer (MLP2,
Conv3d, Conv1dBigger and Conv1dGroups add nothing to MLP and Conv1d; Conv1dKernel1's forward does not
take the suite's `X=` input). Models whose other layers MeDyate does not train (nn.Conv1d,
nn.MultiheadAttention) are tuned on their Linear layers. Every case trains channels from the first step
(the strategies that rank layers get a `layer_ranking`): the suite checks gradients after one
backward, while a ranking measured from the first batches trains only the head meanwhile (tested in
test_strategies).

Skipped by peft's own conditions: `test_disable_adapter_with_bias_warns` (its condition skips every
method) and multiple active adapters with modules_to_save (not supported by PEFT).
"""

from __future__ import annotations

import pytest
from peft_release import IndexUnreachable, load

import medyate_peft  # noqa: F401  (registers the method)
from medyate_peft import MeDyateConfig

pytestmark = pytest.mark.slow

try:
    upstream = load("test_custom_models")
except IndexUnreachable as err:
    pytest.skip(str(err), allow_module_level=True)

RANDOM = {"strategy": "full_random"}
# A LaRa/RGN ranking of the MLP's two layers, as `rank_layers` writes it.
MLP_RANKING = {
    "format": "medyate-layer-ranking", "version": 1, "source": "test", "steps": 1,
    "lara": {"lin0": 2.0, "lin1": 1.0}, "rgn": {"lin0": 2.0, "lin1": 1.0}, "layer_slots": {"lin0": 210, "lin1": 42},
}

CASES = [
    ("Vanilla MLP 1 MeDyate", "MLP", MeDyateConfig, RANDOM),
    ("Vanilla MLP 2 MeDyate", "MLP", MeDyateConfig, {**RANDOM, "target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 3 MeDyate", "MLP", MeDyateConfig, {**RANDOM, "target_modules": "lin.*", "budget_kb": 0.3}),
    ("Vanilla MLP 4 MeDyate", "MLP", MeDyateConfig,
     {"strategy": "static_random", "budget_kb": 0.5, "exclude_modules": ["lin1"]}),
    ("Vanilla MLP 5 MeDyate", "MLP", MeDyateConfig, {"strategy": "medyate", "layer_ranking": MLP_RANKING}),
    ("Vanilla MLP 6 MeDyate", "MLP", MeDyateConfig, {"strategy": "trady", "layer_ranking": MLP_RANKING}),
    ("MLP LayerNorm MeDyate", "MLP_LayerNorm", MeDyateConfig, RANDOM),
    ("Embedding + transformers Conv1D MeDyate", "EmbConv1D", MeDyateConfig, RANDOM),
    ("Conv1d MeDyate", "Conv1d", MeDyateConfig, RANDOM),
    ("MHA MeDyate", "MHA", MeDyateConfig, RANDOM),
    ("Conv2d MeDyate", "Conv2d", MeDyateConfig, RANDOM),
    ("Conv2d 1x1 MeDyate", "Conv2d1x1", MeDyateConfig, RANDOM),
    ("Conv2d2 MeDyate", "Conv2d2", MeDyateConfig, {**RANDOM, "budget_kb": 2.0}),
    ("Conv2d Groups MeDyate", "Conv2dGroups", MeDyateConfig, RANDOM),
    ("Conv2d Groups2 MeDyate", "Conv2dGroups2", MeDyateConfig, {**RANDOM, "target_modules": ["conv2d"]}),
]
MULTI_ADAPTER_CASES = [
    ("MeDyate Same", "medyate", MeDyateConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin0"], "init_weights": False}),
    ("MeDyate Different", "medyate", MeDyateConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin1"], "init_weights": False}),
]

upstream.TEST_CASES[:] = CASES
upstream.ALL_PEFT_CONFIG_CLASSES[:] = [MeDyateConfig]
upstream.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES[:] = MULTI_ADAPTER_CASES
_OURS = (upstream.TEST_CASES, upstream.ALL_PEFT_CONFIG_CLASSES, upstream.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES)


def _takes_our_cases(test) -> bool:
    marks = getattr(test, "pytestmark", [])
    return any(m.name == "parametrize" and any(arg is cases for arg in m.args for cases in _OURS) for m in marks)


def _with_our_cases(cls: type) -> type:
    """`cls` holding only its tests parametrized by the MeDyate cases (None hides a test from pytest)."""
    hidden = {name: None for name in dir(cls) if name.startswith("test_") and not _takes_our_cases(getattr(cls, name))}
    return type(cls.__name__, (cls,), {**hidden, "__module__": __name__, "__doc__": cls.__doc__})


TestPeftCustomModel = _with_our_cases(upstream.TestPeftCustomModel)
TestMultipleActiveAdapters = _with_our_cases(upstream.TestMultipleActiveAdapters)
TestRequiresGrad = _with_our_cases(upstream.TestRequiresGrad)
TestPeftFsdpStateDict = _with_our_cases(upstream.TestPeftFsdpStateDict)
