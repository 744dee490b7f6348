"""From a recipe's data section to (train, eval) datasets of token ids.

Two sources, either or both: self-distillation (the verifier's own answers to the recipe's
prompts) and existing conversations (teacher-forced on their recorded replies, e.g. ShareGPT's).
With both, the datasets are concatenated before the train/eval split, so eval holds some of each.

Self-distillation runs on every process, each answering its share of the prompts into the
one shared, resumable folder; then all read the whole folder.
"""

from __future__ import annotations

from ..errors import SpecHeadsError


def prepare_datasets(recipe, verifier, accelerator=None):
    from .data import generate_self_distillation, load_conversations, split_train_eval

    d = recipe.data
    parts = []
    if d.self_distill is not None:
        from .prompt_source import training_prompts

        s = d.self_distill
        prompts = training_prompts(s.prompts, s.num_prompts, seed=recipe.training.seed, turns=s.turns)
        from .objectives import feature_capture

        generate_self_distillation(
            verifier, prompts, s.output_dir, max_new_tokens=s.max_new_tokens,
            temperature=s.temperature, batch_size=s.batch_size, seed=recipe.training.seed,
            # prompts are sorted by length within a shard: several batches per shard pad far less
            shard_size=max(64, 4 * s.batch_size),
            accelerator=accelerator, capture=feature_capture(recipe, verifier),
        )
        parts.append(load_conversations(s.output_dir, verifier, max_length=d.max_length))
    if d.conversations:
        parts.append(load_conversations(d.conversations, verifier, max_length=d.max_length, limit=d.num_conversations))
    if len(parts) == 1:
        dataset = parts[0]
    else:
        from datasets import concatenate_datasets

        dataset = concatenate_datasets(parts)
    if len(dataset) < 2:
        raise SpecHeadsError(f"the training data has {len(dataset)} examples; at least 2 are needed (train + eval)")
    return split_train_eval(dataset, eval_fraction=d.eval_fraction, seed=recipe.training.seed)
