"""StudentSearch: a DisWOT student search as a widget — a leaderboard that fills in as the candidates are
scored, sortable by each term, beside the score-vs-parameters scatter.

The widget runs :func:`workbench.probes.diswot.search` and shows what it hands back: each candidate's row
(``on_result(row, index)``) as it is scored, then the :class:`~workbench.probes.student_search.SearchResult`.
It holds no math of its own: the leaderboard is those rows (at the end the result's own ``to_frame()``),
ordered by the chosen column; the scatter is the scored rows drawn as ``SearchResult.figure`` draws them.
Run scores in a background thread (:class:`~widgets.cancellable.BackgroundJob`: the kernel stays free) and
Stop ends the search after the candidate being scored; :meth:`StudentSearch.run` does the same in the calling
thread and returns the result, for scripts and tests. An ipywidgets ``Output`` cannot capture another
thread's prints, so nothing here prints: the worker sets widget values.
"""
from __future__ import annotations

import copy
import html
import inspect
import math
import threading
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import ipywidgets
import pandas as pd
import plotly.graph_objects as go
from torch import nn

from widgets.cancellable import BackgroundJob
from workbench.probes import diswot
from workbench.probes.student_search import SearchResult, SearchSpace, parse_candidates

__all__ = ["StudentSearch", "TERMS", "HIGHER_IS_BETTER"]

# the leaderboard's sortable columns, in the sort-by menu's order
TERMS = ("score", "relation", "semantic_gradcam", "semantic_released", "nwot", "snip", "grad_norm", "params",
         "flops")
# a column's natural order: scores and zero-cost proxies rank high first; DisWOT's two terms are distances
# (lower is closer to the teacher), parameters and FLOPs cost (lower first)
HIGHER_IS_BETTER = {"score": True, "relation": False, "semantic_gradcam": False, "semantic_released": False,
                    "nwot": True, "snip": True, "grad_norm": True, "params": False, "flops": False}
_OWNED = ("on_result", "progress")  # the widget's own hook and progress bar
_SEARCH_ARGUMENTS = tuple(name for name in inspect.signature(diswot.search).parameters
                          if name not in ("teacher", "candidates", "data", *_OWNED))
_ORDERS = (("best first", "natural"), ("reversed", "reversed"))
SECONDS = "seconds"


class StudentSearch(ipywidgets.VBox):
    """A training-free student search (DisWOT) that fills a leaderboard in as the candidates are scored.

    ``StudentSearch(teacher, candidates, data, **search_kwargs)``: the arguments of
    :func:`workbench.probes.diswot.search` (``candidates``: a list — names, dicts, ``Candidate``\\ s — or a
    ``SearchSpace``; ``budget``, ``constraint``, ``semantic``, ``baselines``, ``batch_size``, ``seed``,
    ``device``, ...); ``on_result`` and ``progress`` are the widget's own.

    Controls: ``run_button`` (scores in a background thread: :meth:`start`), ``stop_button`` (ends the search
    after the candidate under way: :meth:`stop`), ``sort_by`` (``Dropdown`` over :data:`TERMS` present in the
    search) and ``order`` (``"natural"``: each column's better end first — :data:`HIGHER_IS_BETTER` — or
    ``"reversed"``). Output: ``progress`` (``IntProgress``, candidates scored of the total) and
    ``progress_text``, ``status`` (``HTML``), ``leaderboard`` (``HTML`` table: rank, candidate, family, params,
    FLOPs, every score, seconds), ``scatter`` (``go.FigureWidget``: the sorted-by score — or DisWOT's score
    when sorting by size — against parameters, log x, one trace per family) and ``details`` (the traceback
    after an error). ``rows`` holds each scored candidate's row in evaluation order, ``frame()`` the
    leaderboard as a table; ``result`` is the :class:`~workbench.probes.student_search.SearchResult` once the
    search has ended (``None`` while it runs or after Stop), ``error`` the last failure.

    Example:
        >>> import torch
        >>> from workbench import models
        >>> from widgets import StudentSearch
        >>> _ = torch.manual_seed(0)
        >>> data = (torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,)))
        >>> teacher = models.create("cnn", widths=(16, 32), img_size=16)
        >>> candidates = [{"name": "cnn", "kwargs": {"widths": [8]}}, {"name": "cnn", "kwargs": {"widths": [8, 16]}}]
        >>> search = StudentSearch(teacher, candidates, data, batch_size=16, device="cpu")
        >>> result = search.run()           # what the Run button does, in this thread
        >>> len(search.rows), search.progress.value, search.progress.max
        (2, 2, 2)
        >>> search.sort_by.value = "params"  # smallest first
        >>> search.frame()["params"].tolist() == sorted(result.params)
        True
    """

    def __init__(self, teacher: nn.Module, candidates: Any, data: Any, *, title: str = "DisWOT student search",
                 height: int = 360, **search_kwargs: Any) -> None:
        owned = sorted(set(search_kwargs) & set(_OWNED))
        if owned:
            raise TypeError(f"StudentSearch drives {owned} itself (the leaderboard is its on_result, the bar its "
                            "progress); leave them out and read .rows / .result")
        unknown = sorted(set(search_kwargs) - set(_SEARCH_ARGUMENTS))
        if unknown:
            raise TypeError(f"StudentSearch got unknown diswot.search arguments {unknown}; valid ones are "
                            f"{sorted(_SEARCH_ARGUMENTS)}")
        self.teacher, self.data, self.search_kwargs = teacher, data, dict(search_kwargs)
        self.candidates = candidates if isinstance(candidates, SearchSpace) else parse_candidates(candidates)
        self.total = _total(self.candidates, search_kwargs.get("budget"))
        self.rows: list[dict[str, Any]] = []
        self.result: SearchResult | None = None
        self.error: BaseException | None = None
        self._job: BackgroundJob | None = None  # the search under way
        self._last_job: BackgroundJob | None = None
        self._lock = threading.Lock()  # rows arrive in the worker; sorting happens in the kernel's thread
        self._drawing = threading.Lock()  # one redraw at a time (a row arriving while the user sorts)

        baselines = search_kwargs.get("baselines", inspect.signature(diswot.search).parameters["baselines"].default)
        self.terms = [term for term in TERMS if term in ("score", "relation", "semantic_gradcam",
                                                         "semantic_released", "params", "flops")
                      or term in baselines]
        self.title = ipywidgets.HTML(value=f"<b>{html.escape(title)}</b>")
        self.run_button = ipywidgets.Button(description="Run", button_style="primary", icon="play",
                                            tooltip="score every candidate (in the background)",
                                            layout=ipywidgets.Layout(width="auto", flex="0 0 auto"))
        self.stop_button = ipywidgets.Button(description="Stop", icon="stop", disabled=True,
                                             tooltip="stop after the candidate being scored",
                                             layout=ipywidgets.Layout(width="auto", flex="0 0 auto"))
        self.sort_by = ipywidgets.Dropdown(options=self.terms, value="score", description="sort by",
                                           layout=ipywidgets.Layout(width="auto", max_width="100%"))
        self.order = ipywidgets.ToggleButtons(options=_ORDERS, value="natural",
                                              tooltips=["each column's better end first", "the other way round"],
                                              style={"button_width": "88px"})
        self.progress = ipywidgets.IntProgress(value=0, min=0, max=max(self.total, 1), bar_style="info",
                                               layout=ipywidgets.Layout(flex="1 1 auto", width="auto"))
        self.progress_text = ipywidgets.Label(value=f"0/{self.total} scored",
                                              layout=ipywidgets.Layout(flex="0 1 auto"))
        self.status = ipywidgets.HTML(value=f"{self.total} candidates to score: press <b>Run</b>.",
                                      layout=ipywidgets.Layout(max_width="100%"))
        self.leaderboard = ipywidgets.HTML(layout=ipywidgets.Layout(width="100%", max_width="100%", overflow="auto",
                                                                    max_height=f"{height + 80}px"))
        self.details = ipywidgets.Output(layout=ipywidgets.Layout(max_width="100%", overflow="auto"))
        self.scatter = go.FigureWidget()
        self.scatter.update_layout(height=height, autosize=True, margin={"l": 50, "r": 20, "t": 50, "b": 40},
                                   title="score vs parameters: nothing scored yet",
                                   xaxis={"title": {"text": "parameters"}, "type": "log"})
        self.scatter._config = {**self.scatter._config, "responsive": True}  # follows the window's width

        self.run_button.on_click(lambda _button: self.start())
        self.stop_button.on_click(lambda _button: self.stop())
        self.sort_by.observe(self._on_sort_by, names="value")
        self.order.observe(lambda _change: self.refresh(), names="value")
        full_width = ipywidgets.Layout(width="100%", max_width="100%", flex_flow="row wrap", align_items="center",
                                       grid_gap="8px")
        controls = ipywidgets.HBox([self.run_button, self.stop_button, self.sort_by, self.order], layout=full_width)
        progress_row = ipywidgets.HBox([self.progress, self.progress_text],
                                       layout=ipywidgets.Layout(width="100%", max_width="100%"))
        scatter_box = ipywidgets.VBox([self.scatter], layout=ipywidgets.Layout(width="100%", max_width="100%",
                                                                              overflow="hidden"))
        super().__init__([self.title, controls, progress_row, self.status, self.details, self.leaderboard,
                          scatter_box],
                         layout=ipywidgets.Layout(width="100%", max_width="100%"))
        self.add_class("kd-student-search")
        for widget, name in ((self.leaderboard, "kd-leaderboard"), (self.status, "kd-search-status"),
                             (self.progress_text, "kd-search-progress"), (self.scatter, "kd-search-scatter")):
            widget.add_class(name)  # for the browser test and for styling
        self.refresh()

    # ------------------------------------------------------------------ running
    @property
    def running(self) -> bool:
        """Whether a search is under way."""
        return self._job is not None

    def run(self) -> SearchResult:
        """Score every candidate in this thread (what Run does in the background); returns the result.

        A failure is shown in ``status`` (its traceback in ``details``), kept in ``error`` and re-raised."""
        job = self._begin()
        self._work(job)
        return job.wait()

    def start(self) -> threading.Thread | None:
        """Start the search in a background thread (what the Run button does) and return the thread; ``None``
        (and a note in ``status``) while one is already under way."""
        try:
            job = self._begin()
        except RuntimeError:
            return None
        return job.start(self._work, job, name="StudentSearch scoring")

    def wait(self, timeout: float | None = None) -> SearchResult | None:
        """Wait for the background search; its result (``None`` after Stop), or re-raise its error.
        ``TimeoutError`` if it is still running after ``timeout`` seconds."""
        return self.result if self._last_job is None else self._last_job.wait(timeout)

    def stop(self) -> bool:
        """Ask the search under way to end after the candidate being scored; ``False`` when none runs."""
        job = self._job
        if job is None:
            return False
        job.cancel()
        self.stop_button.disabled = True
        self._set_status(f"Stopping after the candidate being scored ({len(self.rows)}/{self.total} scored)…")
        return True

    def _begin(self) -> BackgroundJob:
        if self._job is not None:
            self._set_status("A search is already running: Stop it or wait for it.")
            raise RuntimeError("a search is already running: wait() for it or stop() it first")
        job = BackgroundJob(total_steps=self.total)
        self._job = self._last_job = job
        with self._lock:
            self.rows, self.result, self.error = [], None, None
        self.run_button.disabled, self.stop_button.disabled = True, False
        self.details.outputs = ()
        self.progress.max, self.progress.value, self.progress.bar_style = max(self.total, 1), 0, "info"
        self._set_status(f"Scoring {self.total} candidates against the teacher…")
        self.refresh()
        return job

    def _work(self, job: BackgroundJob) -> None:
        """The search, in whichever thread runs it; ends by showing what happened."""
        job.run(lambda job: diswot.search(self.teacher, self.candidates, self.data, **self.search_kwargs,
                                          on_result=lambda row, index: self._on_result(job, row, index),
                                          progress=False))
        self._job = None
        self.run_button.disabled, self.stop_button.disabled = False, True
        self._finish(job)

    def _on_result(self, job: BackgroundJob, row: Mapping[str, Any], index: int) -> None:
        """One candidate scored: a leaderboard row, a scatter point, the bar; then Stop's chance to end it."""
        with self._lock:
            self.rows.append(dict(row))
        scored = len(self.rows)
        self.progress.max = max(self.progress.max, scored)
        self.progress.value = scored
        self.progress_text.value = f"{scored}/{self.total} scored · {job.seconds:.1f} s"
        self.refresh()
        job.step(scored)  # raises Cancelled once Stop was pressed

    def _finish(self, job: BackgroundJob) -> None:
        scored = len(self.rows)
        if job.cancelled:
            self.progress.bar_style = "warning"
            self._set_status(f"Stopped after {scored} of {self.total} candidates ({job.seconds:.1f} s); the "
                             "leaderboard keeps them (.rows); no SearchResult.")
            return
        if job.error is not None:
            self.error = job.error
            self.progress.bar_style = "danger"
            self._set_status(f"{type(job.error).__name__}: {job.error}", error=True)
            self.details.outputs = ({"output_type": "stream", "name": "stderr",
                                     "text": "".join(traceback.format_exception(job.error))},)
            return
        result: SearchResult = job.result
        self.result = result
        self.progress.bar_style = "success"
        self.progress.max = self.progress.value = max(len(result.candidates), 1)
        self.progress_text.value = f"{len(result.candidates)}/{self.total} scored · {job.seconds:.1f} s"
        skipped = f", {result.skipped} refused by the constraint" if result.skipped else ""
        self._set_status(f"Done: {len(result.candidates)} candidates scored in {job.seconds:.1f} s{skipped}; best "
                         f"by DisWOT's score: <b>{html.escape(result.best.label)}</b>.")
        self.refresh()

    # ------------------------------------------------------------------ showing
    def frame(self) -> pd.DataFrame:
        """The leaderboard as a table, in its shown order: the result's ``to_frame()`` once the search has
        ended, the rows so far while it runs; ordered by ``sort_by`` (better end first, or ``reversed``),
        NaN last, ties in evaluation order."""
        with self._lock:
            frame = self.result.to_frame() if self.result is not None else pd.DataFrame(self.rows)
        if frame.empty:
            return frame
        term = self.sort_by.value
        ascending = HIGHER_IS_BETTER[term] == (self.order.value == "reversed")
        if self.result is not None:  # to_frame() is sorted by score: back to evaluation order for stable ties
            frame = frame.sort_index()
        frame = frame.sort_values(term, ascending=ascending, na_position="last", kind="stable")
        return frame.reset_index(drop=True)

    def refresh(self) -> None:
        """Redraw the leaderboard and the scatter from the rows (or the result)."""
        with self._drawing:
            self.leaderboard.value = leaderboard_html(self.frame(), self.sort_by.value, self.order.value)
            term = self.sort_by.value if self.sort_by.value not in ("params", "flops") else "score"
            _show_figure(self.scatter, self._figure(term))

    def _figure(self, term: str) -> go.Figure:
        with self._lock:
            result = self.result if self.result is not None else _partial_result(self.rows, self.search_kwargs)
        if result is None:
            figure = go.Figure()
            figure.update_layout(title=f"{term} vs parameters: nothing scored yet")
            return figure
        return result.figure(score=term)

    def _on_sort_by(self, _change: Any) -> None:
        if self.order.value == "natural":
            self.refresh()
        else:
            self.order.value = "natural"  # a new column starts from its better end (the observer redraws)

    def _set_status(self, text: str, *, error: bool = False) -> None:
        if error:
            text = f'<span style="color:#b00020"><b>Error</b>: {html.escape(text)}</span>'
        self.status.value = text


def leaderboard_html(frame: pd.DataFrame, term: str, order: str = "natural") -> str:
    """The leaderboard as an HTML table: a rank, the candidate, its family, size, every score column
    present, seconds; the sorted-by column's header marked (▼ high first, ▲ low first), NaN as "—".

    Example:
        >>> frame = pd.DataFrame({"label": ["cnn(widths=(8,))"], "family": ["cnn"], "params": [1234],
        ...                       "flops": [56789], "score": [-1.5], "relation": [0.5], "seconds": [0.25]})
        >>> text = leaderboard_html(frame, "score")
        >>> text.count("<tr"), "<th class=\\"kd-sorted\\">score ▼</th>" in text, "1,234" in text
        (2, True, True)
    """
    if frame.empty:
        return '<p class="kd-leaderboard-empty">No candidate scored yet.</p>'
    columns = [column for column in ("label", "family", "params", "flops", *TERMS, SECONDS)
               if column in frame.columns]
    columns = list(dict.fromkeys(columns))  # params and flops once, beside the candidate
    descending = HIGHER_IS_BETTER[term] == (order == "natural")

    def header(column: str) -> str:
        name = {"label": "candidate", "semantic_gradcam": "semantic (Grad-CAM)",
                "semantic_released": "semantic (released)", "grad_norm": "grad-norm", "seconds": "s"}.get(column,
                                                                                                        column)
        if column == term:
            return f'<th class="kd-sorted">{html.escape(name)} {"▼" if descending else "▲"}</th>'
        return f"<th>{html.escape(name)}</th>"

    lines = ['<table class="kd-leaderboard-table" style="border-collapse:collapse;font-size:12px;'
             'font-variant-numeric:tabular-nums">', "<thead><tr><th>#</th>"
             + "".join(header(column) for column in columns) + "</tr></thead><tbody>"]
    for rank, row in enumerate(frame[columns].itertuples(index=False), start=1):
        cells = "".join(f'<td style="padding:1px 6px;white-space:nowrap;'
                        f'text-align:{"left" if column in ("label", "family") else "right"}'
                        f'{";font-weight:bold" if column == term else ""}">{_cell(column, value)}</td>'
                        for column, value in zip(columns, row))
        lines.append(f'<tr class="kd-leaderboard-row"><td>{rank}</td>{cells}</tr>')
    lines.append("</tbody></table>")
    return "".join(lines)


def _cell(column: str, value: Any) -> str:
    if column in ("label", "family"):
        return html.escape(str(value))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if column in ("params", "flops"):
        return f"{int(value):,}"
    if column == SECONDS:
        return f"{value:.2f}"
    return f"{value:.4g}"


def _show_figure(widget: go.FigureWidget, fresh: go.Figure) -> None:
    """Give ``widget`` the traces and layout of ``fresh`` in place, and sync its whole state (as
    ``widgets.training_monitor._set_traces`` does: a view that renders after the change starts from it)."""
    with widget.batch_update():
        widget.data = ()
        widget.add_traces(list(fresh.data))
        layout = fresh.layout.to_plotly_json()
        layout.pop("width", None)  # the figure keeps its container's width
        layout.pop("template", None)
        widget.update_layout(**layout)
    widget._widget_layout = copy.deepcopy(widget._layout_obj._props)
    widget._widget_data = copy.deepcopy(widget._data)


def _total(candidates: Sequence[Any] | SearchSpace, budget: int | None) -> int:
    """How many candidates the search scores: all of them, or ``budget`` (a constraint may refuse some)."""
    return len(candidates) if budget is None else min(budget, len(candidates))


def _partial_result(rows: Sequence[Mapping[str, Any]], search_kwargs: Mapping[str, Any]) -> SearchResult | None:
    """The rows scored so far as a SearchResult (to draw them exactly as the finished result draws)."""
    if not rows:
        return None
    scores = {name: [row[name] for row in rows] for name in rows[0] if name in TERMS and name not in ("params", "flops")}
    return SearchResult(candidates=[row["candidate"] for row in rows], params=[row["params"] for row in rows],
                        flops=[row["flops"] for row in rows], scores=scores, seconds=[row[SECONDS] for row in rows],
                        skipped=0, settings=dict(search_kwargs))
