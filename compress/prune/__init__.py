"""Structured pruning of a teacher into a smaller student (Minitron width, ShortGPT depth).

`importance` holds the pure statistics, `structure` the shapes and the weight surgery, `measure` the
hooks that collect importance on calibration blocks, and `stage` the `compress prune` / `student.prune`
entry points that write an ordinary Hugging Face model folder.
"""
