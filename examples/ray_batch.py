"""Answer one prompt for every image of a folder, or of any source Ray Data reads (s3://, gs://,
a list of files), on as many machines as a Ray cluster has: --batch's lines (batch_runner.py), one
model per actor, written as JSON lines files into a folder.

    python examples/ray_batch.py photos/ --family smolvlm --prompt "Describe this image." \\
        --output captions/ --actors 2

On a laptop it starts a local Ray; on a cluster, submit the same command as a job:
    ray job submit --address http://HEAD:8265 --working-dir . -- python examples/ray_batch.py ...
Flags this script does not know go to the family's command line: --raw, --max-tiles N,
--temperature T, --seed N, --quantize int8, --vae FILE, ...
"""
import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the model files and the tools
sys.path.insert(0, str(ROOT))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a folder of images (subfolders too), files, or a URI Ray reads")
    p.add_argument("--family", required=True, choices=["paligemma", "smolvlm", "perception_lm"])
    p.add_argument("--model", help="hub repo id or local dir (default: the family's)")
    p.add_argument("--prompt", default="", help="the text prompt, as the family's --prompt")
    p.add_argument("--output", required=True, help="a new (or empty) folder for the JSON lines")
    p.add_argument("--actors", type=int, default=1, help="models loaded, one per actor (1)")
    p.add_argument("--cpus-per-actor", type=float, default=1, help="CPUs each actor holds (1); "
                   "its torch threads, on a CPU")
    p.add_argument("--max-new-tokens", type=int, default=100, help="at most this many (100)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the "
                   "family's for the actor's device)")
    p.add_argument("--batch-size", type=int, default=None, help="images generated together "
                   "(default: --batch's, 4 on a CPU, 16 on CUDA)")
    return p.parse_known_args(argv)  # the rest: the family's own flags


def main(argv=None):
    args, options = parse_args(argv)
    try:
        import ray
    except ImportError:
        sys.exit('error: Ray is not installed: pip install "ray[data]"')
    from batch_runner import DatasetAnswerer, family_args
    from command_line import BATCH_SIZE
    from common import VLMError, first_line
    from image_files import IMAGE_SUFFIXES
    answerer = {"family": args.family, "model": args.model, "prompt": args.prompt,
                "max_new_tokens": args.max_new_tokens, "dtype": args.dtype,
                "batch_size": args.batch_size, "options": options}
    try:
        # every actor checks again (and the prompt, before its load): a bad flag fails here, once
        family_args(args.family, args.model, args.prompt, args.max_new_tokens, args.dtype,
                    options=options)
        for flag, value in (("actors", args.actors), ("batch-size", args.batch_size)):
            if value is not None and value <= 0:
                raise VLMError(f"{flag} must be positive, got {value}")
        if Path(args.output).is_dir() and any(Path(args.output).iterdir()):
            raise VLMError(f"{args.output} is not empty: the lines go into a new folder")
    except VLMError as e:
        sys.exit(f"error: {e}")
    if not ray.is_initialized():
        # Started here (no RAY_ADDRESS): the actors find the model files as this script does.
        # Under `ray job submit --working-dir .`, Ray ships them to every machine itself.
        runtime_env = None
        if not os.environ.get("RAY_ADDRESS"):
            runtime_env = {"env_vars": {"PYTHONPATH": str(ROOT)}}
        ray.init(runtime_env=runtime_env)
    gpus = int(ray.cluster_resources().get("GPU", 0) > 0)  # a GPU per actor where there are any
    batch_size = args.batch_size or BATCH_SIZE["cuda" if gpus else "cpu"]
    # Bytes, not ray.data.read_images: an unreadable file is then an error line (decoded in the
    # actor as --batch opens a file, EXIF rotation too), not a failed job. Reading and writing
    # hold no CPU, so actors that hold every CPU cannot starve them (2 actors on 2 cores did).
    try:
        images = ray.data.read_binary_files(args.source, include_paths=True, num_cpus=0,
                                            file_extensions=[s[1:] for s in IMAGE_SUFFIXES])
    except (OSError, ValueError) as e:  # no such file or folder; no image among its files
        sys.exit(f"error: {args.source}: {first_line(e)}")
    # one batch at a time an actor: a batch waits for the first free actor, not in the queue of
    # the first one ready (which took every batch of a small folder while the others loaded)
    actors = ray.data.ActorPoolStrategy(size=args.actors, max_tasks_in_flight_per_actor=1)
    answers = images.map_batches(DatasetAnswerer, fn_constructor_kwargs=answerer, compute=actors,
                                 batch_size=batch_size, num_cpus=args.cpus_per_actor,
                                 num_gpus=gpus)
    try:
        answers.write_json(args.output, ray_remote_args={"num_cpus": 0})
    except ray.exceptions.RayActorError as e:
        # An actor could not start, say its prompt check failed (what would fail every image):
        # Ray gives its traceback as text, whose last line is the error's.
        why = str(e).strip().splitlines()[-1]
        sys.exit(f"error: {why.removeprefix('common.VLMError: ')}")


if __name__ == "__main__":
    main()
