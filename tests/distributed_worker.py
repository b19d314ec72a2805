"""Run by test_distributed under torchrun or accelerate launch: distil from a recipe JSON (RESUME=1: with
--resume), then report this rank's weights (under FSDP2, the whole student all-gathered)."""
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from compress.distill.loop import run_distill
from compress.recipe import validate_recipe


def main(recipe_json: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    recipe = validate_recipe(json.loads(Path(recipe_json).read_text()))
    captured = {}
    import compress.distill.loop as loop

    real = loop.DistillObjective

    def capture(student, *args, **kwargs):
        captured["student"] = student
        return real(student, *args, **kwargs)

    loop.DistillObjective = capture
    real_load = loop.load_teacher

    def capture_teacher(*args, **kwargs):
        captured["teacher"] = real_load(*args, **kwargs)
        return captured["teacher"]

    loop.load_teacher = capture_teacher
    if os.environ.get("LATE_RANK_WAITS_FOR_CACHE") and int(os.environ.get("RANK", "0")) > 0:
        # The race a loaded machine produces: this rank looks for the logits cache only once rank 0 has
        # finished building it (a rank that then skips the barrier rank 0 waits in hangs the run).
        real_open = loop.logits_cache.open_cache

        def late_open(root, key):
            deadline = time.monotonic() + 120
            while not (Path(root) / key.digest / "manifest.json").is_file() and time.monotonic() < deadline:
                time.sleep(0.1)
            return real_open(root, key)

        loop.logits_cache.open_cache = late_open
    result = run_distill(recipe, progress=False, resume=bool(os.environ.get("RESUME")))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    state = captured["student"].state_dict()
    if any(hasattr(p, "full_tensor") for p in state.values()):  # FSDP2 shards (DTensors): gather the whole model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(captured["student"], options=StateDictOptions(full_state_dict=True))
    digest = hashlib.sha256()
    for name, p in sorted(state.items()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().numpy().tobytes())
    sharded = {role: sorted({type(p).__name__ for p in captured[role].parameters()}) for role in ("student", "teacher") if role in captured}
    report = {"rank": rank, "parameter_types": sharded, "sha256": digest.hexdigest(), "loss": result.metrics["final_train_loss"], "processes": result.metrics["processes"]}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    if torch.distributed.is_initialized():  # a clean teardown: exiting with the gloo group alive can fail the exit status
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
