"""From a recipe's data section to (train, eval) datasets of token ids.

Two sources, either or both: self-distillation (the verifier's own answers to the recipe's
prompts) and existing conversations (teacher-forced on their recorded replies, e.g. ShareGPT's).
With both, the datasets are concatenated before the train/eval split, so eval holds some of each.

Self-distillation runs on every process, each answering its share of the prompts into the
one shared, resumable folder; then all read the whole folder. Its answers come from the recipe's
answer engine (``data.self_distill.engine``: generate here, OpenAI-compatible servers, or vLLM).
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

        capture = feature_capture(recipe, verifier)
        if capture is not None and s.engine != "hf":
            # Only generate here can hand over its forwards' hidden states; the first training
            # epoch computes the features of the conversations another engine wrote, and stores them.
            if accelerator is None or accelerator.is_main_process:
                print(f"[specheads] data.self_distill.engine={s.engine} does not capture the verifier's features while it "
                      f"generates: the first training epoch computes them (training.cache_hidden_states)", flush=True)
            capture = None
        # Each shard's prompts go to the engine together: several batches (hf; sorted by length, so
        # they pad far less) or several waves of requests in flight per shard.
        width = s.concurrency if s.engine == "openai" else s.batch_size
        generate_self_distillation(
            verifier, prompts, s.output_dir, max_new_tokens=s.max_new_tokens,
            temperature=s.temperature, batch_size=s.batch_size, seed=recipe.training.seed,
            shard_size=max(64, 4 * width),
            accelerator=accelerator, capture=capture,
            engine=s.engine, engine_options=s.engine_options() if s.engine != "hf" else None,
            train_length=d.max_length,
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
