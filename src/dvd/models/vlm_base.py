"""The interface every VLM in dvd offers: [0, 1] images + token batch -> per-sample answer NLL; greedy text.

Subclasses supply image features, the token embedding and the causal LM; this class does the rest
(image-token scatter, answer-only loss, batched greedy decoding with a KV cache), so ours and the
HF LLaVA adapter behave identically. Nothing here uses ``no_grad`` on the loss path: an attack's
objective is ``lambda x: model.per_sample_nll(x, batch)`` and gradients reach the pixels.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from torch import nn

from dvd.data.transforms import check_image_batch
from dvd.models.vlm_conversation import (
    IGNORE_INDEX,
    ConversationTemplate,
    VLMBatch,
    VLMCollator,
    get_template,
)


def set_hf_checkpointing(model: nn.Module, enable: bool) -> None:
    """Non-reentrant activation checkpointing of an HF model (so an attack's backward works through it)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        if enable:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


@dataclass
class VLMOutput:
    """``loss``: mean NLL over all answer tokens of the batch (LLaVA's training loss);
    ``per_sample_nll``: (B,) mean over each sample's answer tokens (0 where it has none);
    ``n_tokens``: (B,) answer-token counts;
    ``answer_is_greedy`` (only with ``forward(..., greedy=True)``, else None): (B,) bool, every answer
    token (the closing stop token included) is the most likely next token given the ones before it:
    greedy decoding would write exactly this answer."""

    loss: torch.Tensor
    per_sample_nll: torch.Tensor
    n_tokens: torch.Tensor
    answer_is_greedy: torch.Tensor | None = None


class VisionLanguageModel(nn.Module):
    """Vision tower -> projector -> causal LM, with images in [0, 1] and normalisation inside."""

    tokenizer: Any
    template: ConversationTemplate

    # --- what a subclass provides -------------------------------------------------------------
    @property
    def image_size(self) -> int:
        raise NotImplementedError

    @property
    def num_image_tokens(self) -> int:
        raise NotImplementedError

    @property
    def image_token_id(self) -> int:
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, num_image_tokens, lm_hidden) projected patch features."""
        raise NotImplementedError

    def causal_lm(self) -> nn.Module:
        """The module called with ``inputs_embeds`` that returns next-token logits."""
        raise NotImplementedError

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part: ``vision``, ``projector``, ``lm`` (to freeze or give learning rates)."""
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError

    # --- shared behaviour ------------------------------------------------------------------------
    def collator(
        self, *, max_length: int | None = None, template: str | ConversationTemplate | None = None
    ) -> VLMCollator:
        """A picklable collate function (and prompt/pair encoder) for this model's tokenizer.

        ``template`` overrides the model's own (e.g. ``"plain"`` for stage-1 caption batches).
        """
        chosen = self.template if template is None else get_template(template)
        return VLMCollator(self.tokenizer, chosen, self.num_image_tokens, self.image_token_id, max_length)

    def collate(self, conversations: Sequence[Sequence[dict[str, str]]]) -> VLMBatch:
        """Right-padded training batch of LLaVA-format conversations."""
        return self.collator().conversations(conversations)

    @property
    def device(self) -> torch.device:
        return self.causal_lm().get_input_embeddings().weight.device

    def check_images(self, images: torch.Tensor) -> None:
        check_image_batch(
            images, self.image_size, expected="(B, 3, H, W) in [0, 1]", taker="the vision tower"
        )

    def embed(self, images: torch.Tensor, batch: VLMBatch) -> torch.Tensor:
        """Token embeddings with the projected image features scattered into the image-token positions."""
        if images.shape[0] != len(batch):
            raise ValueError(f"{images.shape[0]} images for a batch of {len(batch)} conversations")
        features = self.encode_images(images)
        counts = batch.image_mask.sum(1)
        if not bool((counts == features.shape[1]).all()):
            raise ValueError(
                f"image tokens per sample {counts.tolist()} differ from the "
                f"{features.shape[1]} image features; "
                "build the batch with this model's collator"
            )
        embeddings = self.causal_lm().get_input_embeddings()
        embeds = embeddings(batch.input_ids.masked_fill(batch.image_mask, 0))
        return embeds.masked_scatter(batch.image_mask.unsqueeze(-1), features.to(embeds.dtype))

    def forward(self, images: torch.Tensor, batch: VLMBatch, *, greedy: bool = False) -> VLMOutput:
        """Answer-token NLL of ``batch`` given ``images`` (B, 3, H, W) in [0, 1]; ``greedy`` also checks
        each answer against the argmax tokens (a targeted attack's success; training skips it)."""
        batch = batch.to(images.device)
        embeds = self.embed(images, batch)
        labels = batch.labels
        length = labels.shape[1]
        has_label = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
        # logits are only needed from the position before the first answer token onwards
        start = int(has_label[0, 0]) if len(has_label) else length - 1
        keep = length - start if self._lm_accepts("logits_to_keep") else 0
        logits, _ = self._lm_forward(embeds, batch.attention_mask, logits_to_keep=keep)
        offset = length - logits.shape[1]  # logits[:, i] predicts labels[:, offset + i + 1]
        targets = labels[:, offset + 1 :]
        mask = targets != IGNORE_INDEX
        token_nll = F.cross_entropy(logits[:, :-1][mask].float(), targets[mask], reduction="none")
        rows = mask.nonzero()[:, 0]
        sums = torch.zeros(len(batch), device=logits.device, dtype=torch.float32).index_add(
            0, rows, token_nll
        )
        n_tokens = mask.sum(1)
        answer_is_greedy = None
        if greedy:
            wrong = (logits[:, :-1].argmax(-1) != targets) & mask
            answer_is_greedy = (n_tokens > 0) & ~wrong.any(1)
        # 0 * logits keeps the graph connected (DDP, attacks) when a batch has no answer tokens
        anchor = logits.sum() * 0.0 if token_nll.numel() == 0 else 0.0
        per_sample = sums / n_tokens.clamp(min=1) + anchor
        loss = token_nll.sum() / n_tokens.sum().clamp(min=1) + anchor
        return VLMOutput(
            loss=loss, per_sample_nll=per_sample, n_tokens=n_tokens, answer_is_greedy=answer_is_greedy
        )

    def per_sample_nll(self, images: torch.Tensor, batch: VLMBatch) -> torch.Tensor:
        """(B,) mean answer-token NLL; attack objective is ``lambda x: model.per_sample_nll(x, batch)``."""
        return self.forward(images, batch).per_sample_nll

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        prompts: str | Sequence[str],
        *,
        max_new_tokens: int = 32,
        use_cache: bool = True,
    ) -> list[str]:
        """Greedy answers to ``prompts`` (one user message per image, or one for all), stopping at EOS."""
        if isinstance(prompts, str):
            prompts = [prompts] * images.shape[0]
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        batch = self.collator().prompts(prompts).to(self.device)
        embeds = self.embed(images, batch)
        mask = batch.attention_mask
        eos, pad = self.tokenizer.eos_token_id, self.collator().pad_token_id
        embeddings = self.causal_lm().get_input_embeddings()
        use_cache = use_cache and self._lm_accepts("cache")
        logits, cache = self._lm_forward(embeds, mask, use_cache=use_cache, logits_to_keep=1)
        finished = torch.zeros(len(batch), dtype=torch.bool, device=mask.device)
        tokens = []
        for step in range(max_new_tokens):
            next_token = logits[:, -1].argmax(-1).masked_fill(finished, pad)
            tokens.append(next_token)
            finished |= next_token == eos
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            new = embeddings(next_token[:, None])
            if use_cache:
                logits, cache = self._lm_forward(new, mask, cache=cache, use_cache=True, logits_to_keep=1)
            else:
                embeds = torch.cat([embeds, new], dim=1)
                logits, _ = self._lm_forward(embeds, mask, logits_to_keep=1)
        out = torch.stack(tokens, dim=1).tolist()
        texts = []
        for row in out:
            row = row[: row.index(eos)] if eos in row else row
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    # --- calling any HF causal LM ----------------------------------------------------------------
    def _lm_params(self) -> frozenset[str]:
        """Argument names of the causal LM's forward (looking through a peft wrapper), cached per LM."""
        lm = self.causal_lm()
        cached = self.__dict__.get("_lm_params_cache")
        if cached is None or cached[0] is not lm:
            base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
            cached = (lm, frozenset(inspect.signature(base.forward).parameters))
            self.__dict__["_lm_params_cache"] = cached
        return cached[1]

    def _lm_accepts(self, name: str) -> bool:
        """Whether the causal LM's forward takes ``name`` (``cache`` means a KV-cache argument)."""
        params = self._lm_params()
        if name == "cache":
            return "cache" in params or "past_key_values" in params
        return name in params

    def _lm_forward(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        cache: Any = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, Any]:
        """Logits (of the last ``logits_to_keep`` positions, 0 = all) and the updated KV cache."""
        lm = self.causal_lm()
        # positions count real tokens only, so left padding does not shift them
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -embeds.shape[1] :]
        kwargs: dict[str, Any] = {"inputs_embeds": embeds, "attention_mask": attention_mask}
        if self._lm_accepts("position_ids"):
            kwargs["position_ids"] = positions
        if logits_to_keep and self._lm_accepts("logits_to_keep"):
            kwargs["logits_to_keep"] = logits_to_keep
        if self._lm_accepts("cache"):
            # transformers 5 calls it ``cache``; earlier releases ``past_key_values``
            kwargs["cache" if "cache" in self._lm_params() else "past_key_values"] = cache
            kwargs["use_cache"] = use_cache
        out = lm(**kwargs)
        new_cache = getattr(out, "cache" if "cache" in self._lm_params() else "past_key_values", None)
        return out.logits, new_cache


def hf_load(load: Callable[..., Any], name: str, what: str, **kwargs: Any) -> Any:
    """``from_pretrained`` with a one-line error when the name is neither local nor reachable."""
    try:
        return load(name, **kwargs)
    except OSError as error:
        offline = bool(getattr(hf_constants, "HF_HUB_OFFLINE", False))
        hint = (
            "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache; "
            "download it once online or give a local path"
            if offline
            else "check the name, or download it and give the local path"
        )
        raise FileNotFoundError(f"cannot load {what} {name!r}: {hint} ({first_line(error)})") from None


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
