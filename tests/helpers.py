"""Utilities the test files share: running a CLI (in this process, or as a real process), checking
that it failed in one clear line, writing and decoding small videos, comparing processor outputs."""
import contextlib
import io
import subprocess
import sys
import warnings

import av
import numpy as np
import pytest
import torch

from conftest import ROOT


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Import into a test module to run it single-threaded: its tensors are tiny, and on a shared
    2-core machine OpenMP hand-offs cost ~10 ms a matmul, 100x the work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cli_in_process(module, *args):
    """A model file's main() with the CLI's error handling (command_line.run_cli), in this process:
    no Python start per case. Warnings go to stderr under Python's default filters, as in
    `python <file>.py` (pytest would record them instead). -> CompletedProcess with the exit code
    and the text written to stdout and stderr."""
    import command_line
    out, err = io.StringIO(), io.StringIO()
    with (contextlib.redirect_stdout(out), contextlib.redirect_stderr(err),
          warnings.catch_warnings()):
        warnings.resetwarnings()
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                         ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        try:
            command_line.run_cli(lambda: module.main([str(a) for a in args]))
            code = 0
        except SystemExit as e:  # as Python does: a message goes to stderr with exit code 1
            code = (e.code if e.code is None or isinstance(e.code, int)
                    else print(e.code, file=sys.stderr) or 1)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def run_cli(script, *args, env=None, timeout=300):
    """`python <script> args...` as a real process (env None: this one's). Arguments may be bytes,
    to pass bytes that are not UTF-8 as a shell would; stdout and stderr come back as text."""
    argv = [sys.executable, str(ROOT / script)]
    argv += [a if isinstance(a, bytes) else str(a) for a in args]
    r = subprocess.run(argv, capture_output=True, env=env, timeout=timeout)
    return subprocess.CompletedProcess(args, r.returncode, r.stdout.decode("utf-8", "replace"),
                                       r.stderr.decode("utf-8", "replace"))


def assert_fails(r, message):
    """Exit code 1, nothing on stdout, and exactly one stderr line: `error: ...` containing
    `message`."""
    assert r.returncode == 1, (r.args, r.returncode, r.stderr)
    assert r.stdout == "", (r.args, r.stdout)
    assert (r.stderr.startswith("error: ") and r.stderr.endswith("\n")
            and r.stderr.count("\n") == 1), (r.args, r.stderr)
    assert message in r.stderr, (r.args, message, r.stderr)


def assert_same_inputs(ours, theirs):
    """Same keys in the same order, and per key the same shape, dtype and values. One difference is
    by design: transformers' PaliGemma processor returns labels even with nothing to supervise (all
    -100, kept for backward compatibility); ours returns labels only when there is a suffix."""
    if "labels" in theirs and "labels" not in ours:
        assert bool((theirs["labels"] == -100).all())
        theirs = {k: v for k, v in theirs.items() if k != "labels"}
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].shape == theirs[k].shape, k
        assert ours[k].dtype == theirs[k].dtype, k
        assert torch.equal(ours[k], theirs[k]), k


def moving_pattern(i, y, x):
    """Frame i of a moving colour pattern (every frame differs), (H, W, 3) uint8 from a coordinate
    grid."""
    rgb = [(x * 5 + i * 7) % 256, (y * 7 + i * 3) % 256, ((x + y) * 3 + i * 11) % 256]
    return np.stack(rgb, -1).astype(np.uint8)


def make_video(path, n_frames, fps, size=(48, 36), pattern=moving_pattern):
    """Encode `n_frames` frames of `pattern` as mpeg4 (the container follows the suffix:
    .mp4, .mkv, ...)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n_frames):
            for packet in s.encode(av.VideoFrame.from_ndarray(pattern(i, y, x), format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def decode_video(path):
    """Every frame of a video decoded by PyAV (N, H, W, 3), and the metadata transformers' PyAV
    reader derives."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)])
        meta = {"total_num_frames": s.frames, "fps": float(s.average_rate),
                "duration": s.frames / float(s.average_rate)}
    return frames, meta


def make_audio(path, seconds=0.5, rate=16000):
    """An audio-only file (AAC, silence), e.g. a voice memo passed where a video is expected."""
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=rate)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate = rate
        packets = [p for _ in range(int(seconds * rate / 1024) + 1) for p in s.encode(frame)]
        for packet in packets + list(s.encode()):
            c.mux(packet)
    return path


def relative_error(ours, theirs):
    """Max |ours - theirs| over max |theirs|: a gradient's error relative to its own scale."""
    return float((ours - theirs).abs().max() / theirs.abs().max())


def assert_same_loss_and_gradients(model, hf_model, inputs, hf_inputs, weights):
    """The loss of our model and of transformers' on the same inputs with labels (fp32) within 1e-5
    relative; the gradients of the loss with respect to pixel_values (a path through the vision
    tower, the projector and the decoder) and to the named weights ({our name: transformers' name})
    within 1e-4 relative max error, each of them nonzero. -> {what: relative error}."""
    pixels = inputs["pixel_values"].clone().requires_grad_()
    hf_pixels = inputs["pixel_values"].clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    hf_model.zero_grad(set_to_none=True)
    _, loss = model(**dict(inputs, pixel_values=pixels))
    hf_loss = hf_model(**dict(hf_inputs, pixel_values=hf_pixels)).loss
    loss.backward()
    hf_loss.backward()
    errors = {"loss": abs(loss.item() - hf_loss.item()) / abs(hf_loss.item()),
              "pixel_values": relative_error(pixels.grad, hf_pixels.grad)}
    assert hf_pixels.grad.abs().max() > 0
    for ours_name, hf_name in weights.items():
        grad = model.get_parameter(ours_name).grad
        hf_grad = hf_model.get_parameter(hf_name).grad
        assert hf_grad.abs().max() > 0, hf_name
        errors[ours_name] = relative_error(grad, hf_grad)
    model.zero_grad(set_to_none=True)  # the gradients' memory back; the models are shared
    hf_model.zero_grad(set_to_none=True)
    gradient_errors = [error for what, error in errors.items() if what != "loss"]
    assert errors["loss"] <= 1e-5, errors
    assert max(gradient_errors) <= 1e-4, errors
    return errors


def assert_chat_labels(proc, hf_proc, conversations, images, end_of_turn, **hf_kwargs):
    """Training rows made with training_data.prompt_and_answer and `suffix`, checked token by token
    against the checkpoint's template as transformers renders and tokenizes it: each row's ids are
    transformers' for the whole rendered conversation (up to the answer's end-of-turn token), and
    its labels are -100 on the left padding and the prompt (system text, user turns, earlier
    answers, image tokens), and equal to the ids on the last answer, which decodes to the answer
    and ends with the end-of-turn token."""
    import training_data
    pairs = [training_data.prompt_and_answer(proc, conversation)
             for conversation in conversations]
    inputs = proc(text=[prompt for prompt, _ in pairs], images=images,
                  suffix=[answer for _, answer in pairs])
    end_id = hf_proc.tokenizer.convert_tokens_to_ids(end_of_turn)
    for row, (prompt, answer) in enumerate(pairs):
        rendered = hf_proc.apply_chat_template(conversations[row], tokenize=False)
        assert rendered.startswith(prompt + answer)
        assert rendered[len(prompt + answer):] in ("", "\n")  # after the end token: not learned
        whole = hf_proc(text=[prompt + answer], images=[images[row]], return_tensors="pt",
                        **hf_kwargs)["input_ids"][0]
        prompt_ids = hf_proc(text=[prompt], images=[images[row]], return_tensors="pt",
                             **hf_kwargs)["input_ids"][0]
        T = len(whole)
        n_prompt = len(prompt_ids)
        assert torch.equal(inputs["input_ids"][row, -T:], whole)
        assert torch.equal(whole[:n_prompt], prompt_ids)
        labels = inputs["labels"][row]
        assert bool((labels[:-T] == -100).all())  # the left padding
        assert bool((labels[-T:][:n_prompt] == -100).all())  # the prompt
        assert torch.equal(labels[-T:][n_prompt:], whole[n_prompt:])  # the answer
        answer_ids = whole[n_prompt:]
        assert hf_proc.tokenizer.decode(answer_ids, clean_up_tokenization_spaces=False) == answer
        assert int(answer_ids[-1]) == end_id and int((answer_ids == end_id).sum()) == 1
    return inputs
