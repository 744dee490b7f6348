"""From a recipe's data section to (train, eval) datasets of token ids.

Self-distillation runs on every process, each answering its share of the prompts into the
one shared, resumable folder; then all read the whole folder.
"""

from __future__ import annotations

from ..errors import SpecHeadsError


def prepare_datasets(recipe, verifier, accelerator=None):
    from .data import generate_self_distillation, load_conversations, split_train_eval

    d = recipe.data
    if d.conversations:
        dataset = load_conversations(d.conversations, verifier, max_length=d.max_length)
    else:
        s = d.self_distill
        from ..prompts import load_prompts
        from .prompt_source import default_training_prompts

        if s.prompts == "default":
            prompts = default_training_prompts(s.num_prompts, seed=recipe.training.seed)
        else:
            prompts = load_prompts(s.prompts, limit=s.num_prompts)
        generate_self_distillation(
            verifier, prompts, s.output_dir, max_new_tokens=s.max_new_tokens,
            temperature=s.temperature, batch_size=s.batch_size, seed=recipe.training.seed,
            accelerator=accelerator,
        )
        dataset = load_conversations(s.output_dir, verifier, max_length=d.max_length)
    if len(dataset) < 2:
        raise SpecHeadsError(f"the training data has {len(dataset)} examples; at least 2 are needed (train + eval)")
    return split_train_eval(dataset, eval_fraction=d.eval_fraction, seed=recipe.training.seed)

