"""
Training and evaluation of Marigold models; inference (marigold_model outside this package)
never imports it.

trainer (the run and ``marigold-train``), train_config (settings and their checks),
training_data, model_setup, run_log, vae_training, tiny_recipe (``make train-tiny``),
evaluate (the protocol and ``marigold-eval``) and eval_datasets.
"""
