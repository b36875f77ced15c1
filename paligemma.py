"""PaliGemma 1 and 2 in one file of plain PyTorch, loading the Hugging Face Hub checkpoints as they are.

PaliGemma (arXiv:2407.07726, PaliGemma 2: arXiv:2412.03555) is a SigLIP-So400m image encoder whose patch
features go through one linear layer into a Gemma (PaliGemma 1) or Gemma 2 (PaliGemma 2) decoder. The
decoder reads [image tokens, <bos>, prompt, "\\n"] as a *prefix* that attends in both directions, then
writes the answer causally after it (a "prefix-LM"). Read top to bottom: config, vision tower, projector,
decoder, the full model, preprocessing, loading, generation, command line.

    python paligemma.py --image cat.jpg --prompt "caption en"
"""
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (GatedMLP, KVCache, SelfAttention, Streamer, VLMError, attend, check_args, cli_parser, from_dict,
                    generate, image_tensor, linear, load_weights, normalize, open_image, read_json, resize, resolve,
                    rope_cos_sin, rope_inv_freq, rope_theta, run_cli, stop_ids)

DEFAULT_MODEL = "google/paligemma2-3b-mix-224"


# ----------------------------------------------------------------------------- config

@dataclass
class VisionConfig:  # SigLIP; defaults are transformers' SiglipVisionConfig, which the hub files rely on
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6


@dataclass
class TextConfig:  # Gemma / Gemma 2; the defaults missing from a config.json come from GEMMA_DEFAULTS
    model_type: str = "gemma"
    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    query_pre_attn_scalar: float | None = None  # Gemma 2: scores scale by this**-0.5, not head_dim**-0.5
    attn_logit_softcapping: float | None = None  # Gemma 2: tanh soft-cap of attention scores
    final_logit_softcapping: float | None = None  # Gemma 2: tanh soft-cap of the output logits
    sliding_window: int | None = None  # Gemma 2: local attention on every other layer
    layer_types: list | None = None
    rope_theta: float = 10000.0


# Gemma 2 changed the defaults transformers fills in when a config.json leaves a field out.
GEMMA_DEFAULTS = {
    "gemma": {},
    "gemma2": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                   num_key_value_heads=4, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, sliding_window=4096),
}


@dataclass
class Config:
    vision: VisionConfig
    text: TextConfig
    image_token_index: int = 256000

    @staticmethod
    def from_folder(folder):
        c = read_json(folder / "config.json")
        if c.get("model_type") != "paligemma":
            raise VLMError(f"{folder} holds a {c.get('model_type', 'unknown')!r} checkpoint, not PaliGemma")
        t = c.get("text_config") or {}
        if t.get("model_type", "gemma") not in GEMMA_DEFAULTS:
            raise VLMError(f"unsupported PaliGemma text model {t.get('model_type')!r} (expected gemma or gemma2)")
        text = from_dict(TextConfig, {**GEMMA_DEFAULTS[t.get("model_type", "gemma")], **t})
        text.rope_theta = rope_theta(t)
        if text.model_type == "gemma2" and text.layer_types is None:  # even layers slide, odd layers see all
            text.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(text.num_hidden_layers)]
        image_token = c.get("image_token_index", c.get("image_token_id", 256000))
        return Config(from_dict(VisionConfig, c.get("vision_config")), text, image_token)


# ----------------------------------------------------------------------------- vision tower: SigLIP

class SiglipEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2, c.hidden_size)

    def forward(self, pixels):  # (N, 3, S, S) -> (N, P, Dv), P = (S / patch)^2 patches in row-major order
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight


class SiglipAttention(nn.Module):  # plain multi-head self-attention over all patches, biases on every projection
    def __init__(self, dim, n_heads):
        super().__init__()
        self.H = n_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        N, P, C = x.shape
        q, k, v = (proj(x).view(N, P, self.H, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attend(q, k, v).transpose(1, 2).reshape(N, P, C))


class SiglipMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    """A pre-LayerNorm ViT block (arXiv:2010.11929), as in SigLIP (arXiv:2303.15343)."""

    def __init__(self, c):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = SiglipAttention(c.hidden_size, c.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = SiglipMLP(c.hidden_size, c.intermediate_size)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipVision(nn.Module):
    """Checkpoint keys `vision_tower.vision_model.*`. No pooling head: PaliGemma uses every patch."""

    def __init__(self, c):
        super().__init__()
        self.embeddings = SiglipEmbeddings(c)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(SiglipLayer(c) for _ in range(c.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels):
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class Projector(nn.Module):  # one linear layer, no activation (`projector_hidden_act` in configs is unused)
    def __init__(self, vision_dim, text_dim):
        super().__init__()
        self.linear = nn.Linear(vision_dim, text_dim)

    def forward(self, x):
        return self.linear(x)


# ----------------------------------------------------------------------------- decoder: Gemma and Gemma 2

class GemmaRMSNorm(nn.Module):
    """Gemma stores the norm weight zero-centred and scales by (1 + w), all in fp32 (Gemma reference code)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())).type_as(x)


class GemmaLayer(nn.Module):
    def __init__(self, i, c):
        super().__init__()
        self.gemma2 = c.model_type == "gemma2"
        self.sliding = self.gemma2 and c.layer_types[i] == "sliding_attention"
        scale = c.query_pre_attn_scalar ** -0.5 if self.gemma2 else None
        self.input_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = SelfAttention(i, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                       scale, c.attn_logit_softcapping if self.gemma2 else None)
        self.post_attention_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, lambda x: F.gelu(x, approximate="tanh"))
        if self.gemma2:  # Gemma 2 "sandwich" norms: around the attention and around the MLP
            self.pre_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, masks, cache):
        h = self.self_attn(self.input_layernorm(x), cos, sin, masks[self.sliding], cache)
        if not self.gemma2:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(GemmaLayer(i, c) for i in range(c.num_hidden_layers))
        self.norm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(c.head_dim, c.rope_theta), persistent=False)

    def embed(self, ids):  # Gemma scales token embeddings by sqrt(hidden), rounded to the weight dtype
        w = self.embed_tokens.weight
        return self.embed_tokens(ids) * torch.tensor(self.c.hidden_size ** 0.5, dtype=w.dtype, device=w.device)

    def forward(self, x, positions, masks, cache=None):
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, masks, cache)
        return self.norm(x)


# ----------------------------------------------------------------------------- the full model

def prefix_lm_mask(keys, prefix, T, window=None):
    """Boolean mask (B, 1, T, S) for the last T of S positions, or None when nothing is masked. Causal, except
    that the prefix (image tokens, <bos>, prompt, "\\n") sees all of itself in both directions (the PaliGemma
    paper's prefix-LM); `window` keeps a query's `window` most recent keys in Gemma 2's sliding layers, but
    the prefix still sees all of itself there, as in transformers. Pads (`keys` False) are never keys."""
    S = keys.shape[1]
    q, k = torch.arange(S - T, S, device=keys.device)[:, None], torch.arange(S, device=keys.device)[None]
    m = (k <= q) & (k > q - (window or S)) | prefix[:, S - T:, None] & prefix[:, None, :]
    m = (m & keys[:, None, :] | (k == q))[:, None]  # a pad query sees itself, so no row is empty (no NaN)
    return None if bool(m.all()) else m


class PaliGemma(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = SiglipVision(cfg.vision)
        self.multi_modal_projector = Projector(cfg.vision.hidden_size, cfg.text.hidden_size)
        self.language_model = Gemma(cfg.text)
        self.stop, self.pad_id = [1], 0  # set from the checkpoint by load()

    def image_features(self, pixel_values):  # (N, 3, S, S) -> (N, P, C): unscaled, unlike text embeddings
        # 2 images at a time: the same result, with the activations of 2 images instead of a whole batch in memory
        # (and faster on a CPU: small activations reuse freed memory instead of page-faulting in fresh memory)
        return torch.cat([self.multi_modal_projector(self.vision_tower(x)) for x in pixel_values.split(2)])

    def forward(self, input_ids, pixel_values=None, attention_mask=None, token_type_ids=None, positions=None,
                cache=None, last_only=False, **_):
        """input_ids (B, T) -> logits (B, T, V). attention_mask and token_type_ids cover the cached tokens and
        the new ones (B, S). token_type_ids 0 = prefix (bidirectional), 1 = suffix (causal); without them the
        whole input is a prefix, which is how a prompt is read at inference."""
        B, T = input_ids.shape
        S = T + (cache.len if cache is not None else 0)
        keys = torch.ones(B, S, dtype=torch.bool, device=input_ids.device) if attention_mask is None else attention_mask.bool()
        prefix = keys & (token_type_ids == 0) if token_type_ids is not None else keys
        if positions is None:  # PaliGemma counts positions from 1; left pads do not count
            positions = keys.long().cumsum(-1)[:, -T:].clamp(min=1)
        is_image = input_ids == self.cfg.image_token_index
        x = self.language_model.embed(input_ids.masked_fill(is_image, 0))
        if pixel_values is not None:
            feats = self.image_features(pixel_values).to(x.dtype)
            if int(is_image.sum()) != feats.shape[0] * feats.shape[1]:
                raise VLMError(f"the prompt has {int(is_image.sum())} image tokens but the images give "
                               f"{feats.shape[0] * feats.shape[1]} features")
            x = x.masked_scatter(is_image[..., None], feats)
        masks = {False: prefix_lm_mask(keys, prefix, T)}
        if self.cfg.text.sliding_window:
            masks[True] = prefix_lm_mask(keys, prefix, T, self.cfg.text.sliding_window)
        x = self.language_model(x, positions, masks, cache)
        if cache is not None:
            cache.len += T
        if last_only:
            x = x[:, -1:]
        logits = linear(x, self.language_model.embed_tokens.weight)  # the output head is the embedding
        cap = self.cfg.text.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    @torch.inference_mode()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, token_type_ids=None, max_new_tokens=100,
                 temperature=0.0, top_k=None, top_p=None, seed=None, stream=None, **_):
        """Prefill once, then decode with the KV cache. Returns only the new ids (B, n)."""
        B, T = input_ids.shape
        total, ctx = T + max_new_tokens, self.cfg.text.max_position_embeddings
        if total > ctx:
            raise VLMError(f"the prompt ({T} tokens) plus --max-new-tokens ({max_new_tokens}) exceed the "
                           f"model's context of {ctx} tokens")
        t = self.cfg.text
        dev, dt = input_ids.device, self.language_model.embed_tokens.weight.dtype
        cache = KVCache(t.num_hidden_layers, B, t.num_key_value_heads, total, t.head_dim, dt, dev)
        # Generated tokens are real keys (mask 1) and belong to the causal suffix (type 1).
        keys = torch.ones(B, total, dtype=torch.long, device=dev)
        types = torch.ones(B, total, dtype=torch.long, device=dev)
        if attention_mask is not None:
            keys[:, :T] = attention_mask
        types[:, :T] = 0 if token_type_ids is None else token_type_ids
        pos = keys[:, :T].cumsum(-1)[:, -1:]  # (B, 1) the last prompt position, counted from 1
        logits = self(input_ids, pixel_values, keys[:, :T], types[:, :T], cache=cache, last_only=True)[:, -1]

        def step(tok):
            S = cache.len + 1
            return self(tok[:, None], None, keys[:, :S], types[:, :S], pos + (S - T), cache, last_only=True)[:, -1]

        return generate(step, logits, max_new_tokens, self.stop, self.pad_id, temperature, top_k, top_p, seed, stream)


# ----------------------------------------------------------------------------- preprocessing

IMAGE_TOKEN = "<image>"
# <loc0000>..<loc1023> (detection boxes) and <seg000>..<seg127> (mask codes) are in the vocabulary;
# transformers also registers them as added tokens, so they are matched whole in the prompt text.
EXTRA_TOKENS = [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]


class Processor:
    """Images -> pixel_values, text -> input_ids, exactly as transformers' PaliGemmaProcessor (with the
    torchvision backend). A prompt becomes <image> x (S/14)^2 per image, <bos>, the prompt, "\\n"."""

    def __init__(self, folder):
        from tokenizers import Tokenizer
        try:
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a missing or malformed file
            raise VLMError(f"{folder / 'tokenizer.json'} cannot be read ({e})") from None
        self.tokenizer.add_tokens(EXTRA_TOKENS)
        pp = read_json(folder / "preprocessor_config.json")
        self.size = (pp["size"]["height"], pp["size"]["width"])
        self.mode = {2: "bilinear", 3: "bicubic"}.get(pp.get("resample", 3), "bicubic")
        self.image_seq_length = pp["image_seq_length"]
        tc = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
        self.bos, self.eos, pad = (str(tc.get(k, d)) for k, d in
                                   (("bos_token", "<bos>"), ("eos_token", "<eos>"), ("pad_token", "<pad>")))
        self.pad_id = self.tokenizer.token_to_id(pad)
        self.stop = [self.tokenizer.token_to_id(self.eos)]  # load() widens it to the checkpoint's end ids

    def images(self, images):  # list of images -> (N, 3, S, S) float32 in [-1, 1]
        return torch.cat([normalize(resize(image_tensor(im)[None], self.size, self.mode)) for im in images])

    def __call__(self, text=None, images=None, suffix=None, **_):
        text = [text] if isinstance(text, str) or text is None else list(text)
        text = ["" if t is None else t for t in text]
        if images is None:
            raise VLMError("PaliGemma needs at least one image per prompt")
        if not isinstance(images, (list, tuple)):
            images = [[images]] * len(text)  # one image for every prompt
        per_prompt = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        flat = [im for ims in per_prompt for im in ims]
        if not any(IMAGE_TOKEN in t for t in text):  # the usual case: no placeholders, put them first
            if len(per_prompt) != len(text):
                raise VLMError(f"got {len(per_prompt)} image lists for {len(text)} prompts")
            text = [IMAGE_TOKEN * len(ims) + self.bos + t + "\n" for t, ims in zip(text, per_prompt)]
        else:  # placeholders given: <bos> goes right after the last one
            n = sum(t.count(IMAGE_TOKEN) for t in text)
            if n != len(flat):
                raise VLMError(f"the prompts have {n} {IMAGE_TOKEN} placeholders but {len(flat)} images were given")
            text = [t[:(e := t.rfind(IMAGE_TOKEN) + len(IMAGE_TOKEN))] + self.bos + t[e:] + "\n" for t in text]
        text = [t.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.image_seq_length) for t in text]
        ids = [self.tokenizer.encode(t, add_special_tokens=False).ids for t in text]
        types = [[0] * len(i) for i in ids]
        if suffix is not None:  # training: the answer, then <eos>, is the causal suffix (type 1)
            suffix = [suffix] if isinstance(suffix, str) else suffix
            for i, s in enumerate(suffix):
                s_ids = self.tokenizer.encode(s + self.eos, add_special_tokens=False).ids
                ids[i], types[i] = ids[i] + s_ids, types[i] + [1] * len(s_ids)
        L = max(len(i) for i in ids)  # left padding, so every row ends where generation starts
        pad = lambda rows, v: torch.tensor([[v] * (L - len(r)) + r for r in rows])
        out = {"input_ids": pad(ids, self.pad_id), "token_type_ids": pad(types, 0),
               "attention_mask": pad([[1] * len(i) for i in ids], 0), "pixel_values": self.images(flat)}
        out["labels"] = out["input_ids"].masked_fill(out["token_type_ids"] == 0, -100)
        return out

    def decode(self, ids):
        """Text of generated ids, up to the first end token, special tokens skipped."""
        ids = [int(i) for i in ids]
        ends = [k for k, i in enumerate(ids) if i in self.stop]
        return self.tokenizer.decode(ids[:ends[0]] if ends else ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------- loading

def hub_name(key):
    """Hub key -> our module path. transformers 5 may save the vision tower without `vision_model.`; the
    output head is tied to the embedding, so a stored copy (older exports) is ignored."""
    if key.startswith("language_model.lm_head."):
        return None
    return key.replace("vision_tower.vision_model.", "vision_tower.").replace("language_model.model.", "language_model.")


def load(model=DEFAULT_MODEL, device=None, dtype=None):
    """Load a PaliGemma checkpoint (hub repo id or local directory) -> (model, processor)."""
    folder = resolve(model)
    cfg = Config.from_folder(folder)
    m = load_weights(lambda: PaliGemma(cfg), folder, hub_name, device, dtype)
    processor = Processor(folder)
    m.stop = stop_ids(folder, processor.tokenizer.token_to_id(processor.eos))
    m.pad_id = processor.pad_id
    processor.stop = m.stop
    return m, processor


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    p = cli_parser("Caption, answer questions about, detect or segment images with PaliGemma 1/2. Prompts "
                   "are task prefixes such as 'caption en', 'answer en <question>', 'detect cat', 'ocr'.",
                   DEFAULT_MODEL)
    a = p.parse_args(argv)
    check_args(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.prompt)
    if not a.image:
        raise VLMError("PaliGemma needs an image: pass --image FILE")
    images = [open_image(path) for path in a.image]  # fail on a bad image before the slow load
    t0 = time.perf_counter()
    model, processor = load(a.model, a.device, a.dtype)
    t_load = time.perf_counter() - t0
    dev = next(model.parameters()).device
    inputs = {k: v.to(dev) for k, v in processor(text=[a.prompt], images=[images]).items()}
    out = Streamer(processor.decode)
    model.generate(**inputs, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                   top_p=a.top_p, seed=a.seed, stream=out)
    out()
    if a.verbose:
        out.report(t_load)


if __name__ == "__main__":
    run_cli(main)
