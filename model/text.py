"""A frozen text encoder from a local transformers folder: prompts -> hidden states + mask.

Works with T5/FLAN-T5 (encoder only), CLAP (its text tower) and any encoder `AutoModel`
loads (BERT, RoBERTa, ...). Loaded once, from local files only; never trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextEncoderConfig:
    """Which local folder to load, and how many tokens a prompt may have."""

    path: str = ""  # a transformers model folder with its tokenizer
    max_length: int = 128


class FrozenTextEncoder(nn.Module):
    """list[str] -> (hidden (N, S, E), mask (N, S) bool)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        folder = Path(cfg.path)
        if not cfg.path or not folder.is_dir():
            raise FileNotFoundError(f"text encoder folder {cfg.path!r} does not exist (set text.path in the job config)")
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        mcfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if mcfg.model_type in ("t5", "mt5", "umt5"):
            from transformers import T5EncoderModel

            self.net = T5EncoderModel.from_pretrained(str(folder), local_files_only=True)
        elif mcfg.model_type == "clap":
            from transformers import ClapModel

            self.net = ClapModel.from_pretrained(str(folder), local_files_only=True).text_model
        else:
            self.net = AutoModel.from_pretrained(str(folder), local_files_only=True)
        self.net.eval().requires_grad_(False)
        self.dim = int(self.net.config.hidden_size if hasattr(self.net.config, "hidden_size") else self.net.config.d_model)
        log.info("text encoder %s (%s), hidden size %d", folder, mcfg.model_type, self.dim)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.net.parameters()).device
        tok = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.cfg.max_length, return_tensors="pt"
        )
        ids = tok["input_ids"].to(device)  # (N, S)
        mask = tok["attention_mask"].to(device)  # (N, S)
        if ids.shape[1] == 0:  # every prompt empty and the tokenizer adds no special token
            ids = torch.full((len(prompts), 1), self.tokenizer.pad_token_id or 0, device=device)  # (N, 1)
            mask = torch.zeros_like(ids)  # (N, 1)
        hidden = self.net(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, S, E)
        return hidden, mask.bool()
