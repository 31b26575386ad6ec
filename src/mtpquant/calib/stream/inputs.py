"""What every decoder layer is given, caught at layer 0 of the model's own forward: the embedded calibration
batches, the masks and rotary tables.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from mtpquant.calib.stream.device import Spans, map_tensors, move_to
from mtpquant.calib.stream.reader import read_tensors
from mtpquant.core.checkpoint import Checkpoint

EMBED_NAME = "model.embed_tokens.weight"  # read first, while the calibration data is tokenized


class _Caught(Exception):
    pass


@functools.cache
def _catcher_class() -> type:
    """A module that stands in for decoder layer 0: it keeps what reaches it in `self.caught` and stops the
    forward. What is caught lives on the instance, never in a closure: a class sits in a reference cycle (every
    class does), so a list its method closed over lived until the cyclic GC ran, and with it layer 0's inputs
    (on the GPU: one extra set of hidden states at the peak, +4.5 GiB on the H200)."""
    import torch

    class Catcher(torch.nn.Module):
        def __init__(self, put: Callable[[Any], Any]) -> None:
            super().__init__()
            self.put = put
            self.caught: list[tuple[Any, dict[str, Any]]] = []

        def forward(self, hidden_states: Any, **kwargs: Any) -> Any:
            self.caught.append((self.put(hidden_states), kwargs))
            raise _Caught

    return Catcher


EMBED_GROUP = 32  # calibration batches embedded in one forward of the model's prefix (layer_inputs)


def embed_groups(batches: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    """Runs of at most `size` consecutive batches that one forward can take at once: the same keys, tensor
    shapes and other values."""
    import torch

    def key(b: dict[str, Any]) -> tuple:
        return tuple((n, ("t", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("v", repr(v)))
                     for n, v in sorted(b.items()))

    groups: list[list[dict[str, Any]]] = []
    for b in batches:
        if groups and len(groups[-1]) < size and key(groups[-1][-1]) == key(b):
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


def _split_caught(hidden: Any, kwargs: dict[str, Any], sizes: list[int]) -> list[tuple[Any, dict[str, Any]]]:
    """One group's forward, as the forwards of its batches: every tensor whose first dimension is the group's
    rows is split by batch (views), the others (built once for all rows: rotary tables) are shared."""
    rows, n = sum(sizes), len(sizes)
    # each tensor split once (a view per batch), or the tensor itself for every batch
    parts = map_tensors(kwargs, lambda t: _PerBatch(t.split(sizes) if t.dim() and t.shape[0] == rows else (t,) * n))
    return [(h, _pick(parts, j)) for j, h in enumerate(hidden.split(sizes))]


class _PerBatch:
    """One tensor of a group's forward as each batch gets it (_split_caught)."""

    def __init__(self, views: tuple[Any, ...]):
        self.views = views


def _pick(obj: Any, j: int) -> Any:
    """Batch j's value of `obj`, where _split_caught put a _PerBatch in place of every tensor."""
    return map_tensors(obj, lambda p: p.views[j], leaf=_PerBatch)


def _same(a: Any, b: Any) -> bool:
    """Nested tuples, lists, dicts of tensors and values: equal, tensors bit for bit (shape, dtype, values)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def layer_inputs(skeleton: Any, config: Any, source: Checkpoint, batches: list[dict[str, Any]],
                 put: Callable[[Any], Any] = lambda t: t, spans: dict[str, float] | None = None,
                 embedding: Future | None = None, device: Any = "cpu",
                 group: int = EMBED_GROUP) -> tuple[list[Any], list[dict[str, Any]]]:
    """Per batch: (hidden states entering layer 0, the other arguments the model passes every decoder layer),
    from the model's own forward on `device` with a real embedding and rotary table and a catcher at layer 0.
    `put(hidden)` is what is kept of each batch's hidden states, as it is caught. `spans`: the read's (or the
    wait for `embedding`, a read_tensors already running) and the forward's seconds, and how many forwards.
    Why the GPU when there is one, and `group` batches per forward: on the H200 the CPU forward of one batch
    at a time took 2.2-2.3 s for 768 batches (the bf16 gather, the masks, a pageable copy each), on the GPU
    still 1.75 s (the model's Python per call), all of it before layer 0 can start. A group's forward is
    checked once against its first batch's own forward, bit for bit, and if it differs (a model whose prefix
    mixes the rows) every batch runs alone."""
    import torch
    from llmcompressor.utils.helpers import calibration_forward_context

    span = Spans(spans)
    inner = skeleton.model
    read = embedding.result() if embedding is not None else read_tensors(source, [EMBED_NAME])
    emb = read[EMBED_NAME]
    del read
    span("embedding_read")
    embed = torch.nn.Embedding(emb.shape[0], emb.shape[1], padding_idx=inner.embed_tokens.padding_idx,
                               dtype=inner.embed_tokens.weight.dtype, device=device)
    embed.load_state_dict({"weight": emb.to(embed.weight.dtype)})
    del emb
    rotary = type(inner.rotary_emb)(config=config).to(device)
    first = inner.layers[0]
    catcher = _catcher_class()(lambda t: t)
    saved = (inner.embed_tokens, inner.rotary_emb)
    inner.embed_tokens, inner.rotary_emb, inner.layers[0] = embed, rotary, catcher

    def forward(g: list[dict[str, Any]]) -> list[tuple[Any, dict[str, Any]]]:
        import torch

        b = g[0] if len(g) == 1 else {k: torch.cat([x[k] for x in g]) if isinstance(v, torch.Tensor) else v
                                      for k, v in g[0].items()}
        with contextlib.suppress(_Caught):
            inner(**move_to(b, device))
        (hidden, kwargs), = catcher.caught
        catcher.caught = []
        if len(g) == 1:
            return [(hidden, kwargs)]
        return _split_caught(hidden, kwargs, [next(v for v in x.values() if isinstance(v, torch.Tensor)).shape[0]
                                              for x in g])

    out: list[tuple[Any, dict[str, Any]]] = []
    try:
        with calibration_forward_context(skeleton):
            groups = embed_groups(batches, group)
            done = forward(groups[0]) if groups else []  # group 0, checked against its first batch alone
            if len(done) > 1 and not _same(forward(groups[0][:1])[0], done[0]):
                groups = [[b] for b in batches]
                done = forward(groups[0])
            out += [(put(h), kw) for h, kw in done]
            del done
            for g in groups[1:]:
                out += [(put(h), kw) for h, kw in forward(g)]
    finally:
        (inner.embed_tokens, inner.rotary_emb), inner.layers[0] = saved, first
    span("embedding_forward")
    if spans is not None:
        spans["embedding_forwards"] = len(groups)  # a count, not seconds: len(batches) when grouping fell back
    return [h for h, _ in out], [kw for _, kw in out]
