r"""The EAGLE-style feature drafter: one decoder layer over [token embedding ; target feature].

At a committed position ``t`` the target produced feature ``h_t`` (one or several of its layers' outputs,
concatenated) and the next token ``x_{t+1}`` was committed. The drafter maps the pair to its own state
``a_{t+1}`` and a distribution over the token after it:

.. math::

    g_t = W_{fc}\,h_t \qquad u = [\,\mathrm{norm}_e(E x_{t+1})\,;\ \mathrm{norm}_g(g_t)\,]

    a_{t+1} = \mathrm{Layer}(u;\ \text{residual } g_t) \qquad q(\cdot \mid \le t+1) = \mathrm{softmax}\bigl(W_{lm}[V_d]\ \mathrm{norm}_f(a_{t+1})\bigr)

``E`` (embedding) and ``W_lm`` (LM head) are the target's, frozen and never saved with the drafter. ``V_d`` is an
optional reduced draft vocabulary (EAGLE-3): the most frequent target tokens, so the draft LM head reads a
fraction of the target's. Deeper drafts replace the target feature with the drafter's own state:
``g = a_{t+1}`` paired with the drafted ``x_{t+2}`` (EAGLE-3's "training-time test" trains exactly this
recurrence, see :mod:`sglang_ext.training.drafter`).

The layer is a Llama decoder layer whose attention projections read the ``2d``-wide input. Attention is
supplied by the caller (a KV cache when serving, a training-time-test mask when training), so this module
holds the arithmetic only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn


@dataclass
class EagleConfig:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    feature_dim: int  # width of the concatenated target features
    vocab_size: int  # the target's vocabulary
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    feature_layers: list[int] = field(default_factory=list)  # which target layers make the feature
    draft_vocab_size: int | None = None  # None: the full target vocabulary
    target: dict = field(default_factory=dict)  # identity of the target (name, config digest): a checkpoint for another is refused

    @staticmethod
    def for_target(target_config, feature_layers: list[int], draft_vocab_size: int | None = None,
                   target_identity: dict | None = None) -> "EagleConfig":
        cfg = target_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        return EagleConfig(
            hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim, intermediate_size=cfg.intermediate_size, feature_dim=cfg.hidden_size * len(feature_layers),
            vocab_size=cfg.vocab_size, rms_norm_eps=cfg.rms_norm_eps, rope_theta=float(theta),
            feature_layers=list(feature_layers), draft_vocab_size=draft_vocab_size, target=dict(target_identity or {}),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (q, k, v) -> [B, T, H*D]


class TargetBoundDrafter(nn.Module):
    """What every feature drafter shares: the target's frozen embedding and draft-vocabulary LM-head rows (bound,
    never saved), RoPE, the feature projection ``fc`` and the logits. Subclasses create ``fc``, ``final_norm``,
    the ``draft_vocab`` buffer and the ``inv_freq`` buffer."""

    config: "EagleConfig"
    embed_weight: torch.Tensor | None
    lm_weight: torch.Tensor | None

    def bind_target(self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor):
        """Share the target's embedding and (draft-vocabulary rows of the) LM head, frozen."""
        if embed_weight.shape[1] != self.config.hidden_size or lm_head_weight.shape[0] != self.config.vocab_size:
            raise ValueError(f"target embedding {tuple(embed_weight.shape)} / LM head {tuple(lm_head_weight.shape)} do not "
                             f"match the drafter config (hidden {self.config.hidden_size}, vocab {self.config.vocab_size})")
        self.embed_weight = embed_weight.detach()
        self.lm_weight = lm_head_weight.detach()[self.draft_vocab.to(lm_head_weight.device)].contiguous()
        return self

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        self.draft_vocab = token_ids.to(torch.long).clone()
        self.config.draft_vocab_size = int(token_ids.numel())

    def rope(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[B, 1, T, hd]``: computed in float32, returned in ``dtype`` (the activations' dtype, so that a
        bfloat16 drafter's queries stay bfloat16 like the keys its cache holds)."""
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq.float()  # [B, T, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().unsqueeze(1).to(dtype), emb.sin().unsqueeze(1).to(dtype)

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def logits(self, a: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits ``[..., V_d]``."""
        return torch.nn.functional.linear(self.final_norm(a), self.lm_weight)

    @property
    def scale(self) -> float:
        return self.config.head_dim ** -0.5

    #: ``config.json``'s ``architecture`` (which model class a checkpoint is)
    ARCHITECTURE: str = ""

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        """``model.safetensors`` + ``config.json`` (architecture, config with the target's identity), written atomically."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(out / "model.safetensors.tmp"))
        (out / "model.safetensors.tmp").replace(out / "model.safetensors")
        meta = {"architecture": self.ARCHITECTURE, **asdict(self.config), **(extra or {})}
        (out / "config.json.tmp").write_text(json.dumps(meta, indent=2))
        (out / "config.json.tmp").replace(out / "config.json")
        return out

    def load_weights(self, directory: Path):
        """The weights of ``directory/model.safetensors`` (the draft vocabulary's size comes from the file)."""
        from safetensors.torch import load_file

        state = load_file(str(directory / "model.safetensors"))
        if "draft_vocab" in state:
            self.draft_vocab = torch.empty_like(state["draft_vocab"])
        self.load_state_dict(state)
        return self

    def _init_buffers(self) -> None:
        c = self.config
        hd = c.head_dim
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        vocab = torch.arange(c.vocab_size) if c.draft_vocab_size is None else torch.zeros(c.draft_vocab_size, dtype=torch.long)
        self.register_buffer("draft_vocab", vocab)  # draft index -> target token id (saved)
        self.embed_weight = None
        self.lm_weight = None


class EagleDraftModel(TargetBoundDrafter):
    ARCHITECTURE = "sglang-ext-eagle"

    def __init__(self, config: EagleConfig) -> None:
        super().__init__()
        c = self.config = config
        d, hd = c.hidden_size, c.head_dim
        self.fc = nn.Linear(c.feature_dim, d, bias=False)
        self.embed_norm = RMSNorm(d, c.rms_norm_eps)
        self.feature_norm = RMSNorm(d, c.rms_norm_eps)
        self.q_proj = nn.Linear(2 * d, c.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(2 * d, c.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(2 * d, c.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(c.num_heads * hd, d, bias=False)
        self.post_norm = RMSNorm(d, c.rms_norm_eps)
        self.gate_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, d, bias=False)
        self.final_norm = RMSNorm(d, c.rms_norm_eps)
        self._init_buffers()  # RoPE, the draft vocabulary; the frozen target parts come with `bind_target`

    # ---- arithmetic -----------------------------------------------------------------------------
    def layer(self, tokens: torch.Tensor, g: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """``tokens [B, T]``, ``g [B, T, d]`` (projected target feature or previous drafter state) → ``a [B, T, d]``."""
        from sglang_ext.core.kv_cache import apply_rope

        c = self.config
        B, T = tokens.shape
        emb = torch.nn.functional.embedding(tokens, self.embed_weight)
        u = torch.cat([self.embed_norm(emb), self.feature_norm(g)], dim=-1)
        cos, sin = self.rope(positions, u.dtype)
        q = apply_rope(self.q_proj(u).view(B, T, c.num_heads, c.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_proj(u).view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2), cos, sin)
        v = self.v_proj(u).view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        h = g + self.o_proj(attend(q, k, v))
        x = self.post_norm(h)
        return h + self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    # ---- checkpoints ----------------------------------------------------------------------------
    @staticmethod
    def load(directory: str | Path, expect_target: dict | None = None) -> "EagleDraftModel":
        """Load a checkpoint; refuse one trained for another target (``expect_target`` keys must match)."""
        meta, cfg_path = read_checkpoint_meta(directory)
        if meta.get("architecture") != "sglang-ext-eagle":
            raise ValueError(f"{cfg_path}: architecture {meta.get('architecture')!r} is not an sglang-ext EAGLE drafter")
        return EagleDraftModel(EagleConfig(**config_fields(EagleConfig, meta, cfg_path, expect_target))).load_weights(
            Path(directory))


def read_checkpoint_meta(directory: str | Path) -> tuple[dict, Path]:
    """``(config.json as a dict, its path)`` of a drafter checkpoint directory; errors name the file."""
    d = Path(directory)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{d}: not a drafter checkpoint (no config.json)")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: invalid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(meta).__name__}")
    return meta, cfg_path


def config_fields(config_cls, meta: dict, cfg_path: Path, expect_target: dict | None) -> dict:
    """The dataclass fields of ``meta``; refuse a checkpoint trained for another target (``expect_target``)."""
    fields = {k: v for k, v in meta.items() if k in config_cls.__dataclass_fields__}
    have = fields.get("target") or {}
    for key, want in (expect_target or {}).items():
        if key in have and have[key] != want:
            raise ValueError(f"{cfg_path}: drafter was trained for target {key}={have[key]!r}, "
                             f"but the server runs {key}={want!r}")
    return fields


def target_identity(name: str, config) -> dict:
    """What a checkpoint records about its target: name plus the shape-defining config values."""
    return {"name": name, "architecture": (getattr(config, "architectures", None) or ["?"])[0],
            "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size}
