"""WindowTable: a keyboard table over a view the master pages for us; it holds one window of rows, never all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Region, Size
from textual.reactive import reactive
from textual.cache import LRUCache
from textual.strip import Strip
from textual.widget import Widget

from ..format import count, one_line
from ..messages import WindowMoved

GUTTER = 2  # the mark column: "● " on marked rows
SCROLLBAR = 1  # the last column: where the screen is in the whole view
MIN_PAD = 20  # rows asked for beyond each edge of the screen, so short scrolls never wait for the master
WHEEL_ROWS = 3

RowT = TypeVar("RowT", bound=tuple[Any, ...])  # a table's named row type (a NamedTuple)


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


class WindowTable(Widget, Generic[RowT], can_focus=True):
    """A table of `total` rows of which it holds only `rows`, starting at `start`: the screen plus a pad.

    It scrolls itself (`top` is the first row on screen) and draws its own scrollbar over the whole view,
    so a new total from the master is a repaint, never a layout of the screen. Scrolling beyond the held
    window posts WindowMoved and the next snapshot brings the rows for it. Rows are the subclass's named
    type (master/rows.py's, or WorkerRow), named once as they arrive; marks are row keys (job ids).

    The cursor is on a row's key, not a row number: once the operator moves it, it is `pinned` to the job
    under it, and as jobs flow it follows that job (the screen scrolls with it, so the job stays on the
    same line; the master places the window around it, `anchor`), so enter, c and r act on the job the
    operator sees under the cursor. Untouched, after `home` and after a new filter it is at the head (row
    0, whichever job is newest or next). A pinned job that leaves the view leaves the cursor on the row
    that took its place.
    """

    COLUMNS: ClassVar[tuple[Column, ...]] = ()
    TITLE: ClassVar[str] = ""
    EMPTY: ClassVar[str] = "nothing here"
    # Whether rows come from the master in windows (False: the table gets every row, and filters itself).
    PAGED: ClassVar[bool] = True
    # Whether the height follows the rows (CSS height: auto): then a new total needs a layout.
    AUTO_HEIGHT: ClassVar[bool] = False

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "table--header", "table--cursor", "table--cursor-blurred", "table--marked", "table--placeholder",
        "table--scrollbar", "table--scrollbar-thumb",
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

    cursor: reactive[int] = reactive(0, init=False, repaint=False)
    """The selected row, as an index into the whole view (not into the held window)."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.total = 0
        self.start = 0
        self.rows: list[RowT] = []
        self.now = 0.0
        self.top = 0
        self.loaded = False
        self.marks: set[Any] = set()
        self.match = ""
        self.invert = False
        self.asked: tuple[int, int] = (0, 0)  # the (offset, limit) we last asked the master for
        self.pinned: Any = None  # the key of the row the operator put the cursor on; None: at the head
        self._pin_when_loaded = False  # the cursor was moved onto a row not fetched yet: pin it when it comes
        self._widths: list[int] = []
        self._laid_out = -1  # the width the columns were laid out for
        self._shown: dict[int, tuple[tuple[str, ...], tuple[str | None, ...]]] = {}
        self._styles: dict[str, Style] = {}
        # Rendered rows by what they show: rows slide down the screen as jobs flow, and a focus change
        # repaints every line, but a row's text and state rarely change. Cleared when styles may have.
        self._line_cache: LRUCache[tuple[Any, ...], Strip] = LRUCache(1024)

    # ---- what subclasses say about their rows ---------------------------------------------

    def cells(self, row: RowT, now: float) -> tuple[str, ...]:
        """The text of each column for `row`."""
        raise NotImplementedError

    def classes_of(self, row: RowT) -> tuple[str | None, ...]:
        """A component class per column (colours), or None."""
        return (None,) * len(self.COLUMNS)

    def key_of(self, row: RowT) -> Any:
        """What marks remember a row by (its job id, its agent's name)."""
        raise NotImplementedError

    def named(self, rows: list[Any]) -> list[RowT]:
        """Rows as the master sends them (plain tuples), named: the paged tables' only way in."""
        raise NotImplementedError

    # ---- data in ------------------------------------------------------------------------

    def show(self, offset: int, total: int, rows: list[RowT], now: float, anchor: Any = None) -> None:
        """Take a new window from the master (asked with `anchor`, see window()); the cursor follows its
        pinned job; only the lines whose text changed are redrawn."""
        grew = total != self.total
        self.start, self.total, self.rows, self.now = offset, total, rows, now
        if not self.loaded or (grew and self.AUTO_HEIGHT):
            self.loaded = True
            self.refresh(layout=self.AUTO_HEIGHT)
        if self.cursor >= total:
            self.cursor = max(0, total - 1)
        self._follow(anchor)
        self._set_top(self.top)  # a shorter view may end above the screen's bottom
        self._redraw_changed(scrollbar=grew)
        self._update_title()
        self._check_window()

    def tick(self, now: float) -> None:
        """Nothing changed on the master: only time moved (elapsed columns)."""
        self.now = now
        self._redraw_changed()

    def show_all(self, rows: list[RowT], now: float) -> None:
        """For unpaged tables: every row, filtered here."""
        if self.match:
            rows = [r for r in rows if (self.match in " ".join(self.cells(r, now)).lower()) != self.invert]
        self.show(0, len(rows), rows, now, anchor=self.pinned)  # every row is here: a pinned one not here has gone

    def _follow(self, anchor: Any) -> None:
        """Move the cursor (and the screen with it) to where its pinned job now is, in the rows just taken."""
        if self.pinned is None:
            if self._pin_when_loaded:
                self._pin()
            return
        key_of = self.key_of
        for i, row in enumerate(self.rows):
            if key_of(row) == self.pinned:
                place = self.start + i
                if place != self.cursor:
                    line = self.cursor - self.top
                    self._set_top(place - line)
                    self.cursor = place
                return
        if anchor == self.pinned:
            # Asked around it and not there: it left the view (it finished, it no longer matches the
            # filter). The cursor stays on the line, on the job now there. (A window asked before the
            # pin may simply not reach it: the next look, anchored, will.)
            self._pin()

    def _pin(self) -> None:
        """Pin the cursor to the key of the row under it (or, not fetched yet, to the row once it comes)."""
        row = self.row_at(self.cursor) if self.total else None
        pinned = self.key_of(row) if row is not None else None
        self._pin_when_loaded = row is None and self.total > 0
        if pinned != self.pinned:
            self.pinned = pinned
            if self.PAGED:
                self.post_message(WindowMoved())  # the next look is anchored to it (at once: the flow goes on)

    def _redraw_changed(self, scrollbar: bool = False) -> None:
        first, visible = self._visible()
        shown: dict[int, tuple[tuple[str, ...], tuple[str | None, ...]]] = {}
        width = self.size.width
        for index in range(first, min(first + visible, self.total)):
            row = self.row_at(index)
            if row is None:
                continue
            drawn = (self.cells(row, self.now), self.classes_of(row))
            shown[index] = drawn
            if self._shown.get(index) != drawn:
                self.refresh(Region(0, index - first + 1, width, 1))
        for index in self._shown.keys() - shown.keys():
            self.refresh(Region(0, index - first + 1, width, 1))
        if scrollbar:
            self.refresh(Region(width - SCROLLBAR, 1, SCROLLBAR, visible))
        self._shown = shown

    # ---- scrolling ----------------------------------------------------------------------

    def _visible(self) -> tuple[int, int]:
        """(first row index on screen, how many rows fit)."""
        return self.top, max(1, self.size.height - 1)

    def _set_top(self, top: int) -> None:
        visible = self._visible()[1]
        top = max(0, min(top, self.total - visible))
        if top != self.top:
            self.top = top
            self._shown = {}
            self.refresh()
            self._check_window()

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return max(2, self.total + 1)  # used when the CSS height is auto (Workers)

    # ---- what the master should send ------------------------------------------------------

    def window(self) -> dict[str, Any]:
        """The view to ask the master for: the screen, a pad either side, and the filter."""
        first, visible = self._visible()
        pad = max(visible, MIN_PAD)
        offset = max(0, first - pad)
        limit = visible + 2 * pad
        self.asked = (offset, limit)
        view = {"offset": offset, "limit": limit, "match": self.match, "invert": self.invert}
        at = self.cursor - offset
        if self.pinned is not None and 0 <= at < limit:
            view.update(anchor=self.pinned, at=at)  # the master places the window around the pinned job
        return view

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
        self.pinned, self._pin_when_loaded = None, False  # a new view: back at its head
        self._set_top(0)
        self._update_title()
        self.post_message(WindowMoved())

    # ---- what the operator points at ------------------------------------------------------

    def row_at(self, index: int) -> RowT | None:
        at = index - self.start
        return self.rows[at] if 0 <= at < len(self.rows) else None

    def selected(self) -> RowT | None:
        """The row under the cursor; None while that is not the pinned job (it is on its way, in the
        next look's window): an action never lands on a job the operator did not pick."""
        row = self.row_at(self.cursor) if self.total else None
        if row is not None and self.pinned is not None and self.key_of(row) != self.pinned:
            return None
        return row

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
        first, visible = self._visible()
        if new < first:
            self._set_top(new)
        elif new >= first + visible:
            self._set_top(new - visible + 1)
        else:
            width = self.size.width
            self.refresh(Region(0, old - first + 1, width, 1), Region(0, new - first + 1, width, 1))

    def action_cursor(self, delta: int) -> None:
        self.cursor += delta
        self._pin()

    def action_page(self, direction: int) -> None:
        self.cursor += direction * self._visible()[1]
        self._pin()

    def action_edge(self, end: int) -> None:
        self.cursor = self.total - 1 if end else 0
        if end:
            self._pin()
        else:  # home: the head again, following whichever job is first
            self.pinned, self._pin_when_loaded = None, False

    def action_mark(self) -> None:
        row = self.selected()
        if row is None:
            return
        self.marks.symmetric_difference_update({self.key_of(row)})
        self.refresh(Region(0, self.cursor - self.top + 1, self.size.width, 1))
        self._update_title()
        self.cursor += 1
        self._pin()

    def action_clear(self) -> None:
        if self.marks:
            self.clear_marks()
        elif self.match:
            self.set_filter("", False)

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None or offset.y < 1:
            return
        first, visible = self._visible()
        if offset.x >= self.size.width - SCROLLBAR and self.total > visible:
            self._set_top((offset.y - 1) * (self.total - visible) // max(1, visible - 1))
            self.cursor = max(self.top, min(self.cursor, self.top + visible - 1))
        else:
            self.cursor = first + offset.y - 1
        self._pin()

    def on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        event.stop()
        self._set_top(self.top + WHEEL_ROWS)

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        event.stop()
        self._set_top(self.top - WHEEL_ROWS)

    def on_resize(self, event: events.Resize) -> None:
        self._set_top(self.top)
        self._shown = {}
        self._check_window()

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()

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

    def _layout_columns(self, width: int) -> None:
        self._laid_out = width
        room = width - GUTTER - SCROLLBAR
        fixed = sum(c.width for c in self.COLUMNS if not c.flex) + len(self.COLUMNS) - 1
        self._widths = [max(c.width, room - fixed) if c.flex else c.width for c in self.COLUMNS]

    def render_lines(self, crop: Region) -> list[Strip]:
        # Styles resolved once per paint, not once per line: rich_style walks the CSS each time.
        get = self.get_component_rich_style
        cursor = "table--cursor" if self.has_focus else "table--cursor-blurred"
        styles = {"base": self.rich_style, "header": get("table--header"), "cursor": get(cursor),
                  "cursor-partial": get(cursor, partial=True), "marked": get("table--marked"),
                  "placeholder": get("table--placeholder"), "muted": get("cell--muted"),
                  "track": get("table--scrollbar"), "thumb": get("table--scrollbar-thumb")}
        if styles != self._styles:  # a theme or CSS change: cached lines are stale
            self._line_cache.clear()
            self._styles = styles
        return super().render_lines(crop)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        if width != self._laid_out:
            self._layout_columns(width)
        styles = self._styles
        base = styles["base"]
        if y == 0:
            text = " " * GUTTER + " ".join(fit(c.label, w, c.right) for c, w in zip(self.COLUMNS, self._widths))
            return Strip([Segment(text, styles["header"])]).adjust_cell_length(width, styles["header"])
        first, visible = self._visible()
        index = first + y - 1
        bar = self._scrollbar(y - 1, visible)
        if index >= self.total:
            if index == 0:
                message = "loading…" if not self.loaded else self.EMPTY
                body = Strip([Segment(" " * GUTTER + message, styles["muted"])])
            else:
                body = Strip([])
            return Strip.join([body.adjust_cell_length(width - SCROLLBAR, base), bar])
        row = self.row_at(index)
        if row is None:
            body = Strip([Segment(" " * GUTTER + "…", styles["placeholder"])])
            return Strip.join([body.adjust_cell_length(width - SCROLLBAR, base), bar])
        # The cursor's bar only on its own job: for the moment its pinned job is on its way, no row wears it.
        on_cursor = index == self.cursor and (self.pinned is None or self.key_of(row) == self.pinned)
        return Strip.join([self._render_row(row, on_cursor, width - SCROLLBAR, base), bar])

    def _scrollbar(self, line: int, visible: int) -> Strip:
        total = self.total
        if total <= visible:
            return Strip([Segment(" " * SCROLLBAR, self._styles["base"])])
        size = max(1, visible * visible // total)
        start = self.top * (visible - size) // max(1, total - visible)
        thumb = start <= line < start + size
        return Strip([Segment(("█" if thumb else "▕") * SCROLLBAR, self._styles["thumb" if thumb else "track"])])

    def _render_row(self, row: RowT, is_cursor: bool, width: int, base: Style) -> Strip:
        marked = self.key_of(row) in self.marks
        cells = self.cells(row, self.now)
        key = (cells, self.classes_of(row), is_cursor, is_cursor and self.has_focus, marked, width)
        strip = self._line_cache.get(key)
        if strip is None:
            strip = self._line_cache[key] = self._draw_row(cells, key[1], is_cursor, marked, width, base)
        return strip

    def _draw_row(self, cells: tuple[str, ...], classes: tuple[str | None, ...], is_cursor: bool, marked: bool,
                  width: int, base: Style) -> Strip:
        styles = self._styles
        line_style = base
        if marked:
            line_style += styles["marked"]
        if is_cursor:
            line_style += styles["cursor"]
        segments = [Segment("● " if marked else " " * GUTTER, line_style)]
        get = self.get_component_rich_style
        for i, (column, text, klass, cell_width) in enumerate(zip(self.COLUMNS, cells, classes, self._widths)):
            style = line_style
            if klass is not None:
                style = line_style + get(klass, partial=True)
                if is_cursor:  # the cursor's colours win over the cell's, so the bar reads as one
                    style += styles["cursor-partial"]
            if i:
                segments.append(Segment(" ", line_style))
            segments.append(Segment(fit(text, cell_width, column.right), style))
        return Strip(segments).adjust_cell_length(width, line_style)
