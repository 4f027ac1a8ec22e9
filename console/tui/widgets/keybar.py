"""KeyBar: the keys of the focused pane and its screen on one line (one widget, so a screen switch stays cheap)."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.screen import Screen
from textual.widget import Widget


class KeyBar(Widget):
    """Like Textual's Footer, but drawn as one Text: the Footer's widget per key made every screen switch
    cost tens of milliseconds of restyling."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {"keybar--key", "keybar--description"}

    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, self._bindings_changed)

    def _bindings_changed(self, screen: Screen) -> None:
        if screen is self.screen:
            self.refresh()

    def render(self) -> Text:
        key_style = self.get_component_rich_style("keybar--key")
        description_style = self.get_component_rich_style("keybar--description")
        text = Text(no_wrap=True, overflow="crop")
        seen: set[str] = set()
        palette = ""
        for _node, binding, enabled, _tooltip in self.screen.active_bindings.values():
            if binding.action == "app.command_palette" or binding.key == self.app.COMMAND_PALETTE_BINDING:
                palette = self.app.get_key_display(binding)
                continue
            if not binding.show or binding.action in seen:
                continue
            seen.add(binding.action)
            text.append(f" {self.app.get_key_display(binding)} ", style=key_style)
            text.append(f"{binding.description} ", style=description_style if enabled else "dim")
        tail = f" {palette} palette "
        room = self.size.width - text.cell_len - len(tail)
        if palette and self.app.ENABLE_COMMAND_PALETTE and room >= 1:  # right-aligned, when it fits
            text.append(" " * room)
            text.append(f" {palette} ", style=key_style)
            text.append("palette ", style=description_style)
        return text
