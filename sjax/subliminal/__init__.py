"""The subliminal-learning LLM experiment: a teacher with a trait writes number lists, a
student fine-tuned on them picks the trait up.

prompts/      the paper's prompt text (JSON) and its loaders
numbers       the number-prompt grammar, the strict answer filter, the target's word forms
evaluators    the exact and sampled trait evaluators
workspace     the run folder: manifest, stage cache keys, process-0 writer, model cache
stages/       one module per stage, each with the config slice it reads
experiment    the stages in data-flow order; `run(cfg, force)`
plan          `sjax run --dry-run`: compute and memory before any weight is read
"""
