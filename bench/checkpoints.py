"""Write random-weight checkpoints at the REAL sizes, in the hub layout, for the benchmarks.

    python bench/checkpoints.py paligemma --size pg2-3b-224 --dtype bfloat16  # prints the directory

No weights can be downloaded here, so the bench measures random weights with the real shapes (the
speed of a forward pass does not depend on the values). The test fixture builders write them, with
the real dimensions and vocabulary, and with the end tokens made unreachable so every run generates
the same number of tokens. They are cached under bench/checkpoints/ (git-ignored); a few GB each.
"""
import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

# family -> size -> (fixture module, builder keyword arguments)
SIZES = {
    "paligemma": {
        "pg2-3b-224": dict(variant="pg2", seed=0,
                           text=dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216,
                                     num_attention_heads=8, num_key_value_heads=4,
                                     num_hidden_layers=26, head_dim=256, query_pre_attn_scalar=256,
                                     sliding_window=4096, attn_logit_softcapping=50.0,
                                     final_logit_softcapping=30.0,
                                     hidden_activation="gelu_pytorch_tanh", vocab_size=257216),
                           vision=dict(hidden_size=1152, intermediate_size=4304,
                                       num_attention_heads=16, num_hidden_layers=27, image_size=224,
                                       patch_size=14)),
        "pg1-3b-224": dict(variant="pg1", seed=0,
                           text=dict(model_type="gemma", hidden_size=2048, intermediate_size=16384,
                                     num_attention_heads=8, num_key_value_heads=1,
                                     num_hidden_layers=18, vocab_size=257216),
                           vision=dict(hidden_size=1152, intermediate_size=4304,
                                       num_attention_heads=16, num_hidden_layers=27, image_size=224,
                                       patch_size=14)),
    },
}


SMOL_VISION = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                   num_hidden_layers=12, image_size=512, patch_size=16)
SIZES["smolvlm"] = {
    "256m": dict(variant="v1", seed=0, scale_factor=4, tile=512, longest_edge=2048,
                 vision=SMOL_VISION,
                 text=dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                           num_key_value_heads=3, num_hidden_layers=30, head_dim=64,
                           rope_theta=100000, max_position_embeddings=8192, vocab_size=49280)),
    "v2-500m": dict(variant="v2", seed=0, scale_factor=4, tile=512, longest_edge=2048,
                    video_edge=512, max_frames=64,
                    vision=SMOL_VISION,
                    text=dict(hidden_size=960, intermediate_size=2560, num_attention_heads=15,
                              num_key_value_heads=5, num_hidden_layers=32, head_dim=64,
                              rope_theta=100000, max_position_embeddings=8192,
                              vocab_size=49280)),
}


def _plm(size, max_num_tiles):
    from perception_lm_fixture import REAL
    return dict(REAL[size], variant=size, max_num_tiles=max_num_tiles)


SIZES["perception_lm"] = {
    "1b-2tiles": lambda: _plm("1b", 2),  # thumbnail + 1 tile: 512 image tokens
}


def checkpoint(family, size, dtype="bfloat16"):
    """The cached directory of a real-size random checkpoint, written on first use."""
    folder = HERE / "checkpoints" / f"{family}-{size}-{dtype}"
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    import importlib
    fixture = importlib.import_module(f"{family}_fixture")
    print(f"writing a random {family} {size} checkpoint ({dtype}) to {folder} ...", file=sys.stderr)
    spec = SIZES[family][size]
    spec = dict(spec() if callable(spec) else spec)
    fixture.build(folder, spec.pop("variant"), shapes=spec, dtype=getattr(torch, dtype), shards=2,
                  check=False, unreachable_eos=True)
    return folder


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("family", choices=sorted(SIZES))
    p.add_argument("--size", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="dtype of the file")
    a = p.parse_args()
    if a.size not in SIZES[a.family]:
        p.error(f"--size must be one of {', '.join(SIZES[a.family])}")
    print(checkpoint(a.family, a.size, a.dtype))


if __name__ == "__main__":
    main()
