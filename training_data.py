"""The training data of finetune.py: the JSON Lines file read and checked line by line, each
example encoded into model inputs whose labels cover the answer only, and the endless shuffled
batches. A tool: finetune.py imports it, and so do the tests (and bench/train.py) that build
training rows; it imports common.py only (the family is passed in, as its model file's module).

The data is one JSON object a line: {"image": path | "images": [paths] | "video": path, "prompt":
text, "answer": text}, paths relative to the data file. PaliGemma learns the answer and <eos>
after its prefix (processor(..., suffix=...)); the chat families get the checkpoint's chat
template around the prompt and learn the answer as the template writes it and its end-of-turn
token (prompt_and_answer).

Read top to bottom: a conversation's prompt and answer, reading the file, encoding, the checks
before the first step, the batches.
"""
import json
import random
from pathlib import Path

from common import VLMError, open_image


def prompt_and_answer(processor, messages):
    """Training data from a conversation whose last message is the assistant's answer -> (prompt,
    answer), for processor(text=[prompt], images=..., suffix=[answer]), whose labels then cover
    exactly the answer. `processor` is a chat family's (smolvlm.py's or perception_lm.py's): the
    prompt is the conversation without its answer as processor.apply_chat_template renders it for
    generation, the answer is what the template writes after that, up to and including
    processor.end_of_turn (SmolVLM: " " + text + "<end_of_utterance>"; PerceptionLM: the text
    trimmed + "<|eot_id|>"). What the template writes after that token (SmolVLM's "\\n") comes
    before the next turn and is not learned."""
    if not messages or messages[-1].get("role") != "assistant":
        raise VLMError("a training conversation must end with the assistant's answer")
    prompt = processor.apply_chat_template(messages[:-1], add_generation_prompt=True)
    whole = processor.apply_chat_template(messages, add_generation_prompt=False)
    answer = whole[len(prompt):]
    end_token = processor.end_of_turn
    if not whole.startswith(prompt) or end_token not in answer:
        raise VLMError("the chat template does not write the answer after the generation prompt")
    end = answer.index(end_token) + len(end_token)
    return prompt, answer[:end]


def read_examples(path):
    """The data file -> examples {"where", "images", "videos", "prompt", "answer"}, each line
    checked for its fields and its files (the encoding is checked once the processor is there)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or e
        raise VLMError(f"data {path} cannot be read ({why})") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            item = json.loads(line)
        except ValueError as e:
            raise VLMError(f"{where}: not JSON ({e})") from None
        if not isinstance(item, dict):
            raise VLMError(f"{where}: not a JSON object")
        for field in ("prompt", "answer"):
            if not isinstance(item.get(field), str):
                raise VLMError(f"{where}: no {field!r} text")
        media = [key for key in ("image", "images", "video") if key in item]
        if len(media) != 1:
            raise VLMError(f"{where}: give one of 'image', 'images' or 'video'")
        images = item.get("images", [item["image"]] if "image" in item else [])
        videos = [item["video"]] if "video" in item else []
        if not isinstance(images, list) or not images + videos:
            raise VLMError(f"{where}: 'images' must be a non-empty list of paths")
        paths = images + videos
        if not all(isinstance(name, str) for name in paths):
            raise VLMError(f"{where}: the image and video paths must be text")
        for name in paths:
            if not (path.parent / name).is_file():
                raise VLMError(f"{where}: {path.parent / name} not found")
        examples.append(dict(where=where, images=[path.parent / f for f in images],
                             videos=[str(path.parent / f) for f in videos],
                             prompt=item["prompt"], answer=item["answer"]))
    if not examples:
        raise VLMError(f"data {path} holds no examples")
    return examples


def encode(family, processor, examples):
    """Examples -> one left-padded batch of model inputs whose labels cover the answers only.
    `family` is the model file's module (paligemma, smolvlm or perception_lm), `processor` its
    processor."""
    images = [[open_image(name) for name in example["images"]] for example in examples]
    videos = [video for example in examples for video in example["videos"]]
    if family.__name__ == "paligemma":
        if videos:
            raise VLMError("PaliGemma reads images, not videos")
        prompts = [example["prompt"] for example in examples]
        answers = [example["answer"] for example in examples]
        return processor(text=prompts, images=images, suffix=answers)
    prompts = []
    template_answers = []  # the answers as the chat template writes them, end-of-turn token last
    for example in examples:
        content = [{"type": "image"} for _ in example["images"]]
        content += [{"type": "video"} for _ in example["videos"]]
        content.append({"type": "text", "text": example["prompt"]})
        answer = [{"type": "text", "text": example["answer"]}]
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        prompt, template_answer = prompt_and_answer(processor, messages)
        prompts.append(prompt)
        template_answers.append(template_answer)
    return processor(text=prompts, images=images if any(images) else None,
                     videos=videos or None, suffix=template_answers)


def check_examples(family, processor, examples, context, batch_size):
    """Encode every example once, before training: a bad image or video, a prompt the processor
    refuses, an answer holding the end-of-turn text (its labels would stop there), or a prompt and
    answer longer than the context stop here, naming the line."""
    is_paligemma = family.__name__ == "paligemma"
    end = processor.eos if is_paligemma else processor.end_of_turn  # what ends an answer
    for example in examples:
        if end in example["answer"]:
            raise VLMError(f"{example['where']}: the answer contains {end!r}, the text that ends "
                           "an answer")
        try:
            inputs = encode(family, processor, [example])
        except VLMError as e:
            raise VLMError(f"{example['where']}: {e}") from None
        n_tokens = inputs["input_ids"].shape[1]
        if n_tokens > context:
            raise VLMError(f"{example['where']}: the prompt and answer take {n_tokens} tokens, "
                           f"more than the model's context of {context}")
    with_video = {bool(example["videos"]) for example in examples}
    # SmolVLM's processor refuses a batch that mixes them
    if family.__name__ == "smolvlm" and len(with_video) == 2 and batch_size > 1:
        raise VLMError("SmolVLM cannot batch images with videos: use --batch-size 1")


def batches(examples, batch_size, seed):
    """Endless batches of examples, shuffled anew at every pass over the data."""
    rng = random.Random(seed)
    while True:
        order = list(examples)
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield order[start:start + batch_size]

