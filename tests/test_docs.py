"""The runnable examples in the back-gradient docstrings run and print what they say."""
import doctest
import importlib

import pytest

MODULES = ["fastdistill.backgrad", "fastdistill.backgrad.auto", "fastdistill.backgrad.batched",
           "fastdistill.backgrad.checkpointed", "fastdistill.backgrad.reversible"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0, f"{name} has no examples"
    assert res.failed == 0
