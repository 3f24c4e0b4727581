"""
Training and evaluation of Marigold models, kept apart from inference.

Nothing in marigold_model outside this package imports it (test/test_import_rules.py).
Modules: trainer (the run, ``marigold-train``), train_config (settings, checked once),
training_data, model_setup, run_log, vae_training, tiny_recipe (``make train-tiny``),
evaluate (the protocol, ``marigold-eval``) and eval_datasets.
"""
