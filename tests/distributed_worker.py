"""Run by test_distributed under torchrun: distil from a recipe JSON, then report this rank's weights."""
import hashlib
import json
import sys
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
