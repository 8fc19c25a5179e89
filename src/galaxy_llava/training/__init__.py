"""Training on the Hugging Face Trainer: arguments (``arguments``), examples and batches
(``batches``), the frozen encoder's feature cache (``feature_cache``), the RUN folder's files
(``run_folder``) and the Trainer subclass with its entry point (``trainer``)."""
