"""WindowTable: a keyboard table over a view the master pages for us; it holds one window of rows, never all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from ..format import count, one_line
from ..messages import WindowMoved

GUTTER = 2  # the mark column: "● " on marked rows
MIN_PAD = 20  # rows asked for beyond each edge of the screen, so short scrolls never wait for the master


@dataclass(frozen=True)
class Column:
    """One column: a label, a width (the minimum width when `flex`), numbers aligned right."""

    label: str
    width: int
    flex: bool = False
    right: bool = False


def fit(text: str, width: int, right: bool = False) -> str:
    """`text` in exactly `width` cells: cropped with an ellipsis, padded on the right (or left)."""
    text = one_line(text)
    size = cell_len(text)
    if size > width:
        return set_cell_size(text, width - 1) + "…" if width > 1 else set_cell_size(text, width)
    return " " * (width - size) + text if right else text + " " * (width - size)


class WindowTable(ScrollView, can_focus=True):
    """A table of `total` rows of which it holds only `rows`, starting at `start`: the screen plus a pad.

    The scrollbar spans the whole view; scrolling beyond the held window posts WindowMoved and the next
    snapshot brings the rows for it. The cursor is an absolute row index (it stays put as rows flow),
    marks are row keys (job ids), so they follow their job wherever it moves.
    """

    COLUMNS: ClassVar[tuple[Column, ...]] = ()
    TITLE: ClassVar[str] = ""
    EMPTY: ClassVar[str] = "nothing here"
    # Whether rows come from the master in windows (False: the table gets every row, and filters itself).
    PAGED: ClassVar[bool] = True

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "table--header", "table--cursor", "table--cursor-blurred", "table--marked", "table--placeholder",
        "cell--good", "cell--bad", "cell--warn", "cell--muted", "cell--running",
    }

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up,k", "cursor(-1)", "Up", show=False),
        Binding("down,j", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "edge(0)", "First", show=False),
        Binding("end", "edge(1)", "Last", show=False),
        Binding("space", "mark", "Mark"),
        Binding("escape", "clear", "Clear marks/filter", show=False),
    ]

    cursor: reactive[int] = reactive(0, init=False)
    """The selected row, as an index into the whole view (not into the held window)."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.total = 0
        self.start = 0
        self.rows: list[tuple[Any, ...]] = []
        self.now = 0.0
        self.loaded = False
        self.marks: set[Any] = set()
        self.match = ""
        self.invert = False
        self.asked: tuple[int, int] = (0, 0)  # the (offset, limit) we last asked the master for
        self._widths: list[int] = []
        self._laid_out = -1  # the width the columns were laid out for
        self._shown: dict[int, tuple[tuple[str, ...], tuple[str | None, ...]]] = {}

    # ---- what subclasses say about their rows ---------------------------------------------

    def cells(self, row: tuple[Any, ...], now: float) -> tuple[str, ...]:
        """The text of each column for `row`."""
        raise NotImplementedError

    def classes_of(self, row: tuple[Any, ...]) -> tuple[str | None, ...]:
        """A component class per column (colours), or None."""
        return (None,) * len(self.COLUMNS)

    def key_of(self, row: tuple[Any, ...]) -> Any:
        return row[0]

    # ---- data in ------------------------------------------------------------------------

    def show(self, offset: int, total: int, rows: list[tuple[Any, ...]], now: float) -> None:
        """Take a new window from the master; only the lines whose text changed are redrawn."""
        self.start, self.total, self.rows, self.now = offset, total, rows, now
        resized = self.virtual_size.height != total + 1
        if resized:
            self.virtual_size = Size(self.scrollable_content_region.width, total + 1)
        if not self.loaded:
            self.loaded = True
            self.refresh()
        if self.cursor >= total:
            self.cursor = max(0, total - 1)
        self._redraw_changed()
        self._update_title()
        self._check_window()

    def tick(self, now: float) -> None:
        """Nothing changed on the master: only time moved (elapsed columns)."""
        self.now = now
        self._redraw_changed()

    def show_all(self, rows: list[tuple[Any, ...]], now: float) -> None:
        """For unpaged tables: every row, filtered here."""
        if self.match:
            rows = [r for r in rows if (self.match in " ".join(self.cells(r, now)).lower()) != self.invert]
        self.show(0, len(rows), rows, now)

    def _redraw_changed(self) -> None:
        first, visible = self._visible()
        shown: dict[int, tuple[tuple[str, ...], tuple[str | None, ...]]] = {}
        for index in range(first, min(first + visible, self.total)):
            row = self.row_at(index)
            if row is None:
                continue
            drawn = (self.cells(row, self.now), self.classes_of(row))
            shown[index] = drawn
            if self._shown.get(index) != drawn:
                self.refresh_line(index + 1)  # +1: line 0 is the header
        for index in self._shown.keys() - shown.keys():
            self.refresh_line(index + 1)
        self._shown = shown

    # ---- what the master should send ------------------------------------------------------

    def _visible(self) -> tuple[int, int]:
        """(first row index on screen, how many rows fit)."""
        return int(self.scroll_offset.y), max(1, self.size.height - 1)

    def window(self) -> dict[str, Any]:
        """The view to ask the master for: the screen, a pad either side, and the filter."""
        first, visible = self._visible()
        pad = max(visible, MIN_PAD)
        offset = max(0, first - pad)
        limit = visible + 2 * pad
        self.asked = (offset, limit)
        return {"offset": offset, "limit": limit, "match": self.match, "invert": self.invert}

    def _check_window(self) -> None:
        """Post WindowMoved when the screen has come near the edge of the window we asked for."""
        if not self.PAGED:
            return
        first, visible = self._visible()
        offset, limit = self.asked
        margin = max(visible, MIN_PAD) // 2
        low = max(0, first - margin)
        high = min(max(self.total, first + visible), first + visible + margin)
        if low < offset or high > offset + limit or limit < visible + 2 * margin:
            self.post_message(WindowMoved())

    def set_filter(self, match: str, invert: bool) -> None:
        if (match, invert) == (self.match, self.invert):
            return
        self.match, self.invert = match, invert
        self.cursor = 0
        self.scroll_to(y=0, animate=False)
        self._update_title()
        self.post_message(WindowMoved())

    # ---- what the operator points at ------------------------------------------------------

    def row_at(self, index: int) -> tuple[Any, ...] | None:
        at = index - self.start
        return self.rows[at] if 0 <= at < len(self.rows) else None

    def selected(self) -> tuple[Any, ...] | None:
        return self.row_at(self.cursor) if self.total else None

    def targets(self) -> list[Any]:
        """The marked rows' keys, else the selected row's key, else nothing."""
        if self.marks:
            return sorted(self.marks)
        row = self.selected()
        return [self.key_of(row)] if row is not None else []

    def clear_marks(self) -> None:
        if self.marks:
            self.marks.clear()
            self.refresh()
            self._update_title()

    # ---- keys and mouse -------------------------------------------------------------------

    def validate_cursor(self, value: int) -> int:
        return max(0, min(value, self.total - 1)) if self.total else 0

    def watch_cursor(self, old: int, new: int) -> None:
        self.refresh_line(old + 1)
        self.refresh_line(new + 1)
        first, visible = self._visible()
        if new < first:
            self.scroll_to(y=new, animate=False)
        elif new >= first + visible:
            self.scroll_to(y=new - visible + 1, animate=False)

    def watch_scroll_y(self, old: float, new: float) -> None:
        super().watch_scroll_y(old, new)
        if round(old) != round(new):
            self._check_window()

    def action_cursor(self, delta: int) -> None:
        self.cursor += delta

    def action_page(self, direction: int) -> None:
        self.cursor += direction * self._visible()[1]

    def action_edge(self, end: int) -> None:
        self.cursor = self.total - 1 if end else 0

    def action_mark(self) -> None:
        row = self.selected()
        if row is None:
            return
        key = self.key_of(row)
        self.marks.symmetric_difference_update({key})
        self.refresh_line(self.cursor + 1)
        self._update_title()
        self.cursor += 1

    def action_clear(self) -> None:
        if self.marks:
            self.clear_marks()
        elif self.match:
            self.set_filter("", False)

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is not None and offset.y >= 1:
            self.cursor = int(self.scroll_offset.y) + offset.y - 1

    def on_resize(self, event: events.Resize) -> None:
        self._layout_columns()
        self.virtual_size = Size(self.scrollable_content_region.width, self.total + 1)
        self._check_window()

    def on_focus(self) -> None:
        self.refresh_line(self.cursor + 1)

    def on_blur(self) -> None:
        self.refresh_line(self.cursor + 1)

    # ---- drawing --------------------------------------------------------------------------

    def _update_title(self) -> None:
        title = f"{self.TITLE} [b]{count(self.total)}[/b]" if self.loaded else self.TITLE
        notes = []
        if self.match:
            notes.append(f"filter {'!' if self.invert else ''}{self.match}")
        if self.marks:
            notes.append(f"{len(self.marks)} marked")
        self.border_title = title
        self.border_subtitle = " · ".join(notes).replace("[", r"\[")

    def _layout_columns(self) -> None:
        self._laid_out = self.scrollable_content_region.width
        width = self._laid_out - GUTTER
        fixed = sum(c.width for c in self.COLUMNS if not c.flex) + len(self.COLUMNS) - 1
        self._widths = [max(c.width, width - fixed) if c.flex else c.width for c in self.COLUMNS]

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        base = self.rich_style
        if width != self._laid_out:  # resized, or a scrollbar came or went
            self._layout_columns()
        if y == 0:
            header = self.get_component_rich_style("table--header")
            text = " " * GUTTER + " ".join(fit(c.label, w, c.right) for c, w in zip(self.COLUMNS, self._widths))
            return Strip([Segment(text, header)]).adjust_cell_length(width, header)
        index = int(self.scroll_offset.y) + y - 1
        if index >= self.total:
            if index == 0:
                message = "loading…" if not self.loaded else self.EMPTY
                muted = self.get_component_rich_style("cell--muted")
                return Strip([Segment(" " * GUTTER + message, muted)]).adjust_cell_length(width, base)
            return Strip.blank(width, base)
        row = self.row_at(index)
        if row is None:
            pending = self.get_component_rich_style("table--placeholder")
            return Strip([Segment(" " * GUTTER + "…", pending)]).adjust_cell_length(width, base)
        return self._render_row(row, index == self.cursor, width, base)

    def _render_row(self, row: tuple[Any, ...], is_cursor: bool, width: int, base: Style) -> Strip:
        marked = self.key_of(row) in self.marks
        line_style = base
        if marked:
            line_style += self.get_component_rich_style("table--marked")
        if is_cursor:
            line_style += self.get_component_rich_style("table--cursor" if self.has_focus else "table--cursor-blurred")
        segments = [Segment("● " if marked else " " * GUTTER, line_style)]
        cells = self.cells(row, self.now)
        for i, (column, text, klass, cell_width) in enumerate(
                zip(self.COLUMNS, cells, self.classes_of(row), self._widths)):
            style = line_style
            if klass is not None:
                style = line_style + self.get_component_rich_style(klass, partial=True)
                if is_cursor:  # the cursor's colours win over the cell's, so the bar reads as one
                    style += self.get_component_rich_style(
                        "table--cursor" if self.has_focus else "table--cursor-blurred", partial=True)
            if i:
                segments.append(Segment(" ", line_style))
            segments.append(Segment(fit(text, cell_width, column.right), style))
        return Strip(segments).adjust_cell_length(width, line_style)

