"""FLUX.1's networks: the transformer in Black Forest Labs' layout (``transformer``) and the T5 v1.1 XXL text encoder
in transformers' ``T5EncoderModel`` layout with its SentencePiece tokenizer (``t5``). Plain ``torch.nn`` code in the
modules layer: imports only the core helpers and ``ldm.modules``."""
