"""LayerPicker: choose a model's layers from a filtered list that shows each module's type and output shape.

It reads a :func:`workbench.layer_table` and holds no knowledge of models itself. The filter box takes a
glob read as a layer selector (``*``, ``?``, ``[...]`` within one dotted level, ``**`` across levels:
``"layer*.0"``, ``"**conv*"``); text without glob characters matches as a substring of the name or the
type (case-insensitive). The view toggle lists the stages, the leaves (modules without children) or
all modules. Filtering only changes what is listed: the selection is kept whole, and the count line
says how many layers are selected and how many of them the list hides.
"""
from __future__ import annotations

import difflib
import html
from collections.abc import Iterable, Sequence

import ipywidgets
import pandas as pd
import traitlets

from workbench.capture import glob_pattern

VIEWS = ("stages", "leaf", "all")
_VIEW_TOOLTIPS = ("the model's stages", "modules without children", "every named module")


def format_shape(shape: tuple[int, ...] | None) -> str:
    """An output shape per sample as ``64×8×8`` (``?`` when unknown, ``scalar`` for ``()``).

    Example:
        >>> format_shape((64, 8, 8)), format_shape(None), format_shape(())
        ('64×8×8', '?', 'scalar')
    """
    if shape is None:
        return "?"
    return "×".join(str(size) for size in shape) if shape else "scalar"


def filter_names(table: pd.DataFrame, text: str) -> list[str]:
    """The names of ``table`` (a :func:`workbench.layer_table`) that the filter text keeps, in order.

    Example:
        >>> table = pd.DataFrame({"name": ["layer1", "layer1.0", "fc"], "type": ["Sequential", "Block", "Linear"]})
        >>> filter_names(table, "layer*"), filter_names(table, "**.0"), filter_names(table, "LIN")
        (['layer1'], ['layer1.0'], ['fc'])
    """
    text = text.strip()
    names, types = table["name"].tolist(), table["type"].tolist()
    if not text:
        return names
    if any(char in text for char in "*?["):
        pattern = glob_pattern(text)
        return [name for name in names if pattern.fullmatch(name)]
    needle = text.lower()
    return [name for name, kind in zip(names, types) if needle in name.lower() or needle in kind.lower()]


class LayerPicker(ipywidgets.VBox):
    """A filter box, a stages / leaf / all toggle, a multi-select of ``name · type · shape`` and a count.

    ``value`` is the selected layer names in model order (settable); ``listed`` what the list shows
    now. ``table`` is the :func:`workbench.layer_table` it lists. ``value`` is a traitlet: observe it
    to hear of every change of the selection.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from workbench import layer_table
        >>> net = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 2))
        >>> picker = LayerPicker(layer_table(net, torch.zeros(1, 4)), ["0", "1"], role="teacher")
        >>> picker.view.value, picker.listed
        ('stages', ('0', '1'))
        >>> picker.view.value = "all"
        >>> picker.filter.value = "0.*"       # what typing a glob does
        >>> picker.listed, picker.value       # the selection survives the filter
        (('0.0', '0.1'), ('0', '1'))
        >>> picker.select.options[0][0]
        '0.0 · Linear · 8'
    """

    value = traitlets.Any((), help="the selected layer names in model order, listed or not (any iterable of "
                               "names is taken, and stored as a tuple)")

    def __init__(self, table: pd.DataFrame, selected: Sequence[str], *, role: str, view: str | None = None,
                 rows: int = 10):
        self.table = table.reset_index(drop=True)
        self.role = role
        self._order = {name: index for index, name in enumerate(self.table["name"])}
        initial = self._checked(selected)
        self._updating = False
        stages = set(self.table.loc[self.table["stage"], "name"])
        if view is None:
            view = "stages" if set(initial) <= stages and stages else "all"
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")

        self.title = ipywidgets.HTML(f"<b>{html.escape(role)} layers</b>")
        self.filter = ipywidgets.Text(
            placeholder="filter: glob (layer*.0, **conv*) or text",
            continuous_update=True,
            layout=ipywidgets.Layout(width="100%", margin="2px 0"),  # a side margin would stick out
        )
        self.view = ipywidgets.ToggleButtons(
            options=VIEWS, value=view, tooltips=list(_VIEW_TOOLTIPS),
            style={"button_width": "64px"}, layout=ipywidgets.Layout(width="auto", max_width="100%"),
        )
        self.select = ipywidgets.SelectMultiple(
            options=[], rows=rows, layout=ipywidgets.Layout(width="100%", margin="2px 0")
        )
        self.count = ipywidgets.HTML()
        self.filter.observe(self._refresh, names="value")
        self.view.observe(self._refresh, names="value")
        self.select.observe(self._on_select, names="value")
        super().__init__(
            [self.title, self.filter, self.view, self.select, self.count],
            layout=ipywidgets.Layout(flex="1 1 280px", min_width="0", max_width="100%"),
        )
        self.add_class("kd-layer-picker")
        self.filter.add_class("kd-layer-filter")
        self.view.add_class("kd-layer-view")
        self.count.add_class("kd-layer-count")
        self.set_trait("value", initial)
        self._refresh()

    # ------------------------------------------------------------------ selection
    @traitlets.validate("value")
    def _validate_value(self, proposal: dict) -> tuple[str, ...]:
        return self._checked(proposal["value"])

    @traitlets.observe("value")
    def _value_changed(self, _change: dict) -> None:
        if hasattr(self, "select"):
            self._show_selection()

    @property
    def listed(self) -> tuple[str, ...]:
        """The names the list shows now (the view and the filter applied)."""
        return tuple(value for _label, value in self.select.options)

    def _checked(self, names: Iterable[str]) -> tuple[str, ...]:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [name for name in names if name not in self._order]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(self._order), n=5, cutoff=0.4)
            raise KeyError(f"the {self.role} model has no layer {unknown[0]!r}; closest names: {close}")
        return tuple(sorted(set(names), key=self._order.__getitem__))

    def _on_select(self, change: dict) -> None:
        if self._updating:
            return
        listed = set(self.listed)
        hidden = [name for name in self.value if name not in listed]
        self.value = (*hidden, *change["new"])

    def _refresh(self, _change: object = None) -> None:
        """List what the view and the filter keep; the selection stays as it was."""
        view = self.view.value
        rows = self.table
        if view == "stages":
            rows = rows[rows["stage"]]
        elif view == "leaf":
            rows = rows[rows["leaf"]]
        keep = set(filter_names(rows, self.filter.value))
        options = [
            (f"{row.name} · {row.type} · {format_shape(row.output_shape)}", row.name)
            for row in rows.itertuples(index=False)
            if row.name in keep
        ]
        self._updating = True
        try:
            self.select.options = options
        finally:
            self._updating = False
        self._show_selection()

    def _show_selection(self) -> None:
        listed = set(self.listed)
        self._updating = True
        try:
            self.select.value = tuple(name for name in self.value if name in listed)
        finally:
            self._updating = False
        self._show_count()

    def _show_count(self) -> None:
        listed = set(self.listed)
        hidden = sum(name not in listed for name in self.value)
        text = f"<b>{len(self.value)}</b> of {len(self.table)} selected · {len(listed)} listed"
        if hidden:
            text += f" · {hidden} selected not listed"
        self.count.value = text
