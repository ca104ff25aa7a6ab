"""Progress bars (tqdm), switched off as a whole by `reb -q`: one place decides, every bar asks it."""

from __future__ import annotations

from tqdm.auto import tqdm

_enabled = True


def show_progress(enabled: bool) -> None:
    """Show (True) or hide (False) every progress bar made from now on."""
    global _enabled
    _enabled = enabled


def progress_bar(iterable=None, *, disable: bool = False, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)`, disabled when asked or when bars are hidden."""
    return tqdm(iterable, disable=disable or not _enabled, **kwargs)
