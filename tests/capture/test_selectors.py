"""Layer selectors: glob character classes follow fnmatch within one dotted level; aliases resolve."""
from __future__ import annotations

import fnmatch

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import workbench as wb
from workbench.capture import glob_pattern


def flat_net(names: list[str]) -> nn.Module:
    net = nn.Module()
    for name in names:
        net.add_module(name, nn.Identity())
    return net


GLOB_CHARS = "ab-!^]\\[*?"
NAME_CHARS = "ab-!^]\\["


@settings(max_examples=400, deadline=None)
@given(pattern=st.text(GLOB_CHARS, max_size=7), name=st.text(NAME_CHARS, max_size=5))
def test_globs_on_single_level_names_mean_what_fnmatch_means(pattern, name):
    # one dotted level: `*`, `?` and classes behave exactly as shell globs (fnmatch), the reference
    assert bool(glob_pattern(pattern).fullmatch(name)) == fnmatch.fnmatchcase(name, pattern)


def test_negated_class_excludes_and_stays_within_one_level():
    names = ["fc", "features", "conv", "bn", "act"]
    net = flat_net(names)
    net.conv.add_module("0", nn.Identity())
    expected = [name for name in names if fnmatch.fnmatchcase(name, "[!f]*")]
    assert wb.resolve_layers(net, "[!f]*") == expected == ["conv", "bn", "act"]
    assert wb.resolve_layers(net, "[f]*") == ["fc", "features"]
    # a class never matches the level separator, like `?`
    with pytest.raises(KeyError, match=r"no layer matching 'conv\[!a-z\]0'"):
        wb.resolve_layers(net, "conv[!a-z]0")
    assert wb.resolve_layers(net, "conv.[!a-z]") == ["conv.0"]


def test_brackets_without_a_class_are_literal_not_a_regex_error():
    net = flat_net(["[]", "a", "b"])
    assert wb.resolve_layers(net, "[]") == ["[]"]  # fnmatch: "[]" has no closing bracket, so it is literal
    assert wb.resolve_layers(net, "[]ab]") == ["a", "b"]  # a leading "]" is a member of the class
    assert wb.resolve_layers(net, "[!]]") == ["a", "b"]
    with pytest.raises(KeyError, match=r"no layer matching '\[a'"):
        wb.resolve_layers(net, "[a")  # unclosed: a literal "[" — no layer has that name


class Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = self.a  # the same module under a second name
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.a(x))


def test_an_alias_resolves_and_reports_under_the_requested_name(hook_count):
    net = Aliased()
    assert wb.layer_names(net) == ["a", "head"]  # named_modules lists the module once, under its first name
    assert wb.resolve_layers(net, "b") == ["b"]
    assert wb.resolve_layers(net, ["head", "b", "a"]) == ["a", "b", "head"]
    x = torch.randn(5, 3)
    with wb.capture(net, ["b"]) as acts:
        net(x)
    assert list(acts) == ["b"] and torch.equal(acts["b"], net.a(x))
    with wb.capture(net, ["a", "b"]) as acts:
        assert len(net.a._forward_hooks) == 1  # one hook for the module, both names fed from it
        net(x)
    assert list(acts) == ["a", "b"] and acts["a"] is acts["b"]
    assert hook_count(net) == 0
