"""ImageReward (Xu et al., NeurIPS 2023; THUDM/ImageReward), ported to plain torch.

The original package no longer imports under transformers 5 (its BLIP `med.py` needs
`apply_chunking_to_forward`), so the architecture is rebuilt here with the original's key
names, and `ImageReward.pt` loads strictly:

    blip.visual_encoder.*   BLIP ViT-L/16 (timm layout), 224 px, pre-norm, LayerNorm eps 1e-6
    blip.text_encoder.*     BLIP "med" BERT encoder: self-attention, cross-attention to all
                            image tokens, feed-forward; post-norm; no token-type embeddings
    blip.vision_proj/text_proj   unused for scoring, kept so the checkpoint loads strictly
    mlp.layers.{0,2,4,6,7}  Linear 768-1024-128-64-16-1 with dropouts and *no* activations

score = (mlp(text_encoder(prompt, cross-attending to vit(image))[:, 0]) - mean) / std with the
published mean/std; text is padded/truncated to 35 BERT tokens; the image is resized (shortest
side, bicubic) to 224, centre-cropped and normalised with the OpenAI CLIP mean/std.

PIL images and files take the original's torchvision transform on the PIL image (`_transform`:
Resize(224, bicubic) and CenterCrop in the image's own mode, then RGB, ToTensor, Normalize), so
they score as the original. Tensors take the same steps in torch (bicubic with antialias on
float pixels), differentiable; `exact=True` sends them through the PIL path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffalign.errors import DiffalignError
from diffalign.rewards import base

HUB_REPO = "THUDM/ImageReward"
WEIGHTS_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
MEAN = 0.16717362830052426  # ImageReward.mean / .std: plain attributes, not in the checkpoint
STD = 1.0333394966054072
MAX_TEXT_LENGTH = 35
# BLIP create_vit('large'): ViT-L/16 at 224 px.
VIT_LARGE = {"image_size": 224, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}


def _attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None) -> Tensor:
    """Multi-head softmax(q k^T / sqrt(d) + mask) v on (B, L, D) projections."""
    b, lq, d = q.shape
    q, k, v = (_split_heads(x, heads) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, lq, d)


def _split_heads(x: Tensor, heads: int) -> Tensor:  # (B, L, D) -> (B, heads, L, D / heads)
    return x.view(x.shape[0], x.shape[1], heads, x.shape[2] // heads).transpose(1, 2)


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 4 * dim)
        self.mlp.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.attn.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.attn.proj(_attention(q, k, v, self.heads))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class VisionTransformer(nn.Module):
    """BLIP's timm-style ViT; eval only, so no dropout or drop-path (0.1 in the original)."""

    def __init__(self, image_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int):
        super().__init__()
        self.image_size = image_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch_size) ** 2 + 1, embed_dim))
        self.blocks = nn.ModuleList(ViTBlock(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, pixels: Tensor) -> Tensor:  # (B, 3, S, S) -> (B, 1 + patches, D)
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class BertAttention(nn.Module):
    """med.BertAttention: attention + dense + residual LayerNorm (post-norm)."""

    def __init__(self, hidden: int, kv_width: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.self = nn.Module()
        self.self.query = nn.Linear(hidden, hidden)
        self.self.key = nn.Linear(kv_width, hidden)
        self.self.value = nn.Linear(kv_width, hidden)
        self.output = nn.Module()
        self.output.dense = nn.Linear(hidden, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        s = self.self
        attended = _attention(s.query(x), s.key(context), s.value(context), self.heads, mask)
        return self.output.LayerNorm(self.output.dense(attended) + x)


class BertLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any], encoder_width: int):
        super().__init__()
        hidden, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
        self.attention = BertAttention(hidden, hidden, heads, eps)
        self.crossattention = BertAttention(hidden, encoder_width, heads, eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, cfg["intermediate_size"])
        self.output = nn.Module()
        self.output.dense = nn.Linear(cfg["intermediate_size"], hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: Tensor, text_mask: Tensor, image_embeds: Tensor) -> Tensor:
        x = self.attention(x, x, text_mask)
        x = self.crossattention(x, image_embeds)  # every image token is attended (mask of ones)
        return self.output.LayerNorm(self.output.dense(F.gelu(self.intermediate.dense(x))) + x)


class BertCrossEncoder(nn.Module):
    """BLIP med.BertModel(add_pooling_layer=False) in 'multimodal' mode, encoder only."""

    def __init__(self, cfg: dict[str, Any], encoder_width: int):
        super().__init__()
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise DiffalignError(f"med_config hidden_act {cfg['hidden_act']!r} unsupported: ImageReward uses 'gelu'")
        hidden, positions = cfg["hidden_size"], cfg["max_position_embeddings"]
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(cfg["vocab_size"], hidden)
        self.embeddings.position_embeddings = nn.Embedding(positions, hidden)
        self.embeddings.LayerNorm = nn.LayerNorm(hidden, eps=cfg["layer_norm_eps"])
        # A persistent buffer in med.py, so ImageReward.pt carries it.
        self.embeddings.register_buffer("position_ids", torch.arange(positions).expand(1, -1).clone())
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(cfg, encoder_width) for _ in range(cfg["num_hidden_layers"]))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, image_embeds: Tensor) -> Tensor:
        emb = self.embeddings
        x = emb.word_embeddings(input_ids) + emb.position_embeddings(emb.position_ids[:, : input_ids.shape[1]])
        x = emb.LayerNorm(x)
        # med.get_extended_attention_mask: additive -10000 on padding, broadcast over heads/queries.
        text_mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.encoder.layer:
            x = layer(x, text_mask, image_embeds)
        return x  # (B, L, hidden)


class BLIP(nn.Module):
    """BLIP_Pretrain as ImageReward builds it (tokenizer kept outside the module)."""

    def __init__(self, med_config: dict[str, Any], vit: dict[str, int], embed_dim: int = 256):
        super().__init__()
        self.visual_encoder = VisionTransformer(**vit)
        # blip_pretrain.py overrides the config's encoder_width with the vision width.
        self.text_encoder = BertCrossEncoder(med_config, encoder_width=vit["embed_dim"])
        self.vision_proj = nn.Linear(vit["embed_dim"], embed_dim)
        self.text_proj = nn.Linear(med_config["hidden_size"], embed_dim)


def mlp_head(input_size: int = 768) -> nn.Sequential:
    """ImageReward's MLP: the ReLUs are commented out in the original, so it is affine."""
    return nn.Sequential(
        nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )


class ImageRewardReward(nn.Module):
    """ImageReward behind the diffalign reward contract; `score` is the original `score_gard`.
    VP-Score (rewards/vpscore.py) is this same module under another name, checkpoint and mean/std."""

    def __init__(self, blip: BLIP, mlp: nn.Sequential, tokenizer: Any, mean: float = MEAN, std: float = STD, name: str = "imagereward"):
        super().__init__()
        self.name = name
        self.blip = blip
        self.mlp = nn.Module()
        self.mlp.layers = mlp  # keys mlp.layers.{0,2,4,6,7}.*
        self.tokenizer = tokenizer
        self.mean, self.std = float(mean), float(std)
        self.transform = base.clip_crop_transform(blip.visual_encoder.image_size)
        self.pil_transform = base.torchvision_pil_crop_transform(blip.visual_encoder.image_size)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device=None, dtype: torch.dtype | None = None, **opts: Any) -> "ImageRewardReward":
        """Load ImageReward.pt + med_config.json from `path` (a folder, the .pt file, or a hub
        repo id; default THUDM/ImageReward). Options: `tokenizer` (folder or hub id of the
        bert-base-uncased tokenizer; default `<path>/tokenizer`, `path` itself if it holds
        vocab.txt, else the hub), `vit` (vision config dict; default ViT-L/16, 224 px),
        `mean`, `std`, `med_config` (path to the json)."""
        return load_imagereward_shaped(path or HUB_REPO, device, dtype, "imagereward", WEIGHTS_FILE, {"mean": MEAN, "std": STD, **opts})

    def score(self, images: base.ImageInput, prompts: base.PromptInput, *, exact: bool = False) -> Tensor:
        """(B,) float32 ImageReward scores, roughly N(0, 1); differentiable w.r.t. tensor images.
        PIL images, files and `exact=True` take the original's PIL transform."""
        prompts = base.check_batch(images, prompts)
        n = len(prompts)
        param = self.blip.visual_encoder.pos_embed
        pixels = base.prepare_pixels(images, self.transform, param.device, param.dtype, self.pil_transform, exact)
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt")
        image_embeds = self.blip.visual_encoder(pixels)
        hidden = self.blip.text_encoder(text.input_ids.to(param.device), text.attention_mask.to(param.device), image_embeds)
        rewards = self.mlp.layers(hidden[:, 0])  # the [CLS] position
        return base.check_scores((rewards - self.mean) / self.std, n, self.name)

    def forward(self, images: base.ImageInput, prompts: base.PromptInput, *, exact: bool = False) -> Tensor:
        return self.score(images, prompts, exact=exact)


# ----------------------------------------------------------------------------------------
# Loading (shared with VP-Score, which has the same architecture)
# ----------------------------------------------------------------------------------------


def load_imagereward_shaped(path: str | Path, device, dtype, name: str, weights_file: str, opts: dict[str, Any]) -> ImageRewardReward:
    """Build an ImageReward-shaped reward from `weights_file` + med_config.json found in `path`
    (folder, file or hub repo id) and load it strictly. `opts` holds mean and std."""
    unknown = set(opts) - {"tokenizer", "vit", "mean", "std", "med_config"}
    if unknown:
        raise DiffalignError(f"unknown {name} options {sorted(unknown)}: use tokenizer, vit, mean, std, med_config")
    where = Path(str(path)).expanduser()
    med_path = opts.get("med_config")
    if where.is_file():  # the checkpoint itself; med_config.json beside it
        weights_path, folder = where, where.parent
        med_path = med_path or base.resolve_weights(folder, MED_CONFIG_FILE, hint=f"it ships in {HUB_REPO}")[0]
    else:
        names = [weights_file] + ([] if med_path else [MED_CONFIG_FILE])
        found = base.resolve_weights(path, names)
        weights_path, med_path = found[0], med_path or found[1]
        folder = where if where.is_dir() else weights_path.parent
    med_config = json.loads(Path(med_path).read_text())
    tokenizer = load_blip_tokenizer(opts.get("tokenizer"), folder)
    if len(tokenizer) > med_config["vocab_size"]:
        raise DiffalignError(f"tokenizer has {len(tokenizer)} tokens but med_config vocab_size is {med_config['vocab_size']}: pass the bert-base-uncased tokenizer")
    blip = BLIP(med_config, dict(opts.get("vit") or VIT_LARGE))
    model = ImageRewardReward(blip, mlp_head(med_config["hidden_size"]), tokenizer, opts["mean"], opts["std"], name)
    state = base.load_checkpoint(weights_path)
    # position_ids is only arange; tolerate checkpoints saved without the buffer.
    state.setdefault("blip.text_encoder.embeddings.position_ids", model.blip.text_encoder.embeddings.position_ids.clone())
    base.load_state_dict_strict(model, state, str(weights_path))
    return base.freeze(model, device, dtype)


def load_blip_tokenizer(tokenizer: str | Path | None, folder: Path) -> Any:
    """BLIP's init_tokenizer: bert-base-uncased + bos [DEC] + additional special [ENC]."""
    from transformers import BertTokenizer

    if tokenizer is None:
        candidates = [folder / "tokenizer", folder]
        tokenizer = next((c for c in candidates if (c / "vocab.txt").is_file() or (c / "tokenizer.json").is_file()), "bert-base-uncased")
    try:
        tok = BertTokenizer.from_pretrained(str(tokenizer), local_files_only=base.hub_offline())
    except Exception as err:  # offline hub, wrong folder
        raise DiffalignError(
            f"BERT tokenizer {str(tokenizer)!r} unavailable ({type(err).__name__}): place bert-base-uncased's "
            f"vocab.txt in {str(folder / 'tokenizer')!r} or pass tokenizer=FOLDER"
        ) from None
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok
