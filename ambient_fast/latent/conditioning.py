"""Per-sample conditioning of a text-to-image network, and captions -> conditioning.

:class:`Conditioning` holds the keyword arguments of one conditional network call
(``encoder_hidden_states``, ``encoder_attention_mask``, ``added_cond_kwargs`` ...), every
tensor batch-first, so a batch can be indexed, interleaved (conditional and unconditional
row of each sample side by side: one network call of 2B rows for classifier-free guidance),
flattened to named tensors (the restoration engine's static buffers) and copied into in place
(CUDA-graph replay) without knowing which model it is for.

:class:`CaptionEncoder` turns captions into that structure with the text encoder(s) a
diffusers pipeline carries, in two steps: :meth:`CaptionEncoder.tokenize` on the host (a
reader thread; :class:`Tokens`) and :meth:`CaptionEncoder.encode` on the device, batched,
under ``torch.no_grad``, in the encoder's own dtype (bf16 on GPU, fp32 on CPU by the
loader's policy). Three layouts, as the pipelines do it:

- ``"single"`` (Stable Diffusion 1.x/2.x, any one ``transformers`` encoder): the last hidden
  state ``(B, L, D)``; the attention mask goes to the encoder only where its config asks
  (``use_attention_mask``), as in ``StableDiffusionPipeline``.
- ``"pixart"`` (PixArt-alpha/sigma, T5): the last hidden state computed with the attention
  mask, which is also passed to the transformer as ``encoder_attention_mask``; the size
  micro-conditions ``resolution (B, 2)``, ``aspect_ratio (B, 1)`` when the transformer uses
  them, else ``None`` as the pipeline passes.
- ``"sdxl"`` (two CLIP encoders): penultimate hidden states of both, concatenated on the
  feature axis ``(B, L, D1 + D2)``; pooled projection of the second as ``text_embeds``;
  ``time_ids (B, 6)`` = original size, crop corner (0, 0), target size, in pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["Conditioning", "CaptionEncoder", "LAYOUTS", "Tokens"]

LAYOUTS = ("single", "pixart", "sdxl")


def _map_tree(fn: Callable[..., torch.Tensor], *trees: Any) -> Any:
    """Apply ``fn`` leafwise over equally structured dicts of tensors; ``None`` stays ``None``."""
    first = trees[0]
    if isinstance(first, Mapping):
        return {key: _map_tree(fn, *(t[key] for t in trees)) for key in first}
    if first is None:
        return None
    return fn(*trees)


def _leaves(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, Mapping):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    return [] if tree is None else [tree]


@dataclass(frozen=True)
class Conditioning:
    """Keyword arguments of a conditional network call; every tensor is ``(B, ...)``.

    ``kwargs`` maps argument names to tensors, ``None``, or nested dicts of the same
    (``added_cond_kwargs``). All tensors share the batch size ``B``. The network is called as
    ``model(x, timestep=t, **conditioning.kwargs)``.
    """

    kwargs: Mapping[str, Any]

    def __post_init__(self) -> None:
        sizes = {int(t.shape[0]) for t in _leaves(self.kwargs)}
        if len(sizes) > 1:
            raise ValueError(f"Conditioning: tensors disagree on the batch size: {sorted(sizes)}")

    @property
    def batch_size(self) -> int:
        """``B`` (0 when the conditioning holds no tensor)."""
        leaves = _leaves(self.kwargs)
        return int(leaves[0].shape[0]) if leaves else 0

    def select(self, rows: torch.Tensor) -> Conditioning:
        """Rows ``rows`` (int ``(n,)``) of every tensor."""
        return Conditioning(_map_tree(lambda t: t[rows.to(t.device)], self.kwargs))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        """Move to ``device``; floating tensors also cast to ``dtype`` when given."""

        def move(t: torch.Tensor) -> torch.Tensor:
            cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
            return t.to(device=device, dtype=cast)

        return Conditioning(_map_tree(move, self.kwargs))

    def flatten(self) -> dict[str, torch.Tensor]:
        """``{"name": tensor, "parent/name": tensor, ...}``: every tensor by its path (``None`` skipped)."""
        flat: dict[str, torch.Tensor] = {}

        def walk(tree: Any, prefix: str) -> None:
            for key, value in tree.items():
                if isinstance(value, Mapping):
                    walk(value, f"{prefix}{key}/")
                elif value is not None:
                    flat[f"{prefix}{key}"] = value

        walk(self.kwargs, "")
        return flat

    def with_tensors(self, flat: Mapping[str, torch.Tensor]) -> Conditioning:
        """The same structure with every tensor replaced by ``flat[path]`` (see :meth:`flatten`)."""

        def build(tree: Any, prefix: str) -> Any:
            return {
                key: build(value, f"{prefix}{key}/") if isinstance(value, Mapping)
                else (None if value is None else flat[f"{prefix}{key}"])
                for key, value in tree.items()
            }

        return Conditioning(build(self.kwargs, ""))

    def copy_rows_(self, source: Conditioning, start: int = 0, step: int = 1) -> None:
        """Copy ``source``'s ``n`` rows into rows ``start, start + step, ...`` (``n`` of them) in place."""
        stop = start + step * source.batch_size
        _map_tree(lambda dst, src: dst[start:stop:step].copy_(src), self.kwargs, source.kwargs)

    @staticmethod
    def interleave(parts: Sequence[Conditioning]) -> Conditioning:
        """Rows ``[parts[0][0], parts[1][0], ..., parts[0][1], parts[1][1], ...]`` (new tensors)."""
        if not parts:
            raise ValueError("Conditioning.interleave: nothing to interleave")
        return Conditioning(_map_tree(lambda *ts: torch.stack(ts, dim=1).flatten(0, 1), *(p.kwargs for p in parts)))


@dataclass(frozen=True)
class Tokens:
    """Tokenised captions: per tokenizer, ``(ids, attention mask)`` int64 ``(B, L)`` (CPU)."""

    pairs: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def rows(self) -> int:
        return int(self.pairs[0][0].shape[0])

    def select(self, start: int, stop: int) -> Tokens:
        """Rows ``start:stop``."""
        return Tokens(tuple((ids[start:stop], mask[start:stop]) for ids, mask in self.pairs))

    def pin_memory(self) -> Tokens:
        """Page-locked copies (so :meth:`to` a CUDA device does not wait for the device)."""
        return Tokens(tuple((ids.pin_memory(), mask.pin_memory()) for ids, mask in self.pairs))

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Tokens:
        return Tokens(
            tuple((ids.to(device, non_blocking=non_blocking), m.to(device, non_blocking=non_blocking))
                  for ids, m in self.pairs)
        )

    def pad(self, rows: int) -> Tokens:
        """``rows`` rows: these, then copies of row 0 (a static batch's padding)."""
        extra = rows - self.rows
        if extra < 0:
            raise ValueError(f"{self.rows} token rows do not fit in {rows}")
        return Tokens(
            tuple((torch.cat([ids, ids[:1].expand(extra, -1)]), torch.cat([m, m[:1].expand(extra, -1)]))
                  for ids, m in self.pairs)
        )


class CaptionEncoder:
    """Captions -> :class:`Conditioning` with a pipeline's tokenizer(s) and text encoder(s).

    Args:
        tokenizers: one ``transformers`` tokenizer (two for ``"sdxl"``).
        text_encoders: the matching ``transformers`` encoders, already on their device and
            dtype; the second one of ``"sdxl"`` must return ``text_embeds`` (pooled, projected).
        layout: ``"single"``, ``"pixart"`` or ``"sdxl"`` (module docstring).
        max_length: token length (default: the first tokenizer's ``model_max_length``;
            PixArt-alpha uses 120, PixArt-sigma 300).
        size_conditioning: ``"pixart"`` only: pass the ``resolution``/``aspect_ratio``
            micro-conditions (the transformer's ``use_additional_conditions``).
        zero_unconditional: the unconditional rows are zeros instead of the encoded
            ``negative_caption`` (SDXL's ``force_zeros_for_empty_prompt``).
        negative_caption: caption of the unconditional rows (default empty).
        batch_size: captions per encoder call.

    ``__call__(captions, image_sizes)``: ``image_sizes`` int ``(B, 2)`` (height, width in
    pixels; only the size micro-conditions read it). The result lives on the first encoder's
    device, floating tensors in its dtype.
    """

    def __init__(
        self,
        tokenizers: Sequence[Any],
        text_encoders: Sequence[nn.Module],
        *,
        layout: Literal["single", "pixart", "sdxl"] = "single",
        max_length: int | None = None,
        size_conditioning: bool = False,
        zero_unconditional: bool = False,
        negative_caption: str = "",
        batch_size: int = 64,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        expected = 2 if layout == "sdxl" else 1
        if len(tokenizers) != expected or len(text_encoders) != expected:
            raise ValueError(
                f"layout {layout!r} takes {expected} tokenizer(s) and text encoder(s), "
                f"got {len(tokenizers)} and {len(text_encoders)}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.layout = layout
        self.max_length = int(max_length or tokenizers[0].model_max_length)
        self.size_conditioning = size_conditioning
        self.zero_unconditional = zero_unconditional
        self.negative_caption = negative_caption
        self.batch_size = batch_size
        self._negative: Conditioning | None = None

    @property
    def device(self) -> torch.device:
        return next(self.text_encoders[0].parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.text_encoders[0].parameters()).dtype

    def tokenize(self, captions: Sequence[str]) -> Tokens:
        """Host-side tokenisation: per tokenizer, int64 ``(ids (B, L), attention mask (B, L))`` on
        the CPU (no device work, so it can run on a reader thread while the device samples)."""
        pairs = []
        for tokenizer in self.tokenizers:
            batch = tokenizer(
                list(captions), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
            )
            pairs.append((batch.input_ids, batch.attention_mask))
        return Tokens(tuple(pairs))

    def _encode_text(self, tokens: Tokens) -> dict[str, Any]:
        """Text part of the conditioning for one encoder batch."""
        device = self.device
        if self.layout == "sdxl":
            hidden, pooled = [], None
            for (ids, _), encoder in zip(tokens.pairs, self.text_encoders, strict=True):
                out = encoder(ids.to(device), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled = out[0]
            return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}
        ids, mask = (t.to(device) for t in tokens.pairs[0])
        encoder = self.text_encoders[0]
        if self.layout == "pixart":
            hidden = encoder(ids, attention_mask=mask)[0]
            return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}
        use_mask = bool(getattr(encoder.config, "use_attention_mask", False))
        hidden = encoder(ids, attention_mask=mask if use_mask else None)[0]
        return {"encoder_hidden_states": hidden}

    @torch.no_grad()
    def _encode_batched(self, tokens: Tokens) -> dict[str, Any]:
        rows = tokens.rows
        chunks = [self._encode_text(tokens.select(i, i + self.batch_size)) for i in range(0, rows, self.batch_size)]
        return _map_tree(lambda *ts: torch.cat(ts, dim=0), *chunks)

    def _assemble(self, text: dict[str, Any], image_sizes: torch.Tensor) -> Conditioning:
        sizes = image_sizes.to(device=self.device, dtype=self.dtype)
        kwargs: dict[str, Any] = {"encoder_hidden_states": text["encoder_hidden_states"]}
        if self.layout == "sdxl":
            time_ids = torch.cat([sizes, torch.zeros_like(sizes), sizes], dim=1)
            kwargs["added_cond_kwargs"] = {"text_embeds": text["text_embeds"], "time_ids": time_ids}
        elif self.layout == "pixart":
            kwargs["encoder_attention_mask"] = text["encoder_attention_mask"]
            if self.size_conditioning:
                aspect = (sizes[:, 0] / sizes[:, 1]).unsqueeze(1)
                kwargs["added_cond_kwargs"] = {"resolution": sizes, "aspect_ratio": aspect}
            else:
                kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return Conditioning(kwargs)

    def __call__(self, captions: Sequence[str], image_sizes: torch.Tensor) -> Conditioning:
        """Conditioning of ``B`` captions (one row each, in order); ``image_sizes`` ``(B, 2)``."""
        return self.encode(self.tokenize(captions), image_sizes)

    def encode(self, tokens: Tokens, image_sizes: torch.Tensor) -> Conditioning:
        """Conditioning of ``B`` tokenised captions (:meth:`tokenize`); ``image_sizes`` ``(B, 2)``."""
        if image_sizes.shape != (tokens.rows, 2):
            raise ValueError(f"image_sizes: expected ({tokens.rows}, 2), got {tuple(image_sizes.shape)}")
        return self._assemble(self._encode_batched(tokens), image_sizes)

    def unconditional(self, image_sizes: torch.Tensor) -> Conditioning:
        """The unconditional rows for a batch of ``image_sizes`` ``(B, 2)``.

        The negative caption is encoded once and cached; its rows are broadcast copies.
        """
        if self._negative is None:
            text = self._encode_batched(self.tokenize([self.negative_caption]))
            if self.zero_unconditional:
                text = _map_tree(lambda t: torch.zeros_like(t) if t.is_floating_point() else t, text)
            self._negative = Conditioning(text)
        batch = image_sizes.shape[0]
        text = _map_tree(lambda t: t.expand(batch, *t.shape[1:]).contiguous(), self._negative.kwargs)
        return self._assemble(text, image_sizes)
