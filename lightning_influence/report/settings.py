"""What the report shows, and how: :class:`LogSettings`, a small frozen dataclass.

It imports nothing heavy, so configuration code (the callback, LightningCLI) can hold it without
loading torch's plotting or the loggers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["KINDS", "LogSettings"]

KINDS = ("auto", "image", "text", "table")


@dataclass(frozen=True)
class LogSettings:
    """What to show, and how.

    Args:
        n_val: how many validation examples get a panel (the first ones of the result, unless
            ``val_indices`` names them).
        top_k: helpful and harmful training examples shown per validation example.
        n_outliers: training examples with the highest self-influence in the review list.
        prefix: tag prefix in TensorBoard and W&B, and the stem of the file names in ``out_dir``.
        describe: turns one input into text: a tokenizer's decode for token ids, or any
            function; by default strings show as they are, small tensors their values and larger
            ones their shape and range.
        val_indices: dataset indices of the validation examples to show (overrides ``n_val``).
        image_size: pixels that the longer side of a small image is upscaled to at least
            (nearest); images longer than four times it are shrunk to that (area).
        kind: how an example is shown: ``"image"`` (a picture), ``"text"`` (the text of
            ``describe``), ``"table"`` (a row of named values, one per feature) or ``"auto"``:
            images when every input is shaped ``[C, H, W]`` with ``C`` in 1..4 or ``[H, W]``,
            else text.
        feature_names: names of the features of a tabular input (``kind="table"``), in order;
            ``x0, x1, ...`` when not given.
        class_names: names of the classes, shown instead of integer labels and predictions.
        dashboard_size: validation examples, and rows of the self-influence review, kept for the
            Influence tab of TensorBoard (with their pictures).

    Example:
        >>> LogSettings(n_val=2, top_k=4).top_k
        4
        >>> LogSettings(top_k=0)
        Traceback (most recent call last):
        ...
        ValueError: `top_k` must be at least 1, got 0.
    """

    n_val: int = 8
    top_k: int = 8
    n_outliers: int = 32
    prefix: str = "influence"
    describe: Callable[[Any], str] | None = None
    val_indices: tuple[int, ...] | None = None
    image_size: int = 64
    kind: Literal["auto", "image", "text", "table"] = "auto"
    feature_names: tuple[str, ...] | None = None
    class_names: tuple[str, ...] | None = None
    dashboard_size: int = 128

    def __post_init__(self) -> None:
        for name, low in (
            ("n_val", 0),
            ("top_k", 1),
            ("n_outliers", 0),
            ("image_size", 8),
            ("dashboard_size", 1),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be at least {low}, got {value!r}.")
        if not self.prefix or self.prefix.strip("/") != self.prefix:
            raise ValueError(
                f"`prefix` must be a non-empty tag such as 'influence' with no leading or "
                f"trailing '/', got {self.prefix!r}."
            )
        if self.kind not in KINDS:
            raise ValueError(f"`kind` must be one of {list(KINDS)}, got {self.kind!r}.")
        for name in ("feature_names", "class_names"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(str(n) for n in getattr(self, name)))
        if self.val_indices is not None:
            object.__setattr__(self, "val_indices", tuple(int(i) for i in self.val_indices))

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values (tuples as lists), ``describe`` by its name, if any: what
        a saved result can hold and load back equal.

        Example:
            >>> LogSettings(class_names=("cat", "dog")).to_dict()["class_names"]
            ['cat', 'dog']
        """
        out = asdict(self)
        for name in ("val_indices", "feature_names", "class_names"):
            if out[name] is not None:
                out[name] = list(out[name])
        describe = self.describe
        out["describe"] = None if describe is None else getattr(describe, "__qualname__", None)
        return out
