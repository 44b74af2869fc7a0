"""The stages: each reads the run folder, calls the parts, and writes the run folder.

``distill.pipeline`` chains them and names them for users. Public names, by module:

    run_folder: prepare, setup, load_split, check_same_run, allow_config_change, MADE_FROM
    preflight: check_run
    generate: generate
    shrink: shrink
    cache: build_teacher_cache, verify_teacher_cache
    train: train_student
    evaluate: evaluate
    export: export
"""
