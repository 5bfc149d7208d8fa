"""The published TERAN architecture, weight for weight compatible with the authors' released
`.pth.tar` checkpoints (Messina et al., TERAN, ACM TOMM 2021; code `mesnico/TERAN`).

Facts this module follows are in shared/docs/teran-reference.md; the exact state_dict layout
(212 keys with separate joint-space stacks, 188 with a shared one) is in
shared/docs/teran-state-dict-keys.txt. Every key carries the prefix `img_txt_enc.` because the
authors' top-level model holds the encoder as `self.img_txt_enc`.

Differences from our own variant (teran.model): bottom-up region features (36 x 2048) with
pixel boxes, a visual transformer at d_model 2048, a fine-tuned 6-layer BERT-base, and
sequence-first transformer stacks (as in the original code). Outputs are the same `Encoded`
tuple, so teran.alignment scores them unchanged.

Text concept mask (checkpoint-compatibility quirk): the original alignment code slices the
caption tensor as `s_seq[:, 1:-2]` with lengths `len - 3`, i.e. it keeps tokens 1 .. len-3 of
each caption: [CLS], [SEP] AND the last real word piece are dropped. `word_mask_compat`
reproduces it (the default of `encode_text`); pass `compat_mask=False` to get our project's
`teran.model.word_mask` (drops only [CLS] and [SEP]).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from teran.errors import CheckpointError
from teran.model import Encoded, _normalise, word_mask

PREFIX = "img_txt_enc."
PROJECT_FORMAT = "teran-project-checkpoint"  # teran.checkpoint.FORMAT (not imported: keeps this module light)


@dataclass(frozen=True)
class OriginalTeranConfig:
    """Dimensions of the published model (defaults = the released TERAN / TERN configs)."""

    feature_dim: int = 2048  # bottom-up region feature size
    visual_dim: int = 2048  # d_model of the visual transformer (equal to feature_dim in the releases)
    visual_layers: int = 4
    visual_heads: int = 4
    visual_ff: int = 2048
    dropout: float = 0.1
    joint_dim: int = 1024  # `embed-size`
    joint_layers: int = 2
    joint_heads: int = 4
    joint_ff: int = 2048
    bert_hidden: int = 768  # `word-dim`
    bert_layers: int = 6  # `extraction-hidden-layer`: bert-base-uncased truncated to 6 layers
    bert_heads: int = 12
    bert_intermediate: int = 3072
    bert_max_positions: int = 512
    bert_type_vocab: int = 2
    bert_layer_norm_eps: float = 1e-12
    vocab_size: int = 30522
    shared_transformer: bool = False  # TERN and TERAN *_sharedTE: transformer_encoder_1 for both modalities


# --------------------------------------------------------------------------- module tree
# Class and attribute names mirror the original code so that state_dict keys match exactly.


def _stack(d_model: int, heads: int, ff: int, layers: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d_model=d_model, nhead=heads, dim_feedforward=ff, dropout=dropout, activation="relu")
    # Sequence-first, post-LN, ReLU as in the original; the dense path keeps numerics identical in eval and training.
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


class PositionalEncodingImageBoxes(nn.Module):
    """'concat-and-process' spatial encoding: feature ++ (x1, y1, x2, y2, area) -> Linear -> ReLU -> Linear."""

    def __init__(self, in_dim: int, d_model: int):
        super().__init__()
        self.map = nn.Sequential(nn.Linear(in_dim + 5, d_model), nn.ReLU(), nn.Linear(d_model, d_model))

    def forward(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """x [S, B, C], boxes [B, S, 4] normalised -> [S, B, d_model]."""
        area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
        s_infos = torch.cat([boxes, area.unsqueeze(-1)], dim=-1).permute(1, 0, 2)
        return self.map(torch.cat([x, s_infos], dim=-1))


class TransformerPostProcessing(nn.Module):
    """`img_enc`: spatial encoding + visual transformer. `fc` exists in the checkpoints but is unused."""

    def __init__(self, cfg: OriginalTeranConfig):
        super().__init__()
        self.transformer_encoder = _stack(cfg.visual_dim, cfg.visual_heads, cfg.visual_ff, cfg.visual_layers, cfg.dropout)
        self.pos_encoding_image = PositionalEncodingImageBoxes(cfg.feature_dim, cfg.visual_dim)
        self.fc = nn.Linear(cfg.visual_dim, cfg.joint_dim)  # unused (its output fed a global vector TERAN never trains)

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """feats [B, S, C], boxes [B, S, 4], padding [B, S] (True = pad) -> [S, B, visual_dim]."""
        x = self.pos_encoding_image(feats.permute(1, 0, 2), boxes)
        return self.transformer_encoder(x, src_key_padding_mask=padding)


def _bert_config(cfg: OriginalTeranConfig):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.bert_hidden,
        num_hidden_layers=cfg.bert_layers,
        num_attention_heads=cfg.bert_heads,
        intermediate_size=cfg.bert_intermediate,
        max_position_embeddings=cfg.bert_max_positions,
        type_vocab_size=cfg.bert_type_vocab,
        layer_norm_eps=cfg.bert_layer_norm_eps,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        pad_token_id=0,
    )


class EncoderTextBERT(nn.Module):
    """`txt_enc`: BERT (built from a config, never downloaded). `word_embeddings` is the BERT input
    embedding registered a second time (same tensor, second key); `map` exists but is unused."""

    def __init__(self, cfg: OriginalTeranConfig):
        super().__init__()
        from transformers import BertModel

        self.bert_model = BertModel(_bert_config(cfg), add_pooling_layer=True)
        self.word_embeddings = self.bert_model.get_input_embeddings()
        self.map = nn.Linear(cfg.bert_hidden, cfg.joint_dim)  # unused

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """-> last hidden state [B, L, bert_hidden]."""
        return self.bert_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class JointTextImageTransformerEncoder(nn.Module):
    """`img_txt_enc`: both branches and the joint-space stacks (`_2` only with separate stacks)."""

    def __init__(self, cfg: OriginalTeranConfig):
        super().__init__()
        self.txt_enc = EncoderTextBERT(cfg)
        self.img_enc = TransformerPostProcessing(cfg)
        self.img_proj = nn.Linear(cfg.visual_dim, cfg.joint_dim)
        self.cap_proj = nn.Linear(cfg.bert_hidden, cfg.joint_dim)
        self.transformer_encoder_1 = _stack(cfg.joint_dim, cfg.joint_heads, cfg.joint_ff, cfg.joint_layers, cfg.dropout)
        if not cfg.shared_transformer:
            self.transformer_encoder_2 = _stack(cfg.joint_dim, cfg.joint_heads, cfg.joint_ff, cfg.joint_layers, cfg.dropout)

    @property
    def image_joint_stack(self) -> nn.TransformerEncoder:
        """`transformer_encoder_2`, or the text stack `_1` when the stack is shared."""
        return self.transformer_encoder_2 if hasattr(self, "transformer_encoder_2") else self.transformer_encoder_1


def word_mask_compat(attention_mask: torch.Tensor) -> torch.Tensor:
    """Concept mask of the original checkpoints, for positions 1.. (lines up with `Encoded.concepts`).

    The original alignment keeps caption positions 1 .. len-3 (inclusive), len = real tokens
    including [CLS] and [SEP]: it drops [CLS], [SEP] and the last real word piece. Reproduce
    it only when scoring with the authors' checkpoints (they were trained with it); our own
    models use `teran.model.word_mask`.
    """
    valid = attention_mask.bool()
    lengths = valid.sum(dim=1, keepdim=True)
    positions = torch.arange(valid.shape[1], device=valid.device).unsqueeze(0)
    words = valid & (positions >= 1) & (positions <= lengths - 3)
    return words[:, 1:]


class OriginalTeran(nn.Module):
    """The authors' model. state_dict() keys equal the released checkpoints' `model` entry."""

    def __init__(self, cfg: OriginalTeranConfig | None = None):
        super().__init__()
        self.config = cfg or OriginalTeranConfig()
        self.img_txt_enc = JointTextImageTransformerEncoder(self.config)

    def encode_image(
        self,
        features: torch.Tensor,
        boxes: torch.Tensor,
        image_sizes: torch.Tensor,
        region_mask: torch.Tensor | None = None,
    ) -> Encoded:
        """features [B, R, C], boxes [B, R, 4] (x1, y1, x2, y2 in pixels), image_sizes [B, 2] (w, h),
        region_mask [B, R] (True = real region; default all) -> Encoded (N = R)."""
        enc = self.img_txt_enc
        b = features.shape[0]
        if region_mask is None:
            region_mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        region_mask = region_mask.bool()
        sizes = image_sizes.to(boxes.dtype)
        scale = torch.stack([sizes[:, 0], sizes[:, 1], sizes[:, 0], sizes[:, 1]], dim=1).unsqueeze(1)
        boxes = boxes / scale
        # CLS slot: all-zero feature and all-zero box, prepended (37 positions for 36 regions).
        features = torch.cat([features.new_zeros(b, 1, features.shape[2]), features], dim=1)
        boxes = torch.cat([boxes.new_zeros(b, 1, 4), boxes], dim=1)
        padding = ~torch.cat([torch.ones_like(region_mask[:, :1]), region_mask], dim=1)
        x = enc.img_enc(features, boxes, padding)  # [S, B, visual_dim]
        x = enc.image_joint_stack(enc.img_proj(x), src_key_padding_mask=padding)
        x = _normalise(x.permute(1, 0, 2))
        return Encoded(x[:, 0], x[:, 1:], region_mask)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, compat_mask: bool = True) -> Encoded:
        """WordPiece ids [B, L] ([CLS] ... [SEP], padded with 0) + attention mask -> Encoded (N = L - 1).

        compat_mask=True (default) gives the original checkpoints' concept mask (`word_mask_compat`,
        which also drops the last real word piece); False gives `teran.model.word_mask`.
        """
        enc = self.img_txt_enc
        hidden = enc.txt_enc(input_ids, attention_mask)
        x = enc.cap_proj(hidden).permute(1, 0, 2)
        x = enc.transformer_encoder_1(x, src_key_padding_mask=~attention_mask.bool())
        x = _normalise(x.permute(1, 0, 2))
        mask = word_mask_compat(attention_mask) if compat_mask else word_mask(attention_mask)
        return Encoded(x[:, 0], x[:, 1:], mask)


# --------------------------------------------------------------------------- checkpoints


def original_config_dict(cfg: OriginalTeranConfig) -> dict:
    """A subset of the authors' yaml config, in its layout, for the container's `config` entry."""
    return {
        "image-model": {"feat-dim": cfg.feature_dim, "transformer-layers": cfg.visual_layers, "pos-encoding": "concat-and-process"},
        "text-model": {"pretrain": "bert-base-uncased", "word-dim": cfg.bert_hidden, "extraction-hidden-layer": cfg.bert_layers},
        "model": {
            "embed-size": cfg.joint_dim,
            "layers": cfg.joint_layers,
            "dropout": cfg.dropout,
            "shared-transformer": cfg.shared_transformer,
        },
    }


def save_original_checkpoint(
    path: str | Path,
    model: OriginalTeran,
    config_dict: dict | None = None,
    *,
    epoch: int = 0,
    eiters: int = 0,
    opt: Mapping | None = None,
) -> None:
    """Write the authors' container layout: epoch, model, optimizer, scheduler, opt (argparse.Namespace), config, Eiters."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": None,
        "scheduler": None,
        "opt": argparse.Namespace(**dict(opt or {})),
        "config": config_dict if config_dict is not None else original_config_dict(model.config),
        "Eiters": eiters,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _layer_count(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def infer_config(state: Mapping[str, torch.Tensor], base: OriginalTeranConfig | None = None) -> OriginalTeranConfig:
    """Dimensions from tensor shapes; head counts, dropout and eps (not visible in shapes) from `base`.

    Keys that are absent leave the base value in place: the strict load that follows reports them.
    """
    base = base or OriginalTeranConfig()
    p = PREFIX
    found: dict = {}

    def shape(key: str):
        t = state.get(p + key)
        return tuple(t.shape) if isinstance(t, torch.Tensor) else None

    if (s := shape("img_enc.pos_encoding_image.map.0.weight")) and len(s) == 2:
        found.update(visual_dim=s[0], feature_dim=s[1] - 5)
    if (s := shape("img_enc.transformer_encoder.layers.0.linear1.weight")) and len(s) == 2:
        found["visual_ff"] = s[0]
    if (s := shape("img_proj.weight")) and len(s) == 2:
        found["joint_dim"] = s[0]
    if (s := shape("transformer_encoder_1.layers.0.linear1.weight")) and len(s) == 2:
        found["joint_ff"] = s[0]
    if (s := shape("txt_enc.bert_model.embeddings.word_embeddings.weight")) and len(s) == 2:
        found.update(vocab_size=s[0], bert_hidden=s[1])
    if (s := shape("txt_enc.bert_model.embeddings.position_embeddings.weight")) and len(s) == 2:
        found["bert_max_positions"] = s[0]
    if (s := shape("txt_enc.bert_model.embeddings.token_type_embeddings.weight")) and len(s) == 2:
        found["bert_type_vocab"] = s[0]
    if (s := shape("txt_enc.bert_model.encoder.layer.0.intermediate.dense.weight")) and len(s) == 2:
        found["bert_intermediate"] = s[0]
    for name, prefix in (
        ("visual_layers", "img_enc.transformer_encoder.layers."),
        ("joint_layers", "transformer_encoder_1.layers."),
        ("bert_layers", "txt_enc.bert_model.encoder.layer."),
    ):
        if n := _layer_count(state, p + prefix):
            found[name] = n
    found["shared_transformer"] = not any(k.startswith(p + "transformer_encoder_2.") for k in state)
    return replace(base, **found)


def _check_heads(cfg: OriginalTeranConfig) -> str | None:
    for dim, heads in (("visual_dim", "visual_heads"), ("joint_dim", "joint_heads"), ("bert_hidden", "bert_heads")):
        if getattr(cfg, heads) <= 0 or getattr(cfg, dim) % getattr(cfg, heads):
            return f"{dim}={getattr(cfg, dim)} is not divisible by {heads}={getattr(cfg, heads)}; pass config= with the right head counts"
    return None


def _fill_nonpersistent_buffers(model: nn.Module) -> bool:
    """After `to_empty`, refill the buffers the checkpoint does not hold (BERT's position_ids is an
    arange, token_type_ids zeros). Returns False if an unknown one is found."""
    persistent = set(model.state_dict())
    for name, buf in list(model.named_buffers()):
        if name in persistent:
            continue
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if attr == "position_ids":
            value = torch.arange(buf.shape[-1], dtype=buf.dtype).expand(buf.shape).clone()
        elif attr == "token_type_ids":
            value = torch.zeros(buf.shape, dtype=buf.dtype)
        else:
            return False
        module.register_buffer(attr, value, persistent=False)
    return True


def _materialise(meta_model: OriginalTeran) -> OriginalTeran:
    """CPU model with uninitialised weights (skips the random init of ~200M parameters) that a strict load fills."""
    model = meta_model.to_empty(device="cpu")
    if not _fill_nonpersistent_buffers(model):
        model = OriginalTeran(meta_model.config)
    return model


def _describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"{len(names)} ({shown}{', ...' if len(names) > limit else ''})"


def load_original_checkpoint(
    path: str | Path,
    *,
    trusted: bool = False,
    config: OriginalTeranConfig | None = None,
) -> tuple[OriginalTeran, dict]:
    """Load an authors' `.pth.tar` checkpoint (strict key and shape match) in eval mode.

    The container pickles an argparse.Namespace, so it is read with `weights_only=False`, which can
    run arbitrary code from the file: ONLY load files from a trusted source (the authors' release,
    checked against its published checksum). `trusted=True` states that; otherwise nothing is read.

    Stacks (shared or separate) and every dimension are inferred from the tensors; `config` supplies
    what shapes cannot show (head counts, dropout; defaults = the published ones).
    Returns (model, info): info holds epoch, Eiters, opt (as a dict), config (the yaml dict), the
    inferred OriginalTeranConfig and the parameter count.
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a directory, not a checkpoint file" if path.is_dir() else "checkpoint file does not exist"
        raise CheckpointError(f"{path}: {problem}")
    if not trusted:
        raise CheckpointError(
            f"{path}: original TERAN checkpoints pickle an argparse.Namespace and must be loaded with weights_only=False, "
            "which can execute code stored in the file; call load_original_checkpoint(..., trusted=True) only for files from a "
            "trusted source (e.g. the authors' release, verified by checksum)"
        )
    try:
        # Trusted files only (see the docstring): weights_only=False unpickles arbitrary objects.
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a corrupt or foreign file can fail inside pickle in many ways
        first = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {first})") from None
    if isinstance(payload, dict) and payload.get("format") == PROJECT_FORMAT:
        raise CheckpointError(
            f"{path}: this is a {PROJECT_FORMAT} file of this project, not an original TERAN checkpoint; "
            "load it with teran.checkpoint.load_model"
        )
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), Mapping):
        found = sorted(map(str, payload))[:6] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not an original TERAN checkpoint (expected a dict with a 'model' state_dict, found {found})")
    state = payload["model"]
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: the 'model' entry holds non-tensor entries: {_describe(bad)}")

    cfg = infer_config(state, config)
    if problem := _check_heads(cfg):
        raise CheckpointError(f"{path}: {problem}")
    try:
        with torch.device("meta"):  # layout first, without allocating anything
            meta_model = OriginalTeran(cfg)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot build the model for the inferred dimensions {asdict(cfg)} ({exc})") from None

    expected = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_describe(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes {_describe(wrong, 3)}")
    if problems:
        kind = "shared" if cfg.shared_transformer else "separate"
        raise CheckpointError(f"{path}: weights do not match the published TERAN layout ({kind} joint stacks): " + "; ".join(problems))
    tied = PREFIX + "txt_enc.word_embeddings.weight"
    bert_words = PREFIX + "txt_enc.bert_model.embeddings.word_embeddings.weight"
    if not torch.equal(state[tied], state[bert_words]):
        raise CheckpointError(f"{path}: {tied} differs from {bert_words} (they are one tied tensor in TERAN)")
    model = _materialise(meta_model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not load ({str(exc).splitlines()[0]})") from None
    model.eval()

    opt = payload.get("opt")
    info = {
        "path": str(path),
        "epoch": payload.get("epoch"),
        "Eiters": payload.get("Eiters"),
        "opt": vars(opt) if isinstance(opt, argparse.Namespace) else opt,
        "config": payload.get("config"),
        "model_config": cfg,
        "shared_transformer": cfg.shared_transformer,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, info


__all__ = [
    "OriginalTeran",
    "OriginalTeranConfig",
    "infer_config",
    "load_original_checkpoint",
    "original_config_dict",
    "save_original_checkpoint",
    "word_mask_compat",
]
