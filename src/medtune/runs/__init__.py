"""The run folder, below both training and evaluation: its files (config, env, metrics), its atomic checkpoints and
loading a trained model back from it. ``train/`` writes run folders, ``evaluate``/``predict``/``report`` read them,
and RL's ``init_from`` reads its parent's through here too, so no recipe imports the evaluation layer."""
