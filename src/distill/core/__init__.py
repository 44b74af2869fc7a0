"""The core every part stands on: config schema, prompts and batches, files, hardware, models, terms of
use, progress.

It imports no part of the pipeline. Public names, by module:

    config: RunConfig, TrainConfig, EvaluateConfig, ConfigError, LOSS_NAMES, TASK_NAMES
    recipe: load_config, load_config_with_notes, dump_config, parse_override, default_recipe_text,
        quick_start_overrides
    units: duration_seconds, parse_count, nearest
    data: Prompt, DataError, read_prompts, split_prompts, prompt_token_ids, make_example, collate, pack,
        Batch
    answers: answer_key, read_answers, write_records, append_records, read_log
    generation: generate_batch, eos_ids, Generation
    models: load_model, load_tokenizer, resolve_gguf, resolve_model_dir, model_facts, ModelFacts,
        ModelError, read_licence, Licence
    terms: Terms, terms_of, read_terms
    hardware: choose_precision, resolve_device, cpu_model, Precision, DTYPES
    fsio: write_text, write_bytes, write_json, save_pretrained, save_safetensors
    errors: StageError, TrainingError, need
    progress: progress_bar, PlainProgress, console
    runlog: run_output
    interrupt: stop_at_safe_points, check, Stopped
"""
