"""Run by test_distributed under torchrun: distil from a recipe JSON, then report this rank's weights."""
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
    result = run_distill(recipe, progress=False)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    digest = hashlib.sha256()
    for name, p in sorted(captured["student"].state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().numpy().tobytes())
    report = {"rank": rank, "sha256": digest.hexdigest(), "loss": result.metrics["final_train_loss"], "processes": result.metrics["processes"]}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
