"""How fast is ONE implementation on one checkpoint? (one fresh process; bench/compare.py runs it
for both)

    python bench/measure.py ours paligemma CHECKPOINT_DIR --dtype float32
                            [--new-tokens 32] [--threads N]

Prints one JSON line: load_s (imports + load to a ready model and processor), ttft_s (processor +
prefill to the first token, one image; the median of three runs), decode_tok_s (batch 1),
batch4_tok_s (decode throughput at batch 4), peak_rss_mb, anon_mb (resident memory that is not file
pages, at the end), decode_bytes (bytes read per decoded token: decoder weights and LM head),
tokens. A warm-up generation runs first and is not counted.
"""
import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = {"paligemma": "caption en", "smolvlm": "Describe this image.",
           "perception_lm": "Describe the image."}
VISION_PREFIXES = ("vision_tower", "vision_model", "multi_modal_projector", "model.vision_model",
                   "model.connector", "connector", "model.vision_tower",
                   "model.multi_modal_projector")


def image():
    """A fixed 640x480 test picture (gradients and noise)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    base = (np.stack([x * 255 / 640, y * 255 / 480, (x + y) * 127 / 1120], -1)
            + rng.normal(0, 20, (480, 640, 3)))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def chat(family, processor, batch):
    """The prompt text for `batch` rows, through the checkpoint's chat template where the family has
    one."""
    if family == "paligemma":
        return [PROMPTS[family]] * batch
    messages = [{"role": "user",
                 "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[family]}]}]
    return [processor.apply_chat_template(messages, add_generation_prompt=True)] * batch


def load(impl, family, folder, dtype, quantize=None):
    if impl == "ours":
        import importlib
        module = importlib.import_module(family)
        return module.load(str(folder), device="cpu", dtype=dtype, quantize=quantize)
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).eval()
    return model, AutoProcessor.from_pretrained(folder)


def run(impl, family, model, processor, batch, new_tokens, compiled=False):
    """-> (t_start, [arrival time of each new token], prompt length). compiled: ours through
    generate(..., compiled=True)."""
    times = []
    t0 = time.perf_counter()
    texts = chat(family, processor, batch)
    if impl == "ours":
        inputs = processor(text=texts, images=[[image()]] * batch)
        options = {"compiled": True} if compiled else {}
        model.generate(**inputs, max_new_tokens=new_tokens,
                       stream=lambda tok: times.append(time.perf_counter()), **options)
    else:
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            first = True

            def put(self, value):  # the first call carries the prompt, the next ones each new token
                if not self.first:
                    times.append(time.perf_counter())
                self.first = False

            def end(self):
                pass

        kw = dict(padding=True) if batch > 1 else {}
        # the rendered chat already starts with <|begin_of_text|>: no second one
        if family == "perception_lm":
            kw["add_special_tokens"] = False
        inputs = processor(text=texts, images=[[image()]] * batch, return_tensors="pt", **kw)
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, streamer=Clock())
    return t0, times, inputs["input_ids"].shape[1]


def decode_bytes(model):
    """Bytes a decode step must read: every decoder weight once and the LM head, the vision tower
    not. A token embedding is only looked up (one row) unless it is also the LM head (tied), when it
    is read whole, once. A quantized decoder (load(..., quantize=...)) keeps its weights and scales
    in buffers, its head always its own. The KV cache of a short prompt adds < 1% and is left
    out."""
    text = {id(p): p for n, p in model.named_parameters() if not n.startswith(VISION_PREFIXES)}
    import quantize
    quantized = {id(b): b for m in model.modules()
                 if isinstance(m, (quantize.Int8Linear, quantize.Int4Linear)) for b in m.buffers()}
    text.update(quantized)
    tables = {id(m.weight): m.weight for n, m in model.named_modules()
              if isinstance(m, torch.nn.Embedding) and not n.startswith(VISION_PREFIXES)}
    untied = any(hasattr(m, "out_features") and id(m.weight) in text
                 and id(m.weight) not in tables
                 and any(m.out_features == t.shape[0] for t in tables.values())
                 for m in model.modules())
    read = [p for i, p in text.items() if i not in tables or not untied]
    return sum(p.numel() * p.element_size() for p in read)


def anonymous_mb():
    """Resident memory that is not a file's pages (RssAnon). Weights used straight from a
    safetensors mmap are file pages: the kernel shares them with its page cache and can drop them,
    so they are not in this number."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith("RssAnon:")),
                float("nan"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("impl", choices=["ours", "hf"])
    p.add_argument("family", choices=sorted(PROMPTS))
    p.add_argument("checkpoint")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="ours only")
    p.add_argument("--compile", action="store_true",
                   help="ours only: compiled decoding (the warm-ups compile batch 1 and batch 4)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    t = time.perf_counter()
    model, processor = load(a.impl, a.family, Path(a.checkpoint), dtype, a.quantize)
    load_s = time.perf_counter() - t
    if a.compile and a.impl != "ours":
        p.error("--compile measures ours only")
    t = time.perf_counter()
    run(a.impl, a.family, model, processor, 1, 2, a.compile)  # warm-up (and compile)
    warm_up_s = time.perf_counter() - t
    if a.impl == "ours":  # batch 4's first step times its kernels (common.Linear) and, compiled,
        run(a.impl, a.family, model, processor, 4, 2, a.compile)  # has a program: not timed
    t0, times, prompt = run(a.impl, a.family, model, processor, 1, a.new_tokens, a.compile)
    ttfts = [times[0] - t0]
    # the time to the first token varies from run to run (page faults): the median of three
    for _ in range(2):
        start, first, _ = run(a.impl, a.family, model, processor, 1, 1)
        ttfts.append(first[0] - start)
    assert len(times) == a.new_tokens, f"generated {len(times)} of {a.new_tokens} tokens"
    _, times4, _ = run(a.impl, a.family, model, processor, 4, a.new_tokens, a.compile)
    print(json.dumps({
        "load_s": load_s, "ttft_s": statistics.median(ttfts), "warm_up_s": warm_up_s,
        "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]),
        "batch4_tok_s": 4 * (len(times4) - 1) / (times4[-1] - times4[0]),
        "tokens": len(times), "prompt_tokens": prompt,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "anon_mb": anonymous_mb(),
        "decode_bytes": decode_bytes(model),
        "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
