"""Callbacks for the trainers people use, each in its own module so that importing normswap never
imports them: ``normswap.integrations.lightning`` (Lightning) and ``normswap.integrations.huggingface``
(``transformers.Trainer``). Opacus needs no module: the ``dp`` recipe's result trains as-is."""
