"""EngineOptions: typed, frozen, set by name or from text, one clear error for a bad one."""
import dataclasses

import pytest
import torch

import specoff
from specoff.options import (CacheOptions, EngineOptions, KernelOptions, OptionsError,
                             SpecOptions)


def test_fields_are_set_by_their_own_name_dotted_or_as_a_whole():
    o = EngineOptions.build(spec="tree", draft_len=4, gpu_memory="24GiB", pdl=False,
                            **{"cache.draft_slack": 2})
    assert o.spec.mode == "tree" and o.spec.draft_len == 4 and o.gpu_memory == "24GiB"
    assert o.kernels.pdl is False and o.cache.draft_slack == 2.0
    kernels = KernelOptions(interpret=True)
    assert o.replace(kernels=kernels).kernels is kernels
    assert o.replace(spec=SpecOptions(mode="chain")).spec.mode == "chain"
    assert EngineOptions().replace() == EngineOptions()  # nothing set: the defaults
    assert o.replace(device=torch.device("cpu"), dtype=torch.float16).dtype == "float16"
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.max_rows = 3


def test_text_values_take_each_fields_type():
    o = EngineOptions()
    assert o.with_setting("kernels.pdl", "off").kernels.pdl is False
    assert o.with_setting("kernels.pdl", "True").kernels.pdl is True
    assert o.with_setting("tree_budget", "32").spec.tree_budget == 32
    assert o.with_setting("tree_budget", "auto").spec.tree_budget == "auto"
    assert o.with_setting("draft_slack", "1.5").cache.draft_slack == 1.5
    assert o.with_setting("draft_len", "none").spec.draft_len is None
    assert o.with_setting("spec", "chain").spec.mode == "chain"
    assert o.with_setting("gpu_memory", "24GiB").gpu_memory == "24GiB"
    assert o.with_setting("joint-tail", "on").spec.joint_tail == "on"


@pytest.mark.parametrize("fields, message", [
    (dict(no_such=1), "no option named 'no_such'; the options are: cache, cache.draft_slack"),
    (dict(draft_len="x"), "option spec.draft_len takes None or int, not 'x'"),
    (dict(joint_tail="maybe"), "option spec.joint_tail takes 'auto' or 'on' or 'off', not 'maybe'"),
    (dict(kernels=3), "option kernels takes a KernelOptions, not 3"),
    (dict(max_rows=True), "option max_rows takes int, not True"),
    (dict(spec="beam"), "option spec.mode takes 'chain' or 'tree' or None, not 'beam'"),
])
def test_a_bad_option_is_one_clear_error(fields, message):
    with pytest.raises(OptionsError) as e:
        EngineOptions.build(**fields)
    assert str(e.value).startswith(message)
    assert isinstance(e.value, ValueError)  # the command line's one-line errors catch it


def test_a_bad_text_value_is_one_clear_error():
    with pytest.raises(OptionsError, match="option kernels.pdl takes bool, not 'maybe'"):
        EngineOptions().with_setting("kernels.pdl", "maybe")
    with pytest.raises(OptionsError, match="option max_rows takes int, not 'many'"):
        EngineOptions().with_setting("max_rows", "many")


def test_every_field_has_a_one_line_doc():
    """Each field carries its doc as a comment on its line (or, for a long one, the line
    above); the nested options are documented by their own classes."""
    import inspect

    for cls in (EngineOptions, SpecOptions, CacheOptions, KernelOptions):
        lines = inspect.getsource(cls).splitlines()
        for f in dataclasses.fields(cls):
            if f.name in ("spec", "cache", "kernels"):
                continue
            at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{f.name}:"))
            assert "#" in lines[at] or lines[at - 1].strip().startswith("#"), f"{cls.__name__}.{f.name}"


def test_the_llm_records_and_reconfigures_its_options(pairs):
    draft, target = pairs(0.3)
    llm = specoff.LLM(target, draft=draft, device="cpu", spec="chain", draft_len=3)
    assert llm.options.spec.mode == "chain" and llm.options.device == "cpu"
    llm.generate([[5, 6, 7]], specoff.SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert llm.last_stats.options == llm.options.to_dict()
    assert llm.last_stats.options["spec"]["draft_len"] == 3
    llm.reconfigure(draft_len=2, joint_tail="on")
    assert llm.options.spec.draft_len == 2 and llm.options.spec.joint_tail == "on"
    with pytest.raises(ValueError, match="dtype shaped the models this LLM built"):
        llm.reconfigure(dtype="float16")
    with pytest.raises(ValueError, match="kernels.fold_draft_norms shaped the models"):
        llm.reconfigure(fold_draft_norms=False)
    assert llm.options.dtype is None  # refused: nothing changed
    options = EngineOptions.build(spec="tree", tree_budget=4, device="cpu")
    llm = specoff.LLM(target, draft=draft, options=options, max_rows=2)
    assert llm.options == options.replace(max_rows=2)  # fields given beside options win
