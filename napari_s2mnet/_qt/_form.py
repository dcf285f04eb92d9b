"""Build magicgui forms from config dataclasses, so widget defaults ARE the config defaults."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from magicgui.widgets import CheckBox, Container, Widget, create_widget


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``T | None`` -> ``(T, True)``; anything else -> ``(tp, False)``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


class OptionalValue(Container):
    """A value widget with an "auto" check box; its value is ``None`` while "auto" is checked."""

    def __init__(self, inner: Widget, name: str, label: str, auto_text: str = "auto") -> None:
        self._auto = CheckBox(value=True, text=auto_text)
        self._inner = inner
        super().__init__(
            widgets=[self._auto, inner], layout="horizontal", labels=False, name=name, label=label
        )
        self.margins = (0, 0, 0, 0)
        self._auto.changed.connect(lambda v: setattr(self._inner, "enabled", not v))
        self._inner.enabled = False

    @property
    def value(self) -> Any:
        return None if self._auto.value else self._inner.value

    @value.setter
    def value(self, v: Any) -> None:
        self._auto.value = v is None
        if v is not None:
            self._inner.value = v


def dataclass_form(
    cls: type,
    fields: list[str],
    *,
    labels: dict[str, str] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    tooltips: dict[str, str] | None = None,
    placeholder: dict[str, Any] | None = None,
) -> Container:
    """A vertical magicgui Container with one widget per dataclass field.

    Args:
        cls: The config dataclass (its defaults become the widgets' values).
        fields: Field names to show, in order.
        labels: Optional display labels per field.
        options: Extra magicgui widget options per field (min, max, step, choices, ...; plus
            ``decimals`` for float spin boxes).
        tooltips: Tooltips per field.
        placeholder: For ``T | None`` fields, the value shown while "auto" is checked.
    """
    hints = typing.get_type_hints(cls)
    defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}
    labels, options, tooltips = labels or {}, options or {}, tooltips or {}
    placeholder = placeholder or {}
    widgets = []
    for name in fields:
        tp, optional = _unwrap_optional(hints[name])
        label = labels.get(name, name.replace("_", " "))
        default = defaults[name]
        opts = dict(options.get(name, {}))
        decimals = opts.pop("decimals", None)
        if optional:
            inner_value = placeholder.get(name, default)
            inner = create_widget(
                value=inner_value, annotation=tp, name=f"{name}_value", options=opts
            )
            _set_decimals(inner, decimals, inner_value)
            w: Widget = OptionalValue(inner, name=name, label=label)
            w.value = default
        else:
            w = create_widget(value=default, annotation=tp, name=name, label=label, options=opts)
            _set_decimals(w, decimals, default)
        if name in tooltips:
            w.tooltip = tooltips[name]
        widgets.append(w)
    return Container(widgets=widgets, name=cls.__name__)


def _set_decimals(w: Widget, decimals: int | None, value: Any) -> None:
    """Show ``decimals`` digits in a float spin box (Qt's default of 2 would round 0.125)."""
    if decimals is None:
        return
    w.native.setDecimals(int(decimals))
    w.value = value  # re-set: the value was rounded to the old number of decimals


def form_values(form: Container) -> dict[str, Any]:
    """Field name -> current value for a form built by :func:`dataclass_form`."""
    return {w.name: w.value for w in form}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None
